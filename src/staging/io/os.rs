//! [`OsStorage`] and [`OsFile`]: [`Storage`] and [`BlockFile`] on the
//! real filesystem.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{in_use, BlockFile, DirId, Open, PinnedDir, Storage};
use crate::util::{AlignedBuf, DIRECT_ALIGN};

/// `openat2(RESOLVE_NO_SYMLINKS)` of a directory; before Linux 5.6, a
/// path already in canonical form opened `O_NOFOLLOW` (a link swapped into
/// a component between the two steps is then not seen, but the caller's
/// identity check still refuses a directory that is not the one expected).
fn open_dir_no_symlinks(dir: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: c and how outlive the call; the size is how's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a new descriptor, owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ELOOP) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a symbolic link is on the way, which recoverfs never follows",
        )),
        Some(n) if openat2_unavailable(n) => {
            if std::fs::canonicalize(dir)? != dir {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a symbolic link is on the way, which recoverfs never follows",
                ));
            }
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(dir)
                .map_err(refuse_links)
                .map(OwnedFd::from)
        }
        _ => Err(e),
    }
}

/// Whether `openat2` failing with `errno` means the call is not there:
/// ENOSYS before Linux 5.6, EPERM from a seccomp filter that refuses
/// syscalls it does not know (Docker before 20.10, systemd's
/// `SystemCallFilter` without `SystemCallErrorNumber=ENOSYS`). Opening a
/// directory read-only has no other EPERM.
pub(super) fn openat2_unavailable(errno: i32) -> bool {
    matches!(errno, libc::ENOSYS | libc::EPERM)
}

/// The one byte [`BlockFile::try_lock`] locks, far past any disk's end: a
/// lock on the whole file would make QEMU's image locking (OFD locks on
/// bytes 100.. and 200..) take the image for one in use, and `qemu-img`
/// would refuse even to read a relocated VM's disk.
const LOCK_BYTE: u64 = 1 << 62;

/// The byte of QEMU's image locking (file protocol: one byte per
/// permission held from 100) that says it holds write permission: a
/// reader (`qemu-img info`, a backup tool) is no second writer.
const QEMU_LOCK_BYTES: std::ops::Range<u64> = 101..102;

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsStorage;

impl OsStorage {
    pub fn shared() -> Arc<dyn Storage> {
        Arc::new(OsStorage)
    }
}

/// `O_NOFOLLOW` reports a link as ELOOP; say what it means.
fn refuse_links(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a symbolic link, which recoverfs never follows",
        )
    } else {
        e
    }
}

impl Storage for OsStorage {
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn BlockFile>> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(matches!(
                    how,
                    Open::Create | Open::Empty | Open::EmptyLocked
                ))
                // Emptied below, once known to be a file of its own.
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | flags)
                .open(path)
        };
        // A read of staging must never write metadata: an atime update would
        // wait behind any journal commit, e.g. another VM's fsync. O_NOATIME
        // is refused (EPERM) on files we do not own; then go without it.
        let f = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
            r => r,
        }
        .map_err(refuse_links)?;
        let meta = f.metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is not a regular file",
            ));
        }
        // A file with another name elsewhere (a hard link put here, by
        // someone who may write the directory, to a file they may not) is
        // not ours to empty or write.
        if let Open::ExistingIno(ino) = how {
            if ino != meta.ino() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "it is not the file recoverfs made there (inode {}, recorded {ino}): \
                         it was replaced since",
                        meta.ino()
                    ),
                ));
            }
        }
        let ours = matches!(how, Open::ExistingIno(_));
        if !matches!(how, Open::Existing | Open::Create) && meta.nlink() != 1 && !ours {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "it has {} hard links, and recoverfs empties or writes only a file of its own",
                    meta.nlink()
                ),
            ));
        }
        let locked = how == Open::EmptyLocked;
        let f = OsFile::new(f);
        if locked && !f.try_lock(true).map_err(in_use)? {
            tracing::warn!(path = %path.display(), "this filesystem keeps no locks: another \
                recoverfs relocation is not kept from emptying this file");
        }
        if matches!(how, Open::Empty | Open::EmptyLocked) {
            f.file.set_len(0)?;
            if meta.permissions().mode() & 0o777 != 0o600 {
                // An existing file keeps its mode.
                f.file
                    .set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
        }
        if locked {
            // Emptied: others may now open it to read, never to empty it.
            f.try_lock(false)?;
        }
        Ok(Arc::new(f))
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(refuse_links(e)),
        };
        if f.metadata()?.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than the {limit} bytes such a file may have"),
            ));
        }
        let mut buf = vec![];
        f.take(limit + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than the {limit} bytes such a file may have"),
            ));
        }
        Ok(Some(buf))
    }

    fn rename_into_place(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = dir.join(format!(".{name}.tmp.{}.{}", std::process::id(), unique()));
        let r = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir)
            .map_err(refuse_links)?
            .sync_all()
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut missing = vec![];
        let mut cur = dir;
        loop {
            match std::fs::symlink_metadata(cur) {
                Ok(m) if m.is_dir() => break,
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{} is a symbolic link, which recoverfs never follows",
                            cur.display()
                        ),
                    ))
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} exists and is not a directory", cur.display()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.push(cur.to_path_buf());
                    cur = match cur.parent() {
                        Some(p) => p,
                        None => break,
                    };
                }
                Err(e) => return Err(e),
            }
        }
        for d in missing.iter().rev() {
            match std::fs::DirBuilder::new().mode(0o700).create(d) {
                Ok(()) => self.sync_dir(d.parent().unwrap_or(Path::new("/")))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn pin_dir(&self, dir: &Path) -> io::Result<PinnedDir> {
        let fd = open_dir_no_symlinks(dir)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fd is open; st is written by fstat before it is read.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded.
        let st = unsafe { st.assume_init() };
        let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: fd is open; fs is written by fstatfs before it is read.
        if unsafe { libc::fstatfs(fd.as_raw_fd(), fs.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstatfs succeeded.
        let fs = unsafe { fs.assume_init() };
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is not a directory",
            ));
        }
        Ok(PinnedDir {
            path: PathBuf::from(format!("/proc/self/fd/{}/.", fd.as_raw_fd())),
            id: Some(DirId {
                dev: st.st_dev,
                ino: st.st_ino,
            }),
            owner: Some(st.st_uid),
            // A magic number: `as` keeps every bit whatever its C type.
            #[allow(clippy::unnecessary_cast)]
            fs_type: Some(fs.f_type as u64),
            _fd: Some(fd),
        })
    }

    fn boot_id(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Whether [`BlockFile::write_fill_at`] bypasses the page cache (`serve
/// --stage-fills-direct`); off by default, see there.
static DIRECT_FILLS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets, for the whole process, whether fetched blocks are written to
/// staging past the page cache (files opened from then on).
pub fn set_direct_fills(on: bool) {
    DIRECT_FILLS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A plain file.
pub struct OsFile {
    file: File,
    /// [`set_direct_fills`] when the file was opened.
    fills_direct: bool,
    /// The same file opened again with `O_DIRECT`, for
    /// [`BlockFile::write_fill_at`]: opened at the first such write; `None`
    /// where the filesystem refuses direct I/O.
    direct: std::sync::OnceLock<Option<File>>,
    /// Cleared when a direct write was refused (EINVAL: alignment the
    /// filesystem does not take); buffered from then on.
    direct_ok: std::sync::atomic::AtomicBool,
    /// Held by a buffered fill while it writes (see [`OsFile::fill_buffered`]).
    filling: std::sync::Mutex<()>,
    /// Whether a buffered fill allocates its range first: on ext4 only,
    /// where it was measured (on btrfs a preallocated range turns the
    /// file's compression off); found at the first fill.
    allocate: std::sync::OnceLock<bool>,
}

/// A buffered fill of at least this many bytes allocates its range before
/// it writes. Below it the extra call costs more than it saves (4 KiB
/// fills: 1.9 against 1.3 CPU-s per GiB, measured at stop 43).
const ALLOCATE_FROM: usize = 128 << 10;

/// Bytes a direct write of an unaligned buffer passes at once through the
/// thread's aligned buffer.
const DIRECT_PIECE: usize = 1 << 20;

thread_local! {
    /// Reused, so its pages stay mapped.
    static DIRECT_BUF: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// What a direct write did: all of it, or where the rest must go
/// buffered (a short write left an unaligned remainder, or the
/// filesystem refused the alignment).
enum Direct {
    Done,
    Rest { from: usize, refused: bool },
}

impl OsFile {
    fn new(file: File) -> OsFile {
        Self::with_fills(
            file,
            DIRECT_FILLS.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub(super) fn with_fills(file: File, fills_direct: bool) -> OsFile {
        OsFile {
            file,
            fills_direct,
            direct: std::sync::OnceLock::new(),
            direct_ok: std::sync::atomic::AtomicBool::new(true),
            filling: std::sync::Mutex::new(()),
            allocate: std::sync::OnceLock::new(),
        }
    }

    /// Whether the file is on ext4 (see [`OsFile::allocate`]).
    fn on_ext4(&self) -> bool {
        const EXT4_SUPER_MAGIC: libc::c_long = 0xef53;
        let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: fstatfs fills `st` for an fd we own; it is read only if
        // the call succeeded.
        unsafe {
            libc::fstatfs(self.file.as_raw_fd(), st.as_mut_ptr()) == 0
                && st.assume_init().f_type as libc::c_long == EXT4_SUPER_MAGIC
        }
    }

    /// A fill through the page cache, one at a time per file, its range
    /// allocated first. Two fetch threads writing one file at once contend
    /// for its inode lock, and the kernel spins the waiter for the length
    /// of the other's copy: 1 GiB of 1 MiB writes cost 0.30 CPU-s from two
    /// threads against 0.16 from one; waiting here sleeps instead. Writing
    /// into allocated (unwritten) blocks skips ext4's per-page delayed
    /// allocation: 0.10 instead of 0.16, and 0.15 instead of 0.22 with the
    /// kernel's writeback counted (stop 43, `docs/benchmarks.md`). The
    /// allocation is best effort: where it fails (a full disk) the write
    /// decides, as before; and only on ext4 (see [`OsFile::allocate`]).
    fn fill_buffered(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let _one = self
            .filling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buf.len() >= ALLOCATE_FROM && *self.allocate.get_or_init(|| self.on_ext4()) {
            // SAFETY: fallocate on an fd we own; no memory is passed.
            let _ = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    buf.len() as libc::off_t,
                )
            };
        }
        self.file.write_all_at(buf, off)
    }

    fn direct_file(&self) -> Option<&File> {
        use std::sync::atomic::Ordering;
        if !self.fills_direct || !self.direct_ok.load(Ordering::Relaxed) {
            return None;
        }
        self.direct
            .get_or_init(|| {
                // The same inode, whatever became of its name since.
                let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
                    .open(format!("/proc/self/fd/{fd}"))
                    .ok()
            })
            .as_ref()
    }

    /// Writes `buf` (its length a multiple of the alignment) at the
    /// aligned `off` through `d`: straight from `buf` if its memory is
    /// aligned (a fetched body collected into an [`AlignedBuf`]), else a
    /// piece at a time through this thread's aligned buffer.
    fn write_direct(d: &File, buf: &[u8], off: u64) -> io::Result<Direct> {
        if buf.as_ptr() as usize % DIRECT_ALIGN == 0 {
            return Self::write_direct_aligned(d, buf, off, 0);
        }
        DIRECT_BUF.with(|cell| {
            let mut cell = cell.borrow_mut();
            let abuf = cell.get_or_insert_with(|| AlignedBuf::with_capacity(DIRECT_PIECE));
            let mut done = 0;
            while done < buf.len() {
                abuf.clear();
                let end = (done + DIRECT_PIECE).min(buf.len());
                assert!(abuf.extend_from_slice(&buf[done..end]), "a piece fits");
                match Self::write_direct_aligned(d, abuf, off + done as u64, done)? {
                    Direct::Done => done = end,
                    rest => return Ok(rest),
                }
            }
            Ok(Direct::Done)
        })
    }

    /// One aligned piece; `base`: where `piece` starts in the whole write.
    fn write_direct_aligned(d: &File, piece: &[u8], off: u64, base: usize) -> io::Result<Direct> {
        let mut at = 0;
        while at < piece.len() {
            match d.write_at(&piece[at..], off + at as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Nothing was written by the refused call.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(Direct::Rest {
                        from: base + at,
                        refused: true,
                    })
                }
                Err(e) => return Err(e),
            }
            if at % DIRECT_ALIGN != 0 {
                return Ok(Direct::Rest {
                    from: base + at,
                    refused: false,
                });
            }
        }
        Ok(Direct::Done)
    }
}

impl BlockFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, off: u64) -> io::Result<()> {
        out.reserve(len);
        let at = out.len();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let mut done = 0usize;
        while done < len {
            let spare = &mut out.spare_capacity_mut()[done..len];
            // SAFETY: `spare` is writable memory of `len - done` bytes owned
            // by `out` (reserved above); pread writes at most that many and
            // no byte of it is read before the kernel wrote it.
            let n = unsafe {
                libc::pread(
                    fd,
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    (off + done as u64) as libc::off_t,
                )
            };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        // SAFETY: the kernel initialised all `len` bytes after `at` (the
        // loop ends only when `done == len`), within the reserved capacity.
        unsafe { out.set_len(at + len) };
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn write_fill_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let aligned = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let d = match self.direct_file() {
            Some(d) if off % DIRECT_ALIGN as u64 == 0 && aligned > 0 => d,
            _ => return self.fill_buffered(buf, off),
        };
        let from = match Self::write_direct(d, &buf[..aligned], off)? {
            Direct::Done => aligned,
            Direct::Rest { from, refused } => {
                if refused {
                    self.direct_ok
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
                from
            }
        };
        // An unaligned tail (the disk's last block) goes buffered.
        self.write_all_at(&buf[from..], off + from as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // ENOSPC: a full ext4 may need a block to split an extent; zeros
        // over the allocated range need none. Anything else (EIO) is an
        // error, never hidden behind a zero fill.
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOSPC)
        ) {
            return Err(e);
        }
        // Filesystems without hole punching still read zeros after this;
        // a piece at a time, as the range may be terabytes of holes.
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(zeros.len() as u64);
            self.file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn ino(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.file.metadata()?.ino()))
    }

    fn next_hole(&self, from: u64) -> io::Result<Option<std::ops::Range<u64>>> {
        let fd = self.file.as_raw_fd();
        let len = self.len()?;
        if from >= len {
            return Ok(None);
        }
        // SAFETY: lseek on an fd we own; reads and writes here are
        // positioned (pread/pwrite), so the offset it moves is unused.
        let seek = |off: u64, whence: i32| unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        let start = match seek(from, libc::SEEK_HOLE) {
            n if n >= 0 => n as u64,
            _ => {
                let e = io::Error::last_os_error();
                // Shrunk meanwhile: no hole before the end. A filesystem
                // that cannot tell holes (EINVAL, EOPNOTSUPP) reports none,
                // as `SEEK_HOLE`'s generic fallback does: never an error
                // that would keep a relocation from being reopened.
                return match e.raw_os_error() {
                    Some(libc::ENXIO | libc::EINVAL | libc::EOPNOTSUPP) => Ok(None),
                    _ => Err(e),
                };
            }
        };
        if start >= len {
            return Ok(None);
        }
        let end = match seek(start, libc::SEEK_DATA) {
            n if n >= 0 => n as u64,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENXIO) => len, // a hole to the end
                    _ => return Err(e),
                }
            }
        };
        Ok(Some(start..end.max(start)))
    }

    fn try_lock(&self, exclusive: bool) -> io::Result<bool> {
        // SAFETY: plain data; every field meant is set below, the rest
        // (l_pid, which OFD locks require to be 0) zero.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if exclusive {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        } as _;
        fl.l_whence = libc::SEEK_SET as _;
        fl.l_start = LOCK_BYTE as _;
        fl.l_len = 1;
        // SAFETY: fcntl on an fd we own with a valid flock; OFD locks
        // belong to the open file description, so they convert atomically
        // and end when the last descriptor of it closes.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => Err(io::ErrorKind::WouldBlock.into()),
            // No locks here (NFS mounted `nolock` keeps them local; some
            // FUSE filesystems have none).
            Some(libc::ENOLCK | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => Ok(false),
            _ => Err(e),
        }
    }

    fn image_locked_elsewhere(&self) -> io::Result<bool> {
        // SAFETY: plain data; the fields meant are set below, the rest
        // (l_pid, which OFD locks require to be 0) zero.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as _;
        fl.l_whence = libc::SEEK_SET as _;
        fl.l_start = QEMU_LOCK_BYTES.start as _;
        fl.l_len = (QEMU_LOCK_BYTES.end - QEMU_LOCK_BYTES.start) as _;
        // SAFETY: fcntl on an fd we own with a valid flock; F_OFD_GETLK
        // only reports (in `fl`) a lock that would conflict.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOLCK | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => Ok(false),
                _ => Err(e),
            };
        }
        Ok(i32::from(fl.l_type) != libc::F_UNLCK)
    }

    fn as_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.file))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }
}
