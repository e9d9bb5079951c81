//! Concurrency and lifecycle: requests in flight, connections sharing
//! an export, disconnects and shutdown, and the listeners.

use super::*;

#[test]
fn a_client_that_does_not_choose_an_export_in_time_is_disconnected() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    let t = Instant::now();
    assert!(c.closed());
    assert!(t.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(100));
    assert!(t.elapsed() < HANDSHAKE_TIMEOUT * 3);
}

#[test]
fn thirty_two_reads_in_flight_on_one_connection_run_in_parallel() {
    let p = Probe::new(SIZE);
    let image = random(SIZE as usize, 9);
    p.inner.write_at(0, &image).unwrap();
    *p.read_delay.lock().unwrap() = Duration::from_millis(100);
    let h = serve_one(p.clone());
    let mut c = h.open(EXPORT);
    // Large enough that each reply leaves in several writes: replies
    // interleaved on the socket would garble the client's parse.
    let len = 200_000u32;
    let t = Instant::now();
    let mut asked: HashMap<u64, u64> = (0..32u64)
        .map(|i| (c.send(CMD_READ, 0, i * 120_000, len, &[]), i * 120_000))
        .collect();
    for _ in 0..32 {
        let (cookie, r) = c.recv();
        assert_eq!(r.error, 0);
        let off = asked.remove(&cookie).expect("one reply per request") as usize;
        assert!(
            r.data == image[off..off + len as usize],
            "read at {off} differs"
        );
    }
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1200), "32 reads took {took:?}");
    let most = p.reads_max.load(Ordering::SeqCst);
    assert!(most >= 16, "only {most} reads ran at once");
}

#[test]
fn a_later_fast_request_is_answered_before_an_earlier_slow_read() {
    let p = Probe::new(SIZE);
    p.inner.write_at(0, &[1; 4096]).unwrap(); // data, not a hole: the disk is read
    *p.read_delay.lock().unwrap() = Duration::from_millis(300);
    let h = serve_one(p);
    let mut c = h.open(EXPORT);
    let t = Instant::now();
    let read = c.send(CMD_READ, 0, 0, 4096, &[]);
    let flush = c.send(CMD_FLUSH, 0, 0, 0, &[]);
    assert_eq!(c.recv().0, flush);
    assert!(t.elapsed() < Duration::from_millis(250), "the flush waited");
    let (cookie, r) = c.recv();
    assert_eq!((cookie, r.data), (read, vec![1; 4096]));
}

#[test]
fn two_connections_share_one_export_at_once() {
    let p = Probe::new(SIZE);
    let h = serve_one(p.clone());
    let mut a = h.open(EXPORT);
    let mut b = h.open(EXPORT);
    assert_eq!(h.guards(), 2);
    assert_eq!(a.write(5000, b"from a", 0).error, 0);
    assert_eq!(b.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    assert_eq!(b.read(5000, 6), b"from a");
    assert_eq!(b.write(9000, b"from b", CMD_FLAG_FUA).error, 0);
    assert_eq!(a.read(9000, 6), b"from b");
    assert_eq!(p.flushes(), 2);
}

#[test]
fn the_guard_is_dropped_when_the_connection_ends_by_disc_eof_or_shutdown() {
    let p = Probe::new(SIZE);
    let mut h = serve_one(p);
    let mut c = h.open(EXPORT);
    assert_eq!(h.guards(), 1);
    c.disc();
    assert!(c.closed());
    wait_until("the guard is dropped after DISC", || h.guards() == 0);

    let c = h.open(EXPORT);
    assert_eq!(h.guards(), 1);
    drop(c);
    wait_until("the guard is dropped after EOF", || h.guards() == 0);

    let mut c = h.open(EXPORT);
    let mut listing = h.client();
    assert_eq!(h.guards(), 1);
    h.shutdown();
    assert_eq!(
        h.guards(),
        0,
        "shutdown returned before the guard was dropped"
    );
    assert!(c.closed());
    assert!(
        listing.closed(),
        "a connection in the handshake is closed too"
    );
}

#[test]
fn disc_and_shutdown_wait_for_the_requests_in_flight_to_answer() {
    let p = Probe::new(SIZE);
    p.inner.write_at(0, b"slow").unwrap();
    *p.read_delay.lock().unwrap() = Duration::from_millis(300);
    let mut h = serve_one(p.clone());

    let mut c = h.open(EXPORT);
    c.send(CMD_READ, 0, 0, 4, &[]);
    c.disc();
    let (_, r) = c.recv();
    assert_eq!(r.data, b"slow");
    assert!(c.closed());

    let mut c = h.open(EXPORT);
    c.send(CMD_READ, 0, 0, 4, &[]);
    wait_until("the read reaches the disk", || {
        p.reads_now.load(Ordering::SeqCst) == 1
    });
    let t = Instant::now();
    h.shutdown();
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "shutdown did not wait"
    );
    let (_, r) = c.recv();
    assert_eq!(r.data, b"slow");
    assert!(c.closed());
}

#[test]
fn a_busy_port_and_a_foreign_address_are_clear_errors() {
    let rt = runtime();
    let exports: Arc<dyn Exports> = Arc::new(TestExports {
        disks: vec![],
        guards: Arc::new(AtomicUsize::new(0)),
    });
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let e = NbdServer::start(rt.handle(), &[Listen::Tcp(addr)], exports.clone(), &[])
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        e.to_string(),
        format!("NBD address {addr} is already in use")
    );

    let foreign: SocketAddr = "192.0.2.1:10809".parse().unwrap();
    let e = NbdServer::start(rt.handle(), &[Listen::Tcp(foreign)], exports, &[])
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "NBD address 192.0.2.1:10809 is not an address of this host"
    );
}

#[test]
fn a_unix_socket_replaces_a_dead_one_refuses_a_live_one_and_is_removed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a dead socket file is left behind");

    let mut h = serve(
        vec![(EXPORT, Probe::new(SIZE))],
        &[Listen::Unix(path.clone())],
    );
    let mut c = Client::unix(&path);
    assert_eq!(c.go(EXPORT).unwrap().size, SIZE);
    assert_eq!(c.read(0, 10), vec![0; 10]);

    // A second server on the same path finds it live.
    let exports: Arc<dyn Exports> = Arc::new(TestExports {
        disks: vec![],
        guards: Arc::new(AtomicUsize::new(0)),
    });
    let e = NbdServer::start(
        h.rt.handle(),
        &[Listen::Unix(path.clone())],
        exports.clone(),
        &[],
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");

    drop(c);
    h.shutdown();
    assert!(!path.exists(), "the socket file is removed at shutdown");

    // Anything that is not a socket is left alone.
    std::fs::write(&path, b"precious").unwrap();
    let e = NbdServer::start(h.rt.handle(), &[Listen::Unix(path.clone())], exports, &[])
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn a_unix_socket_appears_with_mode_0600_even_under_umask_0() {
    // The umask is the process's: this runs in a process of its own, so
    // that no other test creates files under umask 0 meanwhile.
    const CHILD: &str = "RECOVERFS_TEST_UMASK_0";
    let name = "a_unix_socket_appears_with_mode_0600_even_under_umask_0";
    if std::env::var_os(CHILD).is_none() {
        let module = module_path!().split_once("::").unwrap().1;
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("{module}::{name}"), "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    // SAFETY: umask touches no memory.
    unsafe { libc::umask(0) };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let rt = runtime();
    let exports: Arc<dyn Exports> = Arc::new(TestExports {
        disks: vec![],
        guards: Arc::new(AtomicUsize::new(0)),
    });
    let server =
        NbdServer::start(rt.handle(), &[Listen::Unix(path.clone())], exports, &[]).unwrap();
    // Mode at the path the moment start returns: the daemon publishes the
    // socket's URL right after, and clients may connect at once.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::symlink_metadata(&path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["nbd.sock"], "the private directory is left behind");
    assert_eq!(
        Client::unix(&path).go(EXPORT).unwrap_err().0,
        REP_ERR_UNKNOWN
    );
    drop(server);
}
