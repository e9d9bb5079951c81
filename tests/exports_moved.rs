//! A restart that serves NBD on another port strands the clients
//! attached to the old one (QEMU's reconnect keeps trying it): the
//! restarted daemon names the export point, both addresses and the VMs
//! resumed there; a restart on the same addresses says nothing
//! (explore9 M6).

mod common;

use common::nfs::own_loopback;
use common::*;

const MOVED: &str = "must reattach";

/// The stranded clients `status --json` shows (per export point).
fn moved(env: &Env) -> Vec<serde_json::Value> {
    env.status()["moved"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_restart_on_another_nbd_port_names_the_stranded_clients_until_the_old_port_is_back() {
    let mut env = Env::new();
    let ip = own_loopback();
    let (old, new) = (format!("{ip}:10899"), format!("{ip}:10900"));
    env.serve_args = vec!["--nbd".into(), old.clone()];
    env.backup("tiny", "64K", &[&tiny_image()]);
    let mut d = env.serve();
    env.recover("tiny", None);
    assert!(moved(&env).is_empty());
    assert!(d.stop().success(), "{}", d.log_text());
    assert!(!d.log_text().contains(MOVED), "{}", d.log_text());
    drop(d);

    env.serve_args = vec!["--nbd".into(), new.clone()];
    let mut d = env.serve();
    let log = d.log_text();
    assert!(log.contains("resumed a session"), "{log}");
    let want = format!(
        "export point default: NBD was served on {old}, now on {new}: clients attached to {old} (VMs tiny) must reattach"
    );
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(MOVED)).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains(&want), "{log}");
    assert!(lines[0].contains("WARN"), "{log}");
    // In `status` too, per export point, for as long as it matters
    // (fixstatus 2: only the log said it, once).
    let m = moved(&env);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["export_point"], "default");
    assert_eq!(m[0]["nbd_from"], serde_json::json!([old]));
    assert_eq!(m[0]["nbd_now"], serde_json::json!([new]));
    assert_eq!(m[0]["vms"], serde_json::json!(["tiny"]));
    let shown = env.ok(&["status", "--socket", env.socket.to_str().unwrap()]);
    let want_shown =
        format!("WARNING: export point default: NBD moved from {old} to {new} at the restart at ");
    assert!(
        shown.contains(&want_shown) && shown.contains("clients of VMs tiny must reattach"),
        "{shown}"
    );
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);

    // The same new port again: nobody was seen to reattach, so the clients
    // are still on the old one (fixstatus 2: this restart said nothing).
    let mut d = env.serve();
    let log = d.log_text();
    assert!(log.contains("resumed a session"), "{log}");
    assert!(log.contains(&want), "{log}");
    assert!(log.contains("(stranded since the restart at "), "{log}");
    assert_eq!(moved(&env).len(), 1);
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);

    // Back on the old port: they reconnect by themselves; nothing said.
    env.serve_args = vec!["--nbd".into(), old.clone()];
    let mut d = env.serve();
    let log = d.log_text();
    assert!(log.contains("resumed a session"), "{log}");
    assert!(!log.contains(MOVED), "{log}");
    assert!(moved(&env).is_empty());
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);

    // Without NBD: the clients of the last address are stranded, until
    // their session is released.
    env.serve_args = vec![];
    let d = env.serve();
    let log = d.log_text();
    let want = format!(
        "export point default: NBD was served on {old}, not served: clients attached to {old} (VMs tiny) must reattach"
    );
    assert!(log.contains(&want), "{log}");
    let m = moved(&env);
    assert!(
        m.len() == 1
            && m[0]["warning"]
                .as_str()
                .unwrap()
                .contains(&format!("NBD on {old} is no longer served")),
        "{m:?}"
    );
    let o = env.release("tiny", false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(moved(&env).is_empty());
    let record = std::fs::read_to_string(env.staging.join("exports.json")).unwrap();
    assert!(!record.contains("tiny"), "{record}");
}

/// `GET /sessions/{vm}`: one VM's status.
fn session_status(env: &Env, vm: &str) -> serde_json::Value {
    let o = std::process::Command::new("curl")
        .args(["-sf", "--unix-socket", env.socket.to_str().unwrap()])
        .arg(format!("http://x/sessions/{vm}"))
        .output()
        .expect("curl is installed");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// fixviews 1 and 2: a client that reattached to the new port by hand was
/// named at every restart until the session was released; and one VM's
/// status did not name its stranded clients at all.
#[test]
fn a_client_that_reattached_to_the_new_port_clears_the_vm_at_once_and_for_the_next_restart() {
    let mut env = Env::new();
    let ip = own_loopback();
    let (old, new) = (format!("{ip}:10899"), format!("{ip}:10900"));
    env.serve_args = vec!["--nbd".into(), old.clone()];
    env.backup("tiny", "64K", &[&tiny_image()]);
    let mut d = env.serve();
    env.recover("tiny", None);
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);

    env.serve_args = vec!["--nbd".into(), new.clone()];
    let mut d = env.serve();
    assert!(d.log_text().contains(MOVED), "{}", d.log_text());
    assert_eq!(moved(&env).len(), 1);
    // One VM's status names them too (fixviews 2).
    let one = session_status(&env, "tiny");
    let m = one["moved"].as_array().cloned().unwrap_or_default();
    assert!(
        m.len() == 1
            && m[0]["vms"] == serde_json::json!(["tiny"])
            && m[0]["nbd_from"] == serde_json::json!([old]),
        "{one}"
    );
    // A client reattaches by hand, to the new port, and writes.
    nbd_write_back(&format!("nbd://{new}/tiny/disk0"));
    // `status` at once, and the record at that attach (a crash now would
    // not name it again).
    assert!(moved(&env).is_empty(), "{:?}", moved(&env));
    assert_eq!(session_status(&env, "tiny")["moved"], serde_json::json!([]));
    let record = std::fs::read_to_string(env.staging.join("exports.json")).unwrap();
    assert!(!record.contains("tiny"), "{record}");
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);

    // The next restart on the same new port says nothing.
    let mut d = env.serve();
    let log = d.log_text();
    assert!(log.contains("resumed a session"), "{log}");
    assert!(!log.contains(MOVED), "{log}");
    assert!(moved(&env).is_empty());
    assert!(d.stop().success(), "{}", d.log_text());
}

/// Runs a client tool; its output, which must be a success.
fn run(args: &[&str]) -> String {
    let o = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} (libnbd-bin, libnfs-utils): {e}", args[0]));
    assert!(o.status.success(), "{args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An NBD client at `url` writes the disk's first sector back as it read
/// it: an attach (`DiskExports`), with the disk's bytes unchanged. libnbd's
/// python module (python3-libnbd), as the tools cannot write in place.
fn nbd_write_back(url: &str) {
    let wrote = run(&[
        "/usr/bin/python3",
        "-c",
        &format!(
            "import nbd; h = nbd.NBD(); h.connect_uri('{url}'); \
             b = h.pread(512, 0); h.pwrite(b, 0); h.flush(); h.shutdown(); print('wrote')"
        ),
    ]);
    assert_eq!(wrote.trim(), "wrote");
}

/// A VM recovered with NFS and NBD on `old`'s address, then resumed by a
/// restart that serves both on `new`'s: its clients are stranded on both.
fn stranded_on_both(env: &mut Env, old: &str, new: &str) -> Daemon {
    let serve = |ip: &str, port: u16| {
        vec![
            "--nfs".to_string(),
            ip.to_string(),
            "--nbd".into(),
            format!("{ip}:{port}"),
        ]
    };
    env.serve_args = serve(old, 10899);
    env.backup("tiny", "64K", &[&tiny_image()]);
    let mut d = env.serve();
    env.recover("tiny", None);
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);
    env.serve_args = serve(new, 10900);
    let d = env.serve();
    let m = moved(env);
    assert!(
        m.len() == 1
            && m[0]["nfs_from"] == serde_json::json!([format!("{old}:2049")])
            && m[0]["nbd_from"] == serde_json::json!([format!("{old}:10899")]),
        "{m:?}"
    );
    d
}

/// review30 M2: a look at the new address (`nbdinfo --list`, an
/// NBD_OPT_INFO, an admin's `nfs-cat` or `nfs-ls`) is no reattach, though
/// each of them cleared the VM's stranded clients.
#[test]
fn a_listing_an_nbd_info_or_an_nfs_read_does_not_clear_the_stranded_clients() {
    let mut env = Env::new();
    let (old, new) = (own_loopback().to_string(), own_loopback().to_string());
    let mut d = stranded_on_both(&mut env, &old, &new);
    let both = |after: &str| {
        let m = moved(&env);
        assert!(
            m.len() == 1
                && m[0]["nfs_from"] == serde_json::json!([format!("{old}:2049")])
                && m[0]["nbd_from"] == serde_json::json!([format!("{old}:10899")]),
            "after {after}: {m:?}"
        );
    };
    let nbd = format!("nbd://{new}:10900");
    let list = run(&["nbdinfo", "--list", &nbd]);
    assert!(list.contains("tiny/disk0"), "{list}");
    both("nbdinfo --list");
    // NBD_OPT_INFO alone (plain `nbdinfo` goes on to NBD_OPT_GO); the
    // system's python has the nbd module (python3-libnbd).
    let size = run(&[
        "/usr/bin/python3",
        "-c",
        &format!(
            "import nbd; h = nbd.NBD(); h.set_opt_mode(True); \
             h.connect_uri('{nbd}/tiny/disk0'); h.opt_info(); print(h.get_size()); h.opt_abort()"
        ),
    ]);
    assert!(size.trim().parse::<u64>().unwrap() > 0, "{size}");
    both("NBD_OPT_INFO");
    // Reads in transmission: plain `nbdinfo` (NBD_OPT_GO, block status)
    // and `nbdcopy` of the whole disk are readers, not the VM's hypervisor
    // (fixm2's finding: they cleared the VM's stranded NBD clients).
    run(&["nbdinfo", &format!("{nbd}/tiny/disk0")]);
    run(&["nbdcopy", &format!("{nbd}/tiny/disk0"), "null:"]);
    both("nbdinfo, nbdcopy");
    run(&["nfs-ls", &format!("nfs://{new}/tiny")]);
    let cat = std::process::Command::new("nfs-cat")
        .arg(format!("nfs://{new}/tiny/disk0.raw"))
        .output()
        .expect("nfs-cat is installed (libnfs-utils)");
    assert!(cat.status.success() && !cat.stdout.is_empty(), "{cat:?}");
    both("nfs-ls, nfs-cat");
    let record = std::fs::read_to_string(env.staging.join("exports.json")).unwrap();
    assert!(record.contains("tiny"), "{record}");
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);
    // And the next restart names them again, on both.
    let mut d = env.serve();
    let log = d.log_text();
    let line = log.lines().find(|l| l.contains(MOVED)).unwrap_or_default();
    assert!(
        line.contains(&format!(
            "clients attached to {old}:2049 {old}:10899 (VMs tiny)"
        )),
        "{log}"
    );
    assert!(d.stop().success(), "{}", d.log_text());
}

/// review30 M2: an attach over one frontend cleared the VM's stranded
/// clients over both; a VM stranded on NFS and NBD stays stranded on the
/// one that did not reattach. An attach is a write to a disk, over NBD as
/// over NFS.
#[test]
fn an_attach_over_one_frontend_clears_only_that_frontends_stranded_clients() {
    let mut env = Env::new();
    let (old, new) = (own_loopback().to_string(), own_loopback().to_string());
    let mut d = stranded_on_both(&mut env, &old, &new);
    // NBD reattaches: a client writes the disk.
    nbd_write_back(&format!("nbd://{new}:10900/tiny/disk0"));
    let nfs_only = |env: &Env| {
        let m = moved(env);
        m.len() == 1
            && m[0]["nfs_from"] == serde_json::json!([format!("{old}:2049")])
            && m[0]["nbd_from"] == serde_json::json!([])
    };
    assert!(nfs_only(&env), "{:?}\n{}", moved(&env), d.log_text());
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);
    // Recorded so: the next restart names NFS's clients only.
    let mut d = env.serve();
    let log = d.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(MOVED)).collect();
    assert!(
        lines.len() == 1
            && lines[0].contains(&format!(
                "NFS was served on {old}:2049, now on {new}:2049: clients attached to {old}:2049 (VMs tiny) must reattach"
            ))
            && !lines[0].contains("NBD"),
        "{log}"
    );
    assert!(nfs_only(&env), "{:?}", moved(&env));
    // NFS reattaches: a client writes the disk.
    let mut c = common::nfs::Client::mount(&new, "/tiny").unwrap();
    let dir = c.root.clone();
    let disk = c.lookup(&dir, "disk0.raw").unwrap();
    let first = c.read(&disk, 0, 512).unwrap();
    assert!(nfs_only(&env), "a read is no attach: {:?}", moved(&env));
    c.write(&disk, 0, &first, nfs3_types::nfs3::stable_how::FILE_SYNC)
        .unwrap();
    assert!(moved(&env).is_empty(), "{:?}", moved(&env));
    let record = std::fs::read_to_string(env.staging.join("exports.json")).unwrap();
    assert!(!record.contains("tiny"), "{record}");
    drop(c);
    assert!(d.stop().success(), "{}", d.log_text());
}
