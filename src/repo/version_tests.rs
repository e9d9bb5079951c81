//! Repository versions: what each one stores, and what is refused.

use super::*;

fn set_version(dir: &Path, version: u32) {
    let p = dir.join(INFO_KEY);
    let mut info: RepoInfo = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    info.version = version;
    std::fs::write(&p, serde_json::to_vec(&info).unwrap()).unwrap();
}

#[test]
fn a_new_repository_stores_an_incompressible_chunk_raw_and_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, created) =
        Repository::open_or_create_keyed(dir.path().to_str().unwrap(), None).unwrap();
    assert!(created);
    assert_eq!(repo.info.version, REPO_VERSION);
    let data = crate::testutil::incompressible(1 << 20, 9);
    let d = Digest::of(&data);
    let stored = repo.put_chunk(&d, &data).unwrap();
    assert_eq!(stored, data.len() as u64 + chunk::RAW_TRAILER.len() as u64);
    assert_eq!(repo.read_chunk(&d, data.len(), &"test").unwrap().0, data);
}

#[test]
fn a_version_1_repository_keeps_zstd_frames_that_older_binaries_read() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().to_str().unwrap();
    Repository::open_or_create_keyed(spec, None).unwrap();
    set_version(dir.path(), 1);
    let repo = Repository::open_keyed(spec, None).unwrap();
    let data = crate::testutil::incompressible(1 << 20, 9);
    let d = Digest::of(&data);
    repo.put_chunk(&d, &data).unwrap();
    let obj = std::fs::read(dir.path().join(d.key())).unwrap();
    assert_eq!(&obj[..4], &0xFD2F_B528u32.to_le_bytes(), "a zstd frame");
    assert_eq!(repo.read_chunk(&d, data.len(), &"test").unwrap().0, data);
}

#[test]
fn a_repository_of_a_newer_version_is_refused_with_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().to_str().unwrap();
    Repository::open_or_create_keyed(spec, None).unwrap();
    set_version(dir.path(), REPO_VERSION + 1);
    let e = Repository::open_keyed(spec, None).err().expect("refused");
    assert!(
        e.to_string().contains("unsupported repository version 3"),
        "{e}"
    );
}
