//! The S3 backend against in-memory stores and tiny local servers: create-only
//! races, timeouts, retries, error texts.

use super::*;
use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, PutMultipartOptions, PutResult,
};

/// An in-memory store whose HEADs wait for each other at a barrier: two
/// writers both learn that a key is absent before either writes it.
#[derive(Debug)]
struct RacingHeads {
    inner: object_store::memory::InMemory,
    barrier: tokio::sync::Barrier,
}

impl std::fmt::Display for RacingHeads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RacingHeads")
    }
}

#[async_trait]
impl ObjectStore for RacingHeads {
    async fn put_opts(
        &self,
        p: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(p, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        p: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(p, opts).await
    }
    async fn get_opts(&self, p: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
        if o.head {
            self.barrier.wait().await;
        }
        self.inner.get_opts(p, o).await
    }
    async fn delete(&self, p: &ObjPath) -> object_store::Result<()> {
        self.inner.delete(p).await
    }
    fn list(&self, p: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy(&self, a: &ObjPath, b: &ObjPath) -> object_store::Result<()> {
        self.inner.copy(a, b).await
    }
    async fn copy_if_not_exists(&self, a: &ObjPath, b: &ObjPath) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(a, b).await
    }
}

/// A store that accepts connections and never answers (explore7 M2):
/// its address, and how many connections it accepted.
fn silent_store() -> (u16, Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let n = accepted.clone();
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in l.incoming() {
            n.fetch_add(1, Ordering::SeqCst);
            held.push(c);
        }
    });
    (port, accepted)
}

fn backend_at(port: u16) -> S3Backend {
    let vars: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "GK0123".into()),
        ("AWS_SECRET_ACCESS_KEY", "secret".into()),
        ("AWS_REGION", "garage".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    S3Backend::open("s3://bucket/site", &vars).unwrap()
}

#[test]
fn the_identity_probe_of_a_store_that_never_answers_ends_after_one_short_wait() {
    let (port, accepted) = silent_store();
    let mut b = backend_at(port);
    b.probe_timeout = Duration::from_secs(1);
    let t0 = std::time::Instant::now();
    let e = b.get(crate::repo::INFO_KEY, 1 << 20).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the probe took {:?}: {e}",
        t0.elapsed()
    );
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("no answer in 1 s"), "{e}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the probe was retried");
}

#[test]
fn at_the_daemons_stop_a_request_to_a_silent_store_ends_within_seconds_and_the_rest_are_skipped() {
    let (port, _) = silent_store();
    let b = Arc::new(backend_at(port));
    let b2 = b.clone();
    let t0 = std::time::Instant::now();
    let pin = std::thread::spawn(move || b2.put("pins/vm/x.json", b"{}"));
    std::thread::sleep(Duration::from_millis(300));
    b.begin_shutdown();
    let e = pin.join().unwrap().unwrap_err();
    assert!(
        t0.elapsed() < STOP_TIMEOUT + Duration::from_secs(2),
        "the request in flight held the stop {:?}: {e}",
        t0.elapsed()
    );
    assert!(e.to_string().contains("of the daemon's stop"), "{e}");
    let t1 = std::time::Instant::now();
    let e = b.put("profiles/vm/p.json", b"{}").unwrap_err();
    assert!(t1.elapsed() < Duration::from_millis(500), "{e}");
    assert!(e.to_string().contains("skipped"), "{e}");
}

/// A store whose every request fails with a generic error of `text`
/// (how object_store reports a LIST answered 403 or 404), counting
/// the requests.
#[derive(Debug)]
struct Refusing {
    text: &'static str,
    calls: AtomicU64,
}

impl std::fmt::Display for Refusing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Refusing")
    }
}

impl Refusing {
    fn err(&self) -> object_store::Error {
        self.calls.fetch_add(1, Ordering::SeqCst);
        object_store::Error::Generic {
            store: "S3",
            source: self.text.into(),
        }
    }
}

#[async_trait]
impl ObjectStore for Refusing {
    async fn put_opts(
        &self,
        _: &ObjPath,
        _: PutPayload,
        _: PutOptions,
    ) -> object_store::Result<PutResult> {
        Err(self.err())
    }
    async fn put_multipart_opts(
        &self,
        _: &ObjPath,
        _: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(self.err())
    }
    async fn get_opts(&self, _: &ObjPath, _: GetOptions) -> object_store::Result<GetResult> {
        Err(self.err())
    }
    async fn delete(&self, _: &ObjPath) -> object_store::Result<()> {
        Err(self.err())
    }
    fn list(&self, _: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let e = self.err();
        Box::pin(futures::stream::once(async move { Err(e) }))
    }
    async fn list_with_delimiter(&self, _: Option<&ObjPath>) -> object_store::Result<ListResult> {
        Err(self.err())
    }
    async fn copy(&self, _: &ObjPath, _: &ObjPath) -> object_store::Result<()> {
        Err(self.err())
    }
    async fn copy_if_not_exists(&self, _: &ObjPath, _: &ObjPath) -> object_store::Result<()> {
        Err(self.err())
    }
}

fn refusing(text: &'static str) -> (Arc<Refusing>, S3Backend) {
    let store = Arc::new(Refusing {
        text,
        calls: AtomicU64::new(0),
    });
    let b = S3Backend::with_store(store.clone(), "backups", "").unwrap();
    (store, b)
}

#[test]
fn a_missing_bucket_is_named_and_not_retried() {
    let (store, b) = refusing(
        "Error performing list request: Error performing GET http://127.0.0.1:3900/backups?list-type=2 in 1ms - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>Bucket not found: backups</Message></Error>",
    );
    let e = b.list("").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("S3 bucket \"backups\" does not exist: LIST")
            && e.to_string().contains("answered NoSuchBucket"),
        "{e}"
    );
    assert_eq!(store.calls.load(Ordering::SeqCst), 1, "retried: {e}");
    assert_eq!(b.retries(), 0);
}

#[test]
fn a_refused_key_says_what_to_check_and_is_not_retried() {
    let (store, b) = refusing(
        "Error performing list request: Error performing GET http://127.0.0.1:3900/backups?list-type=2 in 1ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>Forbidden: Invalid signature</Message></Error>",
    );
    let e = b.list("").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotPermitted, "{e}");
    assert!(
        e.to_string().contains(
            "access denied to bucket backups: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ),
        "{e}"
    );
    assert_eq!(store.calls.load(Ordering::SeqCst), 1, "retried: {e}");
}

#[test]
fn a_server_error_is_still_retried() {
    let (store, b) = refusing(
        "Error performing list request: Error performing GET http://127.0.0.1:3900/backups?list-type=2 in 1ms - Server returned non-2xx status code: 503 Service Unavailable: ",
    );
    assert!(b.list("").is_err());
    assert_eq!(store.calls.load(Ordering::SeqCst), ATTEMPTS as u64);
}

#[test]
fn without_credentials_the_error_says_to_set_them_not_that_the_metadata_service_refused() {
    // An instance metadata service that refuses, as off EC2.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let asked = Arc::new(AtomicU64::new(0));
    let n = asked.clone();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for c in l.incoming().flatten() {
            n.fetch_add(1, Ordering::SeqCst);
            let mut r = std::io::BufReader::new(c);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = r.get_mut().write_all(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    let (silent, _) = silent_store();
    let vars: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{silent}")),
        ("AWS_METADATA_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_REGION", "garage".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let b = S3Backend::open("s3://backups", &vars).unwrap();
    let e = b.list("").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::NotPermitted, "{e}");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "retried: {e}");
}

#[test]
fn two_writers_of_one_manifest_key_never_both_succeed() {
    let store = Arc::new(RacingHeads {
        inner: object_store::memory::InMemory::new(),
        barrier: tokio::sync::Barrier::new(2),
    });
    let b = Arc::new(S3Backend::with_store(store, "bucket", "site").unwrap());
    let writers: Vec<_> = [b"first".as_slice(), b"second".as_slice()]
        .into_iter()
        .map(|data| {
            let b = b.clone();
            std::thread::spawn(move || b.put_new("backups/vm/1.json", data).unwrap())
        })
        .collect();
    let won: Vec<bool> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(
        won.iter().filter(|&&w| w).count(),
        1,
        "both writers created the same manifest (one overwrote the other): {won:?}"
    );
}

#[test]
fn a_fetched_raw_chunk_is_verified_in_its_aligned_body_buffer_without_a_copy() {
    let b = S3Backend::with_store(
        Arc::new(object_store::memory::InMemory::new()),
        "bucket",
        "",
    )
    .unwrap();
    let data = crate::testutil::incompressible(1 << 20, 3);
    let d = crate::repo::chunk::Digest::of(&data);
    b.put(
        "chunks/c",
        &crate::repo::chunk::encode(&data, true).unwrap(),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt
        .block_on(b.get_async("chunks/c", 2 << 20))
        .unwrap()
        .unwrap();
    let body = got.as_ptr();
    assert!(
        matches!(got, ObjectBuf::Aligned(_)) && body as usize % crate::util::DIRECT_ALIGN == 0,
        "the body was not collected into an aligned buffer: {got:?}"
    );
    let plain = crate::repo::chunk::decode_owned(got, &d, data.len(), |p| {
        crate::repo::chunk::Digest::of(p)
    })
    .unwrap();
    // Staging can write it with direct I/O as it is.
    assert_eq!(plain.as_ptr(), body, "the plain bytes were copied");
    assert!(plain == data);
    assert_eq!(
        b.get("chunks/c", 2 << 20).unwrap().unwrap().len(),
        data.len() + 8
    );
}

#[test]
fn a_create_only_put_never_replaces_an_existing_manifest() {
    let b = S3Backend::with_store(
        Arc::new(object_store::memory::InMemory::new()),
        "bucket",
        "site",
    )
    .unwrap();
    assert!(
        b.create_only_is_atomic().unwrap(),
        "the in-memory store honours If-None-Match"
    );
    assert!(b.put_new("backups/vm/1.json", b"first").unwrap());
    assert!(!b.put_new("backups/vm/1.json", b"second").unwrap());
    assert!(!b.put_create("backups/vm/1.json", b"third").unwrap());
    assert_eq!(b.get("backups/vm/1.json", 100).unwrap().unwrap(), b"first");
}

/// An in-memory store whose GETs and listings take `delay` to answer.
#[derive(Debug)]
struct Slow {
    inner: object_store::memory::InMemory,
    delay: Duration,
}

impl std::fmt::Display for Slow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slow")
    }
}

#[async_trait]
impl ObjectStore for Slow {
    async fn put_opts(
        &self,
        p: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(p, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        p: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(p, opts).await
    }
    async fn get_opts(&self, p: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
        tokio::time::sleep(self.delay).await;
        self.inner.get_opts(p, o).await
    }
    async fn delete(&self, p: &ObjPath) -> object_store::Result<()> {
        self.inner.delete(p).await
    }
    fn list(&self, p: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> object_store::Result<ListResult> {
        tokio::time::sleep(self.delay).await;
        self.inner.list_with_delimiter(p).await
    }
    async fn copy(&self, a: &ObjPath, b: &ObjPath) -> object_store::Result<()> {
        self.inner.copy(a, b).await
    }
    async fn copy_if_not_exists(&self, a: &ObjPath, b: &ObjPath) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(a, b).await
    }
}

/// fixs3b: a store that answered and then stops answering failed a
/// fetch only after 6 attempts' timeouts (3 min with the default 30 s).
#[test]
fn a_fetch_from_a_store_that_stopped_answering_fails_at_its_deadline_naming_bucket_and_kind() {
    let (port, accepted) = silent_store();
    let mut b = backend_at(port);
    assert_eq!(b.deadline, REQUEST_DEADLINE, "without AWS_TIMEOUT");
    // object_store's own per-attempt timeout: the deadline is two of them.
    let mut vars = vec![("AWS_TIMEOUT".to_string(), "1s".to_string())];
    vars.push((
        "AWS_ENDPOINT_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    vars.push(("AWS_ACCESS_KEY_ID".into(), "GK0123".into()));
    vars.push(("AWS_SECRET_ACCESS_KEY".into(), "secret".into()));
    b = S3Backend::open("s3://bucket/site", &vars).unwrap();
    assert_eq!(b.deadline, Duration::from_secs(2));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t0 = std::time::Instant::now();
    let e = rt
        .block_on(b.get_async("chunks/ab12/ab12cd", 1 << 20))
        .unwrap_err();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
        "failed after {took:?}: {e}"
    );
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let text = e.to_string();
    assert!(
        text.contains(
            "S3 GET chunks/ab12/ab12cd (chunk) in bucket bucket: no answer in 2 s (2 attempts"
        ),
        "{e}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "{e}");
}

#[test]
fn a_request_ends_at_its_deadline_but_a_listing_that_answers_is_not_cut() {
    let store = Arc::new(Slow {
        inner: object_store::memory::InMemory::new(),
        delay: Duration::from_millis(700),
    });
    let mut b = S3Backend::with_store(store, "backups", "").unwrap();
    b.deadline = Duration::from_millis(300);
    b.put("pins/vm/p.json", b"{}").unwrap();
    let t0 = std::time::Instant::now();
    let e = b.get("pins/vm/p.json", 100).unwrap_err();
    assert!(t0.elapsed() < Duration::from_millis(600), "{e}");
    assert!(
        e.to_string()
            .contains("(pin) in bucket backups: no answer in 0.3 s (1 attempt)"),
        "{e}"
    );
    // A listing's pages each answer; a large bucket's may take longer.
    assert_eq!(b.list("pins/vm").unwrap(), vec!["p.json".to_string()]);
}

/// An in-memory store that answers every GET 503 while `down`.
#[derive(Debug)]
struct Flaky {
    inner: object_store::memory::InMemory,
    down: std::sync::atomic::AtomicBool,
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flaky")
    }
}

#[async_trait]
impl ObjectStore for Flaky {
    async fn put_opts(
        &self,
        p: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(p, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        p: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(p, opts).await
    }
    async fn get_opts(&self, p: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
        if self.down.load(Ordering::SeqCst) {
            return Err(object_store::Error::Generic {
                store: "S3",
                source: "Server returned non-2xx status code: 503 Service Unavailable: ".into(),
            });
        }
        self.inner.get_opts(p, o).await
    }
    async fn delete(&self, p: &ObjPath) -> object_store::Result<()> {
        self.inner.delete(p).await
    }
    fn list(&self, p: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy(&self, a: &ObjPath, b: &ObjPath) -> object_store::Result<()> {
        self.inner.copy(a, b).await
    }
    async fn copy_if_not_exists(&self, a: &ObjPath, b: &ObjPath) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(a, b).await
    }
}

/// fixs3b: 64 fetches in flight while the store is down printed a line
/// each when their retries began; now one line says how many retry, each
/// give-up is still said, and one line says when the store answers again.
#[test]
fn retry_warnings_of_64_requests_in_flight_are_one_line_and_one_when_the_store_answers_again() {
    let store = Arc::new(Flaky {
        inner: object_store::memory::InMemory::new(),
        down: true.into(),
    });
    let b = S3Backend::with_store(store.clone(), "backups", "").unwrap();
    b.put("chunks/ab/abcd", b"x").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gets: Vec<_> = (0..64)
        .map(|_| b.get_async("chunks/ab/abcd", 100))
        .collect();
    for r in rt.block_on(futures::future::join_all(gets)) {
        assert!(r.is_err());
    }
    let said = b.log.said.lock().clone();
    let not_answering: Vec<_> = said
        .iter()
        .filter(|l| l.starts_with("S3 store not answering"))
        .collect();
    assert_eq!(not_answering.len(), 1, "{said:#?}");
    assert!(
        not_answering[0].contains("503 Service Unavailable"),
        "{said:#?}"
    );
    let gave_up = said.iter().filter(|l| l.contains("giving up")).count();
    assert_eq!(gave_up, 64, "{said:#?}");
    assert_eq!(said.len(), 65, "{said:#?}");
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(b.get("chunks/ab/abcd", 100).unwrap().unwrap(), b"x");
    assert_eq!(b.get("chunks/ab/abcd", 100).unwrap().unwrap(), b"x");
    let said = b.log.said.lock().clone();
    assert_eq!(said.len(), 66, "{said:#?}");
    assert!(
        said[65].starts_with("S3 store answers again ("),
        "{said:#?}"
    );
    assert!(
        said[65].ends_with("; 0 requests still retrying)"),
        "{said:#?}"
    );
}

/// An error whose message hides its cause in a source, as the HTTP
/// client's "error sending request" does.
#[derive(Debug)]
struct Sending(std::io::Error);

impl std::fmt::Display for Sending {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("HTTP error: error sending request")
    }
}

impl std::error::Error for Sending {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[test]
fn a_request_that_could_not_be_sent_says_why_from_the_error_sources() {
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    let e = object_store::Error::Generic {
        store: "S3",
        source: Box::new(Sending(refused)),
    };
    let msg = super::map_err("GET repo.json", e).to_string();
    assert!(
        msg.contains("error sending request") && msg.contains("connection refused"),
        "{msg}"
    );
}
