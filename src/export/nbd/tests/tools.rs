//! The server against real clients, run as subprocesses: libnbd's nbdinfo
//! and nbdcopy (Debian package libnbd-bin) and qemu-img / qemu-io (Debian
//! package qemu-utils). A missing tool fails the test, naming its package.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use super::*;

const LIBNBD: &str = "libnbd-bin";
const QEMU: &str = "qemu-utils";
/// No tool run here needs more than a few seconds.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `tool` with `args`; fails the test if the tool is missing or
/// hangs (it is killed then).
fn run(tool: &str, package: &str, args: &[&str]) -> Output {
    let child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                panic!("{tool} is not installed: install the Debian package {package}")
            }
            _ => panic!("cannot run {tool}: {e}"),
        });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TOOL_TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("{tool} {args:?} did not finish within {TOOL_TIMEOUT:?}");
        }
    }
}

/// Stdout of a run that must succeed.
fn success(tool: &str, package: &str, args: &[&str]) -> String {
    let out = run(tool, package, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn uri(h: &Harness) -> String {
    format!("nbd://{}/{EXPORT}", h.addr)
}

/// `nbdinfo --map[=context] --json` as (offset, length, type) triples.
fn map(h: &Harness, context: Option<&str>) -> Vec<(u64, u64, u64)> {
    let flag = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = success("nbdinfo", LIBNBD, &[&flag, "--json", &uri(h)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A server over the shared layout; returns the disk's bytes too.
fn laid_out() -> (Harness, Arc<Probe>, Vec<u8>) {
    let p = Probe::new(SIZE);
    let image = lay_out(&p);
    (serve_one(p.clone()), p, image)
}

#[test]
fn nbdinfo_maps_holes_with_base_allocation_and_guest_changes_with_recoverfs_changed() {
    let (h, _, _) = laid_out();
    let rest = SIZE - 11 * BS;
    assert_eq!(
        map(&h, None),
        vec![
            (0, 4 * BS, 0),
            (4 * BS, 6 * BS, 3),
            (10 * BS, BS, 0),
            (11 * BS, rest, 3)
        ]
    );
    assert_eq!(
        map(&h, Some("recoverfs:changed")),
        vec![
            (0, 2 * BS, 0),
            (2 * BS, 2 * BS, 1),
            (4 * BS, 6 * BS, 0),
            (10 * BS, BS, 1),
            (11 * BS, rest, 0)
        ]
    );
}

#[test]
fn nbdinfo_shows_the_export_its_description_flags_and_block_sizes() {
    let (h, _, _) = laid_out();
    let out = success("nbdinfo", LIBNBD, &["--json", &uri(&h)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], EXPORT);
    assert_eq!(e["description"], "mem/disk0, a test disk");
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    for yes in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(e[yes], true, "{yes}: {out}");
    }
    for no in ["is_read_only", "can_fast_zero", "can_cache"] {
        assert_eq!(e[no], false, "{no}: {out}");
    }
    let contexts = e["contexts"].to_string();
    assert!(
        contexts.contains("base:allocation") && contexts.contains("recoverfs:changed"),
        "{contexts}"
    );

    let out = success(
        "nbdinfo",
        LIBNBD,
        &["--list", "--json", &format!("nbd://{}", h.addr)],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports"][0]["export-name"], EXPORT);
}

#[test]
fn nbdcopy_copies_the_export_to_a_file_byte_for_byte() {
    let (h, _, image) = laid_out();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("copy.raw");
    success("nbdcopy", LIBNBD, &[&uri(&h), file.to_str().unwrap()]);
    assert!(std::fs::read(&file).unwrap() == image, "copy differs");
}

#[test]
fn qemu_img_compare_finds_the_export_equal_to_its_bytes_and_unequal_to_others() {
    let (h, _, mut image) = laid_out();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("same.raw");
    std::fs::write(&file, &image).unwrap();
    let f = file.to_str().unwrap();
    success(
        "qemu-img",
        QEMU,
        &["compare", "-f", "raw", "-F", "raw", f, &uri(&h)],
    );
    image[5 * BS as usize + 3] = 1; // inside a hole
    std::fs::write(&file, &image).unwrap();
    let out = run(
        "qemu-img",
        QEMU,
        &["compare", "-f", "raw", "-F", "raw", f, &uri(&h)],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn writes_from_qemu_io_and_nbdcopy_land_on_the_disk() {
    let (h, p, image) = laid_out();
    success(
        "qemu-io",
        QEMU,
        &["-f", "raw", "-c", "write -P 0xab 0 64k", &uri(&h)],
    );
    assert!(p
        .inner
        .read_at(0, 65536)
        .unwrap()
        .iter()
        .all(|&b| b == 0xab));
    assert!(
        p.inner.read_at(65536, SIZE as usize).unwrap() == image[65536..],
        "beyond the write changed"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("src.raw");
    let data = random(SIZE as usize, 11);
    std::fs::write(&file, &data).unwrap();
    let flushes = p.flushes();
    success(
        "nbdcopy",
        LIBNBD,
        &["--flush", file.to_str().unwrap(), &uri(&h)],
    );
    assert!(
        p.inner.read_at(0, SIZE as usize).unwrap() == data,
        "copied data differs"
    );
    assert!(
        p.flushes() > flushes,
        "nbdcopy --flush did not reach Disk::flush"
    );
}

#[test]
fn nbdinfo_reaches_the_export_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let p = Probe::new(SIZE);
    let h = serve(vec![(EXPORT, p)], &[Listen::Unix(sock.clone())]);
    let u = unix_uri(&sock);
    assert_eq!(
        success("nbdinfo", LIBNBD, &["--size", &u]).trim(),
        SIZE.to_string()
    );
    let out = success("nbdinfo", LIBNBD, &["--map", "--json", &u]);
    assert!(out.contains("hole,zero"), "{out}");
    drop(h);
}

fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///{EXPORT}?socket={}", sock.display())
}
