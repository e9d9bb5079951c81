//! Cutover under injected faults (issue 10 item 5): whatever fails before
//! the commit point leaves every disk on staging; after it there is only
//! forward progress, every disk on its target; never a mix, and never a
//! write acknowledged on one side and served from the other after a restart.
//! Then the disks served from their targets: `vm.json`, eviction, prefetch
//! and changed blocks after the cutover.

use super::*;
use crate::staging::io::fault::{Op, Rule};

const COMMIT: &[u8] = b"\"switched\": true";

#[test]
fn a_cutover_whose_commit_fails_leaves_every_disk_on_staging() {
    let rig = rig();
    let disks = rig.volumes();
    disks[1].write(5, b"before").unwrap();
    rig.faults
        .inject(Rule::fail(Op::Rename, "relocation.json", libc::EIO).with_data(COMMIT));
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed);
    assert!(r.status().error.unwrap().contains("cutover"));
    assert!(
        disks.iter().all(|d| !d.is_switched()),
        "a disk switched without a commit"
    );
    let config = rig.dir.path().join("primary/vm/vm.json");
    assert!(
        !config.exists(),
        "the target has vm.json, as if complete, without a commit"
    );
    // The guest goes on, on staging, and its flushed write survives a restart
    // (the old daemon, and its hold on the target files, gone).
    disks[0].write(BS as u64, b"after").unwrap();
    disks[0].flush().unwrap();
    drop(r);
    let (again, reloc) = rig.restart();
    assert!(reloc.is_some_and(|r| r.state() != State::Done));
    assert!(again.iter().all(|d| !d.is_switched()));
    assert_eq!(again[0].read(BS as u64, 5).unwrap(), b"after");
    assert_eq!(again[1].read(5, 6).unwrap(), b"before");
    assert!(!config.exists());
}

#[test]
fn a_cutover_whose_commit_cannot_be_made_durable_goes_forward_and_takes_no_new_bytes() {
    let rig = rig();
    let disks = rig.volumes();
    disks[1].write(5, b"before").unwrap();
    // The commit's rename goes through; the directory sync after it fails.
    rig.faults.inject(
        Rule::fail(Op::SyncDir, "staging/vm", libc::EIO).once_renamed("relocation.json", COMMIT),
    );
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    assert!(
        disks.iter().all(|d| d.is_switched()),
        "every disk is on its target"
    );
    // Switched, but not a success: the status says why.
    let st = r.status();
    assert!(
        st.error
            .as_deref()
            .is_some_and(|e| e.contains("could not be made durable")),
        "{st:?}"
    );
    // And `relocate --wait`, reading the status the API serves, fails.
    let session = serde_json::json!({
        "relocation": st,
        "disks": disks.iter().map(|d| d.status()).collect::<Vec<_>>(),
    });
    let e = crate::cli::output::wait_verdict("vm", &session)
        .expect("the wait is over")
        .unwrap_err();
    assert!(e.to_string().contains("could not be made durable"), "{e}");
    // No new byte may land: the commit could still vanish in a crash.
    for d in &disks {
        let e = d.write(BS as u64, b"after").unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(d.flush().is_err());
    }
    assert_eq!(disks[1].read(5, 6).unwrap(), b"before", "reads go on");
    // Whichever side a restart serves, the disks are whole and alike.
    let (again, _) = rig.restart();
    let switched: Vec<bool> = again.iter().map(|d| d.is_switched()).collect();
    assert!(
        switched.iter().all(|&s| s == switched[0]),
        "a mix of target and staging"
    );
    let mut want = rig.images[1].clone();
    want[5..11].copy_from_slice(b"before");
    assert_eq!(again[1].read(0, BLOCKS * BS).unwrap(), want);
    assert_eq!(again[0].read(0, BLOCKS * BS).unwrap(), rig.images[0]);
}

#[test]
fn a_write_waiting_out_a_cutover_whose_commit_was_not_made_durable_is_refused() {
    let rig = rig();
    let disks = rig.volumes();
    let target = rig
        .storage
        .open(&rig.dir.path().join("primary/vm/disk0.raw"), Open::Empty)
        .unwrap();
    target.set_len((BLOCKS * BS) as u64).unwrap();
    let gate = disks[0].pause_writes();
    let d = disks[0].clone();
    let w = std::thread::spawn(move || d.write(5, b"late"));
    // The write passes the failed-disk check and waits at the gate.
    std::thread::sleep(Duration::from_millis(300));
    disks[0].switch_to(target);
    disks[0].fail_hard(Error::new(ErrorKind::Io, "the commit was not made durable"));
    drop(gate);
    let e = w.join().unwrap().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(
        rig.target_bytes(0)[..9],
        [0u8; 9],
        "a byte landed on the target"
    );
}

#[test]
fn a_failing_target_fails_the_relocation_before_any_switch() {
    let rig = rig();
    let disks = rig.volumes();
    rig.faults
        .inject(Rule::fail(Op::Sync, "disk1.raw", libc::EIO));
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed);
    assert!(disks.iter().all(|d| !d.is_switched()));
    disks[1].write(0, b"still on staging").unwrap();
    disks[1].flush().unwrap();
}

#[test]
fn a_failing_target_write_fails_the_relocation_and_records_no_block_it_did_not_write() {
    let rig = rig();
    let disks = rig.volumes();
    rig.faults
        .inject(Rule::fail(Op::Write, "disk1.raw", libc::EIO));
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Failed);
    assert!(
        r.status().error.unwrap().contains("disk1"),
        "{:?}",
        r.status()
    );
    assert!(disks.iter().all(|d| !d.is_switched()));
    // `relocate --wait` ends, non-zero, naming the target's error.
    let session = serde_json::json!({
        "relocation": r.status(),
        "disks": disks.iter().map(|d| d.status()).collect::<Vec<_>>(),
    });
    let e = crate::cli::output::wait_verdict("vm", &session)
        .expect("the wait is over")
        .unwrap_err()
        .to_string();
    assert!(e.contains("failed") && e.contains("disk1"), "{e}");
    // Only the zero block (punched, not written) may be recorded on disk1.
    let copied: Vec<u64> = (0..BLOCKS as u64)
        .filter(|&b| r.copied[1].test(b))
        .collect();
    assert!(
        copied.iter().all(|&b| b == 3),
        "recorded unwritten blocks {copied:?}"
    );
}

#[test]
fn a_target_gets_its_vm_json_once_the_cutover_commits_and_again_at_restart_if_it_lacks_it() {
    let rig = rig();
    let disks = rig.volumes();
    let config = rig.dir.path().join("primary/vm/vm.json");
    std::fs::write(&config, b"an older relocation's").unwrap();
    let r = rig.begin(&disks, None);
    assert!(!config.exists(), "a new relocation keeps an old vm.json");
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    assert_eq!(std::fs::read(&config).unwrap(), b"{}\n");
    // Lost (say, placed by a daemon killed right after the commit): the
    // restarted daemon places it.
    std::fs::remove_file(&config).unwrap();
    drop((disks, r));
    let (again, _) = rig.restart();
    assert!(again[0].is_switched());
    assert_eq!(std::fs::read(&config).unwrap(), b"{}\n");
}

#[test]
fn after_cutover_a_failing_staging_eviction_leaves_the_relocated_disk_writable() {
    use crate::staging::budget::Evictable;
    let rig = rig();
    let disks = rig.volumes();
    disks[0].read(0, 4 * BS).unwrap(); // staged, unchanged
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    rig.faults
        .inject(Rule::fail(Op::Write, "disk0.present", libc::EIO));
    let _ = disks[0].evict(4 * BS as u64);
    assert!(
        !disks[0].is_failed(),
        "staging the disk no longer reads from failed it"
    );
    disks[0].write(BS as u64, b"on the target").unwrap();
    disks[0].flush().unwrap();
    assert_eq!(&rig.target_bytes(0)[BS..BS + 13], b"on the target");
}

#[test]
fn after_cutover_nothing_is_prefetched_into_staging() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    let fetched = disks[0].status().fetched_blocks;
    assert!(
        !disks[0].prefetch_block(7, crate::prefetch::Class::Profile),
        "a prefetch was queued for a disk that reads its target"
    );
    assert_eq!(disks[0].status().fetched_blocks, fetched);
}

#[test]
fn writes_after_cutover_are_still_marked_changed_durably() {
    let rig = rig();
    let disks = rig.volumes();
    disks[0].write(BS as u64, b"before").unwrap();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    assert!(disks[0].is_switched());
    disks[0].write(7 * BS as u64 + 3, b"after cutover").unwrap();
    disks[0].write_zeroes(9 * BS as u64, BS as u64).unwrap();
    disks[0].flush().unwrap();
    let want = vec![(1, 2), (7, 8), (9, 10)];
    assert_eq!(disks[0].changed_ranges(), want);
    // The bits were set durably before the data (no flush needed): a
    // restart sees them.
    drop((disks, r));
    let (again, _) = rig.restart();
    assert!(again[0].is_switched());
    assert_eq!(again[0].changed_ranges(), want);
    assert_eq!(again[1].changed_ranges(), vec![]);
}
