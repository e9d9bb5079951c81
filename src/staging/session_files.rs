//! One session's files: `session.json` (geometry), `since.json` (live
//! backup generation), and each disk's data file and maps, opened or made
//! by [`open_session`] (see the layout in the parent module).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{io, uploaded, BlockFile, MapKind, Open, PersistentBitmap, Storage};
use crate::error::{Error, IoContext, Result};
use crate::repo::limits::MAX_META_BYTES;
use crate::repo::{DiskManifest, Manifest};
use crate::util::now_unix;

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
            // Nothing is wrong with the staging: never suggest discarding
            // it (the guest's writes are there).
            true if e.kind() == crate::error::ErrorKind::NoSpace => e.context(format!(
                "staging of backup {}/{} cannot be resumed while its filesystem is full: free space there (its guest writes are kept in it; do not discard it), then recover {} again",
                m.vm, m.id, m.vm
            )),
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
    match meta.store(storage, dir) {
        // Resumed, it only moves `last_recovered` on: a full staging
        // filesystem must not keep the guest's writes from being served.
        Err(e) if resumed && e.kind() == crate::error::ErrorKind::NoSpace => {
            tracing::warn!(vm = %m.vm, "the staging filesystem is full: the session resumes without recording when ({e})");
        }
        r => r?,
    }
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
