//! `forget`: removes the backups a retention policy does not keep.
//!
//! Per VM: every manifest is read for its time (`created_unix`), the
//! policy decides (`repo::retention`), and the manifests of the backups
//! it removes are deleted; their chunks stay until `gc`. A backup a
//! recovery session uses (`repo::pins`) is kept, counted by no rule,
//! unless `force`: then it is removed all the same and the session's
//! daemon reports it in `status` (it checks its backups periodically).
//! A manifest that cannot be read is kept and said so: its time, and
//! whether anything uses it, are unknown.
//!
//! A session may start while forget runs: the pins are read when forget
//! decides, and reading every manifest takes minutes on S3. So a daemon
//! puts its pin *then* checks that the manifest still exists
//! (`Datastore::pin_new_session`), and forget deletes *then* reads the
//! pins again, putting back what a session pinned meanwhile. Each side
//! writes before it reads, so one of them sees the other: if forget's
//! second read misses the pin, the pin was put after the delete, and the
//! daemon's check (later still) finds the manifest gone and serves
//! nothing. Otherwise forget puts the manifest back. A daemon that
//! checks in that short gap sees it gone and fails the recovery (it can
//! be retried); one that found it before the delete is kept by the put
//! back. (Reading the pins again only *before* deleting would leave a
//! window: pin put and manifest found between that read and the delete.)
//! Deleting and putting back happen under a writer lock (`repo::locks`),
//! so gc sweeps nothing in between.
//!
//! File backups (`files/<vm>/<id>-files.json`, `repo::catalog`) are
//! their own series: the policy applies to a VM's disk backups and,
//! separately, to its file backups, as Proxmox Backup Server keeps one
//! backup group per type. So `--keep-last 3` keeps three of each, and
//! frequent file backups never push the disk backups out (nor the other
//! way round). Each decision names its kind; catalogs are removed the
//! same way (after every decision is made; `dry_run` removes nothing),
//! and `gc` then frees the chunks only they referenced.

use std::collections::HashMap;

use serde::Serialize;

use std::sync::Arc;

use super::locks::WriterLock;
use super::retention::{self, Candidate, Policy};
use super::{pins, Repository};
use crate::error::Result;

/// Backups removed, and their bytes held to put one back, at a time.
const REMOVE_BATCH: usize = 8;

#[derive(Debug, Clone)]
pub struct ForgetOptions {
    /// One VM, or every VM.
    pub vm: Option<String>,
    pub policy: Policy,
    pub dry_run: bool,
    /// Remove backups that recovery sessions use too.
    pub force: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub repo: String,
    pub dry_run: bool,
    pub policy: Policy,
    pub vms: Vec<VmForget>,
    pub kept: u64,
    pub removed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmForget {
    pub vm: String,
    /// Newest first.
    pub backups: Vec<BackupDecision>,
    /// Backups dated after this host's clock (see [`FUTURE_SLACK`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A backup dated further than this after the clock of the host running
/// `forget` was taken on a host whose clock is wrong (or the id was
/// forged): it is the newest for every rule, so it takes `--keep-last`'s
/// place from a backup of today. Policies count backups by their time, as
/// PBS does, so it is said, not decided otherwise.
pub const FUTURE_SLACK: u64 = 3600;

/// The two series of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Disk,
    Files,
}

impl BackupKind {
    pub fn name(self) -> &'static str {
        match self {
            BackupKind::Disk => "disk",
            BackupKind::Files => "files",
        }
    }

    fn key(self, vm: &str, id: &str) -> String {
        match self {
            BackupKind::Disk => super::manifest_key(vm, id),
            BackupKind::Files => super::catalog::catalog_key(vm, id),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupDecision {
    pub kind: BackupKind,
    pub id: String,
    pub created: String,
    /// `created` as Unix seconds (0 if unreadable).
    #[serde(skip)]
    pub created_unix: u64,
    pub keep: bool,
    pub reason: String,
    /// With `force`: the sessions that used it (told through `status`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forced_from: Vec<String>,
}

pub fn forget(repo: &Arc<Repository>, opts: &ForgetOptions) -> Result<ForgetReport> {
    opts.policy.check()?;
    let vms = vms(repo, opts.vm.as_deref())?;
    // Decide everything before removing anything.
    let decided = vms
        .iter()
        .map(|vm| decide_vm(repo, vm, opts))
        .collect::<Result<Vec<_>>>()?;
    let mut report = ForgetReport {
        repo: repo.location(),
        dry_run: opts.dry_run,
        policy: opts.policy,
        vms: decided,
        kept: 0,
        removed: 0,
    };
    let lock = match opts.dry_run {
        true => None,
        false => Some(WriterLock::acquire(repo, "forget")?),
    };
    for v in &mut report.vms {
        if let Some(lock) = &lock {
            remove(repo, lock, &v.vm, &mut v.backups, opts.force)?;
        }
        let removed = v.backups.iter().filter(|b| !b.keep).count();
        report.removed += removed as u64;
        report.kept += (v.backups.len() - removed) as u64;
    }
    Ok(report)
}

/// Deletes the backups of `vm` decided `!keep`, then puts back any that a
/// session pinned meanwhile (see the module doc), marking it kept.
fn remove(
    repo: &Repository,
    lock: &WriterLock,
    vm: &str,
    backups: &mut [BackupDecision],
    force: bool,
) -> Result<()> {
    let gone: Vec<usize> = (0..backups.len()).filter(|&i| !backups[i].keep).collect();
    for batch in gone.chunks(REMOVE_BATCH) {
        let keys: Vec<String> = batch
            .iter()
            .map(|&i| backups[i].kind.key(vm, &backups[i].id))
            .collect();
        let mut bodies = vec![];
        for (&i, key) in batch.iter().zip(&keys) {
            let limit = match backups[i].kind {
                BackupKind::Disk => super::limits::MAX_MANIFEST_BYTES,
                BackupKind::Files => super::catalog::MAX_CATALOG_BYTES,
            };
            bodies.push(repo.backend().get(key, limit)?);
        }
        repo.backend().delete_many(&keys)?;
        tracing::info!(vm, removed = keys.len(), "forgot backups");
        if force {
            continue;
        }
        let users = users_of(repo, vm, false).map_err(|e| {
            e.context(format!(
                "backups of VM {vm} were removed, but the pins could not be read again: a recovery session started meanwhile may have lost its backup"
            ))
        })?;
        for ((&i, key), body) in batch.iter().zip(&keys).zip(bodies) {
            let b = &mut backups[i];
            let (Some(u), Some(body)) = (users.get(&b.id), body) else {
                continue;
            };
            repo.backend().put(key, &body).map_err(|e| {
                e.context(format!(
                    "put back backup {} of VM {vm}, pinned by a session while forget ran",
                    b.id
                ))
            })?;
            b.keep = true;
            b.reason = format!("{}, pinned while forget ran: put back", u.join("; "));
            tracing::warn!(vm, backup = %b.id, "a recovery session pinned a backup while forget removed it: put back");
        }
    }
    // Nothing put back counts unless gc was kept away all along.
    lock.check_fresh().map_err(|e| {
        e.context(format!(
            "forget of VM {vm}: backups put back may miss chunks"
        ))
    })
}

/// Per backup id, why sessions use it (their pins). The pin of a
/// throwaway recovery whose process is gone protects nothing: it is
/// passed over, and removed if `drop_dead`.
fn users_of(repo: &Repository, vm: &str, drop_dead: bool) -> Result<HashMap<String, Vec<String>>> {
    let mut users: HashMap<String, Vec<String>> = HashMap::new();
    for pin in pins::of_vm(repo, vm)? {
        if let Some(why) = pin.dead_owner() {
            if drop_dead {
                tracing::warn!(vm, staging = %pin.staging, "removing the pin of a throwaway recovery that was killed before its cleanup ({why})");
                pins::remove_logged(repo, &pin);
            }
            continue;
        }
        for b in &pin.backups {
            users.entry(b.clone()).or_default().push(pin.reason());
        }
    }
    Ok(users)
}

/// The VMs with disk or file backups (or the one asked for, if it has
/// either).
fn vms(repo: &Repository, vm: Option<&str>) -> Result<Vec<String>> {
    if let Some(v) = vm {
        if repo.backup_ids(v)?.is_empty() && repo.catalog_ids(v)?.is_empty() {
            return Err(crate::error::Error::not_found(format!(
                "unknown VM {v:?}: no backups in {}",
                repo.location()
            )));
        }
        return Ok(vec![v.to_string()]);
    }
    let mut all = repo.vms()?;
    all.extend(repo.catalog_vms()?);
    all.sort();
    all.dedup();
    Ok(all)
}

fn decide_vm(repo: &Repository, vm: &str, opts: &ForgetOptions) -> Result<VmForget> {
    let users = users_of(repo, vm, !opts.dry_run)?;
    let mut backups = decide_series(repo, vm, BackupKind::Disk, &users, opts)?;
    backups.extend(decide_series(repo, vm, BackupKind::Files, &users, opts)?);
    let warnings = dated_in_the_future(&backups, crate::util::now_unix());
    for w in &warnings {
        tracing::warn!(vm, "{w}");
    }
    Ok(VmForget {
        vm: vm.into(),
        backups,
        warnings,
    })
}

/// One line per backup of `backups` dated more than [`FUTURE_SLACK`]
/// after `now`.
fn dated_in_the_future(backups: &[BackupDecision], now: u64) -> Vec<String> {
    backups
        .iter()
        .filter(|b| b.created_unix > now.saturating_add(FUTURE_SLACK))
        .map(|b| {
            format!(
                "{} backup {} is dated {}, after this host's clock ({}): every rule counts it as the newest, so it takes the place of a backup of today (a host with a wrong clock took it?); `--dry-run` shows what goes",
                b.kind.name(),
                b.id,
                b.created,
                crate::util::rfc3339(now)
            )
        })
        .collect()
}

/// The policy over one series of a VM: its disk or its file backups.
fn decide_series(
    repo: &Repository,
    vm: &str,
    kind: BackupKind,
    users: &HashMap<String, Vec<String>>,
    opts: &ForgetOptions,
) -> Result<Vec<BackupDecision>> {
    let ids = match kind {
        BackupKind::Disk => repo.backup_ids(vm)?,
        BackupKind::Files => repo.catalog_ids(vm)?,
    };
    let created = |id: &str| match kind {
        BackupKind::Disk => repo.manifest(vm, id).map(|m| m.created_unix),
        BackupKind::Files => repo.catalog(vm, id).map(|c| c.created_unix),
    };
    let mut candidates = vec![];
    let mut unreadable = vec![];
    for id in ids {
        let created_unix = match created(&id) {
            Ok(t) => t,
            // Forgotten by someone else since the listing.
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == crate::error::ErrorKind::Corrupt => {
                unreadable.push(BackupDecision {
                    kind,
                    id,
                    created: "?".into(),
                    created_unix: 0,
                    keep: true,
                    reason: format!(
                        "{} unreadable, kept ({e})",
                        match kind {
                            BackupKind::Disk => "manifest",
                            BackupKind::Files => "catalog",
                        }
                    ),
                    forced_from: vec![],
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        let used = users.get(&id);
        candidates.push(Candidate {
            protected: match (used, opts.force) {
                (Some(u), false) => Some(u.join("; ")),
                _ => None,
            },
            id,
            created_unix,
        });
    }
    let mut backups: Vec<BackupDecision> = retention::apply(&opts.policy, &candidates)
        .into_iter()
        .map(|d| BackupDecision {
            kind,
            forced_from: match users.get(&d.id) {
                Some(u) if !d.keep => u.clone(),
                _ => vec![],
            },
            created: crate::util::rfc3339(d.created_unix),
            created_unix: d.created_unix,
            id: d.id,
            keep: d.keep,
            reason: d.reason,
        })
        .collect();
    backups.extend(unreadable);
    Ok(backups)
}

#[cfg(test)]
pub(crate) mod tests;
