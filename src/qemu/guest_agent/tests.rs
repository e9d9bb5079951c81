//! Against real guests: the `debian` image runs qemu-guest-agent (and
//! stays up with an `org.recoverfs.stay` port); the busybox `tiny` image
//! has no agent. Every QEMU started here is killed when its guard drops.

use super::*;
use crate::qemu::testing::{vm_with_agent, Proc};
use std::path::PathBuf;

struct Vm {
    proc: Proc,
    agent: PathBuf,
    _dir: tempfile::TempDir,
}

/// Boots `name` (writes go to a throwaway overlay) with the agent's port.
fn boot(name: &str) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("qga.sock");
    let mut proc = Proc::spawn(&mut vm_with_agent(name, &agent, None));
    proc.wait_for(&agent);
    Vm {
        proc,
        agent,
        _dir: dir,
    }
}

#[test]
fn the_agent_of_a_running_debian_guest_pings_freezes_thaws_and_undoes_a_freeze_answered_too_late() {
    let mut v = boot("debian");
    // The agent starts late in the boot (TCG): retry the sync until then.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut a = loop {
        match GuestAgent::connect(&v.agent, Duration::from_secs(5)) {
            Ok(a) => break a,
            Err(e) => {
                assert!(
                    v.proc.0.try_wait().unwrap().is_none(),
                    "the guest powered off: {e}"
                );
                assert!(Instant::now() < deadline, "no agent answered: {e}");
            }
        }
    };
    a.ping().unwrap();
    assert_eq!(a.fsfreeze_status().unwrap(), "thawed");
    let frozen = a.fsfreeze().unwrap();
    assert!(frozen >= 1, "{frozen}");
    assert_eq!(a.fsfreeze_status().unwrap(), "frozen");
    assert_eq!(a.fsthaw().unwrap(), frozen);
    assert_eq!(a.fsfreeze_status().unwrap(), "thawed");
    // A second client syncs past whatever the first left unread.
    a.ch.send(&json!({"execute": "guest-ping"}), "guest-ping")
        .unwrap();
    drop(a);
    let mut b = GuestAgent::connect(&v.agent, Duration::from_secs(10)).unwrap();
    b.ping().unwrap();
    let e = b
        .execute("no-such-command", None, Duration::from_secs(10))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("the guest agent refused no-such-command"),
        "{e}"
    );
    b.ping().unwrap();
    drop(b);
    // A freeze not answered in time still freezes the guest: it is undone
    // before the error returns, not left for nobody to thaw.
    let e = GuestAgent::connect_and_freeze(&v.agent, Duration::from_secs(10), Duration::ZERO)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains(&format!(
            "the freeze was undone ({frozen} filesystems thawed)"
        )),
        "{e}"
    );
    assert!(!e.may_be_frozen, "{e}");
    let mut c = GuestAgent::connect(&v.agent, Duration::from_secs(10)).unwrap();
    assert_eq!(c.fsfreeze_status().unwrap(), "thawed");
}

#[test]
fn a_guest_without_an_agent_is_one_clear_error_within_the_sync_timeout() {
    let v = boot("tiny");
    let t0 = Instant::now();
    let e = GuestAgent::connect(&v.agent, Duration::from_secs(2))
        .err()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string()
            .contains("is qemu-guest-agent running in the guest?"),
        "{e}"
    );
    assert_eq!(e.to_string().lines().count(), 1);
}
