//! The repository on S3-compatible object storage (AWS S3, Garage, MinIO,
//! Ceph RGW) through the `object_store` crate. Object keys mirror the
//! directory layout under an optional prefix.
//!
//! Every request runs on a small tokio runtime owned by the backend, with
//! its connection pool. The synchronous [`Backend`] calls hand a request
//! to it and wait; the fetch engine's [`Backend::get_async`] awaits it
//! without a thread, so the engine keeps many GETs in flight on a few
//! threads. Transient failures are retried here (not inside object_store)
//! so retries can be counted and shown in `status`.
//!
//! Manifests are created with a create-only conditional PUT
//! (`If-None-Match: *`, object_store's `PutMode::Create`), which AWS S3,
//! MinIO and Ceph honour. Some stores ignore the header and overwrite
//! (Garage 2.5 does): [`S3Backend::create_only_is_atomic`] finds out once
//! per process with a probe object, and the backup writer then gives each
//! backup id a random suffix, so two writers still cannot collide.
//!
//! A store that accepts connections and never answers must not hold a
//! daemon's start or stop for minutes (explore7 M2): the identity probe
//! (the GET of `repo.json` that decides whether a daemon starts from
//! staging's record) waits [`PROBE_TIMEOUT`] and is not retried after it;
//! once the daemon stops ([`Backend::begin_shutdown`]), every attempt,
//! including those in flight, has [`STOP_TIMEOUT`] left and none is
//! retried, and after one found no answer the rest are skipped at once.
//! A store that answered and then stops answering fails each request at
//! its deadline ([`REQUEST_DEADLINE`], attempts included; see `retry`).
//!
//! An object too large to cross a slow link within one attempt (a large
//! VM's manifest) is read in parts pinned to one version and written with
//! a timeout scaled to its size (see `large`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

use failure::{Failure, Hints};
use object_store::path::Path as ObjPath;
use object_store::{ClientConfigKey, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};

pub use retry::REQUEST_DEADLINE;
use retry::{Req, RetryLog};

use super::backend::{Backend, GetFuture, Got, ObjectBuf};
use crate::error::{Error, ErrorKind, Result};
use crate::util::AlignedBuf;

const ATTEMPTS: u32 = 6;
/// How long the GET of `repo.json` may wait for an answer. A store that
/// gives none in this time is not asked again by that request: a daemon
/// then starts from staging's record of the repository without waiting
/// out a series of 30 s timeouts.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a request may still take once the daemon stops.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(3);

pub struct S3Backend {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    rt: tokio::runtime::Runtime,
    retries: Arc<AtomicU64>,
    /// Whether the store honours create-only PUTs (probed once).
    create_only: std::sync::OnceLock<bool>,
    /// The identity probe's wait (see [`PROBE_TIMEOUT`]).
    probe_timeout: Duration,
    /// How long a request may take in all (see [`REQUEST_DEADLINE`]).
    deadline: Duration,
    /// Retries told once for all requests (see `retry`).
    log: Arc<RetryLog>,
    stop: Arc<Stopping>,
    /// How the store's answers are read (see [`Failure`]).
    hints: Arc<Hints>,
    /// object_store's per-attempt timeout (`AWS_TIMEOUT` or 30 s).
    attempt_timeout: Duration,
    /// The same store without object_store's timeout: large PUTs have
    /// their own, scaled to the body (see `large`).
    untimed: Arc<dyn ObjectStore>,
}

/// The daemon's stop, as the requests see it (see the module docs).
struct Stopping {
    /// `true` once the daemon stops.
    tx: tokio::sync::watch::Sender<bool>,
    /// A request found no answer during the stop: the rest are skipped.
    gave_up: std::sync::atomic::AtomicBool,
}

impl Stopping {
    fn stopping(&self) -> bool {
        *self.tx.borrow()
    }

    /// Records that the store did not answer during the stop; logged once.
    fn give_up(&self, bucket: &str, what: &str, why: &str) {
        if !self.gave_up.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                %bucket,
                "the S3 store did not answer while the daemon stops (S3 {what}: {why}): the requests still to come are skipped (a session's pin not rewritten now is rewritten at the next start or backup check; a lock not removed goes stale)"
            );
        }
    }
}

impl S3Backend {
    /// `spec` is `s3://BUCKET[/PREFIX]`. Credentials, endpoint and region
    /// come from the standard AWS_* environment variables; `overrides`
    /// (same names) take precedence.
    pub fn open(spec: &str, overrides: &[(String, String)]) -> Result<S3Backend> {
        let var = |k: &str| {
            overrides
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(k).ok())
        };
        let rest = spec
            .strip_prefix("s3://")
            .ok_or_else(|| Error::invalid(format!("not an s3:// URL: {spec}")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::invalid(format!("{spec}: missing bucket name")));
        }
        let mut b = AmazonS3Builder::from_env();
        for (k, v) in overrides {
            if let Ok(key) = k.to_ascii_lowercase().parse() {
                b = b.with_config(key, v);
            }
        }
        let mut b = b
            .with_bucket_name(bucket)
            // Our own retry loop counts attempts; see module docs.
            .with_retry(RetryConfig {
                max_retries: 0,
                ..Default::default()
            });
        b = b.with_region(
            var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
        );
        if var("AWS_ENDPOINT_URL").is_some_and(|e| e.starts_with("http://")) {
            b = b.with_allow_http(true);
        }
        // Path-style addressing unless asked otherwise: on-premises stores
        // rarely have wildcard DNS for virtual-hosted buckets.
        if var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_none() {
            b = b.with_virtual_hosted_style_request(false);
        }
        let metadata = failure::instance_metadata_endpoint(&b);
        let endpoint = failure::endpoint(&b);
        // object_store's per-attempt timeout, `AWS_TIMEOUT` if set (a
        // value that does not parse is refused by `build`).
        let attempt = b
            .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::Timeout))
            .and_then(|t| retry::parse_duration(&t));
        let untimed = b
            .clone()
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                large::NO_TIMEOUT,
            )
            .build()
            .map_err(|e| Error::invalid(format!("S3 repository {spec}: {e}")))?;
        let store = b
            .build()
            .map_err(|e| Error::invalid(format!("S3 repository {spec}: {e}")))?;
        let mut s3 = Self::with_store(Arc::new(store), bucket, prefix)?;
        s3.untimed = Arc::new(untimed);
        s3.deadline = attempt.map_or(REQUEST_DEADLINE, retry::deadline_for);
        s3.attempt_timeout = attempt.unwrap_or(retry::ATTEMPT_TIMEOUT);
        s3.hints = Arc::new(Hints {
            bucket: bucket.into(),
            metadata,
            endpoint: Some(endpoint),
        });
        Ok(s3)
    }

    /// A backend on any object store (tests use object_store's in-memory one).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        bucket: &str,
        prefix: &str,
    ) -> Result<S3Backend> {
        // One worker: a GET is a few recv()s of its body; a second worker
        // only added wakeups and task steals between the two (cold
        // sequential read: 8% less daemon CPU per GiB with one).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the S3 runtime", e))?;
        Ok(S3Backend {
            untimed: store.clone(),
            attempt_timeout: retry::ATTEMPT_TIMEOUT,
            store,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            rt,
            retries: Arc::default(),
            create_only: std::sync::OnceLock::new(),
            probe_timeout: PROBE_TIMEOUT,
            deadline: REQUEST_DEADLINE,
            log: Arc::new(RetryLog::new(bucket)),
            stop: Arc::new(Stopping {
                tx: tokio::sync::watch::Sender::new(false),
                gave_up: Default::default(),
            }),
            hints: Arc::new(Hints {
                bucket: bucket.into(),
                ..Default::default()
            }),
        })
    }

    /// One create-only PUT; `Ok(false)` if the object existed.
    fn put_create(&self, key: &str, data: &[u8]) -> Result<bool> {
        let (p, payload) = (self.path(key), PutPayload::from(data.to_vec()));
        let attempts = Arc::new(AtomicU64::new(0));
        let tries = attempts.clone();
        let what = format!("PUT (create-only) {key}");
        let (req, timeout) = self.put_req(data.len() as u64);
        let r = self.wait(
            &what,
            req.retrying(&what, None, move |s| {
                tries.fetch_add(1, Ordering::Relaxed);
                let (p, payload) = (p.clone(), payload.clone());
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                large::timed(timeout, async move {
                    s.put_opts(&p, payload, opts).await.map(|_| ())
                })
            }),
        );
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // After a retry, "exists" may be our own first attempt.
                if attempts.load(Ordering::Relaxed) > 1
                    && self.get(key, data.len() as u64)?.as_deref() == Some(data)
                {
                    return Ok(true);
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether a create-only PUT of an existing key fails on this store:
    /// written twice to a fresh probe object, the second must be refused.
    pub fn create_only_is_atomic(&self) -> Result<bool> {
        if let Some(v) = self.create_only.get() {
            return Ok(*v);
        }
        let key = format!("probes/create-only-{}", super::random_hex(8));
        self.put_create(&key, b"1")?;
        let honoured = !self.put_create(&key, b"2")?;
        let _ = self.delete(&key);
        if !honoured {
            tracing::warn!(
                store = %self.location(),
                "this S3 store ignores conditional PUTs (If-None-Match); backup ids get a random suffix so concurrent writers cannot overwrite each other"
            );
        }
        let _ = self.create_only.set(honoured);
        Ok(honoured)
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Runs a request on the backend's runtime from any thread (including
    /// threads of another runtime) and waits for it, retrying transient
    /// failures.
    fn call<T: Send + 'static, F>(
        &self,
        what: &str,
        op: impl FnMut(Arc<dyn ObjectStore>) -> F + Send + 'static,
    ) -> Result<T>
    where
        F: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    {
        self.wait(what, self.retrying(what, None, op))
    }

    /// Runs `fut` on the backend's runtime and waits for its answer.
    fn wait<T: Send + 'static>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| Error::new(ErrorKind::Io, format!("S3 {what}: request dropped")))?
    }

    /// A request with its retries (see [`Req::retrying`]).
    fn retrying<T: Send + 'static, F>(
        &self,
        what: &str,
        limit: Option<Duration>,
        op: impl FnMut(Arc<dyn ObjectStore>) -> F + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        F: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    {
        self.req().retrying(what, limit, op)
    }

    /// What a request needs of the backend, owned (a request's future
    /// outlives the borrow of the backend that made it).
    fn req(&self) -> Req {
        Req {
            store: self.store.clone(),
            retries: self.retries.clone(),
            bucket: self.bucket.clone(),
            stop: self.stop.clone(),
            hints: self.hints.clone(),
            deadline: self.deadline,
            log: self.log.clone(),
        }
    }

    /// A GET with its retries; `None` if the object does not exist. An
    /// object larger than a part is read in parts (see `large`).
    fn get_request(
        &self,
        key: &str,
        limit: u64,
    ) -> impl std::future::Future<Output = Got> + Send + 'static {
        let (req, p, key) = (self.req(), self.path(key), key.to_string());
        let wait = (key == super::INFO_KEY).then_some(self.probe_timeout);
        let part = large::part_bytes(self.attempt_timeout);
        let what = format!("{}/{key}", self.location());
        async move {
            match large::get(req, p, &key, limit, part, wait).await {
                Ok(Ok(b)) => Ok(Some(ObjectBuf::Aligned(b))),
                Ok(Err(len)) => Err(super::backend::too_large(&what, len, limit)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        }
    }

    /// The request a PUT of `len` bytes is made with, and the timeout of
    /// each of its attempts if object_store's is not it (see `large`).
    fn put_req(&self, len: u64) -> (Req, Option<Duration>) {
        let mut req = self.req();
        if len <= large::part_bytes(self.attempt_timeout) {
            return (req, None);
        }
        let timeout = large::put_timeout(self.attempt_timeout, len);
        req.store = self.untimed.clone();
        req.deadline = retry::deadline_for(timeout);
        (req, Some(timeout))
    }
}

/// The body's frames copied into one buffer aligned for direct I/O, as
/// long as the headers said. This is the copy object_store's own collect
/// makes (`GetResult::bytes`), into memory a fetched chunk is then
/// hashed, answered and written to staging from (`O_DIRECT`) as it is.
async fn collect_aligned(r: object_store::GetResult) -> object_store::Result<AlignedBuf> {
    use futures::StreamExt;
    let len = (r.range.end - r.range.start) as usize;
    let path = r.meta.location.to_string();
    let mut buf = AlignedBuf::with_capacity(len);
    let mut body = r.into_stream();
    while let Some(frame) = body.next().await {
        if !buf.extend_from_slice(&frame?) {
            return Err(body_length_error(&path, len));
        }
    }
    if buf.len() != len {
        return Err(body_length_error(&path, len));
    }
    Ok(buf)
}

fn body_length_error(path: &str, len: usize) -> object_store::Error {
    object_store::Error::Generic {
        store: "S3",
        source: format!("the body of {path} is not the {len} bytes its headers announced").into(),
    }
}

/// A request not made: the store did not answer during the daemon's stop.
fn skipped_at_stop(what: &str) -> Error {
    Error::new(
        ErrorKind::Io,
        format!("S3 {what}: skipped (the store did not answer while the daemon stops)"),
    )
}

fn map_err(what: &str, e: object_store::Error) -> Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => ErrorKind::NotFound,
        object_store::Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => ErrorKind::NotPermitted,
        _ => ErrorKind::Io,
    };
    // object_store's message carries the HTTP status where there was one.
    Error::new(kind, format!("S3 {what}: {}", error_text(&e)))
}

/// `e`'s message and its sources' that it does not already say: the
/// HTTP client's "error sending request" says why only in a source
/// (`Connection refused`; explore9 L4).
fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !more.is_empty() && !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

impl Backend for S3Backend {
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let got = self.wait(&format!("GET {key}"), self.get_request(key, limit))?;
        Ok(got.map(ObjectBuf::into_vec))
    }

    /// Runs on the backend's runtime (its connections live there); the
    /// caller's runtime only awaits the answer.
    fn get_async(&self, key: &str, limit: u64) -> GetFuture {
        let (fut, rt) = (self.get_request(key, limit), self.rt.handle().clone());
        let key = key.to_string();
        Box::pin(async move {
            rt.spawn(fut).await.map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!("S3 GET {key}: request dropped ({e})"),
                )
            })?
        })
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let (p, payload) = (self.path(key), PutPayload::from(data.to_vec()));
        let what = format!("PUT {key}");
        let (req, timeout) = self.put_req(data.len() as u64);
        self.wait(
            &what,
            req.retrying(&what, None, move |s| {
                let (p, payload) = (p.clone(), payload.clone());
                large::timed(timeout, async move { s.put(&p, payload).await.map(|_| ()) })
            }),
        )
    }

    /// A create-only conditional PUT (see the module docs for stores that
    /// ignore the condition). An existing object is never replaced by a
    /// store that honours it; a HEAD first spares most collisions a write.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        if self.exists(key)? {
            return Ok(false);
        }
        self.put_create(key, data)
    }

    fn create_only_is_atomic(&self) -> Result<bool> {
        S3Backend::create_only_is_atomic(self)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.size(key)?.is_some())
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let p = self.path(key);
        match self.call(&format!("HEAD {key}"), move |s| {
            let p = p.clone();
            async move { s.head(&p).await }
        }) {
            Ok(m) => Ok(Some(m.size)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = if prefix.is_empty() && self.prefix.is_empty() {
            None
        } else {
            Some(self.path(prefix))
        };
        let base = p.as_ref().map(|p| p.to_string());
        let r = self.call(&format!("LIST {prefix}"), move |s| {
            let p = p.clone();
            async move { s.list_with_delimiter(p.as_ref()).await }
        })?;
        let strip = |full: &str| -> Option<String> {
            let rest = match &base {
                Some(b) => full.strip_prefix(b.as_str())?.trim_start_matches('/'),
                None => full,
            };
            Some(rest.split('/').next()?.to_string()).filter(|n| !n.is_empty())
        };
        let mut names: Vec<String> = r
            .common_prefixes
            .iter()
            .map(|p| p.to_string())
            .chain(r.objects.iter().map(|o| o.location.to_string()))
            .filter_map(|f| strip(&f))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key);
        self.call(&format!("DELETE {key}"), move |s| {
            let p = p.clone();
            async move { s.delete(&p).await }
        })
    }

    fn list_all(&self, prefix: &str) -> Result<Vec<super::backend::ObjectInfo>> {
        use futures::TryStreamExt;
        let p = self.path(prefix.trim_matches('/'));
        let metas = self.call(&format!("LIST {prefix}/*"), move |s| {
            let p = p.clone();
            async move { s.list(Some(&p)).try_collect::<Vec<_>>().await }
        })?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out: Vec<_> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.to_string().strip_prefix(&strip)?.to_string();
                Some(super::backend::ObjectInfo {
                    key,
                    size: m.size,
                    modified_unix: m.last_modified.timestamp().max(0) as u64,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// S3 DeleteObjects, 1000 keys a request; each batch retried whole
    /// (deleting twice is harmless).
    fn delete_many(&self, keys: &[String]) -> Result<()> {
        use futures::{StreamExt, TryStreamExt};
        for batch in keys.chunks(1000) {
            let paths: Vec<ObjPath> = batch.iter().map(|k| self.path(k)).collect();
            self.call(&format!("DELETE {} objects", batch.len()), move |s| {
                let paths = paths.clone();
                async move {
                    let input = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
                    let r: Vec<_> = s
                        .delete_stream(input)
                        .filter(|r| {
                            // An absent object is what we wanted.
                            let gone = matches!(r, Err(object_store::Error::NotFound { .. }));
                            async move { !gone }
                        })
                        .try_collect()
                        .await?;
                    Ok(r.len())
                }
            })?;
        }
        Ok(())
    }

    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn answering(&self) -> bool {
        self.log.answering()
    }

    fn begin_shutdown(&self) {
        self.stop.tx.send_replace(true);
    }
}

mod failure;
mod large;
#[cfg(test)]
mod large_tests;
mod retry;
#[cfg(test)]
mod tests;
