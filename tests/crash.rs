//! Crash safety: `kill -9` the daemon while a writer issues fsync'ed
//! writes, restart on the same staging (and the stale mount), and check
//! every sector against the history of what was written and acknowledged.

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

const SECTOR: usize = 4096;
const K64: usize = 64 << 10;

#[derive(Clone)]
struct Write {
    seq: u64,
    off: usize,
    len: usize,
    /// Covered by a successful fdatasync in its own round.
    acked: bool,
}

fn content(seq: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seq);
    (0..len).map(|_| rng.gen()).collect()
}

/// Writes until the daemon dies; returns the log and the highest seq
/// acknowledged by a successful fdatasync.
fn write_until_killed(
    disk: &std::path::Path,
    size: usize,
    first_seq: u64,
    stop: Arc<AtomicBool>,
) -> (Vec<Write>, u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(first_seq);
    let mut log = vec![];
    let mut acked = 0;
    let mut seq = first_seq;
    while !stop.load(Ordering::Relaxed) {
        let sectors = size / SECTOR;
        let off = rng.gen_range(0..sectors - 8) * SECTOR;
        let len = rng.gen_range(1..=8) * SECTOR;
        log.push(Write {
            seq,
            off,
            len,
            acked: false,
        });
        if f.write_all_at(&content(seq, len), off as u64).is_err() {
            break;
        }
        if seq % 4 == 0 {
            if f.sync_data().is_err() {
                break;
            }
            acked = seq;
            log.iter_mut()
                .rev()
                .take_while(|w| !w.acked)
                .for_each(|w| w.acked = true);
        }
        seq += 1;
    }
    (log, acked)
}

/// Every sector must hold the last acknowledged write to it, or a later
/// write that really happened; a sector never acknowledged may also hold
/// its backup content. Never zeros or garbage nobody wrote.
fn check(disk: &[u8], original: &[u8], log: &[Write]) {
    let contents: HashMap<u64, Vec<u8>> =
        log.iter().map(|w| (w.seq, content(w.seq, w.len))).collect();
    for s in 0..disk.len() / SECTOR {
        let range = s * SECTOR..(s + 1) * SECTOR;
        let mut candidates: Vec<(u64, bool, Vec<u8>)> =
            vec![(0, false, original[range.clone()].to_vec())];
        for w in log
            .iter()
            .filter(|w| w.off <= range.start && w.off + w.len >= range.end)
        {
            let c = &contents[&w.seq];
            candidates.push((
                w.seq,
                w.acked,
                c[range.start - w.off..range.end - w.off].to_vec(),
            ));
        }
        // Only candidates at or after the last acknowledged one are allowed.
        let last_acked = candidates
            .iter()
            .rposition(|(_, acked, _)| *acked)
            .unwrap_or(0);
        let actual = &disk[range.clone()];
        let ok = candidates[last_acked..]
            .iter()
            .any(|(_, _, c)| c[..] == actual[..]);
        assert!(
            ok,
            "sector {s} holds data that was neither the acknowledged write nor a later one (candidates {:?})",
            candidates.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn kill9_during_fsynced_writes_loses_nothing_acknowledged() {
    let env = Env::new();
    let size = 64 * K64;
    let original = random_image(&env.path("a.raw"), size, 21, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut all_log: Vec<Write> = vec![];
    let mut next_seq = 1;
    for round in 0..3 {
        let mut d = env.serve(); // later rounds must clear the stale mount themselves
        let disk = env.recover("vm", None)[0].clone();
        if round > 0 {
            check(&read_all(&disk), &original, &all_log);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (disk, stop) = (disk.clone(), stop.clone());
            std::thread::spawn(move || write_until_killed(&disk, size, next_seq, stop))
        };
        std::thread::sleep(Duration::from_millis(700 + round * 300));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        let (log, a) = writer.join().unwrap();
        assert!(a > 0, "the writer should have had fsyncs acknowledged");
        next_seq = log.last().map(|w| w.seq + 1).unwrap_or(next_seq) + 1;
        all_log.extend(log);
        // Leak the guard's unmount: the next serve must cope with the stale mount.
        std::mem::forget(d);
    }
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    check(&read_all(&disk), &original, &all_log);
}

#[test]
fn staged_blocks_are_never_zeros_after_a_crash() {
    // Reads stage blocks; the crash may lose presence bits, never data.
    let env = Env::new();
    let original = random_image(&env.path("a.raw"), 128 * K64, 22, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let reader = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&disk).unwrap();
            let mut buf = vec![0u8; K64];
            for b in 0..128u64 {
                if f.read_exact_at(&mut buf, b * K64 as u64).is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    d.kill9();
    let _ = reader.join();
    std::mem::forget(d);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    assert!(
        read_all(&disk) == original,
        "after a crash the disk must read as its backup"
    );
}

#[test]
fn a_backup_killed_midway_leaves_no_backup_and_the_next_one_succeeds() {
    let env = Env::new();
    let img = env.path("big.raw");
    let ok = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} /dev/urandom > {}",
            256 << 20,
            img.display()
        ))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    random_image(&env.path("s.raw"), 4 * K64, 1, K64);
    env.backup("small", "64K", &[&env.path("s.raw")]);
    let mut child = std::process::Command::new(bin())
        .args([
            "backup",
            "--repo",
            env.repo_str(),
            "--vm",
            "vm",
            "--chunk-size",
            "64K",
        ])
        .arg(&img)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has stored some chunks, long before it can finish.
    let chunks = env.repo.join("chunks");
    let count = || walk(&chunks);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count() < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup stored nothing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let list = env.ok(&["list", "--repo", env.repo_str(), "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let vms: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["vm"].as_str().unwrap())
        .collect();
    assert_eq!(
        vms,
        vec!["small"],
        "a killed backup left a manifest: {list}"
    );
    env.ok(&["verify", "--repo", env.repo_str()]);
    let id = env.backup("vm", "64K", &[&img]);
    env.ok(&[
        "verify",
        "--repo",
        env.repo_str(),
        "--vm",
        "vm",
        "--backup",
        &id,
    ]);
}

/// Whether anything is mounted at `p` (an absolute path), by mountinfo.
fn mounted_at(p: &std::path::Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = p.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

#[test]
fn a_daemon_restarted_on_its_staging_with_another_mount_detaches_the_dead_mount_the_killed_one_left(
) {
    let env = Env::new();
    let original = random_image(&env.path("a.raw"), 8 * K64, 23, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let old_mount = std::fs::canonicalize(&env.mount).unwrap();
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(b"kept", 0)
        .unwrap();
    d.kill9();
    let e = std::fs::metadata(&env.mount).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    assert!(mounted_at(&old_mount));
    let m2 = env.path("mnt2");
    std::fs::create_dir(&m2).unwrap();
    let d2 = Daemon::start(&env, &env.staging, &m2, &env.socket);
    assert!(
        !mounted_at(&old_mount),
        "the dead mount is still there: {}",
        d2.log_text()
    );
    assert!(
        d2.log_text().contains("detached the dead mount"),
        "{}",
        d2.log_text()
    );
    // The VM comes back at the new mount point with its write.
    let disk = env.recover("vm", None)[0].clone();
    assert!(disk.starts_with(&m2), "{}", disk.display());
    let now = read_all(&disk);
    assert_eq!(&now[..4], b"kept");
    assert_eq!(now[4..], original[4..]);
}

/// Only the blocks read are read: the kernel reads none ahead.
fn no_readahead(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: an advice call on a descriptor we own; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(r, 0);
}

/// Polls `f` every 200 ms for up to `secs` seconds; the last value.
fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_daemon_restarted_after_a_crash_while_its_repository_is_away_serves_what_staging_holds_and_the_rest_once_it_is_back(
) {
    let mut env = Env::new();
    // Only what the guest reads is staged.
    env.serve_args = vec!["--no-profile".into()];
    let original = random_image(&env.path("a.raw"), 16 * K64, 23, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let ours = vec![0xa5u8; K64];
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        no_readahead(&f);
        let mut buf = vec![0u8; K64];
        // Not in order: the daemon reads nothing ahead of them.
        for b in [6u64, 0, 3] {
            f.read_exact_at(&mut buf, b * K64 as u64).unwrap();
        }
        f.write_all_at(&ours, 2 * K64 as u64).unwrap();
        f.sync_all().unwrap();
    }
    d.kill9();
    std::mem::forget(d);
    // The repository's share is not mounted when the host comes back.
    let away = env.path("repo.away");
    std::fs::rename(&env.repo, &away).unwrap();
    std::fs::create_dir(&env.repo).unwrap();
    let d = env.serve();
    assert!(
        d.log_text().contains("does not answer"),
        "the start without the repository is said: {}",
        d.log_text()
    );
    let disk = env.recover("vm", None)[0].clone();
    let f = std::fs::File::open(&disk).unwrap();
    no_readahead(&f);
    let mut buf = vec![0u8; K64];
    for b in [0usize, 2, 3, 6] {
        f.read_exact_at(&mut buf, (b * K64) as u64).unwrap();
        let want = if b == 2 {
            &ours[..]
        } else {
            &original[b * K64..(b + 1) * K64]
        };
        assert!(buf == want, "block {b} reads as staged");
    }
    // A block never read, and not a hole (a hole reads without the repository).
    let b = (9..16)
        .find(|b| original[b * K64..(b + 1) * K64].iter().any(|&x| x != 0))
        .unwrap();
    let at = (b * K64) as u64;
    let e = f.read_exact_at(&mut buf, at).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "a block not staged: {e}");
    let pinned_dir = env.repo.join("pins");
    assert!(
        !pinned_dir.exists(),
        "nothing is written into the empty mount point"
    );
    let session = |env: &Env| env.status()["sessions"][0].clone();
    // Daemon-wide at once, before any check of the session (explore11 M3).
    let st = env.status();
    assert!(st["repository_unreachable"].is_string(), "{st}");
    let text = env.ok(&["status", "--socket", env.socket.to_str().unwrap()]);
    assert!(text.contains("WARNING: repository unreachable"), "{text}");
    assert!(
        wait_for(25, || {
            let s = session(&env);
            s["repo_unreachable"].is_string() && s["unpinned"] == true
        }),
        "status says the repository is unreachable: {}",
        session(&env)
    );
    // The share is mounted again.
    std::fs::remove_dir(&env.repo).unwrap();
    std::fs::rename(&away, &env.repo).unwrap();
    assert!(
        wait_for(10, || f.read_exact_at(&mut buf, at).is_ok()),
        "a block not staged reads once the repository is back"
    );
    assert!(buf == original[b * K64..(b + 1) * K64]);
    assert!(
        wait_for(25, || {
            let s = session(&env);
            s["repo_unreachable"].is_null() && s["unpinned"].is_null()
        }),
        "the session is pinned and the outage over: {}",
        session(&env)
    );
    assert!(env.status()["repository_unreachable"].is_null());
    assert!(pinned_dir.exists(), "its pin is in the repository");
    assert!(
        d.log_text().contains("answers as itself"),
        "{}",
        d.log_text()
    );
}

/// A store back within the hold of the identity check a guest's failed
/// read made answers the very next read of a block not staged (explore11:
/// it failed with EIO until the hold ended, a second outage for a guest
/// that remounts read-only on EIO).
#[test]
fn the_first_read_after_the_repository_is_back_succeeds() {
    let mut env = Env::new();
    env.serve_args = vec!["--no-profile".into()];
    let original = random_image(&env.path("a.raw"), 16 * K64, 29, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    d.kill9();
    std::mem::forget(d);
    let away = env.path("repo.away");
    std::fs::rename(&env.repo, &away).unwrap();
    std::fs::create_dir(&env.repo).unwrap();
    // Its socket answers once the start (and the start's hold) is over.
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let f = std::fs::File::open(&disk).unwrap();
    no_readahead(&f);
    let data: Vec<usize> = (0..16)
        .filter(|b| original[b * K64..(b + 1) * K64].iter().any(|&x| x != 0))
        .collect();
    let mut buf = vec![0u8; K64];
    let e = f
        .read_exact_at(&mut buf, (data[0] * K64) as u64)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "the store is away: {e}");
    // The share is mounted again right after that read's failed check.
    std::fs::remove_dir(&env.repo).unwrap();
    std::fs::rename(&away, &env.repo).unwrap();
    let t = std::time::Instant::now();
    let b = data[1];
    f.read_exact_at(&mut buf, (b * K64) as u64)
        .unwrap_or_else(|e| panic!("the first read once the store is back: {e}"));
    assert!(buf == original[b * K64..(b + 1) * K64]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        d.log_text().contains("answers as itself"),
        "{}",
        d.log_text()
    );
}
