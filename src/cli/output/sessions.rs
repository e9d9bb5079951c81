//! Recovery sessions: a recovery started (`recover`), one released
//! (`release`), and `status`: every session with its disks, relocation,
//! uploader and the daemon's staging directories and fetch queue.

use serde_json::Value;

use super::relocation::relocation_line;
use crate::error::Result;
use crate::util::human_bytes;

pub(crate) fn recovered(r: &Value, json: bool) {
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
            "note: kept staging of VM {vm} from backup {b} was not resumed: that backup is gone from the repository (the staging stays on disk; `release {vm} --discard --backup {b}` removes it)",
            b = b.as_str().unwrap_or("?")
        );
    }
    for w in r["warnings"].as_array().cloned().unwrap_or_default() {
        eprintln!("warning: {}", w.as_str().unwrap_or("?"));
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

pub(crate) fn released(r: &Value) {
    let vm = r["vm"].as_str().unwrap_or("?");
    let discarded = r["discarded"]
        .as_array()
        .map(|a| !a.is_empty())
        .unwrap_or(false);
    match (r["released"].as_bool() == Some(true), discarded) {
        (true, true) => println!("released VM {vm}; staging discarded"),
        (true, false) => {
            println!("released VM {vm}; staging kept for a later recover");
            if r["pin_owed"].as_bool() == Some(true) {
                let b = r["backup"].as_str().unwrap_or("?");
                eprintln!(
                    "warning: the repository did not take the kept staging's pin (full or read-only? see the daemon's log): until the daemon writes it (it tries every 10 s while it runs), `forget` does not see backup {b} as in use, and a `gc` after it would take blocks this staging still reads from the repository"
                );
            }
        }
        _ => {
            let ids: Vec<&str> = (r["discarded"].as_array().into_iter().flatten())
                .filter_map(|b| b.as_str())
                .collect();
            println!(
                "discarded kept staging of VM {vm} (backup {})",
                ids.join(", ")
            )
        }
    }
    if let Some(line) = released_relocation(vm, &r["relocation"]) {
        println!("{line}");
    }
}

/// What became of a released session's relocation (explore10 L3: the
/// copy stopped, or its files were removed, and only the log said so).
fn released_relocation(vm: &str, r: &Value) -> Option<String> {
    let target = r["target"].as_str()?;
    let state = r["state"].as_str().unwrap_or("?");
    let paths = |k: &str| {
        let v: Vec<&str> = (r[k].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        match v.is_empty() {
            true => "nothing".to_string(),
            false => v.join(", "),
        }
    };
    let done = r["bytes_done"].as_u64().unwrap_or(0) as f64;
    let total = r["bytes_total"].as_u64().unwrap_or(0).max(1) as f64;
    let copied = format!("{:.1}% copied", done * 100.0 / total);
    Some(match r["outcome"].as_str().unwrap_or("?") {
        "cancelled" => format!(
            "its relocation to {target} was cancelled: removed {}; kept {}",
            paths("removed"),
            paths("kept")
        ),
        "cut-over" => format!(
            "its relocation to {target} had cut over: the VM's disks are the files there (kept)"
        ),
        "cancel-unfinished" => format!(
            "its relocation to {target} has an unfinished cancel: `recoverfs recover {vm}` then `recoverfs relocate {vm} --cancel` finishes it"
        ),
        "cancel-not-recorded" => format!(
            "its relocation to {target} ({copied}) was NOT cancelled: the cancel could not be recorded, so `recoverfs recover {vm}` resumes the copy (and it may cut over; `recoverfs relocate {vm} --cancel` then cancels it), and `recoverfs release {vm} --discard` cancels it with the staging"
        ),
        _ if state == "paused" => format!(
            "its relocation to {target} ({copied}) is paused: `recoverfs recover {vm}` then `recoverfs relocate {vm} --resume` continues it"
        ),
        _ if state == "not-resumed" => format!(
            "its relocation to {target} ({copied}, not resumed after a restart) stays recorded: `recoverfs recover {vm}` tries to reopen it"
        ),
        _ => {
            let how = match state {
                "copying" | "converging" => String::new(),
                s => format!(", {s}"),
            };
            format!(
                "its relocation to {target} ({copied}{how}) is stopped: `recoverfs recover {vm}` resumes it"
            )
        }
    })
}

/// Where a session is served: its export point and each disk's URLs
/// (explore8 LOW: after a restart moved it, only the log said where).
fn served_line(s: &Value) -> String {
    let point = s["export_point"].as_str().unwrap_or("?");
    if s.get("urls").is_none() {
        // A daemon from before URLs were in its status (review26 L3).
        return format!("export point {point}");
    }
    let urls: Vec<&str> = (s["urls"].as_array().into_iter().flatten())
        .flat_map(|d| d.as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    format!(
        "export point {point}: {}",
        match urls.is_empty() {
            true => "FUSE only".to_string(),
            false => urls.join("  "),
        }
    )
}

/// The FUSE keeper's state (`keeper_watch::KeeperStatus`): a warning when
/// the mount would die with the daemon.
fn keeper_line(k: &Value) -> Option<String> {
    let state = k["state"].as_str()?;
    let since = k["since"].as_str().unwrap_or("?");
    let why = k["why"].as_str().unwrap_or("?");
    let restarts = match k["restarts"].as_u64().unwrap_or(0) {
        0 => String::new(),
        n => format!(", {n} keeper(s) started after one was lost"),
    };
    Some(match state {
        "holding" => format!(
            "FUSE keeper: holding the mount (pid {}) since {since}{restarts}",
            k["pid"].as_u64().map_or("?".into(), |p| p.to_string())
        ),
        "lost" => format!("WARNING: FUSE keeper lost since {since} ({why}){restarts}: if the daemon dies now, its FUSE mount dies with it; a new keeper is tried every 5 s"),
        "off" => format!("FUSE keeper: off ({why})"),
        other => format!("FUSE keeper: {other} since {since}{restarts}"),
    })
}

pub(crate) fn status(r: &Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("json"));
        return Ok(());
    }
    let sessions = r["sessions"].as_array().cloned().unwrap_or_default();
    if let Some(why) = r["repository_unreachable"].as_str() {
        println!(
            "WARNING: repository unreachable since the daemon started without it ({why}): staged blocks and the guests' writes are served; blocks not staged cannot be read, and pins, profiles and backups wait, until it answers as itself"
        );
    }
    // Daemons from before it send none.
    if let Some(line) = keeper_line(&r["fuse_keeper"]) {
        println!("{line}");
    }
    for st in r["staging"].as_array().cloned().unwrap_or_default() {
        println!("{}", staging_line(&st));
    }
    // Per export point, the clients a restart stranded (daemons from
    // before it send none).
    for m in r["moved"].as_array().cloned().unwrap_or_default() {
        println!("WARNING: {}", m["warning"].as_str().unwrap_or("?"));
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
        println!("  {}", served_line(&s));
        if s["backup_running"].as_bool() == Some(true) {
            println!("  {}", live_backup_line(&s["backup_progress"]));
        }
        if let Some(b) = s["backup_base"]
            .as_str()
            .filter(|b| Some(*b) != s["backup"].as_str())
        {
            println!("  last live backup {b}: dirty blocks are relative to it");
        }
        if let Some(w) = s["backup_gone"].as_str() {
            println!("  WARNING: {w}");
        }
        if s["unpinned"].as_bool() == Some(true) {
            println!("  WARNING: its backup is not pinned in the repository (the pin could not be written; tried again at every check): until it is, a forget may remove the backup");
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
                "  {:<6} {:>10}  staged {}/{} blocks ({:.1}%)  changed {} (dirty {})  fetched {}  reads {} ({:.1}% local)  writes {}  fetch mean {:.2} ms p99 {:.2} ms{}{}{}",
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
                if n("staging_write_errors") > 0 { format!("  STAGING WRITE ERRORS {}", n("staging_write_errors")) } else { String::new() },
                if n("read_through") > 0 { format!("  READ THROUGH (staging full) {}", n("read_through")) } else { String::new() }
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
    if n("prefetches_held_back") > 0 {
        line += &format!(
            "  prefetch held back {} times at the low watermark",
            n("prefetches_held_back")
        );
    }
    if n("refused_fills") > 0 {
        line += &format!("  FULL: {} fills refused", n("refused_fills"));
    }
    line
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

/// A running live backup, with how far it is when the daemon says.
fn live_backup_line(p: &Value) -> String {
    let line = "a live backup (backup --session) is running";
    let (Some(done), Some(total), Some(secs)) = (
        p["chunks_done"].as_u64(),
        p["chunks_total"].as_u64(),
        p["seconds"].as_f64(),
    ) else {
        return line.into();
    };
    match total {
        // Not counted yet (or nothing to read): only the time.
        0 => format!("{line}: {secs:.0} s"),
        _ => format!("{line}: {done} of {total} changed chunks stored, {secs:.0} s"),
    }
}

#[cfg(test)]
mod served_tests {
    use super::{live_backup_line, released_relocation, served_line};
    use serde_json::json;

    #[test]
    fn a_release_says_what_became_of_the_relocation() {
        let stopped = json!({"target": "/prim/d64", "state": "copying", "outcome": "stopped",
            "bytes_done": 42, "bytes_total": 100});
        assert_eq!(
            released_relocation("d64", &stopped).unwrap(),
            "its relocation to /prim/d64 (42.0% copied) is stopped: `recoverfs recover d64` resumes it"
        );
        let paused = json!({"target": "/prim/d64", "state": "paused", "outcome": "stopped",
            "bytes_done": 42, "bytes_total": 100});
        assert!(released_relocation("d64", &paused)
            .unwrap()
            .ends_with("(42.0% copied) is paused: `recoverfs recover d64` then `recoverfs relocate d64 --resume` continues it"));
        let cancelled = json!({"target": "/primA/race1", "state": "copying", "outcome": "cancelled",
            "removed": ["/primA/race1/disk0.raw", "/primA/race1"]});
        assert_eq!(
            released_relocation("race1", &cancelled).unwrap(),
            "its relocation to /primA/race1 was cancelled: removed /primA/race1/disk0.raw, /primA/race1; kept nothing"
        );
        let forced =
            json!({"target": "/p/vm", "outcome": "cancelled", "kept": ["/p/vm/disk0.raw"]});
        assert!(released_relocation("vm", &forced)
            .unwrap()
            .ends_with("removed nothing; kept /p/vm/disk0.raw"));
        // review30 M1: a cancel not recorded is resumed by a recover.
        let unmarked = json!({"target": "/prim/um", "state": "failed",
            "outcome": "cancel-not-recorded", "bytes_done": 50, "bytes_total": 100});
        let line = released_relocation("um", &unmarked).unwrap();
        assert!(line.starts_with("its relocation to /prim/um (50.0% copied) was NOT cancelled"));
        assert!(
            line.contains("`recoverfs recover um` resumes the copy"),
            "{line}"
        );
        assert!(line.contains("`recoverfs release um --discard` cancels it with the staging"));
        // None, or an older daemon: nothing.
        assert_eq!(released_relocation("vm", &serde_json::Value::Null), None);
    }

    #[test]
    fn a_running_live_backup_says_how_far_it_is_and_an_older_daemon_that_it_runs() {
        let p = json!({"chunks_done": 120, "chunks_total": 400, "seconds": 35.2});
        assert_eq!(
            live_backup_line(&p),
            "a live backup (backup --session) is running: 120 of 400 changed chunks stored, 35 s"
        );
        let freezing = json!({"chunks_done": 0, "chunks_total": 0, "seconds": 0.4});
        assert!(live_backup_line(&freezing).ends_with("is running: 0 s"));
        assert_eq!(
            live_backup_line(&serde_json::Value::Null),
            "a live backup (backup --session) is running"
        );
    }

    #[test]
    fn a_session_line_says_its_export_point_and_each_disks_urls() {
        let s = json!({"export_point": "ds1", "urls": [["nfs://198.18.0.1/vm/disk0.raw", "nbd://198.18.0.1:10809/vm/disk0"], []]});
        assert_eq!(
            served_line(&s),
            "export point ds1: nfs://198.18.0.1/vm/disk0.raw  nbd://198.18.0.1:10809/vm/disk0"
        );
        let fuse = json!({"export_point": "default", "urls": [[]]});
        assert_eq!(served_line(&fuse), "export point default: FUSE only");
        let older = json!({"export_point": "ds1"});
        assert_eq!(served_line(&older), "export point ds1");
    }
}
