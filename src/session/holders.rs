//! Who holds a session's disks open: `release` refuses while anyone does,
//! and names each holder, frontend and peer (explore10 L4: "1 handle(s)"
//! said neither which disk nor whose). Recorded at open and close only,
//! never on the I/O path.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// The frontend a disk is held open over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Frontend {
    #[serde(rename = "FUSE")]
    Fuse,
    #[serde(rename = "NBD")]
    Nbd,
    #[serde(rename = "NFS")]
    Nfs,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Frontend::Fuse => "FUSE",
            Frontend::Nbd => "NBD",
            Frontend::Nfs => "NFS",
        })
    }
}

/// One open handle of a session: over which frontend, of which disk, by
/// whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub via: Frontend,
    /// The disk held; `None` for an NFS client, which holds the VM's
    /// files (any of them) for as long as it is connected.
    pub disk: Option<usize>,
    /// The peer: a client address ("127.0.0.1:51234"), a unix socket's
    /// "unix:pid=…", or a FUSE opener's "pid 4242 (qemu-system-x86)".
    pub peer: String,
}

impl Holder {
    /// An NBD client with disk `disk` open; `peer` as its connection
    /// names it (an address, or a unix socket's peer).
    pub fn nbd(disk: usize, peer: &str) -> Holder {
        Holder {
            via: Frontend::Nbd,
            disk: Some(disk),
            peer: peer.into(),
        }
    }

    /// An NFS client connection from `peer` using the VM's files.
    pub fn nfs(peer: impl fmt::Display) -> Holder {
        Holder {
            via: Frontend::Nfs,
            disk: None,
            peer: peer.to_string(),
        }
    }

    /// A FUSE open of disk `disk` by the thread or process `pid` (as the
    /// kernel gives it: a thread's id for a thread): named by its process
    /// and that process's command name, if `/proc` shows them.
    pub fn fuse(disk: usize, pid: u32) -> Holder {
        let pid = process_of(pid);
        let peer = match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            Ok(comm) if !comm.trim().is_empty() => format!("pid {pid} ({})", comm.trim()),
            _ => format!("pid {pid}"),
        };
        Holder {
            via: Frontend::Fuse,
            disk: Some(disk),
            peer,
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.disk {
            Some(d) => write!(f, "disk{d} over {} by {}", self.via, self.peer),
            None => write!(f, "its files over {} by {}", self.via, self.peer),
        }
    }
}

/// The process (thread group) of thread `tid`, or `tid` if `/proc` does
/// not say (gone, or not readable).
fn process_of(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// A session's open handles, each under the id its opener closes it by.
#[derive(Default)]
pub(super) struct Holders {
    next: u64,
    open: BTreeMap<u64, Holder>,
}

impl Holders {
    pub(super) fn add(&mut self, h: Holder) -> u64 {
        self.next += 1;
        self.open.insert(self.next, h);
        self.next
    }

    pub(super) fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }

    pub(super) fn len(&self) -> u64 {
        self.open.len() as u64
    }

    pub(super) fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub(super) fn list(&self) -> Vec<Holder> {
        self.open.values().cloned().collect()
    }
}

/// "disk0 over NBD by 127.0.0.1:51234; disk1 over FUSE by pid 4242
/// (qemu-system-x86)".
pub fn describe(holders: &[Holder]) -> String {
    let all: Vec<String> = holders.iter().map(Holder::to_string).collect();
    all.join("; ")
}

/// Which network frontends reached a session (`daemon::exports_moved`).
impl super::Session {
    /// Frontend `via` (NFS or NBD) attached to it since this daemon
    /// started: a client changed one of its disks (an NFS WRITE; an NBD
    /// WRITE, WRITE_ZEROES or TRIM). A listing, an NBD_OPT_INFO, a read
    /// (`nfs-cat`, `nbdcopy` from the disk) is no attach (review30 M2). The first over `via` runs what
    /// [`Self::on_network_attach`] left for it.
    pub fn attached(&self, via: Frontend) {
        let first: Vec<super::OnAttach> = {
            let mut n = self.network.lock();
            if n.seen.contains(&via) {
                return;
            }
            n.seen.push(via);
            let (now, later) = std::mem::take(&mut n.first)
                .into_iter()
                .partition(|(f, _)| *f == via);
            n.first = later;
            now.into_iter().map(|(_, f)| f).collect()
        };
        for f in first {
            f(self);
        }
    }

    /// Frontend `via` attached to it since this daemon started.
    pub fn network_attached(&self, via: Frontend) -> bool {
        self.network.lock().seen.contains(&via)
    }

    /// Which of NFS and NBD attached to it since this daemon started.
    pub fn network_reached(&self) -> crate::staging::last_exports::Reached {
        crate::staging::last_exports::Reached {
            nfs: self.network_attached(Frontend::Nfs),
            nbd: self.network_attached(Frontend::Nbd),
        }
    }

    /// Runs `f` at the first attach over `via`; `false` (and `f` dropped)
    /// if one happened already.
    pub(crate) fn on_network_attach(&self, via: Frontend, f: super::OnAttach) -> bool {
        let mut n = self.network.lock();
        if n.seen.contains(&via) {
            return false;
        }
        n.first.push((via, f));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_named_each_closed_by_its_own_id() {
        let mut h = Holders::default();
        let nbd = h.add(Holder::nbd(0, "127.0.0.1:51234"));
        let me = std::process::id();
        // This test's thread: its id is not the process's, its process is.
        // SAFETY: gettid takes no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        let mine = h.add(Holder::fuse(1, tid));
        let other = h.add(Holder::fuse(1, u32::MAX));
        h.add(Holder::nfs("198.18.0.2:870"));
        let comm = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        assert_eq!(
            describe(&h.list()),
            format!(
                "disk0 over NBD by 127.0.0.1:51234; disk1 over FUSE by pid {me} ({}); \
                 disk1 over FUSE by pid {}; its files over NFS by 198.18.0.2:870",
                comm.trim(),
                u32::MAX
            )
        );
        assert_eq!(h.len(), 4);
        // Our close takes our open, though the other one is newer.
        h.remove(mine);
        h.remove(nbd);
        assert_eq!(
            describe(&h.list()),
            format!(
                "disk1 over FUSE by pid {}; its files over NFS by 198.18.0.2:870",
                u32::MAX
            )
        );
        h.remove(other);
        assert_eq!(h.len(), 1);
    }
}
