//! `recoverfs staging ls` / `staging drop`: kept sessions of staging
//! directories, read without a daemon, and dropping one.
//!
//! Listing only reads (it never creates a map or takes the lock). Dropping
//! takes the directory's lock (`<staging>/lock`, the flock every serving
//! daemon holds): while a daemon serves from the directory, a drop is
//! refused and `release --discard` is the way, so a session being served
//! is never removed under its guest.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::bitmap::{MapKind, PersistentBitmap};
use super::io::OsStorage;
use super::{budget::allocated_data_bytes, SessionMeta};
use crate::error::{Error, Result};
use crate::repo::DiskManifest;

/// One kept session, as `staging ls` shows it.
#[derive(Debug, Serialize)]
pub struct KeptSession {
    pub staging: PathBuf,
    pub vm: String,
    pub backup: String,
    pub disks: usize,
    /// Allocated bytes of the data files.
    pub bytes_held: u64,
    /// Bytes of blocks the guest changed (whole blocks).
    pub changed_bytes: u64,
    pub last_recovered: u64,
    /// Marked active: a daemon served it last (and serves it now if the
    /// directory is locked).
    pub active: bool,
    /// Its repository pin could not be written (`StagingDir::set_pin_owed`):
    /// the backup it reads is not protected from `forget` until it is.
    pub pin_owed: bool,
    /// Why its `session.json` cannot be read: it cannot be resumed, only
    /// dropped (the other figures are then 0 but `bytes_held`).
    pub damaged: Option<String>,
}

/// The pid of the daemon holding `root`'s lock, `Some(0)` if held by an
/// unknown process, `None` if free.
pub fn lock_holder(root: &Path) -> Result<Option<u32>> {
    let path = root.join("lock");
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
    };
    if crate::util::try_flock(&f, false) {
        return Ok(None);
    }
    let pid = std::fs::read_to_string(&path).unwrap_or_default();
    Ok(Some(pid.trim().parse().unwrap_or(0)))
}

fn check_staging(root: &Path) -> Result<()> {
    if !root.join("staging.json").is_file() {
        return Err(Error::invalid(format!(
            "{} is not a recoverfs staging directory",
            root.display()
        )));
    }
    Ok(())
}

/// The staging directories `staging ls` lists for `dirs`: each, then each
/// export point's own staging that one of them (a main staging) has served
/// with, so that `--staging MAIN` shows every session its daemon keeps.
/// Second: those recorded that are no staging directory now (their disk
/// not mounted, say), to be named rather than listed.
pub fn with_point_stagings(dirs: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    // Recorded paths are resolved: compare resolved ones.
    let resolved = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut seen: Vec<PathBuf> = dirs.iter().map(|d| resolved(d)).collect();
    let (mut out, mut missing) = (dirs.to_vec(), vec![]);
    for d in dirs {
        for p in super::set::point_stagings(d)? {
            if seen.contains(&p) || seen.contains(&resolved(&p)) {
                continue;
            }
            seen.push(p.clone());
            if p.join(super::STAGING_MARKER).is_file() {
                out.push(p);
            } else {
                missing.push(p);
            }
        }
    }
    Ok((out, missing))
}

/// Every kept session of the staging directory `root`.
pub fn list(root: &Path) -> Result<Vec<KeptSession>> {
    check_staging(root)?;
    let mut out = vec![];
    let sessions = root.join("sessions");
    for vm in std::fs::read_dir(&sessions).into_iter().flatten().flatten() {
        for s in std::fs::read_dir(vm.path()).into_iter().flatten().flatten() {
            if crate::util::validate_name("backup id", &s.file_name().to_string_lossy()).is_err() {
                continue; // a discard in progress, say
            }
            let dir = s.path();
            let meta = match SessionMeta::load(&OsStorage, &dir) {
                Ok(Some(meta)) => meta,
                Ok(None) => continue, // never completed: not a session
                Err(e) => {
                    // Shown, so that it can be seen and dropped.
                    out.push(KeptSession {
                        staging: root.to_path_buf(),
                        vm: vm.file_name().to_string_lossy().into_owned(),
                        backup: s.file_name().to_string_lossy().into_owned(),
                        disks: 0,
                        bytes_held: allocated_data_bytes(&dir),
                        changed_bytes: 0,
                        last_recovered: 0,
                        active: dir.join("active").exists(),
                        pin_owed: dir.join(super::PIN_OWED).exists(),
                        damaged: Some(e.to_string()),
                    });
                    continue;
                }
            };
            // A map that cannot be read: listed damaged, not a failed
            // listing (which would also block every drop here).
            let (changed, damaged) = match changed_bytes(&dir, &meta) {
                Ok(c) => (c, None),
                Err(e) => (0, Some(e.to_string())),
            };
            out.push(KeptSession {
                staging: root.to_path_buf(),
                changed_bytes: changed,
                bytes_held: allocated_data_bytes(&dir),
                disks: meta.disks.len(),
                active: dir.join("active").exists(),
                pin_owed: dir.join(super::PIN_OWED).exists(),
                last_recovered: meta.last_recovered,
                vm: meta.vm,
                backup: meta.backup,
                damaged,
            });
        }
    }
    out.sort_by(|a, b| (&a.vm, &a.backup).cmp(&(&b.vm, &b.backup)));
    Ok(out)
}

/// Bytes the guest changed and when it was last recovered, of the kept
/// session in `dir` (for a `recover` that lists its choices).
pub(crate) fn summary(dir: &Path) -> Result<(u64, u64)> {
    let meta = SessionMeta::load(&OsStorage, dir)?
        .ok_or_else(|| Error::not_found(format!("{}/session.json", dir.display())))?;
    Ok((changed_bytes(dir, &meta)?, meta.last_recovered))
}

fn changed_bytes(dir: &Path, meta: &SessionMeta) -> Result<u64> {
    let mut total = 0;
    for (i, d) in meta.disks.iter().enumerate() {
        let p = dir.join(format!("disk{i}.changed"));
        if !p.exists() {
            continue;
        }
        let nblocks = DiskManifest::chunk_count(d.size, d.chunk_size);
        let m = PersistentBitmap::open(&OsStorage, &p, MapKind::Changed, d.chunk_size, nblocks)?;
        total += m.bits().count() * d.chunk_size as u64;
    }
    Ok(total)
}

/// Removes kept sessions of `vm` (only `backup` if given) from `root`;
/// refused while a daemon holds the directory, and for a session a daemon
/// was serving when it died unless `force`. Returns what was removed.
pub fn drop_sessions(
    root: &Path,
    vm: &str,
    backup: Option<&str>,
    force: bool,
) -> Result<Vec<String>> {
    crate::util::validate_name("VM name", vm)?;
    if let Some(b) = backup {
        crate::util::validate_name("backup id", b)?;
    }
    check_staging(root)?;
    let lock = super::StagingDir::lock(root)?;
    super::remove_discard_leftovers(root);
    let chosen: Vec<KeptSession> = list(root)?
        .into_iter()
        .filter(|s| s.vm == vm && backup.is_none_or(|b| b == s.backup))
        .collect();
    // The lock is ours, so no daemon serves it: an `active` marker is a
    // daemon that died (killed), whose guest may be waiting to reconnect.
    if let Some(s) = chosen.iter().find(|s| s.active && !force) {
        return Err(Error::invalid(format!(
            "the session of VM {vm} from backup {} in {} was active when its daemon stopped (its guest may be waiting to reconnect): start the daemon to resume it, or drop it with --force",
            s.backup,
            root.display()
        )));
    }
    let mut removed = vec![];
    for s in chosen {
        let dir = root.join("sessions").join(vm).join(&s.backup);
        super::remove_session_dir(&OsStorage, &dir)?;
        removed.push(s.backup);
    }
    drop(lock);
    if removed.is_empty() {
        return Err(Error::not_found(format!(
            "no kept session of VM {vm}{} in {}",
            backup
                .map(|b| format!(" from backup {b}"))
                .unwrap_or_default(),
            root.display()
        )));
    }
    Ok(removed)
}

/// Removes the pins of `vm` (only of `backup` if given) of sessions in
/// `root` whose session directory is gone: a dropped session's pin would
/// keep its backup from `forget` for ever. Returns the backups they pinned.
pub fn remove_stale_pins(
    repo: &crate::repo::Repository,
    root: &Path,
    vm: &str,
    backup: Option<&str>,
) -> Result<Vec<String>> {
    use crate::repo::pins;
    let root = std::fs::canonicalize(root)
        .map_err(|e| Error::io(format!("resolve {}", root.display()), e))?;
    let sessions = root.join("sessions").join(vm);
    let id = super::id_at(&root)?;
    let host = pins::hostname();
    let mut removed = vec![];
    for pin in pins::of_vm(repo, vm)? {
        let named = Path::new(&pin.staging).file_name();
        // Of this directory: by its id (whatever the host was called and
        // wherever the directory was mounted), or for a pin from before
        // ids by this host's name and the path.
        let dir = match &pin.staging_id {
            Some(p) if Some(p) == id.as_ref() => named.map(|n| sessions.join(n)),
            Some(_) => None,
            None => Some(PathBuf::from(&pin.staging))
                .filter(|d| pin.host == host && d.parent() == Some(sessions.as_path())),
        };
        let Some(dir) = dir else { continue };
        let named = backup.is_none_or(|b| dir.file_name() == Some(b.as_ref()));
        // `exists` false on an error too: then the next check is the drop's.
        if named && !dir.exists() {
            pins::remove(repo, &pin)?;
            removed.extend(pin.backups);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staging directory at `<d>/staging` with a kept session of `vm`
    /// from backup `b1`, one 1 MiB disk; returns (root, session dir).
    fn kept(d: &Path, vm: &str) -> (PathBuf, PathBuf) {
        let root = d.join("staging");
        drop(super::super::StagingDir::open(&root, "repo1", "/r").unwrap());
        let dir = root.join("sessions").join(vm).join("b1");
        std::fs::create_dir_all(&dir).unwrap();
        let meta = SessionMeta {
            vm: vm.into(),
            backup: "b1".into(),
            disks: vec![super::super::DiskGeometry {
                name: "disk0".into(),
                size: 1 << 20,
                chunk_size: 64 << 10,
            }],
            created: 1,
            last_recovered: 1,
        };
        std::fs::write(dir.join("session.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        (root, dir)
    }

    #[test]
    fn a_kept_session_with_a_damaged_changed_map_is_listed_damaged_and_can_be_dropped() {
        let d = tempfile::tempdir().unwrap();
        let (root, dir) = kept(d.path(), "vm");
        let (_, other) = kept(d.path(), "other");
        std::fs::write(dir.join("disk0.changed"), b"garbage").unwrap();
        let l = list(&root).unwrap();
        assert_eq!(l.len(), 2, "{l:?}");
        let why = l[1].damaged.as_deref().expect("shown as damaged");
        assert!(why.contains("disk0.changed"), "{why}");
        assert!(l[0].damaged.is_none(), "{l:?}");
        assert_eq!(drop_sessions(&root, "other", None, false).unwrap(), ["b1"]);
        assert!(!other.exists());
        assert_eq!(drop_sessions(&root, "vm", None, false).unwrap(), ["b1"]);
        assert!(!dir.exists());
    }

    #[test]
    fn the_main_stagings_listing_adds_the_stagings_its_export_points_served_with() {
        let d = tempfile::tempdir().unwrap();
        let (main, _) = kept(d.path(), "vm");
        let (own, _) = kept(&d.path().join("disk2"), "vm2");
        let gone = d.path().join("disk3/staging");
        // As the daemon records them: resolved paths.
        let own = std::fs::canonicalize(&own).unwrap();
        let known = serde_json::to_vec(&[&own, &gone]).unwrap();
        std::fs::write(main.join("point-stagings.json"), known).unwrap();
        let (dirs, missing) = with_point_stagings(std::slice::from_ref(&main)).unwrap();
        assert_eq!(dirs, [main.clone(), own.clone()]);
        assert_eq!(missing, [gone]);
        let vms: Vec<String> = dirs
            .iter()
            .flat_map(|d| list(d).unwrap())
            .map(|s| s.vm)
            .collect();
        assert_eq!(vms, ["vm", "vm2"]);
        // Named as well: listed once.
        let (dirs, _) = with_point_stagings(&[main.clone(), own.clone()]).unwrap();
        assert_eq!(dirs, [main, own]);
    }

    #[test]
    fn a_session_active_when_its_daemon_died_is_dropped_only_with_force() {
        let d = tempfile::tempdir().unwrap();
        let (root, dir) = kept(d.path(), "vm");
        std::fs::write(dir.join("active"), b"").unwrap();
        assert!(list(&root).unwrap()[0].active);
        let e = drop_sessions(&root, "vm", None, false)
            .expect_err("an active session was dropped")
            .to_string();
        assert!(e.contains("active") && e.contains("--force"), "{e}");
        assert!(dir.join("session.json").exists(), "removed anyway");
        assert_eq!(drop_sessions(&root, "vm", None, true).unwrap(), ["b1"]);
        assert!(!dir.exists());
    }

    #[test]
    fn a_damaged_kept_session_is_listed_as_such_and_can_be_dropped() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("staging");
        drop(super::super::StagingDir::open(&root, "repo1", "/r").unwrap());
        let dir = root.join("sessions/vm/20261123-120000");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("session.json"), b"{not json").unwrap();
        let l = list(&root).unwrap();
        assert_eq!(l.len(), 1, "a damaged session is not listed");
        assert_eq!(
            (l[0].vm.as_str(), l[0].backup.as_str()),
            ("vm", "20261123-120000")
        );
        let why = l[0].damaged.as_deref().expect("shown as damaged");
        assert!(why.contains("session.json"), "{why}");
        assert_eq!(
            drop_sessions(&root, "vm", None, false).unwrap(),
            ["20261123-120000"]
        );
        assert!(!dir.exists());
    }

    #[test]
    fn a_dropped_sessions_pin_is_removed_by_its_stagings_id_whatever_host_name_it_gives() {
        use crate::repo::pins::{self, Pin};
        let d = tempfile::tempdir().unwrap();
        let (repo, _) =
            crate::repo::Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
        let (root, dir) = kept(d.path(), "vm");
        let root = std::fs::canonicalize(root).unwrap();
        let id = super::super::id_at(&root).unwrap().expect("an id");
        let dir = std::fs::canonicalize(dir).unwrap();
        // Pinned before the host was renamed; and a pin of another host of
        // this name whose staging has the same path (its own id).
        let mut ours = Pin::new("vm", vec!["b1".into()], &dir, false).in_staging(&id);
        ours.host = "old-name".into();
        pins::put(&repo, &ours).unwrap();
        let theirs = Pin::new("vm", vec!["b1".into()], &dir, true).in_staging("another");
        pins::put(&repo, &theirs).unwrap();
        assert_eq!(drop_sessions(&root, "vm", None, false).unwrap(), ["b1"]);
        assert_eq!(remove_stale_pins(&repo, &root, "vm", None).unwrap(), ["b1"]);
        assert_eq!(pins::of_vm(&repo, "vm").unwrap(), [theirs]);
    }
}
