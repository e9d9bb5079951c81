//! Relocation against a rig: a repository holding the backup of two
//! disks, their session's volumes over storage that injects faults, and a
//! target directory. The rig and the helpers tests of more than one
//! concern use are here; the tests are in a module per concern: `start`,
//! `copy`, `pause`, `cutover`, `reopen`, `retry`, `target` and `cancel`.

use super::*;
use crate::prefetch::Scheduler;
use crate::repo::Repository;
use crate::staging::io::fault::FaultyStorage;
use crate::staging::io::OsStorage;
use rand::{Rng, SeedableRng};

mod cancel;
mod copy;
mod cutover;
mod pause;
mod reopen;
mod retry;
mod start;
mod target;

const BS: usize = 64 << 10;
const BLOCKS: usize = 24;

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
            rate_mbps,
            ..Meta::first_pass(self.dir.path().join("primary/vm"))
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

/// Edits the session's `relocation.json` as `f` says.
fn edit_record(rig: &Rig, f: impl FnOnce(&mut serde_json::Value)) {
    let record = rig.session_dir.join("relocation.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&record, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// Writes "mine" at offset 5 of disk `disk`, relocates and cuts over.
fn cut_over_with_mine(rig: &Rig, disk: usize) {
    let disks = rig.volumes();
    disks[disk].write(5, b"mine").unwrap();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
}
