//! Real QEMU boots the `tiny` VM image straight from the recovery mount.

mod common;

use common::*;

const MARKER: &str = "RECOVERFS-TINY-UP boot=";

#[test]
fn tiny_vm_boots_from_its_backup_and_keeps_its_writes_across_release_crash_and_rebackup() {
    let env = Env::new();
    let image = tiny_image();
    let id = env.backup("tiny", "64K", &[&image]);
    let mut d1 = env.serve();
    let disk = env.recover("tiny", Some(&id))[0].clone();
    assert_eq!(disk, env.mount.join("tiny/disk0.raw"));

    assert_eq!(boot_counter_of(&disk, "first boot"), 1);
    let st = env.disk_status("tiny", 0);
    let (staged, total, zero) = (
        st["blocks_staged"].as_u64().unwrap(),
        st["blocks_total"].as_u64().unwrap(),
        st["zero_blocks"].as_u64().unwrap(),
    );
    assert!(
        staged < total / 4,
        "the first boot should stage a fraction of the disk: {st}"
    );
    // Prefetch may stage every stored block in the background (profile,
    // then relocation order), and the guest's writes stage zero blocks, so
    // what the boot needed is the reads that waited for a fetch.
    let waited = st["reads"].as_u64().unwrap() - st["read_hits"].as_u64().unwrap();
    assert!(
        waited < (total - zero) / 2,
        "the boot should wait for a fraction of the stored blocks: {st}"
    );
    assert!(
        st["blocks_changed"].as_u64().unwrap() > 0,
        "the guest wrote its counter: {st}"
    );

    // Release and recover again: the staging is resumed.
    let o = env.release("tiny", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let disk = env.recover("tiny", None)[0].clone();
    assert_eq!(boot_counter_of(&disk, "boot after release"), 2);

    // A crashed daemon: a new one on the same staging resumes the VM.
    d1.kill9();
    std::mem::forget(d1); // leave the stale mount for serve to clean up
    let d2 = env.serve();
    let disk = env.recover("tiny", None)[0].clone();
    assert_eq!(boot_counter_of(&disk, "boot after kill -9"), 3);

    // Back up the recovered disk through the mount, then boot that backup
    // from fresh staging: the counter continues.
    let id2 = env.backup("tiny", "64K", &[&disk]);
    assert_ne!(id, id2);
    let staging2 = env.path("staging2");
    let mount2 = env.path("mnt2");
    std::fs::create_dir(&mount2).unwrap();
    let socket2 = env.path("control2.sock");
    let _d3 = Daemon::start(&env, &staging2, &mount2, &socket2);
    let recover2 = |more: &[&str]| {
        let mut args = vec![
            "recover",
            "--socket",
            socket2.to_str().unwrap(),
            "tiny",
            "--backup",
            &id2,
        ];
        args.extend(more);
        env.run(&args)
    };
    // d2 still serves tiny: a second copy only when asked for.
    let o = recover2(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is served by a recoverfs daemon on host"),
        "{err}"
    );
    let o = recover2(&["--second-copy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let disk2 = mount2.join("tiny/disk0.raw");
    assert_eq!(boot_counter_of(&disk2, "boot of the re-backup"), 4);
    drop(d2);
}

#[test]
fn verify_boot_tells_a_bootable_backup_from_a_broken_one() {
    let env = Env::new();
    let image = tiny_image();
    env.backup("tiny", "64K", &[&image]);
    // verify-boot's scratch directory goes under this test's own TMPDIR:
    // another test runs verify-boot at the same time, and its mount is
    // not this one's leftover.
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let verify = || {
        std::process::Command::new(bin())
            .args(["verify-boot", "--repo", env.repo_str(), "tiny"])
            .args(["--marker", MARKER, "--timeout", "180"])
            .env("RUST_LOG", "warn")
            .env("TMPDIR", &tmp)
            .output()
            .unwrap()
    };
    let o = verify();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "good backup failed verify-boot: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("PASS: VM tiny"), "{out}");

    // Corrupt the chunk holding the MBR and boot loader start: block 0.
    let mbr = std::fs::read(&image).unwrap()[..64 << 10].to_vec();
    let digest = blake3::hash(&mbr).to_hex().to_string();
    let chunk = env.repo.join("chunks").join(&digest[..4]).join(&digest);
    let mut stored = std::fs::read(&chunk).unwrap();
    let n = stored.len();
    stored[n / 2] ^= 0xa5;
    std::fs::write(&chunk, stored).unwrap();
    let o = verify();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a broken backup passed verify-boot: {out}"
    );
    assert!(
        out.contains("FAIL: VM tiny") && out.contains(&digest),
        "the failure must name the damaged chunk: {out}"
    );
    assert!(err.contains("did not boot"), "{err}");
    // Nothing is left mounted, and the scratch directories are gone.
    assert_verify_boot_left_nothing_in(&tmp);
}

/// Nothing of a verify-boot run with TMPDIR `tmp` is mounted or left there.
fn assert_verify_boot_left_nothing_in(tmp: &std::path::Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(tmp.to_str().unwrap()),
        "verify-boot left a mount: {mounts}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "verify-boot left scratch files: {left:?}");
}

/// The qemu-system process whose parent is `parent`, once it runs.
fn qemu_child_of(parent: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: Option<u32> = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if ppid == Some(parent) && comm.starts_with("qemu-system") {
            return Some(pid);
        }
    }
    None
}

#[test]
fn qemu_runs_without_the_repository_credentials_and_inside_its_sandbox() {
    let env = Env::new();
    let image = tiny_image();
    env.backup("tiny", "64K", &[&image]);
    let secret = "do-not-hand-this-to-the-guest-8c1f";
    let mut child = std::process::Command::new(bin())
        .args([
            "verify-boot",
            "--repo",
            env.repo_str(),
            "tiny",
            "--marker",
            MARKER,
        ])
        .args(["--timeout", "180"])
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_ACCESS_KEY_ID", "GKtest")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // During execve the kernel renames the task before it lays out the new
    // argv and environment: a process seen in that window has an empty
    // cmdline and environ, so poll until both are there (QEMU always gets
    // PATH), or the checks below would pass on nothing.
    let (environ, cmdline) = loop {
        if let Some(p) = qemu_child_of(child.id()) {
            let environ = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if !environ.is_empty() && !cmdline.is_empty() {
                break (
                    environ,
                    String::from_utf8_lossy(&cmdline).replace('\0', " "),
                );
            }
        }
        assert!(std::time::Instant::now() < deadline, "no QEMU started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let st = child.wait().unwrap();
    assert!(st.success(), "verify-boot failed");
    let environ = String::from_utf8_lossy(&environ).replace('\0', "\n");
    assert!(
        !environ.contains(secret),
        "QEMU got the repository secret: {environ}"
    );
    assert!(
        !environ.contains("AWS_"),
        "QEMU got repository settings: {environ}"
    );
    assert!(
        cmdline.contains("-sandbox on"),
        "QEMU runs without its sandbox: {cmdline}"
    );
}

/// Kills a child left running when a test fails.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn boot_with_qmp_gives_a_monitor_that_controls_the_vm_and_never_replaces_a_file_and_boots_the_backup_named(
) {
    use recoverfs::qemu::qmp::Qmp;
    use std::time::{Duration, Instant};
    let env = Env::new();
    let older = env.backup("tiny", "64K", &[&tiny_image()]);
    let newest = env.backup("tiny", "64K", &[&tiny_image()]);
    assert_ne!(older, newest);
    let _d = env.serve();
    let sock = env.socket.to_str().unwrap();

    // A regular file where the socket would go is refused, untouched.
    let file = env.path("precious.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let out = env.fails(
        &[
            "boot",
            "--socket",
            sock,
            "tiny",
            "--qmp",
            file.to_str().unwrap(),
        ],
        "exists and is not a socket",
    );
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let qmp = env.path("tiny.qmp");
    let child = std::process::Command::new(bin())
        .args([
            "boot", "--socket", sock, "tiny", "--quiet", "--marker", MARKER,
        ])
        .args(["--timeout", "180", "--qmp", qmp.to_str().unwrap()])
        .args(["--backup", &older])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reap(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut q = loop {
        if let Ok(q) = Qmp::connect(&qmp) {
            break q;
        }
        assert!(Instant::now() < deadline, "no QMP socket from boot --qmp");
        std::thread::sleep(Duration::from_millis(5));
    };
    // The monitor controls this VM: pause it, look at its disk, resume.
    q.stop().unwrap();
    assert_eq!(q.status().unwrap().status, "paused");
    let disks = q.block_devices().unwrap();
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert!(disks[0].file.ends_with("tiny/disk0.raw"), "{disks:?}");
    q.cont().unwrap();
    let st = child.0.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(st.success(), "boot failed: {err}");
    // It booted the backup named, not the newest; another one now is
    // refused in one line naming the one served.
    assert_eq!(env.status()["sessions"][0]["backup"], older.as_str());
    let out = env.fails(
        &["boot", "--socket", sock, "tiny", "--backup", &newest],
        &format!("already being recovered from backup {older}"),
    );
    assert_eq!(out.trim().lines().count(), 1, "{out}");
}

#[test]
fn sigint_during_verify_boot_ends_it_through_its_cleanup() {
    let env = Env::new();
    let image = tiny_image();
    env.backup("tiny", "64K", &[&image]);
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut child = Reap(
        std::process::Command::new(bin())
            .args(["verify-boot", "--repo", env.repo_str(), "tiny"])
            .args(["--marker", "never-printed", "--timeout", "180"])
            .env("TMPDIR", &tmp)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Once QEMU runs on the scratch mount.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while qemu_child_of(child.0.id()).is_none() {
        assert!(std::time::Instant::now() < deadline, "no QEMU started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let st = child.0.wait().unwrap();
    assert!(!st.success(), "an interrupted verify-boot passed");
    assert_verify_boot_left_nothing_in(&tmp);
    let pins = env.repo.join("pins/tiny");
    let pinned: Vec<_> = std::fs::read_dir(&pins)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(pinned.is_empty(), "verify-boot left a pin: {pinned:?}");
}

#[test]
fn a_boot_refused_before_qemu_starts_leaves_no_session_it_recovered_behind() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let _d = env.serve();
    let sock = env.socket.to_str().unwrap();
    // This daemon serves no NBD export: refused after the recover.
    let out = env.fails(
        &["boot", "--socket", sock, "tiny", "--via", "nbd"],
        "no NBD export",
    );
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(out.contains("its new recovery was discarded"), "{out}");
    assert_eq!(env.status()["sessions"].as_array().unwrap().len(), 0);
    // A session that was there before the boot stays.
    env.recover("tiny", None);
    env.fails(
        &["boot", "--socket", sock, "tiny", "--via", "nbd"],
        "no NBD export",
    );
    assert_eq!(env.status()["sessions"].as_array().unwrap().len(), 1);
}

#[test]
fn a_boot_whose_console_reader_goes_away_stops_its_vm() {
    use std::io::BufRead;
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let _d = env.serve();
    let mut child = std::process::Command::new(bin())
        .args(["boot", "--socket", env.socket.to_str().unwrap(), "tiny"])
        .args(["--marker", "never-printed", "--timeout", "120"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    // `boot tiny | head -1`: the reader goes, the console goes on.
    drop(out);
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGPIPE), "{st}");
    // No QEMU is left running on the recovered disk.
    let disk = env.mount.join("tiny/disk0.raw");
    let left = std::process::Command::new("pgrep")
        .args(["-f", disk.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "QEMU still runs: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// Whether process `pid` has ended: gone, or a zombie not reaped yet.
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
        }
    }
}

/// Waits up to `secs` seconds for `pid` to end.
fn ends_within(pid: u32, secs: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !ended(pid) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// The QEMU `parent` starts, once it runs (60 s at most).
fn wait_for_qemu_of(parent: u32) -> u32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(q) = qemu_child_of(parent) {
            return q;
        }
        assert!(std::time::Instant::now() < deadline, "no QEMU started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Kills a QEMU a failed test left running.
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        // SAFETY: a signal to a process this test saw start; ended ones
        // are not signalled.
        if !ended(self.0) {
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_kill_9_of_boot_takes_its_qemu_with_it_and_the_disk_can_be_released() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let _d = env.serve();
    let mut child = Reap(
        std::process::Command::new(bin())
            .args(["boot", "--socket", env.socket.to_str().unwrap(), "tiny"])
            .args(["--quiet", "--marker", "never-printed", "--timeout", "120"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let qemu = KillPid(wait_for_qemu_of(child.0.id()));
    // `kill -9`: no destructor, no signal handler runs in boot.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(
        ends_within(qemu.0, 5),
        "QEMU {} runs on, orphaned, after a kill -9 of boot",
        qemu.0
    );
    env.release_closed("tiny", false);
}

#[test]
fn sigterm_or_sighup_to_boot_stops_its_qemu_as_a_timeout_does_and_says_so() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let _d = env.serve();
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // SIGHUP: the terminal `boot` ran in was closed.
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let mut child = Reap(
            std::process::Command::new(bin())
                .args(["boot", "--socket", env.socket.to_str().unwrap(), "tiny"])
                .args(["--quiet", "--marker", "never-printed", "--timeout", "120"])
                .env("TMPDIR", &tmp)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let qemu = KillPid(wait_for_qemu_of(child.0.id()));
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.0.id() as i32, sig) };
        let st = child.0.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        // It exits through its cleanup, not by the signal's default action.
        assert_eq!(st.code(), Some(1), "{name}: {st}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains(&format!(
                "{name}: the boot of VM tiny was stopped: QEMU was killed"
            )) && last.contains("`recoverfs release tiny`"),
            "{name}: {err}"
        );
        assert!(ended(qemu.0), "{name}: QEMU {} runs on", qemu.0);
        // Its scratch directory (the guest agent's socket) is gone.
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
        assert!(left.is_empty(), "{name}: boot left {left:?}");
        // The session stays, and nothing holds its disk any more.
        env.release_closed("tiny", false);
    }
}

#[test]
fn a_kill_9_of_verify_boot_takes_its_qemu_and_the_next_run_removes_its_dead_mount_and_staging() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let _detach = DetachUnder(tmp.clone());
    let verify = |timeout: &str| {
        let mut c = std::process::Command::new(bin());
        c.args(["verify-boot", "--repo", env.repo_str(), "tiny"])
            .args(["--marker", "never-printed", "--timeout", timeout])
            .env("TMPDIR", &tmp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let mut child = Reap(verify("120").spawn().unwrap());
    let qemu = KillPid(wait_for_qemu_of(child.0.id()));
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(
        ends_within(qemu.0, 5),
        "QEMU {} runs on after a kill -9 of verify-boot",
        qemu.0
    );
    // It left its dead mount, its staging and the boot's directory.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(mounts.contains(tmp.to_str().unwrap()), "{mounts}");
    let mut left: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert!(
        left.len() == 2
            && left[0].starts_with("recoverfs-boot-")
            && left[1].starts_with("recoverfs-verify-"),
        "{left:?}"
    );
    // The next run removes them (and its own), saying so.
    let o = verify("1").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert_eq!(
        err.matches("left by a recoverfs run that died without its cleanup")
            .count(),
        2,
        "{err}"
    );
    assert_verify_boot_left_nothing_in(&tmp);
}

/// Detaches what a failed test left mounted under a directory.
struct DetachUnder(std::path::PathBuf);

impl Drop for DetachUnder {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for point in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if std::path::Path::new(point).starts_with(&self.0) {
                let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
