//! Command-line interface: argument parsing and one function per command.
//! Repository commands run in-process; session commands talk to a daemon
//! over its control socket. The commands and their flags are declared in
//! `args`; this module dispatches them.

// First: its macros (`say!`, `tell!`) serve the modules below.
#[macro_use]
pub(crate) mod say;
mod agent;
mod args;
mod backup;
mod boot;
mod key;
mod maint;
pub(crate) mod output;
mod pins;
mod precopy;
mod profile;
mod recover;
mod serve;
mod staging;
mod stopout;
mod upload;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

pub use args::{Cli, Command, SocketArg};
pub use stopout::end_quietly_when_stdout_closes;

use crate::api::client::Client;
use crate::error::{Error, Result};
use crate::repo::Repository;

pub fn run(cli: Cli) -> Result<()> {
    key::install(&cli.keys)?;
    match cli.command {
        Command::Init { repo, encrypt } if encrypt => key::init_encrypted(&repo, &cli.keys),
        Command::Key { cmd } => key::run(cmd, &cli.keys),
        Command::Init { repo, .. } => {
            let (r, created) = Repository::open_or_create(&repo)?;
            println!(
                "{} repository {} (id {})",
                if created { "created" } else { "existing" },
                r.location(),
                r.id()
            );
            Ok(())
        }
        Command::Backup {
            repo,
            vm,
            config,
            chunk_size,
            images,
            session,
            socket,
            json,
        } => match (session, repo, vm) {
            (Some(vm), _, _) => backup::backup_session(&socket, &vm, json),
            (None, _, _) if json => Err(Error::invalid("--json goes with --session")),
            (None, Some(repo), Some(vm)) => backup::backup(&repo, vm, config, &chunk_size, images),
            _ => Err(Error::invalid(
                "backup needs --repo, --vm and images, or --session",
            )),
        },
        Command::BackupVms {
            repo,
            vms,
            agents,
            new_identity,
            jobs,
            chunk_size,
            rate_window,
            incremental,
            order,
            json,
        } => backup::backup_vms(
            &repo,
            &vms,
            (&agents, &new_identity),
            jobs,
            &chunk_size,
            rate_window,
            (incremental, order),
            json,
        ),
        Command::Agent {
            cmd,
            version,
            container,
        } => agent::agent(cmd, version, container),
        Command::AgentBackup {
            repo,
            vms,
            paths,
            hooks,
            allow_quiesced_stream,
            container,
            jobs,
            idle_timeout,
            max_duration,
            json,
        } => agent::backup(
            &repo,
            &vms,
            paths,
            hooks,
            allow_quiesced_stream,
            &container,
            jobs,
            (idle_timeout, max_duration),
            json,
        ),
        Command::AgentRestore {
            repo,
            vm,
            backup,
            path,
            to,
            in_place,
            container,
            idle_timeout,
            max_duration,
        } => {
            if to.is_none() && !in_place {
                return Err(Error::invalid(
                    "agent-restore replaces files in the running guest only with --in-place; \
                     or restore under a directory with --to DIR",
                ));
            }
            agent::restore(
                &repo,
                &vm,
                backup.as_deref(),
                &path,
                to,
                &container,
                (idle_timeout, max_duration),
            )
        }
        Command::Files { cmd } => agent::files(cmd),
        Command::Precopy(a) => precopy::run(a),
        Command::Upload(a) => upload::run(a),
        Command::List { repo, json } => maint::list(&*Repository::open(&repo)?, json),
        Command::Forget(a) => maint::run_forget(a),
        Command::Gc(a) => maint::run_gc(a),
        Command::Verify {
            repo,
            vm,
            backup,
            repair,
            wait,
        } => output::verify(
            &Repository::open(&repo)?,
            vm.as_deref(),
            backup.as_deref(),
            repair.then(|| std::time::Duration::from_secs(wait)),
        ),
        Command::Serve {
            repo,
            staging,
            staging_lost,
            mount,
            socket,
            socket_group,
            allow_other,
            owner,
            fetches_in_flight,
            fuse_threads,
            fuse_passthrough,
            no_fuse_keeper,
            stage_fills_direct,
            flush_interval,
            staging_max,
            staging_reserve,
            nfs,
            allow,
            nfs_no_root_squash,
            nfs_write_through,
            nfs_max_connections,
            nbd,
            export_point,
            max_connections_per_host,
            repo_delay_ms,
            prefetch,
        } => {
            let placement =
                serve::placement_config(&export_point, max_connections_per_host, &nfs, &nbd)?;
            if allow_other && owner.is_none() {
                return Err(Error::invalid(
                    "--allow-other needs --owner UID:GID, the user the hypervisor runs as (the disks are mode 0600)",
                ));
            }
            let owner = owner.as_deref().map(serve::parse_owner).transpose()?;
            crate::staging::io::set_direct_fills(stage_fills_direct);
            let network = !nfs.is_empty()
                || !export_point.is_empty()
                || nbd.iter().any(|l| !l.starts_with("unix:"));
            let allow = serve::allow_list(&allow, network)?;
            let nfs = serve::nfs_options(
                &nfs,
                &allow,
                !nfs_no_root_squash,
                nfs_write_through,
                owner,
                !export_point.is_empty(),
                nfs_max_connections,
            )?;
            let nbd = nbd
                .iter()
                .map(|l| serve::parse_nbd_listen(l))
                .collect::<Result<Vec<_>>>()?;
            let size = |flag: &str, v: Option<String>| -> Result<u64> {
                match v {
                    None => Ok(0),
                    Some(v) => match crate::util::parse_size(&v) {
                        Ok(0) => Err(Error::invalid(format!("{flag} must be more than 0"))),
                        Ok(n) => Ok(n),
                        Err(e) => Err(Error::invalid(format!("{flag}: {e}"))),
                    },
                }
            };
            let staging_limits = crate::daemon::StagingLimits {
                max: size("--staging-max", staging_max)?,
                reserve: size("--staging-reserve", staging_reserve)?,
            };
            crate::daemon::serve(crate::daemon::ServeOptions {
                staging_limits,
                nfs,
                nbd,
                allow,
                repo_delay: repo_delay_ms.map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0)),
                repo,
                staging,
                staging_lost,
                mount,
                socket,
                socket_group: socket_group
                    .as_deref()
                    .map(crate::api::peer::group_id)
                    .transpose()?,
                datastore: crate::daemon::MountOptions {
                    allow_other,
                    owner,
                    fetches_in_flight: fetches_in_flight.max(1),
                    fuse_threads,
                    fuse_passthrough,
                    fuse_keeper: !no_fuse_keeper,
                    flush_interval: Duration::from_secs_f64(flush_interval.clamp(0.1, 3600.0)),
                    prefetch: prefetch.options(),
                    placement,
                    // The daemon's sessions resume after it: never throwaway.
                    throwaway: false,
                },
            })
        }
        Command::FuseKeeper { name, .. } => crate::export::fuse::keeper::run(&name),
        Command::FuseLetGo { staging } => {
            let mount = crate::daemon::fuse_let_go(&staging)?;
            eprintln!(
                "the FUSE mount {} is let go: disk I/O waiting on it fails with ENOTCONN",
                mount.display()
            );
            Ok(())
        }
        Command::Profile { cmd } => profile::run(cmd),
        Command::Pins { cmd } => pins::run(cmd),
        Command::Staging { cmd } => staging::run(cmd),
        Command::Recover {
            socket,
            vm,
            backup,
            host,
            export_point,
            force,
            second_copy,
            explain,
            json,
        } => recover::run(
            &socket,
            recover::RecoverArgs {
                vms: &vm,
                backup: backup.as_deref(),
                host: host.as_deref(),
                export_point: &export_point,
                force,
                second_copy,
                explain,
                json,
            },
        ),
        Command::ExportPoints { socket, json } => {
            let r = client(&socket).get("/export-points")?;
            output::export_points(&r, json);
            Ok(())
        }
        Command::Relocate {
            socket,
            vm,
            to,
            pause,
            resume,
            cancel,
            keep_target,
            rate,
            force,
            wait,
        } => {
            crate::util::validate_name("VM name", &vm)?;
            // A signal ends only the waiting (the relocation goes on in the
            // daemon): the wait's last line says so. Set up before any
            // thread starts, as `stop_on_signals` needs.
            let stop = Arc::new(AtomicBool::new(false));
            if wait {
                stop_on_signals(&stop, "", "the relocation goes on in the daemon")?;
            }
            let c = client(&socket);
            if cancel {
                let r = c.post(
                    &format!("/sessions/{vm}/relocate/cancel"),
                    &json!({"keep_target": keep_target}),
                )?;
                println!("{}", output::cancelled_line(&vm, &r, keep_target));
                return Ok(());
            }
            if pause || resume {
                let verb = if pause { "pause" } else { "resume" };
                let st = c.post(&format!("/sessions/{vm}/relocate/{verb}"), &json!({}))?;
                say!("relocation of VM {vm}: {}", output::relocation_line(&st));
                if wait && resume {
                    output::wait_relocation(&c, &vm, &stop)?;
                }
                return Ok(());
            }
            let to = to.expect("clap requires --to");
            // The daemon resolves the path, so make it absolute here.
            let to = std::path::absolute(&to)
                .map_err(|e| Error::io(format!("target {}", to.display()), e))?;
            let st = c.post(
                &format!("/sessions/{vm}/relocate"),
                &json!({"to": to, "rate_mbps": rate, "force": force}),
            )?;
            tell!(
                "relocating VM {vm} to {}",
                st["target"].as_str().unwrap_or("?")
            );
            if wait {
                output::wait_relocation(&c, &vm, &stop)?;
            }
            Ok(())
        }
        Command::Status { socket, json } => {
            let c = client(&socket);
            output::status(&c.get("/sessions")?, json)?;
            // A daemon without pre-copy jobs (an older one) is fine.
            if let Ok(jobs) = c.get("/precopy") {
                precopy::print_jobs(&jobs, json);
            }
            Ok(())
        }
        Command::Boot {
            socket,
            vm,
            backup,
            via,
            marker,
            timeout,
            console,
            quiet,
            qmp,
            qga,
        } => {
            // Before any thread starts: they inherit the blocked signals.
            // The boot's last line says what a signal did.
            let stop = Arc::new(AtomicBool::new(false));
            stop_on_signals_and_hangup(
                &stop,
                "",
                "QEMU is killed with this process; the VM stays recovered",
            )?;
            boot::boot_session(
                &client(&socket),
                boot::BootArgs {
                    vm,
                    backup,
                    via,
                    marker,
                    timeout: Duration::from_secs(timeout),
                    console,
                    quiet,
                    qmp,
                    qga,
                    stop,
                },
            )
        }
        Command::VerifyBoot {
            repo,
            vm,
            backup,
            marker,
            timeout,
            console,
        } => {
            // Before any thread starts: they inherit the blocked signals.
            let stop = Arc::new(AtomicBool::new(false));
            stop_on_signals_and_hangup(
                &stop,
                "stopping QEMU, unmounting and removing the scratch staging",
                "the scratch mount and staging in the temporary directory may be left",
            )?;
            boot::verify(crate::verify_boot::VerifyBootOptions {
                repo,
                vm,
                backup,
                marker,
                timeout: Duration::from_secs(timeout),
                console_log: console,
                stop,
            })
        }
        Command::Release {
            socket,
            vm,
            discard,
            backup,
        } => {
            crate::util::validate_name("VM name", &vm)?;
            let mut path = format!("/sessions/{vm}?discard={discard}");
            if let Some(b) = &backup {
                crate::util::validate_name("backup id", b)?;
                path.push_str(&format!("&backup={b}"));
            }
            let r = client(&socket).delete(&path)?;
            output::released(&r);
            Ok(())
        }
    }
}

pub(super) fn client(s: &SocketArg) -> Client {
    match &s.socket {
        Some(p) => Client::new(p),
        None => Client::via_default_link(&crate::daemon::default_socket_link()),
    }
}

/// `NAME=PATH` of `what`.
fn name_path(s: &str, what: &str) -> Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
        _ => Err(Error::invalid(format!(
            "{what} {s:?}: expected NAME=SOCKET"
        ))),
    }
}

/// The signal that set the flag of [`stop_on_signals`] (0: none yet).
static STOPPED_BY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// "SIGINT" or "SIGTERM": what stopped the command, for its last line.
pub(crate) fn stopped_by() -> &'static str {
    nix::sys::signal::Signal::try_from(STOPPED_BY.load(std::sync::atomic::Ordering::SeqCst))
        .map(|s| s.as_str())
        .unwrap_or("a signal")
}

/// SIGINT and SIGTERM go to one thread (blocked in every other thread,
/// which inherit this one's mask) that sets `stop`, so the command ends
/// through its cleanup (`then` says what it does; empty: the command's
/// own last line will, its cleanup being quick). A second signal exits
/// at once (`left` says what may stay).
pub(crate) fn stop_on_signals(stop: &Arc<AtomicBool>, then: &str, left: &str) -> Result<()> {
    use nix::sys::signal::Signal;
    stop_on(&[Signal::SIGINT, Signal::SIGTERM], stop, then, left)
}

/// [`stop_on_signals`], and SIGHUP too: the terminal of a command that
/// runs a VM (`boot`, `verify-boot`) was closed. Its default action would
/// end the process on the spot, skipping the cleanup.
pub(crate) fn stop_on_signals_and_hangup(
    stop: &Arc<AtomicBool>,
    then: &str,
    left: &str,
) -> Result<()> {
    use nix::sys::signal::Signal;
    stop_on(
        &[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP],
        stop,
        then,
        left,
    )
}

/// [`stop_on_signals`] for `signals`.
fn stop_on(
    signals: &[nix::sys::signal::Signal],
    stop: &Arc<AtomicBool>,
    then: &str,
    left: &str,
) -> Result<()> {
    use nix::sys::signal::SigSet;
    let mut set = SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    set.thread_block()
        .map_err(|e| Error::io("block signals", e.into()))?;
    let (stop, then, left) = (stop.clone(), then.to_string(), left.to_string());
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            STOPPED_BY.store(sig as i32, std::sync::atomic::Ordering::SeqCst);
            // The flag before the line: a write to a closed terminal
            // fails, but one to a paused one (Ctrl-S, an unread pipe)
            // blocks, and the stop must not wait for it.
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            if !then.is_empty() {
                tell!("{sig}: {then} (again: exit now)");
            }
        }
        if let Ok(sig) = set.wait() {
            tell!("{sig}: exiting; {left}");
            crate::repo::locks::release_all(Duration::from_secs(2));
            std::process::exit(130);
        }
    });
    Ok(())
}

/// For commands whose only cleanup is their repository locks (`gc`, and
/// `backup` of images or NBD exports, which may be blocked in a read
/// that no flag would interrupt): SIGINT or SIGTERM removes the locks
/// (after a manifest or a batch of deletes under way) and exits at once.
/// What the command wrote stays unreferenced until the next `gc`.
pub(crate) fn release_locks_on_signals(what: &'static str) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| Error::io("block signals", e.into()))?;
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            let n = crate::repo::locks::release_all(Duration::from_secs(10));
            tell!("{sig}: {what} stopped; {n} repository lock(s) removed");
            std::process::exit(130);
        }
    });
    Ok(())
}
