//! Granular backups through the agent container, against real QEMU: a
//! running `debian` guest (qemu-guest-agent inside) and the real
//! `recoverfs` binary. One VM is shared by the steps that depend on each
//! other; every QEMU is killed when its guard drops, also on failure.
//! The static agent binary comes from `make agent` (a `make test` step).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, vm_image, Env};
use recoverfs::agent::exec;
use recoverfs::qemu::guest_agent::GuestAgent;
use recoverfs::qemu::qmp::Qmp;

/// A QEMU process killed and reaped when dropped.
struct Vm {
    child: Option<Child>,
    qmp: PathBuf,
    /// A second monitor, for the test to look while a backup holds the first.
    watch: PathBuf,
    qga: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Boots image `name` (writes to a throwaway overlay) the way `recoverfs
/// boot` equips a VM: a virtio-scsi controller and a guest-agent channel;
/// plus `org.recoverfs.stay` so the debian guest stays up.
fn start_vm(dir: &Path, name: &str, scsi: bool) -> Vm {
    let (qmp, watch, qga) = (
        dir.join(format!("{name}.qmp")),
        dir.join(format!("{name}.watch")),
        dir.join(format!("{name}.qga")),
    );
    let mut c = Command::new("qemu-system-x86_64");
    // -no-shutdown: tiny powers off after its marker; QEMU stays, as a
    // VM that runs no guest agent.
    c.args(["-nographic", "-m", "512", "-no-reboot", "-no-shutdown"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            vm_image(name).display()
        ))
        .args(["-device", "virtio-serial-pci,id=ser0"])
        .arg("-chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qga0",
            qga.display()
        ))
        .args([
            "-device",
            "virtserialport,bus=ser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .args(["-chardev", "null,id=stay"])
        .args([
            "-device",
            "virtserialport,bus=ser0.0,chardev=stay,name=org.recoverfs.stay",
        ]);
    if scsi {
        c.args(["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    for q in [&qmp, &watch] {
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", q.display()));
    }
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let vm = Vm {
        child: Some(child),
        qmp,
        watch,
        qga,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(vm.qmp.exists() && vm.watch.exists() && vm.qga.exists()) {
        assert!(Instant::now() < deadline, "QEMU made no sockets");
        std::thread::sleep(Duration::from_millis(50));
    }
    vm
}

/// Waits (TCG: minutes at worst) until the guest agent answers.
fn wait_agent(vm: &mut Vm) {
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        match GuestAgent::connect(&vm.qga, Duration::from_secs(5)) {
            Ok(_) => return,
            Err(e) => {
                let c = vm.child.as_mut().unwrap();
                assert!(c.try_wait().unwrap().is_none(), "the guest stopped: {e}");
                assert!(Instant::now() < deadline, "no guest agent: {e}");
            }
        }
    }
}

/// Runs a shell script in the guest; its stdout.
fn guest(vm: &Vm, script: &str) -> String {
    let mut ga = GuestAgent::connect(&vm.qga, Duration::from_secs(30)).unwrap();
    exec::sh(&mut ga, script, Duration::from_secs(300)).unwrap()
}

/// What QEMU has of the agent: nodes, devices, chardevs named rfsagent.
fn attached(vm: &Vm) -> Vec<String> {
    let mut q = Qmp::connect(&vm.watch).unwrap();
    let mut names = vec![];
    for cmd in ["query-named-block-nodes", "query-chardev"] {
        let r = q.execute(cmd, None).unwrap();
        for x in r.as_array().unwrap() {
            for k in ["node-name", "label"] {
                if let Some(n) = x[k].as_str().filter(|n| n.starts_with("rfsagent")) {
                    names.push(n.to_string());
                }
            }
        }
    }
    let r = q
        .execute(
            "qom-list",
            Some(serde_json::json!({"path": "/machine/peripheral"})),
        )
        .unwrap();
    for x in r.as_array().unwrap() {
        if let Some(n) = x["name"].as_str().filter(|n| n.starts_with("rfsagent")) {
            names.push(n.to_string());
        }
    }
    names
}

/// A hooks directory: `NAME/pre` and `NAME/post` with these bodies.
fn hooks(dir: &Path, set: &[(&str, &str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let h = dir.join(format!("hooks-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&h).unwrap();
    for (name, pre, post) in set {
        std::fs::create_dir_all(h.join(name)).unwrap();
        for (stage, body) in [("pre", pre), ("post", post)] {
            let p = h.join(name).join(stage);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    h
}

fn build_container(env: &Env, version: &str, hooks_dir: &Path) -> PathBuf {
    let img = env.path("agent.img");
    env.ok(&[
        "agent",
        "build",
        "-o",
        img.to_str().unwrap(),
        "--agent-version",
        version,
        "--hooks",
        hooks_dir.to_str().unwrap(),
    ]);
    img
}

fn agent_backup(env: &Env, vm: &Vm, img: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(["agent-backup", "--repo", env.repo_str(), "--container"])
        .arg(img)
        .arg("--vm")
        .arg(format!("deb={},qga={}", vm.qmp.display(), vm.qga.display()))
        .args(extra);
    c
}

fn file_backups(env: &Env) -> usize {
    let o = env.ok(&["list", "--repo", env.repo_str(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "files")
        .count()
}

fn sha256(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(o.stdout).unwrap()[..64].to_string()
}

/// Runs `cmd` to its end while watching QEMU: whether every VM had the
/// agent attached at one moment while it ran.
fn run_watching(vms: &[&Vm], cmd: &mut Command) -> (std::process::Output, bool) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = false;
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        seen |= vms.iter().all(|vm| !attached(vm).is_empty());
        std::thread::sleep(Duration::from_millis(100));
    }
    (waiter.join().unwrap(), seen)
}

#[test]
fn agent_backup_of_a_running_debian_guest_restores_files_byte_for_byte_and_leaves_nothing_attached()
{
    let env = Env::new();
    // Two guests: the first goes through every step; both are backed up
    // at once with --jobs 2, one container instance each.
    let mut vm = start_vm(env.dir.path(), "debian", true);
    std::fs::create_dir(env.path("second")).unwrap();
    let mut vm2 = start_vm(&env.path("second"), "debian", true);
    wait_agent(&mut vm);
    wait_agent(&mut vm2);
    guest(
        &vm2,
        "mkdir -p /srv/app && echo second-guest > /srv/app/app.conf",
    );
    let sum = guest(
        &vm,
        "mkdir -p /srv/app/logs && head -c 33554432 /dev/urandom > /srv/app/data.db && \
         echo 'port=5432' > /srv/app/app.conf && chmod 600 /srv/app/app.conf && \
         seq 1 20000 > /srv/app/logs/app.log && sync && sha256sum /srv/app/data.db",
    );
    let guest_sum = sum[..64].to_string();

    // 1. A backup with the application's hook: the container attached
    //    (QMP shows it while the hook runs), the hook's marker in the
    //    output, everything detached after.
    let h = hooks(
        env.dir.path(),
        &[(
            "app",
            "echo RFS-HOOK-QUIESCED; ls /dev/disk/by-id/ | sed 's/^/sees /'; sleep 3",
            "echo RFS-HOOK-RESUMED",
        )],
    );
    let img = build_container(&env, "1.0.0", &h);
    let mut both = agent_backup(
        &env,
        &vm,
        &img,
        &["--paths", "/srv/app", "--hooks", "app", "--jobs", "2"],
    );
    both.arg("--vm").arg(format!(
        "deb2={},qga={}",
        vm2.qmp.display(),
        vm2.qga.display()
    ));
    let (o, seen) = run_watching(&[&vm, &vm2], &mut both);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(
        seen,
        "QMP never showed the container attached to both VMs at once"
    );
    assert!(err.contains("hook app pre: RFS-HOOK-QUIESCED"), "{err}");
    assert!(err.contains("hook app post: RFS-HOOK-RESUMED"), "{err}");
    assert!(err.contains("agent 1.0.0"), "{err}");
    assert!(
        err.contains("sees scsi-0QEMU_QEMU_HARDDISK_rfsagent"),
        "the guest did not see the container: {err}"
    );
    let out = String::from_utf8(o.stdout).unwrap();
    let id_of = |vm: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{vm} ")))
            .unwrap_or_else(|| panic!("no backup of {vm}: {out}"))
            .to_string()
    };
    let id = id_of("deb");
    assert!(id.ends_with("-files"), "{id}");
    id_of("deb2");
    assert_eq!(attached(&vm), Vec::<String>::new(), "left attached in QEMU");
    assert_eq!(
        attached(&vm2),
        Vec::<String>::new(),
        "left attached in QEMU"
    );
    let second = env.ok(&[
        "files",
        "cat",
        "--repo",
        env.repo_str(),
        "deb2",
        "/srv/app/app.conf",
    ]);
    assert_eq!(second, "second-guest\n");
    drop(vm2);
    let inside = guest(
        &vm,
        "ls /dev/disk/by-id/ /dev/virtio-ports/; grep recoverfs-agent /proc/mounts || true",
    );
    assert!(
        !inside.contains("rfsagent") && !inside.contains("org.recoverfs.agent"),
        "{inside}"
    );
    let listed = env.ok(&["list", "--repo", env.repo_str()]);
    assert!(listed.contains(&id) && listed.contains("files"), "{listed}");
    env.ok(&["verify", "--repo", env.repo_str()]);

    // 2. One file restored matches the guest's sha256sum; ls shows the tree.
    let ls = env.ok(&["files", "ls", "--repo", env.repo_str(), "deb", "/srv/app"]);
    assert!(
        ls.contains("-rw------- ") && ls.contains("/srv/app/app.conf"),
        "{ls}"
    );
    assert!(ls.contains("/srv/app/logs/app.log"), "{ls}");
    let to = env.path("restored");
    std::fs::create_dir(&to).unwrap();
    env.ok(&[
        "files",
        "restore",
        "--repo",
        env.repo_str(),
        "deb",
        "/srv/app/data.db",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(sha256(&to.join("srv/app/data.db")), guest_sum);
    let conf = env.ok(&[
        "files",
        "cat",
        "--repo",
        env.repo_str(),
        "deb",
        "/srv/app/app.conf",
    ]);
    assert_eq!(conf, "port=5432\n");

    // 3. agent-restore: a damaged file and a deleted directory back in
    //    their places, and the whole tree under another directory, with
    //    modes and times.
    guest(
        &vm,
        "echo broken > /srv/app/app.conf && chmod 644 /srv/app/app.conf && rm -r /srv/app/logs",
    );
    let restore = |path: &str, extra: &[&str]| {
        let o = Command::new(bin())
            .args(["agent-restore", "--repo", env.repo_str(), "--container"])
            .arg(&img)
            .arg("--vm")
            .arg(format!("deb={},qga={}", vm.qmp.display(), vm.qga.display()))
            .args(["--backup", &id, path])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        err
    };
    let err = restore("/srv/app/app.conf", &["--in-place"]);
    assert!(err.contains("restored 1 entries to their places"), "{err}");
    restore("/srv/app/logs", &["--in-place"]);
    let back = guest(
        &vm,
        "cat /srv/app/app.conf; stat -c %a /srv/app/app.conf; wc -l < /srv/app/logs/app.log",
    );
    assert_eq!(back, "port=5432\n600\n20000\n");
    restore("/srv/app", &["--to", "/restored"]);
    let back = guest(
        &vm,
        "sha256sum /restored/srv/app/data.db | cut -c1-64; \
         [ $(stat -c %Y /restored/srv/app/data.db) = $(stat -c %Y /srv/app/data.db) ] && echo same-mtime",
    );
    assert_eq!(back, format!("{guest_sum}\nsame-mtime\n"));
    assert_eq!(
        attached(&vm),
        Vec::<String>::new(),
        "agent-restore left the container attached"
    );

    // 4. A new container version shows in the next run, and a second
    //    backup after changing 4 KiB of one file stores under 5% new bytes.
    guest(
        &vm,
        "dd if=/dev/urandom of=/srv/app/data.db bs=4096 count=1 seek=1000 conv=notrunc 2>/dev/null && sync",
    );
    let h2 = hooks(env.dir.path(), &[("app", "echo RFS-HOOK-V2", "true")]);
    let img = build_container(&env, "1.0.1", &h2);
    let o = agent_backup(
        &env,
        &vm,
        &img,
        &["--paths", "/srv/app", "--hooks", "app", "--json"],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v[0];
    assert_eq!(r["agent_version"], "1.0.1", "{v}");
    assert!(r["log"].to_string().contains("RFS-HOOK-V2"), "{v}");
    let (new, total) = (
        r["new_bytes"].as_u64().unwrap(),
        r["file_bytes"].as_u64().unwrap(),
    );
    assert!(total > 32 << 20, "{v}");
    assert!(
        new * 20 < total,
        "a 4 KiB change stored {new} new bytes of {total}"
    );
    eprintln!("second backup: {new} new bytes of {total}");

    // 5. Bad input: each one clear line, nothing attached, no new backup.
    let before = file_backups(&env);
    let fails = |mut cmd: Command, needle: &str| {
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{needle}: succeeded");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("recoverfs: error: ") && last.contains(needle),
            "{err}"
        );
        assert_eq!(
            attached(&vm),
            Vec::<String>::new(),
            "{needle}: left attached"
        );
        assert_eq!(file_backups(&env), before, "{needle}: a backup appeared");
    };
    fails(
        agent_backup(&env, &vm, &img, &["--paths", "/srv/app", "/srv/nope"]),
        "path /srv/nope does not exist in the guest",
    );
    // Another process writing the container image: QEMU cannot attach it.
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 600000"])
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    fails(
        agent_backup(&env, &vm, &img, &["--paths", "/srv/app"]),
        "cannot attach the agent container",
    );
    let _ = writer.kill();
    let _ = writer.wait();
    // The agent killed in the guest mid-backup (its hook kills it).
    let h3 = hooks(
        env.dir.path(),
        &[
            ("crash", "kill -9 $PPID", "true"),
            ("slow", "sleep 120", "true"),
        ],
    );
    let img = build_container(&env, "1.0.2", &h3);
    fails(
        agent_backup(
            &env,
            &vm,
            &img,
            &["--paths", "/srv/app", "--hooks", "crash"],
        ),
        "truncated",
    );
    // The VM killed mid-backup.
    let mut cmd = agent_backup(&env, &vm, &img, &["--paths", "/srv/app", "--hooks", "slow"]);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while attached(&vm).len() < 4 {
        assert!(Instant::now() < deadline, "the container never attached");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    drop(vm);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("recoverfs: error: VM deb: "), "{err}");
    assert_eq!(
        file_backups(&env),
        before,
        "a backup of a killed VM appeared"
    );
}

#[test]
fn a_vm_without_a_guest_agent_is_one_clear_error_and_nothing_is_attached() {
    let env = Env::new();
    let h = hooks(env.dir.path(), &[]);
    let img = build_container(&env, "1.0.0", &h);
    let vm = start_vm(env.dir.path(), "tiny", true);
    let t0 = Instant::now();
    let o = agent_backup(&env, &vm, &img, &["--paths", "/srv"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(t0.elapsed() < Duration::from_secs(40), "{:?}", t0.elapsed());
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("VM deb: no guest agent answers")
            && last.contains("needs qemu-guest-agent running in the guest"),
        "{err}"
    );
    assert_eq!(attached(&vm), Vec::<String>::new());
    assert_eq!(file_backups(&env), 0);
    // Without a guest agent socket at all, it says why it needs one.
    let o = Command::new(bin())
        .args(["agent-backup", "--repo", env.repo_str(), "--container"])
        .arg(&img)
        .arg("--vm")
        .arg(format!("deb={}", vm.qmp.display()))
        .args(["--paths", "/srv"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no guest agent socket given"), "{err}");
}

#[test]
fn the_agent_resumes_the_application_before_streaming_and_the_backup_holds_the_quiesced_state() {
    let env = Env::new();
    let mut vm = start_vm(env.dir.path(), "debian", true);
    wait_agent(&mut vm);
    // /srv/app on the root filesystem; /srv/small a tmpfs too small to
    // hold a copy of its file.
    let sum = guest(
        &vm,
        "mkdir -p /srv/app /srv/small && head -c 33554432 /dev/urandom > /srv/app/data.db && \
         echo running > /srv/app/state && mount -t tmpfs -o size=8m tmpfs /srv/small && \
         head -c 6291456 /dev/urandom > /srv/small/big && sync && \
         sha256sum /srv/app/data.db /srv/small/big",
    );
    let sums: Vec<&str> = sum.lines().map(|l| &l[..64]).collect();
    // pre: the application's state is "quiesced". post: the copy exists
    // while it runs; it notes how much the agent (its parent) has written
    // so far and, in the background, until the agent exits; then the
    // application changes its state and makes a new file.
    let h = hooks(
        env.dir.path(),
        &[
            ("app", "echo quiesced > /srv/app/state; echo RFS-PRE", "\
echo RFS-POST copies=$(ls -d /.recoverfs-agent-copy.* | wc -l)
grep ^wchar /proc/$PPID/io > /tmp/rfs-wchar-post
a=$PPID
(w=0; while { read -r _ _; read -r _ n; } < /proc/$a/io; do [ \"$n\" -gt $w ] && w=$n; done; echo \"wchar: $w\" > /tmp/rfs-w.tmp; mv /tmp/rfs-w.tmp /tmp/rfs-wchar-last) </dev/null >/dev/null 2>&1 &
echo resumed > /srv/app/state; touch /srv/app/after-post"),
            ("small", "echo RFS-SMALL-PRE", "echo RFS-SMALL-POST"),
            ("crash", "kill -9 $PPID", "true"),
        ],
    );
    let img = build_container(&env, "1.0.0", &h);
    // (succeeded, stdout, stderr)
    let backup = |args: &[&str]| {
        let o = agent_backup(&env, &vm, &img, args).output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (o.status.success(), text(&o.stdout), text(&o.stderr))
    };
    // An agent killed while quiesced leaves its copy directory behind;
    // the next backup of that filesystem removes it (post sees 1 below).
    let (ok, _, err) = backup(&["--paths", "/srv/app", "--hooks", "crash"]);
    assert!(!ok, "{err}");
    assert_eq!(guest(&vm, "ls -d /.recoverfs-agent-copy.* | wc -l"), "1\n");
    let (ok, out, err) = backup(&["--paths", "/srv/app", "--hooks", "app"]);
    assert!(ok, "{err}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("deb ").map(str::to_string))
        .expect("a backup id");
    let at = |needle: &str| {
        err.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in {err}"))
    };
    // Copied while quiesced, then resumed, with the copy in place.
    assert!(at("RFS-PRE") < at("consistent copy of 3 entries"), "{err}");
    assert!(at("consistent copy of") < at("RFS-POST copies=1"), "{err}");
    // The agent wrote the 32 MiB file to the stream after `post` ran.
    let w = guest(
        &vm,
        "for i in $(seq 100); do [ -e /tmp/rfs-wchar-last ] && break; sleep 0.1; done; \
         cat /tmp/rfs-wchar-post /tmp/rfs-wchar-last",
    );
    let n: Vec<u64> = w
        .lines()
        .map(|l| l.trim_start_matches("wchar:").trim().parse().unwrap())
        .collect();
    // Streaming while quiesced would leave next to nothing after `post`.
    // The sampler reads the agent's /proc io file with shell builtins (no
    // fork per sample) until the agent is reaped, and keeps the largest
    // count: a read while the agent is being reaped counts only its main
    // thread, without its finished threads (the copy's 32 MiB), which once
    // made the last sample look like nothing was streamed. The largest
    // lags the end by one read, so half the file is a generous bar.
    let after_post = n[1].saturating_sub(n[0]);
    assert!(
        after_post >= 16 << 20,
        "the agent wrote only {after_post} bytes after post: it streamed while quiesced"
    );
    // The backup holds the quiesced state; the guest moved on.
    let cat = |path: &str| {
        env.run(&[
            "files",
            "cat",
            "--repo",
            env.repo_str(),
            "--backup",
            &id,
            "deb",
            path,
        ])
    };
    assert_eq!(cat("/srv/app/state").stdout, b"quiesced\n");
    assert_eq!(guest(&vm, "cat /srv/app/state"), "resumed\n");
    let ls = env.ok(&[
        "files",
        "ls",
        "--repo",
        env.repo_str(),
        "--backup",
        &id,
        "deb",
        "/srv/app",
    ]);
    assert!(
        !ls.contains("after-post") && ls.contains("/srv/app/data.db"),
        "{ls}"
    );
    let to = env.path("restored");
    std::fs::create_dir(&to).unwrap();
    env.ok(&[
        "files",
        "restore",
        "--repo",
        env.repo_str(),
        "--backup",
        &id,
        "deb",
        "/srv/app/data.db",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(sha256(&to.join("srv/app/data.db")), sums[0]);
    assert_eq!(
        guest(&vm, "ls -d /.recoverfs-agent-copy.* 2>/dev/null | wc -l"),
        "0\n"
    );

    // No room for a copy: a clear error before anything is quiesced.
    let (ok, _, err) = backup(&["--paths", "/srv/small", "--hooks", "small"]);
    assert!(!ok);
    assert!(
        err.contains("not enough free space in the guest for a consistent copy in /srv/small/")
            && err.contains("--allow-quiesced-stream"),
        "{err}"
    );
    assert!(
        !err.contains("RFS-SMALL-PRE"),
        "quiesced all the same: {err}"
    );
    assert_eq!(file_backups(&env), 1);
    // Told to, it streams while quiesced.
    let (ok, _, err) = backup(&[
        "--paths",
        "/srv/small",
        "--hooks",
        "small",
        "--allow-quiesced-stream",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("streaming while the application stays quiesced")
            && err.find("RFS-SMALL-PRE") < err.find("RFS-SMALL-POST"),
        "{err}"
    );
    std::fs::remove_dir_all(&to).unwrap();
    std::fs::create_dir(&to).unwrap();
    env.ok(&[
        "files",
        "restore",
        "--repo",
        env.repo_str(),
        "deb",
        "/srv/small/big",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(sha256(&to.join("srv/small/big")), sums[1]);
    assert_eq!(guest(&vm, "ls -A /srv/small"), "big\n");

    // forget treats the file backups as their own series: the older one
    // goes (not on --dry-run), and gc frees what only it referenced.
    let forget = |extra: &[&str]| {
        let mut a = vec!["forget", "--repo", env.repo_str(), "--keep-last", "1"];
        a.extend(extra);
        env.ok(&a)
    };
    let dry = forget(&["--dry-run"]);
    assert!(
        dry.lines()
            .any(|l| l.contains("would remove") && l.contains(" files ") && l.contains(&id)),
        "{dry}"
    );
    assert_eq!(file_backups(&env), 2);
    forget(&[]);
    assert_eq!(file_backups(&env), 1);
    let gc: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--repo", env.repo_str(), "--json"])).unwrap();
    // The 32 MiB random file was only in the forgotten backup.
    assert!(gc["freed_bytes"].as_u64().unwrap() >= 32 << 20, "{gc}");
    assert!(!cat("/srv/app/state").status.success());
    env.ok(&["verify", "--repo", env.repo_str()]);
}

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
    // An ext4 disk (no partition table): three small files, a 256 MiB one
    // (restored when the signal comes), one after it.
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

    let tmp = env.path("tmp");
    let to = env.path("to");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::create_dir(&to).unwrap();
    let _cleanup = UnmountUnder(tmp.clone());
    let child = Command::new(bin())
        .args(["files", "restore", "--repo", env.repo_str(), "sig"])
        .args(["--backup", &id, "/data", "--to"])
        .arg(&to)
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once /data/big is being written (the temporary file every file is
    // written to has more than a small file's bytes).
    let partial = to.join(format!("data/.recoverfs-tmp.{}", child.id()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 1 << 20 {
        assert!(Instant::now() < deadline, "/data/big was never written");
        std::thread::sleep(Duration::from_millis(2));
    }
    let (mounts, loops) = mounts_and_loops_under(&tmp);
    assert!(
        mounts.len() == 2 && loops.len() == 1,
        "mid-way, expected the FUSE and ext4 mounts and a loop device: {mounts:?} {loops:?}"
    );
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let o = child.wait_with_output().unwrap();
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

/// Guest shell: prints `agent-running` while `recoverfs agent run` runs
/// (without pgrep, which the guest may lack).
const AGENT_RUNNING: &str = "for p in /proc/[0-9]*; do \
    tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^[^ ]*recoverfs agent run' && echo agent-running; \
    done; true";

#[test]
fn sigint_during_agent_backup_resumes_the_application_detaches_the_container_and_publishes_nothing()
{
    use std::io::BufRead;
    let env = Env::new();
    let mut vm = start_vm(env.dir.path(), "debian", true);
    wait_agent(&mut vm);
    guest(&vm, "mkdir -p /srv/app && echo running > /srv/app/state");
    // The signal comes while `pre` keeps the application quiesced.
    let h = hooks(
        env.dir.path(),
        &[(
            "app",
            "echo quiesced > /srv/app/state; sleep 10",
            "echo resumed > /srv/app/state",
        )],
    );
    let img = build_container(&env, "1.0.0", &h);
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut child = agent_backup(&env, &vm, &img, &["--paths", "/srv/app", "--hooks", "app"])
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr).lines() {
            let _ = tx.send(l.unwrap());
        }
    });
    let mut err = vec![];
    // The agent's hello comes just before it runs `pre`.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !err
        .iter()
        .any(|l: &String| l.starts_with("deb: agent 1.0.0"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => err.push(l),
            Err(e) => panic!("no hello from the agent ({e}): {err:?}"),
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(attached(&vm).len(), 4, "{err:?}");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let st = child.wait().unwrap();
    let took = t0.elapsed();
    reader.join().unwrap();
    err.extend(rx.try_iter());
    let err = err.join("\n");
    eprintln!("agent-backup ended {took:?} after SIGINT:\n{err}");
    assert!(!st.success(), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "recoverfs: error: interrupted by SIGINT: 0 of 1 VMs backed up; VM deb: stopped"
        ) && last.contains("the agent container was detached; no backup was published"),
        "{err}"
    );
    assert_eq!(attached(&vm), Vec::<String>::new(), "left attached in QEMU");
    assert_eq!(file_backups(&env), 0, "an interrupted backup was published");
    let scratch: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(scratch.is_empty(), "host scratch left: {scratch:?}");
    // In the guest: the application resumed; no agent, mount or copy left.
    let inside = guest(
        &vm,
        &format!(
            "cat /srv/app/state; {AGENT_RUNNING}; grep recoverfs-agent /proc/mounts || true; \
             ls -d /.recoverfs-agent-copy.* 2>/dev/null || true; \
             ls /dev/virtio-ports/ | grep recoverfs.agent || true"
        ),
    );
    assert_eq!(inside, "resumed\n", "the guest after the stop");
}

#[test]
fn an_agent_backup_killed_while_quiesced_still_resumes_the_application_in_the_guest() {
    use std::io::BufRead;
    let env = Env::new();
    let mut vm = start_vm(env.dir.path(), "debian", true);
    wait_agent(&mut vm);
    guest(&vm, "mkdir -p /srv/app && echo running > /srv/app/state");
    let h = hooks(
        env.dir.path(),
        &[(
            "app",
            "echo quiesced > /srv/app/state; sleep 5",
            "echo resumed > /srv/app/state",
        )],
    );
    let img = build_container(&env, "1.0.0", &h);
    // Killed, it leaves its scratch directory: in the test's.
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut child = agent_backup(&env, &vm, &img, &["--paths", "/srv/app", "--hooks", "app"])
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    // The agent's hello comes just before it runs `pre`.
    loop {
        let l = lines.next().expect("no hello from the agent").unwrap();
        if l.starts_with("deb: agent 1.0.0") {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing could detach the container (only QMP can)...
    assert_eq!(attached(&vm).len(), 4);
    // ...but the agent sees its host gone, runs `post` and ends, and the
    // script unmounts the container.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let inside = guest(
            &vm,
            &format!(
                "cat /srv/app/state; {AGENT_RUNNING}; grep recoverfs-agent /proc/mounts || true"
            ),
        );
        if inside == "resumed\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "60 s after the host was killed, the guest: {inside}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn sigint_during_agent_restore_leaves_whole_files_only_in_the_guest_and_nothing_attached() {
    use std::io::BufRead;
    let env = Env::new();
    let mut vm = start_vm(env.dir.path(), "debian", true);
    wait_agent(&mut vm);
    guest(
        &vm,
        "mkdir -p /srv/app && echo a > /srv/app/a && echo z > /srv/app/z && \
         yes recoverfs | head -c 134217728 > /srv/app/big && sync",
    );
    let h = hooks(env.dir.path(), &[]);
    let img = build_container(&env, "1.0.0", &h);
    let o = agent_backup(&env, &vm, &img, &["--paths", "/srv/app"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tmp = env.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut child = Command::new(bin())
        .args(["agent-restore", "--repo", env.repo_str(), "--container"])
        .arg(&img)
        .arg("--vm")
        .arg(format!("deb={},qga={}", vm.qmp.display(), vm.qga.display()))
        .args(["/srv/app", "--to", "/restored"])
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut err = vec![];
    // The host sends once the agent's hello came: 128 MiB over a
    // virtio-serial port take longer than a second.
    loop {
        let l = lines.next().expect("no hello from the agent").unwrap();
        err.push(l);
        if err.last().unwrap().starts_with("deb: agent 1.0.0") {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    err.extend(lines.map(|l| l.unwrap()));
    let st = child.wait().unwrap();
    let took = t0.elapsed();
    let err = err.join("\n");
    eprintln!("agent-restore ended {took:?} after SIGINT:\n{err}");
    assert!(!st.success(), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("recoverfs: error: interrupted by SIGINT: VM deb: stopped")
            && last.contains("the agent container was detached; 2 of 4 entries were sent"),
        "{err}"
    );
    assert_eq!(attached(&vm), Vec::<String>::new(), "left attached in QEMU");
    let scratch: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(scratch.is_empty(), "host scratch left: {scratch:?}");
    // /srv/app/a whole; nothing of big, not even its temporary file.
    let inside = guest(
        &vm,
        &format!(
            "cd /restored/srv/app && ls -A && cat a; {AGENT_RUNNING}; \
             grep recoverfs-agent /proc/mounts || true"
        ),
    );
    assert_eq!(inside, "a\na\n", "the guest after the stop");
}

#[test]
fn a_sparse_file_and_hard_links_in_a_running_guest_restore_as_they_were_without_streaming_holes() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let mut vm = start_vm(env.dir.path(), "debian", true);
    wait_agent(&mut vm);
    // 1 GiB with 1 MiB of data in its middle, and a second link to it.
    let sum = guest(
        &vm,
        "mkdir -p /srv/sp && truncate -s 1G /srv/sp/disk.img && \
         head -c 1048576 /dev/urandom | dd of=/srv/sp/disk.img bs=1M seek=500 conv=notrunc 2>/dev/null && \
         ln /srv/sp/disk.img /srv/sp/disk.link && sync && sha256sum /srv/sp/disk.img",
    );
    let img = build_container(&env, "1.0.0", &hooks(env.dir.path(), &[]));
    let t0 = Instant::now();
    let o = agent_backup(&env, &vm, &img, &["--paths", "/srv/sp"])
        .output()
        .unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    eprintln!("agent-backup of a 1 GiB sparse file (1 MiB data): {took:?}");
    let to = env.path("restored");
    std::fs::create_dir(&to).unwrap();
    env.ok(&[
        "files",
        "restore",
        "--repo",
        env.repo_str(),
        "deb",
        "/srv/sp",
        "--to",
        to.to_str().unwrap(),
    ]);
    let (a, b) = (to.join("srv/sp/disk.img"), to.join("srv/sp/disk.link"));
    assert_eq!(sha256(&a), sum[..64]);
    let (ma, mb) = (
        std::fs::metadata(&a).unwrap(),
        std::fs::metadata(&b).unwrap(),
    );
    assert_eq!(ma.len(), 1 << 30);
    assert!(
        ma.blocks() * 512 < 8 << 20,
        "not sparse: {} blocks",
        ma.blocks()
    );
    assert_eq!((ma.dev(), ma.ino()), (mb.dev(), mb.ino()), "not one file");
}

/// A host behind a slow store (S3 answering each request 1.5 s late): the
/// agent's end frame waits in the port's queues well past the old agent's
/// 30 s wait for the acknowledgement, and the backup still completes,
/// whole.
#[test]
fn an_agent_backup_to_a_store_that_falls_behind_the_stream_completes_whole() {
    use common::garage::{Garage, BUCKET};
    use common::proxy::LatencyProxy;
    let g = Garage::single();
    let proxy = LatencyProxy::start(g.nodes[0].s3_port, 1500, None);
    let env = Env::s3(&format!("s3://{BUCKET}/slow"), proxy.route(g.env(0)));
    let mut vm = start_vm(env.dir.path(), "debian", true);
    wait_agent(&mut vm);
    // 8 MiB that does not compress: about 64 chunks, one request each.
    let sum = guest(
        &vm,
        "mkdir -p /srv/slow && head -c 8388608 /dev/urandom > /srv/slow/big && \
         sync && sha256sum /srv/slow/big",
    );
    let img = build_container(&env, "1.0.0", &hooks(env.dir.path(), &[]));
    let t0 = Instant::now();
    let o = agent_backup(&env, &vm, &img, &["--paths", "/srv/slow"])
        .envs(env.extra_env.iter().cloned())
        .output()
        .unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    eprintln!("agent-backup to a slow store: {took:?}\n{err}");
    assert!(o.status.success(), "{err}");
    assert_eq!(attached(&vm), Vec::<String>::new(), "left attached in QEMU");
    let to = env.path("restored");
    std::fs::create_dir(&to).unwrap();
    env.ok(&[
        "files",
        "restore",
        "--repo",
        env.repo_str(),
        "deb",
        "/srv/slow",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(sha256(&to.join("srv/slow/big")), sum[..64]);
}
