//! Commands that run a VM for minutes (`boot`, `verify-boot`) whose
//! terminal is closed under them, or whose progress output nobody reads:
//! no panic (exit 101), the VM stopped and the scratch state removed in
//! order, and the exit status the work deserves (fixmisc 1).

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MARKER: &str = "RECOVERFS-TINY-UP boot=";

/// Kills a child left running when a test fails.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The qemu-system process whose parent is `parent`, once it runs.
fn qemu_child_of(parent: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: Option<u32> = (stat.rsplit(')').next())
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if ppid == Some(parent) && comm.starts_with("qemu-system") {
            return Some(pid);
        }
    }
    None
}

fn wait_for_qemu_of(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(q) = qemu_child_of(parent) {
            return q;
        }
        assert!(Instant::now() < deadline, "no QEMU started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` has ended: gone, or a zombie not reaped yet.
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
        }
    }
}

/// A terminal: its master side, read (and thrown away) by a thread until
/// `hang_up` closes it, as a terminal window closed by its user.
struct Terminal {
    slave: OwnedFd,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Terminal {
    fn open() -> Terminal {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty fills two descriptors we then own.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: just opened, owned here.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        // Only the child's standard streams are the terminal: an inherited
        // master would keep it open after `hang_up`.
        for fd in [&master, &slave] {
            // SAFETY: sets a flag on a descriptor we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut seen = vec![];
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::SeqCst) {
                let mut fds = [libc::pollfd {
                    fd: master.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) } <= 0 {
                    continue;
                }
                // SAFETY: reads into our buffer.
                let n =
                    unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n as usize]);
            }
            seen // the master closes here: the terminal hangs up
        });
        Terminal {
            slave,
            stop,
            reader: Some(reader),
        }
    }

    /// `cmd` with this terminal as its controlling terminal and its
    /// standard input, output and error.
    fn attach(&self, cmd: &mut Command) {
        let fd = || Stdio::from(self.slave.try_clone().unwrap());
        cmd.stdin(fd()).stdout(fd()).stderr(fd());
        // SAFETY: async-signal-safe calls only, in the forked child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Closes the terminal; returns what was written to it.
    fn hang_up(mut self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        let seen = self.reader.take().unwrap().join().unwrap();
        String::from_utf8_lossy(&seen).into_owned()
    }
}

#[test]
fn a_boot_whose_terminal_is_closed_stops_its_vm_in_order_and_exits_as_stopped() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let _d = env.serve();
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let term = Terminal::open();
    let mut cmd = Command::new(bin());
    cmd.args(["boot", "--socket", env.socket.to_str().unwrap(), "tiny"])
        .args(["--marker", "never-printed", "--timeout", "120"])
        .env("TMPDIR", &tmp);
    term.attach(&mut cmd);
    let mut child = Reap(cmd.spawn().unwrap());
    let qemu = wait_for_qemu_of(child.0.id());
    // Progress lines and the console on the terminal for a while.
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let seen = term.hang_up();
    let st = child.0.wait().unwrap();
    // SIGHUP stopped it through its cleanup; the lines it then wrote to
    // the hung-up terminal (EIO) did not turn that into a panic (101).
    assert_eq!(st.code(), Some(1), "{st}; the terminal showed: {seen}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(ended(qemu), "QEMU {qemu} runs on");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "boot left {left:?}");
    env.release_closed("tiny", false);
}

#[test]
fn a_verify_boot_whose_terminal_is_closed_stops_and_cleans_up_at_once() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let term = Terminal::open();
    let mut cmd = Command::new(bin());
    cmd.args(["verify-boot", "--repo", env.repo_str(), "tiny"])
        .args(["--marker", "never-printed", "--timeout", "180"])
        .env("TMPDIR", &tmp);
    term.attach(&mut cmd);
    let mut child = Reap(cmd.spawn().unwrap());
    let qemu = wait_for_qemu_of(child.0.id());
    let t = Instant::now();
    let seen = term.hang_up();
    let st = child.0.wait().unwrap();
    // The SIGHUP line to the hung-up terminal used to panic the signal
    // thread before it set the stop flag: the VM ran on to --timeout.
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "verify-boot ran on after its terminal closed: {:?}",
        t.elapsed()
    );
    assert_eq!(st.code(), Some(1), "{st}; the terminal showed: {seen}");
    assert!(ended(qemu), "QEMU {qemu} runs on");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(tmp.to_str().unwrap()),
        "left a mount: {mounts}"
    );
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "verify-boot left {left:?}");
}

#[test]
fn a_boot_whose_progress_reader_went_away_boots_on_to_its_marker() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let _d = env.serve();
    // Standard error: a pipe whose reader is gone before the first line.
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let o = Command::new(bin())
        .args(["boot", "--socket", env.socket.to_str().unwrap(), "tiny"])
        .args(["--marker", MARKER, "--timeout", "180"])
        .stderr(Stdio::from(w))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}: {out}", o.status);
    assert!(out.contains("marker reached after"), "{out}");
    env.release_closed("tiny", false);
}
