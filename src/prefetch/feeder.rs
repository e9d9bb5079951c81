//! A thread per recovery session that feeds the scheduler's profile class.
//!
//! It releases a profile block once the session is within `horizon` of
//! the block's planned time, where "now" is the later of the wall clock
//! and the guest's own progress along the profile. So prefetch keeps
//! ahead of the guest without flooding staging with blocks needed minutes
//! from now; and since the profile class ranks below on-demand misses, a
//! boot-critical block never waits behind it. When the recording window
//! closes, the feeder has the session's recording saved.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::layout;
use super::profile::Planned;
use super::tracker::PlanSource;
use super::{Class, Scheduler};
use crate::volume::Volume;

/// Profile jobs allowed in the queue at once: enough to keep every
/// background worker busy, few enough that a change of plan is cheap.
const MAX_QUEUED: usize = 256;
const TICK: Duration = Duration::from_millis(20);

/// What a disk's profile comes from.
pub enum Source {
    Recorded(Vec<Planned>),
    /// No recording: stage partition tables, boot sectors and filesystem
    /// metadata, found by parsing the disk.
    Default,
    Nothing,
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// How far ahead of the guest, in profile time, blocks are released.
    pub horizon: Duration,
    /// Upper bound on the default profile's size per disk.
    pub default_cap: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            horizon: Duration::from_secs(10),
            default_cap: 64 << 20,
        }
    }
}

pub struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// One disk's pending profile blocks, in tiers of how many recordings saw
/// them (most first); each tier is in time order.
struct Pending {
    vol: Arc<Volume>,
    tiers: Vec<VecDeque<Planned>>,
}

impl Pending {
    fn new(vol: Arc<Volume>, planned: &[Planned]) -> Pending {
        let mut tiers: Vec<VecDeque<Planned>> = vec![];
        for p in planned {
            match tiers.last_mut() {
                Some(t) if t.back().is_some_and(|q| q.seen == p.seen) => t.push_back(*p),
                _ => tiers.push(VecDeque::from([*p])),
            }
        }
        Pending { vol, tiers }
    }

    fn is_empty(&self) -> bool {
        self.tiers.iter().all(VecDeque::is_empty)
    }

    /// Makes room in bounded staging for the blocks still to fetch (see
    /// `Budget::make_room_below_low`): prefetch itself evicts no other
    /// disk's blocks.
    fn make_room(&self) {
        let bs = self.vol.block_size();
        let missing = (self.tiers.iter().flatten())
            .filter(|p| !self.vol.is_local(p.block * bs, bs))
            .count() as u64;
        self.vol.make_room_for_prefetch(missing * bs);
    }

    /// Releases every block planned up to `until_ms`, while the queue has room.
    fn release(&mut self, sched: &Scheduler, until_ms: u32) {
        for tier in &mut self.tiers {
            while let Some(p) = tier.front() {
                if p.t_ms > until_ms || sched.queued(Class::Profile) >= MAX_QUEUED {
                    return;
                }
                self.vol.prefetch_block(p.block, Class::Profile);
                tier.pop_front();
            }
        }
    }
}

impl Feeder {
    /// Starts feeding; `on_window_end` runs once when the recording window
    /// closes while the session is still live.
    pub fn start(
        vm: &str,
        disks: Vec<(Arc<Volume>, Source)>,
        sched: Arc<Scheduler>,
        settings: Settings,
        on_window_end: Box<dyn FnOnce() + Send>,
    ) -> Feeder {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let span = tracing::info_span!("prefetch", vm = %vm);
        let thread = std::thread::Builder::new()
            .name(format!("prefetch-{vm}"))
            .spawn(move || {
                let _g = span.entered();
                run(disks, &sched, &settings, &st, on_window_end)
            })
            .expect("spawn prefetch thread");
        Feeder {
            stop,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Stops feeding (queued jobs still run) and waits for the thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

fn run(
    disks: Vec<(Arc<Volume>, Source)>,
    sched: &Scheduler,
    settings: &Settings,
    stop: &AtomicBool,
    on_window_end: Box<dyn FnOnce() + Send>,
) {
    let first = disks.first().map(|(v, _)| v.clone());
    let mut pending: Vec<Pending> = disks
        .into_iter()
        .filter_map(|(vol, src)| plan(vol, src, settings))
        .collect();
    for p in &pending {
        p.make_room();
    }
    let mut on_window_end = Some(on_window_end);
    let horizon = settings.horizon.as_millis().min(u32::MAX as u128) as u32;
    while !stop.load(Ordering::Acquire) {
        for p in &mut pending {
            let t = &p.vol.tracker;
            let now = t.elapsed_ms().max(t.progress_ms());
            p.release(sched, now.saturating_add(horizon));
        }
        pending.retain(|p| !p.is_empty());
        let window_open = first.as_ref().is_some_and(|v| v.tracker.recording_open());
        if !window_open {
            if let Some(f) = on_window_end.take() {
                f();
            }
            if pending.is_empty() {
                return;
            }
        }
        // Nothing left to release: only the window end is still to come.
        std::thread::sleep(if pending.is_empty() { TICK * 10 } else { TICK });
    }
}

/// Applies a disk's profile to its tracker and returns what to fetch.
fn plan(vol: Arc<Volume>, src: Source, settings: &Settings) -> Option<Pending> {
    let (source, planned) = match src {
        Source::Nothing => return None,
        Source::Recorded(p) => (PlanSource::Recorded, p),
        Source::Default => (
            PlanSource::Default,
            default_plan(&vol, settings.default_cap),
        ),
    };
    tracing::info!(
        disk = vol.index,
        blocks = planned.len(),
        ?source,
        "following the operational profile"
    );
    vol.tracker.set_plan(source, &planned);
    Some(Pending::new(vol, &planned))
}

/// The default profile: blocks of the regions a booting guest reads early.
/// Finding them reads the disk itself, at profile priority.
fn default_plan(vol: &Arc<Volume>, cap: u64) -> Vec<Planned> {
    let mut read = |off: u64, buf: &mut [u8]| {
        vol.read_internal(off, buf, Class::Profile)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    // A small disk gets a proportionally small default.
    let cap = cap.min(vol.size / 16);
    let regions = layout::boot_regions(vol.size, cap, &mut read);
    let bs = vol.block_size();
    let mut seen = std::collections::HashSet::new();
    let mut out = vec![];
    for r in regions {
        for b in r.offset / bs..(r.offset + r.len).div_ceil(bs).min(vol.nblocks()) {
            let chunk = vol.chunks().get(b);
            if chunk.is_some() && seen.insert(b) {
                out.push(Planned {
                    block: b,
                    t_ms: 0,
                    seen: 1,
                    chunk,
                });
            }
        }
    }
    out
}
