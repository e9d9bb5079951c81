//! Who may touch what (issue 10 items 12-14): a staging directory that is
//! not ours is refused before anything in it changes; the control socket
//! appears with its final mode and serves only root, the daemon's user and
//! its group; the NBD socket appears with mode 0600; the disks belong to
//! the hypervisor's user and nobody else; a member of the socket group
//! names only QMP sockets and relocation targets it could use itself.
//! Other users are `nobody` (65534, group nogroup) and an unnamed uid,
//! 65533, run through `setpriv`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const K64: usize = 64 << 10;

/// A directory every user can traverse (the test's own is 0700).
fn public_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("recoverfs-pub")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Runs `args` as uid:gid (no supplementary groups unless `groups`).
fn run_as(uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let g: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        c.arg(format!("--groups={}", g.join(",")));
    }
    c.args(args)
        .env_remove("RECOVERFS_SOCKET")
        .output()
        .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_staging_directory_that_is_not_ours_is_refused_before_anything_in_it_changes() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 1, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let foreign = env.path("home");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.fails(
        &[
            "serve",
            "--repo",
            env.repo_str(),
            "--staging",
            foreign.to_str().unwrap(),
            "--mount",
            env.mount.to_str().unwrap(),
        ],
        "not a recoverfs staging directory",
    );
    assert_eq!(mode(&foreign), 0o755, "the directory's mode was changed");
    let names: Vec<_> = std::fs::read_dir(&foreign)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("notes.txt")],
        "files were added"
    );
}

#[test]
fn the_control_socket_appears_with_its_final_mode_even_under_umask_0() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let mut env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 2, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let dir = env.path("sock");
    std::fs::create_dir(&dir).unwrap();
    env.socket = dir.join("ctl.sock");
    env.serve_umask = Some(0);
    let ino = Inotify::init(InitFlags::empty()).unwrap();
    ino.add_watch(&dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .unwrap();
    let sock = env.socket.clone();
    let watcher = std::thread::spawn(move || loop {
        for ev in ino.read_events().unwrap() {
            if ev.name.as_deref() == Some(std::ffi::OsStr::new("ctl.sock")) {
                // Looked at the moment the name appears.
                return (ev.mask, mode(&sock));
            }
        }
    });
    let _d = env.serve();
    let (how, first_mode) = watcher.join().unwrap();
    assert_eq!(
        first_mode, 0o600,
        "the socket appeared with mode {first_mode:o} ({how:?})"
    );
    assert!(
        how.contains(AddWatchFlags::IN_MOVED_TO),
        "the socket was created in place ({how:?}), so for a moment it had the umask's mode"
    );
}

#[test]
fn the_nbd_socket_appears_with_mode_0600_even_under_umask_0() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let mut env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 2, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let dir = env.path("nbd");
    std::fs::create_dir(&dir).unwrap();
    let sock = dir.join("nbd.sock");
    env.serve_args = vec!["--nbd".into(), format!("unix:{}", sock.display())];
    env.serve_umask = Some(0);
    let ino = Inotify::init(InitFlags::empty()).unwrap();
    ino.add_watch(&dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .unwrap();
    let watched = sock.clone();
    let watcher = std::thread::spawn(move || loop {
        for ev in ino.read_events().unwrap() {
            if ev.name.as_deref() == Some(std::ffi::OsStr::new("nbd.sock")) {
                // Looked at the moment the name appears.
                return mode(&watched);
            }
        }
    });
    let _d = env.serve();
    let first_mode = watcher.join().unwrap();
    assert_eq!(
        first_mode, 0o600,
        "the NBD socket appeared with mode {first_mode:o}"
    );
    assert_eq!(mode(&sock), 0o600);
}

#[test]
fn only_root_the_daemon_user_and_the_socket_group_may_use_the_control_socket() {
    let mut env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 3, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let public = public_dir();
    env.socket = public.path().join("ctl.sock");
    env.serve_args = vec!["--socket-group".into(), "nogroup".into()];
    let d = env.serve();
    let meta = std::fs::metadata(&env.socket).unwrap();
    assert_eq!((mode(&env.socket), meta.gid()), (0o660, 65534));
    let sock = env.socket.to_str().unwrap();
    let status = [bin(), "status", "--socket", sock];
    let o = run_as(65534, 65534, &[65534], &status);
    assert!(
        o.status.success(),
        "a member of the socket group is served: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Another user cannot even connect...
    let o = run_as(65533, 65533, &[], &status);
    assert!(!o.status.success());
    // ...and if the socket's mode is loosened by mistake, the daemon still
    // refuses it by its credentials, on one line.
    std::fs::set_permissions(&env.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = run_as(65533, 65533, &[], &status);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an outsider was served");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        d.log_text().contains("refused a client"),
        "{}",
        d.log_text()
    );
    // Root still is.
    env.ok(&["status", "--socket", sock]);
}

#[test]
fn disks_belong_to_the_hypervisor_user_named_by_owner_and_to_nobody_else() {
    let mut env = Env::new();
    let public = public_dir();
    let img: PathBuf = public.path().join("a.raw");
    random_image(&img, 16 * K64, 4, K64);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.backup("vm", "64K", &[&img]);
    // --allow-other alone would make the disks useless (0600, root's).
    let mnt = public.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Bounded: a daemon that accepted the flags would serve forever.
    let o = Command::new("timeout")
        .args(["20", bin(), "serve", "--repo", env.repo_str(), "--staging"])
        .arg(&env.staging)
        .arg("--mount")
        .arg(&mnt)
        .arg("--allow-other")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "serve --allow-other without --owner: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--owner"), "{err}");
    env.mount = mnt.clone();
    env.serve_args = vec![
        "--allow-other".into(),
        "--owner".into(),
        "65534:65534".into(),
    ];
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let m = std::fs::metadata(&disk).unwrap();
    assert_eq!((m.uid(), m.gid(), mode(&disk)), (65534, 65534, 0o600));
    assert_eq!(mode(&mnt.join("vm")), 0o700);
    let (d, i) = (disk.to_str().unwrap(), img.to_str().unwrap());
    let o = run_as(65534, 65534, &[65534], &["cmp", d, i]);
    assert!(
        o.status.success(),
        "the hypervisor user reads its disk: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run_as(65533, 65533, &[], &["cat", d]);
    assert!(!o.status.success(), "another user read the disk");
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"));
}

/// Runs `f` on a thread of its own as uid:gid with `groups`. Raw system
/// calls change only that thread's credentials (glibc's wrappers would
/// change every thread's), and the kernel records them for each socket
/// the thread connects, as it would for another process's.
fn on_thread_as<T: Send + 'static>(
    uid: u32,
    gid: u32,
    groups: &[u32],
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    std::thread::spawn(move || {
        // SAFETY: plain system calls on this thread's credentials.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        f()
    })
    .join()
    .unwrap()
}

/// Waits (bounded) for a connection on `l`.
fn connected(l: &std::os::unix::net::UnixListener, secs: u64) -> bool {
    l.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if l.accept().is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[test]
fn a_socket_group_member_names_only_qmp_sockets_and_relocation_targets_it_could_use_itself() {
    use std::os::unix::net::UnixListener;
    let mut env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 3, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let public = public_dir();
    env.socket = public.path().join("ctl.sock");
    env.serve_args = vec!["--socket-group".into(), "nogroup".into()];
    let _d = env.serve();
    // A VM of root's, whose monitor nobody else may use...
    let roots = public.path().join("root.qmp");
    let root_qmp = UnixListener::bind(&roots).unwrap();
    std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o600)).unwrap();
    // ...also behind a link nobody may make...
    let link = public.path().join("link.qmp");
    std::os::unix::fs::symlink(&roots, &link).unwrap();
    // ...and one of nobody's own.
    let own = public.path().join("nobody.qmp");
    let own_qmp = UnixListener::bind(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();

    let as_nobody = |path: String, body: serde_json::Value| {
        let sock = env.socket.clone();
        on_thread_as(65534, 65534, &[65534], move || {
            recoverfs::api::client::Client::new(&sock).post(&path, &body)
        })
    };
    for qmp in [&roots, &link] {
        let e = as_nobody(
            "/precopy".into(),
            serde_json::json!({"vm": "pc", "qmp": qmp}),
        )
        .expect_err("root's QMP socket was accepted from nobody");
        let msg = e.to_string();
        assert_eq!(e.kind(), recoverfs::error::ErrorKind::NotPermitted, "{msg}");
        assert!(
            msg.contains(&format!(
                "qmp: uid 65534 may not connect to {}",
                qmp.display()
            )),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }
    // The guest agent's socket is checked the same way.
    let e = as_nobody(
        "/precopy".into(),
        serde_json::json!({"vm": "pc", "qmp": own, "agent": roots}),
    )
    .expect_err("root's agent socket was accepted from nobody");
    assert!(e.to_string().contains("agent: uid 65534"), "{e}");
    assert!(
        !connected(&root_qmp, 1),
        "the daemon connected to root's VM"
    );
    // Its own socket is accepted, and the job reaches it.
    let st = as_nobody(
        "/precopy".into(),
        serde_json::json!({"vm": "pc", "qmp": own}),
    )
    .expect("nobody's own QMP socket");
    assert_eq!(st["running"], true, "{st}");
    assert!(
        connected(&own_qmp, 30),
        "the job did not connect to nobody's socket"
    );
    // Root names any socket, as before.
    let c = recoverfs::api::client::Client::new(&env.socket);
    c.post("/precopy", &serde_json::json!({"vm": "pc2", "qmp": roots}))
        .expect("root's own request");
    assert!(
        connected(&root_qmp, 30),
        "the job did not connect to root's socket"
    );
    for vm in ["pc", "pc2"] {
        c.delete(&format!("/precopy/{vm}")).unwrap();
    }

    // A relocation target nobody may not create in is refused before
    // anything else; one it may passes on (to "no session").
    let e = as_nobody(
        "/sessions/vm/relocate".into(),
        serde_json::json!({"to": public.path()}),
    )
    .expect_err("a relocation into root's directory was accepted from nobody");
    assert_eq!(e.kind(), recoverfs::error::ErrorKind::NotPermitted, "{e}");
    assert!(
        e.to_string().contains(&format!(
            "relocation target: uid 65534 may not create vm in {}",
            public.path().display()
        )),
        "{e}"
    );
    let open = public.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = as_nobody(
        "/sessions/vm/relocate".into(),
        serde_json::json!({"to": open}),
    )
    .expect_err("no session to relocate");
    assert_eq!(e.kind(), recoverfs::error::ErrorKind::NotFound, "{e}");
}

#[test]
fn the_socket_group_counts_among_the_groups_the_caller_connected_with() {
    let mut env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 3, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let public = public_dir();
    env.socket = public.path().join("ctl.sock");
    env.serve_args = vec!["--socket-group".into(), "nogroup".into()];
    let _d = env.serve();
    // In the group only as a supplementary group of the connecting thread:
    // its process (this test, root's) is in other groups, so what
    // `/proc/PID/status` says would be wrong.
    let sock = env.socket.clone();
    let r = on_thread_as(65533, 65533, &[65534], move || {
        recoverfs::api::client::Client::new(&sock).get("/sessions")
    });
    assert!(r.is_ok(), "a member of the socket group was refused: {r:?}");
    let sock = env.socket.clone();
    let r = on_thread_as(65533, 65533, &[], move || {
        recoverfs::api::client::Client::new(&sock).get("/sessions")
    });
    assert!(r.is_err(), "a user outside the socket group was served");
}
