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

pub(crate) fn verify(repo: &Repository, vm: Option<&str>, backup: Option<&str>) -> Result<()> {
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
    let r = crate::repo::verify::verify(repo, &vms, backup, threads)?;
    for line in &r.damaged {
        println!("{line}");
    }
    if r.damaged.is_empty() {
        println!(
            "ok: {} chunks of {} backup(s) verified ({})",
            r.chunks,
            r.backups,
            mode(repo)
        );
        Ok(())
    } else {
        Err(Error::corrupt(format!(
            "{} damaged object(s) in {}",
            r.damaged.len(),
            repo.location()
        )))
    }
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
