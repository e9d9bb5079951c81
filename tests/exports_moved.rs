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
