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
//! the QMP socket's peer) that QEMU opened for reading (not `O_PATH`,
//! not write-only: else whoever runs QEMU could have a file it cannot
//! read copied into a backup), as long as the node. Anything else (qcow2, a
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
        match qemu_holds(pid, m.dev(), m.ino())? {
            Held::ForReading => {}
            Held::WithoutRead => {
                return Err(format!(
                    "QEMU (pid {pid}) holds {path} only without read access (O_PATH or write-only)"
                ));
            }
            Held::No => {
                return Err(format!(
                    "{path} is not a file QEMU (pid {pid}) has open (another mount namespace?)"
                ));
            }
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

/// How a process holds a file.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// Through a descriptor it can read.
    ForReading,
    /// Only through descriptors it cannot read: `O_PATH` (which needs
    /// only search permission on the directory) or write-only.
    WithoutRead,
    No,
}

/// How process `pid` holds device `dev`, inode `ino` (`/proc/PID/fd`
/// links resolve in QEMU's own mount namespace).
///
/// Only a descriptor QEMU can read counts: whoever runs that QEMU
/// (a caller that is not root, say) must not get a file's bytes into a
/// backup by holding it open with `O_PATH` and naming it in a node; a
/// readable descriptor gives them those bytes anyway.
fn qemu_holds(pid: u32, dev: u64, ino: u64) -> std::result::Result<Held, String> {
    let dir = format!("/proc/{pid}/fd");
    let list = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {dir}: {e}"))?;
    let mut held = Held::No;
    for fd in list.flatten() {
        if !std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
        // Gone since the listing, or unreadable: not proof of anything.
        let Some(flags) = std::fs::read_to_string(&info)
            .ok()
            .and_then(|t| fd_flags(&t))
        else {
            continue;
        };
        if readable(flags) {
            return Ok(Held::ForReading);
        }
        held = Held::WithoutRead;
    }
    Ok(held)
}

/// The `flags:` field (octal) of a `/proc/PID/fdinfo/N` text.
fn fd_flags(fdinfo: &str) -> Option<i32> {
    let v = fdinfo.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(v.trim(), 8).ok()
}

fn readable(flags: i32) -> bool {
    flags & libc::O_PATH == 0 && matches!(flags & libc::O_ACCMODE, libc::O_RDONLY | libc::O_RDWR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};

    /// A process that opens `path` with Python's `os.open` `flags`
    /// and says so: it stands in for QEMU holding the image.
    struct Holder(Child);

    impl Holder {
        fn start(path: &std::path::Path, flags: &str) -> Holder {
            let mut c = Command::new("python3")
                .args(["-c", &format!(
                    "import os,sys,time\nfd=os.open(sys.argv[1], {flags})\nprint('open', flush=True)\ntime.sleep(60)"
                )])
                .arg(path)
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3");
            let mut line = String::new();
            BufReader::new(c.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "open", "holder did not open {path:?}");
            Holder(c)
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn image(dir: &tempfile::TempDir) -> RawFile {
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        RawFile {
            path,
            direct: false,
            size: 8192,
        }
    }

    #[test]
    fn an_image_qemu_holds_for_reading_is_read_directly() {
        let d = tempfile::tempdir().unwrap();
        let raw = image(&d);
        let h = Holder::start(&raw.path, "os.O_RDWR");
        let f = DirectFile::open(&raw, Some(h.0.id())).expect("readable descriptor accepted");
        let mut b = [0u8; 16];
        f.read(4096, &mut b).unwrap();
        assert_eq!(b, [7u8; 16]);
    }

    #[test]
    fn an_image_qemu_holds_only_by_o_path_or_write_only_is_never_read_directly() {
        let d = tempfile::tempdir().unwrap();
        let raw = image(&d);
        for flags in ["os.O_PATH", "os.O_WRONLY"] {
            let h = Holder::start(&raw.path, flags);
            let e = DirectFile::open(&raw, Some(h.0.id())).err().expect(flags);
            assert!(e.contains("only without read access"), "{flags}: {e}");
        }
    }

    #[test]
    fn an_image_qemu_does_not_hold_is_never_read_directly() {
        let d = tempfile::tempdir().unwrap();
        let raw = image(&d);
        let other = d.path().join("other.raw");
        std::fs::write(&other, b"x").unwrap();
        let h = Holder::start(&other, "os.O_RDONLY");
        let e = DirectFile::open(&raw, Some(h.0.id())).err().unwrap();
        assert!(e.contains("is not a file QEMU"), "{e}");
    }

    #[test]
    fn fdinfo_flags_are_read_as_octal() {
        let t = "pos:\t0\nflags:\t0100002\nmnt_id:\t24\n";
        assert_eq!(fd_flags(t), Some(0o100002));
        assert!(readable(0o100002));
        assert!(!readable(0o10000000));
        assert!(!readable(0o100001));
    }
}
