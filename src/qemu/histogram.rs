//! Guest I/O latency tails from QEMU's own histograms.
//!
//! A drive's `query-blockstats` carries, once `block-latency-histogram-set`
//! gave it bin edges, cumulative counts of read, write and flush requests
//! per latency bin. Pre-copy's p99 limit needs only "how many requests so
//! far, how many slower than L": on a drive without histograms we set one
//! edge, L, for all three request kinds; a drive that already has some
//! (someone's monitoring, a benchmark) is left as it is and read at its
//! first edge at or above L, so we never reset another user's counts.
//! [`remove_ours`] removes exactly the histograms whose only edge is L.

use std::time::Duration;

use serde_json::{json, Value};

use super::qmp::Qmp;
use crate::error::Result;

const KINDS: [&str; 3] = [
    "rd_latency_histogram",
    "wr_latency_histogram",
    "flush_latency_histogram",
];

/// Requests completed and requests slower than `over`, over every drive
/// of a `query-blockstats` reply with a histogram (both monotonic while
/// no one resets them); gives drives without one a histogram with `over`
/// as its edge (counted from the next sample on).
pub fn requests_over(q: &mut Qmp, stats: &Value, over: Duration) -> Result<(u64, u64)> {
    let over_ns = over.as_nanos() as u64;
    let (mut total, mut slow) = (0, 0);
    let mut bare = Vec::new();
    for d in stats.as_array().into_iter().flatten() {
        let s = &d["stats"];
        let hists: Vec<&Value> = KINDS.iter().filter_map(|k| s.get(*k)).collect();
        if hists.is_empty() {
            bare.extend(drive_id(d));
        }
        for h in hists {
            let (n, over) = count_over(h, over_ns);
            total += n;
            slow += over;
        }
    }
    for id in bare {
        q.execute(
            "block-latency-histogram-set",
            Some(json!({"id": id, "boundaries": [over_ns]})),
        )?;
    }
    Ok((total, slow))
}

/// Removes the histograms [`requests_over`] set (only edge: `over`).
pub fn remove_ours(q: &mut Qmp, over: Duration) -> Result<()> {
    let over_ns = over.as_nanos() as u64;
    let stats = q.execute("query-blockstats", None)?;
    let mut ours = Vec::new();
    for d in stats.as_array().into_iter().flatten() {
        let s = &d["stats"];
        let edges: Vec<Option<&Value>> = KINDS
            .iter()
            .map(|k| s.get(*k).map(|h| &h["boundaries"]))
            .collect();
        if edges.iter().all(|e| *e == Some(&json!([over_ns]))) {
            ours.extend(drive_id(d));
        }
    }
    for id in ours {
        q.execute("block-latency-histogram-set", Some(json!({"id": id})))?;
    }
    Ok(())
}

/// The id `block-latency-histogram-set` takes: the guest device's QOM
/// path, or the drive's name.
fn drive_id(d: &Value) -> Option<String> {
    ["qdev", "device"]
        .iter()
        .filter_map(|k| d.get(*k).and_then(Value::as_str))
        .find(|s| !s.is_empty())
        .map(str::to_string)
}

/// One histogram's requests, and those in bins that start at or above
/// the first edge ≥ `over_ns` (bins below an edge under the limit cannot
/// be split; with no edge at or above it, nothing counts as slow).
fn count_over(h: &Value, over_ns: u64) -> (u64, u64) {
    let edges: Vec<u64> = (h["boundaries"].as_array().into_iter().flatten())
        .filter_map(Value::as_u64)
        .collect();
    let bins: Vec<u64> = (h["bins"].as_array().into_iter().flatten())
        .filter_map(Value::as_u64)
        .collect();
    let total = bins.iter().sum();
    // Bin i holds [edges[i-1], edges[i]); the first slow bin follows the
    // first edge at or above the limit.
    let slow = match edges.iter().position(|&e| e >= over_ns) {
        Some(i) => bins.iter().skip(i + 1).sum(),
        None => 0,
    };
    (total, slow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_requests_are_those_past_the_first_edge_at_or_above_the_limit() {
        let h = json!({"boundaries": [100, 200, 400], "bins": [5, 4, 3, 2]});
        assert_eq!(count_over(&h, 200), (14, 5));
        assert_eq!(count_over(&h, 150), (14, 5));
        assert_eq!(count_over(&h, 100), (14, 9));
        assert_eq!(count_over(&h, 401), (14, 0));
        let ours = json!({"boundaries": [250_000], "bins": [97, 3]});
        assert_eq!(count_over(&ours, 250_000), (100, 3));
    }

    #[test]
    fn a_drive_is_named_by_its_device_path_before_its_drive_name() {
        let d = json!({"device": "writer", "qdev": "/machine/peripheral/v/virtio-backend"});
        assert_eq!(
            drive_id(&d).unwrap(),
            "/machine/peripheral/v/virtio-backend"
        );
        let d = json!({"device": "writer", "qdev": ""});
        assert_eq!(drive_id(&d).unwrap(), "writer");
        assert_eq!(drive_id(&json!({"device": ""})), None);
    }
}
