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
        /// A staging directory (repeatable: --staging and each export
        /// point's staging=).
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
            force,
        } => {
            let removed = inventory::drop_sessions(&staging, &vm, backup.as_deref(), force).map_err(
                |e| match e.kind() {
                    ErrorKind::Busy => Error::busy(format!(
                        "{e}; while it serves, drop kept staging with `recoverfs release --discard {vm}`"
                    )),
                    _ => e,
                },
            )?;
            for b in removed {
                println!("dropped kept staging of VM {vm} from backup {b}");
            }
            Ok(())
        }
    }
}

fn ls(dirs: &[PathBuf], json: bool) -> Result<()> {
    let mut all = vec![];
    let mut served = vec![];
    for d in dirs {
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
            serde_json::to_string_pretty(&serde_json::json!({ "sessions": rows })).expect("json")
        );
        return Ok(());
    }
    for (d, pid) in &served {
        if let Some(p) = pid {
            println!("{}: in use by a recoverfs daemon (pid {p})", d.display());
        }
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
            "{}  {}  {}  {} disk(s)  holds {}  changed {}  recovered {}{}",
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
            }
        );
    }
    Ok(())
}
