//! The durable pre-copy state of one VM: which chunk holds each block as
//! far as pre-copy knows, and from which round on that is proven (see the
//! module docs of [`super`] for the rule). One sealed JSON document,
//! `STATE/<repository id>/<vm>/state.json`, replaced atomically (temp,
//! fsync, rename, fsync dir) at every checkpoint; `lock` beside it is held
//! (flock) by the job that owns the VM.

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::repo::chunk::Digest;
use crate::repo::manifest::DiskManifest;

pub const STATE_FORMAT: u32 = 1;
/// A state file is a chunk list per disk: bounded like a manifest's.
const MAX_STATE_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub format: u32,
    pub vm: String,
    /// The repository id the chunks are stored in.
    pub repo: String,
    /// Names this cycle's round bitmaps: `rfs-pc-<cycle>-<round>`.
    pub cycle: String,
    /// The backup the cycle started from (its chunk ids and its
    /// since-backup bitmap), none for a cycle that read every block.
    pub base: Option<String>,
    pub chunk_size: u32,
    /// Rounds completed in this cycle.
    pub rounds: u64,
    pub disks: Vec<DiskState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskState {
    /// QEMU's node of the disk (the round bitmaps live on it).
    pub node: String,
    pub size: u64,
    /// Per chunk, the chunk id holding its bytes as last read (`None`:
    /// zeros).
    pub chunks: Vec<Option<Digest>>,
    /// Per chunk, the round bitmap index from which on every write to it
    /// is marked (`None`: never read, must be read).
    pub since: Vec<Option<u64>>,
}

impl DiskState {
    /// Chunks whose recorded id is not proven by any round bitmap yet.
    pub fn unknown(&self) -> usize {
        self.since.iter().filter(|s| s.is_none()).count()
    }
}

impl State {
    /// The oldest and newest round bitmap a chunk still depends on (none:
    /// no chunk is proven by a bitmap yet).
    pub fn needed_rounds(&self) -> Option<(u64, u64)> {
        let all = self.disks.iter().flat_map(|d| d.since.iter().flatten());
        let lo = all.clone().min()?;
        let hi = all.max()?;
        Some((*lo, *hi))
    }

    /// Every chunk known and proven by round bitmap `round` alone: the
    /// state right after a complete round, which a final backup can use.
    pub fn clean_at(&self, round: u64) -> bool {
        self.disks
            .iter()
            .all(|d| d.since.iter().all(|s| *s == Some(round)))
    }

    /// The disks as a manifest's (chunk ids as recorded; sizes unknown).
    pub fn disk_manifests(&self) -> Vec<DiskManifest> {
        (self.disks.iter().enumerate())
            .map(|(i, d)| DiskManifest {
                name: format!("disk{i}"),
                size: d.size,
                chunk_size: self.chunk_size,
                chunks: d.chunks.iter().copied().collect(),
                stored_bytes: 0,
                new_bytes: 0,
            })
            .collect()
    }

    fn check(&self) -> Result<()> {
        if self.format != STATE_FORMAT {
            return Err(Error::corrupt(format!(
                "unknown pre-copy state format {}",
                self.format
            )));
        }
        for (i, d) in self.disks.iter().enumerate() {
            let n = DiskManifest::chunk_count(d.size, self.chunk_size);
            if d.chunks.len() as u64 != n || d.since.len() as u64 != n {
                return Err(Error::corrupt(format!(
                    "disk {i} lists {} chunks, its size needs {n}",
                    d.chunks.len()
                )));
            }
        }
        Ok(())
    }
}

/// Where one VM's state lives, and its lock.
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates `root/<repo>/<vm>` (mode 0700) and takes its lock: a second
    /// job for the same VM and repository is refused.
    pub fn open(root: &Path, repo: &str, vm: &str) -> Result<StateDir> {
        let dir = root.join(repo).join(vm);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .ctx(|| format!("create pre-copy state directory {}", dir.display()))?;
        let path = dir.join("lock");
        let Some(f) = crate::util::try_lock_file(&path)? else {
            return Err(Error::busy(format!(
                "pre-copy of VM {vm} is already running (lock {} is held)",
                path.display()
            )));
        };
        Ok(StateDir { dir, _lock: f })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The saved state; `Ok(None)` if there is none, an error if it is
    /// unreadable or damaged (the caller falls back and says why).
    pub fn load(&self) -> Result<Option<State>> {
        let p = self.path();
        let bytes = match std::fs::metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("stat {}", p.display()), e)),
            Ok(m) if m.len() > MAX_STATE_BYTES => {
                return Err(Error::corrupt(format!(
                    "{} is {} bytes, more than a state may have",
                    p.display(),
                    m.len()
                )))
            }
            Ok(_) => std::fs::read(&p).ctx(|| format!("read {}", p.display()))?,
        };
        let s: State = crate::repo::sealed::unseal(&bytes, "precopy", &format!("{}", p.display()))?;
        s.check().map_err(|e| e.context(p.display()))?;
        Ok(Some(s))
    }

    /// Replaces the state atomically and durably.
    pub fn save(&self, s: &State) -> Result<()> {
        let bytes = crate::repo::sealed::seal("precopy", s)?;
        crate::util::write_atomic(&self.path(), &bytes, 0o600, true)
    }

    /// Removes the state durably (after the final backup used it).
    pub fn remove(&self) -> Result<()> {
        let p = self.path();
        match std::fs::remove_file(&p) {
            Ok(()) => crate::util::fsync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", p.display()), e)),
        }
    }
}
