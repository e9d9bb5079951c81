//! One VM's read and manifest (steps 3 and 4): every view read over NBD
//! into the repository (in full, or what its base's bitmap marks), then
//! its manifest, create-only and last, then its views released. Apart
//! from the snapshot steps: this runs on the read workers, `--jobs` VMs
//! at a time.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::options::Options;
use super::read::{read_export_until, Base, Export};
use super::report::Clock;
use super::vm::Vm;
use crate::boot::NbdServer;
use crate::error::Result;
use crate::repo::locks::WriterLock;
use crate::repo::writer::{default_config, publish_manifest};
use crate::repo::Repository;

impl Vm {
    /// Step 3: reads every view, publishes the manifest, releases.
    pub(super) fn read(
        &mut self,
        clock: &Clock,
        repo: &Arc<Repository>,
        lock: &WriterLock,
        opts: &Options,
        snapshot: &str,
        stop: &AtomicBool,
    ) {
        clock.event(&mut self.report, "read_started", None);
        let t0 = Instant::now();
        match self.store(repo, lock, opts, snapshot, stop) {
            Ok(id) => {
                self.report.backup = Some(id);
                self.report.read_ms = t0.elapsed().as_secs_f64() * 1000.0;
                clock.event(&mut self.report, "manifest_written", None);
                self.release(clock);
            }
            Err(e) => {
                // Say so when the VM is gone, not just what broke first.
                let e = match self.q().and_then(|q| q.status()) {
                    // QEMU breaks a view's snapshot (every read fails) when
                    // its copy-before-write store cannot take the old data
                    // a guest write displaces, rather than fail the write.
                    Ok(_) if e.to_string().contains(crate::qemu::nbd::SERVER_FAILED) => e.context(
                        "QEMU could not read the snapshot (broken if a copy-before-write store \
                         failed: is the host's temporary directory full or failing?)",
                    ),
                    Ok(_) => e,
                    Err(_) => e.context("the VM's QEMU is gone"),
                };
                self.fail(clock, e)
            }
        }
    }

    fn store(
        &mut self,
        repo: &Arc<Repository>,
        lock: &WriterLock,
        opts: &Options,
        snapshot: &str,
        stop: &AtomicBool,
    ) -> Result<String> {
        let socket = self.socket();
        let mut disks = vec![];
        for (i, v) in self.views.iter().enumerate() {
            let base = self
                .prev
                .as_ref()
                .map(|p| (p.bitmaps[i].as_str(), &p.manifest.disks[i]));
            let export = |name: String| Export {
                server: NbdServer::Unix(socket.clone()),
                name,
            };
            let base = base.map(|(bitmap, disk)| Base {
                map: export(v.map_export()),
                bitmap,
                disk,
            });
            let r = read_export_until(
                repo,
                &export(v.export.clone()),
                i,
                opts.chunk_size,
                base,
                stop,
            )
            .map_err(|e| e.context(format!("disk {i}")))?;
            self.report.bytes_read += r.read_bytes;
            self.report.chunks_read += r.chunks_read;
            self.report.new_bytes += r.disk.new_bytes;
            disks.push(r.disk);
        }
        let mut config = default_config(&self.spec.name, disks.len());
        // The bus the guest finds each disk on, which `recoverfs boot`
        // attaches it to (a guest whose root disk moves from IDE or SCSI
        // to virtio may not find it).
        // A SCSI disk's controller model, which `boot` creates for it (a
        // guest without the driver of another does not see the disk), and
        // each disk's serial (its `/dev/disk/by-id` name, Windows' disk id).
        for (c, d) in (config["disks"].as_array_mut().into_iter().flatten()).zip(&self.disks) {
            c["bus"] = d.bus().unwrap_or("virtio").into();
            if d.bus() == Some("scsi") && !d.controller.is_empty() {
                c["controller"] = d.controller.clone().into();
            }
            if !d.serial.is_empty() {
                c["serial"] = d.serial.clone().into();
            }
        }
        // What `recoverfs boot` gives the recovered VM (`-m memory_mib`).
        if let Some(m) = self.machine {
            config["memory_mib"] = m.memory_mib.into();
            config["vcpus"] = m.vcpus.into();
        }
        let qmp = crate::api::pathauth::shown(&self.spec.qmp);
        config["backup_vms"] = serde_json::json!({
            "snapshot_time": snapshot,
            "consistency": self.report.consistency,
            "devices": self.disks.iter().map(|d| &d.qdev).collect::<Vec<_>>(),
            "mode": self.report.mode,
            "base": self.report.base,
            // Absolute: a relative path says nothing once the run is over.
            "qmp": std::fs::canonicalize(&qmp)
                .or_else(|_| std::path::absolute(&qmp))
                .unwrap_or(qmp),
            // Checked at the next backup of this name (`Vm::check_identity`).
            "qemu": self.identity,
            // The next incremental's maps, kept in QEMU.
            "bitmaps": self.views.iter()
                .map(|v| serde_json::json!({"node": v.node, "bitmap": v.bitmap}))
                .collect::<Vec<_>>(),
        });
        // A caller's chunks (a pre-copy's) are kept by its own lock.
        let _vouched = match self.spec.base.as_ref().and_then(|b| b.vouched_by.as_ref()) {
            Some(l) => Some(
                l.hold()
                    .map_err(|e| e.context("the lock that kept the pre-copied chunks from gc"))?,
            ),
            None => None,
        };
        Ok(publish_manifest(repo, lock, &self.spec.name, config, disks)?.id)
    }
}
