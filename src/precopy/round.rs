//! One VM's pre-copy job against QEMU: start or resume a cycle, rounds,
//! and the final backup (see [`super`] for the design).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::cycle::{
    bitmaps_of, forget_missing, named_nodes, new_cycle, parse_round, remove_bitmaps,
    remove_exports, resumable,
};
use super::direct::{self, DirectFile};
use super::priority;
use super::state::{State, StateDir};
use super::throttle::{Gate, Throttle, PAUSE_SLICE};
use super::{Control, End, FinalReport, Options, RoundReport};
use crate::error::{Error, Result};
use crate::qemu::fleece;
use crate::qemu::nbd::{dirty_bitmap_context, NbdClient, CONTEXT_ALLOCATION};
use crate::qemu::qmp::{BlockDevice, Qmp};
use crate::repo::locks::WriterLock;
use crate::repo::manifest::{Manifest, MANIFEST_FORMAT};
use crate::repo::writer::{store_chunks, StoredChunks};
use crate::repo::Repository;
use crate::vmbackup::{self, chunks_with_data, dirty_chunks, GivenBase, VmSpec};

/// Chunks stored between two looks at the clock (and the stop flag).
const BATCH: usize = 32;
/// Every bitmap name of every cycle starts so.
pub(super) const PREFIX: &str = "rfs-pc-";

pub(super) fn bitmap_name(cycle: &str, round: u64) -> String {
    format!("{PREFIX}{cycle}-{round}")
}

fn export_name(cycle: &str, disk: usize) -> String {
    format!("{PREFIX}{cycle}-d{disk}")
}

/// The wall clock a round compares with the job's end (tests step it).
pub(super) type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

pub(super) struct Job {
    repo: Arc<Repository>,
    /// Held for the job's life: `gc` sweeps nothing meanwhile, so the
    /// chunks the state records stay (see `repo::locks`).
    lock: Arc<WriterLock>,
    /// This QEMU process's job lock while we hold its QMP connection (a
    /// round replaces QEMU's NBD server); the final backup takes its own.
    vm_lock: Option<crate::qemu::VmLock>,
    vm: String,
    qmp: PathBuf,
    q: Option<Qmp>,
    disks: Vec<BlockDevice>,
    dir: StateDir,
    state: State,
    /// The newest round bitmap (the one recording).
    hi: u64,
    /// Holds QEMU's NBD server socket.
    tmp: tempfile::TempDir,
    nbd_started: bool,
    throttle: Mutex<Throttle>,
    clock: Clock,
    pub(super) start: String,
    pub(super) warnings: Vec<String>,
}

impl Job {
    /// Connects, removes leftovers, and resumes the saved cycle if QEMU
    /// still has what it needs, or starts a new one (saying why).
    pub(super) fn start(repo: Arc<Repository>, opts: &Options, dir: StateDir) -> Result<Job> {
        let lock = Arc::new(WriterLock::acquire(&repo, &opts.vm)?);
        let mut q = Qmp::connect(&opts.qmp)?;
        let vm_lock = crate::qemu::VmLock::try_take(&q)?;
        let disks = q.block_devices()?;
        if disks.is_empty() {
            return Err(Error::invalid("QEMU reports no disk to pre-copy"));
        }
        remove_exports(&mut q)?;
        let mut warnings = vec![];
        let resumed = match dir.load() {
            Ok(Some(s)) => match resumable(&mut q, &s, &disks, &repo, opts) {
                Ok(hi) => Some((s, hi)),
                Err(why) => {
                    warnings.push(format!("pre-copy state lost: {why}"));
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                warnings.push(format!("pre-copy state lost: {e}"));
                None
            }
        };
        // Its owner named, so that once a kill leaves it, the next run
        // (this sweep, or `boot`'s) removes it.
        crate::boot::remove_stale_scratch(&std::env::temp_dir());
        let tmp = crate::boot::scratch_dir("precopy")?;
        let (mut state, hi, start) = match resumed {
            Some((s, hi)) => {
                let start = format!("resumed cycle {} at round {}", s.cycle, hi);
                (s, hi, start)
            }
            None => new_cycle(&mut q, &repo, &lock, opts, &disks, &dir)?,
        };
        // Between two runs no lock kept `gc` away: a recorded chunk that is
        // gone is read again.
        let gone = forget_missing(&repo, &mut state)?;
        if gone > 0 {
            warnings.push(format!(
                "{gone} recorded chunks are gone from the repository (garbage collected?): they are read again"
            ));
            dir.save(&state)?;
        }
        for w in &warnings {
            tracing::warn!(vm = %opts.vm, "{w}; {start}");
        }
        remove_bitmaps(&mut q, |name| {
            name.starts_with(PREFIX) && parse_round(name, &state.cycle).is_none()
        })?;
        let mut job = Job {
            repo,
            lock,
            vm_lock,
            vm: opts.vm.clone(),
            qmp: opts.qmp.clone(),
            q: Some(q),
            disks,
            dir,
            state,
            hi,
            tmp,
            nbd_started: false,
            throttle: Mutex::new(Throttle::new(opts.load_limit, agent(opts))),
            clock: Arc::new(SystemTime::now),
            start,
            warnings,
        };
        job.start_nbd()?;
        Ok(job)
    }

    /// Replaces the wall clock the rounds' end checks read.
    #[cfg(test)]
    pub(super) fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    pub(super) fn cycle(&self) -> &str {
        &self.state.cycle
    }

    /// The bitmap the next round starts.
    pub(super) fn next_round(&self) -> u64 {
        self.hi + 1
    }

    fn q(&mut self) -> Result<&mut Qmp> {
        self.q
            .as_mut()
            .ok_or_else(|| Error::invalid("no QMP connection"))
    }

    /// The directory of QEMU's NBD server socket.
    #[cfg(test)]
    pub(super) fn scratch(&self) -> &std::path::Path {
        self.tmp.path()
    }

    fn socket(&self) -> PathBuf {
        self.tmp.path().join("nbd.sock")
    }

    /// QEMU's NBD server on our socket; one a killed run left is replaced.
    fn start_nbd(&mut self) -> Result<()> {
        let sock = self.socket();
        let q = self.q()?;
        if let Err(e) = fleece::start_nbd_server(q, &sock) {
            tracing::info!("restarting QEMU's NBD server ({e})");
            fleece::stop_nbd_server(q)?;
            fleece::start_nbd_server(q, &sock)?;
        }
        self.nbd_started = true;
        Ok(())
    }

    /// One round (see the module docs). A stop ends it at the next
    /// checkpoint, incomplete; its progress stays recorded. `gated`: the
    /// guest's load holds it back (not once the backup is due).
    pub(super) fn round(
        &mut self,
        opts: &Options,
        ctl: &Control,
        gated: bool,
    ) -> Result<RoundReport> {
        let t0 = Instant::now();
        let (old, new) = (self.hi, self.hi + 1);
        let mut actions = vec![];
        for d in &self.disks {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": d.node_name, "name": bitmap_name(&self.state.cycle, new),
                "granularity": self.state.chunk_size}}));
            actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
                "node": d.node_name, "name": bitmap_name(&self.state.cycle, old)}}));
        }
        self.q()?
            .execute("transaction", Some(json!({ "actions": actions })))
            .map_err(|e| e.context("starting a round"))?;
        self.hi = new;
        let mut p = Pass {
            opts,
            ctl,
            pace: Pace::new(opts.max_rate),
            rep: RoundReport {
                round: new,
                ..Default::default()
            },
            last_save: Instant::now(),
            gated,
            go: GoOn::new(ctl, opts.end, gated, self.clock.clone()),
        };
        let held0 = self.throttle().held;
        for i in 0..self.disks.len() {
            let _span =
                tracing::info_span!("precopy", vm = %self.vm, disk = i, round = new).entered();
            self.read_disk(i, old, &mut p)
                .map_err(|e| e.context(format!("disk {i}")))?;
            if p.go.cut() {
                self.dir.save(&self.state)?;
                p.rep.checkpoints += 1;
                p.rep.held_ms = (self.throttle().held - held0).as_secs_f64() * 1000.0;
                p.rep.ms = t0.elapsed().as_secs_f64() * 1000.0;
                return Ok(p.rep);
            }
        }
        let mut rep = p.rep;
        rep.held_ms = (self.throttle().held - held0).as_secs_f64() * 1000.0;
        // Every chunk is now proven by the new bitmap alone.
        for d in &mut self.state.disks {
            d.since.iter_mut().for_each(|s| *s = Some(new));
        }
        self.state.rounds += 1;
        self.lock.check_fresh()?;
        self.dir.save(&self.state)?;
        rep.checkpoints += 1;
        let cycle = self.state.cycle.clone();
        let q = self.q()?;
        remove_bitmaps(q, |name| parse_round(name, &cycle).is_some_and(|r| r < new))?;
        rep.ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(vm = %self.vm, round = new, read = rep.chunks_read, "pre-copy round done");
        Ok(rep)
    }

    fn throttle(&self) -> std::sync::MutexGuard<'_, Throttle> {
        self.throttle.lock().expect("throttle lock")
    }

    /// Removes the latency histograms the p99 limit set on the VM's drives.
    fn release_tail(&mut self) {
        if let Some(q) = self.q.as_mut() {
            self.throttle.lock().expect("throttle lock").release_tail(q);
        }
    }

    /// Between rounds: samples the guest's load for the status.
    pub(super) fn sample_idle(&mut self, ctl: &Control) {
        let Some(q) = self.q.as_mut() else { return };
        let mut t = self.throttle.lock().expect("throttle lock");
        if let Err(e) = t.sample(q) {
            tracing::warn!(vm = %self.vm, "sampling the guest's load: {e}");
        }
        ctl.set(|s| s.load = t.load);
    }

    /// Reads disk `i`'s chunks that the frozen bitmaps (up to `old`) mark
    /// since their recorded round, or that were never read.
    fn read_disk(&mut self, i: usize, old: u64, p: &mut Pass) -> Result<()> {
        let cycle = self.state.cycle.clone();
        let node = self.disks[i].node_name.clone();
        let lo = self.state.disks[i].since.iter().flatten().min().copied();
        let frozen: Vec<u64> = lo.map(|lo| (lo..=old).collect()).unwrap_or_default();
        let names: Vec<String> = frozen.iter().map(|&r| bitmap_name(&cycle, r)).collect();
        let export = export_name(&cycle, i);
        let file = self.direct_file(i);
        p.rep.read_from.push(match &file {
            Ok(f) => f.path().display().to_string(),
            Err(why) => {
                tracing::info!(vm = %self.vm, disk = i, "reading over QEMU's NBD server: {why}");
                format!("NBD: {why}")
            }
        });
        self.q()?.execute(
            "block-export-add",
            Some(json!({"type": "nbd", "id": export, "node-name": node,
                        "name": export, "writable": false, "bitmaps": names})),
        )?;
        let r = self.read_export(i, &export, &frozen, file.ok(), p);
        let q = self.q()?;
        let del = fleece::delete_export(q, &export);
        r?;
        del.map(drop)
    }

    /// Disk `i`'s image file, if this round may read it directly (see
    /// [`direct`]), or why not.
    fn direct_file(&mut self, i: usize) -> std::result::Result<DirectFile, String> {
        let node = self.disks[i].node_name.clone();
        let q = self.q().map_err(|e| e.to_string())?;
        let nodes = named_nodes(q).map_err(|e| e.to_string())?;
        DirectFile::open(&direct::raw_file(&nodes, &node)?, q.peer_pid())
    }

    /// Reads what the frozen bitmaps mark on export `export` of disk `i`
    /// (the data from `file` where given, else over NBD).
    fn read_export(
        &mut self,
        i: usize,
        export: &str,
        frozen: &[u64],
        file: Option<DirectFile>,
        p: &mut Pass,
    ) -> Result<()> {
        let rep = &mut p.rep;
        let cs = self.state.chunk_size;
        let cycle = self.state.cycle.clone();
        let ctxs: Vec<String> = (frozen.iter())
            .map(|&r| dirty_bitmap_context(&bitmap_name(&cycle, r)))
            .collect();
        let mut want: Vec<&str> = vec![CONTEXT_ALLOCATION];
        want.extend(ctxs.iter().map(String::as_str));
        let mut c = NbdClient::connect_unix(self.socket(), export, &want)?;
        let size = c.size();
        let d = &self.state.disks[i];
        if size != d.size {
            return Err(Error::invalid(format!(
                "the disk is {size} bytes, the pre-copy state says {}",
                d.size
            )));
        }
        // The newest frozen bitmap marking each chunk.
        let mut mark: BTreeMap<u64, u64> = BTreeMap::new();
        for (&r, ctx) in frozen.iter().zip(&ctxs) {
            for k in dirty_chunks(&c.block_status(ctx, 0, size)?, cs) {
                mark.insert(k, r);
            }
        }
        let data: std::collections::HashSet<u64> =
            chunks_with_data(&c.block_status(CONTEXT_ALLOCATION, 0, size)?, cs)
                .into_iter()
                .collect();
        // The oldest proof any chunk has (none: some chunk is unknown); a
        // chunk proven later was recorded by an interrupted round.
        let oldest = match d.unknown() {
            0 => d.since.iter().flatten().min().copied(),
            _ => None,
        };
        let mut todo = vec![];
        for (k, since) in d.since.iter().enumerate() {
            let k = k as u64;
            let stale = match (since, mark.get(&k)) {
                (None, _) => true,
                (Some(s), Some(m)) => m >= s,
                (Some(_), None) => false,
            };
            if stale {
                rep.dirty_chunks += 1;
                todo.push(k);
            } else if oldest.is_none_or(|o| since.is_some_and(|s| s > o)) {
                rep.already_recorded += 1;
            }
        }
        let new = self.hi;
        let disk = &mut self.state.disks[i];
        // A marked chunk that reads as zeros now needs no read.
        todo.retain(|&k| {
            if data.contains(&k) {
                return true;
            }
            disk.chunks[k as usize] = None;
            disk.since[k as usize] = Some(new);
            rep.zero_chunks += 1;
            false
        });
        // The QMP connection serves the load samples while reading.
        let q = Mutex::new(
            self.q
                .take()
                .ok_or_else(|| Error::invalid("no QMP connection"))?,
        );
        let c = Mutex::new(c);
        let (opts, ctl, gated, pace) = (p.opts, p.ctl, p.gated, &p.pace);
        let go = &p.go;
        let go_on = || go.go_on();
        let throttle = &self.throttle;
        // When the last read (and its throttled pause) ended.
        let last_end: Mutex<Option<Instant>> = Mutex::new(None);
        // Set when a read gives up because the round is cut short.
        let cut = AtomicBool::new(false);
        let read = |k: u64, buf: &mut [u8]| {
            let entry = Instant::now();
            if gated {
                let mut t = throttle.lock().expect("throttle lock");
                // Published at each sample, so status says "halted" while held.
                t.before_read_watched(&mut *q.lock().expect("QMP lock"), &go_on, &mut |t| {
                    publish(ctl, t)
                })?;
            }
            pace.wait(buf.len() as u64, &go_on);
            // Cut short while held back or paced: the rest of the batch must
            // not follow at full speed (its chunks are read next round).
            if !go_on() {
                cut.store(true, Ordering::SeqCst);
                return Err(Error::busy("pre-copy round cut short"));
            }
            let t0 = Instant::now();
            match &file {
                Some(f) => f.read(k * cs as u64, buf)?,
                None => c
                    .lock()
                    .expect("NBD client lock")
                    .read(k * cs as u64, buf)?,
            }
            if gated {
                let mut last = last_end.lock().expect("last read lock");
                let cost = t0.elapsed() + chunk_wait(*last, entry);
                throttle
                    .lock()
                    .expect("throttle lock")
                    .after_read(cost, buf.len() as u64, &go_on);
                *last = Some(Instant::now());
            }
            Ok(())
        };
        // Under a load limit the work yields the CPU to the guest and QEMU.
        let idle = gated && opts.load_limit.is_some();
        let mut r = Ok(());
        for batch in todo.chunks(BATCH) {
            let repo = &self.repo;
            let stored = priority::run(idle, || {
                store_chunks(repo, size, cs, batch.iter().copied(), &read, &|_| {})
            });
            let st = match stored {
                Ok(st) => st,
                // The cut's own error; a real one that came with it is kept.
                Err(e)
                    if cut.load(Ordering::SeqCst) && e.kind() == crate::error::ErrorKind::Busy =>
                {
                    StoredChunks::default()
                }
                Err(e) => {
                    r = Err(e);
                    break;
                }
            };
            let disk = &mut self.state.disks[i];
            for (k, dg) in &st.chunks {
                disk.chunks[*k as usize] = *dg;
                disk.since[*k as usize] = Some(new);
            }
            rep.chunks_read += st.chunks.len() as u64;
            rep.bytes_read += st.read_bytes;
            rep.new_bytes += st.new_bytes;
            let short = !go_on();
            if p.last_save.elapsed() >= opts.checkpoint || short {
                if let Err(e) = self
                    .lock
                    .check_fresh()
                    .and_then(|()| self.dir.save(&self.state))
                {
                    r = Err(e);
                    break;
                }
                rep.checkpoints += 1;
                p.last_save = Instant::now();
            }
            if short {
                break;
            }
        }
        self.q = Some(q.into_inner().expect("QMP lock"));
        let _ = c.into_inner().map(|c| c.disconnect());
        r
    }

    /// The scheduled backup: vmbackup with the recorded chunks and the
    /// newest round bitmap as its base, after a round if the last one did
    /// not complete; a plain incremental (or full) backup, said in the
    /// report, if pre-copy has nothing usable. None if stopped before the
    /// backup started.
    pub(super) fn final_backup(
        &mut self,
        opts: &Options,
        ctl: &Control,
    ) -> Result<Option<FinalReport>> {
        let mut fallback = None;
        if !self.state.clean_at(self.hi) {
            // Due now: read what is left whatever the guest's load.
            if let Err(e) = self.round(opts, ctl, false) {
                fallback = Some(format!("the last pre-copy round failed: {e}"));
            }
        }
        // A stop skips the backup, as one a moment earlier would have: the
        // state stays for the next run. Otherwise a stop that cut this
        // round short would start a plain incremental that nothing stops.
        if ctl.stopping() {
            return Ok(None);
        }
        if fallback.is_none() && !self.state.clean_at(self.hi) {
            fallback = Some("the last pre-copy round did not complete".into());
        }
        let since_backup_chunks = self.since_backup_chunks();
        let given = match fallback {
            Some(_) => None,
            None => match self.lock.check_fresh().and_then(|()| self.given_base()) {
                Ok(g) => Some(g),
                Err(e) => {
                    fallback = Some(format!("the pre-copied chunks cannot be used: {e}"));
                    None
                }
            },
        };
        // vmbackup opens its own QMP connection, NBD server and agent
        // connection.
        self.throttle().release_agent();
        self.release_tail();
        if self.nbd_started {
            fleece::stop_nbd_server(self.q()?)?;
            self.nbd_started = false;
        }
        self.q = None;
        self.vm_lock = None;
        let vopts = vmbackup::Options {
            vms: vec![VmSpec {
                name: self.vm.clone(),
                qmp: self.qmp.clone(),
                agent: opts.agent.clone(),
                base: given,
                new_identity: false,
            }],
            jobs: 1,
            chunk_size: self.state.chunk_size,
            rate_window: Duration::ZERO,
            agent_timeout: crate::qemu::guest_agent::SYNC_TIMEOUT,
            incremental: true,
            order: vmbackup::ReadOrder::BusiestFirst,
            hook: opts.hook.clone(),
        };
        let summary = vmbackup::backup_vms(&self.repo, &vopts)?;
        let vm = summary.vms.into_iter().next().expect("one VM");
        if let Some(e) = &vm.error {
            return Err(Error::invalid(format!("the scheduled backup failed: {e}")));
        }
        if fallback.is_none() {
            // Its bitmaps went with the backup (vmbackup keeps only its own).
            self.dir.remove()?;
        }
        Ok(Some(FinalReport {
            backup: vm.backup.clone(),
            mode: vm.mode.clone(),
            fallback,
            chunks_read: vm.chunks_read,
            since_backup_chunks,
            vm,
        }))
    }

    /// The recorded chunks and the newest round bitmap, as vmbackup's base.
    fn given_base(&self) -> Result<GivenBase> {
        let mut disks = self.state.disk_manifests();
        for d in &mut disks {
            let distinct: std::collections::HashSet<_> = d.chunks.digests().collect();
            for dg in distinct {
                d.stored_bytes += self.repo.chunk_stored_size(dg)?.ok_or_else(|| {
                    Error::not_found(format!("pre-copied chunk {dg} is gone from the repository"))
                })?;
            }
        }
        let now = crate::util::now_unix();
        Ok(GivenBase {
            manifest: Manifest {
                format: MANIFEST_FORMAT,
                vm: self.vm.clone(),
                id: format!("precopy-{}", self.state.cycle),
                created: crate::util::rfc3339(now),
                created_unix: now,
                config: Value::Null,
                disks,
            },
            bitmaps: vec![bitmap_name(&self.state.cycle, self.hi); self.disks.len()],
            mode: "precopy".into(),
            base: self.state.base.clone(),
            vouched_by: Some(self.lock.clone()),
        })
    }

    /// Chunks the base's since-backup bitmaps mark now (what a plain
    /// incremental would read), if the cycle has a base still in QEMU.
    fn since_backup_chunks(&mut self) -> Option<u64> {
        let base = self.state.base.clone()?;
        let m = self.repo.manifest(&self.vm, &base).ok()?;
        let names = vmbackup::recorded_bitmaps(&m).ok()?;
        let cs = u64::from(self.state.chunk_size);
        let nodes: Vec<String> = self.disks.iter().map(|d| d.node_name.clone()).collect();
        let all = named_nodes(self.q().ok()?).ok()?;
        let mut n = 0;
        for (node, name) in nodes.iter().zip(&names) {
            let b = bitmaps_of(&all, node).into_iter().find(|b| b.0 == *name)?;
            n += b.2.div_ceil(cs);
        }
        Some(n)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.release_tail();
        if self.nbd_started {
            if let Some(q) = self.q.as_mut() {
                let _ = fleece::stop_nbd_server(q);
            }
        }
    }
}

/// One round's reading, and what holds it back.
struct Pass<'a> {
    opts: &'a Options,
    ctl: &'a Control,
    pace: Pace,
    rep: RoundReport,
    last_save: Instant,
    gated: bool,
    go: GoOn<'a>,
}

/// Whether a round goes on: not after a stop, nor, while the guest's load
/// may hold it back, once the job's end (the backup's time, or --until)
/// has come. Latched: once it said no, the round is cut short for good. A
/// cut read's whole batch is dropped, so a round that went on after a
/// wall clock stepped back to before the end would count as complete
/// while chunks it never read keep ids the new bitmap does not prove.
struct GoOn<'a> {
    ctl: &'a Control,
    /// The end, where it cuts the round short (gated rounds).
    end: Option<SystemTime>,
    clock: Clock,
    cut: AtomicBool,
}

impl<'a> GoOn<'a> {
    fn new(ctl: &'a Control, end: End, gated: bool, clock: Clock) -> GoOn<'a> {
        let end = match end {
            End::BackupAt(t) | End::Until(t) if gated => Some(t),
            _ => None,
        };
        GoOn {
            ctl,
            end,
            clock,
            cut: AtomicBool::new(false),
        }
    }

    fn go_on(&self) -> bool {
        if self.cut.load(Ordering::SeqCst) {
            return false;
        }
        let stop = self.ctl.stopping() || self.end.is_some_and(|e| (self.clock)() >= e);
        if stop {
            self.cut.store(true, Ordering::SeqCst);
        }
        !stop
    }

    /// Whether the round was cut short (as decided, never asked again).
    fn cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

/// What a chunk cost beyond its read: the time from the end of the last
/// read (`last`) to this one's call (`entry`), in which the reader waited
/// for the workers hashing, compressing and storing (they hold it back
/// when they fall behind). The throttle leaves the guest a multiple of
/// the whole cost, not of the read alone: a read from the image file is
/// far cheaper than storing it. Gaps of a second or more are pauses of
/// another kind (a checkpoint, a halt), not the chunk's.
pub(super) fn chunk_wait(last: Option<Instant>, entry: Instant) -> Duration {
    let gap = last.map(|l| entry.saturating_duration_since(l));
    gap.filter(|g| *g < Duration::from_secs(1))
        .unwrap_or_default()
}

/// The throttle's state in the job's status.
fn publish(ctl: &Control, t: &Throttle) {
    ctl.set(|s| {
        s.load = t.load;
        s.state = t.gate.name().into();
        if t.gate != Gate::Copying {
            s.why = t.why.clone();
        }
    });
}

/// The guest agent, for its CPU figures, if given and answering.
fn agent(opts: &Options) -> Option<crate::qemu::guest_agent::GuestAgent> {
    use crate::qemu::guest_agent::{GuestAgent, SYNC_TIMEOUT};
    let path = opts.agent.as_ref()?;
    match GuestAgent::connect(path, SYNC_TIMEOUT) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(vm = %opts.vm, "guest CPU load unknown: {e}");
            None
        }
    }
}

/// Paces reads to at most `rate` bytes per second on average.
pub(super) struct Pace {
    rate: Option<f64>,
    start: Instant,
    bytes: Mutex<u64>,
}

impl Pace {
    pub(super) fn new(rate: Option<f64>) -> Pace {
        Pace {
            rate,
            start: Instant::now(),
            bytes: Mutex::new(0),
        }
    }

    /// Waits until `n` more bytes are due, or until `go_on` says no (a
    /// stop, or the job's end: a low rate must not hold either back).
    pub(super) fn wait(&self, n: u64, go_on: &dyn Fn() -> bool) {
        let Some(rate) = self.rate else { return };
        let due = {
            let mut b = self.bytes.lock().expect("pace lock");
            *b += n;
            Duration::try_from_secs_f64(*b as f64 / rate).unwrap_or(Duration::MAX)
        };
        while let Some(left) = due.checked_sub(self.start.elapsed()) {
            if left.is_zero() || !go_on() {
                break;
            }
            std::thread::sleep(left.min(PAUSE_SLICE));
        }
    }
}
