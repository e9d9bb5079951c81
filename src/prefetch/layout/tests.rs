//! Default-profile parser tests on real images built with sfdisk, mke2fs
//! and mkfs.vfat.

use super::*;
use rand::{Rng, SeedableRng};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Runs a real tool: the tests mean something only on images the real
/// tools made.
fn run(cmd: &mut Command) -> String {
    let hint = "apt-get install e2fsprogs dosfstools fdisk";
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}; {hint}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?}: {err}");
    String::from_utf8(out.stdout).unwrap()
}

fn tool(name: &str, args: &[&str]) -> String {
    run(Command::new(name).args(args))
}

/// A sparse file of `size` bytes; its path.
fn image(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    File::create(&p).unwrap().set_len(size).unwrap();
    p.to_str().unwrap().to_owned()
}

fn sfdisk(disk: &str, script: &str) {
    let s = format!("{disk}.sfdisk");
    std::fs::write(&s, script).unwrap();
    run(Command::new("sfdisk")
        .args(["-q", disk])
        .stdin(File::open(&s).unwrap()));
}

/// Copies a filesystem image into the disk at `at`, keeping it sparse.
fn place(disk: &str, at: u64, fs: &str) {
    let d = File::options().write(true).open(disk).unwrap();
    for (i, c) in std::fs::read(fs).unwrap().chunks(HEAD as usize).enumerate() {
        if c.iter().any(|&b| b != 0) {
            d.write_all_at(c, at + i as u64 * HEAD).unwrap();
        }
    }
}

/// Regions of an in-memory disk, checked against the API's promises,
/// and the number of reads spent.
fn layout_of_bytes(disk: &[u8], max: u64) -> (Vec<Region>, usize) {
    let mut reads = 0;
    let r = boot_regions(disk.len() as u64, max, &mut |off, buf| {
        reads += 1;
        let at = off as usize;
        buf.copy_from_slice(disk.get(at..at + buf.len()).expect("read past the disk"));
        Ok(())
    });
    let size = disk.len() as u64;
    assert!(
        r.iter().all(|x| x.len > 0 && x.offset + x.len <= size),
        "{r:?}"
    );
    let apart = r.windows(2).all(|w| w[0].offset + w[0].len < w[1].offset);
    assert!(apart, "unsorted or unmerged: {r:?}");
    assert!(
        r.iter().map(|x| x.len).sum::<u64>() <= max,
        "over cap: {r:?}"
    );
    (r, reads)
}

fn layout_of(disk: &str, max: u64) -> (Vec<Region>, usize) {
    layout_of_bytes(&std::fs::read(disk).unwrap(), max)
}

/// Merged output keeps any staged run inside one region.
fn covered(r: &[Region], off: u64, len: u64) -> bool {
    r.iter()
        .any(|x| x.offset <= off && off + len <= x.offset + x.len)
}

#[track_caller]
fn assert_covered(r: &[Region], off: u64, len: u64, what: &str) {
    assert!(
        covered(r, off, len),
        "{what} [{off}, +{len}) not staged: {r:?}"
    );
}

fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} not in {text}"));
    let digits = text[at + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit());
    digits.into_iter().next().unwrap().parse().unwrap()
}

/// Group 0's block bitmap, inode bitmap and inode table as dumpe2fs
/// reports them, in bytes from the filesystem start, and the block size.
fn dumpe2fs_group0(fs: &str) -> (u64, u64, u64, (u64, u64)) {
    let out = tool("dumpe2fs", &[fs]);
    let bs = number_after(&out, "Block size:");
    let g0 = &out[out.find("Group 0:").unwrap()..];
    let first = number_after(g0, "Inode table at");
    let last = number_after(g0, &format!("Inode table at {first}-"));
    let bitmap = |key| number_after(g0, key) * bs;
    let itable = (first * bs, (last + 1 - first) * bs);
    (
        bs,
        bitmap("Block bitmap at"),
        bitmap("Inode bitmap at"),
        itable,
    )
}

/// Superblock, group descriptors and inode table 0 of the ext
/// filesystem image `fs`, placed at `at`.
fn assert_ext_staged(r: &[Region], at: u64, fs: &str) {
    let (bs, _, _, (itable, itable_len)) = dumpe2fs_group0(fs);
    assert_covered(r, at + 1024, 1024, "superblock");
    assert_covered(r, at + bs.max(2048), 32, "group descriptors");
    assert_covered(r, at + itable, itable_len, "inode table 0");
}

/// Where the FAT data area starts: reserved sectors, FATs and the
/// FAT12/16 root directory all lie before it.
fn fat_data_start(fsck: &str) -> u64 {
    number_after(fsck, "Data area starts at byte")
}

/// A 64 MiB GPT disk: 8 MiB FAT16 at 1 MiB, 40 MiB ext4 with 4 KiB
/// blocks at 9 MiB. Returns the disk and the two filesystem images.
fn gpt_disk(dir: &Path) -> (String, String, String) {
    let disk = image(dir, "disk.img", 64 * MIB);
    let (fat_type, linux_type) = (
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    );
    let script = format!(
        "label: gpt\nstart=2048, size=16384, type={fat_type}\n\
         start=18432, size=81920, type={linux_type}\n"
    );
    sfdisk(&disk, &script);
    let fat = image(dir, "fat.img", 8 * MIB);
    tool("mkfs.vfat", &["-F", "16", "-s", "1", &fat]);
    let ext = image(dir, "ext.img", 40 * MIB);
    tool("mke2fs", &["-F", "-q", "-t", "ext4", "-b", "4096", &ext]);
    place(&disk, MIB, &fat);
    place(&disk, 9 * MIB, &ext);
    (disk, fat, ext)
}

#[test]
fn gpt_disk_stages_tables_fat_and_ext4_metadata_in_three_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, fat, ext) = gpt_disk(dir.path());
    let (r, reads) = layout_of(&disk, 64 * MIB);
    assert_eq!((r[0].offset, r[0].what), (0, "partition table"));
    assert_covered(&r, 0, TABLE_AREA, "primary GPT");
    assert_covered(&r, 64 * MIB - 33 * SECTOR, 33 * SECTOR, "backup GPT");
    let data = fat_data_start(&tool("fsck.fat", &["-v", "-n", &fat]));
    assert_covered(&r, MIB, data, "FAT16 reserved, FATs and root");
    assert!(!covered(&r, MIB + data, HEAD), "FAT data staged: {r:?}");
    assert_ext_staged(&r, 9 * MIB, &ext);
    // Sector 0 (holding the whole GPT), then each partition's head,
    // which holds the BPB or the superblock and group descriptors.
    assert_eq!(reads, 3);
}

#[test]
fn mbr_disk_follows_the_ebr_chain_to_logical_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "disk.img", 64 * MIB);
    let script = "label: dos\nstart=2048, size=32768, type=83\n\
                  start=34816, size=96256, type=5\n\
                  start=36864, size=81920, type=c\n\
                  start=120832, size=8192, type=83\n";
    sfdisk(&disk, script);
    // ext2 with 1 KiB blocks: group 0 starts at block 1, 32-byte
    // descriptors.
    let ext = image(dir.path(), "ext.img", 16 * MIB);
    tool("mke2fs", &["-F", "-q", "-t", "ext2", "-b", "1024", &ext]);
    let fat = image(dir.path(), "fat.img", 40 * MIB);
    tool("mkfs.vfat", &["-F", "32", &fat]);
    place(&disk, MIB, &ext);
    place(&disk, 36864 * SECTOR, &fat);
    let (r, reads) = layout_of(&disk, 64 * MIB);
    assert_covered(&r, 0, TABLE_AREA, "MBR");
    assert_ext_staged(&r, MIB, &ext);
    let fsck = tool("fsck.fat", &["-v", "-n", &fat]);
    let data = fat_data_start(&fsck);
    assert_covered(&r, 36864 * SECTOR, data, "FAT32 reserved and FATs");
    let line = fsck.lines().find(|l| l.contains("bytes per cluster"));
    let cluster = number_after(line.unwrap(), "");
    let root = data + (number_after(&fsck, "Root directory start at cluster") - 2) * cluster;
    assert_covered(&r, 36864 * SECTOR + root, cluster, "FAT32 root directory");
    // Only two EBRs lead to the second logical partition.
    assert_covered(&r, 120832 * SECTOR, HEAD, "second logical partition");
    // Sector 0, two EBRs, three partition heads.
    assert_eq!(reads, 6);
}

#[test]
fn bare_fat32_without_partition_table_is_one_filesystem_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let fs = image(dir.path(), "fs.img", 40 * MIB);
    tool("mkfs.vfat", &["-F", "32", &fs]);
    let (r, reads) = layout_of(&fs, 64 * MIB);
    let data = fat_data_start(&tool("fsck.fat", &["-v", "-n", &fs]));
    assert_covered(&r, 0, data, "FAT32 reserved and FATs");
    assert_eq!(reads, 1);
}

#[test]
fn bare_ext4_without_partition_table_is_one_filesystem_in_one_read() {
    let dir = tempfile::tempdir().unwrap();
    // Small ext4 gets 1 KiB blocks and flex_bg: three groups whose
    // bitmaps are packed into group 0.
    let fs = image(dir.path(), "fs.img", 24 * MIB);
    tool("mke2fs", &["-F", "-q", "-t", "ext4", &fs]);
    let (r, reads) = layout_of(&fs, 64 * MIB);
    assert_ext_staged(&r, 0, &fs);
    let (bs, block_bitmap, inode_bitmap, _) = dumpe2fs_group0(&fs);
    assert_covered(&r, block_bitmap, bs, "block bitmap 0");
    assert_covered(&r, inode_bitmap, bs, "inode bitmap 0");
    assert_eq!(reads, 1);
}

#[test]
fn cap_keeps_partition_tables_then_boot_sectors_within_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, _, ext) = gpt_disk(dir.path());
    assert_eq!(layout_of(&disk, 0).0, vec![]);
    // Tables alone exceed 20 KiB: nothing else gets in.
    let (r, _) = layout_of(&disk, 20 * 1024);
    assert_eq!(r.iter().map(|x| x.len).sum::<u64>(), 20 * 1024);
    assert_covered(&r, 0, TABLE_AREA, "primary GPT");
    let backup = 64 * MIB - 33 * SECTOR;
    assert!(
        r.iter().all(|x| x.offset < MIB || x.offset >= backup),
        "{r:?}"
    );
    // Room for tables and heads, not for inode table 0.
    let (r, _) = layout_of(&disk, 200 * 1024);
    assert_covered(&r, MIB, HEAD, "FAT head");
    assert_covered(&r, 9 * MIB, HEAD, "ext4 head");
    let (_, _, _, (itable, len)) = dumpe2fs_group0(&ext);
    assert!(!covered(&r, 9 * MIB + itable, len), "{r:?}");
}

#[test]
fn random_disk_yields_only_its_head() {
    let mut disk = vec![0u8; 4 * MIB as usize];
    rand::rngs::StdRng::seed_from_u64(7).fill(&mut disk[..]);
    let head = Region {
        offset: 0,
        len: HEAD,
        what: "partition table",
    };
    assert_eq!(layout_of_bytes(&disk, u64::MAX), (vec![head], 1));
}

#[test]
fn failed_reads_and_tiny_disks_are_clipped_not_fatal() {
    let offline = &mut |_: u64, _: &mut [u8]| Err(io::Error::other("offline"));
    let head = Region {
        offset: 0,
        len: HEAD,
        what: "partition table",
    };
    assert_eq!(boot_regions(1 << 40, u64::MAX, offline), vec![head]);
    let tiny = Region {
        offset: 0,
        len: 4096,
        what: "partition table",
    };
    assert_eq!(layout_of_bytes(&[0; 4096], u64::MAX).0, vec![tiny]);
    assert_eq!(layout_of_bytes(&[], u64::MAX).0, vec![]);
}

/// Writes MBR/EBR entry `i` of `sector` and the boot signature.
fn put_entry(disk: &mut [u8], sector: usize, i: usize, ty: u8, lba: u32, n: u32) {
    let s = &mut disk[sector * 512..][..512];
    let e = &mut s[446 + 16 * i..][..16];
    e[4] = ty;
    e[8..12].copy_from_slice(&lba.to_le_bytes());
    e[12..16].copy_from_slice(&n.to_le_bytes());
    s[510..].copy_from_slice(&[0x55, 0xAA]);
}

#[test]
fn endless_ebr_chain_costs_bounded_reads() {
    // Every sector an EBR with no partition, linking to the next one.
    let mut disk = vec![0u8; 4 * MIB as usize];
    put_entry(&mut disk, 0, 0, 0x05, 1, 8000);
    for ebr in 1..8000 {
        put_entry(&mut disk, ebr, 1, 0x05, ebr as u32, 1);
    }
    let (r, reads) = layout_of_bytes(&disk, u64::MAX);
    assert_eq!(reads, 1 + MAX_PARTITIONS);
    assert_eq!(
        r,
        vec![Region {
            offset: 0,
            len: HEAD,
            what: "partition table"
        }]
    );
}

#[test]
fn corrupted_tables_and_superblocks_never_panic_or_break_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let mut disk = std::fs::read(gpt_disk(dir.path()).0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..300 {
        // Where the parsers look: sector 0 and the GPT, a BPB, an ext
        // superblock and its group descriptors.
        let base = [0, MIB, 9 * MIB][rng.gen_range(0..3)] as usize;
        let saved = disk[base..base + 8192].to_vec();
        for _ in 0..rng.gen_range(1..16) {
            disk[base + rng.gen_range(0..8192)] = rng.gen();
        }
        let (_, reads) = layout_of_bytes(&disk, 32 * MIB);
        assert!(reads <= 1 + 3 * MAX_PARTITIONS, "{reads} reads");
        disk[base..base + 8192].copy_from_slice(&saved);
    }
}
