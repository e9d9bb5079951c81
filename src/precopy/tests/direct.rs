//! Direct reads of the image file against real QEMU: which nodes allow
//! them (from QEMU's own `query-named-block-nodes`), that only the file
//! QEMU has open is read, and that a round reading the file records the
//! same chunks as one reading the same disk over NBD.

use super::*;
use crate::precopy::direct::{raw_file, DirectFile, RawFile};
use crate::qemu::testing::Proc;
use rand::RngCore;
use std::process::Command;

fn random_image(path: &std::path::Path, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut d);
    // A zero chunk, which no round reads.
    d[CHUNK as usize..2 * CHUNK as usize].fill(0);
    std::fs::write(path, &d).unwrap();
    d
}

/// A paused QEMU with one virtio disk per `-drive` option string, QMP
/// on `dir/qmp.sock` (for the job) and the test's monitor; its process
/// and the test's monitor.
fn qemu(dir: &std::path::Path, drives: &[String]) -> (Proc, Qmp) {
    let (qmp, mon) = (dir.join("qmp.sock"), dir.join("mon.sock"));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-S", "-nodefaults", "-display", "none", "-m", "64"]);
    for s in [&qmp, &mon] {
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", s.display()));
    }
    for (i, d) in drives.iter().enumerate() {
        cmd.arg("-drive")
            .arg(format!("{d},if=none,id=d{i}"))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=d{i},id=v{i}"));
    }
    let mut p = Proc::spawn(&mut cmd);
    p.wait_for(&qmp);
    p.wait_for(&mon);
    let q = Qmp::connect(&mon).unwrap();
    (p, q)
}

#[test]
fn direct_reads_are_allowed_only_for_a_plain_raw_file_that_qemu_itself_has_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let plain = random_image(&p("plain.raw"), 4 * MIB);
    random_image(&p("offset.raw"), 4 * MIB);
    let direct = random_image(&p("direct.raw"), 4 * MIB);
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(p("disk.qcow2"))
        .arg("4M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let drives = [
        format!("file={},format=raw", p("plain.raw").display()),
        format!(
            "driver=raw,offset=1048576,file.driver=file,file.filename={}",
            p("offset.raw").display()
        ),
        format!("file={},format=qcow2", p("disk.qcow2").display()),
        format!("file={},format=raw,cache=none", p("direct.raw").display()),
    ];
    let (_proc, mut q) = qemu(dir.path(), &drives);
    let disks = q.block_devices().unwrap();
    let nodes = q
        .execute(
            "query-named-block-nodes",
            Some(serde_json::json!({"flat": true})),
        )
        .unwrap();
    let nodes = nodes.as_array().unwrap();
    let decide = |i: usize| raw_file(nodes, &disks[i].node_name);

    let plain_raw = decide(0).unwrap();
    assert_eq!(
        plain_raw,
        RawFile {
            path: p("plain.raw"),
            direct: false,
            size: 4 * MIB as u64
        }
    );
    let e = decide(1).unwrap_err();
    assert!(e.contains("options (offset, size)"), "{e}");
    let e = decide(2).unwrap_err();
    assert!(e.contains("its node is qcow2, not raw"), "{e}");
    let direct_raw = decide(3).unwrap();
    assert!(direct_raw.direct, "{direct_raw:?}");

    // The file QEMU has open is read, whole chunks at any offset.
    let pid = q.peer_pid();
    assert!(pid.is_some_and(|p| p != std::process::id()), "{pid:?}");
    let mut buf = vec![0u8; CHUNK as usize];
    for (raw, data) in [(&plain_raw, &plain), (&direct_raw, &direct)] {
        let f = DirectFile::open(raw, pid).unwrap();
        for k in [0, 1, 63] {
            let off = k * CHUNK as usize;
            f.read(off as u64, &mut buf).unwrap();
            assert!(
                buf == data[off..off + CHUNK as usize],
                "chunk {k} of {raw:?}"
            );
        }
        let e = f.read(4 * MIB as u64 - 10, &mut buf).unwrap_err();
        assert!(e.to_string().contains("at 4194294 of"), "{e}");
    }
    // Not a file QEMU has open: another process, a copy at another path,
    // a size other than the node's.
    let other = Proc::spawn(Command::new("sleep").arg("60"));
    let e = DirectFile::open(&plain_raw, Some(other.0.id()))
        .err()
        .unwrap();
    assert!(e.contains("is not a file QEMU"), "{e}");
    std::fs::copy(p("plain.raw"), p("copy.raw")).unwrap();
    let copy = RawFile {
        path: p("copy.raw"),
        ..plain_raw.clone()
    };
    let e = DirectFile::open(&copy, pid).err().unwrap();
    assert!(e.contains("is not a file QEMU"), "{e}");
    let short = RawFile {
        size: MIB as u64,
        ..plain_raw.clone()
    };
    let e = DirectFile::open(&short, pid).err().unwrap();
    assert!(e.contains("is 4194304 bytes, QEMU's node 1048576"), "{e}");
    let e = DirectFile::open(&plain_raw, None).err().unwrap();
    assert!(e.contains("process is unknown"), "{e}");
}

/// Writes `pattern` over chunk `k` of drive `drive` (HMP `qemu-io`).
fn guest_write(q: &mut Qmp, drive: &str, pattern: u8, k: u64) {
    let off = k * CHUNK as u64;
    let out = q
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({"command-line":
                format!("qemu-io {drive} \"write -P {pattern:#x} {off} {CHUNK}\"")})),
        )
        .unwrap();
    assert_eq!(out.as_str(), Some(""), "qemu-io: {out}");
}

#[test]
fn a_round_reading_the_image_file_records_the_same_chunks_as_one_reading_the_disk_over_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let data = random_image(&p("a.raw"), 4 * MIB);
    std::fs::write(p("b.raw"), &data).unwrap();
    // The same bytes twice: as a plain raw file (read directly), and with
    // a `size` option, which QEMU names by a `json:` filename (over NBD).
    let drives = [
        format!("file={},format=raw", p("a.raw").display()),
        format!(
            "driver=raw,size={},file.driver=file,file.filename={}",
            4 * MIB,
            p("b.raw").display()
        ),
    ];
    let (_proc, mut mon) = qemu(dir.path(), &drives);
    mon.cont().unwrap();
    let (_r, repo) = crate::vmbackup::tests::repo();
    let state = tempfile::tempdir().unwrap();
    let o = Options {
        vm: "pc".into(),
        qmp: p("qmp.sock"),
        agent: None,
        state_dir: state.path().to_path_buf(),
        chunk_size: CHUNK,
        every: Duration::from_millis(500),
        end: End::Until(SystemTime::now() + Duration::from_secs(12)),
        max_rate: None,
        checkpoint: Duration::from_millis(200),
        load_limit: None,
        hook: None,
    };
    let job = {
        let (repo, o) = (repo.clone(), o.clone());
        std::thread::spawn(move || run(&repo, &o, &Control::default()))
    };
    // The same writes to both disks while the job runs its rounds; none
    // in the last seconds, so the last rounds see the final content.
    for (n, k) in [3u64, 7, 1, 3, 60, 7, 20].iter().enumerate() {
        std::thread::sleep(Duration::from_millis(300));
        for drive in ["d0", "d1"] {
            guest_write(&mut mon, drive, n as u8 + 1, *k);
        }
    }
    let rep = job.join().unwrap().unwrap();
    assert!(rep.rounds.len() >= 3, "{rep:?}");
    for r in &rep.rounds {
        assert_eq!(r.read_from[0], p("a.raw").display().to_string(), "{r:?}");
        assert!(
            r.read_from[1].starts_with("NBD: its raw node has options"),
            "{r:?}"
        );
    }
    let s = StateDir::open(state.path(), repo.id(), "pc")
        .unwrap()
        .load()
        .unwrap()
        .unwrap();
    let now = std::fs::read(p("a.raw")).unwrap();
    assert!(now == std::fs::read(p("b.raw")).unwrap());
    let want: Vec<_> = (now.chunks(CHUNK as usize))
        .map(|c| (!c.iter().all(|&b| b == 0)).then(|| repo.chunk_id(c)))
        .collect();
    assert!(
        s.disks[0].chunks == want,
        "the chunks read from the file are not the disk's"
    );
    assert!(
        s.disks[1].chunks == want,
        "the chunks read over NBD are not the disk's"
    );
}
