//! The agent's stream: length-prefixed frames over the virtio-serial port
//! hot-added for one job (guest `/dev/virtio-ports/NAME`, host: the Unix
//! socket of its chardev).
//!
//! A frame is one type byte, a little-endian `u32` length and that many
//! bytes. `V` hello (JSON: versions), `H` an entry's header (JSON: path,
//! kind, mode, uid, gid, mtime, size, target), then for a file `D` frames
//! carrying exactly `size` bytes (`L` frames may come between them: older
//! agents warn there about a file that shrank while it was read; `Z`
//! frames may stand for some of them, see below), `L` a
//! log line (hook output, warnings), `K` a
//! keep-alive (empty; sent while a hook or the copy runs, so a long one
//! is not taken for a silent stream; readers pass over it), `X` a fatal
//! error (the sender stops), and `E` the end: JSON `{count, bytes,
//! checksum}`, where `checksum` is the BLAKE3 of every frame byte before
//! it. A stream that stops before a valid `E` (a killed agent or VM, a lost
//! byte) is an error, so a truncated stream never becomes a backup. Every
//! length is bounded before anything is allocated.
//!
//! A `Z` frame (a little-endian `u64`: how many) stands for that many
//! zero bytes of a file's content, which do not cross the channel: a
//! hole of a sparse file, or a stretch of data that is all zeros. It is
//! sent only to a reader that said it takes them (hosts before them fail
//! on the unknown type, so no backup is ever wrong, only refused): an
//! agent in a backup only when the host's job asks for it
//! ([`super::guest::Job::Backup`]'s `holes`), the host in an
//! `agent-restore` only when the agent's hello lists [`FEATURE_HOLES`].
//! Older agents never send one, and their streams read as before.
//!
//! Backups send guest → host; `agent-restore` sends host → guest and the
//! guest answers with `L`, `X` or `E` frames of its own.
//!
//! The other way in a backup, the host sends single bytes: `A`, the
//! acknowledgement once it has checked the end frame (the agent exits only
//! then: frames may still be queued in the port), and, to an agent that
//! lists [`FEATURE_ACK_WAIT`], a `K` keep-alive every few seconds while it
//! receives, so the agent waits for the acknowledgement however far behind
//! a slow store leaves the host, and gives up only on a silent host.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::repo::catalog::{Entry, EntryKind};

/// Largest `D` frame.
pub const MAX_DATA: usize = 1 << 20;
/// Largest frame of any other type.
pub const MAX_META: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Header(Entry),
    Data(Vec<u8>),
    /// That many zero bytes of a file.
    Hole(u64),
    Log(String),
    Error(String),
    End(End),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The container's agent version (`agent.json`).
    pub version: String,
    /// The recoverfs binary's version.
    pub binary: String,
    /// What the agent's binary does that older ones did not (absent in
    /// their hello): the host warns about what an old one lacks.
    #[serde(default)]
    pub features: Vec<String>,
}

/// The agent waits for the port to be writable, so a host end that closed
/// (a killed host command) is a write error and the `post` hook runs.
pub const FEATURE_PORT_WAIT: &str = "port-wait";

/// The agent reads `Z` (hole) frames in a restore, and sends them in a
/// backup whose job asks for them.
pub const FEATURE_HOLES: &str = "holes";

/// In a backup the agent reads the host's `K` keep-alive bytes (sent when
/// the job says `keepalive`) and waits for the acknowledgement while they
/// come. Agents before it take any byte for the acknowledgement and wait
/// 30 s at most: the host sends them no keep-alive.
pub const FEATURE_ACK_WAIT: &str = "ack-wait";

/// Every feature of this binary's agent.
pub fn agent_features() -> Vec<String> {
    vec![
        FEATURE_PORT_WAIT.to_string(),
        FEATURE_HOLES.to_string(),
        FEATURE_ACK_WAIT.to_string(),
    ]
}

impl Hello {
    /// Whether the agent said it has `feature`.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// The one-line warning for an agent container built before
    /// `features` it lacks mattered, if any.
    pub fn warning(&self) -> Option<String> {
        if self.features.iter().any(|f| f == FEATURE_PORT_WAIT) {
            return None;
        }
        Some(format!(
            "warning: agent container {} predates the guest agent's wait for the host: if this \
             command is killed while the application is quiesced, the application may stay \
             quiesced; rebuild the container (`recoverfs agent build`) and attach the new one",
            crate::util::escape_controls(&self.version)
        ))
    }

    /// "agent V (recoverfs B)", one line whatever the guest sent.
    pub fn describe(&self) -> String {
        format!(
            "agent {} (recoverfs {})",
            crate::util::escape_controls(&self.version),
            crate::util::escape_controls(&self.binary)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub count: u64,
    pub bytes: u64,
    pub checksum: String,
}

/// Writes frames, keeping the count and checksum for the end frame.
pub struct FrameWriter<W: Write> {
    w: W,
    hash: blake3::Hasher,
    count: u64,
    bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            w,
            hash: blake3::Hasher::new(),
            count: 0,
            bytes: 0,
        }
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.hash.update(&head);
        self.hash.update(payload);
        self.w.write_all(&head)?;
        self.w.write_all(payload)
    }

    fn json(&mut self, kind: u8, v: &impl Serialize) -> std::io::Result<()> {
        let b = serde_json::to_vec(v).expect("json");
        self.frame(kind, &b)
    }

    pub fn hello(&mut self, h: &Hello) -> std::io::Result<()> {
        self.json(b'V', h)
    }

    /// An entry's header; the chunk list is not sent (a file's content
    /// follows in data frames).
    pub fn header(&mut self, e: &Entry) -> std::io::Result<()> {
        let mut e = e.clone();
        e.chunks.clear();
        self.json(b'H', &e)?;
        self.count += 1;
        if e.kind == EntryKind::File {
            self.bytes += e.size;
        }
        Ok(())
    }

    pub fn data(&mut self, d: &[u8]) -> std::io::Result<()> {
        for piece in d.chunks(MAX_DATA) {
            self.frame(b'D', piece)?;
        }
        Ok(())
    }

    /// `n` zero bytes of a file, as one frame (nothing if `n` is 0). Only
    /// for a reader that takes them (see the module).
    pub fn hole(&mut self, n: u64) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.frame(b'Z', &n.to_le_bytes())
    }

    /// `n` zero bytes of a file: one `Z` frame if `holes`, else data frames.
    pub fn zeros(&mut self, n: u64, holes: bool) -> std::io::Result<()> {
        if holes {
            return self.hole(n);
        }
        let zero = vec![0u8; (n.min(MAX_DATA as u64)) as usize];
        let mut left = n;
        while left > 0 {
            let k = left.min(zero.len() as u64) as usize;
            self.frame(b'D', &zero[..k])?;
            left -= k as u64;
        }
        Ok(())
    }

    /// A keep-alive frame, flushed.
    pub fn keepalive(&mut self) -> std::io::Result<()> {
        self.frame(b'K', &[])?;
        self.w.flush()
    }

    pub fn log(&mut self, line: &str) -> std::io::Result<()> {
        self.frame(b'L', truncate(line).as_bytes())
    }

    pub fn error(&mut self, msg: &str) -> std::io::Result<()> {
        self.frame(b'X', truncate(msg).as_bytes())?;
        self.w.flush()
    }

    /// The end frame: entries and file bytes sent, and the checksum.
    pub fn end(&mut self) -> std::io::Result<()> {
        let end = End {
            count: self.count,
            bytes: self.bytes,
            checksum: self.hash.finalize().to_hex().to_string(),
        };
        self.json(b'E', &end)?;
        self.w.flush()
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(MAX_META - 16);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Reads frames with bounds, checking the end frame against what came.
pub struct FrameReader<R: Read> {
    r: R,
    hash: blake3::Hasher,
    count: u64,
    bytes: u64,
    /// "the agent's stream" — names the stream in errors.
    what: String,
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R, what: impl Into<String>) -> Self {
        FrameReader {
            r,
            hash: blake3::Hasher::new(),
            count: 0,
            bytes: 0,
            what: what.into(),
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    fn truncated(&self, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::new(
                ErrorKind::Io,
                format!(
                    "{} ended before its end frame (truncated: was the agent or the VM killed?)",
                    self.what
                ),
            )
        } else if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            Error::new(
                ErrorKind::Io,
                format!("{} went silent (no frame in time)", self.what),
            )
        } else {
            Error::io(format!("read {}", self.what), e)
        }
    }

    fn bad(&self, msg: impl std::fmt::Display) -> Error {
        Error::corrupt(format!("{}: {msg}", self.what))
    }

    /// The next frame (keep-alives passed over). An end frame is
    /// checked: a count, byte total or checksum that differs from what was
    /// received is an error.
    pub fn next_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = self.frame()? {
                return Ok(f);
            }
        }
    }

    /// One frame; `None` for a keep-alive.
    fn frame(&mut self) -> Result<Option<Frame>> {
        let mut head = [0u8; 5];
        self.r
            .read_exact(&mut head)
            .map_err(|e| self.truncated(e))?;
        let kind = head[0];
        let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        let max = match kind {
            b'K' => 0,
            b'D' => MAX_DATA,
            b'Z' => 8,
            b'V' | b'H' | b'L' | b'X' | b'E' => MAX_META,
            k => return Err(self.bad(format!("unknown frame type {k:#04x}"))),
        };
        if len > max {
            return Err(self.bad(format!("a frame of {len} bytes (at most {max})")));
        }
        if kind == b'Z' && len != 8 {
            return Err(self.bad(format!("a hole frame of {len} bytes (not 8)")));
        }
        let mut payload = vec![0u8; len];
        self.r
            .read_exact(&mut payload)
            .map_err(|e| self.truncated(e))?;
        let text = |p: Vec<u8>| String::from_utf8_lossy(&p).into_owned();
        if kind == b'E' {
            let end: End = serde_json::from_slice(&payload)
                .map_err(|e| self.bad(format!("malformed end frame ({e})")))?;
            let sum = self.hash.finalize().to_hex().to_string();
            if end.count != self.count || end.bytes != self.bytes || end.checksum != sum {
                return Err(self.bad(format!(
                    "the end frame says {} entries and {} bytes, {} came, or the checksum differs: frames were lost",
                    end.count, end.bytes, self.count
                )));
            }
            return Ok(Some(Frame::End(end)));
        }
        self.hash.update(&head);
        self.hash.update(&payload);
        Ok(Some(match kind {
            b'K' => return Ok(None),
            b'D' => Frame::Data(payload),
            b'Z' => Frame::Hole(u64::from_le_bytes(payload[..].try_into().expect("8 bytes"))),
            b'L' => Frame::Log(text(payload)),
            b'X' => Frame::Error(text(payload)),
            b'V' => Frame::Hello(
                serde_json::from_slice(&payload)
                    .map_err(|e| self.bad(format!("malformed hello ({e})")))?,
            ),
            _ => {
                let e: Entry = serde_json::from_slice(&payload)
                    .map_err(|e| self.bad(format!("malformed header ({e})")))?;
                if !e.chunks.is_empty() {
                    return Err(self.bad("a header with a chunk list"));
                }
                self.count += 1;
                if e.kind == EntryKind::File {
                    self.bytes += e.size;
                }
                Frame::Header(e)
            }
        }))
    }

    /// A file's content as a reader: data and hole frames until `size`
    /// bytes came (a hole reads as zeros). Anything else, or more bytes
    /// than `size`, is an error (returned through `io::Error::other`).
    pub fn content(&mut self, size: u64) -> Content<'_, R> {
        Content {
            fr: self,
            left: size,
            buf: vec![],
            pos: 0,
            zeros: 0,
            on_log: None,
        }
    }

    /// [`Self::content`], passing log frames among the data frames to
    /// `on_log`: an agent warns there about a file that shrank while it
    /// was read (it pads it with zeros), and that must not fail the backup.
    pub fn content_logging<'a>(
        &'a mut self,
        size: u64,
        on_log: &'a (dyn Fn(&str) + 'a),
    ) -> Content<'a, R> {
        Content {
            on_log: Some(on_log),
            ..self.content(size)
        }
    }
}

pub struct Content<'a, R: Read> {
    fr: &'a mut FrameReader<R>,
    left: u64,
    buf: Vec<u8>,
    pos: usize,
    /// Zero bytes of a hole frame not read yet (after `buf`).
    zeros: u64,
    /// Where log frames among the data go; `None`: they are an error.
    on_log: Option<&'a (dyn Fn(&str) + 'a)>,
}

impl<R: Read> Read for Content<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() && self.zeros == 0 {
            if self.left == 0 {
                return Ok(0);
            }
            match self.fr.next_frame().map_err(std::io::Error::other)? {
                Frame::Data(d) if d.len() as u64 <= self.left && !d.is_empty() => {
                    self.left -= d.len() as u64;
                    self.buf = d;
                    self.pos = 0;
                }
                Frame::Hole(n) if n <= self.left && n > 0 => {
                    self.left -= n;
                    self.zeros = n;
                }
                Frame::Error(m) => {
                    return Err(std::io::Error::other(Error::new(
                        ErrorKind::Io,
                        format!("the agent failed: {m}"),
                    )))
                }
                Frame::Log(l) if self.on_log.is_some() => {
                    if let Some(say) = self.on_log {
                        say(&l);
                    }
                }
                other => {
                    return Err(std::io::Error::other(self.fr.bad(format!(
                        "expected {} more bytes of a file, got {}",
                        self.left,
                        describe(&other)
                    ))))
                }
            }
        }
        if self.pos == self.buf.len() {
            let n = (out.len() as u64).min(self.zeros) as usize;
            out[..n].fill(0);
            self.zeros -= n as u64;
            return Ok(n);
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl<R: Read> crate::repo::catalog::SparseRead for Content<'_, R> {
    fn zeros_ahead(&self) -> u64 {
        if self.pos == self.buf.len() {
            self.zeros
        } else {
            0
        }
    }

    fn skip_zeros(&mut self, n: u64) {
        assert!(n <= self.zeros_ahead(), "skipped past the hole");
        self.zeros -= n;
    }
}

/// A frame, for an error message.
pub fn describe(f: &Frame) -> String {
    match f {
        Frame::Hello(_) => "a hello frame".into(),
        Frame::Header(e) => format!("the header of {}", e.path),
        Frame::Data(d) => format!("{} bytes of data", d.len()),
        Frame::Hole(n) => format!("a hole of {n} bytes"),
        Frame::Log(_) => "a log line".into(),
        Frame::Error(m) => format!("an error ({m})"),
        Frame::End(_) => "the end frame".into(),
    }
}

#[cfg(test)]
mod tests;
