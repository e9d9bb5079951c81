//! A bounded XDR reader for what clients send. `nfs3_types` decodes by
//! allocating whatever length the wire claims before reading it, so a
//! 100-byte request could ask for gigabytes; arguments are decoded here
//! instead, every variable-length item checked against its protocol
//! maximum and against the bytes actually left in the record. Replies are
//! encoded with `nfs3_types` (we control those lengths).

use nfs3_types::nfs3::{
    createverf3, nfs_fh3, nfstime3, sattr3, set_atime, set_mtime, Nfs3Option, NFS3_FHSIZE,
};
use nfs3_types::xdr_codec::Opaque;

/// Why a request could not be decoded: the RPC answer is GARBAGE_ARGS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Garbage;

pub type Result<T> = std::result::Result<T, Garbage>;

/// Longest file name (NFS3 and MOUNT), path (MOUNT) and auth body (RPC).
pub const MAX_NAME: usize = 255;
/// Longest file name decoded: NFS3's `filename3` has no bound of its own,
/// and a name longer than [`MAX_NAME`] (up to this) is answered with
/// NFS3ERR_NAMETOOLONG by the procedure, as a local filesystem would.
pub const MAX_NAME_DECODED: usize = 4096;
pub const MAX_PATH: usize = 1024;
pub const MAX_AUTH: usize = 400;

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// What follows, undecoded (e.g. another program's arguments).
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Garbage);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn bool(&mut self) -> Result<bool> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Garbage),
        }
    }

    /// Variable-length opaque data of at most `max` bytes, borrowed.
    pub fn opaque(&mut self, max: usize) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(Garbage);
        }
        let data = self.take(len)?;
        self.take((4 - len % 4) % 4)?;
        Ok(data)
    }

    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        self.take((4 - N % 4) % 4)?;
        Ok(s.try_into().expect("N bytes"))
    }

    pub fn fh(&mut self) -> Result<nfs_fh3> {
        let data = self.opaque(NFS3_FHSIZE)?;
        Ok(nfs_fh3 {
            data: Opaque::owned(data.to_vec()),
        })
    }

    pub fn name(&mut self) -> Result<&'a [u8]> {
        self.opaque(MAX_NAME_DECODED)
    }

    pub fn createverf(&mut self) -> Result<createverf3> {
        Ok(createverf3(self.fixed::<8>()?))
    }

    fn time(&mut self) -> Result<nfstime3> {
        Ok(nfstime3 {
            seconds: self.u32()?,
            nseconds: self.u32()?,
        })
    }

    fn option<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        if self.bool()? {
            Ok(Some(f(self)?))
        } else {
            Ok(None)
        }
    }

    pub fn sattr3(&mut self) -> Result<sattr3> {
        let opt = |o: Option<u32>| match o {
            Some(v) => Nfs3Option::Some(v),
            None => Nfs3Option::None,
        };
        let mode = opt(self.option(|r| r.u32())?);
        let uid = opt(self.option(|r| r.u32())?);
        let gid = opt(self.option(|r| r.u32())?);
        let size = match self.option(|r| r.u64())? {
            Some(v) => Nfs3Option::Some(v),
            None => Nfs3Option::None,
        };
        let atime = match self.u32()? {
            0 => set_atime::DONT_CHANGE,
            1 => set_atime::SET_TO_SERVER_TIME,
            2 => set_atime::SET_TO_CLIENT_TIME(self.time()?),
            _ => return Err(Garbage),
        };
        let mtime = match self.u32()? {
            0 => set_mtime::DONT_CHANGE,
            1 => set_mtime::SET_TO_SERVER_TIME,
            2 => set_mtime::SET_TO_CLIENT_TIME(self.time()?),
            _ => return Err(Garbage),
        };
        Ok(sattr3 {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        })
    }

    /// A `sattrguard3`: the ctime a SETATTR must match, if any.
    pub fn guard(&mut self) -> Result<Option<nfstime3>> {
        self.option(|r| r.time())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_beyond_the_record_or_the_protocol_is_garbage_not_an_allocation() {
        // Claims 4 GiB of opaque data in an 8-byte record.
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(r.opaque(usize::MAX), Err(Garbage));
        let mut r = Reader::new(&[0, 0, 0, 65, 0, 0, 0, 0]);
        assert_eq!(r.fh(), Err(Garbage), "a handle longer than 64 bytes");
        let mut r = Reader::new(&[0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 7]);
        assert_eq!(r.name().unwrap(), b"abc");
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.u32(), Err(Garbage));
    }
}
