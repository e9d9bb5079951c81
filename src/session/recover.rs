//! Starting (or resuming) a recovery session: choose the backup (kept
//! staging first), place it on an export point, pin a new session's
//! backup and check it is still there (`repo::forget` says why), open its
//! staging, build its volumes, mark it active, pin its backups and start
//! its prefetch.
//! The order is what makes a crash at any point safe: the session is
//! marked active (served again by a restarted daemon) only once its
//! staging is complete on disk (`open_session` writes `session.json`
//! last), and it is in the session table, visible to the frontends, only
//! after that. A recover that fails part way stops and closes what it
//! started (`Unstarted`): nothing of it runs on beside the session a
//! retried recover builds over the same files.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;

use super::kept::Chosen;
use super::points::Need;
use super::points::{resolve_host, PlaceRequest, PlacementRecord};
use super::{backup, upload, Datastore, OpenState, RecoverInfo, Session, DEFAULT_WORKING_SET};
use crate::error::{Error, Result};
use crate::placement::Decision;
use crate::prefetch::feeder::{Feeder, Source};
use crate::prefetch::profile;
use crate::prefetch::tracker::RecordWindow;
use crate::relocate::{Relocation, Reopened};
use crate::repo::Manifest;
use crate::staging::{open_session, StagingDir, Storage};
use crate::util::validate_name;
use crate::volume::Volume;

/// Removes NFS side files from a new session's directory: any there are
/// a discarded session's (a discard a crash interrupted), not this one's.
fn remove_stale_side_files(storage: &dyn Storage, dir: &std::path::Path) -> Result<()> {
    let files = crate::export::nfs::fs::side_dir_in(dir);
    match std::fs::remove_dir_all(&files) {
        Ok(()) => storage
            .sync_dir(dir)
            .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", files.display()), e)),
    }
}

impl Datastore {
    /// Starts (or resumes) serving a VM. Without `backup`, kept staging of
    /// the VM is resumed first so earlier guest writes are never hidden
    /// (refused if there is more than one to choose from); otherwise the
    /// newest backup is used.
    pub fn recover(&self, vm: &str, backup: Option<&str>) -> Result<RecoverInfo> {
        self.recover_placed(vm, backup, &PlaceRequest::default())
    }

    /// `recover`, placed on an export point as `req` asks.
    pub fn recover_placed(
        &self,
        vm: &str,
        backup: Option<&str>,
        req: &PlaceRequest,
    ) -> Result<RecoverInfo> {
        self.recover_second_copy(vm, backup, req, false)
    }

    /// `recover_placed`; with `second_copy`, also when another daemon
    /// serves the VM or keeps its staging (refused otherwise).
    pub fn recover_second_copy(
        &self,
        vm: &str,
        backup: Option<&str>,
        req: &PlaceRequest,
        second_copy: bool,
    ) -> Result<RecoverInfo> {
        self.recover_at(vm, backup, Placing::New { req, second_copy })
    }

    pub(super) fn recover_at(
        &self,
        vm: &str,
        backup: Option<&str>,
        placing: Placing,
    ) -> Result<RecoverInfo> {
        validate_name("VM name", vm)?;
        if let Some(b) = backup {
            validate_name("backup id", b)?;
        }
        let op = self.vm_op(vm);
        let _op = self.lock_op(vm, &op)?;
        if let Some(s) = self.session(vm) {
            if let Some(b) = backup.filter(|b| *b != s.backup) {
                // "Release it first" is wrong advice for a typo.
                if !self.repo.has_manifest(vm, b)? {
                    return Err(Error::not_found(format!(
                        "unknown backup \"{b}\" of VM {vm} (the VM is being recovered from backup {})",
                        s.backup
                    )));
                }
                return Err(Error::busy(format!(
                    "VM {vm} is already being recovered from backup {}; release it first",
                    s.backup
                )));
            }
            if let Placing::New {
                req:
                    PlaceRequest {
                        export_point: Some(p),
                        ..
                    },
                ..
            } = &placing
            {
                if p != "auto" && p != s.point.name() {
                    return Err(Error::busy(format!(
                        "VM {vm} is already served at export point {}; release it first to move it",
                        s.point.name()
                    )));
                }
            }
            return Ok(self.info(&s, true, vec![], None));
        }
        // A session served before a restart has a guest running on: its
        // reads are no boot, and must not become a recording of one.
        let restarted = matches!(placing, Placing::Kept { .. });
        let alone = matches!(
            placing,
            Placing::New {
                second_copy: false,
                ..
            }
        );
        // Which kept staging resumes decides where the VM may go: its
        // data stays in the staging directory it is in.
        // `reserved` is held until the session is in the table (any
        // return before drops it): recoveries placed meanwhile count it.
        let mut shortfall = None;
        let (point, host, decision, chosen, reserved) = match placing {
            Placing::New { req, .. } => {
                let chosen = self.choose_manifest(vm, backup, None)?;
                let need = self.expected_working_set(vm, &chosen.manifest);
                let (d, reserved) = self.place(vm, req, chosen.kept.as_ref(), need)?;
                let p = self.point(&d.chosen).expect("decided among ours").clone();
                shortfall = self.prefetch_shortfall(vm, need, &p);
                (p, req.host.clone(), Some(d), chosen, Some(reserved))
            }
            Placing::Kept {
                point,
                host,
                staging,
            } => {
                let mut chosen = self.choose_manifest(vm, backup, Some(&staging))?;
                let p = self.kept_point(vm, &point, &staging);
                chosen.kept = Some(staging);
                (p, host, None, chosen, None)
            }
        };
        let Chosen {
            manifest,
            skipped,
            kept,
        } = chosen;
        let new = kept.is_none();
        let staging = kept.unwrap_or_else(|| point.staging.clone());
        let dir = staging.session_dir(vm, &manifest.id);
        // Before anything is staged. Kept staging has its pin from when
        // it was released, and serves from its own copy of the manifest.
        let new_pin = match new {
            true => Some(self.pin_new_session(vm, &manifest.id, &staging)?),
            false => None,
        };
        let warnings = match alone {
            true => self.refuse_recovered_elsewhere(vm, &manifest.id)?,
            false => vec![],
        };
        let storage = staging.storage().clone();
        let (stores, resumed) = open_session(storage.as_ref(), &dir, &manifest)?;
        if !resumed {
            remove_stale_side_files(storage.as_ref(), &dir)?;
        }
        let backup_base = backup::load_base(storage.as_ref(), &dir, &manifest)?;
        let record = RecordWindow {
            start: Instant::now(),
            length: self.prefetch.record_window,
        };
        let disks = stores
            .into_iter()
            .enumerate()
            .map(|(i, st)| {
                Volume::new(
                    self.repo.clone(),
                    &manifest,
                    i,
                    st,
                    point.sched.clone(),
                    record,
                )
            })
            .collect::<Vec<_>>();
        // From here on a failure must leave nothing of this attempt behind.
        let mut unstarted = Unstarted {
            disks: disks.clone(),
            relocation: None,
            // Made by this attempt: no guest ever saw it.
            made: (!resumed).then(|| (staging.clone(), vm.to_string(), manifest.id.clone())),
        };
        for d in &disks {
            d.set_queue(point.queue.clone());
            d.attach_budget(staging.budget().clone(), dir.clone());
        }
        let mut config_json = serde_json::to_vec_pretty(&manifest.config).expect("json");
        config_json.push(b'\n');
        // A relocation in progress (or finished) survives restarts.
        let (relocation, not_resumed) = match Relocation::resume(crate::relocate::Source {
            storage: &storage,
            vm,
            disks: &disks,
            config_json: &config_json,
            session_dir: &dir,
        })? {
            Reopened::Live(r) => (Some(r), None),
            Reopened::NotResumed(h) => (None, Some(h)),
            Reopened::None => (None, None),
        };
        unstarted.relocation = relocation.clone();
        let session = Arc::new(Session {
            vm: vm.into(),
            backup: manifest.id.clone(),
            config_json,
            disks,
            serial: self.next_serial.fetch_add(1, Ordering::Relaxed),
            started: SystemTime::now(),
            resumed,
            dir,
            staging: staging.clone(),
            relocation: Mutex::new(relocation),
            relocation_not_resumed: Mutex::new(not_resumed),
            point: point.clone(),
            // A name that no longer resolves counts for no host.
            host_ip: host.as_deref().and_then(|h| resolve_host(h).ok()),
            host: host.clone(),
            feeder: OnceLock::new(),
            profile_done: AtomicBool::new(restarted),
            network: Default::default(),
            throwaway: self.is_throwaway(),
            state: Mutex::new(OpenState::default()),
            backup_base: Mutex::new(backup_base),
            backup_running: AtomicBool::new(false),
            backup_progress: Default::default(),
            upload: Mutex::new(None),
            upload_gate: Mutex::new(()),
            backup_gone: Mutex::new(None),
            repo_unreachable: Mutex::new(None),
            pin_owed: AtomicBool::new(false),
        });
        // Served from now on, at this export point, also by a daemon
        // restarted after a crash.
        let record = PlacementRecord {
            export_point: point.name().into(),
            host,
        };
        staging.mark_active(
            vm,
            &manifest.id,
            &serde_json::to_vec(&record).expect("json"),
        )?;
        // Nothing below fails: the session is started.
        unstarted.disarm();
        self.pin(&session, true);
        if let Some(p) = new_pin {
            p.keep();
        }
        self.start_prefetch(&session);
        upload::resume(&self.repo, &session);
        self.sessions.write().insert(vm.into(), session.clone());
        // Counted as a session from now on.
        drop(reserved);
        tracing::info!(vm, backup = %manifest.id, resumed, export_point = %point.name(), "recovery session started");
        let mut info = self.info(&session, false, skipped, decision);
        info.warnings = warnings;
        info.warnings.extend(shortfall);
        Ok(info)
    }

    /// Starts following the VM's profile; when the recording window
    /// closes, the session's own recording is saved.
    fn start_prefetch(&self, session: &Arc<Session>) {
        let sources = self.profile_sources(session);
        let (weak, repo): (Weak<Session>, _) = (Arc::downgrade(session), self.repo.clone());
        let on_window_end = Box::new(move || {
            if let Some(s) = weak.upgrade() {
                s.save_profile_logged(&repo);
            }
        });
        let disks = session.disks.iter().cloned().zip(sources).collect();
        let f = Feeder::start(
            &session.vm,
            disks,
            session.point.sched.clone(),
            self.prefetch.feeder.clone(),
            on_window_end,
        );
        let _ = session.feeder.set(f);
    }

    /// What a new recovery of `vm` from `m` is expected to stage (for
    /// admission under bounded staging): its operational profile's blocks
    /// (unless `serve --no-profile`: a profile not followed stages
    /// nothing), else `DEFAULT_WORKING_SET`; never more than its disks.
    fn expected_working_set(&self, vm: &str, m: &Manifest) -> Need {
        let disks: u64 = m.disks.iter().map(|d| d.size).sum();
        if !self.stagings.all().iter().any(|s| s.budget().is_limited()) {
            return Need::from(0);
        }
        let profiled = match self.prefetch.use_profile {
            false => None,
            true => match profile::load(&self.repo, vm) {
                Ok(Some(doc)) => Some(
                    doc.merge()
                        .iter()
                        .map(|d| d.blocks.len() as u64 * d.block_size)
                        .sum(),
                ),
                _ => None,
            },
        };
        let (bytes, from) = match profiled {
            Some(p) if p > 0 => (p, "from its operational profile"),
            _ if !self.prefetch.use_profile => {
                (DEFAULT_WORKING_SET, "the default: serve --no-profile")
            }
            _ => (DEFAULT_WORKING_SET, "the default: no operational profile"),
        };
        let prefetched = profiled.is_some_and(|p| p > 0);
        match bytes > disks {
            true => Need {
                bytes: disks,
                from: Some("the size of its disks"),
                prefetched,
            },
            false => Need {
                bytes,
                from: Some(from),
                prefetched,
            },
        }
    }

    /// Per disk: the stored profile mapped onto this backup, else the
    /// default one. A damaged profile only costs its prefetch.
    fn profile_sources(&self, s: &Session) -> Vec<Source> {
        let none = || s.disks.iter().map(|_| Source::Nothing).collect();
        if !self.prefetch.use_profile {
            return none();
        }
        let merged = match profile::load(&self.repo, &s.vm) {
            Ok(doc) => doc.map(|d| d.merge()).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(vm = %s.vm, "ignoring the operational profile: {e}");
                vec![]
            }
        };
        s.disks
            .iter()
            .map(|d| match merged.iter().find(|m| m.index == d.index) {
                Some(m) => Source::Recorded(m.plan_for(d.block_size(), d.chunks())),
                None if self.prefetch.default_profile => Source::Default,
                None => Source::Nothing,
            })
            .collect()
    }

    pub(super) fn info(
        &self,
        s: &Session,
        already_active: bool,
        skipped: Vec<String>,
        placement: Option<Decision>,
    ) -> RecoverInfo {
        let dir = self.mount.join(&s.vm);
        RecoverInfo {
            vm: s.vm.clone(),
            backup: s.backup.clone(),
            resumed: s.resumed,
            skipped,
            already_active,
            warnings: vec![],
            config: dir.join("vm.json"),
            disks: s
                .disks
                .iter()
                .map(|d| dir.join(format!("disk{}.raw", d.index)))
                .collect(),
            urls: s.disks.iter().map(|d| self.disk_urls(s, d.index)).collect(),
            export_point: s.point.name().into(),
            host: s.host.clone(),
            placement,
        }
    }
}

/// What a recovery has started before it is served: undone on drop unless
/// disarmed, so a `recover` that fails part way leaves no copier running
/// on volumes no session serves (a retried `recover` builds new ones over
/// the same files: the orphan would copy stale data into the target and
/// could commit a cutover missing every later write) and no disk counted
/// as served by the staging budget.
struct Unstarted {
    disks: Vec<Arc<Volume>>,
    relocation: Option<Arc<Relocation>>,
    /// The session directory, if this attempt made it: removed, or it
    /// would stay as sparse disk-sized files that no session lists.
    made: Option<(Arc<StagingDir>, String, String)>,
}

impl Unstarted {
    fn disarm(&mut self) {
        self.disks.clear();
        self.relocation = None;
        self.made = None;
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        // The copier first (joined): it reads and writes through the disks.
        if let Some(r) = self.relocation.take() {
            r.stop();
        }
        for d in self.disks.drain(..) {
            d.close();
        }
        if let Some((staging, vm, backup)) = self.made.take() {
            if let Err(e) = staging.discard(&vm, &backup) {
                tracing::warn!(
                    vm,
                    backup,
                    "cannot remove the staging of a recover that failed: {e}"
                );
            }
        }
    }
}

/// How `recover_at` places a session.
pub(super) enum Placing<'a> {
    /// A new recovery: decide; refused if another daemon serves or keeps
    /// the VM, unless `second_copy`.
    New {
        req: &'a PlaceRequest,
        second_copy: bool,
    },
    /// A session that was served before the restart, found in `staging`:
    /// where it was (its recorded point and host).
    Kept {
        point: String,
        host: Option<String>,
        staging: Arc<StagingDir>,
    },
}
