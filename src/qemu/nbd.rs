//! A blocking NBD client (doc/proto.md of NetworkBlockDevice/nbd) that
//! reads the point-in-time views QEMU exports over its NBD server, chunk
//! by chunk, skipping holes and, for incrementals, clean ranges.
//!
//! Implemented: the fixed newstyle handshake (`NBD_FLAG_C_NO_ZEROES` when
//! offered); `NBD_OPT_STRUCTURED_REPLY` (required); `NBD_OPT_SET_META_CONTEXT`
//! for the contexts the caller names (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`, `recoverfs:changed`), each of which the server
//! must select; `NBD_OPT_GO` (export size and flags, block size
//! constraints); the commands `READ` (data, hole and error chunks; requests
//! above the server's maximum block size, at most 32 MiB, are split),
//! `BLOCK_STATUS` (repeated until the asked range is covered, since a
//! server may answer for less) and `DISC` (also on drop, best effort).
//! Transport: any blocking `Read + Write` stream; Unix and TCP sockets are
//! wrapped with an I/O timeout so that a hung server fails a call instead of
//! blocking it forever.
//!
//! Not implemented: writes and every other command (a backup only reads),
//! TLS (QEMU's export is reached over a local Unix socket), the oldstyle
//! and non-fixed newstyle handshakes, extended headers, and more than one
//! request in flight (one at a time keeps the reply matching trivial; a
//! backup reads large chunks, so latency per request matters little).
//!
//! Hostile or broken servers: every length the server sends is bounded
//! before anything is allocated for it (option replies 64 KiB, error and
//! hole chunks 64 KiB, block status chunks 4 MiB, data chunks the request's
//! own length); every reply's handle, offset and length is checked against
//! the request. A violation is a one-line error and leaves the client
//! unusable (the stream may be out of step); an error the server reports
//! for one request (an `NBD_REPLY_TYPE_ERROR*` chunk) fails only that call.
//!
//! Why written here: no crate on crates.io has `NBD_OPT_GO`, structured
//! replies and block status together (`nbd` 0.3 has none of them), and
//! libnbd has no crate on crates.io.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::export::nbd::proto::{
    command_name, option_request, Request, CMD_BLOCK_STATUS, CMD_DISC, CMD_READ,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES,
    IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, MAX_PAYLOAD, MAX_STRING, NBDMAGIC, NBD_EINVAL, NBD_EIO,
    NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN,
    OPTION_REPLY_MAGIC, OPT_ABORT, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REP_ACK, REP_ERR_INVALID,
    REP_ERR_POLICY, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

/// In the message of every error reply of the server (a request it
/// refused or could not carry out, as opposed to a broken connection).
pub const SERVER_FAILED: &str = "the server failed";

pub use crate::export::nbd::proto::{CONTEXT_ALLOCATION, STATE_HOLE, STATE_ZERO};

/// The `qemu:dirty-bitmap:NAME` context flag of a dirty range.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The context name of QEMU's dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

// Option reply errors our server never sends (so proto.rs lacks them).
const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
/// The second magic of an oldstyle server, to name it in the error.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Largest option reply accepted: strings are at most 4 KiB, so only a
/// broken server sends more.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Metadata contexts accepted in one `SET_META_CONTEXT` answer.
const MAX_CONTEXT_REPLIES: usize = 1024;
/// Largest payload of an error, hole or `NONE` chunk.
const MAX_SMALL_CHUNK: u32 = 64 << 10;
/// Largest block status chunk: QEMU sends at most 128 Ki extents (1 MiB).
const MAX_STATUS_CHUNK: u32 = 4 << 20;
/// Pieces one read may arrive in before the server counts as hostile
/// (QEMU sends one data or hole chunk per allocation run).
const MAX_READ_PIECES: usize = 64 << 10;
/// Largest read request, whatever the server allows: the spec's
/// interoperable maximum.
const MAX_READ_REQUEST: u32 = MAX_PAYLOAD;
/// I/O timeout of the sockets `connect_unix` and `connect_tcp` open.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// A run of the export with one set of context flags (for
/// `base:allocation`: [`STATE_HOLE`], [`STATE_ZERO`]; for a dirty bitmap:
/// [`STATE_DIRTY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

/// One connection to one export, in transmission phase.
pub struct NbdClient<S: Read + Write> {
    stream: S,
    /// "NBD export 'disk0' at unix:/run/x.sock", for messages.
    what: String,
    size: u64,
    transmission_flags: u16,
    /// Block size constraints; 1 / 4096 / 32 MiB when the server sent none.
    min_block: u32,
    preferred_block: u32,
    /// Largest read request sent (server maximum, capped, a multiple of
    /// `min_block`).
    max_read: u32,
    /// Largest block status request sent.
    max_status: u32,
    /// Negotiated metadata contexts: (server's id, name).
    contexts: Vec<(u32, String)>,
    next_handle: u64,
    /// Set by a protocol violation or a transport error: the stream may be
    /// out of step, so every later call fails with this.
    broken: Option<String>,
    disconnected: bool,
}

impl NbdClient<UnixStream> {
    /// Connects to the NBD server on Unix socket `path` and opens `export`
    /// with the metadata `contexts` selected.
    pub fn connect_unix(
        path: impl AsRef<Path>,
        export: &str,
        contexts: &[&str],
    ) -> Result<NbdClient<UnixStream>> {
        let path = path.as_ref();
        let peer = format!("unix:{}", path.display());
        let s = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("cannot connect to the NBD server at {peer}"), e))?;
        let timeout = Some(DEFAULT_TIMEOUT);
        s.set_read_timeout(timeout)
            .and_then(|()| s.set_write_timeout(timeout))
            .map_err(|e| Error::io(format!("NBD server at {peer}: set timeout"), e))?;
        NbdClient::handshake(s, &peer, export, contexts)
    }
}

impl NbdClient<TcpStream> {
    /// Connects to the NBD server at `addr` (e.g. "127.0.0.1:10809") and
    /// opens `export` with the metadata `contexts` selected.
    pub fn connect_tcp(
        addr: impl ToSocketAddrs + fmt::Display,
        export: &str,
        contexts: &[&str],
    ) -> Result<NbdClient<TcpStream>> {
        let peer = format!("tcp:{addr}");
        let s = TcpStream::connect(&addr)
            .map_err(|e| Error::io(format!("cannot connect to the NBD server at {peer}"), e))?;
        let timeout = Some(DEFAULT_TIMEOUT);
        s.set_read_timeout(timeout)
            .and_then(|()| s.set_write_timeout(timeout))
            .and_then(|()| s.set_nodelay(true))
            .map_err(|e| Error::io(format!("NBD server at {peer}: socket options"), e))?;
        NbdClient::handshake(s, &peer, export, contexts)
    }
}

/// Reply chunk header (structured) or simple reply, as read.
struct Chunk {
    flags: u16,
    typ: u16,
    len: u32,
}

/// An error the server reported for one request.
struct ServerError {
    errno: u32,
    message: String,
}

impl<S: Read + Write> NbdClient<S> {
    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The server's block size constraints: (minimum, preferred, largest
    /// read request this client sends).
    pub fn block_size(&self) -> (u32, u32, u32) {
        (self.min_block, self.preferred_block, self.max_read)
    }

    /// The export's transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// The negotiated metadata context names, in the server's order.
    pub fn contexts(&self) -> Vec<&str> {
        self.contexts.iter().map(|(_, n)| n.as_str()).collect()
    }

    /// Reads `buf.len()` bytes at `offset`; holes read as zeros. The range
    /// must lie within the export and be aligned to its minimum block size.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.max_read as usize);
            let off = offset + done as u64;
            self.read_one(off, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Extents of `context` (one of the negotiated ones) covering exactly
    /// `[offset, offset + len)`, in order, neighbours with equal flags
    /// merged. Asks again where the server answered for less than asked.
    pub fn block_status(&mut self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let id = match self.contexts.iter().find(|(_, n)| n == context) {
            Some((id, _)) => *id,
            None => {
                return Err(Error::invalid(format!(
                    "{}: metadata context '{}' was not negotiated",
                    self.what,
                    printable(context)
                )))
            }
        };
        self.check_range("block status", offset, len)?;
        let end = offset + len;
        let mut out: Vec<Extent> = vec![];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(u64::from(self.max_status)) as u32;
            let got = self.status_one(id, context, pos, n)?;
            for e in got {
                match out.last_mut() {
                    Some(last) if last.flags == e.flags => last.len += e.len,
                    _ => out.push(e),
                }
                pos = e.offset + e.len;
            }
        }
        Ok(out)
    }

    /// Ends the session politely (`NBD_CMD_DISC`); the server closes the
    /// connection.
    pub fn disconnect(mut self) -> Result<()> {
        self.send_disc()
    }

    fn send_disc(&mut self) -> Result<()> {
        if self.disconnected {
            return Ok(());
        }
        self.usable()?;
        self.disconnected = true;
        let handle = self.handle();
        self.send_request(CMD_DISC, handle, 0, 0)
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        self.usable()?;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::invalid(format!(
                "{}: {what} {offset}+{len} is past the end ({} bytes)",
                self.what, self.size
            )));
        }
        let min = u64::from(self.min_block);
        if offset % min != 0 || len % min != 0 {
            return Err(Error::invalid(format!(
                "{}: {what} {offset}+{len} is not aligned to the minimum block size {min}",
                self.what
            )));
        }
        Ok(())
    }

    fn usable(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::new(
                ErrorKind::Io,
                format!("{}: unusable after an earlier failure ({why})", self.what),
            )),
            None if self.disconnected => Err(Error::invalid(format!(
                "{}: already disconnected",
                self.what
            ))),
            None => Ok(()),
        }
    }

    fn handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    /// Sends one request and reads its reply chunks up to the one flagged
    /// done. The first error chunk becomes the call's error once the reply
    /// is complete (so the stream stays in step); `payload` reads every
    /// other chunk and rejects the types it does not expect.
    fn exchange(
        &mut self,
        typ: u16,
        offset: u64,
        len: u32,
        mut payload: impl FnMut(&mut Self, &Chunk) -> Result<()>,
    ) -> Result<()> {
        let handle = self.handle();
        self.send_request(typ, handle, offset, len)?;
        let mut failed: Option<ServerError> = None;
        loop {
            let chunk = self.reply_header(handle, typ)?;
            let done = chunk.flags & REPLY_FLAG_DONE != 0;
            match chunk.typ {
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                    let e = self.error_chunk(&chunk)?;
                    failed.get_or_insert(e);
                }
                REPLY_TYPE_NONE if done && chunk.len == 0 => {}
                _ => payload(self, &chunk)?,
            }
            if done {
                break;
            }
        }
        match failed {
            Some(e) => Err(self.server_error(typ, offset, len, e)),
            None => Ok(()),
        }
    }

    /// One read request of at most `max_read` bytes and its reply.
    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u32;
        let mut filled = Filled::default();
        self.exchange(CMD_READ, offset, len, |c, chunk| {
            let (rel, n) = match chunk.typ {
                REPLY_TYPE_OFFSET_DATA if chunk.len >= 8 => {
                    let at = c.read_u64("a data offset")?;
                    let n = chunk.len - 8;
                    let rel = c.piece(offset, len, at, n, "data")?;
                    c.read_exact(&mut buf[rel..rel + n as usize], "read data")?;
                    (rel, n)
                }
                REPLY_TYPE_OFFSET_HOLE if chunk.len == 12 => {
                    let at = c.read_u64("a hole offset")?;
                    let n = c.read_u32("a hole size")?;
                    let rel = c.piece(offset, len, at, n, "hole")?;
                    buf[rel..rel + n as usize].fill(0);
                    (rel, n)
                }
                _ => return Err(c.unexpected_chunk(chunk, CMD_READ)),
            };
            filled.add(rel as u32, n).map_err(|m| c.violation(m))
        })?;
        if !filled.complete(len) {
            return Err(self.violation(format!(
                "the reply to read {offset}+{len} left part of the range unanswered"
            )));
        }
        Ok(())
    }

    /// Checks that a data or hole piece at `at` of `n` bytes lies within
    /// the request; its position in the buffer.
    fn piece(&mut self, offset: u64, len: u32, at: u64, n: u32, what: &str) -> Result<usize> {
        let end = offset + u64::from(len);
        if at < offset || at.checked_add(u64::from(n)).is_none_or(|e| e > end) {
            return Err(self.violation(format!(
                "{what} chunk {at}+{n} lies outside the read {offset}+{len}"
            )));
        }
        Ok((at - offset) as usize)
    }

    /// One block status request and the extents of context `id` in its
    /// reply, clipped to the request (at least one byte of it).
    fn status_one(&mut self, id: u32, context: &str, offset: u64, len: u32) -> Result<Vec<Extent>> {
        let end = offset + u64::from(len);
        let mut mine: Option<Vec<Extent>> = None;
        self.exchange(CMD_BLOCK_STATUS, offset, len, |c, chunk| {
            let ok_len =
                chunk.len >= 12 && (chunk.len - 4) % 8 == 0 && chunk.len <= MAX_STATUS_CHUNK;
            if chunk.typ != REPLY_TYPE_BLOCK_STATUS || !ok_len {
                return Err(c.unexpected_chunk(chunk, CMD_BLOCK_STATUS));
            }
            let mut data = vec![0u8; chunk.len as usize];
            c.read_exact(&mut data, "block status")?;
            let cid = u32::from_be_bytes(data[0..4].try_into().unwrap());
            if !c.contexts.iter().any(|(i, _)| *i == cid) {
                return Err(c.violation(format!("block status for unknown context id {cid}")));
            }
            // Chunks of the other negotiated contexts are skipped.
            if cid != id {
                return Ok(());
            }
            if mine.is_some() {
                let what = format!(
                    "two block status chunks for context '{}'",
                    printable(context)
                );
                return Err(c.violation(what));
            }
            let mut extents = vec![];
            let mut pos = offset;
            for d in data[4..].chunks_exact(8) {
                let n = u32::from_be_bytes(d[0..4].try_into().unwrap());
                let flags = u32::from_be_bytes(d[4..8].try_into().unwrap());
                // The spec lets the last extent reach past the request,
                // not more extents than that.
                if pos >= end {
                    return Err(c.violation("block status extents past the request".into()));
                }
                if n == 0 {
                    return Err(c.violation("a block status extent of length 0".into()));
                }
                let n = u64::from(n).min(end - pos);
                extents.push(Extent {
                    offset: pos,
                    len: n,
                    flags,
                });
                pos += n;
            }
            mine = Some(extents);
            Ok(())
        })?;
        match mine {
            Some(e) => Ok(e),
            None => Err(self.violation(format!(
                "the reply to block status {offset}+{len} lacks context '{}'",
                printable(context)
            ))),
        }
    }

    /// Reads an error chunk's payload.
    fn error_chunk(&mut self, chunk: &Chunk) -> Result<ServerError> {
        if chunk.len < 6 || chunk.len > MAX_SMALL_CHUNK {
            return Err(self.violation(format!("error chunk of {} bytes", chunk.len)));
        }
        let mut data = vec![0u8; chunk.len as usize];
        self.read_exact(&mut data, "an error chunk")?;
        let errno = u32::from_be_bytes(data[0..4].try_into().unwrap());
        let mlen = usize::from(u16::from_be_bytes([data[4], data[5]]));
        let extra = if chunk.typ == REPLY_TYPE_ERROR_OFFSET {
            8
        } else {
            0
        };
        if 6 + mlen + extra != data.len() {
            return Err(self.violation(format!(
                "error chunk of {} bytes with a message of {mlen}",
                data.len()
            )));
        }
        let mut message = printable(&String::from_utf8_lossy(&data[6..6 + mlen]));
        if extra > 0 {
            let at = u64::from_be_bytes(data[6 + mlen..].try_into().unwrap());
            message = format!("at offset {at}: {message}");
        }
        if errno == 0 {
            return Err(self.violation("an error chunk with error 0".into()));
        }
        Ok(ServerError { errno, message })
    }

    fn server_error(&self, typ: u16, offset: u64, len: u32, e: ServerError) -> Error {
        let msg = if e.message.is_empty() {
            String::new()
        } else {
            format!(": {}", e.message)
        };
        Error::new(
            ErrorKind::Io,
            format!(
                "{}: {SERVER_FAILED} {} {offset}+{len} with {}{msg}",
                self.what,
                command_name(typ),
                errno_name(e.errno)
            ),
        )
    }

    /// Reads the next reply header to request `handle` (of command
    /// `typ`). A simple reply carrying an error becomes that error; one
    /// carrying success is a violation, as structured replies were
    /// negotiated and only they can carry a read's or a block status's data.
    fn reply_header(&mut self, handle: u64, typ: u16) -> Result<Chunk> {
        let magic = self.read_u32("a reply")?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let mut b = [0u8; 12];
                self.read_exact(&mut b, "a reply")?;
                let errno = u32::from_be_bytes(b[0..4].try_into().unwrap());
                self.check_handle(u64::from_be_bytes(b[4..12].try_into().unwrap()), handle)?;
                if errno == 0 {
                    let what = format!("a simple reply to {}", command_name(typ));
                    return Err(self.violation(what));
                }
                Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "{}: {SERVER_FAILED} {} with {}",
                        self.what,
                        command_name(typ),
                        errno_name(errno)
                    ),
                ))
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut b = [0u8; 16];
                self.read_exact(&mut b, "a reply")?;
                let flags = u16::from_be_bytes([b[0], b[1]]);
                let kind = u16::from_be_bytes([b[2], b[3]]);
                self.check_handle(u64::from_be_bytes(b[4..12].try_into().unwrap()), handle)?;
                let len = u32::from_be_bytes(b[12..16].try_into().unwrap());
                // Data chunks are bounded by the request, checked by the caller.
                let bound = match kind {
                    REPLY_TYPE_OFFSET_DATA => MAX_READ_REQUEST + 8,
                    REPLY_TYPE_BLOCK_STATUS => MAX_STATUS_CHUNK,
                    _ => MAX_SMALL_CHUNK,
                };
                if len > bound {
                    let what = format!("reply chunk of {len} bytes (type {kind})");
                    return Err(self.violation(what));
                }
                Ok(Chunk {
                    flags,
                    typ: kind,
                    len,
                })
            }
            m => Err(self.violation(format!("bad reply magic {m:#010x}"))),
        }
    }

    fn check_handle(&mut self, got: u64, want: u64) -> Result<()> {
        if got != want {
            return Err(
                self.violation(format!("a reply for handle {got} while waiting for {want}"))
            );
        }
        Ok(())
    }

    fn unexpected_chunk(&mut self, chunk: &Chunk, command: u16) -> Error {
        self.violation(format!(
            "reply chunk type {} of {} bytes to {}",
            chunk.typ,
            chunk.len,
            command_name(command)
        ))
    }

    fn send_request(&mut self, typ: u16, handle: u64, offset: u64, len: u32) -> Result<()> {
        let r = Request {
            flags: 0,
            typ,
            cookie: handle,
            offset,
            len,
        };
        self.write_all(&r.encode(), "a request")
    }

    /// Records a protocol violation: the client is unusable from now on.
    fn violation(&mut self, what: String) -> Error {
        let e = Error::corrupt(format!("{}: protocol violation: {what}", self.what));
        self.broken.get_or_insert(what);
        e
    }

    fn unsupported(&mut self, what: String) -> Error {
        self.broken.get_or_insert(what.clone());
        Error::new(ErrorKind::InvalidInput, what)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        if let Err(e) = self.stream.read_exact(buf) {
            self.broken.get_or_insert(format!("reading {what}: {e}"));
            let why = match e.kind() {
                io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    "the server did not answer in time".to_string()
                }
                _ => format!("{e}"),
            };
            return Err(Error::new(
                ErrorKind::Io,
                format!("{}: reading {what}: {why}", self.what),
            ));
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8], what: &str) -> Result<()> {
        let r = self
            .stream
            .write_all(buf)
            .and_then(|()| self.stream.flush());
        if let Err(e) = r {
            self.broken.get_or_insert(format!("sending {what}: {e}"));
            return Err(Error::io(format!("{}: sending {what}", self.what), e));
        }
        Ok(())
    }

    fn read_u32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }
}

impl<S: Read + Write> Drop for NbdClient<S> {
    fn drop(&mut self) {
        if self.broken.is_none() {
            let _ = self.send_disc();
        }
    }
}

impl<S: Read + Write> fmt::Debug for NbdClient<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.what)
            .field("size", &self.size)
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

/// Which parts of one read request's buffer a reply filled: sorted,
/// disjoint, merged runs (data usually arrives in order, so one run).
#[derive(Default)]
struct Filled {
    runs: Vec<(u32, u32)>,
}

impl Filled {
    /// Adds `[at, at + n)`; `Err` if it overlaps what is filled or the
    /// reply is too fragmented.
    fn add(&mut self, at: u32, n: u32) -> Result<(), String> {
        if n == 0 {
            return Ok(());
        }
        let end = at + n;
        let i = self.runs.partition_point(|&(s, _)| s < at);
        let overlaps_prev = i > 0 && self.runs[i - 1].1 > at;
        let overlaps_next = i < self.runs.len() && self.runs[i].0 < end;
        if overlaps_prev || overlaps_next {
            return Err(format!("read reply pieces overlap at {at}+{n}"));
        }
        let joins_prev = i > 0 && self.runs[i - 1].1 == at;
        let joins_next = i < self.runs.len() && self.runs[i].0 == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.runs[i - 1].1 = self.runs[i].1;
                self.runs.remove(i);
            }
            (true, false) => self.runs[i - 1].1 = end,
            (false, true) => self.runs[i].0 = at,
            (false, false) => {
                if self.runs.len() >= MAX_READ_PIECES {
                    return Err("a read reply in too many pieces".into());
                }
                self.runs.insert(i, (at, end));
            }
        }
        Ok(())
    }

    fn complete(&self, len: u32) -> bool {
        len == 0 || self.runs == [(0, len)]
    }
}

/// `s` as one short line: control characters replaced, clipped.
fn printable(s: &str) -> String {
    const MAX: usize = 300;
    let mut out: String = s
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// Bytes as hex and, if mostly text, as text.
fn printable_bytes(b: &[u8]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
        format!("{hex} (\"{}\")", String::from_utf8_lossy(b))
    } else {
        hex
    }
}

fn errno_name(e: u32) -> String {
    match e {
        NBD_EPERM => "EPERM".into(),
        NBD_EIO => "EIO".into(),
        NBD_ENOMEM => "ENOMEM".into(),
        NBD_EINVAL => "EINVAL".into(),
        NBD_ENOSPC => "ENOSPC".into(),
        NBD_EOVERFLOW => "EOVERFLOW".into(),
        NBD_ENOTSUP => "ENOTSUP".into(),
        NBD_ESHUTDOWN => "ESHUTDOWN".into(),
        e => format!("error {e}"),
    }
}

mod handshake;

#[cfg(test)]
mod tests;
