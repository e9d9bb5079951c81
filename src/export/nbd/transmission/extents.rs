//! The disk's extents as a reply wants them: a read's runs of zeros (sent
//! as holes) and data, and one metadata context's block status
//! descriptors, merged and clipped to the reply's bounds. Pure functions
//! of the extents: apart from `execute`, which asks the disk for them.

use crate::disk::{Extent, ExtentFlags};
use crate::export::nbd::proto::*;

/// Longest range the disk is asked about at once (a block status request
/// takes several while they add up to fewer than `MAX_EXTENTS` extents):
/// the work and the reply stay bounded; clients ask again from where the
/// reply stopped.
pub(in crate::export::nbd) const MAX_STATUS_QUERY: u64 = 1 << 30;
/// Most descriptors in one block status chunk.
pub(in crate::export::nbd) const MAX_EXTENTS: usize = 1 << 16;
/// Zero ranges shorter than this are sent as data: a hole chunk per few
/// bytes would cost more than the bytes.
pub(super) const MIN_HOLE: u64 = 4096;

/// A run of a read: zeros (sent as a hole) or data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Segment {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) zero: bool,
}

pub(super) fn push_segment(out: &mut Vec<Segment>, offset: u64, len: u64, zero: bool) {
    match out.last_mut() {
        Some(last) if last.zero == zero => last.len += len,
        _ => out.push(Segment { offset, len, zero }),
    }
}

pub(super) fn allocation_flags(f: ExtentFlags) -> u32 {
    (if f.hole { STATE_HOLE } else { 0 }) | (if f.zero { STATE_ZERO } else { 0 })
}

pub(super) fn changed_flags(f: ExtentFlags) -> u32 {
    if f.changed {
        STATE_CHANGED
    } else {
        0
    }
}

/// One context's descriptors: extents with equal flags merged, clipped to
/// `limit` bytes and `MAX_EXTENTS` entries (one with REQ_ONE).
pub(super) fn descriptors(
    extents: &[Extent],
    limit: u64,
    req_one: bool,
    flags: fn(ExtentFlags) -> u32,
) -> Vec<(u32, u32)> {
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<(u32, u32)> = vec![];
    let mut left = limit;
    for e in extents {
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        let f = flags(e.flags);
        if let Some((len, _)) = out.last_mut().filter(|(_, lf)| *lf == f) {
            *len += n as u32;
        } else if out.len() == max {
            break;
        } else {
            out.push((n as u32, f));
        }
    }
    out
}
