//! An incremental's base: the newest backup of a VM is one if QEMU still
//! has each dirty bitmap it recorded, on the disk's node, recording, and
//! the geometry is the same (a caller's base is checked the same way).
//! Apart from the run: `precopy` asks the same question.

use crate::qemu::fleece;
use crate::qemu::qmp::{BlockDevice, Qmp};
use crate::repo::manifest::{DiskManifest, Manifest};
use crate::repo::Repository;

/// An incremental's base as a run uses it: its manifest and its dirty
/// bitmap per disk.
pub(super) struct Prev {
    pub(super) manifest: Manifest,
    pub(super) bitmaps: Vec<String>,
}

/// The dirty bitmap names a backup-vms manifest records per disk (its
/// since-last-backup maps, kept in QEMU).
pub fn recorded_bitmaps(m: &Manifest) -> std::result::Result<Vec<String>, String> {
    let recorded = m.config["backup_vms"]["bitmaps"]
        .as_array()
        .ok_or_else(|| format!("backup {} records no dirty bitmap", m.id))?;
    Ok(recorded
        .iter()
        .map(|r| r["bitmap"].as_str().unwrap_or("").to_string())
        .collect())
}

/// The newest backup of `vm` as an incremental's base, with its recorded
/// since-backup bitmap per disk, if [`check_base`] accepts it; otherwise
/// why not.
pub fn find_base(
    q: &mut Qmp,
    repo: &Repository,
    vm: &str,
    disks: &[BlockDevice],
    chunk_size: u32,
) -> std::result::Result<(Manifest, Vec<String>), String> {
    let ids = repo
        .backup_ids(vm)
        .map_err(|e| format!("listing previous backups: {e}"))?;
    let id = ids.last().ok_or("no previous backup")?;
    let m = repo.manifest(vm, id).map_err(|e| e.to_string())?;
    let bitmaps = recorded_bitmaps(&m)?;
    check_base(
        q,
        disks,
        &format!("backup {id}"),
        &m.disks,
        &bitmaps,
        chunk_size,
    )?;
    Ok((m, bitmaps))
}

/// A base (`what` names it) is usable for `disks` if it has one disk and
/// one bitmap per disk, each disk the same size and chunk size, and QEMU
/// still has each bitmap on the disk's node, recording.
pub fn check_base(
    q: &mut Qmp,
    disks: &[BlockDevice],
    what: &str,
    base: &[DiskManifest],
    bitmaps: &[String],
    chunk_size: u32,
) -> std::result::Result<(), String> {
    if bitmaps.len() != disks.len() || base.len() != disks.len() {
        return Err(format!(
            "{what} has {} disks, the VM {}",
            base.len(),
            disks.len()
        ));
    }
    let nodes = fleece::nodes(q).map_err(|e| format!("listing QEMU's block nodes: {e}"))?;
    for (i, ((bitmap, dm), disk)) in bitmaps.iter().zip(base).zip(disks).enumerate() {
        // Bitmap names are unique to a run: found on the disk's node, it
        // is the one that run left (node names may change).
        let node = &disk.node_name;
        let Some(n) = nodes.iter().find(|n| &n.name == node) else {
            return Err(format!("disk {i}: QEMU has no node {node}"));
        };
        if dm.size != n.size || dm.chunk_size != chunk_size {
            return Err(format!(
                "disk {i}: geometry changed since {what} (size {} -> {}, chunk size {} -> {chunk_size})",
                dm.size, n.size, dm.chunk_size
            ));
        }
        match n.bitmap(bitmap) {
            None => {
                return Err(format!(
                    "disk {i}: QEMU no longer has dirty bitmap {bitmap} of {what} (restarted?)"
                ))
            }
            // Left disabled (a failed hand-back, a lost reply, a kill
            // after the snapshot): it misses every write since.
            Some(b) if !b.recording => {
                return Err(format!(
                    "disk {i}: dirty bitmap {bitmap} of {what} no longer records writes"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}
