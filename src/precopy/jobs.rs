//! Pre-copy jobs inside `serve` (the control API's `/precopy`): one thread
//! per VM running [`super::run`], into the daemon's repository, with its
//! state under `STAGING/precopy`. A job that ends (its backup taken, its
//! `until` reached, or failed) stays listed with its outcome until it is
//! deleted or another job for the VM starts; `DELETE` stops a running one
//! at its next checkpoint (state kept: a later job resumes it). Daemon
//! shutdown stops every job the same way.
//!
//! **Restarts.** A started job's request is recorded durably
//! ([`super::record`]) before `POST` answers, and a new daemon starts every
//! recorded job again ([`Jobs::restore`]): the schedule survives an
//! upgrade, crash or reboot, and the job resumes its round state. The
//! record goes with `DELETE` and with the job's end, failed ones too: a
//! failure is listed (and logged) for the administrator to act on, and a
//! job that failed must not come back by itself at the next restart,
//! perhaps after the administrator has started another one by hand. So a
//! job restarted after a reboot before its VM's QEMU is up fails and is
//! listed failed. A `backup_at` that passed while the daemon was down is
//! taken at once, as a `POST` naming a past time would: a late backup is
//! what the schedule asked for, a missed one would leave the gap unseen
//! (its status says it was late); an `until` that passed ends the job.
//! A record that cannot be read is logged and left as it is (for the
//! administrator to inspect or remove); it never stops the daemon.
//!
//! **Whose job.** A caller that is not root was authorised with its
//! credentials as the kernel recorded them ([`pathauth`]); they are
//! recorded with the job, and a restarted daemon checks the sockets again
//! with them, as at `POST` (and that the caller may still use the control
//! socket), and pins them again. A job that no longer passes is not
//! started: it is listed failed with the reason. The recorded groups are
//! those of the caller's connection: a user removed from a group since is
//! still checked with it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::record::{self, Record};
use super::{Control, End, LoadLimit, Options, Report, Status};
use crate::api::pathauth::{self, Caller, PinnedSocket};
use crate::api::peer::PeerPolicy;
use crate::error::{Error, Result};
use crate::repo::chunk::validate_chunk_size;
use crate::repo::Repository;

/// `POST /precopy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Set if a restarted daemon started (or refused) this job from its
    /// record: when and why.
    pub restarted: Option<String>,
}

struct Job {
    ctl: Arc<Control>,
    thread: Option<std::thread::JoinHandle<Result<Report>>>,
    report: Option<Report>,
    restarted: Option<String>,
    /// The sockets a caller that is not root named, held while the thread
    /// may connect through them (dropped once it ended: an ended job stays
    /// listed, and must not hold descriptors meanwhile).
    pinned: Vec<PinnedSocket>,
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
        let ended = t.join();
        self.pinned.clear();
        match ended {
            Ok(Ok(r)) => self.report = Some(r),
            // A job that failed before its rounds (no QMP, its lock held)
            // has not recorded its error yet.
            Ok(Err(e)) => self.ctl.set(|s| {
                if s.state != "failed" {
                    s.state = "failed".into();
                    s.error = Some(e.to_string());
                }
            }),
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
            restarted: self.restarted.clone(),
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

    /// Starts a job for `caller`, recorded durably first; a VM whose job
    /// still runs is refused. A caller that is not root may name only
    /// sockets it could connect to itself, and the job connects to exactly
    /// those ([`pathauth`]).
    pub fn start(&self, r: StartRequest, caller: &Caller) -> Result<JobStatus> {
        self.launch(r, caller, None)
    }

    /// [`Self::start`]; `restarted`: the job comes from its record (kept
    /// as it is), saying so.
    fn launch(
        &self,
        mut r: StartRequest,
        caller: &Caller,
        restarted: Option<String>,
    ) -> Result<JobStatus> {
        let asked = r.clone();
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
        let repo_id = self.repo.id().to_string();
        if restarted.is_none() {
            record::save(&self.state_dir, &repo_id, &Record::new(asked, caller))?;
        }
        let ctl = Arc::new(Control::default());
        // Listed by name at once, before its thread gets to it.
        ctl.set(|s| {
            s.vm = opts.vm.clone();
            s.state = "starting".into();
        });
        let (repo, c, o, root) = (
            self.repo.clone(),
            ctl.clone(),
            opts.clone(),
            self.state_dir.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("precopy-{}", opts.vm))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    super::run(&repo, &o, &c)
                }));
                // A stop (DELETE, daemon shutdown) before the backup is not
                // an end: the record stays (DELETE removes it itself).
                let ended = match &r {
                    Ok(Ok(report)) => report.final_backup.is_some() || !c.stopping(),
                    Ok(Err(e)) => {
                        // Also for a job a restarted daemon started, which
                        // no client may be watching.
                        tracing::error!(vm = %o.vm, "pre-copy job failed: {e}");
                        true
                    }
                    Err(_) => true,
                };
                if ended {
                    if let Err(e) = record::remove(&root, &repo_id, &o.vm) {
                        let e = format!(
                            "the job's record stays (a restarted daemon would start it again): {e}"
                        );
                        tracing::error!(vm = %o.vm, "pre-copy job ended: {e}");
                        c.set(|s| s.error = Some(e));
                    }
                }
                r.unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                let e = Error::io("start a pre-copy thread", e);
                if restarted.is_none() {
                    if let Err(r) = record::remove(&self.state_dir, self.repo.id(), &opts.vm) {
                        return Err(e.context(format!("its record stays: {r}")));
                    }
                }
                return Err(e);
            }
        };
        let job = Job {
            ctl,
            thread: Some(thread),
            report: None,
            restarted,
            pinned,
        };
        let st = job.status();
        jobs.insert(opts.vm, job);
        Ok(st)
    }

    /// Starts every job recorded under the daemon's staging again (daemon
    /// start, before the control API serves), as the module docs say; each
    /// outcome is logged, and returned.
    pub fn restore(&self, policy: &PeerPolicy) -> Vec<String> {
        let records = match record::load_all(&self.state_dir, self.repo.id()) {
            Ok(r) => r,
            Err(e) => {
                let m = format!("pre-copy jobs not restarted: {e}");
                tracing::error!("{m}");
                return vec![m];
            }
        };
        let mut said = vec![];
        for (path, r) in records {
            match r {
                Err(e) => {
                    let m = format!(
                        "pre-copy job record {} left as it is, no job started: {e}",
                        path.display()
                    );
                    tracing::error!("{m}");
                    said.push(m);
                }
                Ok(r) => said.push(self.restart(r, policy)),
            }
        }
        said
    }

    /// Starts one recorded job again; what was done, logged. A job that
    /// is not started is listed with why, and its record removed.
    fn restart(&self, r: Record, policy: &PeerPolicy) -> String {
        let vm = r.request.vm.clone();
        let was = format!(
            "pre-copy job of VM {vm} (started {} by uid {})",
            crate::util::rfc3339(r.started),
            r.caller.uid
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let passed = |t: Option<f64>| {
            t.filter(|t| *t <= now)
                .map(|t| crate::util::rfc3339(t as u64))
        };
        let not_started = if let Some(t) = passed(r.request.until) {
            Some((
                "done",
                format!("its until ({t}) passed while the daemon was down"),
            ))
        } else if !policy.allows(&r.caller) {
            Some((
                "failed",
                format!(
                    "not restarted: uid {} may no longer use the control socket",
                    r.caller.uid
                ),
            ))
        } else {
            let note = match passed(r.request.backup_at) {
                Some(t) => format!(
                    "restarted with the daemon; its backup_at ({t}) passed while the daemon was down: the backup is taken now"
                ),
                None => "restarted with the daemon".to_string(),
            };
            match self.launch(r.request, &r.caller, Some(note.clone())) {
                Ok(_) => {
                    let m = format!("{was}: {note}");
                    tracing::info!("{m}");
                    return m;
                }
                Err(e) => Some(("failed", format!("not restarted: {e}"))),
            }
        };
        let (state, why) = not_started.expect("returned if started");
        let mut m = format!("{was}: {why}");
        // Its end, as for a job that ended running: the record goes.
        if let Err(e) = record::remove(&self.state_dir, self.repo.id(), &vm) {
            m = format!("{m}; its record stays: {e}");
        }
        if state == "failed" {
            tracing::error!("{m}");
        } else {
            tracing::info!("{m}");
        }
        let ctl = Arc::new(Control::default());
        ctl.set(|s| {
            s.vm = vm.clone();
            s.state = state.into();
            if state == "failed" {
                s.error = Some(why.clone());
            } else {
                s.why = why.clone();
            }
        });
        let job = Job {
            ctl,
            thread: None,
            report: None,
            restarted: Some(m.clone()),
            pinned: vec![],
        };
        self.jobs.lock().expect("jobs lock").insert(vm, job);
        m
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

    /// Stops a VM's job (at its next checkpoint) and forgets it, its
    /// record first (a failure leaves the job as it was); its last status.
    pub fn stop(&self, vm: &str) -> Result<JobStatus> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        if !jobs.contains_key(vm) {
            return Err(Error::not_found(format!("no pre-copy job for VM {vm}")));
        }
        record::remove(&self.state_dir, self.repo.id(), vm)?;
        let mut job = jobs.remove(vm).expect("checked above");
        drop(jobs);
        job.ctl.stop();
        job.join();
        Ok(job.status())
    }

    /// Stops every job (daemon shutdown); their records stay, for the next
    /// daemon.
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

    fn allow_all() -> PeerPolicy {
        PeerPolicy {
            owner: 0,
            group: Some(4242),
        }
    }

    #[test]
    fn a_damaged_record_is_logged_and_left_and_does_not_keep_the_others_from_starting() {
        let (d, repo) = crate::vmbackup::tests::repo();
        let root = d.path().join("precopy");
        // A sound record (its VM has no QEMU: the job starts, then fails).
        let mut good = request(None, None);
        good.qmp = d.path().join("no-qemu.sock");
        record::save(&root, repo.id(), &Record::new(good, &Caller::root())).unwrap();
        let damaged = root.join(repo.id()).join("db").join("job.json");
        std::fs::create_dir_all(damaged.parent().unwrap()).unwrap();
        let garbage = b"{\"checksum\": \"00\", \"precopy_job\": {\"format\": 1}}\n";
        std::fs::write(&damaged, garbage).unwrap();
        // A state directory without a record is no job.
        std::fs::create_dir_all(root.join(repo.id()).join("web")).unwrap();
        let jobs = Jobs::new(repo.clone(), root.clone());
        let said = jobs.restore(&allow_all());
        assert_eq!(said.len(), 2, "{said:?}");
        let bad = said.iter().find(|m| m.contains("/db/")).unwrap();
        assert!(bad.contains("left as it is, no job started"), "{bad}");
        assert!(!bad.contains('\n'), "{bad}");
        assert_eq!(std::fs::read(&damaged).unwrap(), garbage);
        let listed: Vec<String> = jobs.list().into_iter().map(|j| j.status.vm).collect();
        assert_eq!(listed, ["pc"]);
        jobs.shutdown();
    }

    #[test]
    fn a_restarted_job_whose_caller_may_no_longer_use_its_socket_or_the_daemon_is_listed_failed_not_started(
    ) {
        use std::os::unix::fs::PermissionsExt;
        let (d, repo) = crate::vmbackup::tests::repo();
        let root = d.path().join("precopy");
        let caller = Caller {
            uid: 4242,
            gid: 4242,
            groups: vec![],
        };
        // The caller could connect when it started the job; since then
        // the socket's directory was closed to it.
        let dir = d.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let mut r = request(None, None);
        r.qmp = sock.clone();
        assert!(pathauth::socket(&caller, "qmp", &sock).unwrap().is_some());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        record::save(&root, repo.id(), &Record::new(r.clone(), &caller)).unwrap();
        let jobs = Jobs::new(repo.clone(), root.clone());
        let said = jobs.restore(&allow_all());
        assert!(said[0].contains("uid 4242 may not connect"), "{said:?}");
        let j = &jobs.list()[0];
        assert!(!j.running, "{j:?}");
        assert_eq!(j.status.state, "failed", "{j:?}");
        assert!(
            j.status.error.as_deref().unwrap().contains("not restarted"),
            "{j:?}"
        );
        assert!(j.restarted.is_some(), "{j:?}");
        assert!(!record::path(&root, repo.id(), "pc").exists());
        // A daemon whose socket group the caller is not in.
        record::save(&root, repo.id(), &Record::new(r, &caller)).unwrap();
        let jobs = Jobs::new(repo.clone(), root.clone());
        let policy = PeerPolicy {
            owner: 0,
            group: Some(7),
        };
        let said = jobs.restore(&policy);
        assert!(
            said[0].contains("may no longer use the control socket"),
            "{said:?}"
        );
        assert_eq!(jobs.list()[0].status.state, "failed");
        assert!(!record::path(&root, repo.id(), "pc").exists());
    }

    #[test]
    fn a_recorded_job_whose_until_passed_while_the_daemon_was_down_is_listed_done_not_started() {
        let (d, repo) = crate::vmbackup::tests::repo();
        let root = d.path().join("precopy");
        let mut r = request(None, Some(1e9));
        r.qmp = d.path().join("no-qemu.sock");
        record::save(&root, repo.id(), &Record::new(r, &Caller::root())).unwrap();
        let jobs = Jobs::new(repo.clone(), root.clone());
        let said = jobs.restore(&allow_all());
        assert!(
            said[0].contains("until (2001-09-09T01:46:40Z) passed"),
            "{said:?}"
        );
        let j = &jobs.list()[0];
        assert!(!j.running, "{j:?}");
        assert_eq!(j.status.state, "done", "{j:?}");
        assert!(j.status.error.is_none(), "{j:?}");
        assert!(!record::path(&root, repo.id(), "pc").exists());
    }

    /// Descriptors of this process open on `path`.
    fn fds_on(path: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
            .count()
    }

    #[test]
    fn a_job_that_ended_no_longer_holds_the_sockets_its_caller_named() {
        use std::os::unix::fs::PermissionsExt;
        let (d, repo) = crate::vmbackup::tests::repo();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        // A socket the caller may use, with no QEMU behind it: the job
        // starts, then fails at once.
        let sock = d.path().join("gone.qmp");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let caller = Caller {
            uid: 4242,
            gid: 4242,
            groups: vec![],
        };
        let jobs = Jobs::new(repo, d.path().join("precopy"));
        let mut r = request(None, None);
        r.qmp = sock.clone();
        jobs.start(r, &caller).unwrap();
        let t = std::time::Instant::now();
        while jobs.list()[0].running {
            assert!(t.elapsed() < Duration::from_secs(20), "the job never ended");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(jobs.list()[0].status.state, "failed");
        assert_eq!(fds_on(&sock), 0, "an ended job still holds its socket");
        jobs.shutdown();
    }
}
