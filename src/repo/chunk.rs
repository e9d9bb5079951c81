//! Chunks: fixed-size pieces of a disk, addressed by the BLAKE3 digest of
//! their plain bytes and stored zstd-compressed. Decoding always verifies
//! the digest, so damaged data is never served.
//!
//! **Stored form.** A chunk object is one zstd frame, or, when zstd would
//! not make it smaller (random, encrypted or already compressed guest
//! data), its plain bytes followed by an 8-byte trailer ([`RAW_TRAILER`]),
//! as proxmox-backup stores blobs that do not compress. Such a chunk is
//! served in place: the fetched buffer is truncated to the plain bytes and
//! hashed, with no decompression copy (a fetched MiB costs one memory copy
//! fewer). The two forms cannot be confused: a zstd frame begins with the
//! zstd magic number, and a chunk whose plain bytes begin with it is always
//! stored as a zstd frame. Anything else is corruption. The raw form came
//! with repository version 2: a version-1 repository is still read and
//! written, with zstd frames only, so binaries from before can read it;
//! they refuse a version-2 repository by its version.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::backend::ObjectBuf;
use crate::error::{Error, Result};

/// Smallest and largest allowed chunk size; a power of two in between.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
pub const MAX_CHUNK_SIZE: u64 = 8 << 20;
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
const ZSTD_LEVEL: i32 = 3;

pub fn validate_chunk_size(size: u64) -> Result<u32> {
    if size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(size as u32)
    } else {
        Err(Error::invalid(format!(
            "invalid chunk size {size}: must be a power of two from 64K to 8M"
        )))
    }
}

/// A BLAKE3 digest, shown and serialized as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(s: &str) -> Result<Self> {
        blake3::Hash::from_hex(s)
            .map(|h| Digest(*h.as_bytes()))
            .map_err(|_| Error::corrupt(format!("invalid chunk digest {s:?}")))
    }

    /// Object key: two levels of fan-out keep directories small.
    pub fn key(&self) -> String {
        let h = self.to_hex();
        format!("chunks/{}/{}", &h[..4], h)
    }

    /// Short form for log lines and messages.
    pub fn short(&self) -> String {
        self.to_hex()[..16].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

pub fn is_zero(data: &[u8]) -> bool {
    // Compare in u128 strides; the compiler vectorises this well.
    let (head, body, tail) = unsafe {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the byte slice.
        data.align_to::<u128>()
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

thread_local! {
    // One zstd context per thread, reused: creating one per chunk costs
    // allocations and table setup on every fetch and every store.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Ends a chunk stored uncompressed (see the module doc).
pub const RAW_TRAILER: [u8; 8] = *b"rfs-raw1";
/// The first four bytes of every zstd frame (RFC 8878, section 3.1.1).
const ZSTD_MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();

/// The stored form of a chunk: zstd, or, where `raw_allowed` (the
/// repository's version has the raw form), the plain bytes with a trailer
/// when compression does not make it smaller.
pub fn encode(data: &[u8], raw_allowed: bool) -> Result<Vec<u8>> {
    let z = compress(data)?;
    if !raw_allowed || z.len() < data.len() + RAW_TRAILER.len() || data.starts_with(&ZSTD_MAGIC) {
        return Ok(z);
    }
    let mut raw = Vec::with_capacity(data.len() + RAW_TRAILER.len());
    raw.extend_from_slice(data);
    raw.extend_from_slice(&RAW_TRAILER);
    Ok(raw)
}

/// The plain bytes of a chunk stored uncompressed, or `None` for a zstd
/// frame (or corruption, which decompression then reports).
fn raw_payload(stored: &[u8], expected_len: usize) -> Option<&[u8]> {
    let raw = !stored.starts_with(&ZSTD_MAGIC)
        && stored.len() == expected_len + RAW_TRAILER.len()
        && stored.ends_with(&RAW_TRAILER);
    raw.then(|| &stored[..expected_len])
}

fn compress(data: &[u8]) -> Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(
                zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| Error::io("zstd compression context", e))?,
            );
        }
        c.as_mut()
            .expect("made above")
            .compress(data)
            .map_err(|e| Error::io("compress chunk", e))
    })
}

/// Decompresses `stored` into at most `capacity` bytes with this thread's
/// reused context.
fn decompress(stored: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("made above").decompress(stored, capacity)
    })
}

/// Decompresses and verifies a stored chunk. `expected_len` is the chunk's
/// plain length from the manifest; anything else is corruption.
pub fn decode(stored: &[u8], digest: &Digest, expected_len: usize) -> Result<Vec<u8>> {
    decode_with(stored, digest, expected_len, Digest::of)
}

/// [`decode`] with the repository's chunk id function (keyed when encrypted).
pub fn decode_with(
    stored: &[u8],
    digest: &Digest,
    expected_len: usize,
    id_of: impl Fn(&[u8]) -> Digest,
) -> Result<Vec<u8>> {
    let data = match raw_payload(stored, expected_len) {
        Some(plain) => plain.to_vec(),
        None => decompress(stored, expected_len)
            .map_err(|e| Error::corrupt(format!("chunk {digest} does not decompress ({e})")))?,
    };
    verify(data, digest, expected_len, id_of)
}

/// [`decode_with`] taking the fetched buffer: a chunk stored uncompressed
/// is verified and returned in that buffer, without a copy.
pub fn decode_owned(
    mut stored: ObjectBuf,
    digest: &Digest,
    expected_len: usize,
    id_of: impl Fn(&[u8]) -> Digest,
) -> Result<ObjectBuf> {
    if raw_payload(&stored, expected_len).is_none() {
        return decode_with(&stored, digest, expected_len, id_of).map(ObjectBuf::from);
    }
    stored.truncate(expected_len);
    check(&stored, digest, expected_len, id_of)?;
    Ok(stored)
}

/// Length and digest checks of decoded plain bytes.
fn verify(
    data: Vec<u8>,
    digest: &Digest,
    expected_len: usize,
    id_of: impl Fn(&[u8]) -> Digest,
) -> Result<Vec<u8>> {
    check(&data, digest, expected_len, id_of)?;
    Ok(data)
}

fn check(
    data: &[u8],
    digest: &Digest,
    expected_len: usize,
    id_of: impl Fn(&[u8]) -> Digest,
) -> Result<()> {
    if data.len() != expected_len {
        return Err(Error::corrupt(format!(
            "chunk {digest} has {} bytes, expected {expected_len}",
            data.len()
        )));
    }
    if id_of(data) != *digest {
        return Err(Error::corrupt(format!(
            "chunk {digest} fails its digest check"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_verifies_the_digest() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = Digest::of(&data);
        let stored = encode(&data, true).unwrap();
        assert_eq!(decode(&stored, &d, data.len()).unwrap(), data);
        let other = Digest::of(b"x");
        assert_eq!(
            decode(&stored, &other, data.len()).unwrap_err().kind(),
            crate::error::ErrorKind::Corrupt
        );
    }

    #[test]
    fn a_flipped_byte_is_detected_as_corruption() {
        let data = vec![42u8; 65536];
        let d = Digest::of(&data);
        let mut stored = encode(&data, true).unwrap();
        let mid = stored.len() / 2;
        stored[mid] ^= 0xff;
        assert!(decode(&stored, &d, data.len()).is_err());
        assert!(decode(&stored[..stored.len() - 1], &d, data.len()).is_err());
    }

    #[test]
    fn an_incompressible_chunk_is_stored_raw_and_decoded_in_its_fetched_buffer() {
        let data = crate::testutil::incompressible(1 << 20, 7);
        let d = Digest::of(&data);
        let stored = encode(&data, true).unwrap();
        assert_eq!(stored.len(), data.len() + RAW_TRAILER.len());
        assert!(stored.ends_with(&RAW_TRAILER));
        let fetched = stored.as_ptr();
        let plain = decode_owned(stored.clone().into(), &d, data.len(), Digest::of).unwrap();
        assert_eq!(plain, data);
        // The same allocation came back: no decompression copy.
        let again = decode_owned(stored.into(), &d, data.len(), Digest::of).unwrap();
        assert_eq!(again.as_ptr(), fetched);
        assert_eq!(
            decode(&encode(&data, true).unwrap(), &d, data.len()).unwrap(),
            data
        );
    }

    #[test]
    fn a_compressible_chunk_stays_a_zstd_frame() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let stored = encode(&data, true).unwrap();
        assert!(stored.starts_with(&ZSTD_MAGIC) && stored.len() < data.len());
        let d = Digest::of(&data);
        assert_eq!(
            decode_owned(stored.into(), &d, data.len(), Digest::of).unwrap(),
            data
        );
    }

    #[test]
    fn incompressible_bytes_that_begin_like_a_zstd_frame_are_stored_as_one() {
        let mut data = crate::testutil::incompressible(65536, 11);
        data[..4].copy_from_slice(&ZSTD_MAGIC);
        let stored = encode(&data, true).unwrap();
        assert!(!stored.ends_with(&RAW_TRAILER) || stored.len() != data.len() + 8);
        let d = Digest::of(&data);
        assert_eq!(
            decode_owned(stored.into(), &d, data.len(), Digest::of).unwrap(),
            data
        );
    }

    #[test]
    fn a_damaged_raw_chunk_is_corruption_never_data() {
        let data = crate::testutil::incompressible(65536, 3);
        let d = Digest::of(&data);
        let good = encode(&data, true).unwrap();
        let corrupt = |stored: Vec<u8>| {
            let e = decode_owned(stored.clone().into(), &d, data.len(), Digest::of).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
            assert!(decode(&stored, &d, data.len()).is_err());
        };
        let mut flipped = good.clone();
        flipped[100] ^= 1;
        corrupt(flipped);
        corrupt(good[..good.len() - 1].to_vec());
        let mut trailer = good.clone();
        *trailer.last_mut().unwrap() ^= 1;
        corrupt(trailer);
        let mut longer = good.clone();
        longer.insert(0, 0);
        corrupt(longer);
    }

    #[test]
    fn without_the_raw_form_an_incompressible_chunk_is_a_zstd_frame() {
        let data = crate::testutil::incompressible(65536, 5);
        let stored = encode(&data, false).unwrap();
        assert!(stored.starts_with(&ZSTD_MAGIC));
        let d = Digest::of(&data);
        assert_eq!(
            decode_owned(stored.into(), &d, data.len(), Digest::of).unwrap(),
            data
        );
    }

    #[test]
    fn zero_detection_handles_unaligned_tails() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
    }

    #[test]
    fn chunk_sizes_must_be_powers_of_two_in_range() {
        assert!(validate_chunk_size(1 << 20).is_ok());
        assert!(validate_chunk_size(32 << 10).is_err());
        assert!(validate_chunk_size(16 << 20).is_err());
        assert!(validate_chunk_size(3 << 20).is_err());
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = Digest::of(b"abc");
        assert_eq!(Digest::from_hex(&d.to_hex()).unwrap(), d);
        assert!(d
            .key()
            .starts_with(&format!("chunks/{}/", &d.to_hex()[..4])));
    }
}
