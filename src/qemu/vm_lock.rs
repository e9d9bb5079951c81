//! [`VmLock`]: one job at a time changes a running QEMU's block graph.
//!
//! **The lock file's life.** `recoverfs-qemu-{pid}-{started}.lock` in
//! `/run/lock` (else the temporary directory), keyed on the process behind
//! the QMP socket (`SO_PEERCRED`, and its start time so that a reused pid
//! is another VM): two monitors of one VM meet at the same file. What is
//! held is an `flock` on the file, so a holder that dies (killed, crashed)
//! lets go of it; the file alone means nothing. The rule that lets the
//! files be removed without two jobs ever holding "the" lock at once:
//! - a file is removed (unlinked) only by a process that holds its lock:
//!   its holder when done ([`Drop`]), or any taker that finds a file of a
//!   QEMU process that is gone and can lock it (nobody holds it);
//! - a taker, once it has the lock, checks that the file it locked is still
//!   the one at the path (same device and inode). If not, it locked a file
//!   removed between its open and its lock (whose holder was done) and
//!   holds nothing: it opens the path again (creating a new file).
//!
//! So a path names at most one file that can be held, and two takers never
//! both believe they hold the VM. Files left behind (a holder killed while
//! its QEMU runs on) are taken over by the next job on that VM, or removed
//! once that QEMU is gone, when any job takes a lock; `/run/lock` is
//! emptied at boot as well.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const PREFIX: &str = "recoverfs-qemu-";

/// A lock on one running QEMU process, held by a job that changes its
/// block graph (`backup-vms`, a pre-copy's rounds): two runs on one VM
/// would take each other's NBD server. Its file is removed when it is
/// dropped (see the module docs for why that is safe).
pub struct VmLock {
    file: File,
    path: PathBuf,
}

impl VmLock {
    /// `Busy` if another job holds the VM; `None` when the socket's peer is
    /// unknown (no lock to take).
    pub fn try_take(q: &super::qmp::Qmp) -> Result<Option<VmLock>> {
        let Some(pid) = q.peer_pid() else {
            return Ok(None);
        };
        let Some(started) = process_start(pid) else {
            return Ok(None);
        };
        take_in(&lock_dir(), pid, started, q.path()).map(Some)
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        // Removed while still held: a taker that opened it meanwhile finds,
        // once it has the lock, that it is no longer the path's file.
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Takes the lock of QEMU process `pid` (started at `started`) in `dir`,
/// after removing the files of QEMU processes that are gone.
fn take_in(dir: &Path, pid: u32, started: u64, socket: &Path) -> Result<VmLock> {
    remove_stale(dir);
    let path = dir.join(format!("{PREFIX}{pid}-{started}.lock"));
    match lock(&path, true)? {
        Some(file) => Ok(VmLock { file, path }),
        None => Err(Error::busy(format!(
            "another recoverfs job is changing this VM's block devices (QEMU process {pid} \
             behind {}; lock {}): wait for it to finish",
            socket.display(),
            path.display()
        ))),
    }
}

/// Opens (creating it, 0600, if `create`) and locks the file at `path`:
/// `None` if another process holds it (or, without `create`, if there is
/// none). A file removed or replaced between the open and the lock is not
/// the path's any more: opened again.
fn lock(path: &Path, create: bool) -> Result<Option<File>> {
    loop {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            // A world-writable directory: never follow a planted link.
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path);
        let f = match opened {
            Ok(f) => f,
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        if !crate::util::try_flock(&f, true) {
            return Ok(None);
        }
        if same_file(&f, path) {
            return Ok(Some(f));
        }
        // Its holder was done and removed it before our lock.
        if !create {
            return Ok(None);
        }
    }
}

/// Whether `path` is (still) the file `f` is open on.
fn same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Removes the lock files in `dir` of QEMU processes that are gone (no
/// such pid, or it started at another time) and that nobody holds (a job
/// may still be failing on a QEMU that died under it). Best effort.
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some((pid, started)) = name.to_str().and_then(parse_name) else {
            continue;
        };
        if process_start(pid) == Some(started) {
            continue;
        }
        let path = e.path();
        if let Ok(Some(_held)) = lock(&path, false) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// `(pid, started)` of a lock file's name.
fn parse_name(name: &str) -> Option<(u32, u64)> {
    let (pid, started) = name
        .strip_prefix(PREFIX)?
        .strip_suffix(".lock")?
        .split_once('-')?;
    Some((pid.parse().ok()?, started.parse().ok()?))
}

/// `/run/lock` where it exists (every Debian host), else the temporary
/// directory.
pub(crate) fn lock_dir() -> PathBuf {
    let run = Path::new("/run/lock");
    if run.is_dir() {
        run.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat`
/// field 22).
pub(crate) fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests;
