//! The client against our own NBD server, against QEMU 7.2's
//! `qemu-storage-daemon` (Debian package qemu-utils; a missing binary
//! fails the test, naming the package), and against scripted servers that
//! misbehave.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::*;
use crate::disk::{Disk, MemDisk};
use crate::export::nbd::proto::{
    chunk_header, error_payload, option_reply, CONTEXT_CHANGED, REQUEST_LEN, STATE_CHANGED,
};
use crate::export::nbd::{Exports, Listen, NbdServer};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BS: u64 = 64 * KIB;

// ---------------------------------------------------------------------
// Our own server.

struct OneDisk(Arc<MemDisk>);

impl Exports for OneDisk {
    fn list(&self) -> Vec<(String, String)> {
        vec![("vm/disk0".into(), "a test disk".into())]
    }
    fn open(&self, name: &str) -> Result<(Arc<dyn Disk>, Box<dyn crate::export::nbd::OpenGuard>)> {
        if name != "vm/disk0" {
            return Err(Error::not_found(format!("no export {name}")));
        }
        Ok((self.0.clone(), Box::new(())))
    }
}

/// Our server on a Unix socket, shut down when dropped.
struct OwnServer {
    server: Option<NbdServer>,
    sock: PathBuf,
    tcp: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    // Dropped last: the server's tasks run on it.
    _rt: tokio::runtime::Runtime,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// A 4 MiB disk: patterned data in blocks 0 and 2, zeroes written to block
/// 5, data in blocks 20-22; the rest never written (holes).
fn own_server() -> (OwnServer, Vec<u8>) {
    let disk = MemDisk::new("vm/disk0", 4 * MIB, BS);
    let mut model = vec![0u8; (4 * MIB) as usize];
    for (off, len) in [(0, BS), (2 * BS, BS), (20 * BS, 3 * BS)] {
        let data = pattern(len as usize, off);
        disk.write_at(off, &data).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    disk.write_zeroes(5 * BS, BS).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = NbdServer::start(
        rt.handle(),
        &[
            Listen::Unix(sock.clone()),
            Listen::Tcp("127.0.0.1:0".parse().unwrap()),
        ],
        Arc::new(OneDisk(disk)),
        &crate::export::loopback_only(),
    )
    .unwrap();
    let s = OwnServer {
        tcp: server.tcp_addrs()[0],
        server: Some(server),
        sock,
        _dir: dir,
        _rt: rt,
    };
    (s, model)
}

/// Bytes that differ at every offset of a run, and between runs.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 7 + seed / 4096 * 13) % 251) as u8 + 1)
        .collect()
}

/// Extents expected from per-block flags over `blocks` blocks of `bs`.
fn expected(blocks: u64, bs: u64, flags: impl Fn(u64) -> u32) -> Vec<Extent> {
    let mut out: Vec<Extent> = vec![];
    for b in 0..blocks {
        let f = flags(b);
        match out.last_mut() {
            Some(e) if e.flags == f => e.len += bs,
            _ => out.push(Extent {
                offset: b * bs,
                len: bs,
                flags: f,
            }),
        }
    }
    out
}

#[test]
fn reads_from_our_server_equal_the_disk_bytes_even_when_split() {
    let (s, model) = own_server();
    let mut c = NbdClient::connect_unix(&s.sock, "vm/disk0", &[]).unwrap();
    assert_eq!(c.size(), 4 * MIB);
    let mut all = vec![0xffu8; model.len()];
    c.read(0, &mut all).unwrap();
    assert!(all == model, "whole-disk read differs from the disk");

    // Pieces of 100 KiB: requests straddle data and hole blocks.
    c.limit_requests(100 * KIB as u32, u32::MAX);
    let mut part = vec![0xffu8; (1300 * KIB) as usize];
    c.read(BS / 2, &mut part).unwrap();
    assert!(part[..] == model[(BS / 2) as usize..(BS / 2) as usize + part.len()]);
    c.disconnect().unwrap();
}

#[test]
fn reads_over_tcp_equal_the_disk_bytes() {
    let (s, model) = own_server();
    let mut c = NbdClient::connect_tcp(s.tcp, "vm/disk0", &[CONTEXT_ALLOCATION]).unwrap();
    let mut all = vec![0xffu8; model.len()];
    c.read(0, &mut all).unwrap();
    assert!(
        all == model,
        "whole-disk read over TCP differs from the disk"
    );
    assert!(format!("{c:?}").contains("tcp:127.0.0.1:"));
}

#[test]
fn our_server_reports_allocation_and_changed_blocks_even_when_asked_piecewise() {
    let (s, _) = own_server();
    let contexts = [CONTEXT_ALLOCATION, CONTEXT_CHANGED];
    let mut c = NbdClient::connect_unix(&s.sock, "vm/disk0", &contexts).unwrap();
    assert_eq!(c.contexts(), contexts);
    let written = |b: u64| matches!(b, 0 | 2 | 5 | 20..=22);
    let alloc = expected(64, BS, |b| {
        if written(b) {
            0
        } else {
            STATE_HOLE | STATE_ZERO
        }
    });
    let changed = expected(64, BS, |b| if written(b) { STATE_CHANGED } else { 0 });
    assert_eq!(
        c.block_status(CONTEXT_ALLOCATION, 0, 4 * MIB).unwrap(),
        alloc
    );
    assert_eq!(
        c.block_status(CONTEXT_CHANGED, 0, 4 * MIB).unwrap(),
        changed
    );

    // 3 blocks per request: the client asks again until all is covered,
    // and merges extents across the answers.
    c.limit_requests(u32::MAX, 3 * BS as u32);
    assert_eq!(
        c.block_status(CONTEXT_ALLOCATION, 0, 4 * MIB).unwrap(),
        alloc
    );
    // A range inside extents is clipped to what was asked.
    let got = c.block_status(CONTEXT_CHANGED, BS / 2, 2 * BS).unwrap();
    let want = vec![
        Extent {
            offset: BS / 2,
            len: BS / 2,
            flags: STATE_CHANGED,
        },
        Extent {
            offset: BS,
            len: BS,
            flags: 0,
        },
        Extent {
            offset: 2 * BS,
            len: BS / 2,
            flags: STATE_CHANGED,
        },
    ];
    assert_eq!(got, want);
}

#[test]
fn our_server_names_the_unknown_export_and_the_missing_context() {
    let (s, _) = own_server();
    let e = NbdClient::connect_unix(&s.sock, "vm/disk9", &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("'vm/disk9'"), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");

    let e =
        NbdClient::connect_unix(&s.sock, "vm/disk0", &[CONTEXT_ALLOCATION, "foo:bar"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("'foo:bar'"), "{e}");
    assert!(!e.to_string().contains("'base:allocation'"), "{e}");
}

#[test]
fn requests_outside_the_export_or_contexts_not_negotiated_are_refused() {
    let (s, _) = own_server();
    let mut c = NbdClient::connect_unix(&s.sock, "vm/disk0", &[CONTEXT_ALLOCATION]).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(4 * MIB - 2048, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = c.block_status(CONTEXT_CHANGED, 0, BS).unwrap_err();
    assert!(e.to_string().contains("not negotiated"), "{e}");
    // Neither broke the connection.
    c.read(0, &mut buf).unwrap();
}

// ---------------------------------------------------------------------
// QEMU 7.2.

const QEMU_PACKAGE: &str = "qemu-utils";

/// Runs a QEMU tool to completion; fails the test if it is missing or fails.
fn qemu_tool(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (Debian package {QEMU_PACKAGE}): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `qemu-storage-daemon` exporting a qcow2 image; killed when dropped.
struct Qsd {
    proc: crate::qemu::testing::Proc,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Qsd {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qsd.log")).unwrap_or_default()
    }
}

/// A 4 MiB qcow2 image (64 KiB clusters): 0xab at 0+64K written before
/// the persistent bitmap `bitmap0` was added, then 0xcd at 1M+64K, zeroes
/// at 2M+64K and 0xef at 3M+64K+128K; exported as `disk0` with the bitmap.
fn qsd() -> Qsd {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_tool("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "4M"]);
    qemu_tool("qemu-io", &["-c", "write -q -P 0xab 0 64k", img_s]);
    qemu_tool(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "64K", img_s, "bitmap0"],
    );
    // qemu-io opens the image read-write, which loads the enabled
    // persistent bitmap: these writes mark it.
    qemu_tool(
        "qemu-io",
        &[
            "-c",
            "write -q -P 0xcd 1M 64k",
            "-c",
            "write -q -z 2M 64k",
            "-c",
            "write -q -P 0xef 3136k 128k",
            img_s,
        ],
    );
    let qcow2 = "driver=qcow2,file=file0,node-name=disk";
    start_qsd(dir, &img, &["--blockdev", qcow2], ",bitmaps.0=bitmap0")
}

/// Runs `qemu-storage-daemon` on `img` (in `dir`, which it keeps): the
/// file as node `file0`, then `blockdevs`; exports node `disk` as `disk0`
/// (`export_extra` appended to the export's options).
fn start_qsd(dir: tempfile::TempDir, img: &Path, blockdevs: &[&str], export_extra: &str) -> Qsd {
    let sock = dir.path().join("qsd.sock");
    let log = File::create(dir.path().join("qsd.log")).unwrap();
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=file0",
            img.display()
        ))
        .args(blockdevs)
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg(format!(
            "type=nbd,id=e0,node-name=disk,name=disk0,writable=on{export_extra}"
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-storage-daemon (Debian package {QEMU_PACKAGE}): {e}")
        });
    let mut q = Qsd {
        proc: crate::qemu::testing::Proc(child),
        sock,
        dir,
    };
    wait_for_socket(&mut q);
    q
}

fn wait_for_socket(q: &mut Qsd) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if UnixStream::connect(&q.sock).is_ok() {
            return;
        }
        if let Some(st) = q.proc.0.try_wait().unwrap() {
            panic!("qemu-storage-daemon exited ({st}): {}", q.log());
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not listen within 15 s: {}",
            q.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (offset, len, byte) of the runs written to the image.
const QEMU_WRITES: [(u64, u64, u8); 4] = [
    (0, 64 * KIB, 0xab),
    (MIB, 64 * KIB, 0xcd),
    (2 * MIB, 64 * KIB, 0),
    (3 * MIB + 64 * KIB, 128 * KIB, 0xef),
];

/// The daemon and a client of `disk0` with `base:allocation` and the
/// bitmap's context.
fn qsd_client() -> (Qsd, NbdClient<UnixStream>) {
    let q = qsd();
    let bitmap = dirty_bitmap_context("bitmap0");
    let c = NbdClient::connect_unix(&q.sock, "disk0", &[CONTEXT_ALLOCATION, &bitmap])
        .unwrap_or_else(|e| panic!("{e}; qemu-storage-daemon: {}", q.log()));
    (q, c)
}

fn qemu_model() -> Vec<u8> {
    let mut m = vec![0u8; (4 * MIB) as usize];
    for (off, len, b) in QEMU_WRITES {
        m[off as usize..(off + len) as usize].fill(b);
    }
    m
}

#[test]
fn qemu_reads_equal_what_was_written_and_holes_read_as_zero() {
    let (_qsd, mut c) = qsd_client();
    assert_eq!(c.size(), 4 * MIB);
    let model = qemu_model();
    let mut all = vec![0x55u8; model.len()];
    c.read(0, &mut all).unwrap();
    assert!(
        all == model,
        "whole-disk read differs from what qemu-io wrote"
    );
    // Split in 192 KiB requests that straddle data, zero and hole runs.
    c.limit_requests(192 * KIB as u32, u32::MAX);
    let mut all = vec![0x55u8; model.len()];
    c.read(0, &mut all).unwrap();
    assert!(
        all == model,
        "piecewise read differs from what qemu-io wrote"
    );
    c.disconnect().unwrap();
}

#[test]
fn a_read_above_32_mib_is_split_at_qemus_maximum_block_size() {
    // A sparse 40 MiB raw file with data across the 32 MiB boundary.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.raw");
    let f = File::create(&img).unwrap();
    f.set_len(40 * MIB).unwrap();
    let data = pattern((256 * KIB) as usize, 7);
    let at = 32 * MIB - 128 * KIB;
    std::os::unix::fs::FileExt::write_all_at(&f, &data, at).unwrap();
    drop(f);
    let raw = "driver=raw,file=file0,node-name=disk";
    let q = start_qsd(dir, &img, &["--blockdev", raw], "");
    let mut c = NbdClient::connect_unix(&q.sock, "disk0", &[])
        .unwrap_or_else(|e| panic!("{e}; qemu-storage-daemon: {}", q.log()));
    assert_eq!(c.block_size().2, 32 << 20, "QEMU 7.2 advertises 32 MiB");
    let mut all = vec![0x55u8; (40 * MIB) as usize];
    c.read(0, &mut all).unwrap();
    let at = at as usize;
    assert!(all[..at].iter().all(|&b| b == 0));
    assert!(all[at..at + data.len()] == data[..]);
    assert!(all[at + data.len()..].iter().all(|&b| b == 0));
    c.disconnect().unwrap();
}

#[test]
fn qemu_reports_holes_and_exactly_the_dirty_extents_of_its_bitmap() {
    let (_qsd, mut c) = qsd_client();
    let in_run = |b: u64, runs: &[(u64, u64)]| {
        runs.iter()
            .any(|&(off, len)| (off..off + len).contains(&(b * BS)))
    };
    // QEMU 7.2 reports the zero cluster written with `write -z` as hole +
    // zero, like never-written clusters.
    let data = [
        (0, 64 * KIB),
        (MIB, 64 * KIB),
        (3 * MIB + 64 * KIB, 128 * KIB),
    ];
    let alloc = expected(64, BS, |b| {
        if in_run(b, &data) {
            0
        } else {
            STATE_HOLE | STATE_ZERO
        }
    });
    // Everything written after the bitmap was added, zeroes included.
    let dirty = [
        (MIB, 64 * KIB),
        (2 * MIB, 64 * KIB),
        (3 * MIB + 64 * KIB, 128 * KIB),
    ];
    let dirty = expected(64, BS, |b| if in_run(b, &dirty) { STATE_DIRTY } else { 0 });

    assert_eq!(
        c.block_status(CONTEXT_ALLOCATION, 0, 4 * MIB).unwrap(),
        alloc
    );
    let bitmap = dirty_bitmap_context("bitmap0");
    assert_eq!(c.block_status(&bitmap, 0, 4 * MIB).unwrap(), dirty);
    c.limit_requests(u32::MAX, 320 * KIB as u32);
    assert_eq!(
        c.block_status(CONTEXT_ALLOCATION, 0, 4 * MIB).unwrap(),
        alloc
    );
    assert_eq!(c.block_status(&bitmap, 0, 4 * MIB).unwrap(), dirty);
}

#[test]
fn qemu_names_the_unknown_export_and_the_missing_bitmap() {
    let q = qsd();
    let e = NbdClient::connect_unix(&q.sock, "disk9", &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("'disk9'"), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");
    // QEMU checks the export already in NBD_OPT_SET_META_CONTEXT.
    let e = NbdClient::connect_unix(&q.sock, "disk9", &[CONTEXT_ALLOCATION]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("'disk9'"), "{e}");

    let nope = dirty_bitmap_context("nope");
    let e = NbdClient::connect_unix(&q.sock, "disk0", &[CONTEXT_ALLOCATION, &nope]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("'qemu:dirty-bitmap:nope'"), "{e}");
    // The daemon still serves.
    NbdClient::connect_unix(&q.sock, "disk0", &[]).unwrap();
}

// ---------------------------------------------------------------------
// Servers that are not NBD servers, or misbehave.

#[test]
fn a_listener_that_writes_garbage_is_not_an_nbd_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
    });
    let e = NbdClient::connect_unix(&sock, "disk0", &[]).unwrap_err();
    t.join().unwrap();
    let msg = e.to_string();
    assert!(msg.contains("is not an NBD server"), "{msg}");
    assert!(msg.contains("\"HTTP/1.1\""), "{msg}");
    assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg}");
}

#[test]
fn a_server_that_hangs_up_at_once_is_a_one_line_error() {
    let (client, server) = UnixStream::pair().unwrap();
    drop(server);
    let e = NbdClient::handshake(client, "test", "disk0", &[]).unwrap_err();
    assert!(e.to_string().contains("closed the connection"), "{e}");
}

/// The server side of a scripted conversation.
struct Fake {
    s: UnixStream,
}

impl Fake {
    fn greet(&mut self) {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.s.write_all(&g).unwrap();
        let mut f = [0u8; 4];
        self.s.read_exact(&mut f).unwrap();
        assert_eq!(
            u32::from_be_bytes(f),
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        );
    }

    fn option(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), IHAVEOPT);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
        self.s.read_exact(&mut d).unwrap();
        (opt, d)
    }

    fn reply(&mut self, opt: u32, typ: u32, data: &[u8]) {
        self.s.write_all(&option_reply(opt, typ, data)).unwrap();
    }

    /// Structured replies, `base:allocation` as context 7 if asked, and
    /// a 1 MiB export.
    fn negotiate(&mut self) {
        self.greet();
        loop {
            let (opt, _) = self.option();
            match opt {
                OPT_STRUCTURED_REPLY => self.reply(opt, REP_ACK, &[]),
                OPT_SET_META_CONTEXT => {
                    let mut d = 7u32.to_be_bytes().to_vec();
                    d.extend_from_slice(CONTEXT_ALLOCATION.as_bytes());
                    self.reply(opt, REP_META_CONTEXT, &d);
                    self.reply(opt, REP_ACK, &[]);
                }
                OPT_GO => {
                    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                    d.extend_from_slice(&MIB.to_be_bytes());
                    d.extend_from_slice(&FLAG_HAS_FLAGS.to_be_bytes());
                    self.reply(opt, REP_INFO, &d);
                    self.reply(opt, REP_ACK, &[]);
                    return;
                }
                o => panic!("unexpected option {o}"),
            }
        }
    }

    /// (type, handle, offset, len) of the next request.
    fn request(&mut self) -> (u16, u64, u64, u32) {
        let mut b = [0u8; REQUEST_LEN];
        self.s.read_exact(&mut b).unwrap();
        let r = crate::export::nbd::proto::Request::parse(&b).unwrap();
        (r.typ, r.cookie, r.offset, r.len)
    }

    fn chunk(&mut self, handle: u64, flags: u16, typ: u16, payload: &[u8]) {
        let mut b = chunk_header(handle, flags, typ, payload.len() as u32);
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }
}

/// A client connected to a scripted server running `script` on a thread.
fn fake(
    contexts: &[&str],
    script: impl FnOnce(&mut Fake) + Send + 'static,
) -> (Result<NbdClient<UnixStream>>, JoinHandle<()>) {
    let (client, server) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || script(&mut Fake { s: server }));
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (NbdClient::handshake(client, "fake", "disk0", contexts), t)
}

#[test]
fn refused_structured_replies_fail_the_connection_clearly() {
    let (r, t) = fake(&[], |f| {
        f.greet();
        let (opt, _) = f.option();
        f.reply(opt, REP_ERR_UNSUP, b"not here");
        let (opt, _) = f.option();
        assert_eq!(opt, OPT_ABORT);
    });
    let e = r.unwrap_err();
    t.join().unwrap();
    let msg = e.to_string();
    assert!(msg.contains("refused structured replies"), "{msg}");
    assert!(msg.contains("not here"), "{msg}");
}

#[test]
fn an_oversized_option_reply_is_refused_before_allocating() {
    let (r, t) = fake(&[], |f| {
        f.greet();
        let _ = f.option();
        let mut h = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        h.extend_from_slice(&REP_ACK.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        f.s.write_all(&h).unwrap();
    });
    let e = r.unwrap_err();
    t.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("4294967295 bytes"), "{e}");
}

#[test]
fn a_server_error_chunk_fails_only_that_read_with_its_message() {
    let (r, t) = fake(&[], |f| {
        f.negotiate();
        let (typ, h, off, len) = f.request();
        assert_eq!((typ, off, len), (CMD_READ, 4096, 8192));
        let p = error_payload(NBD_EIO, "disk on fire\nreally");
        f.chunk(h, 0, REPLY_TYPE_ERROR, &p);
        f.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
        // The next read: a hole then data, out of order.
        let (_, h, off, len) = f.request();
        assert_eq!((off, len), (0, 8192));
        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        f.chunk(h, 0, REPLY_TYPE_OFFSET_HOLE, &hole);
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[9u8; 4096]);
        f.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &data);
        let (typ, ..) = f.request();
        assert_eq!(typ, CMD_DISC);
    });
    let mut c = r.unwrap();
    let mut buf = vec![1u8; 8192];
    let e = c.read(4096, &mut buf).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("EIO: disk on fire?really"), "{msg}");
    c.read(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 9));
    assert!(buf[4096..].iter().all(|&b| b == 0));
    drop(c);
    t.join().unwrap();
}

#[test]
fn a_reply_with_a_wrong_handle_or_a_gap_breaks_the_client() {
    let (r, t) = fake(&[], |f| {
        f.negotiate();
        let (_, h, ..) = f.request();
        f.chunk(h + 1, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
    });
    let mut c = r.unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("while waiting for"), "{e}");
    t.join().unwrap();
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");

    let (r, t) = fake(&[], |f| {
        f.negotiate();
        let (_, h, ..) = f.request();
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[9u8; 1024]);
        f.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &data);
    });
    let mut c = r.unwrap();
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("unanswered"), "{e}");
    t.join().unwrap();
}

#[test]
fn partial_block_status_answers_are_asked_again_and_overlong_ones_clipped() {
    let (r, t) = fake(&[CONTEXT_ALLOCATION], |f| {
        f.negotiate();
        // First answer: only 64 KiB of the 1 MiB asked.
        let (typ, h, off, len) = f.request();
        assert_eq!((typ, off, len), (CMD_BLOCK_STATUS, 0, MIB as u32));
        let mut p = 7u32.to_be_bytes().to_vec();
        for (n, fl) in [(4096u32, 0u32), (61440, 3)] {
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&fl.to_be_bytes());
        }
        f.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &p);
        // Second: one extent reaching past the end of the request.
        let (_, h, off, len) = f.request();
        assert_eq!((off, len), (64 * KIB, (MIB - 64 * KIB) as u32));
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(2 * MIB as u32).to_be_bytes());
        p.extend_from_slice(&3u32.to_be_bytes());
        f.chunk(h, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &p);
    });
    let mut c = r.unwrap();
    let got = c.block_status(CONTEXT_ALLOCATION, 0, MIB).unwrap();
    let want = vec![
        Extent {
            offset: 0,
            len: 4096,
            flags: 0,
        },
        Extent {
            offset: 4096,
            len: MIB - 4096,
            flags: 3,
        },
    ];
    assert_eq!(got, want);
    t.join().unwrap();
}

#[test]
fn an_unrequested_or_oversized_block_status_chunk_is_a_violation() {
    let (r, t) = fake(&[CONTEXT_ALLOCATION], |f| {
        f.negotiate();
        let (_, h, ..) = f.request();
        let mut b = chunk_header(h, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, u32::MAX);
        b.extend_from_slice(&7u32.to_be_bytes());
        let _ = f.s.write_all(&b);
    });
    let mut c = r.unwrap();
    let e = c.block_status(CONTEXT_ALLOCATION, 0, MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    t.join().unwrap();
}

#[test]
fn filled_ranges_detect_overlaps_and_gaps() {
    let mut f = Filled::default();
    f.add(100, 50).unwrap();
    f.add(0, 50).unwrap();
    assert!(!f.complete(150));
    assert!(f.add(40, 20).is_err());
    f.add(50, 50).unwrap();
    assert!(f.complete(150));
    assert_eq!(f.runs, [(0, 150)]);
}
