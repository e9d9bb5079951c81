//! Every change to this disk's staging file: under the I/O gate and only
//! while the volume is open, so that once `close` returns (release) no
//! fetch or write still lands in staging a later session may be using.
//! Apart from the read and write paths: both fetches and guest writes
//! stage bytes, through the same gate.

use std::sync::atomic::Ordering;

use super::Volume;
use crate::error::{Error, IoContext, Result};

impl Volume {
    pub(super) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::busy(format!(
                "disk{} of VM {} was released",
                self.index, self.vm
            )));
        }
        Ok(())
    }

    /// Every write into staging: never after `close` returned.
    pub(super) fn staging_write(&self, data: &[u8], off: u64) -> Result<()> {
        self.staging_io("write", |f| f.write_all_at(data, off))
    }

    /// [`Volume::staging_write`] of a fetched block: past the page cache
    /// where the filesystem allows (`BlockFile::write_fill_at`).
    pub(super) fn staging_fill(&self, data: &[u8], off: u64) -> Result<()> {
        self.staging_io("write", |f| f.write_fill_at(data, off))
    }

    /// One change to the staging file, under the I/O gate and only while
    /// the disk is open; `what` names it in the error.
    fn staging_io(
        &self,
        what: &str,
        op: impl FnOnce(&dyn crate::staging::BlockFile) -> std::io::Result<()>,
    ) -> Result<()> {
        let _g = self.io_gate.read();
        self.check_open()?;
        op(self.store.data.as_ref())
            .ctx(|| format!("{what} staging {}", self.store.data_path.display()))
    }

    /// Makes a zero block's staging range read as zeros (it may hold
    /// leftovers of a write that was never acknowledged before a crash).
    pub(super) fn zero_fill(&self, b: u64) -> Result<()> {
        self.staging_zero(b * self.block_size, self.block_len(b))
    }

    /// Zeros a staging range (a hole where the filesystem can punch one);
    /// like every staging write, never after `close`.
    pub(super) fn staging_zero(&self, off: u64, len: u64) -> Result<()> {
        self.staging_io("zero", |f| f.punch_hole(off, len))
    }

    /// Ends the volume's fetching and writing (at release): queued fetches
    /// finish without touching the repository or staging, and once this
    /// returns no running fetch or write can still land in staging.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        drop(self.io_gate.write());
        self.detach_budget();
    }
}
