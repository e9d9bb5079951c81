//! Operational profiles and the fetch scheduler, end to end: the real
//! binary on a real FUSE mount, real QEMU, and a real Garage store behind
//! the latency proxy.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::garage::{Garage, BUCKET};
use common::proxy::LatencyProxy;
use common::*;
use serde_json::Value;

const K64: usize = 64 << 10;
const MARKER: &str = "RECOVERFS-TINY-UP boot=1";

/// One 64 KiB block read with O_DIRECT (no kernel readahead, no page
/// cache); returns how long it took.
fn read_block(disk: &Path, block: u64) -> Duration {
    let t = Instant::now();
    let o = Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .args([
            "of=/dev/null",
            "bs=64K",
            "count=1",
            "iflag=direct",
            "status=none",
        ])
        .arg(format!("skip={block}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    t.elapsed()
}

fn profile_json(env: &Env, vm: &str) -> Value {
    serde_json::from_str(&env.ok(&["profile", "show", "--repo", env.repo_str(), vm, "--json"]))
        .unwrap()
}

/// Polls the disk's status until `done` holds; returns that status.
fn wait_status(env: &Env, vm: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = env.disk_status(vm, 0);
        if done(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn verify_boot_records_a_profile_that_stages_the_next_boot_before_it_reads() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let o = env.verify_boot("tiny", MARKER);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = profile_json(&env, "tiny");
    assert_eq!(p["recordings"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["recordings"][0]["source"], "verify-boot");
    let planned = p["disks"][0]["blocks"].as_u64().unwrap();
    assert!(planned > 10, "the boot read more than a few blocks: {p}");

    let _d = env.serve();
    let disk = env.recover("tiny", None)[0].clone();
    let st = wait_status(&env, "tiny", "the profile to be staged", |st| {
        st["profile_coverage"].as_f64() == Some(1.0)
    });
    assert_eq!(st["profile"]["source"], "recorded");
    // Zero blocks the boot read need no fetch and are left out.
    let blocks = st["profile"]["blocks"].as_u64().unwrap();
    assert!(blocks <= planned && blocks * 10 >= planned * 9, "{st}");
    assert_eq!(
        st["reads"].as_u64(),
        Some(0),
        "staged before the guest read anything"
    );

    assert_eq!(boot_counter_of(&disk, "boot with a profile"), 1);
    let st = env.disk_status("tiny", 0);
    let (first, hits) = (
        st["profile"]["first_reads"].as_f64().unwrap(),
        st["profile"]["first_read_hits"].as_f64().unwrap(),
    );
    assert!(
        hits / first >= 0.9,
        "{hits} of {first} first reads found their block staged: {st}"
    );
    let ratio = st["profile_hit_ratio"].as_f64().unwrap();
    assert!((0.9..=1.0).contains(&ratio), "{st}");

    // The session's own reads become a second recording at release.
    assert!(env.release("tiny", true).status.success());
    let p = profile_json(&env, "tiny");
    let sources: Vec<&str> = p["recordings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["verify-boot", "session"]);
}

#[test]
fn profiles_export_import_clear_and_skip_blocks_whose_chunk_changed() {
    let env = Env::new();
    let mut data = random_image(&env.path("a.raw"), 64 * K64, 8, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    {
        let _d = env.serve();
        let disk = env.recover("vm", None)[0].clone();
        for b in [5, 3, 40] {
            read_block(&disk, b);
        }
        assert!(env.release("vm", true).status.success());
    }
    let p = profile_json(&env, "vm");
    let order: Vec<u64> = p["disks"][0]["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap())
        .collect();
    assert_eq!(order, [5, 3, 40], "first-access order: {p}");
    let text = env.ok(&["profile", "show", "--repo", env.repo_str(), "vm"]);
    assert!(text.contains("disk0: 3 blocks"), "{text}");

    let file = env.path("vm.profile.json");
    let f = file.to_str().unwrap();
    env.ok(&["profile", "export", "--repo", env.repo_str(), "vm", "-o", f]);
    env.ok(&["profile", "clear", "--repo", env.repo_str(), "vm"]);
    assert_eq!(
        profile_json(&env, "vm")["recordings"],
        serde_json::json!([])
    );
    env.fails(
        &["profile", "export", "--repo", env.repo_str(), "vm"],
        "no operational profile",
    );
    env.ok(&["profile", "import", "--repo", env.repo_str(), "vm", f]);
    assert_eq!(
        profile_json(&env, "vm"),
        p,
        "import restores what export wrote"
    );

    env.fails(
        &["profile", "show", "--repo", env.repo_str(), "nosuchvm"],
        "unknown VM",
    );
    std::fs::write(env.path("junk.json"), b"{\"not\": \"a profile\"}").unwrap();
    env.fails(
        &[
            "profile",
            "import",
            "--repo",
            env.repo_str(),
            "vm",
            env.path("junk.json").to_str().unwrap(),
        ],
        "not a recoverfs profile",
    );

    // A new backup in which block 40 changed: the profile maps by block
    // position and leaves the changed block out.
    data[40 * K64..41 * K64].fill(0x5a);
    std::fs::write(env.path("a.raw"), &data).unwrap();
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let st = wait_status(&env, "vm", "the profile to be staged", |st| {
        st["profile_coverage"].as_f64() == Some(1.0)
    });
    assert_eq!(st["profile"]["blocks"], 2, "{st}");
    assert_eq!(st["blocks_staged"], 2, "{st}");
}

/// explore7 M3 and L2: a damaged profile stopped `gc` while `verify`
/// said all was well, and gc's advice (delete by hand) needs another tool
/// on S3; `profile export -o NAME` (no directory) wrote the file and then
/// failed to sync "the directory ''".
#[test]
fn verify_reports_a_damaged_profile_and_gc_names_the_command_that_removes_it() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 16 * K64, 4, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    {
        let _d = env.serve();
        let disk = env.recover("vm", None)[0].clone();
        read_block(&disk, 3);
        assert!(env.release("vm", true).status.success());
    }
    let out = Command::new(bin())
        .args([
            "profile",
            "export",
            "--repo",
            env.repo_str(),
            "vm",
            "-o",
            "bare.json",
        ])
        .current_dir(env.path(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.path("bare.json").is_file());

    let key = Path::new(env.repo_str()).join("profiles/vm.json");
    std::fs::write(&key, b"garbage\n").unwrap();
    let e = env.fails(&["verify", "--repo", env.repo_str()], "1 damaged object(s)");
    let o = env.run(&["verify", "--repo", env.repo_str()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("DAMAGED profile of VM vm") && text.contains("profile clear --repo"),
        "verify names the damaged profile and the fix: {text} / {e}"
    );
    env.fails(
        &["verify", "--repo", env.repo_str(), "--vm", "vm"],
        "damaged",
    );
    // One backup's chunks: the profile is not the backup's.
    let id = std::fs::read_dir(Path::new(env.repo_str()).join("backups/vm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find_map(|n| n.strip_suffix(".json").map(str::to_string))
        .unwrap();
    env.ok(&["verify", "--repo", env.repo_str(), "--backup", &id]);
    env.fails(
        &["gc", "--repo", env.repo_str(), "--dry-run"],
        &format!(
            "`recoverfs profile clear --repo {} vm` removes it",
            env.repo_str()
        ),
    );
    env.ok(&["profile", "clear", "--repo", env.repo_str(), "vm"]);
    env.ok(&["verify", "--repo", env.repo_str()]);
    env.ok(&["gc", "--repo", env.repo_str(), "--dry-run"]);
}

#[test]
fn a_profile_of_another_vm_is_imported_only_onto_the_same_disks_or_with_other_vm() {
    let env = Env::new();
    random_image(&env.path("big.raw"), 8 * K64, 1, K64);
    random_image(&env.path("small.raw"), 2 * K64, 2, K64);
    let (big, small) = (env.path("big.raw"), env.path("small.raw"));
    let a = env.backup("a", "64K", &[&big, &small]);
    env.backup("b", "64K", &[&big]);
    env.backup("c", "64K", &[&big, &small]);
    let doc = serde_json::json!({"format": "recoverfs-profile-1", "vm": "a", "recordings": [
        {"recorded": "2026-11-24T00:00:00Z", "backup": a, "source": "session",
         "disks": [{"index": 1, "block_size": 65536, "accesses": [[1, 100, null]]}]}]});
    std::fs::write(env.path("a.json"), doc.to_string()).unwrap();
    let (repo, f) = (env.repo_str(), env.path("a.json"));
    let f = f.to_str().unwrap();
    env.fails(
        &["profile", "import", "--repo", repo, "b", f],
        "VM a had 2 disk(s): 512.0 KiB, 128.0 KiB where VM b has 1 disk(s): 512.0 KiB; --other-vm imports it anyway",
    );
    assert_eq!(
        profile_json(&env, "b")["recordings"],
        serde_json::json!([]),
        "nothing stored"
    );
    env.ok(&["profile", "import", "--repo", repo, "c", f]);
    assert_eq!(
        profile_json(&env, "c")["recordings"][0]["backup"],
        a.as_str()
    );
    env.ok(&["profile", "import", "--repo", repo, "b", f, "--other-vm"]);
    assert_eq!(profile_json(&env, "b")["vm"], "b");
}

#[test]
fn an_on_demand_read_during_heavy_prefetch_is_served_within_one_fetch_latency() {
    const BLOCKS: usize = 512;
    let g = Garage::single();
    let spec = format!("s3://{BUCKET}/priority");
    // Back up straight to the store; serve through 100 ms of latency.
    let direct = Env::s3(&spec, g.env(0));
    random_image(&direct.path("a.raw"), BLOCKS * K64, 9, K64);
    direct.backup("vm", "64K", &[&direct.path("a.raw")]);
    let proxy = LatencyProxy::start(g.nodes[0].s3_port, 100, None);
    let mut env = Env::s3(&spec, proxy.route(g.env(0)));
    // Session 1 measures a plain miss: nothing may be staged ahead of it.
    env.serve_args = vec!["--no-default-profile".into()];
    let _d = env.serve();

    // Session 1: one cold read is one fetch latency; then a full scan
    // records a profile of every block.
    let disk = env.recover("vm", None)[0].clone();
    let one_fetch = read_block(&disk, 300);
    read_all(&disk);
    assert!(env.release("vm", true).status.success());
    let p = profile_json(&env, "vm");
    assert_eq!(
        p["disks"][0]["blocks"], BLOCKS as u64,
        "every block was read: {p}"
    );

    // Session 2: the profile queues every block at once; a guest miss on a
    // block near its end must not wait behind the queue.
    let disk = env.recover("vm", None)[0].clone();
    wait_status(&env, "vm", "the prefetch to start", |st| {
        st["fetched_blocks"].as_u64().unwrap_or(0) > 0
    });
    let during = read_block(&disk, 500);
    let st = env.disk_status("vm", 0);
    let staged = st["blocks_staged"].as_u64().unwrap();
    assert!(
        staged < BLOCKS as u64 / 2,
        "the prefetch was still far from done when the guest read: {st}"
    );
    assert!(
        during < one_fetch * 2,
        "a miss during prefetch took {during:?}; one fetch takes {one_fetch:?}"
    );
    let st = wait_status(&env, "vm", "the profile to be staged", |st| {
        st["profile_coverage"].as_f64() == Some(1.0)
    });
    let stored = BLOCKS as u64 - st["zero_blocks"].as_u64().unwrap();
    assert_eq!(
        st["fetched_blocks"], stored,
        "each block fetched once: {st}"
    );
    let sched = &env.status()["sessions"][0]["scheduler"];
    assert!(sched["on_demand_fetches"].as_u64().unwrap() >= 1, "{sched}");
    assert_eq!(sched["queued"]["profile"], 0, "{sched}");
}
