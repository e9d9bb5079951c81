use super::*;
use crate::staging::io::mem::MemStorage;
use crate::staging::io::OsStorage;

#[test]
fn concurrent_setters_each_see_exactly_one_new_set() {
    let bm = Arc::new(AtomicBitmap::new(10_000));
    let newly = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (bm, newly) = (bm.clone(), newly.clone());
            std::thread::spawn(move || {
                for i in 0..10_000u64 {
                    let b = (i * 7919 + t * 13) % 10_000;
                    if bm.set(b) {
                        newly.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(bm.count(), 10_000);
    assert_eq!(newly.load(Ordering::Relaxed), 10_000);
}

#[test]
fn word_wise_searches_and_runs_agree_with_a_bit_by_bit_walk() {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    for nbits in [1, 63, 64, 65, 200, 1000] {
        let bm = AtomicBitmap::new(nbits);
        // Long runs of ones and zeros, and single bits.
        let mut b = 0;
        while b < nbits {
            let len = rand::Rng::gen_range(&mut rng, 1..150).min(nbits - b);
            if rand::Rng::gen_bool(&mut rng, 0.5) {
                (b..b + len).for_each(|x| _ = bm.set(x));
            }
            b += len;
        }
        for from in 0..nbits {
            for to in [from, from + 1, nbits / 2, nbits, nbits + 5] {
                let end = to.min(nbits);
                let want = |v: bool| (from..end).find(|&x| bm.test(x) == v).unwrap_or(end);
                assert_eq!(bm.next_set(from, to), want(true));
                assert_eq!(bm.next_clear(from, to), want(false));
            }
        }
        let mut runs = vec![];
        let mut start = None;
        for x in 0..=nbits {
            match (x < nbits && bm.test(x), start) {
                (true, None) => start = Some(x),
                (false, Some(s)) => (runs.push((s, x)), start = None).1,
                _ => {}
            }
        }
        assert_eq!(bm.ranges(), runs, "{nbits} bits");
    }
}

#[test]
fn persisted_bits_survive_reopen_and_unpersisted_do_not() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m");
    {
        let m = PersistentBitmap::open(&OsStorage, &p, MapKind::Present, 65536, 130).unwrap();
        m.set(0);
        m.set(129);
        m.persist().unwrap();
        m.set(64); // never persisted: a crash loses it, which is safe
    }
    let m = PersistentBitmap::open(&OsStorage, &p, MapKind::Present, 65536, 130).unwrap();
    assert!(m.test(0) && m.test(129) && !m.test(64));
    assert_eq!(m.bits().ranges(), vec![(0, 1), (129, 130)]);
}

#[test]
fn durable_set_is_on_disk_before_it_returns() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c");
    let m = PersistentBitmap::open(&OsStorage, &p, MapKind::Changed, 65536, 100).unwrap();
    m.set_durable(70).unwrap();
    let again = PersistentBitmap::open(&OsStorage, &p, MapKind::Changed, 65536, 100).unwrap();
    assert!(again.test(70));
}

#[test]
fn concurrent_durable_sets_all_reach_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c");
    let m = Arc::new(PersistentBitmap::open(&OsStorage, &p, MapKind::Changed, 65536, 256).unwrap());
    let ts: Vec<_> = (0..4)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || (0..64).for_each(|i| m.set_durable(i * 4 + t).unwrap()))
        })
        .collect();
    ts.into_iter().for_each(|t| t.join().unwrap());
    let again = PersistentBitmap::open(&OsStorage, &p, MapKind::Changed, 65536, 256).unwrap();
    assert_eq!(again.bits().count(), 256);
}

/// The map as a power cut now would leave it: only synced writes.
fn after_power_cut(mem: &MemStorage, p: &Path, nbits: u64) -> PersistentBitmap {
    let mut rng = rand::rngs::mock::StepRng::new(0, 1);
    let cut = mem.crash_state(mem.position(), 0.0, &mut rng);
    PersistentBitmap::open(&cut, p, MapKind::Changed, 65536, nbits).unwrap()
}

#[test]
fn a_durable_set_of_many_bits_costs_one_sync_and_survives_a_power_cut() {
    let mem = MemStorage::new();
    mem.create_dir_all(Path::new("/s")).unwrap();
    let p = Path::new("/s/c");
    let m = PersistentBitmap::open(&mem, p, MapKind::Changed, 65536, 256).unwrap();
    let before = mem.syncs_of("/s/c").len();
    m.set_many_durable(60..76).unwrap();
    assert_eq!(mem.syncs_of("/s/c").len() - before, 1, "16 bits, one sync");
    assert!((60..76).all(|b| m.test_durable(b)));
    let cut = after_power_cut(&mem, p, 256);
    assert_eq!(cut.bits().ranges(), vec![(60, 76)]);
    // Already durable: no sync at all.
    m.set_many_durable(60..76).unwrap();
    assert_eq!(mem.syncs_of("/s/c").len() - before, 1);
}

#[test]
fn a_bit_a_killed_daemon_wrote_but_never_synced_is_synced_before_it_counts_as_durable() {
    let mem = MemStorage::new();
    mem.create_dir_all(Path::new("/s")).unwrap();
    let p = Path::new("/s/c");
    drop(PersistentBitmap::open(&mem, p, MapKind::Changed, 65536, 256).unwrap());
    // A group commit's word write, then `kill -9` before its sync: the
    // page cache (this MemStorage, same boot) holds the word, unsynced.
    let f = mem.open(p, Open::Existing).unwrap();
    f.write_all_at(&(1u64 << 6).to_le_bytes(), HEADER_LEN + 8)
        .unwrap();
    drop(f);
    // The restarted daemon reads the bit and takes it as durable: a durable
    // set of it returns without syncing anything.
    let m = PersistentBitmap::open(&mem, p, MapKind::Changed, 65536, 256).unwrap();
    assert!(m.test_durable(70));
    m.set_durable(70).unwrap();
    let cut = after_power_cut(&mem, p, 256);
    assert!(
        cut.bits().test(70),
        "a bit the map said was durable was lost by a power cut"
    );
}

#[test]
fn concurrent_durable_setters_share_syncs_and_return_only_once_their_bit_is_synced() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let mem = MemStorage::new();
    mem.create_dir_all(Path::new("/s")).unwrap();
    let faults = FaultyStorage::new(Arc::new(mem.clone()));
    // Each sync takes 30 ms, so setters pile up behind one.
    faults.inject(Rule::delay(
        Op::Sync,
        "/s/c",
        std::time::Duration::from_millis(30),
    ));
    let p = Path::new("/s/c");
    let m = Arc::new(PersistentBitmap::open(&faults, p, MapKind::Changed, 65536, 1024).unwrap());
    let before = mem.syncs_of("/s/c").len();
    let n = 16;
    let start = Arc::new(std::sync::Barrier::new(n));
    let ts: Vec<_> = (0..n as u64)
        .map(|i| {
            let (m, mem, start) = (m.clone(), mem.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                m.set_durable(i * 64 + i).unwrap();
                assert!(
                    after_power_cut(&mem, p, 1024).test(i * 64 + i),
                    "bit {} was acknowledged before it was synced",
                    i * 64 + i
                );
            })
        })
        .collect();
    ts.into_iter().for_each(|t| t.join().unwrap());
    let syncs = mem.syncs_of("/s/c").len() - before;
    assert!(syncs <= 4, "{n} concurrent durable sets took {syncs} syncs");
    assert_eq!(after_power_cut(&mem, p, 1024).bits().count(), n as u64);
}

#[test]
fn a_failed_group_sync_fails_its_setters_and_the_next_round_writes_their_bits() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let mem = MemStorage::new();
    mem.create_dir_all(Path::new("/s")).unwrap();
    let faults = FaultyStorage::new(Arc::new(mem.clone()));
    let p = Path::new("/s/c");
    let m = PersistentBitmap::open(&faults, p, MapKind::Changed, 65536, 256).unwrap();
    faults.inject(Rule::fail(Op::Sync, "/s/c", libc::EIO).times(1));
    assert_eq!(m.set_durable(1).unwrap_err().errno(), libc::EIO);
    assert!(!m.test_durable(1));
    assert!(
        m.set_durable(1).is_err(),
        "its round failed: still not durable"
    );
    m.set_durable(200).unwrap();
    let cut = after_power_cut(&mem, p, 256);
    assert!(
        cut.test(1) && cut.test(200),
        "the failed round's bit was retried"
    );
    assert!(m.test_durable(1));
}

#[test]
fn a_durable_clear_is_never_undone_by_an_exclusive_persist() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c");
    let m = Arc::new(PersistentBitmap::open(&OsStorage, &p, MapKind::Copied, 65536, 128).unwrap());
    for b in 0..128 {
        m.set(b);
    }
    m.persist_exclusive().unwrap();
    let clearer = {
        let m = m.clone();
        std::thread::spawn(move || {
            (0..128)
                .step_by(3)
                .for_each(|b| m.clear_many_durable(&[b]).unwrap())
        })
    };
    for b in (1..128).step_by(3) {
        m.bits().clear(b);
        m.set(b);
        m.persist_exclusive().unwrap();
    }
    clearer.join().unwrap();
    let again = PersistentBitmap::open(&OsStorage, &p, MapKind::Copied, 65536, 128).unwrap();
    for b in (0..128).step_by(3) {
        assert!(!again.test(b), "cleared bit {b} came back");
    }
}

#[test]
fn a_durable_clear_never_publishes_a_neighbour_set_only_in_memory() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c");
    let m = PersistentBitmap::open(&OsStorage, &p, MapKind::Copied, 65536, 128).unwrap();
    m.set(0);
    m.persist_exclusive().unwrap();
    // The copier's set-then-recheck: bit 1 is set in memory only.
    m.set(1);
    m.clear_many_durable(&[0]).unwrap();
    let again = PersistentBitmap::open(&OsStorage, &p, MapKind::Copied, 65536, 128).unwrap();
    assert!(!again.test(0), "the cleared bit is durable");
    assert!(!again.test(1), "the unconfirmed neighbour reached the file");
    assert!(m.test(1), "memory keeps the neighbour for the next persist");
}

#[test]
fn a_map_from_other_geometry_or_kind_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m");
    PersistentBitmap::open(&OsStorage, &p, MapKind::Present, 65536, 10).unwrap();
    assert!(PersistentBitmap::open(&OsStorage, &p, MapKind::Present, 65536, 11).is_err());
    assert!(PersistentBitmap::open(&OsStorage, &p, MapKind::Changed, 65536, 10).is_err());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(10)
        .unwrap();
    let e = PersistentBitmap::open(&OsStorage, &p, MapKind::Present, 65536, 10)
        .err()
        .unwrap();
    assert!(e.to_string().contains("truncated"));
}
