//! `agent-backup`: granular file backups of running VMs through the agent
//! container, one VM per worker, `--jobs` at a time.
//!
//! Per VM: check the container (`agent.json` read with debugfs) and the
//! guest agent (no answer: one clear error, nothing attached); attach the
//! container and a stream port ([`super::attach`]); `guest-exec` a small
//! shell script that waits for the disk and port, mounts the container
//! read-only, runs `recoverfs agent run` from it and unmounts it; receive
//! the stream, chunking file contents into the repository as they come;
//! acknowledge the end; wait for the script's exit; detach; and only then
//! publish the catalog. Any failure (no agent, a missing path, a failed
//! hook, a container that does not attach, the agent or the VM killed, a
//! truncated stream, a failed detach) publishes nothing; the chunks
//! already stored are unreferenced and harmless, as after a failed disk
//! backup.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::attach::Attachment;
use super::exec::{self, shell_quote, Exited};
use super::guest::Job;
use super::stream::{describe, Frame, FrameReader};
use crate::error::{Error, ErrorKind, Result};
use crate::qemu::guest_agent::GuestAgent;
use crate::qemu::qmp::Qmp;
use crate::repo::catalog::{Catalog, ChunkSink, EntryKind, CATALOG_FORMAT};
use crate::repo::Repository;

/// One VM to back up: `NAME=QMP_SOCKET[,qga=QGA_SOCKET]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub qmp: PathBuf,
    pub qga: Option<PathBuf>,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        let bad = || Error::invalid(format!("--vm {s:?}: expected NAME=QMP_SOCKET[,qga=QGA_SOCKET]"));
        let (name, rest) = s.split_once('=').ok_or_else(bad)?;
        crate::util::validate_name("VM name", name)?;
        let (qmp, qga) = match rest.split_once(",qga=") {
            Some((q, g)) if !g.is_empty() => (q, Some(PathBuf::from(g))),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        if qmp.is_empty() {
            return Err(bad());
        }
        Ok(Target {
            name: name.to_string(),
            qmp: PathBuf::from(qmp),
            qga,
        })
    }
}

pub struct Options {
    pub container: PathBuf,
    pub paths: Vec<String>,
    pub hooks: Vec<String>,
    pub jobs: usize,
    /// Longest silence on the stream (a hook may take a while).
    pub idle_timeout: Duration,
}

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
        return Err(Error::invalid("--paths: name at least one path in the guest"));
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
                let o = one(repo, t, opts, &cfg.version, on_log);
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

fn one(
    repo: &Arc<Repository>,
    t: &Target,
    opts: &Options,
    version: &str,
    on_log: &(dyn Fn(&str, &str) + Sync),
) -> VmOutcome {
    let t0 = Instant::now();
    let log = Mutex::new(vec![]);
    let say = |line: &str| {
        on_log(&t.name, line);
        log.lock().expect("lock").push(line.to_string());
    };
    let _span = tracing::info_span!("agent_backup", vm = %t.name).entered();
    let r = backup_vm(repo, t, opts, &say);
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
    o.log = log.into_inner().expect("lock");
    o
}

fn backup_vm(
    repo: &Arc<Repository>,
    t: &Target,
    opts: &Options,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Catalog> {
    let qga = t.qga.as_ref().ok_or_else(|| {
        Error::invalid(format!(
            "VM {}: no guest agent socket given (--vm {}=QMP,qga=QGA_SOCKET): the agent is started through qemu-guest-agent, and no serial-console login is configured",
            t.name, t.name
        ))
    })?;
    let mut ga = GuestAgent::connect(qga, crate::qemu::guest_agent::SYNC_TIMEOUT).map_err(|e| {
        Error::new(
            e.kind(),
            format!("VM {}: no guest agent answers ({e}); agent-backup needs qemu-guest-agent running in the guest", t.name),
        )
    })?;
    let qmp = Qmp::connect(&t.qmp).map_err(|e| e.context(format!("VM {}", t.name)))?;
    let mut att = Attachment::attach(qmp, &opts.container).map_err(|e| {
        e.context(format!(
            "VM {}: cannot attach the agent container {} (nothing is left attached)",
            t.name,
            opts.container.display()
        ))
    })?;
    let result = run_job(repo, &mut ga, &mut att, t, opts, say);
    // Detach whatever happened; a backup is published only once it is off.
    let detached = att.detach();
    let catalog = match (result, detached) {
        (Ok(c), Ok(())) => c,
        (Ok(_), Err(e)) => return Err(e),
        (Err(e), Ok(())) => return Err(e),
        (Err(e), Err(d)) => {
            // A VM that is gone has nothing attached any more.
            tracing::warn!(error = %d, "detach after a failure");
            return Err(e);
        }
    };
    repo.publish_catalog(catalog)
}

/// The script `guest-exec` runs: wait for the container disk and the
/// port, mount, run the agent, unmount.
fn script(att: &Attachment, job: &Job) -> String {
    let job = serde_json::to_string(job).expect("json");
    format!(
        r#"ser={ser}; port=/dev/virtio-ports/{port}; mnt=/run/recoverfs-agent-{id}
dev=
i=0
while [ $i -lt 600 ]; do
  for d in /dev/disk/by-id/*_"$ser"; do [ -b "$d" ] && dev=$d; done
  if [ -z "$dev" ]; then
    for b in /sys/block/sd*; do
      grep -qa "$ser" "$b/device/vpd_pg80" 2>/dev/null && dev=/dev/${{b##*/}}
    done
  fi
  [ -n "$dev" ] && [ -e "$port" ] && break
  sleep 0.1; i=$((i+1))
done
[ -n "$dev" ] || {{ echo "the agent container (disk serial $ser) did not appear in the guest within 60 s" >&2; exit 90; }}
[ -e "$port" ] || {{ echo "the stream port $port did not appear in the guest within 60 s" >&2; exit 91; }}
mkdir -p "$mnt" && mount -t ext4 -o ro "$dev" "$mnt" || {{ echo "cannot mount the agent container $dev" >&2; exit 92; }}
"$mnt/recoverfs" agent run --port "$port" --container "$mnt" --job {job}
rc=$?
umount "$mnt" || umount -l "$mnt"
rmdir "$mnt"
exit $rc
"#,
        ser = att.serial,
        port = att.port,
        id = att.id,
        job = shell_quote(&job),
    )
}

fn run_job(
    repo: &Arc<Repository>,
    ga: &mut GuestAgent,
    att: &mut Attachment,
    t: &Target,
    opts: &Options,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Catalog> {
    let job = Job::Backup {
        paths: opts.paths.clone(),
        hooks: opts.hooks.clone(),
    };
    let stream = att.stream.take().expect("attached with a stream");
    stream
        .set_read_timeout(Some(opts.idle_timeout))
        .map_err(|e| Error::io("stream socket", e))?;
    let pid = exec::spawn(ga, &["/bin/sh", "-c", &script(att, &job)])
        .map_err(|e| e.context(format!("VM {}: start the agent through guest-exec", t.name)))?;
    let done = AtomicBool::new(false);
    let killer = stream.try_clone().map_err(|e| Error::io("stream socket", e))?;
    std::thread::scope(|s| {
        // Watches the guest process; if it ends and the stream does not
        // follow, closes the stream so the reader stops.
        let watcher = s.spawn(|| -> Result<Exited> {
            let r = watch(ga, pid, &done);
            let grace = Instant::now() + Duration::from_secs(10);
            while !done.load(Ordering::SeqCst) && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(100));
            }
            if !done.load(Ordering::SeqCst) {
                let _ = killer.shutdown(std::net::Shutdown::Both);
            }
            r
        });
        let received = receive(repo, &stream, t, opts, say);
        done.store(true, Ordering::SeqCst);
        let exited = watcher.join().expect("watcher thread");
        finish(received, exited, t)
    })
}

/// Polls the guest process until it ends (or `done` and it ended).
fn watch(ga: &mut GuestAgent, pid: i64, done: &AtomicBool) -> Result<Exited> {
    let mut since_done: Option<Instant> = None;
    loop {
        if let Some(e) = exec::status(ga, pid)? {
            return Ok(e);
        }
        if done.load(Ordering::SeqCst) {
            let t = *since_done.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(60) {
                return Err(Error::new(
                    ErrorKind::Io,
                    "the agent did not exit within 60 s of its stream's end",
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The catalog, if both the stream and the guest process ended well.
fn finish(received: Result<Catalog>, exited: Result<Exited>, t: &Target) -> Result<Catalog> {
    let vm = &t.name;
    match (received, exited) {
        (Ok(c), Ok(e)) if e.success() => Ok(c),
        (Ok(_), Ok(e)) => Err(Error::new(
            ErrorKind::Io,
            format!("VM {vm}: the agent ended with {}: {}", e.status(), e.stderr.trim()),
        )),
        (Err(r), Ok(e)) if !e.success() && !e.stderr.trim().is_empty() && r.kind() != ErrorKind::NotFound => {
            Err(Error::new(
                r.kind(),
                format!("VM {vm}: {r} (the agent script ended with {}: {})", e.status(), last_line(&e.stderr)),
            ))
        }
        (Err(r), _) => Err(r.context(format!("VM {vm}"))),
        (Ok(_), Err(e)) => Err(e.context(format!("VM {vm}: the agent's exit status"))),
    }
}

fn last_line(s: &str) -> &str {
    s.trim().lines().last().unwrap_or("")
}

/// Reads the agent's stream into the repository: the catalog (not yet
/// published).
pub(crate) fn receive(
    repo: &Arc<Repository>,
    stream: &UnixStream,
    t: &Target,
    opts: &Options,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Catalog> {
    let mut fr = FrameReader::new(
        std::io::BufReader::with_capacity(1 << 20, stream),
        "the agent's stream",
    );
    let hello = match fr.next()? {
        Frame::Hello(h) => h,
        Frame::Error(m) => return Err(agent_failed(m)),
        other => {
            return Err(Error::corrupt(format!(
                "the agent's stream began with {}",
                describe(&other)
            )))
        }
    };
    say(&format!("agent {} (recoverfs {})", hello.version, hello.binary));
    let mut sink = ChunkSink::default();
    let mut entries = vec![];
    loop {
        match fr.next()? {
            Frame::Log(l) => say(&l),
            Frame::Error(m) => return Err(agent_failed(m)),
            Frame::Header(mut e) => {
                e.check_header()?;
                if e.kind == EntryKind::File {
                    let size = e.size;
                    e.chunks = sink.store(repo, fr.content(size))?;
                }
                e.check()?;
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
    // All of it came: let the agent exit.
    let mut w = stream;
    w.write_all(b"A")
        .map_err(|e| Error::io("acknowledge the agent's stream", e))?;
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

fn agent_failed(m: String) -> Error {
    let kind = if m.contains("does not exist") {
        ErrorKind::NotFound
    } else {
        ErrorKind::Io
    };
    Error::new(kind, format!("the agent failed in the guest: {m}"))
}
