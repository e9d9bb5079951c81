//! Mounting the datastore on FUSE: afresh (and handing the connection to
//! its keeper), or by adopting the connection a crashed daemon of the same
//! staging left with the keeper (see `export::fuse::keeper`).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};
use crate::export::fuse::keeper::{self, Held, InitParams};
use crate::export::fuse::{adopt, RecoverFs, MAX_IO};

/// The staging directory a keeper is named after: canonical, so every
/// daemon of that staging finds the same one.
pub fn keeper_root(staging: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(staging).ok()
}

/// Before the mount point is looked at: the connection the keeper of
/// `staging` holds, to adopt when it is the one at `mount`. A connection
/// kept for another mount point (or when keeping is off) is let go, so
/// that mount ends as it did before keepers (ENOTCONN), and the stale
/// mount is detached as usual.
pub fn take_kept(staging: &Path, mount: &Path, keeping: bool) -> Option<(Held, OwnedFd)> {
    let root = keeper_root(staging)?;
    let (held, fd) = match keeper::take(&root) {
        Ok(Some(k)) => k,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(
                "could not ask the FUSE keeper of {} for the previous daemon's connection: {e}",
                root.display()
            );
            return None;
        }
    };
    if keeping && crate::staging::set::resolve_mount(mount).is_ok_and(|m| m == held.mount) {
        tracing::warn!(mount = %held.mount.display(), "adopting the FUSE connection the previous daemon of this staging left: guests' waiting disk I/O is answered again");
        return Some((held, fd));
    }
    tracing::warn!(
        "the previous daemon's FUSE mount {} was kept for it; {}: letting it go (its open disks now fail with ENOTCONN)",
        held.mount.display(),
        if keeping { "this daemon mounts elsewhere" } else { "--no-fuse-keeper" }
    );
    drop(fd);
    if let Err(e) = keeper::release(&root) {
        tracing::warn!("the FUSE keeper of {} did not let go: {e}", root.display());
    }
    None
}

/// Mounts `fs` afresh at `mount`; with `keeper_root`, hands a copy of the
/// connection to that staging's keeper (a failure is logged: the daemon
/// serves, but its mount would die with it).
pub fn mount_fresh(
    fs: RecoverFs,
    mount: &Path,
    cfg: &fuser::Config,
    keeper_root: Option<&Path>,
    init: &Arc<OnceLock<InitParams>>,
) -> Result<fuser::BackgroundSession> {
    let session = fuser::Session::new(fs, mount, cfg)
        .map_err(|e| Error::io(format!("mount FUSE at {}", mount.display()), e))?;
    if let Some(root) = keeper_root {
        let held = init.get().map(|init| Held {
            mount: mount.to_path_buf(),
            init: *init,
        });
        let handed = match held {
            Some(h) => keeper::hand_over(root, h, session.as_fd()),
            None => Err(Error::invalid("the kernel's INIT was not seen")),
        };
        if let Err(e) = handed {
            tracing::warn!("the FUSE connection has no keeper ({e}): if this daemon dies, its mount dies with it");
        }
    }
    session
        .spawn()
        .map_err(|e| Error::io("start the FUSE session", e))
}

/// Serves the kept connection `fd` with `fs`: the sessions the kernel's
/// requests name must be resumed before this is called.
pub fn mount_adopted(
    fs: RecoverFs,
    fd: OwnedFd,
    held: &Held,
    cfg: &fuser::Config,
) -> Result<fuser::BackgroundSession> {
    let acl = cfg.acl;
    let session = adopt::session(fd, &held.init, MAX_IO, |fd| {
        fuser::Session::from_fd(fs, fd, acl, cfg.clone())
    })?;
    if let Err(e) = adopt::resend(session.as_fd()) {
        tracing::warn!("{e}: requests the previous daemon read but did not answer wait until their callers give up");
    }
    session
        .spawn()
        .map_err(|e| Error::io("start the FUSE session", e))
}

/// Unmounts an adopted connection (fuser did not mount it, so it cannot)
/// and waits for its loop to end.
pub fn unmount_adopted(bg: fuser::BackgroundSession, mount: &Path) -> std::io::Result<()> {
    nix::mount::umount2(mount, nix::mount::MntFlags::empty())?;
    bg.join()
}

/// At a clean stop: the keeper lets the connection go, so a mount left
/// detached (disks still open) ends with this process as before.
pub fn release_keeper(root: &Path) {
    if let Err(e) = keeper::release(root) {
        tracing::warn!("the FUSE keeper of {} did not let go: {e}", root.display());
    }
}

/// The daemon stops all the same (SIGTERM at host shutdown must): says
/// which VMs lose their disks, and detaches the mount lazily so the next
/// `serve` mounts cleanly instead of finding a dead mount.
pub fn unmount_refused(mount: &Path, e: std::io::Error, held: &[String]) -> Error {
    let shown = mount.display();
    let detached = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH).is_ok();
    let then = if detached {
        "the mount was detached".to_string()
    } else {
        format!("run `fusermount3 -u -z {shown}`")
    };
    if held.is_empty() {
        return Error::io(format!("unmount {shown} ({then})"), e);
    }
    Error::busy(format!(
        "stopped while VM(s) {} still had disks open on {shown} (unmount: {e}): their disk I/O \
         now fails with ENOTCONN, so restart them after `serve` and `recover` (every \
         acknowledged write is kept); {then}",
        held.join(", ")
    ))
}
