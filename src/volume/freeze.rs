//! The part of `Volume` a live backup uses (see `session::backup`): the
//! dirty-since-backup maps every guest write marks, the freeze that takes
//! a consistent set of changed blocks, and the copy-on-write that keeps
//! their freeze-time bytes readable while the guest writes on.
//!
//! A frozen block that was present at the freeze (or any frozen block
//! after a cutover) is *pending*: its freeze-time bytes are still in the
//! source (staging, or the target after cutover). The first guest write to
//! a pending block first copies those bytes to the cow file; the backup
//! reader takes them from the source while pending, else from the cow
//! file. One stripe lock per block decides who goes first. Only guest
//! writes change a present block (fetches and zero fills only write
//! blocks that are not present), and every guest write passes here.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use super::Volume;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::staging::io::BlockFile;
use crate::staging::{AtomicBitmap, PersistentBitmap};

const STRIPES: usize = 64;

/// The dirty-since-backup maps a guest write marks.
#[derive(Default)]
pub(crate) struct DirtyMaps {
    /// The current generation's map; `None`: generation 0, whose map is
    /// the changed map itself.
    pub(crate) current: Option<Arc<PersistentBitmap>>,
    /// While a live backup runs: the next generation's map.
    pub(crate) next: Option<Arc<PersistentBitmap>>,
}

/// A volume's live-backup state.
pub(super) struct LiveBackup {
    /// Dirty-since-backup maps.
    pub(super) dirty: RwLock<DirtyMaps>,
    /// While a live backup reads its frozen blocks.
    pub(super) freeze: RwLock<Option<Arc<Freeze>>>,
    /// The session uploader's record of the current generation (see
    /// `upload`): a guest write invalidates its entries first.
    pub(super) uploaded: RwLock<Option<Arc<super::upload::Uploaded>>>,
}

/// A live backup's frozen blocks, while it reads them.
pub(crate) struct Freeze {
    /// Frozen blocks whose freeze-time bytes are in the source, not read yet.
    pending: AtomicBitmap,
    /// Frozen blocks whose freeze-time bytes were copied to `cow`.
    saved: AtomicBitmap,
    cow: Arc<dyn BlockFile>,
    cow_path: PathBuf,
    stripes: Vec<Mutex<()>>,
    cow_blocks: AtomicU64,
    /// A copy-on-write that failed: the guest's write went on, the backup
    /// fails.
    broken: OnceLock<String>,
    /// `cow` is never synced for durability (it is void after a crash),
    /// but a page whose writeback failed may be dropped and read back as a
    /// hole: so a saved block is read only after a sync covered its copy.
    /// Syncs run one at a time (the kernel tells one sync of the error),
    /// the first failure sticks; `(copies written, copies synced)`.
    cow_sync: Mutex<Option<String>>,
    cow_written: AtomicU64,
    cow_synced: AtomicU64,
}

impl Freeze {
    /// Makes every copy written so far reach the disk before one is read
    /// back (see `cow_sync`); one sync covers a burst of reads.
    fn sync_cow(&self) -> Result<()> {
        let mut failed = self.cow_sync.lock();
        if let Some(e) = &*failed {
            return Err(Error::new(ErrorKind::Io, e.clone()));
        }
        let written = self.cow_written.load(Ordering::Acquire);
        if self.cow_synced.load(Ordering::Acquire) == written {
            return Ok(());
        }
        match self.cow.sync_data() {
            Ok(()) => {
                self.cow_synced.store(written, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "fsync {}: {e}; a frozen block's freeze-time bytes may be lost, so the backup fails",
                    self.cow_path.display()
                );
                *failed = Some(msg.clone());
                Err(Error::new(ErrorKind::Io, msg))
            }
        }
    }
}

/// What a freeze took.
#[derive(Debug, Clone, Default)]
pub struct Frozen {
    /// Every frozen block (dirty at the freeze), ascending.
    pub blocks: Vec<u64>,
    /// The frozen blocks to read: present at the freeze, or all of them
    /// after a cutover. The others were never staged: their content is the
    /// session's own backup chunk.
    pub read: Vec<u64>,
    /// Of `read`, those the session uploader had stored as a chunk with no
    /// guest write since (`None`: zeros): the backup takes the chunk
    /// instead of reading them, once it has checked that it exists, and
    /// lets go of them with [`Volume::release_frozen`].
    pub uploaded: Vec<(u64, Option<crate::repo::Digest>)>,
}

impl Volume {
    /// Sets `blocks` in the dirty-since-backup maps, durably, before the data
    /// (the changed map, generation 0's, is set by the caller).
    pub(super) fn mark_dirty(&self, blocks: std::ops::Range<u64>) -> Result<()> {
        let maps = self.live.dirty.read();
        for m in [&maps.current, &maps.next].into_iter().flatten() {
            m.set_many_durable(blocks.clone())?;
        }
        Ok(())
    }

    /// True if a write of `b` would need no dirty-map sync and no copy.
    pub(super) fn dirty_is_quick(&self, b: u64) -> bool {
        let maps = self.live.dirty.read();
        let marked = [&maps.current, &maps.next]
            .into_iter()
            .flatten()
            .all(|m| m.test_durable(b));
        marked
            && self
                .live
                .freeze
                .read()
                .as_ref()
                .is_none_or(|f| !f.pending.test(b))
    }

    /// Tests: marks `b` changed (and dirty) without writing it, as a crash
    /// between the durable bit and the data leaves it.
    #[cfg(test)]
    pub(crate) fn mark_changed_unstaged(&self, b: u64) -> Result<()> {
        self.mark_changed(b..b + 1)
    }

    /// Tests: a live backup has frozen this disk and not ended yet.
    #[cfg(test)]
    pub(crate) fn is_frozen(&self) -> bool {
        self.live.freeze.read().is_some()
    }

    /// Tests: whether block `b` is marked in the current generation's map.
    #[cfg(test)]
    pub(crate) fn is_dirty(&self, b: u64) -> bool {
        match &self.live.dirty.read().current {
            Some(m) => m.test(b),
            None => self.store.changed.test(b),
        }
    }

    /// Blocks written since the session's last live backup.
    pub fn blocks_dirty(&self) -> u64 {
        match &self.live.dirty.read().current {
            Some(m) => m.bits().count(),
            None => self.store.changed.bits().count(),
        }
    }

    /// Freezes the current generation's dirty blocks for a live backup and
    /// starts marking writes in `next` too. Call with writes paused (the
    /// caller holds `pause_writes`) and `next` durable and empty. Flushes
    /// first: the backup must describe staging that a crash keeps.
    pub(crate) fn freeze(
        &self,
        next: Arc<PersistentBitmap>,
        cow: Arc<dyn BlockFile>,
        cow_path: PathBuf,
    ) -> Result<Frozen> {
        if self.live.freeze.read().is_some() {
            return Err(Error::busy(format!(
                "disk{} of VM {} is already frozen for a backup",
                self.index, self.vm
            )));
        }
        self.flush()?;
        let switched = self.target.get().is_some();
        let up = self.live.uploaded.read().clone();
        let mut frozen = Frozen::default();
        let pending = AtomicBitmap::new(self.nblocks);
        {
            let maps = self.live.dirty.read();
            let bits = match &maps.current {
                Some(m) => m.bits(),
                None => self.store.changed.bits(),
            };
            for b in 0..self.nblocks {
                if !bits.test(b) {
                    continue;
                }
                frozen.blocks.push(b);
                if switched || self.store.present.test(b) {
                    pending.set(b);
                    frozen.read.push(b);
                    // Writes are paused: a valid entry is the content now.
                    if let Some(d) = up.as_ref().and_then(|u| u.get(b)) {
                        frozen.uploaded.push((b, d));
                    }
                }
            }
        }
        *self.live.freeze.write() = Some(Arc::new(Freeze {
            pending,
            saved: AtomicBitmap::new(self.nblocks),
            cow,
            cow_path,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            cow_blocks: AtomicU64::new(0),
            broken: OnceLock::new(),
            cow_sync: Mutex::new(None),
            cow_written: AtomicU64::new(0),
            cow_synced: AtomicU64::new(0),
        }));
        self.live.dirty.write().next = Some(next);
        Ok(frozen)
    }

    /// Before a guest write lands on `blocks`: saves the freeze-time bytes
    /// of pending ones to the cow file. A failure fails the backup, never
    /// the guest's write.
    pub(super) fn before_overwrite(&self, blocks: Range<u64>) {
        let Some(f) = self.live.freeze.read().clone() else {
            return;
        };
        for b in blocks {
            if !f.pending.test(b) {
                continue;
            }
            let _g = f.stripes[b as usize % STRIPES].lock();
            if !f.pending.test(b) {
                continue;
            }
            let (off, len) = self.block_range(b);
            let mut buf = vec![0u8; len as usize];
            let r = self.read_frozen_source(&mut buf, off).and_then(|()| {
                f.cow
                    .write_all_at(&buf, off)
                    .ctx(|| format!("write {}", f.cow_path.display()))
            });
            match r {
                Ok(()) => {
                    f.cow_written.fetch_add(1, Ordering::AcqRel);
                    f.saved.set(b);
                    f.cow_blocks.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(vm = %self.vm, disk = self.index, block = b, "copy-on-write for the running backup failed: {e}");
                    let _ = f.broken.set(e.to_string());
                }
            }
            f.pending.clear(b);
        }
    }

    fn read_frozen_source(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self.target.get() {
            Some(t) => t
                .read_exact_at(buf, off)
                .ctx(|| format!("read relocated disk{}", self.index)),
            None => self
                .store
                .data
                .read_exact_at(buf, off)
                .ctx(|| format!("read staging {}", self.store.data_path.display())),
        }
    }

    /// Reads frozen block `b` as it was at the freeze (`buf` is the
    /// block's length); true if the bytes came from the cow file. Each
    /// frozen block is read once.
    pub(crate) fn read_frozen(&self, b: u64, buf: &mut [u8]) -> Result<bool> {
        let f = self.live.freeze.read().clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("disk{} of VM {} is not frozen", self.index, self.vm),
            )
        })?;
        let (off, _) = self.block_range(b);
        let _g = f.stripes[b as usize % STRIPES].lock();
        if f.pending.test(b) {
            self.read_frozen_source(buf, off)?;
            f.pending.clear(b);
            return Ok(false);
        }
        if f.saved.test(b) {
            f.sync_cow()?;
            f.cow
                .read_exact_at(buf, off)
                .ctx(|| format!("read {}", f.cow_path.display()))?;
            return Ok(true);
        }
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "block {b} of disk{} of VM {} lost its freeze-time bytes: {}",
                self.index,
                self.vm,
                f.broken.get().map_or("it was read twice", |s| s.as_str())
            ),
        ))
    }

    /// The backup will not read frozen block `b` (it took its uploaded
    /// chunk): a guest write to it need not save its bytes any more.
    pub(crate) fn release_frozen(&self, b: u64) {
        if let Some(f) = self.live.freeze.read().clone() {
            let _g = f.stripes[b as usize % STRIPES].lock();
            f.pending.clear(b);
        }
    }

    /// Blocks the guest overwrote while frozen (copied to the cow file).
    pub(crate) fn cow_blocks(&self) -> u64 {
        self.live
            .freeze
            .read()
            .as_ref()
            .map_or(0, |f| f.cow_blocks.load(Ordering::Relaxed))
    }

    /// Ends a freeze. `committed`: the backup is the new base, the next
    /// map becomes current; returns the old current map (`None`: the
    /// changed map, which stays) for the caller to remove. Otherwise the
    /// next map is dropped and writes mark the current one alone.
    pub(crate) fn end_freeze(&self, committed: bool) -> Option<Arc<PersistentBitmap>> {
        let old = {
            let mut maps = self.live.dirty.write();
            if committed {
                let next = maps.next.take();
                std::mem::replace(&mut maps.current, next)
            } else {
                maps.next = None;
                None
            }
        };
        *self.live.freeze.write() = None;
        old
    }

    /// Ends a freeze whose commit is uncertain: writes go on marking both
    /// the current and the next map, so whichever generation a restart
    /// finds is complete.
    pub(crate) fn end_freeze_keeping_both(&self) {
        *self.live.freeze.write() = None;
    }
}
