use super::os::openat2_unavailable;
use super::*;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;

#[test]
fn a_seccomp_refusal_of_openat2_falls_back_like_a_kernel_without_it() {
    assert!(openat2_unavailable(libc::ENOSYS));
    assert!(openat2_unavailable(libc::EPERM));
    // Real answers about the directory are not "unavailable".
    for e in [libc::EACCES, libc::ENOENT, libc::ENOTDIR, libc::ELOOP] {
        assert!(!openat2_unavailable(e), "{e}");
    }
}

#[test]
fn open_never_follows_a_symlink_and_empty_leaves_no_old_byte() {
    let d = tempfile::tempdir().unwrap();
    let s = OsStorage;
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    for how in [Open::Existing, Open::Create, Open::Empty] {
        let e = s.open(&link, how).err().expect("a link is refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = s.open(&victim, Open::Empty).unwrap();
    assert_eq!(f.len().unwrap(), 0);
    let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Pages of `len` bytes at `off` of `p` that are in the page cache.
fn cached_pages(p: &Path, off: u64, len: usize) -> usize {
    let f = File::open(p).unwrap();
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a private read-only mapping of an open file, only passed
    // to mincore (never read), unmapped before returning.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            off as libc::off_t,
        );
        assert_ne!(m, libc::MAP_FAILED);
        assert_eq!(libc::mincore(m, len, vec.as_mut_ptr()), 0);
        libc::munmap(m, len);
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// A new file at `p` as `serve --stage-fills-direct` opens staging
/// (without setting the process-wide switch other tests would see).
fn direct_fills_file(p: &Path) -> OsFile {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(p)
        .unwrap();
    OsFile::with_fills(f, true)
}

#[test]
fn a_fetched_block_goes_past_the_page_cache_and_reads_back_exactly() {
    // Under the crate, not /tmp: a tmpfs /tmp caches whatever is written.
    let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let p = d.path().join("data");
    let f = direct_fills_file(&p);
    let block: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 253) as u8).collect();
    // At an unaligned address, like a body the HTTP client collected.
    let unaligned = [&[0u8][..], &block].concat();
    f.write_fill_at(&unaligned[1..], 1 << 20).unwrap();
    assert_eq!(
        cached_pages(&p, 1 << 20, 1 << 20),
        0,
        "the fetched block was copied into the page cache"
    );
    let mut back = vec![0u8; 1 << 20];
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    assert!(back == block, "the block read back differs");
}

#[test]
fn a_fetched_block_with_an_unaligned_end_or_offset_is_written_whole() {
    let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let p = d.path().join("data");
    let f = direct_fills_file(&p);
    // A disk's last block (its length not a multiple of 4 KiB), and a
    // block at an offset direct I/O cannot take.
    let tail: Vec<u8> = (0..(3 * 4096 + 100)).map(|i| (i % 241) as u8 + 1).collect();
    f.write_fill_at(&tail, 8192).unwrap();
    f.write_fill_at(b"odd", 3).unwrap();
    let mut want = vec![0u8; 8192 + tail.len()];
    want[3..6].copy_from_slice(b"odd");
    want[8192..].copy_from_slice(&tail);
    assert_eq!(f.len().unwrap(), want.len() as u64);
    assert!(std::fs::read(&p).unwrap() == want, "the file differs");
}

#[test]
fn read_append_appends_exactly_the_bytes_and_a_short_file_leaves_the_buffer_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, &bytes).unwrap();
    let f = OsStorage.open(&p, Open::Existing).unwrap();
    let mut out = b"head".to_vec();
    f.read_append(&mut out, 200_000, 1000).unwrap();
    assert_eq!(out[..4], *b"head");
    assert_eq!(out[4..], bytes[1000..201_000]);
    let err = f.read_append(&mut out, 2000, 299_000).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(out.len(), 200_004, "a failed read appends nothing");
}

/// `disk0.raw` in `d`, as `Open::Empty` makes it, and its inode.
fn made_file(d: &tempfile::TempDir) -> (std::path::PathBuf, u64) {
    let p = d.path().join("disk0.raw");
    let f = OsStorage.open(&p, Open::Empty).unwrap();
    (p, f.ino().unwrap().unwrap())
}

#[test]
fn a_file_with_another_hard_link_is_opened_only_as_the_recorded_inode() {
    let d = tempfile::tempdir().unwrap();
    let (p, ino) = made_file(&d);
    std::fs::hard_link(&p, d.path().join("snapshot")).unwrap();
    assert!(OsStorage.open(&p, Open::ExistingSole).is_err());
    assert!(OsStorage.open(&p, Open::ExistingIno(ino)).is_ok());
    let e = OsStorage
        .open(&p, Open::ExistingIno(ino + 1))
        .err()
        .unwrap();
    assert!(e.to_string().contains("replaced"), "{e}");
    assert!(OsStorage.open(&p, Open::Empty).is_err());
}

#[test]
fn a_file_put_in_place_of_the_recorded_inode_is_refused_even_with_one_link() {
    let d = tempfile::tempdir().unwrap();
    let (p, ino) = made_file(&d);
    // Someone who may write the directory moves ours aside and puts
    // a file of their own under its name.
    std::fs::rename(&p, d.path().join("aside")).unwrap();
    std::fs::write(&p, b"theirs").unwrap();
    let e = OsStorage.open(&p, Open::ExistingIno(ino)).err().unwrap();
    assert!(e.to_string().contains("replaced"), "{e}");
}

#[test]
fn read_refuses_a_file_over_its_limit() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m");
    std::fs::write(&p, vec![b'x'; 100]).unwrap();
    assert_eq!(OsStorage.read(&p, 100).unwrap().unwrap().len(), 100);
    assert!(OsStorage.read(&p, 99).is_err());
    assert!(OsStorage.read(&d.path().join("none"), 1).unwrap().is_none());
}

#[test]
fn create_dir_all_refuses_a_symlinked_directory() {
    let d = tempfile::tempdir().unwrap();
    let real = d.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, d.path().join("ln")).unwrap();
    assert!(OsStorage.create_dir_all(&d.path().join("ln")).is_err());
    OsStorage
        .create_dir_all(&d.path().join("a/b/c"))
        .expect("nested create");
    let mode = std::fs::metadata(d.path().join("a/b/c"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

/// As QEMU's image locking on bytes 100.. and 200.. of `f` (read-only):
/// takes a shared OFD lock on `len` bytes at `start`, or (`test_write`)
/// asks whether a write lock there would be granted (`F_OFD_GETLK`); true
/// if granted, or would be.
fn qemu_lock(f: &File, start: i64, len: i64, test_write: bool) -> bool {
    // SAFETY: plain data, the fields meant set below, l_pid 0.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if test_write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = start;
    fl.l_len = len;
    let cmd = if test_write {
        libc::F_OFD_GETLK
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: fcntl on an open file with a valid flock.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    rc == 0 && (!test_write || i32::from(fl.l_type) == libc::F_UNLCK)
}

#[test]
fn a_target_lock_keeps_other_opens_from_emptying_but_leaves_qemus_lock_bytes_free() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("disk0.raw");
    std::fs::write(&p, b"in use").unwrap();
    let held = OsStorage.open(&p, Open::Existing).unwrap();
    assert!(held.try_lock(false).unwrap());
    // Another open (another daemon) can share it, never empty it.
    let other = OsStorage.open(&p, Open::Existing).unwrap();
    assert!(other.try_lock(false).unwrap());
    assert_eq!(
        other.try_lock(true).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    drop(other);
    let e = OsStorage.open(&p, Open::EmptyLocked).err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
    assert!(e.to_string().contains("in use by another recoverfs"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"in use");
    // qemu-img reading the disk meanwhile tests and takes its bytes.
    let qemu = File::open(&p).unwrap();
    assert!(qemu_lock(&qemu, 100, 128, false));
    assert!(
        qemu_lock(&qemu, 200, 64, true),
        "QEMU would see the image as locked"
    );
    drop((qemu, held));
    // Let go: emptied, and held shared again.
    let mine = OsStorage.open(&p, Open::EmptyLocked).unwrap();
    assert_eq!(mine.len().unwrap(), 0);
    let other = OsStorage.open(&p, Open::Existing).unwrap();
    assert!(other.try_lock(true).is_err());
}

/// `filefrag -v`'s flags for the extents of `p` (ext4 and others that
/// answer FIEMAP), or `None` where it cannot tell.
fn extent_flags(p: &Path) -> Option<String> {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(p)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && text.contains("Filesystem type is: ef53")).then_some(text)
}

#[test]
fn a_large_buffered_fill_allocates_its_range_and_fills_from_many_threads_land_whole() {
    // Under the crate (ext4 here), not a tmpfs /tmp.
    let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let p = d.path().join("data");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let f = Arc::new(OsFile::with_fills(f, false));
    const MIB: usize = 1 << 20;
    f.set_len(16 * MIB as u64).unwrap();
    let block = |i: usize| -> Vec<u8> { (0..MIB).map(|j| ((i * 31 + j) % 251) as u8).collect() };
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                for i in (t..16).step_by(4) {
                    f.write_fill_at(&block(i), (i * MIB) as u64).unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(f.len().unwrap(), 16 * MIB as u64, "fills keep the size");
    for i in 0..16 {
        let mut got = vec![0u8; MIB];
        f.read_exact_at(&mut got, (i * MIB) as u64).unwrap();
        assert!(got == block(i), "block {i} reads back as filled");
    }
    // Before any writeback: delayed allocation would show as `delalloc`.
    let Some(flags) = extent_flags(&p) else {
        eprintln!("not ext4 or no filefrag: the allocation is not checked here");
        return;
    };
    assert!(
        !flags.contains("delalloc"),
        "every fill allocated its range first:\n{flags}"
    );
    assert!(flags.contains("unwritten"), "{flags}");
}
