//! Fixtures shared by unit tests: a backup of given images, the volumes
//! of a session opened on any storage, as `recover` opens them, and a
//! small tmpfs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::prefetch::tracker::RecordWindow;
use crate::prefetch::Scheduler;
use crate::repo::writer::{run_backup, BackupRequest};
use crate::repo::{DiskManifest, Manifest, Repository};
use crate::staging::io::Storage;
use crate::staging::open_session;
use crate::volume::Volume;

/// Backs up `images` (one per disk) as `vm` with `chunk`-byte chunks; the
/// image files are written to `dir`.
pub fn backup_images(
    repo: &Arc<Repository>,
    dir: &Path,
    vm: &str,
    chunk: usize,
    images: &[&[u8]],
) -> Manifest {
    let paths = images
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let p = dir.join(format!("{vm}-{i}-{}.img", crate::repo::random_hex(4)));
            std::fs::write(&p, data).unwrap();
            p
        })
        .collect();
    let r = run_backup(
        repo,
        BackupRequest {
            vm: vm.into(),
            config: None,
            chunk_size: chunk as u32,
            images: paths,
            progress: false,
        },
    )
    .unwrap();
    r.manifest
}

/// Opens (or creates) the session's staging in `dir` on `storage` and its
/// volumes.
pub fn open_volumes(
    storage: &dyn Storage,
    dir: &Path,
    repo: &Arc<Repository>,
    m: &Manifest,
    sched: &Arc<Scheduler>,
) -> Vec<Arc<Volume>> {
    let (stores, _) = open_session(storage, dir, m).unwrap();
    stores
        .into_iter()
        .enumerate()
        .map(|(i, st)| {
            Volume::new(
                repo.clone(),
                m,
                i,
                st,
                sched.clone(),
                RecordWindow {
                    start: Instant::now(),
                    length: Duration::from_secs(300),
                },
            )
        })
        .collect()
}

/// A backed-up disk's bytes, read back (verified) chunk by chunk.
pub fn disk_bytes(repo: &Repository, disk: &DiskManifest) -> Vec<u8> {
    let mut out = Vec::with_capacity(disk.size as usize);
    for (i, c) in disk.chunks.iter().enumerate() {
        let len = disk.chunk_len(i as u64);
        match c {
            Some(d) => out.extend(repo.read_chunk(&d, len, &"test").unwrap().0),
            None => out.extend(vec![0u8; len]),
        }
    }
    out
}

/// `n` bytes no compressor can shrink (xorshift64 from `seed`).
pub fn incompressible(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tmpfs of `size` mounted on a fresh directory (root needed): a small
/// filesystem of known size. Unmounted on drop.
pub struct Tmpfs {
    _dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

impl Tmpfs {
    pub fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount tmpfs (root needed)");
        Tmpfs { _dir: dir, path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}
