//! ONC RPC over TCP (RFC 5531): record marking, call headers, AUTH_UNIX
//! credentials, and replies. Records are bounded: a client cannot make the
//! server buffer more than one maximal WRITE, and a record's buffer grows
//! with the bytes that arrive, not with the length a header claims.

use nfs3_types::rpc::{
    accept_stat_data, accepted_reply, auth_stat, fragment_header, msg_body, opaque_auth,
    rejected_reply, reply_body, rpc_msg,
};
use nfs3_types::xdr_codec::Pack;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::xdr::{Garbage, Reader, MAX_AUTH, MAX_NAME};

/// Largest record accepted: a 1 MiB WRITE plus headers.
pub const MAX_RECORD: usize = (1 << 20) + 4096;

/// Who the caller says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cred {
    /// AUTH_NULL (or a flavour we do not know): the anonymous user.
    None,
    Unix {
        uid: u32,
        gid: u32,
        gids: Vec<u32>,
    },
}

#[derive(Debug)]
pub struct Call {
    pub xid: u32,
    pub prog: u32,
    pub vers: u32,
    pub proc_: u32,
    pub cred: Cred,
}

/// Why a record is not a call we can answer normally.
#[derive(Debug)]
pub enum BadCall {
    /// Not even an xid: drop the connection.
    Unreadable,
    /// RPC version other than 2.
    RpcMismatch(u32),
    /// The credential could not be decoded.
    BadCred(u32),
}

/// A record's buffer starts at most this large and then grows with what
/// arrives, so a client claiming a large record and sending nothing costs
/// little.
const GROW: usize = 64 << 10;

/// Reads one record (all its fragments). `Ok(None)` at a clean EOF. The
/// wait for a record's first byte is not bounded (clients keep idle
/// connections); the whole record must then arrive within `limit`.
pub async fn read_record(
    r: &mut (impl AsyncRead + Unpin),
    limit: Duration,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut first = [0u8; 1];
    if r.read(&mut first).await? == 0 {
        return Ok(None);
    }
    match tokio::time::timeout(limit, read_rest(r, first[0])).await {
        Ok(record) => record.map(Some),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("an RPC record did not arrive within {limit:?}"),
        )),
    }
}

/// The rest of a record whose first byte was `first`.
async fn read_rest(r: &mut (impl AsyncRead + Unpin), first: u8) -> std::io::Result<Vec<u8>> {
    let mut record = Vec::new();
    let mut h = [first, 0, 0, 0];
    r.read_exact(&mut h[1..]).await?;
    loop {
        let header = fragment_header::from(h);
        let len = header.fragment_length() as usize;
        let end = record.len() + len;
        if end > MAX_RECORD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("RPC record over {MAX_RECORD} bytes"),
            ));
        }
        let mut body = (&mut *r).take(len as u64);
        while record.len() < end {
            if record.len() == record.capacity() {
                // Double what is held; the last step goes to the claimed
                // end at once rather than copying a full buffer again.
                let (held, rest) = (record.len().max(GROW), end - record.len());
                record.reserve_exact(if rest <= 2 * held { rest } else { held });
            }
            if body.read_buf(&mut record).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        if header.eof() {
            return Ok(record);
        }
        r.read_exact(&mut h).await?;
    }
}

/// Decodes a call header; the reader is left at the procedure arguments.
pub fn decode_call(r: &mut Reader) -> Result<Call, BadCall> {
    let xid = r.u32().map_err(|_| BadCall::Unreadable)?;
    let garbage = |_: Garbage| BadCall::Unreadable;
    if r.u32().map_err(garbage)? != 0 {
        return Err(BadCall::Unreadable); // a REPLY sent to a server
    }
    let rpcvers = r.u32().map_err(garbage)?;
    if rpcvers != 2 {
        return Err(BadCall::RpcMismatch(xid));
    }
    let prog = r.u32().map_err(garbage)?;
    let vers = r.u32().map_err(garbage)?;
    let proc_ = r.u32().map_err(garbage)?;
    let bad = |_: Garbage| BadCall::BadCred(xid);
    let flavor = r.u32().map_err(bad)?;
    let body = r.opaque(MAX_AUTH).map_err(bad)?;
    let cred = match flavor {
        1 => unix_cred(body).map_err(bad)?,
        _ => Cred::None,
    };
    // The verifier: AUTH_NULL in practice; never trusted.
    let _flavor = r.u32().map_err(bad)?;
    let _verf = r.opaque(MAX_AUTH).map_err(bad)?;
    Ok(Call {
        xid,
        prog,
        vers,
        proc_,
        cred,
    })
}

fn unix_cred(body: &[u8]) -> Result<Cred, Garbage> {
    let mut r = Reader::new(body);
    let _stamp = r.u32()?;
    let _machine = r.opaque(MAX_NAME)?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let n = r.u32()? as usize;
    if n > 16 {
        return Err(Garbage);
    }
    let gids = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
    Ok(Cred::Unix { uid, gid, gids })
}

/// Appends a procedure's result body to a reply.
type BodyWriter<'a> = &'a dyn Fn(&mut Vec<u8>);

/// A complete reply record (fragment header included).
fn record(xid: u32, body: reply_body<'_>, result: Option<BodyWriter<'_>>) -> Vec<u8> {
    let msg = rpc_msg {
        xid,
        body: msg_body::REPLY(body),
    };
    let mut out = vec![0u8; 4];
    msg.pack(&mut out).expect("a reply header encodes");
    if let Some(f) = result {
        f(&mut out);
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&fragment_header::new(len, true).into_xdr_buf());
    out
}

fn accepted(data: accept_stat_data) -> reply_body<'static> {
    reply_body::MSG_ACCEPTED(accepted_reply {
        verf: opaque_auth::default(),
        reply_data: data,
    })
}

/// A successful reply carrying `result`.
pub fn success(xid: u32, result: &impl Pack) -> Vec<u8> {
    record(
        xid,
        accepted(accept_stat_data::SUCCESS),
        Some(&|out: &mut Vec<u8>| {
            result.pack(out).expect("a result encodes");
        }),
    )
}

/// A successful reply with no result (NULL procedures).
pub fn success_void(xid: u32) -> Vec<u8> {
    record(xid, accepted(accept_stat_data::SUCCESS), None)
}

pub fn prog_unavail(xid: u32) -> Vec<u8> {
    record(xid, accepted(accept_stat_data::PROG_UNAVAIL), None)
}

pub fn prog_mismatch(xid: u32, low: u32, high: u32) -> Vec<u8> {
    record(
        xid,
        accepted(accept_stat_data::PROG_MISMATCH { low, high }),
        None,
    )
}

pub fn proc_unavail(xid: u32) -> Vec<u8> {
    record(xid, accepted(accept_stat_data::PROC_UNAVAIL), None)
}

pub fn garbage_args(xid: u32) -> Vec<u8> {
    record(xid, accepted(accept_stat_data::GARBAGE_ARGS), None)
}

pub fn rpc_mismatch(xid: u32) -> Vec<u8> {
    record(
        xid,
        reply_body::MSG_DENIED(rejected_reply::rpc_mismatch(2, 2)),
        None,
    )
}

pub fn auth_error(xid: u32, why: auth_stat) -> Vec<u8> {
    record(
        xid,
        reply_body::MSG_DENIED(rejected_reply::auth_error(why)),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(flavor: u32, cred: &[u8]) -> Vec<u8> {
        let mut v = vec![];
        for x in [7u32, 0, 2, 100_003, 3, 1, flavor, cred.len() as u32] {
            v.extend(x.to_be_bytes());
        }
        v.extend(cred);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v.extend([0u8; 8]); // AUTH_NULL verifier
        v
    }

    #[test]
    fn an_auth_unix_call_decodes_with_its_credentials() {
        let mut cred = vec![];
        for x in [1u32, 4] {
            cred.extend(x.to_be_bytes());
        }
        cred.extend(b"host");
        for x in [1000u32, 100, 2, 10, 20] {
            cred.extend(x.to_be_bytes());
        }
        let rec = call(1, &cred);
        let c = decode_call(&mut Reader::new(&rec)).unwrap();
        assert_eq!((c.xid, c.prog, c.vers, c.proc_), (7, 100_003, 3, 1));
        assert_eq!(
            c.cred,
            Cred::Unix {
                uid: 1000,
                gid: 100,
                gids: vec![10, 20]
            }
        );
    }

    #[test]
    fn a_credential_claiming_too_many_groups_is_refused() {
        let mut cred = vec![];
        for x in [1u32, 0, 0, 0, 1000] {
            cred.extend(x.to_be_bytes());
        }
        let rec = call(1, &cred);
        assert!(matches!(
            decode_call(&mut Reader::new(&rec)),
            Err(BadCall::BadCred(7))
        ));
    }

    #[tokio::test]
    async fn records_are_joined_from_fragments_and_bounded() {
        let mut wire = vec![];
        wire.extend(fragment_header::new(3, false).into_xdr_buf());
        wire.extend(b"abc");
        wire.extend(fragment_header::new(2, true).into_xdr_buf());
        wire.extend(b"de");
        let mut r = &wire[..];
        assert_eq!(read_record(&mut r, T).await.unwrap().unwrap(), b"abcde");
        assert!(read_record(&mut r, T).await.unwrap().is_none(), "clean EOF");
        let huge = fragment_header::new(MAX_RECORD as u32 + 1, true).into_xdr_buf();
        let mut r = &huge[..];
        assert!(read_record(&mut r, T).await.is_err());
    }

    const T: Duration = Duration::from_secs(5);

    /// Serves `wire` a few bytes at a time and notes the largest buffer
    /// it was offered: `read_record` reads into the record's spare
    /// allocation, so that is what a record allocated ahead of its bytes.
    struct Trickle {
        wire: Vec<u8>,
        at: usize,
        largest_offer: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let me = &mut *self;
            me.largest_offer = me.largest_offer.max(buf.remaining());
            let n = buf.remaining().min(me.wire.len() - me.at).min(1000);
            buf.put_slice(&me.wire[me.at..me.at + n]);
            me.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_record_buffer_grows_with_the_bytes_that_arrive_not_with_the_claimed_length() {
        let claim = MAX_RECORD as u32 - 8;
        let mut wire = fragment_header::new(claim, true).into_xdr_buf().to_vec();
        wire.extend([7u8; 10_000]);
        let mut r = Trickle {
            wire: wire.clone(),
            at: 0,
            largest_offer: 0,
        };
        assert!(
            read_record(&mut r, T).await.is_err(),
            "the record is cut short"
        );
        assert!(r.largest_offer <= GROW, "{} bytes ahead", r.largest_offer);
        // The whole record still arrives in one piece.
        wire.extend(vec![9u8; claim as usize - 10_000]);
        let mut r = Trickle {
            wire,
            at: 0,
            largest_offer: 0,
        };
        let rec = read_record(&mut r, T).await.unwrap().unwrap();
        assert_eq!(rec.len(), claim as usize);
        assert!(rec[..10_000].iter().all(|&b| b == 7) && rec[10_000..].iter().all(|&b| b == 9));
        assert!(rec.capacity() <= claim as usize + GROW);
    }

    #[tokio::test]
    async fn a_record_that_stops_arriving_is_an_error_after_the_limit() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        tokio::io::AsyncWriteExt::write_all(&mut client, &[0x00, 0x0f, 0xff, 0xff, 1, 2])
            .await
            .unwrap();
        let limited = read_record(&mut server, Duration::from_millis(300));
        let e = tokio::time::timeout(Duration::from_secs(3), limited)
            .await
            .expect("read_record gave up by itself")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        drop(client);
    }
}
