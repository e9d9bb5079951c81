//! Pre-copy against real QEMU: VMs running firmware with nothing to boot,
//! a raw disk of random bytes, guest writes through the device's drive
//! (HMP `qemu-io`, from the test's own monitor), and every scheduled
//! backup compared byte for byte with a full backup of the same instant.

use super::*;
use crate::qemu::qmp::Qmp;
use crate::qemu::testing::hmp_write;
use crate::vmbackup::tests::incremental::{
    hands_back_merging, qmp_relay, write_then_break_the_read,
};
use crate::vmbackup::tests::{options as vm_options, repo, restored, vm, Vm};
use crate::vmbackup::{backup_vms, Hook};
use rand::RngCore;
use std::{collections::BTreeSet, sync::atomic::AtomicU64, time::Instant};

const MIB: usize = 1 << 20;
const CHUNK: u32 = 65536;

/// 16 MiB of random bytes with a zero MiB, no boot signature.
fn content() -> Vec<u8> {
    let mut d = vec![0u8; 16 * MIB];
    rand::thread_rng().fill_bytes(&mut d);
    d[8 * MIB..9 * MIB].fill(0);
    d[510..512].fill(0);
    d
}

fn opts(v: &Vm, state: &std::path::Path, end: End) -> Options {
    Options {
        vm: "pc".into(),
        qmp: v.qmp.clone(),
        agent: None,
        state_dir: state.to_path_buf(),
        chunk_size: CHUNK,
        every: Duration::from_secs(1),
        end,
        max_rate: None,
        checkpoint: Duration::from_millis(200),
        load_limit: None,
        hook: None,
    }
}

fn in_secs(s: f64) -> End {
    End::BackupAt(SystemTime::now() + Duration::from_secs_f64(s))
}

/// A full `backup-vms` backup of `v` (a base: it keeps its since-backup
/// bitmap in QEMU); its id.
fn full_backup(repo: &Arc<Repository>, v: &Vm) -> String {
    let s = backup_vms(repo, &vm_options(&[("pc", v)], 1, None)).unwrap();
    let r = &s.vms[0];
    assert!(r.error.is_none(), "{:?}", r.error);
    r.backup.clone().unwrap()
}

/// Pauses the VM and checks that backup `id` restores to exactly what a
/// full backup taken now (the guest writes no more) restores to, and to
/// the image file itself.
fn assert_identical_to_a_full_backup_now(repo: &Arc<Repository>, v: &Vm, id: &str) {
    v.monitor().stop().unwrap();
    let full = full_backup(repo, v);
    let got = restored(repo, "pc", id);
    assert!(
        got == restored(repo, "pc", &full),
        "backup {id} differs from the full backup {full} of the same instant"
    );
    let img = std::fs::read(v.img.as_ref().unwrap()).unwrap();
    assert!(got == img, "backup {id} differs from the disk image");
}

/// A guest writer: every `pause`, one chunk of a ring of `ring` chunks,
/// each time a new pattern; halted (and acknowledged) on request. It
/// records every chunk it wrote.
struct Writer {
    halt: Arc<AtomicBool>,
    halted: Arc<AtomicBool>,
    written: Arc<Mutex<BTreeSet<u64>>>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(mut q: Qmp, ring: u64, pause: Duration) -> Writer {
        let halt = Arc::new(AtomicBool::new(false));
        let halted = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(BTreeSet::new()));
        let writes = Arc::new(AtomicU64::new(0));
        let (h, hd, w, n) = (
            halt.clone(),
            halted.clone(),
            written.clone(),
            writes.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut k = 0u64;
            while !h.load(Ordering::SeqCst) {
                let chunk = k % ring;
                let pattern = (k % 250) as u8 + 1;
                hmp_write(
                    &mut q,
                    pattern,
                    (chunk * CHUNK as u64) as usize,
                    CHUNK as usize,
                );
                w.lock().unwrap().insert(chunk);
                n.fetch_add(1, Ordering::SeqCst);
                k += 1;
                std::thread::sleep(pause);
            }
            hd.store(true, Ordering::SeqCst);
        });
        Writer {
            halt,
            halted,
            written,
            writes,
            thread: Some(thread),
        }
    }

    /// A hook that halts the writer at the backup's `stopped` event, and
    /// waits until its last write is done.
    fn halt_at_snapshot(&self) -> Hook {
        let (h, hd) = (self.halt.clone(), self.halted.clone());
        Arc::new(move |_vm: &str, ev: &str| {
            if ev == "stopped" {
                h.store(true, Ordering::SeqCst);
                while !hd.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    }

    fn stop(&mut self) {
        self.halt.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn rounds_leave_the_scheduled_backup_at_most_a_fifth_of_a_plain_incrementals_reads_and_it_restores_like_a_full_backup_of_that_instant(
) {
    let v = vm(Some(&content()));
    let (_r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    let base = full_backup(&repo, &v);
    // 80 chunks of the 256 rewritten, one every 200 ms, up to the snapshot.
    let mut w = Writer::start(v.monitor(), 80, Duration::from_millis(200));
    let mut o = opts(&v, state.path(), in_secs(30.0));
    o.hook = Some(w.halt_at_snapshot());
    let ctl = Control::default();
    let rep = run(&repo, &o, &ctl).unwrap();
    w.stop();
    assert!(
        rep.start.contains(&format!("from backup {base}")),
        "{}",
        rep.start
    );
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert!(rep.rounds.len() >= 10, "{} rounds", rep.rounds.len());
    let f = rep.final_backup.as_ref().unwrap();
    assert_eq!(f.mode, "precopy");
    assert_eq!(f.fallback, None);
    let written = w.written.lock().unwrap().len() as u64;
    assert_eq!(written, 80, "{} writes", w.writes.load(Ordering::SeqCst));
    // What a plain incremental would have read at the same instant.
    assert_eq!(f.since_backup_chunks, Some(written));
    assert!(
        f.chunks_read * 5 <= written,
        "the final step read {} chunks, a plain incremental {written}",
        f.chunks_read
    );
    let id = f.backup.clone().unwrap();
    let m = repo.resolve("pc", Some(&id)).unwrap();
    assert_eq!(m.config["backup_vms"]["mode"], "precopy");
    assert_eq!(m.config["backup_vms"]["base"], base.as_str());
    assert_identical_to_a_full_backup_now(&repo, &v, &id);
    assert!(!StateDir::open(state.path(), repo.id(), "pc")
        .unwrap()
        .path()
        .exists());
    // QEMU keeps only the new backup's bitmap; no round bitmap is left.
    let nodes = crate::qemu::fleece::nodes(&mut v.monitor()).unwrap();
    let bitmaps: Vec<&String> = nodes
        .iter()
        .flat_map(|n| n.bitmaps.iter().map(|b| &b.name))
        .collect();
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
}

#[test]
fn a_failed_scheduled_backup_hands_its_bitmap_back_to_the_round_bitmap_so_a_guest_write_during_the_hand_back_is_in_the_next(
) {
    let v = vm(Some(&content()));
    let (d, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    full_backup(&repo, &v);
    let mon = Arc::new(Mutex::new(v.monitor()));
    // The guest writes chunk 9 right after QEMU carried out the hand-back's
    // merge, before the backup's next command.
    let m = Arc::downgrade(&mon);
    let relay = d.path().join("relay.sock");
    qmp_relay(
        &relay,
        &v.qmp,
        |_| None,
        move |cmd| {
            if let (true, Some(m)) = (hands_back_merging(cmd), m.upgrade()) {
                hmp_write(&mut m.lock().unwrap(), 0x77, 9 * CHUNK as usize, 4096);
            }
        },
    );
    let mut o = opts(&v, state.path(), in_secs(2.0));
    o.qmp = relay;
    // After the scheduled backup's snapshot: chunk 7, then its read fails.
    o.hook = Some(write_then_break_the_read(&mon, 0x66, 7));
    let e = run(&repo, &o, &Control::default()).unwrap_err();
    assert!(e.to_string().contains("the scheduled backup failed"), "{e}");
    // The test's monitor is free again for the checks below.
    drop((o, mon));

    let next = run(
        &repo,
        &opts(&v, state.path(), in_secs(2.0)),
        &Control::default(),
    )
    .unwrap();
    let f = next.final_backup.as_ref().unwrap();
    assert_eq!((f.mode.as_str(), &f.fallback), ("precopy", &None));
    assert_identical_to_a_full_backup_now(&repo, &v, f.backup.as_deref().unwrap());
}

#[test]
fn a_new_cycle_whose_since_backup_bitmap_no_longer_records_reads_every_block_and_says_why() {
    let v = vm(Some(&content()));
    let (_r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    let base = full_backup(&repo, &v);
    // The base's bitmap left disabled: it misses the write that follows.
    let m = repo.resolve("pc", Some(&base)).unwrap();
    let kept = &m.config["backup_vms"]["bitmaps"][0];
    let mut q = v.monitor();
    let (node, bitmap) = (
        kept["node"].as_str().unwrap(),
        kept["bitmap"].as_str().unwrap(),
    );
    crate::qemu::fleece::bitmap_op(&mut q, "disable", node, bitmap).unwrap();
    hmp_write(&mut q, 0x44, 5 * CHUNK as usize, 4096);
    drop(q);
    let rep = run(
        &repo,
        &opts(&v, state.path(), in_secs(2.0)),
        &Control::default(),
    )
    .unwrap();
    let f = rep.final_backup.as_ref().unwrap();
    assert_identical_to_a_full_backup_now(&repo, &v, f.backup.as_deref().unwrap());
    assert!(
        rep.start.contains("reading every block") && rep.start.contains("no longer records writes"),
        "{}",
        rep.start
    );
}

#[test]
fn a_job_stopped_mid_round_resumes_without_reading_recorded_chunks_again() {
    let data = content();
    let v = vm(Some(&data));
    let (_r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    // No backup yet: the first round reads every chunk with data, slowly.
    let mut o = opts(&v, state.path(), End::Never);
    o.max_rate = Some(2.0 * MIB as f64);
    o.every = Duration::from_secs(3600);
    let ctl = Arc::new(Control::default());
    let job = {
        let (repo, o, ctl) = (repo.clone(), o.clone(), ctl.clone());
        std::thread::spawn(move || run(&repo, &o, &ctl))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctl.status().last_round.is_none() && !matches!(ctl.status().state.as_str(), "copying") {
        assert!(Instant::now() < deadline, "no round started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    ctl.stop();
    let first = job.join().unwrap().unwrap();
    assert!(
        first
            .start
            .contains("reading every block: no previous backup"),
        "{}",
        first.start
    );
    let r1 = &first.rounds[0];
    assert!(r1.chunks_read > 20 && r1.chunks_read < 200, "{r1:?}");
    // Written while no job runs: those chunks must be read again.
    let mut q = v.monitor();
    hmp_write(&mut q, 0x5a, 0, 2 * CHUNK as usize);
    drop(q);
    let mut o = opts(&v, state.path(), in_secs(2.0));
    o.every = Duration::from_secs(3600);
    let second = run(&repo, &o, &Control::default()).unwrap();
    assert!(
        second.start.starts_with("resumed cycle"),
        "{}",
        second.start
    );
    assert!(second.warnings.is_empty(), "{:?}", second.warnings);
    let r2 = &second.rounds[0];
    let with_data = 256 - 16;
    // Chunks 0 and 1 were read by the first run and written since; the
    // zero chunks it recorded too are not read.
    let reread = [0u64, 1].len() as u64;
    assert_eq!(r1.zero_chunks, 16, "{r1:?}");
    assert_eq!(
        r2.already_recorded,
        r1.chunks_read + 16 - reread,
        "{r1:?} {r2:?}"
    );
    assert_eq!(
        r2.chunks_read + r1.chunks_read - reread,
        with_data,
        "{r1:?} {r2:?}"
    );
    let f = second.final_backup.unwrap();
    assert_eq!(f.mode, "precopy");
    assert_identical_to_a_full_backup_now(&repo, &v, &f.backup.unwrap());
}

#[test]
fn lost_pre_copy_state_falls_back_to_the_since_backup_bitmap_and_says_so() {
    let v = vm(Some(&content()));
    let (_r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    let base = full_backup(&repo, &v);
    let mut q = v.monitor();
    hmp_write(&mut q, 0x11, 0, 3 * CHUNK as usize);
    let o = opts(
        &v,
        state.path(),
        End::Until(SystemTime::now() + Duration::from_secs(3)),
    );
    let first = run(&repo, &o, &Control::default()).unwrap();
    assert!(!first.rounds.is_empty());
    hmp_write(&mut q, 0x22, 10 * CHUNK as usize, CHUNK as usize);
    let path = StateDir::open(state.path(), repo.id(), "pc")
        .unwrap()
        .path();

    // A damaged state file: a new cycle from the since-backup bitmap.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let second = run(&repo, &o_until(&v, state.path(), 2.0), &Control::default()).unwrap();
    assert!(
        second.warnings[0].starts_with("pre-copy state lost"),
        "{:?}",
        second.warnings
    );
    assert!(
        second.start.contains(&format!("from backup {base}")),
        "{}",
        second.start
    );
    // Its first round reads what a plain incremental would: chunks 0-2, 10.
    assert_eq!(second.rounds[0].chunks_read, 4, "{:?}", second.rounds[0]);

    // The round bitmaps gone from QEMU (as after a restart of the
    // bitmaps' owner, or a backup-vms run): again a new cycle.
    let nodes = crate::qemu::fleece::nodes(&mut q).unwrap();
    for n in &nodes {
        let round = n.bitmaps.iter().filter(|b| b.name.starts_with("rfs-pc-"));
        for b in round {
            crate::qemu::fleece::bitmap_op(&mut q, "remove", &n.name, &b.name).unwrap();
        }
    }
    hmp_write(&mut q, 0x33, 20 * CHUNK as usize, CHUNK as usize);
    drop(q);
    let o = opts(&v, state.path(), in_secs(2.0));
    let third = run(&repo, &o, &Control::default()).unwrap();
    assert!(
        third.warnings[0].contains("none of the cycle's dirty bitmaps"),
        "{:?}",
        third.warnings
    );
    assert!(
        third.start.contains(&format!("from backup {base}")),
        "{}",
        third.start
    );
    let f = third.final_backup.unwrap();
    assert_identical_to_a_full_backup_now(&repo, &v, &f.backup.unwrap());
}

fn o_until(v: &Vm, state: &std::path::Path, secs: f64) -> Options {
    opts(
        v,
        state,
        End::Until(SystemTime::now() + Duration::from_secs_f64(secs)),
    )
}

#[test]
fn a_second_job_for_the_same_vm_is_refused_and_bad_options_are_one_line_errors() {
    let state = tempfile::tempdir().unwrap();
    let (_r, repo) = repo();
    let _held = StateDir::open(state.path(), repo.id(), "pc").unwrap();
    let e = StateDir::open(state.path(), repo.id(), "pc").err().unwrap();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
    assert!(e.to_string().contains("already running"), "{e}");
    let v = vm(Some(&content()));
    let mut o = opts(&v, state.path(), End::Never);
    o.every = Duration::ZERO;
    let e = run(&repo, &o, &Control::default()).err().unwrap();
    assert!(e.to_string().contains("--every"), "{e}");
    let mut o = opts(&v, state.path(), End::Never);
    o.vm = "../x".into();
    assert!(run(&repo, &o, &Control::default()).is_err());
}

#[test]
fn recorded_chunks_garbage_collected_between_runs_are_read_again() {
    let v = vm(Some(&content()));
    let (r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    // Long enough for a first round of 256 chunks on a loaded 2-core
    // machine (2 s once read only 32 while other builds ran).
    let first = run(&repo, &o_until(&v, state.path(), 6.0), &Control::default()).unwrap();
    assert!(first.rounds[0].chunks_read > 200, "{:?}", first.rounds[0]);
    // As a gc would, with no backup referring to them: three chunks go.
    let s = {
        let dir = StateDir::open(state.path(), repo.id(), "pc").unwrap();
        dir.load().unwrap().unwrap()
    };
    let gone: Vec<_> = s.disks[0]
        .chunks
        .iter()
        .flatten()
        .take(3)
        .cloned()
        .collect();
    for d in &gone {
        let hex = d.to_hex();
        std::fs::remove_file(r.path().join("repo/chunks").join(&hex[..4]).join(&hex)).unwrap();
    }
    let second = run(
        &repo,
        &opts(&v, state.path(), in_secs(2.0)),
        &Control::default(),
    )
    .unwrap();
    assert!(
        second.warnings[0].starts_with("3 recorded chunks are gone"),
        "{:?}",
        second.warnings
    );
    assert_eq!(second.rounds[0].chunks_read, 3, "{:?}", second.rounds[0]);
    let f = second.final_backup.unwrap();
    assert_eq!(f.mode, "precopy");
    assert_identical_to_a_full_backup_now(&repo, &v, &f.backup.unwrap());
}

#[test]
fn a_gated_round_cut_at_its_end_stays_cut_when_the_wall_clock_steps_back_so_unread_chunks_keep_no_proof(
) {
    let data = content();
    let v = vm(Some(&data));
    let (_r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    let end = SystemTime::now() + Duration::from_secs(3600);
    let o = opts(&v, state.path(), End::Until(end));
    // No backup: the round reads all 240 chunks with data, 8 batches. The
    // first look at the clock (the first read's) is past the end, every
    // later one 10 s before it.
    let looks = Arc::new(AtomicU64::new(0));
    let l = looks.clone();
    let clock: round::Clock = Arc::new(move || match l.fetch_add(1, Ordering::SeqCst) {
        0 => end + Duration::from_secs(1),
        _ => end - Duration::from_secs(10),
    });
    let dir = StateDir::open(state.path(), repo.id(), "pc").unwrap();
    let mut job = round::Job::start(repo.clone(), &o, dir).unwrap();
    job.set_clock(clock);
    let rep = job.round(&o, &Control::default(), true).unwrap();
    drop(job);
    assert!(looks.load(Ordering::SeqCst) >= 1, "the clock was not read");
    let s = StateDir::open(state.path(), repo.id(), "pc")
        .unwrap()
        .load()
        .unwrap()
        .unwrap();
    assert!(
        !s.clean_at(rep.round),
        "a cut round counted as complete: {rep:?}"
    );
    // Whatever the state says is proven is the disk's content (random
    // bytes: a chunk recorded as zeros must be zeros).
    let d = &s.disks[0];
    for (k, since) in d.since.iter().enumerate() {
        if since.is_some() {
            let c = &data[k * CHUNK as usize..(k + 1) * CHUNK as usize];
            assert_eq!(
                d.chunks[k].is_none(),
                c.iter().all(|&b| b == 0),
                "chunk {k} is recorded as proven by round {since:?} with stale content"
            );
        }
    }
}

#[test]
fn a_stop_during_the_round_before_the_scheduled_backup_skips_the_backup_and_the_next_run_resumes() {
    let v = vm(Some(&content()));
    let (_r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    let o = opts(&v, state.path(), in_secs(3600.0));
    let dir = StateDir::open(state.path(), repo.id(), "pc").unwrap();
    // No backup: every chunk is unknown, so the backup's round must read
    // them all; a stop (SIGINT, DELETE, shutdown) cuts it at once.
    let mut job = round::Job::start(repo.clone(), &o, dir).unwrap();
    let ctl = Control::default();
    ctl.stop();
    let f = job.final_backup(&o, &ctl).unwrap();
    assert!(f.is_none(), "a stopped job took a backup: {f:?}");
    drop(job);
    assert!(repo.resolve("pc", None).is_err(), "a backup of pc exists");
    let next = run(
        &repo,
        &opts(&v, state.path(), in_secs(2.0)),
        &Control::default(),
    )
    .unwrap();
    assert!(next.start.starts_with("resumed cycle"), "{}", next.start);
    let f = next.final_backup.unwrap();
    assert_eq!((f.mode.as_str(), &f.fallback), ("precopy", &None));
    assert_identical_to_a_full_backup_now(&repo, &v, &f.backup.unwrap());
}

/// Options for what needs no VM.
fn offline_opts() -> Options {
    Options {
        vm: "pc".into(),
        qmp: "/run/pc.qmp".into(),
        agent: None,
        state_dir: "/nonexistent".into(),
        chunk_size: CHUNK,
        every: Duration::from_secs(1),
        end: End::Never,
        max_rate: None,
        checkpoint: Duration::from_millis(200),
        load_limit: None,
        hook: None,
    }
}

#[test]
fn a_paced_wait_ends_soon_after_a_stop_and_still_paces_without_one() {
    // 1 MiB at 100 kB/s is due in 10 s; a stop 100 ms in ends the wait.
    let pace = round::Pace::new(Some(100e3));
    let t0 = Instant::now();
    let stop_at = t0 + Duration::from_millis(100);
    pace.wait(MIB as u64, &|| Instant::now() < stop_at);
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    // 20 kB at 1 MB/s: 20 ms.
    let pace = round::Pace::new(Some(1e6));
    let t0 = Instant::now();
    pace.wait(20_000, &|| true);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(20), "{waited:?}");
    assert!(waited < Duration::from_millis(500), "{waited:?}");
}

#[test]
fn a_max_rate_below_64_kib_per_second_is_a_one_line_error() {
    let mut o = offline_opts();
    for bad in [1e-14, 0.0, -1.0, f64::NAN, MIN_RATE - 1.0] {
        o.max_rate = Some(bad);
        let e = check(&o).err().unwrap();
        assert_eq!(
            e.kind(),
            crate::error::ErrorKind::InvalidInput,
            "{bad}: {e}"
        );
        assert!(e.to_string().contains("--max-rate"), "{bad}: {e}");
        assert!(!e.to_string().contains('\n'), "{e}");
    }
    for good in [None, Some(MIN_RATE), Some(f64::INFINITY)] {
        o.max_rate = good;
        check(&o).unwrap();
    }
}

#[test]
fn a_throttled_chunk_costs_its_wait_for_the_workers_but_not_a_checkpoint_or_halt_before_it() {
    let t = Instant::now();
    let ms = Duration::from_millis;
    assert_eq!(round::chunk_wait(None, t), Duration::ZERO);
    assert_eq!(round::chunk_wait(Some(t), t + ms(7)), ms(7));
    assert_eq!(round::chunk_wait(Some(t), t + ms(1500)), Duration::ZERO);
    // A clock that did not move forward costs nothing.
    assert_eq!(round::chunk_wait(Some(t + ms(5)), t), Duration::ZERO);
}

mod direct;
mod scratch;
mod throttle;

#[test]
fn a_pre_copy_started_during_a_backup_vms_run_on_the_vm_is_refused_and_the_backup_completes() {
    let data = content();
    let v = vm(Some(&data));
    let (_r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    // The pre-copy goes through the VM's other monitor while backup-vms
    // has started its NBD server (a round would replace it).
    let mut o = o_until(&v, state.path(), 5.0);
    o.qmp = v.mon.clone();
    let err = Arc::new(Mutex::new(None));
    let (pc_repo, out) = (repo.clone(), err.clone());
    let hook: Hook = Arc::new(move |_, event| {
        if event == "stopped" {
            *out.lock().unwrap() = run(&pc_repo, &o, &Control::default()).err();
        }
    });
    let s = backup_vms(&repo, &vm_options(&[("pc", &v)], 1, Some(hook))).unwrap();
    let e = err
        .lock()
        .unwrap()
        .take()
        .expect("the pre-copy was refused");
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("another recoverfs job"), "{e}");
    assert!(s.vms[0].error.is_none(), "{:?}", s.vms[0]);
}

/// `POST /precopy` for the test VM, as a caller would send it.
fn start_request(v: &Vm, backup_at: Option<f64>, until: Option<f64>) -> StartRequest {
    StartRequest {
        vm: "pc".into(),
        qmp: v.qmp.clone(),
        agent: None,
        every: Some(3600.0),
        backup_at,
        until,
        chunk_size: Some(CHUNK),
        max_rate_mbps: None,
        load_limit: None,
    }
}

fn unix_in(secs: f64) -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + secs
}

/// Waits until `f` holds for the VM's listed job.
fn wait_for_job(jobs: &Jobs, what: &str, f: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(j) = jobs.list().into_iter().find(|j| j.status.vm == "pc") {
            if f(&j) {
                return j;
            }
        }
        assert!(Instant::now() < deadline, "the job never got {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_daemon_job_stopped_with_the_daemon_is_started_again_from_its_record_with_its_callers_credentials_and_takes_the_backup_missed_meanwhile(
) {
    use crate::api::pathauth::Caller;
    use crate::api::peer::PeerPolicy;
    use std::os::unix::fs::PermissionsExt;
    let v = vm(Some(&content()));
    let (_r, repo) = repo();
    let staging = tempfile::tempdir().unwrap();
    let root = staging.path().join("precopy");
    // A caller that is not root, allowed to connect to the VM's socket.
    let set = |p: &std::path::Path, m| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set(v.qmp.parent().unwrap(), 0o711);
    set(&v.qmp, 0o666);
    let caller = Caller {
        uid: 4242,
        gid: 4242,
        groups: vec![],
    };
    let policy = PeerPolicy {
        owner: 0,
        group: Some(4242),
    };
    let backup_at = unix_in(8.0);
    let jobs = Jobs::new(repo.clone(), root.clone());
    jobs.start(start_request(&v, Some(backup_at), None), &caller)
        .unwrap();
    let j = wait_for_job(&jobs, "a round", |j| j.status.rounds >= 1);
    assert!(j.running && j.restarted.is_none(), "{j:?}");
    assert!(
        unix_in(0.0) < backup_at,
        "the first round outlasted the schedule"
    );
    // The daemon stops, and is down when the backup was due.
    jobs.shutdown();
    drop(jobs);
    while unix_in(0.0) < backup_at + 0.5 {
        std::thread::sleep(Duration::from_millis(100));
    }
    hmp_write(&mut v.monitor(), 0x5a, 0, CHUNK as usize);
    let jobs = Jobs::new(repo.clone(), root.clone());
    assert!(jobs.list().is_empty());
    let said = jobs.restore(&policy);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("by uid 4242"), "{said:?}");
    assert!(said[0].contains("the backup is taken now"), "{said:?}");
    let j = wait_for_job(&jobs, "an end", |j| !j.running);
    assert!(
        j.restarted
            .as_deref()
            .unwrap()
            .contains("passed while the daemon was down"),
        "{j:?}"
    );
    assert_eq!(j.status.state, "done", "{j:?}");
    let report = j.report.unwrap();
    assert!(
        report.start.starts_with("resumed cycle"),
        "{}",
        report.start
    );
    let f = report.final_backup.unwrap();
    assert_eq!((f.mode.as_str(), &f.fallback), ("precopy", &None));
    assert_identical_to_a_full_backup_now(&repo, &v, &f.backup.unwrap());
    // Its backup taken, the job has ended: nothing to start again.
    assert!(Jobs::new(repo.clone(), root.clone())
        .restore(&policy)
        .is_empty());
}

#[test]
fn delete_and_a_job_that_ended_or_failed_leave_no_record_to_start_again() {
    use crate::api::pathauth::Caller;
    use crate::api::peer::PeerPolicy;
    let v = vm(Some(&content()));
    let (_r, repo) = repo();
    let staging = tempfile::tempdir().unwrap();
    let root = staging.path().join("precopy");
    let record = root.join(repo.id()).join("pc").join("job.json");
    let policy = PeerPolicy {
        owner: 0,
        group: None,
    };
    let restored = || Jobs::new(repo.clone(), root.clone()).restore(&policy);
    let jobs = Jobs::new(repo.clone(), root.clone());
    // Recorded before the start answers; DELETE removes it.
    jobs.start(start_request(&v, None, None), &Caller::root())
        .unwrap();
    assert!(record.exists());
    wait_for_job(&jobs, "a round", |j| j.status.rounds >= 1);
    jobs.stop("pc").unwrap();
    assert!(!record.exists());
    assert!(restored().is_empty());
    // `until` reached.
    jobs.start(start_request(&v, None, Some(unix_in(2.0))), &Caller::root())
        .unwrap();
    assert!(record.exists());
    let j = wait_for_job(&jobs, "an end", |j| !j.running);
    assert_eq!(j.status.state, "done", "{j:?}");
    assert!(!record.exists());
    assert!(restored().is_empty());
    // Failed (no QEMU there): listed failed, not started again.
    let mut r = start_request(&v, None, None);
    r.qmp = v.qmp.with_file_name("gone.sock");
    jobs.start(r, &Caller::root()).unwrap();
    let j = wait_for_job(&jobs, "an end", |j| !j.running);
    assert_eq!(j.status.state, "failed", "{j:?}");
    assert!(!record.exists());
    assert!(restored().is_empty());
}
