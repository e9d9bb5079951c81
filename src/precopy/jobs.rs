//! Pre-copy jobs inside `serve` (the control API's `/precopy`): one thread
//! per VM running [`super::run`], into the daemon's repository, with its
//! state under `STAGING/precopy`. A job that ends (its backup taken, its
//! `until` reached, or failed) stays listed with its outcome until it is
//! deleted or another job for the VM starts; `DELETE` stops a running one
//! at its next checkpoint (state kept: a later job resumes it). Daemon
//! shutdown stops every job the same way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Control, End, LoadLimit, Options, Report, Status};
use crate::api::pathauth::{self, Caller, PinnedSocket};
use crate::error::{Error, Result};
use crate::repo::chunk::validate_chunk_size;
use crate::repo::Repository;

/// `POST /precopy`.
#[derive(Debug, Clone, Deserialize)]
pub struct StartRequest {
    pub vm: String,
    /// The VM's QMP socket (absolute).
    pub qmp: PathBuf,
    pub agent: Option<PathBuf>,
    /// Seconds between round starts (default 60).
    pub every: Option<f64>,
    /// Unix seconds: take the backup then.
    pub backup_at: Option<f64>,
    /// Unix seconds: stop then.
    pub until: Option<f64>,
    /// Bytes (default 1 MiB).
    pub chunk_size: Option<u32>,
    pub max_rate_mbps: Option<f64>,
    /// `latency=MS,queue=N,cpu=PCT`.
    pub load_limit: Option<String>,
}

/// One job as listed.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub running: bool,
    #[serde(flatten)]
    pub status: Status,
    /// The job's report once it ended well.
    pub report: Option<Report>,
}

struct Job {
    ctl: Arc<Control>,
    thread: Option<std::thread::JoinHandle<Result<Report>>>,
    report: Option<Report>,
    /// The sockets a caller that is not root named, held while the thread
    /// may connect through them.
    _pinned: Vec<PinnedSocket>,
}

impl Job {
    /// Collects the thread's outcome if it ended.
    fn reap(&mut self) {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            self.join();
        }
    }

    fn join(&mut self) {
        let Some(t) = self.thread.take() else { return };
        match t.join() {
            Ok(Ok(r)) => self.report = Some(r),
            // The job recorded its error in its status.
            Ok(Err(_)) => {}
            Err(p) => {
                let msg = crate::util::panic_message(&p);
                self.ctl.set(|s| {
                    s.state = "failed".into();
                    s.error = Some(format!("the job panicked: {msg}"));
                });
            }
        }
    }

    fn status(&self) -> JobStatus {
        JobStatus {
            running: self.thread.is_some(),
            status: self.ctl.status(),
            report: self.report.clone(),
        }
    }
}

pub struct Jobs {
    repo: Arc<Repository>,
    state_dir: PathBuf,
    jobs: Mutex<BTreeMap<String, Job>>,
}

impl Jobs {
    pub fn new(repo: Arc<Repository>, state_dir: PathBuf) -> Jobs {
        Jobs {
            repo,
            state_dir,
            jobs: Mutex::new(BTreeMap::new()),
        }
    }

    fn options(&self, r: StartRequest) -> Result<Options> {
        crate::util::validate_name("VM name", &r.vm)?;
        let time = super::unix_time;
        let end = match (r.backup_at, r.until) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid("give backup_at or until, not both"));
            }
            (Some(t), None) => End::BackupAt(time(t, "backup_at")?),
            (None, Some(t)) => End::Until(time(t, "until")?),
            (None, None) => End::Never,
        };
        let every = r.every.unwrap_or(60.0);
        if !(every.is_finite() && every > 0.0 && every <= 86400.0) {
            return Err(Error::invalid("every: more than 0, at most 86400 seconds"));
        }
        if !r.qmp.is_absolute() {
            return Err(Error::invalid("qmp: an absolute socket path"));
        }
        let opts = Options {
            vm: r.vm,
            qmp: r.qmp,
            agent: r.agent,
            state_dir: self.state_dir.clone(),
            chunk_size: validate_chunk_size(u64::from(r.chunk_size.unwrap_or(1 << 20)))?,
            every: Duration::from_secs_f64(every),
            end,
            max_rate: r.max_rate_mbps.map(|m| m * 1e6),
            checkpoint: Duration::from_secs(2),
            load_limit: r.load_limit.as_deref().map(LoadLimit::parse).transpose()?,
            hook: None,
        };
        // Refused here (400), not in the job's thread.
        super::check(&opts)?;
        Ok(opts)
    }

    /// Starts a job for `caller`; a VM whose job still runs is refused. A
    /// caller that is not root may name only sockets it could connect to
    /// itself, and the job connects to exactly those ([`pathauth`]).
    pub fn start(&self, mut r: StartRequest, caller: &Caller) -> Result<JobStatus> {
        let mut pinned = vec![];
        if let Some(p) = pathauth::socket(caller, "qmp", &r.qmp)? {
            r.qmp = p.path();
            pinned.push(p);
        }
        if let Some(agent) = r.agent.as_mut() {
            if let Some(p) = pathauth::socket(caller, "agent", agent)? {
                *agent = p.path();
                pinned.push(p);
            }
        }
        let opts = self.options(r)?;
        let mut jobs = self.jobs.lock().expect("jobs lock");
        if let Some(j) = jobs.get_mut(&opts.vm) {
            j.reap();
            if j.thread.is_some() {
                return Err(Error::busy(format!(
                    "a pre-copy job for VM {} is running",
                    opts.vm
                )));
            }
        }
        let ctl = Arc::new(Control::default());
        let (repo, c, o) = (self.repo.clone(), ctl.clone(), opts.clone());
        let thread = std::thread::Builder::new()
            .name(format!("precopy-{}", opts.vm))
            .spawn(move || super::run(&repo, &o, &c))
            .map_err(|e| Error::io("start a pre-copy thread", e))?;
        let job = Job {
            ctl,
            thread: Some(thread),
            report: None,
            _pinned: pinned,
        };
        let st = job.status();
        jobs.insert(opts.vm, job);
        Ok(st)
    }

    pub fn list(&self) -> Vec<JobStatus> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        jobs.values_mut()
            .map(|j| {
                j.reap();
                j.status()
            })
            .collect()
    }

    /// Stops a VM's job (at its next checkpoint) and forgets it; its last
    /// status.
    pub fn stop(&self, vm: &str) -> Result<JobStatus> {
        let job = self.jobs.lock().expect("jobs lock").remove(vm);
        let mut job =
            job.ok_or_else(|| Error::not_found(format!("no pre-copy job for VM {vm}")))?;
        job.ctl.stop();
        job.join();
        Ok(job.status())
    }

    /// Stops every job (daemon shutdown).
    pub fn shutdown(&self) {
        let all: Vec<Job> = std::mem::take(&mut *self.jobs.lock().expect("jobs lock"))
            .into_values()
            .collect();
        for j in &all {
            j.ctl.stop();
        }
        for mut j in all {
            j.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn request(backup_at: Option<f64>, until: Option<f64>) -> StartRequest {
        StartRequest {
            vm: "pc".into(),
            qmp: "/run/pc.qmp".into(),
            agent: None,
            every: None,
            backup_at,
            until,
            chunk_size: None,
            max_rate_mbps: None,
            load_limit: None,
        }
    }

    #[test]
    fn end_times_and_rates_out_of_range_are_invalid_requests_not_panics() {
        let (d, repo) = crate::vmbackup::tests::repo();
        let jobs = Jobs::new(repo, d.path().join("precopy"));
        for t in [1e20, f64::NAN, -1.0, f64::INFINITY, 1e12] {
            for (r, what) in [
                (request(Some(t), None), "backup_at"),
                (request(None, Some(t)), "until"),
            ] {
                let e = jobs.options(r).err().unwrap();
                assert_eq!(e.kind(), ErrorKind::InvalidInput, "{what} {t}: {e}");
                assert!(e.to_string().contains(what), "{what} {t}: {e}");
                assert!(!e.to_string().contains('\n'), "{e}");
            }
        }
        let o = jobs.options(request(Some(2e9), None)).unwrap();
        let t = std::time::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        assert_eq!(o.end, End::BackupAt(t));
        // A rate too low to wait out is refused before the job starts.
        let mut r = request(None, None);
        r.max_rate_mbps = Some(1e-20);
        let e = jobs.options(r).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("--max-rate"), "{e}");
    }
}
