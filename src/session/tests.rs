//! Datastore tests: kept staging is never hidden by a repository that does
//! not answer (issue 10 item 6), one VM's lifecycle is serialised and a
//! released session's fetch never lands in a later one (item 7), and no
//! daemon-wide lock is held across repository I/O (item 8).

use super::*;
use crate::error::ErrorKind;
use crate::prefetch::PrefetchOptions;
use crate::repo::testing::{Knobs, TestBackend};
use crate::repo::writer::{run_backup, BackupRequest};
use crate::staging::StagingSet;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

const BS: usize = 64 << 10;

struct Rig {
    dir: tempfile::TempDir,
    repo: Arc<Repository>,
    repo_id: String,
    knobs: Knobs,
    ds: Arc<Datastore>,
}

fn rig() -> Rig {
    rig_with(&[])
}

/// Export points (name, its own staging under the rig's directory), each
/// on its own address (nothing listens: frontends are not started); none:
/// the default point.
type Points<'a> = &'a [(&'a str, Option<&'a str>)];

fn rig_with(points: Points) -> Rig {
    rig_limited(points, crate::placement::DEFAULT_MAX_CONNECTIONS_PER_HOST)
}

/// `rig_with`, each host allowed `max_conn` export points.
fn rig_limited(points: Points, max_conn: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let (created, _) = Repository::open_or_create(repo_path.to_str().unwrap()).unwrap();
    let knobs = Knobs::default();
    let repo =
        Repository::open_backend(Box::new(TestBackend::new(&repo_path, knobs.clone()))).unwrap();
    let repo_id = created.id().to_string();
    let ds = datastore_limited(dir.path(), &repo, points, max_conn);
    Rig {
        dir,
        repo,
        repo_id,
        knobs,
        ds,
    }
}

fn datastore(dir: &Path, repo: &Arc<Repository>, points: Points) -> Arc<Datastore> {
    let max_conn = crate::placement::DEFAULT_MAX_CONNECTIONS_PER_HOST;
    datastore_limited(dir, repo, points, max_conn)
}

fn datastore_limited(
    dir: &Path,
    repo: &Arc<Repository>,
    points: Points,
    max_conn: usize,
) -> Arc<Datastore> {
    // As `serve --no-profile`: most tests want no prefetch of their own.
    let prefetch = PrefetchOptions {
        use_profile: false,
        default_profile: false,
        ..Default::default()
    };
    datastore_prefetching(dir, repo, points, max_conn, prefetch)
}

fn datastore_prefetching(
    dir: &Path,
    repo: &Arc<Repository>,
    points: Points,
    max_conn: usize,
    prefetch: PrefetchOptions,
) -> Arc<Datastore> {
    let mut placement = PlacementConfig {
        max_connections_per_host: max_conn,
        ..PlacementConfig::default()
    };
    if !points.is_empty() {
        placement.points = points
            .iter()
            .enumerate()
            .map(|(i, (name, staging))| crate::placement::PointSpec {
                name: name.to_string(),
                listen: Some(std::net::Ipv4Addr::new(198, 18, 0, i as u8 + 1).into()),
                staging: staging.map(|s| dir.join(s)),
                ..crate::placement::PointSpec::default_point()
            })
            .collect();
    }
    let named: Vec<(&str, Option<&Path>)> = placement
        .points
        .iter()
        .map(|p| (p.name.as_str(), p.staging.as_deref()))
        .collect();
    let stagings =
        StagingSet::open(&dir.join("staging"), &dir.join("mnt"), &named, repo, &[]).unwrap();
    Datastore::new(
        repo.clone(),
        stagings,
        &dir.join("mnt"),
        4,
        prefetch,
        placement,
    )
}

/// The daemon stops without releasing anything (staging flushed) and
/// starts again with `points`, resuming what was served.
fn restart(mut r: Rig, points: Points) -> Rig {
    r.ds.flush_all().unwrap();
    // The old datastore, and so its staging locks, go first.
    drop(r.ds);
    r.ds = datastore(r.dir.path(), &r.repo, points);
    r.ds.resume_active();
    r
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

/// A `forget` that read the pins (none) before a new session's pin, and
/// deletes backup `b` of `vm` just as that pin is put.
fn forget_as_its_pin_is_put(r: &Rig, b: &str) {
    let plain = crate::repo::backend::LocalDir::new(&r.dir.path().join("repo"));
    let key = format!("backups/vm/{b}.json");
    r.knobs.before_first("pins/vm/", move || {
        use crate::repo::backend::Backend;
        plain.delete(&key).unwrap()
    });
}

#[test]
fn a_session_whose_backup_is_forgotten_as_it_pins_it_serves_nothing() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    // forget read the pins (none) before this session's pin, and deletes
    // the manifest just as the pin is put: gc may sweep its chunks next.
    forget_as_its_pin_is_put(&r, &b1);
    let e = r.ds.recover("vm", Some(&b1)).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::NotFound, "{e}");
    assert!(r.ds.session("vm").is_none());
    assert!(crate::repo::pins::of_vm(&r.repo, "vm").unwrap().is_empty());
}

#[test]
fn a_session_whose_pin_could_not_be_written_is_pinned_by_the_next_backup_check() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    r.knobs.unreachable("pins/");
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.knobs.reachable();
    assert!(crate::repo::pins::of_vm(&r.repo, "vm").unwrap().is_empty());
    r.ds.check_backups();
    let pins = crate::repo::pins::of_vm(&r.repo, "vm").unwrap();
    assert_eq!(pins.len(), 1);
    assert_eq!(
        (pins[0].backups.clone(), pins[0].state.as_str()),
        (vec![b1], "serving")
    );
}

/// review23 L4: a pin that cannot be written does not skip the check
/// that the backup still exists, and `status` says the session is
/// unpinned until its pin is written.
#[test]
fn a_session_whose_pin_cannot_be_written_still_refuses_a_backup_forgotten_meanwhile_and_shows_unpinned(
) {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    forget_as_its_pin_is_put(&r, &b1);
    r.knobs.unreachable("pins/");
    let e = r.ds.recover("vm", Some(&b1)).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::NotFound, "{e}");
    assert!(r.ds.session("vm").is_none());

    let (b2, _) = backup(&r, "vm", 2, 8);
    r.ds.recover("vm", Some(&b2)).unwrap();
    let s = r.ds.session("vm").unwrap();
    assert!(r.ds.status(&s).unpinned, "status hides a missing pin");
    r.knobs.reachable();
    r.ds.check_backups();
    assert!(!r.ds.status(&s).unpinned);
}

/// explore4 L1: a damaged copy of the manifest in kept staging gives way
/// to the repository's (checked), which replaces it; the guest's writes
/// are resumed, named backup or not.
#[test]
fn kept_staging_whose_manifest_copy_is_damaged_resumes_from_the_repositorys_copy() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    for named in [true, false] {
        r.ds.recover("vm", None).unwrap();
        disk(&r, "vm").write(0, b"the guest wrote this").unwrap();
        r.ds.release("vm", false).unwrap();
        let copy = main_staging(&r)
            .join("sessions/vm")
            .join(&b1)
            .join("manifest.json");
        std::fs::write(&copy, b"{\"trunc").unwrap();
        let info = r.ds.recover("vm", named.then_some(b1.as_str())).unwrap();
        assert!(info.resumed, "named {named}: not resumed");
        assert_eq!(disk(&r, "vm").read(0, 20).unwrap(), b"the guest wrote this");
        let fixed = std::fs::read(&copy).unwrap();
        assert!(fixed.len() > 100, "the damaged copy was not replaced");
        r.ds.release("vm", false).unwrap();
    }
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

/// A fully staged session with a guest write is kept; `out_of_place`
/// leaves the repository's path without it (the repository moved away).
/// The session resumes from its own manifest copy; nothing calls its
/// backup gone nor writes there; status says unreachable until it is back.
fn kept_staging_resumes_and_no_backup_is_called_gone_while(out_of_place: fn(&Path)) {
    let r = rig();
    let (b1, mut data) = backup(&r, "vm", 3, 8);
    r.ds.recover("vm", None).unwrap();
    let d = disk(&r, "vm");
    assert_eq!(d.read(0, data.len()).unwrap(), data, "stages every block");
    d.write(100, b"kept").unwrap();
    data[100..104].copy_from_slice(b"kept");
    r.ds.release("vm", false).unwrap();
    let (root, away) = (r.dir.path().join("repo"), r.dir.path().join("away"));
    std::fs::rename(&root, &away).unwrap();
    out_of_place(&root);
    let info = r.ds.recover("vm", None).unwrap();
    assert_eq!((info.backup.as_str(), info.resumed), (b1.as_str(), true));
    assert!(info.skipped.is_empty());
    assert_eq!(disk(&r, "vm").read(0, data.len()).unwrap(), data);
    let e = r.ds.recover("other", None).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("does not answer as itself"), "{e}");
    r.ds.check_backups();
    let st = r.ds.status(&r.ds.session("vm").unwrap());
    assert_eq!(st.backup_gone, None);
    let why = st.repo_unreachable.expect("status says unreachable");
    assert!(why.contains("no repo.json"), "{why}");
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "written where the repository was: {left:?}"
    );
    // It comes back: the next check clears the status.
    let _ = std::fs::remove_dir(&root);
    std::fs::rename(&away, &root).unwrap();
    r.ds.check_backups();
    let st = r.ds.status(&r.ds.session("vm").unwrap());
    assert_eq!((st.backup_gone, st.repo_unreachable), (None, None));
    r.ds.release("vm", false).ok();
}

#[test]
fn kept_staging_resumes_while_the_repository_directory_is_missing() {
    kept_staging_resumes_and_no_backup_is_called_gone_while(|_| {});
}

#[test]
fn kept_staging_resumes_while_an_empty_directory_stands_in_for_the_repository() {
    // An NFS share not mounted: its empty mount point.
    kept_staging_resumes_and_no_backup_is_called_gone_while(|root| {
        std::fs::create_dir(root).unwrap()
    });
}

#[test]
fn a_served_sessions_backup_is_not_called_gone_while_the_repository_is_moved_away() {
    let r = rig();
    backup(&r, "vm", 3, 4);
    r.ds.recover("vm", None).unwrap();
    let root = r.dir.path().join("repo");
    std::fs::rename(&root, r.dir.path().join("away")).unwrap();
    std::fs::create_dir(&root).unwrap();
    r.ds.check_backups();
    let st = r.ds.status(&r.ds.session("vm").unwrap());
    assert_eq!(
        st.backup_gone, None,
        "an empty directory answered for the repository"
    );
    assert!(st.repo_unreachable.is_some());
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
fn recover_without_a_backup_refuses_to_choose_among_several_kept_sessions_and_lists_them() {
    let r = rig();
    let (older, _) = backup(&r, "vm", 8, 4);
    let (newer, _) = backup(&r, "vm", 9, 4);
    assert_eq!(r.ds.recover("vm", None).unwrap().backup, newer);
    disk(&r, "vm").write(0, b"GUESTDATA!").unwrap();
    disk(&r, "vm").flush().unwrap();
    r.ds.release("vm", false).unwrap();
    // Recovered last, so the old choice would resume it and hide GUESTDATA.
    r.ds.recover("vm", Some(&older)).unwrap();
    r.ds.release("vm", false).unwrap();
    let e = r.ds.recover("vm", None).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "one line: {msg}");
    for want in [
        format!("backup {newer} (changed 64.0 KiB, last recovered 20"),
        format!("backup {older} (changed 0 B, last recovered 20"),
        "--backup ID".into(),
        "release vm --discard --backup ID".into(),
    ] {
        assert!(msg.contains(&want), "{want:?} not in: {msg}");
    }
    assert!(r.ds.session("vm").is_none(), "a session started anyway");
    let info = r.ds.recover("vm", Some(&newer)).unwrap();
    assert!(info.resumed);
    assert_eq!(disk(&r, "vm").read(0, 10).unwrap(), b"GUESTDATA!");
}

#[test]
fn recover_without_a_backup_resumes_the_one_kept_session_beside_one_whose_backup_is_gone() {
    let r = rig();
    let (gone, _) = backup(&r, "vm", 10, 4);
    let (kept, _) = backup(&r, "vm", 11, 4);
    r.ds.recover("vm", Some(&kept)).unwrap();
    disk(&r, "vm").write(0, b"kept").unwrap();
    r.ds.release("vm", false).unwrap();
    r.ds.recover("vm", Some(&gone)).unwrap();
    r.ds.release("vm", false).unwrap();
    std::fs::remove_file(r.dir.path().join(format!("repo/backups/vm/{gone}.json"))).unwrap();
    let info = r.ds.recover("vm", None).unwrap();
    assert_eq!((info.backup.as_str(), info.resumed), (kept.as_str(), true));
    assert_eq!(info.skipped, vec![gone]);
    assert_eq!(disk(&r, "vm").read(0, 4).unwrap(), b"kept");
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

/// `a` stages under `--staging`; `b` and `c` share their own directory.
const POINTS: Points = &[("a", None), ("b", Some("ssd")), ("c", Some("ssd"))];

fn at(point: &str) -> PlaceRequest {
    PlaceRequest {
        export_point: Some(point.into()),
        ..Default::default()
    }
}

fn ssd(r: &Rig) -> PathBuf {
    std::fs::canonicalize(r.dir.path().join("ssd")).unwrap()
}

fn main_staging(r: &Rig) -> PathBuf {
    r.ds.staging_root().to_path_buf()
}

mod admission;
mod elsewhere;
mod host_placement;
mod kept_pin;
mod live_backup;
mod point_staging;
mod recover_faults;
mod relocation;
mod upload;

#[test]
fn a_session_resumed_after_a_restart_records_no_boot_profile_of_its_running_guest() {
    let r = rig();
    let (id, _) = backup(&r, "vm", 7, 4);
    r.ds.recover("vm", Some(&id)).unwrap();
    disk(&r, "vm").read(0, 4096).unwrap();
    // The boot's recording, as the window's end saves it.
    let s = r.ds.session("vm").unwrap();
    assert!(s.save_profile(&r.repo, "session").unwrap());
    drop(s);
    let r = restart(r, &[]);
    // The guest runs on: its reads now are no boot.
    disk(&r, "vm").read(2 * BS as u64, 4096).unwrap();
    r.ds.release("vm", false).unwrap();
    let doc = crate::prefetch::profile::load(&r.repo, "vm")
        .unwrap()
        .unwrap();
    let blocks: Vec<Vec<u64>> = (doc.recordings.iter())
        .map(|rec| rec.disks[0].accesses.iter().map(|a| a.0).collect())
        .collect();
    assert_eq!(blocks, [vec![0]], "a resumed session recorded a boot");
}

#[test]
fn a_throwaway_recoverys_reads_never_become_a_profile_unless_verify_boot_saves_them() {
    let r = rig();
    r.ds.set_throwaway();
    let (id, _) = backup(&r, "vm", 7, 4);
    r.ds.recover("vm", Some(&id)).unwrap();
    disk(&r, "vm").read(0, 4096).unwrap();
    // What the window's end and a release do: nothing for a throwaway.
    r.ds.session("vm").unwrap().save_profile_logged(&r.repo);
    r.ds.release("vm", false).unwrap();
    assert!(
        crate::prefetch::profile::load(&r.repo, "vm")
            .unwrap()
            .is_none(),
        "a throwaway recovery's reads were saved as the VM's profile"
    );
    // A verified boot saves its reads on purpose.
    r.ds.recover("vm", Some(&id)).unwrap();
    disk(&r, "vm").read(0, 4096).unwrap();
    let s = r.ds.session("vm").unwrap();
    assert!(s.save_profile(&r.repo, "verify-boot").unwrap());
    drop(s);
    r.ds.release("vm", false).unwrap();
    assert!(crate::prefetch::profile::load(&r.repo, "vm")
        .unwrap()
        .is_some());
}

/// `rig()` (the default export point) with staging on fault-injecting
/// storage.
fn rig_faulty() -> (Rig, crate::staging::io::fault::FaultyStorage) {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    let (created, _) = Repository::open_or_create(repo_path.to_str().unwrap()).unwrap();
    let knobs = Knobs::default();
    let repo =
        Repository::open_backend(Box::new(TestBackend::new(&repo_path, knobs.clone()))).unwrap();
    let repo_id = created.id().to_string();
    let faults =
        crate::staging::io::fault::FaultyStorage::new(crate::staging::io::OsStorage::shared());
    let staging = StagingDir::open_with(
        &dir.path().join("staging"),
        &repo_id,
        "test",
        Arc::new(faults.clone()),
    )
    .unwrap();
    let prefetch = PrefetchOptions {
        use_profile: false,
        default_profile: false,
        ..Default::default()
    };
    let ds = Datastore::new(
        repo.clone(),
        StagingSet::single(staging),
        &dir.path().join("mnt"),
        4,
        prefetch,
        PlacementConfig::default(),
    );
    let r = Rig {
        dir,
        repo,
        repo_id,
        knobs,
        ds,
    };
    (r, faults)
}

#[test]
fn placement_and_status_do_not_wait_for_a_relocation_starting_on_a_slow_disk() {
    use crate::staging::io::fault::{Op, Rule};
    let (r, faults) = rig_faulty();
    backup(&r, "vm1", 41, 4);
    r.ds.recover("vm1", None).unwrap();
    let s1 = r.ds.session("vm1").unwrap();
    let to = r.dir.path().join("primary");
    std::fs::create_dir(&to).unwrap();
    // Starting forgets the old relocation durably: a sync of the session
    // directory, here on a disk that takes a second.
    let slow = Duration::from_millis(1500);
    faults.inject(Rule::delay(Op::SyncDir, s1.dir.to_str().unwrap(), slow));
    let relocating = {
        let (ds, to) = (r.ds.clone(), to.clone());
        std::thread::spawn(move || ds.relocate("vm1", &to, None, false))
    };
    // The target is made before that sync.
    while !to.join("vm1").exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    r.ds.place("vm2", &PlaceRequest::default(), None, 0)
        .unwrap();
    let placing = t.elapsed();
    let t = Instant::now();
    r.ds.status(&s1);
    let status = t.elapsed();
    assert!(
        placing < Duration::from_millis(100) && status < Duration::from_millis(100),
        "placement took {placing:?}, status {status:?}, behind a relocation starting"
    );
    assert!(
        !relocating.is_finished(),
        "the relocation started too soon to tell"
    );
    relocating.join().unwrap().unwrap();
    assert!(r.ds.status(&s1).relocation.is_some());
}

#[test]
fn a_relocation_that_finishes_starting_after_the_shutdown_stopped_the_copiers_stops_itself() {
    use crate::staging::io::fault::{Op, Rule};
    let (r, faults) = rig_faulty();
    backup(&r, "vm1", 42, 4);
    r.ds.recover("vm1", None).unwrap();
    let s1 = r.ds.session("vm1").unwrap();
    let to = r.dir.path().join("primary");
    std::fs::create_dir(&to).unwrap();
    let slow = Duration::from_millis(500);
    faults.inject(Rule::delay(Op::SyncDir, s1.dir.to_str().unwrap(), slow));
    let relocating = {
        let (ds, to) = (r.ds.clone(), to.clone());
        // Slow enough that it would still be copying at the end.
        std::thread::spawn(move || ds.relocate("vm1", &to, Some(0.01), false))
    };
    while !to.join("vm1").exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    r.ds.stop_background();
    assert!(
        !relocating.is_finished(),
        "the relocation started too soon to tell"
    );
    relocating.join().unwrap().unwrap();
    let reloc = s1.relocation.lock().clone().expect("installed");
    assert!(
        !reloc.copier_running(),
        "a copier started after the shutdown stopped them still runs"
    );
}

#[test]
fn a_throwaway_release_waits_for_handles_the_kernel_closes_late_and_never_leaves_the_pin() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    r.ds.recover("vm", Some(&b1)).unwrap();
    let s = r.ds.session("vm").unwrap();
    // QEMU has exited, but the kernel's release of its handle is late.
    let h = s.open_handle(Holder::nbd(0, "127.0.0.1:51234")).unwrap();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        s.close_handle(h);
    });
    r.ds.release_when_closed("vm", true, Duration::from_secs(10))
        .unwrap();
    late.join().unwrap();
    assert!(r.ds.session("vm").is_none());
    assert!(crate::repo::pins::of_vm(&r.repo, "vm").unwrap().is_empty());
    // A handle that never closes is an error after the wait, not a
    // release passed over in silence.
    r.ds.recover("vm", Some(&b1)).unwrap();
    let s = r.ds.session("vm").unwrap();
    let h = s.open_handle(Holder::nbd(0, "127.0.0.1:51234")).unwrap();
    let t = Instant::now();
    let e =
        r.ds.release_when_closed("vm", true, Duration::from_millis(200));
    let e = e.unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
    // Who holds it is named (explore10 L4).
    assert!(
        e.to_string()
            .contains("still open (1 handle(s)): disk0 over NBD by 127.0.0.1:51234;"),
        "{e}"
    );
    assert!(t.elapsed() >= Duration::from_millis(200));
    s.close_handle(h);
    r.ds.release("vm", true).unwrap();
}
