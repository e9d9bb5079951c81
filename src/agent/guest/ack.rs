//! The end of a backup in the guest: after its end frame the agent waits
//! for the host's acknowledgement, since exiting earlier could drop frames
//! still queued in the port. A host behind a slow store may take minutes
//! to reach the end frame, so the agent must not give up while the host
//! is alive: a [`Listener`] reads what the host sends on the port from the
//! start of the job (so nothing piles up in the port's queues): `K`
//! keep-alive bytes, which a host that takes part sends every few seconds
//! while it drains the stream (its job says so: `keepalive`), and the
//! acknowledgement (any other byte, `A`). The wait ends with the
//! acknowledgement, when the host closes its end of the port (a host that
//! failed, was killed or detached the port), or after [`ACK_SILENCE`]
//! without a byte from a host that sends keep-alives; a host before them
//! sends nothing until the acknowledgement, so with it the agent waits for
//! the acknowledgement or the closed port up to [`OLD_HOST_WAIT`].

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest silence of a host that sends keep-alives (every 2 s).
pub const ACK_SILENCE: Duration = Duration::from_secs(if cfg!(test) { 3 } else { 60 });

/// The longest wait for the acknowledgement of a host before keep-alives,
/// which cannot say it is still alive but closes its end when it ends.
pub const OLD_HOST_WAIT: Duration = Duration::from_secs(3600);

/// How the wait for the acknowledgement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Received,
    /// The host closed its end of the port.
    Closed,
    /// No byte from the host within the silence allowed.
    Silent,
}

#[derive(Default)]
struct State {
    acked: AtomicBool,
    closed: AtomicBool,
    /// When the host last sent a byte.
    last: Mutex<Option<Instant>>,
}

/// Reads what the host sends on the port, on a thread of its own.
pub struct Listener {
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Starts reading `f` (the port, open for reading).
    pub fn start(f: File) -> Listener {
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || listen(f, &s, &st));
        Listener {
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits for the acknowledgement: at most `limit`, and with `silence`,
    /// no longer than that without a byte from the host.
    pub fn wait(mut self, limit: Duration, silence: Option<Duration>) -> Ack {
        let t0 = Instant::now();
        let ack = loop {
            if self.state.acked.load(Ordering::SeqCst) {
                break Ack::Received;
            }
            if self.state.closed.load(Ordering::SeqCst) {
                break Ack::Closed;
            }
            let last = self.state.last.lock().expect("lock").unwrap_or(t0).max(t0);
            if t0.elapsed() > limit || silence.is_some_and(|s| last.elapsed() > s) {
                break Ack::Silent;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.finish();
        ack
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.finish();
    }
}

fn listen(mut f: File, s: &State, stop: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        if !fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            // POLLHUP or POLLERR alone: the host's end is closed.
            break;
        }
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                *s.last.lock().expect("lock") = Some(Instant::now());
                if buf[..n].iter().any(|&b| b != b'K') {
                    s.acked.store(true, Ordering::SeqCst);
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if !stop.load(Ordering::SeqCst) {
        s.closed.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Listener, UnixStream) {
        let (guest, host) = UnixStream::pair().unwrap();
        (
            Listener::start(File::from(std::os::fd::OwnedFd::from(guest))),
            host,
        )
    }

    #[test]
    fn the_agent_waits_past_the_silence_limit_while_keep_alives_come() {
        let (l, mut host) = pair();
        let t0 = Instant::now();
        let h = std::thread::spawn(move || {
            // Three times the silence allowed, a keep-alive a second.
            for _ in 0..3 * ACK_SILENCE.as_secs() {
                host.write_all(b"K").unwrap();
                std::thread::sleep(Duration::from_secs(1));
            }
            host.write_all(b"A").unwrap();
            host
        });
        assert_eq!(l.wait(OLD_HOST_WAIT, Some(ACK_SILENCE)), Ack::Received);
        assert!(t0.elapsed() >= 3 * ACK_SILENCE, "{:?}", t0.elapsed());
        drop(h.join().unwrap());
    }

    #[test]
    fn a_silent_host_that_sends_keep_alives_is_given_up_on() {
        let (l, mut host) = pair();
        host.write_all(b"KK").unwrap();
        let t0 = Instant::now();
        assert_eq!(l.wait(OLD_HOST_WAIT, Some(ACK_SILENCE)), Ack::Silent);
        assert!(t0.elapsed() < ACK_SILENCE * 2, "{:?}", t0.elapsed());
    }

    #[test]
    fn a_host_before_keep_alives_is_waited_for_until_it_acknowledges_or_closes() {
        let (l, mut host) = pair();
        let h = std::thread::spawn(move || {
            std::thread::sleep(ACK_SILENCE * 2);
            host.write_all(b"A").unwrap();
            host
        });
        assert_eq!(l.wait(OLD_HOST_WAIT, None), Ack::Received);
        drop(h.join().unwrap());
        let (l, host) = pair();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            drop(host);
        });
        assert_eq!(l.wait(OLD_HOST_WAIT, None), Ack::Closed);
        h.join().unwrap();
    }
}
