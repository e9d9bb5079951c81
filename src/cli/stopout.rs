//! Standard output that a stop (SIGINT, SIGTERM) can interrupt, and
//! commands that end quietly when the reader of their output goes away.
//!
//! `files cat … | reader`: once the reader stops reading (stalled, or
//! paused in a pager), a plain write to the full pipe blocks for ever, and
//! the stop flag set by the signal handler is never looked at; the command
//! then hangs until the reader exits, holding its scratch recovery. So each
//! write first waits for room with poll(2) in short steps, checking the
//! flag, then writes at most `PIPE_BUF` bytes, which a pipe reported
//! writable takes without blocking. Regular files and terminals are always
//! ready: for them it is a plain write in 4 KiB pieces (buffer it).

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// What poll's POLLOUT promises a pipe takes whole (Linux: one page).
const PIPE_BUF: usize = 4096;
/// The error of a write the stop flag ended.
pub const STOPPED: &str = "stopped while the reader of standard output was not reading";
/// How often a blocked write looks at the stop flag.
const STEP_MS: u16 = 200;

pub struct StoppableOut<'a> {
    fd: BorrowedFd<'a>,
    stop: &'a AtomicBool,
}

impl<'a> StoppableOut<'a> {
    pub fn new(fd: BorrowedFd<'a>, stop: &'a AtomicBool) -> Self {
        StoppableOut { fd, stop }
    }

    /// Waits until `fd` takes a write, or the stop flag is set.
    fn wait_for_room(&self) -> io::Result<()> {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                // Not `Interrupted`: `write_all` retries that for ever.
                return Err(io::Error::other(STOPPED));
            }
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut fds, PollTimeout::from(STEP_MS)) {
                // Ready, or an error/hangup the write itself reports.
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Write for StoppableOut<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.wait_for_room()?;
            match nix::unistd::write(self.fd, &buf[..buf.len().min(PIPE_BUF)]) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs a command so that, when the reader of standard output goes away
/// (`| head -1`), it ends as a Unix tool killed by SIGPIPE does: no
/// message, exit status 141 in the shell. Not 0: output was lost, and a
/// command that was going to fail (`list` of a damaged repository) must
/// not look successful to `set -o pipefail`.
///
/// SIGPIPE itself stays ignored (Rust's default): with its default action
/// a write to a closed socket (S3, NBD, the daemon's control socket) would
/// kill the command on the spot, repository locks and scratch mounts
/// left behind. So the write fails with EPIPE instead, and this catches
/// both forms that takes: `println!`'s panic ("failed printing to
/// stdout"), unwound here so destructors release what the command holds;
/// and an error (of a `write` to stdout) returned with EPIPE. Either
/// counts only while stdout is indeed a pipe or socket with no reader,
/// so an EPIPE of a socket is still reported as the error it is.
pub fn end_quietly_when_stdout_closes<T>(
    f: impl FnOnce() -> crate::error::Result<T>,
) -> crate::error::Result<T> {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_closed_stdout_panic(text(info.payload())) {
            return default(info);
        }
        // Another thread's panic would reach the main thread as a new
        // one ("a scoped thread panicked"), or not at all: end here, with
        // the repository locks released first (nothing unwinds).
        if std::thread::current().name() != Some("main") {
            crate::repo::locks::release_all(std::time::Duration::from_secs(2));
            die_of_sigpipe();
        }
    }));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Err(e)) if e.errno() == libc::EPIPE && stdout_reader_gone() => die_of_sigpipe(),
        Ok(r) => lost_lines(r),
        Err(p) => {
            if is_closed_stdout_panic(text(&*p)) {
                die_of_sigpipe();
            }
            std::panic::resume_unwind(p)
        }
    }
}

/// `r`, unless a line of its output (`say!`) was lost: a reader gone is
/// SIGPIPE's exit as above; any other failed write (a full disk under
/// `> ids.txt`) fails the command, since a backup's id it printed is lost
/// and must not look like success (review27 M1). Only a terminal that was
/// hung up (EIO on a tty) leaves the exit the work deserves: nobody is
/// there to read it.
fn lost_lines<T>(r: crate::error::Result<T>) -> crate::error::Result<T> {
    use super::say::{failure, To};
    let Some(e) = failure(To::Out) else {
        return r;
    };
    if e.raw_os_error() == Some(libc::EPIPE) && stdout_reader_gone() {
        die_of_sigpipe();
    }
    // A hung-up tty no longer answers isatty (its ioctls fail with EIO):
    // a character device failing a write with EIO is taken for one.
    let hung_up_tty = e.raw_os_error() == Some(libc::EIO) && stdout_is_char_device();
    match r {
        Ok(_) if !hung_up_tty => Err(crate::error::Error::io(
            "the work was done, but writing its result to standard output failed",
            e,
        )),
        r => r,
    }
}

fn stdout_is_char_device() -> bool {
    use std::os::unix::fs::FileTypeExt;
    let fd = io::stdout().as_fd().try_clone_to_owned();
    fd.ok()
        .and_then(|fd| std::fs::File::from(fd).metadata().ok())
        .is_some_and(|m| m.file_type().is_char_device())
}

/// A panic's message, when it is text.
fn text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    (payload.downcast_ref::<String>().map(String::as_str))
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// Whether a panic is `print!`'s on a stdout whose reader is gone.
fn is_closed_stdout_panic(msg: Option<&str>) -> bool {
    msg.is_some_and(|m| m.starts_with("failed printing to stdout")) && stdout_reader_gone()
}

/// Whether stdout is a pipe or socket whose reader has gone: poll reports
/// an error or hang-up on it (never on a file or a live pipe).
fn stdout_reader_gone() -> bool {
    let stdout = io::stdout();
    let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::POLLOUT)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
}

/// Ends the process as SIGPIPE's default action does.
fn die_of_sigpipe() -> ! {
    use nix::sys::signal::{raise, signal, SigHandler, SigSet, Signal};
    // SAFETY: restores the default action of one signal; no handler runs.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let mut set = SigSet::empty();
    set.add(Signal::SIGPIPE);
    let _ = set.thread_unblock();
    let _ = raise(Signal::SIGPIPE);
    std::process::exit(128 + libc::SIGPIPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    /// A pipe whose reader never reads, filled to the brim.
    fn full_pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let fl = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        let nb = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nb)).unwrap();
        let mut n = 0;
        while nix::unistd::write(&w, &[0u8; 4096]).is_ok() {
            n += 1;
            assert!(n < 1000, "the pipe never filled: O_NONBLOCK not set?");
        }
        nix::fcntl::fcntl(
            w.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nb - nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        (r, w)
    }

    #[test]
    fn a_write_to_a_pipe_nobody_reads_ends_soon_after_the_stop_flag_is_set() {
        let (_r, w) = full_pipe();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = Instant::now();
            let writer = s.spawn(|| StoppableOut::new(w.as_fd(), &stop).write_all(&[1u8; 1 << 20]));
            std::thread::sleep(Duration::from_millis(300));
            assert!(!writer.is_finished(), "the full pipe took the write");
            stop.store(true, Ordering::SeqCst);
            let e = writer.join().unwrap().unwrap_err();
            assert_eq!(e.to_string(), STOPPED);
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        });
    }

    #[test]
    fn a_reader_that_reads_gets_every_byte_in_order() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let stop = AtomicBool::new(false);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|s| {
            let reader = s.spawn(move || {
                let mut got = vec![];
                io::Read::read_to_end(&mut std::fs::File::from(r), &mut got).unwrap();
                got
            });
            let mut out = io::BufWriter::new(StoppableOut::new(w.as_fd(), &stop));
            out.write_all(&data).unwrap();
            out.flush().unwrap();
            drop(out);
            drop(w);
            assert_eq!(reader.join().unwrap(), data);
        });
    }
}
