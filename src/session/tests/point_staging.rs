//! Export points with their own staging directories: where a session's
//! files go, where kept staging resumes, and what a restart serves where.

use super::*;

#[test]
fn a_new_session_never_shows_side_files_a_half_removed_session_left() {
    let r = rig();
    let (id, _) = backup(&r, "vm", 1, 4);
    // What a crash during an older daemon's discard could leave: no
    // session.json, a hypervisor's side file.
    let dir = main_staging(&r).join("sessions/vm").join(&id);
    std::fs::create_dir_all(dir.join("files")).unwrap();
    std::fs::write(dir.join("files/web01.vmx"), b"old").unwrap();
    let info = r.ds.recover("vm", None).unwrap();
    assert!(!info.resumed);
    assert!(
        !dir.join("files/web01.vmx").exists(),
        "a new session shows a discarded session's side file"
    );
}

#[test]
fn a_session_on_a_point_with_its_own_staging_writes_its_files_there_and_not_in_the_main_staging() {
    let r = rig_with(POINTS);
    let (b, _) = backup(&r, "vm", 11, 4);
    let info = r.ds.recover_placed("vm", None, &at("b")).unwrap();
    assert_eq!(info.export_point, "b");
    let s = r.ds.session("vm").unwrap();
    assert!(s.dir.starts_with(ssd(&r)), "{}", s.dir.display());
    s.disks[0].write(10, b"on the other disk").unwrap();
    s.disks[0].flush().unwrap();
    let dir = ssd(&r).join("sessions/vm").join(&b);
    for f in [
        "disk0.data",
        "disk0.present",
        "disk0.changed",
        "session.json",
        "manifest.json",
        "active",
    ] {
        assert!(dir.join(f).exists(), "{f} is not under the point's staging");
    }
    assert!(
        !main_staging(&r).join("sessions/vm").exists(),
        "the session wrote into the main staging"
    );
    let st = r.ds.point_status();
    let staging_of = |n: &str| st.iter().find(|p| p.name == n).unwrap().staging.clone();
    assert_eq!(staging_of("b"), ssd(&r));
    assert_eq!(staging_of("c"), ssd(&r));
    assert_eq!(staging_of("a"), main_staging(&r));
    drop(s);
    r.ds.release("vm", false).unwrap();
    assert!(
        !dir.join("active").exists(),
        "release left it marked active"
    );
    assert!(
        dir.join("disk0.data").exists(),
        "release dropped kept staging"
    );
}

#[test]
fn kept_staging_in_a_points_directory_resumes_and_auto_placement_stays_among_the_points_staging_there(
) {
    let r = rig_with(POINTS);
    let (b, _) = backup(&r, "vm", 12, 4);
    backup(&r, "fresh", 13, 4);
    r.ds.recover_placed("vm", None, &at("b")).unwrap();
    disk(&r, "vm").write(0, b"kept on b's disk").unwrap();
    r.ds.release("vm", false).unwrap();

    let info = r.ds.recover("vm", None).unwrap();
    assert!(["b", "c"].contains(&info.export_point.as_str()), "{info:?}");
    assert_eq!((info.backup.as_str(), info.resumed), (b.as_str(), true));
    assert_eq!(disk(&r, "vm").read(0, 16).unwrap(), b"kept on b's disk");
    let d = info.placement.unwrap();
    let names: Vec<&str> = d
        .candidates
        .iter()
        .filter(|c| c.eligible)
        .map(|c| c.figures.name.as_str())
        .collect();
    assert_eq!(names, ["b", "c"], "{d:?}");
    let a = &d.candidates[0];
    assert_eq!(a.figures.name, "a");
    assert!(a
        .figures
        .unavailable
        .as_deref()
        .unwrap()
        .contains("kept staging"));
    assert!(d.note.unwrap().contains(ssd(&r).to_str().unwrap()));
    r.ds.release("vm", false).unwrap();
    // The same idle daemon places a VM without kept staging on `a`.
    let info = r.ds.recover("fresh", None).unwrap();
    assert_eq!(info.export_point, "a");
    assert!(info.placement.unwrap().note.is_none());
}

#[test]
fn a_named_point_staging_elsewhere_is_refused_for_a_vm_with_kept_staging_until_it_is_discarded() {
    let r = rig_with(POINTS);
    let (b, _) = backup(&r, "vm", 14, 4);
    r.ds.recover_placed("vm", None, &at("b")).unwrap();
    disk(&r, "vm").write(0, b"kept").unwrap();
    r.ds.release("vm", false).unwrap();

    let e = r.ds.recover_placed("vm", None, &at("a")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "VM vm has kept staging under {}",
            ssd(&r).display()
        )) && msg.contains("export point b or c")
            && msg.contains("release --discard vm"),
        "{msg}"
    );
    assert!(r.ds.session("vm").is_none(), "a refused recovery started");
    // A point sharing the directory resumes it.
    let info = r.ds.recover_placed("vm", None, &at("c")).unwrap();
    assert_eq!((info.export_point.as_str(), info.resumed), ("c", true));
    assert_eq!(disk(&r, "vm").read(0, 4).unwrap(), b"kept");
    r.ds.release("vm", false).unwrap();

    assert_eq!(r.ds.discard_kept("vm").unwrap(), vec![b.clone()]);
    assert!(!ssd(&r).join("sessions/vm").join(&b).exists());
    let info = r.ds.recover_placed("vm", None, &at("a")).unwrap();
    assert_eq!((info.export_point.as_str(), info.resumed), ("a", false));
    assert!(r
        .ds
        .session("vm")
        .unwrap()
        .dir
        .starts_with(main_staging(&r)));
}

/// Backs `vm` up, recovers it at `point` and writes `bytes` at offset 5.
fn write_at(r: &Rig, vm: &str, point: &str, seed: u64, bytes: &[u8]) {
    backup(r, vm, seed, 4);
    r.ds.recover_placed(vm, None, &at(point)).unwrap();
    disk(r, vm).write(5, bytes).unwrap();
}

#[test]
fn a_restart_serves_each_session_at_the_same_point_from_the_same_staging_directory() {
    let r = rig_with(POINTS);
    write_at(&r, "v1", "c", 15, b"written at c");
    write_at(&r, "v2", "a", 16, b"written at a");
    let r = restart(r, POINTS);
    let (s1, s2) = (r.ds.session("v1").unwrap(), r.ds.session("v2").unwrap());
    assert_eq!((s1.point.name(), s2.point.name()), ("c", "a"));
    assert!(s1.dir.starts_with(ssd(&r)) && s2.dir.starts_with(main_staging(&r)));
    assert_eq!(s1.disks[0].read(5, 12).unwrap(), b"written at c");
    assert_eq!(s2.disks[0].read(5, 12).unwrap(), b"written at a");
}

#[test]
fn a_restarted_session_whose_point_stages_elsewhere_now_is_served_where_its_staging_is() {
    let r = rig_with(POINTS);
    write_at(&r, "v1", "b", 17, b"v1 data");
    write_at(&r, "v2", "a", 18, b"v2 data");
    // `b` now stages under --staging: v1 goes to the point that stages
    // where its data is.
    let r = restart(r, &[("a", None), ("b", None), ("d", Some("ssd"))]);
    let s1 = r.ds.session("v1").unwrap();
    assert_eq!(s1.point.name(), "d");
    assert!(s1.dir.starts_with(ssd(&r)));
    assert_eq!(s1.disks[0].read(5, 7).unwrap(), b"v1 data");
    drop(s1);
    // No point stages under --staging any more: v2 is served at the first
    // point and still read from where it is.
    let r = restart(r, &[("d", Some("ssd"))]);
    let s2 = r.ds.session("v2").unwrap();
    assert_eq!(s2.point.name(), "d");
    assert!(s2.dir.starts_with(main_staging(&r)));
    assert_eq!(s2.disks[0].read(5, 7).unwrap(), b"v2 data");
}
