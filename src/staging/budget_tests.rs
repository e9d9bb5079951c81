//! The staging budget's limits, filesystem samples and refusals.

use super::*;

use crate::testutil::Tmpfs;

/// A kept session whose data file holds `bytes`.
fn kept_session(root: &Path, bytes: usize) {
    let dir = root.join("sessions/vm/b1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk0.data"), vec![1u8; bytes]).unwrap();
}

#[test]
fn a_staging_max_above_the_filesystem_is_lowered_to_what_it_holds_even_without_a_reserve() {
    const MIB: u64 = 1 << 20;
    let fs = Tmpfs::new("8m");
    kept_session(&fs.path, 7 << 20);
    let b = Budget::new(&fs.path);
    b.set_limits(20 * MIB, 0);
    let st = b.status();
    assert_eq!(st.used, 7 * MIB, "{st:?}");
    // Our 7 MiB and the 1 MiB still free.
    assert_eq!(st.limit, Some(8 * MIB), "{st:?}");
    assert!(st.pressure > 0.85, "{st:?}");
    assert_eq!(b.room(), Some(MIB));
    // A limit the filesystem can hold stays as given.
    b.set_limits(2 * MIB, 0);
    assert_eq!(b.limit(), Some(2 * MIB));
}

#[test]
fn fills_in_a_burst_ask_the_filesystem_once_and_count_what_they_wrote_against_its_answer() {
    const MIB: u64 = 1 << 20;
    let fs = Tmpfs::new("8m");
    let b = Budget::new(&fs.path);
    b.set_limits(20 * MIB, 0);
    let before = b.samples.load(Ordering::Relaxed);
    for _ in 0..64 {
        b.reserve(64 << 10).unwrap();
        b.written(64 << 10);
    }
    let asked = b.samples.load(Ordering::Relaxed) - before;
    assert!(asked <= 2, "statvfs {asked} times for 64 fills");
    // The 4 MiB "written" count against the sample: nothing was really
    // written, so the recent answer is 4 MiB below a fresh one.
    let before = b.samples.load(Ordering::Relaxed);
    let (_, recent) = b.space(false).unwrap();
    let resampled = b.samples.load(Ordering::Relaxed) != before;
    let (_, now) = b.space(true).unwrap();
    // (Unless the sample aged out meanwhile, on a loaded machine.)
    assert!(resampled || now - recent == 4 * MIB, "{now} {recent}");
}

#[test]
fn a_reserve_leaving_nothing_of_the_filesystem_and_a_tiny_max_are_refused_naming_the_flag() {
    let fs = Tmpfs::new("8m");
    // Not made yet: its parent's filesystem counts.
    let staging = fs.path.join("staging");
    let e = check_limits(&staging, 0, 10 << 20).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("--staging-reserve 10.0 MiB") && msg.contains("8.0 MiB in all"),
        "{msg}"
    );
    check_limits(&staging, 0, 5 << 20).unwrap();
    let e = check_limits(&staging, 1024, 0).unwrap_err();
    assert!(
        e.to_string().contains("--staging-max 1.0 KiB is too small"),
        "{e}"
    );
    check_limits(&staging, MIN_LIMIT, 0).unwrap();
}

/// A disk with nothing to evict that counts how often it is asked.
struct Barren(AtomicU64);

impl Evictable for Barren {
    fn evict(&self, _want: u64) -> Result<u64> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }
    fn session_dir(&self) -> PathBuf {
        PathBuf::new()
    }
    fn unevictable_bytes(&self) -> u64 {
        0
    }
}

#[test]
fn reads_through_a_full_staging_do_not_scan_for_victims_again_right_after_a_scan_found_none() {
    let fs = Tmpfs::new("8m");
    let b = Budget::new(&fs.path);
    b.set_limits(MIN_LIMIT, 0);
    let disk = Arc::new(Barren(AtomicU64::new(0)));
    let weak: Weak<dyn Evictable> = Arc::downgrade(&disk) as _;
    b.attach(weak, fs.path.join("sessions/vm/b1"), 0);
    let asked = || disk.0.load(Ordering::Relaxed);
    let over = 2 * MIN_LIMIT;
    assert_eq!(b.reserve(over).unwrap_err().kind(), ErrorKind::NoSpace);
    assert_eq!(asked(), 1);
    // Within BARREN_TTL: a read's fill is refused without a scan,
    // a write's (or a prefetch's) still scans.
    assert_eq!(
        b.reserve_for_read(over).unwrap_err().kind(),
        ErrorKind::NoSpace
    );
    assert_eq!(asked(), 1);
    assert!(b.reserve(over).is_err());
    assert_eq!(asked(), 2);
    std::thread::sleep(BARREN_TTL + Duration::from_millis(20));
    assert!(b.reserve_for_read(over).is_err());
    assert_eq!(
        asked(),
        3,
        "a read's fill scans again once BARREN_TTL passed"
    );
    // A fill that fits never scans.
    b.reserve_for_read(MIN_LIMIT / 2).unwrap();
    assert_eq!(asked(), 3);
    assert_eq!(b.status().refused_fills, 4);
}

#[test]
fn a_fill_refused_under_a_reserve_names_the_reserve_not_a_staging_max_never_given() {
    let fs = Tmpfs::new("8m");
    let b = Budget::new(&fs.path);
    b.set_limits(0, 7 << 20);
    assert_eq!(b.status().limited_by, Some(Bound::StagingReserve));
    let e = b.reserve(2 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("lower --staging-reserve (7.0 MiB kept free on a filesystem of 8.0 MiB")
            && !msg.contains("--staging-max"),
        "{msg}"
    );
    // No reserve, a max above the filesystem: the filesystem is named.
    b.set_limits(20 << 20, 0);
    assert_eq!(b.status().limited_by, Some(Bound::Filesystem));
    let e = b.reserve(9 << 20).unwrap_err();
    assert!(
        e.to_string().contains("free space on its filesystem"),
        "{e}"
    );
    b.set_limits(MIN_LIMIT, 0);
    assert_eq!(b.status().limited_by, Some(Bound::StagingMax));
    assert_eq!(b.raise_hint(), "raise --staging-max");
}
