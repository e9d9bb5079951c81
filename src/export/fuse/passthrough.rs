//! Kernel FUSE passthrough for read-only opens (opt-in: `serve
//! --fuse-passthrough`).
//!
//! **What it does.** An `O_RDONLY` open of a disk whose file holds every
//! byte (fully staged, or relocated and cut over: then the target file) is
//! answered with a FUSE backing id: the kernel reads that file itself and
//! the daemon sees none of those reads (copies, checksums, `qemu-img
//! convert` run at the staging file's speed). Only read-only opens get it,
//! so every write (a writable FUSE open, NBD, NFS) still passes the volume
//! and its changed-block tracking. The volume keeps the disk complete while
//! such an open exists: no eviction, no relocation start (see
//! `volume::passthrough`).
//!
//! **The trade-off, and why it is opt-in.** The kernel wants all opens of
//! an inode in one I/O mode (`fs/fuse/iomode.c`: while the inode has a
//! backing file, a non-passthrough open fails with EIO). So:
//! * while a disk has a normal open (a running VM), read-only opens take
//!   the normal path (nothing is refused);
//! * while it has passthrough opens, a writable open, e.g. starting the VM
//!   while a `cp` of its disk runs, waits up to [`RELEASE_GRACE`] for their
//!   releases (the kernel sends a release only after `close` returned),
//!   then is refused with EBUSY and one warning naming VM and disk.
//!
//! Refusing the VM's own open would make passthrough a hazard for the main
//! use case, booting the VM, so it is off unless asked for.
//!
//! Bookkeeping: per disk inode, its normal and passthrough opens and the
//! one backing id all passthrough opens share (the kernel requires one per
//! inode), under one lock so an open's mode is decided against the others'.
//! The daemon's counts lag the kernel's (a release arrives after the kernel
//! dropped the open), which only ever errs towards the safe side: a
//! read-only open taking the normal path, or a writable one waiting.
//! If the kernel refuses passthrough (at init, or a backing file later),
//! it is logged once and every open takes the normal path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackingId, Errno, FileHandle, FopenFlags, KernelConfig, ReplyOpen};
use parking_lot::{Condvar, Mutex};

use crate::volume::Volume;

/// The bit of a file handle that marks a passthrough open; bits 1..32
/// are the session's id of the open handle (`Session::open_handle`), which
/// the release closes; the high 32 bits are this process's epoch, so a
/// handle opened under a crashed daemon (see `keeper`) is never taken for
/// one of ours.
const PASSTHROUGH_FH: u64 = 1;

static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// This process's file-handle epoch: random, never 0.
fn epoch() -> u64 {
    *EPOCH.get_or_init(|| (rand::random::<u32>() | 1) as u64)
}

/// Chooses this process's epoch, before any file handle is made, unlike
/// every one of `taken` (the epochs of the handles a crashed daemon left):
/// one drawn equal to a dead daemon's would take its handles for ours
/// (review32 L11). Nothing once the epoch is chosen.
pub fn choose_epoch(taken: &[u64]) {
    EPOCH.get_or_init(|| epoch_unlike(taken, rand::random::<u32>));
}

/// The first epoch `draw` gives (made odd: never 0) that is none of
/// `taken`.
fn epoch_unlike(taken: &[u64], mut draw: impl FnMut() -> u32) -> u64 {
    loop {
        let e = (draw() | 1) as u64;
        if !taken.contains(&e) {
            return e;
        }
    }
}

/// The file handle of an open with session handle `handle`.
pub fn file_handle(handle: u64, passthrough: bool) -> FileHandle {
    debug_assert!(handle < 1 << 31);
    FileHandle(epoch() << 32 | (handle & 0x7fff_ffff) << 1 | passthrough as u64)
}

/// The session handle of file handle `fh`.
pub fn session_handle(fh: FileHandle) -> u64 {
    (fh.0 & 0xffff_ffff) >> 1
}

/// Whether `fh` was handed out by this process (not inherited from the
/// daemon whose connection it adopted).
pub fn is_ours(fh: FileHandle) -> bool {
    fh.0 >> 32 == epoch()
}

/// How long a normal open waits for passthrough opens' releases before it
/// is refused.
pub const RELEASE_GRACE: Duration = Duration::from_secs(2);

/// A disk inode's opens: the kernel wants them all in one mode.
#[derive(Default)]
struct DiskOpens {
    normal: u32,
    passthrough: u32,
    /// Shared by all passthrough opens of the inode, as the kernel requires.
    /// None while it has passthrough opens: theirs is a crashed daemon's
    /// (see [`Passthrough::adopt`]), which this process cannot share.
    backing: Option<Arc<BackingId>>,
    /// The volume is held complete (`Volume::begin_direct_read`).
    held: bool,
}

/// Records an open's file handle before it is answered (`handles`); false
/// if it could not be, and the open fails with EIO.
pub type Record = Arc<dyn Fn(FileHandle) -> bool + Send + Sync>;

/// What [`Passthrough::open`] did with an open.
pub enum Opened {
    Replied,
    /// Answered with an error: give the session handle back.
    Refused,
    /// Passthrough opens are in the way: call [`Passthrough::wait_and_open`]
    /// off the event thread.
    MustWait(ReplyOpen),
}

pub struct Passthrough {
    /// Asked for (`--fuse-passthrough`).
    wanted: bool,
    /// Asked for, accepted by the kernel at init, and not failed since.
    on: AtomicBool,
    opens: Mutex<HashMap<u64, DiskOpens>>,
    /// Signalled when an inode's last passthrough open is released.
    released: Condvar,
}

/// Opens normally if the open is recorded (false if not: EIO answered).
fn open_normally(reply: ReplyOpen, handle: u64, record: &Record) -> bool {
    let fh = file_handle(handle, false);
    if !record(fh) {
        reply.error(Errno::EIO);
        return false;
    }
    // Every write goes through us, so the kernel's cache stays coherent.
    reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
    true
}

impl Passthrough {
    pub fn new(wanted: bool) -> Self {
        Passthrough {
            wanted,
            on: AtomicBool::new(false),
            opens: Mutex::new(HashMap::new()),
            released: Condvar::new(),
        }
    }

    /// At FUSE init: asks the kernel for passthrough if it was wanted.
    pub fn negotiate(&self, config: &mut KernelConfig) {
        if !self.wanted {
            return;
        }
        // A stack depth of 1: the files we pass to sit on a plain
        // filesystem.
        let ok = config.set_max_stack_depth(1).is_ok()
            && config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok();
        if ok {
            tracing::info!("FUSE passthrough on: read-only opens of complete disks bypass the daemon; writable opens are refused while they last");
        } else {
            tracing::warn!("--fuse-passthrough: the kernel lacks FUSE passthrough, every disk read passes the daemon");
        }
        self.on.store(ok, Ordering::Release);
    }

    /// Opens disk inode `ino` in passthrough mode if it may (see the
    /// module doc), else normally if it can, else hands the reply back.
    /// `handle`: the session's id of the open, kept in its file handle.
    pub fn open(
        &self,
        ino: u64,
        d: &Volume,
        read_only: bool,
        reply: ReplyOpen,
        handle: u64,
        record: &Record,
    ) -> Opened {
        let refused = |ok| if ok { Opened::Replied } else { Opened::Refused };
        let mut opens = self.opens.lock();
        if !self.wanted {
            // Only a crashed daemon's passthrough opens (see `adopt`) are
            // in the way: started with the option, restarted without it.
            if opens.get(&ino).is_some_and(|o| o.passthrough > 0) {
                return Opened::MustWait(reply);
            }
            drop(opens);
            return refused(open_normally(reply, handle, record));
        }
        let o = opens.entry(ino).or_default();
        // Passthrough opens with no backing id of ours: a crashed daemon's.
        let theirs = o.passthrough > 0 && o.backing.is_none();
        if read_only && o.normal == 0 && !theirs && self.on.load(Ordering::Acquire) {
            let id = match &o.backing {
                // The disk is held complete since the first passthrough open.
                Some(id) => Some(id.clone()),
                None => self.backing(d, &reply).map(Arc::new),
            };
            if let Some(id) = id {
                let fh = file_handle(handle, true);
                // Counted before it is recorded, which syncs a file: that
                // runs outside the lock (a release on an event thread
                // takes it), and the count keeps normal opens out
                // meanwhile; uncounted as a release would if it cannot be.
                o.held |= o.backing.is_none();
                o.backing = Some(id.clone());
                o.passthrough += 1;
                drop(opens);
                if !record(fh) {
                    self.release(ino, d, fh);
                    reply.error(Errno::EIO);
                    return Opened::Refused;
                }
                reply.opened_passthrough(fh, FopenFlags::empty(), &id);
                return Opened::Replied;
            }
        }
        if o.passthrough > 0 {
            return Opened::MustWait(reply);
        }
        refused(self.count_and_open_normally(opens, ino, d, reply, handle, record))
    }

    /// Counts a normal open of `ino` under `opens`, then records and
    /// answers it outside the lock (the record syncs a file; see
    /// [`Passthrough::open`]); uncounts it if it could not be recorded.
    fn count_and_open_normally(
        &self,
        mut opens: parking_lot::MutexGuard<'_, HashMap<u64, DiskOpens>>,
        ino: u64,
        d: &Volume,
        reply: ReplyOpen,
        handle: u64,
        record: &Record,
    ) -> bool {
        opens.entry(ino).or_default().normal += 1;
        drop(opens);
        let ok = open_normally(reply, handle, record);
        if !ok {
            self.release(ino, d, file_handle(handle, false));
        }
        ok
    }

    /// Counts an open the crashed daemon whose connection this one adopted
    /// made (see `handles`), in its mode: a passthrough one holds the disk
    /// complete again (its backing id is the crashed daemon's: this process
    /// cannot close it, the kernel drops it with the connection).
    pub fn adopt(&self, ino: u64, d: &Volume, passthrough: bool) {
        let mut opens = self.opens.lock();
        let o = opens.entry(ino).or_default();
        if !passthrough {
            o.normal += 1;
            return;
        }
        if !o.held {
            o.held = d.begin_direct_read().is_some();
            if !o.held {
                tracing::warn!(vm = %d.vm, disk = d.index, "a read-only open passed through under the crashed daemon, but the disk cannot be held complete now: its reader may see zeros where staging is evicted");
            }
        }
        o.passthrough += 1;
    }

    /// A backing id for the file `d` serves from, holding `d` complete, if
    /// `d` is complete and the kernel takes the file.
    fn backing(&self, d: &Volume, reply: &ReplyOpen) -> Option<BackingId> {
        let file = d.begin_direct_read()?;
        let Some(fd) = file.as_fd() else {
            // Storage without a plain file (tests' fault injection).
            d.end_direct_read();
            return None;
        };
        match reply.open_backing(fd) {
            Ok(id) => {
                tracing::debug!(vm = %d.vm, disk = d.index, "read-only open passes through");
                Some(id)
            }
            Err(e) => {
                d.end_direct_read();
                if self.on.swap(false, Ordering::AcqRel) {
                    tracing::warn!(
                        vm = %d.vm,
                        disk = d.index,
                        "the kernel refused a FUSE passthrough file ({e}): from now on every disk read passes the daemon"
                    );
                }
                None
            }
        }
    }

    /// Blocks up to [`RELEASE_GRACE`] for the passthrough opens of `ino` to
    /// be released, then opens normally; or refuses with EBUSY (logged),
    /// calling `undo` first. Runs off the event thread.
    pub fn wait_and_open(
        &self,
        ino: u64,
        d: &Volume,
        reply: ReplyOpen,
        handle: u64,
        record: &Record,
        undo: impl FnOnce(),
    ) {
        let deadline = Instant::now() + RELEASE_GRACE;
        let mut opens = self.opens.lock();
        let mut timed_out = false;
        let readers = loop {
            let o = opens.entry(ino).or_default();
            if o.passthrough == 0 {
                if !self.count_and_open_normally(opens, ino, d, reply, handle, record) {
                    undo();
                }
                return;
            }
            if timed_out {
                break o.passthrough;
            }
            timed_out = self.released.wait_until(&mut opens, deadline).timed_out();
        };
        drop(opens);
        undo();
        tracing::warn!(
            vm = %d.vm,
            disk = d.index,
            "open of disk{} of VM {} refused (EBUSY): {readers} read-only open(s) of it use FUSE passthrough (--fuse-passthrough), which the kernel does not mix with other opens; close them (e.g. a copy of the disk), then open it again",
            d.index,
            d.vm
        );
        reply.error(Errno::EBUSY)
    }

    /// The kernel released an open of disk inode `ino` with handle `fh`.
    pub fn release(&self, ino: u64, d: &Volume, fh: FileHandle) {
        let mut opens = self.opens.lock();
        let Some(o) = opens.get_mut(&ino) else { return };
        if fh.0 & PASSTHROUGH_FH != 0 {
            o.passthrough = o.passthrough.saturating_sub(1);
            if o.passthrough == 0 {
                o.backing = None;
                if std::mem::take(&mut o.held) {
                    d.end_direct_read();
                }
                self.released.notify_all();
            }
        } else {
            o.normal = o.normal.saturating_sub(1);
        }
        if o.normal == 0 && o.passthrough == 0 {
            opens.remove(&ino);
        }
    }
}

#[cfg(test)]
mod epoch_tests {
    use super::*;

    /// review32 L11: an epoch equal to one a dead daemon's recorded
    /// handles carry would take them for this process's own.
    #[test]
    fn an_epoch_the_dead_daemons_handles_carry_is_drawn_again() {
        let mut draws = [6u32, 9, 10].into_iter();
        assert_eq!(epoch_unlike(&[7, 9], || draws.next().unwrap()), 11);
    }
}
