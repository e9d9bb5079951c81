//! The local staging store: where fetched blocks and guest writes live.
//!
//! ```text
//! <staging>/staging.json                      which repository this belongs to
//! <staging>/lock                              flock held by the serving daemon
//! <staging>/sessions/<vm>/<backup>/session.json   geometry; written last
//! <staging>/sessions/<vm>/<backup>/diskN.data     sparse, disk-sized block data
//! <staging>/sessions/<vm>/<backup>/diskN.present  blocks whose data is local
//! <staging>/sessions/<vm>/<backup>/diskN.changed  blocks the guest wrote
//! ```
//! Blocks are the disk's chunks, so one presence bit covers one fetch.

pub mod bitmap;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use bitmap::{AtomicBitmap, MapKind, PersistentBitmap};

use crate::error::{Error, IoContext, Result};
use crate::repo::{DiskManifest, Manifest};
use crate::util::{fsync_dir, now_unix, write_atomic};

#[derive(Debug, Serialize, Deserialize)]
struct StagingInfo {
    format: String,
    repo_id: String,
    repo: String,
}

/// An opened, locked staging directory. Dropping it releases the lock.
pub struct StagingDir {
    root: PathBuf,
    _lock: File,
}

impl StagingDir {
    /// Opens (creating if needed) a staging directory for `repo_id` and
    /// takes its lock, so two daemons never share one.
    pub fn open(root: &Path, repo_id: &str, repo_location: &str) -> Result<StagingDir> {
        if !root.exists() {
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
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .ctx(|| format!("chmod {}", root.display()))?;
        let lock = Self::lock(&root)?;
        let info_path = root.join("staging.json");
        match fs::read(&info_path) {
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
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let is_empty = fs::read_dir(&root)
                    .map(|mut d| d.all(|e| e.map(|e| e.file_name() == "lock").unwrap_or(false)))
                    .unwrap_or(false);
                if !is_empty {
                    return Err(Error::invalid(format!(
                        "{} is not empty and is not a recoverfs staging directory",
                        root.display()
                    )));
                }
                let info = StagingInfo {
                    format: "recoverfs-staging-1".into(),
                    repo_id: repo_id.into(),
                    repo: repo_location.into(),
                };
                write_atomic(
                    &info_path,
                    &serde_json::to_vec_pretty(&info).expect("json"),
                    0o600,
                    true,
                )?;
            }
            Err(e) => return Err(Error::io(format!("read {}", info_path.display()), e)),
        }
        Ok(StagingDir { root, _lock: lock })
    }

    fn lock(root: &Path) -> Result<File> {
        let path = root.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        // SAFETY: flock on an fd we own; no memory is involved.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
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
        }
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

    pub fn session_dir(&self, vm: &str, backup: &str) -> PathBuf {
        self.root.join("sessions").join(vm).join(backup)
    }

    /// Kept sessions of a VM, most recently recovered first.
    pub fn kept_sessions(&self, vm: &str) -> Vec<(String, u64)> {
        let dir = self.root.join("sessions").join(vm);
        let mut out: Vec<(String, u64)> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let backup = e.file_name().to_str()?.to_string();
                let meta = SessionMeta::load(&e.path()).ok()?;
                Some((backup, meta.last_recovered))
            })
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        out
    }

    /// Deletes a session's staging data for good.
    pub fn discard(&self, vm: &str, backup: &str) -> Result<()> {
        let dir = self.session_dir(vm, backup);
        if dir.exists() {
            fs::remove_dir_all(&dir).ctx(|| format!("remove {}", dir.display()))?;
            fsync_dir(dir.parent().expect("has parent"))?;
        }
        Ok(())
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
    fn load(dir: &Path) -> Result<SessionMeta> {
        let p = dir.join("session.json");
        let bytes = fs::read(&p).ctx(|| format!("read {}", p.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", p.display())))
    }

    fn store(&self, dir: &Path) -> Result<()> {
        write_atomic(
            &dir.join("session.json"),
            &serde_json::to_vec_pretty(self).expect("json"),
            0o600,
            true,
        )
    }
}

/// The files of one staged disk.
pub struct DiskStore {
    pub data: File,
    pub present: PersistentBitmap,
    pub changed: PersistentBitmap,
    pub data_path: PathBuf,
}

/// Opens or creates the staging of one recovery session. Returns the disk
/// stores and whether existing staging was resumed.
pub fn open_session(dir: &Path, m: &Manifest) -> Result<(Vec<DiskStore>, bool)> {
    let geometry: Vec<DiskGeometry> = m
        .disks
        .iter()
        .map(|d| DiskGeometry {
            name: d.name.clone(),
            size: d.size,
            chunk_size: d.chunk_size,
        })
        .collect();
    let existing = SessionMeta::load(dir).ok();
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
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(|| format!("create {}", dir.display()))?;
        fsync_dir(dir.parent().expect("has parent"))?;
    }
    let stores = m
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| open_disk(dir, i, d, resumed))
        .collect::<Result<Vec<_>>>()?;
    // Written last: its presence means every file above exists.
    let meta = SessionMeta {
        vm: m.vm.clone(),
        backup: m.id.clone(),
        disks: geometry,
        created: existing.map(|e| e.created).unwrap_or_else(now_unix),
        last_recovered: now_unix(),
    };
    meta.store(dir)?;
    Ok((stores, resumed))
}

fn open_disk(dir: &Path, index: usize, d: &DiskManifest, resumed: bool) -> Result<DiskStore> {
    let data_path = dir.join(format!("disk{index}.data"));
    let nblocks = DiskManifest::chunk_count(d.size, d.chunk_size);
    if resumed && !data_path.exists() {
        return Err(Error::corrupt(format!(
            "staging file {} is missing",
            data_path.display()
        )));
    }
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&data_path)
        .ctx(|| format!("open {}", data_path.display()))?;
    let len = data
        .metadata()
        .ctx(|| format!("stat {}", data_path.display()))?
        .len();
    if len != d.size {
        if resumed && len != 0 {
            return Err(Error::corrupt(format!(
                "staging file {} has the wrong size",
                data_path.display()
            )));
        }
        data.set_len(d.size)
            .ctx(|| format!("size {}", data_path.display()))?;
        data.sync_all()
            .ctx(|| format!("fsync {}", data_path.display()))?;
    }
    let present = PersistentBitmap::open(
        &dir.join(format!("disk{index}.present")),
        MapKind::Present,
        d.chunk_size,
        nblocks,
    )?;
    let changed = PersistentBitmap::open(
        &dir.join(format!("disk{index}.changed")),
        MapKind::Changed,
        d.chunk_size,
        nblocks,
    )?;
    Ok(DiskStore {
        data,
        present,
        changed,
        data_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
