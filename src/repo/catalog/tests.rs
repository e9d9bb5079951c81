use super::*;
use crate::repo::Repository;

fn repo() -> (tempfile::TempDir, std::sync::Arc<Repository>) {
    let d = tempfile::tempdir().unwrap();
    let (r, _) = Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
    (d, r)
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn catalog(vm: &str, entries: Vec<Entry>) -> Catalog {
    Catalog {
        format: CATALOG_FORMAT,
        vm: vm.into(),
        id: String::new(),
        created: String::new(),
        created_unix: 0,
        source: serde_json::json!({"paths": ["/srv"]}),
        entries,
        file_bytes: 0,
        stored_bytes: 0,
        new_bytes: 0,
    }
}

fn file(path: &str, chunks: Vec<ChunkRef>) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::File,
        mode: 0o640,
        uid: 1,
        gid: 2,
        mtime: 1_700_000_000,
        mtime_nsec: 5,
        size: chunks.iter().map(|c| c.run_bytes().unwrap()).sum(),
        target: None,
        chunks,
        inode: None,
    }
}

#[test]
fn an_edit_in_the_middle_of_a_file_stores_only_the_chunks_around_it() {
    let (_d, r) = repo();
    let mut data = noise(16 << 20, 1);
    let mut a = ChunkSink::default();
    let first = a.store(&r, &data[..]).unwrap();
    assert_eq!(a.file_bytes, data.len() as u64);
    assert!(first.len() >= 8, "{} chunks", first.len());
    // Overwrite 4 KiB in the middle and insert 100 bytes further on.
    data[3 << 20..(3 << 20) + 4096].fill(7);
    data.splice(11 << 20..11 << 20, [9u8; 100]);
    let mut b = ChunkSink::default();
    let second = b.store(&r, &data[..]).unwrap();
    assert!(
        b.new_bytes * 20 < data.len() as u64,
        "an edit and an insert stored {} new bytes of {}",
        b.new_bytes,
        data.len()
    );
    // The chunks read back to the new content.
    let mut back = vec![];
    for c in &second {
        back.extend(r.read_chunk(&c.digest, c.len as usize, &"t").unwrap().0);
    }
    assert_eq!(back, data);
}

#[test]
fn a_published_catalog_reads_back_and_a_tampered_one_is_refused() {
    let (_d, r) = repo();
    let mut sink = ChunkSink::default();
    let chunks = sink.store(&r, &noise(300_000, 2)[..]).unwrap();
    let mut c = catalog("vm1", vec![file("/srv/a", chunks)]);
    c.entries.push(Entry {
        path: "/srv".into(),
        kind: EntryKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: 0,
        target: None,
        chunks: vec![],
        inode: None,
    });
    let one = r.publish_catalog(c.clone()).unwrap();
    let two = r.publish_catalog(c).unwrap();
    assert_ne!(one.id, two.id, "same-second file backups get distinct ids");
    assert!(
        is_catalog_id(&one.id) && is_catalog_id(&two.id),
        "{} {}",
        one.id,
        two.id
    );
    assert!(!is_catalog_id("20261122-101010"));
    assert_eq!(
        r.catalog_ids("vm1").unwrap(),
        vec![one.id.clone(), two.id.clone()]
    );
    assert_eq!(r.catalog_vms().unwrap(), vec!["vm1".to_string()]);
    assert_eq!(r.catalog("vm1", &one.id).unwrap(), one);
    assert_eq!(one.under("/srv").count(), 2);
    assert_eq!(one.under("/sr").count(), 0);
    // Disk backups are untouched by file backups.
    assert!(r.backup_ids("vm1").unwrap().is_empty());
    let key = r.location() + &format!("/files/vm1/{}.json", one.id);
    let s = std::fs::read_to_string(&key)
        .unwrap()
        .replace("\"mode\":416", "\"mode\":511");
    std::fs::write(&key, s).unwrap();
    let e = r.catalog("vm1", &one.id).unwrap_err();
    assert!(e.to_string().contains("fails its checksum"), "{e}");
}

#[test]
fn paths_that_could_leave_a_restore_directory_are_refused() {
    for bad in [
        "srv/a",
        "/srv/../etc",
        "/srv/./a",
        "/srv//a",
        "/srv/a/",
        "/a\0b",
        "",
    ] {
        assert!(check_path(bad).is_err(), "{bad:?} accepted");
    }
    for good in ["/", "/srv", "/srv/a b/..c"] {
        check_path(good).unwrap();
    }
    let mut e = file("/x", vec![]);
    e.size = 5;
    assert!(e.check().is_err(), "a size its chunks do not cover");
    let mut e = file("/x", vec![]);
    e.mode = 0o170000;
    assert!(e.check().is_err(), "file type bits in mode");
}

#[test]
fn gc_keeps_every_chunk_a_file_backup_references_and_removes_the_rest() {
    use crate::repo::gc::{collect, GcOptions, MANIFESTS};
    let (_d, r) = repo();
    let mut sink = ChunkSink::default();
    let data = noise(1 << 20, 3);
    let chunks = sink.store(&r, &data[..]).unwrap();
    r.publish_catalog(catalog("vm1", vec![file("/srv/a", chunks.clone())]))
        .unwrap();
    // An orphan, as a failed agent-backup leaves.
    let orphan = noise(100_000, 4);
    let mut lost = ChunkSink::default();
    let orphan_chunks = lost.store(&r, &orphan[..]).unwrap();
    let opts = GcOptions {
        dry_run: false,
        wait: std::time::Duration::from_secs(30),
    };
    let rep = collect(&r, &[MANIFESTS, REFERRER], opts).unwrap();
    assert_eq!(rep.removed_chunks, orphan_chunks.len() as u64, "{rep:?}");
    assert!(!r.has_chunk(&orphan_chunks[0].digest).unwrap());
    let mut back = vec![];
    for c in &chunks {
        back.extend(r.read_chunk(&c.digest, c.len as usize, &"t").unwrap().0);
    }
    assert_eq!(back, data);
}

#[test]
fn a_catalog_over_the_entry_or_size_limit_is_refused_before_publishing() {
    let (_d, r) = repo();
    let link = |i: usize| Entry {
        path: format!("/srv/l{i}"),
        kind: EntryKind::Symlink,
        mode: 0o777,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: 0,
        target: Some("t".repeat(1000)),
        chunks: vec![],
        inode: None,
    };
    let at = std::time::SystemTime::now();
    let roomy = CatalogLimits {
        entries: 3,
        bytes: 1 << 20,
    };
    // One entry too many.
    let e = r
        .publish_catalog_within(catalog("vm1", (0..4).map(link).collect()), at, roomy)
        .unwrap_err();
    assert!(e.to_string().contains("more than 3 entries"), "{e}");
    // Within the count, but the sealed document is larger than allowed.
    let three = catalog("vm1", (0..3).map(link).collect());
    let e = r
        .publish_catalog_within(
            three.clone(),
            at,
            CatalogLimits {
                entries: 3,
                bytes: 2000,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("more than the 2000"), "{e}");
    assert!(
        r.catalog_ids("vm1").unwrap().is_empty(),
        "a refused catalog was published"
    );
    // At the limits it is published and reads back.
    let ok = r.publish_catalog_within(three, at, roomy).unwrap();
    assert_eq!(r.catalog("vm1", &ok.id).unwrap(), ok);
}

/// An encrypted repository in a temporary directory, and its path.
fn encrypted_repo() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::sync::Arc<Repository>,
) {
    let d = tempfile::tempdir().unwrap();
    let spec = d.path().join("repo");
    let keys = crate::repo::crypto::Keys::generate();
    let (r, _) = Repository::open_or_create_keyed(spec.to_str().unwrap(), Some(keys)).unwrap();
    (d, spec, r)
}

#[test]
fn an_encrypted_catalog_reveals_no_guest_path() {
    let (d, spec, r) = encrypted_repo();
    let data = noise(100_000, 3);
    let chunks = ChunkSink::default().store(&r, &data[..]).unwrap();
    let mut c = catalog("vm1", vec![file("/secret-name", chunks.clone())]);
    c.entries.push(Entry {
        path: "/secret-link".into(),
        kind: EntryKind::Symlink,
        mode: 0o777,
        uid: 4242,
        gid: 4343,
        mtime: 1_234_567_890,
        mtime_nsec: 0,
        size: 0,
        target: Some("secret-target".into()),
        chunks: vec![],
        inode: None,
    });
    c.source = serde_json::json!({"paths": ["/secret-source"], "agent": "secret-agent"});
    let c = r.publish_catalog(c).unwrap();
    let key = catalog_key("vm1", &c.id);
    let raw = std::fs::read(spec.join(&key)).unwrap();
    let text = String::from_utf8_lossy(&raw);
    for plain in ["secret", "4242", "1234567890", "symlink", "mode", "source"] {
        assert!(!text.contains(plain), "{plain:?} is readable in {text}");
    }
    // It reads back, counts for gc and restores.
    let back = r.catalog("vm1", &c.id).unwrap();
    assert_eq!(back, c);
    let mut refs = catalog_refs(&r, &key, &raw).unwrap();
    refs.sort();
    let mut want: Vec<Digest> = chunks.iter().map(|c| c.digest).collect();
    want.sort();
    assert_eq!(refs, want);
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let all: Vec<&Entry> = back.entries.iter().collect();
    crate::files::restore(&r, &back, &all, &to, &Default::default()).unwrap();
    assert_eq!(std::fs::read(to.join("secret-name")).unwrap(), data);
    // Bound to its name: copied to another VM's or id's key, it is refused.
    let moved = catalog_key("vm2", &c.id);
    std::fs::create_dir_all(spec.join("files/vm2")).unwrap();
    std::fs::write(spec.join(&moved), &raw).unwrap();
    let e = r.catalog("vm2", &c.id).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
    // A flipped bit is refused.
    let mut bad = raw.clone();
    let mid = bad.len() / 2;
    bad[mid] = if bad[mid] == b'A' { b'B' } else { b'A' };
    std::fs::write(spec.join(&key), &bad).unwrap();
    let e = r.catalog("vm1", &c.id).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
}

#[test]
fn in_an_encrypted_repository_a_checksummed_plain_catalog_is_refused_and_a_maced_one_still_reads() {
    let (_d, spec, r) = encrypted_repo();
    let mut c = catalog("vm1", vec![]);
    c.id = "20261122-120000-files".into();
    let key = catalog_key("vm1", &c.id);
    std::fs::create_dir_all(spec.join("files/vm1")).unwrap();
    // Anyone can write a checksum: refused.
    std::fs::write(
        spec.join(&key),
        super::super::sealed::seal("catalog", &c).unwrap(),
    )
    .unwrap();
    let e = r.catalog("vm1", &c.id).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
    // What versions before catalog encryption wrote (plain, with the
    // repository's MAC) still reads: only the key could have written it.
    std::fs::write(spec.join(&key), r.seal("catalog", &c).unwrap()).unwrap();
    assert_eq!(r.catalog("vm1", &c.id).unwrap(), c);
    // An encrypted catalog in a plain repository is refused.
    let (_p, plain) = repo();
    let sealed = c.encode(&r, &key).unwrap();
    std::fs::create_dir_all(std::path::Path::new(&plain.location()).join("files/vm1")).unwrap();
    std::fs::write(std::path::Path::new(&plain.location()).join(&key), sealed).unwrap();
    let e = plain.catalog("vm1", &c.id).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("encrypted"), "{e}");
}

#[test]
fn an_error_about_a_path_with_a_newline_stays_on_one_line() {
    let (_d, r) = repo();
    let mut e = file("/x\nok: fake", vec![]);
    e.mode = 0o17777;
    let c = r.publish_catalog(catalog("vm1", vec![e])).unwrap();
    let e = r.catalog("vm1", &c.id).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");
    assert!(e.to_string().contains("\\n"), "{e}");
    let mut e = file("/y\nok: fake", vec![]);
    e.size = 1;
    assert!(!e.check().unwrap_err().to_string().contains('\n'));
    e.size = 0;
    e.kind = EntryKind::Dir;
    e.target = Some("t".into());
    assert!(!e.check().unwrap_err().to_string().contains('\n'));
}

#[test]
fn an_inode_is_kept_for_linked_files_absent_before_and_refused_elsewhere() {
    // An entry of a catalog written before inodes were recorded.
    let old: Entry = serde_json::from_str(
        r#"{"path":"/a","kind":"file","mode":420,"uid":0,"gid":0,"mtime":1,"mtime_nsec":0,"size":0}"#,
    )
    .unwrap();
    assert_eq!(old.inode, None);
    assert!(!serde_json::to_string(&old).unwrap().contains("inode"));
    let mut e = file("/b", vec![]);
    e.inode = Some(Inode {
        dev: 2049,
        ino: 77,
        nlink: 2,
    });
    let back: Entry = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
    assert_eq!(back, e);
    back.check().unwrap();
    // Only a regular file has one.
    let mut d = e.clone();
    d.kind = EntryKind::Dir;
    assert!(d.check().is_err());
}

#[test]
fn zero_chunks_are_stored_as_when_hashed_each_time() {
    let (_d, r) = repo();
    let mut data = vec![0u8; 3 << 20];
    data[1 << 20] = 1;
    let mut a = ChunkSink::default();
    let got = a.store(&r, &data[..]).unwrap();
    let zero = got.iter().find(|c| c.len == CDC_MAX).unwrap();
    assert_eq!(zero.digest, r.chunk_id(&vec![0u8; CDC_MAX as usize]));
    let sum: u64 = got.iter().map(|c| c.run_bytes().unwrap()).sum();
    assert_eq!(sum, data.len() as u64);
}

/// Bytes and announced zero runs, as the agent's stream gives them.
struct Segments {
    segs: std::collections::VecDeque<(bool, Vec<u8>, u64)>,
    /// Zero bytes passed over unread.
    skipped: std::rc::Rc<std::cell::Cell<u64>>,
}

impl std::io::Read for Segments {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let Some((zero, data, left)) = self.segs.front_mut() else {
            return Ok(0);
        };
        let n = if *zero {
            let n = (out.len() as u64).min(*left) as usize;
            out[..n].fill(0);
            *left -= n as u64;
            n
        } else {
            let n = out.len().min(data.len());
            out[..n].copy_from_slice(&data[..n]);
            data.drain(..n);
            n
        };
        if (*zero && *left == 0) || (!*zero && data.is_empty()) {
            self.segs.pop_front();
        }
        Ok(n)
    }
}

impl SparseRead for Segments {
    fn zeros_ahead(&self) -> u64 {
        match self.segs.front() {
            Some((true, _, n)) => *n,
            _ => 0,
        }
    }
    fn skip_zeros(&mut self, n: u64) {
        let f = self.segs.front_mut().unwrap();
        assert!(f.0 && n <= f.2);
        f.2 -= n;
        self.skipped.set(self.skipped.get() + n);
        if f.2 == 0 {
            self.segs.pop_front();
        }
    }
}

#[test]
fn holes_are_cut_into_the_chunks_streamcdc_cuts_from_the_same_zeros() {
    let (_d, r) = repo();
    // Data, holes of every length around CDC_MAX, zeros inside data.
    let mut noise_data = noise(3 << 20, 9);
    noise_data[100_000..900_000].fill(0);
    let holes = [
        1u64,
        CDC_MIN as u64,
        CDC_MAX as u64 - 1,
        CDC_MAX as u64,
        CDC_MAX as u64 + 1,
        5 * CDC_MAX as u64 + 12345,
        64 << 20,
    ];
    for (i, &hole) in holes.iter().enumerate() {
        for tail in [false, true] {
            let mut segs = std::collections::VecDeque::new();
            let a = noise_data[..1_000_000 + i * 7777].to_vec();
            let b = noise_data[2_000_000..].to_vec();
            segs.push_back((false, a.clone(), 0));
            segs.push_back((true, vec![], hole));
            segs.push_back((false, b.clone(), 0));
            if tail {
                segs.push_back((true, vec![], hole));
            }
            let mut whole = a;
            whole.resize(whole.len() + hole as usize, 0);
            whole.extend_from_slice(&b);
            if tail {
                whole.resize(whole.len() + hole as usize, 0);
            }
            let mut reference = vec![];
            for c in fastcdc::v2020::StreamCDC::new(&whole[..], CDC_MIN, CDC_AVG, CDC_MAX) {
                let c = c.unwrap();
                reference.push((r.chunk_id(&c.data), c.length as u32));
            }
            let skipped = std::rc::Rc::new(std::cell::Cell::new(0));
            let src = Segments {
                segs,
                skipped: skipped.clone(),
            };
            let got: Vec<_> = ChunkSink::default()
                .store_sparse(&r, src)
                .unwrap()
                .into_iter()
                .flat_map(|c| std::iter::repeat_n((c.digest, c.len), c.repeat as usize))
                .collect();
            assert!(got == reference, "hole {hole}, tail {tail}: other chunks");
            if hole == 64 << 20 {
                // All but a window or two of it never read.
                assert!(
                    skipped.get() > hole - 2 * CDC_MAX as u64,
                    "{}",
                    skipped.get()
                );
            }
        }
    }
}

/// A hole of `hole` bytes between two bits of data, as the agent's
/// stream gives it (zeros known ahead, never read).
fn sparse_file(hole: u64) -> (Segments, std::rc::Rc<std::cell::Cell<u64>>) {
    let skipped = std::rc::Rc::new(std::cell::Cell::new(0));
    let segs = [
        (false, noise(300_000, 3), 0),
        (true, vec![], hole),
        (false, noise(200_000, 4), 0),
    ];
    let src = Segments {
        segs: segs.into_iter().collect(),
        skipped: skipped.clone(),
    };
    (src, skipped)
}

#[test]
fn a_terabyte_hole_takes_one_chunk_run_in_a_format_2_catalog_and_restores_its_bytes() {
    let (_d, r) = repo();
    let hole = 1u64 << 40;
    let (src, _) = sparse_file(hole);
    let chunks = ChunkSink::default().store_sparse(&r, src).unwrap();
    let runs: Vec<_> = chunks.iter().filter(|c| c.repeat > 1).collect();
    assert_eq!(runs.len(), 1, "{} references", chunks.len());
    assert!(chunks.len() < 16, "{} references", chunks.len());
    let c = r
        .publish_catalog(catalog("vm1", vec![file("/srv/sparse", chunks)]))
        .unwrap();
    assert_eq!(c.format, CATALOG_FORMAT_RUNS);
    let stored = r
        .backend()
        .get(&catalog_key("vm1", &c.id), 1 << 30)
        .unwrap()
        .unwrap();
    assert!(stored.len() < 4096, "{} bytes stored", stored.len());
    let back = r.catalog("vm1", &c.id).unwrap();
    assert_eq!(back.entries[0].size, 500_000 + hole);

    // Its bytes, with a smaller hole of the same form (1 TiB would take
    // long to compare): data, zeros, data, read once per run.
    let (src, _) = sparse_file(64 << 20);
    let chunks = ChunkSink::default().store_sparse(&r, src).unwrap();
    assert!(chunks.iter().any(|c| c.repeat > 1));
    let c = r
        .publish_catalog(catalog("vm1", vec![file("/srv/small", chunks)]))
        .unwrap();
    let back = r.catalog("vm1", &c.id).unwrap();
    let mut got = vec![];
    let stop = std::sync::atomic::AtomicBool::new(false);
    crate::files::cat(&r, &back, &back.entries[0], &mut got, &stop).unwrap();
    let mut want = noise(300_000, 3);
    want.resize(want.len() + (64 << 20), 0);
    want.extend_from_slice(&noise(200_000, 4));
    assert!(got == want, "the restored bytes differ");
}

#[test]
fn a_catalog_without_runs_stays_format_1_for_older_readers() {
    let (_d, r) = repo();
    let chunks = ChunkSink::default()
        .store(&r, &noise(300_000, 5)[..])
        .unwrap();
    let c = r
        .publish_catalog(catalog("vm1", vec![file("/srv/a", chunks)]))
        .unwrap();
    assert_eq!(c.format, CATALOG_FORMAT);
    let stored = r
        .backend()
        .get(&catalog_key("vm1", &c.id), 1 << 30)
        .unwrap()
        .unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains("repeat"));
}

#[test]
fn runs_that_do_not_add_up_or_do_not_match_the_format_are_refused() {
    let (_d, r) = repo();
    let (src, _) = sparse_file(64 << 20);
    let chunks = ChunkSink::default().store_sparse(&r, src).unwrap();
    let good = catalog("vm1", vec![file("/srv/s", chunks)]);
    let mut c = good.clone();
    c.format = CATALOG_FORMAT_RUNS;
    assert!(c.clone().checked("x").is_ok());
    // A format 1 catalog with a run: an older writer never made one.
    c.format = CATALOG_FORMAT;
    assert!(c.checked("x").is_err(), "format 1 with a run");
    let run = |c: &mut Catalog| {
        (c.entries[0].chunks.iter_mut())
            .find(|ch| ch.repeat > 1)
            .unwrap()
            .repeat
    };
    let mut c = good.clone();
    c.format = CATALOG_FORMAT_RUNS;
    let n = run(&mut c);
    for bad in [0, n - 1, n + 1, u64::MAX] {
        let mut c = c.clone();
        (c.entries[0].chunks.iter_mut())
            .find(|ch| ch.repeat == n)
            .unwrap()
            .repeat = bad;
        assert!(c.checked("x").is_err(), "a run of {bad} accepted");
    }
    // Format 2 without a run: not what a writer makes.
    let plain = ChunkSink::default()
        .store(&r, &noise(300_000, 6)[..])
        .unwrap();
    let mut c = catalog("vm1", vec![file("/srv/p", plain)]);
    c.format = CATALOG_FORMAT_RUNS;
    assert!(c.checked("x").is_err(), "format 2 without a run");
}
