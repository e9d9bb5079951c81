//! `boot` and `verify-boot` output: live progress while a VM boots from
//! the mount, and a pass/fail verdict.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::client::Client;
use crate::boot::{boot, DiskSource, Outcome, QemuSpec, Watch};
use crate::error::{Error, Result};
use crate::util::human_bytes;
use crate::verify_boot::{verify_boot, VerifyBootOptions};

/// Sums per-disk status figures into one progress line.
fn progress_line(status: &Value, elapsed: Duration) -> String {
    let disks = status["disks"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| {
        disks
            .iter()
            .map(|d| d[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let staged = sum("blocks_staged") as f64 * 100.0 / sum("blocks_total").max(1) as f64;
    format!(
        "[{:6.1}s] staged {:5.1}%  fetched {:>10}  changed blocks {}  reads {}",
        elapsed.as_secs_f64(),
        staged,
        human_bytes(sum("fetched_bytes")),
        sum("blocks_changed"),
        sum("reads")
    )
}

/// How QEMU reaches the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The FUSE mount's files.
    Fuse,
    /// The daemon's NFS export (`serve --nfs`).
    Nfs,
    /// The daemon's NBD export (`serve --nbd`), with reconnect: a daemon
    /// restart is invisible to the guest.
    Nbd,
}

/// Each disk's source for `via`, from the recover reply.
fn sources(info: &Value, via: Via) -> Result<Vec<DiskSource>> {
    let disks: Vec<PathBuf> = info["disks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(PathBuf::from))
                .collect()
        })
        .unwrap_or_default();
    if via == Via::Fuse {
        return Ok(disks.into_iter().map(DiskSource::File).collect());
    }
    let scheme = if via == Via::Nfs { "nfs://" } else { "nbd" };
    (0..disks.len())
        .map(|i| {
            let url = info["urls"][i]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str())
                .find(|u| u.starts_with(scheme))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "the daemon serves no {} export: start `serve` with --{}",
                        if via == Via::Nfs { "NFS" } else { "NBD" },
                        if via == Via::Nfs {
                            "nfs ADDR"
                        } else {
                            "nbd ADDR"
                        }
                    ))
                })?;
            match via {
                Via::Nfs => Ok(DiskSource::Nfs(url.to_string())),
                _ => DiskSource::nbd(url),
            }
        })
        .collect()
}

/// A boot refused before QEMU started ends the session it recovered
/// itself (a new one discarded: no guest ran on it; resumed kept staging
/// kept), so a refusal leaves nothing served behind; `e` says what it did.
fn undo_recover(client: &Client, vm: &str, info: &Value, e: Error) -> Error {
    if info["already_active"].as_bool() != Some(false) {
        return e;
    }
    let discard = info["resumed"].as_bool() == Some(false);
    let path = match discard {
        true => format!("/sessions/{vm}?discard=true"),
        false => format!("/sessions/{vm}"),
    };
    match client.delete(&path) {
        Ok(_) if discard => e.context(format!(
            "VM {vm} was not booted (its new recovery was discarded)"
        )),
        Ok(_) => e.context(format!(
            "VM {vm} was not booted (its resumed staging was released, kept)"
        )),
        Err(u) => e.context(format!(
            "VM {vm} was not booted, and stays recovered ({u}); `recoverfs release {vm}` ends it"
        )),
    }
}

/// What `boot` was asked (see `cli::args`).
pub struct BootArgs {
    pub vm: String,
    /// Recover this backup if the VM is not served yet.
    pub backup: Option<String>,
    pub via: Via,
    pub marker: Option<String>,
    pub timeout: Duration,
    pub console: Option<PathBuf>,
    pub quiet: bool,
    pub qmp: Option<PathBuf>,
    pub qga: Option<PathBuf>,
    /// Set by SIGINT, SIGTERM or SIGHUP: QEMU is stopped as at the
    /// timeout, and the boot fails saying so.
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub fn boot_session(client: &Client, a: BootArgs) -> Result<()> {
    let BootArgs {
        vm,
        backup,
        via,
        marker,
        timeout,
        console,
        quiet,
        qmp,
        qga,
        stop,
    } = a;
    let vm = vm.as_str();
    crate::util::validate_name("VM name", vm)?;
    if let Some(b) = &backup {
        crate::util::validate_name("backup id", b)?;
    }
    if let Some(p) = &qmp {
        crate::boot::check_qmp_path(p)?;
    }
    if let Some(p) = &qga {
        crate::boot::check_socket_path(p, "--qga", "guest agent")?;
    }
    // Recover is idempotent: it returns the running session's disks (a
    // session of another backup than `--backup` is refused, naming it).
    let info = client.post("/sessions", &json!({"vm": vm, "backup": backup}))?;
    let config_path = info["config"]
        .as_str()
        .map(PathBuf::from)
        .unwrap_or_default();
    let config: Value = std::fs::read(&config_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let heartbeat = marker.is_none();
    let marker = marker
        .or_else(|| {
            config
                .get("verify_marker")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "login:".into());
    let spec = sources(&info, via).and_then(|s| QemuSpec::from_config(&config, s));
    let mut spec = match spec {
        Ok(s) => s,
        Err(e) => return Err(undo_recover(client, vm, &info, e)),
    };
    spec.qmp = qmp;
    spec.qga = qga;
    let watch = Watch {
        marker: marker.clone(),
        timeout,
        settle: Duration::from_secs(60),
        heartbeat,
    };
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let path = format!("/sessions/{vm}");
    let report = boot(
        &spec,
        &watch,
        console.as_deref(),
        |line| {
            if !quiet {
                // Keep the progress line below the console output.
                tell_part!("{}", if tty { "\r\x1b[2K" } else { "" });
                say!("  | {line}");
            }
        },
        |elapsed| {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Some(format!("stopped by {}", super::stopped_by()));
            }
            // Nobody reads the console any more (`boot | head -1`, a
            // closed terminal): the VM is stopped as at the timeout.
            if super::say::gone(super::say::To::Out) {
                return Some("the console's reader (standard output) went away".into());
            }
            if let Ok(st) = client.get(&path) {
                if tty {
                    tell_part!("\r\x1b[2K{}", progress_line(&st, elapsed));
                    let _ = std::io::stderr().flush();
                } else if last_print.elapsed() >= Duration::from_secs(2) {
                    tell!("{}", progress_line(&st, elapsed));
                    last_print = Instant::now();
                }
            }
            None
        },
    )?;
    if tty {
        tell!();
    }
    // QEMU is stopped and reaped; the recovery is the daemon's and stays.
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::interrupted(format!(
            "{}: the boot of VM {vm} was stopped: QEMU was killed, as at --timeout; the VM \
             stays recovered (`recoverfs release {vm}` ends it)",
            super::stopped_by()
        )));
    }
    // Its console could not be written: QEMU was stopped, and the command
    // fails with the write's error (EPIPE of a pipe nobody reads ends it
    // as SIGPIPE would: `end_quietly_when_stdout_closes`).
    if let Some(e) = super::say::failure(super::say::To::Out) {
        return Err(Error::io(
            format!(
                "the boot of VM {vm} was stopped (QEMU was killed; the VM stays recovered): \
                 write its console to standard output"
            ),
            e,
        ));
    }
    let st = client.get(&path)?;
    let disks = st["disks"].as_array().cloned().unwrap_or_default();
    let fetched: u64 = disks
        .iter()
        .map(|d| d["fetched_bytes"].as_u64().unwrap_or(0))
        .sum();
    let size: u64 = disks.iter().map(|d| d["size"].as_u64().unwrap_or(0)).sum();
    match report.outcome {
        Outcome::Marker { line, after } => {
            say!(
                "marker reached after {:.1} s: {}",
                after.as_secs_f64(),
                line.trim()
            );
            say!(
                "fetched {} of {} disk ({:.1}%); {}",
                human_bytes(fetched),
                human_bytes(size),
                fetched as f64 * 100.0 / size.max(1) as f64,
                if report.clean_exit {
                    "the VM powered off cleanly"
                } else {
                    "the VM was stopped"
                }
            );
            Ok(())
        }
        Outcome::Heartbeat { os, after } => {
            say!(
                "guest agent answered after {:.1} s: {os}",
                after.as_secs_f64()
            );
            say!(
                "fetched {} of {} disk ({:.1}%); the VM was stopped",
                human_bytes(fetched),
                human_bytes(size),
                fetched as f64 * 100.0 / size.max(1) as f64,
            );
            Ok(())
        }
        other => Err(Error::new(
            crate::error::ErrorKind::Io,
            format!("VM {vm} did not reach {marker:?}: {}", describe(&other)),
        )),
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Marker { after, .. } => format!("booted in {:.1} s", after.as_secs_f64()),
        Outcome::Heartbeat { os, after } => format!(
            "booted in {:.1} s (the guest agent answered: {os})",
            after.as_secs_f64()
        ),
        Outcome::Exited(st) => format!("QEMU exited first ({st})"),
        Outcome::Timeout => "timed out".into(),
        Outcome::Aborted(why) => why.clone(),
    }
}

pub fn verify(opts: VerifyBootOptions) -> Result<()> {
    let r = verify_boot(opts)?;
    let fetched = format!(
        "fetched {} of {}",
        human_bytes(r.fetched_bytes),
        human_bytes(r.disk_bytes)
    );
    if r.passed() {
        say!(
            "PASS: VM {} backup {} {} ({fetched})",
            r.vm,
            r.backup,
            describe(&r.outcome)
        );
        return Ok(());
    }
    say!("console (last lines):");
    for l in &r.console_tail {
        say!("  | {l}");
    }
    say!(
        "FAIL: VM {} backup {}: {} ({fetched})",
        r.vm,
        r.backup,
        describe(&r.outcome)
    );
    Err(Error::new(
        crate::error::ErrorKind::Corrupt,
        format!(
            "backup {} of VM {} did not boot to {:?}",
            r.backup, r.vm, r.marker
        ),
    ))
}
