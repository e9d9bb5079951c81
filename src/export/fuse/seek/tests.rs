//! SEEK_DATA / SEEK_HOLE answers: their meaning on a small disk, the safe
//! answers when block status fails or is unsure, and the bounded work on
//! huge sparse and huge fragmented disks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fuser::Errno;

use super::{all_data, seek, settle, Budget, Seek, Want, EVENT_THREAD, MAX_PIECE_BLOCKS, WORKER};
use crate::disk::{Disk, Extent, ExtentFlags, MemDisk};
use crate::error::{Error, ErrorKind, Result};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;
const BS: u64 = 64 * KIB;

/// The answer of a scan that must not run out of budget.
fn at(d: &dyn Disk, off: i64, want: Want) -> std::result::Result<u64, Errno> {
    match seek(d, off, want, WORKER)? {
        Seek::At(a) => Ok(a),
        Seek::Unsure => panic!("unsure at {off} ({want:?})"),
    }
}

#[test]
fn whence_values_other_than_seek_data_and_seek_hole_are_not_ours() {
    assert_eq!(Want::of(libc::SEEK_DATA), Some(Want::Data));
    assert_eq!(Want::of(libc::SEEK_HOLE), Some(Want::Hole));
    for w in [libc::SEEK_SET, libc::SEEK_CUR, libc::SEEK_END, 5, -1] {
        assert_eq!(Want::of(w), None);
    }
}

#[test]
fn data_and_holes_of_a_small_disk_follow_its_written_blocks_and_the_end_is_a_hole() {
    // 20 blocks and a partial one; written: 10 bytes in block 3, block 4
    // whole, 1 byte in the partial last block.
    let size = 20 * BS + 1000;
    let d = MemDisk::new("t", size, BS);
    d.write_at(3 * BS + 5, &[1; 10]).unwrap();
    d.write_at(4 * BS, &vec![2; BS as usize]).unwrap();
    d.write_at(20 * BS + 7, &[3]).unwrap();
    let d: &dyn Disk = &*d;

    assert_eq!(at(d, 0, Want::Data), Ok(3 * BS));
    assert_eq!(at(d, 0, Want::Hole), Ok(0));
    assert_eq!(at(d, (3 * BS + 9) as i64, Want::Data), Ok(3 * BS + 9));
    assert_eq!(at(d, (3 * BS) as i64, Want::Hole), Ok(5 * BS));
    assert_eq!(at(d, (5 * BS) as i64, Want::Data), Ok(20 * BS));
    assert_eq!(at(d, (5 * BS) as i64, Want::Hole), Ok(5 * BS));
    // Data up to the end: the hole is the end.
    assert_eq!(at(d, (20 * BS) as i64, Want::Hole), Ok(size));
    assert_eq!(at(d, (size - 1) as i64, Want::Data), Ok(size - 1));
}

#[test]
fn an_empty_disk_has_no_data_and_a_hole_wherever_one_looks() {
    let size = 3 * MIB + 17;
    let d = MemDisk::new("t", size, BS);
    let d: &dyn Disk = &*d;
    for off in [0, 1, BS, size - 1] {
        assert_eq!(at(d, off as i64, Want::Data), Err(Errno::ENXIO));
        assert_eq!(at(d, off as i64, Want::Hole), Ok(off));
    }
}

#[test]
fn offsets_outside_the_disk_are_enxio_as_linux_filesystems_answer() {
    let d = MemDisk::new("t", MIB, BS);
    d.write_at(0, &[1; 10]).unwrap();
    let d: &dyn Disk = &*d;
    for off in [-1, i64::MIN, MIB as i64, MIB as i64 + 1, i64::MAX] {
        for want in [Want::Data, Want::Hole] {
            assert_eq!(seek(d, off, want, WORKER), Err(Errno::ENXIO), "{off}");
        }
    }
}

#[test]
fn vm_json_is_all_data() {
    assert_eq!(all_data(10, 0, Want::Data), Ok(0));
    assert_eq!(all_data(10, 9, Want::Data), Ok(9));
    assert_eq!(all_data(10, 3, Want::Hole), Ok(10));
    assert_eq!(all_data(10, 10, Want::Data), Err(Errno::ENXIO));
    assert_eq!(all_data(10, -1, Want::Hole), Err(Errno::ENXIO));
}

/// A disk of `size` bytes whose data (in blocks of `bs`) are the block
/// ranges `data`; with `fragmented`, every data block is its own extent
/// (staged and missing blocks interleaved). Counts its queries. Answers
/// by runs, as the volume does, so a huge disk costs its runs.
struct Runs {
    size: u64,
    bs: u64,
    data: Vec<(u64, u64)>,
    fragmented: bool,
    /// `Some(flags)`: every extent has these flags (a misreporting disk).
    flags: Option<ExtentFlags>,
    /// `Some(n)`: answers cover at most `n` bytes (a short answer);
    /// `Some(0)`: block status fails.
    cover: Option<u64>,
    queries: AtomicU64,
    longest: AtomicU64,
    returned: AtomicU64,
}

impl Runs {
    fn new(size: u64, bs: u64, data: &[(u64, u64)]) -> Runs {
        Runs {
            size,
            bs,
            data: data.to_vec(),
            fragmented: false,
            flags: None,
            cover: None,
            queries: AtomicU64::new(0),
            longest: AtomicU64::new(0),
            returned: AtomicU64::new(0),
        }
    }
}

impl Disk for Runs {
    fn describe(&self) -> String {
        "runs".into()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u64 {
        self.bs
    }
    fn read_at(&self, _: u64, _: usize) -> Result<Vec<u8>> {
        unreachable!("lseek never reads")
    }
    fn write_at(&self, _: u64, _: &[u8]) -> Result<()> {
        unreachable!()
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
        unreachable!()
    }
    fn discard(&self, _: u64, _: u64) -> Result<()> {
        unreachable!()
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn epoch(&self) -> u64 {
        1
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        self.longest.fetch_max(len, Ordering::SeqCst);
        let len = match self.cover {
            Some(0) => return Err(Error::new(ErrorKind::Io, "no status")),
            Some(n) => len.min(n),
            None => len,
        };
        let out = crate::disk::extents_by_runs(self.size, self.bs, off, len, |b, to| {
            let k = self.data.partition_point(|&(s, _)| s <= b);
            let inside = k > 0 && b < self.data[k - 1].1;
            let end = match (inside, self.fragmented) {
                (true, true) => b + 1,
                (true, false) => self.data[k - 1].1.min(to),
                (false, _) => self.data.get(k).map_or(to, |r| r.0.min(to)),
            };
            let flags = self.flags.unwrap_or(ExtentFlags {
                hole: !inside,
                zero: !inside,
                staged: inside && self.fragmented && b % 2 == 0,
                changed: false,
            });
            (flags, end)
        });
        self.returned.fetch_add(out.len() as u64, Ordering::SeqCst);
        Ok(out)
    }
}

#[test]
fn a_failed_or_short_block_status_is_answered_as_data() {
    // Data only in block 100; the disk fails, then covers 1 KiB per answer.
    for cover in [0, KIB] {
        let mut d = Runs::new(MIB * 16, BS, &[(100, 101)]);
        d.cover = Some(cover);
        assert_eq!(
            at(&d, 5, Want::Data),
            Ok(if cover == 0 { 5 } else { 5 + KIB })
        );
        // A hole is never made up: the answer is the end.
        assert_eq!(
            at(&d, 5, Want::Hole),
            Ok(if cover == 0 { 16 * MIB } else { 5 })
        );
    }
}

#[test]
fn only_extents_that_read_as_zeros_are_holes() {
    // hole without zero: data; zero without hole (stored zeros): a hole.
    let mut d = Runs::new(4 * MIB, BS, &[]);
    d.flags = Some(ExtentFlags {
        hole: true,
        ..ExtentFlags::default()
    });
    assert_eq!(at(&d, 0, Want::Data), Ok(0));
    assert_eq!(at(&d, 0, Want::Hole), Ok(4 * MIB));
    d.flags = Some(ExtentFlags {
        zero: true,
        staged: true,
        ..ExtentFlags::default()
    });
    assert_eq!(at(&d, 0, Want::Data), Err(Errno::ENXIO));
    assert_eq!(at(&d, 7, Want::Hole), Ok(7));
}

#[test]
fn an_answer_near_the_offset_asks_only_a_small_piece() {
    let d = Runs::new(10 * TIB, BS, &[(0, 10 * TIB / BS)]);
    assert_eq!(seek(&d, 5, Want::Data, EVENT_THREAD), Ok(Seek::At(5)));
    let d = Runs::new(10 * TIB, BS, &[(3, 4)]);
    assert_eq!(seek(&d, 0, Want::Data, EVENT_THREAD), Ok(Seek::At(3 * BS)));
    assert_eq!(seek(&d, 0, Want::Hole, EVENT_THREAD), Ok(Seek::At(0)));
    assert_eq!(d.queries.load(Ordering::SeqCst), 2);
    assert!(d.longest.load(Ordering::SeqCst) <= 64 * BS);
}

#[test]
fn a_10_tib_hole_is_crossed_in_bounded_pieces_off_the_event_thread_in_milliseconds() {
    // Data in the first and the last block: a 10 TiB hole between.
    let blocks = 10 * TIB / BS;
    let d = Runs::new(10 * TIB, BS, &[(0, 1), (blocks - 1, blocks)]);
    // Too far for an event thread: it hands the scan on.
    assert_eq!(
        seek(&d, BS as i64, Want::Data, EVENT_THREAD),
        Ok(Seek::Unsure)
    );
    assert!(d.queries.load(Ordering::SeqCst) <= EVENT_THREAD.queries);
    let t = Instant::now();
    assert_eq!(at(&d, BS as i64, Want::Data), Ok(10 * TIB - BS));
    assert_eq!(at(&d, 0, Want::Hole), Ok(BS));
    assert_eq!(at(&d, (10 * TIB - BS) as i64, Want::Hole), Ok(10 * TIB));
    let took = t.elapsed();
    // Every query bounded; about one per MAX_PIECE_BLOCKS blocks.
    assert!(d.longest.load(Ordering::SeqCst) <= MAX_PIECE_BLOCKS * BS);
    let q = d.queries.load(Ordering::SeqCst);
    assert!(
        q <= EVENT_THREAD.queries + blocks / MAX_PIECE_BLOCKS + 32,
        "{q} queries"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // No data after the hole: ENXIO, as fast.
    let d = Runs::new(10 * TIB, BS, &[(0, 1)]);
    let t = Instant::now();
    assert_eq!(at(&d, BS as i64, Want::Data), Err(Errno::ENXIO));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn seek_hole_over_very_fragmented_data_stops_at_its_budget_and_answers_the_end() {
    // 10 TiB of data, every block its own extent, no hole before the end.
    let mut d = Runs::new(10 * TIB, BS, &[(0, 10 * TIB / BS)]);
    d.fragmented = true;
    assert_eq!(seek(&d, 0, Want::Hole, EVENT_THREAD), Ok(Seek::Unsure));
    let t = Instant::now();
    assert_eq!(seek(&d, 0, Want::Hole, WORKER), Ok(Seek::Unsure));
    assert_eq!(settle(&d, 0, Want::Hole, WORKER), Ok(10 * TIB));
    let took = t.elapsed();
    // Looked at about a budget's worth of extents, not 160 million.
    let returned = d.returned.load(Ordering::SeqCst);
    let bound = 2 * (EVENT_THREAD.hole_extents + WORKER.hole_extents + 2 * MAX_PIECE_BLOCKS);
    assert!(returned <= bound, "{returned} extents");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // A hole within the budget is still found.
    let mut d = Runs::new(10 * TIB, BS, &[(0, 5000), (5001, 10 * TIB / BS)]);
    d.fragmented = true;
    assert_eq!(settle(&d, 0, Want::Hole, WORKER), Ok(5000 * BS));
}

#[test]
fn a_budget_counts_queries_and_extents() {
    let d = Runs::new(TIB, BS, &[(1 << 20, (1 << 20) + 1)]);
    let tiny = Budget {
        queries: 1,
        hole_extents: 1,
        data_extents: 1,
    };
    assert_eq!(seek(&d, 0, Want::Data, tiny), Ok(Seek::Unsure));
    // An unsure SEEK_DATA settles as data at the offset (safe).
    assert_eq!(settle(&d, 0, Want::Data, tiny), Ok(0));
}

#[test]
fn st_blocks_counts_backup_data_and_changed_blocks_never_past_the_size_and_never_0_with_data() {
    use super::allocated_bytes;
    let size = 5 * BS + 100;
    // Three data chunks, nothing written.
    assert_eq!(allocated_bytes(size, BS, 3, 0), 3 * BS);
    // Two more blocks written.
    assert_eq!(allocated_bytes(size, BS, 3, 2), 5 * BS);
    // Everything written: the size, not more.
    assert_eq!(allocated_bytes(size, BS, 3, 6), size);
    // Data anywhere: never 0 (GNU tar takes 0 blocks for all hole).
    assert!(allocated_bytes(size, BS, 0, 1) > 0);
    assert!(allocated_bytes(size, BS, 1, 0) > 0);
    assert_eq!(allocated_bytes(size, BS, 0, 0), 0);
    // A sparse 10 TiB disk: its data.
    assert_eq!(allocated_bytes(10 * TIB, BS, 1, 3), 4 * BS);
}
