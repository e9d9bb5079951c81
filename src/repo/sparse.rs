//! Where a sparse image has data: a backup reads only the chunks that
//! overlap a data extent and records the others as zero chunks unread, so
//! a 10 TiB image with 64 MiB written costs 64 MiB of reads, not hours of
//! reading zeros. Extents come from `lseek(SEEK_DATA/SEEK_HOLE)`; where the
//! filesystem cannot tell (it answers `EINVAL` or the like), the whole
//! image counts as data. Block devices report no holes, which is correct.
//!
//! A chunk that overlaps data is read whole (its holes read as zeros), and
//! is still checked for being all zeros, as before: an extent the
//! filesystem calls data may hold zeros (preallocated, or written so).

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::{Error, Result};

/// Byte ranges of `file` (of `size` bytes) that may hold data, ascending
/// and disjoint: everything but the holes the filesystem reports.
pub fn data_extents(file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let mut out = vec![];
    let mut off = 0u64;
    while off < size {
        let data = match seek(file, off, Whence::SeekData) {
            Ok(d) => d,
            // No data at or after `off`.
            Err(Errno::ENXIO) => break,
            Err(e) if off == 0 && unsupported(e) => return Ok(vec![(0, size)]),
            Err(e) => return Err(Error::io("find data in image", e.into())),
        };
        if data >= size {
            break;
        }
        let hole = match seek(file, data, Whence::SeekHole) {
            Ok(h) => h.min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(Error::io("find holes in image", e.into())),
        };
        if hole <= data {
            // A filesystem contradicting itself: read the rest.
            out.push((data, size));
            break;
        }
        out.push((data, hole));
        off = hole;
    }
    Ok(out)
}

fn seek(file: &File, off: u64, whence: Whence) -> nix::Result<u64> {
    let off = i64::try_from(off).map_err(|_| Errno::EOVERFLOW)?;
    lseek(file.as_raw_fd(), off, whence).map(|o| o as u64)
}

fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOSYS)
}

/// The chunks of `chunk_size` bytes that overlap `extents` (ascending), as
/// ascending, disjoint, merged ranges of chunk indexes.
pub fn chunks_with_data(extents: &[(u64, u64)], chunk_size: u32) -> Vec<Range<u64>> {
    let cs = chunk_size as u64;
    let mut out: Vec<Range<u64>> = vec![];
    for &(s, e) in extents.iter().filter(|(s, e)| e > s) {
        let r = s / cs..(e - 1) / cs + 1;
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_are_the_written_ranges_and_chunks_overlapping_them() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let size = 1u64 << 30;
        f.set_len(size).unwrap();
        assert_eq!(data_extents(&f, size).unwrap(), vec![]);
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], size - 4096).unwrap();
        f.sync_all().unwrap();
        let ext = data_extents(&f, size).unwrap();
        // The filesystem may round extents to its own blocks, never
        // dropping written bytes.
        assert_eq!(ext.len(), 2, "{ext:?}");
        assert!(ext[0].0 <= 8 << 20 && ext[0].1 >= (8 << 20) + 4096 && ext[0].1 < 16 << 20);
        assert_eq!(ext[1].1, size);
        let chunks = chunks_with_data(&ext, 1 << 20);
        assert_eq!(chunks, vec![8..9, 1023..1024]);
    }

    #[test]
    fn chunk_ranges_merge_and_round_outwards() {
        let cs = 1u32 << 16;
        let c = cs as u64;
        let ext = [(0, 1), (c - 1, c + 1), (3 * c, 3 * c), (5 * c + 7, 7 * c)];
        assert_eq!(chunks_with_data(&ext, cs), vec![0..2, 5..7]);
        assert_eq!(chunks_with_data(&[], cs), vec![]);
    }
}
