//! `files` on disk backups whose filesystem was caught mid-flight: a
//! crash-consistent backup holds the newest metadata only in the journal.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn sh(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An ext4 filesystem mounted from a loop device, unmounted and detached
/// on drop, also when the test fails.
struct LiveExt4 {
    mnt: PathBuf,
    dev: String,
}

impl LiveExt4 {
    fn new(img: &Path, mnt: &Path) -> LiveExt4 {
        std::fs::File::create(img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        sh("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        let dev = sh("losetup", &["--find", "--show", img.to_str().unwrap()])
            .trim()
            .to_string();
        std::fs::create_dir_all(mnt).unwrap();
        let live = LiveExt4 {
            mnt: mnt.to_path_buf(),
            dev,
        };
        sh("mount", &[&live.dev, mnt.to_str().unwrap()]);
        live
    }
}

impl Drop for LiveExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn files_of_a_backup_taken_while_a_file_was_only_in_the_ext4_journal_reads_that_file() {
    let env = Env::new();
    let img = env.path("live.img");
    let live = LiveExt4::new(&img, &env.path("live"));
    let copy = env.path("copy.img");
    // A new file, fsynced: its inode and directory entry are committed to
    // the journal; their home blocks are written back later. A copy taken
    // now is what a crash-consistent backup sees.
    let mut name = String::new();
    for attempt in 0..5 {
        name = format!("note-{attempt}");
        std::fs::write(live.mnt.join(&name), b"written before the backup\n").unwrap();
        let f = std::fs::File::open(live.mnt.join(&name)).unwrap();
        f.sync_all().unwrap();
        sh(
            "cp",
            &[
                "--sparse=always",
                img.to_str().unwrap(),
                copy.to_str().unwrap(),
            ],
        );
        // Without replaying the journal, the file is not there yet.
        let seen = sh(
            "debugfs",
            &["-R", &format!("stat /{name}"), copy.to_str().unwrap()],
        );
        if !seen.contains("Inode:") {
            break;
        }
        assert!(
            attempt < 4,
            "the file always reached its home blocks at once"
        );
    }
    let header = sh("dumpe2fs", &["-h", copy.to_str().unwrap()]);
    assert!(header.contains("needs_recovery"), "{header}");
    drop(live);
    let id = env.backup("vm", "64K", &[&copy]);
    let text = env.ok(&[
        "files",
        "cat",
        "--repo",
        env.repo_str(),
        "vm",
        "--backup",
        &id,
        &format!("/{name}"),
    ]);
    assert_eq!(text, "written before the backup\n");
    // The backup itself is unchanged: the replay went to scratch staging.
    assert!(restored(env.repo_str(), "vm", &id, 0) == std::fs::read(&copy).unwrap());
}

/// The bytes a shell's reaped children read (`rchar` of `/proc/PID/io`
/// counts a waited-for child's reads in its parent) while running `args`.
fn run_counting_reads(args: &[&str]) -> (std::process::Output, u64) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(r#""$@" >&2 && grep '^rchar:' /proc/$$/io"#)
        .arg("sh")
        .arg(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let rchar = (out
        .trim()
        .strip_prefix("rchar:")
        .map(|n| n.trim().parse().unwrap()))
    .unwrap_or(u64::MAX);
    (o, rchar)
}

/// A sparse file of a disk backup restores sparse, equal, and reading only
/// its data (fixstatus 3: its holes were read in full, a 1 TiB sparse file
/// costing 1 TiB of reads of zeros).
#[test]
fn a_sparse_file_restored_from_a_disk_backup_reads_only_its_data_and_stays_sparse() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let env = Env::new();
    let img = env.path("disk.img");
    let live = LiveExt4::new(&img, &env.path("live"));
    // 1 GiB with 1 MiB of data at 512 MiB; the same file beside, to compare.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let want = env.path("want");
    for p in [live.mnt.join("big"), want.clone()] {
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 30).unwrap();
        f.write_all_at(&data, 512 << 20).unwrap();
        f.sync_all().unwrap();
    }
    drop(live);
    let id = env.backup("vm", "64K", &[&img]);
    let to = env.path("restored");
    std::fs::create_dir(&to).unwrap();
    let (o, read) = run_counting_reads(&[
        "files",
        "restore",
        "--repo",
        env.repo_str(),
        "vm",
        "--backup",
        &id,
        "/big",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "files restore: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("files restore of a 1 GiB file with 1 MiB of data read {read} bytes");
    let got = to.join("big");
    let m = std::fs::metadata(&got).unwrap();
    assert_eq!(m.len(), 1 << 30);
    assert!(
        m.blocks() * 512 <= 4 << 20,
        "{} blocks: not sparse",
        m.blocks()
    );
    sh("cmp", &[want.to_str().unwrap(), got.to_str().unwrap()]);
    // Its data, the backup's metadata and the scratch recovery's own
    // reads: far from the 1 GiB a copy reading the holes reads.
    assert!(
        read < 128 << 20,
        "{read} bytes read to restore 1 MiB of data"
    );
}
