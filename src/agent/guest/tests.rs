//! The agent against the host side of the stream over a socket pair: real
//! files, real hook scripts, a real repository.

use super::*;
use crate::agent::backup::{receive, Deadline, Options, Target};
use crate::agent::container::{AgentConfig, CONFIG_FORMAT};
use crate::repo::Repository;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// The copy directory is named by the pid (one agent a process): one
/// backup at a time in this test process.
static ONE_AGENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct World {
    dir: tempfile::TempDir,
    repo: Arc<Repository>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) =
            Repository::open_or_create(dir.path().join("repo").to_str().unwrap()).unwrap();
        // A container directory with one hook that records it ran.
        let c = dir.path().join("container");
        std::fs::create_dir_all(c.join("hooks/app")).unwrap();
        let cfg = AgentConfig {
            format: CONFIG_FORMAT,
            version: "7.7".into(),
            binary_version: "x".into(),
            built: "now".into(),
            hooks: vec!["app".into()],
            server: serde_json::json!({}),
        };
        std::fs::write(c.join("agent.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
        let log = dir.path().join("hook.log");
        for stage in ["pre", "post"] {
            let p = c.join("hooks/app").join(stage);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"HOOK-{stage} $RECOVERFS_PATHS\"\necho {stage} >> {}\n",
                    log.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        World { dir, repo }
    }

    fn tree(&self) -> std::path::PathBuf {
        let t = self.dir.path().join("srv/app");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
        std::fs::write(t.join("data.db"), &data).unwrap();
        std::fs::write(t.join("sub/conf"), b"x=1\n").unwrap();
        std::fs::set_permissions(t.join("sub/conf"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::symlink("data.db", t.join("link")).unwrap();
        t
    }

    /// The agent running `job` in a thread with this world's container,
    /// and the host's end of its socket pair.
    fn spawn_agent(&self, job: Job) -> (UnixStream, std::thread::JoinHandle<Result<()>>) {
        let (guest, host) = UnixStream::pair().unwrap();
        let container = self.dir.path().join("container");
        let agent = std::thread::spawn(move || {
            run_on(
                std::fs::File::from(std::os::fd::OwnedFd::from(guest)),
                &container,
                &job,
            )
        });
        (host, agent)
    }

    /// Runs the agent on one end and the host's receiver on the other.
    fn backup(
        &self,
        job: Job,
    ) -> (
        Result<()>,
        Result<crate::repo::catalog::Catalog>,
        Vec<String>,
    ) {
        self.backup_idle(job, Duration::from_secs(30))
    }

    /// [`World::backup`] with the host's idle timeout given.
    fn backup_idle(
        &self,
        job: Job,
        idle: Duration,
    ) -> (
        Result<()>,
        Result<crate::repo::catalog::Catalog>,
        Vec<String>,
    ) {
        let _one = ONE_AGENT.lock().unwrap_or_else(|p| p.into_inner());
        let (host, agent) = self.spawn_agent(job);
        let lines = std::sync::Mutex::new(vec![]);
        let t = Target {
            name: "vm1".into(),
            qmp: "/x".into(),
            qga: None,
        };
        let opts = Options {
            container: "/x".into(),
            paths: vec![],
            hooks: vec![],
            jobs: 1,
            allow_quiesced_stream: false,
            idle_timeout: idle,
            max_duration: Duration::from_secs(600),
            catalog_limits: crate::repo::catalog::CatalogLimits::STORED,
            stop: Default::default(),
        };
        let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
        let got = receive(&self.repo, &host, deadline, &t, &opts, &|l| {
            lines.lock().unwrap().push(l.to_string())
        });
        drop(host);
        (agent.join().unwrap(), got, lines.into_inner().unwrap())
    }
}

#[test]
fn the_agent_streams_a_tree_between_its_hooks_and_it_restores_identically() {
    let w = World::new();
    let t = w.tree();
    let tp = t.to_str().unwrap().to_string();
    let (agent, got, lines) = w.backup(Job::Backup {
        paths: vec![tp.clone()],
        hooks: vec!["app".into()],
        allow_quiesced_stream: false,
        holes: true,
        keepalive: true,
    });
    let c = w.repo.publish_catalog(got.unwrap()).unwrap();
    agent.unwrap();
    assert!(lines.iter().any(|l| l.contains("agent 7.7")), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("hook app pre: HOOK-pre {tp}")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("HOOK-post")), "{lines:?}");
    let ran = std::fs::read_to_string(w.dir.path().join("hook.log")).unwrap();
    assert_eq!(ran, "pre\npost\n");
    let paths: Vec<&str> = c.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            tp.clone(),
            format!("{tp}/data.db"),
            format!("{tp}/link"),
            format!("{tp}/sub"),
            format!("{tp}/sub/conf")
        ]
    );
    assert_eq!(c.file_bytes, 3_000_004);
    // Restore everything elsewhere: same bytes, modes, times, link.
    let to = w.dir.path().join("restored");
    std::fs::create_dir(&to).unwrap();
    let sel = crate::files::select(&c, &tp).unwrap();
    crate::files::restore(&w.repo, &c, &sel, &to, &Default::default()).unwrap();
    let r = to.join(tp.trim_start_matches('/'));
    for f in ["data.db", "sub/conf"] {
        assert_eq!(
            std::fs::read(r.join(f)).unwrap(),
            std::fs::read(t.join(f)).unwrap()
        );
        let (a, b) = (
            std::fs::metadata(r.join(f)).unwrap(),
            std::fs::metadata(t.join(f)).unwrap(),
        );
        assert_eq!(
            a.permissions().mode() & 0o7777,
            b.permissions().mode() & 0o7777
        );
        assert_eq!(a.mtime(), b.mtime());
        assert_eq!(a.mtime_nsec(), b.mtime_nsec());
    }
    assert_eq!(
        std::fs::read_link(r.join("link")).unwrap(),
        Path::new("data.db")
    );
    // A second restore into the same place replaces nothing.
    let e = crate::files::restore(&w.repo, &c, &sel, &to, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
}

#[test]
fn a_missing_path_or_hook_is_an_error_frame_and_no_hook_runs() {
    let w = World::new();
    let t = w.tree();
    let (agent, got, _) = w.backup(Job::Backup {
        paths: vec![t.to_str().unwrap().into(), "/no/such/path".into()],
        hooks: vec!["app".into()],
        allow_quiesced_stream: false,
        holes: true,
        keepalive: true,
    });
    let e = got.unwrap_err();
    assert!(
        e.to_string()
            .contains("path /no/such/path does not exist in the guest"),
        "{e}"
    );
    assert!(agent.is_err());
    assert!(!w.dir.path().join("hook.log").exists(), "a hook ran");
    let (_, got, _) = w.backup(Job::Backup {
        paths: vec![t.to_str().unwrap().into()],
        hooks: vec!["db".into()],
        allow_quiesced_stream: false,
        holes: true,
        keepalive: true,
    });
    let e = got.unwrap_err();
    assert!(
        e.to_string()
            .contains("hook \"db\" is not in the agent container (it has: app)"),
        "{e}"
    );
}

#[test]
fn a_failing_pre_hook_still_runs_post_and_sends_no_end() {
    let w = World::new();
    let t = w.tree();
    let pre = w.dir.path().join("container/hooks/app/pre");
    let log = w.dir.path().join("hook.log");
    std::fs::write(
        &pre,
        format!("#!/bin/sh\necho pre >> {}\nexit 3\n", log.display()),
    )
    .unwrap();
    let (agent, got, _) = w.backup(Job::Backup {
        paths: vec![t.to_str().unwrap().into()],
        hooks: vec!["app".into()],
        allow_quiesced_stream: false,
        holes: true,
        keepalive: true,
    });
    assert!(agent.is_err());
    let e = got.unwrap_err();
    assert!(e.to_string().contains("hook app pre failed"), "{e}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost\n");
}

fn target() -> Target {
    Target {
        name: "vm1".into(),
        qmp: "/x".into(),
        qga: None,
    }
}

fn options(idle: Duration, max: Duration) -> Options {
    Options {
        container: "/x".into(),
        paths: vec![],
        hooks: vec![],
        jobs: 1,
        allow_quiesced_stream: false,
        idle_timeout: idle,
        max_duration: max,
        catalog_limits: crate::repo::catalog::CatalogLimits::STORED,
        stop: Default::default(),
    }
}

/// A hostile guest on one end of a socket pair: hello, then `rest`.
fn hostile_guest(
    rest: impl FnOnce(&mut FrameWriter<UnixStream>) -> std::io::Result<()> + Send + 'static,
) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (guest, host) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut w = FrameWriter::new(guest);
        let _ = w
            .hello(&Hello {
                version: "6.6".into(),
                binary: "x".into(),
                features: crate::agent::stream::agent_features(),
            })
            .and_then(|()| rest(&mut w))
            // As the real agent: wait for the host's acknowledgement.
            .and_then(|()| w.get_mut().read_exact(&mut [0u8; 1]));
    });
    (host, t)
}

#[test]
fn a_guest_flooding_log_lines_keeps_a_bounded_log() {
    use crate::agent::backup::{logger, AgentLog, MAX_LOG_BYTES, MAX_LOG_LINES};
    let w = World::new();
    let (host, guest) = hostile_guest(|w| {
        let line = "y".repeat(2000);
        for _ in 0..3 * MAX_LOG_LINES {
            w.log(&line)?;
        }
        w.end()
    });
    let log = std::sync::Mutex::new(AgentLog::default());
    let shown = std::sync::atomic::AtomicUsize::new(0);
    let on_log = |_: &str, _: &str| {
        shown.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    };
    let opts = options(Duration::from_secs(30), Duration::from_secs(600));
    let say = logger(&log, "vm1", &on_log);
    let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
    receive(&w.repo, &host, deadline, &target(), &opts, &say).unwrap();
    guest.join().unwrap();
    drop(say);
    let lines = log.into_inner().unwrap().into_lines();
    let kept: usize = lines.iter().map(|l| l.len()).sum();
    // The hello line, then as many 2000-byte lines as fit.
    assert!(lines.len() <= MAX_LOG_LINES + 1, "{} lines", lines.len());
    assert!(kept <= MAX_LOG_BYTES + 200, "{kept} bytes kept");
    assert!(
        shown.load(std::sync::atomic::Ordering::SeqCst) <= MAX_LOG_LINES,
        "every line was shown"
    );
    let last = lines.last().unwrap();
    assert!(last.contains("more log lines"), "{last}");
    let dropped: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(dropped + lines.len() - 2, 3 * MAX_LOG_LINES, "{last}");
}

#[test]
fn a_stream_that_trickles_forever_ends_at_the_overall_deadline() {
    let w = World::new();
    // A log line every 50 ms, well within the idle timeout, never an end.
    let (host, guest) = hostile_guest(|w| loop {
        w.log("still busy")?;
        w.get_mut().flush()?;
        std::thread::sleep(Duration::from_millis(50));
    });
    let repo = w.repo.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let opts = options(Duration::from_secs(30), Duration::from_secs(1));
        let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
        let r = receive(&repo, &host, deadline, &target(), &opts, &|_| {});
        drop(host);
        let _ = tx.send(r);
    });
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the host still receives a trickling stream after 20 s");
    let e = r.unwrap_err();
    assert!(e.to_string().contains("within --max-duration (1 s)"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The guest's writes fail once the host has gone.
    guest.join().unwrap();
}

/// Replaces the `app` hook's `stage` script.
fn set_hook(w: &World, stage: &str, body: &str) {
    let p = w.dir.path().join("container/hooks/app").join(stage);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn hook_log(w: &World) -> String {
    std::fs::read_to_string(w.dir.path().join("hook.log")).unwrap_or_default()
}

fn with_app_hook(t: &Path) -> Job {
    Job::Backup {
        paths: vec![t.to_str().unwrap().into()],
        hooks: vec!["app".into()],
        allow_quiesced_stream: false,
        holes: true,
        keepalive: true,
    }
}

#[test]
fn a_post_hook_that_cannot_be_found_after_pre_runs_from_memory_not_skipped() {
    let w = World::new();
    let t = w.tree();
    let c = w.dir.path().join("container");
    let log = w.dir.path().join("hook.log");
    // As if the container went away while the application was quiesced.
    set_hook(
        &w,
        "pre",
        &format!(
            "echo pre >> {}\nmv {} {}",
            log.display(),
            c.join("hooks").display(),
            c.join("hooks.gone").display()
        ),
    );
    let (agent, got, lines) = w.backup(with_app_hook(&t));
    assert!(!c.join("hooks").exists());
    assert_eq!(hook_log(&w), "pre\npost\n", "post was skipped");
    agent.unwrap();
    got.unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("hook app post could not be run from the container")),
        "{lines:?}"
    );
}

#[test]
fn a_post_hook_that_fails_fails_the_backup() {
    let w = World::new();
    let t = w.tree();
    set_hook(&w, "post", "echo cannot resume >&2\nexit 4");
    let (agent, got, lines) = w.backup(with_app_hook(&t));
    assert!(agent.is_err());
    let e = got.unwrap_err();
    assert!(
        e.to_string().contains("hook app post failed")
            && e.to_string().contains("may not have resumed"),
        "{e}"
    );
    assert!(
        lines.iter().any(|l| l.contains("cannot resume")),
        "{lines:?}"
    );
}

#[test]
fn a_pre_hook_longer_than_the_idle_timeout_keeps_the_stream_alive() {
    let w = World::new();
    let t = w.tree();
    let log = w.dir.path().join("hook.log");
    set_hook(
        &w,
        "pre",
        &format!("sleep 4\necho pre >> {}", log.display()),
    );
    let (agent, got, _) = w.backup_idle(with_app_hook(&t), Duration::from_secs(2));
    got.unwrap();
    agent.unwrap();
    assert_eq!(hook_log(&w), "pre\npost\n");
}

#[test]
fn a_guest_sending_more_entries_than_a_catalog_may_hold_is_stopped_while_received() {
    let w = World::new();
    let (host, guest) = hostile_guest(|w| {
        for i in 0..10 {
            w.header(&crate::repo::catalog::Entry {
                path: format!("/d{i}"),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                size: 0,
                target: None,
                chunks: vec![],
                inode: None,
            })?;
        }
        w.end()
    });
    let mut opts = options(Duration::from_secs(30), Duration::from_secs(600));
    opts.catalog_limits = crate::repo::catalog::CatalogLimits {
        entries: 4,
        bytes: 1 << 20,
    };
    let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
    let e = receive(&w.repo, &host, deadline, &target(), &opts, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("more than 4 entries"), "{e}");
    opts.catalog_limits = crate::repo::catalog::CatalogLimits {
        entries: 100,
        bytes: 200,
    };
    drop(host);
    guest.join().unwrap();
    let (host, guest) = hostile_guest(|w| {
        for i in 0..10 {
            w.header(&crate::repo::catalog::Entry {
                path: format!("/d{i}"),
                kind: EntryKind::Symlink,
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                size: 0,
                target: Some("t".repeat(100)),
                chunks: vec![],
                inode: None,
            })?;
        }
        w.end()
    });
    let e = receive(&w.repo, &host, deadline, &target(), &opts, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("more than the 200"), "{e}");
    drop(host);
    guest.join().unwrap();
}

#[test]
fn without_hooks_the_agent_streams_the_tree_as_it_is() {
    let w = World::new();
    let t = w.tree();
    let tp = t.to_str().unwrap().to_string();
    let (agent, got, _) = w.backup(Job::Backup {
        paths: vec![tp.clone()],
        hooks: vec![],
        allow_quiesced_stream: false,
        holes: true,
        keepalive: true,
    });
    agent.unwrap();
    let c = got.unwrap();
    let paths: Vec<&str> = c.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            tp.clone(),
            format!("{tp}/data.db"),
            format!("{tp}/link"),
            format!("{tp}/sub"),
            format!("{tp}/sub/conf")
        ]
    );
    assert_eq!(c.file_bytes, 3_000_004);
    assert_eq!(c.find(&format!("{tp}/sub/conf")).unwrap().mode, 0o600);
    assert_eq!(
        c.find(&format!("{tp}/link")).unwrap().target.as_deref(),
        Some("data.db")
    );
    assert!(hook_log(&w).is_empty(), "a hook ran");
}

fn file_entry(path: &str, size: u64) -> crate::repo::catalog::Entry {
    crate::repo::catalog::Entry {
        path: path.into(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size,
        target: None,
        chunks: vec![],
        inode: None,
    }
}

#[test]
fn a_shrinking_file_warned_about_among_its_data_by_an_older_agent_is_backed_up() {
    // What agents deployed before the warning moved after the data send
    // for a file that shrank from 6 to 3 bytes while read.
    let w = World::new();
    let (host, guest) = hostile_guest(|w| {
        w.header(&file_entry("/srv/f", 6))?;
        w.data(b"abc")?;
        w.log("WARNING: /srv/f shrank while it was read; padded with zeros")?;
        w.data(&[0; 3])?;
        w.header(&file_entry("/srv/g", 2))?;
        w.data(b"ok")?;
        w.end()
    });
    let lines = std::sync::Mutex::new(vec![]);
    let opts = options(Duration::from_secs(30), Duration::from_secs(600));
    let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
    let c = receive(&w.repo, &host, deadline, &target(), &opts, &|l| {
        lines.lock().unwrap().push(l.to_string())
    })
    .unwrap();
    guest.join().unwrap();
    let lines = lines.into_inner().unwrap();
    assert!(
        lines.iter().any(|l| l.contains("/srv/f shrank")),
        "{lines:?}"
    );
    let mut got = vec![];
    let f = c.find("/srv/f").unwrap();
    crate::files::cat(&w.repo, &c, f, &mut got, &Default::default()).unwrap();
    assert_eq!(got, b"abc\0\0\0");
    assert_eq!(c.entries.len(), 2);
}

#[test]
fn the_agent_warns_about_a_file_that_shrank_after_its_data_and_once() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    std::fs::write(&p, b"abc").unwrap();
    // Its stat said more than is there now: two data frames' worth.
    let size = 2 * crate::agent::stream::MAX_DATA as u64 + 10;
    let mut w = FrameWriter::new(vec![]);
    w.header(&file_entry("/srv/f", size)).unwrap();
    send_content(&mut w, File::open(&p).unwrap(), &p, "/srv/f", size, false).unwrap();
    w.end().unwrap();
    let bytes = w.get_mut().clone();
    let mut r = FrameReader::new(&bytes[..], "s");
    assert!(matches!(r.next_frame().unwrap(), Frame::Header(_)));
    // What hosts before log frames among data read: the data, strictly.
    let mut v = vec![];
    r.content(size).read_to_end(&mut v).unwrap();
    assert_eq!(v.len() as u64, size);
    assert_eq!(&v[..3], b"abc");
    assert!(v[3..].iter().all(|b| *b == 0));
    match r.next_frame().unwrap() {
        Frame::Log(l) => assert!(
            l.contains("/srv/f shrank") && l.contains(&format!("{} of {size}", size - 3)),
            "{l}"
        ),
        other => panic!("{}", describe(&other)),
    }
    assert!(matches!(r.next_frame().unwrap(), Frame::End(_)));
}

#[test]
fn overlapping_paths_are_backed_up_once_with_a_note() {
    let w = World::new();
    let t = w.tree();
    let tp = t.to_str().unwrap().to_string();
    // A path below a link to a directory is not in the walk of `tp`
    // (links are not followed): walked on its own, and kept.
    std::os::unix::fs::symlink("sub", t.join("ldir")).unwrap();
    for hooks in [vec![], vec!["app".to_string()]] {
        let (agent, got, lines) = w.backup(Job::Backup {
            paths: vec![
                format!("{tp}/sub"),
                tp.clone(),
                format!("{tp}/sub/conf"),
                tp.clone(),
                format!("{tp}/ldir/conf"),
            ],
            hooks: hooks.clone(),
            allow_quiesced_stream: false,
            holes: true,
            keepalive: true,
        });
        agent.unwrap();
        let c = got.unwrap();
        let paths: Vec<&str> = c.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                tp.clone(),
                format!("{tp}/data.db"),
                format!("{tp}/ldir"),
                format!("{tp}/link"),
                format!("{tp}/sub"),
                format!("{tp}/sub/conf"),
                format!("{tp}/ldir/conf"),
            ],
            "hooks {hooks:?}"
        );
        let said = |s: &str| lines.iter().any(|l| l.contains(s));
        assert!(said(&format!("{tp} was given twice")), "{lines:?}");
        assert!(said(&format!("{tp}/sub is inside {tp},")), "{lines:?}");
        assert!(said(&format!("{tp}/sub/conf is inside {tp},")), "{lines:?}");
        assert!(!said("ldir/conf is inside"), "{lines:?}");
        assert!(!said("came a second time"), "{lines:?}");
    }
}

#[test]
fn entries_an_older_agent_sends_twice_are_received_once() {
    // An agent before it dropped overlapping --paths, given `/d /d`.
    let w = World::new();
    let (host, guest) = hostile_guest(|w| {
        for _ in 0..2 {
            w.header(&crate::repo::catalog::Entry {
                kind: EntryKind::Dir,
                mode: 0o755,
                ..file_entry("/d", 0)
            })?;
            w.header(&file_entry("/d/f", 3))?;
            w.data(b"abc")?;
        }
        w.end()
    });
    let lines = std::sync::Mutex::new(vec![]);
    let opts = options(Duration::from_secs(30), Duration::from_secs(600));
    let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
    let c = receive(&w.repo, &host, deadline, &target(), &opts, &|l| {
        lines.lock().unwrap().push(l.to_string())
    })
    .unwrap();
    guest.join().unwrap();
    let paths: Vec<&str> = c.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/d", "/d/f"]);
    assert_eq!(c.file_bytes, 3);
    let lines = lines.into_inner().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("2 entries came a second time")),
        "{lines:?}"
    );
}

mod ack;
mod links;
mod restore;
mod sparse;
