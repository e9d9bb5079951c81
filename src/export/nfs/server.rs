//! Listeners and connections: each NFS address serves portmapper, MOUNT
//! and NFS on its own port and on port 111 of the same address (QEMU's
//! `nfs://` driver cannot be given a port and asks the portmapper there).
//! A connection reads records, answers up to 64 calls at once on blocking
//! threads, and writes replies in completion order. A call keeps its place
//! among the 64 until its reply is written, so a client that does not read
//! its replies stops being read (it holds no thread), and one that takes
//! none for `ConnLimits::write_timeout` is closed. A READ of a disk that
//! must wait for a fetch within one block returns its thread at once: the
//! disk sends its reply when the fetch ends (`proto::Later`), and the
//! call keeps its place among the 64 until then.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::fs::{Caller, Namespace};
use super::proto::{dispatch, Conn, Ctx, Later};
use super::rpc::{self, read_record, BadCall, Cred};
use super::xdr::Reader;
use crate::error::{Error, ErrorKind, Result};
use crate::placement::ExportPoint;
use crate::session::Datastore;

/// Calls answered at once per connection; more wait in the socket.
const IN_FLIGHT: usize = 64;

/// How the NFS export is served.
#[derive(Debug, Clone)]
pub struct NfsOptions {
    /// Addresses with the port NFS and MOUNT are served on (111 too).
    pub listen: Vec<SocketAddr>,
    /// Client networks allowed to mount (`--allow`, shared with NBD);
    /// everyone else is refused.
    pub allow: Vec<IpNet>,
    /// Map root (and AUTH_NULL) callers of other hosts to `anon`. Root on
    /// this host (loopback) can read staging anyway and is not squashed.
    pub root_squash: bool,
    pub anon: (u32, u32),
    /// Answer every write FILE_SYNC, for clients that ignore verifiers.
    pub write_through: bool,
    /// Owner of the VM directories and files.
    pub owner: (u32, u32),
    /// How long a connection may keep the server waiting.
    pub limits: ConnLimits,
    /// Connections open at once per listener; more are closed at accept.
    pub max_connections: usize,
}

/// Bounds on what one NFS connection may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A reply the client does not take within this closes the connection
    /// (its socket is full: it stopped reading).
    pub write_timeout: Duration,
    /// After a bad record, replies still in flight are written for this
    /// long before the connection closes.
    pub grace: Duration,
    /// A record must arrive whole within this of its first byte (a
    /// refused host's one record, within this of connecting).
    pub record_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            write_timeout: Duration::from_secs(60),
            grace: Duration::from_secs(5),
            record_timeout: Duration::from_secs(60),
        }
    }
}

impl NfsOptions {
    /// `max_connections` unless told otherwise: a few hypervisors with a
    /// few connections each, far below the open-file limit.
    pub const MAX_CONNECTIONS: usize = 256;
    /// The most `--nfs-max-connections` may ask for: each connection is a
    /// descriptor, and no open-file limit goes far beyond this.
    pub const MOST_CONNECTIONS: usize = 1 << 20;
    /// Connections of refused hosts open at once per listener (each gets
    /// one reply): they never take an allowed host's places.
    const REFUSED_CONNECTIONS: usize = 16;

    fn allows(&self, ip: IpAddr) -> bool {
        crate::export::allows(&self.allow, ip)
    }

    fn caller(&self, cred: &Cred, peer: IpAddr) -> Caller {
        let anon = Caller {
            uid: self.anon.0,
            gid: self.anon.1,
            gids: vec![],
        };
        let squash = self.root_squash && !is_loopback(peer);
        // Group 0 is root's as much as user 0: squashed wherever it
        // appears, as knfsd does.
        let group = |g: u32| if squash && g == 0 { self.anon.1 } else { g };
        match cred {
            Cred::Unix { uid: 0, .. } if squash => anon,
            Cred::Unix { uid, gid, gids } => Caller {
                uid: *uid,
                gid: group(*gid),
                gids: gids.iter().map(|&g| group(g)).collect(),
            },
            Cred::None => anon,
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        IpAddr::V4(v4) => v4.is_loopback(),
    }
}

struct Shared {
    ns: Namespace,
    point: Arc<ExportPoint>,
    opts: NfsOptions,
    side_verifier: super::SideVerifier,
    /// Refused hosts reconnect in loops: one line per host per minute.
    refused_log: crate::util::HostLogLimit,
    /// So do broken clients: a dropped connection, likewise.
    dropped_log: crate::util::HostLogLimit,
}

pub struct NfsServer {
    rt: tokio::runtime::Handle,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    addrs: Vec<SocketAddr>,
}

/// Binds `addr`, turning the usual failures into one clear line.
fn bind(addr: SocketAddr, what: &str) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        let msg = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => format!("NFS {what} {addr} is already in use"),
            Some(libc::EADDRNOTAVAIL) => {
                format!("NFS address {} is not an address of this host", addr.ip())
            }
            Some(libc::EACCES) => format!("NFS {what} {addr} needs root to bind"),
            _ => format!("NFS {what} {addr}: {e}"),
        };
        Error::new(
            match e.raw_os_error() {
                Some(libc::EADDRINUSE) => ErrorKind::Busy,
                _ => ErrorKind::InvalidInput,
            },
            msg,
        )
    })?;
    l.set_nonblocking(true)
        .map_err(|e| Error::io(format!("NFS {what} {addr}"), e))?;
    // Accepted connections inherit it: a client host that vanished
    // without closing does not hold its connection (and sessions) forever.
    crate::export::keep_alive(&l)
        .map_err(|e| Error::io(format!("NFS {what} {addr}: keepalive"), e))?;
    Ok(l)
}

impl NfsServer {
    /// Binds every address (its port and 111) now, so a busy port or a
    /// foreign address is reported at once; then serves on `rt`.
    pub fn start(
        rt: &tokio::runtime::Handle,
        ds: Arc<Datastore>,
        point: Arc<ExportPoint>,
        opts: NfsOptions,
    ) -> Result<NfsServer> {
        let mut listeners = vec![];
        for &a in &opts.listen {
            listeners.push((bind(a, "address")?, a.port()));
            if a.port() != 111 {
                let pm = SocketAddr::new(a.ip(), 111);
                let l = bind(pm, "portmapper address").map_err(|e| {
                    e.context("QEMU's nfs:// driver asks the portmapper on port 111")
                })?;
                listeners.push((l, a.port()));
            }
        }
        let shared = Arc::new(Shared {
            ns: Namespace::new(ds, &point, opts.owner),
            point,
            opts,
            side_verifier: super::SideVerifier::new(),
            refused_log: crate::util::HostLogLimit::new(Duration::from_secs(60)),
            dropped_log: crate::util::HostLogLimit::new(Duration::from_secs(60)),
        });
        let (stop, stopped) = watch::channel(false);
        let mut tasks = vec![];
        let mut addrs = vec![];
        let _guard = rt.enter();
        for (l, nfs_port) in listeners {
            let addr = l.local_addr().map_err(|e| Error::io("NFS listener", e))?;
            addrs.push(addr);
            let l = TcpListener::from_std(l).map_err(|e| Error::io("NFS listener", e))?;
            let nfs_port = if nfs_port == 0 { addr.port() } else { nfs_port };
            tasks.push(rt.spawn(accept_loop(l, shared.clone(), nfs_port, stopped.clone())));
        }
        Ok(NfsServer {
            rt: rt.clone(),
            stop,
            tasks,
            addrs,
        })
    }

    /// Every bound address (NFS ports and 111), with real ports.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// Stops accepting and closes every connection (dropping what it held).
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        let tasks = self.tasks;
        self.rt.block_on(async {
            for t in tasks {
                let _ = t.await;
            }
        });
    }
}

async fn accept_loop(
    l: TcpListener,
    shared: Arc<Shared>,
    nfs_port: u16,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let max = shared.opts.max_connections;
    let places = Arc::new(Semaphore::new(max));
    // Hosts outside --allow draw on their own few places, so a refused
    // host opening connections cannot shut out the hypervisors.
    let refused_places = Arc::new(Semaphore::new(NfsOptions::REFUSED_CONNECTIONS));
    let over = crate::util::LogLimit::new(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = l.accept() => match r {
                Ok((s, peer)) => {
                    let allowed = shared.opts.allows(peer.ip());
                    let pool = if allowed { &places } else { &refused_places };
                    let Ok(place) = pool.clone().try_acquire_owned() else {
                        if !allowed {
                            // Already logged per host by the refused
                            // connections that hold the places.
                            continue;
                        }
                        if let Some(held) = over.check(Instant::now()) {
                            tracing::warn!(%peer, "NFS connection closed: {max} are open on this address already (--nfs-max-connections); {held} more closed since the last line");
                        }
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    let conn = serve_conn(s, peer, shared.clone(), nfs_port, allowed);
                    conns.spawn(async move {
                        conn.await;
                        drop(place);
                    });
                }
                Err(e) => {
                    tracing::warn!("NFS accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// A reply record and the call's place among the `IN_FLIGHT`, which it
/// keeps until the reply is written: replies a client does not read hold
/// places, and its calls wait unread in the socket, not on our threads.
type Reply = (Vec<u8>, Arc<OwnedSemaphorePermit>);

/// Why a connection stopped reading calls.
enum Ended {
    /// A clean EOF: in-flight replies are still written.
    Eof,
    /// A bad record, or the writer gave up: what is in flight gets `grace`.
    Dropped,
    /// A refused host's one call was read: its reply gets `grace`.
    Refused,
}

async fn serve_conn(
    s: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    nfs_port: u16,
    allowed: bool,
) {
    let _host = allowed.then(|| shared.point.connected(peer.ip()));
    if allowed {
        tracing::debug!(%peer, "NFS client connected");
    } else if let Some(held) = shared.refused_log.check(peer.ip(), Instant::now()) {
        tracing::warn!(%peer, "NFS client refused: its address is not in the allowed networks (--allow); {held} more refused connections from it since the last line");
    }
    let limits = shared.opts.limits;
    let (rd, wr) = s.into_split();
    // Unbounded, but each reply holds one of the IN_FLIGHT places.
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    // Reader and writer are one task: aborting it (shutdown) closes both.
    let reading = read_calls(rd, peer, shared.clone(), nfs_port, allowed, tx, limits);
    let writing = write_replies(wr, rx, limits.write_timeout);
    tokio::pin!(reading, writing);
    let ended = tokio::select! {
        ended = &mut reading => ended,
        r = &mut writing => {
            if let Err(e) = r {
                write_failed(&shared, peer, &e);
            }
            return;
        }
    };
    let written = match ended {
        Ended::Eof => writing.await,
        Ended::Dropped | Ended::Refused => tokio::time::timeout(limits.grace, writing)
            .await
            .unwrap_or(Ok(())),
    };
    if let Err(e) = written {
        write_failed(&shared, peer, &e);
    }
    tracing::debug!(%peer, "NFS client disconnected");
}

/// Logs why a connection was dropped, at most once per host per minute.
fn dropped(shared: &Shared, peer: SocketAddr, e: &std::io::Error) {
    if let Some(held) = shared.dropped_log.check(peer.ip(), Instant::now()) {
        tracing::warn!(%peer, "NFS connection dropped: {e}; {held} more from this host since the last line");
    }
}

/// A client that reset its connection is no news (QEMU's libnfs does at
/// every exit, explore5 L3); a record that does not decode, or a client
/// that stalled mid-record, is.
fn read_failed(shared: &Shared, peer: SocketAddr, e: &std::io::Error) {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    if matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) {
        tracing::debug!(%peer, "NFS client reset its connection: {e}");
    } else {
        dropped(shared, peer, e);
    }
}

/// A client that closed with calls in flight is no news; one that stopped
/// taking replies is.
fn write_failed(shared: &Shared, peer: SocketAddr, e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::TimedOut {
        dropped(shared, peer, e);
    } else {
        tracing::debug!(%peer, "NFS client gone before its replies: {e}");
    }
}

/// Writes replies in completion order until every sender is gone; a reply
/// the client does not take within `timeout` ends the connection.
async fn write_replies(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    timeout: Duration,
) -> std::io::Result<()> {
    while let Some((rec, place)) = rx.recv().await {
        tokio::time::timeout(timeout, wr.write_all(&rec))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client took no reply for {timeout:?}"),
                )
            })??;
        drop(place);
    }
    Ok(())
}

/// Reads calls and answers each on a blocking thread, which hands its
/// reply to the writer without waiting.
async fn read_calls(
    rd: tokio::net::tcp::OwnedReadHalf,
    peer: SocketAddr,
    shared: Arc<Shared>,
    nfs_port: u16,
    allowed: bool,
    tx: mpsc::UnboundedSender<Reply>,
    limits: ConnLimits,
) -> Ended {
    // Small calls come whole with their record marks in one read.
    let mut rd = tokio::io::BufReader::new(rd);
    let conn = Arc::new(Conn::new(peer));
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let record = read_record(&mut rd, limits.record_timeout);
        let record = if allowed {
            record.await
        } else {
            // A refused host may not even sit idle.
            tokio::time::timeout(limits.record_timeout, record)
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        };
        let rec = match record {
            Ok(Some(r)) => r,
            Ok(None) => return Ended::Eof,
            Err(e) => {
                read_failed(&shared, peer, &e);
                return Ended::Dropped;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ended::Dropped;
        };
        if tx.is_closed() {
            return Ended::Dropped; // the writer gave up
        }
        let (shared, conn, tx) = (shared.clone(), conn.clone(), tx.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // The place goes with the reply, also one sent later.
            let place = Arc::new(permit);
            let later = {
                let (tx, place) = (tx.clone(), place.clone());
                move |reply: Vec<u8>| {
                    let _ = tx.send((reply, place.clone()));
                }
            };
            let spawn: crate::disk::Spawner = Arc::new(move |job| drop(handle.spawn_blocking(job)));
            let reply = answer(
                &shared,
                &conn,
                &rec,
                nfs_port,
                allowed,
                peer.ip(),
                Arc::new(later),
                spawn,
            );
            if let Some(reply) = reply {
                let _ = tx.send((reply, place));
            }
        });
        // A refused host learns why (AUTH_TOOWEAK, MNT3ERR_ACCES) once,
        // and holds nothing after that.
        if !allowed {
            return Ended::Refused;
        }
    }
}

/// The reply to one record; `None` for a record that is not a call.
#[allow(clippy::too_many_arguments)] // one call's whole context
fn answer(
    shared: &Shared,
    conn: &Conn,
    rec: &[u8],
    nfs_port: u16,
    allowed: bool,
    peer: IpAddr,
    send: Arc<dyn Fn(Vec<u8>) + Send + Sync>,
    spawn: crate::disk::Spawner,
) -> Option<Vec<u8>> {
    let mut r = Reader::new(rec);
    let call = match rpc::decode_call(&mut r) {
        Ok(c) => c,
        Err(BadCall::Unreadable) => return None,
        Err(BadCall::RpcMismatch(xid)) => return Some(rpc::rpc_mismatch(xid)),
        Err(BadCall::BadCred(xid)) => {
            return Some(rpc::auth_error(
                xid,
                nfs3_types::rpc::auth_stat::AUTH_BADCRED,
            ))
        }
    };
    let later = Later {
        xid: call.xid,
        send,
        spawn,
        taken: Default::default(),
    };
    let ctx = Ctx {
        ns: &shared.ns,
        conn,
        caller: shared.opts.caller(&call.cred, peer),
        side_verifier: &shared.side_verifier,
        write_through: shared.opts.write_through,
        nfs_port,
        allowed,
        later: Some(&later),
    };
    let args = r.rest();
    let reply =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(&ctx, &call, args)));
    if later.taken() {
        return None;
    }
    Some(reply.unwrap_or_else(|p| {
        tracing::error!("NFS call panicked: {}", crate::util::panic_message(&p));
        rpc::garbage_args(call.xid)
    }))
}

#[cfg(test)]
mod tests;
