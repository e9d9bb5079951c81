//! One job of the agent in a running guest, whatever the job: check the
//! guest agent (no answer: one clear error, nothing attached), attach the
//! container and a stream port ([`super::attach`]), `guest-exec` a small
//! shell script that waits for the disk and the port, mounts the
//! container read-only, runs `recoverfs agent run` from it and unmounts
//! it; hand the stream to the caller's side of the job while a watcher
//! polls the script (if it ends and the stream does not, the stream is
//! closed so the caller stops: in a backup, once the stream stops
//! bringing what the agent sent before it ended, which a host behind a
//! slow store reads long after); then detach, whatever happened.
//!
//! A stop (SIGINT/SIGTERM set the caller's flag) is seen by the watcher
//! within its poll: it closes the stream (the caller's side ends at once)
//! and removes the stream port, so the agent's writes fail instead of
//! blocking: the agent ends as after any failure, its hooks' `post`
//! first (the application is never left quiesced); the watcher waits for
//! the script to end ([`STOP_GRACE`] at most: it unmounts the container),
//! and the container is detached. The job ends in an
//! [`ErrorKind::Interrupted`] error saying what became of the agent.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::attach::Attachment;
use super::exec::{self, shell_quote, Exited};
use super::guest::Job;
use crate::error::{Error, ErrorKind, Result};
use crate::qemu::guest_agent::GuestAgent;
use crate::qemu::qmp::Qmp;

/// One VM to back up: `NAME=QMP_SOCKET[,qga=QGA_SOCKET]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub qmp: PathBuf,
    pub qga: Option<PathBuf>,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        let bad = || {
            Error::invalid(format!(
                "--vm {s:?}: expected NAME=QMP_SOCKET[,qga=QGA_SOCKET]"
            ))
        };
        let (name, rest) = s.split_once('=').ok_or_else(bad)?;
        crate::util::validate_name("VM name", name)?;
        let (qmp, qga) = match rest.split_once(",qga=") {
            Some((q, g)) if !g.is_empty() => (q, Some(PathBuf::from(g))),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        if qmp.is_empty() {
            return Err(bad());
        }
        Ok(Target {
            name: name.to_string(),
            qmp: PathBuf::from(qmp),
            qga,
        })
    }
}

/// How long one job may take: `idle`, the longest silence on its stream
/// (a hook may take a while; the agent sends keep-alive frames meanwhile);
/// and `max`, the whole job, counted from [`Deadline::start`]: a guest
/// that trickles frames forever must not hold the host forever.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub idle: Duration,
    pub max: Duration,
    pub at: Instant,
}

/// `--max-duration` when none is given.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

impl Deadline {
    pub fn start(idle: Duration, max: Duration) -> Deadline {
        Deadline {
            idle,
            max,
            at: Instant::now() + max,
        }
    }

    /// Reads `s` within the idle timeout and the overall deadline.
    pub fn reader(self, s: &UnixStream) -> TimedRead<'_> {
        TimedRead { s, d: self }
    }

    fn passed_error(&self) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "the job did not finish within --max-duration ({} s)",
                self.max.as_secs()
            ),
        )
    }

    fn passed(&self) -> std::io::Error {
        std::io::Error::other(self.passed_error())
    }
}

/// A stream read within a [`Deadline`]: each read waits at most the idle
/// timeout and never past the overall deadline.
pub struct TimedRead<'a> {
    s: &'a UnixStream,
    d: Deadline,
}

impl Read for TimedRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.d.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.d.passed());
        }
        self.s.set_read_timeout(Some(self.d.idle.min(left)))?;
        match (&mut &*self.s).read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && Instant::now() >= self.d.at =>
            {
                Err(self.d.passed())
            }
            // QEMU closing its chardev socket with the host's keep-alives
            // still unread in its queue (the guest's port was closed: an
            // agent killed) makes Linux fail this read with ECONNRESET:
            // the stream ended there, and the end-frame check judges what
            // came (truncated, never taken for a whole backup).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(0),
            r => r,
        }
    }
}

/// How long a stopped job waits for the agent in the guest to end (its
/// `post` hooks, then unmounting the container) before detaching.
pub const STOP_GRACE: Duration = Duration::from_secs(60);

/// Runs `job` in the guest of `t` with `container` attached; `body` is the
/// host's side of the stream, which it reads within `deadline`
/// ([`Deadline::reader`]). `what` names the command in messages. Once
/// `stop` is set the job ends early, as the module says.
pub fn run_in_guest<T>(
    t: &Target,
    container: &Path,
    job: &Job,
    deadline: Deadline,
    what: &str,
    stop: &AtomicBool,
    body: impl FnOnce(&UnixStream) -> Result<T>,
) -> Result<T> {
    let qga = t.qga.as_ref().ok_or_else(|| {
        Error::invalid(format!(
            "VM {}: no guest agent socket given (--vm {}=QMP,qga=QGA_SOCKET): the agent is started through qemu-guest-agent, and no serial-console login is configured",
            t.name, t.name
        ))
    })?;
    let mut ga = GuestAgent::connect(qga, crate::qemu::guest_agent::SYNC_TIMEOUT).map_err(|e| {
        Error::new(
            e.kind(),
            format!("VM {}: no guest agent answers ({e}); {what} needs qemu-guest-agent running in the guest", t.name),
        )
    })?;
    let qmp = Qmp::connect(&t.qmp).map_err(|e| e.context(format!("VM {}", t.name)))?;
    let mut att = Attachment::attach(qmp, container).map_err(|e| {
        e.context(format!(
            "VM {}: cannot attach the agent container {} (nothing is left attached)",
            t.name,
            container.display()
        ))
    })?;
    let result = if stop.load(Ordering::SeqCst) {
        Err(Error::interrupted("stopped before the agent started"))
    } else {
        run_job(&mut ga, &mut att, t, job, deadline, stop, body)
    };
    // Detach whatever happened.
    let detached = att.detach();
    if let (Err(e), true) = (&result, stop.load(Ordering::SeqCst)) {
        let how = if e.kind() == ErrorKind::Interrupted {
            e.to_string()
        } else {
            format!("stopped ({e})")
        };
        return Err(Error::interrupted(match detached {
            Ok(()) => format!("VM {}: {how}; the agent container was detached", t.name),
            Err(d) => format!(
                "VM {}: {how}; detaching the agent container failed (devices rfsagent-*-{} may stay attached): {d}",
                t.name, att.id
            ),
        }));
    }
    match (result, detached) {
        (Ok(r), Ok(())) => Ok(r),
        (Ok(_), Err(e)) => Err(e.context(format!("VM {}", t.name))),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(d)) => {
            // A VM that is gone has nothing attached any more.
            tracing::warn!(error = %d, "detach after a failure");
            Err(e)
        }
    }
}

/// The script `guest-exec` runs: wait for the container disk and the
/// port, mount, run the agent, unmount.
fn script(att: &Attachment, job: &Job) -> String {
    let job = serde_json::to_string(job).expect("json");
    format!(
        r#"ser={ser}; port=/dev/virtio-ports/{port}; mnt=/run/recoverfs-agent-{id}
dev=
i=0
while [ $i -lt 600 ]; do
  for d in /dev/disk/by-id/*_"$ser"; do [ -b "$d" ] && dev=$d; done
  if [ -z "$dev" ]; then
    for b in /sys/block/sd*; do
      grep -qa "$ser" "$b/device/vpd_pg80" 2>/dev/null && dev=/dev/${{b##*/}}
    done
  fi
  [ -n "$dev" ] && [ -e "$port" ] && break
  sleep 0.1; i=$((i+1))
done
[ -n "$dev" ] || {{ echo "the agent container (disk serial $ser) did not appear in the guest within 60 s" >&2; exit 90; }}
[ -e "$port" ] || {{ echo "the stream port $port did not appear in the guest within 60 s" >&2; exit 91; }}
mkdir -p "$mnt" && mount -t ext4 -o ro "$dev" "$mnt" || {{ echo "cannot mount the agent container $dev" >&2; exit 92; }}
"$mnt/recoverfs" agent run --port "$port" --container "$mnt" --job {job}
rc=$?
umount "$mnt" || umount -l "$mnt"
rmdir "$mnt"
exit $rc
"#,
        ser = att.serial,
        port = att.port,
        id = att.id,
        job = shell_quote(&job),
    )
}

fn run_job<T>(
    ga: &mut GuestAgent,
    att: &mut Attachment,
    t: &Target,
    job: &Job,
    deadline: Deadline,
    stop: &AtomicBool,
    body: impl FnOnce(&UnixStream) -> Result<T>,
) -> Result<T> {
    let stream = att.stream.take().expect("attached with a stream");
    // A backstop: the body reads through a TimedRead, which sets its own.
    stream
        .set_read_timeout(Some(deadline.idle))
        .map_err(|e| Error::io("stream socket", e))?;
    // Stopped while attaching: a script started now would wait a minute
    // for the port a stop removes.
    if stop.load(Ordering::SeqCst) {
        return Err(Error::interrupted("stopped before the agent started"));
    }
    let pid = exec::spawn(ga, &["/bin/sh", "-c", &script(att, job)])
        .map_err(|e| e.context(format!("VM {}: start the agent through guest-exec", t.name)))?;
    let done = AtomicBool::new(false);
    let killer = stream
        .try_clone()
        .map_err(|e| Error::io("stream socket", e))?;
    std::thread::scope(|s| {
        // Watches the guest process; if it ends and the stream does not
        // follow, or the deadline passes (a body blocked writing to a
        // guest that stopped reading), closes the stream so the body stops.
        // On a stop, closes the stream and removes the port at once.
        let watcher = s.spawn(|| -> Result<Exited> {
            let r = watch(ga, pid, &done, deadline, stop, &mut || {
                let _ = killer.shutdown(std::net::Shutdown::Both);
                att.unplug_port()
            });
            // What the agent sent before it ended may still be on its way
            // in a backup (the body only reads): a host behind a slow
            // store reads it long after (an agent before keep-alives exits
            // 30 s after its end frame, acknowledged or not).
            let follow = r.is_ok() && matches!(job, Job::Backup { .. });
            settle(&killer, &done, follow, deadline, stop, AFTER_EXIT);
            r
        });
        let received = body(&stream);
        if received.is_err() {
            // The agent sees the port's other end gone and stops, so the
            // script unmounts the container before it is detached.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        done.store(true, Ordering::SeqCst);
        let exited = watcher.join().expect("watcher thread");
        if received.is_err() && stop.load(Ordering::SeqCst) {
            return Err(stopped_agent(exited));
        }
        finish(received, exited, t)
    })
}

/// How long the body may go on after the agent ended without its stream
/// bringing anything more.
const AFTER_EXIT: Duration = Duration::from_secs(10);

/// After the agent ended (or the job's time passed): lets the body end
/// on its own, and closes `stream` so that it stops once `grace` passed
/// (with `follow`: `grace` without a byte waiting to be read: the stream
/// still brings what the agent sent, and nothing is read from a socket
/// that holds bytes), the deadline passed, or the job is stopped.
fn settle(
    stream: &UnixStream,
    done: &AtomicBool,
    follow: bool,
    deadline: Deadline,
    stop: &AtomicBool,
    grace: Duration,
) {
    let mut quiet = Instant::now();
    while !done.load(Ordering::SeqCst) {
        if follow && waiting(stream) {
            quiet = Instant::now();
        }
        if quiet.elapsed() > grace || Instant::now() >= deadline.at || stop.load(Ordering::SeqCst) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `stream` has something to read (or its end).
fn waiting(stream: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
}

/// What became of the agent after a stop.
fn stopped_agent(exited: Result<Exited>) -> Error {
    Error::interrupted(match exited {
        Ok(e) if e.success() => "stopped; the agent in the guest ended".to_string(),
        Ok(e) => format!(
            "stopped; the agent in the guest ended ({}: {})",
            e.status(),
            last_line(&e.stderr)
        ),
        Err(e) => format!("stopped; the agent in the guest had not ended ({e})"),
    })
}

/// Polls the guest process until it ends (or `done` and it ended), at
/// the latest until the deadline. Once `stop` is set, calls `on_stop`
/// (once) and waits [`STOP_GRACE`] at most.
fn watch(
    ga: &mut GuestAgent,
    pid: i64,
    done: &AtomicBool,
    deadline: Deadline,
    stop: &AtomicBool,
    on_stop: &mut dyn FnMut() -> Result<()>,
) -> Result<Exited> {
    let mut since_done: Option<Instant> = None;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if let Some(e) = exec::status(ga, pid)? {
            return Ok(e);
        }
        if stop.load(Ordering::SeqCst) {
            match stopped_at {
                None => {
                    stopped_at = Some(Instant::now());
                    if let Err(e) = on_stop() {
                        // Then the agent may block on the port until the
                        // detach removes it: waiting would not help.
                        return Err(e.context("remove the stream port"));
                    }
                }
                Some(t) if t.elapsed() > STOP_GRACE => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("not within {} s", STOP_GRACE.as_secs()),
                    ));
                }
                Some(_) => {}
            }
        } else if Instant::now() >= deadline.at {
            return Err(deadline.passed_error());
        }
        if done.load(Ordering::SeqCst) && stopped_at.is_none() {
            let t = *since_done.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(60) {
                return Err(Error::new(
                    ErrorKind::Io,
                    "the agent did not exit within 60 s of its stream's end",
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The body's result, if both it and the guest process ended well.
fn finish<T>(received: Result<T>, exited: Result<Exited>, t: &Target) -> Result<T> {
    let vm = &t.name;
    match (received, exited) {
        (Ok(c), Ok(e)) if e.success() => Ok(c),
        (Ok(_), Ok(e)) => Err(Error::new(
            ErrorKind::Io,
            format!(
                "VM {vm}: the agent ended with {}: {}",
                e.status(),
                e.stderr.trim()
            ),
        )),
        (Err(r), Ok(e))
            if !e.success() && !e.stderr.trim().is_empty() && r.kind() != ErrorKind::NotFound =>
        {
            Err(Error::new(
                r.kind(),
                format!(
                    "VM {vm}: {r} (the agent script ended with {}: {})",
                    e.status(),
                    last_line(&e.stderr)
                ),
            ))
        }
        (Err(r), _) => Err(r.context(format!("VM {vm}"))),
        (Ok(_), Err(e)) => Err(e.context(format!("VM {vm}: the agent's exit status"))),
    }
}

fn last_line(s: &str) -> &str {
    s.trim().lines().last().unwrap_or("")
}

#[cfg(test)]
mod tests;
