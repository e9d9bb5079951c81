//! Views of a real QEMU's disk (a paused VM, `-S`; writes come from HMP's
//! `qemu-io` on the guest device's drive, which passes the same block
//! graph a guest write does), read back with `qemu-img` over NBD.

use super::*;
use crate::qemu::qmp::Qmp;
use crate::qemu::testing::{hmp_write, paused_vm, Proc};
use std::process::Command;

const MIB: usize = 1 << 20;

struct Vm {
    _proc: Proc,
    qmp: PathBuf,
    img: PathBuf,
    dir: tempfile::TempDir,
}

/// A paused VM whose virtio disk `vd0` (drive `drive0`) holds 0xaa in its
/// first MiB, 0x55 in its second and zeros after, 4 MiB.
fn vm() -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let mut data = vec![0u8; 4 * MIB];
    data[..MIB].fill(0xaa);
    data[MIB..2 * MIB].fill(0x55);
    std::fs::write(&img, &data).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut proc = Proc::spawn(&mut paused_vm(&img, &qmp));
    proc.wait_for(&qmp);
    Vm {
        _proc: proc,
        qmp,
        img,
        dir,
    }
}

/// The whole export, read by QEMU's own NBD client.
fn read_export(socket: &Path, export: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{export}.read"));
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///{export}?socket={}", socket.display()))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

fn rfs_nodes(q: &mut Qmp) -> Vec<String> {
    q.execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("rfs-"))
        .map(String::from)
        .collect()
}

#[test]
fn a_view_keeps_the_disk_as_it_was_while_the_guest_overwrites_it_and_closes_cleanly() {
    let v = vm();
    let original = std::fs::read(&v.img).unwrap();
    let mut q = Qmp::connect(&v.qmp).unwrap();
    let disk = q.block_devices().unwrap().remove(0);
    let sock = v.dir.path().join("nbd.sock");
    start_nbd_server(&mut q, &sock).unwrap();
    // A running VM (firmware with nothing to boot): the device's drive can
    // be switched under it, paused as a backup does.
    q.cont().unwrap();
    q.stop().unwrap();
    let view = open_view(&mut q, &disk, "t0", v.dir.path(), 65536).unwrap();
    q.cont().unwrap();
    assert_eq!(view.size, 4 * MIB as u64);
    // The guest writes over the first MiB and into the zeros.
    hmp_write(&mut q, 0xbb, 0, 64 << 10);
    hmp_write(&mut q, 0xcc, 3 * MIB, 4096);
    let now = std::fs::read(&v.img).unwrap();
    assert_eq!(
        (now[0], now[3 * MIB]),
        (0xbb, 0xcc),
        "the writes reached the disk"
    );
    // The view still reads the disk as it was when it opened.
    assert!(read_export(&sock, &view.export, v.dir.path()) == original);
    // The bitmap saw exactly those writes (two 64 KiB granules).
    let count = dirty_count(&mut q, &view);
    assert_eq!(count, 2 * 65536, "dirty bytes");

    close_view(&mut q, &view, false).unwrap();
    stop_nbd_server(&mut q).unwrap();
    assert!(rfs_nodes(&mut q).is_empty(), "{:?}", rfs_nodes(&mut q));
    assert!(!v.dir.path().join("rfs-t0.cbw").exists());
    // The device is back on its own node, and the bitmap stays for the
    // next incremental, still counting.
    hmp_write(&mut q, 0xdd, 2 * MIB, 4096);
    assert_eq!(std::fs::read(&v.img).unwrap()[2 * MIB], 0xdd);
    assert_eq!(dirty_count(&mut q, &view), 3 * 65536);
}

/// The dirty bitmaps on `node` (`query-named-block-nodes`).
fn bitmaps(q: &mut Qmp, node: &str) -> Vec<serde_json::Value> {
    q.execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
        .unwrap_or_default()
}

/// Dirty bytes of the view's bitmap.
fn dirty_count(q: &mut Qmp, view: &View) -> u64 {
    bitmaps(q, &view.node)
        .iter()
        .find(|b| b["name"] == view.bitmap.as_str())
        .and_then(|b| b["count"].as_u64())
        .expect("the view's bitmap")
}

#[test]
fn a_view_that_fails_half_way_is_undone_and_leaves_no_bitmap_and_no_foreign_file_touched() {
    let v = vm();
    let mut q = Qmp::connect(&v.qmp).unwrap();
    let disk = q.block_devices().unwrap().remove(0);
    // Someone's file where the temporary store would go: refused, kept.
    let theirs = v.dir.path().join("rfs-t1.cbw");
    std::fs::write(&theirs, b"not ours").unwrap();
    let e = open_view(&mut q, &disk, "t1", v.dir.path(), 65536).unwrap_err();
    assert!(e.to_string().contains("rfs-t1.cbw"), "{e}");
    assert_eq!(std::fs::read(&theirs).unwrap(), b"not ours");
    assert!(bitmaps(&mut q, &disk.node_name).is_empty());
    // An export name already taken fails at the last step: every node is
    // removed and the device is back on its own node.
    let sock = v.dir.path().join("nbd.sock");
    start_nbd_server(&mut q, &sock).unwrap();
    let first = open_view(&mut q, &disk, "t2", v.dir.path(), 65536).unwrap();
    close_view(&mut q, &first, true).unwrap();
    q.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "rfs-t3", "node-name": disk.node_name, "name": "x"})),
    )
    .unwrap();
    let e = open_view(&mut q, &disk, "t3", v.dir.path(), 65536).unwrap_err();
    assert!(e.to_string().contains("block-export-add"), "{e}");
    assert!(rfs_nodes(&mut q).is_empty(), "{:?}", rfs_nodes(&mut q));
    hmp_write(&mut q, 0xee, 0, 4096);
    assert_eq!(std::fs::read(&v.img).unwrap()[0], 0xee);
}

#[test]
fn view_tag_matches_the_names_of_backup_vms_views_and_never_pre_copys() {
    assert_eq!(view_tag("rfs-a1b2c3-0-1", ""), Some("a1b2c3-0-1"));
    assert_eq!(view_tag("rfs-a1b2c3-0-1-map", ""), Some("a1b2c3-0-1-map"));
    assert_eq!(view_tag("rfs-cbw-a1b2c3-2-0", "cbw-"), Some("a1b2c3-2-0"));
    assert_eq!(view_tag("rfs-cbw-a1b2c3-2-0", "tmp-"), None);
    assert_eq!(view_tag("rfs-pc-1a2b3c-d0", ""), None);
    assert_eq!(view_tag("rfs-pc-1a2b3c-0", ""), None);
    assert_eq!(view_tag("rfs-a1b2c", ""), None);
    assert_eq!(view_tag("drive0", ""), None);
}
