//! The part of `Volume` the relocation copier uses: per-block write
//! stamps, the copier's block reads, the copied map hook, the write gate
//! for cutover, and the switch to serving the primary copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::fill::{Claim, Slot};
use super::Volume;
use crate::error::{Error, Result};
use crate::prefetch::Class;
use crate::staging::io::BlockFile;
use crate::staging::PersistentBitmap;

/// A copy read under way (see [`Volume::start_copy_read`]); dropping it
/// abandons the read (a fetch still completes for whoever joined it).
pub(crate) struct CopyRead(ReadHow);

enum ReadHow {
    /// The copier's own unstaged fetch of the backup's chunk.
    Fetch(Arc<Slot>),
    /// Read what the VM sees, after this fill (if any) ends.
    Source(Option<Arc<Slot>>),
}

impl CopyRead {
    /// True once it can finish without waiting.
    pub(crate) fn is_ready(&self) -> bool {
        match &self.0 {
            ReadHow::Fetch(s) | ReadHow::Source(Some(s)) => s.done.lock().is_some(),
            ReadHow::Source(None) => true,
        }
    }
}

/// A block's bytes for the copier: a fetch's buffer, shared with the
/// fetch's other waiters (no copy), or bytes read for it.
pub(crate) struct CopyBytes(Bytes);

enum Bytes {
    Fetched(Arc<Slot>),
    Read(bytes::Bytes),
}

impl std::ops::Deref for CopyBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Bytes::Fetched(s) => s.data.get().expect("checked when made"),
            Bytes::Read(v) => v,
        }
    }
}

impl Volume {
    /// A stamp of block `b`'s guest writes, or `None` while one is in progress.
    pub(crate) fn write_stamp(&self, b: u64) -> Option<u32> {
        let s = self.writes_started.of(b).load(Ordering::SeqCst);
        (self.writes_finished.of(b).load(Ordering::SeqCst) == s).then_some(s)
    }

    /// Marks `b` copied if no guest write started since `stamp`. The bit is
    /// set before the recheck so that a racing writer either sees it (and
    /// clears it, in memory: its changed bit covers a crash) or is seen here.
    pub(crate) fn mark_copied(&self, copied: &PersistentBitmap, b: u64, stamp: u32) -> bool {
        copied.set(b);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.writes_started.of(b).load(Ordering::SeqCst) != stamp {
            copied.bits().clear(b);
            copied.mark_dirty();
            return false;
        }
        true
    }

    /// Starts the copier's read of block `b` (not a hole). A block with
    /// backup data that is neither staged nor being filled is fetched at
    /// relocation priority without being staged (see `fetch`); anything
    /// else (staged, a zero chunk, or a fill under way: a guest's fetch or
    /// write, an eviction) is read as the VM sees it once that fill ends.
    /// Decided under the in-flight lock, where a guest write that claimed
    /// the block before the copier's stamp is always seen (it leaves the
    /// table only after its block is present).
    pub(crate) fn start_copy_read(&self, b: u64) -> CopyRead {
        if !self.chunks.has_data(b) {
            return CopyRead(ReadHow::Source(None));
        }
        match self.claim(b, Class::Relocation) {
            Claim::Present => CopyRead(ReadHow::Source(None)),
            Claim::Wait(s) => {
                s.promote(&self.sched, Class::Relocation);
                CopyRead(ReadHow::Source(Some(s)))
            }
            Claim::Owner(s) => {
                self.queue_fetch(b, &s, false);
                CopyRead(ReadHow::Fetch(s))
            }
        }
    }

    /// Waits for a read `start_copy_read` began and returns block `b`'s
    /// bytes. Staging need not be synced before the copy is recorded: a
    /// block the guest changed is never trusted as copied after a restart
    /// (see `relocate::copy`, "Revoking a copy"), and any other staged
    /// block holds the backup's bytes, which a crash cannot take away.
    pub(crate) fn finish_copy_read(&self, b: u64, r: CopyRead) -> Result<CopyBytes> {
        let (off, len) = self.block_range(b);
        match r.0 {
            ReadHow::Fetch(s) => {
                // The verified bytes, even if a promoted copy's staging
                // write failed after them.
                let ended = s.wait();
                if s.data.get().is_some() {
                    return Ok(CopyBytes(Bytes::Fetched(s)));
                }
                ended?;
                // Cannot happen (a successful fetch sets its bytes), but
                // reading what the VM sees is always right.
                let (data, _) = self.read_source(off, len, Class::Relocation)?;
                Ok(CopyBytes(Bytes::Read(data)))
            }
            ReadHow::Source(s) => {
                if let Some(s) = s {
                    // Its outcome does not matter: `read_source` fills
                    // the block again if that fill failed.
                    let _ = s.wait();
                }
                let (data, _) = self.read_source(off, len, Class::Relocation)?;
                Ok(CopyBytes(Bytes::Read(data)))
            }
        }
    }

    /// The first block in `[from, to)` that is not a hole (see
    /// [`Self::is_hole`]), or `to`: a binary search in the chunk index and
    /// a word-wise scan of the presence map, never a per-block walk.
    pub(crate) fn next_non_hole(&self, from: u64, to: u64) -> u64 {
        let to = to.min(self.nblocks);
        let data = self.chunks.next_data(from).map_or(to, |d| d.min(to));
        self.store.present.bits().next_set(from, data)
    }

    /// The first hole in `[from, to)`, or `to`.
    pub(crate) fn next_hole(&self, from: u64, to: u64) -> u64 {
        let to = to.min(self.nblocks);
        let mut at = from;
        while at < to {
            // Past the run of data chunks holding `at`, to a zero stretch;
            // its first block not staged is the hole.
            at = self.chunks.data_end(at);
            let zeros_end = self.chunks.next_data(at).map_or(to, |d| d.min(to));
            let h = self.store.present.bits().next_clear(at, zeros_end);
            if h < zeros_end {
                return h;
            }
            at = zeros_end;
        }
        to
    }

    /// Bytes of the blocks that are not holes: what a full copy writes at
    /// most. Walks runs, so a sparse 10 TiB disk costs its data extents.
    pub(crate) fn non_hole_bytes(&self) -> u64 {
        let (mut at, mut bytes) = (0, 0);
        while at < self.nblocks {
            let s = self.next_non_hole(at, self.nblocks);
            let e = self.next_hole(s, self.nblocks);
            bytes += (s..e).map(|b| self.block_len(b)).sum::<u64>();
            at = e;
        }
        bytes
    }

    /// Starts a relocation's tracking of copied blocks; refused while a
    /// FUSE passthrough open reads staging (see `passthrough`).
    pub(crate) fn track_copies(&self, m: Arc<PersistentBitmap>) -> Result<()> {
        let readers = self.direct_readers.lock();
        self.no_staging_reader(*readers)?;
        *self.copied.write() = Some(m);
        Ok(())
    }

    /// The restart rule of `relocate::copy` ("Revoking a copy"): clears, in
    /// memory, the copied bit of every block the guest ever changed, as
    /// `copied` was read from its file; returns how many. A guest write
    /// revokes a copy in memory only, so the file may still vouch for a
    /// block written since: every such block has its changed bit (durable
    /// before the write's data), and is copied again (from staging).
    pub(crate) fn forget_copies_of_changed(&self, copied: &PersistentBitmap) -> u64 {
        copied.bits().clear_each_of(self.store.changed.bits())
    }

    /// The first block in `blocks` that `copied` marks, that has data in
    /// the backup and that the guest never changed: one whose copy on the
    /// target holds the backup's bytes, never all zeros (a backup stores an
    /// all-zero chunk as none). Walks the backup's data runs and the map's
    /// words, never block by block (the changed blocks among the copied
    /// ones aside, which the restart rule forgets anyway).
    pub(crate) fn first_copied_backup_data(
        &self,
        copied: &PersistentBitmap,
        blocks: std::ops::Range<u64>,
    ) -> Option<u64> {
        let end = blocks.end.min(self.nblocks);
        let mut at = blocks.start;
        while at < end {
            let s = self.chunks.next_data(at).map_or(end, |d| d.min(end));
            let e = self.chunks.data_end(s).min(end);
            let mut b = copied.bits().next_set(s, e);
            while b < e {
                if !self.store.changed.test(b) {
                    return Some(b);
                }
                b = copied.bits().next_set(b + 1, e);
            }
            at = e.max(s + 1);
        }
        None
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

    /// True if the block has no data in the backup and was never written,
    /// nor is being written. A write into a hole claims the block, ends
    /// its write stamp, and only then marks it present (`complete_claim`):
    /// "not present" alone would call a block just written a hole, and the
    /// copier would record it copied as one (its stamp unchanged). So the
    /// claim is tested first, under the in-flight lock; `complete_claim`
    /// sets the present bit before it drops the claim, so one of the two
    /// tests sees such a write.
    /// Whether block `b` is staged (its copy read comes from staging, not
    /// the repository), or the disk serves its target already.
    pub(crate) fn is_staged(&self, b: u64) -> bool {
        self.target.get().is_some() || self.store.present.test(b)
    }

    pub(crate) fn is_hole(&self, b: u64) -> bool {
        if self.chunks.has_data(b) || self.inflight.lock().contains_key(&b) {
            return false;
        }
        !self.store.present.test(b)
    }

    pub fn nblocks(&self) -> u64 {
        self.nblocks
    }

    pub(crate) fn block_range(&self, b: u64) -> (u64, u64) {
        (b * self.block_size, self.block_len(b))
    }
}
