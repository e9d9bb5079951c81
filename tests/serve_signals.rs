//! Signals that reach `serve` before it handles them: a SIGUSR2 (a
//! reload sent a moment too early) waits for the handler and is a
//! hand-over once the daemon is up, never a kill.

mod common;

use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::keeper::*;
use common::*;

const K64: usize = 64 << 10;

/// Kills the child when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_sigusr2_during_the_start_is_handed_over_once_up_instead_of_killing_the_daemon() {
    let env = keeper_env();
    let _let_go = LetGo::of(&env);
    random_image(&env.path("a.raw"), 16 * K64, 41, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    // A first daemon makes the session, so the second has a disk to serve.
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&[9u8; 4096], 0)
        .unwrap();
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());

    let log = env.path("early.log");
    let child = Command::new(bin())
        .args(["serve", "--repo", env.repo_str(), "--staging"])
        .arg(&env.staging)
        .arg("--mount")
        .arg(&env.mount)
        .arg("--socket")
        .arg(&env.socket)
        .env("RECOVERFS_FAULT_PAUSE_BEFORE_API_MS", "3000")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    // Mounted and serving, the control API (and its handlers) not yet up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text().contains("serving") {
        assert!(Instant::now() < deadline, "no start: {}", text());
        assert!(child.0.try_wait().unwrap().is_none(), "{}", text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a signal to our own child process.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGUSR2) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no stop: {}", text());
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = text();
    assert_eq!(st.code(), Some(0), "killed, not handed over ({st}): {log}");
    assert!(
        log.contains("SIGUSR2: shutting down for a restart"),
        "{log}"
    );
    assert!(log.contains("stays with its keeper"), "{log}");
    assert!(recoverfs_mounted_at(&env.mount), "unmounted: {log}");
    assert!(keeper_runs(&env.staging), "{log}");

    // The next daemon adopts the kept mount; the write is there.
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(buf, vec![9u8; 4096]);
}
