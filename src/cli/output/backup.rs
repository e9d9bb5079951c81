//! Backup reports: `backup --session` (a live session's changed blocks)
//! and `backup-vms` (running VMs at one snapshot time).

use serde_json::Value;

use crate::util::human_bytes;

/// `backup --session`: per-disk lines and a summary on stderr, the new
/// backup's id as the last line on stdout (like `backup`).
pub(crate) fn session_backup(r: &Value) {
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    for d in r["disks"].as_array().cloned().unwrap_or_default() {
        tell!(
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
    tell!(
        "backup {} of VM {} (base {}): paused guest writes {:.1} ms, read {} of changed blocks, {}; {} new bytes in {:.1} s",
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
    say!("{}", r["backup"].as_str().unwrap_or("?"));
}

/// `backup-vms`: per VM a line on stderr (or the whole summary as JSON on
/// stdout); `NAME BACKUP_ID` on stdout for each VM backed up.
pub(crate) fn backup_vms(s: &crate::vmbackup::Summary, json: bool) {
    if json {
        say!("{}", serde_json::to_string_pretty(s).expect("json"));
        return;
    }
    tell!(
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
        tell!(
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
            tell!("  warning: {w}");
        }
    }
    for v in &s.vms {
        if let Some(id) = &v.backup {
            say!("{} {id}", v.vm);
        }
    }
}
