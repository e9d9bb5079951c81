//! Cutover under injected faults (issue 10 item 5): whatever fails before
//! the commit point leaves every disk on staging; after it there is only
//! forward progress, every disk on its target; never a mix, and never a
//! write acknowledged on one side and served from the other after a restart.
//! Then the pipelined copier against racing guest writes, and pause/resume.

use super::open::recoverfs_mount_over;
use super::*;
use crate::prefetch::Scheduler;
use crate::repo::Repository;
use crate::staging::io::fault::{FaultyStorage, Op, Rule};
use crate::staging::io::OsStorage;
use rand::{Rng, SeedableRng};
use std::sync::atomic::AtomicBool;

const BS: usize = 64 << 10;
const BLOCKS: usize = 24;
const COMMIT: &[u8] = b"\"switched\": true";

struct Rig {
    dir: tempfile::TempDir,
    repo: Arc<Repository>,
    faults: FaultyStorage,
    /// `faults`, as the relocation takes it.
    storage: Arc<dyn Storage>,
    session_dir: PathBuf,
    images: Vec<Vec<u8>>,
}

fn rig() -> Rig {
    rig_of(BLOCKS * BS)
}

/// Two disks of `size` bytes of random data, block 3 zero.
fn rig_of(size: usize) -> Rig {
    rig_in(size, tempfile::tempdir().unwrap())
}

/// A rig whose target path only root can change (`/run` is root's, 0755;
/// `/tmp` is world-writable): the tests run as root.
fn root_only_rig() -> Rig {
    let dir = tempfile::Builder::new()
        .prefix("rfs-reloc-")
        .tempdir_in("/run")
        .unwrap();
    rig_in(BLOCKS * BS, dir)
}

fn rig_in(size: usize, dir: tempfile::TempDir) -> Rig {
    let (repo, _) = Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let images: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            let mut data = vec![0u8; size];
            rng.fill(&mut data[..]);
            data[3 * BS..4 * BS].fill(0);
            data
        })
        .collect();
    let refs: Vec<&[u8]> = images.iter().map(|i| i.as_slice()).collect();
    crate::testutil::backup_images(&repo, dir.path(), "vm", BS, &refs);
    std::fs::create_dir_all(dir.path().join("primary/vm")).unwrap();
    let faults = FaultyStorage::new(OsStorage::shared());
    Rig {
        session_dir: dir.path().join("staging/vm"),
        dir,
        repo,
        storage: Arc::new(faults.clone()),
        faults,
        images,
    }
}

impl Rig {
    /// Opens the session's volumes, as `recover` does.
    fn volumes(&self) -> Vec<Arc<Volume>> {
        let m = self.repo.resolve("vm", None).unwrap();
        let sched = Scheduler::new("t", 4);
        crate::testutil::open_volumes(&self.faults, &self.session_dir, &self.repo, &m, &sched)
    }

    fn source<'a>(&'a self, disks: &'a [Arc<Volume>]) -> Source<'a> {
        Source {
            storage: &self.storage,
            vm: "vm",
            disks,
            config_json: b"{}\n",
            session_dir: &self.session_dir,
        }
    }

    fn relocate(&self, disks: &[Arc<Volume>]) -> Arc<Relocation> {
        self.relocate_at(disks, None)
    }

    /// A relocation copying at `rate_mbps`.
    fn relocate_at(&self, disks: &[Arc<Volume>], rate_mbps: Option<f64>) -> Arc<Relocation> {
        let r = self.begin(disks, rate_mbps);
        r.spawn();
        r
    }

    /// A relocation recorded and opened, its copier not started.
    fn begin(&self, disks: &[Arc<Volume>], rate_mbps: Option<f64>) -> Arc<Relocation> {
        let meta = Meta {
            target: self.dir.path().join("primary/vm"),
            switched: false,
            pass: 1,
            rate_mbps,
            paused: false,
            created: vec![],
            created_dir: false,
            target_id: None,
            target_inos: Default::default(),
            owner_mark: None,
        };
        Relocation::begin(self.source(disks), meta).unwrap()
    }

    fn target_bytes(&self, i: usize) -> Vec<u8> {
        std::fs::read(self.dir.path().join(format!("primary/vm/disk{i}.raw"))).unwrap()
    }

    /// What a restarted daemon serves: fresh volumes, the recorded relocation.
    fn restart(&self) -> (Vec<Arc<Volume>>, Option<Arc<Relocation>>) {
        self.faults.clear();
        let disks = self.volumes();
        let r = Relocation::reopen(self.source(&disks)).unwrap();
        (disks, r)
    }
}

fn settle(r: &Relocation) -> State {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = r.state();
        if matches!(s, State::Done | State::Failed) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "relocation stuck: {:?}",
            r.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_cutover_whose_commit_fails_leaves_every_disk_on_staging() {
    let rig = rig();
    let disks = rig.volumes();
    disks[1].write(5, b"before").unwrap();
    rig.faults
        .inject(Rule::fail(Op::Rename, "relocation.json", libc::EIO).with_data(COMMIT));
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed);
    assert!(r.status().error.unwrap().contains("cutover"));
    assert!(
        disks.iter().all(|d| !d.is_switched()),
        "a disk switched without a commit"
    );
    let config = rig.dir.path().join("primary/vm/vm.json");
    assert!(
        !config.exists(),
        "the target has vm.json, as if complete, without a commit"
    );
    // The guest goes on, on staging, and its flushed write survives a restart
    // (the old daemon, and its hold on the target files, gone).
    disks[0].write(BS as u64, b"after").unwrap();
    disks[0].flush().unwrap();
    drop(r);
    let (again, reloc) = rig.restart();
    assert!(reloc.is_some_and(|r| r.state() != State::Done));
    assert!(again.iter().all(|d| !d.is_switched()));
    assert_eq!(again[0].read(BS as u64, 5).unwrap(), b"after");
    assert_eq!(again[1].read(5, 6).unwrap(), b"before");
    assert!(!config.exists());
}

#[test]
fn a_cutover_whose_commit_cannot_be_made_durable_goes_forward_and_takes_no_new_bytes() {
    let rig = rig();
    let disks = rig.volumes();
    disks[1].write(5, b"before").unwrap();
    // The commit's rename goes through; the directory sync after it fails.
    rig.faults.inject(
        Rule::fail(Op::SyncDir, "staging/vm", libc::EIO).once_renamed("relocation.json", COMMIT),
    );
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    assert!(
        disks.iter().all(|d| d.is_switched()),
        "every disk is on its target"
    );
    // Switched, but not a success: the status says why.
    let st = r.status();
    assert!(
        st.error
            .as_deref()
            .is_some_and(|e| e.contains("could not be made durable")),
        "{st:?}"
    );
    // And `relocate --wait`, reading the status the API serves, fails.
    let session = serde_json::json!({
        "relocation": st,
        "disks": disks.iter().map(|d| d.status()).collect::<Vec<_>>(),
    });
    let e = crate::cli::output::wait_verdict("vm", &session)
        .expect("the wait is over")
        .unwrap_err();
    assert!(e.to_string().contains("could not be made durable"), "{e}");
    // No new byte may land: the commit could still vanish in a crash.
    for d in &disks {
        let e = d.write(BS as u64, b"after").unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(d.flush().is_err());
    }
    assert_eq!(disks[1].read(5, 6).unwrap(), b"before", "reads go on");
    // Whichever side a restart serves, the disks are whole and alike.
    let (again, _) = rig.restart();
    let switched: Vec<bool> = again.iter().map(|d| d.is_switched()).collect();
    assert!(
        switched.iter().all(|&s| s == switched[0]),
        "a mix of target and staging"
    );
    let mut want = rig.images[1].clone();
    want[5..11].copy_from_slice(b"before");
    assert_eq!(again[1].read(0, BLOCKS * BS).unwrap(), want);
    assert_eq!(again[0].read(0, BLOCKS * BS).unwrap(), rig.images[0]);
}

#[test]
fn a_write_waiting_out_a_cutover_whose_commit_was_not_made_durable_is_refused() {
    let rig = rig();
    let disks = rig.volumes();
    let target = rig
        .storage
        .open(&rig.dir.path().join("primary/vm/disk0.raw"), Open::Empty)
        .unwrap();
    target.set_len((BLOCKS * BS) as u64).unwrap();
    let gate = disks[0].pause_writes();
    let d = disks[0].clone();
    let w = std::thread::spawn(move || d.write(5, b"late"));
    // The write passes the failed-disk check and waits at the gate.
    std::thread::sleep(Duration::from_millis(300));
    disks[0].switch_to(target);
    disks[0].fail_hard(Error::new(ErrorKind::Io, "the commit was not made durable"));
    drop(gate);
    let e = w.join().unwrap().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(
        rig.target_bytes(0)[..9],
        [0u8; 9],
        "a byte landed on the target"
    );
}

#[test]
fn a_failing_target_fails_the_relocation_before_any_switch() {
    let rig = rig();
    let disks = rig.volumes();
    rig.faults
        .inject(Rule::fail(Op::Sync, "disk1.raw", libc::EIO));
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed);
    assert!(disks.iter().all(|d| !d.is_switched()));
    disks[1].write(0, b"still on staging").unwrap();
    disks[1].flush().unwrap();
}

#[test]
fn a_failing_target_write_fails_the_relocation_and_records_no_block_it_did_not_write() {
    let rig = rig();
    let disks = rig.volumes();
    rig.faults
        .inject(Rule::fail(Op::Write, "disk1.raw", libc::EIO));
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed);
    assert!(
        r.status().error.unwrap().contains("disk1"),
        "{:?}",
        r.status()
    );
    assert!(disks.iter().all(|d| !d.is_switched()));
    // `relocate --wait` ends, non-zero, naming the target's error.
    let session = serde_json::json!({
        "relocation": r.status(),
        "disks": disks.iter().map(|d| d.status()).collect::<Vec<_>>(),
    });
    let e = crate::cli::output::wait_verdict("vm", &session)
        .expect("the wait is over")
        .unwrap_err()
        .to_string();
    assert!(e.contains("failed") && e.contains("disk1"), "{e}");
    // Only the zero block (punched, not written) may be recorded on disk1.
    let copied: Vec<u64> = (0..BLOCKS as u64)
        .filter(|&b| r.copied[1].test(b))
        .collect();
    assert!(
        copied.iter().all(|&b| b == 3),
        "recorded unwritten blocks {copied:?}"
    );
}

/// A disk whose last block is short (and not a multiple of 4 KiB) ends
/// byte-exact on the target, with a guest write in it.
#[test]
fn a_relocation_copies_every_byte_even_of_a_short_unaligned_last_block() {
    let size = BLOCKS * BS - 1000;
    let rig = rig_of(size);
    let disks = rig.volumes();
    disks[0]
        .write(BS as u64 + 7, b"written by the guest")
        .unwrap();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    let mut want = rig.images[0].clone();
    want[BS + 7..BS + 27].copy_from_slice(b"written by the guest");
    assert_eq!(rig.target_bytes(0).len(), size);
    assert!(rig.target_bytes(0) == want, "disk0's target differs");
    assert!(
        rig.target_bytes(1) == rig.images[1],
        "disk1's target differs"
    );
}

/// A guest write into a hole that has ended its write but not yet marked
/// the block present is not taken for a hole: the copier never records
/// the block copied as one, and the target ends with the write.
#[test]
fn a_write_into_a_hole_still_completing_is_never_recorded_copied_as_a_hole() {
    let rig = rig();
    let disks = rig.volumes();
    let (reached_tx, reached_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    *disks[0].complete_hook.lock() = Some(Arc::new(move |_, b| {
        if b == 3 {
            let _ = reached_tx.send(());
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(60));
        }
    }));
    let d0 = disks[0].clone();
    let writer = std::thread::spawn(move || d0.write(3 * BS as u64, &[0x77; BS]));
    reached_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the write reached its completion");
    let r = rig.relocate(&disks);
    // The first pass records every other block of disk 0, and commits
    // block 3 in its hole run while the write is still completing.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..BLOCKS as u64).any(|b| b != 3 && !r.copied[0].test(b)) {
        assert!(Instant::now() < deadline, "copier stuck: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    let marked_while_writing = r.copied[0].test(3);
    go_tx.send(()).unwrap();
    writer.join().unwrap().unwrap();
    *disks[0].complete_hook.lock() = None;
    assert_eq!(settle(&r), State::Done);
    assert!(
        !marked_while_writing,
        "block 3 was recorded copied as a hole while its write completed"
    );
    let mut want = rig.images[0].clone();
    want[3 * BS..4 * BS].fill(0x77);
    assert!(
        rig.target_bytes(0) == want,
        "the target lost the write into the hole"
    );
}

#[test]
fn a_target_gets_its_vm_json_once_the_cutover_commits_and_again_at_restart_if_it_lacks_it() {
    let rig = rig();
    let disks = rig.volumes();
    let config = rig.dir.path().join("primary/vm/vm.json");
    std::fs::write(&config, b"an older relocation's").unwrap();
    let r = rig.begin(&disks, None);
    assert!(!config.exists(), "a new relocation keeps an old vm.json");
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    assert_eq!(std::fs::read(&config).unwrap(), b"{}\n");
    // Lost (say, placed by a daemon killed right after the commit): the
    // restarted daemon places it.
    std::fs::remove_file(&config).unwrap();
    drop((disks, r));
    let (again, _) = rig.restart();
    assert!(again[0].is_switched());
    assert_eq!(std::fs::read(&config).unwrap(), b"{}\n");
}

#[test]
fn an_unswitched_relocation_whose_target_is_unreachable_at_restart_leaves_the_vm_on_staging() {
    let rig = rig();
    let disks = rig.volumes();
    disks[0].write(5, b"mine").unwrap();
    disks[0].flush().unwrap();
    let r = rig.begin(&disks, None);
    drop((disks, r));
    // Primary storage not mounted (yet) when the daemon comes back.
    let primary = rig.dir.path().join("primary");
    std::fs::rename(&primary, rig.dir.path().join("primary.away")).unwrap();
    let (again, reloc) = rig.restart();
    assert!(
        reloc.is_none(),
        "the relocation cannot run without its target"
    );
    assert!(again.iter().all(|d| !d.is_switched()));
    assert_eq!(again[0].read(5, 4).unwrap(), b"mine", "the VM is served");
    // Recorded still: a daemon restarted once the target is back resumes it.
    std::fs::rename(rig.dir.path().join("primary.away"), &primary).unwrap();
    drop(again);
    let (_again, reloc) = rig.restart();
    assert!(reloc.is_some_and(|r| r.state() != State::Done));
}

#[test]
fn a_switched_relocation_whose_target_is_unreachable_at_restart_is_an_error() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    drop((disks, r));
    std::fs::rename(
        rig.dir.path().join("primary"),
        rig.dir.path().join("primary.away"),
    )
    .unwrap();
    let disks = rig.volumes();
    let e = Relocation::reopen(rig.source(&disks)).err().unwrap();
    assert!(e.to_string().contains("open relocation target"), "{e}");
}

#[test]
fn after_cutover_a_failing_staging_eviction_leaves_the_relocated_disk_writable() {
    use crate::staging::budget::Evictable;
    let rig = rig();
    let disks = rig.volumes();
    disks[0].read(0, 4 * BS).unwrap(); // staged, unchanged
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    rig.faults
        .inject(Rule::fail(Op::Write, "disk0.present", libc::EIO));
    let _ = disks[0].evict(4 * BS as u64);
    assert!(
        !disks[0].is_failed(),
        "staging the disk no longer reads from failed it"
    );
    disks[0].write(BS as u64, b"on the target").unwrap();
    disks[0].flush().unwrap();
    assert_eq!(&rig.target_bytes(0)[BS..BS + 13], b"on the target");
}

#[test]
fn after_cutover_nothing_is_prefetched_into_staging() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    let fetched = disks[0].status().fetched_blocks;
    assert!(
        !disks[0].prefetch_block(7, crate::prefetch::Class::Profile),
        "a prefetch was queued for a disk that reads its target"
    );
    assert_eq!(disks[0].status().fetched_blocks, fetched);
}

#[test]
fn writes_after_cutover_are_still_marked_changed_durably() {
    let rig = rig();
    let disks = rig.volumes();
    disks[0].write(BS as u64, b"before").unwrap();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    assert!(disks[0].is_switched());
    disks[0].write(7 * BS as u64 + 3, b"after cutover").unwrap();
    disks[0].write_zeroes(9 * BS as u64, BS as u64).unwrap();
    disks[0].flush().unwrap();
    let want = vec![(1, 2), (7, 8), (9, 10)];
    assert_eq!(disks[0].changed_ranges(), want);
    // The bits were set durably before the data (no flush needed): a
    // restart sees them.
    drop((disks, r));
    let (again, _) = rig.restart();
    assert!(again[0].is_switched());
    assert_eq!(again[0].changed_ranges(), want);
    assert_eq!(again[1].changed_ranges(), vec![]);
}

#[test]
fn a_resumed_relocation_zeroes_holes_over_stale_target_bytes_before_marking_them_copied() {
    let rig = rig();
    let disks = rig.volumes();
    // Block 3 of each disk is zero in the backup and never written: a hole.
    assert!(disks[0].is_hole(3));
    // The relocation is recorded, its targets emptied; then, as after a
    // crash that took a staged write away but not its copy, the target
    // holds bytes over the hole.
    let meta = Meta {
        target: rig.dir.path().join("primary/vm"),
        switched: false,
        pass: 1,
        rate_mbps: None,
        paused: false,
        created: vec![],
        created_dir: false,
        target_id: None,
        target_inos: Default::default(),
        owner_mark: None,
    };
    drop(Relocation::begin(rig.source(&disks), meta).unwrap());
    drop(disks);
    let t = rig.dir.path().join("primary/vm/disk0.raw");
    let f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5; 100], 3 * BS as u64 + 7).unwrap();
    drop(f);
    let (disks, r) = rig.restart();
    let r = r.unwrap();
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    assert!(disks[0].is_switched());
    // The target is the image, hole included.
    assert_eq!(std::fs::read(&t).unwrap(), rig.images[0]);
    assert_eq!(disks[0].read(0, BLOCKS * BS).unwrap(), rig.images[0]);
}

#[test]
fn a_guest_write_racing_a_batch_in_flight_is_never_recorded_as_copied_with_the_old_bytes() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    // The guest writes block 5 of disk 0 after the copier wrote the old
    // bytes to the target, while their batch waits for its commit.
    let raced = Arc::new(AtomicBool::new(false));
    let (d0, flag) = (disks[0].clone(), raced.clone());
    *r.commit_hook.lock() = Some(Arc::new(move |i, blocks: &[u64]| {
        if i == 0 && blocks.contains(&5) && !flag.swap(true, Ordering::SeqCst) {
            d0.write(5 * BS as u64 + 9, b"racing write").unwrap();
        }
    }));
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    assert!(raced.load(Ordering::SeqCst), "the hook never saw block 5");
    let mut want = rig.images[0].clone();
    want[5 * BS + 9..][..12].copy_from_slice(b"racing write");
    assert!(
        rig.target_bytes(0) == want,
        "the target holds a stale block"
    );
    assert!(r.copies_lost.load(Ordering::Relaxed) >= 1);
    assert!(rig.target_bytes(1) == rig.images[1]);
}

#[test]
fn guest_writes_all_through_a_pipelined_copy_leave_the_target_equal_to_every_write() {
    let rig = rig();
    let disks = rig.volumes();
    // ~1.5 s of copying at 2 MB/s: the writer races every stage of it.
    let r = rig.relocate_at(&disks, Some(2.0));
    let mut want = rig.images.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let t0 = Instant::now();
    let mut writes = 0;
    while t0.elapsed() < Duration::from_millis(1200) && r.state() != State::Done {
        let i = rng.gen_range(0..2);
        let off = rng.gen_range(0..BLOCKS * BS - 8192);
        let len = rng.gen_range(1..8192);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        disks[i].write(off as u64, &data).unwrap();
        want[i][off..off + len].copy_from_slice(&data);
        writes += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(settle(&r), State::Done);
    eprintln!(
        "{writes} guest writes during the copy; status {:?}",
        r.status()
    );
    for (i, w) in want.iter().enumerate() {
        assert!(
            rig.target_bytes(i) == *w,
            "disk{i}: the target lost a write"
        );
    }
}

#[test]
fn a_pause_stops_the_copier_promptly_keeps_every_copied_bit_true_and_resume_finishes() {
    let rig = rig();
    let disks = rig.volumes();
    // 3 MiB at 1 MB/s: about 3 s of copying.
    let r = rig.relocate_at(&disks, Some(1.0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.status().bytes_done == 0 {
        assert!(Instant::now() < deadline, "no progress: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let st = r.pause().unwrap();
    let took = t.elapsed();
    eprintln!("pause took {took:?}");
    assert_eq!(st.state, State::Paused);
    assert!(took < Duration::from_secs(1), "pause took {took:?}");
    // Recorded durably, for a restart.
    let meta = std::fs::read_to_string(rig.session_dir.join("relocation.json")).unwrap();
    assert!(meta.contains("\"paused\": true"), "{meta}");
    // Nothing moves while paused, and what is recorded is true.
    let before = r.status();
    std::thread::sleep(Duration::from_millis(400));
    let after = r.status();
    assert_eq!(after.state, State::Paused);
    assert_eq!(
        before.bytes_copied, after.bytes_copied,
        "copied while paused"
    );
    assert_eq!(before.bytes_done, after.bytes_done);
    assert!(
        before.bytes_done < before.bytes_total,
        "finished before the pause"
    );
    for i in 0..2 {
        let t = rig.target_bytes(i);
        for b in 0..BLOCKS {
            if r.copied_map(i).test(b as u64) {
                assert!(
                    t[b * BS..][..BS] == rig.images[i][b * BS..][..BS],
                    "disk{i} block {b} is marked copied over other bytes"
                );
            }
        }
    }
    // The guest goes on writing while paused.
    disks[1].write(2 * BS as u64, b"while paused").unwrap();
    let st = r.resume_copy().unwrap();
    assert_ne!(st.state, State::Paused);
    assert_eq!(settle(&r), State::Done);
    assert!(rig.target_bytes(0) == rig.images[0]);
    let mut want = rig.images[1].clone();
    want[2 * BS..][..12].copy_from_slice(b"while paused");
    assert!(rig.target_bytes(1) == want);
    // The rate limit held for the pipelined copy (paused time not counted).
    let st = r.status();
    assert!(
        st.rate_mbps <= 1.15,
        "copied at {:.2} MB/s over a 1 MB/s limit",
        st.rate_mbps
    );
    assert_eq!(r.pause().unwrap_err().kind(), ErrorKind::AlreadyExists);
}

#[test]
fn a_relocation_paused_before_a_restart_stays_paused_until_resumed() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    r.pause().unwrap();
    r.stop();
    drop((r, disks));
    let (disks, r) = rig.restart();
    let r = r.unwrap();
    r.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.state() != State::Paused {
        assert!(Instant::now() < deadline, "not paused: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.status().bytes_copied, 0, "a paused relocation copied");
    r.resume_copy().unwrap();
    assert_eq!(settle(&r), State::Done);
    assert!(disks.iter().all(|d| d.is_switched()));
    assert!(rig.target_bytes(0) == rig.images[0]);
}

#[test]
fn a_relocation_whose_record_cannot_be_written_leaves_no_disk_tracking_copies() {
    let rig = rig();
    let disks = rig.volumes();
    for d in &disks {
        d.read(0, BLOCKS * BS).unwrap();
        // Fully staged: a direct (passthrough) reader may read staging.
        assert!(d.begin_direct_read().is_some());
        d.end_direct_read();
    }
    rig.faults
        .inject(Rule::fail(Op::Rename, "relocation.json", libc::ENOSPC).times(1));
    let meta = Meta {
        target: rig.dir.path().join("primary/vm"),
        switched: false,
        pass: 1,
        rate_mbps: None,
        paused: false,
        created: vec![],
        created_dir: false,
        target_id: None,
        target_inos: Default::default(),
        owner_mark: None,
    };
    let e = Relocation::begin(rig.source(&disks), meta).err().unwrap();
    assert_eq!(rig.faults.injected(), 1, "{e}");
    // No relocation started: nothing may hold the disks to one (eviction
    // waits for copied bits, passthrough is refused, as while copying).
    for d in &disks {
        assert!(
            d.begin_direct_read().is_some(),
            "disk{} still tracks the copies of a relocation that never started",
            d.index
        );
        d.end_direct_read();
    }
}

/// Waits until the relocation has recorded some copies.
fn wait_for_progress(r: &Relocation) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.status().bytes_done == 0 {
        assert!(Instant::now() < deadline, "no progress: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_cancel_mid_copy_is_durable_and_a_relocation_elsewhere_then_copies_what_the_vm_sees() {
    let rig = rig();
    let disks = rig.volumes();
    disks[0].write(7 * BS as u64, b"before the cancel").unwrap();
    // 3 MiB at 1 MB/s: about 3 s of copying.
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    // The guest writes all through the cancel.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (d, stop) = (disks[1].clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let b = (n % 8) as u64 + 10;
                d.write(b * BS as u64, &n.to_le_bytes()).unwrap();
                d.flush().unwrap();
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let c = r.cancel(false).unwrap();
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    assert!(!r.copier_running(), "the copier still runs");
    let primary = rig.dir.path().join("primary/vm");
    assert_eq!(c.target, primary);
    assert_eq!(
        c.removed,
        [primary.join("disk0.raw"), primary.join("disk1.raw")],
        "{c:?}"
    );
    assert!(c.kept.is_empty() && c.leftover.is_none(), "{c:?}");
    for i in 0..2 {
        assert!(!primary.join(format!("disk{i}.raw")).exists());
        assert!(!rig.session_dir.join(format!("disk{i}.copied")).exists());
    }
    assert!(
        !rig.session_dir.join("relocation.json").exists(),
        "the cancel is not recorded"
    );
    // The directory was there before the relocation: it stays.
    assert!(primary.is_dir());
    // The disks no longer track copies: a fully staged one may pass through.
    disks[0].read(0, BLOCKS * BS).unwrap();
    assert!(disks[0].begin_direct_read().is_some());
    disks[0].end_direct_read();
    disks[0].write(8 * BS as u64, b"after the cancel").unwrap();
    disks[0].flush().unwrap();
    drop((r, disks));
    // A restart does not resume it.
    let (disks, again) = rig.restart();
    assert!(again.is_none(), "a cancelled relocation was resumed");
    assert_eq!(
        disks[0].read(7 * BS as u64, 17).unwrap(),
        b"before the cancel"
    );
    assert_eq!(
        disks[0].read(8 * BS as u64, 16).unwrap(),
        b"after the cancel"
    );
    let b = (n % 8) as u64 + 10;
    assert_eq!(disks[1].read(b * BS as u64, 4).unwrap(), n.to_le_bytes());
    // Relocated elsewhere, the new target is the disk the VM sees.
    let other = rig.dir.path().join("other/vm");
    std::fs::create_dir_all(&other).unwrap();
    let meta = Meta {
        target: other.clone(),
        switched: false,
        pass: 1,
        rate_mbps: None,
        paused: false,
        created: vec![],
        created_dir: false,
        target_id: None,
        target_inos: Default::default(),
        owner_mark: None,
    };
    let r = Relocation::begin(rig.source(&disks), meta).unwrap();
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    for (i, d) in disks.iter().enumerate() {
        let target = std::fs::read(other.join(format!("disk{i}.raw"))).unwrap();
        assert!(
            target == d.read(0, BLOCKS * BS).unwrap(),
            "disk{i}: the new target differs from the disk"
        );
    }
    assert!(!primary.join("disk0.raw").exists());
}

#[test]
fn a_cancel_removes_only_the_target_files_the_relocation_created_and_keeps_all_when_asked() {
    let rig = rig();
    let disks = rig.volumes();
    let primary = rig.dir.path().join("primary/vm");
    // disk1.raw was there before (a relocation started with --force).
    std::fs::write(primary.join("disk1.raw"), b"old").unwrap();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    let c = r.cancel(false).unwrap();
    assert_eq!(c.removed, [primary.join("disk0.raw")], "{c:?}");
    assert_eq!(c.kept, [primary.join("disk1.raw")], "{c:?}");
    assert!(primary.join("disk1.raw").exists());
    drop(r);
    // --keep-target keeps what it created too; a paused one is cancelled
    // like any.
    std::fs::remove_file(primary.join("disk1.raw")).unwrap();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    assert_eq!(r.pause().unwrap().state, State::Paused);
    let c = r.cancel(true).unwrap();
    assert!(!r.copier_running());
    assert!(c.removed.is_empty(), "{c:?}");
    assert_eq!(c.kept.len(), 2);
    assert!(primary.join("disk0.raw").exists() && primary.join("disk1.raw").exists());
    assert!(!rig.session_dir.join("relocation.json").exists());
}

#[test]
fn a_cancel_after_the_cutover_is_refused_and_changes_nothing() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    let record = std::fs::read(rig.session_dir.join("relocation.json")).unwrap();
    let targets: Vec<_> = (0..2).map(|i| rig.target_bytes(i)).collect();
    let e = r.cancel(false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("live disk"), "{e}");
    assert_eq!(r.state(), State::Done);
    assert!(disks.iter().all(|d| d.is_switched()));
    assert_eq!(
        std::fs::read(rig.session_dir.join("relocation.json")).unwrap(),
        record
    );
    assert!((0..2).all(|i| rig.target_bytes(i) == targets[i]));
    assert!(rig.dir.path().join("primary/vm/vm.json").exists());
    // The target is the live disk: writes land there.
    disks[0].write(0, b"live").unwrap();
    disks[0].flush().unwrap();
    assert_eq!(&rig.target_bytes(0)[..4], b"live");
    drop((r, disks));
    let (disks, again) = rig.restart();
    assert_eq!(again.unwrap().state(), State::Done);
    assert!(disks.iter().all(|d| d.is_switched()));
}

#[test]
fn a_cancel_asked_while_the_cutover_runs_is_refused_and_the_cutover_completes() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    // A guest write to a block of the first batch leaves it for the final
    // pass, whose commit (writes paused, state switching) asks to cancel.
    let asked: Arc<Mutex<Option<Result<Cancelled>>>> = Arc::default();
    {
        let (weak, asked, d0) = (Arc::downgrade(&r), asked.clone(), disks[0].clone());
        let written = AtomicBool::new(false);
        *r.commit_hook.lock() = Some(Arc::new(move |i, blocks: &[u64]| {
            let r = weak.upgrade().unwrap();
            if i == 0 && blocks.contains(&5) && !written.swap(true, Ordering::SeqCst) {
                d0.write(5 * BS as u64, b"dirty").unwrap();
            }
            if r.state() == State::Switching && asked.lock().is_none() {
                *asked.lock() = Some(r.cancel(false));
            }
        }));
    }
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    let e = asked
        .lock()
        .take()
        .expect("asked during the cutover")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(disks.iter().all(|d| d.is_switched()));
    let mut want = rig.images[0].clone();
    want[5 * BS..][..5].copy_from_slice(b"dirty");
    assert!(rig.target_bytes(0) == want);
    assert!(rig.session_dir.join("relocation.json").exists());
}

#[test]
fn a_cancel_whose_record_cannot_be_removed_leaves_the_relocation_resumable_and_can_be_asked_again()
{
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    rig.faults
        .inject(Rule::fail(Op::Remove, "relocation.json", libc::EIO).times(1));
    let e = r.cancel(false).unwrap_err();
    assert_eq!(rig.faults.injected(), 1, "{e}");
    assert!(e.to_string().contains("not cancelled"), "{e}");
    assert_eq!(r.state(), State::Failed);
    assert!(!r.copier_running());
    // Nothing was removed: the record, the copied maps, the targets.
    let primary = rig.dir.path().join("primary/vm");
    assert!(rig.session_dir.join("relocation.json").exists());
    for i in 0..2 {
        assert!(rig.session_dir.join(format!("disk{i}.copied")).exists());
        assert!(primary.join(format!("disk{i}.raw")).exists());
    }
    drop((r, disks));
    // A restart resumes it; cancelled again, it is gone for good.
    let (disks, again) = rig.restart();
    let r = again.expect("resumable");
    assert_ne!(r.state(), State::Done);
    r.spawn();
    wait_for_progress(&r);
    r.cancel(false).unwrap();
    assert!(!primary.join("disk0.raw").exists());
    drop((r, disks));
    assert!(rig.restart().1.is_none());
}

#[test]
fn a_recorded_relocation_whose_target_was_unreachable_at_restart_can_still_be_cancelled_naming_what_is_left(
) {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    r.stop();
    drop((r, disks));
    let primary = rig.dir.path().join("primary/vm");
    // Primary storage unreachable: nothing above the target either.
    let (mount, moved) = (rig.dir.path().join("primary"), rig.dir.path().join("away"));
    std::fs::rename(&mount, &moved).unwrap();
    let (disks, again) = rig.restart();
    assert!(again.is_none(), "served from staging");
    let c = Relocation::cancel_recorded(rig.source(&disks), false)
        .unwrap()
        .expect("recorded");
    assert!(c.removed.is_empty(), "{c:?}");
    // The files it could not reach are named as left.
    let left = c.leftover.as_ref().expect("named as left").to_string();
    for i in 0..2 {
        let p = primary.join(format!("disk{i}.raw"));
        assert!(left.contains(&*p.to_string_lossy()), "{left}");
    }
    assert!(!rig.session_dir.join("relocation.json").exists());
    assert!(Relocation::cancel_recorded(rig.source(&disks), false)
        .unwrap()
        .is_none());
    drop(disks);
    // The target back, nothing resumes.
    std::fs::rename(&moved, &mount).unwrap();
    assert!(rig.restart().1.is_none());
}

/// Moves the target directory `primary/vm` aside and puts a symbolic link to
/// `victim` (another VM's relocated disks, with known bytes) in its place,
/// as a caller who may write `primary` can at any time.
fn swap_target_for_a_link(rig: &Rig) -> (PathBuf, Vec<u8>) {
    let primary = rig.dir.path().join("primary");
    std::fs::rename(primary.join("vm"), primary.join("aside")).unwrap();
    let victim = rig.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    let bytes = b"another VM's live disk".to_vec();
    for i in 0..2 {
        std::fs::write(victim.join(format!("disk{i}.raw")), &bytes).unwrap();
    }
    std::os::unix::fs::symlink(&victim, primary.join("vm")).unwrap();
    (victim, bytes)
}

#[test]
fn a_cancel_never_removes_files_through_a_target_replaced_by_a_symlink() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    let (victim, bytes) = swap_target_for_a_link(&rig);
    let c = r.cancel(false).unwrap();
    for i in 0..2 {
        assert_eq!(
            std::fs::read(victim.join(format!("disk{i}.raw"))).unwrap(),
            bytes,
            "{c:?}"
        );
    }
    assert!(c.removed.is_empty(), "{c:?}");
    // Cancelled, but the files are left and the answer says why.
    assert!(!rig.session_dir.join("relocation.json").exists());
    let left = c.leftover.expect("the files left are named").to_string();
    assert!(left.contains("symbolic link"), "{left}");
    assert!(left.contains("not reached"), "{left}");
    assert!(
        !left.contains("disk0.raw"),
        "names the link's files: {left}"
    );
    assert!(rig.dir.path().join("primary/aside/disk0.raw").exists());
}

#[test]
fn a_restarted_relocation_does_not_open_targets_through_a_symlinked_target_dir() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    drop((disks, r));
    let (victim, bytes) = swap_target_for_a_link(&rig);
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "not resumed through the link");
    assert!(again.iter().all(|d| !d.is_switched()));
    for i in 0..2 {
        assert_eq!(
            std::fs::read(victim.join(format!("disk{i}.raw"))).unwrap(),
            bytes
        );
    }
    // Nor into another real directory put in its place.
    drop(again);
    let primary = rig.dir.path().join("primary");
    std::fs::remove_file(primary.join("vm")).unwrap();
    std::fs::rename(&victim, primary.join("vm")).unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "not resumed in another directory");
    drop(again);
    for i in 0..2 {
        assert_eq!(
            std::fs::read(primary.join(format!("vm/disk{i}.raw"))).unwrap(),
            bytes
        );
    }
    // Its own directory back: resumed.
    std::fs::rename(primary.join("vm"), &victim).unwrap();
    std::fs::rename(primary.join("aside"), primary.join("vm")).unwrap();
    assert!(rig.restart().1.is_some());
}

#[test]
fn a_force_relocation_never_empties_a_hard_linked_target_file() {
    let rig = rig();
    let disks = rig.volumes();
    // Someone else's file, linked into the target as if left over there.
    let precious = rig.dir.path().join("precious");
    std::fs::write(&precious, b"not the relocation's to empty").unwrap();
    std::fs::hard_link(&precious, rig.dir.path().join("primary/vm/disk1.raw")).unwrap();
    let meta = Meta {
        target: rig.dir.path().join("primary/vm"),
        switched: false,
        pass: 1,
        rate_mbps: None,
        paused: false,
        created: vec![],
        created_dir: false,
        target_id: None,
        target_inos: Default::default(),
        owner_mark: None,
    };
    let e = Relocation::begin(rig.source(&disks), meta).err().unwrap();
    assert!(e.to_string().contains("disk1.raw"), "{e}");
    assert!(e.to_string().contains("link"), "{e}");
    assert_eq!(
        std::fs::read(&precious).unwrap(),
        b"not the relocation's to empty"
    );
    assert!(disks.iter().all(|d| !d.is_switched()));
}

#[test]
fn a_relocation_recorded_without_the_target_identity_takes_it_at_restart_and_then_refuses_another_dir(
) {
    let rig = rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    // As an older version recorded it: no identity.
    let record = rig.session_dir.join("relocation.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert!(v.as_object_mut().unwrap().remove("target_id").is_some());
    std::fs::write(&record, serde_json::to_vec(&v).unwrap()).unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_some(), "an old record is resumed");
    drop((again, reloc));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert!(v["target_id"]["ino"].is_u64(), "recorded: {v}");
    // Another directory in its place from now on: not resumed.
    let primary = rig.dir.path().join("primary");
    std::fs::rename(primary.join("vm"), primary.join("aside")).unwrap();
    std::fs::create_dir(primary.join("vm")).unwrap();
    for i in 0..2 {
        std::fs::write(primary.join(format!("vm/disk{i}.raw")), b"keep").unwrap();
    }
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "not resumed in another directory");
    drop(again);
    assert_eq!(
        std::fs::read(primary.join("vm/disk0.raw")).unwrap(),
        b"keep"
    );
}

#[test]
fn a_restarted_relocation_never_writes_a_target_file_replaced_by_a_hard_link() {
    let rig = rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    // Someone who may write the target directory puts a link to another
    // file in place of a target (fs.protected_hardlinks=0 lets them link
    // any file).
    let precious = rig.dir.path().join("precious");
    std::fs::write(&precious, b"not the relocation's to write").unwrap();
    let t = rig.dir.path().join("primary/vm/disk1.raw");
    std::fs::remove_file(&t).unwrap();
    std::fs::hard_link(&precious, &t).unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "not resumed into a linked file");
    drop(again);
    assert_eq!(
        std::fs::read(&precious).unwrap(),
        b"not the relocation's to write"
    );
}

#[test]
fn a_relocation_whose_target_dir_was_replaced_by_a_symlink_fails_before_the_cutover() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    let (victim, bytes) = swap_target_for_a_link(&rig);
    r.spawn();
    assert_eq!(settle(&r), State::Failed, "{:?}", r.status());
    assert!(disks.iter().all(|d| !d.is_switched()));
    let e = r.status().error.unwrap_or_default();
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!victim.join("vm.json").exists());
    assert_eq!(std::fs::read(victim.join("disk0.raw")).unwrap(), bytes);
}

#[test]
fn a_relocation_whose_target_file_was_replaced_fails_before_the_cutover() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    // The daemon keeps writing the file it opened, moved aside; another
    // file now has its name, which a restart would open as the VM's disk.
    let vm = rig.dir.path().join("primary/vm");
    std::fs::rename(vm.join("disk1.raw"), vm.join("aside")).unwrap();
    std::fs::write(vm.join("disk1.raw"), b"theirs").unwrap();
    r.spawn();
    assert_eq!(settle(&r), State::Failed, "{:?}", r.status());
    assert!(disks.iter().all(|d| !d.is_switched()));
    let e = r.status().error.unwrap_or_default();
    assert!(e.contains("disk1.raw") && e.contains("replaced"), "{e}");
    assert!(!vm.join("vm.json").exists());
    assert_eq!(std::fs::read(vm.join("disk1.raw")).unwrap(), b"theirs");
}

/// Edits the session's `relocation.json` as `f` says.
fn edit_record(rig: &Rig, f: impl FnOnce(&mut serde_json::Value)) {
    let record = rig.session_dir.join("relocation.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&record, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn read_record(rig: &Rig) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(rig.session_dir.join("relocation.json")).unwrap())
        .unwrap()
}

/// Writes "mine" at offset 5 of disk `disk`, relocates and cuts over.
fn cut_over_with_mine(rig: &Rig, disk: usize) {
    let disks = rig.volumes();
    disks[disk].write(5, b"mine").unwrap();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
}

/// A restart serves the VM from its target, "mine" at 5 of disk `disk`.
fn assert_served_from_target_with_mine(rig: &Rig, disk: usize) {
    let (again, reloc) = rig.restart();
    assert_eq!(reloc.expect("served").state(), State::Done);
    assert!(again.iter().all(|d| d.is_switched()));
    assert_eq!(again[disk].read(5, 4).unwrap(), b"mine");
}

/// As a reboot may leave it: the target's device number another (NFS,
/// btrfs, ZFS, overlayfs, dm-N), recorded in another boot.
fn as_if_rebooted(v: &mut serde_json::Value) {
    let dev = v["target_id"]["dev"].as_u64().unwrap();
    v["target_id"]["dev"] = (dev ^ 0x5a5a).into();
    v["target_id"]["boot"] = "another-boot".into();
}

#[test]
fn a_relocation_whose_target_device_number_changed_on_a_path_only_root_can_change_resumes_and_is_recorded_again(
) {
    let rig = root_only_rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    let before = read_record(&rig);
    edit_record(&rig, as_if_rebooted);
    let (again, reloc) = rig.restart();
    let r = reloc.expect("resumed with the same inode and owner");
    assert_ne!(r.state(), State::Done);
    drop((again, r));
    // Recorded again for this boot, so the next check is strict.
    let v = read_record(&rig);
    assert_eq!(v["target_id"], before["target_id"], "{v}");
    assert_eq!(v["target_id"]["boot"], OsStorage.boot_id().as_str());
}

#[test]
fn a_switched_relocation_whose_target_device_number_changed_on_a_path_only_root_can_change_is_served_from_it(
) {
    let rig = root_only_rig();
    cut_over_with_mine(&rig, 0);
    edit_record(&rig, as_if_rebooted);
    assert_served_from_target_with_mine(&rig, 0);
}

#[test]
fn a_target_device_number_changed_where_others_may_write_is_refused_and_says_what_to_do() {
    // Under the world-writable /tmp: a caller's btrfs snapshot of a
    // subvolume of theirs has the same inodes, owners and filesystem type
    // on another device, so another device is never accepted there, even
    // after a reboot.
    let rig = rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    edit_record(&rig, as_if_rebooted);
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed in another directory");
    drop(again);
    // Switched: the session does not start, and the error is a state,
    // not a bad request, and says what the administrator can do.
    edit_record(&rig, |v| v["switched"] = true.into());
    let disks = rig.volumes();
    let e = Relocation::reopen(rig.source(&disks)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("release vm --discard"), "{e}");
    assert!(disks.iter().all(|d| !d.is_switched()));
}

#[test]
fn after_a_reboot_a_directory_put_in_the_targets_place_or_owned_by_another_is_refused() {
    let rig = root_only_rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    edit_record(&rig, as_if_rebooted);
    // Same owner (the caller's), another inode.
    let primary = rig.dir.path().join("primary");
    std::fs::rename(primary.join("vm"), primary.join("aside")).unwrap();
    std::fs::create_dir(primary.join("vm")).unwrap();
    for i in 0..2 {
        std::fs::write(primary.join(format!("vm/disk{i}.raw")), b"keep").unwrap();
    }
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed in another directory");
    drop(again);
    assert_eq!(
        std::fs::read(primary.join("vm/disk0.raw")).unwrap(),
        b"keep"
    );
    // The same inode, but recorded with another owner.
    std::fs::remove_dir_all(primary.join("vm")).unwrap();
    std::fs::rename(primary.join("aside"), primary.join("vm")).unwrap();
    edit_record(&rig, |v| {
        let uid = v["target_id"]["uid"].as_u64().unwrap();
        v["target_id"]["uid"] = (uid + 1).into();
    });
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed in a directory of another owner");
    drop(again);
    // The same inode and owner on another type of filesystem (a FUSE one
    // a caller mounted there reports any inode and owner it likes).
    edit_record(&rig, |v| {
        let uid = v["target_id"]["uid"].as_u64().unwrap();
        v["target_id"]["uid"] = (uid - 1).into();
        let fs = v["target_id"]["fs_type"].as_u64().unwrap();
        v["target_id"]["fs_type"] = (fs ^ 1).into();
    });
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed on another type of filesystem");
    drop(again);
    // All as recorded but the device, on a path others may write now.
    edit_record(&rig, |v| {
        let fs = v["target_id"]["fs_type"].as_u64().unwrap();
        v["target_id"]["fs_type"] = (fs ^ 1).into();
    });
    use std::os::unix::fs::PermissionsExt;
    let loose = std::fs::Permissions::from_mode(0o777);
    std::fs::set_permissions(&primary, loose).unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed where others may write");
    drop(again);
    // All as recorded but the device, where only root writes: resumed.
    std::fs::set_permissions(&primary, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(rig.restart().1.is_some());
}

#[test]
fn a_target_file_replaced_where_others_may_write_is_never_served_after_cutover() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    drop((disks, r));
    // The owner of a directory under /tmp moves the live disk aside and
    // puts a file of their own, with one link, under its name.
    let vm = rig.dir.path().join("primary/vm");
    std::fs::rename(vm.join("disk0.raw"), vm.join("aside")).unwrap();
    std::fs::write(vm.join("disk0.raw"), vec![0u8; BLOCKS * BS]).unwrap();
    let disks = rig.volumes();
    let e = Relocation::reopen(rig.source(&disks))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("replaced"), "{e}");
    assert!(disks.iter().all(|d| !d.is_switched()));
}

#[test]
fn a_target_file_replaced_where_only_root_writes_is_served_as_roots_choice() {
    let rig = root_only_rig();
    cut_over_with_mine(&rig, 1);
    // An administrator restores disk0 from a copy (a new inode).
    let vm = rig.dir.path().join("primary/vm");
    std::fs::copy(vm.join("disk0.raw"), vm.join("copy")).unwrap();
    std::fs::rename(vm.join("copy"), vm.join("disk0.raw")).unwrap();
    assert_served_from_target_with_mine(&rig, 1);
}

#[test]
fn a_switched_target_file_with_another_name_elsewhere_is_still_served() {
    let rig = rig();
    cut_over_with_mine(&rig, 1);
    // An administrator's `cp -al` snapshot of the primary directory.
    let snap = rig.dir.path().join("snapshot");
    std::fs::create_dir(&snap).unwrap();
    for i in 0..2 {
        let f = format!("disk{i}.raw");
        std::fs::hard_link(rig.dir.path().join("primary/vm").join(&f), snap.join(&f)).unwrap();
    }
    assert_served_from_target_with_mine(&rig, 1);
}

#[test]
fn a_cancel_after_the_target_dir_was_removed_succeeds_naming_nothing() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    std::fs::remove_dir_all(rig.dir.path().join("primary/vm")).unwrap();
    let c = r.cancel(false).unwrap();
    assert!(c.leftover.is_none(), "{:?}", c.leftover);
    assert!(c.removed.is_empty(), "{c:?}");
    assert!(!rig.session_dir.join("relocation.json").exists());
}

#[test]
fn a_cancel_after_the_target_dir_was_replaced_never_names_the_new_dirs_files() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    let primary = rig.dir.path().join("primary");
    std::fs::rename(primary.join("vm"), primary.join("aside")).unwrap();
    std::fs::create_dir(primary.join("vm")).unwrap();
    std::fs::write(primary.join("vm/disk0.raw"), b"keep").unwrap();
    let c = r.cancel(false).unwrap();
    let left = c.leftover.expect("said").to_string();
    assert!(left.contains("not reached"), "{left}");
    assert!(!left.contains("disk0.raw"), "{left}");
    assert_eq!(
        std::fs::read(primary.join("vm/disk0.raw")).unwrap(),
        b"keep"
    );
    assert!(primary.join("aside/disk0.raw").exists());
}

#[test]
fn a_force_relocation_refusing_one_target_file_empties_none() {
    let rig = rig();
    let disks = rig.volumes();
    let primary = rig.dir.path().join("primary/vm");
    std::fs::write(primary.join("disk0.raw"), b"an old copy, kept on refusal").unwrap();
    let precious = rig.dir.path().join("precious");
    std::fs::write(&precious, b"not the relocation's to empty").unwrap();
    std::fs::hard_link(&precious, primary.join("disk1.raw")).unwrap();
    let meta = Meta {
        target: primary.clone(),
        switched: false,
        pass: 1,
        rate_mbps: None,
        paused: false,
        created: vec![],
        created_dir: false,
        target_id: None,
        target_inos: Default::default(),
        owner_mark: None,
    };
    let e = Relocation::begin(rig.source(&disks), meta).err().unwrap();
    assert!(e.to_string().contains("disk1.raw"), "{e}");
    assert!(
        std::fs::read(primary.join("disk0.raw")).unwrap() == b"an old copy, kept on refusal",
        "disk0.raw was emptied"
    );
    assert!(
        !rig.session_dir.join("disk0.copied").exists(),
        "a copied map without a record"
    );
}

#[test]
fn a_cancel_whose_target_is_missing_from_a_parent_on_another_filesystem_names_what_is_left() {
    let rig = rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    // Primary storage not mounted: its mount point is there, empty, on the
    // filesystem below (another device than the target's, in this boot).
    let primary = rig.dir.path().join("primary");
    std::fs::rename(&primary, rig.dir.path().join("away")).unwrap();
    std::fs::create_dir(&primary).unwrap();
    edit_record(&rig, |v| {
        let dev = v["target_id"]["dev"].as_u64().unwrap();
        v["target_id"]["dev"] = (dev ^ 0x5a5a).into();
    });
    let (disks, again) = rig.restart();
    assert!(again.is_none(), "served from staging");
    let c = Relocation::cancel_recorded(rig.source(&disks), false)
        .unwrap()
        .expect("recorded");
    let left = c.leftover.expect("named as left").to_string();
    assert!(
        left.contains(&*primary.join("vm/disk0.raw").to_string_lossy()),
        "{left}"
    );
}

/// `relocate --resume` reopens a relocation in a running daemon: a guest
/// write that lands while the copied maps are read and installed must not
/// leave its block trusted as copied (the cutover would commit a target
/// without it).
#[test]
fn a_guest_write_racing_a_reopen_in_a_running_daemon_is_never_trusted_as_copied() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    r.resume_pass_unthrottled().unwrap();
    assert!(r.copied_map(0).test(5), "block 5 copied, from the backup");
    r.stop();
    drop(r);
    // As a restart that could not reopen it leaves the disks: not tracking.
    for d in &disks {
        d.untrack_copies();
    }
    let writer = disks[0].clone();
    crate::relocate::test_hooks::set_before_tracking(
        &rig.session_dir,
        Arc::new(move || {
            writer
                .write(5 * BS as u64, b"written during the reopen")
                .unwrap();
            writer.flush().unwrap();
        }),
    );
    let r = Relocation::reopen(rig.source(&disks))
        .unwrap()
        .expect("reopened");
    assert_eq!(
        disks[0].read(5 * BS as u64, 25).unwrap(),
        b"written during the reopen"
    );
    assert!(
        !r.copied_map(0).test(5),
        "a block the guest wrote during the reopen is trusted as copied"
    );
    // And the copy that follows puts the write on the target.
    r.resume_pass_unthrottled().unwrap();
    let t = std::fs::read(rig.dir.path().join("primary/vm/disk0.raw")).unwrap();
    assert_eq!(&t[5 * BS..5 * BS + 25], b"written during the reopen");
}

/// Copies every block of both disks of a relocation begun in `rig` (no
/// cutover) and stops, as a daemon killed before converging would.
fn copy_all_then_crash(rig: &Rig) {
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    r.resume_pass_unthrottled().unwrap();
    assert_eq!(r.copied_map(0).bits().count(), BLOCKS as u64);
    drop((r, disks));
}

/// Copied blocks in disk `i`'s map file, as a restarted daemon reads it.
fn copied_on_disk(rig: &Rig, i: usize) -> u64 {
    let m = PersistentBitmap::open(
        &OsStorage,
        &rig.session_dir.join(format!("disk{i}.copied")),
        MapKind::Copied,
        BS as u32,
        BLOCKS as u64,
    )
    .unwrap();
    m.bits().count()
}

/// Restarts `rig`, expects disk 0's copied map forgotten (durably) and
/// disk 1's kept, then lets the relocation finish: every target is the
/// image.
fn assert_disk0_copied_again(rig: &Rig) {
    let (disks, r) = rig.restart();
    let r = r.expect("resumed");
    assert_eq!(r.copied_map(0).bits().count(), 0, "disk0's copies trusted");
    assert_eq!(copied_on_disk(rig, 0), 0, "the forgotten map is durable");
    assert_eq!(r.copied_map(1).bits().count(), BLOCKS as u64);
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    for (i, d) in disks.iter().enumerate() {
        assert!(rig.target_bytes(i) == rig.images[i], "disk{i}");
        assert!(d.read(0, BLOCKS * BS).unwrap() == rig.images[i]);
    }
}

#[test]
fn a_resumed_relocation_trusts_copies_over_a_target_whose_only_holes_are_backup_holes() {
    let rig = rig();
    let disks = rig.volumes();
    // A zero block the guest wrote is a hole on the target too.
    disks[0].write_zeroes(9 * BS as u64, BS as u64).unwrap();
    disks[0].flush().unwrap();
    drop(disks);
    copy_all_then_crash(&rig);
    let (_disks, r) = rig.restart();
    let r = r.unwrap();
    // Block 3 (a backup hole) is a hole in the target: still trusted; the
    // guest's block 9 is forgotten by the restart rule only.
    assert_eq!(r.copied_map(0).bits().count(), BLOCKS as u64 - 1);
    assert!(r.copied_map(0).test(3));
    assert_eq!(r.copied_map(1).bits().count(), BLOCKS as u64);
}

#[test]
fn a_resumed_relocation_whose_target_file_was_emptied_to_holes_copies_that_disk_again() {
    let rig = rig();
    copy_all_then_crash(&rig);
    // As a tmpfs remounted and the file made again with `truncate -s`: the
    // same name, inode and length, all holes.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rig.dir.path().join("primary/vm/disk0.raw"))
        .unwrap();
    f.set_len(0).unwrap();
    f.set_len((BLOCKS * BS) as u64).unwrap();
    drop(f);
    assert_disk0_copied_again(&rig);
}

#[test]
fn a_resumed_relocation_whose_target_file_was_zeroed_in_place_without_holes_copies_that_disk_again()
{
    let rig = rig();
    copy_all_then_crash(&rig);
    // As a NAS snapshot rolled back, or a filesystem that reports no
    // holes (NFSv3): the same file and length, zeros written, no hole.
    std::fs::write(
        rig.dir.path().join("primary/vm/disk0.raw"),
        vec![0u8; BLOCKS * BS],
    )
    .unwrap();
    assert_disk0_copied_again(&rig);
}

#[test]
fn a_resumed_relocation_whose_target_file_has_another_length_copies_that_disk_again() {
    let rig = rig();
    copy_all_then_crash(&rig);
    // `touch`ed in place of the lost file: size 0.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rig.dir.path().join("primary/vm/disk0.raw"))
        .unwrap();
    f.set_len(0).unwrap();
    drop(f);
    assert_disk0_copied_again(&rig);
}

#[test]
fn a_switched_relocation_whose_target_file_has_another_length_is_not_served() {
    let rig = rig();
    cut_over_with_mine(&rig, 0);
    let t = rig.dir.path().join("primary/vm/disk1.raw");
    let f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
    f.set_len((BLOCKS * BS / 2) as u64).unwrap();
    drop(f);
    let disks = rig.volumes();
    let e = Relocation::reopen(rig.source(&disks)).err().unwrap();
    assert!(e.to_string().contains("disk1.raw"), "{e}");
    assert!(e.to_string().contains("not served"), "{e}");
    assert_eq!(
        std::fs::metadata(&t).unwrap().len(),
        (BLOCKS * BS / 2) as u64,
        "resized"
    );
}

#[test]
fn a_force_relocation_never_empties_a_target_another_relocation_serves_from() {
    // Daemon A relocated its VM to P/vm and serves it from there.
    let a = rig();
    cut_over_with_mine(&a, 0);
    let (a_disks, a_reloc) = a.restart();
    let live = a.dir.path().join("primary/vm");
    let before = std::fs::read(live.join("disk0.raw")).unwrap();
    // Daemon B (its own staging) relocates a VM of the same name there.
    let b = rig();
    let b_disks = b.volumes();
    let meta = Meta {
        target: live.clone(),
        switched: false,
        pass: 1,
        rate_mbps: None,
        paused: false,
        created: vec![],
        created_dir: false,
        target_id: None,
        target_inos: Default::default(),
        owner_mark: None,
    };
    let e = Relocation::begin(b.source(&b_disks), meta).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("in use by another recoverfs"), "{e}");
    assert!(std::fs::read(live.join("disk0.raw")).unwrap() == before);
    assert_eq!(a_disks[0].read(5, 4).unwrap(), b"mine");
    drop((a_disks, a_reloc));
}

#[test]
fn a_relocation_never_empties_a_target_file_locked_by_another_open() {
    let rig = rig();
    let disks = rig.volumes();
    let t = rig.dir.path().join("primary/vm/disk1.raw");
    std::fs::write(&t, b"in use").unwrap();
    // Another open file description holds its shared lock.
    let other = OsStorage.open(&t, Open::Existing).unwrap();
    assert!(other.try_lock(false).unwrap());
    let meta = Meta {
        target: rig.dir.path().join("primary/vm"),
        switched: false,
        pass: 1,
        rate_mbps: None,
        paused: false,
        created: vec![],
        created_dir: false,
        target_id: None,
        target_inos: Default::default(),
        owner_mark: None,
    };
    let e = Relocation::begin(rig.source(&disks), meta.clone())
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("disk1.raw"), "{e}");
    assert_eq!(std::fs::read(&t).unwrap(), b"in use");
    // Closed: emptied and relocated.
    drop(other);
    let r = Relocation::begin(rig.source(&disks), meta).unwrap();
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    assert!(rig.target_bytes(1) == rig.images[1]);
}

/// A `relocate --to <to> --force` request of `rig`'s VM.
fn forced<'a>(rig: &'a Rig, disks: &'a [Arc<Volume>], to: &'a Path) -> Request<'a> {
    Request {
        source: rig.source(disks),
        to,
        rate_mbps: None,
        force: true,
        forbidden: &[],
    }
}

#[test]
fn a_force_relocation_over_a_complete_relocated_copy_is_refused_saying_what_to_do() {
    let rig = rig();
    cut_over_with_mine(&rig, 0);
    let before = rig.target_bytes(0);
    // Another session of the VM (its relocation forgotten) relocates over
    // the copy, whose vm.json says a VM may run from it.
    std::fs::remove_dir_all(&rig.session_dir).unwrap();
    let disks = rig.volumes();
    let to = rig.dir.path().join("primary");
    let e = Relocation::start(forced(&rig, &disks, &to)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("vm.json"), "{e}");
    assert!(e.to_string().contains("remove that directory"), "{e}");
    assert!(rig.target_bytes(0) == before);
}

#[test]
fn a_target_inside_any_recoverfs_staging_directory_is_refused() {
    let rig = rig();
    let disks = rig.volumes();
    // Another daemon's staging directory, not one of this daemon's.
    let other = rig.dir.path().join("stg2");
    std::fs::create_dir_all(other.join("sessions")).unwrap();
    std::fs::write(other.join(crate::staging::STAGING_MARKER), b"{}").unwrap();
    for to in [other.clone(), other.join("sessions")] {
        let e = Relocation::start(forced(&rig, &disks, &to)).err().unwrap();
        assert!(e.to_string().contains("staging directory"), "{e}");
        assert!(!to.join("vm").exists(), "made in {}", to.display());
    }
}

#[test]
fn a_recoverfs_fuse_mount_is_found_at_or_above_a_target_and_nowhere_else() {
    let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:44 / /tmp/explore/mnt\\040a rw,nosuid,nodev,relatime shared:20 - fuse recoverfs rw,user_id=0
41 22 0:45 / /srv/other rw,relatime shared:21 - fuse.sshfs host:/ rw
";
    let mounts = crate::util::mountinfo::parse(info);
    let over = |p: &str| recoverfs_mount_over(&mounts, Path::new(p));
    assert_eq!(
        over("/tmp/explore/mnt a"),
        Some("/tmp/explore/mnt a".into())
    );
    assert_eq!(
        over("/tmp/explore/mnt a/web01"),
        Some("/tmp/explore/mnt a".into())
    );
    assert_eq!(over("/tmp/explore/mnt ab"), None);
    assert_eq!(over("/srv/other/x"), None);
    assert_eq!(over("/tmp/explore"), None);
}

/// Shared locks alone would let two relocations (two daemons, one down
/// while the other took the files) both write one target: a reopen before
/// the cutover must be the only holder.
#[test]
fn a_reopen_of_a_relocation_whose_target_another_open_holds_is_not_resumed() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    r.stop();
    drop(r);
    let t = rig.dir.path().join("primary/vm/disk1.raw");
    let other = OsStorage.open(&t, Open::Existing).unwrap();
    assert!(other.try_lock(false).unwrap());
    let (_disks, reloc) = rig.restart();
    assert!(
        reloc.is_none(),
        "resumed beside another holder of its target"
    );
    drop(other);
    let (_disks, reloc) = rig.restart();
    assert!(reloc.is_some(), "not resumed once the file was let go");
}
