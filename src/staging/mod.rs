//! The local staging store: where fetched blocks and guest writes live.
//!
//! ```text
//! <staging>/staging.json                      which repository this belongs to (with a copy of its repo.json), and this directory's id
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
pub mod last_exports;
pub mod last_mount;
pub mod live;
pub mod session_files;
pub mod set;
pub mod unpins;
pub mod uploaded;

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use bitmap::{AtomicBitmap, MapKind, PersistentBitmap};
pub use io::{BlockFile, Open, OsStorage, Storage};
pub use session_files::{
    base_copy_path, cow_path, dirty_path, open_session, DiskGeometry, DiskStore, SessionMeta, Since,
};
pub use set::StagingSet;

use crate::error::{Error, IoContext, Result};
use crate::repo::limits::{MAX_MANIFEST_BYTES, MAX_META_BYTES};
use crate::repo::Manifest;
use crate::util::write_atomic;

/// The file that makes a directory a staging directory (`staging.json`):
/// a relocation target is never inside one (`relocate`).
pub const STAGING_MARKER: &str = "staging.json";

#[derive(Debug, Serialize, Deserialize)]
struct StagingInfo {
    format: String,
    repo_id: String,
    repo: String,
    /// This directory's own random id, made once: the repository's pins
    /// name it, so that a daemon knows its pins whatever its host is
    /// called now, and two hosts of one name with the same paths (clones,
    /// containers) never take each other's (`repo::pins`). Directories set
    /// up before ids get one at their next open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    /// Set up before ids: its sessions may have pins of the old key
    /// (host and path), which their pins with the id replace. Kept for
    /// good: a session kept now may be resumed, and re-pinned, after
    /// many restarts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    legacy_pins: bool,
    /// A copy of the repository's `repo.json`, so that a daemon restarted
    /// while the repository does not answer can still serve what staging
    /// holds (`Repository::open_recorded`). Written at each start with a
    /// repository that answers, if it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    repo_info: Option<crate::repo::RepoInfo>,
}

/// In a session's directory: present while its repository pin could not
/// be written (see [`StagingDir::set_pin_owed`]).
pub const PIN_OWED: &str = "pin-owed";

/// The staging directory holding session directory `session`
/// (`<staging>/sessions/<vm>/<backup>`).
pub fn root_of_session(session: &Path) -> Option<&Path> {
    session.ancestors().nth(3)
}

/// The id of the staging directory `root`, read from its `staging.json`;
/// `None` if there is none there (a disk not mounted, a directory gone)
/// or it has no id yet.
pub fn id_at(root: &Path) -> Result<Option<String>> {
    Ok(read_info(root)?.and_then(|i| i.id))
}

/// `root`'s `staging.json`, if there is one.
fn read_info(root: &Path) -> Result<Option<StagingInfo>> {
    let path = root.join(STAGING_MARKER);
    let Some(bytes) = OsStorage
        .read(&path, MAX_META_BYTES)
        .ctx(|| format!("read {}", path.display()))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", path.display())))
}

/// The repository the staging directory `root` records: where it was,
/// and its copy of the repository's identity (`StagingInfo::repo_info`).
/// `None` if `root` is no staging directory or has no copy (set up by a
/// daemon that kept none, and not opened with its repository since).
pub fn recorded_repository(root: &Path) -> Result<Option<(String, crate::repo::RepoInfo)>> {
    let Some(info) = read_info(root)? else {
        return Ok(None);
    };
    Ok(info
        .repo_info
        .filter(|r| r.id == info.repo_id)
        .map(|r| (info.repo, r)))
}

/// An opened, locked staging directory. Dropping it releases the lock.
pub struct StagingDir {
    root: PathBuf,
    storage: Arc<dyn Storage>,
    /// Its id (`StagingInfo::id`).
    id: String,
    /// It was set up before ids: its sessions may have pins of the old
    /// key, which their pins replace (`StagingInfo::legacy_pins`).
    predates_ids: bool,
    /// What this directory's sessions hold, and its limit (see `budget`).
    budget: Arc<budget::Budget>,
    /// Session directories whose damage was logged (once each).
    reported: parking_lot::Mutex<std::collections::HashSet<PathBuf>>,
    _lock: File,
}

/// What `StagingDir::open` found before touching anything.
enum Found {
    /// A staging directory of the right repository.
    Ours(Box<StagingInfo>),
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
        let predates_ids = match &found {
            Found::Ours(info) => info.legacy_pins || info.id.is_none(),
            Found::Empty => false,
        };
        let id = match found {
            Found::Ours(info) if info.id.is_some() => info.id.expect("checked"),
            // Set up before ids: given one now, written (durably, replacing
            // the file atomically) before any pin can name it.
            Found::Ours(mut info) => {
                let id = crate::repo::random_hex(16);
                info.id = Some(id.clone());
                info.legacy_pins = true;
                write_info(&root, &info)?;
                id
            }
            Found::Empty => {
                let id = crate::repo::random_hex(16);
                let info = StagingInfo {
                    format: "recoverfs-staging-1".into(),
                    repo_id: repo_id.into(),
                    repo: repo_location.into(),
                    id: Some(id.clone()),
                    legacy_pins: false,
                    repo_info: None,
                };
                write_info(&root, &info)?;
                id
            }
        };
        Ok(StagingDir {
            budget: budget::Budget::new(&root),
            reported: Default::default(),
            root,
            storage,
            id,
            predates_ids,
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
                Ok(Found::Ours(Box::new(info)))
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

    /// Keeps `info`, the identity of the repository that has just
    /// answered as this directory's, in `staging.json` (replaced
    /// atomically, synced), unless it is there already.
    pub fn record_repository(&self, info: &crate::repo::RepoInfo) -> Result<()> {
        let path = self.root.join(STAGING_MARKER);
        let bytes = OsStorage
            .read(&path, MAX_META_BYTES)
            .ctx(|| format!("read {}", path.display()))?
            .ok_or_else(|| Error::not_found(format!("{} is gone", path.display())))?;
        let mut staged: StagingInfo = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", path.display())))?;
        if staged.repo_id != info.id || staged.repo_info.as_ref() == Some(info) {
            return Ok(());
        }
        staged.repo_info = Some(info.clone());
        write_info(&self.root, &staged)
    }

    /// This directory's id, which its sessions' pins name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether it was set up before ids: its sessions' pins replace pins
    /// of the old key (see `StagingInfo::legacy_pins`).
    pub fn predates_ids(&self) -> bool {
        self.predates_ids
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
                            "kept staging not resumed: {e}; discard it with `release {vm} --discard --backup {backup}`"
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

    /// Replaces a kept session's copy of its manifest (a damaged one, by
    /// the repository's, which was checked when read).
    pub fn replace_kept_manifest(&self, m: &Manifest) -> Result<()> {
        let p = self.session_dir(&m.vm, &m.id).join("manifest.json");
        io::replace(self.storage.as_ref(), &p, &m.encode()?)
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
        // A resumed session is marked so already: nothing to write (which
        // a full staging filesystem could not), only its name made durable
        // in case a crash came between its rename and that sync.
        let limit = placement.len() as u64 + 1;
        if self.storage.read(&p, limit).ok().flatten().as_deref() == Some(placement) {
            return io::sync_parent(self.storage.as_ref(), &p);
        }
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

    /// Records durably whether the kept session of `vm` from `backup` owes
    /// its repository pin (the write failed at release: a repository full
    /// or read-only). A daemon writes owed pins at every check, also of
    /// sessions it does not serve, so the marker must outlive the
    /// released session and the daemon (explore10 H1). Touches the
    /// filesystem only when the answer changes.
    pub fn set_pin_owed(&self, vm: &str, backup: &str, owed: bool) -> Result<()> {
        let p = self.session_dir(vm, backup).join(PIN_OWED);
        match (owed, self.pin_owed(vm, backup)) {
            (true, false) => io::replace(self.storage.as_ref(), &p, b""),
            (false, true) => {
                self.storage
                    .remove_file(&p)
                    .ctx(|| format!("remove {}", p.display()))?;
                io::sync_parent(self.storage.as_ref(), &p)
            }
            _ => Ok(()),
        }
    }

    /// Whether the kept session of `vm` from `backup` owes its pin.
    pub fn pin_owed(&self, vm: &str, backup: &str) -> bool {
        self.session_dir(vm, backup).join(PIN_OWED).exists()
    }

    /// Kept sessions (VM, backup) that owe their repository pin.
    /// Looks for the marker only: asked every 10 s, it must not read and
    /// parse every kept session's `session.json` to find none.
    pub fn owed_pins(&self) -> Vec<(String, String)> {
        let mut out = vec![];
        for vm in self.session_vms() {
            let dirs = fs::read_dir(self.root.join("sessions").join(&vm));
            for e in dirs.into_iter().flatten().flatten() {
                let Some(b) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let named = crate::util::validate_name("backup id", &b).is_ok();
                if named && e.path().join(PIN_OWED).exists() {
                    out.push((vm.clone(), b));
                }
            }
        }
        out
    }

    /// Sessions marked active, one per VM (the most recently recovered if
    /// a crash left more than one).
    pub fn active_sessions(&self) -> Vec<(String, String)> {
        let mut out = vec![];
        for vm in self.session_vms() {
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

    /// Sessions marked served (`active`) whose `session.json` does not
    /// read: never resumed, so their pins must not say served.
    pub fn active_damaged_sessions(&self) -> Vec<(String, String)> {
        let mut out = vec![];
        for vm in self.session_vms() {
            for b in self.damaged_sessions(&vm) {
                if self.session_dir(&vm, &b).join("active").exists() {
                    out.push((vm.clone(), b));
                }
            }
        }
        out
    }

    /// The VMs with a directory under `sessions/` (valid names only).
    fn session_vms(&self) -> Vec<String> {
        fs::read_dir(self.root.join("sessions"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|vm| crate::util::validate_name("VM name", vm).is_ok())
            .collect()
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

/// Writes `root`'s `staging.json`: a temporary file, synced, renamed over
/// it, the directory synced.
fn write_info(root: &Path, info: &StagingInfo) -> Result<()> {
    let json = serde_json::to_vec_pretty(info).expect("json");
    write_atomic(&root.join(STAGING_MARKER), &json, 0o600, true)
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

#[cfg(test)]
mod tests;
