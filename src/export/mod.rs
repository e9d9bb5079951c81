//! Frontends that export recovered disks, side by side: FUSE (files on a
//! local mount), and for hypervisors NFSv3 and NBD. Each maps its own
//! handles (inode numbers, NFS file handles, NBD export names) onto the
//! sessions of the [`Datastore`](crate::session::Datastore) and the
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
