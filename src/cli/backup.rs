//! The backup commands: `backup` (image files, block devices or NBD
//! exports; or `--session VM` through the daemon) and `backup-vms`
//! (running QEMU VMs from one snapshot time).

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{output, SocketArg};
use crate::api::client::Client;
use crate::error::{Error, Result};
use crate::repo::chunk::validate_chunk_size;
use crate::repo::writer::{run_backup, BackupRequest};
use crate::repo::Repository;
use crate::util::{human_bytes, parse_size};
use crate::vmbackup::read::{backup_exports, Export};

/// `backup --session VM`: the daemon backs the session up. SIGINT,
/// SIGTERM or SIGHUP cancels it: the daemon stops at its next chunk and
/// publishes nothing once it sees the connection end.
pub(super) fn backup_session(socket: &SocketArg, vm: &str, json: bool) -> Result<()> {
    crate::util::validate_name("VM name", vm)?;
    let client = super::client(socket);
    let conn = Arc::new(Cancel::default());
    cancel_on_signals(&conn)?;
    // A cancel that comes too late shows as a new base.
    let before = session_state(&client, vm).ok().and_then(|(_, b)| b);
    let r = client.backup_session_with(vm, |s| conn.connected(s));
    if conn.stop.load(Ordering::SeqCst) {
        match &r {
            // Published before the daemon saw the cancel: said as it is.
            Ok(_) => _ = tell!("the live backup was published before the daemon saw the cancel"),
            // The daemon's own answer (a failure after the manifest, say)
            // is said as it is (review27 M2); only no answer is the cancel.
            Err(e) if !Client::unanswered(e) => {}
            Err(_) => return cancelled(&client, vm, before),
        }
    }
    let r = r?;
    if json {
        say!("{}", serde_json::to_string_pretty(&r).expect("json"));
        return Ok(());
    }
    output::session_backup(&r);
    Ok(())
}

/// The connection of a cancellable `backup --session`, and whether a
/// signal asked to cancel it.
#[derive(Default)]
struct Cancel {
    stop: AtomicBool,
    conn: Mutex<Option<UnixStream>>,
}

impl Cancel {
    /// The request is sent: a cancel that came first ends it now.
    fn connected(&self, s: UnixStream) {
        let mut c = self.conn.lock().expect("connection lock");
        if self.stop.load(Ordering::SeqCst) {
            let _ = s.shutdown(Shutdown::Write);
        }
        *c = Some(s);
    }

    /// Tells the daemon the client is gone: it reads the end of the
    /// request stream, cancels the backup and closes the connection.
    fn cancel(&self) {
        let c = self.conn.lock().expect("connection lock");
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = &*c {
            let _ = s.shutdown(Shutdown::Write);
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP go to one thread (blocked in this one):
/// the first cancels the backup, a second exits at once.
fn cancel_on_signals(c: &Arc<Cancel>) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| Error::io("block signals", e.into()))?;
    let c = c.clone();
    std::thread::spawn(move || {
        // The cancel before its line: a SIGHUP's terminal may be gone.
        if let Ok(sig) = set.wait() {
            c.cancel();
            tell!("{sig}: cancelling the live backup… (again: exit now)");
        }
        if let Ok(sig) = set.wait() {
            tell!("{sig}: exiting; the daemon cancels the backup when it sees the connection end");
            std::process::exit(130);
        }
    });
    Ok(())
}

/// Whether a live backup of the session runs, and its base.
fn session_state(client: &Client, vm: &str) -> Result<(bool, Option<String>)> {
    let s = client.get(&format!("/sessions/{vm}"))?;
    let base = s["backup_base"].as_str().map(str::to_string);
    Ok((s["backup_running"].as_bool() == Some(true), base))
}

/// After a cancel, once the daemon closed the connection: waits (a while)
/// for its status to show the backup ended, and says what happened: an
/// error, or the new id if the backup was published before the cancel
/// reached the daemon (its base changed from `before`).
fn cancelled(client: &Client, vm: &str, before: Option<String>) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match session_state(client, vm) {
            Ok((false, Some(now))) if before.as_ref().is_some_and(|b| *b != now) => {
                tell!("the cancel came too late: the live backup was published as {now}");
                say!("{now}");
                return Ok(());
            }
            // The base before the request was not read: whether a late
            // cancel let it publish cannot be told (review27 L2).
            Ok((false, _)) if before.is_none() => {
                return Err(Error::interrupted(format!(
                    "live backup of VM {vm} cancelled; whether it was published before the \
                     daemon saw the cancel is not known: see `recoverfs list --repo …`"
                )))
            }
            Ok((false, _)) => {
                return Err(Error::interrupted(format!(
                    "live backup of VM {vm} cancelled: nothing was published"
                )))
            }
            Err(e) => {
                return Err(Error::interrupted(format!(
                    "live backup of VM {vm} cancelled; its status could not be read ({e})"
                )))
            }
            Ok((true, _)) if std::time::Instant::now() >= deadline => {
                return Err(Error::interrupted(format!(
                    "live backup of VM {vm} cancelled, but the daemon still shows it running after 30 s: check `recoverfs status` and its log"
                )))
            }
            Ok((true, _)) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

pub(super) fn backup(
    repo: &str,
    vm: String,
    config: Option<PathBuf>,
    chunk_size: &str,
    images: Vec<PathBuf>,
) -> Result<()> {
    crate::util::validate_name("VM name", &vm)?;
    let chunk_size = validate_chunk_size(parse_size(chunk_size)?)?;
    let config = match config {
        Some(p) => {
            let bytes =
                std::fs::read(&p).map_err(|e| Error::io(format!("config {}", p.display()), e))?;
            Some(serde_json::from_slice(&bytes).map_err(|e| {
                Error::invalid(format!("config {} is not valid JSON: {e}", p.display()))
            })?)
        }
        None => None,
    };
    if let Some(c) = &config {
        crate::repo::writer::check_config(c)?;
    }
    let urls: Vec<&str> = images.iter().filter_map(|p| p.to_str()).collect();
    let nbd = urls.iter().filter(|u| Export::is_url(u)).count();
    if nbd > 0 && nbd != images.len() {
        return Err(Error::invalid(
            "give either image files or NBD URLs, not both",
        ));
    }
    let exports = urls
        .iter()
        .filter(|u| Export::is_url(u))
        .map(|u| Export::parse(u))
        .collect::<Result<Vec<_>>>()?;
    // Check the images before creating anything.
    if exports.is_empty() {
        for img in &images {
            crate::repo::writer::image_size(img)?;
        }
        warn_images_on_recoverfs(&images);
    }
    // Before any thread starts: they inherit the blocked signals.
    super::release_locks_on_signals("backup")?;
    let (r, created) = Repository::open_or_create(repo)?;
    if created {
        eprintln!("created repository {}", r.location());
    }
    if !exports.is_empty() {
        let (m, reads) = backup_exports(&r, &vm, config, &exports, chunk_size)?;
        for (e, rd) in exports.iter().zip(&reads) {
            eprintln!(
                "{} (NBD export {:?}): {} read in {} chunks: {} new ({} stored), {} zero",
                rd.disk.name,
                e.name,
                human_bytes(rd.read_bytes),
                rd.chunks_read,
                rd.new_chunks,
                human_bytes(rd.disk.new_bytes),
                rd.zero_chunks
            );
        }
        eprintln!(
            "backup {} of VM {}: {} new bytes",
            m.id,
            m.vm,
            m.new_bytes()
        );
        println!("{}", m.id);
        return Ok(());
    }
    let report = run_backup(
        &r,
        BackupRequest {
            vm,
            config,
            chunk_size,
            images,
            progress: true,
        },
    )?;
    for d in &report.disks {
        eprintln!(
            "{}: {} in {} chunks: {} new ({} stored), {} reused, {} zero; {} read",
            d.name,
            human_bytes(d.size),
            d.chunks,
            d.new_chunks,
            human_bytes(d.new_bytes),
            d.chunks - d.new_chunks - d.zero_chunks,
            d.zero_chunks,
            human_bytes(d.read_bytes)
        );
    }
    eprintln!(
        "backup {} of VM {}: {} new bytes",
        report.manifest.id,
        report.manifest.vm,
        report.manifest.new_bytes()
    );
    println!("{}", report.manifest.id);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backup_vms(
    repo: &str,
    vms: &[String],
    (agents, new_identity): (&[String], &[String]),
    jobs: usize,
    chunk_size: &str,
    rate_window: f64,
    (incremental, order): (bool, crate::vmbackup::ReadOrder),
    json: bool,
) -> Result<()> {
    use crate::vmbackup::{backup_vms_until, Options, VmSpec};
    let chunk_size = validate_chunk_size(parse_size(chunk_size)?)?;
    let mut specs = vms
        .iter()
        .map(|v| {
            super::name_path(v, "--vm").map(|(name, qmp)| VmSpec {
                new_identity: new_identity.contains(&name),
                name,
                qmp,
                agent: None,
                base: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for a in agents {
        let (name, path) = super::name_path(a, "--agent")?;
        let spec = specs
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::invalid(format!("--agent {a:?}: no --vm {name}=...")))?;
        spec.agent = Some(path);
    }
    if let Some(n) = new_identity
        .iter()
        .find(|n| !specs.iter().any(|s| &s.name == *n))
    {
        return Err(Error::invalid(format!(
            "--new-identity {n}: no --vm {n}=..."
        )));
    }
    if !(0.0..=60.0).contains(&rate_window) {
        return Err(Error::invalid("--rate-window: 0 to 60 seconds"));
    }
    let opts = Options {
        vms: specs,
        jobs,
        chunk_size,
        rate_window: Duration::from_secs_f64(rate_window),
        agent_timeout: crate::qemu::guest_agent::SYNC_TIMEOUT,
        incremental,
        order,
        hook: None,
    };
    // Before any thread starts: they inherit the blocked signals.
    let stop = Arc::new(AtomicBool::new(false));
    // The run resumes and thaws every VM and closes its views before it
    // ends; the next run removes what a run exited at once left in QEMU.
    super::stop_on_signals(
        &stop,
        "resuming and thawing the VMs, closing their views",
        "VMs may be left paused or frozen",
    )?;
    let (r, created) = Repository::open_or_create(repo)?;
    if created {
        eprintln!("created repository {}", r.location());
    }
    let summary = backup_vms_until(&r, &opts, &stop)?;
    output::backup_vms(&summary, json);
    let failed = summary.failed();
    if failed.is_empty() {
        return Ok(());
    }
    let each: Vec<String> = failed
        .iter()
        .map(|v| format!("{}: {}", v.vm, v.error.as_deref().unwrap_or("?")))
        .collect();
    Err(Error::invalid(format!(
        "{} of {} VMs failed: {}",
        failed.len(),
        summary.vms.len(),
        each.join("; ")
    )))
}

/// A disk file of a recoverfs mount (a VM being recovered) is read like
/// any image, but the change check does not see what its guest writes
/// meanwhile through NBD or NFS (explore4 L4): said, with what to use.
fn warn_images_on_recoverfs(images: &[std::path::PathBuf]) {
    let mounts = crate::util::mountinfo::current();
    for img in images {
        let Ok(abs) = std::fs::canonicalize(img) else {
            continue;
        };
        if mounts
            .iter()
            .any(|m| m.is_recoverfs() && abs.starts_with(&m.point))
        {
            eprintln!(
                "warning: {} is a disk of a VM recoverfs serves: writes its guest makes while it is read are not caught; for a running VM use `recoverfs backup --session VM`",
                img.display()
            );
        }
    }
}
