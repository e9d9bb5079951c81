//! What a run decides before it touches a VM: the read order by write
//! rate, a VM or QMP socket given twice refused, and the chunks an extent
//! map leaves to read.

use super::*;
use crate::qemu::nbd::{Extent, STATE_ZERO};

#[test]
fn order_by_rate_puts_the_busiest_first_and_keeps_ties_in_the_given_order() {
    let r = |v: &[(&str, f64)]| -> Vec<usize> {
        order_by_rate(
            &v.iter()
                .map(|(n, x)| (n.to_string(), *x))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(r(&[("a", 10.0), ("b", 300.0), ("c", 20.0)]), [1, 2, 0]);
    assert_eq!(
        r(&[("a", 0.0), ("b", 0.0), ("c", 5.0), ("d", 0.0)]),
        [2, 0, 1, 3]
    );
    assert!(r(&[]).is_empty());
}

#[test]
fn a_vm_name_or_a_qmp_socket_given_twice_is_refused_before_anything_is_touched() {
    let (_d, repo) = repo();
    let spec = |name: &str, qmp: &str| VmSpec {
        name: name.into(),
        qmp: qmp.into(),
        agent: None,
        base: None,
        new_identity: false,
    };
    let mut o = Options {
        vms: vec![spec("a", "/x/1.sock"), spec("a", "/x/2.sock")],
        jobs: 1,
        chunk_size: CHUNK,
        rate_window: Duration::ZERO,
        agent_timeout: Duration::ZERO,
        incremental: false,
        order: ReadOrder::BusiestFirst,
        hook: None,
    };
    let e = backup_vms(&repo, &o).unwrap_err().to_string();
    assert_eq!(e, "VM a is given twice");
    o.vms[1].name = "b".into();
    o.vms[1].qmp = "/x/1.sock".into();
    let e = backup_vms(&repo, &o).unwrap_err().to_string();
    assert_eq!(e, "QMP socket /x/1.sock is given twice");
}

#[test]
fn chunks_with_data_skips_zero_extents_and_reads_holes_that_may_not_be_zero() {
    let e = |offset, len, flags| Extent { offset, len, flags };
    let cs = CHUNK as u64;
    let ext = [
        e(0, cs + 10, 0),
        e(cs + 10, 3 * cs, STATE_ZERO | crate::qemu::nbd::STATE_HOLE),
        e(4 * cs + 10, cs, crate::qemu::nbd::STATE_HOLE),
        e(5 * cs + 10, 2 * cs, STATE_ZERO),
        e(7 * cs + 10, 1, 0),
    ];
    assert_eq!(chunks_with_data(&ext, CHUNK), [0, 1, 4, 5, 7]);
}
