//! For tests with the FUSE keeper on (`export::fuse::keeper`): a daemon
//! crash that leaves the mount kept, and guards that let the keeper go and
//! kill the test's processes even when the test fails.

use std::path::{Path, PathBuf};

use super::{Daemon, Env};

/// An `Env` whose daemons run with the keeper (the suite's default is
/// `--no-fuse-keeper`).
pub fn keeper_env() -> Env {
    let mut env = Env::new();
    env.fuse_keeper = true;
    env
}

/// Crash: SIGKILL, and the guard's unmount is skipped (a real crash does
/// not unmount either).
pub fn crash(mut d: Daemon) {
    d.kill9();
    std::mem::forget(d);
}

/// Whether a recoverfs FUSE file system is mounted at `mount`.
pub fn recoverfs_mounted_at(mount: &Path) -> bool {
    let m = std::fs::canonicalize(mount).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap()) && l.contains("recoverfs"))
}

/// Whether a keeper of staging `staging` holds a connection (asked on its
/// socket, not by reading /proc: a process waiting on a kept mount can
/// make its /proc files wait too).
pub fn keeper_runs(staging: &Path) -> bool {
    let root = std::fs::canonicalize(staging).unwrap();
    matches!(recoverfs::export::fuse::keeper::take(&root), Ok(Some(_)))
}

/// Lets the keeper of the test's staging go when the test ends, passed or
/// not, and detaches what is left at its mount point (a crashed daemon's
/// guard is forgotten, so nothing else does): a kept mount with no daemon
/// would otherwise keep processes that close a file on it waiting (a
/// close sends FLUSH) for good.
pub struct LetGo(PathBuf, PathBuf);

impl LetGo {
    pub fn of(env: &Env) -> LetGo {
        LetGo(env.staging.clone(), env.mount.clone())
    }
}

impl Drop for LetGo {
    fn drop(&mut self) {
        if let Ok(root) = std::fs::canonicalize(&self.0) {
            let _ = recoverfs::export::fuse::keeper::release(&root);
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.1)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A process of its own (as QEMU is) with the disk open: the test process
/// must hold no file of the mount, or the daemon it spawns while none
/// serves would wait on that file's FLUSH at exec.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        // No wait: on a failure the child may close its file on a kept
        // mount with no daemon, and its exit waits until `LetGo` (dropped
        // after it) lets the connection go.
        let _ = self.0.kill();
    }
}
