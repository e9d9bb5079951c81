//! The session uploader (pre-copy for a recovered VM): after it stored the
//! blocks the guest changed, `backup --session` reads only the residue
//! (counted exactly) and the backup restores byte for byte to the disk at
//! the freeze; `gc` removes none of its chunks while it holds them; a
//! daemon killed mid-upload resumes without uploading recorded blocks
//! again; a damaged record is said in one line and every dirty block is
//! read instead. Guest writes go through the FUSE mount.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const K64: u64 = 64 << 10;
const MIB: u64 = 1 << 20;

/// A 64 MiB image with 8 MiB of random data scattered over it.
fn image(path: &Path, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..8 {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, i * 8 * MIB).unwrap();
    }
}

/// Writes random 64 KiB blocks `blocks` to the mounted `disk` (fsynced)
/// and to `expected`.
fn write_blocks(disk: &Path, expected: &Path, blocks: &[u64], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let open = |p: &Path| std::fs::OpenOptions::new().write(true).open(p).unwrap();
    let (d, e) = (open(disk), open(expected));
    let mut buf = vec![0u8; K64 as usize];
    for &b in blocks {
        rng.fill(&mut buf[..]);
        d.write_all_at(&buf, b * K64).unwrap();
        e.write_all_at(&buf, b * K64).unwrap();
    }
    d.sync_all().unwrap();
}

fn json_of(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn upload(env: &Env, extra: &[&str]) -> Value {
    let mut args = vec!["upload", "vm", "--json", "--socket"];
    args.push(env.socket.to_str().unwrap());
    args.extend(extra);
    json_of(&env.run(&args))
}

fn session_backup(env: &Env) -> Value {
    json_of(&env.run(&[
        "backup",
        "--session",
        "vm",
        "--json",
        "--socket",
        env.socket.to_str().unwrap(),
    ]))
}

/// Polls the uploader's status until `done` holds for it.
fn wait_upload(env: &Env, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = upload(env, &["--status"]);
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Recovers backup `id` (no session running), compares its disk with
/// `expected` byte for byte, discards it and verifies the repository.
fn assert_restores(env: &Env, id: &str, expected: &Path) {
    let disk = env.recover("vm", Some(id))[0].clone();
    assert!(
        read_all(&disk) == read_all(expected),
        "backup {id} does not restore to the disk at the freeze"
    );
    env.release_closed("vm", true);
    env.ok(&["verify", "--repo", env.repo_str()]);
}

#[test]
fn after_the_uploader_a_live_backup_reads_only_the_residue_and_restores_exactly_and_gc_keeps_uploaded_chunks(
) {
    let env = Env::new();
    let img = env.path("a.raw");
    image(&img, 1);
    let base = env.backup("vm", "64K", &[&img]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    // N = 200 blocks written, then uploaded in the background.
    let first: Vec<u64> = (0..200).map(|i| i * 5 + 1).collect();
    write_blocks(&disk, &img, &first, 2);
    // Bad input: one line, nothing started.
    let sock = env.socket.to_str().unwrap();
    env.fails(
        &["upload", "nosuch", "--socket", sock],
        "no recovery session",
    );
    env.fails(
        &["upload", "vm", "--load-limit", "speed=3", "--socket", sock],
        "expected latency=MS",
    );
    env.fails(
        &["upload", "vm", "--load-limit", "cpu=50", "--socket", sock],
        "not cpu",
    );
    env.fails(
        &["upload", "vm", "--status", "--socket", sock],
        "no uploader",
    );
    let st = upload(&env, &["--load-limit", "latency=50"]);
    assert_eq!(st["load_limit"]["latency_ms"], 50.0, "{st}");
    let st = wait_upload(&env, "upload of 200 blocks", |s| {
        s["residue"] == 0 && s["blocks_uploaded"] == 200
    });
    assert_eq!(st["state"], "idle", "{st}");
    assert_eq!(st["stored_blocks"], 200, "{st}");
    let text = env.ok(&["status", "--socket", sock]);
    assert!(
        text.contains("uploader: idle, 200 blocks uploaded, residue 0 blocks"),
        "{text}"
    );
    // gc while the uploaded chunks are referenced by no manifest: the
    // uploader's writer lock keeps it from removing any of them.
    let chunks = walk(&env.repo.join("chunks"));
    env.fails(
        &["gc", "--repo", env.repo_str(), "--wait", "1"],
        "in progress",
    );
    assert_eq!(walk(&env.repo.join("chunks")), chunks, "gc removed chunks");
    // Stop it, then M = 60 more writes: 20 over uploaded blocks, 40 new.
    upload(&env, &["--stop"]);
    let again: Vec<u64> = first.iter().copied().step_by(10).collect();
    assert_eq!(again.len(), 20);
    let fresh: Vec<u64> = (0..40).map(|i| i * 5 + 3).collect();
    write_blocks(&disk, &img, &again, 3);
    write_blocks(&disk, &img, &fresh, 4);
    let r = session_backup(&env);
    eprintln!("live backup after the uploader: {}", r["disks"][0]);
    let d0 = &r["disks"][0];
    assert_eq!(r["base"], base.as_str());
    assert_eq!(d0["blocks_frozen"], 240, "{r}");
    assert_eq!(d0["blocks_uploaded"], 180, "{r}");
    assert_eq!(d0["blocks_read"], 60, "{r}");
    assert_eq!(d0["uploaded_missing"], 0, "{r}");
    assert_eq!(r["read_bytes"], 60 * K64, "{r}");
    assert_eq!(r["fetched_bytes"], 0);
    // The next generation starts with nothing uploaded.
    let dir = env.staging.join("sessions/vm").join(&base);
    assert!(!dir.join("disk0.uploaded-0").exists());
    assert!(dir.join("disk0.uploaded-1").exists());
    let id = r["backup"].as_str().unwrap().to_string();
    env.release_closed("vm", false);
    assert_restores(&env, &id, &img);
    drop(d);
}

#[test]
fn upload_status_after_a_stop_says_stopped_with_what_was_uploaded() {
    let env = Env::new();
    let img = env.path("a.raw");
    image(&img, 5);
    env.backup("vm", "64K", &[&img]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    write_blocks(&disk, &img, &[1, 7, 9], 6);
    upload(&env, &[]);
    wait_upload(&env, "upload of 3 blocks", |s| s["blocks_uploaded"] == 3);
    assert_eq!(upload(&env, &["--stop"])["state"], "stopped");
    let st = upload(&env, &["--status"]);
    assert_eq!(st["state"], "stopped", "{st}");
    assert_eq!(st["running"], false, "{st}");
    assert_eq!(st["blocks_uploaded"], 3, "{st}");
    let sock = env.socket.to_str().unwrap();
    let text = env.ok(&["upload", "vm", "--status", "--socket", sock]);
    assert!(text.contains("VM vm: uploader stopped;"), "{text}");
    let text = env.ok(&["status", "--socket", sock]);
    assert!(
        text.contains("uploader: stopped, 3 blocks uploaded"),
        "{text}"
    );
    env.release_closed("vm", true);
}

#[test]
fn a_daemon_killed_mid_upload_resumes_without_uploading_recorded_blocks_again_and_a_damaged_record_falls_back(
) {
    let mut env = Env::new();
    let img = env.path("a.raw");
    image(&img, 5);
    let base = env.backup("vm", "64K", &[&img]);
    // Each chunk write takes a while: the upload is under way when killed.
    env.serve_args = vec!["--repo-delay-ms".into(), "40".into()];
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let blocks: Vec<u64> = (0..400).map(|i| i * 2 + 1).collect();
    write_blocks(&disk, &img, &blocks, 6);
    upload(&env, &[]);
    wait_upload(&env, "some blocks uploaded", |s| {
        s["blocks_uploaded"].as_u64().unwrap() >= 32
    });
    // gc in the middle of the upload: refused, nothing removed.
    let chunks = walk(&env.repo.join("chunks"));
    env.fails(
        &["gc", "--repo", env.repo_str(), "--wait", "1"],
        "in progress",
    );
    assert!(
        walk(&env.repo.join("chunks")) >= chunks,
        "gc removed chunks"
    );
    let before = wait_upload(&env, "100 blocks uploaded", |s| {
        s["blocks_uploaded"].as_u64().unwrap() >= 100
    });
    d.kill9();
    drop(d);
    let seen = before["blocks_uploaded"].as_u64().unwrap();
    assert!(seen < 400, "the upload finished before the kill: {before}");
    // The restarted daemon resumes the session and its uploader.
    let d = env.serve();
    let st = wait_upload(&env, "the rest uploaded", |s| s["residue"] == 0);
    eprintln!("killed at {seen} uploaded; resumed: {st}");
    let resumed = st["resumed_entries"].as_u64().unwrap();
    assert!(
        resumed >= seen,
        "entries recorded before the kill were lost: {st}"
    );
    assert_eq!(st["blocks_uploaded"], 400, "{st}");
    assert_eq!(
        st["stored_blocks"].as_u64().unwrap(),
        400 - resumed,
        "blocks recorded before the kill were uploaded again: {st}"
    );
    let r = session_backup(&env);
    assert_eq!(r["disks"][0]["blocks_read"], 0, "{r}");
    assert_eq!(r["disks"][0]["blocks_uploaded"], 400, "{r}");
    let id = r["backup"].as_str().unwrap().to_string();
    let at_first = std::fs::read(&img).unwrap();

    // Generation 1: 50 blocks uploaded, then the record is damaged while
    // the daemon is down (and the uploader is not resumed).
    let more: Vec<u64> = (0..50).map(|i| i * 7 + 2).collect();
    write_blocks(&disk, &img, &more, 7);
    wait_upload(&env, "50 more uploaded", |s| {
        s["residue"] == 0 && s["blocks_uploaded"] == 50
    });
    upload(&env, &["--stop"]);
    let mut d = d;
    d.kill9();
    drop(d);
    let rec = env
        .staging
        .join("sessions/vm")
        .join(&base)
        .join("disk0.uploaded-1");
    let f = std::fs::OpenOptions::new().write(true).open(&rec).unwrap();
    f.write_all_at(&[0xff; 8], 64 + 64 * 2 + 40).unwrap();
    drop(f);
    env.serve_args.clear();
    let d = env.serve();
    let log = d.log_text();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upload record dropped"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("damaged entry for block 2"), "{}", said[0]);
    let r = session_backup(&env);
    assert_eq!(r["disks"][0]["blocks_uploaded"], 0, "{r}");
    assert_eq!(r["disks"][0]["blocks_read"], 50, "{r}");
    let second = r["backup"].as_str().unwrap().to_string();
    env.release_closed("vm", false);
    assert_restores(&env, &second, &img);
    let first_img = env.path("first.raw");
    std::fs::write(&first_img, at_first).unwrap();
    assert_restores(&env, &id, &first_img);
    drop(d);
}
