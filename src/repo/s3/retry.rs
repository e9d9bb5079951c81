//! A request's attempts: how long they may take in all, and how their
//! failures are told in the log.
//!
//! **The deadline.** A store that answered and then stops answering
//! (accepts connections, never replies) let every request wait out
//! [`super::ATTEMPTS`] per-attempt timeouts, about 3 minutes, before a
//! guest's read failed. A request now has [`REQUEST_DEADLINE`] in all, its
//! attempts and back-off included: then it fails with one line naming the
//! bucket, what the object is and `no answer in N s`. A listing's pages
//! are each one HTTP exchange, and a listing of a large bucket may take
//! longer than the deadline while every page answers: it is not cut, it
//! only starts no new attempt after the deadline.
//!
//! **The log.** Retries are told once for all requests, not once per
//! request: a store down while 64 fetches are in flight printed 64 lines
//! when their retries began (and 64 more when they gave up). While
//! requests retry, [`RetryLog`] says `S3 store not answering` at most once
//! per [`RETRY_LOG_PERIOD`], with how many requests retry, and once
//! `S3 store answers again` when a request next gets its answer. Each
//! request that gives up still says so, with its error (a guest's EIO, a
//! backup that fails, must be traceable to the request).

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use object_store::ObjectStore;

use super::{skipped_at_stop, Failure, Hints, Stopping, ATTEMPTS, STOP_TIMEOUT};
use crate::error::{Error, ErrorKind, Result};

/// object_store's timeout of one attempt (one HTTP exchange, its body
/// included) unless `AWS_TIMEOUT` sets another.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request may take in all, attempts and back-off included
/// (with `AWS_TIMEOUT` set: twice that instead).
///
/// 60 s: two attempts' time, so a store that let one attempt time out is
/// given a second one, and a few fast failures (503s, refused connections)
/// still get all their attempts; a third of what the attempts alone
/// allowed (6 × 30 s). A guest's disk gives up after 30 s to minutes
/// (Linux SCSI 30 s, retried; Windows 60 s; virtio-blk never): a read
/// failed after 60 s is an EIO the guest still reports, and the
/// administrator has the reason in the daemon's log within a minute.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// The deadline for a per-attempt timeout of `attempt`: as many attempts'
/// time as [`REQUEST_DEADLINE`] is of [`ATTEMPT_TIMEOUT`].
pub fn deadline_for(attempt: Duration) -> Duration {
    attempt * (REQUEST_DEADLINE.as_secs() / ATTEMPT_TIMEOUT.as_secs()) as u32
}

/// `AWS_TIMEOUT` as object_store reads it (humantime: `30s`, `1m 30s`,
/// `500ms`); `None` if it does not parse (object_store then refuses it).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let (mut total, mut rest) = (Duration::ZERO, s.trim());
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let unit = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let one = match &rest[..unit] {
            "ms" | "msec" | "millis" => Duration::from_millis(1),
            "s" | "sec" | "secs" | "second" | "seconds" => Duration::from_secs(1),
            "m" | "min" | "mins" | "minute" | "minutes" => Duration::from_secs(60),
            "h" | "hr" | "hour" | "hours" => Duration::from_secs(3600),
            _ => return None,
        };
        total += one * u32::try_from(n).ok()?;
        rest = rest[unit..].trim_start();
    }
    Some(total)
}

/// What the object a request names is, for its messages: `GET
/// chunks/ab12/…` is a chunk's.
pub fn kind_of(what: &str) -> &'static str {
    let key = what.rsplit(' ').next().unwrap_or(what);
    match key.split('/').next().unwrap_or_default() {
        "chunks" => "chunk",
        "backups" => "manifest",
        "files" => "file catalog",
        "pins" => "pin",
        "locks" => "lock",
        "profiles" => "profile",
        "quarantine" => "quarantine mark",
        "probes" => "probe",
        "repo.json" => "repository identity",
        _ => "object",
    }
}

/// At most one `not answering` line per this while requests retry.
pub const RETRY_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Retry warnings of all requests of one store, collapsed (module docs).
pub struct RetryLog {
    bucket: String,
    period: Duration,
    state: Mutex<LogState>,
    /// Whether `not answering` was said and `answers again` not yet (the
    /// check every successful request makes, without the lock).
    told: std::sync::atomic::AtomicBool,
    /// Whether an attempt failed since the store last answered a request
    /// (`Backend::answering`; unlike `told`, not held back by `period`).
    failing: std::sync::atomic::AtomicBool,
    /// Every line said (tests).
    #[cfg(test)]
    pub said: Mutex<Vec<String>>,
}

#[derive(Default)]
struct LogState {
    /// Requests between a failed attempt and their end.
    retrying: usize,
    /// When `not answering` was last said.
    last_told: Option<Instant>,
    /// When the first `not answering` since the store last answered was.
    since: Option<Instant>,
}

impl RetryLog {
    pub fn new(bucket: &str) -> RetryLog {
        RetryLog {
            bucket: bucket.into(),
            period: RETRY_LOG_PERIOD,
            state: Mutex::default(),
            told: Default::default(),
            failing: Default::default(),
            #[cfg(test)]
            said: Mutex::default(),
        }
    }

    fn say(&self, line: String) {
        tracing::warn!(bucket = %self.bucket, "{line}");
        #[cfg(test)]
        self.said.lock().push(line);
    }

    /// An attempt of `what` failed with `e` and the request retries;
    /// `first`: its first failure (it now counts as retrying).
    pub fn retries(&self, first: bool, what: &str, e: &dyn std::fmt::Display, now: Instant) {
        self.failing
            .store(true, std::sync::atomic::Ordering::Release);
        let mut st = self.state.lock();
        st.retrying += usize::from(first);
        if st
            .last_told
            .is_some_and(|t| now.duration_since(t) < self.period)
        {
            return;
        }
        st.last_told = Some(now);
        st.since.get_or_insert(now);
        self.told.store(true, std::sync::atomic::Ordering::Release);
        let n = st.retrying;
        drop(st);
        let requests = if n == 1 { "request" } else { "requests" };
        self.say(format!(
            "S3 store not answering: {n} {requests} retrying (said at most every {} s while it lasts); the last failure: S3 {what}: {}",
            self.period.as_secs(),
            e.to_string().replace('\n', " ")
        ));
    }

    /// A request ended: `retried` if it had failed before, `answered` if
    /// the store answered it (a definite answer, not a failure to retry).
    pub fn ended(&self, retried: bool, answered: bool, now: Instant) {
        if answered {
            self.failing
                .store(false, std::sync::atomic::Ordering::Release);
        }
        let told = self.told.load(std::sync::atomic::Ordering::Acquire);
        if !(retried || answered && told) {
            return;
        }
        let mut st = self.state.lock();
        st.retrying -= usize::from(retried);
        if !answered {
            return;
        }
        let Some(since) = st.since.take() else {
            return;
        };
        self.told.store(false, std::sync::atomic::Ordering::Release);
        let left = st.retrying;
        drop(st);
        self.say(format!(
            "S3 store answers again ({} s after it was first said not to; {left} requests still retrying)",
            now.duration_since(since).as_secs()
        ));
    }

    /// A request ended unanswered without retrying (its attempt timed
    /// out): the store counts as failing (`answering`).
    pub fn mark_failing(&self) {
        self.failing
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// False from an attempt's failure until a request is answered.
    pub fn answering(&self) -> bool {
        !self.failing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A request gives up: always said, with its error.
    pub fn gave_up(&self, line: String) {
        self.failing
            .store(true, std::sync::atomic::Ordering::Release);
        self.say(line);
    }
}

/// Tells a request's end to its [`RetryLog`] however it ends (dropped
/// too: a fetch whose disk was released).
pub struct Ending {
    log: std::sync::Arc<RetryLog>,
    /// An attempt failed and the request retried.
    pub retried: bool,
    /// The store answered it (its object, or a definite refusal).
    pub answered: bool,
}

impl Ending {
    pub fn new(log: std::sync::Arc<RetryLog>) -> Ending {
        Ending {
            log,
            retried: false,
            answered: false,
        }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.log.ended(self.retried, self.answered, Instant::now());
    }
}

/// One attempt of a request, bounded by `limit`, by the request's
/// deadline and by the daemon's stop.
pub enum Attempt<T> {
    Done(object_store::Result<T>),
    /// No answer within the limit.
    TimedOut(Duration),
    /// No answer by the request's deadline.
    PastDeadline,
    /// No answer within [`STOP_TIMEOUT`] of the daemon's stop.
    Stopped,
}

/// `fut` as one attempt; `cut_at`: the request's deadline, if the attempt
/// ends there (not a listing's; see the module docs).
pub async fn attempt<T>(
    fut: impl std::future::Future<Output = object_store::Result<T>>,
    limit: Option<Duration>,
    cut_at: Option<tokio::time::Instant>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Attempt<T> {
    let limit_passes = async {
        match limit {
            Some(l) => tokio::time::sleep(l).await,
            None => std::future::pending().await,
        }
    };
    let deadline_passes = async {
        match cut_at {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    let stop_passes = async {
        // The sender lives as long as the request (its `Arc<Stopping>`).
        if stop.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(STOP_TIMEOUT).await
    };
    tokio::select! {
        r = fut => Attempt::Done(r),
        () = limit_passes => Attempt::TimedOut(limit.unwrap_or_default()),
        () = deadline_passes => Attempt::PastDeadline,
        () = stop_passes => Attempt::Stopped,
    }
}

/// What a request needs of its backend (see [`S3Backend::req`]).
#[derive(Clone)]
pub struct Req {
    pub store: Arc<dyn ObjectStore>,
    pub retries: Arc<AtomicU64>,
    pub bucket: String,
    pub stop: Arc<Stopping>,
    pub hints: Arc<Hints>,
    pub deadline: Duration,
    pub log: Arc<RetryLog>,
}

impl Req {
    /// A request with its retries, as a future that holds no thread while
    /// it waits (between attempts too). An attempt with no answer within
    /// `limit` ends the request (the identity probe's). The request ends
    /// at its deadline (see [`REQUEST_DEADLINE`]).
    pub fn retrying<T: Send + 'static, F>(
        self,
        what: &str,
        limit: Option<Duration>,
        mut op: impl FnMut(Arc<dyn ObjectStore>) -> F + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        F: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let Req {
            store,
            retries,
            bucket,
            stop,
            hints,
            deadline,
            log,
        } = self;
        let what = what.to_string();
        // A listing is not cut at its deadline (see `retry`).
        let cut = !what.starts_with("LIST ");
        async move {
            // From the first poll: the fetch engine makes a GET before
            // its turn comes.
            let end = tokio::time::Instant::now() + deadline;
            let mut ending = Ending::new(log.clone());
            let no_answer = |n: u32, last: Option<&object_store::Error>| {
                let last = last.map_or(String::new(), |e| {
                    format!("; the last failed: {}", e.to_string().replace('\n', " "))
                });
                let s = if n == 1 { "" } else { "s" };
                let line = format!(
                    "S3 {what} ({}) in bucket {bucket}: no answer in {} s ({n} attempt{s}{last})",
                    kind_of(&what),
                    deadline.as_secs_f64()
                );
                log.gave_up(format!("{line}, giving up"));
                Err(Error::unanswered(line))
            };
            let mut delay = Duration::from_millis(50);
            for n in 1..=ATTEMPTS {
                if stop.gave_up.load(Ordering::Acquire) {
                    return Err(skipped_at_stop(&what));
                }
                let cut_at = cut.then_some(end);
                let e = match attempt(op(store.clone()), limit, cut_at, stop.tx.subscribe()).await {
                    Attempt::Done(Ok(v)) => {
                        ending.answered = true;
                        return Ok(v);
                    }
                    Attempt::Done(Err(e)) => e,
                    Attempt::TimedOut(t) => {
                        log.mark_failing();
                        return Err(Error::unanswered(format!(
                            "S3 {what}: no answer in {} s",
                            t.as_secs_f64()
                        )));
                    }
                    Attempt::PastDeadline => return no_answer(n, None),
                    Attempt::Stopped => {
                        let why = format!("no answer within {} s", STOP_TIMEOUT.as_secs());
                        stop.give_up(&bucket, &what, &why);
                        return Err(Error::new(
                            ErrorKind::Io,
                            format!("S3 {what}: {why} of the daemon's stop"),
                        ));
                    }
                };
                if hints.failure(&e) != Failure::Transient {
                    ending.answered = true;
                    return Err(hints.error(&what, e));
                }
                if stop.stopping() {
                    stop.give_up(&bucket, &what, &e.to_string());
                    return Err(hints.error(&what, e));
                }
                if n == ATTEMPTS {
                    log.gave_up(format!("S3 {what} failed {n} times, giving up: {e}"));
                    return Err(hints.error(&what, e));
                }
                // No attempt starts at or after the deadline.
                if tokio::time::Instant::now() + delay >= end {
                    return no_answer(n, Some(&e));
                }
                retries.fetch_add(1, Ordering::Relaxed);
                // Told once for all requests (see `retry`).
                log.retries(!ending.retried, &what, &e, std::time::Instant::now());
                ending.retried = true;
                tracing::debug!(%bucket, attempt = n, "S3 {what} failed, retrying: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            unreachable!("the last attempt returns")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixty_four_requests_retrying_for_25_s_say_so_three_times_and_once_that_it_answers_again() {
        let log = RetryLog::new("b");
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for i in 0..64 {
            log.retries(true, "GET chunks/x", &"timed out", at(i));
        }
        // Every request retries every 500 ms for 25 s.
        for step in 1..50u64 {
            for i in 0..64 {
                log.retries(false, "GET chunks/x", &"timed out", at(step * 500 + i));
            }
        }
        let said = log.said.lock().clone();
        assert_eq!(said.len(), 3, "{said:#?}");
        assert!(said[0].starts_with("S3 store not answering: 1 request retrying"));
        assert!(said[1].starts_with("S3 store not answering: 64 requests retrying"));
        // Half give up; one gets its answer; the rest still retry.
        for i in 0..32 {
            log.ended(true, false, at(26_000 + i));
        }
        log.ended(true, true, at(27_000));
        log.ended(false, true, at(27_001));
        let said = log.said.lock().clone();
        assert_eq!(said.len(), 4, "{said:#?}");
        assert_eq!(
            said[3],
            "S3 store answers again (27 s after it was first said not to; 31 requests still retrying)"
        );
        // A later outage is said again, once its period has passed.
        log.retries(true, "PUT locks/y", &"503", at(28_000));
        assert_eq!(log.said.lock().len(), 4);
        log.retries(false, "PUT locks/y", &"503", at(30_001));
        assert_eq!(log.said.lock().len(), 5);
    }

    #[test]
    fn a_store_that_answers_and_never_failed_says_nothing() {
        let log = RetryLog::new("b");
        log.ended(false, true, Instant::now());
        assert!(log.said.lock().is_empty());
    }

    /// `Backend::answering` for S3: false from a failed attempt (also
    /// within the period in which `not answering` is not said again) and
    /// after a request gave up, true again once one is answered.
    #[test]
    fn the_store_counts_as_failing_from_a_failed_attempt_until_a_request_is_answered() {
        let log = RetryLog::new("b");
        let t0 = Instant::now();
        assert!(log.answering());
        log.retries(true, "GET k", &"timeout", t0);
        assert!(!log.answering());
        log.ended(true, true, t0);
        assert!(log.answering());
        log.retries(true, "GET k", &"timeout", t0 + Duration::from_secs(1));
        assert!(!log.answering(), "a failure within the period counts too");
        log.gave_up("S3 GET k: no answer in 60 s".into());
        log.ended(true, false, t0 + Duration::from_secs(2));
        assert!(!log.answering());
    }

    #[test]
    fn the_deadline_follows_aws_timeout_and_kinds_are_named() {
        assert_eq!(deadline_for(ATTEMPT_TIMEOUT), REQUEST_DEADLINE);
        assert_eq!(
            deadline_for(parse_duration("2s").unwrap()),
            Duration::from_secs(4)
        );
        assert_eq!(parse_duration("1m 30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(kind_of("GET chunks/ab12/ab12cd"), "chunk");
        assert_eq!(kind_of("PUT (create-only) backups/vm/1.json"), "manifest");
        assert_eq!(kind_of("DELETE 12 objects"), "object");
        assert_eq!(kind_of("GET repo.json"), "repository identity");
        assert_eq!(kind_of("LIST pins/vm"), "pin");
    }
}
