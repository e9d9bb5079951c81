//! A small blocking NBD client for the tests: enough of the protocol to
//! drive every path of the server, and strict about what the server sends
//! (it panics on anything the spec does not allow).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::super::proto::*;

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Long enough for any server answer in these tests; short enough that a
/// missing answer fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct OptReply {
    pub typ: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub name: Option<String>,
    pub description: Option<String>,
    /// (minimum, preferred, maximum)
    pub block_sizes: Option<(u32, u32, u32)>,
}

/// A reply, simple or structured, reassembled.
#[derive(Debug, Default)]
pub struct Reply {
    pub structured: bool,
    pub error: u32,
    pub message: String,
    pub error_offset: Option<u64>,
    /// A read's bytes, holes filled with zeros.
    pub data: Vec<u8>,
    pub data_chunks: usize,
    /// (offset, length) of each hole chunk.
    pub holes: Vec<(u64, u32)>,
    /// (context id, descriptors (length, flags)) per block status chunk.
    pub status: Vec<(u32, Vec<(u32, u32)>)>,
}

/// What the client remembers about a request in flight.
#[derive(Debug, Clone, Copy)]
struct Pending {
    typ: u16,
    offset: u64,
    len: u32,
}

pub struct Client {
    s: Box<dyn Stream>,
    pub structured: bool,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    partial: HashMap<u64, Reply>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A TCP stream with the tests' timeouts.
pub fn raw_tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the NBD server");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads the server greeting; returns the handshake flags.
pub fn read_greeting(s: &mut impl Read) -> u16 {
    let mut b = [0u8; 18];
    s.read_exact(&mut b).expect("greeting");
    assert_eq!(be64(&b[0..8]), NBDMAGIC);
    assert_eq!(be64(&b[8..16]), IHAVEOPT, "not newstyle");
    be16(&b[16..18])
}

/// True once the peer has closed the connection (EOF or reset).
pub fn is_closed(s: &mut impl Read) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            false
        }
        Err(_) => true,
    }
}

impl Client {
    pub fn tcp(addr: SocketAddr) -> Client {
        Client::handshake(Box::new(raw_tcp(addr)), true)
    }

    pub fn unix(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect to the NBD socket");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Client::handshake(Box::new(s), true)
    }

    /// A client over `s` that reads the greeting and sends its flags.
    pub fn handshake(mut s: Box<dyn Stream>, no_zeroes: bool) -> Client {
        let flags = read_greeting(&mut s);
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mine = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        s.write_all(&mine.to_be_bytes()).unwrap();
        Client {
            s,
            structured: false,
            next_cookie: 1,
            pending: HashMap::new(),
            partial: HashMap::new(),
        }
    }

    pub fn stream(&mut self) -> &mut dyn Stream {
        &mut *self.s
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        self.s.write_all(&option_request(option, data))
    }

    fn read_option_reply(&mut self, option: u32) -> io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        assert_eq!(be64(&h[0..8]), OPTION_REPLY_MAGIC);
        assert_eq!(be32(&h[8..12]), option, "reply to another option");
        let typ = be32(&h[12..16]);
        let len = be32(&h[16..20]);
        assert!(len < 1 << 20, "option reply of {len} bytes");
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data)?;
        Ok(OptReply { typ, data })
    }

    /// Sends an option and reads replies up to the final one (ACK or an
    /// error).
    pub fn try_option(&mut self, option: u32, data: &[u8]) -> io::Result<Vec<OptReply>> {
        self.send_option(option, data)?;
        let mut out = vec![];
        loop {
            let r = self.read_option_reply(option)?;
            let last = r.typ == REP_ACK || r.typ & (1 << 31) != 0;
            out.push(r);
            if last {
                return Ok(out);
            }
        }
    }

    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.try_option(option, data).expect("option reply")
    }

    pub fn structured_replies(&mut self) {
        let r = self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].typ, REP_ACK);
        self.structured = true;
    }

    pub fn list(&mut self) -> Vec<(String, String)> {
        let replies = self.option(OPT_LIST, &[]);
        let (last, servers) = replies.split_last().unwrap();
        assert_eq!(last.typ, REP_ACK);
        servers
            .iter()
            .map(|r| {
                assert_eq!(r.typ, REP_SERVER);
                let n = be32(&r.data) as usize;
                let name = String::from_utf8(r.data[4..4 + n].to_vec()).unwrap();
                let desc = String::from_utf8(r.data[4 + n..].to_vec()).unwrap();
                (name, desc)
            })
            .collect()
    }

    fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Meta context option: Ok((id, name) list) or Err(error reply type).
    pub fn meta(
        &mut self,
        option: u32,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, u32> {
        let replies = self.option(option, &Self::meta_data(export, queries));
        let (last, contexts) = replies.split_last().unwrap();
        if last.typ != REP_ACK {
            return Err(last.typ);
        }
        Ok(contexts
            .iter()
            .map(|r| {
                assert_eq!(r.typ, REP_META_CONTEXT);
                (
                    be32(&r.data),
                    String::from_utf8(r.data[4..].to_vec()).unwrap(),
                )
            })
            .collect())
    }

    pub fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.meta(OPT_SET_META_CONTEXT, export, queries)
            .expect("SET_META_CONTEXT")
    }

    pub fn list_meta(&mut self, export: &str, queries: &[&str]) -> Vec<String> {
        let r = self
            .meta(OPT_LIST_META_CONTEXT, export, queries)
            .expect("LIST_META_CONTEXT");
        r.into_iter()
            .map(|(id, n)| {
                assert_eq!(id, 0, "LIST replies carry id 0");
                n
            })
            .collect()
    }

    /// NBD_OPT_INFO or NBD_OPT_GO asking for every information item.
    pub fn info_or_go(&mut self, option: u32, name: &str) -> Result<ExportInfo, (u32, String)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        let items = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        let replies = self.option(option, &d);
        let (last, infos) = replies.split_last().unwrap();
        if last.typ != REP_ACK {
            assert!(infos.is_empty(), "no NBD_REP_INFO before an error");
            return Err((last.typ, String::from_utf8_lossy(&last.data).into_owned()));
        }
        let mut info = ExportInfo::default();
        let mut saw_export = false;
        for r in infos {
            assert_eq!(r.typ, REP_INFO);
            let d = &r.data[2..];
            match be16(&r.data) {
                INFO_EXPORT => {
                    assert_eq!(d.len(), 10);
                    saw_export = true;
                    info.size = be64(d);
                    info.flags = be16(&d[8..]);
                }
                INFO_NAME => info.name = Some(String::from_utf8(d.to_vec()).unwrap()),
                INFO_DESCRIPTION => info.description = Some(String::from_utf8(d.to_vec()).unwrap()),
                INFO_BLOCK_SIZE => {
                    assert_eq!(d.len(), 12);
                    info.block_sizes = Some((be32(d), be32(&d[4..]), be32(&d[8..])));
                }
                t => panic!("unknown info type {t}"),
            }
        }
        assert!(saw_export, "NBD_INFO_EXPORT is mandatory");
        Ok(info)
    }

    pub fn go(&mut self, name: &str) -> Result<ExportInfo, (u32, String)> {
        self.info_or_go(OPT_GO, name)
    }

    pub fn info(&mut self, name: &str) -> Result<ExportInfo, (u32, String)> {
        self.info_or_go(OPT_INFO, name)
    }

    /// NBD_OPT_EXPORT_NAME: (size, transmission flags).
    pub fn export_name(&mut self, name: &str, no_zeroes: bool) -> (u64, u16) {
        self.send_option(OPT_EXPORT_NAME, name.as_bytes()).unwrap();
        let mut b = [0u8; 10];
        self.s.read_exact(&mut b).unwrap();
        if !no_zeroes {
            let mut z = [1u8; 124];
            self.s.read_exact(&mut z).unwrap();
            assert!(z.iter().all(|&x| x == 0));
        }
        (be64(&b), be16(&b[8..]))
    }

    /// Sends one request; returns its cookie.
    pub fn send(&mut self, typ: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = Request {
            flags,
            typ,
            cookie,
            offset,
            len,
        }
        .encode();
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
        if typ != CMD_DISC {
            self.pending.insert(cookie, Pending { typ, offset, len });
        }
        cookie
    }

    /// Reads replies until one request's reply is complete.
    pub fn try_recv(&mut self) -> io::Result<(u64, Reply)> {
        loop {
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m)?;
            match be32(&m) {
                SIMPLE_REPLY_MAGIC => return self.recv_simple(),
                STRUCTURED_REPLY_MAGIC => {
                    assert!(self.structured, "structured reply not negotiated");
                    if let Some(done) = self.recv_chunk()? {
                        return Ok(done);
                    }
                }
                m => panic!("bad reply magic {m:#x}"),
            }
        }
    }

    pub fn recv(&mut self) -> (u64, Reply) {
        self.try_recv().expect("reply")
    }

    fn recv_simple(&mut self) -> io::Result<(u64, Reply)> {
        let mut h = [0u8; 12];
        self.s.read_exact(&mut h)?;
        let (error, cookie) = (be32(&h), be64(&h[4..]));
        let p = self
            .pending
            .remove(&cookie)
            .expect("reply to a known cookie");
        if self.structured {
            assert_ne!(p.typ, CMD_READ, "simple reply to a structured read");
        }
        let mut r = Reply {
            error,
            ..Reply::default()
        };
        if p.typ == CMD_READ && error == 0 {
            r.data = vec![0; p.len as usize];
            self.s.read_exact(&mut r.data)?;
        }
        Ok((cookie, r))
    }

    fn recv_chunk(&mut self) -> io::Result<Option<(u64, Reply)>> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        let (flags, typ, cookie, len) = (be16(&h), be16(&h[2..]), be64(&h[4..]), be32(&h[12..]));
        let mut payload = vec![0; len as usize];
        self.s.read_exact(&mut payload)?;
        let p = *self.pending.get(&cookie).expect("chunk for a known cookie");
        let r = self.partial.entry(cookie).or_insert_with(|| Reply {
            structured: true,
            data: if p.typ == CMD_READ {
                vec![0; p.len as usize]
            } else {
                vec![]
            },
            ..Reply::default()
        });
        apply_chunk(r, p, typ, &payload);
        if flags & REPLY_FLAG_DONE == 0 {
            return Ok(None);
        }
        self.pending.remove(&cookie);
        Ok(Some((cookie, self.partial.remove(&cookie).unwrap())))
    }

    /// One request and its reply (nothing else in flight).
    pub fn call(&mut self, typ: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Reply {
        let c = self.send(typ, flags, offset, len, data);
        let (got, r) = self.recv();
        assert_eq!(got, c);
        r
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.call(CMD_READ, 0, offset, len, &[]);
        assert_eq!(r.error, 0, "read failed: {}", r.message);
        r.data
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Reply {
        self.call(CMD_WRITE, flags, offset, data.len() as u32, data)
    }

    pub fn disc(&mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]);
    }

    /// True once the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        is_closed(&mut self.s)
    }
}

/// Adds one structured chunk to a reply, checking it against the request.
fn apply_chunk(r: &mut Reply, p: Pending, typ: u16, payload: &[u8]) {
    let end = p.offset.saturating_add(p.len as u64);
    match typ {
        REPLY_TYPE_NONE => assert!(payload.is_empty()),
        REPLY_TYPE_OFFSET_DATA => {
            assert_eq!(p.typ, CMD_READ);
            assert!(payload.len() > 8, "a data chunk carries at least one byte");
            let off = be64(payload);
            let data = &payload[8..];
            assert!(
                off >= p.offset && off + data.len() as u64 <= end,
                "data chunk out of range"
            );
            let at = (off - p.offset) as usize;
            r.data[at..at + data.len()].copy_from_slice(data);
            r.data_chunks += 1;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(p.typ, CMD_READ);
            assert_eq!(payload.len(), 12);
            let (off, len) = (be64(payload), be32(&payload[8..]));
            assert!(
                len > 0 && off >= p.offset && off + len as u64 <= end,
                "hole out of range"
            );
            r.holes.push((off, len));
        }
        REPLY_TYPE_BLOCK_STATUS => {
            assert_eq!(p.typ, CMD_BLOCK_STATUS);
            assert!(payload.len() >= 12 && (payload.len() - 4) % 8 == 0);
            let id = be32(payload);
            let d = payload[4..]
                .chunks(8)
                .map(|c| {
                    let len = be32(c);
                    assert!(len > 0, "zero-length descriptor");
                    (len, be32(&c[4..]))
                })
                .collect();
            r.status.push((id, d));
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let errno = be32(payload);
            assert_ne!(errno, 0);
            let n = be16(&payload[4..]) as usize;
            r.error = errno;
            r.message = String::from_utf8(payload[6..6 + n].to_vec()).unwrap();
            if typ == REPLY_TYPE_ERROR_OFFSET {
                assert_eq!(payload.len(), 6 + n + 8);
                let off = be64(&payload[6 + n..]);
                assert!(off >= p.offset && (off < end || off == p.offset));
                r.error_offset = Some(off);
            } else {
                assert_eq!(payload.len(), 6 + n);
            }
        }
        t => panic!("unknown chunk type {t}"),
    }
}
