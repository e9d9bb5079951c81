//! Keeping garbage collection and backups apart, across hosts.
//!
//! A backup writes its chunks first and its manifest last, and reuses any
//! chunk that already exists (deduplication). A collector that decided a
//! chunk was unreferenced could delete it between a writer's "it exists"
//! and that writer's manifest. Stores give no cross-host mutex, and
//! PBS's answer (touch reused chunks, collect only chunks untouched for a
//! grace period) relies on its chunk store living in one process: across
//! hosts the touch can land between the collector's check and its delete.
//! So recoverfs does what restic does, a readers-writer protocol of lock
//! objects in the repository:
//!
//! * A writer (`backup`, `backup-vms`, a live backup) puts
//!   `locks/backup-<random>.json`, *then* lists `locks/`. If a fresh
//!   `locks/gc-*` exists it removes its own lock, waits until none is
//!   left and starts over. Otherwise it holds its lock until its manifest
//!   is published.
//! * A collector puts `locks/gc-<random>.json`, *then* lists `locks/`
//!   until no fresh `backup-*` is left (the backups running finish; new
//!   ones back off, so a stream of backups cannot starve it), or gives up
//!   after its wait, removing its lock and nothing else. It sweeps only
//!   while it holds its lock with no writer seen.
//!
//! Each side writes before it reads, so with a store that reads its own
//! and others' completed writes (local directories; S3 and Garage are
//! read-after-write consistent) at least one of two racing parties sees
//! the other. A writer that saw no collector lock therefore knows that
//! every chunk, and every manifest's chunks, that exist once its lock is
//! acquired stay until it releases it; [`WriterLock::require_manifest`]
//! turns "I reuse the chunks of backup X" into that guarantee.
//!
//! Locks are refreshed (rewritten) every [`REFRESH`] by a thread; a lock
//! whose object was last modified more than [`STALE`] ago belongs to a
//! killed process and is ignored. Ages are read on the store's clock: the
//! store stamps every lock object, so a party that has just put its own
//! lock measures the others' against that lock's stamp, and a host clock
//! minutes off (S3 signing tolerates 15) cannot make a live lock look
//! dead. The host clock is used only when no own lock is in the listing
//! (a writer waiting for a collector, with its own lock removed; it
//! checks again with its lock put before it proceeds). A lock of a process on this host (same hostname, boot id and
//! pid namespace) that is gone, or whose pid another program has now
//! (start time), is stale at once and removed: waiting out [`STALE`] for
//! a holder known dead only delays backups or gc. A process that is
//! stopped by a signal removes its locks itself ([`release_all`]). A
//! lock dropped while the store does not answer (its refresh hangs, or
//! its removal) is left behind after a few seconds, logged, to go stale
//! like a killed process's: a failed backup is not held for more request
//! deadlines. A holder that could not refresh for half of [`STALE`] (it
//! was stopped, or the store was unreachable) no longer trusts its lock:
//! a writer refuses to publish, a collector stops sweeping. That is for
//! good, not until the next successful refresh: during the gap another
//! party may have taken the lock for dead (a collector swept chunks the
//! writer had counted on), and a fresh lock object cannot undo that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::Repository;
use crate::error::{Error, Result};
use crate::util::BootInstant;

/// How often a held lock is rewritten.
pub const REFRESH: Duration = Duration::from_secs(60);
/// A lock not rewritten for this long is a dead process's.
pub const STALE: Duration = Duration::from_secs(600);
const DIR: &str = "locks";
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Backup,
    Gc,
}

impl LockKind {
    fn prefix(self) -> &'static str {
        match self {
            LockKind::Backup => "backup-",
            LockKind::Gc => "gc-",
        }
    }
}

/// What a lock object says about its holder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockDoc {
    pub kind: LockKind,
    pub host: String,
    pub pid: u32,
    /// What it does: the VM being backed up, or `gc`.
    pub what: String,
    pub started: String,
    /// Which boot of `host` (`/proc/sys/kernel/random/boot_id`): with the
    /// pid namespace, what makes `pid` checkable from this host. Absent
    /// in older locks, which then only go stale by age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// `/proc/self/ns/pid` of the holder: containers share hostname and
    /// boot id but not pids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<String>,
    /// The holder's start time (clock ticks after boot, `/proc/PID/stat`),
    /// so a pid reused by another program is told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
}

/// This process as a lock names it: hostname, boot id, pid namespace.
struct Me {
    host: String,
    boot_id: Option<String>,
    pid_ns: Option<String>,
    /// `/proc` shows this pid namespace (`/proc/self` is our pid): else
    /// `/proc/PID/stat` is another namespace's process, and start times
    /// read there say nothing (a live holder would pass for reused).
    proc_is_ours: bool,
}

fn me() -> &'static Me {
    static ME: std::sync::OnceLock<Me> = std::sync::OnceLock::new();
    ME.get_or_init(|| Me {
        host: super::pins::hostname(),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        pid_ns: std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .map(|p| p.to_string_lossy().into_owned()),
        proc_is_ours: std::fs::read_link("/proc/self")
            .ok()
            .and_then(|p| p.to_str()?.parse::<u32>().ok())
            == Some(std::process::id()),
    })
}

/// Start time of process `pid` (field 22 of `/proc/PID/stat`), if readable
/// and `/proc` is this pid namespace's.
fn start_time(pid: u32) -> Option<u64> {
    if !me().proc_is_ours {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// A process as a lock or a throwaway recovery's pin names it: what makes
/// it checkable from another process of the same host, boot and pid
/// namespace (see `dead_process`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
}

/// This process, as `Owner`.
pub fn this_process() -> Owner {
    let me = me();
    Owner {
        host: me.host.clone(),
        pid: std::process::id(),
        boot_id: me.boot_id.clone(),
        pid_ns: me.pid_ns.clone(),
        start_time: start_time(std::process::id()),
    }
}

/// Why `o` is known dead: it ran on this host, in this boot and pid
/// namespace, and its pid is gone or belongs to another program. `None`
/// when that cannot be known (another host, an older record).
pub fn dead_process(o: &Owner) -> Option<String> {
    let me = me();
    let same_host = o.host == me.host
        && o.boot_id.is_some()
        && o.boot_id == me.boot_id
        && o.pid_ns.is_some()
        && o.pid_ns == me.pid_ns;
    let pid = i32::try_from(o.pid).ok().filter(|&p| p > 0)?;
    if !same_host {
        return None;
    }
    use nix::errno::Errno;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => Some(format!("pid {pid} on this host has exited")),
        // Alive (EPERM: another user's): unless the pid was reused.
        _ => match (o.start_time, start_time(o.pid)) {
            (Some(was), Some(now)) if was != now => Some(format!(
                "pid {pid} on this host is another program now (started at {now}, not {was})"
            )),
            _ => None,
        },
    }
}

/// Why a lock's holder is known dead (see `dead_process`).
fn dead_local_holder(doc: &LockDoc) -> Option<String> {
    dead_process(&Owner {
        host: doc.host.clone(),
        pid: doc.pid,
        boot_id: doc.boot_id.clone(),
        pid_ns: doc.pid_ns.clone(),
        start_time: doc.start_time,
    })
}

/// A fresh lock another process holds.
#[derive(Debug, Clone, Serialize)]
pub struct Holder {
    pub key: String,
    pub kind: LockKind,
    /// From the lock object, when it could be read.
    pub host: Option<String>,
    pub pid: Option<u32>,
    pub what: Option<String>,
    pub age_secs: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} by pid {} on {} (refreshed {} s ago)",
            match self.kind {
                LockKind::Backup => "backup",
                LockKind::Gc => "gc",
            },
            self.what.as_deref().unwrap_or("?"),
            self.pid.map_or("?".into(), |p| p.to_string()),
            self.host.as_deref().unwrap_or("?"),
            self.age_secs
        )
    }
}

/// Fresh locks of `kind` held by others. `own`: the caller's lock, put
/// (or refreshed) just before; its stamp in the listing is "now" on the
/// store's clock for every age (see the module doc), and it is never
/// among the holders.
pub fn holders(repo: &Repository, kind: LockKind, own: Option<&str>) -> Result<Vec<Holder>> {
    let listed = repo.backend().list_all(DIR)?;
    let now = store_now(&listed, own);
    let mut out = vec![];
    for o in listed {
        let name = o.key.rsplit('/').next().unwrap_or("");
        if !name.starts_with(kind.prefix()) || Some(o.key.as_str()) == own {
            continue;
        }
        let age_secs = now.saturating_sub(o.modified_unix);
        if age_secs > STALE.as_secs() {
            continue;
        }
        let doc: Option<LockDoc> = repo
            .backend()
            .get(&o.key, super::limits::MAX_META_BYTES)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(why) = doc.as_ref().and_then(dead_local_holder) {
            // Its holder can never remove or refresh it.
            match repo.backend().delete(&o.key) {
                Ok(()) => tracing::warn!(key = %o.key, "removed a stale repository lock: {why}"),
                Err(e) => {
                    tracing::warn!(key = %o.key, "a repository lock is stale ({why}) but could not be removed, so it is ignored: {e}")
                }
            }
            continue;
        }
        out.push(Holder {
            key: o.key.clone(),
            kind,
            host: doc.as_ref().map(|d| d.host.clone()),
            pid: doc.as_ref().map(|d| d.pid),
            what: doc.map(|d| d.what),
            age_secs,
        });
    }
    Ok(out)
}

/// "Now" on the store's clock: the stamp of the caller's own lock in the
/// listing, or the host's clock when it is not there. A host clock more
/// than a minute off the store's is logged once: it does not change what
/// is stale, but the lock's `started` and the ages it reports are off.
fn store_now(listed: &[super::backend::ObjectInfo], own: Option<&str>) -> u64 {
    let host_now = crate::util::now_unix();
    let Some(stamp) = own.and_then(|k| listed.iter().find(|o| o.key == k)) else {
        return host_now;
    };
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let skew = host_now.abs_diff(stamp.modified_unix);
    if skew > 60 && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            lock = %stamp.key,
            "this host's clock is {skew} s off the repository store's (the stamp of the lock just written); lock ages are read on the store's clock, but fix the host's time (NTP)"
        );
    }
    stamp.modified_unix
}

/// The locks this process holds, for [`release_all`].
static HELD: Mutex<Vec<(Arc<Repository>, String, Gate)>> = Mutex::new(Vec::new());

/// Taken for each step a lock protects (a refresh, a manifest's publication,
/// a batch of gc deletes) and by [`release_all`], which sets it: then the
/// lock object is gone, and no step runs again under it.
type Gate = Arc<Mutex<bool>>;

mod release;
pub use release::release_all;
#[cfg(test)]
use release::release_matching;

/// A lock object this process holds, refreshed by a thread, removed on drop.
struct Held {
    repo: Arc<Repository>,
    key: String,
    gate: Gate,
    fresh: Arc<Mutex<Freshness>>,
    /// Dropped to stop the refresh thread at once.
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Held {
    fn put(repo: &Arc<Repository>, kind: LockKind, what: &str) -> Result<Held> {
        let key = format!("{DIR}/{}{}.json", kind.prefix(), super::random_hex(8));
        let doc = LockDoc {
            kind,
            host: super::pins::hostname(),
            pid: std::process::id(),
            what: what.into(),
            started: crate::util::rfc3339(crate::util::now_unix()),
            boot_id: me().boot_id.clone(),
            pid_ns: me().pid_ns.clone(),
            start_time: start_time(std::process::id()),
        };
        let body = serde_json::to_vec_pretty(&doc).expect("serializable");
        repo.backend()
            .put(&key, &body)
            .map_err(|e| e.context("take a repository lock"))?;
        let fresh = Arc::new(Mutex::new(Freshness {
            last_ok: BootInstant::now(),
            lapsed: None,
        }));
        let gate = Gate::default();
        // Registered before anything can fail, so a signal now removes it.
        HELD.lock().push((repo.clone(), key.clone(), gate.clone()));
        let mut held = Held {
            repo: repo.clone(),
            key: key.clone(),
            gate: gate.clone(),
            fresh: fresh.clone(),
            stop: None,
            thread: None,
        };
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = {
            let repo = repo.clone();
            std::thread::Builder::new()
                .name("repo-lock".into())
                .spawn(move || refresh_loop(&repo, &key, &body, &gate, &fresh, &stopped))
                .map_err(|e| Error::io("start the lock refresh thread", e))?
        };
        held.stop = Some(stop);
        held.thread = Some(thread);
        Ok(held)
    }

    /// Holds the lock for one protected step (see [`Gate`]), which must
    /// not run once the lock is released or no longer trusted.
    fn hold(&self) -> Result<parking_lot::MutexGuard<'_, bool>> {
        let g = self.gate.lock();
        if *g {
            return Err(released(&self.key));
        }
        self.check_fresh_gated()?;
        Ok(g)
    }

    fn check_fresh(&self) -> Result<()> {
        if *self.gate.lock() {
            return Err(released(&self.key));
        }
        self.check_fresh_gated()
    }

    /// Whether the lock was refreshed recently enough, and every time
    /// since it was taken, to be trusted.
    fn check_fresh_gated(&self) -> Result<()> {
        let mut f = self.fresh.lock();
        if let Some(gap) = f.lapsed {
            return Err(Error::busy(format!(
                "the repository lock {} once went {} s without a refresh (process stopped or store unreachable): others may have taken it for dead meanwhile, so it is not trusted again",
                self.key,
                gap.as_secs()
            )));
        }
        if let Some(gap) = f.note_gap() {
            return Err(Error::busy(format!(
                "the repository lock {} was not refreshed for {} s (process stopped or store unreachable): others may have taken it for dead",
                self.key,
                gap.as_secs()
            )));
        }
        Ok(())
    }
}

/// When a held lock was last rewritten, and whether it ever went too long
/// without (then it stays untrusted: see the module doc).
struct Freshness {
    /// On the boot clock: a holder suspended past its lease must see it.
    last_ok: BootInstant,
    /// The first gap longer than `STALE / 2` seen.
    lapsed: Option<Duration>,
}

impl Freshness {
    /// Records a lapse if the time since the last rewrite is too long;
    /// returns it if this call is the one that found it.
    fn note_gap(&mut self) -> Option<Duration> {
        let since = self.last_ok.elapsed();
        if since > STALE / 2 && self.lapsed.is_none() {
            self.lapsed = Some(since);
            return self.lapsed;
        }
        None
    }
}

/// A lock released by [`release_all`] (the process is stopping).
fn released(key: &str) -> Error {
    Error::interrupted(format!(
        "the repository lock {key} was released (the process is stopping)"
    ))
}

fn refresh_loop(
    repo: &Repository,
    key: &str,
    body: &[u8],
    gate: &Mutex<bool>,
    fresh: &Mutex<Freshness>,
    stopped: &crossbeam_channel::Receiver<()>,
) {
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH) {
        refresh_once(repo, key, body, gate, fresh);
    }
}

/// One rewrite of the lock object, never after a release (it would put
/// the removed object back). The gap is measured once the write is
/// done, before `last_ok` moves on, so a lapse is seen even if nobody
/// called `check_fresh` during it.
fn refresh_once(
    repo: &Repository,
    key: &str,
    body: &[u8],
    gate: &Mutex<bool>,
    fresh: &Mutex<Freshness>,
) {
    let released = gate.lock();
    if *released {
        return;
    }
    let started = BootInstant::now();
    let put = repo.backend().put(key, body);
    let mut f = fresh.lock();
    if let Some(gap) = f.note_gap() {
        tracing::warn!(
            key,
            "a repository lock was not refreshed for {} s: it is no longer trusted",
            gap.as_secs()
        );
    }
    match put {
        Ok(()) => f.last_ok = started,
        Err(e) => tracing::warn!(key, "could not refresh a repository lock: {e}"),
    }
}

/// How long dropping a lock waits for its refresh thread's request and
/// then for its removal when the store is failing
/// (`Backend::answering`), and how long [`release_all`] waits for all its
/// removals beyond its `wait`: a store that just failed to answer would
/// hold a failed backup for two more request deadlines (explore9 M4:
/// 3 × 60 s in all). A lock left behind goes stale by design: at once for
/// this host once the process is gone, after [`STALE`] for others.
const RELEASE_WAIT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(5)
};

/// How long dropping a lock waits on a store that answers, however
/// slowly: about one S3 request deadline. A lock left behind by a run
/// that succeeded would block other hosts' backups or gc for [`STALE`]
/// (review28 M1), and a CLI process exits right after the drop, killing
/// a removal still under way. Bounded all the same: a local repository
/// on a share that stops answering reports itself answering, and must
/// not hang the process for good (review29 H1).
const PATIENT_WAIT: Duration = if cfg!(test) {
    Duration::from_secs(3)
} else {
    Duration::from_secs(65)
};

impl Drop for Held {
    fn drop(&mut self) {
        // Stops the refresh thread at its next wait; a refresh in flight
        // holds the gate until its request ends.
        drop(self.stop.take());
        let thread = self.thread.take();
        HELD.lock().retain(|(_, k, _)| *k != self.key);
        let left = |what: &str| {
            tracing::warn!(
                key = %self.key,
                "a repository lock was left behind ({what}): it goes stale in {} s, at once for this host once this process is gone",
                STALE.as_secs()
            );
        };
        let wait = match self.repo.backend().answering() {
            true => PATIENT_WAIT,
            false => RELEASE_WAIT,
        };
        // The release runs on a thread of its own, waited for `wait`. If
        // the store answers later, it still ends there in a process that
        // lives on (the daemon), so a refresh that was in flight does not
        // leave the lock looking held.
        let (done, ended) = crossbeam_channel::bounded(1);
        let (repo, key, gate) = (self.repo.clone(), self.key.clone(), self.gate.clone());
        let spawned = std::thread::Builder::new()
            .name("repo-unlock".into())
            .spawn(move || {
                let _ = done.send(release(&repo, &key, &gate, thread));
            });
        let r = match spawned {
            Ok(_) => ended.recv_timeout(wait),
            Err(_) => Ok(release(&self.repo, &self.key, &self.gate, None)),
        };
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => left(&format!("could not remove it: {e}")),
            Err(_) => left(&format!(
                "the store did not answer in {} s; the removal goes on while this process lives",
                wait.as_secs_f32()
            )),
        }
    }
}

/// Removes lock `key` once, under its gate, so that no refresh puts the
/// object back after it and none runs while a protected step does; `Ok`
/// also when `release_all` removed it first. Joins the refresh `thread`
/// (told to stop: it ends at once once the gate was free).
fn release(
    repo: &Repository,
    key: &str,
    gate: &Mutex<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
) -> Result<()> {
    let mut released = gate.lock();
    if std::mem::replace(&mut *released, true) {
        return Ok(());
    }
    drop(released);
    if let Some(t) = thread {
        let _ = t.join();
    }
    repo.backend().delete(key)
}

/// A backup writer's lock: while held, no collector sweeps.
pub struct WriterLock(Held);

impl WriterLock {
    /// Takes a writer lock for backing up `vm`, waiting while a
    /// collector holds (or waits for) the repository.
    pub fn acquire(repo: &Arc<Repository>, vm: &str) -> Result<WriterLock> {
        Self::acquire_until(repo, vm, &|| Ok(()))
    }

    /// [`WriterLock::acquire`] that gives up with `stop`'s error, asked at
    /// every poll while a collector holds the repository (a live backup
    /// whose client went away must not wait for a long gc to end).
    pub fn acquire_until(
        repo: &Arc<Repository>,
        vm: &str,
        stop: &dyn Fn() -> Result<()>,
    ) -> Result<WriterLock> {
        let mut said = false;
        loop {
            stop()?;
            let held = Held::put(repo, LockKind::Backup, vm)?;
            let gcs = holders(repo, LockKind::Gc, Some(&held.key))?;
            if gcs.is_empty() {
                return Ok(WriterLock(held));
            }
            // Back off, so the collector is not kept waiting by us.
            drop(held);
            if !said {
                tracing::warn!(
                    vm,
                    "waiting for a garbage collection of the repository to finish: {}",
                    gcs[0]
                );
                said = true;
            }
            // At least one poll: with no lock of its own to read the
            // store's clock by, a host clock far ahead sees no collector
            // here and would put its lock again at once, in a loop.
            std::thread::sleep(POLL);
            while !holders(repo, LockKind::Gc, None)?.is_empty() {
                stop()?;
                std::thread::sleep(POLL);
            }
        }
    }

    /// Before publishing a manifest: the lock must still be trusted.
    pub fn check_fresh(&self) -> Result<()> {
        self.0.check_fresh()
    }

    /// [`WriterLock::check_fresh`], and the lock stays until the guard is
    /// dropped: a signal's [`release_all`] waits for the publication.
    pub fn hold(&self) -> Result<impl Drop + '_> {
        self.0.hold()
    }

    /// Checks that backup `id` of `vm` exists now: its chunks then stay
    /// for as long as this lock is held, so a writer may reuse them.
    pub fn require_manifest(&self, vm: &str, id: &str) -> Result<()> {
        if self.0.repo.has_manifest(vm, id)? {
            return Ok(());
        }
        Err(Error::not_found(format!(
            "backup {id} of VM {vm} is no longer in the repository (forgotten), so its chunks cannot be reused: take a full backup"
        )))
    }
}

/// A collector's lock, held with no writer seen.
pub struct GcLock(Held);

impl GcLock {
    /// Takes the collector lock and waits until no writer holds the
    /// repository, for at most `wait`; `Busy` naming the writers after.
    pub fn acquire(repo: &Arc<Repository>, wait: Duration) -> Result<GcLock> {
        Self::acquire_for(repo, wait, "gc")
    }

    /// As [`GcLock::acquire`], for `command` (named in the refusal).
    pub fn acquire_for(repo: &Arc<Repository>, wait: Duration, command: &str) -> Result<GcLock> {
        let deadline = Instant::now() + wait;
        let held = Held::put(repo, LockKind::Gc, "gc")?;
        loop {
            let writers = holders(repo, LockKind::Backup, Some(&held.key))?;
            if writers.is_empty() {
                return Ok(GcLock(held));
            }
            if Instant::now() >= deadline {
                let each: Vec<String> = writers.iter().map(|h| h.to_string()).collect();
                return Err(Error::busy(format!(
                    "{} backup(s) in progress ({}); nothing was removed: run {command} again later or give a longer --wait (a session uploader holds its lock until the next backup --session)",
                    writers.len(),
                    each.join("; ")
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn check_fresh(&self) -> Result<()> {
        self.0.check_fresh()
    }

    /// As [`WriterLock::hold`], for a batch of deletes.
    pub fn hold(&self) -> Result<impl Drop + '_> {
        self.0.hold()
    }
}

#[cfg(test)]
pub(crate) mod tests;
