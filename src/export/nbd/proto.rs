//! Wire constants and encoders of the NBD protocol (doc/proto.md of
//! NetworkBlockDevice/nbd), and the limits this server enforces on what a
//! client may make it allocate.

use std::io;

use crate::error::Error;

// Magic numbers.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Never advertised or accepted; named for the tests.
#[cfg_attr(not(test), allow(dead_code))]
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Never advertised or accepted; named for the tests.
#[cfg_attr(not(test), allow(dead_code))]
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Never advertised or accepted; named for the tests.
#[cfg_attr(not(test), allow(dead_code))]
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// Error values allowed on the wire.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// Metadata contexts: names, and the ids given by NBD_OPT_SET_META_CONTEXT.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";
pub const CONTEXT_CHANGED: &str = "recoverfs:changed";
pub const ALLOCATION_ID: u32 = 1;
pub const CHANGED_ID: u32 = 2;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const STATE_CHANGED: u32 = 1 << 0;

// Size constraints advertised with NBD_INFO_BLOCK_SIZE.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload: the spec's interoperable maximum. A
/// request above it ends the connection (it could only be a hostile or
/// broken client: the limit is advertised).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Largest option a client may send during the handshake: every string in
/// the protocol is at most 4096 bytes, so only a hostile client needs more.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, message) the spec allows.
pub const MAX_STRING: usize = 4096;

/// Which metadata contexts a connection selected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    pub allocation: bool,
    pub changed: bool,
}

impl Contexts {
    pub fn any(&self) -> bool {
        self.allocation || self.changed
    }

    /// (id, name) of each selected context, in id order.
    pub fn selected(&self) -> Vec<(u32, &'static str)> {
        let mut out = vec![];
        if self.allocation {
            out.push((ALLOCATION_ID, CONTEXT_ALLOCATION));
        }
        if self.changed {
            out.push((CHANGED_ID, CONTEXT_CHANGED));
        }
        out
    }
}

/// The transmission flags of every export: writable, flush/FUA, trim,
/// write zeroes, multi-conn (a flush covers writes from every connection),
/// and don't-fragment when structured replies make it meaningful.
pub fn transmission_flags(structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}

/// Maps a crate error's errno onto the few values NBD allows.
pub fn nbd_errno(e: &Error) -> u32 {
    match e.errno() {
        libc::EPERM | libc::EACCES | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// `s` cut to the protocol's string limit, on a character boundary.
pub fn clip(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A command's name, for messages.
pub fn command_name(typ: u16) -> String {
    match typ {
        CMD_READ => "NBD_CMD_READ".into(),
        CMD_WRITE => "NBD_CMD_WRITE".into(),
        CMD_DISC => "NBD_CMD_DISC".into(),
        CMD_FLUSH => "NBD_CMD_FLUSH".into(),
        CMD_TRIM => "NBD_CMD_TRIM".into(),
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES".into(),
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS".into(),
        t => format!("command {t}"),
    }
}

/// One transmission request, as read from the wire (payload excluded).
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Parses a request header; `Err` names what is wrong with it.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(format!("bad request magic {magic:#010x}"));
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
            typ: u16::from_be_bytes(b[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
        })
    }

    /// The request header as sent (a write's payload follows it).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(REQUEST_LEN);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.typ.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        b.extend_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// An option request (a client's) and its data.
pub fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An option reply header and its data.
pub fn option_reply(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A simple reply header (the data of a successful read follows it).
pub fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(cookie: u64, flags: u16, typ: u16, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// The fixed part of an error chunk's payload: error, message length,
/// message.
pub fn error_payload(errno: u32, message: &str) -> Vec<u8> {
    let msg = clip(message).as_bytes();
    let mut b = Vec::with_capacity(6 + msg.len());
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// Reads big-endian fields out of an option's data; `None` when the data
/// is too short (a malformed option).
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2)
            .map(|b| u16::from_be_bytes(b.try_into().unwrap()))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }

    /// A length-prefixed (u32) UTF-8 string.
    pub fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.bytes(n)?).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Why a connection ended; the text goes into the close log line.
#[derive(Debug, thiserror::Error)]
pub enum End {
    #[error("the client closed the connection")]
    Eof,
    #[error("the client disconnected (NBD_CMD_DISC)")]
    Disc,
    #[error("the client aborted the negotiation")]
    Abort,
    #[error("the server is shutting down")]
    Shutdown,
    #[error("a reply could not be sent: {0}")]
    WriteFailed(String),
    #[error("socket error: {0}")]
    Io(io::Error),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the client did not choose an export in time")]
    HandshakeTimeout,
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => End::Eof,
            _ => End::Io(e),
        }
    }
}
