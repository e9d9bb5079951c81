//! Objects larger than one attempt can carry (see `large`): read in
//! parts pinned to one version, written with a timeout scaled to them.

use std::time::{Duration, Instant};

use super::*;
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    PutMultipartOptions, PutResult,
};
use parking_lot::Mutex;

/// An in-memory store behind a link of `rate` bytes/s for each transfer,
/// that records its GETs and can replace an object while it is read.
#[derive(Debug)]
struct Link {
    inner: object_store::memory::InMemory,
    rate: u64,
    /// Each GET's range (`None`: the whole object).
    gets: Mutex<Vec<Option<std::ops::Range<u64>>>>,
    /// The object is replaced after each of this many ranged GETs of its
    /// second part.
    replace_second_part: Mutex<u32>,
    /// Drop `If-Match` (a store that ignores it).
    ignore_if_match: bool,
}

impl Link {
    fn new(rate: u64) -> Link {
        Link {
            inner: object_store::memory::InMemory::new(),
            rate,
            gets: Mutex::default(),
            replace_second_part: Mutex::default(),
            ignore_if_match: false,
        }
    }

    fn ranged_gets(&self) -> usize {
        self.gets.lock().iter().filter(|r| r.is_some()).count()
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link")
    }
}

fn pace(rate: u64, n: usize) -> Duration {
    Duration::from_secs_f64(n as f64 / rate as f64)
}

#[async_trait]
impl ObjectStore for Link {
    async fn put_opts(
        &self,
        p: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        tokio::time::sleep(pace(self.rate, payload.content_length())).await;
        self.inner.put_opts(p, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        p: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(p, opts).await
    }
    async fn get_opts(&self, p: &ObjPath, mut o: GetOptions) -> object_store::Result<GetResult> {
        let range = o.range.as_ref().map(|r| match r {
            object_store::GetRange::Bounded(r) => r.clone(),
            _ => unreachable!("parts are bounded ranges"),
        });
        self.gets.lock().push(range.clone());
        if self.ignore_if_match {
            o.if_match = None;
        }
        let r = self.inner.get_opts(p, o).await?;
        let second = range.as_ref().is_some_and(|r| r.start == 256 << 10);
        if second && *self.replace_second_part.lock() > 0 {
            *self.replace_second_part.lock() -= 1;
            let old = self.inner.get(p).await?.bytes().await?;
            let new: Vec<u8> = old.iter().map(|b| b ^ 0xff).collect();
            self.inner.put(p, new.into()).await?;
        }
        let GetResultPayload::Stream(body) = r.payload else {
            unreachable!("in memory")
        };
        // The body in 64 KiB frames at the link's rate.
        let rate = self.rate;
        let frames = body
            .flat_map(|f| {
                let frames: Vec<_> = match f {
                    Ok(b) => (0..b.len())
                        .step_by(64 << 10)
                        .map(|i| Ok(b.slice(i..(i + (64 << 10)).min(b.len()))))
                        .collect(),
                    Err(e) => vec![Err(e)],
                };
                futures::stream::iter(frames)
            })
            .then(move |f| async move {
                if let Ok(b) = &f {
                    tokio::time::sleep(pace(rate, b.len())).await;
                }
                f
            });
        Ok(GetResult {
            payload: GetResultPayload::Stream(frames.boxed()),
            ..r
        })
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

/// A backend on `store` as `AWS_TIMEOUT=1s` makes it: 2 s deadline,
/// 256 KiB parts.
fn backend(store: Arc<Link>) -> S3Backend {
    let mut b = S3Backend::with_store(store, "backups", "").unwrap();
    b.attempt_timeout = Duration::from_secs(1);
    b.deadline = retry::deadline_for(b.attempt_timeout);
    b
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 16) as u8)
        .collect()
}

const KEY: &str = "backups/vm/1.json";

/// A 3 MB manifest over a 1 MB/s link with 1 s attempts: one GET took 3 s,
/// past the request's 2 s deadline, and failed on every try; in parts of
/// 256 KiB, each its own request, it is read in about 1.5 s (two parts in
/// flight, each at the link's rate).
#[test]
fn an_object_too_large_for_one_attempt_is_read_in_parts_and_refused_over_the_limit_before_them() {
    assert_eq!(large::part_bytes(Duration::from_secs(1)), 256 << 10);
    assert_eq!(large::part_bytes(retry::ATTEMPT_TIMEOUT), 7680 << 10);
    let store = Arc::new(Link::new(1_000_000));
    let b = backend(store.clone());
    let data = pattern(3_000_000, 1);
    store
        .inner
        .put_opts(&ObjPath::from(KEY), data.clone().into(), Default::default())
        .now_or_never_ok();
    let t = Instant::now();
    let got = b.get(KEY, 1 << 30).unwrap().unwrap();
    let took = t.elapsed();
    assert!(got == data);
    assert!(took < Duration::from_secs(3), "{took:?}");
    let gets = store.gets.lock().clone();
    assert_eq!(gets.len(), 1 + 12, "{gets:?}");
    assert_eq!(gets[0], None);
    assert_eq!(gets[1], Some(0..256 << 10));
    assert_eq!(gets[12], Some(11 * (256 << 10)..3_000_000));
    assert_eq!(b.retries(), 0);

    // Over the caller's limit: refused from the first answer's headers.
    store.gets.lock().clear();
    let Err(e) = b.get(KEY, 1_000_000) else {
        panic!("a read over the limit");
    };
    assert!(e.to_string().contains("3000000"), "{e}");
    assert_eq!(store.gets.lock().len(), 1);
    // Small objects (chunks) are still one plain GET.
    b.put("chunks/ab/abcd", &pattern(200_000, 2)).unwrap();
    store.gets.lock().clear();
    assert!(b.get("chunks/ab/abcd", 1 << 20).unwrap().unwrap() == pattern(200_000, 2));
    assert_eq!(*store.gets.lock(), vec![None]);
}

/// An object replaced between two parts is never stitched from two
/// versions: it is read again from its start (the new version, whole);
/// replaced again, the read fails saying so. A store that ignores
/// `If-Match` is caught by the ETag of its answers.
#[test]
fn an_object_replaced_while_read_in_parts_is_read_again_whole_or_refused() {
    for ignore_if_match in [false, true] {
        let mut link = Link::new(50_000_000);
        link.ignore_if_match = ignore_if_match;
        let store = Arc::new(link);
        let b = backend(store.clone());
        let data = pattern(1_500_000, 3);
        b.put(KEY, &data).unwrap();
        *store.replace_second_part.lock() = 1;
        let got = b.get(KEY, 1 << 30).unwrap().unwrap();
        let flipped: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
        assert!(got == flipped, "ignore_if_match {ignore_if_match}");
        assert!(store.ranged_gets() > 6, "read again from the start");

        *store.replace_second_part.lock() = 2;
        let Err(e) = b.get(KEY, 1 << 30) else {
            panic!("a read of an object replaced twice while read");
        };
        assert!(
            e.to_string()
                .contains("was replaced while it was read in parts, twice"),
            "{e}"
        );
    }
}

/// A 3 MB PUT over a 1 MB/s link with 1 s attempts took 3 s, past its
/// 2 s deadline: a backup failed at its end, after all its chunks. Each
/// attempt now has 1 s + 3 MB at 512 KiB/s; create-only still refuses to
/// replace.
#[test]
fn a_put_too_large_for_one_attempt_gets_a_timeout_scaled_to_its_body() {
    let store = Arc::new(Link::new(1_000_000));
    let b = backend(store.clone());
    let data = pattern(3_000_000, 4);
    assert!(b.put_new(KEY, &data).unwrap());
    assert!(!b.put_new(KEY, &pattern(3_000_000, 5)).unwrap());
    b.put("files/vm/1.cat", &data).unwrap();
    assert_eq!(b.retries(), 0);
    assert!(b.get(KEY, 1 << 30).unwrap().unwrap() == data);
    let t = large::put_timeout(Duration::from_secs(1), 3 << 20);
    assert_eq!(t, Duration::from_secs(7));
    // The attempt is still cut at its scaled timeout.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cut = rt.block_on(large::timed(
        Some(Duration::from_millis(50)),
        std::future::pending::<object_store::Result<()>>(),
    ));
    let e = cut.unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    assert_eq!(b.hints.failure(&e), Failure::Transient);
}

trait NowOk {
    fn now_or_never_ok(self);
}

impl<F: std::future::Future<Output = object_store::Result<PutResult>>> NowOk for F {
    fn now_or_never_ok(self) {
        futures::FutureExt::now_or_never(self).unwrap().unwrap();
    }
}
