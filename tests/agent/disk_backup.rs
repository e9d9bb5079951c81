//! Single files from a disk backup (a loop mount, no boot), bad input,
//! and a disk-backup restore interrupted.

use super::*;

/// "8.7 MiB" in `text` after `after` → bytes.
fn bytes_after(text: &str, after: &str) -> u64 {
    let rest = &text[text
        .find(after)
        .unwrap_or_else(|| panic!("no {after:?} in {text}"))
        + after.len()..];
    let mut it = rest.split_whitespace();
    let n: f64 = it.next().unwrap().parse().unwrap();
    let unit = match it.next().unwrap() {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        u => panic!("unit {u}"),
    };
    (n * unit) as u64
}

#[test]
fn a_debian_disk_backup_gives_single_files_by_loop_mount_without_booting_and_verifies_by_heartbeat()
{
    let env = Env::new();
    // A backup made without a config: no verify_marker.
    let id = env.backup("deb", "1M", &[&vm_image("debian")]);
    let loops = || {
        let o = Command::new("losetup").arg("-a").output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| {
                l.contains(env.dir.path().to_str().unwrap()) || l.contains("recoverfs-files-")
            })
            .count()
    };

    // Single files, without booting: only what the filesystem reads is
    // fetched, and nothing stays mounted or attached.
    let to = env.path("restored");
    std::fs::create_dir(&to).unwrap();
    let o = env.run(&[
        "files",
        "restore",
        "--repo",
        env.repo_str(),
        "deb",
        "--backup",
        &id,
        "/etc/apt",
        "--to",
        to.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("ext4 on partition 2 of disk0"), "{err}");
    let fetched = bytes_after(&err, "fetched ");
    assert!(
        fetched < 64 << 20,
        "restoring /etc/apt fetched {fetched} bytes of a 1.5 GiB disk"
    );
    eprintln!("/etc/apt from a disk backup: fetched {fetched} bytes");
    assert!(to.join("etc/apt/apt.conf.d").is_dir());
    let id_file = env.ok(&[
        "files",
        "cat",
        "--repo",
        env.repo_str(),
        "deb",
        "--backup",
        &id,
        "/etc/recoverfs-id",
    ]);
    assert_eq!(id_file, "recoverfs-debian-v1\n");
    // Without --backup and without file backups: the newest disk backup.
    let ls = env.ok(&[
        "files",
        "ls",
        "--repo",
        env.repo_str(),
        "deb",
        "/etc/hostname",
    ]);
    assert!(
        ls.starts_with('-') && ls.contains(" 17 ") && ls.trim_end().ends_with(" /etc/hostname"),
        "{ls}"
    );
    env.fails(
        &[
            "files",
            "ls",
            "--repo",
            env.repo_str(),
            "deb",
            "--backup",
            &id,
            "/no/such/file",
        ],
        "/no/such/file is on no filesystem of disk0",
    );
    env.fails(
        &[
            "files",
            "ls",
            "--repo",
            env.repo_str(),
            "deb",
            "--backup",
            &id,
            "--partition",
            "7",
            "/",
        ],
        "no partition 7",
    );
    assert_eq!(loops(), 0, "a loop device was left attached");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("recoverfs-files-"), "{mounts}");

    // verify-boot needs no marker: the guest agent answering proves the boot.
    let o = env.run(&[
        "verify-boot",
        "--repo",
        env.repo_str(),
        "deb",
        "--timeout",
        "600",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("PASS") && out.contains("the guest agent answered: Debian GNU/Linux 12"),
        "{out}"
    );
}

#[test]
fn container_builds_and_file_backups_refuse_bad_input_and_verify_names_a_damaged_file() {
    let env = Env::new();
    // The container: a dynamically linked agent is refused; a built one
    // reports its version and hooks.
    let h = hooks(env.dir.path(), &[("db", "true", "true")]);
    let img = env.path("agent.img");
    env.fails(
        &[
            "agent",
            "build",
            "-o",
            img.to_str().unwrap(),
            "--agent-binary",
            "/bin/true",
        ],
        "is not a static x86-64 executable",
    );
    assert!(!img.exists());
    build_container(&env, "3.2.1", &h);
    let v = env.ok(&["agent", "--version", "--container", img.to_str().unwrap()]);
    assert!(
        v.starts_with("recoverfs agent 3.2.1 (") && v.contains("hooks: db"),
        "{v}"
    );
    env.fails(
        &["agent", "--version", "--container", "/etc/hostname"],
        "is not an agent container",
    );

    // A file backup written through the library, then one chunk damaged.
    use recoverfs::repo::catalog::{Catalog, ChunkSink, Entry, EntryKind, CATALOG_FORMAT};
    let (repo, _) = recoverfs::repo::Repository::open_or_create(env.repo_str()).unwrap();
    let mut sink = ChunkSink::default();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let chunks = sink.store(&repo, &data[..]).unwrap();
    let damaged = chunks[0].digest;
    let c = repo
        .publish_catalog(Catalog {
            format: CATALOG_FORMAT,
            vm: "vm1".into(),
            id: String::new(),
            created: String::new(),
            created_unix: 0,
            source: serde_json::json!({}),
            entries: vec![Entry {
                path: "/srv/db/table".into(),
                kind: EntryKind::File,
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                size: data.len() as u64,
                target: None,
                chunks,
                inode: None,
            }],
            file_bytes: data.len() as u64,
            stored_bytes: sink.stored_bytes(),
            new_bytes: sink.new_bytes,
        })
        .unwrap();
    let cat = Command::new(bin())
        .args([
            "files",
            "cat",
            "--repo",
            env.repo_str(),
            "vm1",
            "/srv/db/table",
        ])
        .output()
        .unwrap();
    assert_eq!(cat.stdout, data);
    env.ok(&["verify", "--repo", env.repo_str(), "--vm", "vm1"]);
    let h = damaged.to_hex();
    let obj = env.repo.join("chunks").join(&h[..4]).join(&h);
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&obj, bytes).unwrap();
    let o = env.run(&["verify", "--repo", env.repo_str()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(
        out.contains(&format!("DAMAGED chunk {h}"))
            && out.contains(&format!("vm1/{} /srv/db/table block 0", c.id)),
        "{out}"
    );
    env.fails(
        &[
            "files",
            "cat",
            "--repo",
            env.repo_str(),
            "vm1",
            "/srv/db/table",
        ],
        "/srv/db/table chunk 0",
    );
    // Bad names and paths.
    env.fails(
        &[
            "files",
            "ls",
            "--repo",
            env.repo_str(),
            "vm1",
            "--backup",
            "20261122-000000-files",
            "/",
        ],
        "unknown file backup",
    );
    env.fails(
        &[
            "files",
            "ls",
            "--repo",
            env.repo_str(),
            "vm1",
            "/srv/../etc",
        ],
        "not an absolute, normalised path",
    );
    env.fails(
        &["files", "ls", "--repo", env.repo_str(), "nosuchvm", "/"],
        "no backups",
    );
    env.fails(
        &[
            "agent-backup",
            "--repo",
            env.repo_str(),
            "--container",
            img.to_str().unwrap(),
            "--vm",
            "a=/x.qmp,qga=/x.qga",
            "--vm",
            "a=/y.qmp,qga=/y.qga",
            "--paths",
            "/srv",
        ],
        "--vm a given twice",
    );
}

/// Mounts and loop devices under `dir` (this test's own: others run at
/// the same time), from /proc/mounts and `losetup -J`.
fn mounts_and_loops_under(dir: &Path) -> (Vec<String>, Vec<String>) {
    let dir = dir.to_str().unwrap();
    let mounts = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        // /proc/mounts escapes spaces as \040; test paths have none.
        .filter(|m| m.starts_with(dir))
        .map(str::to_string)
        .collect();
    let o = Command::new("losetup").arg("-J").output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let loops = v["loopdevices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["back-file"].as_str().is_some_and(|f| f.contains(dir)))
        .map(|l| l["name"].as_str().unwrap_or_default().to_string())
        .collect();
    (mounts, loops)
}

/// Removes what a killed `files` left under a directory: mounts (deepest
/// first, lazily: a dead FUSE mount refuses a plain umount) and loop
/// devices, so a failing test leaves nothing behind either.
struct UnmountUnder(PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        let (mut mounts, loops) = mounts_and_loops_under(&self.0);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        for l in &loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
    }
}

/// A 4 KiB pattern repeated: a big file the backup stores as a few chunks,
/// yet read back block by block through the scratch recovery.
fn patterned(path: &Path, size: usize) {
    use std::io::Write;
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for _ in 0..size / block.len() {
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

#[test]
fn sigint_during_a_disk_backup_restore_ends_it_through_its_cleanup_with_whole_files_only() {
    let env = Env::new();
    let id = an_ext4_disk_backup(&env);
    let (tmp, to, _cleanup) = scratch_and_target(&env);
    let child = restore_of_data(&env, &id, &tmp, &to, &[]);
    let mut guard = KillOnDrop::of(&child);
    wait_for_big(&to, &child);
    let (mounts, loops) = mounts_and_loops_under(&tmp);
    assert!(
        mounts.len() == 2 && loops.len() == 1,
        "mid-way, expected the FUSE and ext4 mounts and a loop device: {mounts:?} {loops:?}"
    );
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let o = child.wait_with_output().unwrap();
    guard.disarm();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    eprintln!("files restore ended {took:?} after SIGINT: {err}");
    assert!(
        !o.status.success(),
        "an interrupted restore succeeded: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with(
            "recoverfs: error: interrupted by SIGINT: restoring /data from disk backup"
        ) && lines[0].contains("restored 4 of 6 entries (stopped while writing /data/big")
            && lines[0].ends_with("the scratch recovery was unmounted and removed"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let (mounts, loops) = mounts_and_loops_under(&tmp);
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "left mounted: {mounts:?}, loop devices: {loops:?}"
    );
    let scratch: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(scratch.is_empty(), "scratch left: {scratch:?}");
    let pins: Vec<_> = std::fs::read_dir(env.repo.join("pins/sig"))
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(pins.is_empty(), "a pin was left: {pins:?}");
    // Whole files before the stop, nothing of the one being written.
    let mut names: Vec<String> = std::fs::read_dir(to.join("data"))
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a1", "a2", "a3"]);
    for n in ["a1", "a2", "a3"] {
        let got = std::fs::read_to_string(to.join("data").join(n)).unwrap();
        assert_eq!(got, format!("file {n}\n"));
    }
}

/// A backup of an ext4 disk (no partition table): three small files, a
/// 256 MiB one (being restored when a test stops the restore), one after.
fn an_ext4_disk_backup(env: &Env) -> String {
    let src = env.path("src");
    std::fs::create_dir_all(src.join("data")).unwrap();
    for n in ["a1", "a2", "a3", "z"] {
        std::fs::write(src.join("data").join(n), format!("file {n}\n")).unwrap();
    }
    patterned(&src.join("data/big"), 256 << 20);
    let img = env.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(320 << 20)
        .unwrap();
    let o = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_dir_all(&src).unwrap();
    let id = env.backup("sig", "1M", &[&img]);
    std::fs::remove_file(&img).unwrap();
    id
}

/// A `TMPDIR` for the restore's scratch, cleaned up however the test
/// ends, and an empty `--to`.
fn scratch_and_target(env: &Env) -> (PathBuf, PathBuf, UnmountUnder) {
    let tmp = env.path("tmp");
    let to = env.path("to");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::create_dir(&to).unwrap();
    let cleanup = UnmountUnder(tmp.clone());
    (tmp, to, cleanup)
}

/// `files restore` of /data from backup `id` into `to`, scratch in `tmp`.
fn restore_of_data(env: &Env, id: &str, tmp: &Path, to: &Path, extra: &[&str]) -> Child {
    Command::new(bin())
        .args(["files", "restore", "--repo", env.repo_str(), "sig"])
        .args(["--backup", id, "/data", "--to"])
        .arg(to)
        .args(extra)
        .env("TMPDIR", tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills a running `files restore` when a test fails before waiting for
/// it (review28 L6: it kept running, under mounts the test's cleanup then
/// took away); disarmed once the test has waited for it.
struct KillOnDrop(Option<u32>);

impl KillOnDrop {
    fn of(child: &Child) -> KillOnDrop {
        KillOnDrop(Some(child.id()))
    }
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: a signal to our own child, not yet waited for (so
            // its pid is not reused).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Waits until /data/big is being written (the temporary file every file
/// is written to has more than a small file's bytes).
fn wait_for_big(to: &Path, child: &Child) {
    let partial = to.join(format!("data/.recoverfs-tmp.{}", child.id()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 1 << 20 {
        assert!(Instant::now() < deadline, "/data/big was never written");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// explore9 L1, L2: a restore killed outright (no cleanup) left its FUSE
/// and ext4 mounts, its loop device and scratch staging, and a partial
/// `.recoverfs-tmp.PID` under `--to`; the rerun (`--skip-existing`)
/// removes them all, says so, and restores the rest whole.
#[test]
fn a_rerun_after_a_killed_disk_backup_restore_removes_what_it_left_and_finishes() {
    let env = Env::new();
    let id = an_ext4_disk_backup(&env);
    let (tmp, to, _cleanup) = scratch_and_target(&env);
    let mut child = restore_of_data(&env, &id, &tmp, &to, &[]);
    let mut guard = KillOnDrop::of(&child);
    wait_for_big(&to, &child);
    let partial = to.join(format!("data/.recoverfs-tmp.{}", child.id()));
    child.kill().unwrap();
    child.wait().unwrap();
    guard.disarm();
    let (mounts, loops) = mounts_and_loops_under(&tmp);
    assert!(
        mounts.len() == 2 && loops.len() == 1,
        "{mounts:?} {loops:?}"
    );
    assert!(partial.exists());
    let o = restore_of_data(&env, &id, &tmp, &to, &["--skip-existing"])
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("a file a killed restore was writing"), "{err}");
    let (mounts, loops) = mounts_and_loops_under(&tmp);
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "left: {mounts:?} {loops:?}"
    );
    let scratch: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(scratch.is_empty(), "scratch left: {scratch:?}");
    let mut names: Vec<String> = std::fs::read_dir(to.join("data"))
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a1", "a2", "a3", "big", "z"]);
    let want = env.path("want");
    patterned(&want, 256 << 20);
    assert!(std::fs::read(to.join("data/big")).unwrap() == std::fs::read(&want).unwrap());
}
