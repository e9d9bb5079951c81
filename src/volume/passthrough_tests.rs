//! Direct readers (FUSE passthrough): granted only on a file that holds
//! every byte, never under eviction or a relocation's staging, and on the
//! target after cutover.

use std::sync::Arc;

use super::super::tests::fixture;
use crate::error::ErrorKind;
use crate::staging::budget::{Budget, Evictable};
use crate::staging::io::OsStorage;
use crate::staging::{BlockFile, MapKind, Open, PersistentBitmap};

const BS: usize = 65536;

fn file_bytes(f: &dyn BlockFile, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn a_direct_reader_is_granted_only_once_every_block_with_data_is_staged_and_its_file_reads_as_the_disk(
) {
    let f = fixture(16, 51);
    assert!(f.vol.begin_direct_read().is_none(), "nothing staged yet");
    f.vol.read(0, 8 * BS).unwrap();
    assert!(f.vol.begin_direct_read().is_none(), "half staged");
    f.vol.read(0, f.data.len()).unwrap();
    let file = f.vol.begin_direct_read().expect("fully staged");
    assert!(file.as_fd().is_some(), "a plain file the kernel can read");
    assert!(file_bytes(file.as_ref(), f.data.len()) == f.data);
    assert_eq!(f.vol.direct_readers(), 1);
    assert!(f.vol.status().passthrough);
    f.vol.end_direct_read();
    assert_eq!(f.vol.direct_readers(), 0);
    assert!(!f.vol.status().passthrough);
}

#[test]
fn a_written_zero_block_whose_presence_bit_was_lost_keeps_direct_readers_away() {
    let f = fixture(16, 52);
    f.vol.read(0, f.data.len()).unwrap();
    // Block 5 is a zero chunk, never staged by the read. A power cut after
    // its write's data landed but before its presence bit was synced
    // leaves it changed and not present: the volume reads zeros, the file
    // holds the write.
    assert!(!f.vol.chunks().has_data(5) && !f.vol.store.present.test(5));
    f.vol.store.changed.set_many_durable(5..6).unwrap();
    f.vol
        .store
        .data
        .write_all_at(&[0xAB; BS], 5 * BS as u64)
        .unwrap();
    assert!(f.vol.begin_direct_read().is_none());
    assert_eq!(f.vol.read(5 * BS as u64, BS).unwrap(), vec![0u8; BS]);
}

#[test]
fn a_volume_with_a_direct_reader_evicts_nothing_and_evicts_again_once_it_ends() {
    let f = fixture(16, 53);
    let budget = Budget::new(&f.staging);
    f.vol.attach_budget(budget, f.staging.clone());
    f.vol.read(0, f.data.len()).unwrap();
    f.vol.begin_direct_read().expect("fully staged");
    assert_eq!(f.vol.evict(4 * BS as u64).unwrap(), 0);
    assert_eq!(f.vol.status().evicted_blocks, 0);
    f.vol.end_direct_read();
    // Two CLOCK turns: the first clears the referenced bits.
    assert!(f.vol.evict(4 * BS as u64).unwrap() > 0);
    assert!(
        f.vol.begin_direct_read().is_none(),
        "granted on a disk with evicted blocks"
    );
}

fn copied_map(f: &super::super::tests::Fixture) -> Arc<PersistentBitmap> {
    Arc::new(
        PersistentBitmap::open(
            OsStorage::shared().as_ref(),
            &f.staging.join("disk0.copied-test"),
            MapKind::Copied,
            BS as u32,
            f.vol.nblocks(),
        )
        .unwrap(),
    )
}

#[test]
fn no_relocation_starts_under_a_direct_reader_none_is_granted_during_one_and_after_cutover_the_target_is_read(
) {
    let f = fixture(16, 54);
    f.vol.read(0, f.data.len()).unwrap();
    f.vol.begin_direct_read().expect("fully staged");
    let e = f.vol.track_copies(copied_map(&f)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("FUSE passthrough"), "{e}");
    assert!(f.vol.check_no_staging_reader().is_err());
    f.vol.end_direct_read();

    f.vol.track_copies(copied_map(&f)).unwrap();
    assert!(
        f.vol.begin_direct_read().is_none(),
        "granted on staging during a relocation"
    );
    // Cutover: the target holds the disk; direct readers read it.
    let target_path = f.staging.join("target.raw");
    let target = OsStorage::shared().open(&target_path, Open::Empty).unwrap();
    target.write_all_at(&f.data, 0).unwrap();
    f.vol.switch_to(target);
    let file = f.vol.begin_direct_read().expect("granted on the target");
    assert!(file_bytes(file.as_ref(), f.data.len()) == f.data);
    // Staging no longer matters: writes go to the target, still tracked.
    f.vol.write(3 * BS as u64, &[0x77; BS]).unwrap();
    assert!(f.vol.store.changed.test(3));
    assert_eq!(
        file_bytes(file.as_ref(), f.data.len())[3 * BS..4 * BS],
        [0x77; BS]
    );
    f.vol.check_no_staging_reader().unwrap();
    f.vol.end_direct_read();
}
