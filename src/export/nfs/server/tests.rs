//! The NFS server against raw TCP clients: caps, timeouts, refused hosts.

use super::*;
use std::io::{Read, Write};

/// A server on an empty datastore, on a loopback address of its own
/// (port 111, so nothing else is bound), on a runtime of few blocking
/// threads so that threads held by one client show at once.
struct Rig {
    _dir: tempfile::TempDir,
    server: Option<NfsServer>,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn rig(tweak: impl FnOnce(&mut NfsOptions)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) =
        crate::repo::Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
    let (staging, mnt) = (dir.path().join("staging"), dir.path().join("mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    let stagings = crate::staging::StagingSet::open(&staging, &mnt, &[], &repo, &[]).unwrap();
    let ds = Datastore::new(
        repo,
        stagings,
        &mnt,
        4,
        crate::prefetch::PrefetchOptions {
            use_profile: false,
            default_profile: false,
            ..Default::default()
        },
        Default::default(),
    );
    let point = ds.points()[0].clone();
    let r: u32 = rand::random();
    let ip = std::net::Ipv4Addr::new(
        127,
        1 + (r >> 16) as u8 % 250,
        (r >> 8) as u8,
        2 + (r as u8) % 250,
    );
    let mut o = opts();
    o.listen = vec![SocketAddr::new(ip.into(), 111)];
    tweak(&mut o);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let server = NfsServer::start(rt.handle(), ds, point, o).unwrap();
    let addr = server.addrs()[0];
    Rig {
        _dir: dir,
        server: Some(server),
        addr,
        rt,
    }
}

/// `n` NFS NULL calls (AUTH_NULL), one record each.
fn null_calls(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * 44);
    for xid in 0..n as u32 {
        v.extend(nfs3_types::rpc::fragment_header::new(40, true).into_xdr_buf());
        for x in [xid, 0, 2, 100_003, 3, 0, 0, 0, 0, 0] {
            v.extend(x.to_be_bytes());
        }
    }
    v
}

/// Reads one reply record; `None` at EOF (or a reset).
fn read_reply(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    let mut h = [0u8; 4];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return None
        }
        Err(e) => panic!("reading a reply: {e}"),
    }
    let len = u32::from_be_bytes(h) & 0x7fff_ffff;
    let mut body = vec![0; len as usize];
    s.read_exact(&mut body).unwrap();
    Some(body)
}

/// A client that sends NULL calls as fast as it can and never reads
/// its replies, with a small receive buffer so the server's socket
/// fills soon. Returns once the server stopped reading from it, with
/// the thread still sending and a flag that it saw its connection
/// closed.
fn flood_without_reading(
    rig: &Rig,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let s = rig.rt.block_on(sock.connect(rig.addr)).unwrap();
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (stalled, closed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (st, cl) = (stalled.clone(), closed.clone());
    std::thread::spawn(move || {
        let calls = null_calls(1000);
        let mut s = s;
        let (t0, mut at) = (Instant::now(), 0);
        while t0.elapsed() < Duration::from_secs(120) {
            // Whole records only: a partial write goes on where it ended.
            match s.write(&calls[at..]) {
                Ok(n) => at = (at + n) % calls.len(),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    st.store(true, Ordering::Release)
                }
                Err(_) => {
                    cl.store(true, Ordering::Release);
                    return;
                }
            }
        }
    });
    let t0 = Instant::now();
    while !stalled.load(Ordering::Acquire) {
        assert!(
            !closed.load(Ordering::Acquire),
            "the server closed the flooding client"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the server kept reading"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (stalled, closed)
}

#[test]
fn a_client_that_never_reads_its_replies_does_not_stall_other_clients() {
    let rig = rig(|_| {});
    let t0 = Instant::now();
    let _flood = flood_without_reading(&rig);
    eprintln!("the flooding client stalled after {:?}", t0.elapsed());
    // The blocking threads (4 here) are all free for another client.
    let mut b = std::net::TcpStream::connect(rig.addr).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    b.write_all(&null_calls(1)).unwrap();
    let reply = read_reply(&mut b).expect("a reply");
    assert_eq!(&reply[..4], &0u32.to_be_bytes(), "the NULL call's xid");
}

#[test]
fn shutdown_closes_a_connection_whose_replies_are_stuck() {
    let mut rig = rig(|_| {});
    let (_, closed) = flood_without_reading(&rig);
    rig.server.take().unwrap().shutdown();
    let t0 = Instant::now();
    while !closed.load(std::sync::atomic::Ordering::Acquire) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the connection outlived the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_refused_client_gets_one_reply_then_eof() {
    let rig = rig(|o| o.allow = vec!["198.18.0.0/15".parse().unwrap()]);
    let mut c = std::net::TcpStream::connect(rig.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    c.write_all(&null_calls(2)).unwrap();
    let reply = read_reply(&mut c).expect("one reply");
    // xid 0, REPLY, MSG_DENIED, AUTH_ERROR, AUTH_TOOWEAK.
    let words: Vec<u32> = reply
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    assert_eq!(words, [0, 1, 1, 1, 5]);
    assert_eq!(read_reply(&mut c), None, "more than one reply");
}

/// Sends `bytes` and expects the server to close the connection
/// within `within`.
fn closed_within(rig: &Rig, bytes: &[u8], within: Duration) {
    let mut c = std::net::TcpStream::connect(rig.addr).unwrap();
    c.set_read_timeout(Some(within)).unwrap();
    c.write_all(bytes).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    match c.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes instead of EOF"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed after {:?}: {e}", t0.elapsed()),
    }
}

#[test]
fn connections_over_the_cap_are_closed_at_accept_until_one_closes() {
    let rig = rig(|o| o.max_connections = 2);
    let served = |c: &mut std::net::TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(&null_calls(1)).unwrap();
        read_reply(c).is_some()
    };
    let mut a = std::net::TcpStream::connect(rig.addr).unwrap();
    let mut b = std::net::TcpStream::connect(rig.addr).unwrap();
    assert!(served(&mut a) && served(&mut b));
    let mut c = std::net::TcpStream::connect(rig.addr).unwrap();
    assert!(!served(&mut c), "a third connection was served");
    drop(a);
    let t0 = Instant::now();
    loop {
        let mut d = std::net::TcpStream::connect(rig.addr).unwrap();
        if served(&mut d) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "a closed connection kept its place"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served(&mut b), "the open one is still served");
}

/// A TCP connection to `dst` from the local address `src`.
fn connect_from(rig: &Rig, src: std::net::Ipv4Addr, dst: SocketAddr) -> std::net::TcpStream {
    rig.rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(src.into(), 0)).unwrap();
        let s = s.connect(dst).await.unwrap().into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

#[test]
fn refused_hosts_holding_connections_never_take_an_allowed_hosts_places() {
    let rig = rig(|o| {
        o.allow = vec!["127.0.0.1/32".parse().unwrap()];
        o.max_connections = 2;
    });
    // Refused connections that send nothing hold on for the record
    // timeout (60 s here).
    let refused: Vec<_> = (0..40)
        .map(|_| connect_from(&rig, std::net::Ipv4Addr::new(127, 0, 0, 2), rig.addr))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut served = vec![];
    for _ in 0..2 {
        let mut c = connect_from(&rig, std::net::Ipv4Addr::LOCALHOST, rig.addr);
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(&null_calls(1)).unwrap();
        assert!(
            read_reply(&mut c).is_some(),
            "an allowed host lost its place to refused connections"
        );
        served.push(c); // kept open: both places are the allowed host's
    }
    drop((refused, served));
}

#[test]
fn accepted_nfs_connections_have_keepalive() {
    let l = bind("127.0.0.1:0".parse().unwrap(), "address").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    l.set_nonblocking(false).unwrap();
    let (s, _) = l.accept().unwrap();
    use nix::sys::socket::{getsockopt, sockopt};
    let on = getsockopt(&s, sockopt::KeepAlive).unwrap();
    assert!(on, "no keepalive on an accepted NFS connection");
    // A vanished host is dropped in about six minutes, not two hours.
    assert_eq!(getsockopt(&s, sockopt::TcpKeepIdle).unwrap(), 120);
    assert_eq!(getsockopt(&s, sockopt::TcpKeepInterval).unwrap(), 30);
    assert_eq!(getsockopt(&s, sockopt::TcpKeepCount).unwrap(), 8);
    drop(c);
}

#[test]
fn a_record_that_never_completes_is_closed_in_bounded_time() {
    let rig = rig(|o| o.limits.record_timeout = Duration::from_millis(500));
    // Claims a fragment of 1 MiB, sends 3 bytes of it.
    closed_within(
        &rig,
        &[0x00, 0x0f, 0xff, 0xff, 1, 2, 3],
        Duration::from_secs(3),
    );
    // Half a record mark.
    closed_within(&rig, &[0x80, 0x00], Duration::from_secs(3));
}

#[test]
fn a_refused_client_that_sends_nothing_is_closed_in_bounded_time() {
    let rig = rig(|o| {
        o.allow = vec!["198.18.0.0/15".parse().unwrap()];
        o.limits.record_timeout = Duration::from_millis(500);
    });
    closed_within(&rig, &[], Duration::from_secs(3));
}

#[test]
fn a_client_that_stops_reading_its_replies_is_closed_after_the_write_timeout() {
    let rig = rig(|o| o.limits.write_timeout = Duration::from_secs(1));
    let (_, closed) = flood_without_reading(&rig);
    let t0 = Instant::now();
    while !closed.load(std::sync::atomic::Ordering::Acquire) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a client that takes no replies keeps its connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn opts() -> NfsOptions {
    NfsOptions {
        listen: vec![],
        allow: crate::export::loopback_only(),
        root_squash: true,
        anon: (65534, 65534),
        write_through: false,
        owner: (0, 0),
        limits: Default::default(),
        max_connections: NfsOptions::MAX_CONNECTIONS,
    }
}

#[test]
fn remote_root_is_squashed_to_anon_unless_told_not_to() {
    let mut o = opts();
    let root = Cred::Unix {
        uid: 0,
        gid: 0,
        gids: vec![0],
    };
    let remote: IpAddr = "198.18.0.2".parse().unwrap();
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(o.caller(&root, remote).uid, 65534);
    assert_eq!(
        o.caller(&root, local).uid,
        0,
        "local root can read staging anyway"
    );
    assert_eq!(o.caller(&Cred::None, local).uid, 65534);
    // Group 0 is root's too: squashed wherever it appears, as knfsd does.
    let wheel = Cred::Unix {
        uid: 1000,
        gid: 0,
        gids: vec![5, 0],
    };
    let c = o.caller(&wheel, remote);
    assert_eq!((c.uid, c.gid, c.gids), (1000, 65534, vec![5, 65534]));
    o.root_squash = false;
    assert_eq!(o.caller(&root, remote).uid, 0);
    assert_eq!(o.caller(&wheel, remote).gid, 0);
}
