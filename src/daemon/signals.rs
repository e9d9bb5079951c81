//! The signals that stop a daemon, counted into one watch (1: the first,
//! 2: a second, which ends the wait for control requests in flight).
//!
//! * SIGINT, SIGTERM: a clean stop. Staging is made durable, then the FUSE
//!   mount is unmounted (guests still using it see ENOTCONN) and its
//!   keeper ends.
//! * SIGUSR2: a hand-over, for a restart such as an upgrade. Staging is
//!   made durable as at a clean stop, but the FUSE mount stays with its
//!   keeper (`MountedDatastore::hand_over`): guests' FUSE I/O waits, as
//!   after a crash, until the next `serve` of this staging adopts the
//!   connection. Without a keeper it is a clean stop. (SIGUSR1 is left
//!   alone: debuggers and profilers use it.)
//!
//! The first signal decides which: a later one only shortens the wait.
//!
//! SIGUSR2's default action ends a process, so one that came while the
//! daemon started (a reload sent a moment too early) used to kill it as a
//! crash would. `main` blocks SIGUSR2 before any thread exists, so every
//! thread the daemon starts has it blocked and an early one stays
//! pending; once the handlers are in place the thread that runs the
//! control API unblocks it ([`accept_hand_over`]) and a pending one is
//! handed over then. SIGINT and SIGTERM are not deferred: an
//! administrator must be able to stop a start that hangs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The handlers, installed before the control socket is bound (a signal
/// as soon as it answers must stop the daemon cleanly, not kill it).
pub(super) struct Handlers {
    int: Signal,
    term: Signal,
    usr2: Signal,
}

impl Handlers {
    pub(super) fn install() -> Option<Handlers> {
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(int), Ok(term), Ok(usr2)) => Some(Handlers { int, term, usr2 }),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                tracing::error!(
                    "no SIGINT/SIGTERM/SIGUSR2 handler ({e}): a signal ends the daemon as a crash would"
                );
                None
            }
        }
    }
}

/// Blocks SIGUSR2 in the calling thread (and so in every thread it starts
/// from then on): call before any other thread exists.
pub fn defer_hand_over() {
    set_usr2(libc::SIG_BLOCK);
}

/// Unblocks SIGUSR2 in the calling thread, after [`Handlers::install`]: a
/// pending one is delivered at once.
pub(super) fn accept_hand_over() {
    set_usr2(libc::SIG_UNBLOCK);
}

fn set_usr2(how: libc::c_int) {
    // SAFETY: the set is initialised by sigemptyset before use, and
    // pthread_sigmask only reads it and changes this thread's mask.
    let rc = unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGUSR2);
        libc::pthread_sigmask(how, set.as_ptr(), std::ptr::null_mut())
    };
    if rc != 0 {
        let e = std::io::Error::from_raw_os_error(rc);
        tracing::warn!("could not change the SIGUSR2 mask ({e}): a SIGUSR2 during the start ends the daemon as a crash would");
    }
}

/// Counts signals into `n` (saturating at 2); a SIGUSR2 that comes first
/// sets `hand_over`.
pub(super) async fn count(
    n: tokio::sync::watch::Sender<u8>,
    handlers: Option<Handlers>,
    hand_over: Arc<AtomicBool>,
) {
    let Some(Handlers {
        mut int,
        mut term,
        mut usr2,
    }) = handlers
    else {
        return;
    };
    loop {
        let what = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = usr2.recv() => "SIGUSR2",
        };
        let k = (*n.borrow()).saturating_add(1).min(2);
        match (k, what) {
            (1, "SIGUSR2") => {
                hand_over.store(true, Ordering::Release);
                tracing::info!("SIGUSR2: shutting down for a restart; the FUSE mount stays with its keeper for the next `serve`");
            }
            (1, _) => tracing::info!("{what}: shutting down"),
            _ => tracing::warn!("{what} again: not waiting for requests in flight"),
        }
        n.send_replace(k);
    }
}
