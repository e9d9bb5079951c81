//! Which backup a recovery starts from: the newest (or named) backup
//! that verifies, or a session kept at release, on whichever staging
//! directory and export point it was kept.

use std::sync::Arc;

use super::Datastore;
use crate::error::{Error, Result};
use crate::placement::ExportPoint;
use crate::repo::Manifest;
use crate::staging::StagingDir;
use crate::util::{human_bytes, rfc3339, validate_name};

impl Datastore {
    /// The manifest to serve, the staging directory of its kept session
    /// (none: a new session), and the kept sessions passed over because
    /// their backup is gone. Every staging directory is searched (or only
    /// `within`). A named backup's own kept copy wins, so a kept session
    /// resumes even while the repository is unreachable.
    pub(super) fn choose_manifest(
        &self,
        vm: &str,
        backup: Option<&str>,
        within: Option<&Arc<StagingDir>>,
    ) -> Result<Chosen> {
        let kept = self.kept_sessions(vm, within);
        if let Some(b) = backup {
            // Its kept session, newest first; then a copy left by one
            // interrupted while it was created.
            let mut dirs: Vec<&Arc<StagingDir>> = kept
                .iter()
                .filter(|(k, _)| k == b)
                .map(|(_, s)| s)
                .collect();
            for s in self.search(within) {
                if !dirs.iter().any(|d| Arc::ptr_eq(d, s)) {
                    dirs.push(s);
                }
            }
            for s in dirs {
                if let Some(m) = self.kept_copy(s, vm, b)? {
                    warn_if_kept_twice(vm, b, s, &kept);
                    return Ok(Chosen::kept(m, vec![], s));
                }
            }
            return Ok(Chosen::new(self.repo.manifest(vm, b)?, vec![]));
        }
        let mut skipped = vec![];
        let mut resumable: Vec<(Manifest, &Arc<StagingDir>)> = vec![];
        for (b, s) in &kept {
            // One backup kept twice is one choice: the newer copy.
            if resumable.iter().any(|(m, _)| &m.id == b) {
                continue;
            }
            match self.kept_backup(s, vm, b)? {
                Some(m) => resumable.push((m, s)),
                None => skipped.push(b.clone()),
            }
        }
        match resumable.len() {
            0 => Ok(Chosen::new(self.repo.resolve(vm, None)?, skipped)),
            1 => {
                let (m, s) = resumable.pop().expect("one");
                warn_if_kept_twice(vm, &m.id, s, &kept);
                Ok(Chosen::kept(m, skipped, s))
            }
            // Resuming the most recently recovered one would hide the
            // guest's writes in the others: the admin chooses.
            _ => Err(several_kept(vm, &resumable)),
        }
    }

    /// Every staging directory, or only `within`.
    pub(super) fn search<'a>(
        &'a self,
        within: Option<&'a Arc<StagingDir>>,
    ) -> impl Iterator<Item = &'a Arc<StagingDir>> {
        let all = match within {
            Some(s) => std::slice::from_ref(s),
            None => self.stagings.all(),
        };
        all.iter()
    }

    /// Kept sessions of `vm` in every staging directory (or only
    /// `within`), most recently recovered first.
    pub(super) fn kept_sessions(
        &self,
        vm: &str,
        within: Option<&Arc<StagingDir>>,
    ) -> Vec<(String, Arc<StagingDir>)> {
        let mut all: Vec<(String, u64, Arc<StagingDir>)> = self
            .search(within)
            .flat_map(|s| {
                s.kept_sessions(vm)
                    .into_iter()
                    .map(move |(b, t)| (b, t, s.clone()))
            })
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        all.into_iter().map(|(b, _, s)| (b, s)).collect()
    }

    /// A kept session's copy of its manifest. A damaged copy gives way to
    /// the repository's when that reads (it is checked: same backup), and
    /// is replaced by it (explore4 L1: a damaged copy blocked the recovery
    /// although the repository's was fine).
    fn kept_copy(&self, staging: &StagingDir, vm: &str, b: &str) -> Result<Option<Manifest>> {
        let e = match staging.kept_manifest(vm, b) {
            Err(e) if e.kind() == crate::error::ErrorKind::Corrupt => e,
            r => return r,
        };
        let Ok(m) = self.repo.manifest(vm, b) else {
            return Err(e);
        };
        tracing::warn!(vm, backup = b, "{e}; the repository's copy is used instead");
        if let Err(w) = staging.replace_kept_manifest(&m) {
            tracing::warn!(vm, backup = b, "could not replace the damaged copy: {w}");
        }
        Ok(Some(m))
    }

    /// The manifest of a kept session, or `None` only if the repository
    /// says its backup does not exist. Any other answer (an unreachable or
    /// failing repository) resumes from the session's own copy, or fails
    /// the recovery if there is no copy: it never moves on to another backup.
    pub(super) fn kept_backup(
        &self,
        staging: &StagingDir,
        vm: &str,
        b: &str,
    ) -> Result<Option<Manifest>> {
        let local = self.kept_copy(staging, vm, b).map_err(|e| {
            e.context(format!(
                "kept staging of VM {vm} (backup {b}) is damaged; discard it with `release {vm} --discard --backup {b}` or name another backup with --backup"
            ))
        })?;
        match (local, self.repo.has_manifest(vm, b)) {
            (_, Ok(false)) => {
                tracing::warn!(vm, backup = b, "kept staging not resumed: its backup is gone from the repository (the staging stays on disk)");
                Ok(None)
            }
            (Some(m), Ok(true)) => Ok(Some(m)),
            (Some(m), Err(e)) => {
                tracing::warn!(vm, backup = b, "repository did not answer ({e}); resuming kept staging from its own copy of the manifest");
                Ok(Some(m))
            }
            (None, Ok(true)) => Ok(Some(self.repo.manifest(vm, b)?)),
            (None, Err(e)) => Err(e.context(format!(
                "cannot check backup {b} of VM {vm}, which kept staging uses; nothing was started (retry, or name a backup with --backup)"
            ))),
        }
    }

    /// Where a session found active in `staging` is served again: at
    /// `recorded` if that point still stages there, else at the first
    /// point that does, else at the first point (its data is read on
    /// from `staging` either way).
    pub(super) fn kept_point(
        &self,
        vm: &str,
        recorded: &str,
        staging: &Arc<StagingDir>,
    ) -> Arc<ExportPoint> {
        let stages_here = |p: &&Arc<ExportPoint>| Arc::ptr_eq(&p.staging, staging);
        if let Some(p) = self.point(recorded).filter(stages_here) {
            return p.clone();
        }
        let p = self
            .points
            .iter()
            .find(stages_here)
            .unwrap_or(&self.points[0])
            .clone();
        tracing::warn!(
            vm,
            was = recorded,
            now = %p.name(),
            staging = %staging.root().display(),
            "the export point this session was served at is gone or stages elsewhere now; serving it at {}",
            p.name()
        );
        p
    }

    /// Drops kept staging for a VM that is not being served, in every
    /// staging directory.
    pub fn discard_kept(&self, vm: &str) -> Result<Vec<String>> {
        validate_name("VM name", vm)?;
        let op = self.vm_op(vm);
        let _op = self.lock_op(vm, &op)?;
        if self.session(vm).is_some() {
            return Err(Error::busy(format!(
                "VM {vm} is being served; release it with --discard instead"
            )));
        }
        let mut kept = vec![];
        for (b, s) in self.discardable(vm) {
            self.discard_unpinned(vm, &b, &s)?;
            if !kept.contains(&b) {
                kept.push(b);
            }
        }
        Ok(kept)
    }
}

impl Datastore {
    /// Every kept staging of `vm` (backup, directory), damaged ones too:
    /// those are never resumed, and discarding is how an administrator is
    /// told to remove them.
    fn discardable(&self, vm: &str) -> Vec<(String, Arc<StagingDir>)> {
        let damaged = self
            .search(None)
            .flat_map(|s| s.damaged_sessions(vm).into_iter().map(|b| (b, s.clone())));
        self.kept_sessions(vm, None)
            .into_iter()
            .chain(damaged)
            .collect()
    }

    /// Drops the staging of `vm` kept from `backup` (every staging
    /// directory), which is not the session served: the note of a recover
    /// that passed it over points here, and `release --discard` alone
    /// would discard the session just started.
    /// Called with the VM's lock held (`release_backup`).
    pub(super) fn discard_kept_backup_locked(&self, vm: &str, backup: &str) -> Result<Vec<String>> {
        // Never the served session's: `release_backup` asks only for
        // a backup not served, under the VM's lock.
        let all: Vec<_> = (self.discardable(vm).into_iter())
            .filter(|(b, _)| b == backup)
            .collect();
        if all.is_empty() {
            return Err(Error::not_found(format!(
                "no kept staging of VM {vm} from backup {backup}"
            )));
        }
        for (b, s) in &all {
            self.discard_unpinned(vm, b, s)?;
        }
        Ok(vec![backup.to_string()])
    }
}

/// What `choose_manifest` picked.
pub(super) struct Chosen {
    pub(super) manifest: Manifest,
    pub(super) skipped: Vec<String>,
    /// The staging directory of the kept session it resumes.
    pub(super) kept: Option<Arc<StagingDir>>,
}

impl Chosen {
    fn new(manifest: Manifest, skipped: Vec<String>) -> Chosen {
        Chosen {
            manifest,
            skipped,
            kept: None,
        }
    }

    fn kept(manifest: Manifest, skipped: Vec<String>, staging: &Arc<StagingDir>) -> Chosen {
        Chosen {
            manifest,
            skipped,
            kept: Some(staging.clone()),
        }
    }
}

/// The refusal of a `recover` without a backup for a VM with several
/// kept sessions, listing each so that the admin can choose.
fn several_kept(vm: &str, resumable: &[(Manifest, &Arc<StagingDir>)]) -> Error {
    let list: Vec<String> = resumable
        .iter()
        .map(|(m, s)| {
            let dir = s.session_dir(vm, &m.id);
            let (changed, recovered) = match crate::staging::inventory::summary(&dir) {
                Ok((changed, recovered)) => (human_bytes(changed), rfc3339(recovered)),
                Err(e) => {
                    tracing::warn!(vm, backup = %m.id, "cannot read kept staging's figures: {e}");
                    ("?".into(), "?".into())
                }
            };
            format!(
                "backup {} (changed {changed}, last recovered {recovered})",
                m.id
            )
        })
        .collect();
    Error::busy(format!(
        "VM {vm} has {} kept sessions, so recover does not guess which to resume: {}; \
         choose one with `recover {vm} --backup ID`, or drop the ones not wanted \
         (`release {vm} --discard --backup ID`; `staging drop --backup ID` \
         while no daemon serves the staging directory)",
        resumable.len(),
        list.join(", ")
    ))
}

/// One backup kept in two staging directories (export points' stagings
/// changed between runs): the newer resumes, the other stays on disk.
fn warn_if_kept_twice(
    vm: &str,
    b: &str,
    used: &Arc<StagingDir>,
    kept: &[(String, Arc<StagingDir>)],
) {
    for (_, s) in kept.iter().filter(|(k, s)| k == b && !Arc::ptr_eq(s, used)) {
        tracing::warn!(
            vm,
            backup = b,
            resumed = %used.root().display(),
            also = %s.root().display(),
            "this backup has kept staging in two staging directories; the more recent resumes, the other is left untouched (release --discard removes both)"
        );
    }
}
