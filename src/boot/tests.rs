//! The boot runner: QEMU command lines, signals, scratch directories,
//! with real QEMU started paused where a test needs one.

use super::scratch::{dead_scratch_owner, SCRATCH_OWNER};
use super::*;

#[test]
fn a_console_log_that_cannot_be_created_fails_the_boot_before_qemu_runs() {
    let d = tempfile::tempdir().unwrap();
    let qga = d.path().join("marker-qga.sock");
    let spec = QemuSpec {
        disks: vec![],
        buses: vec![],
        scsi: vec![],
        serials: vec![],
        memory_mib: 64,
        extra: vec![],
        qmp: None,
        qga: Some(qga.clone()),
        uuid: None,
    };
    let watch = Watch {
        marker: "never".into(),
        timeout: Duration::from_secs(1),
        settle: Duration::ZERO,
        heartbeat: false,
    };
    let bad = d.path().join("no/such/dir/console.log");
    let e = boot(&spec, &watch, Some(&bad), |_| {}, |_| None)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("console.log"), "{e}");
    // No QEMU of ours runs on (it would hold the recovered disk open).
    std::thread::sleep(Duration::from_millis(300));
    let ours = std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("marker-qga.sock"))
    });
    assert!(!ours, "a QEMU was left running");
}

#[test]
fn only_scratch_directories_whose_owner_is_proven_dead_are_removed() {
    use crate::repo::locks::{this_process, Owner};
    let tmp = tempfile::tempdir().unwrap();
    let me = this_process();
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let make = |name: &str, owner: Option<&Owner>| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(d.join("staging/vm")).unwrap();
        std::fs::write(d.join("staging/vm/disk0.raw"), b"x").unwrap();
        if let Some(o) = owner {
            std::fs::write(d.join(SCRATCH_OWNER), serde_json::to_vec(o).unwrap()).unwrap();
        }
        d
    };
    let dead = Owner {
        pid: dead_pid,
        ..me.clone()
    };
    let reused = Owner {
        start_time: me.start_time.map(|t| t + 1),
        ..me.clone()
    };
    let elsewhere = Owner {
        host: "another-host".into(),
        ..dead.clone()
    };
    let gone = [
        make("recoverfs-verify-dead01", Some(&dead)),
        make("recoverfs-boot-dead02", Some(&dead)),
        // This pid, now another program than the run that made it.
        make("recoverfs-verify-reuse", Some(&reused)),
    ];
    let kept = [
        // A live run's: this process.
        make("recoverfs-verify-live01", Some(&me)),
        make("recoverfs-boot-live02", Some(&me)),
        // No owner recorded (an older run, or one being made).
        make("recoverfs-verify-old001", None),
        // Another host's (a shared /tmp): not provably dead.
        make("recoverfs-verify-other", Some(&elsewhere)),
        // Not a scratch directory of boot or verify-boot.
        make("recoverfs-e2e-dead03", Some(&dead)),
        make("mine-dead04", Some(&dead)),
    ];
    // Another user's (only root can make one).
    let theirs = make("recoverfs-verify-theirs", Some(&dead));
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&theirs, Some(1), None).unwrap();
    } else {
        std::fs::remove_dir_all(&theirs).unwrap();
        make("recoverfs-verify-theirs", Some(&me));
    }
    // A symbolic link to a dead run's directory is not followed.
    let target = make("elsewhere", Some(&dead));
    std::os::unix::fs::symlink(&target, tmp.path().join("recoverfs-verify-link")).unwrap();
    let mut removed = remove_stale_scratch(tmp.path());
    removed.sort();
    let canon = |p: &Path| {
        std::fs::canonicalize(p.parent().unwrap())
            .unwrap()
            .join(p.file_name().unwrap())
    };
    let mut want: Vec<PathBuf> = gone.iter().map(|p| canon(p)).collect();
    want.sort();
    assert_eq!(removed, want);
    for d in &gone {
        assert!(!d.exists(), "{} stays", d.display());
    }
    for d in kept.iter().chain([&target, &theirs]) {
        assert!(
            d.join("staging/vm/disk0.raw").exists(),
            "{} was touched",
            d.display()
        );
    }
    assert!(tmp
        .path()
        .join("recoverfs-verify-link")
        .symlink_metadata()
        .is_ok());
}

#[test]
fn a_scratch_directory_names_its_owner_and_is_removed_when_dropped() {
    let d = scratch_dir("boot").unwrap();
    let path = d.path().to_path_buf();
    assert!(path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("recoverfs-boot-"));
    let o: crate::repo::locks::Owner =
        serde_json::from_slice(&std::fs::read(path.join(SCRATCH_OWNER)).unwrap()).unwrap();
    assert_eq!(o, crate::repo::locks::this_process());
    // Alive: never another run's to remove.
    assert_eq!(dead_scratch_owner(&path), None);
    drop(d);
    assert!(!path.exists());
}

#[test]
fn a_stop_after_the_marker_does_not_wait_for_the_guest_to_power_off() {
    // A paused QEMU (no guest runs) whose own warning is the marker.
    let mut spec = QemuSpec::from_config(&serde_json::json!({"memory_mib": 64}), vec![]).unwrap();
    spec.extra = ["-S", "-cpu", "qemu64,+avx512f"].map(String::from).to_vec();
    let watch = Watch {
        marker: "TCG doesn't support requested feature".into(),
        timeout: Duration::from_secs(60),
        settle: Duration::from_secs(60),
        heartbeat: false,
    };
    let t = Instant::now();
    let mut marker_at = None;
    let r = boot(
        &spec,
        &watch,
        None,
        |_| {},
        // The signal comes a second into the wait for the power-off.
        |elapsed| {
            let at = *marker_at.get_or_insert(elapsed);
            (elapsed > at + Duration::from_secs(1)).then(|| "stopped by SIGTERM".to_string())
        },
    )
    .unwrap();
    assert!(
        matches!(r.outcome, Outcome::Marker { .. }),
        "{:?}",
        r.outcome
    );
    assert!(!r.clean_exit);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the stop waited {:?} for a guest that never powers off",
        t.elapsed()
    );
}

#[test]
fn a_recovered_vm_boots_with_the_uuid_its_backup_recorded_and_a_forged_one_is_refused() {
    let config = serde_json::json!({
        "memory_mib": 64,
        "backup_vms": {"qemu": {"uuid": "6f1b3c2e-0000-4000-8000-00000000000a", "name": "web01"}}
    });
    let spec = QemuSpec::from_config(&config, vec![]).unwrap();
    let args: Vec<String> = spec
        .command(Path::new("/tmp/qga.sock"))
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let at = args.iter().position(|a| a == "-uuid").expect("-uuid given");
    assert_eq!(args[at + 1], "6f1b3c2e-0000-4000-8000-00000000000a");
    // None recorded: QEMU's own.
    let plain = QemuSpec::from_config(&serde_json::json!({}), vec![]).unwrap();
    assert!(!plain
        .command(Path::new("/tmp/qga.sock"))
        .get_args()
        .any(|a| a == "-uuid"));
    let forged = serde_json::json!({"backup_vms": {"qemu": {"uuid": "x,id=evil"}}});
    let e = QemuSpec::from_config(&forged, vec![])
        .err()
        .expect("refused");
    assert!(e.to_string().contains("is not a UUID"), "{e}");
}

fn args_of(spec: &QemuSpec) -> Vec<String> {
    spec.command(Path::new("/tmp/qga.sock"))
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

fn files(n: usize) -> Vec<DiskSource> {
    (0..n)
        .map(|i| DiskSource::File(PathBuf::from(format!("/m/vm/disk{i}.raw"))))
        .collect()
}

#[test]
fn disks_are_attached_on_the_buses_their_backup_recorded_disk0_first() {
    let config = serde_json::json!({"disks": [
        {"name": "disk0", "bus": "ide"}, {"name": "disk1", "bus": "virtio"},
        {"name": "disk2", "bus": "scsi"}, {"name": "disk3", "bus": "nvme"},
        {"name": "disk4", "bus": "sata,id=x"}, {"name": "disk5"},
        {"name": "disk6", "bus": "ide"}, {"name": "disk7", "bus": "ide"}]});
    let mut disks = files(5);
    disks.push(DiskSource::nbd("nbd://127.0.0.5/vm/disk5").unwrap());
    disks.extend(files(8).into_iter().skip(6));
    let spec = QemuSpec::from_config(&config, disks).unwrap();
    use DiskBus::*;
    assert_eq!(
        spec.buses,
        [Ide, Virtio, Scsi, Nvme, Virtio, Virtio, Ide, Ide]
    );
    let a = args_of(&spec);
    let devices: Vec<&str> = a
        .windows(2)
        .filter(|w| w[0] == "-device")
        .map(|w| w[1].as_str())
        .collect();
    assert_eq!(
        devices,
        [
            "ide-hd,drive=rfs0,bus=ide.0,unit=0,bootindex=0",
            "virtio-blk-pci,drive=rfs1,bootindex=1",
            "nvme,drive=rfs3,serial=rfs3,bootindex=3",
            "virtio-blk-pci,drive=rfs4,bootindex=4",
            "virtio-blk-pci,drive=rfs5,bootindex=5",
            // QEMU places two IDE disks at most by itself.
            "ide-hd,drive=rfs6,bus=ide.0,unit=1,bootindex=6",
            "ide-hd,drive=rfs7,bus=ide.1,unit=0,bootindex=7",
            // The SCSI disk once its controller exists.
            "virtio-scsi-pci,id=rfs-scsi0",
            "scsi-hd,drive=rfs2,bus=rfs-scsi0.0,bootindex=2",
            "virtio-serial-pci,id=rfs-serial0",
            "virtserialport,bus=rfs-serial0.0,chardev=rfs-qga0,name=org.qemu.guest_agent.0",
        ]
    );
    assert!(a.contains(&"file=/m/vm/disk0.raw,format=raw,if=none,id=rfs0".to_string()));
    assert!(a
        .iter()
        .any(|x| x.starts_with("driver=nbd,node-name=rfs5,")));
    // The configuration's text never reaches QEMU.
    assert!(!a.iter().any(|x| x.contains("sata")), "{a:?}");
    // More IDE disks than the machine has places: refused up front.
    let five = serde_json::json!({"disks": vec![serde_json::json!({"bus": "ide"}); 5]});
    let e = QemuSpec::from_config(&five, files(5)).err().unwrap();
    assert!(e.to_string().contains("5 disks on bus ide"), "{e}");
}

fn devices_of(spec: &QemuSpec) -> Vec<String> {
    let a = args_of(spec);
    a.windows(2)
        .filter(|w| w[0] == "-device")
        .map(|w| w[1].clone())
        .collect()
}

#[test]
fn scsi_disks_get_the_controller_model_their_backup_recorded() {
    let lsi = serde_json::json!({"bus": "scsi", "controller": "lsi53c895a"});
    let mut disks = vec![
        serde_json::json!({"bus": "scsi", "controller": "megasas"}),
        serde_json::json!({"bus": "virtio"}),
        // Before models were recorded: virtio-scsi, as always.
        serde_json::json!({"bus": "scsi"}),
        serde_json::json!({"bus": "scsi", "controller": "virtio-scsi-pci-non-transitional"}),
        // Unknown: virtio-scsi (with a warning); never on the command line.
        serde_json::json!({"bus": "scsi", "controller": "evil,id=x"}),
    ];
    // Nine disks on lsi53c895a: seven targets each (7 is the adapter's
    // own ID), so two controllers.
    disks.extend(std::iter::repeat_n(lsi, 9));
    let config = serde_json::json!({ "disks": disks });
    let spec = QemuSpec::from_config(&config, files(14)).unwrap();
    assert_eq!(
        spec.scsi[..5],
        [
            "megasas",
            VIRTIO_SCSI,
            VIRTIO_SCSI,
            VIRTIO_SCSI,
            VIRTIO_SCSI
        ]
    );
    let mut want: Vec<String> = [
        "virtio-blk-pci,drive=rfs1,bootindex=1",
        // The VM's own controllers, then rfs-scsi0 last: QEMU puts a
        // `device_add scsi-hd` without a bus (agent-backup's) on the newest.
        "megasas,id=rfs-scsi1",
        "lsi53c895a,id=rfs-scsi2",
        "lsi53c895a,id=rfs-scsi3",
        "virtio-scsi-pci,id=rfs-scsi0",
        "scsi-hd,drive=rfs0,bus=rfs-scsi1.0,bootindex=0",
        "scsi-hd,drive=rfs2,bus=rfs-scsi0.0,bootindex=2",
        "scsi-hd,drive=rfs3,bus=rfs-scsi0.0,bootindex=3",
        "scsi-hd,drive=rfs4,bus=rfs-scsi0.0,bootindex=4",
    ]
    .map(String::from)
    .to_vec();
    for i in 5..14 {
        let c = if i < 12 { 2 } else { 3 };
        want.push(format!(
            "scsi-hd,drive=rfs{i},bus=rfs-scsi{c}.0,bootindex={i}"
        ));
    }
    want.push("virtio-serial-pci,id=rfs-serial0".into());
    want.push(
        "virtserialport,bus=rfs-serial0.0,chardev=rfs-qga0,name=org.qemu.guest_agent.0".into(),
    );
    assert_eq!(devices_of(&spec), want);
    assert!(!args_of(&spec).iter().any(|x| x.contains("evil")));
}

#[test]
fn every_disk_gets_the_serial_its_backup_recorded_checked_and_quoted() {
    let config = serde_json::json!({"disks": [
        {"bus": "scsi", "controller": "lsi53c895a", "serial": "LSI,0"},
        {"bus": "virtio", "serial": "vd 1"},
        {"bus": "scsi", "serial": "vs2"},
        {"bus": "nvme", "serial": "nv3"},
        {"bus": "nvme"},
        {"bus": "ide", "serial": "ide5"},
        // Not passed on: not a string, not printable, too long, empty.
        {"bus": "ide", "serial": 7},
        {"bus": "virtio", "serial": "bad\u{1}serial,id=x"},
        {"bus": "virtio", "serial": "x".repeat(65)},
        {"bus": "virtio", "serial": ""},
        {"bus": "virtio"}]});
    let spec = QemuSpec::from_config(&config, files(11)).unwrap();
    assert_eq!(spec.serials[6..], [None, None, None, None, None]);
    assert_eq!(
        devices_of(&spec),
        [
            "virtio-blk-pci,drive=rfs1,bootindex=1,serial=vd 1",
            "nvme,drive=rfs3,serial=nv3,bootindex=3",
            // QEMU requires an NVMe disk's serial.
            "nvme,drive=rfs4,serial=rfs4,bootindex=4",
            "ide-hd,drive=rfs5,bus=ide.0,unit=0,bootindex=5,serial=ide5",
            "ide-hd,drive=rfs6,bus=ide.0,unit=1,bootindex=6",
            "virtio-blk-pci,drive=rfs7,bootindex=7",
            "virtio-blk-pci,drive=rfs8,bootindex=8",
            "virtio-blk-pci,drive=rfs9,bootindex=9",
            "virtio-blk-pci,drive=rfs10,bootindex=10",
            "lsi53c895a,id=rfs-scsi1",
            "virtio-scsi-pci,id=rfs-scsi0",
            "scsi-hd,drive=rfs0,bus=rfs-scsi1.0,bootindex=0,serial=LSI,,0",
            "scsi-hd,drive=rfs2,bus=rfs-scsi0.0,bootindex=2,serial=vs2",
            "virtio-serial-pci,id=rfs-serial0",
            "virtserialport,bus=rfs-serial0.0,chardev=rfs-qga0,name=org.qemu.guest_agent.0",
        ]
    );
    assert!(!args_of(&spec).iter().any(|x| x.contains("id=x")));
    // All virtio, one with a serial: devices, not `-drive if=virtio`,
    // which has no serial.
    let config =
        serde_json::json!({"disks": [{"bus": "virtio"}, {"bus": "virtio", "serial": "s1"}]});
    let spec = QemuSpec::from_config(&config, files(2)).unwrap();
    assert_eq!(
        devices_of(&spec)[..2],
        [
            "virtio-blk-pci,drive=rfs0,bootindex=0",
            "virtio-blk-pci,drive=rfs1,bootindex=1,serial=s1"
        ]
    );
}

#[test]
fn a_config_without_buses_or_all_virtio_boots_with_the_command_line_it_always_had() {
    for config in [
        serde_json::json!({}),
        serde_json::json!({"disks": [{"name": "disk0"}, {"name": "disk1"}]}),
        serde_json::json!({"disks": [{"bus": "virtio"}, {"bus": "virtio"}]}),
        // writer::default_config's, as `backup` records it.
        crate::repo::writer::default_config("vm", 2),
    ] {
        let spec = QemuSpec::from_config(&config, files(2)).unwrap();
        let a = args_of(&spec);
        let drives: Vec<&str> = a
            .windows(2)
            .filter(|w| w[0] == "-drive")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            drives,
            [
                "file=/m/vm/disk0.raw,format=raw,if=virtio",
                "file=/m/vm/disk1.raw,format=raw,if=virtio"
            ],
            "{config}"
        );
        assert!(!a.iter().any(|x| x.contains("bootindex")), "{a:?}");
    }
}

#[test]
fn nbd_urls_become_reconnecting_blockdevs() {
    let d = DiskSource::nbd("nbd://127.0.0.5:10809/vm/disk0").unwrap();
    let a = d.args(0).join(" ");
    assert!(
        a.contains("server.host=127.0.0.5,server.port=10809,export=vm/disk0,reconnect-delay="),
        "{a}"
    );
    let d = DiskSource::nbd("nbd+unix:///vm/disk1?socket=/run/a,b.sock").unwrap();
    assert!(d.args(1).join(" ").contains("server.path=/run/a,,b.sock"));
    assert!(DiskSource::nbd("nfs://x/y").is_err());
}

#[test]
fn an_nbd_url_without_a_port_means_the_default_port_10809_as_in_nbdinfo() {
    let tcp = |url: &str| match DiskSource::nbd(url).unwrap() {
        DiskSource::Nbd {
            server: NbdServer::Tcp { host, port },
            export,
        } => (host, port, export),
        d => panic!("{url}: {d:?}"),
    };
    let at = |h: &str, p: u16, e: &str| (h.to_string(), p, e.to_string());
    assert_eq!(
        tcp("nbd://127.0.0.11/app01/disk0"),
        at("127.0.0.11", 10809, "app01/disk0")
    );
    assert_eq!(
        tcp("nbd://[::1]/app01/disk0"),
        at("::1", 10809, "app01/disk0")
    );
    assert_eq!(
        tcp("nbd://[::1]:10900/a/disk0"),
        at("::1", 10900, "a/disk0")
    );
    assert_eq!(
        tcp("nbd://backup-host:10810/a/disk1"),
        at("backup-host", 10810, "a/disk1")
    );
    for bad in [
        "nbd://h:/a",
        "nbd://h:x/a",
        "nbd://[::1/a",
        "nbd://[::1]x/a",
        "nbd://h:1:2/a",
        "nbd:///a",
    ] {
        assert!(DiskSource::nbd(bad).is_err(), "{bad}");
    }
}

#[test]
fn memory_from_a_backup_config_is_bounded_before_qemu_sees_it() {
    let spec = |v: serde_json::Value| {
        QemuSpec::from_config(&serde_json::json!({ "memory_mib": v }), vec![])
    };
    assert_eq!(spec(serde_json::json!(1024)).unwrap().memory_mib, 1024);
    assert_eq!(
        QemuSpec::from_config(&serde_json::json!({}), vec![])
            .unwrap()
            .memory_mib,
        512
    );
    for bad in [
        serde_json::json!(1u64 << 40),
        serde_json::json!(0),
        serde_json::json!(-5),
        serde_json::json!("lots"),
        serde_json::json!(1.5),
    ] {
        let e = spec(bad.clone())
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(e.to_string().contains("memory_mib"), "{e}");
    }
}

/// A scratch directory in the temporary directory whose owner file names
/// a process that is gone (a run killed with `kill -9`), and one whose
/// owner is this process (a live run's).
pub(crate) fn dead_and_live_scratch(kind: &str) -> (PathBuf, PathBuf) {
    use crate::repo::locks::{this_process, Owner};
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let me = this_process();
    let dead = Owner {
        pid: dead_pid,
        ..me.clone()
    };
    let make = |owner: &Owner| {
        let d = tempfile::Builder::new()
            .prefix(&format!("recoverfs-{kind}-"))
            .tempdir()
            .unwrap()
            .keep();
        std::fs::write(d.join("nbd.sock"), b"x").unwrap();
        std::fs::write(d.join(SCRATCH_OWNER), serde_json::to_vec(owner).unwrap()).unwrap();
        d
    };
    (make(&dead), make(&me))
}

#[test]
fn a_boot_removes_the_scratch_directories_killed_runs_left() {
    let (dead, live) = dead_and_live_scratch("boot");
    let (dead_verify, live_verify) = dead_and_live_scratch("verify");
    let spec = QemuSpec {
        disks: vec![],
        buses: vec![],
        scsi: vec![],
        serials: vec![],
        memory_mib: 64,
        // QEMU refuses it: the boot ends at once.
        extra: vec!["-no-such-option".into()],
        qmp: None,
        qga: None,
        uuid: None,
    };
    let watch = Watch {
        marker: "never".into(),
        timeout: Duration::from_secs(30),
        settle: Duration::ZERO,
        heartbeat: false,
    };
    let r = boot(&spec, &watch, None, |_| {}, |_| None).unwrap();
    assert!(matches!(r.outcome, Outcome::Exited(_)), "{:?}", r.outcome);
    assert!(!dead.exists(), "{} stays", dead.display());
    assert!(!dead_verify.exists(), "{} stays", dead_verify.display());
    assert!(live.join("nbd.sock").exists());
    std::fs::remove_dir_all(&live).unwrap();
    std::fs::remove_dir_all(&live_verify).unwrap();
}
