//! What the stream carries: sparse files and hard links, and a host that
//! falls behind it.

use super::*;

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
