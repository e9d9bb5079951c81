//! Direct reads: the part of `Volume` a frontend uses to let the kernel
//! read a disk's file itself (FUSE passthrough), without the daemon seeing
//! each read.
//!
//! A direct reader reads the file the volume serves from (staging, or the
//! relocation target after cutover) as it is, so three things that could
//! change *which* bytes that file holds are ruled out while one is open:
//! * **missing blocks**: granted only when every block with backup data
//!   (or written) is present (other zero blocks are holes in the file and
//!   read as zeros), so no read would need a fetch;
//! * **eviction**: a volume with a direct reader evicts nothing (an evicted
//!   block is a hole and would read as zeros). The grant is decided under
//!   the CLOCK hand lock, which an eviction batch holds from picking its
//!   victims to punching their holes, so no batch is half done at grant;
//! * **relocation**: not granted on staging while a relocation runs (its
//!   cutover would move writes to the target under the reader), and a
//!   relocation does not start while staging has a direct reader. The
//!   copied map stays set from a relocation's start on, so a relocation
//!   that failed keeps direct readers away until release. After cutover
//!   the grant is for the target file, which every write then goes to.
//!
//! The volume itself cannot go away under a reader: the FUSE open holds a
//! session handle, and release is refused while one is held.
//!
//! Guest writes (through NBD, NFS or a writable FUSE open) still go through
//! the volume and update the same file in place, so a direct reader sees
//! them; they are tracked as changed as always. A write never fills a
//! missing block under a direct reader because none is missing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Volume;
use crate::error::{Error, Result};
use crate::staging::io::BlockFile;

impl Volume {
    /// Grants a direct reader if the file the volume serves from holds
    /// every byte of the disk, and returns that file. Pair with
    /// `end_direct_read`.
    pub(crate) fn begin_direct_read(&self) -> Option<Arc<dyn BlockFile>> {
        // No eviction batch runs while we decide (see the module doc). One
        // running now is making the disk incomplete anyway: no waiting for
        // its map sync (the caller may be a FUSE event thread).
        let _hand = self.evict.clock_hand.try_lock()?;
        let mut readers = self.direct_readers.lock();
        if self.closed.load(Ordering::Acquire) || self.is_failed() {
            return None;
        }
        let file = match self.target.get() {
            Some(t) => t.clone(),
            None if self.copied.read().is_some() => return None,
            None if !self.staging_holds_every_byte() => return None,
            None => self.store.data.clone(),
        };
        *readers += 1;
        Some(file)
    }

    /// True if the staging file reads as the volume serves the disk: every
    /// block with backup data or written by the guest is staged, and the
    /// rest are zero blocks never written, holes in the file. (A written
    /// block that is not staged happens only after a power cut lost its
    /// presence bit: the volume reads it as zeros or fetches it, while the
    /// file may hold the lost write.) Once per first open; walks the
    /// chunks with data and the changed blocks, not the whole disk.
    fn staging_holds_every_byte(&self) -> bool {
        let present = |b: u64| self.store.present.test(b);
        self.chunks.iter_present().all(|(b, _)| present(b))
            && (self.store.changed.bits().ranges().into_iter()).all(|(s, e)| (s..e).all(present))
    }

    /// A direct reader granted by `begin_direct_read` is gone.
    pub(crate) fn end_direct_read(&self) {
        let mut readers = self.direct_readers.lock();
        *readers = readers.saturating_sub(1);
    }

    /// Direct readers now (eviction skips the volume while there are any).
    pub(crate) fn direct_readers(&self) -> u32 {
        *self.direct_readers.lock()
    }

    /// Refuses (busy) while a direct reader reads staging: a relocation
    /// must not start under it, its cutover would move writes away from
    /// the file being read. Checked again, atomically, when the relocation
    /// sets its copied map.
    pub(crate) fn check_no_staging_reader(&self) -> Result<()> {
        let readers = self.direct_readers.lock();
        self.no_staging_reader(*readers)
    }

    /// The check, with the reader count already locked by the caller.
    pub(super) fn no_staging_reader(&self, readers: u32) -> Result<()> {
        if readers > 0 && self.target.get().is_none() {
            return Err(Error::busy(format!(
                "disk{} of VM {} is open read-only with FUSE passthrough: close it, then relocate",
                self.index, self.vm
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "passthrough_tests.rs"]
mod tests;
