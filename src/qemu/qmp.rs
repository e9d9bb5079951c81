//! A QMP client: JSON lines over a QEMU monitor's Unix socket (QEMU started
//! with `-qmp unix:PATH,server=on,wait=off`, or `recoverfs boot --qmp PATH`).
//!
//! Our own, small and untyped where QEMU 7.2's schema matters: the QMP
//! crates carry QEMU 9.x schemas whose typed replies do not parse from
//! Debian's 7.2. Commands go out one at a time with an `id`; the reply with
//! that id ends the call; events that arrive meanwhile are kept for
//! [`Qmp::take_events`]. Every read has a deadline and every line a size
//! bound, so a QEMU that hangs or a socket that is not QMP ends in a
//! one-line error, never a hang or an unbounded allocation.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::channel::{short, Channel};
use crate::error::Result;

/// How long one command may take unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Qmp::connect`] waits for the greeting (or the caller's
/// timeout, if shorter). QEMU greets a new client at once, from its main
/// loop; a socket that accepts and stays silent is not a free QMP monitor:
/// another chardev (a serial port, a guest agent's), a monitor that
/// already has a client (QEMU serves one at a time; the next waits
/// unanswered until it leaves), or a QEMU whose main loop hangs. Waiting a
/// command's 30 s for it only delays the one-line error.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Qmp {
    ch: Channel,
    timeout: Duration,
    next_id: u64,
    events: Vec<Value>,
    version: (u64, u64, u64),
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunState {
    pub running: bool,
    /// QEMU's run state: `running`, `paused`, `prelaunch`, `shutdown`, ...
    pub status: String,
}

/// A QEMU's own name and UUID (`-name`, `-uuid`), each `None` if not set
/// (QEMU answers an all-zero UUID then).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct QemuIdentity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

impl QemuIdentity {
    pub fn is_empty(&self) -> bool {
        self.name.is_none() && self.uuid.is_none()
    }

    /// Whether `self` and `other` are surely different QEMUs' identities:
    /// UUIDs decide where both have one, else names where both have one.
    pub fn differs_from(&self, other: &QemuIdentity) -> bool {
        match (&self.uuid, &other.uuid, &self.name, &other.name) {
            (Some(a), Some(b), _, _) => !a.eq_ignore_ascii_case(b),
            (_, _, Some(a), Some(b)) => a != b,
            _ => false,
        }
    }
}

impl std::fmt::Display for QemuIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.uuid, &self.name) {
            (Some(u), Some(n)) => write!(f, "uuid {u}, name {n:?}"),
            (Some(u), None) => write!(f, "uuid {u}"),
            (None, Some(n)) => write!(f, "name {n:?}"),
            (None, None) => write!(f, "no uuid or name"),
        }
    }
}

/// One drive of `query-block` that has a medium.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDevice {
    /// The drive's id (`-drive id=`), empty for `-blockdev` disks.
    pub device: String,
    /// The guest device's QOM path (`/machine/peripheral/vd0/...`).
    pub qdev: String,
    /// The top node the device reads and writes.
    pub node_name: String,
    /// The image file QEMU opened (`inserted.file`).
    pub file: String,
    pub read_only: bool,
    /// The guest device's QOM type (`virtio-blk-device`, `scsi-hd`,
    /// `ide-hd`, `nvme`, `floppy`; for a SCSI disk of a USB storage device,
    /// that device's, `usb-storage`), empty if QEMU did not say.
    pub device_type: String,
    /// For a SCSI disk, its controller's QOM type (the device owning its
    /// bus: `lsi53c895a`, `megasas`, `pvscsi`, `virtio-scsi-pci`, ...;
    /// for virtio, the PCI device, not its `virtio-scsi-device`), which
    /// `recoverfs boot` creates for it; empty otherwise or if QEMU did not
    /// say.
    pub controller: String,
    /// The guest device's `serial` property (what `/dev/disk/by-id` and
    /// Windows name the disk by), empty if not set or QEMU did not say.
    pub serial: String,
}

impl BlockDevice {
    /// The bus the guest finds this disk on, as a backup's configuration
    /// records it and `recoverfs boot` attaches it: `virtio`, `scsi`,
    /// `ide` or `nvme`; `None` for any other device (a floppy, a USB
    /// disk) or one QEMU did not name.
    pub fn bus(&self) -> Option<&'static str> {
        let t = self.device_type.as_str();
        match t {
            _ if t.starts_with("virtio-blk") => Some("virtio"),
            "scsi-hd" | "scsi-disk" | "scsi-block" => Some("scsi"),
            "ide-hd" | "ide-drive" => Some("ide"),
            "nvme" | "nvme-ns" => Some("nvme"),
            _ => None,
        }
    }
}

/// A guest's memory and vCPU count ([`Qmp::machine_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MachineSize {
    pub memory_mib: u64,
    pub vcpus: usize,
}

/// Byte and operation counters of one drive (`query-blockstats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct BlockStats {
    pub device: String,
    pub qdev: String,
    pub node_name: String,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    /// Nanoseconds requests spent in flight, summed (their mean latency
    /// and, over wall time, the queue depth follow).
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
}

impl Qmp {
    /// Connects, reads the greeting (within [`GREETING_TIMEOUT`]) and
    /// leaves capabilities negotiation.
    pub fn connect(path: &Path) -> Result<Qmp> {
        Self::connect_with(path, DEFAULT_TIMEOUT)
    }

    /// [`Self::connect`] whose commands may take `timeout`; the greeting
    /// is waited for [`GREETING_TIMEOUT`] at most.
    pub fn connect_with(path: &Path, timeout: Duration) -> Result<Qmp> {
        let hint = format!(
            "is QEMU running with -qmp unix:{},server=on,wait=off?",
            crate::api::pathauth::shown(path).display()
        );
        let mut q = Qmp {
            ch: Channel::connect("QMP socket", path, &hint)?,
            timeout,
            next_id: 1,
            events: vec![],
            version: (0, 0, 0),
        };
        let wait = timeout.min(GREETING_TIMEOUT);
        let greeting =
            q.ch.read_message_in_time(Instant::now() + wait, "the QMP greeting")?
                .ok_or_else(|| {
                    crate::error::Error::new(
                        crate::error::ErrorKind::Io,
                        format!(
                            "{} answered no QMP greeting within {} s: is it the VM's QMP monitor \
                             socket (QEMU greets at once), with no other client (libvirt, another \
                             recoverfs job) connected to it?",
                            q.ch.path().display(),
                            wait.as_secs_f64()
                        ),
                    )
                })?;
        let v = greeting
            .get("QMP")
            .and_then(|g| g.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| {
                q.ch.protocol_error(format!("no QMP greeting, got {}", short(&greeting)))
            })?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        q.version = (n("major"), n("minor"), n("micro"));
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// QEMU's process id (the QMP socket's peer), if the kernel knows it.
    /// The socket this connection went to.
    pub fn path(&self) -> &Path {
        self.ch.path()
    }

    pub fn peer_pid(&self) -> Option<u32> {
        self.ch.peer_pid()
    }

    /// Sends one command and returns its `return` value. A QMP error reply
    /// is an error naming the command and QEMU's class and description;
    /// the connection stays usable.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_with(command, arguments, self.timeout)
    }

    pub fn execute_with(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        self.ch.send(&msg, command)?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.ch.read_message(deadline, command)?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to a command whose caller gave up (timed out).
                continue;
            }
            return self.ch.reply(command, &m, "QEMU");
        }
    }

    /// Events received so far (oldest first), emptied.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    pub fn status(&mut self) -> Result<RunState> {
        let r = self.execute("query-status", None)?;
        Ok(RunState {
            running: r.get("running").and_then(Value::as_bool).unwrap_or(false),
            status: str_of(&r, "status"),
        })
    }

    /// Pauses the guest's vCPUs (`stop`).
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes the guest's vCPUs (`cont`).
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", None).map(drop)
    }

    /// Who this QEMU says it is: its `-name` and `-uuid`, each if set.
    pub fn identity(&mut self) -> Result<QemuIdentity> {
        let name = self.execute("query-name", None)?;
        let uuid = self.execute("query-uuid", None)?;
        Ok(QemuIdentity {
            name: name["name"].as_str().map(str::to_string),
            uuid: uuid["UUID"]
                .as_str()
                .filter(|u| u.chars().any(|c| c != '0' && c != '-'))
                .map(str::to_string),
        })
    }

    /// The guest's disks, in QEMU's order: [`Self::guest_disks`] without
    /// the drives it leaves out.
    pub fn block_devices(&mut self) -> Result<Vec<BlockDevice>> {
        Ok(self.guest_disks()?.0)
    }

    /// The drives of `query-block` that have a medium and are the guest's
    /// disks, in QEMU's order, and one line for each other drive with a
    /// medium, naming it and why it is not one: a drive without a guest
    /// device (`-drive if=none` that no `-device` uses; the guest does not
    /// see it, and a view cannot be put under a device that is not there)
    /// or a removable medium (a CD-ROM's or floppy's image, read-only to
    /// the guest and swapped at will: not part of the VM's disks).
    pub fn guest_disks(&mut self) -> Result<(Vec<BlockDevice>, Vec<String>)> {
        let r = self.execute("query-block", None)?;
        let list = r.as_array().ok_or_else(|| {
            self.ch
                .protocol_error("query-block did not return a list".into())
        })?;
        let (mut disks, mut skipped) = (vec![], vec![]);
        for d in list {
            let Some(ins) = d.get("inserted") else {
                continue; // an empty drive (a CD-ROM without a disc)
            };
            let mut dev = BlockDevice {
                device: str_of(d, "device"),
                qdev: str_of(d, "qdev"),
                node_name: str_of(ins, "node-name"),
                file: str_of(ins, "file"),
                read_only: ins.get("ro").and_then(Value::as_bool).unwrap_or(false),
                device_type: String::new(),
                controller: String::new(),
                serial: String::new(),
            };
            let name = match (dev.device.as_str(), dev.node_name.as_str()) {
                ("", node) => format!("node {node}"),
                (drive, _) => format!("drive {drive}"),
            };
            if dev.qdev.is_empty() {
                skipped.push(format!(
                    "{name} ({}) has no guest device: not backed up",
                    dev.file
                ));
                continue;
            }
            (dev.device_type, dev.controller) = self.device_type(&dev.qdev);
            dev.serial = self.qom_get(&dev.qdev, "serial").unwrap_or_default();
            if d.get("removable").and_then(Value::as_bool) == Some(true) {
                // Its device's type (`ide-cd`, `scsi-cd`, `floppy`) names it.
                let kind = match dev.device_type.as_str() {
                    "" => "removable",
                    t => t,
                };
                // A disc is media, not the VM's data; any other removable
                // disk (a floppy, `removable=on`) may hold the guest's
                // data: kept, read-only or not.
                if kind.ends_with("-cd") {
                    skipped.push(format!(
                        "{name} ({kind} {}) holds a removable medium ({}): not backed up",
                        dev.qdev, dev.file
                    ));
                    continue;
                }
            }
            disks.push(dev);
        }
        Ok((disks, skipped))
    }

    /// A string property of the QOM object at `path`, if QEMU gives one.
    fn qom_get(&mut self, path: &str, property: &str) -> Option<String> {
        self.execute("qom-get", Some(json!({"path": path, "property": property})))
            .ok()
            .and_then(|t| t.as_str().map(str::to_string))
    }

    /// [`BlockDevice::device_type`] and [`BlockDevice::controller`] of the
    /// guest device at QOM path `qdev` (empty if QEMU does not say): its
    /// `type`, or for a SCSI disk whose bus belongs to a USB device
    /// (`usb-storage`, `usb-bot`, `usb-uas`), that device's type: the guest
    /// sees a USB disk. (A `scsi-cd` stays one, on USB too: a disc, left
    /// out by [`Self::guest_disks`].) A SCSI disk's controller is the
    /// device owning its bus; a virtio one's `virtio-scsi-device` is named
    /// by its proxy (`virtio-scsi-pci`), the device on the command line.
    fn device_type(&mut self, qdev: &str) -> (String, String) {
        let Some(t) = self.qom_get(qdev, "type") else {
            return (String::new(), String::new());
        };
        if !matches!(t.as_str(), "scsi-hd" | "scsi-disk" | "scsi-block") {
            return (t, String::new());
        }
        // `/machine/peripheral-anon/device[4]/scsi.0`: the bus, then its device.
        let Some(owner) = self
            .qom_get(qdev, "parent_bus")
            .and_then(|bus| bus.rsplit_once('/').map(|(o, _)| o.to_string()))
        else {
            return (t, String::new());
        };
        let Some(mut model) = self.qom_get(&owner, "type") else {
            return (t, String::new());
        };
        if model.starts_with("usb-") {
            return (model, String::new());
        }
        // `/machine/peripheral/vs/virtio-backend`: its proxy is the parent.
        if model.starts_with("virtio-") && model.ends_with("-device") {
            let proxy = owner.rsplit_once('/').map(|(p, _)| p.to_string());
            model = proxy
                .and_then(|p| self.qom_get(&p, "type"))
                .unwrap_or_default();
        }
        (t, model)
    }

    /// The guest's memory and vCPUs: `query-memory-size-summary`'s base
    /// memory (QEMU's `-m`) and `query-cpus-fast`'s count.
    pub fn machine_size(&mut self) -> Result<MachineSize> {
        let m = self.execute("query-memory-size-summary", None)?;
        let base = m
            .get("base-memory")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                self.ch.protocol_error(format!(
                    "query-memory-size-summary gave no base-memory: {}",
                    short(&m)
                ))
            })?;
        let cpus = self.execute("query-cpus-fast", None)?;
        let vcpus = cpus.as_array().map(Vec::len).ok_or_else(|| {
            self.ch
                .protocol_error("query-cpus-fast did not return a list".into())
        })?;
        Ok(MachineSize {
            memory_mib: base.div_ceil(1 << 20),
            vcpus,
        })
    }

    /// Counters of every drive.
    pub fn block_stats(&mut self) -> Result<Vec<BlockStats>> {
        let r = self.execute("query-blockstats", None)?;
        self.block_stats_of(&r)
    }

    /// [`Self::block_stats`] from a `query-blockstats` reply already read.
    pub fn block_stats_of(&self, r: &Value) -> Result<Vec<BlockStats>> {
        let list = r.as_array().ok_or_else(|| {
            self.ch
                .protocol_error("query-blockstats did not return a list".into())
        })?;
        Ok(list
            .iter()
            .map(|d| {
                let s = d.get("stats").cloned().unwrap_or(Value::Null);
                let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
                BlockStats {
                    device: str_of(d, "device"),
                    qdev: str_of(d, "qdev"),
                    node_name: str_of(d, "node-name"),
                    rd_bytes: n("rd_bytes"),
                    wr_bytes: n("wr_bytes"),
                    rd_operations: n("rd_operations"),
                    wr_operations: n("wr_operations"),
                    flush_operations: n("flush_operations"),
                    rd_total_time_ns: n("rd_total_time_ns"),
                    wr_total_time_ns: n("wr_total_time_ns"),
                    flush_total_time_ns: n("flush_total_time_ns"),
                }
            })
            .collect())
    }

    /// Bytes the guest has written to all its drives since QEMU started.
    pub fn written_bytes(&mut self) -> Result<u64> {
        Ok(self.block_stats()?.iter().map(|d| d.wr_bytes).sum())
    }

    /// Bytes written per second by the guest to all its drives, over
    /// `window` (two `query-blockstats` samples): the I/O load that orders
    /// a backup of several VMs, busiest first.
    pub fn write_rate(&mut self, window: Duration) -> Result<f64> {
        let t0 = Instant::now();
        let a = self.written_bytes()?;
        std::thread::sleep(window);
        let b = self.written_bytes()?;
        let secs = t0.elapsed().as_secs_f64().max(1e-3);
        Ok(b.saturating_sub(a) as f64 / secs)
    }

    /// Waits for event `name` (one already received counts), and returns
    /// it; other events stay queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        self.wait_event_where(name, timeout, |_| true)
    }

    /// Waits for an event `name` whose `data` satisfies `matches` (one
    /// already received counts); other events stay queued.
    pub fn wait_event_where(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let wanted = |e: &Value| e["event"] == name && matches(&e["data"]);
        if let Some(i) = self.events.iter().position(wanted) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        let what = format!("event {name}");
        loop {
            let m = self.ch.read_message(deadline, &what)?;
            if wanted(&m) {
                return Ok(m);
            }
            if m.get("event").is_some() {
                self.events.push(m);
            }
        }
    }
}

fn str_of(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

#[cfg(test)]
mod tests;
