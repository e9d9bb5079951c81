//! The datastore mounted on FUSE, with the threads that flush it and
//! check its backups: what `serve` runs behind its API, and what
//! `verify-boot` runs in-process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::fuse_mount;
use super::MountOptions;
use crate::error::Result;
use crate::export::fuse::RecoverFs;
use crate::repo::Repository;
use crate::session::Datastore;
use crate::staging::StagingSet;
use crate::util::mountinfo;

/// A datastore mounted on FUSE with its background flusher: what `serve`
/// runs behind its API, and what `verify-boot` runs in-process.
pub struct MountedDatastore {
    pub ds: Arc<Datastore>,
    fuse: fuse_mount::Served,
    background: Background,
    mount: PathBuf,
    /// The staging whose keeper holds the connection too (`fuse_keeper`).
    keeper_root: Option<PathBuf>,
}

impl MountedDatastore {
    /// `mount` must have passed `check_mount_point`.
    pub fn start(
        repo: Arc<Repository>,
        staging: StagingSet,
        mount: &Path,
        opts: &MountOptions,
    ) -> Result<Self> {
        Self::start_kept(repo, staging, mount, opts, None)
    }

    /// As `start`; `kept`: the connection a crashed daemon left with the
    /// keeper, served instead of a new mount (`fuse_mount::take_kept`).
    pub fn start_kept(
        repo: Arc<Repository>,
        staging: StagingSet,
        mount: &Path,
        opts: &MountOptions,
        kept: Option<fuse_mount::Kept>,
    ) -> Result<Self> {
        let ds = Datastore::new(
            repo,
            staging,
            mount,
            opts.fetches_in_flight,
            opts.prefetch.clone(),
            opts.placement.clone(),
        );
        if opts.throwaway {
            ds.set_throwaway();
        }
        // FUSE's background requests and io threads match the GETs the
        // fetch engine keeps in flight (at least 64).
        let mut keeper_root = if opts.fuse_keeper {
            fuse_mount::keeper_root(ds.staging_root())
        } else {
            None
        };
        let mut fs = RecoverFs::new(
            ds.clone(),
            opts.fetches_in_flight.max(64),
            opts.owner,
            opts.fuse_passthrough,
        );
        if let Some(root) = keeper_root.clone() {
            use crate::export::fuse::inodes::Inodes;
            // A fresh mount whose tables cannot be kept is not kept either
            // (review32 L6): a daemon adopting it would not know its open
            // disks, and might take an older connection's table for its.
            let inodes = match kept.is_some() {
                true => Ok(Inodes::kept_in(&root, true)),
                false => Inodes::load(&root, false),
            };
            match inodes {
                Ok(inodes) => fs = fs.with_inodes(inodes),
                Err(e) => {
                    tracing::warn!("the FUSE inode and handle tables cannot be kept in staging ({e}): mounting without a keeper, so this mount ends with the daemon");
                    keeper_root = None;
                }
            }
        }
        let init_params = fs.init_params();
        let inodes = fs.inodes();
        let notifier_slot = fs.notifier_slot();
        let mut options = vec![
            fuser::MountOption::FSName(mountinfo::RECOVERFS_SOURCE.into()),
            fuser::MountOption::Subtype("recoverfs".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoAtime,
            fuser::MountOption::RW,
        ];
        if opts.allow_other {
            options.push(fuser::MountOption::CUSTOM("allow_other".into()));
        }
        let mut cfg = fuser::Config::default();
        cfg.mount_options = options;
        cfg.acl = if opts.allow_other {
            fuser::SessionACL::All
        } else {
            fuser::SessionACL::Owner
        };
        // fuser runs one thread per session: the daemon makes a session
        // per event thread, each on its own clone of the device file.
        cfg.n_threads = Some(1);
        let threads = opts.fuse_threads.max(1);
        let adopted = kept.is_some();
        let fuse = match kept {
            Some(kept) => {
                // The kernel's requests name these sessions' inodes.
                ds.resume_active();
                fuse_mount::Served::adopt(fs, kept, &cfg, threads, keeper_root.as_deref())?
            }
            None => fuse_mount::Served::mount(
                fs,
                mount,
                &cfg,
                threads,
                keeper_root.as_deref(),
                &init_params,
            )?,
        };
        ds.set_fuse_keeper(fuse.keeper_health());
        let notifier = fuse.notifier();
        let _ = notifier_slot.set(notifier.clone());
        ds.add_on_release(Box::new(move |s| {
            let _ = notifier.inval_entry(fuser::INodeNo(1), std::ffi::OsStr::new(&s.vm));
            inodes.forget(&s.dir);
        }));
        if !adopted {
            ds.resume_active();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = spawn_flusher(ds.clone(), stop.clone(), opts.flush_interval);
        let checker = spawn_backup_checker(ds.clone(), stop.clone());
        Ok(MountedDatastore {
            ds,
            fuse,
            background: Background {
                stop,
                flusher,
                checker,
            },
            mount: mount.to_path_buf(),
            keeper_root,
        })
    }

    /// After the rest of a start failed: an adopted connection is left
    /// with its keeper (durable first), so the guests waiting on it are
    /// answered by the next `serve` instead of failing; anything else
    /// stops as `shutdown` does.
    pub fn stop_after_failed_start(mut self) -> Result<()> {
        if !(self.fuse.adopted() && self.keeper_root.is_some()) {
            return self.shutdown();
        }
        self.fuse.stop_watching();
        let flush = self.background.end_and_flush(&self.ds);
        tracing::warn!(mount = %self.mount.display(), "the FUSE mount stays with its keeper: the next `serve` adopts it");
        flush
    }

    /// A hand-over for a restart (SIGUSR2, `daemon::signals`): durable
    /// first, as at a clean stop, but the FUSE mount stays with its keeper
    /// and the next `serve` of this staging adopts it, so guests' FUSE I/O
    /// waits instead of failing. A mount no keeper holds in full stops as
    /// at SIGTERM. Exiting with event threads still serving is safe: every
    /// write's changed bit is durable before its data, and its data at the
    /// reply to the guest's fsync (`lib.rs`), as at a crash.
    pub fn hand_over(mut self) -> Result<()> {
        // A keeper replaced from here on would not be asked below.
        self.fuse.stop_watching();
        let held = self
            .keeper_root
            .as_deref()
            .is_some_and(|r| fuse_mount::keeper_holds(r, &self.mount, self.fuse.files()));
        if !held {
            tracing::warn!(
                "SIGUSR2: no FUSE keeper holds this mount (--no-fuse-keeper, or it could not be handed over): stopping as at SIGTERM"
            );
            return self.shutdown();
        }
        let flush = self.background.end_and_flush(&self.ds);
        tracing::warn!(mount = %self.mount.display(), "the FUSE mount stays with its keeper: guests' FUSE I/O waits until the next `serve` of this staging adopts it");
        self.fuse.leave();
        flush
    }

    /// Durable first, then unmount: a guest still running sees ENOTCONN,
    /// never lost writes; an unmount refused because disks are open names
    /// their VMs and detaches the mount (`unmount_refused`).
    pub fn shutdown(self) -> Result<()> {
        let flush = self.background.end_and_flush(&self.ds);
        let unmounted = self.fuse.stop();
        if let Some(root) = &self.keeper_root {
            fuse_mount::release_keeper(root);
        }
        let unmount = unmounted.map_err(|e| {
            let held: Vec<String> = (self.ds.sessions().iter())
                .filter(|s| s.open_handles() > 0)
                .map(|s| s.vm.clone())
                .collect();
            fuse_mount::unmount_refused(&self.mount, e, &held)
        });
        flush?;
        unmount
    }
}

/// The daemon's periodic threads, stopped together.
struct Background {
    stop: Arc<AtomicBool>,
    flusher: std::thread::JoinHandle<()>,
    checker: std::thread::JoinHandle<()>,
}

impl Background {
    /// Stops the flusher, the backup checker and the datastore's background
    /// jobs, then makes staging durable. A disk that failed earlier is
    /// skipped by the flush: its lost writes must still end the daemon
    /// with an error, not exit 0.
    fn end_and_flush(self, ds: &Datastore) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        let _ = self.flusher.join();
        let _ = self.checker.join();
        ds.stop_background();
        ds.flush_all()
            .and_then(|()| ds.first_failure().map_or(Ok(()), Err))
    }
}

fn spawn_flusher(
    ds: Arc<Datastore>,
    stop: Arc<AtomicBool>,
    every: Duration,
) -> std::thread::JoinHandle<()> {
    spawn_every("flusher", stop, every, move || {
        let _ = ds.flush_all();
    })
}

/// Checks every few seconds that the sessions' backups still exist (on
/// its own thread: the repository may be slow, flushes must not wait).
fn spawn_backup_checker(ds: Arc<Datastore>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    spawn_every(
        "backup-check",
        stop,
        crate::session::BACKUP_CHECK_EVERY,
        move || ds.check_backups(),
    )
}

/// A thread running `f` every `every` until `stop`.
fn spawn_every(
    name: &str,
    stop: Arc<AtomicBool>,
    every: Duration,
    f: impl Fn() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let tick = Duration::from_millis(100);
            let mut waited = Duration::ZERO;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(tick);
                waited += tick;
                if waited >= every {
                    waited = Duration::ZERO;
                    f();
                }
            }
        })
        .expect("spawn a daemon thread")
}
