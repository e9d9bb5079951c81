//! `release` says what became of a relocation under way, and a refused
//! release says who holds the disk open (explore10 L3, L4).

mod common;

use std::time::{Duration, Instant};

use common::*;

const K64: usize = 64 << 10;

fn relocation(env: &Env, vm: &str) -> serde_json::Value {
    let st = env.status();
    let s = (st["sessions"].as_array().unwrap().iter()).find(|s| s["vm"] == vm);
    s.unwrap()["relocation"].clone()
}

/// VM `vm` (a 64 MiB disk) recovered and relocating to `primary` at
/// 2 MB/s, once its first bytes are copied.
fn relocating(env: &Env, vm: &str, primary: &std::path::Path) {
    env.recover(vm, None);
    let o = env.run(&[
        "relocate",
        "--socket",
        env.socket.to_str().unwrap(),
        vm,
        "--to",
        primary.to_str().unwrap(),
        "--rate",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    while relocation(env, vm)["bytes_done"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn release_says_a_relocation_stopped_and_a_discard_what_it_removed() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 1024 * K64, 61, K64);
    env.backup("d64", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let primary = env.path("prim");
    std::fs::create_dir(&primary).unwrap();
    let target = primary.join("d64");
    relocating(&env, "d64", &primary);
    let o = env.release("d64", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let said = format!("its relocation to {} (", target.display());
    assert!(
        out.contains("released VM d64; staging kept")
            && out.contains(&said)
            && out.contains("% copied) is stopped: `recoverfs recover d64` resumes it"),
        "{out}"
    );
    // It does resume with the recover, without `relocate --resume`.
    env.recover("d64", None);
    assert_eq!(relocation(&env, "d64")["state"], "copying");
    let o = env.release("d64", true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let said = format!(
        "its relocation to {t} was cancelled: removed {t}/disk0.raw, {t}; kept nothing",
        t = target.display()
    );
    assert!(
        out.contains("staging discarded") && out.contains(&said),
        "{out}"
    );
    assert!(!target.exists());
}

#[test]
fn a_refused_release_names_the_fuse_opener_by_pid_and_command() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 16 * K64, 62, K64);
    env.backup("race3", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("race3", None)[0].clone();
    // Opened by a thread of this process: named by the process.
    let f = std::thread::spawn(move || std::fs::File::open(disk).unwrap())
        .join()
        .unwrap();
    let o = env.release("race3", false);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let said = format!(
        "a disk of VM race3 is still open (1 handle(s)): disk0 over FUSE by pid {} ({}); stop the VM first",
        std::process::id(),
        comm.trim()
    );
    assert!(err.contains(&said), "{err}");
    // Another process opens it too (named as at its open: `sh`); ours
    // closes: only the other is named.
    let mut other = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3<\"$0\"; echo; exec sleep 30")
        .arg(env.mount.join("race3/disk0.raw"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(other.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    drop(f);
    let want = format!("(1 handle(s)): disk0 over FUSE by pid {} (sh);", other.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let err = String::from_utf8_lossy(&env.release("race3", false).stderr).to_string();
        if err.contains(&want) {
            break;
        }
        assert!(Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(20));
    }
    other.kill().unwrap();
    other.wait().unwrap();
    env.release_closed("race3", true);
}
