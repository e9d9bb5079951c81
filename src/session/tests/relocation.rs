//! A relocation a restarted daemon could not reopen (its target was not
//! reachable) is shown by `status` with the reason and what to do, and is
//! resumed (or cancelled) in the running daemon, without another restart.

use super::*;
use crate::relocate::State;
use crate::staging::io::fault::{FaultyStorage, Op, Rule};
use crate::staging::OsStorage;

/// `vm` recovered and relocating to `primary/` (recorded with no rate
/// limit, its copier stopped before it copied anything; `paused` by the
/// administrator first); the daemon then restarts with `primary` moved
/// away, as if not mounted yet.
fn relocation_left_unreachable(vm: &str, paused: bool) -> (Rig, Vec<u8>, PathBuf, PathBuf) {
    let r = rig();
    let (_, data) = backup(&r, vm, 51, 16);
    r.ds.recover(vm, None).unwrap();
    let primary = r.dir.path().join("primary");
    std::fs::create_dir(&primary).unwrap();
    // Slow enough that nothing is copied before the copier stops.
    r.ds.relocate(vm, &primary, Some(0.001), false).unwrap();
    if paused {
        r.ds.pause_relocation(vm, true).unwrap();
    }
    r.ds.stop_background();
    // The record as a relocation without a rate limit would have it, so
    // the resumed copy finishes at once.
    let s = r.ds.session(vm).unwrap();
    let rec = s.dir.join("relocation.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    meta["rate_mbps"] = serde_json::Value::Null;
    std::fs::write(&rec, serde_json::to_vec(&meta).unwrap()).unwrap();
    drop(s);
    let away = r.dir.path().join("primary.away");
    std::fs::rename(&primary, &away).unwrap();
    (restart(r, &[]), data, primary, away)
}

fn relocation_status(r: &Rig, vm: &str) -> Option<RelocationStatus> {
    r.ds.status(&r.ds.session(vm).unwrap()).relocation
}

#[test]
fn a_relocation_a_restart_could_not_reopen_shows_in_status_with_the_reason_and_what_to_do() {
    let (r, data, primary, _away) = relocation_left_unreachable("vm", false);
    // Served from staging meanwhile.
    assert_eq!(disk(&r, "vm").read(0, BS).unwrap(), data[..BS]);
    let st = relocation_status(&r, "vm").expect("shown, not hidden");
    assert_eq!(st.state, State::NotResumed);
    assert_eq!(st.target, primary.join("vm"));
    assert_eq!(st.bytes_total, data.len() as u64);
    let error = st.error.unwrap();
    assert!(error.contains("open relocation target"), "{error}");
    assert!(st.note.unwrap().contains("recoverfs relocate vm --resume"));
    // Another target is refused until it is resumed or cancelled: its
    // partial files would be left where nothing names them.
    let elsewhere = r.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let e = r.ds.relocate("vm", &elsewhere, None, false).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
    assert!(e.to_string().contains("--cancel"), "{e}");
    assert!(!elsewhere.join("vm").exists());
    assert_eq!(
        relocation_status(&r, "vm").unwrap().state,
        State::NotResumed
    );
    // Nothing runs to pause: the refusal says why.
    let e = r.ds.pause_relocation("vm", true).unwrap_err().to_string();
    assert!(
        e.contains("not running") && e.contains("open relocation target"),
        "{e}"
    );
}

#[test]
fn resume_reopens_a_relocation_not_resumed_at_restart_once_its_target_is_back_and_it_cuts_over() {
    let (r, data, primary, away) = relocation_left_unreachable("vm", false);
    // Still unreachable: an error with the reason, and still shown.
    let e = r.ds.pause_relocation("vm", false).unwrap_err();
    // 409, not the missing target's 404 ("no such relocation").
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
    let e = e.to_string();
    assert!(
        e.contains("still cannot be resumed") && e.contains("open relocation target"),
        "{e}"
    );
    assert_eq!(
        relocation_status(&r, "vm").unwrap().state,
        State::NotResumed
    );
    // A guest write meanwhile goes to staging and must reach the target.
    let d = disk(&r, "vm");
    d.write(3 * BS as u64, b"written while not resumed")
        .unwrap();
    d.flush().unwrap();
    // Primary storage mounted again: resumed in this daemon.
    std::fs::rename(&away, &primary).unwrap();
    r.ds.pause_relocation("vm", false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relocation_status(&r, "vm").unwrap().state != State::Done {
        assert!(Instant::now() < deadline, "relocation did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(d.is_switched());
    let mut want = data.clone();
    want[3 * BS..3 * BS + 25].copy_from_slice(b"written while not resumed");
    assert_eq!(std::fs::read(primary.join("vm/disk0.raw")).unwrap(), want);
    assert!(r
        .ds
        .session("vm")
        .unwrap()
        .relocation_not_resumed
        .lock()
        .is_none());
}

/// fixviews 2: `export-points` left out a relocation not resumed, and
/// showed an unfinished cancel by its state alone (`Failed`, `NotResumed`).
#[test]
fn export_points_show_a_relocation_not_resumed_and_an_unfinished_cancel_with_its_command() {
    let (r, _data, _, _away) = relocation_left_unreachable("vm", false);
    let faults = FaultyStorage::new(OsStorage::shared());
    let r = super::recover_faults::restart_over(r, &faults);
    r.ds.resume_active();
    let shown = |r: &Rig| {
        let points = serde_json::to_value(r.ds.point_status()).unwrap();
        let all: Vec<serde_json::Value> = (points.as_array().unwrap().iter())
            .flat_map(|p| p["relocations"].as_array().cloned().unwrap_or_default())
            .collect();
        assert_eq!(all.len(), 1, "{points}");
        all[0].clone()
    };
    let rl = shown(&r);
    assert_eq!(
        (rl["vm"].as_str(), rl["state"].as_str()),
        (Some("vm"), Some("NotResumed"))
    );
    assert!(rl.get("cancel_unfinished").is_none(), "{rl}");
    faults.inject(Rule::fail(Op::Remove, "relocation.json", libc::EIO).times(1));
    r.ds.cancel_relocation("vm", false).unwrap_err();
    let rl = shown(&r);
    assert_eq!(rl["state"], "NotResumed", "older readers keep their state");
    assert_eq!(rl["cancel_unfinished"], "recoverfs relocate vm --cancel");
}

/// fixstatus 1: a cancel of a relocation not resumed whose record could
/// not be removed left `status` showing it `not-resumed`, advising the
/// `--resume` that then refused it.
#[test]
fn a_cancel_of_a_relocation_not_resumed_that_could_not_finish_shows_as_such_in_status() {
    let (r, _data, _, _away) = relocation_left_unreachable("vm", false);
    let faults = FaultyStorage::new(OsStorage::shared());
    let r = super::recover_faults::restart_over(r, &faults);
    r.ds.resume_active();
    let st = relocation_status(&r, "vm").expect("held");
    assert_eq!((st.state, st.cancel_unfinished), (State::NotResumed, None));
    faults.inject(Rule::fail(Op::Remove, "relocation.json", libc::EIO).times(1));
    let e = r.ds.cancel_relocation("vm", false).unwrap_err().to_string();
    assert!(e.contains("its record could not be removed"), "{e}");
    let st = relocation_status(&r, "vm").expect("still recorded, still shown");
    // Older readers keep their state; the cancel is named, with its command.
    assert_eq!(st.state, State::NotResumed);
    assert_eq!(
        st.cancel_unfinished.as_deref(),
        Some("recoverfs relocate vm --cancel")
    );
    let note = st.note.unwrap_or_default();
    assert!(
        note.contains("--cancel` again") && !note.contains("--resume"),
        "{note}"
    );
    let json = serde_json::to_value(relocation_status(&r, "vm").unwrap()).unwrap();
    assert_eq!(json["state"], "not-resumed");
    assert_eq!(json["cancel_unfinished"], "recoverfs relocate vm --cancel");
    // Not resumed, however asked.
    let e = r.ds.pause_relocation("vm", false).unwrap_err().to_string();
    assert!(e.contains("was cancelled"), "{e}");
    // The command named finishes it (its files could not be reached).
    r.ds.cancel_relocation("vm", false).unwrap_err();
    assert!(relocation_status(&r, "vm").is_none());
    assert!(!r
        .ds
        .session("vm")
        .unwrap()
        .dir
        .join("relocation.json")
        .exists());
}

#[test]
fn cancelling_a_relocation_not_resumed_at_restart_leaves_the_session_without_one() {
    let (r, data, _, _) = relocation_left_unreachable("vm", false);
    r.ds.cancel_relocation("vm", false).unwrap_err(); // its files could not be reached
    assert!(
        relocation_status(&r, "vm").is_none(),
        "cancelled, nothing shown"
    );
    let e = r.ds.pause_relocation("vm", false).unwrap_err().to_string();
    assert!(e.contains("not being relocated"), "{e}");
    // Then one elsewhere runs to its cutover.
    let elsewhere = r.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    r.ds.relocate("vm", &elsewhere, None, false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relocation_status(&r, "vm").unwrap().state != State::Done {
        assert!(Instant::now() < deadline, "relocation did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(std::fs::read(elsewhere.join("vm/disk0.raw")).unwrap(), data);
}

#[test]
fn resume_of_a_relocation_paused_before_a_restart_that_could_not_reopen_it_lets_it_copy() {
    let (r, data, primary, away) = relocation_left_unreachable("vm", true);
    let st = relocation_status(&r, "vm").unwrap();
    assert!(st.note.unwrap().contains("paused"));
    std::fs::rename(&away, &primary).unwrap();
    let st = r.ds.pause_relocation("vm", false).unwrap();
    assert_ne!(st.state, State::Paused, "resumed, not only reopened");
    let deadline = Instant::now() + Duration::from_secs(30);
    while relocation_status(&r, "vm").unwrap().state != State::Done {
        assert!(Instant::now() < deadline, "relocation did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(std::fs::read(primary.join("vm/disk0.raw")).unwrap(), data);
}

#[test]
fn release_discard_of_a_vm_still_relocating_removes_the_partial_target_files_it_made() {
    let r = rig();
    backup(&r, "vm", 52, 16);
    r.ds.recover("vm", None).unwrap();
    let primary = r.dir.path().join("primary");
    std::fs::create_dir(&primary).unwrap();
    r.ds.relocate("vm", &primary, Some(0.001), false).unwrap();
    assert!(primary.join("vm/disk0.raw").exists());
    let rel = r.ds.release_report("vm", true).unwrap().relocation.unwrap();
    // Nothing would name them once the staging is gone.
    assert!(!primary.join("vm").exists(), "partial target left");
    assert!(std::fs::read_dir(&primary).unwrap().next().is_none());
    // The client is told what was removed (explore10 L3).
    assert_eq!(rel.outcome, "cancelled");
    assert_eq!(rel.target, primary.join("vm"));
    assert_eq!(
        rel.removed,
        [primary.join("vm/disk0.raw"), primary.join("vm")]
    );
    assert!(rel.kept.is_empty());
}

#[test]
fn release_of_a_vm_still_relocating_says_the_copy_stopped_and_how_far_it_got() {
    let r = rig();
    backup(&r, "vm", 52, 16);
    r.ds.recover("vm", None).unwrap();
    let primary = r.dir.path().join("primary");
    std::fs::create_dir(&primary).unwrap();
    r.ds.relocate("vm", &primary, Some(0.001), false).unwrap();
    let rel =
        r.ds.release_report("vm", false)
            .unwrap()
            .relocation
            .unwrap();
    assert_eq!(rel.outcome, "stopped");
    assert_eq!(rel.target, primary.join("vm"));
    assert!(rel.state.is_running(), "{rel:?}");
    assert!(
        rel.bytes_total > 0 && rel.bytes_done < rel.bytes_total,
        "{rel:?}"
    );
    assert!(
        primary.join("vm/disk0.raw").exists(),
        "a stop removes nothing"
    );
    // Paused, it says so: a recover does not resume it.
    r.ds.recover("vm", None).unwrap();
    r.ds.pause_relocation("vm", true).unwrap();
    let rel =
        r.ds.release_report("vm", false)
            .unwrap()
            .relocation
            .unwrap();
    assert_eq!((rel.outcome, rel.state), ("stopped", State::Paused));
    // Without one, there is nothing to say.
    r.ds.recover("vm", None).unwrap();
    r.ds.cancel_relocation("vm", false).unwrap();
    assert!(r
        .ds
        .release_report("vm", false)
        .unwrap()
        .relocation
        .is_none());
}

#[test]
fn release_discard_of_a_vm_relocating_with_force_over_old_files_keeps_them_and_leaves_no_mark() {
    let r = rig();
    backup(&r, "vm", 52, 16);
    r.ds.recover("vm", None).unwrap();
    let target = r.dir.path().join("primary/vm");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("disk0.raw"), b"old").unwrap();
    r.ds.relocate("vm", target.parent().unwrap(), Some(0.001), true)
        .unwrap();
    assert!(target.join(".recoverfs-relocation").exists());
    let rel = r.ds.release_report("vm", true).unwrap().relocation.unwrap();
    assert_eq!(rel.outcome, "cancelled");
    assert_eq!(rel.kept, [target.join("disk0.raw")]);
    // The file was there before: kept (emptied by --force), with nothing
    // naming the cancelled relocation beside it.
    let left: Vec<_> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["disk0.raw"]);
}

#[test]
fn release_discard_of_a_vm_whose_relocation_was_not_resumed_names_the_files_it_cannot_reach() {
    let (r, _, primary, away) = relocation_left_unreachable("vm", false);
    let e = r.ds.release("vm", true).unwrap_err().to_string();
    assert!(
        e.contains("released and its staging discarded") && e.contains("disk0.raw"),
        "{e}"
    );
    assert!(r.ds.session("vm").is_none());
    // Back, its files are the ones named: nothing else removed them.
    std::fs::rename(&away, &primary).unwrap();
    assert!(primary.join("vm/disk0.raw").exists());
}

#[test]
fn a_failed_relocation_can_be_started_again_with_force_over_its_own_target() {
    use crate::staging::io::fault::{Op, Rule};
    let (r, faults) = rig_faulty();
    let (_, data) = backup(&r, "vm", 53, 16);
    r.ds.recover("vm", None).unwrap();
    let primary = r.dir.path().join("primary");
    std::fs::create_dir(&primary).unwrap();
    faults.inject(Rule::fail(Op::Write, "disk0.raw", libc::EIO));
    r.ds.relocate("vm", &primary, None, false).unwrap();
    let settled = |want: State| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let st = relocation_status(&r, "vm").unwrap();
            if st.state == want {
                return st;
            }
            assert!(std::time::Instant::now() < deadline, "{st:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    settled(State::Failed);
    faults.clear();
    // Its files are left, open in the failed one: it lets go of them (and
    // of their locks), so the same daemon may empty them again.
    r.ds.relocate("vm", &primary, None, true).unwrap();
    settled(State::Done);
    assert!(std::fs::read(primary.join("vm/disk0.raw")).unwrap() == data);
}

/// `vm` recovered and relocated to `<rig>/primary` on a daemon whose every
/// write to the target fails with ENOSPC, until that failed the copier;
/// returns the rig, the faults and `primary`.
fn relocation_failed_for_enospc(vm: &str) -> (Rig, FaultyStorage, PathBuf) {
    let r = rig();
    backup(&r, vm, 71, 16);
    let faults = FaultyStorage::new(OsStorage::shared());
    let r = super::recover_faults::restart_over(r, &faults);
    r.ds.recover(vm, None).unwrap();
    // The target is written through its pinned directory (/proc/self/fd).
    faults.inject(Rule::fail(Op::Write, "/disk0.raw", libc::ENOSPC));
    let primary = r.dir.path().join("primary");
    std::fs::create_dir(&primary).unwrap();
    r.ds.relocate(vm, &primary, None, false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while relocation_status(&r, vm).unwrap().state != State::Failed {
        assert!(Instant::now() < deadline, "{:?}", relocation_status(&r, vm));
        std::thread::sleep(Duration::from_millis(10));
    }
    (r, faults, primary)
}

/// The refusal of what cannot go on with a failed relocation: it says it
/// failed, why, and both ways on.
fn assert_says_failed_why_and_what_to_do(e: &crate::error::Error, primary: &Path) {
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
    let e = e.to_string();
    for want in [
        "failed (",
        "No space left on device",
        "recoverfs relocate vm --resume",
        "recoverfs relocate vm --cancel",
        &format!("recoverfs relocate vm --to {} --force", primary.display()),
    ] {
        assert!(e.contains(want), "{want:?} not in: {e}");
    }
}

/// Waits until `vm`'s relocation is in state `want`; returns its status.
fn settled(r: &Rig, vm: &str, want: State) -> RelocationStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = relocation_status(r, vm).expect("a relocation shown");
        if st.state == want {
            return st;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn resume_retries_a_failed_relocation_in_the_running_daemon_once_the_cause_is_fixed() {
    let (r, faults, primary) = relocation_failed_for_enospc("vm");
    let data = disk(&r, "vm").read(0, 16 * BS).unwrap();
    // Nothing runs to pause: the refusal says why and how on.
    let e = r.ds.pause_relocation("vm", true).unwrap_err();
    assert_says_failed_why_and_what_to_do(&e, &primary);
    // Still no room: retried, and failed again for it (the answer may
    // come before or after the new copier fails).
    match r.ds.pause_relocation("vm", false) {
        Ok(st) => assert_ne!(st.state, State::Done),
        Err(e) => assert_says_failed_why_and_what_to_do(&e, &primary),
    }
    let st = settled(&r, "vm", State::Failed);
    assert!(st.error.unwrap().contains("No space left"));
    assert!(r
        .ds
        .session("vm")
        .unwrap()
        .dir
        .join("relocation.json")
        .exists());
    // Room made on primary storage: retried in this daemon, to the cutover.
    faults.clear();
    let st = r.ds.pause_relocation("vm", false).unwrap();
    assert_ne!(st.state, State::Failed, "{st:?}");
    let st = settled(&r, "vm", State::Done);
    assert!(st.error.is_none(), "{st:?}");
    let d = disk(&r, "vm");
    assert!(d.is_switched());
    assert!(std::fs::read(primary.join("vm/disk0.raw")).unwrap() == data);
    assert!(primary.join("vm/vm.json").exists());
    r.ds.release("vm", false).unwrap();
}

/// A failed relocation (target full, then room made) whose reopen by a
/// resume takes a while (every open of the target file is held up), and
/// whose copy too (each target write: 16 blocks, no cutover for 0.8 s).
fn failed_relocation_with_a_slow_reopen(vm: &str) -> (Rig, FaultyStorage, PathBuf) {
    let (r, faults, primary) = relocation_failed_for_enospc(vm);
    faults.clear();
    let slow = |op| Rule::delay(op, "/disk0.raw", Duration::from_millis(300));
    faults.inject(slow(Op::Open));
    faults.inject(Rule::delay(
        Op::Write,
        "/disk0.raw",
        Duration::from_millis(50),
    ));
    (r, faults, primary)
}

#[test]
fn a_resume_of_a_failed_relocation_racing_a_cancel_ends_cancelled_either_way() {
    for cancel_first in [false, true] {
        let (r, _faults, primary) = failed_relocation_with_a_slow_reopen("vm");
        let ds = r.ds.clone();
        let (first, second) = if cancel_first { (100, 0) } else { (0, 100) };
        let resume = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(first));
            ds.pause_relocation("vm", false)
        });
        std::thread::sleep(Duration::from_millis(second));
        let cancelled = r.ds.cancel_relocation("vm", false).unwrap();
        let resumed = resume.join().unwrap();
        eprintln!("cancel first: {cancel_first}; resume: {resumed:?}");
        match resumed {
            // Retried first, then that relocation cancelled.
            Ok(st) => assert!(!cancel_first, "{st:?}"),
            Err(e) => {
                assert!(cancel_first, "{e}");
                assert_eq!(e.kind(), crate::error::ErrorKind::NotFound, "{e}");
            }
        }
        // One state: no relocation shown, recorded, copying or left.
        assert!(relocation_status(&r, "vm").is_none());
        let s = r.ds.session("vm").unwrap();
        assert!(!s.dir.join("relocation.json").exists());
        assert!(!s.dir.join("disk0.copied").exists());
        assert!(
            cancelled.removed.contains(&primary.join("vm/disk0.raw")),
            "{cancelled:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(!primary.join("vm").exists(), "a copier left writing");
        assert!(!disk(&r, "vm").is_switched());
        let e = r.ds.pause_relocation("vm", false).unwrap_err().to_string();
        assert!(e.contains("not being relocated"), "{e}");
        r.ds.release("vm", false).unwrap();
    }
}

#[test]
fn resumes_of_a_failed_relocation_racing_each_other_and_a_pause_leave_one_relocation() {
    let (r, _faults, primary) = failed_relocation_with_a_slow_reopen("vm");
    let data = disk(&r, "vm").read(0, 16 * BS).unwrap();
    let racing: Vec<_> = [false, false, true]
        .into_iter()
        .map(|pause| {
            let ds = r.ds.clone();
            std::thread::spawn(move || (pause, ds.pause_relocation("vm", pause)))
        })
        .collect();
    for h in racing {
        match h.join().unwrap() {
            // Each resume retried it or found it retried (running, or
            // paused by the pause that came between).
            (false, st) => assert_ne!(st.unwrap().state, State::Failed),
            // The pause found it retried, or came first and found it failed.
            (true, Ok(st)) => assert_eq!(st.state, State::Paused),
            (true, Err(e)) => assert!(e.to_string().contains("failed ("), "{e}"),
        }
    }
    // One relocation, its state the one its record says.
    let s = r.ds.session("vm").unwrap();
    assert!(s.relocation_not_resumed.lock().is_none());
    let st = relocation_status(&r, "vm").unwrap();
    let record = std::fs::read_to_string(s.dir.join("relocation.json")).unwrap();
    let paused = record.contains("\"paused\": true");
    assert_eq!(st.state == State::Paused, paused, "{st:?} / {record}");
    assert_ne!(st.state, State::Failed, "{st:?}");
    r.ds.pause_relocation("vm", false).unwrap();
    settled(&r, "vm", State::Done);
    assert!(std::fs::read(primary.join("vm/disk0.raw")).unwrap() == data);
    r.ds.release("vm", false).unwrap();
}

/// Two sessions of one VM (two backups) relocated into one directory: the
/// later, with `--force`, took the files over and cut over to them. The
/// earlier, recovered again (as the several-kept-sessions refusal
/// suggests), must neither resume into that copy nor remove it when
/// discarded.
#[test]
fn an_earlier_relocation_never_resumes_into_or_removes_files_a_later_one_took_with_force() {
    let r = rig();
    let (x, _) = backup(&r, "vm", 61, 16);
    std::thread::sleep(Duration::from_millis(1100));
    let (y, ydata) = backup(&r, "vm", 62, 16);
    assert_ne!(x, y);
    let primary = r.dir.path().join("primary");
    std::fs::create_dir(&primary).unwrap();
    r.ds.recover("vm", Some(&x)).unwrap();
    r.ds.relocate("vm", &primary, Some(0.001), false).unwrap();
    r.ds.release("vm", false).unwrap();
    r.ds.recover("vm", Some(&y)).unwrap();
    r.ds.relocate("vm", &primary, None, true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relocation_status(&r, "vm").unwrap().state != State::Done {
        assert!(Instant::now() < deadline, "relocation did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    r.ds.release("vm", false).unwrap();
    let disk = primary.join("vm/disk0.raw");
    assert_eq!(std::fs::read(&disk).unwrap(), ydata);
    // As if the later one were still copying (no vm.json yet): only the
    // owner marks tell the two apart.
    std::fs::remove_file(primary.join("vm/vm.json")).unwrap();
    r.ds.recover("vm", Some(&x)).unwrap();
    let st = relocation_status(&r, "vm").expect("shown");
    assert_eq!(st.state, State::NotResumed, "{st:?}");
    assert!(st.error.unwrap().contains("another relocation's"));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(std::fs::read(&disk).unwrap(), ydata, "written into");
    let e = r.ds.release("vm", true).unwrap_err().to_string();
    assert!(e.contains("another relocation's"), "{e}");
    assert_eq!(std::fs::read(&disk).unwrap(), ydata, "removed or written");
}
