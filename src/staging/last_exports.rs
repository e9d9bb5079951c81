//! Where the daemon of a staging directory last served each export
//! point's network frontends (`exports.json`, main staging only, written
//! once they all listen), and which resumed VMs' clients a restart left
//! attached to addresses no longer served. A restart on other addresses
//! strands the clients attached to the old ones (QEMU's NBD reconnect,
//! libnfs retry the old port): with this record the next `serve` names
//! them (`daemon::exports_moved`, explore9 M6), and `status` shows them
//! for as long as the record says they are stranded (fixstatus 2):
//!
//! * A VM's clients are taken to be attached where its point last served,
//!   or, if a restart stranded them, still where they were stranded from:
//!   a daemon does not see which address a client reached it on, so a
//!   second restart on the new address names them again (it said nothing
//!   before), and one back on the old address clears them.
//! * A VM drops out when its session is released ([`forget_vm`]) or is not
//!   resumed at that point by a restart; its clients over one frontend
//!   when they reattach: that frontend attaches to it since the restart
//!   ([`forget_reached`] at that first attach, again at the stop; `status`
//!   leaves them out at once, fixviews 1), and the VM with the last of
//!   them. An attach is what a hypervisor does, not a look (review30 M2:
//!   an NBD client in transmission, an NFS client's write to a disk; see
//!   `export::nfs::proto::Conn`), and one frontend's attach leaves the
//!   other's clients stranded.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::last_mount::{read_record, write_record};
use crate::error::Result;

const FILE: &str = "exports.json";

/// One export point's listen addresses: NFS as `IP:PORT`, NBD as the
/// bound `IP:PORT` or `unix:PATH`. Empty: that frontend was not served.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    #[serde(default)]
    pub nfs: Vec<String>,
    #[serde(default)]
    pub nbd: Vec<String>,
}

/// A resumed VM whose clients a restart left behind: per frontend, the
/// addresses they last attached to that are not served now (empty: that
/// frontend's clients are not stranded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stranded {
    #[serde(default)]
    pub nfs: Vec<String>,
    #[serde(default)]
    pub nbd: Vec<String>,
    /// The restart that stranded them (RFC 3339).
    pub since: String,
}

impl Stranded {
    /// What stays stranded once the frontends `reached` attached; `None`
    /// if nothing does.
    pub fn without(&self, reached: Reached) -> Option<Stranded> {
        let keep = |a: &Vec<String>, gone: bool| if gone { vec![] } else { a.clone() };
        let s = Stranded {
            nfs: keep(&self.nfs, reached.nfs),
            nbd: keep(&self.nbd, reached.nbd),
            since: self.since.clone(),
        };
        (!s.nfs.is_empty() || !s.nbd.is_empty()).then_some(s)
    }
}

/// Which frontends attached to a VM since this start: its clients over
/// them are not stranded (the others' may still be, review30 M2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reached {
    pub nfs: bool,
    pub nbd: bool,
}

/// Per export point, per VM: its stranded clients.
pub type StrandedAt = BTreeMap<String, BTreeMap<String, Stranded>>;

/// What `exports.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Last {
    pub points: BTreeMap<String, Served>,
    pub stranded: StrandedAt,
}

#[derive(Serialize, Deserialize)]
struct Record {
    points: BTreeMap<String, Served>,
    pid: u32,
    /// Absent in records from before it (and when none is stranded);
    /// ignored by daemons from before it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    stranded: StrandedAt,
}

/// Serialises this process's read-modify-writes of a record (a start and
/// releases).
static RECORD: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// The record of staging `root`, if one can be read.
pub fn read(root: &Path) -> Option<Last> {
    read_record::<Record>(root, FILE).map(|r| Last {
        points: r.points,
        stranded: r.stranded,
    })
}

/// Records `last` as where this process serves and whose clients are
/// stranded (atomically: temp, fsync, rename, fsync of the directory).
pub fn write(root: &Path, last: &Last) -> Result<()> {
    let _one = RECORD.lock();
    write_unlocked(root, last)
}

fn write_unlocked(root: &Path, last: &Last) -> Result<()> {
    let r = Record {
        points: last.points.clone(),
        pid: std::process::id(),
        stranded: last.stranded.clone(),
    };
    write_record(root, FILE, &r)
}

/// VM `vm`'s session was released: its clients are no one's concern any
/// more. Rewrites the record only if it names the VM.
pub fn forget_vm(root: &Path, vm: &str) -> Result<()> {
    forget_vms(root, |v| v == vm)
}

/// Drops the VMs `gone` says (released, or their clients reattached: a
/// network attach since the restart, fixviews 1) from the stranded
/// clients. Rewrites the record (atomically) only if it names one.
pub fn forget_vms(root: &Path, gone: impl Fn(&str) -> bool) -> Result<()> {
    let _one = RECORD.lock();
    let Some(mut last) = read(root) else {
        return Ok(());
    };
    let mut named = false;
    for vms in last.stranded.values_mut() {
        let before = vms.len();
        vms.retain(|vm, _| !gone(vm));
        named |= vms.len() != before;
    }
    if !named {
        return Ok(());
    }
    last.stranded.retain(|_, vms| !vms.is_empty());
    write_unlocked(root, &last)
}

/// VM `vm`'s clients over the frontends `reached` reattached: dropped
/// from its stranded clients (the VM with the last of them). Rewrites the
/// record (atomically) only if that changes it.
pub fn forget_reached(root: &Path, vm: &str, reached: Reached) -> Result<()> {
    let _one = RECORD.lock();
    let Some(mut last) = read(root) else {
        return Ok(());
    };
    let mut changed = false;
    for vms in last.stranded.values_mut() {
        let Some(s) = vms.get(vm) else {
            continue;
        };
        match s.without(reached) {
            Some(left) if left == *s => continue,
            Some(left) => vms.insert(vm.to_string(), left),
            None => vms.remove(vm),
        };
        changed = true;
    }
    if !changed {
        return Ok(());
    }
    last.stranded.retain(|_, vms| !vms.is_empty());
    write_unlocked(root, &last)
}

/// One group of stranded clients as `status` shows it: an export point's
/// VMs stranded from the same addresses by the same restart.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Moved {
    pub export_point: String,
    /// The addresses the clients last attached to, and where the point
    /// serves now (per frontend; empty: not served).
    pub nfs_from: Vec<String>,
    pub nfs_now: Vec<String>,
    pub nbd_from: Vec<String>,
    pub nbd_now: Vec<String>,
    pub vms: Vec<String>,
    /// The restart that stranded them (RFC 3339).
    pub since: String,
    /// The one line to show.
    pub warning: String,
}

/// The stranded clients the record of `root` names, of VMs `served_at`
/// a point now (a session released since is left out), but for the
/// frontends that reached each since this start.
pub fn moved(root: &Path, served_at: impl Fn(&str) -> Vec<(String, Reached)>) -> Vec<Moved> {
    let Some(last) = read(root) else {
        return vec![];
    };
    let mut out: Vec<Moved> = vec![];
    for (point, vms) in &last.stranded {
        let now = last.points.get(point).cloned().unwrap_or_default();
        let serving: BTreeMap<String, Reached> = served_at(point).into_iter().collect();
        let left = (vms.iter()).filter_map(|(vm, s)| Some((vm, s.without(*serving.get(vm)?)?)));
        for (vm, s) in left {
            let same = |m: &&mut Moved| {
                m.export_point == *point
                    && (&m.nfs_from, &m.nbd_from, &m.since) == (&s.nfs, &s.nbd, &s.since)
            };
            match out.iter_mut().find(same) {
                Some(m) => m.vms.push(vm.clone()),
                None => out.push(Moved {
                    export_point: point.clone(),
                    nfs_from: s.nfs.clone(),
                    nfs_now: now.nfs.clone(),
                    nbd_from: s.nbd.clone(),
                    nbd_now: now.nbd.clone(),
                    vms: vec![vm.clone()],
                    since: s.since.clone(),
                    warning: String::new(),
                }),
            }
        }
    }
    for m in &mut out {
        m.warning = warning(m);
    }
    out
}

/// "export point P: NBD moved from A to B at the restart at T: clients of
/// VMs x, y must reattach".
fn warning(m: &Moved) -> String {
    let mut parts = vec![];
    for (what, from, now) in [
        ("NFS", &m.nfs_from, &m.nfs_now),
        ("NBD", &m.nbd_from, &m.nbd_now),
    ] {
        if from.is_empty() {
            continue;
        }
        parts.push(match now.is_empty() {
            true => format!("{what} on {} is no longer served", from.join(" ")),
            false => format!("{what} moved from {} to {}", from.join(" "), now.join(" ")),
        });
    }
    format!(
        "export point {}: {} at the restart at {}: clients of VMs {} must reattach (shown until \
         they reattach, their sessions are released or a restart serves the old address again)",
        m.export_point,
        parts.join("; "),
        m.since,
        m.vms.join(", ")
    )
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

    fn none() -> Reached {
        Reached::default()
    }

    #[test]
    fn recorded_exports_read_back_and_a_damaged_record_is_none() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()), None);
        let mut last = Last::default();
        last.points.insert(
            "default".to_string(),
            served(
                &["127.0.0.1:2049"],
                &["127.0.0.1:10809", "unix:/run/n.sock"],
            ),
        );
        write(d.path(), &last).unwrap();
        assert_eq!(read(d.path()), Some(last.clone()));
        // As a daemon from before stranded clients wrote it.
        let old = r#"{"points": {"default": {"nfs": ["127.0.0.1:2049"], "nbd": ["127.0.0.1:10809", "unix:/run/n.sock"]}}, "pid": 7}"#;
        std::fs::write(d.path().join(FILE), old).unwrap();
        assert_eq!(read(d.path()), Some(last));
        std::fs::write(d.path().join(FILE), b"{not json").unwrap();
        assert_eq!(read(d.path()), None);
    }

    #[test]
    fn stranded_clients_show_per_point_until_their_session_is_released() {
        let d = tempfile::tempdir().unwrap();
        let mut last = Last::default();
        last.points
            .insert("default".into(), served(&[], &["127.0.0.1:10900"]));
        let s = Stranded {
            nbd: vec!["127.0.0.1:10899".into()],
            since: "2026-11-24T22:00:00Z".into(),
            ..Stranded::default()
        };
        last.stranded.insert(
            "default".into(),
            BTreeMap::from([("a".into(), s.clone()), ("b".into(), s)]),
        );
        write(d.path(), &last).unwrap();
        let both = |_: &str| vec![("a".to_string(), none()), ("b".to_string(), none())];
        let m = moved(d.path(), both);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(
            m[0].warning,
            "export point default: NBD moved from 127.0.0.1:10899 to 127.0.0.1:10900 at the \
             restart at 2026-11-24T22:00:00Z: clients of VMs a, b must reattach (shown until \
             they reattach, their sessions are released or a restart serves the old address \
             again)"
        );
        // Released: left out at once, then dropped from the record.
        assert_eq!(
            moved(d.path(), |_| vec![("b".into(), none())])[0].vms,
            ["b"]
        );
        forget_vm(d.path(), "a").unwrap();
        assert_eq!(moved(d.path(), both)[0].vms, ["b"]);
        forget_vm(d.path(), "b").unwrap();
        assert!(moved(d.path(), both).is_empty());
        assert!(read(d.path()).unwrap().stranded.is_empty());
        assert_eq!(read(d.path()).unwrap().points, last.points);
    }

    /// review30 M2: a VM stranded on NFS and NBD whose NBD client
    /// reattached is still stranded on NFS, in `status` and the record.
    #[test]
    fn one_frontend_reattached_leaves_the_others_clients_stranded() {
        let d = tempfile::tempdir().unwrap();
        let mut last = Last::default();
        last.points.insert(
            "default".into(),
            served(&["127.0.0.2:2049"], &["127.0.0.2:10900"]),
        );
        let s = Stranded {
            nfs: vec!["127.0.0.1:2049".into()],
            nbd: vec!["127.0.0.1:10899".into()],
            since: "T1".into(),
        };
        last.stranded
            .insert("default".into(), BTreeMap::from([("a".into(), s)]));
        write(d.path(), &last).unwrap();
        let nbd = Reached {
            nfs: false,
            nbd: true,
        };
        let m = moved(d.path(), |_| vec![("a".into(), nbd)]);
        assert_eq!((m.len(), m[0].nbd_from.len()), (1, 0), "{m:?}");
        assert_eq!(m[0].nfs_from, ["127.0.0.1:2049"]);
        assert!(!m[0].warning.contains("NBD"), "{}", m[0].warning);
        forget_reached(d.path(), "a", nbd).unwrap();
        let left = &read(d.path()).unwrap().stranded["default"]["a"];
        assert_eq!((left.nfs.len(), left.nbd.len()), (1, 0));
        assert_eq!(
            moved(d.path(), |_| vec![("a".into(), none())])[0]
                .nfs_from
                .len(),
            1
        );
        let nfs = Reached {
            nfs: true,
            nbd: false,
        };
        forget_reached(d.path(), "a", nfs).unwrap();
        assert!(read(d.path()).unwrap().stranded.is_empty());
    }
}
