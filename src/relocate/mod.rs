//! Live relocation: copy a recovering VM's disks to primary storage while
//! it runs, converge, then cut over so every read and write goes to the
//! primary copy.
//!
//! * Source is what the VM sees: the guest's writes and other staged
//!   blocks from staging, the rest from the backup, fetched at relocation
//!   priority without staging them, many at once (see `copy`: a pipeline
//!   of reads, target writes in walk order, batches committed by a second
//!   thread while the next batch is written).
//! * The copy walks each disk in ascending order **by runs**: copied blocks
//!   are skipped a bitmap word at a time, a stretch of holes (zero in the
//!   backup, never written) is taken whole and recorded with one commit
//!   that writes only the bitmap words it touched, so a sparse 10 TiB disk
//!   costs its data, not its 10 million blocks. A hole is recorded only
//!   where the target durably reads zeros (see `take_holes`).
//! * A per-disk **copied** map records blocks whose target data is synced.
//!   A guest write clears the block's bit in memory (see `copy`, "Revoking
//!   a copy") before its data lands; the copier marks a block copied only if
//!   no guest write started since it read the block. Pass after pass, only
//!   blocks not copied are copied.
//! * Copied bits never run ahead of the target: a batch is recorded as
//!   copied only after the target is synced. A block the guest never
//!   changed reads the backup's bytes after a crash whatever staging lost;
//!   one it changed is copied again after any restart (see `copy`), so after
//!   a crash a block trusted as copied reads the same from both.
//! * When few blocks remain, guest writes are paused, the rest is copied,
//!   targets are fsynced and `relocation.json` is renamed into place with
//!   `switched: true`: that rename is the commit point. Everything that can
//!   fail happens before it; after it there is only forward progress: every
//!   disk switches to its target (which cannot fail), and if the commit
//!   cannot be made durable the disks fail (reads go on, writes and flushes
//!   get EIO) so target and staging can never diverge, and the state is
//!   `Done` with that error (switched, not a success). A crash before the
//!   commit resumes the copy from staging; after it, the session is served
//!   from the target. Never a mix. The target's `vm.json`, which tells an
//!   administrator the copy is complete, is written only after the commit
//!   (and by a restarted daemon if it is missing), and removed when a
//!   relocation begins.
//! * A relocation starts from empty targets: files are created or emptied
//!   (mode 0600, in a 0700 directory, never through a symbolic link), so no
//!   byte of an old file can survive where the backup has zeros. It holds
//!   an OFD lock on each target file while it has it open (shared; taken
//!   exclusive to empty it), so `--force` never empties a file another
//!   relocation or session (another daemon's too) copies to or serves from;
//!   nor a `DIR/VM` with `vm.json`, nor one inside any recoverfs staging
//!   directory or FUSE mount.
//! * A reopened relocation not cut over trusts a disk's copied map only
//!   while its target file can hold what the map vouches for: the disk's
//!   size, and no hole over a whole copied block with backup data the guest
//!   never changed (`open::unbacked_copies`); otherwise the map is replaced
//!   by an empty one, durably, and the disk copied again.
//! * The target directory is recorded with its identity, and every later
//!   use works in it only if it is still that directory, reached without
//!   following a link (see `pin_target`): the cutover does not commit, a
//!   restart does not resume into a directory moved or linked into its
//!   place, a cancel leaves the files. Another device number (a reboot,
//!   a remount) is accepted only where nobody but root can change the
//!   path (see `TargetId`): there the same inode, owner and filesystem
//!   type will do, and the identity is recorded again. An older
//!   record without the identity takes the directory found at its first
//!   restart.
//! * Each target file's inode number is recorded when it is created or
//!   emptied: where a user may write, a restart writes only that very file
//!   (another hard link to it, an administrator's `cp -al` snapshot, does
//!   not matter), never one put in its place; where only root can change
//!   the path, whatever root put there. The cutover commits only while
//!   each name still leads to the file written. `--force` checks every
//!   existing file before emptying any.
//! * The VM comes first: the copier yields while guest I/O is in flight and
//!   honours a rate limit, raised (up to 4×) when the guest out-writes it.
//! * **Pause and resume** (`pause`, `resume_copy`; see `pause`): a pause
//!   stops the copier at its next block (reads in flight are abandoned,
//!   written blocks committed), persists `paused` in `relocation.json` (a
//!   restarted daemon keeps it paused) and holds off the cutover; resume
//!   continues from the copied map.
//! * **Not resumed** (`not_resumed`): a restart that cannot open the
//!   target of a relocation that had not cut over serves the VM from
//!   staging and keeps the record; `status` shows it, and a resume reopens
//!   it in the running daemon once the target is back.
//! * **Failed** (`retry`): a failure before the cutover's commit leaves
//!   the record, the copied maps and the target files; a restart resumes
//!   it, and so does `relocate --resume` in the running daemon once the
//!   cause is fixed: reopened from the record as a restart would (copied
//!   blocks kept), a new copier started, the failed one's open target files
//!   taken over with their locks.
//! * **Cancel** (`cancel`): refused once the cutover began; otherwise stops
//!   the copier, marks `relocation.json` `cancelling` durably (from then on
//!   no restart or `--resume` reopens it), removes it durably, then the
//!   copied maps and the target files this relocation created (never one
//!   that was there before). One that could not finish shows in `status`
//!   as such (`cancel_unfinished`: the command that finishes it).
//!
//! Files: `open` (start; reopen at a restart or `--resume`), `copy` (one
//! pass, pipelined), `passes` (the copier's loop and pacing), `cutover`,
//! `pause`, `cancel`, `not_resumed`, `retry` (a failed one reopened in the
//! running daemon), `target` (the directory's identity).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::repo::limits::MAX_META_BYTES;
use crate::staging::io::{self, BlockFile, Open, PinnedDir, Storage};
use crate::staging::{MapKind, PersistentBitmap};
use crate::volume::Volume;

/// Cut over when at most this many blocks remain dirty (and at most a
/// 16th of the disk): the final pass runs with guest writes paused.
const CUTOVER_BLOCKS: u64 = 64;
/// Seconds in a row in which the guest un-copies blocks at least as fast
/// as they are copied, before the rate is raised or the state becomes
/// not-converging.
const STALL_SECONDS: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Copying,
    Converging,
    /// Stopped by `pause` until `resume_copy`; no cutover meanwhile.
    Paused,
    Switching,
    Done,
    Failed,
    NotConverging,
    /// Recorded, but a restarted daemon could not reopen its target (see
    /// `not_resumed`): shown by `status`, never the state of a copier.
    NotResumed,
}

impl State {
    /// Still copying, or will again (future async load).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            State::Copying | State::Converging | State::NotConverging | State::Paused
        )
    }
}

/// `relocation.json` in the session's staging directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub target: PathBuf,
    pub switched: bool,
    pub pass: u32,
    pub rate_mbps: Option<f64>,
    /// Paused by the administrator: a restart keeps it paused.
    #[serde(default)]
    pub paused: bool,
    /// Disks (indices) whose target file this relocation created: a
    /// cancel removes only these, never a file that was there before
    /// (`--force`). A record written before this field names none.
    #[serde(default)]
    pub created: Vec<usize>,
    /// It created `target` itself: a cancel removes it if left empty.
    #[serde(default)]
    pub created_dir: bool,
    /// `target`'s identity when the relocation began: every later use
    /// (restart, cancel, `vm.json`) works in that directory or not at all,
    /// never in one moved or linked into its place (see `pin_target`). A
    /// record written before this field has none: links are still refused.
    #[serde(default)]
    pub target_id: Option<TargetId>,
    /// Each target file's inode number (by disk index) since this
    /// relocation created or emptied it: a restart writes a file with
    /// other hard links only if it is that very file (`Open::ExistingIno`).
    /// A record written before this field has none: such a file is refused.
    #[serde(default)]
    pub target_inos: BTreeMap<usize, u64>,
    /// The id written into `DIR/VM/.recoverfs-relocation` when this
    /// relocation began (see `target::check_owner`): a later relocation
    /// into the same directory (`--force`, another session or daemon)
    /// writes its own, and from then on this one never writes, resumes
    /// into or removes those files. A record written before this field
    /// has none: not checked.
    #[serde(default)]
    pub owner_mark: Option<String>,
    /// A cancel began: written durably before the record is removed (see
    /// `cancel`), so a cancel whose removal failed stays a cancel: no
    /// restart and no `--resume` reopens it, `--cancel` again finishes it.
    /// Absent (false) in every other record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelling: bool,
}

impl Meta {
    /// A new relocation's record to `target`, before anything was copied,
    /// created or checked (fields set by `start` override it).
    pub(crate) fn first_pass(target: PathBuf) -> Meta {
        Meta {
            target,
            switched: false,
            pass: 1,
            rate_mbps: None,
            paused: false,
            created: vec![],
            created_dir: false,
            target_id: None,
            target_inos: BTreeMap::new(),
            owner_mark: None,
            cancelling: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RelocationStatus {
    pub state: State,
    pub target: PathBuf,
    pub pass: u32,
    /// Bytes of blocks whose copy is synced and still valid.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes written to the target by this daemon (re-copies included).
    pub bytes_copied: u64,
    /// `bytes_copied` over `copy_seconds`.
    pub rate_mbps: f64,
    /// Seconds this daemon spent copying (paused time not counted), up
    /// to the cutover.
    pub copy_seconds: f64,
    pub rate_limit_mbps: Option<f64>,
    pub eta_s: Option<f64>,
    pub dirty_blocks: u64,
    /// Longest write stall of the cutover, in ms.
    pub cutover_pause_ms: Option<f64>,
    pub error: Option<String>,
    pub note: Option<String>,
    /// A cancel began and could not finish (`relocate --cancel`, then
    /// its record could not be written or removed, or the daemon stopped
    /// mid-cancel): the copy is stopped for good and never resumed, and
    /// this is the one command that finishes it. `state` stays what older
    /// readers know, `failed` (in the daemon the cancel ran in) or
    /// `not-resumed` (after a restart); `status` shows `cancel unfinished`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_unfinished: Option<String>,
    /// With `cancel_unfinished`: not even the `cancelling` mark could be
    /// written, so a restarted daemon resumes the copy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_unmarked: bool,
}

/// The command that finishes VM `vm`'s unfinished cancel.
pub(crate) fn finish_cancel(vm: &str) -> String {
    format!("recoverfs relocate {vm} --cancel")
}

pub struct Relocation {
    vm: String,
    disks: Vec<Arc<Volume>>,
    storage: Arc<dyn Storage>,
    targets: Vec<Arc<dyn BlockFile>>,
    copied: Vec<Arc<PersistentBitmap>>,
    target_dir: PathBuf,
    /// The targets were emptied by this daemon (see `take_holes`).
    fresh: bool,
    meta_path: PathBuf,
    config_json: Vec<u8>,
    meta: Mutex<Meta>,
    /// Held while `relocation.json` is encoded and replaced: the API's
    /// pause and the copier both write it.
    meta_io: Mutex<()>,
    state: Mutex<(State, Option<String>, Option<String>)>,
    rate_limit: Mutex<Option<f64>>,
    initial_rate: Option<f64>,
    bytes_copied: AtomicU64,
    /// Time spent copying (see `pause::Clock`).
    clock: Mutex<pause::Clock>,
    /// Blocks marked copied by this daemon (re-copies included).
    blocks_marked: AtomicU64,
    /// Copies thrown away because the guest wrote the block meanwhile.
    copies_lost: AtomicU64,
    /// The last pass ended on a block the repository did not answer for
    /// (an I/O error, not damage): the copier waits and tries again.
    source_unreachable: AtomicBool,
    /// `status` shows the wait for the repository: cleared at the first
    /// block copied after it, not at the end of a pass (explore5 M4).
    outage_shown: AtomicBool,
    progress: Mutex<Progress>,
    /// When the rate limit allows the next copy.
    next_slot: Mutex<Instant>,
    pause_ms: Mutex<Option<f64>>,
    cancel: AtomicBool,
    /// A cancel could not write its `cancelling` mark: nothing durable
    /// says cancel, and a restarted daemon resumes the copy (status says
    /// so, not "never resumed": explore11 M2).
    cancel_unmarked: AtomicBool,
    /// Pause requested (see `pause`); set and read under `state` where it
    /// decides against a cutover.
    pause: AtomicBool,
    /// Wakes a paused copier (resume or cancel).
    wake: parking_lot::Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Tests only: run by the committer before it syncs a batch, with the
    /// disk and the batch's data blocks (to race a guest write with it).
    #[cfg(test)]
    commit_hook: Mutex<Option<CommitHook>>,
}

#[cfg(test)]
type CommitHook = Arc<dyn Fn(usize, &[u64]) + Send + Sync>;

/// The last convergence sample: copies made vs copies the guest revoked.
struct Progress {
    at: Instant,
    marked: u64,
    revoked: u64,
    stalled: u32,
}

/// The recovery session whose disks a relocation copies.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub storage: &'a Arc<dyn Storage>,
    pub vm: &'a str,
    pub disks: &'a [Arc<Volume>],
    /// Written to the target as `vm.json` at cutover.
    pub config_json: &'a [u8],
    pub session_dir: &'a Path,
}

pub struct Request<'a> {
    pub source: Source<'a>,
    pub to: &'a Path,
    pub rate_mbps: Option<f64>,
    pub force: bool,
    /// Paths the target may not be inside (mount, staging).
    pub forbidden: &'a [&'a Path],
}

impl Relocation {
    fn meta_path(session_dir: &Path) -> PathBuf {
        session_dir.join("relocation.json")
    }

    fn copied_path(session_dir: &Path, d: &Volume) -> PathBuf {
        session_dir.join(format!("disk{}.copied", d.index))
    }

    fn encode_meta(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&*self.meta.lock()).expect("json")
    }

    fn store_meta(&self) -> Result<()> {
        let _io = self.meta_io.lock();
        io::replace(self.storage.as_ref(), &self.meta_path, &self.encode_meta())
    }

    /// The copied map of disk `i` (tests check it against the target).
    #[cfg(test)]
    pub(crate) fn copied_map(&self, i: usize) -> &PersistentBitmap {
        &self.copied[i]
    }

    /// The target file of disk `i`.
    #[cfg(test)]
    pub(crate) fn target(&self, i: usize) -> &Arc<dyn BlockFile> {
        &self.targets[i]
    }

    /// One copy pass over every disk at full speed, on this thread (the
    /// crash tests resume a reopened relocation this way).
    #[cfg(test)]
    pub(crate) fn resume_pass_unthrottled(self: &Arc<Self>) -> Result<()> {
        *self.rate_limit.lock() = None;
        for i in 0..self.disks.len() {
            self.copy_pass(i, false)?;
        }
        Ok(())
    }

    pub(crate) fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        let h = std::thread::Builder::new()
            .name(format!("relocate-{}", self.vm))
            .spawn(move || {
                if let Err(e) = me.run() {
                    tracing::error!(vm = %me.vm, "relocation failed: {e}");
                    // No longer copying: `copy_seconds` and the rate stop.
                    me.clock.lock().stop();
                    *me.state.lock() = (State::Failed, Some(e.to_string()), None);
                }
            })
            .expect("spawn relocation thread");
        *self.thread.lock() = Some(h);
    }

    /// Tests only: the copier was started, not stopped, and still runs.
    #[cfg(test)]
    pub(crate) fn copier_running(&self) -> bool {
        self.thread
            .lock()
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    /// Stops the copier (the copy resumes with the next `recover`) and
    /// returns once it has ended, also when another caller (shutdown, a
    /// cancel) joins it: the handle's lock is held across the join (the
    /// copier never takes it), and a cancel must not remove the record
    /// while a copier could still write it.
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::Release);
        self.wake_copier();
        let mut thread = self.thread.lock();
        if let Some(h) = thread.take() {
            let _ = h.join();
        }
        // Not copying from here on (a cancel that fails leaves it shown).
        self.clock.lock().stop();
    }

    pub fn state(&self) -> State {
        self.state.lock().0
    }

    fn set_state(&self, s: State, note: Option<String>) {
        let mut g = self.state.lock();
        g.0 = s;
        g.2 = note;
    }

    fn remaining(&self) -> u64 {
        self.disks
            .iter()
            .zip(&self.copied)
            .map(|(d, c)| d.nblocks() - c.bits().count())
            .sum()
    }

    pub fn status(&self) -> RelocationStatus {
        let (state, error, note) = self.state.lock().clone();
        let bs_total: u64 = self.disks.iter().map(|d| d.size).sum();
        let done: u64 = self
            .disks
            .iter()
            .zip(&self.copied)
            .map(|(d, c)| copied_bytes(d, c))
            .sum();
        let copied = self.bytes_copied.load(Ordering::Relaxed);
        let secs = self.clock.lock().active().as_secs_f64();
        let rate = copied as f64 / secs.max(0.001) / 1e6;
        let left = bs_total.saturating_sub(done);
        let done = if state == State::Done { bs_total } else { done };
        // Read once: a guard taken in the literal lives to its end.
        let (pass, cancelling) = {
            let m = self.meta.lock();
            (m.pass, m.cancelling)
        };
        RelocationStatus {
            state,
            target: self.target_dir.clone(),
            pass,
            bytes_done: done,
            bytes_total: bs_total,
            bytes_copied: copied,
            rate_mbps: rate,
            copy_seconds: secs,
            rate_limit_mbps: *self.rate_limit.lock(),
            // None while it waits for the repository: the average rate
            // decays then, and an ETA from it would only grow.
            eta_s: (state.is_running()
                && state != State::Paused
                && rate > 0.0
                && !self.outage_shown.load(Ordering::Acquire))
            .then(|| left as f64 / (rate * 1e6)),
            dirty_blocks: if state == State::Done {
                0
            } else {
                self.remaining()
            },
            cutover_pause_ms: *self.pause_ms.lock(),
            error,
            note,
            cancel_unfinished: cancelling.then(|| finish_cancel(&self.vm)),
            cancel_unmarked: cancelling && self.cancel_unmarked.load(Ordering::Acquire),
        }
    }
}

/// Disk `d`'s file in the target directory `dir`.
fn target_file_of(dir: &Path, d: &Volume) -> PathBuf {
    dir.join(format!("disk{}.raw", d.index))
}

/// Bytes of the blocks marked copied: every block is full but the last.
fn copied_bytes(d: &Volume, c: &PersistentBitmap) -> u64 {
    let n = d.nblocks();
    let full = c.bits().count() * d.block_size();
    match n.checked_sub(1).filter(|&last| c.test(last)) {
        Some(last) => full - d.block_size() + d.block_range(last).1,
        None => full,
    }
}

mod cancel;
mod copy;
mod cutover;
mod not_resumed;
mod open;
mod passes;
mod pause;
mod retry;
mod target;

pub use cancel::Cancelled;
pub use not_resumed::{NotResumed, Reopened};
pub(crate) use target::pin_target;
use target::{is_replaced, only_root_can_change, TargetId};
#[cfg(test)]
mod tests;

/// Tests only: a step run by `open_in` once the copied maps are read and
/// before they are installed, for the session directory it was set for
/// (tests run in parallel), to race a guest write with the reopen.
#[cfg(test)]
pub(crate) mod test_hooks {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    type Hook = Arc<dyn Fn() + Send + Sync>;
    static BEFORE_TRACKING: parking_lot::Mutex<Option<HashMap<PathBuf, Hook>>> =
        parking_lot::Mutex::new(None);

    pub(crate) fn set_before_tracking(session_dir: &Path, hook: Hook) {
        BEFORE_TRACKING
            .lock()
            .get_or_insert_with(HashMap::new)
            .insert(session_dir.to_path_buf(), hook);
    }

    pub(super) fn before_tracking(session_dir: &Path) {
        let hook = BEFORE_TRACKING
            .lock()
            .as_mut()
            .and_then(|m| m.remove(session_dir));
        if let Some(h) = hook {
            h();
        }
    }
}
