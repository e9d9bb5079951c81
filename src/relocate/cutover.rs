//! The cutover: writes paused, the rest copied, targets synced, the commit
//! (`relocation.json` renamed with `switched: true`), every disk switched,
//! then the target's `vm.json`.

use super::*;

impl Relocation {
    /// Pause writes, copy the rest, sync, commit `switched`, switch, then
    /// write the target's `vm.json`. The caller set the state `Switching`.
    pub(super) fn cutover(self: &Arc<Self>) -> Result<()> {
        let t0 = Instant::now();
        let guards: Vec<_> = self.disks.iter().map(|d| d.pause_writes()).collect();
        let r = self.prepare_cutover().and_then(|()| self.commit_cutover());
        drop(guards);
        let pause = t0.elapsed().as_secs_f64() * 1000.0;
        let not_durable = r.map_err(|e| e.context("cutover"))?;
        self.clock.lock().stop();
        *self.pause_ms.lock() = Some(pause);
        tracing::info!(vm = %self.vm, target = %self.target_dir.display(), pause_ms = pause, "relocation cut over");
        let note = self.place_config().err().map(|e| e.to_string());
        // `Done` (the disks did switch; it cannot be started again), but
        // with the error when the commit is not durable: not a success.
        *self.state.lock() = (State::Done, not_durable.map(|e| e.to_string()), note);
        Ok(())
    }

    /// Writes the target's `vm.json`, which marks it complete, so only after
    /// the commit (out of the write pause). A failure leaves a complete
    /// target without it: said in the status, and written again by a
    /// restarted daemon.
    pub(super) fn place_config(&self) -> Result<()> {
        let meta = self.meta.lock().clone();
        let shown = self.target_dir.join("vm.json");
        let placed = pin_target(self.storage.as_ref(), &meta).and_then(|dir| {
            let p = dir.path().join("vm.json");
            (self.storage.rename_into_place(&p, &self.config_json))
                .and_then(|()| self.storage.sync_dir(dir.path()))
                .ctx(|| format!("write {}", shown.display()))
        });
        placed.map_err(|e| {
            let e = e.context(
                "the target is complete but its vm.json could not be written \
                 (a restarted daemon writes it)",
            );
            tracing::error!(vm = %self.vm, "{e}");
            e
        })
    }

    /// Everything that can fail, with writes paused: the final pass and
    /// the target syncs.
    pub(super) fn prepare_cutover(self: &Arc<Self>) -> Result<()> {
        for i in 0..self.disks.len() {
            self.copy_pass(i, true)?;
        }
        if self.remaining() != 0 {
            return Err(Error::new(
                ErrorKind::Io,
                "blocks still dirty with writes paused",
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            t.sync_data()
                .ctx(|| format!("fsync relocation target disk{i}"))?;
        }
        // The files were written through descriptors, wherever their
        // directory went since: committed only while it is still the
        // recorded target, or the VM would live on files at another path,
        // which no restart would reopen (nor `vm.json` mark complete).
        let meta = self.meta.lock().clone();
        let dir = pin_target(self.storage.as_ref(), &meta)?;
        // And each name still leads to the file written: a file put under
        // it is what `vm.json` and a restart would take for the VM's disk.
        for (d, t) in self.disks.iter().zip(&self.targets) {
            let shown = target_file_of(&meta.target, d);
            let Some(ino) = t.ino().ctx(|| format!("stat {}", shown.display()))? else {
                continue;
            };
            let now = std::fs::symlink_metadata(target_file_of(dir.path(), d)).map(|m| m.ino());
            if now.as_ref().ok() != Some(&ino) {
                return Err(Error::busy(format!(
                    "relocation target {} is no longer the file written (moved or replaced \
                     since): not cutting over",
                    shown.display()
                )));
            }
        }
        Ok(())
    }

    /// The commit point, then only forward progress. Err: nothing was
    /// committed. Ok(Some): committed and switched, but the commit could not
    /// be made durable (every disk failed).
    pub(super) fn commit_cutover(&self) -> Result<Option<Error>> {
        let meta_io = self.meta_io.lock();
        self.meta.lock().switched = true;
        if let Err(e) = self
            .storage
            .rename_into_place(&self.meta_path, &self.encode_meta())
        {
            // The rename did not happen: nothing was committed.
            self.meta.lock().switched = false;
            return Err(Error::io(format!("write {}", self.meta_path.display()), e));
        }
        // Committed: from here on nothing may turn back.
        // Up to 3 tries, until one succeeds (the last error if none does).
        let mut durable = None;
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            durable = io::sync_parent(self.storage.as_ref(), &self.meta_path).err();
            if durable.is_none() {
                break;
            }
        }
        drop(meta_io);
        // Failed before switched: a switched disk that has not failed has a
        // durable commit (eviction relies on it to stop caring for staging).
        let not_durable = durable.map(|e| {
            let e = e.context(format!(
                "the cutover of VM {} committed but could not be made durable",
                self.vm
            ));
            tracing::error!(vm = %self.vm, "{e}; disks now read from the target and refuse writes until released");
            for d in &self.disks {
                d.fail_hard(e.clone());
            }
            e
        });
        for (d, t) in self.disks.iter().zip(&self.targets) {
            d.switch_to(t.clone());
        }
        Ok(not_durable)
    }
}
