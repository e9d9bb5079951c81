//! One VM's part in the common snapshot time (step 2): freeze its guest's
//! filesystems, stop it, open a point-in-time view per disk, resume it,
//! thaw. The run calls each step on every VM in turn, so that all VMs
//! share one snapshot time; a step that fails fails its VM alone.

use std::time::{Duration, Instant};

use super::report::Clock;
use super::vm::Vm;
use crate::error::{Error, Result};
use crate::qemu::fleece;
use crate::qemu::guest_agent::{GuestAgent, FREEZE_TIMEOUT};

impl Vm {
    pub(super) fn freeze(&mut self, clock: &Clock, timeout: Duration) {
        let Some(path) = self.spec.agent.clone() else {
            return;
        };
        match GuestAgent::connect_and_freeze(&path, timeout, FREEZE_TIMEOUT) {
            Ok((a, _)) => {
                self.agent = Some(a);
                self.report.consistency = "application-consistent".into();
                clock.event(&mut self.report, "frozen", None);
            }
            // A guest possibly left frozen takes no part: its error says so.
            Err(e) if e.may_be_frozen => self.fail(clock, e.error),
            Err(e) => {
                tracing::warn!(vm = %self.spec.name, "no filesystem freeze, the backup is crash-consistent: {e}");
                self.report.consistency = format!("crash-consistent: guest agent: {e}");
            }
        }
    }

    pub(super) fn stop(&mut self, clock: &Clock) -> Result<()> {
        let q = self.q()?;
        let running = q.status()?.running;
        // Recorded before the stop goes out: QEMU answers it only after
        // draining the guest's I/O (which can outlast the QMP timeout), so
        // a stop that took effect may look failed, and must still be
        // followed by a `cont`.
        self.was_running = running;
        self.stopped_at = Some(Instant::now());
        self.q()?.stop().map_err(|e| e.context("stopping the VM"))?;
        clock.event(&mut self.report, "stopped", None);
        Ok(())
    }

    pub(super) fn open_views(&mut self, clock: &Clock, run: &str, chunk_size: u32) -> Result<()> {
        let dir = self.dir.as_ref().map(|d| d.path().to_path_buf());
        let dir = dir.ok_or_else(|| Error::invalid("no temporary directory"))?;
        for i in 0..self.disks.len() {
            let tag = format!("{run}-{}-{i}", self.index);
            let disk = self.disks[i].clone();
            let prev = self.prev.as_ref().map(|p| p.bitmaps[i].clone());
            if let Some(b) = &prev {
                // It stops counting at the snapshot; the new one starts.
                fleece::bitmap_op(self.q()?, "disable", &disk.node_name, b)
                    .map_err(|e| e.context(format!("disk {i}: disable dirty bitmap {b}")))?;
                self.prev_disabled = i + 1;
            }
            let v =
                fleece::open_view_with(self.q()?, &disk, &tag, &dir, chunk_size, prev.as_deref())
                    .map_err(|e| e.context(format!("disk {i} ({})", disk.qdev)))?;
            self.views.push(v);
            clock.event(&mut self.report, "view_opened", Some(i));
        }
        Ok(())
    }

    /// Resumes the VM if it was running before the stop (also after a
    /// stop that seemed to fail: `cont` on a running VM changes nothing).
    fn resume(&mut self, clock: &Clock) -> Result<()> {
        let Some(at) = self.stopped_at.take() else {
            return Ok(());
        };
        let r = match self.was_running {
            true => self.q().and_then(|q| q.cont()),
            false => Ok(()),
        };
        self.report.paused_ms = Some(at.elapsed().as_secs_f64() * 1000.0);
        clock.event(&mut self.report, "resumed", None);
        r.map_err(|e| {
            e.context("resuming the VM failed, THE VM IS PAUSED (resume it with QMP cont)")
        })
    }

    /// [`Self::resume`]; its error fails the VM ([`Self::fail_or_add`]).
    pub(super) fn resume_or_fail(&mut self, clock: &Clock) {
        let Err(e) = self.resume(clock) else {
            return;
        };
        self.fail_or_add(clock, e);
    }

    /// Thaws the guest's filesystems, retrying on a new connection; a thaw
    /// that still fails fails the VM ([`Self::fail_or_add`]): a guest left
    /// frozen must not pass for a successful backup.
    pub(super) fn thaw(&mut self, clock: &Clock, timeout: Duration) {
        let Some(a) = self.agent.take() else {
            return;
        };
        let path = self.spec.agent.clone().unwrap_or_default();
        let Err(e) = a.thaw_or_retry(&path, timeout) else {
            clock.event(&mut self.report, "thawed", None);
            return;
        };
        let e = e.context(
            "THE GUEST MAY STILL BE FROZEN: thawing its filesystems failed \
             (thaw them with guest-fsfreeze-thaw through its agent)",
        );
        self.fail_or_add(clock, e);
    }
}
