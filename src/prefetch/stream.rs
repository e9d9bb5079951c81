//! Sequential-reader detection: a reader that scans the disk (a
//! hypervisor's storage migration, a backup agent, `dd`) gets the blocks
//! ahead of it fetched before it asks. The window is what the reader
//! consumes during two fetch latencies, so a slower repository gets a
//! longer window, like Linux readahead sized by bandwidth × delay.
//!
//! **What counts as sequential.** A read continues a stream when it starts
//! at most one block past the stream's head and at most [`BEHIND_BYTES`]
//! behind it (requests of a reader with many in flight arrive slightly out
//! of order; a read further back is another reader). Readahead starts once
//! the stream has passed [`CONFIRM_BLOCKS`] blocks *and read most of what
//! it passed*: a scanner reads every byte of the blocks behind its head,
//! while small random reads that happen to land in neighbouring blocks (a
//! small disk read at random, or many VMs' first touches) read a few KiB
//! of each and must not queue whole-block fetches that compete with every
//! guest's misses for the fetch engine.

use std::ops::Range;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Streams tracked per disk; the least recently used one is replaced.
const STREAMS: usize = 4;
/// Contiguous blocks a stream must cover before readahead starts.
const CONFIRM_BLOCKS: u64 = 2;
/// How far behind a stream's head a read may start and still continue it
/// (64 requests of 128 KiB in flight).
const BEHIND_BYTES: u64 = 8 << 20;
const MIN_WINDOW: u64 = 4;
const MAX_WINDOW: u64 = 128;

#[derive(Debug, Clone)]
struct Stream {
    /// One past the highest block the reader touched.
    head: u64,
    first: u64,
    bytes: u64,
    start: Instant,
    last: Instant,
    /// One past the highest block readahead was issued for.
    issued: u64,
}

#[derive(Default)]
pub struct Detector {
    streams: Mutex<Vec<Stream>>,
}

/// The geometry and latency a decision needs.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub block_size: u64,
    pub nblocks: u64,
    pub fetch_latency: Duration,
}

impl Detector {
    /// Feeds a guest read of blocks `blocks` (`bytes` long); returns blocks
    /// to read ahead, if the read continues a sequential stream.
    pub fn on_read(
        &self,
        blocks: Range<u64>,
        bytes: u64,
        g: Geometry,
        now: Instant,
    ) -> Option<Range<u64>> {
        let mut streams = self.streams.lock();
        // Parallel readers of one stream (queue depth > 1) arrive slightly
        // out of order: anything near the head continues it.
        let behind = (BEHIND_BYTES / g.block_size.max(1)).max(CONFIRM_BLOCKS);
        let near = |s: &Stream| blocks.start <= s.head + 1 && blocks.end + behind >= s.head;
        let Some(s) = streams.iter_mut().find(|s| near(s)) else {
            let fresh = Stream {
                head: blocks.end,
                first: blocks.start,
                bytes,
                start: now,
                last: now,
                issued: blocks.end,
            };
            if streams.len() < STREAMS {
                streams.push(fresh);
            } else if let Some(lru) = streams.iter_mut().min_by_key(|s| s.last) {
                *lru = fresh;
            }
            return None;
        };
        s.head = s.head.max(blocks.end);
        s.bytes += bytes;
        s.last = now;
        if s.head - s.first < CONFIRM_BLOCKS || !dense(s, g.block_size) {
            return None;
        }
        let window = window(s, g, now);
        let from = s.issued.max(s.head);
        let to = (s.head + window).min(g.nblocks);
        if from >= to {
            return None;
        }
        s.issued = to;
        Some(from..to)
    }
}

/// The stream read at least half of the whole blocks it has passed (all
/// but the one at its head): a scan, not scattered small reads.
fn dense(s: &Stream, block_size: u64) -> bool {
    let passed = s.head - s.first - 1;
    2 * s.bytes >= passed * block_size
}

/// Blocks the reader consumes in two fetch latencies, clamped.
fn window(s: &Stream, g: Geometry, now: Instant) -> u64 {
    let secs = (now - s.start).as_secs_f64().max(0.001);
    let rate = s.bytes as f64 / secs;
    let latency = g.fetch_latency.max(Duration::from_millis(1)).as_secs_f64();
    let blocks = (2.0 * rate * latency / g.block_size as f64).ceil() as u64;
    blocks.clamp(MIN_WINDOW, MAX_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn geo(latency_ms: u64) -> Geometry {
        Geometry {
            block_size: MB,
            nblocks: 10_000,
            fetch_latency: Duration::from_millis(latency_ms),
        }
    }

    /// Feeds a reader of 1 MiB requests at `rate_mb` MB/s; returns the
    /// furthest block readahead asked for.
    fn scan(d: &Detector, g: Geometry, rate_mb: u64, reads: u64) -> u64 {
        let t0 = Instant::now();
        let mut furthest = 0;
        for i in 0..reads {
            let now = t0 + Duration::from_micros(i * 1_000_000 / rate_mb);
            if let Some(r) = d.on_read(i..i + 1, MB, g, now) {
                assert!(r.start > i, "readahead starts past the reader");
                furthest = furthest.max(r.end);
            }
        }
        furthest
    }

    #[test]
    fn random_reads_trigger_no_readahead() {
        let d = Detector::default();
        let t = Instant::now();
        for b in [500u64, 20, 7000, 3, 900, 4100, 60, 2500] {
            assert_eq!(d.on_read(b..b + 1, MB, geo(10), t), None);
        }
    }

    #[test]
    fn small_reads_in_neighbouring_blocks_trigger_no_readahead() {
        // 4 KiB first touches of blocks 10, 11, 12, 13: adjacent blocks,
        // but 16 KiB read over 4 MiB passed.
        let d = Detector::default();
        let t = Instant::now();
        for b in 10u64..14 {
            assert_eq!(d.on_read(b..b + 1, 4096, geo(20), t), None, "block {b}");
        }
    }

    #[test]
    fn random_small_reads_of_a_small_disk_trigger_no_readahead() {
        // The fleet benchmark's reader: 4 KiB at random 1 MiB-aligned
        // offsets of a 64-block disk, so many land next to or behind an
        // earlier one.
        let d = Detector::default();
        let g = Geometry {
            nblocks: 64,
            ..geo(20)
        };
        let t = Instant::now();
        let mut x = 12345u64;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = (x >> 33) % 64;
            assert_eq!(d.on_read(b..b + 1, 4096, g, t), None, "block {b}");
        }
    }

    #[test]
    fn a_sequential_reader_of_small_requests_gets_readahead_after_a_block() {
        let d = Detector::default();
        let t = Instant::now();
        let mut ahead = None;
        for i in 0..(MB / 4096 + 1) {
            let off = i * 4096;
            ahead = ahead.or(d.on_read(off / MB..off / MB + 1, 4096, geo(5), t));
        }
        assert_eq!(ahead.clone().map(|r| r.start), Some(2), "{ahead:?}");
    }

    #[test]
    fn a_second_scan_far_behind_the_first_is_followed_too() {
        let d = Detector::default();
        let (t, g) = (Instant::now(), geo(10));
        for b in 100..104u64 {
            d.on_read(b..b + 1, MB, g, t);
        }
        // Another reader starts 40 blocks behind: its own stream.
        assert_eq!(d.on_read(60..61, MB, g, t), None);
        let r = d.on_read(61..62, MB, g, t);
        assert_eq!(r.clone().map(|r| r.start), Some(62), "{r:?}");
    }

    #[test]
    fn a_sequential_reader_gets_blocks_ahead_of_it() {
        let d = Detector::default();
        let ahead = scan(&d, geo(5), 100, 50);
        assert!(ahead >= 50 + MIN_WINDOW, "ahead to {ahead}");
    }

    #[test]
    fn the_window_grows_with_fetch_latency() {
        let fast = scan(&Detector::default(), geo(2), 400, 40) - 40;
        let slow = scan(&Detector::default(), geo(40), 400, 40) - 40;
        assert!(slow > 2 * fast, "window at 40 ms {slow} vs 2 ms {fast}");
        assert!(slow <= MAX_WINDOW);
    }

    #[test]
    fn two_interleaved_scans_are_both_followed() {
        let d = Detector::default();
        let (t, g) = (Instant::now(), geo(10));
        let mut hits = [0, 0];
        for i in 0..20u64 {
            for (k, base) in [0u64, 5000].into_iter().enumerate() {
                if d.on_read(base + i..base + i + 1, MB, g, t).is_some() {
                    hits[k] += 1;
                }
            }
        }
        assert!(hits[0] > 0 && hits[1] > 0, "{hits:?}");
    }
}
