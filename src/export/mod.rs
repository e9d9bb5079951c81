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

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::placement::ExportPoint;
use crate::session::Datastore;

/// The disks of one export point as NBD exports: `vm/diskN` for every
/// disk of every session served there. An open export holds its session
/// open (an attachment), so `release` refuses while a client has it.
pub struct DiskExports {
    pub ds: Arc<Datastore>,
    pub point: Arc<ExportPoint>,
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

    fn open(
        &self,
        name: &str,
    ) -> Result<(
        Arc<dyn crate::disk::Disk>,
        Box<dyn std::any::Any + Send + Sync>,
    )> {
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
        let held = s
            .attach()
            .ok_or_else(|| Error::not_found(format!("VM {vm} is being released")))?;
        Ok((d, Box::new(held)))
    }
}
