//! Bounds on repository content, checked before it is trusted: an object is
//! never read into memory past its bound, and a manifest that names more
//! disks or a larger disk than these is refused as forged or damaged.

/// A manifest document (JSON with one 64-hex digest per chunk with data,
/// a number per run of zero chunks): room for about 15 TiB of 1 MiB chunks
/// with data, however large the disks' holes. A backup whose manifest
/// would be larger is refused before it is published (never a backup that
/// cannot be read back).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// A VM's operational profile document.
pub const MAX_PROFILE_BYTES: u64 = 256 << 20;
/// Small metadata files (`repo.json`, `session.json`, `relocation.json`).
pub const MAX_META_BYTES: u64 = 1 << 20;
/// Disks per backup. Also keeps FUSE inode numbers of two VMs apart.
pub const MAX_DISKS: usize = 256;
/// Size of one disk: 64 TiB.
pub const MAX_DISK_BYTES: u64 = 64 << 40;
/// Blocks (chunks) of a backup's disks in all. Recovering costs per block
/// a bit in each staging map (present, its live mirror, changed, dirty),
/// in memory and on disk, written in full when a session starts: 2^28
/// blocks is 32 MiB a map. That is 16 TiB of 64 KiB chunks (the tested
/// sparse 10 TiB disk of 64 KiB blocks has 160 Mi) or 256 TiB of 1 MiB
/// chunks; without it a forged manifest of a few bytes (256 disks of
/// 64 TiB, one zero run each) would ask for 32 GiB a map.
pub const MAX_BLOCKS: u64 = 1 << 28;
/// Memory a VM configuration may ask QEMU for, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Least memory a VM configuration may ask for, in MiB: below it no guest
/// boots.
pub const MIN_MEMORY_MIB: u64 = 16;

/// A configuration's `memory_mib` if it is a whole number from
/// [`MIN_MEMORY_MIB`] to `max`; the caller words the refusal (its `max`
/// differs: the host's memory at boot, [`MAX_MEMORY_MIB`] at backup).
pub fn memory_mib_within(m: &serde_json::Value, max: u64) -> Option<u64> {
    m.as_u64().filter(|v| (MIN_MEMORY_MIB..=max).contains(v))
}

/// A manifest of `len` bytes may be published: one that could not be read
/// back is refused before it exists.
pub fn check_manifest_len(len: u64) -> crate::Result<()> {
    if len > MAX_MANIFEST_BYTES {
        return Err(crate::Error::invalid(format!(
            "its manifest would be {len} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have: back up with a larger --chunk-size"
        )));
    }
    Ok(())
}

/// A backup whose disks have `blocks` chunks in all may be published (and
/// recovered): see [`MAX_BLOCKS`].
pub fn check_blocks(blocks: u64) -> crate::Result<()> {
    if blocks > MAX_BLOCKS {
        return Err(crate::Error::invalid(format!(
            "its disks need {blocks} blocks in all, more than the {MAX_BLOCKS} a backup may have: back up with a larger --chunk-size"
        )));
    }
    Ok(())
}

/// Largest stored form of a chunk of `len` plain bytes: zstd's worst case
/// plus its frame header, plus encryption's magic, nonce and tag.
pub fn max_chunk_object(len: usize) -> u64 {
    zstd::zstd_safe::compress_bound(len) as u64 + 64 + 64
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_manifest_that_could_not_be_read_back_is_refused() {
        assert!(super::check_manifest_len(super::MAX_MANIFEST_BYTES).is_ok());
        let e = super::check_manifest_len(super::MAX_MANIFEST_BYTES + 1).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("larger --chunk-size"), "{e}");
    }
}
