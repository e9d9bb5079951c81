//! Listeners and connections: each NFS address serves portmapper, MOUNT
//! and NFS on its own port and on port 111 of the same address (QEMU's
//! `nfs://` driver cannot be given a port and asks the portmapper there).
//! A connection reads records, answers up to 64 calls at once on blocking
//! threads, and writes replies in completion order. A READ of a disk that
//! must wait for a fetch within one block returns its thread at once: the
//! disk sends its reply when the fetch ends (`proto::Later`), and the
//! call keeps its place among the 64 until then.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
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
}

impl NfsOptions {
    fn allows(&self, ip: IpAddr) -> bool {
        crate::export::allows(&self.allow, ip)
    }

    fn caller(&self, cred: &Cred, peer: IpAddr) -> Caller {
        let anon = Caller {
            uid: self.anon.0,
            gid: self.anon.1,
            gids: vec![],
        };
        match cred {
            Cred::Unix { uid: 0, .. } if self.root_squash && !is_loopback(peer) => anon,
            Cred::Unix { uid, gid, gids } => Caller {
                uid: *uid,
                gid: *gid,
                gids: gids.clone(),
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
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = l.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    conns.spawn(serve_conn(s, peer, shared.clone(), nfs_port));
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

async fn serve_conn(s: TcpStream, peer: SocketAddr, shared: Arc<Shared>, nfs_port: u16) {
    let allowed = shared.opts.allows(peer.ip());
    let _host = allowed.then(|| shared.point.connected(peer.ip()));
    if allowed {
        tracing::debug!(%peer, "NFS client connected");
    } else {
        tracing::warn!(%peer, "NFS client refused: its address is not in the allowed networks (--allow)");
    }
    let conn = Arc::new(Conn::default());
    let (mut rd, mut wr) = s.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(rec) = rx.recv().await {
            if wr.write_all(&rec).await.is_err() {
                break;
            }
        }
    });
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let rec = match read_record(&mut rd).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%peer, "NFS connection dropped: {e}");
                break;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (shared, conn, tx) = (shared.clone(), conn.clone(), tx.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // The permit goes with the reply, also one sent later.
            let permit = Arc::new(permit);
            let later = {
                let (tx, h, permit) = (tx.clone(), handle.clone(), permit.clone());
                move |reply: Vec<u8>| {
                    let (tx, permit) = (tx.clone(), permit.clone());
                    h.spawn(async move {
                        let _ = tx.send(reply).await;
                        drop(permit);
                    });
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
                let _ = tx.blocking_send(reply);
            }
        });
    }
    drop(tx);
    let _ = writer.await;
    tracing::debug!(%peer, "NFS client disconnected");
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
mod tests {
    use super::*;

    fn opts() -> NfsOptions {
        NfsOptions {
            listen: vec![],
            allow: crate::export::loopback_only(),
            root_squash: true,
            anon: (65534, 65534),
            write_through: false,
            owner: (0, 0),
        }
    }

    #[test]
    fn remote_root_is_squashed_to_anon_unless_told_not_to() {
        let mut o = opts();
        let root = Cred::Unix {
            uid: 0,
            gid: 0,
            gids: vec![0],
        };
        let remote: IpAddr = "198.18.0.2".parse().unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(o.caller(&root, remote).uid, 65534);
        assert_eq!(
            o.caller(&root, local).uid,
            0,
            "local root can read staging anyway"
        );
        assert_eq!(o.caller(&Cred::None, local).uid, 65534);
        o.root_squash = false;
        assert_eq!(o.caller(&root, remote).uid, 0);
    }
}
