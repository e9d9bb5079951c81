//! Where `agent-restore` writes, as root in a guest whose users may be
//! hostile: every directory is opened component by component from `/`
//! without following a symbolic link (`O_NOFOLLOW`), so a user cannot turn
//! a restore into a write somewhere else by planting a link in a directory
//! they own. The one link followed is one owned by root in a directory only
//! root can change (`/lib -> usr/lib` on merged-/usr systems): no user can
//! have planted or swapped that. Temp files are created `O_EXCL |
//! O_NOFOLLOW`, and a file's owner, mode and time are set through its
//! descriptor, so nothing a user renames in between is changed instead.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{Gid, Uid};

use crate::error::{Error, ErrorKind, Result};
use crate::repo::catalog::Entry;

fn errno(what: impl Into<String>) -> impl FnOnce(Errno) -> Error {
    move |e| Error::io(what, e.into())
}

fn own(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by openat and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The directory `/`, to walk from.
pub fn root() -> Result<OwnedFd> {
    openat(
        None,
        "/",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(own)
    .map_err(errno("open /"))
}

/// The normal components of an absolute path (`check_path` has refused
/// `.`, `..` and empty ones).
pub fn components(p: &Path) -> Vec<&OsStr> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect()
}

/// Opens (creating what is missing, if `create`) the directory `names`
/// below `from`; `shown` is `from`'s path, for messages.
pub fn open_dirs(from: &OwnedFd, shown: &Path, names: &[&OsStr], create: bool) -> Result<OwnedFd> {
    let mut dir = from.try_clone().map_err(|e| Error::io("dup", e))?;
    let mut at = shown.to_path_buf();
    for n in names {
        at.push(n);
        dir = open_dir(&dir, n, &at, create)?;
    }
    Ok(dir)
}

/// Opens directory `name` in `dir`, never through a symbolic link a user
/// could have planted.
fn open_dir(dir: &OwnedFd, name: &OsStr, shown: &Path, create: bool) -> Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let d = Some(dir.as_raw_fd());
    for _ in 0..2 {
        match openat(d, name, flags | OFlag::O_NOFOLLOW, Mode::empty()) {
            Ok(fd) => return Ok(own(fd)),
            Err(Errno::ENOENT) if create => {
                match mkdirat(d, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => continue,
                    Err(e) => return Err(errno(format!("create {}", shown.display()))(e)),
                }
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                let st = fstatat(d, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(errno(format!("stat {}", shown.display())))?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFLNK {
                    return Err(Error::invalid(format!(
                        "{} is not a directory: cannot restore under it",
                        shown.display()
                    )));
                }
                let parent = fstat(dir.as_raw_fd())
                    .map_err(errno(format!("stat the directory of {}", shown.display())))?;
                if st.st_uid == 0 && parent.st_uid == 0 && parent.st_mode & 0o022 == 0 {
                    return openat(d, name, flags, Mode::empty())
                        .map(own)
                        .map_err(errno(format!("open {}", shown.display())));
                }
                return Err(Error::new(
                    ErrorKind::NotPermitted,
                    format!(
                        "{} is a symbolic link (owned by uid {}): refusing to restore through it",
                        shown.display(),
                        st.st_uid
                    ),
                ));
            }
            Err(e) => return Err(errno(format!("open {}", shown.display()))(e)),
        }
    }
    Err(Error::new(
        ErrorKind::Io,
        format!(
            "{} keeps changing: cannot restore under it",
            shown.display()
        ),
    ))
}

/// A new file `name` in `dir` for writing: `O_EXCL | O_NOFOLLOW`, mode
/// 0600; a stale one (a killed restore, or planted) is unlinked first.
pub fn create_new(dir: &OwnedFd, name: &OsStr, shown: &Path) -> Result<File> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let d = Some(dir.as_raw_fd());
    match openat(d, name, flags, Mode::from_bits_truncate(0o600)) {
        Err(Errno::EEXIST) => {
            remove(dir, name, shown)?;
            openat(d, name, flags, Mode::from_bits_truncate(0o600))
        }
        r => r,
    }
    .map(|fd| File::from(own(fd)))
    .map_err(errno(format!("create {}", shown.display())))
}

/// Unlinks `name` in `dir` (the entry itself, never what a link names);
/// absent is fine.
pub fn remove(dir: &OwnedFd, name: &OsStr, shown: &Path) -> Result<()> {
    match nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        name,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(errno(format!("remove {}", shown.display()))(e)),
    }
}

/// Owner (as root), mode and modification time of an open file or
/// directory, through its descriptor.
pub fn set_meta_fd(fd: &impl AsRawFd, e: &Entry, root: bool, shown: &Path) -> Result<()> {
    use nix::sys::time::TimeSpec;
    let fd = fd.as_raw_fd();
    if root {
        nix::unistd::fchown(fd, Some(Uid::from_raw(e.uid)), Some(Gid::from_raw(e.gid)))
            .map_err(errno(format!("chown {}", shown.display())))?;
    }
    // After chown, which clears set-id bits.
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(e.mode))
        .map_err(errno(format!("chmod {}", shown.display())))?;
    let mtime = TimeSpec::new(e.mtime, e.mtime_nsec as i64);
    nix::sys::stat::futimens(fd, &TimeSpec::UTIME_OMIT, &mtime)
        .map_err(errno(format!("set times of {}", shown.display())))
}

/// Owner (as root) and time of the symbolic link `name` in `dir`.
pub fn set_link_meta(
    dir: &OwnedFd,
    name: &OsStr,
    e: &Entry,
    root: bool,
    shown: &Path,
) -> Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let d = Some(dir.as_raw_fd());
    if root {
        nix::unistd::fchownat(
            d,
            name,
            Some(Uid::from_raw(e.uid)),
            Some(Gid::from_raw(e.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(errno(format!("chown {}", shown.display())))?;
    }
    let mtime = TimeSpec::new(e.mtime, e.mtime_nsec as i64);
    utimensat(
        d,
        name,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(errno(format!("set times of {}", shown.display())))
}

/// `from` renamed over `to`, both in `dir`, and `dir` synced.
pub fn replace(dir: &OwnedFd, from: &OsStr, to: &OsStr, shown: &Path) -> Result<()> {
    let d = Some(dir.as_raw_fd());
    nix::fcntl::renameat(d, from, d, to)
        .map_err(errno(format!("rename to {}", shown.display())))?;
    nix::unistd::fsync(dir.as_raw_fd())
        .map_err(errno(format!("sync the directory of {}", shown.display())))
}

/// `p` with `base` in front (restores under `--to`).
pub fn under(base: Option<&Path>, p: &str) -> PathBuf {
    match base {
        Some(b) => b.join(p.trim_start_matches('/')),
        None => PathBuf::from(p),
    }
}
