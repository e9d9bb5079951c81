//! Where the daemon of a staging directory last mounted its disks
//! (`mount.json`, written once the mount is up). A daemon killed without
//! its cleanup leaves a dead FUSE mount behind that answers every access
//! with ENOTCONN; `serve` detaches one at its own `--mount`, and with
//! this record also one at the mount point the previous daemon of the
//! same staging used (explore1 M6), which nothing else would clean up.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::repo::limits::MAX_META_BYTES;

const FILE: &str = "mount.json";

#[derive(Serialize, Deserialize)]
struct Record {
    mount: PathBuf,
    pid: u32,
}

/// The mount point recorded in staging `root`, if any can be read.
pub fn read(root: &Path) -> Option<PathBuf> {
    read_record::<Record>(root, FILE).map(|r| r.mount)
}

/// Records `mount` (absolute) as this process's mount point.
pub fn write(root: &Path, mount: &Path) -> Result<()> {
    let r = Record {
        mount: mount.to_path_buf(),
        pid: std::process::id(),
    };
    write_record(root, FILE, &r)
}

/// The small JSON record `file` in staging `root`, if it reads and
/// parses (a missing or damaged one is none: these records only help).
pub(super) fn read_record<T: serde::de::DeserializeOwned>(root: &Path, file: &str) -> Option<T> {
    use super::Storage;
    let bytes = super::OsStorage
        .read(&root.join(file), MAX_META_BYTES)
        .ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Writes `record` as `file` in staging `root` atomically (temp, fsync,
/// rename, fsync of the directory).
pub(super) fn write_record<T: Serialize>(root: &Path, file: &str, record: &T) -> Result<()> {
    let body = serde_json::to_vec_pretty(record).expect("json");
    crate::util::write_atomic(&root.join(file), &body, 0o600, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_mount_reads_back_and_a_damaged_record_is_none() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()), None);
        write(d.path(), Path::new("/mnt/recover")).unwrap();
        assert_eq!(read(d.path()), Some(PathBuf::from("/mnt/recover")));
        std::fs::write(d.path().join(FILE), b"{not json").unwrap();
        assert_eq!(read(d.path()), None);
    }
}
