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

use std::time::Duration;

use super::STOP_TIMEOUT;

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

#[cfg(test)]
mod tests {
    use super::*;

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
