//! For tests with the FUSE keeper on (`export::fuse::keeper`): a daemon
//! crash that leaves the mount kept, and guards that let the keeper go and
//! kill the test's processes even when the test fails; a writer that
//! fsyncs through an open disk and the check of what it acknowledged.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use super::{Daemon, Env};

/// An `Env` whose daemons run with the keeper (the suite's default is
/// `--no-fuse-keeper`).
pub fn keeper_env() -> Env {
    let mut env = Env::new();
    env.fuse_keeper = true;
    env
}

/// Crash: SIGKILL, and the guard's unmount is skipped (a real crash does
/// not unmount either).
pub fn crash(mut d: Daemon) {
    d.kill9();
    std::mem::forget(d);
}

/// Whether a recoverfs FUSE file system is mounted at `mount`.
pub fn recoverfs_mounted_at(mount: &Path) -> bool {
    let m = std::fs::canonicalize(mount).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap()) && l.contains("recoverfs"))
}

/// Whether a keeper of staging `staging` holds a connection (asked on its
/// socket, not by reading /proc: a process waiting on a kept mount can
/// make its /proc files wait too).
pub fn keeper_runs(staging: &Path) -> bool {
    let root = std::fs::canonicalize(staging).unwrap();
    matches!(recoverfs::export::fuse::keeper::take(&root), Ok(Some(_)))
}

/// Lets the keeper of the test's staging go when the test ends, passed or
/// not, and detaches what is left at its mount point (a crashed daemon's
/// guard is forgotten, so nothing else does): a kept mount with no daemon
/// would otherwise keep processes that close a file on it waiting (a
/// close sends FLUSH) for good.
pub struct LetGo(PathBuf, PathBuf);

impl LetGo {
    pub fn of(env: &Env) -> LetGo {
        LetGo(env.staging.clone(), env.mount.clone())
    }
}

impl Drop for LetGo {
    fn drop(&mut self) {
        if let Ok(root) = std::fs::canonicalize(&self.0) {
            let _ = recoverfs::export::fuse::keeper::release(&root);
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.1)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A process of its own (as QEMU is) with the disk open: the test process
/// must hold no file of the mount, or the daemon it spawns while none
/// serves would wait on that file's FLUSH at exec.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        // No wait: on a failure the child may close its file on a kept
        // mount with no daemon, and its exit waits until `LetGo` (dropped
        // after it) lets the connection go.
        let _ = self.0.kill();
    }
}

pub const BLOCK: u64 = 4096;

/// Writes 4 KiB blocks `seq` (each its number repeated) at blocks
/// `seq * 7919 % n`, fsyncing each, until `stop` exists; then prints
/// "offset seq" per acknowledged write and "error ..." per failure.
pub const WRITER: &str = r#"
import os, sys
disk, n, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(disk, os.O_RDWR)
seq, out = 0, []
while not os.path.exists(stop):
    at = seq * 7919 % n * 4096
    try:
        os.pwrite(fd, (b"%016d" % seq) * 256, at)
        os.fdatasync(fd)
        out.append("%d %d" % (at, seq))
    except OSError as e:
        out.append("error %d %s" % (seq, e))
    seq += 1
print("\n".join(out))
"#;

pub fn block_of(seq: u64) -> Vec<u8> {
    format!("{seq:016}")
        .into_bytes()
        .repeat(BLOCK as usize / 16)
}

/// Starts `WRITER` on `disk` (of `blocks` 4 KiB blocks) until `stop`.
pub fn start_writer(disk: &Path, blocks: u64, stop: &Path) -> Child {
    Child(
        std::process::Command::new("python3")
            .args(["-c", WRITER])
            .arg(disk)
            .arg(blocks.to_string())
            .arg(stop)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Tells the writer to stop and returns its output (at most 120 s: a
/// writer stuck on a mount nobody answers fails the test).
pub fn stop_writer(mut writer: Child, stop: &Path) -> String {
    std::fs::write(stop, b"").unwrap();
    let mut stdout = writer.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        let _ = tx.send(out);
    });
    let out = (rx.recv_timeout(Duration::from_secs(120)))
        .expect("the writer did not finish within 120 s of being told to stop");
    assert!(writer.0.wait().unwrap().success(), "the writer failed");
    out
}

/// The writer's last acknowledged write per block offset; it saw no error
/// and acknowledged more than `min` blocks.
pub fn acknowledged(out: &str, min: usize) -> std::collections::HashMap<u64, u64> {
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error")).collect();
    assert!(errors.is_empty(), "the writer saw errors: {errors:?}");
    let mut last = std::collections::HashMap::new();
    for l in out.lines() {
        let (at, seq) = l.split_once(' ').unwrap();
        last.insert(at.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap());
    }
    assert!(last.len() > min, "the writer made progress: {out}");
    last
}

/// Each block holds its last acknowledged write, read back from the VM
/// recovered (resumed) by the running daemon.
pub fn assert_holds(env: &Env, last: &std::collections::HashMap<u64, u64>) {
    let disk = env.recover("vm", None)[0].clone();
    let f = std::fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for (&at, &seq) in last {
        f.read_exact_at(&mut buf, at).unwrap();
        assert!(buf == block_of(seq), "block at {at} lost write {seq}");
    }
}
