//! Recognising a relocation's target directory again (a restart, a
//! cancel, the cutover): its identity as recorded at the start, and the
//! rule for when another device number still names the same directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Meta;
use crate::error::{Error, ErrorKind, Result};
use crate::staging::io::{DirId, PinnedDir, Storage};

/// A target directory's identity as recorded (see `pin_target`).
///
/// A device number is not stable across a reboot or remount (NFS, btrfs
/// subvolumes, ZFS and overlayfs get anonymous ones in mount order, dm-N
/// and NVMe minors follow probe order, an iSCSI re-login gets a new
/// disk). Another device number is accepted only where nobody but root
/// can have put another directory at the path (`root_only`, recorded and
/// true now): every directory from `/` down to the target owned by root
/// and writable by nobody else; then the same inode number and type of
/// filesystem will do. Anywhere a caller that is not root may write, a
/// btrfs snapshot of a subvolume they own (same inodes, same owners, same
/// filesystem type), a FUSE filesystem of their own mounted there, or a
/// directory they own whose inode they can free and win again could pass
/// any such test: there the device and inode must both be the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TargetId {
    pub dev: u64,
    pub ino: u64,
    /// The owner's uid; `None` in a record written before it was kept.
    #[serde(default)]
    pub uid: Option<u32>,
    /// `Storage::boot_id` when `dev` was read; empty if unknown (a record
    /// written before it was kept). Kept for diagnosis: whether another
    /// device number is accepted depends on `root_only`, not on the boot
    /// (a remount changes it within one boot).
    #[serde(default)]
    pub boot: String,
    /// The filesystem's type (`statfs` `f_type`): with another device
    /// number it must be the same.
    #[serde(default)]
    pub fs_type: Option<u64>,
    /// Only root can have changed what the target's path names (see
    /// `only_root_can_change`); false in a record written before it was kept.
    #[serde(default)]
    pub root_only: bool,
}

impl TargetId {
    /// The identity of `dir`, pinned at `path`, now; `None` where the
    /// storage has none (in memory).
    pub(super) fn of(storage: &dyn Storage, dir: &PinnedDir, path: &Path) -> Option<TargetId> {
        let DirId { dev, ino } = dir.id()?;
        Some(TargetId {
            dev,
            ino,
            uid: dir.owner(),
            boot: storage.boot_id(),
            fs_type: dir.fs_type(),
            root_only: only_root_can_change(path),
        })
    }

    /// Whether `now` is the directory recorded.
    pub(super) fn admits(&self, now: &TargetId) -> bool {
        if self.dev == now.dev && self.ino == now.ino {
            return true;
        }
        self.root_only
            && now.root_only
            && self.ino == now.ino
            && self.uid == now.uid
            && self.fs_type == now.fs_type
    }
}

/// Whether only root can have changed what `path` (absolute) names: every
/// directory from `/` down to it is owned by root and writable by nobody
/// else (a sticky, world-writable `/tmp` is not).
pub(super) fn only_root_can_change(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mut p = PathBuf::new();
    for c in path.components() {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0 => {}
            _ => return false,
        }
    }
    path.is_absolute()
}

/// Opens the recorded target directory for use: never through a symbolic
/// link, and only while it is the directory the relocation began in. The
/// files in it are then reached through the pinned directory (see
/// `io::PinnedDir`), so nothing swapped in after this check is touched.
/// A caller who may write the directory above the target can rename it
/// and link another directory in its place at any time: root would then
/// create, empty or remove files there.
pub(crate) fn pin_target(storage: &dyn Storage, meta: &Meta) -> Result<PinnedDir> {
    let shown = meta.target.display();
    let dir = storage
        .pin_dir(&meta.target)
        .map_err(|e| Error::io(format!("open relocation target {shown}"), e))?;
    let (Some(want), Some(now)) = (&meta.target_id, TargetId::of(storage, &dir, &meta.target))
    else {
        return Ok(dir);
    };
    if !want.admits(&now) {
        // A state of the target, not a bad request: `Busy` (409).
        return Err(Error::busy(format!(
            "relocation target {shown} is no longer the directory the relocation began in \
             (it was moved or replaced since, or remounted where others may write, which \
             recoverfs cannot tell from a replacement), which recoverfs never works in"
        )));
    }
    if want.dev != now.dev {
        tracing::warn!(target = %shown, "the relocation target's device number changed from {} to \
            {} (a reboot or remount); same inode, owner and filesystem type on a path only root can change, so the same directory", want.dev, now.dev);
    }
    Ok(dir)
}

/// Whether `e` (from `pin_target`) says the target is another directory,
/// not that it could not be reached.
pub(super) fn is_replaced(e: &Error) -> bool {
    e.kind() == ErrorKind::Busy
}

/// The file in `DIR/VM` naming the relocation whose files these are.
pub(super) const OWNER_MARK: &str = ".recoverfs-relocation";

/// A new relocation's id for `OWNER_MARK`.
pub(super) fn new_owner_mark() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Writes `mark` into the pinned target `dir` (synced with the directory
/// by the caller's `sync_dir`, before the relocation is recorded).
pub(super) fn write_owner_mark(storage: &dyn Storage, dir: &PinnedDir, mark: &str) -> Result<()> {
    let p = dir.path().join(OWNER_MARK);
    storage
        .rename_into_place(&p, mark.as_bytes())
        .map_err(|e| Error::io(format!("write {}", p.display()), e))
}

/// Refuses `dir`, the pinned target of `meta`, if it is now another
/// relocation's: its `OWNER_MARK` names another (or none), or, not cut
/// over, it holds a complete copy (`vm.json`: only a cutover places it).
/// Such files were emptied and written by that other relocation (a
/// `--force` over them, in another session or daemon): resuming into them
/// would write this backup's blocks into that copy (a VM may run from
/// it), and a cancel would remove them. `Busy`, like a replaced directory.
/// What `check_owner` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owned {
    /// The mark names this relocation (or the record predates marks).
    Ours,
    /// No mark where this relocation wrote one: the directory was made
    /// again since (primary storage formatted or remounted empty, as tmpfs
    /// does with the same device and inode numbers). Nothing in it is
    /// this relocation's work: a reopen copies every disk again (and marks
    /// it anew), a cancel leaves its files.
    Unmarked,
}

pub(crate) fn check_owner(storage: &dyn Storage, meta: &Meta, dir: &PinnedDir) -> Result<Owned> {
    let shown = meta.target.display();
    let another = |why: String| {
        Err(Error::busy(format!(
            "relocation target {shown} is now another relocation's ({why}): this one never \
             writes or removes its files"
        )))
    };
    if let Some(mine) = &meta.owner_mark {
        let p = dir.path().join(OWNER_MARK);
        let found = match storage.read(&p, 256) {
            Ok(Some(b)) if b == mine.as_bytes() => Owned::Ours,
            Ok(Some(_)) => return another(format!("{OWNER_MARK} names another")),
            Ok(None) => Owned::Unmarked,
            Err(e) => return Err(Error::io(format!("read {}/{OWNER_MARK}", shown), e)),
        };
        if !meta.switched && storage.exists(&dir.path().join("vm.json")).unwrap_or(false) {
            return another("it holds a complete relocated copy, vm.json".into());
        }
        return Ok(found);
    }
    if !meta.switched && storage.exists(&dir.path().join("vm.json")).unwrap_or(false) {
        return another("it holds a complete relocated copy, vm.json".into());
    }
    Ok(Owned::Ours)
}
