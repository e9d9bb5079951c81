//! Live relocation: copy a recovering VM's disks to primary storage while
//! it runs, converge, then cut over so every read and write goes to the
//! primary copy.
//!
//! * Source is what the VM sees: the guest's writes and other staged
//!   blocks from staging, the rest from the backup, fetched at relocation
//!   priority without staging them, many at once (see `copy`: a pipeline
//!   of reads, target writes in walk order, batches committed by a second
//!   thread while the next batch is written).
//! * The copy walks each disk in ascending order **by runs**: copied blocks
//!   are skipped a bitmap word at a time, a stretch of holes (zero in the
//!   backup, never written) is taken whole and recorded with one commit
//!   that writes only the bitmap words it touched, so a sparse 10 TiB disk
//!   costs its data, not its 10 million blocks. A hole is recorded only
//!   where the target durably reads zeros (see `take_holes`).
//! * A per-disk **copied** map records blocks whose target data is synced.
//!   A guest write clears the block's bit in memory (see `copy`, "Revoking
//!   a copy") before its data lands; the copier marks a block copied only if
//!   no guest write started since it read the block. Pass after pass, only
//!   blocks not copied are copied.
//! * Copied bits never run ahead of the target: a batch is recorded as
//!   copied only after the target is synced. A block the guest never
//!   changed reads the backup's bytes after a crash whatever staging lost;
//!   one it changed is copied again after any restart (see `copy`), so after
//!   a crash a block trusted as copied reads the same from both.
//! * When few blocks remain, guest writes are paused, the rest is copied,
//!   targets are fsynced and `relocation.json` is renamed into place with
//!   `switched: true`: that rename is the commit point. Everything that can
//!   fail happens before it; after it there is only forward progress: every
//!   disk switches to its target (which cannot fail), and if the commit
//!   cannot be made durable the disks fail (reads go on, writes and flushes
//!   get EIO) so target and staging can never diverge, and the state is
//!   `Done` with that error (switched, not a success). A crash before the
//!   commit resumes the copy from staging; after it, the session is served
//!   from the target. Never a mix. The target's `vm.json`, which tells an
//!   administrator the copy is complete, is written only after the commit
//!   (and by a restarted daemon if it is missing), and removed when a
//!   relocation begins.
//! * A relocation starts from empty targets: files are created or emptied
//!   (mode 0600, in a 0700 directory, never through a symbolic link), so no
//!   byte of an old file can survive where the backup has zeros.
//! * The target directory is recorded with its identity, and every later
//!   use works in it only if it is still that directory, reached without
//!   following a link (see `pin_target`): the cutover does not commit, a
//!   restart does not resume into a directory moved or linked into its
//!   place, a cancel leaves the files. Another device number (a reboot,
//!   a remount) is accepted only where nobody but root can change the
//!   path (see `TargetId`): there the same inode, owner and filesystem
//!   type will do, and the identity is recorded again. An older
//!   record without the identity takes the directory found at its first
//!   restart.
//! * Each target file's inode number is recorded when it is created or
//!   emptied: where a user may write, a restart writes only that very file
//!   (another hard link to it, an administrator's `cp -al` snapshot, does
//!   not matter), never one put in its place; where only root can change
//!   the path, whatever root put there. The cutover commits only while
//!   each name still leads to the file written. `--force` checks every
//!   existing file before emptying any.
//! * The VM comes first: the copier yields while guest I/O is in flight and
//!   honours a rate limit, raised (up to 4×) when the guest out-writes it.
//! * **Pause and resume** (`pause`, `resume_copy`; see `pause`): a pause
//!   stops the copier at its next block (reads in flight are abandoned,
//!   written blocks committed), persists `paused` in `relocation.json` (a
//!   restarted daemon keeps it paused) and holds off the cutover; resume
//!   continues from the copied map.
//! * **Not resumed** (`not_resumed`): a restart that cannot open the
//!   target of a relocation that had not cut over serves the VM from
//!   staging and keeps the record; `status` shows it, and a resume reopens
//!   it in the running daemon once the target is back.
//! * **Cancel** (`cancel`): refused once the cutover began; otherwise stops
//!   the copier, removes `relocation.json` durably (the commit: no restart
//!   resumes it), then the copied maps and the target files this relocation
//!   created (never one that was there before).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::repo::limits::MAX_META_BYTES;
use crate::staging::io::{self, BlockFile, Open, PinnedDir, Storage};
use crate::staging::{MapKind, PersistentBitmap};
use crate::volume::Volume;

/// Cut over when at most this many blocks remain dirty (and at most a
/// 16th of the disk): the final pass runs with guest writes paused.
const CUTOVER_BLOCKS: u64 = 64;
/// Seconds in a row in which the guest un-copies blocks at least as fast
/// as they are copied, before the rate is raised or the state becomes
/// not-converging.
const STALL_SECONDS: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Copying,
    Converging,
    /// Stopped by `pause` until `resume_copy`; no cutover meanwhile.
    Paused,
    Switching,
    Done,
    Failed,
    NotConverging,
    /// Recorded, but a restarted daemon could not reopen its target (see
    /// `not_resumed`): shown by `status`, never the state of a copier.
    NotResumed,
}

impl State {
    /// Still copying, or will again (future async load).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            State::Copying | State::Converging | State::NotConverging | State::Paused
        )
    }
}

/// `relocation.json` in the session's staging directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub target: PathBuf,
    pub switched: bool,
    pub pass: u32,
    pub rate_mbps: Option<f64>,
    /// Paused by the administrator: a restart keeps it paused.
    #[serde(default)]
    pub paused: bool,
    /// Disks (indices) whose target file this relocation created: a
    /// cancel removes only these, never a file that was there before
    /// (`--force`). A record written before this field names none.
    #[serde(default)]
    pub created: Vec<usize>,
    /// It created `target` itself: a cancel removes it if left empty.
    #[serde(default)]
    pub created_dir: bool,
    /// `target`'s identity when the relocation began: every later use
    /// (restart, cancel, `vm.json`) works in that directory or not at all,
    /// never in one moved or linked into its place (see `pin_target`). A
    /// record written before this field has none: links are still refused.
    #[serde(default)]
    pub target_id: Option<TargetId>,
    /// Each target file's inode number (by disk index) since this
    /// relocation created or emptied it: a restart writes a file with
    /// other hard links only if it is that very file (`Open::ExistingIno`).
    /// A record written before this field has none: such a file is refused.
    #[serde(default)]
    pub target_inos: BTreeMap<usize, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelocationStatus {
    pub state: State,
    pub target: PathBuf,
    pub pass: u32,
    /// Bytes of blocks whose copy is synced and still valid.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes written to the target by this daemon (re-copies included).
    pub bytes_copied: u64,
    /// `bytes_copied` over `copy_seconds`.
    pub rate_mbps: f64,
    /// Seconds this daemon spent copying (paused time not counted), up
    /// to the cutover.
    pub copy_seconds: f64,
    pub rate_limit_mbps: Option<f64>,
    pub eta_s: Option<f64>,
    pub dirty_blocks: u64,
    /// Longest write stall of the cutover, in ms.
    pub cutover_pause_ms: Option<f64>,
    pub error: Option<String>,
    pub note: Option<String>,
}

pub struct Relocation {
    vm: String,
    disks: Vec<Arc<Volume>>,
    storage: Arc<dyn Storage>,
    targets: Vec<Arc<dyn BlockFile>>,
    copied: Vec<Arc<PersistentBitmap>>,
    target_dir: PathBuf,
    /// The targets were emptied by this daemon (see `take_holes`).
    fresh: bool,
    meta_path: PathBuf,
    config_json: Vec<u8>,
    meta: Mutex<Meta>,
    /// Held while `relocation.json` is encoded and replaced: the API's
    /// pause and the copier both write it.
    meta_io: Mutex<()>,
    state: Mutex<(State, Option<String>, Option<String>)>,
    rate_limit: Mutex<Option<f64>>,
    initial_rate: Option<f64>,
    bytes_copied: AtomicU64,
    /// Time spent copying (see `pause::Clock`).
    clock: Mutex<pause::Clock>,
    /// Blocks marked copied by this daemon (re-copies included).
    blocks_marked: AtomicU64,
    /// Copies thrown away because the guest wrote the block meanwhile.
    copies_lost: AtomicU64,
    progress: Mutex<Progress>,
    /// When the rate limit allows the next copy.
    next_slot: Mutex<Instant>,
    pause_ms: Mutex<Option<f64>>,
    cancel: AtomicBool,
    /// Pause requested (see `pause`); set and read under `state` where it
    /// decides against a cutover.
    pause: AtomicBool,
    /// Wakes a paused copier (resume or cancel).
    wake: parking_lot::Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Tests only: run by the committer before it syncs a batch, with the
    /// disk and the batch's data blocks (to race a guest write with it).
    #[cfg(test)]
    commit_hook: Mutex<Option<CommitHook>>,
}

#[cfg(test)]
type CommitHook = Arc<dyn Fn(usize, &[u64]) + Send + Sync>;

/// The last convergence sample: copies made vs copies the guest revoked.
struct Progress {
    at: Instant,
    marked: u64,
    revoked: u64,
    stalled: u32,
}

/// The recovery session whose disks a relocation copies.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub storage: &'a Arc<dyn Storage>,
    pub vm: &'a str,
    pub disks: &'a [Arc<Volume>],
    /// Written to the target as `vm.json` at cutover.
    pub config_json: &'a [u8],
    pub session_dir: &'a Path,
}

pub struct Request<'a> {
    pub source: Source<'a>,
    pub to: &'a Path,
    pub rate_mbps: Option<f64>,
    pub force: bool,
    /// Paths the target may not be inside (mount, staging).
    pub forbidden: &'a [&'a Path],
}

impl Relocation {
    fn meta_path(session_dir: &Path) -> PathBuf {
        session_dir.join("relocation.json")
    }

    /// Checks the target and starts copying.
    pub fn start(req: Request) -> Result<Arc<Relocation>> {
        if req.rate_mbps.is_some_and(|r| !r.is_finite() || r <= 0.0) {
            return Err(Error::invalid("--rate must be a positive number of MB/s"));
        }
        let (target_dir, created_dir, target_id) = Self::check_target(&req)?;
        let meta = Meta {
            target: target_dir,
            switched: false,
            pass: 1,
            rate_mbps: req.rate_mbps,
            paused: false,
            created: vec![],
            created_dir,
            target_id: Some(target_id),
            target_inos: BTreeMap::new(),
        };
        let r = Self::begin(req.source, meta)?;
        r.spawn();
        Ok(r)
    }

    /// Validates `to` on the real filesystem and returns `to/<vm>`, made a
    /// 0700 directory, whether it was made now, and its identity. Refuses
    /// symbolic links, overlap with the mount or staging, a non-empty
    /// target without `force`, and too little room.
    fn check_target(req: &Request) -> Result<(PathBuf, bool, TargetId)> {
        let dir = std::fs::canonicalize(req.to)
            .map_err(|e| Error::io(format!("relocation target {}", req.to.display()), e))?;
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "relocation target {} is not a directory",
                dir.display()
            )));
        }
        for f in req.forbidden {
            if let Ok(f) = std::fs::canonicalize(f) {
                if dir.starts_with(&f) || f.starts_with(dir.join(req.source.vm)) {
                    return Err(Error::invalid(format!(
                        "relocation target {} overlaps {}: choose a directory on primary storage",
                        dir.display(),
                        f.display()
                    )));
                }
            }
        }
        let target_dir = dir.join(req.source.vm);
        let mut missing = false;
        match std::fs::symlink_metadata(&target_dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::invalid(format!(
                    "relocation target {} is a symbolic link, which recoverfs never follows",
                    target_dir.display()
                )))
            }
            Ok(m) if !m.is_dir() => {
                return Err(Error::invalid(format!(
                    "relocation target {} exists and is not a directory",
                    target_dir.display()
                )))
            }
            Ok(_) => {
                let mut rd = std::fs::read_dir(&target_dir)
                    .ctx(|| format!("read {}", target_dir.display()))?;
                if rd.next().is_some() && !req.force {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "relocation target {} is not empty (use --force to overwrite)",
                            target_dir.display()
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing = true,
            Err(e) => return Err(Error::io(format!("stat {}", target_dir.display()), e)),
        }
        let needed: u64 = req.source.disks.iter().map(|d| d.non_hole_bytes()).sum();
        let st = nix::sys::statvfs::statvfs(&dir)
            .map_err(|e| Error::io(format!("statvfs {}", dir.display()), e.into()))?;
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        if avail < needed {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "relocation target {} has {} free, the disks need up to {}",
                    dir.display(),
                    crate::util::human_bytes(avail),
                    crate::util::human_bytes(needed)
                ),
            ));
        }
        req.source
            .storage
            .create_dir_all(&target_dir)
            .ctx(|| format!("create {}", target_dir.display()))?;
        let pinned = req
            .source
            .storage
            .pin_dir(&target_dir)
            .map_err(|e| Error::io(format!("relocation target {}", target_dir.display()), e))?;
        // The disks' data is the VM's: nobody else may read it. (Through
        // the pinned directory: a link swapped in is not chmodded.)
        std::fs::set_permissions(pinned.path(), std::fs::Permissions::from_mode(0o700))
            .ctx(|| format!("chmod {}", target_dir.display()))?;
        let id =
            TargetId::of(req.source.storage.as_ref(), &pinned, &target_dir).ok_or_else(|| {
                Error::invalid(format!(
                    "relocation target {} has no identity to record",
                    target_dir.display()
                ))
            })?;
        Ok((target_dir, missing, id))
    }

    /// Starts a relocation into a checked `meta.target`: forgets any earlier
    /// relocation of this session (durably, before a target is touched),
    /// empties the targets, then records the new one.
    pub(crate) fn begin(src: Source, mut meta: Meta) -> Result<Arc<Relocation>> {
        let (storage, session_dir) = (src.storage, src.session_dir);
        // Refused before any file is touched; `open` checks again, atomically.
        for d in src.disks {
            d.check_no_staging_reader()?;
        }
        // Old copied bits must be gone for good before a target is emptied,
        // or a crash could leave them claiming blocks the target lost.
        let meta_path = Self::meta_path(session_dir);
        storage
            .remove_file(&meta_path)
            .ctx(|| format!("remove {}", meta_path.display()))?;
        for d in src.disks {
            let p = Self::copied_path(session_dir, d);
            storage
                .remove_file(&p)
                .ctx(|| format!("remove {}", p.display()))?;
        }
        storage
            .sync_dir(session_dir)
            .ctx(|| format!("fsync directory {}", session_dir.display()))?;
        // The directory every later use must find again (`pin_target`).
        let dir = pin_target(storage.as_ref(), &meta)?;
        meta.target_id = TargetId::of(storage.as_ref(), &dir, &meta.target);
        // The target's vm.json says it is complete: not until this one is.
        storage
            .remove_file(&dir.path().join("vm.json"))
            .ctx(|| format!("remove {}", meta.target.join("vm.json").display()))?;
        // Recorded for a cancel, which removes only what this relocation
        // made. A file that cannot be looked at counts as there before.
        meta.created = (src.disks.iter())
            .filter(|d| {
                let p = target_file_of(dir.path(), d);
                storage.exists(&p).is_ok_and(|there| !there)
            })
            .map(|d| d.index)
            .collect();
        // Every file there already must be one `Open::Empty` takes, before
        // any is emptied: one refused after another was emptied would leave
        // that one's data lost (`--force`) with nothing started. (`open`
        // checks again as it empties.)
        for d in src
            .disks
            .iter()
            .filter(|d| !meta.created.contains(&d.index))
        {
            let shown = target_file_of(&meta.target, d);
            match storage.open(&target_file_of(dir.path(), d), Open::ExistingSole) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => {
                    r.ctx(|| format!("open relocation target {}", shown.display()))?;
                }
            }
        }
        let r = Self::open_in(src, meta, Open::Empty, &dir)?;
        // The new target files' names must be durable before the relocation
        // that relies on them is recorded.
        let recorded = r
            .record_inos()
            .and_then(|()| {
                r.storage
                    .sync_dir(dir.path())
                    .ctx(|| format!("fsync directory {}", r.target_dir.display()))
            })
            .and_then(|()| r.store_meta());
        if let Err(e) = recorded {
            // Not started: no disk may keep tracking its copies (eviction
            // would wait for copied bits, passthrough stay refused).
            for d in src.disks {
                d.untrack_copies();
            }
            return Err(e);
        }
        Ok(r)
    }

    fn copied_path(session_dir: &Path, d: &Volume) -> PathBuf {
        session_dir.join(format!("disk{}.copied", d.index))
    }

    /// Picks up a relocation recorded in `session_dir`, if any: serves from
    /// the target if it had switched, otherwise resumes copying; one whose
    /// target cannot be opened before the cutover is `NotResumed` (logged).
    pub fn resume(src: Source) -> Result<Reopened> {
        let r = Self::reopen_or_hold(src)?;
        match &r {
            Reopened::Live(r) if r.state() != State::Done => {
                tracing::info!(vm = src.vm, target = %r.target_dir.display(), "resuming relocation");
                r.spawn();
            }
            Reopened::NotResumed(h) => {
                tracing::error!(vm = src.vm, target = %h.target.display(),
                    "relocation not resumed, the VM is served from staging: {}; {}", h.error, h.then);
            }
            _ => {}
        }
        Ok(r)
    }

    /// The session's recorded relocation, if any.
    fn read_meta(src: &Source) -> Result<Option<Meta>> {
        let p = Self::meta_path(src.session_dir);
        let Some(bytes) = src
            .storage
            .read(&p, MAX_META_BYTES)
            .ctx(|| format!("read {}", p.display()))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", p.display())))
    }

    /// `resume` without starting the copier, and `None` for a relocation
    /// not reopened (see `reopen_or_hold`).
    #[cfg(test)]
    pub(crate) fn reopen(src: Source) -> Result<Option<Arc<Relocation>>> {
        Ok(match Self::reopen_or_hold(src)? {
            Reopened::Live(r) => Some(r),
            Reopened::None | Reopened::NotResumed(_) => None,
        })
    }

    /// `resume` without starting the copier: opens the recorded state and,
    /// if the cutover had committed, switches the disks to their targets.
    pub(crate) fn reopen_or_hold(src: Source) -> Result<Reopened> {
        let Some(meta) = Self::read_meta(&src)? else {
            return Ok(Reopened::None);
        };
        let switched = meta.switched;
        let target = meta.target.clone();
        let pinned = pin_target(src.storage.as_ref(), &meta);
        // Another directory at the target's path (not one unreachable, nor
        // a file in it refused).
        let replaced = pinned.as_ref().err().is_some_and(is_replaced);
        let recorded = meta.clone();
        let opened = pinned
            .and_then(|dir| Self::open_in(src, meta, Open::ExistingSole, &dir).map(|r| (r, dir)));
        let (r, dir) = match opened {
            Ok(r) => r,
            // Before the commit staging holds the whole disk, so a target
            // that cannot be opened (primary storage not mounted yet) must
            // not keep the VM from being served. The record stays: `relocate
            // --resume`, or a restarted daemon, tries again.
            Err(e) if !switched => {
                return Ok(Reopened::NotResumed(NotResumed::new(
                    &src, &recorded, e, replaced,
                )))
            }
            // The target is the VM's live disk: not served from anything else.
            Err(e) if replaced => {
                return Err(e.context(format!(
                    "VM {vm} was relocated to {t} and cannot be served: its disks are the \
                     files in the directory the relocation cut over to, complete with vm.json \
                     (a VM runs from them without recoverfs). Put that directory back at {t} \
                     and recover again, or run the VM from it and drop this session with \
                     `recoverfs release {vm} --discard`",
                    vm = src.vm,
                    t = target.display()
                )))
            }
            Err(e) => return Err(e),
        };
        r.adopt_target_id(&dir);
        if switched {
            // Every target is open before the first disk switches.
            for (d, t) in r.disks.iter().zip(&r.targets) {
                d.switch_to(t.clone());
            }
            let mut note = "switched before the daemon restarted".to_string();
            let placed = r.storage.exists(&dir.path().join("vm.json"));
            if !placed.unwrap_or(false) {
                if let Err(e) = r.place_config() {
                    note = format!("{note}; {e}");
                }
            }
            *r.state.lock() = (State::Done, None, Some(note));
        }
        Ok(Reopened::Live(r))
    }

    /// Opens the target files in `dir`, the pinned `meta.target`. With
    /// `ExistingSole` (a reopen): on a path only root can change, whatever
    /// is there (root put it); elsewhere the very file recorded
    /// (`ExistingIno`), or, in a record without inode numbers, a file
    /// with no other hard link.
    fn open_in(src: Source, meta: Meta, how: Open, dir: &PinnedDir) -> Result<Arc<Relocation>> {
        let (storage, disks, session_dir) = (src.storage.clone(), src.disks, src.session_dir);
        let root_only = meta.target_id.as_ref().is_some_and(|t| t.root_only)
            && only_root_can_change(&meta.target);
        let mut targets = vec![];
        let mut copied = vec![];
        for d in disks {
            let shown = target_file_of(&meta.target, d);
            let how = match (how, meta.target_inos.get(&d.index)) {
                (Open::ExistingSole, _) if root_only => Open::Existing,
                (Open::ExistingSole, Some(&ino)) => Open::ExistingIno(ino),
                _ => how,
            };
            let f = storage
                .open(&target_file_of(dir.path(), d), how)
                .ctx(|| format!("open relocation target {}", shown.display()))?;
            if f.len().ctx(|| format!("stat {}", shown.display()))? != d.size {
                // A sparse file of the disk's size: zero blocks stay holes.
                f.set_len(d.size)
                    .ctx(|| format!("size {}", shown.display()))?;
            }
            targets.push(f);
            let m = PersistentBitmap::open(
                storage.as_ref(),
                &Self::copied_path(session_dir, d),
                MapKind::Copied,
                d.block_size() as u32,
                d.nblocks(),
            )?;
            copied.push(Arc::new(m));
        }
        #[cfg(test)]
        test_hooks::before_tracking(session_dir);
        for (i, (d, m)) in disks.iter().zip(&copied).enumerate() {
            if let Err(e) = d.track_copies(m.clone()) {
                // A passthrough open came after `begin` checked: no disk
                // may be left tracking a relocation that did not start.
                for d in &disks[..i] {
                    d.untrack_copies();
                }
                return Err(e);
            }
        }
        // The restart rule (see `copy`, "Revoking a copy"), on every open (a
        // fresh map has nothing to forget), only now that the maps are
        // installed: the guest may be writing (`relocate --resume` reopens
        // in a running daemon). A write sets its changed bit, fences, then
        // revokes in the map it finds installed (`Volume::announce_write`);
        // here the map is installed, then the fence, then the changed bits
        // are read: either side sees the other, so no block written before
        // the copier starts stays trusted as copied.
        std::sync::atomic::fence(Ordering::SeqCst);
        for (d, m) in disks.iter().zip(&copied) {
            let forgotten = d.forget_copies_of_changed(m);
            if forgotten > 0 {
                tracing::info!(
                    vm = src.vm,
                    disk = d.index,
                    blocks = forgotten,
                    "copying the blocks the guest changed again"
                );
            }
        }
        let rate = meta.rate_mbps;
        let paused = meta.paused;
        Ok(Arc::new(Relocation {
            vm: src.vm.into(),
            disks: disks.to_vec(),
            storage,
            targets,
            copied,
            target_dir: meta.target.clone(),
            fresh: how == Open::Empty,
            meta_path: Self::meta_path(session_dir),
            config_json: src.config_json.to_vec(),
            meta: Mutex::new(meta),
            meta_io: Mutex::new(()),
            state: Mutex::new((State::Copying, None, None)),
            rate_limit: Mutex::new(rate),
            initial_rate: rate,
            bytes_copied: AtomicU64::new(0),
            clock: Mutex::new(pause::Clock::default()),
            blocks_marked: AtomicU64::new(0),
            copies_lost: AtomicU64::new(0),
            next_slot: Mutex::new(Instant::now()),
            progress: Mutex::new(Progress {
                at: Instant::now(),
                marked: 0,
                revoked: 0,
                stalled: 0,
            }),
            pause_ms: Mutex::new(None),
            cancel: AtomicBool::new(false),
            pause: AtomicBool::new(paused),
            wake: parking_lot::Condvar::new(),
            thread: Mutex::new(None),
            #[cfg(test)]
            commit_hook: Mutex::new(None),
        }))
    }

    fn encode_meta(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&*self.meta.lock()).expect("json")
    }

    /// Records the identity of `dir`, the target reopened now (and accepted
    /// by `pin_target`), and of the files opened in it, where the record
    /// differs: one written before identities were kept has none (the
    /// directory reached now without links is the one every later use must
    /// find again), and one with another device number (accepted where
    /// only root can change the path) takes the one found now. If it cannot be
    /// written now (logged), it holds in memory and the next record write
    /// carries it.
    fn adopt_target_id(&self, dir: &PinnedDir) {
        let Some(id) = TargetId::of(self.storage.as_ref(), dir, &self.target_dir) else {
            return;
        };
        // A file that cannot be looked at keeps what was recorded.
        let mut inos = self.meta.lock().target_inos.clone();
        for (d, t) in self.disks.iter().zip(&self.targets) {
            if let Ok(Some(ino)) = t.ino() {
                inos.insert(d.index, ino);
            }
        }
        {
            let mut m = self.meta.lock();
            if m.target_id.as_ref() == Some(&id) && m.target_inos == inos {
                return;
            }
            m.target_id = Some(id);
            m.target_inos = inos;
        }
        if let Err(e) = self.store_meta() {
            tracing::warn!(vm = %self.vm, "could not record the relocation target's identity in {}: {e}",
                self.meta_path.display());
        }
    }

    /// Records which files are this relocation's (`Meta::target_inos`),
    /// once they were created or emptied.
    fn record_inos(&self) -> Result<()> {
        for (d, t) in self.disks.iter().zip(&self.targets) {
            let shown = target_file_of(&self.target_dir, d);
            if let Some(ino) = t.ino().ctx(|| format!("stat {}", shown.display()))? {
                self.meta.lock().target_inos.insert(d.index, ino);
            }
        }
        Ok(())
    }

    fn store_meta(&self) -> Result<()> {
        let _io = self.meta_io.lock();
        io::replace(self.storage.as_ref(), &self.meta_path, &self.encode_meta())
    }

    /// The copied map of disk `i` (tests check it against the target).
    #[cfg(test)]
    pub(crate) fn copied_map(&self, i: usize) -> &PersistentBitmap {
        &self.copied[i]
    }

    /// The target file of disk `i`.
    #[cfg(test)]
    pub(crate) fn target(&self, i: usize) -> &Arc<dyn BlockFile> {
        &self.targets[i]
    }

    /// One copy pass over every disk at full speed, on this thread (the
    /// crash tests resume a reopened relocation this way).
    #[cfg(test)]
    pub(crate) fn resume_pass_unthrottled(self: &Arc<Self>) -> Result<()> {
        *self.rate_limit.lock() = None;
        for i in 0..self.disks.len() {
            self.copy_pass(i, false)?;
        }
        Ok(())
    }

    pub(crate) fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        let h = std::thread::Builder::new()
            .name(format!("relocate-{}", self.vm))
            .spawn(move || {
                if let Err(e) = me.run() {
                    tracing::error!(vm = %me.vm, "relocation failed: {e}");
                    *me.state.lock() = (State::Failed, Some(e.to_string()), None);
                }
            })
            .expect("spawn relocation thread");
        *self.thread.lock() = Some(h);
    }

    /// Tests only: the copier was started, not stopped, and still runs.
    #[cfg(test)]
    pub(crate) fn copier_running(&self) -> bool {
        self.thread
            .lock()
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    /// Stops the copier (the copy resumes with the next `recover`) and
    /// returns once it has ended, also when another caller (shutdown, a
    /// cancel) joins it: the handle's lock is held across the join (the
    /// copier never takes it), and a cancel must not remove the record
    /// while a copier could still write it.
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::Release);
        self.wake_copier();
        let mut thread = self.thread.lock();
        if let Some(h) = thread.take() {
            let _ = h.join();
        }
    }

    pub fn state(&self) -> State {
        self.state.lock().0
    }

    fn set_state(&self, s: State, note: Option<String>) {
        let mut g = self.state.lock();
        g.0 = s;
        g.2 = note;
    }

    fn remaining(&self) -> u64 {
        self.disks
            .iter()
            .zip(&self.copied)
            .map(|(d, c)| d.nblocks() - c.bits().count())
            .sum()
    }

    fn run(self: &Arc<Self>) -> Result<()> {
        let total: u64 = self.disks.iter().map(|d| d.nblocks()).sum();
        self.clock.lock().start();
        'passes: loop {
            if self.cancel.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.pause_requested() {
                self.stay_paused();
                continue;
            }
            for i in 0..self.disks.len() {
                if !self.copy_pass(i, false)? {
                    // Cancelled, or paused: the pass starts over (from
                    // the copied map) once resumed.
                    continue 'passes;
                }
            }
            if self.remaining() <= (total / 16).clamp(1, CUTOVER_BLOCKS) {
                if !self.begin_switching() {
                    continue; // paused or stopped just now
                }
                return self.cutover();
            }
            // Passes after the first re-copy what the guest dirtied. A
            // not-converging verdict stands until a pass really gains.
            let gaining = self.remaining() <= total / 2;
            if self.state() == State::Copying || (self.state() == State::NotConverging && gaining) {
                self.set_state(State::Converging, None);
            }
            self.meta.lock().pass += 1;
            self.store_meta()?;
            if self.state() == State::NotConverging {
                // Do not spin: give the guest's write burst time to end.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// Forgets the pacing history (after a pause).
    fn restart_pacing(&self) {
        let revoked: u64 = self.disks.iter().map(|d| d.copies_revoked()).sum::<u64>()
            + self.copies_lost.load(Ordering::Relaxed);
        *self.progress.lock() = Progress {
            at: Instant::now(),
            marked: self.blocks_marked.load(Ordering::Relaxed),
            revoked,
            stalled: 0,
        };
        *self.next_slot.lock() = Instant::now();
    }

    /// Once a second: is the copy gaining on the guest's writes?
    fn check_progress(&self) {
        let mut p = self.progress.lock();
        if p.at.elapsed() < Duration::from_secs(1) {
            return;
        }
        let marked = self.blocks_marked.load(Ordering::Relaxed);
        let revoked: u64 = self.disks.iter().map(|d| d.copies_revoked()).sum::<u64>()
            + self.copies_lost.load(Ordering::Relaxed);
        let (dm, dr) = (marked - p.marked, revoked - p.revoked);
        *p = Progress {
            at: Instant::now(),
            marked,
            revoked,
            stalled: p.stalled,
        };
        // A brief lull in the guest's writes is not convergence: decay the
        // count instead of resetting it.
        if dr > 0 && dr >= dm {
            p.stalled += 1;
        } else if dm > 2 * dr {
            p.stalled = p.stalled.saturating_sub(1);
        }
        if p.stalled >= STALL_SECONDS {
            p.stalled = 0;
            drop(p);
            self.escalate(self.remaining());
        }
    }

    /// The guest dirties blocks as fast as we copy: raise the rate within
    /// 4× of what was asked, else say so with the figures.
    fn escalate(&self, remaining: u64) {
        let mut rl = self.rate_limit.lock();
        if let (Some(r), Some(init)) = (*rl, self.initial_rate) {
            if r < init * 4.0 {
                *rl = Some((r * 2.0).min(init * 4.0));
                tracing::warn!(vm = %self.vm, "relocation not gaining on the guest: raising copy rate to {:.1} MB/s", rl.unwrap());
                return;
            }
        }
        let note = format!(
            "the guest re-dirties blocks as fast as they are copied: {remaining} blocks dirty, for {STALL_SECONDS} s at {}",
            match *rl {
                Some(r) => format!("the {r:.1} MB/s limit"),
                None => "full speed".into(),
            }
        );
        tracing::warn!(vm = %self.vm, "relocation not converging: {note}");
        self.set_state(State::NotConverging, Some(note));
    }

    /// Waits (briefly) while the guest has I/O in flight.
    fn yield_to_guest(&self, d: &Volume) {
        let start = Instant::now();
        while d.guest_busy() && start.elapsed() < Duration::from_millis(20) {
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Token bucket: each copied block books `len / rate` of time; at most
    /// 100 ms of unused time carries over, so a copier slowed by the guest
    /// never bursts past its limit afterwards. The wait ends early for a
    /// pause or cancel (a slow limit may book seconds per block).
    fn throttle(&self, len: u64) {
        let Some(rate) = *self.rate_limit.lock() else {
            return;
        };
        let now = Instant::now();
        let mut next = self.next_slot.lock();
        let start = (*next).max(now - Duration::from_millis(100));
        *next = start + Duration::from_secs_f64(len as f64 / (rate * 1e6));
        let until = *next;
        drop(next);
        loop {
            let wait = until.saturating_duration_since(Instant::now());
            if wait.is_zero() || self.interrupted(false) {
                return;
            }
            std::thread::sleep(wait.min(Duration::from_millis(20)));
        }
    }

    /// Pause writes, copy the rest, sync, commit `switched`, switch, then
    /// write the target's `vm.json`. The caller set the state `Switching`.
    fn cutover(self: &Arc<Self>) -> Result<()> {
        let t0 = Instant::now();
        let guards: Vec<_> = self.disks.iter().map(|d| d.pause_writes()).collect();
        let r = self.prepare_cutover().and_then(|()| self.commit_cutover());
        drop(guards);
        let pause = t0.elapsed().as_secs_f64() * 1000.0;
        let not_durable = r.map_err(|e| e.context("cutover"))?;
        self.clock.lock().stop();
        *self.pause_ms.lock() = Some(pause);
        tracing::info!(vm = %self.vm, target = %self.target_dir.display(), pause_ms = pause, "relocation cut over");
        let note = self.place_config().err().map(|e| e.to_string());
        // `Done` (the disks did switch; it cannot be started again), but
        // with the error when the commit is not durable: not a success.
        *self.state.lock() = (State::Done, not_durable.map(|e| e.to_string()), note);
        Ok(())
    }

    /// Writes the target's `vm.json`, which marks it complete, so only after
    /// the commit (out of the write pause). A failure leaves a complete
    /// target without it: said in the status, and written again by a
    /// restarted daemon.
    fn place_config(&self) -> Result<()> {
        let meta = self.meta.lock().clone();
        let shown = self.target_dir.join("vm.json");
        let placed = pin_target(self.storage.as_ref(), &meta).and_then(|dir| {
            let p = dir.path().join("vm.json");
            (self.storage.rename_into_place(&p, &self.config_json))
                .and_then(|()| self.storage.sync_dir(dir.path()))
                .ctx(|| format!("write {}", shown.display()))
        });
        placed.map_err(|e| {
            let e = e.context(
                "the target is complete but its vm.json could not be written \
                 (a restarted daemon writes it)",
            );
            tracing::error!(vm = %self.vm, "{e}");
            e
        })
    }

    /// Everything that can fail, with writes paused: the final pass and
    /// the target syncs.
    fn prepare_cutover(self: &Arc<Self>) -> Result<()> {
        for i in 0..self.disks.len() {
            self.copy_pass(i, true)?;
        }
        if self.remaining() != 0 {
            return Err(Error::new(
                ErrorKind::Io,
                "blocks still dirty with writes paused",
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            t.sync_data()
                .ctx(|| format!("fsync relocation target disk{i}"))?;
        }
        // The files were written through descriptors, wherever their
        // directory went since: committed only while it is still the
        // recorded target, or the VM would live on files at another path,
        // which no restart would reopen (nor `vm.json` mark complete).
        let meta = self.meta.lock().clone();
        let dir = pin_target(self.storage.as_ref(), &meta)?;
        // And each name still leads to the file written: a file put under
        // it is what `vm.json` and a restart would take for the VM's disk.
        for (d, t) in self.disks.iter().zip(&self.targets) {
            let shown = target_file_of(&meta.target, d);
            let Some(ino) = t.ino().ctx(|| format!("stat {}", shown.display()))? else {
                continue;
            };
            let now = std::fs::symlink_metadata(target_file_of(dir.path(), d)).map(|m| m.ino());
            if now.as_ref().ok() != Some(&ino) {
                return Err(Error::busy(format!(
                    "relocation target {} is no longer the file written (moved or replaced \
                     since): not cutting over",
                    shown.display()
                )));
            }
        }
        Ok(())
    }

    /// The commit point, then only forward progress. Err: nothing was
    /// committed. Ok(Some): committed and switched, but the commit could not
    /// be made durable (every disk failed).
    fn commit_cutover(&self) -> Result<Option<Error>> {
        let meta_io = self.meta_io.lock();
        self.meta.lock().switched = true;
        if let Err(e) = self
            .storage
            .rename_into_place(&self.meta_path, &self.encode_meta())
        {
            // The rename did not happen: nothing was committed.
            self.meta.lock().switched = false;
            return Err(Error::io(format!("write {}", self.meta_path.display()), e));
        }
        // Committed: from here on nothing may turn back.
        // Up to 3 tries, until one succeeds (the last error if none does).
        let mut durable = None;
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            durable = io::sync_parent(self.storage.as_ref(), &self.meta_path).err();
            if durable.is_none() {
                break;
            }
        }
        drop(meta_io);
        // Failed before switched: a switched disk that has not failed has a
        // durable commit (eviction relies on it to stop caring for staging).
        let not_durable = durable.map(|e| {
            let e = e.context(format!(
                "the cutover of VM {} committed but could not be made durable",
                self.vm
            ));
            tracing::error!(vm = %self.vm, "{e}; disks now read from the target and refuse writes until released");
            for d in &self.disks {
                d.fail_hard(e.clone());
            }
            e
        });
        for (d, t) in self.disks.iter().zip(&self.targets) {
            d.switch_to(t.clone());
        }
        Ok(not_durable)
    }

    pub fn status(&self) -> RelocationStatus {
        let (state, error, note) = self.state.lock().clone();
        let bs_total: u64 = self.disks.iter().map(|d| d.size).sum();
        let done: u64 = self
            .disks
            .iter()
            .zip(&self.copied)
            .map(|(d, c)| copied_bytes(d, c))
            .sum();
        let copied = self.bytes_copied.load(Ordering::Relaxed);
        let secs = self.clock.lock().active().as_secs_f64();
        let rate = copied as f64 / secs.max(0.001) / 1e6;
        let left = bs_total.saturating_sub(done);
        let done = if state == State::Done { bs_total } else { done };
        RelocationStatus {
            state,
            target: self.target_dir.clone(),
            pass: self.meta.lock().pass,
            bytes_done: done,
            bytes_total: bs_total,
            bytes_copied: copied,
            rate_mbps: rate,
            copy_seconds: secs,
            rate_limit_mbps: *self.rate_limit.lock(),
            eta_s: (state.is_running() && state != State::Paused && rate > 0.0)
                .then(|| left as f64 / (rate * 1e6)),
            dirty_blocks: if state == State::Done {
                0
            } else {
                self.remaining()
            },
            cutover_pause_ms: *self.pause_ms.lock(),
            error,
            note,
        }
    }
}

/// Disk `d`'s file in the target directory `dir`.
fn target_file_of(dir: &Path, d: &Volume) -> PathBuf {
    dir.join(format!("disk{}.raw", d.index))
}

/// Bytes of the blocks marked copied: every block is full but the last.
fn copied_bytes(d: &Volume, c: &PersistentBitmap) -> u64 {
    let n = d.nblocks();
    let full = c.bits().count() * d.block_size();
    match n.checked_sub(1).filter(|&last| c.test(last)) {
        Some(last) => full - d.block_size() + d.block_range(last).1,
        None => full,
    }
}

mod cancel;
mod copy;
mod not_resumed;
mod pause;
mod target;

pub use cancel::Cancelled;
pub use not_resumed::{NotResumed, Reopened};
pub(crate) use target::pin_target;
use target::{is_replaced, only_root_can_change, TargetId};
#[cfg(test)]
mod tests;

/// Tests only: a step run by `open_in` once the copied maps are read and
/// before they are installed, for the session directory it was set for
/// (tests run in parallel), to race a guest write with the reopen.
#[cfg(test)]
pub(crate) mod test_hooks {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    type Hook = Arc<dyn Fn() + Send + Sync>;
    static BEFORE_TRACKING: parking_lot::Mutex<Option<HashMap<PathBuf, Hook>>> =
        parking_lot::Mutex::new(None);

    pub(crate) fn set_before_tracking(session_dir: &Path, hook: Hook) {
        BEFORE_TRACKING
            .lock()
            .get_or_insert_with(HashMap::new)
            .insert(session_dir.to_path_buf(), hook);
    }

    pub(super) fn before_tracking(session_dir: &Path) {
        let hook = BEFORE_TRACKING
            .lock()
            .as_mut()
            .and_then(|m| m.remove(session_dir));
        if let Some(h) = hook {
            h();
        }
    }
}
