//! Freeze and thaw through a scripted guest agent: a thaw whose reply is
//! lost is retried on a new connection; one that still fails, or a freeze
//! that cannot be undone, fails the VM saying the guest may be frozen.

use super::*;

/// A scripted guest agent on `path` (the real one needs a booted guest):
/// it syncs and freezes, and answers the `n`th `guest-fsfreeze-thaw`
/// (counted from one) if `answer_thaw(n)`, else closes the connection
/// unanswered (a lost reply, an agent restarted). Returns the connection
/// number (from one) of each thaw seen.
fn scripted_agent(
    path: &Path,
    answer_thaw: impl Fn(usize) -> bool + Send + 'static,
) -> Arc<Mutex<Vec<usize>>> {
    scripted_agent_with(path, true, answer_thaw)
}

/// [`scripted_agent`] whose `guest-fsfreeze-freeze` closes the connection
/// unanswered unless `answer_freeze` (a freeze that timed out).
fn scripted_agent_with(
    path: &Path,
    answer_freeze: bool,
    answer_thaw: impl Fn(usize) -> bool + Send + 'static,
) -> Arc<Mutex<Vec<usize>>> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    let thaws: Arc<Mutex<Vec<usize>>> = Arc::default();
    let t = thaws.clone();
    std::thread::spawn(move || {
        for (conn, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let mut out = client.try_clone().unwrap();
            for line in BufReader::new(client).split(b'\n') {
                let Ok(line) = line else { break };
                let start = line.iter().position(|&b| b != 0xff).unwrap_or(line.len());
                let Ok(cmd) = serde_json::from_slice::<Value>(&line[start..]) else {
                    continue;
                };
                let reply = match cmd["execute"].as_str().unwrap_or("") {
                    "guest-sync-delimited" => {
                        out.write_all(&[0xff]).unwrap();
                        json!({"return": cmd["arguments"]["id"]})
                    }
                    "guest-fsfreeze-thaw" => {
                        let mut t = t.lock().unwrap();
                        t.push(conn + 1);
                        if !answer_thaw(t.len()) {
                            break;
                        }
                        json!({"return": 1})
                    }
                    "guest-fsfreeze-freeze" if !answer_freeze => break,
                    _ => json!({"return": 1}),
                };
                if writeln!(out, "{reply}").is_err() {
                    break;
                }
            }
        }
    });
    thaws
}

#[test]
fn a_thaw_whose_reply_is_lost_is_retried_on_a_new_connection_and_one_that_still_fails_fails_the_vm_saying_the_guest_may_be_frozen(
) {
    let (lost, stuck) = (vm(Some(&content())), vm(Some(&content())));
    let (d, repo) = repo();
    let (lost_qga, stuck_qga) = (d.path().join("lost.sock"), d.path().join("stuck.sock"));
    let retried = scripted_agent(&lost_qga, |n| n > 1);
    let never = scripted_agent(&stuck_qga, |_| false);
    let mut opts = options(&[("lost", &lost), ("stuck", &stuck)], 1, None);
    opts.vms[0].agent = Some(lost_qga);
    opts.vms[1].agent = Some(stuck_qga);
    let s = backup_vms(&repo, &opts).unwrap();

    let r = report(&s, "lost");
    assert_eq!(
        *retried.lock().unwrap(),
        [1, 2],
        "thawed again on a new connection"
    );
    assert!(r.error.is_none() && r.backup.is_some(), "{r:?}");
    assert!(at(r, "resumed") < at(r, "thawed"));
    assert_eq!(r.consistency, "application-consistent");

    let r = report(&s, "stuck");
    assert_eq!(never.lock().unwrap().len(), 2);
    let e = r.error.as_deref().unwrap_or_else(|| panic!("{r:?}"));
    assert!(e.starts_with("THE GUEST MAY STILL BE FROZEN"), "{e}");
    assert!(r.backup.is_none());
    assert!(repo.backup_ids("stuck").unwrap_or_default().is_empty());
    let mut q = stuck.monitor();
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
    assert!(q.status().unwrap().running);
    let mut q = lost.monitor();
    let id = report(&s, "lost").backup.clone().unwrap();
    let left = leftovers_but_kept(&mut q, &repo, "lost", &id);
    assert!(left.is_empty(), "{left:?}");
    assert!(q.status().unwrap().running);
}

#[test]
fn a_freeze_that_fails_and_cannot_be_undone_fails_that_vm_saying_the_guest_may_be_frozen_and_never_pauses_it(
) {
    let (frozen, fine) = (vm(Some(&content())), vm(Some(&content())));
    let (d, repo) = repo();
    let qga = d.path().join("frozen.sock");
    let thaws = scripted_agent_with(&qga, false, |_| false);
    let mut opts = options(&[("frozen", &frozen), ("fine", &fine)], 1, None);
    opts.vms[0].agent = Some(qga);
    let s = backup_vms(&repo, &opts).unwrap();
    let r = report(&s, "frozen");
    assert_eq!(thaws.lock().unwrap().len(), 1, "the freeze was not undone");
    let e = r.error.as_deref().unwrap_or_else(|| panic!("{r:?}"));
    assert!(e.contains("THE GUEST MAY STILL BE FROZEN"), "{e}");
    assert!(r.backup.is_none() && r.paused_ms.is_none(), "{r:?}");
    let mut q = frozen.monitor();
    assert!(q.status().unwrap().running);
    assert!(leftovers(&mut q).is_empty(), "{:?}", leftovers(&mut q));
    let r = report(&s, "fine");
    assert!(r.error.is_none() && r.backup.is_some(), "{r:?}");
}
