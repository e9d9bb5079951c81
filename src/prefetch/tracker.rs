//! Per-disk profile bookkeeping on the guest read path: the first read of
//! each block (the recording), whether it was already staged, and how far
//! the guest has come along the applied profile's timeline.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::profile::{Access, Planned};
use crate::repo::ChunkIndex;
use crate::staging::AtomicBitmap;

/// Where the applied profile came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanSource {
    Recorded,
    Default,
}

struct Plan {
    source: PlanSource,
    blocks: Vec<u64>,
    /// Block → planned time, for following the guest's progress.
    t_ms: std::collections::HashMap<u64, u32>,
}

/// When first reads count as the session's recording.
#[derive(Debug, Clone, Copy)]
pub struct RecordWindow {
    pub start: Instant,
    pub length: Duration,
}

pub struct Tracker {
    start: Instant,
    window: Duration,
    seen: AtomicBitmap,
    accesses: Mutex<Vec<(u64, u32)>>,
    first_reads: AtomicU64,
    first_read_hits: AtomicU64,
    plan: OnceLock<Plan>,
    /// The latest planned time among blocks the guest has read.
    progress_ms: AtomicU32,
}

/// Figures for `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProfileFigures {
    pub source: Option<PlanSource>,
    pub blocks: u64,
    pub staged: u64,
    pub first_reads: u64,
    pub first_read_hits: u64,
    pub recorded_blocks: u64,
}

impl Tracker {
    /// Records first reads of a disk of `nblocks` within `w`.
    pub fn new(nblocks: u64, w: RecordWindow) -> Tracker {
        Tracker {
            start: w.start,
            window: w.length,
            seen: AtomicBitmap::new(nblocks),
            accesses: Mutex::new(vec![]),
            first_reads: AtomicU64::new(0),
            first_read_hits: AtomicU64::new(0),
            plan: OnceLock::new(),
            progress_ms: AtomicU32::new(0),
        }
    }

    pub fn elapsed_ms(&self) -> u32 {
        self.start.elapsed().as_millis().min(u32::MAX as u128) as u32
    }

    /// Notes a guest read of `blocks`; `staged(b)` says whether block `b`
    /// can be served without a fetch right now.
    pub fn on_read(&self, blocks: Range<u64>, staged: impl Fn(u64) -> bool) {
        for b in blocks {
            if !self.seen.set(b) {
                continue;
            }
            let t = self.elapsed_ms();
            self.first_reads.fetch_add(1, Ordering::Relaxed);
            if staged(b) {
                self.first_read_hits.fetch_add(1, Ordering::Relaxed);
            }
            if u128::from(t) <= self.window.as_millis() {
                let mut a = self.accesses.lock();
                if a.len() < crate::prefetch::profile::MAX_TRACE_ACCESSES {
                    a.push((b, t));
                }
            }
            if let Some(pt) = self.plan.get().and_then(|p| p.t_ms.get(&b)) {
                self.progress_ms.fetch_max(*pt, Ordering::AcqRel);
            }
        }
    }

    pub fn recording_open(&self) -> bool {
        self.start.elapsed() <= self.window
    }

    /// The recorded first reads with each block's chunk.
    pub fn accesses(&self, chunks: &ChunkIndex) -> Vec<Access> {
        self.accesses
            .lock()
            .iter()
            .map(|&(b, t)| Access(b, t, chunks.get(b)))
            .collect()
    }

    /// Sets the profile this disk follows (once per session).
    pub fn set_plan(&self, source: PlanSource, planned: &[Planned]) {
        let _ = self.plan.set(Plan {
            source,
            blocks: planned.iter().map(|p| p.block).collect(),
            t_ms: planned.iter().map(|p| (p.block, p.t_ms)).collect(),
        });
    }

    /// How far along its profile the guest is, in profile time.
    pub fn progress_ms(&self) -> u32 {
        self.progress_ms.load(Ordering::Acquire)
    }

    pub fn figures(&self, staged: impl Fn(u64) -> bool) -> ProfileFigures {
        let plan = self.plan.get();
        ProfileFigures {
            source: plan.map(|p| p.source),
            blocks: plan.map_or(0, |p| p.blocks.len() as u64),
            staged: plan.map_or(0, |p| {
                p.blocks.iter().filter(|&&b| staged(b)).count() as u64
            }),
            first_reads: self.first_reads.load(Ordering::Relaxed),
            first_read_hits: self.first_read_hits.load(Ordering::Relaxed),
            recorded_blocks: self.accesses.lock().len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_first_reads_are_recorded_and_hits_are_counted() {
        let t = Tracker::new(
            100,
            RecordWindow {
                start: Instant::now(),
                length: Duration::from_secs(60),
            },
        );
        t.on_read(3..5, |b| b == 4);
        t.on_read(4..6, |_| true);
        let rec: Vec<u64> = t
            .accesses(&ChunkIndex::zeros(100))
            .iter()
            .map(|a| a.0)
            .collect();
        assert_eq!(rec, vec![3, 4, 5]);
        let f = t.figures(|_| false);
        assert_eq!((f.first_reads, f.first_read_hits), (3, 2));
    }

    #[test]
    fn reads_after_the_window_are_not_recorded() {
        let t = Tracker::new(
            10,
            RecordWindow {
                start: Instant::now() - Duration::from_secs(5),
                length: Duration::from_secs(1),
            },
        );
        t.on_read(0..2, |_| false);
        assert!(t.accesses(&ChunkIndex::zeros(10)).is_empty());
        assert!(!t.recording_open());
    }

    #[test]
    fn the_guest_progress_follows_the_planned_time_of_blocks_it_reads() {
        let t = Tracker::new(
            10,
            RecordWindow {
                start: Instant::now(),
                length: Duration::from_secs(60),
            },
        );
        let plan: Vec<Planned> = [(1, 100), (2, 5_000), (3, 200)]
            .iter()
            .map(|&(block, t_ms)| Planned {
                block,
                t_ms,
                seen: 1,
                chunk: None,
            })
            .collect();
        t.set_plan(PlanSource::Recorded, &plan);
        t.on_read(2..3, |_| false);
        t.on_read(3..4, |_| false);
        assert_eq!(t.progress_ms(), 5_000);
        assert_eq!(t.figures(|b| b == 1).staged, 1);
    }
}
