use super::*;

fn repo() -> (tempfile::TempDir, Arc<Repository>) {
    let d = tempfile::tempdir().unwrap();
    let (r, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
    (d, r)
}

#[test]
fn a_collector_waits_for_a_writer_and_gives_up_naming_it() {
    let (_d, r) = repo();
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let e = GcLock::acquire(&r, Duration::from_millis(300))
        .err()
        .unwrap();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
    assert!(e.to_string().contains("backup of vm1 by pid"), "{e}");
    assert!(
        holders(&r, LockKind::Gc, None).unwrap().is_empty(),
        "a collector that gave up leaves no lock"
    );
    drop(w);
    let g = GcLock::acquire(&r, Duration::ZERO).unwrap();
    // A writer now waits until the collector is done.
    let r2 = r.clone();
    let t0 = Instant::now();
    let t = std::thread::spawn(move || WriterLock::acquire(&r2, "vm2").map(|_| t0.elapsed()));
    std::thread::sleep(Duration::from_millis(800));
    drop(g);
    let waited = t.join().unwrap().unwrap();
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    assert!(r.backend().list_all(DIR).unwrap().is_empty());
}

#[test]
fn a_waiting_collector_holds_new_writers_back_so_backups_cannot_starve_it() {
    let (_d, r) = repo();
    let w1 = WriterLock::acquire(&r, "vm1").unwrap();
    let (r1, r2) = (r.clone(), r.clone());
    let gc = std::thread::spawn(move || {
        let g = GcLock::acquire(&r1, Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        drop(g);
        Instant::now()
    });
    while holders(&r, LockKind::Gc, None).unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let w2 = std::thread::spawn(move || {
        let w = WriterLock::acquire(&r2, "vm2").unwrap();
        (Instant::now(), w)
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!w2.is_finished(), "a new writer waits behind the collector");
    drop(w1);
    let gc_done = gc.join().unwrap();
    let (w2_start, _w2) = w2.join().unwrap();
    assert!(
        w2_start >= gc_done,
        "the new writer went after the collector"
    );
}

#[test]
fn a_lock_not_refreshed_for_the_stale_time_is_ignored() {
    let (d, r) = repo();
    // A writer killed -9 left its lock behind.
    let key = format!("{DIR}/backup-dead.json");
    r.backend().put(&key, b"{}").unwrap();
    assert_eq!(holders(&r, LockKind::Backup, None).unwrap().len(), 1);
    let path = d.path().join("r").join(&key);
    let old = std::time::SystemTime::now() - STALE - Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert!(holders(&r, LockKind::Backup, None).unwrap().is_empty());
    GcLock::acquire(&r, Duration::ZERO).unwrap();
}

/// review23 M1: a host whose clock runs ahead of the store's by more
/// than the stale time must still see a collector's fresh lock.
#[test]
fn lock_ages_are_read_on_the_stores_clock_so_a_host_clock_ahead_of_it_sees_a_fresh_lock_as_fresh() {
    let (d, r) = repo();
    let stamp = |key: &str, ago: Duration| {
        std::fs::File::options()
            .write(true)
            .open(d.path().join("r").join(key))
            .unwrap()
            .set_modified(std::time::SystemTime::now() - ago)
            .unwrap();
    };
    let doc = |kind: LockKind| {
        serde_json::to_vec(&LockDoc {
            kind,
            host: "another-host".into(),
            pid: 1,
            what: "x".into(),
            started: "2026-01-01T00:00:00Z".into(),
            boot_id: None,
            pid_ns: None,
            start_time: None,
        })
        .unwrap()
    };
    // The store's clock is 1,000 s behind this host's: a collector put
    // its lock 10 s before this writer put its own.
    let (gc, own) = (
        format!("{DIR}/gc-other.json"),
        format!("{DIR}/backup-own.json"),
    );
    r.backend().put(&gc, &doc(LockKind::Gc)).unwrap();
    r.backend().put(&own, &doc(LockKind::Backup)).unwrap();
    stamp(&gc, Duration::from_secs(1010));
    stamp(&own, Duration::from_secs(1000));
    let seen = holders(&r, LockKind::Gc, Some(&own)).unwrap();
    assert_eq!(seen.len(), 1, "a live collector's lock was taken for dead");
    assert_eq!(seen[0].age_secs, 10);
    // 700 s older than the writer's own on the store's clock: stale.
    stamp(&gc, Duration::from_secs(1700));
    assert!(holders(&r, LockKind::Gc, Some(&own)).unwrap().is_empty());
}

#[test]
fn a_writer_whose_lock_was_not_refreshed_for_half_the_stale_time_publishes_nothing() {
    let (_d, r) = repo();
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    w.check_fresh().unwrap();
    // As if the process had been stopped for six minutes.
    w.0.fresh.lock().last_ok = BootInstant::now().checked_sub(STALE / 2 + REFRESH).unwrap();
    let e = super::super::writer::publish_manifest(&r, &w, "vm1", serde_json::json!({}), vec![])
        .unwrap_err();
    assert!(e.to_string().contains("was not refreshed"), "{e}");
    assert!(r.backup_ids("vm1").unwrap().is_empty());
    // Seen here first, the lapse is remembered all the same.
    w.0.fresh.lock().last_ok = BootInstant::now();
    assert!(w.check_fresh().is_err());
}

#[test]
fn a_writer_whose_lock_lapsed_publishes_nothing_even_after_a_later_refresh() {
    let (_d, r) = repo();
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    // Stopped for six minutes: a collector elsewhere may have taken the
    // lock for dead and swept chunks this writer already counted on.
    w.0.fresh.lock().last_ok = BootInstant::now().checked_sub(STALE / 2 + REFRESH).unwrap();
    // The process resumes and its refresh thread rewrites the lock.
    let body = r.backend().get(&w.0.key, 4096).unwrap().unwrap();
    refresh_once(&r, &w.0.key, &body, &w.0.gate, &w.0.fresh);
    let e = super::super::writer::publish_manifest(&r, &w, "vm1", serde_json::json!({}), vec![])
        .unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
    assert!(r.backup_ids("vm1").unwrap().is_empty());
    // And stays distrusted: a lapse is never forgiven.
    refresh_once(&r, &w.0.key, &body, &w.0.gate, &w.0.fresh);
    assert!(w.check_fresh().is_err());
}

/// Puts a lock object as a process with `doc` would have.
fn plant(r: &Repository, doc: &LockDoc) -> String {
    let key = format!("{DIR}/{}planted.json", doc.kind.prefix());
    r.backend()
        .put(&key, &serde_json::to_vec(doc).unwrap())
        .unwrap();
    key
}

/// A lock as this host's process `pid` writes it.
fn local_doc(kind: LockKind, pid: u32) -> LockDoc {
    LockDoc {
        kind,
        host: me().host.clone(),
        pid,
        what: "vm".into(),
        started: "2026-11-23T21:00:00Z".into(),
        boot_id: me().boot_id.clone(),
        pid_ns: me().pid_ns.clone(),
        start_time: start_time(pid),
    }
}

/// The pid of a process that has exited (and been reaped).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn a_lock_of_a_dead_process_on_this_host_is_removed_at_once_and_delays_neither_gc_nor_backup() {
    let (_d, r) = repo();
    let pid = dead_pid();
    // `backup` killed (SIGKILL) while it read its source.
    let key = plant(&r, &local_doc(LockKind::Backup, pid));
    GcLock::acquire(&r, Duration::ZERO).expect("not delayed by a dead writer");
    assert!(
        !r.backend().exists(&key).unwrap(),
        "the stale lock is removed"
    );
    // `gc` killed while it waited for writers.
    let key = plant(&r, &local_doc(LockKind::Gc, pid));
    let r2 = r.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || tx.send(WriterLock::acquire(&r2, "vm").is_ok()));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(true),
        "a backup waits for a dead collector"
    );
    assert!(!r.backend().exists(&key).unwrap());
}

#[test]
fn a_lock_whose_pid_now_runs_another_program_is_stale() {
    let (_d, r) = repo();
    let mut doc = local_doc(LockKind::Backup, std::process::id());
    let now = doc.start_time.expect("this process's start time");
    assert!(dead_local_holder(&doc).is_none(), "a live holder is live");
    doc.start_time = Some(now + 1);
    let key = plant(&r, &doc);
    assert!(holders(&r, LockKind::Backup, None).unwrap().is_empty());
    assert!(!r.backend().exists(&key).unwrap());
}

#[test]
fn a_dead_pid_on_another_host_boot_or_pid_namespace_or_in_an_older_lock_waits_for_the_stale_time() {
    let (_d, r) = repo();
    let pid = dead_pid();
    let others = [
        LockDoc {
            host: "elsewhere".into(),
            ..local_doc(LockKind::Backup, pid)
        },
        LockDoc {
            boot_id: Some("another-boot".into()),
            ..local_doc(LockKind::Backup, pid)
        },
        LockDoc {
            pid_ns: Some("pid:[1]".into()),
            ..local_doc(LockKind::Backup, pid)
        },
        LockDoc {
            boot_id: None,
            pid_ns: None,
            start_time: None,
            ..local_doc(LockKind::Backup, pid)
        },
    ];
    for doc in others {
        let key = plant(&r, &doc);
        assert_eq!(
            holders(&r, LockKind::Backup, None).unwrap().len(),
            1,
            "{doc:?}"
        );
        r.backend().delete(&key).unwrap();
    }
}

#[test]
fn released_locks_are_removed_and_nothing_is_published_or_refreshed_under_them_after() {
    let (_d, r) = repo();
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let body = r.backend().get(&w.0.key, 4096).unwrap().unwrap();
    let mine = |x: &Arc<Repository>| Arc::ptr_eq(x, &r);
    assert_eq!(release_matching(Duration::from_secs(1), mine), 1);
    assert!(r.backend().list_all(DIR).unwrap().is_empty());
    refresh_once(&r, &w.0.key, &body, &w.0.gate, &w.0.fresh);
    assert!(
        r.backend().list_all(DIR).unwrap().is_empty(),
        "a refresh put it back"
    );
    let e = super::super::writer::publish_manifest(&r, &w, "vm1", serde_json::json!({}), vec![])
        .unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Interrupted, "{e}");
    assert!(r.backup_ids("vm1").unwrap().is_empty());
    drop(w);
    assert_eq!(release_matching(Duration::from_secs(1), mine), 0);
}

#[test]
fn reusing_a_forgotten_backups_chunks_is_refused() {
    let (_d, r) = repo();
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let e = w.require_manifest("vm1", "20260101-000000").unwrap_err();
    assert!(e.to_string().contains("no longer in the repository"), "{e}");
}

#[test]
fn a_writer_waiting_for_a_collector_gives_up_when_told_to_stop() {
    let (_d, r) = repo();
    let g = GcLock::acquire(&r, Duration::ZERO).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (r2, stop2) = (r.clone(), stop.clone());
    let t = std::thread::spawn(move || {
        let check = || match stop2.load(std::sync::atomic::Ordering::Acquire) {
            true => Err(Error::interrupted("stopped".to_string())),
            false => Ok(()),
        };
        WriterLock::acquire_until(&r2, "vm2", &check).map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(700));
    assert!(!t.is_finished(), "it waits while the collector holds");
    let t0 = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Release);
    while !t.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still waiting after the stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = t.join().unwrap().unwrap_err();
    assert_eq!(e.to_string(), "stopped");
    drop(g);
    assert!(
        r.backend().list_all(DIR).unwrap().is_empty(),
        "no writer lock left"
    );
}

/// A store that stops answering: while `hang` is set, every request for
/// a key starting with one of `parts` waits `for_` and then fails as a
/// remote store's request does at its deadline. Everything else is the
/// local directory's.
pub(crate) struct Hanging {
    inner: super::super::backend::LocalDir,
    pub hang: Arc<std::sync::atomic::AtomicBool>,
    parts: Vec<String>,
    for_: Duration,
    /// The store starts hanging at the first request for a key starting
    /// with this.
    from: Option<String>,
}

impl Hanging {
    /// A repository at `path` (created) whose store hangs for `for_` on
    /// keys starting with `parts` once the returned flag is set.
    pub(crate) fn repo(
        path: &std::path::Path,
        parts: &[&str],
        for_: Duration,
    ) -> (Arc<Repository>, Arc<std::sync::atomic::AtomicBool>) {
        Hanging::repo_from(path, parts, for_, None)
    }

    /// [`Hanging::repo`] whose store starts hanging by itself at the
    /// first request for a key starting with `from`.
    pub(crate) fn repo_from(
        path: &std::path::Path,
        parts: &[&str],
        for_: Duration,
        from: Option<&str>,
    ) -> (Arc<Repository>, Arc<std::sync::atomic::AtomicBool>) {
        Repository::open_or_create(path.to_str().unwrap()).unwrap();
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let b = Hanging {
            inner: super::super::backend::LocalDir::new(path),
            hang: hang.clone(),
            parts: parts.iter().map(|p| p.to_string()).collect(),
            for_,
            from: from.map(str::to_string),
        };
        (Repository::open_backend(Box::new(b)).unwrap(), hang)
    }

    fn before(&self, key: &str) -> Result<()> {
        if self.from.as_deref().is_some_and(|f| key.starts_with(f)) {
            self.hang.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let hung = self.hang.load(std::sync::atomic::Ordering::SeqCst)
            && self.parts.iter().any(|p| key.starts_with(p.as_str()));
        if !hung {
            return Ok(());
        }
        std::thread::sleep(self.for_);
        Err(Error::unanswered(format!(
            "test store: {key}: no answer in {} ms",
            self.for_.as_millis()
        )))
    }
}

impl super::super::backend::Backend for Hanging {
    fn answering(&self) -> bool {
        !self.hang.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.before(key)?;
        self.inner.get(key, limit)
    }
    fn get_async(&self, key: &str, limit: u64) -> super::super::backend::GetFuture {
        let r = self.before(key);
        let read = self.inner.get_async(key, limit);
        Box::pin(async move {
            r?;
            read.await
        })
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.before(key)?;
        self.inner.put(key, data)
    }
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.before(key)?;
        self.inner.put_new(key, data)
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.before(key)?;
        self.inner.exists(key)
    }
    fn size(&self, key: &str) -> Result<Option<u64>> {
        self.before(key)?;
        self.inner.size(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.before(prefix)?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.before(key)?;
        self.inner.delete(key)
    }
    fn list_all(&self, prefix: &str) -> Result<Vec<super::super::backend::ObjectInfo>> {
        self.before(prefix)?;
        self.inner.list_all(prefix)
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

/// A lock whose object has not been rewritten since `ago` (its file's
/// time, as a store stamps it).
fn age(d: &tempfile::TempDir, key: &str, ago: Duration) {
    std::fs::File::options()
        .write(true)
        .open(d.path().join("r").join(key))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - ago)
        .unwrap();
}

/// explore9 M4: a failed backup against a store that hangs took three
/// request deadlines to end: its own, then the join of the lock's refresh
/// thread (in its own request), then the lock's removal. Now the lock is
/// left behind within a bound, and goes stale later.
#[test]
fn a_lock_dropped_while_its_refresh_hangs_is_left_behind_at_once_and_goes_stale_later() {
    let d = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(3);
    let (r, hang) = Hanging::repo(&d.path().join("r"), &["locks/"], deadline);
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let key = w.0.key.clone();
    let body = r.backend().get(&key, 4096).unwrap().unwrap();
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    // The refresh thread's rewrite, in flight when the backup fails.
    let refresh = {
        let (r, key, gate, fresh) = (r.clone(), key.clone(), w.0.gate.clone(), w.0.fresh.clone());
        std::thread::spawn(move || refresh_once(&r, &key, &body, &gate, &fresh))
    };
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    drop(w);
    let took = t.elapsed();
    assert!(took < deadline / 2, "dropping the lock took {took:?}");
    refresh.join().unwrap();
    // The release goes on behind the drop once the refresh ends (in a
    // process that lives on): its removal, asked while the store still
    // hangs, gets no answer either, and the lock stays behind.
    std::thread::sleep(Duration::from_secs(1));
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(deadline);
    assert!(r.backend().exists(&key).unwrap(), "left behind");
    age(&d, &key, STALE + Duration::from_secs(5));
    assert!(holders(&r, LockKind::Backup, None).unwrap().is_empty());
    GcLock::acquire(&r, Duration::ZERO).unwrap();
}

/// review29 H1: a store that says it answers (a local repository on a
/// share, which has no deadline) and then hangs its removal: the drop
/// waited for good. Now it is bounded by PATIENT_WAIT, the lock left
/// behind, and removed once the store answers (in a process that lives on).
#[test]
fn a_drop_on_a_store_that_hangs_while_it_says_it_answers_is_bounded() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r");
    Repository::open_or_create(path.to_str().unwrap()).unwrap();
    let knobs = crate::repo::testing::Knobs::default();
    let b = crate::repo::testing::TestBackend::new(&path, knobs.clone());
    let r = Repository::open_backend(Box::new(b)).unwrap();
    assert!(r.backend().answering());
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let key = w.0.key.clone();
    knobs.before_first(&key, || std::thread::sleep(PATIENT_WAIT * 2));
    let t = Instant::now();
    drop(w);
    let took = t.elapsed();
    assert!(
        took < PATIENT_WAIT + Duration::from_secs(1),
        "dropping the lock took {took:?}"
    );
    assert!(r.backend().exists(&key).unwrap(), "left behind at the drop");
    let until = Instant::now() + PATIENT_WAIT * 2;
    while r.backend().exists(&key).unwrap() {
        assert!(Instant::now() < until, "the removal never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// review28 M1: a lock dropped while the store fails is released on a
/// thread of its own, which carries on past the drop's short wait: once
/// the refresh in flight ends and the store answers, the lock is removed
/// (a daemon no longer leaves it looking held until it goes stale).
#[test]
fn a_release_left_to_its_own_thread_removes_the_lock_once_the_store_answers() {
    let d = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(2);
    let (r, hang) = Hanging::repo(&d.path().join("r"), &["locks/"], deadline);
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let key = w.0.key.clone();
    let body = r.backend().get(&key, 4096).unwrap().unwrap();
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let refresh = {
        let (r, key, gate, fresh) = (r.clone(), key.clone(), w.0.gate.clone(), w.0.fresh.clone());
        std::thread::spawn(move || refresh_once(&r, &key, &body, &gate, &fresh))
    };
    std::thread::sleep(Duration::from_millis(100));
    drop(w);
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    refresh.join().unwrap();
    let until = Instant::now() + deadline * 2;
    while r.backend().exists(&key).unwrap() {
        assert!(Instant::now() < until, "the lock was never removed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lock_whose_removal_hangs_is_left_behind_within_a_bound_and_goes_stale_later() {
    let d = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(3);
    let (r, hang) = Hanging::repo(&d.path().join("r"), &["locks/"], deadline);
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let key = w.0.key.clone();
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let t = Instant::now();
    drop(w);
    let took = t.elapsed();
    assert!(took < deadline / 2, "dropping the lock took {took:?}");
    // The removal still under way ends on its own, unanswered.
    std::thread::sleep(deadline);
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(r.backend().exists(&key).unwrap(), "left behind");
    assert_eq!(holders(&r, LockKind::Backup, None).unwrap().len(), 1);
    age(&d, &key, STALE + Duration::from_secs(5));
    assert!(holders(&r, LockKind::Backup, None).unwrap().is_empty());
    // A store that answers still has the lock removed at once.
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let key = w.0.key.clone();
    drop(w);
    assert!(!r.backend().exists(&key).unwrap());
}

/// review28 M1: a store that answers a lock's removal, only slower than
/// the short wait a failing store gets. The drop returned first and left
/// the removal to a thread that a CLI process's exit kills: the lock
/// stayed for STALE on other hosts. Now the drop waits for the answer.
#[test]
fn a_slow_but_answering_store_has_the_lock_removed_before_the_drop_returns() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r");
    Repository::open_or_create(path.to_str().unwrap()).unwrap();
    let knobs = crate::repo::testing::Knobs::default();
    let b = crate::repo::testing::TestBackend::new(&path, knobs.clone());
    let r = Repository::open_backend(Box::new(b)).unwrap();
    let w = WriterLock::acquire(&r, "vm1").unwrap();
    let key = w.0.key.clone();
    knobs.before_first(&key, || std::thread::sleep(RELEASE_WAIT * 3));
    drop(w);
    assert!(
        !r.backend().exists(&key).unwrap(),
        "the lock outlived its drop"
    );
}

/// fixstart: `release_all` removed locks one after another, each DELETE
/// with the store's full request deadline: with a store that does not
/// answer and N locks, a stop took N deadlines. Now the whole release is
/// bounded by its `wait` and [`RELEASE_WAIT`], and the locks not removed
/// are left behind, to go stale later.
#[test]
fn releasing_several_locks_on_a_store_that_does_not_answer_ends_within_one_bound() {
    let d = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(4);
    let (r, hang) = Hanging::repo(&d.path().join("r"), &["locks/"], deadline);
    let locks: Vec<_> = (0..4)
        .map(|i| WriterLock::acquire(&r, &format!("vm{i}")).unwrap())
        .collect();
    let keys: Vec<String> = locks.iter().map(|w| w.0.key.clone()).collect();
    let mine = |x: &Arc<Repository>| Arc::ptr_eq(x, &r);
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let wait = Duration::from_millis(200);
    let t = Instant::now();
    assert_eq!(release_matching(wait, mine), 0);
    let took = t.elapsed();
    assert!(
        took < wait + RELEASE_WAIT + Duration::from_millis(500),
        "releasing 4 locks took {took:?} (one after another: 4 × {deadline:?})"
    );
    // Nothing runs under them any more, removed or not.
    for w in &locks {
        assert!(w.check_fresh().is_err());
    }
    // The removals still under way end on their own, unanswered.
    std::thread::sleep(deadline + Duration::from_millis(200));
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    drop(locks);
    for key in &keys {
        assert!(r.backend().exists(key).unwrap(), "{key} left behind");
    }
    assert_eq!(holders(&r, LockKind::Backup, None).unwrap().len(), 4);
    for key in &keys {
        age(&d, key, STALE + Duration::from_secs(5));
    }
    assert!(holders(&r, LockKind::Backup, None).unwrap().is_empty());
    // A store that answers has them all removed, at once, but for one
    // whose step (a manifest's publication) outlasts `wait`: left.
    let locks: Vec<_> = (0..4)
        .map(|i| WriterLock::acquire(&r, &format!("vm{i}")).unwrap())
        .collect();
    let publishing = locks[0].hold().unwrap();
    let t = Instant::now();
    assert_eq!(release_matching(wait, mine), 3);
    assert!(t.elapsed() < wait + RELEASE_WAIT, "{:?}", t.elapsed());
    assert_eq!(holders(&r, LockKind::Backup, None).unwrap().len(), 1);
    drop(publishing);
    drop(locks);
    assert!(holders(&r, LockKind::Backup, None).unwrap().is_empty());
}
