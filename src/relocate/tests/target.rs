//! Recognising a relocation's target directory and files again (a
//! restart, the cutover): a symbolic link or another directory in its
//! place, a file replaced or hard-linked, another device number after a
//! reboot, and what changes where only root may change the path.

use super::*;

#[test]
fn a_restarted_relocation_does_not_open_targets_through_a_symlinked_target_dir() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    drop((disks, r));
    let (victim, bytes) = swap_target_for_a_link(&rig);
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "not resumed through the link");
    assert!(again.iter().all(|d| !d.is_switched()));
    for i in 0..2 {
        assert_eq!(
            std::fs::read(victim.join(format!("disk{i}.raw"))).unwrap(),
            bytes
        );
    }
    // Nor into another real directory put in its place.
    drop(again);
    let primary = rig.dir.path().join("primary");
    std::fs::remove_file(primary.join("vm")).unwrap();
    std::fs::rename(&victim, primary.join("vm")).unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "not resumed in another directory");
    drop(again);
    for i in 0..2 {
        assert_eq!(
            std::fs::read(primary.join(format!("vm/disk{i}.raw"))).unwrap(),
            bytes
        );
    }
    // Its own directory back: resumed.
    std::fs::rename(primary.join("vm"), &victim).unwrap();
    std::fs::rename(primary.join("aside"), primary.join("vm")).unwrap();
    assert!(rig.restart().1.is_some());
}

#[test]
fn a_relocation_recorded_without_the_target_identity_takes_it_at_restart_and_then_refuses_another_dir(
) {
    let rig = rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    // As an older version recorded it: no identity.
    let record = rig.session_dir.join("relocation.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert!(v.as_object_mut().unwrap().remove("target_id").is_some());
    std::fs::write(&record, serde_json::to_vec(&v).unwrap()).unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_some(), "an old record is resumed");
    drop((again, reloc));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert!(v["target_id"]["ino"].is_u64(), "recorded: {v}");
    // Another directory in its place from now on: not resumed.
    let primary = rig.dir.path().join("primary");
    std::fs::rename(primary.join("vm"), primary.join("aside")).unwrap();
    std::fs::create_dir(primary.join("vm")).unwrap();
    for i in 0..2 {
        std::fs::write(primary.join(format!("vm/disk{i}.raw")), b"keep").unwrap();
    }
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "not resumed in another directory");
    drop(again);
    assert_eq!(
        std::fs::read(primary.join("vm/disk0.raw")).unwrap(),
        b"keep"
    );
}

#[test]
fn a_restarted_relocation_never_writes_a_target_file_replaced_by_a_hard_link() {
    let rig = rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    // Someone who may write the target directory puts a link to another
    // file in place of a target (fs.protected_hardlinks=0 lets them link
    // any file).
    let precious = rig.dir.path().join("precious");
    std::fs::write(&precious, b"not the relocation's to write").unwrap();
    let t = rig.dir.path().join("primary/vm/disk1.raw");
    std::fs::remove_file(&t).unwrap();
    std::fs::hard_link(&precious, &t).unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "not resumed into a linked file");
    drop(again);
    assert_eq!(
        std::fs::read(&precious).unwrap(),
        b"not the relocation's to write"
    );
}

#[test]
fn a_relocation_whose_target_dir_was_replaced_by_a_symlink_fails_before_the_cutover() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    let (victim, bytes) = swap_target_for_a_link(&rig);
    r.spawn();
    assert_eq!(settle(&r), State::Failed, "{:?}", r.status());
    assert!(disks.iter().all(|d| !d.is_switched()));
    let e = r.status().error.unwrap_or_default();
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!victim.join("vm.json").exists());
    assert_eq!(std::fs::read(victim.join("disk0.raw")).unwrap(), bytes);
}

#[test]
fn a_relocation_whose_target_file_was_replaced_fails_before_the_cutover() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    // The daemon keeps writing the file it opened, moved aside; another
    // file now has its name, which a restart would open as the VM's disk.
    let vm = rig.dir.path().join("primary/vm");
    std::fs::rename(vm.join("disk1.raw"), vm.join("aside")).unwrap();
    std::fs::write(vm.join("disk1.raw"), b"theirs").unwrap();
    r.spawn();
    assert_eq!(settle(&r), State::Failed, "{:?}", r.status());
    assert!(disks.iter().all(|d| !d.is_switched()));
    let e = r.status().error.unwrap_or_default();
    assert!(e.contains("disk1.raw") && e.contains("replaced"), "{e}");
    assert!(!vm.join("vm.json").exists());
    assert_eq!(std::fs::read(vm.join("disk1.raw")).unwrap(), b"theirs");
}

fn read_record(rig: &Rig) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(rig.session_dir.join("relocation.json")).unwrap())
        .unwrap()
}

/// A restart serves the VM from its target, "mine" at 5 of disk `disk`.
fn assert_served_from_target_with_mine(rig: &Rig, disk: usize) {
    let (again, reloc) = rig.restart();
    assert_eq!(reloc.expect("served").state(), State::Done);
    assert!(again.iter().all(|d| d.is_switched()));
    assert_eq!(again[disk].read(5, 4).unwrap(), b"mine");
}

/// As a reboot may leave it: the target's device number another (NFS,
/// btrfs, ZFS, overlayfs, dm-N), recorded in another boot.
fn as_if_rebooted(v: &mut serde_json::Value) {
    let dev = v["target_id"]["dev"].as_u64().unwrap();
    v["target_id"]["dev"] = (dev ^ 0x5a5a).into();
    v["target_id"]["boot"] = "another-boot".into();
}

#[test]
fn a_relocation_whose_target_device_number_changed_on_a_path_only_root_can_change_resumes_and_is_recorded_again(
) {
    let rig = root_only_rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    let before = read_record(&rig);
    edit_record(&rig, as_if_rebooted);
    let (again, reloc) = rig.restart();
    let r = reloc.expect("resumed with the same inode and owner");
    assert_ne!(r.state(), State::Done);
    drop((again, r));
    // Recorded again for this boot, so the next check is strict.
    let v = read_record(&rig);
    assert_eq!(v["target_id"], before["target_id"], "{v}");
    assert_eq!(v["target_id"]["boot"], OsStorage.boot_id().as_str());
}

#[test]
fn a_switched_relocation_whose_target_device_number_changed_on_a_path_only_root_can_change_is_served_from_it(
) {
    let rig = root_only_rig();
    cut_over_with_mine(&rig, 0);
    edit_record(&rig, as_if_rebooted);
    assert_served_from_target_with_mine(&rig, 0);
}

#[test]
fn a_target_device_number_changed_where_others_may_write_is_refused_and_says_what_to_do() {
    // Under the world-writable /tmp: a caller's btrfs snapshot of a
    // subvolume of theirs has the same inodes, owners and filesystem type
    // on another device, so another device is never accepted there, even
    // after a reboot.
    let rig = rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    edit_record(&rig, as_if_rebooted);
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed in another directory");
    drop(again);
    // Switched: the session does not start, and the error is a state,
    // not a bad request, and says what the administrator can do.
    edit_record(&rig, |v| v["switched"] = true.into());
    let disks = rig.volumes();
    let e = Relocation::reopen(rig.source(&disks)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("release vm --discard"), "{e}");
    assert!(disks.iter().all(|d| !d.is_switched()));
}

#[test]
fn after_a_reboot_a_directory_put_in_the_targets_place_or_owned_by_another_is_refused() {
    let rig = root_only_rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    edit_record(&rig, as_if_rebooted);
    // Same owner (the caller's), another inode.
    let primary = rig.dir.path().join("primary");
    std::fs::rename(primary.join("vm"), primary.join("aside")).unwrap();
    std::fs::create_dir(primary.join("vm")).unwrap();
    for i in 0..2 {
        std::fs::write(primary.join(format!("vm/disk{i}.raw")), b"keep").unwrap();
    }
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed in another directory");
    drop(again);
    assert_eq!(
        std::fs::read(primary.join("vm/disk0.raw")).unwrap(),
        b"keep"
    );
    // The same inode, but recorded with another owner.
    std::fs::remove_dir_all(primary.join("vm")).unwrap();
    std::fs::rename(primary.join("aside"), primary.join("vm")).unwrap();
    edit_record(&rig, |v| {
        let uid = v["target_id"]["uid"].as_u64().unwrap();
        v["target_id"]["uid"] = (uid + 1).into();
    });
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed in a directory of another owner");
    drop(again);
    // The same inode and owner on another type of filesystem (a FUSE one
    // a caller mounted there reports any inode and owner it likes).
    edit_record(&rig, |v| {
        let uid = v["target_id"]["uid"].as_u64().unwrap();
        v["target_id"]["uid"] = (uid - 1).into();
        let fs = v["target_id"]["fs_type"].as_u64().unwrap();
        v["target_id"]["fs_type"] = (fs ^ 1).into();
    });
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed on another type of filesystem");
    drop(again);
    // All as recorded but the device, on a path others may write now.
    edit_record(&rig, |v| {
        let fs = v["target_id"]["fs_type"].as_u64().unwrap();
        v["target_id"]["fs_type"] = (fs ^ 1).into();
    });
    use std::os::unix::fs::PermissionsExt;
    let loose = std::fs::Permissions::from_mode(0o777);
    std::fs::set_permissions(&primary, loose).unwrap();
    let (again, reloc) = rig.restart();
    assert!(reloc.is_none(), "resumed where others may write");
    drop(again);
    // All as recorded but the device, where only root writes: resumed.
    std::fs::set_permissions(&primary, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(rig.restart().1.is_some());
}

#[test]
fn a_target_file_replaced_where_others_may_write_is_never_served_after_cutover() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    drop((disks, r));
    // The owner of a directory under /tmp moves the live disk aside and
    // puts a file of their own, with one link, under its name.
    let vm = rig.dir.path().join("primary/vm");
    std::fs::rename(vm.join("disk0.raw"), vm.join("aside")).unwrap();
    std::fs::write(vm.join("disk0.raw"), vec![0u8; BLOCKS * BS]).unwrap();
    let disks = rig.volumes();
    let e = Relocation::reopen(rig.source(&disks))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("replaced"), "{e}");
    assert!(disks.iter().all(|d| !d.is_switched()));
}

#[test]
fn a_target_file_replaced_where_only_root_writes_is_served_as_roots_choice() {
    let rig = root_only_rig();
    cut_over_with_mine(&rig, 1);
    // An administrator restores disk0 from a copy (a new inode).
    let vm = rig.dir.path().join("primary/vm");
    std::fs::copy(vm.join("disk0.raw"), vm.join("copy")).unwrap();
    std::fs::rename(vm.join("copy"), vm.join("disk0.raw")).unwrap();
    assert_served_from_target_with_mine(&rig, 1);
}

#[test]
fn a_switched_target_file_with_another_name_elsewhere_is_still_served() {
    let rig = rig();
    cut_over_with_mine(&rig, 1);
    // An administrator's `cp -al` snapshot of the primary directory.
    let snap = rig.dir.path().join("snapshot");
    std::fs::create_dir(&snap).unwrap();
    for i in 0..2 {
        let f = format!("disk{i}.raw");
        std::fs::hard_link(rig.dir.path().join("primary/vm").join(&f), snap.join(&f)).unwrap();
    }
    assert_served_from_target_with_mine(&rig, 1);
}
