//! The backup repository: content-addressed, compressed, verified chunks
//! plus one manifest per backup, on a pluggable [`Backend`].
//!
//! Layout (keys mirror directories):
//! ```text
//! repo.json                          identity: format, version, random id
//! chunks/<hex[0..4]>/<hex>           zstd frame of the chunk's plain bytes
//!                                    (version 2: or the bytes ‖ trailer)
//! backups/<vm>/<backup-id>.json      checksummed manifest
//! profiles/<vm>.json                 checksummed operational profile
//! locks/{backup,gc}-<random>.json    writer and collector locks (`locks`)
//! ```
//! A backup writes all its chunks first and its manifest last, so a reader
//! never sees a manifest whose chunks are missing.

pub mod backend;
pub mod catalog;
pub mod chunk;
pub mod chunk_index;
pub mod crypto;
pub mod forget;
pub mod gc;
pub mod limits;
pub mod locks;
pub mod manifest;
pub mod pins;
pub mod retention;
pub mod s3;
pub mod sealed;
pub mod sparse;
#[cfg(test)]
pub mod testing;
pub mod unconfirmed;
pub mod verify;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use backend::{Backend, LocalDir};
pub use chunk::Digest;
pub use chunk_index::ChunkIndex;
pub use manifest::{DiskManifest, Manifest};

use crate::error::{Error, Result};
use crate::util::validate_name;

const INFO_KEY: &str = "repo.json";
const REPO_FORMAT: &str = "recoverfs-repository";
/// The version new repositories get. 2 added chunks stored raw when zstd
/// cannot shrink them (`chunk`); a version-1 repository is read and
/// written with zstd frames only, so older binaries can still read it.
const REPO_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoInfo {
    pub format: String,
    pub version: u32,
    /// Random identity; a staging directory records it to refuse mixing repositories.
    pub id: String,
    pub created: String,
    /// Present when chunks are encrypted and documents MACed (`crypto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crypto::EncryptionInfo>,
}

pub struct Repository {
    backend: Box<dyn Backend>,
    info: RepoInfo,
    /// The repository's keys, when it is encrypted.
    keys: Option<crypto::Keys>,
}

/// Summary of one backup for `list`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    pub vm: String,
    pub id: String,
    /// `disk` (a manifest) or `files` (a file backup's catalog).
    pub kind: &'static str,
    pub created: String,
    pub disks: usize,
    pub virtual_size: u64,
    pub stored_bytes: u64,
    pub new_bytes: u64,
}

/// One backup in `list`: its summary, or why its manifest (`disk`) or
/// catalog (`files`) does not read. In JSON the summary's fields, or
/// `vm`, `id`, `kind` and `error`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Listed {
    Backup(BackupSummary),
    Damaged {
        vm: String,
        id: String,
        kind: &'static str,
        error: String,
    },
}

/// Where `verify --repair` keeps damaged chunks it set aside (and an
/// empty object for each one it found missing), named by chunk id.
pub const QUARANTINE: &str = "quarantine";

impl Repository {
    /// Opens an existing repository; a missing one or a directory that is
    /// not a repository is a clear error.
    /// An encrypted one takes its key from the process's key source
    /// (`--key-file`, `RECOVERFS_KEY_FILE`).
    pub fn open(spec: &str) -> Result<Arc<Repository>> {
        let backend = Self::backend_for(spec, false, &[])?;
        Self::with_keys(backend, Self::process_keys()?)
    }

    /// Opens an existing repository with explicit keys (or none).
    pub fn open_keyed(spec: &str, keys: Option<crypto::Keys>) -> Result<Arc<Repository>> {
        Self::with_keys(Self::backend_for(spec, false, &[])?, keys)
    }

    fn process_keys() -> Result<Option<crypto::Keys>> {
        crypto::process_key_source().load()
    }

    /// Reads `repo.json` and checks `keys` against it: an encrypted
    /// repository needs its key, a plain one refuses a key (a stripped
    /// `encryption` must not pass for a plain repository).
    fn with_keys(backend: Box<dyn Backend>, keys: Option<crypto::Keys>) -> Result<Arc<Repository>> {
        let info = Self::read_info(backend.as_ref())?;
        Self::with_info(backend, info, keys)
    }

    /// [`Repository::with_keys`] with `info` already read.
    fn with_info(
        backend: Box<dyn Backend>,
        info: RepoInfo,
        keys: Option<crypto::Keys>,
    ) -> Result<Arc<Repository>> {
        let loc = backend.location();
        match (&info.encryption, &keys) {
            (Some(_), None) => {
                return Err(Error::invalid(format!(
                    "repository {loc} is encrypted: give its key with --key-file FILE or RECOVERFS_KEY_FILE"
                )))
            }
            (Some(e), Some(k)) if e.fingerprint != k.fingerprint() => {
                return Err(Error::not_permitted(format!(
                    "wrong key for repository {loc}: the key file has fingerprint {}, the repository needs {}",
                    k.fingerprint(),
                    e.fingerprint
                )))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(format!(
                    "repository {loc} is not encrypted, but a key file was given"
                )))
            }
            _ => {}
        }
        backend.keep_space_reserve();
        Ok(Arc::new(Repository {
            backend,
            info,
            keys,
        }))
    }

    /// `open` with a fixed delay before every chunk read (benchmarks).
    pub fn open_delayed(spec: &str, delay: std::time::Duration) -> Result<Arc<Repository>> {
        let backend: Box<dyn Backend> = Box::new(backend::Delayed {
            inner: Self::backend_for(spec, false, &[])?,
            delay,
        });
        Self::with_keys(backend, Self::process_keys()?)
    }

    /// Opens a repository, creating it if `spec` does not exist or is an
    /// empty directory. Used by `backup` and `init`. A new repository is
    /// encrypted with the process's key if one is given.
    pub fn open_or_create(spec: &str) -> Result<(Arc<Repository>, bool)> {
        Self::open_or_create_keyed(spec, Self::process_keys()?)
    }

    /// [`Repository::open_or_create`] with explicit keys (`None`: plain).
    pub fn open_or_create_keyed(
        spec: &str,
        keys: Option<crypto::Keys>,
    ) -> Result<(Arc<Repository>, bool)> {
        let backend = Self::backend_for(spec, true, &[])?;
        if backend.get(INFO_KEY, limits::MAX_META_BYTES)?.is_some() {
            return Ok((Self::with_keys(backend, keys)?, false));
        }
        if !backend.list("")?.is_empty() {
            // A writer creating the repository at this moment writes
            // repo.json before anything else: look again before calling
            // the place foreign.
            for _ in 0..10 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if backend.get(INFO_KEY, limits::MAX_META_BYTES)?.is_some() {
                    return Ok((Self::with_keys(backend, keys)?, false));
                }
            }
            return Err(Error::invalid(format!(
                "{} is not a recoverfs repository (no repo.json) and is not empty",
                backend.location()
            )));
        }
        let info = RepoInfo {
            format: REPO_FORMAT.into(),
            version: REPO_VERSION,
            id: random_hex(16),
            created: crate::util::rfc3339(crate::util::now_unix()),
            encryption: keys.as_ref().map(crypto::EncryptionInfo::of),
        };
        let body = serde_json::to_vec_pretty(&info).expect("serializable");
        let created = backend.put_new(INFO_KEY, &body)?;
        // Whoever created it, use what is stored (on a store that ignores
        // conditional PUTs, the last of two creators wins).
        Ok((Self::with_keys(backend, keys)?, created))
    }

    /// Opens a repository on an explicit backend (tests, other stores).
    pub fn open_backend(backend: Box<dyn Backend>) -> Result<Arc<Repository>> {
        Self::with_keys(backend, None)
    }

    /// [`Repository::open_backend`] with explicit keys (or none).
    pub fn open_backend_keyed(
        backend: Box<dyn Backend>,
        keys: Option<crypto::Keys>,
    ) -> Result<Arc<Repository>> {
        Self::with_keys(backend, keys)
    }

    /// Opens an existing repository with explicit S3 settings (AWS_* names)
    /// that take precedence over the environment.
    pub fn open_with(spec: &str, s3_settings: &[(String, String)]) -> Result<Arc<Repository>> {
        let backend = Self::backend_for(spec, false, s3_settings)?;
        Self::with_keys(backend, Self::process_keys()?)
    }

    /// Opens the repository at `spec` from `recorded`, the copy of its
    /// identity a staging directory keeps, because the store does not
    /// answer now (a degraded start, `unconfirmed`): nothing is asked of
    /// the store until it answers as that repository. `recorded_at` is
    /// where the staging's repository was: another `spec` is refused (a
    /// typo must not start a daemon that never finds its repository).
    pub fn open_recorded(
        spec: &str,
        recorded: RepoInfo,
        recorded_at: &str,
    ) -> Result<Arc<Repository>> {
        let backend = Self::backend_unchecked(spec)?;
        let loc = backend.location();
        if loc != recorded_at {
            return Err(Error::invalid(format!(
                "repository {loc} is not the one the staging directory records ({recorded_at})"
            )));
        }
        Self::check_info(&loc, &recorded)?;
        let backend = Box::new(unconfirmed::Unconfirmed::new(backend, &recorded));
        Self::with_info(backend, recorded, Self::process_keys()?)
    }

    /// The backend for `spec` without looking at the store: a local
    /// directory that is not there (yet) is taken as named.
    fn backend_unchecked(spec: &str) -> Result<Box<dyn Backend>> {
        let path = Path::new(spec);
        if spec.contains("://") || path.exists() {
            return Self::backend_for(spec, false, &[]);
        }
        let abs = std::path::absolute(path).map_err(|e| Error::io(format!("resolve {spec}"), e))?;
        Ok(Box::new(LocalDir::new(&abs)))
    }

    fn backend_for(
        spec: &str,
        create: bool,
        s3_settings: &[(String, String)],
    ) -> Result<Box<dyn Backend>> {
        if spec.starts_with("s3://") {
            return Ok(Box::new(s3::S3Backend::open(spec, s3_settings)?));
        }
        if spec.contains("://") {
            return Err(Error::invalid(format!(
                "unsupported repository URL {spec:?}: use a directory or s3://BUCKET[/PREFIX]"
            )));
        }
        let path = Path::new(spec);
        if !path.exists() {
            if !create {
                return Err(Error::not_found(format!(
                    "repository {spec} does not exist"
                )));
            }
            std::fs::create_dir_all(path)
                .map_err(|e| Error::io(format!("create repository {spec}"), e))?;
        } else if !path.is_dir() {
            return Err(Error::invalid(format!(
                "repository {spec} is not a directory"
            )));
        }
        let abs =
            std::fs::canonicalize(path).map_err(|e| Error::io(format!("resolve {spec}"), e))?;
        Ok(Box::new(LocalDir::new(&abs)))
    }

    fn read_info(backend: &dyn Backend) -> Result<RepoInfo> {
        let loc = backend.location();
        let bytes = backend
            .get(INFO_KEY, limits::MAX_META_BYTES)?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "{loc} is not a recoverfs repository (no repo.json)"
                ))
            })?;
        let info: RepoInfo = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("{loc}/repo.json is damaged ({e})")))?;
        Self::check_info(&loc, &info)?;
        Ok(info)
    }

    /// The format and version this binary reads and writes, checked on
    /// `repo.json` as read, and on a staging directory's copy of it.
    fn check_info(loc: &str, info: &RepoInfo) -> Result<()> {
        if info.format != REPO_FORMAT {
            return Err(Error::invalid(format!(
                "{loc} is not a recoverfs repository"
            )));
        }
        if !(1..=REPO_VERSION).contains(&info.version) {
            return Err(Error::invalid(format!(
                "{loc}: unsupported repository version {}",
                info.version
            )));
        }
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// Its identity, as read at open (or as a staging directory recorded
    /// it, `open_recorded`).
    pub fn info(&self) -> &RepoInfo {
        &self.info
    }

    /// Checks that the store still answers as this repository (its
    /// `repo.json`, with its id) before an absence is believed: a
    /// directory moved away, an empty one in its place (a share not
    /// mounted) or another repository there would otherwise pass for a
    /// repository whose backups are gone. Unreachable is an I/O error,
    /// never `NotFound`.
    pub fn confirm_identity(&self) -> Result<()> {
        let loc = self.location();
        let unreachable = |why: String| {
            Error::new(
                crate::error::ErrorKind::Io,
                format!("repository {loc} does not answer as itself: {why}"),
            )
        };
        let bytes = match self.backend.get(INFO_KEY, limits::MAX_META_BYTES) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(unreachable(
                    "no repo.json (moved away, or a share not mounted?)".into(),
                ))
            }
            Err(e) => return Err(unreachable(format!("repo.json cannot be read: {e}"))),
        };
        match serde_json::from_slice::<RepoInfo>(&bytes) {
            Ok(i) if i.id == self.info.id => Ok(()),
            Ok(i) => Err(unreachable(format!(
                "it holds another repository now (id {}, not {})",
                i.id, self.info.id
            ))),
            Err(e) => Err(unreachable(format!("repo.json is damaged ({e})"))),
        }
    }

    /// `v`, an answer that something is absent, once the repository has
    /// confirmed it is itself ([`Repository::confirm_identity`]).
    fn absent<T>(&self, v: T) -> Result<T> {
        self.confirm_identity().map(|()| v)
    }

    /// The key's fingerprint if the repository is encrypted.
    pub fn encryption(&self) -> Option<&crypto::EncryptionInfo> {
        self.info.encryption.as_ref()
    }

    /// The id of a chunk's plain bytes: BLAKE3, keyed when encrypted.
    pub fn chunk_id(&self, data: &[u8]) -> Digest {
        match &self.keys {
            Some(k) => k.chunk_id(data),
            None => Digest::of(data),
        }
    }

    /// Seals a document (manifest, profile) the way this repository does:
    /// checksum, or MAC when encrypted.
    pub fn seal(&self, field: &str, body: &impl Serialize) -> Result<Vec<u8>> {
        sealed::seal_with(field, body, self.keys.as_ref())
    }

    /// Checks and decodes a document sealed by [`Repository::seal`].
    pub fn unseal<T: serde::de::DeserializeOwned>(
        &self,
        bytes: &[u8],
        field: &str,
        what: &str,
    ) -> Result<T> {
        sealed::unseal_with(bytes, field, what, self.keys.as_ref())
    }

    /// Decodes a stored manifest (authenticated when encrypted).
    pub fn decode_manifest(&self, bytes: &[u8], what: &str) -> Result<Manifest> {
        Manifest::decode_with(bytes, what, self.keys.as_ref())
    }

    pub fn location(&self) -> String {
        self.backend.location()
    }

    pub fn retries(&self) -> u64 {
        self.backend.retries()
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn vms(&self) -> Result<Vec<String>> {
        let vms: Vec<String> = self
            .backend
            .list("backups")?
            .into_iter()
            .filter(|n| validate_name("VM", n).is_ok())
            .collect();
        match vms.is_empty() {
            true => self.absent(vms),
            false => Ok(vms),
        }
    }

    /// `[vm]` if it has backups (an error naming it if not), else every VM.
    pub fn vms_or(&self, vm: Option<&str>) -> Result<Vec<String>> {
        let Some(v) = vm else {
            return self.vms();
        };
        if self.backup_ids(v)?.is_empty() {
            return Err(Error::not_found(format!(
                "unknown VM {v:?}: no backups in {}",
                self.location()
            )));
        }
        Ok(vec![v.to_string()])
    }

    /// Backup ids of a VM, oldest first.
    pub fn backup_ids(&self, vm: &str) -> Result<Vec<String>> {
        validate_name("VM name", vm)?;
        let mut ids: Vec<String> = self
            .backend
            .list(&format!("backups/{vm}"))?
            .into_iter()
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .filter(|n| match validate_name("backup id", n) {
                Ok(()) => true,
                Err(e) => {
                    // A stray file must not make every command on the VM fail.
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| tracing::warn!(vm, "ignoring backups/{vm}/{n}.json: {e}"));
                    false
                }
            })
            .collect();
        ids.sort_by(|a, b| id_order(a, b));
        match ids.is_empty() {
            true => self.absent(ids),
            false => Ok(ids),
        }
    }

    pub fn manifest(&self, vm: &str, id: &str) -> Result<Manifest> {
        validate_name("VM name", vm)?;
        validate_name("backup id", id)?;
        let key = manifest_key(vm, id);
        let Some(bytes) = self.backend.get(&key, limits::MAX_MANIFEST_BYTES)? else {
            // An unreachable repository is an error, not "unknown".
            return Err(match self.backup_ids(vm)?.is_empty() {
                true => Error::not_found(format!(
                    "unknown VM {vm:?}: no backups in {}",
                    self.location()
                )),
                false => Error::not_found(format!("unknown backup {id:?} of VM {vm}")),
            });
        };
        let m = self.decode_manifest(&bytes, &format!("{vm}/{id}"))?;
        if m.vm != vm || m.id != id {
            return Err(Error::corrupt(format!(
                "manifest {vm}/{id} names {}/{}",
                m.vm, m.id
            )));
        }
        Ok(m)
    }

    /// Whether a backup's manifest exists: `Ok(false)` only when the
    /// repository, answering as itself, says it does not; an unreachable
    /// one (or one whose identity cannot be read) is an error.
    pub fn has_manifest(&self, vm: &str, id: &str) -> Result<bool> {
        validate_name("VM name", vm)?;
        validate_name("backup id", id)?;
        match self.backend.exists(&manifest_key(vm, id))? {
            true => Ok(true),
            false => self.absent(false),
        }
    }

    /// The newest backup of a VM, or the given one.
    pub fn resolve(&self, vm: &str, id: Option<&str>) -> Result<Manifest> {
        match id {
            Some(id) => self.manifest(vm, id),
            None => {
                let ids = self.backup_ids(vm)?;
                let last = ids.last().ok_or_else(|| {
                    Error::not_found(format!(
                        "unknown VM {vm:?}: no backups in {}",
                        self.location()
                    ))
                })?;
                self.manifest(vm, last)
            }
        }
    }

    /// Every backup of every VM, disk and file backups alike. A damaged
    /// manifest or catalog is one `Damaged` entry, so one bad document
    /// hides none of the others; any other failure (an unreachable
    /// repository) fails the whole listing.
    pub fn list_backups(&self) -> Result<Vec<Listed>> {
        fn damaged(e: Error, vm: &str, id: &str, kind: &'static str) -> Result<Listed> {
            match e.kind() {
                crate::error::ErrorKind::Corrupt => Ok(Listed::Damaged {
                    vm: vm.to_string(),
                    id: id.to_string(),
                    kind,
                    error: e.to_string(),
                }),
                _ => Err(e),
            }
        }
        let mut out = vec![];
        for vm in self.vms()? {
            for id in self.backup_ids(&vm)? {
                let m = match self.manifest(&vm, &id) {
                    Ok(m) => m,
                    Err(e) => {
                        out.push(damaged(e, &vm, &id, "disk")?);
                        continue;
                    }
                };
                out.push(Listed::Backup(BackupSummary {
                    vm: vm.clone(),
                    id,
                    kind: "disk",
                    created: m.created.clone(),
                    disks: m.disks.len(),
                    virtual_size: m.virtual_size(),
                    stored_bytes: m.stored_bytes(),
                    new_bytes: m.new_bytes(),
                }));
            }
        }
        for vm in self.catalog_vms()? {
            for id in self.catalog_ids(&vm)? {
                let c = match self.catalog(&vm, &id) {
                    Ok(c) => c,
                    Err(e) => {
                        out.push(damaged(e, &vm, &id, "files")?);
                        continue;
                    }
                };
                out.push(Listed::Backup(BackupSummary {
                    vm: vm.clone(),
                    id,
                    kind: "files",
                    created: c.created.clone(),
                    disks: 0,
                    virtual_size: c.file_bytes,
                    stored_bytes: c.stored_bytes,
                    new_bytes: c.new_bytes,
                }));
            }
        }
        // Each VM's backups of both kinds together, in time order, then
        // its damaged ones (no time to place them by).
        let key = |l: &Listed| match l {
            Listed::Backup(b) => (b.vm.clone(), false, b.created.clone(), b.id.clone()),
            Listed::Damaged { vm, id, .. } => (vm.clone(), true, String::new(), id.clone()),
        };
        out.sort_by_cached_key(key);
        Ok(out)
    }

    pub fn has_chunk(&self, d: &Digest) -> Result<bool> {
        self.backend.exists(&d.key())
    }

    /// Stores a chunk unless present. Returns the compressed bytes written
    /// (0 if it was already there). Concurrent writers of the same chunk
    /// are harmless: the content is identical by construction.
    ///
    /// A stored object is trusted without being read (reading every
    /// deduplicated chunk would cost a backup its whole size in GETs), but
    /// not at a size no encoding of `data` has: empty, or longer than the
    /// worst case. Such an object is replaced (atomically), so a damaged
    /// chunk is not reused by every later backup. Damage that keeps a
    /// plausible size is what `verify` finds.
    pub fn put_chunk(&self, d: &Digest, data: &[u8]) -> Result<u64> {
        match self.chunk_stored_size(d)? {
            Some(n) if n > 0 && n <= limits::max_chunk_object(data.len()) => return Ok(0),
            Some(n) => {
                tracing::warn!(chunk = %d.key(), "a stored chunk of {n} bytes cannot hold its {} bytes: writing it again", data.len());
            }
            None => {}
        }
        let mut stored = chunk::encode(data, self.info.version >= 2)?;
        if let Some(k) = &self.keys {
            stored = k.seal_chunk(d, &stored)?;
        }
        self.backend.put(&d.key(), &stored)?;
        Ok(stored.len() as u64)
    }

    /// Chunks `verify --repair` set aside (or found missing), from
    /// `quarantine/`: a backup must not name one again unless it has been
    /// stored again since (see `writer::stored_bytes_after`).
    pub fn quarantined(&self) -> Result<std::collections::HashSet<Digest>> {
        Ok(self
            .backend
            .list(QUARANTINE)?
            .iter()
            .filter_map(|n| Digest::from_hex(n).ok())
            .collect())
    }

    pub fn chunk_stored_size(&self, d: &Digest) -> Result<Option<u64>> {
        self.backend.size(&d.key())
    }

    /// Stored size of a chunk a backup found, or relies on: one that is
    /// not there is an error, since a manifest naming it would not read.
    pub fn existing_chunk_size(&self, d: &Digest) -> Result<u64> {
        self.chunk_stored_size(d)?.ok_or_else(|| {
            Error::corrupt(format!(
                "chunk {} is missing from the repository although a backup relies on it (removed by a gc that did not see the backup's lock?); nothing was published: run the backup again, then verify",
                d.to_hex()
            ))
        })
    }

    /// Reads and verifies a chunk. `what` names the chunk's place (VM,
    /// backup, disk, block) for the error. Returns plain bytes and the
    /// number of bytes transferred from the repository.
    pub fn read_chunk(
        &self,
        d: &Digest,
        len: usize,
        what: &dyn std::fmt::Display,
    ) -> Result<(Vec<u8>, u64)> {
        let got = self.backend.get(&d.key(), limits::max_chunk_object(len));
        let (data, n) =
            self.open_chunk(d, got.map(|o| o.map(backend::ObjectBuf::from)), len, what)?;
        Ok((data.into_vec(), n))
    }

    /// The GET of a chunk's object, for the fetch engine to await; then
    /// [`Repository::open_chunk`] turns its outcome into plain bytes.
    pub fn chunk_request(&self, d: &Digest, len: usize) -> backend::GetFuture {
        self.backend
            .get_async(&d.key(), limits::max_chunk_object(len))
    }

    /// A chunk the repository answered is absent: missing (damage) only
    /// once the repository confirms it is itself; a repository moved away
    /// or a share not mounted is unreachable instead (an I/O error that
    /// ends when it is back), not a damaged backup.
    fn missing_chunk(&self, d: &Digest, what: &dyn std::fmt::Display) -> Error {
        match self.confirm_identity() {
            Ok(()) => Error::corrupt(format!(
                "chunk {d} of {what} is missing from the repository"
            )),
            Err(e) => e.context(format!("chunk {d} of {what}")),
        }
    }

    /// Decrypts, decompresses and verifies a fetched chunk object; plain
    /// bytes (in the fetched buffer when stored raw and unencrypted) and
    /// the number of bytes transferred.
    pub fn open_chunk(
        &self,
        d: &Digest,
        got: backend::Got,
        len: usize,
        what: &dyn std::fmt::Display,
    ) -> Result<(backend::ObjectBuf, u64)> {
        let mut stored = got
            .map_err(|e| e.context(format!("chunk {d} of {what}")))?
            .ok_or_else(|| self.missing_chunk(d, what))?;
        let n = stored.len() as u64;
        let id_of = |b: &[u8]| self.chunk_id(b);
        let data = match &self.keys {
            // In place: no second buffer for the plain frame.
            Some(k) => {
                let frame = k.open_chunk(d, &mut stored).map_err(|e| e.context(what))?;
                chunk::decode_with(frame, d, len, id_of).map(backend::ObjectBuf::from)
            }
            None => chunk::decode_owned(stored, d, len, id_of),
        }
        .map_err(|e| e.context(what))?;
        Ok((data, n))
    }

    /// Whether backup ids alone keep concurrent writers apart (see
    /// `Backend::create_only_is_atomic`).
    pub fn create_only_is_atomic(&self) -> Result<bool> {
        self.backend.create_only_is_atomic()
    }

    /// Writes a manifest last, never replacing an existing backup.
    pub fn put_manifest(&self, m: &Manifest) -> Result<bool> {
        limits::check_blocks(m.blocks())
            .map_err(|e| e.context(format!("backup {}/{}", m.vm, m.id)))?;
        let bytes = m.encode_with(self.keys.as_ref())?;
        limits::check_manifest_len(bytes.len() as u64)
            .map_err(|e| e.context(format!("backup {}/{}", m.vm, m.id)))?;
        self.backend.put_new(&manifest_key(&m.vm, &m.id), &bytes)
    }
}

/// Time order of backup ids: `YYYYMMDD-HHMMSS`, maybe `.mmm-<hex>`, maybe
/// `-<n>` for the n-th in one second. Digit runs compare as numbers, so
/// `…-10` follows `…-9` (as text it would not); the fixed-width time
/// fields compare as before.
fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> impl Iterator<Item = &str> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (run, tail) = rest.split_at(end);
            rest = tail;
            Some(run)
        })
    }
    let key = |r: &str| {
        if r.starts_with(|c: char| c.is_ascii_digit()) {
            let t = r.trim_start_matches('0');
            (0u8, t.len(), t.to_string())
        } else {
            (1u8, 0, r.to_string())
        }
    };
    runs(a)
        .map(key)
        .cmp(runs(b).map(key))
        .then_with(|| a.cmp(b))
}

fn manifest_key(vm: &str, id: &str) -> String {
    format!("backups/{vm}/{id}.json")
}

pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod dedup_tests;

#[cfg(test)]
mod id_tests;
#[cfg(test)]
mod version_tests;

#[cfg(test)]
mod missing_tests;
