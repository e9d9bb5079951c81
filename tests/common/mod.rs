//! Shared harness for end-to-end tests: temp directories, running the real
//! binary, and a daemon guard that kills the daemon and unmounts even when
//! the test panics.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

pub mod garage;
pub mod keeper;
pub mod netns;
pub mod nfs;
pub mod proxy;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_recoverfs")
}

/// FUSE tests must fail loudly, never skip, on a machine without FUSE.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests need FUSE"
    );
    assert!(
        Command::new("sh")
            .args(["-c", "command -v fusermount3 >/dev/null"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false),
        "fusermount3 is missing: install the fuse3 package (make test does this)"
    );
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub staging: PathBuf,
    pub mount: PathBuf,
    pub socket: PathBuf,
    /// Repository given to commands: the directory, or an s3:// URL.
    pub repo_spec: String,
    /// Extra environment (S3 credentials) for every command and daemon.
    pub extra_env: Vec<(String, String)>,
    /// Extra `serve` flags.
    pub serve_args: Vec<String>,
    /// The daemon's umask (default: the test's).
    pub serve_umask: Option<u32>,
    /// Keep the FUSE connection across a crash (serve's default). Off
    /// here unless a test asks: the suite's crash tests were written for
    /// a mount that dies with its daemon (tests/fuse_keeper.rs tests the
    /// keeper).
    pub fuse_keeper: bool,
}

impl Env {
    pub fn new() -> Env {
        require_fuse();
        let dir = tempfile::Builder::new()
            .prefix("recoverfs-e2e")
            .tempdir()
            .unwrap();
        let repo = dir.path().join("repo");
        let staging = dir.path().join("staging");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let socket = dir.path().join("control.sock");
        let repo_spec = repo.to_str().unwrap().to_string();
        Env {
            dir,
            repo,
            staging,
            mount,
            socket,
            repo_spec,
            extra_env: vec![],
            serve_args: vec![],
            serve_umask: None,
            fuse_keeper: false,
        }
    }

    /// An environment whose repository lives in an S3 bucket.
    pub fn s3(spec: &str, env: Vec<(String, String)>) -> Env {
        let mut e = Env::new();
        e.repo_spec = spec.to_string();
        e.extra_env = env;
        e
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn repo_str(&self) -> &str {
        &self.repo_spec
    }

    /// Runs the binary with `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(self.extra_env.iter().cloned())
            .output()
            .unwrap()
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "recoverfs {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs and requires failure with a one-line error containing `needle`.
    pub fn fails(&self, args: &[&str], needle: &str) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success(),
            "recoverfs {args:?} should fail, stdout: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "expected a one-line error for {args:?}, got: {err}"
        );
        assert!(
            lines[0].starts_with("recoverfs: error: "),
            "unexpected error format: {err}"
        );
        assert!(
            err.contains(needle),
            "error for {args:?} should mention {needle:?}: {err}"
        );
        err
    }

    pub fn backup(&self, vm: &str, chunk: &str, images: &[&Path]) -> String {
        let mut args = vec![
            "backup",
            "--repo",
            self.repo_str(),
            "--vm",
            vm,
            "--chunk-size",
            chunk,
        ];
        let imgs: Vec<&str> = images.iter().map(|p| p.to_str().unwrap()).collect();
        args.extend(imgs);
        self.ok(&args).lines().last().unwrap().to_string()
    }

    /// `verify-boot` of a VM's newest backup, waiting for `marker`.
    pub fn verify_boot(&self, vm: &str, marker: &str) -> Output {
        self.run(&[
            "verify-boot",
            "--repo",
            self.repo_str(),
            vm,
            "--marker",
            marker,
            "--timeout",
            "180",
        ])
    }

    pub fn serve(&self) -> Daemon {
        Daemon::start(self, &self.staging, &self.mount, &self.socket)
    }

    fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// `recover` and return the disk paths it printed.
    pub fn recover(&self, vm: &str, backup: Option<&str>) -> Vec<PathBuf> {
        let mut args = vec!["recover", "--socket", self.sock(), vm];
        if let Some(b) = backup {
            args.extend(["--backup", b]);
        }
        self.ok(&args)
            .lines()
            .filter(|l| l.starts_with('/'))
            .map(PathBuf::from)
            .collect()
    }

    pub fn release(&self, vm: &str, discard: bool) -> Output {
        let mut args = vec!["release", "--socket", self.sock(), vm];
        if discard {
            args.push("--discard");
        }
        self.run(&args)
    }

    /// Releases `vm`'s session, retrying for up to 10 s while it is "still
    /// open": FUSE reports a file's last close (RELEASE) after `close`
    /// returned, so a release right after one may still see it open.
    pub fn release_closed(&self, vm: &str, discard: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = self.release(vm, discard);
            if o.status.success() {
                return;
            }
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("still open") && Instant::now() < deadline,
                "release failed: {err}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--socket", self.sock(), "--json"])).unwrap()
    }

    pub fn disk_status(&self, vm: &str, disk: usize) -> serde_json::Value {
        let st = self.status();
        let s = st["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["vm"] == vm)
            .expect("session listed")
            .clone();
        s["disks"][disk].clone()
    }

    /// `disk_status` once no fill of the disk is under way: a reader is
    /// answered from the fetched bytes before the block is staged and its
    /// fetch counted, so counters read right after a read may lag it.
    pub fn settled_disk_status(&self, vm: &str, disk: usize) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let st = self.disk_status(vm, disk);
            if st["fetches_in_flight"] == 0 || std::time::Instant::now() > deadline {
                return st;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

pub struct Daemon {
    child: Option<Child>,
    pub mount: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(env: &Env, staging: &Path, mount: &Path, socket: &Path) -> Daemon {
        let log = env.path(&format!("daemon-{}.log", rand::random::<u32>()));
        let mut cmd = Command::new(bin());
        if let Some(mask) = env.serve_umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask is async-signal-safe and touches no memory.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["serve", "--repo", env.repo_str(), "--staging"])
            .arg(staging)
            .arg("--mount")
            .arg(mount)
            .arg("--socket")
            .arg(socket)
            .args(&env.serve_args)
            .env(
                "RECOVERFS_NO_FUSE_KEEPER",
                if env.fuse_keeper { "false" } else { "true" },
            )
            .env("RUST_LOG", "info")
            .envs(env.extra_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            mount: mount.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return d;
            }
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({st}) during start: {}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to flush or unmount, like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// Signal `sig` (SIGTERM, or SIGUSR2 for a hand-over) and wait for the
    /// daemon to exit.
    pub fn stop_with(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(c.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("daemon did not stop on signal {sig}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mount)
            .stderr(Stdio::null())
            .status();
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log {} ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Random bytes with zero holes, so zero-chunk handling is exercised.
pub fn random_image(path: &Path, size: usize, seed: u64, chunk: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill(&mut data[..]);
    let mut off = 0;
    while off < size {
        // Roughly every third chunk is a hole; some holes are partial.
        if rng.gen_ratio(1, 3) {
            let end = (off + chunk).min(size);
            data[off..end].fill(0);
        } else if rng.gen_ratio(1, 4) {
            let end = (off + chunk / 3).min(size);
            data[off..end].fill(0);
        }
        off += chunk;
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Files below `dir`, recursively (0 if it does not exist).
pub fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

pub fn read_all(p: &Path) -> Vec<u8> {
    let mut v = vec![];
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

/// Builds (or reuses) the `tiny` VM image and returns its path.
pub fn tiny_image() -> PathBuf {
    vm_image("tiny")
}

/// Runs a client tool (`qemu-io`, `nbdcopy`, ...) and returns its stdout;
/// fails the test with its stderr if it fails.
pub fn tool(args: &[&str]) -> String {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} (Debian packages libnbd-bin, qemu-utils): {e}", args[0]));
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Builds (or reuses) a VM image of `vm-images/` and returns its path.
pub fn vm_image(name: &str) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join("vm-images/build.sh"))
        .arg(name)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "building the {name} image failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    PathBuf::from(
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .last()
            .expect("image path")
            .trim(),
    )
}

const TINY_MARKER: &str = "RECOVERFS-TINY-UP boot=";

/// Boots with exactly the documented command; returns the boot counter.
pub fn boot_counter_of(disk: &Path, what: &str) -> u64 {
    boot_counter_of_drive(
        &format!("file={},format=raw,if=virtio", disk.display()),
        what,
    )
}

/// Boots the tiny image from a QEMU `-drive` spec (a file, an `nfs://`
/// URL) and returns its boot counter.
pub fn boot_counter_of_drive(drive: &str, what: &str) -> u64 {
    boot_counter_with(&["-drive", drive], what)
}

/// Boots the tiny image with these disk arguments (`-drive ...` or
/// `-blockdev ... -device ...`) and returns its boot counter.
pub fn boot_counter_with(disk_args: &[&str], what: &str) -> u64 {
    let o = Command::new("timeout")
        .args([
            "180",
            "qemu-system-x86_64",
            "-nographic",
            "-m",
            "512",
            "-no-reboot",
        ])
        .args(disk_args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("qemu-system-x86_64 is installed");
    let console =
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    let line = console.lines().find(|l| l.contains(TINY_MARKER));
    let Some(line) = line else {
        panic!(
            "{what}: no marker (qemu {}); serial console:\n{console}",
            o.status
        )
    };
    assert!(
        o.status.success(),
        "{what}: qemu did not power off cleanly ({}): {console}",
        o.status
    );
    let n = line
        .split(TINY_MARKER)
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap();
    n.parse()
        .unwrap_or_else(|_| panic!("{what}: bad marker line {line:?}"))
}

/// Boots the tiny image from `disk` and returns its boot counter.
pub fn boot_counter(disk: &Path) -> u64 {
    boot_counter_of(disk, &disk.display().to_string())
}

/// A filesystem on a loop device whose sparse backing file lives on a
/// tmpfs smaller than the filesystem: writes succeed into the page cache,
/// and writeback fails once the tmpfs is full, as a failing disk would.
/// ext4 without a journal, so the failure stays a data error. Everything
/// is unmounted and detached on drop, even when the test fails.
pub struct FailingDisk {
    pub mount: PathBuf,
    device: String,
    _tmpfs: Tmpfs,
}

impl FailingDisk {
    pub fn new(dir: &Path, real_size: &str, claimed_size: &str) -> FailingDisk {
        let tmpfs = Tmpfs::mount(&dir.join("backing"), real_size);
        let backing = dir.join("backing/disk.img");
        let ok = Command::new("truncate")
            .args(["-s", claimed_size])
            .arg(&backing)
            .status()
            .unwrap()
            .success();
        assert!(ok, "truncate failed");
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let device = String::from_utf8(o.stdout).unwrap().trim().to_string();
        let mount = dir.join("fs");
        std::fs::create_dir_all(&mount).unwrap();
        let disk = FailingDisk {
            mount: mount.clone(),
            device: device.clone(),
            _tmpfs: tmpfs,
        };
        let ok = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=1",
                &device,
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mkfs.ext4 failed");
        let ok = Command::new("mount")
            .args(["-o", "errors=continue", &device])
            .arg(&mount)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting {device} failed");
        disk
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// A small tmpfs mounted for a test (a full or tiny filesystem);
/// unmounted on drop, even when the test fails.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {} failed", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A small ext4 filesystem on a loop device (an image file under `dir`),
/// mounted at `dir/mnt`: unlike tmpfs, a new directory or file there needs
/// a block, as on a real staging disk. Unmounted (lazily) when dropped.
pub struct LoopExt4(PathBuf);

impl LoopExt4 {
    pub fn mount(dir: &Path, size: &str) -> LoopExt4 {
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let img = dir.join("fs.img");
        let run = |cmd: &mut Command| {
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{cmd:?}: {o:?}");
        };
        run(Command::new("truncate").args(["-s", size]).arg(&img));
        // No blocks reserved for root: the daemon (root) fills them all.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        LoopExt4(mnt)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Disk `n` of backup `id` of `vm`, read back through the repository.
pub fn restored(repo: &str, vm: &str, id: &str, n: usize) -> Vec<u8> {
    let repo = recoverfs::repo::Repository::open(repo).unwrap();
    let m = repo.resolve(vm, Some(id)).unwrap();
    let disk = &m.disks[n];
    let mut back = Vec::with_capacity(disk.size as usize);
    for (i, c) in disk.chunks.iter().enumerate() {
        let len = disk.chunk_len(i as u64);
        match c {
            Some(d) => back.extend(repo.read_chunk(&d, len, &"test").unwrap().0),
            None => back.extend(vec![0u8; len]),
        }
    }
    back
}
