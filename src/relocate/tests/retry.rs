//! A failed relocation retried in the running daemon (`retry`): reopened
//! from its record once the cause is fixed, it copies only what was not
//! copied and cuts over; while the cause persists it fails again, with the
//! reason of now; not reopenable, it stays failed, saying why.

use super::*;
use crate::staging::io::fault::{Op, Rule};

/// Relocates with every target write of disk1 after its first 5 failing
/// with `errno` (disk0 is copied whole first); returns it failed.
fn failed_on_disk1(rig: &Rig, disks: &[Arc<Volume>], errno: i32) -> Arc<Relocation> {
    rig.faults
        .inject(Rule::fail(Op::Write, "disk1.raw", errno).after(5));
    let r = rig.relocate(disks);
    assert_eq!(settle(&r), State::Failed, "{:?}", r.status());
    r
}

/// The blocks each disk's copied map marks.
fn copied_blocks(r: &Relocation) -> Vec<Vec<bool>> {
    (0..2)
        .map(|i| {
            (0..BLOCKS)
                .map(|b| r.copied_map(i).test(b as u64))
                .collect()
        })
        .collect()
}

#[test]
fn a_failed_relocation_retried_once_the_target_has_room_copies_only_what_was_left_and_cuts_over() {
    let rig = rig();
    let disks = rig.volumes();
    let r = failed_on_disk1(&rig, &disks, libc::ENOSPC);
    let failed = r.status();
    let e = failed.error.clone().unwrap();
    assert!(e.contains("disk1") && e.contains("No space left"), "{e}");
    let copied = copied_blocks(&r);
    assert!(copied[0].iter().all(|&c| c), "disk0 not copied whole first");
    assert!(copied[1].iter().filter(|&&c| c).count() >= 5, "{copied:?}");
    assert!(!copied[1].iter().all(|&c| c), "{copied:?}");
    // The guest writes into a copied block meanwhile: copied again.
    disks[0].write(7 * BS as u64, b"after the failure").unwrap();
    // The cause fixed: retried in this daemon, no restart.
    rig.faults.clear();
    let again = r.retry(rig.source(&disks)).unwrap();
    assert_eq!(settle(&again), State::Done, "{:?}", again.status());
    assert!(disks.iter().all(|d| d.is_switched()));
    assert_eq!(
        disks[0].read(7 * BS as u64, 17).unwrap(),
        b"after the failure"
    );
    let mut want = rig.images[0].clone();
    want[7 * BS..][..17].copy_from_slice(b"after the failure");
    assert!(rig.target_bytes(0) == want, "disk0's target differs");
    assert!(
        rig.target_bytes(1) == rig.images[1],
        "disk1's target differs"
    );
    // Copied now: disk1's data blocks that were not (block 3 is a hole,
    // punched), and the block the guest wrote; nothing else again. The
    // count goes on from the failed one's.
    let left = (0..BLOCKS).filter(|&b| !copied[1][b] && b != 3).count() + 1;
    let st = again.status();
    assert_eq!(
        st.bytes_copied - failed.bytes_copied,
        (left * BS) as u64,
        "copied again what was copied: {st:?}"
    );
    assert!(st.copy_seconds >= failed.copy_seconds);
    assert!(st.error.is_none(), "{st:?}");
}

#[test]
fn a_failed_relocation_retried_while_the_cause_persists_fails_again_with_the_reason_of_now() {
    let rig = rig();
    let disks = rig.volumes();
    let r = failed_on_disk1(&rig, &disks, libc::ENOSPC);
    let before = copied_blocks(&r);
    // Still no room, now for another reason.
    rig.faults.clear();
    rig.faults
        .inject(Rule::fail(Op::Write, "disk1.raw", libc::EDQUOT));
    let again = r.retry(rig.source(&disks)).unwrap();
    assert_eq!(settle(&again), State::Failed, "{:?}", again.status());
    let e = again.status().error.unwrap();
    assert!(
        e.contains("disk1") && e.contains("quota") && !e.contains("No space"),
        "{e}"
    );
    // Nothing copied before was lost; still recorded, not cut over.
    assert_eq!(copied_blocks(&again), before);
    assert!(disks.iter().all(|d| !d.is_switched()));
    let record = std::fs::read_to_string(rig.session_dir.join("relocation.json")).unwrap();
    assert!(record.contains("\"switched\": false"), "{record}");
    // Refused where only a retry can go on: it says to resume once fixed.
    let e = again.pause().unwrap_err().to_string();
    assert!(
        e.contains("quota") && e.contains("recoverfs relocate vm --resume"),
        "{e}"
    );
    // Then fixed: the retry of the retry cuts over.
    rig.faults.clear();
    let last = again.retry(rig.source(&disks)).unwrap();
    assert_eq!(settle(&last), State::Done, "{:?}", last.status());
    assert!(rig.target_bytes(0) == rig.images[0]);
    assert!(rig.target_bytes(1) == rig.images[1]);
}

#[test]
fn a_failed_relocation_whose_target_cannot_be_reopened_stays_failed_saying_why() {
    let rig = rig();
    let disks = rig.volumes();
    let r = failed_on_disk1(&rig, &disks, libc::ENOSPC);
    rig.faults.clear();
    // Primary storage gone meanwhile (unmounted, say).
    let primary = rig.dir.path().join("primary");
    std::fs::rename(primary.join("vm"), primary.join("away")).unwrap();
    let Err(e) = r.retry(rig.source(&disks)) else {
        panic!("reopened without its target");
    };
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    let e = e.to_string();
    assert!(e.contains("--resume") && e.contains("--cancel"), "{e}");
    let st = r.status();
    assert_eq!(st.state, State::Failed);
    let why = st.error.unwrap();
    assert!(!why.contains("No space") && e.contains(&why), "{why} / {e}");
    assert!(disks.iter().all(|d| !d.is_switched()));
    // Back: the next retry reopens it and cuts over.
    std::fs::rename(primary.join("away"), primary.join("vm")).unwrap();
    let again = r.retry(rig.source(&disks)).unwrap();
    assert_eq!(settle(&again), State::Done, "{:?}", again.status());
    assert!(rig.target_bytes(0) == rig.images[0]);
    assert!(rig.target_bytes(1) == rig.images[1]);
}

#[test]
fn a_relocation_whose_cutover_could_not_commit_is_retried_and_cuts_over() {
    let rig = rig();
    let disks = rig.volumes();
    // The commit record's rename fails: nothing was committed.
    rig.faults.inject(
        Rule::fail(Op::Rename, "relocation.json", libc::EIO).with_data(b"\"switched\": true"),
    );
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed, "{:?}", r.status());
    assert!(disks.iter().all(|d| !d.is_switched()));
    rig.faults.clear();
    let again = r.retry(rig.source(&disks)).unwrap();
    assert_eq!(settle(&again), State::Done, "{:?}", again.status());
    assert!(disks.iter().all(|d| d.is_switched()));
    assert!(rig.target_bytes(0) == rig.images[0]);
    assert!(rig.target_bytes(1) == rig.images[1]);
}
