//! Talking to running QEMU VMs, for backups of VMs that run outside the
//! datastore (issue 13 part 2): a QMP client ([`qmp`]; `recoverfs boot
//! --qmp` gives the VMs it starts a monitor) and an NBD client ([`nbd`])
//! that reads the point-in-time views QEMU exports ([`fleece`] makes and
//! removes them), and a guest-agent client ([`guest_agent`]: fsfreeze).
//!
//! **How a backup of running VMs uses them** (`backup-vms`, in
//! [`crate::vmbackup`]; full and incremental backups):
//! 1. *Common snapshot time.* `guest-fsfreeze-freeze` in every guest that
//!    runs `qemu-guest-agent` and is given an agent socket, `stop` on
//!    every VM, then in each VM, while all are paused, per disk a dirty
//!    bitmap at chunk granularity plus a copy-before-write filter and a
//!    `snapshot-access` node (QEMU 7.2's image fleecing, [`fleece`]),
//!    exported over QEMU's NBD server; then `cont` and thaw. The pause is
//!    reported per VM.
//! 2. *Busiest first.* Write bytes per second from `query-blockstats` over
//!    a short window order the VMs: the busiest one's copy-before-write
//!    store grows fastest, so its view is read and released first.
//! 3. *Read each view* over NBD (structured replies; `BLOCK_STATUS` with
//!    `base:allocation` to skip zero ranges; `qemu:dirty-bitmap:NAME` will
//!    drive incrementals) into the repository writer; release the view as soon
//!    as that VM's manifest is written.
//!
//! Neither client uses a crate: the QMP crates carry newer schemas whose
//! typed replies do not parse from Debian's QEMU 7.2, and no NBD client
//! crate on crates.io has `NBD_OPT_GO`, structured replies and block
//! status (see the project's platform notes).

mod channel;
pub mod fleece;
pub mod guest_agent;
pub mod histogram;
pub mod nbd;
pub mod qmp;
#[cfg(test)]
pub(crate) mod testing;

pub use vm_lock::VmLock;
pub(crate) mod vm_lock;
