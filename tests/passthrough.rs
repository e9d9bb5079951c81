//! FUSE passthrough (`serve --fuse-passthrough`) on a real mount: a
//! read-only open of a disk whose file holds every byte is read by the
//! kernel from that file, without the daemon; everything else keeps the
//! normal path, and without the option nothing passes through. Reads use
//! O_DIRECT, so a read that did not pass through reaches the daemon (never
//! the page cache) and moves the daemon's own read counter.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;
const BS: usize = 64 << 10;

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    p: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a non-zero size with a valid alignment; freed in Drop
        // with the same layout.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null());
        Aligned { p, len }
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: `p` points at `len` bytes owned by self, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.p, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.p, layout) }
    }
}

fn open_direct(disk: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(disk)
}

/// Reads the whole file in 1 MiB O_DIRECT requests and compares with `model`.
fn read_direct_and_compare(f: &File, model: &[u8], what: &str) {
    let mut a = Aligned::new(MIB);
    for (i, want) in model.chunks(MIB).enumerate() {
        let buf = &mut a.buf()[..want.len()];
        f.read_exact_at(buf, (i * MIB) as u64).unwrap();
        if buf != want {
            let j = (0..want.len()).find(|&j| buf[j] != want[j]).unwrap();
            panic!("{what}: byte {} differs", i * MIB + j);
        }
    }
}

fn counter(env: &Env, vm: &str, name: &str) -> u64 {
    env.disk_status(vm, 0)[name].as_u64().unwrap()
}

/// An environment whose daemon serves with `--fuse-passthrough` (and NBD
/// on a Unix socket, for writes beside a passthrough reader).
fn passthrough_env() -> Env {
    let mut env = Env::new();
    let sock = env.path("nbd.sock");
    env.serve_args = vec![
        "--fuse-passthrough".into(),
        "--nbd".into(),
        format!("unix:{}", sock.display()),
    ];
    env
}

/// Writes `byte` over block `b` of VM `vm`'s disk 0 through NBD (the
/// daemon's own write path) and mirrors it in `model`.
fn nbd_write(env: &Env, vm: &str, b: usize, byte: u8, model: &mut [u8]) {
    let url = format!(
        "nbd+unix:///{vm}/disk0?socket={}",
        env.path("nbd.sock").display()
    );
    let write = format!("write -P {byte:#x} {} {BS}", b * BS);
    tool(&["qemu-io", "-f", "raw", &url, "-c", &write]);
    model[b * BS..(b + 1) * BS].fill(byte);
}

/// The daemon's log lines that say an open was refused for passthrough.
fn refusals(d: &Daemon) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| l.contains("refused (EBUSY)"))
        .map(str::to_string)
        .collect()
}

/// A backed-up random disk of `mib` MiB (every 8th 64 KiB block zeros).
fn backed_up(env: &Env, vm: &str, mib: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; mib * MIB];
    rng.fill(&mut model[..]);
    for b in (0..model.len() / BS).step_by(8) {
        model[b * BS..(b + 1) * BS].fill(0);
    }
    let img = env.path(&format!("{vm}.img"));
    std::fs::write(&img, &model).unwrap();
    env.backup(vm, "64K", &[&img]);
    std::fs::remove_file(&img).unwrap();
    model
}

/// A read-only open that passes through, once the daemon has seen the
/// release of earlier opens (the kernel sends it after `close` returns).
fn passthrough_open(env: &Env, vm: &str, disk: &Path) -> File {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut a = Aligned::new(4096);
    loop {
        let reads = counter(env, vm, "reads");
        let f = open_direct(disk, false).unwrap();
        f.read_exact_at(a.buf(), 0).unwrap();
        if counter(env, vm, "reads") == reads {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "a read-only open never passed through"
        );
        drop(f);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stages the whole disk through a normal (writable) open.
fn stage_all(disk: &Path, model: &[u8]) {
    let f = open_direct(disk, true).unwrap();
    read_direct_and_compare(&f, model, "staging read");
}

#[test]
fn without_the_option_a_read_only_open_of_a_fully_staged_disk_reaches_the_daemon_and_never_blocks_a_writer(
) {
    let env = Env::new();
    let model = backed_up(&env, "vm", 8, 7);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    stage_all(&disk, &model);

    let f = open_direct(&disk, false).unwrap();
    let reads = counter(&env, "vm", "reads");
    read_direct_and_compare(&f, &model, "read-only read");
    assert!(
        counter(&env, "vm", "reads") > reads,
        "a read-only open passed through without --fuse-passthrough"
    );
    assert_eq!(env.disk_status("vm", 0)["passthrough"], false);
    // A writable open beside it opens at once.
    let t = Instant::now();
    let w = open_direct(&disk, true).expect("a writable open beside a reader");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "a writer waited {:?}",
        t.elapsed()
    );
    read_direct_and_compare(&w, &model, "writer's read");
    assert!(refusals(&d).is_empty(), "{:?}", refusals(&d));
}

#[test]
fn a_read_only_open_of_a_fully_staged_disk_passes_through_and_the_daemon_sees_no_read() {
    let env = passthrough_env();
    let mut model = backed_up(&env, "vm", 8, 1);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    stage_all(&disk, &model);
    assert!(
        counter(&env, "vm", "reads") > 0,
        "the staging read passed us"
    );

    let f = passthrough_open(&env, "vm", &disk);
    assert_eq!(env.disk_status("vm", 0)["passthrough"], true);
    let st = env.ok(&["status", "--socket", env.socket.to_str().unwrap()]);
    assert!(
        st.contains("open read-only with FUSE passthrough: writable FUSE opens get EBUSY"),
        "{st}"
    );
    let reads = counter(&env, "vm", "reads");
    read_direct_and_compare(&f, &model, "passthrough read");
    // A second read-only open shares the backing file.
    let g = open_direct(&disk, false).unwrap();
    read_direct_and_compare(&g, &model, "second passthrough read");
    assert_eq!(
        counter(&env, "vm", "reads"),
        reads,
        "read-only reads of a fully staged disk reached the daemon"
    );

    // Writes beside it pass the daemon (NBD), land in the file being read
    // and are tracked as changed.
    assert_eq!(counter(&env, "vm", "blocks_changed"), 0);
    nbd_write(&env, "vm", 9, 0x6B, &mut model);
    assert_eq!(counter(&env, "vm", "blocks_changed"), 1);
    read_direct_and_compare(&f, &model, "passthrough read after an NBD write");
    assert_eq!(counter(&env, "vm", "reads"), reads);

    // The kernel does not mix modes: a writable open is refused meanwhile
    // (after a grace period for releases), never let past changed-block
    // tracking, and the daemon says why in one line.
    let t = Instant::now();
    let err = open_direct(&disk, true).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "refused without grace"
    );
    let lines = refusals(&d);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("open of disk0 of VM vm refused (EBUSY)")
            && lines[0].contains("--fuse-passthrough"),
        "{}",
        lines[0]
    );
    drop((f, g));
    // Right after they are closed (their releases still on the way), a
    // writable open works and its reads pass us.
    let w = open_direct(&disk, true).expect("writable open right after the readers closed");
    read_direct_and_compare(&w, &model, "normal read");
    assert!(counter(&env, "vm", "reads") > reads);
    assert_eq!(env.disk_status("vm", 0)["passthrough"], false);
}

#[test]
fn a_read_only_open_of_a_partly_staged_disk_does_not_pass_through_and_reads_fetch() {
    let env = passthrough_env();
    let model = backed_up(&env, "vm", 8, 2);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    // Stage the first half only.
    let w = open_direct(&disk, true).unwrap();
    read_direct_and_compare(&w, &model[..4 * MIB], "half");
    drop(w);
    let (reads, fetched) = (
        counter(&env, "vm", "reads"),
        counter(&env, "vm", "fetched_blocks"),
    );
    let f = open_direct(&disk, false).unwrap();
    read_direct_and_compare(&f, &model, "read-only read");
    assert!(
        counter(&env, "vm", "reads") > reads,
        "a partly staged disk's reads did not reach the daemon"
    );
    assert!(
        counter(&env, "vm", "fetched_blocks") > fetched,
        "the unstaged half was not fetched"
    );
}

#[test]
fn a_writable_open_never_passes_through_and_its_writes_are_tracked_as_changed() {
    let env = passthrough_env();
    let mut model = backed_up(&env, "vm", 8, 3);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    stage_all(&disk, &model);
    assert_eq!(counter(&env, "vm", "blocks_changed"), 0);

    let w = open_direct(&disk, true).unwrap();
    // A read-only open while a writable one is open takes the normal path.
    let r = open_direct(&disk, false).unwrap();
    let reads = counter(&env, "vm", "reads");
    read_direct_and_compare(&r, &model, "read-only beside a writer");
    assert!(counter(&env, "vm", "reads") > reads, "it passed through");

    let mut a = Aligned::new(BS);
    a.buf().fill(0x5A);
    for b in [3usize, 40, 97] {
        w.write_all_at(a.buf(), (b * BS) as u64).unwrap();
        model[b * BS..(b + 1) * BS].fill(0x5A);
    }
    w.sync_all().unwrap();
    assert_eq!(counter(&env, "vm", "blocks_changed"), 3);
    read_direct_and_compare(&r, &model, "read-only after the writes");
    read_direct_and_compare(&w, &model, "writer after its writes");
    drop((w, r));

    // Passthrough afterwards reads the written bytes (the same file).
    let f = passthrough_open(&env, "vm", &disk);
    let reads = counter(&env, "vm", "reads");
    read_direct_and_compare(&f, &model, "passthrough after writes");
    assert_eq!(counter(&env, "vm", "reads"), reads);
}

#[test]
fn eviction_skips_a_disk_open_with_passthrough_and_takes_it_once_closed() {
    let mut env = passthrough_env();
    env.serve_args
        .extend(["--staging-max".into(), "24M".into()]);
    let a_model = backed_up(&env, "a", 12, 4);
    let b_model = backed_up(&env, "b", 32, 5);
    let _d = env.serve();
    let a = env.recover("a", None)[0].clone();
    stage_all(&a, &a_model);
    let pt = passthrough_open(&env, "a", &a);
    let reads = counter(&env, "a", "reads");

    // Reading all of b (more than the limit) needs room: only b's own
    // blocks may go while a is open with passthrough.
    let b = env.recover("b", None)[0].clone();
    let fb = open_direct(&b, false).unwrap();
    read_direct_and_compare(&fb, &b_model, "b under pressure");
    assert!(
        counter(&env, "b", "evicted_blocks") > 0,
        "reading b caused no eviction: the test proves nothing"
    );
    assert_eq!(counter(&env, "a", "evicted_blocks"), 0, "a lost blocks");
    read_direct_and_compare(&pt, &a_model, "a through passthrough after b");
    assert_eq!(counter(&env, "a", "reads"), reads, "a's reads reached us");
    drop(pt);

    // Closed, a's blocks are fair game again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(&env, "a", "evicted_blocks") == 0 {
        assert!(Instant::now() < deadline, "a was never evicted once closed");
        read_direct_and_compare(&fb, &b_model, "b again");
    }
}

fn relocate(env: &Env, to: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "relocate",
        "--socket",
        env.socket.to_str().unwrap(),
        "vm",
        "--to",
        to.to_str().unwrap(),
    ];
    args.extend(extra);
    env.run(&args)
}

#[test]
fn relocation_is_refused_under_a_passthrough_open_and_after_cutover_passthrough_reads_the_target_and_writes_stay_tracked(
) {
    let env = passthrough_env();
    let mut model = backed_up(&env, "vm", 8, 6);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    stage_all(&disk, &model);
    let primary = env.path("primary");
    std::fs::create_dir_all(&primary).unwrap();
    std::fs::set_permissions(&primary, std::fs::Permissions::from_mode(0o755)).unwrap();

    let pt = passthrough_open(&env, "vm", &disk);
    let o = relocate(&env, &primary, &["--wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "relocation started under a passthrough open"
    );
    assert!(err.contains("FUSE passthrough"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    drop(pt);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = relocate(&env, &primary, &["--wait"]);
        if o.status.success() {
            break;
        }
        // The passthrough open's release may not have reached us yet.
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("FUSE passthrough") && Instant::now() < deadline,
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A write after cutover lands in the target, tracked as changed.
    let w = open_direct(&disk, true).unwrap();
    let mut a = Aligned::new(BS);
    a.buf().fill(0xC3);
    w.write_all_at(a.buf(), 5 * BS as u64).unwrap();
    model[5 * BS..6 * BS].fill(0xC3);
    w.sync_all().unwrap();
    drop(w);
    assert_eq!(counter(&env, "vm", "blocks_changed"), 1);
    let target = primary.join("vm/disk0.raw");
    assert!(std::fs::read(&target).unwrap() == model, "target differs");

    let f = passthrough_open(&env, "vm", &disk);
    let reads = counter(&env, "vm", "reads");
    read_direct_and_compare(&f, &model, "passthrough to the target");
    // A write beside the reader goes through the daemon into the target:
    // tracked as changed, and the reader sees it.
    nbd_write(&env, "vm", 6, 0x3C, &mut model);
    assert_eq!(counter(&env, "vm", "blocks_changed"), 2);
    read_direct_and_compare(&f, &model, "passthrough to the target after an NBD write");
    assert_eq!(counter(&env, "vm", "reads"), reads);
    assert!(std::fs::read(&target).unwrap() == model, "target differs");
    drop(f);
    // The staging file is no longer what is read: wipe it and read again.
    let data = std::fs::read_dir(env.staging.join("sessions/vm"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("disk0.data");
    OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .write_all_at(&vec![0xEEu8; 8 * MIB], 0)
        .unwrap();
    let f = passthrough_open(&env, "vm", &disk);
    read_direct_and_compare(&f, &model, "passthrough after staging was overwritten");
}
