//! A run beside another run: a killed run's leftovers are left alone
//! while its lock lives and removed after it, and a second run on a VM
//! being backed up fails busy while the first completes.

use super::*;

#[test]
fn a_run_after_a_killed_run_removes_its_leftovers_and_backs_up() {
    let data = content();
    let v = vm(Some(&data));
    // A run killed while its view was open: view, export and NBD server
    // left in QEMU, the guest device on the copy-before-write filter.
    let dead = tempfile::Builder::new()
        .prefix("recoverfs-vmbackup-")
        .tempdir()
        .unwrap();
    let run_lock = crate::util::try_lock_file(&dead.path().join(fleece::RUN_LOCK))
        .unwrap()
        .unwrap();
    {
        let mut q = Qmp::connect(&v.qmp).unwrap();
        let disk = q.block_devices().unwrap().remove(0);
        fleece::start_nbd_server(&mut q, &dead.path().join("nbd.sock")).unwrap();
        q.stop().unwrap();
        fleece::open_view(&mut q, &disk, "dead00-0-0", dead.path(), CHUNK).unwrap();
        q.cont().unwrap();
    }
    let mut q = v.monitor();
    let left = leftovers(&mut q);
    assert!(left.contains(&"rfs-cbw-dead00-0-0".to_string()), "{left:?}");
    let (_d, repo) = repo();
    let opts = options(&[("again", &v)], 1, None);
    // While that run lives (holds its lock), its view is left alone and
    // the new run fails alone.
    let s = backup_vms(&repo, &opts).unwrap();
    let e = report(&s, "again").error.clone().unwrap();
    assert!(e.contains("NBD server already running"), "{e}");
    assert_eq!(leftovers(&mut q), left);
    let exports = q.execute("query-block-exports", None).unwrap();
    assert_eq!(exports.as_array().unwrap().len(), 1);
    // Killed: its lock goes with it.
    drop(run_lock);
    let s = backup_vms(&repo, &opts).unwrap();
    assert!(s.failed().is_empty(), "{:?}", s.failed());
    let id = report(&s, "again").backup.clone().unwrap();
    assert!(restored(&repo, "again", &id) == data);
    let left = leftovers_but_kept(&mut q, &repo, "again", &id);
    assert!(left.is_empty(), "{left:?}");
    let exports = q.execute("query-block-exports", None).unwrap();
    assert_eq!(exports, json!([]));
    assert!(!dead.path().join("rfs-dead00-0-0.cbw").exists());
    // The guest device writes to its own disk again.
    hmp_write(&mut q, 0x5a, 0, 4096);
    assert_eq!(std::fs::read(v.img.as_ref().unwrap()).unwrap()[0], 0x5a);
    assert!(q.status().unwrap().running);
}

#[test]
fn a_second_run_on_a_vm_being_backed_up_fails_busy_through_another_monitor_and_the_first_completes()
{
    let data = content();
    let v = vm(Some(&data));
    let (_d, repo) = repo();
    // Run B goes through the VM's other monitor while run A has started
    // its NBD server and has no export yet (the VM is stopped for the
    // snapshot): B must not take A's server over.
    let mut second = options(&[("busy", &v)], 1, None);
    second.vms[0].qmp = v.mon.clone();
    let b_result = Arc::new(Mutex::new(None));
    let (b_repo, b_out) = (repo.clone(), b_result.clone());
    let hook: Hook = Arc::new(move |_, event| {
        if event == "stopped" {
            let s = backup_vms(&b_repo, &second).unwrap();
            *b_out.lock().unwrap() = Some(report(&s, "busy").clone());
        }
    });
    let s = backup_vms(&repo, &options(&[("busy", &v)], 1, Some(hook))).unwrap();
    let b = b_result.lock().unwrap().take().expect("run B ran");
    let e = b
        .error
        .as_deref()
        .unwrap_or_else(|| panic!("run B succeeded: {b:?}"));
    assert!(e.contains("another recoverfs job"), "{e}");
    let a = report(&s, "busy");
    assert!(a.error.is_none(), "run A failed: {a:?}");
    let id = a.backup.clone().unwrap();
    assert!(restored(&repo, "busy", &id) == data);
    assert!(v.monitor().status().unwrap().running);
    // Both runs are done: the QEMU process's lock file is gone with them.
    let pid = v.proc.lock().unwrap().0.id();
    let left: Vec<_> = std::fs::read_dir(crate::qemu::vm_lock::lock_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("recoverfs-qemu-{pid}-")))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// fixqemu2 LOW: a killed run's directory (its run lock, its stores)
/// stayed for good.
#[test]
fn a_run_removes_the_directories_killed_runs_left_and_not_a_live_ones() {
    let (dead, live) = crate::boot::tests::dead_and_live_scratch("vmbackup");
    let v = vm(Some(&content()));
    let (_d, repo) = repo();
    let s = backup_vms(&repo, &options(&[("swept", &v)], 1, None)).unwrap();
    assert!(s.failed().is_empty(), "{:?}", s.failed());
    let gone = !dead.exists();
    let kept = live.join("nbd.sock").exists();
    let _ = std::fs::remove_dir_all(&live);
    let _ = std::fs::remove_dir_all(&dead);
    assert!(gone, "{} stays", dead.display());
    assert!(kept, "a live run's directory was removed");
}
