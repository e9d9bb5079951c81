//! The FUSE connection outlives a crashed daemon (`export::fuse::keeper`):
//! a process with a disk open keeps it across `kill -9` of the daemon and
//! a restart on the same staging, with no error and every fsync kept.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::keeper::*;
use common::*;

const K64: usize = 64 << 10;

#[test]
fn a_writer_with_the_disk_open_rides_out_three_daemon_crashes_with_no_error_and_every_fsync_kept() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    let size = 256 * K64;
    random_image(&env.path("a.raw"), size, 31, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let stop = env.path("stop");
    let writer = start_writer(&disk, size as u64 / BLOCK, &stop);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        crash(d);
        std::thread::sleep(Duration::from_millis(500));
        d = env.serve();
    }
    std::thread::sleep(Duration::from_millis(1000));
    // The writer's handle was opened under the first daemon: the last one
    // still counts it, so the release is refused while the disk is open.
    let o = env.release("vm", false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("still open"), "{err}");
    let out = stop_writer(writer, &stop);
    let last = acknowledged(&out, 50);
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    let _d = env.serve();
    assert_holds(&env, &last);
}

#[test]
fn reads_the_dead_daemons_event_threads_had_taken_are_all_answered_by_the_next_one() {
    let mut env = keeper_env();
    let _let_go = LetGo::of(&env);
    // Every fetch takes 3 s: the reads below are in the dead daemon's
    // hands, spread over its event threads (each reads its own clone of
    // the device file, and a request is listed on the clone it was read
    // from: a clone that died with the daemon would fail its reads).
    env.serve_args = vec![
        "--repo-delay-ms".into(),
        "3000".into(),
        "--no-profile".into(),
    ];
    let size = 64 * K64;
    let original = random_image(&env.path("a.raw"), size, 32, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let reads: Vec<(usize, std::path::PathBuf)> = (0..12)
        .map(|i| ((4 + 5 * i) * K64, env.path(&format!("got{i}"))))
        .collect();
    let mut readers = direct_reads(&disk, &reads);
    std::thread::sleep(Duration::from_millis(1000));
    crash(d);
    let _d = env.serve();
    let deadline = Instant::now() + Duration::from_secs(60);
    for ((at, got), reader) in reads.iter().zip(&mut readers) {
        let status = loop {
            if let Some(status) = reader.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the read at {at} the dead daemon had taken was never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "the read at {at} failed");
        assert!(
            std::fs::read(got).unwrap() == original[*at..at + 4096],
            "wrong bytes at {at}"
        );
    }
}

/// review32 H2: on a kernel that cannot resend (before 6.9; here the
/// daemon's fault seam says so), the reads the dead daemon had taken
/// would wait on the kept device files for the life of the mount, their
/// callers unkillable. The next daemon serves fresh device files and the
/// kept ones are closed: those reads end at once (with an error, or, as
/// this kernel does, sent again and answered with the disk's bytes), and
/// the disk serves every read after.
#[test]
fn without_resend_the_reads_the_dead_daemon_had_taken_end_instead_of_hanging() {
    let mut env = keeper_env();
    let _let_go = LetGo::of(&env);
    env.serve_args = vec![
        "--repo-delay-ms".into(),
        "3000".into(),
        "--no-profile".into(),
    ];
    let size = 64 * K64;
    let original = random_image(&env.path("a.raw"), size, 38, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let reads: Vec<(usize, std::path::PathBuf)> = (0..6)
        .map(|i| ((4 + 5 * i) * K64, env.path(&format!("got{i}"))))
        .collect();
    let mut readers = direct_reads(&disk, &reads);
    std::thread::sleep(Duration::from_millis(1000));
    crash(d);
    env.extra_env
        .push(("RECOVERFS_FAULT_NO_FUSE_RESEND".into(), "1".into()));
    env.serve_args = vec!["--no-profile".into()];
    let d2 = env.serve();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answered = 0;
    for ((at, got), r) in reads.iter().zip(&mut readers) {
        let status = loop {
            if let Some(status) = r.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "a read the dead daemon had taken still waits: {}",
                d2.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // Failed, or answered with the disk's own bytes: never a hang,
        // never other bytes.
        let got = std::fs::read(got).unwrap_or_default();
        assert!(
            !status.success() || got == original[*at..at + 4096],
            "the read at {at} succeeded with other bytes"
        );
        answered += status.success() as usize;
    }
    eprintln!("reads the dead daemon had taken answered after the adoption: {answered} of 6");
    assert!(
        d2.log_text().contains("served on fresh device files"),
        "{}",
        d2.log_text()
    );
    // The disk itself serves on.
    let f = std::fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 9 * K64 as u64).unwrap();
    assert!(buf == original[9 * K64..9 * K64 + 4096]);
}

/// A `dd` per (offset, output file): one 4 KiB O_DIRECT read of `disk`.
fn direct_reads(disk: &Path, reads: &[(usize, std::path::PathBuf)]) -> Vec<Child> {
    (reads.iter())
        .map(|(at, got)| {
            Child(
                std::process::Command::new("dd")
                    .arg(format!("if={}", disk.display()))
                    .arg(format!("of={}", got.display()))
                    .args(["bs=4096", "count=1", "iflag=direct"])
                    .arg(format!("skip={}", at / 4096))
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect()
}

/// SIGUSR2 (an upgrade's restart): the daemon makes staging durable and
/// exits 0, leaving the FUSE mount with its keeper; a process writing and
/// fsyncing through an open disk rides out two hand-overs with no error,
/// and every acknowledged write is there after a clean restart. (SIGTERM
/// unmounts: its VMs' disks fail.)
#[test]
fn a_writer_rides_out_two_sigusr2_hand_overs_with_no_error_and_every_fsync_kept() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    let size = 256 * K64;
    random_image(&env.path("a.raw"), size, 36, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let stop = env.path("stop");
    let writer = start_writer(&disk, size as u64 / BLOCK, &stop);
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        let st = d.stop_with(libc::SIGUSR2);
        let log = d.log_text();
        // Its guard would unmount; the mount is the keeper's now.
        std::mem::forget(d);
        assert_eq!(st.code(), Some(0), "{log}");
        assert!(log.contains("stays with its keeper"), "{log}");
        assert!(recoverfs_mounted_at(&env.mount), "unmounted: {log}");
        assert!(keeper_runs(&env.staging), "{log}");
        std::thread::sleep(Duration::from_millis(500));
        d = env.serve();
        assert!(
            d.log_text().contains("adopting the FUSE connection"),
            "{}",
            d.log_text()
        );
    }
    std::thread::sleep(Duration::from_millis(1000));
    let out = stop_writer(writer, &stop);
    let last = acknowledged(&out, 30);
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    assert!(!recoverfs_mounted_at(&env.mount), "SIGTERM leaves no mount");
    let _d = env.serve();
    assert_holds(&env, &last);
}

/// SIGUSR2 with no keeper to leave the mount with stops as SIGTERM does:
/// durable, unmounted, exit 0, and the log says why.
#[test]
fn a_sigusr2_without_a_keeper_stops_as_sigterm_does() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 16 * K64, 37, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&[7u8; 4096], 0)
        .unwrap();
    let st = d.stop_with(libc::SIGUSR2);
    let log = d.log_text();
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(log.contains("stopping as at SIGTERM"), "{log}");
    assert!(!recoverfs_mounted_at(&env.mount), "{log}");
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(buf, vec![7u8; 4096], "the write before the stop");
}

#[test]
fn a_clean_stop_ends_the_keeper_and_a_start_that_would_drop_a_kept_mount_is_refused() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 33, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    assert!(keeper_runs(&env.staging), "serve started no keeper");
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while keeper_runs(&env.staging) {
        assert!(
            Instant::now() < deadline,
            "the keeper outlived a clean stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A crash, then a start of the same staging at another mount point,
    // or with --no-fuse-keeper: refused, saying how to serve or end the
    // kept mount (review32 L5: it let the kept mount go, failing every
    // running VM's disks on one mistyped option), and the keeper still
    // holds it.
    let d = env.serve();
    env.recover("vm", None);
    crash(d);
    let mount2 = env.path("mnt2");
    std::fs::create_dir(&mount2).unwrap();
    let start = |mount: &Path, keeper: bool| {
        std::process::Command::new(bin())
            .args(["serve", "--repo", env.repo_str(), "--staging"])
            .arg(&env.staging)
            .arg("--mount")
            .arg(mount)
            .arg("--socket")
            .arg(env.path("control2.sock"))
            .env(
                "RECOVERFS_NO_FUSE_KEEPER",
                if keeper { "false" } else { "true" },
            )
            .output()
            .unwrap()
    };
    for (mount, keeper, how) in [
        (&mount2, true, "serve with --mount"),
        (&env.mount, false, "serve without --no-fuse-keeper"),
    ] {
        let o = start(mount, keeper);
        let err = String::from_utf8_lossy(&o.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            !o.status.success()
                && last.starts_with("recoverfs: error: ")
                && last.contains(how)
                && last.contains("fuse-let-go"),
            "{err}"
        );
        assert!(
            keeper_runs(&env.staging),
            "refused, it let the mount go: {err}"
        );
    }
    // Ended on purpose, the old mount answers ENOTCONN (not a hang), and
    // the daemon starts at the other mount point.
    env.ok(&["fuse-let-go", "--staging", env.staging.to_str().unwrap()]);
    let _d2 = Daemon::start(&env, &env.staging, &mount2, &env.path("control2.sock"));
    let (tx, rx) = mpsc::channel();
    let old = env.mount.clone();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(old.join("vm")).map(|_| ()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the old mount still waits for a daemon");
    assert!(r.is_err(), "the old mount should be dead");
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(&env.mount)
        .status();
}

/// The keeper of `staging`'s pid, found by its arguments (which name the
/// staging).
fn keeper_pid(staging: &Path) -> Option<String> {
    let root = std::fs::canonicalize(staging).unwrap();
    let want = format!("--staging\0{}\0", root.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("fuse-keeper") && c.contains(&want)
            })
        })
}

fn context_switches(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .filter(|l| l.contains("ctxt_switches"))
        .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn the_keeper_is_not_woken_by_the_requests_of_the_mount_it_keeps() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 64 * K64, 36, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let _ = std::fs::read(&disk).unwrap();
    let keeper = keeper_pid(&env.staging).expect("a keeper named after the staging");
    let before = context_switches(&keeper);
    let n = (64 * K64 / 4096) as u64;
    let o = std::process::Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .args(["of=/dev/null", "bs=4096", "iflag=direct"])
        .arg(format!("count={n}"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let woken = context_switches(&keeper) - before;
    // It wakes once a second on its own; a dd of 1,024 reads takes about
    // as long.
    assert!(woken < n / 10, "keeper woken {woken} times for {n} reads");
}

#[test]
fn a_refused_second_serve_at_another_mount_leaves_the_running_daemon_its_keeper() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 33, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    assert!(keeper_runs(&env.staging), "serve started no keeper");
    let mount2 = env.path("mnt2");
    std::fs::create_dir(&mount2).unwrap();
    for keeping in ["false", "true"] {
        let o = std::process::Command::new(bin())
            .args(["serve", "--repo", env.repo_str(), "--staging"])
            .arg(&env.staging)
            .arg("--mount")
            .arg(&mount2)
            .arg("--socket")
            .arg(env.path("c2.sock"))
            .env("RECOVERFS_NO_FUSE_KEEPER", keeping)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success(),
            "a second serve of a locked staging ran: {err}"
        );
        assert!(
            keeper_runs(&env.staging),
            "a refused second serve (no keeper: {keeping}) made the running daemon's keeper let go: {err}"
        );
    }
}

/// A process of another user that binds the keeper's socket name first
/// (the name is computable) is handed nothing; the daemon serves on, its
/// mount unkept, and says so.
#[test]
fn the_daemon_hands_its_fuse_device_to_no_other_users_socket() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 35, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    std::fs::create_dir_all(&env.staging).unwrap();
    let root = std::fs::canonicalize(&env.staging).unwrap();
    let name = recoverfs::export::fuse::keeper::name_of(&root);
    let squat = r#"
import socket, os, sys, array
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind("\0" + sys.argv[1]); s.listen(4)
print("listening uid", os.getuid(), flush=True)
while True:
    c, _ = s.accept()
    msg, anc, flags, addr = c.recvmsg(4096, socket.CMSG_SPACE(256))
    fds = []
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i"); a.frombytes(data[:len(data) - len(data) % 4]); fds.extend(a)
    print("got", msg.decode()[:80], [os.readlink("/proc/self/fd/%d" % f) for f in fds], flush=True)
    c.send(b'{"answer":"ok"}'); c.close()
"#;
    let mut squatter = Child(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", squat])
            .arg(&name)
            .current_dir("/")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = squatter.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first.starts_with("listening uid 65534"), "{first}");
    let d = env.serve();
    env.recover("vm", None);
    std::thread::sleep(Duration::from_millis(300));
    let got: Vec<String> = rx.try_iter().collect();
    // It sees connections closed with nothing sent ("got  []").
    assert!(
        got.iter().all(|l| l == "got  []"),
        "uid 65534 was sent: {got:?}"
    );
    assert!(d.log_text().contains("held by process"), "{}", d.log_text());
}

/// A kept mount lazily detached after the crash (`umount -l`, with a disk
/// still open, so the connection lives on) is let go, and the next
/// `serve` mounts afresh where `recover` says the disks are.
#[test]
fn a_kept_connection_whose_mount_was_detached_is_let_go_and_serve_mounts_afresh() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 37, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let _holder = Child(
        std::process::Command::new("sleep")
            .arg("60")
            .stdin(std::fs::File::open(&disk).unwrap())
            .spawn()
            .unwrap(),
    );
    crash(d);
    let st = std::process::Command::new("umount")
        .arg("-l")
        .arg(&env.mount)
        .status()
        .unwrap();
    assert!(st.success());
    let d2 = env.serve();
    assert!(
        d2.log_text().contains("no longer mounted there"),
        "{}",
        d2.log_text()
    );
    let paths = env.recover("vm", None);
    assert!(paths.iter().all(|p| p.exists()), "{paths:?}");
}

/// `recoverfs fuse-let-go`: refused while a daemon serves the staging;
/// after a crash it ends the kept mount, so I/O waiting on it fails
/// (ENOTCONN) instead of waiting for good.
#[test]
fn fuse_let_go_ends_a_kept_mount_with_no_daemon_and_is_refused_while_one_serves() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 38, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let let_go = || {
        std::process::Command::new(bin())
            .args(["fuse-let-go", "--staging"])
            .arg(&env.staging)
            .output()
            .unwrap()
    };
    let o = let_go();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success() && err.contains("serves"), "{err}");
    assert!(keeper_runs(&env.staging));
    crash(d);
    // A read waits on the kept mount with no daemon...
    let mut reader = Child(
        std::process::Command::new("dd")
            .arg(format!("if={}", disk.display()))
            .args(["of=/dev/null", "bs=4096", "count=1", "iflag=direct"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        reader.0.try_wait().unwrap().is_none(),
        "the read did not wait"
    );
    let o = let_go();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // ...and fails once the keeper let go.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = reader.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the read still waits after fuse-let-go"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "the read of a let-go mount succeeded");
    assert!(!keeper_runs(&env.staging));
}
