//! Datastore tests: kept staging is never hidden by a repository that does
//! not answer (issue 10 item 6), one VM's lifecycle is serialised and a
//! released session's fetch never lands in a later one (item 7), and no
//! daemon-wide lock is held across repository I/O (item 8).

use super::*;
use crate::prefetch::PrefetchOptions;
use crate::repo::testing::{Knobs, TestBackend};
use crate::repo::writer::{run_backup, BackupRequest};
use crate::staging::StagingDir;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Duration;

const BS: usize = 64 << 10;

struct Rig {
    dir: tempfile::TempDir,
    repo: Arc<Repository>,
    knobs: Knobs,
    ds: Arc<Datastore>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let (created, _) = Repository::open_or_create(repo_path.to_str().unwrap()).unwrap();
    let knobs = Knobs::default();
    let repo =
        Repository::open_backend(Box::new(TestBackend::new(&repo_path, knobs.clone()))).unwrap();
    let staging = StagingDir::open(&dir.path().join("staging"), created.id(), "test").unwrap();
    let prefetch = PrefetchOptions {
        use_profile: false,
        default_profile: false,
        ..Default::default()
    };
    let ds = Datastore::new(
        repo.clone(),
        staging,
        &dir.path().join("mnt"),
        4,
        prefetch,
        Default::default(),
    );
    Rig {
        dir,
        repo,
        knobs,
        ds,
    }
}

/// Backs up `blocks` random 64 KiB blocks as `vm`; returns id and bytes.
fn backup(r: &Rig, vm: &str, seed: u64, blocks: usize) -> (String, Vec<u8>) {
    let mut data = vec![0u8; blocks * BS];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    let img = r.dir.path().join(format!("{vm}-{seed}.img"));
    std::fs::write(&img, &data).unwrap();
    let rep = run_backup(
        &r.repo,
        BackupRequest {
            vm: vm.into(),
            config: None,
            chunk_size: BS as u32,
            images: vec![img],
            progress: false,
        },
    )
    .unwrap();
    (rep.manifest.id, data)
}

fn disk(r: &Rig, vm: &str) -> Arc<Volume> {
    r.ds.session(vm).expect("session").disks[0].clone()
}

#[test]
fn a_transient_repository_error_never_hides_kept_staging() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    assert_eq!(r.ds.recover("vm", None).unwrap().backup, b1);
    disk(&r, "vm").write(0, b"the guest wrote this").unwrap();
    r.ds.release("vm", false).unwrap();
    let (b2, _) = backup(&r, "vm", 2, 8);
    assert_ne!(b1, b2);
    // The kept session's backup cannot be checked right now.
    r.knobs.unreachable(&format!("backups/vm/{b1}"));
    let info = r.ds.recover("vm", None).unwrap();
    assert_eq!(info.backup, b1, "recover moved on to the newer backup");
    assert!(info.resumed);
    assert_eq!(disk(&r, "vm").read(0, 20).unwrap(), b"the guest wrote this");
}

#[test]
fn a_fully_staged_session_resumes_while_the_repository_is_unreachable() {
    let r = rig();
    let (b1, mut data) = backup(&r, "vm", 3, 8);
    r.ds.recover("vm", None).unwrap();
    let d = disk(&r, "vm");
    assert_eq!(d.read(0, data.len()).unwrap(), data, "stages every block");
    d.write(100, b"kept").unwrap();
    data[100..104].copy_from_slice(b"kept");
    r.ds.release("vm", false).unwrap();
    r.knobs.unreachable("");
    let info = r.ds.recover("vm", None).unwrap();
    assert_eq!((info.backup.as_str(), info.resumed), (b1.as_str(), true));
    assert_eq!(disk(&r, "vm").read(0, data.len()).unwrap(), data);
    r.ds.release("vm", false).ok();
}

#[test]
fn kept_staging_is_passed_over_only_when_its_backup_is_gone() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 4, 4);
    r.ds.recover("vm", None).unwrap();
    r.ds.release("vm", false).unwrap();
    let (b2, _) = backup(&r, "vm", 5, 4);
    std::fs::remove_file(r.dir.path().join(format!("repo/backups/vm/{b1}.json"))).unwrap();
    let info = r.ds.recover("vm", None).unwrap();
    assert_eq!(info.backup, b2);
    assert_eq!(info.skipped, vec![b1.clone()]);
    assert!(
        r.ds.staging_root().join("sessions/vm").join(&b1).exists(),
        "the passed-over staging stays on disk"
    );
}

#[test]
fn a_recover_waits_for_a_release_and_a_released_fetch_never_lands_in_the_next_session() {
    let r = rig();
    let (_, data) = backup(&r, "vm", 6, 4);
    r.ds.recover("vm", None).unwrap();
    let old = disk(&r, "vm");
    r.knobs.close_gate();
    let reader = {
        let old = old.clone();
        std::thread::spawn(move || old.read(BS as u64, 10))
    };
    while old.status().fetches_in_flight == 0 {
        std::thread::yield_now();
    }
    // Release while the fetch of block 1 is stuck in the repository.
    let releaser = {
        let ds = r.ds.clone();
        std::thread::spawn(move || ds.release("vm", false))
    };
    std::thread::sleep(Duration::from_millis(100));
    let (tx, rx) = crossbeam_channel::bounded(1);
    {
        let ds = r.ds.clone();
        std::thread::spawn(move || {
            ds.recover("vm", None).unwrap();
            let d = ds.session("vm").unwrap().disks[0].clone();
            d.write(BS as u64, &vec![0x5a; BS]).unwrap();
            d.flush().unwrap();
            let _ = tx.send(());
        });
    }
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the next recovery finishes while the old fetch is stuck");
    r.knobs.open_gate();
    releaser.join().unwrap().unwrap();
    assert!(
        reader.join().unwrap().is_err(),
        "the released session's read fails"
    );
    old.quiesce(Duration::from_secs(10));
    let now = disk(&r, "vm").read(BS as u64, BS).unwrap();
    assert!(
        now.iter().all(|&b| b == 0x5a),
        "the released session's fetch overwrote the new session's write (backup bytes: {})",
        now[..] == data[BS..2 * BS]
    );
}

#[test]
fn a_discard_never_removes_staging_that_a_recovery_opened() {
    let r = rig();
    backup(&r, "vm", 7, 4);
    for _ in 0..40 {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let recoverer = {
            let (ds, barrier) = (r.ds.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                ds.recover("vm", None).unwrap();
                let s = ds.session("vm").unwrap();
                // Whatever the discard did, the open session's files are there.
                assert!(
                    s.dir.join("session.json").exists(),
                    "staging of a live session was removed"
                );
                s.disks[0].read(0, 4096).unwrap();
                ds.release("vm", false).unwrap();
            })
        };
        let discarder = {
            let (ds, barrier) = (r.ds.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let _ = ds.discard_kept("vm");
            })
        };
        recoverer.join().unwrap();
        discarder.join().unwrap();
    }
}

#[test]
fn recoveries_of_many_vms_run_in_parallel_and_lookups_never_wait_on_the_repository() {
    let r = rig();
    let vms: Vec<String> = (0..20).map(|i| format!("vm{i}")).collect();
    for (i, vm) in vms.iter().enumerate() {
        backup(&r, vm, 100 + i as u64, 2);
    }
    let meta_ms = 250;
    r.knobs.meta_delay(meta_ms);
    let lone = Instant::now();
    r.ds.recover("vm0", None).unwrap();
    let lone = lone.elapsed();
    let start = Instant::now();
    let threads: Vec<_> = vms[1..]
        .iter()
        .cloned()
        .map(|vm| {
            let ds = r.ds.clone();
            std::thread::spawn(move || ds.recover(&vm, None).unwrap())
        })
        .collect();
    let mut slowest = Duration::ZERO;
    while threads.iter().any(|t| !t.is_finished()) {
        let t = Instant::now();
        let _ = r.ds.session("vm0");
        let _ = r.ds.sessions();
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    threads.into_iter().for_each(|t| {
        t.join().unwrap();
    });
    let all = start.elapsed();
    eprintln!("one recovery {lone:?}, 19 at once {all:?}, slowest lookup {slowest:?}");
    assert!(
        all < lone * 4,
        "19 recoveries at once took {all:?}, one took {lone:?}: they ran one after another"
    );
    assert!(
        slowest < Duration::from_millis(meta_ms / 2),
        "a lookup waited {slowest:?} for the repository"
    );
    assert_eq!(r.ds.sessions().len(), 20);
    let _ = Path::new("");
}
