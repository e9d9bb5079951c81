//! Bounded staging (`serve --staging-max`) with real clients: a guest
//! reading a disk 4x larger than the limit over FUSE and NBD keeps working,
//! staging stays under the limit, and every changed (and discarded) block
//! survives eviction, a live backup, release and resume.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::nfs::own_loopback;
use common::*;
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;
const BS: usize = 64 << 10;
const LIMIT: u64 = 16 << 20;

/// Staging use as `status` reports it, and as the data file holds it.
fn assert_under_limit(env: &Env, data_file: &Path, when: &str) {
    let st = env.status();
    let s = &st["staging"][0];
    assert_eq!(s["limit"].as_u64(), Some(LIMIT), "{s}");
    let used = s["used"].as_u64().unwrap();
    assert!(used <= LIMIT, "{when}: status shows {used} bytes used: {s}");
    // The filesystem's own blocks (ext4 extent tree blocks of a file
    // full of holes) count in st_blocks too: allow one block for them.
    let allocated = std::fs::metadata(data_file).unwrap().blocks() * 512;
    assert!(
        allocated <= LIMIT + BS as u64,
        "{when}: the staging data file holds {allocated} bytes, over the {LIMIT} limit"
    );
}

/// Reads the whole disk file in 1 MiB requests, comparing with `model`
/// and checking the limit every 8 MiB.
fn read_and_compare(env: &Env, disk: &Path, data_file: &Path, model: &[u8], pass: &str) {
    let mut f = std::fs::File::open(disk).unwrap();
    let mut buf = vec![0u8; MIB];
    for (i, want) in model.chunks(MIB).enumerate() {
        f.read_exact(&mut buf[..want.len()]).unwrap();
        if buf[..want.len()] != *want {
            let j = (0..want.len()).find(|&j| buf[j] != want[j]).unwrap();
            panic!(
                "{pass}: byte {} differs (block {})",
                i * MIB + j,
                (i * MIB + j) / BS
            );
        }
        if i % 8 == 7 {
            assert_under_limit(env, data_file, pass);
        }
    }
}

#[test]
fn a_guest_reading_a_disk_4x_the_staging_limit_keeps_working_under_it_and_every_changed_block_survives(
) {
    let mut env = Env::new();
    let addr = format!("{}:10809", own_loopback());
    env.serve_args = vec![
        "--nbd".into(),
        addr.clone(),
        "--staging-max".into(),
        "16M".into(),
    ];
    // 64 MiB, one chunk in 16 all zeros: about 60 MiB of data.
    let img = env.path("disk.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut model = vec![0u8; 64 * MIB];
    rng.fill(&mut model[..]);
    for b in (0..model.len() / BS).step_by(16) {
        model[b * BS..(b + 1) * BS].fill(0);
    }
    std::fs::write(&img, &model).unwrap();
    let id = env.backup("vm", "64K", &[&img]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let data_file = env.staging.join("sessions/vm").join(&id).join("disk0.data");

    // Twice over FUSE, then once over NBD (nbdcopy, parallel requests).
    read_and_compare(&env, &disk, &data_file, &model, "first FUSE read");
    read_and_compare(&env, &disk, &data_file, &model, "second FUSE read");
    let url = format!("nbd://{addr}/vm/disk0");
    let copy = env.path("copy.img");
    tool(&["nbdcopy", &url, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == model,
        "nbdcopy differs from the backup"
    );
    assert_under_limit(&env, &data_file, "after nbdcopy");

    // Guest writes: whole blocks, and partial ones across block edges.
    let mut written = vec![];
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for i in 0..24usize {
            let (off, len) = if i % 2 == 0 {
                (rng.gen_range(0..model.len() / BS) * BS, BS)
            } else {
                let len = rng.gen_range(1..3 * BS);
                (rng.gen_range(0..model.len() - len), len)
            };
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            f.write_all_at(&data, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&data);
            written.push((off, len));
        }
        f.sync_all().unwrap();
    }
    // And discards through FUSE (fallocate punch-hole, as QEMU's
    // discard=unmap on a file does): a whole block and a partial range.
    let mut punched = vec![];
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for (off, len) in [(300 * BS, BS), (700 * BS + 1000, 5000)] {
            nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
            .unwrap();
            model[off..off + len].fill(0);
        }
        punched.push(300usize);
        f.sync_all().unwrap();
    }
    let f = std::fs::File::open(&disk).unwrap();
    let mut check = vec![0u8; 3 * BS];
    for &(off, len) in &written {
        f.read_exact_at(&mut check[..len], off as u64).unwrap();
        assert!(
            check[..len] == model[off..off + len],
            "write at {off} not read back"
        );
    }
    drop(f);
    read_and_compare(&env, &disk, &data_file, &model, "read after the writes");

    // Guest discards over NBD (TRIM) of whole blocks with backup data,
    // checked over NBD: FUSE keeps its page cache (it sees every write
    // made through FUSE, not those made over NBD).
    let mut trimmed = vec![];
    for b in [100usize, 101, 517, 900] {
        if model[b * BS..(b + 1) * BS].iter().all(|&x| x == 0) {
            continue;
        }
        tool(&[
            "qemu-io",
            "-f",
            "raw",
            &url,
            "-c",
            &format!("discard {} {}", b * BS, BS),
        ]);
        model[b * BS..(b + 1) * BS].fill(0);
        trimmed.push(b);
    }
    assert!(trimmed.len() >= 3);
    std::fs::remove_file(&copy).unwrap();
    tool(&["nbdcopy", &url, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == model,
        "nbdcopy after the discards differs"
    );
    assert_under_limit(&env, &data_file, "after the discards");

    let st = env.status();
    let s = &st["staging"][0];
    assert!(
        s["evicted_blocks"].as_u64().unwrap() > 500,
        "too few evictions: {s}"
    );
    assert_eq!(s["refused_fills"].as_u64(), Some(0), "{s}");
    let text = env.ok(&["status", "--socket", env.socket.to_str().unwrap()]);
    assert!(text.contains("of 16.0 MiB limit"), "{text}");

    // A live backup records the discarded blocks as zero chunks.
    let o = env.run(&[
        "backup",
        "--session",
        "vm",
        "--socket",
        env.socket.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let live: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let live_id = live["backup"].as_str().unwrap().to_string();
    let manifest = recoverfs::repo::Manifest::decode(
        &std::fs::read(env.repo.join("backups/vm").join(format!("{live_id}.json"))).unwrap(),
        &live_id,
    )
    .unwrap();
    let chunks = &manifest.disks[0].chunks;
    for &b in trimmed.iter().chain(&punched) {
        assert_eq!(
            chunks.get(b as u64),
            None,
            "discarded block {b} is not a zero chunk"
        );
    }

    // Release (kept) and resume: every changed block is still there.
    env.release_closed("vm", false);
    let disk = env.recover("vm", None)[0].clone();
    read_and_compare(&env, &disk, &data_file, &model, "read after resume");
    env.release_closed("vm", true);

    // The first session recorded everything it read as the VM's profile:
    // a 64 MiB working set no 16 MiB staging admits.
    let err = env.fails(
        &[
            "recover",
            "--socket",
            env.socket.to_str().unwrap(),
            "vm",
            "--backup",
            &live_id,
        ],
        "expected working set (64.0 MiB, from its operational profile) does not fit",
    );
    assert!(err.contains("16.0 MiB free"), "{err}");
    env.ok(&["profile", "clear", "--repo", env.repo_str(), "vm"]);

    // The live backup restores to the same bytes.
    let disk = env.recover("vm", Some(&live_id))[0].clone();
    let live_file = env
        .staging
        .join("sessions/vm")
        .join(&live_id)
        .join("disk0.data");
    read_and_compare(&env, &disk, &live_file, &model, "read of the live backup");
    env.release_closed("vm", true);
    let mut out = std::io::stderr();
    let _ = writeln!(out, "staging at the end: {}", env.status()["staging"][0]);
}

#[test]
fn a_recovery_whose_working_set_does_not_fit_the_staging_limit_is_refused_in_one_line() {
    let mut env = Env::new();
    env.serve_args = vec!["--staging-max".into(), "8M".into()];
    let img = env.path("disk.img");
    random_image(&img, 32 * MIB, 5, BS);
    env.backup("vm", "64K", &[&img]);
    let _d = env.serve();
    let err = env.fails(
        &["recover", "--socket", env.socket.to_str().unwrap(), "vm"],
        "expected working set",
    );
    assert!(err.contains("raise --staging-max"), "{err}");
    assert!(err.trim().lines().count() == 1, "{err}");
    assert!(env.status()["sessions"].as_array().unwrap().is_empty());
    // Nothing was staged for it.
    assert!(!env.staging.join("sessions/vm").exists());
}

/// The tester's report: `--staging-max 20M` on an 8 MiB filesystem was
/// not capped without `--staging-reserve`; the filesystem filled with
/// clean blocks, nothing was evicted and guest writes failed ENOSPC.
#[test]
fn a_staging_max_above_its_filesystem_is_capped_so_guest_writes_evict_clean_blocks_instead_of_failing(
) {
    let mut env = Env::new();
    let _fs = Tmpfs::mount(&env.path("small"), "8m");
    env.staging = env.path("small/staging");
    env.serve_args = vec!["--staging-max".into(), "20M".into()];
    // Two 6 MiB disks of data (no zero chunks): more than the filesystem.
    let mut models = vec![];
    for (vm, seed) in [("a", 31u64), ("b", 32)] {
        let img = env.path(&format!("{vm}.img"));
        let mut data = vec![0u8; 6 * MIB];
        rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
        std::fs::write(&img, &data).unwrap();
        env.backup(vm, "64K", &[&img]);
        models.push(data);
    }
    let _d = env.serve();
    let a = env.recover("a", None)[0].clone();
    assert!(std::fs::read(&a).unwrap() == models[0], "a differs");
    let b = env.recover("b", None)[0].clone();
    let written = vec![0x5au8; 3 * MIB];
    {
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&written, MIB as u64).unwrap();
        f.sync_all().unwrap();
    }
    models[1][MIB..4 * MIB].copy_from_slice(&written);
    assert!(std::fs::read(&b).unwrap() == models[1], "b differs");
    assert!(std::fs::read(&a).unwrap() == models[0], "a differs after b");
    let st = env.status();
    let s = &st["staging"][0];
    assert!(s["limit"].as_u64().unwrap() <= 8 << 20, "{s}");
    assert!(s["evicted_blocks"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["refused_fills"].as_u64(), Some(0), "{s}");
}

/// Staging full of blocks the guest changed: nothing can be evicted. A
/// guest read of a block not staged is answered from the repository
/// without staging it (it used to fail ENOSPC, an I/O error in the guest);
/// a write that needs room still fails ENOSPC, and the limit holds.
#[test]
fn a_guest_read_of_an_unstaged_block_when_staging_is_full_of_changed_blocks_is_answered_not_failed()
{
    let mut env = Env::new();
    env.serve_args = vec!["--staging-max".into(), "16M".into()];
    let img = env.path("disk.img");
    let mut model = vec![0u8; 48 * MIB];
    rand::rngs::StdRng::seed_from_u64(23).fill(&mut model[..]);
    std::fs::write(&img, &model).unwrap();
    let id = env.backup("vm", "64K", &[&img]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let data_file = env.staging.join("sessions/vm").join(&id).join("disk0.data");
    // The guest changes the first 16 MiB: the whole limit.
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for i in 0..16 {
            let data = vec![i as u8 + 1; MIB];
            f.write_all_at(&data, (i * MIB) as u64).unwrap();
            model[i * MIB..(i + 1) * MIB].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
    }
    let st = env.status();
    assert_eq!(st["staging"][0]["used"].as_u64(), Some(LIMIT), "{st}");
    // Every byte reads right, the unstaged 32 MiB from the repository.
    assert!(std::fs::read(&disk).unwrap() == model, "the disk differs");
    assert_under_limit(&env, &data_file, "after reading through");
    let st = env.status();
    let d = &st["sessions"][0]["disks"][0];
    assert!(
        d["read_through"].as_u64().unwrap() >= 32 * MIB as u64 / BS as u64,
        "{d}"
    );
    assert_eq!(d["fetch_errors"].as_u64(), Some(0), "{d}");
    assert!(
        st["staging"][0]["refused_fills"].as_u64().unwrap() > 0,
        "{st}"
    );
    let text = env.ok(&["status", "--socket", env.socket.to_str().unwrap()]);
    assert!(text.contains("READ THROUGH (staging full)"), "{text}");
    // A write of a block not staged needs room: ENOSPC, at the write or
    // at the sync, and the block still reads as the backup's.
    let off = 40 * MIB;
    let failed = {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&vec![0xee; BS], off as u64)
            .and_then(|()| f.sync_all())
            .unwrap_err()
    };
    assert_eq!(failed.raw_os_error(), Some(libc::ENOSPC), "{failed}");
    let mut back = vec![0u8; BS];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut back, off as u64)
        .unwrap();
    assert!(
        back == model[off..off + BS],
        "the refused write changed the block"
    );
    assert_under_limit(&env, &data_file, "after the refused write");
}

/// Guest writes fill a staging whose limit is its filesystem's free space
/// (`--staging-max` above it, no `--staging-reserve`): the writes past the
/// limit fail ENOSPC, but the session's own files (presence and changed
/// maps, their atomic rewrites) still find room, so the disk never fails
/// and every write acknowledged before stays readable after a flush.
#[test]
fn guest_writes_filling_a_staging_capped_by_its_filesystem_leave_room_for_its_maps_and_never_fail_the_disk(
) {
    let mut env = Env::new();
    let _fs = Tmpfs::mount(&env.path("small"), "24m");
    env.staging = env.path("small/staging");
    env.serve_args = vec!["--staging-max".into(), "40M".into()];
    let img = env.path("a.img");
    let mut model = vec![0u8; 32 * MIB];
    rand::rngs::StdRng::seed_from_u64(33).fill(&mut model[..]);
    std::fs::write(&img, &model).unwrap();
    env.backup("a", "64K", &[&img]);
    let _d = env.serve();
    let disk = env.recover("a", None)[0].clone();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let mut refused = false;
    for i in 0..32 {
        let data = vec![i as u8 + 1; MIB];
        match f
            .write_all_at(&data, (i * MIB) as u64)
            .and_then(|()| f.sync_all())
        {
            Ok(()) => model[i * MIB..(i + 1) * MIB].copy_from_slice(&data),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "write {i}: {e}");
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "32 MiB of guest writes fitted a 24 MiB filesystem");
    let st = env.status();
    let d = &st["sessions"][0]["disks"][0];
    assert!(d["failed"].is_null(), "the disk failed: {d}");
    // A flush now succeeds, and what was acknowledged reads back.
    f.sync_all().unwrap();
    let mut back = vec![0u8; 32 * MIB];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    let written = (0..32)
        .take_while(|&i| model[i * MIB] == i as u8 + 1)
        .count();
    assert!(written > 0);
    assert!(
        back[..written * MIB] == model[..written * MIB],
        "acknowledged writes lost"
    );
}

/// explore4 M1: reads fill a staging filesystem (no limit given) to its
/// last block; a daemon killed and restarted there, which can create no
/// new file or directory, still resumes the session and serves the
/// guest's acknowledged write (it said "discard it" and served nothing).
#[test]
fn a_daemon_restarted_on_a_full_staging_filesystem_resumes_its_session_and_serves_its_writes() {
    let mut env = Env::new();
    let fs = LoopExt4::mount(&env.path("small"), "40M");
    env.staging = fs.path().join("staging");
    env.socket = fs.path().join("control.sock");
    let img = env.path("a.img");
    let mut model = vec![0u8; 64 * MIB];
    rand::rngs::StdRng::seed_from_u64(47).fill(&mut model[..]);
    std::fs::write(&img, &model).unwrap();
    env.backup("a", "64K", &[&img]);
    let mut d = env.serve();
    let disk = env.recover("a", None)[0].clone();
    assert!(
        std::fs::read(&disk).unwrap() == model,
        "the disk reads wrong"
    );
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(b"acknowledged", 100).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let free = nix::sys::statvfs::statvfs(fs.path()).unwrap();
    let free = free.blocks_available() * free.fragment_size();
    assert!(
        free < 256 << 10,
        "the staging filesystem is not full: {free} bytes free"
    );
    d.kill9();
    let d = env.serve();
    let st = env.status();
    let s = &st["sessions"][0];
    assert_eq!(
        s["vm"],
        "a",
        "the session was not resumed: {st}\n{}",
        d.log_text()
    );
    let mut got = [0u8; 12];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut got, 100)
        .unwrap();
    assert_eq!(&got, b"acknowledged");
}

/// A restart with a `--staging-max` below what the sessions already hold
/// for good (guest-changed blocks) says so at start: nothing new can be
/// staged there until sessions go (explore3: it started silently).
#[test]
fn a_restart_with_a_limit_below_the_changed_blocks_held_says_so_at_start() {
    let mut env = Env::new();
    env.serve_args = vec!["--staging-max".into(), "16M".into()];
    let img = env.path("a.img");
    let mut data = vec![0u8; 8 * MIB];
    rand::rngs::StdRng::seed_from_u64(41).fill(&mut data[..]);
    std::fs::write(&img, &data).unwrap();
    env.backup("a", "64K", &[&img]);
    let mut d = env.serve();
    let disk = env.recover("a", None)[0].clone();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&vec![7u8; 4 * MIB], 0).unwrap();
        f.sync_all().unwrap();
    }
    assert!(!d.log_text().contains("at or over its"), "{}", d.log_text());
    d.kill9();
    drop(d);
    env.serve_args = vec!["--staging-max".into(), "2M".into()];
    let d = env.serve();
    let log = d.log_text();
    assert!(
        log.contains("holds 4.0 MiB that cannot be evicted")
            && log.contains("at or over its 2.0 MiB limit"),
        "{log}"
    );
    // The guest's writes are all there, and unread blocks still read.
    let mut back = vec![0u8; 8 * MIB];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert!(back[..4 * MIB].iter().all(|&b| b == 7));
    assert!(back[4 * MIB..] == data[4 * MIB..]);
}

/// The tester's report: `--staging-reserve 10M` on an 8 MiB filesystem
/// started with a 0-byte limit and recover said "raise --staging-max",
/// never given; `--staging-max 1K` was accepted.
#[test]
fn a_reserve_the_filesystem_cannot_hold_or_a_tiny_max_is_refused_at_serve_and_a_binding_reserve_is_named_at_recover(
) {
    let mut env = Env::new();
    let _fs = Tmpfs::mount(&env.path("small"), "8m");
    env.staging = env.path("small/staging");
    let img = env.path("a.img");
    random_image(&img, 6 * MIB, 33, BS);
    env.backup("a", "64K", &[&img]);
    let (staging, mount, socket) = (
        env.staging.to_str().unwrap(),
        env.mount.to_str().unwrap(),
        env.socket.to_str().unwrap(),
    );
    let base = [
        "serve",
        "--repo",
        env.repo_str(),
        "--staging",
        staging,
        "--mount",
        mount,
        "--socket",
        socket,
    ];
    // Refused at once in one line; a daemon that starts instead is
    // stopped after 20 s (and the test fails, it does not hang).
    let refused = |extra: [&str; 2], needle: &str| {
        let o = std::process::Command::new("timeout")
            .arg("20")
            .arg(bin())
            .args(base)
            .args(extra)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success() && o.status.code() != Some(124),
            "serve {extra:?} was not refused: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
        err
    };
    let err = refused(["--staging-reserve", "10M"], "--staging-reserve 10.0 MiB");
    assert!(err.contains("8.0 MiB in all"), "{err}");
    assert!(!env.staging.exists(), "a refused serve made its staging");
    refused(
        ["--staging-max", "1K"],
        "--staging-max 1.0 KiB is too small",
    );
    // A reserve the filesystem holds, leaving too little for the VM.
    env.serve_args = vec!["--staging-reserve".into(), "5M".into()];
    let _d = env.serve();
    let err = env.fails(
        &["recover", "--socket", socket, "a"],
        "lower --staging-reserve (5.0 MiB kept free on a filesystem of 8.0 MiB",
    );
    assert!(!err.contains("--staging-max"), "{err}");
    assert_eq!(env.status()["staging"][0]["limited_by"], "staging-reserve");
}

#[test]
fn staging_ls_lists_kept_sessions_and_drop_removes_one_only_when_no_daemon_serves_it() {
    let env = Env::new();
    let img = env.path("disk.img");
    random_image(&img, 4 * MIB, 9, BS);
    let id = env.backup("vm", "64K", &[&img]);
    let st = env.staging.to_str().unwrap();
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&vec![7u8; 2 * BS], 0).unwrap();
        f.sync_all().unwrap();
    }
    let ls = env.ok(&["staging", "ls", "--staging", st]);
    assert!(ls.contains("in use by a recoverfs daemon"), "{ls}");
    assert!(
        ls.contains(&format!("vm  {id}")) && ls.contains("(served)"),
        "{ls}"
    );
    env.fails(
        &["staging", "drop", "--staging", st, "vm"],
        "release --discard vm",
    );
    env.release_closed("vm", false);
    d.stop();

    let ls: serde_json::Value =
        serde_json::from_str(&env.ok(&["staging", "ls", "--staging", st, "--json"])).unwrap();
    let s = &ls["sessions"][0];
    assert_eq!(s["backup"], id.as_str());
    assert_eq!(s["changed_bytes"].as_u64(), Some(2 * BS as u64), "{s}");
    assert!(s["bytes_held"].as_u64().unwrap() >= 2 * BS as u64, "{s}");
    assert_eq!(s["served"], false);

    env.fails(
        &["staging", "drop", "--staging", st, "vm", "--backup", "nope"],
        "no kept session of VM vm from backup nope",
    );
    env.fails(
        &["staging", "ls", "--staging", env.path("").to_str().unwrap()],
        "not a recoverfs staging directory",
    );
    let out = env.ok(&["staging", "drop", "--staging", st, "vm", "--backup", &id]);
    assert!(out.contains("dropped kept staging of VM vm"), "{out}");
    assert!(env
        .ok(&["staging", "ls", "--staging", st])
        .contains("no kept sessions"));
    assert!(!env.staging.join("sessions/vm").join(&id).exists());
}

#[test]
fn staging_ls_of_the_main_staging_lists_the_sessions_of_export_points_with_their_own_staging() {
    let mut env = Env::new();
    let img = env.path("disk.img");
    random_image(&img, 2 * MIB, 10, BS);
    let id = env.backup("vm", "64K", &[&img]);
    let own = env.path("own");
    env.serve_args = vec![
        "--export-point".into(),
        format!("a,listen={}", own_loopback()),
        "--export-point".into(),
        format!("b,listen={},staging={}", own_loopback(), own.display()),
    ];
    let mut d = env.serve();
    let sock = env.socket.to_str().unwrap();
    env.ok(&["recover", "--socket", sock, "vm", "--export-point", "b"]);
    env.release_closed("vm", false);
    d.stop();
    let st = env.staging.to_str().unwrap();
    let ls = env.ok(&["staging", "ls", "--staging", st]);
    let own = std::fs::canonicalize(&own).unwrap();
    assert!(
        ls.contains(&format!("{}  vm  {id}", own.display())),
        "b's session is not listed: {ls}"
    );
    let ls: serde_json::Value =
        serde_json::from_str(&env.ok(&["staging", "ls", "--staging", st, "--json"])).unwrap();
    assert_eq!(ls["sessions"][0]["staging"], own.to_str().unwrap(), "{ls}");
}

#[test]
fn staging_drop_with_repo_removes_the_dropped_sessions_pin_so_forget_removes_its_backup() {
    let env = Env::new();
    let img = env.path("disk.img");
    random_image(&img, MIB, 10, BS);
    let old = env.backup("vm", "64K", &[&img]);
    let (st, repo) = (env.staging.to_str().unwrap(), env.repo_str());
    let mut d = env.serve();
    env.recover("vm", None);
    env.release_closed("vm", false);
    d.stop();
    // Dropped, but the repository cannot be reached: the pin stays, and
    // the drop says so and how to remove it, exiting non-zero.
    let gone = env.path("gone");
    let err = env.fails(
        &[
            "staging",
            "drop",
            "--staging",
            st,
            "vm",
            "--repo",
            gone.to_str().unwrap(),
        ],
        "forget keeps their backups until `recoverfs staging drop",
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!env.staging.join("sessions/vm").join(&old).exists());
    env.backup("vm", "64K", &[&img]);
    let forget = ["forget", "--repo", repo, "--keep-last", "1"];
    env.ok(&forget);
    // Whole ids: a backup made in the same second as `old` is `old-1`.
    let listed = |id: &str| {
        env.ok(&["list", "--repo", repo])
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(id))
    };
    assert!(listed(&old), "unpinned");
    // Again with --repo: no session is left, its stale pin is removed.
    let out = env.ok(&["staging", "drop", "--staging", st, "vm", "--repo", repo]);
    assert!(out.contains(&format!("pins of backup(s) {old}")), "{out}");
    env.ok(&forget);
    assert!(!listed(&old), "still kept");
    env.fails(
        &["staging", "drop", "--staging", st, "vm", "--repo", repo],
        "no kept session of VM vm",
    );
}
