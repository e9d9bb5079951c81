//! Tests of the staging directory and of opening its sessions.

use super::*;
use crate::prefetch::Scheduler;
use crate::repo::Repository;
use crate::volume::Volume;
use rand::{Rng, SeedableRng};
use std::time::Duration;

const BS: usize = 65536;

/// A backup of one 4-block disk and its session directory on the real
/// filesystem, opened as `recover` opens it.
struct Backed {
    dir: tempfile::TempDir,
    repo: Arc<Repository>,
    m: Manifest,
    data: Vec<u8>,
    sched: Arc<Scheduler>,
}

impl Backed {
    fn new() -> Backed {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) =
            Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
        let mut data = vec![0u8; 4 * BS];
        rand::rngs::StdRng::seed_from_u64(7).fill(&mut data[..]);
        let m = crate::testutil::backup_images(&repo, dir.path(), "vm", BS, &[&data]);
        Backed {
            dir,
            repo,
            m,
            data,
            sched: Scheduler::new("test-fetch", 2),
        }
    }

    fn session(&self) -> PathBuf {
        self.dir.path().join("st/sessions/vm").join(&self.m.id)
    }

    fn open(&self) -> Arc<Volume> {
        crate::testutil::open_volumes(
            &OsStorage,
            &self.session(),
            &self.repo,
            &self.m,
            &self.sched,
        )
        .remove(0)
    }
}

#[test]
fn a_session_dir_half_removed_by_an_interrupted_discard_never_serves_its_old_presence_bits() {
    // remove_dir_all deletes in readdir order: a crash can leave the
    // maps (and the mirror) without session.json, with or without the
    // data file.
    for guest_wrote in [false, true] {
        let b = Backed::new();
        let vol = b.open();
        if guest_wrote {
            vol.write(0, &vec![7u8; BS]).unwrap();
        } else {
            assert_eq!(vol.read(0, BS).unwrap(), b.data[..BS]);
            vol.quiesce(Duration::from_secs(30));
        }
        vol.flush().unwrap();
        vol.close();
        drop(vol);
        fs::remove_file(b.session().join("session.json")).unwrap();
        if !guest_wrote {
            fs::remove_file(b.session().join("disk0.data")).unwrap();
        }
        let vol = b.open();
        assert!(
            vol.read(0, BS).unwrap() == b.data[..BS],
            "a new session served block 0 from a discarded session's staging (guest wrote: {guest_wrote})"
        );
        let st = vol.status();
        assert_eq!(
            st.blocks_changed, 0,
            "a discarded session's changed bits carried over"
        );
        vol.close();
    }
}

#[test]
fn a_discard_commits_by_renaming_the_session_aside_and_the_next_open_finishes_it() {
    let b = Backed::new();
    let root = b.dir.path().join("st");
    let st = StagingDir::open(&root, "repo1", "/r").unwrap();
    b.open().close();
    assert_eq!(st.kept_sessions("vm").len(), 1);
    // A discard killed right after its commit (the rename aside).
    let aside = b
        .session()
        .with_file_name(format!("{DISCARDING}{}-0123", b.m.id));
    fs::rename(b.session(), &aside).unwrap();
    assert!(
        st.kept_sessions("vm").is_empty(),
        "a session being discarded was taken for a kept session"
    );
    assert!(inventory::list(&root).unwrap().is_empty());
    drop(st);
    let st = StagingDir::open(&root, "repo1", "/r").unwrap();
    assert!(
        !aside.exists(),
        "the next open did not finish the interrupted discard"
    );
    b.open().close();
    st.discard("vm", &b.m.id).unwrap();
    assert_eq!(
        fs::read_dir(root.join("sessions/vm")).unwrap().count(),
        0,
        "a discard left something behind"
    );
}

/// Every file in `dir` and its bytes.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_damaged_session_json_is_an_error_naming_it_and_removes_nothing() {
    let b = Backed::new();
    let root = b.dir.path().join("st");
    let st = StagingDir::open(&root, "repo1", "/r").unwrap();
    let vol = b.open();
    vol.write(0, &vec![7u8; BS]).unwrap();
    vol.flush().unwrap();
    vol.close();
    drop(vol);
    // A session after a live backup: generation 1's files, which a
    // new session would remove as leftovers.
    let dir = b.session();
    Since {
        generation: 1,
        base: b.m.id.clone(),
    }
    .store(&OsStorage, &dir)
    .unwrap();
    fs::copy(dir.join("manifest.json"), base_copy_path(&dir, 1)).unwrap();
    PersistentBitmap::create(
        &OsStorage,
        &dirty_path(&dir, 0, 1),
        MapKind::Dirty,
        BS as u32,
        4,
    )
    .unwrap();
    let session_json = dir.join("session.json");
    fs::write(&session_json, b"{\"vm\": \"vm\", \"back").unwrap();
    let before = contents(&dir);

    let e = open_session(&OsStorage, &dir, &b.m)
        .err()
        .expect("a damaged session.json was taken for a new session");
    assert!(
        e.to_string().contains(&session_json.display().to_string()),
        "{e}"
    );
    assert!(e.to_string().contains("release --discard vm"), "{e}");
    assert!(
        contents(&dir) == before,
        "opening a damaged session changed its files"
    );
    assert!(st.kept_sessions("vm").is_empty());
    assert_eq!(st.damaged_sessions("vm"), vec![b.m.id.clone()]);
    st.discard("vm", &b.m.id).unwrap();
    assert!(!dir.exists());
}

#[test]
fn a_resumed_session_with_a_missing_changed_or_present_map_is_refused_naming_it() {
    for file in ["disk0.changed", "disk0.present", "disk0.data"] {
        let b = Backed::new();
        let vol = b.open();
        vol.write(0, &vec![7u8; BS]).unwrap();
        vol.flush().unwrap();
        vol.close();
        drop(vol);
        let p = b.session().join(file);
        if file.ends_with(".data") {
            // Emptied: as good as gone.
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(0)
                .unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
        let e = open_session(&OsStorage, &b.session(), &b.m)
            .err()
            .unwrap_or_else(|| {
                panic!("a resumed session with {file} missing or emptied was opened")
            });
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        if !file.ends_with(".data") {
            assert!(!p.exists(), "{file} was recreated");
        }
    }
}

#[test]
fn a_locked_staging_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = StagingDir::open(&d.path().join("st"), "repo1", "/r").unwrap();
    let e = StagingDir::open(&d.path().join("st"), "repo1", "/r")
        .err()
        .unwrap();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
    assert!(e.to_string().contains("in use"), "{e}");
    drop(s);
    StagingDir::open(&d.path().join("st"), "repo1", "/r").unwrap();
}

#[test]
fn staging_of_another_repository_is_refused() {
    let d = tempfile::tempdir().unwrap();
    drop(StagingDir::open(&d.path().join("st"), "repo1", "/r1").unwrap());
    let e = StagingDir::open(&d.path().join("st"), "repo2", "/r2")
        .err()
        .unwrap();
    assert!(e.to_string().contains("another repository"), "{e}");
}

#[test]
fn a_staging_directory_keeps_one_id_and_one_set_up_before_ids_gets_one_at_its_next_open() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("st");
    let id = StagingDir::open(&root, "r1", "/r")
        .unwrap()
        .id()
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    let other = StagingDir::open(&d.path().join("other"), "r1", "/r").unwrap();
    assert_ne!(other.id(), id);
    assert_eq!(StagingDir::open(&root, "r1", "/r").unwrap().id(), id);
    assert_eq!(id_at(&root).unwrap().as_deref(), Some(id.as_str()));
    // As a daemon before ids wrote it.
    let old = r#"{"format": "recoverfs-staging-1", "repo_id": "r1", "repo": "/r"}"#;
    std::fs::write(root.join(STAGING_MARKER), old).unwrap();
    assert_eq!(id_at(&root).unwrap(), None);
    let new = StagingDir::open(&root, "r1", "/r")
        .unwrap()
        .id()
        .to_string();
    assert_eq!(id_at(&root).unwrap(), Some(new.clone()));
    assert_eq!(StagingDir::open(&root, "r1", "/r").unwrap().id(), new);
}
