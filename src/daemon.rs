//! `recoverfs serve`: opens repository and staging (every export point's
//! too), checks the mount point and socket, mounts FUSE, runs the control API and a periodic flusher,
//! and on SIGINT/SIGTERM makes staging durable before unmounting; on
//! SIGUSR2 it makes staging durable and leaves the FUSE mount with its
//! keeper for the next `serve` (`signals`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::session::Datastore;
use crate::staging::StagingSet;

mod exports_moved;
mod fuse_mount;
mod mount_point;
mod mounted;
mod open_repository;
mod signals;

pub use fuse_mount::let_go as fuse_let_go;
pub use mount_point::check_mount_point;
use mount_point::detach_previous_mount;
pub use mounted::MountedDatastore;
use open_repository::open_repository;
pub use signals::defer_hand_over;

pub struct ServeOptions {
    pub repo: String,
    pub staging: PathBuf,
    /// `--staging-lost`: staging directories whose disk is gone for good;
    /// found empty, their sessions' pins are removed (see `StagingSet`).
    pub staging_lost: Vec<PathBuf>,
    pub mount: PathBuf,
    pub socket: Option<PathBuf>,
    /// Members of this group (a gid) may use the control socket too.
    pub socket_group: Option<u32>,
    pub datastore: MountOptions,
    /// The NFSv3 export, if asked for.
    pub nfs: Option<crate::export::nfs::NfsOptions>,
    /// Where NBD is served (none: not at all).
    pub nbd: Vec<crate::export::nbd::Listen>,
    /// Client networks allowed on NBD over TCP (`--allow`; NFS has its
    /// copy in `nfs`).
    pub allow: Vec<ipnet::IpNet>,
    /// Benchmarks: a delay added to every chunk read from the repository.
    pub repo_delay: Option<Duration>,
    /// Bounds of every staging directory (see `staging::budget`).
    pub staging_limits: StagingLimits,
}

/// `--staging-max` and `--staging-reserve` (0: none), applied to each
/// staging directory on its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct StagingLimits {
    pub max: u64,
    pub reserve: u64,
}

/// How a datastore is mounted and run, whoever hosts it.
pub struct MountOptions {
    pub allow_other: bool,
    /// Owner (uid, gid) of the files on the mount: the user a hypervisor
    /// runs as. Default: the daemon's user.
    pub owner: Option<(u32, u32)>,
    pub fetches_in_flight: usize,
    pub fuse_threads: usize,
    /// Kernel FUSE passthrough for read-only opens of complete disks (see
    /// `export::fuse::passthrough`; writable opens are refused meanwhile).
    pub fuse_passthrough: bool,
    /// Keep the FUSE connection across a crash (see `export::fuse::keeper`).
    pub fuse_keeper: bool,
    /// How often staged presence maps are made durable without an fsync.
    pub flush_interval: Duration,
    pub prefetch: crate::prefetch::PrefetchOptions,
    /// Export points and how recoveries are placed on them.
    pub placement: crate::session::PlacementConfig,
    /// A throwaway recovery's datastore (`files`, `verify-boot`): its
    /// sessions end with this process (see `Datastore::set_throwaway`).
    pub throwaway: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            owner: None,
            fetches_in_flight: 64,
            fuse_threads: 4,
            fuse_passthrough: false,
            fuse_keeper: false,
            flush_interval: Duration::from_secs(2),
            prefetch: Default::default(),
            placement: Default::default(),
            throwaway: false,
        }
    }
}

/// Raises the soft limit of open files to the hard limit: the daemon is a
/// file server, and at the usual soft 1024 a few hundred client
/// connections leave no descriptor for opening repository files (guests
/// would get EIO). A failure is logged, not fatal: the old limit stays.
fn raise_open_files_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or fill the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 || l.rlim_cur >= l.rlim_max {
            return;
        }
        let old = l.rlim_cur;
        l.rlim_cur = l.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("cannot raise the open files limit from {old}: {e}");
        }
    }
}

pub fn serve(opts: ServeOptions) -> Result<()> {
    crate::util::limit_malloc_arenas();
    raise_open_files_limit();
    let repo = open_repository(&opts)?;
    // Before the mount point is looked at: a kept mount answers nothing
    // until a daemon serves it (see `export::fuse::keeper`).
    let kept = fuse_mount::take_kept(&opts.staging, &opts.mount, opts.datastore.fuse_keeper)?;
    let mount = match &kept {
        Some(k) => k.mount().to_path_buf(),
        None => check_mount_point(&opts.mount)?,
    };
    // Before a new staging directory is made: a refusal leaves nothing.
    if let Some(s) = &opts.socket {
        check_socket(s)?;
    }
    let points: Vec<(&str, Option<&Path>)> = opts
        .datastore
        .placement
        .points
        .iter()
        .map(|p| (p.name.as_str(), p.staging.as_deref()))
        .collect();
    let limits = &opts.staging_limits;
    let roots = std::iter::once(opts.staging.as_path()).chain(points.iter().filter_map(|p| p.1));
    for root in roots {
        crate::staging::budget::check_limits(root, limits.max, limits.reserve)?;
    }
    let staging = StagingSet::open(&opts.staging, &mount, &points, &repo, &opts.staging_lost)?;
    // The staging is locked: its previous daemon is gone.
    let main_root = staging.main().root().to_path_buf();
    detach_previous_mount(&main_root, &mount);
    for dir in staging.all() {
        dir.budget().set_limits(limits.max, limits.reserve);
        dir.budget().warn_if_small();
    }
    let socket = opts
        .socket
        .clone()
        .unwrap_or_else(|| staging.main().root().join("control.sock"));
    check_socket(&socket)?;
    // The default link must name it from anywhere.
    let socket = std::path::absolute(&socket).unwrap_or(socket);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("export")
        .build()
        .ctx(|| "start the export runtime".into())?;
    let mounted =
        MountedDatastore::start_kept(repo.clone(), staging, &mount, &opts.datastore, kept)?;
    if let Err(e) = crate::staging::last_mount::write(&main_root, &mount) {
        tracing::warn!("could not record the mount point in the staging directory (a later daemon there with another --mount will not detach this one if it is left dead): {e}");
    }
    let exports = match Exports::start(&rt, &mounted.ds, &opts) {
        Ok(e) => e,
        Err(e) => {
            let _ = mounted.stop_after_failed_start();
            return Err(e);
        }
    };
    // Resumed sessions' clients attached where the previous daemon served
    // are named if those addresses are gone (explore9 M6).
    exports_moved::check_and_record(&main_root, &mounted.ds, &exports.served);
    tracing::info!(repo = %repo.location(), mount = %mount.display(), socket = %socket.display(), "serving");
    // Pre-copy jobs keep their state beside the sessions.
    let jobs = Arc::new(crate::precopy::Jobs::new(
        repo.clone(),
        mounted.ds.staging_root().join("precopy"),
    ));
    // The jobs a previous daemon ran (each logged; none stops the daemon).
    jobs.restore(&crate::api::peer::PeerPolicy::for_daemon(opts.socket_group));
    // The start's own requests are made: a store that was away for them
    // is asked again at the next request (`repo::unconfirmed`).
    repo.backend().end_of_start();
    let hand_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Test seam: a start that has mounted but not yet handled signals.
    if let Some(ms) = std::env::var("RECOVERFS_FAULT_PAUSE_BEFORE_API_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let api_result = run_api(
        mounted.ds.clone(),
        jobs.clone(),
        &socket,
        opts.socket_group,
        &hand_over,
    );
    // From here on a store that does not answer (or not as the
    // repository) must not hold the stop for minutes: what the stop
    // still asks of it (pins, profiles, lock removals) is time-boxed or
    // skipped, and logged (`Backend::begin_shutdown`).
    repo.backend().begin_shutdown();
    jobs.shutdown();
    let _ = std::fs::remove_file(&socket);
    if let Ok(Some(link)) = &api_result {
        unpublish_default_socket(link, &socket);
    }
    // Clients go first (their attachments end), then staging is made durable.
    exports.shutdown();
    // Clients that reattached since the start are stranded no more.
    exports_moved::at_stop(&main_root, &mounted.ds);
    let stopped = match hand_over.load(std::sync::atomic::Ordering::Acquire) {
        true => mounted.hand_over(),
        false => mounted.shutdown(),
    };
    // A request abandoned above (a live backup runs in its request's
    // thread, which the process does not wait for) still holds its writer
    // lock: removed, as a signalled CLI backup removes its own, so another
    // host's gc does not wait for it to go stale (explore7 L4). Its
    // manifest is never published after that (`locks::release_all`).
    let released = crate::repo::locks::release_all(Duration::from_secs(2));
    if released > 0 {
        tracing::info!("removed {released} repository lock(s) of work abandoned at the stop");
    }
    tracing::info!("stopped");
    api_result?;
    stopped
}

/// The network frontends a daemon runs beside its FUSE mount.
struct Exports {
    nfs: Vec<crate::export::nfs::NfsServer>,
    nbd: Vec<crate::export::nbd::NbdServer>,
    /// Where each export point serves (`staging::last_exports`).
    served: std::collections::BTreeMap<String, crate::staging::last_exports::Served>,
}

impl Exports {
    /// Every export point's frontends: a point with its own address serves
    /// NFS (and 111) and NBD there; the default point serves on `--nfs` and
    /// `--nbd`. Both serve only the `--allow` networks over TCP.
    fn start(
        rt: &tokio::runtime::Runtime,
        ds: &Arc<Datastore>,
        opts: &ServeOptions,
    ) -> Result<Exports> {
        let mut started = Exports {
            nfs: vec![],
            nbd: vec![],
            served: Default::default(),
        };
        for p in ds.points() {
            let (nfs, nbd) = match (p.spec.nfs_addr(), p.spec.nbd_addr()) {
                (Some(n), Some(b)) => (
                    opts.nfs.clone().map(|mut o| {
                        o.listen = vec![n];
                        o
                    }),
                    vec![crate::export::nbd::Listen::Tcp(b)],
                ),
                _ => (opts.nfs.clone(), opts.nbd.clone()),
            };
            if let Err(e) = started.start_point(rt, ds, p, nfs, &nbd, &opts.allow) {
                started.shutdown();
                return Err(e.context(format!("export point {}", p.name())));
            }
        }
        Ok(started)
    }

    fn start_point(
        &mut self,
        rt: &tokio::runtime::Runtime,
        ds: &Arc<Datastore>,
        point: &Arc<crate::placement::ExportPoint>,
        nfs: Option<crate::export::nfs::NfsOptions>,
        nbd: &[crate::export::nbd::Listen],
        allow: &[ipnet::IpNet],
    ) -> Result<()> {
        let mut urls = crate::session::ExportUrls::default();
        let mut served = crate::staging::last_exports::Served::default();
        let name = point.name();
        if let Some(o) = nfs {
            let listen = o.listen.clone();
            let server =
                crate::export::nfs::NfsServer::start(rt.handle(), ds.clone(), point.clone(), o)?;
            self.nfs.push(server);
            for a in &listen {
                served.nfs.push(a.to_string());
                urls.nfs.push(match a.ip() {
                    std::net::IpAddr::V6(ip) => format!("nfs://[{ip}]"),
                    ip => format!("nfs://{ip}"),
                });
                tracing::info!(export_point = name, address = %a, "NFS export serving (portmapper on port 111 too)");
            }
        }
        if !nbd.is_empty() {
            let exports = Arc::new(crate::export::DiskExports {
                ds: ds.clone(),
                point: point.clone(),
            });
            let server = crate::export::nbd::NbdServer::start(rt.handle(), nbd, exports, allow)?;
            let mut tcp = server.tcp_addrs().into_iter();
            for l in nbd {
                match l {
                    crate::export::nbd::Listen::Tcp(_) => {
                        let a = tcp.next().expect("one bound address per TCP listener");
                        served.nbd.push(a.to_string());
                        urls.nbd.push(format!("nbd://{a}"));
                        tracing::info!(export_point = name, address = %a, "NBD export serving");
                    }
                    crate::export::nbd::Listen::Unix(p) => {
                        served.nbd.push(format!("unix:{}", p.display()));
                        urls.nbd
                            .push(format!("nbd+unix:///?socket={}", p.display()));
                        tracing::info!(export_point = name, socket = %p.display(), "NBD export serving");
                    }
                }
            }
            self.nbd.push(server);
        }
        ds.set_urls(name, urls);
        self.served.insert(name.into(), served);
        Ok(())
    }

    fn shutdown(self) {
        for n in self.nbd {
            n.shutdown();
        }
        for n in self.nfs {
            n.shutdown();
        }
    }
}

/// Serves the control API until SIGINT/SIGTERM/SIGUSR2 (which sets
/// `hand_over`); returns the default socket link it published, if any,
/// for removal.
fn run_api(
    ds: Arc<Datastore>,
    jobs: Arc<crate::precopy::Jobs>,
    socket: &Path,
    group: Option<u32>,
    hand_over: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Option<PathBuf>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("api")
        .build()
        .ctx(|| "start the control API runtime".into())?;
    let r = rt.block_on(async {
        // Handlers first: a SIGTERM as soon as the socket answers must
        // stop the daemon cleanly, not kill it (a test's stop did).
        let handlers = signals::Handlers::install();
        let listener = crate::api::peer::bind(socket, group)?;
        let listener = crate::api::peer::CheckedListener::new(
            listener,
            crate::api::peer::PeerPolicy::for_daemon(group),
        );
        let link = publish_default_socket(&default_socket_link(), socket);
        // 1: the first signal, 2: a second one.
        let (count, mut seen) = tokio::sync::watch::channel(0u8);
        tokio::spawn(signals::count(count, handlers, hand_over.clone()));
        let mut first = seen.clone();
        let shutdown = async move {
            let _ = first.wait_for(|n| *n >= 1).await;
        };
        let api = crate::api::serve(ds, jobs, listener, shutdown);
        // Requests in flight (a live backup can run for hours) get
        // `SHUTDOWN_GRACE`; a second signal ends the wait at once.
        let abandon = async move {
            let _ = seen.wait_for(|n| *n >= 1).await;
            tokio::select! {
                _ = tokio::time::sleep(SHUTDOWN_GRACE) => {}
                _ = seen.wait_for(|n| *n >= 2) => {}
            }
        };
        tokio::select! {
            r = api => r.ctx(|| "control API".into())?,
            _ = abandon => tracing::warn!(
                "requests still in flight are abandoned (their clients get an error); staging is made durable now"
            ),
        }
        Ok(link)
    });
    // Not waiting for abandoned requests' threads: the process ends.
    rt.shutdown_timeout(Duration::from_millis(100));
    r
}

/// How long a stopping daemon waits for control requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Where clients look when no --socket is given: a link to the first
/// running daemon's socket.
pub fn default_socket_link() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        // SAFETY: geteuid cannot fail and touches no memory.
        Some(d) if unsafe { libc::geteuid() } != 0 => PathBuf::from(d).join("recoverfs.sock"),
        _ => PathBuf::from("/run/recoverfs.sock"),
    }
}

/// Points the default link at our socket unless another live daemon owns it.
fn publish_default_socket(link: &Path, socket: &Path) -> Option<PathBuf> {
    let link = link.to_path_buf();
    // Left by this daemon's previous run (killed): it names our socket,
    // which answers because we already listen.
    if std::fs::read_link(&link).is_ok_and(|t| t == socket) {
        return Some(link);
    }
    if std::os::unix::net::UnixStream::connect(&link).is_ok() {
        let other = std::fs::read_link(&link).unwrap_or_else(|_| link.clone());
        tracing::warn!(
            "the default link {} names another running daemon ({}): clients of this one must pass --socket {}",
            link.display(),
            other.display(),
            socket.display()
        );
        return None;
    }
    // Only a link or a dead socket is ours to replace.
    let replaceable = std::fs::symlink_metadata(&link).map_or(true, |m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_symlink() || m.file_type().is_socket()
    });
    if !replaceable {
        return None;
    }
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(socket, &link).ok().map(|_| link)
}

/// Removes the default link if it still names `socket`: another daemon
/// may have taken it since (if ours had stopped answering for a while).
fn unpublish_default_socket(link: &Path, socket: &Path) {
    if std::fs::read_link(link).is_ok_and(|t| t == socket) {
        let _ = std::fs::remove_file(link);
    }
}

/// A socket file whose daemon answers is in use; a dead one is removed.
/// Anything else at the path is refused and left alone (a mistyped
/// `--socket` must never delete a key file), as is a socket we may not
/// connect to (another user's daemon).
fn check_socket(socket: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = socket.parent() {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            return Err(Error::not_found(format!(
                "socket directory {} does not exist",
                dir.display()
            )));
        }
    }
    let m = match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("--socket {}", socket.display()), e)),
        Ok(m) => m,
    };
    if !m.file_type().is_socket() {
        return Err(Error::invalid(format!(
            "--socket {} exists and is not a socket; refusing to replace it",
            socket.display()
        )));
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Err(Error::busy(format!(
            "socket {} is already served by a running recoverfs daemon",
            socket.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(socket).ctx(|| format!("remove stale socket {}", socket.display()))
        }
        Err(e) => Err(Error::busy(format!(
            "socket {} cannot be checked ({e}): another user's daemon? choose another --socket",
            socket.display()
        ))),
    }
}

#[cfg(test)]
mod tests;
