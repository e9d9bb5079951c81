//! Reading a running disk's marked blocks straight from its image file,
//! not through QEMU's NBD server.
//!
//! **Why.** QEMU serves NBD in its main loop, the thread that also
//! completes the guest's I/O, and pays a 1 MiB read with a worker-thread
//! `pread` plus a socket send it pushes in pieces. Measured on the bench VM
//! (2 cores, TCG, a guest writing 512 bytes every 10 ms): while a client
//! read the data disk over NBD at full speed, QEMU used 6.8 CPU-seconds
//! in 8 s instead of 4.2, its threads waited on average 0.5 ms to run
//! after a wake-up (0.04–0.11 ms without), and 9–29% of the guest's
//! writes took over 1 ms (0.5–6% without); the writes' own `pwrite` calls
//! stayed under 0.4 ms at p99, so the time went to QEMU's thread
//! hand-offs. Reading the same file with `dd` from another process left
//! the guest's latency as it was alone.
//!
//! **When.** Only for a disk whose node is `raw` with no `offset` or
//! `size` option (QEMU then names it by a plain path; with them, a
//! `json:` filename) over a local `file` or `host_device` node, and only
//! if the file we open is one QEMU itself has open: the same device and
//! inode as one of the QEMU process's descriptors (`/proc/PID/fd`, PID
//! the QMP socket's peer), as long as the node. Anything else (qcow2, a
//! filter on top, a remote image, another mount namespace, a QMP proxy)
//! reads over NBD, and the round report says why. The decision is made
//! again every round, since QEMU may have reopened or replaced the node.
//!
//! **Why it is as correct as the NBD read.** A round never reads a
//! point-in-time view: it reads the running disk, and the bitmaps make it
//! right (see [`super`]). Over NBD the read goes through the raw node,
//! which maps nothing without `offset`, to a `pread` of the same file:
//! the same bytes this module reads. QEMU sets a write's dirty bit when
//! the write request finishes, after its `pwrite` to the file returned; so
//! a write marked in a frozen bitmap (or before the cycle) is in the file
//! before the round froze that bitmap, and any write finishing later marks
//! the recording bitmap, whatever a concurrent read saw, and is read
//! again next round. The host's page cache is coherent: with QEMU's
//! default cache mode its writes land in the cache we read; with
//! `cache.direct=on` a finished O_DIRECT write has invalidated the cached
//! pages of its range (the kernel does so again after the write, for
//! buffered readers racing with it), so a later `pread` reads the device.
//! In that mode we drop the pages we read into the cache afterwards, so
//! QEMU's direct writes do not pay for invalidating them. The scheduled
//! backup still reads its point-in-time view over NBD.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

use serde_json::Value;

use crate::error::{Error, Result};

/// A disk's image file as QEMU's node describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawFile {
    pub path: PathBuf,
    /// QEMU opened it with O_DIRECT (`cache.direct=on`).
    pub direct: bool,
    /// The node's size.
    pub size: u64,
}

/// Whether node `node` (in `query-named-block-nodes` with `flat`) is a
/// plain raw image over a local file or block device: its file, or why
/// not.
pub(super) fn raw_file(nodes: &[Value], node: &str) -> std::result::Result<RawFile, String> {
    let n = (nodes.iter())
        .find(|n| n["node-name"] == node)
        .ok_or_else(|| format!("QEMU has no node {node}"))?;
    let drv = n["drv"].as_str().unwrap_or("?");
    if drv != "raw" {
        return Err(format!("its node is {drv}, not raw"));
    }
    let file = n["file"].as_str().unwrap_or("");
    if !file.starts_with('/') {
        return Err(format!(
            "its raw node has options (offset, size) or no local file: {file}"
        ));
    }
    let local = nodes
        .iter()
        .any(|c| c["file"] == file && matches!(c["drv"].as_str(), Some("file" | "host_device")));
    if !local {
        return Err(format!("{file} is not a local file or block device node"));
    }
    let size = (n["image"]["virtual-size"].as_u64())
        .ok_or_else(|| format!("QEMU reports no size for node {node}"))?;
    Ok(RawFile {
        path: file.into(),
        direct: n["cache"]["direct"].as_bool().unwrap_or(false),
        size,
    })
}

/// An image file open for reading, proven to be the one QEMU has open.
pub(super) struct DirectFile {
    file: File,
    raw: RawFile,
}

impl DirectFile {
    /// Opens `raw`'s file if it is the one process `qemu` has open and
    /// as long as the node; else why not.
    pub(super) fn open(raw: &RawFile, qemu: Option<u32>) -> std::result::Result<Self, String> {
        let path = raw.path.display();
        let pid = qemu.ok_or("QEMU's process is unknown (no peer on the QMP socket)")?;
        // Our own descriptors would prove nothing.
        if pid == std::process::id() {
            return Err("the QMP socket's peer is this process".into());
        }
        let file = File::open(&raw.path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let m = file
            .metadata()
            .map_err(|e| format!("cannot stat {path}: {e}"))?;
        if !qemu_has_open(pid, m.dev(), m.ino())? {
            return Err(format!(
                "{path} is not a file QEMU (pid {pid}) has open (another mount namespace?)"
            ));
        }
        // A block device's metadata says 0 bytes; its end says its size.
        let len = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
            .map_err(|e| format!("cannot size {path}: {e}"))?;
        if len != raw.size {
            return Err(format!("{path} is {len} bytes, QEMU's node {}", raw.size));
        }
        Ok(DirectFile {
            file,
            raw: raw.clone(),
        })
    }

    /// Reads `buf.len()` bytes at `off`.
    pub(super) fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, off).map_err(|e| {
            Error::io(
                format!(
                    "read {} bytes at {off} of {}",
                    buf.len(),
                    self.raw.path.display()
                ),
                e,
            )
        })?;
        if self.raw.direct {
            // Only a hint: failing leaves clean pages a direct write drops.
            let _ = nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                off as i64,
                buf.len() as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        Ok(())
    }

    pub(super) fn path(&self) -> &std::path::Path {
        &self.raw.path
    }
}

/// Whether process `pid` has a descriptor open on device `dev`, inode
/// `ino` (`/proc/PID/fd` links resolve in QEMU's own mount namespace).
fn qemu_has_open(pid: u32, dev: u64, ino: u64) -> std::result::Result<bool, String> {
    let dir = format!("/proc/{pid}/fd");
    let list = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {dir}: {e}"))?;
    Ok(list
        .flatten()
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino)))
}
