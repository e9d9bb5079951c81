//! Failures: a VM that fails fails alone, and one still running is left
//! running with none of the backup's views in QEMU: killed after the
//! snapshot, unreachable or without disks, a view that cannot open, a stop
//! answered too late, a failing copy-before-write store; and a signal,
//! which fails every VM through its cleanup.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};

#[test]
fn a_vm_killed_after_the_snapshot_gets_no_manifest_and_the_others_are_backed_up() {
    let vms: Vec<Arc<Vm>> = (0..3).map(|_| Arc::new(vm(Some(&content())))).collect();
    let names = ["a", "b", "c"];
    // When the first VM's read starts, kill another one: it is read later.
    let killed: Arc<Mutex<Option<String>>> = Arc::default();
    let (k, all) = (killed.clone(), vms.clone());
    let hook: Hook = Arc::new(move |vm, event| {
        let mut k = k.lock().unwrap();
        if event == "read_started" && k.is_none() {
            let i = names.iter().position(|n| *n != vm).unwrap();
            all[i].kill();
            *k = Some(names[i].to_string());
        }
    });
    let (_d, repo) = repo();
    let pairs: Vec<(&str, &Vm)> = names
        .iter()
        .copied()
        .zip(vms.iter().map(|v| &**v))
        .collect();
    let s = backup_vms(&repo, &options(&pairs, 1, Some(hook))).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&s).unwrap());
    let victim = killed.lock().unwrap().clone().unwrap();
    for n in names {
        let r = report(&s, n);
        if n == victim {
            assert!(r.backup.is_none(), "{r:?}");
            let e = r.error.as_deref().unwrap();
            assert!(e.starts_with("the VM's QEMU is gone: disk 0: "), "{e}");
            assert!(repo.backup_ids(n).unwrap_or_default().is_empty());
            assert!(at(r, "failed") > at(r, "read_started"));
        } else {
            assert!(r.error.is_none(), "{n}: {:?}", r.error);
            assert_eq!(repo.backup_ids(n).unwrap().len(), 1);
        }
    }
    assert_eq!(s.failed().len(), 1);
}

#[test]
fn an_unreachable_qmp_socket_and_a_vm_without_disks_fail_alone_with_one_line_errors_and_a_nonzero_exit(
) {
    let good = vm(Some(&content()));
    let diskless = vm(None);
    let d = tempfile::tempdir().unwrap();
    let repo_dir = d.path().join("repo");
    let missing = d.path().join("nobody.sock");
    let cli = crate::cli::Cli::try_parse_from([
        "recoverfs".to_string(),
        "backup-vms".into(),
        "--repo".into(),
        repo_dir.display().to_string(),
        "--vm".into(),
        format!("gone={}", missing.display()),
        "--vm".into(),
        format!("empty={}", diskless.qmp.display()),
        "--vm".into(),
        format!("good={}", good.qmp.display()),
        "--chunk-size".into(),
        "64K".into(),
        "--rate-window".into(),
        "0.1".into(),
    ])
    .unwrap();
    let e = crate::cli::run(cli).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(e.starts_with("2 of 3 VMs failed"), "{e}");
    assert!(
        e.contains("gone: ") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    assert!(e.contains("empty: QEMU reports no disk"), "{e}");
    let repo = Repository::open(repo_dir.to_str().unwrap()).unwrap();
    assert_eq!(repo.backup_ids("good").unwrap().len(), 1);
    assert!(repo.backup_ids("empty").unwrap_or_default().is_empty());
    // The diskless VM is left running, its NBD server never started.
    assert!(
        Qmp::connect(&diskless.mon)
            .unwrap()
            .status()
            .unwrap()
            .running
    );
}

/// A socket that accepts and never speaks QMP (a serial chardev's, or a
/// monitor another client holds) fails its VM in seconds, not after a
/// command's 30 s, with a line that says what to check.
#[test]
fn a_socket_that_answers_no_qmp_greeting_fails_its_vm_within_the_greeting_timeout() {
    let good = vm(Some(&content()));
    let d = tempfile::tempdir().unwrap();
    let silent = d.path().join("serial.sock");
    let l = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let t = std::thread::spawn(move || {
        let (_s, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_secs(10));
    });
    let (_r, repo) = repo();
    let mut o = options(&[("mute", &good), ("good", &good)], 1, None);
    o.vms[0].qmp = silent.clone();
    let s = backup_vms(&repo, &o).unwrap();
    let r = report(&s, "mute");
    assert_eq!(
        r.error.as_deref(),
        Some(
            format!(
                "{} answered no QMP greeting within 5 s: is it the VM's QMP monitor socket \
                 (QEMU greets at once), with no other client (libvirt, another recoverfs job) \
                 connected to it?",
                silent.display()
            )
            .as_str()
        )
    );
    let failed_after = Duration::from_micros(at(r, "failed"));
    assert!(failed_after < Duration::from_secs(15), "{failed_after:?}");
    assert!(report(&s, "good").error.is_none(), "{s:?}");
    t.join().unwrap();
}

#[test]
fn a_vm_whose_second_view_cannot_open_is_undone_resumed_and_fails_alone() {
    let good = vm(Some(&content()));
    // A second disk, with its guest device.
    let dir = tempfile::tempdir().unwrap();
    let (img, extra, qmp) = (
        dir.path().join("a.raw"),
        dir.path().join("b.raw"),
        dir.path().join("qmp.sock"),
    );
    std::fs::write(&img, content()).unwrap();
    std::fs::write(&extra, content()).unwrap();
    let mut cmd = paused_vm(&img, &qmp);
    cmd.arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=drive1",
            extra.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=drive1,id=vd1"]);
    let broken = start(cmd, qmp, Some(img), dir);
    // Once the first view is open, the second's dirty bitmap name (the
    // first's with disk 1 for disk 0) is taken on its node: that view
    // cannot open. One client per QMP socket: the monitor is shared.
    let mon = Arc::new(Mutex::new(broken.monitor()));
    let m = mon.clone();
    let hook: Hook = Arc::new(move |vm, event| {
        if vm != "broken" || event != "view_opened" {
            return;
        }
        let mut q = m.lock().unwrap();
        let nodes = q
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .unwrap();
        let bitmaps: Vec<String> = (nodes.as_array().unwrap().iter())
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["name"].as_str().map(str::to_string))
            .collect();
        let first = bitmaps.iter().find(|b| b.ends_with("-0-0")).unwrap();
        let second = format!("{}-1", first.strip_suffix("-0").unwrap());
        let node = q.block_devices().unwrap()[1].node_name.clone();
        q.execute(
            "block-dirty-bitmap-add",
            Some(json!({"node": node, "name": second})),
        )
        .unwrap();
    });
    let (_d, repo) = repo();
    let s = backup_vms(
        &repo,
        &options(&[("broken", &broken), ("good", &good)], 1, Some(hook)),
    )
    .unwrap();
    let mut q = Arc::try_unwrap(mon).ok().unwrap().into_inner().unwrap();
    // The test's own bitmap goes; nothing of the backup's may be left.
    let node = q.block_devices().unwrap()[1].node_name.clone();
    let taken = leftovers(&mut q);
    assert_eq!(taken.len(), 1, "{taken:?}");
    let name = taken[0].strip_prefix("bitmap ").unwrap();
    assert!(name.ends_with("-0-1"), "{taken:?}");
    fleece::bitmap_op(&mut q, "remove", &node, name).unwrap();
    let r = report(&s, "broken");
    let e = r.error.as_deref().unwrap();
    assert!(e.starts_with("disk 1 ("), "{e}");
    assert_eq!(
        r.events
            .iter()
            .map(|e| e.event.as_str())
            .collect::<Vec<_>>(),
        [
            "stopped",
            "view_opened",
            "failed",
            "view_released",
            "resumed"
        ]
    );
    assert!(r.paused_ms.is_some());
    assert!(repo.backup_ids("broken").unwrap_or_default().is_empty());
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
    assert!(q.status().unwrap().running);
    assert!(report(&s, "good").backup.is_some());
    assert_eq!(s.failed().len(), 1);
}

#[test]
fn a_stop_answered_too_late_is_followed_by_cont() {
    let v = vm(Some(&content()));
    let (d, repo) = repo();
    // QEMU carries the stop out, and its answer comes after the backup's
    // QMP timeout (as when draining the guest's I/O outlasts it), well
    // after it: the kernel may end a 30 s socket timeout seconds late.
    let relay = d.path().join("relay.sock");
    incremental::qmp_relay(
        &relay,
        &v.qmp,
        |_| None,
        |cmd| {
            if cmd["execute"] == "stop" {
                std::thread::sleep(crate::qemu::qmp::DEFAULT_TIMEOUT + Duration::from_secs(5));
            }
        },
    );
    let mut opts = options(&[("late", &v)], 1, None);
    opts.vms[0].qmp = relay;
    let s = backup_vms(&repo, &opts).unwrap();
    let r = report(&s, "late");
    let mut q = v.monitor();
    assert!(q.status().unwrap().running, "the VM runs again: {r:?}");
    assert!(r.paused_ms.is_some(), "{r:?}");
    let e = r.error.as_deref().unwrap();
    assert!(e.starts_with("stopping the VM: no answer to stop"), "{e}");
    assert!(r.backup.is_none());
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
}

#[test]
fn a_failing_copy_before_write_store_breaks_the_snapshot_not_the_guests_writes_and_the_backup_fails(
) {
    let data = content();
    let v = vm(Some(&data));
    let (d, repo) = repo();
    // Each view's store is opened through blkdebug, every write to it an
    // I/O error (as on a full or failing host disk).
    let mon = Arc::new(Mutex::new(v.monitor()));
    let m = mon.clone();
    let relay = d.path().join("relay.sock");
    incremental::qmp_relay(
        &relay,
        &v.qmp,
        move |cmd| {
            let a = &cmd["arguments"];
            let store = cmd["execute"] == "blockdev-add"
                && a["driver"] == "file"
                && a["node-name"].as_str()?.starts_with("rfs-tmp-");
            store.then(|| {
                let args = json!({"driver": "blkdebug", "node-name": a["node-name"],
                    "image": {"driver": "file", "filename": a["filename"]},
                    "inject-error": [{"event": "pwritev", "iotype": "write", "errno": 5}]});
                match m.lock().unwrap().execute("blockdev-add", Some(args)) {
                    Ok(r) => json!({ "return": r }),
                    Err(e) => json!({"error": {"class": "GenericError", "desc": e.to_string()}}),
                }
            })
        },
        |_| {},
    );
    // The guest overwrites data the view still has to read.
    let out: Arc<Mutex<Option<String>>> = Arc::default();
    let (m, o) = (mon.clone(), out.clone());
    let hook: Hook = Arc::new(move |_, event| {
        if event == "resumed" {
            let r = m.lock().unwrap().execute(
                "human-monitor-command",
                Some(json!({"command-line": "qemu-io drive0 \"write -P 0xbb 0 65536\""})),
            );
            *o.lock().unwrap() = Some(format!("{r:?}"));
        }
    });
    let mut opts = options(&[("cbw", &v)], 1, Some(hook));
    opts.vms[0].qmp = relay;
    let s = backup_vms(&repo, &opts).unwrap();
    let r = report(&s, "cbw");
    assert_eq!(
        out.lock().unwrap().as_deref(),
        Some("Ok(String(\"\"))"),
        "the guest's write succeeds"
    );
    assert_eq!(std::fs::read(v.img.as_ref().unwrap()).unwrap()[0], 0xbb);
    let e = r.error.as_deref().unwrap_or_else(|| panic!("{r:?}"));
    assert!(
        e.starts_with(
            "QEMU could not read the snapshot (broken if a copy-before-write store failed"
        ),
        "{e}"
    );
    assert!(r.backup.is_none());
    assert!(repo.backup_ids("cbw").unwrap_or_default().is_empty());
    let mut q = mon.lock().unwrap();
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
    assert!(q.status().unwrap().running);
}

#[test]
fn a_signal_during_the_first_read_fails_every_vm_through_its_cleanup_resumed_and_without_views_or_manifests(
) {
    let vms: Vec<Vm> = (0..2).map(|_| vm(Some(&content()))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let hook: Hook = Arc::new(move |_, event| {
        if event == "read_started" {
            s2.store(true, Ordering::SeqCst);
        }
    });
    let (_d, repo) = repo();
    let opts = options(&[("one", &vms[0]), ("two", &vms[1])], 1, Some(hook));
    let s = backup_vms_until(&repo, &opts, &stop).unwrap();
    assert_eq!(s.failed().len(), 2, "{:?}", s.vms);
    for (n, v) in ["one", "two"].iter().zip(&vms) {
        let r = report(&s, n);
        let e = r.error.as_deref().unwrap();
        assert!(e.contains(INTERRUPTED), "{n}: {e}");
        assert!(repo.backup_ids(n).unwrap_or_default().is_empty());
        assert!(at(r, "resumed") < at(r, "failed"));
        let mut q = v.monitor();
        assert!(leftovers(&mut q).is_empty(), "{n}: {:?}", leftovers(&mut q));
        assert_eq!(q.execute("query-block-exports", None).unwrap(), json!([]));
        assert!(q.status().unwrap().running, "{n}");
    }
}

#[test]
fn a_qemu_whose_uuid_is_not_the_one_of_the_vms_newest_backup_fails_that_vm_unless_told_the_vm_was_re_created(
) {
    const UUID_A: &str = "6f1b3c2e-0000-4000-8000-00000000000a";
    const UUID_B: &str = "6f1b3c2e-0000-4000-8000-00000000000b";
    let a = vm_with_args(Some(&content()), &["-uuid", UUID_A, "-name", "web01"]);
    let b = vm_with_args(Some(&content()), &["-uuid", UUID_B, "-name", "db01"]);
    let (_d, repo) = repo();
    let s = backup_vms(&repo, &options(&[("web01", &a)], 1, None)).unwrap();
    assert!(report(&s, "web01").error.is_none());
    let first = repo.backup_ids("web01").unwrap()[0].clone();
    let m = repo.manifest("web01", &first).unwrap();
    assert_eq!(m.config["backup_vms"]["qemu"]["uuid"], UUID_A);
    // db01's socket given for web01: refused, nothing published.
    let s = backup_vms(&repo, &options(&[("web01", &b)], 1, None)).unwrap();
    let e = report(&s, "web01").error.clone().unwrap();
    assert!(e.contains(UUID_A) && e.contains(UUID_B), "{e}");
    assert!(e.contains("--new-identity web01"), "{e}");
    assert_eq!(repo.backup_ids("web01").unwrap().len(), 1);
    assert!(
        leftovers(&mut b.monitor()).is_empty(),
        "nothing left in QEMU"
    );
    // The same QEMU again passes; a re-created VM passes when told.
    let s = backup_vms(&repo, &options(&[("web01", &a)], 1, None)).unwrap();
    assert!(report(&s, "web01").error.is_none());
    let mut opts = options(&[("web01", &b)], 1, None);
    opts.vms[0].new_identity = true;
    let s = backup_vms(&repo, &opts).unwrap();
    let r = report(&s, "web01");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert!(
        r.warnings.iter().any(|w| w.contains("--new-identity")),
        "{:?}",
        r.warnings
    );
    let ids = repo.backup_ids("web01").unwrap();
    assert_eq!(ids.len(), 3);
    let m = repo.manifest("web01", ids.last().unwrap()).unwrap();
    assert_eq!(m.config["backup_vms"]["qemu"]["uuid"], UUID_B);
}
