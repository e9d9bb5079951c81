//! Retention and garbage collection through the real binary: `forget`,
//! `gc`, a `gc` racing `backup` processes, and backups that recovery
//! sessions use.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use recoverfs::repo::Repository;

const K64: usize = 64 << 10;

/// Every chunk every manifest names exists.
fn assert_no_manifest_lacks_a_chunk(repo: &str, when: &str) {
    let r = Repository::open(repo).unwrap();
    for vm in r.vms().unwrap() {
        for id in r.backup_ids(&vm).unwrap() {
            let Ok(m) = r.manifest(&vm, &id) else {
                continue; // forgotten since the listing
            };
            for d in &m.disks {
                for c in d.chunks.digests() {
                    assert!(
                        r.has_chunk(c).unwrap(),
                        "{when}: backup {vm}/{id} lost chunk {c}"
                    );
                }
            }
        }
    }
}

/// An image of 16 chunks: the first 8 are version `v`'s (a version's
/// chunks come back when it does), the rest unique to `round`.
fn versioned_image(path: &Path, v: u64, round: u64) {
    let mut data = random_image(path, 8 * K64, 1000 + v, K64);
    data.extend(random_image(path, 8 * K64, 5000 + round, K64));
    std::fs::write(path, &data).unwrap();
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn forget_and_gc_from_the_command_line_keep_the_newest_free_the_rest_and_verify_passes() {
    let env = Env::new();
    let img = env.path("a.raw");
    let mut ids = vec![];
    for round in 0..3 {
        versioned_image(&img, round, round);
        ids.push(env.backup("vm", "64K", &[&img]));
    }
    env.backup("other", "64K", &[&img]);
    let repo = env.repo_str();
    env.fails(&["forget", "--repo", repo], "at least one --keep-*");
    env.fails(
        &["forget", "--repo", repo, "--vm", "nope", "--keep-last", "1"],
        "unknown VM",
    );

    let dry = json(&env.ok(&[
        "forget",
        "--repo",
        repo,
        "--vm",
        "vm",
        "--keep-last",
        "1",
        "--dry-run",
        "--json",
    ]));
    assert_eq!(
        (dry["kept"].as_u64(), dry["removed"].as_u64()),
        (Some(1), Some(2))
    );
    let b = &dry["vms"][0]["backups"];
    assert_eq!(b[0]["id"], ids[2].as_str());
    assert_eq!(b[0]["reason"], "keep-last 1 of 1");
    assert_eq!(b[1]["reason"], "kept by no rule");
    let out = env.ok(&["forget", "--repo", repo, "--vm", "vm", "--keep-last", "1"]);
    assert!(out.contains("forgot 2 backup(s), kept 1"), "{out}");
    assert!(
        out.contains(&format!("remove       disk  {}", ids[0])),
        "{out}"
    );

    let dry = json(&env.ok(&["gc", "--repo", repo, "--dry-run", "--json"]));
    let n = dry["removed_chunks"].as_u64().unwrap();
    // Versions 0 and 1 (8 chunks each, some zero) and rounds 0 and 1.
    assert!(n >= 8, "{dry}");
    let before = walk(&env.repo.join("chunks"));
    let real = json(&env.ok(&["gc", "--repo", repo, "--json"]));
    assert_eq!(real["removed_chunks"].as_u64(), Some(n));
    assert_eq!(real["freed_bytes"], dry["freed_bytes"]);
    assert_eq!(walk(&env.repo.join("chunks")), before - n as usize);
    assert!(real["freed_bytes"].as_u64().unwrap() > 0);
    assert!(env
        .ok(&["verify", "--repo", repo])
        .contains("2 backup(s) verified"));
    let out = env.ok(&["gc", "--repo", repo]);
    assert!(out.contains("removed 0 unreferenced chunk(s)"), "{out}");
    assert_no_manifest_lacks_a_chunk(repo, "after gc");
}

/// A `backup` process in a loop (each round brings back the chunks of a
/// backup forgotten two rounds before, so it reuses chunks gc may be
/// about to remove) against `forget` + `gc` processes in a loop.
/// A damaged chunk (same size, flipped bits) would be reused by every
/// later backup: `verify --repair` sets it aside, and a backup of the same
/// image then stores it again, healing the older backup too.
#[test]
fn verify_repair_sets_a_damaged_chunk_aside_and_the_next_backup_heals_every_backup_using_it() {
    let env = Env::new();
    let img = env.path("a.raw");
    random_image(&img, 8 * K64, 77, K64);
    let first = env.backup("vm", "64K", &[&img]);
    let repo = env.repo_str().to_string();
    let c = Repository::open(&repo)
        .unwrap()
        .manifest("vm", &first)
        .unwrap()
        .disks[0]
        .chunks
        .get(2)
        .unwrap();
    let path = env.repo.join(c.key());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let o = env.run(&["verify", "--repo", &repo]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("run verify --repair"), "{err}");
    let o = env.run(&["verify", "--repo", &repo, "--repair"]);
    assert!(!o.status.success(), "damage was found: the command fails");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(out.contains(&format!("DAMAGED chunk {c}")), "{out}");
    assert!(
        out.contains(&format!("REPAIRED chunk {c}: set aside as quarantine/")),
        "{out}"
    );
    assert!(err.contains("1 damaged chunk(s) set aside"), "{err}");
    assert!(
        !path.exists(),
        "the damaged chunk is still where backups find it"
    );
    assert_eq!(
        std::fs::read(env.repo.join("quarantine").join(c.to_hex())).unwrap(),
        bytes
    );
    env.backup("vm", "64K", &[&img]);
    let out = env.ok(&["verify", "--repo", &repo]);
    assert!(out.starts_with("ok: "), "{out}");
}

#[test]
fn gc_racing_backups_from_another_process_never_removes_a_chunk_a_manifest_needs() {
    let env = Env::new();
    let img = env.path("a.raw");
    versioned_image(&img, 0, 0);
    env.backup("vm", "64K", &[&img]);
    let repo = env.repo_str().to_string();
    let rounds = 25;
    let mut freed = 0;
    let mut overlapped = 0;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut spans = vec![];
            for round in 1..=rounds {
                let img = env.path(&format!("w{}.raw", round % 2));
                versioned_image(&img, round % 2, round);
                let t0 = Instant::now();
                env.backup("vm", "64K", &[&img]);
                spans.push((t0, Instant::now()));
            }
            spans
        });
        let mut gcs = vec![];
        while !writer.is_finished() {
            env.ok(&["forget", "--repo", &repo, "--keep-last", "1"]);
            let t0 = Instant::now();
            let r = json(&env.ok(&["gc", "--repo", &repo, "--wait", "120", "--json"]));
            gcs.push((t0, Instant::now()));
            freed += r["removed_chunks"].as_u64().unwrap();
            assert_no_manifest_lacks_a_chunk(&repo, "during the race");
        }
        let spans = writer.join().unwrap();
        // How often a gc ran while a backup process was running.
        overlapped = gcs
            .iter()
            .filter(|(g0, g1)| spans.iter().any(|(b0, b1)| g0 < b1 && b0 < g1))
            .count();
    });
    assert_no_manifest_lacks_a_chunk(&repo, "at the end");
    env.ok(&["verify", "--repo", &repo]);
    assert!(freed > 0, "the collections removed chunks");
    eprintln!("{overlapped} gc runs overlapped a backup process; {freed} chunks freed");
    assert!(
        overlapped >= 3,
        "gc and backup overlapped only {overlapped} times"
    );
}

#[test]
fn a_backup_a_recovery_session_uses_is_kept_by_forget_unless_forced_and_then_status_says_so() {
    let env = Env::new();
    let img = env.path("a.raw");
    versioned_image(&img, 0, 0);
    let old = env.backup("vm", "64K", &[&img]);
    versioned_image(&img, 1, 1);
    let new = env.backup("vm", "64K", &[&img]);
    let repo = env.repo_str();
    let _d = env.serve();
    env.recover("vm", Some(&old));
    let out = env.ok(&["forget", "--repo", repo, "--keep-last", "1"]);
    assert!(out.contains("forgot 0 backup(s), kept 2"), "{out}");
    assert!(
        out.contains("protected: used by a live recovery session on host"),
        "{out}"
    );
    // Released with its staging kept: still protected.
    let o = env.release("vm", false);
    assert!(o.status.success());
    let out = env.ok(&["forget", "--repo", repo, "--keep-last", "1"]);
    assert!(
        out.contains("used by the kept staging of a recovery session"),
        "{out}"
    );

    env.recover("vm", None);
    let out = env.ok(&["forget", "--repo", repo, "--keep-last", "1", "--force"]);
    assert!(out.contains("forgot 1 backup(s), kept 1"), "{out}");
    assert!(
        out.contains("--force: used by a live recovery session"),
        "{out}"
    );
    assert_eq!(
        Repository::open(repo).unwrap().backup_ids("vm").unwrap(),
        vec![new.clone()]
    );
    // The daemon notices within its check interval.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = env.status();
        if let Some(w) = st["sessions"][0]["backup_gone"].as_str() {
            assert!(w.contains(&old), "{w}");
            break;
        }
        assert!(Instant::now() < deadline, "status never said: {st}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = env.ok(&["status", "--socket", env.socket.to_str().unwrap()]);
    assert!(text.contains("WARNING: backup"), "{text}");
    // Discarding the staging removes the pin.
    assert!(env.release("vm", true).status.success());
    let pins = std::fs::read_dir(env.repo.join("pins/vm"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(pins, 0);
}

/// Lock objects in the repository whose names start with `prefix`.
fn locks_named(env: &Env, prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(env.repo.join("locks")) else {
        return vec![];
    };
    rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Runs recoverfs with `args`, sends it SIGINT once it holds a lock named
/// `prefix*`, and returns its exit code and stderr.
fn interrupted_holding(env: &Env, args: &[&str], prefix: &str) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while locks_named(env, prefix).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{args:?} took no {prefix} lock"
        );
        assert!(child.try_wait().unwrap().is_none(), "{args:?} ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn sigint_of_a_gc_waiting_for_a_backup_or_of_a_backup_blocked_reading_its_source_leaves_no_lock() {
    let env = Env::new();
    let img = env.path("a.raw");
    random_image(&img, 4 * K64, 1, K64);
    env.backup("vm", "64K", &[&img]);
    let repo = env.repo_str();
    // A backup running on another host: gc waits for it.
    let locks = env.repo.join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    let other = locks.join("backup-elsewhere.json");
    let doc = r#"{"kind":"backup","host":"elsewhere","pid":1,"what":"vm2","started":"2026-11-23T21:00:00Z"}"#;
    std::fs::write(&other, doc).unwrap();
    let (code, err) = interrupted_holding(&env, &["gc", "--repo", repo, "--wait", "60"], "gc-");
    assert_eq!(code, Some(130), "{err}");
    assert!(
        locks_named(&env, "gc-").is_empty(),
        "gc left its lock: {err}"
    );
    assert!(other.exists(), "gc removed another host's lock");
    std::fs::remove_file(&other).unwrap();

    // An NBD server that accepts and never answers.
    let sock = env.path("stalled.sock");
    let _server = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let url = format!("nbd+unix:///vol?socket={}", sock.display());
    let (code, err) = interrupted_holding(
        &env,
        &["backup", "--repo", repo, "--vm", "nbdvm", &url],
        "backup-",
    );
    assert_eq!(code, Some(130), "{err}");
    assert!(
        locks_named(&env, "").is_empty(),
        "backup left its lock: {err}"
    );
    // And both work again at once.
    env.ok(&["gc", "--repo", repo, "--wait", "0"]);
}

#[test]
fn forget_and_gc_free_space_on_a_repository_filesystem_filled_to_the_last_block() {
    let env = Env::new();
    let fs = env.path("small");
    let _t = Tmpfs::mount(&fs, "12m");
    let repo = fs.join("repo");
    let repo_s = repo.to_str().unwrap();
    let img = env.path("a.raw");
    for seed in [1, 2] {
        random_image(&img, 48 * K64, seed, K64);
        env.ok(&[
            "backup",
            "--repo",
            repo_s,
            "--vm",
            "vm",
            "--chunk-size",
            "64K",
            img.to_str().unwrap(),
        ]);
    }
    let reserve = repo.join(recoverfs::repo::backend::RESERVE);
    assert!(reserve.exists(), "the repository keeps a space reserve");
    // Filled to the last block (by backups, or anything else there).
    let mut filler = std::fs::File::create(fs.join("filler")).unwrap();
    let block = vec![0xa5u8; 64 << 10];
    while std::io::Write::write_all(&mut filler, &block).is_ok() {}
    drop(filler);
    // forget and gc take their locks from the reserve and free space.
    env.ok(&["forget", "--repo", repo_s, "--vm", "vm", "--keep-last", "1"]);
    env.ok(&["gc", "--repo", repo_s]);
    assert_eq!(
        Repository::open(repo_s)
            .unwrap()
            .backup_ids("vm")
            .unwrap()
            .len(),
        1
    );
    // With room again, the next open makes a new reserve.
    assert!(
        reserve.exists(),
        "the reserve is made again once there is room"
    );
}

#[test]
fn the_pin_of_a_host_lost_for_good_is_listed_and_dropped_and_then_the_vm_recovers_here() {
    use recoverfs::repo::pins::{self, Pin};
    let env = Env::new();
    random_image(&env.path("a.raw"), 8 * K64, 7, K64);
    let id = env.backup("vm", "64K", &[&env.path("a.raw")]);
    let repo = env.repo_str();
    // A daemon on a host lost in the disaster served it.
    let r = Repository::open(repo).unwrap();
    let dir = format!("/var/lib/recoverfs/sessions/vm/{id}");
    let mut pin = Pin::new("vm", vec![id.clone()], Path::new(&dir), true);
    pin.host = "lost-host".into();
    pins::put(&r, &pin).unwrap();
    let _d = env.serve();
    let sock = env.socket.to_str().unwrap();
    let err = env.fails(
        &["recover", "--socket", sock, "vm"],
        "is served by a recoverfs daemon on host lost-host",
    );
    assert!(
        err.contains(&format!(
            "recoverfs pins drop --repo {repo} vm --host lost-host"
        )),
        "{err}"
    );
    let ls = env.ok(&["pins", "ls", "--repo", repo]);
    assert!(
        ls.contains("vm serving on host lost-host, written ") && ls.contains(&dir),
        "{ls}"
    );
    let out = env.ok(&["pins", "drop", "--repo", repo, "vm", "--host", "lost-host"]);
    assert!(
        out.contains("removed: vm serving on host lost-host"),
        "{out}"
    );
    env.recover("vm", None);
    // This host's own session is not this command's to drop.
    env.fails(
        &[
            "pins",
            "drop",
            "--repo",
            repo,
            "vm",
            "--host",
            &pins::hostname(),
        ],
        "has a session on this host",
    );
    env.fails(
        &["pins", "drop", "--repo", repo, "vm", "--host", "lost-host"],
        "no pin of VM vm names host lost-host",
    );
}

#[test]
fn the_note_of_a_recover_that_passed_over_kept_staging_names_a_command_that_discards_only_that_staging(
) {
    let env = Env::new();
    let repo = env.repo_str().to_string();
    random_image(&env.path("a.raw"), 4 * K64, 31, K64);
    let old = env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let sock = env.socket.to_str().unwrap().to_string();
    env.recover("vm", None);
    env.release_closed("vm", false);
    random_image(&env.path("b.raw"), 4 * K64, 32, K64);
    let new = env.backup("vm", "64K", &[&env.path("b.raw")]);
    env.ok(&[
        "forget",
        "--repo",
        &repo,
        "--vm",
        "vm",
        "--keep-last",
        "1",
        "--force",
    ]);
    let o = env.run(&["recover", "--socket", &sock, "vm"]);
    assert!(o.status.success());
    let note = String::from_utf8_lossy(&o.stderr).to_string();
    let hint = format!("`release vm --discard --backup {old}`");
    assert!(note.contains(&hint), "{note}");
    // Following it discards the old staging only; the new session is served.
    let out = env.ok(&[
        "release",
        "--socket",
        &sock,
        "vm",
        "--discard",
        "--backup",
        &old,
    ]);
    assert!(out.contains(&format!("(backup {old})")), "{out}");
    let sessions = env.staging.join("sessions/vm");
    assert!(!sessions.join(&old).exists(), "the old staging stays");
    assert!(sessions.join(&new).exists(), "the served session went");
    assert_eq!(env.status()["sessions"][0]["backup"], new.as_str());
    env.fails(
        &[
            "release",
            "--socket",
            &sock,
            "vm",
            "--discard",
            "--backup",
            &old,
        ],
        "no kept staging of VM vm from backup",
    );
}

/// The repository bind-mounted read-only over itself; the bind is
/// removed on drop, even when the test fails.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn over(dir: &Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount {args:?} failed");
        };
        run(&["--bind"]);
        let ro = ReadOnly(dir.to_path_buf());
        run(&["-o", "remount,ro,bind"]);
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// explore10 H1: a session released while the repository took no writes
/// (read-only here; full in the report) was never pinned afterwards, so
/// `forget` removed the backup its unstaged blocks read. Now `release`
/// warns, `staging ls` says UNPINNED, and the daemon writes the pin once
/// the repository takes writes again: `forget` then keeps the backup.
#[test]
fn a_kept_session_released_into_a_read_only_repository_is_pinned_once_it_is_writable() {
    let env = Env::new();
    let img = env.path("a.raw");
    versioned_image(&img, 0, 0);
    let old = env.backup("vm", "64K", &[&img]);
    let repo = env.repo_str();
    let _d = env.serve();
    let ro = ReadOnly::over(&env.repo);
    env.recover("vm", Some(&old));
    let o = env.release("vm", false);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did not take the kept staging's pin"), "{err}");
    let ls = env.ok(&["staging", "ls", "--staging", env.staging.to_str().unwrap()]);
    assert!(ls.contains("UNPINNED"), "{ls}");
    drop(ro);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env
        .ok(&["pins", "ls", "--repo", repo, "vm"])
        .contains("kept")
    {
        assert!(Instant::now() < deadline, "the owed pin was never written");
        std::thread::sleep(Duration::from_millis(500));
    }
    let ls = env.ok(&["staging", "ls", "--staging", env.staging.to_str().unwrap()]);
    assert!(!ls.contains("UNPINNED"), "{ls}");
    versioned_image(&img, 1, 1);
    env.backup("vm", "64K", &[&img]);
    let out = env.ok(&["forget", "--repo", repo, "--keep-last", "1"]);
    assert!(
        out.contains("used by the kept staging of a recovery session"),
        "{out}"
    );
}
