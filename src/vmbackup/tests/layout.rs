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
