//! Default operational profile: for a disk with no recorded boot profile,
//! the byte regions a booting guest is almost certain to read early
//! (partition tables, boot sectors, filesystem metadata), found by parsing
//! those structures with a handful of reads. Staging them first turns the
//! start of a cold boot into a few large fetches instead of many small,
//! serial repository round trips.

use std::collections::BTreeMap;
use std::io;

/// One region worth staging before the guest asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
    pub what: &'static str,
}

type Reader<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>;

const SECTOR: u64 = 512;
/// Boot sector / VBR / superblock area staged (and read once) per filesystem.
const HEAD: u64 = 64 * 1024;
/// LBA 0..34: the MBR plus a whole primary GPT (header, 128 × 128-byte entries).
const TABLE_AREA: u64 = 34 * SECTOR;
/// Each partition costs a round trip or two; a guest boots from the first few.
const MAX_PARTITIONS: usize = 32;
/// Far beyond any real GPT (128 entries = 16 KiB); bounds a garbage header.
const MAX_GPT_TABLE: u64 = 1 << 20;

// Staging priority when the cap bites: lower first. The spec's order is
// partition table, boot sectors/superblocks, the rest; "the rest" is split
// by how surely and how early a booting guest reads it.
const P_TABLE: u8 = 0;
const P_BOOT: u8 = 1;
/// Read whole at mount: ext group descriptors, the first FAT, FAT12/16 root.
const P_MOUNT: u8 = 2;
/// Read during the first path lookups: inode table 0, FAT32 root.
const P_LOOKUP: u8 = 3;
/// Read only on allocation or repair: bitmaps, FAT mirrors.
const P_LATER: u8 = 4;

const EXT_MAGIC: u64 = 0xEF53;
const EXT_INCOMPAT_64BIT: u64 = 0x80;
const EXT_INCOMPAT_FLEX_BG: u64 = 0x200;
const EXT_BG_INODE_UNINIT: u64 = 0x1;
const EXT_BG_BLOCK_UNINIT: u64 = 0x2;

/// Regions a booting guest reads early: partition tables, boot sectors and
/// filesystem metadata. `read` reads disk bytes at an offset (it fetches
/// from the backup, so keep the number of reads small: each costs a
/// repository round trip on a cold disk). Never fails: unparseable
/// structures are skipped. The result is sorted by offset, merged where
/// regions overlap/touch, clipped to the disk, and capped in total bytes at
/// `max_bytes`, keeping regions in priority order (partition table, then
/// boot sectors/superblocks, then the rest) when the cap bites.
pub fn boot_regions(
    disk_size: u64,
    max_bytes: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> Vec<Region> {
    let disk = Part::whole(disk_size);
    let mut want = Wanted::default();
    // One read serves the MBR, the GPT header and entries, and, on an
    // unpartitioned disk, the filesystem's boot sector and superblock.
    let head = read_part(read, disk, 0, HEAD).unwrap_or_default();
    want.add(disk, P_TABLE, 0, TABLE_AREA, "partition table");
    let parts = gpt_partitions(&head, disk, read, &mut want)
        .or_else(|| mbr_partitions(&head, disk, read, &mut want));
    match parts {
        Some(parts) => {
            for p in parts.into_iter().take(MAX_PARTITIONS) {
                filesystem_regions(p, None, read, &mut want);
            }
        }
        None => filesystem_regions(disk, Some(&head), read, &mut want),
    }
    want.select(max_bytes)
}

/// A byte range of the disk holding one filesystem (or the whole disk).
#[derive(Clone, Copy)]
struct Part {
    start: u64,
    len: u64,
}

impl Part {
    fn whole(len: u64) -> Part {
        Part { start: 0, len }
    }

    /// A partition clipped to the disk; None if it starts outside it.
    fn within(self, start: u64, len: u64) -> Option<Part> {
        let ok = start > 0 && start < self.len && len > 0;
        ok.then(|| Part {
            start,
            len: len.min(self.len - start),
        })
    }
}

/// Candidate regions with their priority, in discovery order.
#[derive(Default)]
struct Wanted(Vec<(u8, u64, u64, &'static str)>);

impl Wanted {
    /// `off`/`len` are relative to `part` and clipped to it: metadata that
    /// claims to lie outside its own partition is garbage, not a hint.
    fn add(&mut self, part: Part, prio: u8, off: u64, len: u64, what: &'static str) {
        if off < part.len && len > 0 {
            let len = len.min(part.len - off);
            self.0.push((prio, part.start + off, len, what));
        }
    }

    /// Takes regions in priority order (stable, so discovery order within a
    /// priority) until `max_bytes` is spent, counting each byte once.
    fn select(mut self, max_bytes: u64) -> Vec<Region> {
        self.0.sort_by_key(|w| w.0);
        // start -> (end, prio, what); intervals never overlap.
        let mut taken = BTreeMap::new();
        let mut budget = max_bytes;
        for (prio, off, len, what) in self.0 {
            for (s, e) in uncovered(&taken, off, off + len) {
                let take = (e - s).min(budget);
                if take == 0 {
                    return merge(taken);
                }
                taken.insert(s, (s + take, prio, what));
                budget -= take;
            }
        }
        merge(taken)
    }
}

/// The parts of `[s, e)` not yet in `taken`.
fn uncovered(taken: &BTreeMap<u64, (u64, u8, &str)>, s: u64, e: u64) -> Vec<(u64, u64)> {
    let mut pos = s;
    if let Some((_, &(end, _, _))) = taken.range(..s).next_back() {
        pos = pos.max(end);
    }
    let mut gaps = Vec::new();
    for (&ts, &(te, _, _)) in taken.range(s..e) {
        if ts > pos {
            gaps.push((pos, ts));
        }
        pos = pos.max(te);
    }
    if pos < e {
        gaps.push((pos, e));
    }
    gaps
}

/// Joins touching intervals; a merged region keeps the label of its
/// highest-priority piece, which says best why it is staged.
fn merge(taken: BTreeMap<u64, (u64, u8, &'static str)>) -> Vec<Region> {
    let mut out: Vec<(Region, u8)> = Vec::new();
    for (offset, (end, prio, what)) in taken {
        match out.last_mut() {
            Some((r, p)) if r.offset + r.len == offset => {
                r.len = end - r.offset;
                if prio < *p {
                    (*p, r.what) = (prio, what);
                }
            }
            _ => out.push((
                Region {
                    offset,
                    len: end - offset,
                    what,
                },
                prio,
            )),
        }
    }
    out.into_iter().map(|(r, _)| r).collect()
}

/// Reads `len` bytes at `off` within `part`, clipped to it; None on error.
fn read_part(read: Reader, part: Part, off: u64, len: u64) -> Option<Vec<u8>> {
    let len = len.min(part.len.saturating_sub(off));
    if len == 0 {
        return None;
    }
    let mut buf = vec![0; usize::try_from(len).ok()?];
    read(part.start + off, &mut buf).ok()?;
    Some(buf)
}

/// Bytes at `off` from `head` (the first bytes of `part`) when it holds
/// them, saving a round trip; otherwise one read. A short tail is fine:
/// callers parse tables entry by entry.
fn bytes_at(head: &[u8], read: Reader, part: Part, off: u64, len: u64) -> Option<Vec<u8>> {
    let cached = usize::try_from(off).ok().and_then(|o| head.get(o..));
    match cached {
        Some(h) if !h.is_empty() => Some(h[..h.len().min(len as usize)].to_vec()),
        _ => read_part(read, part, off, len),
    }
}

/// Little-endian integer of `n` bytes at `at`; 0 when out of range, which
/// every caller treats as invalid.
fn le(b: &[u8], at: usize, n: usize) -> u64 {
    b.get(at..at + n)
        .map_or(0, |s| s.iter().rev().fold(0, |v, &x| v << 8 | x as u64))
}

/// GPT partitions, if a GPT header sits at LBA 1 (512- or 4096-byte
/// sectors). Protective and hybrid MBRs are then ignored, as firmware does.
fn gpt_partitions(head: &[u8], disk: Part, read: Reader, want: &mut Wanted) -> Option<Vec<Part>> {
    let ss = [SECTOR, 4096]
        .into_iter()
        .find(|&ss| head.get(ss as usize..ss as usize + 8) == Some(b"EFI PART"))?;
    let h = &head[ss as usize..];
    let (entries_lba, count, esize) = (le(h, 72, 8), le(h, 80, 4), le(h, 84, 4));
    if !(128..=4096).contains(&esize) || count == 0 {
        return None;
    }
    let table_off = entries_lba.saturating_mul(ss);
    let table_len = count.saturating_mul(esize).min(MAX_GPT_TABLE);
    want.add(disk, P_TABLE, 0, 2 * ss, "GPT header");
    want.add(disk, P_TABLE, table_off, table_len, "GPT entries");
    // Firmware and the kernel validate the backup header and entries,
    // which end at the last LBA.
    let backup = ss + table_len.div_ceil(ss) * ss;
    let backup_at = disk.len.saturating_sub(backup);
    want.add(disk, P_TABLE, backup_at, backup, "backup GPT");
    let table = bytes_at(head, read, disk, table_off, table_len).unwrap_or_default();
    let parts = table
        .chunks_exact(esize as usize)
        .filter(|e| e[..16].iter().any(|&b| b != 0))
        .filter_map(|e| {
            let (first, last) = (le(e, 32, 8), le(e, 40, 8));
            let sectors = last.checked_sub(first)?.checked_add(1)?;
            disk.within(first.checked_mul(ss)?, sectors.saturating_mul(ss))
        });
    Some(parts.take(MAX_PARTITIONS).collect())
}

/// Whether a sector is an MBR/EBR: boot signature and sane status bytes.
/// A bare FAT or NTFS boot sector has code or text there, or zeros that
/// list no partition, so it is not taken for a partition table.
fn is_mbr(s: &[u8]) -> bool {
    s.get(510..512) == Some(&[0x55, 0xAA][..]) && (0..4).all(|i| s[446 + 16 * i] & 0x7F == 0)
}

/// MBR entry `i`: (type, first LBA, sectors), None when empty.
fn mbr_entry(s: &[u8], i: usize) -> Option<(u8, u64, u64)> {
    let e = s.get(446 + 16 * i..462 + 16 * i)?;
    let (ty, lba, n) = (e[4], le(e, 8, 4), le(e, 12, 4));
    (ty != 0 && lba != 0 && n != 0).then_some((ty, lba, n))
}

fn is_extended(ty: u8) -> bool {
    matches!(ty, 0x05 | 0x0F | 0x85)
}

/// MBR primary partitions and logical ones from the extended partition's
/// EBR chain. None when sector 0 is no MBR or lists nothing.
fn mbr_partitions(head: &[u8], disk: Part, read: Reader, want: &mut Wanted) -> Option<Vec<Part>> {
    if !is_mbr(head) {
        return None;
    }
    let mut parts = Vec::new();
    for (ty, lba, n) in (0..4).filter_map(|i| mbr_entry(head, i)) {
        match ty {
            // Protective entry of a GPT whose header did not parse.
            0xEE => {}
            t if is_extended(t) => logical_partitions(lba, disk, read, want, &mut parts),
            _ => parts.extend(disk.within(lba * SECTOR, n * SECTOR)),
        }
    }
    (!parts.is_empty()).then_some(parts)
}

/// Follows the EBR chain: entry 0 is a logical partition relative to its
/// EBR, entry 1 links the next EBR relative to the extended partition.
/// Links must move forward, so a looping chain ends, and each link costs a
/// read, so a long chain of empty EBRs stops at the partition limit.
fn logical_partitions(
    ext: u64,
    disk: Part,
    read: Reader,
    want: &mut Wanted,
    parts: &mut Vec<Part>,
) {
    let mut ebr = ext;
    for _ in parts.len()..MAX_PARTITIONS {
        want.add(disk, P_TABLE, ebr * SECTOR, SECTOR, "EBR");
        let Some(s) = read_part(read, disk, ebr * SECTOR, SECTOR) else {
            return;
        };
        if !is_mbr(&s) {
            return;
        }
        if let Some((_, lba, n)) = mbr_entry(&s, 0).filter(|e| !is_extended(e.0)) {
            parts.extend(disk.within((ebr + lba) * SECTOR, n * SECTOR));
        }
        match mbr_entry(&s, 1) {
            Some((ty, next, _)) if is_extended(ty) && ext + next > ebr => ebr = ext + next,
            _ => return,
        }
    }
}

/// The first 64 KiB of `part`, then the metadata of the filesystem found
/// there. `head` is that 64 KiB when the caller already has it.
fn filesystem_regions(part: Part, head: Option<&[u8]>, read: Reader, want: &mut Wanted) {
    want.add(part, P_BOOT, 0, HEAD, "boot sector");
    let owned;
    let head = match head {
        Some(h) => h,
        None => {
            owned = read_part(read, part, 0, HEAD).unwrap_or_default();
            &owned
        }
    };
    if let Some(fs) = Ext::parse(head) {
        fs.regions(part, head, read, want);
    } else if let Some(fs) = Fat::parse(head) {
        fs.regions(part, want);
    }
}

/// The ext2/3/4 superblock fields that locate early metadata.
struct Ext {
    block: u64,
    first_data_block: u64,
    groups: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: u64,
    flex_bg: bool,
}

impl Ext {
    fn parse(head: &[u8]) -> Option<Ext> {
        let sb = head.get(1024..2048)?;
        let log = le(sb, 24, 4);
        if le(sb, 56, 2) != EXT_MAGIC || log > 6 {
            return None;
        }
        let block = 1024 << log;
        let incompat = le(sb, 96, 4);
        let is64 = incompat & EXT_INCOMPAT_64BIT != 0;
        let desc_size = if is64 { le(sb, 254, 2) } else { 32 };
        // Revision 0 filesystems have fixed 128-byte inodes.
        let rev0 = le(sb, 76, 4) == 0;
        let inode_size = if rev0 { 128 } else { le(sb, 88, 2) };
        let blocks = le(sb, 4, 4) | if is64 { le(sb, 0x150, 4) << 32 } else { 0 };
        let (first_data_block, per_group) = (le(sb, 20, 4), le(sb, 32, 4));
        let inodes_per_group = le(sb, 40, 4);
        let sane = per_group > 0
            && inodes_per_group > 0
            && inode_size.is_power_of_two()
            && (128..=block).contains(&inode_size)
            && desc_size.is_power_of_two()
            && (32..=1024).contains(&desc_size);
        sane.then(|| Ext {
            block,
            first_data_block,
            groups: blocks.saturating_sub(first_data_block).div_ceil(per_group),
            inodes_per_group,
            inode_size,
            desc_size,
            flex_bg: incompat & EXT_INCOMPAT_FLEX_BG != 0,
        })
    }

    /// A block number from a group descriptor; 64-byte descriptors carry
    /// the high half at `hi`.
    fn desc_block(&self, d: &[u8], lo: usize, hi: usize) -> u64 {
        let wide = self.desc_size >= 64;
        le(d, lo, 4) | if wide { le(d, hi, 4) << 32 } else { 0 }
    }

    /// Group descriptors, group 0's inode table (root and early system
    /// inodes) and, with flex_bg, the packed bitmaps. Usually no read
    /// beyond `head`. The root directory's blocks are left out: finding
    /// them costs the round trip that staging them would save.
    fn regions(&self, part: Part, head: &[u8], read: Reader, want: &mut Wanted) {
        let bs = self.block;
        let gdt_off = (self.first_data_block + 1) * bs;
        let gdt_len = self.groups.saturating_mul(self.desc_size);
        want.add(part, P_MOUNT, gdt_off, gdt_len, "ext group descriptors");
        // The first block of descriptors is enough to find what we stage.
        let gdt = bytes_at(head, read, part, gdt_off, gdt_len.min(bs)).unwrap_or_default();
        let Some(g0) = gdt.get(..self.desc_size as usize) else {
            return;
        };
        let itable = self.desc_block(g0, 8, 0x28).saturating_mul(bs);
        let itable_len = self.inodes_per_group.saturating_mul(self.inode_size);
        want.add(part, P_LOOKUP, itable, itable_len, "ext inode table");
        if !self.flex_bg {
            // Without flex_bg every group's bitmaps sit in their own group:
            // many scattered tiny fetches for blocks read only on allocation.
            return;
        }
        for d in gdt.chunks_exact(self.desc_size as usize) {
            // Uninitialised bitmaps are computed by the kernel, never read.
            let flags = le(d, 0x12, 2);
            if flags & EXT_BG_BLOCK_UNINIT == 0 {
                let at = self.desc_block(d, 0, 0x20).saturating_mul(bs);
                want.add(part, P_LATER, at, bs, "ext block bitmap");
            }
            if flags & EXT_BG_INODE_UNINIT == 0 {
                let at = self.desc_block(d, 4, 0x24).saturating_mul(bs);
                want.add(part, P_LATER, at, bs, "ext inode bitmap");
            }
        }
    }
}

/// The FAT BPB fields that locate the FATs and root directory.
struct Fat {
    sector: u64,
    cluster: u64,
    reserved: u64,
    fats: u64,
    fat_sectors: u64,
    /// FAT12/16: the fixed root directory's entry count.
    root_entries: u64,
    /// FAT32: the root directory's first cluster.
    root_cluster: Option<u64>,
}

impl Fat {
    fn parse(head: &[u8]) -> Option<Fat> {
        let b = head.get(..512)?;
        let (sector, per_cluster) = (le(b, 11, 2), le(b, 13, 1));
        let (reserved, fats, media) = (le(b, 14, 2), le(b, 16, 1), b[21]);
        let fat16 = le(b, 22, 2);
        let sane = b[510..] == [0x55, 0xAA]
            && sector.is_power_of_two()
            && (512..=4096).contains(&sector)
            && per_cluster.is_power_of_two()
            && reserved > 0
            && (1..=4).contains(&fats)
            && (media == 0xF0 || media >= 0xF8);
        let (fat_sectors, root_cluster) = match fat16 {
            0 => (le(b, 36, 4), Some(le(b, 44, 4))),
            n => (n, None),
        };
        (sane && fat_sectors > 0).then(|| Fat {
            sector,
            cluster: sector * per_cluster,
            reserved,
            fats,
            fat_sectors,
            root_entries: le(b, 17, 2),
            root_cluster,
        })
    }

    /// Reserved sectors (boot sector, FSInfo, backup), the first FAT, then
    /// the root directory; FAT mirrors last since they are only written.
    fn regions(&self, part: Part, want: &mut Wanted) {
        let reserved = self.reserved * self.sector;
        let fat = self.fat_sectors * self.sector;
        want.add(part, P_BOOT, 0, reserved, "FAT reserved sectors");
        want.add(part, P_MOUNT, reserved, fat, "FAT");
        let mirrors = (self.fats - 1) * fat;
        want.add(part, P_LATER, reserved + fat, mirrors, "FAT mirror");
        let root = reserved + self.fats * fat;
        match self.root_cluster {
            None => {
                let len = self.root_entries * 32;
                want.add(part, P_MOUNT, root, len, "FAT root directory");
            }
            Some(c) if c >= 2 => {
                let at = root + (c - 2) * self.cluster;
                want.add(part, P_LOOKUP, at, self.cluster, "FAT root directory");
            }
            Some(_) => {}
        }
    }
}
#[cfg(test)]
mod tests;
