//! Prefetches against guest I/O: an on-demand read waits for one fetch,
//! not the prefetch queue; a guest read or a full-block write of a queued
//! block promotes it; closing a volume ends its queued prefetches.

use super::tests::fixture;
use super::*;
use crate::prefetch::Class;
use std::time::Instant;

const BS: usize = 65536;

const FETCH_MS: u64 = 40;

/// Queues a profile prefetch of every non-zero block below `n`; returns
/// how many were queued.
fn heavy_prefetch(vol: &Arc<Volume>, n: u64) -> usize {
    (0..n)
        .filter(|&b| vol.prefetch_block(b, Class::Profile))
        .count()
}

#[test]
fn an_on_demand_read_during_heavy_prefetch_waits_one_fetch_not_the_queue() {
    let f = fixture(400, 6);
    f.knobs.chunk_delay(FETCH_MS);
    let queued = heavy_prefetch(&f.vol, 300);
    // 4 workers, 3 of them for background: draining takes seconds.
    assert!(queued > 200);
    let b = 351u64;
    let t = Instant::now();
    let got = f.vol.read(b * BS as u64, 4096).unwrap();
    let took = t.elapsed();
    assert_eq!(got, f.data[b as usize * BS..b as usize * BS + 4096]);
    assert!(
        took < Duration::from_millis(3 * FETCH_MS),
        "on-demand read took {took:?} with {FETCH_MS} ms fetches"
    );
    assert!(
        f.vol.sched.queued(Class::Profile) > 100,
        "the prefetch was still running"
    );
}

#[test]
fn a_guest_read_of_a_block_queued_for_prefetch_promotes_it() {
    let f = fixture(300, 7);
    f.knobs.chunk_delay(FETCH_MS);
    let queued = heavy_prefetch(&f.vol, 300) as u64;
    assert!(queued > 200);
    let b = 298u64; // at the back of the queue
    let t = Instant::now();
    f.vol.read(b * BS as u64, 10).unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(3 * FETCH_MS),
        "read of a queued block took {took:?}"
    );
    f.vol.quiesce(Duration::from_secs(30));
    assert_eq!(
        f.vol.status().fetched_blocks,
        queued,
        "the promoted block was fetched once, not again"
    );
}

#[test]
fn closing_a_volume_ends_queued_prefetches_without_fetching_them() {
    let f = fixture(300, 8);
    f.knobs.chunk_delay(FETCH_MS);
    let queued = heavy_prefetch(&f.vol, 300) as u64;
    f.vol.close();
    f.vol.quiesce(Duration::from_secs(30));
    let st = f.vol.status();
    assert_eq!(st.fetches_in_flight, 0);
    // Only the fetches already running when it closed (3 background workers).
    assert!(
        st.fetched_blocks <= 3,
        "{} of {queued} fetched",
        st.fetched_blocks
    );
}

#[test]
fn a_full_block_write_promotes_the_prefetch_it_waits_for() {
    let f = fixture(300, 12);
    f.knobs.chunk_delay(FETCH_MS);
    let queued = heavy_prefetch(&f.vol, 300);
    assert!(queued > 200);
    let b = 297u64; // a queued block at the back of the queue
    assert!(f.vol.chunks().has_data(b));
    let t = Instant::now();
    f.vol.write(b * BS as u64, &vec![7u8; BS]).unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(4 * FETCH_MS),
        "a full-block write behind a queued prefetch took {took:?} ({FETCH_MS} ms fetches)"
    );
    assert_eq!(f.vol.read(b * BS as u64, BS).unwrap(), vec![7u8; BS]);
}
