//! SEEK_DATA / SEEK_HOLE on a recovered disk over a real FUSE mount: the
//! backup's zero chunks are holes to `lseek(2)` and to `qemu-img map`
//! (QEMU's file-posix asks SEEK_DATA for block status), a guest write into
//! a hole makes it data, `qemu-img convert` of a sparse disk reads only its
//! data, and passthrough opens answer the same. Without the daemon's
//! `lseek` the kernel answers "all data, no hole" and copies read every
//! hole. The daemon guard unmounts even when a test fails.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::{RngCore, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BS: u64 = 64 * KIB;

/// `lseek(fd, off, whence)`: the offset, or the errno.
fn lseek(f: &File, off: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: lseek on an open descriptor touches no memory.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    match r {
        -1 => Err(std::io::Error::last_os_error().raw_os_error().unwrap()),
        r => Ok(r as u64),
    }
}

/// The data extents `[start, end)` of a file by SEEK_DATA / SEEK_HOLE,
/// walked as `cp --sparse` does.
fn data_by_lseek(f: &File, size: u64) -> Vec<(u64, u64)> {
    let mut out = vec![];
    let mut pos = 0;
    while pos < size {
        let start = match lseek(f, pos, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(e) => {
                assert_eq!(e, libc::ENXIO, "SEEK_DATA at {pos}");
                break;
            }
        };
        let end = lseek(f, start, libc::SEEK_HOLE).unwrap();
        assert!(end > start, "SEEK_HOLE at data {start} answered {end}");
        out.push((start, end));
        pos = end;
    }
    out
}

/// The extents of `qemu-img map --output=json` of a raw file: `(start,
/// end, data, zero)`, adjacent ones of the same kind merged.
fn qemu_map(disk: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = tool(&[
        "qemu-img",
        "map",
        "--output=json",
        "-f",
        "raw",
        disk.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut merged: Vec<(u64, u64, bool, bool)> = vec![];
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (data, zero) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match merged.last_mut() {
            Some(l) if l.1 == start && l.2 == data && l.3 == zero => l.1 = start + len,
            _ => merged.push((start, start + len, data, zero)),
        }
    }
    merged
}

/// The map's data extents; checks every other extent reads as zeros.
fn qemu_data(disk: &Path) -> Vec<(u64, u64)> {
    let map = qemu_map(disk);
    for &(s, e, data, zero) in &map {
        assert!(data || zero, "[{s}, {e}) is neither data nor zero: {map:?}");
    }
    map.iter()
        .filter(|e| e.2)
        .map(|&(s, e, _, _)| (s, e))
        .collect()
}

/// Backs up a disk of `size` bytes holding random data at `pieces` and
/// zeros elsewhere, in 64 KiB chunks; returns its bytes.
fn backed_up(env: &Env, vm: &str, size: u64, pieces: &[(u64, u64)]) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model = vec![0u8; size as usize];
    for &(off, len) in pieces {
        rng.fill_bytes(&mut model[off as usize..(off + len) as usize]);
    }
    let img = env.path(&format!("{vm}.img"));
    std::fs::write(&img, &model).unwrap();
    env.backup(vm, "64K", &[&img]);
    std::fs::remove_file(&img).unwrap();
    model
}

/// The data pieces of the 64 MiB test disk (one unaligned), and the
/// 64 KiB-block extents they cover.
const SIZE: u64 = 64 * MIB;
const PIECES: [(u64, u64); 3] = [(0, MIB), (16 * MIB + 100 * KIB, 200 * KIB), (48 * MIB, BS)];
const DATA: [(u64, u64); 3] = [
    (0, MIB),
    (16 * MIB + BS, 16 * MIB + 5 * BS),
    (48 * MIB, 48 * MIB + BS),
];

#[test]
fn seek_data_and_seek_hole_find_the_backups_holes_and_a_guest_write_into_one_makes_it_data() {
    let env = Env::new();
    let model = backed_up(&env, "sparse", SIZE, &PIECES);
    let _daemon = env.serve();
    let disk = env.recover("sparse", None).remove(0);
    let f = File::open(&disk).unwrap();

    // Single answers, as a client asks them.
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Ok(0));
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE), Ok(MIB));
    assert_eq!(lseek(&f, MIB - 1, libc::SEEK_HOLE), Ok(MIB));
    assert_eq!(lseek(&f, MIB, libc::SEEK_HOLE), Ok(MIB));
    assert_eq!(lseek(&f, MIB, libc::SEEK_DATA), Ok(16 * MIB + BS));
    assert_eq!(
        lseek(&f, 16 * MIB + 2 * BS + 3, libc::SEEK_DATA),
        Ok(16 * MIB + 2 * BS + 3)
    );
    assert_eq!(lseek(&f, 48 * MIB + BS, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(lseek(&f, SIZE - 1, libc::SEEK_HOLE), Ok(SIZE - 1));
    assert_eq!(lseek(&f, SIZE, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(lseek(&f, SIZE, libc::SEEK_HOLE), Err(libc::ENXIO));
    // SEEK_SET/SEEK_END stay the kernel's.
    assert_eq!(lseek(&f, 5, libc::SEEK_SET), Ok(5));
    assert_eq!(lseek(&f, 0, libc::SEEK_END), Ok(SIZE));

    assert_eq!(data_by_lseek(&f, SIZE), DATA);
    assert_eq!(qemu_data(&disk), DATA);
    // Python's os.lseek, another client, agrees.
    let py = "import os, sys\n\
              fd = os.open(sys.argv[1], os.O_RDONLY)\n\
              print(os.lseek(fd, 1 << 20, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE))";
    let got = tool(&["python3", "-c", py, disk.to_str().unwrap()]);
    assert_eq!(got.trim(), format!("{} {MIB}", 16 * MIB + BS));
    // st_blocks counts the data: the file looks sparse (cp and tar ask
    // SEEK_DATA only then).
    let data_bytes = |d: &[(u64, u64)]| d.iter().map(|(s, e)| e - s).sum::<u64>();
    assert_eq!(
        std::fs::metadata(&disk).unwrap().blocks() * 512,
        data_bytes(&DATA)
    );
    // Asking read nothing, and the holes do read as zeros.
    assert_eq!(read_all(&disk), model);

    // A guest write into the hole at 8 MiB: its block is data at once.
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    w.write_all_at(&[0xab; 4096], 8 * MIB + 4096).unwrap();
    assert_eq!(lseek(&f, MIB, libc::SEEK_DATA), Ok(8 * MIB));
    assert_eq!(lseek(&w, 8 * MIB, libc::SEEK_HOLE), Ok(8 * MIB + BS));
    let mut want = DATA.to_vec();
    want.insert(1, (8 * MIB, 8 * MIB + BS));
    assert_eq!(data_by_lseek(&f, SIZE), want);
    assert_eq!(qemu_data(&disk), want);
    let deadline = Instant::now() + Duration::from_secs(5);
    // The kernel caches attributes for a second.
    while std::fs::metadata(&disk).unwrap().blocks() * 512 != data_bytes(&want) {
        assert!(
            Instant::now() < deadline,
            "st_blocks never counted the write"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut got = vec![0u8; BS as usize];
    f.read_exact_at(&mut got, 8 * MIB).unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0) && got[4096..8192].iter().all(|&b| b == 0xab));
    drop((f, w));
    env.release_closed("sparse", true);
}

#[test]
fn qemu_img_convert_and_cp_of_a_sparse_disk_over_fuse_read_only_its_data() {
    let env = Env::new();
    // 1 GiB with 2 MiB of data.
    let size = 1 << 30;
    let pieces = [(0, MIB), (700 * MIB, MIB)];
    let model = backed_up(&env, "big", size, &pieces);
    let _daemon = env.serve();
    let disk = env.recover("big", None).remove(0);

    let out = env.path("copy.raw");
    tool(&[
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        disk.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let read = env.disk_status("big", 0)["read_bytes"].as_u64().unwrap();
    assert!(
        read <= 16 * MIB,
        "qemu-img convert read {read} bytes of a disk with 2 MiB of data"
    );
    assert!(read_all(&out) == model, "the copy differs");
    // The copy is sparse too.
    let f = File::open(&out).unwrap();
    assert_eq!(lseek(&f, MIB, libc::SEEK_DATA), Ok(700 * MIB));
    std::fs::remove_file(&out).unwrap();

    // cp (--sparse=auto) sees a sparse file and copies its data only.
    tool(&["cp", disk.to_str().unwrap(), out.to_str().unwrap()]);
    let read = env.disk_status("big", 0)["read_bytes"].as_u64().unwrap() - read;
    assert!(
        read <= 16 * MIB,
        "cp read {read} bytes of a disk with 2 MiB of data"
    );
    assert!(read_all(&out) == model, "cp's copy differs");
    std::fs::remove_file(&out).unwrap();
    env.release_closed("big", true);
}

#[test]
fn a_passthrough_open_of_a_complete_disk_answers_the_same_holes() {
    let mut env = Env::new();
    env.serve_args = vec!["--fuse-passthrough".into()];
    backed_up(&env, "pt", SIZE, &PIECES);
    let daemon = env.serve();
    let disk = env.recover("pt", None).remove(0);
    // Stage every data block: the disk is complete.
    for &(s, e) in &DATA {
        let mut buf = vec![0u8; (e - s) as usize];
        File::open(&disk)
            .unwrap()
            .read_exact_at(&mut buf, s)
            .unwrap();
    }
    env.settled_disk_status("pt", 0);
    // A read-only open that passes through: its reads leave the daemon's
    // counter alone (the kernel may need the earlier opens released).
    let reads = || env.disk_status("pt", 0)["reads"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let f = loop {
        let before = reads();
        let f = OpenOptions::new()
            .read(true)
            .custom_flags_direct()
            .open(&disk)
            .unwrap();
        let mut a = AlignedPage::new();
        f.read_exact_at(a.buf(), 0).unwrap();
        if reads() == before {
            break f;
        }
        drop(f);
        assert!(
            Instant::now() < deadline,
            "no open passed through: {}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(data_by_lseek(&f, SIZE), DATA);
    assert_eq!(lseek(&f, MIB, libc::SEEK_DATA), Ok(16 * MIB + BS));
    drop(f);
    env.release_closed("pt", true);
}

/// `O_DIRECT` for an `OpenOptions`.
trait Direct {
    fn custom_flags_direct(&mut self) -> &mut Self;
}

impl Direct for OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_DIRECT)
    }
}

/// One page-aligned 4 KiB buffer, for an O_DIRECT read.
struct AlignedPage(Box<[u8; 8192]>);

impl AlignedPage {
    fn new() -> AlignedPage {
        AlignedPage(Box::new([0; 8192]))
    }

    fn buf(&mut self) -> &mut [u8] {
        let p = self.0.as_ptr() as usize;
        let start = p.next_multiple_of(4096) - p;
        &mut self.0[start..start + 4096]
    }
}
