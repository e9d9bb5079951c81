//! A pre-copy cycle's footing in QEMU: starting a new cycle from the
//! newest backup whose since-backup bitmaps QEMU still has, deciding
//! whether saved state can resume, and finding or removing the cycle's
//! bitmaps and exports.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::round::{bitmap_name, PREFIX};
use super::state::{DiskState, State, StateDir, STATE_FORMAT};
use super::Options;
use crate::error::{Error, Result};
use crate::qemu::fleece;
use crate::qemu::qmp::{BlockDevice, Qmp};
use crate::repo::locks::WriterLock;
use crate::repo::manifest::DiskManifest;
use crate::repo::Repository;
use crate::vmbackup;

/// A new cycle: from the newest backup whose since-backup bitmaps QEMU
/// has (bitmap 0 a frozen copy of them), else every chunk unknown.
pub(super) fn new_cycle(
    q: &mut Qmp,
    repo: &Repository,
    lock: &WriterLock,
    opts: &Options,
    disks: &[BlockDevice],
    dir: &StateDir,
) -> Result<(State, u64, String)> {
    let cycle = crate::repo::random_hex(3);
    let cs = opts.chunk_size;
    // Its chunks stay while the lock is held only if it exists now.
    let base = vmbackup::find_base(q, repo, &opts.vm, disks, cs).and_then(|(m, b)| {
        lock.require_manifest(&opts.vm, &m.id)
            .map_err(|e| e.to_string())?;
        Ok((m, b))
    });
    let mut actions = vec![];
    for (i, d) in disks.iter().enumerate() {
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": d.node_name, "name": bitmap_name(&cycle, 1), "granularity": cs}}));
        if let Ok((_, since)) = &base {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": d.node_name, "name": bitmap_name(&cycle, 0), "granularity": cs,
                "disabled": true}}));
            actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                "node": d.node_name, "target": bitmap_name(&cycle, 0), "bitmaps": [since[i]]}}));
        }
    }
    q.execute("transaction", Some(json!({ "actions": actions })))
        .map_err(|e| e.context("starting a pre-copy cycle"))?;
    let sizes = node_sizes(q, disks)?;
    let (base_id, start, disks) = match base {
        Ok((m, _)) => {
            let ds = (m.disks.iter().zip(disks))
                .map(|(dm, d)| DiskState {
                    node: d.node_name.clone(),
                    size: dm.size,
                    chunks: dm.chunks.iter().collect(),
                    since: vec![Some(0); dm.chunks.len() as usize],
                })
                .collect();
            let start = format!(
                "new cycle {cycle} from backup {} (its since-backup bitmap)",
                m.id
            );
            (Some(m.id), start, ds)
        }
        Err(why) => {
            let ds = (disks.iter().zip(sizes))
                .map(|(d, size)| {
                    let n = DiskManifest::chunk_count(size, cs) as usize;
                    DiskState {
                        node: d.node_name.clone(),
                        size,
                        chunks: vec![None; n],
                        since: vec![None; n],
                    }
                })
                .collect();
            (
                None,
                format!("new cycle {cycle}, reading every block: {why}"),
                ds,
            )
        }
    };
    let state = State {
        format: STATE_FORMAT,
        vm: opts.vm.clone(),
        repo: repo.id().to_string(),
        cycle,
        base: base_id,
        chunk_size: cs,
        rounds: 0,
        disks,
    };
    dir.save(&state)?;
    Ok((state, 1, start))
}

/// Marks every recorded chunk no longer in the repository unknown (to be
/// read again); how many chunks that concerned.
pub(super) fn forget_missing(repo: &Repository, s: &mut State) -> Result<usize> {
    let mut present = std::collections::HashMap::new();
    let mut gone = 0;
    for d in &mut s.disks {
        for (c, since) in d.chunks.iter().zip(d.since.iter_mut()) {
            let (Some(dg), Some(_)) = (c, *since) else {
                continue;
            };
            let here = match present.get(dg) {
                Some(h) => *h,
                None => *present.entry(*dg).or_insert(repo.has_chunk(dg)?),
            };
            if !here {
                *since = None;
                gone += 1;
            }
        }
    }
    Ok(gone)
}

/// Whether a saved state can go on in this QEMU: same VM, repository,
/// chunk size and disks, and every round bitmap it depends on still
/// there, the newest recording. Returns the newest round, or why not.
pub(super) fn resumable(
    q: &mut Qmp,
    s: &State,
    disks: &[BlockDevice],
    repo: &Repository,
    opts: &Options,
) -> std::result::Result<u64, String> {
    if s.vm != opts.vm || s.repo != repo.id() {
        return Err(format!(
            "the state is of VM {} in repository {}",
            s.vm, s.repo
        ));
    }
    if s.chunk_size != opts.chunk_size {
        return Err(format!("the state's chunk size is {}", s.chunk_size));
    }
    if s.disks.len() != disks.len() {
        return Err(format!(
            "the state has {} disks, the VM {}",
            s.disks.len(),
            disks.len()
        ));
    }
    let all = named_nodes(q).map_err(|e| e.to_string())?;
    let sizes = node_sizes(q, disks).map_err(|e| e.to_string())?;
    let needed = s.needed_rounds();
    let mut newest = None;
    for (i, ((ds, d), size)) in s.disks.iter().zip(disks).zip(sizes).enumerate() {
        if ds.node != d.node_name || ds.size != size {
            return Err(format!(
                "disk {i} is not the one the state describes (QEMU restarted?)"
            ));
        }
        let rounds: BTreeMap<u64, bool> = (bitmaps_of(&all, &d.node_name).into_iter())
            .filter_map(|(name, rec, _)| parse_round(&name, &s.cycle).map(|r| (r, rec)))
            .collect();
        let Some((&hi, &recording)) = rounds.last_key_value() else {
            return Err(format!(
                "disk {i}: QEMU has none of the cycle's dirty bitmaps (restarted?)"
            ));
        };
        if !recording {
            return Err(format!(
                "disk {i}: the newest round bitmap no longer records writes"
            ));
        }
        if let Some((lo, max_since)) = needed {
            if hi < max_since {
                return Err(format!("disk {i}: round bitmap {max_since} is gone"));
            }
            if let Some(r) = (lo..=hi).find(|r| !rounds.contains_key(r)) {
                return Err(format!("disk {i}: round bitmap {r} is gone"));
            }
        }
        if newest.is_some_and(|n| n != hi) {
            return Err("the disks' round bitmaps disagree".into());
        }
        newest = Some(hi);
    }
    newest.ok_or_else(|| "no disk".into())
}

/// `rfs-pc-<cycle>-<n>` → n.
pub(super) fn parse_round(name: &str, cycle: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?
        .strip_prefix(cycle)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

pub(super) fn named_nodes(q: &mut Qmp) -> Result<Vec<Value>> {
    let v = q.execute("query-named-block-nodes", Some(json!({"flat": true})))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// A node's dirty bitmaps: (name, recording, dirty bytes).
pub(super) fn bitmaps_of(nodes: &[Value], node: &str) -> Vec<(String, bool, u64)> {
    (nodes.iter())
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_string(),
                b["recording"].as_bool().unwrap_or(false),
                b["count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

pub(super) fn node_sizes(q: &mut Qmp, disks: &[BlockDevice]) -> Result<Vec<u64>> {
    let nodes = fleece::nodes(q)?;
    disks
        .iter()
        .map(|d| {
            (nodes.iter().find(|n| n.name == d.node_name).map(|n| n.size))
                .ok_or_else(|| Error::not_found(format!("QEMU has no block node {}", d.node_name)))
        })
        .collect()
}

/// Removes every bitmap `drop(name)` selects, on every node.
pub(super) fn remove_bitmaps(q: &mut Qmp, drop: impl Fn(&str) -> bool) -> Result<()> {
    for n in named_nodes(q)? {
        let node = n["node-name"].as_str().unwrap_or("").to_string();
        for (name, _, _) in bitmaps_of(std::slice::from_ref(&n), &node) {
            if drop(&name) {
                fleece::bitmap_op(q, "remove", &node, &name)?;
            }
        }
    }
    Ok(())
}

/// Exports a killed run left (they keep bitmaps busy).
pub(super) fn remove_exports(q: &mut Qmp) -> Result<()> {
    let list = q.execute("query-block-exports", None)?;
    for e in list.as_array().into_iter().flatten() {
        let Some(id) = e["id"].as_str().filter(|i| i.starts_with(PREFIX)) else {
            continue;
        };
        fleece::delete_export(q, id)?;
    }
    Ok(())
}
