//! The part of `Volume` the session uploader (`session::upload`) uses: the
//! in-memory side of the disk's upload record (`staging::uploaded`), the
//! set-then-recheck that records an upload, the invalidation every guest
//! write does first, and the guest latency figures its throttle samples.
//!
//! **Invariant.** While an entry for block `b` is valid (in memory, and in
//! the file as far as a crash can tell), `b`'s content is the entry's
//! chunk. Kept by two rules, the copied map's discipline (`relocation`):
//! * a guest write announces itself (`writes_started`), then, if the entry
//!   is valid, zeroes it in the file, synced, and only then clears it in
//!   memory, before its data lands (so a second write to the block in the
//!   meantime sees the entry valid and waits for a synced zeroing too);
//! * the uploader reads the block at a stamp (no write in progress), stores
//!   the chunk (durable), flushes the disk (the bytes it read are durable
//!   in staging: an entry written may reach the disk before any sync of
//!   its own), then under the block's stripe lock sets the valid bit,
//!   rechecks the stamp and only then writes the entry.
//!
//! A writer that misses the valid bit was seen by the recheck (both sides
//! order their store before their load with a SeqCst fence), so no entry
//! is written; a writer that sees it takes the stripe lock after the
//! uploader wrote its entry and zeroes it. The file is written only under
//! the stripe lock, so a zeroing can never be overtaken by an older entry.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::Volume;
use crate::error::{IoContext, Result};
use crate::repo::Digest;
use crate::staging::uploaded::{Entries, UploadRecord};
use crate::staging::AtomicBitmap;

const STRIPES: usize = 64;

/// One generation's upload record of a disk, as the volume keeps it.
pub struct Uploaded {
    record: UploadRecord,
    /// Blocks whose entry is valid: a guest write must clear it first.
    valid: AtomicBitmap,
    digests: Mutex<HashMap<u64, Option<Digest>>>,
    stripes: Vec<Mutex<()>>,
}

impl Uploaded {
    pub fn new(record: UploadRecord, entries: Entries, nblocks: u64) -> Arc<Uploaded> {
        let valid = AtomicBitmap::new(nblocks);
        for &b in entries.keys() {
            valid.set(b);
        }
        Arc::new(Uploaded {
            record,
            valid,
            digests: Mutex::new(entries),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    pub fn generation(&self) -> u64 {
        self.record.generation()
    }

    /// Blocks with a valid entry.
    pub fn count(&self) -> u64 {
        self.valid.count()
    }

    /// Makes every entry written so far durable (a checkpoint).
    pub fn sync(&self) -> Result<()> {
        self.record.sync()
    }

    /// The chunk recorded for `b` if its entry is valid.
    pub(crate) fn get(&self, b: u64) -> Option<Option<Digest>> {
        if !self.valid.test(b) {
            return None;
        }
        self.digests.lock().get(&b).copied()
    }
}

impl Volume {
    /// The current generation's upload record, if the uploader runs or ran.
    pub fn uploaded(&self) -> Option<Arc<Uploaded>> {
        self.live.uploaded.read().clone()
    }

    pub(crate) fn set_uploaded(&self, u: Option<Arc<Uploaded>>) {
        *self.live.uploaded.write() = u;
    }

    /// Blocks the uploader still has to store: dirty in the current
    /// generation, staged (or anything after a cutover: the target), and
    /// without a valid entry. A dirty block never staged is the session's
    /// own backup chunk: a live backup takes it unread, so it is no work.
    pub fn upload_todo(&self, u: Option<&Uploaded>) -> Vec<u64> {
        let switched = self.target.get().is_some();
        let maps = self.live.dirty.read();
        let bits = match &maps.current {
            Some(m) => m.bits(),
            None => self.store.changed.bits(),
        };
        (0..self.nblocks)
            .filter(|&b| bits.test(b) && u.is_none_or(|u| !u.valid.test(b)))
            .filter(|&b| switched || self.store.present.test(b))
            .collect()
    }

    /// Reads block `b` for an upload (`buf` is the block's length) from
    /// staging or the target, never the repository. Returns the write
    /// stamp it was read at, or `None` if a guest write is in progress
    /// (the block is left for later).
    pub fn read_for_upload(&self, b: u64, buf: &mut [u8]) -> Result<Option<u32>> {
        let Some(stamp) = self.write_stamp(b) else {
            return Ok(None);
        };
        let (off, _) = self.block_range(b);
        match self.target.get() {
            Some(t) => t
                .read_exact_at(buf, off)
                .ctx(|| format!("read relocated disk{}", self.index))?,
            None => self
                .store
                .data
                .read_exact_at(buf, off)
                .ctx(|| format!("read staging {}", self.store.data_path.display()))?,
        }
        Ok(Some(stamp))
    }

    /// Records the uploads of `done` (block, the stamp it was read at, its
    /// chunk, durable in the repository already): first makes the disk's
    /// data durable (a flush), since an entry may reach the disk at any
    /// time once written and must never describe bytes a power cut can
    /// still take back; then marks each block whose stamp still holds. The
    /// blocks recorded.
    pub fn record_uploads(&self, u: &Uploaded, done: &[(u64, u32, Option<Digest>)]) -> Result<u64> {
        if done.is_empty() {
            return Ok(0);
        }
        self.flush()?;
        let mut n = 0;
        for &(b, stamp, digest) in done {
            if self.mark_uploaded(u, b, stamp, digest)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Records that `b`, read at `stamp`, is stored as `digest` (durably in
    /// the repository, and its bytes durable in staging), unless a guest
    /// write started since. True if recorded.
    pub(super) fn mark_uploaded(
        &self,
        u: &Uploaded,
        b: u64,
        stamp: u32,
        digest: Option<Digest>,
    ) -> Result<bool> {
        let _g = u.stripes[b as usize % STRIPES].lock();
        u.valid.set(b);
        fence(Ordering::SeqCst);
        if self.writes_started.of(b).load(Ordering::SeqCst) != stamp {
            u.valid.clear(b);
            return Ok(false);
        }
        u.digests.lock().insert(b, digest);
        // On an error the file may hold the entry or not. Either way it is
        // true (the chunk is durable, no write started since the stamp), so
        // it stays valid in memory too: a guest write clears it, durably,
        // before its data lands, as any valid entry.
        u.record.write(b, digest)?;
        Ok(true)
    }

    /// False if a write to `b` must clear (and sync) an upload entry first.
    pub(super) fn upload_is_quick(&self, b: u64) -> bool {
        self.live
            .uploaded
            .read()
            .as_ref()
            .is_none_or(|u| !u.valid.test(b))
    }

    /// Before a guest write's data lands on `blocks` (their writes
    /// announced): their valid upload entries are cleared, durably.
    pub(super) fn invalidate_uploaded(&self, blocks: std::ops::Range<u64>) -> Result<()> {
        fence(Ordering::SeqCst);
        let Some(u) = self.live.uploaded.read().clone() else {
            return Ok(());
        };
        let mut cleared = vec![];
        for b in blocks {
            if !u.valid.test(b) {
                continue;
            }
            let _g = u.stripes[b as usize % STRIPES].lock();
            // The valid bit stays set until the zeroed entry is synced: a
            // second write to `b` meanwhile sees it, zeroes and syncs too,
            // rather than landing its data before any zeroing is durable.
            if u.valid.test(b) {
                u.digests.lock().remove(&b);
                u.record.clear(b)?;
                cleared.push(b);
            }
        }
        if cleared.is_empty() {
            return Ok(());
        }
        let synced = u.record.sync();
        for b in cleared {
            let _g = u.stripes[b as usize % STRIPES].lock();
            u.valid.clear(b);
        }
        synced
    }

    /// A guest request that started at `t0` ended: counted for the
    /// uploader's throttle (requests and the time they took, like QEMU's
    /// block stats).
    pub(super) fn guest_done(&self, t0: Instant) {
        let took = t0.elapsed();
        self.stats.guest_ops.add(1);
        self.stats.guest_time_ns.add(took.as_nanos() as u64);
        self.stats.guest_latency.record(took);
    }

    /// Guest requests completed and the nanoseconds they took, so far.
    pub fn guest_io(&self) -> (u64, u64) {
        (self.stats.guest_ops.get(), self.stats.guest_time_ns.get())
    }

    /// Guest requests completed, and those slower than `over`, so far.
    pub fn guest_tail(&self, over: std::time::Duration) -> (u64, u64) {
        let h = &self.stats.guest_latency;
        (h.count(), h.count_over(over))
    }
}
