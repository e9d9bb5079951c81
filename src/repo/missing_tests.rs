use super::*;
use crate::error::ErrorKind;

/// A repository with one stored chunk; (dir, root, repo, digest).
fn one_chunk() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<Repository>,
    Digest,
) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("r");
    let (repo, _) = Repository::open_or_create(root.to_str().unwrap()).unwrap();
    let data = vec![7u8; 4096];
    let digest = repo.chunk_id(&data);
    repo.put_chunk(&digest, &data).unwrap();
    (d, root, repo, digest)
}

#[test]
fn a_chunk_read_while_the_repository_is_out_of_place_is_unreachable_not_missing() {
    let (d, root, repo, digest) = one_chunk();
    // A share not mounted: an empty directory where the repository was.
    std::fs::rename(&root, d.path().join("away")).unwrap();
    std::fs::create_dir(&root).unwrap();
    let e = repo
        .read_chunk(&digest, 4096, &"disk0 block 0")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("does not answer as itself"), "{e}");
    // Back in place: it reads again.
    std::fs::remove_dir(&root).unwrap();
    std::fs::rename(d.path().join("away"), &root).unwrap();
    assert_eq!(
        repo.read_chunk(&digest, 4096, &"x").unwrap().0,
        vec![7u8; 4096]
    );
}

#[test]
fn a_chunk_absent_from_a_repository_in_place_is_missing() {
    let (_d, root, repo, digest) = one_chunk();
    let key = root.join(digest.key());
    std::fs::remove_file(&key).unwrap();
    let e = repo
        .read_chunk(&digest, 4096, &"disk0 block 0")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains("is missing from the repository"),
        "{e}"
    );
}
