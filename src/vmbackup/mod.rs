//! `backup-vms`: full or incremental backups of several running QEMU VMs
//! from one common snapshot time, busiest first, beside the other
//! disk-copying jobs (`repo::writer` for images, `session::backup` for
//! recovered VMs).
//!
//! 1. *Connect and measure.* QMP to every VM ([`Qmp`](crate::qemu::qmp::Qmp)); its disks from
//!    `query-block` ([`Qmp::guest_disks`](crate::qemu::qmp::Qmp::guest_disks): a disc in a
//!    CD-ROM drive and a drive without a guest device are left out (a floppy
//!    or `removable=on` disk is backed up),
//!    each a warning; a VM without a disk fails alone), each disk's bus
//!    (its guest device's QOM type: virtio, scsi, ide or nvme, which
//!    `recoverfs boot` attaches it to; any other is recorded as virtio
//!    with a warning), a SCSI disk's controller model (the QOM type of
//!    the device owning its bus; one `boot` does not create: a warning),
//!    each disk's serial if set, its memory and vCPUs for the manifest's
//!    configuration; QEMU's NBD server
//!    started on a Unix socket in a private temporary directory (before
//!    any pause, so it costs the guest nothing). Each VM's write rate is
//!    measured over the same window, one thread per VM, and
//!    [`order_by_rate`] orders them busiest first.
//! 2. *Common snapshot time.* `guest-fsfreeze-freeze` in each VM given an
//!    `--agent` (one that does not answer: a warning, and that VM's backup
//!    is crash-consistent, said in the summary); `stop` on every VM; in
//!    each, one point-in-time view per disk ([`fleece::open_view`](crate::qemu::fleece::open_view): dirty
//!    bitmap, copy-before-write store, `snapshot-access`, NBD export); the
//!    snapshot time is recorded once, for all; then `cont` on every VM that
//!    was running and thaw. The pause (stop to cont) is reported per VM. A
//!    VM whose view cannot be opened has its views undone, is resumed, and
//!    fails alone. A VM whose `stop` errs (QEMU answers it only after
//!    draining the guest's I/O, which can outlast the QMP timeout) fails
//!    and gets its `cont` at once. A thaw that fails is retried on a new
//!    agent connection; one that still fails fails the VM ("THE GUEST MAY
//!    STILL BE FROZEN"), as a failed `cont` does ("THE VM IS PAUSED").
//! 3. *Read.* The views are read busiest first, `--jobs` VMs at a time:
//!    `base:allocation` block status skips zero extents, every other chunk
//!    is read over NBD and stored through [`store_chunks`](crate::repo::writer::store_chunks); then one
//!    manifest per VM ([`publish_manifest`](crate::repo::writer::publish_manifest), create-only, written last).
//! 4. *Release early.* A VM's views and NBD server go as soon as its
//!    manifest is written (or it failed), before later VMs are read.
//!
//! **Why busiest first:** while a view is open, every guest write to a
//! block not yet overwritten since the snapshot first copies the old block
//! into the view's copy-before-write store (a temporary file on the host).
//! The VM that writes most grows its store fastest and slows down most, so
//! its view is read and released first.
//!
//! **Consistency:** a VM whose filesystems the guest agent froze is
//! *application-consistent*: every filesystem was flushed and quiesced at
//! the snapshot time. Without an agent the backup is *crash-consistent*:
//! the disks as they were at one instant with the vCPUs stopped, as after a
//! power cut; journaling filesystems and databases recover from it, but
//! data still in the guest's page cache is not in it. All VMs share the
//! one snapshot time either way.
//!
//! **Failures:** a VM that disappears or errors mid-backup has its views
//! torn down (best effort if QEMU is gone) and no manifest: manifests are
//! written last and create-only, so nothing partial appears. The others go
//! on; the summary says which failed. A copy-before-write store that cannot
//! take old data (host disk full or failing) breaks its view's snapshot
//! (`on-cbw-error: break-snapshot`), never the guest's write: the view's
//! reads then fail, and so does that VM's backup.
//!
//! **Signals and kills:** [`backup_vms_until`] ends a run whose `stop` flag
//! is set (the CLI sets it on SIGINT/SIGTERM) through the same cleanup:
//! every VM resumed and thawed, views closed, no manifest. What a killed
//! run leaves in QEMU (exports, nodes, the guest device on the filter, an
//! NBD server without exports) the next run removes before it starts
//! ([`fleece::remove_leftovers`](crate::qemu::fleece::remove_leftovers)).
//!
//! **Incrementals:** every view carries a new dirty bitmap at chunk
//! granularity, started at the snapshot instant, and a successful run
//! keeps it (the manifest's config records it per disk under
//! `backup_vms.bitmaps`, with the node and the QMP socket); older
//! backup-vms bitmaps on the node go. With `--incremental`, `Vm::plan`
//! takes the VM's newest backup as base if QEMU still has each recorded
//! bitmap on the disk's node, still recording (one left disabled misses
//! the writes since), and the geometry (disk count, sizes, chunk size) is
//! the same; otherwise a full read, said in the VM's warnings
//! (`full read: <reason>`), never a guessed incremental. At the snapshot
//! (VM stopped) the base's bitmap is disabled, so it covers exactly the
//! writes from the base's snapshot to this one, and exported read-only on
//! the disk's own node ([`View::map_export`](crate::qemu::fleece::View::map_export): QEMU 7.2 does not find a
//! bitmap through `snapshot-access`). `read_view` reads the chunks that
//! `qemu:dirty-bitmap:NAME` marks and `base:allocation` says hold data;
//! every other chunk keeps the base's id (as `session::backup` does with
//! its dirty maps). A failed incremental re-enables the base's bitmap,
//! merges its new bitmap into it and removes the new one, all in one QMP
//! `transaction` (no guest write can fall between the steps), so the next
//! run still covers every write since the base. If that fails, both
//! bitmaps go and the VM's warnings say so: the next run reads in full
//! (as it does if QEMU is gone, and the bitmaps with it).
//!
//! Names: QEMU limits node names to 31 bytes, so a view's tag is the run
//! id, the VM's position on the command line and the disk index
//! (`<run>-<vm>-<disk>`), not the VM's name.
//!
//! Layout, in the order a run goes:
//! * `options`: what a run is asked to do ([`Options`], [`VmSpec`],
//!   [`GivenBase`]);
//! * `run`: the run across VMs: checks, write rates and the read order,
//!   the common snapshot time, the read queue ([`backup_vms_until`]);
//! * `vm`: one VM's state through a run: connecting (step 1), choosing its
//!   base, failing, releasing its views;
//! * `base`: whether a previous backup or a caller's base can serve as an
//!   incremental's base ([`find_base`], [`check_base`]);
//! * `snapshot`: one VM's QMP and guest agent steps at the common snapshot
//!   time (step 2);
//! * `publish`: reading one VM's views into the repository and writing its
//!   manifest (steps 3 and 4);
//! * `read`: reading one NBD export into chunks (also `backup`'s);
//! * `report`: what a run reports ([`Summary`], [`VmReport`]) and the
//!   clock that records its events.

mod base;
mod options;
mod publish;
pub mod read;
mod report;
mod run;
mod snapshot;
mod vm;

pub use base::{check_base, find_base, recorded_bitmaps};
pub use options::{GivenBase, Hook, Options, ReadOrder, VmSpec};
pub use read::{
    chunks_with_data, dirty_chunks, read_export, read_export_until, Base, Export, ReadOutcome,
    INTERRUPTED,
};
pub use report::{Event, Summary, VmReport};
pub use run::{backup_vms, backup_vms_until, order_by_rate};

#[cfg(test)]
pub(crate) mod tests;
