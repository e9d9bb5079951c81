//! The frontend-agnostic disk API: what FUSE, NFS and NBD call, each
//! mapping its own handles onto it. [`crate::volume::Volume`] is the real
//! implementation (a backup joined with staging); [`MemDisk`] is a plain
//! in-memory one for frontend tests. One conformance suite
//! (`disk::tests`) runs over both.
//!
//! Durability is the same whoever calls: a write is visible at once and
//! durable after the next `flush` that starts after it returned; `flush`
//! covers every write completed on the disk, through any frontend.

use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::{Error, ErrorKind, Result};

/// What a range of the disk is, for block status queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExtentFlags {
    /// No data behind it anywhere (reads zeros without I/O): NBD's hole.
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// The data is local (staged or written): no repository fetch.
    pub staged: bool,
    /// The guest changed it since the backup.
    pub changed: bool,
}

/// How a read answered later is answered (`Disk::read_later`).
pub type ReadDone = Box<dyn FnOnce(Result<bytes::Bytes>) + Send>;
/// Runs work that may wait, off the caller's thread (an I/O worker pool,
/// tokio's blocking pool).
pub type Spawner = std::sync::Arc<dyn Fn(Box<dyn FnOnce() + Send>) + Send + Sync>;

/// A run of bytes with the same flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: ExtentFlags,
}

/// A live virtual disk.
pub trait Disk: Send + Sync {
    /// "vm/diskN", for messages.
    fn describe(&self) -> String;
    fn size(&self) -> u64;
    /// The unit of fetching and change tracking (the backup's chunk size).
    fn block_size(&self) -> u64;
    /// Reads up to `len` bytes; short only at the end of the disk.
    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>>;
    /// A read that would wait (for a repository fetch) answered later
    /// without a thread waiting for it: `done` is called with the bytes
    /// `read_at` would return, on whatever thread ends the wait; if the
    /// read needs no wait, or this disk cannot answer later, `done` comes
    /// back and the caller uses `read_at`. Work that might wait is handed
    /// to `spawn`.
    fn read_later(
        &self,
        off: u64,
        len: usize,
        done: ReadDone,
        spawn: &Spawner,
    ) -> std::result::Result<(), ReadDone> {
        let _ = (off, len, spawn);
        Err(done)
    }
    /// Writes all of `data`; past the end is an error (`NoSpace`).
    fn write_at(&self, off: u64, data: &[u8]) -> Result<()>;
    /// Makes the range read as zeros (without moving zero bytes where the
    /// store can punch holes).
    fn write_zeroes(&self, off: u64, len: u64) -> Result<()>;
    /// The guest no longer needs the range: whole blocks in it read as
    /// zeros afterwards; partial blocks are left as they are.
    fn discard(&self, off: u64, len: u64) -> Result<()>;
    /// Makes every write completed before the call durable.
    fn flush(&self) -> Result<()>;
    /// Changes whenever writes that completed but were not flushed may have
    /// been lost (a reboot, a failed sync); the same across daemon restarts
    /// otherwise. NFS answers it as its write verifier.
    fn epoch(&self) -> u64;
    /// Extents covering `[off, off + len)` (clipped to the disk), in order.
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>>;
}

/// Checks that `[off, off + len)` lies within a disk of `size` bytes.
pub fn check_range(what: &str, size: u64, off: u64, len: u64) -> Result<()> {
    if off.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!("{what} past the end of the disk ({off}+{len} > {size})"),
        ));
    }
    Ok(())
}

/// Merges per-block flags into extents clipped to `[off, off + len)`.
pub fn extents(
    size: u64,
    block_size: u64,
    off: u64,
    len: u64,
    flags: impl Fn(u64) -> ExtentFlags,
) -> Vec<Extent> {
    extents_by_runs(size, block_size, off, len, |b, _| (flags(b), b + 1))
}

/// Extents clipped to `[off, off + len)` from runs: `run(b, to)` gives
/// block `b`'s flags and the end (`b < end <= to`) of the run of blocks
/// from `b` that share them. A disk keeping its state as runs or bitmaps
/// answers in time proportional to its runs and words, not its blocks: a
/// sparse 10 TiB map in milliseconds.
pub fn extents_by_runs(
    size: u64,
    block_size: u64,
    off: u64,
    len: u64,
    run: impl Fn(u64, u64) -> (ExtentFlags, u64),
) -> Vec<Extent> {
    let end = off.saturating_add(len).min(size);
    let mut out: Vec<Extent> = vec![];
    if off >= end {
        return out;
    }
    // One past the last block the range touches.
    let to = (end - 1) / block_size + 1;
    let mut pos = off;
    while pos < end {
        let b = pos / block_size;
        let (f, run_end) = run(b, to);
        let stop = (run_end.clamp(b + 1, to) * block_size).min(end);
        match out.last_mut() {
            Some(last) if last.flags == f => last.len += stop - pos,
            _ => out.push(Extent {
                len: stop - pos,
                flags: f,
            }),
        }
        pos = stop;
    }
    out
}

/// A disk in memory: every block starts as a hole; writes mark blocks
/// changed. For frontend tests and as the conformance suite's reference.
pub struct MemDisk {
    name: String,
    block_size: u64,
    epoch: u64,
    state: RwLock<MemState>,
}

struct MemState {
    data: Vec<u8>,
    /// Blocks ever written (data or zeroes).
    written: Vec<bool>,
}

impl MemDisk {
    pub fn new(name: &str, size: u64, block_size: u64) -> Arc<MemDisk> {
        let blocks = size.div_ceil(block_size) as usize;
        Arc::new(MemDisk {
            epoch: rand::random(),
            name: name.into(),
            block_size,
            state: RwLock::new(MemState {
                data: vec![0; size as usize],
                written: vec![false; blocks],
            }),
        })
    }

    fn mark(&self, st: &mut MemState, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in off / self.block_size..=(off + len - 1) / self.block_size {
            st.written[b as usize] = true;
        }
    }
}

impl Disk for MemDisk {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.state.read().data.len() as u64
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let st = self.state.read();
        let start = (off as usize).min(st.data.len());
        let end = start.saturating_add(len).min(st.data.len());
        Ok(st.data[start..end].to_vec())
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        check_range("write", self.size(), off, data.len() as u64)?;
        let mut st = self.state.write();
        st.data[off as usize..off as usize + data.len()].copy_from_slice(data);
        self.mark(&mut st, off, data.len() as u64);
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        check_range("write zeroes", self.size(), off, len)?;
        let mut st = self.state.write();
        st.data[off as usize..(off + len) as usize].fill(0);
        self.mark(&mut st, off, len);
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        check_range("discard", self.size(), off, len)?;
        let bs = self.block_size;
        let (first, end) = (off.div_ceil(bs) * bs, (off + len) / bs * bs);
        if first < end {
            self.write_zeroes(first, end - first)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        let st = self.state.read();
        let bs = self.block_size;
        Ok(extents(st.data.len() as u64, bs, off, len, |b| {
            let written = st.written[b as usize];
            ExtentFlags {
                hole: !written,
                zero: !written,
                staged: written,
                changed: written,
            }
        }))
    }
}

#[cfg(test)]
mod tests;
