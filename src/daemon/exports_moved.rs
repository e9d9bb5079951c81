//! A restart that serves an export point's NFS or NBD on other addresses
//! than before (another `--nbd`/`--nfs`, an export point's address
//! changed, a frontend turned off) strands the clients attached to the
//! old ones: QEMU's NBD reconnect and libnfs keep trying the old port
//! (explore9 M6). `serve` compares with where the previous daemon of its
//! staging served (`staging::last_exports`) and names, per export point,
//! the VMs resumed there whose clients must reattach.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::session::Datastore;
use crate::staging::last_exports::{self, Served};

/// Warns (one line per export point) where resumed sessions' clients are
/// stranded, then records `now` for the next start. Never fails `serve`.
pub(super) fn check_and_record(root: &Path, ds: &Datastore, now: &BTreeMap<String, Served>) {
    if let Some(before) = last_exports::read(root) {
        let vms_at = |point: &str| -> Vec<String> {
            ds.sessions_at(point).iter().map(|s| s.vm.clone()).collect()
        };
        for line in moved(&before, now, vms_at) {
            tracing::warn!("{line}");
        }
    }
    if let Err(e) = last_exports::write(root, now) {
        tracing::warn!("could not record the export addresses in the staging directory (a later daemon there on other addresses will not say which clients must reattach): {e}");
    }
}

/// The warning of each export point whose sessions (`vms_at`, the ones
/// resumed) were served on addresses that are no longer served.
fn moved(
    before: &BTreeMap<String, Served>,
    now: &BTreeMap<String, Served>,
    vms_at: impl Fn(&str) -> Vec<String>,
) -> Vec<String> {
    let mut lines = vec![];
    for (point, served) in now {
        let Some(prev) = before.get(point) else {
            continue;
        };
        let mut parts = vec![];
        let mut stranded = vec![];
        for (what, old, new) in [
            ("NFS", &prev.nfs, &served.nfs),
            ("NBD", &prev.nbd, &served.nbd),
        ] {
            let kept: BTreeSet<&String> = new.iter().collect();
            let gone: Vec<&String> = old.iter().filter(|a| !kept.contains(a)).collect();
            if gone.is_empty() {
                continue;
            }
            let now = match new.is_empty() {
                true => "not served".to_string(),
                false => format!("now on {}", join(new.iter())),
            };
            parts.push(format!("{what} was served on {}, {now}", join(old.iter())));
            stranded.extend(gone);
        }
        if parts.is_empty() {
            continue;
        }
        let vms = vms_at(point);
        if vms.is_empty() {
            continue;
        }
        lines.push(format!(
            "export point {point}: {}: clients attached to {} (VMs {}) must reattach",
            parts.join("; "),
            join(stranded.into_iter()),
            vms.join(", ")
        ));
    }
    lines
}

fn join<'a>(addrs: impl Iterator<Item = &'a String>) -> String {
    addrs.map(String::as_str).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(nfs: &[&str], nbd: &[&str]) -> Served {
        Served {
            nfs: nfs.iter().map(|s| s.to_string()).collect(),
            nbd: nbd.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn one(s: Served) -> BTreeMap<String, Served> {
        BTreeMap::from([("default".to_string(), s)])
    }

    fn vms(_: &str) -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn a_moved_nbd_port_names_the_old_and_new_address_and_the_vms() {
        let before = one(served(&[], &["127.0.0.1:10899"]));
        let now = one(served(&[], &["127.0.0.1:10900"]));
        assert_eq!(
            moved(&before, &now, vms),
            ["export point default: NBD was served on 127.0.0.1:10899, now on 127.0.0.1:10900: clients attached to 127.0.0.1:10899 (VMs a, b) must reattach"]
        );
    }

    #[test]
    fn a_frontend_turned_off_is_not_served_and_both_share_one_line() {
        let before = one(served(&["127.0.0.1:2049"], &["127.0.0.1:10809"]));
        let now = one(served(&[], &["127.0.0.1:10810"]));
        assert_eq!(
            moved(&before, &now, vms),
            ["export point default: NFS was served on 127.0.0.1:2049, not served; NBD was served on 127.0.0.1:10809, now on 127.0.0.1:10810: clients attached to 127.0.0.1:2049 127.0.0.1:10809 (VMs a, b) must reattach"]
        );
    }

    #[test]
    fn nothing_is_said_when_nothing_moved_nothing_was_resumed_or_the_point_is_new() {
        let s = served(&["127.0.0.1:2049"], &["127.0.0.1:10809", "unix:/n.sock"]);
        // The same addresses in another order; one more address.
        let reordered = served(&["127.0.0.1:2049"], &["unix:/n.sock", "127.0.0.1:10809"]);
        assert!(moved(&one(s.clone()), &one(reordered), vms).is_empty());
        let more = served(
            &["127.0.0.1:2049"],
            &["127.0.0.1:10809", "unix:/n.sock", "x:1"],
        );
        assert!(moved(&one(s.clone()), &one(more), vms).is_empty());
        // Moved, but no session was resumed there.
        let other = one(served(&[], &["127.0.0.1:1"]));
        assert!(moved(&one(s.clone()), &other, |_| vec![]).is_empty());
        // A point the previous daemon did not have.
        let new_point = BTreeMap::from([("b".to_string(), served(&[], &["127.0.0.1:1"]))]);
        assert!(moved(&one(s), &new_point, vms).is_empty());
    }
}
