//! The workload a run records: the guest's writes and flushes (and a
//! second writer), reads and prefetches, the live backups, the relocation
//! and the session uploader, on a volume whose staging is in [`MemStorage`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::prefetch::Class;
use crate::relocate::State;
use crate::session::backup::{run as run_live, Live};

use super::*;

/// A guest write, recorded for the checker.
fn guest_write(vol: &Arc<Volume>, mem: &MemStorage, log: &Log, off: usize, data: Vec<u8>) {
    let range = off..off + data.len();
    log.claim(range.clone());
    let start = mem.position();
    vol.write(off as u64, &data).unwrap();
    let done_at = mem.position();
    let seq = log.done.fetch_add(1, Ordering::SeqCst);
    log.writes.lock().push(Write {
        off,
        data,
        start,
        acked_at: None,
        done_at,
        seq,
    });
    log.unclaim(&range);
}

/// A guest flush: every write completed before it began is acknowledged
/// once it returns.
fn guest_flush(vol: &Volume, mem: &MemStorage, log: &Log) {
    let began = log.done.load(Ordering::SeqCst);
    vol.flush().unwrap();
    let at = mem.position();
    for wr in log.writes.lock().iter_mut() {
        if wr.acked_at.is_none() && wr.seq < began {
            wr.acked_at = Some(at);
        }
    }
}

/// A random guest write within the first `blocks` blocks: a whole block
/// or a few sectors.
fn random_write(rng: &mut impl Rng, blocks: usize) -> (usize, Vec<u8>) {
    let (off, len) = if rng.gen_bool(0.25) {
        (rng.gen_range(0..blocks) * BS, BS)
    } else {
        let len = rng.gen_range(1..=3 * BS / SECTOR) * SECTOR;
        (rng.gen_range(0..(blocks * BS - len) / SECTOR) * SECTOR, len)
    };
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    (off, data)
}

/// The second guest writer: writes (and sometimes flushes) near the
/// blocks the first wrote last, until `stop`.
fn second_writer(
    vol: Arc<Volume>,
    mem: MemStorage,
    log: Arc<Log>,
    blocks: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x2d);
    while !stop.load(Ordering::Relaxed) {
        // Other sectors of a block the first writer just wrote, mostly:
        // the races worth having are on the same block.
        let near = log.writes.lock().last().map(|w| w.off / BS);
        let (off, data) = match near {
            Some(b) if rng.gen_bool(0.7) => {
                let len = rng.gen_range(1..=16) * SECTOR;
                let off = b * BS + rng.gen_range(0..(BS - len) / SECTOR) * SECTOR;
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                (off, data)
            }
            _ => random_write(&mut rng, blocks),
        };
        guest_write(&vol, &mem, &log, off, data);
        if rng.gen_bool(0.1) {
            guest_flush(&vol, &mem, &log);
        }
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..1500)));
    }
}

/// Runs the workload on `mem`; returns the guest's writes.
pub(super) fn workload(w: &World, mem: &MemStorage, seed: u64) -> Vec<Write> {
    let blocks = w.sc.blocks;
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    storage.create_dir_all(Path::new(SESSION)).unwrap();
    storage.create_dir_all(Path::new(TARGET)).unwrap();
    let vol = open_volume(w, mem);
    let budget = w.sc.staging_max_blocks.map(|n| {
        let b = crate::staging::budget::Budget::new(&w._dir.path().join("budget"));
        b.set_limits(n * BS as u64, 0);
        vol.attach_budget(b.clone(), PathBuf::from(SESSION));
        b
    });
    let write_blocks = match w.sc.staging_max_blocks {
        Some(_) => blocks / 10,
        None => blocks,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (vol, stop, every) = (vol.clone(), stop.clone(), w.sc.flush_every);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = vol.flush();
                std::thread::sleep(every);
            }
        })
    };
    let uploads = w.sc.uploads.then(|| {
        let (repo, vol, storage, stop) =
            (w.repo.clone(), vol.clone(), storage.clone(), stop.clone());
        std::thread::spawn(move || uploader(repo, vol, storage, stop))
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let log = Arc::new(Log::default());
    let writes = &*log;
    let stop_second = Arc::new(AtomicBool::new(false));
    let second = w.sc.second_writer.then(|| {
        let (vol, mem, log, stop) = (vol.clone(), mem.clone(), log.clone(), stop_second.clone());
        std::thread::spawn(move || second_writer(vol, mem, log, write_blocks, seed, stop))
    });
    let mut reloc: Option<Arc<Relocation>> = None;
    let mut backups = None;
    let ops = w.sc.guest_ops;
    for op in 0..ops {
        if w.sc.live_backups && op == ops / 2 {
            let (repo, vol, storage) = (w.repo.clone(), vol.clone(), storage.clone());
            let manifest = w.manifest.clone();
            backups = Some(std::thread::spawn(move || {
                let dir = Path::new(SESSION);
                let base = load_base(storage.as_ref(), dir, &manifest).unwrap();
                let base = parking_lot::Mutex::new(base);
                let disks = [vol];
                let live = Live {
                    vm: "vm",
                    dir,
                    storage,
                    disks: &disks,
                    backup_base: &base,
                    progress: &Default::default(),
                };
                for _ in 0..2 {
                    run_live(&repo, &live).unwrap();
                }
            }));
        }
        if w.sc.relocate.is_some() && op == ops / 4 {
            let r = begin_relocation(&storage, &vol, w.sc.relocate);
            r.spawn();
            reloc = Some(r);
        }
        // While the copy runs, a calmer guest lets it converge.
        if reloc.as_ref().is_some_and(|r| r.state() != State::Done) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let roll = rng.gen_range(0..100u32);
        if roll < w.sc.flush_pct {
            guest_flush(&vol, mem, writes);
            continue;
        }
        match roll {
            0..=44 => {
                let (off, data) = random_write(&mut rng, write_blocks);
                guest_write(&vol, mem, writes, off, data);
            }
            45..=79 => {
                let off = rng.gen_range(0..blocks * BS - 1);
                let len = rng.gen_range(1..=2 * BS).min(blocks * BS - off);
                vol.read(off as u64, len).unwrap();
            }
            _ => {
                for _ in 0..4 {
                    vol.prefetch_block(rng.gen_range(0..blocks as u64), Class::Profile);
                }
            }
        }
    }
    stop_second.store(true, Ordering::Relaxed);
    if let Some(t) = second {
        t.join().expect("the second writer's writes succeed");
    }
    if let Some(r) = &reloc {
        let deadline = Instant::now() + Duration::from_secs(60);
        while r.state() != State::Done {
            assert!(
                r.state() != State::Failed,
                "relocation failed: {:?}",
                r.status()
            );
            assert!(Instant::now() < deadline, "no cutover: {:?}", r.status());
            std::thread::sleep(Duration::from_millis(10));
        }
        // And a few writes to the target after the switch.
        for _ in 0..20 {
            let off = rng.gen_range(0..blocks * BS / SECTOR - 8) * SECTOR;
            let data: Vec<u8> = (0..8 * SECTOR).map(|_| rng.gen()).collect();
            guest_write(&vol, mem, writes, off, data);
            if rng.gen_bool(0.3) {
                guest_flush(&vol, mem, writes);
            }
        }
        r.stop();
    }
    if let Some(b) = backups {
        b.join().expect("the live backups succeed");
    }
    stop.store(true, Ordering::Relaxed);
    flusher.join().unwrap();
    if let Some(u) = uploads {
        let n = u.join().unwrap();
        assert!(n > 0, "the uploader recorded nothing");
        eprintln!("the uploader recorded {n} blocks");
    }
    if let Some(b) = budget {
        let st = b.status();
        assert!(st.evicted_blocks > 0, "nothing was evicted: {st:?}");
        assert!(
            st.used <= st.max.unwrap(),
            "staging passed its limit: {st:?}"
        );
        eprintln!(
            "evicted {} blocks, {} fills refused",
            st.evicted_blocks, st.refused_fills
        );
    }
    vol.close();
    Arc::into_inner(log).expect("no writer left").into_writes()
}

/// The session uploader's loop over `vol` (one block at a time, records
/// synced every few blocks) until `stop`; the blocks it recorded.
fn uploader(
    repo: Arc<Repository>,
    vol: Arc<Volume>,
    storage: Arc<dyn Storage>,
    stop: Arc<AtomicBool>,
) -> u64 {
    use crate::staging::uploaded::{uploaded_path, UploadRecord};
    let rec = UploadRecord::create(
        storage.as_ref(),
        &uploaded_path(Path::new(SESSION), 0, 0),
        BS as u32,
        vol.nblocks(),
        0,
    )
    .unwrap();
    vol.set_uploaded(Some(crate::volume::Uploaded::new(
        rec,
        Default::default(),
        vol.nblocks(),
    )));
    let mut recorded = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    while !stop.load(Ordering::Relaxed) {
        // A live backup's commit switches the record to the next generation.
        let u = vol.uploaded().expect("a record");
        let todo = vol.upload_todo(Some(&u));
        if todo.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let b = todo[rng.gen_range(0..todo.len())];
        let mut buf = vec![0u8; BS];
        let Some(stamp) = vol.read_for_upload(b, &mut buf).unwrap() else {
            continue;
        };
        let read = |_: u64, out: &mut [u8]| {
            out.copy_from_slice(&buf);
            Ok(())
        };
        let st = crate::repo::writer::store_chunks(
            &repo,
            vol.size,
            BS as u32,
            std::iter::once(b),
            &read,
            &|_| {},
        )
        .unwrap();
        if vol
            .record_uploads(&u, &[(b, stamp, st.chunks[0].1)])
            .unwrap()
            == 1
        {
            recorded += 1;
            if recorded % 8 == 0 {
                u.sync().unwrap();
            }
        }
    }
    recorded
}
