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
//! time). The gate is made because the store did not answer the daemon's
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

use super::backend::{Backend, GetFuture, ObjectInfo};
use super::limits::MAX_META_BYTES;
use super::{RepoInfo, Repository, INFO_KEY};
use crate::error::{Error, ErrorKind, Result};

/// How long a failed identity check answers for (at least).
const FAILED_CHECK_HOLDS: Duration = Duration::from_secs(1);
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
    /// The last failed check.
    failed: parking_lot::Mutex<Option<Failed>>,
    /// One synchronous check at a time; the others then see its outcome.
    checking: parking_lot::Mutex<()>,
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
                // Why the gate is made (see the module docs).
                failed: parking_lot::Mutex::new(Some(Failed {
                    at: Instant::now(),
                    holds: START_HOLDS,
                    why: "it did not answer when the daemon started".into(),
                    at_start: true,
                })),
                checking: parking_lot::Mutex::new(()),
            }),
        }
    }

    /// Whether the store has answered as the repository.
    pub fn confirmed(&self) -> bool {
        self.gate.confirmed.load(Ordering::Acquire)
    }

    /// Ok once the store has answered as the repository; otherwise reads
    /// its `repo.json` (unless a check failed recently, or the daemon
    /// stops).
    fn check(&self) -> Result<()> {
        if self.confirmed() {
            return Ok(());
        }
        let _one = self.gate.checking.lock();
        if self.confirmed() {
            return Ok(());
        }
        if let Some(e) = self.gate.not_now() {
            return Err(e);
        }
        let started = Instant::now();
        let got = self.inner.get(INFO_KEY, MAX_META_BYTES);
        if self.gate.judge(got, started.elapsed())? {
            self.inner.keep_space_reserve();
        }
        Ok(())
    }
}

impl Gate {
    /// Why the store is not asked now: a check failed recently, or the
    /// daemon stops.
    fn not_now(&self) -> Option<Error> {
        if self.stopping.load(Ordering::Acquire) {
            let why = "not asked while the daemon stops";
            return Some(self.unreachable(why));
        }
        let failed = self.failed.lock();
        let f = failed.as_ref()?;
        (f.at.elapsed() < f.holds).then(|| self.unreachable(&f.why))
    }

    /// Decides from a read of `repo.json` whether the store is the
    /// repository, and remembers the outcome; whether this call confirmed
    /// it (the first to).
    fn judge(&self, got: Result<Option<Vec<u8>>>, took: Duration) -> Result<bool> {
        let rec = &self.recorded;
        let fingerprint = |i: &RepoInfo| i.encryption.as_ref().map(|e| e.fingerprint.clone());
        let why = match got {
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
                    Ok(()) => {
                        let first = !self.confirmed.swap(true, Ordering::AcqRel);
                        if first {
                            tracing::info!(
                                repo = %self.location,
                                "the repository answers as itself: the start without it is over"
                            );
                        }
                        *self.failed.lock() = None;
                        return Ok(first);
                    }
                },
                Err(e) => format!("its repo.json is damaged ({e})"),
            },
            Ok(None) => "no repo.json (moved away, or a share not mounted?)".into(),
            Err(e) => format!("repo.json cannot be read: {e}"),
        };
        let e = self.unreachable(&why);
        *self.failed.lock() = Some(Failed {
            at: Instant::now(),
            holds: took.max(FAILED_CHECK_HOLDS),
            why,
            at_start: false,
        });
        Err(e)
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
    /// blocking read (a store's blocking call must not run there).
    fn get_async(&self, key: &str, limit: u64) -> GetFuture {
        if self.confirmed() {
            return self.inner.get_async(key, limit);
        }
        let (inner, gate, key) = (self.inner.clone(), self.gate.clone(), key.to_string());
        Box::pin(async move {
            if !gate.confirmed.load(Ordering::Acquire) {
                if let Some(e) = gate.not_now() {
                    return Err(e);
                }
                let started = Instant::now();
                let info = inner.get_async(INFO_KEY, MAX_META_BYTES).await;
                let info = info.map(|o| o.map(|b| b.into_vec()));
                if gate.judge(info, started.elapsed())? {
                    // Blocking file I/O: not on the engine's runtime.
                    let inner = inner.clone();
                    tokio::task::spawn_blocking(move || inner.keep_space_reserve());
                }
            }
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
        Some(match self.gate.failed.lock().as_ref() {
            Some(f) => f.why.clone(),
            None => "it has not answered as itself since the daemon started without it".into(),
        })
    }
    fn begin_shutdown(&self) {
        if !self.gate.stopping.swap(true, Ordering::AcqRel) && !self.confirmed() {
            tracing::warn!(
                repo = %self.gate.location,
                "the repository has not answered as itself since the daemon started without it: nothing more is asked of it while the daemon stops (pins and profiles are not rewritten now; a session's pin is rewritten at the next start or backup check)"
            );
        }
        self.inner.begin_shutdown();
    }
    fn end_of_start(&self) {
        let mut failed = self.gate.failed.lock();
        if failed.as_ref().is_some_and(|f| f.at_start) {
            *failed = None;
        }
        drop(failed);
        self.inner.end_of_start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::LocalDir;

    fn repo_info(id: &str, version: u32) -> RepoInfo {
        RepoInfo {
            format: super::super::REPO_FORMAT.into(),
            version,
            id: id.into(),
            created: "2026-11-24T00:00:00Z".into(),
            encryption: None,
        }
    }

    fn info(id: &str) -> Vec<u8> {
        serde_json::to_vec(&repo_info(id, 2)).unwrap()
    }

    /// `status` says why, daemon-wide, until the store answers as itself
    /// (explore11 M3: only a session's periodic check said it).
    #[test]
    fn why_the_store_is_not_confirmed_is_told_until_it_answers_as_itself() {
        let d = tempfile::tempdir().unwrap();
        let g = Unconfirmed::new(Box::new(LocalDir::new(d.path())), &repo_info("aaaa", 2));
        let why = g
            .not_confirmed()
            .expect("not confirmed at a degraded start");
        assert!(
            why.contains("did not answer when the daemon started"),
            "{why}"
        );
        *g.gate.failed.lock() = None;
        std::fs::write(d.path().join(INFO_KEY), info("aaaa")).unwrap();
        g.exists("x").unwrap();
        assert_eq!(g.not_confirmed(), None);
    }

    /// A gate whose start failure has passed.
    fn gate_on(dir: &std::path::Path) -> Unconfirmed {
        let g = Unconfirmed::new(Box::new(LocalDir::new(dir)), &repo_info("aaaa", 2));
        *g.gate.failed.lock() = None;
        g
    }

    #[test]
    fn nothing_is_written_to_a_store_until_it_answers_as_the_repository() {
        let d = tempfile::tempdir().unwrap();
        let g = gate_on(d.path());
        let e = g.put("pins/vm/x.json", b"{}").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.to_string().contains("no repo.json"), "{e}");
        assert!(
            !d.path().join("pins").exists(),
            "a write reached an empty store"
        );
        // Another repository there is refused as well.
        std::fs::write(d.path().join("repo.json"), info("bbbb")).unwrap();
        std::thread::sleep(FAILED_CHECK_HOLDS);
        let e = g.put("pins/vm/x.json", b"{}").unwrap_err();
        assert!(e.to_string().contains("another repository"), "{e}");
        assert!(!d.path().join("pins").exists());
        // The repository itself: writes pass, and stay passing.
        std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
        std::thread::sleep(FAILED_CHECK_HOLDS);
        g.put("pins/vm/x.json", b"{}").unwrap();
        assert!(g.confirmed());
        std::fs::remove_file(d.path().join("repo.json")).unwrap();
        g.put("pins/vm/y.json", b"{}").unwrap();
    }

    #[test]
    fn a_gate_made_because_the_store_did_not_answer_the_start_does_not_ask_it_again_at_once() {
        let d = tempfile::tempdir().unwrap();
        // The store answers as the repository now: not asked all the same.
        std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
        let g = Unconfirmed::new(Box::new(LocalDir::new(d.path())), &repo_info("aaaa", 2));
        let e = g.exists("backups/vm/b.json").unwrap_err();
        assert!(
            e.to_string()
                .contains("did not answer when the daemon started"),
            "{e}"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(rt.block_on(g.get_async("chunks/ab/abcd", 1 << 20)).is_err());
        assert!(!g.confirmed());
        assert!(g.gate.failed.lock().as_ref().unwrap().holds >= START_HOLDS);
    }

    #[test]
    fn a_store_back_right_after_the_start_is_asked_once_the_start_is_over() {
        let d = tempfile::tempdir().unwrap();
        let g = Unconfirmed::new(Box::new(LocalDir::new(d.path())), &repo_info("aaaa", 2));
        // Back within a second of the start: still held while it lasts.
        std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
        std::fs::write(d.path().join("b.json"), b"{}").unwrap();
        assert!(g.exists("b.json").is_err());
        g.end_of_start();
        assert!(g.exists("b.json").unwrap());
        assert!(g.confirmed());
    }

    #[test]
    fn the_end_of_the_start_does_not_lift_a_hold_of_a_later_failed_check() {
        let d = tempfile::tempdir().unwrap();
        let g = gate_on(d.path());
        assert!(g.exists("b.json").is_err(), "no repo.json: a failed check");
        std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
        g.end_of_start();
        let e = g.exists("b.json").unwrap_err();
        assert!(e.to_string().contains("no repo.json"), "{e}");
    }

    #[test]
    fn a_failed_check_holds_as_long_as_it_took() {
        let d = tempfile::tempdir().unwrap();
        let g = gate_on(d.path());
        assert!(g.gate.judge(Ok(None), Duration::from_secs(8)).is_err());
        assert_eq!(
            g.gate.failed.lock().as_ref().unwrap().holds,
            Duration::from_secs(8)
        );
        assert!(g.gate.judge(Ok(None), Duration::ZERO).is_err());
        assert_eq!(
            g.gate.failed.lock().as_ref().unwrap().holds,
            FAILED_CHECK_HOLDS
        );
    }

    #[test]
    fn once_the_daemon_stops_an_unconfirmed_store_is_asked_nothing() {
        let d = tempfile::tempdir().unwrap();
        let g = gate_on(d.path());
        std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
        g.begin_shutdown();
        let e = g.put("pins/vm/x.json", b"{}").unwrap_err();
        assert!(
            e.to_string().contains("not asked while the daemon stops"),
            "{e}"
        );
        assert!(!d.path().join("pins").exists());
        assert!(!g.confirmed());
        // A confirmed one is asked as before.
        let d2 = tempfile::tempdir().unwrap();
        std::fs::write(d2.path().join("repo.json"), info("aaaa")).unwrap();
        let g2 = gate_on(d2.path());
        g2.put("pins/vm/x.json", b"{}").unwrap();
        g2.begin_shutdown();
        g2.put("pins/vm/y.json", b"{}").unwrap();
    }

    #[test]
    fn a_failed_check_answers_the_next_second_of_requests_without_asking_the_store_again() {
        let d = tempfile::tempdir().unwrap();
        let g = gate_on(d.path());
        assert!(g.get("backups/vm/b.json", 1 << 20).is_err());
        std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
        // Within the second: still the old answer.
        assert!(g.exists("backups/vm/b.json").is_err());
        std::thread::sleep(FAILED_CHECK_HOLDS);
        assert!(!g.exists("backups/vm/b.json").unwrap());
    }

    #[test]
    fn an_async_get_checks_the_identity_without_blocking_and_then_reads() {
        let d = tempfile::tempdir().unwrap();
        let g = gate_on(d.path());
        std::fs::create_dir_all(d.path().join("chunks/ab")).unwrap();
        std::fs::write(d.path().join("chunks/ab/abcd"), b"bytes").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(g.get_async("chunks/ab/abcd", 1 << 20))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
        std::thread::sleep(FAILED_CHECK_HOLDS);
        let got = rt.block_on(g.get_async("chunks/ab/abcd", 1 << 20)).unwrap();
        assert_eq!(&got.unwrap()[..], b"bytes");
        assert!(g.confirmed());
    }

    #[test]
    fn a_store_whose_repo_json_this_binary_would_refuse_to_open_is_not_taken_for_the_repository() {
        let d = tempfile::tempdir().unwrap();
        let g = gate_on(d.path());
        // The same id, a version from a newer recoverfs.
        let newer = serde_json::to_vec(&repo_info("aaaa", 99)).unwrap();
        std::fs::write(d.path().join("repo.json"), newer).unwrap();
        let e = g.put("pins/vm/x.json", b"{}").unwrap_err();
        assert!(
            e.to_string().contains("unsupported repository version 99"),
            "{e}"
        );
        assert!(!g.confirmed());
        assert!(!d.path().join("pins").exists());
    }
}
