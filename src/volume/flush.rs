//! Durability: `flush` makes data, then the presence map, then the
//! changed map durable, grouping concurrent flushes into one sync; and the
//! sticky failure after a failed sync (every later flush and write fails
//! until release). Apart from the write path: a guest's fsync is answered
//! from here alone.

use std::sync::atomic::Ordering;

use super::Volume;
use crate::error::{Error, ErrorKind, IoContext, Result};

impl Volume {
    /// Makes every write and fetch completed before the call durable: data
    /// first, then the presence map (from a snapshot taken before the data
    /// sync), then the changed map. Only then may a guest's fsync be
    /// answered. Concurrent calls are grouped: a sync that started after a
    /// call was made covers it, so waiting callers share one sync.
    pub fn flush(&self) -> Result<()> {
        let me = self.flush_requests.fetch_add(1, Ordering::AcqRel) + 1;
        let mut covered = self.flush_lock.lock();
        self.check_failed()?;
        if *covered >= me {
            return Ok(());
        }
        // Every request numbered up to here was made before this sync starts.
        let upto = self.flush_requests.load(Ordering::Acquire);
        self.sync_all()?;
        *covered = upto;
        self.stats.flushes.add(1);
        Ok(())
    }

    fn sync_all(&self) -> Result<()> {
        if let Some(t) = self.target.get() {
            return t
                .sync_data()
                .ctx(|| format!("fsync relocated disk{}", self.index))
                .map_err(|e| self.fail(e));
        }
        let snap = self.store.present.snapshot_if_dirty();
        if let Err(e) = self.store.data.sync_data() {
            return Err(self.fail(Error::io(
                format!("fsync {}", self.store.data_path.display()),
                e,
            )));
        }
        if let Some(s) = snap {
            self.store
                .present
                .write_snapshot(&s)
                .map_err(|e| self.fail(e))?;
        }
        self.store.changed.persist().map_err(|e| self.fail(e))
    }

    /// Records the first failed sync (logged once, naming the disk) and
    /// returns the sticky error every later flush gets.
    pub(super) fn fail(&self, e: Error) -> Error {
        if self.failed.set(e.clone()).is_ok() {
            // Pages the mirror describes may be gone: a restart must not
            // trust it, and NFS clients must resend (the epoch changes).
            self.store.present.poison_mirror();
            tracing::error!(
                vm = %self.vm,
                disk = self.index,
                "staging of disk{} of VM {} failed: {e}; every later flush of this disk fails until the session is released",
                self.index,
                self.vm
            );
        }
        self.failed_error().unwrap_or(e)
    }

    pub(crate) fn failed_error(&self) -> Option<Error> {
        self.failed.get().map(|first| {
            Error::new(
                ErrorKind::Io,
                format!(
                    "disk{} of VM {} has failed ({first}); writes since its last good flush may be lost; release the session",
                    self.index, self.vm
                ),
            )
        })
    }

    pub(super) fn check_failed(&self) -> Result<()> {
        match self.failed_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// True once a sync of this disk failed (see `flush`).
    pub fn is_failed(&self) -> bool {
        self.failed.get().is_some()
    }
}
