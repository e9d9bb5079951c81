//! Crash consistency tested as power loss, in the style of CrashMonkey and
//! ALICE. `kill -9` keeps the page cache, so it cannot show a missing sync;
//! this test can.
//!
//! A workload (guest writes, reads that fetch, guest flushes, prefetches,
//! the background flusher, optionally a second guest writer racing the
//! first on the same blocks, and optionally a relocation through cutover)
//! runs on a volume whose staging is in [`MemStorage`], which records every
//! write, sync, rename and directory sync. From the record it builds many
//! "power cut here" states: everything durable by the cut, plus a random
//! subset (512-byte sectors, name changes) of what was not. It reopens a
//! volume (and the relocation) from each and checks the invariants of the
//! durability table in `lib.rs`:
//! 1. every sector holds the last write acknowledged by a flush before
//!    the cut, or a later write that had started; with no acknowledged
//!    write, also its backup content (a presence bit implies the block's
//!    bytes are the backup's or a write that happened);
//! 2. every block whose bytes differ from the backup, and every block an
//!    acknowledged write touched, has its changed bit (also after the cutover);
//! 3. before the cutover, every copied block reads the same on the target
//!    as through the volume; after it, the target is what the volume serves;
//! 4. with live backups (`backup --session`) running while the guest
//!    writes: every block whose bytes differ from the backup `since.json`
//!    names as the base (the session's own backup in generation 0) has its
//!    bit in that generation's dirty map, so the next live backup misses
//!    nothing;
//! 5. with the session uploader running too (`session::upload`): every
//!    valid entry of the reopened upload record names the block's content
//!    as the reopened disk reads it, so a live backup taking it is exact.
//!
//! `make test` checks a bounded number of states per scenario;
//! `RECOVERFS_CRASH_STATES=N` checks N.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::prefetch::Scheduler;
use crate::relocate::{Meta, Relocation, Source};
use crate::repo::{Manifest, Repository};
use crate::session::backup::load_base;
use crate::staging::io::mem::MemStorage;
use crate::staging::io::Storage;
use crate::volume::Volume;

mod workload;
use workload::workload;

const BS: usize = 64 << 10;
const SECTOR: usize = 512;

/// What a run does.
#[derive(Clone, Copy)]
struct Scenario {
    blocks: usize,
    /// Interval of the background flusher.
    flush_every: Duration,
    /// Relocate (with this copy rate in MB/s) a quarter of the way in.
    relocate: Option<f64>,
    guest_ops: usize,
    /// Share of guest operations that are flushes, in percent.
    flush_pct: u32,
    /// Two live backups, one after the other, from halfway in, while the
    /// guest goes on writing.
    live_backups: bool,
    /// Bounded staging: a budget of this many blocks, so unchanged blocks
    /// are evicted (and fetched again) all along; guest writes then stay
    /// in the first `blocks / 10` blocks so reads always find room.
    staging_max_blocks: Option<u64>,
    /// An uploader (as `session::upload` does it) stores dirty blocks and
    /// records them all along.
    uploads: bool,
    /// A second guest writer (a queue depth above 1) writes and flushes
    /// beside the first, often other sectors of the blocks it writes.
    second_writer: bool,
}

/// A small disk with no background work: tests that drive it by hand.
const STILL: Scenario = Scenario {
    blocks: 12,
    flush_every: Duration::from_secs(3600),
    relocate: None,
    guest_ops: 0,
    flush_pct: 0,
    live_backups: false,
    staging_max_blocks: None,
    uploads: false,
    second_writer: false,
};

/// A guest write as the checker needs it.
struct Write {
    off: usize,
    data: Vec<u8>,
    /// Recorded operations before the write started.
    start: usize,
    /// Position at which a flush that began after this write completed
    /// returned: from there on the write must survive a power cut.
    acked_at: Option<usize>,
    /// Position at which the write returned: from there on it must survive
    /// a daemon crash (`kill -9` keeps the page cache).
    done_at: usize,
    /// Its place among completed writes: a flush that began after it was
    /// counted covers it.
    seq: u64,
}

/// The guest's writes, from one writer thread or two. Overlapping writes
/// never run at once (the later waits), so for every sector the order of
/// the starts is the order its bytes landed in.
#[derive(Default)]
struct Log {
    writes: parking_lot::Mutex<Vec<Write>>,
    busy: parking_lot::Mutex<Vec<std::ops::Range<usize>>>,
    freed: parking_lot::Condvar,
    /// Writes completed so far.
    done: AtomicU64,
}

impl Log {
    fn claim(&self, r: std::ops::Range<usize>) {
        let mut busy = self.busy.lock();
        while busy.iter().any(|b| b.start < r.end && r.start < b.end) {
            self.freed.wait(&mut busy);
        }
        busy.push(r);
    }

    fn unclaim(&self, r: &std::ops::Range<usize>) {
        self.busy.lock().retain(|b| b != r);
        self.freed.notify_all();
    }

    /// Every write, in the order they started.
    fn into_writes(self) -> Vec<Write> {
        let mut w = self.writes.into_inner();
        w.sort_by_key(|x| x.start);
        w
    }
}

/// How the run ends at the cut.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Crash {
    /// Only synced data survives, and some of the rest; a new boot.
    PowerCut,
    /// The daemon is killed: every completed write survives; the same boot.
    Kill,
}

impl Write {
    /// True if the write must be there after `crash` at `cut`.
    fn promised(&self, crash: Crash, cut: usize) -> bool {
        match crash {
            Crash::PowerCut => self.acked_at.is_some_and(|a| a <= cut),
            Crash::Kill => self.done_at <= cut,
        }
    }
}

struct World {
    sc: Scenario,
    _dir: tempfile::TempDir,
    repo: Arc<Repository>,
    manifest: Manifest,
    backup: Vec<u8>,
    sched: Arc<Scheduler>,
}

const SESSION: &str = "/staging/sessions/vm/b";
const TARGET: &str = "/primary/vm";

fn world(seed: u64, sc: Scenario) -> World {
    let blocks = sc.blocks;
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut backup = vec![0u8; blocks * BS];
    rng.fill(&mut backup[..]);
    for b in (0..blocks).filter(|b| b % 4 == 1) {
        backup[b * BS..(b + 1) * BS].fill(0);
    }
    let manifest = crate::testutil::backup_images(&repo, dir.path(), "vm", BS, &[&backup]);
    World {
        sc,
        _dir: dir,
        repo,
        manifest,
        backup,
        sched: Scheduler::new("crash-fetch", 4),
    }
}

fn open_volume(w: &World, storage: &dyn Storage) -> Arc<Volume> {
    crate::testutil::open_volumes(storage, Path::new(SESSION), &w.repo, &w.manifest, &w.sched)
        .remove(0)
}

/// The session of `vol`, as a relocation sees it.
fn source<'a>(storage: &'a Arc<dyn Storage>, vol: &'a Arc<Volume>) -> Source<'a> {
    Source {
        storage,
        vm: "vm",
        disks: std::slice::from_ref(vol),
        config_json: b"{}\n",
        session_dir: Path::new(SESSION),
    }
}

/// Starts relocating `vol` to [`TARGET`] (the copier not spawned).
fn begin_relocation(
    storage: &Arc<dyn Storage>,
    vol: &Arc<Volume>,
    rate_mbps: Option<f64>,
) -> Arc<Relocation> {
    let meta = Meta {
        rate_mbps,
        ..Meta::first_pass(PathBuf::from(TARGET))
    };
    Relocation::begin(source(storage, vol), meta).unwrap()
}

/// Checks the state after `crash` at `cut`; `Err` describes the first
/// violation.
fn check_state(
    w: &World,
    state: &MemStorage,
    crash: Crash,
    cut: usize,
    writes: &[Write],
) -> Result<(), String> {
    let blocks = w.sc.blocks;
    let storage: Arc<dyn Storage> = Arc::new(state.clone());
    let vol = open_volume(w, state);
    let reloc = Relocation::reopen(source(&storage, &vol))
        .map_err(|e| format!("reopening the relocation failed: {e}"))?;
    let seen = vol
        .read(0, blocks * BS)
        .map_err(|e| format!("reading the reopened disk failed: {e}"))?;
    let started: Vec<&Write> = writes.iter().filter(|x| x.start < cut).collect();
    // 1. Every sector: the last acknowledged write or a later one, or the
    //    backup when nothing covering it was acknowledged.
    for s in 0..blocks * BS / SECTOR {
        let r = s * SECTOR..(s + 1) * SECTOR;
        let covering: Vec<&&Write> = started
            .iter()
            .filter(|x| x.off <= r.start && x.off + x.data.len() >= r.end)
            .collect();
        let last_acked = covering.iter().rposition(|x| x.promised(crash, cut));
        let from = last_acked.unwrap_or(0);
        let ok = covering[from..]
            .iter()
            .any(|x| x.data[r.start - x.off..r.end - x.off] == seen[r.clone()])
            || (last_acked.is_none() && w.backup[r.clone()] == seen[r.clone()]);
        if !ok {
            return Err(format!(
                "sector {s} (block {}) holds bytes that are neither the acknowledged write, a later one{}",
                r.start / BS,
                if last_acked.is_none() { ", nor the backup" } else { "" }
            ));
        }
    }
    // 2. Changed bits cover every block that differs or was acknowledged,
    //    also after the cutover (writes to the target mark them too).
    {
        let changed = vol.changed_ranges();
        let is_changed = |b: usize| changed.iter().any(|&(s, e)| (s..e).contains(&(b as u64)));
        for b in 0..blocks {
            let r = b * BS..(b + 1) * BS;
            let acked = started
                .iter()
                .any(|x| x.promised(crash, cut) && x.off < r.end && x.off + x.data.len() > r.start);
            if (seen[r.clone()] != w.backup[r.clone()] || acked) && !is_changed(b) {
                return Err(format!("block {b} was written but has no changed bit"));
            }
        }
    }
    // 4. Dirty bits cover every block that differs from the live backups'
    //    base.
    if w.sc.live_backups {
        let base = load_base(storage.as_ref(), Path::new(SESSION), &w.manifest)
            .map_err(|e| format!("reading since.json failed: {e}"))?;
        let d = &base.base.disks[0];
        for b in 0..blocks {
            let r = b * BS..(b + 1) * BS;
            let want = match d.chunks.get(b as u64) {
                Some(c) => {
                    w.repo
                        .read_chunk(&c, d.chunk_len(b as u64), &"crash test")
                        .map_err(|e| format!("base {} unreadable: {e}", base.base.id))?
                        .0
                }
                None => vec![0u8; BS],
            };
            if seen[r] != want[..] && !vol.is_dirty(b as u64) {
                return Err(format!(
                    "block {b} differs from backup {} (generation {}) but has no dirty bit",
                    base.base.id, base.generation
                ));
            }
        }
    }
    // 5. Every valid upload entry is the block's content.
    if w.sc.uploads {
        let g = load_base(storage.as_ref(), Path::new(SESSION), &w.manifest)
            .map_err(|e| format!("reading since.json failed: {e}"))?
            .generation;
        let p = crate::staging::uploaded::uploaded_path(Path::new(SESSION), 0, g);
        let u = vol.uploaded();
        if u.is_none() && storage.exists(&p).unwrap() {
            return Err(format!("{} was dropped as damaged", p.display()));
        }
        for b in (0..blocks).filter(|_| u.is_some()) {
            let Some(entry) = u.as_ref().unwrap().get(b as u64) else {
                continue;
            };
            let content = &seen[b * BS..(b + 1) * BS];
            let is = match content.iter().all(|&x| x == 0) {
                true => None,
                false => Some(crate::repo::Digest::of(content)),
            };
            if entry != is {
                return Err(format!(
                    "block {b} has a valid upload entry (generation {g}) for other bytes than the disk holds"
                ));
            }
        }
    }
    // 3. Before the cutover, copied blocks read the same from the target;
    //    and still after the copier resumed for a pass (which takes holes
    //    a run at a time: never over bytes an earlier copy left there).
    if let Some(r) = reloc.filter(|_| !vol.is_switched()) {
        copied_blocks_match(&r, &seen, "")?;
        r.resume_pass_unthrottled()
            .map_err(|e| format!("resuming the copy failed: {e}"))?;
        copied_blocks_match(&r, &seen, " after the copy resumed")?;
    }
    vol.close();
    Ok(())
}

/// Every block marked copied reads `seen` on the target.
fn copied_blocks_match(r: &Relocation, seen: &[u8], when: &str) -> Result<(), String> {
    let target = r.target(0);
    let mut t = vec![0u8; BS];
    for b in 0..(seen.len() / BS) as u64 {
        if r.copied_map(0).test(b) {
            target
                .read_exact_at(&mut t, b * BS as u64)
                .map_err(|e| format!("reading the target failed: {e}"))?;
            if t[..] != seen[b as usize * BS..(b as usize + 1) * BS] {
                return Err(format!(
                    "block {b} is marked copied{when} but the target holds other bytes than the VM sees"
                ));
            }
        }
    }
    Ok(())
}

fn states_to_check() -> usize {
    std::env::var("RECOVERFS_CRASH_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

/// Runs a scenario and checks `states_to_check()` power-cut states, and
/// half as many daemon-crash states.
fn run(seed: u64, sc: Scenario) {
    let w = world(seed, sc);
    let mem = MemStorage::new();
    let writes = workload(&w, &mem, seed);
    let end = mem.position();
    let acks: Vec<usize> = writes.iter().filter_map(|x| x.acked_at).collect();
    let dones: Vec<usize> = writes.iter().map(|x| x.done_at).collect();
    let copied = mem.syncs_of(".copied");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let n = states_to_check();
    let fail = |crash: Crash, cut: usize, what: String, e: String| -> ! {
        panic!(
            "{crash:?} at operation {cut} of {end} ({what}, seed {seed}): {e}\nthe operations before the cut:\n{}",
            mem.describe(cut.saturating_sub(40)..cut)
        )
    };
    for i in 0..n {
        // Cut anywhere, and often right where the most was just promised:
        // at a guest's acknowledged flush, or a copied map's sync.
        let cut = match i % 4 {
            0 if !acks.is_empty() => acks[rng.gen_range(0..acks.len())],
            1 if !copied.is_empty() => copied[rng.gen_range(0..copied.len())],
            _ => rng.gen_range(0..=end),
        };
        let keep = [0.0, 0.5, 1.0, rng.gen::<f64>()][(i / 4) % 4];
        let state = mem.crash_state(cut, keep, &mut rng);
        if let Err(e) = check_state(&w, &state, Crash::PowerCut, cut, &writes) {
            fail(
                Crash::PowerCut,
                cut,
                format!("keeping {keep:.2} of unsynced writes, state {i}"),
                e,
            );
        }
    }
    for i in 0..n / 2 {
        // Anywhere, and often right after a write returned to the guest.
        let cut = match i % 2 {
            0 => dones[rng.gen_range(0..dones.len())],
            _ => rng.gen_range(0..=end),
        };
        if let Err(e) = check_state(&w, &mem.kill_state(cut), Crash::Kill, cut, &writes) {
            fail(Crash::Kill, cut, format!("state {i}"), e);
        }
    }
    eprintln!(
        "checked {n} power-cut and {} daemon-crash states of {end} recorded operations ({} guest writes, {} acknowledged by a flush)",
        n / 2,
        writes.len(),
        writes.iter().filter(|x| x.acked_at.is_some()).count()
    );
}

#[test]
fn power_cuts_and_daemon_crashes_during_guest_writes_fetches_and_flushes_keep_every_acknowledged_write(
) {
    run(
        101,
        Scenario {
            blocks: 40,
            flush_every: Duration::from_millis(3),
            relocate: None,
            guest_ops: 400,
            flush_pct: 15,
            live_backups: false,
            staging_max_blocks: None,
            uploads: false,
            second_writer: true,
        },
    );
}

#[test]
fn power_cuts_and_daemon_crashes_during_relocation_and_cutover_never_mix_versions() {
    // A flusher as slow as the daemon's, relative to the copy: presence
    // bits lag behind the blocks the copier reads.
    run(
        202,
        Scenario {
            blocks: 160,
            flush_every: Duration::from_millis(150),
            relocate: Some(10.0),
            guest_ops: 800,
            flush_pct: 2,
            live_backups: false,
            staging_max_blocks: None,
            uploads: false,
            second_writer: false,
        },
    );
}

#[test]
fn a_power_cut_after_a_written_hole_was_copied_never_leaves_the_hole_marked_copied_over_the_copy() {
    // Block 1 is zero in the backup. The guest writes it (no flush), the
    // copier copies it and syncs the target; a power cut right then keeps
    // the target's copy but takes the staged write away: block 1 is a hole
    // again, and the target holds bytes there that the VM no longer sees.
    let w = world(303, STILL);
    let mem = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    storage.create_dir_all(Path::new(SESSION)).unwrap();
    storage.create_dir_all(Path::new(TARGET)).unwrap();
    let vol = open_volume(&w, &mem);
    assert!(vol.is_hole(1));
    vol.write(BS as u64, &[0x5a; BS]).unwrap();
    let r = begin_relocation(&storage, &vol, None);
    r.resume_pass_unthrottled().unwrap();
    drop(r);
    vol.close();
    let cuts = mem.syncs_of(&format!("{TARGET}/disk0.raw"));
    assert!(!cuts.is_empty());
    let mut rng = rand::rngs::StdRng::seed_from_u64(303);
    let mut hole_again = 0;
    for &cut in &cuts {
        let state = mem.crash_state(cut, 0.0, &mut rng);
        let st: Arc<dyn Storage> = Arc::new(state.clone());
        let vol = open_volume(&w, &state);
        let r = Relocation::reopen(source(&st, &vol)).unwrap().unwrap();
        hole_again += vol.is_hole(1) as u32;
        let seen = vol.read(0, w.sc.blocks * BS).unwrap();
        r.resume_pass_unthrottled().unwrap();
        if let Err(e) = copied_blocks_match(&r, &seen, " after the copy resumed") {
            panic!("power cut at operation {cut}: {e}");
        }
        vol.close();
    }
    assert!(hole_again > 0, "no cut made the written block a hole again");
}

#[test]
fn a_crash_after_guest_writes_over_copied_blocks_never_leaves_them_vouched_for_by_the_copied_file()
{
    // A guest write not yet flushed is copied (staging is not synced for
    // it); then, every block copied and recorded, the guest writes over
    // copied blocks on each path (whole block, partial, write-zeroes,
    // trim): each revokes its copy in memory only, so the copied file keeps
    // vouching for the old bytes. Reopened after a crash anywhere, the
    // restart rule must copy them all again.
    let w = world(505, STILL);
    let mem = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    storage.create_dir_all(Path::new(SESSION)).unwrap();
    storage.create_dir_all(Path::new(TARGET)).unwrap();
    let vol = open_volume(&w, &mem);
    let from = mem.position();
    vol.write(8 * BS as u64 + 512, &[0x77; 1024]).unwrap();
    let r = begin_relocation(&storage, &vol, None);
    r.resume_pass_unthrottled().unwrap();
    assert_eq!(r.status().dirty_blocks, 0);
    vol.write(2 * BS as u64, &[0x5a; BS]).unwrap();
    vol.write(3 * BS as u64 + 4096, &[0xa5; 512]).unwrap();
    vol.write_zeroes(4 * BS as u64, BS as u64).unwrap();
    vol.discard(6 * BS as u64, BS as u64).unwrap();
    vol.flush().unwrap();
    assert_eq!(r.status().dirty_blocks, 4, "each write revoked its copy");
    drop(r);
    vol.close();
    let mut rng = rand::rngs::StdRng::seed_from_u64(505);
    for cut in from..=mem.position() {
        for (crash, state) in [
            (Crash::Kill, mem.kill_state(cut)),
            (Crash::PowerCut, mem.crash_state(cut, 0.0, &mut rng)),
            (Crash::PowerCut, mem.crash_state(cut, 1.0, &mut rng)),
        ] {
            let st: Arc<dyn Storage> = Arc::new(state.clone());
            let vol = open_volume(&w, &state);
            let Some(r) = Relocation::reopen(source(&st, &vol)).unwrap() else {
                vol.close(); // before the relocation was recorded
                continue;
            };
            let seen = vol.read(0, w.sc.blocks * BS).unwrap();
            if let Err(e) = copied_blocks_match(&r, &seen, "")
                .and_then(|()| r.resume_pass_unthrottled().map_err(|e| e.to_string()))
                .and_then(|()| copied_blocks_match(&r, &seen, " after the copy resumed"))
            {
                panic!("{crash:?} at operation {cut}: {e}");
            }
            vol.close();
        }
    }
}

#[test]
fn a_crash_anywhere_in_a_cancel_leaves_the_relocation_either_resumable_or_cancelled() {
    // Half copied, some copies revoked by guest writes (flushed), then
    // cancelled. Reopened after a crash at any operation of the cancel,
    // either the relocation is recorded and resumes whole (its targets
    // there, every copied bit true, the pass completes), or it is not
    // recorded at all: never a record whose targets are gone.
    let w = world(606, STILL);
    let mem = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    storage.create_dir_all(Path::new(SESSION)).unwrap();
    storage.create_dir_all(Path::new(TARGET)).unwrap();
    let vol = open_volume(&w, &mem);
    let r = begin_relocation(&storage, &vol, None);
    r.resume_pass_unthrottled().unwrap();
    let mut model = w.backup.clone();
    for b in [2, 5, 9] {
        vol.write((b * BS) as u64, &[b as u8; 100]).unwrap();
        model[b * BS..][..100].fill(b as u8);
    }
    vol.flush().unwrap();
    assert_eq!(r.status().dirty_blocks, 3);
    let from = mem.position();
    let c = r.cancel(false).unwrap();
    assert!(c.leftover.is_none() && c.removed.len() == 1, "{c:?}");
    let to = mem.position();
    drop(r);
    vol.close();
    let record = Path::new(SESSION).join("relocation.json");
    let (mut resumed, mut cancelled) = (0, 0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(606);
    for cut in from..=to {
        for (crash, state) in [
            (Crash::Kill, mem.kill_state(cut)),
            (Crash::PowerCut, mem.crash_state(cut, 0.0, &mut rng)),
            (Crash::PowerCut, mem.crash_state(cut, 1.0, &mut rng)),
        ] {
            let st: Arc<dyn Storage> = Arc::new(state.clone());
            let vol = open_volume(&w, &state);
            let seen = vol.read(0, w.sc.blocks * BS).unwrap();
            assert!(
                seen == model,
                "{crash:?} at operation {cut}: the disk lost a write"
            );
            match Relocation::reopen(source(&st, &vol)).unwrap() {
                Some(r) => {
                    resumed += 1;
                    if let Err(e) = copied_blocks_match(&r, &seen, "")
                        .and_then(|()| r.resume_pass_unthrottled().map_err(|e| e.to_string()))
                        .and_then(|()| copied_blocks_match(&r, &seen, " after the copy resumed"))
                    {
                        panic!("{crash:?} at operation {cut}: {e}");
                    }
                    assert_eq!(r.status().dirty_blocks, 0);
                }
                None => {
                    cancelled += 1;
                    // Gone, or marked `cancelling` (held, never resumed):
                    // then a cancel again finishes it.
                    let marked = state
                        .contents(&record)
                        .map(|b| String::from_utf8_lossy(&b).contains("\"cancelling\": true"));
                    assert!(
                        marked != Some(false),
                        "{crash:?} at operation {cut}: the relocation is recorded but could not \
                         be resumed (its target is gone):\n{}",
                        mem.describe(from..to)
                    );
                    if marked == Some(true) {
                        Relocation::cancel_recorded(source(&st, &vol), false)
                            .unwrap()
                            .expect("recorded");
                        assert!(state.contents(&record).is_none());
                    }
                }
            }
            vol.close();
        }
    }
    assert!(
        resumed > 0 && cancelled > 0,
        "{resumed} resumed, {cancelled} cancelled"
    );
}

#[test]
fn power_cuts_and_daemon_crashes_during_eviction_never_expose_zeros_or_lose_a_write() {
    // A disk 4x its staging limit, read all over while the guest writes
    // and flushes: blocks are evicted and fetched again all along.
    run(
        404,
        Scenario {
            blocks: 64,
            flush_every: Duration::from_millis(4),
            relocate: None,
            guest_ops: 500,
            flush_pct: 10,
            live_backups: false,
            staging_max_blocks: Some(16),
            uploads: false,
            second_writer: false,
        },
    );
}

#[test]
fn power_cuts_and_daemon_crashes_during_live_backups_leave_every_change_in_the_dirty_map() {
    run(
        303,
        Scenario {
            blocks: 48,
            flush_every: Duration::from_millis(5),
            relocate: None,
            guest_ops: 500,
            flush_pct: 10,
            live_backups: true,
            staging_max_blocks: None,
            uploads: false,
            second_writer: true,
        },
    );
}

#[test]
fn power_cuts_and_daemon_crashes_while_the_uploader_races_guest_writes_and_live_backups_leave_no_stale_entry(
) {
    run(
        505,
        Scenario {
            blocks: 48,
            // Staging data stays unsynced for a while: an upload entry must
            // never become durable before the bytes it describes.
            flush_every: Duration::from_millis(100),
            relocate: None,
            guest_ops: 500,
            flush_pct: 10,
            live_backups: true,
            staging_max_blocks: None,
            uploads: true,
            second_writer: true,
        },
    );
}
