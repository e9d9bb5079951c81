//! The copier's passes: a walk of each disk by runs (copied blocks skipped
//! a bitmap word at a time, a stretch of holes taken whole), the copy of
//! each block with data, and the batch commit that records copies only
//! after the bytes they vouch for are durable on both sides.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Relocation, BATCH};
use crate::error::{IoContext, Result};
use crate::placement::IoClass;
use crate::repo::chunk::is_zero;
use crate::staging::io::BlockFile;
use crate::volume::Volume;

/// Copies waiting for their commit: blocks with the write stamp seen
/// before their read, and runs of holes.
#[derive(Default)]
struct Batch {
    blocks: Vec<(u64, u32)>,
    holes: Vec<Range<u64>>,
}

impl Batch {
    /// Blocks in the batch, holes included: a batch is committed once it
    /// holds `BATCH` of them, so a long run of holes is recorded (with one
    /// sync) as soon as it is taken and progress never waits behind it.
    fn blocks(&self) -> u64 {
        self.blocks.len() as u64 + self.holes.iter().map(|r| r.end - r.start).sum::<u64>()
    }

    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.holes.is_empty()
    }
}

impl Relocation {
    /// One pass over disk `i` in ascending order; `final_pass` runs with
    /// writes paused. Returns false if cancelled. The walk goes by runs:
    /// copied blocks are skipped a bitmap word at a time, and a stretch of
    /// holes is taken whole (see [`Self::take_holes`]); only blocks with
    /// data are copied one by one.
    pub(super) fn copy_pass(self: &Arc<Self>, i: usize, final_pass: bool) -> Result<bool> {
        let (d, c, t) = (&self.disks[i], &self.copied[i], &self.targets[i]);
        let n = d.nblocks();
        let mut batch = Batch::default();
        let mut b = 0;
        loop {
            if self.cancel.load(Ordering::Acquire) {
                self.commit(i, &mut batch)?;
                return Ok(false);
            }
            b = c.bits().next_clear(b, n);
            if b >= n {
                break;
            }
            let data = d.next_non_hole(b, n);
            if data > b {
                let end = c.bits().next_set(b, data);
                self.take_holes(i, b..end, &mut batch)?;
                b = end;
            } else {
                if !final_pass {
                    self.yield_to_guest(d);
                    d.copy_cursor(b, c.bits());
                }
                // Outside the cutover the copy competes in the export
                // point's queue as async work; the final pass runs while
                // guest writes are paused, and waiting behind them there
                // would deadlock.
                let slot = (!final_pass)
                    .then(|| {
                        d.queue()
                            .map(|q| q.enter(IoClass::Async, d.block_range(b).1))
                    })
                    .flatten();
                let copied = self.copy_block(d, t, b)?;
                drop(slot);
                if let Some(stamp) = copied {
                    batch.blocks.push((b, stamp));
                }
                if !final_pass {
                    self.throttle(d.block_range(b).1);
                    self.check_progress();
                }
                b += 1;
            }
            if batch.blocks() >= BATCH as u64 {
                self.commit(i, &mut batch)?;
            }
        }
        self.commit(i, &mut batch)?;
        Ok(true)
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

    /// Copies one block; `None` if a guest write is in progress on it.
    fn copy_block(&self, d: &Arc<Volume>, t: &Arc<dyn BlockFile>, b: u64) -> Result<Option<u32>> {
        let Some(stamp) = d.write_stamp(b) else {
            self.copies_lost.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let (off, len) = d.block_range(b);
        let (data, _) = d.read_source(off, len, crate::prefetch::Class::Relocation)?;
        if is_zero(&data) {
            t.punch_hole(off, len)
                .ctx(|| format!("zero a block of {}", self.target_dir.display()))?;
        } else {
            t.write_all_at(&data, off)
                .ctx(|| format!("write {}", self.target_dir.display()))?;
        }
        self.bytes_copied.fetch_add(len, Ordering::Relaxed);
        Ok(Some(stamp))
    }

    /// Syncs the target, then the staging the batch was read from, then
    /// records the batch as copied: a copied bit never claims bytes that a
    /// crash could take from either side. Only the bitmap words the batch
    /// touched are written, so a run of a million holes costs one sync.
    fn commit(&self, i: usize, batch: &mut Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (d, c) = (&self.disks[i], &self.copied[i]);
        self.targets[i]
            .sync_data()
            .ctx(|| format!("fsync relocation target disk{i}"))?;
        d.flush()?;
        let mut touched: Vec<Range<u64>> = vec![];
        for (b, stamp) in batch.blocks.drain(..) {
            self.count_mark(d.mark_copied(c, b, stamp));
            touched.push(b..b + 1);
        }
        for run in batch.holes.drain(..) {
            // Stamp, then check it is still a hole, then set and recheck
            // (`mark_copied`): a guest write either made the block
            // present before the stamp, or is seen by the recheck, or
            // sees the bit and revokes it durably.
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
