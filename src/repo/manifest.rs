//! Backup manifests: one JSON document per backup, naming the VM, its
//! configuration and, per disk, the ordered chunk digests (a run of zero
//! chunks is its length; `null` for each one in format 1, see
//! `repo::chunk_index`). The document is wrapped with a BLAKE3 checksum of
//! its exact bytes so truncation or bit rot is reported, never half-parsed.

use serde::{Deserialize, Serialize};

use super::chunk_index::ChunkIndex;
use crate::error::{Error, Result};

/// Written: zero chunks as run lengths. Format 1 (one `null` per zero
/// chunk) is read as well.
pub const MANIFEST_FORMAT: u32 = 2;
const READABLE_FORMATS: [u32; 2] = [1, MANIFEST_FORMAT];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub vm: String,
    pub id: String,
    /// RFC 3339 UTC.
    pub created: String,
    pub created_unix: u64,
    /// The VM's configuration (from `--config` or a default).
    pub config: serde_json::Value,
    pub disks: Vec<DiskManifest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskManifest {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    /// Per chunk in disk order, its digest; `None` for an all-zero chunk.
    pub chunks: ChunkIndex,
    /// Compressed bytes of the distinct chunks this disk references.
    pub stored_bytes: u64,
    /// Compressed bytes this backup added to the repository.
    pub new_bytes: u64,
}

impl DiskManifest {
    pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(chunk_size as u64)
    }

    /// Plain length of chunk `index`: the last one may be short.
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = index * self.chunk_size as u64;
        (self.size - start).min(self.chunk_size as u64) as usize
    }

    fn check(&self) -> Result<()> {
        if self.size > super::limits::MAX_DISK_BYTES {
            return Err(Error::corrupt(format!(
                "disk {} claims {} bytes, more than the {} a disk may have",
                self.name,
                self.size,
                super::limits::MAX_DISK_BYTES
            )));
        }
        // Before chunk_count, which divides by it.
        super::chunk::validate_chunk_size(self.chunk_size as u64).map_err(|_| {
            Error::corrupt(format!(
                "disk {} has invalid chunk size {}",
                self.name, self.chunk_size
            ))
        })?;
        let expect = Self::chunk_count(self.size, self.chunk_size);
        if self.chunks.len() != expect {
            return Err(Error::corrupt(format!(
                "disk {} lists {} chunks, its size needs {expect}",
                self.name,
                self.chunks.len()
            )));
        }
        Ok(())
    }
}

impl Manifest {
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.encode_with(None)
    }

    /// Sealed with the repository's MAC when it is encrypted.
    /// Always format 2 (zero runs), also for a manifest read as format 1.
    pub fn encode_with(&self, keys: Option<&super::crypto::Keys>) -> Result<Vec<u8>> {
        if self.format != MANIFEST_FORMAT {
            let mut m = self.clone();
            m.format = MANIFEST_FORMAT;
            return m.encode_with(keys);
        }
        super::sealed::seal_with("manifest", self, keys)
    }

    /// Parses and checks a stored manifest; `what` names it in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Manifest> {
        Self::decode_with(bytes, what, None)
    }

    /// [`Manifest::decode`], authenticated with `keys` if given.
    pub fn decode_with(
        bytes: &[u8],
        what: &str,
        keys: Option<&super::crypto::Keys>,
    ) -> Result<Manifest> {
        let m: Manifest =
            super::sealed::unseal_with(bytes, "manifest", &format!("manifest {what}"), keys)?;
        if !READABLE_FORMATS.contains(&m.format) {
            return Err(Error::corrupt(format!(
                "manifest {what} has unknown format {}",
                m.format
            )));
        }
        if m.disks.len() > super::limits::MAX_DISKS {
            return Err(Error::corrupt(format!(
                "manifest {what} lists {} disks, more than the {} a backup may have",
                m.disks.len(),
                super::limits::MAX_DISKS
            )));
        }
        for d in &m.disks {
            d.check()
                .map_err(|e| e.context(format!("manifest {what}")))?;
        }
        super::limits::check_blocks(m.blocks())
            .map_err(|e| Error::corrupt(format!("manifest {what}: {e}")))?;
        Ok(m)
    }

    /// Chunks of all disks: what recovering it costs per block.
    pub fn blocks(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| DiskManifest::chunk_count(d.size, d.chunk_size))
            .sum()
    }

    pub fn virtual_size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }
    pub fn stored_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.stored_bytes).sum()
    }
    pub fn new_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.new_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::Digest;

    fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            vm: "tiny".into(),
            id: "20261121-000000".into(),
            created: "2026-11-21T00:00:00Z".into(),
            created_unix: 0,
            config: serde_json::json!({"memory_mib": 512}),
            disks: vec![DiskManifest {
                name: "disk0".into(),
                size: 3 * 65536 + 10,
                chunk_size: 65536,
                chunks: [Some(Digest::of(b"a")), None, Some(Digest::of(b"b")), None]
                    .into_iter()
                    .collect(),
                stored_bytes: 10,
                new_bytes: 5,
            }],
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode().unwrap(), "x").unwrap(), m);
        assert_eq!(m.disks[0].chunk_len(3), 10);
    }

    #[test]
    fn truncated_or_altered_manifest_is_corrupt() {
        let bytes = sample().encode().unwrap();
        let e = Manifest::decode(&bytes[..bytes.len() / 2], "x").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt);
        let s = String::from_utf8(bytes)
            .unwrap()
            .replace("\"memory_mib\":512", "\"memory_mib\":513");
        let e = Manifest::decode(s.as_bytes(), "x").unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn a_manifest_over_its_bounds_is_refused_before_use() {
        let mut m = sample();
        m.disks = vec![m.disks[0].clone(); crate::repo::limits::MAX_DISKS + 1];
        let e = Manifest::decode(&m.encode().unwrap(), "x").unwrap_err();
        assert!(e.to_string().contains("more than the"), "{e}");
        let mut m = sample();
        m.disks[0].size = crate::repo::limits::MAX_DISK_BYTES + 1;
        assert!(Manifest::decode(&m.encode().unwrap(), "x").is_err());
    }

    #[test]
    fn a_manifest_needing_more_blocks_in_all_than_the_bound_is_refused() {
        use crate::repo::limits::{MAX_BLOCKS, MAX_DISKS, MAX_DISK_BYTES};
        let disk = |size: u64| DiskManifest {
            name: "disk".into(),
            size,
            chunk_size: 65536,
            chunks: ChunkIndex::zeros(size / 65536),
            stored_bytes: 0,
            new_bytes: 0,
        };
        // A few bytes of JSON: every disk at its largest, one zero run each.
        let mut m = sample();
        m.disks = vec![disk(MAX_DISK_BYTES); MAX_DISKS];
        let bytes = m.encode().unwrap();
        assert!(bytes.len() < 64 << 10, "{}", bytes.len());
        let e = Manifest::decode(&bytes, "x").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt);
        assert!(e.to_string().contains("blocks in all"), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        // Exactly the bound, over several disks, is a backup that reads back.
        let per_disk = MAX_BLOCKS / 16 * 65536;
        m.disks = vec![disk(per_disk); 16];
        assert!(Manifest::decode(&m.encode().unwrap(), "x").is_ok());
        m.disks.push(disk(65536));
        assert!(Manifest::decode(&m.encode().unwrap(), "x").is_err());
        // Nor is one written that could not be read back.
        let e = crate::repo::limits::check_blocks(MAX_BLOCKS + 1).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_manifest_with_chunk_size_zero_is_corrupt_not_a_panic() {
        let mut m = sample();
        m.disks[0].chunk_size = 0;
        let e = Manifest::decode(&m.encode().unwrap(), "x").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt);
        assert!(e.to_string().contains("invalid chunk size 0"), "{e}");
    }

    #[test]
    fn chunk_count_must_match_disk_size() {
        let mut m = sample();
        m.disks[0].chunks = m.disks[0].chunks.iter().take(3).collect();
        assert!(Manifest::decode(&m.encode().unwrap(), "x").is_err());
    }

    #[test]
    fn a_format_1_manifest_with_a_null_per_zero_chunk_still_reads() {
        let m = sample();
        let d = &m.disks[0];
        let old = serde_json::json!({
            "format": 1, "vm": m.vm, "id": m.id, "created": m.created,
            "created_unix": 0, "config": m.config,
            "disks": [{"name": d.name, "size": d.size, "chunk_size": d.chunk_size,
                "chunks": d.chunks.iter().collect::<Vec<_>>(),
                "stored_bytes": 10, "new_bytes": 5}],
        });
        let bytes = crate::repo::sealed::seal("manifest", &old).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains(",null,"));
        let back = Manifest::decode(&bytes, "x").unwrap();
        assert_eq!(back.format, 1);
        assert_eq!(back.disks, m.disks);
        // Written again (a staging copy), it is format 2 with runs.
        let again = String::from_utf8(back.encode().unwrap()).unwrap();
        assert!(
            again.contains("\"format\":2") && !again.contains("null"),
            "{again}"
        );
        let mut future = serde_json::to_value(&m).unwrap();
        future["format"] = 3.into();
        let future = crate::repo::sealed::seal("manifest", &future).unwrap();
        let e = Manifest::decode(&future, "x").unwrap_err();
        assert!(e.to_string().contains("unknown format 3"), "{e}");
    }
}
