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
