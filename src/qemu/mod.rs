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

/// A lock on one running QEMU process, held by a job that changes its
/// block graph (`backup-vms`): two runs on one VM would take each other's
/// NBD server. Keyed on the process behind the QMP socket (`SO_PEERCRED`
/// and its start time, so a reused pid is another VM), so two monitors of
/// one VM meet at the same lock. The file stays (0 bytes, one per QEMU
/// process ever backed up, in `/run/lock`, which boot empties): removing
/// it would race a run opening it.
pub struct VmLock {
    _file: std::fs::File,
}

impl VmLock {
    /// `Busy` if another job holds the VM; `None` when the socket's peer is
    /// unknown (no lock to take).
    pub fn try_take(q: &qmp::Qmp) -> crate::error::Result<Option<VmLock>> {
        let Some(pid) = q.peer_pid() else {
            return Ok(None);
        };
        let Some(started) = process_start(pid) else {
            return Ok(None);
        };
        let path = lock_dir().join(format!("recoverfs-qemu-{pid}-{started}.lock"));
        match crate::util::try_lock_file(&path)? {
            Some(f) => Ok(Some(VmLock { _file: f })),
            None => Err(crate::error::Error::busy(format!(
                "another recoverfs job is changing this VM's block devices (QEMU process {pid} \
                 behind {}; lock {}): wait for it to finish",
                q.path().display(),
                path.display()
            ))),
        }
    }
}

/// `/run/lock` where it exists (every Debian host), else the temporary
/// directory.
fn lock_dir() -> std::path::PathBuf {
    let run = std::path::Path::new("/run/lock");
    if run.is_dir() {
        run.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat`
/// field 22).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}
