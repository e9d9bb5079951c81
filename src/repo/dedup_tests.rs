//! Dedup against a stored chunk: what is trusted without reading it.

use super::*;

#[test]
fn a_stored_chunk_of_impossible_size_is_written_again_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create_keyed(dir.path().to_str().unwrap(), None).unwrap();
    let data = crate::testutil::incompressible(256 << 10, 3);
    let d = Digest::of(&data);
    assert!(repo.put_chunk(&d, &data).unwrap() > 0);
    assert_eq!(
        repo.put_chunk(&d, &data).unwrap(),
        0,
        "an intact chunk is reused"
    );
    // Emptied (a disk that lost it, a tool that truncated it): every later
    // backup naming it would be unreadable there.
    std::fs::File::create(dir.path().join(d.key())).unwrap();
    assert!(
        repo.put_chunk(&d, &data).unwrap() > 0,
        "an empty chunk object was taken as the chunk"
    );
    assert_eq!(repo.read_chunk(&d, data.len(), &"test").unwrap().0, data);
    // Longer than any encoding of its bytes.
    let big = vec![7u8; limits::max_chunk_object(data.len()) as usize + 1];
    std::fs::write(dir.path().join(d.key()), big).unwrap();
    assert!(repo.put_chunk(&d, &data).unwrap() > 0);
    assert_eq!(repo.read_chunk(&d, data.len(), &"test").unwrap().0, data);
}
