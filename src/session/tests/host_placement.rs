//! Placement for a hypervisor host: its connection limit, placements
//! not served yet, and the hosts `export-points` lists.

use super::*;

/// A hypervisor, by address (nothing connects: placement counts the
/// sessions placed for it).
const HOST: &str = "198.51.100.7";

fn for_host(point: Option<&str>) -> PlaceRequest {
    PlaceRequest {
        host: Some(HOST.into()),
        export_point: point.map(String::from),
        force: false,
    }
}

#[test]
fn a_host_at_its_limit_is_not_given_a_new_point_because_its_own_point_is_full() {
    let r = rig_limited(POINTS, 1);
    backup(&r, "vm1", 31, 4);
    backup(&r, "vm2", 32, 4);
    r.ds.recover_placed("vm1", None, &for_host(Some("a")))
        .unwrap();
    // `a`'s staging has no room for vm2's working set (4 blocks); ssd has.
    let dirs = r.ds.stagings().to_vec();
    let (main, fast) = (&dirs[0], dirs.iter().find(|d| d.root() == ssd(&r)).unwrap());
    main.budget().set_limits(2 * 65536, 0);
    fast.budget().set_limits(64 << 20, 0);
    let e =
        r.ds.recover_placed("vm2", None, &for_host(None))
            .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("--max-connections-per-host 1") && msg.contains("export point a"),
        "{msg}"
    );
    let e =
        r.ds.recover_placed("vm2", None, &for_host(Some("b")))
            .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(r.ds.session("vm2").is_none(), "H now uses two points");
    // Named with --force, past the limit: the decision counts a.
    let forced = PlaceRequest {
        force: true,
        ..for_host(Some("b"))
    };
    let (d, _) = r.ds.place("vm2", &forced, None, 4 * 65536).unwrap();
    assert_eq!((d.chosen.as_str(), d.host_connections), ("b", 1), "{d:?}");
    let a = d.candidates.iter().find(|c| c.figures.name == "a").unwrap();
    assert!(!a.eligible && a.figures.host_connected, "{d:?}");
    assert!(
        a.figures
            .unavailable
            .as_deref()
            .unwrap()
            .contains("free of its limit"),
        "{d:?}"
    );
}

#[test]
fn a_placement_not_yet_served_counts_for_the_next() {
    // One point per host: vm2 joins vm1's point; four: it spreads, as it
    // would once vm1 is served.
    for (max_conn, same) in [(1, true), (4, false)] {
        let r = rig_limited(POINTS, max_conn);
        let (d1, _held) = r.ds.place("vm1", &for_host(None), None, 0).unwrap();
        let (d2, _) = r.ds.place("vm2", &for_host(None), None, 0).unwrap();
        assert_eq!(d1.chosen == d2.chosen, same, "{max_conn}: {d1:?} {d2:?}");
        assert_eq!(d2.host_connections, 1, "{d2:?}");
    }
    // Its expected working set takes staging room until it is served.
    let r = rig_limited(POINTS, 4);
    let dirs = r.ds.stagings().to_vec();
    dirs[0].budget().set_limits(3 * 65536, 0);
    let (d1, held) =
        r.ds.place("vm1", &PlaceRequest::default(), None, 2 * 65536)
            .unwrap();
    assert_eq!(d1.chosen, "a");
    let (d2, _) =
        r.ds.place("vm2", &PlaceRequest::default(), None, 2 * 65536)
            .unwrap();
    assert_ne!(d2.chosen, "a", "{d2:?}");
    drop(held);
    let (d3, _) =
        r.ds.place("vm3", &PlaceRequest::default(), None, 2 * 65536)
            .unwrap();
    assert_eq!(d3.chosen, "a", "a dropped reservation still counts: {d3:?}");
}

#[test]
fn a_placement_is_reserved_until_its_session_is_served_or_its_recovery_fails() {
    let r = rig_limited(POINTS, 4);
    let (b1, _) = backup(&r, "vm", 33, 4);
    let host = resolve_host(HOST).unwrap();
    let placed_for_host = |r: &Rig| -> Vec<(String, usize)> {
        r.ds.point_figures(Some(host))
            .into_iter()
            .filter(|f| f.host_connected || f.sessions > 0)
            .map(|f| (f.name, f.sessions))
            .collect()
    };
    // The manifest goes just as the session pins it: the recovery fails
    // after it was placed.
    let plain = crate::repo::backend::LocalDir::new(&r.dir.path().join("repo"));
    let key = format!("backups/vm/{b1}.json");
    r.knobs.before_first("pins/vm/", move || {
        use crate::repo::backend::Backend;
        plain.delete(&key).unwrap()
    });
    r.ds.recover_placed("vm", None, &for_host(None))
        .unwrap_err();
    assert_eq!(
        placed_for_host(&r),
        vec![],
        "a failed recovery still counts"
    );
    backup(&r, "vm", 34, 4);
    let info = r.ds.recover_placed("vm", None, &for_host(None)).unwrap();
    assert_eq!(
        placed_for_host(&r),
        vec![(info.export_point, 1)],
        "counted once, as its session"
    );
}

#[test]
fn export_points_lists_the_same_hosts_on_each_point_as_placement_counts_connected() {
    let r = rig_limited(POINTS, 4);
    backup(&r, "vm1", 35, 4);
    // Placed for HOST at a: nothing of HOST connects yet.
    r.ds.recover_placed("vm1", None, &for_host(Some("a")))
        .unwrap();
    // Another host with a live connection at b and no session.
    let other = resolve_host("198.51.100.8").unwrap();
    let _conn = r.ds.point("b").unwrap().connected(other);
    let host = resolve_host(HOST).unwrap();
    let status = r.ds.point_status();
    for ip in [host, other] {
        let placing = r.ds.point_figures(Some(ip));
        for (s, f) in status.iter().zip(&placing) {
            let listed = s.hosts.iter().any(|h| h.host == ip);
            assert_eq!(
                listed, f.host_connected,
                "point {}: export-points lists {ip}: {listed}, placement counts it connected: {}",
                s.name, f.host_connected
            );
        }
    }
    let a = status.iter().find(|s| s.name == "a").unwrap();
    assert!(a.hosts.iter().any(|h| h.host == host), "{a:?}");
}
