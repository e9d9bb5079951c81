//! `agent-backup`: granular file backups of running VMs through the agent
//! container, one VM per worker, `--jobs` at a time.
//!
//! Per VM ([`super::session`] runs the steps): check the container
//! (`agent.json` read with debugfs) and the guest agent (no answer: one
//! clear error, nothing attached); attach the
//! container and a stream port ([`super::attach`]); `guest-exec` a small
//! shell script that waits for the disk and port, mounts the container
//! read-only, runs `recoverfs agent run` from it and unmounts it; receive
//! the stream, chunking file contents into the repository as they come
//! (and sending an agent that waits for it a keep-alive byte every 2 s);
//! acknowledge the end; wait for the script's exit; detach; and only then
//! publish the catalog. The guest is not trusted: the stream is read
//! within `--idle-timeout` and an overall `--max-duration`, the agent's
//! log is bounded ([`AgentLog`]), and a catalog that would be over the
//! limits it is read back with is refused before it is published. Any failure (no agent, a missing path, a failed
//! hook, a container that does not attach, the agent or the VM killed, a
//! truncated stream, a failed detach) publishes nothing; the chunks
//! already stored are unreferenced and harmless, as after a failed disk
//! backup.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::guest::Job;
use super::session::run_in_guest;
pub use super::session::{Deadline, Target, DEFAULT_MAX_DURATION};
use super::stream::{describe, Frame, FrameReader};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::catalog::{Catalog, CatalogLimits, ChunkSink, EntryKind, CATALOG_FORMAT};
use crate::repo::Repository;

pub struct Options {
    pub container: PathBuf,
    pub paths: Vec<String>,
    pub hooks: Vec<String>,
    pub jobs: usize,
    /// Without the guest space for a consistent copy, stream while the
    /// application stays quiesced instead of failing.
    pub allow_quiesced_stream: bool,
    /// Longest silence on the stream (a hook may take a while).
    pub idle_timeout: Duration,
    /// Longest a VM's whole backup may take.
    pub max_duration: Duration,
    /// What the catalog may hold: [`CatalogLimits::STORED`], smaller in tests.
    pub catalog_limits: CatalogLimits,
    /// Set (by a signal) to stop: running jobs end early
    /// ([`super::session`]), VMs not started are not.
    pub stop: Arc<AtomicBool>,
}

/// Log lines kept per VM: a guest may send log frames without end.
pub const MAX_LOG_LINES: usize = 1000;
/// Bytes of log lines kept per VM.
pub const MAX_LOG_BYTES: usize = 1 << 20;

/// The agent's log of one VM: the first [`MAX_LOG_LINES`] lines (at most
/// [`MAX_LOG_BYTES`]), and a count of the rest.
#[derive(Debug, Default)]
pub struct AgentLog {
    lines: Vec<String>,
    bytes: usize,
    dropped: u64,
    dropped_bytes: u64,
    /// Entries the agent passed over (`skipped PATH (why)`), counted
    /// whether or not their lines are kept (review25 M3).
    skipped: u64,
}

impl AgentLog {
    /// Keeps `line` if there is room; whether it was kept.
    pub fn push(&mut self, line: &str) -> bool {
        if line.starts_with(SKIPPED) {
            self.skipped += 1;
        }
        if self.lines.len() < MAX_LOG_LINES && self.bytes + line.len() <= MAX_LOG_BYTES {
            self.bytes += line.len();
            self.lines.push(line.to_string());
            true
        } else {
            self.dropped += 1;
            self.dropped_bytes += line.len() as u64;
            false
        }
    }

    /// What was left out, as a last line, if anything was.
    pub fn summary(&self) -> Option<String> {
        (self.dropped > 0).then(|| {
            format!(
                "{} more log lines ({} bytes) from the agent were not kept",
                self.dropped, self.dropped_bytes
            )
        })
    }

    pub fn into_lines(mut self) -> Vec<String> {
        if let Some(s) = self.summary() {
            self.lines.push(s);
        }
        self.lines
    }
}

/// How the agent's log line about an entry it passed over begins.
const SKIPPED: &str = "skipped ";

/// What happened to one VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmOutcome {
    pub vm: String,
    pub backup: Option<String>,
    pub agent_version: Option<String>,
    pub entries: u64,
    pub file_bytes: u64,
    pub new_bytes: u64,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// Entries passed over (sockets, devices, FIFOs, names that are not
    /// UTF-8), each a `skipped` log line (which the log's bound may drop).
    pub skipped: u64,
    /// The agent's log lines (hook output, warnings).
    pub log: Vec<String>,
}

/// Backs up every target, `jobs` at a time; one VM's failure does not stop
/// the others. `on_log(vm, line)` sees agent log lines as they come.
pub fn agent_backup(
    repo: &Arc<Repository>,
    targets: &[Target],
    opts: &Options,
    on_log: &(dyn Fn(&str, &str) + Sync),
) -> Result<Vec<VmOutcome>> {
    if opts.paths.is_empty() {
        return Err(Error::invalid(
            "--paths: name at least one path in the guest",
        ));
    }
    for p in &opts.paths {
        crate::repo::catalog::check_path(p).map_err(|e| e.context("--paths"))?;
    }
    let mut names = std::collections::HashSet::new();
    let mut sockets = std::collections::HashSet::new();
    for t in targets {
        if !names.insert(&t.name) {
            return Err(Error::invalid(format!("--vm {} given twice", t.name)));
        }
        // QEMU serves one client per socket: a second would hang.
        if !sockets.insert(&t.qmp) || t.qga.as_ref().is_some_and(|g| !sockets.insert(g)) {
            return Err(Error::invalid(format!(
                "--vm {}: a socket given twice",
                t.name
            )));
        }
    }
    let cfg = super::container::read_config(&opts.container)?;
    let next = Mutex::new(0usize);
    let out: Mutex<Vec<Option<VmOutcome>>> = Mutex::new(vec![None; targets.len()]);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, targets.len().max(1)) {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().expect("lock");
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(t) = targets.get(i) else { break };
                let o = if opts.stop.load(Ordering::SeqCst) {
                    not_started(t)
                } else {
                    one(repo, t, opts, &cfg.version, on_log)
                };
                out.lock().expect("lock")[i] = Some(o);
            });
        }
    });
    Ok(out
        .into_inner()
        .expect("lock")
        .into_iter()
        .map(|o| o.expect("every VM done"))
        .collect())
}

/// A VM left alone after a stop.
fn not_started(t: &Target) -> VmOutcome {
    VmOutcome {
        vm: t.name.clone(),
        backup: None,
        agent_version: None,
        entries: 0,
        file_bytes: 0,
        new_bytes: 0,
        stored_bytes: 0,
        duration_ms: 0,
        error: Some(format!("VM {}: not started (interrupted)", t.name)),
        skipped: 0,
        log: vec![],
    }
}

/// What `receive` calls with each log line: keeps it in `log` and shows
/// it through `on_log`, both only within the bound.
pub(crate) fn logger<'a>(
    log: &'a Mutex<AgentLog>,
    vm: &'a str,
    on_log: &'a (dyn Fn(&str, &str) + Sync),
) -> impl Fn(&str) + Sync + 'a {
    move |line: &str| {
        if log.lock().expect("lock").push(line) {
            on_log(vm, line);
        }
    }
}

fn one(
    repo: &Arc<Repository>,
    t: &Target,
    opts: &Options,
    version: &str,
    on_log: &(dyn Fn(&str, &str) + Sync),
) -> VmOutcome {
    let t0 = Instant::now();
    let log = Mutex::new(AgentLog::default());
    let say = logger(&log, &t.name, on_log);
    let _span = tracing::info_span!("agent_backup", vm = %t.name).entered();
    let r = backup_vm(repo, t, opts, &say);
    drop(say);
    let mut o = VmOutcome {
        vm: t.name.clone(),
        backup: None,
        agent_version: Some(version.to_string()),
        entries: 0,
        file_bytes: 0,
        new_bytes: 0,
        stored_bytes: 0,
        duration_ms: 0,
        error: None,
        skipped: 0,
        log: vec![],
    };
    match r {
        Ok(c) => {
            o.backup = Some(c.id.clone());
            o.agent_version = c.source["agent_version"].as_str().map(str::to_string);
            o.entries = c.entries.len() as u64;
            o.file_bytes = c.file_bytes;
            o.new_bytes = c.new_bytes;
            o.stored_bytes = c.stored_bytes;
        }
        Err(e) => o.error = Some(e.to_string()),
    }
    o.duration_ms = t0.elapsed().as_millis() as u64;
    let log = log.into_inner().expect("lock");
    if let Some(s) = log.summary() {
        on_log(&t.name, &s);
    }
    o.skipped = log.skipped;
    o.log = log.into_lines();
    o
}

fn backup_vm(
    repo: &Arc<Repository>,
    t: &Target,
    opts: &Options,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Catalog> {
    let job = Job::Backup {
        paths: opts.paths.clone(),
        hooks: opts.hooks.clone(),
        allow_quiesced_stream: opts.allow_quiesced_stream,
        // This host takes hole frames: a sparse file's holes do not cross
        // the channel (agents before them ignore this and send zeros).
        holes: true,
        // This host sends keep-alives to an agent that waits for the
        // acknowledgement while they come (older agents ignore this).
        keepalive: true,
    };
    // Held from before the first chunk is stored until the catalog is
    // published: no garbage collection sweeps in between.
    let lock = crate::repo::locks::WriterLock::acquire(repo, &t.name)?;
    let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
    let catalog = run_in_guest(
        t,
        &opts.container,
        &job,
        deadline,
        "agent-backup",
        &opts.stop,
        |stream| receive(repo, stream, deadline, t, opts, say),
    )
    .map_err(|e| {
        if e.kind() == ErrorKind::Interrupted {
            Error::interrupted(format!("{e}; no backup was published"))
        } else {
            e
        }
    })?;
    // Published only now: the container is off the VM. The lock is held
    // through the publication: a signal's `release_all` waits for it
    // rather than removing the lock under it.
    let _held = lock.hold()?;
    repo.publish_catalog_within(catalog, std::time::SystemTime::now(), opts.catalog_limits)
}

/// Reads the agent's stream into the repository, within `deadline`: the
/// catalog (not yet published). A catalog that grows past
/// `opts.catalog_limits` stops it (it could not be published).
pub(crate) fn receive(
    repo: &Arc<Repository>,
    stream: &UnixStream,
    deadline: Deadline,
    t: &Target,
    opts: &Options,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Catalog> {
    let mut fr = FrameReader::new(
        std::io::BufReader::with_capacity(1 << 20, deadline.reader(stream)),
        "the agent's stream",
    );
    let hello = match fr.next_frame()? {
        Frame::Hello(h) => h,
        Frame::Error(m) => return Err(agent_failed(m)),
        other => {
            return Err(Error::corrupt(format!(
                "the agent's stream began with {}",
                describe(&other)
            )))
        }
    };
    say(&hello.describe());
    if let Some(w) = hello.warning() {
        say(&w);
    }
    // An agent that waits for the acknowledgement while the host is
    // alive hears from it every few seconds, however far behind a slow
    // store leaves the host (agents before it take any byte for the
    // acknowledgement: they get none).
    let keepalive = hello.has(super::stream::FEATURE_ACK_WAIT);
    let done = AtomicBool::new(false);
    let (sink, entries) = std::thread::scope(|s| {
        if keepalive {
            s.spawn(|| keep_alive(stream, &done));
        }
        // Set however `entries` ends, a panic included: the scope waits
        // for the keep-alive thread (review26 L2).
        let _done = SetOnDrop(&done);
        let r = entries(repo, &mut fr, opts, say);
        #[cfg(test)]
        std::thread::sleep(ACK_DELAY.get());
        r
    })?;
    // All of it came: let the agent exit. The end frame proved the stream
    // whole, so an agent that already went (one before keep-alives gives
    // up after 30 s) does not make it less so.
    if let Err(e) = send_byte(stream, b'A') {
        tracing::debug!(error = %e, "acknowledge the agent's stream");
    }
    Ok(Catalog {
        format: CATALOG_FORMAT,
        vm: t.name.clone(),
        id: String::new(),
        created: String::new(),
        created_unix: 0,
        source: serde_json::json!({
            "agent_version": hello.version,
            "agent_binary": hello.binary,
            "paths": opts.paths,
            "hooks": opts.hooks,
        }),
        file_bytes: sink.file_bytes,
        stored_bytes: sink.stored_bytes(),
        new_bytes: sink.new_bytes,
        entries,
    })
}

/// The entries of the stream up to its end frame, their contents stored.
fn entries(
    repo: &Arc<Repository>,
    fr: &mut FrameReader<impl std::io::Read>,
    opts: &Options,
    say: &(dyn Fn(&str) + Sync),
) -> Result<(ChunkSink, Vec<crate::repo::catalog::Entry>)> {
    let mut sink = ChunkSink::default();
    let mut entries = vec![];
    // The entries' JSON so far: about the catalog's size.
    let mut json_bytes = 0u64;
    // Paths received: an agent before it dropped overlapping `--paths`
    // sends what two of them cover twice; kept once (`files restore`
    // refuses a path twice).
    let mut received = std::collections::HashSet::new();
    let mut repeated = 0u64;
    loop {
        match fr.next_frame()? {
            Frame::Log(l) => say(&l),
            Frame::Error(m) => return Err(agent_failed(m)),
            Frame::Header(mut e) => {
                e.check_header()?;
                if received.contains(&e.path) {
                    repeated += 1;
                    if e.kind == EntryKind::File {
                        let mut content = fr.content_logging(e.size, say);
                        std::io::copy(&mut content, &mut std::io::sink()).map_err(stream_error)?;
                    }
                    continue;
                }
                opts.catalog_limits.check_entries(entries.len() + 1)?;
                if e.kind == EntryKind::File {
                    let size = e.size;
                    e.chunks = sink.store_sparse(repo, fr.content_logging(size, say))?;
                }
                e.check()?;
                json_bytes += serde_json::to_vec(&e).expect("json").len() as u64 + 1;
                opts.catalog_limits.check_bytes(json_bytes)?;
                received.insert(e.path.clone());
                entries.push(e);
            }
            Frame::End(_) => break,
            other => {
                return Err(Error::corrupt(format!(
                    "the agent's stream: unexpected {}",
                    describe(&other)
                )))
            }
        }
    }
    if repeated > 0 {
        say(&format!(
            "{repeated} {} came a second time (overlapping --paths): each is in the backup once",
            if repeated == 1 { "entry" } else { "entries" }
        ));
    }
    Ok((sink, entries))
}

/// How often the host sends a keep-alive byte to an agent that waits for
/// the acknowledgement ([`super::guest`]'s `ack`: it gives up after a
/// minute without one).
const HOST_KEEPALIVE: Duration = Duration::from_secs(2);

/// Sends a `K` byte every [`HOST_KEEPALIVE`] until `done`.
fn keep_alive(stream: &UnixStream, done: &AtomicBool) {
    let mut next = Instant::now() + HOST_KEEPALIVE;
    while !done.load(Ordering::SeqCst) {
        if Instant::now() >= next {
            // Full (an agent that does not read): passed over.
            let _ = send_byte(stream, b'K');
            next = Instant::now() + HOST_KEEPALIVE;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One byte to the agent, never blocking (a guest that reads nothing must
/// not hold the host).
fn send_byte(stream: &UnixStream, b: u8) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    send(
        stream.as_raw_fd(),
        &[b],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    )
    .map(|_| ())
    .map_err(std::io::Error::from)
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
thread_local! {
    /// Test seam: how long the host waits after the end frame before it
    /// acknowledges it (a host behind a slow store), keep-alives going on.
    pub(crate) static ACK_DELAY: std::cell::Cell<Duration> =
        const { std::cell::Cell::new(Duration::ZERO) };
}

/// An error reading a file's content: ours (carried through
/// `io::Error::other`) as it was.
fn stream_error(e: std::io::Error) -> Error {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<Error>())
        .cloned()
        .unwrap_or_else(|| Error::io("read the agent's stream", e))
}

fn agent_failed(m: String) -> Error {
    let kind = if m.contains("does not exist") {
        ErrorKind::NotFound
    } else {
        ErrorKind::Io
    };
    Error::new(kind, format!("the agent failed in the guest: {m}"))
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn entries_passed_over_are_counted_even_when_the_log_bound_drops_their_lines() {
        let mut log = AgentLog::default();
        for i in 0..MAX_LOG_LINES {
            assert!(log.push(&format!("hook: line {i}")));
        }
        assert!(!log.push("skipped /srv/t/bad\\xff (its name is not UTF-8)"));
        assert!(!log.push("skipped /run/x.sock (a socket, device or FIFO)"));
        assert_eq!(log.skipped, 2);
        assert!(log.summary().unwrap().starts_with("2 more log lines"));
    }
}
