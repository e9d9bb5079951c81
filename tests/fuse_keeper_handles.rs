//! What a daemon adopting a crashed one's FUSE connection knows of the
//! kernel's state (review31 H3, H4, M2): the inode numbers it holds, and
//! every open disk handle, recorded in staging before it is answered.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use common::keeper::*;
use common::*;

const K64: usize = 64 << 10;

/// Runs `script` (python) with `args`, until it prints "ready".
fn holder(script: &str, args: &[&Path]) -> (Child, std::io::BufReader<std::process::ChildStdout>) {
    let mut child = Child(
        std::process::Command::new("python3")
            .args(["-c", script])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    (child, out)
}

/// Lets the holder go on (it waits for `stop`), and returns what it said.
fn finish(
    stop: &Path,
    mut child: Child,
    mut out: std::io::BufReader<std::process::ChildStdout>,
) -> String {
    std::fs::write(stop, b"").unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    let _ = child.0.wait();
    rest
}

/// H4: a handle opened under the dead daemon that does no I/O after the
/// adoption (an idle or paused guest) still holds its session: `release`
/// refuses, naming it.
#[test]
fn an_idle_handle_from_the_dead_daemon_holds_the_session_against_release() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 34, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let stop = env.path("stop");
    let (child, out) = holder(IDLE, &[&disk, &stop]);
    crash(d);
    let d2 = env.serve();
    let o = env.release("vm", false);
    let discard = env.release("vm", true);
    let rest = finish(&stop, child, out);
    // Its release arrived: the session goes now.
    std::thread::sleep(Duration::from_millis(500));
    let after = env.release("vm", false);
    drop(d2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && !discard.status.success(),
        "release went ahead while a process held the disk open (opened under the dead daemon); its next write: {rest}"
    );
    assert!(
        err.contains("still open") && err.contains("disk0 over FUSE"),
        "{err}"
    );
    assert_eq!(rest.trim(), "wrote");
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
}

/// A handle opened under the first daemon outlives two crashes in a row
/// with no I/O in between: the second daemon, which adopted it, must keep
/// it in its own handle record, or the third would not know it and let
/// `release` go ahead under it, though another open and release rewrote
/// that record. The write the handle made before the first crash is still
/// there after the second.
#[test]
fn a_handle_from_before_two_crashes_in_a_row_still_holds_the_session() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 35, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let stop = env.path("stop");
    let script = r#"
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"x" * 4096, 0); os.fdatasync(fd)
print("ready", flush=True)
while not os.path.exists(sys.argv[2]): time.sleep(0.1)
try:
    first = os.pread(fd, 4096, 0)
    os.pwrite(fd, b"y" * 4096, 4096); os.fdatasync(fd)
    print("wrote" if first == b"x" * 4096 else "lost the first write")
except OSError as e:
    print("error", e)
"#;
    let (child, out) = holder(script, &[&disk, &stop]);
    crash(d);
    let d2 = env.serve();
    assert!(keeper_runs(&env.staging), "{}", d2.log_text());
    // Another open and release under the second daemon rewrites its
    // handle record: the inherited handle must stay in it.
    let other = std::process::Command::new("python3")
        .args(["-c", "import sys; open(sys.argv[1], 'rb').read(4096)"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(other.success());
    crash(d2);
    let d3 = env.serve();
    let o = env.release("vm", false);
    let rest = finish(&stop, child, out);
    std::thread::sleep(Duration::from_millis(500));
    let after = env.release("vm", false);
    let log = d3.log_text();
    drop(d3);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("still open"),
        "release went ahead under a handle opened two crashes ago: {err}; its next I/O: {rest}\n{log}"
    );
    assert_eq!(rest.trim(), "wrote");
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
}

const IDLE: &str = r#"
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"x" * 4096, 0); os.fdatasync(fd)
print("ready", flush=True)
while not os.path.exists(sys.argv[2]): time.sleep(0.1)
try:
    os.pwrite(fd, b"y" * 4096, 4096); os.fdatasync(fd); print("wrote")
except OSError as e:
    print("error", e)
"#;

/// VMs a and b backed up (images from seeds `seed`, `seed + 1`), served
/// and recovered: the daemon and their disk0 paths.
fn two_vms_served(env: &Env, seed: u64) -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    for (i, vm) in ["a", "b"].iter().enumerate() {
        let image = env.path(&format!("{vm}.raw"));
        random_image(&image, 16 * K64, seed + i as u64, K64);
        env.backup(vm, "64K", &[&image]);
    }
    let d = env.serve();
    let a = env.recover("a", None)[0].clone();
    let b = env.recover("b", None)[0].clone();
    (d, a, b)
}

/// review32 H1: each session numbers its open handles from 1, and the
/// file handle is epoch | id << 1 | passthrough: the first disk opens of
/// VMs a and b get the same file handle. Keyed by the handle alone, b's
/// record replaced a's, and after a crash `release a` went ahead under
/// a's idle open (H4 undone).
#[test]
fn the_first_opens_of_two_vms_are_both_recorded_and_both_hold_after_a_crash() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    let (d, a, b) = two_vms_served(&env, 60);
    let stop = env.path("stop");
    let (ca, oa) = holder(IDLE, &[&a, &stop]);
    let (cb, ob) = holder(IDLE, &[&b, &stop]);
    let table = std::fs::read_to_string(env.staging.join("fuse-handles.json")).unwrap();
    crash(d);
    let d2 = env.serve();
    let ra = env.release("a", false);
    let rb = env.release("b", false);
    let rest_a = finish(&stop, ca, oa);
    let rest_b = finish(&stop, cb, ob);
    std::thread::sleep(Duration::from_millis(500));
    let log = d2.log_text();
    drop(d2);
    let recorded = table.matches("\"ino\"").count();
    assert!(
        !ra.status.success() && !rb.status.success() && recorded == 2,
        "two open disks, {recorded} recorded ({table}); release a: {} ({}), release b: {} ({}); a's next write: {rest_a}; b's: {rest_b}\n{log}",
        ra.status,
        String::from_utf8_lossy(&ra.stderr).trim(),
        rb.status,
        String::from_utf8_lossy(&rb.stderr).trim(),
    );
}

/// review32 H1, the other way: a's close removed b's record (the only one
/// under that file handle); after a crash b's idle open held nothing.
#[test]
fn closing_one_vms_disk_leaves_the_other_vms_open_recorded() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    let (d, a, b) = two_vms_served(&env, 70);
    let stop_a = env.path("stop-a");
    let stop_b = env.path("stop-b");
    let (ca, oa) = holder(IDLE, &[&a, &stop_a]);
    let (cb, ob) = holder(IDLE, &[&b, &stop_b]);
    let rest_a = finish(&stop_a, ca, oa);
    std::thread::sleep(Duration::from_millis(500));
    let table = std::fs::read_to_string(env.staging.join("fuse-handles.json")).unwrap();
    crash(d);
    let d2 = env.serve();
    let rb = env.release("b", false);
    let rest_b = finish(&stop_b, cb, ob);
    let log = d2.log_text();
    drop(d2);
    assert!(
        !rb.status.success() && table.matches("\"ino\"").count() == 1,
        "b open, its record: {table}; release b: {} ({}); b's next write: {rest_b} (a said {rest_a})\n{log}",
        rb.status,
        String::from_utf8_lossy(&rb.stderr).trim(),
    );
}

/// H3: an inode number is handed out only once recorded in staging (here
/// a directory stands where the table goes; in life, a full staging):
/// else an adopting daemon could give it to another session.
#[test]
fn an_inode_number_that_cannot_be_recorded_is_not_handed_out() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 39, K64);
    env.backup("a", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let table = env.staging.join("fuse-inodes.json");
    let _ = std::fs::remove_file(&table);
    std::fs::create_dir(&table).unwrap();
    let a = env.recover("a", None)[0].clone();
    let refused = std::fs::metadata(&a)
        .map(|_| ())
        .map_err(|e| e.raw_os_error());
    std::fs::remove_dir(&table).unwrap();
    let later = std::fs::metadata(&a).map(|_| ());
    drop(d);
    assert_eq!(refused, Err(Some(libc::EIO)), "looked up unrecorded");
    assert!(later.is_ok(), "{later:?}");
}

/// H3: if the inode table is lost before a crash, the adopting daemon
/// never answers a number the kernel holds for one VM's open disk with
/// another VM: the open file's write lands in no other VM's disk.
#[test]
fn a_lost_inode_table_never_maps_an_open_disk_to_another_vm() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    let size = 16 * K64;
    for (i, vm) in ["a", "b", "c"].iter().enumerate() {
        random_image(&env.path(&format!("{vm}.raw")), size, 40 + i as u64, K64);
        env.backup(vm, "64K", &[&env.path(&format!("{vm}.raw"))]);
    }
    let d = env.serve();
    let a = env.recover("a", None)[0].clone();
    let b = env.recover("b", None)[0].clone();
    // Lookups in this order: a gets the first base, b the second.
    std::fs::metadata(&a).unwrap();
    std::fs::metadata(&b).unwrap();
    let stop = env.path("stop");
    let script = r#"
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
print("ready", flush=True)
while not os.path.exists(sys.argv[2]): time.sleep(0.1)
try:
    os.pwrite(fd, b"B" * 4096, 0); os.fdatasync(fd); print("wrote")
except OSError as e:
    print("error", e)
"#;
    let (child, out) = holder(script, &[&b, &stop]);
    std::fs::remove_file(env.staging.join("fuse-inodes.json")).unwrap();
    crash(d);
    let d2 = env.serve();
    // Not adopted: the old disks fail (ENOTCONN) rather than risk an old
    // number answered as another VM's.
    let log = d2.log_text();
    assert!(
        log.contains("open handles is lost") && log.contains("letting it go"),
        "{log}"
    );
    // The kernel's cached entries expire (TTL 1 s): then a lookup, not a
    // getattr of the old number (which the new daemon answers ENOENT).
    std::thread::sleep(Duration::from_millis(1100));
    // The new daemon: c is looked up first, then a.
    let c = env.recover("c", None)[0].clone();
    std::fs::metadata(&c).unwrap();
    std::fs::metadata(&a).unwrap();
    let c_before = std::fs::read(&c).unwrap()[..4096].to_vec();
    let a_before = std::fs::read(&a).unwrap()[..4096].to_vec();
    let rest = finish(&stop, child, out);
    let c_after = std::fs::read(&c).unwrap()[..4096].to_vec();
    let a_after = std::fs::read(&a).unwrap()[..4096].to_vec();
    drop(d2);
    assert!(
        c_after == c_before && a_after == a_before,
        "b's open file wrote into another VM's disk (c changed: {}, a changed: {}); writer said: {rest}",
        c_after != c_before,
        a_after != a_before
    );
}

/// M2: a passthrough open made under the dead daemon is known after the
/// adoption: a writable open waits for it, then is refused with EBUSY (not
/// EIO at once), and `release` refuses.
#[test]
fn a_passthrough_open_from_the_dead_daemon_is_still_known_after_adoption() {
    passthrough_open_across_a_crash(true)
}

/// M2, restarted without `--fuse-passthrough`: the kernel still has the
/// inode in passthrough mode, so a writable open waits as well.
#[test]
fn a_passthrough_open_from_the_dead_daemon_is_known_to_a_daemon_without_the_option() {
    passthrough_open_across_a_crash(false)
}

fn passthrough_open_across_a_crash(restart_with_option: bool) {
    let mut env = keeper_env();
    env.serve_args = vec!["--fuse-passthrough".into()];
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 38, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    // Stage it all through a writable open, then let its release arrive.
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        let mut buf = vec![0u8; 16 * K64];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let stop = env.path("stop");
    let script = r#"
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.pread(fd, 4096, 0)
print("ready", flush=True)
while not os.path.exists(sys.argv[2]): time.sleep(0.1)
"#;
    let (child, out) = holder(script, &[&disk, &stop]);
    let passed = d.log_text();
    crash(d);
    if !restart_with_option {
        env.serve_args.clear();
    }
    let d2 = env.serve();
    let t = std::time::Instant::now();
    let w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk);
    let took = t.elapsed();
    let w_err = w.as_ref().err().map(|e| e.raw_os_error());
    drop(w);
    let o = env.release("vm", false);
    finish(&stop, child, out);
    // Once the reader is gone, a writable open is served again.
    std::thread::sleep(Duration::from_millis(500));
    let again = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .map(|_| ());
    let log = d2.log_text();
    drop(d2);
    assert_eq!(
        w_err,
        Some(Some(libc::EBUSY)),
        "writable open after adoption, after {took:?}\n{passed}\n{log}"
    );
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(!o.status.success(), "release went ahead\n{log}");
    assert!(again.is_ok(), "{again:?}\n{log}");
}

/// review32 M3: `--mount` given as a symbolic link to the mount
/// directory. The first daemon keeps the canonical path; the restart
/// compared it with the link's own path ("this daemon mounts elsewhere"),
/// let the kept mount go, and the open disk failed with ENOTCONN.
#[test]
fn a_restart_with_the_same_symlinked_mount_adopts_the_kept_connection() {
    let mut env = keeper_env();
    let link = env.path("mnt-link");
    std::os::unix::fs::symlink(&env.mount, &link).unwrap();
    env.mount = link;
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 80, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let stop = env.path("stop");
    let (child, out) = holder(IDLE, &[&disk, &stop]);
    crash(d);
    let d2 = env.serve();
    let rest = finish(&stop, child, out);
    let log = d2.log_text();
    drop(d2);
    assert!(
        log.contains("adopting the FUSE connection") && rest.trim() == "wrote",
        "writer: {rest}\n{log}"
    );
}

/// review32 L6: a fresh mount whose handle table cannot be written (here a
/// directory stands where it goes; in life, a full or read-only staging)
/// was handed to the keeper all the same, with opens recorded nowhere: a
/// daemon adopting it after a crash would not have known them (or taken
/// an older connection's table for its). Such a mount is served without a
/// keeper, and says so.
#[test]
fn a_fresh_mount_whose_tables_cannot_be_kept_is_not_kept() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 40, K64);
    env.backup("a", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    assert!(keeper_runs(&env.staging));
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    let table = env.staging.join("fuse-handles.json");
    let _ = std::fs::remove_file(&table);
    std::fs::create_dir(&table).unwrap();
    let d = env.serve();
    let log = d.log_text();
    let kept = keeper_runs(&env.staging);
    let disk = env.recover("a", None)[0].clone();
    let read = std::fs::read(&disk).map(|b| b.len());
    drop(d);
    assert!(!kept, "kept with no handle table: {log}");
    assert!(log.contains("mounting without a keeper"), "{log}");
    assert_eq!(read.unwrap(), 16 * K64);
}

/// review32 M4: the daemon died after recording an open but before
/// answering it (here the fault seam kills it there). The kernel sends
/// that OPEN again to the adopting daemon, which answers it with a new
/// handle: the dead daemon's record has no handle behind it, and held the
/// session (`release` refused) for the life of the mount. The resent
/// OPEN replaces it.
#[test]
fn an_open_recorded_but_not_answered_before_a_crash_leaves_no_phantom_holder() {
    let mut env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 41, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    env.extra_env.push((
        "RECOVERFS_FAULT_KILL_AFTER_OPEN_RECORDED".into(),
        "1".into(),
    ));
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let stop = env.path("stop");
    let script = r#"
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
print("ready", flush=True)
os.pwrite(fd, b"z" * 4096, 0); os.fdatasync(fd)
while not os.path.exists(sys.argv[2]): time.sleep(0.1)
os.close(fd)
print("closed", flush=True)
"#;
    let mut child = Child(
        std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&disk)
            .arg(&stop)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    // The open killed the daemon; it waits for the next one.
    std::thread::sleep(Duration::from_millis(1000));
    crash(d);
    env.extra_env.clear();
    let d2 = env.serve();
    let ready = rx.recv_timeout(Duration::from_secs(30));
    std::fs::write(&stop, b"").unwrap();
    let closed = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.0.wait();
    std::thread::sleep(Duration::from_millis(500));
    let o = env.release("vm", false);
    let log = d2.log_text();
    drop(d2);
    assert_eq!(ready.as_deref(), Ok("ready"), "the resent open: {log}");
    assert_eq!(closed.as_deref(), Ok("closed"));
    assert!(
        o.status.success(),
        "release refused by a holder with no handle behind it: {}\n{log}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// review32 L9: the rewrite of the handle table at a release runs on an
/// io thread. With one event thread and that rewrite held back (a slow
/// fsync), the mount still answers a read; the release is answered once
/// the rewrite is done, and then no longer holds the session.
#[test]
fn a_release_whose_record_is_still_being_written_holds_no_event_thread() {
    let mut env = keeper_env();
    env.serve_args.extend(["--fuse-threads".into(), "1".into()]);
    let gate = env.path("gate");
    env.extra_env.push((
        "RECOVERFS_FAULT_HOLD_RELEASE_SAVE".into(),
        gate.to_str().unwrap().into(),
    ));
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 44, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    // Its RELEASE goes out after `close` returned; its rewrite waits.
    drop(std::fs::File::open(&disk).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = disk.clone();
    std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        let r = std::fs::File::open(&reader)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0));
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let answered = rx.recv_timeout(Duration::from_secs(10));
    std::fs::write(&gate, b"").unwrap();
    assert_eq!(
        answered,
        Ok(Ok(())),
        "a read waited behind a release's table rewrite on the only event thread"
    );
    env.release_closed("vm", false);
}

/// review32 L9: an open's record (a file sync) is made outside the lock
/// of the disks' open counts, which a release takes on the event thread.
/// With passthrough on, one event thread, and a second open's record held
/// back: closing the first handle and reading through another are still
/// answered.
#[test]
fn an_open_whose_record_is_held_back_blocks_no_release_or_read() {
    let mut env = keeper_env();
    env.serve_args
        .extend(["--fuse-threads", "1", "--fuse-passthrough"].map(String::from));
    let seam = env.path("seam");
    std::fs::create_dir(&seam).unwrap();
    env.extra_env.push((
        "RECOVERFS_FAULT_HOLD_OPEN_RECORD".into(),
        seam.to_str().unwrap().into(),
    ));
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 45, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let rw = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap()
    };
    let (reader, closed) = (rw(), rw());
    std::fs::write(seam.join("armed"), b"").unwrap();
    let opener = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&disk)
        })
    };
    // The third open is waiting at the seam (as long as its record's sync).
    std::thread::sleep(Duration::from_millis(500));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(closed);
        // Its RELEASE (sent after `close` returned) reaches the daemon first.
        std::thread::sleep(Duration::from_millis(200));
        let mut b = vec![0u8; 4096];
        let r = std::os::unix::fs::FileExt::read_exact_at(&reader, &mut b, 0);
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let answered = rx.recv_timeout(Duration::from_secs(10));
    std::fs::write(seam.join("go"), b"").unwrap();
    let third = opener.join().unwrap();
    assert_eq!(
        answered,
        Ok(Ok(())),
        "a release or read waited behind another open's record"
    );
    drop(third.expect("the held-back open is answered once let go"));
    env.release_closed("vm", false);
}

/// A release is answered only once the table without its record is
/// written: a daemon that dies in between leaves the RELEASE unanswered,
/// the kernel sends it again to the next daemon, and the session can be
/// released. (Answered first, the record would stay in the file and hold
/// the session against `release` for the life of the mount.)
#[test]
fn a_release_not_yet_written_when_the_daemon_dies_is_sent_again_and_frees_the_session() {
    let mut env = keeper_env();
    let gate = env.path("gate");
    env.extra_env.push((
        "RECOVERFS_FAULT_HOLD_RELEASE_SAVE".into(),
        gate.to_str().unwrap().into(),
    ));
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 47, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    // Its RELEASE waits at the seam, before the table is written.
    drop(std::fs::File::open(&disk).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    crash(d);
    env.extra_env.clear();
    let _d = env.serve();
    env.release_closed("vm", false);
}
