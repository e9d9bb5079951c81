//! Writing a backup: cut raw images into fixed chunks, skip zero chunks,
//! store each distinct chunk once, then publish the manifest last.
//! Hashing and compression run on a small crossbeam worker pool while one
//! thread reads the image sequentially.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::bounded;

use super::chunk::{is_zero, Digest};
use super::manifest::{DiskManifest, Manifest, MANIFEST_FORMAT};
use super::Repository;
use crate::error::{Error, IoContext, Result};
use crate::util::{rfc3339, validate_name};

pub struct BackupRequest {
    pub vm: String,
    pub config: Option<serde_json::Value>,
    pub chunk_size: u32,
    pub images: Vec<PathBuf>,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

#[derive(Debug, Default, Clone)]
pub struct DiskReport {
    pub name: String,
    pub size: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
}

pub struct BackupReport {
    pub manifest: Manifest,
    pub disks: Vec<DiskReport>,
}

/// Size of a raw image: a regular file or a block device, nothing else.
pub fn image_size(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).ctx(|| format!("image {}", path.display()))?;
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(meta.len());
    }
    if ft.is_block_device() {
        let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
        // points at a live local of that type; the fd is open.
        let rc =
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x8008_1272, &mut size) };
        if rc != 0 {
            return Err(Error::io(
                format!("size of {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        return Ok(size);
    }
    Err(Error::invalid(format!(
        "image {} is neither a regular file nor a block device",
        path.display()
    )))
}

pub fn default_config(vm: &str, disks: usize) -> serde_json::Value {
    let disks: Vec<_> = (0..disks)
        .map(|i| serde_json::json!({"name": format!("disk{i}"), "file": format!("disk{i}.raw"), "format": "raw", "bus": "virtio"}))
        .collect();
    serde_json::json!({"name": vm, "vcpus": 1, "memory_mib": 512, "firmware": "bios", "disks": disks})
}

pub fn run_backup(repo: &Arc<Repository>, req: BackupRequest) -> Result<BackupReport> {
    validate_name("VM name", &req.vm)?;
    if req.images.is_empty() {
        return Err(Error::invalid("no disk image given"));
    }
    let sizes = req
        .images
        .iter()
        .map(|p| image_size(p))
        .collect::<Result<Vec<_>>>()?;
    if let Some(c) = &req.config {
        if !c.is_object() {
            return Err(Error::invalid("VM configuration must be a JSON object"));
        }
    }
    let total: u64 = sizes.iter().sum();
    let bar = progress_bar(req.progress, total);
    let mut disks = vec![];
    let mut reports = vec![];
    for (i, (path, size)) in req.images.iter().zip(&sizes).enumerate() {
        let (dm, rep) = backup_disk(repo, &format!("disk{i}"), path, *size, req.chunk_size, &bar)?;
        disks.push(dm);
        reports.push(rep);
    }
    bar.finish_and_clear();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let created_unix = now.as_secs();
    let config = req
        .config
        .unwrap_or_else(|| default_config(&req.vm, disks.len()));
    let mut base_id = backup_id(created_unix);
    if !repo.create_only_is_atomic()? {
        // The store could let a concurrent writer replace a manifest with
        // the same id: make ids that cannot collide, and that still sort
        // in time order (milliseconds before the random part).
        base_id = format!(
            "{base_id}.{:03}-{}",
            now.subsec_millis(),
            super::random_hex(3)
        );
    }
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        vm: req.vm.clone(),
        id: base_id.clone(),
        created: rfc3339(created_unix),
        created_unix,
        config,
        disks,
    };
    // Ids are time-based; two backups in one second get a suffix.
    for n in 1.. {
        if repo.put_manifest(&manifest)? {
            break;
        }
        manifest.id = format!("{base_id}-{n}");
    }
    Ok(BackupReport {
        manifest,
        disks: reports,
    })
}

fn backup_id(unix: u64) -> String {
    rfc3339(unix)
        .replace(['-', ':'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_string()
}

fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    bar
}

enum Outcome {
    Zero,
    Stored {
        digest: Digest,
        new_bytes: u64,
        stored_size: u64,
    },
}

fn backup_disk(
    repo: &Arc<Repository>,
    name: &str,
    path: &Path,
    size: u64,
    chunk_size: u32,
    bar: &indicatif::ProgressBar,
) -> Result<(DiskManifest, DiskReport)> {
    let file = Arc::new(File::open(path).ctx(|| format!("open image {}", path.display()))?);
    let n = DiskManifest::chunk_count(size, chunk_size);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    let (job_tx, job_rx) = bounded::<(u64, Vec<u8>)>(workers * 2);
    let (res_tx, res_rx) = bounded::<(u64, Result<Outcome>)>(workers * 2);

    std::thread::scope(|s| -> Result<(DiskManifest, DiskReport)> {
        for _ in 0..workers {
            let (job_rx, res_tx, repo) = (job_rx.clone(), res_tx.clone(), repo.clone());
            s.spawn(move || {
                for (idx, data) in job_rx {
                    let r = store_chunk(&repo, &data);
                    if res_tx.send((idx, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(res_tx);
        let reader = {
            let file = file.clone();
            s.spawn(move || -> Result<()> {
                for idx in 0..n {
                    let off = idx * chunk_size as u64;
                    let len = (size - off).min(chunk_size as u64) as usize;
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, off)
                        .ctx(|| format!("read {} at {off}", path.display()))?;
                    if job_tx.send((idx, buf)).is_err() {
                        break;
                    }
                }
                Ok(())
            })
        };

        let mut chunks = vec![None; n as usize];
        let mut rep = DiskReport {
            name: name.into(),
            size,
            chunks: n,
            ..Default::default()
        };
        let mut seen = std::collections::HashSet::new();
        let mut stored_bytes = 0;
        let mut first_err = None;
        for (idx, r) in res_rx {
            bar.inc((size - idx * chunk_size as u64).min(chunk_size as u64));
            match r {
                Ok(Outcome::Zero) => rep.zero_chunks += 1,
                Ok(Outcome::Stored {
                    digest,
                    new_bytes,
                    stored_size,
                }) => {
                    if new_bytes > 0 {
                        rep.new_chunks += 1;
                        rep.new_bytes += new_bytes;
                    }
                    if seen.insert(digest) {
                        stored_bytes += stored_size;
                    }
                    chunks[idx as usize] = Some(digest);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        reader.join().expect("reader thread")?;
        if let Some(e) = first_err {
            return Err(e);
        }
        let dm = DiskManifest {
            name: name.into(),
            size,
            chunk_size,
            chunks,
            stored_bytes,
            new_bytes: rep.new_bytes,
        };
        Ok((dm, rep))
    })
}

fn store_chunk(repo: &Repository, data: &[u8]) -> Result<Outcome> {
    if is_zero(data) {
        return Ok(Outcome::Zero);
    }
    let digest = Digest::of(data);
    let new_bytes = repo.put_chunk(&digest, data)?;
    let stored_size = if new_bytes > 0 {
        new_bytes
    } else {
        repo.chunk_stored_size(&digest)?.unwrap_or(0)
    };
    Ok(Outcome::Stored {
        digest,
        new_bytes,
        stored_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn req(vm: &str, images: Vec<PathBuf>) -> BackupRequest {
        BackupRequest {
            vm: vm.into(),
            config: None,
            chunk_size: 65536,
            images,
            progress: false,
        }
    }

    #[test]
    fn second_backup_of_changed_image_stores_only_changed_chunks() {
        let d = tempfile::tempdir().unwrap();
        let (repo, created) =
            Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
        assert!(created);
        let mut data: Vec<u8> = (0..10 * 65536 + 123).map(|i| (i % 253) as u8).collect();
        data[65536..2 * 65536].fill(0);
        let img = image(d.path(), "a.raw", &data);
        let r1 = run_backup(&repo, req("vm1", vec![img.clone()])).unwrap();
        assert_eq!(r1.disks[0].zero_chunks, 1);
        assert_eq!(r1.manifest.disks[0].chunks[1], None);
        data[5 * 65536 + 7] ^= 0xff;
        std::fs::write(&img, &data).unwrap();
        let r2 = run_backup(&repo, req("vm1", vec![img])).unwrap();
        assert_eq!(r2.disks[0].new_chunks, 1);
        assert!(r2.manifest.new_bytes() > 0 && r2.manifest.new_bytes() < r1.manifest.new_bytes());
        assert_ne!(
            r1.manifest.id, r2.manifest.id,
            "same-second backups get distinct ids"
        );
        assert_eq!(repo.backup_ids("vm1").unwrap().len(), 2);
        // Every chunk reads back verified and in order.
        let m = repo.resolve("vm1", None).unwrap();
        let disk = &m.disks[0];
        let mut back = vec![];
        for (i, c) in disk.chunks.iter().enumerate() {
            match c {
                Some(dg) => back.extend(
                    repo.read_chunk(dg, disk.chunk_len(i as u64), &"test")
                        .unwrap()
                        .0,
                ),
                None => back.extend(vec![0u8; disk.chunk_len(i as u64)]),
            }
        }
        assert_eq!(back, data);
    }

    #[test]
    fn non_regular_image_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) = Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
        let e = run_backup(&repo, req("vm", vec![d.path().to_path_buf()]))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("neither a regular file nor a block device"),
            "{e}"
        );
    }
}
