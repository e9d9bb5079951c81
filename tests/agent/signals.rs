//! Signals and kills during agent backups and restores: the application
//! resumed, nothing attached, whole files only.

use super::*;

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
