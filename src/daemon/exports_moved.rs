//! A restart that serves an export point's NFS or NBD on other addresses
//! than before (another `--nbd`/`--nfs`, an export point's address
//! changed, a frontend turned off) strands the clients attached to the
//! old ones: QEMU's NBD reconnect and libnfs keep trying the old port
//! (explore9 M6). `serve` compares with where the clients of each VM
//! resumed at a point last attached (`staging::last_exports`: where the
//! previous daemon of its staging served, or, if a restart already
//! stranded them, where they were stranded from) and names, per export
//! point, the VMs whose clients must reattach: in the log at every start
//! that finds them stranded, and in `status` until their sessions are
//! released, a restart serves the old address again, or they reattach
//! (fixstatus 2: a second restart on the new address said nothing, and
//! only the log said it once). A VM's clients over NFS (or NBD)
//! reattached when NFS (NBD) attaches to its session after the restart
//! (`Session::attached`; this daemon serves only the new addresses):
//! `status` leaves them out at once, the record drops them at that attach
//! and again at the stop (fixviews 1: a client reattached by hand was
//! named at every restart until the session was released). An attach is
//! what a hypervisor does: a client writing a disk, over NBD (WRITE,
//! WRITE_ZEROES, TRIM: `export::DiskExports`) or NFS (see
//! `export::nfs::proto::Conn` for why not a read); not `nbdinfo --list`,
//! an NBD_OPT_INFO, an admin's `nfs-cat`, an `nbdcopy` from the disk
//! (review30 M2 and fixm2: each of them cleared the VM). And per frontend: a VM stranded on both stays stranded
//! on NBD when NFS reattaches, and the other way round.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::session::{Datastore, Frontend, Session};
use crate::staging::last_exports::{self, Last, Reached, Served, Stranded};

/// Warns (one line per export point and group of VMs) where resumed
/// sessions' clients are stranded, then records `now` and them for the
/// next start and for `status`, and drops a VM from the record when its
/// session is released or its clients reattach. Never fails `serve`.
pub(super) fn check_and_record(root: &Path, ds: &Datastore, now: &BTreeMap<String, Served>) {
    let since = crate::util::rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    // A frontend that reached a VM already (they serve before this) has
    // no clients of it stranded.
    let vms_at = |point: &str| -> Vec<(String, Reached)> {
        (ds.sessions_at(point).iter())
            .map(|s| (s.vm.clone(), s.network_reached()))
            .collect()
    };
    let found = match last_exports::read(root) {
        Some(before) => strand(&before, now, vms_at, &since),
        None => BTreeMap::new(),
    };
    for line in lines(now, &found) {
        tracing::warn!("{line}");
    }
    let stranded: last_exports::StrandedAt = (found.into_iter())
        .map(|(point, vms)| {
            (
                point,
                vms.into_iter().map(|(vm, (_, s, _))| (vm, s)).collect(),
            )
        })
        .collect();
    let last = Last {
        points: now.clone(),
        stranded,
    };
    if let Err(e) = last_exports::write(root, &last) {
        tracing::warn!("could not record the export addresses in the staging directory (a later daemon there on other addresses will not say which clients must reattach): {e}");
    }
    // Hooked after the record is written, so the first attach over a
    // frontend drops its clients from this record; one that came before
    // the hook is done here.
    for (point, vms) in &last.stranded {
        for s in ds.sessions_at(point) {
            let Some(stranded) = vms.get(&s.vm) else {
                continue;
            };
            for (via, addrs) in [
                (Frontend::Nfs, &stranded.nfs),
                (Frontend::Nbd, &stranded.nbd),
            ] {
                if addrs.is_empty() {
                    continue;
                }
                let r = root.to_path_buf();
                let hook = Box::new(move |s: &Session| reattached(&r, &s.vm, via));
                if !s.on_network_attach(via, hook) {
                    reattached(root, &s.vm, via);
                }
            }
        }
    }
    let root = root.to_path_buf();
    ds.add_on_release(Box::new(move |s| {
        if let Err(e) = last_exports::forget_vm(&root, &s.vm) {
            tracing::warn!(vm = %s.vm, "could not drop the released VM from the record of stranded clients (status may name it until the next restart): {e}");
        }
    }));
}

/// Frontend `via` attached to VM `vm` since this start: its clients over
/// it are no longer stranded; dropped from the record.
fn reattached(root: &Path, vm: &str, via: Frontend) {
    tracing::info!(vm, "a client attached to the VM over {via}: its {via} clients are no longer taken to be stranded on an address a restart left");
    let only = Reached {
        nfs: via == Frontend::Nfs,
        nbd: via == Frontend::Nbd,
    };
    if let Err(e) = last_exports::forget_reached(root, vm, only) {
        tracing::warn!(vm, "could not drop the reattached VM's {via} clients from the record of stranded clients (tried again at the stop; a restart before it names them again): {e}");
    }
}

/// At the stop (no frontend attaches any more): drops the clients of the
/// frontends that attached from the record, for a record write at the
/// attach that failed.
pub(super) fn at_stop(root: &Path, ds: &Datastore) {
    for s in ds.sessions().iter() {
        let r = s.network_reached();
        if r == Reached::default() {
            continue;
        }
        if let Err(e) = last_exports::forget_reached(root, &s.vm, r) {
            tracing::warn!(vm = %s.vm, "could not drop the reattached VM's clients from the record of stranded clients (the next start names them again): {e}");
        }
    }
}

/// Per export point, per VM resumed there (`vms_at`) whose clients are
/// stranded now: where they last attached (per frontend), and what of it
/// is not served now (with when that began). A point the previous daemon
/// did not have strands no one.
fn strand(
    before: &Last,
    now: &BTreeMap<String, Served>,
    vms_at: impl Fn(&str) -> Vec<(String, Reached)>,
    since: &str,
) -> Found {
    let mut out = Found::new();
    for (point, served) in now {
        let Some(prev) = before.points.get(point) else {
            continue;
        };
        for (vm, reached) in vms_at(point) {
            let was = before.stranded.get(point).and_then(|vms| vms.get(&vm));
            // Stranded by a restart before: still there, as far as anyone
            // can tell; else where the previous daemon served.
            let last = |stranded: Option<&Vec<String>>, served: &Vec<String>| {
                stranded.filter(|a| !a.is_empty()).unwrap_or(served).clone()
            };
            let clients = Served {
                nfs: last(was.map(|w| &w.nfs), &prev.nfs),
                nbd: last(was.map(|w| &w.nbd), &prev.nbd),
            };
            let gone = |old: &Vec<String>, new: &Vec<String>| -> Vec<String> {
                let kept: BTreeSet<&String> = new.iter().collect();
                old.iter().filter(|a| !kept.contains(a)).cloned().collect()
            };
            // Those of a frontend that reached it already are not.
            let gone = |old, new, reached: bool| match reached {
                true => vec![],
                false => gone(old, new),
            };
            let (nfs, nbd) = (
                gone(&clients.nfs, &served.nfs, reached.nfs),
                gone(&clients.nbd, &served.nbd, reached.nbd),
            );
            if nfs.is_empty() && nbd.is_empty() {
                continue;
            }
            let (since, carried) = match was {
                Some(w) if (&w.nfs, &w.nbd) == (&nfs, &nbd) => (w.since.clone(), true),
                _ => (since.to_string(), false),
            };
            let s = Stranded { nfs, nbd, since };
            out.entry(point.clone())
                .or_default()
                .insert(vm, (clients, s, carried));
        }
    }
    out
}

/// Per export point, per VM: where its clients last attached, what of it
/// is stranded, and whether an earlier restart stranded them so.
type Found = BTreeMap<String, BTreeMap<String, (Served, Stranded, bool)>>;

/// The log's warning per export point and group of VMs stranded alike
/// (saying since when if an earlier restart stranded them: not by its
/// time, which a restart within the same second shares).
fn lines(now: &BTreeMap<String, Served>, found: &Found) -> Vec<String> {
    let mut lines = vec![];
    for (point, vms) in found {
        let served = now.get(point).cloned().unwrap_or_default();
        let mut groups: Vec<(&Served, &Stranded, bool, Vec<&str>)> = vec![];
        for (vm, (clients, s, carried)) in vms {
            let same = |(c, g, k, _): &&mut (&Served, &Stranded, bool, Vec<&str>)| {
                (*c, *g, *k) == (clients, s, *carried)
            };
            match groups.iter_mut().find(same) {
                Some((_, _, _, v)) => v.push(vm),
                None => groups.push((clients, s, *carried, vec![vm])),
            }
        }
        for (clients, s, carried, vms) in groups {
            let mut parts = vec![];
            for (what, old, new, gone) in [
                ("NFS", &clients.nfs, &served.nfs, &s.nfs),
                ("NBD", &clients.nbd, &served.nbd, &s.nbd),
            ] {
                if gone.is_empty() {
                    continue;
                }
                let now = match new.is_empty() {
                    true => "not served".to_string(),
                    false => format!("now on {}", join(new.iter())),
                };
                parts.push(format!("{what} was served on {}, {now}", join(old.iter())));
            }
            let stranded = s.nfs.iter().chain(&s.nbd);
            lines.push(format!(
                "export point {point}: {}: clients attached to {} (VMs {}) must reattach{}",
                parts.join("; "),
                join(stranded),
                vms.join(", "),
                match carried {
                    false => String::new(),
                    true => format!(" (stranded since the restart at {})", s.since),
                }
            ));
        }
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

    fn vms(_: &str) -> Vec<(String, Reached)> {
        at(&["a", "b"])
    }

    /// VMs `vms` resumed, no frontend reached since.
    fn at(vms: &[&str]) -> Vec<(String, Reached)> {
        (vms.iter())
            .map(|v| (v.to_string(), Reached::default()))
            .collect()
    }

    /// The log's lines of a start on `now` after one on `before`.
    fn moved(
        before: &BTreeMap<String, Served>,
        now: &BTreeMap<String, Served>,
        vms_at: impl Fn(&str) -> Vec<(String, Reached)>,
    ) -> Vec<String> {
        let last = Last {
            points: before.clone(),
            stranded: BTreeMap::new(),
        };
        lines(now, &strand(&last, now, vms_at, "T1"))
    }

    /// The record a start on `now` after `before` writes, and its lines.
    fn start(
        before: &Last,
        now: &BTreeMap<String, Served>,
        vms_at: impl Fn(&str) -> Vec<(String, Reached)>,
        since: &str,
    ) -> (Last, Vec<String>) {
        let found = strand(before, now, vms_at, since);
        let lines = lines(now, &found);
        let stranded = (found.into_iter())
            .map(|(p, vms)| (p, vms.into_iter().map(|(vm, (_, s, _))| (vm, s)).collect()))
            .collect();
        let last = Last {
            points: now.clone(),
            stranded,
        };
        (last, lines)
    }

    /// fixstatus 2: the second restart on the new address said nothing,
    /// though the clients were never seen to reattach.
    #[test]
    fn stranded_clients_are_named_at_every_restart_until_the_old_address_is_served_again() {
        let (a, b) = ("127.0.0.1:10899", "127.0.0.1:10900");
        let first = Last {
            points: one(served(&["127.0.0.1:2049"], &[a])),
            stranded: BTreeMap::new(),
        };
        let on_b = one(served(&["127.0.0.1:2049"], &[b]));
        let (second, said) = start(&first, &on_b, vms, "T1");
        assert_eq!(
            said,
            [format!("export point default: NBD was served on {a}, now on {b}: clients attached to {a} (VMs a, b) must reattach")]
        );
        // Recorded: NBD only, NFS did not move.
        let s = &second.stranded["default"]["a"];
        assert_eq!(
            (s.nfs.len(), s.nbd.as_slice(), s.since.as_str()),
            (0, [a.to_string()].as_slice(), "T1")
        );
        // B again: still stranded on A, since the first restart; a VM
        // released meanwhile (not resumed) is not named.
        let only_a = |_: &str| at(&["a"]);
        let (third, said) = start(&second, &on_b, only_a, "T2");
        assert_eq!(
            said,
            [format!("export point default: NBD was served on {a}, now on {b}: clients attached to {a} (VMs a) must reattach (stranded since the restart at T1)")]
        );
        assert_eq!(third.stranded["default"].len(), 1);
        assert_eq!(third.stranded["default"]["a"].since, "T1");
        // A third address: still A's clients, now stranded anew.
        let on_c = one(served(&["127.0.0.1:2049"], &["127.0.0.1:10901"]));
        let (fourth, said) = start(&third, &on_c, only_a, "T3");
        assert!(
            said[0].contains(&format!("clients attached to {a} (VMs a)")),
            "{said:?}"
        );
        assert_eq!(fourth.stranded["default"]["a"].nbd, [a]);
        // Back on A: they reattach by themselves; nothing said or kept.
        let on_a = one(served(&["127.0.0.1:2049"], &[a]));
        let (fifth, said) = start(&fourth, &on_a, only_a, "T4");
        assert!(said.is_empty() && fifth.stranded.is_empty(), "{said:?}");
        // And a VM recovered on B whose daemon restarts on C is named
        // for B, beside one still stranded from A.
        let (sixth, _) = start(&fourth, &on_c, |_| at(&["a", "n"]), "T5");
        assert_eq!(sixth.stranded["default"]["a"].nbd, [a]);
        assert!(
            !sixth.stranded["default"].contains_key("n"),
            "n was recovered on C"
        );
        let on_b_again = Last {
            points: on_b.clone(),
            stranded: sixth.stranded.clone(),
        };
        let (_, said) = start(&on_b_again, &on_c, |_| at(&["a", "n"]), "T6");
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said.iter()
                .any(|l| l.contains(&format!("clients attached to {b} (VMs n)"))),
            "{said:?}"
        );
    }

    /// A second restart within the same second (the same `since`) said
    /// nothing of the earlier one: "since" was told by the time alone.
    #[test]
    fn a_restart_in_the_same_second_still_says_an_earlier_one_stranded_them() {
        let (a, b) = ("127.0.0.1:10899", "127.0.0.1:10900");
        let first = Last {
            points: one(served(&[], &[a])),
            stranded: BTreeMap::new(),
        };
        let on_b = one(served(&[], &[b]));
        let (second, said) = start(&first, &on_b, vms, "T1");
        assert!(!said[0].contains("stranded since"), "{said:?}");
        let (_, said) = start(&second, &on_b, vms, "T1");
        assert!(
            said[0].ends_with("must reattach (stranded since the restart at T1)"),
            "{said:?}"
        );
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
