//! `recoverfs staging ls|drop`: kept sessions in staging directories.

use std::path::PathBuf;

use clap::Subcommand;

use crate::error::{Error, ErrorKind, Result};
use crate::staging::inventory;
use crate::util::{human_bytes, rfc3339};

#[derive(Subcommand)]
pub enum StagingCmd {
    /// List the sessions kept in staging directories: VM, backup, bytes
    /// held, bytes the guest changed, and whether a daemon serves them.
    Ls {
        /// A staging directory (repeatable). A daemon's --staging lists
        /// too the staging= directories its export points served with.
        #[arg(long, required = true)]
        staging: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a VM's kept sessions (or one, with --backup) for good.
    /// Refused while a daemon serves from the directory (it holds the
    /// directory's lock): use `release --discard` there.
    Drop {
        #[arg(long)]
        staging: PathBuf,
        vm: String,
        #[arg(long)]
        backup: Option<String>,
        /// The repository: the dropped sessions' pins are removed from it,
        /// so that `forget` may remove their backups (without it they stay
        /// pinned; run again with it to remove the pins).
        #[arg(long)]
        repo: Option<String>,
        /// Also drop a session that was active when its daemon stopped
        /// (killed, say): its guest may be waiting to reconnect.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: StagingCmd) -> Result<()> {
    match cmd {
        StagingCmd::Ls { staging, json } => ls(&staging, json),
        StagingCmd::Drop {
            staging,
            vm,
            backup,
            repo,
            force,
        } => {
            let dropped = inventory::drop_sessions(&staging, &vm, backup.as_deref(), force)
                .map_err(|e| match e.kind() {
                    ErrorKind::Busy => Error::busy(format!(
                        "{e}; while it serves, drop kept staging with `recoverfs release --discard {vm}`"
                    )),
                    _ => e,
                });
            // A session dropped before without --repo left its pin: with
            // --repo, that is removed even if no session is left to drop.
            let (dropped, not_found) = match dropped {
                Ok(d) => (d, None),
                Err(e) if e.kind() == ErrorKind::NotFound && repo.is_some() => (vec![], Some(e)),
                Err(e) => return Err(e),
            };
            for b in &dropped {
                println!("dropped kept staging of VM {vm} from backup {b}");
            }
            let again = |repo: &str| {
                format!(
                    "recoverfs staging drop --staging {} {vm}{} --repo {repo}",
                    staging.display(),
                    backup
                        .as_deref()
                        .map(|b| format!(" --backup {b}"))
                        .unwrap_or_default()
                )
            };
            let Some(repo) = repo else {
                eprintln!(
                    "the repository still pins the dropped sessions' backups (forget keeps them): run `{}`",
                    again("REPO")
                );
                return Ok(());
            };
            let unpinned = crate::repo::Repository::open(&repo)
                .and_then(|r| inventory::remove_stale_pins(&r, &staging, &vm, backup.as_deref()))
                .map_err(|e| {
                    Error::new(
                        e.kind(),
                        format!(
                            "could not remove the dropped sessions' pins from the repository ({e}); forget keeps their backups until `{}` succeeds",
                            again(&repo)
                        ),
                    )
                })?;
            if let (Some(e), true) = (not_found, unpinned.is_empty()) {
                return Err(e);
            }
            if !unpinned.is_empty() {
                println!(
                    "removed the repository's pins of backup(s) {} of VM {vm}",
                    unpinned.join(", ")
                );
            }
            Ok(())
        }
    }
}

fn ls(dirs: &[PathBuf], json: bool) -> Result<()> {
    let (dirs, missing) = inventory::with_point_stagings(dirs)?;
    let mut all = vec![];
    let mut served = vec![];
    for d in &dirs {
        all.extend(inventory::list(d)?);
        served.push((d.clone(), inventory::lock_holder(d)?));
    }
    if json {
        let rows: Vec<_> = all
            .iter()
            .map(|s| {
                let daemon = served
                    .iter()
                    .find(|(d, _)| *d == s.staging)
                    .and_then(|(_, p)| *p);
                let mut v = serde_json::to_value(s).expect("json");
                v["served"] = (s.active && daemon.is_some()).into();
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "sessions": rows,
                "point_stagings_not_mounted": missing,
            }))
            .expect("json")
        );
        return Ok(());
    }
    for (d, pid) in &served {
        if let Some(p) = pid {
            println!("{}: in use by a recoverfs daemon (pid {p})", d.display());
        }
    }
    for m in &missing {
        println!(
            "{}: an export point's staging served before, not a staging directory now (is its filesystem mounted?)",
            m.display()
        );
    }
    if all.is_empty() {
        println!("no kept sessions");
    }
    for s in &all {
        let daemon = served.iter().any(|(d, p)| *d == s.staging && p.is_some());
        if let Some(why) = &s.damaged {
            println!(
                "{}  {}  {}  DAMAGED, cannot be resumed (staging drop removes it): {why}",
                s.staging.display(),
                s.vm,
                s.backup
            );
            continue;
        }
        println!(
            "{}  {}  {}  {} disk(s)  holds {}  changed {}  recovered {}{}{}",
            s.staging.display(),
            s.vm,
            s.backup,
            s.disks,
            human_bytes(s.bytes_held),
            human_bytes(s.changed_bytes),
            rfc3339(s.last_recovered),
            match (s.active, daemon) {
                (true, true) => "  (served)",
                (true, false) => "  (active: its daemon is not running)",
                _ => "",
            },
            match s.pin_owed {
                true => "  UNPINNED: its pin could not be written; `forget` may remove its backup until a daemon serving this directory writes it",
                false => "",
            }
        );
    }
    Ok(())
}
