//! Reading one NBD export into the repository: the step every NBD-sourced
//! backup shares (`backup-vms` views, and `backup` of any NBD export URL,
//! e.g. one `qemu-nbd` or another hypervisor serves).
//!
//! `base:allocation` block status picks the chunks that may hold data
//! (zero extents are skipped, holes that may read as backing data are
//! read); with a [`Base`], a dirty bitmap exported beside the view narrows
//! that to the chunks written since the base, and every other chunk keeps
//! the base's id. Chunks go through [`store_chunks`] like every backup.

use std::collections::HashSet;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::boot::NbdServer;
use crate::error::{Error, ErrorKind, Result};
use crate::qemu::nbd::{
    dirty_bitmap_context, Extent, NbdClient, CONTEXT_ALLOCATION, STATE_DIRTY, STATE_ZERO,
};
use crate::repo::locks::WriterLock;
use crate::repo::manifest::{DiskManifest, Manifest};
use crate::repo::writer::{
    default_config, publish_manifest, store_chunks_with, stored_bytes_after,
};
use crate::repo::{ChunkIndex, Repository};

/// The error of a read (or run) a signal ended.
pub const INTERRUPTED: &str = "interrupted by a signal";

/// An NBD export: where its server listens and its name.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub server: NbdServer,
    pub name: String,
}

impl Export {
    /// Parses `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(url: &str) -> Result<Export> {
        match crate::boot::DiskSource::nbd(url)? {
            crate::boot::DiskSource::Nbd { server, export } => Ok(Export {
                server,
                name: export,
            }),
            _ => unreachable!("DiskSource::nbd returns an NBD source"),
        }
    }

    /// Whether `s` is written as an NBD URL (not a file path).
    pub fn is_url(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }
}

/// The backup an incremental read is relative to.
pub struct Base<'a> {
    /// An export carrying the bitmap's status (same size as the view).
    pub map: Export,
    pub bitmap: &'a str,
    pub disk: &'a DiskManifest,
}

/// What reading one export did.
#[derive(Debug)]
pub struct ReadOutcome {
    pub disk: DiskManifest,
    /// Plain bytes read over NBD.
    pub read_bytes: u64,
    pub chunks_read: u64,
    /// Chunks read that held only zeros.
    pub zero_chunks: u64,
    /// Chunks this read added to the repository.
    pub new_chunks: u64,
}

/// Chunk indexes that hold an extent not known to read as zeros, in order.
/// (`STATE_HOLE` without `STATE_ZERO` may read as backing data: read.)
pub fn chunks_with_data(extents: &[Extent], chunk_size: u32) -> Vec<u64> {
    chunks_where(extents, chunk_size, |f| f & STATE_ZERO == 0)
}

/// Chunk indexes a dirty-bitmap extent marks dirty, in order.
pub fn dirty_chunks(extents: &[Extent], chunk_size: u32) -> Vec<u64> {
    chunks_where(extents, chunk_size, |f| f & STATE_DIRTY != 0)
}

fn chunks_where(extents: &[Extent], chunk_size: u32, keep: impl Fn(u32) -> bool) -> Vec<u64> {
    let cs = chunk_size as u64;
    let mut out: Vec<u64> = vec![];
    for e in extents.iter().filter(|e| keep(e.flags) && e.len > 0) {
        let first = e.offset / cs;
        let last = (e.offset + e.len - 1) / cs;
        let from = match out.last() {
            Some(&l) if l >= first => l + 1,
            _ => first,
        };
        out.extend(from..=last);
    }
    out
}

/// An NBD client over either transport.
enum Conn {
    Unix(NbdClient<UnixStream>),
    Tcp(NbdClient<TcpStream>),
}

impl Conn {
    fn open(e: &Export, contexts: &[&str]) -> Result<Conn> {
        Ok(match &e.server {
            NbdServer::Unix(p) => Conn::Unix(NbdClient::connect_unix(p, &e.name, contexts)?),
            NbdServer::Tcp { host, port } => Conn::Tcp(NbdClient::connect_tcp(
                format!("{host}:{port}").as_str(),
                &e.name,
                contexts,
            )?),
        })
    }

    fn size(&self) -> u64 {
        match self {
            Conn::Unix(c) => c.size(),
            Conn::Tcp(c) => c.size(),
        }
    }

    /// Whether the server promises consistent results across several
    /// connections (`NBD_FLAG_CAN_MULTI_CONN`): only then are more opened.
    fn multi_conn(&self) -> bool {
        const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
        let flags = match self {
            Conn::Unix(c) => c.transmission_flags(),
            Conn::Tcp(c) => c.transmission_flags(),
        };
        flags & FLAG_CAN_MULTI_CONN != 0
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Conn::Unix(c) => c.read(offset, buf),
            Conn::Tcp(c) => c.read(offset, buf),
        }
    }

    /// Block status of the whole export (none for an empty one).
    fn status(&mut self, context: &str) -> Result<Vec<Extent>> {
        let size = self.size();
        if size == 0 {
            return Ok(vec![]);
        }
        match self {
            Conn::Unix(c) => c.block_status(context, 0, size),
            Conn::Tcp(c) => c.block_status(context, 0, size),
        }
    }

    /// A polite goodbye; the data is already read, so a failure is moot.
    fn close(self) {
        let _ = match self {
            Conn::Unix(c) => c.disconnect(),
            Conn::Tcp(c) => c.disconnect(),
        };
    }
}

/// NBD connections reading one export at once, where the server allows.
const READERS: usize = 4;

/// `first` and, if its server allows several connections, up to
/// [`READERS`] in all: one request in flight per connection keeps the
/// client simple while the server works on several. A connection that
/// cannot be opened just means fewer.
fn connections(export: &Export, first: Conn) -> Vec<Conn> {
    let mut pool = vec![];
    let multi = first.multi_conn();
    pool.push(first);
    while multi && pool.len() < READERS {
        match Conn::open(export, &[]) {
            Ok(c) => pool.push(c),
            Err(e) => {
                tracing::debug!(export = %export.name, "one more NBD connection: {e}");
                break;
            }
        }
    }
    pool
}

/// Reads `export` into the repository as disk `index`: its manifest and
/// what it read. With a `base`, only chunks the base's bitmap marks are
/// read; the others keep the base's chunk ids.
pub fn read_export(
    repo: &Arc<Repository>,
    export: &Export,
    index: usize,
    chunk_size: u32,
    base: Option<Base>,
) -> Result<ReadOutcome> {
    read_export_until(
        repo,
        export,
        index,
        chunk_size,
        base,
        &AtomicBool::new(false),
    )
}

/// [`read_export`], ending with an error at the next chunk once `stop` is
/// set (a signal: the caller unwinds through its cleanup).
pub fn read_export_until(
    repo: &Arc<Repository>,
    export: &Export,
    index: usize,
    chunk_size: u32,
    base: Option<Base>,
    stop: &AtomicBool,
) -> Result<ReadOutcome> {
    let mut c = Conn::open(export, &[CONTEXT_ALLOCATION])?;
    let size = c.size();
    let mut wanted = chunks_with_data(&c.status(CONTEXT_ALLOCATION)?, chunk_size);
    let mut chunks = ChunkIndex::zeros(DiskManifest::chunk_count(size, chunk_size));
    if let Some(b) = &base {
        if b.disk.size != size || b.disk.chunk_size != chunk_size {
            return Err(Error::invalid("the disk's geometry is not the base's"));
        }
        let ctx = dirty_bitmap_context(b.bitmap);
        let mut m = Conn::open(&b.map, &[ctx.as_str()])?;
        if m.size() != size {
            return Err(Error::invalid(
                "the dirty bitmap's export is not the view's size",
            ));
        }
        let dirty = dirty_chunks(&m.status(&ctx)?, chunk_size);
        m.close();
        // Clean chunks are the base's; dirty ones are read, or zeros.
        chunks = b.disk.chunks.with_changes(dirty.iter().map(|&i| (i, None)));
        let dirty: HashSet<u64> = dirty.into_iter().collect();
        wanted.retain(|i| dirty.contains(i));
    }
    let chunks_read = wanted.len() as u64;
    let pool = Mutex::new(connections(export, c));
    let n = pool.lock().expect("NBD pool").len();
    let read = |i: u64, buf: &mut [u8]| {
        if stop.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Io, INTERRUPTED));
        }
        let mut c = pool
            .lock()
            .expect("NBD pool")
            .pop()
            .expect("one per reader");
        let r = c.read(i * chunk_size as u64, buf);
        pool.lock().expect("NBD pool").push(c);
        r
    };
    let st = store_chunks_with(
        repo,
        size,
        chunk_size,
        wanted.into_iter(),
        n,
        &read,
        &|_| {},
    )?;
    for c in pool.into_inner().into_iter().flatten() {
        c.close();
    }
    let chunks = chunks.with_changes(st.chunks.iter().copied());
    let stored_bytes = match &base {
        Some(b) => stored_bytes_after(repo, b.disk, &chunks, &st.sizes)?,
        None => st.sizes.values().sum(),
    };
    Ok(ReadOutcome {
        disk: DiskManifest {
            name: format!("disk{index}"),
            size,
            chunk_size,
            chunks,
            stored_bytes,
            new_bytes: st.new_bytes,
        },
        read_bytes: st.read_bytes,
        chunks_read,
        zero_chunks: st.zero_chunks,
        new_chunks: st.new_chunks,
    })
}

/// `backup` of NBD exports: reads each as one disk, in order, and
/// publishes one manifest for `vm` (written last, create-only).
pub fn backup_exports(
    repo: &Arc<Repository>,
    vm: &str,
    config: Option<serde_json::Value>,
    exports: &[Export],
    chunk_size: u32,
) -> Result<(Manifest, Vec<ReadOutcome>)> {
    if let Some(c) = &config {
        crate::repo::writer::check_config(c)?;
        crate::repo::writer::check_config_disks(c, exports.len())?;
    }
    let lock = WriterLock::acquire(repo, vm)?;
    let mut reads = vec![];
    for (i, e) in exports.iter().enumerate() {
        let r = read_export(repo, e, i, chunk_size, None)
            .map_err(|err| err.context(format!("NBD export {:?}", e.name)))?;
        // As an empty image file is: nothing of it was stored.
        if r.disk.size == 0 {
            return Err(Error::invalid(format!(
                "NBD export {:?} is empty (0 bytes): there is no disk to back up",
                e.name
            )));
        }
        reads.push(r);
    }
    let disks = reads.iter().map(|r| r.disk.clone()).collect();
    let config = config.unwrap_or_else(|| default_config(vm, exports.len()));
    Ok((publish_manifest(repo, &lock, vm, config, disks)?, reads))
}
