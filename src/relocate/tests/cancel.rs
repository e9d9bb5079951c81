//! Cancelling a relocation: durable and prompt mid-copy, refused once the
//! cutover began, never resumed when its record cannot be removed, and never
//! removing a file it did not create or reaches only through a target
//! directory replaced since.

use super::*;
use crate::staging::io::fault::{Op, Rule};
use std::sync::atomic::AtomicBool;

/// Waits until the relocation has recorded some copies.
fn wait_for_progress(r: &Relocation) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.status().bytes_done == 0 {
        assert!(Instant::now() < deadline, "no progress: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_cancel_mid_copy_is_durable_and_a_relocation_elsewhere_then_copies_what_the_vm_sees() {
    let rig = rig();
    let disks = rig.volumes();
    disks[0].write(7 * BS as u64, b"before the cancel").unwrap();
    // 3 MiB at 1 MB/s: about 3 s of copying.
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    // The guest writes all through the cancel.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (d, stop) = (disks[1].clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let b = (n % 8) as u64 + 10;
                d.write(b * BS as u64, &n.to_le_bytes()).unwrap();
                d.flush().unwrap();
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let c = r.cancel(false).unwrap();
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    assert!(!r.copier_running(), "the copier still runs");
    let primary = rig.dir.path().join("primary/vm");
    assert_eq!(c.target, primary);
    assert_eq!(
        c.removed,
        [primary.join("disk0.raw"), primary.join("disk1.raw")],
        "{c:?}"
    );
    assert!(c.kept.is_empty() && c.leftover.is_none(), "{c:?}");
    for i in 0..2 {
        assert!(!primary.join(format!("disk{i}.raw")).exists());
        assert!(!rig.session_dir.join(format!("disk{i}.copied")).exists());
    }
    assert!(
        !rig.session_dir.join("relocation.json").exists(),
        "the cancel is not recorded"
    );
    // The directory was there before the relocation: it stays.
    assert!(primary.is_dir());
    // The disks no longer track copies: a fully staged one may pass through.
    disks[0].read(0, BLOCKS * BS).unwrap();
    assert!(disks[0].begin_direct_read().is_some());
    disks[0].end_direct_read();
    disks[0].write(8 * BS as u64, b"after the cancel").unwrap();
    disks[0].flush().unwrap();
    drop((r, disks));
    // A restart does not resume it.
    let (disks, again) = rig.restart();
    assert!(again.is_none(), "a cancelled relocation was resumed");
    assert_eq!(
        disks[0].read(7 * BS as u64, 17).unwrap(),
        b"before the cancel"
    );
    assert_eq!(
        disks[0].read(8 * BS as u64, 16).unwrap(),
        b"after the cancel"
    );
    let b = (n % 8) as u64 + 10;
    assert_eq!(disks[1].read(b * BS as u64, 4).unwrap(), n.to_le_bytes());
    // Relocated elsewhere, the new target is the disk the VM sees.
    let other = rig.dir.path().join("other/vm");
    std::fs::create_dir_all(&other).unwrap();
    let meta = Meta::first_pass(other.clone());
    let r = Relocation::begin(rig.source(&disks), meta).unwrap();
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    for (i, d) in disks.iter().enumerate() {
        let target = std::fs::read(other.join(format!("disk{i}.raw"))).unwrap();
        assert!(
            target == d.read(0, BLOCKS * BS).unwrap(),
            "disk{i}: the new target differs from the disk"
        );
    }
    assert!(!primary.join("disk0.raw").exists());
}

#[test]
fn a_cancel_removes_only_the_target_files_the_relocation_created_and_keeps_all_when_asked() {
    let rig = rig();
    let disks = rig.volumes();
    let primary = rig.dir.path().join("primary/vm");
    // disk1.raw was there before (a relocation started with --force).
    std::fs::write(primary.join("disk1.raw"), b"old").unwrap();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    let c = r.cancel(false).unwrap();
    assert_eq!(c.removed, [primary.join("disk0.raw")], "{c:?}");
    assert_eq!(c.kept, [primary.join("disk1.raw")], "{c:?}");
    assert!(primary.join("disk1.raw").exists());
    drop(r);
    // --keep-target keeps what it created too; a paused one is cancelled
    // like any.
    std::fs::remove_file(primary.join("disk1.raw")).unwrap();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    assert_eq!(r.pause().unwrap().state, State::Paused);
    let c = r.cancel(true).unwrap();
    assert!(!r.copier_running());
    assert!(c.removed.is_empty(), "{c:?}");
    assert_eq!(c.kept.len(), 2);
    assert!(primary.join("disk0.raw").exists() && primary.join("disk1.raw").exists());
    assert!(!rig.session_dir.join("relocation.json").exists());
}

#[test]
fn a_cancel_of_a_relocation_forced_over_existing_files_removes_its_owner_mark() {
    let rig = rig();
    let disks = rig.volumes();
    let primary = rig.dir.path().join("primary/vm");
    // Both files there before (--force): none is the relocation's to remove.
    for i in 0..2 {
        std::fs::write(primary.join(format!("disk{i}.raw")), b"old").unwrap();
    }
    let r = rig.begin(&disks, None);
    let mark = primary.join(crate::relocate::target::OWNER_MARK);
    assert!(mark.exists());
    let c = r.cancel(false).unwrap();
    assert!(c.leftover.is_none(), "{:?}", c.leftover);
    assert!(c.removed.is_empty(), "{c:?}");
    assert_eq!(c.kept.len(), 2, "{c:?}");
    // It would name a relocation no record refers to any more.
    assert!(!mark.exists(), "owner mark left after the cancel");
}

#[test]
fn a_cancel_after_the_cutover_is_refused_and_changes_nothing() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate(&disks);
    assert_eq!(settle(&r), State::Done);
    let record = std::fs::read(rig.session_dir.join("relocation.json")).unwrap();
    let targets: Vec<_> = (0..2).map(|i| rig.target_bytes(i)).collect();
    let e = r.cancel(false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("live disk"), "{e}");
    assert_eq!(r.state(), State::Done);
    assert!(disks.iter().all(|d| d.is_switched()));
    assert_eq!(
        std::fs::read(rig.session_dir.join("relocation.json")).unwrap(),
        record
    );
    assert!((0..2).all(|i| rig.target_bytes(i) == targets[i]));
    assert!(rig.dir.path().join("primary/vm/vm.json").exists());
    // The target is the live disk: writes land there.
    disks[0].write(0, b"live").unwrap();
    disks[0].flush().unwrap();
    assert_eq!(&rig.target_bytes(0)[..4], b"live");
    drop((r, disks));
    let (disks, again) = rig.restart();
    assert_eq!(again.unwrap().state(), State::Done);
    assert!(disks.iter().all(|d| d.is_switched()));
}

#[test]
fn a_cancel_asked_while_the_cutover_runs_is_refused_and_the_cutover_completes() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    // A guest write to a block of the first batch leaves it for the final
    // pass, whose commit (writes paused, state switching) asks to cancel.
    let asked: Arc<Mutex<Option<Result<Cancelled>>>> = Arc::default();
    {
        let (weak, asked, d0) = (Arc::downgrade(&r), asked.clone(), disks[0].clone());
        let written = AtomicBool::new(false);
        *r.commit_hook.lock() = Some(Arc::new(move |i, blocks: &[u64]| {
            let r = weak.upgrade().unwrap();
            if i == 0 && blocks.contains(&5) && !written.swap(true, Ordering::SeqCst) {
                d0.write(5 * BS as u64, b"dirty").unwrap();
            }
            if r.state() == State::Switching && asked.lock().is_none() {
                *asked.lock() = Some(r.cancel(false));
            }
        }));
    }
    r.spawn();
    assert_eq!(settle(&r), State::Done);
    let e = asked
        .lock()
        .take()
        .expect("asked during the cutover")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(disks.iter().all(|d| d.is_switched()));
    let mut want = rig.images[0].clone();
    want[5 * BS..][..5].copy_from_slice(b"dirty");
    assert!(rig.target_bytes(0) == want);
    assert!(rig.session_dir.join("relocation.json").exists());
}

#[test]
fn a_cancel_whose_record_cannot_be_removed_is_never_resumed_and_finishes_when_asked_again() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    rig.faults
        .inject(Rule::fail(Op::Remove, "relocation.json", libc::EIO).times(1));
    let e = r.cancel(false).unwrap_err().to_string();
    assert_eq!(rig.faults.injected(), 1, "{e}");
    assert!(
        e.contains("was cancelled; its record could not be removed")
            && e.contains("`recoverfs relocate vm --cancel` again"),
        "{e}"
    );
    assert_eq!(r.state(), State::Failed);
    assert!(!r.copier_running());
    // Nothing was removed (the record, the copied maps, the targets), and
    // the record says it was being cancelled.
    let primary = rig.dir.path().join("primary/vm");
    let record = std::fs::read_to_string(rig.session_dir.join("relocation.json")).unwrap();
    assert!(record.contains("\"cancelling\": true"), "{record}");
    for i in 0..2 {
        assert!(rig.session_dir.join(format!("disk{i}.copied")).exists());
        assert!(primary.join(format!("disk{i}.raw")).exists());
    }
    // `relocate --resume` in this daemon refuses it (fixmisc 2: it was
    // reopened as if it had failed on its own), saying to cancel again.
    let Err(e) = r.retry(rig.source(&disks)) else {
        panic!("a cancelled relocation was resumed");
    };
    assert!(e.to_string().contains("was cancelled"), "{e}");
    assert!(!r.copier_running());
    // What a pause or a new `--to` is told: to cancel again, not to resume.
    let told = r.failed_error().to_string();
    assert!(
        told.contains("--cancel` again") && !told.contains("--resume"),
        "{told}"
    );
    drop((r, disks));
    // Recorded as paused too: `status` must still not advise `--resume`.
    let meta = rig.session_dir.join("relocation.json");
    let paused = std::fs::read_to_string(&meta)
        .unwrap()
        .replace("\"paused\": false", "\"paused\": true");
    assert!(paused.contains("\"paused\": true"), "{paused}");
    std::fs::write(&meta, paused).unwrap();
    // Nor does a restart: held, served from staging, saying why.
    let (disks, again) = rig.restart();
    assert!(
        again.is_none(),
        "a cancelled relocation was resumed at a restart"
    );
    let Reopened::NotResumed(h) = Relocation::reopen_or_hold(rig.source(&disks)).unwrap() else {
        panic!("not held");
    };
    let st = h.status();
    assert!(
        !st.note.as_deref().unwrap_or("").contains("--resume"),
        "{:?}",
        st.note
    );
    let shown = format!("{}; {}", h.error, h.then);
    assert!(
        shown.contains("was cancelled") && shown.contains("--cancel` again"),
        "{shown}"
    );
    // Cancelled again, it is gone for good with what it created.
    let c = Relocation::cancel_recorded(rig.source(&disks), false)
        .unwrap()
        .expect("recorded");
    assert!(c.leftover.is_none(), "{c:?}");
    assert!(!primary.join("disk0.raw").exists());
    assert!(!rig.session_dir.join("relocation.json").exists());
    drop(disks);
    assert!(rig.restart().1.is_none());
}

/// fixstatus 1: a cancel that could not finish showed as `failed` (or, after
/// a restart, `not-resumed`), the cancel named only in its error text.
#[test]
fn a_cancel_that_could_not_finish_shows_its_own_state_and_the_command_that_finishes_it() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    let json = serde_json::to_value(r.status()).unwrap();
    assert!(json.get("cancel_unfinished").is_none(), "{json}");
    rig.faults
        .inject(Rule::fail(Op::Remove, "relocation.json", libc::EIO).times(1));
    r.cancel(false).unwrap_err();
    let finish = Some("recoverfs relocate vm --cancel");
    let st = r.status();
    assert_eq!(st.state, State::Failed, "older readers keep their state");
    assert_eq!(st.cancel_unfinished.as_deref(), finish);
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["state"], "failed");
    assert_eq!(json["cancel_unfinished"], "recoverfs relocate vm --cancel");
    // Its mark was written: never resumed, rightly said so.
    assert!(
        !st.cancel_unmarked && json.get("cancel_unmarked").is_none(),
        "{json}"
    );
    // Held as such by a restart.
    drop((r, disks));
    let (disks, _) = rig.restart();
    let Reopened::NotResumed(h) = Relocation::reopen_or_hold(rig.source(&disks)).unwrap() else {
        panic!("not held");
    };
    let st = h.status();
    assert_eq!(st.state, State::NotResumed);
    assert_eq!(st.cancel_unfinished.as_deref(), finish);
    // Finished, nothing is left to show.
    Relocation::cancel_recorded(rig.source(&disks), false)
        .unwrap()
        .expect("recorded");
    assert!(matches!(
        Relocation::reopen_or_hold(rig.source(&disks)).unwrap(),
        Reopened::None
    ));
}

#[test]
fn a_cancel_whose_mark_cannot_be_written_cancels_nothing_and_is_not_resumed_in_the_daemon() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    rig.faults
        .inject(Rule::fail(Op::Rename, "relocation.json", libc::EIO).with_data(b"cancelling"));
    let e = r.cancel(false).unwrap_err().to_string();
    assert!(e.contains("not cancelled"), "{e}");
    let record = std::fs::read_to_string(rig.session_dir.join("relocation.json")).unwrap();
    assert!(!record.contains("cancelling"), "{record}");
    // Shown as a cancel to finish, with its command (fixstatus 1).
    assert_eq!(
        r.status().cancel_unfinished.as_deref(),
        Some("recoverfs relocate vm --cancel")
    );
    // Nothing durable says cancel: status must not say "never resumed"
    // (explore11 M2).
    assert!(r.status().cancel_unmarked);
    // Asked to cancel: not resumed in this daemon, whatever failed.
    assert!(r.retry(rig.source(&disks)).is_err());
    assert!(!r.copier_running());
    // Cancelled again, it is gone.
    rig.faults.clear();
    r.cancel(false).unwrap();
    assert!(!rig.dir.path().join("primary/vm/disk0.raw").exists());
    drop((r, disks));
    assert!(rig.restart().1.is_none());
}

#[test]
fn a_recorded_relocation_whose_target_was_unreachable_at_restart_can_still_be_cancelled_naming_what_is_left(
) {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    r.stop();
    drop((r, disks));
    let primary = rig.dir.path().join("primary/vm");
    // Primary storage unreachable: nothing above the target either.
    let (mount, moved) = (rig.dir.path().join("primary"), rig.dir.path().join("away"));
    std::fs::rename(&mount, &moved).unwrap();
    let (disks, again) = rig.restart();
    assert!(again.is_none(), "served from staging");
    let c = Relocation::cancel_recorded(rig.source(&disks), false)
        .unwrap()
        .expect("recorded");
    assert!(c.removed.is_empty(), "{c:?}");
    // The files it could not reach are named as left.
    let left = c.leftover.as_ref().expect("named as left").to_string();
    for i in 0..2 {
        let p = primary.join(format!("disk{i}.raw"));
        assert!(left.contains(&*p.to_string_lossy()), "{left}");
    }
    assert!(!rig.session_dir.join("relocation.json").exists());
    assert!(Relocation::cancel_recorded(rig.source(&disks), false)
        .unwrap()
        .is_none());
    drop(disks);
    // The target back, nothing resumes.
    std::fs::rename(&moved, &mount).unwrap();
    assert!(rig.restart().1.is_none());
}

#[test]
fn a_cancel_never_removes_files_through_a_target_replaced_by_a_symlink() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.relocate_at(&disks, Some(1.0));
    wait_for_progress(&r);
    let (victim, bytes) = swap_target_for_a_link(&rig);
    let c = r.cancel(false).unwrap();
    for i in 0..2 {
        assert_eq!(
            std::fs::read(victim.join(format!("disk{i}.raw"))).unwrap(),
            bytes,
            "{c:?}"
        );
    }
    assert!(c.removed.is_empty(), "{c:?}");
    // Cancelled, but the files are left and the answer says why.
    assert!(!rig.session_dir.join("relocation.json").exists());
    let left = c.leftover.expect("the files left are named").to_string();
    assert!(left.contains("symbolic link"), "{left}");
    assert!(left.contains("not reached"), "{left}");
    assert!(
        !left.contains("disk0.raw"),
        "names the link's files: {left}"
    );
    assert!(rig.dir.path().join("primary/aside/disk0.raw").exists());
}

#[test]
fn a_cancel_after_the_target_dir_was_removed_succeeds_naming_nothing() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    std::fs::remove_dir_all(rig.dir.path().join("primary/vm")).unwrap();
    let c = r.cancel(false).unwrap();
    assert!(c.leftover.is_none(), "{:?}", c.leftover);
    assert!(c.removed.is_empty(), "{c:?}");
    assert!(!rig.session_dir.join("relocation.json").exists());
}

#[test]
fn a_cancel_after_the_target_dir_was_replaced_never_names_the_new_dirs_files() {
    let rig = rig();
    let disks = rig.volumes();
    let r = rig.begin(&disks, None);
    let primary = rig.dir.path().join("primary");
    std::fs::rename(primary.join("vm"), primary.join("aside")).unwrap();
    std::fs::create_dir(primary.join("vm")).unwrap();
    std::fs::write(primary.join("vm/disk0.raw"), b"keep").unwrap();
    let c = r.cancel(false).unwrap();
    let left = c.leftover.expect("said").to_string();
    assert!(left.contains("not reached"), "{left}");
    assert!(!left.contains("disk0.raw"), "{left}");
    assert_eq!(
        std::fs::read(primary.join("vm/disk0.raw")).unwrap(),
        b"keep"
    );
    assert!(primary.join("aside/disk0.raw").exists());
}

#[test]
fn a_cancel_whose_target_is_missing_from_a_parent_on_another_filesystem_names_what_is_left() {
    let rig = rig();
    let disks = rig.volumes();
    drop(rig.begin(&disks, None));
    drop(disks);
    // Primary storage not mounted: its mount point is there, empty, on the
    // filesystem below (another device than the target's, in this boot).
    let primary = rig.dir.path().join("primary");
    std::fs::rename(&primary, rig.dir.path().join("away")).unwrap();
    std::fs::create_dir(&primary).unwrap();
    edit_record(&rig, |v| {
        let dev = v["target_id"]["dev"].as_u64().unwrap();
        v["target_id"]["dev"] = (dev ^ 0x5a5a).into();
    });
    let (disks, again) = rig.restart();
    assert!(again.is_none(), "served from staging");
    let c = Relocation::cancel_recorded(rig.source(&disks), false)
        .unwrap()
        .expect("recorded");
    let left = c.leftover.expect("named as left").to_string();
    assert!(
        left.contains(&*primary.join("vm/disk0.raw").to_string_lossy()),
        "{left}"
    );
}
