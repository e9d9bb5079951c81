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
use crate::repo::catalog::{Entry, EntryKind};

/// Why an entry that changed under the walk is passed over.
pub const REPLACED: &str = "replaced while it was read";

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
    let shown = || full.display().to_string();
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(errno(format!("stat {}", full.display())))?;
    let kind = match kind_of(&st) {
        SFlag::S_IFREG => EntryKind::File,
        SFlag::S_IFDIR => EntryKind::Dir,
        SFlag::S_IFLNK => EntryKind::Symlink,
        _ => return f(Found::Skipped(shown(), "a socket, device or FIFO")),
    };
    let target = match kind {
        EntryKind::Symlink => Some(
            nix::fcntl::readlinkat(dir, name)
                .map_err(errno(format!("read link {}", full.display())))?
                .to_string_lossy()
                .into_owned(),
        ),
        _ => None,
    };
    let path = full
        .to_str()
        .ok_or_else(|| Error::invalid(format!("{} is not UTF-8", full.display())))?;
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

#[cfg(test)]
mod tests;
