//! Removing every lock this process holds at once, for a process about to
//! exit on a signal or a daemon's stop (see [`release_all`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Repository, HELD, RELEASE_WAIT, STALE};
use crate::error::Error;

/// Removes every lock this process holds, all at once, each once no
/// protected step is running under it (waiting at most `wait`) and then
/// waiting at most [`RELEASE_WAIT`] for its removal: a store that does
/// not answer holds the whole release for at most `wait` and
/// [`RELEASE_WAIT`] more, not a request deadline per lock (with N locks,
/// a stop took N minutes). A lock not removed in that time is left
/// behind, told in one line, to go stale as a killed process's does: at
/// once for this host once this process is gone, after [`STALE`] for
/// others. For a process about to exit on a signal, or a daemon's stop.
/// Returns how many were removed.
pub fn release_all(wait: Duration) -> usize {
    release_matching(wait, |_| true)
}

/// How the release of one lock goes (see [`release_one`]).
enum Step {
    /// Under its gate, released: its removal starts.
    Gated,
    Done(std::result::Result<(), NotRemoved>),
}

/// Why [`release_matching`] did not remove a lock.
enum NotRemoved {
    /// Removed before (its holder dropped it, or an earlier release).
    Already,
    /// A protected step held it past `wait`.
    InUse,
    Failed(Error),
}

/// Releases one lock under its gate (see [`super::Gate`]), telling each step;
/// the gate is set for good even if the removal fails, so no step runs
/// under it again.
fn release_one(
    repo: &Repository,
    key: &str,
    gate: &Mutex<bool>,
    wait: Duration,
    tell: impl Fn(Step),
) {
    let Some(mut released) = gate.try_lock_for(wait) else {
        return tell(Step::Done(Err(NotRemoved::InUse)));
    };
    if std::mem::replace(&mut *released, true) {
        return tell(Step::Done(Err(NotRemoved::Already)));
    }
    // The flag set is the release: a dropped lock waiting for the gate
    // must not also wait for this removal (review29 H1).
    drop(released);
    tell(Step::Gated);
    tell(Step::Done(
        repo.backend().delete(key).map_err(NotRemoved::Failed),
    ));
}

/// [`release_all`] of the locks in repositories `of` picks.
pub(super) fn release_matching(wait: Duration, of: impl Fn(&Arc<Repository>) -> bool) -> usize {
    let held: Vec<_> = HELD
        .lock()
        .iter()
        .filter(|(r, _, _)| of(r))
        .cloned()
        .collect();
    if held.is_empty() {
        return 0;
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    // When each lock is given up on: at first, after `wait` for its gate
    // and the removal's time; once its removal starts, the removal's time.
    let first_due = Instant::now() + wait + RELEASE_WAIT;
    let mut due = std::collections::BTreeMap::new();
    for (repo, key, gate) in held {
        due.insert(key.clone(), first_due);
        // A thread each: a removal that hangs holds none of the others.
        let tell = {
            let (tx, key) = (tx.clone(), key.clone());
            move |step| {
                let _ = tx.send((key.clone(), step));
            }
        };
        let (repo2, key2, gate2, tell2) = (repo.clone(), key.clone(), gate.clone(), tell.clone());
        let started = std::thread::Builder::new()
            .name("repo-unlock".into())
            .spawn(move || release_one(&repo2, &key2, &gate2, wait, tell2));
        if started.is_err() {
            release_one(&repo, &key, &gate, wait, tell);
        }
    }
    drop(tx);
    let total = due.len();
    let (mut removed, mut already, mut left) = (0, 0, vec![]);
    while let Some(&until) = due.values().max() {
        let Ok((key, step)) = rx.recv_deadline(until) else {
            break;
        };
        let r = match step {
            Step::Gated => {
                due.insert(key, Instant::now() + RELEASE_WAIT);
                continue;
            }
            Step::Done(r) => r,
        };
        due.remove(&key);
        match r {
            Ok(()) => removed += 1,
            Err(NotRemoved::Already) => already += 1,
            Err(NotRemoved::InUse) => left.push(format!(
                "{key}: in use by a step that did not finish in {} s",
                wait.as_secs_f32()
            )),
            Err(NotRemoved::Failed(e)) => left.push(format!("{key}: {e}")),
        }
    }
    if !due.is_empty() {
        let silent: Vec<&str> = due.keys().map(String::as_str).collect();
        left.push(format!(
            "{}: the store did not answer the removal in {} s",
            silent.join(", "),
            RELEASE_WAIT.as_secs_f32()
        ));
    }
    if !left.is_empty() {
        tracing::warn!(
            "{} repository lock(s) left behind ({}): they go stale in {} s, at once for this host once this process is gone",
            total - removed - already,
            left.join("; "),
            STALE.as_secs()
        );
    }
    removed
}
