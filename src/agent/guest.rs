//! The agent inside the guest: `recoverfs agent run`, started by the host
//! through the guest agent (`guest-exec`) from the container mounted
//! read-only. It speaks only the frame protocol of [`super::stream`] on
//! the virtio-serial port the host hot-added for this job.
//!
//! A backup checks every path first (a missing one is an error frame and
//! nothing runs), runs each selected hook's `pre` script (quiesce), sends
//! the files (headers and contents, directories walked in name order
//! without following symbolic links), runs the `post` scripts (resume;
//! also after a failure, so the application is never left quiesced), and
//! ends the stream. Hook output goes to the host as log lines.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::container::AgentConfig;
use super::stream::{FrameWriter, Hello};
use crate::error::{Error, IoContext, Result};
use crate::repo::catalog::{check_path, Entry, EntryKind};

/// What the host asks the agent to do (`--job JSON`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Job {
    Backup {
        paths: Vec<String>,
        #[serde(default)]
        hooks: Vec<String>,
    },
}

/// Runs `job` with the container at `container`, on `port`.
pub fn run(port: &Path, container: &Path, job: &Job) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)
        .ctx(|| format!("open the stream port {}", port.display()))?;
    run_on(f, container, job)
}

/// [`run`] on an open port.
pub fn run_on(f: File, container: &Path, job: &Job) -> Result<()> {
    let cfg = AgentConfig::load(container)?;
    let mut w = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, f));
    let io = |e: std::io::Error| Error::io("write to the stream port", e);
    w.hello(&Hello {
        version: cfg.version.clone(),
        binary: env!("CARGO_PKG_VERSION").to_string(),
    })
    .map_err(io)?;
    let result = match job {
        Job::Backup { paths, hooks } => backup(&mut w, container, &cfg, paths, hooks),
    };
    match &result {
        Ok(()) => w.end().map_err(io)?,
        Err(e) => {
            // The host reports it; the exit status says it too.
            let _ = w.error(&e.to_string());
        }
    }
    // The host acknowledges the end once it has it all: exiting earlier
    // could drop frames still queued in the port.
    wait_ack(w.get_mut().get_mut(), Duration::from_secs(30));
    result
}

fn wait_ack(f: &mut File, timeout: Duration) {
    use std::os::fd::AsFd;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut fds = [nix::poll::PollFd::new(
            f.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)) {
            Ok(n) if n > 0 => {
                let mut b = [0u8; 1];
                let _ = f.read(&mut b);
                return;
            }
            _ => continue,
        }
    }
}

fn backup(
    w: &mut FrameWriter<impl Write>,
    container: &Path,
    cfg: &AgentConfig,
    paths: &[String],
    hooks: &[String],
) -> Result<()> {
    if paths.is_empty() {
        return Err(Error::invalid("no paths to back up"));
    }
    for p in paths {
        check_path(p)?;
        if std::fs::symlink_metadata(p).is_err() {
            return Err(Error::not_found(format!(
                "path {p} does not exist in the guest"
            )));
        }
    }
    for h in hooks {
        if !cfg.hooks.contains(h) {
            return Err(Error::not_found(format!(
                "hook {h:?} is not in the agent container (it has: {})",
                if cfg.hooks.is_empty() {
                    "none".to_string()
                } else {
                    cfg.hooks.join(", ")
                }
            )));
        }
    }
    let mut ran = vec![];
    let mut result = Ok(());
    for h in hooks {
        ran.push(h.clone());
        if let Err(e) = hook(w, container, h, "pre", paths) {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        result = paths.iter().try_for_each(|p| send_tree(w, Path::new(p)));
    }
    // Resume whatever was quiesced, in reverse order, whatever happened.
    for h in ran.iter().rev() {
        if let Err(e) = hook(w, container, h, "post", paths) {
            let _ = w.log(&format!(
                "WARNING: {e}: the application may not have resumed"
            ));
        }
    }
    result
}

/// Runs `hooks/NAME/STAGE` if the container has it, its output as log lines.
fn hook(
    w: &mut FrameWriter<impl Write>,
    container: &Path,
    name: &str,
    stage: &str,
    paths: &[String],
) -> Result<()> {
    let script = container.join("hooks").join(name).join(stage);
    if !script.exists() {
        return Ok(());
    }
    let out = Command::new(&script)
        .env("RECOVERFS_PATHS", paths.join("\n"))
        .env("RECOVERFS_HOOK_STAGE", stage)
        .output()
        .ctx(|| format!("run hook {name} {stage}"))?;
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        w.log(&format!("hook {name} {stage}: {line}"))
            .map_err(|e| Error::io("write to the stream port", e))?;
    }
    if !out.status.success() {
        return Err(Error::new(
            crate::error::ErrorKind::Io,
            format!("hook {name} {stage} failed ({})", out.status),
        ));
    }
    Ok(())
}

/// An entry for `path` from its metadata (not following a link).
pub fn entry_of(path: &Path, m: &std::fs::Metadata) -> Result<Option<Entry>> {
    let ft = m.file_type();
    let (kind, target) = if ft.is_file() {
        (EntryKind::File, None)
    } else if ft.is_dir() {
        (EntryKind::Dir, None)
    } else if ft.is_symlink() {
        let t = std::fs::read_link(path).ctx(|| format!("read link {}", path.display()))?;
        (EntryKind::Symlink, Some(t.to_string_lossy().into_owned()))
    } else {
        return Ok(None);
    };
    let p = path
        .to_str()
        .ok_or_else(|| Error::invalid(format!("{} is not UTF-8", path.display())))?;
    Ok(Some(Entry {
        path: p.to_string(),
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        size: if kind == EntryKind::File { m.size() } else { 0 },
        target,
        chunks: vec![],
    }))
}

/// Sends `path` and, for a directory, everything under it.
fn send_tree(w: &mut FrameWriter<impl Write>, path: &Path) -> Result<()> {
    let io = |e: std::io::Error| Error::io("write to the stream port", e);
    let m = std::fs::symlink_metadata(path).ctx(|| format!("stat {}", path.display()))?;
    let Some(entry) = entry_of(path, &m)? else {
        let what = if m.file_type().is_socket() {
            "a socket"
        } else {
            "a device or FIFO"
        };
        return w
            .log(&format!("skipped {} ({what})", path.display()))
            .map_err(io);
    };
    w.header(&entry).map_err(io)?;
    match entry.kind {
        EntryKind::File => send_content(w, path, entry.size),
        EntryKind::Dir => {
            let mut names: Vec<PathBuf> = std::fs::read_dir(path)
                .ctx(|| format!("list {}", path.display()))?
                .map(|d| d.map(|d| d.path()))
                .collect::<std::io::Result<_>>()
                .ctx(|| format!("list {}", path.display()))?;
            names.sort();
            names.iter().try_for_each(|p| send_tree(w, p))
        }
        EntryKind::Symlink => Ok(()),
    }
}

/// Exactly `size` bytes of a file: a file that shrank while read is padded
/// with zeros and said in the log, one that grew is cut at `size`.
fn send_content(w: &mut FrameWriter<impl Write>, path: &Path, size: u64) -> Result<()> {
    let io = |e: std::io::Error| Error::io("write to the stream port", e);
    let mut f = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let mut left = size;
    let mut buf = vec![0u8; super::stream::MAX_DATA];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = f
            .read(&mut buf[..want])
            .ctx(|| format!("read {}", path.display()))?;
        if n == 0 {
            w.log(&format!(
                "WARNING: {} shrank while it was read; padded with zeros",
                path.display()
            ))
            .map_err(io)?;
            buf[..want].fill(0);
            w.data(&buf[..want]).map_err(io)?;
            left -= want as u64;
            continue;
        }
        w.data(&buf[..n]).map_err(io)?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
