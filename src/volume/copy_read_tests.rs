//! The relocation copier's reads (`relocation::start_copy_read`): its own
//! fetches are not staged, and a guest miss that meets one shares it.

use super::tests::fixture;
use std::time::{Duration, Instant};

const BS: usize = 65536;
const FETCH_MS: u64 = 40;

#[test]
fn a_copy_read_fetches_the_backup_bytes_without_staging_them() {
    let f = fixture(20, 11);
    let b = 3u64; // every fifth block is a zero chunk: this one has data
    let r = f.vol.start_copy_read(b);
    let bytes = f.vol.finish_copy_read(b, r).unwrap();
    assert!(bytes[..] == f.data[b as usize * BS..][..BS]);
    assert!(
        !f.vol.store.present.test(b),
        "the copier's fetch was staged"
    );
    assert_eq!(f.vol.status().fetched_blocks, 1);
    // The guest's own miss fetches (and stages) it; the read is answered
    // before the staging write ends.
    f.vol.read(b * BS as u64, 100).unwrap();
    f.vol.quiesce(Duration::from_secs(30));
    assert!(f.vol.store.present.test(b));
    assert_eq!(f.vol.status().fetched_blocks, 2);
}

#[test]
fn a_guest_miss_meeting_a_copy_fetch_shares_it_and_the_block_is_staged() {
    let f = fixture(20, 12);
    f.knobs.chunk_delay(FETCH_MS);
    let b = 7u64;
    let r = f.vol.start_copy_read(b);
    // The guest reads the block while the copier's fetch is under way.
    let got = f.vol.read(b * BS as u64 + 10, 4096).unwrap();
    assert!(got[..] == f.data[b as usize * BS + 10..][..4096]);
    let bytes = f.vol.finish_copy_read(b, r).unwrap();
    assert!(bytes[..] == f.data[b as usize * BS..][..BS]);
    // The copier takes the bytes before the fill (staging write, counts)
    // has ended.
    f.vol.quiesce(Duration::from_secs(30));
    assert_eq!(f.vol.status().fetched_blocks, 1, "one fetch for both");
    // Promoted by the guest, the fetch staged the block after all.
    assert!(f.vol.store.present.test(b));
    assert_eq!(
        f.vol.read(b * BS as u64, BS).unwrap(),
        f.data[b as usize * BS..][..BS]
    );
    assert_eq!(f.vol.status().fetched_blocks, 1);
}

#[test]
fn a_copy_read_of_a_changed_block_reads_the_write() {
    let f = fixture(20, 13);
    let b = 8u64;
    f.vol.write(b * BS as u64 + 5, b"guest bytes").unwrap();
    let r = f.vol.start_copy_read(b);
    let bytes = f.vol.finish_copy_read(b, r).unwrap();
    assert_eq!(&bytes[5..16], b"guest bytes");
    assert!(bytes[16..] == f.data[b as usize * BS + 16..][..BS - 16]);
}

#[test]
fn a_guest_miss_goes_ahead_of_a_window_of_copy_fetches() {
    let f = fixture(300, 14);
    f.knobs.chunk_delay(FETCH_MS);
    // Far more copy fetches than the engine runs at once (4, one of them
    // kept for on-demand): draining them takes seconds.
    let reads: Vec<_> = (0..250u64)
        .filter(|b| b % 5 != 0)
        .map(|b| f.vol.start_copy_read(b))
        .collect();
    let b = 297u64;
    let t = Instant::now();
    let got = f.vol.read(b * BS as u64, 4096).unwrap();
    let took = t.elapsed();
    assert!(got[..] == f.data[b as usize * BS..][..4096]);
    assert!(
        took < Duration::from_millis(3 * FETCH_MS),
        "a guest miss waited {took:?} behind the copier's fetches"
    );
    let pending = reads.iter().filter(|r| !r.is_ready()).count();
    assert!(
        pending > 100,
        "the copy fetches were not queued ({pending})"
    );
}
