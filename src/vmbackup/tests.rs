//! `backup-vms` against real QEMU: VMs running firmware with nothing to
//! boot, raw disks of known random content, a second QMP monitor per VM
//! for the test's own writes (`qemu-io` through the guest device's drive)
//! and checks while the backup holds the first.
//!
//! The VMs, the repository and the checks more than one concern (and
//! `precopy`'s tests) use are here; the tests are in a module per concern:
//! `plan`, `snapshot`, `failures`, `agent`, `runs`, `incremental` and
//! `layout`.

use super::*;
use crate::qemu::fleece;
use crate::qemu::qmp::Qmp;
use crate::qemu::testing::{hmp_write, paused_vm, Proc};
use crate::repo::Repository;
use clap::Parser;
use rand::RngCore;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod agent;
mod failures;
pub(crate) mod incremental;
mod layout;
mod plan;
mod runs;
mod snapshot;

const MIB: usize = 1 << 20;
const CHUNK: u32 = 65536;

/// A QEMU process, killed when dropped (also when a test fails).
pub(crate) struct Vm {
    pub(crate) proc: Mutex<Proc>,
    /// The backup's monitor.
    pub(crate) qmp: PathBuf,
    /// The test's monitor.
    pub(crate) mon: PathBuf,
    pub(crate) img: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Vm {
    pub(crate) fn kill(&self) {
        let mut p = self.proc.lock().unwrap();
        p.0.kill().unwrap();
        p.0.wait().unwrap();
    }

    pub(crate) fn monitor(&self) -> Qmp {
        Qmp::connect(&self.mon).unwrap()
    }

    /// A new QEMU process on the same image and QMP sockets (what the
    /// VM's dirty bitmaps do not survive), running.
    pub(crate) fn restart(&self) {
        self.kill();
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.mon);
        let mut cmd = paused_vm(self.img.as_ref().unwrap(), &self.qmp);
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.mon.display()));
        *self.proc.lock().unwrap() = Proc::spawn(&mut cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        for s in [&self.qmp, &self.mon] {
            while Qmp::connect(s).is_err() {
                assert!(Instant::now() < deadline, "QEMU answers on no QMP socket");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.monitor().cont().unwrap();
    }
}

/// 4 MiB of random bytes, zeros in the third MiB, and no boot signature
/// (so the firmware never runs it).
fn content() -> Vec<u8> {
    let mut d = vec![0u8; 4 * MIB];
    rand::thread_rng().fill_bytes(&mut d);
    d[2 * MIB..3 * MIB].fill(0);
    d[510..512].fill(0);
    d
}

/// A running VM with a virtio disk holding `disk` (none: no disk at all).
pub(crate) fn vm(disk: Option<&[u8]>) -> Vm {
    vm_with_args(disk, &[])
}

/// [`vm`] whose QEMU also gets `extra` arguments (`-uuid`, `-name`).
pub(crate) fn vm_with_args(disk: Option<&[u8]>, extra: &[&str]) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let img = disk.map(|data| {
        // Sparse: the zero MiB is a hole, which the backup skips.
        let img = dir.path().join("disk.raw");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(data.len() as u64).unwrap();
        for (off, piece) in data.chunks(CHUNK as usize).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                std::os::unix::fs::FileExt::write_all_at(&f, piece, (off * CHUNK as usize) as u64)
                    .unwrap();
            }
        }
        img
    });
    let mut cmd = match &img {
        Some(img) => paused_vm(img, &qmp),
        None => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-S", "-nodefaults", "-display", "none", "-m", "64", "-qmp"])
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
            c
        }
    };
    cmd.args(extra);
    start(cmd, qmp, img, dir)
}

/// Starts `cmd` (QMP on `qmp`) with the test's monitor as well, waits until
/// both answer, and lets the VM run.
fn start(mut cmd: Command, qmp: PathBuf, img: Option<PathBuf>, dir: tempfile::TempDir) -> Vm {
    let mon = dir.path().join("mon.sock");
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", mon.display()));
    let v = Vm {
        proc: Mutex::new(Proc::spawn(&mut cmd)),
        qmp,
        mon,
        img,
        _dir: dir,
    };
    // A socket file exists a moment before QEMU listens on it: wait until
    // both monitors answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    for s in [&v.qmp, &v.mon] {
        while Qmp::connect(s).is_err() {
            assert!(Instant::now() < deadline, "QEMU answers on no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    v.monitor().cont().unwrap();
    v
}

pub(crate) fn options(vms: &[(&str, &Vm)], jobs: usize, hook: Option<Hook>) -> Options {
    Options {
        vms: vms
            .iter()
            .map(|(n, v)| VmSpec {
                name: n.to_string(),
                qmp: v.qmp.clone(),
                agent: None,
                base: None,
                new_identity: false,
            })
            .collect(),
        jobs,
        chunk_size: CHUNK,
        rate_window: Duration::from_millis(200),
        agent_timeout: Duration::from_secs(1),
        incremental: false,
        order: ReadOrder::BusiestFirst,
        hook,
    }
}

pub(crate) fn repo() -> (tempfile::TempDir, Arc<Repository>) {
    let d = tempfile::tempdir().unwrap();
    let (r, _) = Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
    (d, r)
}

/// Disk 0 of backup `id` of `vm`, read back through the repository.
pub(crate) fn restored(repo: &Repository, vm: &str, id: &str) -> Vec<u8> {
    let m = repo.resolve(vm, Some(id)).unwrap();
    assert_eq!(m.disks.len(), 1);
    crate::testutil::disk_bytes(repo, &m.disks[0])
}

fn at(r: &VmReport, event: &str) -> u64 {
    r.events
        .iter()
        .find(|e| e.event == event)
        .unwrap_or_else(|| panic!("VM {}: no {event} in {:?}", r.vm, r.events))
        .t_us
}

fn report<'a>(s: &'a Summary, vm: &str) -> &'a VmReport {
    s.vms.iter().find(|v| v.vm == vm).unwrap()
}

/// The test's nodes and bitmaps QEMU still holds for a backup.
fn leftovers(q: &mut Qmp) -> Vec<String> {
    let nodes = q
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .unwrap();
    let mut out = vec![];
    for n in nodes.as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap_or("");
        if name.starts_with("rfs-") {
            out.push(name.to_string());
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            out.push(format!("bitmap {}", b["name"].as_str().unwrap_or("")));
        }
    }
    out
}

/// [`leftovers`] after a successful backup: no node, and only the dirty
/// bitmaps its manifest records (kept for the next incremental).
fn leftovers_but_kept(q: &mut Qmp, repo: &Repository, vm: &str, id: &str) -> Vec<String> {
    let m = repo.resolve(vm, Some(id)).unwrap();
    let kept: Vec<String> = m.config["backup_vms"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| format!("bitmap {}", b["bitmap"].as_str().unwrap()))
        .collect();
    let left = leftovers(q);
    assert!(
        kept.iter().all(|k| left.contains(k)),
        "{kept:?} kept in {left:?}"
    );
    left.into_iter().filter(|l| !kept.contains(l)).collect()
}
