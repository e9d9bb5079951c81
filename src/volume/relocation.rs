//! The part of `Volume` the relocation copier uses: per-block write
//! stamps, the copied map hook, the write gate for cutover, and the switch
//! to serving the primary copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Volume;
use crate::error::{Error, Result};
use crate::prefetch::Class;
use crate::staging::io::BlockFile;
use crate::staging::PersistentBitmap;

/// Blocks fetched ahead of the relocation copy cursor: enough to cover a
/// fetch latency at copy speed, few enough not to crowd out the profile.
const RELOCATION_WINDOW: usize = 16;

impl Volume {
    /// A stamp of block `b`'s guest writes, or `None` while one is in progress.
    pub(crate) fn write_stamp(&self, b: u64) -> Option<u32> {
        let s = self.writes_started.of(b).load(Ordering::SeqCst);
        (self.writes_finished.of(b).load(Ordering::SeqCst) == s).then_some(s)
    }

    /// Marks `b` copied if no guest write started since `stamp`. The bit is
    /// set before the recheck so that a racing writer either sees it (and
    /// clears it durably) or is seen here.
    pub(crate) fn mark_copied(&self, copied: &PersistentBitmap, b: u64, stamp: u32) -> bool {
        copied.set(b);
        if self.writes_started.of(b).load(Ordering::SeqCst) != stamp {
            copied.bits().clear(b);
            copied.mark_dirty();
            return false;
        }
        true
    }

    /// Announces the order in which the relocation will copy this disk
    /// (ascending offset unless told otherwise), so the scheduler can keep
    /// staging filled just ahead of the copy cursor.
    pub fn announce_copy_order(&self, order: Vec<u64>) {
        *self.copy_order.write() = Some(order.into());
    }

    /// The announced copy order, ascending by default.
    pub fn copy_order(&self) -> Arc<[u64]> {
        if let Some(o) = self.copy_order.read().as_ref() {
            return o.clone();
        }
        let o: Arc<[u64]> = (0..self.nblocks).collect();
        *self.copy_order.write() = Some(o.clone());
        o
    }

    /// The copier is at position `pos` of the copy order: queue fetches
    /// for the next blocks at relocation priority.
    pub(crate) fn copy_cursor(&self, order: &[u64], pos: usize) {
        let end = (pos + 1 + RELOCATION_WINDOW).min(order.len());
        for &b in order.get(pos + 1..end).unwrap_or(&[]) {
            self.prefetch_block(b, Class::Relocation);
        }
    }

    /// Starts a relocation's tracking of copied blocks; refused while a
    /// FUSE passthrough open reads staging (see `passthrough`).
    pub(crate) fn track_copies(&self, m: Arc<PersistentBitmap>) -> Result<()> {
        let readers = self.direct_readers.lock();
        self.no_staging_reader(*readers)?;
        *self.copied.write() = Some(m);
        Ok(())
    }

    /// Ends it (a relocation that could not start).
    pub(crate) fn untrack_copies(&self) {
        *self.copied.write() = None;
    }

    /// Blocks writes (after in-flight ones finish) until the guard drops.
    pub(crate) fn pause_writes(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.write_gate.write()
    }

    /// From now on every read and write goes to `file`. Cannot fail:
    /// everything fallible happens before the cutover's commit point.
    pub(crate) fn switch_to(&self, file: Arc<dyn BlockFile>) {
        let _ = self.target.set(file);
    }

    /// Fails the disk for good (until release): used when the cutover
    /// committed but its commit could not be made durable, so no new byte
    /// may land anywhere.
    pub(crate) fn fail_hard(&self, e: Error) {
        let _ = self.fail(e);
    }

    pub fn is_switched(&self) -> bool {
        self.target.get().is_some()
    }

    pub(crate) fn copies_revoked(&self) -> u64 {
        self.copies_revoked.load(Ordering::Relaxed)
    }

    pub(crate) fn guest_busy(&self) -> bool {
        self.guest_inflight.load(Ordering::Acquire) > 0
    }

    /// True if the block has no data in the backup and was never written.
    pub(crate) fn is_hole(&self, b: u64) -> bool {
        !self.chunks.has_data(b) && !self.store.present.test(b)
    }

    pub fn nblocks(&self) -> u64 {
        self.nblocks
    }

    pub(crate) fn block_range(&self, b: u64) -> (u64, u64) {
        (b * self.block_size, self.block_len(b))
    }
}
