//! A kept session's pin that its release could not write (a repository
//! full or read-only) is owed on disk, and written by a later check of
//! any daemon serving that staging (explore10 H1).

use super::*;
use crate::repo::pins;

/// The pin of `vm` in the repository: its backups and state.
fn pin_of(r: &Rig, vm: &str) -> Vec<(Vec<String>, String)> {
    let mut p: Vec<_> = pins::of_vm(&r.repo, vm)
        .unwrap()
        .into_iter()
        .map(|p| (p.backups, p.state))
        .collect();
    p.sort();
    p
}

/// explore10 H1: released while the repository took no writes, the kept
/// staging was never pinned afterwards (the owed pin lived in the
/// released session's memory), so `forget` and `gc` took its backup.
#[test]
fn a_kept_pin_the_release_could_not_write_is_written_by_the_next_check() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    r.knobs.unreachable("pins/");
    r.ds.recover("vm", Some(&b1)).unwrap();
    disk(&r, "vm").write(0, b"the guest wrote this").unwrap();
    r.ds.release("vm", false).unwrap();
    assert!(r.ds.kept_pin_owed("vm", &b1));
    let listed = crate::staging::inventory::list(&main_staging(&r)).unwrap();
    assert!(listed[0].pin_owed, "staging ls hides it: {listed:?}");
    r.ds.check_backups();
    assert!(
        r.ds.kept_pin_owed("vm", &b1),
        "owed while the store refuses"
    );

    r.knobs.reachable();
    r.ds.check_backups();
    assert_eq!(
        pin_of(&r, "vm"),
        vec![(vec![b1.clone()], "kept".to_string())]
    );
    assert!(!r.ds.kept_pin_owed("vm", &b1));
    let listed = crate::staging::inventory::list(&main_staging(&r)).unwrap();
    assert!(!listed[0].pin_owed);
}

/// The owed pin outlives the daemon: a restarted one, which does not
/// resume the released session, writes it at its first check.
#[test]
fn a_kept_pin_still_owed_when_the_daemon_stops_is_written_by_the_next_daemon() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    r.knobs.unreachable("pins/");
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", false).unwrap();
    let r = restart(r, &[]);
    assert!(
        r.ds.session("vm").is_none(),
        "a released session was resumed"
    );
    r.knobs.reachable();
    assert!(pin_of(&r, "vm").is_empty());
    r.ds.check_backups();
    assert_eq!(
        pin_of(&r, "vm"),
        vec![(vec![b1.clone()], "kept".to_string())]
    );
    // Resumed later: its pin says serving again, nothing is owed.
    r.ds.recover("vm", None).unwrap();
    assert_eq!(
        pin_of(&r, "vm"),
        vec![(vec![b1.clone()], "serving".to_string())]
    );
    assert!(!r.ds.kept_pin_owed("vm", &b1));
}

/// review29 M1: the VM recovered again from another backup while the
/// kept staging still owed its pin: the check passed over every VM served,
/// so the kept backup stayed unpinned as long as the new session lived.
#[test]
fn a_kept_pin_owed_while_the_vm_is_served_from_another_backup_is_written() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    let (b2, _) = backup(&r, "vm", 2, 8);
    r.knobs.unreachable("pins/");
    r.ds.recover("vm", Some(&b1)).unwrap();
    disk(&r, "vm").write(0, b"the guest wrote this").unwrap();
    r.ds.release("vm", false).unwrap();
    r.knobs.reachable();
    r.ds.recover("vm", Some(&b2)).unwrap();
    r.ds.check_backups();
    assert_eq!(
        pin_of(&r, "vm"),
        vec![
            (vec![b1.clone()], "kept".to_string()),
            (vec![b2.clone()], "serving".to_string())
        ]
    );
    assert!(!r.ds.kept_pin_owed("vm", &b1));
}

/// The pin removals owed in the rig's staging: (VM, backup).
fn owed(r: &Rig) -> Vec<(String, String)> {
    (r.ds.stagings()[0].owed_unpins().into_iter())
        .map(|(vm, b, _)| (vm, b))
        .collect()
}

/// A session of `vm` recovered, released, then discarded while the
/// repository refused pin changes: its removal is owed.
fn discarded_while_pins_are_refused() -> (Rig, String) {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", false).unwrap();
    r.knobs.unreachable("pins/");
    r.ds.discard_kept("vm").unwrap();
    r.knobs.reachable();
    (r, b1)
}

/// explore11 M1: a discard while the repository refused writes left the
/// session's pin (still `serving`) for good: `forget` kept its backup for
/// ever. The removal is owed in staging and made by a later check.
#[test]
fn a_pin_a_discard_could_not_remove_is_removed_by_a_later_check() {
    let (r, b1) = discarded_while_pins_are_refused();
    assert_eq!(pin_of(&r, "vm").len(), 1, "the refused removal left it");
    r.ds.check_backups();
    assert!(pin_of(&r, "vm").is_empty(), "the owed removal was not made");
    assert!(owed(&r).is_empty(), "the removal made, its debt stays");
    // Paid once: a later recover's pin is not removed by it.
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.check_backups();
    assert_eq!(pin_of(&r, "vm").len(), 1);
}

/// An owed removal whose session was made again in the same staging
/// directory (same pin key) is dropped, and the new session's pin kept.
#[test]
fn an_owed_pin_removal_is_dropped_when_its_session_is_recovered_again_first() {
    let (r, b1) = discarded_while_pins_are_refused();
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.check_backups();
    assert_eq!(
        pin_of(&r, "vm"),
        vec![(vec![b1.clone()], "serving".to_string())]
    );
    r.ds.check_backups();
    assert_eq!(pin_of(&r, "vm").len(), 1);
}

/// A discard whose pin removal fails owes it; and (review30 L1) the debt
/// is written before the staging goes: a crash (SIGKILL) after the
/// discard, while the removal hangs on the store, left a `serving` pin
/// that nothing removed, and `forget` kept its backup for ever.
#[test]
fn the_removal_of_a_discarded_sessions_pin_is_owed_before_the_discard() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    r.ds.recover("vm", Some(&b1)).unwrap();
    let staging = r.ds.stagings()[0].clone();
    let dir = staging.session_dir("vm", &b1);
    let debt = staging.owed_unpin_file("vm", &b1);
    // The daemon "dies" as the removal reaches the store: what is on disk.
    let seen = Arc::new(Mutex::new(None));
    let at_removal = seen.clone();
    r.knobs.before_first("pins/", move || {
        *at_removal.lock() = Some((dir.exists(), debt.exists()));
    });
    r.knobs.unreachable("pins/");
    r.ds.release("vm", true).unwrap();
    assert_eq!(
        *seen.lock(),
        Some((false, true)),
        "(staging left, debt written) when the removal began"
    );
    assert_eq!(owed(&r), vec![("vm".to_string(), b1.clone())]);
    r.knobs.reachable();
    assert_eq!(pin_of(&r, "vm").len(), 1, "the refused removal left it");
    r.ds.check_backups();
    assert!(pin_of(&r, "vm").is_empty() && owed(&r).is_empty());
}

/// A removal made at the discard leaves no debt.
#[test]
fn a_discard_whose_pin_is_removed_owes_nothing() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 8);
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", true).unwrap();
    assert!(pin_of(&r, "vm").is_empty() && owed(&r).is_empty());
}

/// review30 L2: an owed removal that does not parse was dropped, and with
/// it the only trace of the pin left: it stays, and is warned of.
#[test]
fn an_owed_pin_removal_that_cannot_be_read_stays() {
    let (r, b1) = discarded_while_pins_are_refused();
    let file = r.ds.stagings()[0].owed_unpin_file("vm", &b1);
    std::fs::write(&file, b"{not a pin").unwrap();
    r.ds.check_backups();
    r.ds.check_backups();
    assert!(file.exists(), "dropped");
    assert_eq!(owed(&r), vec![("vm".to_string(), b1)]);
    assert_eq!(pin_of(&r, "vm").len(), 1);
}

/// review30 L3: an owed removal held the VM's operation lock while it
/// waited on the store (up to a minute on one that does not answer, at
/// every check): the VM's operations waited with it. Made without it.
#[test]
fn an_owed_pin_removal_does_not_hold_the_vms_operations() {
    let (r, _) = discarded_while_pins_are_refused();
    let free = Arc::new(Mutex::new(None));
    let (seen, ds) = (free.clone(), r.ds.clone());
    r.knobs.before_first("pins/", move || {
        *seen.lock() = Some(ds.vm_op("vm").try_lock().is_some());
    });
    r.ds.check_backups();
    assert_eq!(
        *free.lock(),
        Some(true),
        "the lock was held over the removal"
    );
    assert!(pin_of(&r, "vm").is_empty() && owed(&r).is_empty());
}

/// ... and the session recovered again in that very staging while the
/// removal ran (its pin has the same key, which the removal took) has its
/// pin written again.
#[test]
fn a_session_recovered_again_during_an_owed_removal_keeps_its_pin() {
    let (r, b1) = discarded_while_pins_are_refused();
    let (ds, b) = (r.ds.clone(), b1.clone());
    r.knobs.before_first("pins/", move || {
        // Not with the lock held (before the fix): that would deadlock.
        if ds.vm_op("vm").try_lock().is_some() {
            ds.recover("vm", Some(&b)).unwrap();
        }
    });
    r.ds.check_backups();
    assert_eq!(
        pin_of(&r, "vm"),
        vec![(vec![b1.clone()], "serving".to_string())]
    );
    assert!(owed(&r).is_empty());
    // Paid: a later check leaves the pin.
    r.ds.check_backups();
    assert_eq!(pin_of(&r, "vm").len(), 1);
}

/// ... also when an operation on the VM holds its lock as the removal
/// ends: the next check writes the pin again.
#[test]
fn a_session_recovered_again_during_an_owed_removal_is_looked_at_by_the_next_check() {
    let (r, b1) = discarded_while_pins_are_refused();
    let (ds, b) = (r.ds.clone(), b1.clone());
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
    let holder = Arc::new(Mutex::new(None));
    let slot = holder.clone();
    r.knobs.before_first("pins/", move || {
        // Not with the lock held (before the fix): that would deadlock.
        if ds.vm_op("vm").try_lock().is_none() {
            return;
        }
        ds.recover("vm", Some(&b)).unwrap();
        // An operation on the VM still runs when the removal ends.
        *slot.lock() = Some(std::thread::spawn(move || {
            let op = ds.vm_op("vm");
            let _op = op.lock();
            held_tx.send(()).unwrap();
            end_rx.recv().ok();
        }));
        held_rx.recv().unwrap();
    });
    r.ds.check_backups();
    assert!(pin_of(&r, "vm").is_empty(), "the removal took it");
    end_tx.send(()).ok();
    let holder = holder.lock().take();
    holder
        .expect("recovered during the removal")
        .join()
        .unwrap();
    r.ds.check_backups();
    assert_eq!(
        pin_of(&r, "vm"),
        vec![(vec![b1.clone()], "serving".to_string())]
    );
    assert!(owed(&r).is_empty());
}

/// review32 L7: a session recovered again while an owed removal ran, and
/// the removal took its pin; the daemon died before it looked again. What
/// was looked at lived in memory only, so the next daemon dropped the debt
/// and left the session unpinned (`forget` and `gc` could take its
/// backup). Now any check that finds the session made again writes its pin.
#[test]
fn a_session_whose_pin_an_owed_removal_took_before_a_crash_is_pinned_again() {
    let (r, b1) = discarded_while_pins_are_refused();
    r.ds.recover("vm", Some(&b1)).unwrap();
    // The removal the dead daemon made, after the recover's pin write.
    for p in pins::of_vm(&r.repo, "vm").unwrap() {
        pins::remove(&r.repo, &p).unwrap();
    }
    assert!(pin_of(&r, "vm").is_empty());
    r.ds.check_backups();
    assert_eq!(
        pin_of(&r, "vm"),
        vec![(vec![b1.clone()], "serving".to_string())]
    );
    assert!(owed(&r).is_empty());
}
