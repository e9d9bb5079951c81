//! Frontends that export recovered disks, side by side: FUSE (files on a
//! local mount), and for hypervisors NFSv3 and NBD. Each maps its own
//! handles (inode numbers, NFS file handles, NBD export names) onto the
//! sessions of the [`Datastore`] and the
//! frontend-agnostic [`Disk`](crate::disk::Disk) API, and none reaches
//! into another.
//!
//! | frontend | handle | flush / durability | counts as an open handle |
//! |---|---|---|---|
//! | FUSE | inode numbers, per session serial | fsync, fdatasync, close (flush) = `Disk::flush` | each open file |
//! | NFSv3 | stable handles (VM, backup, object) | FILE_SYNC/DATA_SYNC writes and COMMIT = `Disk::flush`; UNSTABLE answered UNSTABLE | each TCP connection that used a VM's files |
//! | NBD | export name `vm/diskN` | FLUSH and FUA = `Disk::flush` | each connection with an export open |

pub mod fuse;
pub mod nbd;
pub mod nfs;

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::error::{Error, Result};
use crate::placement::ExportPoint;
use crate::session::Datastore;

/// TCP keepalive for a listener of a network frontend, inherited by its
/// connections: a client host that vanished without closing (a hypervisor
/// powered off, a cable pulled) is dropped after about six minutes of
/// silence (2 min idle, then 8 probes 30 s apart), so its connection stops
/// holding the VM's disks open (`release` refuses while it does). The
/// kernel's defaults (2 h, then 9 probes 75 s apart) kept them for over 2
/// hours (explore5 M2); much less would end idle NBD connections across a
/// short network partition (a switch reboot), failing a client without
/// `reconnect-delay` at its next request.
pub fn keep_alive(socket: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(socket, sockopt::KeepAlive, &true)?;
    setsockopt(socket, sockopt::TcpKeepIdle, &120)?;
    setsockopt(socket, sockopt::TcpKeepInterval, &30)?;
    setsockopt(socket, sockopt::TcpKeepCount, &8)?;
    Ok(())
}

/// The default client networks of the network frontends: this host only.
pub fn loopback_only() -> Vec<IpNet> {
    vec![
        "127.0.0.0/8".parse().expect("a network"),
        "::1/128".parse().expect("a network"),
    ]
}

/// Whether a client at `ip` is in the allowed networks (`--allow`; NFS
/// and NBD over TCP check it the same way). An IPv4 client on a dual-stack
/// socket shows as `::ffff:a.b.c.d` and is matched as `a.b.c.d`.
pub fn allows(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// The disks of one export point as NBD exports: `vm/diskN` for every
/// disk of every session served there. An open export holds its session
/// open (an attachment), so `release` refuses while a client has it.
pub struct DiskExports {
    pub ds: Arc<Datastore>,
    pub point: Arc<ExportPoint>,
}

/// An NBD connection's hold on its session (`release` refuses while it
/// lasts).
struct NbdHold(crate::session::Attachment);

impl nbd::OpenGuard for NbdHold {
    /// A client that changes the disk is the VM's attach over NBD
    /// (`Session::attached`): it clears the VM's NBD clients stranded on an
    /// address a restart left. A reader (`nbdcopy` from the disk, plain
    /// `nbdinfo`) reaches transmission too, but is no sign that the VM's
    /// hypervisor came back (fixm2's finding), as an NFS read is not.
    fn on_first_change(&self) -> Option<nbd::FirstChange> {
        let s = self.0.session().clone();
        Some(Box::new(move || s.attached(crate::session::Frontend::Nbd)))
    }
}

impl nbd::Exports for DiskExports {
    fn connected(&self, peer: std::net::IpAddr) -> Option<Box<dyn std::any::Any + Send>> {
        Some(Box::new(self.point.connected(peer)))
    }

    fn list(&self) -> Vec<(String, String)> {
        self.ds
            .sessions_at(self.point.name())
            .iter()
            .flat_map(|s| {
                s.disks.iter().map(move |d| {
                    (
                        format!("{}/disk{}", s.vm, d.index),
                        format!(
                            "disk{} of VM {} (backup {}), {} bytes",
                            d.index, s.vm, s.backup, d.size
                        ),
                    )
                })
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<(Arc<dyn crate::disk::Disk>, Box<dyn nbd::OpenGuard>)> {
        self.open_by(name, "an unnamed client")
    }

    /// The client goes to transmission: it holds the session open, and its
    /// first change of the disk is the VM's attach over NBD
    /// (`NbdHold::on_first_change`).
    fn open_by(
        &self,
        name: &str,
        peer: &str,
    ) -> Result<(Arc<dyn crate::disk::Disk>, Box<dyn nbd::OpenGuard>)> {
        let (s, d) = self.resolve(name)?;
        let held = (s.hold(crate::session::Holder::nbd(d.index, peer)))
            .ok_or_else(|| Error::not_found(format!("VM {} is being released", s.vm)))?;
        Ok((d, Box::new(NbdHold(held))))
    }

    /// NBD_OPT_INFO: no attach (review30 M2), so a VM's clients stranded
    /// on an address a restart left stay named.
    fn look(&self, name: &str, peer: &str) -> Result<Arc<dyn crate::disk::Disk>> {
        let (s, d) = self.resolve(name)?;
        (s.hold(crate::session::Holder::nbd(d.index, peer)))
            .ok_or_else(|| Error::not_found(format!("VM {} is being released", s.vm)))?;
        Ok(d)
    }

    fn elsewhere(&self, name: &str) -> Option<String> {
        let vm = name.split_once('/').map_or(name, |(vm, _)| vm);
        let s = self.ds.session(vm)?;
        let point = s.point.name();
        if point == self.point.name() {
            return None;
        }
        let urls: Vec<String> = (0..s.disks.len())
            .flat_map(|i| self.ds.disk_urls(&s, i))
            .filter(|u| u.starts_with("nbd"))
            .collect();
        Some(if urls.is_empty() {
            format!("VM {vm} is served at export point {point}, which has no NBD server")
        } else {
            format!(
                "VM {vm} is served at export point {point}: {}",
                urls.join(" ")
            )
        })
    }
}

impl DiskExports {
    /// The session and disk export `name` (`vm/diskN`) names here.
    fn resolve(
        &self,
        name: &str,
    ) -> Result<(Arc<crate::session::Session>, Arc<crate::volume::Volume>)> {
        let unknown = || {
            Error::not_found(format!(
                "no export {name:?}: expected VM/diskN of a VM being recovered"
            ))
        };
        let (vm, disk) = name.split_once('/').ok_or_else(unknown)?;
        let index: usize = disk
            .strip_prefix("disk")
            .and_then(|n| n.parse().ok())
            .filter(|i| disk == format!("disk{i}"))
            .ok_or_else(unknown)?;
        let s = self
            .ds
            .session_at(vm, self.point.name())
            .ok_or_else(unknown)?;
        let d = s.disks.get(index).cloned().ok_or_else(unknown)?;
        Ok((s, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_client_addresses_are_allowed() {
        let l = loopback_only();
        assert!(allows(&l, "127.0.0.1".parse().unwrap()));
        assert!(allows(&l, "::1".parse().unwrap()));
        assert!(allows(&l, "::ffff:127.0.0.9".parse().unwrap()));
        assert!(!allows(&l, "198.18.0.2".parse().unwrap()));
        assert!(!allows(&l, "::ffff:198.18.0.2".parse().unwrap()));
        let net = vec!["198.18.0.0/15".parse().unwrap()];
        assert!(allows(&net, "198.19.3.4".parse().unwrap()));
        assert!(!allows(&net, "127.0.0.1".parse().unwrap()));
    }
}
