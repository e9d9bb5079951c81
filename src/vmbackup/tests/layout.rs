//! What a backup records of a VM's layout: its disks only (not a CD-ROM's
//! or floppy's medium, not a drive without a guest device, each a warning
//! naming it), its memory and vCPUs as QEMU reports them, and its QMP
//! socket as an absolute path.

use super::*;

/// The one manifest of `vm` in `repo`.
fn only_manifest(repo: &Repository, vm: &str) -> crate::repo::manifest::Manifest {
    let ids = repo.backup_ids(vm).unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    repo.resolve(vm, Some(&ids[0])).unwrap()
}

#[test]
fn cdroms_are_skipped_with_a_warning_and_the_data_disk_stays_disk0() {
    let data = content();
    let d = tempfile::tempdir().unwrap();
    let iso = d.path().join("cd.iso");
    std::fs::write(&iso, vec![7u8; 3 * MIB]).unwrap();
    // One CD-ROM with a disc from the command line (ide0-cd0), one empty
    // (ide1-cd0) that gets its disc over QMP.
    let cd = format!(
        "if=ide,media=cdrom,index=1,format=raw,file={}",
        iso.display()
    );
    let v = vm_with_args(
        Some(&data),
        &["-drive", &cd, "-drive", "if=ide,media=cdrom,index=2"],
    );
    v.monitor()
        .execute(
            "blockdev-change-medium",
            Some(json!({"device": "ide1-cd0", "filename": iso, "format": "raw"})),
        )
        .unwrap();
    let (_r, repo) = repo();
    let s = backup_vms(&repo, &options(&[("cd", &v)], 1, None)).unwrap();
    let r = report(&s, "cd");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.disks, 1, "{r:?}");
    for drive in ["ide0-cd1", "ide1-cd0"] {
        assert!(
            r.warnings
                .iter()
                .any(|w| w.starts_with(&format!("drive {drive} (ide-cd "))
                    && w.contains("removable medium")
                    && w.contains("cd.iso")
                    && w.ends_with("not backed up")),
            "{drive}: {:?}",
            r.warnings
        );
    }
    let m = only_manifest(&repo, "cd");
    assert_eq!(m.disks.len(), 1);
    assert_eq!(m.config["disks"].as_array().unwrap().len(), 1);
    assert_eq!(m.config["disks"][0]["name"], "disk0");
    assert_eq!(
        m.config["backup_vms"]["devices"].as_array().unwrap().len(),
        1
    );
    assert!(restored(&repo, "cd", &m.id) == data);
}

#[test]
fn a_drive_without_a_guest_device_is_skipped_with_a_warning_and_the_vm_is_backed_up() {
    let data = content();
    let d = tempfile::tempdir().unwrap();
    let x = d.path().join("x.raw");
    std::fs::write(&x, vec![9u8; MIB]).unwrap();
    let nodev = format!("file={},format=raw,if=none,id=nodev", x.display());
    let v = vm_with_args(Some(&data), &["-drive", &nodev]);
    let (_r, repo) = repo();
    let s = backup_vms(&repo, &options(&[("nd", &v)], 1, None)).unwrap();
    let r = report(&s, "nd");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.disks, 1);
    let w = format!(
        "drive nodev ({}) has no guest device: not backed up",
        x.display()
    );
    assert!(r.warnings.contains(&w), "{:?}", r.warnings);
    let m = only_manifest(&repo, "nd");
    assert!(restored(&repo, "nd", &m.id) == data);
}

#[test]
fn the_manifest_records_the_vms_memory_and_vcpus() {
    let v = vm_with_args(Some(&content()), &["-m", "96", "-smp", "3"]);
    let (_r, repo) = repo();
    let s = backup_vms(&repo, &options(&[("sized", &v)], 1, None)).unwrap();
    assert!(s.vms[0].error.is_none(), "{:?}", s.vms[0].error);
    let m = only_manifest(&repo, "sized");
    assert_eq!(m.config["memory_mib"], 96, "{}", m.config);
    assert_eq!(m.config["vcpus"], 3, "{}", m.config);
    // What `recoverfs boot` gives the recovered VM.
    let spec = crate::boot::QemuSpec::from_config(&m.config, vec![]).unwrap();
    assert_eq!(spec.memory_mib, 96);
}

#[test]
fn the_manifest_records_the_qmp_socket_absolute() {
    let v = vm(Some(&content()));
    // The socket named relative to the working directory (not changed:
    // tests share it), as an operator may give it.
    let cwd = std::env::current_dir().unwrap();
    let mut rel = PathBuf::new();
    for _ in cwd.components().skip(1) {
        rel.push("..");
    }
    rel.push(v.qmp.strip_prefix("/").unwrap());
    assert!(rel.is_relative());
    let (_r, repo) = repo();
    let mut o = options(&[("rel", &v)], 1, None);
    o.vms[0].qmp = rel;
    let s = backup_vms(&repo, &o).unwrap();
    assert!(s.vms[0].error.is_none(), "{:?}", s.vms[0].error);
    let m = only_manifest(&repo, "rel");
    let recorded = PathBuf::from(m.config["backup_vms"]["qmp"].as_str().unwrap());
    assert_eq!(recorded, std::fs::canonicalize(&v.qmp).unwrap());
}

#[test]
fn backup_vms_help_does_not_say_full_backups_only() {
    use clap::CommandFactory;
    let mut cli = crate::cli::Cli::command();
    let help = cli
        .find_subcommand_mut("backup-vms")
        .unwrap()
        .render_help()
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(!help.contains("(full backups)"), "{help}");
    assert!(help.contains("--incremental what changed"), "{help}");
}

/// Each disk's bus is recorded from its guest device (a disk on a USB
/// stick, which `recoverfs boot` cannot attach alike, as virtio with a
/// warning), and `recoverfs boot` attaches each disk of the recovered VM
/// on the bus recorded: a next backup of it records the same buses.
#[test]
fn each_disks_bus_is_recorded_and_a_recovered_vm_gets_its_disks_on_the_same_buses() {
    let d = tempfile::tempdir().unwrap();
    let image = |n: &str| {
        let p = d.path().join(n);
        std::fs::write(&p, vec![0u8; MIB]).unwrap();
        p
    };
    let drive =
        |n: &str, id: &str| format!("file={},format=raw,if=none,id={id}", image(n).display());
    let (d1, d2, d3, d4, d5, d6) = (
        drive("ide.raw", "d1"),
        drive("scsi.raw", "d2"),
        drive("nvme.raw", "d3"),
        drive("usb.raw", "d4"),
        drive("ide2.raw", "d5"),
        drive("ide3.raw", "d6"),
    );
    #[rustfmt::skip]
    let v = vm_with_args(Some(&content()), &[
        "-drive", &d1, "-device", "ide-hd,drive=d1,bus=ide.1,unit=1",
        "-device", "virtio-scsi-pci,id=vs", "-drive", &d2, "-device", "scsi-hd,drive=d2,bus=vs.0",
        "-drive", &d3, "-device", "nvme,drive=d3,serial=n3",
        "-device", "qemu-xhci", "-drive", &d4, "-device", "usb-storage,drive=d4",
        // Three IDE disks: more than QEMU places without bus and unit.
        "-drive", &d5, "-device", "ide-hd,drive=d5,bus=ide.0,unit=0",
        "-drive", &d6, "-device", "ide-hd,drive=d6,bus=ide.0,unit=1",
    ]);
    let (_r, repo) = repo();
    let s = backup_vms(&repo, &options(&[("buses", &v)], 1, None)).unwrap();
    let r = report(&s, "buses");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.disks, 7, "{r:?}");
    let usb: Vec<&String> = r.warnings.iter().filter(|w| w.contains("bus")).collect();
    assert_eq!(usb.len(), 1, "{:?}", r.warnings);
    assert!(
        usb[0].starts_with("disk 4 (a usb-storage device, /machine/")
            && usb[0].ends_with(
                "is recorded on bus virtio: recoverfs boot attaches virtio, scsi, ide and nvme disks only"
            ),
        "{usb:?}"
    );
    let m = only_manifest(&repo, "buses");
    let buses: Vec<&str> = (m.config["disks"].as_array().unwrap().iter())
        .map(|d| d["bus"].as_str().unwrap())
        .collect();
    assert_eq!(
        buses,
        ["virtio", "ide", "scsi", "nvme", "virtio", "ide", "ide"]
    );

    // Booted from the backup (paused: the command line is what counts).
    let copies: Vec<_> = (0..7)
        .map(|i| crate::boot::DiskSource::File(image(&format!("r{i}.raw"))))
        .collect();
    let mut spec = crate::boot::QemuSpec::from_config(&m.config, copies).unwrap();
    let qmp = d.path().join("booted.qmp");
    spec.qmp = Some(qmp.clone());
    let mut cmd = spec.command(&d.path().join("qga.sock"));
    cmd.arg("-S");
    let mut booted = Proc::spawn(&mut cmd);
    booted.wait_for(&qmp);
    let disks = Qmp::connect(&qmp).unwrap().block_devices().unwrap();
    let again: Vec<Option<&str>> = disks.iter().map(|d| d.bus()).collect();
    assert_eq!(
        again,
        [
            Some("virtio"),
            Some("ide"),
            Some("scsi"),
            Some("nvme"),
            Some("virtio"),
            Some("ide"),
            Some("ide")
        ],
        "{disks:?}"
    );
}

/// A SCSI disk's controller model and every disk's serial are recorded
/// (the guest's drivers and `/dev/disk/by-id` names depend on them), and
/// `recoverfs boot` gives the recovered VM the same: its next backup
/// records the same controllers and serials. The agent container's
/// `device_add scsi-hd` (no bus) still lands on `rfs-scsi0`.
#[test]
fn scsi_controller_models_and_serials_are_recorded_and_a_recovered_vm_gets_them() {
    let d = tempfile::tempdir().unwrap();
    let image = |n: &str| {
        let p = d.path().join(n);
        std::fs::write(&p, vec![0u8; MIB]).unwrap();
        p
    };
    let drive =
        |n: &str, id: &str| format!("file={},format=raw,if=none,id={id}", image(n).display());
    let (d1, d2, d3, d4) = (
        drive("lsi.raw", "d1"),
        drive("mr.raw", "d2"),
        drive("vs.raw", "d3"),
        drive("vd.raw", "d4"),
    );
    #[rustfmt::skip]
    let v = vm_with_args(Some(&content()), &[
        "-device", "lsi53c895a,id=lsi", "-drive", &d1,
        "-device", "scsi-hd,drive=d1,bus=lsi.0,serial=LSI-SER,,1",
        "-device", "megasas,id=mr", "-drive", &d2, "-device", "scsi-hd,drive=d2,bus=mr.0,serial=mr-2",
        "-device", "virtio-scsi-pci,id=vs", "-drive", &d3, "-device", "scsi-hd,drive=d3,bus=vs.0",
        "-drive", &d4, "-device", "virtio-blk-pci,drive=d4,serial=vblk-4",
    ]);
    let (_r, repo) = repo();
    let s = backup_vms(&repo, &options(&[("hba", &v)], 1, None)).unwrap();
    let r = report(&s, "hba");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let m = only_manifest(&repo, "hba");
    let field = |k: &str| -> Vec<Option<String>> {
        (m.config["disks"].as_array().unwrap().iter())
            .map(|d| d.get(k).and_then(|v| v.as_str()).map(str::to_string))
            .collect()
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        field("bus"),
        [
            some("virtio"),
            some("scsi"),
            some("scsi"),
            some("scsi"),
            some("virtio")
        ]
    );
    assert_eq!(
        field("controller"),
        [
            None,
            some("lsi53c895a"),
            some("megasas"),
            some("virtio-scsi-pci"),
            None
        ],
        "{}",
        m.config
    );
    assert_eq!(
        field("serial"),
        [None, some("LSI-SER,1"), some("mr-2"), None, some("vblk-4")],
        "{}",
        m.config
    );

    // Booted from the backup (paused: the devices are what counts).
    let copies: Vec<_> = (0..5)
        .map(|i| crate::boot::DiskSource::File(image(&format!("r{i}.raw"))))
        .collect();
    let mut spec = crate::boot::QemuSpec::from_config(&m.config, copies).unwrap();
    let qmp = d.path().join("booted.qmp");
    spec.qmp = Some(qmp.clone());
    let mut cmd = spec.command(&d.path().join("qga.sock"));
    cmd.arg("-S");
    let mut booted = Proc::spawn(&mut cmd);
    booted.wait_for(&qmp);
    let mut q = Qmp::connect(&qmp).unwrap();
    let disks = q.block_devices().unwrap();
    let again: Vec<(Option<&str>, &str, &str)> = (disks.iter())
        .map(|d| (d.bus(), d.controller.as_str(), d.serial.as_str()))
        .collect();
    assert_eq!(
        again,
        [
            (Some("virtio"), "", ""),
            (Some("scsi"), "lsi53c895a", "LSI-SER,1"),
            (Some("scsi"), "megasas", "mr-2"),
            (Some("scsi"), "virtio-scsi-pci", ""),
            (Some("virtio"), "", "vblk-4"),
        ],
        "{disks:?}"
    );
    // What `agent-backup` attaches goes on the VM's virtio-scsi.
    let img = image("agent.raw");
    q.execute(
        "blockdev-add",
        Some(
            json!({"driver": "raw", "node-name": "ag", "read-only": true,
                    "file": {"driver": "file", "filename": img, "read-only": true}}),
        ),
    )
    .unwrap();
    q.execute(
        "device_add",
        Some(json!({"driver": "scsi-hd", "id": "agent", "drive": "ag"})),
    )
    .unwrap();
    let bus = q
        .execute(
            "qom-get",
            Some(json!({"path": "agent", "property": "parent_bus"})),
        )
        .unwrap();
    assert!(bus.as_str().unwrap().ends_with("/rfs-scsi0.0"), "{bus}");
}
