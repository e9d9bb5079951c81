//! `verify` over a slow link: a chunk's failure is that chunk's.

use super::*;
use crate::repo::forget::tests::backup_at;
use crate::repo::testing::{Knobs, TestBackend};
const DAY0: u64 = 1_792_281_600;

/// review28 M2: over a slow link every read takes 1.5 s, all answered,
/// and one chunk fails after 1.2 s (its retries ran out: an answer,
/// not silence). The silence rule took that for a store that stopped
/// answering and left the rest unread; now that chunk is the only
/// one not checked.
#[test]
fn one_failing_chunk_over_a_slow_link_leaves_every_other_chunk_checked() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("r");
    Repository::open_or_create(path.to_str().unwrap()).unwrap();
    let knobs = Knobs::default();
    let repo = Repository::open_backend(Box::new(TestBackend::new(&path, knobs.clone()))).unwrap();
    let ms: Vec<_> = (0..8)
        .map(|day| backup_at(&repo, "web", DAY0 + day * 86_400))
        .collect();
    let bad = ms[1].disks[0].chunks.get(1).expect("day chunk").key();
    knobs.unreachable(&bad);
    knobs.before_first(&bad, || std::thread::sleep(Duration::from_millis(1200)));
    knobs.chunk_delay(1500);
    let r = verify(&repo, &["web".into()], None, 2).unwrap();
    assert_eq!(r.stopped, None, "{r:?}");
    assert_eq!(r.checked, r.chunks - 1, "{r:?}");
    let line = r.unreadable.as_deref().expect("the failed chunk is named");
    assert!(line.starts_with("UNREADABLE: 1 chunk(s)"), "{line}");
    assert!(!line.contains("not read"), "{line}");
}
