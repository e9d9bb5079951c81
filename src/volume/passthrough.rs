//! Direct reads: the part of `Volume` a frontend uses to let the kernel
//! read a disk's file itself (FUSE passthrough), without the daemon seeing
//! each read.
//!
//! A direct reader reads the file the volume serves from (staging, or the
//! relocation target after cutover) as it is, so three things that could
//! change *which* bytes that file holds are ruled out while one is open:
//! * **missing blocks**: granted only when every block with backup data is
//!   present (zero blocks are holes in the file and read as zeros), so no
//!   read would need a fetch;
//! * **eviction**: a volume with a direct reader evicts nothing (an evicted
//!   block is a hole and would read as zeros). The grant is decided under
//!   the CLOCK hand lock, which an eviction batch holds from picking its
//!   victims to punching their holes, so no batch is half done at grant;
//! * **relocation**: not granted on staging while a relocation runs (its
//!   cutover would move writes to the target under the reader), and a
//!   relocation does not start while staging has a direct reader. After
//!   cutover the grant is for the target file.
//!
//! Guest writes (through NBD, NFS or a writable FUSE open) still go through
//! the volume and update the same file in place, so a direct reader sees
//! them; they are tracked as changed as always. A write never fills a
//! missing block under a direct reader because none is missing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Volume;
use crate::error::{Error, Result};
use crate::staging::io::BlockFile;
use crate::staging::PersistentBitmap;

impl Volume {
    /// Grants a direct reader if the file the volume serves from holds
    /// every byte of the disk, and returns that file. Pair with
    /// `end_direct_read`.
    pub fn begin_direct_read(&self) -> Option<Arc<dyn BlockFile>> {
        // No eviction batch runs while we decide (see the module doc).
        let _hand = self.clock_hand.lock();
        let mut readers = self.direct_readers.lock();
        if self.closed.load(Ordering::Acquire) || self.is_failed() {
            return None;
        }
        let file = match self.target.get() {
            Some(t) => t.clone(),
            None if self.copied.read().is_some() => return None,
            None if self.unstaged_bytes() > 0 => return None,
            None => self.store.data.clone(),
        };
        *readers += 1;
        Some(file)
    }

    /// A direct reader granted by `begin_direct_read` is gone.
    pub fn end_direct_read(&self) {
        let mut readers = self.direct_readers.lock();
        *readers = readers.saturating_sub(1);
    }

    /// Direct readers now (eviction skips the volume while there are any).
    pub fn direct_readers(&self) -> u32 {
        *self.direct_readers.lock()
    }

    /// Starts a relocation's tracking (its copied map); refused while a
    /// direct reader reads staging, which the cutover would leave behind.
    pub(crate) fn set_copied_map(&self, m: Option<Arc<PersistentBitmap>>) -> Result<()> {
        let readers = self.direct_readers.lock();
        if m.is_some() && *readers > 0 && self.target.get().is_none() {
            return Err(Error::busy(format!(
                "disk{} of VM {} is open read-only with kernel passthrough: close it, then relocate",
                self.index, self.vm
            )));
        }
        *self.copied.write() = m;
        Ok(())
    }
}
