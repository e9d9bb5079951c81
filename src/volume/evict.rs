//! Eviction: giving staged blocks back so staging stays under its limit
//! (see `staging::budget`), without ever letting a guest read zeros or
//! stale bytes where the backup or a guest write has data.
//!
//! **What may go.** A block that is present, not changed (the guest never
//! wrote it: its bytes are the backup's and can be fetched again), not in
//! the in-flight table, not pinned by a writer, and, while a relocation
//! runs, already copied to the target. Changed blocks never go, so neither
//! do the dirty-since-backup blocks a live backup reads (dirty ⊆ changed).
//!
//! **The race.** A reader tests a presence bit, then reads staging; a
//! writer of a partly covered block relies on the block's old bytes being
//! there; a writer of a fully covered present block relies on the bit
//! staying set (else a later read would fetch the backup over its data).
//! An eviction in between would break each. So the volume has an eviction
//! gate (`Eviction::gate`, an `RwLock<()>`):
//! * readers hold it shared only around "test presence + pread" (never
//!   while waiting for a fill); a block with a backup chunk found not
//!   present there was evicted after its fill: they fill it again;
//! * writers, under the gate, test a block present and *pin* it
//!   (`pins[b] += 1`) before relying on it, and unpin after their data is
//!   written (by then the block is changed anyway); a block found not
//!   present is filled again first. Writers never hold the gate across a
//!   fill or a sync, so the evictor never waits behind a fetch;
//! * the evictor holds it exclusively while it picks victims and clears
//!   their presence bits in memory (at most `BATCH` blocks, no I/O: FUSE
//!   event threads serve staged reads and writes under the shared gate and
//!   must never wait for a sync). After it, outside the gate, it clears them
//!   in the same-boot mirror (`diskN.live`) and in `diskN.present` (synced),
//!   and only then punches the holes. The victims sit in the in-flight
//!   table until their holes are punched, so a reader or writer that finds
//!   one missing waits for that, a fill started meanwhile never has its
//!   bytes punched away, and no bit of a victim is set again before the
//!   file says it is gone; the budget gets their room back only after the
//!   punch.
//!
//! Readers read block by block what is staged after their fills, and
//! fill again only what was evicted in between, so a read larger than the
//! limit still makes progress; reads are split into 1 MiB pieces.
//!
//! The evictor also holds the flush lock, so a flush's presence snapshot
//! (taken before its data sync) is never written after an eviction cleared
//! one of its bits; a later snapshot sees the cleared bit.
//!
//! **Crashes.** After a `kill -9` the restarted daemon trusts the file and
//! the mirror, both without the bit before the hole exists; after a power
//! cut only the file, synced before the punch. Either way an evicted block
//! reads from the backup again. A crash before the file sync leaves the
//! bit on disk and the bytes in place (nothing was punched).
//!
//! **Direct readers.** A volume with a FUSE passthrough open evicts
//! nothing until it closes (see `passthrough`).
//!
//! **Recency** is approximated by CLOCK (second chance): a referenced bit
//! per block, set by hits and fills, cleared by the sweeping hand; a block
//! is evicted when the hand finds it unreferenced.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use super::fill::Slot;
use super::stripes::Stripes;
use super::Volume;
use crate::error::{IoContext, Result};
use crate::prefetch::Class;
use crate::staging::budget::{Budget, Evictable};
use crate::staging::AtomicBitmap;

/// Blocks evicted per exclusive hold of the gate.
const BATCH: u64 = 32;

/// Blocks a readahead evicts of its own disk at a time (see
/// `Volume::evict_for_readahead`).
const READAHEAD_EVICT_BLOCKS: u64 = 8;

/// A volume's eviction state: its gate, pins and CLOCK, and the budget it
/// counts against.
pub(super) struct Eviction {
    /// Readers hold it shared around "test presence + pread", writers
    /// around "test presence + pin"; eviction holds it exclusively while
    /// it picks and clears victims.
    pub(super) gate: RwLock<()>,
    /// Writers relying on a present block (striped).
    pins: Stripes,
    /// CLOCK referenced bits (set by hits and fills).
    referenced: AtomicBitmap,
    /// CLOCK hand; also one eviction of this disk at a time.
    pub(super) clock_hand: Mutex<u64>,
    /// The staging budget this disk counts against, and its session dir.
    budget: OnceLock<(Arc<Budget>, PathBuf)>,
    /// When a readahead's eviction of this disk last freed nothing.
    barren: Mutex<Option<std::time::Instant>>,
}

impl Eviction {
    pub(super) fn new(nblocks: u64) -> Eviction {
        Eviction {
            gate: RwLock::new(()),
            pins: Stripes::new(nblocks),
            referenced: AtomicBitmap::new(nblocks),
            clock_hand: Mutex::new(0),
            budget: OnceLock::new(),
            barren: Mutex::new(None),
        }
    }
}

impl Volume {
    /// Counts this disk's staging against `budget` (the staging directory
    /// of its session, `dir`), which may then ask it to evict.
    pub fn attach_budget(self: &Arc<Self>, budget: Arc<Budget>, dir: PathBuf) {
        let staged = self.store.present.bits().count() * self.block_size;
        let me: std::sync::Weak<dyn Evictable> = Arc::downgrade(self) as _;
        budget.attach(me, dir.clone(), staged);
        let _ = self.evict.budget.set((budget, dir));
    }

    /// Stops counting this disk as served (at release).
    pub(super) fn detach_budget(&self) {
        if let Some((b, dir)) = self.evict.budget.get() {
            b.detach(dir, self.store.present.bits().count() * self.block_size);
        }
    }

    /// Takes room for block `b` before a fill writes it; the slot gives it
    /// back if the fill fails (see `complete`).
    pub(super) fn admit(&self, slot: &Slot) -> Result<()> {
        if let Some((budget, _)) = self.evict.budget.get() {
            budget.reserve(self.block_size)?;
            slot.reserved.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// [`Volume::admit`] for a fill a read waits for, which reads through
    /// if refused (see `Budget::reserve_for_read`).
    pub(super) fn admit_for_read(&self, slot: &Slot) -> Result<()> {
        if let Some((budget, _)) = self.evict.budget.get() {
            budget.reserve_for_read(self.block_size)?;
            slot.reserved.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// [`Volume::admit`] for a prefetch of class `class`: below the low
    /// watermark (see `Budget::reserve_speculative`). Readahead may evict
    /// this disk's own blocks for room (a sequential reader moves on from
    /// what it read); a profile or relocation-order prefetch evicts
    /// nothing (its earlier blocks are wanted sooner than its later ones).
    pub(super) fn admit_speculative(&self, slot: &Slot, class: Class) -> Result<()> {
        if let Some((budget, _)) = self.evict.budget.get() {
            let evict_own = |want: u64| self.evict_for_readahead(want);
            let own: Option<&dyn Fn(u64) -> u64> =
                (class == Class::Readahead && !self.own_barren()).then_some(&evict_own);
            budget.reserve_speculative(self.block_size, own)?;
            slot.reserved.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Evicts a batch of this disk's own blocks for its readahead (a
    /// batch, not one block: each eviction syncs the presence map); one
    /// that frees nothing makes the next readaheads skip eviction for
    /// `BARREN_TTL` (a scan of every block for each would be wasted).
    fn evict_for_readahead(&self, want: u64) -> u64 {
        let freed = self
            .evict_batch(want.max(READAHEAD_EVICT_BLOCKS * self.block_size))
            .unwrap_or_else(|e| {
                tracing::error!(vm = %self.vm, disk = self.index, "eviction failed: {e}");
                0
            });
        if freed == 0 {
            *self.evict.barren.lock() = Some(std::time::Instant::now());
        }
        freed
    }

    fn own_barren(&self) -> bool {
        self.evict
            .barren
            .lock()
            .is_some_and(|at| at.elapsed() < crate::staging::budget::BARREN_TTL)
    }

    /// Before this disk's profile prefetch of `bytes`: room below the low
    /// watermark (see `Budget::make_room_below_low`).
    pub fn make_room_for_prefetch(&self, bytes: u64) {
        if let Some((budget, _)) = self.evict.budget.get() {
            budget.make_room_below_low(bytes);
        }
    }

    /// After a fill ended: a failed one returns its reservation; a
    /// written one tells the budget its bytes are on the filesystem now.
    pub(super) fn settle(&self, slot: &Slot, ok: bool) {
        if slot.reserved.swap(false, Ordering::AcqRel) {
            if let Some((budget, _)) = self.evict.budget.get() {
                match ok {
                    true => budget.written(self.block_size),
                    false => budget.unreserve(self.block_size),
                }
            }
        }
    }

    /// Pins `b` if it is present: no eviction takes it until `unpin`.
    pub(super) fn pin_if_present(&self, b: u64) -> bool {
        let _g = self.evict.gate.read();
        if !self.store.present.test(b) {
            return false;
        }
        self.evict.pins.of(b).fetch_add(1, Ordering::AcqRel);
        true
    }

    pub(super) fn unpin(&self, b: u64) {
        self.evict.pins.of(b).fetch_sub(1, Ordering::AcqRel);
    }

    /// Marks `b` recently used (CLOCK).
    pub(super) fn touch(&self, b: u64) {
        if !self.evict.referenced.test(b) {
            self.evict.referenced.set(b);
        }
    }

    fn evictable(&self, b: u64, copied: Option<&crate::staging::PersistentBitmap>) -> bool {
        self.store.present.test(b)
            && !self.store.changed.test(b)
            && self.evict.pins.of(b).load(Ordering::Acquire) == 0
            && copied.is_none_or(|c| c.test(b))
    }

    /// One batch: picks victims under the exclusive gate (CLOCK), clears
    /// their bits durably, then punches their holes. Returns bytes freed.
    fn evict_batch(&self, want: u64) -> Result<u64> {
        if self.closed.load(Ordering::Acquire) || self.is_failed() || self.nblocks == 0 {
            return Ok(0);
        }
        let max = want.div_ceil(self.block_size).clamp(1, BATCH) as usize;
        let mut hand = self.evict.clock_hand.lock();
        // A direct reader reads the file itself: a hole would read as zeros.
        if self.direct_readers() > 0 {
            return Ok(0);
        }
        let _flush = self.flush_lock.lock();
        let gate = self.evict.gate.write();
        let copied = self.copied.read().clone();
        let mut victims = vec![];
        let mut slots = vec![];
        {
            let mut inflight = self.inflight.lock();
            // Two turns: the first may only clear referenced bits.
            for _ in 0..2 * self.nblocks {
                if victims.len() >= max {
                    break;
                }
                let b = *hand;
                *hand = (b + 1) % self.nblocks;
                if !self.evictable(b, copied.as_deref()) || inflight.contains_key(&b) {
                    continue;
                }
                if self.evict.referenced.clear(b) {
                    continue;
                }
                // A fill of a victim waits until its hole is punched: one
                // started earlier would have its bytes punched away.
                let slot = Slot::new(Class::OnDemand);
                inflight.insert(b, slot.clone());
                victims.push(b);
                slots.push(slot);
            }
        }
        if victims.is_empty() {
            return Ok(0);
        }
        // Bits leave memory before the gate opens: no pread of a victim
        // can start after it. The mirror and the file follow outside it;
        // if that fails nothing is punched (the bytes stay and are fetched
        // again) and the disk fails like after a failed sync.
        for &b in &victims {
            self.store.present.bits().clear(b);
        }
        drop(gate);
        let mut cleared = self.store.present.clear_many_durable(&victims);
        // After a durable cutover staging is never read again: a presence
        // map that cannot be written must not fail a disk that now lives on
        // its target. (A cutover whose commit is not durable fails the disk
        // before it switches it, so switched and not failed means durable.)
        if let (Err(e), true) = (&cleared, self.is_switched() && !self.is_failed()) {
            tracing::warn!(vm = %self.vm, disk = self.index, "staging after cutover: {e}");
            cleared = Ok(());
        }
        if cleared.is_ok() {
            self.punch(&victims);
            self.stats.evicted_blocks.add(victims.len() as u64);
        }
        // Only now is the room free: counted earlier, a fill could take it
        // while the holes are not punched yet, and staging would pass its
        // limit for a moment.
        if let Some((budget, _)) = self.evict.budget.get() {
            budget.evicted(victims.len() as u64, victims.len() as u64 * self.block_size);
        }
        {
            let mut inflight = self.inflight.lock();
            for b in &victims {
                inflight.remove(b);
            }
        }
        // Waiters find the block missing and fill it.
        for s in slots {
            s.finish(Ok(()));
        }
        cleared.map_err(|e| self.fail(e))?;
        Ok(victims.len() as u64 * self.block_size)
    }

    fn punch(&self, victims: &[u64]) {
        let _io = self.io_gate.read();
        // After `close` a later session may own these files: leave them.
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        for &b in victims {
            let (off, len) = self.block_range(b);
            if let Err(e) = self.store.data.punch_hole(off, len).ctx(|| {
                format!(
                    "punch evicted block {b} of {}",
                    self.store.data_path.display()
                )
            }) {
                // The bit is gone: the bytes are unused and fetched again.
                tracing::warn!(vm = %self.vm, disk = self.index, block = b, "{e}");
            }
        }
    }
}

impl Evictable for Volume {
    fn evict(&self, want: u64) -> Result<u64> {
        let _span = tracing::debug_span!("evict", vm = %self.vm, disk = self.index).entered();
        self.evict_batch(want)
    }

    fn unevictable_bytes(&self) -> u64 {
        self.store.changed.bits().count() * self.block_size
    }

    fn session_dir(&self) -> PathBuf {
        self.evict
            .budget
            .get()
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[path = "evict_tests.rs"]
mod tests;
