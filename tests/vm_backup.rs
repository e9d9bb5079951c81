//! `backup-vms` end to end, through the real binary: three `tiny` VMs,
//! each running the guest writer (sector i of its second disk stamped with
//! sequence number i, a flush per write) at a different rate. One run backs
//! them all up from one snapshot time. What it proves:
//! - each restored writer disk is consistent with a single instant: its
//!   stamps are exactly 1..=k, so no write is present without every write
//!   the guest finished before it;
//! - the three VMs were paused together (their stop..cont windows overlap)
//!   and every manifest records the same snapshot time;
//! - the busiest VM is read first, and its view is released before the
//!   last VM's backup finishes (from the command's event log);
//! - every restored backup boots, and its boot counter shows the boot the
//!   guest had finished before the snapshot.
//!
//! Also: a full repository fails one VM cleanly, and SIGINT ends a run
//! through its cleanup (VM running, no view, no NBD server left).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SECTOR: usize = 512;
/// The writer disk: big enough that no writer reaches its end in a test.
const WRITER_MIB: u64 = 16;

/// A tiny VM running its guest writer; killed when dropped.
struct WriterVm {
    name: &'static str,
    child: Child,
    qmp: PathBuf,
    console: PathBuf,
}

impl Drop for WriterVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let c = std::fs::read(&self.console).unwrap_or_default();
            eprintln!(
                "---- console of {} ----\n{}",
                self.name,
                String::from_utf8_lossy(&c)
            );
        }
    }
}

/// A writer disk header: `total` writes, `pause_ms` between them.
fn writer_disk(path: &Path, total: u32, pause_ms: u32) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(WRITER_MIB << 20).unwrap();
    let header = format!("RECOVERFS-WRITER{total:08}{pause_ms:08}{:08}", 0);
    std::os::unix::fs::FileExt::write_all_at(&f, header.as_bytes(), 0).unwrap();
}

/// Starts a tiny VM (its own copy of the image) with the writer disk and
/// QMP, and waits until its writer has made `progress` writes.
fn start(env: &Env, name: &'static str, pause_ms: u32) -> WriterVm {
    let boot = env.path(&format!("{name}-boot.raw"));
    let st = Command::new("cp")
        .args(["--sparse=always"])
        .arg(tiny_image())
        .arg(&boot)
        .status()
        .unwrap();
    assert!(st.success());
    let writer = env.path(&format!("{name}-writer.raw"));
    writer_disk(&writer, 10_000_000, pause_ms);
    let qmp = env.path(&format!("{name}.qmp"));
    let console = env.path(&format!("{name}.console"));
    let child = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-display", "none", "-m", "128", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", boot.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", writer.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    WriterVm {
        name,
        child,
        qmp,
        console,
    }
}

/// Waits until every VM's console shows its writer at work.
fn wait_writing(vms: &mut [WriterVm]) {
    let deadline = Instant::now() + Duration::from_secs(240);
    for vm in vms.iter_mut() {
        loop {
            let c = std::fs::read(&vm.console).unwrap_or_default();
            if String::from_utf8_lossy(&c).contains("RECOVERFS-WRITER start") {
                break;
            }
            if let Ok(Some(st)) = vm.child.try_wait() {
                panic!("{} exited before its writer started: {st}", vm.name);
            }
            assert!(Instant::now() < deadline, "{}: no writer", vm.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A few seconds of writes at each rate before the backup measures them.
    std::thread::sleep(Duration::from_secs(4));
}

/// The stamps of a restored writer disk: `Some(seq)` per sector from 1
/// up to the last stamped one.
fn stamps(disk: &[u8]) -> Vec<Option<u64>> {
    let mut out: Vec<Option<u64>> = disk[SECTOR..]
        .chunks(SECTOR)
        .map(|s| {
            // "RFSW seq=%08d\n"
            let t = std::str::from_utf8(&s[..17]).ok()?;
            t.strip_prefix("RFSW seq=")?.parse().ok()
        })
        .collect();
    while out.last() == Some(&None) {
        out.pop();
    }
    out
}

fn event(vm: &Value, name: &str) -> u64 {
    vm["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == name)
        .unwrap_or_else(|| panic!("{}: no {name} in {}", vm["vm"], vm["events"]))["t_us"]
        .as_u64()
        .unwrap()
}

#[test]
fn three_writing_vms_back_up_at_one_instant_busiest_first_and_every_restored_image_boots() {
    let env = Env::new();
    // Pauses chosen so that the rates differ by far more than TCG's noise:
    // as fast as it goes, ~20 writes/s, ~2 writes/s.
    let mut vms = vec![
        start(&env, "slow", 500),
        start(&env, "busy", 0),
        start(&env, "mid", 50),
    ];
    wait_writing(&mut vms);

    let mut args = vec![
        "backup-vms".to_string(),
        "--repo".into(),
        env.repo_str().into(),
        "--jobs".into(),
        "1".into(),
        "--rate-window".into(),
        "2".into(),
        "--json".into(),
    ];
    for vm in &vms {
        args.push("--vm".into());
        args.push(format!("{}={}", vm.name, vm.qmp.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env.ok(&args);
    let summary: Value = serde_json::from_str(&out).unwrap();
    let report = |name: &str| -> &Value {
        summary["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == name)
            .unwrap()
    };

    // Busiest first: the read order follows the measured write rates.
    // (Which VM measures busiest is the guest's business: besides its
    // writer, a tiny guest's ext4 zeroes its inode tables in the background
    // after boot, so the slow writer's VM can briefly out-write the others.)
    let mut by_order: Vec<&Value> = summary["vms"].as_array().unwrap().iter().collect();
    by_order.sort_by_key(|v| v["order"].as_u64().unwrap());
    let rates: Vec<f64> = by_order
        .iter()
        .map(|v| v["write_rate"].as_f64().unwrap())
        .collect();
    assert!(
        rates.windows(2).all(|w| w[0] >= w[1]),
        "read order does not follow the measured rates: {out}"
    );
    assert_eq!(
        by_order
            .iter()
            .map(|v| v["order"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Read first, released first: the busiest VM's view is gone before the
    // second VM's read starts, and before the last VM finishes.
    let (first, second, last) = (by_order[0], by_order[1], by_order[2]);
    assert!(event(first, "view_released") < event(second, "read_started"));
    assert!(event(first, "view_released") < event(last, "manifest_written"));

    // One instant: every VM was stopped before any was resumed, and every
    // manifest records the run's snapshot time.
    let latest_stop = ["busy", "mid", "slow"]
        .iter()
        .map(|n| event(report(n), "stopped"))
        .max()
        .unwrap();
    let earliest_cont = ["busy", "mid", "slow"]
        .iter()
        .map(|n| event(report(n), "resumed"))
        .min()
        .unwrap();
    assert!(
        latest_stop < earliest_cont,
        "pause windows do not overlap: {out}"
    );
    let snapshot = summary["snapshot_time"].as_str().unwrap();
    let repo = recoverfs::repo::Repository::open(env.repo_str()).unwrap();
    let mut writes = std::collections::HashMap::new();
    for vm in &vms {
        let id = report(vm.name)["backup"].as_str().unwrap();
        let m = repo.resolve(vm.name, Some(id)).unwrap();
        assert_eq!(
            m.config["backup_vms"]["snapshot_time"], snapshot,
            "{}",
            vm.name
        );
        assert_eq!(m.disks.len(), 2, "{}", vm.name);

        // Consistent with one instant: sector i holds stamp i for every i
        // up to the last stamp, and nothing after it.
        let disk = restored(env.repo_str(), vm.name, id, 1);
        let s = stamps(&disk);
        assert!(!s.is_empty(), "{}: no stamp restored", vm.name);
        for (i, stamp) in s.iter().enumerate() {
            assert_eq!(
                *stamp,
                Some(i as u64 + 1),
                "{}: sector {} of {} stamped {stamp:?}",
                vm.name,
                i + 1,
                s.len()
            );
        }
        eprintln!("{}: writes 1..={} in its backup", vm.name, s.len());
        writes.insert(vm.name, s.len());
    }
    // The rates show in the stamps too (the slow VM started first).
    assert!(writes["busy"] > writes["slow"], "{writes:?}");
    drop(vms);

    // Every restored backup boots, and its root filesystem is the one the
    // guest had at the snapshot: one boot done, so this is boot 2.
    for name in ["busy", "mid", "slow"] {
        let out = env.verify_boot(name, "RECOVERFS-TINY-UP boot=2");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A `qemu-nbd` serving a file on a Unix socket; killed when dropped.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl QemuNbd {
    /// Serves `img` read-only as export `vol` on `sock`, once it listens.
    fn serve(img: &Path, sock: &Path) -> QemuNbd {
        let server = QemuNbd(
            Command::new("qemu-nbd")
                .args(["--read-only", "--persistent", "--shared=4", "-f", "raw"])
                .args(["-x", "vol"])
                .arg("-k")
                .arg(sock)
                .arg(img)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

#[test]
fn an_empty_nbd_export_is_refused_and_no_backup_is_published() {
    let env = Env::new();
    let img = env.path("empty.raw");
    std::fs::write(&img, b"").unwrap();
    let sock = env.path("nbd.sock");
    let _server = QemuNbd::serve(&img, &sock);
    let url = format!("nbd+unix:///vol?socket={}", sock.display());
    // The export's size is known only once connected, after the
    // repository is opened (or created).
    env.ok(&["init", "--repo", env.repo_str()]);
    env.fails(
        &["backup", "--repo", env.repo_str(), "--vm", "nbdvm", &url],
        "is empty (0 bytes)",
    );
    let list = env.ok(&["list", "--repo", env.repo_str()]);
    assert!(!list.contains("nbdvm"), "{list}");
}

#[test]
fn backup_of_an_nbd_export_reads_only_its_data_extents_and_restores_byte_for_byte() {
    let env = Env::new();
    let img = env.path("disk.raw");
    // 8 MiB: random data, then a 4 MiB hole the server reports as zeros.
    let data = random_image(&img, 8 << 20, 7, 1 << 20);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    nix::fcntl::fallocate(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        4 << 20,
        4 << 20,
    )
    .unwrap();
    let mut want = data;
    want[4 << 20..].fill(0);
    let sock = env.path("nbd.sock");
    let _server = QemuNbd::serve(&img, &sock);
    let url = format!("nbd+unix:///vol?socket={}", sock.display());
    let out = env.run(&[
        "backup",
        "--repo",
        env.repo_str(),
        "--vm",
        "nbdvm",
        "--chunk-size",
        "1M",
        &url,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Only the 4 MiB of data crossed the wire.
    assert!(err.contains("4.0 MiB read in 4 chunks"), "{err}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(restored(env.repo_str(), "nbdvm", &id, 0), want);

    // Mixed sources and a URL naming no export server are refused in one line.
    let img_s = img.to_str().unwrap();
    let e = env.fails(
        &["backup", "--repo", env.repo_str(), "--vm", "m", img_s, &url],
        "either image files or NBD URLs",
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let missing = format!("nbd+unix:///vol?socket={}", env.path("none.sock").display());
    let e = env.fails(
        &["backup", "--repo", env.repo_str(), "--vm", "m", &missing],
        "cannot connect to the NBD server",
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// The QEMU block nodes and dirty bitmaps a backup left behind.
fn backup_leftovers(qmp: &Path) -> Vec<String> {
    let mut q = recoverfs::qemu::qmp::Qmp::connect(qmp).unwrap();
    let nodes = q
        .execute(
            "query-named-block-nodes",
            Some(serde_json::json!({"flat": true})),
        )
        .unwrap();
    let mut out = vec![];
    for n in nodes.as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap_or("");
        if name.starts_with("rfs-") {
            out.push(name.to_string());
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            out.push(format!("bitmap {}", b["name"]));
        }
    }
    out
}

#[test]
fn a_repository_that_fills_mid_backup_fails_that_vm_in_one_line_leaves_no_backup_or_view_and_the_next_run_succeeds(
) {
    let env = Env::new();
    let img = env.path("data.raw");
    // 24 MiB of incompressible data into a repository with room for 8.
    let data = random_image(&img, 24 << 20, 11, 1 << 20);
    let qmp = env.path("vm.qmp");
    let child = Command::new("qemu-system-x86_64")
        .args(["-S", "-nodefaults", "-display", "none", "-m", "64"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", img.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let vm = WriterVm {
        name: "vm",
        child,
        qmp: qmp.clone(),
        console: env.path("no-console"),
    };
    let repo_dir = env.path("small");
    let fs = Tmpfs::mount(&repo_dir, "8m");
    let repo = repo_dir.join("repo");
    let repo = repo.to_str().unwrap();
    let vm_arg = format!("vm={}", qmp.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    while recoverfs::qemu::qmp::Qmp::connect(&qmp).is_err() {
        assert!(Instant::now() < deadline, "QEMU answers on no QMP socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    let out = env.run(&[
        "backup-vms",
        "--repo",
        repo,
        "--vm",
        &vm_arg,
        "--rate-window",
        "0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("recoverfs: error"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("vm") && errors[0].contains("No space left"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let listed = env.ok(&["list", "--repo", repo, "--json"]);
    assert!(!listed.contains("\"vm\""), "a backup appeared: {listed}");
    assert_eq!(backup_leftovers(&vm.qmp), Vec::<String>::new());

    // Room again: the next run succeeds and restores the disk.
    let st = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&repo_dir)
        .status()
        .unwrap();
    assert!(st.success());
    let out = env.run(&[
        "backup-vms",
        "--repo",
        repo,
        "--vm",
        &vm_arg,
        "--rate-window",
        "0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let id = line.strip_prefix("vm ").unwrap().to_string();
    assert!(
        restored(repo, "vm", &id, 0) == data,
        "the restored disk differs"
    );
    drop(fs);
}

#[test]
fn sigint_during_backup_vms_ends_it_through_its_cleanup_with_one_error_and_the_vm_running() {
    let env = Env::new();
    let img = env.path("data.raw");
    random_image(&img, 4 << 20, 12, 1 << 20);
    let qmp = env.path("vm.qmp");
    // Running (no -S): firmware with nothing to boot.
    let child = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-display", "none", "-m", "64"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", img.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let vm = WriterVm {
        name: "vm",
        child,
        qmp: qmp.clone(),
        console: env.path("no-console"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while recoverfs::qemu::qmp::Qmp::connect(&qmp).is_err() {
        assert!(Instant::now() < deadline, "QEMU answers on no QMP socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let repo = env.path("repo");
    let run = Command::new(bin())
        .args(["backup-vms", "--repo", repo.to_str().unwrap(), "--vm"])
        .arg(format!("vm={}", qmp.display()))
        .args(["--rate-window", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Signalled while it measures write rates, its NBD server started.
    std::thread::sleep(Duration::from_secs(2));
    let st = Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("recoverfs: error"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("interrupted by a signal"), "{err}");
    assert_eq!(backup_leftovers(&vm.qmp), Vec::<String>::new());
    let mut q = recoverfs::qemu::qmp::Qmp::connect(&vm.qmp).unwrap();
    assert!(q.status().unwrap().running);
    // Its NBD server is gone: starting one succeeds.
    let sock = env.path("nbd.sock");
    recoverfs::qemu::fleece::start_nbd_server(&mut q, &sock).unwrap();
}
