//! The datastore: the set of live recovery sessions a daemon serves. A
//! session is one VM recovered from one backup: its volumes, its config
//! file and the bookkeeping that makes `release` safe.
//!
//! **Locking.** Recover, release, discard, relocate and live backup
//! (`backup`) of one VM run one at a time under that VM's operation lock, which may be held across
//! repository I/O. The daemon-wide session table is locked only to look up,
//! insert or remove an entry, never across I/O: recoveries of many VMs run
//! in parallel, and path lookups never wait on the repository.
//!
//! **Kept staging is never hidden.** `recover VM` resumes the VM's newest
//! kept session unless its backup is definitely gone from the repository;
//! a repository that cannot answer is not "gone". Each session keeps a copy
//! of its manifest, so it resumes even while the repository is unreachable.
//!
//! **Staging directories.** Each export point stages new sessions in its
//! own directory (`staging=`) or the main one (`--staging`). Kept sessions
//! are looked for in every one of them, and a session always stays in the
//! directory it was created in: a kept session is placed only among the
//! points staging there, and after a restart a session is served at its
//! recorded point if that point still stages where the session is, else at
//! the first point that does, else at the first point (reading on from
//! where it is).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::placement::{Decision, ExportPoint};
use crate::prefetch::feeder::Feeder;
use crate::prefetch::profile::{self, DiskTrace, Recording};
use crate::prefetch::{PrefetchOptions, SchedulerStatus};
use crate::relocate::{NotResumed, Relocation, RelocationStatus};
use crate::repo::Repository;
use crate::staging::{StagingDir, StagingSet};
use crate::util::validate_name;
use crate::volume::{DiskStatus, Volume};

pub struct Session {
    pub vm: String,
    pub backup: String,
    pub config_json: Vec<u8>,
    pub disks: Vec<Arc<Volume>>,
    /// Unique per daemon run: frontends key their handles on it, so a
    /// handle of a released session never reaches a later one.
    pub serial: u64,
    pub started: SystemTime,
    pub resumed: bool,
    /// The session's staging directory.
    pub dir: PathBuf,
    /// The staging directory `dir` is in: its export point's, or for kept
    /// staging the one it was found in.
    pub staging: Arc<StagingDir>,
    pub relocation: Mutex<Option<Arc<Relocation>>>,
    /// A relocation recorded but not reopened by a restarted daemon (see
    /// `relocate::not_resumed`); never set while `relocation` is. Both
    /// change only under the VM's operation lock.
    pub relocation_not_resumed: Mutex<Option<NotResumed>>,
    /// The export point it is served at, and the hypervisor it was
    /// placed for.
    pub point: Arc<ExportPoint>,
    pub host: Option<String>,
    /// `host`'s address, resolved once when the session was placed.
    pub host_ip: Option<std::net::IpAddr>,
    feeder: OnceLock<Feeder>,
    /// The recording was saved (or must not be): at most once per session.
    profile_done: AtomicBool,
    /// A throwaway recovery (`files`, `verify-boot`): its reads are what a
    /// restore or a check needs, not the VM's boot, so the background
    /// paths never save them as a profile; only `verify-boot` does, after
    /// a boot it verified (explore9 M1: a `files` run longer than the
    /// recording window saved one, and the next recovery followed it).
    throwaway: bool,
    /// Open disk handles and whether the session was released, under one
    /// lock so an open can never slip past a release.
    state: Mutex<OpenState>,
    /// A network frontend attached to it in this daemon run (`attach`).
    network: Mutex<NetworkAttach>,
    /// Which backup the disks' dirty maps are relative to (live backups).
    pub(crate) backup_base: Mutex<backup::BackupBase>,
    /// A live backup of this session is running.
    backup_running: AtomicBool,
    /// How far it is.
    pub(crate) backup_progress: backup::LiveProgress,
    /// The session uploader, if started (`upload`).
    upload: Mutex<Option<upload::Job>>,
    /// Held by the uploader for each batch and by a live backup for its
    /// whole run: no upload is recorded while a backup runs.
    upload_gate: Mutex<()>,
    /// Set when its backup is gone from the repository (`pinning`).
    backup_gone: Mutex<Option<String>>,
    /// Why the repository did not answer the last check (`pinning`).
    repo_unreachable: Mutex<Option<String>>,
    /// Its last pin write failed: `check_backups` writes it again.
    pin_owed: AtomicBool,
}

#[derive(Default)]
struct OpenState {
    open: holders::Holders,
    released: bool,
}

/// Runs at a session's first network attach over one frontend
/// (`daemon::exports_moved`).
type OnAttach = Box<dyn FnOnce(&Session) + Send>;

/// The frontends (NFS, NBD) that attached since this daemon started, and
/// what runs at the first attach over each.
#[derive(Default)]
struct NetworkAttach {
    seen: Vec<holders::Frontend>,
    first: Vec<(holders::Frontend, OnAttach)>,
}

/// An open handle held by a frontend (an NFS client using the VM, an NBD
/// connection with a disk open): release refuses while any exists.
pub struct Attachment(Arc<Session>, u64);

impl Attachment {
    pub fn session(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.close_handle(self.1);
    }
}

impl Session {
    /// Holds the session open for a network frontend (NFS, NBD; `by` names
    /// the client): `release` refuses while it is held. It is no attach
    /// until the client changes a disk (`attached`, review30 M2).
    pub fn hold(self: &Arc<Self>, by: Holder) -> Option<Attachment> {
        self.open_handle(by).map(|id| Attachment(self.clone(), id))
    }

    /// Counts an open file handle held by `by`, returning the id that
    /// closes it; `None` once the session is released.
    pub fn open_handle(&self, by: Holder) -> Option<u64> {
        let mut s = self.state.lock();
        if s.released {
            return None;
        }
        Some(s.open.add(by))
    }

    pub fn close_handle(&self, id: u64) {
        self.state.lock().open.remove(id);
    }

    /// Who holds the session's disks open.
    pub fn holders(&self) -> Vec<Holder> {
        self.state.lock().open.list()
    }

    /// What a relocation of this session copies (`relocate::Source`).
    pub(crate) fn relocation_source(&self) -> crate::relocate::Source<'_> {
        crate::relocate::Source {
            storage: self.staging.storage(),
            vm: &self.vm,
            disks: &self.disks,
            config_json: &self.config_json,
            session_dir: &self.dir,
        }
    }

    pub fn open_handles(&self) -> u64 {
        self.state.lock().open.len()
    }

    /// Saves what this session's guest read as a new recording of the
    /// VM's profile, once; `false` if already done or nothing was read.
    pub fn save_profile(&self, repo: &Repository, source: &str) -> Result<bool> {
        if self.profile_done.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        let disks: Vec<DiskTrace> = self
            .disks
            .iter()
            .map(|d| DiskTrace {
                index: d.index,
                block_size: d.block_size(),
                accesses: d.tracker.accesses(d.chunks()),
            })
            .collect();
        let blocks: usize = disks.iter().map(|d| d.accesses.len()).sum();
        if blocks == 0 {
            return Ok(false);
        }
        let rec = Recording {
            recorded: crate::util::rfc3339(crate::util::now_unix()),
            backup: self.backup.clone(),
            source: source.into(),
            disks,
        };
        profile::append(repo, &self.vm, rec)?;
        tracing::info!(vm = %self.vm, blocks, source, "operational profile recorded");
        Ok(true)
    }

    /// `save_profile` for background paths (release, shutdown, window
    /// end): a profile is an optimisation, so a failure is logged, not fatal.
    pub fn save_profile_logged(&self, repo: &Repository) {
        if self.throwaway {
            return;
        }
        if let Err(e) = self.save_profile(repo, "session") {
            tracing::warn!(vm = %self.vm, "could not save the operational profile: {e}");
        }
    }

    /// This session's reads must not become a profile (a failed verify).
    pub fn discard_profile(&self) {
        self.profile_done.store(true, Ordering::Release);
    }

    fn stop_prefetch(&self) {
        if let Some(f) = self.feeder.get() {
            f.stop();
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SessionStatus {
    pub vm: String,
    pub backup: String,
    pub export_point: String,
    /// Per disk, the NFS and NBD URLs that reach it (as `recover` said).
    pub urls: Vec<Vec<String>>,
    /// A live backup (`backup --session`) of it is running now.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub backup_running: bool,
    /// How far that live backup is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_progress: Option<backup::LiveBackupProgress>,
    pub host: Option<String>,
    pub resumed: bool,
    pub started: String,
    pub open_handles: u64,
    pub path: PathBuf,
    /// Repository requests retried after transient failures (daemon-wide).
    pub repo_retries: u64,
    /// Its export point's fetch scheduler: queue per priority class, on-demand latency.
    pub scheduler: SchedulerStatus,
    pub relocation: Option<RelocationStatus>,
    /// The backup the disks' `blocks_dirty` are relative to: the session's
    /// own until a live backup (`backup --session`) makes a newer one.
    pub backup_base: String,
    /// Its backup was removed from the repository (`forget --force`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_gone: Option<String>,
    /// Its pin could not be written to the repository (tried again at
    /// every check): until it is, a `forget` may remove its backup.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unpinned: bool,
    /// The repository did not answer (as itself) the last check of its
    /// backups: why. Blocks not yet staged cannot be read meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo_unreachable: Option<String>,
    /// The session uploader, if started (`upload`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadStatus>,
    pub disks: Vec<DiskStatus>,
}

#[derive(Debug, Serialize)]
pub struct RecoverInfo {
    pub vm: String,
    pub backup: String,
    /// True if existing staging was picked up (earlier writes are kept).
    pub resumed: bool,
    /// Backups of kept staging that was not resumed because the backup is
    /// gone from the repository (the staging is still on disk).
    pub skipped: Vec<String>,
    /// True if the session was already being served.
    pub already_active: bool,
    /// What the administrator must know about this recovery (e.g. kept
    /// staging of the VM that is not there now and was not resumed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub config: PathBuf,
    pub disks: Vec<PathBuf>,
    /// Per disk, the NFS and NBD URLs that reach it.
    pub urls: Vec<Vec<String>>,
    pub export_point: String,
    pub host: Option<String>,
    /// Why it is there (new sessions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<Decision>,
}

/// The working set admission expects of a VM with no operational profile
/// (a guess: a small VM's boot; the profile, once recorded, is the figure).
pub const DEFAULT_WORKING_SET: u64 = 16 << 20;

/// Called with a session as it goes away.
type OnRelease = Box<dyn Fn(&Session) + Send + Sync>;

pub struct Datastore {
    repo: Arc<Repository>,
    stagings: StagingSet,
    mount: PathBuf,
    sessions: RwLock<BTreeMap<String, Arc<Session>>>,
    next_serial: AtomicU64,
    points: Vec<Arc<ExportPoint>>,
    placement: PlacementConfig,
    prefetch: PrefetchOptions,
    /// Called with a VM name after its session is gone (kernel dentry
    /// invalidation lives in the FUSE layer).
    on_release: RwLock<Vec<OnRelease>>,
    /// Per-VM operation locks (see the module docs).
    vm_ops: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Where the network frontends of each export point serve, for
    /// `recover` to print URLs.
    urls: RwLock<HashMap<String, ExportUrls>>,
    /// Placements decided and not yet served (`points::Reservation`).
    pending: Arc<Mutex<points::Pending>>,
    /// Serialises placements from gathering figures to reserving.
    placing: Mutex<()>,
    /// `stop_background` ran (shutdown).
    stopping: AtomicBool,
    /// Set for a throwaway recovery (`files`, `verify-boot`): its pins
    /// name this process, so a `forget` after it was killed before its
    /// cleanup drops them (`repo::pins::Pin::owner`).
    pin_owner: std::sync::OnceLock<crate::repo::locks::Owner>,
    /// This host's name as its pins give it: the system's, asked once
    /// (tests set another, `set_host`).
    host: std::sync::OnceLock<String>,
    /// The FUSE mount's keeper, as the daemon watches it (`status`).
    fuse_keeper: OnceLock<Arc<crate::export::fuse::keeper_watch::Health>>,
}

/// Base URLs of the network frontends: `nfs://ADDR`, `nbd://ADDR:PORT`,
/// `nbd+unix://?socket=PATH`.
#[derive(Debug, Clone, Default)]
pub struct ExportUrls {
    pub nfs: Vec<String>,
    pub nbd: Vec<String>,
}

impl Datastore {
    pub fn new(
        repo: Arc<Repository>,
        stagings: StagingSet,
        mount: &Path,
        fetches_in_flight: usize,
        prefetch: PrefetchOptions,
        placement: PlacementConfig,
    ) -> Arc<Datastore> {
        let points = placement
            .points
            .iter()
            .map(|p| {
                ExportPoint::new(
                    p.clone(),
                    stagings.of_point(&p.name).clone(),
                    fetches_in_flight,
                )
            })
            .collect();
        Arc::new(Datastore {
            repo,
            stagings,
            mount: mount.to_path_buf(),
            sessions: RwLock::new(BTreeMap::new()),
            next_serial: AtomicU64::new(1),
            points,
            placement,
            prefetch,
            on_release: RwLock::new(vec![]),
            vm_ops: Mutex::new(HashMap::new()),
            urls: RwLock::new(HashMap::new()),
            pending: Arc::default(),
            placing: Mutex::new(()),
            stopping: AtomicBool::new(false),
            pin_owner: std::sync::OnceLock::new(),
            host: std::sync::OnceLock::new(),
            fuse_keeper: OnceLock::new(),
        })
    }

    /// Where `status` reads the FUSE keeper's state from (set once).
    pub fn set_fuse_keeper(&self, h: Arc<crate::export::fuse::keeper_watch::Health>) {
        let _ = self.fuse_keeper.set(h);
    }

    /// The FUSE keeper's state; None where no FUSE mount is served.
    pub fn fuse_keeper(&self) -> Option<crate::export::fuse::keeper_watch::KeeperStatus> {
        self.fuse_keeper.get().map(|h| h.status())
    }

    /// The host name its pins give (`repo::pins::Pin::host`).
    pub(crate) fn host(&self) -> &str {
        self.host.get_or_init(crate::repo::pins::hostname)
    }

    /// Tests: this daemon's host is called `name` (a renamed host, or two
    /// of one name). Before anything is pinned.
    #[cfg(test)]
    pub(crate) fn set_host(&self, name: &str) {
        self.host
            .set(name.into())
            .expect("set before the host was used");
    }

    /// Marks a throwaway datastore: its sessions end with this process.
    pub fn set_throwaway(&self) {
        let _ = self.pin_owner.set(crate::repo::locks::this_process());
    }

    /// Whether this is a throwaway datastore (see [`Self::set_throwaway`]).
    pub(crate) fn is_throwaway(&self) -> bool {
        self.pin_owner.get().is_some()
    }

    /// Records where the network frontends of export point `point` serve.
    pub fn set_urls(&self, point: &str, urls: ExportUrls) {
        self.urls.write().insert(point.into(), urls);
    }

    pub fn points(&self) -> &[Arc<ExportPoint>] {
        &self.points
    }

    pub fn point(&self, name: &str) -> Option<&Arc<ExportPoint>> {
        self.points.iter().find(|p| p.name() == name)
    }

    /// The sessions served at export point `point`.
    pub fn sessions_at(&self, point: &str) -> Vec<Arc<Session>> {
        self.sessions
            .read()
            .values()
            .filter(|s| s.point.name() == point)
            .cloned()
            .collect()
    }

    /// `session` if it is served at `point`.
    pub fn session_at(&self, vm: &str, point: &str) -> Option<Arc<Session>> {
        self.session(vm).filter(|s| s.point.name() == point)
    }

    /// The operation lock of one VM.
    fn vm_op(&self, vm: &str) -> Arc<Mutex<()>> {
        self.vm_ops
            .lock()
            .entry(vm.to_string())
            .or_default()
            .clone()
    }

    /// Takes `op`, VM `vm`'s operation lock, but refuses at once while a
    /// live backup of the VM holds it: that can last hours, and a request
    /// queued behind it would outlive its client's timeout and still be
    /// carried out after, unasked.
    fn lock_op<'a>(&self, vm: &str, op: &'a Mutex<()>) -> Result<parking_lot::MutexGuard<'a, ()>> {
        loop {
            if let Some(g) = op.try_lock_for(std::time::Duration::from_millis(50)) {
                return Ok(g);
            }
            if self
                .session(vm)
                .is_some_and(|s| s.backup_running.load(Ordering::Acquire))
            {
                return Err(Error::busy(format!(
                    "a live backup of VM {vm} is running (backup --session); try again when it ends"
                )));
            }
        }
    }

    /// Adds a hook a frontend runs when a session is gone (dentry
    /// invalidation, forgetting its handles).
    pub fn add_on_release(&self, f: Box<dyn Fn(&Session) + Send + Sync>) {
        self.on_release.write().push(f);
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// `--staging`, the main staging directory.
    pub fn staging_root(&self) -> &Path {
        self.stagings.main().root()
    }

    /// Every staging directory, the main one first.
    pub fn stagings(&self) -> &[Arc<StagingDir>] {
        self.stagings.all()
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.read().values().cloned().collect()
    }

    pub fn session(&self, vm: &str) -> Option<Arc<Session>> {
        self.sessions.read().get(vm).cloned()
    }

    /// `session`, or a not-found error naming the VM.
    fn served(&self, vm: &str) -> Result<Arc<Session>> {
        self.session(vm)
            .ok_or_else(|| Error::not_found(format!("no recovery session for VM {vm}")))
    }

    /// The NFS and NBD URLs of disk `index` of session `s`.
    pub fn disk_urls(&self, s: &Session, index: usize) -> Vec<String> {
        let vm = &s.vm;
        let all = self.urls.read();
        let Some(u) = all.get(s.point.name()) else {
            return vec![];
        };
        let nfs = u.nfs.iter().map(|b| format!("{b}/{vm}/disk{index}.raw"));
        let nbd = u.nbd.iter().map(|b| match b.split_once('?') {
            // nbd+unix:///EXPORT?socket=PATH
            Some((head, q)) => format!("{head}{vm}/disk{index}?{q}"),
            None => format!("{b}/{vm}/disk{index}"),
        });
        nfs.chain(nbd).collect()
    }

    /// Starts relocating a VM's disks to `to/<vm>/` on primary storage.
    pub fn relocate(
        &self,
        vm: &str,
        to: &Path,
        rate_mbps: Option<f64>,
        force: bool,
    ) -> Result<RelocationStatus> {
        validate_name("VM name", vm)?;
        let op = self.vm_op(vm);
        let _op = self.lock_op(vm, &op)?;
        let s = self.served(vm)?;
        // The slot changes only under the VM's operation lock (held), so
        // its own lock is not held across the target's I/O below:
        // placement and status take it for every session.
        let old = s.relocation.lock().clone();
        let mut failed = None;
        if let Some(r) = old.as_ref() {
            match r.state() {
                crate::relocate::State::Failed => {
                    r.stop();
                    // What to say of it, not the relocation itself: it must
                    // close its files (and their locks) before the start.
                    failed = Some((r.status().target, r.failed_error()));
                }
                crate::relocate::State::Done => {
                    return Err(Error::new(
                        crate::error::ErrorKind::AlreadyExists,
                        format!(
                            "VM {vm} was already relocated to {}",
                            r.status().target.display()
                        ),
                    ))
                }
                _ => {
                    return Err(Error::busy(format!(
                        "VM {vm} is already being relocated to {}",
                        r.status().target.display()
                    )))
                }
            }
        }
        // Replacing it would leave its partial files where nothing names
        // them (a cancel removes or names them): the administrator decides.
        if let Some(h) = s.relocation_not_resumed.lock().as_ref() {
            return Err(Error::busy(format!(
                "VM {vm} has a relocation to {} that a restarted daemon could not reopen ({}): \
                 resume it (`recoverfs relocate {vm} --resume`) or cancel it (`recoverfs \
                 relocate {vm} --cancel`) first",
                h.target.display(),
                h.error
            )));
        }
        if old
            .as_ref()
            .is_some_and(|r| r.state() == crate::relocate::State::Failed)
        {
            // Stopped above: its target files close with it, and with them
            // their locks, which would keep a `--force` over the same
            // target out (see `Relocation::begin`).
            *s.relocation.lock() = None;
            drop(old);
        }
        let mut forbidden = vec![self.mount.as_path()];
        forbidden.extend(self.stagings().iter().map(|s| s.root()));
        let r = Relocation::start(crate::relocate::Request {
            source: s.relocation_source(),
            to,
            rate_mbps,
            force,
            forbidden: &forbidden,
        })
        .map_err(|e| match &failed {
            // Its own partial files are what is "not empty": say why
            // they are there and what to do, not only "use --force".
            Some((target, why))
                if e.kind() == crate::error::ErrorKind::AlreadyExists
                    && std::fs::canonicalize(to).is_ok_and(|to| to.join(vm) == *target) =>
            {
                why.clone()
            }
            _ => e,
        })?;
        let st = r.status();
        *s.relocation.lock() = Some(r.clone());
        // `stop_background` may have run through the slots meanwhile.
        if self.stopping.load(Ordering::SeqCst) {
            r.stop();
        }
        tracing::info!(vm, target = %st.target.display(), "relocation started");
        Ok(st)
    }

    /// Stops every relocation copier and prefetcher and saves profiles
    /// (shutdown); copiers resume on recover.
    pub fn stop_background(&self) {
        // Before the slots are read: a relocation installed after this
        // pass stops itself (see `relocate`).
        self.stopping.store(true, Ordering::SeqCst);
        for s in self.sessions() {
            if let Some(r) = s.relocation.lock().as_ref() {
                r.stop();
            }
            s.stop_prefetch();
            upload::halt(&s);
            s.save_profile_logged(&self.repo);
        }
    }

    /// Recovers every session that was being served when the daemon last
    /// stopped without releasing it (a crash, a restart): frontends find
    /// the same VMs at the same names. A session that cannot be resumed is
    /// logged and left for `recover` to report.
    pub fn resume_active(&self) -> Vec<String> {
        let mut resumed = vec![];
        for staging in self.stagings() {
            for (vm, backup) in staging.active_damaged_sessions() {
                tracing::error!(vm, backup, "could not resume the session that was active before the restart: its session.json is damaged (release --discard --backup removes it)");
                self.mark_not_served(&vm, &backup, staging);
            }
            for (vm, backup) in staging.active_sessions() {
                let rec: Option<PlacementRecord> =
                    serde_json::from_slice(&staging.active_placement(&vm, &backup)).ok();
                let (point, host) = match rec {
                    Some(r) => (r.export_point, r.host),
                    // Marked by a daemon without export points.
                    None => (self.points[0].name().into(), None),
                };
                let placing = Placing::Kept {
                    point,
                    host,
                    staging: staging.clone(),
                };
                match self.recover_at(&vm, Some(&backup), placing) {
                    Ok(_) => {
                        tracing::info!(
                            vm,
                            backup,
                            "resumed a session that was active before the restart"
                        );
                        resumed.push(vm);
                    }
                    Err(e) => {
                        tracing::error!(
                            vm,
                            backup,
                            "could not resume the session that was active before the restart: {e}"
                        );
                        self.mark_not_served(&vm, &backup, staging);
                    }
                }
            }
        }
        self.warn_stagings_over_limit();
        resumed
    }

    /// Says so at start where what staging holds for good (kept sessions,
    /// guest-changed blocks) already reaches its limit, as after a restart
    /// with a lower `--staging-max` (explore3): nothing new can be staged.
    fn warn_stagings_over_limit(&self) {
        for staging in self.stagings() {
            if let Some((fixed, limit)) = staging.budget().unevictable_over_limit() {
                tracing::warn!(
                    "staging {} holds {} that cannot be evicted (kept sessions and blocks the guests changed), at or over its {} limit: no new block is staged there (reads are read from the repository each time, writes to blocks not staged fail ENOSPC) until sessions are released with --discard or the limit is raised",
                    staging.root().display(),
                    crate::util::human_bytes(fixed),
                    crate::util::human_bytes(limit)
                );
            }
        }
    }

    pub fn status(&self, s: &Session) -> SessionStatus {
        // First: the fields below hold their locks (`backup_base`'s too)
        // until the whole literal is built.
        let upload = s.upload.lock().as_ref().map(|j| j.status(s));
        SessionStatus {
            vm: s.vm.clone(),
            backup: s.backup.clone(),
            urls: s.disks.iter().map(|d| self.disk_urls(s, d.index)).collect(),
            backup_running: s.backup_running.load(std::sync::atomic::Ordering::Acquire),
            backup_progress: s.backup_progress.shown(),
            resumed: s.resumed,
            started: crate::util::rfc3339(
                s.started
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            ),
            export_point: s.point.name().into(),
            host: s.host.clone(),
            open_handles: s.open_handles(),
            path: self.mount.join(&s.vm),
            repo_retries: self.repo.retries(),
            scheduler: s.point.sched.status(),
            relocation: (s.relocation.lock().as_ref().map(|r| r.status()))
                .or_else(|| s.relocation_not_resumed.lock().as_ref().map(|h| h.status())),
            backup_base: s.backup_base.lock().base.id.clone(),
            backup_gone: s.backup_gone.lock().clone(),
            unpinned: s.pin_owed.load(std::sync::atomic::Ordering::Acquire),
            repo_unreachable: s.repo_unreachable.lock().clone(),
            upload,
            disks: s.disks.iter().map(|d| d.status()).collect(),
        }
    }

    /// Flushes every volume that has not failed (a failed one has said so
    /// in the log already); returns the first error.
    /// An error naming the first disk that failed (a sync that did not
    /// make its writes durable), if any: skipped by [`Self::flush_all`],
    /// it must still make a shutdown fail.
    pub fn first_failure(&self) -> Option<Error> {
        self.sessions()
            .iter()
            .flat_map(|s| s.disks.iter())
            .find_map(|d| d.failed_error())
    }

    pub fn flush_all(&self) -> Result<()> {
        let mut first = Ok(());
        for s in self.sessions() {
            for d in s.disks.iter().filter(|d| !d.is_failed()) {
                if let Err(e) = d.flush() {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
        first
    }
}

pub(crate) mod backup;
pub use backup::{SessionBackupDisk, SessionBackupReport};
mod holders;
pub use holders::{Frontend, Holder};
mod kept;
mod pinning;
pub(crate) mod upload;
pub use pinning::CHECK_EVERY as BACKUP_CHECK_EVERY;
pub use upload::{UploadRequest, UploadStatus};
mod points;
mod recover;
use recover::Placing;
mod release;
pub use release::{Released, ReleasedRelocation};
mod relocation;
use points::PlacementRecord;
pub use points::{
    resolve_host, HostConnections, PlaceRequest, PlacementConfig, PointStatus, RelocationProgress,
    Reservation,
};

#[cfg(test)]
mod tests;
