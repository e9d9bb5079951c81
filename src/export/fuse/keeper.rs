//! The keeper: a FUSE connection that outlives a crashed daemon.
//!
//! The kernel ends a FUSE connection when the last open file of its
//! `/dev/fuse` device closes. A daemon killed (SIGKILL, OOM, a panic that
//! aborts) used to take the connection with it: the mount went dead and
//! every guest with a disk open got ENOTCONN, although staging kept every
//! acknowledged write. The keeper is a small process, `recoverfs
//! fuse-keeper`, started beside the mount in its own session (a signal to
//! the daemon's process group does not reach it), that holds one more
//! copy of the device's file. While no daemon runs, the mount stays and
//! the guests' requests wait in the kernel, as on a hard NFS mount; the
//! next `serve` of the same staging takes the copy back and answers them
//! (`adopt`). Each event thread of the daemon reads its own clone of the
//! device file, and the keeper holds every clone: the requests a thread
//! had read but not answered are listed on that clone (a clone closed for
//! good ends them with ECONNABORTED), so they stay in the kernel, and
//! `adopt` asks it to send them again.
//!
//! The keeper listens on an abstract Unix socket named after the staging
//! directory (no file to leave behind, no path-length limit) and serves
//! only its own user (`SO_PEERCRED`). Messages are one datagram of JSON
//! each way, a device fd beside it where one travels:
//! - `hold` (with the fds, up to [`MAX_FDS`]): keep this connection (the
//!   mount point and the kernel's INIT parameters go with it, for the
//!   synthetic INIT); a later `hold` replaces what was held;
//! - `take`: copies of the fds and the parameters;
//! - `ping`: its pid, and the mount and number of files it holds, no fd
//!   (the serving daemon asks every second: `keeper_watch`);
//! - `drop`: close it and exit (a clean stop, `fuse-let-go`, or a kept
//!   mount no longer in place or whose record is lost: the old mount then
//!   ends as before, ENOTCONN).
//!
//! The keeper exits when the connection ends (its fd polls POLLERR: the
//! mount was unmounted, or aborted), on `drop`, on SIGTERM (which is how an
//! administrator who will not restart the daemon fails the waiting I/O),
//! and if nothing is handed to it within [`FIRST_HOLD`]. A keeper that
//! exits otherwise while the daemon serves (killed) is noticed and
//! replaced by the daemon (`keeper_watch`).

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// A keeper handed nothing within this time exits.
const FIRST_HOLD: Duration = Duration::from_secs(30);
/// How long a daemon waits for the keeper it started to listen.
const START_WAIT: Duration = Duration::from_secs(5);
const MAX_MESSAGE: usize = 4096;
/// Most device files one connection is kept with (one per event thread).
pub const MAX_FDS: usize = 64;

/// What the kernel said at INIT, replayed to fuser when a daemon adopts
/// the connection (fuser shapes its replies by the ABI version).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitParams {
    pub major: u32,
    pub minor: u32,
    pub capabilities: u64,
}

/// A connection as the keeper holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub mount: PathBuf,
    pub init: InitParams,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Hold(Held),
    Take,
    Drop,
    Ping,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
enum Answer {
    Ok,
    Held(Held),
    Nothing,
    Refused { why: String },
    Pong(Pong),
}

/// A keeper's answer to `ping`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    pub pid: u32,
    /// The mount of the connection it holds, if any.
    pub mount: Option<PathBuf>,
    /// How many device files of it.
    pub files: usize,
}

impl Pong {
    /// Whether it holds the connection at `mount` with `files` files.
    pub fn holds(&self, mount: &Path, files: usize) -> bool {
        self.mount.as_deref() == Some(mount) && self.files >= files
    }
}

/// The abstract socket name of the keeper of staging `root`.
pub fn name_of(root: &Path) -> String {
    let h = blake3::hash(root.as_os_str().as_encoded_bytes());
    format!("recoverfs-keeper-{}", &h.to_hex()[..24])
}

fn addr(name: &str) -> Result<UnixAddr> {
    UnixAddr::new_abstract(name.as_bytes())
        .map_err(|e| Error::io(format!("keeper address {name}"), e.into()))
}

fn seqpacket() -> Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("keeper socket", e.into()))
}

fn send(sock: BorrowedFd<'_>, msg: &impl Serialize, fds: &[BorrowedFd<'_>]) -> Result<()> {
    let body = serde_json::to_vec(msg).expect("json");
    let iov = [IoSlice::new(&body)];
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg: Vec<ControlMessage> = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| Error::io("send to the FUSE keeper", e.into()))?;
    Ok(())
}

fn receive<T: serde::de::DeserializeOwned>(sock: BorrowedFd<'_>) -> Result<(T, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| match e {
            nix::errno::Errno::EAGAIN => busy("no answer within the wait"),
            e => Error::io("receive from the FUSE keeper", e.into()),
        })?;
        let mut fds = Vec::new();
        for c in msg
            .cmsgs()
            .map_err(|e| Error::io("keeper message", e.into()))?
        {
            if let ControlMessageOwned::ScmRights(received) = c {
                for raw in received {
                    // SAFETY: the kernel just installed `raw` in this process
                    // for us (SCM_RIGHTS); nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        (msg.bytes, fds)
    };
    let v = serde_json::from_slice(&buf[..len])
        .map_err(|e| Error::invalid(format!("a FUSE keeper message does not parse: {e}")))?;
    Ok((v, fds))
}

/// One request to the keeper of `name`: None when no keeper listens.
fn ask(
    name: &str,
    req: &Request,
    fds: &[BorrowedFd<'_>],
) -> Result<Option<(Answer, Vec<OwnedFd>)>> {
    ask_within(name, req, fds, ANSWER_WAIT)
}

/// How long a request waits for the keeper's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How long a ping waits for it (asked every second by a serving daemon).
const PING_WAIT: Duration = Duration::from_secs(2);
/// How long a connect waits for room in the keeper's accept queue: a
/// keeper that stopped accepting (frozen, stopped in a debugger) leaves
/// each timed-out request queued, and once the queue is full a connect
/// with no timeout would wait for good (review43 H1).
const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// A keeper that did not answer in time (busy or frozen, not gone): its
/// accept queue full, or no answer within the wait. [`ErrorKind::Busy`].
fn busy(what: &str) -> Error {
    Error::new(
        ErrorKind::Busy,
        format!("the FUSE keeper did not answer in time ({what})"),
    )
}

fn ask_within(
    name: &str,
    req: &Request,
    fds: &[BorrowedFd<'_>],
    wait: Duration,
) -> Result<Option<(Answer, Vec<OwnedFd>)>> {
    let sock = seqpacket()?;
    let tv = |d: Duration| nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _);
    let _ = socket::setsockopt(&sock, socket::sockopt::SendTimeout, &tv(CONNECT_WAIT));
    match socket::connect(sock.as_raw_fd(), &addr(name)?) {
        Ok(()) => {}
        Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT) => return Ok(None),
        Err(nix::errno::Errno::EAGAIN) => return Err(busy("its accept queue is full")),
        Err(e) => return Err(Error::io("connect to the FUSE keeper", e.into())),
    }
    // The name is public (any user can compute it and bind it first): the
    // device file goes only to a keeper of this user, or of root.
    let peer = socket::getsockopt(&sock, socket::sockopt::PeerCredentials)
        .map_err(|e| Error::io("ask who holds the FUSE keeper's socket", e.into()))?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if peer.uid() != me && peer.uid() != 0 {
        return Err(Error::not_permitted(format!(
            "the FUSE keeper's socket name {name} is held by process {} of uid {}, not by a keeper of this user: nothing is sent to it",
            peer.pid(),
            peer.uid()
        )));
    }
    // A keeper that stops answering must not hang a start or a stop.
    let _ = socket::setsockopt(&sock, socket::sockopt::ReceiveTimeout, &tv(wait));
    send(sock.as_fd(), req, fds)?;
    receive(sock.as_fd()).map(Some)
}

/// The connection the keeper of staging `root` holds, with copies of its
/// device files; None when there is no keeper or it holds nothing.
pub fn take(root: &Path) -> Result<Option<(Held, Vec<OwnedFd>)>> {
    match ask(&name_of(root), &Request::Take, &[])? {
        Some((Answer::Held(_), fds)) if fds.is_empty() => {
            Err(Error::invalid("the FUSE keeper sent no fd"))
        }
        Some((Answer::Held(h), fds)) => Ok(Some((h, fds))),
        Some((Answer::Refused { why }, _)) => Err(Error::not_permitted(why)),
        _ => Ok(None),
    }
}

/// Asks the keeper of staging `root` what it holds, no fd travelling;
/// None when no keeper listens. A keeper from before `ping` closes the
/// connection unanswered: an error, not None.
pub fn ping(root: &Path) -> Result<Option<Pong>> {
    match ask_within(&name_of(root), &Request::Ping, &[], PING_WAIT)? {
        Some((Answer::Pong(p), _)) => Ok(Some(p)),
        Some((Answer::Refused { why }, _)) => Err(Error::not_permitted(why)),
        Some(_) => Err(Error::invalid("the FUSE keeper answered out of turn")),
        None => Ok(None),
    }
}

/// Tells the keeper of staging `root` to let its connection go (and
/// exit). No keeper is fine.
pub fn release(root: &Path) -> Result<()> {
    match ask(&name_of(root), &Request::Drop, &[])? {
        Some((Answer::Refused { why }, _)) => Err(Error::not_permitted(why)),
        _ => Ok(()),
    }
}

/// Hands `fds` (the mount's device files, at most [`MAX_FDS`]) to the
/// keeper of staging `root`, starting one if none listens: then returns
/// it.
pub fn hand_over(root: &Path, held: Held, fds: &[BorrowedFd<'_>]) -> Result<Option<Started>> {
    if fds.is_empty() || fds.len() > MAX_FDS {
        return Err(Error::invalid(format!(
            "a FUSE keeper holds 1 to {MAX_FDS} device files, not {}",
            fds.len()
        )));
    }
    let name = name_of(root);
    let req = Request::Hold(held);
    if let Some((a, _)) = ask(&name, &req, fds)? {
        return answered(a).map(|()| None);
    }
    let started = start(&name, root)?;
    let deadline = Instant::now() + START_WAIT;
    loop {
        if let Some((a, _)) = ask(&name, &req, fds)? {
            return answered(a).map(|()| Some(started));
        }
        if Instant::now() > deadline {
            return Err(Error::io(
                "start the FUSE keeper",
                std::io::Error::new(std::io::ErrorKind::TimedOut, "it did not listen within 5 s"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn answered(a: Answer) -> Result<()> {
    match a {
        Answer::Ok => Ok(()),
        Answer::Refused { why } => Err(Error::not_permitted(why)),
        _ => Err(Error::invalid("the FUSE keeper answered out of turn")),
    }
}

/// A keeper this process started: its pid, and its exit status once its
/// reaper saw it exit.
#[derive(Clone)]
pub struct Started {
    pub pid: u32,
    exit: Arc<(Mutex<Option<ExitStatus>>, Condvar)>,
}

impl Started {
    /// Its exit status, waiting up to `wait` for the reaper: the keeper's
    /// socket is closed as it exits, a moment before it can be reaped.
    pub fn exit_status(&self, wait: Duration) -> Option<ExitStatus> {
        let (status, cv) = &*self.exit;
        let mut status = status.lock();
        cv.wait_while_for(&mut status, |s| s.is_none(), wait);
        *status
    }
}

/// Starts `recoverfs fuse-keeper` in a session of its own, its output to
/// `fuse-keeper.log` in the staging directory.
fn start(name: &str, root: &Path) -> Result<Started> {
    use std::os::unix::process::CommandExt;
    // Fault seam (tests): no keeper can be started while this file exists.
    if let Some(f) = std::env::var_os("RECOVERFS_FAULT_NO_KEEPER_START") {
        if Path::new(&f).exists() {
            return Err(Error::io(
                "start the FUSE keeper",
                std::io::Error::other("RECOVERFS_FAULT_NO_KEEPER_START"),
            ));
        }
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("find the recoverfs binary", e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("fuse-keeper.log"))
        .map_err(|e| {
            Error::io(
                format!("open {}", root.join("fuse-keeper.log").display()),
                e,
            )
        })?;
    let mut cmd = std::process::Command::new(exe);
    // The staging in its arguments names it to an administrator.
    cmd.args(["fuse-keeper", "--name", name, "--staging"])
        .arg(root)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("start the FUSE keeper", e))?;
    let started = Started {
        pid: child.id(),
        exit: Arc::default(),
    };
    // Reap it in the background should it exit while the daemon runs; its
    // status is for the daemon's warning (`keeper_watch`).
    let exit = started.exit.clone();
    std::thread::Builder::new()
        .name("keeper-reaper".into())
        .spawn(move || {
            let mut child = child;
            if let Ok(st) = child.wait() {
                *exit.0.lock() = Some(st);
                exit.1.notify_all();
            }
        })
        .map_err(|e| Error::io("spawn a thread", e))?;
    Ok(started)
}

/// The keeper process's main loop (`recoverfs fuse-keeper --name NAME`);
/// its log lines name it by `name` and pid.
pub fn run(name: &str) -> Result<()> {
    let label = format!("{name} (pid {})", std::process::id());
    let listener = seqpacket()?;
    match socket::bind(listener.as_raw_fd(), &addr(name)?) {
        Ok(()) => {}
        // Another keeper of this staging is running (it is the one), or a
        // process that squats the name (`ask` sends it nothing).
        Err(nix::errno::Errno::EADDRINUSE) => {
            eprintln!("fuse-keeper {label}: the socket name is taken; exiting (a daemon hands nothing to a process of another user)");
            return Ok(());
        }
        Err(e) => return Err(Error::io("bind the keeper socket", e.into())),
    }
    socket::listen(&listener, socket::Backlog::new(16).expect("backlog"))
        .map_err(|e| Error::io("listen on the keeper socket", e.into()))?;
    // SAFETY: getuid cannot fail and touches no memory.
    let me = unsafe { libc::getuid() };
    let started = Instant::now();
    let mut held: Option<(Held, Vec<OwnedFd>)> = None;
    loop {
        if held.is_none() && started.elapsed() > FIRST_HOLD {
            eprintln!("fuse-keeper {label}: nothing handed over within 30 s; exiting");
            return Ok(());
        }
        if let Some((h, fds)) = &held {
            if connection_ended(fds[0].as_fd()) {
                eprintln!(
                    "fuse-keeper {label}: the connection of {} ended; exiting",
                    h.mount.display()
                );
                return Ok(());
            }
        }
        // The listener only: a device file in a blocking poll would put the
        // keeper on the connection's wait queue, woken by every request.
        // `connection_ended` polls it with no timeout, which waits on
        // nothing.
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::io("poll", e.into())),
        }
        let readable = fds[0]
            .revents()
            .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLIN));
        if !readable {
            continue;
        }
        let Ok(raw) = socket::accept(listener.as_raw_fd()) else {
            continue;
        };
        // SAFETY: accept just returned this new fd; we own it.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        if serve_one(&label, conn.as_fd(), me, &mut held) {
            return Ok(());
        }
    }
}

/// Answers one request; true when the keeper should exit.
fn serve_one(
    name: &str,
    conn: BorrowedFd<'_>,
    me: u32,
    held: &mut Option<(Held, Vec<OwnedFd>)>,
) -> bool {
    let t = nix::sys::time::TimeVal::new(5, 0);
    let _ = socket::setsockopt(&conn, socket::sockopt::ReceiveTimeout, &t);
    let peer = socket::getsockopt(&conn, socket::sockopt::PeerCredentials);
    if !peer.is_ok_and(|c| c.uid() == me || c.uid() == 0) {
        let why = "the FUSE keeper serves only its own user".to_string();
        let _ = send(conn, &Answer::Refused { why }, &[]);
        return false;
    }
    let Ok((req, fds)) = receive::<Request>(conn) else {
        return false;
    };
    match req {
        Request::Hold(h) if !fds.is_empty() => {
            eprintln!(
                "fuse-keeper {name}: holding the connection of {} ({} device files)",
                h.mount.display(),
                fds.len()
            );
            // The files replaced stay open in the daemon that sent these.
            *held = Some((h, fds));
            let _ = send(conn, &Answer::Ok, &[]);
        }
        Request::Hold(_) => {
            let why = "hold came without a device fd".to_string();
            let _ = send(conn, &Answer::Refused { why }, &[]);
        }
        Request::Take => match held {
            Some((h, kept)) => {
                let kept: Vec<BorrowedFd> = kept.iter().map(|f| f.as_fd()).collect();
                let _ = send(conn, &Answer::Held(h.clone()), &kept);
            }
            None => {
                let _ = send(conn, &Answer::Nothing, &[]);
            }
        },
        Request::Ping => {
            let pong = Pong {
                pid: std::process::id(),
                mount: held.as_ref().map(|(h, _)| h.mount.clone()),
                files: held.as_ref().map_or(0, |(_, fds)| fds.len()),
            };
            let _ = send(conn, &Answer::Pong(pong), &[]);
        }
        Request::Drop => {
            if let Some((h, _)) = held.take() {
                eprintln!(
                    "fuse-keeper {name}: letting the connection of {} go",
                    h.mount.display()
                );
            }
            let _ = send(conn, &Answer::Ok, &[]);
            return true;
        }
    }
    false
}

/// The kernel reports an ended connection (unmounted or aborted) as
/// POLLERR on every copy of its device file.
pub(crate) fn connection_ended(fd: BorrowedFd<'_>) -> bool {
    let mut p = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::empty())];
    match nix::poll::poll(&mut p, nix::poll::PollTimeout::ZERO) {
        Ok(_) => p[0].revents().is_some_and(|r| {
            r.intersects(
                nix::poll::PollFlags::POLLERR
                    | nix::poll::PollFlags::POLLHUP
                    | nix::poll::PollFlags::POLLNVAL,
            )
        }),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeper_names_differ_per_staging_and_fit_an_abstract_address() {
        let a = name_of(Path::new("/var/lib/recoverfs/staging"));
        let b = name_of(Path::new("/var/lib/recoverfs/staging2"));
        assert_ne!(a, b);
        assert!(a.len() < 100);
        assert_eq!(a, name_of(Path::new("/var/lib/recoverfs/staging")));
    }

    #[test]
    fn held_fds_travel_to_a_taker_in_order_and_drop_ends_the_keeper() {
        let name = format!("recoverfs-keeper-test-{}", std::process::id());
        let keeper = {
            let name = name.clone();
            std::thread::spawn(move || run(&name))
        };
        // Any fds travel; a pipe's two ends stand in for /dev/fuse clones.
        let (r, w) = nix::unistd::pipe().unwrap();
        let held = Held {
            mount: "/mnt/x".into(),
            init: InitParams {
                major: 7,
                minor: 41,
                capabilities: 0x1234_0000_0001,
            },
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = loop {
            if let Some(a) =
                ask(&name, &Request::Hold(held.clone()), &[r.as_fd(), w.as_fd()]).unwrap()
            {
                break a;
            }
            assert!(Instant::now() < deadline, "keeper never listened");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(matches!(answer.0, Answer::Ok));
        let (a, fds) = ask(&name, &Request::Ping, &[]).unwrap().unwrap();
        let Answer::Pong(p) = a else {
            panic!("no pong")
        };
        assert!(fds.is_empty(), "a ping carries no fd");
        assert_eq!(p.pid, std::process::id());
        assert!(p.holds(Path::new("/mnt/x"), 2) && !p.holds(Path::new("/mnt/y"), 2));
        assert!(!p.holds(Path::new("/mnt/x"), 3), "{p:?}");
        let (a, fds) = ask(&name, &Request::Take, &[]).unwrap().unwrap();
        let Answer::Held(h) = a else {
            panic!("no connection held")
        };
        assert_eq!(h, held);
        assert_eq!(fds.len(), 2, "every fd came back");
        let flags = |fd: &OwnedFd| {
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap()
                & libc::O_ACCMODE
        };
        assert_eq!(
            (flags(&fds[0]), flags(&fds[1])),
            (libc::O_RDONLY, libc::O_WRONLY),
            "the read end first, then the write end"
        );
        let st = nix::sys::stat::fstat(fds[0].as_raw_fd()).unwrap();
        let st0 = nix::sys::stat::fstat(r.as_raw_fd()).unwrap();
        assert_eq!(
            (st.st_dev, st.st_ino),
            (st0.st_dev, st0.st_ino),
            "the same pipe came back"
        );
        assert!(matches!(
            ask(&name, &Request::Drop, &[]).unwrap().unwrap().0,
            Answer::Ok
        ));
        keeper.join().unwrap().unwrap();
        assert!(
            ask(&name, &Request::Take, &[]).unwrap().is_none(),
            "the keeper is gone"
        );
    }
}
