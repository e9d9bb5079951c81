//! Quiescing: the application resumed before the stream, the backup
//! holding the quiesced state.

use super::*;

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
