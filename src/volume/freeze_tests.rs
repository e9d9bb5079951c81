//! Live-backup freeze tests: frozen blocks keep their freeze-time bytes
//! for the backup reader (copy-on-write), the next generation's map takes
//! writes from the freeze on, and a copy whose writeback failed is never
//! read into a backup.

use super::tests::fixture;
use super::*;
use crate::staging::io::{OsStorage, Storage};

const BS: usize = 65536;

/// Freezes `vol` for a live backup as `session::backup` does (a fresh
/// next-generation map and cow file in `dir`), with writes paused.
pub(super) fn freeze_for_backup(
    vol: &Volume,
    dir: &std::path::Path,
) -> (Frozen, Arc<PersistentBitmap>) {
    let next = Arc::new(
        PersistentBitmap::open(
            &OsStorage,
            &crate::staging::dirty_path(dir, 0, 1),
            crate::staging::MapKind::Dirty,
            BS as u32,
            vol.nblocks(),
        )
        .unwrap(),
    );
    let cow_path = crate::staging::cow_path(dir, 0);
    let cow = OsStorage
        .open(&cow_path, crate::staging::Open::Empty)
        .unwrap();
    cow.set_len(vol.size).unwrap();
    let g = vol.pause_writes();
    let frozen = vol.freeze(next.clone(), cow, cow_path).unwrap();
    drop(g);
    (frozen, next)
}

fn read_frozen_block(vol: &Volume, b: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; vol.block_range(b).1 as usize];
    vol.read_frozen(b, &mut buf).map(|_| buf)
}

#[test]
fn a_frozen_blocks_copy_whose_writeback_failed_is_never_read_back_into_a_backup() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let f = fixture(16, 22);
    let vol = &f.vol;
    vol.write(BS as u64, &vec![0xa1; BS]).unwrap();
    vol.write(2 * BS as u64, &vec![0xa2; BS]).unwrap();
    let next = Arc::new(
        PersistentBitmap::open(
            &OsStorage,
            &crate::staging::dirty_path(&f.staging, 0, 1),
            crate::staging::MapKind::Dirty,
            BS as u32,
            vol.nblocks(),
        )
        .unwrap(),
    );
    let faults = FaultyStorage::new(OsStorage::shared());
    let cow_path = crate::staging::cow_path(&f.staging, 0);
    let cow = faults.open(&cow_path, crate::staging::Open::Empty).unwrap();
    cow.set_len(vol.size).unwrap();
    let g = vol.pause_writes();
    vol.freeze(next, cow, cow_path).unwrap();
    drop(g);
    // The guest overwrites both frozen blocks: their freeze-time bytes go
    // to the cow file. The kernel then fails that file's writeback (and
    // may drop the pages: a read would find the hole, zeros).
    vol.write(BS as u64, &vec![0xb1; BS]).unwrap();
    vol.write(2 * BS as u64, &vec![0xb2; BS]).unwrap();
    assert_eq!(vol.cow_blocks(), 2);
    faults.inject(Rule::fail(Op::Sync, ".cow", libc::EIO).times(1));
    assert!(
        read_frozen_block(vol, 1).is_err(),
        "a copy whose writeback failed was read into the backup"
    );
    // The failure sticks: the next sync of the file would not report it.
    assert!(read_frozen_block(vol, 2).is_err());
    vol.end_freeze(false);
}

#[test]
fn writes_to_frozen_blocks_after_the_freeze_leave_the_backup_reader_the_freeze_time_bytes() {
    let f = fixture(16, 21);
    let vol = &f.vol;
    vol.write(BS as u64, &vec![0xa1; BS]).unwrap();
    vol.write(2 * BS as u64 + 10, b"partly").unwrap();
    vol.write_zeroes(3 * BS as u64, BS as u64).unwrap();
    let at_freeze = vol.read(0, 4 * BS).unwrap();
    let (frozen, next) = freeze_for_backup(vol, &f.staging);
    assert_eq!(frozen.blocks, vec![1, 2, 3]);
    assert_eq!(frozen.read, vec![1, 2, 3]);
    // The guest writes on over every frozen block before the backup
    // reads any of them.
    vol.write(BS as u64 + 5, b"after the freeze").unwrap();
    vol.write_zeroes(2 * BS as u64, BS as u64).unwrap();
    vol.write(3 * BS as u64, &vec![0xc3; BS]).unwrap();
    vol.write(5 * BS as u64, b"not frozen").unwrap();
    assert_eq!(vol.cow_blocks(), 3);
    for b in 1..4u64 {
        let want = &at_freeze[b as usize * BS..(b as usize + 1) * BS];
        assert_eq!(read_frozen_block(vol, b).unwrap(), want, "block {b}");
    }
    assert_eq!(&vol.read(BS as u64 + 5, 16).unwrap(), b"after the freeze");
    assert_eq!(next.bits().ranges(), vec![(1, 4), (5, 6)]);
    // The commit: the next map is the current one from now on.
    assert!(
        vol.end_freeze(true).is_none(),
        "generation 0 is the changed map: kept"
    );
    assert_eq!(vol.blocks_dirty(), 4);
    assert_eq!(vol.changed_ranges(), vec![(1, 4), (5, 6)]);
    vol.write(9 * BS as u64, b"x").unwrap();
    assert!(next.test(9));
}

#[test]
fn a_write_blocked_at_the_gate_during_the_freeze_lands_only_in_the_next_map() {
    let f = fixture(16, 22);
    let vol = f.vol.clone();
    vol.write(3 * BS as u64, &vec![3u8; BS]).unwrap();
    let next = Arc::new(
        PersistentBitmap::open(
            &OsStorage,
            &crate::staging::dirty_path(&f.staging, 0, 1),
            crate::staging::MapKind::Dirty,
            BS as u32,
            vol.nblocks(),
        )
        .unwrap(),
    );
    let cow_path = crate::staging::cow_path(&f.staging, 0);
    let cow = OsStorage
        .open(&cow_path, crate::staging::Open::Empty)
        .unwrap();
    let gate = vol.pause_writes();
    let writer = {
        let vol = vol.clone();
        std::thread::spawn(move || vol.write(4 * BS as u64, &vec![4u8; BS]).unwrap())
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!writer.is_finished(), "a write passed the paused gate");
    let frozen = vol.freeze(next.clone(), cow, cow_path).unwrap();
    drop(gate);
    writer.join().unwrap();
    assert_eq!(frozen.blocks, vec![3]);
    assert_eq!(next.bits().ranges(), vec![(4, 5)]);
    assert_eq!(vol.cow_blocks(), 0);
    assert_eq!(read_frozen_block(&vol, 3).unwrap(), vec![3u8; BS]);
    vol.end_freeze(false);
    assert_eq!(vol.changed_ranges(), vec![(3, 5)]);
}

#[test]
fn a_frozen_block_never_staged_is_the_sessions_chunk_and_is_not_read() {
    let f = fixture(16, 23);
    let vol = &f.vol;
    vol.write(BS as u64, b"staged").unwrap();
    // The changed map may over-report (a crash between the durable bit and
    // the data): block 7 is marked but was never staged.
    vol.mark_changed_unstaged(7).unwrap();
    let (frozen, _) = freeze_for_backup(vol, &f.staging);
    assert_eq!(frozen.blocks, vec![1, 7]);
    assert_eq!(frozen.read, vec![1]);
    assert!(
        read_frozen_block(vol, 7).is_err(),
        "not pending: never read"
    );
    // Writing it after the freeze copies nothing: its content is the chunk.
    vol.write(7 * BS as u64, &vec![7u8; BS]).unwrap();
    assert_eq!(vol.cow_blocks(), 0);
    assert_eq!(
        vol.status().fetched_blocks,
        1,
        "only the partial write's fill"
    );
    vol.end_freeze(false);
}
