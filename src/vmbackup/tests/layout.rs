//! What a backup records of a VM's layout: its disks only (not a drive
//! without a guest device, a warning naming it).

use super::*;

/// The one manifest of `vm` in `repo`.
fn only_manifest(repo: &Repository, vm: &str) -> crate::repo::manifest::Manifest {
    let ids = repo.backup_ids(vm).unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    repo.resolve(vm, Some(&ids[0])).unwrap()
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
