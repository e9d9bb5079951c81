//! Per-block counters folded onto at most [`MAX_STRIPES`] stripes (block
//! `b` counts in stripe `b mod stripes`), so a 10 TiB disk does not carry
//! 4 bytes per block for each: 10 million blocks would be 40 MB a counter.
//!
//! The counters only ever answer "did anything happen to this block?"
//! (the write stamps relocation compares, the pins eviction respects), so
//! a stripe shared by blocks only errs one way: a write to another block
//! of the stripe makes the copier copy again, a pin of another block keeps
//! an evictable block a little longer. Never a missed write or pin. A disk
//! of up to `MAX_STRIPES` blocks (64 GiB of 1 MiB blocks) has one counter
//! per block, as before.

use std::sync::atomic::AtomicU32;

/// 256 KiB of counters at most.
pub(super) const MAX_STRIPES: u64 = 1 << 16;

pub(super) struct Stripes {
    counters: Box<[AtomicU32]>,
    mask: u64,
}

impl Stripes {
    pub(super) fn new(nblocks: u64) -> Stripes {
        let n = nblocks.clamp(1, MAX_STRIPES).next_power_of_two();
        Stripes {
            counters: (0..n).map(|_| AtomicU32::new(0)).collect(),
            mask: n - 1,
        }
    }

    /// Block `b`'s counter (shared with every block of its stripe).
    pub(super) fn of(&self, b: u64) -> &AtomicU32 {
        &self.counters[(b & self.mask) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn small_disks_count_per_block_and_large_ones_in_bounded_stripes() {
        let s = Stripes::new(1000);
        s.of(3).fetch_add(1, Ordering::Relaxed);
        assert!((0..1000).all(|b| s.of(b).load(Ordering::Relaxed) == u32::from(b == 3)));
        let big = Stripes::new(10 << 20);
        assert_eq!(big.counters.len() as u64, MAX_STRIPES);
        big.of(5).fetch_add(1, Ordering::Relaxed);
        // Another block of the stripe sees it (errs towards "touched").
        assert_eq!(big.of(5 + MAX_STRIPES).load(Ordering::Relaxed), 1);
        assert_eq!(big.of(6).load(Ordering::Relaxed), 0);
        assert_eq!(Stripes::new(0).counters.len(), 1);
    }

    /// A disk with more blocks than stripes: a write to another block of
    /// a block's stripe makes the relocation copier copy it again (errs
    /// safe); a write to a block of another stripe does not.
    #[test]
    fn on_a_large_disk_a_write_to_a_block_sharing_the_stripe_only_costs_a_recopy() {
        use crate::repo::writer::{run_backup, BackupRequest};
        use crate::staging::{MapKind, PersistentBitmap};
        let d = tempfile::tempdir().unwrap();
        let (repo, _) =
            crate::repo::Repository::open_or_create(d.path().join("r").to_str().unwrap()).unwrap();
        let bs = 65536u64;
        let nblocks = MAX_STRIPES + 100;
        let img = d.path().join("big.raw");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(nblocks * bs).unwrap(); // sparse: the backup reads nothing
        drop(f);
        let req = BackupRequest {
            vm: "vm".into(),
            config: None,
            chunk_size: bs as u32,
            images: vec![img],
            progress: false,
        };
        let m = run_backup(&repo, req).unwrap().manifest;
        let sched = crate::prefetch::Scheduler::new("stripes", 2);
        let storage = crate::staging::io::OsStorage::shared();
        let vol = crate::testutil::open_volumes(
            storage.as_ref(),
            &d.path().join("st"),
            &repo,
            &m,
            &sched,
        )
        .remove(0);
        let copied = PersistentBitmap::open(
            storage.as_ref(),
            &d.path().join("copied"),
            MapKind::Copied,
            bs as u32,
            nblocks,
        )
        .unwrap();
        let stamp = vol.write_stamp(3).unwrap();
        vol.write(4 * bs, &[1u8; 10]).unwrap();
        assert!(vol.mark_copied(&copied, 3, stamp), "another stripe's write");
        let stamp = vol.write_stamp(3).unwrap();
        vol.write((3 + MAX_STRIPES) * bs, &[1u8; 10]).unwrap();
        assert!(
            !vol.mark_copied(&copied, 3, stamp),
            "a write in the stripe: copy again"
        );
        assert!(!copied.test(3));
        let stamp = vol.write_stamp(3).unwrap();
        vol.write(3 * bs, &[2u8; 10]).unwrap();
        assert!(
            !vol.mark_copied(&copied, 3, stamp),
            "a write to the block itself"
        );
    }
}
