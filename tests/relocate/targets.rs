//! Targets gone, re-created or full: a relocation held as not resumed,
//! copied again, or retried once room is made.

use super::*;

/// Primary storage not mounted yet when the daemon comes back after a
/// crash: the VM is served from staging, `status` says the relocation was
/// not resumed and why, and once the target is back `relocate --resume`
/// finishes it in the running daemon (no second restart).
#[test]
fn a_relocation_whose_target_was_gone_at_restart_shows_not_resumed_and_resume_completes_it() {
    let env = Env::new();
    let (mut d, data, primary) = relocating(&env, 59, "12");
    d.kill9();
    std::mem::forget(d);
    let away = env.path("primary.away");
    std::fs::rename(&primary, &away).unwrap();
    let _d2 = env.serve();
    let disks = env.recover("vm", None);
    // Served from staging meanwhile.
    assert!(read_all(&disks[0]) == data);
    let r = relocation(&env, "vm");
    assert_eq!(r["state"], "not-resumed", "{r}");
    assert!(r["bytes_done"].as_u64().unwrap() > 0, "{r}");
    let socket = env.socket.to_str().unwrap().to_string();
    let shown = env.ok(&["status", "--socket", &socket]);
    assert!(
        shown.contains("NOT RESUMED") && shown.contains("recoverfs relocate vm --resume"),
        "{shown}"
    );
    let err = env.fails(
        &["relocate", "--socket", &socket, "vm", "--resume"],
        "still cannot be resumed",
    );
    eprintln!("{shown}{err}");
    std::fs::rename(&away, &primary).unwrap();
    let out = env.ok(&["relocate", "--socket", &socket, "vm", "--resume", "--wait"]);
    assert!(out.contains("relocated VM vm"), "{out}");
    assert!(read_all(&primary.join("vm/disk0.raw")) == data);
}

/// The tester's repro: a target on tmpfs, the daemon killed mid-copy, the
/// tmpfs mounted again and the file made again with `truncate` (tmpfs
/// gives the directory and the file the same device and inode numbers, so
/// the target passes for the one recorded). The resumed relocation must
/// copy the disk again, not cut over to a file of holes.
#[test]
fn a_relocation_resumed_over_a_re_created_tmpfs_target_copies_the_disk_again() {
    let env = Env::new();
    let data = random_image(&env.path("a.raw"), 256 * K64, 61, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let mut d = env.serve();
    env.recover("vm", None);
    let primary = env.path("primary");
    let fs = Tmpfs::mount(&primary, "128M");
    let o = relocate(&env, "vm", &primary, &["--rate", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    while relocation(&env, "vm")["bytes_done"].as_u64().unwrap() < 2 << 20 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dev = std::fs::metadata(&primary).unwrap().dev();
    d.kill9();
    std::mem::forget(d);
    drop(fs);
    let (_fs, _held) = remount_on_device(&env, &primary, dev);
    std::fs::create_dir(primary.join("vm")).unwrap();
    let f = std::fs::File::create(primary.join("vm/disk0.raw")).unwrap();
    f.set_len(data.len() as u64).unwrap();
    drop(f);
    let _d2 = env.serve();
    env.recover("vm", None);
    let r = relocation(&env, "vm");
    assert_ne!(r["state"], "not-resumed", "{r}");
    assert_eq!(
        r["bytes_done"], 0,
        "the new file's holes trusted as copied: {r}"
    );
    // At the recorded 1 MB/s: about 16 s.
    wait_state(&env, "vm", "done", Duration::from_secs(120));
    assert!(read_all(&primary.join("vm/disk0.raw")) == data);
}

/// A tmpfs mounted again at `dir` with device number `dev`, the one the
/// unmounted tmpfs there had, and the tmpfs mounts that took lower free
/// numbers meanwhile (held until the test ends). The kernel gives a new
/// tmpfs the lowest free anonymous device number, so the same one only if
/// no other mount (another test's tmpfs or FUSE mount in this binary) freed
/// a lower one in between: those are taken by placeholders until `dir`'s
/// turn comes.
fn remount_on_device(env: &Env, dir: &Path, dev: u64) -> (Tmpfs, Vec<Tmpfs>) {
    let mut held = vec![];
    for k in 0..64 {
        let fs = Tmpfs::mount(dir, "128M");
        let got = std::fs::metadata(dir).unwrap().dev();
        if got == dev {
            return (fs, held);
        }
        drop(fs);
        held.push(Tmpfs::mount(&env.path(&format!("hold{k}")), "1M"));
    }
    panic!("no tmpfs got device {dev:#x} again: another mount holds it");
}

/// Primary storage fills up mid-copy (something else writes there): the
/// relocation fails with ENOSPC. `--resume` while it is still full fails
/// again, for that reason; once room is made, `relocate --resume --wait`
/// retries it in the running daemon (no restart) and cuts over, copying
/// only what was left.
#[test]
fn a_relocation_failed_on_a_full_target_is_retried_by_resume_once_room_is_made() {
    let env = Env::new();
    let data = random_image(&env.path("a.raw"), 256 * K64, 62, K64);
    env.backup("vm", "64K", &[&env.path("a.raw")]);
    let _d = env.serve();
    env.recover("vm", None);
    let primary = env.path("primary");
    let _fs = Tmpfs::mount(&primary, "24M");
    let o = relocate(&env, "vm", &primary, &["--rate", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    while relocation(&env, "vm")["bytes_done"].as_u64().unwrap() < 4 << 20 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Fill what is left of it.
    let filler = primary.join("filler");
    let f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut at = 0;
    while f.write_all_at(&chunk, at).is_ok() {
        at += chunk.len() as u64;
    }
    let failed = |env: &Env| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = relocation(env, "vm");
            if r["state"] == "failed" {
                return r;
            }
            assert!(Instant::now() < deadline, "not failed: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let r = failed(&env);
    assert!(
        r["error"].as_str().unwrap().contains("No space left"),
        "{r}"
    );
    // Still full: retried, and failed again for that.
    let socket = env.socket.to_str().unwrap().to_string();
    let _ = env.run(&["relocate", "--socket", &socket, "vm", "--resume"]);
    let r = failed(&env);
    assert!(
        r["error"].as_str().unwrap().contains("No space left"),
        "{r}"
    );
    let (total, done) = (
        r["bytes_total"].as_u64().unwrap(),
        r["bytes_done"].as_u64().unwrap(),
    );
    let copied = r["bytes_copied"].as_u64().unwrap();
    let shown = env.ok(&["status", "--socket", &socket]);
    assert!(shown.contains("No space left"), "{shown}");
    // Room made: retried in this daemon, to the cutover.
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    let out = env.ok(&["relocate", "--socket", &socket, "vm", "--resume", "--wait"]);
    assert!(out.contains("relocated VM vm"), "{out}");
    assert!(read_all(&primary.join("vm/disk0.raw")) == data);
    let r = relocation(&env, "vm");
    let recopied = r["bytes_copied"].as_u64().unwrap() - copied;
    eprintln!("{done} of {total} copied before, {recopied} after");
    assert!(done > 0, "{r}");
    assert!(
        recopied <= total - done,
        "the retry copied {recopied} bytes; only {} were left",
        total - done
    );
}
