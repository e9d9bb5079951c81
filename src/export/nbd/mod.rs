//! The NBD frontend: an in-process server of the Network Block Device
//! protocol (doc/proto.md of NetworkBlockDevice/nbd) that exports the
//! daemon's disks to hypervisors and tools (qemu's NBD client, libnbd's
//! nbdinfo and nbdcopy, the kernel's nbd-client) through the
//! frontend-agnostic [`Disk`] API, one export per disk.
//!
//! Implemented: the fixed newstyle handshake (with `NBD_FLAG_C_NO_ZEROES`);
//! the options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (export size and
//! flags, canonical name, description, block sizes 1 / 4096 / 32 MiB),
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` with two
//! contexts, `base:allocation` (hole, zero) and `recoverfs:changed` (flag 1:
//! the guest changed the range since the backup); the commands `READ` (with
//! structured replies: data and hole chunks, don't-fragment honoured),
//! `WRITE`, `WRITE_ZEROES` (`NO_HOLE` writes zero bytes), `TRIM`, `FLUSH`,
//! `BLOCK_STATUS` (`REQ_ONE` honoured) and `DISC`, `FUA` on every write.
//! Many requests run in parallel per connection and replies leave in
//! completion order; many connections may share an export (`CAN_MULTI_CONN`:
//! a flush is disk-wide).
//!
//! Not implemented: TLS (`STARTTLS` is answered `NBD_REP_ERR_POLICY`: serve
//! on loopback or a Unix socket, or a trusted network), the oldstyle and
//! the non-fixed newstyle handshakes (such clients are disconnected),
//! `CACHE`, `FAST_ZERO`, extended headers and resize.
//!
//! Durability: `FLUSH` and `FUA` are [`Disk::flush`]. A write is
//! acknowledged once the disk took it, and is durable from the reply to the
//! next `FLUSH` (on any connection) or at its own reply if it carried `FUA`;
//! acknowledged writes without either may be lost on a crash until a flush.
//!
//! Access: over TCP only clients in the allowed networks (`--allow`) are
//! served; any other is disconnected before the greeting (it learns nothing,
//! not even the export names) and logged at most once a minute per host.
//! A Unix socket appears with mode 0600. A client counts as a host of the
//! export point only once it has chosen an export.
//!
//! Hostile or lost clients: every length read from the wire is bounded
//! (options 64 KiB, READ/WRITE 32 MiB, in-flight payload per connection
//! 256 MiB, block status work per request 1 GiB and 64 Ki extents); a
//! violation ends the connection with a warning. A client has 60 s to
//! choose an export. TCP keepalive is on (`export::keep_alive`), so a
//! connection whose peer vanished (and with it the export's guard) ends
//! after about six minutes instead of never.
//!
//! Why written here: no crate fits. `libnbd` has no crate on crates.io,
//! `nbd` 0.3 lacks `NBD_OPT_GO` and structured replies, and `tokio-nbd` is
//! GPL.
//!
//! Layout: `proto` holds the wire constants and encoders, `handshake`
//! the option phase, `transmission` the request phase (the connection;
//! below it `execute` runs a request against the disk, `extents` shapes
//! the disk's extents for a reply, `reply` encodes and writes replies);
//! this file binds the listeners and runs the connections.

use std::any::Any;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::disk::Disk;
use crate::error::{Error, ErrorKind, IoContext, Result};

mod handshake;
pub(crate) mod proto;
mod transmission;

#[cfg(test)]
mod tests;

/// What the server exports; implemented by the daemon over its recovery sessions.
pub trait Exports: Send + Sync + 'static {
    /// Export names with a human description, for NBD_OPT_LIST (e.g. ("tiny/disk0", "disk0 of VM tiny, backup X")).
    fn list(&self) -> Vec<(String, String)>;
    /// Opens export `name` for one connection: the disk, and a guard the connection keeps until it ends
    /// (while held, the session counts the connection as an open handle). Err(NotFound) for an unknown name.
    fn open(&self, name: &str) -> Result<(Arc<dyn Disk>, Box<dyn OpenGuard>)>;
    /// [`Exports::open`] by the client `peer` (its address, or a unix
    /// socket's peer), which the export may name while it is held.
    fn open_by(&self, name: &str, _peer: &str) -> Result<(Arc<dyn Disk>, Box<dyn OpenGuard>)> {
        self.open(name)
    }
    /// Looks at export `name` for the client `peer` without opening it
    /// for transmission (NBD_OPT_INFO): its disk, for the size the answer
    /// gives. No guard is kept, and to the export it is no attach (review30
    /// M2: `nbdinfo` cleared a VM's stranded clients). By default an open
    /// whose guard is dropped at once.
    fn look(&self, name: &str, peer: &str) -> Result<Arc<dyn Disk>> {
        self.open_by(name, peer).map(|(disk, _)| disk)
    }
    /// For a name this server does not export: where it is exported
    /// instead, if anywhere (a VM served at another export point), so a
    /// client at the wrong address is told where to connect.
    fn elsewhere(&self, _name: &str) -> Option<String> {
        None
    }
    /// A TCP client from `peer` chose an export: a guard kept while the
    /// connection lasts (the export point counts its hosts this way; a
    /// refused host, a probe or a listing is not one of them).
    fn connected(&self, _peer: std::net::IpAddr) -> Option<Box<dyn Any + Send>> {
        None
    }
}

/// What a connection keeps from [`Exports::open_by`] until it ends.
pub trait OpenGuard: Send + Sync {
    /// What to run at the client's first change of the disk on this
    /// connection (a WRITE, WRITE_ZEROES or TRIM, before it runs): a client
    /// that changes the disk uses it as a hypervisor does, which a reader
    /// such as `nbdcopy` or `nbdinfo --map` does not.
    fn on_first_change(&self) -> Option<FirstChange> {
        None
    }
}

/// See [`OpenGuard::on_first_change`].
pub type FirstChange = Box<dyn FnOnce() + Send>;

impl OpenGuard for () {}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

/// A running NBD server. Dropping it stops it without waiting; prefer
/// [`NbdServer::shutdown`].
pub struct NbdServer {
    stop: watch::Sender<bool>,
    running: Arc<Running>,
    tcp: Vec<SocketAddr>,
    /// Removed when the server is gone, if still ours.
    _sockets: Vec<SocketFile>,
}

impl NbdServer {
    /// TCP clients outside `allow` (`--allow`) are disconnected at once,
    /// before the greeting (a Unix socket is guarded by its mode, 0600).
    ///
    /// Binds every listener now (so a busy port or a bad address is reported at once as a clear one-line
    /// crate::error::Error: e.g. "NBD address 127.0.0.1:10809 is already in use", "NBD address 10.9.9.9:10809 is not an address of this host"),
    /// then serves on `rt`. A Unix socket path that exists and nobody answers on is replaced; one a live server answers on is Busy.
    pub fn start(
        rt: &tokio::runtime::Handle,
        listen: &[Listen],
        exports: Arc<dyn Exports>,
        allow: &[ipnet::IpNet],
    ) -> crate::error::Result<NbdServer> {
        // Listeners register with the runtime's reactor.
        let _entered = rt.enter();
        let mut tcp = vec![];
        let mut unix = vec![];
        let mut sockets = vec![];
        for l in listen {
            match l {
                Listen::Tcp(addr) => tcp.push(bind_tcp(*addr)?),
                Listen::Unix(path) => {
                    let (listener, file) = bind_unix(path)?;
                    unix.push(listener);
                    sockets.push(file);
                }
            }
        }
        let (stop, _) = watch::channel(false);
        let running = Arc::new(Running::default());
        let access = Arc::new(Access {
            allow: allow.to_vec(),
            refused: crate::util::HostLogLimit::new(REFUSED_LOG_EVERY),
        });
        let mut tcp_addrs = vec![];
        for (l, addr) in tcp {
            tcp_addrs.push(addr);
            let task = accept_loop(
                l,
                exports.clone(),
                access.clone(),
                stop.subscribe(),
                running.enter(),
            );
            rt.spawn(task.instrument(tracing::info_span!("nbd", listen = %addr)));
        }
        for (l, file) in unix.into_iter().zip(&sockets) {
            let task = accept_loop(
                l,
                exports.clone(),
                access.clone(),
                stop.subscribe(),
                running.enter(),
            );
            let span = tracing::info_span!("nbd", listen = %file.path.display());
            rt.spawn(task.instrument(span));
        }
        Ok(NbdServer {
            stop,
            running,
            tcp: tcp_addrs,
            _sockets: sockets,
        })
    }

    /// The bound TCP addresses (with the real port if 0 was asked).
    pub fn tcp_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.tcp.clone()
    }

    /// Stops accepting and closes every connection (dropping their guards); waits for in-flight requests to answer.
    ///
    /// Blocks the calling thread: call it outside the runtime's workers
    /// (inside a multi-threaded runtime it steps aside with
    /// `block_in_place`).
    pub fn shutdown(self) {
        self.stop.send_replace(true);
        let wait = || self.running.wait_idle();
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Counts the accept loops still running (each waits for its
/// connections), so that `shutdown` can wait for them from plain threads.
#[derive(Default)]
struct Running {
    count: Mutex<usize>,
    idle: Condvar,
}

/// One running accept loop; leaving (even by panic or by the runtime
/// being dropped) counts it out.
struct Entered(Arc<Running>);

impl Running {
    fn enter(self: &Arc<Self>) -> Entered {
        *self.count.lock() += 1;
        Entered(self.clone())
    }

    fn wait_idle(&self) {
        let mut n = self.count.lock();
        while *n > 0 {
            self.idle.wait(&mut n);
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut n = self.0.count.lock();
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A Unix socket file this server created: removed when the server is
/// gone unless something else has replaced it meanwhile.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if md.dev() == self.dev && md.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Connections a listener queues before they are accepted.
const BACKLOG: u32 = 1024;

/// Binds a TCP listener (in the runtime's context); returns it with its
/// real address. Keepalive is set on the listener so that every accepted
/// connection inherits it: a hypervisor that vanishes without closing
/// does not hold its export (and the session's handle) open forever.
fn bind_tcp(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let ctx = || format!("NBD address {addr}");
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .ctx(ctx)?;
    socket.set_reuseaddr(true).ctx(ctx)?;
    crate::export::keep_alive(&socket).ctx(ctx)?;
    socket.bind(addr).map_err(|e| tcp_bind_error(addr, e))?;
    let listener = socket
        .listen(BACKLOG)
        .map_err(|e| tcp_bind_error(addr, e))?;
    let bound = listener.local_addr().ctx(ctx)?;
    Ok((listener, bound))
}

/// The one-line error for a TCP address that cannot be bound.
fn tcp_bind_error(addr: SocketAddr, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => Error::busy(format!("NBD address {addr} is already in use")),
        std::io::ErrorKind::AddrNotAvailable => {
            Error::invalid(format!("NBD address {addr} is not an address of this host"))
        }
        std::io::ErrorKind::PermissionDenied => Error::not_permitted(format!(
            "NBD address {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        )),
        _ => Error::io(format!("NBD address {addr}"), e),
    }
}

/// Binds a Unix listener (in the runtime's context) after removing a dead
/// socket left at `path`. The socket appears there with mode 0600: it is
/// bound in a private directory (0700) next to `path`, given its mode, and
/// only then linked into place, so that whatever the umask, no other user
/// can connect in between.
fn bind_unix(path: &Path) -> Result<(tokio::net::UnixListener, SocketFile)> {
    let ctx = || format!("NBD socket {}", path.display());
    remove_stale_socket(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".nbd-")
        .tempdir_in(dir)
        .ctx(|| format!("create a private directory in {}", dir.display()))?;
    let tmp = private.path().join("s");
    let l = tokio::net::UnixListener::bind(&tmp).ctx(ctx)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("set the mode of NBD socket {} to 0600", tmp.display()))?;
    // A link, not a rename: a socket another server bound at `path` since
    // the check above is not replaced.
    std::fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            Error::busy(format!("NBD socket {} is already in use", path.display()))
        }
        _ => Error::io(ctx(), e),
    })?;
    let md = std::fs::symlink_metadata(path).ctx(ctx)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: md.dev(),
        ino: md.ino(),
    };
    Ok((l, file))
}

/// Makes room for our socket: a socket nobody answers on is removed; a
/// live one is Busy; anything that is not a socket is left alone.
fn remove_stale_socket(path: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("NBD socket {}", path.display()), e)),
    };
    if !md.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "NBD socket path {} exists and is not a socket",
                path.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::busy(format!(
            "NBD socket {} is already served by a running server",
            path.display()
        )));
    }
    std::fs::remove_file(path).ctx(|| format!("remove stale NBD socket {}", path.display()))
}

/// Resolves once the server is stopping (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// How long an accept loop pauses after a failed accept (out of file
/// descriptors, most likely) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listener the accept loop serves: TCP (with the peer's address, for
/// the export point's host count) or Unix.
trait Acceptor: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next client: its stream, a name for logs, its address if any.
    fn next(
        &self,
    ) -> impl std::future::Future<
        Output = std::io::Result<(Self::Stream, String, Option<std::net::IpAddr>)>,
    > + Send;
}

impl Acceptor for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String, Option<std::net::IpAddr>)> {
        let (stream, peer) = self.accept().await?;
        // Replies are small messages: do not wait for ACKs.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.to_string(), Some(peer.ip())))
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String, Option<std::net::IpAddr>)> {
        let (stream, _) = self.accept().await?;
        let peer = unix_peer(&stream);
        Ok((stream, peer, None))
    }
}

/// Who may connect over TCP, and the rate limit of the refusals' log.
struct Access {
    allow: Vec<ipnet::IpNet>,
    refused: crate::util::HostLogLimit,
}

/// A refused host is logged at most this often (a scanner or a
/// misconfigured hypervisor retries in a loop).
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

impl Access {
    /// Whether a client at `ip` (None: a Unix socket) may be served; logs
    /// a refusal.
    fn admits(&self, ip: Option<std::net::IpAddr>, peer: &str) -> bool {
        let Some(ip) = ip else { return true };
        if crate::export::allows(&self.allow, ip) {
            return true;
        }
        if let Some(held_back) = self.refused.check(ip, std::time::Instant::now()) {
            tracing::warn!(
                peer,
                refused_since_last_line = held_back,
                "NBD client refused: its address is not in the allowed networks (--allow)"
            );
        }
        false
    }
}

async fn accept_loop<L: Acceptor>(
    listener: L,
    exports: Arc<dyn Exports>,
    access: Arc<Access>,
    mut stop: watch::Receiver<bool>,
    _running: Entered,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.next() => match r {
                // A refused client is dropped unanswered: it learns
                // nothing, not even that this is an NBD server.
                Ok((stream, peer, ip)) => if access.admits(ip, &peer) {
                    conns.spawn(connection(stream, peer, ip, exports.clone(), stop.clone()));
                },
                Err(e) => accept_failed(e).await,
            },
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// A Unix peer has no address worth logging; its credentials say who it is.
fn unix_peer(s: &tokio::net::UnixStream) -> String {
    match s.peer_cred() {
        Ok(c) => match c.pid() {
            Some(pid) => format!("unix:pid={pid},uid={}", c.uid()),
            None => format!("unix:uid={}", c.uid()),
        },
        Err(_) => "unix".into(),
    }
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!("NBD accept failed: {e}");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// How long a client may take to choose an export: connections that
/// never finish negotiating must not pile up (qemu-nbd limits it too).
/// Short under test so that the limit itself can be tested.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 3 } else { 60 });

/// One client connection from greeting to close.
async fn connection<S>(
    mut stream: S,
    peer: String,
    ip: Option<std::net::IpAddr>,
    exports: Arc<dyn Exports>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("nbd", peer = %peer, export = tracing::field::Empty);
    async move {
        let handshake = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake::negotiate(&mut stream, &exports, &peer),
        );
        let negotiated = tokio::select! {
            r = handshake => r.unwrap_or(Err(proto::End::HandshakeTimeout)),
            _ = stopped(&mut stop) => Err(proto::End::Shutdown),
        };
        let n = match negotiated {
            Ok(n) => n,
            Err(end) => {
                // Listing exports or probing is not worth an info line.
                tracing::debug!("NBD connection ended during the handshake: {end}");
                return;
            }
        };
        // Only now a host of the export point (held to the end).
        let _host = ip.and_then(|ip| exports.connected(ip));
        tracing::Span::current().record("export", n.name.as_str());
        tracing::info!(
            size = n.size,
            structured = n.structured,
            allocation = n.contexts.allocation,
            changed = n.contexts.changed,
            "NBD connection opened"
        );
        let end = transmission::serve(stream, n, stop).await;
        tracing::info!("NBD connection closed: {end}");
    }
    .instrument(span)
    .await
}
