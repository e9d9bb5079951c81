//! Human and JSON output of the CLI commands.

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};
use crate::repo::Repository;
use crate::util::human_bytes;

/// Of `vms`, those with a disk or file backup `id`; none is an error.
fn vms_with_backup(repo: &Repository, vms: Vec<String>, id: &str) -> Result<Vec<String>> {
    let mut with = vec![];
    for v in vms {
        if repo.backup_ids(&v)?.iter().any(|b| b == id)
            || repo.catalog_ids(&v)?.iter().any(|b| b == id)
        {
            with.push(v);
        }
    }
    if with.is_empty() {
        return Err(Error::not_found(format!(
            "unknown backup {id:?}: no VM in {} has it",
            repo.location()
        )));
    }
    Ok(with)
}

pub fn verify(repo: &Repository, vm: Option<&str>, backup: Option<&str>) -> Result<()> {
    let vms = match vm {
        Some(v) => {
            crate::util::validate_name("VM name", v)?;
            if repo.backup_ids(v)?.is_empty() && repo.catalog_ids(v)?.is_empty() {
                return Err(Error::not_found(format!(
                    "unknown VM {v:?}: no backups in {}",
                    repo.location()
                )));
            }
            vec![v.to_string()]
        }
        None => {
            let mut all = repo.vms()?;
            all.extend(repo.catalog_vms()?);
            all.sort();
            all.dedup();
            match backup {
                // `--backup ID` alone: the VMs that have it (ids are times,
                // so two VMs may), not every VM ("unknown backup of VM x").
                Some(id) => vms_with_backup(repo, all, id)?,
                None => all,
            }
        }
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    let r = crate::repo::verify::verify(repo, &vms, backup, threads)?;
    for line in &r.damaged {
        println!("{line}");
    }
    if r.damaged.is_empty() {
        println!(
            "ok: {} chunks of {} backup(s) verified ({})",
            r.chunks,
            r.backups,
            mode(repo)
        );
        Ok(())
    } else {
        Err(Error::corrupt(format!(
            "{} damaged object(s) in {}",
            r.damaged.len(),
            repo.location()
        )))
    }
}

/// Which mode a repository uses, for `verify`.
fn mode(repo: &Repository) -> String {
    match repo.encryption() {
        Some(e) => format!(
            "encrypted repository: {} chunks, keyed BLAKE3 ids and MACs, key {}",
            e.aead, e.fingerprint
        ),
        None => "unencrypted repository: BLAKE3 ids and checksums".into(),
    }
}

pub fn recovered(r: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("json"));
        return;
    }
    let vm = r["vm"].as_str().unwrap_or("?");
    let backup = r["backup"].as_str().unwrap_or("?");
    let how = if r["already_active"].as_bool() == Some(true) {
        "already recovering"
    } else if r["resumed"].as_bool() == Some(true) {
        "resumed staging of"
    } else {
        "recovering"
    };
    eprintln!("{how} VM {vm} from backup {backup}");
    for b in r["skipped"].as_array().cloned().unwrap_or_default() {
        eprintln!(
            "note: kept staging of VM {vm} from backup {} was not resumed: that backup is gone from the repository (the staging stays on disk; `release --discard {vm}` removes it)",
            b.as_str().unwrap_or("?")
        );
    }
    // One line per disk path (scripts read these), then its NFS and NBD
    // URLs, indented.
    if let Some(disks) = r["disks"].as_array() {
        for (i, d) in disks.iter().enumerate() {
            println!("{}", d.as_str().unwrap_or("?"));
            for u in r["urls"][i].as_array().cloned().unwrap_or_default() {
                println!("    {}", u.as_str().unwrap_or("?"));
            }
        }
    }
}

/// Where a recovery was placed; with `explain`, every export point's
/// figures and the rule (on stderr: stdout carries the disk paths).
pub fn placement(r: &Value, explain: bool) {
    let vm = r["vm"].as_str().unwrap_or("?");
    let point = r["export_point"].as_str().unwrap_or("?");
    let p = &r["placement"];
    if p.is_null() {
        eprintln!("VM {vm} is served at export point {point}");
        return;
    }
    let rule = p["rule"].as_str().unwrap_or("?");
    eprintln!("VM {vm} placed at export point {point} (rule: {rule})");
    if let Some(note) = p["note"].as_str() {
        eprintln!("  {note}");
    }
    if !explain {
        return;
    }
    eprintln!(
        "  host {} uses {} of {} connection(s)",
        p["host"].as_str().unwrap_or("(none given)"),
        p["host_connections"],
        p["max_connections_per_host"]
    );
    eprintln!(
        "  {:<12} {:>8} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7}",
        "point",
        "eligible",
        "connected",
        "predict_ms",
        "service",
        "queue_ms",
        "future",
        "async",
        "repo_ms",
        "async%"
    );
    for c in p["candidates"].as_array().cloned().unwrap_or_default() {
        let f = &c["figures"];
        let pr = &c["prediction"];
        let n = |v: &Value| v.as_f64().unwrap_or(0.0);
        eprintln!(
            "  {:<12} {:>8} {:>9} {:>10.3} {:>9.3} {:>9.3} {:>8.3} {:>8.3} {:>9.3} {:>6.1}%{}",
            f["name"].as_str().unwrap_or("?"),
            c["eligible"].as_bool().unwrap_or(false),
            f["host_connected"].as_bool().unwrap_or(false),
            n(&pr["latency_ms"]),
            n(&pr["service_ms"]),
            n(&pr["queue_ms"]),
            n(&pr["future_ms"]),
            n(&pr["async_ms"]),
            n(&pr["repository_ms"]),
            n(&f["queue"]["async_share"]) * 100.0,
            if f["name"] == r["export_point"] {
                "  <- chosen"
            } else {
                ""
            }
        );
        if let Some(why) = f["unavailable"].as_str() {
            eprintln!("  {:<12} unavailable: {why}", "");
        }
    }
}

/// `export-points`.
pub fn export_points(r: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("json"));
        return;
    }
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    for p in r["export_points"].as_array().cloned().unwrap_or_default() {
        let q = &p["queue"];
        println!(
            "{}  listen {}  predicted {:.3} ms",
            p["name"].as_str().unwrap_or("?"),
            p["listen"].as_str().unwrap_or("--nfs/--nbd"),
            n(&p["predicted"]["latency_ms"])
        );
        let names = |v: &Value| -> Vec<String> {
            v.as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|s| s.as_str().unwrap_or("?").to_string())
                .collect()
        };
        println!("  staging: {}", p["staging"].as_str().unwrap_or("?"));
        println!("  sessions: {}", names(&p["sessions"]).join(", "));
        let hosts: Vec<String> = p["hosts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|h| {
                format!(
                    "{} ({} conn)",
                    h["host"].as_str().unwrap_or("?"),
                    h["connections"]
                )
            })
            .collect();
        println!("  hosts: {}", hosts.join(", "));
        println!(
            "  queue: {} queued ({} B), {} in flight ({} B) of {}, drain {:.1} MB/s, service {:.3} ms, async share {:.1}%",
            q["queued_requests"],
            q["queued_bytes"],
            q["inflight_requests"],
            q["inflight_bytes"],
            q["max_inflight"],
            n(&q["drain_bytes_per_s"]) / 1e6,
            n(&q["service_ms"]),
            n(&q["async_share"]) * 100.0
        );
        for rl in p["relocations"].as_array().cloned().unwrap_or_default() {
            println!(
                "  relocation of {}: {} {:.1}% ({} B to go)",
                rl["vm"].as_str().unwrap_or("?"),
                rl["state"].as_str().unwrap_or("?"),
                n(&rl["progress"]) * 100.0,
                rl["bytes_remaining"]
            );
        }
        for u in names(&p["urls"]) {
            println!("  {u}");
        }
    }
}

pub fn released(r: &Value) {
    let vm = r["vm"].as_str().unwrap_or("?");
    let discarded = r["discarded"]
        .as_array()
        .map(|a| !a.is_empty())
        .unwrap_or(false);
    match (r["released"].as_bool() == Some(true), discarded) {
        (true, true) => println!("released VM {vm}; staging discarded"),
        (true, false) => println!("released VM {vm}; staging kept for a later recover"),
        _ => println!("discarded kept staging of VM {vm}"),
    }
}

/// `backup --session`: per-disk lines and a summary on stderr, the new
/// backup's id as the last line on stdout (like `backup`).
pub fn session_backup(r: &Value) {
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    for d in r["disks"].as_array().cloned().unwrap_or_default() {
        eprintln!(
            "{}: {} blocks changed, {} taken as uploaded, {} read ({}; {} copied aside while the guest wrote): {} new ({} stored), {} reused, {} zero",
            d["name"].as_str().unwrap_or("?"),
            n(&d, "blocks_frozen"),
            n(&d, "blocks_uploaded"),
            n(&d, "blocks_read"),
            human_bytes(n(&d, "bytes_read")),
            n(&d, "cow_blocks"),
            n(&d, "new_chunks"),
            human_bytes(n(&d, "new_bytes")),
            n(&d, "reused_chunks"),
            n(&d, "zero_chunks"),
        );
    }
    let fetched = n(r, "fetched_bytes");
    eprintln!(
        "backup {} of VM {} (base {}): paused guest writes {:.1} ms, read {} from staging, {}; {} new bytes in {:.1} s",
        r["backup"].as_str().unwrap_or("?"),
        r["vm"].as_str().unwrap_or("?"),
        r["base"].as_str().unwrap_or("?"),
        r["pause_ms"].as_f64().unwrap_or(0.0),
        human_bytes(n(r, "read_bytes")),
        if fetched == 0 {
            "fetched nothing".to_string()
        } else {
            format!("fetched {}", human_bytes(fetched))
        },
        n(r, "new_bytes"),
        r["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
    );
    println!("{}", r["backup"].as_str().unwrap_or("?"));
}

/// `backup-vms`: per VM a line on stderr (or the whole summary as JSON on
/// stdout); `NAME BACKUP_ID` on stdout for each VM backed up.
pub fn backup_vms(s: &crate::vmbackup::Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).expect("json"));
        return;
    }
    eprintln!(
        "snapshot {} (run {}), {} VM(s), {} at a time",
        s.snapshot_time.as_deref().unwrap_or("not taken"),
        s.run_id,
        s.vms.len(),
        s.jobs
    );
    for v in &s.vms {
        let order = v
            .order
            .map(|o| format!("#{o}"))
            .unwrap_or_else(|| "-".into());
        let paused = v
            .paused_ms
            .map(|p| format!("paused {p:.1} ms"))
            .unwrap_or_else(|| "not paused".into());
        let rate = v.bytes_read as f64 / (v.read_ms / 1000.0).max(1e-3);
        let mode = match &v.base {
            Some(b) => format!("{} since {b}", v.mode),
            None => v.mode.clone(),
        };
        let what = match (&v.backup, &v.error) {
            (Some(id), _) => format!("backup {id} ({mode}, {} chunks read)", v.chunks_read),
            (None, Some(e)) => format!("FAILED: {e}"),
            (None, None) => "not backed up".into(),
        };
        eprintln!(
            "{order} VM {} ({}/s written): {what}; {paused}; read {} in {:.1} s ({}/s), {} new, {} copied before write; {}",
            v.vm,
            human_bytes(v.write_rate as u64),
            human_bytes(v.bytes_read),
            v.read_ms / 1000.0,
            human_bytes(rate as u64),
            human_bytes(v.new_bytes),
            human_bytes(v.cbw_bytes),
            v.consistency,
        );
        for w in &v.warnings {
            eprintln!("  warning: {w}");
        }
    }
    for v in &s.vms {
        if let Some(id) = &v.backup {
            println!("{} {id}", v.vm);
        }
    }
}

pub fn status(r: &Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("json"));
        return Ok(());
    }
    let sessions = r["sessions"].as_array().cloned().unwrap_or_default();
    for st in r["staging"].as_array().cloned().unwrap_or_default() {
        println!("{}", staging_line(&st));
    }
    if sessions.is_empty() {
        println!("no recovery sessions");
    }
    for s in sessions {
        println!(
            "VM {}  backup {}{}  {}  open handles {}",
            s["vm"].as_str().unwrap_or("?"),
            s["backup"].as_str().unwrap_or("?"),
            if s["resumed"].as_bool() == Some(true) {
                " (resumed)"
            } else {
                ""
            },
            s["path"].as_str().unwrap_or("?"),
            s["open_handles"]
        );
        if let Some(b) = s["backup_base"]
            .as_str()
            .filter(|b| Some(*b) != s["backup"].as_str())
        {
            println!("  last live backup {b}: dirty blocks are relative to it");
        }
        if let Some(w) = s["backup_gone"].as_str() {
            println!("  WARNING: {w}");
        }
        if let Some(w) = s["repo_unreachable"].as_str() {
            println!("  repository unreachable: {w}");
        }
        let r = &s["relocation"];
        if r.is_object() {
            println!(
                "  relocation to {}: {}",
                r["target"].as_str().unwrap_or("?"),
                relocation_line(r)
            );
        }
        let u = &s["upload"];
        if u.is_object() {
            let n = |k: &str| u[k].as_u64().unwrap_or(0);
            let why = u["why"].as_str().filter(|w| !w.is_empty());
            println!(
                "  uploader: {}{}, {} blocks uploaded, residue {} blocks",
                u["state"].as_str().unwrap_or("?"),
                why.map(|w| format!(" ({w})")).unwrap_or_default(),
                n("blocks_uploaded"),
                n("residue"),
            );
        }
        if s["repo_retries"].as_u64().unwrap_or(0) > 0 {
            println!("  repository retries: {}", s["repo_retries"]);
        }
        for d in s["disks"].as_array().cloned().unwrap_or_default() {
            println!("  {}", profile_line(&d));
            let n = |k: &str| d[k].as_u64().unwrap_or(0);
            let f = |k: &str| d[k].as_f64().unwrap_or(0.0);
            let total = n("blocks_total").max(1);
            let reads = n("reads");
            let hit = f("profile_hit_ratio") * 100.0;
            println!(
                "  {:<6} {:>10}  staged {}/{} blocks ({:.1}%)  changed {} (dirty {})  fetched {}  reads {} ({:.1}% local)  writes {}  fetch mean {:.2} ms p99 {:.2} ms{}{}",
                d["name"].as_str().unwrap_or("?"),
                human_bytes(n("size")),
                n("blocks_staged"),
                n("blocks_total"),
                n("blocks_staged") as f64 * 100.0 / total as f64,
                n("blocks_changed"),
                n("blocks_dirty"),
                human_bytes(n("fetched_bytes")),
                reads,
                hit,
                n("writes"),
                f("fetch_latency_mean_ms"),
                f("fetch_latency_p99_ms"),
                if n("fetch_errors") > 0 { format!("  FETCH ERRORS {}", n("fetch_errors")) } else { String::new() },
                if n("staging_write_errors") > 0 { format!("  STAGING WRITE ERRORS {}", n("staging_write_errors")) } else { String::new() }
            );
            if let Some(e) = d["failed"].as_str() {
                println!(
                    "  {:<6} FAILED: {e}; flushes and writes get EIO until the session is released",
                    d["name"].as_str().unwrap_or("?")
                );
            }
            if d["passthrough"].as_bool() == Some(true) {
                println!(
                    "  {:<6} open read-only with FUSE passthrough: writable FUSE opens get EBUSY until it is closed",
                    d["name"].as_str().unwrap_or("?")
                );
            }
        }
        println!("  {}", scheduler_line(&s["scheduler"]));
    }
    Ok(())
}

/// One staging directory's use, limit, evictions and pressure.
fn staging_line(st: &Value) -> String {
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    let limit = match st["limit"].as_u64() {
        Some(l) => format!(
            "of {} limit ({:.0}% pressure)",
            human_bytes(l),
            st["pressure"].as_f64().unwrap_or(0.0) * 100.0
        ),
        None => "(no limit)".into(),
    };
    let mut line = format!(
        "staging {}: {} used {limit}  kept sessions {}  evicted {} blocks ({})",
        st["root"].as_str().unwrap_or("?"),
        human_bytes(n("used")),
        human_bytes(n("kept")),
        n("evicted_blocks"),
        human_bytes(n("evicted_bytes")),
    );
    if n("refused_fills") > 0 {
        line += &format!("  FULL: {} fills refused", n("refused_fills"));
    }
    line
}

pub fn relocation_line(r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    if r["state"] == "not-resumed" {
        // Not copying: what was done, why it stopped, what to do.
        return format!(
            "NOT RESUMED after a daemon restart, served from staging; {}/{} ({:.1}%) copied, \
             pass {}: {}; {}",
            human_bytes(n("bytes_done")),
            human_bytes(n("bytes_total")),
            n("bytes_done") as f64 * 100.0 / n("bytes_total").max(1) as f64,
            n("pass"),
            r["error"].as_str().unwrap_or("?"),
            r["note"].as_str().unwrap_or("?"),
        );
    }
    let mut line = format!(
        "{} pass {}  {}/{} ({:.1}%)  {:.1} MB/s  dirty blocks {}",
        r["state"].as_str().unwrap_or("?"),
        n("pass"),
        human_bytes(n("bytes_done")),
        human_bytes(n("bytes_total")),
        n("bytes_done") as f64 * 100.0 / n("bytes_total").max(1) as f64,
        r["rate_mbps"].as_f64().unwrap_or(0.0),
        n("dirty_blocks"),
    );
    if let Some(eta) = r["eta_s"].as_f64() {
        line += &format!("  ETA {eta:.0} s");
    }
    if let Some(p) = r["cutover_pause_ms"].as_f64() {
        line += &format!("  cutover pause {p:.1} ms");
    }
    if let Some(t) = r["note"].as_str() {
        line += &format!("  ({t})");
    }
    // Also on a `done` relocation whose commit was not made durable.
    if let Some(t) = r["error"].as_str() {
        line += &format!("  ERROR: {t}");
    }
    line
}

/// One line for a cancelled relocation (`POST .../relocate/cancel`).
pub fn cancelled_line(vm: &str, r: &Value, keep_target: bool) -> String {
    let paths = |k: &str| -> Vec<String> {
        (r[k].as_array().into_iter().flatten())
            .filter_map(|p| p.as_str().map(String::from))
            .collect()
    };
    let mut line = format!(
        "cancelled the relocation of VM {vm} to {}",
        r["target"].as_str().unwrap_or("?")
    );
    let (removed, kept) = (paths("removed"), paths("kept"));
    if !removed.is_empty() {
        line += &format!("; removed {}", removed.join(", "));
    }
    if !kept.is_empty() {
        let why = match keep_target {
            true => "as asked",
            false => "they were there before it",
        };
        line += &format!("; kept {} ({why})", kept.join(", "));
    }
    line
}

/// Follows a relocation until `wait_verdict` ends the wait: Ok only at a
/// clean cutover; a failure, a failed disk or a pause is an Err.
pub fn wait_relocation(
    c: &crate::api::client::Client,
    vm: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    wait_relocation_with(|| c.get(&format!("/sessions/{vm}")), vm, stop)
}

/// `wait_relocation` over `get` (the session's status). `stop` (a signal)
/// ends only the waiting: the relocation goes on in the daemon, and the
/// error says so and how to follow, pause or cancel it.
fn wait_relocation_with(
    mut get: impl FnMut() -> Result<Value>,
    vm: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg}")
                .expect("template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(60);
    let mut warned = false;
    loop {
        let s = get()?;
        let r = &s["relocation"];
        let state = r["state"].as_str().unwrap_or("");
        bar.set_length(r["bytes_total"].as_u64().unwrap_or(0));
        bar.set_position(r["bytes_done"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{:.1} MB/s pass {} ETA {}",
            r["rate_mbps"].as_f64().unwrap_or(0.0),
            r["pass"],
            r["eta_s"]
                .as_f64()
                .map(|e| format!("{e:.0}s"))
                .unwrap_or_else(|| "-".into())
        ));
        if !tty && last.elapsed() >= std::time::Duration::from_secs(5) {
            eprintln!("{}", relocation_line(r));
            last = std::time::Instant::now();
        }
        if let Some(verdict) = wait_verdict(vm, &s) {
            bar.finish_and_clear();
            println!("{}", verdict?);
            return Ok(());
        }
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            bar.finish_and_clear();
            return Err(Error::interrupted(format!(
                "{}: stopped waiting; the relocation of VM {vm} to {} goes on in the daemon \
                 ({}): follow it again with `recoverfs relocate {vm} --resume --wait` (or \
                 `recoverfs status`), pause it with `recoverfs relocate {vm} --pause`, or \
                 cancel it with `recoverfs relocate {vm} --cancel`",
                super::stopped_by(),
                r["target"].as_str().unwrap_or("?"),
                relocation_line(r)
            )));
        }
        if state == "not-converging" && !warned {
            warned = true;
            bar.suspend(|| {
                eprintln!(
                    "warning: {}",
                    r["note"].as_str().unwrap_or("relocation is not converging")
                )
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// What `relocate --wait` makes of a session's status: `None` while the
/// relocation goes on, else the line to print on success or the one-line
/// error that ends the wait (a non-zero exit). Success is a cutover with no
/// error and no failed disk: a cutover whose commit could not be made
/// durable is `done` with an error, and its disks refuse writes. A paused
/// relocation ends the wait too, as an error: it is not relocated, and
/// nothing would resume it while the command polls.
pub(crate) fn wait_verdict(vm: &str, s: &Value) -> Option<Result<String>> {
    let r = &s["relocation"];
    if r.is_null() {
        // Gone (or never reopened by a restarted daemon): nothing to wait for.
        return Some(Err(Error::new(
            ErrorKind::NotFound,
            format!("VM {vm} has no relocation (none was started, or it was cancelled)"),
        )));
    }
    let state = r["state"].as_str().unwrap_or("");
    if state == "not-resumed" {
        return Some(Err(Error::busy(format!(
            "relocation of VM {vm} to {}: {}",
            r["target"].as_str().unwrap_or("?"),
            relocation_line(r)
        ))));
    }
    if let (Some(e), "done" | "failed") = (r["error"].as_str(), state) {
        let how = if state == "done" {
            "cut over but failed"
        } else {
            "failed"
        };
        return Some(Err(Error::new(
            ErrorKind::Io,
            format!("relocation of VM {vm} {how}: {e}"),
        )));
    }
    if state == "failed" {
        return Some(Err(Error::new(
            ErrorKind::Io,
            format!("relocation of VM {vm} failed: unknown error"),
        )));
    }
    let failed = s["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| Some((d["name"].as_str().unwrap_or("?"), d["failed"].as_str()?)));
    if let Some((disk, e)) = failed {
        return Some(Err(Error::new(
            ErrorKind::Io,
            format!(
                "relocation of VM {vm} ({state}): {disk} FAILED: {e}; flushes and writes get EIO until the session is released"
            ),
        )));
    }
    match state {
        "done" => Some(Ok(format!("relocated VM {vm}: {}", relocation_line(r)))),
        "paused" => Some(Err(Error::busy(format!(
            "relocation of VM {vm} is paused, not relocated ({}); `recoverfs relocate {vm} --resume --wait` continues it",
            relocation_line(r)
        )))),
        _ => None,
    }
}

/// Profile coverage and first-read hits of one disk.
fn profile_line(d: &Value) -> String {
    let p = &d["profile"];
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    let first = n("first_reads");
    let staged_first = if first == 0 {
        String::new()
    } else {
        format!(
            "; {}/{first} first reads found the block staged",
            n("first_read_hits")
        )
    };
    match p["source"].as_str() {
        Some(src) => format!(
            "{}: {src} profile {}/{} blocks staged ({:.1}%){staged_first}",
            d["name"].as_str().unwrap_or("?"),
            n("staged"),
            n("blocks"),
            d["profile_coverage"].as_f64().unwrap_or(0.0) * 100.0
        ),
        None => format!(
            "{}: no profile{staged_first}",
            d["name"].as_str().unwrap_or("?")
        ),
    }
}

/// The daemon-wide fetch queue per priority class.
fn scheduler_line(s: &Value) -> String {
    let q = &s["queued"];
    let n = |k: &str| q[k].as_u64().unwrap_or(0);
    format!(
        "fetch queue: on-demand {} profile {} relocation {} readahead {}  background limit {}/{} in flight  on-demand latency mean {:.2} ms p99 {:.2} ms",
        n("on_demand"),
        n("profile"),
        n("relocation"),
        n("readahead"),
        s["background_limit"],
        s["max_in_flight"],
        s["on_demand_latency_mean_ms"].as_f64().unwrap_or(0.0),
        s["on_demand_latency_p99_ms"].as_f64().unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A session's status as `GET /sessions/{vm}` returns it, trimmed to
    /// what `--wait` reads.
    fn session(relocation: Value, disk_failed: Option<&str>) -> Value {
        json!({
            "relocation": relocation,
            "disks": [
                {"name": "disk0", "failed": null},
                {"name": "disk1", "failed": disk_failed},
            ],
        })
    }

    fn relocation(state: &str, error: Option<&str>) -> Value {
        json!({
            "state": state, "pass": 2, "bytes_done": 1 << 20, "bytes_total": 4 << 20,
            "rate_mbps": 50.0, "dirty_blocks": 3, "error": error, "note": null,
        })
    }

    #[test]
    fn a_relocation_line_shows_the_error_of_a_done_relocation() {
        let line = relocation_line(&relocation("done", Some("not durable")));
        assert!(
            line.starts_with("done") && line.ends_with("ERROR: not durable"),
            "{line}"
        );
    }

    #[test]
    fn a_signal_ends_the_wait_saying_the_relocation_goes_on_and_how_to_follow_pause_or_cancel_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = AtomicBool::new(false);
        let mut polls = 0;
        let e = wait_relocation_with(
            || {
                polls += 1;
                assert!(polls < 5, "the wait went on after the signal");
                // The signal comes while the relocation copies.
                stop.store(polls == 2, Ordering::SeqCst);
                Ok(session(relocation("copying", None), None))
            },
            "vm",
            &stop,
        )
        .expect_err("a wait cut short is not a relocation");
        assert_eq!((e.kind(), polls), (ErrorKind::Interrupted, 2));
        let e = e.to_string();
        for want in [
            "goes on in the daemon",
            "(copying",
            "recoverfs relocate vm --resume --wait",
            "recoverfs relocate vm --pause",
            "recoverfs relocate vm --cancel",
        ] {
            assert!(e.contains(want), "{want:?} not in: {e}");
        }
        // A relocation that has ended says how it ended, signal or not.
        stop.store(true, Ordering::SeqCst);
        let done =
            wait_relocation_with(|| Ok(session(relocation("done", None), None)), "vm", &stop);
        assert!(done.is_ok(), "{done:?}");
    }

    #[test]
    fn wait_goes_on_while_the_relocation_copies_or_switches() {
        for state in ["copying", "converging", "not-converging", "switching"] {
            assert!(
                wait_verdict("vm", &session(relocation(state, None), None)).is_none(),
                "{state}"
            );
        }
    }

    #[test]
    fn wait_succeeds_at_a_clean_cutover() {
        let line = wait_verdict("vm", &session(relocation("done", None), None))
            .unwrap()
            .unwrap();
        assert!(line.starts_with("relocated VM vm"), "{line}");
    }

    #[test]
    fn wait_fails_naming_the_error_of_a_relocation_that_failed_while_copying() {
        let e = wait_verdict(
            "vm",
            &session(
                relocation(
                    "failed",
                    Some("write relocation target disk1: Input/output error"),
                ),
                None,
            ),
        )
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("failed") && e.contains("disk1: Input/output error"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wait_fails_when_the_cutover_committed_but_was_not_made_durable() {
        let not_durable = "cutover: the cutover of VM vm committed but could not be made durable";
        let e = wait_verdict("vm", &session(relocation("done", Some(not_durable)), None))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("could not be made durable"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wait_fails_when_a_disk_of_the_session_has_failed() {
        let e = wait_verdict(
            "vm",
            &session(relocation("done", None), Some("staging sync failed: EIO")),
        )
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("disk1") && e.contains("staging sync failed"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wait_returns_non_zero_with_how_to_resume_when_the_relocation_is_paused() {
        let e = wait_verdict("vm", &session(relocation("paused", None), None))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("paused") && e.contains("--resume"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn a_relocation_not_resumed_is_shown_with_its_reason_and_ends_a_wait_non_zero() {
        let mut r = relocation(
            "not-resumed",
            Some("open relocation target /p/vm: No such file or directory"),
        );
        r["note"] = json!("run `recoverfs relocate vm --resume` once the target is reachable");
        let line = relocation_line(&r);
        assert!(
            line.starts_with("NOT RESUMED")
                && line.contains("1.0 MiB/4.0 MiB")
                && line.contains("No such file")
                && line.contains("--resume"),
            "{line}"
        );
        let e = wait_verdict("vm", &session(r, None))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("NOT RESUMED") && e.contains("--resume"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wait_fails_when_the_session_has_no_relocation() {
        let e = wait_verdict("vm", &session(Value::Null, None))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no relocation"), "{e}");
    }
}
