//! The NBD export with real clients: libnbd's `nbdinfo` and `nbdcopy`,
//! `qemu-img` and `qemu-io`, and QEMU booting over NBD, including a daemon
//! crash under a guest that keeps writing (QEMU's `reconnect-delay`).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nfs::own_loopback;
use common::*;

const K64: usize = 64 << 10;

fn nbd_env() -> (Env, String) {
    let mut env = Env::new();
    let addr = format!("{}:10809", own_loopback());
    env.serve_args = vec!["--nbd".into(), addr.clone()];
    (env, addr)
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} (Debian packages libnbd-bin, qemu-utils): {e}", args[0]))
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn nbd_clients_map_copy_and_compare_the_recovered_disk() {
    let (mut env, addr) = nbd_env();
    let sock = env.path("nbd.sock");
    env.serve_args
        .extend(["--nbd".to_string(), format!("unix:{}", sock.display())]);
    let data = random_image(&env.path("a.raw"), 48 * K64, 91, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let out = env.ok(&["recover", "--socket", env.socket.to_str().unwrap(), "vm"]);
    let url = format!("nbd://{addr}/vm/disk0");
    assert!(out.contains(&url), "{out}");
    let fuse = env.mount.join("vm/disk0.raw");
    // Zero chunks are holes, everything else data.
    let map = ok(&["nbdinfo", "--map", &url]);
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len): (usize, usize) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let zero = data[off..off + len].iter().all(|&b| b == 0);
        if line.contains("hole") {
            assert!(zero, "a hole over data at {off}: {map}");
        }
    }
    let holes = map.lines().filter(|l| l.contains("hole,zero")).count();
    assert!(holes > 0, "zero chunks should read as holes: {map}");
    // Byte for byte, over TCP and over the Unix socket.
    let copy = env.path("copy.raw");
    ok(&["nbdcopy", &url, copy.to_str().unwrap()]);
    assert!(
        read_all(&copy) == data,
        "nbdcopy of the export differs from the backup"
    );
    let unix = format!("nbd+unix:///vm/disk0?socket={}", sock.display());
    assert!(out.contains(&unix), "{out}");
    ok(&["nbdinfo", &unix]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // A write over NBD shows in the changed map, and NBD equals FUSE.
    ok(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 200000 4096",
        &url,
    ]);
    let changed = ok(&["nbdinfo", "--map=recoverfs:changed", &url]);
    assert!(
        changed
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("1")),
        "{changed}"
    );
    let cmp = run(&[
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &url,
        fuse.to_str().unwrap(),
    ]);
    assert!(cmp.status.success(), "NBD and FUSE disagree: {cmp:?}");
    let mut b = vec![0u8; 4096];
    std::fs::File::open(&fuse)
        .unwrap()
        .read_exact_at(&mut b, 200000)
        .unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    // An open export is an open handle: release waits for the client.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 2500", &url])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.status()["sessions"][0]["open_handles"] == 0 {
        assert!(
            Instant::now() < deadline,
            "the NBD client never showed as open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = env.release("vm", false);
    assert!(
        !o.status.success(),
        "release while an NBD client has the disk open"
    );
    // The client is named by its address (explore10 L4).
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("disk0 over NBD by 127."), "{err}");
    holder.wait().unwrap();
    let o = env.release("vm", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gone = run(&["nbdinfo", &url]);
    assert!(!gone.status.success(), "a released disk is still exported");
}

#[test]
fn qemu_boots_the_tiny_vm_over_nbd() {
    let (env, addr) = nbd_env();
    let image = tiny_image();
    env.backup("tiny", "64K", &[&image]);
    let _d = env.serve();
    env.recover("tiny", None);
    let (host, port) = addr.split_once(':').unwrap();
    let blockdev = format!(
        "driver=nbd,node-name=d0,server.type=inet,server.host={host},server.port={port},export=tiny/disk0"
    );
    let n = boot_counter_with(
        &["-blockdev", &blockdev, "-device", "virtio-blk-pci,drive=d0"],
        "over NBD",
    );
    assert_eq!(n, 1);
    // The guest's misses within a block waited holding no thread.
    let st = env.disk_status("tiny", 0);
    assert!(
        st["later_reads"].as_u64().unwrap() > 0,
        "no read answered later: {st}"
    );
    assert_eq!(boot_counter(&env.mount.join("tiny/disk0.raw")), 2);
}

/// A data disk the tiny guest writes `total` stamped, synced sectors to.
fn writer_disk(path: &std::path::Path, total: u32) {
    let mut d = vec![0u8; 4 << 20];
    d[..16].copy_from_slice(b"RECOVERFS-WRITER");
    d[16..24].copy_from_slice(format!("{total:08}").as_bytes());
    std::fs::write(path, d).unwrap();
}

#[test]
fn a_daemon_crash_is_invisible_to_a_guest_writing_over_nbd() {
    let (env, addr) = nbd_env();
    let image = tiny_image();
    let total = 1200u32;
    writer_disk(&env.path("w.raw"), total);
    env.backup("tiny", "64K", &[&image, &env.path("w.raw")]);
    let mut d = env.serve();
    env.recover("tiny", None);
    let (host, port) = addr.split_once(':').unwrap();
    let dev = |i: usize| {
        format!(
            "driver=nbd,node-name=d{i},server.type=inet,server.host={host},server.port={port},export=tiny/disk{i},reconnect-delay=60"
        )
    };
    let mut qemu = Command::new("timeout")
        .args([
            "300",
            "qemu-system-x86_64",
            "-nographic",
            "-m",
            "256",
            "-no-reboot",
        ])
        .args(["-blockdev", &dev(0), "-device", "virtio-blk-pci,drive=d0"])
        .args(["-blockdev", &dev(1), "-device", "virtio-blk-pci,drive=d1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Lines with their arrival time: the writer must still be writing when
    // the daemon comes back, or the test proves nothing.
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    for stream in [
        Box::new(qemu.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(qemu.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                let _ = tx.send((Instant::now(), l));
            }
        });
    }
    drop(tx);
    let mut console = vec![];
    let mut wait_for = |pred: &dyn Fn(&str) -> bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((at, l)) => {
                    let hit = pred(&l);
                    console.push(l);
                    if hit {
                        return (at, console.last().unwrap().clone());
                    }
                }
                Err(_) => panic!("no {what}; console:\n{}", console.join("\n")),
            }
        }
    };
    wait_for(
        &|l| l.contains("RECOVERFS-WRITER progress=200"),
        "writer progress",
    );
    // The daemon dies under the writing guest and comes back 1.5 s later.
    d.kill9();
    std::mem::forget(d);
    std::thread::sleep(Duration::from_millis(1500));
    let _d2 = env.serve();
    let restarted = Instant::now();
    let (at, done) = wait_for(&|l| l.contains("RECOVERFS-WRITER-DONE"), "writer end");
    assert!(
        at > restarted,
        "the guest finished writing before the daemon came back"
    );
    assert!(
        done.contains("errors=0"),
        "the guest saw I/O errors: {done}"
    );
    let st = qemu.wait().unwrap();
    assert!(st.success(), "QEMU exited with {st}");
    // Every synced sector is on the disk, through the restarted daemon.
    let disk1 = read_all(&env.mount.join("tiny/disk1.raw"));
    for i in 1..=total as usize {
        let want = format!("RFSW seq={i:08}\n");
        assert_eq!(
            &disk1[i * 512..i * 512 + want.len()],
            want.as_bytes(),
            "sector {i} lost its flushed write"
        );
    }
    assert_eq!(boot_counter(&env.mount.join("tiny/disk0.raw")), 2);
}

#[test]
fn bad_nbd_addresses_and_unknown_exports_are_refused_clearly() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 92, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let sock = env.socket.to_str().unwrap().to_string();
    let serve = |nbd: &str| {
        vec![
            "serve",
            "--repo",
            env.repo_str(),
            "--staging",
            env.staging.to_str().unwrap(),
            "--mount",
            env.mount.to_str().unwrap(),
            "--socket",
            &sock,
            "--nbd",
            nbd,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let fails = |nbd: &str, needle: &str| {
        let v = serve(nbd);
        env.fails(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>(), needle);
    };
    fails("198.18.250.250:10809", "not an address of this host");
    let busy = own_loopback();
    let _l = std::net::TcpListener::bind((busy, 10809)).unwrap();
    fails(&busy.to_string(), "already in use");
    fails("nowhere", "expected ADDR");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(env.mount.to_str().unwrap()), "{mounts}");
    // Unknown VM or disk: the client is told, nothing is exported.
    let mut env = env;
    let addr = format!("{}:10809", own_loopback());
    env.serve_args = vec!["--nbd".into(), addr.clone()];
    let _d = env.serve();
    env.recover("vm", None);
    for bad in ["nope/disk0", "vm/disk7", "vm"] {
        let o = run(&["nbdinfo", &format!("nbd://{addr}/{bad}")]);
        assert!(!o.status.success(), "{bad} was served");
        // libnbd 1.14 shows the errno, not the server's message.
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("No such file or directory for export"),
            "{o:?}"
        );
    }
}

/// A client that asks one export point for a VM another point serves is
/// told which point, and the URL to use there (QEMU shows the server's
/// message; libnbd 1.14 only the errno).
#[test]
fn an_nbd_client_at_the_wrong_export_point_is_told_where_the_vm_is_served() {
    let mut env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 94, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let a = own_loopback();
    let b = loop {
        let b = own_loopback();
        if b != a {
            break b;
        }
    };
    env.serve_args = vec![
        "--export-point".into(),
        format!("a,listen={a}"),
        "--export-point".into(),
        format!("b,listen={b}"),
    ];
    let _d = env.serve();
    let sock = env.socket.to_str().unwrap().to_string();
    env.ok(&["recover", "--socket", &sock, "vm", "--export-point", "b"]);
    let o = run(&["qemu-img", "info", &format!("nbd://{a}:10809/vm/disk0")]);
    assert!(!o.status.success(), "point a served a VM of point b");
    let err = String::from_utf8_lossy(&o.stderr);
    let want = format!("VM vm is served at export point b: nbd://{b}:10809/vm/disk0");
    assert!(err.contains(&want), "{err}");
    // At its own point it is served.
    ok(&["qemu-img", "info", &format!("nbd://{b}:10809/vm/disk0")]);
    // A VM served nowhere gets the plain answer.
    let o = run(&["qemu-img", "info", &format!("nbd://{a}:10809/other/disk0")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nbdinfo --list shows the exports"), "{err}");
}

/// Connects to `to` from the local address `from` (any 127.x address is
/// this host's), so that a test can be a host of its choosing.
fn connect_from(from: std::net::Ipv4Addr, to: std::net::SocketAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let s = rt
        .block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind((from, 0).into())?;
            s.connect(to).await
        })
        .unwrap()
        .into_std()
        .unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// What the server sends before the client says anything: the 18-byte
/// greeting, or nothing if it closes at once (a timeout panics).
fn first_bytes(s: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut got = vec![];
    let mut buf = [0u8; 18];
    while got.len() < 18 {
        match s.read(&mut buf[..18 - got.len()]) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no greeting and no close: {e}"),
        }
    }
    got
}

#[test]
fn an_export_points_nbd_port_closes_on_hosts_outside_the_allowed_networks_before_the_greeting() {
    let mut env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 93, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    // Clients come from 127.0.0.1 unless they bind another 127.x address:
    // only 127.0.0.1 is allowed, so the check (not the route) decides.
    let listen = own_loopback();
    let refused = loop {
        let a = own_loopback();
        if a != listen {
            break a;
        }
    };
    let allowed = std::net::Ipv4Addr::LOCALHOST;
    env.serve_args = vec![
        "--export-point".into(),
        format!("a,listen={listen}"),
        "--allow".into(),
        format!("{allowed}/32"),
    ];
    let d = env.serve();
    env.recover("vm", None);
    let port: std::net::SocketAddr = (listen, 10809).into();
    // Twice: refused at once both times, logged once.
    for _ in 0..2 {
        let mut s = connect_from(refused, port);
        assert_eq!(
            first_bytes(&mut s),
            b"",
            "a host outside the allowed networks got bytes"
        );
    }
    let log = d.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("NBD client refused") && l.contains(&refused.to_string()))
        .count();
    assert_eq!(lines, 1, "{log}");
    // An allowed host gets the greeting, and is counted as one of the
    // point's hosts only once it has chosen an export.
    let mut s = connect_from(allowed, port);
    assert_eq!(&first_bytes(&mut s)[..8], b"NBDMAGIC");
    let hosts = || {
        let out = env.ok(&[
            "export-points",
            "--socket",
            env.socket.to_str().unwrap(),
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["export_points"][0]["hosts"].clone()
    };
    assert_eq!(
        hosts(),
        serde_json::json!([]),
        "counted before the handshake"
    );
    let list = ok(&["nbdinfo", "--list", &format!("nbd://{port}")]);
    assert!(list.contains("vm/disk0"), "{list}");
    assert_eq!(hosts(), serde_json::json!([]), "counted for a listing");
    drop(s);
    let mut holder = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 2500"])
        .arg(format!("nbd://{port}/vm/disk0"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while hosts() == serde_json::json!([]) {
        assert!(
            Instant::now() < deadline,
            "a client with an export open is not counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(hosts()[0]["host"], "127.0.0.1", "{}", hosts());
    holder.wait().unwrap();
}

#[test]
fn a_fuse_reader_sees_a_write_made_over_nbd() {
    let (env, addr) = nbd_env();
    let data = random_image(&env.path("a.raw"), 16 * K64, 92, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.ok(&["recover", "--socket", env.socket.to_str().unwrap(), "vm"]);
    let url = format!("nbd://{addr}/vm/disk0");
    let fuse = env.mount.join("vm/disk0.raw");
    // Buffered reads through FUSE: the kernel caches the pages.
    assert!(std::fs::read(&fuse).unwrap() == data);
    let open = std::fs::File::open(&fuse).unwrap();
    let mut b = vec![0u8; 4096];
    open.read_exact_at(&mut b, 3 * K64 as u64).unwrap();
    ok(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 65536 4096",
        &url,
    ]);
    ok(&["qemu-io", "-f", "raw", "-c", "write -z 196608 4096", &url]);
    // A new open and the one held across the writes both see them.
    let mut again = vec![0u8; 4096];
    std::fs::File::open(&fuse)
        .unwrap()
        .read_exact_at(&mut again, K64 as u64)
        .unwrap();
    assert!(again == [0x5a; 4096], "a new FUSE open read stale bytes");
    open.read_exact_at(&mut b, 3 * K64 as u64).unwrap();
    assert!(b == [0; 4096], "an open FUSE file read stale bytes");
}
