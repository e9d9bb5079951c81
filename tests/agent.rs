//! Granular backups through the agent container, against real QEMU: a
//! running `debian` guest (qemu-guest-agent inside) and the real
//! `recoverfs` binary. One VM is shared by the steps that depend on each
//! other; every QEMU is killed when its guard drops, also on failure.
//! The static agent binary comes from `make agent` (a `make test` step).

mod common;
#[path = "agent/disk_backup.rs"]
mod disk_backup;
#[path = "agent/quiesce.rs"]
mod quiesce;
#[path = "agent/signals.rs"]
mod signals;
#[path = "agent/streams.rs"]
mod streams;

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
