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
//! crash would. `main` installs a handler first thing ([`defer_hand_over`])
//! that only notes it; once the control API's handlers are in place,
//! [`count`] takes a noted one as the first signal, a hand-over. Not by
//! blocking the signal: a blocked mask is inherited by every thread and,
//! across exec, by every child (the keeper, `fusermount3`), where a
//! handler is reset to the default. SIGINT and SIGTERM are not deferred:
//! an administrator must be able to stop a start that hangs.

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
                    "no SIGINT/SIGTERM/SIGUSR2 handler ({e}): SIGINT or SIGTERM ends the daemon as a crash would, and SIGUSR2 is ignored"
                );
                None
            }
        }
    }
}

/// A SIGUSR2 came before [`count`] ran.
static EARLY_USR2: AtomicBool = AtomicBool::new(false);

extern "C" fn note_usr2(_: libc::c_int) {
    EARLY_USR2.store(true, Ordering::Release);
}

/// Notes a SIGUSR2 instead of dying of it, until the control API's
/// handlers take over (see the module doc). Call first thing in `serve`.
pub fn defer_hand_over() {
    // SAFETY: `sa` is zeroed, then its mask emptied and its handler set to
    // a function that only stores to an atomic (async-signal-safe);
    // sigaction only reads it.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = note_usr2 as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!("could not set a SIGUSR2 handler ({e}): a SIGUSR2 during the start ends the daemon as a crash would");
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
    // One noted during the start is the first signal. The same signal may
    // also have reached the handler just installed: taken once.
    let mut early = EARLY_USR2.swap(false, Ordering::AcqRel);
    if early {
        let _ = futures::FutureExt::now_or_never(usr2.recv());
    }
    loop {
        let what = match std::mem::take(&mut early) {
            true => "SIGUSR2",
            false => tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
                _ = usr2.recv() => "SIGUSR2",
            },
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
