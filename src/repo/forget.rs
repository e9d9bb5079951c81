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

use std::collections::HashMap;

use serde::Serialize;

use super::retention::{self, Candidate, Policy};
use super::{pins, Repository};
use crate::error::Result;

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
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupDecision {
    pub id: String,
    pub created: String,
    pub keep: bool,
    pub reason: String,
    /// With `force`: the sessions that used it (told through `status`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forced_from: Vec<String>,
}

pub fn forget(repo: &Repository, opts: &ForgetOptions) -> Result<ForgetReport> {
    opts.policy.check()?;
    let vms = repo.vms_or(opts.vm.as_deref())?;
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
    for v in &report.vms {
        let gone: Vec<String> = v
            .backups
            .iter()
            .filter(|b| !b.keep)
            .map(|b| super::manifest_key(&v.vm, &b.id))
            .collect();
        report.removed += gone.len() as u64;
        report.kept += (v.backups.len() - gone.len()) as u64;
        if !opts.dry_run && !gone.is_empty() {
            repo.backend().delete_many(&gone)?;
            tracing::info!(vm = %v.vm, removed = gone.len(), "forgot backups");
        }
    }
    Ok(report)
}

fn decide_vm(repo: &Repository, vm: &str, opts: &ForgetOptions) -> Result<VmForget> {
    let mut users: HashMap<String, Vec<String>> = HashMap::new();
    for pin in pins::of_vm(repo, vm)? {
        for b in &pin.backups {
            users.entry(b.clone()).or_default().push(pin.reason());
        }
    }
    let mut candidates = vec![];
    let mut unreadable = vec![];
    for id in repo.backup_ids(vm)? {
        let m = match repo.manifest(vm, &id) {
            Ok(m) => m,
            // Forgotten by someone else since the listing.
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == crate::error::ErrorKind::Corrupt => {
                unreadable.push(BackupDecision {
                    id,
                    created: "?".into(),
                    keep: true,
                    reason: format!("manifest unreadable, kept ({e})"),
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
            created_unix: m.created_unix,
        });
    }
    let mut backups: Vec<BackupDecision> = retention::apply(&opts.policy, &candidates)
        .into_iter()
        .map(|d| BackupDecision {
            forced_from: match users.get(&d.id) {
                Some(u) if !d.keep => u.clone(),
                _ => vec![],
            },
            created: crate::util::rfc3339(d.created_unix),
            id: d.id,
            keep: d.keep,
            reason: d.reason,
        })
        .collect();
    backups.extend(unreadable);
    Ok(VmForget {
        vm: vm.into(),
        backups,
    })
}

#[cfg(test)]
pub(crate) mod tests;
