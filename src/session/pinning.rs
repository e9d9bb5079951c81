//! A session's pin in the repository (`repo::pins`), kept in step with
//! the session: written at recover, release and each live backup,
//! removed with its staging. And the other direction: a daemon checks
//! that its sessions' backups still exist, so a session whose backup was
//! forgotten with `forget --force` says so in `status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Datastore, Session};
use crate::error::{Error, Result};
use crate::repo::pins::{self, Pin};
use crate::repo::Repository;
use crate::staging::StagingDir;

/// How often a daemon checks that its sessions' backups still exist.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Datastore {
    /// The pin of session `s` (`serving` unless released).
    pub(crate) fn pin_of(&self, s: &Session, serving: bool) -> Pin {
        let mut backups = vec![s.backup.clone()];
        let base = s.backup_base.lock().base.id.clone();
        if base != s.backup {
            backups.push(base);
        }
        self.new_pin(&s.vm, backups, &s.staging, &s.dir, serving)
    }

    /// The pin of a session at `dir` in `staging`: naming this host, the
    /// staging directory's id, and this process if the datastore is a
    /// throwaway one.
    fn new_pin(
        &self,
        vm: &str,
        backups: Vec<String>,
        staging: &StagingDir,
        dir: &Path,
        serving: bool,
    ) -> Pin {
        let mut pin = Pin::new(vm, backups, dir, serving).in_staging(staging.id());
        pin.replaces_legacy = staging.predates_ids();
        pin.host = self.host().into();
        pin.owner = self.pin_owner.get().cloned();
        pin
    }

    /// Writes the pin of `s`; a failed write is owed (see `check_backups`):
    /// in memory while `s` is served, and on disk in its staging, which
    /// outlives a release and the daemon (explore10 H1: a release into a
    /// full or read-only repository left the kept staging unpinned for
    /// good, so a later `forget` and `gc` took what it reads).
    pub(crate) fn pin(&self, s: &Session, serving: bool) {
        let written = pins::put_logged(&self.repo, &self.pin_of(s, serving));
        s.pin_owed.store(!written, Ordering::Release);
        if let Err(e) = s.staging.set_pin_owed(&s.vm, &s.backup, !written) {
            tracing::warn!(vm = %s.vm, "could not record in staging whether its pin is owed: {e}");
        }
    }

    /// Whether the kept staging of `vm` from `backup` (in any staging
    /// directory) owes its pin.
    pub(crate) fn kept_pin_owed(&self, vm: &str, backup: &str) -> bool {
        self.stagings.all().iter().any(|st| st.pin_owed(vm, backup))
    }

    /// Writes the pins kept sessions owe (not served: a served one's is
    /// written by `repin`), each under its VM's operation lock, so that
    /// it never lands after a recover or discard of that staging.
    fn repin_kept(&self) {
        for st in self.stagings.all().iter() {
            for (vm, b) in st.owed_pins() {
                let op = self.vm_op(&vm);
                let Some(_op) = op.try_lock() else {
                    continue;
                };
                // Only this very session served again writes its own pin
                // (`repin`); the VM served from another backup or staging
                // does not pay this one's debt (review29 M1).
                let served_here = self
                    .session(&vm)
                    .is_some_and(|s| s.backup == b && s.staging.id() == st.id());
                if served_here || !st.pin_owed(&vm, &b) {
                    continue;
                }
                let dir = st.session_dir(&vm, &b);
                let mut backups = vec![b.clone()];
                match crate::staging::session_files::Since::load(st.storage().as_ref(), &dir) {
                    Ok(Some(since)) if since.base != b => backups.push(since.base),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(vm, backup = %b, "its kept staging's pin is owed, and its live-backup base cannot be read: {e}");
                        continue;
                    }
                }
                let pin = self.new_pin(&vm, backups, st, &dir, false);
                if pins::put_logged(&self.repo, &pin) {
                    tracing::info!(vm, backup = %b, "wrote the pin its kept staging owed since its release");
                    if let Err(e) = st.set_pin_owed(&vm, &b, false) {
                        tracing::warn!(
                            vm,
                            "could not record in staging that its pin is written: {e}"
                        );
                    }
                }
            }
        }
    }

    /// Writes the pin a served session owes, unless an operation on its VM
    /// (a live backup, a release) runs: that writes or removes the pin
    /// itself, and this one must not land after it. Tried at each check.
    fn repin(&self, s: &Arc<Session>) {
        let op = self.vm_op(&s.vm);
        let Some(_op) = op.try_lock() else {
            return;
        };
        if self.session(&s.vm).is_some_and(|now| Arc::ptr_eq(&now, s)) {
            self.pin(s, true);
        }
    }

    /// Pins backup `id` of `vm` for a new session in `staging`, *then* checks
    /// that the backup still exists: a `forget` that did not see the pin
    /// deleted it before, so it is `NotFound` now and no session starts on
    /// it (see `repo::forget`). The pin is removed again if the session
    /// does not start (the guard is dropped without [`NewPin::keep`]).
    pub(crate) fn pin_new_session<'a>(
        &'a self,
        vm: &str,
        id: &str,
        staging: &StagingDir,
    ) -> Result<NewPin<'a>> {
        let dir = staging.session_dir(vm, id);
        let pin = self.new_pin(vm, vec![id.into()], staging, &dir, true);
        let guard = match pins::put(&self.repo, &pin) {
            Ok(()) => NewPin {
                repo: &self.repo,
                pin: Some(pin),
            },
            Err(e) => {
                // The session starts unpinned (a read-only repository must
                // not stop a recovery); its pin is tried again at every
                // check, and `status` says so meanwhile. The backup is
                // still checked: a forget may have removed it already.
                tracing::warn!(
                    vm,
                    "could not pin the session's backup in the repository (a forget may remove it until the pin is written; tried again at every check): {e}"
                );
                NewPin {
                    repo: &self.repo,
                    pin: None,
                }
            }
        };
        if !self.repo.has_manifest(vm, id)? {
            return Err(Error::not_found(format!(
                "backup {id} of VM {vm} was removed from the repository (forget) while this recovery started"
            )));
        }
        Ok(guard)
    }

    /// Refuses a new recovery of `vm` that another daemon already serves
    /// or keeps (explore1 M8): a second writable copy drifts from the
    /// first, and the guest writes kept there are not seen here. Read
    /// from the pins, after this session put its own, so that of two
    /// daemons starting at once at least one sees the other (both may
    /// then be refused; a retry of one succeeds). A throwaway recovery
    /// (`files`, `verify-boot`) makes no copy that drifts: never refused,
    /// and its pins never refuse. A pin that cannot be read is logged and
    /// passed over.
    ///
    /// This daemon's own pins are those naming one of its staging
    /// directories' ids, whatever host name they give (it was renamed),
    /// or, written before ids, this host's name and a directory in one of
    /// them. Another directory's pin giving this host's name is this
    /// host's only if the directory at its path is that one or none: a
    /// host of the same name (a clone, a container) may use the same
    /// paths.
    ///
    /// A session of this host whose directory is known gone (deleted, or
    /// on a disk not mounted) does not refuse: `serve` already refused a
    /// staging directory found empty where sessions were and said to give
    /// a new directory only if that disk is gone for good. It is returned
    /// as a warning for the administrator (explore2: it was silent).
    pub(crate) fn refuse_recovered_elsewhere(&self, vm: &str, backup: &str) -> Result<Vec<String>> {
        if self.pin_owner.get().is_some() {
            return Ok(vec![]);
        }
        let others = match pins::of_vm_readable(&self.repo, vm) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    vm,
                    "cannot tell whether another daemon recovers this VM: {e}"
                );
                return Ok(vec![]);
            }
        };
        let host = self.host();
        let ids: Vec<&str> = self.stagings.all().iter().map(|s| s.id()).collect();
        let mut warnings = vec![];
        for p in others.iter().filter(|p| p.owner.is_none()) {
            if p.is_of(&ids, host, |dir| self.holds_staging(dir)) {
                continue;
            }
            let local = p.host == host
                && !p.on_other_machine()
                && match &p.staging_id {
                    None => true,
                    Some(id) => {
                        let root = crate::staging::root_of_session(Path::new(&p.staging));
                        match root.map(crate::staging::id_at).transpose() {
                            Ok(here) => here.flatten().is_none_or(|here| here == *id),
                            // Cannot be looked at: another's, refused.
                            Err(_) => false,
                        }
                    }
                };
            // Only a definite "not found": one that cannot be looked at
            // still counts. And not in a staging directory a running daemon
            // serves: that one is creating the session now (its pin comes
            // before its directory), a race both must not win (explore3).
            if local
                && matches!(Path::new(&p.staging).try_exists(), Ok(false))
                && !staging_of(&p.staging).is_some_and(|(_, served)| served)
            {
                let w = not_there(vm, p, backup);
                tracing::warn!(vm, "{w}");
                warnings.push(w);
                continue;
            }
            if local {
                if let Some((root, false)) = staging_of(&p.staging) {
                    return Err(Error::busy(not_served(vm, p, &root)));
                }
            }
            return Err(Error::busy(recovered_elsewhere(
                vm,
                p,
                &self.repo.location(),
            )));
        }
        Ok(warnings)
    }

    /// Whether `session_dir` lies in one of this daemon's staging
    /// directories (`--staging` and every export point's own).
    fn holds_staging(&self, session_dir: &str) -> bool {
        let dir = Path::new(session_dir);
        self.stagings
            .all()
            .iter()
            .any(|s| dir.starts_with(s.root()))
    }

    /// A session served before a restart that could not be resumed: its
    /// pin says `kept` from now on (its staging stays, nothing serves it),
    /// so `forget` and other hosts' refusals no longer call it a live
    /// session (explore4 L3). Its backups stay pinned as they were; a pin
    /// that cannot be read or written now is logged and left.
    pub(crate) fn mark_not_served(&self, vm: &str, backup: &str, staging: &StagingDir) {
        let dir = staging.session_dir(vm, backup);
        let pins = match pins::of_vm_readable(&self.repo, vm) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(vm, "its pin still says `serving` (cannot read it: {e})");
                return;
            }
        };
        for mut p in pins {
            let same_dir = Path::new(&p.staging).file_name() == dir.file_name();
            if p.staging_id.as_deref() == Some(staging.id()) && same_dir && p.state == "serving" {
                p.state = "kept".into();
                p.written = crate::util::rfc3339(crate::util::now_unix());
                pins::put_logged(&self.repo, &p);
            }
        }
    }

    /// Discards the staging of `vm` from `backup` in `staging`, then
    /// removes its pin. The removal is owed (in `staging`) before the
    /// staging goes, and paid once the pin is gone: a crash in between, or
    /// a repository that refuses or hangs then, leaves the debt, which
    /// `check_backups` pays (explore11 M1), never a pin nothing removes
    /// (review30 L1: the debt was written only after a removal that could
    /// take a minute). A discard that fails leaves the staging (what is
    /// left of it) pinned and pays the debt, and is returned.
    pub(crate) fn discard_unpinned(
        &self,
        vm: &str,
        backup: &str,
        staging: &StagingDir,
    ) -> Result<()> {
        let dir = staging.session_dir(vm, backup);
        let pin = self.new_pin(vm, vec![backup.into()], staging, &dir, false);
        let owe = || {
            serde_json::to_vec(&pin)
                .map_err(|e| Error::io("encode a pin", e.into()))
                .and_then(|doc| staging.owe_unpin(vm, backup, &doc))
        };
        let owed = owe();
        if let Err(e) = &owed {
            tracing::warn!(vm, backup, "could not record the removal of its pin before the discard (a crash before it is removed leaves it): {e}");
        }
        let pay = || {
            if let Err(e) = staging.unpin_paid(vm, backup) {
                tracing::warn!(
                    vm,
                    backup,
                    "could not drop the owed removal of its pin: {e}"
                );
            }
        };
        if let Err(e) = staging.discard(vm, backup) {
            pay();
            return Err(e);
        }
        match pins::remove(&self.repo, &pin) {
            Ok(()) => pay(),
            Err(e) => {
                tracing::warn!(
                    vm,
                    backup,
                    "could not remove the discarded session's pin from the repository (its backups stay protected from forget until it is; tried again at every check): {e}"
                );
                // Written before, or tried again now.
                if let Err(e) = owed.or_else(|_| owe()) {
                    tracing::warn!(vm, backup, "could not record the owed removal of its pin (remove it with `recoverfs pins drop`): {e}");
                }
            }
        }
        Ok(())
    }

    /// Removes the pins discarded sessions still owe the repository. A
    /// session of that VM and backup made again in that staging directory
    /// since has a pin of the same key, its own: the debt is then dropped,
    /// and the pin written again (a removal made without the lock, by this
    /// daemon or one that died, may have taken it). Looked at under the VM's operation lock, but the
    /// removal is made without it (review30 L3: a store that does not
    /// answer held it, and every operation on the VM, for up to a minute
    /// at every check, per debt): looked at again under it after, a
    /// session made again meanwhile has its pin written again, which the
    /// removal may have taken. The first removal that fails ends the round:
    /// the others would wait on the same store.
    fn unpin_owed(&self) {
        for st in self.stagings.all().iter() {
            for (vm, b, doc) in st.owed_unpins() {
                let op = self.vm_op(&vm);
                let dir = st.session_dir(&vm, &b);
                {
                    let Some(_op) = op.try_lock() else {
                        continue;
                    };
                    // Made again, maybe while a removal ran without the
                    // lock (this daemon's or a dead one's: what was looked
                    // at is not recorded, review32 L7): its pin is written
                    // again, which costs one pin write and is always true.
                    if dir.exists() {
                        self.made_again(st, &vm, &b);
                        continue;
                    }
                }
                let pin = match serde_json::from_slice::<Pin>(&doc) {
                    Ok(pin) => pin,
                    // Left, and said (review30 L2: it was dropped, and
                    // with it the only trace of a pin nothing removes).
                    Err(e) => {
                        let file = st.owed_unpin_file(&vm, &b);
                        if unreadable_debt_due(&file, Instant::now()) {
                            tracing::warn!(vm, backup = %b, "an owed pin removal cannot be read ({e}): remove its pin with `recoverfs pins drop`, then {}", file.display());
                        }
                        continue;
                    }
                };
                let removed = pins::remove(&self.repo, &pin).is_ok();
                match op.try_lock() {
                    Some(_op) if dir.exists() => self.made_again(st, &vm, &b),
                    Some(_op) if removed => self.unpin_paid(st, &vm, &b),
                    Some(_op) => {}
                    // An operation on the VM runs (a recover of this very
                    // session, say): looked at by the next check.
                    None => {}
                }
                if !removed {
                    return;
                }
            }
        }
    }

    /// The owed removal of the pin of `vm`'s session from backup `b` in
    /// `st`, whose session was made again: dropped, and its pin, of the
    /// same key, written again (a removal may have taken it): by `repin`
    /// if it is served, else as its kept pin. Under the VM's operation
    /// lock.
    fn made_again(&self, st: &Arc<StagingDir>, vm: &str, b: &str) {
        let served = (self.session(vm)).filter(|s| s.backup == b && s.staging.id() == st.id());
        match served {
            Some(s) => self.pin(&s, true),
            None => {
                if let Err(e) = st.set_pin_owed(vm, b, true) {
                    tracing::warn!(vm, backup = %b, "could not record in staging that its pin is owed (a pin removal owed by its discarded predecessor may have taken it): {e}");
                }
            }
        }
        self.unpin_paid(st, vm, b);
    }

    fn unpin_paid(&self, st: &StagingDir, vm: &str, b: &str) {
        if let Err(e) = st.unpin_paid(vm, b) {
            tracing::warn!(vm, backup = %b, "{e}");
        }
    }

    /// Writes the pins kept and served sessions owe, then looks for every served
    /// session's backups in the repository and records a warning for each
    /// that is gone. A repository that does not answer, or not as itself
    /// (moved away, a share not mounted), is recorded as unreachable and
    /// changes nothing else: only its own "absent" means gone.
    /// Pin first: then a `forget` either sees the pin or deleted before
    /// it, and this check finds that (see `repo::forget`).
    pub fn check_backups(&self) {
        self.unpin_owed();
        self.repin_kept();
        for s in self.sessions() {
            if s.pin_owed.load(Ordering::Acquire) {
                self.repin(&s);
            }
            let pin = self.pin_of(&s, true);
            let mut gone = vec![];
            let mut unreachable = None;
            for b in &pin.backups {
                match self.repo.has_manifest(&s.vm, b) {
                    Ok(true) => {}
                    Ok(false) => gone.push(b.clone()),
                    Err(e) => {
                        unreachable = Some(e.to_string());
                        break;
                    }
                }
            }
            {
                let mut u = s.repo_unreachable.lock();
                match (&*u, &unreachable) {
                    (None, Some(e)) => tracing::warn!(vm = %s.vm, "repository unreachable: {e}"),
                    (Some(_), None) => tracing::info!(vm = %s.vm, "the repository answers again"),
                    _ => {}
                }
                *u = unreachable.clone();
            }
            if unreachable.is_some() {
                continue;
            }
            let warning = (!gone.is_empty()).then(|| {
                format!(
                    "backup {} of VM {} was removed from the repository (forget --force, or a forget while the session's pin was missing): blocks not yet staged cannot be read once gc runs, and live backups need a full read; relocate the VM or back it up from its disks",
                    gone.join(", "),
                    s.vm
                )
            });
            let mut w = s.backup_gone.lock();
            if warning.is_some() && *w != warning {
                tracing::error!(vm = %s.vm, "{}", warning.as_deref().unwrap_or(""));
            }
            *w = warning;
        }
    }
}

/// How often an owed pin removal that cannot be read is warned of: the
/// check runs every 10 s.
const UNREADABLE_DEBT_WARN_EVERY: Duration = Duration::from_secs(3600);

/// Whether the owed pin removal `file`, which cannot be read, is to be
/// warned of at `now`: at the first check that finds it, then once an
/// hour (`UNREADABLE_DEBT_WARN_EVERY`).
fn unreadable_debt_due(file: &Path, now: Instant) -> bool {
    static WARNED: Mutex<BTreeMap<PathBuf, Instant>> = Mutex::new(BTreeMap::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    match warned.get(file) {
        Some(&last) if now.saturating_duration_since(last) < UNREADABLE_DEBT_WARN_EVERY => false,
        _ => {
            warned.insert(file.to_path_buf(), now);
            true
        }
    }
}

/// The pin a new session put before it started; removed on drop unless
/// the session started.
pub(crate) struct NewPin<'a> {
    repo: &'a Repository,
    pin: Option<Pin>,
}

impl NewPin<'_> {
    /// The session started: its pin stays.
    pub(crate) fn keep(mut self) {
        self.pin = None;
    }
}

impl Drop for NewPin<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pin.take() {
            pins::remove_logged(self.repo, &p);
        }
    }
}

/// What a recovery of `vm` from `backup` passed over: a session of this
/// host whose directory `p` names is not there now.
fn not_there(vm: &str, p: &Pin, backup: &str) -> String {
    let what = match p.state.as_str() {
        "serving" => "a session",
        _ => "kept staging",
    };
    format!(
        "VM {vm} had {what} on this host in {} (its pin in the repository, written {}), which is not there now (a disk not mounted?): not resumed, the VM starts from backup {backup}; if that disk comes back, its guest writes are there (serve that directory again)",
        clean(&p.staging),
        clean(&p.written)
    )
}

/// The staging directory holding session directory `dir` (of this
/// host), and whether a running daemon serves it (its lock is held);
/// `None` where there is no staging directory or that cannot be told.
/// One no daemon serves was served before and is not now (left out of
/// `--export-point`s at a restart, say); one served with the session's
/// directory not there yet is a session being made.
fn staging_of(dir: &str) -> Option<(std::path::PathBuf, bool)> {
    let root = crate::staging::root_of_session(Path::new(dir))?;
    if !root.join(crate::staging::STAGING_MARKER).is_file() {
        return None;
    }
    let served = crate::staging::inventory::lock_holder(root).ok()?.is_some();
    Some((root.to_path_buf(), served))
}

/// Why a recovery of `vm` is refused while this host's staging `root`,
/// which no daemon serves now, holds its session `p`.
fn not_served(vm: &str, p: &Pin, root: &Path) -> String {
    let what = match p.state.as_str() {
        "serving" => "a session",
        _ => "kept staging",
    };
    format!(
        "VM {vm} has {what} on this host in {}, a staging directory no running daemon serves (its guest writes are there): serve that directory again (`--staging {}`, or an export point's `staging={}`) to resume it, or `recoverfs recover {vm} --second-copy` to start from the backup here instead",
        clean(&p.staging),
        clean(&root.display().to_string()),
        clean(&root.display().to_string())
    )
}

/// `s` with control characters escaped (pins come from the repository:
/// one line stays one line).
fn clean(s: &str) -> String {
    crate::util::escape_controls(s).into_owned()
}

/// Why a recovery of `vm` here is refused while `other` serves or keeps
/// it, and what to do: one line (the pin's fields come from the
/// repository: control characters escaped).
pub(super) fn recovered_elsewhere(vm: &str, other: &Pin, repo: &str) -> String {
    let (host, dir, written) = (
        clean(&other.host),
        clean(&other.staging),
        clean(&other.written),
    );
    let (what, there) = match other.state.as_str() {
        "serving" => (
            "is served by a recoverfs daemon",
            "To move it here, back it up there and `release --discard` it",
        ),
        _ => (
            "has kept staging (guest writes no backup holds)",
            "Resume it there, or to move it here back it up there and `release --discard` it",
        ),
    };
    format!(
        "VM {vm} {what} on host {host} in {dir} (its pin in the repository, written {written}): \
         recovering it here too would make a second writable copy without those writes. {there}; \
         to recover it here anyway: `recoverfs recover {vm} --second-copy` (then `boot`); if host \
         {host} is lost for good, `recoverfs pins drop --repo {repo} {vm} --host {host}` removes its pin"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// review30 L2: an unreadable debt is warned of at the first check
    /// that finds it, then once an hour, not every 10 s.
    #[test]
    fn an_unreadable_debt_is_warned_of_once_an_hour() {
        let f = Path::new("/nonexistent/review30-l2/unpins-owed/vm+b.json");
        let t0 = Instant::now();
        assert!(unreadable_debt_due(f, t0));
        assert!(!unreadable_debt_due(f, t0 + CHECK_EVERY));
        assert!(!unreadable_debt_due(f, t0 + UNREADABLE_DEBT_WARN_EVERY / 2));
        assert!(unreadable_debt_due(f, t0 + UNREADABLE_DEBT_WARN_EVERY));
        assert!(unreadable_debt_due(Path::new("/nonexistent/other"), t0));
    }
}
