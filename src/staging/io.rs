//! File I/O for everything recoverfs keeps for a guest, behind one small
//! seam: staging data files, the presence, changed and copied maps, session
//! and relocation metadata, and relocation targets.
//!
//! Production uses [`OsStorage`]: plain files opened without following a
//! symbolic link, new files mode 0600. Tests swap in other implementations,
//! the way QEMU's `blkdebug` sits under a block driver:
//! * `fault` (tests only) fails chosen operations on chosen files;
//! * `mem` (tests only) keeps files in memory and records every write, sync,
//!   rename and directory sync, so a test can build "power cut here" states
//!   (everything synced before the cut plus any subset of what was written
//!   after) and reopen a volume from each.
//!
//! The trait is deliberately the few operations the data path uses, with
//! their durability spelled out, so the recording layer can model exactly
//! what a real filesystem promises and no more.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

#[cfg(test)]
pub mod fault;
#[cfg(test)]
pub mod mem;
mod os;
pub use os::{set_direct_fills, OsFile, OsStorage};

/// One open file: positioned reads and writes, and the syncs that make
/// them durable. (`len` is the file's size, fallible like every call
/// here; an `is_empty` would add nothing.)
#[allow(clippy::len_without_is_empty)]
pub trait BlockFile: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Appends exactly `len` bytes read at `off` to `out`; on error `out`
    /// keeps its length. A plain file reads into the spare capacity (no
    /// zero-filling first); this default fills zeros, then reads.
    fn read_append(&self, out: &mut Vec<u8>, len: usize, off: u64) -> io::Result<()> {
        let at = out.len();
        out.resize(at + len, 0);
        let r = self.read_exact_at(&mut out[at..], off);
        if r.is_err() {
            out.truncate(at);
        }
        r
    }
    /// A completed write is visible to reads at once and durable only after
    /// the next `sync_data` that starts after it completed.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// [`BlockFile::write_all_at`] of a block fetched from the repository
    /// (copy-on-read): the same visibility and durability, but with
    /// [`set_direct_fills`] a plain file writes it past the page cache
    /// where it can (`O_DIRECT`): the reader was answered from the fetched
    /// bytes, and copying them into fresh page-cache pages was the largest
    /// part of the daemon's CPU per cold GiB. The price: a staged block
    /// read again comes from the disk, behind whatever else it is writing
    /// (another VM's fsync), where a cached one would not wait.
    fn write_fill_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_all_at(buf, off)
    }
    /// fdatasync: every write completed before the call is durable after it.
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the range read as zeros (a hole where the filesystem can punch
    /// one); durable like a write.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Sets the size and makes it durable before returning.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The open file, for a kernel that reads it directly (FUSE
    /// passthrough); `None` where there is no plain file.
    fn as_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// The file's inode number on its filesystem (see
    /// [`Open::ExistingIno`]); `None` where there is none (in memory).
    fn ino(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// The first hole at or after `from` as a byte range, the file's end
    /// excluded (`SEEK_HOLE`, then `SEEK_DATA`: one call per hole, however
    /// large the file); `None` if there is none, or none this storage can
    /// tell (in memory, a filesystem without hole reporting).
    fn next_hole(&self, _from: u64) -> io::Result<Option<std::ops::Range<u64>>> {
        Ok(None)
    }
    /// Takes, without waiting, a lock on the file held for as long as
    /// this open file lives (an open file description lock: another open
    /// of the same file, in this process or another, conflicts), or
    /// converts the one held, atomically: shared, or `exclusive`. Held
    /// elsewhere: `WouldBlock`. `Ok(false)`: this filesystem keeps no locks
    /// (nothing else is kept out either).
    fn try_lock(&self, _exclusive: bool) -> io::Result<bool> {
        Ok(true)
    }
    /// Whether another open of the file holds QEMU's image locks (OFD
    /// locks on bytes 100.. and 200..: a QEMU with the image open, by
    /// default). Never an error for a filesystem without locks: false.
    fn image_locked_elsewhere(&self) -> io::Result<bool> {
        Ok(false)
    }
}

/// How [`Storage::open`] treats an existing or missing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// The file must exist; its contents are kept.
    Existing,
    /// As `Existing`, and the file must have no other hard link: a file
    /// reopened in a directory others may write (a relocation target) is
    /// not written if a link to another file was put in its place.
    ExistingSole,
    /// The file must be this inode, recorded when it was created or
    /// emptied: then it is that very file, and another name for it
    /// elsewhere (an administrator's `cp -al` snapshot) does not make it
    /// another's; any other file (one put in its place) is refused.
    ExistingIno(u64),
    /// Created (empty, mode 0600) if missing; an existing file is kept.
    Create,
    /// Created if missing, emptied if present: no old byte can survive. A
    /// present file with more than one hard link is refused, not emptied.
    Empty,
    /// As `Empty`, under an exclusive lock ([`BlockFile::try_lock`]) taken
    /// before the file is emptied (refused, `WouldBlock`, while another
    /// open holds any), then turned shared: a relocation target, which no
    /// other relocation may empty while this one has it open.
    EmptyLocked,
}

/// Where files live. Paths are absolute.
pub trait Storage: Send + Sync {
    /// Opens a regular file for reading and writing. A symbolic link in the
    /// last component is refused, never followed; new files are mode 0600.
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn BlockFile>>;
    /// Reads a whole small file; `None` if it does not exist. A file longer
    /// than `limit` bytes is an error, never read into memory.
    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>>;
    /// Writes `data` to a temporary file, syncs it and renames it over
    /// `path`. The rename is the commit point: afterwards every reader sees
    /// the new contents, but the new name is durable only after
    /// [`Storage::sync_dir`] of the parent.
    fn rename_into_place(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Makes entries created, renamed or removed in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates `dir` (mode 0700) and any missing parents, each made durable
    /// in its own parent. An existing directory is fine; a symbolic link or
    /// a file in its place is an error.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Removes a file; a missing one is not an error. Durable after
    /// `sync_dir` of the parent.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Opens directory `dir` (absolute) without following a symbolic link
    /// in any of its components, and holds it: the returned
    /// [`PinnedDir::path`] names that very directory for as long as the
    /// `PinnedDir` lives, whatever `dir` is renamed to or replaced by.
    fn pin_dir(&self, dir: &Path) -> io::Result<PinnedDir>;
    /// Names the period in which unsynced writes stay readable: it changes
    /// when the page cache is lost (a reboot, a power cut). Empty if unknown,
    /// which trusts nothing unsynced.
    fn boot_id(&self) -> String;
}

/// A directory's identity: no other directory has it while it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirId {
    pub dev: u64,
    pub ino: u64,
}

/// A directory held open (see [`Storage::pin_dir`]).
#[derive(Debug)]
pub struct PinnedDir {
    /// `/proc/self/fd/N/.` for a real directory: the kernel resolves the
    /// magic link to the open directory itself, never again by name, so
    /// every path under it is looked up relative to that descriptor (as
    /// `openat` would). The `.` makes the directory itself openable with
    /// `O_NOFOLLOW` (`sync_dir`); `Path::parent` would drop it, so the
    /// directory's own path is this one, never a file's parent.
    path: PathBuf,
    /// `None` where the storage has no such notion (in memory).
    id: Option<DirId>,
    /// The owner's uid, as `id`.
    owner: Option<u32>,
    /// The filesystem's type (`statfs` `f_type`), as `id`.
    fs_type: Option<u64>,
    _fd: Option<OwnedFd>,
}

impl PinnedDir {
    /// A directory of a storage without descriptors: its name is all there is.
    pub fn by_name(dir: &Path) -> PinnedDir {
        PinnedDir {
            path: dir.to_path_buf(),
            id: None,
            owner: None,
            fs_type: None,
            _fd: None,
        }
    }

    /// The directory, for [`Storage`] calls on the files in it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> Option<DirId> {
        self.id
    }

    pub fn owner(&self) -> Option<u32> {
        self.owner
    }

    pub fn fs_type(&self) -> Option<u64> {
        self.fs_type
    }
}

/// Replaces `path` atomically and durably: `rename_into_place`, then
/// `sync_dir` of its parent.
pub fn replace(storage: &dyn Storage, path: &Path, data: &[u8]) -> Result<()> {
    storage
        .rename_into_place(path, data)
        .ctx(|| format!("write {}", path.display()))?;
    sync_parent(storage, path)
}

/// `sync_dir` of a path's parent, with context.
pub fn sync_parent(storage: &dyn Storage, path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::invalid(format!("{} has no parent", path.display())))?;
    storage
        .sync_dir(dir)
        .ctx(|| format!("fsync directory {}", dir.display()))
}

/// A lock held elsewhere (see [`BlockFile::try_lock`]), said as what it means.
pub fn in_use(e: io::Error) -> io::Error {
    if e.kind() != io::ErrorKind::WouldBlock {
        return e;
    }
    io::Error::new(
        io::ErrorKind::WouldBlock,
        "it is in use by another recoverfs relocation or session (it holds a lock on it)",
    )
}

#[cfg(test)]
mod tests;
