//! Hard links: recorded in the backup, restored as links to one file by
//! `files restore` and by `agent-restore` (copies where no link can be
//! made, and for backups that did not record them).

use super::*;
use crate::repo::catalog::{Catalog, Entry};
use std::sync::atomic::AtomicU64;

/// `/srv/l/a`, its links `b` and `sub/c`, and `solo` (one link).
fn linked_tree(w: &World) -> std::path::PathBuf {
    let t = w.dir.path().join("srv/l");
    std::fs::create_dir_all(t.join("sub")).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(t.join("a"), &data).unwrap();
    std::fs::hard_link(t.join("a"), t.join("b")).unwrap();
    std::fs::hard_link(t.join("a"), t.join("sub/c")).unwrap();
    std::fs::write(t.join("solo"), b"one").unwrap();
    t
}

fn backed_up(w: &World, t: &Path) -> Catalog {
    let (agent, got, _) = w.backup(Job::Backup {
        paths: vec![t.to_str().unwrap().into()],
        hooks: vec![],
        allow_quiesced_stream: false,
        holes: true,
        keepalive: true,
    });
    agent.unwrap();
    w.repo.publish_catalog(got.unwrap()).unwrap()
}

fn ino(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino())
}

/// The restored `a`, `b`, `sub/c` are one file with the original's bytes.
fn assert_linked(t: &Path, r: &Path) {
    let want = std::fs::read(t.join("a")).unwrap();
    for f in ["a", "b", "sub/c"] {
        assert!(std::fs::read(r.join(f)).unwrap() == want, "{f}");
        assert_eq!(ino(&r.join(f)), ino(&r.join("a")), "{f} is not a link to a");
    }
    assert_eq!(std::fs::metadata(r.join("a")).unwrap().nlink(), 3);
    assert_eq!(std::fs::metadata(r.join("solo")).unwrap().nlink(), 1);
}

#[test]
fn hard_links_are_recorded_and_files_restore_makes_them_links_again() {
    let w = World::new();
    let t = linked_tree(&w);
    let c = backed_up(&w, &t);
    let inode = |f: &str| c.find(&format!("{}/{f}", t.display())).unwrap().inode;
    let a = inode("a").expect("the inode of a file with links is recorded");
    assert_eq!(
        (a.dev, a.ino, a.nlink),
        (ino(&t.join("a")).0, ino(&t.join("a")).1, 3)
    );
    assert_eq!(inode("b"), Some(a));
    assert_eq!(inode("sub/c"), Some(a));
    assert_eq!(inode("solo"), None);
    let to = w.dir.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let sel = crate::files::select(&c, t.to_str().unwrap()).unwrap();
    crate::files::restore(&w.repo, &c, &sel, &to, &Default::default()).unwrap();
    assert_linked(&t, &to.join(t.strip_prefix("/").unwrap()));
}

/// A tmpfs mounted at `p` until dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mount_tmpfs(p: &Path) -> Unmount {
    nix::mount::mount(
        Some("tmpfs"),
        p,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )
    .expect("mount tmpfs (root needed)");
    Unmount(p.to_path_buf())
}

#[test]
fn links_into_another_filesystem_and_of_older_backups_restore_as_copies() {
    let w = World::new();
    let t = linked_tree(&w);
    let c = backed_up(&w, &t);
    let to = w.dir.path().join("to");
    let r = to.join(t.strip_prefix("/").unwrap());
    // `sub` is a mount of its own below --to: `sub/c` cannot be a link.
    std::fs::create_dir_all(r.join("sub")).unwrap();
    let _unmount = mount_tmpfs(&r.join("sub"));
    let sel = crate::files::select(&c, t.to_str().unwrap()).unwrap();
    crate::files::restore(&w.repo, &c, &sel, &to, &Default::default()).unwrap();
    let want = std::fs::read(t.join("a")).unwrap();
    assert!(std::fs::read(r.join("sub/c")).unwrap() == want);
    assert_ne!(ino(&r.join("sub/c")), ino(&r.join("a")));
    assert_eq!(ino(&r.join("b")), ino(&r.join("a")));
    // A backup from before inodes were recorded: copies, as before.
    let mut old = c.clone();
    old.entries.iter_mut().for_each(|e| e.inode = None);
    let to2 = w.dir.path().join("to2");
    std::fs::create_dir(&to2).unwrap();
    let sel = crate::files::select(&old, t.to_str().unwrap()).unwrap();
    crate::files::restore(&w.repo, &old, &sel, &to2, &Default::default()).unwrap();
    let r2 = to2.join(t.strip_prefix("/").unwrap());
    assert!(std::fs::read(r2.join("b")).unwrap() == want);
    assert_ne!(ino(&r2.join("b")), ino(&r2.join("a")));
}

/// `agent-restore`'s host side against the agent's restore job over a
/// socket pair; the agent's result and log lines.
fn agent_restore(w: &World, c: &Catalog, entries: &[&Entry], to: &Path) -> Vec<String> {
    let (host, agent) = w.spawn_agent(Job::Restore {
        to: Some(to.to_str().unwrap().into()),
    });
    let lines = std::sync::Mutex::new(vec![]);
    let deadline = Deadline::start(Duration::from_secs(30), Duration::from_secs(600));
    crate::agent::restore::send(
        &w.repo,
        &host,
        deadline,
        c,
        entries,
        &AtomicU64::new(0),
        &|l| lines.lock().unwrap().push(l.to_string()),
    )
    .unwrap();
    agent.join().unwrap().unwrap();
    lines.into_inner().unwrap()
}

#[test]
fn agent_restore_makes_hard_links_again_in_the_guest() {
    let w = World::new();
    let t = linked_tree(&w);
    let c = backed_up(&w, &t);
    let sel = crate::files::select(&c, t.to_str().unwrap()).unwrap();
    let to = w.dir.path().join("guest-to");
    agent_restore(&w, &c, &sel, &to);
    assert_linked(&t, &to.join(t.strip_prefix("/").unwrap()));
    // A file changed between the reads of its links: each as read, apart.
    let mut changed = c.clone();
    let b = changed
        .entries
        .iter_mut()
        .find(|e| e.path.ends_with("/l/b"))
        .unwrap();
    b.mtime += 1;
    let sel = crate::files::select(&changed, t.to_str().unwrap()).unwrap();
    let to = w.dir.path().join("guest-to2");
    let lines = agent_restore(&w, &changed, &sel, &to);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("changed between their reads")),
        "{lines:?}"
    );
    let r = to.join(t.strip_prefix("/").unwrap());
    assert_ne!(ino(&r.join("b")), ino(&r.join("a")));
    assert_eq!(ino(&r.join("sub/c")), ino(&r.join("a")));
    assert!(std::fs::read(r.join("b")).unwrap() == std::fs::read(t.join("a")).unwrap());
    // `sub` another filesystem in the guest: `sub/c` a copy, said.
    let to = w.dir.path().join("guest-to3");
    let r = to.join(t.strip_prefix("/").unwrap());
    std::fs::create_dir_all(r.join("sub")).unwrap();
    let _unmount = mount_tmpfs(&r.join("sub"));
    let sel = crate::files::select(&c, t.to_str().unwrap()).unwrap();
    let lines = agent_restore(&w, &c, &sel, &to);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("restored as a separate copy")),
        "{lines:?}"
    );
    assert_ne!(ino(&r.join("sub/c")), ino(&r.join("a")));
    assert_eq!(ino(&r.join("b")), ino(&r.join("a")));
    assert!(std::fs::read(r.join("sub/c")).unwrap() == std::fs::read(t.join("a")).unwrap());
}
