//! Encrypted repositories: keys, chunk encryption, document MACs, key files.
//!
//! One random 256-bit master key per repository. Four subkeys are derived
//! from it with BLAKE3's `derive_key` (each its own context string):
//!
//! * chunk ids: `blake3::keyed_hash(id key, plain bytes)`. Equal plaintext
//!   dedups within the key; without the key an id says nothing about the
//!   content (no confirmation of a guessed block).
//! * chunk bodies: the zstd frame, encrypted with XChaCha20-Poly1305
//!   (RustCrypto `chacha20poly1305`) under a random 192-bit nonce, the
//!   chunk id as associated data, so a chunk moved to another id fails.
//!   Stored as `RFSE` ‖ nonce ‖ ciphertext+tag.
//! * documents (manifests, profiles): the `checksum` of `repo::sealed`
//!   becomes `mac`, `blake3::keyed_hash(mac key, field ‖ 0 ‖ body)`, so a
//!   forged or edited manifest is refused by name. A document with only a
//!   checksum is refused in an encrypted repository.
//! * file-backup catalogs (guest paths, link targets, owners, times):
//!   encrypted whole with XChaCha20-Poly1305 under a fourth subkey and a
//!   random nonce, bound by associated data to the field and the object
//!   key they are stored under (`repo::sealed::seal_encrypted`).
//!
//! `repo.json` carries the key's fingerprint (a fifth derived value), so
//! a wrong key is named before anything is read. A document's MAC does not
//! bind its key: a manifest swapped for another VM's or backup's fails the
//! name check of `Repository::manifest`.
//!
//! The key lives in a key file outside the repository (`init --encrypt`
//! writes it; keep a copy elsewhere: without it the repository cannot be
//! read). With a passphrase the master key is wrapped by XChaCha20-Poly1305
//! under a key from Argon2id (64 MiB, 3 passes) of the passphrase.

use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::chunk::Digest;
use crate::error::{Error, ErrorKind, Result};

const MAGIC: &[u8; 4] = b"RFSE";
const NONCE: usize = 24;
const KEY_FORMAT: &str = "recoverfs-key";
/// Argon2id cost: memory in KiB, passes, lanes.
const KDF_M_KIB: u32 = 64 * 1024;
const KDF_T: u32 = 3;
const KDF_P: u32 = 1;
/// The most a key file may ask for: a damaged or hostile one must not
/// make a load allocate terabytes or run for days.
const KDF_MAX_M_KIB: u32 = 1 << 20;
const KDF_MAX_T: u32 = 16;
const KDF_MAX_P: u32 = 16;
/// A key file is a few hundred bytes.
const MAX_KEY_FILE_BYTES: u64 = 64 << 10;

/// A repository's keys, derived from its master key.
#[derive(Clone)]
pub struct Keys {
    master: [u8; 32],
    id: [u8; 32],
    mac: [u8; 32],
    aead: XChaCha20Poly1305,
    /// Encrypted documents (file-backup catalogs): its own subkey, so a
    /// document can never be opened as a chunk or the other way round.
    doc_aead: XChaCha20Poly1305,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({})", self.fingerprint())
    }
}

impl Keys {
    pub fn generate() -> Keys {
        let mut m = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut m);
        Keys::from_master(m)
    }

    fn from_master(master: [u8; 32]) -> Keys {
        let enc = blake3::derive_key("recoverfs 2026 chunk encryption v1", &master);
        let doc = blake3::derive_key("recoverfs 2026 document encryption v1", &master);
        Keys {
            master,
            id: blake3::derive_key("recoverfs 2026 chunk id v1", &master),
            mac: blake3::derive_key("recoverfs 2026 document mac v1", &master),
            aead: XChaCha20Poly1305::new(&enc.into()),
            doc_aead: XChaCha20Poly1305::new(&doc.into()),
        }
    }

    /// Names the key (not secret): in `repo.json` and the key file.
    pub fn fingerprint(&self) -> String {
        let f = blake3::derive_key("recoverfs 2026 key fingerprint v1", &self.master);
        blake3::Hash::from(f).to_hex()[..32].to_string()
    }

    /// The keyed chunk id of plain bytes.
    pub fn chunk_id(&self, data: &[u8]) -> Digest {
        Digest(*blake3::keyed_hash(&self.id, data).as_bytes())
    }

    /// The MAC of a sealed document's body under `field` (a
    /// `blake3::Hash`: its `==` is constant-time).
    pub fn mac(&self, field: &str, body: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.mac);
        h.update(field.as_bytes());
        h.update(&[0]);
        h.update(body);
        h.finalize()
    }

    /// What an encrypted document is bound to: its field and the key of
    /// the object it is stored under, so one moved elsewhere fails.
    fn document_aad(field: &str, object: &str) -> Vec<u8> {
        let mut aad = b"recoverfs document v1\0".to_vec();
        aad.extend_from_slice(field.as_bytes());
        aad.push(0);
        aad.extend_from_slice(object.as_bytes());
        aad
    }

    /// Encrypts a document's body stored at `object`: nonce ‖ ciphertext+tag.
    pub fn seal_document(&self, field: &str, object: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .doc_aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &Self::document_aad(field, object),
                },
            )
            .map_err(|_| Error::invalid(format!("encrypt {field}")))?;
        let mut out = Vec::with_capacity(NONCE + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts and authenticates in place what [`Keys::seal_document`]
    /// made for `field` at `object`; `what` names it in errors.
    pub fn open_document<'a>(
        &self,
        field: &str,
        object: &str,
        stored: &'a mut [u8],
        what: &str,
    ) -> Result<&'a [u8]> {
        const TAG: usize = 16;
        if stored.len() < NONCE + TAG {
            return Err(Error::corrupt(format!("{what} is damaged or truncated")));
        }
        let (nonce, rest) = stored.split_at_mut(NONCE);
        let (ct, tag) = rest.split_at_mut(rest.len() - TAG);
        self.doc_aead
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                &Self::document_aad(field, object),
                ct,
                Tag::from_slice(tag),
            )
            .map_err(|_| {
                Error::corrupt(format!(
                    "{what} fails authentication (damaged, forged, or moved from another name)"
                ))
            })?;
        Ok(ct)
    }

    /// Encrypts a chunk's compressed bytes for storage under id `d`.
    pub fn seal_chunk(&self, d: &Digest, compressed: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: compressed,
                    aad: &d.0,
                },
            )
            .map_err(|_| Error::invalid("chunk encryption failed"))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts and authenticates a stored chunk of id `d` in place (no
    /// second buffer): the plain (compressed) bytes are the returned part
    /// of `stored`. On failure `stored` holds nothing to trust.
    pub fn open_chunk<'a>(&self, d: &Digest, stored: &'a mut [u8]) -> Result<&'a [u8]> {
        const TAG: usize = 16;
        if stored.len() < MAGIC.len() + NONCE + TAG || &stored[..MAGIC.len()] != MAGIC {
            return Err(Error::corrupt(format!(
                "chunk {d} is not an encrypted chunk"
            )));
        }
        let (nonce, rest) = stored[MAGIC.len()..].split_at_mut(NONCE);
        let (ct, tag) = rest.split_at_mut(rest.len() - TAG);
        self.aead
            .decrypt_in_place_detached(XNonce::from_slice(nonce), &d.0, ct, Tag::from_slice(tag))
            .map_err(|_| {
                Error::corrupt(format!(
                    "chunk {d} fails authentication (damaged, forged or moved)"
                ))
            })?;
        Ok(ct)
    }
}

/// What `repo.json` says about an encrypted repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionInfo {
    pub aead: String,
    pub chunk_id: String,
    pub mac: String,
    pub fingerprint: String,
}

impl EncryptionInfo {
    pub fn of(keys: &Keys) -> EncryptionInfo {
        EncryptionInfo {
            aead: "xchacha20poly1305".into(),
            chunk_id: "blake3-keyed".into(),
            mac: "blake3-keyed".into(),
            fingerprint: keys.fingerprint(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyFile {
    format: String,
    version: u32,
    fingerprint: String,
    created: String,
    /// Without a passphrase: the master key, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// With one: how the wrapping key is derived, and the wrapped key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf: Option<Kdf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wrapped: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kdf {
    algorithm: String,
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
    salt: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Decodes on bytes: a non-ASCII character is refused, never sliced
/// through (slicing a `&str` inside one panics).
fn unhex(s: &str, what: &str) -> Result<Vec<u8>> {
    let not_hex = || Error::corrupt(format!("{what} is not hex"));
    let digit = |b: u8| {
        (b as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(not_hex)
    };
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return Err(not_hex());
    }
    b.chunks_exact(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

impl Kdf {
    fn check(&self, what: &str) -> Result<()> {
        let over = |name: &str, v: u32, max: u32| {
            (v > max).then(|| {
                Error::corrupt(format!(
                    "{what} is damaged: KDF {name} {v} is over the bound {max}"
                ))
            })
        };
        if self.algorithm != "argon2id" {
            return Err(Error::corrupt(format!(
                "{what} is damaged: unknown KDF {:?}",
                self.algorithm
            )));
        }
        match over("m_cost_kib", self.m_cost_kib, KDF_MAX_M_KIB)
            .or_else(|| over("t_cost", self.t_cost, KDF_MAX_T))
            .or_else(|| over("p_cost", self.p_cost, KDF_MAX_P))
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn wrapping_key(passphrase: &str, kdf: &Kdf) -> Result<[u8; 32]> {
    kdf.check("key file")?;
    let params = argon2::Params::new(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost, Some(32))
        .map_err(|e| Error::corrupt(format!("key file KDF parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(
        passphrase.as_bytes(),
        &unhex(&kdf.salt, "key file salt")?,
        &mut out,
    )
    .map_err(|e| Error::invalid(format!("derive the key file's wrapping key: {e}")))?;
    Ok(out)
}

fn encode_key_file(keys: &Keys, passphrase: Option<&str>) -> Result<Vec<u8>> {
    let fingerprint = keys.fingerprint();
    let mut f = KeyFile {
        format: KEY_FORMAT.into(),
        version: 1,
        fingerprint: fingerprint.clone(),
        created: crate::util::rfc3339(crate::util::now_unix()),
        key: None,
        kdf: None,
        wrapped: None,
    };
    match passphrase {
        None => f.key = Some(hex(&keys.master)),
        Some(p) => {
            let mut salt = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut salt);
            let kdf = Kdf {
                algorithm: "argon2id".into(),
                m_cost_kib: KDF_M_KIB,
                t_cost: KDF_T,
                p_cost: KDF_P,
                salt: hex(&salt),
            };
            let wk = wrapping_key(p, &kdf)?;
            let mut nonce = [0u8; NONCE];
            rand::rngs::OsRng.fill_bytes(&mut nonce);
            let ct = XChaCha20Poly1305::new(&wk.into())
                .encrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: &keys.master,
                        aad: fingerprint.as_bytes(),
                    },
                )
                .map_err(|_| Error::invalid("wrap the key"))?;
            f.kdf = Some(kdf);
            f.wrapped = Some(format!("{}{}", hex(&nonce), hex(&ct)));
        }
    }
    let mut out = serde_json::to_vec_pretty(&f).expect("serializable");
    out.push(b'\n');
    Ok(out)
}

/// `path` with a directory part (`write_atomic` syncs the directory).
fn with_dir(path: &Path) -> std::path::PathBuf {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new(".").join(path),
        _ => path.to_path_buf(),
    }
}

/// Writes a new key file (mode 0600, atomically); refuses an existing one.
pub fn write_key_file(path: &Path, keys: &Keys, passphrase: Option<&str>) -> Result<()> {
    let bytes = encode_key_file(keys, passphrase)?;
    crate::util::write_atomic(&with_dir(path), &bytes, 0o600, false).map_err(|e| {
        if e.kind() == ErrorKind::AlreadyExists {
            Error::new(
                ErrorKind::AlreadyExists,
                format!("key file {} already exists", path.display()),
            )
        } else {
            e
        }
    })
}

/// Reads at most `max` bytes of `path`: a wrong path (a disk image, a
/// device) is refused, not read into memory.
fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(format!("read {what}"), e))?;
    let mut bytes = vec![];
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("read {what}"), e))?;
    if bytes.len() as u64 > max {
        return Err(Error::invalid(format!(
            "{what} is larger than {max} bytes: not a recoverfs key file"
        )));
    }
    Ok(bytes)
}

/// Reads a key file; `passphrase` is needed if it is protected by one.
pub fn load_key_file(path: &Path, passphrase: Option<&str>) -> Result<Keys> {
    let what = format!("key file {}", path.display());
    let bytes = read_bounded(path, MAX_KEY_FILE_BYTES, &what)?;
    let f: KeyFile = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("{what} is not a recoverfs key file ({e})")))?;
    if f.format != KEY_FORMAT || f.version != 1 {
        return Err(Error::invalid(format!(
            "{what} is not a recoverfs key file"
        )));
    }
    let master = match (&f.key, &f.kdf, &f.wrapped) {
        (Some(k), _, _) => unhex(k, &what)?,
        (None, Some(kdf), Some(w)) => {
            kdf.check(&what)?;
            let p = passphrase.ok_or_else(|| {
                Error::invalid(format!(
                    "{what} is protected by a passphrase: set RECOVERFS_PASSPHRASE or give --passphrase-file"
                ))
            })?;
            let w = unhex(w, &what)?;
            if w.len() < NONCE {
                return Err(Error::corrupt(format!("{what} is damaged")));
            }
            let (nonce, ct) = w.split_at(NONCE);
            XChaCha20Poly1305::new(&wrapping_key(p, kdf)?.into())
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: f.fingerprint.as_bytes(),
                    },
                )
                .map_err(|_| Error::not_permitted(format!("wrong passphrase for {what}")))?
        }
        _ => return Err(Error::corrupt(format!("{what} holds no key"))),
    };
    let master: [u8; 32] = master
        .try_into()
        .map_err(|_| Error::corrupt(format!("{what} holds a key of the wrong length")))?;
    let keys = Keys::from_master(master);
    if keys.fingerprint() != f.fingerprint {
        return Err(Error::corrupt(format!(
            "{what} is damaged: its key does not match its fingerprint"
        )));
    }
    Ok(keys)
}

/// Rewrites a key file with a new passphrase (`None`: none), atomically.
pub fn change_passphrase(path: &Path, old: Option<&str>, new: Option<&str>) -> Result<Keys> {
    let keys = load_key_file(path, old)?;
    let bytes = encode_key_file(&keys, new)?;
    crate::util::write_atomic(&with_dir(path), &bytes, 0o600, true)?;
    Ok(keys)
}

/// Where a process finds its key: a key file and, if it is protected, a
/// passphrase.
#[derive(Debug, Clone, Default)]
pub struct KeySource {
    pub key_file: Option<std::path::PathBuf>,
    pub passphrase: Option<String>,
}

impl KeySource {
    /// The keys, if a key file is given.
    pub fn load(&self) -> Result<Option<Keys>> {
        match &self.key_file {
            None => Ok(None),
            Some(p) => load_key_file(p, self.passphrase.as_deref()).map(Some),
        }
    }
}

static PROCESS_KEYS: std::sync::OnceLock<KeySource> = std::sync::OnceLock::new();

/// Sets where `Repository::open` finds keys (the CLI's `--key-file`, once).
pub fn set_process_key_source(s: KeySource) {
    let _ = PROCESS_KEYS.set(s);
}

pub fn process_key_source() -> KeySource {
    PROCESS_KEYS.get().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_a_flipped_bit_or_another_id_is_refused() {
        let k = Keys::generate();
        let d = k.chunk_id(b"hello");
        assert_eq!(d, k.chunk_id(b"hello"), "dedup within the key");
        assert_ne!(d, Keys::generate().chunk_id(b"hello"));
        assert_ne!(d, Digest::of(b"hello"), "ids are keyed");
        let s = k.seal_chunk(&d, b"compressed").unwrap();
        assert_eq!(k.open_chunk(&d, &mut s.clone()).unwrap(), b"compressed");
        let mut bad = s.clone();
        bad[40] ^= 1;
        let e = k.open_chunk(&d, &mut bad).unwrap_err();
        assert!(e.to_string().contains(&d.to_string()), "{e}");
        assert!(k.open_chunk(&k.chunk_id(b"other"), &mut s.clone()).is_err());
        assert!(Keys::generate().open_chunk(&d, &mut s.clone()).is_err());
    }

    #[test]
    fn a_key_file_asking_for_a_4_tib_kdf_is_corrupt_before_any_derivation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_key_file(&p, &Keys::generate(), Some("pw")).unwrap();
        let mut f: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f["kdf"]["m_cost_kib"] = u32::MAX.into();
        std::fs::write(&p, serde_json::to_vec(&f).unwrap()).unwrap();
        // Reported as damaged even before a passphrase is asked for, and
        // never derived with (that would allocate 4 TiB).
        for pw in [None, Some("pw")] {
            let e = load_key_file(&p, pw).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains("m_cost_kib"), "{e}");
        }
        f["kdf"]["m_cost_kib"] = KDF_M_KIB.into();
        f["kdf"]["t_cost"] = u32::MAX.into();
        std::fs::write(&p, serde_json::to_vec(&f).unwrap()).unwrap();
        let e = load_key_file(&p, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    }

    #[test]
    fn a_key_file_with_non_ascii_hex_is_refused_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        write_key_file(&plain, &Keys::generate(), None).unwrap();
        let wrapped = dir.path().join("wrapped");
        write_key_file(&wrapped, &Keys::generate(), Some("pw")).unwrap();
        // "aé…": byte 2 falls inside the two-byte 'é'.
        let bad = "a\u{e9}b".repeat(16);
        for (p, field) in [
            (&plain, &["key"][..]),
            (&wrapped, &["wrapped"][..]),
            (&wrapped, &["kdf", "salt"][..]),
        ] {
            let mut f: serde_json::Value =
                serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            let mut v = &mut f;
            for k in field {
                v = &mut v[*k];
            }
            *v = bad.clone().into();
            let edited = dir.path().join("edited");
            std::fs::write(&edited, serde_json::to_vec(&f).unwrap()).unwrap();
            let e = load_key_file(&edited, Some("pw")).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{field:?}: {e}");
            assert!(e.to_string().contains("hex"), "{field:?}: {e}");
        }
        // A huge file (a wrong path, a disk image) is refused unread.
        let huge = dir.path().join("huge");
        std::fs::write(&huge, vec![b' '; MAX_KEY_FILE_BYTES as usize + 1]).unwrap();
        let e = load_key_file(&huge, None).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn a_key_file_with_a_passphrase_needs_it_and_can_change_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let k = Keys::generate();
        write_key_file(&p, &k, Some("correct horse")).unwrap();
        assert!(write_key_file(&p, &k, None).is_err(), "never overwritten");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains(&hex(&k.master)), "the key is wrapped");
        let e = load_key_file(&p, None).unwrap_err();
        assert!(e.to_string().contains("RECOVERFS_PASSPHRASE"), "{e}");
        let e = load_key_file(&p, Some("wrong")).unwrap_err();
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
        let back = load_key_file(&p, Some("correct horse")).unwrap();
        assert_eq!(back.fingerprint(), k.fingerprint());
        change_passphrase(&p, Some("correct horse"), Some("new one")).unwrap();
        assert!(load_key_file(&p, Some("correct horse")).is_err());
        let back = load_key_file(&p, Some("new one")).unwrap();
        assert_eq!(back.chunk_id(b"x"), k.chunk_id(b"x"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
