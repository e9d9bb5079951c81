//! Booting a recovered VM under QEMU and watching its serial console for a
//! marker line. Shared by `recoverfs boot` (live progress for an operator)
//! and `recoverfs verify-boot` (a throwaway, SureBackup-style check).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, RecvTimeoutError};

use crate::error::{Error, IoContext, Result};

/// Where QEMU finds one disk.
#[derive(Debug, Clone, PartialEq)]
pub enum DiskSource {
    /// A file: the FUSE mount, or a plain image.
    File(PathBuf),
    /// An `nfs://HOST/VM/diskN.raw` URL (QEMU's libnfs driver).
    Nfs(String),
    /// An NBD export, attached with `reconnect-delay` so a daemon restart
    /// is invisible to the guest.
    Nbd { server: NbdServer, export: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum NbdServer {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl DiskSource {
    /// Parses an `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` URL.
    pub fn nbd(url: &str) -> Result<DiskSource> {
        let bad = || Error::invalid(format!("not an NBD URL recoverfs serves: {url}"));
        if let Some(rest) = url.strip_prefix("nbd+unix:///") {
            let (export, q) = rest.split_once("?socket=").ok_or_else(bad)?;
            return Ok(DiskSource::Nbd {
                server: NbdServer::Unix(PathBuf::from(q)),
                export: export.to_string(),
            });
        }
        let rest = url.strip_prefix("nbd://").ok_or_else(bad)?;
        let (hostport, export) = rest.split_once('/').ok_or_else(bad)?;
        // `[IPv6]` or a name/IPv4, then `:PORT` or nothing: the NBD URI
        // standard's default port, as nbdinfo and nbdcopy take it.
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => v6.split_once(']').ok_or_else(bad)?,
            None => hostport.split_at(hostport.find(':').unwrap_or(hostport.len())),
        };
        if host.is_empty() {
            return Err(bad());
        }
        let port = match port {
            "" => crate::placement::NBD_PORT,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
        };
        Ok(DiskSource::Nbd {
            server: NbdServer::Tcp {
                host: host.to_string(),
                port,
            },
            export: export.to_string(),
        })
    }

    /// QEMU arguments attaching this disk as virtio disk number `i`, as
    /// before backups recorded buses: a VM whose disks are all virtio gets
    /// the same command line, so the same PCI layout, as it always did.
    fn args(&self, i: usize) -> Vec<String> {
        // A comma inside a QEMU option value is written twice.
        let q = |s: &str| s.replace(',', ",,");
        match self {
            DiskSource::File(p) => vec![
                "-drive".into(),
                format!("file={},format=raw,if=virtio", q(&p.to_string_lossy())),
            ],
            DiskSource::Nfs(url) => vec![
                "-drive".into(),
                format!("file={},format=raw,if=virtio", q(url)),
            ],
            DiskSource::Nbd { .. } => {
                let mut a = self.backend(i);
                a.extend(["-device".into(), format!("virtio-blk-pci,drive=rfs{i}")]);
                a
            }
        }
    }

    /// QEMU arguments giving this disk's block backend the name `rfs{i}`,
    /// for a `-device` to attach (`DiskBus::device`).
    fn backend(&self, i: usize) -> Vec<String> {
        let q = |s: &str| s.replace(',', ",,");
        match self {
            DiskSource::File(p) => vec![
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=rfs{i}",
                    q(&p.to_string_lossy())
                ),
            ],
            DiskSource::Nfs(url) => vec![
                "-drive".into(),
                format!("file={},format=raw,if=none,id=rfs{i}", q(url)),
            ],
            DiskSource::Nbd { server, export } => {
                let server = match server {
                    NbdServer::Tcp { host, port } => {
                        format!(
                            "server.type=inet,server.host={},server.port={port}",
                            q(host)
                        )
                    }
                    NbdServer::Unix(p) => {
                        format!("server.type=unix,server.path={}", q(&p.to_string_lossy()))
                    }
                };
                vec![
                    "-blockdev".into(),
                    format!(
                        "driver=nbd,node-name=rfs{i},{server},export={},reconnect-delay=60",
                        q(export)
                    ),
                ]
            }
        }
    }
}

pub struct QemuSpec {
    pub disks: Vec<DiskSource>,
    /// Each disk's bus, by index (one missing: virtio).
    pub buses: Vec<DiskBus>,
    /// Each SCSI disk's controller model ([`scsi_controller`]), by index
    /// (one missing: [`VIRTIO_SCSI`]).
    pub scsi: Vec<&'static str>,
    /// Each disk's serial ([`disk_serial`]), by index (one missing: none).
    pub serials: Vec<Option<String>>,
    pub memory_mib: u64,
    /// Extra arguments appended verbatim.
    pub extra: Vec<String>,
    /// A QMP monitor on this Unix socket (`boot --qmp`), for backups of
    /// the running VM and for operators.
    pub qmp: Option<PathBuf>,
    /// The guest agent's socket (`boot --qga`); a scratch one otherwise.
    /// Every VM gets a virtio-serial guest-agent channel and a
    /// virtio-scsi controller, so the agent container can be attached to
    /// it later (`agent-backup`).
    pub qga: Option<PathBuf>,
    /// The VM's own UUID (`-uuid`, the guest's SMBIOS system UUID), as
    /// `backup-vms` recorded it: a guest that keys on it (cloud-init's
    /// instance id, licences) sees the same machine after a recovery, and
    /// the next `backup-vms` of it finds the same identity.
    pub uuid: Option<String>,
}

impl QemuSpec {
    /// Memory from the VM config's `memory_mib`, 512 MiB otherwise. The
    /// config comes from a backup, so it is bounded before QEMU sees it: at
    /// least 16 MiB, at most the host's memory.
    pub fn from_config(config: &serde_json::Value, disks: Vec<DiskSource>) -> Result<QemuSpec> {
        let memory_mib = match config.get("memory_mib") {
            None | Some(serde_json::Value::Null) => 512,
            Some(m) => {
                let max = host_memory_mib().min(crate::repo::limits::MAX_MEMORY_MIB);
                crate::repo::limits::memory_mib_within(m, max).ok_or_else(|| {
                    Error::invalid(format!(
                        "the VM configuration asks for memory_mib {m}; it must be a whole number from {} to {max} (this host's memory)",
                        crate::repo::limits::MIN_MEMORY_MIB
                    ))
                })?
            }
        };
        let uuid = config["backup_vms"]["qemu"]["uuid"]
            .as_str()
            .map(|u| {
                is_uuid(u).then(|| u.to_string()).ok_or_else(|| {
                    Error::invalid(format!(
                        "the VM configuration's QEMU uuid {u:?} is not a UUID"
                    ))
                })
            })
            .transpose()?;
        let buses: Vec<DiskBus> = (0..disks.len())
            .map(|i| DiskBus::from_config(&config["disks"][i], i))
            .collect();
        let scsi = (0..disks.len())
            .map(|i| match buses[i] {
                DiskBus::Scsi => scsi_controller(&config["disks"][i], i),
                _ => VIRTIO_SCSI,
            })
            .collect();
        let serials = (0..disks.len())
            .map(|i| disk_serial(&config["disks"][i], i))
            .collect();
        let ide = buses.iter().filter(|b| **b == DiskBus::Ide).count();
        if ide > MAX_IDE_DISKS {
            return Err(Error::invalid(format!(
                "the VM configuration puts {ide} disks on bus ide; QEMU's pc machine has {MAX_IDE_DISKS} IDE places"
            )));
        }
        Ok(QemuSpec {
            disks,
            buses,
            scsi,
            serials,
            memory_mib,
            extra: vec![],
            qmp: None,
            qga: None,
            uuid,
        })
    }

    /// The guest has no network: a verification boot must not reach
    /// production services. QEMU gets a cleared environment (no repository
    /// credentials) and its seccomp sandbox.
    pub(crate) fn command(&self, qga: &Path) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.env_clear().env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        c.args([
            "-nographic",
            "-no-reboot",
            "-sandbox",
            "on",
            "-nic",
            "none",
            "-m",
            &self.memory_mib.to_string(),
        ]);
        // QEMU's default accelerator (TCG) is used: a /dev/kvm node does not
        // mean KVM works. RECOVERFS_QEMU_ARGS adds e.g. `-accel kvm`.
        if let Ok(extra) = std::env::var("RECOVERFS_QEMU_ARGS") {
            c.args(extra.split_whitespace());
        }
        if let Some(u) = &self.uuid {
            c.args(["-uuid", u]);
        }
        // All virtio without serials (every backup from before buses were
        // recorded): the command line as it always was. Otherwise each
        // disk is a backend and a device on its bus, every one with its
        // place in the boot order (disk 0 first, whatever the buses) and
        // its serial; SCSI disks go on their controllers below, once
        // those exist.
        let bus = |i: usize| self.buses.get(i).copied().unwrap_or(DiskBus::Virtio);
        let serial = |i: usize| self.serials.get(i).and_then(|s| s.as_deref());
        let legacy =
            (0..self.disks.len()).all(|i| bus(i) == DiskBus::Virtio && serial(i).is_none());
        let mut scsi = vec![];
        // Controllers of other models than virtio-scsi: (model, id, disks).
        let mut controllers: Vec<(&str, String, usize)> = vec![];
        let mut on_bus = std::collections::HashMap::new();
        for (i, d) in self.disks.iter().enumerate() {
            if legacy {
                c.args(d.args(i));
                continue;
            }
            c.args(d.backend(i));
            let b = bus(i);
            let k = on_bus.entry(b).or_insert(0usize);
            let model = self.scsi.get(i).copied().unwrap_or(VIRTIO_SCSI);
            let scsi_bus = match b {
                DiskBus::Scsi if model != VIRTIO_SCSI => {
                    let free = (controllers.iter_mut())
                        .find(|(m, _, n)| *m == model && *n < devices::scsi_capacity(model));
                    let (_, id, n) = match free {
                        Some(c) => c,
                        None => {
                            let id = format!("rfs-scsi{}", controllers.len() + 1);
                            controllers.push((model, id, 0));
                            controllers.last_mut().expect("pushed")
                        }
                    };
                    *n += 1;
                    format!("{id}.0")
                }
                _ => "rfs-scsi0.0".to_string(),
            };
            let device = b.device(i, *k, &scsi_bus, serial(i));
            *k += 1;
            match b {
                DiskBus::Scsi => scsi.push(device),
                _ => {
                    c.args(["-device", &device]);
                }
            }
        }
        if let Some(p) = &self.qmp {
            // A comma inside a QEMU option value is written twice.
            let p = p.to_string_lossy().replace(',', ",,");
            c.args(["-qmp", &format!("unix:{p},server=on,wait=off")]);
        }
        let qga = qga.to_string_lossy().replace(',', ",,");
        // The VM's own SCSI controllers first: QEMU puts a `device_add
        // scsi-hd` without a bus (the agent container's) on the newest,
        // which stays `rfs-scsi0`.
        for (model, id, _) in &controllers {
            c.args(["-device", &format!("{model},id={id}")]);
        }
        c.args(["-device", "virtio-scsi-pci,id=rfs-scsi0"]);
        for d in &scsi {
            c.args(["-device", d]);
        }
        c.args(["-device", "virtio-serial-pci,id=rfs-serial0"])
            .args([
                "-chardev",
                &format!("socket,path={qga},server=on,wait=off,id=rfs-qga0"),
            ])
            .args([
                "-device",
                "virtserialport,bus=rfs-serial0.0,chardev=rfs-qga0,name=org.qemu.guest_agent.0",
            ]);
        c.args(&self.extra);
        c
    }
}

/// `8-4-4-4-12` hexadecimal digits, as QEMU's `-uuid` takes (the config
/// comes from a backup: nothing else reaches QEMU's command line).
fn is_uuid(u: &str) -> bool {
    let groups: Vec<&str> = u.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Checks a `--qmp` socket path before QEMU binds it. QEMU removes
/// whatever is at the path first, so anything but a stale socket is
/// refused: a regular file is not ours to delete, and a socket someone
/// answers on belongs to a running VM.
pub fn check_qmp_path(p: &Path) -> Result<()> {
    check_socket_path(p, "--qmp", "QMP")
}

/// [`check_qmp_path`] for `what` (`--qmp`, `--qga`).
pub fn check_socket_path(p: &Path, what: &str, kind: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = parent {
        if !d.is_dir() {
            return Err(Error::invalid(format!(
                "{what} {}: directory {} does not exist",
                p.display(),
                d.display()
            )));
        }
    }
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("{what} {}", p.display()), e)),
        Ok(m) if !m.file_type().is_socket() => Err(Error::invalid(format!(
            "{what} {} exists and is not a socket; refusing to replace it",
            p.display()
        ))),
        Ok(_) if std::os::unix::net::UnixStream::connect(p).is_ok() => Err(Error::busy(format!(
            "{what} {}: a {kind} socket there is in use (another VM?)",
            p.display()
        ))),
        Ok(_) => Ok(()),
    }
}

/// Total memory of this host in MiB.
fn host_memory_mib() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|i| i.ram_total() / (1 << 20))
        .unwrap_or(crate::repo::limits::MAX_MEMORY_MIB)
}

pub struct Watch {
    pub marker: String,
    pub timeout: Duration,
    /// How long to let the guest finish (sync, power off) after the marker.
    pub settle: Duration,
    /// Count the guest agent answering (`guest-ping`, then
    /// `guest-get-osinfo`) as a successful boot too, like a hypervisor's
    /// tools heartbeat; whichever comes first wins.
    pub heartbeat: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The marker line appeared after this long.
    Marker {
        line: String,
        after: Duration,
    },
    /// The guest agent answered (heartbeat): the guest's OS name.
    Heartbeat {
        os: String,
        after: Duration,
    },
    /// QEMU exited before the marker.
    Exited(String),
    Timeout,
    /// The progress callback stopped the boot (e.g. a damaged chunk was read).
    Aborted(String),
}

pub struct BootReport {
    pub outcome: Outcome,
    /// The last console lines, for failure reports.
    pub console_tail: Vec<String>,
    /// True if QEMU powered off by itself after the marker.
    pub clean_exit: bool,
}

/// Polls the guest agent until it answers `guest-ping` and reports its OS
/// (`guest-get-osinfo`), then sends the OS name once.
fn heartbeat(
    qga: &Path,
    stop: &std::sync::atomic::AtomicBool,
    tx: crossbeam_channel::Sender<String>,
) {
    use crate::qemu::guest_agent::GuestAgent;
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::SeqCst) {
        if let Ok(mut a) = GuestAgent::connect(qga, Duration::from_secs(3)) {
            let info = a
                .ping()
                .and_then(|()| a.execute("guest-get-osinfo", None, Duration::from_secs(10)));
            if let Ok(info) = info {
                let os = ["pretty-name", "name", "id"]
                    .iter()
                    .find_map(|k| info.get(*k).and_then(|v| v.as_str()))
                    .unwrap_or("an unnamed OS")
                    .to_string();
                let _ = tx.send(os);
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// QEMU, killed and reaped when the boot ends however it ends: an unwind
/// (a console line printed to a closed pipe, `boot | head`) would
/// otherwise leave the VM running on the recovered disks, watched by
/// nothing (review20). A signal or `kill -9` that ends the process skips
/// this: see [`die_with_this_process`].
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes the process `c` starts get SIGKILL when this process dies, even
/// by a `kill -9` or a second SIGINT's `exit` that skip every destructor
/// ([`KillOnDrop`] included): QEMU must not run on, orphaned, on the
/// recovered disks (a session nobody can release while they are open, a
/// throwaway mount that stays) (explore7 M1). SIGKILL, as a timeout stops
/// QEMU: nobody is left to follow a SIGTERM QEMU does not act on.
///
/// The kernel sends the signal when the *thread* that forked the child
/// ends, not the process. [`boot`] is that thread's caller and returns
/// only once QEMU is killed and reaped (every path, unwinds included, goes
/// through [`KillOnDrop`]), so whatever thread runs it outlives its QEMU
/// unless the whole process dies, which is the case meant.
fn die_with_this_process(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes two system calls
    // (prctl, getppid) and may `_exit`; it allocates nothing and takes no
    // lock (`last_os_error` only reads errno).
    unsafe {
        c.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // This process died between the fork and the prctl: no signal
            // will come, and QEMU must not start.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Boots and watches. `on_line` sees every console line; `tick` runs
/// about every 250 ms with the elapsed time; returning `Some(reason)`
/// aborts the boot (after the marker: ends the wait for the guest to
/// power off). QEMU is then killed (SIGKILL), as at the timeout.
pub fn boot(
    spec: &QemuSpec,
    watch: &Watch,
    console_log: Option<&Path>,
    mut on_line: impl FnMut(&str),
    mut tick: impl FnMut(Duration) -> Option<String>,
) -> Result<BootReport> {
    // What killed runs left (as `verify-boot` and `precopy` sweep it).
    remove_stale_scratch(&std::env::temp_dir());
    // Every VM gets a guest-agent channel: here, or in a scratch directory.
    let scratch = scratch_dir("boot")?;
    let qga = spec
        .qga
        .clone()
        .unwrap_or_else(|| scratch.path().join("qga.sock"));
    // Before QEMU starts: an error here must not leave a VM running.
    let mut log = match console_log {
        Some(p) => Some(std::fs::File::create(p).ctx(|| format!("create {}", p.display()))?),
        None => None,
    };
    let mut command = spec.command(&qga);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_this_process(&mut command);
    let mut child = KillOnDrop(
        command
            .spawn()
            .map_err(|e| Error::io("start qemu-system-x86_64 (is QEMU installed?)", e))?,
    );
    let (tx, rx) = unbounded::<String>();
    for stream in [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(|l| l.ok()) {
                if tx
                    .send(
                        String::from_utf8_lossy(&line)
                            .trim_end_matches('\r')
                            .to_string(),
                    )
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    drop(tx);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (hb_tx, hb_rx) = unbounded::<String>();
    if watch.heartbeat {
        let (qga, stop) = (qga.clone(), stop.clone());
        std::thread::spawn(move || heartbeat(&qga, &stop, hb_tx));
    }
    let start = Instant::now();
    let mut tail: Vec<String> = vec![];
    let mut outcome = None;
    let mut last_tick = Instant::now();
    while outcome.is_none() {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(line) => {
                if let Some(l) = log.as_mut() {
                    let _ = writeln!(l, "{line}");
                }
                on_line(&line);
                if line.contains(&watch.marker) {
                    outcome = Some(Outcome::Marker {
                        line: line.clone(),
                        after: start.elapsed(),
                    });
                }
                tail.push(line);
                if tail.len() > 40 {
                    tail.remove(0);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let st = child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                outcome = Some(Outcome::Exited(st));
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if outcome.is_none() {
            if let Ok(os) = hb_rx.try_recv() {
                outcome = Some(Outcome::Heartbeat {
                    os,
                    after: start.elapsed(),
                });
            }
        }
        if outcome.is_none() && start.elapsed() > watch.timeout {
            outcome = Some(Outcome::Timeout);
        }
        if outcome.is_none() && last_tick.elapsed() >= Duration::from_millis(250) {
            last_tick = Instant::now();
            if let Some(reason) = tick(start.elapsed()) {
                outcome = Some(Outcome::Aborted(reason));
            }
        }
    }
    let outcome = outcome.expect("set");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // After the marker the guest still syncs and powers off; killing it
    // early could lose the writes we want to keep.
    let mut clean_exit = false;
    if matches!(outcome, Outcome::Marker { .. }) {
        let deadline = Instant::now() + watch.settle;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                clean_exit = st.success();
                break;
            }
            // A stop (a signal) does not wait for the guest either.
            if last_tick.elapsed() >= Duration::from_millis(250) {
                last_tick = Instant::now();
                if tick(start.elapsed()).is_some() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // Drain what is left for the log.
    for line in rx.try_iter() {
        if let Some(l) = log.as_mut() {
            let _ = writeln!(l, "{line}");
        }
    }
    Ok(BootReport {
        outcome,
        console_tail: tail,
        clean_exit,
    })
}

mod devices;
use devices::MAX_IDE_DISKS;
mod scratch;
pub use devices::{disk_serial, known_scsi_controller, scsi_controller, DiskBus, VIRTIO_SCSI};
pub(crate) use scratch::{remove_stale_scratch, scratch_dir};

#[cfg(test)]
pub(crate) mod tests;
