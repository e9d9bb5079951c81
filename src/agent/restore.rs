//! `agent-restore`: files of a file backup copied back into the running
//! guest through the agent, to their place or under a directory, with
//! mode, owner and times. The host sends headers and contents (every
//! chunk read and verified) and an end frame the agent checks; the agent
//! answers with log lines and its own end frame.
//!
//! Stopped part-way ([`super::session`]), the guest keeps what the agent
//! wrote before the stream ended: each file whole (temp, fsync, rename),
//! the one being written removed, directories without their metadata.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::guest::Job;
use super::session::{run_in_guest, Deadline, Target};
use super::stream::{describe, Frame, FrameReader, FrameWriter};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::catalog::{Catalog, Entry, EntryKind};
use crate::repo::Repository;

/// Copies `entries` of `c` into the guest of `t`; the number sent. Once
/// `stop` is set it ends early with an [`ErrorKind::Interrupted`] error
/// saying how many entries were sent.
#[allow(clippy::too_many_arguments)]
pub fn agent_restore(
    repo: &Repository,
    t: &Target,
    container: &Path,
    c: &Catalog,
    entries: &[&Entry],
    to: Option<String>,
    (idle, max): (Duration, Duration),
    stop: &AtomicBool,
    say: &dyn Fn(&str),
) -> Result<u64> {
    if let Some(d) = &to {
        crate::repo::catalog::check_path(d).map_err(|e| e.context("--to"))?;
    }
    let job = Job::Restore { to };
    let deadline = Deadline::start(idle, max);
    let sent = AtomicU64::new(0);
    run_in_guest(t, container, &job, deadline, "agent-restore", stop, |stream| {
        send(repo, stream, deadline, c, entries, &sent, say)
    })
    .map_err(|e| {
        if e.kind() != ErrorKind::Interrupted {
            return e;
        }
        Error::interrupted(format!(
            "{e}; {} of {} entries were sent: the guest keeps each one the agent received whole, written whole; the file it was writing is removed; directories created keep default modes and times",
            sent.load(Ordering::SeqCst),
            entries.len()
        ))
    })
}

pub(crate) fn send(
    repo: &Repository,
    stream: &UnixStream,
    deadline: Deadline,
    c: &Catalog,
    entries: &[&Entry],
    sent: &AtomicU64,
    say: &dyn Fn(&str),
) -> Result<u64> {
    let mut fr = FrameReader::new(
        std::io::BufReader::new(deadline.reader(stream)),
        "the agent's stream",
    );
    let holes = match fr.next_frame()? {
        Frame::Hello(h) => {
            say(&h.describe());
            if let Some(w) = h.warning() {
                say(&w);
            }
            // An agent that reads hole frames: all-zero chunks (a sparse
            // file's holes) do not cross the channel.
            h.has(super::stream::FEATURE_HOLES)
        }
        Frame::Error(m) => {
            return Err(Error::invalid(format!(
                "the agent failed in the guest: {m}"
            )))
        }
        other => {
            return Err(Error::corrupt(format!(
                "the agent's stream began with {}",
                describe(&other)
            )))
        }
    };
    let io = |e: std::io::Error| Error::io("send to the agent", e);
    let mut w = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, stream));
    // Inodes only where the agent is to link files again: a link and the
    // first file of its inode. Agents before links pass over them (and
    // write each link out, from the content that is sent for it too).
    let (links, notes) = crate::files::link_plan(entries);
    for n in &notes {
        say(n);
    }
    let mut keep = vec![false; entries.len()];
    for (i, l) in links.iter().enumerate() {
        if let Some(j) = l {
            keep[i] = true;
            keep[*j] = true;
        }
    }
    for (i, e) in entries.iter().enumerate() {
        if e.inode.is_some() && !keep[i] {
            let mut e = (*e).clone();
            e.inode = None;
            w.header(&e).map_err(io)?;
        } else {
            w.header(e).map_err(io)?;
        }
        if e.kind == EntryKind::File {
            let mut i = 0u64;
            for ch in &e.chunks {
                let what = format!("{}/{} {} chunk {i}", c.vm, c.id, e.path);
                let (data, _) = repo.read_chunk(&ch.digest, ch.len as usize, &what)?;
                i += ch.repeat;
                if holes && data.iter().all(|&b| b == 0) {
                    // A run of zero chunks is one hole frame's worth.
                    let bytes = ch
                        .run_bytes()
                        .ok_or_else(|| Error::corrupt("a run too long"))?;
                    w.hole(bytes).map_err(io)?;
                    continue;
                }
                for _ in 0..ch.repeat {
                    w.data(&data).map_err(io)?;
                }
            }
        }
        sent.fetch_add(1, Ordering::SeqCst);
    }
    w.end().map_err(io)?;
    loop {
        match fr.next_frame()? {
            Frame::Log(l) => say(&l),
            Frame::Error(m) => {
                return Err(Error::invalid(format!(
                    "the agent failed in the guest: {m}"
                )))
            }
            Frame::End(_) => break,
            other => {
                return Err(Error::corrupt(format!(
                    "the agent's stream: unexpected {}",
                    describe(&other)
                )))
            }
        }
    }
    let mut ack = stream;
    ack.write_all(b"A").map_err(io)?;
    Ok(entries.len() as u64)
}
