//! `precopy`: between scheduled backups of a running QEMU VM, copy the
//! blocks it changes into the repository in the background, so that at
//! the scheduled time only the blocks changed since the last round are
//! left to read. Beside the other disk-copying jobs (`vmbackup` for
//! running VMs, `session::backup` for recovered ones, whose counterpart of
//! pre-copy is `session::upload`, sharing [`Throttle`]), built on `qemu`
//! (QMP, dirty bitmaps, NBD) and `vmbackup` (the final backup).
//!
//! **Rounds.** A cycle runs from one backup to the next. Round bitmaps
//! `rfs-pc-<cycle>-<n>` live in QEMU on each disk's node, at chunk
//! granularity; the newest one records guest writes. A round:
//! 1. one QMP `transaction` adds bitmap `n+1` and disables bitmap `n` on
//!    every disk (one instant for all disks);
//! 2. exports each disk's *running* node read-only on QEMU's NBD server
//!    with the frozen bitmaps, and reads the chunks they mark (skipping
//!    ranges `base:allocation` says are zeros): from the image file itself
//!    where the node is a plain raw file QEMU has open, else over NBD
//!    (see [`direct`]: NBD reads cost the guest latency);
//! 3. stores them as chunks (deduplicated as usual) and records, at each
//!    checkpoint, which chunk holds each block (`state.json`, replaced
//!    atomically and durably, chunks first);
//! 4. after the last checkpoint, removes the frozen bitmaps.
//!
//! **Why it is never wrong.** Per chunk the state keeps its chunk id and
//! `since`: the round bitmap index from which on every write to the block
//! is marked. A chunk read while bitmap `n+1` records gets `since = n+1`:
//! the read came after that bitmap started, so any later write is in it
//! or a newer one (a torn read does not matter: the write that tore it is
//! marked, and read again in a later round). A round reads every chunk
//! that a frozen bitmap `j >= since` marks, and every chunk never read;
//! after it, every chunk is proven by bitmap `n+1` alone. So at any time
//! the recorded id of a chunk is its current content unless a bitmap
//! `>= since` marks it.
//!
//! **Start.** With no usable state, a new cycle starts from the VM's newest
//! backup whose since-backup bitmaps QEMU still has, recording
//! (`backup-vms` keeps one per disk, "since last backup", never cleared,
//! and records it in the manifest): its chunk ids, and bitmap 0 = a
//! disabled copy of that bitmap made in the same transaction that adds
//! bitmap 1. Without one, every chunk is unknown and the first round reads
//! the whole disk.
//!
//! **At the scheduled time** (`--backup-at`), after a complete round: a
//! `backup-vms` backup of the VM ([`crate::vmbackup`], same snapshot,
//! views, agent freeze and manifest format) given the recorded chunk ids
//! and the newest round bitmap as its base. It disables that bitmap at the
//! snapshot and reads only what it marks; every other chunk takes the
//! recorded id. The manifest (mode `precopy`) records the new backup's own
//! since-backup bitmaps, so `backup-vms --incremental`, restore and the
//! next cycle work from it; the state file is then removed. A failed final
//! backup re-enables the round bitmap and merges its new bitmap into it in
//! one QMP transaction (vmbackup's hand-back), so the state stays valid; if
//! that fails, the bitmaps go and the next run starts a new cycle. A stop
//! (SIGINT/SIGTERM, `DELETE`, daemon shutdown) before that backup starts
//! skips it, also during the round before it: the state stays and the next
//! run resumes. Once started (its snapshot), the backup runs to its end.
//!
//! **Crashes and lost state.** `kill -9` leaves QEMU's bitmaps and the last
//! checkpoint: the next run resumes the cycle (chunks recorded at the
//! checkpoint are not read again unless written since), provided every
//! bitmap from the oldest `since` to the newest exists and the newest
//! records. Otherwise (QEMU restarted, `backup-vms` ran and removed the
//! bitmaps, state damaged or deleted) the cycle starts over from the
//! since-backup bitmap, or in full, and the report says so. Leftover
//! exports and other cycles' bitmaps are removed at start.
//!
//! **Garbage collection.** Pre-copied chunks are referred to by no
//! manifest until the scheduled backup, so the job holds a writer lock
//! (`repo::locks`) for its life: `gc` sweeps nothing meanwhile. Between
//! runs nothing protects them: a resumed job checks that every recorded
//! chunk still exists and reads the missing ones again; the final backup
//! refuses a chunk it cannot find (a plain incremental instead).
//!
//! **Where the state lives.** `--state DIR` (default
//! `/var/lib/recoverfs/precopy`), `DIR/<repository id>/<vm>/state.json`, so
//! it works for S3 repositories too and never mixes repositories. The job
//! holds `lock` beside it and QEMU's one QMP connection for its lifetime
//! (so `backup-vms` cannot run on the VM meanwhile; the final backup
//! reconnects).

mod cycle;
mod direct;
mod jobs;
mod priority;
mod record;
mod round;
mod state;
mod throttle;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::vmbackup::VmReport;

pub use jobs::{JobStatus, Jobs, StartRequest};
pub use state::{State, StateDir};
pub use throttle::{Gate, IoCounts, Load, LoadLimit, LoadSource, Throttle};

/// The lowest `--max-rate`, bytes per second (an 8 MiB chunk then takes
/// two minutes): near 0 one chunk would wait for ages, and below about
/// 1e-13 its due time overflows a `Duration`.
pub const MIN_RATE: f64 = 65536.0;

/// The latest end time taken, unix seconds (9999-12-31T23:59:59Z): later
/// ones overflow `Duration` or `SystemTime`, or print as no date.
pub const MAX_UNIX: f64 = 253_402_300_799.0;

/// Unix seconds `t` as a time; `what` names it in the one-line error.
pub fn unix_time(t: f64, what: &str) -> Result<SystemTime> {
    if !(t.is_finite() && (0.0..=MAX_UNIX).contains(&t)) {
        return Err(Error::invalid(format!(
            "{what}: expected unix seconds (0 to {MAX_UNIX})"
        )));
    }
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(t))
}

/// Where the state lives unless told.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/recoverfs/precopy";

/// When the job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Take the backup at this time, then end.
    BackupAt(SystemTime),
    /// Stop pre-copying at this time (state and bitmaps kept).
    Until(SystemTime),
    /// Until stopped.
    Never,
}

#[derive(Clone)]
pub struct Options {
    pub vm: String,
    pub qmp: PathBuf,
    /// The guest agent's socket, to freeze filesystems for the final backup.
    pub agent: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub chunk_size: u32,
    /// From one round's start to the next.
    pub every: Duration,
    pub end: End,
    /// Bytes per second a round may read (none: no limit).
    pub max_rate: Option<f64>,
    /// How often a round records its progress durably.
    pub checkpoint: Duration,
    /// Back off when the guest is this busy (none: never).
    pub load_limit: Option<LoadLimit>,
    /// Passed to the final backup (tests act at its snapshot).
    pub hook: Option<crate::vmbackup::Hook>,
}

/// What one round did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RoundReport {
    /// The bitmap that records writes from this round's start.
    pub round: u64,
    /// Chunks the frozen bitmaps mark (or unknown).
    pub dirty_chunks: u64,
    /// Chunks read (from the image file or over NBD).
    pub chunks_read: u64,
    /// Marked chunks recorded as zeros without a read.
    pub zero_chunks: u64,
    /// Marked chunks not read again: recorded by an interrupted round
    /// after their mark (a resume after a crash).
    pub already_recorded: u64,
    pub bytes_read: u64,
    pub new_bytes: u64,
    pub checkpoints: u64,
    /// Per disk: the image file read directly, or `NBD: <why not the file>`.
    pub read_from: Vec<String>,
    /// Time the guest's load held reads back (throttled or halted).
    pub held_ms: f64,
    pub ms: f64,
}

/// The scheduled backup.
#[derive(Debug, Clone, Serialize)]
pub struct FinalReport {
    pub backup: Option<String>,
    /// `precopy`, or the fallback's `incremental`/`full`.
    pub mode: String,
    /// Why the pre-copied chunks were not used, if they were not.
    pub fallback: Option<String>,
    /// Chunks the final step read over NBD.
    pub chunks_read: u64,
    /// Chunks the since-backup bitmap marked just before (what a plain
    /// incremental would read), if it exists.
    pub since_backup_chunks: Option<u64>,
    pub vm: VmReport,
}

/// What a job did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub vm: String,
    pub cycle: String,
    /// How the job started: resumed, or a new cycle (from which backup).
    pub start: String,
    pub warnings: Vec<String>,
    pub rounds: Vec<RoundReport>,
    #[serde(rename = "final")]
    pub final_backup: Option<FinalReport>,
}

/// A job's state as `status` shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    pub vm: String,
    /// `starting`, `copying`, `throttled`, `halted`, `waiting`, `backup`,
    /// `done`, `stopped`, `failed`.
    pub state: String,
    pub why: String,
    /// The guest's load as last sampled.
    pub load: Option<Load>,
    pub cycle: String,
    pub rounds: u64,
    pub last_round: Option<RoundReport>,
    pub backup_at: Option<String>,
    pub warnings: Vec<String>,
    pub error: Option<String>,
}

/// Shared between a job and whoever watches or stops it.
#[derive(Default)]
pub struct Control {
    stop: AtomicBool,
    status: Mutex<Status>,
}

impl Control {
    /// Asks the job to end at its next checkpoint (state kept).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().expect("status lock"))
    }

    /// Sleeps until `t` or a stop, calling `tick` every load sample;
    /// false if stopped.
    fn sleep_until(&self, t: SystemTime, tick: &mut dyn FnMut()) -> bool {
        loop {
            if self.stopping() {
                return false;
            }
            let left = t.duration_since(SystemTime::now()).unwrap_or_default();
            if left.is_zero() {
                return true;
            }
            tick();
            std::thread::sleep(left.min(throttle::SAMPLE));
        }
    }
}

fn check(opts: &Options) -> Result<()> {
    crate::util::validate_name("VM name", &opts.vm)?;
    if opts.every.is_zero() {
        return Err(Error::invalid("--every must be more than 0 seconds"));
    }
    if let Some(r) = opts.max_rate {
        if r.is_nan() || r < MIN_RATE {
            return Err(Error::invalid(format!(
                "--max-rate must be at least {} MB/s (64 KiB/s)",
                MIN_RATE / 1e6
            )));
        }
    }
    Ok(())
}

/// Runs a pre-copy job (see the module docs) until its end, a stop, or an
/// error that leaves nothing to go on with.
pub fn run(repo: &Arc<Repository>, opts: &Options, ctl: &Control) -> Result<Report> {
    check(opts)?;
    let backup_at = match opts.end {
        End::BackupAt(t) => Some(t),
        _ => None,
    };
    ctl.set(|s| {
        s.vm = opts.vm.clone();
        s.state = "starting".into();
        s.backup_at = backup_at.map(|t| crate::util::rfc3339(unix(t)));
    });
    let dir = StateDir::open(&opts.state_dir, repo.id(), &opts.vm)?;
    let mut job = round::Job::start(repo.clone(), opts, dir)?;
    let mut report = Report {
        vm: opts.vm.clone(),
        cycle: job.cycle().to_string(),
        start: job.start.clone(),
        warnings: job.warnings.clone(),
        ..Default::default()
    };
    ctl.set(|s| {
        s.cycle = report.cycle.clone();
        s.warnings = report.warnings.clone();
    });
    let r = run_rounds(&mut job, opts, ctl, &mut report);
    let r = r.and_then(|()| match (opts.end, ctl.stopping()) {
        (End::BackupAt(_), false) => {
            ctl.set(|s| {
                s.state = "backup".into();
                s.why = "the scheduled backup".into();
            });
            report.final_backup = job.final_backup(opts, ctl)?;
            Ok(())
        }
        _ => Ok(()),
    });
    match &r {
        Ok(()) => ctl.set(|s| {
            s.state = if ctl.stopping() { "stopped" } else { "done" }.into();
            s.why.clear();
        }),
        Err(e) => ctl.set(|s| {
            s.state = "failed".into();
            s.error = Some(e.to_string());
        }),
    }
    r.map(|()| report)
}

/// Rounds every `opts.every` until the end time (the scheduled backup's
/// or `--until`) or a stop. A failed round is reported and retried at
/// the next tick: its checkpoints and QEMU's bitmaps keep it correct.
fn run_rounds(
    job: &mut round::Job,
    opts: &Options,
    ctl: &Control,
    report: &mut Report,
) -> Result<()> {
    let end = match opts.end {
        End::BackupAt(t) | End::Until(t) => Some(t),
        End::Never => None,
    };
    let mut failures = 0;
    loop {
        let started = SystemTime::now();
        if ctl.stopping() || end.is_some_and(|e| started >= e) {
            break;
        }
        ctl.set(|s| {
            s.state = "copying".into();
            s.why = format!("round {}", job.next_round());
        });
        match job.round(opts, ctl, true) {
            Ok(r) => {
                failures = 0;
                ctl.set(|s| {
                    s.rounds += 1;
                    s.last_round = Some(r.clone());
                    s.error = None;
                });
                report.rounds.push(r);
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(vm = %opts.vm, "pre-copy round failed: {e}");
                ctl.set(|s| s.error = Some(e.to_string()));
                if failures >= 3 {
                    return Err(e.context("three pre-copy rounds in a row failed"));
                }
            }
        }
        let mut next = started + opts.every;
        if let Some(e) = end {
            next = next.min(e);
        }
        ctl.set(|s| {
            s.state = "waiting".into();
            s.why = format!("next round at {}", crate::util::rfc3339(unix(next)));
        });
        if !ctl.sleep_until(next, &mut || job.sample_idle(ctl)) {
            break;
        }
    }
    Ok(())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
