//! Where the daemon of a staging directory last served each export
//! point's network frontends (`exports.json`, main staging only, written
//! once they all listen). A restart on other addresses strands the
//! clients attached to the old ones (QEMU's NBD reconnect, libnfs retry
//! the old port): with this record the next `serve` names them
//! (`daemon::exports_moved`, explore9 M6).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::last_mount::{read_record, write_record};
use crate::error::Result;

const FILE: &str = "exports.json";

/// One export point's listen addresses: NFS as `IP:PORT`, NBD as the
/// bound `IP:PORT` or `unix:PATH`. Empty: that frontend was not served.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    #[serde(default)]
    pub nfs: Vec<String>,
    #[serde(default)]
    pub nbd: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    points: BTreeMap<String, Served>,
    pid: u32,
}

/// The addresses recorded in staging `root` per export point, if a
/// record can be read.
pub fn read(root: &Path) -> Option<BTreeMap<String, Served>> {
    read_record::<Record>(root, FILE).map(|r| r.points)
}

/// Records `points` as where this process serves (atomically: temp,
/// fsync, rename, fsync of the directory).
pub fn write(root: &Path, points: &BTreeMap<String, Served>) -> Result<()> {
    let r = Record {
        points: points.clone(),
        pid: std::process::id(),
    };
    write_record(root, FILE, &r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_exports_read_back_and_a_damaged_record_is_none() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()), None);
        let mut points = BTreeMap::new();
        points.insert(
            "default".to_string(),
            Served {
                nfs: vec!["127.0.0.1:2049".into()],
                nbd: vec!["127.0.0.1:10809".into(), "unix:/run/n.sock".into()],
            },
        );
        write(d.path(), &points).unwrap();
        assert_eq!(read(d.path()), Some(points));
        std::fs::write(d.path().join(FILE), b"{not json").unwrap();
        assert_eq!(read(d.path()), None);
    }
}
