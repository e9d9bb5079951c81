//! Export points and placement, with hypervisor hosts in network
//! namespaces: each export point listens on its own address in
//! 198.18.0.0/15, clients (QEMU's NBD client via `qemu-img`, `nfs-ls`)
//! run inside a host's namespace, and every placement is checked by the
//! export point chosen and the rule `--explain` names.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nfs3_types::nfs3::stable_how;
use serde_json::Value;

/// Host numbers of this file's tests (0..=3), apart from other files'
/// (nfs.rs uses 20..220 by pid; these take 221..=248).
fn host_number(test: u8) -> u8 {
    221 + (std::process::id() % 7) as u8 * 4 + test
}

/// A daemon with one export point per address, NFS open to the test
/// hosts (root not squashed, as ESXi needs).
fn serve_points(env: &mut Env, points: &[(&str, &str)], extra: &[&str]) -> Daemon {
    let mut args = vec![];
    for (name, addr) in points {
        args.push("--export-point".to_string());
        args.push(format!("{name},listen={addr},max-inflight=4"));
    }
    args.extend(
        ["--nfs-allow", "198.18.0.0/15", "--nfs-no-root-squash"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    env.serve_args = args;
    env.serve()
}

fn sock(env: &Env) -> &str {
    env.socket.to_str().unwrap()
}

/// `recover VM --host HOST --explain [more]`: (export point, rule, stderr).
fn place(env: &Env, vm: &str, host: &str, more: &[&str]) -> (String, String, String) {
    let mut args = vec!["recover", "--socket", sock(env), vm, "--explain", "--json"];
    if !host.is_empty() {
        args.extend(["--host", host]);
    }
    args.extend(more);
    let o = env.run(&args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "recover {vm} failed: {err}");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    (
        r["export_point"].as_str().unwrap().to_string(),
        r["placement"]["rule"].as_str().unwrap_or("").to_string(),
        serde_json::to_string_pretty(&r["placement"]).unwrap(),
    )
}

fn points(env: &Env) -> Value {
    let out = env.ok(&["export-points", "--socket", sock(env), "--json"]);
    serde_json::from_str(&out).unwrap()
}

fn point<'a>(all: &'a Value, name: &str) -> &'a Value {
    all["export_points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no export point {name} in {all}"))
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn backup_random(env: &Env, vm: &str, seed: u64) {
    let img = env.path(&format!("{vm}.img"));
    random_image(&img, 8 << 20, seed, 64 << 10);
    env.backup(vm, "64K", &[&img]);
}

/// Kills the child (a client inside a host) when the test ends.
struct Reader(std::process::Child);

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_hosts_first_two_vms_get_two_points_and_the_third_the_less_loaded_of_those() {
    let host = netns::Host::new(host_number(0));
    let addrs: Vec<String> = (11..=13).map(|k| host.add_server_addr(k)).collect();
    let mut env = Env::new();
    for (i, vm) in ["vm1", "vm2", "vm3", "vm4"].iter().enumerate() {
        backup_random(&env, vm, i as u64 + 1);
    }
    let named = [("a", &*addrs[0]), ("b", &*addrs[1]), ("c", &*addrs[2])];
    let _d = serve_points(&mut env, &named, &["--max-connections-per-host", "2"]);
    let h = host.addr.as_str();

    let (p1, r1, _) = place(&env, "vm1", h, &[]);
    let (p2, r2, _) = place(&env, "vm2", h, &[]);
    assert_eq!(
        (r1.as_str(), r2.as_str()),
        ("connection-headroom", "connection-headroom")
    );
    assert_ne!(p1, p2, "the host's first two VMs share a point");

    // A reader at queue depth 32 on vm1's point (4 requests in flight at
    // most there): its queue and service time show the load.
    let addr1 = named.iter().find(|(n, _)| *n == p1).unwrap().1;
    let url = format!("nbd://{addr1}:10809/vm1/disk0");
    let _reader = Reader(host.spawn(&[
        "qemu-img",
        "bench",
        "-f",
        "raw",
        "-d",
        "32",
        "-s",
        "1048576",
        "-S",
        "1048576",
        "-c",
        "100000000",
        &url,
    ]));
    let mut last = Value::Null;
    let filled = |last: &mut Value| {
        *last = points(&env);
        let p = point(last, &p1);
        let q = &p["queue"];
        q["completed_requests"].as_u64().unwrap() > 50
            && q["queued_bytes"].as_u64().unwrap() + q["inflight_bytes"].as_u64().unwrap() > 0
            && p["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["host"] == h)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !filled(&mut last) {
        assert!(
            Instant::now() < deadline,
            "the reader never filled vm1's queue: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // At its limit of 2, the host's third VM goes to the less loaded of
    // its two points, not to the idle third one.
    let (p3, r3, why) = place(&env, "vm3", h, &[]);
    assert_eq!(
        (p3.as_str(), r3.as_str()),
        (p2.as_str(), "least-latency"),
        "{why}"
    );
    let why_v: Value = serde_json::from_str(&why).unwrap();
    let row = |n: &str| {
        why_v["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["figures"]["name"] == n)
            .unwrap()
            .clone()
    };
    let (loaded, chosen) = (row(&p1), row(&p2));
    let ms = |c: &Value| c["prediction"]["latency_ms"].as_f64().unwrap();
    assert!(
        ms(&loaded) > ms(&chosen),
        "the reader's load must show in the prediction: {why}"
    );
    assert_eq!(loaded["eligible"], true, "{why}");
    let third = why_v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["figures"]["name"] != p1 && c["figures"]["name"] != p2)
        .unwrap()
        .clone();
    assert_eq!(
        third["eligible"], false,
        "a third connection is over the limit: {why}"
    );
    // A VM for no particular host avoids the loaded point too.
    let (p4, r4, why) = place(&env, "vm4", "", &[]);
    assert_ne!(p4, p1, "{why}");
    assert!(r4 == "least-latency" || r4 == "tie-async-share", "{why}");
}

/// 32 MiB: `zeros` zero bytes, then random data.
fn zero_and_data_image(path: &Path, zeros: usize) {
    use rand::SeedableRng;
    let total = 32usize << 20;
    let mut img = vec![0u8; total];
    let mut rng = rand::rngs::StdRng::seed_from_u64(zeros as u64);
    rand::RngCore::fill_bytes(&mut rng, &mut img[zeros..]);
    std::fs::write(path, img).unwrap();
}

/// A sparse image of `size` bytes with `len` random bytes at `at`.
fn sparse_data_after(path: &Path, size: u64, at: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut data = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    f.write_all_at(&data, at).unwrap();
}

#[test]
fn a_new_vm_goes_where_the_relocation_is_nearly_done_and_stays_there_across_a_restart() {
    let host = netns::Host::new(host_number(1));
    let addrs: Vec<String> = (11..=12).map(|k| host.add_server_addr(k)).collect();
    let mut env = Env::new();
    // Relocation copies in ascending order and holes cost no rate: `near`
    // reaches 95 % at once, `far` 10 %, then both copy data at 0.5 MB/s.
    // Far is a sparse 4 GiB disk whose 16 MiB of data sit before 3.6 GiB
    // of holes: the copy it still owes weighs against what the point can
    // drain in the placement horizon (a few MB would not, and the choice
    // would rest on the noise of a few requests' service times; holes are
    // taken in bulk and pass no queue).
    let (near, far) = (env.path("near.img"), env.path("far.img"));
    zero_and_data_image(&near, (32 << 20) * 95 / 100);
    sparse_data_after(&far, 4 << 30, (4 << 30) / 10, 16 << 20);
    env.backup("near", "64K", &[&near]);
    env.backup("far", "64K", &[&far]);
    backup_random(&env, "new", 7);
    let named = [("a", &*addrs[0]), ("b", &*addrs[1])];
    let args = ["--max-connections-per-host", "2"];
    let mut d = serve_points(&mut env, &named, &args);
    let h = host.addr.as_str();
    assert_eq!(place(&env, "near", h, &["--export-point", "a"]).0, "a");
    assert_eq!(place(&env, "far", h, &["--export-point", "b"]).0, "b");
    let target = env.path("primary");
    std::fs::create_dir(&target).unwrap();
    for vm in ["near", "far"] {
        env.ok(&[
            "relocate",
            "--socket",
            sock(&env),
            vm,
            "--to",
            target.to_str().unwrap(),
            "--rate",
            "0.5",
        ]);
    }
    let progress = |all: &Value, p: &str| point(all, p)["relocations"][0]["progress"].as_f64();
    // ... and each point has served a few copies, so its service time is
    // a mean, not one request's.
    let served = |all: &Value, p: &str| point(all, p)["queue"]["completed_requests"].as_u64();
    wait_for("relocations at 95 % and 10 %, 8 copies each", 30, || {
        let all = points(&env);
        progress(&all, "a").unwrap_or(0.0) > 0.9
            && progress(&all, "b").unwrap_or(0.0) > 0.05
            && ["a", "b"].iter().all(|p| served(&all, p).unwrap_or(0) >= 8)
    });
    let all = points(&env);
    assert!(progress(&all, "b").unwrap() < 0.3, "{all}");

    let (p, rule, why) = place(&env, "new", h, &[]);
    assert_eq!((p.as_str(), rule.as_str()), ("a", "least-latency"), "{why}");
    let all = points(&env);
    let future = |n: &str| point(&all, n)["predicted"]["future_ms"].as_f64().unwrap();
    assert!(future("a") < future("b"), "{all}");

    // A daemon crash and restart: every VM is exported where it was, and
    // a host's client carries on at the same address.
    d.kill9();
    let _d = env.serve();
    let all = points(&env);
    let sessions = |n: &str| point(&all, n)["sessions"].clone();
    assert_eq!(sessions("a"), serde_json::json!(["near", "new"]), "{all}");
    assert_eq!(sessions("b"), serde_json::json!(["far"]), "{all}");
    let o = host.run(&["nfs-ls", &format!("nfs://{}/new", addrs[0])]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("disk0.raw"),
        "{o:?}"
    );
    // Each point shows only its own VMs.
    let o = host.run(&["nfs-ls", &format!("nfs://{}/new", addrs[1])]);
    assert!(!o.status.success(), "VM new is listed at point b: {o:?}");
}

#[test]
fn unknown_points_shared_addresses_and_hosts_over_their_limit_are_refused_clearly() {
    let mut env = Env::new();
    backup_random(&env, "v1", 1);
    backup_random(&env, "v2", 2);
    let (a1, a2) = (
        nfs::own_loopback().to_string(),
        nfs::own_loopback().to_string(),
    );

    // Two export points on one address.
    env.serve_args = vec![
        "--export-point".into(),
        format!("a,listen={a1}"),
        "--export-point".into(),
        format!("b,listen={a1},port=2050"),
    ];
    let mut cmd = std::process::Command::new(bin());
    let o = cmd
        .args(["serve", "--repo", env.repo_str(), "--staging"])
        .arg(&env.staging)
        .arg("--mount")
        .arg(&env.mount)
        .args(&env.serve_args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(text.contains(&format!("both listen on {a1}")), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    // --nfs beside export points.
    let o = std::process::Command::new(bin())
        .args(["serve", "--repo", env.repo_str(), "--staging"])
        .arg(&env.staging)
        .arg("--mount")
        .arg(&env.mount)
        .args(["--export-point", &format!("a,listen={a1}"), "--nfs", &a2])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("do not mix"),
        "{o:?}"
    );

    let _d = serve_points(
        &mut env,
        &[("a", &a1), ("b", &a2)],
        &["--max-connections-per-host", "1"],
    );
    env.fails(
        &[
            "recover",
            "--socket",
            sock(&env),
            "v1",
            "--export-point",
            "nope",
        ],
        "no export point \"nope\"",
    );
    let host = "198.18.250.2"; // declared: not connected yet
    let (p1, _, _) = place(&env, "v1", host, &["--export-point", "a"]);
    assert_eq!(p1, "a");
    env.fails(
        &[
            "recover",
            "--socket",
            sock(&env),
            "v2",
            "--host",
            host,
            "--export-point",
            "b",
        ],
        "--force",
    );
    assert!(
        env.status()["sessions"].as_array().unwrap().len() == 1,
        "a refused recovery started nothing"
    );
    let (p2, rule, _) = place(&env, "v2", host, &["--export-point", "b", "--force"]);
    assert_eq!((p2.as_str(), rule.as_str()), ("b", "forced"));
}

/// 256 MiB of one random MiB over and over: every 64 KiB block is data
/// the repository must serve, while the backup stores 16 chunks.
fn repeating_image(path: &Path, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut unit = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut unit);
    let img = unit.repeat(256);
    std::fs::write(path, &img).unwrap();
    img
}

#[test]
fn a_cold_vm_goes_to_the_point_whose_sessions_are_staged_not_the_one_reading_a_slow_repository() {
    use common::garage::{Garage, BUCKET};
    use common::proxy::LatencyProxy;
    let g = Garage::single();
    let host = netns::Host::new(host_number(2));
    let addrs: Vec<String> = (11..=12).map(|k| host.add_server_addr(k)).collect();
    let mut env = Env::s3(&format!("s3://{BUCKET}/placement"), g.env(0));
    let cold = repeating_image(&env.path("cold.img"), 1);
    env.backup("cold", "64K", &[&env.path("cold.img")]);
    let warm = random_image(&env.path("warm.img"), 8 << 20, 2, 64 << 10);
    env.backup("warm", "64K", &[&env.path("warm.img")]);
    backup_random(&env, "new", 3);
    // The daemon reads the repository 20 ms away.
    let proxy = LatencyProxy::start(g.nodes[0].s3_port, 20, None);
    env.extra_env = proxy.route(g.env(0));
    let named = [("a", &*addrs[0]), ("b", &*addrs[1])];
    let _d = serve_points(&mut env, &named, &["--max-connections-per-host", "2"]);
    let h = host.addr.as_str();
    assert_eq!(place(&env, "cold", h, &["--export-point", "a"]).0, "a");
    assert_eq!(place(&env, "warm", h, &["--export-point", "b"]).0, "b");

    // QEMU's nfs:// driver in the host reads all of `warm` (staging it,
    // through the slow repository); the Rust NFS client in the host reads
    // one block of `cold`, which stays all but unstaged.
    let copy = env.path("warm.copy");
    let o = host.run(&[
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &format!("nfs://{}/warm/disk0.raw", addrs[1]),
        copy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        std::fs::read(&copy).unwrap() == warm,
        "warm read back wrong"
    );
    let a = addrs[0].clone();
    let first = host.enter(move || {
        let mut c = nfs::Client::mount(&a, "/").unwrap();
        let fh = c.path("cold/disk0.raw").unwrap();
        c.read(&fh, 0, 65536).unwrap()
    });
    assert!(first == cold[..65536], "cold read back wrong");

    // Once both points' recent guest I/O has left the window, they differ
    // only in what their sessions still need from the repository.
    let mut last = Value::Null;
    wait_for("the points' recent I/O to age out", 30, || {
        last = points(&env);
        ["a", "b"]
            .iter()
            .all(|n| point(&last, n)["queue"]["completed_requests"] == 0)
    });
    let (fa, fb) = (&point(&last, "a")["figures"], &point(&last, "b")["figures"]);
    assert!(fa["repo_fetch_ms"].as_f64().unwrap() >= 15.0, "{last}");
    assert!(fa["unstaged_bytes"].as_u64().unwrap() > 200 << 20, "{last}");
    assert_eq!(fb["unstaged_bytes"], 0, "{last}");

    let (p, rule, why) = place(&env, "new", h, &[]);
    assert_eq!((p.as_str(), rule.as_str()), ("b", "least-latency"), "{why}");
    let why_v: Value = serde_json::from_str(&why).unwrap();
    let repo_ms = |n: &str| {
        why_v["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["figures"]["name"] == n)
            .unwrap()["prediction"]["repository_ms"]
            .as_f64()
            .unwrap()
    };
    assert!(repo_ms("a") > 1.0 && repo_ms("b") == 0.0, "{why}");
    // The new VM is served where it was placed, to the host's client.
    let b = addrs[1].clone();
    let size = host.enter(move || {
        let mut c = nfs::Client::mount(&b, "/").unwrap();
        let fh = c.path("new/disk0.raw").unwrap();
        c.getattr(&fh).unwrap().size
    });
    assert_eq!(size, 8 << 20);
}

#[test]
fn a_point_staging_on_its_own_disk_keeps_its_vm_there_across_kill9_at_the_same_point_and_handles() {
    let host = netns::Host::new(host_number(3));
    let addrs: Vec<String> = (11..=12).map(|k| host.add_server_addr(k)).collect();
    let mut env = Env::new();
    let data = random_image(&env.path("vm.img"), 8 << 20, 9, 64 << 10);
    env.backup("vm", "64K", &[&env.path("vm.img")]);
    // Another disk: a 64 MiB tmpfs holds point b's staging.
    let _disk = Tmpfs::mount(&env.path("disk2"), "64m");
    let own = env.path("disk2/staging");
    // serve_points puts the address into `listen=` as given: b's carries
    // its staging= along.
    let b = format!("{},staging={}", addrs[1], own.display());
    let mut d = serve_points(&mut env, &[("a", &addrs[0]), ("b", &b)], &[]);
    let (p, rule, _) = place(&env, "vm", &host.addr, &["--export-point", "b"]);
    assert_eq!((p.as_str(), rule.as_str()), ("b", "forced"));

    // The host's client writes FILE_SYNC across a block boundary at b.
    let (off, written) = (3 * 65536 + 1000u64, vec![0xa5u8; 70_000]);
    let (server, w) = (addrs[1].clone(), written.clone());
    let (root, fh, total) = host.enter(move || {
        let mut c = nfs::Client::mount(&server, "/").unwrap();
        let fh = c.path("vm/disk0.raw").unwrap();
        let (how, _) = c.write(&fh, off, &w, stable_how::FILE_SYNC).unwrap();
        assert_eq!(how, stable_how::FILE_SYNC);
        (c.root.clone(), fh, c.fsstat().0)
    });
    assert_eq!(total, 64 << 20, "FSSTAT at b reports b's staging disk");
    let sessions = own.join("sessions/vm");
    let dirs: Vec<_> = std::fs::read_dir(&sessions).unwrap().flatten().collect();
    assert_eq!(dirs.len(), 1, "one session under b's staging");
    let staged = std::fs::read(dirs[0].path().join("disk0.data")).unwrap();
    assert!(
        staged[off as usize..off as usize + written.len()] == written[..],
        "the written bytes are not in b's staging data file"
    );
    assert!(dirs[0].path().join("active").exists());
    assert!(
        !env.staging.join("sessions/vm").exists(),
        "the session staged under --staging too"
    );

    d.kill9();
    let _d = env.serve();
    let all = points(&env);
    assert_eq!(
        point(&all, "b")["sessions"],
        serde_json::json!(["vm"]),
        "{all}"
    );
    assert_eq!(point(&all, "a")["sessions"], serde_json::json!([]), "{all}");
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap();
    assert_eq!(
        point(&all, "b")["staging"],
        canonical(&own).to_str().unwrap(),
        "{all}"
    );
    assert_eq!(
        point(&all, "a")["staging"],
        canonical(&env.staging).to_str().unwrap(),
        "{all}"
    );
    // The host's old handles read the written bytes and the backup's.
    let server = addrs[1].clone();
    let (again, before) = host.enter(move || {
        let mut c = nfs::Client::reconnect(&server, 2049, root);
        (
            c.read(&fh, off, written.len() as u32).unwrap() == written,
            c.read(&fh, 0, 65536).unwrap(),
        )
    });
    assert!(again, "the FILE_SYNC write did not survive kill -9");
    assert!(before == data[..65536], "unwritten bytes read back wrong");
}

#[test]
fn a_relative_staging_or_one_nested_in_the_main_staging_is_refused_in_one_line() {
    let env = Env::new();
    backup_random(&env, "v", 1);
    let a = nfs::own_loopback().to_string();
    let serve = |spec: String| {
        let staging = env.staging.to_str().unwrap();
        let mount = env.mount.to_str().unwrap();
        let args = [
            "serve",
            "--repo",
            env.repo_str(),
            "--staging",
            staging,
            "--mount",
            mount,
            "--export-point",
            &spec,
        ];
        env.fails(&args, "staging=")
    };
    let e = serve(format!("a,listen={a},staging=rel/dir"));
    assert!(e.contains("must be an absolute path"), "{e}");
    let inside = env.staging.join("ds-a");
    let e = serve(format!("a,listen={a},staging={}", inside.display()));
    assert!(e.contains("is inside --staging"), "{e}");
    assert!(!env.staging.exists(), "a refused serve created --staging");
}
