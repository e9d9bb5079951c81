//! A VM another daemon serves or keeps is not recovered a second time
//! without being asked (explore1 M8): two writable copies would drift
//! apart, and the guest writes kept there would not be seen here.

use super::*;
use crate::repo::pins::{self, Pin};

/// A second daemon's datastore on the rig's repository, with its own
/// staging directory (`<rig>/<name>/staging`) on the same host.
fn other_daemon(r: &Rig, name: &str) -> Arc<Datastore> {
    let d = r.dir.path().join(name);
    std::fs::create_dir_all(&d).unwrap();
    datastore(&d, &r.repo, &[])
}

fn pins(r: &Rig) -> Vec<crate::repo::pins::Pin> {
    crate::repo::pins::of_vm(&r.repo, "vm").unwrap()
}

#[test]
fn a_vm_served_by_another_daemon_is_refused_with_where_and_recovered_only_with_second_copy() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    let there = r.ds.session("vm").unwrap().dir.display().to_string();
    let other = other_daemon(&r, "b");
    let e = other.recover("vm", None).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
    let msg = e.to_string();
    assert_eq!(msg.lines().count(), 1, "{msg}");
    for part in [
        "VM vm is served by a recoverfs daemon on host",
        &there,
        "--second-copy",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    // Nothing of the refused attempt is left: no session, no pin.
    assert!(other.session("vm").is_none());
    assert_eq!(pins(&r).len(), 1);
    let req = PlaceRequest::default();
    other.recover_second_copy("vm", None, &req, true).unwrap();
    assert!(other.session("vm").is_some());
    assert_eq!(pins(&r).len(), 2);
    // The first daemon, asked again, serves its own session as before.
    assert!(r.ds.recover("vm", None).is_ok());
}

#[test]
fn a_vm_kept_by_another_daemon_is_refused_until_that_staging_is_discarded() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", false).unwrap();
    let other = other_daemon(&r, "b");
    let e = other.recover("vm", Some(&b1)).unwrap_err();
    assert!(e.to_string().contains("has kept staging"), "{e}");
    // Its own kept staging resumes as before.
    r.ds.recover("vm", None).unwrap();
    r.ds.release("vm", true).unwrap();
    other.recover("vm", Some(&b1)).unwrap();
}

#[test]
fn a_throwaway_recovery_of_the_vm_elsewhere_does_not_stop_a_recovery() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    // What `files` or `verify-boot` put, from a live process, on another
    // host (so that only its owner tells it apart).
    let mut pin =
        crate::repo::pins::Pin::new("vm", vec![b1.clone()], &r.dir.path().join("t"), true);
    pin.owner = Some(crate::repo::locks::this_process());
    pin.host = "other-host".into();
    crate::repo::pins::put(&r.repo, &pin).unwrap();
    r.ds.recover("vm", Some(&b1)).unwrap();
}

#[test]
fn a_throwaway_recovery_of_a_vm_another_daemon_serves_or_keeps_is_not_refused() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    // `files` and `verify-boot` recover in a throwaway datastore.
    let scratch = other_daemon(&r, "files");
    scratch.set_throwaway();
    scratch.recover("vm", Some(&b1)).unwrap();
    scratch.release("vm", true).unwrap();
    r.ds.release("vm", false).unwrap();
    let scratch = other_daemon(&r, "verify");
    scratch.set_throwaway();
    scratch.recover("vm", Some(&b1)).unwrap();
    // The same from a daemon is refused.
    assert!(other_daemon(&r, "c").recover("vm", Some(&b1)).is_err());
}

#[test]
fn a_kept_session_in_the_main_staging_resumes_when_every_point_has_its_own() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", false).unwrap();
    // Restarted with one point staging elsewhere: the kept session stays
    // in the main staging, which is still this daemon's.
    let r = restart(r, &[("d", Some("ssd"))]);
    let info = r.ds.recover("vm", None).unwrap();
    assert!(info.resumed, "{info:?}");
}

#[test]
fn a_damaged_pin_beside_another_daemons_is_passed_over_and_the_other_still_refuses() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    let plain = crate::repo::backend::LocalDir::new(&r.dir.path().join("repo"));
    use crate::repo::backend::Backend;
    plain
        .put("pins/vm/0000000000000000.json", b"{damaged")
        .unwrap();
    let e = other_daemon(&r, "b").recover("vm", None).unwrap_err();
    assert!(
        e.to_string().contains("is served by a recoverfs daemon"),
        "{e}"
    );
}

#[test]
fn a_refusal_shows_control_characters_of_a_forged_pin_escaped_on_one_line() {
    let mut pin = crate::repo::pins::Pin::new("vm", vec!["b".into()], Path::new("/s/x\ny"), true);
    pin.host = "h\r\nFAKE".into();
    let msg = super::super::pinning::recovered_elsewhere("vm", &pin, "/r");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert!(msg.contains("host h\\r\\nFAKE in /s/x\\ny"), "{msg}");
}

#[test]
fn a_session_of_this_host_whose_staging_directory_is_gone_does_not_stop_a_recovery() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    let gone = r.dir.path().join("gone/staging/sessions/vm").join(&b1);
    std::fs::create_dir_all(&gone).unwrap();
    let pin = crate::repo::pins::Pin::new("vm", vec![b1.clone()], &gone, true);
    crate::repo::pins::put(&r.repo, &pin).unwrap();
    assert!(r.ds.recover("vm", Some(&b1)).is_err());
    std::fs::remove_dir_all(r.dir.path().join("gone")).unwrap();
    // Not silently: the administrator is told what was passed over.
    let info = r.ds.recover("vm", Some(&b1)).unwrap();
    assert_eq!(info.warnings.len(), 1, "{info:?}");
    let w = &info.warnings[0];
    assert!(
        w.contains("had a session on this host in") && w.contains("not there now"),
        "{w}"
    );
}

/// Two daemons of this host recovering one VM at once: each puts its pin
/// before it makes its session directory, so one may find the other's pin
/// naming a directory not there yet. That is a session being made, not a
/// disk not mounted: refused, never both recovered (explore3 HIGH).
#[test]
fn a_pin_another_running_daemon_of_this_host_just_put_refuses_before_its_directory_exists() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    let other = other_daemon(&r, "b");
    let staging = other.stagings.main().clone();
    let pinned = other.pin_new_session("vm", &b1, &staging).unwrap();
    assert!(!staging.session_dir("vm", &b1).exists());
    let e = r.ds.recover("vm", Some(&b1)).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
    assert!(r.ds.session("vm").is_none());
    drop(pinned);
    r.ds.recover("vm", Some(&b1)).unwrap();
}

#[test]
fn a_mistyped_backup_of_a_served_vm_is_unknown_not_release_it_first() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    let e = r.ds.recover("vm", Some("20991231-000000")).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("unknown backup"), "{e}");
    let (b2, _) = backup(&r, "vm", 2, 4);
    let e = r.ds.recover("vm", Some(&b2)).unwrap_err();
    assert!(e.to_string().contains("release it first"), "{e}");
}

#[test]
fn a_vm_kept_in_a_staging_no_daemon_serves_is_refused_naming_that_directory() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", false).unwrap();
    let root = r.ds.staging_root().to_path_buf();
    // Its daemon stopped: nothing holds the staging's lock.
    drop(r.ds);
    let other = {
        let d = r.dir.path().join("b");
        std::fs::create_dir_all(&d).unwrap();
        datastore(&d, &r.repo, &[])
    };
    let e = other.recover("vm", None).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("a staging directory no running daemon serves"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("--staging {}", root.display())),
        "{msg}"
    );
}

/// `r` restarted on a host now called `name` (renamed since).
fn restart_as(mut r: Rig, name: &str) -> Rig {
    r.ds.flush_all().unwrap();
    drop(r.ds);
    r.ds = datastore(r.dir.path(), &r.repo, &[]);
    r.ds.set_host(name);
    r.ds.resume_active();
    r
}

#[test]
fn a_daemon_of_the_same_host_name_and_staging_path_keeps_its_own_pin_and_refuses_a_second_copy() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    // Another machine of this name whose staging has the same path (a
    // clone, a container) serves the VM: its pin names the session
    // directory this daemon would use, and its own staging's id.
    let there = other_daemon(&r, "b");
    let there_id = there.stagings.main().id().to_string();
    let here = r.ds.stagings.main().session_dir("vm", &b1);
    let theirs = Pin::new("vm", vec![b1.clone()], &here, true).in_staging(&there_id);
    assert_eq!(theirs.host, r.ds.host());
    pins::put(&r.repo, &theirs).unwrap();
    let e = r.ds.recover("vm", Some(&b1)).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
    assert!(
        e.to_string().contains("is served by a recoverfs daemon"),
        "{e}"
    );
    // The refused attempt took its own pin back, not the other's.
    assert_eq!(pins(&r), std::slice::from_ref(&theirs));
    // Asked for a second copy, each daemon has its own pin, and the other
    // rewriting (its release) or removing its own (its discard) leaves
    // this one's: the backup this session reads stays protected.
    let req = PlaceRequest::default();
    r.ds.recover_second_copy("vm", Some(&b1), &req, true)
        .unwrap();
    assert_eq!(pins(&r).len(), 2, "{:?}", pins(&r));
    let mut kept = theirs.clone();
    kept.state = "kept".into();
    pins::put(&r.repo, &kept).unwrap();
    assert_eq!(pins(&r).len(), 2, "{:?}", pins(&r));
    pins::remove(&r.repo, &kept).unwrap();
    let left = pins(&r);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        left[0].staging_id.as_deref(),
        Some(r.ds.stagings.main().id())
    );
    assert_eq!(left[0].state, "serving");
}

#[test]
fn a_renamed_host_resumes_its_own_sessions_and_leaves_no_pin_under_its_old_name() {
    let r = rig();
    r.ds.set_host("old-name");
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", false).unwrap();
    // Restarted after the host was renamed: its kept staging is its own.
    let r = restart_as(r, "new-name");
    let info = r.ds.recover("vm", None).unwrap();
    assert!(info.resumed, "{info:?}");
    let hosts = |r: &Rig| -> Vec<(String, String)> {
        pins(r).into_iter().map(|p| (p.host, p.state)).collect()
    };
    assert_eq!(hosts(&r), [("new-name".into(), "serving".into())]);
    // Served across another rename (resumed at the restart): still one.
    let r = restart_as(r, "third-name");
    assert!(r.ds.session("vm").is_some());
    assert_eq!(hosts(&r), [("third-name".into(), "serving".into())]);
    r.ds.release("vm", true).unwrap();
    assert!(pins(&r).is_empty(), "{:?}", pins(&r));
}

#[test]
fn a_pin_from_before_staging_ids_still_protects_its_backup_and_is_replaced_when_pinned_again() {
    let r = rig();
    let (b1, data) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", false).unwrap();
    // The pin as a daemon before staging ids wrote it: no id, its key of
    // the host name and the session directory.
    let [ours] = &pins(&r)[..] else {
        panic!("{:?}", pins(&r))
    };
    pins::remove(&r.repo, ours).unwrap();
    let old = serde_json::json!({
        "vm": "vm", "backups": [b1], "host": ours.host, "staging": ours.staging,
        "state": "kept", "written": ours.written,
    });
    let hash = blake3::hash(format!("{}\0{}", ours.host, ours.staging).as_bytes()).to_hex();
    let plain = crate::repo::backend::LocalDir::new(&r.dir.path().join("repo"));
    use crate::repo::backend::Backend;
    plain
        .put(
            &format!("pins/vm/{}.json", &hash[..16]),
            old.to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(pins(&r)[0].staging_id, None);
    // forget keeps its backup, so gc keeps the chunks of the blocks the
    // kept staging never fetched.
    backup(&r, "vm", 2, 4);
    let opts = crate::repo::forget::ForgetOptions {
        vm: Some("vm".into()),
        policy: crate::repo::retention::Policy {
            last: 1,
            ..Default::default()
        },
        dry_run: false,
        force: false,
    };
    let f = crate::repo::forget::forget(&r.repo, &opts).unwrap();
    assert_eq!(f.removed, 0, "{f:?}");
    let gc = crate::repo::gc::GcOptions {
        dry_run: false,
        wait: Duration::ZERO,
    };
    crate::repo::gc::collect(&r.repo, &[crate::repo::gc::MANIFESTS], gc).unwrap();
    // Its staging directory as set up before ids: it gets one at the
    // daemon's next start, and the session is resumed only after another.
    let marker = main_staging(&r).join("staging.json");
    let mut info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
    info.as_object_mut().unwrap().remove("id");
    std::fs::write(&marker, info.to_string()).unwrap();
    let r = restart(r, &[]);
    let r = restart(r, &[]);
    // This daemon's by host and path: resumed, not refused.
    let info = r.ds.recover("vm", None).unwrap();
    assert!(info.resumed, "{info:?}");
    assert_eq!(disk(&r, "vm").read(0, data.len()).unwrap(), data);
    // Pinned again with its staging's id: the old pin is gone.
    let left = pins(&r);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        left[0].staging_id.as_deref(),
        Some(r.ds.stagings.main().id())
    );
}

#[test]
fn a_session_that_cannot_be_resumed_after_a_restart_is_pinned_as_kept_not_served() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    assert_eq!(pins(&r)[0].state, "serving");
    let dir = r.ds.stagings.main().session_dir("vm", &b1);
    r.ds.flush_all().unwrap();
    drop(r.ds);
    // Its manifest gone from staging and repository while the daemon was
    // down (removed by hand): the session does not resume.
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    r.repo
        .backend()
        .delete(&format!("backups/vm/{b1}.json"))
        .unwrap();
    let ds = datastore(r.dir.path(), &r.repo, &[]);
    assert!(ds.resume_active().is_empty());
    let p = crate::repo::pins::of_vm(&r.repo, "vm").unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].state, "kept", "{:?}", p[0]);
    assert_eq!(p[0].backups, vec![b1.clone()]);
}

#[test]
fn a_served_session_whose_session_json_was_damaged_is_pinned_as_kept_at_the_restart() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    let dir = r.ds.stagings.main().session_dir("vm", &b1);
    r.ds.flush_all().unwrap();
    drop(r.ds);
    std::fs::write(dir.join("session.json"), b"{ damaged").unwrap();
    let ds = datastore(r.dir.path(), &r.repo, &[]);
    assert!(ds.resume_active().is_empty());
    let p = crate::repo::pins::of_vm(&r.repo, "vm").unwrap();
    assert_eq!(p[0].state, "kept", "{:?}", p[0]);
}

#[test]
fn release_naming_a_backup_touches_only_that_backups_staging_whichever_session_is_served() {
    let r = rig();
    let (b1, _) = backup(&r, "vm", 1, 4);
    let (b2, _) = backup(&r, "vm", 2, 4);
    r.ds.recover("vm", Some(&b1)).unwrap();
    r.ds.release("vm", false).unwrap();
    r.ds.recover("vm", Some(&b2)).unwrap();
    let main = r.ds.stagings.main().clone();
    // Not served, without discard: nothing to release, nothing touched.
    let e = r.ds.release_backup("vm", &b1, false).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::NotFound, "{e}");
    assert!(main.session_dir("vm", &b1).exists());
    // b1's kept staging goes; b2 stays served.
    assert_eq!(
        r.ds.release_backup("vm", &b1, true).unwrap(),
        (false, vec![b1.clone()], None)
    );
    assert!(!main.session_dir("vm", &b1).exists());
    assert_eq!(r.ds.session("vm").unwrap().backup, b2);
    // Naming the served backup releases it (kept without discard).
    assert_eq!(
        r.ds.release_backup("vm", &b2, false).unwrap(),
        (true, vec![], None)
    );
    assert!(r.ds.session("vm").is_none());
    assert!(main.session_dir("vm", &b2).exists());
    // Gone: said, and b2's kept staging is not taken for it.
    let e = r.ds.release_backup("vm", &b1, true).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::NotFound, "{e}");
    assert!(main.session_dir("vm", &b2).exists());
}
