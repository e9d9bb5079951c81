//! The agent inside the guest: `recoverfs agent run`, started by the host
//! through the guest agent (`guest-exec`) from the container mounted
//! read-only. It speaks only the frame protocol of [`super::stream`] on
//! the virtio-serial port the host hot-added for this job.
//!
//! A backup checks every path first (a missing one is an error frame and
//! nothing runs). With hooks selected it prepares a consistent copy
//! ([`copy`]: copy directories made and free space checked, before
//! anything is quiesced), reads every hook's `post` script into memory
//! (so resuming never depends on the container still being there), runs
//! each hook's `pre` script (quiesce), walks the trees and copies the
//! files, runs the `post` scripts (resume; also after a failure, so the
//! application is never left quiesced; a `post` that fails or cannot run
//! fails the backup), sending keep-alive frames while hooks and the copy
//! run, and only
//! then sends the files (headers with the original paths and the metadata
//! taken while quiesced, contents from the copy), and ends the stream;
//! the copy is removed whatever happened. So the application is quiesced
//! for the copy, not for the stream. Without enough space the backup
//! fails before `pre`, unless the host allowed streaming while quiesced
//! (`allow_quiesced_stream`). Without hooks nothing is quiesced and the
//! files are sent as they are. Directories are walked in name order
//! through their descriptors without following symbolic links, and a
//! file is read only if it is still the one its metadata came from
//! ([`walk`]). A sparse file's holes are never read (`SEEK_DATA`), and
//! when the host's job says it takes hole frames they and all-zero
//! stretches do not cross the channel ([`send_content`]). Hook output goes to the host as log
//! lines. Restores write only through directories no user of the guest
//! can redirect ([`place`]). After the end frame of a backup the agent
//! waits for the host's acknowledgement as long as the host is alive
//! ([`ack`]: keep-alive bytes from a host that sends them).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::container::AgentConfig;
use super::stream::{describe, Frame, FrameReader};
use super::stream::{FrameWriter, Hello};
use crate::error::{Error, IoContext, Result};
use crate::repo::catalog::{check_path, EntryKind};

/// What the host asks the agent to do (`--job JSON`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Job {
    Backup {
        paths: Vec<String>,
        #[serde(default)]
        hooks: Vec<String>,
        /// Without the space for a consistent copy, stream while the
        /// application stays quiesced instead of failing.
        #[serde(default)]
        allow_quiesced_stream: bool,
        /// The host takes `Z` (hole) frames: holes and all-zero stretches
        /// of files are sent as such, not as zeros. Absent from the jobs
        /// of hosts before them, which then get zeros in data frames.
        #[serde(default)]
        holes: bool,
        /// The host sends keep-alive bytes while it drains the stream to
        /// an agent that says it reads them ([`super::stream::FEATURE_ACK_WAIT`]):
        /// the agent then waits for the acknowledgement while they come
        /// ([`ack`]). Absent from the jobs of hosts before them.
        #[serde(default)]
        keepalive: bool,
    },
    /// Files the host sends, written to their place or under `to`.
    Restore {
        #[serde(default)]
        to: Option<String>,
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
    let input = f.try_clone().ctx(|| "the stream port".into())?;
    let port = Port {
        f,
        connected: false,
        since: Instant::now(),
    };
    let mut w = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, port));
    let io = |e: std::io::Error| Error::io("write to the stream port", e);
    w.hello(&Hello {
        version: cfg.version.clone(),
        binary: env!("CARGO_PKG_VERSION").to_string(),
        features: super::stream::agent_features(),
    })
    .and_then(|()| w.get_mut().flush())
    .map_err(io)?;
    // What the host sends in a backup (keep-alives, the acknowledgement),
    // read from now on so that nothing piles up in the port.
    let listener = match job {
        Job::Backup { .. } => Some(ack::Listener::start(
            input.try_clone().ctx(|| "the stream port".into())?,
        )),
        Job::Restore { .. } => None,
    };
    let result = match job {
        Job::Backup {
            paths,
            hooks,
            allow_quiesced_stream,
            holes,
            ..
        } => backup(
            &mut w,
            container,
            &cfg,
            paths,
            hooks,
            (*allow_quiesced_stream, *holes),
        ),
        Job::Restore { to } => restore::restore(
            &mut w,
            &mut FrameReader::new(std::io::BufReader::new(input), "the host's stream"),
            to.as_deref(),
        ),
    };
    match &result {
        Ok(()) => w.end().map_err(io)?,
        Err(e) => {
            // The host reports it; the exit status says it too.
            let _ = w.error(&e.to_string());
        }
    }
    // The host acknowledges the end once it has it all: exiting earlier
    // could drop frames still queued in the port. In a backup the host
    // may be far behind (a slow store): wait while it is alive ([`ack`]).
    match (listener, job) {
        (Some(l), Job::Backup { keepalive, .. }) => {
            l.wait(ack::OLD_HOST_WAIT, keepalive.then_some(ack::ACK_SILENCE));
        }
        _ => wait_ack(&mut w.get_mut().get_mut().f, Duration::from_secs(30)),
    }
    result
}

/// How long the agent waits for the host end of its port to open.
const CONNECT_WAIT: Duration = Duration::from_secs(60);

/// The stream port, for writing. virtio-console blocks a write while the
/// host end of the port is closed: for ever if the host process was
/// killed, and the agent would then never run `post`. So each write waits
/// for the port to be writable, and a port whose host end is closed
/// (POLLHUP) after a write went through, or never opened within
/// [`CONNECT_WAIT`], is an error: the agent ends as after any failure,
/// `post` first.
struct Port {
    f: File,
    connected: bool,
    since: Instant,
}

impl Write for Port {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        loop {
            let mut fds = [PollFd::new(self.f.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                // Full: the host reads slowly (its own timeouts apply).
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            if fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLOUT))
            {
                let n = self.f.write(buf)?;
                self.connected = true;
                return Ok(n);
            }
            if self.connected || self.since.elapsed() > CONNECT_WAIT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the host closed its end of the stream port",
                ));
            }
            // Not opened by the host yet.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.f.flush()
    }
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
    (allow_quiesced_stream, holes): (bool, bool),
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
    let (paths, notes) = distinct_paths(paths);
    for n in &notes {
        w.log(n).map_err(io)?;
    }
    let paths = &paths[..];
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
    if hooks.is_empty() {
        return paths
            .iter()
            .try_for_each(|p| send_tree(w, Path::new(p), holes));
    }
    // Every `post` is read before any `pre` runs: once the application is
    // quiesced, its resume must not depend on the container staying there.
    let mut posts = vec![];
    for h in hooks {
        let p = container.join("hooks").join(h).join("post");
        posts.push(match std::fs::read(&p) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Error::io(
                    format!("read hook {h} post (before anything is quiesced)"),
                    e,
                ))
            }
        });
    }
    let plan = match copy::plan(paths) {
        Ok(p) => Some(p),
        Err(copy::PlanError::NoSpace(e)) if allow_quiesced_stream => {
            w.log(&format!(
                "WARNING: {e}; streaming while the application stays quiesced (--allow-quiesced-stream)"
            ))
            .map_err(io)?;
            None
        }
        Err(copy::PlanError::NoSpace(e) | copy::PlanError::Other(e)) => return Err(e),
    };
    let mut ran = vec![];
    let mut result = Ok(());
    for (h, post) in hooks.iter().zip(&posts) {
        ran.push((h.clone(), post.as_deref()));
        if let Err(e) = hook(w, container, h, "pre", paths, None) {
            result = Err(e);
            break;
        }
    }
    let t0 = Instant::now();
    let mut staged = None;
    if result.is_ok() {
        result = match &plan {
            // The copy sends no frames: keep-alives meanwhile.
            Some(p) => keeping_alive(w, || p.copy()).map(|s| staged = Some(s)),
            None => paths
                .iter()
                .try_for_each(|p| send_tree(w, Path::new(p), holes)),
        };
    }
    if let (Some(p), Some(s)) = (&plan, &staged) {
        // A failed write is the result, not a reason to skip `post`.
        result = w
            .log(&format!(
                "consistent copy of {} entries ({}, {}) in {} ms while quiesced",
                s.entries.len(),
                crate::util::human_bytes(p.bytes),
                if p.reflink { "reflinked" } else { "copied" },
                t0.elapsed().as_millis()
            ))
            .map_err(io);
    }
    // Resume whatever was quiesced, in reverse order, whatever happened.
    // A `post` that fails or cannot run fails the backup: the
    // application may still be quiesced, and someone must know.
    for (h, post) in ran.iter().rev() {
        let Some(post) = post else { continue };
        if let Err(e) = hook(w, container, h, "post", paths, Some(post)) {
            let e = Error::new(
                e.kind(),
                format!("{e}: the application may not have resumed"),
            );
            let _ = w.log(&format!("WARNING: {e}"));
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result?;
    match staged {
        Some(s) => send_staged(w, &s, holes),
        None => Ok(()),
    }
    // `plan` drops here: the copy is removed, also on an early return.
}

/// `paths` without those another one's walk already covers, each with a
/// note: a path given twice, and one inside another given path that the
/// walk reaches (no symbolic link in between: the walk follows none, so a
/// path below a link is walked on its own). Otherwise their entries would
/// be in the backup twice.
fn distinct_paths(paths: &[String]) -> (Vec<String>, Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    let mut unique = vec![];
    let mut notes = vec![];
    for p in paths {
        if seen.insert(p.as_str()) {
            unique.push(p.clone());
        } else {
            notes.push(format!("{p} was given twice; it is backed up once"));
        }
    }
    let covers = |q: &str, p: &str| {
        let (q, p) = (Path::new(q), Path::new(p));
        p != q
            && p.starts_with(q)
            && p.ancestors()
                .skip(1)
                .take_while(|a| a.starts_with(q))
                .all(|a| std::fs::symlink_metadata(a).is_ok_and(|m| m.is_dir()))
    };
    let mut kept = vec![];
    for p in &unique {
        // The outermost: the one actually walked.
        match unique
            .iter()
            .filter(|q| covers(q, p))
            .min_by_key(|q| q.len())
        {
            Some(q) => notes.push(format!(
                "{p} is inside {q}, also given; it is backed up once, as part of {q}"
            )),
            None => kept.push(p.clone()),
        }
    }
    (kept, notes)
}

/// Sends what [`copy::Plan::copy`] took: original paths and metadata,
/// contents from the copy.
fn send_staged(w: &mut FrameWriter<impl Write>, s: &copy::Staged, holes: bool) -> Result<()> {
    for (p, why) in &s.skipped {
        w.log(&format!("skipped {p} ({why})")).map_err(io)?;
    }
    for (e, src) in &s.entries {
        w.header(e).map_err(io)?;
        if let Some(src) = src {
            // The agent's own copy, in its private directory.
            let f = File::open(src).ctx(|| format!("open {}", src.display()))?;
            send_content(w, f, src, &e.path, e.size, holes)?;
        }
    }
    Ok(())
}

fn io(e: std::io::Error) -> Error {
    Error::io("write to the stream port", e)
}

/// How often the agent sends a keep-alive frame while a hook or the copy
/// runs (the host's idle timeout is at least 3 s).
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Runs `work` on a thread of its own, sending keep-alive frames while it
/// runs. A keep-alive that cannot be written is passed over: the work (a
/// `post` among it) runs to its end, and the next real frame fails.
fn keeping_alive<T: Send>(w: &mut FrameWriter<impl Write>, work: impl FnOnce() -> T + Send) -> T {
    use std::sync::mpsc::RecvTimeoutError;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = s.spawn(move || {
            let _ = tx.send(work());
        });
        loop {
            match rx.recv_timeout(KEEPALIVE) {
                Ok(v) => return v,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = w.keepalive();
                }
                Err(RecvTimeoutError::Disconnected) => match h.join() {
                    Err(panic) => std::panic::resume_unwind(panic),
                    Ok(()) => unreachable!("the work thread ended without sending"),
                },
            }
        }
    })
}

/// Runs `hooks/NAME/STAGE`, its output as log lines. `pre`: if the
/// container has it. `post`: `saved` is its content read before any `pre`
/// ran, run from memory if the container's copy cannot be run any more.
fn hook(
    w: &mut FrameWriter<impl Write>,
    container: &Path,
    name: &str,
    stage: &str,
    paths: &[String],
    saved: Option<&[u8]>,
) -> Result<()> {
    let script = container.join("hooks").join(name).join(stage);
    if saved.is_none() && !script.exists() {
        return Ok(());
    }
    let run = |p: &Path| {
        Command::new(p)
            .env("RECOVERFS_PATHS", paths.join("\n"))
            .env("RECOVERFS_HOOK_STAGE", stage)
            .output()
    };
    let (out, fallback) = keeping_alive(w, || match (run(&script), saved) {
        (Ok(o), _) => Ok((o, None)),
        (Err(e), None) => Err(Error::io(format!("run hook {name} {stage}"), e)),
        (Err(e), Some(bytes)) => match run_from_memory(bytes, run) {
            Ok(o) => Ok((o, Some(e))),
            Err(m) => Err(Error::new(
                m.kind(),
                format!("run hook {name} {stage}: {e}; from its copy in memory: {m}"),
            )),
        },
    })?;
    if let Some(e) = fallback {
        w.log(&format!(
            "WARNING: hook {name} {stage} could not be run from the container ({e}); ran the copy read before pre"
        ))
        .map_err(io)?;
    }
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

/// Runs `bytes` as an executable through a memory file: written, then
/// reopened read-only (a file open for writing cannot be executed) and
/// inherited by the child through `/proc/self/fd`, so that a `#!`
/// interpreter can open it too.
fn run_from_memory(
    bytes: &[u8],
    run: impl Fn(&Path) -> std::io::Result<std::process::Output>,
) -> Result<std::process::Output> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::os::fd::AsRawFd;
    let mut w = File::from(
        memfd_create(c"recoverfs-hook", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| Error::io("memfd_create", e.into()))?,
    );
    w.write_all(bytes)
        .ctx(|| "write the hook to memory".into())?;
    let r = File::open(format!("/proc/self/fd/{}", w.as_raw_fd()))
        .ctx(|| "reopen the hook in memory".into())?;
    drop(w);
    fcntl(r.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
        .map_err(|e| Error::io("let the hook in memory be inherited", e.into()))?;
    let out = run(Path::new(&format!("/proc/self/fd/{}", r.as_raw_fd()))).ctx(|| "run it".into());
    drop(r);
    out
}

/// Sends `path` and, for a directory, everything under it.
fn send_tree(w: &mut FrameWriter<impl Write>, path: &Path, holes: bool) -> Result<()> {
    let io = |e: std::io::Error| Error::io("write to the stream port", e);
    walk::walk(path, None, &mut |found| match found {
        walk::Found::Skipped(p, why) => w.log(&format!("skipped {p} ({why})")).map_err(io),
        walk::Found::Entry(e, file) => {
            w.header(&e).map_err(io)?;
            match file {
                Some(f) => send_content(w, f, Path::new(&e.path), &e.path, e.size, holes),
                None => Ok(()),
            }
        }
    })
}

/// Exactly `size` bytes of a file: a file that shrank while read is padded
/// with zeros and said in the log, one that grew is cut at `size`. The
/// warning follows the file's data: hosts before they took log frames
/// among a file's data failed the backup on one.
///
/// Holes are not read ([`next_data`]), and with `holes` (the host takes
/// `Z` frames) neither they nor data pieces that are all zeros cross the
/// channel: each is one hole frame. Without `holes` they are sent as
/// zeros in data frames, as before. Either way every byte recorded is
/// what the file held when that stretch was looked at: read, or a hole
/// `SEEK_DATA` reported then (which reads as zeros then); a file whose
/// size, modification or change time moved while it was sent is said in
/// the log, as it may mix old and new content.
///
/// `path` is what is read (the agent's copy, with hooks), `name` the
/// guest path it stands for.
fn send_content(
    w: &mut FrameWriter<impl Write>,
    f: File,
    path: &Path,
    name: &str,
    size: u64,
    holes: bool,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let io = |e: std::io::Error| Error::io("write to the stream port", e);
    let before = f.metadata().ctx(|| format!("stat {}", path.display()))?;
    let mut pos = 0u64;
    let mut padded = 0u64;
    // Cleared where the filesystem cannot tell holes: read everything.
    let mut seek = true;
    let mut buf = vec![0u8; super::stream::MAX_DATA];
    'file: while pos < size {
        let (data, end) = if seek {
            match next_data(&f, pos, size) {
                NextData::Data(d, e) => (d, e),
                NextData::None => {
                    // Only a hole up to the file's end now; past that end
                    // (it shrank) is padding, warned about below.
                    let now = f.metadata().ctx(|| format!("stat {}", path.display()))?;
                    (now.len().clamp(pos, size), size)
                }
                NextData::Unsupported => {
                    seek = false;
                    (pos, size)
                }
            }
        } else {
            (pos, size)
        };
        w.zeros(data - pos, holes).map_err(io)?;
        pos = data;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = f
                .read_at(&mut buf[..want], pos)
                .ctx(|| format!("read {}", path.display()))?;
            if n == 0 {
                padded = size - pos;
                w.zeros(padded, holes).map_err(io)?;
                break 'file;
            }
            if holes && buf[..n].iter().all(|&b| b == 0) {
                w.hole(n as u64).map_err(io)?;
            } else {
                w.data(&buf[..n]).map_err(io)?;
            }
            pos += n as u64;
        }
    }
    if padded > 0 {
        w.log(&format!(
            "WARNING: {name} shrank while it was read; its last {padded} of {size} bytes are zeros in the backup"
        ))
        .map_err(io)?;
    } else if f.metadata().is_ok_and(|now| changed(&before, &now)) {
        w.log(&format!(
            "WARNING: {name} changed while it was read; its copy in the backup may mix old and new content"
        ))
        .map_err(io)?;
    }
    Ok(())
}

/// Whether a file's size, modification or change time moved.
fn changed(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    (
        a.size(),
        a.mtime(),
        a.mtime_nsec(),
        a.ctime(),
        a.ctime_nsec(),
    ) != (
        b.size(),
        b.mtime(),
        b.mtime_nsec(),
        b.ctime(),
        b.ctime_nsec(),
    )
}

/// Where the next data of a file is, from `lseek(SEEK_DATA/SEEK_HOLE)`.
#[derive(Debug, PartialEq, Eq)]
enum NextData {
    /// Data from the first offset to the second (at most `size`): what
    /// lies before the first is a hole.
    Data(u64, u64),
    /// No data from the offset asked for up to `size`.
    None,
    /// The filesystem cannot tell: read it all.
    Unsupported,
}

/// The next stretch of data at or after `pos`, within `size`. Asked just
/// before that stretch is read, so a hole is a hole at the moment its
/// zeros are recorded.
fn next_data(f: &File, pos: u64, size: u64) -> NextData {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let Ok(at) = i64::try_from(pos) else {
        return NextData::Unsupported;
    };
    let data = match lseek(f.as_raw_fd(), at, Whence::SeekData) {
        Ok(d) => d as u64,
        Err(Errno::ENXIO) => return NextData::None,
        Err(_) => return NextData::Unsupported,
    };
    if data >= size {
        return NextData::None;
    }
    match lseek(f.as_raw_fd(), data as i64, Whence::SeekHole) {
        Ok(h) if h as u64 > data => NextData::Data(data, (h as u64).min(size)),
        // Contradicting itself (the file changing): read to the end.
        _ => NextData::Data(data, size),
    }
}

mod ack;
mod copy;
mod place;
mod restore;
mod walk;

#[cfg(test)]
mod tests;
