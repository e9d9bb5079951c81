//! Serving a FUSE connection a dead daemon left with the keeper.
//!
//! fuser 0.18 can wrap an existing device fd (`Session::from_fd`), but it
//! first waits for the kernel's INIT, which the kernel sent once, to the
//! dead daemon. We cannot patch fuser here, so we build on what it has:
//! the session is made over one end of a `SOCK_SEQPACKET` socket pair
//! (one datagram per FUSE message, as on the device), to which we write an
//! INIT carrying the kernel's original parameters (kept by the keeper).
//! fuser answers it; the answer is read and dropped (the kernel already
//! has the one it negotiated). Then the socket's fd number is made to
//! denote the device (`dup2`), before fuser's loop reads anything, so the
//! loop serves the kernel directly, with no copy in between.
//!
//! The same path makes the daemon's other event threads' sessions: each
//! reads its own clone of the device file (`clone_device`), whose INIT
//! the kernel never sends either.
//!
//! Before any session reads, `FUSE_NOTIFY_RESEND` (Linux 6.9+) moves the requests the dead
//! daemon had read but not answered back to the kernel's pending queue,
//! marked as resent: the new daemon answers them like any other. Every
//! request the daemon serves is safe to serve twice: reads and writes of
//! a block are idempotent, a resent open makes one more handle (closed
//! by its release), a resent release or flush of an old handle is a no-op.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use super::keeper::InitParams;
use crate::error::{Error, Result};

const FUSE_INIT: u32 = 26;
const FUSE_NOTIFY_RESEND: i32 = 7;
const IN_HEADER: usize = 40;
const INIT_IN: usize = 64;
/// `_IOR(229, 0, uint32_t)`: makes an open /dev/fuse file another device
/// file of the connection whose device fd it is given.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = (2 << 30) | (4 << 16) | (229 << 8);

/// The INIT request the kernel would send with `p`.
pub fn init_request(p: &InitParams, max_readahead: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(IN_HEADER + INIT_IN);
    // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid,
    // total_extlen, padding.
    b.extend(((IN_HEADER + INIT_IN) as u32).to_ne_bytes());
    b.extend(FUSE_INIT.to_ne_bytes());
    b.extend(1u64.to_ne_bytes());
    b.extend(0u64.to_ne_bytes());
    b.extend([0u8; 4 * 3]);
    b.extend([0u8; 4]);
    // fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11].
    b.extend(p.major.to_ne_bytes());
    b.extend(p.minor.to_ne_bytes());
    b.extend(max_readahead.to_ne_bytes());
    b.extend((p.capabilities as u32).to_ne_bytes());
    b.extend(((p.capabilities >> 32) as u32).to_ne_bytes());
    b.extend([0u8; 4 * 11]);
    b
}

/// The notification that has the kernel send unanswered requests again.
fn resend_notification() -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&16u32.to_ne_bytes());
    b[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    b
}

/// Makes a fuser session over the connection whose device fd is
/// `device`, as if the kernel had just sent INIT with `init`; `make`
/// builds the session from the fd it is given. The session reads the
/// device once this returns.
pub fn session<S: AsFd>(
    device: OwnedFd,
    init: &InitParams,
    max_readahead: u32,
    make: impl FnOnce(OwnedFd) -> std::io::Result<S>,
) -> Result<S> {
    let (ours, theirs) = socket_pair()?;
    nix::unistd::write(&ours, &init_request(init, max_readahead))
        .map_err(|e| Error::io("write the INIT for fuser", e.into()))?;
    let session =
        make(theirs).map_err(|e| Error::io("start the FUSE session on the kept connection", e))?;
    let mut reply = [0u8; 256];
    let n = nix::unistd::read(ours.as_raw_fd(), &mut reply)
        .map_err(|e| Error::io("read fuser's INIT answer", e.into()))?;
    if n < 16 || i32::from_ne_bytes(reply[4..8].try_into().expect("4")) != 0 {
        return Err(Error::invalid("fuser refused the kept connection's INIT"));
    }
    // The session's fd number now denotes the device; close-on-exec, as
    // every fd of the connection: a child that inherited one would hold
    // the connection past the daemon's death.
    let fd = session.as_fd().as_raw_fd();
    nix::unistd::dup3(device.as_raw_fd(), fd, nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("point the FUSE session at the kept device", e.into()))?;
    drop(device);
    Ok(session)
}

/// A new device file of `device`'s connection. Requests read from a
/// device file are listed on it until answered, so event threads reading
/// their own clones do not contend for one list; a clone closed for good
/// ends the requests listed on it (ECONNABORTED), which is why every clone
/// goes to the keeper.
pub fn clone_device(device: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|e| Error::io("open /dev/fuse", e))?;
    let mut source = device.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the source fd) from the
    // pointer, which is valid for the call; both fds are open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut source) };
    if rc != 0 {
        return Err(Error::io(
            "clone the FUSE device file",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file.into())
}

/// Asks the kernel to send again what the previous daemon read but did
/// not answer. A kernel before 6.9 refuses (EINVAL): those requests would
/// then wait, their callers unkillable, for the life of the mount, so the
/// adopting daemon closes the device files they sit on and they fail
/// (`daemon::fuse_mount::resend_or_fresh`, review32 H2).
pub fn resend(device: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    // Fault seam: a kernel without FUSE_NOTIFY_RESEND (before 6.9), for
    // the tests of the fallback (`daemon::fuse_mount`).
    if std::env::var_os("RECOVERFS_FAULT_NO_FUSE_RESEND").is_some() {
        return Err(Error::io(
            "ask the kernel to resend unanswered FUSE requests",
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    nix::unistd::write(device, &resend_notification())
        .map(|_| ())
        .map_err(|e| {
            Error::io(
                "ask the kernel to resend unanswered FUSE requests",
                e.into(),
            )
        })
}

/// A seqpacket pair (one datagram per FUSE message, as on the device):
/// (our end, fuser's).
fn socket_pair() -> Result<(OwnedFd, OwnedFd)> {
    nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::io("socketpair", e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_init_has_the_kernels_layout() {
        let p = InitParams {
            major: 7,
            minor: 41,
            capabilities: 0x0000_0002_8000_0001,
        };
        let b = init_request(&p, 1 << 20);
        assert_eq!(b.len(), 104);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 104);
        assert_eq!(u32::from_ne_bytes(b[4..8].try_into().unwrap()), FUSE_INIT);
        assert_eq!(u32::from_ne_bytes(b[40..44].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(b[44..48].try_into().unwrap()), 41);
        assert_eq!(u32::from_ne_bytes(b[48..52].try_into().unwrap()), 1 << 20);
        assert_eq!(
            u32::from_ne_bytes(b[52..56].try_into().unwrap()),
            0x8000_0001
        );
        assert_eq!(u32::from_ne_bytes(b[56..60].try_into().unwrap()), 2);
    }

    #[test]
    fn the_session_fd_denotes_the_device_afterwards_and_is_closed_on_exec() {
        let p = InitParams {
            major: 7,
            minor: 41,
            capabilities: 1,
        };
        // A pipe's read end stands in for the device file.
        let (device, _w) = nix::unistd::pipe().unwrap();
        let device_id = nix::sys::stat::fstat(device.as_raw_fd()).unwrap();
        let session = session(device, &p, 1 << 20, |fd| {
            // As fuser does: read the INIT, answer it.
            let mut init = [0u8; 256];
            let n = nix::unistd::read(fd.as_raw_fd(), &mut init).unwrap();
            assert_eq!(n, 104);
            let mut answer = [0u8; 16];
            answer[..4].copy_from_slice(&16u32.to_ne_bytes());
            answer[8..16].copy_from_slice(&init[8..16]);
            nix::unistd::write(&fd, &answer).unwrap();
            Ok(fd)
        })
        .unwrap();
        let st = nix::sys::stat::fstat(session.as_raw_fd()).unwrap();
        assert_eq!((st.st_dev, st.st_ino), (device_id.st_dev, device_id.st_ino));
        let flags = nix::fcntl::fcntl(session.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(
            flags & libc::FD_CLOEXEC != 0,
            "a child the daemon spawns would hold the connection"
        );
    }
}
