//! A repository backend for tests: a local directory behind knobs that
//! make it slow, hold chunk reads at a gate, fail chosen keys as an
//! unreachable store would, or panic in a read. Asynchronous chunk reads
//! (the fetch engine's) wait on timers and a notification instead of a
//! sleeping thread, and the knobs count how many are in flight at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::backend::{Backend, GetFuture, LocalDir};
use crate::error::{Error, ErrorKind, Result};

/// Shared knobs; clone freely, every clone controls the same backend.
#[derive(Clone, Default)]
pub struct Knobs {
    gate: Arc<(Mutex<bool>, Condvar)>,
    /// Wakes asynchronous reads waiting at the gate.
    gate_open: Arc<tokio::sync::Notify>,
    gated: Arc<AtomicBool>,
    chunk_delay_ms: Arc<AtomicU64>,
    meta_delay_ms: Arc<AtomicU64>,
    panic_next: Arc<AtomicBool>,
    /// Keys containing one of these fail as if the store did not answer.
    unreachable: Arc<Mutex<Vec<String>>>,
    /// Run once, just before the first access of a key containing the
    /// string: another party's step, taken at a chosen point.
    hooks: Arc<Mutex<Vec<(String, Hook)>>>,
    /// Chunk objects read so far.
    chunk_reads: Arc<AtomicU64>,
    /// Chunk reads in progress, and the most there ever were at once.
    chunk_reads_now: Arc<AtomicU64>,
    chunk_reads_peak: Arc<AtomicU64>,
}

type Hook = Box<dyn FnOnce() + Send>;

/// What a read waits for before it reaches the directory.
struct Wait {
    gated: bool,
    delay: Duration,
}

/// Counts one chunk read in flight while it lives.
struct InFlight(Knobs);

impl InFlight {
    fn new(k: &Knobs) -> InFlight {
        let now = k.chunk_reads_now.fetch_add(1, Ordering::SeqCst) + 1;
        k.chunk_reads_peak.fetch_max(now, Ordering::SeqCst);
        InFlight(k.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.chunk_reads_now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Knobs {
    /// Chunk reads wait until `open_gate`.
    pub fn close_gate(&self) {
        *self.gate.0.lock() = false;
        self.gated.store(true, Ordering::SeqCst);
    }

    pub fn open_gate(&self) {
        *self.gate.0.lock() = true;
        self.gated.store(false, Ordering::SeqCst);
        self.gate.1.notify_all();
        self.gate_open.notify_waiters();
    }

    /// Chunk reads in progress right now.
    pub fn chunk_reads_in_flight(&self) -> u64 {
        self.chunk_reads_now.load(Ordering::SeqCst)
    }

    /// The most chunk reads that were ever in progress at once.
    pub fn peak_chunk_reads_in_flight(&self) -> u64 {
        self.chunk_reads_peak.load(Ordering::SeqCst)
    }

    /// Chunk objects read (fetched) through this backend so far.
    pub fn chunk_reads(&self) -> u64 {
        self.chunk_reads.load(Ordering::SeqCst)
    }

    /// Every chunk read takes this long (a remote repository).
    pub fn chunk_delay(&self, ms: u64) {
        self.chunk_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Every manifest or profile access takes this long.
    pub fn meta_delay(&self, ms: u64) {
        self.meta_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// The next chunk read panics (a bug in a fetch).
    pub fn panic_next_chunk(&self) {
        self.panic_next.store(true, Ordering::SeqCst);
    }

    /// Accesses of keys containing `part` fail with an I/O error ("" for all).
    pub fn unreachable(&self, part: &str) {
        self.unreachable.lock().push(part.into());
    }

    pub fn reachable(&self) {
        self.unreachable.lock().clear();
    }

    /// Runs `f` once, just before the first access of a key containing
    /// `part` (the access then sees what `f` did).
    pub fn before_first(&self, part: &str, f: impl FnOnce() + Send + 'static) {
        self.hooks.lock().push((part.into(), Box::new(f)));
    }

    /// The failures and waits the knobs give an access of `key`.
    fn check(&self, key: &str) -> Result<Wait> {
        let due: Vec<Hook> = {
            let mut hooks = self.hooks.lock();
            let (due, rest) = std::mem::take(&mut *hooks)
                .into_iter()
                .partition(|(p, _)| key.contains(p.as_str()));
            *hooks = rest;
            due.into_iter().map(|(_, f)| f).collect()
        };
        // Outside the lock: a hook may use this backend itself.
        due.into_iter().for_each(|f| f());
        if self
            .unreachable
            .lock()
            .iter()
            .any(|p| key.contains(p.as_str()))
        {
            return Err(Error::new(
                ErrorKind::Io,
                format!("test repository: {key}: connection refused"),
            ));
        }
        let chunk = key.starts_with("chunks/");
        if chunk && self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("injected panic while reading {key}");
        }
        let ms = if chunk {
            self.chunk_delay_ms.load(Ordering::SeqCst)
        } else if key.starts_with("backups/") || key.starts_with("profiles/") {
            self.meta_delay_ms.load(Ordering::SeqCst)
        } else {
            0
        };
        Ok(Wait {
            gated: chunk && self.gated.load(Ordering::SeqCst),
            delay: Duration::from_millis(ms),
        })
    }

    fn before(&self, key: &str) -> Result<()> {
        let w = self.check(key)?;
        if w.gated {
            let (m, cv) = &*self.gate;
            let mut open = m.lock();
            while !*open {
                cv.wait(&mut open);
            }
        }
        if !w.delay.is_zero() {
            std::thread::sleep(w.delay);
        }
        Ok(())
    }

    /// `before` for an asynchronous read: no thread waits.
    async fn before_async(&self, w: Wait) {
        if w.gated {
            loop {
                let opened = self.gate_open.notified();
                tokio::pin!(opened);
                // Registered before the check, so an opening in between
                // is not lost.
                opened.as_mut().enable();
                if *self.gate.0.lock() {
                    break;
                }
                opened.await;
            }
        }
        if !w.delay.is_zero() {
            tokio::time::sleep(w.delay).await;
        }
    }
}

pub struct TestBackend {
    inner: LocalDir,
    knobs: Knobs,
}

impl TestBackend {
    pub fn new(root: &std::path::Path, knobs: Knobs) -> TestBackend {
        TestBackend {
            inner: LocalDir::new(root),
            knobs,
        }
    }
}

impl Backend for TestBackend {
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let _counted = key
            .starts_with("chunks/")
            .then(|| InFlight::new(&self.knobs));
        self.knobs.before(key)?;
        if key.starts_with("chunks/") {
            self.knobs.chunk_reads.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(key, limit)
    }
    fn get_async(&self, key: &str, limit: u64) -> GetFuture {
        let (knobs, key) = (self.knobs.clone(), key.to_string());
        let read = self.inner.get_async(&key, limit);
        Box::pin(async move {
            let chunk = key.starts_with("chunks/");
            let _counted = chunk.then(|| InFlight::new(&knobs));
            let wait = knobs.check(&key)?;
            knobs.before_async(wait).await;
            if chunk {
                knobs.chunk_reads.fetch_add(1, Ordering::SeqCst);
            }
            read.await
        })
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.knobs.before(key)?;
        self.inner.put(key, data)
    }
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.knobs.before(key)?;
        self.inner.put_new(key, data)
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.knobs.before(key)?;
        self.inner.exists(key)
    }
    fn size(&self, key: &str) -> Result<Option<u64>> {
        self.knobs.before(key)?;
        self.inner.size(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.knobs.before(prefix)?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.knobs.before(key)?;
        self.inner.delete(key)
    }
    fn list_all(&self, prefix: &str) -> Result<Vec<super::backend::ObjectInfo>> {
        self.knobs.before(prefix)?;
        self.inner.list_all(prefix)
    }
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        keys.iter().try_for_each(|k| self.knobs.before(k))?;
        self.inner.delete_many(keys)
    }
    fn sweep_leftover_writes(&self, older_than: Duration, dry_run: bool) -> Result<(u64, u64)> {
        self.inner.sweep_leftover_writes(older_than, dry_run)
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}
