//! `recoverfs verify-boot`: prove a backup boots. A throwaway recovery on
//! a temporary staging directory and mount, a network-less QEMU boot, a
//! console marker or a timeout, then everything it created is removed.

use std::path::PathBuf;
use std::time::Duration;

use crate::boot::{boot, Outcome, QemuSpec, Watch};
use crate::daemon::{check_mount_point, MountOptions, MountedDatastore};
use crate::error::{Error, IoContext, Result};
use crate::repo::Repository;
use crate::staging::StagingDir;

pub struct VerifyBootOptions {
    pub repo: String,
    pub vm: String,
    pub backup: Option<String>,
    /// Console text that proves the boot; default: the VM config's
    /// `verify_marker`, else `login:`.
    pub marker: Option<String>,
    pub timeout: Duration,
    pub console_log: Option<PathBuf>,
    /// Set (by a signal) to end the boot early, through the cleanup.
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub struct VerifyBootReport {
    pub vm: String,
    pub backup: String,
    pub marker: String,
    pub outcome: Outcome,
    pub console_tail: Vec<String>,
    pub fetched_bytes: u64,
    pub disk_bytes: u64,
}

impl VerifyBootReport {
    pub fn passed(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Marker { .. } | Outcome::Heartbeat { .. }
        )
    }
}

/// How long the scratch recovery waits for QEMU's disk handles to close.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Removes the scratch directory even when verification fails midway.
struct Scratch(tempfile::TempDir);

pub fn verify_boot(opts: VerifyBootOptions) -> Result<VerifyBootReport> {
    crate::util::validate_name("VM name", &opts.vm)?;
    let repo = Repository::open(&opts.repo)?;
    let manifest = repo.resolve(&opts.vm, opts.backup.as_deref())?;
    let marker = opts
        .marker
        .clone()
        .or_else(|| {
            manifest
                .config
                .get("verify_marker")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "login:".into());
    // What killed runs left (their QEMU died with them): a dead mount,
    // its staging, the boot's socket directory.
    crate::boot::remove_stale_scratch(&std::env::temp_dir());
    let scratch = Scratch(crate::boot::scratch_dir("verify")?);
    let mnt = scratch.0.path().join("mnt");
    std::fs::create_dir(&mnt).ctx(|| format!("create {}", mnt.display()))?;
    let mnt = check_mount_point(&mnt)?;
    let staging = StagingDir::open(
        &scratch.0.path().join("staging"),
        repo.id(),
        &repo.location(),
    )?;
    let mounted = MountedDatastore::start(
        repo.clone(),
        crate::staging::StagingSet::single(staging),
        &mnt,
        &MountOptions {
            throwaway: true,
            ..MountOptions::default()
        },
    )?;
    let result = run(&mounted, &opts, &manifest.id, &marker);
    // QEMU has exited; its disk handles close in the background.
    let released = match result {
        // Never recovered: nothing to release.
        Err(_) if mounted.ds.session(&opts.vm).is_none() => Ok(String::new()),
        _ => mounted.ds.release_when_closed(&opts.vm, true, RELEASE_WAIT),
    };
    let stopped = mounted.shutdown();
    drop(scratch);
    let report = result?;
    released.map_err(|e| {
        e.context(format!(
            "verify-boot could not release its scratch recovery of VM {} (its pin under \
             pins/{}/ in the repository may be left, keeping backup {} from gc)",
            opts.vm, opts.vm, manifest.id
        ))
    })?;
    stopped?;
    Ok(report)
}

fn run(
    mounted: &MountedDatastore,
    opts: &VerifyBootOptions,
    backup: &str,
    marker: &str,
) -> Result<VerifyBootReport> {
    let info = mounted.ds.recover(&opts.vm, Some(backup))?;
    let session = mounted
        .ds
        .session(&opts.vm)
        .ok_or_else(|| Error::not_found("session vanished"))?;
    let config: serde_json::Value =
        serde_json::from_slice(&session.config_json).unwrap_or_default();
    let spec = QemuSpec::from_config(
        &config,
        info.disks
            .iter()
            .cloned()
            .map(crate::boot::DiskSource::File)
            .collect(),
    )?;
    let watch = Watch {
        marker: marker.to_string(),
        timeout: opts.timeout,
        settle: Duration::from_secs(10),
        // An explicit --marker is what the user asked for; otherwise the
        // guest agent answering proves the boot as well.
        heartbeat: opts.marker.is_none(),
    };
    let report = boot(
        &spec,
        &watch,
        opts.console_log.as_deref(),
        |_| {},
        |_| {
            if opts.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Some("interrupted (SIGINT/SIGTERM/SIGHUP)".to_string());
            }
            // A damaged chunk means the backup cannot be trusted: stop at once.
            session
                .disks
                .iter()
                .find_map(|d| d.stats.last_fetch_error.lock().clone())
                .map(|e| format!("the boot read a damaged chunk: {e}"))
        },
    )?;
    // A verified boot prepares the next instant recovery: its reads
    // become a recording of the VM's profile. A failed one must not.
    if matches!(
        report.outcome,
        Outcome::Marker { .. } | Outcome::Heartbeat { .. }
    ) {
        // An optimisation: a repository that takes no profile (read-only
        // credentials, full) does not make a good boot fail.
        if let Err(e) = session.save_profile(mounted.ds.repo(), "verify-boot") {
            tracing::warn!(vm = %opts.vm, "the boot's profile was not stored: {e}");
        }
    } else {
        session.discard_profile();
    }
    let statuses: Vec<_> = session.disks.iter().map(|d| d.status()).collect();
    Ok(VerifyBootReport {
        vm: opts.vm.clone(),
        backup: backup.to_string(),
        marker: marker.to_string(),
        outcome: report.outcome,
        console_tail: report.console_tail,
        fetched_bytes: statuses.iter().map(|s| s.fetched_bytes).sum(),
        disk_bytes: statuses.iter().map(|s| s.size).sum(),
    })
}
