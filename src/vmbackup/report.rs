//! What a run reports: per VM its order, rate, pause, consistency, backup
//! and events ([`VmReport`]), the run's [`Summary`], and the [`Clock`]
//! that time-stamps events (and calls the tests' hook). Apart from the
//! steps so that every step records its events the same way.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::options::Hook;

/// One step of one VM's backup.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<usize>,
    /// Wall clock, RFC 3339 with milliseconds.
    pub at: String,
    /// Microseconds since the run started (monotonic: orders events).
    pub t_us: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct VmReport {
    pub vm: String,
    pub qmp: PathBuf,
    /// Position in the read order, from 1 (none: failed before ordering).
    pub order: Option<usize>,
    /// Bytes per second the guest wrote while measured.
    pub write_rate: f64,
    /// From its `stop` to its `cont`.
    pub paused_ms: Option<f64>,
    /// `application-consistent` or `crash-consistent[: why]`.
    pub consistency: String,
    pub backup: Option<String>,
    /// `full` or `incremental`.
    pub mode: String,
    /// The backup an incremental is relative to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    pub error: Option<String>,
    pub warnings: Vec<String>,
    pub disks: usize,
    pub bytes_read: u64,
    /// Chunks read over NBD (the others: zeros, or the base's).
    pub chunks_read: u64,
    pub new_bytes: u64,
    /// From its read's start to its manifest.
    pub read_ms: f64,
    /// Old data the guest's writes copied into the views' copy-before-write
    /// stores while they were open (measured as they are released).
    pub cbw_bytes: u64,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_id: String,
    /// The common snapshot time (none if no VM got that far).
    pub snapshot_time: Option<String>,
    pub jobs: usize,
    pub chunk_size: u32,
    /// In command-line order.
    pub vms: Vec<VmReport>,
}

impl Summary {
    pub fn failed(&self) -> Vec<&VmReport> {
        self.vms.iter().filter(|v| v.error.is_some()).collect()
    }
}

pub(super) struct Clock {
    pub(super) start: Instant,
    pub(super) hook: Option<Hook>,
}

impl Clock {
    pub(super) fn event(&self, r: &mut VmReport, event: &str, disk: Option<usize>) {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        r.events.push(Event {
            event: event.into(),
            disk,
            at: time::OffsetDateTime::now_utc()
                .format(fmt)
                .unwrap_or_default(),
            t_us: self.start.elapsed().as_micros() as u64,
        });
        if let Some(h) = &self.hook {
            h(&r.vm, event);
        }
    }
}
