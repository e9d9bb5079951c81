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
//! A failed check answers the requests of the next second too: during an
//! outage every request would otherwise pay a full GET of `repo.json`
//! (with its retries) before its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend::{Backend, GetFuture, ObjectInfo};
use super::limits::MAX_META_BYTES;
use super::{RepoInfo, Repository, INFO_KEY};
use crate::error::{Error, ErrorKind, Result};

/// How long a failed identity check answers for.
const FAILED_CHECK_HOLDS: Duration = Duration::from_secs(1);

/// `inner`, asked nothing until it has answered as repository `id`.
pub struct Unconfirmed {
    inner: Arc<dyn Backend>,
    gate: Arc<Gate>,
}

struct Gate {
    recorded: RepoInfo,
    location: String,
    confirmed: AtomicBool,
    /// The last failed check: when, and why.
    failed: parking_lot::Mutex<Option<(Instant, String)>>,
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
                failed: parking_lot::Mutex::new(None),
                checking: parking_lot::Mutex::new(()),
            }),
        }
    }

    /// Whether the store has answered as the repository.
    pub fn confirmed(&self) -> bool {
        self.gate.confirmed.load(Ordering::Acquire)
    }

    /// Ok once the store has answered as the repository; otherwise reads
    /// its `repo.json` (unless a check failed within the last second).
    fn check(&self) -> Result<()> {
        if self.confirmed() {
            return Ok(());
        }
        let _one = self.gate.checking.lock();
        if self.confirmed() {
            return Ok(());
        }
        if let Some(e) = self.gate.recent_failure() {
            return Err(e);
        }
        let got = self.inner.get(INFO_KEY, MAX_META_BYTES);
        if self.gate.judge(got)? {
            self.inner.keep_space_reserve();
        }
        Ok(())
    }
}

impl Gate {
    fn recent_failure(&self) -> Option<Error> {
        let failed = self.failed.lock();
        let (at, why) = failed.as_ref()?;
        (at.elapsed() < FAILED_CHECK_HOLDS).then(|| self.unreachable(why))
    }

    /// Decides from a read of `repo.json` whether the store is the
    /// repository, and remembers the outcome; whether this call confirmed
    /// it (the first to).
    fn judge(&self, got: Result<Option<Vec<u8>>>) -> Result<bool> {
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
        *self.failed.lock() = Some((Instant::now(), why));
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
                if let Some(e) = gate.recent_failure() {
                    return Err(e);
                }
                let info = inner.get_async(INFO_KEY, MAX_META_BYTES).await;
                if gate.judge(info.map(|o| o.map(|b| b.into_vec())))? {
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

    fn gate_on(dir: &std::path::Path) -> Unconfirmed {
        Unconfirmed::new(Box::new(LocalDir::new(dir)), &repo_info("aaaa", 2))
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
