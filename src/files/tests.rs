use super::*;
use crate::repo::catalog::{ChunkSink, CATALOG_FORMAT};
use std::os::unix::fs::PermissionsExt;

/// A stop flag never set.
static GO: AtomicBool = AtomicBool::new(false);

/// `--skip-existing`, notes to the log.
fn skip() -> How<'static> {
    How {
        existing: Existing::Skip,
        ..How::default()
    }
}

/// An entry of no content, mtime 1,600,000,000.
fn entry(path: &str, kind: EntryKind, mode: u32) -> Entry {
    Entry {
        path: path.into(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        mtime_nsec: 0,
        size: 0,
        target: None,
        chunks: vec![],
        inode: None,
    }
}

/// A published file backup of `/srv/a` (dir), `/srv/a/f` and `/srv/a/l`.
fn backup() -> (tempfile::TempDir, std::sync::Arc<Repository>, Catalog) {
    let d = tempfile::tempdir().unwrap();
    let (r, _) = Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
    let mut sink = ChunkSink::default();
    let chunks = sink.store(&r, &b"content\n"[..]).unwrap();
    let e = |path: &str, kind, mode, size, target: Option<&str>, chunks| Entry {
        path: path.into(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        mtime_nsec: 7,
        size,
        target: target.map(str::to_string),
        chunks,
        inode: None,
    };
    let c = Catalog {
        format: CATALOG_FORMAT,
        vm: "vm1".into(),
        id: String::new(),
        created: String::new(),
        created_unix: 0,
        source: serde_json::json!({}),
        entries: vec![
            e("/srv/a", EntryKind::Dir, 0o750, 0, None, vec![]),
            e("/srv/a/f", EntryKind::File, 0o640, 8, None, chunks),
            e("/srv/a/l", EntryKind::Symlink, 0o777, 0, Some("f"), vec![]),
        ],
        file_bytes: 8,
        stored_bytes: 0,
        new_bytes: 0,
    };
    let c = r.publish_catalog(c).unwrap();
    (d, r, c)
}

#[test]
fn a_directory_restores_with_modes_and_times_its_own_set_after_its_contents() {
    let (d, r, c) = backup();
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let sel = select(&c, "/srv/a/").unwrap();
    assert_eq!(restore(&r, &c, &sel, &to, &GO).unwrap(), 3);
    assert_eq!(std::fs::read(to.join("srv/a/f")).unwrap(), b"content\n");
    let m = std::fs::metadata(to.join("srv/a")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        m.mtime(),
        1_600_000_000,
        "the directory's time was set before its files"
    );
    let f = std::fs::metadata(to.join("srv/a/f")).unwrap();
    assert_eq!(
        (f.permissions().mode() & 0o7777, f.mtime_nsec()),
        (0o640, 7)
    );
    assert_eq!(
        std::fs::read_link(to.join("srv/a/l")).unwrap(),
        Path::new("f")
    );
    assert!(
        ls_line(sel[1]).starts_with("-rw-r----- "),
        "{}",
        ls_line(sel[1])
    );
    let e = select(&c, "/srv/b").unwrap_err();
    assert!(
        e.to_string().contains("/srv/b is not in file backup"),
        "{e}"
    );
}

#[test]
fn a_restore_never_writes_through_a_symbolic_link_nor_over_a_file() {
    let (d, r, c) = backup();
    let to = d.path().join("to");
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir_all(&to).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, to.join("srv")).unwrap();
    let sel = select(&c, "/srv/a").unwrap();
    let e = restore(&r, &c, &sel, &to, &GO).unwrap_err();
    assert!(
        e.to_string().contains("is a symbolic link: refusing"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "wrote through the link"
    );
    // An existing file is not replaced, and nothing else is written.
    std::fs::remove_file(to.join("srv")).unwrap();
    std::fs::create_dir_all(to.join("srv/a")).unwrap();
    std::fs::write(to.join("srv/a/f"), b"mine").unwrap();
    let e = restore(&r, &c, &sel, &to, &GO).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    assert_eq!(std::fs::read(to.join("srv/a/f")).unwrap(), b"mine");
    assert!(!to.join("srv/a/l").exists());
}

/// `entries` as a catalog a hostile guest could have sent: no file content.
fn hostile(entries: Vec<(&str, EntryKind, u32, Option<&str>)>) -> Vec<Entry> {
    entries
        .into_iter()
        .map(|(path, kind, mode, target)| Entry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            mtime_nsec: 0,
            size: 0,
            target: target.map(str::to_string),
            chunks: vec![],
            inode: None,
        })
        .collect()
}

#[test]
fn a_catalog_whose_symlink_is_a_later_entrys_parent_writes_nothing_outside_to() {
    let d = tempfile::tempdir().unwrap();
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = elsewhere.to_str().unwrap();
    let empty: &Content = &|_, _| Ok(());
    let cases = [
        // A file under the link the catalog itself creates.
        (
            hostile(vec![
                ("/x", EntryKind::Symlink, 0o777, Some(target)),
                ("/x/evil", EntryKind::File, 0o644, None),
            ]),
            "symbolic link",
        ),
        // The same path again, as a directory: its mode would go to the
        // link's target.
        (
            hostile(vec![
                ("/x", EntryKind::Symlink, 0o777, Some(target)),
                ("/x", EntryKind::Dir, 0o777, None),
            ]),
            "twice",
        ),
        // Deeper: a directory created under the link.
        (
            hostile(vec![
                ("/x", EntryKind::Symlink, 0o777, Some(target)),
                ("/x/d", EntryKind::Dir, 0o777, None),
            ]),
            "symbolic link",
        ),
        // A directory entry where `--to` already has a link.
        (
            hostile(vec![("/y", EntryKind::Dir, 0o777, None)]),
            "symbolic link",
        ),
    ];
    for (i, (entries, why)) in cases.iter().enumerate() {
        let to = d.path().join(format!("to{i}"));
        std::fs::create_dir(&to).unwrap();
        std::os::unix::fs::symlink(&elsewhere, to.join("y")).unwrap();
        let refs: Vec<&Entry> = entries.iter().collect();
        let e = restore_with(&refs, &to, empty, &GO).unwrap_err();
        assert!(e.to_string().contains(why), "case {i}: {e}");
        assert_eq!(
            std::fs::read_dir(&elsewhere).unwrap().count(),
            0,
            "case {i}: wrote through the link"
        );
        let mode = std::fs::metadata(&elsewhere).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "case {i}: chmod through the link");
    }
}

#[test]
fn restoring_the_root_directory_restores_into_to() {
    let d = tempfile::tempdir().unwrap();
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let e = entry;
    let entries = [
        e("/", EntryKind::Dir, 0o755),
        e("/a", EntryKind::File, 0o644),
    ];
    let refs: Vec<&Entry> = entries.iter().collect();
    let empty: &Content = &|_, _| Ok(());
    assert_eq!(restore_with(&refs, &to, empty, &GO).unwrap(), 2);
    assert!(to.join("a").is_file());
    assert_eq!(std::fs::metadata(&to).unwrap().mtime(), 1_600_000_000);
}

#[test]
fn a_file_with_a_255_byte_name_restores() {
    let d = tempfile::tempdir().unwrap();
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let name = "n".repeat(255);
    let mut file = entry(&format!("/{name}"), EntryKind::File, 0o644);
    file.size = 3;
    let content: &Content = &|_, out| out.write_all(b"abc").ctx(|| "write".to_string());
    assert_eq!(restore_with(&[&file], &to, content, &GO).unwrap(), 1);
    assert_eq!(std::fs::read(to.join(&name)).unwrap(), b"abc");
    assert_eq!(
        std::fs::read_dir(&to).unwrap().count(),
        1,
        "no temp file left"
    );
}

#[test]
fn ls_shows_control_characters_in_a_path_or_link_target_escaped() {
    let e = Entry {
        path: "/x\nok: fake\u{1b}[2J".into(),
        kind: EntryKind::Symlink,
        mode: 0o777,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: 0,
        target: Some("t\r\\".into()),
        chunks: vec![],
        inode: None,
    };
    let line = ls_line(&e);
    assert!(!line.chars().any(char::is_control), "{line:?}");
    assert!(
        line.ends_with("/x\\nok: fake\\u{1b}[2J -> t\\r\\\\"),
        "{line}"
    );
}

#[test]
fn a_stopped_restore_keeps_whole_files_with_their_metadata_and_removes_the_one_being_written() {
    let d = tempfile::tempdir().unwrap();
    let e = |path: &str, kind, mode| Entry {
        size: 3,
        ..entry(path, kind, mode)
    };
    let entries = [
        e("/d", EntryKind::Dir, 0o750),
        e("/d/a", EntryKind::File, 0o600),
        e("/d/b", EntryKind::File, 0o600),
        e("/d/c", EntryKind::File, 0o600),
    ];
    let refs: Vec<&Entry> = entries.iter().collect();
    // Stopped while /d/b is written, then between entries.
    for (i, stop_in) in ["/d/b", "/d/a"].into_iter().enumerate() {
        let to = d.path().join(format!("to{i}"));
        std::fs::create_dir(&to).unwrap();
        let stop = AtomicBool::new(false);
        let content: &Content = &|e, out| {
            out.write_all(b"abc").ctx(|| "write".to_string())?;
            if e.path == stop_in {
                stop.store(true, Ordering::SeqCst);
                if i == 0 {
                    return Err(copied_part(3, e));
                }
            }
            Ok(())
        };
        let err = restore_with(&refs, &to, content, &stop).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Interrupted, "{err}");
        let msg = err.to_string();
        let left: Vec<String> = std::fs::read_dir(to.join("d"))
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["a"], "{msg}");
        assert_eq!(std::fs::read(to.join("d/a")).unwrap(), b"abc");
        if i == 0 {
            assert!(
                msg.contains("restored 2 of 4 entries") && msg.contains("while writing /d/b"),
                "{msg}"
            );
        } else {
            assert!(msg.starts_with("restored 2 of 4 entries; "), "{msg}");
        }
        assert!(msg.contains("add --skip-existing to carry on"), "{msg}");
        let m = std::fs::metadata(to.join("d")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o750, "{msg}");
        assert_eq!(m.mtime(), 1_600_000_000, "{msg}");
        // Again without --skip-existing: refused before anything is written.
        let all: &Content = &|_, out| out.write_all(b"abc").ctx(|| "write".to_string());
        let err = restore_with(&refs, &to, all, &GO).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        assert!(err.to_string().contains("--skip-existing"), "{err}");
        // With it: what the stopped run wrote is kept, the rest written.
        let rewritten = std::sync::Mutex::new(vec![]);
        let counted: &Content = &|e, out| {
            rewritten.lock().unwrap().push(e.path.clone());
            out.write_all(b"abc").ctx(|| "write".to_string())
        };
        let n = restore_into(&refs, &to, counted, &GO, &skip()).unwrap();
        assert_eq!(n, 4);
        assert_eq!(*rewritten.lock().unwrap(), ["/d/b", "/d/c"]);
        for f in ["a", "b", "c"] {
            assert_eq!(std::fs::read(to.join("d").join(f)).unwrap(), b"abc");
        }
    }
}

#[test]
fn skip_existing_refuses_a_file_that_is_not_what_the_backup_has() {
    let d = tempfile::tempdir().unwrap();
    let to = d.path().join("to");
    let mut e = entry("/f", EntryKind::File, 0o640);
    e.size = 3;
    let refs = [&e];
    let content: &Content = &|_, out| out.write_all(b"abc").ctx(|| "write".to_string());
    std::fs::create_dir(&to).unwrap();
    restore_with(&refs, &to, content, &GO).unwrap();
    // Same bytes count, other time: written by someone else.
    let f = to.join("f");
    std::fs::write(&f, b"xyz").unwrap();
    let err = restore_into(&refs, &to, content, &GO, &skip()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(err.to_string().contains("not what the backup has"), "{err}");
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"xyz",
        "an existing file was replaced"
    );
}

#[test]
fn a_failed_restore_says_how_far_it_got_and_how_to_carry_on() {
    let d = tempfile::tempdir().unwrap();
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let mut a = entry("/a", EntryKind::File, 0o640);
    let mut b = entry("/b", EntryKind::File, 0o640);
    (a.size, b.size) = (3, 3);
    let refs = [&a, &b];
    let content: &Content = &|e, out| match e.path.as_str() {
        "/b" => Err(Error::io(
            "read /b",
            std::io::Error::from_raw_os_error(libc::EIO),
        )),
        _ => out.write_all(b"abc").ctx(|| "write".to_string()),
    };
    let err = restore_with(&refs, &to, content, &GO).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("restored 1 of 2 entries (each file restored is whole: add --skip-existing to carry on), then: read /b"),
        "{msg}"
    );
}

#[test]
fn ls_shows_setuid_setgid_and_sticky_bits_as_ls_does() {
    let line = |kind, mode| {
        let e = Entry {
            path: "/x".into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            target: None,
            chunks: vec![],
            inode: None,
        };
        ls_line(&e).split(' ').next().unwrap().to_string()
    };
    assert_eq!(line(EntryKind::File, 0o4755), "-rwsr-xr-x");
    assert_eq!(line(EntryKind::Dir, 0o1777), "drwxrwxrwt");
    assert_eq!(line(EntryKind::File, 0o6711), "-rws--s--x");
    assert_eq!(line(EntryKind::File, 0o4644), "-rwSr--r--");
    assert_eq!(line(EntryKind::File, 0o2644), "-rw-r-Sr--");
    assert_eq!(line(EntryKind::Dir, 0o1770), "drwxrwx--T");
    assert_eq!(line(EntryKind::File, 0o640), "-rw-r-----");
}

#[test]
fn a_catalog_with_identical_repeated_entries_lists_and_restores_each_once() {
    // What an agent given overlapping --paths (`/srv/a /srv/a/f`) wrote.
    let (d, r, mut c) = backup();
    let again: Vec<Entry> = c.entries[1..].to_vec();
    c.entries.extend(again);
    c.entries.push(c.entries[0].clone());
    let sel = select(&c, "/srv/a").unwrap();
    let paths: Vec<&str> = sel.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/srv/a", "/srv/a/f", "/srv/a/l"]);
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    // Also given the repeats directly.
    let all: Vec<&Entry> = c.entries.iter().collect();
    assert_eq!(restore(&r, &c, &all, &to, &GO).unwrap(), 3);
    assert_eq!(
        std::fs::read(to.join("srv/a/f")).unwrap(),
        b"content\n".to_vec()
    );
    // A path twice, differently: refused before anything is written.
    let mut changed = c.entries[1].clone();
    changed.mtime += 1;
    c.entries.push(changed);
    let sel = select(&c, "/srv/a").unwrap();
    assert_eq!(sel.len(), 4, "both versions are listed");
    let to2 = d.path().join("to2");
    std::fs::create_dir(&to2).unwrap();
    let e = restore(&r, &c, &sel, &to2, &GO).unwrap_err();
    assert!(
        e.to_string()
            .contains("/srv/a/f is in the file backup twice"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(&to2).unwrap().count(), 0);
}

#[test]
fn a_sparse_file_restores_sparse_with_its_bytes_and_size() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let size: u64 = 64 << 20;
    let entry = Entry {
        path: "/disk.img".into(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        mtime_nsec: 0,
        size,
        target: None,
        chunks: vec![],
        inode: None,
    };
    // Data at the start and mid-way, zeros elsewhere and at the end: as a
    // file backup's content arrives, in pieces of any size.
    let content: &Content = &|_, out| {
        let mut zeros = vec![0u8; 1 << 20];
        zeros[..5].copy_from_slice(b"start");
        for i in 0..64 {
            if i == 1 {
                zeros[..5].fill(0);
            }
            if i == 32 {
                out.write_all(&[7u8; 1 << 20]).ctx(|| "write".to_string())?;
                continue;
            }
            out.write_all(&zeros).ctx(|| "write".to_string())?;
        }
        Ok(())
    };
    restore_with(&[&entry], &to, content, &GO).unwrap();
    let p = to.join("disk.img");
    let m = std::fs::metadata(&p).unwrap();
    assert_eq!(m.len(), size);
    assert!(
        m.blocks() * 512 < 4 << 20,
        "a 64 MiB file with 1 MiB of data took {} bytes",
        m.blocks() * 512
    );
    let back = std::fs::read(&p).unwrap();
    assert_eq!(&back[..5], b"start");
    assert!(back[32 << 20..33 << 20].iter().all(|&b| b == 7));
    assert!(back[5..32 << 20].iter().all(|&b| b == 0));
    assert!(back[33 << 20..].iter().all(|&b| b == 0));
}

/// fixagent3 LOW: a restore's notes went to the log only.
#[test]
fn a_note_about_hard_links_goes_to_the_person_restoring() {
    let d = tempfile::tempdir().unwrap();
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let ino = Some(crate::repo::catalog::Inode {
        dev: 1,
        ino: 2,
        nlink: 2,
    });
    let (mut a, mut b) = (
        entry("/a", EntryKind::File, 0o640),
        entry("/b", EntryKind::File, 0o640),
    );
    (a.size, b.size, a.inode, b.inode) = (3, 3, ino, ino);
    b.mtime += 1; // It changed between the reads of its two links.
    let notes = std::sync::Mutex::new(vec![]);
    let say = |n: &str| notes.lock().unwrap().push(n.to_string());
    let how = How {
        existing: Existing::Refuse,
        say: &say,
    };
    let content: &Content = &|_, out| out.write_all(b"abc").ctx(|| "write".to_string());
    assert_eq!(restore_into(&[&a, &b], &to, content, &GO, &how).unwrap(), 2);
    let notes = notes.into_inner().unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("restored as separate files"), "{notes:?}");
}

/// review26 M1: a file system with coarser times keeps less of the mtime
/// than the backup has; the rerun must still keep what it wrote.
#[test]
fn skip_existing_keeps_a_whole_file_whose_time_the_file_system_rounded() {
    let d = tempfile::tempdir().unwrap();
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let mut e = entry("/f", EntryKind::File, 0o640);
    (e.size, e.mtime_nsec) = (3, 999_999_999);
    let content: &Content = &|_, out| out.write_all(b"abc").ctx(|| "write".to_string());
    restore_with(&[&e], &to, content, &GO).unwrap();
    let f = to.join("f");
    // As vfat would keep it: the second, rounded up.
    let rounded = nix::sys::time::TimeSpec::new(e.mtime + 1, 0);
    nix::sys::stat::utimensat(
        None,
        &f,
        &nix::sys::time::TimeSpec::UTIME_OMIT,
        &rounded,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    let rewritten = std::sync::atomic::AtomicBool::new(false);
    let counted: &Content = &|_, out| {
        rewritten.store(true, Ordering::SeqCst);
        out.write_all(b"abc").ctx(|| "write".to_string())
    };
    assert_eq!(restore_into(&[&e], &to, counted, &GO, &skip()).unwrap(), 1);
    assert!(
        !rewritten.load(Ordering::SeqCst),
        "a whole file was written again"
    );
}

/// A file backup of `/srv/big.img`: 5000 bytes of data, a hole of 1 TiB
/// (a run of the zero chunk), 5000 more bytes; the catalog, both pieces.
pub(crate) fn tib_hole_backup(r: &Repository) -> (Catalog, Vec<u8>, Vec<u8>) {
    let head: Vec<u8> = (0..5000u32).map(|i| (i % 251 + 1) as u8).collect();
    let tail: Vec<u8> = (0..5000u32).map(|i| (i % 241 + 3) as u8).collect();
    (hole_backup(r, &head, 1 << 40, &tail), head, tail)
}

/// A file backup of `/srv/big.img`: `head`, a hole of `hole` bytes (a run
/// of the zero chunk; a multiple of its length), `tail`.
fn hole_backup(r: &Repository, head: &[u8], hole: u64, tail: &[u8]) -> Catalog {
    use crate::repo::catalog::{ChunkRef, CATALOG_FORMAT_RUNS, CDC_MAX};
    let mut sink = ChunkSink::default();
    let zeros = vec![0u8; CDC_MAX as usize];
    let zero = r.chunk_id(&zeros);
    r.put_chunk(&zero, &zeros).unwrap();
    let mut chunks = sink.store(r, head).unwrap();
    chunks.push(ChunkRef {
        digest: zero,
        len: CDC_MAX,
        repeat: hole / CDC_MAX as u64,
    });
    chunks.extend(sink.store(r, tail).unwrap());
    let size = head.len() as u64 + hole + tail.len() as u64;
    let c = Catalog {
        format: CATALOG_FORMAT_RUNS,
        vm: "vm1".into(),
        id: String::new(),
        created: String::new(),
        created_unix: 0,
        source: serde_json::json!({}),
        entries: vec![Entry {
            size,
            chunks,
            ..entry("/srv/big.img", EntryKind::File, 0o640)
        }],
        file_bytes: size,
        stored_bytes: 0,
        new_bytes: 0,
    };
    r.publish_catalog(c).unwrap()
}

/// review27: a hole that ends the file, and a file that is all hole,
/// restore with their length (the sparse writer's last seek is no write).
#[test]
fn a_file_ending_in_a_hole_or_all_hole_restores_its_length_sparse() {
    use crate::repo::catalog::CDC_MAX;
    use std::os::unix::fs::MetadataExt;
    let hole = 64 * CDC_MAX as u64;
    for head in [&b"data before the hole"[..], &[]] {
        let d = tempfile::tempdir().unwrap();
        let (r, _) = Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
        let c = hole_backup(&r, head, hole, &[]);
        let to = d.path().join("to");
        std::fs::create_dir(&to).unwrap();
        let sel = select(&c, "/srv/big.img").unwrap();
        assert_eq!(
            restore_from(&r, &c, &sel, &to, &GO, &How::default()).unwrap(),
            1
        );
        let p = to.join("srv/big.img");
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), head.len() as u64 + hole, "head {}", head.len());
        assert!(
            m.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            m.blocks()
        );
        let got = std::fs::read(&p).unwrap();
        assert_eq!(&got[..head.len()], head);
        assert!(got[head.len()..].iter().all(|&b| b == 0));
    }
}

/// Checks `p` is the sparse file of [`tib_hole_backup`].
pub(crate) fn assert_tib_hole_file(p: &Path, head: &[u8], tail: &[u8]) {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let m = std::fs::metadata(p).unwrap();
    let hole = 1u64 << 40;
    assert_eq!(m.len(), head.len() as u64 + hole + tail.len() as u64);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "not sparse: {} blocks",
        m.blocks()
    );
    let f = std::fs::File::open(p).unwrap();
    let mut got = vec![0u8; head.len() + (64 << 10)];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(&got[..head.len()], head);
    assert!(got[head.len()..].iter().all(|&b| b == 0));
    let mut got = vec![0u8; (64 << 10) + tail.len()];
    let at = m.len() - got.len() as u64;
    f.read_exact_at(&mut got, at).unwrap();
    let (zeros, end) = got.split_at(64 << 10);
    assert!(zeros.iter().all(|&b| b == 0));
    assert_eq!(end, tail);
}

#[test]
fn a_file_with_a_tib_hole_restores_sparse_in_well_under_a_second() {
    let d = tempfile::tempdir().unwrap();
    let (r, _) = Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
    let (c, head, tail) = tib_hole_backup(&r);
    let to = d.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let sel = select(&c, "/srv/big.img").unwrap();
    // Stopped after 20 s: without the fix it wrote (and scanned) the TiB.
    let stop = AtomicBool::new(false);
    let t = std::time::Instant::now();
    let n = std::thread::scope(|s| {
        let restore = s.spawn(|| restore_from(&r, &c, &sel, &to, &stop, &How::default()));
        while !restore.is_finished() && t.elapsed() < std::time::Duration::from_secs(20) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        stop.store(true, Ordering::SeqCst);
        restore.join().unwrap()
    });
    let took = t.elapsed();
    assert_eq!(n.unwrap(), 1);
    assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    assert_tib_hole_file(&to.join("srv/big.img"), &head, &tail);
}
