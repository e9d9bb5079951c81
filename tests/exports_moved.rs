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
    // A client reattaches by hand, to the new port.
    let url = format!("nbd://{new}/tiny/disk0");
    let o = std::process::Command::new("nbdinfo")
        .arg(&url)
        .output()
        .expect("nbdinfo is installed (Debian libnbd-bin)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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
