//! Live relocation to primary storage while the disk is in use.

mod common;
#[path = "relocate/targets.rs"]
mod targets;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const K64: usize = 64 << 10;

fn relocate(env: &Env, vm: &str, to: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "relocate",
        "--socket",
        env.socket.to_str().unwrap(),
        vm,
        "--to",
        to.to_str().unwrap(),
    ];
    args.extend(extra);
    env.run(&args)
}

fn relocation(env: &Env, vm: &str) -> serde_json::Value {
    let st = env.status();
    st["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vm"] == vm)
        .unwrap()["relocation"]
        .clone()
}

fn wait_state(env: &Env, vm: &str, want: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = relocation(env, vm);
        if r["state"] == want {
            return r;
        }
        assert!(r["state"] != "failed", "relocation failed: {r}");
        assert!(
            Instant::now() < deadline,
            "relocation did not reach {want}: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// VM `vm`, a 64 MiB disk of random data (`seed`), recovered and
/// relocating to `primary/` at `rate` MB/s, once its first bytes are
/// copied: the daemon, the disk's bytes and `primary`.
fn relocating(env: &Env, seed: u64, rate: &str) -> (Daemon, Vec<u8>, std::path::PathBuf) {
    let data = random_image(&env.path("a.raw"), 1024 * K64, seed, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    env.recover("vm", None);
    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();
    let o = relocate(env, "vm", &primary, &["--rate", rate]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    while relocation(env, "vm")["bytes_done"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    (d, data, primary)
}

fn fio(args: &[&str]) -> std::process::Output {
    Command::new("fio")
        .args(args)
        .output()
        .expect("fio is installed")
}

#[test]
fn relocation_under_random_writes_cuts_over_with_every_write_intact() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 256 * K64, 51, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();
    let file = format!("--filename={}", disk.display());
    let job = [
        "--name=reloc",
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--verify=crc32c",
        "--ioengine=psync",
        "--verify_state_save=0",
    ];
    let writer = {
        let (file, job) = (file.clone(), job.map(String::from));
        std::thread::spawn(move || {
            let mut a: Vec<&str> = job.iter().map(|s| s.as_str()).collect();
            a.extend([file.as_str(), "--do_verify=0", "--rate_iops=1500"]);
            fio(&a)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let o = relocate(&env, "vm", &primary, &["--rate", "4", "--wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = writer.join().unwrap();
    assert!(
        w.status.success(),
        "fio write: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    let r = relocation(&env, "vm");
    assert_eq!(r["state"], "done");
    assert!(r["cutover_pause_ms"].as_f64().is_some(), "{r}");
    // Every fio block verifies through the FUSE file, now served from the target.
    let mut a: Vec<&str> = job.to_vec();
    a.extend([file.as_str(), "--verify_only"]);
    let v = fio(&a);
    assert!(
        v.status.success(),
        "fio verify after cutover: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let seen = read_all(&disk);
    assert!(env.release("vm", false).status.success());
    let target = primary.join("vm/disk0.raw");
    assert!(
        read_all(&target) == seen,
        "the target differs from what the VM saw"
    );
    assert!(primary.join("vm/vm.json").exists());
}

#[test]
fn a_killed_relocation_resumes_where_it_stopped() {
    let env = Env::new();
    let data = random_image(&env.path("a.raw"), 1024 * K64, 52, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();
    let o = relocate(&env, "vm", &primary, &["--rate", "12"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let total = relocation(&env, "vm")["bytes_total"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done_before = loop {
        let r = relocation(&env, "vm");
        let done = r["bytes_done"].as_u64().unwrap();
        if done >= total / 2 {
            break done;
        }
        assert!(Instant::now() < deadline, "relocation too slow: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    d.kill9();
    std::mem::forget(d);
    let _d2 = env.serve();
    env.recover("vm", None); // resumes the relocation by itself
    let r = wait_state(&env, "vm", "done", Duration::from_secs(120));
    let recopied = r["bytes_copied"].as_u64().unwrap();
    eprintln!("copied {done_before} of {total} before the kill, {recopied} after");
    assert!(
        recopied <= total - done_before + total / 10,
        "resume copied {recopied} bytes; only {} were left",
        total - done_before
    );
    assert!(read_all(&primary.join("vm/disk0.raw")) == data);
}

#[test]
fn a_writer_faster_than_the_copy_rate_is_reported_not_cut_over() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 32 * K64, 53, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let (disk, stop) = (disk.clone(), stop.clone());
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                while !stop.load(Ordering::Relaxed) {
                    let b = rng.gen_range(0..32u64);
                    // The daemon may be gone if the test already failed.
                    if let Err(e) = f.write_all_at(&[t as u8 + 1; 4096], b * K64 as u64) {
                        eprintln!("writer {t}: {e}");
                        break;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Even raised 4x, 0.25 MB/s (16 blocks/s) copies fewer blocks than the writers dirty.
    let o = relocate(&env, "vm", &primary, &["--rate", "0.25"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = wait_state(&env, "vm", "not-converging", Duration::from_secs(90));
    assert!(r["note"].as_str().unwrap().contains("dirty"), "{r}");
    assert!(r["dirty_blocks"].as_u64().unwrap() > 0);
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|w| w.join().unwrap());
    // Once the burst ends it converges and cuts over with the latest data.
    wait_state(&env, "vm", "done", Duration::from_secs(90));
    let seen = read_all(&disk);
    assert!(env.release("vm", false).status.success());
    assert!(read_all(&primary.join("vm/disk0.raw")) == seen);
}

#[test]
fn unsafe_relocation_targets_are_refused() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 64 * K64, 54, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let sock = env.socket.to_str().unwrap().to_string();
    let reloc = |to: &Path, extra: &[&str], needle: &str| {
        let mut args = vec![
            "relocate",
            "--socket",
            &sock,
            "vm",
            "--to",
            to.to_str().unwrap(),
        ];
        args.extend(extra);
        env.fails(&args, needle);
    };
    reloc(&env.mount, &[], "overlaps");
    reloc(&env.mount.join("vm"), &[], "overlaps");
    reloc(&env.staging, &[], "overlaps");
    reloc(&env.path("missing"), &[], "missing");
    let busy = env.path("busy");
    std::fs::create_dir_all(busy.join("vm")).unwrap();
    std::fs::write(busy.join("vm/keep.txt"), b"keep").unwrap();
    reloc(&busy, &[], "not empty");
    assert_eq!(std::fs::read(busy.join("vm/keep.txt")).unwrap(), b"keep");
    // A filesystem with too little room.
    let small = env.path("small");
    let _fs = Tmpfs::mount(&small, "256k");
    reloc(&small, &[], "free");
    // --force accepts the non-empty target.
    let o = relocate(&env, "vm", &busy, &["--force", "--wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_vm_relocated_while_running_boots_from_the_target_without_recoverfs() {
    let env = Env::new();
    let image = tiny_image();
    env.backup("tiny", "64K", &[&image]);
    let _d = env.serve();
    let disk = env.recover("tiny", None)[0].clone();
    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();
    let qemu = {
        let disk = disk.clone();
        std::thread::spawn(move || boot_counter(&disk))
    };
    std::thread::sleep(Duration::from_millis(500));
    let o = relocate(&env, "tiny", &primary, &["--rate", "20", "--wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(qemu.join().unwrap(), 1);
    let o = env.release("tiny", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The daemon can go away: the target stands on its own.
    assert_eq!(boot_counter(&primary.join("tiny/disk0.raw")), 2);
}

/// explore4 M5: after a cutover and a release, the relocated files are a
/// VM's disks that QEMU may run from directly. A recover while a QEMU
/// holds them open (its image locks) is refused instead of making two
/// writers; once it is gone, the VM is served from them again.
#[test]
fn a_relocated_disk_a_qemu_holds_open_is_not_served_again_until_it_lets_go() {
    let env = Env::new();
    let m = 1 << 20;
    let data = random_image(&env.path("a.raw"), 8 * m, 56, m);
    env.backup("vm", "1M", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let primary = env.path("primary");
    std::fs::create_dir_all(&primary).unwrap();
    let o = relocate(&env, "vm", &primary, &["--wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(env.release("vm", false).status.success());
    let target = primary.join("vm/disk0.raw");
    let mut qemu = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 60000"])
        .arg(&target)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Until QEMU holds a lock on the image (`/proc/locks` names its inode).
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&target).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
    {
        assert!(Instant::now() < deadline, "qemu-io never locked the image");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sock = env.socket.to_str().unwrap().to_string();
    let err = env.fails(
        &["recover", "--socket", &sock, "vm"],
        "in use by another program",
    );
    assert!(err.contains(target.to_str().unwrap()), "{err}");
    let _ = qemu.kill();
    let _ = qemu.wait();
    let disk = env.recover("vm", None)[0].clone();
    assert!(
        read_all(&disk) == data,
        "the relocated disk differs from the backup"
    );
}

#[test]
fn relocating_with_force_over_an_old_file_leaves_no_old_byte_and_follows_no_link() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let m = 1 << 20;
    let mut data = random_image(&env.path("a.raw"), 32 * m, 55, m);
    data[3 * m..4 * m].fill(0); // the backup has zeros at 3 MiB
    std::fs::write(env.path("a.raw"), &data).unwrap();
    env.backup("vm", "1M", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let primary = env.path("primary");
    std::fs::create_dir_all(primary.join("vm")).unwrap();
    std::fs::set_permissions(primary.join("vm"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = primary.join("vm/disk0.raw");
    std::fs::write(&old, vec![0xAAu8; 32 * m]).unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = relocate(&env, "vm", &primary, &["--force", "--wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = std::fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; m];
    f.read_exact_at(&mut buf, 3 * m as u64).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "the VM reads the old file's bytes after cutover"
    );
    drop(f);
    assert!(
        read_all(&disk) == data,
        "the relocated disk differs from the backup"
    );
    assert!(
        read_all(&old) == data,
        "the target holds bytes of the old file"
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&old), 0o600, "target disk mode");
    assert_eq!(mode(&primary.join("vm")), 0o700, "target directory mode");
    assert!(env.release("vm", true).status.success());

    // A symbolic link is never followed: not as the VM's directory...
    env.recover("vm", None);
    let victim = env.path("victim");
    std::fs::create_dir(&victim).unwrap();
    let p2 = env.path("primary2");
    std::fs::create_dir(&p2).unwrap();
    std::os::unix::fs::symlink(&victim, p2.join("vm")).unwrap();
    let err = String::from_utf8_lossy(&relocate(&env, "vm", &p2, &["--force"]).stderr).to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
    // ...nor as a disk file.
    let p3 = env.path("primary3");
    std::fs::create_dir_all(p3.join("vm")).unwrap();
    std::fs::write(env.path("precious"), b"precious").unwrap();
    std::os::unix::fs::symlink(env.path("precious"), p3.join("vm/disk0.raw")).unwrap();
    let o = relocate(&env, "vm", &p3, &["--force"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(std::fs::read(env.path("precious")).unwrap(), b"precious");
}

#[test]
fn a_paused_relocation_stops_copying_stays_paused_across_kill9_and_resumes_to_a_complete_target() {
    let env = Env::new();
    // 64 MiB at 8 MB/s: about 8 s of copying.
    let (mut d, data, primary) = relocating(&env, 57, "8");
    let socket = env.socket.to_str().unwrap().to_string();
    let t = Instant::now();
    let out = env.ok(&["relocate", "--socket", &socket, "vm", "--pause"]);
    let took = t.elapsed();
    eprintln!("relocate --pause took {took:?} (process start included): {out}");
    assert!(out.contains("paused"), "{out}");
    assert!(took < Duration::from_secs(3), "pause took {took:?}");
    // Stopped for good: nothing is copied while paused.
    let a = relocation(&env, "vm");
    std::thread::sleep(Duration::from_millis(700));
    let b = relocation(&env, "vm");
    assert_eq!(b["state"], "paused", "{b}");
    assert_eq!(a["bytes_copied"], b["bytes_copied"], "copied while paused");
    let done = b["bytes_done"].as_u64().unwrap();
    assert!(
        done < b["bytes_total"].as_u64().unwrap(),
        "finished before the pause: {b}"
    );
    // A restart keeps it paused.
    d.kill9();
    std::mem::forget(d);
    let _d2 = env.serve();
    env.recover("vm", None);
    let r = wait_state(&env, "vm", "paused", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let r2 = relocation(&env, "vm");
    assert_eq!(r2["state"], "paused", "{r2}");
    assert_eq!(
        r2["bytes_copied"], 0,
        "a paused relocation copied after the restart: {r2}"
    );
    assert_eq!(r["bytes_done"], r2["bytes_done"]);
    // Bad input: no relocation to pause on an unknown VM.
    env.fails(
        &["relocate", "--socket", &socket, "nosuchvm", "--pause"],
        "no recovery session",
    );
    let out = env.ok(&["relocate", "--socket", &socket, "vm", "--resume", "--wait"]);
    assert!(out.contains("relocated VM vm"), "{out}");
    let r = relocation(&env, "vm");
    assert_eq!(r["state"], "done", "{r}");
    assert!(
        r["bytes_copied"].as_u64().unwrap()
            <= r["bytes_total"].as_u64().unwrap() - done + (8 << 20),
        "resume copied more than was left: {r}"
    );
    assert!(read_all(&primary.join("vm/disk0.raw")) == data);
}

/// `relocate --wait` used to poll forever once the relocation was paused.
#[test]
fn relocate_wait_ends_non_zero_saying_how_to_resume_when_the_relocation_is_paused() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 1024 * K64, 58, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();
    let socket = env.socket.to_str().unwrap().to_string();
    // 64 MiB at 4 MB/s: about 16 s of copying, time enough to pause it.
    let mut wait = Command::new(bin())
        .args(["relocate", "--socket", &socket, "vm", "--to"])
        .arg(&primary)
        .args(["--rate", "4", "--wait"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.status()["sessions"][0]["relocation"]["bytes_done"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.ok(&["relocate", "--socket", &socket, "vm", "--pause"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while wait.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            wait.kill().unwrap();
            wait.wait().unwrap();
            panic!("relocate --wait still waits on a paused relocation");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = wait.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a paused relocation is not relocated: {err}"
    );
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.contains("paused") && last.contains("--resume"),
        "{err}"
    );
    // Resumed, it completes.
    let out = env.ok(&["relocate", "--socket", &socket, "vm", "--resume", "--wait"]);
    assert!(out.contains("relocated VM vm"), "{out}");
}

/// Ctrl-C of `relocate --wait` used to exit 130 saying nothing while the
/// relocation went on in the daemon.
#[test]
fn ctrl_c_of_relocate_wait_says_the_relocation_goes_on_and_resume_wait_follows_it_again() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 256 * K64, 59, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();
    let socket = env.socket.to_str().unwrap().to_string();
    // 16 MiB at 4 MB/s: about 4 s of copying.
    let wait = Command::new(bin())
        .args(["relocate", "--socket", &socket, "vm", "--to"])
        .arg(&primary)
        .args(["--rate", "4", "--wait"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while relocation(&env, "vm")["bytes_done"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(wait.id() as i32, libc::SIGINT) };
    let o = wait.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a wait cut short is not a relocation");
    let last = err.trim().lines().last().unwrap_or("");
    for want in [
        "SIGINT",
        "goes on in the daemon",
        "recoverfs relocate vm --resume --wait",
        "--pause",
        "--cancel",
    ] {
        assert!(last.contains(want), "{want:?} not in the last line: {err}");
    }
    let state = relocation(&env, "vm")["state"].clone();
    assert!(
        ["copying", "converging", "switching", "done"].contains(&state.as_str().unwrap()),
        "the relocation stopped with the wait: {state}"
    );
    // Followed again as the line says, to the cutover.
    let out = env.ok(&["relocate", "--socket", &socket, "vm", "--resume", "--wait"]);
    assert!(out.contains("relocated VM vm"), "{out}");
}

/// An administrator who started a relocation to the wrong target cancels
/// it and relocates elsewhere; the VM writes all along.
#[test]
fn a_cancelled_relocation_is_not_resumed_and_one_elsewhere_then_equals_the_disk() {
    let env = Env::new();
    let mut data = random_image(&env.path("a.raw"), 1024 * K64, 59, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let socket = env.socket.to_str().unwrap().to_string();
    let cancel = ["relocate", "--socket", &socket, "vm", "--cancel"];
    env.fails(&cancel, "no relocation to cancel");
    let wrong = env.path("wrong");
    std::fs::create_dir(&wrong).unwrap();
    // 64 MiB at 4 MB/s: about 16 s of copying, time enough to cancel it.
    let o = relocate(&env, "vm", &wrong, &["--rate", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    while relocation(&env, "vm")["bytes_done"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(b"before the cancel", 5 * K64 as u64)
        .unwrap();
    let t = Instant::now();
    let out = env.ok(&cancel);
    eprintln!("relocate --cancel took {:?}: {out}", t.elapsed());
    assert!(
        out.contains("cancelled the relocation of VM vm") && out.contains("disk0.raw"),
        "{out}"
    );
    assert!(
        !wrong.join("vm").exists(),
        "the cancel left what the relocation created in {}",
        wrong.display()
    );
    assert!(relocation(&env, "vm").is_null());
    f.write_all_at(b"after the cancel", 6 * K64 as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    env.fails(&cancel, "no relocation to cancel");
    // A restart does not resume it.
    d.kill9();
    std::mem::forget(d);
    let _d2 = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    std::thread::sleep(Duration::from_millis(300));
    assert!(relocation(&env, "vm").is_null(), "resumed after a restart");
    assert!(!wrong.join("vm").exists());
    // Relocated elsewhere, the target is the disk.
    let right = env.path("right");
    std::fs::create_dir(&right).unwrap();
    let o = relocate(&env, "vm", &right, &["--wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Once cut over, the target is the live disk: no cancel.
    env.fails(&cancel, "live disk");
    // The disk as the VM wrote it (it reads the target since the cutover,
    // so it is compared with the expected image too).
    data[5 * K64..][..17].copy_from_slice(b"before the cancel");
    data[6 * K64..][..16].copy_from_slice(b"after the cancel");
    let expected = env.path("expected.raw");
    std::fs::write(&expected, &data).unwrap();
    let target = right.join("vm/disk0.raw");
    for other in [&disk, &expected] {
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(other)
            .arg(&target)
            .output()
            .expect("qemu-img is installed");
        assert!(
            cmp.status.success(),
            "the target differs from {}: {}{}",
            other.display(),
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
    }
    assert!(right.join("vm/vm.json").exists());
}
