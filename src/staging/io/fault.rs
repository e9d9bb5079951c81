//! A fault-injecting [`Storage`] for tests, in the way QEMU's `blkdebug`
//! works: rules name an operation, a file (by a substring of its path), how
//! many matching calls succeed first, how many then fail, and the errno.
//! It can also delay an operation, to hold a sync open while a test looks.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{BlockFile, Open, PinnedDir, Storage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Read,
    Write,
    Sync,
    Punch,
    SetLen,
    Rename,
    SyncDir,
    Remove,
}

#[derive(Debug, Clone)]
pub struct Rule {
    op: Op,
    path: String,
    /// Matching calls that still succeed before the rule fires.
    skip: u64,
    /// Calls that fail once it fires (`None`: every later one).
    times: Option<u64>,
    errno: i32,
    delay: Duration,
    /// Only fires once a rename of a path containing `.0` with data
    /// containing `.1` has gone through (e.g. a commit record).
    armed_by: Option<(String, Vec<u8>)>,
    /// For renames: only those whose data contains this.
    data: Option<Vec<u8>>,
}

impl Rule {
    /// Fails every `op` on a path containing `path` with `errno`.
    pub fn fail(op: Op, path: &str, errno: i32) -> Rule {
        Rule {
            op,
            path: path.into(),
            skip: 0,
            times: None,
            errno,
            delay: Duration::ZERO,
            armed_by: None,
            data: None,
        }
    }

    /// Delays every matching `op` without failing it.
    pub fn delay(op: Op, path: &str, delay: Duration) -> Rule {
        Rule {
            errno: 0,
            delay,
            ..Rule::fail(op, path, 0)
        }
    }

    /// Lets the first `n` matching calls succeed.
    pub fn after(mut self, n: u64) -> Rule {
        self.skip = n;
        self
    }

    /// Fails only `n` calls, then succeeds again.
    pub fn times(mut self, n: u64) -> Rule {
        self.times = Some(n);
        self
    }

    /// Fires only after a rename of `path` whose data contains `data`.
    pub fn once_renamed(mut self, path: &str, data: &[u8]) -> Rule {
        self.armed_by = Some((path.into(), data.into()));
        self
    }

    /// A rename rule that only matches renames whose data contains `data`.
    pub fn with_data(mut self, data: &[u8]) -> Rule {
        self.data = Some(data.into());
        self
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

#[derive(Default)]
struct Rules {
    rules: Vec<Rule>,
    /// Calls that failed because of a rule.
    injected: u64,
    /// Renames that went through: (path, data).
    renamed: Vec<(String, Vec<u8>)>,
}

impl Rules {
    /// Decides a call's fate: how long to hold it, and the errno to fail with.
    fn decide(&mut self, op: Op, path: &Path, data: Option<&[u8]>) -> (Duration, Option<i32>) {
        let p = path.to_string_lossy();
        let mut delay = Duration::ZERO;
        let mut fail = None;
        let renamed = &self.renamed;
        for r in self.rules.iter_mut() {
            if r.op != op || !p.contains(&r.path) {
                continue;
            }
            if let Some((ap, ad)) = &r.armed_by {
                if !renamed
                    .iter()
                    .any(|(rp, rd)| rp.contains(ap.as_str()) && contains(rd, ad))
                {
                    continue;
                }
            }
            if let (Some(want), Some(d)) = (&r.data, data) {
                if !contains(d, want) {
                    continue;
                }
            }
            if r.skip > 0 {
                r.skip -= 1;
                continue;
            }
            if r.times == Some(0) {
                continue;
            }
            if let Some(t) = r.times.as_mut() {
                *t -= 1;
            }
            delay = delay.max(r.delay);
            if r.errno != 0 && fail.is_none() {
                fail = Some(r.errno);
            }
        }
        if fail.is_some() {
            self.injected += 1;
        }
        (delay, fail)
    }
}

/// Wraps another storage and applies the rules to every call.
#[derive(Clone)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    rules: Arc<Mutex<Rules>>,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn Storage>) -> FaultyStorage {
        FaultyStorage {
            inner,
            rules: Arc::default(),
        }
    }

    pub fn inject(&self, rule: Rule) {
        self.rules.lock().rules.push(rule);
    }

    pub fn clear(&self) {
        self.rules.lock().rules.clear();
    }

    /// How many calls failed because of a rule.
    pub fn injected(&self) -> u64 {
        self.rules.lock().injected
    }

    fn check(&self, op: Op, path: &Path) -> io::Result<()> {
        self.check_data(op, path, None)
    }

    fn check_data(&self, op: Op, path: &Path, data: Option<&[u8]>) -> io::Result<()> {
        let (delay, fail) = self.rules.lock().decide(op, path, data);
        // Sleep outside the lock so a delayed call does not hold up others.
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        match fail {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

impl Storage for FaultyStorage {
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn BlockFile>> {
        self.check(Op::Open, path)?;
        let inner = self.inner.open(path, how)?;
        Ok(Arc::new(FaultyFile {
            inner,
            path: path.to_path_buf(),
            owner: self.clone(),
        }))
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
        self.check(Op::Read, path)?;
        self.inner.read(path, limit)
    }

    fn rename_into_place(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.check_data(Op::Rename, path, Some(data))?;
        self.inner.rename_into_place(path, data)?;
        self.rules
            .lock()
            .renamed
            .push((path.to_string_lossy().into_owned(), data.to_vec()));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.check(Op::SyncDir, dir)?;
        self.inner.sync_dir(dir)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Remove, path)?;
        self.inner.remove_file(path)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.inner.exists(path)
    }

    fn pin_dir(&self, dir: &Path) -> io::Result<PinnedDir> {
        self.inner.pin_dir(dir)
    }

    fn boot_id(&self) -> String {
        self.inner.boot_id()
    }
}

struct FaultyFile {
    inner: Arc<dyn BlockFile>,
    path: std::path::PathBuf,
    owner: FaultyStorage,
}

impl BlockFile for FaultyFile {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.owner.check(Op::Read, &self.path)?;
        self.inner.read_exact_at(buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.owner.check(Op::Write, &self.path)?;
        self.inner.write_all_at(buf, off)
    }

    fn write_fill_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.owner.check(Op::Write, &self.path)?;
        self.inner.write_fill_at(buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.owner.check(Op::Sync, &self.path)?;
        self.inner.sync_data()
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.owner.check(Op::Punch, &self.path)?;
        self.inner.punch_hole(off, len)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn ino(&self) -> io::Result<Option<u64>> {
        self.inner.ino()
    }

    fn next_hole(&self, from: u64) -> io::Result<Option<std::ops::Range<u64>>> {
        self.inner.next_hole(from)
    }

    fn try_lock(&self, exclusive: bool) -> io::Result<bool> {
        self.inner.try_lock(exclusive)
    }

    fn image_locked_elsewhere(&self) -> io::Result<bool> {
        self.inner.image_locked_elsewhere()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.owner.check(Op::SetLen, &self.path)?;
        self.inner.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::io::OsStorage;

    #[test]
    fn a_rule_fails_the_nth_matching_call_only_as_often_as_asked() {
        let d = tempfile::tempdir().unwrap();
        let s = FaultyStorage::new(OsStorage::shared());
        s.inject(Rule::fail(Op::Sync, "a.data", libc::EIO).after(1).times(2));
        let a = s.open(&d.path().join("a.data"), Open::Create).unwrap();
        let b = s.open(&d.path().join("b.data"), Open::Create).unwrap();
        assert!(a.sync_data().is_ok(), "first call skipped");
        assert_eq!(a.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(b.sync_data().is_ok(), "other files are untouched");
        assert!(a.sync_data().is_err());
        assert!(a.sync_data().is_ok(), "fails only twice");
        assert_eq!(s.injected(), 2);
    }
}
