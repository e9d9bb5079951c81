//! Scratch directories of `boot`, `verify-boot`, `precopy`, `backup-vms`
//! and `files` (`recoverfs-KIND-XXXXXX` in the temporary directory): each names its
//! owner, so that what a killed run left is removed once that owner is
//! proven dead, by the next run of any of them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, IoContext, Result};

/// The kinds of scratch directory `boot`, `verify-boot`, `precopy` (its
/// NBD socket's), `backup-vms` (its stores') and `files` (a disk backup's
/// recovery, loop device and mount) make in the temporary directory:
/// `recoverfs-KIND-XXXXXX`.
const SCRATCH_KINDS: [&str; 5] = ["boot", "verify", "precopy", "vmbackup", "files"];

/// The file in a scratch directory naming the process that made it.
pub(super) const SCRATCH_OWNER: &str = "owner.json";

/// A new scratch directory `recoverfs-KIND-XXXXXX` in the temporary
/// directory, removed when dropped. Its `owner.json` names this process
/// (host, boot, pid namespace, pid, start time, as a repository lock
/// does), so that once a `kill -9` or a crash left it behind,
/// [`remove_stale_scratch`] can prove its owner dead.
pub(crate) fn scratch_dir(kind: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("recoverfs-{kind}-"))
        .tempdir()
        .ctx(|| "create a scratch directory".into())?;
    let owner = dir.path().join(SCRATCH_OWNER);
    let doc = serde_json::to_vec(&crate::repo::locks::this_process())
        .map_err(|e| Error::io("encode the scratch directory's owner", e.into()))?;
    std::fs::write(&owner, doc).ctx(|| format!("write {}", owner.display()))?;
    Ok(dir)
}

/// Why the run that made scratch directory `dir` is known dead: its
/// `owner.json` names a process of this host, boot and pid namespace that
/// is gone. `None` when that cannot be proven (no or an unreadable owner
/// file: an older run, or one that just made the directory).
pub(super) fn dead_scratch_owner(dir: &Path) -> Option<String> {
    let owner = dir.join(SCRATCH_OWNER);
    if !std::fs::symlink_metadata(&owner).ok()?.is_file() {
        return None;
    }
    let o: crate::repo::locks::Owner = serde_json::from_slice(&std::fs::read(&owner).ok()?).ok()?;
    crate::repo::locks::dead_process(&o)
}

/// Removes the scratch directories in `tmp` that `boot`, `verify-boot`
/// and `precopy` runs left when they died without their cleanup (`kill -9`, a crash):
/// only directories of this user whose owner file (see [`scratch_dir`])
/// names a process proven dead. A dead FUSE mount of a `verify-boot` in
/// one is detached first (its server was that process); a directory with
/// any other mount under it is left alone, as is one without an owner
/// file (older runs). Returns the directories removed; the rest is logged.
pub(crate) fn remove_stale_scratch(tmp: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Ok(tmp) = std::fs::canonicalize(tmp) else {
        return vec![];
    };
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return vec![];
    };
    let euid = nix::unistd::geteuid().as_raw();
    let mut removed = vec![];
    for e in entries.flatten() {
        let name = e.file_name();
        let ours = name.to_str().is_some_and(|n| {
            SCRATCH_KINDS
                .iter()
                .any(|k| n.starts_with(&format!("recoverfs-{k}-")))
        });
        if !ours {
            continue;
        }
        let dir = tmp.join(&name);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && m.uid() == euid => {}
            _ => continue,
        }
        let Some(why) = dead_scratch_owner(&dir) else {
            continue;
        };
        if !detach_dead_mounts(&dir) {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::warn!(
                    "removed {}, left by a recoverfs run that died without its cleanup ({why})",
                    dir.display()
                );
                removed.push(dir);
            }
            // Another run removed it first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "cannot remove {}, left by a recoverfs run that died ({why}): {e}",
                dir.display()
            ),
        }
    }
    removed
}

/// Detaches the recoverfs FUSE mounts under `dir`, a dead run's scratch
/// directory (their server was that run). False if a mount stays under
/// it: nothing is removed through a mount.
fn detach_dead_mounts(dir: &Path) -> bool {
    use crate::util::mountinfo;
    let under = || -> Vec<mountinfo::Mount> {
        mountinfo::current()
            .into_iter()
            .filter(|m| m.point.starts_with(dir))
            .collect()
    };
    let mut loops = vec![];
    // The last mounted first.
    for m in under().iter().rev() {
        // A `files` run's file system, on a loop device over a disk of
        // its own dead FUSE mount: detached, and the device after it.
        if let Some(dev) = loop_backed_under(m, dir) {
            let _ = nix::mount::umount2(&m.point, nix::mount::MntFlags::MNT_DETACH);
            loops.push(dev);
            continue;
        }
        if !m.is_recoverfs() {
            tracing::warn!(
                "{} is left: a {} file system is mounted at {}",
                dir.display(),
                m.fs_type,
                m.point.display()
            );
            return false;
        }
        if nix::mount::umount2(&m.point, nix::mount::MntFlags::MNT_DETACH).is_err() {
            // Not root: the mount was fusermount3's.
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&m.point)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    for dev in loops {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&dev)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let left = under();
    if let Some(m) = left.first() {
        tracing::warn!(
            "{} is left: the dead mount at {} cannot be detached (`fusermount3 -u -z {}`)",
            dir.display(),
            m.point.display(),
            m.point.display()
        );
        return false;
    }
    true
}

/// The loop device `m` is mounted from, if its backing file is under
/// `dir` (a dead `files` run's disk, on its own FUSE mount there).
fn loop_backed_under(m: &crate::util::mountinfo::Mount, dir: &Path) -> Option<String> {
    let dev = m.source.strip_prefix("/dev/")?;
    if !dev.starts_with("loop") || dev.contains('/') {
        return None;
    }
    let backing = std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file")).ok()?;
    Path::new(backing.trim_end())
        .starts_with(dir)
        .then(|| m.source.clone())
}
