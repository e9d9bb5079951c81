//! `backup-vms`: full or incremental backups of several running QEMU VMs
//! from one common snapshot time, busiest first, beside the other
//! disk-copying jobs (`repo::writer` for images, `session::backup` for
//! recovered VMs).
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
//!    fails alone. A VM whose `stop` errs (QEMU answers it only after
//!    draining the guest's I/O, which can outlast the QMP timeout) fails
//!    and gets its `cont` at once. A thaw that fails is retried on a new
//!    agent connection; one that still fails fails the VM ("THE GUEST MAY
//!    STILL BE FROZEN"), as a failed `cont` does ("THE VM IS PAUSED").
//! 3. *Read.* The views are read busiest first, `--jobs` VMs at a time:
//!    `base:allocation` block status skips zero extents, every other chunk
//!    is read over NBD and stored through [`store_chunks`](crate::repo::writer::store_chunks); then one
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
//! on; the summary says which failed. A copy-before-write store that cannot
//! take old data (host disk full or failing) breaks its view's snapshot
//! (`on-cbw-error: break-snapshot`), never the guest's write: the view's
//! reads then fail, and so does that VM's backup.
//!
//! **Signals and kills:** [`backup_vms_until`] ends a run whose `stop` flag
//! is set (the CLI sets it on SIGINT/SIGTERM) through the same cleanup:
//! every VM resumed and thawed, views closed, no manifest. What a killed
//! run leaves in QEMU (exports, nodes, the guest device on the filter, an
//! NBD server without exports) the next run removes before it starts
//! ([`fleece::remove_leftovers`]).
//!
//! **Incrementals:** every view carries a new dirty bitmap at chunk
//! granularity, started at the snapshot instant, and a successful run
//! keeps it (the manifest's config records it per disk under
//! `backup_vms.bitmaps`, with the node and the QMP socket); older
//! backup-vms bitmaps on the node go. With `--incremental`, `Vm::plan`
//! takes the VM's newest backup as base if QEMU still has each recorded
//! bitmap on the disk's node, still recording (one left disabled misses
//! the writes since), and the geometry (disk count, sizes, chunk size) is
//! the same; otherwise a full read, said in the VM's warnings
//! (`full read: <reason>`), never a guessed incremental. At the snapshot
//! (VM stopped) the base's bitmap is disabled, so it covers exactly the
//! writes from the base's snapshot to this one, and exported read-only on
//! the disk's own node ([`View::map_export`]: QEMU 7.2 does not find a
//! bitmap through `snapshot-access`). `read_view` reads the chunks that
//! `qemu:dirty-bitmap:NAME` marks and `base:allocation` says hold data;
//! every other chunk keeps the base's id (as `session::backup` does with
//! its dirty maps). A failed incremental re-enables the base's bitmap,
//! merges its new bitmap into it and removes the new one, all in one QMP
//! `transaction` (no guest write can fall between the steps), so the next
//! run still covers every write since the base. If that fails, both
//! bitmaps go and the VM's warnings say so: the next run reads in full
//! (as it does if QEMU is gone, and the bitmaps with it).
//!
//! Names: QEMU limits node names to 31 bytes, so a view's tag is the run
//! id, the VM's position on the command line and the disk index
//! (`<run>-<vm>-<disk>`), not the VM's name.

pub mod read;

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::boot::NbdServer;
use crate::error::{Error, Result};
use crate::qemu::fleece::{self, View};
use crate::qemu::guest_agent::{GuestAgent, FREEZE_TIMEOUT};
use crate::qemu::qmp::{BlockDevice, Qmp};
use crate::repo::locks::WriterLock;
use crate::repo::manifest::{DiskManifest, Manifest};
use crate::repo::writer::{default_config, publish_manifest};
use crate::repo::Repository;
pub use read::{
    chunks_with_data, dirty_chunks, read_export, read_export_until, Base, Export, ReadOutcome,
    INTERRUPTED,
};

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
    /// A base the caller vouches for (pre-copy), used instead of the
    /// newest backup whatever `incremental` says.
    pub base: Option<GivenBase>,
}

/// A base for one VM's backup that is not a backup of its own: the chunk
/// ids of every disk block as a caller recorded them, and per disk the
/// enabled dirty bitmap on the disk's node covering every block whose
/// recorded chunk may be stale (`precopy`: the chunks it copied, and its
/// newest round's bitmap). The backup disables each bitmap at the
/// snapshot and reads only what it marks, exactly as for an incremental.
#[derive(Debug, Clone)]
pub struct GivenBase {
    /// Disk geometry and chunk ids (`stored_bytes`: of its distinct chunks).
    pub manifest: Manifest,
    pub bitmaps: Vec<String>,
    /// The backup's `mode` (e.g. `precopy`).
    pub mode: String,
    /// The backup recorded as the base in the new manifest, if any.
    pub base: Option<String>,
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
    /// Read only what each VM's previous backup's dirty bitmaps mark.
    pub incremental: bool,
    /// Which VM is read first.
    pub order: ReadOrder,
    pub hook: Option<Hook>,
}

/// The order VMs are read in, by measured write rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadOrder {
    /// Busiest first: the views that cost most are released soonest.
    #[default]
    BusiestFirst,
    /// Idle first: only to measure what busiest-first saves.
    IdleFirst,
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
    /// `full` or `incremental`.
    pub mode: String,
    /// The backup an incremental is relative to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    pub error: Option<String>,
    pub warnings: Vec<String>,
    pub disks: usize,
    pub bytes_read: u64,
    /// Chunks read over NBD (the others: zeros, or the base's).
    pub chunks_read: u64,
    pub new_bytes: u64,
    /// From its read's start to its manifest.
    pub read_ms: f64,
    /// Old data the guest's writes copied into the views' copy-before-write
    /// stores while they were open (measured as they are released).
    pub cbw_bytes: u64,
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
    /// [`fleece::RUN_LOCK`] in `dir`, held while `dir` is.
    run_lock: Option<std::fs::File>,
    /// Held from connecting until the views are released: another run on
    /// this VM would take over our NBD server.
    vm_lock: Option<crate::qemu::VmLock>,
    nbd_started: bool,
    views: Vec<View>,
    was_running: bool,
    stopped_at: Option<Instant>,
    agent: Option<GuestAgent>,
    /// An incremental's base and its dirty bitmap per disk.
    prev: Option<Prev>,
    /// Previous bitmaps disabled at the snapshot (disks 0..n).
    prev_disabled: usize,
}

struct Prev {
    manifest: Manifest,
    bitmaps: Vec<String>,
}

impl Vm {
    fn new(index: usize, spec: VmSpec) -> Vm {
        Vm {
            index,
            report: VmReport {
                vm: spec.name.clone(),
                qmp: spec.qmp.clone(),
                consistency: "crash-consistent".into(),
                mode: "full".into(),
                ..Default::default()
            },
            spec,
            qmp: None,
            disks: vec![],
            dir: None,
            run_lock: None,
            vm_lock: None,
            nbd_started: false,
            views: vec![],
            was_running: false,
            stopped_at: None,
            agent: None,
            prev: None,
            prev_disabled: 0,
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
        self.vm_lock = crate::qemu::VmLock::try_take(&q)?;
        self.qmp = Some(q);
        // First: a leftover view holds a guest device.
        let left = fleece::remove_leftovers(self.q()?)
            .map_err(|e| e.context("removing what a killed backup left in QEMU"))?;
        if !left.is_empty() {
            let w = format!("removed what a killed backup left: {}", left.join(", "));
            tracing::warn!(vm = %self.spec.name, "{w}");
            self.report.warnings.push(w);
        }
        self.disks = self.q()?.block_devices()?;
        if self.disks.is_empty() {
            return Err(Error::invalid("QEMU reports no disk to back up"));
        }
        self.report.disks = self.disks.len();
        let dir = tempfile::Builder::new()
            .prefix("recoverfs-vmbackup-")
            .tempdir()
            .map_err(|e| Error::io("create a temporary directory", e))?;
        // Held while the views may be in use: not leftovers to a run of
        // this VM that starts meanwhile.
        let lock = crate::util::try_lock_file(&dir.path().join(fleece::RUN_LOCK))?;
        self.run_lock = Some(lock.ok_or_else(|| Error::busy("a new run lock is held"))?);
        self.dir = Some(dir);
        let sock = self.socket();
        if let Err(e) = fleece::start_nbd_server(self.q()?, &sock) {
            // A server without an NBD export serves nobody (a killed
            // run's, or one started and never used): replaced.
            let exports = self.q()?.execute("query-block-exports", None)?;
            let nbd = (exports.as_array().into_iter().flatten()).any(|x| x["type"] == "nbd");
            if nbd {
                return Err(e);
            }
            fleece::stop_nbd_server(self.q()?)?;
            fleece::start_nbd_server(self.q()?, &sock)?;
            let w = format!("replaced QEMU's NBD server, which had no export ({e})");
            tracing::warn!(vm = %self.spec.name, "{w}");
            self.report.warnings.push(w);
        }
        self.nbd_started = true;
        Ok(())
    }

    /// `--incremental`: the newest backup is the base if its recorded
    /// bitmaps are still in QEMU on the same nodes, recording, and its
    /// geometry is the disks'; otherwise a full read, said in the warnings.
    fn plan(&mut self, repo: &Repository, chunk_size: u32) {
        match self.find_base(repo, chunk_size) {
            Ok(p) => {
                self.report.mode = "incremental".into();
                self.report.base = Some(p.manifest.id.clone());
                self.prev = Some(p);
            }
            Err(why) => {
                tracing::warn!(vm = %self.spec.name, "full read: {why}");
                self.report.warnings.push(format!("full read: {why}"));
            }
        }
    }

    /// A caller's base ([`GivenBase`]): checked like a backup's; an error
    /// fails the VM rather than reading in full behind the caller's back.
    fn use_base(&mut self, given: &GivenBase, chunk_size: u32) -> Result<()> {
        let what = format!("the {} base", given.mode);
        let disks = self.disks.clone();
        check_base(
            self.q()?,
            &disks,
            &what,
            &given.manifest.disks,
            &given.bitmaps,
            chunk_size,
        )
        .map_err(Error::invalid)?;
        self.report.mode = given.mode.clone();
        self.report.base = given.base.clone();
        self.prev = Some(Prev {
            manifest: given.manifest.clone(),
            bitmaps: given.bitmaps.clone(),
        });
        Ok(())
    }

    fn find_base(
        &mut self,
        repo: &Repository,
        chunk_size: u32,
    ) -> std::result::Result<Prev, String> {
        let (vm, disks) = (self.spec.name.clone(), self.disks.clone());
        let q = self.q().map_err(|e| e.to_string())?;
        let (manifest, bitmaps) = find_base(q, repo, &vm, &disks, chunk_size)?;
        Ok(Prev { manifest, bitmaps })
    }

    /// Records `e` as this VM's error (the first one counts) and tears its
    /// views down.
    fn fail(&mut self, clock: &Clock, e: Error) {
        tracing::warn!(vm = %self.spec.name, "backup failed: {e}");
        self.report.error.get_or_insert(e.to_string());
        clock.event(&mut self.report, "failed", None);
        self.release(clock);
    }

    /// [`Self::fail`], or adds `e` to the error of a VM that failed
    /// already: what it says (a VM left paused or frozen) must not go
    /// unsaid.
    fn fail_or_add(&mut self, clock: &Clock, e: Error) {
        match &mut self.report.error {
            Some(first) => {
                tracing::error!(vm = %self.spec.name, "{e}");
                *first = format!("{first}; {e}");
            }
            None => self.fail(clock, e),
        }
    }

    /// Closes the views and stops the NBD server, best effort. After a
    /// manifest, each disk keeps the new bitmap alone (the next
    /// incremental's map); after a failure the new bitmap goes, merged into
    /// the previous one (re-enabled in the same transaction) for an
    /// incremental, or both go with a warning if that fails.
    fn release(&mut self, clock: &Clock) {
        let had = !self.views.is_empty() || self.nbd_started;
        let ok = self.ok();
        let views = std::mem::take(&mut self.views);
        self.report.cbw_bytes = views.iter().map(View::cbw_bytes).sum();
        let disabled = std::mem::take(&mut self.prev_disabled);
        if let Some(q) = self.qmp.as_mut() {
            let merge = !ok && self.prev.is_some();
            for v in views.iter().rev() {
                if let Err(e) = fleece::close_view(q, v, !ok && !merge) {
                    tracing::warn!(vm = %self.spec.name, node = %v.node, "closing a view: {e}");
                }
            }
            if ok {
                // Older backup-vms bitmaps (the base's) are done with.
                let nodes = fleece::nodes(q).unwrap_or_default();
                for v in &views {
                    let Some(n) = nodes.iter().find(|n| n.name == v.node) else {
                        continue;
                    };
                    for b in (n.bitmaps.iter().map(|b| &b.name))
                        .filter(|b| b.starts_with("rfs-") && **b != v.bitmap)
                    {
                        if let Err(e) = fleece::bitmap_op(q, "remove", &v.node, b) {
                            tracing::warn!(vm = %self.spec.name, "removing dirty bitmap {b}: {e}");
                        }
                    }
                }
            } else if let Some(p) = &self.prev {
                // The base's bitmap must cover everything since the base.
                for (i, prev) in p.bitmaps.iter().enumerate().take(disabled) {
                    let node = &self.disks[i].node_name;
                    let new = views.get(i).map(|v| v.bitmap.as_str());
                    let Err(e) = fleece::bitmap_hand_back(q, node, prev, new) else {
                        continue;
                    };
                    // A disabled bitmap left behind would vouch for less
                    // than it claims: without it the next one reads in full.
                    for b in std::iter::once(prev.as_str()).chain(new) {
                        if let Err(e) = fleece::bitmap_op(q, "remove", node, b) {
                            tracing::warn!(vm = %self.spec.name, "removing dirty bitmap {b}: {e}");
                        }
                    }
                    let w = format!(
                        "disk {i}: the failed run's dirty bitmap could not be handed back \
                         to {prev} ({e}); the next incremental reads in full"
                    );
                    tracing::warn!(vm = %self.spec.name, "{w}");
                    self.report.warnings.push(w);
                }
                for v in views.iter().skip(disabled) {
                    let _ = fleece::bitmap_op(q, "remove", &v.node, &v.bitmap);
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
        self.run_lock = None;
        self.vm_lock = None;
        if had {
            clock.event(&mut self.report, "view_released", None);
        }
    }

    fn freeze(&mut self, clock: &Clock, timeout: Duration) {
        let Some(path) = self.spec.agent.clone() else {
            return;
        };
        match GuestAgent::connect_and_freeze(&path, timeout, FREEZE_TIMEOUT) {
            Ok((a, _)) => {
                self.agent = Some(a);
                self.report.consistency = "application-consistent".into();
                clock.event(&mut self.report, "frozen", None);
            }
            // A guest possibly left frozen takes no part: its error says so.
            Err(e) if e.may_be_frozen => self.fail(clock, e.error),
            Err(e) => {
                tracing::warn!(vm = %self.spec.name, "no filesystem freeze, the backup is crash-consistent: {e}");
                self.report.consistency = format!("crash-consistent: guest agent: {e}");
            }
        }
    }

    fn stop(&mut self, clock: &Clock) -> Result<()> {
        let q = self.q()?;
        let running = q.status()?.running;
        // Recorded before the stop goes out: QEMU answers it only after
        // draining the guest's I/O (which can outlast the QMP timeout), so
        // a stop that took effect may look failed, and must still be
        // followed by a `cont`.
        self.was_running = running;
        self.stopped_at = Some(Instant::now());
        self.q()?.stop().map_err(|e| e.context("stopping the VM"))?;
        clock.event(&mut self.report, "stopped", None);
        Ok(())
    }

    fn open_views(&mut self, clock: &Clock, run: &str, chunk_size: u32) -> Result<()> {
        let dir = self.dir.as_ref().map(|d| d.path().to_path_buf());
        let dir = dir.ok_or_else(|| Error::invalid("no temporary directory"))?;
        for i in 0..self.disks.len() {
            let tag = format!("{run}-{}-{i}", self.index);
            let disk = self.disks[i].clone();
            let prev = self.prev.as_ref().map(|p| p.bitmaps[i].clone());
            if let Some(b) = &prev {
                // It stops counting at the snapshot; the new one starts.
                fleece::bitmap_op(self.q()?, "disable", &disk.node_name, b)
                    .map_err(|e| e.context(format!("disk {i}: disable dirty bitmap {b}")))?;
                self.prev_disabled = i + 1;
            }
            let v =
                fleece::open_view_with(self.q()?, &disk, &tag, &dir, chunk_size, prev.as_deref())
                    .map_err(|e| e.context(format!("disk {i} ({})", disk.qdev)))?;
            self.views.push(v);
            clock.event(&mut self.report, "view_opened", Some(i));
        }
        Ok(())
    }

    /// Resumes the VM if it was running before the stop (also after a
    /// stop that seemed to fail: `cont` on a running VM changes nothing).
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
        r.map_err(|e| {
            e.context("resuming the VM failed, THE VM IS PAUSED (resume it with QMP cont)")
        })
    }

    /// [`Self::resume`]; its error fails the VM ([`Self::fail_or_add`]).
    fn resume_or_fail(&mut self, clock: &Clock) {
        let Err(e) = self.resume(clock) else {
            return;
        };
        self.fail_or_add(clock, e);
    }

    /// Thaws the guest's filesystems, retrying on a new connection; a thaw
    /// that still fails fails the VM ([`Self::fail_or_add`]): a guest left
    /// frozen must not pass for a successful backup.
    fn thaw(&mut self, clock: &Clock, timeout: Duration) {
        let Some(a) = self.agent.take() else {
            return;
        };
        let path = self.spec.agent.clone().unwrap_or_default();
        let Err(e) = a.thaw_or_retry(&path, timeout) else {
            clock.event(&mut self.report, "thawed", None);
            return;
        };
        let e = e.context(
            "THE GUEST MAY STILL BE FROZEN: thawing its filesystems failed \
             (thaw them with guest-fsfreeze-thaw through its agent)",
        );
        self.fail_or_add(clock, e);
    }

    /// Step 3: reads every view, publishes the manifest, releases.
    fn read(
        &mut self,
        clock: &Clock,
        repo: &Arc<Repository>,
        lock: &WriterLock,
        opts: &Options,
        snapshot: &str,
        stop: &AtomicBool,
    ) {
        clock.event(&mut self.report, "read_started", None);
        let t0 = Instant::now();
        match self.store(repo, lock, opts, snapshot, stop) {
            Ok(id) => {
                self.report.backup = Some(id);
                self.report.read_ms = t0.elapsed().as_secs_f64() * 1000.0;
                clock.event(&mut self.report, "manifest_written", None);
                self.release(clock);
            }
            Err(e) => {
                // Say so when the VM is gone, not just what broke first.
                let e = match self.q().and_then(|q| q.status()) {
                    // QEMU breaks a view's snapshot (every read fails) when
                    // its copy-before-write store cannot take the old data
                    // a guest write displaces, rather than fail the write.
                    Ok(_) if e.to_string().contains(crate::qemu::nbd::SERVER_FAILED) => e.context(
                        "QEMU could not read the snapshot (broken if a copy-before-write store \
                         failed: is the host's temporary directory full or failing?)",
                    ),
                    Ok(_) => e,
                    Err(_) => e.context("the VM's QEMU is gone"),
                };
                self.fail(clock, e)
            }
        }
    }

    fn store(
        &mut self,
        repo: &Arc<Repository>,
        lock: &WriterLock,
        opts: &Options,
        snapshot: &str,
        stop: &AtomicBool,
    ) -> Result<String> {
        let socket = self.socket();
        let mut disks = vec![];
        for (i, v) in self.views.iter().enumerate() {
            let base = self
                .prev
                .as_ref()
                .map(|p| (p.bitmaps[i].as_str(), &p.manifest.disks[i]));
            let export = |name: String| Export {
                server: NbdServer::Unix(socket.clone()),
                name,
            };
            let base = base.map(|(bitmap, disk)| Base {
                map: export(v.map_export()),
                bitmap,
                disk,
            });
            let r = read_export_until(
                repo,
                &export(v.export.clone()),
                i,
                opts.chunk_size,
                base,
                stop,
            )
            .map_err(|e| e.context(format!("disk {i}")))?;
            self.report.bytes_read += r.read_bytes;
            self.report.chunks_read += r.chunks_read;
            self.report.new_bytes += r.disk.new_bytes;
            disks.push(r.disk);
        }
        let mut config = default_config(&self.spec.name, disks.len());
        config["backup_vms"] = serde_json::json!({
            "snapshot_time": snapshot,
            "consistency": self.report.consistency,
            "devices": self.disks.iter().map(|d| &d.qdev).collect::<Vec<_>>(),
            "mode": self.report.mode,
            "base": self.report.base,
            "qmp": crate::api::pathauth::shown(&self.spec.qmp),
            // The next incremental's maps, kept in QEMU.
            "bitmaps": self.views.iter()
                .map(|v| serde_json::json!({"node": v.node, "bitmap": v.bitmap}))
                .collect::<Vec<_>>(),
        });
        Ok(publish_manifest(repo, lock, &self.spec.name, config, disks)?.id)
    }
}

/// The dirty bitmap names a backup-vms manifest records per disk (its
/// since-last-backup maps, kept in QEMU).
pub fn recorded_bitmaps(m: &Manifest) -> std::result::Result<Vec<String>, String> {
    let recorded = m.config["backup_vms"]["bitmaps"]
        .as_array()
        .ok_or_else(|| format!("backup {} records no dirty bitmap", m.id))?;
    Ok(recorded
        .iter()
        .map(|r| r["bitmap"].as_str().unwrap_or("").to_string())
        .collect())
}

/// The newest backup of `vm` as an incremental's base, with its recorded
/// since-backup bitmap per disk, if [`check_base`] accepts it; otherwise
/// why not.
pub fn find_base(
    q: &mut Qmp,
    repo: &Repository,
    vm: &str,
    disks: &[BlockDevice],
    chunk_size: u32,
) -> std::result::Result<(Manifest, Vec<String>), String> {
    let ids = repo
        .backup_ids(vm)
        .map_err(|e| format!("listing previous backups: {e}"))?;
    let id = ids.last().ok_or("no previous backup")?;
    let m = repo.manifest(vm, id).map_err(|e| e.to_string())?;
    let bitmaps = recorded_bitmaps(&m)?;
    check_base(
        q,
        disks,
        &format!("backup {id}"),
        &m.disks,
        &bitmaps,
        chunk_size,
    )?;
    Ok((m, bitmaps))
}

/// A base (`what` names it) is usable for `disks` if it has one disk and
/// one bitmap per disk, each disk the same size and chunk size, and QEMU
/// still has each bitmap on the disk's node, recording.
pub fn check_base(
    q: &mut Qmp,
    disks: &[BlockDevice],
    what: &str,
    base: &[DiskManifest],
    bitmaps: &[String],
    chunk_size: u32,
) -> std::result::Result<(), String> {
    if bitmaps.len() != disks.len() || base.len() != disks.len() {
        return Err(format!(
            "{what} has {} disks, the VM {}",
            base.len(),
            disks.len()
        ));
    }
    let nodes = fleece::nodes(q).map_err(|e| format!("listing QEMU's block nodes: {e}"))?;
    for (i, ((bitmap, dm), disk)) in bitmaps.iter().zip(base).zip(disks).enumerate() {
        // Bitmap names are unique to a run: found on the disk's node, it
        // is the one that run left (node names may change).
        let node = &disk.node_name;
        let Some(n) = nodes.iter().find(|n| &n.name == node) else {
            return Err(format!("disk {i}: QEMU has no node {node}"));
        };
        if dm.size != n.size || dm.chunk_size != chunk_size {
            return Err(format!(
                "disk {i}: geometry changed since {what} (size {} -> {}, chunk size {} -> {chunk_size})",
                dm.size, n.size, dm.chunk_size
            ));
        }
        match n.bitmap(bitmap) {
            None => {
                return Err(format!(
                    "disk {i}: QEMU no longer has dirty bitmap {bitmap} of {what} (restarted?)"
                ))
            }
            // Left disabled (a failed hand-back, a lost reply, a kill
            // after the snapshot): it misses every write since.
            Some(b) if !b.recording => {
                return Err(format!(
                    "disk {i}: dirty bitmap {bitmap} of {what} no longer records writes"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
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
    backup_vms_until(repo, opts, &AtomicBool::new(false))
}

/// [`backup_vms`] that a set `stop` (a signal) ends early through the
/// normal cleanup: before the snapshot nothing is paused; once VMs are
/// stopped, the snapshot step completes (views opened, every VM resumed
/// and thawed) and then every VM not yet backed up fails with
/// [`INTERRUPTED`], its views closed; a read under way ends at its next
/// chunk.
pub fn backup_vms_until(
    repo: &Arc<Repository>,
    opts: &Options,
    stop: &AtomicBool,
) -> Result<Summary> {
    check(opts)?;
    let interrupted = || stop.load(Ordering::SeqCst);
    let interrupt = |vm: &mut Vm, clock: &Clock| {
        if vm.ok() {
            vm.fail(clock, Error::new(crate::error::ErrorKind::Io, INTERRUPTED));
        }
    };
    // Held from before any base is read until the last manifest: no
    // collection sweeps meanwhile (`repo::locks`).
    let names: Vec<&str> = opts.vms.iter().map(|v| v.name.as_str()).collect();
    let lock = WriterLock::acquire(repo, &names.join(","))?;
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
        } else if let Some(b) = vm.spec.base.clone() {
            if let Err(e) = vm.use_base(&b, opts.chunk_size) {
                vm.fail(&clock, e);
            }
        } else if opts.incremental {
            vm.plan(repo, opts.chunk_size);
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
    let mut by_rate = order_by_rate(&rates);
    if opts.order == ReadOrder::IdleFirst {
        by_rate.reverse();
    }
    let order: Vec<usize> = by_rate.into_iter().map(|k| live[k]).collect();
    for (pos, &i) in order.iter().enumerate() {
        vms[i].report.order = Some(pos + 1);
    }

    if interrupted() {
        for vm in &mut vms {
            interrupt(vm, &clock);
        }
    }
    let order: Vec<usize> = order.into_iter().filter(|&i| vms[i].ok()).collect();

    // 2. The common snapshot time.
    for &i in &order {
        vms[i].freeze(&clock, opts.agent_timeout);
    }
    for &i in &order {
        if !vms[i].ok() {
            continue; // failed at its freeze: not stopped
        }
        if let Err(e) = vms[i].stop(&clock) {
            vms[i].fail(&clock, e);
            // Not paused for the others' views: it takes no part.
            vms[i].resume_or_fail(&clock);
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
        vms[i].resume_or_fail(&clock);
    }
    for &i in &order {
        vms[i].thaw(&clock, opts.agent_timeout);
    }
    if interrupted() {
        for &i in &order {
            interrupt(&mut vms[i], &clock);
        }
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
                if interrupted() {
                    interrupt(&mut vm, &clock);
                    continue;
                }
                vm.read(&clock, repo, &lock, opts, &snap, stop);
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
pub(crate) mod tests;
