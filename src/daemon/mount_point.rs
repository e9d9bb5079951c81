//! The mount point `serve` takes: an existing, empty directory with
//! nothing mounted on it; a stale FUSE mount left by a dead daemon is
//! detached (also the previous daemon's, at another mount point).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::util::mountinfo;

/// What `serve` found at the mount point.
#[derive(Debug, PartialEq)]
pub(super) enum MountPointState {
    Ready,
    Stale,
}

/// The mount point must be an existing, empty directory with nothing
/// mounted on it. A stale FUSE mount (its daemon died) is detached.
pub fn check_mount_point(mount: &Path) -> Result<PathBuf> {
    let state = mount_point_state(mount)?;
    if state == MountPointState::Stale {
        tracing::warn!(mount = %mount.display(), "detaching stale FUSE mount left by a dead daemon");
        nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            Error::busy(format!(
                "{} holds a stale mount that cannot be detached ({e}); run `fusermount3 -u -z {}`",
                mount.display(),
                mount.display()
            ))
        })?;
        if mount_point_state(mount)? != MountPointState::Ready {
            return Err(Error::busy(format!(
                "{} is still busy after detaching a stale mount",
                mount.display()
            )));
        }
    }
    std::fs::canonicalize(mount).ctx(|| format!("resolve {}", mount.display()))
}

/// Detaches the dead FUSE mount the previous daemon of this staging left
/// at another mount point than `mount` (see `staging::last_mount`). Only
/// a dead recoverfs mount is touched: a mount point since reused, or
/// served by a live daemon, is left alone. Never fails `serve`.
pub(super) fn detach_previous_mount(root: &Path, mount: &Path) {
    let Some(prev) = crate::staging::last_mount::read(root) else {
        return;
    };
    if prev == mount || mount_point_state(&prev).ok() != Some(MountPointState::Stale) {
        return;
    }
    let mounts = mountinfo::current();
    if !mountinfo::at(&mounts, &prev).is_some_and(|m| m.is_recoverfs()) {
        return;
    }
    match nix::mount::umount2(&prev, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => tracing::warn!(
            "detached the dead mount {} left by the previous daemon of this staging (now serving at {})",
            prev.display(),
            mount.display()
        ),
        Err(e) => tracing::warn!(
            "the previous daemon of this staging left a dead mount at {} that cannot be detached ({e}); run `fusermount3 -u -z {}`",
            prev.display(),
            prev.display()
        ),
    }
}

pub(super) fn mount_point_state(mount: &Path) -> Result<MountPointState> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = mount.to_path_buf();
    // A FUSE daemon that is stopped (SIGSTOP, a debugger) or hung answers
    // no stat: `serve` must say so, not hang with it (review24 L4). The
    // probe's thread is left blocked; the refusal ends the process.
    let probe = std::thread::Builder::new()
        .name("mount-probe".into())
        .spawn(move || {
            let _ = tx.send(probe_mount_point(&path));
        });
    if let Err(e) = probe {
        return Err(Error::io("start the mount point probe", e));
    }
    rx.recv_timeout(MOUNT_PROBE_TIMEOUT).unwrap_or_else(|_| {
        Err(Error::busy(format!(
            "mount point {} does not answer within {} s: a FUSE daemon serving it is stopped (`kill -CONT` it, or stop it) or a filesystem there hangs; choose another --mount",
            mount.display(),
            MOUNT_PROBE_TIMEOUT.as_secs()
        )))
    })
}

/// How long a mount point's stat may take before its FUSE daemon is taken
/// for stopped or hung.
const MOUNT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// [`mount_point_state`], on this thread (it may block on a FUSE mount).
fn probe_mount_point(mount: &Path) -> Result<MountPointState> {
    match std::fs::metadata(mount) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Ok(MountPointState::Stale),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(format!(
                "mount point {} does not exist",
                mount.display()
            )))
        }
        Err(e) => return Err(Error::io(format!("mount point {}", mount.display()), e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::invalid(format!(
                "mount point {} is not a directory",
                mount.display()
            )))
        }
        Ok(_) => {}
    }
    // A stat of a dead FUSE mount's root may still be answered from the
    // kernel's attribute cache (a restart within a second of a crash took
    // it for a live daemon's); a statfs always asks the daemon.
    if nix::sys::statvfs::statvfs(mount) == Err(nix::errno::Errno::ENOTCONN) {
        return Ok(MountPointState::Stale);
    }
    let abs = std::fs::canonicalize(mount).ctx(|| format!("resolve {}", mount.display()))?;
    let mounts = mountinfo::current();
    match mountinfo::at(&mounts, &abs) {
        None => {}
        // "Unmount it first" would take the disks from under its VMs: the
        // daemon serving it is alive (a dead one's mount is `Stale`).
        Some(m) if m.is_recoverfs() => {
            return Err(Error::busy(format!(
                "mount point {} is served by a running recoverfs daemon: choose another --mount \
                 (unmounting it would take the disks from under that daemon's VMs)",
                mount.display()
            )))
        }
        Some(m) => {
            return Err(Error::busy(format!(
                "mount point {} is busy: a {} file system is mounted there (unmount it first, or \
                 choose another --mount)",
                mount.display(),
                m.fs_type
            )))
        }
    }
    let mut entries = std::fs::read_dir(&abs).ctx(|| format!("read {}", abs.display()))?;
    if entries.next().is_some() {
        return Err(Error::invalid(format!(
            "mount point {} is not empty",
            mount.display()
        )));
    }
    Ok(MountPointState::Ready)
}
