//! A relocation reopened at a (re)start or by `relocate --resume`: a
//! target unreachable or held by another open, and which copied maps are
//! trusted and which forgotten (a write racing the reopen, a target
//! emptied, zeroed or resized since, stale bytes over a hole).

use super::*;

#[test]
fn an_unswitched_relocation_whose_target_is_unreachable_at_restart_leaves_the_vm_on_staging() {
    let rig = rig();
    let disks = rig.volumes();
    disks[0].write(5, b"mine").unwrap();
    disks[0].flush().unwrap();
    let r = rig.begin(&disks, None);
    drop((disks, r));
    // Primary storage not mounted (yet) when the daemon comes back.
    let primary = rig.dir.path().join("primary");
    std::fs::rename(&primary, rig.dir.path().join("primary.away")).unwrap();
    let (again, reloc) = rig.restart();
    assert!(
        reloc.is_none(),
        "the relocation cannot run without its target"
    );
    assert!(again.iter().all(|d| !d.is_switched()));
    assert_eq!(again[0].read(5, 4).unwrap(), b"mine", "the VM is served");
    // Recorded still: a daemon restarted once the target is back resumes it.
    std::fs::rename(rig.dir.path().join("primary.away"), &primary).unwrap();
    drop(again);
    let (_again, reloc) = rig.restart();
    assert!(reloc.is_some_and(|r| r.state() != State::Done));
}

#[test]
fn a_switched_relocation_whose_target_is_unreachable_at_restart_is_an_error() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    drop((disks, r));
    std::fs::rename(
        rig.dir.path().join("primary"),
        rig.dir.path().join("primary.away"),
    )
    .unwrap();
    let disks = rig.volumes();
    let e = Relocation::reopen(rig.source(&disks)).err().unwrap();
    assert!(e.to_string().contains("open relocation target"), "{e}");
}

#[test]
fn a_resumed_relocation_zeroes_holes_over_stale_target_bytes_before_marking_them_copied() {
    let rig = rig();
    let disks = rig.volumes();
    // Block 3 of each disk is zero in the backup and never written: a hole.
    assert!(disks[0].is_hole(3));
    // The relocation is recorded, its targets emptied; then, as after a
    // crash that took a staged write away but not its copy, the target
    // holds bytes over the hole.
    let meta = Meta::first_pass(rig.dir.path().join("primary/vm"));
    drop(Relocation::begin(rig.source(&disks), meta).unwrap());
    drop(disks);
    let t = rig.dir.path().join("primary/vm/disk0.raw");
    let f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5; 100], 3 * BS as u64 + 7).unwrap();
    drop(f);
    let (disks, r) = rig.restart();
    let r = r.unwrap();
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    assert!(disks[0].is_switched());
    // The target is the image, hole included.
    assert_eq!(std::fs::read(&t).unwrap(), rig.images[0]);
    assert_eq!(disks[0].read(0, BLOCKS * BS).unwrap(), rig.images[0]);
}

/// `relocate --resume` reopens a relocation in a running daemon: a guest
/// write that lands while the copied maps are read and installed must not
/// leave its block trusted as copied (the cutover would commit a target
/// without it).
#[test]
fn a_guest_write_racing_a_reopen_in_a_running_daemon_is_never_trusted_as_copied() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    r.resume_pass_unthrottled().unwrap();
    assert!(r.copied_map(0).test(5), "block 5 copied, from the backup");
    r.stop();
    drop(r);
    // As a restart that could not reopen it leaves the disks: not tracking.
    for d in &disks {
        d.untrack_copies();
    }
    let writer = disks[0].clone();
    crate::relocate::test_hooks::set_before_tracking(
        &rig.session_dir,
        Arc::new(move || {
            writer
                .write(5 * BS as u64, b"written during the reopen")
                .unwrap();
            writer.flush().unwrap();
        }),
    );
    let r = Relocation::reopen(rig.source(&disks))
        .unwrap()
        .expect("reopened");
    assert_eq!(
        disks[0].read(5 * BS as u64, 25).unwrap(),
        b"written during the reopen"
    );
    assert!(
        !r.copied_map(0).test(5),
        "a block the guest wrote during the reopen is trusted as copied"
    );
    // And the copy that follows puts the write on the target.
    r.resume_pass_unthrottled().unwrap();
    let t = std::fs::read(rig.dir.path().join("primary/vm/disk0.raw")).unwrap();
    assert_eq!(&t[5 * BS..5 * BS + 25], b"written during the reopen");
}

/// Copies every block of both disks of a relocation begun in `rig` (no
/// cutover) and stops, as a daemon killed before converging would.
fn copy_all_then_crash(rig: &Rig) {
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    r.resume_pass_unthrottled().unwrap();
    assert_eq!(r.copied_map(0).bits().count(), BLOCKS as u64);
    drop((r, disks));
}

/// Copied blocks in disk `i`'s map file, as a restarted daemon reads it.
fn copied_on_disk(rig: &Rig, i: usize) -> u64 {
    let m = PersistentBitmap::open(
        &OsStorage,
        &rig.session_dir.join(format!("disk{i}.copied")),
        MapKind::Copied,
        BS as u32,
        BLOCKS as u64,
    )
    .unwrap();
    m.bits().count()
}

/// Restarts `rig`, expects disk 0's copied map forgotten (durably) and
/// disk 1's kept, then lets the relocation finish: every target is the
/// image.
fn assert_disk0_copied_again(rig: &Rig) {
    let (disks, r) = rig.restart();
    let r = r.expect("resumed");
    assert_eq!(r.copied_map(0).bits().count(), 0, "disk0's copies trusted");
    assert_eq!(copied_on_disk(rig, 0), 0, "the forgotten map is durable");
    assert_eq!(r.copied_map(1).bits().count(), BLOCKS as u64);
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    for (i, d) in disks.iter().enumerate() {
        assert!(rig.target_bytes(i) == rig.images[i], "disk{i}");
        assert!(d.read(0, BLOCKS * BS).unwrap() == rig.images[i]);
    }
}

#[test]
fn a_resumed_relocation_trusts_copies_over_a_target_whose_only_holes_are_backup_holes() {
    let rig = rig();
    let disks = rig.volumes();
    // A zero block the guest wrote is a hole on the target too.
    disks[0].write_zeroes(9 * BS as u64, BS as u64).unwrap();
    disks[0].flush().unwrap();
    drop(disks);
    copy_all_then_crash(&rig);
    let (_disks, r) = rig.restart();
    let r = r.unwrap();
    // Block 3 (a backup hole) is a hole in the target: still trusted; the
    // guest's block 9 is forgotten by the restart rule only.
    assert_eq!(r.copied_map(0).bits().count(), BLOCKS as u64 - 1);
    assert!(r.copied_map(0).test(3));
    assert_eq!(r.copied_map(1).bits().count(), BLOCKS as u64);
}

#[test]
fn a_resumed_relocation_whose_target_file_was_emptied_to_holes_copies_that_disk_again() {
    let rig = rig();
    copy_all_then_crash(&rig);
    // As a tmpfs remounted and the file made again with `truncate -s`: the
    // same name, inode and length, all holes.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rig.dir.path().join("primary/vm/disk0.raw"))
        .unwrap();
    f.set_len(0).unwrap();
    f.set_len((BLOCKS * BS) as u64).unwrap();
    drop(f);
    assert_disk0_copied_again(&rig);
}

#[test]
fn a_resumed_relocation_whose_target_file_was_zeroed_in_place_without_holes_copies_that_disk_again()
{
    let rig = rig();
    copy_all_then_crash(&rig);
    // As a NAS snapshot rolled back, or a filesystem that reports no
    // holes (NFSv3): the same file and length, zeros written, no hole.
    std::fs::write(
        rig.dir.path().join("primary/vm/disk0.raw"),
        vec![0u8; BLOCKS * BS],
    )
    .unwrap();
    assert_disk0_copied_again(&rig);
}

#[test]
fn a_resumed_relocation_whose_target_file_has_another_length_copies_that_disk_again() {
    let rig = rig();
    copy_all_then_crash(&rig);
    // `touch`ed in place of the lost file: size 0.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rig.dir.path().join("primary/vm/disk0.raw"))
        .unwrap();
    f.set_len(0).unwrap();
    drop(f);
    assert_disk0_copied_again(&rig);
}

#[test]
fn a_switched_relocation_whose_target_file_has_another_length_is_not_served() {
    let rig = rig();
    cut_over_with_mine(&rig, 0);
    let t = rig.dir.path().join("primary/vm/disk1.raw");
    let f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
    f.set_len((BLOCKS * BS / 2) as u64).unwrap();
    drop(f);
    let disks = rig.volumes();
    let e = Relocation::reopen(rig.source(&disks)).err().unwrap();
    assert!(e.to_string().contains("disk1.raw"), "{e}");
    assert!(e.to_string().contains("not served"), "{e}");
    assert_eq!(
        std::fs::metadata(&t).unwrap().len(),
        (BLOCKS * BS / 2) as u64,
        "resized"
    );
}

/// Shared locks alone would let two relocations (two daemons, one down
/// while the other took the files) both write one target: a reopen before
/// the cutover must be the only holder.
#[test]
fn a_reopen_of_a_relocation_whose_target_another_open_holds_is_not_resumed() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    r.stop();
    drop(r);
    let t = rig.dir.path().join("primary/vm/disk1.raw");
    let other = OsStorage.open(&t, Open::Existing).unwrap();
    assert!(other.try_lock(false).unwrap());
    let (_disks, reloc) = rig.restart();
    assert!(
        reloc.is_none(),
        "resumed beside another holder of its target"
    );
    drop(other);
    let (_disks, reloc) = rig.restart();
    assert!(reloc.is_some(), "not resumed once the file was let go");
}
