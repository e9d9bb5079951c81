//! Printing commands whose reader goes away end quietly, as by SIGPIPE.

use std::io::Read;

use super::*;

#[test]
fn a_listing_whose_reader_stops_early_ends_quietly_not_with_a_panic() {
    let env = Env::new();
    repo_with_vm(&env);
    let repo = env.repo_str();
    for args in [vec!["list", "--repo", repo], vec!["verify", "--repo", repo]] {
        // A pipe whose reader is gone before the first line (`| head -0`).
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let o = std::process::Command::new(bin())
            .args(&args)
            .stdout(std::process::Stdio::from(w))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// Runs `args` with stdout a one-page pipe, reads the first line, then
/// closes the pipe as `| head -1` does. The command has more than a page
/// left to write, so a later write of it finds the reader gone.
fn read_one_line_then_close(env: &Env, args: &[&str]) -> (std::process::ExitStatus, String) {
    use std::os::fd::AsRawFd;
    // Close-on-exec: no child (of any test) may hold the reading end.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let child = std::process::Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.extra_env.iter().cloned())
        .stdout(std::process::Stdio::from(w))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = std::fs::File::from(r);
    let mut line = vec![];
    let mut b = [0u8];
    while b[0] != b'\n' {
        assert_eq!(r.read(&mut b).unwrap(), 1, "{args:?}: output ended early");
        line.push(b[0]);
    }
    drop(r);
    let o = child.wait_with_output().unwrap();
    (o.status, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn every_printing_command_ends_quietly_as_by_sigpipe_when_its_reader_goes_away() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new();
    let img = env.path("a.raw");
    std::fs::write(&img, b"a small disk").unwrap();
    // 120 backups of 12 VMs: `forget --dry-run` prints a line for each.
    let (repo, _) = recoverfs::repo::Repository::open_or_create(env.repo_str()).unwrap();
    for i in 0..120 {
        let req = recoverfs::repo::writer::BackupRequest {
            vm: format!("vm{}", i % 12),
            config: None,
            chunk_size: 65536,
            images: vec![img.clone()],
            progress: false,
        };
        recoverfs::repo::writer::run_backup(&repo, req).unwrap();
    }
    // A profile of 64 disks read over a minute: a dozen lines each.
    let disks: Vec<serde_json::Value> = (0..64)
        .map(|i| {
            let reads: Vec<_> = (0..12)
                .map(|t| serde_json::json!([t, t * 5000 + 100, null]))
                .collect();
            serde_json::json!({"index": i, "block_size": 65536, "accesses": reads})
        })
        .collect();
    let profile = serde_json::json!({"format": "recoverfs-profile-1", "vm": "vm", "recordings": [
        {"recorded": "2026-11-24T00:00:00Z", "backup": "b", "source": "import", "disks": disks}]});
    std::fs::write(env.path("p.json"), profile.to_string()).unwrap();
    let p = env.path("p.json");
    env.ok(&[
        "profile",
        "import",
        "--repo",
        env.repo_str(),
        "vm",
        p.to_str().unwrap(),
    ]);
    let repo = env.repo_str();
    for args in [
        // `println!` (which panicked on EPIPE).
        vec!["profile", "show", "--repo", repo, "vm"],
        vec!["forget", "--repo", repo, "--keep-last", "1", "--dry-run"],
        vec!["list", "--repo", repo],
        // A write whose EPIPE is returned as an error.
        vec!["profile", "export", "--repo", repo, "vm"],
    ] {
        let (status, err) = read_one_line_then_close(&env, &args);
        assert!(err.is_empty(), "{args:?}: {err}");
        assert_eq!(status.signal(), Some(libc::SIGPIPE), "{args:?}: {status}");
    }
    // The dry run removed nothing.
    let listed = env.ok(&["list", "--repo", repo, "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(doc["backups"].as_array().unwrap().len(), 120);
}
