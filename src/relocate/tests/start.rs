//! Starting a relocation: what its target must be before anything is
//! emptied (no hard link, no lock another open holds, no complete copy
//! with a `vm.json`, not in a staging directory, the recoverfs mounts
//! over it found), and a start that fails leaves no disk tracking copies.

use super::*;
use crate::relocate::open::recoverfs_mount_over;
use crate::staging::io::fault::{Op, Rule};

#[test]
fn a_relocation_whose_record_cannot_be_written_leaves_no_disk_tracking_copies() {
    let rig = rig();
    let disks = rig.volumes();
    for d in &disks {
        d.read(0, BLOCKS * BS).unwrap();
        // Fully staged: a direct (passthrough) reader may read staging.
        assert!(d.begin_direct_read().is_some());
        d.end_direct_read();
    }
    rig.faults
        .inject(Rule::fail(Op::Rename, "relocation.json", libc::ENOSPC).times(1));
    let meta = Meta::first_pass(rig.dir.path().join("primary/vm"));
    let e = Relocation::begin(rig.source(&disks), meta).err().unwrap();
    assert_eq!(rig.faults.injected(), 1, "{e}");
    // No relocation started: nothing may hold the disks to one (eviction
    // waits for copied bits, passthrough is refused, as while copying).
    for d in &disks {
        assert!(
            d.begin_direct_read().is_some(),
            "disk{} still tracks the copies of a relocation that never started",
            d.index
        );
        d.end_direct_read();
    }
}

#[test]
fn a_force_relocation_never_empties_a_hard_linked_target_file() {
    let rig = rig();
    let disks = rig.volumes();
    // Someone else's file, linked into the target as if left over there.
    let precious = rig.dir.path().join("precious");
    std::fs::write(&precious, b"not the relocation's to empty").unwrap();
    std::fs::hard_link(&precious, rig.dir.path().join("primary/vm/disk1.raw")).unwrap();
    let meta = Meta::first_pass(rig.dir.path().join("primary/vm"));
    let e = Relocation::begin(rig.source(&disks), meta).err().unwrap();
    assert!(e.to_string().contains("disk1.raw"), "{e}");
    assert!(e.to_string().contains("link"), "{e}");
    assert_eq!(
        std::fs::read(&precious).unwrap(),
        b"not the relocation's to empty"
    );
    assert!(disks.iter().all(|d| !d.is_switched()));
}

#[test]
fn a_force_relocation_refusing_one_target_file_empties_none() {
    let rig = rig();
    let disks = rig.volumes();
    let primary = rig.dir.path().join("primary/vm");
    std::fs::write(primary.join("disk0.raw"), b"an old copy, kept on refusal").unwrap();
    let precious = rig.dir.path().join("precious");
    std::fs::write(&precious, b"not the relocation's to empty").unwrap();
    std::fs::hard_link(&precious, primary.join("disk1.raw")).unwrap();
    let meta = Meta::first_pass(primary.clone());
    let e = Relocation::begin(rig.source(&disks), meta).err().unwrap();
    assert!(e.to_string().contains("disk1.raw"), "{e}");
    assert!(
        std::fs::read(primary.join("disk0.raw")).unwrap() == b"an old copy, kept on refusal",
        "disk0.raw was emptied"
    );
    assert!(
        !rig.session_dir.join("disk0.copied").exists(),
        "a copied map without a record"
    );
}

#[test]
fn a_force_relocation_never_empties_a_target_another_relocation_serves_from() {
    // Daemon A relocated its VM to P/vm and serves it from there.
    let a = rig();
    cut_over_with_mine(&a, 0);
    let (a_disks, a_reloc) = a.restart();
    let live = a.dir.path().join("primary/vm");
    let before = std::fs::read(live.join("disk0.raw")).unwrap();
    // Daemon B (its own staging) relocates a VM of the same name there.
    let b = rig();
    let b_disks = b.volumes();
    let meta = Meta::first_pass(live.clone());
    let e = Relocation::begin(b.source(&b_disks), meta).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("in use by another recoverfs"), "{e}");
    assert!(std::fs::read(live.join("disk0.raw")).unwrap() == before);
    assert_eq!(a_disks[0].read(5, 4).unwrap(), b"mine");
    drop((a_disks, a_reloc));
}

#[test]
fn a_relocation_never_empties_a_target_file_locked_by_another_open() {
    let rig = rig();
    let disks = rig.volumes();
    let t = rig.dir.path().join("primary/vm/disk1.raw");
    std::fs::write(&t, b"in use").unwrap();
    // Another open file description holds its shared lock.
    let other = OsStorage.open(&t, Open::Existing).unwrap();
    assert!(other.try_lock(false).unwrap());
    let meta = Meta::first_pass(rig.dir.path().join("primary/vm"));
    let e = Relocation::begin(rig.source(&disks), meta.clone())
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("disk1.raw"), "{e}");
    assert_eq!(std::fs::read(&t).unwrap(), b"in use");
    // Closed: emptied and relocated.
    drop(other);
    let r = Relocation::begin(rig.source(&disks), meta).unwrap();
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    assert!(rig.target_bytes(1) == rig.images[1]);
}

/// A `relocate --to <to> --force` request of `rig`'s VM.
fn forced<'a>(rig: &'a Rig, disks: &'a [Arc<Volume>], to: &'a Path) -> Request<'a> {
    Request {
        source: rig.source(disks),
        to,
        rate_mbps: None,
        force: true,
        forbidden: &[],
    }
}

#[test]
fn a_force_relocation_over_a_complete_relocated_copy_is_refused_saying_what_to_do() {
    let rig = rig();
    cut_over_with_mine(&rig, 0);
    let before = rig.target_bytes(0);
    // Another session of the VM (its relocation forgotten) relocates over
    // the copy, whose vm.json says a VM may run from it.
    std::fs::remove_dir_all(&rig.session_dir).unwrap();
    let disks = rig.volumes();
    let to = rig.dir.path().join("primary");
    let e = Relocation::start(forced(&rig, &disks, &to)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("vm.json"), "{e}");
    assert!(e.to_string().contains("remove that directory"), "{e}");
    assert!(rig.target_bytes(0) == before);
}

#[test]
fn a_target_inside_any_recoverfs_staging_directory_is_refused() {
    let rig = rig();
    let disks = rig.volumes();
    // Another daemon's staging directory, not one of this daemon's.
    let other = rig.dir.path().join("stg2");
    std::fs::create_dir_all(other.join("sessions")).unwrap();
    std::fs::write(other.join(crate::staging::STAGING_MARKER), b"{}").unwrap();
    for to in [other.clone(), other.join("sessions")] {
        let e = Relocation::start(forced(&rig, &disks, &to)).err().unwrap();
        assert!(e.to_string().contains("staging directory"), "{e}");
        assert!(!to.join("vm").exists(), "made in {}", to.display());
    }
}

#[test]
fn a_recoverfs_fuse_mount_is_found_at_or_above_a_target_and_nowhere_else() {
    let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:44 / /tmp/explore/mnt\\040a rw,nosuid,nodev,relatime shared:20 - fuse recoverfs rw,user_id=0
41 22 0:45 / /srv/other rw,relatime shared:21 - fuse.sshfs host:/ rw
";
    let mounts = crate::util::mountinfo::parse(info);
    let over = |p: &str| recoverfs_mount_over(&mounts, Path::new(p));
    assert_eq!(
        over("/tmp/explore/mnt a"),
        Some("/tmp/explore/mnt a".into())
    );
    assert_eq!(
        over("/tmp/explore/mnt a/web01"),
        Some("/tmp/explore/mnt a".into())
    );
    assert_eq!(over("/tmp/explore/mnt ab"), None);
    assert_eq!(over("/srv/other/x"), None);
    assert_eq!(over("/tmp/explore"), None);
}
