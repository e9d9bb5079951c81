use super::*;
use std::os::unix::fs::FileExt;

fn image(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn req(vm: &str, images: Vec<PathBuf>) -> BackupRequest {
    BackupRequest {
        vm: vm.into(),
        config: None,
        chunk_size: 65536,
        images,
        progress: false,
    }
}

#[test]
fn an_empty_image_is_refused_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
    let empty = image(d.path(), "empty.raw", b"");
    let e = image_size(&empty).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("empty.raw"), "{e}");
    let full = image(d.path(), "a.raw", &[1; 100]);
    let e = run_backup(&repo, req("vm1", vec![full, empty]))
        .err()
        .expect("a 0-byte disk was backed up");
    assert!(e.to_string().contains("0 bytes"), "{e}");
    assert!(repo.vms().unwrap().is_empty());
}

#[test]
fn a_config_listing_another_number_of_disks_than_images_is_refused_at_backup() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
    let img = image(d.path(), "a.raw", &[1; 100]);
    for bad in [
        serde_json::json!([]),
        serde_json::json!([{"name": "disk0"}, {"name": "disk1"}]),
        serde_json::json!("disk0"),
    ] {
        let mut r = req("vm1", vec![img.clone()]);
        r.config = Some(serde_json::json!({ "disks": bad }));
        let e = run_backup(&repo, r)
            .err()
            .unwrap_or_else(|| panic!("disks {bad} accepted"));
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("\"disks\"") || e.to_string().contains("disk(s)"),
            "{e}"
        );
    }
    assert!(repo.vms().unwrap().is_empty());
    let mut r = req("vm1", vec![img]);
    r.config = Some(serde_json::json!({ "disks": [{"name": "disk0"}] }));
    run_backup(&repo, r).unwrap();
}

#[test]
fn a_config_asking_for_memory_a_boot_would_refuse_is_refused_at_backup() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
    let img = image(d.path(), "a.raw", &[1; 100]);
    for bad in [
        serde_json::json!(0),
        serde_json::json!(15),
        serde_json::json!(-1),
        serde_json::json!("512"),
        serde_json::json!(1.5),
        serde_json::json!(crate::repo::limits::MAX_MEMORY_MIB + 1),
    ] {
        let mut r = req("vm1", vec![img.clone()]);
        r.config = Some(serde_json::json!({ "memory_mib": bad }));
        let e = run_backup(&repo, r)
            .err()
            .unwrap_or_else(|| panic!("memory_mib {bad} accepted"));
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("memory_mib"), "{e}");
    }
    assert!(repo.vms().unwrap().is_empty());
    for good in [
        serde_json::json!(16),
        serde_json::json!(512),
        serde_json::Value::Null,
    ] {
        let mut r = req("vm1", vec![img.clone()]);
        r.config = Some(serde_json::json!({ "memory_mib": good }));
        run_backup(&repo, r).unwrap();
    }
    let mut r = req("vm1", vec![img.clone()]);
    r.config = Some(serde_json::json!({}));
    run_backup(&repo, r).unwrap();
}

#[test]
fn second_backup_of_changed_image_stores_only_changed_chunks() {
    let d = tempfile::tempdir().unwrap();
    let (repo, created) =
        Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
    assert!(created);
    let mut data: Vec<u8> = (0..10 * 65536 + 123).map(|i| (i % 253) as u8).collect();
    data[65536..2 * 65536].fill(0);
    let img = image(d.path(), "a.raw", &data);
    let r1 = run_backup(&repo, req("vm1", vec![img.clone()])).unwrap();
    assert_eq!(r1.disks[0].zero_chunks, 1);
    assert_eq!(r1.manifest.disks[0].chunks.get(1), None);
    data[5 * 65536 + 7] ^= 0xff;
    std::fs::write(&img, &data).unwrap();
    let r2 = run_backup(&repo, req("vm1", vec![img])).unwrap();
    assert_eq!(r2.disks[0].new_chunks, 1);
    assert!(r2.manifest.new_bytes() > 0 && r2.manifest.new_bytes() < r1.manifest.new_bytes());
    assert_ne!(
        r1.manifest.id, r2.manifest.id,
        "same-second backups get distinct ids"
    );
    assert_eq!(repo.backup_ids("vm1").unwrap().len(), 2);
    // Every chunk reads back verified and in order.
    let m = repo.resolve("vm1", None).unwrap();
    assert_eq!(crate::testutil::disk_bytes(&repo, &m.disks[0]), data);
}

#[test]
fn a_sparse_image_is_read_only_where_it_has_data_and_restores_identically() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    let p = d.path().join("sparse.raw");
    let f = std::fs::File::create(&p).unwrap();
    let size = (256u64 << 20) + 12345; // a short last chunk
    f.set_len(size).unwrap();
    let cs = 65536u64;
    // Data across a chunk boundary, a written run of zeros (data to
    // the filesystem, a zero chunk to the backup), the short last chunk.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, 10 * cs + 1000).unwrap();
    f.write_all_at(&vec![0u8; cs as usize], 100 * cs).unwrap();
    f.write_all_at(b"tail", size - 4).unwrap();
    f.sync_all().unwrap();
    let ext = crate::repo::sparse::data_extents(&f, size).unwrap();
    let overlapping: u64 = (crate::repo::sparse::chunks_with_data(&ext, cs as u32).iter())
        .map(|r| r.end - r.start)
        .sum();
    let r = run_backup(&repo, req("sparse", vec![p.clone()])).unwrap();
    let rep = &r.disks[0];
    let n = size.div_ceil(cs);
    assert_eq!(rep.chunks, n);
    // Chunks 10 and 11, 100, the last: 4 chunks, the last 12345 bytes.
    assert!((4..=6).contains(&overlapping), "{ext:?}");
    assert!(
        rep.read_bytes <= overlapping * cs,
        "{} read",
        rep.read_bytes
    );
    assert!(
        rep.read_bytes < 8 * cs,
        "holes were read: {} bytes",
        rep.read_bytes
    );
    let m = &r.manifest.disks[0].chunks;
    let have: Vec<u64> = m.iter_present().map(|(i, _)| i).collect();
    assert_eq!(have, vec![10, 11, n - 1]);
    assert_eq!(rep.zero_chunks, n - 3);
    // Restored chunk by chunk, it is the image, byte for byte.
    let disk = &repo.resolve("sparse", None).unwrap().disks[0];
    assert_eq!(&disk.chunks, m);
    let img = std::fs::read(&p).unwrap();
    for (i, c) in disk.chunks.iter().enumerate() {
        let len = disk.chunk_len(i as u64);
        let want = &img[i * cs as usize..][..len];
        match c {
            Some(dg) => assert_eq!(repo.read_chunk(&dg, len, &"t").unwrap().0, want),
            None => assert!(want.iter().all(|&b| b == 0), "chunk {i}"),
        }
    }
}

/// A repository behind test knobs, with one chunk stored; its digest.
fn repo_with_a_chunk(
    d: &tempfile::TempDir,
) -> (Arc<Repository>, super::super::testing::Knobs, Digest) {
    let path = d.path().join("r");
    Repository::open_or_create(path.to_str().unwrap()).unwrap();
    let knobs = super::super::testing::Knobs::default();
    let backend = super::super::testing::TestBackend::new(&path, knobs.clone());
    let repo = Repository::open_backend(Box::new(backend)).unwrap();
    let data = vec![7u8; 65536];
    let st = store_chunk(&repo, &data).unwrap();
    let Outcome::Stored { digest, .. } = st else {
        panic!("not zeros")
    };
    (repo, knobs, digest)
}

#[test]
fn a_chunk_that_vanishes_after_a_backup_found_it_is_an_error_not_size_zero() {
    let d = tempfile::tempdir().unwrap();
    let (repo, knobs, digest) = repo_with_a_chunk(&d);
    // Found (exists), then removed before its size is asked: by a
    // collector that did not see this writer's lock.
    let (key, again, dir) = (digest.key(), knobs.clone(), d.path().join("r"));
    knobs.before_first(&key.clone(), move || {
        again.before_first(&key.clone(), move || {
            use super::super::backend::Backend;
            super::super::backend::LocalDir::new(&dir)
                .delete(&key)
                .unwrap()
        })
    });
    let e = store_chunk(&repo, &[7u8; 65536]).err().unwrap();
    assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&digest.to_hex()), "{e}");
}

#[test]
fn a_base_chunk_missing_from_the_repository_fails_stored_bytes_only_if_the_new_backup_keeps_it() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _knobs, digest) = repo_with_a_chunk(&d);
    let lost = Digest::of(b"never stored");
    let base = DiskManifest {
        name: "disk0".into(),
        size: 2 * 65536,
        chunk_size: 65536,
        chunks: [Some(digest), Some(lost)].into_iter().collect(),
        stored_bytes: 100,
        new_bytes: 0,
    };
    // The lost chunk overwritten (zeros now): the new backup does not
    // need it, so it does not fail.
    let dropped: ChunkIndex = [Some(digest), None].into_iter().collect();
    stored_bytes_after(&repo, &base, &dropped, &Default::default()).unwrap();
    // A new chunk the repository does not have: an error.
    let added: ChunkIndex = [Some(digest), Some(Digest::of(b"also never stored"))]
        .into_iter()
        .collect();
    let e = stored_bytes_after(&repo, &base, &added, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
}

/// explore4 M4: an incremental keeps its base's chunks unread; one
/// that `verify --repair` set aside (damaged) must not be named again
/// until a backup has stored it again.
#[test]
fn a_kept_chunk_verify_repair_set_aside_fails_the_backup_until_it_is_stored_again() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _knobs, digest) = repo_with_a_chunk(&d);
    let base = DiskManifest {
        name: "disk0".into(),
        size: 65536,
        chunk_size: 65536,
        chunks: [Some(digest)].into_iter().collect(),
        stored_bytes: 100,
        new_bytes: 0,
    };
    let kept = base.chunks.clone();
    stored_bytes_after(&repo, &base, &kept, &Default::default()).unwrap();
    let path = d.path().join("r").join(digest.key());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[2] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let done =
        super::super::verify::repair(&repo, &[(digest, 65536)], std::time::Duration::ZERO).unwrap();
    assert_eq!(done.set_aside, 1, "{done:?}");
    let e = stored_bytes_after(&repo, &base, &kept, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("take a full backup"), "{e}");
    // A full backup stores it again: then it may be kept.
    assert!(repo.put_chunk(&digest, &[7u8; 65536]).unwrap() > 0);
    stored_bytes_after(&repo, &base, &kept, &Default::default()).unwrap();
}

#[test]
fn a_backup_needing_more_blocks_in_all_than_the_bound_is_refused_before_reading() {
    use crate::repo::limits::MAX_BLOCKS;
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    // Two sparse images one chunk over half the bound each, with data.
    let half = (MAX_BLOCKS / 2 + 1) * 65536;
    let images: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = image(d.path(), &format!("disk{i}.raw"), b"data");
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(half)
                .unwrap();
            p
        })
        .collect();
    let e = run_backup(&repo, req("vm", images)).err().unwrap();
    assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("blocks in all"), "{e}");
    let stored = walkdir(&d.path().join("r").join("chunks"));
    assert_eq!(stored, 0, "chunks were stored before the refusal");
}

fn walkdir(p: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { walkdir(&p) } else { 1 })
        .sum()
}

/// A 4-chunk image last modified an hour ago (so a write now moves
/// its mtime whatever the clock's grain), with a handle to change it.
fn old_image(dir: &Path) -> (PathBuf, File, u64) {
    let data: Vec<u8> = (0..4 * 65536).map(|i| (i % 251) as u8 + 1).collect();
    let p = image(dir, "disk0.raw", &data);
    let f = File::options().write(true).open(&p).unwrap();
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    f.set_modified(hour_ago).unwrap();
    (p, f, data.len() as u64)
}

/// Runs `change` once, while the image is being read.
fn backup_changing(
    repo: &Arc<Repository>,
    p: &Path,
    size: u64,
    change: impl Fn(),
) -> Result<(DiskManifest, DiskReport)> {
    let once = std::sync::Once::new();
    backup_disk(repo, "disk0", p, size, 65536, &|_| once.call_once(&change))
}

#[test]
fn an_image_written_while_it_is_read_fails_naming_it_and_what_changed() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    let (p, f, size) = old_image(d.path());
    let e = backup_changing(&repo, &p, size, || f.write_all_at(b"new", 65536).unwrap())
        .expect_err("a torn image was backed up");
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("image {} changed while it was read", p.display())),
        "{msg}"
    );
    assert!(
        msg.contains("modified at") && msg.contains("backup-vms"),
        "{msg}"
    );
    // Left alone, the same image backs up.
    backup_disk(&repo, "disk0", &p, size, 65536, &|_| {}).unwrap();
}

#[test]
fn an_image_grown_or_with_its_mtime_set_back_while_read_is_caught_by_size_and_ctime() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    let (p, f, size) = old_image(d.path());
    let grow = || f.set_len(size + 65536).unwrap();
    let e = backup_changing(&repo, &p, size, grow).expect_err("grown");
    assert!(
        e.to_string().contains("size 262144 then 327680 bytes"),
        "{e}"
    );
    // A writer that puts the old mtime back still moves ctime; the
    // pause lets the coarse file clock tick past the stamp taken first.
    f.set_len(size).unwrap();
    let mtime = f.metadata().unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let hidden = || {
        f.write_all_at(b"new", 0).unwrap();
        f.set_modified(mtime).unwrap();
    };
    let e = backup_changing(&repo, &p, size, hidden).expect_err("mtime set back");
    assert!(e.to_string().contains("inode changed at"), "{e}");
}

#[test]
fn non_regular_image_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    let e = run_backup(&repo, req("vm", vec![d.path().to_path_buf()]))
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("neither a regular file nor a block device"),
        "{e}"
    );
}

#[test]
fn a_store_that_stops_answering_ends_a_backup_at_once_not_after_every_chunk() {
    let d = tempfile::tempdir().unwrap();
    let (repo, knobs, _) = repo_with_a_chunk(&d);
    knobs.unreachable("chunks/");
    let reads = std::sync::atomic::AtomicU64::new(0);
    let read = |i: u64, buf: &mut [u8]| {
        reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        buf.fill((i % 250 + 1) as u8);
        buf[..8].copy_from_slice(&i.to_le_bytes());
        Ok(())
    };
    let n = 2_000u64;
    let e = store_chunks(&repo, n * 4096, 4096, 0..n, &read, &|_| {})
        .expect_err("the store is unreachable");
    assert_eq!(e.kind(), crate::error::ErrorKind::Io, "{e}");
    // Those already read or queued when the first put failed, no more.
    let read = reads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        read < 64,
        "{read} of {n} chunks read after the store failed"
    );
}

#[test]
fn a_read_error_ends_a_backup_before_the_other_chunks_are_stored() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _knobs, _) = repo_with_a_chunk(&d);
    let reads = std::sync::atomic::AtomicU64::new(0);
    let read = |i: u64, buf: &mut [u8]| {
        reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if i == 3 {
            return Err(crate::error::Error::io(
                "read block 3",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        buf.fill(1);
        buf[..8].copy_from_slice(&i.to_le_bytes());
        Ok(())
    };
    let n = 2_000u64;
    let e = store_chunks_with(&repo, n * 4096, 4096, 0..n, 2, &read, &|_| {})
        .expect_err("a block could not be read");
    assert!(e.to_string().contains("block 3"), "{e}");
    let read = reads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(read < 64, "{read} of {n} chunks read after the read error");
}

/// explore9 M4: a backup against a store that stops answering at its
/// first chunk ends within about one request deadline: its lock is not
/// removed for another one (left behind to go stale, logged).
#[test]
fn a_backup_to_a_store_that_hangs_ends_within_about_one_deadline() {
    let d = tempfile::tempdir().unwrap();
    let deadline = std::time::Duration::from_secs(2);
    let (repo, _) = crate::repo::locks::tests::Hanging::repo_from(
        &d.path().join("repo"),
        &["chunks/", "locks/"],
        deadline,
        Some("chunks/"),
    );
    let img = image(d.path(), "a.raw", &[7; 300_000]);
    let t = std::time::Instant::now();
    let e = run_backup(&repo, req("vm1", vec![img]))
        .err()
        .expect("a backup to a store that hangs succeeded");
    let took = t.elapsed();
    assert!(e.to_string().contains("no answer"), "{e}");
    assert!(
        took < deadline + deadline / 2,
        "{took:?} for a store that hangs {deadline:?} a request"
    );
}
