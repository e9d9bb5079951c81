use super::*;

fn point(name: &str) -> PointFigures {
    PointFigures {
        name: name.into(),
        ..Default::default()
    }
}

fn busy(name: &str, queued: u64) -> PointFigures {
    let mut p = point(name);
    p.queue.queued_bytes = queued;
    p.queue.drain_bytes_per_s = 100e6;
    p.queue.service_ms = 1.0;
    p.queue.completed_requests = 100;
    p
}

fn auto(points: Vec<PointFigures>, host: Option<&str>, max: usize) -> Decision {
    decide(
        points,
        &Want::Auto,
        host.map(String::from),
        max,
        &Weights::default(),
    )
    .unwrap()
}

#[test]
fn export_point_specs_parse_and_bad_ones_say_why() {
    let p = PointSpec::parse("ds1,listen=198.18.0.1,port=2050,max-inflight=8").unwrap();
    assert_eq!(p.name, "ds1");
    assert_eq!(p.nfs_addr().unwrap().to_string(), "198.18.0.1:2050");
    assert_eq!(p.nbd_addr().unwrap().port(), NBD_PORT);
    assert_eq!(p.max_inflight, 8);
    assert_eq!(p.staging, None);
    let p = PointSpec::parse("ds2,listen=198.18.0.2,staging=/srv/ssd2").unwrap();
    assert_eq!(
        p.staging.as_deref(),
        Some(std::path::Path::new("/srv/ssd2"))
    );
    for (bad, why) in [
        ("ds1", "listen=ADDR is required"),
        ("ds1,listen=nowhere", "not an IP address"),
        ("ds1,listen=::1,colour=red", "unknown key"),
        ("../x,listen=::1", "export point name"),
        ("ds1,listen=::1,max-inflight=1", "must be a number"),
        ("ds1,listen=::1,staging=srv/x", "must be an absolute path"),
        ("ds1,listen=::1,staging=", "must be an absolute path"),
        (
            "ds1,listen=::1,port=24049,nbd-port=24049",
            "taken by this point's own NFS port",
        ),
        ("ds1,listen=::1,nbd-port=111", "portmapper"),
    ] {
        let e = PointSpec::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn two_export_points_on_one_address_or_name_are_refused() {
    let a = PointSpec::parse("a,listen=198.18.0.1").unwrap();
    let b = PointSpec::parse("b,listen=198.18.0.1,port=2050").unwrap();
    let e = check_points(&[a.clone(), b]).unwrap_err().to_string();
    assert!(e.contains("both listen on 198.18.0.1"), "{e}");
    let e = check_points(&[a.clone(), a]).unwrap_err().to_string();
    assert!(e.contains("given twice"), "{e}");
}

#[test]
fn a_host_with_headroom_goes_to_a_point_it_does_not_use_yet_the_least_loaded() {
    let mut a = busy("a", 0);
    a.host_connected = true;
    let d = auto(
        vec![a, busy("b", 500_000_000), busy("c", 1_000_000)],
        Some("h"),
        2,
    );
    assert_eq!((d.chosen.as_str(), d.rule), ("c", Rule::ConnectionHeadroom));
    assert!(
        !d.candidates[0].eligible,
        "a point the host uses is not a candidate"
    );
}

#[test]
fn a_host_at_its_limit_stays_on_its_points_and_takes_the_less_loaded() {
    let mut a = busy("a", 500_000_000);
    let mut b = busy("b", 1_000_000);
    a.host_connected = true;
    b.host_connected = true;
    let idle = point("c"); // least loaded, but a third connection
    let d = auto(vec![a, b, idle], Some("h"), 2);
    assert_eq!((d.chosen.as_str(), d.rule), ("b", Rule::LeastLatency));
    let qa = &d.candidates[0].prediction;
    assert!(
        qa.queue_ms > 1000.0,
        "500 MB queued at 100 MB/s is 5 s: {qa:?}"
    );
}

#[test]
fn a_relocation_nearly_done_predicts_less_than_one_just_started() {
    let total = 64u64 << 30;
    let mut a = point("a");
    a.relocation_remaining_bytes = total / 20; // 95 % done
    let mut b = point("b");
    b.relocation_remaining_bytes = total * 9 / 10; // 10 % done
    let d = auto(vec![b, a], None, 4);
    assert_eq!(d.chosen, "a");
    assert!(d.candidates[0].prediction.future_ms > d.candidates[1].prediction.future_ms);
}

#[test]
fn unstaged_data_on_a_slow_repository_counts_against_a_point() {
    let mut cold = point("cold");
    cold.unstaged_bytes = 8 << 30;
    cold.repo_fetch_ms = 50.0;
    let mut warm = point("warm");
    warm.repo_fetch_ms = 50.0;
    let d = auto(vec![cold, warm], None, 4);
    assert_eq!(d.chosen, "warm");
    assert!(d.candidates[0].prediction.repository_ms > 10.0);
    assert_eq!(d.candidates[1].prediction.repository_ms, 0.0);
}

#[test]
fn ties_go_to_the_smaller_async_share() {
    let mut a = point("a");
    let mut b = point("b");
    // Same prediction, different history of async work.
    a.queue.async_share = 0.0;
    b.queue.async_share = 0.0;
    a.queue.completed_requests = 0;
    let d = auto(vec![a.clone(), b.clone()], None, 4);
    assert_eq!(d.chosen, "a", "names break exact ties");
    a.queue.async_share = 0.001;
    let d = decide(
        vec![a, b],
        &Want::Auto,
        None,
        4,
        &Weights {
            async_share: 0.0, // the share costs nothing: a pure tie
            ..Weights::default()
        },
    )
    .unwrap();
    assert_eq!((d.chosen.as_str(), d.rule), ("b", Rule::TieAsyncShare));
}

#[test]
fn a_forced_point_needing_a_connection_over_the_limit_is_refused_without_force() {
    let mut a = point("a");
    a.host_connected = true;
    let pts = vec![a, point("b")];
    let want = |force| Want::Named {
        name: "b".into(),
        force,
    };
    let w = Weights::default();
    let e = decide(pts.clone(), &want(false), Some("h".into()), 1, &w)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--max-connections-per-host 1") && e.contains("--force"),
        "{e}"
    );
    let d = decide(pts.clone(), &want(true), Some("h".into()), 1, &w).unwrap();
    assert_eq!((d.chosen.as_str(), d.rule), ("b", Rule::Forced));
    let e = decide(
        pts,
        &Want::Named {
            name: "zz".into(),
            force: false,
        },
        None,
        1,
        &w,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no export point \"zz\"") && e.contains("a, b"),
        "{e}"
    );
}

/// Figures `export-points` showed in the placement benchmark: `a` with a
/// relocation and a reader at queue depth 32 missing to a 20 ms
/// repository, `b` with only a relocation.
fn sync_queue_of_slow_misses(name: &str) -> PointFigures {
    let mut p = point(name);
    p.queue.queued_bytes = 160 << 10;
    p.queue.inflight_bytes = 32 << 10;
    p.queue.drain_bytes_per_s = 2.7e6;
    p.queue.service_ms = 20.0;
    p.queue.async_share = 0.47;
    p.queue.completed_requests = 500;
    p.relocation_remaining_bytes = 2 << 30;
    p
}

fn only_a_relocation(name: &str) -> PointFigures {
    let mut p = point(name);
    p.queue.inflight_bytes = 64 << 10;
    p.queue.drain_bytes_per_s = 37e6;
    p.queue.service_ms = 1.4;
    p.queue.async_share = 1.0;
    p.queue.completed_requests = 5000;
    p.relocation_remaining_bytes = 3 << 29;
    p
}

#[test]
fn a_point_busy_only_with_a_relocation_predicts_less_than_one_queueing_slow_guest_misses() {
    let d = auto(
        vec![sync_queue_of_slow_misses("a"), only_a_relocation("b")],
        None,
        4,
    );
    assert_eq!(d.chosen, "b", "{d:#?}");
    let (a, b) = (&d.candidates[0].prediction, &d.candidates[1].prediction);
    // 192 KiB behind a point draining 2.7 MB/s is about 70 ms of queue.
    assert!(a.queue_ms > 60.0 && a.queue_ms < 80.0, "{a:?}");
    // All-async but not full: at most one async request in service.
    assert!(b.async_ms <= 1.4 + 1e-9, "{b:?}");
}

#[test]
fn headroom_passes_over_unused_points_far_slower_than_one_the_host_uses() {
    let mut used = point("c");
    used.host_connected = true;
    let d = auto(
        vec![sync_queue_of_slow_misses("a"), used.clone()],
        Some("h"),
        4,
    );
    assert_eq!(
        (d.chosen.as_str(), d.rule),
        ("c", Rule::LeastLatencyOverHeadroom)
    );
    // An unused point about as good as the used one still wins headroom.
    let d = auto(vec![only_a_relocation("b"), used], Some("h"), 4);
    assert_eq!((d.chosen.as_str(), d.rule), ("b", Rule::ConnectionHeadroom));
}

#[test]
fn an_unavailable_point_counts_for_the_hosts_connections_but_is_never_chosen() {
    let mut full = point("a");
    full.host_connected = true;
    full.unavailable = Some("no room".into());
    let pts = vec![full, point("b")];
    // At the limit: its own point cannot take it, b would be one too many.
    let e = decide(
        pts.clone(),
        &Want::Auto,
        Some("h".into()),
        1,
        &Weights::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy);
    let msg = e.to_string();
    assert!(
        msg.contains("uses 1 export point") && msg.contains("a: no room"),
        "{msg}"
    );
    // With headroom: b, and the decision says the host uses one point.
    let d = auto(pts.clone(), Some("h"), 2);
    assert_eq!((d.chosen.as_str(), d.host_connections), ("b", 1));
    assert!(!d.candidates[0].eligible);
    // Without a host too, never the unavailable point, nor by name.
    let mut idle_full = point("a");
    idle_full.unavailable = Some("no room".into());
    let d = auto(vec![idle_full.clone(), busy("b", 500_000_000)], None, 4);
    assert_eq!(d.chosen, "b");
    let named = Want::Named {
        name: "a".into(),
        force: true,
    };
    let e = decide(vec![idle_full], &named, None, 4, &Weights::default()).unwrap_err();
    assert!(e.to_string().contains("no room"), "{e}");
}

#[test]
fn every_point_not_eligible_says_why_under_every_rule() {
    let connected = |p: PointFigures| PointFigures {
        host_connected: true,
        ..p
    };
    let full = PointFigures {
        unavailable: Some("no room".into()),
        ..point("f")
    };
    let forced = Want::Named {
        name: "b".into(),
        force: false,
    };
    let w = Weights::default();
    let decisions = [
        // Connection headroom: the point the host uses already.
        auto(
            vec![connected(busy("a", 0)), point("b"), full.clone()],
            Some("h"),
            2,
        ),
        // At the limit: the point the host does not use.
        auto(
            vec![connected(busy("a", 0)), point("b"), full.clone()],
            Some("h"),
            1,
        ),
        // Headroom passed over: the far slower unused point.
        auto(
            vec![sync_queue_of_slow_misses("a"), connected(point("c"))],
            Some("h"),
            4,
        ),
        // Named: the others.
        decide(vec![point("a"), point("b"), full], &forced, None, 4, &w).unwrap(),
    ];
    for d in decisions {
        assert!(d.candidates.iter().any(|c| !c.eligible), "{d:?}");
        for c in &d.candidates {
            assert_eq!(c.eligible, c.not_eligible.is_none(), "{:?}: {c:?}", d.rule);
        }
    }
}
