//! Large sparse disks end to end (issue 16's large-disk target): the
//! backup reads only the data extents, `recover` makes the disk visible
//! within a second, the data reads back through FUSE, and the daemon's
//! resident memory stays within 64 MiB + 8 MiB per TiB under recovery.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::*;
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// A field of /proc/PID/status, in bytes (`VmRSS`, `VmHWM`).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn a_sparse_1_tib_disk_backs_up_its_data_only_recovers_within_a_second_and_the_daemon_stays_under_64_mib_plus_8_per_tib(
) {
    let env = Env::new();
    let img = env.path("big.raw");
    // Data at the start, unaligned in the middle (9 chunks), at the end.
    let pieces = [
        (0, 4 * MIB),
        (300 * GIB + 12345, 8 * MIB),
        (TIB - 3 * MIB, 3 * MIB),
    ];
    let data = sparse_image(&img, TIB, &pieces, 16);

    // Only the 16 chunks overlapping data are read: reading 1 TiB of
    // holes would take many minutes.
    let o = env.run(&[
        "backup",
        "--repo",
        env.repo_str(),
        "--vm",
        "big",
        "--chunk-size",
        "1M",
        img.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1048560 zero; 16.0 MiB read"),
        "not only the data chunks were read: {err}"
    );
    std::fs::remove_file(&img).unwrap();

    let daemon = env.serve();
    let t = Instant::now();
    let disks = env.recover("big", None);
    let visible = t.elapsed();
    assert_eq!(std::fs::metadata(&disks[0]).unwrap().len(), TIB);
    assert!(
        visible <= Duration::from_secs(1),
        "recover took {visible:?} to make the disk visible"
    );

    let disk = std::fs::File::open(&disks[0]).unwrap();
    // The pieces at once: fetches on many workers.
    std::thread::scope(|s| {
        for (&(off, len), want) in pieces.iter().zip(&data) {
            let disk = &disk;
            s.spawn(move || {
                let mut got = vec![0u8; len as usize];
                disk.read_exact_at(&mut got, off).unwrap();
                assert!(got == *want, "data at {off} reads back wrong");
            });
        }
    });
    let mut hole = vec![1u8; MIB as usize];
    disk.read_exact_at(&mut hole, 700 * GIB + 4096).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "a hole reads as zeros");
    let st = env.disk_status("big", 0);
    assert_eq!(st["zero_blocks"], 1048560);

    // The target's own formula: 64 MiB + 8 MiB per TiB under recovery.
    let limit = 64 * MIB + 8 * MIB;
    let (rss, hwm) = (
        proc_status_bytes(daemon.pid(), "VmRSS"),
        proc_status_bytes(daemon.pid(), "VmHWM"),
    );
    eprintln!(
        "1 TiB sparse: recover {visible:?}, daemon VmRSS {} KiB, VmHWM {} KiB (limit {} KiB)",
        rss >> 10,
        hwm >> 10,
        limit >> 10
    );
    assert!(rss <= limit, "daemon VmRSS {rss} > {limit}");
    assert!(hwm <= limit, "daemon VmHWM {hwm} > {limit}");
    drop(disk);
    drop(daemon);
}

/// A sparse image of `size` with random data at `pieces`; returns the data.
fn sparse_image(
    path: &std::path::Path,
    size: u64,
    pieces: &[(u64, u64)],
    seed: u64,
) -> Vec<Vec<u8>> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data = pieces
        .iter()
        .map(|&(off, len)| {
            let mut b = vec![0u8; len as usize];
            rng.fill_bytes(&mut b);
            f.write_all_at(&b, off).unwrap();
            b
        })
        .collect();
    f.sync_all().unwrap();
    data
}

#[test]
fn a_sparse_4_tib_disk_relocates_in_seconds_with_bounded_memory_and_the_target_matches_the_image() {
    const SIZE: u64 = 4 * TIB;
    let env = Env::new();
    let img = env.path("big.raw");
    let pieces = [(0, 2 * MIB), (1500 * GIB + 777, 3 * MIB), (SIZE - MIB, MIB)];
    let data = sparse_image(&img, SIZE, &pieces, 17);
    env.backup("big", "1M", &[&img]);
    let daemon = env.serve();
    let disk = env.recover("big", None).remove(0);
    // A guest write into a hole: copied as data, not as a hole.
    let written = 3 * TIB + 5;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(b"written into a hole", written)
        .unwrap();
    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();

    let t = Instant::now();
    let o = env.run(&[
        "relocate",
        "--socket",
        env.socket.to_str().unwrap(),
        "big",
        "--to",
        primary.to_str().unwrap(),
        "--wait",
    ]);
    let took = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let hwm = proc_status_bytes(daemon.pid(), "VmHWM");
    let limit = 64 * MIB + 8 * MIB * (SIZE / TIB);
    eprintln!(
        "4 TiB sparse: relocation took {took:?}, daemon VmHWM {} KiB (limit {} KiB)",
        hwm >> 10,
        limit >> 10
    );
    // Block by block (4 million commits of the whole copied map) this took
    // hours; by runs it is a few commits. Generous for a busy machine.
    assert!(took <= Duration::from_secs(60), "relocation took {took:?}");
    assert!(hwm <= limit, "daemon VmHWM {hwm} > {limit}");

    let target = primary.join("big/disk0.raw");
    let t = std::fs::File::open(&target).unwrap();
    let meta = t.metadata().unwrap();
    assert_eq!(meta.len(), SIZE);
    // Holes stay holes: only the data (and the written block) is allocated.
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 <= 16 * MIB,
        "the target is not sparse: {} bytes allocated",
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512
    );
    for (&(off, len), want) in pieces.iter().zip(&data) {
        let mut got = vec![0u8; len as usize];
        t.read_exact_at(&mut got, off).unwrap();
        assert!(got == *want, "the data at {off} differs on the target");
    }
    let mut got = vec![0u8; 19];
    t.read_exact_at(&mut got, written).unwrap();
    assert_eq!(got, b"written into a hole");
    // The whole disk, as QEMU compares images (holes by block status).
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(b"written into a hole", written)
        .unwrap();
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .args([&img, &target])
        .output()
        .expect("qemu-img is installed");
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    drop(t);
    drop(daemon);
}

/// `nbdinfo --map` of a whole disk: its lines as (offset, length, kind).
fn nbd_map(url: &str) -> (Vec<(u64, u64, String)>, Duration) {
    let t = Instant::now();
    let o = std::process::Command::new("nbdinfo")
        .args(["--map", url])
        .output()
        .expect("nbdinfo is installed (Debian libnbd-bin)");
    let took = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect();
    (lines, took)
}

#[test]
fn nbd_block_status_maps_a_sparse_10_tib_disk_of_64k_blocks_within_seconds_and_tells_data_from_holes(
) {
    const SIZE: u64 = 10 * TIB;
    let mut env = Env::new();
    let addr = format!("{}:10809", common::nfs::own_loopback());
    env.serve_args = vec!["--nbd".into(), addr.clone()];
    let img = env.path("big.raw");
    // Chunk-aligned data: at the start, in the middle, at the end.
    let pieces = [(0, 2 * MIB), (6 * TIB, 3 * MIB), (SIZE - MIB, MIB)];
    sparse_image(&img, SIZE, &pieces, 18);
    // 64 KiB chunks: 168 million blocks, which a block-by-block walk feels.
    env.backup("big", "64K", &[&img]);
    std::fs::remove_file(&img).unwrap();
    let _daemon = env.serve();
    env.recover("big", None);
    let url = format!("nbd://{addr}/big/disk0");

    let (map, took) = nbd_map(&url);
    eprintln!(
        "nbdinfo --map of a sparse 10 TiB disk: {took:?}, {} extents",
        map.len()
    );
    let mut pos = 0;
    let mut data = vec![];
    for (off, len, kind) in &map {
        assert_eq!(*off, pos, "the map tiles the disk");
        pos += len;
        if kind != "hole,zero" {
            assert_eq!(kind, "data", "{map:?}");
            match data.last_mut() {
                Some((o, l)) if *o + *l == *off => *l += len,
                _ => data.push((*off, *len)),
            }
        }
    }
    assert_eq!(pos, SIZE);
    assert_eq!(data, pieces, "the data extents are the backup's");
    // Debug build, 2 cores: the block-by-block walk (1 GiB a request) took
    // 19.4 s; by runs, 4 GiB a request, 0.43-0.51 s. Generous for a busy
    // machine, and still far below the old walk.
    assert!(
        took <= Duration::from_secs(6),
        "nbdinfo --map took {took:?}"
    );
}
