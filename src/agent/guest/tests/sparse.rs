//! Sparse files: holes are not read, and with a host that takes hole
//! frames they do not cross the channel; the backup restores identical
//! and sparse. Older streams (zeros in data frames) still back up.

use super::*;
use std::os::unix::fs::FileExt;

/// A 64 MiB file with 3 pieces of data (one at its end), the rest holes;
/// and a 4 MiB file whose data is written zeros (not holes).
fn sparse_tree(w: &World) -> (std::path::PathBuf, Vec<u8>) {
    let t = w.dir.path().join("srv/vm");
    std::fs::create_dir_all(&t).unwrap();
    let f = File::create(t.join("disk.img")).unwrap();
    let size = 64u64 << 20;
    f.set_len(size).unwrap();
    let piece: Vec<u8> = (0..200_000u32).map(|i| (i % 251 + 1) as u8).collect();
    for at in [0, 20 << 20, size - piece.len() as u64] {
        f.write_all_at(&piece, at).unwrap();
    }
    f.sync_all().unwrap();
    std::fs::write(t.join("zeros"), vec![0u8; 4 << 20]).unwrap();
    let mut want = vec![];
    File::open(t.join("disk.img"))
        .unwrap()
        .read_to_end(&mut want)
        .unwrap();
    (t, want)
}

/// [`World::backup`] through a relay that counts the bytes the agent sent
/// (what crossed the channel).
fn backup_counted(w: &World, job: Job) -> (Result<()>, Result<crate::repo::catalog::Catalog>, u64) {
    let _one = ONE_AGENT.lock().unwrap_or_else(|p| p.into_inner());
    let (guest, relay_g) = UnixStream::pair().unwrap();
    let (relay_h, host) = UnixStream::pair().unwrap();
    let container = w.dir.path().join("container");
    let agent = std::thread::spawn(move || {
        run_on(
            std::fs::File::from(std::os::fd::OwnedFd::from(guest)),
            &container,
            &job,
        )
    });
    // Guest → host, counted; the host's acknowledgement back.
    let (mut from_g, mut to_h) = (relay_g.try_clone().unwrap(), relay_h.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let n = std::io::copy(&mut from_g, &mut to_h).unwrap_or(0);
        let _ = to_h.shutdown(std::net::Shutdown::Write);
        n
    });
    let (mut from_h, mut to_g) = (relay_h, relay_g);
    let down = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_h, &mut to_g);
        let _ = to_g.shutdown(std::net::Shutdown::Write);
    });
    let opts = options(Duration::from_secs(30), Duration::from_secs(600));
    let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
    let got = receive(&w.repo, &host, deadline, &target(), &opts, &|_| {});
    let r = agent.join().unwrap();
    let crossed = up.join().unwrap();
    drop(host);
    down.join().unwrap();
    (r, got, crossed)
}

fn job(t: &Path, hooks: bool, holes: bool) -> Job {
    Job::Backup {
        paths: vec![t.to_str().unwrap().into()],
        hooks: if hooks { vec!["app".into()] } else { vec![] },
        allow_quiesced_stream: false,
        holes,
        keepalive: false,
    }
}

/// Restores `c` under a new directory; the restored tree's root.
fn restore_all(
    w: &World,
    c: &crate::repo::catalog::Catalog,
    t: &Path,
    to: &str,
) -> std::path::PathBuf {
    let to = w.dir.path().join(to);
    std::fs::create_dir(&to).unwrap();
    let sel = crate::files::select(c, t.to_str().unwrap()).unwrap();
    crate::files::restore(&w.repo, c, &sel, &to, &Default::default()).unwrap();
    to.join(t.strip_prefix("/").unwrap())
}

#[test]
fn a_sparse_file_streams_only_its_data_and_restores_identical_and_sparse() {
    let w = World::new();
    let (t, want) = sparse_tree(&w);
    for hooks in [false, true] {
        let (agent, got, crossed) = backup_counted(&w, job(&t, hooks, true));
        agent.unwrap();
        let c = w.repo.publish_catalog(got.unwrap()).unwrap();
        // 600 000 bytes of data, metadata and a frame head per hole: not
        // the 68 MiB of the files.
        assert!(crossed < 700_000, "hooks {hooks}: {crossed} bytes crossed");
        assert_eq!(c.file_bytes, (64 << 20) + (4 << 20));
        let r = restore_all(&w, &c, &t, &format!("restored-{hooks}"));
        let got = std::fs::read(r.join("disk.img")).unwrap();
        assert!(got == want, "hooks {hooks}: the restored file differs");
        assert_eq!(std::fs::read(r.join("zeros")).unwrap(), vec![0u8; 4 << 20]);
        let m = std::fs::metadata(r.join("disk.img")).unwrap();
        assert!(
            m.blocks() * 512 < 4 << 20,
            "not sparse: {} blocks",
            m.blocks()
        );
    }
}

#[test]
fn an_older_stream_without_hole_frames_still_backs_up_the_same_chunks() {
    let w = World::new();
    let (t, want) = sparse_tree(&w);
    // What a host before hole frames sends: no `holes` in the job.
    let old: Job =
        serde_json::from_str(&format!(r#"{{"op":"backup","paths":["{}"]}}"#, t.display())).unwrap();
    assert_eq!(old, job(&t, false, false));
    let (agent, got, crossed) = backup_counted(&w, old);
    agent.unwrap();
    let dense = got.unwrap();
    // Zeros in data frames: every byte crossed, as agents before sent.
    assert!(crossed > 68 << 20, "{crossed} bytes crossed");
    let (agent, got, _) = backup_counted(&w, job(&t, false, true));
    agent.unwrap();
    let sparse = got.unwrap();
    assert_eq!(dense.entries, sparse.entries, "the same chunks either way");
    let c = w.repo.publish_catalog(dense).unwrap();
    let r = restore_all(&w, &c, &t, "restored");
    assert!(std::fs::read(r.join("disk.img")).unwrap() == want);
}

#[test]
fn hole_frames_from_the_host_restore_a_sparse_file_in_the_guest() {
    let w = World::new();
    let to = w.dir.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let (host, agent) = w.spawn_agent(Job::Restore {
        to: Some(to.to_str().unwrap().into()),
    });
    let mut fr = FrameReader::new(host.try_clone().unwrap(), "the agent's stream");
    match fr.next_frame().unwrap() {
        Frame::Hello(h) => assert!(h.has(crate::agent::stream::FEATURE_HOLES)),
        other => panic!("{}", describe(&other)),
    }
    let mut fw = FrameWriter::new(host.try_clone().unwrap());
    let size = (32u64 << 20) + 3;
    fw.header(&file_entry("/f", size)).unwrap();
    fw.data(b"abc").unwrap();
    fw.hole(32 << 20).unwrap();
    fw.end().unwrap();
    loop {
        match fr.next_frame().unwrap() {
            Frame::End(_) => break,
            Frame::Error(m) => panic!("{m}"),
            _ => {}
        }
    }
    (&host).write_all(b"A").unwrap();
    agent.join().unwrap().unwrap();
    let f = to.join("f");
    let got = std::fs::read(&f).unwrap();
    assert_eq!(got.len() as u64, size);
    assert_eq!(&got[..3], b"abc");
    assert!(got[3..].iter().all(|&b| b == 0));
    assert!(std::fs::metadata(&f).unwrap().blocks() * 512 < 1 << 20);
}

#[test]
fn agent_restore_of_a_file_with_a_tib_hole_sends_one_hole_frame_and_the_guest_seeks() {
    let w = World::new();
    let (c, head, tail) = crate::files::tests::tib_hole_backup(&w.repo);
    let to = w.dir.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let sel = crate::files::select(&c, "/srv/big.img").unwrap();
    let (host, agent) = w.spawn_agent(Job::Restore {
        to: Some(to.to_str().unwrap().into()),
    });
    let t = std::time::Instant::now();
    let (done, got) = std::sync::mpsc::channel();
    let (repo, c2) = (w.repo.clone(), c.clone());
    // The host's side, as `agent-restore` runs it: without the fix the
    // guest read the hole out as a TiB of zeros and looked at each.
    std::thread::spawn(move || {
        let sel = crate::files::select(&c2, "/srv/big.img").unwrap();
        let deadline = Deadline::start(Duration::from_secs(600), Duration::from_secs(600));
        let sent = std::sync::atomic::AtomicU64::new(0);
        let r = crate::agent::restore::send(&repo, &host, deadline, &c2, &sel, &sent, &|_| {});
        let _ = done.send(r);
    });
    let r = got
        .recv_timeout(Duration::from_secs(20))
        .expect("the restore of a TiB hole took more than 20 s");
    let took = t.elapsed();
    assert_eq!(r.unwrap(), sel.len() as u64);
    agent.join().unwrap().unwrap();
    assert!(took < Duration::from_millis(500), "{took:?}");
    crate::files::tests::assert_tib_hole_file(&to.join("srv/big.img"), &head, &tail);
}
