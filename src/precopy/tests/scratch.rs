//! The temporary directory of QEMU's NBD socket: it names its owner, and
//! a job removes the ones killed jobs left (not a live one's).

use super::*;
use crate::boot::remove_stale_scratch;

#[test]
fn a_job_names_its_scratch_directorys_owner_and_removes_those_killed_jobs_left() {
    let (dead, live) = crate::boot::tests::dead_and_live_scratch("precopy");
    let v = vm(Some(&content()));
    let (_r, repo) = repo();
    let state = tempfile::tempdir().unwrap();
    let dir = StateDir::open(state.path(), repo.id(), "pc").unwrap();
    let job = round::Job::start(repo.clone(), &opts(&v, state.path(), End::Never), dir).unwrap();
    assert!(!dead.exists(), "{} stays", dead.display());
    assert!(live.join("nbd.sock").exists());
    std::fs::remove_dir_all(&live).unwrap();
    // Its own: named, so a sweep keeps it while the job lives.
    let mine = job.scratch().to_path_buf();
    let name = mine.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("recoverfs-precopy-"), "{name}");
    let owner: crate::repo::locks::Owner =
        serde_json::from_slice(&std::fs::read(mine.join("owner.json")).unwrap()).unwrap();
    assert_eq!(owner, crate::repo::locks::this_process());
    assert!(mine.join("nbd.sock").exists());
    remove_stale_scratch(&std::env::temp_dir());
    assert!(mine.join("nbd.sock").exists());
    drop(job);
    assert!(!mine.exists());
}
