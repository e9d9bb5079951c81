//! A repository backend for tests: a local directory behind knobs that
//! make it slow, hold chunk reads at a gate, fail chosen keys as an
//! unreachable store would, or panic in a read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::backend::{Backend, LocalDir};
use crate::error::{Error, ErrorKind, Result};

/// Shared knobs; clone freely, every clone controls the same backend.
#[derive(Clone, Default)]
pub struct Knobs {
    gate: Arc<(Mutex<bool>, Condvar)>,
    gated: Arc<AtomicBool>,
    chunk_delay_ms: Arc<AtomicU64>,
    meta_delay_ms: Arc<AtomicU64>,
    panic_next: Arc<AtomicBool>,
    /// Keys containing one of these fail as if the store did not answer.
    unreachable: Arc<Mutex<Vec<String>>>,
    /// Chunk objects read so far.
    chunk_reads: Arc<AtomicU64>,
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

    fn before(&self, key: &str) -> Result<()> {
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
        if chunk && self.gated.load(Ordering::SeqCst) {
            let (m, cv) = &*self.gate;
            let mut open = m.lock();
            while !*open {
                cv.wait(&mut open);
            }
        }
        let ms = if chunk {
            self.chunk_delay_ms.load(Ordering::SeqCst)
        } else if key.starts_with("backups/") || key.starts_with("profiles/") {
            self.meta_delay_ms.load(Ordering::SeqCst)
        } else {
            0
        };
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
        Ok(())
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
        self.knobs.before(key)?;
        if key.starts_with("chunks/") {
            self.knobs.chunk_reads.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(key, limit)
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
    fn location(&self) -> String {
        self.inner.location()
    }
}
