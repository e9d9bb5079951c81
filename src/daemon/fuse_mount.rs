//! Mounting the datastore on FUSE: afresh (and handing the connection to
//! its keeper), or by adopting the connection a crashed daemon of the same
//! staging left with the keeper (see `export::fuse::keeper`).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};
use crate::export::fuse::inodes::Inodes;
use crate::export::fuse::keeper::{self, Held, InitParams};
use crate::export::fuse::keeper_watch::{Health, Watch};
use crate::export::fuse::{adopt, RecoverFs, MAX_IO};

/// The staging directory a keeper is named after: canonical, so every
/// daemon of that staging finds the same one.
pub fn keeper_root(staging: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(staging).ok()
}

/// Before the mount point is looked at: the connection the keeper of
/// `staging` holds, to adopt when it is the one at `mount`. A start that
/// would not adopt a connection still mounted, with guests' I/O waiting
/// on it (another `--mount`, or `--no-fuse-keeper`), is refused, saying
/// how to serve it or end it (`fuse-let-go`): one mistyped option must not
/// fail every running VM's disks (review32 L5). A connection no longer
/// mounted (detached), or whose record is lost, is let go, so that mount
/// ends as it did before keepers (ENOTCONN), and the stale mount is
/// detached as usual. While a daemon holds the staging's lock, its keeper
/// is not ours to touch: the start is refused at the lock.
pub fn take_kept(staging: &Path, mount: &Path, keeping: bool) -> Result<Option<Kept>> {
    let Some(root) = keeper_root(staging) else {
        return Ok(None);
    };
    if crate::staging::inventory::lock_holder(&root).is_ok_and(|h| h.is_some()) {
        return Ok(None);
    }
    let (held, fds) = match keeper::take(&root) {
        Ok(Some(k)) => k,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!(
                "could not ask the FUSE keeper of {} for the previous daemon's connection: {e}",
                root.display()
            );
            return Ok(None);
        }
    };
    let mounted = crate::util::mountinfo::at(&crate::util::mountinfo::current(), &held.mount)
        .is_some_and(|m| m.is_recoverfs());
    let here = crate::staging::set::resolve_mount(mount).is_ok_and(|m| m == held.mount);
    let why = match (keeping, mounted, here) {
        // The kernel holds the dead daemon's inode numbers and handles:
        // without their record, an old number could be answered as
        // another VM's disk.
        (true, true, true) => match Inodes::load(&root, true) {
            Ok(_) => {
                tracing::warn!(mount = %held.mount.display(), "adopting the FUSE connection the previous daemon of this staging left: guests' waiting disk I/O is answered again");
                return Ok(Some(Kept { held, fds }));
            }
            Err(e) => format!("its record of inode numbers and open handles is lost ({e})"),
        },
        (_, true, _) => {
            let how = match keeping {
                false => "without --no-fuse-keeper".to_string(),
                true => format!("with --mount {}", held.mount.display()),
            };
            return Err(Error::busy(format!(
                "the FUSE mount {} of this staging is kept for the previous daemon, its guests' disk I/O waiting: serve {how} to answer it, or end it first with `recoverfs fuse-let-go --staging {}` (its open disks then fail)",
                held.mount.display(),
                staging.display()
            )));
        }
        (_, false, _) => "it is no longer mounted there (detached)".into(),
    };
    tracing::warn!(
        "the previous daemon's FUSE mount {} was kept for it; {why}: letting it go (its open disks now fail with ENOTCONN)",
        held.mount.display(),
    );
    drop(fds);
    if let Err(e) = keeper::release(&root) {
        tracing::warn!("the FUSE keeper of {} did not let go: {e}", root.display());
    }
    Ok(None)
}

/// A connection a crashed daemon left with the keeper: its parameters and
/// the device files its event threads read.
pub struct Kept {
    held: Held,
    fds: Vec<OwnedFd>,
}

impl Kept {
    /// Where the connection is mounted.
    pub fn mount(&self) -> &Path {
        &self.held.mount
    }
}

/// A FUSE connection served by one fuser session per event thread, each
/// on its own device file (see `adopt::clone_device`).
pub struct Served {
    sessions: Vec<fuser::BackgroundSession>,
    mount: PathBuf,
    /// Adopted from a crashed daemon: fuser did not mount it, so `stop`
    /// unmounts it.
    adopted: bool,
    /// The mount's `st_dev` when this daemon mounted or adopted it: `stop`
    /// unmounts only the mount that still has it (review32 L10).
    dev: Option<(u32, u32)>,
    /// A copy of a device file: whether the connection still lives.
    device: OwnedFd,
    /// Watches the keeper (`keeper_watch`); None without one.
    watch: Option<Watch>,
    health: Arc<Health>,
}

impl Served {
    /// Mounts `fs` afresh at `mount` with `threads` event threads; with
    /// `keeper_root`, hands every device file to that staging's keeper (a
    /// failure is logged: the daemon serves, but its mount would die with
    /// it). `cfg` must ask fuser for one thread per session.
    pub fn mount(
        fs: RecoverFs,
        mount: &Path,
        cfg: &fuser::Config,
        threads: usize,
        keeper_root: Option<&Path>,
        init: &Arc<OnceLock<InitParams>>,
    ) -> Result<Served> {
        let first = fuser::Session::new(fs.clone(), mount, cfg)
            .map_err(|e| Error::io(format!("mount FUSE at {}", mount.display()), e))?;
        let params = *init
            .get()
            .ok_or_else(|| Error::invalid("the kernel's INIT was not seen"))?;
        let held = Held {
            mount: mount.to_path_buf(),
            init: params,
        };
        let dev = dev_at(mount);
        let sessions = more_sessions(vec![first], &fs, &held.init, cfg, threads)?;
        let (watch, health) = watch(keeper_root, held, &sessions)?;
        Self::spawn(sessions, mount, false, dev, watch, health)
    }

    /// Serves the connection `kept` with `fs`, on its kept device files
    /// and clones up to `threads` (handed to the keeper of `keeper_root`
    /// too). The sessions the kernel's requests name must be resumed
    /// before this is called.
    pub fn adopt(
        fs: RecoverFs,
        kept: Kept,
        cfg: &fuser::Config,
        threads: usize,
        keeper_root: Option<&Path>,
    ) -> Result<Served> {
        let Kept { held, fds } = kept;
        let fds = resend_or_fresh(fds)?;
        let mut sessions = Vec::with_capacity(threads.max(fds.len()));
        for fd in fds {
            sessions.push(adopted_session(fd, &fs, &held.init, cfg)?);
        }
        let sessions = more_sessions(sessions, &fs, &held.init, cfg, threads)?;
        // `take_kept` found the kept connection mounted there.
        let (mount, dev) = (held.mount.clone(), dev_at(&held.mount));
        // Again even with no new clone: a keeper that exited since the
        // take is started anew.
        let (watch, health) = watch(keeper_root, held, &sessions)?;
        Self::spawn(sessions, &mount, true, dev, watch, health)
    }

    fn spawn(
        sessions: Vec<fuser::Session<RecoverFs>>,
        mount: &Path,
        adopted: bool,
        dev: Option<(u32, u32)>,
        watch: Option<Watch>,
        health: Arc<Health>,
    ) -> Result<Served> {
        let device = (sessions[0].as_fd().try_clone_to_owned())
            .map_err(|e| Error::io("duplicate a FUSE device file", e))?;
        let sessions = (sessions.into_iter())
            .map(|s| s.spawn())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::io("start the FUSE session", e))?;
        Ok(Served {
            sessions,
            mount: mount.to_path_buf(),
            adopted,
            dev,
            device,
            watch,
            health,
        })
    }

    /// The keeper's state, for `status`.
    pub fn keeper_health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Stops watching the keeper: from a stop or hand-over on, a keeper
    /// that exits is no loss (and one that exits with the unmount is not
    /// to be replaced).
    pub fn stop_watching(&mut self) {
        self.watch = None;
    }

    /// Whether the connection was adopted from a crashed daemon.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// For notifications to the kernel (any device file of the
    /// connection carries them).
    pub fn notifier(&self) -> fuser::Notifier {
        self.sessions[0].notifier()
    }

    /// How many device files (event threads) the connection is served on.
    pub fn files(&self) -> usize {
        self.sessions.len()
    }

    /// Leaves the mount as it is for the process's exit (a hand-over: the
    /// keeper holds the connection): no unmount, which dropping the first
    /// session of a fresh mount would do; the event threads serve on
    /// until the process ends, and what they had read but not answered is
    /// sent again to the daemon that adopts the connection.
    pub fn leave(mut self) {
        self.stop_watching();
        std::mem::forget(self.sessions);
    }

    /// Unmounts and waits for every event loop to end (each ends when its
    /// device file reports the connection gone). A mount point where
    /// another mount now sits (ours unmounted or detached by hand, maybe
    /// something else mounted there) is not touched: this connection, if
    /// it lives on detached, ends as the process exits and the keeper
    /// lets go.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_watching();
        if let Some(why) = self.not_ours() {
            tracing::warn!(
                "not unmounting {}: {why}; this daemon's FUSE connection ends as it exits",
                self.mount.display()
            );
            std::mem::forget(self.sessions);
            return Ok(());
        }
        let mut sessions = self.sessions.into_iter();
        let first = sessions.next().expect("a session");
        if self.adopted {
            nix::mount::umount2(&self.mount, nix::mount::MntFlags::empty())?;
            first.join()?;
        } else {
            first.umount_and_join()?;
        }
        sessions.try_for_each(|s| s.join())
    }

    /// Why the mount at the mount point is not this connection, if it is
    /// not. Unknown (its dev was not found at the start) counts as ours,
    /// as before this check. The device number of an ended connection may
    /// have gone to a new mount (anonymous numbers are reused, tmpfs takes
    /// them too): only a live connection's number is still its own.
    fn not_ours(&self) -> Option<String> {
        let (major, minor) = self.dev?;
        if keeper::connection_ended(self.device.as_fd()) {
            return Some("this daemon's FUSE connection has ended (unmounted)".into());
        }
        let now = crate::util::mountinfo::current();
        match crate::util::mountinfo::at(&now, &self.mount) {
            None => Some("this daemon's FUSE mount is no longer there".into()),
            Some(m) if m.dev == self.dev && m.is_recoverfs() => None,
            Some(m) => Some(format!(
                "the mount there now ({} {}, device {}) is not this daemon's FUSE connection (device {major}:{minor})",
                m.fs_type,
                m.source,
                m.dev.map_or("?".into(), |(a, b)| format!("{a}:{b}")),
            )),
        }
    }
}

/// The `st_dev` of the mount at `mount` (from mountinfo: stat would ask
/// the FUSE connection itself, which may be waiting for a daemon).
fn dev_at(mount: &Path) -> Option<(u32, u32)> {
    crate::util::mountinfo::at(&crate::util::mountinfo::current(), mount)
        .filter(|m| m.is_recoverfs())
        .and_then(|m| m.dev)
}

/// With `keeper_root`, hands the connection to that staging's keeper and
/// watches it, keeping duplicates of the device files for a hand-over
/// again (`keeper_watch`).
fn watch(
    keeper_root: Option<&Path>,
    held: Held,
    sessions: &[fuser::Session<RecoverFs>],
) -> Result<(Option<Watch>, Arc<Health>)> {
    let Some(root) = keeper_root else {
        let why = "no keeper: the FUSE mount ends with the daemon".to_string();
        return Ok((None, Health::new("off", Some(why))));
    };
    let fds = (sessions.iter())
        .map(|s| s.as_fd().try_clone_to_owned())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io("duplicate a FUSE device file", e))?;
    let health = Health::new("lost", None);
    let watch = Watch::start(root.to_path_buf(), held, fds, health.clone())?;
    Ok((Some(watch), health))
}

/// Has the kernel send again the requests the dead daemon had read but not
/// answered (`adopt::resend`), before any session reads; the kept device
/// files are then served. A kernel that cannot (before 6.9) would leave
/// those requests on the kept files' processing lists for the life of the
/// mount, their callers in uninterruptible sleep (review32 H2): instead
/// the connection is served on a fresh clone, and the kept files are
/// closed (ours here, the keeper's when it is handed the fresh ones), so
/// the kernel ends those requests with an error (ECONNABORTED) and their
/// callers see a failed I/O, not a hang.
fn resend_or_fresh(fds: Vec<OwnedFd>) -> Result<Vec<OwnedFd>> {
    let Err(e) = adopt::resend(fds[0].as_fd()) else {
        return Ok(fds);
    };
    tracing::error!("{e}: the requests the previous daemon read but did not answer fail (ECONNABORTED) instead of waiting for good; the connection is served on fresh device files");
    Ok(vec![adopt::clone_device(fds[0].as_fd())?])
}

/// Adds sessions on clones of the first one's device file until there are
/// `threads` (at most `keeper::MAX_FDS`).
fn more_sessions(
    mut sessions: Vec<fuser::Session<RecoverFs>>,
    fs: &RecoverFs,
    init: &InitParams,
    cfg: &fuser::Config,
    threads: usize,
) -> Result<Vec<fuser::Session<RecoverFs>>> {
    let threads = threads.clamp(1, keeper::MAX_FDS);
    while sessions.len() < threads {
        let device = adopt::clone_device(sessions[0].as_fd())?;
        sessions.push(adopted_session(device, fs, init, cfg)?);
    }
    Ok(sessions)
}

/// A fuser session on device file `fd` of a connection whose INIT was
/// answered already (a clone, or a kept file).
fn adopted_session(
    fd: OwnedFd,
    fs: &RecoverFs,
    init: &InitParams,
    cfg: &fuser::Config,
) -> Result<fuser::Session<RecoverFs>> {
    adopt::session(fd, init, MAX_IO, |fd| {
        fuser::Session::from_fd(fs.clone(), fd, cfg.acl, cfg.clone())
    })
}

/// `recoverfs fuse-let-go`: the keeper of `staging` lets its connection
/// go, unless a daemon serves that staging (its stop is the way then);
/// returns the mount point that ended.
pub fn let_go(staging: &Path) -> Result<PathBuf> {
    let root = std::fs::canonicalize(staging)
        .map_err(|e| Error::io(format!("resolve {}", staging.display()), e))?;
    if let Some(pid) = crate::staging::inventory::lock_holder(&root)? {
        return Err(Error::busy(format!(
            "a recoverfs daemon (pid {pid}) serves {}: stop it (SIGTERM) instead",
            root.display()
        )));
    }
    match keeper::take(&root)? {
        Some((held, _)) => {
            keeper::release(&root)?;
            Ok(held.mount)
        }
        None => Err(Error::not_found(format!(
            "no FUSE keeper holds a connection for {}",
            root.display()
        ))),
    }
}

/// Whether the keeper of staging `root` holds the connection mounted at
/// `mount` with `files` device files (every event thread's), so the
/// daemon may exit and leave it there.
pub fn keeper_holds(root: &Path, mount: &Path, files: usize) -> bool {
    match keeper::take(root) {
        Ok(Some((held, fds))) => held.mount == mount && fds.len() >= files,
        Ok(None) => false,
        Err(e) => {
            tracing::warn!("could not ask the FUSE keeper of {}: {e}", root.display());
            false
        }
    }
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
