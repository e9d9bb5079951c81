//! The guest's writes (see the module doc of `volume`: lock order of
//! writes, changed bits before data): claim the fully covered blocks in
//! ascending order, fill the partly covered ones from the backup, mark the
//! blocks changed durably, revoke their "copied" state (in memory: see
//! `relocate::copy`, "Revoking a copy") and their "uploaded" state
//! (durably), then write staging.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fill::{Claim, Slot};
use super::Volume;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::prefetch::Class;

/// What a write puts in place.
#[derive(Clone, Copy)]
pub(super) enum Payload<'a> {
    Data(&'a [u8]),
    Zeroes(u64),
}

impl Payload<'_> {
    pub(super) fn len(&self) -> u64 {
        match self {
            Payload::Data(d) => d.len() as u64,
            Payload::Zeroes(n) => *n,
        }
    }
}

/// A write's claims and pins, given back when it ends however it ends: a
/// panic on the way (caught by the frontend's pool, which keeps serving)
/// must not leave readers of its blocks waiting forever.
struct Held<'a> {
    vol: &'a Volume,
    off: u64,
    owned: Vec<(u64, Arc<Slot>)>,
    pinned: Vec<u64>,
    /// The write succeeded (else its claims end as failed: readers read
    /// the block as it still is).
    ok: bool,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        for b in self.pinned.drain(..) {
            self.vol.unpin(b);
        }
        for (b, s) in self.owned.drain(..) {
            self.vol.before_complete(self.off, b);
            self.vol.complete_claim(b, &s, self.ok);
        }
    }
}

/// Counts a guest request in flight until dropped (see `guest_busy`),
/// panics included.
pub(super) struct InFlight<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> InFlight<'a> {
    pub(super) fn new(n: &'a std::sync::atomic::AtomicU32) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Volume {
    /// Writes `data` at `off` into staging; the backup is never touched.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<usize> {
        let r = self.write_payload(off, Payload::Data(data));
        self.tell_watcher(off, data.len() as u64);
        r.map(|()| data.len())
    }

    /// Tells the write watcher (see [`Volume::watch_writes`]) that the range
    /// may have changed, even after a failed write (part of it may have
    /// landed). Called holding no slot, gate or claim: the watcher may wait
    /// for the kernel, which may wait for a read the daemon serves.
    fn tell_watcher(&self, off: u64, len: u64) {
        // A zero length would drop the whole file's pages (to its end).
        if let (Some(w), true) = (self.write_watch.get(), len > 0) {
            w(off, len);
        }
    }

    /// Makes `[off, off + len)` read as zeros: holes punched in staging, no
    /// zero bytes moved, the blocks marked changed like any write.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        crate::disk::check_range("write zeroes", self.size, off, len)?;
        // Bounded pieces (a write holds claims on the blocks it covers),
        // each ending on a block boundary: a piece that split a block would
        // fetch it to keep the half it does not zero.
        let bs = self.block_size;
        let mut pos = off;
        let mut r = Ok(());
        while pos < off + len && r.is_ok() {
            let end = ((pos / bs + 64) * bs).min(off + len);
            r = self.write_payload(pos, Payload::Zeroes(end - pos));
            pos = end;
        }
        self.tell_watcher(off, len);
        r
    }

    /// Whole blocks in the range read as zeros afterwards; partial blocks
    /// keep their bytes (a discard promises nothing about them).
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        crate::disk::check_range("discard", self.size, off, len)?;
        let bs = self.block_size;
        let first = off.div_ceil(bs) * bs;
        let end = if off + len == self.size {
            self.size
        } else {
            (off + len) / bs * bs
        };
        if first < end {
            self.write_zeroes(first, end - first)?;
        }
        Ok(())
    }

    pub(super) fn write_payload(&self, off: u64, p: Payload) -> Result<()> {
        let len = p.len();
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("write past the end of disk{}", self.index),
            ));
        }
        let _span =
            tracing::trace_span!("write", vm = %self.vm, disk = self.index, offset = off).entered();
        // A failed disk takes no new bytes: they could never be made durable.
        self.check_failed()?;
        let _slot = self.enter_guest(off, len);
        let t0 = Instant::now();
        let _gate = self.write_gate.read();
        // Again: a cutover that held the gate may have failed the disk
        // (its commit not durable) while this write waited.
        self.check_failed()?;
        let inflight = InFlight::new(&self.guest_inflight);
        let r = match self.target.get() {
            // Still tracked after cutover: the changed map is what status,
            // the NBD `recoverfs:changed` context and an incremental
            // backup from the primary copy go by.
            Some(t) => self.mark_changed(self.blocks(off, len)).and_then(|()| {
                let blocks = self.blocks(off, len);
                self.announce_write(blocks.clone(), false)?;
                self.before_overwrite(blocks.clone());
                let r = match p {
                    Payload::Data(d) => t.write_all_at(d, off),
                    Payload::Zeroes(n) => t.punch_hole(off, n),
                }
                .ctx(|| format!("write relocated disk{}", self.index));
                self.end_write(blocks);
                r
            }),
            None => self.write_staging(off, p),
        };
        drop(inflight);
        self.guest_done(t0);
        if r.is_ok() {
            self.stats.writes.add(1);
            self.stats.write_bytes.add(len);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            self.modified_ns.fetch_max(now, Ordering::Relaxed);
        }
        r
    }

    /// When a guest last wrote this disk in this session, if it did.
    pub fn modified(&self) -> Option<std::time::SystemTime> {
        match self.modified_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(std::time::UNIX_EPOCH + Duration::from_nanos(ns)),
        }
    }

    /// True if a write of `len` bytes at `off` covers all of block `b`.
    pub(super) fn covers(&self, off: u64, len: u64, b: u64) -> bool {
        off <= b * self.block_size && off + len >= b * self.block_size + self.block_len(b)
    }

    pub(super) fn write_staging(&self, off: u64, data: Payload) -> Result<()> {
        let len = data.len();
        let blocks = self.blocks(off, len);
        // Partly covered blocks (the first and last at most) need their
        // backup content: start those fills now so they run in parallel.
        // Starting a fill claims nothing that depends on this write.
        let mut fills: Vec<(u64, Arc<Slot>)> = blocks
            .clone()
            .filter(|&b| !self.covers(off, len, b))
            .filter_map(|b| self.start_write_fill(b).map(|s| (b, s)))
            .collect();
        let mut held = Held {
            vol: self,
            off,
            owned: vec![],
            pinned: vec![],
            ok: false,
        };
        let r = self
            .claim_in_order(
                blocks.clone(),
                off,
                len,
                &mut fills,
                &mut held.owned,
                &mut held.pinned,
            )
            .and_then(|_| self.write_claimed(blocks, off, data));
        held.ok = r.is_ok();
        drop(held);
        r
    }

    /// In ascending block order, waits for each partly covered block to be
    /// filled and claims each fully covered one (readers then wait for this
    /// write instead of fetching the old content). A block is only ever
    /// waited on while this write holds claims on lower blocks alone, so
    /// overlapping writes cannot wait on each other in a cycle. Blocks
    /// found present are pinned (`pinned`) so no eviction takes them
    /// before this write marked them changed.
    pub(super) fn claim_in_order(
        &self,
        blocks: std::ops::Range<u64>,
        off: u64,
        len: u64,
        fills: &mut Vec<(u64, Arc<Slot>)>,
        owned: &mut Vec<(u64, Arc<Slot>)>,
        pinned: &mut Vec<u64>,
    ) -> Result<()> {
        for b in blocks {
            if self.covers(off, len, b) {
                loop {
                    match self.claim(b, Class::OnDemand) {
                        Claim::Present => {
                            if self.pin_if_present(b) {
                                pinned.push(b);
                                break;
                            }
                            // Evicted since the claim saw it: claim again.
                        }
                        Claim::Owner(s) => {
                            owned.push((b, s.clone()));
                            // Its data lands in staging: room first.
                            self.admit(&s)?;
                            break;
                        }
                        // A fill (perhaps a queued prefetch) is under way:
                        // this write waits for it, so make it urgent. Its
                        // outcome does not matter: the write replaces it all.
                        Claim::Wait(s) => {
                            s.promote(&self.sched, Class::OnDemand);
                            let _ = s.wait();
                        }
                    }
                }
                self.after_claim(off, b);
                continue;
            }
            if let Some(i) = fills.iter().position(|(fb, _)| *fb == b) {
                fills.swap_remove(i).1.wait()?;
            }
            // The slot may have been another write's claim that failed, or
            // the block may be evicted again before it is pinned.
            loop {
                while let Some(s) = self.start_write_fill(b) {
                    s.wait()?;
                }
                if self.pin_if_present(b) {
                    pinned.push(b);
                    break;
                }
            }
            self.after_claim(off, b);
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn after_claim(&self, off: u64, b: u64) {
        let hook = self.claim_hook.lock().clone();
        if let Some(h) = hook {
            h(off, b);
        }
    }

    #[cfg(not(test))]
    pub(super) fn after_claim(&self, _off: u64, _b: u64) {}

    #[cfg(test)]
    fn before_complete(&self, off: u64, b: u64) {
        let hook = self.complete_hook.lock().clone();
        if let Some(h) = hook {
            h(off, b);
        }
    }

    #[cfg(not(test))]
    fn before_complete(&self, _off: u64, _b: u64) {}

    /// Changed bits are durable before the data can be: the map may
    /// over-report after a crash, never under-report. So are the bits of
    /// the dirty-since-backup maps (see `freeze`).
    /// Each map costs at most one write and one sync for the whole range,
    /// shared with concurrent writers (group commit, see `staging::bitmap`).
    pub(super) fn mark_changed(&self, blocks: std::ops::Range<u64>) -> Result<()> {
        self.store
            .changed
            .set_many_durable(blocks.clone())
            .map_err(|e| self.fail(e))?;
        self.mark_dirty(blocks).map_err(|e| self.fail(e))
    }

    pub(super) fn write_claimed(
        &self,
        blocks: std::ops::Range<u64>,
        off: u64,
        data: Payload,
    ) -> Result<()> {
        self.mark_changed(blocks.clone())?;
        self.announce_write(blocks.clone(), true)?;
        // A running backup's frozen blocks keep their freeze-time bytes.
        self.before_overwrite(blocks.clone());
        let r = match data {
            Payload::Data(d) => self.staging_write(d, off),
            Payload::Zeroes(n) => self.staging_zero(off, n),
        };
        self.end_write(blocks);
        r
    }

    /// Announces a write before its data lands, then revokes the blocks'
    /// "copied" status (in memory only: the changed bit, durable before
    /// this, makes a reopened relocation copy the block again, see
    /// `relocate::copy`) and their upload entries (durably): pairs with the
    /// copier's and the uploader's set-then-recheck (`mark_copied`,
    /// `mark_uploaded`). On failure every announced block is ended again.
    pub(super) fn announce_write(
        &self,
        blocks: std::ops::Range<u64>,
        revoke_copies: bool,
    ) -> Result<()> {
        for b in blocks.clone() {
            self.writes_started.of(b).fetch_add(1, Ordering::SeqCst);
        }
        if revoke_copies {
            // The announce before the test, as `mark_copied` sets before
            // it rechecks: one of the two sides sees the other. The map is
            // looked up after the announce too: looked up before, a
            // relocation that began in between would copy the block with
            // this write unseen (its stamp unchanged) and never be revoked.
            fence(Ordering::SeqCst);
            if let Some(c) = self.copied.read().clone() {
                for b in blocks.clone() {
                    if c.bits().clear(b) {
                        self.copies_revoked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Err(e) = self.invalidate_uploaded(blocks.clone()) {
            self.end_write(blocks);
            return Err(self.fail(e));
        }
        Ok(())
    }

    pub(super) fn end_write(&self, blocks: std::ops::Range<u64>) {
        for b in blocks {
            self.writes_finished.of(b).fetch_add(1, Ordering::SeqCst);
        }
    }
}
