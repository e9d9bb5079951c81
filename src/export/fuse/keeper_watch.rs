//! The serving daemon watches the keeper of its FUSE mount (review32
//! L10). A keeper that died while the daemon served (killed by an
//! administrator, or by the OOM killer) used to go unnoticed, and the
//! daemon's next crash took the mount with it. Now the daemon logs a
//! warning naming the staging and how the keeper ended, hands the
//! connection to a new keeper, and `status` shows the keeper's state
//! (`fuse_keeper`: [`KeeperStatus`]).
//!
//! How: one thread per mount asks the keeper `ping` every [`TICK`].
//! Asking, rather than waiting on the keeper's process, covers every
//! keeper alike: one this daemon started (its child, whose exit status
//! the reaper records for the warning), and one it found running (a
//! crashed daemon's, now adopted: not its child, so no wait(2); and a
//! pidfd of the pid `SO_PEERCRED` gave could be a recycled pid's). It
//! also catches a keeper alive but no longer holding this connection.
//! A ping carries no fd, and the keeper wakes every second anyway. To
//! hand the connection over again the daemon keeps a duplicate of every
//! event thread's device file: the same open files, so the kernel sees
//! nothing new.
//!
//! Not a loss: the connection ended (unmounted or aborted: the keeper
//! exits with it, and so does the watch), and the daemon's own stop or
//! hand-over (the watch is stopped first). A hand-over that fails is
//! tried again every [`RETRY`] until it works or the daemon stops.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use super::keeper::{self, Held, Started};
use crate::error::{Error, ErrorKind, Result};

/// How often the keeper is asked.
pub const TICK: Duration = Duration::from_secs(1);
/// How often a failed hand-over is tried again.
pub const RETRY: Duration = Duration::from_secs(5);

/// The keeper of the FUSE mount, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeeperStatus {
    /// `holding` (a keeper holds the connection), `lost` (none does: the
    /// mount dies with this daemon), `ended` (the connection ended) or
    /// `off` (no keeper is used).
    pub state: &'static str,
    /// When it came to this state (RFC 3339).
    pub since: String,
    /// Keepers handed the connection after one was lost.
    pub restarts: u64,
    /// The keeper holding it.
    pub pid: Option<u32>,
    /// Why it is lost or off.
    pub why: Option<String>,
}

/// The keeper's state, shared by the watch and the control API.
pub struct Health(Mutex<KeeperStatus>);

impl Health {
    /// Starts in `state`.
    pub fn new(state: &'static str, why: Option<String>) -> Arc<Health> {
        Arc::new(Health(Mutex::new(KeeperStatus {
            state,
            since: now(),
            restarts: 0,
            pid: None,
            why,
        })))
    }

    pub fn status(&self) -> KeeperStatus {
        self.0.lock().clone()
    }

    /// `since` moves only when the state changes.
    fn set(&self, state: &'static str, pid: Option<u32>, why: Option<String>) {
        let mut s = self.0.lock();
        if s.state != state {
            s.since = now();
        }
        (s.state, s.pid, s.why) = (state, pid, why);
    }

    fn restarted(&self, pid: Option<u32>) {
        self.set("holding", pid, None);
        self.0.lock().restarts += 1;
    }
}

fn now() -> String {
    crate::util::rfc3339(crate::util::now_unix())
}

/// The running watch of one mount; stopped (and joined) when dropped.
pub struct Watch {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Hands the connection `held` (device files `fds`, duplicates the
    /// watch keeps) to the keeper of staging `root`, then watches it. A
    /// first hand-over that fails is logged and tried again.
    pub fn start(
        root: PathBuf,
        held: Held,
        fds: Vec<OwnedFd>,
        health: Arc<Health>,
    ) -> Result<Watch> {
        if fds.is_empty() {
            return Err(Error::invalid("a FUSE keeper watch needs a device file"));
        }
        let mut w = Watched {
            root,
            held,
            fds,
            health,
            started: None,
            last_failure: None,
        };
        match w.hand_over() {
            Ok(pid) => w.health.set("holding", pid, None),
            Err(e) => {
                tracing::warn!("the FUSE connection has no keeper ({e}): if this daemon dies, its mount dies with it (tried again every {} s)", RETRY.as_secs());
                w.lost(e.to_string());
            }
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("keeper-watch".into())
                .spawn(move || w.run(&stop))
                .map_err(|e| Error::io("spawn a thread", e))?
        };
        Ok(Watch {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Watched {
    root: PathBuf,
    held: Held,
    fds: Vec<OwnedFd>,
    health: Arc<Health>,
    /// The keeper this daemon started last, for its exit status.
    started: Option<Started>,
    /// The last failed hand-over's error, logged once until it changes.
    last_failure: Option<String>,
}

impl Watched {
    fn run(mut self, stop: &(Mutex<bool>, Condvar)) {
        let mut next_try = Instant::now() + RETRY;
        loop {
            {
                let mut stopped = stop.0.lock();
                if !*stopped {
                    stop.1.wait_for(&mut stopped, TICK);
                }
                if *stopped {
                    return;
                }
            }
            if self.ended() {
                return;
            }
            let st = self.health.status();
            if st.state == "holding" {
                let Some(why) = self.check(st.pid) else {
                    continue;
                };
                if self.ended() {
                    return;
                }
                tracing::warn!(
                    "{why}: handing the FUSE connection of {} over to a new keeper",
                    self.held.mount.display()
                );
                self.lost(why);
                next_try = Instant::now();
            }
            if Instant::now() < next_try {
                continue;
            }
            match self.hand_over() {
                Ok(pid) => {
                    self.health.restarted(pid);
                    self.last_failure = None;
                    tracing::info!(
                        "a new FUSE keeper (pid {}) of staging {} holds the connection of {} again",
                        pid.map_or("?".into(), |p| p.to_string()),
                        self.root.display(),
                        self.held.mount.display()
                    );
                }
                Err(e) => {
                    let e = e.to_string();
                    if self.last_failure.as_deref() != Some(e.as_str()) {
                        tracing::warn!("could not hand the FUSE connection of {} to a new keeper ({e}): tried again every {} s; until then, if this daemon dies, its mount dies with it", self.held.mount.display(), RETRY.as_secs());
                    }
                    self.last_failure = Some(e.clone());
                    self.lost(e);
                    next_try = Instant::now() + RETRY;
                }
            }
        }
    }

    /// None while the keeper holds this connection; else why it is lost.
    /// A keeper that answers oddly (one from before `ping`, or one too
    /// busy to answer in time) is taken to hold it still; a socket name
    /// held by another user is a loss.
    fn check(&self, pid: Option<u32>) -> Option<String> {
        let staging = self.root.display();
        let shown = pid.map_or("?".into(), |p| p.to_string());
        match keeper::ping(&self.root) {
            Ok(Some(p)) if p.holds(&self.held.mount, self.fds.len()) => {
                if Some(p.pid) != pid {
                    self.health.set("holding", Some(p.pid), None);
                }
                None
            }
            Ok(Some(p)) => Some(format!(
                "the FUSE keeper of staging {staging} (pid {}) no longer holds this daemon's connection (it holds {} device file(s) of {})",
                p.pid,
                p.files,
                p.mount.map_or("nothing".into(), |m| m.display().to_string()),
            )),
            Ok(None) => Some(format!(
                "the FUSE keeper of staging {staging} (pid {shown}) exited ({}) while this daemon serves",
                self.exit_of(pid)
            )),
            // Busy or frozen (no answer in time), or one from before
            // `ping`: it still holds the files it was handed.
            Err(e) if e.kind() != ErrorKind::NotPermitted => {
                tracing::debug!("the FUSE keeper of staging {staging} answered oddly: {e}");
                None
            }
            // The socket name is another user's (review43 M2): no keeper
            // of ours answers there, and a new one cannot bind it.
            Err(e) => Some(e.to_string()),
        }
    }

    /// How the keeper `pid` ended, as far as this daemon can know.
    fn exit_of(&self, pid: Option<u32>) -> String {
        match &self.started {
            Some(s) if Some(s.pid) == pid => match s.exit_status(Duration::from_secs(1)) {
                Some(st) => st.to_string(),
                None => "its exit status not seen yet".into(),
            },
            _ => "exit status unknown: this daemon did not start it".into(),
        }
    }

    /// The connection ended (unmounted or aborted): its keeper went with
    /// it, and there is nothing left to keep.
    fn ended(&self) -> bool {
        if !keeper::connection_ended(self.fds[0].as_fd()) {
            return false;
        }
        tracing::info!(
            "the FUSE connection of {} ended: no keeper is needed any more",
            self.held.mount.display()
        );
        self.health.set("ended", None, None);
        true
    }

    fn lost(&self, why: String) {
        self.health.set("lost", None, Some(why));
    }

    /// One hand-over; the pid of the keeper that took it, if known.
    fn hand_over(&mut self) -> Result<Option<u32>> {
        let fds: Vec<BorrowedFd> = self.fds.iter().map(|f| f.as_fd()).collect();
        match keeper::hand_over(&self.root, self.held.clone(), &fds)? {
            Some(started) => {
                let pid = started.pid;
                self.started = Some(started);
                Ok(Some(pid))
            }
            // A keeper already listened (one this daemon adopted).
            None => Ok(keeper::ping(&self.root).ok().flatten().map(|p| p.pid)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_moves_with_the_state_only_and_restarts_count_hand_overs_after_a_loss() {
        let h = Health::new("lost", Some("no keeper yet".into()));
        h.0.lock().since = "then".into();
        h.set("lost", None, Some("still none".into()));
        assert_eq!(h.status().since, "then", "same state: since stays");
        h.restarted(Some(7));
        let s = h.status();
        assert_eq!(
            (s.state, s.restarts, s.pid, s.why.clone()),
            ("holding", 1, Some(7), None)
        );
        assert_ne!(s.since, "then");
        let json = serde_json::to_value(&s).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, ["pid", "restarts", "since", "state", "why"]);
    }
}
