//! Volume unit tests: single fetch per block, write/fetch races, partial
//! writes, staged reads during a pending fetch, flush durability, unaligned
//! zeroing; and the fixtures the other volume test modules share. Prefetch
//! priority is in `prefetch_tests`, the hangs of issue 10 in
//! `deadlock_tests`, failed syncs and crashes in `durability_tests`, misses
//! answered from the fetched bytes in `miss_tests`.

use super::*;
use crate::repo::testing::{Knobs, TestBackend};
use crate::staging::io::{OsStorage, Storage};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

const BS: usize = 65536;

pub(super) struct Fixture {
    pub(super) _dir: tempfile::TempDir,
    pub(super) vol: Arc<Volume>,
    pub(super) data: Vec<u8>,
    pub(super) knobs: Knobs,
    pub(super) staging: PathBuf,
}

pub(super) fn fixture(blocks: usize, seed: u64) -> Fixture {
    fixture_on(blocks, seed, OsStorage::shared())
}

/// A disk of `blocks` 64 KiB blocks (every fifth a zero chunk, plus a
/// 100-byte tail) whose staging lives on `storage`.
pub(super) fn fixture_on(blocks: usize, seed: u64, storage: Arc<dyn Storage>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let (repo, _) = Repository::open_or_create(repo_path.to_str().unwrap()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; blocks * BS + 100];
    rng.fill(&mut data[..]);
    for b in (0..blocks).step_by(5) {
        data[b * BS..(b + 1) * BS].fill(0);
    }
    crate::testutil::backup_images(&repo, dir.path(), "vm", BS, &[&data]);
    let knobs = Knobs::default();
    let backend = TestBackend::new(&repo_path, knobs.clone());
    let repo = Repository::open_backend(Box::new(backend)).unwrap();
    let m = repo.resolve("vm", None).unwrap();
    let sdir = dir.path().join("staging");
    let sched = Scheduler::new("test-fetch", 4);
    let vol = crate::testutil::open_volumes(storage.as_ref(), &sdir, &repo, &m, &sched).remove(0);
    Fixture {
        _dir: dir,
        vol,
        data,
        knobs,
        staging: sdir,
    }
}

#[test]
fn concurrent_readers_cause_exactly_one_fetch_per_block() {
    let f = fixture(64, 1);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (vol, data) = (f.vol.clone(), f.data.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for _ in 0..200 {
                    let off = rng.gen_range(0..data.len() - 1);
                    let len = rng.gen_range(1..=(3 * BS).min(data.len() - off));
                    assert_eq!(vol.read(off as u64, len).unwrap(), data[off..off + len]);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    // Readers are answered before their blocks are staged: let fills end.
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    assert_eq!(
        st.fetched_blocks, st.blocks_staged,
        "a block was fetched more than once"
    );
    assert_eq!(st.fetches_in_flight, 0);
}

#[test]
fn full_block_writes_racing_fetches_are_never_overwritten_by_backup_data() {
    let f = fixture(32, 2);
    let writer = {
        let vol = f.vol.clone();
        std::thread::spawn(move || {
            for b in 0..32u64 {
                vol.write(b * BS as u64, &vec![(b as u8) | 0x80; BS])
                    .unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let vol = f.vol.clone();
            std::thread::spawn(move || {
                for b in (0..32u64).rev() {
                    let _ = vol.read(b * BS as u64 + t * 100, 10).unwrap();
                }
            })
        })
        .collect();
    writer.join().unwrap();
    readers.into_iter().for_each(|t| t.join().unwrap());
    for b in 0..32u64 {
        assert_eq!(
            f.vol.read(b * BS as u64, BS).unwrap(),
            vec![(b as u8) | 0x80; BS],
            "block {b}"
        );
    }
    assert_eq!(f.vol.status().blocks_changed, 32);
}

#[test]
fn partial_writes_keep_the_rest_of_the_block_from_the_backup() {
    let f = fixture(8, 3);
    let mut model = f.data.clone();
    f.vol.write(BS as u64 + 10, b"hello").unwrap();
    model[BS + 10..BS + 15].copy_from_slice(b"hello");
    // Into a zero chunk: the rest must stay zero.
    f.vol.write(5 * BS as u64 + 3, b"zz").unwrap();
    model[5 * BS + 3..5 * BS + 5].copy_from_slice(b"zz");
    assert_eq!(f.vol.read(0, model.len()).unwrap(), model);
    assert!(
        f.vol.write(model.len() as u64 - 1, b"ab").is_err(),
        "write past the end"
    );
}

#[test]
fn a_pending_fetch_does_not_block_reads_of_staged_blocks() {
    let f = fixture(8, 4);
    f.vol.read(BS as u64, 10).unwrap(); // stage block 1
    f.knobs.close_gate();
    let slow = {
        let vol = f.vol.clone();
        std::thread::spawn(move || vol.read(2 * BS as u64, 10).unwrap())
    };
    while f.vol.status().fetches_in_flight == 0 {
        std::thread::yield_now();
    }
    // The fetch of block 2 is held at the gate; block 1 still reads.
    assert_eq!(f.vol.read(BS as u64, 10).unwrap(), f.data[BS..BS + 10]);
    assert!(
        !f.vol.store.present.test(2),
        "the staged read finished while the fetch was pending"
    );
    f.knobs.open_gate();
    assert_eq!(slow.join().unwrap(), f.data[2 * BS..2 * BS + 10]);
}

#[test]
fn flush_persists_presence_so_staged_blocks_survive_reopen() {
    let f = fixture(8, 5);
    f.vol.read(0, 3 * BS).unwrap();
    // Readers are answered before their blocks are staged: let fills end.
    f.vol.quiesce(Duration::from_secs(30));
    f.vol.flush().unwrap();
    let st = f.vol.status();
    assert!(st.blocks_staged >= 2);
    let p = f.vol.store.data_path.with_extension("present");
    let again = crate::staging::PersistentBitmap::open(
        &OsStorage,
        &p,
        crate::staging::MapKind::Present,
        BS as u32,
        st.blocks_total,
    )
    .unwrap();
    assert_eq!(again.bits().count(), st.blocks_staged);
}

/// A disk of `blocks` 64 KiB random blocks backed up, and a way to open
/// its session on any storage, as a restarted daemon would.
pub(super) struct Reopenable {
    _dir: tempfile::TempDir,
    repo: Arc<Repository>,
    m: crate::repo::Manifest,
    pub(super) data: Vec<u8>,
    pub(super) sdir: PathBuf,
    sched: Arc<Scheduler>,
}

impl Reopenable {
    pub(super) fn new(blocks: usize, seed: u64) -> Reopenable {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) =
            Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
        let mut data = vec![0u8; blocks * BS];
        rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
        let m = crate::testutil::backup_images(&repo, dir.path(), "vm", BS, &[&data]);
        let sdir = dir.path().join("staging");
        Reopenable {
            _dir: dir,
            repo,
            m,
            data,
            sdir,
            sched: Scheduler::new("test-fetch", 2),
        }
    }

    pub(super) fn open(&self, storage: &dyn Storage) -> Arc<Volume> {
        crate::testutil::open_volumes(storage, &self.sdir, &self.repo, &self.m, &self.sched)
            .remove(0)
    }
}

#[test]
fn an_unaligned_zeroing_fetches_no_block_it_covers_whole() {
    let f = fixture(140, 35);
    f.vol.write_zeroes(100, 130 * BS as u64).unwrap();
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    // Its partial blocks, 0 and 130, are zero chunks: nothing to fetch.
    assert_eq!(
        st.fetched_blocks, 0,
        "blocks fetched to be zeroed where a piece of the zeroing split them"
    );
    let got = f.vol.read(0, 132 * BS).unwrap();
    assert_eq!(got[..100], f.data[..100]);
    assert!(got[100..100 + 130 * BS].iter().all(|&b| b == 0));
    assert_eq!(got[100 + 130 * BS..], f.data[100 + 130 * BS..132 * BS]);
}
