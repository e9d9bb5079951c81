//! The FUSE mount's open disk handles, kept in staging
//! (`fuse-handles.json`, next to `fuse-inodes.json`) while a keeper holds
//! the connection: a daemon that adopts the connection of a crashed one
//! (see `keeper`) counts every handle the kernel still holds as its
//! session's open handle from the start, not at its next I/O, so `release`
//! refuses under an idle or paused guest; and rebuilds each disk's
//! passthrough state (its opens' modes, the disk held complete), so a
//! writable open waits for inherited passthrough opens as for its own.
//!
//! A handle is recorded before its open is answered (an open that cannot
//! be recorded fails with EIO) and forgotten at its release. Opens of VM
//! disks are rare: each is one small atomic rewrite (temporary file,
//! fsync, rename), done on the io thread that answers the open. A release
//! forgets its record in memory on the event thread and is answered from
//! an io thread once the table without it is written (review32 L9): a
//! daemon that dies in between leaves the RELEASE unanswered, so the
//! kernel sends it again to the next one, which adopted the record. The
//! file is written under a lock of its own, from a copy of the table
//! taken under that lock, so the table's lock is never held across an
//! fsync and the last write always has the newest table. A fresh mount
//! starts the table empty (the kernel holds no handle of a new
//! connection).
//!
//! A record's key is its inode number *and* file handle: a file handle is
//! unique per disk only (its session's handle id, counted per session),
//! so two VMs' first opens share one, and a table keyed by the handle
//! alone kept one of them and dropped the other's record at either's
//! release (review32 H1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::passthrough::Opened;
use crate::error::{Error, Result};
use crate::session::{Holder, Session};
use crate::volume::Volume;

const FILE: &str = "fuse-handles.json";

/// One open disk handle, with the kernel's file handle its key (with
/// `ino`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The disk's inode number.
    pub ino: u64,
    /// Its session's staging directory.
    pub dir: PathBuf,
    /// The disk's index in the session.
    pub disk: usize,
    /// The opener, as the kernel named it.
    pub pid: u32,
    /// Opened in passthrough mode (see `passthrough`).
    pub passthrough: bool,
    /// The OPEN request's id (0 in tables from before it was kept): a
    /// daemon that died after recording the open but before answering it
    /// leaves a record the kernel holds no handle for; the kernel sends
    /// that OPEN again, with this id, to the adopting daemon, whose answer
    /// replaces the record (review32 M4).
    #[serde(default)]
    pub unique: u64,
}

/// The bit the kernel sets in the id of a request it sends again
/// (`FUSE_UNIQUE_RESEND`, with `FUSE_NOTIFY_RESEND`).
const UNIQUE_RESEND: u64 = 1 << 63;

/// A record's key: the disk's inode number and the file handle.
type Key = (u64, u64);

/// The table as kept in the file.
#[derive(Serialize, Deserialize)]
struct Entry {
    fh: u64,
    #[serde(flatten)]
    rec: Record,
}

/// The file's two forms: entries, or (written before review32 H1) a map
/// keyed by the file handle alone.
#[derive(Deserialize)]
#[serde(untagged)]
enum Kept {
    Entries(Vec<Entry>),
    /// (Keys as strings: an untagged enum cannot read them as numbers.)
    ByHandle(BTreeMap<String, Record>),
}

impl Kept {
    fn into_table(self) -> std::result::Result<BTreeMap<Key, Record>, String> {
        match self {
            Kept::Entries(v) => Ok(v.into_iter().map(|e| ((e.rec.ino, e.fh), e.rec)).collect()),
            Kept::ByHandle(m) => (m.into_iter())
                .map(|(fh, r)| match fh.parse::<u64>() {
                    Ok(fh) => Ok(((r.ino, fh), r)),
                    Err(_) => Err(format!("{fh:?} is no file handle")),
                })
                .collect(),
        }
    }
}

#[derive(Default)]
pub struct Handles {
    /// Where the table is kept; None keeps none (no keeper: a crash ends
    /// the mount and every handle with it).
    file: Option<PathBuf>,
    open: Mutex<BTreeMap<Key, Record>>,
    /// Held while the file is written (see the module doc).
    writing: Mutex<()>,
    /// What the crashed daemon left, until adopted.
    left: Mutex<Vec<(u64, Record)>>,
}

impl Handles {
    /// The table kept in staging `root`: what is recorded there when
    /// `adopting` (an error if it cannot be read: its handles would go
    /// uncounted), else a new, empty one (written now, so a missing file
    /// later means a table lost, not one never needed).
    pub fn kept_in(root: &Path, adopting: bool) -> Result<Handles> {
        let file = root.join(FILE);
        let mut open: BTreeMap<Key, Record> = BTreeMap::new();
        if adopting {
            let body = std::fs::read(&file)
                .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
            open = (serde_json::from_slice::<Kept>(&body).map_err(|e| e.to_string()))
                .and_then(Kept::into_table)
                .map_err(|e| Error::corrupt(format!("{}: {e}", file.display())))?;
        }
        let taken: Vec<u64> = open.keys().map(|&(_, fh)| fh >> 32).collect();
        super::passthrough::choose_epoch(&taken);
        let h = Handles {
            file: Some(file),
            left: Mutex::new(open.iter().map(|(k, v)| (k.1, v.clone())).collect()),
            open: Mutex::new(open),
            writing: Mutex::new(()),
        };
        if !adopting {
            h.save()?;
        }
        Ok(h)
    }

    /// A table in memory only, for a mount with no keeper (or whose kept
    /// table could not be read).
    pub fn in_memory() -> Handles {
        Handles::default()
    }

    /// Records open `fh` before it is answered; an error if it could not
    /// be recorded (the open must then fail).
    pub fn opened(&self, fh: u64, rec: Record) -> Result<()> {
        let key = (rec.ino, fh);
        // The file stays ours throughout: no other write may take the
        // record in between and leave it there (review43 L1).
        let writing = self.writing.lock();
        self.open.lock().insert(key, rec);
        let saved = self.write_out(&writing);
        if saved.is_err() {
            self.open.lock().remove(&key);
            // The rename may have landed before the failure (a failed
            // directory sync): the open is refused, so its record must not
            // outlive it in the file (review32 M4). Best effort.
            let _ = self.write_out(&writing);
        }
        saved
    }

    /// Whether the table is kept in a file (else a release has nothing to
    /// write).
    pub fn kept(&self) -> bool {
        self.file.is_some()
    }

    /// Forgets released handle `fh` of inode `ino` in memory, giving its
    /// record if it had one; [`Handles::save_release`] writes it out.
    pub fn released(&self, ino: u64, fh: u64) -> Option<Record> {
        self.open.lock().remove(&(ino, fh))
    }

    /// Writes the table after a release (blocking: not on an event
    /// thread). A failure is logged: the record stays in the file, and
    /// after a crash would be counted until a release that never comes
    /// (`release` refuses: the safe side).
    pub fn save_release(&self) {
        hold_seam_before_a_release_is_written();
        if let Err(e) = self.save() {
            tracing::warn!("could not record the release of a FUSE disk handle: {e}");
        }
    }

    /// The file handles recorded for inode `ino` by the OPEN request
    /// `unique`.
    fn opened_by(&self, ino: u64, unique: u64) -> Vec<u64> {
        (self.open.lock().iter())
            .filter(|(&(i, _), rec)| i == ino && rec.unique == unique && unique != 0)
            .map(|(&(_, fh), _)| fh)
            .collect()
    }

    /// The handles the crashed daemon left, once (to adopt).
    pub fn take_left(&self) -> Vec<(u64, Record)> {
        std::mem::take(&mut *self.left.lock())
    }

    /// Forgets a handle left by the crashed daemon whose session is gone.
    pub fn drop_left(&self, ino: u64, fh: u64) {
        if self.released(ino, fh).is_some() {
            self.save_release();
        }
    }

    /// Writes the table as it is once the file is ours: a write that
    /// waited for another writes the newer table.
    fn save(&self) -> Result<()> {
        self.write_out(&self.writing.lock())
    }

    /// [`Handles::save`] with the file held.
    fn write_out(&self, _writing: &parking_lot::MutexGuard<'_, ()>) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let entries: Vec<Entry> = (self.open.lock().iter())
            .map(|(&(_, fh), rec)| Entry {
                fh,
                rec: rec.clone(),
            })
            .collect();
        let body = serde_json::to_vec(&entries).expect("json");
        crate::util::write_atomic(file, &body, 0o600, true)
    }
}

impl super::RecoverFs {
    /// Counts the handles the crashed daemon left (see the module doc),
    /// once, before this process serves a request: every session's INIT
    /// (replayed at adoption) passes here first.
    pub(super) fn adopt_handles(&self) {
        self.adopted.get_or_init(|| {
            for (fh, rec) in self.handles.take_left() {
                let s = self.ds.sessions().into_iter().find(|s| s.dir == rec.dir);
                let d = s.as_ref().and_then(|s| s.disks.get(rec.disk).cloned());
                let (Some(s), Some(d)) = (s, d) else {
                    // Released before the crash: nothing left to hold.
                    self.handles.drop_left(rec.ino, fh);
                    continue;
                };
                if self.inherited.adopt(rec.ino, fh, &s, rec.disk, rec.pid) {
                    self.passthrough.adopt(rec.ino, &d, rec.passthrough);
                }
            }
        });
    }

    /// Opens disk `d` (inode `ino`) of `s` for `pid` (OPEN request
    /// `unique`): passthrough or normal (see `passthrough`), counted as the
    /// session's open handle (its id in the file handle) and recorded
    /// before it is answered. On an io thread (`open`), never an event
    /// thread: recording syncs a file.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open_disk(
        &self,
        pid: u32,
        unique: u64,
        ino: u64,
        s: Arc<Session>,
        d: Arc<Volume>,
        flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        if flags.0 & libc::O_TRUNC != 0 {
            return reply.error(fuser::Errno::EPERM);
        }
        let Some(handle) = s.open_handle(Holder::fuse(d.index, pid)) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        if unique & UNIQUE_RESEND != 0 {
            self.drop_unanswered_open(ino, unique & !UNIQUE_RESEND);
        }
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY;
        let record = self.recorder(ino, &s.dir, d.index, pid, unique & !UNIQUE_RESEND);
        let undo = move || s.close_handle(handle);
        self.watch_disk(ino, &d);
        match (self.passthrough).open(ino, &d, read_only, reply, handle, &record) {
            Opened::Replied => {}
            Opened::Refused => undo(),
            // On an io thread already: the wait may last seconds.
            Opened::MustWait(reply) => {
                (self.passthrough).wait_and_open(ino, &d, reply, handle, &record, undo)
            }
        }
    }

    /// A resent OPEN (request `unique`) of inode `ino`: the dead daemon
    /// recorded it but died before answering, so the kernel holds no
    /// handle for that record (it would hold the session, and in
    /// passthrough mode refuse writable opens, for the life of the mount).
    /// It goes as if released; this answer is recorded instead.
    fn drop_unanswered_open(&self, ino: u64, unique: u64) {
        for fh in self.handles.opened_by(ino, unique) {
            tracing::info!(ino, "an open the previous daemon recorded but did not answer was sent again: its record goes");
            if self.release_handle(ino, fuser::FileHandle(fh)) {
                // On the io thread that answers the open.
                self.handles.save_release();
            }
        }
    }

    /// What records a new open of disk `index` (inode `ino`) of the
    /// session in `dir` by `pid`, made by OPEN request `unique`.
    pub(super) fn recorder(
        &self,
        ino: u64,
        dir: &Path,
        disk: usize,
        pid: u32,
        unique: u64,
    ) -> super::passthrough::Record {
        let handles = self.handles.clone();
        let dir = dir.to_path_buf();
        std::sync::Arc::new(move |fh: fuser::FileHandle| {
            let rec = Record {
                ino,
                dir: dir.clone(),
                disk,
                pid,
                passthrough: fh.0 & 1 != 0,
                unique,
            };
            hold_seam_before_an_open_is_recorded();
            match handles.opened(fh.0, rec) {
                Ok(()) => {
                    crash_seam_after_recording_an_open();
                    true
                }
                Err(e) => {
                    tracing::warn!(disk, "open refused (EIO): could not record it in staging ({e}); a daemon adopting this mount after a crash would not count it");
                    false
                }
            }
        })
    }
}

/// Fault seam for the test that a release's write never holds an event
/// thread: it waits (up to a minute) until the file named by
/// `RECOVERFS_FAULT_HOLD_RELEASE_SAVE` exists.
fn hold_seam_before_a_release_is_written() {
    let Some(gate) = std::env::var_os("RECOVERFS_FAULT_HOLD_RELEASE_SAVE") else {
        return;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !Path::new(&gate).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Fault seam for the test that an open's record (a file sync) holds no
/// lock a release takes: once the directory named by
/// `RECOVERFS_FAULT_HOLD_OPEN_RECORD` holds `armed`, an open waits (up to
/// a minute) before it is recorded until it holds `go` too.
fn hold_seam_before_an_open_is_recorded() {
    let Some(dir) = std::env::var_os("RECOVERFS_FAULT_HOLD_OPEN_RECORD") else {
        return;
    };
    let dir = Path::new(&dir);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while dir.join("armed").exists()
        && !dir.join("go").exists()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Fault seam for the tests of a resent OPEN: the daemon dies (SIGKILL,
/// as a crash) once an open is recorded, before it is answered.
fn crash_seam_after_recording_an_open() {
    if std::env::var_os("RECOVERFS_FAULT_KILL_AFTER_OPEN_RECORDED").is_some() {
        // SAFETY: getpid cannot fail; kill only sends a signal to this
        // very process, touching no memory.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

impl super::RecoverFs {
    /// The kernel released disk inode `ino`'s handle `fh`: forgets its
    /// record (in memory: true if it had one, which
    /// [`Handles::save_release`] then writes out); for an inherited one,
    /// uncounts it.
    pub(super) fn release_handle(&self, ino: u64, fh: fuser::FileHandle) -> bool {
        let rec = self.handles.released(ino, fh.0);
        let recorded = rec.is_some();
        let Some(super::Node::Disk(s, d)) = self.node(ino) else {
            return recorded;
        };
        if super::passthrough::is_ours(fh) {
            self.passthrough.release(ino, &d, fh);
            s.close_handle(super::passthrough::session_handle(fh));
            return recorded;
        }
        self.inherited.released(ino, fh.0, &s);
        // Only an adopted record was counted in the disk's modes.
        if recorded {
            self.passthrough.release(ino, &d, fh);
        }
        recorded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ino: u64, passthrough: bool) -> Record {
        Record {
            ino,
            dir: "/s/a".into(),
            disk: 0,
            pid: 42,
            passthrough,
            unique: 0,
        }
    }

    #[test]
    fn an_adopting_table_has_what_was_open_and_a_lost_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            Handles::kept_in(dir.path(), true).is_err(),
            "no table: an adoption cannot count the handles"
        );
        let t = Handles::kept_in(dir.path(), false).unwrap();
        t.opened(7 << 32 | 2, rec(8194, false)).unwrap();
        t.opened(7 << 32 | 5, rec(8194, true)).unwrap();
        t.opened(7 << 32 | 6, rec(8195, false)).unwrap();
        assert_eq!(t.released(8195, 7 << 32 | 6), Some(rec(8195, false)));
        t.save_release();
        let adopted = Handles::kept_in(dir.path(), true).unwrap();
        assert_eq!(
            adopted.take_left(),
            vec![
                (7 << 32 | 2, rec(8194, false)),
                (7 << 32 | 5, rec(8194, true))
            ]
        );
        assert!(adopted.take_left().is_empty());
        assert!(adopted.released(8194, 7 << 32 | 5).is_some());
        adopted.save_release();
        assert_eq!(
            Handles::kept_in(dir.path(), true)
                .unwrap()
                .take_left()
                .len(),
            1
        );
        assert!(Handles::kept_in(dir.path(), false)
            .unwrap()
            .take_left()
            .is_empty());
        assert!(Handles::kept_in(dir.path(), true)
            .unwrap()
            .take_left()
            .is_empty());
        std::fs::write(dir.path().join(FILE), b"{").unwrap();
        assert!(Handles::kept_in(dir.path(), true).is_err());
    }

    #[test]
    fn an_open_that_cannot_be_recorded_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t = Handles::kept_in(dir.path(), false).unwrap();
        std::fs::remove_file(dir.path().join(FILE)).unwrap();
        std::fs::create_dir(dir.path().join(FILE)).unwrap();
        assert!(t.opened(1, rec(8194, false)).is_err());
        assert_eq!(t.released(8194, 1), None);
    }

    /// review32 H1: two VMs' disks get the same file handle (each session
    /// counts its handle ids from 1); both opens are kept, and one's
    /// release leaves the other's record.
    #[test]
    fn the_same_file_handle_on_two_disks_is_two_records() {
        let dir = tempfile::tempdir().unwrap();
        let t = Handles::kept_in(dir.path(), false).unwrap();
        let fh = 7 << 32 | 2;
        t.opened(fh, rec(8194, false)).unwrap();
        t.opened(fh, rec(16386, true)).unwrap();
        let both = Handles::kept_in(dir.path(), true).unwrap().take_left();
        assert_eq!(both, vec![(fh, rec(8194, false)), (fh, rec(16386, true))]);
        assert_eq!(t.released(8194, fh), Some(rec(8194, false)));
        t.save_release();
        let left = Handles::kept_in(dir.path(), true).unwrap().take_left();
        assert_eq!(left, vec![(fh, rec(16386, true))]);
    }

    /// A table written before review32 H1 (keyed by the handle alone) is
    /// still adopted.
    #[test]
    fn a_table_keyed_by_the_handle_alone_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let old: BTreeMap<u64, Record> = [(9, rec(8194, true))].into();
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&old).unwrap()).unwrap();
        let left = Handles::kept_in(dir.path(), true).unwrap().take_left();
        assert_eq!(left, vec![(9, rec(8194, true))]);
    }
}
