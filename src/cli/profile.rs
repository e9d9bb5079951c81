//! `recoverfs profile …` (operational profiles in the repository) and the
//! prefetch flags of `serve`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use crate::error::{Error, Result};
use crate::prefetch::profile::{self, MergedDisk, ProfileDoc};
use crate::prefetch::PrefetchOptions;
use crate::repo::Repository;
use crate::util::human_bytes;

#[derive(clap::Args, Clone)]
pub struct PrefetchArgs {
    /// Do not follow operational profiles (stored or default) at recovery.
    #[arg(long)]
    no_profile: bool,
    /// Without a stored profile, do not stage partition tables, boot
    /// sectors and filesystem metadata ahead of the guest.
    #[arg(long)]
    no_default_profile: bool,
    /// Seconds after `recover` whose first reads are recorded as the
    /// VM's profile.
    #[arg(long, default_value_t = 300)]
    profile_window: u64,
    /// How far ahead of the guest, in profile seconds, blocks are fetched.
    #[arg(long, default_value_t = 10.0)]
    prefetch_horizon: f64,
}

impl PrefetchArgs {
    pub fn options(&self) -> PrefetchOptions {
        let mut o = PrefetchOptions {
            use_profile: !self.no_profile,
            default_profile: !self.no_default_profile,
            record_window: Duration::from_secs(self.profile_window),
            ..Default::default()
        };
        o.feeder.horizon = Duration::from_secs_f64(self.prefetch_horizon.clamp(0.0, 86_400.0));
        o
    }
}

#[derive(Subcommand)]
pub enum ProfileCmd {
    /// Print the merged profile: block count and timeline.
    Show {
        #[arg(long)]
        repo: String,
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Write the profile (every recording) as JSON.
    Export {
        #[arg(long)]
        repo: String,
        vm: String,
        /// Output file (default: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Replace the VM's profile with an exported one (`-` reads standard input).
    Import {
        #[arg(long)]
        repo: String,
        vm: String,
        file: PathBuf,
        /// Import a profile recorded for another VM even if its disks
        /// (count and sizes, from the backup it was recorded from) cannot
        /// be shown to match this VM's newest backup.
        #[arg(long)]
        other_vm: bool,
    },
    /// Delete the VM's profile; its next recovery uses the default one.
    Clear {
        #[arg(long)]
        repo: String,
        vm: String,
    },
}

pub fn run(cmd: ProfileCmd) -> Result<()> {
    match cmd {
        ProfileCmd::Show { repo, vm, json } => {
            let repo = Repository::open(&repo)?;
            let doc = load_known(&repo, &vm)?;
            show(&vm, doc.as_ref(), json);
            Ok(())
        }
        ProfileCmd::Export { repo, vm, output } => {
            let repo = Repository::open(&repo)?;
            let doc = load_known(&repo, &vm)?.ok_or_else(|| no_profile(&vm))?;
            let mut text = serde_json::to_vec_pretty(&doc).expect("json");
            text.push(b'\n');
            match output {
                Some(p) => crate::util::write_atomic(&p, &text, 0o644, true)?,
                None => std::io::stdout()
                    .write_all(&text)
                    .map_err(|e| Error::io("write standard output", e))?,
            }
            Ok(())
        }
        ProfileCmd::Import {
            repo,
            vm,
            file,
            other_vm,
        } => {
            crate::util::validate_name("VM name", &vm)?;
            let repo = Repository::open(&repo)?;
            let bytes = read_input(&file)?;
            let doc = profile::parse_export(&bytes, &file.display().to_string())?;
            let doc = profile::import(&repo, doc, &vm, other_vm)?;
            eprintln!(
                "imported {} recording(s) as the profile of VM {vm}",
                doc.recordings.len()
            );
            Ok(())
        }
        ProfileCmd::Clear { repo, vm } => {
            let repo = Repository::open(&repo)?;
            require_known(&repo, &vm)?;
            if profile::clear(&repo, &vm)? {
                eprintln!("cleared the profile of VM {vm}");
            } else {
                eprintln!("VM {vm} had no profile");
            }
            Ok(())
        }
    }
}

fn no_profile(vm: &str) -> Error {
    Error::not_found(format!(
        "VM {vm} has no operational profile yet (recovery sessions and verify-boot record one)"
    ))
}

/// A VM is known if it has backups or a profile.
fn require_known(repo: &Repository, vm: &str) -> Result<()> {
    crate::util::validate_name("VM name", vm)?;
    if repo.backup_ids(vm)?.is_empty() && profile::load(repo, vm)?.is_none() {
        return Err(Error::not_found(format!(
            "unknown VM {vm:?}: no backups or profile in {}",
            repo.location()
        )));
    }
    Ok(())
}

fn load_known(repo: &Repository, vm: &str) -> Result<Option<ProfileDoc>> {
    require_known(repo, vm)?;
    profile::load(repo, vm)
}

fn read_input(file: &PathBuf) -> Result<Vec<u8>> {
    let mut bytes = vec![];
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("read standard input", e))?;
        return Ok(bytes);
    }
    std::fs::read(file).map_err(|e| Error::io(format!("profile file {}", file.display()), e))
}

fn show(vm: &str, doc: Option<&ProfileDoc>, as_json: bool) {
    let merged = doc.map(ProfileDoc::merge).unwrap_or_default();
    if as_json {
        let out = json!({
            "vm": vm,
            "recordings": doc.map_or(vec![], |d| d.recordings.iter().map(|r| json!({
                "recorded": r.recorded,
                "backup": r.backup,
                "source": r.source,
                "blocks": r.disks.iter().map(|d| d.accesses.len()).sum::<usize>(),
            })).collect()),
            "disks": merged.iter().map(disk_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return;
    }
    let Some(doc) = doc else {
        println!("VM {vm}: no operational profile; recoveries stage the default one (partition tables, boot sectors, filesystem metadata)");
        return;
    };
    println!("VM {vm}: {} recording(s)", doc.recordings.len());
    for r in &doc.recordings {
        let n: usize = r.disks.iter().map(|d| d.accesses.len()).sum();
        println!(
            "  {}  backup {}  {}  {n} blocks",
            r.recorded, r.backup, r.source
        );
    }
    for m in &merged {
        let every = m.blocks.iter().filter(|p| p.seen == m.recordings).count();
        println!(
            "disk{}: {} blocks ({}), {every} read in every recording",
            m.index,
            m.blocks.len(),
            human_bytes(m.blocks.len() as u64 * m.block_size)
        );
        for (t, n) in profile::timeline(&m.blocks) {
            println!("  by {:>8}  {n:>7} blocks", mark(t));
        }
    }
}

fn disk_json(m: &MergedDisk) -> serde_json::Value {
    json!({
        "index": m.index,
        "block_size": m.block_size,
        "blocks": m.blocks.len(),
        "bytes": m.blocks.len() as u64 * m.block_size,
        "in_every_recording": m.blocks.iter().filter(|p| p.seen == m.recordings).count(),
        "timeline": profile::timeline(&m.blocks).iter()
            .map(|(t, n)| json!({"until_ms": (*t != u32::MAX).then_some(*t), "blocks": n}))
            .collect::<Vec<_>>(),
        "order": m.blocks.iter().map(|p| json!([p.block, p.t_ms, p.seen])).collect::<Vec<_>>(),
    })
}

fn mark(t_ms: u32) -> String {
    if t_ms == u32::MAX {
        "later".into()
    } else {
        format!("{:.1} s", t_ms as f64 / 1000.0)
    }
}
