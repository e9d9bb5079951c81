//! One block's fetch as the fetch engine runs it (`prefetch::scheduler`):
//! * prepare, on a CPU thread: the release check, room in the staging
//!   budget, and the chunk's GET (not started yet);
//! * the GET, awaited on the engine's runtime; the volume is not held
//!   meanwhile (only a weak reference);
//! * finish, on a CPU thread: decrypt, decompress, verify, hand the bytes
//!   to the slot's readers (they answer now: a guest's miss does not wait
//!   for the staging write), write staging, mark the block present, end
//!   the fill (writers waiting for it proceed).
//!
//! The relocation copier's own fetches are *unstaged*: their bytes go to
//! the slot's waiters (the copier, and any reader that joined) and not to
//! staging, so a relocation writes every byte once, to the target. If a
//! reader or a prefetch promoted the job meanwhile (someone else wants the
//! block kept), its finish stages it after all, when staging has room.
//!
//! **Copies per MiB of a miss** (a cold 1 MiB read within one block, S3
//! backend, FUSE; counting every pass that writes the bytes anew):
//! 1. kernel socket buffer → the HTTP client's read buffer (`recv`);
//! 2. the body's frames → one contiguous object, aligned for direct I/O
//!    (`s3::collect_aligned`, in place of `object_store`'s collect; a
//!    local repository's file read is the object);
//! 3. (encrypted only) XChaCha20 decrypts in place in that object: a
//!    pass, no second buffer (`crypto::Keys::open_chunk`);
//! 4. zstd decompresses into a `Vec` with the chunk's capacity, not
//!    zero-filled, with this CPU thread's reused context (`chunk::decode`;
//!    BLAKE3 then reads it: a pass, no copy). A chunk zstd could not
//!    shrink is stored raw and skips this copy: the fetched object is
//!    truncated to its plain bytes and hashed in place
//!    (`chunk::decode_owned`; 4 copies, 3 of them the kernel's);
//! 5. `pwrite` into staging (copy-on-read must stage), into fresh
//!    page-cache pages: on this VM (free pages go back to the host) up to
//!    half of the daemon's CPU per cold GiB, 2.2 CPU-s per GiB on its own
//!    right after a cache drop. With `serve --stage-fills-direct` it goes
//!    past the page cache (`O_DIRECT`, `BlockFile::write_fill_at`): the
//!    device's DMA straight from the aligned object (S3, raw chunk);
//!    other buffers pass through the CPU thread's reused aligned buffer
//!    (a copy in user space). Not the default: a staged block read again
//!    then waits for the disk, behind e.g. another VM's fsync;
//! 6. FUSE `writev` of the reply → the reader's buffer: the reply is a
//!    slice of the fetched bytes (`Volume::read_bytes`), shared by every
//!    waiter, never a staging read-back.
//!
//! Before: 6 for a plain repository and 7 for an encrypted one (the
//! waiter copied the block into a reply buffer, and decryption wrote a
//! second buffer); now 5 for both, 3 of them in the kernel (socket,
//! staging, FUSE) and one the decompression itself. A read spanning
//! blocks, or served over NBD/NFS (`Disk::read_at` returns a `Vec`),
//! still assembles one reply buffer: one copy more. Copy 2 remains: the
//! decoder wants the frame in one piece, and a streaming decoder would
//! buffer straddling blocks internally instead. `staging_reads` in the
//! disk's status counts staging preads; waiters of a fetch make none. A
//! hit (every block staged) is one pread into a buffer that is not
//! zero-filled first (`BlockFile::read_append`).
//!
//! **Staging full.** When the budget refuses room (full, nothing
//! evictable: every staged block changed), a fetch a read waits for
//! (`Slot::read_waits`) reads through: its bytes answer the read, nothing
//! is staged, the block is fetched again when read (`read_through` in the
//! disk's status). A fill a write waits for (`Slot::write_waits`) is
//! refused (ENOSPC: the write needs the block staged); a read that joined
//! it starts its own fill (`read::is_room_refusal`). A prefetch only fills
//! below the low watermark (`Budget::reserve_speculative`); one held back
//! ends with no bytes and no error, and whoever joined it plans again. A
//! guest read therefore never fails for want of staging room.
//!
//! A [`Fetch`] always answers its slot exactly once: when it succeeds or
//! fails, when a stage panics, and when it is dropped unrun (the volume
//! was released, or the engine stopped), so no reader ever waits forever.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::fill::Slot;
use super::Volume;
use crate::error::{Error, ErrorKind, Result};
use crate::prefetch::scheduler::Step;
use crate::repo::backend::{GetFuture, Got};

/// What a fetch's prepare decided (see `Volume::room_for_fill`).
enum Request {
    /// The GET to await, and whether its bytes are staged.
    Get(GetFuture, bool),
    /// A prefetch that found no room: no GET.
    HeldBack,
}

/// Where a fill's bytes may go.
enum Room {
    Stage,
    ReadThrough,
    HoldBack,
}

/// A queued or running fetch of one block.
pub(super) struct Fetch {
    vol: Weak<Volume>,
    b: u64,
    slot: Arc<Slot>,
    /// When prepare began (the fetch latency's start).
    started: Option<Instant>,
    answered: bool,
    /// Write staging and mark the block present (false: the copier's
    /// fetch, see the module doc, or a read through a full staging).
    stage: bool,
    /// A staged fetch that found no room in staging and reads through:
    /// its bytes answer its readers and are not staged.
    read_through: bool,
}

impl Drop for Fetch {
    fn drop(&mut self) {
        if !self.answered {
            self.answer(Err(Error::busy(
                "the fetch ended unrun: the disk was released or the daemon is stopping",
            )));
        }
    }
}

impl Fetch {
    fn answer(&mut self, r: Result<u64>) {
        self.answered = true;
        match self.vol.upgrade() {
            Some(v) => v.fetched(self.b, &self.slot, r, self.started, self.stage),
            // The volume is gone: nobody waits for this block any more.
            None => self.slot.finish(Err(Error::busy("the disk was released"))),
        }
    }

    /// Stage 1 (see the module doc).
    fn prepare(mut self) -> Step {
        let Some(v) = self.vol.upgrade() else {
            return Step::Done; // dropping `self` answers
        };
        let _span = v.fetch_span(self.b).entered();
        self.started = Some(Instant::now());
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            v.fetch_request(self.b, &self.slot, self.stage)
        }))
        .unwrap_or_else(|p| Err(v.internal_error(self.b, &p)));
        drop(v);
        match r {
            Ok(Request::Get(request, staged)) => {
                self.read_through = self.stage && !staged;
                self.stage = staged;
                Step::Get {
                    request,
                    then: Box::new(move |got| self.finish(got)),
                }
            }
            Ok(Request::HeldBack) => {
                self.answered = true;
                if let Some(v) = self.vol.upgrade() {
                    v.held_back(self.b, &self.slot);
                } else {
                    self.slot.finish(Ok(()));
                }
                Step::Done
            }
            Err(e) => {
                self.answer(Err(e));
                Step::Done
            }
        }
    }

    /// Stage 3 (see the module doc).
    fn finish(mut self, got: Got) {
        let Some(v) = self.vol.upgrade() else {
            return; // dropping `self` answers
        };
        let _span = v.fetch_span(self.b).entered();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            v.store_fetched(self.b, &self.slot, got, self.stage, !self.read_through)
        }))
        .unwrap_or_else(|p| Err(v.internal_error(self.b, &p)));
        drop(v);
        let r = r.map(|(n, staged)| {
            self.stage = staged;
            n
        });
        self.answer(r);
    }
}

impl Volume {
    /// Queues the fetch of `b` at the most urgent class asked for so far;
    /// `stage`: see [`Fetch::stage`].
    pub(super) fn queue_fetch(&self, b: u64, s: &Arc<Slot>, stage: bool) {
        let mut j = s.job.lock();
        let fetch = Fetch {
            vol: self.me.clone(),
            b,
            slot: s.clone(),
            started: None,
            answered: false,
            stage,
            read_through: false,
        };
        let bytes = self.block_len(b);
        j.0 = Some(
            self.sched
                .submit_for(self.tenant, j.1, bytes, move || fetch.prepare()),
        );
    }

    fn fetch_span(&self, b: u64) -> tracing::Span {
        tracing::debug_span!("fetch", vm = %self.vm, disk = self.index, offset = b * self.block_size)
    }

    fn internal_error(&self, b: u64, p: &Box<dyn std::any::Any + Send>) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "fetch of VM {} disk{} block {b} failed: internal error ({})",
                self.vm,
                self.index,
                crate::util::panic_message(p)
            ),
        )
    }

    fn chunk_place(&self, b: u64) -> String {
        format!(
            "VM {} backup {} disk{} block {b}",
            self.vm, self.backup, self.index
        )
    }

    /// Before the GET: still open, and room in staging for the block (if
    /// it is to be staged). The request, and whether the block is staged.
    fn fetch_request(&self, b: u64, slot: &Slot, stage: bool) -> Result<Request> {
        self.check_open()?;
        let stage = match stage {
            true => match self.room_for_fill(b, slot)? {
                Room::Stage => true,
                Room::ReadThrough => false,
                Room::HoldBack => return Ok(Request::HeldBack),
            },
            false => false,
        };
        let digest = self.chunks.get(b).expect("fetch of a zero chunk");
        Ok(Request::Get(
            self.repo.chunk_request(&digest, self.block_len(b) as usize),
            stage,
        ))
    }

    /// Room in staging for a fill of `b`:
    /// * a read waits for it: room if there is any, else it reads through
    ///   (answered from the repository each time it is read) rather than
    ///   fail with ENOSPC;
    /// * a prefetch (no read waits yet): room below the low watermark,
    ///   evicting no other disk's blocks, else it is held back (ends with
    ///   no bytes; a read that joined it plans again);
    /// * a write's fill: room, evicting any disk's, or ENOSPC.
    fn room_for_fill(&self, b: u64, slot: &Slot) -> Result<Room> {
        // A write needs the block staged: room, or its refusal (a read
        // that joined it then fills for itself, reading through).
        if slot.write_waits.load(Ordering::Acquire) {
            return self.admit(slot).map(|()| Room::Stage);
        }
        if !slot.read_waits.load(Ordering::Acquire) {
            let class = slot.job.lock().0.as_ref().map(|j| j.class());
            if let Some(c) = class.filter(|&c| c > crate::prefetch::Class::OnDemand) {
                return match self.admit_speculative(slot, c) {
                    Ok(()) => Ok(Room::Stage),
                    Err(e) if e.kind() == ErrorKind::NoSpace => {
                        tracing::trace!(vm = %self.vm, disk = self.index, block = b, "{e}");
                        Ok(Room::HoldBack)
                    }
                    Err(e) => Err(e),
                };
            }
            return self.admit(slot).map(|()| Room::Stage);
        }
        match self.admit_for_read(slot) {
            Ok(()) => Ok(Room::Stage),
            Err(e) if e.kind() == ErrorKind::NoSpace => {
                self.stats.read_through.add(1);
                if let Some(more) = self.read_through_log.line_suffix() {
                    tracing::warn!(vm = %self.vm, disk = self.index, block = b, "a read's block is fetched without being staged (it is fetched again each time it is read): {e}{more}");
                }
                Ok(Room::ReadThrough)
            }
            Err(e) => Err(e),
        }
    }

    /// After the GET: verified plain bytes into staging (if staged) and
    /// the slot; the bytes read from the repository, and whether the
    /// block was staged. An unstaged fetch a more urgent waiter promoted
    /// is staged after all if `promotable` (not a read through).
    fn store_fetched(
        &self,
        b: u64,
        slot: &Slot,
        got: Got,
        stage: bool,
        promotable: bool,
    ) -> Result<(u64, bool)> {
        let digest = self.chunks.get(b).expect("fetch of a zero chunk");
        let (data, n) = self.repo.open_chunk(
            &digest,
            got,
            self.block_len(b) as usize,
            &self.chunk_place(b),
        )?;
        let stage = stage || (promotable && self.stage_promoted_copy(slot));
        let data = data.into_bytes();
        // A released disk's readers get its error, not the bytes.
        self.check_open()?;
        // Readers answer now, from the verified bytes; the fill (writers,
        // the presence bit) ends only after the staging write.
        slot.set_data(data.clone());
        if stage {
            self.staging_fill(&data, b * self.block_size)?;
        }
        Ok((n, stage))
    }

    /// A prefetch held back for want of room ends with no bytes and no
    /// error: nothing failed, and its waiters (a read or write that joined
    /// it after its prepare) find the block missing and fill it
    /// themselves, as after a failed write's claim.
    fn held_back(&self, b: u64, slot: &Slot) {
        self.complete_unstaged(b, slot, Ok(()));
    }

    /// An unstaged (copier's) fetch that a more urgent waiter promoted is
    /// staged after all, if staging has room for it now.
    fn stage_promoted_copy(&self, slot: &Slot) -> bool {
        use crate::prefetch::Class;
        let class = slot.job.lock().0.as_ref().map(|j| j.class());
        match class {
            // A guest waits (its read is answered either way).
            _ if slot.read_waits.load(Ordering::Acquire) => self.admit_for_read(slot).is_ok(),
            Some(Class::OnDemand) => self.admit(slot).is_ok(),
            Some(c) if c < Class::Relocation => self.admit_speculative(slot, c).is_ok(),
            _ => false,
        }
    }

    /// The end of a fetch, however it ended: figures, the log line, then
    /// the slot's waiters.
    fn fetched(&self, b: u64, slot: &Slot, r: Result<u64>, started: Option<Instant>, staged: bool) {
        match &r {
            Ok(n) => {
                self.stats.fetched_blocks.add(1);
                self.stats.fetched_bytes.add(*n);
                if let Some(t) = started {
                    self.stats.fetch_latency.record(t.elapsed());
                }
            }
            Err(e) if self.closed.load(Ordering::Acquire) => {
                tracing::debug!(vm = %self.vm, disk = self.index, block = b, "fetch ended at release: {e}");
            }
            // The bytes were verified and answered every reader; only their
            // staging write failed (staging full, typically for every miss
            // in a row): no read failed, so neither a fetch error nor an
            // error line per block.
            Err(e) if slot.data.get().is_some() => {
                self.stats.staging_write_errors.add(1);
                *self.stats.last_staging_write_error.lock() = Some(e.to_string());
                if let Some(more) = self.staging_write_log.line_suffix() {
                    tracing::warn!(vm = %self.vm, disk = self.index, block = b, "a fetched block could not be staged (its reads were answered; it is fetched again when read): {e}{more}");
                }
            }
            // A write's fill refused room in a full staging: the write
            // gets ENOSPC itself; no fetch failed (the budget counts it,
            // and a read that joined it fills for itself, reading through).
            Err(e) if e.kind() == ErrorKind::NoSpace => {
                tracing::debug!(vm = %self.vm, disk = self.index, block = b, "fetch not started: {e}");
            }
            Err(e) => {
                self.stats.fetch_errors.add(1);
                *self.stats.last_fetch_error.lock() = Some(e.to_string());
                let chunk = self.chunks.get(b).map(|d| d.to_hex()).unwrap_or_default();
                tracing::error!(vm = %self.vm, disk = self.index, block = b, chunk, "fetch failed: {e}");
            }
        }
        if staged {
            self.complete(b, slot, r.map(|_| ()));
        } else {
            self.complete_unstaged(b, slot, r.map(|_| ()));
        }
    }
}
