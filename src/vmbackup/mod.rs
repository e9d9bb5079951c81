//! `backup-vms`: full backups of several running QEMU VMs from one common
//! snapshot time, busiest first, beside the other disk-copying jobs
//! (`repo::writer` for images, `session::backup` for recovered VMs).
//!
//! 1. *Connect and measure.* QMP to every VM ([`Qmp`]); its disks from
//!    `query-block` (a VM without one fails alone); QEMU's NBD server
//!    started on a Unix socket in a private temporary directory (before
//!    any pause, so it costs the guest nothing). Each VM's write rate is
//!    measured over the same window, one thread per VM, and
//!    [`order_by_rate`] orders them busiest first.
//! 2. *Common snapshot time.* `guest-fsfreeze-freeze` in each VM given an
//!    `--agent` (one that does not answer: a warning, and that VM's backup
//!    is crash-consistent, said in the summary); `stop` on every VM; in
//!    each, one point-in-time view per disk ([`fleece::open_view`]: dirty
//!    bitmap, copy-before-write store, `snapshot-access`, NBD export); the
//!    snapshot time is recorded once, for all; then `cont` on every VM that
//!    was running and thaw. The pause (stop to cont) is reported per VM. A
//!    VM whose view cannot be opened has its views undone, is resumed, and
//!    fails alone.
//! 3. *Read.* The views are read busiest first, `--jobs` VMs at a time:
//!    `base:allocation` block status skips zero extents, every other chunk
//!    is read over NBD and stored through [`store_chunks`]; then one
//!    manifest per VM ([`publish_manifest`], create-only, written last).
//! 4. *Release early.* A VM's views and NBD server go as soon as its
//!    manifest is written (or it failed), before later VMs are read.
//!
//! **Why busiest first:** while a view is open, every guest write to a
//! block not yet overwritten since the snapshot first copies the old block
//! into the view's copy-before-write store (a temporary file on the host).
//! The VM that writes most grows its store fastest and slows down most, so
//! its view is read and released first.
//!
//! **Consistency:** a VM whose filesystems the guest agent froze is
//! *application-consistent*: every filesystem was flushed and quiesced at
//! the snapshot time. Without an agent the backup is *crash-consistent*:
//! the disks as they were at one instant with the vCPUs stopped, as after a
//! power cut; journaling filesystems and databases recover from it, but
//! data still in the guest's page cache is not in it. All VMs share the
//! one snapshot time either way.
//!
//! **Failures:** a VM that disappears or errors mid-backup has its views
//! torn down (best effort if QEMU is gone) and no manifest: manifests are
//! written last and create-only, so nothing partial appears. The others go
//! on; the summary says which failed.
//!
//! **Incrementals (later):** every view already carries a dirty bitmap at
//! chunk granularity, started at the snapshot instant. A full backup drops
//! it today (`close_view(.., true)`); an incremental will keep it, and at
//! the next run read only the ranges of `qemu:dirty-bitmap:NAME`
//! ([`crate::qemu::nbd::dirty_bitmap_context`]) instead of every allocated
//! range in [`chunks_with_data`], taking the base manifest's chunks for the
//! rest (as `session::backup` does with its dirty maps).
//!
//! Names: QEMU limits node names to 31 bytes, so a view's tag is the run
//! id, the VM's position on the command line and the disk index
//! (`<run>-<vm>-<disk>`), not the VM's name.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::qemu::fleece::{self, View};
use crate::qemu::guest_agent::GuestAgent;
use crate::qemu::nbd::{Extent, NbdClient, CONTEXT_ALLOCATION, STATE_ZERO};
use crate::qemu::qmp::{BlockDevice, Qmp};
use crate::repo::manifest::DiskManifest;
use crate::repo::writer::{default_config, publish_manifest, store_chunks};
use crate::repo::Repository;

/// Called with (VM name, event name) as each event is recorded (tests use
/// it to act at a precise point of a run).
pub type Hook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// One VM to back up.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub qmp: PathBuf,
    /// The guest agent's socket, to freeze the guest's filesystems.
    pub agent: Option<PathBuf>,
}

pub struct Options {
    pub vms: Vec<VmSpec>,
    /// VMs read at the same time.
    pub jobs: usize,
    pub chunk_size: u32,
    /// How long write rates are measured.
    pub rate_window: Duration,
    /// How long a guest agent may take to answer its sync.
    pub agent_timeout: Duration,
    pub hook: Option<Hook>,
}

/// One step of one VM's backup.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<usize>,
    /// Wall clock, RFC 3339 with milliseconds.
    pub at: String,
    /// Microseconds since the run started (monotonic: orders events).
    pub t_us: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct VmReport {
    pub vm: String,
    pub qmp: PathBuf,
    /// Position in the read order, from 1 (none: failed before ordering).
    pub order: Option<usize>,
    /// Bytes per second the guest wrote while measured.
    pub write_rate: f64,
    /// From its `stop` to its `cont`.
    pub paused_ms: Option<f64>,
    /// `application-consistent` or `crash-consistent[: why]`.
    pub consistency: String,
    pub backup: Option<String>,
    pub error: Option<String>,
    pub warnings: Vec<String>,
    pub disks: usize,
    pub bytes_read: u64,
    pub new_bytes: u64,
    /// From its read's start to its manifest.
    pub read_ms: f64,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_id: String,
    /// The common snapshot time (none if no VM got that far).
    pub snapshot_time: Option<String>,
    pub jobs: usize,
    pub chunk_size: u32,
    /// In command-line order.
    pub vms: Vec<VmReport>,
}

impl Summary {
    pub fn failed(&self) -> Vec<&VmReport> {
        self.vms.iter().filter(|v| v.error.is_some()).collect()
    }
}

/// Indexes of `rates` busiest first; equal rates keep their given order.
pub fn order_by_rate(rates: &[(String, f64)]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..rates.len()).collect();
    idx.sort_by(|&a, &b| rates[b].1.total_cmp(&rates[a].1));
    idx
}

/// Chunk indexes that hold an extent not known to read as zeros, in order.
/// (`STATE_HOLE` without `STATE_ZERO` may read as backing data: read.)
pub fn chunks_with_data(extents: &[Extent], chunk_size: u32) -> Vec<u64> {
    let cs = chunk_size as u64;
    let mut out: Vec<u64> = vec![];
    for e in extents
        .iter()
        .filter(|e| e.flags & STATE_ZERO == 0 && e.len > 0)
    {
        let first = e.offset / cs;
        let last = (e.offset + e.len - 1) / cs;
        let from = match out.last() {
            Some(&l) if l >= first => l + 1,
            _ => first,
        };
        out.extend(from..=last);
    }
    out
}

struct Clock {
    start: Instant,
    hook: Option<Hook>,
}

impl Clock {
    fn event(&self, r: &mut VmReport, event: &str, disk: Option<usize>) {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        r.events.push(Event {
            event: event.into(),
            disk,
            at: time::OffsetDateTime::now_utc()
                .format(fmt)
                .unwrap_or_default(),
            t_us: self.start.elapsed().as_micros() as u64,
        });
        if let Some(h) = &self.hook {
            h(&r.vm, event);
        }
    }
}

/// One VM's state through a run.
struct Vm {
    index: usize,
    spec: VmSpec,
    report: VmReport,
    qmp: Option<Qmp>,
    disks: Vec<BlockDevice>,
    dir: Option<tempfile::TempDir>,
    nbd_started: bool,
    views: Vec<View>,
    was_running: bool,
    stopped_at: Option<Instant>,
    agent: Option<GuestAgent>,
}

impl Vm {
    fn new(index: usize, spec: VmSpec) -> Vm {
        Vm {
            index,
            report: VmReport {
                vm: spec.name.clone(),
                qmp: spec.qmp.clone(),
                consistency: "crash-consistent".into(),
                ..Default::default()
            },
            spec,
            qmp: None,
            disks: vec![],
            dir: None,
            nbd_started: false,
            views: vec![],
            was_running: false,
            stopped_at: None,
            agent: None,
        }
    }

    fn ok(&self) -> bool {
        self.report.error.is_none()
    }

    fn q(&mut self) -> Result<&mut Qmp> {
        self.qmp
            .as_mut()
            .ok_or_else(|| Error::invalid("no QMP connection"))
    }

    fn socket(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join("nbd.sock"))
            .unwrap_or_default()
    }

    /// Step 1: connect, list the disks, start the NBD server.
    fn prepare(&mut self) -> Result<()> {
        let q = Qmp::connect(&self.spec.qmp)?;
        self.qmp = Some(q);
        self.disks = self.q()?.block_devices()?;
        if self.disks.is_empty() {
            return Err(Error::invalid("QEMU reports no disk to back up"));
        }
        self.report.disks = self.disks.len();
        let dir = tempfile::Builder::new()
            .prefix("recoverfs-vmbackup-")
            .tempdir()
            .map_err(|e| Error::io("create a temporary directory", e))?;
        self.dir = Some(dir);
        let sock = self.socket();
        fleece::start_nbd_server(self.q()?, &sock)?;
        self.nbd_started = true;
        Ok(())
    }

    /// Records `e` as this VM's error (the first one counts) and tears its
    /// views down.
    fn fail(&mut self, clock: &Clock, e: Error) {
        tracing::warn!(vm = %self.spec.name, "backup failed: {e}");
        self.report.error.get_or_insert(e.to_string());
        clock.event(&mut self.report, "failed", None);
        self.release(clock);
    }

    /// Closes the views and stops the NBD server, best effort.
    fn release(&mut self, clock: &Clock) {
        let had = !self.views.is_empty() || self.nbd_started;
        let views = std::mem::take(&mut self.views);
        if let Some(q) = self.qmp.as_mut() {
            for v in views.iter().rev() {
                // Full backups only: the bitmap goes with the view.
                if let Err(e) = fleece::close_view(q, v, true) {
                    tracing::warn!(vm = %self.spec.name, node = %v.node, "closing a view: {e}");
                }
            }
            if self.nbd_started {
                if let Err(e) = fleece::stop_nbd_server(q) {
                    tracing::warn!(vm = %self.spec.name, "stopping the NBD server: {e}");
                }
            }
        }
        self.nbd_started = false;
        // The copy-before-write files and the socket go with the directory.
        self.dir = None;
        if had {
            clock.event(&mut self.report, "view_released", None);
        }
    }

    fn freeze(&mut self, clock: &Clock, timeout: Duration) {
        let Some(path) = self.spec.agent.clone() else {
            return;
        };
        let r = GuestAgent::connect(&path, timeout).and_then(|mut a| a.fsfreeze().map(|_| a));
        match r {
            Ok(a) => {
                self.agent = Some(a);
                self.report.consistency = "application-consistent".into();
                clock.event(&mut self.report, "frozen", None);
            }
            Err(e) => {
                tracing::warn!(vm = %self.spec.name, "no filesystem freeze, the backup is crash-consistent: {e}");
                self.report.consistency = format!("crash-consistent: guest agent: {e}");
            }
        }
    }

    fn stop(&mut self, clock: &Clock) -> Result<()> {
        let q = self.q()?;
        let running = q.status()?.running;
        q.stop()?;
        self.was_running = running;
        self.stopped_at = Some(Instant::now());
        clock.event(&mut self.report, "stopped", None);
        Ok(())
    }

    fn open_views(&mut self, clock: &Clock, run: &str, chunk_size: u32) -> Result<()> {
        let dir = self.dir.as_ref().map(|d| d.path().to_path_buf());
        let dir = dir.ok_or_else(|| Error::invalid("no temporary directory"))?;
        for i in 0..self.disks.len() {
            let tag = format!("{run}-{}-{i}", self.index);
            let disk = self.disks[i].clone();
            let v = fleece::open_view(self.q()?, &disk, &tag, &dir, chunk_size)
                .map_err(|e| e.context(format!("disk {i} ({})", disk.qdev)))?;
            self.views.push(v);
            clock.event(&mut self.report, "view_opened", Some(i));
        }
        Ok(())
    }

    /// Resumes the VM if it was running before the stop.
    fn resume(&mut self, clock: &Clock) -> Result<()> {
        let Some(at) = self.stopped_at.take() else {
            return Ok(());
        };
        let r = match self.was_running {
            true => self.q().and_then(|q| q.cont()),
            false => Ok(()),
        };
        self.report.paused_ms = Some(at.elapsed().as_secs_f64() * 1000.0);
        clock.event(&mut self.report, "resumed", None);
        r
    }

    fn thaw(&mut self, clock: &Clock) {
        if let Some(mut a) = self.agent.take() {
            match a.fsthaw() {
                Ok(_) => clock.event(&mut self.report, "thawed", None),
                Err(e) => {
                    tracing::error!(vm = %self.spec.name, "thawing the guest's filesystems: {e}");
                    self.report
                        .warnings
                        .push(format!("thawing the guest's filesystems failed: {e}"));
                }
            }
        }
    }

    /// Step 3: reads every view, publishes the manifest, releases.
    fn read(&mut self, clock: &Clock, repo: &Arc<Repository>, opts: &Options, snapshot: &str) {
        clock.event(&mut self.report, "read_started", None);
        let t0 = Instant::now();
        match self.store(repo, opts, snapshot) {
            Ok(id) => {
                self.report.backup = Some(id);
                self.report.read_ms = t0.elapsed().as_secs_f64() * 1000.0;
                clock.event(&mut self.report, "manifest_written", None);
                self.release(clock);
            }
            Err(e) => {
                // Say so when the VM is gone, not just what broke first.
                let e = match self.q().and_then(|q| q.status()) {
                    Ok(_) => e,
                    Err(_) => e.context("the VM's QEMU is gone"),
                };
                self.fail(clock, e)
            }
        }
    }

    fn store(&mut self, repo: &Arc<Repository>, opts: &Options, snapshot: &str) -> Result<String> {
        let socket = self.socket();
        let mut disks = vec![];
        for (i, v) in self.views.iter().enumerate() {
            let (dm, read) = read_view(repo, &socket, v, i, opts.chunk_size)
                .map_err(|e| e.context(format!("disk {i}")))?;
            self.report.bytes_read += read;
            self.report.new_bytes += dm.new_bytes;
            disks.push(dm);
        }
        let mut config = default_config(&self.spec.name, disks.len());
        config["backup_vms"] = serde_json::json!({
            "snapshot_time": snapshot,
            "consistency": self.report.consistency,
            "devices": self.disks.iter().map(|d| &d.qdev).collect::<Vec<_>>(),
        });
        Ok(publish_manifest(repo, &self.spec.name, config, disks)?.id)
    }
}

/// Reads one view into the repository: its disk manifest and bytes read.
fn read_view(
    repo: &Arc<Repository>,
    socket: &Path,
    v: &View,
    index: usize,
    chunk_size: u32,
) -> Result<(DiskManifest, u64)> {
    let mut c = NbdClient::connect_unix(socket, &v.export, &[CONTEXT_ALLOCATION])?;
    let size = c.size();
    let extents = match size {
        0 => vec![],
        _ => c.block_status(CONTEXT_ALLOCATION, 0, size)?,
    };
    let wanted = chunks_with_data(&extents, chunk_size);
    let c = Mutex::new(c);
    let read = |i: u64, buf: &mut [u8]| {
        c.lock()
            .expect("NBD client lock")
            .read(i * chunk_size as u64, buf)
    };
    let st = store_chunks(repo, size, chunk_size, wanted.into_iter(), &read, &|_| {})?;
    let _ = c.into_inner().map(|c| c.disconnect());
    let mut chunks = vec![None; DiskManifest::chunk_count(size, chunk_size) as usize];
    for (i, d) in &st.chunks {
        chunks[*i as usize] = *d;
    }
    let dm = DiskManifest {
        name: format!("disk{index}"),
        size,
        chunk_size,
        chunks,
        stored_bytes: st.sizes.values().sum(),
        new_bytes: st.new_bytes,
    };
    Ok((dm, st.read_bytes))
}

fn check(opts: &Options) -> Result<()> {
    if opts.vms.is_empty() {
        return Err(Error::invalid("no VM given"));
    }
    if opts.jobs == 0 {
        return Err(Error::invalid("--jobs must be at least 1"));
    }
    let (mut names, mut sockets) = (HashSet::new(), HashSet::new());
    for v in &opts.vms {
        crate::util::validate_name("VM name", &v.name)?;
        if !names.insert(&v.name) {
            return Err(Error::invalid(format!("VM {} is given twice", v.name)));
        }
        // QEMU serves one QMP client per socket: a second would hang.
        if !sockets.insert(&v.qmp) {
            return Err(Error::invalid(format!(
                "QMP socket {} is given twice",
                v.qmp.display()
            )));
        }
    }
    Ok(())
}

/// Backs up every VM of `opts` (see the module docs). Errors of single
/// VMs are in the summary; an error here means nothing was attempted.
pub fn backup_vms(repo: &Arc<Repository>, opts: &Options) -> Result<Summary> {
    check(opts)?;
    let clock = Clock {
        start: Instant::now(),
        hook: opts.hook.clone(),
    };
    let run = crate::repo::random_hex(3);
    let mut vms: Vec<Vm> = (opts.vms.iter().cloned().enumerate())
        .map(|(i, s)| Vm::new(i, s))
        .collect();

    // 1. Connect, measure, order.
    for vm in &mut vms {
        if let Err(e) = vm.prepare() {
            vm.fail(&clock, e);
        }
    }
    let rates: Vec<(usize, Result<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (vms.iter_mut().filter(|v| v.ok()))
            .map(|vm| {
                let i = vm.index;
                let h = s.spawn(|| vm.q().and_then(|q| q.write_rate(opts.rate_window)));
                (i, h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(i, h)| (i, h.join().expect("rate thread")))
            .collect()
    });
    for (i, r) in rates {
        match r {
            Ok(r) => vms[i].report.write_rate = r,
            Err(e) => vms[i].fail(&clock, e.context("measuring the write rate")),
        }
    }
    let live: Vec<usize> = (0..vms.len()).filter(|&i| vms[i].ok()).collect();
    let rates: Vec<(String, f64)> = live
        .iter()
        .map(|&i| (vms[i].spec.name.clone(), vms[i].report.write_rate))
        .collect();
    let order: Vec<usize> = order_by_rate(&rates).into_iter().map(|k| live[k]).collect();
    for (pos, &i) in order.iter().enumerate() {
        vms[i].report.order = Some(pos + 1);
    }

    // 2. The common snapshot time.
    for &i in &order {
        vms[i].freeze(&clock, opts.agent_timeout);
    }
    for &i in &order {
        if let Err(e) = vms[i].stop(&clock) {
            vms[i].fail(&clock, e);
        }
    }
    for &i in &order {
        if vms[i].ok() {
            if let Err(e) = vms[i].open_views(&clock, &run, opts.chunk_size) {
                vms[i].fail(&clock, e);
            }
        }
    }
    let snapshot = order.iter().any(|&i| vms[i].ok()).then(|| {
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    });
    for &i in &order {
        if let Err(e) = vms[i].resume(&clock) {
            let e = e.context("resuming the VM");
            vms[i].fail(&clock, e);
        }
    }
    for &i in &order {
        vms[i].thaw(&clock);
    }

    // 3. and 4. Read busiest first, `jobs` at a time, release each early.
    let queue: Mutex<VecDeque<usize>> =
        Mutex::new(order.iter().copied().filter(|&i| vms[i].ok()).collect());
    let slots: Vec<Mutex<Vm>> = vms.into_iter().map(Mutex::new).collect();
    let snap = snapshot.clone().unwrap_or_default();
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.min(slots.len()) {
            s.spawn(|| loop {
                let Some(i) = queue.lock().expect("queue lock").pop_front() else {
                    break;
                };
                let mut vm = slots[i].lock().expect("VM lock");
                vm.read(&clock, repo, opts, &snap);
            });
        }
    });
    Ok(Summary {
        run_id: run,
        snapshot_time: snapshot,
        jobs: opts.jobs,
        chunk_size: opts.chunk_size,
        vms: slots
            .into_iter()
            .map(|m| m.into_inner().expect("VM lock").report)
            .collect(),
    })
}

#[cfg(test)]
mod tests;
