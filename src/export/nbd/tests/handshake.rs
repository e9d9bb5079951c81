//! The handshake: option haggling, exports, meta contexts, and the
//! clients and options refused.

use super::*;

#[test]
fn go_and_info_report_size_flags_name_description_and_block_sizes() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    let info = c.info(EXPORT).unwrap();
    assert_eq!(info.size, SIZE);
    assert_eq!(info.flags, ALL_FLAGS, "no DF without structured replies");
    assert_eq!(info.flags & FLAG_READ_ONLY, 0);
    assert_eq!(info.flags & FLAG_SEND_FAST_ZERO, 0);
    assert_eq!(info.name.as_deref(), Some(EXPORT));
    assert_eq!(info.description.as_deref(), Some("mem/disk0, a test disk"));
    assert_eq!(info.block_sizes, Some((1, 4096, 32 << 20)));
    assert_eq!(h.guards(), 0, "INFO keeps no export open");
    c.structured_replies();
    let info = c.go(EXPORT).unwrap();
    assert_eq!(info.flags, ALL_FLAGS | FLAG_SEND_DF);
    assert_eq!(info.block_sizes, Some((1, 4096, 32 << 20)));
    assert_eq!(c.read(0, 512), vec![0; 512]);
    assert_eq!(h.guards(), 1);
}

#[test]
fn list_returns_every_export_with_its_description() {
    let h = serve(
        vec![
            ("vm/disk0", Probe::new(SIZE)),
            ("vm/disk1", Probe::new(SIZE)),
        ],
        &[],
    );
    let mut c = h.client();
    assert_eq!(
        c.list(),
        vec![
            ("vm/disk0".to_string(), "vm/disk0, a test disk".to_string()),
            ("vm/disk1".to_string(), "vm/disk1, a test disk".to_string()),
        ]
    );
    // LIST with data is malformed.
    let r = c.option(OPT_LIST, b"x");
    assert_eq!(r.last().unwrap().typ, REP_ERR_INVALID);
}

#[test]
fn an_unknown_export_is_refused_with_err_unknown_and_a_message_and_the_client_may_go_on() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    let (typ, msg) = c.go("nope/disk9").unwrap_err();
    assert_eq!(typ, REP_ERR_UNKNOWN);
    assert!(msg.contains("nope/disk9"), "{msg}");
    let (typ, _) = c.info("nope/disk9").unwrap_err();
    assert_eq!(typ, REP_ERR_UNKNOWN);
    assert_eq!(h.guards(), 0);
    assert_eq!(c.go(EXPORT).unwrap().size, SIZE);
}

#[test]
fn the_empty_name_is_the_only_export_and_unknown_when_there_are_two() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    let info = c.go("").unwrap();
    assert_eq!(info.name.as_deref(), Some(EXPORT));

    let h = serve(
        vec![
            ("vm/disk0", Probe::new(SIZE)),
            ("vm/disk1", Probe::new(SIZE)),
        ],
        &[],
    );
    let mut c = h.client();
    let (typ, msg) = c.go("").unwrap_err();
    assert_eq!(typ, REP_ERR_UNKNOWN);
    assert!(msg.contains("2 exports"), "{msg}");
}

#[test]
fn export_name_enters_transmission_with_and_without_zero_padding() {
    let p = Probe::new(SIZE);
    p.inner.write_at(100, b"hello").unwrap();
    let h = serve_one(p);
    for no_zeroes in [true, false] {
        let s = raw_tcp(h.addr);
        let mut c = Client::handshake(Box::new(s), no_zeroes);
        let (size, flags) = c.export_name(EXPORT, no_zeroes);
        assert_eq!((size, flags), (SIZE, ALL_FLAGS));
        assert_eq!(c.read(100, 5), b"hello");
    }
}

#[test]
fn export_name_of_an_unknown_export_closes_the_connection() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    c.send_option(OPT_EXPORT_NAME, b"nope").unwrap();
    assert!(c.closed());
}

#[test]
fn clients_without_fixed_newstyle_or_with_unknown_flags_are_refused() {
    let h = serve_one(Probe::new(SIZE));
    for flags in [0u32, FLAG_C_NO_ZEROES, FLAG_C_FIXED_NEWSTYLE | 4] {
        let mut s = raw_tcp(h.addr);
        read_greeting(&mut s);
        s.write_all(&flags.to_be_bytes()).unwrap();
        assert!(client::is_closed(&mut s), "flags {flags:#x} accepted");
    }
}

#[test]
fn starttls_is_refused_by_policy_and_unknown_options_are_unsupported() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    let r = c.option(OPT_STARTTLS, &[]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].typ, REP_ERR_POLICY);
    for unknown in [4, 11, 99, 0xdead] {
        let r = c.option(unknown, b"some data the server must skip");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].typ, REP_ERR_UNSUP);
    }
    // Malformed known options are invalid, not fatal.
    assert_eq!(
        c.option(OPT_GO, &[0, 0]).last().unwrap().typ,
        REP_ERR_INVALID
    );
    assert_eq!(
        c.option(OPT_STRUCTURED_REPLY, b"x").last().unwrap().typ,
        REP_ERR_INVALID
    );
    assert_eq!(c.go(EXPORT).unwrap().size, SIZE);
}

#[test]
fn abort_is_acknowledged_and_closes() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    let r = c.option(OPT_ABORT, &[]);
    assert_eq!(r[0].typ, REP_ACK);
    assert!(c.closed());
}

#[test]
fn an_option_longer_than_64_kib_ends_the_connection() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    c.stream().write_all(&b).unwrap();
    assert!(c.closed());
}

#[test]
fn meta_contexts_are_listed_by_name_namespace_or_all_and_set_by_exact_name() {
    let h = serve_one(Probe::new(SIZE));
    let mut c = h.client();
    let both = vec![CONTEXT_ALLOCATION.to_string(), CONTEXT_CHANGED.to_string()];
    assert_eq!(c.list_meta(EXPORT, &[]), both);
    assert_eq!(c.list_meta(EXPORT, &["base:"]), vec![CONTEXT_ALLOCATION]);
    assert_eq!(c.list_meta(EXPORT, &["recoverfs:"]), vec![CONTEXT_CHANGED]);
    assert_eq!(
        c.list_meta(EXPORT, &["recoverfs:changed"]),
        vec![CONTEXT_CHANGED]
    );
    assert_eq!(
        c.list_meta(EXPORT, &["qemu:dirty-bitmap:x", "x-y:"]),
        Vec::<String>::new()
    );
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "nope", &[]).unwrap_err(),
        REP_ERR_UNKNOWN
    );
    // SET needs structured replies first.
    assert_eq!(
        c.meta(OPT_SET_META_CONTEXT, EXPORT, &[CONTEXT_ALLOCATION])
            .unwrap_err(),
        REP_ERR_INVALID
    );
    c.structured_replies();
    assert_eq!(
        c.set_meta(EXPORT, &["base:", "recoverfs:", "nope:x"]),
        vec![]
    );
    let set = c.set_meta(EXPORT, &[CONTEXT_CHANGED, CONTEXT_ALLOCATION]);
    assert_eq!(
        set,
        vec![
            (ALLOCATION_ID, CONTEXT_ALLOCATION.to_string()),
            (CHANGED_ID, CONTEXT_CHANGED.to_string())
        ]
    );
    // Malformed: a query longer than the option.
    let mut d = (EXPORT.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(EXPORT.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&100u32.to_be_bytes());
    assert_eq!(c.option(OPT_SET_META_CONTEXT, &d)[0].typ, REP_ERR_INVALID);
}
