//! One conformance suite for every `Disk`: the real `Volume` (backup plus
//! staging) and `MemDisk` must behave alike, checked against a byte model.

use super::*;
use crate::prefetch::Scheduler;
use crate::repo::Repository;
use crate::staging::io::OsStorage;
use rand::{Rng, SeedableRng};

const BS: u64 = 64 << 10;

/// A disk under test, its initial contents, and what keeps it alive.
struct Subject {
    disk: Arc<dyn Disk>,
    initial: Vec<u8>,
    _keep: Option<tempfile::TempDir>,
}

fn mem_disk(size: u64, _seed: u64) -> Subject {
    Subject {
        disk: MemDisk::new("mem/disk0", size, BS),
        initial: vec![0; size as usize],
        _keep: None,
    }
}

fn volume(size: u64, seed: u64) -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
    let mut initial = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut initial[..]);
    for b in (0..size / BS).step_by(3) {
        initial[(b * BS) as usize..((b + 1) * BS) as usize].fill(0);
    }
    let m = crate::testutil::backup_images(&repo, dir.path(), "vm", BS as usize, &[&initial]);
    let sched = Scheduler::new("conformance", 4);
    let disk = crate::testutil::open_volumes(&OsStorage, &dir.path().join("st"), &repo, &m, &sched)
        .remove(0);
    Subject {
        disk,
        initial,
        _keep: Some(dir),
    }
}

type Make = fn(u64, u64) -> Subject;
const IMPLS: [(&str, Make); 2] = [("MemDisk", mem_disk), ("Volume", volume)];

#[test]
fn every_disk_matches_a_byte_model_under_random_writes_zeroes_and_discards() {
    for (name, make) in IMPLS {
        let size = 24 * BS + 4096;
        let s = make(size, 1);
        let mut model = s.initial.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for i in 0..400 {
            let off = rng.gen_range(0..size);
            let len = rng.gen_range(1..=(3 * BS).min(size - off));
            match rng.gen_range(0..4) {
                0 | 1 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    s.disk.write_at(off, &data).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                2 => {
                    s.disk.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    s.disk.discard(off, len).unwrap();
                    // Whole blocks read as zeros; partial ones are unchanged.
                    let first = off.div_ceil(BS) * BS;
                    let end = if off + len == size {
                        size
                    } else {
                        (off + len) / BS * BS
                    };
                    if first < end {
                        model[first as usize..end as usize].fill(0);
                    }
                }
            }
            if i % 50 == 0 {
                s.disk.flush().unwrap();
            }
            let roff = rng.gen_range(0..size);
            let rlen = rng.gen_range(1..=2 * BS as usize);
            let got = s.disk.read_at(roff, rlen).unwrap();
            let want = &model[roff as usize..(roff as usize + rlen).min(size as usize)];
            assert!(
                got == want,
                "{name}: read {roff}+{rlen} after op {i} differs"
            );
        }
        assert!(
            s.disk.read_at(0, size as usize).unwrap() == model,
            "{name}: final contents"
        );
    }
}

#[test]
fn every_disk_refuses_writes_past_its_end_and_reads_short_there() {
    for (name, make) in IMPLS {
        let size = 4 * BS;
        let s = make(size, 3);
        for e in [
            s.disk.write_at(size - 1, b"ab").unwrap_err(),
            s.disk.write_zeroes(size, 1).unwrap_err(),
            s.disk.discard(u64::MAX, 2).unwrap_err(),
        ] {
            assert_eq!(e.errno(), libc::ENOSPC, "{name}: {e}");
        }
        assert_eq!(s.disk.read_at(size - 10, 100).unwrap().len(), 10, "{name}");
        assert!(s.disk.read_at(size + 10, 100).unwrap().is_empty(), "{name}");
    }
}

#[test]
fn every_disks_block_status_tiles_the_range_and_tells_the_truth() {
    for (name, make) in IMPLS {
        let size = 16 * BS + 100;
        let s = make(size, 4);
        s.disk.write_at(5 * BS + 10, b"changed").unwrap();
        s.disk.write_zeroes(9 * BS, BS).unwrap();
        let (off, len) = (BS / 2, 14 * BS);
        let ext = s.disk.block_status(off, len).unwrap();
        assert_eq!(
            ext.iter().map(|e| e.len).sum::<u64>(),
            len,
            "{name}: extents tile the range"
        );
        let data = s.disk.read_at(off, len as usize).unwrap();
        let mut pos = 0u64;
        for e in &ext {
            let bytes = &data[pos as usize..(pos + e.len) as usize];
            if e.flags.zero {
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "{name}: a zero extent holds data"
                );
            }
            for b in (off + pos) / BS..=(off + pos + e.len - 1) / BS {
                if b == 5 || b == 9 {
                    assert!(e.flags.changed, "{name}: block {b} was written");
                }
            }
            pos += e.len;
        }
        // Clipped at the end of the disk.
        let tail = s.disk.block_status(size - 50, 1000).unwrap();
        assert_eq!(tail.iter().map(|e| e.len).sum::<u64>(), 50, "{name}");
    }
}

#[test]
fn a_volumes_block_status_by_runs_equals_its_block_by_block_answer() {
    // 200 blocks: runs cross bitmap words; staged, written and backed-up
    // blocks interleave.
    let size = 200 * BS + 777;
    let s = volume(size, 5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for _ in 0..60 {
        let off = rng.gen_range(0..size);
        let len = rng.gen_range(1..=(5 * BS).min(size - off));
        match rng.gen_range(0..3) {
            0 => s.disk.write_at(off, &vec![7; len as usize]).unwrap(),
            1 => s.disk.write_zeroes(off, len).unwrap(),
            _ => drop(s.disk.read_at(off, len as usize).unwrap()),
        }
    }
    let by_block = |off: u64, len: u64| {
        let end = (off + len).min(size);
        let mut out: Vec<Extent> = vec![];
        let mut pos = off;
        while pos < end {
            let stop = ((pos / BS + 1) * BS).min(end);
            let e = s.disk.block_status(pos, stop - pos).unwrap();
            assert_eq!(e.len(), 1);
            match out.last_mut() {
                Some(last) if last.flags == e[0].flags => last.len += e[0].len,
                _ => out.push(e[0]),
            }
            pos = stop;
        }
        out
    };
    let mut ranges = vec![(0, size), (size - 50, 1000), (BS - 1, 2)];
    ranges.extend((0..200).map(|_| {
        let off = rng.gen_range(0..size);
        (off, rng.gen_range(1..=size - off))
    }));
    for (off, len) in ranges {
        assert_eq!(
            s.disk.block_status(off, len).unwrap(),
            by_block(off, len),
            "block status of {off}+{len}"
        );
    }
}

#[test]
fn reads_answered_later_or_given_back_return_what_read_at_returns() {
    let spawn: Spawner = Arc::new(|job| drop(std::thread::spawn(job)));
    for (name, make) in IMPLS {
        let size = 16 * BS + 100;
        let s = make(size, 3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (mut later, mut back) = (0, 0);
        for _ in 0..200 {
            let off = rng.gen_range(0..size);
            let len = rng.gen_range(1..=(2 * BS).min(size - off)) as usize;
            let (tx, rx) = std::sync::mpsc::channel();
            let done: ReadDone = Box::new(move |r| tx.send(r).unwrap());
            let got = match s.disk.read_later(off, len, done, &spawn) {
                Ok(()) => {
                    later += 1;
                    rx.recv_timeout(std::time::Duration::from_secs(30))
                        .unwrap()
                        .unwrap()
                        .to_vec()
                }
                Err(done) => {
                    back += 1;
                    let r = s.disk.read_at(off, len);
                    let v = r.as_ref().unwrap().clone();
                    done(r.map(bytes::Bytes::from));
                    v
                }
            };
            assert!(
                got[..] == s.initial[off as usize..off as usize + len],
                "{name} at {off}+{len}"
            );
        }
        // The volume answers its first misses within a block later.
        assert!(
            name == "MemDisk" || later > 0,
            "{name}: {later} later, {back} given back"
        );
    }
}
