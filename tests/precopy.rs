//! `recoverfs precopy` end to end, through the real binary, against a
//! QEMU VM (firmware only, a raw disk of random bytes; the test writes
//! through the guest device's drive from its own monitor). A pre-copy job
//! is killed with SIGKILL in the middle of a round; the next run resumes
//! the cycle without reading again the chunks the killed one recorded
//! (unless written since), and its scheduled backup restores byte for
//! byte like a full backup of the same instant and like the disk itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use recoverfs::qemu::qmp::Qmp;
use serde_json::Value;

const CHUNK: usize = 65536;
const MIB: usize = 1 << 20;

/// A QEMU process killed when dropped, with the job's QMP socket and the
/// test's own monitor.
struct Vm {
    child: Child,
    qmp: PathBuf,
    mon: PathBuf,
    img: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn start(dir: &Path, data: &[u8]) -> Vm {
        let img = dir.join("disk.raw");
        std::fs::write(&img, data).unwrap();
        let (qmp, mon) = (dir.join("qmp.sock"), dir.join("mon.sock"));
        let child = Command::new("qemu-system-x86_64")
            .args(["-S", "-nodefaults", "-display", "none", "-m", "64"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", mon.display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=drive0",
                img.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=drive0,id=vd0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (make test installs it)");
        let vm = Vm {
            child,
            qmp,
            mon,
            img,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in [&vm.qmp, &vm.mon] {
            while Qmp::connect(s).is_err() {
                assert!(Instant::now() < deadline, "QEMU answers on no QMP socket");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        vm.monitor().cont().unwrap();
        vm
    }

    fn monitor(&self) -> Qmp {
        Qmp::connect(&self.mon).unwrap()
    }

    /// Writes `pattern` over `len` bytes at `off`, as the guest would.
    fn write(&self, pattern: u8, off: usize, len: usize) {
        let out = self
            .monitor()
            .execute(
                "human-monitor-command",
                Some(serde_json::json!({"command-line":
                    format!("qemu-io drive0 \"write -P {pattern:#x} {off} {len}\"")})),
            )
            .unwrap();
        assert_eq!(out.as_str(), Some(""), "qemu-io: {out}");
    }
}

/// A job process killed when dropped.
struct Job(Child);

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backup_vms(env: &Env, vm: &Vm) -> String {
    let q = format!("pc={}", vm.qmp.display());
    let out = env.ok(&[
        "backup-vms",
        "--repo",
        env.repo_str(),
        "--vm",
        &q,
        "--chunk-size",
        "64K",
        "--rate-window",
        "0",
        "--json",
    ]);
    let s: Value = serde_json::from_str(&out).unwrap();
    s["vms"][0]["backup"].as_str().unwrap().to_string()
}

/// The chunks the saved state proves by its newest round (recorded since
/// the round began), read from the sealed state file.
fn recorded_by_newest_round(state: &Path) -> usize {
    let Ok(bytes) = std::fs::read(state) else {
        return 0;
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return 0;
    };
    let since: Vec<Option<u64>> = v["precopy"]["disks"][0]["since"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_u64)
        .collect();
    let newest = since.iter().flatten().max().copied();
    since
        .iter()
        .filter(|s| **s == newest && s.is_some())
        .count()
}

fn state_file(env: &Env, state: &Path) -> PathBuf {
    let repo = recoverfs::repo::Repository::open(env.repo_str()).unwrap();
    state.join(repo.id()).join("pc").join("state.json")
}

#[test]
fn a_job_killed_mid_round_resumes_without_reading_recorded_chunks_again_and_its_backup_is_exact() {
    let env = Env::new();
    let mut data = vec![0u8; 32 * MIB];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
    data[510..512].fill(0);
    let vm = Vm::start(env.dir.path(), &data);
    let base = backup_vms(&env, &vm);
    // The guest rewrites 24 MiB (384 chunks) after the base backup.
    vm.write(0x42, 0, 24 * MIB);
    let state = env.path("precopy-state");
    let q = format!("pc={}", vm.qmp.display());
    let s = state.to_str().unwrap();
    let args = |end: &str, t: &str| {
        vec![
            "precopy",
            "--repo",
            env.repo_str(),
            "--vm",
            &q,
            "--state",
            s,
            "--chunk-size",
            "64K",
            "--every",
            "3600",
            end,
            t,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    // 2 MB/s: the first round takes about 12 s; kill it half-way.
    let mut a = args("--until", "+600");
    a.extend(["--max-rate".into(), "2".into()]);
    let mut job = Job(Command::new(bin())
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap());
    let file = state_file(&env, &state);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut recorded = 0;
    // The cycle's start proves every chunk by round 0; wait for chunks
    // proven by round 2 (read in round 2's time).
    while recorded < 100 {
        assert!(
            Instant::now() < deadline,
            "the job recorded {recorded} chunks in 120 s"
        );
        assert!(job.0.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(100));
        let n = recorded_by_newest_round(&file);
        recorded = if n < 512 { n } else { 0 };
    }
    job.0.kill().unwrap();
    job.0.wait().unwrap();
    let recorded = recorded_by_newest_round(&file);
    assert!(
        (100..384).contains(&recorded),
        "{recorded} chunks recorded when killed"
    );
    // Two chunks recorded by the killed run are written again.
    vm.write(0x43, 0, 2 * CHUNK);

    let out = env.ok(&args("--backup-at", "+2")
        .iter()
        .map(String::as_str)
        .chain(["--json"])
        .collect::<Vec<_>>());
    let r: Value = serde_json::from_str(&out).unwrap();
    assert!(
        r["start"].as_str().unwrap().starts_with("resumed cycle"),
        "{r}"
    );
    assert_eq!(r["warnings"].as_array().unwrap().len(), 0, "{r}");
    let r1 = &r["rounds"][0];
    assert_eq!(
        r1["already_recorded"].as_u64().unwrap(),
        recorded as u64 - 2,
        "{r1}"
    );
    assert_eq!(
        r1["chunks_read"].as_u64().unwrap(),
        384 - recorded as u64 + 2,
        "{r1}"
    );
    let f = &r["final"];
    assert_eq!(f["mode"], "precopy", "{f}");
    assert_eq!(f["vm"]["base"], base.as_str(), "{f}");
    let id = f["backup"].as_str().unwrap();

    // The same instant: the VM paused, a full backup, the image itself.
    vm.monitor().stop().unwrap();
    let full = backup_vms(&env, &vm);
    let got = restored(env.repo_str(), "pc", id, 0);
    assert!(
        got == restored(env.repo_str(), "pc", &full, 0),
        "backup {id} differs from the full backup {full}"
    );
    assert!(
        got == std::fs::read(&vm.img).unwrap(),
        "backup {id} differs from the disk"
    );
    assert!(!file.exists(), "the state outlived its backup");
}

#[test]
fn precopy_refuses_bad_input_in_one_line() {
    let env = Env::new();
    let r = env.repo_str().to_string();
    env.ok(&["init", "--repo", &r]);
    env.fails(
        &["precopy", "--repo", &r, "--vm", "pc"],
        "expected NAME=SOCKET",
    );
    env.fails(
        &[
            "precopy",
            "--repo",
            &r,
            "--vm",
            "pc=/nonexistent/q.sock",
            "--every",
            "0",
        ],
        "--every",
    );
    env.fails(
        &[
            "precopy",
            "--repo",
            &r,
            "--vm",
            "pc=/nonexistent/q.sock",
            "--backup-at",
            "tomorrow",
        ],
        "RFC 3339",
    );
    env.fails(
        &[
            "precopy",
            "--repo",
            &r,
            "--vm",
            "pc=/nonexistent/q.sock",
            "--state",
            env.path("st").to_str().unwrap(),
            "--until",
            "+5",
        ],
        "QMP socket",
    );
}

#[test]
fn a_daemon_runs_a_pre_copy_job_to_its_scheduled_backup_shows_it_in_status_and_stops_one_on_delete()
{
    let env = Env::new();
    let mut data = vec![0u8; 8 * MIB];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
    data[510..512].fill(0);
    let vm = Vm::start(env.dir.path(), &data);
    let base = backup_vms(&env, &vm);
    let _daemon = env.serve();
    let c = recoverfs::api::client::Client::new(&env.socket);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = c
        .post(
            "/precopy",
            &serde_json::json!({"vm": "pc", "qmp": vm.qmp, "every": 1, "backup_at": now + 8.0,
                                "chunk_size": CHUNK, "load_limit": "latency=1000"}),
        )
        .unwrap();
    assert_eq!(started["running"], true, "{started}");
    // A second job for the VM is refused while the first runs.
    let e = c
        .post("/precopy", &serde_json::json!({"vm": "pc", "qmp": vm.qmp}))
        .unwrap_err();
    assert!(e.to_string().contains("is running"), "{e}");
    vm.write(0x61, 0, 4 * CHUNK);
    let st = env.ok(&["status", "--socket", env.socket.to_str().unwrap()]);
    assert!(st.contains("pre-copy of VM pc:"), "{st}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let job = loop {
        let l = c.get("/precopy").unwrap();
        let j = l["jobs"][0].clone();
        if j["running"] == false {
            break j;
        }
        assert!(Instant::now() < deadline, "the job did not end: {j}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(job["state"], "done", "{job}");
    assert!(job["load"].is_object(), "{job}");
    let f = &job["report"]["final"];
    assert_eq!(f["mode"], "precopy", "{f}");
    assert_eq!(f["vm"]["base"], base.as_str(), "{f}");
    let id = f["backup"].as_str().unwrap().to_string();
    vm.monitor().stop().unwrap();
    let full = backup_vms(&env, &vm);
    let got = restored(env.repo_str(), "pc", &id, 0);
    assert!(
        got == restored(env.repo_str(), "pc", &full, 0),
        "backup {id} differs from the full backup {full}"
    );
    assert!(got == std::fs::read(&vm.img).unwrap());
    // DELETE forgets it; a second DELETE finds nothing.
    let gone = c.delete("/precopy/pc").unwrap();
    assert_eq!(gone["state"], "done", "{gone}");
    assert_eq!(
        c.get("/precopy").unwrap()["jobs"].as_array().unwrap().len(),
        0
    );
    let e = c.delete("/precopy/pc").unwrap_err();
    assert!(e.to_string().contains("no pre-copy job"), "{e}");
    // A running job stops on DELETE, its state kept.
    vm.monitor().cont().unwrap();
    c.post(
        "/precopy",
        &serde_json::json!({"vm": "pc", "qmp": vm.qmp, "every": 1, "chunk_size": CHUNK}),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let stopped = c.delete("/precopy/pc").unwrap();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["running"], false, "{stopped}");
}

#[test]
fn a_daemon_killed_while_its_pre_copy_job_waits_starts_the_job_again_and_it_takes_its_scheduled_backup(
) {
    let env = Env::new();
    let mut data = vec![0u8; 8 * MIB];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
    data[510..512].fill(0);
    let vm = Vm::start(env.dir.path(), &data);
    let base = backup_vms(&env, &vm);
    let mut daemon = env.serve();
    let c = recoverfs::api::client::Client::new(&env.socket);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let backup_at = now() + 15.0;
    c.post(
        "/precopy",
        &serde_json::json!({"vm": "pc", "qmp": vm.qmp, "every": 3600, "backup_at": backup_at,
                            "chunk_size": CHUNK}),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.get("/precopy").unwrap()["jobs"][0]["rounds"] != 1 {
        assert!(Instant::now() < deadline, "no round");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(now() < backup_at - 3.0, "the round outlasted the schedule");
    daemon.kill9();
    std::mem::forget(daemon);
    vm.write(0x62, 0, 2 * CHUNK);
    let daemon = env.serve();
    let listed = c.get("/precopy").unwrap();
    let j = &listed["jobs"][0];
    assert_eq!(j["vm"], "pc", "{listed}");
    assert!(
        j["restarted"]
            .as_str()
            .unwrap()
            .starts_with("restarted with the daemon"),
        "{listed}"
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let job = loop {
        let j = c.get("/precopy").unwrap()["jobs"][0].clone();
        if j["running"] == false {
            break j;
        }
        assert!(Instant::now() < deadline, "the job did not end: {j}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(job["state"], "done", "{job}");
    assert!(now() >= backup_at, "the backup came early: {job}");
    let r = &job["report"];
    assert!(
        r["start"].as_str().unwrap().starts_with("resumed cycle"),
        "{r}"
    );
    let f = &r["final"];
    assert_eq!(f["mode"], "precopy", "{f}");
    assert_eq!(f["vm"]["base"], base.as_str(), "{f}");
    let id = f["backup"].as_str().unwrap().to_string();
    vm.monitor().stop().unwrap();
    let full = backup_vms(&env, &vm);
    let got = restored(env.repo_str(), "pc", &id, 0);
    assert!(got == restored(env.repo_str(), "pc", &full, 0));
    assert!(got == std::fs::read(&vm.img).unwrap());
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("pre-copy job of VM pc"), "{log}");
}
