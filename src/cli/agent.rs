//! `agent`, `agent-backup` and `files`: the agent container, granular
//! backups of running VMs through it, and single-file restores.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use crate::agent::backup::{agent_backup, Options, Target};
use crate::agent::container::{build, read_config, AgentConfig, BuildOptions};
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::util::human_bytes;

/// Where `agent build` writes and `agent-backup` attaches from by default.
pub const DEFAULT_CONTAINER: &str = "/var/lib/recoverfs/agent.img";

#[derive(Subcommand)]
pub enum AgentCmd {
    /// Build the agent container image: the static agent binary,
    /// agent.json and hooks, with mke2fs -d (nothing mounted). Replaces
    /// the image atomically; the next attachment runs the new agent.
    Build {
        #[arg(short = 'o', long, env = "RECOVERFS_AGENT_CONTAINER", default_value = DEFAULT_CONTAINER)]
        output: PathBuf,
        /// The static agent binary (default: `make agent`'s build).
        #[arg(long)]
        agent_binary: Option<PathBuf>,
        /// The container's version (default: recoverfs's own).
        #[arg(long)]
        agent_version: Option<String>,
        /// A directory of hooks: NAME/pre (quiesce) and NAME/post (resume).
        #[arg(long)]
        hooks: Option<PathBuf>,
    },
    /// In the guest (started by agent-backup): run one job on the stream port.
    Run {
        #[arg(long)]
        port: PathBuf,
        /// The mounted container.
        #[arg(long)]
        container: PathBuf,
        /// The job, as JSON.
        #[arg(long)]
        job: String,
    },
}

#[derive(Subcommand)]
pub enum FilesCmd {
    /// List the entries at or under PATH.
    Ls {
        #[command(flatten)]
        src: FilesSource,
        #[arg(default_value = "/")]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Write one file's content to stdout.
    Cat {
        #[command(flatten)]
        src: FilesSource,
        path: String,
    },
    /// Copy PATH (a file, or a directory and everything under it) to DIR,
    /// at its guest path under DIR, with mode, owner and times.
    Restore {
        #[command(flatten)]
        src: FilesSource,
        path: String,
        #[arg(long, default_value = ".")]
        to: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct FilesSource {
    #[arg(long)]
    repo: String,
    vm: String,
    /// A file backup id (default: the VM's newest file backup).
    #[arg(long)]
    backup: Option<String>,
}

/// `agent --version`, and the subcommands.
pub fn agent(cmd: Option<AgentCmd>, version: bool, container: Option<PathBuf>) -> Result<()> {
    match (cmd, version) {
        (None, true) => {
            let c = container.unwrap_or_else(|| PathBuf::from(DEFAULT_CONTAINER));
            let cfg = if c.is_dir() {
                AgentConfig::load(&c)?
            } else {
                read_config(&c)?
            };
            println!(
                "recoverfs agent {} (binary {}, built {}, hooks: {})",
                cfg.version,
                cfg.binary_version,
                cfg.built,
                if cfg.hooks.is_empty() { "none".into() } else { cfg.hooks.join(", ") }
            );
            Ok(())
        }
        (None, false) => Err(Error::invalid(
            "agent: use `agent build`, `agent run` or `agent --version [--container IMAGE]`",
        )),
        (Some(AgentCmd::Build { output, agent_binary, agent_version, hooks }), _) => {
            let cfg = build(&BuildOptions {
                output: output.clone(),
                binary: agent_binary,
                version: agent_version,
                hooks,
            })?;
            eprintln!(
                "built agent container {} (agent {}, hooks: {})",
                output.display(),
                cfg.version,
                if cfg.hooks.is_empty() { "none".into() } else { cfg.hooks.join(", ") }
            );
            println!("{}", output.display());
            Ok(())
        }
        (Some(AgentCmd::Run { port, container, job }), _) => {
            let job: crate::agent::guest::Job = serde_json::from_str(&job)
                .map_err(|e| Error::invalid(format!("--job: {e}")))?;
            crate::agent::guest::run(&port, &container, &job)
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn backup(
    repo: &str,
    vms: &[String],
    paths: Vec<String>,
    hooks: Vec<String>,
    container: &Path,
    jobs: usize,
    idle_timeout: u64,
    json: bool,
) -> Result<()> {
    let targets = vms.iter().map(|v| Target::parse(v)).collect::<Result<Vec<_>>>()?;
    if !container.is_file() {
        return Err(Error::not_found(format!(
            "no agent container at {} (build it with `recoverfs agent build -o {}`)",
            container.display(),
            container.display()
        )));
    }
    let (r, created) = Repository::open_or_create(repo)?;
    if created {
        eprintln!("created repository {}", r.location());
    }
    let opts = Options {
        container: container.to_path_buf(),
        paths,
        hooks,
        jobs: jobs.max(1),
        idle_timeout: Duration::from_secs(idle_timeout.max(1)),
    };
    let out = agent_backup(&r, &targets, &opts, &|vm, line| {
        if !json {
            eprintln!("{vm}: {line}");
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    }
    let mut failed = vec![];
    for o in &out {
        match (&o.backup, &o.error) {
            (Some(id), _) => {
                if !json {
                    eprintln!(
                        "{}: file backup {id}: {} entries, {} of files, {} new, agent {}, {:.1} s",
                        o.vm,
                        o.entries,
                        human_bytes(o.file_bytes),
                        human_bytes(o.new_bytes),
                        o.agent_version.as_deref().unwrap_or("?"),
                        o.duration_ms as f64 / 1000.0
                    );
                    println!("{} {id}", o.vm);
                }
            }
            (None, e) => {
                let e = e.as_deref().unwrap_or("failed");
                if !json {
                    eprintln!("{}: FAILED: {e}", o.vm);
                }
                failed.push(e.to_string());
            }
        }
    }
    match failed.len() {
        0 => Ok(()),
        1 if out.len() == 1 => Err(Error::invalid(failed.pop().expect("one"))),
        n => Err(Error::invalid(format!(
            "{n} of {} VMs failed: {}",
            out.len(),
            failed.join("; ")
        ))),
    }
}

pub fn files(cmd: FilesCmd) -> Result<()> {
    let open = |s: &FilesSource| -> Result<(std::sync::Arc<Repository>, crate::repo::catalog::Catalog)> {
        let r = Repository::open(&s.repo)?;
        let c = crate::files::catalog(&r, &s.vm, s.backup.as_deref())?;
        Ok((r, c))
    };
    match cmd {
        FilesCmd::Ls { src, path, json } => {
            let (_, c) = open(&src)?;
            let sel = crate::files::select(&c, &path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sel).expect("json"));
            } else {
                for e in sel {
                    println!("{}", crate::files::ls_line(e));
                }
            }
            Ok(())
        }
        FilesCmd::Cat { src, path } => {
            let (r, c) = open(&src)?;
            let e = c
                .find(path.trim_end_matches('/'))
                .ok_or_else(|| Error::not_found(format!("{path} is not in file backup {} of VM {}", c.id, c.vm)))?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            crate::files::cat(&r, &c, e, &mut out)?;
            std::io::Write::flush(&mut out).map_err(|e| Error::io("write stdout", e))
        }
        FilesCmd::Restore { src, path, to } => {
            let (r, c) = open(&src)?;
            let sel = crate::files::select(&c, &path)?;
            let n = crate::files::restore(&r, &c, &sel, &to)?;
            eprintln!(
                "restored {n} entries of {} from file backup {} of VM {} under {}",
                path,
                c.id,
                c.vm,
                to.display()
            );
            Ok(())
        }
    }
}
