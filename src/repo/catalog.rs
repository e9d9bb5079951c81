//! File backups: a catalog of files taken inside a running guest (by the
//! agent, `recoverfs agent-backup`), stored beside disk backups.
//!
//! `files/<vm>/<id>.json` holds `{"checksum": blake3(body), "catalog":
//! {format, vm, id, created, created_unix, source, entries: [{path, kind,
//! mode, uid, gid, mtime, mtime_nsec, size, target, chunks: [{digest,
//! len, repeat}], inode: {dev, ino, nlink}}], file_bytes, stored_bytes,
//! new_bytes}}` (`inode` only for a file with several links, since
//! 2026-11-24: older readers pass over it). `repeat` (absent: once) says
//! a chunk follows itself that many times: a sparse file's hole is a run
//! of one zero chunk, so a 10 TiB hole takes one reference, not 20
//! million. A catalog with a run is written as format 2, which a reader
//! from before runs refuses as an unknown format (it would otherwise
//! take the file to be short); one without stays format 1. File contents are cut
//! into content-defined chunks (so an edit in the middle of a file changes
//! only the chunks around it) and stored in the same deduplicated chunk
//! store as disk chunks (ids keyed, chunks encrypted, in an encrypted
//! repository). Its chunks count for `gc` ([`REFERRER`]), it is written
//! last (after every chunk it names) and created only if absent, so a
//! backup that fails anywhere leaves no catalog. Ids end in `-files`, so a
//! backup id names a disk backup or a file backup, never both.
//!
//! In an encrypted repository the whole body (guest paths, link targets,
//! owners, times, the agent's `source`) is encrypted instead:
//! `{"aead": "xchacha20poly1305", "catalog": "<base64>"}`, bound to its
//! object key (`repo::sealed::seal_encrypted`), so the store shows only
//! its size. Catalogs written by versions before that (2026-11-22/23) are
//! plain with the repository's MAC: they are still read (only the key
//! could have written them), with a warning; a plain catalog with just a
//! checksum is refused there.

use serde::{Deserialize, Serialize};

use super::chunk::Digest;
use super::{sealed, Repository};
use crate::error::{Error, Result};
use crate::util::{rfc3339, validate_name};

pub const CATALOG_FORMAT: u32 = 1;
/// The format of a catalog with a chunk run (`repeat` over 1).
pub const CATALOG_FORMAT_RUNS: u32 = 2;
/// A catalog document (one JSON entry per file).
pub const MAX_CATALOG_BYTES: u64 = 1 << 30;
/// Entries of one catalog.
pub const MAX_ENTRIES: usize = 4_000_000;
/// The limits a catalog is read back with ([`Repository::catalog`], `gc`),
/// checked also before one is published: a catalog over them could be
/// written but never read, so its backup could not be restored and `gc`
/// would stop for the whole repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogLimits {
    pub entries: usize,
    /// Of the stored (sealed) document.
    pub bytes: u64,
}

impl CatalogLimits {
    pub const STORED: CatalogLimits = CatalogLimits {
        entries: MAX_ENTRIES,
        bytes: MAX_CATALOG_BYTES,
    };

    /// An error if `n` entries are more than a catalog may list.
    pub fn check_entries(&self, n: usize) -> Result<()> {
        if n > self.entries {
            return Err(Error::invalid(format!(
                "the file backup has more than {} entries, more than a catalog may list (it could never be read back); back up fewer paths per backup",
                self.entries
            )));
        }
        Ok(())
    }

    /// An error if a catalog of `n` bytes is larger than may be read back.
    pub fn check_bytes(&self, n: u64) -> Result<()> {
        if n > self.bytes {
            return Err(Error::invalid(format!(
                "the file backup's catalog would take {n} bytes, more than the {} a catalog may take (it could never be read back); back up fewer paths per backup",
                self.bytes
            )));
        }
        Ok(())
    }
}

/// Longest path the agent may report.
pub const MAX_PATH_BYTES: usize = 4096;
/// Content-defined chunking of file contents: min, average, max bytes.
pub const CDC_MIN: u32 = 32 << 10;
pub const CDC_AVG: u32 = 128 << 10;
pub const CDC_MAX: u32 = 512 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub digest: Digest,
    pub len: u32,
    /// How many times in a row the file has this chunk (at least 1).
    #[serde(default = "once", skip_serializing_if = "is_once")]
    pub repeat: u64,
}

fn once() -> u64 {
    1
}

fn is_once(n: &u64) -> bool {
    *n == 1
}

impl ChunkRef {
    /// The bytes of the whole run, `None` if that overflows.
    pub fn run_bytes(&self) -> Option<u64> {
        (self.len as u64).checked_mul(self.repeat)
    }
}

/// One file, directory or symbolic link as the guest had it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Absolute path in the guest.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds and nanoseconds since the epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    /// A symbolic link's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A file's content, in order; empty for anything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRef>,
    /// A regular file with more than one link: its inode, so that a
    /// restore can make the entries of one inode hard links again. Absent
    /// for anything else, and in catalogs (and from agents) before
    /// 2026-11-24, whose links restore as separate files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<Inode>,
}

/// Where a file with several links lived in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Inode {
    pub dev: u64,
    pub ino: u64,
    /// Its link count then (the links outside the backup count too).
    pub nlink: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub format: u32,
    pub vm: String,
    pub id: String,
    pub created: String,
    pub created_unix: u64,
    /// How it was taken: agent version, paths asked for, hooks run.
    pub source: serde_json::Value,
    pub entries: Vec<Entry>,
    /// Plain bytes of every file.
    pub file_bytes: u64,
    /// Compressed bytes of the distinct chunks it references.
    pub stored_bytes: u64,
    /// Compressed bytes this backup added to the repository.
    pub new_bytes: u64,
}

impl Entry {
    /// Checks what a catalog (or the agent's stream) says about one entry
    /// before it is used to name or write a file.
    pub fn check(&self) -> Result<()> {
        self.check_header()?;
        let sum = (self.chunks.iter()).try_fold(0u64, |sum, c| sum.checked_add(c.run_bytes()?));
        let ok = match self.kind {
            EntryKind::File => sum == Some(self.size),
            EntryKind::Dir => self.chunks.is_empty(),
            EntryKind::Symlink => self.chunks.is_empty() && self.target.is_some(),
        };
        let bad = |c: &ChunkRef| c.len == 0 || c.len > CDC_MAX || c.repeat == 0;
        if !ok || self.chunks.iter().any(bad) {
            return Err(Error::corrupt(format!(
                "{:?}: size and content do not match",
                self.path
            )));
        }
        Ok(())
    }
}

impl Entry {
    /// What a header alone must satisfy: the path, the mode, a link's target.
    pub fn check_header(&self) -> Result<()> {
        check_path(&self.path)?;
        if self.mode > 0o7777 {
            return Err(Error::corrupt(format!(
                "{:?}: mode {:o} is more than permission bits",
                self.path, self.mode
            )));
        }
        if (self.kind == EntryKind::Symlink) != self.target.is_some()
            || (self.kind != EntryKind::File && (self.size != 0 || self.inode.is_some()))
        {
            return Err(Error::corrupt(format!(
                "{:?}: a {:?} with a size or link target it cannot have",
                self.path, self.kind
            )));
        }
        Ok(())
    }
}

/// An absolute, normalised path without NUL bytes: no `.`/`..` or empty
/// components, so it can never leave the directory it is restored under.
pub fn check_path(p: &str) -> Result<()> {
    let ok = p.starts_with('/')
        && p.len() <= MAX_PATH_BYTES
        && !p.contains('\0')
        && (p == "/"
            || p[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "path {:?} is not an absolute, normalised path",
            p.chars().take(200).collect::<String>()
        )))
    }
}

impl Catalog {
    /// Parses and checks a catalog stored at `key` (decrypted and
    /// authenticated when the repository is encrypted).
    pub fn decode(repo: &Repository, bytes: &[u8], key: &str, what: &str) -> Result<Catalog> {
        let (c, form): (Catalog, _) = sealed::unseal_stored(
            bytes,
            "catalog",
            &format!("catalog {what}"),
            repo.keys.as_ref(),
            key,
        )?;
        if form == sealed::Form::Plain && repo.keys.is_some() {
            tracing::warn!(
                "catalog {what} is stored unencrypted (written before catalogs were encrypted): its guest paths are readable by anyone who can read the repository; take a new file backup and forget this one to remove them"
            );
        }
        c.checked(what)
    }

    /// Encodes a catalog for storage at `key`: sealed, or encrypted when
    /// the repository is.
    fn encode(&self, repo: &Repository, key: &str) -> Result<Vec<u8>> {
        match &repo.keys {
            Some(k) => sealed::seal_encrypted("catalog", self, k, key),
            None => repo.seal("catalog", self),
        }
    }

    fn checked(self, what: &str) -> Result<Catalog> {
        let c = self;
        if c.format != CATALOG_FORMAT && c.format != CATALOG_FORMAT_RUNS {
            return Err(Error::corrupt(format!(
                "catalog {what} has unknown format {}",
                c.format
            )));
        }
        if c.format != c.needed_format() {
            return Err(Error::corrupt(format!(
                "catalog {what} is format {} but {} chunk runs",
                c.format,
                if c.has_runs() { "has" } else { "has no" }
            )));
        }
        if c.entries.len() > MAX_ENTRIES {
            return Err(Error::corrupt(format!(
                "catalog {what} lists more than {MAX_ENTRIES} entries"
            )));
        }
        for e in &c.entries {
            e.check()
                .map_err(|e| Error::corrupt(e.to_string()).context(format!("catalog {what}")))?;
        }
        Ok(c)
    }

    /// Entries at or under `path` (the whole catalog for `/`), in order.
    pub fn under<'a>(&'a self, path: &str) -> impl Iterator<Item = &'a Entry> + 'a {
        let path = path.to_string();
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{}/", path.trim_end_matches('/'))
        };
        self.entries
            .iter()
            .filter(move |e| e.path == path || e.path.starts_with(&prefix))
    }

    fn has_runs(&self) -> bool {
        (self.entries.iter()).any(|e| e.chunks.iter().any(|c| c.repeat != 1))
    }

    /// The oldest format that can say what this catalog says.
    fn needed_format(&self) -> u32 {
        match self.has_runs() {
            true => CATALOG_FORMAT_RUNS,
            false => CATALOG_FORMAT,
        }
    }

    pub fn find(&self, path: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

/// Stores file contents as content-defined chunks, counting what a whole
/// file backup references and adds.
#[derive(Default)]
pub struct ChunkSink {
    /// Stored size of every distinct chunk referenced so far.
    sizes: std::collections::HashMap<Digest, u64>,
    pub new_bytes: u64,
    pub new_chunks: u64,
    pub file_bytes: u64,
    /// The id of an all-zero chunk, by length: a sparse file's holes come
    /// as runs of such chunks, hashed once.
    zero_ids: std::collections::HashMap<usize, Digest>,
    /// [`ChunkSink::zero_cut`], once known.
    zero_cut: Option<usize>,
}

/// A file's content that may know the zero bytes coming next without
/// reading them (the holes of the agent's stream).
pub trait SparseRead: std::io::Read {
    /// Zero bytes that come next, known without reading them.
    fn zeros_ahead(&self) -> u64;
    /// Passes over `n` of them (at most [`Self::zeros_ahead`]).
    fn skip_zeros(&mut self, n: u64);
}

/// A source that knows of no zeros ahead.
struct Dense<R>(R);

impl<R: std::io::Read> std::io::Read for Dense<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: std::io::Read> SparseRead for Dense<R> {
    fn zeros_ahead(&self) -> u64 {
        0
    }
    fn skip_zeros(&mut self, n: u64) {
        assert_eq!(n, 0, "no zeros ahead");
    }
}

/// Where FastCDC (as `StreamCDC` over the same bytes) cuts the chunk that
/// starts `window` (the `CDC_MAX` bytes from its start, fewer at the end).
fn first_cut(window: &[u8]) -> usize {
    fastcdc::v2020::FastCDC::new(window, CDC_MIN, CDC_AVG, CDC_MAX)
        .next()
        .map_or(window.len(), |c| c.length)
}

impl ChunkSink {
    /// Reads `src` to its end, storing each chunk not yet in the
    /// repository; the chunk list in order.
    pub fn store(&mut self, repo: &Repository, src: impl std::io::Read) -> Result<Vec<ChunkRef>> {
        self.store_sparse(repo, Dense(src))
    }

    /// [`Self::store`] of a source that knows where its zeros are: a
    /// window of zeros is cut without being read or scanned, so a hole of
    /// a sparse file costs one chunk reference per `CDC_MAX`-sized cut,
    /// not a pass over its bytes. The chunks are those [`Self::store`]
    /// (FastCDC's `StreamCDC`) cuts from the same bytes: a chunk's end
    /// depends only on the `CDC_MAX` bytes from its start.
    pub fn store_sparse(
        &mut self,
        repo: &Repository,
        mut src: impl SparseRead,
    ) -> Result<Vec<ChunkRef>> {
        let max = CDC_MAX as usize;
        let mut out = vec![];
        // The bytes from the current chunk's start (at most `max`).
        let mut buf: Vec<u8> = Vec::with_capacity(max);
        let mut eof = false;
        loop {
            if !eof
                && src.zeros_ahead() > 0
                && buf.len() as u64 + src.zeros_ahead() >= max as u64
                && buf.iter().all(|&b| b == 0)
            {
                // The whole window is zeros: its cut is the zero window's.
                let len = self.zero_cut();
                let from_buf = len.min(buf.len());
                buf.truncate(buf.len() - from_buf);
                src.skip_zeros((len - from_buf) as u64);
                self.put_zeros(repo, len, &mut out)?;
                continue;
            }
            while !eof && buf.len() < max {
                let at = buf.len();
                buf.resize(max, 0);
                let n = src.read(&mut buf[at..]).map_err(|e| {
                    e.get_ref()
                        .and_then(|i| i.downcast_ref::<Error>())
                        .cloned()
                        .unwrap_or_else(|| Error::io("read file content", e))
                });
                buf.truncate(at + *n.as_ref().unwrap_or(&0));
                if n? == 0 {
                    eof = true;
                }
            }
            if buf.is_empty() {
                return Ok(out);
            }
            let len = first_cut(&buf);
            self.put(repo, &buf[..len], &mut out)?;
            buf.drain(..len);
        }
    }

    /// Where FastCDC cuts a window of `CDC_MAX` zero bytes.
    fn zero_cut(&mut self) -> usize {
        *self
            .zero_cut
            .get_or_insert_with(|| first_cut(&vec![0u8; CDC_MAX as usize]))
    }

    /// Stores (or references) one chunk.
    fn put(&mut self, repo: &Repository, data: &[u8], out: &mut Vec<ChunkRef>) -> Result<()> {
        let digest = match data.iter().all(|&b| b == 0) {
            true => self.zero_id(repo, data.len()),
            false => repo.chunk_id(data),
        };
        self.record(repo, digest, data.len(), || data.into(), out)
    }

    /// Stores (or references) a chunk of `len` zeros: a hole's bytes are
    /// made only to hash them once per length and to store them once.
    fn put_zeros(&mut self, repo: &Repository, len: usize, out: &mut Vec<ChunkRef>) -> Result<()> {
        let digest = self.zero_id(repo, len);
        self.record(repo, digest, len, || vec![0u8; len].into(), out)
    }

    /// The id of a chunk of `len` zeros (hashed once per length).
    fn zero_id(&mut self, repo: &Repository, len: usize) -> Digest {
        *self
            .zero_ids
            .entry(len)
            .or_insert_with(|| repo.chunk_id(&vec![0u8; len]))
    }

    /// References chunk `digest` of `len` bytes, storing `data()` first
    /// if this catalog has not met it yet.
    fn record<'a>(
        &mut self,
        repo: &Repository,
        digest: Digest,
        len: usize,
        data: impl FnOnce() -> std::borrow::Cow<'a, [u8]>,
        out: &mut Vec<ChunkRef>,
    ) -> Result<()> {
        if !self.sizes.contains_key(&digest) {
            let new = repo.put_chunk(&digest, &data())?;
            let size = if new > 0 {
                self.new_bytes += new;
                self.new_chunks += 1;
                new
            } else {
                repo.existing_chunk_size(&digest)?
            };
            self.sizes.insert(digest, size);
        }
        self.file_bytes += len as u64;
        match out.last_mut() {
            Some(last) if last.digest == digest => last.repeat += 1,
            _ => out.push(ChunkRef {
                digest,
                len: len as u32,
                repeat: 1,
            }),
        }
        Ok(())
    }

    /// Compressed bytes of the distinct chunks stored or referenced.
    pub fn stored_bytes(&self) -> u64 {
        self.sizes.values().sum()
    }
}

/// File-backup catalogs as referrers of chunks, for `gc`.
pub const REFERRER: super::gc::Referrer = super::gc::Referrer {
    prefix: "files",
    immutable: true,
    limit: MAX_CATALOG_BYTES,
    refs: catalog_refs,
};

fn catalog_refs(repo: &Repository, key: &str, bytes: &[u8]) -> Result<Vec<Digest>> {
    let what = key
        .strip_prefix("files/")
        .and_then(|k| k.strip_suffix(".json"))
        .unwrap_or(key);
    let c = Catalog::decode(repo, bytes, key, what)?;
    Ok(c.entries
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.digest))
        .collect())
}

pub(crate) fn catalog_key(vm: &str, id: &str) -> String {
    format!("files/{vm}/{id}.json")
}

/// Whether `id` names a file backup (ids of catalogs end in `-files`).
pub fn is_catalog_id(id: &str) -> bool {
    id.ends_with("-files")
        || id
            .rsplit_once("-files-")
            .is_some_and(|(_, n)| n.parse::<u32>().is_ok())
}

impl Repository {
    /// VMs with file backups.
    pub fn catalog_vms(&self) -> Result<Vec<String>> {
        let vms: Vec<String> = self
            .backend()
            .list("files")?
            .into_iter()
            .filter(|n| validate_name("VM", n).is_ok())
            .collect();
        if vms.is_empty() {
            self.confirm_identity()?;
        }
        Ok(vms)
    }

    /// File backup ids of a VM, oldest first.
    pub fn catalog_ids(&self, vm: &str) -> Result<Vec<String>> {
        validate_name("VM name", vm)?;
        let mut ids: Vec<String> = self
            .backend()
            .list(&format!("files/{vm}"))?
            .into_iter()
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .filter(|n| validate_name("backup id", n).is_ok())
            .collect();
        ids.sort();
        if ids.is_empty() {
            self.confirm_identity()?;
        }
        Ok(ids)
    }

    pub fn catalog(&self, vm: &str, id: &str) -> Result<Catalog> {
        validate_name("VM name", vm)?;
        validate_name("backup id", id)?;
        let key = catalog_key(vm, id);
        let bytes = self
            .backend()
            .get(&key, MAX_CATALOG_BYTES)?
            .ok_or_else(|| Error::not_found(format!("unknown file backup {id:?} of VM {vm}")))?;
        let c = Catalog::decode(self, &bytes, &key, &format!("{vm}/{id}"))?;
        if c.vm != vm || c.id != id {
            return Err(Error::corrupt(format!(
                "catalog {vm}/{id} names {:?}/{:?}",
                c.vm, c.id
            )));
        }
        Ok(c)
    }

    /// Publishes a file backup whose chunks are all stored, under a new
    /// time-based id ending in `-files`, created only if absent. Fills in
    /// `id`, `created` and `created_unix`.
    pub fn publish_catalog(&self, c: Catalog) -> Result<Catalog> {
        self.publish_catalog_at(c, std::time::SystemTime::now())
    }

    /// [`Repository::publish_catalog`] with the backup's time given: the
    /// seam tests use to lay out file backups over simulated days.
    pub(crate) fn publish_catalog_at(
        &self,
        c: Catalog,
        at: std::time::SystemTime,
    ) -> Result<Catalog> {
        self.publish_catalog_within(c, at, CatalogLimits::STORED)
    }

    /// [`Repository::publish_catalog_at`], refusing (before anything is
    /// written) a catalog over `limits`.
    pub(crate) fn publish_catalog_within(
        &self,
        mut c: Catalog,
        at: std::time::SystemTime,
        limits: CatalogLimits,
    ) -> Result<Catalog> {
        limits.check_entries(c.entries.len())?;
        c.format = c.needed_format();
        let now = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        c.created_unix = now.as_secs();
        c.created = rfc3339(c.created_unix);
        let stamp = rfc3339(c.created_unix)
            .replace(['-', ':'], "")
            .replace('T', "-")
            .trim_end_matches('Z')
            .to_string();
        let base = if self.create_only_is_atomic()? {
            stamp
        } else {
            format!(
                "{stamp}.{:03}-{}",
                now.subsec_millis(),
                super::random_hex(3)
            )
        };
        c.id = format!("{base}-files");
        for n in 1.. {
            // Sealed anew for each id: an encrypted one is bound to its key.
            let key = catalog_key(&c.vm, &c.id);
            let sealed = c.encode(self, &key)?;
            limits.check_bytes(sealed.len() as u64)?;
            if self.backend().put_new(&key, &sealed)? {
                break;
            }
            c.id = format!("{base}-files-{n}");
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests;
