//! One VM's state through a run ([`Vm`]): connecting to it, its disks and
//! NBD server (step 1), choosing its base, and the way out: failing alone
//! and releasing its views, bitmaps and server. The steps that follow
//! (`snapshot`, `publish`) act on this state; the run holds one per VM.

use std::path::PathBuf;
use std::time::Instant;

use super::base::{check_base, find_base, Prev};
use super::options::{GivenBase, VmSpec};
use super::report::{Clock, VmReport};
use crate::boot::{known_scsi_controller, VIRTIO_SCSI};
use crate::error::{Error, Result};
use crate::qemu::fleece::{self, View};
use crate::qemu::guest_agent::GuestAgent;
use crate::qemu::qmp::{BlockDevice, MachineSize, QemuIdentity, Qmp};
use crate::repo::Repository;

/// One VM's state through a run.
pub(super) struct Vm {
    pub(super) index: usize,
    pub(super) spec: VmSpec,
    pub(super) report: VmReport,
    qmp: Option<Qmp>,
    pub(super) disks: Vec<BlockDevice>,
    pub(super) dir: Option<tempfile::TempDir>,
    /// [`fleece::RUN_LOCK`] in `dir`, held while `dir` is.
    run_lock: Option<std::fs::File>,
    /// Held from connecting until the views are released: another run on
    /// this VM would take over our NBD server.
    vm_lock: Option<crate::qemu::VmLock>,
    nbd_started: bool,
    pub(super) views: Vec<View>,
    pub(super) was_running: bool,
    pub(super) stopped_at: Option<Instant>,
    pub(super) agent: Option<GuestAgent>,
    /// An incremental's base and its dirty bitmap per disk.
    pub(super) prev: Option<Prev>,
    /// Previous bitmaps disabled at the snapshot (disks 0..n).
    pub(super) prev_disabled: usize,
    /// Who its QEMU says it is, recorded in the manifest.
    pub(super) identity: QemuIdentity,
    /// Its memory and vCPUs, recorded in the manifest's configuration
    /// (none: QEMU did not say, the defaults are recorded).
    pub(super) machine: Option<MachineSize>,
}

impl Vm {
    pub(super) fn new(index: usize, spec: VmSpec) -> Vm {
        Vm {
            index,
            report: VmReport {
                vm: spec.name.clone(),
                qmp: spec.qmp.clone(),
                consistency: "crash-consistent".into(),
                mode: "full".into(),
                ..Default::default()
            },
            spec,
            qmp: None,
            disks: vec![],
            dir: None,
            run_lock: None,
            vm_lock: None,
            nbd_started: false,
            views: vec![],
            was_running: false,
            stopped_at: None,
            agent: None,
            prev: None,
            prev_disabled: 0,
            identity: QemuIdentity::default(),
            machine: None,
        }
    }

    pub(super) fn ok(&self) -> bool {
        self.report.error.is_none()
    }

    pub(super) fn q(&mut self) -> Result<&mut Qmp> {
        self.qmp
            .as_mut()
            .ok_or_else(|| Error::invalid("no QMP connection"))
    }

    pub(super) fn socket(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join("nbd.sock"))
            .unwrap_or_default()
    }

    /// Step 1: connect, list the disks, start the NBD server.
    pub(super) fn prepare(&mut self) -> Result<()> {
        let q = Qmp::connect(&self.spec.qmp)?;
        self.vm_lock = crate::qemu::VmLock::try_take(&q)?;
        self.qmp = Some(q);
        self.identity = self.q()?.identity()?;
        match self.q()?.machine_size() {
            Ok(m) => self.machine = Some(m),
            Err(e) => {
                let w = format!(
                    "memory and vCPUs not read from QEMU ({e}): the backup's configuration \
                     records the defaults (512 MiB, 1 vCPU)"
                );
                tracing::warn!(vm = %self.spec.name, "{w}");
                self.report.warnings.push(w);
            }
        }
        // First: a leftover view holds a guest device.
        let left = fleece::remove_leftovers(self.q()?)
            .map_err(|e| e.context("removing what a killed backup left in QEMU"))?;
        if !left.is_empty() {
            let w = format!("removed what a killed backup left: {}", left.join(", "));
            tracing::warn!(vm = %self.spec.name, "{w}");
            self.report.warnings.push(w);
        }
        let (disks, skipped) = self.q()?.guest_disks()?;
        if disks.is_empty() {
            let mut e = "QEMU reports no disk to back up".to_string();
            if !skipped.is_empty() {
                e = format!("{e} ({})", skipped.join("; "));
            }
            return Err(Error::invalid(e));
        }
        for w in skipped {
            tracing::warn!(vm = %self.spec.name, "{w}");
            self.report.warnings.push(w);
        }
        // Each disk's bus is recorded (`publish`) for `recoverfs boot`;
        // one it cannot attach the same way is recorded as virtio.
        for (i, d) in disks.iter().enumerate() {
            if d.bus().is_some() {
                continue;
            }
            let what = match d.device_type.as_str() {
                "" => "a device QEMU did not name the type of".to_string(),
                t => format!("a {t} device"),
            };
            let w = format!(
                "disk {i} ({what}, {}) is recorded on bus virtio: recoverfs boot attaches \
                 virtio, scsi, ide and nvme disks only",
                d.qdev
            );
            tracing::warn!(vm = %self.spec.name, "{w}");
            self.report.warnings.push(w);
        }
        // A SCSI disk's controller model is recorded too; `boot` creates a
        // model it does not know as virtio-scsi.
        for (i, d) in disks.iter().enumerate() {
            let m = d.controller.as_str();
            if d.bus() != Some("scsi") || m.is_empty() || known_scsi_controller(m).is_some() {
                continue;
            }
            let w = format!(
                "disk {i} ({}) is on a SCSI controller of model {m}, which recoverfs boot does not create: a recovered VM gets it on {VIRTIO_SCSI}",
                d.qdev
            );
            tracing::warn!(vm = %self.spec.name, "{w}");
            self.report.warnings.push(w);
        }
        self.disks = disks;
        self.report.disks = self.disks.len();
        // Its owner named, so that once a kill leaves it (with its stores,
        // which can be large) the next run of any VM's backup, a boot or a
        // pre-copy removes it; QEMU may still hold a store open, which the
        // next backup of that VM detaches (`fleece::remove_leftovers`).
        crate::boot::remove_stale_scratch(&std::env::temp_dir());
        let dir = crate::boot::scratch_dir("vmbackup")?;
        // Held while the views may be in use: not leftovers to a run of
        // this VM that starts meanwhile.
        let lock = crate::util::try_lock_file(&dir.path().join(fleece::RUN_LOCK))?;
        self.run_lock = Some(lock.ok_or_else(|| Error::busy("a new run lock is held"))?);
        self.dir = Some(dir);
        let sock = self.socket();
        if let Err(e) = fleece::start_nbd_server(self.q()?, &sock) {
            // A server without an NBD export serves nobody (a killed
            // run's, or one started and never used): replaced.
            let exports = self.q()?.execute("query-block-exports", None)?;
            let nbd = (exports.as_array().into_iter().flatten()).any(|x| x["type"] == "nbd");
            if nbd {
                return Err(e);
            }
            fleece::stop_nbd_server(self.q()?)?;
            fleece::start_nbd_server(self.q()?, &sock)?;
            let w = format!("replaced QEMU's NBD server, which had no export ({e})");
            tracing::warn!(vm = %self.spec.name, "{w}");
            self.report.warnings.push(w);
        }
        self.nbd_started = true;
        Ok(())
    }

    /// Refuses a QEMU that is surely not the one the VM's newest backup
    /// was taken from (another UUID, or without UUIDs another name): a
    /// wrong or swapped `--vm` socket would otherwise publish one VM's
    /// disks under another's name. `--new-identity` accepts it (a VM
    /// re-created), with a warning. A newest backup that does not read,
    /// or records no identity, is no evidence either way.
    pub(super) fn check_identity(&mut self, repo: &Repository) -> Result<()> {
        if self.identity.is_empty() {
            return Ok(());
        }
        let vm = &self.spec.name;
        let newest = match repo.backup_ids(vm) {
            Ok(ids) => ids.last().cloned(),
            Err(e) => return Err(e.context("listing previous backups")),
        };
        let Some(id) = newest else { return Ok(()) };
        let recorded = match repo.manifest(vm, &id) {
            Ok(m) => m.config["backup_vms"]["qemu"].clone(),
            Err(e) => {
                let w = format!("QEMU's identity not checked: backup {id} does not read ({e})");
                tracing::warn!(vm = %vm, "{w}");
                self.report.warnings.push(w);
                return Ok(());
            }
        };
        let Ok(was) = serde_json::from_value::<QemuIdentity>(recorded) else {
            return Ok(());
        };
        if !self.identity.differs_from(&was) {
            return Ok(());
        }
        let what = format!(
            "QMP socket {} answers for a QEMU with {}, but backup {id} of VM {vm} was taken from one with {was}",
            crate::api::pathauth::shown(&self.spec.qmp).display(),
            self.identity
        );
        if !self.spec.new_identity {
            return Err(Error::invalid(format!(
                "{what}: is it another VM's socket? If VM {vm} was re-created, pass --new-identity {vm} (pre-copy: take one `backup-vms --new-identity {vm}` first)"
            )));
        }
        tracing::warn!(vm = %vm, "{what} (--new-identity)");
        self.report
            .warnings
            .push(format!("{what} (--new-identity)"));
        Ok(())
    }

    /// `--incremental`: the newest backup is the base if its recorded
    /// bitmaps are still in QEMU on the same nodes, recording, and its
    /// geometry is the disks'; otherwise a full read, said in the warnings.
    pub(super) fn plan(&mut self, repo: &Repository, chunk_size: u32) {
        match self.find_base(repo, chunk_size) {
            Ok(p) => {
                self.report.mode = "incremental".into();
                self.report.base = Some(p.manifest.id.clone());
                self.prev = Some(p);
            }
            Err(why) => {
                tracing::warn!(vm = %self.spec.name, "full read: {why}");
                self.report.warnings.push(format!("full read: {why}"));
            }
        }
    }

    /// A caller's base ([`GivenBase`]): checked like a backup's; an error
    /// fails the VM rather than reading in full behind the caller's back.
    pub(super) fn use_base(&mut self, given: &GivenBase, chunk_size: u32) -> Result<()> {
        let what = format!("the {} base", given.mode);
        let disks = self.disks.clone();
        check_base(
            self.q()?,
            &disks,
            &what,
            &given.manifest.disks,
            &given.bitmaps,
            chunk_size,
        )
        .map_err(Error::invalid)?;
        self.report.mode = given.mode.clone();
        self.report.base = given.base.clone();
        self.prev = Some(Prev {
            manifest: given.manifest.clone(),
            bitmaps: given.bitmaps.clone(),
        });
        Ok(())
    }

    fn find_base(
        &mut self,
        repo: &Repository,
        chunk_size: u32,
    ) -> std::result::Result<Prev, String> {
        let (vm, disks) = (self.spec.name.clone(), self.disks.clone());
        let q = self.q().map_err(|e| e.to_string())?;
        let (manifest, bitmaps) = find_base(q, repo, &vm, &disks, chunk_size)?;
        Ok(Prev { manifest, bitmaps })
    }

    /// Records `e` as this VM's error (the first one counts) and tears its
    /// views down.
    pub(super) fn fail(&mut self, clock: &Clock, e: Error) {
        tracing::warn!(vm = %self.spec.name, "backup failed: {e}");
        self.report.error.get_or_insert(e.to_string());
        clock.event(&mut self.report, "failed", None);
        self.release(clock);
    }

    /// [`Self::fail`], or adds `e` to the error of a VM that failed
    /// already: what it says (a VM left paused or frozen) must not go
    /// unsaid.
    pub(super) fn fail_or_add(&mut self, clock: &Clock, e: Error) {
        match &mut self.report.error {
            Some(first) => {
                tracing::error!(vm = %self.spec.name, "{e}");
                *first = format!("{first}; {e}");
            }
            None => self.fail(clock, e),
        }
    }

    /// Closes the views and stops the NBD server, best effort. After a
    /// manifest, each disk keeps the new bitmap alone (the next
    /// incremental's map); after a failure the new bitmap goes, merged into
    /// the previous one (re-enabled in the same transaction) for an
    /// incremental, or both go with a warning if that fails.
    pub(super) fn release(&mut self, clock: &Clock) {
        let had = !self.views.is_empty() || self.nbd_started;
        let ok = self.ok();
        let views = std::mem::take(&mut self.views);
        self.report.cbw_bytes = views.iter().map(View::cbw_bytes).sum();
        let disabled = std::mem::take(&mut self.prev_disabled);
        if let Some(q) = self.qmp.as_mut() {
            let merge = !ok && self.prev.is_some();
            for v in views.iter().rev() {
                if let Err(e) = fleece::close_view(q, v, !ok && !merge) {
                    tracing::warn!(vm = %self.spec.name, node = %v.node, "closing a view: {e}");
                }
            }
            if ok {
                // Older backup-vms bitmaps (the base's) are done with.
                let nodes = fleece::nodes(q).unwrap_or_default();
                for v in &views {
                    let Some(n) = nodes.iter().find(|n| n.name == v.node) else {
                        continue;
                    };
                    for b in (n.bitmaps.iter().map(|b| &b.name))
                        .filter(|b| b.starts_with("rfs-") && **b != v.bitmap)
                    {
                        if let Err(e) = fleece::bitmap_op(q, "remove", &v.node, b) {
                            tracing::warn!(vm = %self.spec.name, "removing dirty bitmap {b}: {e}");
                        }
                    }
                }
            } else if let Some(p) = &self.prev {
                // The base's bitmap must cover everything since the base.
                for (i, prev) in p.bitmaps.iter().enumerate().take(disabled) {
                    let node = &self.disks[i].node_name;
                    let new = views.get(i).map(|v| v.bitmap.as_str());
                    let Err(e) = fleece::bitmap_hand_back(q, node, prev, new) else {
                        continue;
                    };
                    // A disabled bitmap left behind would vouch for less
                    // than it claims: without it the next one reads in full.
                    for b in std::iter::once(prev.as_str()).chain(new) {
                        if let Err(e) = fleece::bitmap_op(q, "remove", node, b) {
                            tracing::warn!(vm = %self.spec.name, "removing dirty bitmap {b}: {e}");
                        }
                    }
                    let w = format!(
                        "disk {i}: the failed run's dirty bitmap could not be handed back \
                         to {prev} ({e}); the next incremental reads in full"
                    );
                    tracing::warn!(vm = %self.spec.name, "{w}");
                    self.report.warnings.push(w);
                }
                for v in views.iter().skip(disabled) {
                    let _ = fleece::bitmap_op(q, "remove", &v.node, &v.bitmap);
                }
            }
            if self.nbd_started {
                if let Err(e) = fleece::stop_nbd_server(q) {
                    tracing::warn!(vm = %self.spec.name, "stopping the NBD server: {e}");
                }
            }
        }
        self.nbd_started = false;
        // The copy-before-write files and the socket go with the directory.
        self.dir = None;
        self.run_lock = None;
        self.vm_lock = None;
        if had {
            clock.event(&mut self.report, "view_released", None);
        }
    }
}
