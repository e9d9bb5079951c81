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
//! **Durability.** UNSTABLE writes are answered UNSTABLE with the write
//! verifier; DATA_SYNC and FILE_SYNC writes and COMMIT make data and maps
//! durable (`Disk::flush`, which groups concurrent flushes) before replying
//! FILE_SYNC. The verifier changes when unsynced data could have been lost:
//! after a host reboot, and after a daemon that did not shut down cleanly
//! (a restarted daemon refetches blocks whose presence bits it had not
//! persisted, which could overwrite uncommitted writes). A clean restart
//! keeps it. Some clients never compare verifiers (libnfs 4.0, used by
//! QEMU): `--nfs-write-through` answers every write FILE_SYNC.
//!
//! **Handles** are stable identities (see `fs`): after a restart, clients
//! carry on with the handles they hold; a handle of a released session is
//! NFS3ERR_STALE.
//!
//! **Access.** Each export lists the client networks allowed to use it
//! (default: loopback only); others get MNT3ERR_ACCES and RPC AUTH_TOOWEAK,
//! and a log line. Root (and AUTH_NULL) callers are squashed to the
//! anonymous user unless `--nfs-no-root-squash` (ESXi needs root). A client
//! connection that reads or writes a VM's files holds that VM's session
//! open: `release` refuses until the client disconnects.
//!
//! Not served: NLM locking (ESXi does its own `.lck-*` files), NFSv4,
//! directories other than the VM directories, symlinks, hard links.

pub mod fs;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod xdr;

pub use server::{NfsOptions, NfsServer};

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::util::write_atomic;

/// `export-state.json` in the staging directory: what the write verifier
/// was made from, and whether the daemon that made it shut down cleanly.
#[derive(Debug, Serialize, Deserialize)]
struct ExportState {
    boot_id: String,
    verifier: String,
    clean: bool,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The write verifier for this run: the previous one if the host did not
/// reboot and the previous daemon shut down cleanly, else a new one. It is
/// recorded as not clean until `mark_clean`.
pub fn start_verifier(staging: &Path) -> Result<[u8; 8]> {
    let path = staging.join("export-state.json");
    let boot = boot_id();
    let previous: Option<ExportState> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let kept = previous
        .filter(|p| p.clean && p.boot_id == boot)
        .and_then(|p| parse_verifier(&p.verifier));
    let verifier = kept.unwrap_or_else(|| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&hex_bytes(&crate::repo::random_hex(8)));
        v
    });
    store(staging, &boot, &verifier, false)?;
    Ok(verifier)
}

/// Records a clean shutdown: everything acknowledged is durable, so the
/// next daemon may keep the verifier.
pub fn mark_clean(staging: &Path, verifier: &[u8; 8]) -> Result<()> {
    store(staging, &boot_id(), verifier, true)
}

fn store(staging: &Path, boot: &str, verifier: &[u8; 8], clean: bool) -> Result<()> {
    let st = ExportState {
        boot_id: boot.to_string(),
        verifier: verifier.iter().map(|b| format!("{b:02x}")).collect(),
        clean,
    };
    write_atomic(
        &staging.join("export-state.json"),
        &serde_json::to_vec_pretty(&st).expect("json"),
        0o600,
        true,
    )
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

fn parse_verifier(s: &str) -> Option<[u8; 8]> {
    hex_bytes(s).try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_survives_only_a_clean_restart_in_the_same_boot() {
        let d = tempfile::tempdir().unwrap();
        let v1 = start_verifier(d.path()).unwrap();
        // A crash: no clean mark.
        let v2 = start_verifier(d.path()).unwrap();
        assert_ne!(v1, v2, "a daemon that crashed keeps its verifier");
        mark_clean(d.path(), &v2).unwrap();
        let v3 = start_verifier(d.path()).unwrap();
        assert_eq!(v2, v3, "a clean restart changes the verifier");
        // Another boot.
        mark_clean(d.path(), &v3).unwrap();
        store(d.path(), "another-boot", &v3, true).unwrap();
        assert_ne!(start_verifier(d.path()).unwrap(), v3);
    }
}
