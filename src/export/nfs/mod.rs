//! The NFSv3 export, for hypervisors that mount datastores over NFS
//! (ESXi, QEMU's `nfs://` driver, libvirt, Proxmox): `/<vm>/diskN.raw`,
//! `/<vm>/vm.json` and the hypervisor's side files, over TCP, with MOUNT v3
//! and a portmapper on each address's NFS port and on port 111.
//!
//! **Why it is written on `nfs3_types` and not `nfs3_server`.** The
//! `nfs3_server` crate (0.11.1) derives both file handles and the write
//! verifier from one generation number, so handles that survive a restart
//! come with a verifier that can never change, and clients could not learn
//! that uncommitted writes were lost. It also hides the client's address
//! from the filesystem (no per-export allow list, no root squash per
//! caller), reports FSSTAT constants, and bounds neither record sizes nor
//! allocations. None of this can be fixed by wrapping it, so the protocol
//! is served here on the crate's lower layer, `nfs3_types`, whose encoders
//! build every reply; requests are decoded with our own bounded reader
//! (`xdr`), because its decoders allocate whatever length the wire claims.
//!
//! **Durability.** UNSTABLE writes are answered UNSTABLE with a write
//! verifier; DATA_SYNC and FILE_SYNC writes and COMMIT make data and maps
//! durable (`Disk::flush`, which groups concurrent flushes) before replying
//! FILE_SYNC. A disk's verifier is its epoch (`Disk::epoch`): it changes
//! when unsynced data could have been lost (a host reboot, a failed staging
//! sync) and not on a daemon restart, `kill -9` included, because the
//! restarted daemon keeps every block written in this boot (see
//! `staging::live`). Side files are plain files: theirs is new at each
//! daemon start and after any failed side-file operation ([`SideVerifier`]). Some clients never compare verifiers (libnfs 4.0, used by QEMU):
//! `--nfs-write-through` answers every write FILE_SYNC.
//!
//! **Handles** are stable identities (see `fs`): after a restart, clients
//! carry on with the handles they hold; a handle of a released session is
//! NFS3ERR_STALE until the same backup of the VM is recovered again, when
//! it names the same file again (safe: release flushed the session, or
//! poisoned its mirror so the disk's verifier changes).
//!
//! **Access.** Only the client networks of `--allow` (shared with NBD;
//! default: loopback only) are served; others get one MNT3ERR_ACCES or RPC
//! AUTH_TOOWEAK reply, then their connection is closed, and a log line at
//! most once per host a minute. Root (and AUTH_NULL) callers are squashed to the
//! anonymous user unless `--nfs-no-root-squash` (ESXi needs root). A client
//! connection that reads or writes a VM's files holds that VM's session
//! open: `release` refuses until the client disconnects.
//!
//! **Connections** are bounded (`server::ConnLimits`, `--nfs-max-connections`):
//! a client that stops reading its replies holds no thread and is closed
//! after a write timeout; a record must arrive whole in bounded time, and
//! its buffer grows with the bytes that arrive; TCP keepalive ends the
//! connections of hosts that vanished.
//!
//! Not served: NLM locking (ESXi does its own `.lck-*` files), NFSv4,
//! directories other than the VM directories, symlinks, hard links.

pub mod fs;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod xdr;

pub use server::{ConnLimits, NfsOptions, NfsServer};

/// The write verifier of side files. They are plain files, whose unsynced
/// data the page cache holds until a reboot or a failed writeback. The
/// kernel reports a writeback error to one descriptor only, and side files
/// take a new descriptor per call, so a COMMIT may find nothing to report
/// after an UNSTABLE write was lost. So the verifier is new at every daemon
/// start (a daemon that saw a failure may have died before telling anyone)
/// and after every failed side-file write, sync or resize: clients then
/// resend what they have not seen committed, a side file's few writes.
pub struct SideVerifier(std::sync::atomic::AtomicU64);

impl SideVerifier {
    pub fn new() -> SideVerifier {
        SideVerifier(std::sync::atomic::AtomicU64::new(rand::random()))
    }

    pub fn get(&self) -> [u8; 8] {
        self.0
            .load(std::sync::atomic::Ordering::Acquire)
            .to_be_bytes()
    }

    /// After a side-file operation failed: what clients wrote UNSTABLE
    /// may be lost.
    pub fn failed(&self) {
        let old = self.0.load(std::sync::atomic::Ordering::Acquire);
        let new = loop {
            let v: u64 = rand::random();
            if v != old {
                break v;
            }
        };
        self.0.store(new, std::sync::atomic::Ordering::Release);
    }
}

impl Default for SideVerifier {
    fn default() -> Self {
        Self::new()
    }
}
