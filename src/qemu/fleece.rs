//! Point-in-time views of a running VM's disks (QEMU 7.2 image fleecing,
//! as QEMU's iotest `image-fleecing` does it), exported over QEMU's own NBD
//! server for a backup to read while the guest runs on.
//!
//! Per disk, with the VM paused by the caller (so every view shares one
//! instant, and `stop` has drained the guest's I/O):
//! 1. a dirty bitmap on the disk's node at chunk granularity: what the
//!    guest writes from now on, for the next incremental;
//! 2. a `file` node on a sparse temporary file the size of the disk;
//! 3. a `copy-before-write` filter over the disk that copies old data to
//!    that file before the guest overwrites it;
//! 4. the guest device switched onto the filter (`qom-set drive`);
//! 5. a `snapshot-access` node over the filter: the disk as it was;
//! 6. an NBD export of that node on QEMU's NBD server (a Unix socket).
//!
//! [`close_view`] undoes it in reverse order, whatever was reached, so a
//! backup that fails half-way leaves the VM as it found it; the bitmap
//! stays (it is the next incremental's map) unless asked to go.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::qmp::{BlockDevice, Qmp};
use crate::error::{Error, IoContext, Result};

/// One disk's view, and what to undo.
#[derive(Debug, Clone)]
pub struct View {
    /// The disk's own node (the guest device's drive before the view).
    pub node: String,
    /// The guest device's QOM path.
    pub device: String,
    pub bitmap: String,
    /// The NBD export name of the view.
    pub export: String,
    pub size: u64,
    tmp_path: PathBuf,
    tmp: String,
    cbw: String,
    access: String,
    /// How far `open_view` got (0..=8 steps done).
    steps: u8,
}

impl View {
    /// Bytes the copy-before-write store holds: old data guest writes
    /// copied out since the snapshot (what keeping the view open costs).
    pub fn cbw_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.tmp_path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }

    /// The export of the disk's node carrying an exported bitmap's status.
    pub fn map_export(&self) -> String {
        format!("{}-map", self.export)
    }
}

/// The guest device a `query-block` entry's `qdev` names: QEMU reports
/// the virtio backend (`/machine/peripheral/vd0/virtio-backend`), whose
/// parent carries the `drive` property.
fn device_path(qdev: &str) -> String {
    qdev.strip_suffix("/virtio-backend")
        .unwrap_or(qdev)
        .to_string()
}

/// Starts QEMU's NBD server on a Unix socket (once per VM and backup).
pub fn start_nbd_server(q: &mut Qmp, socket: &Path) -> Result<()> {
    q.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": socket}}})),
    )
    .map(drop)
}

pub fn stop_nbd_server(q: &mut Qmp) -> Result<()> {
    q.execute("nbd-server-stop", None).map(drop)
}

/// Opens the view of `disk` (see the module docs). `tag` keeps node and
/// export names apart between disks and backups; the temporary file goes
/// in `dir`. On error, whatever was done is undone before returning.
pub fn open_view(
    q: &mut Qmp,
    disk: &BlockDevice,
    tag: &str,
    dir: &Path,
    granularity: u32,
) -> Result<View> {
    open_view_with(q, disk, tag, dir, granularity, None)
}

/// [`open_view`], exporting as well the dirty bitmap `export_bitmap` of the
/// disk's node (a disabled one: QEMU refuses an enabled bitmap on a
/// read-only export) as `qemu:dirty-bitmap:NAME` of export
/// [`View::map_export`].
pub fn open_view_with(
    q: &mut Qmp,
    disk: &BlockDevice,
    tag: &str,
    dir: &Path,
    granularity: u32,
    export_bitmap: Option<&str>,
) -> Result<View> {
    let size = node_size(q, &disk.node_name)?;
    let mut v = View {
        node: disk.node_name.clone(),
        device: device_path(&disk.qdev),
        bitmap: format!("rfs-{tag}"),
        export: format!("rfs-{tag}"),
        size,
        tmp_path: dir.join(format!("rfs-{tag}.cbw")),
        tmp: format!("rfs-tmp-{tag}"),
        cbw: format!("rfs-cbw-{tag}"),
        access: format!("rfs-acc-{tag}"),
        steps: 0,
    };
    match open_steps(q, &mut v, granularity, export_bitmap) {
        Ok(()) => Ok(v),
        Err(e) => {
            // A half-made view starts no incremental chain: its bitmap goes.
            if let Err(undo) = close_view(q, &v, true) {
                tracing::error!(node = %v.node, "undoing a half-made view failed: {undo}");
            }
            Err(e)
        }
    }
}

fn open_steps(
    q: &mut Qmp,
    v: &mut View,
    granularity: u32,
    export_bitmap: Option<&str>,
) -> Result<()> {
    q.execute(
        "block-dirty-bitmap-add",
        Some(json!({"node": v.node, "name": v.bitmap, "granularity": granularity})),
    )?;
    v.steps = 1;
    // Sparse, never synced: it only holds old data while the view is open.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&v.tmp_path)
        .ctx(|| format!("create {}", v.tmp_path.display()))?;
    v.steps = 2;
    f.set_len(v.size)
        .ctx(|| format!("size {}", v.tmp_path.display()))?;
    q.execute(
        "blockdev-add",
        Some(json!({"driver": "file", "node-name": v.tmp, "filename": v.tmp_path})),
    )?;
    v.steps = 3;
    // A store that cannot take the old data (host disk full or failing)
    // must break the snapshot, whose reads then fail (and the backup with
    // them), never the guest's write: QEMU 7.2's default,
    // break-guest-write, fails the guest's I/O (QEMU >= 7.1 has the option).
    q.execute(
        "blockdev-add",
        Some(json!({"driver": "copy-before-write", "node-name": v.cbw,
                    "file": v.node, "target": v.tmp,
                    "on-cbw-error": "break-snapshot"})),
    )?;
    v.steps = 4;
    set_drive(q, &v.device, &v.cbw)?;
    v.steps = 5;
    q.execute(
        "blockdev-add",
        Some(json!({"driver": "snapshot-access", "node-name": v.access, "file": v.cbw})),
    )?;
    v.steps = 6;
    q.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": v.export, "node-name": v.access,
                    "name": v.export, "writable": false})),
    )?;
    v.steps = 7;
    if let Some(b) = export_bitmap {
        // QEMU 7.2 looks an export's bitmaps up through filters only, not
        // through snapshot-access: the disk's own node is exported too,
        // read-only, for the bitmap's block status alone (its data is the
        // live disk's, never read).
        q.execute(
            "block-export-add",
            Some(
                json!({"type": "nbd", "id": v.map_export(), "node-name": v.node,
                        "name": v.map_export(), "writable": false, "bitmaps": [b]}),
            ),
        )?;
        v.steps = 8;
    }
    Ok(())
}

fn set_drive(q: &mut Qmp, device: &str, node: &str) -> Result<()> {
    q.execute(
        "qom-set",
        Some(json!({"path": device, "property": "drive", "value": node})),
    )
    .map(drop)
}

/// Removes NBD export `id` and waits until QEMU says it is gone (its node
/// stays in use until then). `hard`: the only clients of a view's export
/// are ours and are done with it, but QEMU may not yet have processed
/// their disconnect, and a `safe` delete would then fail (and the event
/// never come).
pub fn delete_export(q: &mut Qmp, id: &str) -> Result<serde_json::Value> {
    q.execute("block-export-del", Some(json!({"id": id, "mode": "hard"})))?;
    q.wait_event_where("BLOCK_EXPORT_DELETED", Duration::from_secs(30), |d| {
        d["id"] == id
    })
}

/// Undoes a view in reverse order, from as far as it got. With
/// `drop_bitmap` the dirty bitmap goes too (a full backup that will not
/// be followed by an incremental, or a failed one).
pub fn close_view(q: &mut Qmp, v: &View, drop_bitmap: bool) -> Result<()> {
    let mut first_err: Option<Error> = None;
    let mut step = |r: Result<serde_json::Value>| {
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    };
    if v.steps >= 8 {
        step(delete_export(q, &v.map_export()));
    }
    if v.steps >= 7 {
        step(delete_export(q, &v.export));
    }
    if v.steps >= 6 {
        step(q.execute("blockdev-del", Some(json!({"node-name": v.access}))));
    }
    if v.steps >= 5 {
        step(set_drive(q, &v.device, &v.node).map(|()| json!({})));
    }
    if v.steps >= 4 {
        step(q.execute("blockdev-del", Some(json!({"node-name": v.cbw}))));
    }
    if v.steps >= 3 {
        step(q.execute("blockdev-del", Some(json!({"node-name": v.tmp}))));
    }
    if v.steps >= 2 {
        // Ours: created with create_new at step 2.
        let _ = std::fs::remove_file(&v.tmp_path);
    }
    if v.steps >= 1 && drop_bitmap {
        step(q.execute(
            "block-dirty-bitmap-remove",
            Some(json!({"node": v.node, "name": v.bitmap})),
        ));
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The lock file a run holds (`flock`) in the directory of its views'
/// stores while they may be in use: a live run's views are not leftovers.
pub const RUN_LOCK: &str = "run.lock";

/// Whether `name` is one of a view's names with `kind` before its tag
/// (`rfs-` exports and bitmaps, `rfs-acc-`, `rfs-cbw-`, `rfs-tmp-` nodes);
/// a tag starts with a 6-hex-digit run id, so pre-copy's `rfs-pc-` names
/// never match. The tag, if so.
fn view_tag<'a>(name: &'a str, kind: &str) -> Option<&'a str> {
    let tag = name.strip_prefix("rfs-")?.strip_prefix(kind)?;
    let run = tag.get(..7)?;
    (run.ends_with('-') && run[..6].bytes().all(|b| b.is_ascii_hexdigit())).then_some(tag)
}

/// Removes what runs killed with their views open left in QEMU: their
/// exports, `snapshot-access`, copy-before-write and store nodes (guest
/// devices switched back onto the disk's node, found by the view's
/// bitmap) and store files, but not those of a run still alive
/// ([`RUN_LOCK`]). Their bitmaps stay (a successful run removes
/// older ones; an incremental checks its base's). Returns what it
/// removed, for the report.
pub fn remove_leftovers(q: &mut Qmp) -> Result<Vec<String>> {
    let mut done = vec![];
    let named = q.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
    let named = named.as_array().cloned().unwrap_or_default();
    let name = |n: &serde_json::Value| n["node-name"].as_str().unwrap_or("").to_string();
    // A run still alive (another backup of this VM) holds the lock in its
    // stores' directory: its views are in use.
    let live: Vec<String> = (named.iter())
        .filter_map(|n| {
            let tag = view_tag(n["node-name"].as_str()?, "tmp-")?;
            let lock = Path::new(n["file"].as_str()?).parent()?.join(RUN_LOCK);
            let held = lock.exists() && matches!(crate::util::try_lock_file(&lock), Ok(None));
            held.then(|| tag.to_string())
        })
        .collect();
    let dead = |tag: Option<&str>| tag.is_some_and(|t| !live.iter().any(|l| l == t));
    let exports = q.execute("query-block-exports", None)?;
    for e in exports.as_array().into_iter().flatten() {
        let Some(id) = e["id"].as_str() else {
            continue;
        };
        let tag = view_tag(id, "").map(|t| t.strip_suffix("-map").unwrap_or(t));
        if !dead(tag) {
            continue;
        }
        delete_export(q, id)?;
        done.push(format!("export {id}"));
    }
    for n in named.iter().map(name) {
        if dead(view_tag(&n, "acc-")) {
            q.execute("blockdev-del", Some(json!({"node-name": n})))?;
            done.push(format!("node {n}"));
        }
    }
    let devices = q.execute("query-block", None)?;
    for n in named.iter().map(name) {
        let Some(tag) = view_tag(&n, "cbw-").filter(|t| dead(Some(t))) else {
            continue;
        };
        let bitmap = format!("rfs-{tag}");
        let has_bitmap = |m: &&serde_json::Value| {
            (m["dirty-bitmaps"].as_array().into_iter().flatten()).any(|b| b["name"] == *bitmap)
        };
        for d in devices.as_array().into_iter().flatten() {
            if d["inserted"]["node-name"] != *n {
                continue;
            }
            let disk = named.iter().find(has_bitmap).map(name).ok_or_else(|| {
                Error::not_found(format!(
                    "{n} left by a killed backup: no node has its bitmap {bitmap}, \
                     so its disk's node is unknown"
                ))
            })?;
            set_drive(q, &device_path(d["qdev"].as_str().unwrap_or("")), &disk)?;
        }
        q.execute("blockdev-del", Some(json!({"node-name": n})))?;
        done.push(format!("node {n}"));
    }
    for m in &named {
        let n = name(m);
        if !dead(view_tag(&n, "tmp-")) {
            continue;
        }
        q.execute("blockdev-del", Some(json!({"node-name": n})))?;
        done.push(format!("node {n}"));
        // The store file, if it is where a view puts it (`rfs-TAG.cbw` in
        // a `recoverfs-vmbackup-` directory).
        let file = PathBuf::from(m["file"].as_str().unwrap_or(""));
        let ours = |p: Option<&Path>, prefix: &str| {
            p.and_then(|p| p.file_name()?.to_str().map(|f| f.starts_with(prefix))) == Some(true)
        };
        if ours(Some(&file), "rfs-") && ours(file.parent(), "recoverfs-vmbackup-") {
            let _ = std::fs::remove_file(&file);
        }
    }
    Ok(done)
}

/// A block node as `query-named-block-nodes` shows it.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub size: u64,
    pub bitmaps: Vec<Bitmap>,
}

/// A dirty bitmap of a node.
#[derive(Debug, Clone)]
pub struct Bitmap {
    pub name: String,
    /// Whether it still marks guest writes (not disabled): a bitmap that
    /// does not cannot vouch for what changed since it stopped.
    pub recording: bool,
}

impl Node {
    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// Every named node, from `query-named-block-nodes`.
pub fn nodes(q: &mut Qmp) -> Result<Vec<Node>> {
    let nodes = q.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| Node {
            name: n["node-name"].as_str().unwrap_or("").to_string(),
            size: n["image"]["virtual-size"].as_u64().unwrap_or(0),
            bitmaps: n["dirty-bitmaps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| {
                    Some(Bitmap {
                        name: b["name"].as_str()?.to_string(),
                        recording: b["recording"].as_bool().unwrap_or(false),
                    })
                })
                .collect(),
        })
        .collect())
}

/// `block-dirty-bitmap-NAME` (`enable`, `disable`, `remove`) of `bitmap`
/// on `node`.
pub fn bitmap_op(q: &mut Qmp, op: &str, node: &str, bitmap: &str) -> Result<()> {
    q.execute(
        &format!("block-dirty-bitmap-{op}"),
        Some(json!({"node": node, "name": bitmap})),
    )
    .map(drop)
}

/// Makes the disabled bitmap `into` on `node` record again and, with
/// `from`, adds `from`'s bits into it and removes `from`: one QMP
/// `transaction`, so no guest write can fall between them (marked only
/// in `from` after its bits were copied, then lost with it), and a
/// failure changes nothing.
pub fn bitmap_hand_back(q: &mut Qmp, node: &str, into: &str, from: Option<&str>) -> Result<()> {
    let mut actions = vec![json!({"type": "block-dirty-bitmap-enable",
                                  "data": {"node": node, "name": into}})];
    if let Some(from) = from {
        actions.push(json!({"type": "block-dirty-bitmap-merge",
                            "data": {"node": node, "target": into, "bitmaps": [from]}}));
        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": node, "name": from}}));
    }
    q.execute("transaction", Some(json!({ "actions": actions })))
        .map(drop)
}

/// The virtual size of a node (`query-named-block-nodes`).
fn node_size(q: &mut Qmp, node: &str) -> Result<u64> {
    let nodes = q.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n["image"]["virtual-size"].as_u64())
        .ok_or_else(|| Error::not_found(format!("QEMU has no block node {node:?}")))
}

#[cfg(test)]
mod tests;
