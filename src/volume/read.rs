//! The guest's reads (see the module doc of `volume` for the data flow):
//! a run of staged blocks is one `pread`; a block whose fetch is under way
//! or just done is answered from the fetched bytes; anything else is
//! claimed and fetched first (one fetch per block, `fetch`), and a read
//! within one fetched block is a slice of its bytes, not a copy.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::fill::Slot;
use super::Volume;
use crate::disk::{ReadDone, Spawner};
use crate::error::{IoContext, Result};
use crate::prefetch::stream::Geometry;
use crate::prefetch::Class;
use crate::repo::ChunkIndex;

impl Volume {
    /// A guest read of `len` bytes at `off`, short at the end of the disk.
    pub fn read(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        self.read_bytes(off, len).map(Vec::from)
    }

    /// [`Volume::read`] without a copy where it can: a read within one
    /// block that a fetch just brought is a slice of the fetched bytes
    /// (frontends reply from it directly).
    pub fn read_bytes(&self, off: u64, len: usize) -> Result<Bytes> {
        let len = (len as u64).min(self.size.saturating_sub(off));
        let _span =
            tracing::trace_span!("read", vm = %self.vm, disk = self.index, offset = off).entered();
        let _slot = self.enter_guest(off, len);
        let t0 = Instant::now();
        self.guest_inflight.fetch_add(1, Ordering::AcqRel);
        let r = match self.target.get() {
            Some(t) => {
                let mut buf = Vec::new();
                t.read_append(&mut buf, len as usize, off)
                    .ctx(|| format!("read relocated disk{}", self.index))
                    .map(|_| (Bytes::from(buf), true))
            }
            None => {
                self.observe_guest_read(off, len);
                self.read_source(off, len, Class::OnDemand)
            }
        };
        self.end_guest_read(t0, len, &r);
        r.map(|(buf, _)| buf)
    }

    /// Ends a guest read begun at `t0`: its latency, and its counters if it
    /// succeeded.
    fn end_guest_read(&self, t0: Instant, len: u64, r: &Result<(Bytes, bool)>) {
        self.guest_inflight.fetch_sub(1, Ordering::AcqRel);
        self.guest_done(t0);
        if let Ok((_, hit)) = r {
            self.stats.reads.add(1);
            self.stats.read_bytes.add(len);
            if *hit {
                self.stats.read_hits.add(1);
            }
        }
    }

    /// [`Volume::read_bytes`] for a read that must wait for a fetch,
    /// without a thread waiting with it: a read within one block with
    /// backup data not staged registers `done` on that block's fill and
    /// returns at once; whoever ends the fill (a fetch engine CPU thread)
    /// answers it with a slice of the fetched bytes. Every other read
    /// (local, spanning blocks, relocated, or finding no free slot in its
    /// export point's queue, where it would have to wait) gets `done` back
    /// for the blocking path. When the fill leaves no bytes to answer from
    /// (a guest write claimed the block first), or the block turned out
    /// staged meanwhile, the answer is read by `spawn`, which may wait.
    pub fn read_later(
        &self,
        off: u64,
        len: usize,
        done: ReadDone,
        spawn: &Spawner,
    ) -> std::result::Result<(), ReadDone> {
        let len = (len as u64).min(self.size.saturating_sub(off));
        let b = off / self.block_size;
        let one_block = len > 0 && (off + len - 1) / self.block_size == b;
        if !one_block
            || self.target.get().is_some()
            || !self.chunks.has_data(b)
            || self.store.present.test(b)
        {
            return Err(done);
        }
        let ticket = match self.io.get() {
            Some(q) => match q.try_enter(crate::placement::IoClass::Sync, len) {
                Some(t) => Some(t),
                None => return Err(done),
            },
            None => None,
        };
        let Some(me) = self.me.upgrade() else {
            return Err(done);
        };
        let _span =
            tracing::trace_span!("read", vm = %self.vm, disk = self.index, offset = off).entered();
        self.guest_inflight.fetch_add(1, Ordering::AcqRel);
        let read = LaterRead {
            vol: me,
            t0: Instant::now(),
            off,
            len,
            ticket,
            done: Some(done),
        };
        self.stats.later_reads.add(1);
        self.observe_guest_read(off, len);
        let Some(slot) = self.start_read_fill(b, Class::OnDemand) else {
            spawn(read.on_pool());
            return Ok(());
        };
        let spawn = spawn.clone();
        let fill = slot.clone();
        slot.when_data(Box::new(move || {
            let start = (off - b * read.vol.block_size) as usize;
            if let Some(d) = fill.data.get() {
                return read.answer(Ok((d.slice(start..start + len as usize), false)));
            }
            match fill.outcome().expect("no bytes: the fill ended") {
                // A write's fill this read joined was refused room: the
                // general path fills (reads through) for itself.
                Err(e) if is_room_refusal(&e) => spawn(read.on_pool()),
                Err(e) => read.answer(Err(e)),
                Ok(()) => spawn(read.on_pool()),
            }
        }));
        Ok(())
    }

    /// Records the read for the profile and feeds the sequential-stream
    /// detector, which may start readahead.
    pub(super) fn observe_guest_read(&self, off: u64, len: u64) {
        let blocks = self.blocks(off, len);
        self.tracker.on_read(blocks.clone(), |b| {
            self.store.present.test(b) || !self.chunks.has_data(b)
        });
        let g = Geometry {
            block_size: self.block_size,
            nblocks: self.nblocks,
            fetch_latency: self.sched.fetch_latency(),
        };
        if let Some(ahead) = self.streams.on_read(blocks, len, g, Instant::now()) {
            for b in ahead {
                self.prefetch_block(b, Class::Readahead);
            }
        }
    }

    /// Reads what the VM sees from backup plus staging, fetching missing
    /// blocks at priority `class`. Returns the data and whether no fetch
    /// was needed.
    pub(crate) fn read_source(&self, off: u64, len: u64, class: Class) -> Result<(Bytes, bool)> {
        // In pieces of at most 1 MiB (one block at least): with bounded
        // staging, a piece's blocks must all be staged at once, and a whole
        // large read might not fit (see `evict`). Each piece lands in place.
        let piece = (1u64 << 20).max(self.block_size);
        if let Some(r) = self.read_all_staged(off, len) {
            return r;
        }
        if let Some(r) = self.read_fetched_block(off, len, class) {
            return r;
        }
        let mut buf = Vec::with_capacity(len as usize);
        let mut hit = true;
        let mut pos = off;
        while pos < off + len {
            let end = ((pos / piece + 1) * piece).min(off + len);
            hit &= self.read_piece(pos, end - pos, class, &mut buf)?;
            pos = end;
        }
        Ok((Bytes::from(buf), hit))
    }

    /// A read whose blocks are all staged (a hit): one staging read into
    /// a buffer that is not zero-filled first. `None` if a block is not.
    pub(super) fn read_all_staged(&self, off: u64, len: u64) -> Option<Result<(Bytes, bool)>> {
        // Presence and the read under the gate: no eviction in between.
        let _gate = self.evict.gate.read();
        let blocks = self.blocks(off, len);
        if !blocks.clone().all(|b| self.store.present.test(b)) {
            return None;
        }
        blocks.for_each(|b| self.touch(b));
        self.stats.staging_reads.add(1);
        let mut buf = Vec::new();
        let r = self
            .store
            .data
            .read_append(&mut buf, len as usize, off)
            .ctx(|| format!("read staging {}", self.store.data_path.display()));
        Some(r.map(|()| (Bytes::from(buf), true)))
    }

    /// A read within one block with backup data that is neither staged
    /// nor local: waits for its fetch and answers with a slice of the
    /// fetched bytes, no copy. `None` when the read is not of that kind,
    /// or the block's fill left no bytes (a write's claim, a fetch that
    /// ended before this read joined it): then the general path reads it.
    pub(super) fn read_fetched_block(
        &self,
        off: u64,
        len: u64,
        class: Class,
    ) -> Option<Result<(Bytes, bool)>> {
        let blocks = self.blocks(off, len);
        if blocks.end - blocks.start != 1 || !self.chunks.has_data(blocks.start) {
            return None;
        }
        let b = blocks.start;
        let s = self.start_read_fill(b, class)?;
        let data = match s.wait_data() {
            Ok(d) => d?,
            Err(e) if is_room_refusal(&e) => return None,
            Err(e) => return Some(Err(e)),
        };
        let start = (off - b * self.block_size) as usize;
        Some(Ok((data.slice(start..start + len as usize), false)))
    }

    /// Appends `[off, off + len)` to `out`; true if no fetch was needed.
    /// Blocks a fetch handed its bytes for are copied from memory; the
    /// rest are read from staging under the eviction gate.
    pub(super) fn read_piece(
        &self,
        off: u64,
        len: u64,
        class: Class,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        let base = out.len();
        let mut todo: Vec<u64> = self.blocks(off, len).collect();
        let mut hit = true;
        let mut laid_out = false;
        let mut refusals = 0;
        loop {
            // Start every missing fetch first so a multi-block read fetches in parallel.
            let slots: Vec<(u64, Arc<Slot>)> = todo
                .iter()
                .filter(|&&b| self.chunks.has_data(b))
                .filter_map(|&b| self.start_read_fill(b, class).map(|s| (b, s)))
                .collect();
            hit &= slots.is_empty();
            match Self::wait_fills(slots.iter().map(|(_, s)| s)) {
                // A write's fill this read joined was refused room: its
                // block is still missing, and the next round's fill is
                // this read's own, which reads through.
                Err(e) if is_room_refusal(&e) && refusals < MAX_ROOM_REFUSALS => refusals += 1,
                r => r?,
            }
            let fetched = |b: u64| {
                slots
                    .iter()
                    .find(|(sb, _)| *sb == b)
                    .and_then(|(_, s)| s.data.get())
            };
            for &b in &todo {
                let (s, e) = self.block_range_in(b, off, len);
                let src = fetched(b)
                    .map(|d| &d[(s - b * self.block_size) as usize..][..(e - s) as usize]);
                match (laid_out, src) {
                    // First round: lay the piece out in block order; the
                    // zeros stay only for a zero chunk not staged.
                    (false, Some(d)) => out.extend_from_slice(d),
                    (false, None) => out.resize(out.len() + (e - s) as usize, 0),
                    (true, Some(d)) => {
                        out[base + (s - off) as usize..][..d.len()].copy_from_slice(d)
                    }
                    (true, None) => {}
                }
            }
            laid_out = true;
            todo.retain(|&b| fetched(b).is_none());
            if todo.is_empty() {
                return Ok(hit);
            }
            // Never held while waiting for a fill (see `evict`).
            let _gate = self.evict.gate.read();
            todo = self.read_staged(&todo, off, &mut out[base..])?;
            if todo.is_empty() {
                return Ok(hit);
            }
            // Evicted after their fill: fill them again (the blocks read
            // so far stay read, so each round makes progress).
            self.stats.refills.add(1);
        }
    }

    /// Block `b`'s bytes within `[off, off + len)`, as disk offsets.
    pub(super) fn block_range_in(&self, b: u64, off: u64, len: u64) -> (u64, u64) {
        let s = (b * self.block_size).max(off);
        let e = ((b + 1) * self.block_size).min(off + len);
        (s, e)
    }

    /// Copies the staged blocks of `blocks` (ascending) into `buf` (which
    /// holds `[off, off + buf.len())`); a zero chunk not staged stays
    /// zeros. Returns the blocks with backup data that are not staged. The
    /// caller holds the eviction gate.
    pub(super) fn read_staged(&self, blocks: &[u64], off: u64, buf: &mut [u8]) -> Result<Vec<u64>> {
        let end = off + buf.len() as u64;
        let mut missing = vec![];
        let mut run: Option<(u64, u64)> = None; // staged byte range to read
        for &b in blocks {
            let s = (b * self.block_size).max(off);
            let e = ((b + 1) * self.block_size).min(end);
            if !self.store.present.test(b) {
                if self.chunks.has_data(b) {
                    missing.push(b);
                }
                continue;
            }
            self.touch(b);
            run = match run {
                Some((rs, re)) if re == s => Some((rs, e)),
                Some(r) => {
                    self.pread_into(buf, off, r)?;
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some(r) = run {
            self.pread_into(buf, off, r)?;
        }
        Ok(missing)
    }

    /// Reads disk bytes for the daemon itself (e.g. to find filesystem
    /// metadata), fetching at priority `class`; not counted as guest I/O.
    pub fn read_internal(&self, off: u64, buf: &mut [u8], class: Class) -> Result<()> {
        let (data, _) = self.read_source(off, buf.len() as u64, class)?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(())
    }

    /// The backup's chunk per block (`None`: all zeros).
    pub fn chunks(&self) -> &ChunkIndex {
        &self.chunks
    }

    pub(super) fn pread_into(&self, buf: &mut [u8], base: u64, (s, e): (u64, u64)) -> Result<()> {
        let dst = &mut buf[(s - base) as usize..(e - base) as usize];
        self.stats.staging_reads.add(1);
        self.store
            .data
            .read_exact_at(dst, s)
            .ctx(|| format!("read staging {}", self.store.data_path.display()))
    }
}

/// Rounds a read tries again after joining fills refused room in staging
/// (each such fill was a write's; a read's own fill reads through, so one
/// round is enough unless new writes' fills keep being refused).
const MAX_ROOM_REFUSALS: u32 = 8;

/// A fill ended with no bytes because staging had no room for it: a
/// write's fill, which never reads through (a prefetch held back ends
/// `Ok` with no bytes, and its joiners plan again anyway).
fn is_room_refusal(e: &crate::error::Error) -> bool {
    e.kind() == crate::error::ErrorKind::NoSpace
}

/// A read answered later (`Volume::read_later`), until it is answered:
/// counted among the guest requests in flight (the relocation copier
/// yields to them) and holding its place in the export point's queue.
/// Dropped unanswered (a runtime shutting down drops the job holding it),
/// it leaves the count all the same.
struct LaterRead {
    vol: Arc<Volume>,
    t0: Instant,
    off: u64,
    len: u64,
    ticket: Option<crate::placement::queue::Ticket>,
    done: Option<ReadDone>,
}

impl LaterRead {
    fn answer(mut self, r: Result<(Bytes, bool)>) {
        self.vol.end_guest_read(self.t0, self.len, &r);
        self.ticket = None;
        let done = self.done.take().expect("answered once");
        done(r.map(|(buf, _)| buf));
    }

    /// The general path, as a job for the pool (it may wait for another
    /// fill). The queue place is given back now and taken again by the
    /// job: held across the handoff, it could wait for a pool thread that
    /// itself waits for a place (FUSE's pool is fixed).
    fn on_pool(mut self) -> Box<dyn FnOnce() + Send> {
        self.ticket = None;
        Box::new(move || {
            let r = {
                let _slot = self.vol.enter_guest(self.off, self.len);
                self.vol.read_source(self.off, self.len, Class::OnDemand)
            };
            self.answer(r)
        })
    }
}

impl Drop for LaterRead {
    fn drop(&mut self) {
        if self.done.is_some() {
            self.vol.guest_inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
