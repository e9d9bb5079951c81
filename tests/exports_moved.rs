//! A restart that serves NBD on another port strands the clients
//! attached to the old one (QEMU's reconnect keeps trying it): the
//! restarted daemon names the export point, both addresses and the VMs
//! resumed there; a restart on the same addresses says nothing
//! (explore9 M6).

mod common;

use common::nfs::own_loopback;
use common::*;

const MOVED: &str = "must reattach";

#[test]
fn a_restart_on_another_nbd_port_names_the_stranded_clients_and_the_same_port_does_not() {
    let mut env = Env::new();
    let ip = own_loopback();
    let (old, new) = (format!("{ip}:10899"), format!("{ip}:10900"));
    env.serve_args = vec!["--nbd".into(), old.clone()];
    env.backup("tiny", "64K", &[&tiny_image()]);
    let mut d = env.serve();
    env.recover("tiny", None);
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
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);

    // The same port again: the session is resumed, nothing is said.
    let mut d = env.serve();
    let log = d.log_text();
    assert!(log.contains("resumed a session"), "{log}");
    assert!(!log.contains(MOVED), "{log}");
    // Without NBD: the clients of the last address are stranded.
    assert!(d.stop().success(), "{}", d.log_text());
    drop(d);
    env.serve_args = vec![];
    let d = env.serve();
    let log = d.log_text();
    let want = format!(
        "export point default: NBD was served on {new}, not served: clients attached to {new} (VMs tiny) must reattach"
    );
    assert!(log.contains(&want), "{log}");
}
