//! A repository a daemon started without (a degraded start): its store
//! did not answer at start, so its identity (`repo.json`) came from the
//! copy a staging directory keeps of it (`staging::recorded_repository`).
//!
//! Until the store answers as that repository (its `repo.json`, with the
//! same id, a format and version this binary supports, and the same
//! encryption), nothing else is asked of it: every request first reads
//! `repo.json`, and fails as unreachable (`ErrorKind::Io`) if that does not
//! name the repository. So a pin is never written into an unmounted
//! share's empty mount point, and no answer of another store (a bucket
//! restored elsewhere, a wrong path) is taken for the repository's. Once
//! the store has answered as itself, requests pass straight through.
//!
//! A failed check answers the requests that follow for a while: during
//! an outage every request would otherwise pay a full GET of `repo.json`
//! before its own. It holds for a second, or as long as the check took
//! if longer (a store that times out is then asked at most half the
//! time). A request that finds a hold ending within `WAITS_FOR_A_HOLD`
//! (a second) waits for its end and for the check then made, and takes
//! that check's outcome: a store back during a hold answers the first
//! read after it (explore11: the guest's read failed with EIO until the
//! hold ended, and a guest may remount read-only on EIO). A store that
//! stays down and fails checks at once (no `repo.json`) so fails a
//! request within about a second, one check per hold however many
//! requests wait; a hold with longer to go (the start's, a check that
//! timed out or was retried: S3 retries a refused connection for about
//! 1.6 s) still fails a request at once, so no read waits more than a
//! second longer than it did. One check is in flight at a time: the
//! requests that come meanwhile wait for its outcome, they do not ask
//! `repo.json` again.
//!
//! The gate is made because the store did not answer the daemon's
//! start: that counts as a failed check holding [`START_HOLDS`], so the
//! start (resuming sessions, pinning them) does not ask again at once
//! (explore7 M2: it did, a second series of probes of minutes). The hold
//! ends with the start ([`Backend::end_of_start`]): a store back seconds
//! later is asked at the next request, not up to 20 s after the start.
//!
//! Once the daemon stops ([`Backend::begin_shutdown`]), a store not yet
//! confirmed is asked nothing more: the requests of the stop (pins,
//! profiles) fail at once, logged; a pin not rewritten then is rewritten
//! at the next start or backup check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::backend::{Backend, GetFuture, ObjectInfo};
use super::limits::MAX_META_BYTES;
use super::{RepoInfo, Repository, INFO_KEY};
use crate::error::{Error, ErrorKind, Result};

/// How long a failed identity check answers for (at least).
const FAILED_CHECK_HOLDS: Duration = Duration::from_secs(1);
/// A request that finds a failed check holding for at most this long
/// waits for the hold's end and the next check rather than failing: every
/// hold of a check that failed at once, never one of a check that timed
/// out (a multi-second wait on a store that stays down).
const WAITS_FOR_A_HOLD: Duration = FAILED_CHECK_HOLDS;
/// How long the failure that made the gate (the store did not answer at
/// the daemon's start) answers for: the start's own requests.
pub const START_HOLDS: Duration = Duration::from_secs(20);

/// `inner`, asked nothing until it has answered as repository `id`.
pub struct Unconfirmed {
    inner: Arc<dyn Backend>,
    gate: Arc<Gate>,
}

/// A failed identity check: when it ended, how long it answers for, why.
struct Failed {
    at: Instant,
    holds: Duration,
    why: String,
    /// The daemon's start found no store: this hold ends with the start.
    at_start: bool,
}

struct Gate {
    recorded: RepoInfo,
    location: String,
    confirmed: AtomicBool,
    /// The daemon stops: an unconfirmed store is asked nothing more.
    stopping: AtomicBool,
    state: Mutex<State>,
    /// Told when a check ends, a hold is lifted or the daemon stops:
    /// to blocking requests, and (a count of the news) to those on a
    /// runtime.
    changed: Condvar,
    news: tokio::sync::watch::Sender<u64>,
}

struct State {
    /// The last failed check.
    failed: Option<Failed>,
    /// A check is in flight: the others wait for its outcome.
    checking: bool,
    /// Checks ended so far: a request that saw one end while it waited
    /// takes that outcome.
    ended: u64,
}

/// What a request does next at the gate.
enum Step {
    Pass,
    Fail(Error),
    /// Make the check (the gate now counts it in flight).
    Check,
    /// Wait for news (a check in flight), or until then (a hold's end).
    Wait(Option<Instant>),
}

impl Unconfirmed {
    pub fn new(inner: Box<dyn Backend>, recorded: &RepoInfo) -> Unconfirmed {
        let location = inner.location();
        Unconfirmed {
            inner: Arc::from(inner),
            gate: Arc::new(Gate {
                recorded: recorded.clone(),
                location,
                confirmed: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                state: Mutex::new(State {
                    // Why the gate is made (see the module docs).
                    failed: Some(Failed {
                        at: Instant::now(),
                        holds: START_HOLDS,
                        why: "it did not answer when the daemon started".into(),
                        at_start: true,
                    }),
                    checking: false,
                    ended: 0,
                }),
                changed: Condvar::new(),
                news: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// Whether the store has answered as the repository.
    pub fn confirmed(&self) -> bool {
        self.gate.confirmed.load(Ordering::Acquire)
    }

    /// Ok once the store has answered as the repository; otherwise reads
    /// its `repo.json`, or takes the outcome of a check in flight or of
    /// one that failed recently (see the module docs).
    fn check(&self) -> Result<()> {
        if self.confirmed() {
            return Ok(());
        }
        let gate = &self.gate;
        let mut st = gate.state.lock();
        let seen = st.ended;
        loop {
            match gate.step(&mut st, seen) {
                Step::Pass => return Ok(()),
                Step::Fail(e) => return Err(e),
                Step::Wait(Some(until)) => {
                    let _ = gate.changed.wait_until(&mut st, until);
                }
                Step::Wait(None) => gate.changed.wait(&mut st),
                Step::Check => break,
            }
        }
        drop(st);
        let check = Checking(gate.clone(), false);
        let started = Instant::now();
        let got = self.inner.get(INFO_KEY, MAX_META_BYTES);
        if check.judge(got, started.elapsed())? {
            self.inner.keep_space_reserve();
        }
        Ok(())
    }
}

/// [`Unconfirmed::check`] for a request on a runtime: waits without a
/// thread, and reads `repo.json` without a blocking call (a store's
/// blocking call must not run on the fetch engine's runtime).
async fn check_async(gate: Arc<Gate>, inner: Arc<dyn Backend>) -> Result<()> {
    let mut seen = None;
    loop {
        // Before the state is looked at: news from then on is not missed.
        let mut news = gate.news.subscribe();
        let step = {
            let mut st = gate.state.lock();
            let seen = *seen.get_or_insert(st.ended);
            gate.step(&mut st, seen)
        };
        match step {
            Step::Pass => return Ok(()),
            Step::Fail(e) => return Err(e),
            Step::Wait(None) => {
                let _ = news.changed().await;
            }
            Step::Wait(Some(until)) => {
                let until = tokio::time::Instant::from_std(until);
                tokio::select! {
                    _ = news.changed() => {}
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            Step::Check => break,
        }
    }
    let check = Checking(gate.clone(), false);
    let started = Instant::now();
    let info = inner.get_async(INFO_KEY, MAX_META_BYTES).await;
    let info = info.map(|o| o.map(|b| b.into_vec()));
    if check.judge(info, started.elapsed())? {
        // Blocking file I/O: not on the engine's runtime.
        tokio::task::spawn_blocking(move || inner.keep_space_reserve());
    }
    Ok(())
}

/// The check in flight; one dropped unjudged (a request dropped while it
/// waits for `repo.json`) ends without an outcome, and a waiting request
/// then makes the next.
struct Checking(Arc<Gate>, bool);

impl Checking {
    /// Decides from a read of `repo.json` whether the store is the
    /// repository, and tells the outcome to the requests waiting for it;
    /// whether this call confirmed it (the first to).
    fn judge(mut self, got: Result<Option<Vec<u8>>>, took: Duration) -> Result<bool> {
        self.1 = true;
        let gate = &self.0;
        match gate.verdict(got) {
            Ok(()) => {
                let first = !gate.confirmed.swap(true, Ordering::AcqRel);
                if first {
                    tracing::info!(
                        repo = %gate.location,
                        "the repository answers as itself: the start without it is over"
                    );
                }
                gate.end_check(Some(None));
                Ok(first)
            }
            Err(why) => {
                let e = gate.unreachable(&why);
                gate.end_check(Some(Some(Failed {
                    at: Instant::now(),
                    holds: took.max(FAILED_CHECK_HOLDS),
                    why,
                    at_start: false,
                })));
                Err(e)
            }
        }
    }
}

impl Drop for Checking {
    fn drop(&mut self) {
        if !self.1 {
            self.0.end_check(None);
        }
    }
}

impl Gate {
    /// What a request that came when `seen` checks had ended does next.
    fn step(&self, st: &mut State, seen: u64) -> Step {
        if self.confirmed.load(Ordering::Acquire) {
            return Step::Pass;
        }
        if self.stopping.load(Ordering::Acquire) {
            return Step::Fail(self.unreachable("not asked while the daemon stops"));
        }
        if st.checking {
            return Step::Wait(None);
        }
        if let Some(f) = &st.failed {
            let left = f.holds.saturating_sub(f.at.elapsed());
            if !left.is_zero() {
                // A check that failed while this request waited answers
                // it; so does a hold it cannot wait out.
                if st.ended != seen || left > WAITS_FOR_A_HOLD {
                    return Step::Fail(self.unreachable(&f.why));
                }
                return Step::Wait(Some(f.at + f.holds));
            }
        }
        st.checking = true;
        Step::Check
    }

    /// A check ended: with a new failure (or `None`: confirmed), or
    /// without an outcome (dropped).
    fn end_check(&self, outcome: Option<Option<Failed>>) {
        let mut st = self.state.lock();
        st.checking = false;
        st.ended += 1;
        if let Some(failed) = outcome {
            st.failed = failed;
        }
        drop(st);
        self.tell();
    }

    /// Wakes the waiting requests to look again. The lock is taken
    /// first: a blocking request that looked before a change made
    /// outside it (the stop) is then already waiting, and is woken.
    fn tell(&self) {
        drop(self.state.lock());
        self.changed.notify_all();
        self.news.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether a read of `repo.json` names the repository; why not.
    fn verdict(&self, got: Result<Option<Vec<u8>>>) -> std::result::Result<(), String> {
        let rec = &self.recorded;
        let fingerprint = |i: &RepoInfo| i.encryption.as_ref().map(|e| e.fingerprint.clone());
        Err(match got {
            Ok(Some(bytes)) => match serde_json::from_slice::<RepoInfo>(&bytes) {
                Ok(i) if i.id != rec.id => {
                    format!("it holds another repository (id {}, not {})", i.id, rec.id)
                }
                // A newer recoverfs may have changed it meanwhile: this
                // binary must not write to what it would refuse to open.
                Ok(i) => match Repository::check_info(&self.location, &i) {
                    Err(e) => e.to_string(),
                    Ok(()) if fingerprint(&i) != fingerprint(rec) => {
                        "its encryption is not the one recorded".into()
                    }
                    Ok(()) => return Ok(()),
                },
                Err(e) => format!("its repo.json is damaged ({e})"),
            },
            Ok(None) => "no repo.json (moved away, or a share not mounted?)".into(),
            Err(e) => format!("repo.json cannot be read: {e}"),
        })
    }

    fn unreachable(&self, why: &str) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "repository {} has not answered as itself since the daemon started without it: {why}",
                self.location
            ),
        )
    }
}

impl Backend for Unconfirmed {
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.check()?;
        self.inner.get(key, limit)
    }
    /// The check is made on the fetch engine's runtime too, without a
    /// blocking read (see `check_async`).
    fn get_async(&self, key: &str, limit: u64) -> GetFuture {
        if self.confirmed() {
            return self.inner.get_async(key, limit);
        }
        let (inner, gate, key) = (self.inner.clone(), self.gate.clone(), key.to_string());
        Box::pin(async move {
            check_async(gate, inner.clone()).await?;
            inner.get_async(&key, limit).await
        })
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.check()?;
        self.inner.put(key, data)
    }
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.check()?;
        self.inner.put_new(key, data)
    }
    fn create_only_is_atomic(&self) -> Result<bool> {
        self.check()?;
        self.inner.create_only_is_atomic()
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.check()?;
        self.inner.exists(key)
    }
    fn size(&self, key: &str) -> Result<Option<u64>> {
        self.check()?;
        self.inner.size(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.check()?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.check()?;
        self.inner.delete(key)
    }
    fn list_all(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.check()?;
        self.inner.list_all(prefix)
    }
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        self.check()?;
        self.inner.delete_many(keys)
    }
    fn sweep_leftover_writes(&self, older_than: Duration, dry_run: bool) -> Result<(u64, u64)> {
        self.check()?;
        self.inner.sweep_leftover_writes(older_than, dry_run)
    }
    fn location(&self) -> String {
        self.gate.location.clone()
    }
    /// The space reserve is kept only in a store known to be the
    /// repository (not in an empty mount point).
    fn keep_space_reserve(&self) {
        if self.confirmed() {
            self.inner.keep_space_reserve();
        }
    }
    fn retries(&self) -> u64 {
        self.inner.retries()
    }
    fn answering(&self) -> bool {
        self.inner.answering()
    }
    fn not_confirmed(&self) -> Option<String> {
        if self.confirmed() {
            return None;
        }
        Some(match self.gate.state.lock().failed.as_ref() {
            Some(f) => f.why.clone(),
            None => "it has not answered as itself since the daemon started without it".into(),
        })
    }
    fn begin_shutdown(&self) {
        let first = !self.gate.stopping.swap(true, Ordering::AcqRel);
        // Requests waiting at the gate fail now.
        self.gate.tell();
        if first && !self.confirmed() {
            tracing::warn!(
                repo = %self.gate.location,
                "the repository has not answered as itself since the daemon started without it: nothing more is asked of it while the daemon stops (pins and profiles are not rewritten now; a session's pin is rewritten at the next start or backup check)"
            );
        }
        self.inner.begin_shutdown();
    }
    fn end_of_start(&self) {
        let mut st = self.gate.state.lock();
        if st.failed.as_ref().is_some_and(|f| f.at_start) {
            st.failed = None;
        }
        drop(st);
        self.gate.tell();
        self.inner.end_of_start();
    }
}

#[cfg(test)]
mod tests;
