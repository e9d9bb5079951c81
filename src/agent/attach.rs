//! Attaching the agent container and a stream port to a running VM over
//! QMP, and taking them away again.
//!
//! Attach, in this order (each step recorded as it succeeds):
//! 1. `chardev-add`: a Unix socket server QEMU creates in our scratch
//!    directory; we connect to it at once, so nothing the guest writes is
//!    dropped for want of a reader;
//! 2. `device_add virtserialport` on the VM's virtio-serial bus, named
//!    `org.recoverfs.agent.<id>` (the guest sees `/dev/virtio-ports/…`);
//! 3. `blockdev-add`: the container image, read-only (one image is shared
//!    by every VM it is attached to; QEMU takes a shared lock);
//! 4. `device_add scsi-hd` with serial `rfsagent<id>` on the VM's
//!    virtio-scsi controller: SCSI hot-plug needs no guest cooperation.
//!
//! Detach undoes whatever was done, newest first: `device_del`, then the
//! `DEVICE_DELETED` event, then `blockdev-del` / `chardev-remove`. It runs
//! on every path: explicitly (its errors reported), or from `Drop`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::{Error, ErrorKind, Result};
use crate::qemu::qmp::Qmp;

/// How long QEMU may take to report a device gone.
const DELETE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Attachment {
    qmp: Qmp,
    pub id: String,
    /// The container disk's serial, as the guest sees it.
    pub serial: String,
    /// The stream port's name in the guest (`/dev/virtio-ports/NAME`).
    pub port: String,
    /// Our end of the stream.
    pub stream: Option<UnixStream>,
    /// Done steps, undone newest first.
    done: Vec<Step>,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Clone)]
enum Step {
    Chardev(String),
    Device(String),
    Node(String),
}

impl Attachment {
    /// Attaches `image` and a stream port; on failure, undoes what it did.
    pub fn attach(qmp: Qmp, image: &Path) -> Result<Attachment> {
        let id = crate::repo::random_hex(4);
        let dir = tempfile::Builder::new()
            .prefix("recoverfs-agent-")
            .tempdir()
            .map_err(|e| Error::io("create a scratch directory", e))?;
        let mut a = Attachment {
            qmp,
            serial: format!("rfsagent{id}"),
            port: format!("org.recoverfs.agent.{id}"),
            id,
            stream: None,
            done: vec![],
            _dir: dir,
        };
        a.attach_steps(image)?;
        Ok(a)
    }

    fn attach_steps(&mut self, image: &Path) -> Result<()> {
        let image = std::path::absolute(image)
            .map_err(|e| Error::io(format!("resolve {}", image.display()), e))?;
        let sock: PathBuf = self._dir.path().join("stream.sock");
        let chardev = format!("rfsagent-ch-{}", self.id);
        self.qmp.execute(
            "chardev-add",
            Some(
                json!({"id": chardev, "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": sock}},
                "server": true, "wait": false}}}),
            ),
        )?;
        self.done.push(Step::Chardev(chardev.clone()));
        let stream = UnixStream::connect(&sock).map_err(|e| {
            Error::io(
                format!("connect to the stream socket {}", sock.display()),
                e,
            )
        })?;
        self.stream = Some(stream);
        let port_dev = format!("rfsagent-port-{}", self.id);
        self.qmp
            .execute(
                "device_add",
                Some(json!({"driver": "virtserialport", "id": port_dev,
                            "chardev": chardev, "name": self.port})),
            )
            .map_err(|e| no_bus(e, "virtio-serial", "-device virtio-serial-pci"))?;
        self.done.push(Step::Device(port_dev));
        let node = format!("rfsagent-node-{}", self.id);
        self.qmp
            .execute(
                "blockdev-add",
                Some(
                    json!({"driver": "raw", "node-name": node, "read-only": true,
                            "file": {"driver": "file", "filename": image, "read-only": true}}),
                ),
            )
            .map_err(|e| e.context(format!("attach the agent container {}", image.display())))?;
        self.done.push(Step::Node(node.clone()));
        let disk_dev = format!("rfsagent-disk-{}", self.id);
        self.qmp
            .execute(
                "device_add",
                Some(json!({"driver": "scsi-hd", "id": disk_dev, "drive": node,
                            "serial": self.serial})),
            )
            .map_err(|e| no_bus(e, "virtio-scsi", "-device virtio-scsi-pci"))?;
        self.done.push(Step::Device(disk_dev));
        Ok(())
    }

    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Removes the stream port alone, to stop the agent early: once its
    /// port is gone, the guest's writes to it fail (while the host end is
    /// merely closed they block, for ever), so the agent ends, after its
    /// hooks' `post`, and the script unmounts the container, which stays
    /// attached until [`Attachment::detach`].
    pub fn unplug_port(&mut self) -> Result<()> {
        let port_dev = format!("rfsagent-port-{}", self.id);
        let Some(i) = self
            .done
            .iter()
            .position(|s| matches!(s, Step::Device(d) if *d == port_dev))
        else {
            return Ok(());
        };
        self.delete_device(&port_dev)?;
        self.done.remove(i);
        Ok(())
    }

    /// Removes everything attached, newest first; every step is tried,
    /// the first error is returned.
    pub fn detach(&mut self) -> Result<()> {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let mut first = None;
        while let Some(step) = self.done.pop() {
            let r = match &step {
                Step::Device(d) => self.delete_device(d),
                Step::Node(n) => self
                    .qmp
                    .execute("blockdev-del", Some(json!({ "node-name": n })))
                    .map(drop),
                Step::Chardev(c) => self
                    .qmp
                    .execute("chardev-remove", Some(json!({ "id": c })))
                    .map(drop),
            };
            if let Err(e) = r {
                tracing::warn!(step = ?step, error = %e, "detach step failed");
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e.context("detach the agent container")),
            None => Ok(()),
        }
    }

    fn delete_device(&mut self, dev: &str) -> Result<()> {
        self.qmp.execute("device_del", Some(json!({ "id": dev })))?;
        let deadline = Instant::now() + DELETE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("QEMU did not report device {dev} deleted within {DELETE_TIMEOUT:?}"),
                ));
            }
            let ev = self.qmp.wait_event("DEVICE_DELETED", left)?;
            if ev["data"]["device"] == dev {
                return Ok(());
            }
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if !self.done.is_empty() {
            let _ = self.detach();
        }
    }
}

/// A `device_add` that found no bus of its kind, said as what to add.
fn no_bus(e: Error, bus: &str, add: &str) -> Error {
    if e.to_string().contains("bus found") {
        Error::new(
            ErrorKind::InvalidInput,
            format!("the VM has no {bus} controller to attach the agent to: start it with `{add}` (recoverfs boot adds one) ({e})"),
        )
    } else {
        e
    }
}
