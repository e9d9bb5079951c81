//! `verify`: a check of a repository's chunks (`list` is printed in
//! `cli::maint`, beside its reading, which goes on past a damaged manifest).

use crate::error::{Error, Result};
use crate::repo::Repository;

/// Of `vms`, those with a disk or file backup `id`; none is an error.
fn vms_with_backup(repo: &Repository, vms: Vec<String>, id: &str) -> Result<Vec<String>> {
    let mut with = vec![];
    for v in vms {
        if repo.backup_ids(&v)?.iter().any(|b| b == id)
            || repo.catalog_ids(&v)?.iter().any(|b| b == id)
        {
            with.push(v);
        }
    }
    if with.is_empty() {
        return Err(Error::not_found(format!(
            "unknown backup {id:?}: no VM in {} has it",
            repo.location()
        )));
    }
    Ok(with)
}

/// `verify`; with `repair` (the wait for running backups), damaged chunks
/// are set aside after the report.
pub(crate) fn verify(
    repo: &std::sync::Arc<Repository>,
    vm: Option<&str>,
    backup: Option<&str>,
    repair: Option<std::time::Duration>,
) -> Result<()> {
    let vms = match vm {
        Some(v) => {
            crate::util::validate_name("VM name", v)?;
            if repo.backup_ids(v)?.is_empty() && repo.catalog_ids(v)?.is_empty() {
                return Err(Error::not_found(format!(
                    "unknown VM {v:?}: no backups in {}",
                    repo.location()
                )));
            }
            vec![v.to_string()]
        }
        None => {
            let mut all = repo.vms()?;
            all.extend(repo.catalog_vms()?);
            all.sort();
            all.dedup();
            match backup {
                // `--backup ID` alone: the VMs that have it (ids are times,
                // so two VMs may), not every VM ("unknown backup of VM x").
                Some(id) => vms_with_backup(repo, all, id)?,
                None => all,
            }
        }
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    let mut r = crate::repo::verify::verify(repo, &vms, backup, threads)?;
    if backup.is_none() {
        // A profile belongs to a VM, not to a backup; with every VM, also
        // those with a profile and no backup left.
        r.then("operational profiles", || {
            let mut with_profile = match vm {
                Some(_) => vms.clone(),
                None => crate::prefetch::profile::vms(repo)?,
            };
            with_profile.dedup();
            let mut lines = vec![];
            for v in &with_profile {
                lines.extend(crate::prefetch::profile::damage(repo, v)?);
            }
            Ok(lines)
        });
    }
    for line in r.damaged.iter().chain(&r.unreadable) {
        println!("{line}");
    }
    let repaired = match repair {
        // Not against a store that stopped answering: its error would
        // take the report's place.
        Some(_) if !r.corrupt.is_empty() && r.stopped.is_some() => {
            r.not_done.push(format!(
                "NOT REPAIRED: {} damaged chunk(s): verify stopped asking the store; run verify --repair again once it answers",
                r.corrupt.len()
            ));
            0
        }
        Some(wait) if !r.corrupt.is_empty() => {
            let done = crate::repo::verify::repair(repo, &r.corrupt, wait)?;
            for line in &done.lines {
                println!("{line}");
            }
            done.set_aside
        }
        _ => 0,
    };
    let incomplete = r.unreadable.is_some() || !r.not_done.is_empty();
    if r.damaged.is_empty() && !incomplete {
        println!(
            "ok: {} chunks of {} backup(s) verified ({})",
            r.chunks,
            r.backups,
            mode(repo)
        );
        return Ok(());
    }
    if incomplete {
        // What was read is worth knowing: the outage is not damage.
        println!(
            "checked: {} of {} chunks of {} backup(s) read and checked{}",
            r.checked,
            r.chunks,
            r.backups,
            match r.damaged.is_empty() {
                true => ", no damage among them",
                false => "",
            }
        );
    }
    // After the chunk tally: a later step the store did not answer for.
    for line in &r.not_done {
        println!("{line}");
    }
    if r.damaged.is_empty() {
        return Err(Error::new(
            crate::error::ErrorKind::Io,
            format!(
                "verify of {} is incomplete: the store did not answer for some of it",
                repo.location()
            ),
        ));
    }
    let next = if repaired > 0 {
        format!(
            "; {repaired} damaged chunk(s) set aside: the backups above read again once a backup stores those bytes again (a full one: an incremental backup refuses to reuse a chunk that is gone)"
        )
    } else if !r.corrupt.is_empty() && repair.is_none() {
        let aside = repo.quarantined().unwrap_or_default();
        let new = r.corrupt.iter().filter(|(d, _)| !aside.contains(d)).count();
        match new {
            0 => "; the damaged chunks were set aside already (verify --repair): a full backup that has their bytes stores them again".into(),
            _ => "; run verify --repair to set damaged chunks aside, so the next full backup stores them again".into(),
        }
    } else {
        String::new()
    };
    Err(Error::corrupt(format!(
        "{} damaged object(s) in {}{next}",
        r.damaged.len(),
        repo.location()
    )))
}

/// Which mode a repository uses, for `verify`.
fn mode(repo: &Repository) -> String {
    match repo.encryption() {
        Some(e) => format!(
            "encrypted repository: {} chunks, keyed BLAKE3 ids and MACs, key {}",
            e.aead, e.fingerprint
        ),
        None => "unencrypted repository: BLAKE3 ids and checksums".into(),
    }
}
