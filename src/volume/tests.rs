//! Volume unit tests: single fetch per block, write/fetch races, partial
//! writes, staged reads during a pending fetch, flush durability, and the
//! defects of issue 10 (deadlock, promotion, panics, release, sticky failure).

use super::*;
use crate::prefetch::Class;
use crate::repo::testing::{Knobs, TestBackend};
use crate::staging::io::{OsStorage, Storage};
use bytes::Bytes;
use parking_lot::Condvar;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

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

const FETCH_MS: u64 = 40;

/// Queues a profile prefetch of every non-zero block below `n`; returns
/// how many were queued.
fn heavy_prefetch(vol: &Arc<Volume>, n: u64) -> usize {
    (0..n)
        .filter(|&b| vol.prefetch_block(b, Class::Profile))
        .count()
}

#[test]
fn an_on_demand_read_during_heavy_prefetch_waits_one_fetch_not_the_queue() {
    let f = fixture(400, 6);
    f.knobs.chunk_delay(FETCH_MS);
    let queued = heavy_prefetch(&f.vol, 300);
    // 4 workers, 3 of them for background: draining takes seconds.
    assert!(queued > 200);
    let b = 351u64;
    let t = Instant::now();
    let got = f.vol.read(b * BS as u64, 4096).unwrap();
    let took = t.elapsed();
    assert_eq!(got, f.data[b as usize * BS..b as usize * BS + 4096]);
    assert!(
        took < Duration::from_millis(3 * FETCH_MS),
        "on-demand read took {took:?} with {FETCH_MS} ms fetches"
    );
    assert!(
        f.vol.sched.queued(Class::Profile) > 100,
        "the prefetch was still running"
    );
}

#[test]
fn a_guest_read_of_a_block_queued_for_prefetch_promotes_it() {
    let f = fixture(300, 7);
    f.knobs.chunk_delay(FETCH_MS);
    let queued = heavy_prefetch(&f.vol, 300) as u64;
    assert!(queued > 200);
    let b = 298u64; // at the back of the queue
    let t = Instant::now();
    f.vol.read(b * BS as u64, 10).unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(3 * FETCH_MS),
        "read of a queued block took {took:?}"
    );
    f.vol.quiesce(Duration::from_secs(30));
    assert_eq!(
        f.vol.status().fetched_blocks,
        queued,
        "the promoted block was fetched once, not again"
    );
}

#[test]
fn closing_a_volume_ends_queued_prefetches_without_fetching_them() {
    let f = fixture(300, 8);
    f.knobs.chunk_delay(FETCH_MS);
    let queued = heavy_prefetch(&f.vol, 300) as u64;
    f.vol.close();
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    assert_eq!(st.fetches_in_flight, 0);
    // Only the fetches already running when it closed (3 background workers).
    assert!(
        st.fetched_blocks <= 3,
        "{} of {queued} fetched",
        st.fetched_blocks
    );
}

/// Runs `f` on a thread and fails the test if it has not finished within
/// `limit` (a deadlock); the stuck thread is left behind.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}: deadlock"))
}

#[test]
fn overlapping_writes_that_each_cover_one_block_and_part_of_another_never_deadlock() {
    // Write B covers all of block 0 and the first half of block 1; write A
    // covers the second half of block 0 and all of block 1. Forced order:
    // B is done with block 0 before A starts, and A is done with block 1
    // before B goes on to block 1 (or, when A rightly waits for B's block
    // 0 and cannot get there, after 2 s). Claiming every fully covered
    // block first and waiting on the partly covered ones afterwards
    // deadlocks here: B holds 0 and waits for A's 1, A holds 1 and waits
    // for B's 0.
    let f = fixture(4, 11);
    let half = BS as u64 / 2;
    let (a_off, b_off) = (half, 0u64);
    let b_done_with_0 = Arc::new((Mutex::new(false), Condvar::new()));
    let a_done_with_1 = Arc::new((Mutex::new(false), Condvar::new()));
    let (b0, a1) = (b_done_with_0.clone(), a_done_with_1.clone());
    *f.vol.claim_hook.lock() = Some(Arc::new(move |off, b| {
        let signal = |c: &(Mutex<bool>, Condvar)| {
            *c.0.lock() = true;
            c.1.notify_all();
        };
        match (off, b) {
            (o, 0) if o == b_off => {
                signal(&b0);
                let mut g = a1.0.lock();
                let deadline = Instant::now() + Duration::from_secs(2);
                while !*g && Instant::now() < deadline {
                    a1.1.wait_until(&mut g, deadline);
                }
            }
            (o, 1) if o == a_off => signal(&a1),
            _ => {}
        }
    }));
    let vol = f.vol.clone();
    within(
        Duration::from_secs(30),
        "two overlapping writes",
        move || {
            let b = {
                let vol = vol.clone();
                std::thread::spawn(move || vol.write(b_off, &vec![2u8; BS + half as usize]))
            };
            let mut g = b_done_with_0.0.lock();
            while !*g {
                b_done_with_0.1.wait(&mut g);
            }
            drop(g);
            let a = std::thread::spawn(move || vol.write(a_off, &vec![1u8; BS + half as usize]));
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        },
    );
    *f.vol.claim_hook.lock() = None;
    // Each byte holds one of the writes that covered it.
    let got = f.vol.read(0, 2 * BS).unwrap();
    for (j, &g) in got.iter().enumerate() {
        let (in_a, in_b) = (j as u64 >= half, (j as u64) < BS as u64 + half);
        assert!((in_a && g == 1) || (in_b && g == 2), "byte {j} is {g}");
    }
}

#[test]
fn many_overlapping_writes_at_half_block_offsets_all_complete() {
    let pairs = 300usize;
    let f = fixture(2 * pairs, 18);
    let vol = f.vol.clone();
    within(Duration::from_secs(60), "overlapping writes", move || {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let half = BS as u64 / 2;
        let spawn = |who: u8| {
            let (vol, barrier) = (vol.clone(), barrier.clone());
            std::thread::spawn(move || {
                for i in 0..pairs as u64 {
                    barrier.wait();
                    let base = 2 * i * BS as u64;
                    let off = if who == 0 { base + half } else { base };
                    vol.write(off, &vec![who + 1; BS + half as usize]).unwrap();
                }
            })
        };
        let (a, b) = (spawn(0), spawn(1));
        a.join().unwrap();
        b.join().unwrap();
    });
}

#[test]
fn a_full_block_write_promotes_the_prefetch_it_waits_for() {
    let f = fixture(300, 12);
    f.knobs.chunk_delay(FETCH_MS);
    let queued = heavy_prefetch(&f.vol, 300);
    assert!(queued > 200);
    let b = 297u64; // a queued block at the back of the queue
    assert!(f.vol.chunks().has_data(b));
    let t = Instant::now();
    f.vol.write(b * BS as u64, &vec![7u8; BS]).unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(4 * FETCH_MS),
        "a full-block write behind a queued prefetch took {took:?} ({FETCH_MS} ms fetches)"
    );
    assert_eq!(f.vol.read(b * BS as u64, BS).unwrap(), vec![7u8; BS]);
}

#[test]
fn a_panicking_fetch_answers_its_waiters_with_an_error_and_the_next_fetch_works() {
    let f = fixture(8, 13);
    f.knobs.panic_next_chunk();
    let vol = f.vol.clone();
    let r = within(
        Duration::from_secs(20),
        "a read whose fetch panicked",
        move || vol.read(BS as u64, 10),
    );
    let e = r.expect_err("the read fails");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("internal error"), "{e}");
    // The worker survived and the block is fetched on the next read.
    assert_eq!(f.vol.read(BS as u64, 10).unwrap(), f.data[BS..BS + 10]);
    // The waiter wakes before the worker has finished its bookkeeping.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.vol.sched.status().running.on_demand != 0 {
        assert!(
            Instant::now() < deadline,
            "the scheduler's accounting never recovered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn after_close_a_running_fetch_never_lands_in_staging() {
    let f = fixture(8, 14);
    f.knobs.close_gate();
    let vol = f.vol.clone();
    let reader = std::thread::spawn(move || vol.read(BS as u64, 10));
    while f.vol.status().fetches_in_flight == 0 {
        std::thread::yield_now();
    }
    // The fetch is past its start and blocked in the repository read.
    let vol = f.vol.clone();
    within(Duration::from_secs(5), "close", move || vol.close());
    f.knobs.open_gate();
    assert!(
        reader.join().unwrap().is_err(),
        "the released disk's read fails"
    );
    f.vol.quiesce(Duration::from_secs(10));
    let staged = std::fs::read(f.staging.join("disk0.data")).unwrap();
    assert!(
        staged[BS..2 * BS].iter().all(|&b| b == 0),
        "a released volume's fetch wrote into staging"
    );
}

#[test]
fn a_failed_staging_sync_fails_every_later_flush_and_write_and_persists_no_presence() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = fixture_on(8, 15, Arc::new(faults.clone()));
    f.vol.read(0, BS).unwrap();
    f.vol.flush().unwrap();
    let present_before = std::fs::read(f.staging.join("disk0.present")).unwrap();
    // The flusher's sync hits a writeback error once; the kernel reports
    // it once and may have dropped the pages.
    faults.inject(Rule::fail(Op::Sync, "disk0.data", libc::EIO).times(1));
    f.vol.read(BS as u64, BS).unwrap(); // a new presence bit, not yet durable
    let e = f.vol.flush().unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    // The device works again, but nothing of that disk is ever claimed durable.
    for _ in 0..3 {
        let e = f.vol.flush().unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(e.to_string().contains("has failed"), "{e}");
    }
    assert!(
        f.vol.write(0, b"x").is_err(),
        "a failed disk refuses writes"
    );
    assert_eq!(f.vol.read(0, 10).unwrap(), f.data[..10], "reads go on");
    assert_eq!(
        std::fs::read(f.staging.join("disk0.present")).unwrap(),
        present_before,
        "no presence bit was persisted after the failed sync"
    );
    let st = f.vol.status();
    assert!(st.failed.unwrap().contains("Input/output error"));
}

#[test]
fn a_failed_changed_map_sync_fails_the_write_and_the_disk() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = fixture_on(8, 16, Arc::new(faults.clone()));
    faults.inject(Rule::fail(Op::Sync, "disk0.changed", libc::EIO).times(1));
    let e = f.vol.write(3, b"abc").unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(f.vol.flush().is_err(), "sticky");
    assert!(f.vol.is_failed());
}

#[test]
fn concurrent_flushes_share_syncs() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = FaultyStorage::new(OsStorage::shared());
    // Each data sync takes 50 ms, so callers pile up behind one.
    faults.inject(Rule::delay(
        Op::Sync,
        "disk0.data",
        Duration::from_millis(50),
    ));
    let f = fixture_on(8, 17, Arc::new(faults.clone()));
    f.vol.write(0, b"abc").unwrap();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let vol = f.vol.clone();
            std::thread::spawn(move || vol.flush().unwrap())
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let syncs = f.vol.status().flushes;
    assert!(syncs <= 4, "16 concurrent flushes took {syncs} syncs");
}

#[test]
fn a_miss_answers_from_the_fetched_bytes_without_reading_staging_back() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = FaultyStorage::new(OsStorage::shared());
    // 40 blocks: a cold read spans three 1 MiB pieces.
    let f = fixture_on(40, 19, Arc::new(faults.clone()));
    faults.inject(Rule::fail(Op::Read, "disk0.data", libc::EIO));
    let n = 40 * BS;
    assert_eq!(
        f.vol.read(10, n - 20).unwrap(),
        f.data[10..n - 10],
        "cold read"
    );
    // Readers are answered before their blocks are staged: let fills end.
    f.vol.quiesce(Duration::from_secs(30));
    assert_eq!(
        f.vol.status().blocks_staged,
        32,
        "the zero chunks stay holes"
    );
    assert_eq!(f.vol.status().staging_reads, 0, "a waiter read staging");
    // The same blocks now come from staging, which fails.
    assert_eq!(f.vol.read(BS as u64, 10).unwrap_err().errno(), libc::EIO);
    faults.clear();
    assert_eq!(
        f.vol.read(0, n).unwrap(),
        f.data[..n],
        "staging holds the same"
    );
}

#[test]
fn waiters_of_a_one_block_miss_share_the_fetched_bytes_without_a_copy_or_a_staging_read() {
    let f = fixture(8, 23);
    f.knobs.close_gate();
    // Three reads within block 1, all waiting for its one fetch.
    let ranges = [(BS + 10, 100), (BS, BS), (2 * BS - 4096, 4096)];
    let readers: Vec<_> = ranges
        .iter()
        .map(|&(off, len)| {
            let vol = f.vol.clone();
            std::thread::spawn(move || vol.read_bytes(off as u64, len).unwrap())
        })
        .collect();
    // Generous: every reader must have joined the fetch before it ends.
    std::thread::sleep(Duration::from_millis(1000));
    f.knobs.open_gate();
    let got: Vec<Bytes> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    for (&(off, len), b) in ranges.iter().zip(&got) {
        assert_eq!(b[..], f.data[off..off + len]);
    }
    // Readers are answered before their blocks are staged: let fills end.
    f.vol.quiesce(Duration::from_secs(30));
    // Each answer is a slice of one buffer: the fetched chunk itself.
    let base = |i: usize| got[i].as_ptr() as usize - (ranges[i].0 - BS);
    assert!(
        base(0) == base(1) && base(1) == base(2),
        "a waiter got a copy"
    );
    let st = f.vol.status();
    assert_eq!((st.fetched_blocks, st.staging_reads), (1, 0));
    // Now staged: the next read of the block is a staging read.
    assert_eq!(f.vol.read(BS as u64, BS).unwrap(), f.data[BS..2 * BS]);
    assert_eq!(f.vol.status().staging_reads, 1);
}

#[test]
fn concurrent_first_writes_share_changed_map_syncs() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::mem::MemStorage;
    let r = Reopenable::new(32, 18);
    let mem = MemStorage::new();
    let faults = FaultyStorage::new(Arc::new(mem.clone()));
    // Each map sync takes 30 ms, so first writes pile up behind one.
    faults.inject(Rule::delay(
        Op::Sync,
        "disk0.changed",
        Duration::from_millis(30),
    ));
    let vol = r.open(&faults);
    let syncs = || mem.syncs_of("disk0.changed").len();
    let before = syncs();
    // One write of 16 blocks: one sync of the changed map, not 16.
    vol.write(0, &vec![1u8; 16 * BS]).unwrap();
    assert_eq!(syncs() - before, 1, "a 16-block first write");
    let before = syncs();
    let start = Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (16..32u64)
        .map(|b| {
            let (vol, start) = (vol.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                vol.write(b * BS as u64, &vec![b as u8; BS]).unwrap();
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let n = syncs() - before;
    assert!(
        n <= 4,
        "16 concurrent first writes took {n} changed-map syncs"
    );
    assert_eq!(vol.status().blocks_changed, 32);
    vol.close();
}

/// A disk of `blocks` 64 KiB random blocks backed up, and a way to open
/// its session on any storage, as a restarted daemon would.
pub(super) struct Reopenable {
    _dir: tempfile::TempDir,
    repo: Arc<Repository>,
    m: crate::repo::Manifest,
    data: Vec<u8>,
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
fn a_daemon_crash_keeps_unflushed_writes_and_the_epoch_and_a_power_cut_does_neither() {
    use crate::disk::Disk;
    use crate::staging::io::mem::MemStorage;
    let r = Reopenable::new(8, 31);
    let mem = MemStorage::new();
    let vol = r.open(&mem);
    let epoch = Disk::epoch(vol.as_ref());
    // A partial write into a block never staged (fill, then write) and a
    // whole-block write: neither flushed.
    vol.write(2 * BS as u64 + 10, b"unflushed").unwrap();
    vol.write(5 * BS as u64, &vec![7u8; BS]).unwrap();
    let at = mem.position();

    let killed = mem.kill_state(at);
    let again = r.open(&killed);
    assert_eq!(
        again.read(2 * BS as u64 + 10, 9).unwrap(),
        b"unflushed",
        "a daemon crash lost an unflushed write"
    );
    assert_eq!(again.read(5 * BS as u64, BS).unwrap(), vec![7u8; BS]);
    assert_eq!(
        again.read(2 * BS as u64, 10).unwrap(),
        r.data[2 * BS..2 * BS + 10],
        "the rest of the block is the backup's"
    );
    assert_eq!(
        Disk::epoch(again.as_ref()),
        epoch,
        "the epoch changed over a daemon crash"
    );
    again.close();

    let mut rng = rand::rngs::mock::StepRng::new(0, 1);
    let cut = mem.crash_state(at, 1.0, &mut rng);
    let after_power = r.open(&cut);
    assert_eq!(
        after_power.read(5 * BS as u64, BS).unwrap(),
        r.data[5 * BS..6 * BS],
        "after a power cut an unflushed block is the backup's again"
    );
    assert_ne!(
        Disk::epoch(after_power.as_ref()),
        epoch,
        "a power cut kept the epoch"
    );
    after_power.close();
    vol.close();
}

#[test]
fn after_a_failed_sync_the_next_daemon_trusts_no_unsynced_block_and_changes_the_epoch() {
    use crate::disk::Disk;
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let r = Reopenable::new(8, 32);
    let faults = FaultyStorage::new(OsStorage::shared());
    let vol = r.open(&faults);
    let epoch = Disk::epoch(vol.as_ref());
    vol.write(3 * BS as u64, &vec![9u8; BS]).unwrap();
    faults.inject(Rule::fail(Op::Sync, "disk0.data", libc::EIO).times(1));
    assert!(vol.flush().is_err());
    vol.close();
    drop(vol);
    // The same boot: only the mirror's poison tells the next daemon that
    // the kernel may have dropped those pages.
    let again = r.open(&OsStorage);
    assert_eq!(
        again.read(3 * BS as u64, BS).unwrap(),
        r.data[3 * BS..4 * BS],
        "a block whose sync failed was trusted"
    );
    assert_ne!(
        Disk::epoch(again.as_ref()),
        epoch,
        "NFS clients would not resend"
    );
    again.close();
}

#[test]
fn a_writeback_error_a_killed_daemon_never_saw_makes_the_next_one_trust_no_unsynced_block() {
    use crate::disk::Disk;
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::mem::MemStorage;
    let r = Reopenable::new(8, 33);
    let mem = MemStorage::new();
    let vol = r.open(&mem);
    let epoch = Disk::epoch(vol.as_ref());
    vol.write(3 * BS as u64, &vec![9u8; BS]).unwrap();
    // `kill -9` before any flush; the kernel then failed to write the
    // block back, which no descriptor has reported yet: the restarted
    // daemon's first sync of the data file is the one that sees it.
    let killed = FaultyStorage::new(Arc::new(mem.kill_state(mem.position())));
    killed.inject(Rule::fail(Op::Sync, "disk0.data", libc::EIO).times(1));
    let again = r.open(&killed);
    assert_eq!(
        again.read(3 * BS as u64, BS).unwrap(),
        r.data[3 * BS..4 * BS],
        "a block whose writeback failed was trusted from the mirror"
    );
    assert_ne!(
        Disk::epoch(again.as_ref()),
        epoch,
        "NFS clients would not resend"
    );
    again.close();
    vol.close();
}

/// Log lines at WARN and above from every test in this binary (a global
/// subscriber: fetches log on the engine's threads); tests pick out their
/// own by a path unique to them.
fn captured_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct W(&'static Mutex<Vec<u8>>);
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || W(log))
            .finish();
        tracing::subscriber::set_global_default(sub).expect("no other global subscriber");
        log
    })
}

#[test]
fn staging_write_failures_of_answered_misses_are_counted_apart_and_logged_once_as_a_warning() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let log = captured_log();
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = fixture_on(16, 57, Arc::new(faults.clone()));
    // Staging is full: every staging write of a fetched block fails.
    faults.inject(Rule::fail(Op::Write, "disk0.data", libc::ENOSPC));
    let blocks = [12u64, 3, 8, 1, 14, 6];
    for b in blocks {
        let off = b * BS as u64 + 7;
        assert_eq!(f.vol.read(off, 100).unwrap(), f.data[off as usize..][..100]);
    }
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    assert_eq!(
        st.fetch_errors, 0,
        "answered reads counted as failed fetches"
    );
    assert!(st.last_fetch_error.is_none());
    assert!(st.staging_write_errors >= blocks.len() as u64);
    assert_eq!(st.blocks_staged, 0);
    // Within 10 s: one warning for them all, and no error line.
    let ours = f.staging.display().to_string();
    let text = String::from_utf8_lossy(&log.lock()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&ours)).collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("No space left"),
        "{}",
        lines[0]
    );
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
