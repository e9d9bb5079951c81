//! End-to-end: the real binary, a real FUSE mount, real files.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::sync::Arc;

use common::*;
use rand::{Rng, SeedableRng};

const K64: usize = 64 << 10;

#[test]
fn recovered_disks_match_their_images_byte_for_byte() {
    let env = Env::new();
    let a = random_image(&env.path("a.raw"), 3 * (1 << 20) + 12345, 1, 1 << 20);
    let b = random_image(&env.path("b.raw"), 40 * K64 + 17, 2, K64);
    let id = env.backup("vm1", "64K", &[&env.path("a.raw"), &env.path("b.raw")]);
    let _d = env.serve();
    let disks = env.recover("vm1", Some(&id));
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0], env.mount.join("vm1/disk0.raw"));
    assert_eq!(std::fs::metadata(&disks[0]).unwrap().len(), a.len() as u64);
    assert!(read_all(&disks[0]) == a, "disk0 differs from its image");
    assert!(read_all(&disks[1]) == b, "disk1 differs from its image");
    let cfg: serde_json::Value =
        serde_json::from_slice(&read_all(&env.mount.join("vm1/vm.json"))).unwrap();
    assert_eq!(cfg["name"], "vm1");
    let st = env.settled_disk_status("vm1", 0);
    assert_eq!(st["blocks_total"], 3 * 16 + 1);
    assert_eq!(
        st["fetched_blocks"], st["blocks_staged"],
        "each staged block fetched exactly once"
    );
}

#[test]
fn first_reads_fetch_only_what_is_touched() {
    let mut env = Env::new();
    // The default profile would stage block 0 ahead of the guest.
    env.serve_args = vec!["--no-default-profile".into()];
    random_image(&env.path("a.raw"), 64 * K64, 3, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = &env.recover("vm", None)[0];
    let f = std::fs::File::open(disk).unwrap();
    let mut buf = vec![0u8; 100];
    f.read_exact_at(&mut buf, 10 * K64 as u64 + 5).unwrap();
    let st = env.settled_disk_status("vm", 0);
    assert!(st["blocks_staged"].as_u64().unwrap() <= 2, "{st}");
    assert!(st["fetched_blocks"].as_u64().unwrap() >= 1);
}

#[test]
fn concurrent_readers_get_correct_data_and_one_fetch_per_block() {
    let env = Env::new();
    let data = Arc::new(random_image(&env.path("a.raw"), 256 * K64 + 999, 4, K64));
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let threads: Vec<_> = (0..12)
        .map(|t| {
            let (disk, data) = (disk.clone(), data.clone());
            std::thread::spawn(move || {
                let f = std::fs::File::open(&disk).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for _ in 0..300 {
                    // Many threads hit the same few blocks at once.
                    let off = rng.gen_range(0..data.len() - 1);
                    let len = rng.gen_range(1..=(3 * K64).min(data.len() - off));
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(buf[..] == data[off..off + len], "mismatch at {off}+{len}");
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let st = env.settled_disk_status("vm", 0);
    assert_eq!(
        st["fetched_blocks"], st["blocks_staged"],
        "a block was fetched twice: {st}"
    );
    assert_eq!(st["fetch_errors"], 0);
}

#[test]
fn unaligned_writes_match_an_in_memory_model_and_survive_release() {
    let env = Env::new();
    let mut model = random_image(&env.path("a.raw"), 50 * K64 + 333, 5, K64);
    let original = model.clone();
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for i in 0..200 {
        let off = rng.gen_range(0..model.len() - 1);
        let len = rng.gen_range(1..=(2 * K64 + 100).min(model.len() - off));
        let buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        f.write_all_at(&buf, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&buf);
        if i % 20 == 0 {
            let roff = rng.gen_range(0..model.len() - 1);
            let rlen = rng.gen_range(1..=K64.min(model.len() - roff));
            let mut rb = vec![0u8; rlen];
            f.read_exact_at(&mut rb, roff as u64).unwrap();
            assert!(rb[..] == model[roff..roff + rlen]);
        }
    }
    f.sync_all().expect("fsync is implemented");
    f.sync_data().expect("fdatasync is implemented");
    assert!(read_all(&disk) == model);
    // A write past the end of the disk is refused, the size never changes.
    assert!(f.write_all_at(b"x", model.len() as u64).is_err());
    assert!(f.set_len(10).is_err(), "truncate must be refused");
    assert!(
        std::fs::remove_file(&disk).is_err(),
        "unlink must be refused"
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), model.len() as u64);

    // The changed map covers every written block and nothing else.
    let changed_blocks: Vec<u64> = (0..model.len().div_ceil(K64))
        .filter(|&b| {
            let (s, e) = (b * K64, ((b + 1) * K64).min(model.len()));
            model[s..e] != original[s..e]
        })
        .map(|b| b as u64)
        .collect();
    let st = env.disk_status("vm", 0);
    assert_eq!(
        st["blocks_changed"].as_u64().unwrap(),
        changed_blocks.len() as u64
    );
    let api = std::process::Command::new("curl")
        .args([
            "-s",
            "--unix-socket",
            env.socket.to_str().unwrap(),
            "http://x/sessions/vm/disks/0/changed",
        ])
        .output()
        .unwrap();
    let ch: serde_json::Value = serde_json::from_slice(&api.stdout).unwrap();
    let mut from_api = vec![];
    for r in ch["ranges"].as_array().unwrap() {
        from_api.extend(r["start_block"].as_u64().unwrap()..r["end_block"].as_u64().unwrap());
    }
    assert_eq!(from_api, changed_blocks);

    // Release refuses while open, then keeps staging for a resume.
    let o = env.release("vm", false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("still open"));
    drop(f);
    assert!(env.release("vm", false).status.success());
    assert!(
        !env.mount.join("vm").exists(),
        "released session folder must disappear"
    );
    let disk = env.recover("vm", None)[0].clone();
    assert!(read_all(&disk) == model, "resumed staging lost writes");
    // Discard drops the writes; the backup itself was never modified.
    assert!(env.release("vm", true).status.success());
    let disk = env.recover("vm", None)[0].clone();
    assert!(
        read_all(&disk) == original,
        "backup content must be untouched"
    );
    env.ok(&["verify", "--repo", env.repo_str()]);
}

#[test]
fn large_requests_arrive_whole() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 8 << 20, 7, 1 << 20);
    env.backup("vm", "1M", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let o = std::process::Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .args(["of=/dev/null", "bs=1M", "iflag=direct", "count=8"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = env.disk_status("vm", 0);
    assert_eq!(
        st["reads"], 8,
        "1 MiB direct reads should arrive as single requests: {st}"
    );
}

#[test]
fn mount_and_files_are_locked_down() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 8, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(env.mount.to_str().unwrap()))
        .expect("mounted");
    for opt in ["nodev", "nosuid", "default_permissions"] {
        assert!(line.contains(opt), "mount lacks {opt}: {line}");
    }
    assert!(!line.contains("allow_other"), "{line}");
    assert_eq!(std::fs::metadata(&disk).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&env.staging)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let cfg = env.mount.join("vm/vm.json");
    assert!(
        OpenOptions::new().write(true).open(&cfg).is_err(),
        "vm.json must be read-only"
    );
}

#[test]
fn corrupted_chunk_reads_as_eio_and_is_named() {
    let env = Env::new();
    let data = random_image(&env.path("a.raw"), 8 * K64, 9, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    // Damage the chunk holding block 0 (never a hole in this image? make sure).
    assert!(data[..K64].iter().any(|&b| b != 0));
    let digest = blake3::hash(&data[..K64]).to_hex().to_string();
    let chunk = env.repo.join("chunks").join(&digest[..4]).join(&digest);
    let mut stored = std::fs::read(&chunk).unwrap();
    let mid = stored.len() / 2;
    stored[mid] ^= 0x55;
    std::fs::write(&chunk, &stored).unwrap();

    let d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    let f = std::fs::File::open(&disk).unwrap();
    let mut buf = vec![0u8; 512];
    let e = f.read_exact_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Other blocks still serve.
    f.read_exact_at(&mut buf, 7 * K64 as u64).unwrap();
    let log = d.log_text();
    assert!(
        log.contains(&digest) && log.contains("vm"),
        "log must name the chunk: {log}"
    );
    assert!(env.disk_status("vm", 0)["fetch_errors"].as_u64().unwrap() >= 1);
    let err = env.fails(&["verify", "--repo", env.repo_str()], "damaged");
    let o = env.run(&["verify", "--repo", env.repo_str()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&digest) && out.contains("disk0 block 0"),
        "verify must name the chunk: {out} {err}"
    );
}

#[test]
fn sigterm_flushes_and_unmounts_cleanly() {
    let env = Env::new();
    let mut model = random_image(&env.path("a.raw"), 16 * K64, 10, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    {
        let f = OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&[7u8; 5000], 70_000).unwrap();
        model[70_000..75_000].fill(7);
    }
    assert!(d.stop().success(), "{}", d.log_text());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(env.mount.to_str().unwrap()),
        "still mounted after SIGTERM"
    );
    let _d2 = env.serve();
    let disk = env.recover("vm", None)[0].clone();
    assert!(
        read_all(&disk) == model,
        "write lost across a clean shutdown"
    );
}
