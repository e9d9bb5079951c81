//! A miss answered from the fetched bytes: no staging read back, one
//! buffer shared by every waiter, and staging write failures of answered
//! misses counted apart and logged once as a warning.

use super::tests::{fixture, fixture_on};
use super::*;
use crate::staging::io::OsStorage;
use bytes::Bytes;

const BS: usize = 65536;

#[test]
fn a_miss_answers_from_the_fetched_bytes_without_reading_staging_back() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let faults = FaultyStorage::new(OsStorage::shared());
    // 40 blocks: a cold read spans three 1 MiB pieces.
    let f = fixture_on(40, 19, Arc::new(faults.clone()));
    faults.inject(Rule::fail(Op::Read, "disk0.data", libc::EIO));
    let n = 40 * BS;
    assert_eq!(
        f.vol.read(10, n - 20).unwrap(),
        f.data[10..n - 10],
        "cold read"
    );
    // Readers are answered before their blocks are staged: let fills end.
    f.vol.quiesce(Duration::from_secs(30));
    assert_eq!(
        f.vol.status().blocks_staged,
        32,
        "the zero chunks stay holes"
    );
    assert_eq!(f.vol.status().staging_reads, 0, "a waiter read staging");
    // The same blocks now come from staging, which fails.
    assert_eq!(f.vol.read(BS as u64, 10).unwrap_err().errno(), libc::EIO);
    faults.clear();
    assert_eq!(
        f.vol.read(0, n).unwrap(),
        f.data[..n],
        "staging holds the same"
    );
}

#[test]
fn waiters_of_a_one_block_miss_share_the_fetched_bytes_without_a_copy_or_a_staging_read() {
    let f = fixture(8, 23);
    f.knobs.close_gate();
    // Three reads within block 1, all waiting for its one fetch.
    let ranges = [(BS + 10, 100), (BS, BS), (2 * BS - 4096, 4096)];
    let readers: Vec<_> = ranges
        .iter()
        .map(|&(off, len)| {
            let vol = f.vol.clone();
            std::thread::spawn(move || vol.read_bytes(off as u64, len).unwrap())
        })
        .collect();
    // Generous: every reader must have joined the fetch before it ends.
    std::thread::sleep(Duration::from_millis(1000));
    f.knobs.open_gate();
    let got: Vec<Bytes> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    for (&(off, len), b) in ranges.iter().zip(&got) {
        assert_eq!(b[..], f.data[off..off + len]);
    }
    // Readers are answered before their blocks are staged: let fills end.
    f.vol.quiesce(Duration::from_secs(30));
    // Each answer is a slice of one buffer: the fetched chunk itself.
    let base = |i: usize| got[i].as_ptr() as usize - (ranges[i].0 - BS);
    assert!(
        base(0) == base(1) && base(1) == base(2),
        "a waiter got a copy"
    );
    let st = f.vol.status();
    assert_eq!((st.fetched_blocks, st.staging_reads), (1, 0));
    // Now staged: the next read of the block is a staging read.
    assert_eq!(f.vol.read(BS as u64, BS).unwrap(), f.data[BS..2 * BS]);
    assert_eq!(f.vol.status().staging_reads, 1);
}

/// Log lines at WARN and above from every test in this binary (a global
/// subscriber: fetches log on the engine's threads); tests pick out their
/// own by a path unique to them.
fn captured_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct W(&'static Mutex<Vec<u8>>);
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || W(log))
            .finish();
        tracing::subscriber::set_global_default(sub).expect("no other global subscriber");
        log
    })
}

#[test]
fn staging_write_failures_of_answered_misses_are_counted_apart_and_logged_once_as_a_warning() {
    use crate::staging::io::fault::{FaultyStorage, Op, Rule};
    let log = captured_log();
    let faults = FaultyStorage::new(OsStorage::shared());
    let f = fixture_on(16, 57, Arc::new(faults.clone()));
    // Staging is full: every staging write of a fetched block fails.
    faults.inject(Rule::fail(Op::Write, "disk0.data", libc::ENOSPC));
    let blocks = [12u64, 3, 8, 1, 14, 6];
    for b in blocks {
        let off = b * BS as u64 + 7;
        assert_eq!(f.vol.read(off, 100).unwrap(), f.data[off as usize..][..100]);
    }
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    assert_eq!(
        st.fetch_errors, 0,
        "answered reads counted as failed fetches"
    );
    assert!(st.last_fetch_error.is_none());
    assert!(st.staging_write_errors >= blocks.len() as u64);
    assert_eq!(st.blocks_staged, 0);
    // Within 10 s: one warning for them all, and no error line.
    let ours = f.staging.display().to_string();
    let text = String::from_utf8_lossy(&log.lock()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&ours)).collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("No space left"),
        "{}",
        lines[0]
    );
}
