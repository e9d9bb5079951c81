//! The NFSv3 export with the userspace clients a hypervisor would use
//! (this kernel has no NFS client): libnfs-utils (`nfs-ls`, `nfs-cp`,
//! `nfs-cat`), QEMU's `nfs://` driver, and the `nfs3_client` crate for what
//! the tools cannot do (UNSTABLE writes, COMMIT, REMOVE, RENAME). Each test
//! serves on a loopback address of its own.

mod common;

use std::process::Command;

use common::nfs::{own_loopback, Client};
use common::*;
use nfs3_types::nfs3::{nfsstat3, stable_how};

const K64: usize = 64 << 10;

fn nfs_env(extra: &[&str]) -> (Env, String) {
    let mut env = Env::new();
    let addr = own_loopback().to_string();
    env.serve_args = vec!["--nfs".into(), addr.clone()];
    env.serve_args.extend(extra.iter().map(|s| s.to_string()));
    (env, addr)
}

/// The staging directory of VM `vm`'s one session.
fn session_dir(env: &Env) -> std::path::PathBuf {
    let mut dirs = std::fs::read_dir(env.staging.join("sessions/vm")).unwrap();
    dirs.next().unwrap().unwrap().path()
}

fn tool(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} (Debian package libnfs-utils): {e}", args[0]))
}

#[test]
fn nfs_clients_list_copy_write_and_keep_side_files_while_disks_stay_put() {
    let (env, addr) = nfs_env(&[]);
    let a = random_image(&env.path("a.raw"), 40 * K64 + 512, 81, K64);
    let b = random_image(&env.path("b.raw"), 9 * K64, 82, K64);
    env.backup("vm", "64K", &[&env.path("a.raw"), &env.path("b.raw")]);
    let mut d = env.serve();
    let out = env.ok(&["recover", "--socket", env.socket.to_str().unwrap(), "vm"]);
    assert!(out.contains(&format!("nfs://{addr}/vm/disk0.raw")), "{out}");
    let ls = tool(&["nfs-ls", &format!("nfs://{addr}/")]);
    assert!(
        String::from_utf8_lossy(&ls.stdout).contains(" vm"),
        "{ls:?}"
    );
    let ls =
        String::from_utf8_lossy(&tool(&["nfs-ls", &format!("nfs://{addr}/vm")]).stdout).to_string();
    for name in ["disk0.raw", "disk1.raw", "vm.json"] {
        assert!(ls.contains(name), "{ls}");
    }
    for (i, want) in [&a, &b].into_iter().enumerate() {
        let copy = env.path(&format!("copy{i}.raw"));
        let o = tool(&[
            "nfs-cp",
            &format!("nfs://{addr}/vm/disk{i}.raw"),
            copy.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{o:?}");
        assert!(
            read_all(&copy) == *want,
            "disk{i} copied over NFS differs from its backup"
        );
    }
    // Side files: created with nfs-cp, read with nfs-cat.
    std::fs::write(env.path("vmx"), b"displayName = vm\n").unwrap();
    let o = tool(&[
        "nfs-cp",
        env.path("vmx").to_str().unwrap(),
        &format!("nfs://{addr}/vm/vm.vmx"),
    ]);
    assert!(o.status.success(), "{o:?}");
    let cat = tool(&["nfs-cat", &format!("nfs://{addr}/vm/vm.vmx")]);
    assert_eq!(cat.stdout, b"displayName = vm\n");
    // Renamed and removed; the disks and vm.json refuse it.
    let mut c = Client::mount(&addr, "/vm").unwrap();
    let dir = c.root.clone();
    c.rename(&dir, "vm.vmx", "vm.vmx~").unwrap();
    let lck = c.create(&dir, ".lck-0001").unwrap();
    c.write(&lck, 0, b"lock", stable_how::FILE_SYNC).unwrap();
    assert_eq!(c.remove(&dir, "disk0.raw"), Err(nfsstat3::NFS3ERR_PERM));
    assert_eq!(c.remove(&dir, "vm.json"), Err(nfsstat3::NFS3ERR_PERM));
    assert_eq!(
        c.rename(&dir, "disk1.raw", "other.raw"),
        Err(nfsstat3::NFS3ERR_PERM)
    );
    assert_eq!(
        c.rename(&dir, "vm.vmx~", "disk0.raw"),
        Err(nfsstat3::NFS3ERR_PERM)
    );
    let disk0 = c.lookup(&dir, "disk0.raw").unwrap();
    assert_eq!(c.truncate(&disk0, 10), Err(nfsstat3::NFS3ERR_PERM));
    assert_eq!(c.create(&dir, "disk0.raw"), Err(nfsstat3::NFS3ERR_EXIST));
    assert_eq!(c.getattr(&disk0).unwrap().size, a.len() as u64);
    // FSSTAT tells the staging filesystem's real size.
    let (total, avail) = c.fsstat();
    let st = nix::sys::statvfs::statvfs(&env.staging).unwrap();
    let real = st.blocks() as u64 * st.fragment_size() as u64;
    assert_eq!(total, real);
    assert!(avail > 0 && avail <= total);
    // A disk attached over NFS counts as open: release refuses.
    let o = env.release("vm", false);
    assert!(
        !o.status.success(),
        "release while an NFS client uses the disk"
    );
    // The client is named by its address (explore10 L4).
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("its files over NFS by 127."), "{err}");
    drop(c);
    // Side files survive a daemon crash...
    d.kill9();
    std::mem::forget(d);
    let d2 = env.serve();
    let cat = tool(&["nfs-cat", &format!("nfs://{addr}/vm/vm.vmx~")]);
    assert_eq!(cat.stdout, b"displayName = vm\n", "{cat:?}");
    // ...and go away with release --discard.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let o = env.release("vm", true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sessions = env.staging.join("sessions/vm");
    assert_eq!(
        std::fs::read_dir(&sessions).map(|r| r.count()).unwrap_or(0),
        0
    );
    drop(d2);
}

#[test]
fn every_acknowledged_write_survives_kill9_with_the_same_verifier_and_old_handles() {
    let (env, addr) = nfs_env(&[]);
    random_image(&env.path("a.raw"), 32 * K64, 83, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    let mut c = Client::mount(&addr, "/").unwrap();
    let root = c.root.clone();
    let disk = c.path("/vm/disk0.raw").unwrap();
    let dir = c.path("/vm").unwrap();
    let (how, v1) = c
        .write(&disk, 0, &[1u8; 8192], stable_how::UNSTABLE)
        .unwrap();
    assert_eq!(
        how,
        stable_how::UNSTABLE,
        "an UNSTABLE write is answered UNSTABLE"
    );
    assert_eq!(
        c.commit(&disk).unwrap(),
        v1,
        "the verifier holds within a run"
    );
    let (how, _) = c
        .write(
            &disk,
            3 * K64 as u64 + 100,
            &[2u8; 5000],
            stable_how::FILE_SYNC,
        )
        .unwrap();
    assert_eq!(how, stable_how::FILE_SYNC);
    c.write(&disk, 20 * K64 as u64, &[3u8; 4096], stable_how::UNSTABLE)
        .unwrap();
    drop(c);
    d.kill9();
    std::mem::forget(d);
    let _d2 = env.serve(); // resumes the session by itself
    let port = 2049;
    let mut c = Client::reconnect(&addr, port, root);
    // The old handles work: no NFS3ERR_STALE.
    assert!(c.getattr(&dir).is_ok());
    assert_eq!(c.read(&disk, 0, 8192).unwrap(), vec![1u8; 8192]);
    assert_eq!(
        c.read(&disk, 3 * K64 as u64 + 100, 5000).unwrap(),
        vec![2u8; 5000]
    );
    // A daemon crash loses nothing: the UNSTABLE write that was never
    // committed is still there, in a block that was not staged before it,
    // and the verifier is unchanged, so the client resends nothing.
    assert_eq!(
        c.read(&disk, 20 * K64 as u64, 4096).unwrap(),
        vec![3u8; 4096],
        "an uncommitted write was lost in a daemon crash"
    );
    assert_eq!(
        c.commit(&disk).unwrap(),
        v1,
        "the verifier changed over a daemon restart"
    );
}

#[test]
fn qemu_boots_the_tiny_vm_over_nfs() {
    let (env, addr) = nfs_env(&[]);
    let image = tiny_image();
    env.backup("tiny", "64K", &[&image]);
    let _d = env.serve();
    env.recover("tiny", None);
    let url = format!("nfs://{addr}/tiny/disk0.raw");
    assert_eq!(
        boot_counter_of_drive(&format!("file={url},format=raw,if=virtio"), "over NFS"),
        1
    );
    // The guest's misses within a block waited holding no thread.
    let st = env.disk_status("tiny", 0);
    assert!(
        st["later_reads"].as_u64().unwrap() > 0,
        "no read answered later: {st}"
    );
    // Its write (the counter) is on the FUSE file too.
    assert_eq!(boot_counter(&env.mount.join("tiny/disk0.raw")), 2);
}

#[test]
fn bad_nfs_addresses_and_clients_are_refused_clearly() {
    let env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 84, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let serve = |nfs: &str| {
        vec![
            "serve".to_string(),
            "--repo".into(),
            env.repo_str().into(),
            "--staging".into(),
            env.staging.to_str().unwrap().into(),
            "--mount".into(),
            env.mount.to_str().unwrap().into(),
            "--socket".into(),
            env.socket.to_str().unwrap().into(),
            "--nfs".into(),
            nfs.into(),
        ]
    };
    let fails = |nfs: &str, needle: &str| {
        let v = serve(nfs);
        env.fails(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>(), needle);
    };
    fails("198.18.250.250", "not an address of this host");
    fails("no-such-address", "expected ADDR");
    let busy_addr = own_loopback();
    let _busy = std::net::TcpListener::bind((busy_addr, 2049)).unwrap();
    fails(&busy_addr.to_string(), "already in use");
    let pm_addr = own_loopback();
    let _pm = std::net::TcpListener::bind((pm_addr, 111)).unwrap();
    fails(&format!("{pm_addr}:2049"), "111");
    // Nothing was left mounted by the failed starts.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(env.mount.to_str().unwrap()), "{mounts}");

    // An unknown VM, and a client that is not on the list.
    let mut env = env;
    let host = netns::Host::new(((std::process::id() % 200) + 20) as u8);
    env.serve_args = vec!["--nfs".into(), host.server.clone()];
    let d = env.serve();
    env.recover("vm", None);
    let o = tool(&["nfs-ls", &format!("nfs://{}/nope", host.server)]);
    assert!(!o.status.success(), "an unknown VM listed: {o:?}");
    let o = host.run(&["nfs-ls", &format!("nfs://{}/vm", host.server)]);
    assert!(
        !o.status.success(),
        "a client not on the list was served: {o:?}"
    );
    assert!(
        d.log_text().contains("NFS client refused") && d.log_text().contains(&host.addr),
        "{}",
        d.log_text()
    );
    drop(d);
    // On the list, the same client is served, but its root is squashed
    // to nobody, who may not enter a VM's 0700 directory...
    let allow = format!("{}/32", host.addr);
    env.serve_args = vec![
        "--nfs".into(),
        host.server.clone(),
        "--nfs-allow".into(),
        allow.clone(),
    ];
    let d = env.serve();
    let o = host.run(&["nfs-ls", &format!("nfs://{}/vm", host.server)]);
    assert!(!o.status.success(), "squashed root listed a VM: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ACCES"),
        "{o:?}"
    );
    drop(d);
    // ...unless root squashing is off (what ESXi needs).
    env.serve_args.push("--nfs-no-root-squash".into());
    let _d = env.serve();
    let o = host.run(&["nfs-ls", &format!("nfs://{}/vm", host.server)]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("disk0.raw"));
}

#[test]
fn write_through_answers_every_write_file_sync() {
    let (env, addr) = nfs_env(&["--nfs-write-through"]);
    random_image(&env.path("a.raw"), 8 * K64, 85, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let mut c = Client::mount(&addr, "/vm").unwrap();
    let disk = c.lookup(&c.root.clone(), "disk0.raw").unwrap();
    let (how, _) = c.write(&disk, 0, b"abc", stable_how::UNSTABLE).unwrap();
    assert_eq!(
        how,
        stable_how::FILE_SYNC,
        "an UNSTABLE write must be made durable and say so"
    );
    let flushes = env.disk_status("vm", 0)["flushes"].as_u64().unwrap();
    assert!(flushes >= 1, "the write was flushed before the reply");
}

/// Clears the immutable flag it set, even when the test fails, so the
/// test directory can be removed.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &std::path::Path) -> Immutable {
        let o = Command::new("chattr").arg("+i").arg(path).output().unwrap();
        assert!(o.status.success(), "chattr +i: {o:?}");
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).output();
    }
}

#[test]
fn a_failed_side_file_write_changes_the_side_file_verifier_so_clients_resend() {
    let (env, addr) = nfs_env(&[]);
    random_image(&env.path("a.raw"), 4 * K64, 84, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    let mut c = Client::mount(&addr, "/").unwrap();
    let dir = c.path("/vm").unwrap();
    let vmx = c.create(&dir, "vm.vmx").unwrap();
    let (_, v1) = c.write(&vmx, 0, b"first", stable_how::UNSTABLE).unwrap();
    assert_eq!(
        c.commit(&vmx).unwrap(),
        v1,
        "the verifier holds within a run"
    );
    // The next write fails on the server (an immutable file stands in for
    // a failed writeback, which the kernel reports to one descriptor only:
    // the COMMIT below, on a new one, would see nothing wrong).
    let path = session_dir(&env).join("files/vm.vmx");
    let (_, v2) = c.write(&vmx, 5, b"second", stable_how::UNSTABLE).unwrap();
    assert_eq!(v2, v1);
    {
        let _frozen = Immutable::set(&path);
        assert!(c.write(&vmx, 11, b"third", stable_how::FILE_SYNC).is_err());
    }
    assert_ne!(
        c.commit(&vmx).unwrap(),
        v1,
        "a COMMIT after a failed side-file write kept the verifier: the client would not resend its UNSTABLE write"
    );
    // A restarted daemon cannot know what the last one failed: new verifier.
    let v3 = c.commit(&vmx).unwrap();
    drop(c);
    d.kill9();
    std::mem::forget(d);
    let _d2 = env.serve(); // resumes the session by itself
    let mut c = Client::mount(&addr, "/").unwrap();
    let vmx = c.path("/vm/vm.vmx").unwrap();
    assert_ne!(
        c.commit(&vmx).unwrap(),
        v3,
        "the side-file verifier survived a daemon restart"
    );
}

#[test]
fn a_name_with_a_slash_or_dotdot_never_reaches_outside_the_vm_directory() {
    let (env, addr) = nfs_env(&[]);
    random_image(&env.path("a.raw"), 4 * K64, 85, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let session = session_dir(&env);
    let victim = env.path("victim");
    std::fs::write(&victim, b"not the guest's").unwrap();
    let mut c = Client::mount(&addr, "/").unwrap();
    let dir = c.path("/vm").unwrap();
    c.create(&dir, "vm.vmx").unwrap(); // the side-file directory exists
    let staging = "../disk0.data".to_string();
    let absolute = victim.to_str().unwrap().to_string();
    for name in [&"../active".to_string(), &staging, &absolute] {
        assert_eq!(
            c.lookup(&dir, name).err(),
            Some(nfsstat3::NFS3ERR_NOENT),
            "LOOKUP {name}"
        );
        assert!(c.remove(&dir, name).is_err(), "REMOVE {name}");
        assert!(c.rename(&dir, name, "taken").is_err(), "RENAME {name}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"not the guest's");
    assert!(session.join("disk0.data").exists(), "the staging file went");
    assert!(session.join("active").exists(), "the session's marker went");
    assert!(!session.join("files/taken").exists());
    // The disk still reads as the backup.
    let disk = c.path("/vm/disk0.raw").unwrap();
    let want = std::fs::read(env.path("a.raw")).unwrap();
    assert_eq!(c.read(&disk, 0, K64 as u32).unwrap(), want[..K64]);
}

#[test]
fn a_name_over_255_bytes_is_answered_nametoolong_by_every_procedure_not_garbage() {
    let (env, addr) = nfs_env(&[]);
    random_image(&env.path("a.raw"), 4 * K64, 86, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let mut c = Client::mount(&addr, "/").unwrap();
    let dir = c.path("/vm").unwrap();
    c.create(&dir, "vm.vmx").unwrap();
    let long = "x".repeat(256);
    let too_long = Some(nfsstat3::NFS3ERR_NAMETOOLONG);
    assert_eq!(c.lookup(&dir, &long).err(), too_long, "LOOKUP");
    assert_eq!(c.create(&dir, &long).err(), too_long, "CREATE");
    assert_eq!(c.remove(&dir, &long).err(), too_long, "REMOVE");
    assert_eq!(c.rename(&dir, "vm.vmx", &long).err(), too_long, "RENAME to");
    assert_eq!(
        c.rename(&dir, &long, "b.vmx").err(),
        too_long,
        "RENAME from"
    );
    // 255 bytes is a name like any other.
    let longest = "y".repeat(255);
    c.create(&dir, &longest).unwrap();
    c.lookup(&dir, &longest).unwrap();
}

#[test]
fn a_client_resetting_its_connection_is_no_warning_and_a_record_over_the_limit_is() {
    use std::io::Write;
    let (env, addr) = nfs_env(&[]);
    random_image(&env.path("a.raw"), 4 * K64, 87, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let d = env.serve();
    let at: std::net::SocketAddr = format!("{addr}:2049").parse().unwrap();
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(at).unwrap();
        // A record header whose body never comes, then a reset (RST).
        s.write_all(&[0x80, 0, 0, 40]).unwrap();
        let off = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &off).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        !d.log_text().contains("NFS connection dropped"),
        "a reset was logged as a warning: {}",
        d.log_text()
    );
    // A fragment claiming 2 GiB: dropped, and said.
    let mut s = std::net::TcpStream::connect(at).unwrap();
    s.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !d.log_text().contains("NFS connection dropped") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_lookup_at_the_wrong_export_point_logs_where_the_vm_is_served_once_a_minute() {
    let mut env = Env::new();
    random_image(&env.path("a.raw"), 4 * K64, 88, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let a = own_loopback();
    let b = loop {
        let b = own_loopback();
        if b != a {
            break b;
        }
    };
    env.serve_args = vec![
        "--export-point".into(),
        format!("a,listen={a}"),
        "--export-point".into(),
        format!("b,listen={b}"),
    ];
    let d = env.serve();
    let sock = env.socket.to_str().unwrap().to_string();
    env.ok(&["recover", "--socket", &sock, "vm", "--export-point", "b"]);
    let mut c = Client::mount(&a.to_string(), "/").unwrap();
    let root = c.path("/").unwrap();
    for _ in 0..3 {
        assert_eq!(c.lookup(&root, "vm").err(), Some(nfsstat3::NFS3ERR_NOENT));
    }
    let want = format!("export point b serves it: nfs://{b}");
    let log = d.log_text();
    assert_eq!(log.matches(&want).count(), 1, "{log}");
    // At its own point it is served; a VM served nowhere is not logged.
    let mut c = Client::mount(&b.to_string(), "/").unwrap();
    c.path("/vm").unwrap();
    let mut c = Client::mount(&a.to_string(), "/").unwrap();
    assert!(c.path("/other").is_err());
    assert!(!d.log_text().contains("VM other"), "{}", d.log_text());
}

#[test]
fn a_side_file_handle_goes_stale_when_its_inode_is_reused_by_another_file() {
    use std::os::unix::fs::MetadataExt;
    let (env, addr) = nfs_env(&[]);
    random_image(&env.path("a.raw"), 4 * K64, 86, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let files = session_dir(&env).join("files");
    let mut c = Client::mount(&addr, "/").unwrap();
    let dir = c.path("/vm").unwrap();
    // ext4 hands a freed inode to the next file created near it, unless
    // another test on this filesystem takes it first: rounds until one of
    // our new files gets it.
    let (old, reused) = (0..50)
        .find_map(|round| {
            let old = c.create(&dir, "vm.lck").unwrap();
            let ino = std::fs::metadata(files.join("vm.lck")).unwrap().ino();
            c.remove(&dir, "vm.lck").unwrap();
            let names: Vec<String> = (0..16).map(|i| format!("vm.vmx-{round}-{i}")).collect();
            let mut got = None;
            for name in &names {
                c.create(&dir, name).unwrap();
                if std::fs::metadata(files.join(name)).unwrap().ino() == ino {
                    got = Some(name.clone());
                    break;
                }
            }
            if got.is_none() {
                for name in &names {
                    let _ = c.remove(&dir, name);
                }
            }
            got.map(|name| (old, name))
        })
        .expect("no new file got a removed file's inode in 50 rounds (not ext4?)");
    assert_eq!(
        c.getattr(&old).err(),
        Some(nfsstat3::NFS3ERR_STALE),
        "the removed file's handle names {reused}, which has its inode"
    );
    assert!(c.write(&old, 0, b"lock", stable_how::FILE_SYNC).is_err());
    assert_eq!(std::fs::read(files.join(&reused)).unwrap(), b"");
}
