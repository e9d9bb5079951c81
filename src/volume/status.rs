//! A disk's figures: the counters the read, write and fetch paths bump
//! ([`VolumeStats`]) and the [`DiskStatus`] that `status` reports. Apart
//! from the data paths, which only count.

use parking_lot::Mutex;
use serde::Serialize;

use super::Volume;
use crate::metrics::{Counter, LatencyHistogram};
use crate::prefetch::tracker::ProfileFigures;

#[derive(Default)]
pub struct VolumeStats {
    pub reads: Counter,
    pub read_bytes: Counter,
    /// Reads served without waiting for any fetch.
    pub read_hits: Counter,
    pub writes: Counter,
    pub write_bytes: Counter,
    pub fetched_blocks: Counter,
    /// Bytes transferred from the repository (compressed).
    pub fetched_bytes: Counter,
    /// Fetches that failed (GET, verification, decoding): their readers
    /// got the error.
    pub fetch_errors: Counter,
    /// Fetches whose verified bytes answered their readers but could not
    /// be written to staging (e.g. it is full): no read failed; the block
    /// stays missing and is fetched again when read.
    pub staging_write_errors: Counter,
    /// Blocks fetched for a read without being staged because staging
    /// had no room (full, nothing evictable): the read was answered; the
    /// block is fetched again when read.
    pub read_through: Counter,
    pub fetch_latency: LatencyHistogram,
    pub flushes: Counter,
    /// Blocks given back to keep staging under its limit (see `evict`).
    pub evicted_blocks: Counter,
    /// Reads that found a block missing after its fill (evicted, or a
    /// guest write that claimed it failed) and filled it again.
    pub refills: Counter,
    /// Reads of the staging data file on behalf of guest and internal
    /// reads (preads; a fetch's waiters answer without one).
    pub staging_reads: Counter,
    /// Guest reads that waited for a fetch holding no thread
    /// (`Volume::read_later`).
    pub later_reads: Counter,
    /// The most recent fetch failure, for status and verify-boot.
    pub last_fetch_error: Mutex<Option<String>>,
    /// The most recent failed staging write of fetched bytes, for status.
    pub last_staging_write_error: Mutex<Option<String>>,
    /// Guest reads and writes completed, and the time
    /// they took: the session uploader's load figures (see `upload`).
    pub guest_ops: Counter,
    pub guest_time_ns: Counter,
    /// Their latencies, for a p99 limit.
    pub guest_latency: LatencyHistogram,
}

/// Per-disk figures for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    pub index: usize,
    pub name: String,
    pub size: u64,
    pub block_size: u64,
    pub blocks_total: u64,
    pub blocks_staged: u64,
    pub blocks_changed: u64,
    /// Blocks written since the session's last live backup (or since
    /// recovery, before the first).
    pub blocks_dirty: u64,
    pub zero_blocks: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub read_hits: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
    /// Fetches that failed: their reads failed (see `last_fetch_error`).
    pub fetch_errors: u64,
    /// Fetched blocks that could not be staged (e.g. staging is full):
    /// their reads were answered from the verified bytes; the block is
    /// fetched again when read (see `last_staging_write_error`).
    pub staging_write_errors: u64,
    /// Blocks read through a full staging: fetched for a read and not
    /// staged (no room, nothing evictable); fetched again when read.
    pub read_through: u64,
    pub fetch_latency_mean_ms: f64,
    pub fetch_latency_p99_ms: f64,
    pub fetches_in_flight: usize,
    pub flushes: u64,
    /// Blocks evicted to keep staging under its limit (see `evict`).
    pub evicted_blocks: u64,
    /// Reads that found a block evicted after its fill and filled it again.
    pub refills: u64,
    /// Preads of the staging data file that served reads (a miss is
    /// answered from the fetched bytes without one).
    pub staging_reads: u64,
    /// Reads that waited for a fetch holding no thread (FUSE, NBD, NFS).
    pub later_reads: u64,
    /// The kernel reads this disk's file itself for a read-only FUSE open
    /// (`serve --fuse-passthrough`): no eviction, no relocation start,
    /// and writable FUSE opens are refused until it closes.
    pub passthrough: bool,
    pub last_fetch_error: Option<String>,
    pub last_staging_write_error: Option<String>,
    /// Set once a sync of this disk's staging failed: every later flush
    /// fails with EIO until the session is released.
    pub failed: Option<String>,
    /// Share of the applied profile's blocks already staged (0..1; 1 when
    /// there is no profile to stage).
    pub profile_coverage: f64,
    /// Share of guest reads served from staging without a fetch (0..1;
    /// 1 before the first read).
    pub profile_hit_ratio: f64,
    pub profile: ProfileFigures,
}

impl Volume {
    /// Bytes of the applied profile's blocks not staged yet (approximated
    /// by whole blocks).
    pub fn profile_remaining_bytes(&self) -> u64 {
        let f = self.tracker.figures(|b| self.store.present.test(b));
        f.blocks.saturating_sub(f.staged) * self.block_size
    }

    /// Bytes of blocks with data in the backup that are not staged yet.
    pub fn unstaged_bytes(&self) -> u64 {
        if self.target.get().is_some() {
            return 0;
        }
        (self.chunks.iter_present())
            .filter(|&(b, _)| !self.store.present.test(b))
            .map(|(b, _)| self.block_len(b))
            .sum()
    }

    pub fn status(&self) -> DiskStatus {
        let s = &self.stats;
        let profile = self.tracker.figures(|b| self.store.present.test(b));
        let ratio = |num: u64, den: u64| {
            if den == 0 {
                1.0
            } else {
                num as f64 / den as f64
            }
        };
        DiskStatus {
            profile_coverage: ratio(profile.staged, profile.blocks),
            profile_hit_ratio: ratio(s.read_hits.get(), s.reads.get()),
            profile,
            index: self.index,
            name: self.name(),
            size: self.size,
            block_size: self.block_size,
            blocks_total: self.nblocks,
            blocks_staged: self.store.present.bits().count(),
            blocks_changed: self.store.changed.bits().count(),
            blocks_dirty: self.blocks_dirty(),
            zero_blocks: self.chunks.zero_chunks(),
            reads: s.reads.get(),
            read_bytes: s.read_bytes.get(),
            read_hits: s.read_hits.get(),
            writes: s.writes.get(),
            write_bytes: s.write_bytes.get(),
            fetched_blocks: s.fetched_blocks.get(),
            fetched_bytes: s.fetched_bytes.get(),
            fetch_errors: s.fetch_errors.get(),
            staging_write_errors: s.staging_write_errors.get(),
            read_through: s.read_through.get(),
            fetch_latency_mean_ms: s.fetch_latency.mean_us() / 1000.0,
            fetch_latency_p99_ms: s.fetch_latency.quantile_us(0.99) / 1000.0,
            fetches_in_flight: self.inflight.lock().len(),
            flushes: s.flushes.get(),
            evicted_blocks: s.evicted_blocks.get(),
            refills: s.refills.get(),
            staging_reads: s.staging_reads.get(),
            later_reads: s.later_reads.get(),
            passthrough: self.direct_readers() > 0,
            last_fetch_error: s.last_fetch_error.lock().clone(),
            last_staging_write_error: s.last_staging_write_error.lock().clone(),
            failed: self.failed.get().map(|e| e.to_string()),
        }
    }
}
