//! The NBD server against a strict test client: here every command and
//! its limits; the handshake and options in `handshake`; concurrency,
//! lifecycle and listeners in `concurrency`; reads answered later in
//! `later`; and in `tools` against real clients: libnbd's nbdinfo/nbdcopy
//! and qemu-img/qemu-io.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::proto::*;
use super::*;
use crate::disk::{Extent, ExtentFlags, MemDisk};
use crate::export::loopback_only;
use client::{raw_tcp, read_greeting, Client, Reply};

mod client;
mod concurrency;
mod handshake;
mod later;
mod tools;

const BS: u64 = 64 << 10;
const SIZE: u64 = 4 << 20;
const EXPORT: &str = "mem/disk0";

/// A disk around a `MemDisk` that counts calls, can slow its reads down
/// or fail every call, and reports chosen written blocks as unchanged
/// (data that came from the backup).
struct Probe {
    inner: Arc<MemDisk>,
    calls: AtomicUsize,
    flushes: AtomicUsize,
    write_ats: AtomicUsize,
    write_zeroes: AtomicUsize,
    discards: AtomicUsize,
    block_statuses: AtomicUsize,
    read_delay: Mutex<Duration>,
    reads_now: AtomicUsize,
    reads_max: AtomicUsize,
    fail: Mutex<Option<Error>>,
    from_backup: Mutex<HashSet<u64>>,
    /// Answer reads within a block later, from a thread of its own after
    /// `read_delay`, like a volume's fetch (`Disk::read_later`).
    later: std::sync::atomic::AtomicBool,
    read_ats: AtomicUsize,
}

impl Probe {
    fn new(size: u64) -> Arc<Probe> {
        Arc::new(Probe {
            inner: MemDisk::new(EXPORT, size, BS),
            calls: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            write_ats: AtomicUsize::new(0),
            write_zeroes: AtomicUsize::new(0),
            discards: AtomicUsize::new(0),
            block_statuses: AtomicUsize::new(0),
            read_delay: Mutex::new(Duration::ZERO),
            reads_now: AtomicUsize::new(0),
            reads_max: AtomicUsize::new(0),
            fail: Mutex::new(None),
            from_backup: Mutex::new(HashSet::new()),
            later: std::sync::atomic::AtomicBool::new(false),
            read_ats: AtomicUsize::new(0),
        })
    }

    fn enter(&self) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &*self.fail.lock().unwrap() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl Disk for Probe {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u64 {
        BS
    }
    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        self.enter()?;
        self.read_ats.fetch_add(1, Ordering::SeqCst);
        let now = self.reads_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.reads_max.fetch_max(now, Ordering::SeqCst);
        let delay = *self.read_delay.lock().unwrap();
        std::thread::sleep(delay);
        self.reads_now.fetch_sub(1, Ordering::SeqCst);
        self.inner.read_at(off, len)
    }
    fn read_later(
        &self,
        off: u64,
        len: usize,
        done: crate::disk::ReadDone,
        _spawn: &crate::disk::Spawner,
    ) -> std::result::Result<(), crate::disk::ReadDone> {
        let within = len > 0 && off / BS == (off + len as u64 - 1) / BS;
        if !self.later.load(Ordering::SeqCst) || !within {
            return Err(done);
        }
        let r = self.enter().and_then(|()| self.inner.read_at(off, len));
        let delay = *self.read_delay.lock().unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            done(r.map(bytes::Bytes::from))
        });
        Ok(())
    }
    fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        self.enter()?;
        self.write_ats.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(off, data)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.enter()?;
        self.write_zeroes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_zeroes(off, len)
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.enter()?;
        self.discards.fetch_add(1, Ordering::SeqCst);
        self.inner.discard(off, len)
    }
    fn flush(&self) -> Result<()> {
        self.enter()?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.enter()?;
        self.block_statuses.fetch_add(1, Ordering::SeqCst);
        let backup = self.from_backup.lock().unwrap().clone();
        let size = self.inner.size();
        Ok(crate::disk::extents(size, BS, off, len, |b| {
            let mut f = self.inner.block_status(b * BS, 1).unwrap()[0].flags;
            if backup.contains(&b) {
                f.changed = false;
            }
            f
        }))
    }
}

/// Exports for the tests, counting the guards alive.
struct TestExports {
    disks: Vec<(String, String, Arc<dyn Disk>)>,
    guards: Arc<AtomicUsize>,
}

struct Guard(Arc<AtomicUsize>);

impl crate::export::nbd::OpenGuard for Guard {}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Exports for TestExports {
    fn list(&self) -> Vec<(String, String)> {
        self.disks
            .iter()
            .map(|(n, d, _)| (n.clone(), d.clone()))
            .collect()
    }

    fn open(&self, name: &str) -> Result<(Arc<dyn Disk>, Box<dyn crate::export::nbd::OpenGuard>)> {
        let (_, _, disk) = self
            .disks
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| Error::not_found(format!("no export {name}")))?;
        self.guards.fetch_add(1, Ordering::SeqCst);
        Ok((disk.clone(), Box::new(Guard(self.guards.clone()))))
    }
}

/// A server on 127.0.0.1:0 (plus any other listeners) with its runtime;
/// shut down when dropped, whatever the test did.
struct Harness {
    server: Option<NbdServer>,
    addr: SocketAddr,
    guards: Arc<AtomicUsize>,
    // Dropped last: the server's tasks run on it.
    rt: tokio::runtime::Runtime,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn serve(disks: Vec<(&str, Arc<dyn Disk>)>, more: &[Listen]) -> Harness {
    let rt = runtime();
    let guards = Arc::new(AtomicUsize::new(0));
    let exports = Arc::new(TestExports {
        disks: disks
            .into_iter()
            .map(|(n, d)| (n.to_string(), format!("{n}, a test disk"), d))
            .collect(),
        guards: guards.clone(),
    });
    let mut listen = vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())];
    listen.extend_from_slice(more);
    let server = NbdServer::start(rt.handle(), &listen, exports, &loopback_only()).unwrap();
    let addr = server.tcp_addrs()[0];
    Harness {
        server: Some(server),
        addr,
        guards,
        rt,
    }
}

fn serve_one(disk: Arc<dyn Disk>) -> Harness {
    serve(vec![(EXPORT, disk)], &[])
}

impl Harness {
    fn client(&self) -> Client {
        Client::tcp(self.addr)
    }

    /// A client in transmission on `name` with structured replies and
    /// both metadata contexts.
    fn open(&self, name: &str) -> Client {
        let mut c = self.client();
        c.structured_replies();
        c.set_meta(name, &[CONTEXT_ALLOCATION, CONTEXT_CHANGED]);
        c.go(name).unwrap();
        c
    }

    fn guards(&self) -> usize {
        self.guards.load(Ordering::SeqCst)
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// The disk the block status and tool tests share: blocks 0-3 data (0 and
/// 1 from the backup, 2 and 3 changed by the guest), block 10 zeroed by the
/// guest, the rest never written (holes). Returns its bytes.
fn lay_out(p: &Probe) -> Vec<u8> {
    let data = random(4 * BS as usize, 7);
    p.inner.write_at(0, &data).unwrap();
    p.inner.write_zeroes(10 * BS, BS).unwrap();
    p.from_backup.lock().unwrap().extend([0, 1]);
    let mut image = vec![0u8; p.size() as usize];
    image[..data.len()].copy_from_slice(&data);
    image
}

const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

// ---- commands ----

#[test]
fn reads_and_writes_round_trip_at_odd_offsets_and_lengths_in_both_reply_styles() {
    let p = Probe::new(SIZE);
    let h = serve_one(p.clone());
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for structured in [false, true] {
        let mut c = h.client();
        if structured {
            c.structured_replies();
        }
        c.go(EXPORT).unwrap();
        for i in 0..60 {
            let off = rng.gen_range(0..SIZE - 1);
            let len = rng.gen_range(1..=(SIZE - off).min(300_000)) as usize;
            let data = random(len, i);
            let r = c.write(off, &data, 0);
            assert_eq!(r.error, 0);
            model[off as usize..off as usize + len].copy_from_slice(&data);
            let roff = rng.gen_range(0..SIZE - 1);
            let rlen = rng.gen_range(1..=(SIZE - roff).min(500_000)) as u32;
            assert!(
                c.read(roff, rlen) == model[roff as usize..roff as usize + rlen as usize],
                "read {roff}+{rlen} differs"
            );
        }
        assert!(c.read(0, SIZE as u32) == model, "whole disk differs");
        assert_eq!(c.read(SIZE, 0), Vec::<u8>::new(), "empty read at the end");
    }
    assert!(p.inner.read_at(0, SIZE as usize).unwrap() == model);
}

#[test]
fn a_structured_read_sends_holes_as_hole_chunks_unless_dont_fragment() {
    let p = Probe::new(SIZE);
    let image = lay_out(&p);
    let h = serve_one(p);
    let mut c = h.open(EXPORT);
    let r = c.call(CMD_READ, 0, 1000, (1 << 20) - 1000, &[]);
    assert_eq!(r.error, 0);
    assert!(r.structured);
    assert!(r.data == image[1000..1 << 20]);
    // Blocks 4..10 never written; block 10 written (zeros, but data).
    assert_eq!(
        r.holes,
        vec![(4 * BS, (6 * BS) as u32), (11 * BS, (5 * BS) as u32)]
    );
    assert_eq!(r.data_chunks, 2);
    let r = c.call(CMD_READ, CMD_FLAG_DF, 1000, (1 << 20) - 1000, &[]);
    assert!(r.data == image[1000..1 << 20]);
    assert_eq!((r.holes.len(), r.data_chunks), (0, 1));
}

#[test]
fn fua_and_flush_reach_disk_flush() {
    let p = Probe::new(SIZE);
    let h = serve_one(p.clone());
    let mut c = h.open(EXPORT);
    assert_eq!(c.write(0, b"abc", 0).error, 0);
    assert_eq!(p.flushes(), 0, "a write without FUA does not flush");
    assert_eq!(c.write(0, b"abc", CMD_FLAG_FUA).error, 0);
    assert_eq!(p.flushes(), 1);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    assert_eq!(p.flushes(), 2);
    assert_eq!(c.call(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 0, 10, &[]).error, 0);
    assert_eq!(p.flushes(), 3);
    assert_eq!(c.call(CMD_TRIM, CMD_FLAG_FUA, 0, BS as u32, &[]).error, 0);
    assert_eq!(p.flushes(), 4);
    // FUA must be accepted on any command, even one that writes nothing.
    assert_eq!(c.call(CMD_READ, CMD_FLAG_FUA, 0, 10, &[]).error, 0);
}

#[test]
fn write_zeroes_punches_through_write_zeroes_and_with_no_hole_writes_zero_bytes() {
    let p = Probe::new(SIZE);
    p.inner.write_at(0, &vec![0xaa; SIZE as usize]).unwrap();
    let h = serve_one(p.clone());
    let mut c = h.open(EXPORT);

    let r = c.call(CMD_WRITE_ZEROES, 0, 1000, 100_000, &[]);
    assert_eq!(r.error, 0);
    assert_eq!(p.write_zeroes.load(Ordering::SeqCst), 1);
    assert_eq!(p.write_ats.load(Ordering::SeqCst), 0);

    let len = (2 << 20) + 12345;
    let r = c.call(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 200_000, len, &[]);
    assert_eq!(r.error, 0);
    assert_eq!(
        p.write_zeroes.load(Ordering::SeqCst),
        1,
        "NO_HOLE never punches"
    );
    assert_eq!(
        p.write_ats.load(Ordering::SeqCst),
        3,
        "zeros written in 1 MiB pieces"
    );

    let got = c.read(0, SIZE as u32);
    for (i, b) in got.iter().enumerate() {
        let i = i as u64;
        let zero = (1000..101_000).contains(&i) || (200_000..200_000 + len as u64).contains(&i);
        assert_eq!(*b, if zero { 0 } else { 0xaa }, "byte {i}");
    }
    // FAST_ZERO is not advertised: refused.
    let r = c.call(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 10, &[]);
    assert_eq!(r.error, NBD_EINVAL);
}

#[test]
fn trim_discards_the_whole_blocks_in_its_range() {
    let p = Probe::new(SIZE);
    p.inner.write_at(0, &vec![0xaa; 3 * BS as usize]).unwrap();
    let h = serve_one(p.clone());
    let mut c = h.open(EXPORT);
    let r = c.call(CMD_TRIM, 0, BS / 2, (2 * BS) as u32, &[]);
    assert_eq!(r.error, 0);
    assert_eq!(p.discards.load(Ordering::SeqCst), 1);
    let got = c.read(0, (3 * BS) as u32);
    assert!(got[..BS as usize].iter().all(|&b| b == 0xaa));
    assert!(got[BS as usize..2 * BS as usize].iter().all(|&b| b == 0));
    assert!(got[2 * BS as usize..].iter().all(|&b| b == 0xaa));
}

#[test]
fn block_status_reports_both_contexts_and_one_extent_with_req_one() {
    let p = Probe::new(SIZE);
    lay_out(&p);
    let h = serve_one(p);
    let mut c = h.open(EXPORT);
    let r = c.call(CMD_BLOCK_STATUS, 0, 0, SIZE as u32, &[]);
    assert_eq!(r.error, 0);
    let (b, m) = (BS as u32, 1u32 << 20);
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        r.status,
        vec![
            (
                ALLOCATION_ID,
                vec![(4 * b, 0), (6 * b, hz), (b, 0), (4 * m - 11 * b, hz)]
            ),
            (
                CHANGED_ID,
                vec![
                    (2 * b, 0),
                    (2 * b, 1),
                    (6 * b, 0),
                    (b, 1),
                    (4 * m - 11 * b, 0)
                ]
            ),
        ]
    );
    // Mid-extent, unaligned, REQ_ONE: one descriptor per context, no
    // longer than asked.
    let r = c.call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, BS + 7, 10 * b, &[]);
    assert_eq!(
        r.status,
        vec![
            (ALLOCATION_ID, vec![(3 * b - 7, 0)]),
            (CHANGED_ID, vec![(b - 7, 0)])
        ]
    );
    let r = c.call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5 * BS, 100, &[]);
    assert_eq!(
        r.status,
        vec![
            (ALLOCATION_ID, vec![(100, hz)]),
            (CHANGED_ID, vec![(100, 0)])
        ]
    );
}

#[test]
fn block_status_answers_only_the_selected_contexts_and_needs_one() {
    let p = Probe::new(SIZE);
    lay_out(&p);
    let h = serve_one(p);
    let mut c = h.client();
    c.structured_replies();
    c.set_meta(EXPORT, &[CONTEXT_CHANGED]);
    c.go(EXPORT).unwrap();
    let r = c.call(CMD_BLOCK_STATUS, 0, 0, (4 * BS) as u32, &[]);
    assert_eq!(
        r.status,
        vec![(CHANGED_ID, vec![(2 * BS as u32, 0), (2 * BS as u32, 1)])]
    );

    let mut c = h.client();
    c.structured_replies();
    c.go(EXPORT).unwrap();
    let r = c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]);
    assert_eq!(r.error, NBD_EINVAL);

    // Contexts set for another export do not carry over.
    let h = serve(
        vec![("a/disk0", Probe::new(SIZE)), ("b/disk0", Probe::new(SIZE))],
        &[],
    );
    let mut c = h.client();
    c.structured_replies();
    c.set_meta("a/disk0", &[CONTEXT_ALLOCATION]);
    c.go("b/disk0").unwrap();
    assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]).error, NBD_EINVAL);
}

/// A disk of many terabytes whose stripes of `blocks` 4 KiB blocks
/// alternate between data and hole, remembering the longest range it was
/// asked about.
struct Striped {
    longest: AtomicUsize,
    blocks: u64,
}

impl Disk for Striped {
    fn describe(&self) -> String {
        "striped".into()
    }
    fn size(&self) -> u64 {
        1 << 40
    }
    fn block_size(&self) -> u64 {
        4096
    }
    fn read_at(&self, _: u64, len: usize) -> Result<Vec<u8>> {
        Ok(vec![0; len])
    }
    fn write_at(&self, _: u64, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn epoch(&self) -> u64 {
        1
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.longest.fetch_max(len as usize, Ordering::SeqCst);
        Ok(crate::disk::extents(self.size(), 4096, off, len, |b| {
            let hole = (b / self.blocks) % 2 == 1;
            ExtentFlags {
                hole,
                zero: hole,
                staged: false,
                changed: !hole,
            }
        }))
    }
}

/// A whole-export block status of a disk striped every `blocks` 4 KiB
/// blocks; checks it succeeded and never asked the disk for more than
/// `MAX_STATUS_QUERY` at once.
fn block_status_of_stripes(blocks: u64) -> Reply {
    let d = Arc::new(Striped {
        longest: AtomicUsize::new(0),
        blocks,
    });
    let h = serve_one(d.clone());
    let mut c = h.open(EXPORT);
    let r = c.call(CMD_BLOCK_STATUS, 0, 0, u32::MAX, &[]);
    assert_eq!(r.error, 0);
    assert!(d.longest.load(Ordering::SeqCst) as u64 <= transmission::extents::MAX_STATUS_QUERY);
    r
}

#[test]
fn block_status_bounds_the_range_it_queries_and_the_extents_it_returns() {
    let r = block_status_of_stripes(1);
    for (_, descriptors) in &r.status {
        assert_eq!(descriptors.len(), transmission::extents::MAX_EXTENTS);
        let covered: u64 = descriptors.iter().map(|(l, _)| *l as u64).sum();
        assert_eq!(covered, transmission::extents::MAX_EXTENTS as u64 * 4096);
    }
}

#[test]
fn block_status_of_a_sparse_range_answers_a_whole_4_gib_request_in_one_reply() {
    // Stripes of 8 GiB: the whole request is one extent per context, found
    // by asking the disk a bounded piece at a time.
    let r = block_status_of_stripes(2 << 20);
    for (_, descriptors) in &r.status {
        assert_eq!(descriptors, &[(u32::MAX, descriptors[0].1)]);
    }
}

#[test]
fn out_of_range_requests_fail_without_touching_the_disk() {
    let p = Probe::new(SIZE);
    let h = serve_one(p.clone());
    let mut structured = h.open(EXPORT);
    let mut simple = h.client();
    simple.go(EXPORT).unwrap();
    let before = p.calls();
    let cases = [
        (CMD_READ, SIZE - 10, 20, NBD_EINVAL),
        (CMD_READ, u64::MAX - 5, 10, NBD_EINVAL),
        (CMD_WRITE, SIZE - 10, 20, NBD_ENOSPC),
        (CMD_WRITE_ZEROES, SIZE, 1, NBD_ENOSPC),
        (CMD_TRIM, SIZE + 4096, 4096, NBD_EINVAL),
        (CMD_BLOCK_STATUS, SIZE - 1, 2, NBD_EINVAL),
    ];
    for (typ, off, len, errno) in cases {
        let data = if typ == CMD_WRITE {
            vec![1u8; len as usize]
        } else {
            vec![]
        };
        let r = structured.call(typ, 0, off, len, &data);
        assert_eq!(r.error, errno, "structured command {typ} at {off}+{len}");
        assert!(r.message.contains("past the end"), "{}", r.message);
        if typ != CMD_BLOCK_STATUS {
            let r = simple.call(typ, 0, off, len, &data);
            assert_eq!(r.error, errno, "simple command {typ} at {off}+{len}");
            assert!(r.data.is_empty());
        }
    }
    assert_eq!(p.calls(), before, "the disk was called");
    // Unknown commands and flags are invalid, and the connection goes on.
    assert_eq!(structured.call(99, 0, 0, 0, &[]).error, NBD_EINVAL);
    assert_eq!(
        structured
            .call(CMD_FLUSH, CMD_FLAG_NO_HOLE, 0, 0, &[])
            .error,
        NBD_EINVAL
    );
    assert_eq!(
        simple.call(CMD_READ, CMD_FLAG_DF, 0, 1, &[]).error,
        NBD_EINVAL
    );
    assert_eq!(structured.read(0, 3), vec![0; 3]);
}

#[test]
fn disk_errors_reach_the_client_with_their_errno_and_message() {
    let p = Probe::new(SIZE);
    let h = serve_one(p.clone());
    let mut c = h.open(EXPORT);
    let mut simple = h.client();
    simple.go(EXPORT).unwrap();
    *p.fail.lock().unwrap() = Some(Error::corrupt("chunk abc failed verification"));
    let r = c.call(CMD_READ, 0, 4096, 4096, &[]);
    assert_eq!(r.error, NBD_EIO);
    assert_eq!(r.error_offset, Some(4096));
    assert!(r.message.contains("chunk abc"), "{}", r.message);
    let r = simple.call(CMD_READ, 0, 4096, 4096, &[]);
    assert_eq!((r.error, r.data.len()), (NBD_EIO, 0));
    *p.fail.lock().unwrap() = Some(Error::io(
        "staging write",
        std::io::Error::from_raw_os_error(libc::EDQUOT),
    ));
    assert_eq!(c.write(0, b"x", 0).error, NBD_ENOSPC);
    *p.fail.lock().unwrap() = Some(Error::not_permitted("released"));
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, NBD_EPERM);
    *p.fail.lock().unwrap() = None;
    assert_eq!(c.read(0, 1), vec![0]);
}

#[test]
fn errnos_map_onto_the_values_nbd_allows() {
    let os = |n| Error::io("x", std::io::Error::from_raw_os_error(n));
    assert_eq!(nbd_errno(&Error::corrupt("x")), NBD_EIO);
    assert_eq!(nbd_errno(&Error::not_found("x")), NBD_EIO);
    assert_eq!(nbd_errno(&Error::invalid("x")), NBD_EINVAL);
    assert_eq!(nbd_errno(&Error::not_permitted("x")), NBD_EPERM);
    assert_eq!(nbd_errno(&os(libc::ENOSPC)), NBD_ENOSPC);
    assert_eq!(nbd_errno(&os(libc::EFBIG)), NBD_ENOSPC);
    assert_eq!(nbd_errno(&os(libc::ENOMEM)), NBD_ENOMEM);
    assert_eq!(nbd_errno(&os(libc::EOVERFLOW)), NBD_EOVERFLOW);
    assert_eq!(nbd_errno(&os(libc::EOPNOTSUPP)), NBD_ENOTSUP);
    assert_eq!(nbd_errno(&os(libc::ESHUTDOWN)), NBD_ESHUTDOWN);
    assert_eq!(nbd_errno(&os(libc::EROFS)), NBD_EPERM);
    assert_eq!(nbd_errno(&os(libc::ETIMEDOUT)), NBD_EIO);
}

#[test]
fn a_request_longer_than_the_maximum_payload_ends_the_connection() {
    let p = Probe::new(SIZE);
    let h = serve_one(p.clone());
    for typ in [CMD_WRITE, CMD_READ] {
        let mut c = h.open(EXPORT);
        // Only the header: the server must not wait for (or allocate) the
        // payload.
        c.send(typ, 0, 0, MAX_PAYLOAD + 1, &[]);
        assert!(c.closed(), "command {typ}");
    }
    let mut c = h.open(EXPORT);
    let mut b = 0x1234_5678u32.to_be_bytes().to_vec();
    b.extend_from_slice(&[0; 24]);
    c.stream().write_all(&b).unwrap();
    assert!(c.closed(), "bad request magic");
    wait_until("every guard is dropped", || h.guards() == 0);
    assert_eq!(p.calls(), 0);

    // The largest allowed payload is fine, both ways.
    let h = serve_one(Probe::new(MAX_PAYLOAD as u64));
    let mut c = h.open(EXPORT);
    let big: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(0, &big, 0).error, 0);
    assert!(c.read(0, MAX_PAYLOAD) == big);
}
