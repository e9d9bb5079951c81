//! What a run is asked to do: the VMs (each with its QMP socket, guest
//! agent and any base a caller vouches for), how many are read at once,
//! the chunk size and the timing knobs. Apart from the run: callers (the
//! CLI, `precopy`) build them without the run's machinery.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::repo::locks::WriterLock;
use crate::repo::manifest::Manifest;

/// Called with (VM name, event name) as each event is recorded (tests use
/// it to act at a precise point of a run).
pub type Hook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// One VM to back up.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub qmp: PathBuf,
    /// The guest agent's socket, to freeze the guest's filesystems.
    pub agent: Option<PathBuf>,
    /// A base the caller vouches for (pre-copy), used instead of the
    /// newest backup whatever `incremental` says.
    pub base: Option<GivenBase>,
    /// Back it up even if its QEMU's identity is not its newest backup's
    /// (`--new-identity`: the VM was re-created).
    pub new_identity: bool,
}

/// A base for one VM's backup that is not a backup of its own: the chunk
/// ids of every disk block as a caller recorded them, and per disk the
/// enabled dirty bitmap on the disk's node covering every block whose
/// recorded chunk may be stale (`precopy`: the chunks it copied, and its
/// newest round's bitmap). The backup disables each bitmap at the
/// snapshot and reads only what it marks, exactly as for an incremental.
#[derive(Clone)]
pub struct GivenBase {
    /// Disk geometry and chunk ids (`stored_bytes`: of its distinct chunks).
    pub manifest: Manifest,
    /// The writer lock under which the caller found its chunks (written
    /// by it, or checked to exist). They are in no manifest, so only that
    /// lock keeps a collector from them: it must still be trusted when the
    /// manifest naming them is published, and is held through it.
    pub vouched_by: Option<Arc<WriterLock>>,
    pub bitmaps: Vec<String>,
    /// The backup's `mode` (e.g. `precopy`).
    pub mode: String,
    /// The backup recorded as the base in the new manifest, if any.
    pub base: Option<String>,
}

impl std::fmt::Debug for GivenBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GivenBase")
            .field("manifest", &self.manifest)
            .field("vouched_by", &self.vouched_by.is_some())
            .field("bitmaps", &self.bitmaps)
            .field("mode", &self.mode)
            .field("base", &self.base)
            .finish()
    }
}

pub struct Options {
    pub vms: Vec<VmSpec>,
    /// VMs read at the same time.
    pub jobs: usize,
    pub chunk_size: u32,
    /// How long write rates are measured.
    pub rate_window: Duration,
    /// How long a guest agent may take to answer its sync.
    pub agent_timeout: Duration,
    /// Read only what each VM's previous backup's dirty bitmaps mark.
    pub incremental: bool,
    /// Which VM is read first.
    pub order: ReadOrder,
    pub hook: Option<Hook>,
}

/// The order VMs are read in, by measured write rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadOrder {
    /// Busiest first: the views that cost most are released soonest.
    #[default]
    BusiestFirst,
    /// Idle first: only to measure what busiest-first saves.
    IdleFirst,
}
