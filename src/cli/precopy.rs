//! `recoverfs precopy`: one VM's pre-copy job in the foreground
//! ([`crate::precopy`]); SIGINT/SIGTERM end it at its next checkpoint.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::precopy::{Control, End, Options, Report};
use crate::repo::chunk::validate_chunk_size;
use crate::repo::Repository;
use crate::util::{human_bytes, parse_size};

#[derive(clap::Args)]
pub struct PrecopyArgs {
    #[arg(long)]
    repo: String,
    /// The VM and its QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    #[arg(long, value_name = "NAME=QMP_SOCKET")]
    vm: String,
    /// The guest agent socket, to freeze the guest's filesystems for the
    /// scheduled backup (application-consistent).
    #[arg(long, value_name = "QGA_SOCKET")]
    agent: Option<PathBuf>,
    /// Seconds from one round's start to the next.
    #[arg(long, default_value_t = 60.0)]
    every: f64,
    /// Take the backup at TIME (RFC 3339, or +SECONDS from now), then end.
    #[arg(long, value_name = "TIME", conflicts_with = "until")]
    backup_at: Option<String>,
    /// Stop pre-copying at TIME (RFC 3339, or +SECONDS); a later run
    /// resumes. Without --until and --backup-at: until interrupted.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Where the pre-copy state lives (DIR/<repository id>/<vm>/).
    #[arg(long, default_value = crate::precopy::DEFAULT_STATE_DIR)]
    state: PathBuf,
    /// Chunk size: a power of two from 64K to 8M (the VM's backups' own).
    #[arg(long, default_value = "1M")]
    chunk_size: String,
    /// Read at most this many MB/s.
    #[arg(long, value_name = "MB/s")]
    max_rate: Option<f64>,
    /// Slow down when the guest's load (moving averages of its I/O latency
    /// and queue depth from QEMU, its CPU with --agent; with p99=MS the
    /// share of its requests slower than MS, which also paces chunks)
    /// reaches a limit; halt at 1.25 times a limit; resume below it.
    #[arg(long, value_name = "latency=MS,p99=MS,queue=N,cpu=PCT")]
    load_limit: Option<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// `+SECONDS` from now, or an RFC 3339 time.
pub fn parse_time(s: &str, what: &str) -> Result<SystemTime> {
    if let Some(secs) = s.strip_prefix('+') {
        // Bounded like an absolute time: more would overflow `Duration`.
        let n: f64 = secs
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && (0.0..=crate::precopy::MAX_UNIX).contains(n))
            .ok_or_else(|| Error::invalid(format!("{what} {s:?}: expected +SECONDS")))?;
        return Ok(SystemTime::now() + Duration::from_secs_f64(n));
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            Error::invalid(format!(
                "{what} {s:?}: expected an RFC 3339 time (2026-11-22T13:00:00Z) or +SECONDS"
            ))
        })?;
    // Seconds and nanoseconds apart: nanoseconds since 1970 overflow a u64
    // after the year 2554.
    let secs = u64::try_from(t.unix_timestamp()).unwrap_or(0);
    Ok(SystemTime::UNIX_EPOCH + Duration::new(secs, t.nanosecond()))
}

pub fn run(a: PrecopyArgs) -> Result<()> {
    let (vm, qmp) = super::name_path(&a.vm, "--vm")?;
    let end = match (&a.backup_at, &a.until) {
        (Some(t), _) => End::BackupAt(parse_time(t, "--backup-at")?),
        (None, Some(t)) => End::Until(parse_time(t, "--until")?),
        (None, None) => End::Never,
    };
    if !(a.every.is_finite() && a.every > 0.0 && a.every <= 86400.0) {
        return Err(Error::invalid(
            "--every: more than 0, at most 86400 seconds",
        ));
    }
    let opts = Options {
        vm,
        qmp,
        agent: a.agent,
        state_dir: a.state,
        chunk_size: validate_chunk_size(parse_size(&a.chunk_size)?)?,
        every: Duration::from_secs_f64(a.every),
        end,
        max_rate: a.max_rate.map(|r| r * 1e6),
        checkpoint: Duration::from_secs(2),
        load_limit: a
            .load_limit
            .as_deref()
            .map(crate::precopy::LoadLimit::parse)
            .transpose()?,
        hook: None,
    };
    let repo = Repository::open(&a.repo)?;
    let ctl = Arc::new(Control::default());
    stop_on_signals(&ctl)?;
    let watcher = {
        let ctl = ctl.clone();
        std::thread::spawn(move || print_rounds(&ctl))
    };
    let r = crate::precopy::run(&repo, &opts, &ctl);
    ctl.stop();
    let _ = watcher.join();
    let report = r?;
    if a.json {
        say!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print_report(&report);
    }
    Ok(())
}

/// SIGINT and SIGTERM go to one thread that stops the job (blocked in
/// every other thread, which inherit this one's mask).
fn stop_on_signals(ctl: &Arc<Control>) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| Error::io("block signals", e.into()))?;
    let ctl = ctl.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            // The stop before the line, which a paused terminal blocks.
            ctl.stop();
            tell!("{sig}: stopping at the next checkpoint");
        }
    });
    Ok(())
}

/// One line per round as the job goes (stderr).
fn print_rounds(ctl: &Control) {
    let mut seen = 0;
    let mut warned = 0;
    let mut gate = String::new();
    loop {
        let s = ctl.status();
        if matches!(s.state.as_str(), "copying" | "throttled" | "halted") && s.state != gate {
            let load = s
                .load
                .map(|l| {
                    let tail = match (l.slow_pct, l.pace_mb_s) {
                        (Some(s), Some(p)) => format!(", {s:.1}% slow, pace {p:.0} MB/s"),
                        _ => String::new(),
                    };
                    format!(
                        " (latency {:.1} ms, queue {:.2}{tail})",
                        l.latency_ms, l.queue_depth
                    )
                })
                .unwrap_or_default();
            tell!("{}{load} {}", s.state, s.why);
            gate = s.state.clone();
        }
        for w in s.warnings.iter().skip(warned) {
            tell!("warning: {w}");
        }
        warned = s.warnings.len();
        if s.rounds > seen {
            seen = s.rounds;
            if let Some(r) = &s.last_round {
                tell!(
                    "round {}: {} chunks marked, {} read ({}), {} zero, {} already recorded, {:.1} s ({:.1} s held back)",
                    r.round,
                    r.dirty_chunks,
                    r.chunks_read,
                    human_bytes(r.bytes_read),
                    r.zero_chunks,
                    r.already_recorded,
                    r.ms / 1000.0,
                    r.held_ms / 1000.0
                );
            }
        }
        if ctl.stopping() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_report(r: &Report) {
    tell!("VM {}: {} (cycle {})", r.vm, r.start, r.cycle);
    let read: u64 = r.rounds.iter().map(|x| x.chunks_read).sum();
    tell!("{} rounds, {read} chunks pre-copied", r.rounds.len());
    let Some(f) = &r.final_backup else {
        tell!("no backup taken; the next run resumes");
        return;
    };
    if let Some(why) = &f.fallback {
        tell!("warning: the pre-copied chunks were not used: {why}");
    }
    let plain = f
        .since_backup_chunks
        .map(|n| format!(" (a plain incremental: {n})"))
        .unwrap_or_default();
    tell!(
        "backup {} ({}): the final step read {} chunks{plain}, paused {:.1} ms",
        f.backup.as_deref().unwrap_or("?"),
        f.mode,
        f.chunks_read,
        f.vm.paused_ms.unwrap_or(0.0)
    );
    say!("{}", f.backup.as_deref().unwrap_or(""));
}

/// `status`: the daemon's pre-copy jobs (`GET /precopy`).
pub fn print_jobs(r: &serde_json::Value, json: bool) {
    let jobs = r["jobs"].as_array().cloned().unwrap_or_default();
    if json {
        if !jobs.is_empty() {
            println!("{}", serde_json::to_string_pretty(r).expect("json"));
        }
        return;
    }
    for j in jobs {
        let load = match j["load"].as_object() {
            Some(l) => format!(
                ", guest latency {:.2} ms, queue {:.2}{}",
                l["latency_ms"].as_f64().unwrap_or(0.0),
                l["queue_depth"].as_f64().unwrap_or(0.0),
                match (l["slow_pct"].as_f64(), l["pace_mb_s"].as_f64()) {
                    (Some(s), Some(p)) => format!(", {s:.1}% of requests slow, pace {p:.0} MB/s"),
                    _ => String::new(),
                }
            ),
            None => String::new(),
        };
        let why = j["why"].as_str().filter(|w| !w.is_empty());
        println!(
            "pre-copy of VM {}: {}{}, {} rounds{load}",
            j["vm"].as_str().unwrap_or("?"),
            j["state"].as_str().unwrap_or("?"),
            why.map(|w| format!(" ({w})")).unwrap_or_default(),
            j["rounds"]
        );
        if let Some(e) = j["error"].as_str() {
            println!("  error: {e}");
        }
        if let Some(r) = j["restarted"].as_str() {
            println!("  {r}");
        }
        if let Some(b) = j["report"]["final"]["backup"].as_str() {
            println!("  backup {b} taken");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_too_far_ahead_are_one_line_errors_and_the_last_rfc3339_year_is_exact() {
        for s in ["+1e20", "+1e12", "+inf", "+-1"] {
            let e = parse_time(s, "--backup-at").err().unwrap();
            assert!(e.to_string().contains("expected +SECONDS"), "{s}: {e}");
        }
        let t = parse_time("9999-12-31T23:59:59.5Z", "--until").unwrap();
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(d, Duration::new(253_402_300_799, 500_000_000));
    }
}
