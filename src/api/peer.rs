//! Who may talk to the control socket, checked twice: the socket file is
//! created with its final mode (0600, or 0660 with `--socket-group`) so no
//! other user can connect even for an instant, and every connection's
//! peer is checked with `SO_PEERCRED` and `SO_PEERGROUPS` (root, the
//! daemon's own user, or a member of the socket group, by the credentials
//! it connected with), in case the file's mode is ever loosened or
//! a connected descriptor is handed to another process.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::pathauth::Caller;
use crate::error::{Error, IoContext, Result};

/// The users allowed on the control socket.
#[derive(Debug, Clone, Copy)]
pub struct PeerPolicy {
    /// The daemon's effective user.
    pub owner: u32,
    /// Members of this group are allowed too.
    pub group: Option<u32>,
}

impl PeerPolicy {
    pub fn for_daemon(group: Option<u32>) -> PeerPolicy {
        // SAFETY: geteuid cannot fail and touches no memory.
        let owner = unsafe { libc::geteuid() };
        PeerPolicy { owner, group }
    }

    /// True if a peer with these credentials may use the API.
    pub fn allows(&self, c: &Caller) -> bool {
        c.uid == 0 || c.uid == self.owner || self.group.is_some_and(|g| c.in_group(g))
    }
}

/// Binds `socket` so that it appears with its final mode and group: bound
/// in a private directory next to it, given its mode, then renamed into
/// place.
///
/// On a full filesystem (a staging filesystem that filled up: a new
/// directory needs a block, a socket only an inode) it is bound under a
/// temporary name in the same directory instead: until its chmod only
/// the umask's mode guards it, and every connection's credentials are
/// checked all the same (`CheckedListener`).
pub fn bind(socket: &Path, group: Option<u32>) -> Result<UnixListener> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    let private = match tempfile::Builder::new()
        .prefix(".recoverfs-sock-")
        .tempdir_in(dir)
    {
        Ok(p) => Some(p),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) =>
        {
            None
        }
        Err(e) => {
            return Err(Error::io(
                format!("create a private directory in {}", dir.display()),
                e,
            ))
        }
    };
    let tmp: PathBuf = match &private {
        Some(p) => p.path().join("s"),
        None => {
            let t = dir.join(format!(".recoverfs-sock-{}", std::process::id()));
            let _ = std::fs::remove_file(&t);
            t
        }
    };
    let listener =
        UnixListener::bind(&tmp).ctx(|| format!("bind control socket {}", socket.display()))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", tmp.display()))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(&tmp, None, Some(g)).ctx(|| format!("chgrp {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, socket).ctx(|| format!("create control socket {}", socket.display()))?;
    Ok(listener)
}

/// Resolves `--socket-group NAME` (or a numeric gid).
pub fn group_id(name: &str) -> Result<u32> {
    if let Ok(g) = name.parse::<u32>() {
        return Ok(g);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(Error::not_found(format!("no group named {name:?}"))),
        Err(e) => Err(Error::io(format!("look up group {name:?}"), e.into())),
    }
}

/// A Unix listener that only hands over connections its policy allows; a
/// refused peer gets an HTTP 403 with a one-line reason, and a log line.
pub struct CheckedListener {
    inner: UnixListener,
    policy: PeerPolicy,
}

impl CheckedListener {
    pub fn new(inner: UnixListener, policy: PeerPolicy) -> Self {
        CheckedListener { inner, policy }
    }

    fn admit(&self, stream: &UnixStream) -> io::Result<bool> {
        // The groups the kernel recorded at connect, not what
        // `/proc/PID/status` says now (another thread's, or by now
        // another process's).
        let caller = Caller::of(stream)?;
        let ok = self.policy.allows(&caller);
        if !ok {
            let cred = stream.peer_cred()?;
            tracing::warn!(
                uid = cred.uid(),
                gid = cred.gid(),
                pid = cred.pid(),
                "control socket: refused a client that is not root, the daemon's user or in the socket group"
            );
        }
        Ok(ok)
    }
}

async fn refuse(mut s: UnixStream) {
    // Read the request first: closing a socket with unread data resets it,
    // and the client would see "connection reset" instead of the reason.
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        while req.len() < 64 << 10 && !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = serde_json::json!({
        "error": "permission denied: this user may not control the recoverfs daemon (allowed: root, the daemon's user, and the group given with --socket-group)",
        "kind": "NotPermitted",
    })
    .to_string();
    let msg = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(msg.as_bytes()).await;
    let _ = s.shutdown().await;
}

impl axum::serve::Listener for CheckedListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.admit(&stream) {
                Ok(true) => return (stream, addr),
                Ok(false) => {
                    tokio::spawn(refuse(stream));
                }
                Err(e) => tracing::warn!("control socket: cannot identify a client: {e}"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The caller on one connection, for handlers that act on a path it
/// names (`ConnectInfo<Peer>`, see [`super::pathauth`]); `None` if the
/// kernel would not say.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<Caller>);

impl Peer {
    pub fn caller(&self) -> Result<Caller> {
        self.0
            .clone()
            .ok_or_else(|| Error::not_permitted("cannot identify the caller on this connection"))
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, CheckedListener>>
    for Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, CheckedListener>) -> Peer {
        Peer(Caller::of(s.io()).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_the_owner_and_group_members_are_allowed_others_not() {
        let p = PeerPolicy {
            owner: 1000,
            group: Some(2000),
        };
        let c = |uid, gid, groups: &[u32]| Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert!(p.allows(&c(0, 0, &[])));
        assert!(p.allows(&c(1000, 1000, &[])));
        assert!(p.allows(&c(1001, 2000, &[])));
        assert!(p.allows(&c(1001, 1001, &[7, 2000])));
        assert!(!p.allows(&c(1001, 1001, &[7])));
        let no_group = PeerPolicy {
            owner: 1000,
            group: None,
        };
        assert!(!no_group.allows(&c(1001, 2000, &[2000])));
    }
}
