//! Starting a relocation (the target checked and made, files created or
//! emptied, the record written) and reopening a recorded one at a
//! (re)start: the target pinned, its files opened, the copied maps
//! installed on the disks and the restart rule applied (see `copy`).

use super::*;
use crate::util::mountinfo::{self, Mount};

impl Relocation {
    /// Checks the target and starts copying.
    pub fn start(req: Request) -> Result<Arc<Relocation>> {
        if req.rate_mbps.is_some_and(|r| !r.is_finite() || r <= 0.0) {
            return Err(Error::invalid("--rate must be a positive number of MB/s"));
        }
        let (target_dir, created_dir, target_id) = Self::check_target(&req)?;
        let meta = Meta {
            rate_mbps: req.rate_mbps,
            created_dir,
            target_id: Some(target_id),
            ..Meta::first_pass(target_dir)
        };
        let r = Self::begin(req.source, meta)?;
        r.spawn();
        Ok(r)
    }

    /// Validates `to` on the real filesystem and returns `to/<vm>`, made a
    /// 0700 directory, whether it was made now, and its identity. Refuses
    /// symbolic links, overlap with the mount or staging, a non-empty
    /// target without `force`, and too little room.
    pub(super) fn check_target(req: &Request) -> Result<(PathBuf, bool, TargetId)> {
        let dir = std::fs::canonicalize(req.to)
            .map_err(|e| Error::io(format!("relocation target {}", req.to.display()), e))?;
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "relocation target {} is not a directory",
                dir.display()
            )));
        }
        for f in req.forbidden {
            if let Ok(f) = std::fs::canonicalize(f) {
                if dir.starts_with(&f) || f.starts_with(dir.join(req.source.vm)) {
                    return Err(Error::invalid(format!(
                        "relocation target {} overlaps {}: choose a directory on primary storage",
                        dir.display(),
                        f.display()
                    )));
                }
            }
        }
        let target_dir = dir.join(req.source.vm);
        refuse_recoverfs_dirs(&target_dir)?;
        warn_if_locks_stay_local(&target_dir);
        let mut missing = false;
        match std::fs::symlink_metadata(&target_dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::invalid(format!(
                    "relocation target {} is a symbolic link, which recoverfs never follows",
                    target_dir.display()
                )))
            }
            Ok(m) if !m.is_dir() => {
                return Err(Error::invalid(format!(
                    "relocation target {} exists and is not a directory",
                    target_dir.display()
                )))
            }
            Ok(_) => {
                let config = target_dir.join("vm.json");
                if std::fs::symlink_metadata(&config).is_ok() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "relocation target {} holds a complete relocated copy of a VM \
                             ({} is there), which a VM may run from: never overwritten, not \
                             even with --force; relocate elsewhere, or remove that directory \
                             yourself if nothing uses it",
                            target_dir.display(),
                            config.display()
                        ),
                    ));
                }
                let mut rd = std::fs::read_dir(&target_dir)
                    .ctx(|| format!("read {}", target_dir.display()))?;
                if rd.next().is_some() && !req.force {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "relocation target {} is not empty (use --force to overwrite)",
                            target_dir.display()
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing = true,
            Err(e) => return Err(Error::io(format!("stat {}", target_dir.display()), e)),
        }
        let needed: u64 = req.source.disks.iter().map(|d| d.non_hole_bytes()).sum();
        let st = nix::sys::statvfs::statvfs(&dir)
            .map_err(|e| Error::io(format!("statvfs {}", dir.display()), e.into()))?;
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        if avail < needed {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "relocation target {} has {} free, the disks need up to {}",
                    dir.display(),
                    crate::util::human_bytes(avail),
                    crate::util::human_bytes(needed)
                ),
            ));
        }
        req.source
            .storage
            .create_dir_all(&target_dir)
            .ctx(|| format!("create {}", target_dir.display()))?;
        let pinned = req
            .source
            .storage
            .pin_dir(&target_dir)
            .map_err(|e| Error::io(format!("relocation target {}", target_dir.display()), e))?;
        // The disks' data is the VM's: nobody else may read it. (Through
        // the pinned directory: a link swapped in is not chmodded.)
        std::fs::set_permissions(pinned.path(), std::fs::Permissions::from_mode(0o700))
            .ctx(|| format!("chmod {}", target_dir.display()))?;
        let id =
            TargetId::of(req.source.storage.as_ref(), &pinned, &target_dir).ok_or_else(|| {
                Error::invalid(format!(
                    "relocation target {} has no identity to record",
                    target_dir.display()
                ))
            })?;
        Ok((target_dir, missing, id))
    }

    /// Starts a relocation into a checked `meta.target`: forgets any earlier
    /// relocation of this session (durably, before a target is touched),
    /// empties the targets, then records the new one.
    pub(crate) fn begin(src: Source, mut meta: Meta) -> Result<Arc<Relocation>> {
        let (storage, session_dir) = (src.storage, src.session_dir);
        // Refused before any file is touched; `open` checks again, atomically.
        for d in src.disks {
            d.check_no_staging_reader()?;
        }
        // The directory every later use must find again (`pin_target`).
        let dir = pin_target(storage.as_ref(), &meta)?;
        meta.target_id = TargetId::of(storage.as_ref(), &dir, &meta.target);
        // Recorded for a cancel, which removes only what this relocation
        // made. A file that cannot be looked at counts as there before.
        meta.created = (src.disks.iter())
            .filter(|d| {
                let p = target_file_of(dir.path(), d);
                storage.exists(&p).is_ok_and(|there| !there)
            })
            .map(|d| d.index)
            .collect();
        // Every file there already must be one `Open::EmptyLocked` takes,
        // before any is emptied (or this session's record is dropped): one
        // refused after another was emptied would leave that one's data
        // lost (`--force`) with nothing started. Not one another relocation
        // or session has open (it holds a lock on it while it does): a
        // VM may run from it. (`open` checks again as it empties.)
        for d in src
            .disks
            .iter()
            .filter(|d| !meta.created.contains(&d.index))
        {
            let shown = target_file_of(&meta.target, d);
            match storage.open(&target_file_of(dir.path(), d), Open::ExistingSole) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => {
                    let f = r.ctx(|| format!("open relocation target {}", shown.display()))?;
                    if let Err(e) = f.try_lock(true) {
                        let e = in_use(e, &shown, "lock");
                        return Err(match e.kind() {
                            ErrorKind::Busy => Error::busy(format!(
                                "{e}: nothing was emptied; stop what uses it, or relocate \
                                 elsewhere"
                            )),
                            _ => e,
                        });
                    }
                }
            }
        }
        // Old copied bits must be gone for good before a target is emptied,
        // or a crash could leave them claiming blocks the target lost.
        let meta_path = Self::meta_path(session_dir);
        storage
            .remove_file(&meta_path)
            .ctx(|| format!("remove {}", meta_path.display()))?;
        for d in src.disks {
            let p = Self::copied_path(session_dir, d);
            storage
                .remove_file(&p)
                .ctx(|| format!("remove {}", p.display()))?;
        }
        storage
            .sync_dir(session_dir)
            .ctx(|| format!("fsync directory {}", session_dir.display()))?;
        // The target's vm.json says it is complete: not until this one is.
        storage
            .remove_file(&dir.path().join("vm.json"))
            .ctx(|| format!("remove {}", meta.target.join("vm.json").display()))?;
        // These files are this relocation's from now on (`check_owner`).
        let mark = target::new_owner_mark();
        meta.owner_mark = Some(mark.clone());
        let r = Self::open_in(src, meta, Open::EmptyLocked, &dir, false, &[])?;
        // The new target files' names (and the mark) must be durable before
        // the relocation that relies on them is recorded.
        let recorded = r
            .record_inos()
            .and_then(|()| target::write_owner_mark(r.storage.as_ref(), &dir, &mark))
            .and_then(|()| {
                r.storage
                    .sync_dir(dir.path())
                    .ctx(|| format!("fsync directory {}", r.target_dir.display()))
            })
            .and_then(|()| r.store_meta());
        if let Err(e) = recorded {
            // Not started: no disk may keep tracking its copies (eviction
            // would wait for copied bits, passthrough stay refused).
            for d in src.disks {
                d.untrack_copies();
            }
            return Err(e);
        }
        Ok(r)
    }

    /// Picks up a relocation recorded in `session_dir`, if any: serves from
    /// the target if it had switched, otherwise resumes copying; one whose
    /// target cannot be opened before the cutover is `NotResumed` (logged).
    pub fn resume(src: Source) -> Result<Reopened> {
        let r = Self::reopen_or_hold(src)?;
        match &r {
            Reopened::Live(r) if r.state() != State::Done => {
                tracing::info!(vm = src.vm, target = %r.target_dir.display(), "resuming relocation");
                r.spawn();
            }
            Reopened::NotResumed(h) => {
                tracing::error!(vm = src.vm, target = %h.target.display(),
                    "relocation not resumed, the VM is served from staging: {}; {}", h.error, h.then);
            }
            _ => {}
        }
        Ok(r)
    }

    /// The session's recorded relocation, if any.
    pub(super) fn read_meta(src: &Source) -> Result<Option<Meta>> {
        let p = Self::meta_path(src.session_dir);
        let Some(bytes) = src
            .storage
            .read(&p, MAX_META_BYTES)
            .ctx(|| format!("read {}", p.display()))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", p.display())))
    }

    /// `resume` without starting the copier, and `None` for a relocation
    /// not reopened (see `reopen_or_hold`).
    #[cfg(test)]
    pub(crate) fn reopen(src: Source) -> Result<Option<Arc<Relocation>>> {
        Ok(match Self::reopen_or_hold(src)? {
            Reopened::Live(r) => Some(r),
            Reopened::None | Reopened::NotResumed(_) => None,
        })
    }

    /// `resume` without starting the copier: opens the recorded state and,
    /// if the cutover had committed, switches the disks to their targets.
    pub(crate) fn reopen_or_hold(src: Source) -> Result<Reopened> {
        let Some(meta) = Self::read_meta(&src)? else {
            return Ok(Reopened::None);
        };
        Self::reopen_recorded(src, meta, &[])
    }

    /// `reopen_or_hold` of `meta`, the record just read. `held`: the target
    /// files a failed relocation of this session still has open (see
    /// `retry`), taken over where the path still leads to them.
    pub(super) fn reopen_recorded(
        src: Source,
        meta: Meta,
        held: &[Arc<dyn BlockFile>],
    ) -> Result<Reopened> {
        let switched = meta.switched;
        // Cancelled, its record not removed: held until cancelled again.
        if meta.cancelling && !switched {
            return Ok(Reopened::NotResumed(NotResumed::cancelled(&src, &meta)));
        }
        let target = meta.target.clone();
        let mut unmarked = false;
        let pinned = pin_target(src.storage.as_ref(), &meta).and_then(|dir| {
            // Not cut over: files another relocation took since are not
            // resumed into (after a cutover they are this VM's live disk,
            // which a `--force` never empties: it is locked, and vm.json).
            if !switched {
                let owned = target::check_owner(src.storage.as_ref(), &meta, &dir)?;
                unmarked = owned == target::Owned::Unmarked;
            }
            Ok(dir)
        });
        // Another directory at the target's path, or another relocation's
        // files in it (not one unreachable, nor a file in it refused).
        let replaced = pinned.as_ref().err().is_some_and(is_replaced);
        let recorded = meta.clone();
        let opened = pinned.and_then(|dir| {
            Self::open_in(src, meta, Open::ExistingSole, &dir, unmarked, held).map(|r| (r, dir))
        });
        let (r, dir) = match opened {
            Ok(r) => r,
            // Before the commit staging holds the whole disk, so a target
            // that cannot be opened (primary storage not mounted yet) must
            // not keep the VM from being served. The record stays: `relocate
            // --resume`, or a restarted daemon, tries again.
            Err(e) if !switched => {
                return Ok(Reopened::NotResumed(NotResumed::new(
                    &src, &recorded, e, replaced,
                )))
            }
            // The target is the VM's live disk: not served from anything else.
            Err(e) if replaced => {
                return Err(e.context(format!(
                    "VM {vm} was relocated to {t} and cannot be served: its disks are the \
                     files in the directory the relocation cut over to, complete with vm.json \
                     (a VM runs from them without recoverfs). Put that directory back at {t} \
                     and recover again, or run the VM from it and drop this session with \
                     `recoverfs release {vm} --discard`",
                    vm = src.vm,
                    t = target.display()
                )))
            }
            Err(e) => return Err(e),
        };
        r.adopt_target_id(&dir);
        if unmarked {
            // Copied again from scratch: its files are this relocation's
            // work from here on. Not written: the next reopen copies again.
            let mark = r.meta.lock().owner_mark.clone();
            let marked = mark.map_or(Ok(()), |m| {
                target::write_owner_mark(r.storage.as_ref(), &dir, &m).and_then(|()| {
                    (r.storage.sync_dir(dir.path()))
                        .ctx(|| format!("fsync directory {}", r.target_dir.display()))
                })
            });
            if let Err(e) = marked {
                tracing::warn!(vm = src.vm, "{e}: the next reopen copies every disk again");
            }
        }
        if switched {
            // Every target is open before the first disk switches.
            for (d, t) in r.disks.iter().zip(&r.targets) {
                d.switch_to(t.clone());
            }
            // Reopened by a restart, or by a recover after a release.
            let mut note = "switched before this session was reopened".to_string();
            let placed = r.storage.exists(&dir.path().join("vm.json"));
            if !placed.unwrap_or(false) {
                if let Err(e) = r.place_config() {
                    note = format!("{note}; {e}");
                }
            }
            *r.state.lock() = (State::Done, None, Some(note));
        }
        Ok(Reopened::Live(r))
    }

    /// Opens the target files in `dir`, the pinned `meta.target`. With
    /// `ExistingSole` (a reopen): on a path only root can change, whatever
    /// is there (root put it); elsewhere the very file recorded
    /// (`ExistingIno`), or, in a record without inode numbers, a file
    /// with no other hard link.
    /// `unmarked`: the target directory lacks this relocation's owner mark
    /// (`target::Owned::Unmarked`): every disk is copied again, as for a
    /// target that cannot hold its copied map.
    /// `held` (a reopen by `retry`, in the order of `src.disks`): the files
    /// the failed relocation of this session has open. Where the file
    /// opened now is that very file, the held one is kept instead, with the
    /// lock it has held since it was opened (exclusive first, like every
    /// open here): nobody else can have locked the file since, and a second
    /// lock of this daemon's own would conflict with it.
    pub(super) fn open_in(
        src: Source,
        meta: Meta,
        how: Open,
        dir: &PinnedDir,
        unmarked: bool,
        held: &[Arc<dyn BlockFile>],
    ) -> Result<Arc<Relocation>> {
        let (storage, disks, session_dir) = (src.storage.clone(), src.disks, src.session_dir);
        let root_only = meta.target_id.as_ref().is_some_and(|t| t.root_only)
            && only_root_can_change(&meta.target);
        let mut targets = vec![];
        let mut copied = vec![];
        for (i, d) in disks.iter().enumerate() {
            let shown = target_file_of(&meta.target, d);
            let how = match (how, meta.target_inos.get(&d.index)) {
                (Open::ExistingSole, _) if root_only => Open::Existing,
                (Open::ExistingSole, Some(&ino)) => Open::ExistingIno(ino),
                _ => how,
            };
            let f = storage
                .open(&target_file_of(dir.path(), d), how)
                .map_err(|e| in_use(e, &shown, "open"))?;
            let (f, locked) = match held.get(i) {
                Some(h) if how != Open::EmptyLocked && same_file(h.as_ref(), f.as_ref()) => {
                    (h.clone(), true)
                }
                _ => (f, how == Open::EmptyLocked),
            };
            // Held while this relocation has the file open: another's
            // `--force` never empties it (`begin`). A reopen before the
            // cutover must be the only one with it open (shared alone
            // would let two relocations write it): exclusive first, then
            // down to shared (atomic for OFD locks).
            if !locked && !meta.switched {
                f.try_lock(true).map_err(|e| in_use(e, &shown, "lock"))?;
            }
            if !locked && !f.try_lock(false).map_err(|e| in_use(e, &shown, "lock"))? {
                tracing::warn!(target = %shown.display(), "this filesystem keeps no locks: \
                    another recoverfs relocation is not kept from emptying this file");
            }
            // After the cutover the file is the VM's disk, which a QEMU
            // may run from directly (the README says it can): serving it
            // too would make two writers of it.
            if meta.switched
                && f.image_locked_elsewhere()
                    .ctx(|| format!("check the locks of {}", shown.display()))?
            {
                return Err(Error::busy(format!(
                    "relocated disk {} is in use by another program (it holds QEMU's image \
                     locks: a VM running from it directly?): not served, two writers would \
                     corrupt it; stop that program and recover again, or drop this session \
                     with `recoverfs release {} --discard`",
                    shown.display(),
                    src.vm
                )));
            }
            let len = f.len().ctx(|| format!("stat {}", shown.display()))?;
            if meta.switched && len != d.size {
                // The VM's live disk: never resized into what it is not.
                return Err(Error::corrupt(format!(
                    "relocation target {} is {len} bytes, not the {} of the disk it is (the \
                     VM's live disk since the cutover): not served; put the file the \
                     relocation cut over to back",
                    shown.display(),
                    d.size
                )));
            }
            let map_path = Self::copied_path(session_dir, d);
            let (bs, n) = (d.block_size() as u32, d.nblocks());
            let mut m =
                PersistentBitmap::open(storage.as_ref(), &map_path, MapKind::Copied, bs, n)?;
            if !meta.switched && how != Open::EmptyLocked {
                let why = match unmarked {
                    true => Some(format!("has no {}", target::OWNER_MARK)),
                    false => unbacked_copies(d, f.as_ref(), &m, len)
                        .ctx(|| format!("find the holes of {}", shown.display()))?,
                };
                if let Some(why) = why {
                    tracing::warn!(vm = src.vm, disk = d.index, target = %shown.display(),
                        "relocation target {} {why}: it does not hold what disk{}'s copied \
                         map vouches for (re-created or truncated since?), so every block of \
                         it is copied again", shown.display(), d.index);
                    // Durably, before the copier writes a byte: a crash
                    // before the copier rewrites the map could otherwise
                    // leave its old bits over a target now the right size.
                    m = PersistentBitmap::create(
                        storage.as_ref(),
                        &map_path,
                        MapKind::Copied,
                        bs,
                        n,
                    )?;
                }
            }
            if len != d.size {
                // A sparse file of the disk's size: zero blocks stay holes.
                f.set_len(d.size)
                    .ctx(|| format!("size {}", shown.display()))?;
            }
            targets.push(f);
            copied.push(Arc::new(m));
        }
        #[cfg(test)]
        test_hooks::before_tracking(session_dir);
        for (i, (d, m)) in disks.iter().zip(&copied).enumerate() {
            if let Err(e) = d.track_copies(m.clone()) {
                // A passthrough open came after `begin` checked: no disk
                // may be left tracking a relocation that did not start.
                for d in &disks[..i] {
                    d.untrack_copies();
                }
                return Err(e);
            }
        }
        // The restart rule (see `copy`, "Revoking a copy"), on every open (a
        // fresh map has nothing to forget), only now that the maps are
        // installed: the guest may be writing (`relocate --resume` reopens
        // in a running daemon). A write sets its changed bit, fences, then
        // revokes in the map it finds installed (`Volume::announce_write`);
        // here the map is installed, then the fence, then the changed bits
        // are read: either side sees the other, so no block written before
        // the copier starts stays trusted as copied.
        std::sync::atomic::fence(Ordering::SeqCst);
        for (d, m) in disks.iter().zip(&copied) {
            let forgotten = d.forget_copies_of_changed(m);
            if forgotten > 0 {
                tracing::info!(
                    vm = src.vm,
                    disk = d.index,
                    blocks = forgotten,
                    "copying the blocks the guest changed again"
                );
            }
        }
        let rate = meta.rate_mbps;
        let paused = meta.paused;
        Ok(Arc::new(Relocation {
            vm: src.vm.into(),
            disks: disks.to_vec(),
            storage,
            targets,
            copied,
            target_dir: meta.target.clone(),
            fresh: how == Open::EmptyLocked,
            meta_path: Self::meta_path(session_dir),
            config_json: src.config_json.to_vec(),
            meta: Mutex::new(meta),
            meta_io: Mutex::new(()),
            state: Mutex::new((State::Copying, None, None)),
            rate_limit: Mutex::new(rate),
            initial_rate: rate,
            bytes_copied: AtomicU64::new(0),
            clock: Mutex::new(pause::Clock::default()),
            blocks_marked: AtomicU64::new(0),
            copies_lost: AtomicU64::new(0),
            source_unreachable: AtomicBool::new(false),
            outage_shown: AtomicBool::new(false),
            next_slot: Mutex::new(Instant::now()),
            progress: Mutex::new(Progress {
                at: Instant::now(),
                marked: 0,
                revoked: 0,
                stalled: 0,
            }),
            pause_ms: Mutex::new(None),
            cancel: AtomicBool::new(false),
            cancel_unmarked: AtomicBool::new(false),
            pause: AtomicBool::new(paused),
            wake: parking_lot::Condvar::new(),
            thread: Mutex::new(None),
            #[cfg(test)]
            commit_hook: Mutex::new(None),
        }))
    }

    /// Records the identity of `dir`, the target reopened now (and accepted
    /// by `pin_target`), and of the files opened in it, where the record
    /// differs: one written before identities were kept has none (the
    /// directory reached now without links is the one every later use must
    /// find again), and one with another device number (accepted where
    /// only root can change the path) takes the one found now. If it cannot be
    /// written now (logged), it holds in memory and the next record write
    /// carries it.
    pub(super) fn adopt_target_id(&self, dir: &PinnedDir) {
        let Some(id) = TargetId::of(self.storage.as_ref(), dir, &self.target_dir) else {
            return;
        };
        // A file that cannot be looked at keeps what was recorded.
        let mut inos = self.meta.lock().target_inos.clone();
        for (d, t) in self.disks.iter().zip(&self.targets) {
            if let Ok(Some(ino)) = t.ino() {
                inos.insert(d.index, ino);
            }
        }
        {
            let mut m = self.meta.lock();
            if m.target_id.as_ref() == Some(&id) && m.target_inos == inos {
                return;
            }
            m.target_id = Some(id);
            m.target_inos = inos;
        }
        if let Err(e) = self.store_meta() {
            tracing::warn!(vm = %self.vm, "could not record the relocation target's identity in {}: {e}",
                self.meta_path.display());
        }
    }

    /// Records which files are this relocation's (`Meta::target_inos`),
    /// once they were created or emptied.
    pub(super) fn record_inos(&self) -> Result<()> {
        for (d, t) in self.disks.iter().zip(&self.targets) {
            let shown = target_file_of(&self.target_dir, d);
            if let Some(ino) = t.ino().ctx(|| format!("stat {}", shown.display()))? {
                self.meta.lock().target_inos.insert(d.index, ino);
            }
        }
        Ok(())
    }
}

/// Why the target `f` (`len` bytes) of disk `d` cannot hold what its copied
/// map `m` vouches for, if it cannot: another length than the disk's, or a
/// hole over a whole block the map marks copied that has backup data and
/// was never changed (the copier wrote its nonzero bytes; a block the copy
/// found zero, a backup hole or zeros the guest wrote, is punched). Only
/// whole blocks count: a filesystem that stores zero pages as holes (ZFS
/// with compression) may leave holes inside a copied block's data.
fn unbacked_copies(
    d: &Volume,
    f: &dyn BlockFile,
    m: &PersistentBitmap,
    len: u64,
) -> std::io::Result<Option<String>> {
    if len != d.size {
        return Ok(Some(format!("is {len} bytes, not the disk's {}", d.size)));
    }
    let bs = d.block_size();
    let mut at = 0;
    while let Some(h) = f.next_hole(at)? {
        // The blocks wholly inside the hole; the disk's last, short block
        // ends at the file's end.
        let first = h.start.div_ceil(bs);
        let end = if h.end >= len {
            d.nblocks()
        } else {
            h.end / bs
        };
        if let Some(b) = (first < end)
            .then(|| d.first_copied_backup_data(m, first..end))
            .flatten()
        {
            return Ok(Some(format!(
                "has a hole over block {b} (bytes {}..{}), marked copied",
                b * bs,
                ((b + 1) * bs).min(len)
            )));
        }
        if h.end <= at {
            break;
        }
        at = h.end;
    }
    zeroed_copy(d, f, m)
}

/// `a` and `b` are open descriptions of one file (the same inode, as the
/// cutover compares them; both in the pinned target directory). Unknown
/// (an error, no inode): not the same.
fn same_file(a: &dyn BlockFile, b: &dyn BlockFile) -> bool {
    match (a.ino(), b.ino()) {
        (Ok(Some(x)), Ok(Some(y))) => x == y,
        _ => false,
    }
}

/// How many copied blocks `zeroed_copy` reads per disk.
const ZERO_SAMPLES: u64 = 8;

/// A block the map marks copied, with backup data the guest never changed,
/// that reads all zeros from the target: such a block is never zero (the
/// backup stores zero blocks as holes), so the file was rewritten or rolled
/// back in place (a NAS snapshot; or a filesystem that reports no holes,
/// NFSv3, where `next_hole` sees none). The first such block of each of
/// `ZERO_SAMPLES` equal stretches of the disk is read: a file zeroed in
/// place shows at once; a partly rolled-back one may pass, as with holes.
fn zeroed_copy(
    d: &Volume,
    f: &dyn BlockFile,
    m: &PersistentBitmap,
) -> std::io::Result<Option<String>> {
    let n = d.nblocks();
    let step = n.div_ceil(ZERO_SAMPLES).max(1);
    let mut buf = vec![];
    for start in (0..n).step_by(step as usize) {
        let Some(b) = d.first_copied_backup_data(m, start..(start + step).min(n)) else {
            continue;
        };
        let (off, len) = d.block_range(b);
        buf.resize(len as usize, 0);
        f.read_exact_at(&mut buf, off)?;
        if buf.iter().all(|&x| x == 0) {
            return Ok(Some(format!(
                "reads zeros over block {b} (bytes {off}..{}), marked copied",
                off + len
            )));
        }
    }
    Ok(None)
}

/// An error of `what` ("open", "lock") on the target file `shown`; a lock
/// held elsewhere is `Busy` (409): the file is in use, the request is fine.
fn in_use(e: std::io::Error, shown: &Path, what: &str) -> Error {
    if e.kind() == std::io::ErrorKind::WouldBlock {
        return Error::busy(format!(
            "relocation target {} is in use by another recoverfs relocation or session \
             (a VM may run from it)",
            shown.display()
        ));
    }
    Error::io(format!("{what} relocation target {}", shown.display()), e)
}

/// Refuses a target `dir` (canonical, maybe not there yet) inside any
/// recoverfs staging directory (its `staging.json` in `dir` or a directory
/// above it: another daemon's too, not only this one's) or any recoverfs
/// FUSE mount (`/proc/self/mountinfo`, see `util::mountinfo`): the copy would
/// land in what recoverfs itself serves or evicts.
fn refuse_recoverfs_dirs(dir: &Path) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::invalid(format!(
            "relocation target {} is inside {what}: choose a directory on primary storage",
            dir.display()
        )))
    };
    for up in dir.ancestors() {
        if up.join(crate::staging::STAGING_MARKER).is_file() {
            return refuse(format!("the recoverfs staging directory {}", up.display()));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .ctx(|| "read /proc/self/mountinfo".to_string())?;
    if let Some(m) = recoverfs_mount_over(&mountinfo::parse(&mountinfo), dir) {
        return refuse(format!("the recoverfs mount {}", m.display()));
    }
    Ok(())
}

/// Logs that the target's locks (which keep two relocations from one
/// target file) do not reach other hosts: NFS mounted `nolock`.
fn warn_if_locks_stay_local(dir: &Path) {
    let mounts = mountinfo::current();
    if let Some(m) = mountinfo::holding(&mounts, dir).filter(|m| m.locks_stay_local()) {
        tracing::warn!(target = %dir.display(), mount = %m.point.display(), "the target is on NFS mounted without network locks (nolock): a relocation from another host to the same files is not kept out; mount it with locks, or make sure no other host relocates there");
    }
}

/// The recoverfs FUSE mount at `dir` or above it among `mounts`, if any.
pub(super) fn recoverfs_mount_over(mounts: &[Mount], dir: &Path) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|m| m.is_recoverfs() && dir.starts_with(&m.point))
        .map(|m| m.point.clone())
}
