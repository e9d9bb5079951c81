//! The repository on a real S3 store: Garage nodes started on loopback.

mod common;

use std::os::unix::fs::FileExt;

use common::garage::{Garage, BUCKET};
use common::proxy::LatencyProxy;
use common::*;

const K64: usize = 64 << 10;

fn s3_env(g: &Garage, prefix: &str) -> Env {
    Env::s3(&format!("s3://{BUCKET}/{prefix}"), g.env(0))
}

#[test]
fn backup_to_s3_recover_from_s3_and_compare_bytes() {
    let g = Garage::single();
    let env = s3_env(&g, "site-a");
    let a = random_image(&env.path("a.raw"), 40 * K64 + 321, 41, K64);
    let b = random_image(&env.path("b.raw"), 9 * K64, 42, K64);
    let id = env.backup("vm", "64K", &[&env.path("a.raw"), &env.path("b.raw")]);
    // Deduplication works the same: a second backup stores nothing new.
    let id2 = env.backup("vm", "64K", &[&env.path("a.raw"), &env.path("b.raw")]);
    assert_ne!(id, id2);
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["list", "--repo", env.repo_str(), "--json"])).unwrap();
    let backups = list["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2);
    assert_eq!(backups[1]["new_bytes"], 0, "{list}");
    env.ok(&["verify", "--repo", env.repo_str()]);

    let _d = env.serve();
    let disks = env.recover("vm", Some(&id));
    assert!(read_all(&disks[0]) == a, "disk0 differs");
    assert!(read_all(&disks[1]) == b, "disk1 differs");
    let st = env.settled_disk_status("vm", 0);
    assert_eq!(st["fetched_blocks"], st["blocks_staged"]);

    // Damage one object in the bucket: verify names it, reads of it fail.
    let digest = blake3::hash(&a[..K64]).to_hex().to_string();
    let repo = recoverfs::repo::Repository::open_with(env.repo_str(), &g.env(0)).unwrap();
    let key = format!("chunks/{}/{digest}", &digest[..4]);
    let mut obj = repo
        .backend()
        .get(&key, u64::MAX)
        .unwrap()
        .expect("chunk object exists");
    let n = obj.len();
    obj[n / 2] ^= 0x42;
    repo.backend().put(&key, &obj).unwrap();
    let o = env.run(&["verify", "--repo", env.repo_str()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&digest),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn two_daemons_recover_the_same_vm_from_one_bucket_at_once_when_the_second_is_told_to() {
    let g = Garage::single();
    let env = s3_env(&g, "");
    let data = random_image(&env.path("a.raw"), 64 * K64, 43, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d1 = env.serve();
    let st2 = env.path("staging2");
    let m2 = env.path("mnt2");
    std::fs::create_dir(&m2).unwrap();
    let s2 = env.path("s2.sock");
    let _d2 = Daemon::start(&env, &st2, &m2, &s2);
    let disk1 = env.recover("vm", None)[0].clone();
    // Not without being asked: the first daemon serves it.
    let o = env.run(&["recover", "--socket", s2.to_str().unwrap(), "vm"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("VM vm is served by a recoverfs daemon on host")
            && err.contains("--second-copy"),
        "{err}"
    );
    let o = env.run(&[
        "recover",
        "--socket",
        s2.to_str().unwrap(),
        "vm",
        "--second-copy",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let disk2 = m2.join("vm/disk0.raw");
    let t = std::thread::spawn(move || read_all(&disk2));
    let r1 = read_all(&disk1);
    let r2 = t.join().unwrap();
    assert!(
        r1 == data && r2 == data,
        "both recoveries must read the backup"
    );
    // Writes of one host stay in its own staging.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk1)
        .unwrap()
        .write_all_at(b"host-1", 0)
        .unwrap();
    let mut buf = [0u8; 6];
    std::fs::File::open(m2.join("vm/disk0.raw"))
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, &data[..6]);
}

#[test]
fn reads_continue_when_one_of_three_replicas_stops() {
    let mut g = Garage::start(3);
    let env = s3_env(&g, "");
    let data = random_image(&env.path("a.raw"), 48 * K64, 44, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let f = std::fs::File::open(&disk).unwrap();
    let mut half = vec![0u8; 24 * K64];
    f.read_exact_at(&mut half, 0).unwrap();
    assert!(half[..] == data[..24 * K64]);
    // Stop a node that is not the one we talk to; the rest of the disk
    // still reads from the two remaining replicas.
    g.stop_node(2);
    let mut rest = vec![0u8; 24 * K64];
    f.read_exact_at(&mut rest, 24 * K64 as u64).unwrap();
    assert!(
        rest[..] == data[24 * K64..],
        "reads after a node stopped returned wrong data"
    );
    assert_eq!(env.disk_status("vm", 0)["fetch_errors"], 0);
}

#[test]
fn a_store_that_stops_answering_gives_eio_named_in_the_log() {
    let mut g = Garage::single();
    let env = s3_env(&g, "");
    let data = random_image(&env.path("a.raw"), 16 * K64, 45, K64);
    assert!(
        data[8 * K64..9 * K64].iter().any(|&b| b != 0),
        "block 8 must be stored"
    );
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let f = std::fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    g.stop_node(0);
    let e = f.read_exact_at(&mut buf, 8 * K64 as u64).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Staged data still reads while the store is gone.
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == data[..4096]);
    let st = env.status();
    assert!(
        st["sessions"][0]["repo_retries"].as_u64().unwrap() > 0,
        "{st}"
    );
    assert!(
        st["sessions"][0]["disks"][0]["fetch_errors"]
            .as_u64()
            .unwrap()
            >= 1,
        "{st}"
    );
    let digest = blake3::hash(&data[8 * K64..9 * K64]).to_hex().to_string();
    let log = d.log_text();
    assert!(
        log.contains("fetch failed") && log.contains(&digest),
        "the log must name the chunk: {log}"
    );
}

#[test]
fn recovery_through_the_latency_proxy_reads_identical_bytes() {
    let g = Garage::single();
    let proxy = LatencyProxy::start(g.nodes[0].s3_port, 2, Some(200));
    let vars = proxy.route(g.env(0));
    let env = Env::s3(&format!("s3://{BUCKET}/proxied"), vars);
    let data = random_image(&env.path("a.raw"), 32 * K64 + 5, 46, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    assert!(read_all(&disk) == data);
}

#[test]
fn tiny_vm_boots_from_an_s3_backed_recovery() {
    let g = Garage::single();
    let env = s3_env(&g, "boot");
    let image = tiny_image();
    env.backup("tiny", "64K", &[&image]);
    let o = env.verify_boot("tiny", "RECOVERFS-TINY-UP boot=1");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn concurrent_backups_of_one_vm_never_overwrite_each_other() {
    let g = Garage::single();
    let env = s3_env(&g, "race");
    let images: Vec<Vec<u8>> = (0..4)
        .map(|i| random_image(&env.path(&format!("{i}.raw")), 4 * K64, 60 + i, K64))
        .collect();
    // Four writers in the same second: their time-based ids collide.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let barrier = barrier.clone();
            let (repo, img) = (env.repo_str().to_string(), env.path(&format!("{i}.raw")));
            let envs = g.env(0);
            std::thread::spawn(move || {
                barrier.wait();
                let o = std::process::Command::new(bin())
                    .args([
                        "backup",
                        "--repo",
                        &repo,
                        "--vm",
                        "vm",
                        "--chunk-size",
                        "64K",
                    ])
                    .arg(&img)
                    .envs(envs)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                String::from_utf8(o.stdout).unwrap().trim().to_string()
            })
        })
        .collect();
    let ids: Vec<String> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "backup ids {ids:?}");
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["list", "--repo", env.repo_str(), "--json"])).unwrap();
    assert_eq!(list["backups"].as_array().unwrap().len(), 4, "{list}");
    // Each backup still holds its own writer's disk.
    let _d = env.serve();
    for (id, img) in ids.iter().zip(&images) {
        let disk = env.recover("vm", Some(id))[0].clone();
        assert!(
            read_all(&disk) == *img,
            "backup {id} holds another writer's disk"
        );
        assert!(env.release("vm", true).status.success());
    }
}

#[test]
fn a_kept_session_resumes_from_its_manifest_copy_while_the_store_is_down() {
    let mut g = Garage::single();
    let env = s3_env(&g, "offline");
    let mut data = random_image(&env.path("a.raw"), 16 * K64, 64, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    assert!(read_all(&disk) == data, "stages the whole disk");
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(b"written before the outage", 100).unwrap();
    f.sync_all().unwrap();
    drop(f);
    data[100..125].copy_from_slice(b"written before the outage");
    assert!(env.release("vm", false).status.success());
    g.stop_node(0);
    let disk = env.recover("vm", None)[0].clone();
    assert!(
        read_all(&disk) == data,
        "the resumed session reads differently"
    );
}

#[test]
fn a_daemon_restarted_after_a_crash_while_the_store_is_down_serves_what_staging_holds() {
    let mut g = Garage::single();
    let env = s3_env(&g, "restart-offline");
    let mut data = random_image(&env.path("a.raw"), 16 * K64, 65, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    assert!(read_all(&disk) == data, "stages the whole disk");
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(b"written before the crash", 100).unwrap();
    f.sync_all().unwrap();
    drop(f);
    data[100..124].copy_from_slice(b"written before the crash");
    d.kill9();
    std::mem::forget(d);
    g.stop_node(0);
    let d = env.serve();
    assert!(d.log_text().contains("does not answer"), "{}", d.log_text());
    let disk = env.recover("vm", None)[0].clone();
    assert!(
        read_all(&disk) == data,
        "the restarted daemon serves the staged disk and the guest's write"
    );
}

#[test]
fn forget_and_gc_on_s3_remove_only_unreferenced_chunks_and_a_racing_backup_keeps_its_chunks() {
    let g = Garage::single();
    let env = s3_env(&g, "gc");
    let img = env.path("a.raw");
    let mut ids = vec![];
    for seed in 0..3 {
        random_image(&img, 24 * K64, 700 + seed, K64);
        ids.push(env.backup("vm", "64K", &[&img]));
    }
    let repo = recoverfs::repo::Repository::open_with(env.repo_str(), &g.env(0)).unwrap();
    let chunks = || repo.backend().list_all("chunks").unwrap().len() as u64;
    let before = chunks();
    env.ok(&["forget", "--repo", env.repo_str(), "--keep-last", "1"]);
    assert_eq!(repo.backup_ids("vm").unwrap(), vec![ids[2].clone()]);
    let out: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--repo", env.repo_str(), "--json"])).unwrap();
    let removed = out["removed_chunks"].as_u64().unwrap();
    assert!(removed > 0, "{out}");
    assert_eq!(chunks(), before - removed);
    env.ok(&["verify", "--repo", env.repo_str()]);

    // Bring back the first two images' chunks, forget them again, and
    // collect while a backup of the first image (reusing exactly the
    // chunks gc is about to remove) runs from another process.
    for seed in [700, 701, 702] {
        random_image(&img, 24 * K64, seed, K64);
        env.backup("vm", "64K", &[&img]);
    }
    env.ok(&["forget", "--repo", env.repo_str(), "--keep-last", "1"]);
    random_image(&img, 24 * K64, 700, K64);
    std::thread::scope(|s| {
        let b = s.spawn(|| env.backup("vm", "64K", &[&img]));
        env.ok(&["gc", "--repo", env.repo_str()]);
        b.join().unwrap();
    });
    for id in repo.backup_ids("vm").unwrap() {
        let m = repo.manifest("vm", &id).unwrap();
        for c in m.disks.iter().flat_map(|d| d.chunks.digests()) {
            assert!(repo.has_chunk(c).unwrap(), "backup {id} lost chunk {c}");
        }
    }
    env.ok(&["verify", "--repo", env.repo_str()]);
}

#[test]
fn an_encrypted_repository_on_s3_dedups_verifies_and_holds_no_plaintext() {
    let g = Garage::single();
    let mut env = s3_env(&g, "enc");
    let key = env.path("s3.key");
    env.extra_env
        .push(("RECOVERFS_KEY_FILE".into(), key.display().to_string()));
    env.ok(&["init", "--repo", env.repo_str(), "--encrypt"]);
    let img = env.path("a.raw");
    let marker = b"S3-PLAINTEXT-MARKER-91c2";
    let mut data = random_image(&img, 16 * K64, 910, K64);
    for c in 0..16 {
        data[c * K64 + 10..c * K64 + 10 + marker.len()].copy_from_slice(marker);
    }
    std::fs::write(&img, &data).unwrap();
    env.backup("vm", "64K", &[&img]);
    env.backup("vm", "64K", &[&img]);
    let out = env.ok(&["verify", "--repo", env.repo_str()]);
    assert!(out.contains("encrypted repository"), "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["list", "--repo", env.repo_str(), "--json"])).unwrap();
    assert_eq!(list["backups"][1]["new_bytes"], 0, "{list}");
    let keys = recoverfs::repo::crypto::load_key_file(&key, None).unwrap();
    let repo = recoverfs::repo::Repository::open_with(env.repo_str(), &g.env(0))
        .err()
        .unwrap();
    assert!(repo.to_string().contains("is encrypted"), "{repo}");
    let b = recoverfs::repo::s3::S3Backend::open(env.repo_str(), &g.env(0)).unwrap();
    let repo = recoverfs::repo::Repository::open_backend_keyed(Box::new(b), Some(keys)).unwrap();
    let objects = repo.backend().list_all("").unwrap();
    assert!(objects.len() > 10);
    for o in objects {
        let bytes = repo.backend().get(&o.key, 1 << 30).unwrap().unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "{} holds the marker",
            o.key
        );
    }
}

/// explore7 M2: a store that accepts connections and never answers. A
/// daemon with a kept session comes up from staging's record after one
/// short identity probe (it took 4.5 min: a series of 30 s timeouts, then
/// a second one on the start path) and stops within seconds (it took 3
/// min: pin rewrites retried against the silent store).
#[test]
fn a_daemon_whose_store_never_answers_starts_and_stops_within_seconds() {
    use std::time::{Duration, Instant};
    let g = Garage::single();
    let mut env = s3_env(&g, "silent");
    random_image(&env.path("a.raw"), 16 * K64, 44, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    d.stop();
    drop(d);
    let proxy = LatencyProxy::start(g.nodes[0].s3_port, 40_000, None);
    env.extra_env = proxy.route(g.env(0));
    let t0 = Instant::now();
    let mut d = env.serve();
    let up = t0.elapsed();
    let log = d.log_text();
    assert!(up < Duration::from_secs(15), "came up in {up:?}: {log}");
    assert!(log.contains("starting from staging"), "{log}");
    // The API answers (and its signal handler is in place).
    assert_eq!(env.status()["sessions"][0]["vm"], "vm");
    let t1 = Instant::now();
    let st = d.stop();
    let stopped = t1.elapsed();
    let log = d.log_text();
    assert!(
        stopped < Duration::from_secs(8),
        "stopped in {stopped:?}: {log}"
    );
    assert!(log.contains("nothing more is asked of it"), "{log}");
    assert!(st.success(), "{st}: {log}");
    drop(d);
    // The pin not rewritten at that stop is rewritten at the next start.
    drop(proxy);
    env.extra_env = g.env(0);
    let restarted = recoverfs::util::rfc3339(recoverfs::util::now_unix());
    let d = env.serve();
    assert_eq!(env.status()["sessions"][0]["vm"], "vm");
    let repo = recoverfs::repo::Repository::open_with(env.repo_str(), &g.env(0)).unwrap();
    let pins = recoverfs::repo::pins::of_vm(&repo, "vm").unwrap();
    assert_eq!(pins.len(), 1, "{pins:?}");
    assert!(pins[0].written >= restarted, "{pins:?} {restarted}");
    assert_eq!(pins[0].state, "serving");
    drop(d);
}

/// explore7 L1: a bucket that does not exist is named as such (it said
/// "not a recoverfs repository (no repo.json)"), and neither it nor a
/// wrong secret is retried (each was, five times, one warning a retry).
#[test]
fn a_missing_bucket_and_a_wrong_secret_fail_at_once_saying_what_to_fix() {
    let g = Garage::single();
    let img = tiny_image();
    let env = Env::s3("s3://no-such-bucket/site", g.env(0));
    let t0 = std::time::Instant::now();
    env.fails(
        &[
            "backup",
            "--repo",
            env.repo_str(),
            "--vm",
            "vm",
            img.to_str().unwrap(),
        ],
        &format!(
            "S3 bucket \"no-such-bucket\" does not exist at http://127.0.0.1:{}: GET repo.json answered NoSuchBucket",
            g.nodes[0].s3_port
        ),
    );
    env.fails(
        &["list", "--repo", env.repo_str()],
        "S3 bucket \"no-such-bucket\" does not exist at http://127.0.0.1:",
    );
    let mut wrong = g.env(0);
    for (k, v) in wrong.iter_mut() {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = "f".repeat(64);
        }
    }
    let env = Env::s3(&format!("s3://{BUCKET}/site"), wrong);
    env.fails(
        &[
            "backup",
            "--repo",
            env.repo_str(),
            "--vm",
            "vm",
            img.to_str().unwrap(),
        ],
        "access denied to bucket recoverfs-test: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
}

/// `serve` run to its end (or killed after `limit`: `None`): its exit
/// status and what it wrote to stderr.
fn serve_to_end(env: &Env, staging: &str, limit: std::time::Duration) -> (Option<i32>, String) {
    let log = env.path("serve-to-end.log");
    let mut c = std::process::Command::new(bin())
        .args(["serve", "--repo", env.repo_str(), "--staging"])
        .arg(env.path(staging))
        .arg("--mount")
        .arg(env.path("mnt"))
        .arg("--socket")
        .arg(env.path("control.sock"))
        .env("RUST_LOG", "warn")
        .envs(env.extra_env.iter().cloned())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let code = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st.code();
        }
        if t0.elapsed() > limit {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&log).unwrap())
}

/// `garage bucket ARGS` on node 0.
fn garage_bucket(g: &Garage, args: &[&str]) {
    let o = std::process::Command::new(common::garage::garage_bin())
        .arg("-c")
        .arg(&g.nodes[0].config)
        .arg("bucket")
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// fixstart: a store that answered that the bucket does not exist (or
/// refused the request as malformed: a wrong region; or the key) was
/// taken for a store away, and waited. With a fresh staging directory it
/// is a configuration to fix: the start fails at once with one line
/// naming bucket and endpoint, nothing mounted. With a staging directory
/// that records this very repository (review29 M2: a store still
/// syncing, a failover, keys rotated) the VMs come first: the start goes
/// on degraded, saying so as an error, and carries on once the store
/// answers as itself again.
#[test]
fn a_refusing_store_fails_a_fresh_start_at_once_and_starts_a_recorded_staging_degraded() {
    use std::time::{Duration, Instant};
    let g = Garage::single();
    let mut env = s3_env(&g, "gone");
    random_image(&env.path("a.raw"), 4 * K64, 45, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    d.stop();
    drop(d);
    // The bucket, known by another name only: as if removed, or another
    // store at the endpoint.
    garage_bucket(&g, &["alias", BUCKET, "moved-away"]);
    garage_bucket(&g, &["unalias", BUCKET]);
    let mnt = env.path("mnt").to_str().unwrap().to_string();
    let mounted = || {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(&mnt)
    };
    let t0 = Instant::now();
    let (code, err) = serve_to_end(&env, "fresh-staging", Duration::from_secs(20));
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let line = format!(
        "recoverfs: error: S3 bucket \"{BUCKET}\" does not exist at http://127.0.0.1:{}: GET repo.json answered NoSuchBucket",
        g.nodes[0].s3_port
    );
    assert!(err.lines().any(|l| l.starts_with(&line)), "{err}");
    assert!(!mounted(), "{err}");
    assert!(!env.path("control.sock").exists());
    assert!(
        !env.path("fresh-staging").exists(),
        "a refused start made a staging directory"
    );
    // The staging that records it: degraded, the session served, the
    // refusal an error line.
    let d = env.serve();
    assert_eq!(env.status()["sessions"][0]["vm"], "vm");
    let log = d.log_text();
    assert!(
        log.contains("ERROR")
            && log.contains("the store refuses this repository")
            && log.contains("does not exist"),
        "{log}"
    );
    drop(d);
    // A wrong region (400 AuthorizationHeaderMalformed) and a wrong
    // secret (403): refused fresh, degraded over the recorded staging.
    garage_bucket(&g, &["alias", "moved-away", BUCKET]);
    let good = g.env(0);
    let set = |k: &str, v: &str| {
        let mut e = good.clone();
        e.iter_mut()
            .filter(|(n, _)| n == k)
            .for_each(|(_, x)| *x = v.into());
        e
    };
    for (wrong, says) in [
        (
            set("AWS_REGION", "us-east-1"),
            "AuthorizationHeaderMalformed",
        ),
        (
            set("AWS_SECRET_ACCESS_KEY", &"f".repeat(64)),
            "access denied to bucket",
        ),
    ] {
        env.extra_env = wrong;
        let (code, err) = serve_to_end(&env, "fresh-staging", Duration::from_secs(20));
        assert!(code.is_some_and(|c| c != 0), "{code:?}: {err}");
        assert!(
            err.contains("recoverfs: error: ") && err.contains(says),
            "{err}"
        );
        assert!(!mounted(), "{err}");
        let d = env.serve();
        assert_eq!(env.status()["sessions"][0]["vm"], "vm");
        let log = d.log_text();
        assert!(
            log.contains("the store refuses this repository") && log.contains(says),
            "{log}"
        );
        drop(d);
    }
    // With the store right again, the session resumes, not degraded.
    env.extra_env = good.clone();
    let d = env.serve();
    assert_eq!(env.status()["sessions"][0]["vm"], "vm");
    assert!(!d.log_text().contains("starting from staging"));
    // review30 L5: released (kept), nothing is left to serve: a refusing
    // store fails the start over the recorded staging too, at once.
    let o = env.release("vm", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(d);
    env.extra_env = set("AWS_SECRET_ACCESS_KEY", &"f".repeat(64));
    let t0 = Instant::now();
    let (code, err) = serve_to_end(&env, "staging", Duration::from_secs(20));
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(
        err.contains("access denied to bucket")
            && err.contains("holds no session of it to serve without it"),
        "{err}"
    );
    assert!(!mounted(), "{err}");
}

/// The latency proxy on `port` stopped (SIGSTOP) while this lives: the
/// kernel still accepts connections to it and takes requests, and nothing
/// answers, as a store that hangs. Continued when dropped.
struct Frozen(i32);

impl Frozen {
    fn proxy(port: u16) -> Frozen {
        let listen = format!("127.0.0.1:{port}");
        let pid = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
                args.iter().any(|a| a.ends_with(b"latency-proxy.py"))
                    && args.contains(&listen.as_bytes())
            })
            .expect("the latency proxy's process");
        // SAFETY: a signal to the proxy this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// One 64 KiB block of `disk` read with O_DIRECT (past the kernel's page
/// cache: the daemon answers it); how long it took.
fn read_direct(
    disk: &std::path::Path,
    block: u64,
) -> (std::io::Result<Vec<u8>>, std::time::Duration) {
    use std::os::unix::fs::OpenOptionsExt;
    let t = std::time::Instant::now();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(disk)
        .unwrap();
    let mut buf = vec![0u8; K64 + 4096];
    let at = buf.as_ptr().align_offset(4096);
    let r = f
        .read_exact_at(&mut buf[at..at + K64], block * K64 as u64)
        .map(|()| buf[at..at + K64].to_vec());
    (r, t.elapsed())
}

/// fixs3b: a store that answered and then hangs (accepts connections,
/// never replies) failed a read of a block not yet staged only after six
/// per-attempt timeouts (3 min with the default 30 s), longer than a
/// guest waits for its disk. With `AWS_TIMEOUT=2s` the deadline is 4 s.
#[test]
fn a_store_that_hangs_fails_unstaged_reads_at_the_deadline_and_staged_blocks_still_read() {
    use std::time::{Duration, Instant};
    let g = Garage::single();
    let proxy = LatencyProxy::start(g.nodes[0].s3_port, 0, None);
    let mut env = Env::s3(&format!("s3://{BUCKET}/hangs"), proxy.route(g.env(0)));
    let data = random_image(&env.path("a.raw"), 16 * K64, 47, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    env.extra_env.push(("AWS_TIMEOUT".into(), "2s".into()));
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let (r, _) = read_direct(&disk, 0);
    assert!(r.unwrap() == data[..K64]);
    env.settled_disk_status("vm", 0);

    let frozen = Frozen::proxy(proxy.port);
    // Two readers of one block (one fetch, two waiters), one of another.
    let readers: Vec<_> = [8u64, 8, 12]
        .into_iter()
        .map(|b| {
            let disk = disk.clone();
            std::thread::spawn(move || read_direct(&disk, b))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile a staged block reads at once, and `status` answers.
    let (r, took) = read_direct(&disk, 0);
    assert!(r.unwrap() == data[..K64]);
    assert!(
        took < Duration::from_millis(500),
        "a staged read took {took:?}"
    );
    let t = Instant::now();
    let st = env.status();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "status took {:?}",
        t.elapsed()
    );
    assert!(
        st["sessions"][0]["disks"][0]["fetches_in_flight"].as_u64() >= Some(2),
        "{st}"
    );
    for r in readers {
        let (r, took) = r.join().unwrap();
        let e = r.expect_err("a read of a block not staged while the store hangs");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        assert!(
            took < Duration::from_secs(4 + 3),
            "the read failed after {took:?}: {}",
            d.log_text()
        );
    }
    let log = d.log_text();
    assert!(
        log.contains(&format!("(chunk) in bucket {BUCKET}: no answer in 4 s")),
        "{log}"
    );
    // The failure is not remembered: once the store answers, it reads.
    drop(frozen);
    let (r, took) = read_direct(&disk, 8);
    assert!(r.unwrap() == data[8 * K64..9 * K64], "{took:?}");
    let (r, _) = read_direct(&disk, 12);
    assert!(r.unwrap() == data[12 * K64..13 * K64]);
}
