//! Cutover under injected faults (issue 10 item 5): whatever fails before
//! the commit point leaves every disk on staging; after it there is only
//! forward progress, every disk on its target; never a mix, and never a
//! write acknowledged on one side and served from the other after a restart.

use super::*;
use crate::prefetch::Scheduler;
use crate::repo::Repository;
use crate::staging::io::fault::{FaultyStorage, Op, Rule};
use crate::staging::io::OsStorage;
use rand::{Rng, SeedableRng};

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
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let images: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            let mut data = vec![0u8; BLOCKS * BS];
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
        let meta = Meta {
            target: self.dir.path().join("primary/vm"),
            switched: false,
            pass: 1,
            rate_mbps: None,
        };
        let r = Relocation::begin(self.source(disks), meta).unwrap();
        r.spawn();
        r
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
    // The guest goes on, on staging, and its flushed write survives a restart.
    disks[0].write(BS as u64, b"after").unwrap();
    disks[0].flush().unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_some_and(|r| r.state() != State::Done));
    assert!(again.iter().all(|d| !d.is_switched()));
    assert_eq!(again[0].read(BS as u64, 5).unwrap(), b"after");
    assert_eq!(again[1].read(5, 6).unwrap(), b"before");
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
fn a_failing_target_fails_the_relocation_before_any_switch() {
    let rig = rig();
    let disks = rig.volumes();
    rig.faults
        .inject(Rule::fail(Op::Sync, "primary/vm/disk1.raw", libc::EIO));
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed);
    assert!(disks.iter().all(|d| !d.is_switched()));
    disks[1].write(0, b"still on staging").unwrap();
    disks[1].flush().unwrap();
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
