//! `recoverfs boot --via nfs|nbd`: QEMU boots the `tiny` and `debian`
//! images through the daemon's NFS and NBD exports (QEMU's `nfs://` driver
//! and `-blockdev driver=nbd` with reconnect), and each boot's writes are
//! on the same staged disk, whatever the frontend.

mod common;

use common::nfs::own_loopback;
use common::*;

fn boot_via(env: &Env, vm: &str, via: &str, marker: &str) -> String {
    env.ok(&[
        "boot",
        "--socket",
        env.socket.to_str().unwrap(),
        vm,
        "--via",
        via,
        "--marker",
        marker,
        "--timeout",
        "900",
        "--quiet",
    ])
}

fn exports_env() -> Env {
    let mut env = Env::new();
    let a = own_loopback();
    env.serve_args = vec![
        "--nfs".into(),
        a.to_string(),
        "--nbd".into(),
        format!("{a}:10809"),
    ];
    env
}

#[test]
fn the_tiny_vm_boots_via_nfs_then_via_nbd_and_keeps_its_writes() {
    let env = exports_env();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let _d = env.serve();
    env.recover("tiny", None);
    let out = boot_via(&env, "tiny", "nfs", "RECOVERFS-TINY-UP");
    assert!(out.contains("boot=1"), "{out}");
    let out = boot_via(&env, "tiny", "nbd", "RECOVERFS-TINY-UP");
    assert!(out.contains("boot=2"), "{out}");
    let out = boot_via(&env, "tiny", "fuse", "RECOVERFS-TINY-UP");
    assert!(out.contains("boot=3"), "{out}");
}

#[test]
fn the_debian_vm_boots_over_nfs_and_over_nbd() {
    let env = exports_env();
    env.backup("debian", "1M", &[&vm_image("debian")]);
    let _d = env.serve();
    env.recover("debian", None);
    let out = boot_via(&env, "debian", "nfs", "RECOVERFS-DEBIAN-UP");
    assert!(out.contains("boot=1"), "{out}");
    let out = boot_via(&env, "debian", "nbd", "RECOVERFS-DEBIAN-UP");
    assert!(out.contains("boot=2"), "{out}");
}

#[test]
fn boot_via_an_export_the_daemon_does_not_serve_says_so() {
    let env = Env::new();
    env.backup("tiny", "64K", &[&tiny_image()]);
    let _d = env.serve();
    env.recover("tiny", None);
    let sock = env.socket.to_str().unwrap().to_string();
    env.fails(
        &["boot", "--socket", &sock, "tiny", "--via", "nbd"],
        "--nbd",
    );
    env.fails(
        &["boot", "--socket", &sock, "tiny", "--via", "nfs"],
        "--nfs",
    );
}
