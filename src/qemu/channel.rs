//! JSON messages, one per line, over a Unix socket to QEMU: what QMP and
//! the guest agent have in common. Every read has a deadline and every
//! line a size bound, so a QEMU (or guest) that hangs, or a socket that is
//! something else, ends in a one-line error, never a hang or an unbounded
//! allocation.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};

/// The longest line we accept (a `query-block` of many disks is a few
/// hundred KiB; a guest agent's file read is about 64 MiB of base64 at
/// most, which callers ask for in smaller pieces).
const MAX_LINE: usize = 16 << 20;

pub(crate) struct Channel {
    /// "QMP socket", "guest agent socket": for messages.
    what: &'static str,
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Channel {
    /// Connects; `hint` tells the user what to check when nothing listens.
    pub(crate) fn connect(what: &'static str, path: &Path, hint: &str) -> Result<Channel> {
        // A socket pinned for a caller is named by where it was found.
        let shown = crate::api::pathauth::shown(path);
        let stream = UnixStream::connect(path).map_err(|e| {
            Error::new(
                match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        ErrorKind::NotFound
                    }
                    _ => ErrorKind::Io,
                },
                format!("cannot reach {what} {} ({e}): {hint}", shown.display()),
            )
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io(format!("{what} {}", shown.display()), e))?;
        Ok(Channel {
            what,
            path: shown,
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The process at the other end (`SO_PEERCRED`), if the kernel knows it.
    pub(crate) fn peer_pid(&self) -> Option<u32> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let c = getsockopt(&self.writer, PeerCredentials).ok()?;
        u32::try_from(c.pid()).ok().filter(|&p| p > 0)
    }

    /// Sends one message as a line.
    pub(crate) fn send(&mut self, msg: &Value, command: &str) -> Result<()> {
        let mut line = serde_json::to_vec(msg).expect("json");
        line.push(b'\n');
        self.send_raw(&line, command)
    }

    pub(crate) fn send_raw(&mut self, bytes: &[u8], command: &str) -> Result<()> {
        self.writer.write_all(bytes).map_err(|e| {
            Error::io(
                format!("send {command} to {} {}", self.what, self.path.display()),
                e,
            )
        })
    }

    /// Reads one JSON message (one line) before `deadline`.
    pub(crate) fn read_message(&mut self, deadline: Instant, waiting_for: &str) -> Result<Value> {
        self.read_message_in_time(deadline, waiting_for)?
            .ok_or_else(|| self.timed_out(waiting_for))
    }

    /// [`Self::read_message`], `None` if no whole line came before
    /// `deadline` (for a caller that words that itself).
    pub(crate) fn read_message_in_time(
        &mut self,
        deadline: Instant,
        waiting_for: &str,
    ) -> Result<Option<Value>> {
        let Some(line) = self.read_line_in_time(b'\n', deadline, waiting_for)? else {
            return Ok(None);
        };
        serde_json::from_slice(&line).map(Some).map_err(|e| {
            self.protocol_error(format!(
                "not JSON while waiting for {waiting_for} ({e}): {:?}",
                String::from_utf8_lossy(&line[..line.len().min(80)])
            ))
        })
    }

    /// Reads up to and including `end` before `deadline` (bounded).
    pub(crate) fn read_until(
        &mut self,
        end: u8,
        deadline: Instant,
        waiting_for: &str,
    ) -> Result<Vec<u8>> {
        self.read_line_in_time(end, deadline, waiting_for)?
            .ok_or_else(|| self.timed_out(waiting_for))
    }

    /// [`Self::read_until`], `None` when `deadline` passes first.
    fn read_line_in_time(
        &mut self,
        end: u8,
        deadline: Instant,
        waiting_for: &str,
    ) -> Result<Option<Vec<u8>>> {
        let mut line = vec![];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| Error::io(format!("{} {}", self.what, self.path.display()), e))?;
            // At most what is left of the bound, so a line never grows past it.
            let limit = (MAX_LINE + 1 - line.len()) as u64;
            match (&mut self.reader).take(limit).read_until(end, &mut line) {
                Ok(0) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                            "the other end closed {} {} while we waited for {waiting_for} (did the VM exit?)",
                            self.what,
                            self.path.display()
                        ),
                    ))
                }
                Ok(_) if line.last() == Some(&end) => return Ok(Some(line)),
                Ok(_) if line.len() > MAX_LINE => {
                    return Err(self.protocol_error(format!(
                        "a line longer than {MAX_LINE} bytes while waiting for {waiting_for}"
                    )))
                }
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::io(
                        format!("read {} {}", self.what, self.path.display()),
                        e,
                    ))
                }
            }
        }
    }

    /// The `return` value of a reply to `command`, or its `error` as one
    /// line naming the command and who refused it.
    pub(crate) fn reply(&self, command: &str, m: &Value, who: &str) -> Result<Value> {
        if let Some(r) = m.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = m.get("error") {
            let class = e.get("class").and_then(Value::as_str).unwrap_or("?");
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("");
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{who} refused {command}: {class}: {desc}"),
            ));
        }
        Err(self.protocol_error(format!("unexpected reply to {command}: {}", short(m))))
    }

    fn timed_out(&self, waiting_for: &str) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "no answer to {waiting_for} on {} {} in time",
                self.what,
                self.path.display()
            ),
        )
    }

    pub(crate) fn protocol_error(&self, what: String) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!("{} {}: {what}", self.what, self.path.display()),
        )
    }
}

/// A message, cut short for an error line.
pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}
