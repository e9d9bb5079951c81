//! `recoverfs list`, `recoverfs forget` and `recoverfs gc`: the backups
//! of a repository, retention and garbage collection (`repo::forget`,
//! `repo::gc`).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::repo::forget::{forget, ForgetOptions, ForgetReport};
use crate::repo::gc::{collect, GcOptions, GcReport, Referrer};
use crate::repo::retention::Policy;
use crate::repo::{Listed, Repository};
use crate::util::human_bytes;

/// `recoverfs list`: every backup that reads, and for each damaged one a
/// `DAMAGED manifest|catalog VM/ID: why` line (as `verify` names it) or,
/// in JSON, an entry with an `error`. Damage makes the exit non-zero once
/// all is listed, so scripts notice.
pub fn list(repo: &Repository, json: bool) -> Result<()> {
    let all = repo.list_backups()?;
    let damaged = all
        .iter()
        .filter(|b| matches!(b, Listed::Damaged { .. }))
        .count();
    if json {
        let doc = serde_json::json!({"repo": repo.location(), "backups": all});
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    } else if all.is_empty() {
        println!("no backups in {}", repo.location());
    } else {
        print_list(&all);
    }
    match damaged {
        0 => Ok(()),
        n => Err(Error::corrupt(format!(
            "{n} damaged backup(s) in {} (the DAMAGED lines); `recoverfs verify` checks every backup and chunk",
            repo.location()
        ))),
    }
}

fn print_list(all: &[Listed]) {
    for line in list_lines(all) {
        println!("{line}");
    }
}

/// `list`'s table: a header, a line per backup or damaged one.
fn list_lines(all: &[Listed]) -> Vec<String> {
    let mut out = vec![];
    // As wide as the longest name and id (a file backup's id is longer
    // than a disk backup's: explore9 L5), at least the usual widths.
    let backups = || {
        all.iter().filter_map(|b| match b {
            Listed::Backup(b) => Some(b),
            Listed::Damaged { .. } => None,
        })
    };
    let vm_w = backups().map(|b| b.vm.chars().count()).fold(16, usize::max);
    let id_w = backups().map(|b| b.id.chars().count()).fold(26, usize::max);
    out.push(format!(
        "{:<vm_w$} {:<id_w$} {:<5} {:<21} {:>5} {:>11} {:>11} {:>11}",
        "VM", "BACKUP", "KIND", "CREATED", "DISKS", "SIZE", "STORED", "NEW"
    ));
    for b in all {
        match b {
            Listed::Backup(b) => out.push(format!(
                "{:<vm_w$} {:<id_w$} {:<5} {:<21} {:>5} {:>11} {:>11} {:>11}",
                b.vm,
                b.id,
                b.kind,
                b.created,
                b.disks,
                human_bytes(b.virtual_size),
                human_bytes(b.stored_bytes),
                human_bytes(b.new_bytes)
            )),
            Listed::Damaged {
                vm,
                id,
                kind,
                error,
                ..
            } => {
                let what = if *kind == "files" {
                    "catalog"
                } else {
                    "manifest"
                };
                out.push(format!("DAMAGED {what} {vm}/{id}: {error}"));
            }
        }
    }
    out
}

#[derive(clap::Args)]
pub struct ForgetArgs {
    #[arg(long)]
    repo: String,
    /// Only this VM's backups (default: every VM's, each on its own).
    #[arg(long)]
    vm: Option<String>,
    /// Keep the N newest backups.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_last: u32,
    /// Keep the newest backup of each of the last N hours (UTC) that have one.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_hourly: u32,
    /// Keep the newest backup of each of the last N days (UTC) that have one.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_daily: u32,
    /// Keep the newest backup of each of the last N ISO weeks that have one.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_weekly: u32,
    /// Keep the newest backup of each of the last N months that have one.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_monthly: u32,
    /// Keep the newest backup of each of the last N years that have one.
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_yearly: u32,
    /// Print what would be kept and removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Remove backups that recovery sessions (live or kept staging) use
    /// too; their daemons report it in `status`.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct GcArgs {
    #[arg(long)]
    repo: String,
    /// Count what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds to wait for running backups to finish before giving up
    /// (gc removes nothing while a backup is being written).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    wait: u64,
    #[arg(long)]
    json: bool,
}

/// Every kind of repository object that references chunks.
pub fn referrers() -> Vec<Referrer> {
    vec![
        crate::repo::gc::MANIFESTS,
        crate::prefetch::profile::REFERRER,
        crate::repo::catalog::REFERRER,
    ]
}

pub fn run_forget(a: ForgetArgs) -> Result<()> {
    if let Some(vm) = &a.vm {
        crate::util::validate_name("VM name", vm)?;
    }
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    policy.check()?;
    let repo = Repository::open(&a.repo)?;
    let r = forget(
        &repo,
        &ForgetOptions {
            vm: a.vm,
            policy,
            dry_run: a.dry_run,
            force: a.force,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    } else {
        print_forget(&r);
    }
    Ok(())
}

fn print_forget(r: &ForgetReport) {
    for v in &r.vms {
        println!("VM {}:", v.vm);
        for w in &v.warnings {
            println!("  WARNING: {w}");
        }
        for b in &v.backups {
            let what = match (b.keep, r.dry_run) {
                (true, _) => "keep",
                (false, false) => "remove",
                (false, true) => "would remove",
            };
            println!(
                "  {what:<12} {:<5} {:<24} {}  {}",
                b.kind.name(),
                b.id,
                b.created,
                b.reason
            );
            for u in &b.forced_from {
                println!(
                    "  {:<12} (--force: {u}; its daemon reports this in status)",
                    ""
                );
            }
        }
    }
    let verb = if r.dry_run { "would forget" } else { "forgot" };
    println!(
        "{verb} {} backup(s), kept {}{}",
        r.removed,
        r.kept,
        if r.removed > 0 && !r.dry_run {
            "; `recoverfs gc` frees their chunks"
        } else {
            ""
        }
    );
}

pub fn run_gc(a: GcArgs) -> Result<()> {
    // Before any thread starts: they inherit the blocked signals.
    super::release_locks_on_signals("gc")?;
    let repo = Repository::open(&a.repo)?;
    let r = collect(
        &repo,
        &referrers(),
        GcOptions {
            dry_run: a.dry_run,
            wait: Duration::from_secs(a.wait),
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    } else {
        print_gc(&r);
    }
    Ok(())
}

fn print_gc(r: &GcReport) {
    let objects: Vec<String> = r
        .referrers
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    println!(
        "{}: {} chunk(s), {} referenced by {}",
        r.repo,
        r.chunks,
        r.referenced_chunks,
        objects.join(", ")
    );
    println!(
        "{} {} unreferenced chunk(s): {} {} ({} kept)",
        if r.dry_run { "would remove" } else { "removed" },
        r.removed_chunks,
        human_bytes(r.freed_bytes),
        if r.dry_run { "would be freed" } else { "freed" },
        human_bytes(r.kept_bytes)
    );
    if r.foreign_objects > 0 {
        println!(
            "left alone: {} object(s) under chunks/ that are not chunks",
            r.foreign_objects
        );
    }
    if r.leftover_files > 0 {
        println!(
            "{} {} temp file(s) of killed writes ({})",
            if r.dry_run { "would remove" } else { "removed" },
            r.leftover_files,
            human_bytes(r.leftover_bytes)
        );
    }
}

#[cfg(test)]
mod list_tests {
    use super::*;
    use crate::repo::BackupSummary;

    fn summary(vm: &str, id: &str, kind: &'static str) -> Listed {
        Listed::Backup(BackupSummary {
            vm: vm.into(),
            id: id.into(),
            kind,
            created: "2026-11-24T19:43:20Z".into(),
            disks: 1,
            virtual_size: 1 << 30,
            stored_bytes: 1 << 20,
            new_bytes: 1 << 20,
        })
    }

    #[test]
    fn list_columns_line_up_with_file_backup_ids_and_long_vm_names() {
        let all = [
            summary("fsvm", "20261124-194320.727-08d5b6", "disk"),
            summary("fsvm", "20261124-194320.727-bb01a1-files", "files"),
            summary("a-vm-name-longer-than-sixteen", "20261124-194321", "disk"),
        ];
        let lines = list_lines(&all);
        let kind_at = |l: &str| 1 + l.find(" disk ").or_else(|| l.find(" files ")).unwrap();
        let header = lines[0].find("KIND").unwrap();
        for l in &lines[1..] {
            assert_eq!(kind_at(l), header, "{lines:#?}");
        }
    }
}
