//! Eviction under load: every read matches a model while blocks are
//! evicted and fetched again, changed blocks never go, and the budget
//! holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use rand::{Rng, SeedableRng};

use super::super::tests::fixture;
use crate::staging::budget::Budget;

const BS: usize = 65536;

#[test]
fn reads_and_writes_racing_the_evictor_always_see_the_model_and_staging_stays_under_its_limit() {
    let f = fixture(64, 41);
    let budget = Budget::new(&f.staging);
    let max = 16 * BS as u64;
    budget.set_limits(max, 0);
    f.vol.attach_budget(budget.clone(), f.staging.clone());
    // Writers take the model's lock exclusively around a write, readers
    // shared around a read: each read has one right answer. The evictor
    // (background, and the fills themselves) never takes it.
    let model = Arc::new(RwLock::new(f.data.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let size = f.data.len();
    let readers: Vec<_> = (0..4u64)
        .map(|t| {
            let (vol, model, stop) = (f.vol.clone(), model.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) || n < 200 {
                    let off = rng.gen_range(0..size - 1);
                    let len = rng.gen_range(1..=(3 * BS).min(size - off));
                    let m = model.read();
                    let got = vol.read(off as u64, len).unwrap();
                    assert!(
                        got == m[off..off + len],
                        "read of {len} bytes at {off} differs from the model"
                    );
                    n += 1;
                }
            })
        })
        .collect();
    let flusher = {
        let (vol, stop) = (f.vol.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                vol.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
        })
    };
    let watcher = {
        let (budget, stop) = (budget.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert!(
                    budget.used() <= max,
                    "staging passed its limit: {:?}",
                    budget.status()
                );
                std::thread::yield_now();
            }
        })
    };
    // Writes (whole and partial blocks, across block edges) stay in the
    // first 8 blocks, so at most 8 blocks are changed and reads find room.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for i in 0..300 {
        let len = if i % 3 == 0 {
            BS
        } else {
            rng.gen_range(1..2 * BS)
        };
        let off = if i % 3 == 0 {
            rng.gen_range(0..8) * BS
        } else {
            rng.gen_range(0..8 * BS - len)
        };
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let mut m = model.write();
        f.vol.write(off as u64, &data).unwrap();
        m[off..off + len].copy_from_slice(&data);
        drop(m);
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    readers.into_iter().for_each(|t| t.join().unwrap());
    flusher.join().unwrap();
    watcher.join().unwrap();
    let st = f.vol.status();
    assert!(
        st.evicted_blocks > 64,
        "too few evictions to mean anything: {st:?}"
    );
    assert_eq!(
        f.vol.read(0, size).unwrap(),
        *model.read(),
        "the whole disk differs from the model"
    );
    for b in 0..f.vol.nblocks() {
        if f.vol.store.changed.test(b) {
            assert!(f.vol.store.present.test(b), "changed block {b} was evicted");
        }
    }
    assert!(budget.used() <= max);
    assert_eq!(budget.status().refused_fills, 0);
}

/// A fixture whose staging budget (4 blocks) is full of changed blocks:
/// nothing can be evicted.
fn full_of_changed_blocks(seed: u64) -> (super::super::tests::Fixture, Arc<Budget>) {
    let f = fixture(16, seed);
    let budget = Budget::new(&f.staging);
    budget.set_limits(4 * BS as u64, 0);
    f.vol.attach_budget(budget.clone(), f.staging.clone());
    for b in 0..4u64 {
        f.vol.write(b * BS as u64, &vec![b as u8 + 1; BS]).unwrap();
    }
    (f, budget)
}

#[test]
fn a_read_finding_staging_full_and_nothing_evictable_is_answered_from_the_repository_unstaged() {
    let (f, budget) = full_of_changed_blocks(42);
    for (off, len) in [(8 * BS + 7, 10), (8 * BS, BS), (6 * BS - 5, 2 * BS + 10)] {
        assert_eq!(
            f.vol.read(off as u64, len).unwrap(),
            f.data[off..off + len],
            "read of {len} bytes at {off}"
        );
        // Its fill leaves the in-flight table after answering: the next
        // read must not join it.
        f.vol.quiesce(std::time::Duration::from_secs(10));
    }
    let st = f.vol.status();
    assert!(!f.vol.is_local(8 * BS as u64, 1), "block 8 was staged");
    // Block 8 read through three times (fetched each time), 6 and 7
    // once; block 5 is a zero chunk.
    assert_eq!((st.read_through, st.fetched_blocks), (5, 5), "{st:?}");
    assert_eq!(st.fetch_errors, 0);
    assert!(budget.used() <= 4 * BS as u64);
    for b in 0..4u64 {
        assert_eq!(
            f.vol.read(b * BS as u64, BS).unwrap(),
            vec![b as u8 + 1; BS]
        );
    }
}

#[test]
fn a_write_that_needs_room_in_a_full_staging_fails_with_enospc_and_the_limit_holds() {
    let (f, budget) = full_of_changed_blocks(43);
    // A partial write needs the block's old bytes staged; a whole one
    // needs room for its own.
    for (off, len) in [(9 * BS + 3, 100), (11 * BS, BS)] {
        let e = f.vol.write(off as u64, &vec![9; len]).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::NoSpace, "{e}");
        assert!(e.to_string().contains("nothing can be evicted"), "{e}");
        assert_eq!(f.vol.read(off as u64, len).unwrap(), f.data[off..off + len]);
    }
    assert!(budget.status().refused_fills >= 2);
    assert!(budget.used() <= 4 * BS as u64);
}

/// How a fill ends with no bytes for those that joined it: a write's
/// fill refused room (`NoSpace`), or a prefetch held back (`Ok`).
fn ended_without_bytes() -> [crate::error::Result<()>; 2] {
    [
        Err(crate::error::Error::new(
            crate::error::ErrorKind::NoSpace,
            "staging is full (test)",
        )),
        Ok(()),
    ]
}

/// Puts a fill of block `b` in the in-flight table as a prefetch holds
/// it, runs `io` (which must join it: `joined` says when), then ends it
/// with `outcome` and no bytes.
fn join_a_fill_ending_without_bytes<T: Send + 'static>(
    f: &super::super::tests::Fixture,
    b: u64,
    outcome: crate::error::Result<()>,
    joined: fn(&super::super::fill::Slot) -> bool,
    io: impl FnOnce() -> T + Send + 'static,
) -> T {
    use super::super::fill::Slot;
    use std::time::{Duration, Instant};
    // An earlier read's fill of `b` leaves the table after answering it.
    f.vol.quiesce(Duration::from_secs(10));
    let slot = Slot::new(crate::prefetch::Class::Profile);
    let earlier = f.vol.inflight.lock().insert(b, slot.clone());
    assert!(earlier.is_none(), "block {b} was being filled");
    let t = std::thread::spawn(io);
    let t0 = Instant::now();
    while !joined(&slot) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the I/O did not join"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    f.vol.inflight.lock().remove(&b);
    slot.finish(outcome);
    t.join().unwrap()
}

fn read_joined(s: &super::super::fill::Slot) -> bool {
    s.read_waits.load(Ordering::Acquire)
}

#[test]
fn a_read_that_joined_a_fill_refused_room_or_held_back_reads_through_instead_of_failing() {
    let (f, _budget) = full_of_changed_blocks(44);
    // Within one block (the fetched-block path), and across two (pieces).
    for outcome in ended_without_bytes() {
        for (b, off, len) in [(8u64, 8 * BS + 5, 100), (12, 12 * BS - 10, 20)] {
            let vol = f.vol.clone();
            let got =
                join_a_fill_ending_without_bytes(&f, b, outcome.clone(), read_joined, move || {
                    vol.read(off as u64, len)
                });
            assert_eq!(got.unwrap(), f.data[off..off + len], "read at {off}");
        }
    }
    assert!(f.vol.status().read_through >= 4);
}

#[test]
fn a_read_waiting_later_on_a_fill_refused_room_or_held_back_is_answered_not_failed() {
    let (f, _budget) = full_of_changed_blocks(45);
    let pool = crate::pool::WorkerPool::new("test-io", 2);
    let spawner: crate::disk::Spawner = Arc::new(move |job| pool.submit(job));
    let off = 8 * BS + 5;
    for outcome in ended_without_bytes() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (vol, spawner) = (f.vol.clone(), spawner.clone());
        join_a_fill_ending_without_bytes(&f, 8, outcome, read_joined, move || {
            let done: crate::disk::ReadDone = Box::new(move |r| tx.send(r).unwrap());
            assert!(vol.read_later(off as u64, 100, done, &spawner).is_ok());
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("answered");
        assert_eq!(got.unwrap()[..], f.data[off..off + 100]);
    }
}

#[test]
fn a_partial_write_that_joined_a_held_back_prefetch_fills_the_block_itself_and_lands() {
    let f = fixture(16, 48);
    let budget = Budget::new(&f.staging);
    budget.set_limits(8 * BS as u64, 0);
    f.vol.attach_budget(budget.clone(), f.staging.clone());
    let vol = f.vol.clone();
    join_a_fill_ending_without_bytes(
        &f,
        8,
        Ok(()),
        |s| s.write_waits.load(Ordering::Acquire),
        move || vol.write(8 * BS as u64 + 10, b"written").unwrap(),
    );
    let mut want = f.data[8 * BS..9 * BS].to_vec();
    want[10..17].copy_from_slice(b"written");
    assert_eq!(f.vol.read(8 * BS as u64, BS).unwrap(), want);
}

/// Two disks of `blocks` blocks (seeds `seed`, `seed + 1`) sharing one
/// staging budget of `limit_blocks` blocks.
fn two_disks(
    blocks: usize,
    seed: u64,
    limit_blocks: u64,
) -> (
    super::super::tests::Fixture,
    super::super::tests::Fixture,
    Arc<Budget>,
) {
    let (a, b) = (fixture(blocks, seed), fixture(blocks, seed + 1));
    let budget = Budget::new(&a.staging);
    budget.set_limits(limit_blocks * BS as u64, 0);
    a.vol.attach_budget(budget.clone(), a.staging.clone());
    b.vol.attach_budget(budget.clone(), b.staging.clone());
    (a, b, budget)
}

#[test]
fn one_disks_prefetch_stays_below_the_low_watermark_and_never_evicts_another_disks_blocks() {
    // 20 blocks; the low watermark holds 15 (16, less a rounding).
    let (a, b, budget) = two_disks(32, 46, 20);
    let limit = 20 * BS as u64;
    // Disk a's working set: 10 blocks read by its guest.
    let working: Vec<u64> = (1..32).filter(|b| b % 5 != 0).take(10).collect();
    for &blk in &working {
        a.vol.read(blk * BS as u64, 100).unwrap();
    }
    a.vol.quiesce(std::time::Duration::from_secs(10));
    // Disk b prefetches all it has (a profile), twice over.
    for _ in 0..2 {
        for blk in 0..32 {
            b.vol.prefetch_block(blk, crate::prefetch::Class::Profile);
        }
        b.vol.quiesce(std::time::Duration::from_secs(10));
    }
    for &blk in &working {
        assert!(
            a.vol.is_local(blk * BS as u64, 100),
            "disk a's block {blk} was evicted for disk b's prefetch"
        );
    }
    let st = budget.status();
    assert!(st.used <= limit / 1000 * 800, "{st:?}");
    assert!(st.prefetches_held_back > 0, "{st:?}");
    // b staged what fitted below the watermark (80 % of 20 blocks, less
    // a rounding: 15) beside a's 10.
    let low_blocks = limit / 1000 * 800 / BS as u64;
    assert_eq!(b.vol.status().blocks_staged, low_blocks - 10, "{st:?}");
    assert_eq!(b.vol.status().fetch_errors, 0);
    // A guest miss of b still fills up to the limit, evicting as usual.
    let miss = (0..32u64)
        .find(|&blk| blk % 5 != 0 && !b.vol.is_local(blk * BS as u64, 100))
        .unwrap();
    b.vol.read(miss * BS as u64, 100).unwrap();
    b.vol.quiesce(std::time::Duration::from_secs(10));
    assert!(b.vol.is_local(miss * BS as u64, 100));
}

/// A disk of 64 blocks (every fifth a zero chunk) and its first `n` data
/// blocks read by its guest (staged, unchanged).
fn warmed(f: &super::super::tests::Fixture, n: usize) -> Vec<u64> {
    let blocks: Vec<u64> = (0..64).filter(|b| b % 5 != 0).take(n).collect();
    for &b in &blocks {
        f.vol.read(b * BS as u64, 100).unwrap();
    }
    f.vol.quiesce(std::time::Duration::from_secs(10));
    blocks
}

#[test]
fn readahead_replaces_its_own_disks_blocks_at_the_watermark_and_is_held_back_above_it() {
    use crate::prefetch::Class;
    // 40 blocks: the low watermark holds 31, the high 36.
    let (a, b, budget) = two_disks(64, 49, 40);
    // At the watermark, disk a's own: a readahead evicts a batch of a's.
    let read = warmed(&a, 31);
    let next = (0..64).find(|&x| x % 5 != 0 && !read.contains(&x)).unwrap();
    assert!(a.vol.prefetch_block(next, Class::Readahead));
    a.vol.quiesce(std::time::Duration::from_secs(10));
    assert!(a.vol.is_local(next * BS as u64, 1));
    assert_eq!(a.vol.status().evicted_blocks, 8);
    // Guest misses of b push staging over the watermark (a's 24 and b's
    // 11 of 40, below the high one): b's readahead is held back, evicting
    // nothing.
    warmed(&b, 11);
    let before = budget.status();
    assert_eq!(before.used, 35 * BS as u64, "{before:?}");
    assert!(b.vol.prefetch_block(41, Class::Readahead));
    b.vol.quiesce(std::time::Duration::from_secs(10));
    let after = budget.status();
    assert!(!b.vol.is_local(41 * BS as u64, 1));
    assert_eq!(after.evicted_blocks, before.evicted_blocks, "{after:?}");
    assert_eq!(after.prefetches_held_back, before.prefetches_held_back + 1);
}

#[test]
fn a_profile_admitted_into_a_warm_staging_makes_room_below_the_watermark_and_is_staged() {
    use crate::prefetch::Class;
    let (a, b, budget) = two_disks(64, 51, 40);
    let limit = 40 * BS as u64;
    // Disk a's guest read 34 blocks (85 %: the steady state of a shared
    // staging, between the watermarks).
    warmed(&a, 34);
    // Disk b's profile: 10 blocks, which fit below the watermark once
    // a's oldest go (admission counts them as room).
    let profile: Vec<u64> = (0..64).filter(|x| x % 5 != 0).take(10).collect();
    b.vol.make_room_for_prefetch(10 * BS as u64);
    for &x in &profile {
        b.vol.prefetch_block(x, Class::Profile);
    }
    b.vol.quiesce(std::time::Duration::from_secs(10));
    let st = budget.status();
    assert_eq!(b.vol.status().blocks_staged, 10, "{st:?}");
    assert_eq!(st.prefetches_held_back, 0, "{st:?}");
    assert!(st.used <= limit / 1000 * 800, "{st:?}");
}
