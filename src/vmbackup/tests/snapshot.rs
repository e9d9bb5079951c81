//! Runs that succeed: every VM at one snapshot time, read busiest first,
//! each released before the next is read; two at a time through the CLI;
//! and a real guest writing to its disk, measured, frozen through its
//! agent, whose backup boots.

use super::*;
use crate::qemu::guest_agent::GuestAgent;
use crate::qemu::testing::vm_with_agent;

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
        new_identity: false,
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
