//! What the maps say about a byte range, without I/O: whether a request
//! is served from staging alone (frontends then answer it on their event
//! threads, and the export point's queue lets it pass), and the range's
//! extents (holes, staged, changed) for block status and backups. Apart
//! from the read and write paths: frontends ask before they make a request.

use super::Volume;

impl Volume {
    /// A guest request's place in the export point's queue, if the disk
    /// has one: at once and apart from admission if staging alone serves
    /// `[off, off + len)`, else a slot when one is free. The presence bits
    /// are looked at only when there is a queue.
    pub(super) fn enter_guest(
        &self,
        off: u64,
        len: u64,
    ) -> Option<crate::placement::queue::Ticket> {
        let q = self.io.get()?;
        Some(match self.is_local(off, len) {
            true => q.enter_staged(len),
            false => q.enter(crate::placement::IoClass::Sync, len),
        })
    }

    /// True if a read of the range needs no fetch: frontends serve such
    /// reads on their event threads and hand the rest to I/O workers.
    pub fn is_local(&self, off: u64, len: u64) -> bool {
        if self.target.get().is_some() {
            return true;
        }
        let len = len.min(self.size.saturating_sub(off));
        self.blocks(off, len)
            .all(|b| self.store.present.test(b) || !self.chunks.has_data(b))
    }

    /// True if a write of the range neither waits for a fetch nor syncs a
    /// map or the upload record nor waits for another writer's map sync
    /// (every block staged and durably marked changed, no valid upload
    /// entry to clear; a copy is revoked in memory) nor waits out a
    /// cutover's pause: frontends may serve it on an event thread.
    pub fn write_is_quick(&self, off: u64, len: u64) -> bool {
        if self.write_gate.is_locked_exclusive() {
            return false;
        }
        let len = len.min(self.size.saturating_sub(off));
        if self.target.get().is_some() {
            return self.blocks(off, len).all(|b| {
                self.store.changed.test_durable(b)
                    && self.dirty_is_quick(b)
                    && self.upload_is_quick(b)
            });
        }
        self.blocks(off, len).all(|b| {
            self.store.present.test(b)
                && self.store.changed.test_durable(b)
                && self.dirty_is_quick(b)
                && self.upload_is_quick(b)
        })
    }

    /// Extents of `[off, off + len)`: a zero chunk not staged is a hole;
    /// staged blocks are local; changed blocks were written by the guest.
    /// After a cutover everything is local on the target.
    /// Walked by runs: each extent ends where the changed map, the
    /// presence map or (for blocks not staged) the backup's data runs
    /// change, found a bitmap word or a chunk run at a time.
    pub fn block_status(&self, off: u64, len: u64) -> Vec<crate::disk::Extent> {
        let switched = self.target.get().is_some();
        let (present, changed) = (self.store.present.bits(), self.store.changed.bits());
        // The end of the run of bits in `[b, to)` equal to bit `b`.
        let same = |m: &crate::staging::AtomicBitmap, b: u64, to: u64| match m.test(b) {
            true => m.next_clear(b, to),
            false => m.next_set(b, to),
        };
        crate::disk::extents_by_runs(self.size, self.block_size, off, len, |b, to| {
            let staged = switched || present.test(b);
            let data = self.chunks.has_data(b);
            let mut end = same(changed, b, to);
            if !switched {
                end = same(present, b, end);
            }
            if !staged {
                let data_end = match data {
                    true => self.chunks.data_end(b),
                    false => self.chunks.next_data(b).unwrap_or(to),
                };
                end = end.min(data_end);
            }
            let hole = !staged && !data;
            let flags = crate::disk::ExtentFlags {
                hole,
                zero: hole,
                staged,
                changed: changed.test(b),
            };
            (flags, end)
        })
    }

    /// How many blocks the guest changed: a count of the map's words, no
    /// allocation (FUSE's `st_blocks`, asked on event threads).
    pub fn changed_blocks(&self) -> u64 {
        self.store.changed.bits().count()
    }

    /// Changed blocks as half-open block ranges.
    pub fn changed_ranges(&self) -> Vec<(u64, u64)> {
        self.store.changed.bits().ranges()
    }
}
