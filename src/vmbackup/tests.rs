//! `backup-vms` against real QEMU: VMs running firmware with nothing to
//! boot, raw disks of known random content, a second QMP monitor per VM
//! for the test's own writes (`qemu-io` through the guest device's drive)
//! and checks while the backup holds the first.

use super::*;
use crate::qemu::fleece;
use crate::qemu::guest_agent::GuestAgent;
use crate::qemu::nbd::{Extent, STATE_ZERO};
use crate::qemu::qmp::Qmp;
use crate::qemu::testing::{hmp_write, paused_vm, vm_with_agent, Proc};
use crate::repo::Repository;
use clap::Parser;
use rand::RngCore;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    let cmd = match &img {
        Some(img) => paused_vm(img, &qmp),
        None => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-S", "-nodefaults", "-display", "none", "-m", "64", "-qmp"])
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
            c
        }
    };
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

#[test]
fn order_by_rate_puts_the_busiest_first_and_keeps_ties_in_the_given_order() {
    let r = |v: &[(&str, f64)]| -> Vec<usize> {
        order_by_rate(
            &v.iter()
                .map(|(n, x)| (n.to_string(), *x))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(r(&[("a", 10.0), ("b", 300.0), ("c", 20.0)]), [1, 2, 0]);
    assert_eq!(
        r(&[("a", 0.0), ("b", 0.0), ("c", 5.0), ("d", 0.0)]),
        [2, 0, 1, 3]
    );
    assert!(r(&[]).is_empty());
}

#[test]
fn a_vm_name_or_a_qmp_socket_given_twice_is_refused_before_anything_is_touched() {
    let (_d, repo) = repo();
    let spec = |name: &str, qmp: &str| VmSpec {
        name: name.into(),
        qmp: qmp.into(),
        agent: None,
        base: None,
    };
    let mut o = Options {
        vms: vec![spec("a", "/x/1.sock"), spec("a", "/x/2.sock")],
        jobs: 1,
        chunk_size: CHUNK,
        rate_window: Duration::ZERO,
        agent_timeout: Duration::ZERO,
        incremental: false,
        order: ReadOrder::BusiestFirst,
        hook: None,
    };
    let e = backup_vms(&repo, &o).unwrap_err().to_string();
    assert_eq!(e, "VM a is given twice");
    o.vms[1].name = "b".into();
    o.vms[1].qmp = "/x/1.sock".into();
    let e = backup_vms(&repo, &o).unwrap_err().to_string();
    assert_eq!(e, "QMP socket /x/1.sock is given twice");
}

#[test]
fn chunks_with_data_skips_zero_extents_and_reads_holes_that_may_not_be_zero() {
    let e = |offset, len, flags| Extent { offset, len, flags };
    let cs = CHUNK as u64;
    let ext = [
        e(0, cs + 10, 0),
        e(cs + 10, 3 * cs, STATE_ZERO | crate::qemu::nbd::STATE_HOLE),
        e(4 * cs + 10, cs, crate::qemu::nbd::STATE_HOLE),
        e(5 * cs + 10, 2 * cs, STATE_ZERO),
        e(7 * cs + 10, 1, 0),
    ];
    assert_eq!(chunks_with_data(&ext, CHUNK), [0, 1, 4, 5, 7]);
}

#[test]
fn vms_backed_up_from_one_snapshot_time_hold_its_content_busiest_first_releasing_each_before_the_next_is_read(
) {
    let data: Vec<Vec<u8>> = (0..3).map(|_| content()).collect();
    let vms: Vec<Vm> = data.iter().map(|d| vm(Some(d))).collect();
    let names = ["alpha", "beta", "gamma"];
    // The test writes through each device as soon as its VM resumes,
    // while every view is open and none has been read.
    let mons: Arc<Mutex<HashMap<String, Qmp>>> = Arc::new(Mutex::new(
        names
            .iter()
            .zip(&vms)
            .map(|(n, v)| (n.to_string(), v.monitor()))
            .collect(),
    ));
    let m = mons.clone();
    let hook: Hook = Arc::new(move |vm, event| {
        if event == "resumed" {
            let mut mons = m.lock().unwrap();
            let q = mons.get_mut(vm).unwrap();
            hmp_write(q, 0xbb, 0, 64 << 10);
            hmp_write(q, 0xcc, 2 * MIB + 4096, 4096);
        }
    });
    let (_d, repo) = repo();
    let mut opts = options(
        &names.iter().copied().zip(&vms).collect::<Vec<_>>(),
        1,
        Some(hook),
    );
    // No agent answers here: the backup goes on crash-consistent.
    opts.vms[1].agent = Some(PathBuf::from("/nonexistent/qga.sock"));
    let t0 = Instant::now();
    let s = backup_vms(&repo, &opts).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("{}", serde_json::to_string_pretty(&s).unwrap());
    assert!(s.failed().is_empty(), "{:?}", s.failed());
    assert!(s.snapshot_time.is_some());

    for ((n, v), d) in names.iter().zip(&vms).zip(&data) {
        let r = report(&s, n);
        let now = std::fs::read(v.img.as_ref().unwrap()).unwrap();
        assert_eq!(
            (now[0], now[2 * MIB + 4096]),
            (0xbb, 0xcc),
            "{n}: the writes reached the disk"
        );
        assert!(
            restored(&repo, n, r.backup.as_deref().unwrap()) == *d,
            "{n}: the backup holds the disk as it was at the snapshot"
        );
        // The hole was not read, but for the chunk the test wrote into it
        // after the snapshot (its old zeros went to the view's store).
        let hole_chunk = r.bytes_read - 3 * MIB as u64;
        assert!(
            hole_chunk == 0 || hole_chunk == CHUNK as u64,
            "{n}: {}",
            r.bytes_read
        );
        assert!(r.new_bytes > 0);
        let mut q = mons.lock().unwrap().remove(*n).unwrap();
        let left = leftovers_but_kept(&mut q, &repo, n, r.backup.as_deref().unwrap());
        assert!(left.is_empty(), "{n}: {left:?}");
        assert!(q.status().unwrap().running, "{n} runs again");
        eprintln!(
            "{n}: paused {:.1} ms, read {} B in {:.1} ms ({:.1} MiB/s)",
            r.paused_ms.unwrap(),
            r.bytes_read,
            r.read_ms,
            r.bytes_read as f64 / MIB as f64 / (r.read_ms / 1000.0)
        );
        mons.lock().unwrap().insert(n.to_string(), q);
    }
    eprintln!("whole run {secs:.2} s");
    assert!(report(&s, "beta")
        .consistency
        .starts_with("crash-consistent: guest agent"));
    assert_eq!(report(&s, "alpha").consistency, "crash-consistent");

    // One snapshot time: every VM stopped, and every view opened, before
    // any VM resumed.
    let last_stop = s.vms.iter().map(|r| at(r, "stopped")).max().unwrap();
    let last_view = s.vms.iter().map(|r| at(r, "view_opened")).max().unwrap();
    let first_cont = s.vms.iter().map(|r| at(r, "resumed")).min().unwrap();
    assert!(last_stop < first_cont && last_view < first_cont);

    // Read in the computed order, one at a time: each VM's manifest is
    // written and its view released before the next VM's read starts.
    let mut by_order: Vec<&VmReport> = s.vms.iter().collect();
    by_order.sort_by_key(|r| r.order.unwrap());
    assert_eq!(
        by_order
            .iter()
            .map(|r| r.order.unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for w in by_order.windows(2) {
        assert!(at(w[0], "read_started") < at(w[0], "manifest_written"));
        assert!(at(w[0], "manifest_written") < at(w[0], "view_released"));
        assert!(
            at(w[0], "view_released") < at(w[1], "read_started"),
            "{} released before {} is read",
            w[0].vm,
            w[1].vm
        );
    }
}

#[test]
fn a_vm_killed_after_the_snapshot_gets_no_manifest_and_the_others_are_backed_up() {
    let vms: Vec<Arc<Vm>> = (0..3).map(|_| Arc::new(vm(Some(&content())))).collect();
    let names = ["a", "b", "c"];
    // When the first VM's read starts, kill another one: it is read later.
    let killed: Arc<Mutex<Option<String>>> = Arc::default();
    let (k, all) = (killed.clone(), vms.clone());
    let hook: Hook = Arc::new(move |vm, event| {
        let mut k = k.lock().unwrap();
        if event == "read_started" && k.is_none() {
            let i = names.iter().position(|n| *n != vm).unwrap();
            all[i].kill();
            *k = Some(names[i].to_string());
        }
    });
    let (_d, repo) = repo();
    let pairs: Vec<(&str, &Vm)> = names
        .iter()
        .copied()
        .zip(vms.iter().map(|v| &**v))
        .collect();
    let s = backup_vms(&repo, &options(&pairs, 1, Some(hook))).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&s).unwrap());
    let victim = killed.lock().unwrap().clone().unwrap();
    for n in names {
        let r = report(&s, n);
        if n == victim {
            assert!(r.backup.is_none(), "{r:?}");
            let e = r.error.as_deref().unwrap();
            assert!(e.starts_with("the VM's QEMU is gone: disk 0: "), "{e}");
            assert!(repo.backup_ids(n).unwrap_or_default().is_empty());
            assert!(at(r, "failed") > at(r, "read_started"));
        } else {
            assert!(r.error.is_none(), "{n}: {:?}", r.error);
            assert_eq!(repo.backup_ids(n).unwrap().len(), 1);
        }
    }
    assert_eq!(s.failed().len(), 1);
}

#[test]
fn an_unreachable_qmp_socket_and_a_vm_without_disks_fail_alone_with_one_line_errors_and_a_nonzero_exit(
) {
    let good = vm(Some(&content()));
    let diskless = vm(None);
    let d = tempfile::tempdir().unwrap();
    let repo_dir = d.path().join("repo");
    let missing = d.path().join("nobody.sock");
    let cli = crate::cli::Cli::try_parse_from([
        "recoverfs".to_string(),
        "backup-vms".into(),
        "--repo".into(),
        repo_dir.display().to_string(),
        "--vm".into(),
        format!("gone={}", missing.display()),
        "--vm".into(),
        format!("empty={}", diskless.qmp.display()),
        "--vm".into(),
        format!("good={}", good.qmp.display()),
        "--chunk-size".into(),
        "64K".into(),
        "--rate-window".into(),
        "0.1".into(),
    ])
    .unwrap();
    let e = crate::cli::run(cli).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(e.starts_with("2 of 3 VMs failed"), "{e}");
    assert!(
        e.contains("gone: ") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    assert!(e.contains("empty: QEMU reports no disk"), "{e}");
    let repo = Repository::open(repo_dir.to_str().unwrap()).unwrap();
    assert_eq!(repo.backup_ids("good").unwrap().len(), 1);
    assert!(repo.backup_ids("empty").unwrap_or_default().is_empty());
    // The diskless VM is left running, its NBD server never started.
    assert!(
        Qmp::connect(&diskless.mon)
            .unwrap()
            .status()
            .unwrap()
            .running
    );
}

#[test]
fn two_vms_read_two_at_a_time_through_the_cli_restore_to_their_content_and_leave_no_view() {
    let data: Vec<Vec<u8>> = (0..2).map(|_| content()).collect();
    let vms: Vec<Vm> = data.iter().map(|d| vm(Some(d))).collect();
    let d = tempfile::tempdir().unwrap();
    let repo_dir = d.path().join("repo");
    let mut args: Vec<String> = ["recoverfs", "backup-vms", "--repo"]
        .map(String::from)
        .to_vec();
    args.push(repo_dir.display().to_string());
    for (n, v) in ["x", "y"].iter().zip(&vms) {
        args.extend(["--vm".into(), format!("{n}={}", v.qmp.display())]);
    }
    args.extend(
        [
            "--jobs",
            "2",
            "--chunk-size",
            "64K",
            "--rate-window",
            "0.1",
            "--json",
        ]
        .map(String::from),
    );
    crate::cli::run(crate::cli::Cli::try_parse_from(args).unwrap()).unwrap();
    let repo = Repository::open(repo_dir.to_str().unwrap()).unwrap();
    for ((n, v), d) in ["x", "y"].iter().zip(&vms).zip(&data) {
        let ids = repo.backup_ids(n).unwrap();
        assert_eq!(ids.len(), 1);
        assert!(restored(&repo, n, &ids[0]) == *d, "{n}");
        let mut q = v.monitor();
        let left = leftovers_but_kept(&mut q, &repo, n, &ids[0]);
        assert!(left.is_empty(), "{n}: {left:?}");
        assert!(q.status().unwrap().running);
    }
}

/// The `debian` image booted (writes to a throwaway overlay) with QMP and
/// the guest agent's port, its agent answering.
fn debian(dir: &Path) -> (Proc, PathBuf, PathBuf) {
    let qmp = dir.join("deb-qmp.sock");
    let qga = dir.join("deb-qga.sock");
    let mut p = Proc::spawn(&mut vm_with_agent("debian", &qga, Some(&qmp)));
    p.wait_for(&qga);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut a = loop {
        match GuestAgent::connect(&qga, Duration::from_secs(5)) {
            Ok(a) => break a,
            Err(e) => {
                assert!(p.0.try_wait().unwrap().is_none(), "guest off: {e}");
                assert!(Instant::now() < deadline, "no agent answered: {e}");
            }
        }
    };
    // The guest writes to its disk without pause (blockstats count it).
    a.execute(
        "guest-exec",
        Some(json!({"path": "/bin/sh", "arg": ["-c",
            "while :; do dd if=/dev/zero of=/var/tmp/busy bs=64k count=64 conv=fsync 2>/dev/null; done"]})),
        Duration::from_secs(30),
    )
    .unwrap();
    // guest-exec returns before the writer runs (long, on a loaded TCG
    // host): wait until QEMU counts its writes, so the backup measures it.
    let mut q = Qmp::connect(&qmp).unwrap();
    let start = q.written_bytes().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while q.written_bytes().unwrap() < start + (4 << 20) {
        assert!(Instant::now() < deadline, "the guest's writer never wrote");
        std::thread::sleep(Duration::from_millis(100));
    }
    (p, qmp, qga)
}

#[test]
fn a_guest_writing_to_its_disk_is_measured_busiest_read_first_frozen_through_its_agent_and_its_backup_boots(
) {
    let d = tempfile::tempdir().unwrap();
    let idle = vm(Some(&content()));
    let (_deb, deb_qmp, deb_qga) = debian(d.path());
    let (_r, repo) = repo();
    let mut opts = options(&[("idle", &idle)], 1, None);
    opts.vms.push(VmSpec {
        name: "busy".into(),
        qmp: deb_qmp,
        agent: Some(deb_qga),
        base: None,
    });
    opts.chunk_size = 1 << 20;
    opts.rate_window = Duration::from_secs(1);
    opts.agent_timeout = Duration::from_secs(10);
    let s = backup_vms(&repo, &opts).unwrap();
    let (busy, idle) = (report(&s, "busy"), report(&s, "idle"));
    eprintln!(
        "busy: {:.0} B/s, paused {:.1} ms, read {} B in {:.0} ms; idle: {:.0} B/s",
        busy.write_rate,
        busy.paused_ms.unwrap(),
        busy.bytes_read,
        busy.read_ms,
        idle.write_rate
    );
    assert!(s.failed().is_empty(), "{:?}", s.failed());
    assert!(busy.write_rate > idle.write_rate, "{busy:?}");
    assert_eq!((busy.order, idle.order), (Some(1), Some(2)));
    assert!(at(busy, "view_released") < at(idle, "read_started"));
    assert_eq!(busy.consistency, "application-consistent");
    // Frozen before the stop, thawed after the cont.
    assert!(at(busy, "frozen") < at(busy, "stopped"));
    assert!(at(busy, "resumed") < at(busy, "thawed"));
    let m = repo.resolve("busy", busy.backup.as_deref()).unwrap();
    assert_eq!(m.disks[0].size, 1536 << 20);
    assert_eq!(
        m.config["backup_vms"]["consistency"],
        "application-consistent"
    );
    // The backup of the running, writing guest boots: a throwaway recovery
    // reaches the debian image's marker.
    let r = crate::verify_boot::verify_boot(crate::verify_boot::VerifyBootOptions {
        repo: _r.path().join("repo").to_string_lossy().to_string(),
        vm: "busy".into(),
        backup: busy.backup.clone(),
        marker: Some("RECOVERFS-DEBIAN-UP".into()),
        timeout: Duration::from_secs(300),
        console_log: None,
        stop: Default::default(),
    })
    .unwrap();
    assert!(
        r.passed(),
        "the restored VM did not boot: {:?}",
        r.console_tail
    );
}

#[test]
fn a_vm_whose_second_view_cannot_open_is_undone_resumed_and_fails_alone() {
    let good = vm(Some(&content()));
    // A second drive with no guest device: its view cannot switch a
    // device onto the copy-before-write filter, after the first view is
    // open.
    let dir = tempfile::tempdir().unwrap();
    let (img, extra, qmp) = (
        dir.path().join("a.raw"),
        dir.path().join("b.raw"),
        dir.path().join("qmp.sock"),
    );
    std::fs::write(&img, content()).unwrap();
    std::fs::write(&extra, content()).unwrap();
    let mut cmd = paused_vm(&img, &qmp);
    cmd.arg("-drive").arg(format!(
        "file={},format=raw,if=none,id=drive1",
        extra.display()
    ));
    let broken = start(cmd, qmp, Some(img), dir);
    let mut q = broken.monitor();
    let (_d, repo) = repo();
    let s = backup_vms(
        &repo,
        &options(&[("broken", &broken), ("good", &good)], 1, None),
    )
    .unwrap();
    let r = report(&s, "broken");
    let e = r.error.as_deref().unwrap();
    assert!(e.starts_with("disk 1 ("), "{e}");
    assert_eq!(
        r.events
            .iter()
            .map(|e| e.event.as_str())
            .collect::<Vec<_>>(),
        [
            "stopped",
            "view_opened",
            "failed",
            "view_released",
            "resumed"
        ]
    );
    assert!(r.paused_ms.is_some());
    assert!(repo.backup_ids("broken").unwrap_or_default().is_empty());
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
    assert!(q.status().unwrap().running);
    assert!(report(&s, "good").backup.is_some());
    assert_eq!(s.failed().len(), 1);
}

#[test]
fn a_stop_answered_too_late_is_followed_by_cont() {
    let v = vm(Some(&content()));
    let (d, repo) = repo();
    // QEMU carries the stop out, and its answer comes after the backup's
    // QMP timeout (as when draining the guest's I/O outlasts it), well
    // after it: the kernel may end a 30 s socket timeout seconds late.
    let relay = d.path().join("relay.sock");
    incremental::qmp_relay(
        &relay,
        &v.qmp,
        |_| None,
        |cmd| {
            if cmd["execute"] == "stop" {
                std::thread::sleep(crate::qemu::qmp::DEFAULT_TIMEOUT + Duration::from_secs(5));
            }
        },
    );
    let mut opts = options(&[("late", &v)], 1, None);
    opts.vms[0].qmp = relay;
    let s = backup_vms(&repo, &opts).unwrap();
    let r = report(&s, "late");
    let mut q = v.monitor();
    assert!(q.status().unwrap().running, "the VM runs again: {r:?}");
    assert!(r.paused_ms.is_some(), "{r:?}");
    let e = r.error.as_deref().unwrap();
    assert!(e.starts_with("stopping the VM: no answer to stop"), "{e}");
    assert!(r.backup.is_none());
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
}

#[test]
fn a_failing_copy_before_write_store_breaks_the_snapshot_not_the_guests_writes_and_the_backup_fails(
) {
    let data = content();
    let v = vm(Some(&data));
    let (d, repo) = repo();
    // Each view's store is opened through blkdebug, every write to it an
    // I/O error (as on a full or failing host disk).
    let mon = Arc::new(Mutex::new(v.monitor()));
    let m = mon.clone();
    let relay = d.path().join("relay.sock");
    incremental::qmp_relay(
        &relay,
        &v.qmp,
        move |cmd| {
            let a = &cmd["arguments"];
            let store = cmd["execute"] == "blockdev-add"
                && a["driver"] == "file"
                && a["node-name"].as_str()?.starts_with("rfs-tmp-");
            store.then(|| {
                let args = json!({"driver": "blkdebug", "node-name": a["node-name"],
                    "image": {"driver": "file", "filename": a["filename"]},
                    "inject-error": [{"event": "pwritev", "iotype": "write", "errno": 5}]});
                match m.lock().unwrap().execute("blockdev-add", Some(args)) {
                    Ok(r) => json!({ "return": r }),
                    Err(e) => json!({"error": {"class": "GenericError", "desc": e.to_string()}}),
                }
            })
        },
        |_| {},
    );
    // The guest overwrites data the view still has to read.
    let out: Arc<Mutex<Option<String>>> = Arc::default();
    let (m, o) = (mon.clone(), out.clone());
    let hook: Hook = Arc::new(move |_, event| {
        if event == "resumed" {
            let r = m.lock().unwrap().execute(
                "human-monitor-command",
                Some(json!({"command-line": "qemu-io drive0 \"write -P 0xbb 0 65536\""})),
            );
            *o.lock().unwrap() = Some(format!("{r:?}"));
        }
    });
    let mut opts = options(&[("cbw", &v)], 1, Some(hook));
    opts.vms[0].qmp = relay;
    let s = backup_vms(&repo, &opts).unwrap();
    let r = report(&s, "cbw");
    assert_eq!(
        out.lock().unwrap().as_deref(),
        Some("Ok(String(\"\"))"),
        "the guest's write succeeds"
    );
    assert_eq!(std::fs::read(v.img.as_ref().unwrap()).unwrap()[0], 0xbb);
    let e = r.error.as_deref().unwrap_or_else(|| panic!("{r:?}"));
    assert!(
        e.starts_with(
            "QEMU could not read the snapshot (broken if a copy-before-write store failed"
        ),
        "{e}"
    );
    assert!(r.backup.is_none());
    assert!(repo.backup_ids("cbw").unwrap_or_default().is_empty());
    let mut q = mon.lock().unwrap();
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
    assert!(q.status().unwrap().running);
}

/// A scripted guest agent on `path` (the real one needs a booted guest):
/// it syncs and freezes, and answers the `n`th `guest-fsfreeze-thaw`
/// (counted from one) if `answer_thaw(n)`, else closes the connection
/// unanswered (a lost reply, an agent restarted). Returns the connection
/// number (from one) of each thaw seen.
fn scripted_agent(
    path: &Path,
    answer_thaw: impl Fn(usize) -> bool + Send + 'static,
) -> Arc<Mutex<Vec<usize>>> {
    scripted_agent_with(path, true, answer_thaw)
}

/// [`scripted_agent`] whose `guest-fsfreeze-freeze` closes the connection
/// unanswered unless `answer_freeze` (a freeze that timed out).
fn scripted_agent_with(
    path: &Path,
    answer_freeze: bool,
    answer_thaw: impl Fn(usize) -> bool + Send + 'static,
) -> Arc<Mutex<Vec<usize>>> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    let thaws: Arc<Mutex<Vec<usize>>> = Arc::default();
    let t = thaws.clone();
    std::thread::spawn(move || {
        for (conn, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let mut out = client.try_clone().unwrap();
            for line in BufReader::new(client).split(b'\n') {
                let Ok(line) = line else { break };
                let start = line.iter().position(|&b| b != 0xff).unwrap_or(line.len());
                let Ok(cmd) = serde_json::from_slice::<Value>(&line[start..]) else {
                    continue;
                };
                let reply = match cmd["execute"].as_str().unwrap_or("") {
                    "guest-sync-delimited" => {
                        out.write_all(&[0xff]).unwrap();
                        json!({"return": cmd["arguments"]["id"]})
                    }
                    "guest-fsfreeze-thaw" => {
                        let mut t = t.lock().unwrap();
                        t.push(conn + 1);
                        if !answer_thaw(t.len()) {
                            break;
                        }
                        json!({"return": 1})
                    }
                    "guest-fsfreeze-freeze" if !answer_freeze => break,
                    _ => json!({"return": 1}),
                };
                if writeln!(out, "{reply}").is_err() {
                    break;
                }
            }
        }
    });
    thaws
}

#[test]
fn a_thaw_whose_reply_is_lost_is_retried_on_a_new_connection_and_one_that_still_fails_fails_the_vm_saying_the_guest_may_be_frozen(
) {
    let (lost, stuck) = (vm(Some(&content())), vm(Some(&content())));
    let (d, repo) = repo();
    let (lost_qga, stuck_qga) = (d.path().join("lost.sock"), d.path().join("stuck.sock"));
    let retried = scripted_agent(&lost_qga, |n| n > 1);
    let never = scripted_agent(&stuck_qga, |_| false);
    let mut opts = options(&[("lost", &lost), ("stuck", &stuck)], 1, None);
    opts.vms[0].agent = Some(lost_qga);
    opts.vms[1].agent = Some(stuck_qga);
    let s = backup_vms(&repo, &opts).unwrap();

    let r = report(&s, "lost");
    assert_eq!(
        *retried.lock().unwrap(),
        [1, 2],
        "thawed again on a new connection"
    );
    assert!(r.error.is_none() && r.backup.is_some(), "{r:?}");
    assert!(at(r, "resumed") < at(r, "thawed"));
    assert_eq!(r.consistency, "application-consistent");

    let r = report(&s, "stuck");
    assert_eq!(never.lock().unwrap().len(), 2);
    let e = r.error.as_deref().unwrap_or_else(|| panic!("{r:?}"));
    assert!(e.starts_with("THE GUEST MAY STILL BE FROZEN"), "{e}");
    assert!(r.backup.is_none());
    assert!(repo.backup_ids("stuck").unwrap_or_default().is_empty());
    let mut q = stuck.monitor();
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
    assert!(q.status().unwrap().running);
    let mut q = lost.monitor();
    let id = report(&s, "lost").backup.clone().unwrap();
    let left = leftovers_but_kept(&mut q, &repo, "lost", &id);
    assert!(left.is_empty(), "{left:?}");
    assert!(q.status().unwrap().running);
}

#[test]
fn a_run_after_a_killed_run_removes_its_leftovers_and_backs_up() {
    let data = content();
    let v = vm(Some(&data));
    // A run killed while its view was open: view, export and NBD server
    // left in QEMU, the guest device on the copy-before-write filter.
    let dead = tempfile::Builder::new()
        .prefix("recoverfs-vmbackup-")
        .tempdir()
        .unwrap();
    let run_lock = crate::util::try_lock_file(&dead.path().join(fleece::RUN_LOCK))
        .unwrap()
        .unwrap();
    {
        let mut q = Qmp::connect(&v.qmp).unwrap();
        let disk = q.block_devices().unwrap().remove(0);
        fleece::start_nbd_server(&mut q, &dead.path().join("nbd.sock")).unwrap();
        q.stop().unwrap();
        fleece::open_view(&mut q, &disk, "dead00-0-0", dead.path(), CHUNK).unwrap();
        q.cont().unwrap();
    }
    let mut q = v.monitor();
    let left = leftovers(&mut q);
    assert!(left.contains(&"rfs-cbw-dead00-0-0".to_string()), "{left:?}");
    let (_d, repo) = repo();
    let opts = options(&[("again", &v)], 1, None);
    // While that run lives (holds its lock), its view is left alone and
    // the new run fails alone.
    let s = backup_vms(&repo, &opts).unwrap();
    let e = report(&s, "again").error.clone().unwrap();
    assert!(e.contains("NBD server already running"), "{e}");
    assert_eq!(leftovers(&mut q), left);
    let exports = q.execute("query-block-exports", None).unwrap();
    assert_eq!(exports.as_array().unwrap().len(), 1);
    // Killed: its lock goes with it.
    drop(run_lock);
    let s = backup_vms(&repo, &opts).unwrap();
    assert!(s.failed().is_empty(), "{:?}", s.failed());
    let id = report(&s, "again").backup.clone().unwrap();
    assert!(restored(&repo, "again", &id) == data);
    let left = leftovers_but_kept(&mut q, &repo, "again", &id);
    assert!(left.is_empty(), "{left:?}");
    let exports = q.execute("query-block-exports", None).unwrap();
    assert_eq!(exports, json!([]));
    assert!(!dead.path().join("rfs-dead00-0-0.cbw").exists());
    // The guest device writes to its own disk again.
    hmp_write(&mut q, 0x5a, 0, 4096);
    assert_eq!(std::fs::read(v.img.as_ref().unwrap()).unwrap()[0], 0x5a);
    assert!(q.status().unwrap().running);
}

#[test]
fn a_signal_during_the_first_read_fails_every_vm_through_its_cleanup_resumed_and_without_views_or_manifests(
) {
    let vms: Vec<Vm> = (0..2).map(|_| vm(Some(&content()))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let hook: Hook = Arc::new(move |_, event| {
        if event == "read_started" {
            s2.store(true, Ordering::SeqCst);
        }
    });
    let (_d, repo) = repo();
    let opts = options(&[("one", &vms[0]), ("two", &vms[1])], 1, Some(hook));
    let s = backup_vms_until(&repo, &opts, &stop).unwrap();
    assert_eq!(s.failed().len(), 2, "{:?}", s.vms);
    for (n, v) in ["one", "two"].iter().zip(&vms) {
        let r = report(&s, n);
        let e = r.error.as_deref().unwrap();
        assert!(e.contains(INTERRUPTED), "{n}: {e}");
        assert!(repo.backup_ids(n).unwrap_or_default().is_empty());
        assert!(at(r, "resumed") < at(r, "failed"));
        let mut q = v.monitor();
        assert!(leftovers(&mut q).is_empty(), "{n}: {:?}", leftovers(&mut q));
        assert_eq!(q.execute("query-block-exports", None).unwrap(), json!([]));
        assert!(q.status().unwrap().running, "{n}");
    }
}

pub(crate) mod incremental;

#[test]
fn a_second_run_on_a_vm_being_backed_up_fails_busy_through_another_monitor_and_the_first_completes()
{
    let data = content();
    let v = vm(Some(&data));
    let (_d, repo) = repo();
    // Run B goes through the VM's other monitor while run A has started
    // its NBD server and has no export yet (the VM is stopped for the
    // snapshot): B must not take A's server over.
    let mut second = options(&[("busy", &v)], 1, None);
    second.vms[0].qmp = v.mon.clone();
    let b_result = Arc::new(Mutex::new(None));
    let (b_repo, b_out) = (repo.clone(), b_result.clone());
    let hook: Hook = Arc::new(move |_, event| {
        if event == "stopped" {
            let s = backup_vms(&b_repo, &second).unwrap();
            *b_out.lock().unwrap() = Some(report(&s, "busy").clone());
        }
    });
    let s = backup_vms(&repo, &options(&[("busy", &v)], 1, Some(hook))).unwrap();
    let b = b_result.lock().unwrap().take().expect("run B ran");
    let e = b
        .error
        .as_deref()
        .unwrap_or_else(|| panic!("run B succeeded: {b:?}"));
    assert!(e.contains("another recoverfs job"), "{e}");
    let a = report(&s, "busy");
    assert!(a.error.is_none(), "run A failed: {a:?}");
    let id = a.backup.clone().unwrap();
    assert!(restored(&repo, "busy", &id) == data);
    assert!(v.monitor().status().unwrap().running);
}

#[test]
fn a_freeze_that_fails_and_cannot_be_undone_fails_that_vm_saying_the_guest_may_be_frozen_and_never_pauses_it(
) {
    let (frozen, fine) = (vm(Some(&content())), vm(Some(&content())));
    let (d, repo) = repo();
    let qga = d.path().join("frozen.sock");
    let thaws = scripted_agent_with(&qga, false, |_| false);
    let mut opts = options(&[("frozen", &frozen), ("fine", &fine)], 1, None);
    opts.vms[0].agent = Some(qga);
    let s = backup_vms(&repo, &opts).unwrap();
    let r = report(&s, "frozen");
    assert_eq!(thaws.lock().unwrap().len(), 1, "the freeze was not undone");
    let e = r.error.as_deref().unwrap_or_else(|| panic!("{r:?}"));
    assert!(e.contains("THE GUEST MAY STILL BE FROZEN"), "{e}");
    assert!(r.backup.is_none() && r.paused_ms.is_none(), "{r:?}");
    let mut q = frozen.monitor();
    assert!(q.status().unwrap().running);
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
    let r = report(&s, "fine");
    assert!(r.error.is_none() && r.backup.is_some(), "{r:?}");
}
