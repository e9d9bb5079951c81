//! A request's outcome ([`Reply`]) and how it goes out: encoded for the
//! negotiated reply style (simple, or structured chunks: data, holes,
//! block status, errors) into frames whose large bodies are moved, not
//! copied, then written in one go where small. Apart from the connection
//! and from the disk calls: neither knows the wire format of a reply.

use std::io;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::export::nbd::proto::*;

/// Reply bodies up to this size are copied next to their header so that a
/// reply leaves in one write.
const COALESCE: usize = 128 << 10;

/// An error to send: NBD errno and a message for the human.
#[derive(Debug)]
pub(super) struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    pub(super) fn new(errno: u32, message: impl Into<String>) -> Self {
        Failure {
            errno,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(nbd_errno(&e), e.to_string())
    }
}

/// Part of a read's answer.
#[derive(Debug)]
pub(super) enum Content {
    /// The disk's bytes as they came (a fetched chunk's slice for a read
    /// answered later): written to the socket without another copy.
    Data {
        offset: u64,
        bytes: Bytes,
    },
    Hole {
        offset: u64,
        len: u32,
    },
}

/// A request's outcome, before encoding for the negotiated reply style.
#[derive(Debug)]
pub(super) enum Reply {
    Done,
    /// Content in offset order; an error stops the read at its offset.
    Read {
        content: Vec<Content>,
        error: Option<(u64, Failure)>,
    },
    /// (context id, descriptors (length, flags)) per selected context.
    Status(Vec<(u32, Vec<(u32, u32)>)>),
    Failed(Failure),
}

/// One reply message: a header (with any fixed fields) and a body that is
/// moved, not copied, when large.
pub(super) struct Frame {
    head: Vec<u8>,
    body: Bytes,
}

pub(super) async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: Vec<Frame>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    for f in frames {
        buf.extend_from_slice(&f.head);
        if f.body.len() <= COALESCE {
            buf.extend_from_slice(&f.body);
        } else {
            w.write_all(&buf).await?;
            buf.clear();
            w.write_all(&f.body).await?;
        }
    }
    w.write_all(&buf).await?;
    w.flush().await
}

pub(super) fn encode(cookie: u64, reply: Reply, structured: bool) -> Vec<Frame> {
    if structured {
        encode_structured(cookie, reply)
    } else {
        vec![encode_simple(cookie, reply)]
    }
}

fn encode_simple(cookie: u64, reply: Reply) -> Frame {
    let (errno, body) = match reply {
        Reply::Done => (0, Bytes::new()),
        Reply::Read {
            content,
            error: None,
        } => (0, flatten(content)),
        Reply::Read {
            error: Some((_, f)),
            ..
        }
        | Reply::Failed(f) => (f.errno, Bytes::new()),
        // Block status needs structured replies; `execute` refuses it.
        Reply::Status(_) => (NBD_EINVAL, Bytes::new()),
    };
    Frame {
        head: simple_reply(cookie, errno),
        body,
    }
}

/// A read's content as plain bytes, for a simple reply: a single run of
/// data as it is, anything else assembled.
fn flatten(mut content: Vec<Content>) -> Bytes {
    if let [Content::Data { .. }] = content[..] {
        if let Some(Content::Data { bytes, .. }) = content.pop() {
            return bytes;
        }
    }
    let mut out = vec![];
    for c in content {
        match c {
            Content::Data { bytes, .. } => out.extend_from_slice(&bytes),
            Content::Hole { len, .. } => out.resize(out.len() + len as usize, 0),
        }
    }
    Bytes::from(out)
}

fn encode_structured(cookie: u64, reply: Reply) -> Vec<Frame> {
    // (chunk type, fixed payload fields, body)
    let mut chunks: Vec<(u16, Vec<u8>, Bytes)> = vec![];
    match reply {
        // A simple reply is allowed for anything but a read and has no
        // payload to parse.
        Reply::Done => {
            return vec![Frame {
                head: simple_reply(cookie, 0),
                body: Bytes::new(),
            }]
        }
        Reply::Read { content, error } => {
            for c in content {
                chunks.push(match c {
                    Content::Data { offset, bytes } => {
                        (REPLY_TYPE_OFFSET_DATA, offset.to_be_bytes().to_vec(), bytes)
                    }
                    Content::Hole { offset, len } => {
                        let mut p = offset.to_be_bytes().to_vec();
                        p.extend_from_slice(&len.to_be_bytes());
                        (REPLY_TYPE_OFFSET_HOLE, p, Bytes::new())
                    }
                });
            }
            if let Some((offset, f)) = error {
                let mut p = error_payload(f.errno, &f.message);
                p.extend_from_slice(&offset.to_be_bytes());
                chunks.push((REPLY_TYPE_ERROR_OFFSET, p, Bytes::new()));
            }
        }
        Reply::Status(contexts) => {
            for (id, descriptors) in contexts {
                let mut p = Vec::with_capacity(4 + 8 * descriptors.len());
                p.extend_from_slice(&id.to_be_bytes());
                for (len, flags) in descriptors {
                    p.extend_from_slice(&len.to_be_bytes());
                    p.extend_from_slice(&flags.to_be_bytes());
                }
                chunks.push((REPLY_TYPE_BLOCK_STATUS, p, Bytes::new()));
            }
        }
        Reply::Failed(f) => chunks.push((
            REPLY_TYPE_ERROR,
            error_payload(f.errno, &f.message),
            Bytes::new(),
        )),
    }
    if chunks.is_empty() {
        chunks.push((REPLY_TYPE_NONE, vec![], Bytes::new()));
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, (typ, fixed, body))| {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let len = (fixed.len() + body.len()) as u32;
            let mut head = chunk_header(cookie, flags, typ, len);
            head.extend_from_slice(&fixed);
            Frame { head, body }
        })
        .collect()
}
