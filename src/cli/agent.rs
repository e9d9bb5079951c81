//! `agent`, `agent-backup` and `files`: the agent container, granular
//! backups of running VMs through it, and single-file restores.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;

use crate::agent::backup::{agent_backup, Options, Target};
use crate::agent::container::{build, read_config, AgentConfig, BuildOptions};
use crate::error::{Error, ErrorKind, Result};
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
        /// Keep a file or link already under --to that is what the backup
        /// has (size, time, mode; a link's target) instead of refusing:
        /// carries on a restore that was stopped or failed.
        #[arg(long)]
        skip_existing: bool,
    },
}

#[derive(clap::Args)]
pub struct FilesSource {
    #[arg(long)]
    repo: String,
    vm: String,
    /// A file backup (id ending in -files) or a disk backup, read by
    /// loop-mounting its filesystem from a throwaway recovery (default:
    /// the VM's newest file backup, else its newest disk backup).
    #[arg(long)]
    backup: Option<String>,
    /// Disk backups: the disk (0 is disk0).
    #[arg(long, default_value_t = 0)]
    disk: usize,
    /// Disk backups: the partition (0: the whole disk; default: the
    /// first whose filesystem holds PATH).
    #[arg(long)]
    partition: Option<u32>,
}

/// Where `files` reads from.
enum Source {
    Catalog(std::sync::Arc<Repository>, crate::repo::catalog::Catalog),
    Disk(Box<crate::files::disk::Mounted>),
}

impl FilesSource {
    fn open(&self, path: &str, stop: &AtomicBool) -> Result<Source> {
        use crate::repo::catalog::is_catalog_id;
        let r = Repository::open(&self.repo)?;
        crate::util::validate_name("VM name", &self.vm)?;
        let disk_id = match &self.backup {
            Some(b) if is_catalog_id(b) => None,
            Some(b) => Some(b.clone()),
            None if r.catalog_ids(&self.vm)?.is_empty() => {
                let id = r.backup_ids(&self.vm)?.pop().ok_or_else(|| {
                    Error::not_found(format!(
                        "unknown VM {:?}: no backups in {}",
                        self.vm,
                        r.location()
                    ))
                })?;
                eprintln!(
                    "VM {} has no file backups: reading disk backup {id}",
                    self.vm
                );
                Some(id)
            }
            None => None,
        };
        match disk_id {
            None => {
                let c = crate::files::catalog(&r, &self.vm, self.backup.as_deref())?;
                Ok(Source::Catalog(r, c))
            }
            Some(id) => Ok(Source::Disk(Box::new(crate::files::disk::mount(
                &self.repo,
                &self.vm,
                &id,
                self.disk,
                self.partition,
                path,
                stop,
            )?))),
        }
    }
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
                if cfg.hooks.is_empty() {
                    "none".into()
                } else {
                    cfg.hooks.join(", ")
                }
            );
            Ok(())
        }
        (None, false) => Err(Error::invalid(
            "agent: use `agent build`, `agent run` or `agent --version [--container IMAGE]`",
        )),
        (
            Some(AgentCmd::Build {
                output,
                agent_binary,
                agent_version,
                hooks,
            }),
            _,
        ) => {
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
                if cfg.hooks.is_empty() {
                    "none".into()
                } else {
                    cfg.hooks.join(", ")
                }
            );
            println!("{}", output.display());
            Ok(())
        }
        (
            Some(AgentCmd::Run {
                port,
                container,
                job,
            }),
            _,
        ) => {
            let job: crate::agent::guest::Job =
                serde_json::from_str(&job).map_err(|e| Error::invalid(format!("--job: {e}")))?;
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
    allow_quiesced_stream: bool,
    container: &Path,
    jobs: usize,
    (idle_timeout, max_duration): (u64, u64),
    json: bool,
) -> Result<()> {
    let stop = agent_stop()?;
    let targets = vms
        .iter()
        .map(|v| Target::parse(v))
        .collect::<Result<Vec<_>>>()?;
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
        allow_quiesced_stream,
        // Longer than the agent's keep-alive interval.
        idle_timeout: Duration::from_secs(idle_timeout.max(3)),
        max_duration: Duration::from_secs(max_duration.max(1)),
        catalog_limits: crate::repo::catalog::CatalogLimits::STORED,
        stop: stop.clone(),
    };
    let out = agent_backup(&r, &targets, &opts, &|vm, line| {
        if !json {
            tell!("{vm}: {line}");
        }
    })?;
    if json {
        say!("{}", serde_json::to_string_pretty(&out).expect("json"));
    }
    let mut failed = vec![];
    for o in &out {
        match (&o.backup, &o.error) {
            (Some(id), _) => {
                if !json {
                    // Always said, even when the log's bound dropped their lines.
                    let skipped = match o.skipped {
                        0 => String::new(),
                        n => format!(", {n} entries SKIPPED (sockets, devices, FIFOs, names not UTF-8: see the `skipped` lines)"),
                    };
                    tell!(
                        "{}: file backup {id}: {} entries, {} of files, {} new, agent {}, {:.1} s{skipped}",
                        o.vm,
                        o.entries,
                        human_bytes(o.file_bytes),
                        human_bytes(o.new_bytes),
                        o.agent_version.as_deref().unwrap_or("?"),
                        o.duration_ms as f64 / 1000.0
                    );
                    say!("{} {id}", o.vm);
                }
            }
            (None, e) => {
                let e = e.as_deref().unwrap_or("failed");
                if !json {
                    tell!("{}: FAILED: {e}", o.vm);
                }
                failed.push(e.to_string());
            }
        }
    }
    let done = out.len() - failed.len();
    match failed.len() {
        0 => Ok(()),
        _ if stop.load(Ordering::SeqCst) => Err(interrupted_by(Error::interrupted(format!(
            "{done} of {} VMs backed up; {}",
            out.len(),
            failed.join("; ")
        )))),
        1 if out.len() == 1 => Err(Error::invalid(failed.pop().expect("one"))),
        n => Err(Error::invalid(format!(
            "{n} of {} VMs failed: {}",
            out.len(),
            failed.join("; ")
        ))),
    }
}

/// The stop flag of `agent-backup` and `agent-restore`, set by SIGINT or
/// SIGTERM; installed before any thread starts.
fn agent_stop() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    super::stop_on_signals(
        &stop,
        "stopping: the agent ends in the guest (its hooks' post run first), then the container is detached",
        "the agent container may stay attached to the VM (QMP ids rfsagent-*) and the agent may still run in the guest",
    )?;
    Ok(stop)
}

/// An interruption said as such, with the signal.
fn interrupted_by(e: Error) -> Error {
    if e.kind() == ErrorKind::Interrupted {
        Error::interrupted(format!("interrupted by {}: {e}", super::stopped_by()))
    } else {
        e
    }
}

pub fn restore(
    repo: &str,
    vm: &str,
    backup: Option<&str>,
    path: &str,
    to: Option<String>,
    container: &Path,
    (idle_timeout, max_duration): (u64, u64),
) -> Result<()> {
    let stop = agent_stop()?;
    let t = Target::parse(vm)?;
    let r = Repository::open(repo)?;
    let c = crate::files::catalog(&r, &t.name, backup)?;
    let sel = crate::files::select(&c, path)?;
    if !container.is_file() {
        return Err(Error::not_found(format!(
            "no agent container at {} (build it with `recoverfs agent build`)",
            container.display()
        )));
    }
    let n = crate::agent::restore::agent_restore(
        &r,
        &t,
        container,
        &c,
        &sel,
        to.clone(),
        (
            Duration::from_secs(idle_timeout.max(1)),
            Duration::from_secs(max_duration.max(1)),
        ),
        &stop,
        &|line| {
            tell!("{}: {line}", t.name);
        },
    )
    .map_err(interrupted_by)?;
    tell!(
        "{}: restored {n} entries of {path} from file backup {} {}",
        t.name,
        c.id,
        match &to {
            Some(d) => format!("under {d} in the guest"),
            None => "to their places in the guest".into(),
        }
    );
    Ok(())
}

pub fn files(cmd: FilesCmd) -> Result<()> {
    // Before any thread starts (the repository's, the FUSE session's).
    let stop = Arc::new(AtomicBool::new(false));
    super::stop_on_signals(
        &stop,
        "",
        "a disk backup's scratch mount, loop device and staging ($TMPDIR/recoverfs-files-*) and a .recoverfs-tmp.PID file under --to may be left (the next run removes them)",
    )?;
    files_until(cmd, &stop).map_err(interrupted_by)
}

fn files_until(cmd: FilesCmd, stop: &AtomicBool) -> Result<()> {
    match cmd {
        FilesCmd::Ls { src, path, json } => match src.open(&path, stop)? {
            Source::Catalog(_, c) => ls(&crate::files::select(&c, &path)?, json),
            Source::Disk(m) => {
                let m = *m;
                let all = match crate::files::disk::walk(&m.root, &path, stop) {
                    Ok(all) => all,
                    Err(e) => return Err(closed_after(e, m)),
                };
                let listed = ls(&all.iter().collect::<Vec<_>>(), json);
                // Unmounted whatever the listing did; a failure to is told first.
                finish_disk(m).and(listed)
            }
        },
        FilesCmd::Cat { src, path } => {
            let stdout = std::io::stdout();
            let _held = stdout.lock();
            // A stop interrupts a write a stalled reader would block for ever.
            let mut out = std::io::BufWriter::with_capacity(
                1 << 16,
                super::stopout::StoppableOut::new(stdout.as_fd(), stop),
            );
            let flush = |out: &mut dyn std::io::Write| {
                out.flush().map_err(|e| Error::io("write stdout", e))
            };
            let copied = match src.open(&path, stop)? {
                Source::Catalog(r, c) => {
                    let e = c.find(path.trim_end_matches('/')).ok_or_else(|| {
                        Error::not_found(format!(
                            "{path} is not in file backup {} of VM {}",
                            c.id, c.vm
                        ))
                    })?;
                    crate::files::cat(&r, &c, e, &mut out, stop)
                }
                Source::Disk(m) => {
                    let m = *m;
                    let r = crate::files::disk::walk(&m.root, &path, stop).and_then(|mut all| {
                        crate::files::disk::copy_file(&m.root, &all.remove(0), &mut out, stop)
                    });
                    return match r.and_then(|()| flush(&mut out)) {
                        Ok(()) => finish_disk(m),
                        Err(e) => {
                            // What was copied reaches stdout, also when stopped.
                            let _ = flush(&mut out);
                            Err(closed_after(when_stopped(e, to_stdout(&path)), m))
                        }
                    };
                }
            };
            let flushed = flush(&mut out);
            copied.map_err(|e| when_stopped(e, to_stdout(&path)))?;
            flushed
        }
        FilesCmd::Restore {
            src,
            path,
            to,
            skip_existing,
        } => {
            // Notes (a hard link restored as a copy) for the person
            // restoring, as agent-restore says them, not only the log.
            let how = crate::files::How {
                existing: match skip_existing {
                    true => crate::files::Existing::Skip,
                    false => crate::files::Existing::Refuse,
                },
                say: &|n| {
                    tell!("note: {n}");
                },
            };
            let (n, from) = match src.open(&path, stop)? {
                Source::Catalog(r, c) => {
                    let from = format!("file backup {} of VM {}", c.id, c.vm);
                    let sel = crate::files::select(&c, &path)?;
                    let n = crate::files::restore_from(&r, &c, &sel, &to, stop, &how)
                        .map_err(|e| when_stopped(e, restoring(&path, &from, &to)))?;
                    (n, from)
                }
                Source::Disk(m) => {
                    let m = *m;
                    let from = format!(
                        "disk backup {} of VM {} ({} on {})",
                        m.backup, src.vm, m.fstype, m.device
                    );
                    let root = m.root.clone();
                    let r = crate::files::disk::walk(&m.root, &path, stop).and_then(|all| {
                        let sel: Vec<_> = all.iter().collect();
                        crate::files::restore_into(
                            &sel,
                            &to,
                            &|e, out| crate::files::disk::copy_file(&root, e, out, stop),
                            stop,
                            &how,
                        )
                    });
                    let n = match r {
                        Ok(n) => n,
                        Err(e) => {
                            let e = when_stopped(e, restoring(&path, &from, &to));
                            return Err(closed_after(from_repository(e), m));
                        }
                    };
                    finish_disk(m)?;
                    (n, from)
                }
            };
            tell!(
                "restored {n} entries of {path} from {from} under {}",
                to.display()
            );
            Ok(())
        }
    }
}

/// `e` after `what`, if it is an interruption (it says how far it got).
fn when_stopped(e: Error, what: String) -> Error {
    if e.kind() == ErrorKind::Interrupted {
        e.context(what)
    } else {
        e
    }
}

/// A disk backup's files are read through a scratch recovery: an I/O
/// error reading one is the repository's (explore8 M2: it read like a
/// failing disk at 3 a.m.).
fn from_repository(e: Error) -> Error {
    if e.kind() != ErrorKind::Io {
        return e;
    }
    Error::new(
        ErrorKind::Io,
        format!(
            "{e} (the disk backup is read from the repository: an I/O error here is the repository's, most likely not answering: see the lines above)"
        ),
    )
}

fn to_stdout(path: &str) -> String {
    format!("writing {path} to stdout")
}

fn restoring(path: &str, from: &str, to: &Path) -> String {
    format!("restoring {path} from {from} under {}", to.display())
}

/// Unmounts and releases a disk backup after `e`; an interruption says
/// whether that worked (a failure otherwise stays the error).
fn closed_after(e: Error, m: crate::files::disk::Mounted) -> Error {
    let closed = m.close();
    if e.kind() != ErrorKind::Interrupted {
        return e;
    }
    Error::interrupted(match closed {
        Ok(()) => format!("{e}; the scratch recovery was unmounted and removed"),
        Err(c) => format!("{e}; cleaning up the scratch recovery failed: {c}"),
    })
}

fn ls(sel: &[&crate::repo::catalog::Entry], json: bool) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let r = if json {
        writeln!(out, "{}", serde_json::to_string_pretty(sel).expect("json"))
    } else {
        sel.iter()
            .try_for_each(|e| writeln!(out, "{}", crate::files::ls_line(e)))
    };
    // A reader that stopped early (`| head`): EPIPE, which ends the
    // command quietly (`end_quietly_when_stdout_closes`), as it does others.
    r.and_then(|()| out.flush())
        .map_err(|e| Error::io("write stdout", e))
}

/// Says what reading the disk backup fetched, and unmounts.
fn finish_disk(m: crate::files::disk::Mounted) -> Result<()> {
    let (fetched, size) = m.fetched();
    tell!(
        "read {} on {} of disk backup {}: fetched {} of the {} disk",
        m.fstype,
        m.device,
        m.backup,
        human_bytes(fetched),
        human_bytes(size)
    );
    m.close()
}
