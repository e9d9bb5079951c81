//! The lock files' life: removed by their holder when done, a stale one
//! (its QEMU gone, nobody holding it) removed by the next taker, and the
//! lock itself as exclusive as before.

use super::*;
use crate::error::ErrorKind;

/// A pid and start time of a process that is gone (a child, reaped).
fn gone_process() -> (u32, u64) {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    let started = process_start(pid).unwrap_or(1);
    c.wait().unwrap();
    (pid, started)
}

fn lock_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_lock_file_is_removed_when_its_holder_is_done_and_the_lock_stays_exclusive() {
    let d = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let started = process_start(me).unwrap();
    let sock = Path::new("/run/vm.qmp");
    let a = take_in(d.path(), me, started, sock).unwrap();
    let name = format!("recoverfs-qemu-{me}-{started}.lock");
    assert_eq!(a.path(), d.path().join(&name));
    assert_eq!(lock_files(d.path()), [name.as_str()]);
    // A second job on the same QEMU process: busy, and the file stays.
    let e = take_in(d.path(), me, started, sock).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains("another recoverfs job"), "{e}");
    assert_eq!(lock_files(d.path()), [name.as_str()]);
    drop(a);
    assert!(lock_files(d.path()).is_empty());
    // Taken again, as often as jobs come: one file at a time, none after.
    for _ in 0..3 {
        let b = take_in(d.path(), me, started, sock).unwrap();
        assert_eq!(lock_files(d.path()), [name.as_str()]);
        assert!(take_in(d.path(), me, started, sock).is_err());
        drop(b);
    }
    assert!(lock_files(d.path()).is_empty());
}

#[test]
fn a_file_a_killed_holder_left_is_taken_over_and_then_removed() {
    let d = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let started = process_start(me).unwrap();
    let path = d.path().join(format!("recoverfs-qemu-{me}-{started}.lock"));
    // A holder killed while its QEMU runs on: the file, no lock.
    std::fs::write(&path, b"").unwrap();
    let a = take_in(d.path(), me, started, Path::new("q")).unwrap();
    assert_eq!(a.path(), path);
    drop(a);
    assert!(!path.exists());
}

#[test]
fn files_of_qemus_that_are_gone_are_removed_by_the_next_taker_unless_still_held() {
    let d = tempfile::tempdir().unwrap();
    let (pid, started) = gone_process();
    let stale = d
        .path()
        .join(format!("recoverfs-qemu-{pid}-{started}.lock"));
    std::fs::write(&stale, b"").unwrap();
    // A pid now running another process (ours, started at another time).
    let me = std::process::id();
    let reused = d.path().join(format!("recoverfs-qemu-{me}-1.lock"));
    std::fs::write(&reused, b"").unwrap();
    // One whose QEMU died under a job still holding it: left to that job.
    let (pid2, started2) = gone_process();
    let held = d
        .path()
        .join(format!("recoverfs-qemu-{pid2}-{started2}.lock"));
    let holder = crate::util::try_lock_file(&held).unwrap().unwrap();
    // Not ours to judge: other names.
    let other = d.path().join("recoverfs-qemu-notes.txt");
    std::fs::write(&other, b"x").unwrap();
    let my_start = process_start(me).unwrap();
    let a = take_in(d.path(), me, my_start, Path::new("q")).unwrap();
    let mut want = vec![
        held.file_name().unwrap().to_string_lossy().into_owned(),
        "recoverfs-qemu-notes.txt".to_string(),
        a.path().file_name().unwrap().to_string_lossy().into_owned(),
    ];
    want.sort();
    assert_eq!(lock_files(d.path()), want);
    drop(a);
    drop(holder);
    // The job gave up: the next taker removes it.
    let b = take_in(d.path(), me, my_start, Path::new("q")).unwrap();
    drop(b);
    assert_eq!(lock_files(d.path()), ["recoverfs-qemu-notes.txt"]);
}

#[test]
fn a_taker_that_locked_a_file_removed_meanwhile_opens_the_path_again() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("recoverfs-qemu-1-2.lock");
    // What a taker may have open: a file its holder removed when done.
    std::fs::write(&path, b"").unwrap();
    let removed = File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(!same_file(&removed, &path));
    // The path's file now: locked, and no other taker gets it.
    let f = lock(&path, true).unwrap().unwrap();
    assert!(same_file(&f, &path));
    assert!(lock(&path, true).unwrap().is_none());
    // Without create, a path with no file is nothing to lock.
    drop(f);
    std::fs::remove_file(&path).unwrap();
    assert!(lock(&path, false).unwrap().is_none());
    assert!(!path.exists());
}

#[test]
fn a_planted_link_is_not_followed() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("precious");
    std::fs::write(&target, b"keep").unwrap();
    let me = std::process::id();
    let started = process_start(me).unwrap();
    let path = d.path().join(format!("recoverfs-qemu-{me}-{started}.lock"));
    std::os::unix::fs::symlink(&target, &path).unwrap();
    assert!(take_in(d.path(), me, started, Path::new("q")).is_err());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
}

/// Takers and holders racing on one QEMU's lock (each done removes the
/// file while others have it open): never two holders at once.
#[test]
fn racing_takers_and_removing_holders_never_hold_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let d = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let started = process_start(me).unwrap();
    let holders = AtomicUsize::new(0);
    let taken = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                for _ in 0..20000 {
                    let Ok(l) = take_in(d.path(), me, started, Path::new("q")) else {
                        continue;
                    };
                    assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    taken.fetch_add(1, Ordering::SeqCst);
                    std::thread::yield_now();
                    holders.fetch_sub(1, Ordering::SeqCst);
                    drop(l);
                }
            });
        }
    });
    assert!(taken.load(Ordering::SeqCst) > 0);
    assert!(lock_files(d.path()).is_empty());
}
