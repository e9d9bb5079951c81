//! Every bad input gets a one-line error, a non-zero exit and no lost data.

#[path = "bad_input/api.rs"]
mod api;
mod common;
#[path = "bad_input/output.rs"]
mod output;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;

use common::*;

const K64: usize = 64 << 10;

/// `serve` with these paths must fail with a one-line error naming `needle`.
fn serve_fails(
    env: &Env,
    repo: &str,
    staging: &str,
    mount: &str,
    socket: Option<&str>,
    needle: &str,
) {
    let mut args = vec![
        "serve",
        "--repo",
        repo,
        "--staging",
        staging,
        "--mount",
        mount,
    ];
    if let Some(s) = socket {
        args.extend(["--socket", s]);
    }
    env.fails(&args, needle);
}

fn repo_with_vm(env: &Env) -> String {
    random_image(&env.path("a.raw"), 4 * K64 + 10, 31, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")])
}

#[test]
fn missing_or_foreign_repositories_are_refused() {
    let env = Env::new();
    let missing = env.path("nope");
    let m = missing.to_str().unwrap();
    env.fails(&["list", "--repo", m], "does not exist");
    env.fails(&["verify", "--repo", m], "does not exist");
    serve_fails(
        &env,
        m,
        "/tmp/x",
        env.mount.to_str().unwrap(),
        None,
        "does not exist",
    );
    let other = env.path("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("file"), b"x").unwrap();
    let o = other.to_str().unwrap();
    env.fails(&["list", "--repo", o], "not a recoverfs repository");
    env.fails(
        &[
            "backup",
            "--repo",
            o,
            "--vm",
            "v",
            env.path("other/file").to_str().unwrap(),
        ],
        "not a recoverfs repository",
    );
    assert_eq!(
        std::fs::read(other.join("file")).unwrap(),
        b"x",
        "foreign data untouched"
    );
}

#[test]
fn images_that_are_not_files_or_block_devices_are_refused() {
    let env = Env::new();
    let r = env.repo_str().to_string();
    env.fails(
        &["backup", "--repo", &r, "--vm", "v", "/dev/null"],
        "neither a regular file nor a block device",
    );
    env.fails(
        &[
            "backup",
            "--repo",
            &r,
            "--vm",
            "v",
            env.dir.path().to_str().unwrap(),
        ],
        "neither a regular file",
    );
    env.fails(
        &[
            "backup",
            "--repo",
            &r,
            "--vm",
            "v",
            env.path("missing.raw").to_str().unwrap(),
        ],
        "missing.raw",
    );
    random_image(&env.path("a.raw"), K64, 1, K64);
    env.fails(
        &[
            "backup",
            "--repo",
            &r,
            "--vm",
            "v",
            "--chunk-size",
            "3M",
            env.path("a.raw").to_str().unwrap(),
        ],
        "chunk size",
    );
    env.fails(
        &[
            "backup",
            "--repo",
            &r,
            "--vm",
            "../x",
            env.path("a.raw").to_str().unwrap(),
        ],
        "invalid VM name",
    );
    env.fails(
        &[
            "backup",
            "--repo",
            &r,
            "--vm",
            "a/b",
            env.path("a.raw").to_str().unwrap(),
        ],
        "invalid VM name",
    );
    std::fs::write(env.path("bad.json"), b"{not json").unwrap();
    env.fails(
        &[
            "backup",
            "--repo",
            &r,
            "--vm",
            "v",
            "--config",
            env.path("bad.json").to_str().unwrap(),
            env.path("a.raw").to_str().unwrap(),
        ],
        "not valid JSON",
    );
}

#[test]
fn empty_images_and_configs_asking_for_no_memory_are_refused_before_the_repository_exists() {
    let env = Env::new();
    let r = env.repo_str().to_string();
    let backup_fails = |args: &[&str], want: &str| {
        let mut all = vec!["backup", "--repo", &r, "--vm", "v"];
        all.extend_from_slice(args);
        env.fails(&all, want);
    };
    std::fs::write(env.path("empty.raw"), b"").unwrap();
    backup_fails(
        &[env.path("empty.raw").to_str().unwrap()],
        "empty.raw is empty",
    );
    random_image(&env.path("a.raw"), K64, 1, K64);
    std::fs::write(env.path("cfg.json"), br#"{"memory_mib": 0}"#).unwrap();
    let (cfg, img) = (env.path("cfg.json"), env.path("a.raw"));
    backup_fails(
        &["--config", cfg.to_str().unwrap(), img.to_str().unwrap()],
        "memory_mib 0",
    );
    assert!(
        !env.repo.exists(),
        "a refused backup created the repository"
    );
}

#[test]
fn unknown_vm_backup_and_malformed_names_are_refused() {
    let env = Env::new();
    repo_with_vm(&env);
    let _d = env.serve();
    let s = env.socket.to_str().unwrap().to_string();
    env.fails(&["recover", "--socket", &s, "ghost"], "unknown VM");
    env.fails(
        &[
            "recover",
            "--socket",
            &s,
            "vm",
            "--backup",
            "20000101-000000",
        ],
        "unknown backup",
    );
    env.fails(&["recover", "--socket", &s, ".."], "invalid VM name");
    env.fails(&["release", "--socket", &s, "ghost"], "no recovery session");
    env.fails(
        &["verify", "--repo", env.repo_str(), "--vm", "ghost"],
        "unknown VM",
    );
    // Names the shell cannot pass (NUL, slash) through the API directly.
    for name in ["a\\u0000b", "a/b", "..", "."] {
        let body = format!("{{\"vm\":\"{name}\"}}");
        let req = format!(
            "POST /sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut c = UnixStream::connect(&env.socket).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 400"), "{name}: {resp}");
        assert!(resp.contains("invalid VM name"), "{resp}");
    }
    assert_eq!(
        std::fs::read_dir(&env.mount).unwrap().count(),
        0,
        "nothing was created"
    );
}

#[test]
fn an_unresolvable_host_for_several_vms_is_refused_once_and_recovers_none() {
    let env = Env::new();
    repo_with_vm(&env);
    random_image(&env.path("b.raw"), 2 * K64, 32, K64);
    env.backup("vm2", "64K", &[&env.path("b.raw")]);
    let _d = env.serve();
    let s = env.socket.to_str().unwrap().to_string();
    let args = [
        "recover",
        "--socket",
        &s,
        "vm",
        "vm2",
        "--host",
        "no-such-host.invalid",
    ];
    let err = env.fails(&args, "no-such-host.invalid");
    assert!(err.contains("neither an address nor a name"), "{err}");
    assert_eq!(
        env.status()["sessions"],
        serde_json::json!([]),
        "a VM was recovered"
    );
}

#[test]
fn an_nbd_unix_socket_without_a_path_is_refused_in_one_line_before_anything_starts() {
    let env = Env::new();
    repo_with_vm(&env);
    let (r, st) = (env.repo_str(), env.staging.to_str().unwrap());
    let m = env.mount.to_str().unwrap();
    let s = env.socket.to_str().unwrap();
    env.fails(
        &[
            "serve",
            "--repo",
            r,
            "--staging",
            st,
            "--mount",
            m,
            "--socket",
            s,
            "--nbd",
            "unix:",
        ],
        "no socket path: give unix:PATH",
    );
    assert!(!env.staging.exists() && !env.socket.exists());
}

#[test]
fn bad_mount_points_are_refused() {
    let env = Env::new();
    repo_with_vm(&env);
    let r = env.repo_str().to_string();
    let st = env.staging.to_str().unwrap().to_string();
    serve_fails(
        &env,
        &r,
        &st,
        env.path("nomount").to_str().unwrap(),
        None,
        "does not exist",
    );
    let full = env.path("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"keep").unwrap();
    serve_fails(&env, &r, &st, full.to_str().unwrap(), None, "not empty");
    assert_eq!(std::fs::read(full.join("x")).unwrap(), b"keep");
    // A mount point already served by another daemon is that daemon's:
    // never "unmount it first", which would take its VMs' disks.
    let _d = env.serve();
    let st2 = env.path("staging2");
    let sock2 = env.path("s2.sock");
    serve_fails(
        &env,
        &r,
        st2.to_str().unwrap(),
        env.mount.to_str().unwrap(),
        Some(sock2.to_str().unwrap()),
        "served by a running recoverfs daemon: choose another --mount",
    );
}

/// Sends `sig` to `pid`.
fn signal(pid: u32, sig: i32) {
    // SAFETY: a signal to a child process of this test; no memory involved.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Resumes a stopped process when dropped, also when the test fails.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

#[test]
fn a_mount_point_whose_daemon_is_stopped_is_refused_in_seconds_not_waited_on() {
    let env = Env::new();
    repo_with_vm(&env);
    let d = env.serve();
    // Past the kernel's attribute cache, a stat of the mount asks the daemon.
    signal(d.pid(), libc::SIGSTOP);
    let _resume = Continue(d.pid());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let st2 = env.path("staging2");
    let sock2 = env.path("s2.sock");
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--repo", env.repo_str(), "--staging"])
        .arg(&st2)
        .arg("--mount")
        .arg(&env.mount)
        .arg("--socket")
        .arg(&sock2)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("serve waited on the stopped daemon's mount point");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("does not answer within 5 s"), "{err}");
    assert!(!st2.exists(), "a refusal made the staging directory");
}

#[test]
fn shared_staging_sockets_and_foreign_staging_are_refused() {
    let env = Env::new();
    repo_with_vm(&env);
    let r = env.repo_str().to_string();
    let _d = env.serve();
    let m2 = env.path("m2");
    std::fs::create_dir(&m2).unwrap();
    // Same staging as the running daemon: locked.
    serve_fails(
        &env,
        &r,
        env.staging.to_str().unwrap(),
        m2.to_str().unwrap(),
        Some(env.path("s2").to_str().unwrap()),
        "in use by another recoverfs daemon",
    );
    // Same socket as the running daemon.
    serve_fails(
        &env,
        &r,
        env.path("st2").to_str().unwrap(),
        m2.to_str().unwrap(),
        Some(env.socket.to_str().unwrap()),
        "already served",
    );
    assert!(
        !env.path("st2").exists(),
        "a refused serve made a staging directory"
    );
}

#[test]
fn staging_of_another_repository_is_refused_when_idle() {
    let a = Env::new();
    repo_with_vm(&a);
    let mut d = a.serve();
    d.stop();
    let b = Env::new();
    repo_with_vm(&b);
    let m = b.mount.to_str().unwrap();
    serve_fails(
        &a,
        b.repo_str(),
        a.staging.to_str().unwrap(),
        m,
        None,
        "another repository",
    );
}

/// `list` with one damaged manifest: the others listed, the damaged one
/// on its own line (stdout) or an entry with an `error` (JSON), and a
/// one-line error with a non-zero exit at the end.
fn list_with_damage(env: &Env, damaged: &str, why: &str, good: &str) {
    let o = env.run(&["list", "--repo", env.repo_str()]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(!o.status.success(), "{out}");
    assert!(
        err.starts_with("recoverfs: error: 1 damaged backup(s)") && err.lines().count() == 1,
        "{err}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("DAMAGED"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with(&format!("DAMAGED manifest {damaged}: ")) && line.contains(why),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("other ") && l.contains(good)),
        "{out}"
    );
    let o = env.run(&["list", "--repo", env.repo_str(), "--json"]);
    assert!(!o.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let all = doc["backups"].as_array().unwrap();
    assert_eq!(all.len(), 2, "{doc}");
    let (vm, id) = damaged.split_once('/').unwrap();
    let bad = all.iter().find(|b| b["vm"] == vm).unwrap();
    assert_eq!(
        (bad["id"].as_str(), bad["kind"].as_str()),
        (Some(id), Some("disk")),
        "{doc}"
    );
    assert!(bad["error"].as_str().unwrap().contains(why), "{doc}");
    let ok = all.iter().find(|b| b["vm"] == "other").unwrap();
    assert!(
        ok["id"] == good && ok["error"].is_null() && ok["disks"] == 1,
        "{doc}"
    );
}

#[test]
fn corrupt_or_truncated_manifests_are_reported() {
    let env = Env::new();
    let id = repo_with_vm(&env);
    let good = env.backup("other", "64K", &[&env.path("a.raw")]);
    let manifest = env.repo.join("backups/vm").join(format!("{id}.json"));
    let bytes = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &bytes[..bytes.len() / 2]).unwrap();
    list_with_damage(&env, &format!("vm/{id}"), "damaged or truncated", &good);
    let o = env.run(&["verify", "--repo", env.repo_str()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("DAMAGED manifest vm/{id}")));
    let _d = env.serve();
    env.fails(
        &["recover", "--socket", env.socket.to_str().unwrap(), "vm"],
        "damaged or truncated",
    );
    // A flipped digest character fails the checksum.
    let mut s = String::from_utf8(bytes).unwrap();
    let list = s.find("\"chunks\":[").unwrap();
    let i = list + s[list + 10..].find('"').unwrap() + 11;
    let c = if &s[i..i + 1] == "0" { "1" } else { "0" };
    s.replace_range(i..i + 1, c);
    std::fs::write(&manifest, s).unwrap();
    list_with_damage(&env, &format!("vm/{id}"), "checksum", &good);
}

#[test]
fn missing_chunk_is_named_by_verify() {
    let env = Env::new();
    let id = repo_with_vm(&env);
    let chunks = env.repo.join("chunks");
    let dir = std::fs::read_dir(&chunks)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let victim = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&victim).unwrap();
    let o = env.run(&[
        "verify",
        "--repo",
        env.repo_str(),
        "--vm",
        "vm",
        "--backup",
        &id,
    ]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(out.contains(name) && out.contains("missing"), "{out}");
}

#[test]
fn client_without_daemon_says_so() {
    let env = Env::new();
    env.fails(
        &[
            "status",
            "--socket",
            env.path("none.sock").to_str().unwrap(),
        ],
        "no recoverfs daemon",
    );
    // The directory the socket is in, not the socket.
    env.fails(
        &["status", "--socket", env.path("").to_str().unwrap()],
        "is a directory, not a daemon's control socket",
    );
}

/// Staging on a file system with room for a few blocks: every read still
/// returns the backup's bytes (a block staging cannot take is answered
/// from the fetched bytes and stays unstaged), the log and status say
/// why, a guest write that needs room fails with ENOSPC, and the daemon
/// keeps serving.
#[test]
fn a_full_staging_disk_keeps_reads_right_fails_writes_cleanly_and_keeps_serving() {
    let env = Env::new();
    let data = random_image(&env.path("a.raw"), 64 * K64, 35, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _fs = Tmpfs::mount(&env.staging, "512k");
    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let f = std::fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; K64];
    for b in 0..64u64 {
        f.read_exact_at(&mut buf, b * K64 as u64)
            .unwrap_or_else(|e| panic!("block {b}: {e}"));
        assert!(
            buf[..] == data[b as usize * K64..(b as usize + 1) * K64],
            "block {b} wrong"
        );
    }
    // Reads across block boundaries too (the general read path).
    let mut two = vec![0u8; 8192];
    for b in (1..64u64).step_by(5) {
        let off = b * K64 as u64 - 4096;
        f.read_exact_at(&mut two, off)
            .unwrap_or_else(|e| panic!("read across block {b}: {e}"));
        assert!(
            two[..] == data[off as usize..off as usize + 8192],
            "read across block {b} wrong"
        );
    }
    assert!(
        d.log_text().contains("No space left"),
        "the log must say why: {}",
        d.log_text()
    );
    // Blocks staging could not take are not failed fetches: every read
    // above was answered. They are counted apart, and warned about at most
    // once per 10 s rather than a line per block.
    let st = env.disk_status("vm", 0);
    let not_staged = st["staging_write_errors"].as_u64().unwrap();
    assert!(not_staged >= 1, "{st}");
    assert_eq!(st["fetch_errors"], 0, "{st}");
    assert!(st["last_fetch_error"].is_null(), "{st}");
    assert!(
        st["last_staging_write_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{st}"
    );
    let log = d.log_text();
    assert!(!log.contains("fetch failed"), "{log}");
    let warned = log.matches("could not be staged").count() as u64;
    assert!(
        warned >= 1 && warned < not_staged,
        "{warned} lines for {not_staged}: {log}"
    );
    let w = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let e = w
        .write_all_at(&vec![7u8; K64], 63 * K64 as u64)
        .and_then(|()| w.sync_all())
        .expect_err("a write with no room in staging succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // Still serving, and the failed write changed nothing a read sees.
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == data[..K64]);
}

#[test]
fn agent_restore_into_the_running_guest_needs_in_place_said() {
    let env = Env::new();
    repo_with_vm(&env);
    env.fails(
        &[
            "agent-restore",
            "--repo",
            env.repo_str(),
            "--vm",
            "vm=/nonexistent/q.sock,qga=/nonexistent/g.sock",
            "/etc",
        ],
        "only with --in-place",
    );
}

/// SIGTERM (host shutdown) while a VM still has a disk open: the daemon
/// stops all the same, names the VM whose disk I/O now fails, and leaves
/// no dead mount behind; the next `serve` serves the write it had taken.
#[test]
fn stopping_the_daemon_with_a_disk_open_names_the_vm_and_leaves_no_dead_mount() {
    let env = Env::new();
    repo_with_vm(&env);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    f.write_all_at(b"kept", 0).unwrap();
    f.sync_all().unwrap();
    assert!(!d.stop().success(), "a VM lost its disk: not a clean stop");
    let log = d.log_text();
    let err = log
        .lines()
        .rfind(|l| l.starts_with("recoverfs: error: "))
        .unwrap_or_else(|| panic!("no error line: {log}"));
    assert!(
        err.contains("VM(s) vm ") && err.contains("ENOTCONN") && err.contains("detached"),
        "{err}"
    );
    // Not a dead mount (ENOTCONN) but the empty directory again.
    assert!(std::fs::metadata(&env.mount).unwrap().is_dir());
    drop(f);
    let _d2 = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let mut head = [0u8; 4];
    std::fs::File::open(&disk)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(&head, b"kept");
}

/// `verify --backup ID` without `--vm` checks the VM that has that backup,
/// not every VM (which failed on the first VM without it).
#[test]
fn verify_of_a_backup_id_alone_finds_its_vm_and_an_unknown_id_is_named() {
    let env = Env::new();
    let first = repo_with_vm(&env);
    random_image(&env.path("b.raw"), 2 * K64, 33, K64);
    // Ids are the second a backup began: another second, another id.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let id = env.backup("zz-app", "64K", &[&env.path("b.raw")]);
    assert_ne!(id, first);
    let out = env.ok(&["verify", "--repo", env.repo_str(), "--backup", &id]);
    assert!(out.contains("of 1 backup(s) verified"), "{out}");
    env.fails(
        &[
            "verify",
            "--repo",
            env.repo_str(),
            "--backup",
            "20200101-000000",
        ],
        "no VM in",
    );
}
