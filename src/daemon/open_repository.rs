//! The repository a start serves from (`serve`): the store, or over an
//! outage, or a store refusing a staging that holds sessions of it, the
//! copy of its identity staging keeps.

use std::path::Path;
use std::sync::Arc;

use super::ServeOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::Repository;

/// The repository to serve from. One that does not answer (unreachable,
/// or not there: a share not mounted) is opened from the copy of its
/// identity `--staging` keeps, so that a daemon restarted during an
/// outage serves what staging holds: the guests' own writes and every
/// staged block (`repo::unconfirmed`). One that answers but refuses as
/// configured (a missing S3 bucket, wrong credentials, a wrong region)
/// fails the start: waiting would not change its answer.
pub(super) fn open_repository(opts: &ServeOptions) -> Result<Arc<Repository>> {
    let e = match opts.repo_delay {
        Some(d) => return Repository::open_delayed(&opts.repo, d),
        None => match Repository::open(&opts.repo) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        },
    };
    // A store that answered with what waiting will not change (a bucket
    // that does not exist, a request refused as malformed, a key refused)
    // is a configuration to fix: with nothing of this repository in
    // staging the start fails, saying what. A staging directory that
    // records this very repository and still holds sessions of it to
    // resume, served before from this address: the VMs come first (a store
    // still syncing, a failover, keys rotated under a running service), so
    // the start goes on degraded, saying so as an error (review29 M2). One
    // whose sessions were all released serves nothing without the store:
    // it fails as a fresh one does (review30 L5).
    let answered =
        crate::repo::backend::Misconfigured::is(&e) || e.kind() == ErrorKind::NotPermitted;
    if !(matches!(e.kind(), ErrorKind::Io | ErrorKind::NotFound) || answered) {
        return Err(e);
    }
    let recorded = match crate::staging::recorded_repository(&opts.staging) {
        Ok(Some(r)) => r,
        Ok(None) => return Err(e),
        Err(e2) => {
            tracing::warn!("{e2}");
            return Err(e);
        }
    };
    if answered && !sessions_remain(opts) {
        return Err(Error::new(
            e.kind(),
            format!(
                "{e} (staging {} records this repository, but holds no session of it to serve without it)",
                opts.staging.display()
            ),
        ));
    }
    let (at, info) = recorded;
    let id = info.id.clone();
    match Repository::open_recorded(&opts.repo, info, &at) {
        Ok(repo) if answered => {
            tracing::error!(
                repo = %repo.location(),
                "the store refuses this repository ({e}): starting from staging {}'s record of it (id {id}), which it served before from this address. Staged blocks and the guests' writes are served; blocks not staged cannot be read, and pins, profiles and backups wait, until it answers as itself: fix what this says and the daemon carries on by itself once the store answers (a bucket made again, a permission granted), but a change of region, endpoint or keys takes a restart (they are read at start)",
                opts.staging.display()
            );
            Ok(repo)
        }
        Ok(repo) => {
            tracing::warn!(
                repo = %repo.location(),
                "the repository does not answer ({e}): starting from staging {}'s record of it (id {id}). Staged blocks and the guests' writes are served; blocks not staged cannot be read, and pins, profiles and backups wait, until it answers as itself",
                opts.staging.display()
            );
            Ok(repo)
        }
        // Both: why the repository did not open, and why its record did not do.
        Err(e2) => Err(Error::new(
            e.kind(),
            format!("{e} (and not started from staging's record of it: {e2})"),
        )),
    }
}

/// Whether a staging directory of this daemon (the main one, each export
/// point's, configured or served with before) holds a session marked
/// served (`active`), which a start resumes. One that cannot be read is
/// taken to hold some.
fn sessions_remain(opts: &ServeOptions) -> bool {
    let configured = (opts.datastore.placement.points.iter()).filter_map(|p| p.staging.clone());
    let known = crate::staging::set::point_stagings(&opts.staging).unwrap_or_default();
    let roots = std::iter::once(opts.staging.clone())
        .chain(configured)
        .chain(known);
    let dirs = |d: &Path| -> std::io::Result<Vec<std::path::PathBuf>> {
        match std::fs::read_dir(d) {
            Ok(entries) => entries.map(|e| e.map(|e| e.path())).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e),
        }
    };
    let active = |root: &Path| -> std::io::Result<bool> {
        for vm in dirs(&root.join("sessions"))? {
            for s in dirs(&vm)? {
                if s.join("active").try_exists()? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    };
    roots.into_iter().any(|r| active(&r).unwrap_or(true))
}
