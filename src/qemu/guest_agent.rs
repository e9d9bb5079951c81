//! A client of the QEMU guest agent (`qemu-guest-agent` in the guest,
//! reached through a virtio-serial port QEMU exposes as a Unix socket:
//! `-chardev socket,path=PATH,server=on,wait=off,id=qga0 -device
//! virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`).
//!
//! Unlike QMP there is no greeting, and the socket answers even when no
//! agent runs in the guest. So every connection starts with
//! `guest-sync-delimited`: a 0xFF byte resets the agent's parser, its reply
//! is preceded by 0xFF, and anything a previous client left unread is
//! skipped up to it. No reply in time means no agent, said in one line.
//! After the sync, replies come in order, one per command.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::channel::Channel;
use crate::error::{Error, ErrorKind, Result};

/// How long the sync waits for an agent before deciding there is none.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Freezing every filesystem flushes them: it may take a while.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct GuestAgent {
    ch: Channel,
    timeout: Duration,
}

impl GuestAgent {
    /// Connects and syncs; an error if no agent answers within `sync`.
    pub fn connect(path: &Path, sync: Duration) -> Result<GuestAgent> {
        let ch = Channel::connect(
            "guest agent socket",
            path,
            "is the VM running with a virtio-serial port org.qemu.guest_agent.0 on this socket?",
        )?;
        let mut a = GuestAgent {
            ch,
            timeout: Duration::from_secs(30),
        };
        a.sync(sync)?;
        Ok(a)
    }

    fn sync(&mut self, timeout: Duration) -> Result<()> {
        let id: u32 = rand::random::<u32>() >> 1;
        self.ch.send_raw(&[0xff], "guest-sync-delimited")?;
        self.ch.send(
            &json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
            "guest-sync-delimited",
        )?;
        let deadline = Instant::now() + timeout;
        let no_agent = |e: Error| {
            if e.kind() == ErrorKind::Io {
                Error::new(
                    ErrorKind::NotFound,
                    format!("{e}: is qemu-guest-agent running in the guest?"),
                )
            } else {
                e
            }
        };
        loop {
            self.ch
                .read_until(0xff, deadline, "the guest agent's sync")
                .map_err(no_agent)?;
            // Its reply follows the delimiter; an older one may be stale.
            let m = self
                .ch
                .read_message(deadline, "the guest agent's sync")
                .map_err(no_agent)?;
            if m.get("return").and_then(Value::as_u64) == Some(id as u64) {
                return Ok(());
            }
        }
    }

    /// Runs one command and returns its `return` value; an `error` reply
    /// is an error naming the command and the agent's description.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        self.ch.send(&msg, command)?;
        let m = self.ch.read_message(Instant::now() + timeout, command)?;
        self.ch.reply(command, &m, "the guest agent")
    }

    pub fn ping(&mut self) -> Result<()> {
        self.execute("guest-ping", None, self.timeout).map(drop)
    }

    /// Freezes every guest filesystem (after flushing it); the number
    /// frozen.
    pub fn fsfreeze(&mut self) -> Result<u64> {
        let r = self.execute("guest-fsfreeze-freeze", None, FREEZE_TIMEOUT)?;
        Ok(r.as_u64().unwrap_or(0))
    }

    /// Connects to the agent at `path` and freezes, waiting at most
    /// `timeout` for the freeze. A freeze not answered in time may still
    /// finish in the guest, and qemu-ga on Linux never thaws by itself: the
    /// guest would stay frozen with nobody to thaw it. So before the error
    /// is returned the freeze is undone on a new connection, whose sync
    /// waits behind the freeze (the agent runs commands in order). A
    /// refusal from the agent needs no undo: it thaws a failed freeze
    /// itself.
    pub fn connect_and_freeze(
        path: &Path,
        sync: Duration,
        timeout: Duration,
    ) -> std::result::Result<(GuestAgent, u64), FreezeError> {
        let thawed = |error| FreezeError {
            error,
            may_be_frozen: false,
        };
        let mut a = GuestAgent::connect(path, sync).map_err(thawed)?;
        let e = match a.execute("guest-fsfreeze-freeze", None, timeout) {
            Ok(r) => return Ok((a, r.as_u64().unwrap_or(0))),
            Err(e) if e.kind() == ErrorKind::InvalidInput => return Err(thawed(e)),
            Err(e) => e,
        };
        drop(a);
        let undo = GuestAgent::connect(path, FREEZE_TIMEOUT.max(sync)).and_then(|mut b| b.fsthaw());
        let (what, may_be_frozen) = match undo {
            Ok(n) => (
                format!("the freeze was undone ({n} filesystems thawed)"),
                false,
            ),
            Err(u) => (
                format!(
                    "THE GUEST MAY STILL BE FROZEN: thawing it failed ({u}); \
                     thaw it with guest-fsfreeze-thaw through its agent"
                ),
                true,
            ),
        };
        Err(FreezeError {
            error: Error::new(e.kind(), format!("{e}; {what}")),
            may_be_frozen,
        })
    }

    /// Thaws them; the number thawed.
    pub fn fsthaw(&mut self) -> Result<u64> {
        let r = self.execute("guest-fsfreeze-thaw", None, FREEZE_TIMEOUT)?;
        Ok(r.as_u64().unwrap_or(0))
    }

    /// Thaws through this connection and, if that fails (a reply lost,
    /// the agent restarted), once more on a new one, whose sync waits
    /// behind a thaw still running in the guest (the agent runs commands
    /// in order): qemu-ga on Linux never thaws by itself. The number
    /// thawed; an error says both failures.
    pub fn thaw_or_retry(mut self, path: &Path, sync: Duration) -> Result<u64> {
        let first = match self.fsthaw() {
            Ok(n) => return Ok(n),
            Err(e) => e,
        };
        drop(self);
        GuestAgent::connect(path, FREEZE_TIMEOUT.max(sync))
            .and_then(|mut b| b.fsthaw())
            .map_err(|e| Error::new(e.kind(), format!("{first}; again on a new connection: {e}")))
    }

    /// `thawed` or `frozen`.
    pub fn fsfreeze_status(&mut self) -> Result<String> {
        let r = self.execute("guest-fsfreeze-status", None, self.timeout)?;
        Ok(r.as_str().unwrap_or("").to_string())
    }
}

/// A freeze that failed; `may_be_frozen` when undoing it failed too (the
/// guest's writes may be blocked: not a warning).
#[derive(Debug)]
pub struct FreezeError {
    pub error: Error,
    pub may_be_frozen: bool,
}

impl std::fmt::Display for FreezeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

#[cfg(test)]
mod tests;
