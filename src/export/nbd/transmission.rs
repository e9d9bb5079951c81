//! The transmission phase: one reader loop per connection reads requests
//! and spawns a task per request; each task runs its disk call on the
//! blocking pool and writes its whole reply under the connection's writer
//! lock, so replies go out in completion order and never interleave. A
//! read of one data run within one block that must wait for a repository
//! fetch holds no blocking thread: the disk answers it when the fetch ends
//! (`Disk::read_later`), and the task awaits that answer.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex as SyncMutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{watch, Mutex, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::handshake::Negotiated;
use super::proto::*;
use super::stopped;
use bytes::Bytes;

use crate::disk::{Disk, Extent, ExtentFlags, ReadDone, Spawner};
use crate::error::Error;

/// Requests one connection may have in flight; the reader waits above it.
const MAX_INFLIGHT: usize = 128;
/// READ/WRITE payload bytes one connection may hold in memory at once.
const MAX_INFLIGHT_BYTES: usize = 256 << 20;
/// Once a connection ends, how long a reply may take to be written before
/// it is dropped (a client that stopped reading must not hold up a
/// shutdown).
const WRITE_GRACE: Duration = Duration::from_secs(10);
/// Longest range the disk is asked about at once (a block status request
/// takes several while they add up to fewer than `MAX_EXTENTS` extents):
/// the work and the reply stay bounded; clients ask again from where the
/// reply stopped.
pub(super) const MAX_STATUS_QUERY: u64 = 1 << 30;
/// Most descriptors in one block status chunk.
pub(super) const MAX_EXTENTS: usize = 1 << 16;
/// Zero ranges shorter than this are sent as data: a hole chunk per few
/// bytes would cost more than the bytes.
const MIN_HOLE: u64 = 4096;
/// Piece size of NBD_CMD_FLAG_NO_HOLE zero writes.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
/// Reply bodies up to this size are copied next to their header so that a
/// reply leaves in one write.
const COALESCE: usize = 128 << 10;

/// An error to send: NBD errno and a message for the human.
#[derive(Debug)]
struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Self {
        Failure {
            errno,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(nbd_errno(&e), e.to_string())
    }
}

/// Part of a read's answer.
#[derive(Debug)]
enum Content {
    /// The disk's bytes as they came (a fetched chunk's slice for a read
    /// answered later): written to the socket without another copy.
    Data {
        offset: u64,
        bytes: Bytes,
    },
    Hole {
        offset: u64,
        len: u32,
    },
}

/// A request's outcome, before encoding for the negotiated reply style.
#[derive(Debug)]
enum Reply {
    Done,
    /// Content in offset order; an error stops the read at its offset.
    Read {
        content: Vec<Content>,
        error: Option<(u64, Failure)>,
    },
    /// (context id, descriptors (length, flags)) per selected context.
    Status(Vec<(u32, Vec<(u32, u32)>)>),
    Failed(Failure),
}

/// The export as one connection sees it: everything a request needs to
/// run, none of the socket.
struct Target {
    disk: Arc<dyn Disk>,
    /// The size advertised at negotiation.
    size: u64,
    structured: bool,
    contexts: Contexts,
}

/// A connection's shared half: the target and the reply side of the socket.
struct Conn<W> {
    target: Arc<Target>,
    writer: Mutex<W>,
    /// Set when the reader loop has ended: replies from then on get
    /// `WRITE_GRACE` to be written.
    ending: watch::Receiver<bool>,
    /// Why a reply could not be written; the reader loop stops on it.
    broken: SyncMutex<Option<String>>,
    broken_signal: Notify,
}

/// A request read off the wire, with its payload and its share of the
/// connection's in-flight budget.
struct Work {
    req: Request,
    payload: Vec<u8>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// The in-flight budget of one connection.
struct Limits {
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Limits {
    fn new() -> Self {
        Limits {
            count: Arc::new(Semaphore::new(MAX_INFLIGHT)),
            bytes: Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES)),
        }
    }

    async fn acquire(&self, bytes: u32) -> (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>) {
        // The semaphores are never closed.
        let count = self.count.clone().acquire_owned().await.expect("open");
        let bytes = match bytes {
            0 => None,
            n => Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .expect("open"),
            ),
        };
        (count, bytes)
    }
}

/// Serves requests until the client leaves, breaks the protocol, or the
/// server stops; then waits for every request in flight to answer, closes
/// the socket, and only then drops the export's guard.
pub async fn serve<S>(stream: S, n: Negotiated, mut stop: watch::Receiver<bool>) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Negotiated {
        disk,
        guard,
        size,
        structured,
        contexts,
        ..
    } = n;
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let (ending_tx, ending) = watch::channel(false);
    let conn = Arc::new(Conn {
        target: Arc::new(Target {
            disk,
            size,
            structured,
            contexts,
        }),
        writer: Mutex::new(wr),
        ending,
        broken: SyncMutex::new(None),
        broken_signal: Notify::new(),
    });
    let limits = Limits::new();
    let mut inflight = JoinSet::new();
    let end = loop {
        while inflight.try_join_next().is_some() {}
        let next = tokio::select! {
            r = next_request(&mut rd, &limits) => r,
            _ = stopped(&mut stop) => Err(End::Shutdown),
            _ = conn.broken_signal.notified() => {
                Err(End::WriteFailed(conn.broken.lock().clone().unwrap_or_default()))
            }
        };
        match next {
            Ok(Some(work)) => {
                inflight.spawn(conn.clone().answer(work));
            }
            Ok(None) => break End::Disc,
            Err(e) => break e,
        }
    };
    let _ = ending_tx.send(true);
    while inflight.join_next().await.is_some() {}
    conn.close().await;
    drop((rd, conn));
    drop(guard);
    end
}

/// Reads the next request and its payload; `None` for NBD_CMD_DISC.
async fn next_request<R>(rd: &mut R, limits: &Limits) -> Result<Option<Work>, End>
where
    R: AsyncRead + Unpin,
{
    let mut head = [0u8; REQUEST_LEN];
    rd.read_exact(&mut head).await?;
    let req = Request::parse(&head).map_err(violation)?;
    if req.typ == CMD_DISC {
        return Ok(None);
    }
    let carries_payload = matches!(req.typ, CMD_READ | CMD_WRITE);
    if carries_payload && req.len > MAX_PAYLOAD {
        return Err(violation(format!(
            "{} of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum payload",
            command_name(req.typ),
            req.len
        )));
    }
    let permits = limits
        .acquire(if carries_payload { req.len } else { 0 })
        .await;
    let mut payload = vec![];
    if req.typ == CMD_WRITE {
        payload = vec![0; req.len as usize];
        rd.read_exact(&mut payload).await?;
    }
    Ok(Some(Work {
        req,
        payload,
        _permits: permits,
    }))
}

/// Logs a protocol violation once, where it is found.
fn violation(what: String) -> End {
    tracing::warn!("NBD client violated the protocol, closing: {what}");
    End::Violation(what)
}

impl<W> Conn<W>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Runs one request and sends its reply. The disk call runs on the
    /// blocking pool: it may wait on a repository fetch.
    async fn answer(self: Arc<Self>, work: Work) {
        let Work {
            req,
            payload,
            _permits: permits,
        } = work;
        let target = self.target.clone();
        let reply = match target.read_later(&req) {
            Some(answer) => answer.await.unwrap_or_else(|_| {
                Reply::Failed(Failure::new(NBD_EIO, "the read was dropped unanswered"))
            }),
            None => tokio::task::spawn_blocking(move || target.execute(&req, payload))
                .await
                .unwrap_or_else(|e| {
                    Reply::Failed(Failure::new(NBD_EIO, format!("request failed: {e}")))
                }),
        };
        self.send(encode(req.cookie, reply, self.target.structured))
            .await;
        // The budget is back once the reply has left.
        drop(permits);
    }

    /// Writes one reply's frames under the writer lock. A failed write
    /// stops the reader loop; after the connection started ending, a
    /// write that cannot finish within `WRITE_GRACE` is dropped.
    async fn send(&self, frames: Vec<Frame>) {
        let write = async {
            let mut w = self.writer.lock().await;
            write_frames(&mut *w, frames).await
        };
        let mut ending = self.ending.clone();
        let give_up = async move {
            let _ = ending.wait_for(|e| *e).await;
            tokio::time::sleep(WRITE_GRACE).await;
        };
        let failed = tokio::select! {
            r = write => r.err().map(|e| e.to_string()),
            _ = give_up => Some("the client stopped reading replies".to_string()),
        };
        if let Some(why) = failed {
            self.broken.lock().get_or_insert(why);
            self.broken_signal.notify_one();
        }
    }

    /// Ends the reply side of the socket.
    async fn close(&self) {
        let _ = tokio::time::timeout(WRITE_GRACE, async {
            let _ = self.writer.lock().await.shutdown().await;
        })
        .await;
    }
}

/// One reply message: a header (with any fixed fields) and a body that is
/// moved, not copied, when large.
struct Frame {
    head: Vec<u8>,
    body: Bytes,
}

async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, frames: Vec<Frame>) -> io::Result<()> {
    let mut buf = Vec::new();
    for f in frames {
        buf.extend_from_slice(&f.head);
        if f.body.len() <= COALESCE {
            buf.extend_from_slice(&f.body);
        } else {
            w.write_all(&buf).await?;
            buf.clear();
            w.write_all(&f.body).await?;
        }
    }
    w.write_all(&buf).await?;
    w.flush().await
}

fn encode(cookie: u64, reply: Reply, structured: bool) -> Vec<Frame> {
    if structured {
        encode_structured(cookie, reply)
    } else {
        vec![encode_simple(cookie, reply)]
    }
}

fn encode_simple(cookie: u64, reply: Reply) -> Frame {
    let (errno, body) = match reply {
        Reply::Done => (0, Bytes::new()),
        Reply::Read {
            content,
            error: None,
        } => (0, flatten(content)),
        Reply::Read {
            error: Some((_, f)),
            ..
        }
        | Reply::Failed(f) => (f.errno, Bytes::new()),
        // Block status needs structured replies; `execute` refuses it.
        Reply::Status(_) => (NBD_EINVAL, Bytes::new()),
    };
    Frame {
        head: simple_reply(cookie, errno),
        body,
    }
}

/// A read's content as plain bytes, for a simple reply: a single run of
/// data as it is, anything else assembled.
fn flatten(mut content: Vec<Content>) -> Bytes {
    if let [Content::Data { .. }] = content[..] {
        if let Some(Content::Data { bytes, .. }) = content.pop() {
            return bytes;
        }
    }
    let mut out = vec![];
    for c in content {
        match c {
            Content::Data { bytes, .. } => out.extend_from_slice(&bytes),
            Content::Hole { len, .. } => out.resize(out.len() + len as usize, 0),
        }
    }
    Bytes::from(out)
}

fn encode_structured(cookie: u64, reply: Reply) -> Vec<Frame> {
    // (chunk type, fixed payload fields, body)
    let mut chunks: Vec<(u16, Vec<u8>, Bytes)> = vec![];
    match reply {
        // A simple reply is allowed for anything but a read and has no
        // payload to parse.
        Reply::Done => {
            return vec![Frame {
                head: simple_reply(cookie, 0),
                body: Bytes::new(),
            }]
        }
        Reply::Read { content, error } => {
            for c in content {
                chunks.push(match c {
                    Content::Data { offset, bytes } => {
                        (REPLY_TYPE_OFFSET_DATA, offset.to_be_bytes().to_vec(), bytes)
                    }
                    Content::Hole { offset, len } => {
                        let mut p = offset.to_be_bytes().to_vec();
                        p.extend_from_slice(&len.to_be_bytes());
                        (REPLY_TYPE_OFFSET_HOLE, p, Bytes::new())
                    }
                });
            }
            if let Some((offset, f)) = error {
                let mut p = error_payload(f.errno, &f.message);
                p.extend_from_slice(&offset.to_be_bytes());
                chunks.push((REPLY_TYPE_ERROR_OFFSET, p, Bytes::new()));
            }
        }
        Reply::Status(contexts) => {
            for (id, descriptors) in contexts {
                let mut p = Vec::with_capacity(4 + 8 * descriptors.len());
                p.extend_from_slice(&id.to_be_bytes());
                for (len, flags) in descriptors {
                    p.extend_from_slice(&len.to_be_bytes());
                    p.extend_from_slice(&flags.to_be_bytes());
                }
                chunks.push((REPLY_TYPE_BLOCK_STATUS, p, Bytes::new()));
            }
        }
        Reply::Failed(f) => chunks.push((
            REPLY_TYPE_ERROR,
            error_payload(f.errno, &f.message),
            Bytes::new(),
        )),
    }
    if chunks.is_empty() {
        chunks.push((REPLY_TYPE_NONE, vec![], Bytes::new()));
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, (typ, fixed, body))| {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let len = (fixed.len() + body.len()) as u32;
            let mut head = chunk_header(cookie, flags, typ, len);
            head.extend_from_slice(&fixed);
            Frame { head, body }
        })
        .collect()
}

/// A run of a read: zeros (sent as a hole) or data.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    offset: u64,
    len: u64,
    zero: bool,
}

impl Target {
    /// Runs one request against the disk (blocking).
    fn execute(&self, req: &Request, payload: Vec<u8>) -> Reply {
        if let Err(f) = self.check_flags(req) {
            return Reply::Failed(f);
        }
        let done = match req.typ {
            CMD_READ => return self.read(req),
            CMD_BLOCK_STATUS => return self.block_status(req),
            CMD_WRITE => self.write(req, &payload),
            CMD_FLUSH => self.disk.flush().map_err(Failure::from),
            CMD_TRIM => self.trim(req),
            CMD_WRITE_ZEROES => self.write_zeroes(req),
            t => Err(Failure::new(
                NBD_EINVAL,
                format!("{} is not supported", command_name(t)),
            )),
        };
        match done {
            Ok(()) => Reply::Done,
            Err(f) => Reply::Failed(f),
        }
    }

    /// FUA is accepted on every command (the spec asks it); other flags
    /// only where they are defined and advertised.
    fn check_flags(&self, req: &Request) -> Result<(), Failure> {
        let allowed = CMD_FLAG_FUA
            | match req.typ {
                CMD_READ if self.structured => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        match req.flags & !allowed {
            0 => Ok(()),
            bad => Err(Failure::new(
                NBD_EINVAL,
                format!(
                    "command flags {bad:#x} are not valid for {}",
                    command_name(req.typ)
                ),
            )),
        }
    }

    /// Refuses a range past the end of the export before the disk sees it.
    fn check_range(&self, req: &Request, errno: u32, what: &str) -> Result<(), Failure> {
        let (off, len) = (req.offset, req.len as u64);
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Failure::new(
                errno,
                format!(
                    "{what} of {len} bytes at offset {off} is past the end of the export ({} bytes)",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Flushes after a command with NBD_CMD_FLAG_FUA: the reply then means
    /// durable.
    fn fua(&self, req: &Request) -> Result<(), Failure> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.disk.flush()?;
        }
        Ok(())
    }

    fn write(&self, req: &Request, data: &[u8]) -> Result<(), Failure> {
        self.check_range(req, NBD_ENOSPC, "write")?;
        if !data.is_empty() {
            self.disk.write_at(req.offset, data)?;
        }
        self.fua(req)
    }

    fn write_zeroes(&self, req: &Request) -> Result<(), Failure> {
        self.check_range(req, NBD_ENOSPC, "write zeroes")?;
        let (off, len) = (req.offset, req.len as u64);
        if len > 0 {
            if req.flags & CMD_FLAG_NO_HOLE != 0 {
                self.write_zero_bytes(off, len)?;
            } else {
                self.disk.write_zeroes(off, len)?;
            }
        }
        self.fua(req)
    }

    /// Zeros written as data, so the range is allocated (NO_HOLE).
    fn write_zero_bytes(&self, off: u64, len: u64) -> Result<(), Failure> {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK as u64) as usize;
            self.disk.write_at(pos, &ZEROES[..n])?;
            pos += n as u64;
        }
        Ok(())
    }

    fn trim(&self, req: &Request) -> Result<(), Failure> {
        self.check_range(req, NBD_EINVAL, "trim")?;
        if req.len > 0 {
            self.disk.discard(req.offset, req.len as u64)?;
        }
        self.fua(req)
    }

    /// A read of one data run within one block, handed to the disk to
    /// answer when its fetch ends (`Disk::read_later`); `None` when it
    /// takes the blocking path (a write, a hit, a hole, several runs).
    fn read_later(&self, req: &Request) -> Option<tokio::sync::oneshot::Receiver<Reply>> {
        // Refusals (flags, range) are `execute`'s to answer.
        if req.typ != CMD_READ
            || req.len == 0
            || self.check_flags(req).is_err()
            || self.check_range(req, NBD_EINVAL, "read").is_err()
        {
            return None;
        }
        let (off, len) = (req.offset, req.len as u64);
        let bs = self.disk.block_size();
        if off / bs != (off + len - 1) / bs {
            return None;
        }
        // No block status here: a hit is given back by the disk, which then
        // takes `read`'s path (and its own runs), so asking for runs first
        // would do that work twice on every hit; and bytes the disk answers
        // later are always a valid reply as one data chunk.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done: ReadDone = Box::new(move |r| {
            let reply = match r {
                Ok(bytes) if bytes.len() as u64 == len => Reply::Read {
                    content: vec![Content::Data { offset: off, bytes }],
                    error: None,
                },
                Ok(bytes) => Reply::Read {
                    content: vec![],
                    error: Some((
                        off,
                        Failure::new(
                            NBD_EIO,
                            format!("short read at offset {off}: {} of {len} bytes", bytes.len()),
                        ),
                    )),
                },
                Err(e) => Reply::Read {
                    content: vec![],
                    error: Some((off, e.into())),
                },
            };
            let _ = tx.send(reply);
        });
        let handle = tokio::runtime::Handle::current();
        let spawn: Spawner = Arc::new(move |job| drop(handle.spawn_blocking(job)));
        self.disk
            .read_later(off, len as usize, done, &spawn)
            .ok()
            .map(|()| rx)
    }

    fn read(&self, req: &Request) -> Reply {
        if let Err(f) = self.check_range(req, NBD_EINVAL, "read") {
            return Reply::Failed(f);
        }
        let (off, len) = (req.offset, req.len as u64);
        let mut content = vec![];
        if len == 0 {
            return Reply::Read {
                content,
                error: None,
            };
        }
        let segments = if self.structured && req.flags & CMD_FLAG_DF == 0 {
            self.segments(off, len)
        } else {
            // Simple replies and don't-fragment: one run of data.
            vec![Segment {
                offset: off,
                len,
                zero: false,
            }]
        };
        for s in segments {
            if s.zero {
                content.push(Content::Hole {
                    offset: s.offset,
                    len: s.len as u32,
                });
                continue;
            }
            match self.read_exact(s.offset, s.len as usize) {
                Ok(bytes) => content.push(Content::Data {
                    offset: s.offset,
                    bytes: Bytes::from(bytes),
                }),
                Err(f) => {
                    return Reply::Read {
                        content,
                        error: Some((s.offset, f)),
                    }
                }
            }
        }
        Reply::Read {
            content,
            error: None,
        }
    }

    fn read_exact(&self, off: u64, len: usize) -> Result<Vec<u8>, Failure> {
        let bytes = self.disk.read_at(off, len)?;
        if bytes.len() != len {
            return Err(Failure::new(
                NBD_EIO,
                format!("short read at offset {off}: {} of {len} bytes", bytes.len()),
            ));
        }
        Ok(bytes)
    }

    /// Splits `[off, off + len)` into zero and data runs by the disk's
    /// block status. Block status is only an optimisation here: if it
    /// fails, everything is data.
    fn segments(&self, off: u64, len: u64) -> Vec<Segment> {
        let extents = self.disk.block_status(off, len).unwrap_or_default();
        let end = off + len;
        let mut out: Vec<Segment> = vec![];
        let mut pos = off;
        for e in extents {
            if pos >= end {
                break;
            }
            let n = e.len.min(end - pos);
            if n > 0 {
                push_segment(&mut out, pos, n, e.flags.zero && n >= MIN_HOLE);
                pos += n;
            }
        }
        if pos < end {
            push_segment(&mut out, pos, end - pos, false);
        }
        out
    }

    fn block_status(&self, req: &Request) -> Reply {
        if !self.structured || !self.contexts.any() {
            return Reply::Failed(Failure::new(
                NBD_EINVAL,
                "block status needs a metadata context selected with NBD_OPT_SET_META_CONTEXT",
            ));
        }
        if let Err(f) = self.check_range(req, NBD_EINVAL, "block status") {
            return Reply::Failed(f);
        }
        if req.len == 0 {
            return Reply::Failed(Failure::new(NBD_EINVAL, "block status of 0 bytes"));
        }
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        // The disk is asked a bounded piece at a time, and no more pieces
        // once a reply's worth of extents is in: a sparse disk answers a
        // whole request (4 GiB) in one reply, a fragmented one stops early.
        let (mut extents, mut query) = (vec![], 0);
        while query < req.len as u64 && extents.len() < MAX_EXTENTS && !(req_one && query > 0) {
            let piece = (req.len as u64 - query).min(MAX_STATUS_QUERY);
            match self.disk.block_status(req.offset + query, piece) {
                Ok(e) => extents.extend(e),
                Err(e) => return Reply::Failed(e.into()),
            }
            query += piece;
        }
        let mut chunks = vec![];
        if self.contexts.allocation {
            chunks.push((
                ALLOCATION_ID,
                descriptors(&extents, query, req_one, allocation_flags),
            ));
        }
        if self.contexts.changed {
            chunks.push((
                CHANGED_ID,
                descriptors(&extents, query, req_one, changed_flags),
            ));
        }
        if chunks.iter().any(|(_, d)| d.is_empty()) {
            return Reply::Failed(Failure::new(NBD_EIO, "the disk reported no extents"));
        }
        Reply::Status(chunks)
    }
}

fn push_segment(out: &mut Vec<Segment>, offset: u64, len: u64, zero: bool) {
    match out.last_mut() {
        Some(last) if last.zero == zero => last.len += len,
        _ => out.push(Segment { offset, len, zero }),
    }
}

fn allocation_flags(f: ExtentFlags) -> u32 {
    (if f.hole { STATE_HOLE } else { 0 }) | (if f.zero { STATE_ZERO } else { 0 })
}

fn changed_flags(f: ExtentFlags) -> u32 {
    if f.changed {
        STATE_CHANGED
    } else {
        0
    }
}

/// One context's descriptors: extents with equal flags merged, clipped to
/// `limit` bytes and `MAX_EXTENTS` entries (one with REQ_ONE).
fn descriptors(
    extents: &[Extent],
    limit: u64,
    req_one: bool,
    flags: fn(ExtentFlags) -> u32,
) -> Vec<(u32, u32)> {
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<(u32, u32)> = vec![];
    let mut left = limit;
    for e in extents {
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        let f = flags(e.flags);
        if let Some((len, _)) = out.last_mut().filter(|(_, lf)| *lf == f) {
            *len += n as u32;
        } else if out.len() == max {
            break;
        } else {
            out.push((n as u32, f));
        }
    }
    out
}
