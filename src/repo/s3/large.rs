//! Objects too large for one attempt: a manifest (one ~67-byte digest per
//! chunk, 270 MB for a 4 TiB disk in 1 MiB chunks) or a file catalog.
//!
//! object_store's per-attempt timeout (`AWS_TIMEOUT`, 30 s) covers the
//! whole body, so an object whose transfer takes longer could never be
//! read (a recovery failed) nor written (a backup failed at its very end,
//! after every chunk was uploaded): 270 MB in 30 s is 9 MB/s.
//!
//! **Reads** of an object larger than [`part_bytes`] are made in parts:
//! the plain GET every object gets first is dropped after its headers
//! (its size is refused there if above the caller's limit, before any
//! body is read) and the object is read as ranged GETs of one part each,
//! [`PARTS_IN_FLIGHT`] at a time, each part its own request with its own
//! attempts and deadline. Every part is pinned to the first answer's
//! ETag (`If-Match`, and the ETag and size of each part's answer checked
//! too, for a store that ignores the condition): an object replaced in
//! between is never stitched together from two versions. It is read
//! again once from the start; replaced again, the read fails saying so.
//!
//! **Writes** of a body larger than a part are one PUT as before, on a
//! second client without object_store's timeout; each attempt has its own
//! instead, [`put_timeout`]: the attempt timeout plus the body's time at
//! [`SLOWEST_LINK`], and the request's deadline is scaled the same way.
//! Not a multipart upload: object_store's multipart uploads have no
//! create-only mode, and a manifest is written create-only (`put_new`:
//! an existing object is never replaced by a store that honours
//! `If-None-Match`); a multipart upload completed after a HEAD found no
//! object would leave a window in which two writers both complete. One
//! PUT keeps that guarantee exactly; what it costs is that an attempt cut
//! by a failing link sends the whole body again (backups end with one such
//! object per disk set, not per chunk).

use std::ops::Range;
use std::time::Duration;

use object_store::path::Path as ObjPath;
use object_store::GetOptions;

use super::{collect_aligned, Req};
use crate::error::{Error, ErrorKind, Result};
use crate::util::AlignedBuf;

/// The slowest link an object of any size still crosses: each read part,
/// and each PUT's timeout, is sized so a transfer at this rate fits one
/// attempt. 512 KiB/s (4 Mbit/s); with the default 30 s attempt timeout a
/// part is 7.5 MiB, so chunks (at most 8 MiB before compression; 4 MiB
/// and smaller ones always) are still read in one GET on the default
/// settings.
pub const SLOWEST_LINK: u64 = 512 << 10;

/// Parts of one object read at once: two hide a round trip between parts
/// on a high-latency link; more would only share the same bandwidth.
pub const PARTS_IN_FLIGHT: usize = 2;

/// Part sizes stay in this range (a tiny `AWS_TIMEOUT` must not mean
/// thousands of requests; a long one must not mean one huge part).
const PART_MIN: u64 = 64 << 10;
const PART_MAX: u64 = 16 << 20;

/// object_store's timeout on the client for large PUTs: none in effect
/// (each attempt is cut by [`timed`] instead).
pub const NO_TIMEOUT: &str = "24h";

/// The part size for a per-attempt timeout of `attempt`: what
/// [`PARTS_IN_FLIGHT`] parts sharing a link at [`SLOWEST_LINK`] each
/// transfer in one attempt. An object larger than this is read in parts.
pub fn part_bytes(attempt: Duration) -> u64 {
    let bytes = attempt.as_secs_f64() * SLOWEST_LINK as f64 / PARTS_IN_FLIGHT as f64;
    (bytes as u64).clamp(PART_MIN, PART_MAX)
}

/// The timeout of one attempt of a PUT of `len` bytes: the attempt
/// timeout (the exchange's own waits) plus the body at [`SLOWEST_LINK`].
pub fn put_timeout(attempt: Duration, len: u64) -> Duration {
    attempt + Duration::from_secs_f64(len as f64 / SLOWEST_LINK as f64)
}

/// `fut` cut after `timeout` (if given) with an error retried like
/// object_store's own timeout.
pub async fn timed<T>(
    timeout: Option<Duration>,
    fut: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    let Some(t) = timeout else {
        return fut.await;
    };
    match tokio::time::timeout(t, fut).await {
        Ok(r) => r,
        Err(_) => Err(object_store::Error::Generic {
            store: "S3",
            source: format!(
                "timed out: no complete answer in {} s (this attempt's time for its body)",
                t.as_secs_f64()
            )
            .into(),
        }),
    }
}

/// The first GET's answer.
enum First {
    /// The object, small enough for one attempt.
    Whole(AlignedBuf),
    /// Its size, above the caller's limit (no body read).
    TooLarge(u64),
    /// Larger than a part: read in parts pinned to this version.
    Parts { size: u64, etag: String },
}

/// A GET of `key` (at `p`): the object, or its size if above `limit`.
/// `wait`: the identity probe's limit on the first answer.
pub(super) async fn get(
    req: Req,
    p: ObjPath,
    key: &str,
    limit: u64,
    part: u64,
    wait: Option<Duration>,
) -> Result<std::result::Result<AlignedBuf, u64>> {
    for round in 0..2 {
        let first = {
            let p = p.clone();
            req.clone().retrying(&format!("GET {key}"), wait, move |s| {
                let p = p.clone();
                async move {
                    let r = s.get(&p).await?;
                    // The length is known from the headers: refuse before the body.
                    if r.meta.size > limit {
                        return Ok(First::TooLarge(r.meta.size));
                    }
                    if r.meta.size > part {
                        // Without an ETag there is no version to pin to.
                        if let Some(etag) = r.meta.e_tag.clone() {
                            return Ok(First::Parts {
                                size: r.meta.size,
                                etag,
                            });
                        }
                    }
                    collect_aligned(r).await.map(First::Whole)
                }
            })
        };
        let (size, etag) = match first.await? {
            First::Whole(b) => return Ok(Ok(b)),
            First::TooLarge(n) => return Ok(Err(n)),
            First::Parts { size, etag } => (size, etag),
        };
        match parts(&req, &p, key, size, &etag, part).await? {
            Some(b) => return Ok(Ok(b)),
            None if round == 0 => tracing::info!(
                bucket = %req.bucket,
                "S3 GET {key}: the object was replaced while it was read in parts; reading it again"
            ),
            None => break,
        }
    }
    Err(Error::new(
        ErrorKind::Io,
        format!("S3 GET {key} in bucket {}: the object was replaced while it was read in parts, twice (it is being rewritten; try again)", req.bucket),
    ))
}

/// `key`'s `size` bytes as parts of `part` bytes of version `etag`;
/// `None` if the object was replaced (or removed) in between.
async fn parts(
    req: &Req,
    p: &ObjPath,
    key: &str,
    size: u64,
    etag: &str,
    part: u64,
) -> Result<Option<AlignedBuf>> {
    use futures::StreamExt;
    let n = size.div_ceil(part);
    let requests = (0..n).map(|i| {
        let range = i * part..((i + 1) * part).min(size);
        let (p, etag) = (p.clone(), etag.to_string());
        let what = format!("GET (part {} of {n}) {key}", i + 1);
        req.clone().retrying(&what, None, move |s| {
            let (p, range, etag) = (p.clone(), range.clone(), etag.clone());
            async move { get_part(s, &p, range, &etag, size).await }
        })
    });
    let mut got = futures::stream::iter(requests).buffered(PARTS_IN_FLIGHT);
    let mut buf = AlignedBuf::with_capacity(size as usize);
    while let Some(b) = got.next().await {
        let Some(b) = b? else {
            return Ok(None);
        };
        if !buf.extend_from_slice(&b) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("S3 GET {key}: its parts are longer than its {size} bytes"),
            ));
        }
    }
    Ok(Some(buf))
}

/// One part; `None` if the object is no longer version `etag`.
async fn get_part(
    s: std::sync::Arc<dyn object_store::ObjectStore>,
    p: &ObjPath,
    range: Range<u64>,
    etag: &str,
    size: u64,
) -> object_store::Result<Option<AlignedBuf>> {
    let opts = GetOptions {
        range: Some(range.clone().into()),
        if_match: Some(etag.to_string()),
        ..Default::default()
    };
    let r = match s.get_opts(p, opts).await {
        Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => {
            return Ok(None)
        }
        r => r?,
    };
    // A store that ignores If-Match: its answer still says which version.
    if r.meta.e_tag.as_deref() != Some(etag) || r.meta.size != size {
        return Ok(None);
    }
    if r.range != range {
        return Err(object_store::Error::Generic {
            store: "S3",
            source: format!("asked for bytes {range:?} of {p}, answered {:?}", r.range).into(),
        });
    }
    collect_aligned(r).await.map(Some)
}
