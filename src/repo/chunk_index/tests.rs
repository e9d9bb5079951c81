use rand::{Rng, SeedableRng};

use super::*;

fn digest(n: u64) -> Digest {
    Digest::of(&n.to_le_bytes())
}

/// A random chunk list: zero runs and data runs of random lengths, some
/// digests repeated (dedup), sometimes starting or ending with data.
fn random_list(rng: &mut impl Rng) -> Vec<Option<Digest>> {
    let mut v = vec![];
    let target = rng.gen_range(0..2000);
    while v.len() < target {
        let zeros = if rng.gen_bool(0.3) {
            0
        } else {
            rng.gen_range(1..200)
        };
        v.extend(std::iter::repeat_n(None, zeros));
        for _ in 0..rng.gen_range(0..20) {
            v.push(Some(digest(rng.gen_range(0..50))));
        }
    }
    v
}

/// Every accessor of `idx` agrees with the plain vector `v`.
fn assert_same(idx: &ChunkIndex, v: &[Option<Digest>]) {
    assert_eq!(idx.len(), v.len() as u64);
    for (i, c) in v.iter().enumerate() {
        assert_eq!(idx.get(i as u64), *c, "chunk {i}");
        assert_eq!(idx.has_data(i as u64), c.is_some());
    }
    assert_eq!(idx.get(v.len() as u64), None);
    assert_eq!(idx.get(u64::MAX), None);
    assert_eq!(idx.iter().collect::<Vec<_>>(), v);
    let present: Vec<(u64, Digest)> = (v.iter().enumerate())
        .filter_map(|(i, c)| c.map(|d| (i as u64, d)))
        .collect();
    assert_eq!(idx.iter_present().collect::<Vec<_>>(), present);
    assert_eq!(idx.data_chunks(), present.len() as u64);
    assert_eq!(idx.zero_chunks(), (v.len() - present.len()) as u64);
    let digests: Vec<Digest> = present.iter().map(|p| p.1).collect();
    assert_eq!(idx.digests().copied().collect::<Vec<_>>(), digests);
    for i in 0..=v.len() {
        let next = (i..v.len()).find(|&j| v[j].is_some()).map(|j| j as u64);
        assert_eq!(idx.next_data(i as u64), next, "next data from {i}");
        let end = (i..v.len()).find(|&j| v[j].is_none()).unwrap_or(v.len());
        assert_eq!(idx.data_end(i as u64), end as u64, "data end from {i}");
    }
}

#[test]
fn random_sparse_lists_behave_like_a_plain_vector() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    for _ in 0..300 {
        let v = random_list(&mut rng);
        let idx: ChunkIndex = v.iter().copied().collect();
        assert_same(&idx, &v);
        // Runs are maximal: built another way, the index is equal.
        let rebuilt = ChunkIndex::zeros(v.len() as u64)
            .with_changes(v.iter().enumerate().map(|(i, c)| (i as u64, *c)));
        assert_eq!(rebuilt, idx);
    }
}

#[test]
fn changes_apply_like_assignments_to_a_plain_vector() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for _ in 0..300 {
        let mut v = random_list(&mut rng);
        if v.is_empty() {
            continue;
        }
        let idx: ChunkIndex = v.iter().copied().collect();
        // Unordered changes, repeats included: the last one wins.
        let changes: Vec<(u64, Option<Digest>)> = (0..rng.gen_range(0..100))
            .map(|_| {
                let i = rng.gen_range(0..v.len() as u64);
                let c = rng.gen_bool(0.5).then(|| digest(rng.gen_range(0..80)));
                (i, c)
            })
            .collect();
        for &(i, c) in &changes {
            v[i as usize] = c;
        }
        let changed = idx.with_changes(changes);
        assert_same(&changed, &v);
        assert_eq!(changed, v.iter().copied().collect::<ChunkIndex>());
    }
}

#[test]
fn the_stored_form_round_trips_and_old_null_lists_read_the_same() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    for _ in 0..100 {
        let v = random_list(&mut rng);
        let idx: ChunkIndex = v.iter().copied().collect();
        let json = serde_json::to_string(&idx).unwrap();
        assert_eq!(serde_json::from_str::<ChunkIndex>(&json).unwrap(), idx);
        // Format 1: one null per zero chunk.
        let old = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<ChunkIndex>(&old).unwrap(), idx);
        assert!(json.len() <= old.len());
    }
}

#[test]
fn a_sparse_ten_tib_disk_is_a_few_bytes_stored_and_in_memory() {
    let len = 10u64 << 20; // 10 TiB of 1 MiB chunks
    let idx = ChunkIndex::zeros(len).with_changes(
        [
            (0, digest(1)),
            (1, digest(2)),
            (5 << 20, digest(3)),
            (len - 1, digest(4)),
        ]
        .map(|(i, d)| (i, Some(d))),
    );
    let json = serde_json::to_string(&idx).unwrap();
    let (a, b, c) = (digest(1), digest(2), digest(3));
    let d = digest(4);
    let want = format!(
        "[\"{a}\",\"{b}\",{},\"{c}\",{},\"{d}\"]",
        (5 << 20) - 2,
        len - (5 << 20) - 2
    );
    assert_eq!(json, want);
    let back: ChunkIndex = serde_json::from_str(&json).unwrap();
    assert_eq!(back, idx);
    assert_eq!(back.runs.len(), 3);
    assert_eq!(back.get(5 << 20), Some(c));
    assert_eq!(back.get((5 << 20) + 1), None);
    assert_eq!(back.zero_chunks(), len - 4);
}

#[test]
fn malformed_lists_are_refused_while_read() {
    let bad = |s: &str| {
        serde_json::from_str::<ChunkIndex>(s)
            .unwrap_err()
            .to_string()
    };
    assert!(bad("[0]").contains("cannot be empty"));
    assert!(bad("[-3]").contains("invalid count"));
    assert!(bad("[1.5]").contains("a chunk digest, null, or a count"));
    assert!(bad("[\"abc\"]").contains("invalid chunk digest"));
    let huge = format!("[{}, {}]", MAX_CHUNKS, 1);
    assert!(bad(&huge).contains("chunks a disk may have"));
    let overflow = format!("[{}, {}]", u64::MAX, u64::MAX);
    assert!(bad(&overflow).contains("chunks a disk may have"));
    assert_eq!(
        serde_json::from_str::<ChunkIndex>(&format!("[{MAX_CHUNKS}]"))
            .unwrap()
            .len(),
        MAX_CHUNKS
    );
}

#[test]
#[should_panic(expected = "past the")]
fn a_change_past_the_end_is_a_bug() {
    ChunkIndex::zeros(4).with_changes([(4, None)]);
}
