//! The transmission phase: one reader loop per connection reads requests
//! and spawns a task per request; each task runs its disk call on the
//! blocking pool and writes its whole reply under the connection's writer
//! lock, so replies go out in completion order and never interleave. A
//! read of one data run within one block that must wait for a repository
//! fetch holds no blocking thread: the disk answers it when the fetch ends
//! (`Disk::read_later`), and the task awaits that answer.
//!
//! Layout: this file is the connection (the reader loop, the in-flight
//! budget, the writer lock); `execute` runs one request against the disk
//! (`Target`); `extents` turns the disk's extents into a read's hole and
//! data runs and block status descriptors; `reply` encodes an outcome as
//! simple or structured reply frames and writes them.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex as SyncMutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{watch, Mutex, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::handshake::Negotiated;
use super::proto::*;
use super::stopped;

mod execute;
pub(super) mod extents;
mod reply;

use execute::Target;
use reply::{encode, write_frames, Failure, Frame, Reply};

/// Requests one connection may have in flight; the reader waits above it.
const MAX_INFLIGHT: usize = 128;
/// READ/WRITE payload bytes one connection may hold in memory at once.
const MAX_INFLIGHT_BYTES: usize = 256 << 20;
/// Once a connection ends, how long a reply may take to be written before
/// it is dropped (a client that stopped reading must not hold up a
/// shutdown).
const WRITE_GRACE: Duration = Duration::from_secs(10);

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
            first_change: SyncMutex::new(guard.on_first_change()),
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
