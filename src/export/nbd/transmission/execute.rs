//! One request run against the disk ([`Target`], on the blocking pool, or
//! handed to the disk to answer later): flag and range checks, reads split
//! into hole and data runs, writes, zeroes, trims, flushes (and FUA), and
//! block status. Apart from the connection: it sees no socket, only the
//! request and its payload, and answers a [`Reply`].

use std::sync::Arc;

use bytes::Bytes;

use super::extents::{
    allocation_flags, changed_flags, descriptors, push_segment, Segment, MAX_EXTENTS,
    MAX_STATUS_QUERY, MIN_HOLE,
};
use super::reply::{Content, Failure, Reply};
use crate::disk::{Disk, ReadDone, Spawner};
use crate::export::nbd::proto::*;

/// Piece size of NBD_CMD_FLAG_NO_HOLE zero writes.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// The export as one connection sees it: everything a request needs to
/// run, none of the socket.
pub(super) struct Target {
    pub(super) disk: Arc<dyn Disk>,
    /// The size advertised at negotiation.
    pub(super) size: u64,
    pub(super) structured: bool,
    pub(super) contexts: Contexts,
    /// Run before the connection's first change of the disk, then gone
    /// (`OpenGuard::on_first_change`).
    pub(super) first_change: parking_lot::Mutex<Option<crate::export::nbd::FirstChange>>,
}

impl Target {
    /// Runs one request against the disk (blocking).
    pub(super) fn execute(&self, req: &Request, payload: Vec<u8>) -> Reply {
        if let Err(f) = self.check_flags(req) {
            return Reply::Failed(f);
        }
        if matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
            self.changing();
        }
        let done = match req.typ {
            CMD_READ => return self.read(req),
            CMD_BLOCK_STATUS => return self.block_status(req),
            CMD_WRITE => self.write(req, &payload),
            CMD_FLUSH => self.disk.flush().map_err(Failure::from),
            CMD_TRIM => self.trim(req),
            CMD_WRITE_ZEROES => self.write_zeroes(req),
            t => Err(Failure::new(
                NBD_EINVAL,
                format!("{} is not supported", command_name(t)),
            )),
        };
        match done {
            Ok(()) => Reply::Done,
            Err(f) => Reply::Failed(f),
        }
    }

    /// The client is about to change the disk: the first time on this
    /// connection, runs what the export's guard asked for.
    fn changing(&self) {
        let first = self.first_change.lock().take();
        if let Some(f) = first {
            f();
        }
    }

    /// FUA is accepted on every command (the spec asks it); other flags
    /// only where they are defined and advertised.
    fn check_flags(&self, req: &Request) -> Result<(), Failure> {
        let allowed = CMD_FLAG_FUA
            | match req.typ {
                CMD_READ if self.structured => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        match req.flags & !allowed {
            0 => Ok(()),
            bad => Err(Failure::new(
                NBD_EINVAL,
                format!(
                    "command flags {bad:#x} are not valid for {}",
                    command_name(req.typ)
                ),
            )),
        }
    }

    /// Refuses a range past the end of the export before the disk sees it.
    fn check_range(&self, req: &Request, errno: u32, what: &str) -> Result<(), Failure> {
        let (off, len) = (req.offset, req.len as u64);
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Failure::new(
                errno,
                format!(
                    "{what} of {len} bytes at offset {off} is past the end of the export ({} bytes)",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Flushes after a command with NBD_CMD_FLAG_FUA: the reply then means
    /// durable.
    fn fua(&self, req: &Request) -> Result<(), Failure> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.disk.flush()?;
        }
        Ok(())
    }

    fn write(&self, req: &Request, data: &[u8]) -> Result<(), Failure> {
        self.check_range(req, NBD_ENOSPC, "write")?;
        if !data.is_empty() {
            self.disk.write_at(req.offset, data)?;
        }
        self.fua(req)
    }

    fn write_zeroes(&self, req: &Request) -> Result<(), Failure> {
        self.check_range(req, NBD_ENOSPC, "write zeroes")?;
        let (off, len) = (req.offset, req.len as u64);
        if len > 0 {
            if req.flags & CMD_FLAG_NO_HOLE != 0 {
                self.write_zero_bytes(off, len)?;
            } else {
                self.disk.write_zeroes(off, len)?;
            }
        }
        self.fua(req)
    }

    /// Zeros written as data, so the range is allocated (NO_HOLE).
    fn write_zero_bytes(&self, off: u64, len: u64) -> Result<(), Failure> {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK as u64) as usize;
            self.disk.write_at(pos, &ZEROES[..n])?;
            pos += n as u64;
        }
        Ok(())
    }

    fn trim(&self, req: &Request) -> Result<(), Failure> {
        self.check_range(req, NBD_EINVAL, "trim")?;
        if req.len > 0 {
            self.disk.discard(req.offset, req.len as u64)?;
        }
        self.fua(req)
    }

    /// A read of one data run within one block, handed to the disk to
    /// answer when its fetch ends (`Disk::read_later`); `None` when it
    /// takes the blocking path (a write, a hit, a hole, several runs).
    pub(super) fn read_later(
        &self,
        req: &Request,
    ) -> Option<tokio::sync::oneshot::Receiver<Reply>> {
        // Refusals (flags, range) are `execute`'s to answer.
        if req.typ != CMD_READ
            || req.len == 0
            || self.check_flags(req).is_err()
            || self.check_range(req, NBD_EINVAL, "read").is_err()
        {
            return None;
        }
        let (off, len) = (req.offset, req.len as u64);
        let bs = self.disk.block_size();
        if off / bs != (off + len - 1) / bs {
            return None;
        }
        // No block status here: a hit is given back by the disk, which then
        // takes `read`'s path (and its own runs), so asking for runs first
        // would do that work twice on every hit; and bytes the disk answers
        // later are always a valid reply as one data chunk.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done: ReadDone = Box::new(move |r| {
            let reply = match r {
                Ok(bytes) if bytes.len() as u64 == len => Reply::Read {
                    content: vec![Content::Data { offset: off, bytes }],
                    error: None,
                },
                Ok(bytes) => Reply::Read {
                    content: vec![],
                    error: Some((
                        off,
                        Failure::new(
                            NBD_EIO,
                            format!("short read at offset {off}: {} of {len} bytes", bytes.len()),
                        ),
                    )),
                },
                Err(e) => Reply::Read {
                    content: vec![],
                    error: Some((off, e.into())),
                },
            };
            let _ = tx.send(reply);
        });
        let handle = tokio::runtime::Handle::current();
        let spawn: Spawner = Arc::new(move |job| drop(handle.spawn_blocking(job)));
        self.disk
            .read_later(off, len as usize, done, &spawn)
            .ok()
            .map(|()| rx)
    }

    fn read(&self, req: &Request) -> Reply {
        if let Err(f) = self.check_range(req, NBD_EINVAL, "read") {
            return Reply::Failed(f);
        }
        let (off, len) = (req.offset, req.len as u64);
        let mut content = vec![];
        if len == 0 {
            return Reply::Read {
                content,
                error: None,
            };
        }
        let segments = if self.structured && req.flags & CMD_FLAG_DF == 0 {
            self.segments(off, len)
        } else {
            // Simple replies and don't-fragment: one run of data.
            vec![Segment {
                offset: off,
                len,
                zero: false,
            }]
        };
        for s in segments {
            if s.zero {
                content.push(Content::Hole {
                    offset: s.offset,
                    len: s.len as u32,
                });
                continue;
            }
            match self.read_exact(s.offset, s.len as usize) {
                Ok(bytes) => content.push(Content::Data {
                    offset: s.offset,
                    bytes: Bytes::from(bytes),
                }),
                Err(f) => {
                    return Reply::Read {
                        content,
                        error: Some((s.offset, f)),
                    }
                }
            }
        }
        Reply::Read {
            content,
            error: None,
        }
    }

    fn read_exact(&self, off: u64, len: usize) -> Result<Vec<u8>, Failure> {
        let bytes = self.disk.read_at(off, len)?;
        if bytes.len() != len {
            return Err(Failure::new(
                NBD_EIO,
                format!("short read at offset {off}: {} of {len} bytes", bytes.len()),
            ));
        }
        Ok(bytes)
    }

    /// Splits `[off, off + len)` into zero and data runs by the disk's
    /// block status. Block status is only an optimisation here: if it
    /// fails, everything is data.
    fn segments(&self, off: u64, len: u64) -> Vec<Segment> {
        let extents = self.disk.block_status(off, len).unwrap_or_default();
        let end = off + len;
        let mut out: Vec<Segment> = vec![];
        let mut pos = off;
        for e in extents {
            if pos >= end {
                break;
            }
            let n = e.len.min(end - pos);
            if n > 0 {
                push_segment(&mut out, pos, n, e.flags.zero && n >= MIN_HOLE);
                pos += n;
            }
        }
        if pos < end {
            push_segment(&mut out, pos, end - pos, false);
        }
        out
    }

    fn block_status(&self, req: &Request) -> Reply {
        if !self.structured || !self.contexts.any() {
            return Reply::Failed(Failure::new(
                NBD_EINVAL,
                "block status needs a metadata context selected with NBD_OPT_SET_META_CONTEXT",
            ));
        }
        if let Err(f) = self.check_range(req, NBD_EINVAL, "block status") {
            return Reply::Failed(f);
        }
        if req.len == 0 {
            return Reply::Failed(Failure::new(NBD_EINVAL, "block status of 0 bytes"));
        }
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        // The disk is asked a bounded piece at a time, and no more pieces
        // once a reply's worth of extents is in: a sparse disk answers a
        // whole request (4 GiB) in one reply, a fragmented one stops early.
        let (mut extents, mut query) = (vec![], 0);
        while query < req.len as u64 && extents.len() < MAX_EXTENTS && !(req_one && query > 0) {
            let piece = (req.len as u64 - query).min(MAX_STATUS_QUERY);
            match self.disk.block_status(req.offset + query, piece) {
                Ok(e) => extents.extend(e),
                Err(e) => return Reply::Failed(e.into()),
            }
            query += piece;
        }
        let mut chunks = vec![];
        if self.contexts.allocation {
            chunks.push((
                ALLOCATION_ID,
                descriptors(&extents, query, req_one, allocation_flags),
            ));
        }
        if self.contexts.changed {
            chunks.push((
                CHANGED_ID,
                descriptors(&extents, query, req_one, changed_flags),
            ));
        }
        if chunks.iter().any(|(_, d)| d.is_empty()) {
            return Reply::Failed(Failure::new(NBD_EIO, "the disk reported no extents"));
        }
        Reply::Status(chunks)
    }
}
