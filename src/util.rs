//! Small shared helpers: atomic file creation, name validation, time stamps.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};

/// Takes a non-blocking `flock` on `f` (exclusive or shared); false if
/// another open file description holds a conflicting one.
pub fn try_flock(f: &File, exclusive: bool) -> bool {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on an fd we own; no memory is involved.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(f), op | libc::LOCK_NB) == 0 }
}

/// Opens (creating, 0600) the lock file `path` and locks it exclusively:
/// `None` if another process holds it. The lock lasts as long as the file.
pub fn try_lock_file(path: &Path) -> Result<Option<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    Ok(try_flock(&f, true).then_some(f))
}

/// Makes `path` appear with `data` atomically: temp file, fsync, rename,
/// fsync the directory. A crash leaves either the old file or the new one.
/// With `replace == false` an existing file is an `AlreadyExists` error and
/// is left untouched (link(2) instead of rename(2)).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32, replace: bool) -> Result<()> {
    let dir = dir_of(path)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}.{}", std::process::id(), unique()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .ctx(|| format!("create {}", tmp.display()))?;
        f.write_all(data)
            .ctx(|| format!("write {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
        if replace {
            fs::rename(&tmp, path).ctx(|| format!("rename to {}", path.display()))?;
        } else {
            fs::hard_link(&tmp, path).ctx(|| format!("create {}", path.display()))?;
        }
        fsync_dir(dir)
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// The directory `path` is in: `.` for a bare file name (whose parent is
/// the empty path, which no call can open).
fn dir_of(path: &Path) -> Result<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Ok(Path::new(".")),
        Some(p) => Ok(p),
        None => Err(Error::invalid(format!("{} has no parent", path.display()))),
    }
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync directory {}", dir.display()))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// VM names and backup ids become path components in the repository, the
/// staging directory and the mount, so only a safe alphabet is accepted.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {what} {name:?}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with . or -)"
        )))
    }
}

/// The text of a caught panic, for the error or log line that replaces it.
/// `s` for a line of terminal output: control characters (a newline, an
/// escape sequence) and backslashes escaped Rust-style, so a hostile name
/// can neither add a line nor drive the terminal.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return s.into();
    }
    s.chars()
        .flat_map(|c| {
            let plain = !c.is_control() && c != '\\';
            let one = plain.then_some(c).into_iter();
            let escaped = (!plain).then(|| c.escape_default()).into_iter().flatten();
            one.chain(escaped)
        })
        .collect::<String>()
        .into()
}

pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC, second precision.
pub fn rfc3339(unix: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(fmt).unwrap_or_default()
}

/// Caps glibc's malloc arenas at the CPU count, between 2 and 4, unless
/// `MALLOC_ARENA_MAX` says otherwise. By default glibc makes up to 8 per
/// CPU, and each fetch worker, event thread and pool thread that frees
/// chunk-sized buffers keeps them in its own arena: measured on a 1 GiB
/// cold read, the daemon peaked at 85-99 MiB with the default, 37-45 MiB
/// with 2 arenas, at the same CPU time (and 4 KiB warm reads at the same
/// rate). Called before the daemon starts its threads.
pub fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a glibc tunable; arenas already made stay.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, cpus.clamp(2, 4) as libc::c_int);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = cpus;
}

/// Gives memory the allocator holds free back to the system: glibc keeps
/// what a thread frees in that thread's arena (see `prefetch::scheduler`).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own free lists, under its
    // own arena locks; it touches no memory we own.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Alignment of [`AlignedBuf`]: what direct I/O (`O_DIRECT`) asks of
/// memory, offsets and lengths on common devices (4 KiB logical blocks
/// and smaller).
pub const DIRECT_ALIGN: usize = 4096;

/// A byte buffer of fixed capacity whose memory starts on a
/// [`DIRECT_ALIGN`] boundary, so it can be written with direct I/O as it
/// is: a fetched chunk's body is collected into one (see `repo::s3`).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer owns its allocation alone, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads (through Deref).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer for up to `cap` bytes (rounded up to the alignment).
    pub fn with_capacity(cap: usize) -> AlignedBuf {
        let cap = cap.max(1).next_multiple_of(DIRECT_ALIGN);
        let layout = Self::layout(cap);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        AlignedBuf {
            ptr: std::ptr::NonNull::new(p)
                .unwrap_or_else(|| std::alloc::handle_alloc_error(layout)),
            len: 0,
            cap,
        }
    }

    fn layout(cap: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(cap, DIRECT_ALIGN).expect("a buffer size fits isize")
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Appends `src`; false (and nothing appended) if it does not fit.
    #[must_use]
    pub fn extend_from_slice(&mut self, src: &[u8]) -> bool {
        if src.len() > self.cap - self.len {
            return false;
        }
        // SAFETY: `len + src.len() <= cap` bytes are allocated, and `src`
        // is a shared borrow of other memory (`self` is borrowed mutably).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(self.len), src.len())
        };
        self.len += src.len();
        true
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written by extend_from_slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in with_capacity with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} of {} bytes)", self.len, self.cap)
    }
}

/// Human-readable byte counts for CLI output.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses sizes like `1M`, `64K`, `1MiB`, `4194304`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::invalid(format!("invalid size {s:?}")))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(Error::invalid(format!(
                "invalid size unit in {s:?} (a whole number, then nothing or B, K, M, G or T; powers of 1024)"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::invalid(format!("size {s:?} is too large")))
}

/// Rate limit of a log line that may repeat in bursts: the first goes out,
/// then at most one per `every`, which says how many it held back.
pub struct LogLimit {
    every: std::time::Duration,
    /// When the last line went out, and the lines held back since.
    state: parking_lot::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogLimit {
    pub const fn new(every: std::time::Duration) -> LogLimit {
        LogLimit {
            every,
            state: parking_lot::const_mutex((None, 0)),
        }
    }

    /// An occurrence at `now`: `Some(held back since the last line)` if a
    /// line should be logged for it, `None` if it is held back.
    pub fn check(&self, now: std::time::Instant) -> Option<u64> {
        let mut s = self.state.lock();
        match s.0 {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }

    /// [`LogLimit::check`] now, as the end of the line to log: empty, or
    /// how many were held back; `None` if this one is held back.
    pub fn line_suffix(&self) -> Option<String> {
        self.check(std::time::Instant::now())
            .map(|held| match held {
                0 => String::new(),
                n => format!(" ({n} more not logged since the last such line)"),
            })
    }
}

/// A point on a clock that keeps counting while the machine is suspended
/// (`CLOCK_BOOTTIME`), unlike [`std::time::Instant`] (`CLOCK_MONOTONIC`
/// stops): for leases, whose holder must see that its time ran out while
/// the host slept and others took the lease for dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootInstant(std::time::Duration);

impl BootInstant {
    pub fn now() -> BootInstant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec the call writes; CLOCK_BOOTTIME
        // exists on every Linux this runs on (2.6.39+), so it cannot fail.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(r, 0, "clock_gettime(CLOCK_BOOTTIME)");
        BootInstant(std::time::Duration::new(
            ts.tv_sec as u64,
            ts.tv_nsec as u32,
        ))
    }

    pub fn elapsed(&self) -> std::time::Duration {
        BootInstant::now().0.saturating_sub(self.0)
    }

    pub fn checked_sub(&self, d: std::time::Duration) -> Option<BootInstant> {
        self.0.checked_sub(d).map(BootInstant)
    }
}

/// Hosts a [`HostLogLimit`] remembers; lines about hosts beyond them
/// share one [`LogLimit`].
const LOG_LIMIT_HOSTS: usize = 4096;

/// A [`LogLimit`] per client host: each host's first line goes out, then
/// at most one per `every`. A flood from many hosts grows neither memory
/// nor the log without bound: at most `LOG_LIMIT_HOSTS` hosts are
/// remembered (hosts quiet for `every` are forgotten first), and the
/// others share one limit.
pub struct HostLogLimit {
    every: std::time::Duration,
    /// Per host: when its last line went out, and the lines held back since.
    hosts:
        parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u64)>>,
    others: LogLimit,
}

impl HostLogLimit {
    pub fn new(every: std::time::Duration) -> HostLogLimit {
        HostLogLimit {
            every,
            hosts: Default::default(),
            others: LogLimit::new(every),
        }
    }

    /// An occurrence for `host` at `now`: like [`LogLimit::check`].
    pub fn check(&self, host: std::net::IpAddr, now: std::time::Instant) -> Option<u64> {
        let mut hosts = self.hosts.lock();
        let quiet = |last: std::time::Instant| now.saturating_duration_since(last) >= self.every;
        if let Some(h) = hosts.get_mut(&host) {
            if !quiet(h.0) {
                h.1 += 1;
                return None;
            }
            h.0 = now;
            return Some(std::mem::take(&mut h.1));
        }
        if hosts.len() >= LOG_LIMIT_HOSTS {
            hosts.retain(|_, h| !quiet(h.0));
        }
        if hosts.len() >= LOG_LIMIT_HOSTS {
            drop(hosts);
            return self.others.check(now);
        }
        hosts.insert(host, (now, 0));
        Some(0)
    }
}

/// Writes a new file's content at increasing offsets, leaving a hole
/// where a write is all zeros: a restored sparse file (a VM image, a
/// database's preallocated file) takes the room it took before, not its
/// full size (explore6 M5). [`SparseWriter::finish`] sets the length, so
/// trailing zeros are a hole too. Only for a file created empty.
pub struct SparseWriter<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl<'a> SparseWriter<'a> {
    pub fn new(file: &'a std::fs::File) -> SparseWriter<'a> {
        SparseWriter { file, pos: 0 }
    }

    /// Sets the file's length to what was written.
    pub fn finish(self) -> std::io::Result<()> {
        self.file.set_len(self.pos)
    }

    /// Takes `n` zero bytes as a hole, without writing or looking at them:
    /// a hole of a TiB costs nothing (`finish` sets the length).
    pub fn skip(&mut self, n: u64) -> std::io::Result<()> {
        self.pos = (self.pos.checked_add(n))
            .filter(|&p| p <= i64::MAX as u64)
            .ok_or_else(|| std::io::Error::other("a hole past the largest file"))?;
        Ok(())
    }
}

impl std::io::Write for SparseWriter<'_> {
    /// In pieces ending at 64 KiB boundaries of the file: an all-zero
    /// piece is skipped (a hole), even inside a chunk with data.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        const PIECE: u64 = 64 << 10;
        let mut off = 0;
        while off < buf.len() {
            let at = self.pos + off as u64;
            let n = ((PIECE - at % PIECE) as usize).min(buf.len() - off);
            let piece = &buf[off..off + n];
            if piece.iter().any(|&b| b != 0) {
                std::os::unix::fs::FileExt::write_all_at(self.file, piece, at)?;
            }
            off += n;
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_clock_moves_forward_with_time_slept() {
        let t0 = BootInstant::now();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let e = t0.elapsed();
        assert!(e >= std::time::Duration::from_millis(50), "{e:?}");
        assert!(BootInstant::now() > t0);
        assert_eq!(
            t0.checked_sub(std::time::Duration::from_secs(1))
                .map(|b| t0.0 - b.0),
            Some(std::time::Duration::from_secs(1))
        );
    }

    #[test]
    fn a_host_limited_log_line_goes_out_once_per_period_per_host_and_many_hosts_share_one_limit() {
        use std::net::{IpAddr, Ipv4Addr};
        use std::time::{Duration, Instant};
        let l = HostLogLimit::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (a, b) = (IpAddr::from([198, 18, 0, 2]), IpAddr::from([198, 18, 0, 3]));
        assert_eq!(l.check(a, at(0)), Some(0));
        assert_eq!(l.check(a, at(1)), None);
        assert_eq!(l.check(b, at(1)), Some(0), "another host has its own limit");
        assert_eq!(l.check(a, at(59)), None);
        assert_eq!(l.check(a, at(60)), Some(2));
        // A full table of hosts seen now: a new host shares the overflow
        // limit, whose first line goes out, its second not.
        let l = HostLogLimit::new(Duration::from_secs(60));
        for i in 0..LOG_LIMIT_HOSTS as u32 {
            let h = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(l.check(h, at(0)), Some(0));
        }
        let c = IpAddr::from([198, 19, 0, 1]);
        let d = IpAddr::from([198, 19, 0, 2]);
        assert_eq!(l.check(c, at(1)), Some(0));
        assert_eq!(l.check(d, at(2)), None);
        assert_eq!(l.hosts.lock().len(), LOG_LIMIT_HOSTS);
        // Hosts quiet for a period are forgotten to make room.
        assert_eq!(l.check(d, at(60)), Some(0));
        assert!(l.hosts.lock().len() < LOG_LIMIT_HOSTS);
    }

    #[test]
    fn a_limited_log_line_goes_out_first_then_once_per_period_with_the_count_held_back() {
        use std::time::{Duration, Instant};
        let l = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        assert_eq!(l.check(at(0)), Some(0));
        assert_eq!(l.check(at(1)), None);
        assert_eq!(l.check(at(9_999)), None);
        assert_eq!(l.check(at(10_000)), Some(2));
        assert_eq!(l.check(at(12_000)), None);
        assert_eq!(l.check(at(30_000)), Some(1));
        assert_eq!(l.check(at(40_000)), Some(0));
    }

    #[test]
    fn an_aligned_buffer_is_aligned_and_refuses_more_than_its_capacity() {
        let mut b = AlignedBuf::with_capacity(5000);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(b.capacity(), 2 * DIRECT_ALIGN);
        assert!(b.extend_from_slice(&[7; 8000]));
        assert!(!b.extend_from_slice(&[8; 200]), "200 more bytes do not fit");
        assert!(b.extend_from_slice(&[9; 192]));
        assert_eq!(b.len(), 8192);
        assert!(b[..8000].iter().all(|&x| x == 7) && b[8000..].iter().all(|&x| x == 9));
        b.truncate(10);
        assert_eq!(&b[..], &[7; 10]);
    }

    #[test]
    fn names_that_escape_a_directory_are_rejected() {
        for bad in ["..", ".", "a/b", "", "a\0b", "-x", ".hidden", "a b"] {
            assert!(validate_name("VM name", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["tiny", "web-01", "db_2.prod"] {
            validate_name("VM name", good).unwrap();
        }
    }

    #[test]
    fn atomic_write_without_replace_keeps_existing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.json");
        write_atomic(&p, b"one", 0o644, false).unwrap();
        let e = write_atomic(&p, b"two", 0o644, false).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"three", 0o644, true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "temp file left behind"
        );
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        let e = parse_size("2P").unwrap_err().to_string();
        assert!(e.contains("B, K, M, G or T"), "{e}");
    }
}

/// `/proc/self/mountinfo`, read by the daemon (is a mount point free?) and
/// by relocation (is a target inside a recoverfs mount?).
pub mod mountinfo {
    use std::path::{Path, PathBuf};

    /// The source recoverfs's FUSE mounts show (`FSName`). Their type is
    /// `fuse`, or `fuse.recoverfs` where the subtype is kept (fusermount3
    /// drops it): the source is what tells them.
    pub const RECOVERFS_SOURCE: &str = "recoverfs";

    /// One mount: where, its type, its source and the filesystem's own
    /// (super block) options, and its `st_dev` (major, minor; for FUSE the
    /// minor is the connection's number, /sys/fs/fuse/connections/N).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Mount {
        pub point: PathBuf,
        pub dev: Option<(u32, u32)>,
        pub fs_type: String,
        pub source: String,
        pub super_options: String,
    }

    impl Mount {
        pub fn is_recoverfs(&self) -> bool {
            self.fs_type.starts_with("fuse") && self.source == RECOVERFS_SOURCE
        }

        /// An NFS mount whose POSIX (and so OFD) locks stay on this host
        /// (`nolock`, shown as `local_lock=all`, or `local_lock=posix`):
        /// its locks do not keep another host's process out.
        pub fn locks_stay_local(&self) -> bool {
            self.fs_type.starts_with("nfs")
                && self
                    .super_options
                    .split(',')
                    .any(|o| matches!(o, "nolock" | "local_lock=all" | "local_lock=posix"))
        }
    }

    /// Every mount in `text` (the format of `/proc/self/mountinfo`), in
    /// order: a later one at the same point is the one a lookup reaches.
    pub fn parse(text: &str) -> Vec<Mount> {
        text.lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let point = unescape(left.split(' ').nth(4)?);
                let dev = left.split(' ').nth(2).and_then(|d| {
                    let (major, minor) = d.split_once(':')?;
                    Some((major.parse().ok()?, minor.parse().ok()?))
                });
                let mut r = right.split(' ');
                let fs_type = r.next()?.to_string();
                let source = r.next().map(unescape)?;
                let super_options = r.next().unwrap_or_default().to_string();
                Some(Mount {
                    point,
                    dev,
                    fs_type,
                    source: source.to_string_lossy().into_owned(),
                    super_options,
                })
            })
            .collect()
    }

    /// This process's mounts; none if they cannot be read.
    pub fn current() -> Vec<Mount> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| parse(&t))
            .unwrap_or_default()
    }

    /// The mount a lookup of `path` (absolute, canonical as far as it
    /// exists) reaches: the longest mount point above it, the last
    /// listed of those at that point.
    pub fn holding<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
        mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| path.starts_with(&m.point))
            .max_by_key(|(i, m)| (m.point.components().count(), *i))
            .map(|(_, m)| m)
    }

    /// The last mount at `point`, if any.
    pub fn at<'a>(mounts: &'a [Mount], point: &Path) -> Option<&'a Mount> {
        mounts.iter().rev().find(|m| m.point == point)
    }

    /// A mountinfo field, its `\ooo` escapes (space, tab, newline,
    /// backslash) decoded.
    fn unescape(f: &str) -> PathBuf {
        use std::os::unix::ffi::OsStringExt;
        let b = f.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let oct = b
                .get(i + 1..i + 4)
                .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
            match (b[i], oct) {
                (b'\\', Some(o)) => {
                    out.push(o.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                    i += 4;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        PathBuf::from(std::ffi::OsString::from_vec(out))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn mounts_are_read_with_escapes_and_recoverfs_is_told_by_its_source() {
            let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:44 / /tmp/mnt\\040a rw,nosuid shared:20 - fuse recoverfs rw,user_id=0
41 22 0:45 / /srv/other rw,relatime master:2 - fuse.sshfs host:/ rw
42 22 0:46 / /srv/both rw - tmpfs tmpfs rw
43 42 0:47 / /srv/both rw - fuse.recoverfs recoverfs rw
";
            let m = parse(info);
            assert_eq!(m.len(), 5);
            let a = at(&m, Path::new("/tmp/mnt a")).unwrap();
            assert!(a.is_recoverfs(), "{a:?}");
            assert!(!at(&m, Path::new("/srv/other")).unwrap().is_recoverfs());
            // Stacked: the last mount is the one a lookup reaches.
            assert!(at(&m, Path::new("/srv/both")).unwrap().is_recoverfs());
            assert_eq!(at(&m, Path::new("/srv/both")).unwrap().dev, Some((0, 47)));
            assert_eq!(at(&m, Path::new("/srv")), None);
        }

        #[test]
        fn the_mount_holding_a_path_is_the_deepest_and_nfs_nolock_keeps_locks_local() {
            let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:50 / /srv/nfs rw,relatime - nfs 198.18.0.2:/export rw,vers=3,hard,nolock,proto=tcp,local_lock=all,addr=198.18.0.2
31 22 0:51 / /srv/nfs4 rw,relatime - nfs4 198.18.0.3:/ rw,vers=4.2,hard,proto=tcp,local_lock=none,addr=198.18.0.3
32 22 0:52 / /srv/posix rw - nfs 198.18.0.2:/p rw,vers=3,local_lock=posix
";
            let m = parse(info);
            let h = |p: &str| holding(&m, Path::new(p)).unwrap();
            assert_eq!(h("/srv/nfs/vm/disk0.raw").point, Path::new("/srv/nfs"));
            assert!(h("/srv/nfs/vm").locks_stay_local());
            assert!(h("/srv/posix/vm").locks_stay_local());
            assert!(!h("/srv/nfs4/vm").locks_stay_local());
            assert_eq!(h("/srv/nfsx").point, Path::new("/"));
            assert!(!h("/srv/nfsx").locks_stay_local());
        }
    }
}
