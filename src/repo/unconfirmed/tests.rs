use std::sync::atomic::AtomicU64;

use super::*;
use crate::repo::LocalDir;

fn repo_info(id: &str, version: u32) -> RepoInfo {
    RepoInfo {
        format: super::super::REPO_FORMAT.into(),
        version,
        id: id.into(),
        created: "2026-11-24T00:00:00Z".into(),
        encryption: None,
    }
}

fn info(id: &str) -> Vec<u8> {
    serde_json::to_vec(&repo_info(id, 2)).unwrap()
}

/// `status` says why, daemon-wide, until the store answers as itself
/// (explore11 M3: only a session's periodic check said it).
#[test]
fn why_the_store_is_not_confirmed_is_told_until_it_answers_as_itself() {
    let d = tempfile::tempdir().unwrap();
    let g = Unconfirmed::new(Box::new(LocalDir::new(d.path())), &repo_info("aaaa", 2));
    let why = g
        .not_confirmed()
        .expect("not confirmed at a degraded start");
    assert!(
        why.contains("did not answer when the daemon started"),
        "{why}"
    );
    g.gate.state.lock().failed = None;
    std::fs::write(d.path().join(INFO_KEY), info("aaaa")).unwrap();
    g.exists("x").unwrap();
    assert_eq!(g.not_confirmed(), None);
}

/// A gate whose start failure has passed.
fn gate_on(dir: &std::path::Path) -> Unconfirmed {
    let g = Unconfirmed::new(Box::new(LocalDir::new(dir)), &repo_info("aaaa", 2));
    g.gate.state.lock().failed = None;
    g
}

#[test]
fn nothing_is_written_to_a_store_until_it_answers_as_the_repository() {
    let d = tempfile::tempdir().unwrap();
    let g = gate_on(d.path());
    let e = g.put("pins/vm/x.json", b"{}").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("no repo.json"), "{e}");
    assert!(
        !d.path().join("pins").exists(),
        "a write reached an empty store"
    );
    // Another repository there is refused as well.
    std::fs::write(d.path().join("repo.json"), info("bbbb")).unwrap();
    std::thread::sleep(FAILED_CHECK_HOLDS);
    let e = g.put("pins/vm/x.json", b"{}").unwrap_err();
    assert!(e.to_string().contains("another repository"), "{e}");
    assert!(!d.path().join("pins").exists());
    // The repository itself: writes pass, and stay passing.
    std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
    std::thread::sleep(FAILED_CHECK_HOLDS);
    g.put("pins/vm/x.json", b"{}").unwrap();
    assert!(g.confirmed());
    std::fs::remove_file(d.path().join("repo.json")).unwrap();
    g.put("pins/vm/y.json", b"{}").unwrap();
}

#[test]
fn a_gate_made_because_the_store_did_not_answer_the_start_does_not_ask_it_again_at_once() {
    let d = tempfile::tempdir().unwrap();
    // The store answers as the repository now: not asked all the same.
    std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
    let g = Unconfirmed::new(Box::new(LocalDir::new(d.path())), &repo_info("aaaa", 2));
    let e = g.exists("backups/vm/b.json").unwrap_err();
    assert!(
        e.to_string()
            .contains("did not answer when the daemon started"),
        "{e}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert!(rt.block_on(g.get_async("chunks/ab/abcd", 1 << 20)).is_err());
    assert!(!g.confirmed());
    assert!(g.gate.state.lock().failed.as_ref().unwrap().holds >= START_HOLDS);
}

#[test]
fn a_store_back_right_after_the_start_is_asked_once_the_start_is_over() {
    let d = tempfile::tempdir().unwrap();
    let g = Unconfirmed::new(Box::new(LocalDir::new(d.path())), &repo_info("aaaa", 2));
    // Back within a second of the start: still held while it lasts.
    std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
    std::fs::write(d.path().join("b.json"), b"{}").unwrap();
    assert!(g.exists("b.json").is_err());
    g.end_of_start();
    assert!(g.exists("b.json").unwrap());
    assert!(g.confirmed());
}

#[test]
fn the_end_of_the_start_does_not_lift_a_hold_of_a_later_failed_check() {
    let d = tempfile::tempdir().unwrap();
    let g = gate_on(d.path());
    // A failed check that took long: its hold is not waited out.
    let check = Checking(g.gate.clone(), false);
    assert!(check.judge(Ok(None), Duration::from_secs(5)).is_err());
    std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
    g.end_of_start();
    let e = g.exists("b.json").unwrap_err();
    assert!(e.to_string().contains("no repo.json"), "{e}");
}

#[test]
fn a_failed_check_holds_as_long_as_it_took() {
    let d = tempfile::tempdir().unwrap();
    let g = gate_on(d.path());
    let judge = |g: &Unconfirmed, got, took| Checking(g.gate.clone(), false).judge(got, took);
    assert!(judge(&g, Ok(None), Duration::from_secs(8)).is_err());
    assert_eq!(
        g.gate.state.lock().failed.as_ref().unwrap().holds,
        Duration::from_secs(8)
    );
    assert!(judge(&g, Ok(None), Duration::ZERO).is_err());
    assert_eq!(
        g.gate.state.lock().failed.as_ref().unwrap().holds,
        FAILED_CHECK_HOLDS
    );
}

#[test]
fn once_the_daemon_stops_an_unconfirmed_store_is_asked_nothing() {
    let d = tempfile::tempdir().unwrap();
    let g = gate_on(d.path());
    std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
    g.begin_shutdown();
    let e = g.put("pins/vm/x.json", b"{}").unwrap_err();
    assert!(
        e.to_string().contains("not asked while the daemon stops"),
        "{e}"
    );
    assert!(!d.path().join("pins").exists());
    assert!(!g.confirmed());
    // A confirmed one is asked as before.
    let d2 = tempfile::tempdir().unwrap();
    std::fs::write(d2.path().join("repo.json"), info("aaaa")).unwrap();
    let g2 = gate_on(d2.path());
    g2.put("pins/vm/x.json", b"{}").unwrap();
    g2.begin_shutdown();
    g2.put("pins/vm/y.json", b"{}").unwrap();
}

/// A check that failed at once (no repo.json) holds a second: a request
/// in it waits for its end and takes the outcome of the one check then
/// made, whether the store is back or not.
#[test]
fn a_request_within_a_second_of_a_failed_check_takes_the_next_check() {
    let d = tempfile::tempdir().unwrap();
    let g = gate_on(d.path());
    assert!(g.get("backups/vm/b.json", 1 << 20).is_err());
    let t = Instant::now();
    let e = g.exists("backups/vm/b.json").unwrap_err();
    assert!(e.to_string().contains("no repo.json"), "{e}");
    assert!(t.elapsed() < WAITS_FOR_A_HOLD * 2, "{:?}", t.elapsed());
    std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
    assert!(!g.exists("backups/vm/b.json").unwrap());
}

#[test]
fn an_async_get_checks_the_identity_without_blocking_and_then_reads() {
    let d = tempfile::tempdir().unwrap();
    let g = gate_on(d.path());
    std::fs::create_dir_all(d.path().join("chunks/ab")).unwrap();
    std::fs::write(d.path().join("chunks/ab/abcd"), b"bytes").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(g.get_async("chunks/ab/abcd", 1 << 20))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    std::fs::write(d.path().join("repo.json"), info("aaaa")).unwrap();
    std::thread::sleep(FAILED_CHECK_HOLDS);
    let got = rt.block_on(g.get_async("chunks/ab/abcd", 1 << 20)).unwrap();
    assert_eq!(&got.unwrap()[..], b"bytes");
    assert!(g.confirmed());
}

#[test]
fn a_store_whose_repo_json_this_binary_would_refuse_to_open_is_not_taken_for_the_repository() {
    let d = tempfile::tempdir().unwrap();
    let g = gate_on(d.path());
    // The same id, a version from a newer recoverfs.
    let newer = serde_json::to_vec(&repo_info("aaaa", 99)).unwrap();
    std::fs::write(d.path().join("repo.json"), newer).unwrap();
    let e = g.put("pins/vm/x.json", b"{}").unwrap_err();
    assert!(
        e.to_string().contains("unsupported repository version 99"),
        "{e}"
    );
    assert!(!g.confirmed());
    assert!(!d.path().join("pins").exists());
}

/// A store down (each GET of `repo.json` fails, after `slow`) until `up`,
/// then the repository "aaaa"; every other key reads `bytes`.
#[derive(Default)]
struct Store {
    up: AtomicBool,
    slow_ms: AtomicU64,
    info_gets: AtomicU64,
}

#[derive(Clone, Default)]
struct Fake(Arc<Store>);

impl Fake {
    fn gate(&self) -> Unconfirmed {
        let g = Unconfirmed::new(Box::new(self.clone()), &repo_info("aaaa", 2));
        g.end_of_start();
        g
    }
    fn slow(&self) -> Duration {
        Duration::from_millis(self.0.slow_ms.load(Ordering::SeqCst))
    }
    fn info(&self) -> Result<Option<Vec<u8>>> {
        self.0.info_gets.fetch_add(1, Ordering::SeqCst);
        match self.0.up.load(Ordering::SeqCst) {
            true => Ok(Some(info("aaaa"))),
            false => Err(Error::new(ErrorKind::Io, "connection refused")),
        }
    }
    fn gets(&self) -> u64 {
        self.0.info_gets.load(Ordering::SeqCst)
    }
    fn set_up(&self, up: bool) {
        self.0.up.store(up, Ordering::SeqCst);
    }
}

impl Backend for Fake {
    fn get(&self, key: &str, _limit: u64) -> Result<Option<Vec<u8>>> {
        if key != INFO_KEY {
            return Ok(Some(b"bytes".to_vec()));
        }
        std::thread::sleep(self.slow());
        self.info()
    }
    fn get_async(&self, key: &str, _limit: u64) -> GetFuture {
        let (me, key) = (self.clone(), key.to_string());
        Box::pin(async move {
            if key != INFO_KEY {
                return Ok(Some(b"bytes".to_vec().into()));
            }
            tokio::time::sleep(me.slow()).await;
            me.info().map(|o| o.map(Into::into))
        })
    }
    fn put(&self, _key: &str, _data: &[u8]) -> Result<()> {
        Ok(())
    }
    fn put_new(&self, _key: &str, _data: &[u8]) -> Result<bool> {
        Ok(true)
    }
    fn exists(&self, _key: &str) -> Result<bool> {
        Ok(true)
    }
    fn size(&self, _key: &str) -> Result<Option<u64>> {
        Ok(Some(5))
    }
    fn list(&self, _prefix: &str) -> Result<Vec<String>> {
        Ok(vec![])
    }
    fn delete(&self, _key: &str) -> Result<()> {
        Ok(())
    }
    fn list_all(&self, _prefix: &str) -> Result<Vec<ObjectInfo>> {
        Ok(vec![])
    }
    fn location(&self) -> String {
        "fake".into()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// explore11: the store comes back within the hold of a failed check;
/// the first request after it (a guest's read) is answered, not failed.
#[test]
fn the_first_request_after_the_store_is_back_succeeds() {
    let rt = runtime();
    let store = Fake::default();
    let g = store.gate();
    assert!(g.exists("b.json").is_err(), "down: a failed check");
    store.set_up(true);
    let t = Instant::now();
    let got = rt.block_on(g.get_async("chunks/ab/abcd", 1 << 20));
    assert_eq!(&got.unwrap().unwrap()[..], b"bytes");
    assert!(t.elapsed() < WAITS_FOR_A_HOLD * 2, "{:?}", t.elapsed());
    assert!(g.confirmed());
    assert_eq!(store.gets(), 2);
    // A blocking request, likewise.
    let store = Fake::default();
    let g = store.gate();
    assert!(rt.block_on(g.get_async("chunks/ab/abcd", 1 << 20)).is_err());
    store.set_up(true);
    assert!(g.exists("b.json").unwrap());
    assert_eq!(store.gets(), 2);
}

/// A store that stays down: a request within a hold fails by the hold's
/// end and one check, not later, and does not wait for a second check;
/// a hold longer than [`WAITS_FOR_A_HOLD`] (a check that took long)
/// fails it at once, the store not asked.
#[test]
fn a_request_to_a_store_still_down_fails_within_the_bound() {
    let rt = runtime();
    let store = Fake::default();
    let g = store.gate();
    assert!(g.exists("b.json").is_err());
    for n in [2, 4] {
        let t = Instant::now();
        let e = rt
            .block_on(g.get_async("chunks/ab/abcd", 1 << 20))
            .unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
        let took = t.elapsed();
        assert!(
            took < WAITS_FOR_A_HOLD + Duration::from_millis(500),
            "{took:?}"
        );
        assert_eq!(store.gets(), n, "one check per hold");
        let t = Instant::now();
        assert!(g.exists("b.json").is_err());
        assert!(t.elapsed() < WAITS_FOR_A_HOLD + Duration::from_millis(500));
        assert_eq!(store.gets(), n + 1);
    }
    // A check that took longer than a request waits for a hold.
    let store = Fake::default();
    store.0.slow_ms.store(2500, Ordering::SeqCst);
    let g = store.gate();
    assert!(g.exists("b.json").is_err());
    store.set_up(true);
    let t = Instant::now();
    assert!(g.exists("b.json").is_err());
    assert!(rt.block_on(g.get_async("chunks/ab/abcd", 1 << 20)).is_err());
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(store.gets(), 1);
}

/// Requests that come together, on threads and on a runtime, make one
/// GET of `repo.json` and all take its outcome: at a hold's end, and
/// with no hold (the async ones each made their own).
#[test]
fn concurrent_requests_make_one_identity_check() {
    let rt = runtime();
    let together = |g: &Unconfirmed| -> Vec<bool> {
        std::thread::scope(|s| {
            let sync: Vec<_> = (0..4).map(|_| s.spawn(|| g.exists("b.json"))).collect();
            let tasks: Vec<_> = (0..4)
                .map(|_| rt.spawn(g.get_async("chunks/ab/abcd", 1 << 20)))
                .collect();
            let mut ok: Vec<bool> = sync
                .into_iter()
                .map(|h| h.join().unwrap().is_ok())
                .collect();
            ok.extend(tasks.into_iter().map(|t| rt.block_on(t).unwrap().is_ok()));
            ok
        })
    };
    // Checks that take long: requests late under load still find it in
    // flight.
    let slow = |up: bool| {
        let store = Fake::default();
        store.0.slow_ms.store(1500, Ordering::SeqCst);
        store.set_up(up);
        store
    };
    let store = slow(false);
    let g = store.gate();
    // No hold: a store down fails them all with one check.
    assert_eq!(together(&g), vec![false; 8]);
    assert_eq!(store.gets(), 1);
    // Within the hold of a check that failed at once, the store back:
    // one check at its end.
    let store = slow(true);
    let g = store.gate();
    let check = Checking(g.gate.clone(), false);
    assert!(check.judge(Ok(None), Duration::ZERO).is_err());
    assert_eq!(together(&g), vec![true; 8]);
    assert_eq!(store.gets(), 1);
    // A store up from the first request on.
    let store = slow(true);
    let g = store.gate();
    assert_eq!(together(&g), vec![true; 8]);
    assert_eq!(store.gets(), 1);
}

/// A request dropped during its check (a fetch abandoned) does not leave
/// the gate waiting for that check: the next request makes its own. And
/// the daemon's stop fails the requests waiting at the gate at once.
#[test]
fn a_dropped_check_or_the_stop_leaves_no_request_waiting() {
    let rt = runtime();
    let store = Fake::default();
    store.0.slow_ms.store(300, Ordering::SeqCst);
    store.set_up(true);
    let g = Arc::new(store.gate());
    let get = g.get_async("chunks/ab/abcd", 1 << 20);
    let cut = rt.block_on(async { tokio::time::timeout(Duration::from_millis(50), get).await });
    assert!(cut.is_err(), "dropped during its check");
    let (tx, rx) = std::sync::mpsc::channel();
    let next = g.clone();
    std::thread::spawn(move || tx.send(next.exists("b.json").is_ok()));
    let got = rx.recv_timeout(Duration::from_secs(5));
    assert_eq!(got, Ok(true), "the next request is not left waiting");
    // The dropped check never had its answer.
    assert_eq!(store.gets(), 1);

    let store = Fake::default();
    let g = store.gate();
    assert!(g.exists("b.json").is_err());
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let t = Instant::now();
            (g.exists("b.json"), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        g.begin_shutdown();
        let (got, took) = waiting.join().unwrap();
        let e = got.unwrap_err();
        assert!(e.to_string().contains("while the daemon stops"), "{e}");
        assert!(took < Duration::from_millis(500), "{took:?}");
    });
    assert_eq!(store.gets(), 1);
}
