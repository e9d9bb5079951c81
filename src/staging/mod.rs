//! The local staging store: where fetched blocks and guest writes live.
//!
//! ```text
//! <staging>/staging.json                      which repository this belongs to
//! <staging>/lock                              flock held by the serving daemon
//! <staging>/sessions/<vm>/<backup>/manifest.json  the backup's manifest, as recovered
//! <staging>/sessions/<vm>/<backup>/session.json   geometry; written last
//! <staging>/sessions/<vm>/<backup>/diskN.data     sparse, disk-sized block data
//! <staging>/sessions/<vm>/<backup>/diskN.present  blocks whose data is local (synced)
//! <staging>/sessions/<vm>/<backup>/diskN.live     the same, unsynced, trusted in this boot only
//! <staging>/sessions/<vm>/<backup>/diskN.changed  blocks the guest wrote
//! <staging>/sessions/<vm>/<backup>/since.json     live backups: generation and base backup id
//! <staging>/sessions/<vm>/<backup>/base-G.json    the base backup's manifest (generation G >= 1)
//! <staging>/sessions/<vm>/<backup>/diskN.dirty-G  blocks written since that base (G >= 1)
//! <staging>/sessions/<vm>/<backup>/diskN.cow      old bytes of frozen blocks while a live backup runs
//! <staging>/sessions/<vm>/<backup>/diskN.uploaded-G  dirty blocks of generation G already stored as chunks
//! <staging>/sessions/<vm>/<backup>/upload.json    the session uploader's settings while it is on
//! <staging>/sessions/<vm>/.discarding-<backup>-<random>  a session being discarded
//! ```
//! Blocks are the disk's chunks, so one presence bit covers one fetch.
//!
//! A daemon may use several staging directories (export points with their
//! own, [`StagingSet`]), each laid out as above and locked on its own. Each has
//! a byte budget (`budget`: `--staging-max`, eviction, admission) and can
//! be listed and pruned offline (`inventory`: `staging ls|drop`).
//!
//! Every file of a session goes through [`io::Storage`], so tests can fail
//! or record its I/O. The session keeps its own copy of the manifest: a
//! kept session resumes from it even while the repository is unreachable.

pub mod bitmap;
pub mod budget;
pub mod inventory;
pub mod io;
pub mod live;
pub mod set;
pub mod uploaded;

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use bitmap::{AtomicBitmap, MapKind, PersistentBitmap};
pub use io::{BlockFile, Open, OsStorage, Storage};
pub use set::StagingSet;

use crate::error::{Error, IoContext, Result};
use crate::repo::limits::{MAX_MANIFEST_BYTES, MAX_META_BYTES};
use crate::repo::{DiskManifest, Manifest};
use crate::util::{now_unix, write_atomic};

#[derive(Debug, Serialize, Deserialize)]
struct StagingInfo {
    format: String,
    repo_id: String,
    repo: String,
}

/// An opened, locked staging directory. Dropping it releases the lock.
pub struct StagingDir {
    root: PathBuf,
    storage: Arc<dyn Storage>,
    /// What this directory's sessions hold, and its limit (see `budget`).
    budget: Arc<budget::Budget>,
    /// Session directories whose damage was logged (once each).
    reported: parking_lot::Mutex<std::collections::HashSet<PathBuf>>,
    _lock: File,
}

/// What `StagingDir::open` found before touching anything.
enum Found {
    /// A staging directory of the right repository.
    Ours,
    /// Empty (or holding only a lock left by an interrupted first start).
    Empty,
}

impl StagingDir {
    /// Opens (creating if needed) a staging directory for `repo_id` and
    /// takes its lock, so two daemons never share one. A directory that is
    /// neither empty nor a staging directory is refused before anything in
    /// it (its mode included) is changed.
    pub fn open(root: &Path, repo_id: &str, repo_location: &str) -> Result<StagingDir> {
        Self::open_with(root, repo_id, repo_location, OsStorage::shared())
    }

    /// `open`, but a directory it would set up afresh (missing or empty)
    /// is first shown to `fresh` (its resolved path), which may refuse it:
    /// then nothing is written (a directory it created is removed again).
    pub fn open_checked(
        root: &Path,
        repo_id: &str,
        repo_location: &str,
        fresh: &dyn Fn(&Path) -> Result<()>,
    ) -> Result<StagingDir> {
        Self::open_inner(root, repo_id, repo_location, OsStorage::shared(), fresh)
    }

    /// `open` with session files on `storage` (tests: faults, recording).
    pub fn open_with(
        root: &Path,
        repo_id: &str,
        repo_location: &str,
        storage: Arc<dyn Storage>,
    ) -> Result<StagingDir> {
        Self::open_inner(root, repo_id, repo_location, storage, &|_| Ok(()))
    }

    fn open_inner(
        root: &Path,
        repo_id: &str,
        repo_location: &str,
        storage: Arc<dyn Storage>,
        fresh: &dyn Fn(&Path) -> Result<()>,
    ) -> Result<StagingDir> {
        let created = !root.exists();
        if created {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .ctx(|| format!("create staging {}", root.display()))?;
        } else if !root.is_dir() {
            return Err(Error::invalid(format!(
                "staging {} is not a directory",
                root.display()
            )));
        }
        let root = fs::canonicalize(root).ctx(|| format!("resolve {}", root.display()))?;
        let found = Self::identify(&root, repo_id)?;
        if let Found::Empty = found {
            if let Err(e) = fresh(&root) {
                if created {
                    let _ = fs::remove_dir(&root);
                }
                return Err(e);
            }
        }
        let lock = Self::lock(&root)?;
        // Only now is the directory known to be ours to change.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .ctx(|| format!("chmod {}", root.display()))?;
        remove_discard_leftovers(&root);
        if let Found::Empty = found {
            let info = StagingInfo {
                format: "recoverfs-staging-1".into(),
                repo_id: repo_id.into(),
                repo: repo_location.into(),
            };
            write_atomic(
                &root.join("staging.json"),
                &serde_json::to_vec_pretty(&info).expect("json"),
                0o600,
                true,
            )?;
        }
        Ok(StagingDir {
            budget: budget::Budget::new(&root),
            reported: Default::default(),
            root,
            storage,
            _lock: lock,
        })
    }

    /// Decides, reading only, whether `root` is our staging directory, an
    /// empty one, or something else (refused).
    fn identify(root: &Path, repo_id: &str) -> Result<Found> {
        let info_path = root.join("staging.json");
        match OsStorage
            .read(&info_path, MAX_META_BYTES)
            .and_then(|b| b.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound)))
        {
            Ok(bytes) => {
                let info: StagingInfo = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::corrupt(format!("{} is damaged ({e})", info_path.display()))
                })?;
                if info.repo_id != repo_id {
                    return Err(Error::invalid(format!(
                        "staging {} belongs to another repository ({}); use a different --staging",
                        root.display(),
                        info.repo
                    )));
                }
                Ok(Found::Ours)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let entries = fs::read_dir(root).ctx(|| format!("read {}", root.display()))?;
                for e in entries {
                    let e = e.ctx(|| format!("read {}", root.display()))?;
                    if e.file_name() != "lock" {
                        return Err(Error::invalid(format!(
                            "{} is not empty and is not a recoverfs staging directory; nothing in it was changed",
                            root.display()
                        )));
                    }
                }
                Ok(Found::Empty)
            }
            Err(e) => Err(Error::io(format!("read {}", info_path.display()), e)),
        }
    }

    pub(crate) fn lock(root: &Path) -> Result<File> {
        let path = root.join("lock");
        let f = crate::util::try_lock_file(&path)?;
        let Some(f) = f else {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::busy(format!(
                "staging {} is in use by another recoverfs daemon{}",
                root.display(),
                holder
                    .trim()
                    .parse::<u32>()
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default()
            )));
        };
        f.set_len(0).ctx(|| "truncate lock".into())?;
        std::os::unix::fs::FileExt::write_all_at(
            &f,
            format!("{}\n", std::process::id()).as_bytes(),
            0,
        )
        .ctx(|| "write lock".into())?;
        Ok(f)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn budget(&self) -> &Arc<budget::Budget> {
        &self.budget
    }

    pub fn session_dir(&self, vm: &str, backup: &str) -> PathBuf {
        self.root.join("sessions").join(vm).join(backup)
    }

    /// Kept sessions of a VM, most recently recovered first. One whose
    /// `session.json` is damaged is not one (see `damaged_sessions`); it
    /// is logged once.
    pub fn kept_sessions(&self, vm: &str) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .completed_sessions(vm)
            .into_iter()
            .filter_map(|(backup, meta)| match meta {
                Ok(meta) => Some((backup, meta.last_recovered)),
                Err(e) => {
                    let dir = self.session_dir(vm, &backup);
                    if self.reported.lock().insert(dir) {
                        tracing::warn!(
                            vm,
                            backup,
                            "kept staging not resumed: {e}; discard it with `release --discard {vm}`"
                        );
                    }
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        out
    }

    /// Backups of `vm` whose staging has a `session.json` that cannot be
    /// read: never resumed, removed by `release --discard`.
    pub fn damaged_sessions(&self, vm: &str) -> Vec<String> {
        self.completed_sessions(vm)
            .into_iter()
            .filter(|(_, meta)| meta.is_err())
            .map(|(backup, _)| backup)
            .collect()
    }

    /// Session directories of `vm` that have a `session.json`, and what
    /// reading it gave.
    fn completed_sessions(&self, vm: &str) -> Vec<(String, Result<SessionMeta>)> {
        let dir = self.root.join("sessions").join(vm);
        fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let backup = e.file_name().to_str()?.to_string();
                // Not a session: a discard in progress, say.
                crate::util::validate_name("backup id", &backup).ok()?;
                let meta = SessionMeta::load(self.storage.as_ref(), &e.path()).transpose()?;
                Some((backup, meta))
            })
            .collect()
    }

    /// The manifest a kept session was recovered from, from its own copy;
    /// `None` for a session made before copies were kept.
    pub fn kept_manifest(&self, vm: &str, backup: &str) -> Result<Option<Manifest>> {
        let p = self.session_dir(vm, backup).join("manifest.json");
        let Some(bytes) = self
            .storage
            .read(&p, MAX_MANIFEST_BYTES)
            .ctx(|| format!("read {}", p.display()))?
        else {
            return Ok(None);
        };
        let m = Manifest::decode(&bytes, &format!("{vm}/{backup} (copy in {})", p.display()))?;
        if m.vm != vm || m.id != backup {
            return Err(Error::corrupt(format!(
                "{} names backup {}/{}",
                p.display(),
                m.vm,
                m.id
            )));
        }
        Ok(Some(m))
    }

    /// Marks a session as being served (or not), durably: a daemon that
    /// restarts after a crash serves it again without being asked.
    /// `set_active(.., true)` that also records where the session is
    /// exported (`placement`, JSON), read back by [`Self::active_placement`].
    pub fn mark_active(&self, vm: &str, backup: &str, placement: &[u8]) -> Result<()> {
        let p = self.session_dir(vm, backup).join("active");
        io::replace(self.storage.as_ref(), &p, placement)
    }

    /// What `mark_active` recorded (empty for sessions marked by an older
    /// daemon, or not active).
    pub fn active_placement(&self, vm: &str, backup: &str) -> Vec<u8> {
        fs::read(self.session_dir(vm, backup).join("active")).unwrap_or_default()
    }

    pub fn set_active(&self, vm: &str, backup: &str, active: bool) -> Result<()> {
        let p = self.session_dir(vm, backup).join("active");
        if active {
            io::replace(self.storage.as_ref(), &p, b"")
        } else {
            self.storage
                .remove_file(&p)
                .ctx(|| format!("remove {}", p.display()))?;
            io::sync_parent(self.storage.as_ref(), &p)
        }
    }

    /// Sessions marked active, one per VM (the most recently recovered if
    /// a crash left more than one).
    pub fn active_sessions(&self) -> Vec<(String, String)> {
        let root = self.root.join("sessions");
        let mut out = vec![];
        for vm in fs::read_dir(&root).into_iter().flatten().flatten() {
            let Some(vm) = vm.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if crate::util::validate_name("VM name", &vm).is_err() {
                continue;
            }
            let active = self
                .kept_sessions(&vm)
                .into_iter()
                .find(|(b, _)| self.session_dir(&vm, b).join("active").exists());
            if let Some((b, _)) = active {
                out.push((vm, b));
            }
        }
        out
    }

    /// Deletes a session's staging data for good.
    pub fn discard(&self, vm: &str, backup: &str) -> Result<()> {
        let dir = self.session_dir(vm, backup);
        if dir.exists() {
            remove_session_dir(self.storage.as_ref(), &dir)?;
            self.budget.rescan();
        }
        Ok(())
    }
}

/// Names a session directory gets while it is being removed: no scan
/// takes it for a session (not a valid backup id).
const DISCARDING: &str = ".discarding-";

/// Removes a session directory so that no crash midway leaves a part of
/// it where a later session of the same backup would take it up: it is
/// renamed aside durably first (the commit), then removed.
pub(crate) fn remove_session_dir(storage: &dyn Storage, dir: &Path) -> Result<()> {
    let aside = retire_session_dir(storage, dir)?;
    fs::remove_dir_all(&aside).ctx(|| format!("remove {}", aside.display()))?;
    io::sync_parent(storage, &aside)
}

/// Renames `dir` to a `.discarding-` name beside it, durably.
fn retire_session_dir(storage: &dyn Storage, dir: &Path) -> Result<PathBuf> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let aside = dir.with_file_name(format!(
        "{DISCARDING}{}-{}",
        name.unwrap_or_default(),
        crate::repo::random_hex(8)
    ));
    fs::rename(dir, &aside).ctx(|| format!("rename {} to {}", dir.display(), aside.display()))?;
    io::sync_parent(storage, dir)?;
    Ok(aside)
}

/// Finishes discards a crash interrupted: removes every `.discarding-`
/// directory under `root/sessions/<vm>/`. Failures are logged: what is
/// left only takes room, it is never taken for a session.
pub(crate) fn remove_discard_leftovers(root: &Path) {
    for vm in fs::read_dir(root.join("sessions"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let mut removed = false;
        for e in fs::read_dir(vm.path()).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with(DISCARDING) {
                continue;
            }
            match fs::remove_dir_all(e.path()) {
                Ok(()) => removed = true,
                Err(err) => tracing::warn!(
                    "cannot remove {} (left by an interrupted discard): {err}",
                    e.path().display()
                ),
            }
        }
        if removed {
            tracing::info!(dir = %vm.path().display(), "finished a discard a crash interrupted");
            if let Err(err) = File::open(vm.path()).and_then(|d| d.sync_all()) {
                tracing::warn!("fsync directory {}: {err}", vm.path().display());
            }
        }
    }
}

/// `session.json`: the geometry the staging files were made for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionMeta {
    pub vm: String,
    pub backup: String,
    pub disks: Vec<DiskGeometry>,
    pub created: u64,
    pub last_recovered: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskGeometry {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
}

impl SessionMeta {
    /// `None` if `dir` has no `session.json` (no session was completed
    /// there); one that cannot be read or parsed is an error naming it.
    pub(crate) fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<SessionMeta>> {
        let p = dir.join("session.json");
        let Some(bytes) = storage
            .read(&p, MAX_META_BYTES)
            .ctx(|| format!("read {}", p.display()))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", p.display())))
    }

    fn store(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        io::replace(
            storage,
            &dir.join("session.json"),
            &serde_json::to_vec_pretty(self).expect("json"),
        )
    }
}

/// The files of one staged disk.
pub struct DiskStore {
    pub data: Arc<dyn BlockFile>,
    pub present: PersistentBitmap,
    pub changed: PersistentBitmap,
    /// Blocks written since the session's last live backup
    /// (`diskN.dirty-G`); `None` in generation 0, where `changed` is that map.
    pub dirty: Option<PersistentBitmap>,
    /// The session uploader's record of this generation (`diskN.uploaded-G`)
    /// and its entries, if the uploader ever ran in this generation and
    /// the record checked (see `uploaded`).
    pub uploaded: Option<(uploaded::UploadRecord, uploaded::Entries)>,
    pub data_path: PathBuf,
}

/// `since.json`: which backup the session's dirty maps are relative to.
/// Absent: generation 0, the session's own backup (`manifest.json`), with
/// `diskN.changed` as the dirty map. Replacing it is the commit point of a
/// live backup (see `session::backup`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Since {
    pub generation: u64,
    /// The backup id the generation's dirty maps are relative to.
    pub base: String,
}

impl Since {
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<Since>> {
        let p = dir.join("since.json");
        let Some(bytes) = storage
            .read(&p, MAX_META_BYTES)
            .ctx(|| format!("read {}", p.display()))?
        else {
            return Ok(None);
        };
        let s: Since = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", p.display())))?;
        if s.generation == 0 {
            return Err(Error::corrupt(format!(
                "{} names generation 0",
                p.display()
            )));
        }
        Ok(Some(s))
    }

    /// Replaces `since.json` atomically and durably.
    pub fn store(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        io::replace(
            storage,
            &dir.join("since.json"),
            &serde_json::to_vec_pretty(self).expect("json"),
        )
    }
}

/// `diskN.dirty-G` (generation `G >= 1`; generation 0 is `diskN.changed`).
pub fn dirty_path(dir: &Path, index: usize, generation: u64) -> PathBuf {
    dir.join(format!("disk{index}.dirty-{generation}"))
}

/// `diskN.cow`: frozen blocks' old bytes while a live backup runs.
pub fn cow_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("disk{index}.cow"))
}

/// `base-G.json`: the manifest generation `G >= 1` is relative to.
pub fn base_copy_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("base-{generation}.json"))
}

/// Removes what an interrupted live backup may have left (the next
/// generation's files, the previous generation's, copy-on-write files):
/// only generation `g`'s files are in use.
fn remove_backup_leftovers(storage: &dyn Storage, dir: &Path, disks: usize, g: u64) -> Result<()> {
    let mut paths = vec![base_copy_path(dir, g + 1)];
    if g >= 2 {
        paths.push(base_copy_path(dir, g - 1));
    }
    for i in 0..disks {
        paths.push(dirty_path(dir, i, g + 1));
        paths.push(cow_path(dir, i));
        if g >= 2 {
            paths.push(dirty_path(dir, i, g - 1));
        }
        // Upload records belong to one generation, like its dirty map.
        paths.push(uploaded::uploaded_path(dir, i, g + 1));
        if g >= 1 {
            paths.push(uploaded::uploaded_path(dir, i, g - 1));
        }
    }
    let mut removed = false;
    for p in paths {
        if storage.exists(&p).ctx(|| format!("stat {}", p.display()))? {
            storage
                .remove_file(&p)
                .ctx(|| format!("remove {}", p.display()))?;
            removed = true;
        }
    }
    if removed {
        storage
            .sync_dir(dir)
            .ctx(|| format!("fsync directory {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), "removed what an interrupted live backup left");
    }
    Ok(())
}

/// Before a new session starts in `dir`: removes what a session discarded
/// half-way (or an older daemon's interrupted discard) may have left there
/// that would otherwise be taken up as this one's: a live backup's
/// generation, the uploader's settings and record, a relocation.
fn remove_stale_session_state(storage: &dyn Storage, dir: &Path, disks: usize) -> Result<()> {
    let mut paths = vec![
        dir.join("since.json"),
        dir.join("upload.json"),
        dir.join("relocation.json"),
    ];
    paths.extend((0..disks).map(|i| uploaded::uploaded_path(dir, i, 0)));
    for p in paths {
        storage
            .remove_file(&p)
            .ctx(|| format!("remove {}", p.display()))?;
    }
    storage
        .sync_dir(dir)
        .ctx(|| format!("fsync directory {}", dir.display()))
}

/// Opens or creates the staging of one recovery session. Returns the disk
/// stores and whether existing staging was resumed.
pub fn open_session(
    storage: &dyn Storage,
    dir: &Path,
    m: &Manifest,
) -> Result<(Vec<DiskStore>, bool)> {
    let geometry: Vec<DiskGeometry> = m
        .disks
        .iter()
        .map(|d| DiskGeometry {
            name: d.name.clone(),
            size: d.size,
            chunk_size: d.chunk_size,
        })
        .collect();
    // A damaged one is no new session: starting one would remove the
    // live backup's files and zero the maps of the guest's writes.
    let existing = SessionMeta::load(storage, dir).map_err(|e| {
        e.context(format!(
            "staging of backup {}/{} cannot be resumed, nothing in {} was changed (discard it with `release --discard {}`)",
            m.vm,
            m.id,
            dir.display(),
            m.vm
        ))
    })?;
    let resumed = existing.is_some();
    if let Some(meta) = &existing {
        if meta.disks != geometry {
            return Err(Error::corrupt(format!(
                "staging {} does not match backup {}/{}; discard it with `release --discard`",
                dir.display(),
                m.vm,
                m.id
            )));
        }
    } else {
        storage
            .create_dir_all(dir)
            .ctx(|| format!("create {}", dir.display()))?;
    }
    let copy = dir.join("manifest.json");
    if !resumed
        || !storage
            .exists(&copy)
            .ctx(|| format!("stat {}", copy.display()))?
    {
        io::replace(storage, &copy, &m.encode()?)?;
    }
    let generation = if resumed {
        Since::load(storage, dir)?.map_or(0, |s| s.generation)
    } else {
        remove_stale_session_state(storage, dir, m.disks.len())?;
        0
    };
    remove_backup_leftovers(storage, dir, m.disks.len(), generation)?;
    let stores = m
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| open_disk(storage, dir, i, d, resumed, generation))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| match resumed {
            true => e.context(format!(
                "staging of backup {}/{} cannot be resumed (if it is damaged, discard it with `release --discard {}`)",
                m.vm, m.id, m.vm
            )),
            false => e,
        })?;
    // Written last: its presence means every file above exists.
    let meta = SessionMeta {
        vm: m.vm.clone(),
        backup: m.id.clone(),
        disks: geometry,
        created: existing.map(|e| e.created).unwrap_or_else(now_unix),
        last_recovered: now_unix(),
    };
    meta.store(storage, dir)?;
    Ok((stores, resumed))
}

fn open_disk(
    storage: &dyn Storage,
    dir: &Path,
    index: usize,
    d: &DiskManifest,
    resumed: bool,
    generation: u64,
) -> Result<DiskStore> {
    let data_path = dir.join(format!("disk{index}.data"));
    let nblocks = DiskManifest::chunk_count(d.size, d.chunk_size);
    // A new session empties whatever a discarded one left in its place.
    let how = if resumed { Open::Existing } else { Open::Empty };
    let data = storage.open(&data_path, how).map_err(|e| {
        if resumed && e.kind() == std::io::ErrorKind::NotFound {
            Error::corrupt(format!("staging file {} is missing", data_path.display()))
        } else {
            Error::io(format!("open {}", data_path.display()), e)
        }
    })?;
    let len = data.len().ctx(|| format!("stat {}", data_path.display()))?;
    if len != d.size {
        // Sized before session.json was written: a resumed one of another
        // size (even empty) lost the guest's data.
        if resumed {
            return Err(Error::corrupt(format!(
                "staging file {} has the wrong size ({len} bytes, the disk has {})",
                data_path.display(),
                d.size
            )));
        }
        data.set_len(d.size)
            .ctx(|| format!("size {}", data_path.display()))?;
    }
    let mut present = open_map(
        storage,
        &dir.join(format!("disk{index}.present")),
        MapKind::Present,
        d,
        resumed,
    )?;
    // A new session's mirror is a discarded session's: never trusted.
    let trust = resumed && data_reached_disk(data.as_ref(), &data_path);
    let added = present.attach_mirror(storage, &dir.join(format!("disk{index}.live")), trust)?;
    if added > 0 {
        tracing::info!(
            disk = index,
            blocks = added,
            "staged blocks not yet synced by the previous daemon of this boot are kept"
        );
    }
    let changed = open_map(
        storage,
        &dir.join(format!("disk{index}.changed")),
        MapKind::Changed,
        d,
        resumed,
    )?;
    let dirty = match generation {
        0 => None,
        g => {
            let p = dirty_path(dir, index, g);
            // Created durably before `since.json` named its generation: a
            // missing one would hide writes from the next backup.
            if !storage.exists(&p).ctx(|| format!("stat {}", p.display()))? {
                return Err(Error::corrupt(format!(
                    "staging map {} is missing (since.json names generation {g})",
                    p.display()
                )));
            }
            Some(PersistentBitmap::open(
                storage,
                &p,
                MapKind::Dirty,
                d.chunk_size,
                nblocks,
            )?)
        }
    };
    let uploaded = open_uploaded(storage, dir, index, d.chunk_size, nblocks, generation)?;
    Ok(DiskStore {
        data,
        present,
        changed,
        dirty,
        uploaded,
        data_path,
    })
}

/// A presence or changed map: a resumed session's as it is (it must
/// exist: both are written before session.json), a new session's all zero
/// whatever file a discarded session left.
fn open_map(
    storage: &dyn Storage,
    path: &Path,
    kind: MapKind,
    d: &DiskManifest,
    resumed: bool,
) -> Result<PersistentBitmap> {
    let nblocks = DiskManifest::chunk_count(d.size, d.chunk_size);
    if resumed {
        PersistentBitmap::open_existing(storage, path, kind, d.chunk_size, nblocks)
    } else {
        PersistentBitmap::create(storage, path, kind, d.chunk_size, nblocks)
    }
}

/// Whether the staging data a previous daemon of this boot wrote reached
/// the disk. The mirror names blocks whose bytes it wrote, maybe unsynced;
/// a writeback error it never saw (killed before its next flush) shows at
/// the first sync of this new descriptor, and then the kernel may have
/// dropped those pages: the mirror must not be trusted (and the epoch
/// changes). Logged, not fatal: synced presence bits stay valid.
fn data_reached_disk(data: &dyn io::BlockFile, path: &Path) -> bool {
    match data.sync_data() {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                "fsync {}: {e}; blocks staged but not flushed before the restart are fetched again, and writes acknowledged but not flushed may be lost (the disk's epoch changes)",
                path.display()
            );
            false
        }
    }
}

/// The disk's upload record of generation `g`, if there is one. A damaged
/// one is said in one line and removed: its blocks are read again (by the
/// uploader or the next live backup), never taken on trust.
fn open_uploaded(
    storage: &dyn Storage,
    dir: &Path,
    index: usize,
    block_size: u32,
    nblocks: u64,
    g: u64,
) -> Result<Option<(uploaded::UploadRecord, uploaded::Entries)>> {
    let p = uploaded::uploaded_path(dir, index, g);
    if !storage.exists(&p).ctx(|| format!("stat {}", p.display()))? {
        return Ok(None);
    }
    match uploaded::UploadRecord::open(storage, &p, block_size, nblocks, g) {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.kind() == crate::error::ErrorKind::Corrupt => {
            tracing::warn!(
                disk = index,
                "upload record dropped, every dirty block of disk{index} will be read again: {e}"
            );
            storage
                .remove_file(&p)
                .ctx(|| format!("remove {}", p.display()))?;
            io::sync_parent(storage, &p)?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefetch::Scheduler;
    use crate::repo::Repository;
    use crate::volume::Volume;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    const BS: usize = 65536;

    /// A backup of one 4-block disk and its session directory on the real
    /// filesystem, opened as `recover` opens it.
    struct Backed {
        dir: tempfile::TempDir,
        repo: Arc<Repository>,
        m: Manifest,
        data: Vec<u8>,
        sched: Arc<Scheduler>,
    }

    impl Backed {
        fn new() -> Backed {
            let dir = tempfile::tempdir().unwrap();
            let (repo, _) =
                Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
            let mut data = vec![0u8; 4 * BS];
            rand::rngs::StdRng::seed_from_u64(7).fill(&mut data[..]);
            let m = crate::testutil::backup_images(&repo, dir.path(), "vm", BS, &[&data]);
            Backed {
                dir,
                repo,
                m,
                data,
                sched: Scheduler::new("test-fetch", 2),
            }
        }

        fn session(&self) -> PathBuf {
            self.dir.path().join("st/sessions/vm").join(&self.m.id)
        }

        fn open(&self) -> Arc<Volume> {
            crate::testutil::open_volumes(
                &OsStorage,
                &self.session(),
                &self.repo,
                &self.m,
                &self.sched,
            )
            .remove(0)
        }
    }

    #[test]
    fn a_session_dir_half_removed_by_an_interrupted_discard_never_serves_its_old_presence_bits() {
        // remove_dir_all deletes in readdir order: a crash can leave the
        // maps (and the mirror) without session.json, with or without the
        // data file.
        for guest_wrote in [false, true] {
            let b = Backed::new();
            let vol = b.open();
            if guest_wrote {
                vol.write(0, &vec![7u8; BS]).unwrap();
            } else {
                assert_eq!(vol.read(0, BS).unwrap(), b.data[..BS]);
                vol.quiesce(Duration::from_secs(30));
            }
            vol.flush().unwrap();
            vol.close();
            drop(vol);
            fs::remove_file(b.session().join("session.json")).unwrap();
            if !guest_wrote {
                fs::remove_file(b.session().join("disk0.data")).unwrap();
            }
            let vol = b.open();
            assert!(
                vol.read(0, BS).unwrap() == b.data[..BS],
                "a new session served block 0 from a discarded session's staging (guest wrote: {guest_wrote})"
            );
            let st = vol.status();
            assert_eq!(
                st.blocks_changed, 0,
                "a discarded session's changed bits carried over"
            );
            vol.close();
        }
    }

    #[test]
    fn a_discard_commits_by_renaming_the_session_aside_and_the_next_open_finishes_it() {
        let b = Backed::new();
        let root = b.dir.path().join("st");
        let st = StagingDir::open(&root, "repo1", "/r").unwrap();
        b.open().close();
        assert_eq!(st.kept_sessions("vm").len(), 1);
        // A discard killed right after its commit (the rename aside).
        let aside = b
            .session()
            .with_file_name(format!("{DISCARDING}{}-0123", b.m.id));
        fs::rename(b.session(), &aside).unwrap();
        assert!(
            st.kept_sessions("vm").is_empty(),
            "a session being discarded was taken for a kept session"
        );
        assert!(inventory::list(&root).unwrap().is_empty());
        drop(st);
        let st = StagingDir::open(&root, "repo1", "/r").unwrap();
        assert!(
            !aside.exists(),
            "the next open did not finish the interrupted discard"
        );
        b.open().close();
        st.discard("vm", &b.m.id).unwrap();
        assert_eq!(
            fs::read_dir(root.join("sessions/vm")).unwrap().count(),
            0,
            "a discard left something behind"
        );
    }

    /// Every file in `dir` and its bytes.
    fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let bytes = fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_damaged_session_json_is_an_error_naming_it_and_removes_nothing() {
        let b = Backed::new();
        let root = b.dir.path().join("st");
        let st = StagingDir::open(&root, "repo1", "/r").unwrap();
        let vol = b.open();
        vol.write(0, &vec![7u8; BS]).unwrap();
        vol.flush().unwrap();
        vol.close();
        drop(vol);
        // A session after a live backup: generation 1's files, which a
        // new session would remove as leftovers.
        let dir = b.session();
        Since {
            generation: 1,
            base: b.m.id.clone(),
        }
        .store(&OsStorage, &dir)
        .unwrap();
        fs::copy(dir.join("manifest.json"), base_copy_path(&dir, 1)).unwrap();
        PersistentBitmap::create(
            &OsStorage,
            &dirty_path(&dir, 0, 1),
            MapKind::Dirty,
            BS as u32,
            4,
        )
        .unwrap();
        let session_json = dir.join("session.json");
        fs::write(&session_json, b"{\"vm\": \"vm\", \"back").unwrap();
        let before = contents(&dir);

        let e = open_session(&OsStorage, &dir, &b.m)
            .err()
            .expect("a damaged session.json was taken for a new session");
        assert!(
            e.to_string().contains(&session_json.display().to_string()),
            "{e}"
        );
        assert!(e.to_string().contains("release --discard vm"), "{e}");
        assert!(
            contents(&dir) == before,
            "opening a damaged session changed its files"
        );
        assert!(st.kept_sessions("vm").is_empty());
        assert_eq!(st.damaged_sessions("vm"), vec![b.m.id.clone()]);
        st.discard("vm", &b.m.id).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn a_resumed_session_with_a_missing_changed_or_present_map_is_refused_naming_it() {
        for file in ["disk0.changed", "disk0.present", "disk0.data"] {
            let b = Backed::new();
            let vol = b.open();
            vol.write(0, &vec![7u8; BS]).unwrap();
            vol.flush().unwrap();
            vol.close();
            drop(vol);
            let p = b.session().join(file);
            if file.ends_with(".data") {
                // Emptied: as good as gone.
                File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(0)
                    .unwrap();
            } else {
                fs::remove_file(&p).unwrap();
            }
            let e = open_session(&OsStorage, &b.session(), &b.m)
                .err()
                .unwrap_or_else(|| {
                    panic!("a resumed session with {file} missing or emptied was opened")
                });
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            if !file.ends_with(".data") {
                assert!(!p.exists(), "{file} was recreated");
            }
        }
    }

    #[test]
    fn a_locked_staging_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = StagingDir::open(&d.path().join("st"), "repo1", "/r").unwrap();
        let e = StagingDir::open(&d.path().join("st"), "repo1", "/r")
            .err()
            .unwrap();
        assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
        assert!(e.to_string().contains("in use"), "{e}");
        drop(s);
        StagingDir::open(&d.path().join("st"), "repo1", "/r").unwrap();
    }

    #[test]
    fn staging_of_another_repository_is_refused() {
        let d = tempfile::tempdir().unwrap();
        drop(StagingDir::open(&d.path().join("st"), "repo1", "/r1").unwrap());
        let e = StagingDir::open(&d.path().join("st"), "repo2", "/r2")
            .err()
            .unwrap();
        assert!(e.to_string().contains("another repository"), "{e}");
    }
}
