//! Getting blocks local before the guest asks for them.
//!
//! * [`scheduler`]: the fetch engine every repository fetch goes through:
//!   queues by class (on-demand miss > profile > relocation order >
//!   readahead), fair between sessions, GETs awaited asynchronously.
//! * [`profile`]: operational profiles — which blocks a VM read, in what
//!   order and when, recorded per session and stored in the repository.
//! * [`tracker`]: per-disk recording of first accesses and the applied
//!   profile's progress and coverage.
//! * [`feeder`]: a thread per session that releases profile blocks into
//!   the scheduler following the profile's timeline.
//! * [`stream`]: sequential-reader detection for readahead.
//! * [`layout`]: the default profile for a VM that has none: partition
//!   tables, boot sectors, filesystem metadata.

pub mod backoff;
pub mod feeder;
pub mod layout;
pub mod profile;
pub mod scheduler;
pub mod stream;
pub mod tracker;

pub use scheduler::{Scheduler, SchedulerStatus};

/// Fetch priority, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Class {
    /// A guest request is waiting for the block.
    OnDemand = 0,
    /// The operational profile says the guest will read it soon.
    Profile = 1,
    /// The relocation copier reads it next.
    Relocation = 2,
    /// A sequential reader will probably reach it.
    Readahead = 3,
}

impl Class {
    pub const COUNT: usize = 4;
    pub const ALL: [Class; Class::COUNT] = [
        Class::OnDemand,
        Class::Profile,
        Class::Relocation,
        Class::Readahead,
    ];

    pub fn from_u8(v: u8) -> Class {
        Class::ALL[(v as usize).min(Class::COUNT - 1)]
    }
}

/// How a datastore prefetches, for every session it serves.
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    /// Follow the VM's stored profile (or the default one) at recovery.
    pub use_profile: bool,
    /// Without a stored profile, stage boot-critical metadata found by
    /// parsing the disk.
    pub default_profile: bool,
    /// First reads within this long after `recover` form the recording.
    pub record_window: std::time::Duration,
    pub feeder: feeder::Settings,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            use_profile: true,
            default_profile: true,
            record_window: std::time::Duration::from_secs(300),
            feeder: feeder::Settings::default(),
        }
    }
}
