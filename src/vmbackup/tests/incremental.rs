//! Incremental `backup-vms` against real QEMU: an incremental reads
//! exactly what was written since the last backup; a base bitmap that died
//! with QEMU or no longer records means a full read, said why; a failed
//! incremental hands its bitmap back in one QMP transaction (a relay in
//! front of QEMU records the commands and injects a guest write).

use super::*;

fn chunk_list(repo: &Repository, vm: &str, id: &str) -> Vec<Option<crate::repo::Digest>> {
    repo.resolve(vm, Some(id)).unwrap().disks[0]
        .chunks
        .iter()
        .collect()
}

fn bitmaps_left(q: &mut Qmp) -> Vec<String> {
    leftovers(q)
        .into_iter()
        .filter(|l| l.starts_with("bitmap "))
        .collect()
}

#[test]
fn an_incremental_reads_exactly_the_chunks_written_since_the_last_backup_and_lists_the_chunks_of_a_full_backup(
) {
    let data = content();
    let v = vm(Some(&data));
    let (_d, repo) = repo();
    let mut opts = options(&[("inc", &v)], 1, None);
    let full = backup_vms(&repo, &opts).unwrap();
    assert!(full.failed().is_empty(), "{:?}", full.failed());
    let r0 = report(&full, "inc").clone();
    assert_eq!(r0.mode, "full");
    // 3 MiB of data in 64 KiB chunks: the zero MiB is not read.
    assert_eq!(r0.chunks_read, 48);

    // Four chunks written: in data, across a chunk boundary, and in the hole.
    let mut q = v.monitor();
    assert_eq!(
        bitmaps_left(&mut q).len(),
        1,
        "the full backup keeps its bitmap"
    );
    hmp_write(&mut q, 0x11, 0, 4096);
    hmp_write(&mut q, 0x22, 6 * CHUNK as usize - 512, 1024);
    hmp_write(&mut q, 0x33, 2 * MIB + CHUNK as usize, 4096);
    opts.incremental = true;
    let inc = backup_vms(&repo, &opts).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&inc).unwrap());
    assert!(inc.failed().is_empty(), "{:?}", inc.failed());
    let r1 = report(&inc, "inc").clone();
    assert_eq!(r1.mode, "incremental");
    assert_eq!(r1.base, r0.backup);
    assert!(r1.warnings.is_empty(), "{:?}", r1.warnings);
    assert_eq!(r1.chunks_read, 4, "chunks 0, 5, 6 and 33");
    assert_eq!(r1.bytes_read, 4 * CHUNK as u64);
    let id1 = r1.backup.clone().unwrap();
    let now = std::fs::read(v.img.as_ref().unwrap()).unwrap();
    assert!(
        restored(&repo, "inc", &id1) == now,
        "the incremental holds the disk"
    );
    let left = bitmaps_left(&mut q);
    assert_eq!(left.len(), 1, "only the new bitmap stays: {left:?}");

    // A full backup right after, nothing written between: the same chunks.
    opts.incremental = false;
    let full2 = backup_vms(&repo, &opts).unwrap();
    let r2 = report(&full2, "inc").clone();
    assert_eq!(r2.chunks_read, 49);
    assert_eq!(
        chunk_list(&repo, "inc", &id1),
        chunk_list(&repo, "inc", r2.backup.as_deref().unwrap())
    );
    // And an incremental with no write in between reads nothing.
    opts.incremental = true;
    let idle = backup_vms(&repo, &opts).unwrap();
    let r3 = report(&idle, "inc");
    assert_eq!((r3.mode.as_str(), r3.chunks_read), ("incremental", 0));
    assert_eq!(
        chunk_list(&repo, "inc", r3.backup.as_deref().unwrap()),
        chunk_list(&repo, "inc", &id1)
    );
    eprintln!(
        "chunks read: full {}, incremental {}, idle incremental {}",
        r0.chunks_read, r1.chunks_read, r3.chunks_read
    );
}

#[test]
fn an_incremental_whose_bitmap_died_with_a_restarted_qemu_reads_everything_and_says_why() {
    let data = content();
    let v = vm(Some(&data));
    let (_d, repo) = repo();
    let mut opts = options(&[("lost", &v)], 1, None);
    let full = backup_vms(&repo, &opts).unwrap();
    assert!(full.failed().is_empty(), "{:?}", full.failed());
    v.restart();
    let mut q = v.monitor();
    assert!(bitmaps_left(&mut q).is_empty());
    hmp_write(&mut q, 0x44, CHUNK as usize, 4096);
    opts.incremental = true;
    let s = backup_vms(&repo, &opts).unwrap();
    assert!(s.failed().is_empty(), "{:?}", s.failed());
    let r = report(&s, "lost");
    assert_eq!(r.mode, "full");
    assert_eq!(r.base, None);
    assert_eq!(r.chunks_read, 48);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.starts_with("full read: ") && w.contains("no longer has dirty bitmap")),
        "{:?}",
        r.warnings
    );
    let now = std::fs::read(v.img.as_ref().unwrap()).unwrap();
    assert!(restored(&repo, "lost", r.backup.as_deref().unwrap()) == now);
    assert_eq!(bitmaps_left(&mut q).len(), 1);
    // With no previous backup at all: a full read too, said so.
    let (_d2, empty) = super::tests::repo();
    let s = backup_vms(&empty, &opts).unwrap();
    let r = report(&s, "lost");
    assert_eq!(r.mode, "full");
    assert_eq!(r.warnings, ["full read: no previous backup"]);
}

#[test]
fn a_failed_incremental_merges_its_bitmap_into_the_previous_one_so_the_next_reads_every_write_since_the_last_backup(
) {
    let data = content();
    let v = vm(Some(&data));
    let (_d, repo) = repo();
    let mut opts = options(&[("merge", &v)], 1, None);
    let full = backup_vms(&repo, &opts).unwrap();
    let base = report(&full, "merge").backup.clone();
    assert!(base.is_some());
    // One client per QMP socket: the test's monitor is shared with the hook.
    let mon = Arc::new(Mutex::new(v.monitor()));
    // Before the failed run's snapshot: in the previous bitmap.
    hmp_write(&mut mon.lock().unwrap(), 0x55, CHUNK as usize, 4096);

    // After its snapshot: in the failed run's new bitmap only. Then its
    // exports vanish, so its read fails.
    let m = mon.clone();
    let hook: Hook = Arc::new(move |_, event| {
        if event == "resumed" {
            let mut q = m.lock().unwrap();
            hmp_write(&mut q, 0x66, 7 * CHUNK as usize, 4096);
            let exports = q.execute("query-block-exports", None).unwrap();
            for e in exports.as_array().unwrap() {
                q.execute("block-export-del", Some(json!({"id": e["id"]})))
                    .unwrap();
            }
        }
    });
    opts.incremental = true;
    opts.hook = Some(hook);
    let failed = backup_vms(&repo, &opts).unwrap();
    let r = report(&failed, "merge");
    assert_eq!(r.mode, "incremental");
    assert!(r.error.is_some(), "{r:?}");
    assert_eq!(repo.backup_ids("merge").unwrap().len(), 1);
    let left = bitmaps_left(&mut mon.lock().unwrap());
    assert_eq!(left.len(), 1, "the previous bitmap alone: {left:?}");

    opts.hook = None;
    let next = backup_vms(&repo, &opts).unwrap();
    assert!(next.failed().is_empty(), "{:?}", next.failed());
    let r = report(&next, "merge");
    assert_eq!((r.mode.as_str(), &r.base), ("incremental", &base));
    assert_eq!(r.chunks_read, 2, "chunks 1 and 7");
    let now = std::fs::read(v.img.as_ref().unwrap()).unwrap();
    assert!(restored(&repo, "merge", r.backup.as_deref().unwrap()) == now);
}

/// Tests that back up through a relay take turns: a run's lock on a VM is
/// keyed on the process behind its QMP socket (`SO_PEERCRED`), and behind
/// a relay that is this test process, so two such tests at once refuse
/// each other ("another recoverfs job is changing this VM's block
/// devices") whenever the test order runs them side by side.
static RELAYED: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

thread_local! {
    /// The running test's turn, taken by its first relay and let go when
    /// its thread ends.
    static TURN: std::cell::RefCell<Option<parking_lot::MutexGuard<'static, ()>>> =
        const { std::cell::RefCell::new(None) };
}

/// A QMP relay listening on `path`, passing each connection on to QEMU's
/// socket `to`. It logs every command; `answer` may reply to one in
/// QEMU's place (QEMU then never sees it); `before_reply` runs before
/// QEMU's reply to a command is passed back, i.e. between two of the
/// client's commands. Waits for the test's turn (see [`RELAYED`]).
pub(crate) fn qmp_relay(
    path: &Path,
    to: &Path,
    answer: impl Fn(&Value) -> Option<Value> + Send + Sync + 'static,
    before_reply: impl Fn(&Value) + Send + Sync + 'static,
) -> Arc<Mutex<Vec<Value>>> {
    use std::io::{BufRead, BufReader, Write};
    use std::net::Shutdown;
    use std::os::unix::net::{UnixListener, UnixStream};
    TURN.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_none() {
            *t = Some(RELAYED.lock());
        }
    });
    let listener = UnixListener::bind(path).unwrap();
    let log = Arc::new(Mutex::new(vec![]));
    let (answer, before_reply) = (Arc::new(answer), Arc::new(before_reply));
    let (to, log2) = (to.to_path_buf(), log.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let (Ok(client), Ok(qemu)) = (client, UnixStream::connect(&to)) else {
                return;
            };
            let pending = Arc::new(Mutex::new(HashMap::<String, Value>::new()));
            let out = Arc::new(Mutex::new(client.try_clone().unwrap()));
            let mut to_qemu = qemu.try_clone().unwrap();
            let (o, p, l, answer) = (out.clone(), pending.clone(), log2.clone(), answer.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(client).lines() {
                    let Ok(line) = line else { break };
                    let Ok(cmd) = serde_json::from_str::<Value>(&line) else {
                        break;
                    };
                    l.lock().unwrap().push(cmd.clone());
                    if let Some(mut reply) = answer(&cmd) {
                        reply["id"] = cmd["id"].clone();
                        if writeln!(o.lock().unwrap(), "{reply}").is_err() {
                            break;
                        }
                        continue;
                    }
                    p.lock().unwrap().insert(cmd["id"].to_string(), cmd);
                    if writeln!(to_qemu, "{line}").is_err() {
                        break;
                    }
                }
                let _ = to_qemu.shutdown(Shutdown::Both);
            });
            let before_reply = before_reply.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(qemu).lines() {
                    let Ok(line) = line else { break };
                    let m = serde_json::from_str::<Value>(&line).unwrap_or(Value::Null);
                    let cmd = m
                        .get("id")
                        .and_then(|id| pending.lock().unwrap().remove(&id.to_string()));
                    if let Some(c) = cmd {
                        before_reply(&c);
                    }
                    if writeln!(out.lock().unwrap(), "{line}").is_err() {
                        break;
                    }
                }
                let _ = out.lock().unwrap().shutdown(Shutdown::Both);
            });
        }
    });
    log
}

/// A QMP command's own name, or its transaction's action types.
fn actions(cmd: &Value) -> Vec<&str> {
    match cmd["execute"].as_str() {
        Some("transaction") => (cmd["arguments"]["actions"].as_array().into_iter().flatten())
            .filter_map(|a| a["type"].as_str())
            .collect(),
        c => c.into_iter().collect(),
    }
}

/// Whether a QMP command is (the first step of) handing a failed run's
/// bitmap back, in whatever form: it enables a bitmap, or merges one
/// outside a transaction (pre-copy's transactions merge but never enable).
pub(crate) fn hands_back(cmd: &Value) -> bool {
    actions(cmd).contains(&"block-dirty-bitmap-enable")
        || cmd["execute"] == "block-dirty-bitmap-merge"
}

/// Whether a QMP command hands a failed run's bitmap back and merges it.
pub(crate) fn hands_back_merging(cmd: &Value) -> bool {
    hands_back(cmd) && actions(cmd).contains(&"block-dirty-bitmap-merge")
}

/// A hook that, after the snapshot of the run it is given to, writes
/// `pattern` to chunk `chunk` (marked in that run's new bitmap only) and
/// deletes the run's exports, so its read fails.
pub(crate) fn write_then_break_the_read(mon: &Arc<Mutex<Qmp>>, pattern: u8, chunk: usize) -> Hook {
    let m = mon.clone();
    Arc::new(move |_, event| {
        if event == "resumed" {
            let mut q = m.lock().unwrap();
            hmp_write(&mut q, pattern, chunk * CHUNK as usize, 4096);
            let exports = q.execute("query-block-exports", None).unwrap();
            for e in exports.as_array().unwrap() {
                q.execute("block-export-del", Some(json!({"id": e["id"]})))
                    .unwrap();
            }
        }
    })
}

#[test]
fn a_failed_incrementals_bitmap_goes_back_in_one_transaction_so_a_guest_write_during_the_hand_back_is_read_by_the_next(
) {
    let data = content();
    let v = vm(Some(&data));
    let (d, repo) = repo();
    let mut opts = options(&[("race", &v)], 1, None);
    let full = backup_vms(&repo, &opts).unwrap();
    let base = report(&full, "race").backup.clone();
    assert!(base.is_some());
    let mon = Arc::new(Mutex::new(v.monitor()));
    // The guest writes chunk 9 right after QEMU carried out the hand-back's
    // merge, before the backup's next command.
    let m = mon.clone();
    let relay = d.path().join("relay.sock");
    let log = qmp_relay(
        &relay,
        &v.qmp,
        |_| None,
        move |cmd| {
            if hands_back_merging(cmd) {
                hmp_write(&mut m.lock().unwrap(), 0x77, 9 * CHUNK as usize, 4096);
            }
        },
    );
    opts.vms[0].qmp = relay;
    opts.incremental = true;
    opts.hook = Some(write_then_break_the_read(&mon, 0x66, 7));
    let failed = backup_vms(&repo, &opts).unwrap();
    let r = report(&failed, "race");
    assert_eq!(r.mode, "incremental");
    assert!(r.error.is_some(), "{r:?}");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    opts.vms[0].qmp = v.qmp.clone();
    opts.hook = None;
    let next = backup_vms(&repo, &opts).unwrap();
    assert!(next.failed().is_empty(), "{:?}", next.failed());
    let r = report(&next, "race");
    assert_eq!((r.mode.as_str(), &r.base), ("incremental", &base));
    let now = std::fs::read(v.img.as_ref().unwrap()).unwrap();
    assert!(
        restored(&repo, "race", r.backup.as_deref().unwrap()) == now,
        "the next incremental holds the write made during the hand-back"
    );
    assert_eq!(r.chunks_read, 2, "chunks 7 and 9");
    let steps: Vec<Value> = (log.lock().unwrap().iter())
        .filter(|c| hands_back(c))
        .cloned()
        .collect();
    assert_eq!(steps.len(), 1, "one command: {steps:?}");
    let types: Vec<&str> = (steps[0]["arguments"]["actions"].as_array().unwrap().iter())
        .map(|a| a["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-merge",
            "block-dirty-bitmap-remove"
        ]
    );
}

#[test]
fn a_failed_hand_back_removes_both_bitmaps_says_so_and_the_next_incremental_reads_everything() {
    let data = content();
    let v = vm(Some(&data));
    let (d, repo) = repo();
    let mut opts = options(&[("noback", &v)], 1, None);
    let full = backup_vms(&repo, &opts).unwrap();
    assert!(full.failed().is_empty(), "{:?}", full.failed());
    let mon = Arc::new(Mutex::new(v.monitor()));
    // QEMU refuses the hand-back (its first step, whatever it is).
    let relay = d.path().join("relay.sock");
    qmp_relay(
        &relay,
        &v.qmp,
        |cmd| {
            hands_back(cmd)
                .then(|| json!({"error": {"class": "GenericError", "desc": "refused by the test"}}))
        },
        |_| {},
    );
    opts.vms[0].qmp = relay;
    opts.incremental = true;
    opts.hook = Some(write_then_break_the_read(&mon, 0x66, 7));
    let failed = backup_vms(&repo, &opts).unwrap();
    let r = report(&failed, "noback");
    assert!(r.error.is_some(), "{r:?}");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("could not be handed back") && w.contains("refused by the test")),
        "{:?}",
        r.warnings
    );
    let left = bitmaps_left(&mut mon.lock().unwrap());
    assert!(
        left.is_empty(),
        "no bitmap vouches for the writes: {left:?}"
    );

    opts.vms[0].qmp = v.qmp.clone();
    opts.hook = None;
    let next = backup_vms(&repo, &opts).unwrap();
    assert!(next.failed().is_empty(), "{:?}", next.failed());
    let r = report(&next, "noback");
    assert_eq!(r.mode, "full");
    let now = std::fs::read(v.img.as_ref().unwrap()).unwrap();
    assert!(restored(&repo, "noback", r.backup.as_deref().unwrap()) == now);
}

#[test]
fn an_incremental_whose_base_bitmap_no_longer_records_reads_everything_and_says_why() {
    let data = content();
    let v = vm(Some(&data));
    let (_d, repo) = repo();
    let mut opts = options(&[("stale", &v)], 1, None);
    let full = backup_vms(&repo, &opts).unwrap();
    assert!(full.failed().is_empty(), "{:?}", full.failed());
    // The base's bitmap left disabled (as by a lost reply to `disable`):
    // it misses the write that follows.
    let m = repo
        .resolve("stale", report(&full, "stale").backup.as_deref())
        .unwrap();
    let kept = &m.config["backup_vms"]["bitmaps"][0];
    let (node, bitmap) = (
        kept["node"].as_str().unwrap(),
        kept["bitmap"].as_str().unwrap(),
    );
    let mut q = v.monitor();
    fleece::bitmap_op(&mut q, "disable", node, bitmap).unwrap();
    hmp_write(&mut q, 0x44, 5 * CHUNK as usize, 4096);
    opts.incremental = true;
    let s = backup_vms(&repo, &opts).unwrap();
    assert!(s.failed().is_empty(), "{:?}", s.failed());
    let r = report(&s, "stale");
    let now = std::fs::read(v.img.as_ref().unwrap()).unwrap();
    assert!(
        restored(&repo, "stale", r.backup.as_deref().unwrap()) == now,
        "the backup holds the write the disabled bitmap missed"
    );
    assert_eq!((r.mode.as_str(), &r.base), ("full", &None));
    assert!(
        r.warnings
            .iter()
            .any(|w| w.starts_with("full read: ") && w.contains("no longer records writes")),
        "{:?}",
        r.warnings
    );
}
