//! The copier's passes: a walk of each disk by runs (copied blocks skipped
//! a bitmap word at a time, a stretch of holes taken whole), a pipeline of
//! block reads, and batch commits that record copies only after the bytes
//! they vouch for are durable.
//!
//! **Pipeline.** One copier thread per relocation walks the disk and keeps
//! up to [`WINDOW_BLOCKS`] blocks (and [`WINDOW_BYTES`]) read ahead of the
//! one it writes: reads of blocks not staged are the fetch engine's
//! relocation-class jobs (behind every on-demand fetch, within the
//! background limit), fetched in parallel and not staged (see
//! `Volume::start_copy_read`). The copier writes each block to the target
//! in walk order as its read completes.
//!
//! **Target writes are buffered**, on purpose (measured for issue 16, 1 GiB
//! of incompressible data, 2 cores): O_DIRECT writes of 8 MiB gathered in
//! aligned buffers on a writer thread were no faster (one disk: 712 vs
//! 766 MB/s, median of 4 interleaved rounds; target on another device:
//! 1191 vs 1239) and used as much CPU: the fetched chunk's buffer is not
//! aligned, so the copy into the aligned buffer costs what the page-cache
//! copy did, and ext4 converts the direct writes' unwritten extents on a
//! workqueue. Only a fetch reading into aligned buffers (no copy at all)
//! could change that.
//!
//! **Batches.** Written blocks go into a batch; a full batch
//! ([`BATCH_BYTES`] of data, [`BATCH_BLOCKS`] blocks with holes, or
//! [`BATCH_AGE`] old) goes to this pass's committer thread, which syncs the
//! target, then records the batch in the copied map, while the copier
//! fills the next batch (staging is not synced: see "Revoking a copy"). One batch commits at a time; the copier waits if the next is
//! full first.
//!
//! **Guest writes racing a copy** are caught by the write stamp, taken
//! before the block's read starts and checked when its bit is set (after
//! the syncs): a write that began since leaves the block not copied, and a
//! write that begins after the bit is set clears it (in memory). A batch in
//! flight changes nothing there: the stamp check happens at the commit,
//! however late.
//!
//! **Revoking a copy.** A guest write to a block marked copied clears the
//! bit in memory only, before its data lands (the copier's set-then-recheck
//! stamp protocol, `Volume::mark_copied`, is unchanged); the file may go on
//! vouching for the block, until a commit rewrites its word, or forever if
//! the daemon stops first. A durable clear cost a read, a write and a sync
//! of the map per guest write to a copied block, on the guest's write path
//! (the write p99 while a relocation runs, docs/benchmarks.md). It is not
//! needed, because of the **restart rule**: whenever a relocation's state is
//! opened, every block that is both changed and copied is taken as not
//! copied (`Volume::forget_copies_of_changed`), so it is copied again, from
//! staging. That covers every block a file bit could vouch for wrongly: a
//! block whose target copy differs from what the reopened volume reads was
//! written by the guest at some point (the copier records a copy only once
//! the target is synced, so an unchanged block reads the backup's bytes on
//! both sides), and every guest write,
//! on every path (FUSE, NFS, NBD write, write-zeroes, trim, partial blocks:
//! all pass `Volume::write_payload`), makes the block's changed bit durable
//! before any of its data can land. The changed map is never cleared. So:
//! * a commit's snapshot of a word may hold a bit a guest write cleared in
//!   memory just after: the file vouches wrongly, the block is changed, the
//!   rule forgets it;
//! * for the same reason a commit no longer syncs staging first (it did,
//!   for batches holding a changed block, so a copied changed block could
//!   not lose its staged bytes): after a crash no changed block is trusted
//!   as copied, whatever staging kept. One fsync of staging less per batch
//!   while the guest writes, competing with the guest's own I/O;
//! * resume of a paused relocation in the same daemon goes by memory; a
//!   paused relocation reopened after a restart gets the rule like any;
//! * the rule is applied after the map is installed on the volume (and a
//!   fence), never before: a relocation reopened in a running daemon
//!   (`relocate --resume` of one a restart could not reopen) races the
//!   guest's writes, and a write between the rule and the install would
//!   stay trusted as copied (see `Relocation::open_in`);
//! * a forgotten block that is a hole (a zero block written, its staged
//!   bytes lost) is punched on the resumed target before it is recorded
//!   (`take_holes`: a reopened target is never `fresh`);
//! * eviction takes only unchanged blocks, which the rule never touches;
//! * cutover: the final pass runs with writes paused, so every bit is set
//!   in memory and the target synced before the commit; a crash before the
//!   commit reopens with the rule, after it the copied map is not read.
//!
//! The rule is applied on every open, not only after a stop that was not
//! clean: a clean-shutdown marker would have to be removed durably before
//! the first revoke after each open and written only once no guest write
//! can come, one more state to get wrong at 3 a.m. The cost is copying the
//! guest's changed blocks once more after a daemon restart, from local
//! staging: bounded by what the guest wrote, which a relocation copies at
//! least once anyway, and restarts are rare.
//!
//! **Stopping** (cancel or pause) abandons the reads in flight (a fetch
//! still completes for any reader that joined it), commits the blocks
//! already written, and ends the pass: nothing half-done is recorded.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Relocation;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::placement::queue::Ticket;
use crate::placement::IoClass;
use crate::repo::chunk::is_zero;
use crate::volume::{CopyRead, Volume};

/// Blocks read ahead of the one being written, at most...
const WINDOW_BLOCKS: usize = 64;
/// ...and their bytes: enough to cover a repository round trip at disk
/// speed, little enough to stay a small share of the daemon's memory.
const WINDOW_BYTES: u64 = 32 << 20;
/// A batch commits once it holds this many bytes of data...
pub(super) const BATCH_BYTES: u64 = 32 << 20;
/// ...or this many blocks, holes included (a run of holes costs one sync
/// however long, and is recorded as soon as it is taken)...
pub(super) const BATCH_BLOCKS: u64 = 1024;
/// ...or once its first block is this old (a slow, rate-limited copy still
/// shows progress and loses little to a crash).
pub(super) const BATCH_AGE: Duration = Duration::from_millis(200);

/// Copies waiting for their commit: blocks with the write stamp seen
/// before their read, and runs of holes.
#[derive(Default)]
pub(super) struct Batch {
    blocks: Vec<(u64, u32)>,
    holes: Vec<Range<u64>>,
    /// Data bytes written to the target.
    bytes: u64,
    since: Option<Instant>,
}

impl Batch {
    /// Blocks in the batch, holes included.
    fn blocks(&self) -> u64 {
        self.blocks.len() as u64 + self.holes.iter().map(|r| r.end - r.start).sum::<u64>()
    }

    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.holes.is_empty()
    }

    fn is_due(&self) -> bool {
        self.bytes >= BATCH_BYTES
            || self.blocks() >= BATCH_BLOCKS
            || self.since.is_some_and(|t| t.elapsed() >= BATCH_AGE)
    }

    fn started(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }
}

/// A block whose read is under way.
struct InFlight {
    b: u64,
    stamp: u32,
    read: CopyRead,
    /// The export point's async slot it holds until written.
    _ticket: Option<Ticket>,
    len: u64,
}

/// One pass's walk of one disk.
struct Walk<'a> {
    i: usize,
    d: &'a Arc<Volume>,
    final_pass: bool,
    window: VecDeque<InFlight>,
    window_bytes: u64,
    batch: Batch,
    commits: &'a SyncSender<Batch>,
}

impl Relocation {
    /// One pass over disk `i` in ascending order; `final_pass` runs with
    /// writes paused. Returns false if stopped (cancelled or paused) before
    /// the end. What was written is committed before it returns, on
    /// success or error alike.
    pub(super) fn copy_pass(self: &Arc<Self>, i: usize, final_pass: bool) -> Result<bool> {
        std::thread::scope(|scope| {
            // Rendezvous: the copier hands a batch over only when the
            // committer is free, so at most one waits behind the one
            // being committed.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(0);
            let committer = std::thread::Builder::new()
                .name(format!("relocate-{}-sync", self.vm))
                .spawn_scoped(scope, move || -> Result<()> {
                    for mut batch in rx {
                        self.commit(i, &mut batch)?;
                    }
                    Ok(())
                })
                .ctx(|| "start the relocation committer thread".to_string())?;
            let mut w = Walk {
                i,
                d: &self.disks[i],
                final_pass,
                window: VecDeque::new(),
                window_bytes: 0,
                batch: Batch::default(),
                commits: &tx,
            };
            let walked = self.walk(&mut w);
            // Abandon the reads not written (nothing recorded for them);
            // commit the blocks that were.
            let last = std::mem::take(&mut w.batch);
            drop(w);
            let handed = if last.is_empty() {
                Ok(())
            } else {
                tx.send(last).map_err(|_| committer_gone())
            };
            drop(tx);
            let committed = match committer.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            };
            // The committer's own error says more than "it is gone".
            committed?;
            handed?;
            walked
        })
    }

    /// Stop copying now: cancelled, or (outside the final pass) paused.
    pub(super) fn interrupted(&self, final_pass: bool) -> bool {
        self.cancel.load(Ordering::Acquire) || (!final_pass && self.pause_requested())
    }

    fn walk(&self, w: &mut Walk) -> Result<bool> {
        let (c, n) = (&self.copied[w.i], w.d.nblocks());
        let mut b = 0;
        loop {
            if self.interrupted(w.final_pass) {
                return Ok(false);
            }
            // Write whatever finished, in walk order.
            while w.window.front().is_some_and(|f| f.read.is_ready()) {
                self.write_next(w)?;
            }
            if w.batch.is_due() {
                self.hand_over(w)?;
            }
            if b < n {
                b = c.bits().next_clear(b, n);
            }
            if b >= n {
                if w.window.is_empty() {
                    return Ok(true);
                }
                self.write_next(w)?;
                continue;
            }
            let data = w.d.next_non_hole(b, n);
            if data > b {
                let end = c.bits().next_set(b, data);
                self.take_holes(w.i, b..end, &mut w.batch)?;
                w.batch.started();
                b = end;
                continue;
            }
            let len = w.d.block_range(b).1;
            if w.window.len() >= WINDOW_BLOCKS || w.window_bytes + len > WINDOW_BYTES.max(len) {
                self.write_next(w)?;
                continue;
            }
            let ticket = if w.final_pass {
                None
            } else {
                self.yield_to_guest(w.d);
                match self.async_slot(w.d, len, w.window.is_empty()) {
                    Some(t) => t,
                    // The point is busy: finish a read of ours first (it
                    // frees one of our slots), never wait holding them.
                    None => {
                        self.write_next(w)?;
                        continue;
                    }
                }
            };
            match w.d.write_stamp(b) {
                None => {
                    // A guest write is in progress: the next pass copies it.
                    self.copies_lost.fetch_add(1, Ordering::Relaxed);
                }
                Some(stamp) => {
                    let read = w.d.start_copy_read(b);
                    w.window.push_back(InFlight {
                        b,
                        stamp,
                        read,
                        _ticket: ticket,
                        len,
                    });
                    w.window_bytes += len;
                    if !w.final_pass {
                        self.throttle(len);
                    }
                }
            }
            b += 1;
        }
    }

    /// An async slot of the disk's export point for a copy of `len` bytes
    /// (`Some(None)` without a point); waits for it only when the copier
    /// holds none (`wait`), else `None` if none is free now.
    fn async_slot(&self, d: &Volume, len: u64, wait: bool) -> Option<Option<Ticket>> {
        let Some(q) = d.queue() else {
            return Some(None);
        };
        if wait {
            Some(Some(q.enter(IoClass::Async, len)))
        } else {
            q.try_enter(IoClass::Async, len).map(Some)
        }
    }

    /// Writes the oldest block in flight to the target (waiting for its
    /// read) and adds it to the batch.
    fn write_next(&self, w: &mut Walk) -> Result<()> {
        let f = w.window.pop_front().expect("a block in flight");
        w.window_bytes -= f.len;
        let staged = w.d.is_staged(f.b);
        let data = w.d.finish_copy_read(f.b, f.read).inspect_err(|e| {
            // Damage (`Corrupt`) fails the relocation, and so does an I/O
            // error of staging (its disk failing); the repository not
            // answering for a block not staged is an outage.
            if e.kind() == crate::error::ErrorKind::Io && !staged {
                self.source_unreachable.store(true, Ordering::Release);
            }
        })?;
        let t = &self.targets[w.i];
        let off = f.b * w.d.block_size();
        if is_zero(&data) {
            t.punch_hole(off, f.len)
                .ctx(|| format!("zero a block of {}", self.target_file(w.d).display()))?;
        } else {
            t.write_all_at(&data, off)
                .ctx(|| format!("write {}", self.target_file(w.d).display()))?;
        }
        self.bytes_copied.fetch_add(f.len, Ordering::Relaxed);
        self.outage_over();
        w.batch.blocks.push((f.b, f.stamp));
        w.batch.bytes += f.len;
        w.batch.started();
        if !w.final_pass {
            self.check_progress();
        }
        Ok(())
    }

    /// Disk `d`'s target file, for messages.
    fn target_file(&self, d: &Volume) -> std::path::PathBuf {
        super::target_file_of(&self.target_dir, d)
    }

    /// Hands the batch to the committer (waiting while it commits the one
    /// before).
    fn hand_over(&self, w: &mut Walk) -> Result<()> {
        let batch = std::mem::take(&mut w.batch);
        w.commits.send(batch).map_err(|_| committer_gone())
    }

    /// Adds the holes `run` (no data in the backup, never written) to the
    /// batch: they move no bytes and cost no rate. The target must read
    /// zeros there before their bits are set: a target this daemon emptied
    /// does (it was truncated and sized, durably, and the copier only ever
    /// writes blocks with data, which never turn back into holes); a
    /// resumed target may hold bytes an earlier daemon copied there before
    /// a crash took the staged write away, so the run is punched first.
    fn take_holes(&self, i: usize, run: Range<u64>, batch: &mut Batch) -> Result<()> {
        let d = &self.disks[i];
        if !self.fresh {
            let off = d.block_range(run.start).0;
            let end = (run.end * d.block_size()).min(d.size);
            self.targets[i]
                .punch_hole(off, end - off)
                .ctx(|| format!("zero holes of {}", self.target_dir.display()))?;
        }
        batch.holes.push(run);
        Ok(())
    }

    /// Syncs the target, then records the batch as copied: a copied bit
    /// never claims bytes a crash could take from the target. Staging is not
    /// synced: a changed block's copied bit is forgotten whenever the state
    /// is opened (the restart rule above), so it is copied again from what
    /// staging kept. Only the bitmap words the batch touched are written, so
    /// a run of a million holes costs one sync.
    fn commit(&self, i: usize, batch: &mut Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (d, c) = (&self.disks[i], &self.copied[i]);
        #[cfg(test)]
        {
            let hook = self.commit_hook.lock().clone();
            if let Some(h) = hook {
                let blocks: Vec<u64> = batch.blocks.iter().map(|&(b, _)| b).collect();
                h(i, &blocks);
            }
        }
        self.targets[i]
            .sync_data()
            .ctx(|| format!("fsync relocation target disk{i}"))?;
        let mut touched: Vec<Range<u64>> = vec![];
        for (b, stamp) in batch.blocks.drain(..) {
            self.count_mark(d.mark_copied(c, b, stamp));
            touched.push(b..b + 1);
        }
        for run in batch.holes.drain(..) {
            // Stamp, then check it is still a hole, then set and recheck
            // (`mark_copied`): a guest write either holds the block's
            // claim or made it present before `is_hole` looked (it tests
            // both), or is seen by the recheck, or sees the bit and
            // revokes it.
            for b in run.clone() {
                match d.write_stamp(b) {
                    Some(stamp) if d.is_hole(b) => self.count_mark(d.mark_copied(c, b, stamp)),
                    Some(_) => {} // written meanwhile: copied as data next pass
                    None => self.count_mark(false),
                }
            }
            touched.push(run);
        }
        touched.sort_by_key(|r| r.start);
        c.persist_bits(&touched)
    }

    fn count_mark(&self, marked: bool) {
        if marked {
            self.blocks_marked.fetch_add(1, Ordering::Relaxed);
        } else {
            self.copies_lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn committer_gone() -> Error {
    Error::new(ErrorKind::Io, "the relocation's committer thread stopped")
}
