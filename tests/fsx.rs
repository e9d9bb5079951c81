//! fsx (the file-system exerciser, Rust port) against a recovered disk
//! file on the FUSE mount: reads, writes, mapped reads and writes, hole
//! punches (a guest's discard), fsync and fdatasync, at any offset and
//! length, checked against fsx's own model of the file. Block mode keeps
//! the file's size fixed, as a disk's is.
//!
//! `make test` runs a short run per chunk size; the full run is
//! `RECOVERFS_FSX_OPS=200000 RECOVERFS_FSX_SEEDS=1,2,3 cargo test --release --test fsx`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

const M: usize = 1 << 20;

fn fsx_bin() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let cached = PathBuf::from(home).join(".cargo/bin/fsx");
    if cached.exists() {
        return cached;
    }
    let found = Command::new("sh")
        .args(["-c", "command -v fsx"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    found.expect("fsx is missing: run `make test` (scripts/install-fsx.sh installs it)")
}

/// Block mode: no truncation, no size change; every kind of I/O a disk
/// file sees, including mapped reads and writes, hole punches and both
/// syncs.
const CONFIG: &str = r#"
blockmode = true
nosizechecks = true
[opsize]
max = 262144
min = 1
align = 1
[weights]
read = 10
write = 10
mapread = 5
mapwrite = 5
fsync = 1
fdatasync = 1
truncate = 0
close_open = 0
posix_fallocate = 0
invalidate = 0
punch_hole = 1
sendfile = 0
posix_fadvise = 0
copy_file_range = 0
"#;

fn run_fsx(chunk: &str) {
    let ops: u64 = std::env::var("RECOVERFS_FSX_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seeds: Vec<u64> = std::env::var("RECOVERFS_FSX_SEEDS")
        .unwrap_or_else(|_| "1".into())
        .split(',')
        .map(|s| s.trim().parse().expect("RECOVERFS_FSX_SEEDS: numbers"))
        .collect();
    let env = Env::new();
    random_image(&env.path("a.raw"), 64 * M, 77, M);
    env.backup("vm", chunk, &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let config = env.path("fsx.toml");
    std::fs::write(&config, CONFIG).unwrap();
    for seed in seeds {
        let artifacts = env.path(&format!("fsx-{seed}"));
        std::fs::create_dir_all(&artifacts).unwrap();
        let o = Command::new(fsx_bin())
            .arg("-f")
            .arg(&config)
            .arg("-P")
            .arg(&artifacts)
            .args(["-S", &seed.to_string(), "-N", &ops.to_string()])
            .arg(&disk)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && out.contains("All operations completed A-OK!"),
            "fsx seed {seed}, {ops} ops, {chunk} chunks: {}\n{out}\n{}",
            o.status,
            err.lines().take(80).collect::<Vec<_>>().join("\n")
        );
        eprintln!("fsx seed {seed}: {ops} operations A-OK with {chunk} chunks");
    }
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        64 * M as u64,
        "the disk's size changed"
    );
}

#[test]
fn fsx_finds_no_error_on_a_recovered_disk_with_1m_chunks() {
    run_fsx("1M");
}

#[test]
fn fsx_finds_no_error_on_a_recovered_disk_with_64k_chunks() {
    run_fsx("64K");
}
