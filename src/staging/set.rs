//! Every staging directory a daemon serves from: the main one
//! (`--staging`: the control socket, the sessions of export points without
//! their own) and each distinct `staging=DIR` of an export point, often on
//! another disk. Each is opened, checked and locked like `--staging`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::StagingDir;
use crate::error::{Error, IoContext, Result};
use crate::repo::{pins, Repository};

pub struct StagingSet {
    /// The main staging first, then each point's own, in first-use order.
    dirs: Vec<Arc<StagingDir>>,
    /// Export point name → index in `dirs`; a point not listed uses the
    /// main staging.
    of_point: HashMap<String, usize>,
}

impl StagingSet {
    /// Only the main staging (no export point has its own).
    pub fn single(main: StagingDir) -> StagingSet {
        StagingSet {
            dirs: vec![Arc::new(main)],
            of_point: HashMap::new(),
        }
    }

    /// Opens `main` and every distinct staging of `points` (name, its
    /// `staging=` if any). Points naming one directory share it; a point
    /// naming `main` uses it. Nested directories (a point's staging inside
    /// or around the mount point, the main staging or another point's) are
    /// refused before anything is created or opened: one daemon would scan
    /// or lock one tree twice, and FUSE would serve on top of its own data.
    pub fn open(
        main: &Path,
        mount: &Path,
        points: &[(&str, Option<&Path>)],
        repo: &Repository,
        lost: &[PathBuf],
    ) -> Result<StagingSet> {
        let (repo_id, repo_location) = (repo.id(), repo.location());
        let lost = lost
            .iter()
            .map(|p| resolve(p))
            .collect::<Result<Vec<_>>>()?;
        // The `--staging-lost` directories set up afresh at this start.
        let used = std::cell::RefCell::new(vec![]);
        let fresh = |root: &Path| {
            used.borrow_mut().push(root.to_path_buf());
            check_fresh(repo, root, &lost)
        };
        let resolved_main = resolve(main)?;
        let resolved_mount = resolve_mount(mount)?;
        // (resolved path, the point that named it first, index in `dirs`).
        let mut own: Vec<(PathBuf, &str, usize)> = vec![];
        let mut of_point = HashMap::new();
        let mut to_open: Vec<(PathBuf, &str)> = vec![];
        for &(name, dir) in points {
            let Some(dir) = dir else { continue };
            let p = resolve(dir)?;
            let bad = |why: String| {
                Error::invalid(format!(
                    "export point {name}: staging={} {why}",
                    dir.display()
                ))
            };
            if p == resolved_main {
                continue;
            }
            if let Some(why) = overlap(
                &p,
                &resolved_mount,
                "the mount point",
                "choose one outside it",
            ) {
                return Err(bad(why));
            }
            if let Some(why) = overlap(&p, &resolved_main, "--staging", OWN) {
                return Err(bad(why));
            }
            if let Some((_, _, i)) = own.iter().find(|(q, _, _)| *q == p) {
                of_point.insert(name.to_string(), *i);
                continue;
            }
            for (q, other, _) in &own {
                let what = format!("the staging of export point {other}");
                if let Some(why) = overlap(&p, q, &what, OWN) {
                    return Err(bad(why));
                }
            }
            let i = own.len() + 1;
            own.push((p, name, i));
            of_point.insert(name.to_string(), i);
            to_open.push((dir.to_path_buf(), name));
        }
        // FUSE mounted over its own staging: every recover would fail.
        if let Some(why) = overlap(
            &resolved_main,
            &resolved_mount,
            "the mount point",
            "choose one outside it",
        ) {
            return Err(Error::invalid(format!(
                "--staging {} {why}",
                main.display()
            )));
        }
        let mut dirs = vec![Arc::new(StagingDir::open_checked(
            main,
            repo_id,
            &repo_location,
            &fresh,
        )?)];
        let known_path = dirs[0].root().join(KNOWN);
        let mut known = read_known(&known_path)?;
        let before = known.len();
        for ((dir, name), (resolved, _, _)) in to_open.into_iter().zip(&own) {
            if known.contains(resolved) && !lost.contains(resolved) && !is_staging(resolved)? {
                return Err(Error::invalid(format!(
                    "export point {name}: staging={} was set up before and is now empty or \
                     missing: is its filesystem mounted? (its sessions would be hidden; if that \
                     disk is gone for good, start once with --staging-lost {}: their pins are \
                     removed and recover starts them from the backups)",
                    dir.display(),
                    dir.display()
                )));
            }
            let s = StagingDir::open_checked(&dir, repo_id, &repo_location, &fresh)
                .map_err(|e| e.context(format!("export point {name}")))?;
            known.insert(resolved.clone());
            dirs.push(Arc::new(s));
        }
        if known.len() != before {
            let json = serde_json::to_vec_pretty(&known).expect("json");
            crate::util::write_atomic(&known_path, &json, 0o600, true)?;
        }
        warn_unserved(&known, &own);
        warn_lost_unused(&lost, &used.borrow());
        // A failure costs only a later start without the repository (a
        // full staging filesystem must not stop this one).
        for d in &dirs {
            if let Err(e) = d.record_repository(repo.info()) {
                tracing::warn!(staging = %d.root().display(), "could not keep a copy of the repository's identity in staging (a daemon restarted there while the repository does not answer will not start): {e}");
            }
        }
        Ok(StagingSet { dirs, of_point })
    }

    /// `--staging`.
    pub fn main(&self) -> &Arc<StagingDir> {
        &self.dirs[0]
    }

    /// Every staging directory, the main one first.
    pub fn all(&self) -> &[Arc<StagingDir>] {
        &self.dirs
    }

    /// The staging directory of export point `name`.
    pub fn of_point(&self, name: &str) -> &Arc<StagingDir> {
        &self.dirs[self.of_point.get(name).copied().unwrap_or(0)]
    }
}

const OWN: &str = "give each staging its own directory";

/// Logs each `--staging-lost` directory this start did not set up afresh
/// (it holds its staging, or no staging of this daemon is there): the
/// flag is for one start after a disk is lost, not for every start
/// (explore3: a repeated one was silently ignored).
fn warn_lost_unused(lost: &[PathBuf], fresh: &[PathBuf]) {
    for l in lost_unused(lost, fresh) {
        tracing::warn!(
            "--staging-lost {} ignored: no staging directory was set up afresh there at this start (it holds its staging, or no --staging or export point names it); give --staging-lost once, after that disk is lost, not at every start",
            l.display()
        );
    }
}

/// The `lost` directories not among those set up afresh (`fresh`).
fn lost_unused<'a>(lost: &'a [PathBuf], fresh: &[PathBuf]) -> Vec<&'a PathBuf> {
    lost.iter()
        .filter(|l| !fresh.iter().any(|f| resolve(f).is_ok_and(|f| f == **l)))
        .collect()
}

/// Logs each staging directory an export point served before that no
/// point names now while it holds sessions: their VMs are not resumed
/// (their NFS and NBD clients find nothing) until it is served again.
fn warn_unserved(known: &std::collections::BTreeSet<PathBuf>, own: &[(PathBuf, &str, usize)]) {
    for k in known {
        if own.iter().any(|(p, _, _)| p == k) {
            continue;
        }
        let vms: Vec<String> = std::fs::read_dir(k.join("sessions"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().read_dir().is_ok_and(|mut s| s.next().is_some()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if !vms.is_empty() {
            tracing::warn!(
                "staging {} was served by an export point before and no --export-point names it now: its sessions (VM {}) are not resumed; give a point `staging={}` again to serve them",
                k.display(),
                vms.join(", "),
                k.display()
            );
        }
    }
}

/// Refuses to set up `root` afresh while the repository pins sessions this
/// host kept there: its disk is not mounted (after a reboot, say), and
/// set up anew it would hide them (`recover` would start over from the
/// backup without the guest's later writes). Unless `root` is in `lost`
/// (`--staging-lost`: that disk is gone for good): then those pins are
/// removed and `root` is set up afresh.
fn check_fresh(repo: &Repository, root: &Path, lost: &[PathBuf]) -> Result<()> {
    let pins = pins::of_host_under(repo, root).map_err(|e| {
        e.context(format!(
            "staging {} is new or empty: cannot check the repository for sessions kept there",
            root.display()
        ))
    })?;
    if pins.is_empty() {
        return Ok(());
    }
    let mut vms: Vec<&str> = pins.iter().map(|p| p.vm.as_str()).collect();
    vms.sort();
    vms.dedup();
    let vms = vms.join(", ");
    if lost.iter().any(|l| l == root) {
        for p in &pins {
            pins::remove(repo, p)?;
        }
        tracing::warn!(
            "staging {} was lost (--staging-lost): removed the pins of the sessions kept there (VM {vms})",
            root.display()
        );
        return Ok(());
    }
    Err(Error::invalid(format!(
        "staging {} was set up afresh but the repository has sessions kept there (VM {vms}): is its filesystem mounted? Nothing was written to it. If that disk is gone for good, start once with --staging-lost {} (their pins are removed; recover then starts from the backups)",
        root.display(),
        root.display()
    )))
}

/// In the main staging: every export point's staging (resolved path) it
/// has served with. One of them found empty again is a disk not mounted,
/// not a new staging: set up afresh, it would hide the sessions kept there
/// and let `recover` start them over from their backups.
const KNOWN: &str = "point-stagings.json";

/// Every export point's staging (resolved path) the main staging `main`
/// has served with; none if it never had one.
pub(crate) fn point_stagings(main: &Path) -> Result<std::collections::BTreeSet<PathBuf>> {
    read_known(&main.join(KNOWN))
}

fn read_known(path: &Path) -> Result<std::collections::BTreeSet<PathBuf>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::corrupt(format!("{} is damaged ({e})", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

/// Whether `dir` holds a staging directory's `staging.json`.
fn is_staging(dir: &Path) -> Result<bool> {
    let info = dir.join("staging.json");
    match info.symlink_metadata() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("stat {}", info.display()), e)),
    }
}

/// Why `p` may not be used beside `other`, if it overlaps it.
fn overlap(p: &Path, other: &Path, what: &str, hint: &str) -> Option<String> {
    let how = if p == other {
        "is"
    } else if p.starts_with(other) {
        "is inside"
    } else if other.starts_with(p) {
        "contains"
    } else {
        return None;
    };
    Some(format!("{how} {what} ({}); {hint}", other.display()))
}

/// `p` made absolute, its longest existing ancestor canonicalised (so
/// links and `..` resolve as the kernel will) and the rest, which does not
/// exist yet and so holds no link, normalised lexically.
/// `resolve` of a mount point without a stat of the point itself: a
/// mount a keeper holds for a crashed daemon answers no stat until this
/// daemon serves it (`serve` gives it canonical already). A last
/// component that is a symbolic link is followed with `readlink`, which
/// never asks a FUSE mount anything (its root is no link): else a
/// `--mount` given as a link never matched the kept, canonical mount
/// point (review32 M3).
pub(crate) fn resolve_mount(mount: &Path) -> Result<PathBuf> {
    let mut p = std::path::absolute(mount).ctx(|| format!("resolve {}", mount.display()))?;
    // As the kernel's limit on links followed in one path.
    for _ in 0..40 {
        let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
            return resolve(&p);
        };
        let here = resolve(parent)?.join(name);
        match std::fs::read_link(&here) {
            // A relative target is relative to the link's directory.
            Ok(target) => p = here.parent().unwrap_or(Path::new("/")).join(target),
            Err(_) => return Ok(here),
        }
    }
    Err(Error::invalid(format!(
        "resolve {}: too many levels of symbolic links",
        mount.display()
    )))
}

fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).ctx(|| format!("resolve {}", p.display()))?;
    let mut existing = abs.as_path();
    let mut rest = vec![];
    while existing.symlink_metadata().is_err() {
        match (existing.components().next_back(), existing.parent()) {
            (Some(c @ (Component::Normal(_) | Component::ParentDir)), Some(parent)) => {
                rest.push(c.as_os_str().to_os_string());
                existing = parent;
            }
            // The root: let canonicalize say what is wrong.
            _ => break,
        }
    }
    let mut out =
        std::fs::canonicalize(existing).ctx(|| format!("resolve {}", existing.display()))?;
    for c in rest.iter().rev() {
        if c == ".." {
            out.pop();
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::pins::Pin;

    fn repo(d: &Path) -> Arc<Repository> {
        Repository::open_or_create(d.join("repo").to_str().unwrap())
            .unwrap()
            .0
    }

    fn open(d: &Path, points: &[(&str, Option<&Path>)]) -> Result<StagingSet> {
        open_lost(d, points, &[])
    }

    fn open_lost(
        d: &Path,
        points: &[(&str, Option<&Path>)],
        lost: &[PathBuf],
    ) -> Result<StagingSet> {
        std::fs::create_dir_all(d.join("mnt")).unwrap();
        StagingSet::open(&d.join("s/main"), &d.join("mnt"), points, &repo(d), lost)
    }

    /// Replaces `dir` by an empty directory, as a mount point whose disk
    /// is not mounted; the old one stays at `<dir>.unmounted`.
    fn unmount(dir: &Path) {
        std::fs::rename(dir, dir.with_extension("unmounted")).unwrap();
        std::fs::create_dir(dir).unwrap();
    }

    #[test]
    fn every_staging_opened_with_its_repository_keeps_a_copy_of_its_identity_for_a_start_without_it(
    ) {
        let d = tempfile::tempdir().unwrap();
        let point = d.path().join("s/p");
        let set = open(d.path(), &[("p", Some(point.as_path()))]).unwrap();
        let r = repo(d.path());
        for s in set.all() {
            let (at, info) = crate::staging::recorded_repository(s.root())
                .unwrap()
                .unwrap();
            assert_eq!(at, r.location());
            assert_eq!(&info, r.info());
        }
        drop(set);
        // Written by an older daemon: no copy, and none is made up.
        let marker = d.path().join("s/main/staging.json");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
        json.as_object_mut().unwrap().remove("repo_info");
        std::fs::write(&marker, serde_json::to_vec(&json).unwrap()).unwrap();
        assert!(
            crate::staging::recorded_repository(&d.path().join("s/main"))
                .unwrap()
                .is_none()
        );
        // The next start with the repository answering writes it.
        drop(open(d.path(), &[]).unwrap());
        assert!(
            crate::staging::recorded_repository(&d.path().join("s/main"))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_staging_found_empty_while_the_repository_pins_sessions_kept_there_is_refused_untouched() {
        let d = tempfile::tempdir().unwrap();
        let (main, fast) = (d.path().join("s/main"), d.path().join("fast"));
        let set = open(d.path(), &[("a", Some(&fast))]).unwrap();
        // Sessions kept in each (their pins, as a released session writes
        // them), and one of another host at the same path.
        let r = repo(d.path());
        let kept = |vm: &str, root: &Path| {
            Pin::new(
                vm,
                vec!["b1".into()],
                &root.join("sessions").join(vm).join("b1"),
                false,
            )
        };
        pins::put(&r, &kept("web01", set.main().root())).unwrap();
        pins::put(&r, &kept("db01", set.of_point("a").root())).unwrap();
        let mut other = kept("elsewhere", set.main().root());
        other.host = format!("{}-other", other.host);
        pins::put(&r, &other).unwrap();
        // A machine of the same host name (a clone) with the same paths:
        // another machine's session, not one kept here.
        let mut clone = kept("clone01", set.main().root());
        clone.machine = Some("0".repeat(32));
        pins::put(&r, &clone).unwrap();
        // Without a machine id here, the host name alone says (as before).
        let ours = match pins::machine_id() {
            Some(_) => "(VM web01)",
            None => "(VM clone01, web01)",
        };
        drop(set);
        // After a reboot, the main staging's disk is not mounted.
        unmount(&main);
        let e = open(d.path(), &[("a", Some(&fast))])
            .err()
            .expect("refused");
        let e = e.to_string();
        assert!(e.contains("is its filesystem mounted?"), "{e}");
        assert!(e.contains(ours) && e.contains("--staging-lost"), "{e}");
        assert_eq!(std::fs::read_dir(&main).unwrap().count(), 0, "written into");
        // Nor the point's, even with the main staging mounted and its record
        // of the point's staging lost.
        std::fs::remove_dir(&main).unwrap();
        std::fs::rename(main.with_extension("unmounted"), &main).unwrap();
        std::fs::remove_file(main.join(KNOWN)).unwrap();
        unmount(&fast);
        let e = open(d.path(), &[("a", Some(&fast))])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("(VM db01)"), "{e}");
        assert_eq!(std::fs::read_dir(&fast).unwrap().count(), 0, "written into");
        // A disk gone for good: --staging-lost drops its pins only, once.
        drop(open_lost(d.path(), &[("a", Some(&fast))], std::slice::from_ref(&fast)).unwrap());
        let vms: Vec<String> = ["web01", "db01", "elsewhere", "clone01"]
            .iter()
            .filter(|v| !pins::of_vm(&r, v).unwrap().is_empty())
            .map(|v| v.to_string())
            .collect();
        assert_eq!(vms, ["web01", "elsewhere", "clone01"]);
        // Another host's pin at the path of a new staging never blocks.
        std::fs::remove_dir_all(&main).unwrap();
        pins::remove(
            &r,
            &kept(
                "web01",
                &std::fs::canonicalize(d.path()).unwrap().join("s/main"),
            ),
        )
        .unwrap();
        drop(open(d.path(), &[]).unwrap());
    }

    #[test]
    fn a_staging_lost_flag_for_a_directory_that_holds_its_staging_is_reported_as_ignored() {
        let d = tempfile::tempdir().unwrap();
        let (main, other) = (d.path().join("s/main"), d.path().join("other"));
        drop(open(d.path(), &[]).unwrap());
        std::fs::create_dir_all(&other).unwrap();
        let lost = [resolve(&main).unwrap(), resolve(&other).unwrap()];
        // Neither was set up afresh: the main one holds its staging, the
        // other is no staging of this daemon.
        assert_eq!(lost_unused(&lost, &[]), lost.iter().collect::<Vec<_>>());
        // One set up afresh is not reported.
        assert_eq!(lost_unused(&lost, &lost[..1]), vec![&lost[1]]);
    }

    #[test]
    fn points_naming_one_directory_share_it_and_naming_the_main_one_use_it() {
        let d = tempfile::tempdir().unwrap();
        let (x, main) = (d.path().join("x"), d.path().join("s/main"));
        let set = open(
            d.path(),
            &[
                ("a", Some(&x)),
                ("b", Some(&d.path().join("y/../x"))),
                ("c", Some(&main)),
                ("d", None),
            ],
        )
        .unwrap();
        assert_eq!(set.all().len(), 2);
        assert!(Arc::ptr_eq(set.of_point("a"), set.of_point("b")));
        assert!(Arc::ptr_eq(set.of_point("c"), set.main()));
        assert!(Arc::ptr_eq(set.of_point("d"), set.main()));
        assert_eq!(set.of_point("a").root(), std::fs::canonicalize(&x).unwrap());
    }

    #[test]
    fn a_points_staging_found_empty_after_serving_is_refused_as_unmounted_and_a_new_one_is_not() {
        let d = tempfile::tempdir().unwrap();
        let (fast, other) = (d.path().join("fast"), d.path().join("other"));
        drop(open(d.path(), &[("a", Some(&fast))]).unwrap());
        // The disk holding it is not mounted at the next start.
        std::fs::rename(&fast, d.path().join("unmounted")).unwrap();
        std::fs::create_dir(&fast).unwrap();
        let e = open(d.path(), &[("a", Some(&fast))])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("is its filesystem mounted?"), "{e}");
        assert!(!e.to_string().contains("  "), "ragged: {e}");
        assert!(!fast.join("staging.json").exists(), "set up afresh");
        // Mounted again: served as before; a new directory is fine.
        std::fs::remove_dir(&fast).unwrap();
        std::fs::rename(d.path().join("unmounted"), &fast).unwrap();
        drop(open(d.path(), &[("a", Some(&fast)), ("b", Some(&other))]).unwrap());
        let e = std::fs::remove_dir_all(&fast).map(|_| open(d.path(), &[("a", Some(&fast))]));
        assert!(e.unwrap().is_err(), "a missing staging was set up afresh");
    }

    #[test]
    fn a_main_staging_at_inside_or_around_the_mount_point_is_refused_before_anything_is_created() {
        let d = tempfile::tempdir().unwrap();
        let mnt = d.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        for (main, why) in [
            (mnt.clone(), "is the mount point"),
            (mnt.join("st"), "is inside the mount point"),
            (d.path().to_path_buf(), "contains the mount point"),
        ] {
            let e = StagingSet::open(&main, &mnt, &[], &repo(d.path()), &[])
                .err()
                .expect("refused")
                .to_string();
            assert!(e.starts_with("--staging ") && e.contains(why), "{e}");
            assert!(!main.join("staging.json").exists(), "{e}");
        }
    }

    #[test]
    fn nested_staging_directories_are_refused_before_anything_is_created() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let link = p.join("link");
        std::fs::create_dir(p.join("mnt")).unwrap();
        std::os::unix::fs::symlink(p.join("mnt"), &link).unwrap();
        for (points, why) in [
            (vec![("a", p.join("s/main/a"))], "is inside --staging"),
            (vec![("a", link.join("deep"))], "is inside the mount point"),
            (vec![("a", p.join("s"))], "contains --staging"),
            (vec![("a", p.join("mnt/a"))], "is inside the mount point"),
            (vec![("a", p.join("mnt"))], "is the mount point"),
            (
                vec![("a", p.join("x")), ("b", p.join("x/y"))],
                "is inside the staging of export point a",
            ),
        ] {
            let points: Vec<(&str, Option<&Path>)> = points
                .iter()
                .map(|(n, d)| (*n, Some(d.as_path())))
                .collect();
            let e = open(p, &points).err().expect("refused").to_string();
            assert!(e.contains(why), "{points:?}: {e}");
            assert!(!p.join("s").exists(), "{points:?} created --staging");
            assert!(
                !p.join("x").exists(),
                "{points:?} created a point's staging"
            );
        }
    }
}
