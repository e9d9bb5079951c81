//! The agent's walk of a selected tree, as root in a guest whose users may
//! be hostile. Each directory is opened without following a link, listed
//! through its descriptor, and its children are stat-ed and opened
//! relative to that descriptor (`O_NOFOLLOW`): a user who swaps a
//! directory or a file for a link to `/etc` between the listing and the
//! read cannot get what the link names into the backup. A file or
//! directory that is not what its stat said when it is opened (a link now,
//! or another inode) is passed over and reported.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use crate::error::{Error, Result};
use crate::repo::catalog::{Entry, EntryKind, Inode};

/// Why an entry that changed under the walk is passed over.
pub const REPLACED: &str = "replaced while it was read";

/// Why an entry whose name is not UTF-8 is passed over.
pub const NOT_UTF8: &str = "its name is not UTF-8";
/// Why a directory whose name is not UTF-8 is passed over.
pub const NOT_UTF8_DIR: &str = "its name is not UTF-8; nothing under it is backed up";
/// Why a symbolic link whose target is not UTF-8 is passed over.
pub const LINK_NOT_UTF8: &str = "a symbolic link whose target is not UTF-8";
/// Why what is under a kernel pseudo-filesystem's directory is passed over.
pub const PSEUDO_FS: &str =
    "a kernel filesystem (proc, sysfs, cgroup, ...): the directory is kept, not what is in it";

/// `p` for a log line: bytes that are not UTF-8 as `\xNN`, control
/// characters and `\` escaped, so the name is told without ambiguity.
pub fn escaped(p: &Path) -> String {
    use std::fmt::Write;
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for c in p.as_os_str().as_bytes().utf8_chunks() {
        out.push_str(&crate::util::escape_controls(c.valid()));
        for b in c.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// What the walk found.
pub enum Found {
    /// An entry in walk order; a regular file comes open.
    Entry(Entry, Option<File>),
    /// A path passed over, and why.
    Skipped(String, &'static str),
}

/// Walks `p` and everything under it (directories in name order), never
/// into `skip`, calling `f` with each entry.
pub fn walk(p: &Path, skip: Option<&Path>, f: &mut dyn FnMut(Found) -> Result<()>) -> Result<()> {
    visit(None, p.as_os_str(), p, skip, f)
}

fn errno(what: String) -> impl FnOnce(Errno) -> Error {
    move |e| Error::io(what, e.into())
}

fn kind_of(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// `name` in `dir` (`None`: `name` is a path), opened `O_NOFOLLOW`, if it
/// is still the inode `st` describes.
fn open_same(
    dir: Option<RawFd>,
    name: &OsStr,
    st: &FileStat,
    extra: OFlag,
) -> Result<Option<OwnedFd>> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | extra;
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => {
            // SAFETY: openat just returned this descriptor; no one else owns it.
            unsafe { OwnedFd::from_raw_fd(fd) }
        }
        Err(Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(errno(format!("open {}", Path::new(name).display()))(e)),
    };
    let now =
        fstat(fd.as_raw_fd()).map_err(errno(format!("stat {}", Path::new(name).display())))?;
    let same = kind_of(&now) == kind_of(st) && now.st_dev == st.st_dev && now.st_ino == st.st_ino;
    Ok(same.then_some(fd))
}

fn visit(
    dir: Option<RawFd>,
    name: &OsStr,
    full: &Path,
    skip: Option<&Path>,
    f: &mut dyn FnMut(Found) -> Result<()>,
) -> Result<()> {
    if skip.is_some_and(|s| full.starts_with(s)) {
        return Ok(());
    }
    let shown = || escaped(full);
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(errno(format!("stat {}", full.display())))?;
    let kind = match kind_of(&st) {
        SFlag::S_IFREG => EntryKind::File,
        SFlag::S_IFDIR => EntryKind::Dir,
        SFlag::S_IFLNK => EntryKind::Symlink,
        _ => return f(Found::Skipped(shown(), "a socket, device or FIFO")),
    };
    // The catalog holds UTF-8: such an entry is passed over and told,
    // not the whole backup failed. Only a name below a given path can
    // be one (those come as UTF-8).
    let Some(path) = full.to_str() else {
        let why = match kind {
            EntryKind::Dir => NOT_UTF8_DIR,
            _ => NOT_UTF8,
        };
        return f(Found::Skipped(escaped(full), why));
    };
    let target = match kind {
        EntryKind::Symlink => {
            let t = nix::fcntl::readlinkat(dir, name)
                .map_err(errno(format!("read link {}", full.display())))?;
            match t.into_string() {
                Ok(t) => Some(t),
                // Not stored altered (it would restore pointing elsewhere).
                Err(_) => return f(Found::Skipped(escaped(full), LINK_NOT_UTF8)),
            }
        }
        _ => None,
    };
    let entry = Entry {
        path: path.to_string(),
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
        size: if kind == EntryKind::File {
            st.st_size as u64
        } else {
            0
        },
        target,
        chunks: vec![],
        // A file's other links may be in the backup too: a restore links
        // them again.
        inode: (kind == EntryKind::File && st.st_nlink > 1).then_some(Inode {
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: st.st_nlink,
        }),
    };
    match kind {
        EntryKind::Symlink => f(Found::Entry(entry, None)),
        // O_NONBLOCK: a FIFO swapped in does not hang the open (reads of
        // a regular file ignore it).
        EntryKind::File => match open_same(dir, name, &st, OFlag::O_NONBLOCK)? {
            Some(fd) => f(Found::Entry(entry, Some(File::from(fd)))),
            None => f(Found::Skipped(shown(), REPLACED)),
        },
        EntryKind::Dir => {
            let Some(fd) = open_same(dir, name, &st, OFlag::O_DIRECTORY)? else {
                return f(Found::Skipped(shown(), REPLACED));
            };
            f(Found::Entry(entry, None))?;
            if is_pseudo_fs(&fd) {
                return f(Found::Skipped(shown(), PSEUDO_FS));
            }
            // The directory held open, not its path (which may have been
            // swapped for a link since).
            let held = format!("/proc/self/fd/{}", fd.as_raw_fd());
            let list = || -> std::io::Result<Vec<OsString>> {
                std::fs::read_dir(&held)?
                    .map(|d| d.map(|d| d.file_name()))
                    .collect()
            };
            let mut names = list().map_err(|e| Error::io(format!("list {}", full.display()), e))?;
            names.sort();
            for n in &names {
                visit(Some(fd.as_raw_fd()), n, &full.join(n), skip, f)?;
            }
            Ok(())
        }
    }
}

/// Whether the directory `fd` is on a kernel pseudo-filesystem (`/proc`,
/// `/sys`, cgroups, ...): its files describe the running system, not
/// data, and reading some fails or never ends; a walk of `/` must get
/// through them (explore6 M7). Mounts of real filesystems are walked.
fn is_pseudo_fs(fd: &OwnedFd) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs fills the buffer we own from an open descriptor.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: the call succeeded, so the struct is initialised.
    let kind = unsafe { st.assume_init() }.f_type;
    [
        libc::PROC_SUPER_MAGIC,
        libc::SYSFS_MAGIC,
        libc::CGROUP_SUPER_MAGIC,
        libc::CGROUP2_SUPER_MAGIC,
        libc::DEBUGFS_MAGIC,
        libc::TRACEFS_MAGIC,
        libc::SECURITYFS_MAGIC,
        libc::SELINUX_MAGIC,
        libc::BPF_FS_MAGIC,
        libc::DEVPTS_SUPER_MAGIC,
        libc::NSFS_MAGIC,
    ]
    .contains(&kind)
}

#[cfg(test)]
mod tests;
