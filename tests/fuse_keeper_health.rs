//! The daemon watches its FUSE mount's keeper (`export::fuse::keeper_watch`,
//! review32 L10): a keeper killed while the daemon serves is replaced, so
//! the mount still outlives the daemon's next crash; `status` shows the
//! keeper's state; and a stop leaves alone a mount point where another
//! mount now sits.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::keeper::*;
use common::*;
use serde_json::Value;

const K64: usize = 64 << 10;

/// `status --json`'s `fuse_keeper`.
fn keeper_status(env: &Env) -> Value {
    env.status()["fuse_keeper"].clone()
}

/// Waits up to `secs` for `fuse_keeper` to satisfy `ok`; returns it.
fn wait_keeper(env: &Env, d: &Daemon, secs: u64, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let k = keeper_status(env);
        if ok(&k) {
            return k;
        }
        assert!(
            Instant::now() < deadline,
            "fuse_keeper is still {k}: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill9(pid: u64) {
    // SAFETY: a signal to the keeper process this test's daemon started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

fn text_status(env: &Env) -> String {
    env.ok(&["status", "--socket", env.socket.to_str().unwrap()])
}

#[test]
fn a_killed_keeper_is_replaced_and_the_mount_survives_the_next_daemon_crash() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    let size = 256 * K64;
    random_image(&env.path("a.raw"), size, 41, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let stop = env.path("stop");
    let writer = start_writer(&disk, size as u64 / BLOCK, &stop);
    let k = keeper_status(&env);
    assert_eq!(
        (k["state"].as_str(), k["restarts"].as_u64()),
        (Some("holding"), Some(0)),
        "{k}"
    );
    let first = k["pid"].as_u64().expect("the keeper's pid");
    std::thread::sleep(Duration::from_millis(500));
    kill9(first);
    let k = wait_keeper(&env, &d, 20, |k| {
        k["restarts"] == 1 && k["state"] == "holding"
    });
    let second = k["pid"].as_u64().unwrap();
    assert_ne!(second, first, "{k}");
    let log = d.log_text();
    let staging = std::fs::canonicalize(&env.staging).unwrap();
    assert!(
        log.contains(&format!(
            "the FUSE keeper of staging {} (pid {first}) exited (signal: 9 (SIGKILL))",
            staging.display()
        )),
        "{log}"
    );
    assert!(keeper_runs(&env.staging), "{log}");
    // The new keeper holds every device file: the next crash leaves the
    // mount kept, the writer waits instead of failing.
    std::thread::sleep(Duration::from_millis(1000));
    crash(d);
    std::thread::sleep(Duration::from_millis(500));
    let mut d = env.serve();
    assert!(
        d.log_text().contains("adopting the FUSE connection"),
        "{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_millis(1000));
    let out = stop_writer(writer, &stop);
    let last = acknowledged(&out, 30);
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    let _d = env.serve();
    assert_holds(&env, &last);
}

/// While no keeper can be started (the fault seam), `status` says the
/// keeper is lost and why, the failure is logged once however often it
/// is tried, and once a keeper can start again one holds the mount.
#[test]
fn status_shows_a_lost_keeper_until_a_new_one_can_start_and_then_holding() {
    let mut env = keeper_env();
    let _let_go = LetGo::of(&env);
    let blocked = env.path("no-keeper");
    env.extra_env.push((
        "RECOVERFS_FAULT_NO_KEEPER_START".into(),
        blocked.to_str().unwrap().into(),
    ));
    random_image(&env.path("a.raw"), 16 * K64, 42, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    env.recover("vm", None);
    let k = keeper_status(&env);
    assert_eq!(k["state"], "holding", "{k}");
    assert!(k["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{k}");
    let text = text_status(&env);
    assert!(
        text.contains(&format!(
            "FUSE keeper: holding the mount (pid {})",
            k["pid"]
        )),
        "{text}"
    );

    std::fs::write(&blocked, b"").unwrap();
    kill9(k["pid"].as_u64().unwrap());
    let k = wait_keeper(&env, &d, 20, |k| {
        k["state"] == "lost"
            && k["why"]
                .as_str()
                .is_some_and(|w| w.contains("NO_KEEPER_START"))
    });
    assert!(k["pid"].is_null(), "{k}");
    let text = text_status(&env);
    assert!(text.contains("WARNING: FUSE keeper lost since"), "{text}");
    // Tried again (every 5 s), logged once.
    std::thread::sleep(Duration::from_secs(6));
    let log = d.log_text();
    assert_eq!(
        log.matches("could not hand the FUSE connection").count(),
        1,
        "{log}"
    );
    assert!(!keeper_runs(&env.staging));

    std::fs::remove_file(&blocked).unwrap();
    let k = wait_keeper(&env, &d, 15, |k| k["state"] == "holding");
    assert_eq!(k["restarts"], 1, "{k}");
    assert!(keeper_runs(&env.staging), "{}", d.log_text());
    assert!(text_status(&env).contains("1 keeper(s) started after one was lost"));
}

#[test]
fn status_shows_the_keeper_off_without_one() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 16 * K64, 44, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let k = keeper_status(&env);
    assert_eq!(k["state"], "off", "{k}");
    assert!(text_status(&env).contains("FUSE keeper: off"));
}

/// The type of the last (topmost) mount at `mount`.
fn mounted_type(mount: &Path) -> Option<String> {
    let m = std::fs::canonicalize(mount).unwrap();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    (info.lines().rev())
        .find(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap()))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|r| r.split(' ').next())
        .map(str::to_string)
}

/// A VM's disk looked up (its inode number recorded, nothing left open)
/// under a daemon that then crashed, and the daemon that adopted its
/// mount; and the disk's path.
fn adopted_after_a_crash(env: &Env, seed: u64) -> (Daemon, std::path::PathBuf) {
    random_image(&env.path("a.raw"), 16 * K64, seed, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    assert!(std::fs::metadata(&disk).unwrap().len() > 0);
    crash(d);
    let d = env.serve();
    assert!(
        d.log_text().contains("adopting the FUSE connection"),
        "{}",
        d.log_text()
    );
    (d, disk)
}

/// review32 L10: the adopted mount was unmounted by hand and another
/// filesystem mounted at its mount point; a clean stop unmounted that
/// one. Now it is left alone, and the log says why. The connection's end
/// is no keeper loss either.
#[test]
fn a_stop_leaves_alone_another_mount_at_the_adopted_mounts_point() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    let (mut d, _disk) = adopted_after_a_crash(&env, 43);
    let st = std::process::Command::new("umount")
        .arg(&env.mount)
        .status()
        .unwrap();
    assert!(st.success());
    wait_keeper(&env, &d, 10, |k| k["state"] == "ended");
    let _other = Tmpfs::mount(&env.mount, "1M");
    std::fs::write(env.mount.join("theirs"), b"x").unwrap();
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    let log = d.log_text();
    assert_eq!(mounted_type(&env.mount).as_deref(), Some("tmpfs"), "{log}");
    assert!(env.mount.join("theirs").exists(), "{log}");
    assert!(log.contains("not unmounting"), "{log}");
    assert!(!log.contains("over to a new keeper"), "{log}");
}

/// As above, but the adopted mount is detached (`umount -l`) while a
/// process has a disk open, so its connection lives on, detached: the stop
/// neither unmounts the filesystem now at the mount point nor waits for
/// that connection for good (it ends with the daemon and its keeper).
#[test]
fn a_stop_with_the_adopted_mount_detached_but_open_leaves_the_new_mount_and_ends() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    let (mut d, disk) = adopted_after_a_crash(&env, 45);
    let _holder = Child(
        std::process::Command::new("sleep")
            .arg("60")
            .stdin(std::fs::File::open(&disk).unwrap())
            .spawn()
            .unwrap(),
    );
    let st = std::process::Command::new("umount")
        .arg("-l")
        .arg(&env.mount)
        .status()
        .unwrap();
    assert!(st.success());
    let _other = Tmpfs::mount(&env.mount, "1M");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(keeper_status(&env)["state"], "holding", "{}", d.log_text());
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    let log = d.log_text();
    assert_eq!(mounted_type(&env.mount).as_deref(), Some("tmpfs"), "{log}");
    assert!(log.contains("not unmounting"), "{log}");
}

/// Resumes a stopped process when the test ends, passed or not.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: a signal to the keeper this test stopped.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// review43 H1: a keeper that stops accepting (frozen, stopped in a
/// debugger) with its accept queue full must not hang the daemon: its
/// pings give up (a busy keeper, not a lost one), and a stop still ends.
#[test]
fn a_frozen_keeper_with_a_full_queue_holds_up_neither_the_watch_nor_the_stop() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 46, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    let k = wait_keeper(&env, &d, 10, |k| k["state"] == "holding");
    let pid = k["pid"].as_u64().expect("the keeper's pid") as i32;
    // SAFETY: a signal to the keeper this test's daemon started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let _resume = Resume(pid);
    // Fill its accept queue: connects that do not wait, until refused.
    let root = std::fs::canonicalize(&env.staging).unwrap();
    let name = recoverfs::export::fuse::keeper::name_of(&root);
    let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
    let mut queued = Vec::new();
    for _ in 0..256 {
        let s = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        if connect(std::os::fd::AsRawFd::as_raw_fd(&s), &addr).is_err() {
            break;
        }
        queued.push(s);
    }
    assert!(queued.len() < 256, "the keeper's accept queue never filled");
    // A few ticks of the watch against the full queue.
    std::thread::sleep(Duration::from_secs(6));
    let k = keeper_status(&env);
    assert_eq!(k["state"], "holding", "a busy keeper is no loss: {k}");
    let t = Instant::now();
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "the stop took {:?}",
        t.elapsed()
    );
    drop(queued);
}
