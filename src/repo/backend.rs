//! Storage backends: a small key/value capability trait that the chunk
//! store and manifests sit on. Keys are `/`-separated and mirror the
//! directory layout, so an object store can use them as object keys.
//!
//! Chunk reads of the data path also have an asynchronous form,
//! [`Backend::get_async`], which the fetch engine (`prefetch::scheduler`)
//! polls on its own tokio runtime so that many GETs are in flight without
//! a thread each: S3 awaits object_store natively, a local directory reads
//! on that runtime's bounded blocking pool, and a delay is a timer.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::util::{fsync_dir, write_atomic};

/// The outcome of a GET: the object, or `None` if it does not exist.
pub type Got = Result<Option<ObjectBuf>>;

/// A fetched object's bytes: a `Vec`, or (S3) a buffer aligned for direct
/// I/O, into which the body was collected, so that a chunk stored raw is
/// verified, answered and written to staging from it without a copy.
pub enum ObjectBuf {
    Vec(Vec<u8>),
    Aligned(crate::util::AlignedBuf),
}

impl ObjectBuf {
    pub fn truncate(&mut self, len: usize) {
        match self {
            ObjectBuf::Vec(v) => v.truncate(len),
            ObjectBuf::Aligned(a) => a.truncate(len),
        }
    }

    /// Shareable bytes, without a copy.
    pub fn into_bytes(self) -> bytes::Bytes {
        match self {
            ObjectBuf::Vec(v) => v.into(),
            ObjectBuf::Aligned(a) => bytes::Bytes::from_owner(a),
        }
    }

    /// A `Vec` (a copy if aligned).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            ObjectBuf::Vec(v) => v,
            ObjectBuf::Aligned(a) => a.to_vec(),
        }
    }
}

impl From<Vec<u8>> for ObjectBuf {
    fn from(v: Vec<u8>) -> ObjectBuf {
        ObjectBuf::Vec(v)
    }
}

impl std::fmt::Debug for ObjectBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectBuf::Vec(v) => write!(f, "ObjectBuf::Vec({} bytes)", v.len()),
            ObjectBuf::Aligned(a) => write!(f, "ObjectBuf::{a:?}"),
        }
    }
}

impl PartialEq<Vec<u8>> for ObjectBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

impl std::ops::Deref for ObjectBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ObjectBuf::Vec(v) => v,
            ObjectBuf::Aligned(a) => a,
        }
    }
}

impl std::ops::DerefMut for ObjectBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            ObjectBuf::Vec(v) => v,
            ObjectBuf::Aligned(a) => a,
        }
    }
}

/// A GET that has not started yet: it does nothing until polled, and must
/// be polled on a tokio runtime with timers (the fetch engine's).
pub type GetFuture = futures::future::BoxFuture<'static, Got>;

/// What the repository needs from where bytes live.
pub trait Backend: Send + Sync {
    /// Reads a whole object; `Ok(None)` if it does not exist. An object
    /// larger than `limit` bytes is refused as corrupt before its body is
    /// read into memory.
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>>;
    /// `get` without holding a thread for the wait (see the module doc).
    fn get_async(&self, key: &str, limit: u64) -> GetFuture;
    /// Stores an object atomically, replacing any old version.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Stores an object atomically only if absent; `Ok(false)` if it existed.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool>;
    /// Whether `put_new` is atomic: two writers of one key can never both
    /// succeed. Where it is not, writers must use keys that cannot collide.
    fn create_only_is_atomic(&self) -> Result<bool> {
        Ok(true)
    }
    fn exists(&self, key: &str) -> Result<bool>;
    /// Size of a stored object, `None` if absent.
    fn size(&self, key: &str) -> Result<Option<u64>>;
    /// Names directly below `prefix` (a "directory"), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    fn delete(&self, key: &str) -> Result<()>;
    /// Every object below `prefix`, at any depth (`chunks`, `locks`).
    fn list_all(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Deletes many objects (batched where the store can); absent ones
    /// are not an error.
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        keys.iter().try_for_each(|k| self.delete(k))
    }
    /// Removes (or with `dry_run` only counts) what writes killed midway
    /// left, untouched for `older_than`: (files, bytes). Stores whose
    /// writes leave nothing behind have nothing to do.
    fn sweep_leftover_writes(&self, _older_than: Duration, _dry_run: bool) -> Result<(u64, u64)> {
        Ok((0, 0))
    }
    /// Where this is, for messages.
    fn location(&self) -> String;
    /// Keeps the store's space reserve if it has one and room for it
    /// (see [`LocalDir`]); never fails.
    fn keep_space_reserve(&self) {}
    /// Requests retried after transient failures (remote stores).
    fn retries(&self) -> u64 {
        0
    }
    /// False while the store is failing: a request is retrying or gave up
    /// unanswered, and none was answered since. Work that may be left
    /// behind (a lock's removal) then gets a short wait instead of a
    /// request deadline; a store that is slow but answering gets its
    /// full deadline (review28 M1).
    fn answering(&self) -> bool {
        true
    }
    /// The daemon stops: what it still asks (pins, profiles, lock
    /// removals) must not hold the stop for minutes. A store that is not
    /// confirmed as the repository is asked nothing more
    /// (`unconfirmed`); a remote store's requests get a short time-box
    /// and no retries, and once one found no answer the rest are skipped
    /// (`s3`). Each skip is logged; nothing skipped is lost: a pin not
    /// rewritten now is rewritten at the next start or backup check.
    fn begin_shutdown(&self) {}
    /// Why the store has not answered as the repository since the daemon
    /// started without it (a degraded start, `unconfirmed`); `None` once
    /// it has, and for a store opened normally. For `status`.
    fn not_confirmed(&self) -> Option<String> {
        None
    }
    /// The daemon's start (resuming sessions, pins, jobs) is over: a store
    /// that did not answer it may be asked again at the next request
    /// (`unconfirmed`), not only once the start's hold has passed.
    fn end_of_start(&self) {}
}

/// One object found by [`Backend::list_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The full key, `/`-separated.
    pub key: String,
    pub size: u64,
    /// Last modified, as the store's clock saw it (Unix seconds).
    pub modified_unix: u64,
}

/// A store's answer that waiting will not change: it is there and
/// answers, but refuses what it is asked as configured (an S3 bucket that
/// does not exist, a request refused as malformed: a wrong region, an
/// endpoint that is not S3). Carried as the source of the error (kind
/// `Io`, so a guest's read still sees EIO), so that a daemon's start
/// tells it from an outage: a typo must fail the start, not start it
/// degraded from staging's record (`daemon::open_repository`).
#[derive(Debug)]
pub struct Misconfigured(pub String);

impl std::fmt::Display for Misconfigured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Misconfigured {}

impl Misconfigured {
    /// An `Io` error saying `context: why`, marked as a misconfiguration.
    pub fn error(context: impl Into<String>, why: impl Into<String>) -> Error {
        Error::io(context, std::io::Error::other(Misconfigured(why.into())))
    }

    /// Whether `e` (or an error it wraps) is a [`Misconfigured`] answer.
    pub fn is(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut at = Some(e);
        while let Some(e) = at {
            if e.is::<Misconfigured>() {
                return true;
            }
            // An io::Error's `source` skips the error it wraps.
            let wrapped = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref());
            if wrapped.is_some_and(|w| w.is::<Misconfigured>()) {
                return true;
            }
            at = e.source();
        }
        false
    }
}

/// An object over its bound: damaged or forged, never read whole.
pub fn too_large(what: &str, len: u64, limit: u64) -> Error {
    Error::corrupt(format!(
        "{what} has {len} bytes, more than the {limit} such an object may have"
    ))
}

/// A repository in a local directory. Objects are files; every write is
/// temp file + fsync + rename + fsync of the directory.
///
/// Space reserve: backups can fill the filesystem to its last block, and
/// then `forget` and `gc` could not write the lock they take before
/// deleting anything, so nothing could free space (explore2). The
/// directory keeps `space-reserve` (256 KiB of written zeros, made on
/// open when there is room); a lock write that fails for space gives it
/// back and is tried once more. Only lock writes may use it: a backup
/// that fills the filesystem fails as before.
#[derive(Clone)]
pub struct LocalDir {
    root: PathBuf,
}

/// The space reserve's name and size (see [`LocalDir`]).
pub const RESERVE: &str = "space-reserve";
const RESERVE_BYTES: usize = 256 << 10;

impl LocalDir {
    /// `write`, and for a lock that failed for space, once more after the
    /// space reserve is given back.
    fn with_reserve<T>(&self, key: &str, write: impl Fn() -> Result<T>) -> Result<T> {
        match write() {
            Err(e) if e.kind() == crate::error::ErrorKind::NoSpace && key.starts_with("locks/") => {
                match std::fs::remove_file(self.path(RESERVE)) {
                    Ok(()) => {
                        tracing::warn!(repo = %self.root.display(), "the repository's filesystem is full: its space reserve was given back to take a lock (forget and gc free space; the reserve is made again when there is room)");
                        write()
                    }
                    Err(_) => Err(e.context(format!(
                        "the repository's filesystem is full (and its space reserve is used up): free space on {}",
                        self.root.display()
                    ))),
                }
            }
            r => r,
        }
    }

    pub fn new(root: &Path) -> Self {
        LocalDir {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Creates the parent directories of `key`, fsyncing each new one into
    /// its parent so the object's path survives a crash.
    fn ensure_parent(&self, key: &str) -> Result<()> {
        let p = self.path(key);
        let parent = p.parent().expect("keys have a parent");
        if parent.is_dir() {
            return Ok(());
        }
        // Directories are made only in a repository that is there: never
        // the root again once it was moved away, nor in an empty directory
        // in its place (a share not mounted), where they would hide under
        // the share once it is mounted.
        if !self.root.join(super::INFO_KEY).is_file() {
            return Err(Error::new(
                crate::error::ErrorKind::Io,
                format!(
                    "repository {} is unreachable: no repo.json there (moved away, or a share not mounted?)",
                    self.root.display()
                ),
            ));
        }
        let mut missing = vec![];
        let mut cur = parent;
        while !cur.is_dir() {
            missing.push(cur.to_path_buf());
            cur = cur.parent().expect("repository root exists");
        }
        for dir in missing.iter().rev() {
            match fs::create_dir(dir) {
                Ok(()) => fsync_dir(dir.parent().expect("has parent"))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
            }
        }
        Ok(())
    }
}

impl Backend for LocalDir {
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let p = self.path(key);
        match fs::File::open(&p) {
            Ok(f) => {
                let len = f.metadata().ctx(|| format!("stat {}", p.display()))?.len();
                if len > limit {
                    return Err(too_large(&p.display().to_string(), len, limit));
                }
                let mut buf = Vec::with_capacity(len as usize);
                f.take(limit + 1)
                    .read_to_end(&mut buf)
                    .ctx(|| format!("read {}", p.display()))?;
                if buf.len() as u64 > limit {
                    return Err(too_large(&p.display().to_string(), buf.len() as u64, limit));
                }
                Ok(Some(buf))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("open {}", p.display()), e)),
        }
    }

    /// A file read is blocking I/O: it runs on the polling runtime's
    /// blocking pool, which the fetch engine bounds.
    fn get_async(&self, key: &str, limit: u64) -> GetFuture {
        let (me, key) = (self.clone(), key.to_string());
        let what = self.path(&key).display().to_string();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.get(&key, limit).map(|o| o.map(ObjectBuf::from)))
                .await
                .map_err(|e| {
                    // Cancelled by a runtime shutdown, or a panic in the read.
                    Error::new(crate::error::ErrorKind::Io, format!("read {what}: {e}"))
                })?
        })
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.with_reserve(key, || {
            self.ensure_parent(key)?;
            write_atomic(&self.path(key), data, 0o644, true)
        })
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.with_reserve(key, || {
            self.ensure_parent(key)?;
            match write_atomic(&self.path(key), data, 0o644, false) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == crate::error::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn keep_space_reserve(&self) {
        let p = self.path(RESERVE);
        if p.exists() {
            return;
        }
        match write_atomic(&p, &vec![0u8; RESERVE_BYTES], 0o600, false) {
            Ok(()) => tracing::debug!(path = %p.display(), "space reserve made"),
            Err(e) => tracing::debug!(path = %p.display(), "no room for the space reserve: {e}"),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.size(key)?.is_some())
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let p = self.path(key);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("stat {}", p.display()), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = self.path(prefix);
        let Some(rd) = read_dir_if_any(&p)? else {
            return Ok(vec![]);
        };
        let mut names = vec![];
        for entry in rd {
            let entry = entry.ctx(|| format!("list {}", p.display()))?;
            if let Some(name) = entry.file_name().to_str() {
                // Temp files of in-flight writes are invisible by design.
                if !name.starts_with('.') {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Temp files of `write_atomic` (`.NAME.tmp.PID.N`) anywhere below
    /// the root: a writer killed between creating and renaming one.
    fn sweep_leftover_writes(&self, older_than: Duration, dry_run: bool) -> Result<(u64, u64)> {
        let (mut files, mut bytes) = (0, 0);
        let mut dirs = vec![self.path("")];
        while let Some(p) = dirs.pop() {
            let Some(rd) = read_dir_if_any(&p)? else {
                continue;
            };
            for entry in rd {
                let entry = entry.ctx(|| format!("list {}", p.display()))?;
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(entry.path());
                    continue;
                }
                let name = entry.file_name();
                let old = meta.modified().ok().and_then(|m| m.elapsed().ok());
                if !is_write_leftover(&name.to_string_lossy()) || old.is_none_or(|a| a < older_than)
                {
                    continue;
                }
                if !dry_run {
                    match fs::remove_file(entry.path()) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            return Err(Error::io(format!("remove {}", entry.path().display()), e))
                        }
                    }
                }
                files += 1;
                bytes += meta.len();
            }
        }
        Ok((files, bytes))
    }

    fn list_all(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = vec![];
        let mut dirs = vec![prefix.trim_matches('/').to_string()];
        while let Some(dir) = dirs.pop() {
            let p = self.path(&dir);
            let Some(rd) = read_dir_if_any(&p)? else {
                continue;
            };
            for entry in rd {
                let entry = entry.ctx(|| format!("list {}", p.display()))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if name.starts_with('.') {
                    continue; // temp files of in-flight writes
                }
                let key = if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Deleted since the listing (another gc, a lock released).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(format!("stat {key}"), e)),
                };
                if meta.is_dir() {
                    dirs.push(key);
                } else {
                    let modified_unix = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                    out.push(ObjectInfo {
                        key,
                        size: meta.len(),
                        modified_unix,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes every file, then syncs each directory touched once.
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let p = self.path(key);
            match fs::remove_file(&p) {
                Ok(()) => {
                    dirs.insert(p.parent().expect("has parent").to_path_buf());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("delete {}", p.display()), e)),
            }
        }
        dirs.iter().try_for_each(|d| fsync_dir(d))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key);
        match fs::remove_file(&p) {
            Ok(()) => fsync_dir(p.parent().expect("has parent")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("delete {}", p.display()), e)),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// Another backend with a fixed delay before every chunk read and chunk
/// write: a local repository that behaves like a remote one, for
/// benchmarks that give every system the same per-request latency (`serve
/// --repo-delay-ms`), and for tests that need a daemon's live backup
/// (`backup --session`, which writes chunks) to take a while.
pub struct Delayed {
    pub inner: Box<dyn Backend>,
    pub delay: std::time::Duration,
}

impl Backend for Delayed {
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        if key.starts_with("chunks/") {
            std::thread::sleep(self.delay);
        }
        self.inner.get(key, limit)
    }
    /// The delay is a timer: delayed GETs in flight hold no thread.
    fn get_async(&self, key: &str, limit: u64) -> GetFuture {
        let delay = key.starts_with("chunks/").then_some(self.delay);
        let get = self.inner.get_async(key, limit);
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            get.await
        })
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        if key.starts_with("chunks/") {
            std::thread::sleep(self.delay);
        }
        self.inner.put(key, data)
    }
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.inner.put_new(key, data)
    }
    fn create_only_is_atomic(&self) -> Result<bool> {
        self.inner.create_only_is_atomic()
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }
    fn size(&self, key: &str) -> Result<Option<u64>> {
        self.inner.size(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
    fn list_all(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.inner.list_all(prefix)
    }
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        self.inner.delete_many(keys)
    }
    fn sweep_leftover_writes(&self, older_than: Duration, dry_run: bool) -> Result<(u64, u64)> {
        self.inner.sweep_leftover_writes(older_than, dry_run)
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    fn begin_shutdown(&self) {
        self.inner.begin_shutdown()
    }
    fn end_of_start(&self) {
        self.inner.end_of_start()
    }
    fn retries(&self) -> u64 {
        self.inner.retries()
    }
    fn answering(&self) -> bool {
        self.inner.answering()
    }
    fn not_confirmed(&self) -> Option<String> {
        self.inner.not_confirmed()
    }
}

/// The entries of directory `p`; `None` if it is gone (deleted since it
/// was listed).
fn read_dir_if_any(p: &Path) -> Result<Option<fs::ReadDir>> {
    match fs::read_dir(p) {
        Ok(rd) => Ok(Some(rd)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("list {}", p.display()), e)),
    }
}

/// `.NAME.tmp.PID.N`, as `util::write_atomic` names its temp files.
fn is_write_leftover(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let mut parts = rest.rsplitn(4, '.');
    let (n, pid, tmp) = (parts.next(), parts.next(), parts.next());
    let digits =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    digits(n) && digits(pid) && tmp == Some("tmp") && parts.next().is_some_and(|b| !b.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_writes_old_temp_files_are_swept_and_fresh_ones_and_objects_kept() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalDir::new(d.path());
        b.put(super::super::INFO_KEY, b"{}").unwrap();
        b.put("chunks/ab/abcd", b"chunk").unwrap();
        let old = d.path().join("chunks/ab/.abcd.tmp.123.4");
        let fresh = d.path().join("backups/.x.json.tmp.9.1");
        std::fs::create_dir_all(fresh.parent().unwrap()).unwrap();
        for p in [&old, &fresh] {
            fs::write(p, b"half").unwrap();
        }
        let day_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 86400);
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(day_ago)
            .unwrap();
        let day = Duration::from_secs(86400);
        assert_eq!(b.sweep_leftover_writes(day, true).unwrap(), (1, 4));
        assert!(old.exists(), "a dry run removed a file");
        assert_eq!(b.sweep_leftover_writes(day, false).unwrap(), (1, 4));
        assert!(!old.exists() && fresh.exists());
        assert_eq!(b.get("chunks/ab/abcd", 10).unwrap().unwrap(), b"chunk");
        assert!(!is_write_leftover(".hidden") && !is_write_leftover(".tmp.1.2"));
    }

    #[test]
    fn objects_round_trip_and_listing_hides_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalDir::new(d.path());
        b.put(super::super::INFO_KEY, b"{}").unwrap();
        assert_eq!(b.get("a/b/c", 10).unwrap(), None);
        b.put("a/b/c", b"hello").unwrap();
        assert_eq!(b.get("a/b/c", 10).unwrap().unwrap(), b"hello");
        assert!(b.get("a/b/c", 4).is_err(), "over its bound");
        assert!(!b.put_new("a/b/c", b"other").unwrap());
        assert_eq!(b.get("a/b/c", 10).unwrap().unwrap(), b"hello");
        fs::write(d.path().join("a/b/.c.tmp.1"), b"x").unwrap();
        assert_eq!(b.list("a/b").unwrap(), vec!["c".to_string()]);
        assert_eq!(b.size("a/b/c").unwrap(), Some(5));
        b.delete("a/b/c").unwrap();
        assert!(!b.exists("a/b/c").unwrap());
    }

    #[test]
    fn a_write_never_recreates_a_repository_moved_away_nor_fills_an_empty_directory_in_its_place() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        fs::create_dir(&root).unwrap();
        let b = LocalDir::new(&root);
        b.put(super::super::INFO_KEY, b"{}").unwrap();
        b.put("pins/vm/a.json", b"pin").unwrap();
        fs::rename(&root, d.path().join("away")).unwrap();
        let e = b.put("pins/vm/b.json", b"pin").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Io, "{e}");
        assert!(!root.exists(), "the repository directory was made again");
        // An unmounted share: its mount point, empty.
        fs::create_dir(&root).unwrap();
        assert!(b.put("pins/vm/b.json", b"pin").is_err());
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
    }
}
