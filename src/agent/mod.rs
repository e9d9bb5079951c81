//! Granular backup and restore through an agent that runs inside the
//! running guest, shipped in one **storage container** (issue 15).
//!
//! ```text
//!  recoverfs agent build ──mke2fs -d──▶ agent.img (static recoverfs, agent.json, hooks/NAME/{pre,post})
//!
//!  agent-backup --vm NAME=QMP[,qga=QGA] --paths P...        (per VM, --jobs at a time)
//!    guest agent: sync (no answer: one clear error, nothing attached)
//!    QMP: chardev-add (Unix socket; we connect) ─▶ device_add virtserialport
//!         blockdev-add agent.img read-only ─▶ device_add scsi-hd (virtio-scsi)      [attach]
//!    guest-exec sh: wait for disk + port, mount -o ro, `recoverfs agent run`, umount
//!         agent: hooks pre ─▶ copy (reflink/plain) ─▶ hooks post ─▶ H/D frames from the copy ─▶ E
//!    host: frames ─▶ content-defined chunks ─▶ chunk store (dedup) ; ack ; exit status
//!    QMP: device_del ─▶ DEVICE_DELETED ─▶ blockdev-del / chardev-remove (always)    [detach]
//!    catalog files/<vm>/<id>-files.json, sealed, create-only, last
//! ```
//!
//! * [`container`]: builds the image; `agent.json`; finds the static binary.
//! * [`attach`]: the QMP steps, undone newest first on every path.
//! * [`exec`]: `guest-exec` / `guest-exec-status`.
//! * [`stream`]: the frame protocol (bounded, checksummed, truncation-proof).
//! * [`guest`]: the agent itself (`recoverfs agent run`, in the guest), and
//!   the consistent copy it takes while the application is quiesced.
//! * [`backup`]: the host side of `agent-backup`.
//!
//! Restores of single files from file backups (and from disk backups,
//! loop-mounted from a throwaway recovery) are in [`crate::files`].

pub mod attach;
pub mod backup;
pub mod container;
pub mod exec;
pub mod guest;
pub mod restore;
pub mod session;
pub mod stream;
