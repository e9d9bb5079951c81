//! A thin synchronous wrapper over the `nfs3_client` crate for tests, and
//! helpers to give each test its own loopback address (ports 111 and 2049
//! are per address, so tests in parallel never collide).

use std::net::Ipv4Addr;

use nfs3_client::tokio::{TokioConnector, TokioIo};
use nfs3_client::{Nfs3Client, Nfs3ConnectionBuilder};
use nfs3_types::nfs3::*;
use nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_types::xdr_codec::Opaque;

/// A loopback address of its own for one test: 127.x.y.z, random.
pub fn own_loopback() -> Ipv4Addr {
    let r: u32 = rand::random();
    Ipv4Addr::new(
        127,
        1 + (r >> 16) as u8 % 250,
        (r >> 8) as u8,
        2 + (r as u8) % 250,
    )
}

/// One client connection, as root (AUTH_UNIX uid 0) unless told otherwise.
pub struct Client {
    rt: tokio::runtime::Runtime,
    c: Nfs3Client<TokioIo<tokio::net::TcpStream>>,
    pub root: nfs_fh3,
}

fn cred(uid: u32, gid: u32) -> opaque_auth<'static> {
    opaque_auth::auth_unix(&auth_unix {
        stamp: 1,
        machinename: Opaque::owned(b"test".to_vec()),
        uid,
        gid,
        gids: vec![],
    })
}

impl Client {
    /// Mounts `path` through the portmapper on port 111 of `host`.
    pub fn mount(host: &str, path: &str) -> Result<Client, String> {
        Self::mount_as(host, path, 0, 0)
    }

    pub fn mount_as(host: &str, path: &str, uid: u32, gid: u32) -> Result<Client, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conn = rt
            .block_on(
                Nfs3ConnectionBuilder::new(TokioConnector, host, path)
                    .connect_from_privileged_port(false)
                    .credential(cred(uid, gid))
                    .mount(),
            )
            .map_err(|e| format!("{e:?}"))?;
        let root = conn.root_nfs_fh3();
        Ok(Client {
            rt,
            c: conn.into_nfs3_client(),
            root,
        })
    }

    /// A new connection to `host:port` reusing handles from an old one.
    pub fn reconnect(host: &str, port: u16, root: nfs_fh3) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = rt
            .block_on(tokio::net::TcpStream::connect((host, port)))
            .unwrap();
        let c = Nfs3Client::new_with_auth(TokioIo::new(s), cred(0, 0), opaque_auth::default());
        Client { rt, c, root }
    }

    pub fn lookup(&mut self, dir: &nfs_fh3, name: &str) -> Result<nfs_fh3, nfsstat3> {
        let r = self
            .rt
            .block_on(self.c.lookup(&LOOKUP3args {
                what: diropargs3 {
                    dir: dir.clone(),
                    name: filename3::from(name.as_bytes().to_vec()),
                },
            }))
            .unwrap();
        match r {
            Nfs3Result::Ok(ok) => Ok(ok.object),
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    pub fn path(&mut self, path: &str) -> Result<nfs_fh3, nfsstat3> {
        let mut fh = self.root.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            fh = self.lookup(&fh, part)?;
        }
        Ok(fh)
    }

    pub fn getattr(&mut self, fh: &nfs_fh3) -> Result<fattr3, nfsstat3> {
        match self
            .rt
            .block_on(self.c.getattr(&GETATTR3args { object: fh.clone() }))
            .unwrap()
        {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    /// (committed, verifier)
    pub fn write(
        &mut self,
        fh: &nfs_fh3,
        off: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(stable_how, [u8; 8]), nfsstat3> {
        let r = self
            .rt
            .block_on(self.c.write(&WRITE3args {
                file: fh.clone(),
                offset: off,
                count: data.len() as u32,
                stable,
                data: Opaque::borrowed(data),
            }))
            .unwrap();
        match r {
            Nfs3Result::Ok(ok) => Ok((ok.committed, ok.verf.0)),
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    pub fn commit(&mut self, fh: &nfs_fh3) -> Result<[u8; 8], nfsstat3> {
        match self
            .rt
            .block_on(self.c.commit(&COMMIT3args {
                file: fh.clone(),
                offset: 0,
                count: 0,
            }))
            .unwrap()
        {
            Nfs3Result::Ok(ok) => Ok(ok.verf.0),
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    pub fn read(&mut self, fh: &nfs_fh3, off: u64, count: u32) -> Result<Vec<u8>, nfsstat3> {
        match self
            .rt
            .block_on(self.c.read(&READ3args {
                file: fh.clone(),
                offset: off,
                count,
            }))
            .unwrap()
        {
            Nfs3Result::Ok(ok) => Ok(ok.data.to_vec()),
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    pub fn create(&mut self, dir: &nfs_fh3, name: &str) -> Result<nfs_fh3, nfsstat3> {
        let r = self
            .rt
            .block_on(self.c.create(&CREATE3args {
                where_: diropargs3 {
                    dir: dir.clone(),
                    name: filename3::from(name.as_bytes().to_vec()),
                },
                how: createhow3::GUARDED(sattr3::default()),
            }))
            .unwrap();
        match r {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => Ok(fh),
                Nfs3Option::None => Err(nfsstat3::NFS3ERR_SERVERFAULT),
            },
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    pub fn remove(&mut self, dir: &nfs_fh3, name: &str) -> Result<(), nfsstat3> {
        match self
            .rt
            .block_on(self.c.remove(&REMOVE3args {
                object: diropargs3 {
                    dir: dir.clone(),
                    name: filename3::from(name.as_bytes().to_vec()),
                },
            }))
            .unwrap()
        {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    pub fn rename(&mut self, dir: &nfs_fh3, from: &str, to: &str) -> Result<(), nfsstat3> {
        match self
            .rt
            .block_on(self.c.rename(&RENAME3args {
                from: diropargs3 {
                    dir: dir.clone(),
                    name: filename3::from(from.as_bytes().to_vec()),
                },
                to: diropargs3 {
                    dir: dir.clone(),
                    name: filename3::from(to.as_bytes().to_vec()),
                },
            }))
            .unwrap()
        {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    pub fn truncate(&mut self, fh: &nfs_fh3, size: u64) -> Result<(), nfsstat3> {
        match self
            .rt
            .block_on(self.c.setattr(&SETATTR3args {
                object: fh.clone(),
                new_attributes: sattr3 {
                    size: Nfs3Option::Some(size),
                    ..Default::default()
                },
                guard: Nfs3Option::None,
            }))
            .unwrap()
        {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((st, _)) => Err(st),
        }
    }

    pub fn fsstat(&mut self) -> (u64, u64) {
        match self
            .rt
            .block_on(self.c.fsstat(&FSSTAT3args {
                fsroot: self.root.clone(),
            }))
            .unwrap()
        {
            Nfs3Result::Ok(ok) => (ok.tbytes, ok.abytes),
            Nfs3Result::Err((st, _)) => panic!("FSSTAT: {st:?}"),
        }
    }
}
