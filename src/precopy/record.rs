//! A daemon pre-copy job's request, recorded durably so that a restarted
//! daemon starts the job again ([`super::Jobs::restore`]):
//! `STATE/<repository id>/<vm>/job.json` beside the job's round state,
//! sealed (a damaged record is caught), written atomically and durably
//! (temp, fsync, rename, fsync of the directory and of any directory
//! created for it) before `POST /precopy` answers. It exists while the job
//! is meant to run: `DELETE` and the job's end remove it, a daemon stop
//! leaves it.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StartRequest;
use crate::api::pathauth::Caller;
use crate::error::{Error, IoContext, Result};

pub const RECORD_FORMAT: u32 = 1;
const FILE: &str = "job.json";
/// A request is a few hundred bytes.
const MAX_RECORD_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub format: u32,
    /// As the caller sent it: socket paths as named, not as pinned.
    pub request: StartRequest,
    /// Whose credentials authorised it: a restarted daemon checks its
    /// paths again with them.
    pub caller: Caller,
    /// Unix seconds.
    pub started: u64,
}

impl Record {
    pub fn new(request: StartRequest, caller: &Caller) -> Record {
        Record {
            format: RECORD_FORMAT,
            request,
            caller: caller.clone(),
            started: super::unix(std::time::SystemTime::now()),
        }
    }
}

pub fn path(root: &Path, repo: &str, vm: &str) -> PathBuf {
    root.join(repo).join(vm).join(FILE)
}

/// Records `r` durably.
pub fn save(root: &Path, repo: &str, r: &Record) -> Result<()> {
    let p = path(root, repo, &r.request.vm);
    let dir = p.parent().expect("a file in a directory");
    // Directories made here must survive a crash too: their parents are
    // synced (all of them, not knowing which were new).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx(|| format!("create pre-copy state directory {}", dir.display()))?;
    for d in [root.parent(), Some(root), dir.parent()]
        .into_iter()
        .flatten()
    {
        if !d.as_os_str().is_empty() {
            crate::util::fsync_dir(d)?;
        }
    }
    let bytes = crate::repo::sealed::seal("precopy_job", r)?;
    crate::util::write_atomic(&p, &bytes, 0o600, true)
}

/// Removes a VM's record durably; none is fine.
pub fn remove(root: &Path, repo: &str, vm: &str) -> Result<()> {
    let p = path(root, repo, vm);
    match std::fs::remove_file(&p) {
        Ok(()) => crate::util::fsync_dir(p.parent().expect("a file in a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", p.display()), e)),
    }
}

fn load(p: &Path, vm: &str) -> Result<Record> {
    let m = std::fs::symlink_metadata(p).ctx(|| format!("stat {}", p.display()))?;
    if !m.is_file() {
        return Err(Error::corrupt(format!("{} is not a file", p.display())));
    }
    if m.len() > MAX_RECORD_BYTES {
        return Err(Error::corrupt(format!(
            "{} is {} bytes, more than a record may have",
            p.display(),
            m.len()
        )));
    }
    let bytes = std::fs::read(p).ctx(|| format!("read {}", p.display()))?;
    let r: Record = crate::repo::sealed::unseal(&bytes, "precopy_job", &p.display().to_string())?;
    if r.format != RECORD_FORMAT {
        return Err(Error::corrupt(format!(
            "{}: unknown pre-copy job record format {}",
            p.display(),
            r.format
        )));
    }
    if r.request.vm != vm {
        return Err(Error::corrupt(format!(
            "{} names VM {:?}",
            p.display(),
            r.request.vm
        )));
    }
    Ok(r)
}

/// Every record of repository `repo`, each read on its own: one that
/// cannot be read is returned as its error (with its path).
pub fn load_all(root: &Path, repo: &str) -> Result<Vec<(PathBuf, Result<Record>)>> {
    let dir = root.join(repo);
    let entries = match std::fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        r => r.ctx(|| format!("list {}", dir.display()))?,
    };
    let mut out = vec![];
    for e in entries {
        let e = e.ctx(|| format!("list {}", dir.display()))?;
        let p = e.path().join(FILE);
        // A VM's state directory without a record: no job to start.
        let r = match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => continue,
            Err(e) => Err(Error::io(format!("stat {}", p.display()), e)),
            Ok(_) => load(&p, &e.file_name().to_string_lossy()),
        };
        out.push((p, r));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
