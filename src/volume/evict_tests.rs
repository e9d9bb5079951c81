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

#[test]
fn a_fill_that_cannot_evict_anything_fails_with_enospc_and_the_limit_holds() {
    let f = fixture(16, 42);
    let budget = Budget::new(&f.staging);
    budget.set_limits(4 * BS as u64, 0);
    f.vol.attach_budget(budget.clone(), f.staging.clone());
    for b in 0..4u64 {
        f.vol.write(b * BS as u64, &vec![b as u8 + 1; BS]).unwrap();
    }
    let e = f.vol.read(8 * BS as u64, 10).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::NoSpace, "{e}");
    assert!(e.to_string().contains("nothing can be evicted"), "{e}");
    assert_eq!(budget.status().refused_fills, 1);
    assert!(budget.used() <= 4 * BS as u64);
    for b in 0..4u64 {
        assert_eq!(
            f.vol.read(b * BS as u64, BS).unwrap(),
            vec![b as u8 + 1; BS]
        );
    }
}

#[test]
fn a_staged_read_or_write_never_waits_for_an_evictions_map_sync() {
    use crate::staging::budget::Evictable;
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    use crate::staging::io::OsStorage;
    use std::time::{Duration, Instant};
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = super::super::tests::fixture_on(8, 42, Arc::new(faults.clone()));
    f.vol.read(0, 8 * BS).unwrap();
    f.vol.write(7 * BS as u64, b"changed").unwrap();
    f.vol.flush().unwrap();
    // The eviction's presence-map sync hangs for 2 s.
    faults.inject(Rule::delay(
        Op::Sync,
        "disk0.present",
        Duration::from_secs(2),
    ));
    let evictor = {
        let vol = f.vol.clone();
        std::thread::spawn(move || vol.evict(BS as u64).unwrap())
    };
    std::thread::sleep(Duration::from_millis(300));
    // What FUSE serves on its event threads: a staged read, a quick write.
    let staged = (1..7u64)
        .find(|&b| f.vol.is_local(b * BS as u64, BS as u64) && b % 5 != 0)
        .expect("a block still staged");
    let t = Instant::now();
    let off = staged * BS as u64;
    assert_eq!(f.vol.read(off, BS).unwrap(), f.data[off as usize..][..BS]);
    assert!(f.vol.write_is_quick(7 * BS as u64, 3));
    f.vol.write(7 * BS as u64, b"again").unwrap();
    let waited = t.elapsed();
    assert_eq!(evictor.join().unwrap(), BS as u64, "one block evicted");
    assert!(
        waited < Duration::from_millis(1500),
        "a staged read and a quick write waited {waited:?} for the eviction's sync"
    );
}
