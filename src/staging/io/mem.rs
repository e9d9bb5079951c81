//! An in-memory [`Storage`] that records every write, sync, rename and
//! directory sync in one global order, and builds "power cut here" states
//! from the record, in the style of CrashMonkey and ALICE.
//!
//! The model is what a Linux filesystem without data journaling promises:
//! * a file's data written before its last `sync_data` (or `set_len`,
//!   which syncs the whole file) is durable; any subset of what was written
//!   after it may be, sector by sector (512 bytes), in any combination;
//! * a name created, renamed or removed is durable after `sync_dir` of its
//!   parent; later name changes in a directory may each be there or not;
//! * the contents behind `rename_into_place` were synced before the rename;
//! * directories made by `create_dir_all` are durable at once (it syncs
//!   each parent).
//!
//! `kill -9` keeps the page cache, so it cannot show a missing sync; these
//! states can.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;

use super::{BlockFile, Open, PinnedDir, Storage};

const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Event {
    Write {
        ino: usize,
        off: u64,
        data: Arc<[u8]>,
    },
    /// Zeros a range (hole punch); durable like a write.
    Zero {
        ino: usize,
        off: u64,
        len: u64,
    },
    /// Size change plus a full sync of the file.
    SetLen {
        ino: usize,
        len: u64,
    },
    Sync {
        ino: usize,
    },
    /// A new inode with contents that are durable at once (a synced temp file).
    Born {
        ino: usize,
        data: Arc<[u8]>,
    },
    /// `path` now names `ino` (create or rename).
    Link {
        path: PathBuf,
        ino: usize,
    },
    Unlink {
        path: PathBuf,
    },
    SyncDir {
        dir: PathBuf,
    },
}

#[derive(Default)]
struct State {
    /// What a reader sees now.
    names: BTreeMap<PathBuf, usize>,
    dirs: BTreeSet<PathBuf>,
    files: Vec<Vec<u8>>,
    /// The durable starting point the log applies to.
    base_names: BTreeMap<PathBuf, usize>,
    base_files: Vec<Vec<u8>>,
    log: Vec<Event>,
    /// Which "boot" this is: a power cut starts a new one.
    boot: u64,
}

/// In-memory files with a record of every operation.
#[derive(Clone, Default)]
pub struct MemStorage {
    st: Arc<Mutex<State>>,
}

fn parent(p: &Path) -> PathBuf {
    p.parent().unwrap_or(Path::new("/")).to_path_buf()
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// How many operations have been recorded: a position to cut at.
    pub fn position(&self) -> usize {
        self.st.lock().log.len()
    }

    /// The recorded operations in `range`, for a failing test's message.
    pub fn describe(&self, range: std::ops::Range<usize>) -> String {
        let st = self.st.lock();
        let end = range.end.min(st.log.len());
        st.log[range.start.min(end)..end]
            .iter()
            .enumerate()
            .map(|(i, e)| match e {
                Event::Write { ino, off, data } => {
                    format!("{} write ino {ino} @{off} +{}", range.start + i, data.len())
                }
                other => format!("{} {other:?}", range.start + i)
                    .chars()
                    .take(120)
                    .collect(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Positions just after each sync of a file whose current name contains
    /// `name`: the moments its contents were promised durable.
    pub fn syncs_of(&self, name: &str) -> Vec<usize> {
        let st = self.st.lock();
        let inos: Vec<usize> = st
            .names
            .iter()
            .filter(|(p, _)| p.to_string_lossy().contains(name))
            .map(|(_, &i)| i)
            .collect();
        st.log
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Sync { ino } if inos.contains(ino)))
            .map(|(i, _)| i + 1)
            .collect()
    }

    /// Current contents of a file (what a reader sees now).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.st.lock();
        st.names.get(path).map(|&i| st.files[i].clone())
    }

    /// The state after a power cut just before operation `cut`: everything
    /// durable by then, plus each later unsynced write sector and name
    /// change kept with probability `keep`.
    pub fn crash_state(&self, cut: usize, keep: f64, rng: &mut impl Rng) -> MemStorage {
        let boot = self.st.lock().boot + 1;
        self.state_at(cut, keep, rng, boot)
    }

    /// The state after a `kill -9` just before operation `cut`: the page
    /// cache survives, so every write and name change before it is there,
    /// in the same boot.
    pub fn kill_state(&self, cut: usize) -> MemStorage {
        let boot = self.st.lock().boot;
        let mut rng = rand::rngs::mock::StepRng::new(0, 0);
        self.state_at(cut, 1.0, &mut rng, boot)
    }

    fn state_at(&self, cut: usize, keep: f64, rng: &mut impl Rng, boot: u64) -> MemStorage {
        let st = self.st.lock();
        let cut = cut.min(st.log.len());
        let mut durable = st.base_files.clone();
        let mut pending: Vec<Vec<&Event>> = vec![vec![]; durable.len()];
        let mut names = st.base_names.clone();
        let mut pending_names: BTreeMap<PathBuf, Vec<&Event>> = BTreeMap::new();
        for ev in &st.log[..cut] {
            match ev {
                Event::Write { ino, .. } | Event::Zero { ino, .. } => pending[*ino].push(ev),
                Event::Sync { ino } => {
                    for p in std::mem::take(&mut pending[*ino]) {
                        apply(&mut durable[*ino], p, None);
                    }
                }
                Event::SetLen { ino, len } => {
                    for p in std::mem::take(&mut pending[*ino]) {
                        apply(&mut durable[*ino], p, None);
                    }
                    durable[*ino].resize(*len as usize, 0);
                }
                Event::Born { ino, data } => {
                    if durable.len() <= *ino {
                        durable.resize(ino + 1, vec![]);
                        pending.resize(ino + 1, vec![]);
                    }
                    durable[*ino] = data.to_vec();
                }
                Event::Link { path, .. } | Event::Unlink { path } => {
                    pending_names.entry(parent(path)).or_default().push(ev)
                }
                Event::SyncDir { dir } => {
                    for e in pending_names.remove(dir).unwrap_or_default() {
                        rename(&mut names, e);
                    }
                }
            }
        }
        for (ino, evs) in pending.iter().enumerate() {
            for ev in evs {
                apply(&mut durable[ino], ev, Some((keep, &mut *rng)));
            }
        }
        for evs in pending_names.values() {
            for e in evs {
                if rng.gen_bool(keep) {
                    rename(&mut names, e);
                }
            }
        }
        let dirs = st.dirs.clone();
        MemStorage {
            st: Arc::new(Mutex::new(State {
                names: names.clone(),
                dirs,
                files: durable.clone(),
                base_names: names,
                base_files: durable,
                log: vec![],
                boot,
            })),
        }
    }

    fn record(st: &mut State, ev: Event) {
        st.log.push(ev);
    }
}

/// Applies a write or zeroing to `file`; with `subset`, each 512-byte
/// sector of it lands only with the given probability.
fn apply(file: &mut Vec<u8>, ev: &Event, mut subset: Option<(f64, &mut dyn rand::RngCore)>) {
    let (off, len) = match ev {
        Event::Write { off, data, .. } => (*off, data.len() as u64),
        Event::Zero { off, len, .. } => (*off, *len),
        _ => return,
    };
    let mut s = off;
    while s < off + len {
        let e = ((s / SECTOR + 1) * SECTOR).min(off + len);
        let lands = match subset.as_mut() {
            Some((p, rng)) => rng.gen_bool(*p),
            None => true,
        };
        if lands {
            if file.len() < e as usize {
                file.resize(e as usize, 0);
            }
            let dst = &mut file[s as usize..e as usize];
            match ev {
                Event::Write { data, .. } => {
                    dst.copy_from_slice(&data[(s - off) as usize..(e - off) as usize])
                }
                _ => dst.fill(0),
            }
        }
        s = e;
    }
}

fn rename(names: &mut BTreeMap<PathBuf, usize>, ev: &Event) {
    match ev {
        Event::Link { path, ino } => {
            names.insert(path.clone(), *ino);
        }
        Event::Unlink { path } => {
            names.remove(path);
        }
        _ => {}
    }
}

fn not_found() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

impl Storage for MemStorage {
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn BlockFile>> {
        let mut st = self.st.lock();
        if !st.dirs.contains(&parent(path)) {
            return Err(not_found());
        }
        let ino = match (st.names.get(path).copied(), how) {
            (Some(i), Open::Empty | Open::EmptyLocked) => {
                st.files[i].clear();
                Self::record(&mut st, Event::SetLen { ino: i, len: 0 });
                i
            }
            (Some(i), _) => i,
            (None, Open::Existing | Open::ExistingSole | Open::ExistingIno(_)) => {
                return Err(not_found())
            }
            (None, _) => {
                let i = st.files.len();
                st.files.push(vec![]);
                st.base_files.push(vec![]);
                st.names.insert(path.to_path_buf(), i);
                Self::record(
                    &mut st,
                    Event::Link {
                        path: path.to_path_buf(),
                        ino: i,
                    },
                );
                i
            }
        };
        Ok(Arc::new(MemFile {
            st: self.st.clone(),
            ino,
        }))
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
        let st = self.st.lock();
        match st.names.get(path) {
            Some(&i) if st.files[i].len() as u64 > limit => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "larger than its limit",
            )),
            Some(&i) => Ok(Some(st.files[i].clone())),
            None => Ok(None),
        }
    }

    fn rename_into_place(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut st = self.st.lock();
        if !st.dirs.contains(&parent(path)) {
            return Err(not_found());
        }
        let i = st.files.len();
        st.files.push(data.to_vec());
        st.base_files.push(vec![]);
        st.names.insert(path.to_path_buf(), i);
        let data: Arc<[u8]> = data.into();
        Self::record(&mut st, Event::Born { ino: i, data });
        Self::record(
            &mut st,
            Event::Link {
                path: path.to_path_buf(),
                ino: i,
            },
        );
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.st.lock();
        if !st.dirs.contains(dir) {
            return Err(not_found());
        }
        Self::record(
            &mut st,
            Event::SyncDir {
                dir: dir.to_path_buf(),
            },
        );
        Ok(())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.st.lock();
        for a in dir.ancestors() {
            st.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.st.lock();
        if st.names.remove(path).is_some() {
            Self::record(
                &mut st,
                Event::Unlink {
                    path: path.to_path_buf(),
                },
            );
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let st = self.st.lock();
        Ok(st.names.contains_key(path) || st.dirs.contains(path))
    }

    /// Memory has no links to follow and no descriptors: the name it is.
    fn pin_dir(&self, dir: &Path) -> io::Result<PinnedDir> {
        if !self.st.lock().dirs.contains(dir) {
            return Err(not_found());
        }
        Ok(PinnedDir::by_name(dir))
    }

    fn boot_id(&self) -> String {
        format!("mem-boot-{}", self.st.lock().boot)
    }
}

struct MemFile {
    st: Arc<Mutex<State>>,
    ino: usize,
}

impl BlockFile for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let st = self.st.lock();
        let f = &st.files[self.ino];
        let end = off as usize + buf.len();
        if end > f.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&f[off as usize..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        let f = &mut st.files[self.ino];
        let end = off as usize + buf.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[off as usize..end].copy_from_slice(buf);
        let ev = Event::Write {
            ino: self.ino,
            off,
            data: buf.into(),
        };
        MemStorage::record(&mut st, ev);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.st.lock();
        MemStorage::record(&mut st, Event::Sync { ino: self.ino });
        Ok(())
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        let f = &mut st.files[self.ino];
        let end = ((off + len) as usize).min(f.len());
        if (off as usize) < end {
            f[off as usize..end].fill(0);
        }
        let ev = Event::Zero {
            ino: self.ino,
            off,
            len: end.saturating_sub(off as usize) as u64,
        };
        MemStorage::record(&mut st, ev);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.st.lock().files[self.ino].len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        st.files[self.ino].resize(len as usize, 0);
        MemStorage::record(&mut st, Event::SetLen { ino: self.ino, len });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn synced_data_survives_every_cut_and_unsynced_data_may_not() {
        let s = MemStorage::new();
        let dir = Path::new("/s");
        s.create_dir_all(dir).unwrap();
        let f = s.open(&dir.join("d"), Open::Create).unwrap();
        s.sync_dir(dir).unwrap();
        f.write_all_at(&[1u8; 1024], 0).unwrap();
        f.sync_data().unwrap();
        let synced = s.position();
        f.write_all_at(&[2u8; 1024], 0).unwrap();
        let end = s.position();
        let mut r = rng();
        let lost = s.crash_state(end, 0.0, &mut r);
        assert_eq!(lost.contents(&dir.join("d")).unwrap(), vec![1u8; 1024]);
        let kept = s.crash_state(end, 1.0, &mut r);
        assert_eq!(kept.contents(&dir.join("d")).unwrap(), vec![2u8; 1024]);
        // Half the sectors: a torn write, sector by sector.
        let torn = s
            .crash_state(end, 0.5, &mut r)
            .contents(&dir.join("d"))
            .unwrap();
        assert!(torn.chunks(512).all(|c| c == [1u8; 512] || c == [2u8; 512]));
        let before = s.crash_state(synced, 1.0, &mut r);
        assert_eq!(before.contents(&dir.join("d")).unwrap(), vec![1u8; 1024]);
    }

    #[test]
    fn a_rename_is_durable_only_after_its_directory_is_synced() {
        let s = MemStorage::new();
        let dir = Path::new("/s");
        s.create_dir_all(dir).unwrap();
        s.rename_into_place(&dir.join("m"), b"old").unwrap();
        s.sync_dir(dir).unwrap();
        s.rename_into_place(&dir.join("m"), b"new").unwrap();
        let before_sync = s.position();
        s.sync_dir(dir).unwrap();
        let mut r = rng();
        let c = s.crash_state(before_sync, 0.0, &mut r);
        assert_eq!(c.read(&dir.join("m"), 10).unwrap().unwrap(), b"old");
        let c = s.crash_state(s.position(), 0.0, &mut r);
        assert_eq!(c.read(&dir.join("m"), 10).unwrap().unwrap(), b"new");
    }
}
