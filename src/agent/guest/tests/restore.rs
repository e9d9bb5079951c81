//! The agent's restore job in the guest: files written whole, never
//! through a link a user planted.

use super::*;

/// Runs the agent's restore job under `to`, the host sending `files`
/// (path, content); the agent's result and log lines.
fn agent_restore(w: &World, to: &Path, files: &[(&str, &[u8])]) -> (Result<()>, Vec<String>) {
    let (host, agent) = w.spawn_agent(Job::Restore {
        to: Some(to.to_str().unwrap().into()),
    });
    let mut fr = FrameReader::new(host.try_clone().unwrap(), "the agent's stream");
    assert!(matches!(fr.next_frame().unwrap(), Frame::Hello(_)));
    let mut fw = FrameWriter::new(host.try_clone().unwrap());
    // The agent may stop early (that is what some tests want): then a
    // write fails, and its answer is read below.
    let sent = files.iter().try_for_each(|(p, data)| {
        let e = crate::repo::catalog::Entry {
            path: p.to_string(),
            kind: EntryKind::File,
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            mtime_nsec: 0,
            size: data.len() as u64,
            target: None,
            chunks: vec![],
            inode: None,
        };
        fw.header(&e)?;
        fw.data(data)
    });
    let _ = sent.and_then(|()| fw.end());
    let mut lines = vec![];
    loop {
        match fr.next_frame() {
            Ok(Frame::Log(l)) => lines.push(l),
            Ok(Frame::Error(m)) => {
                lines.push(m);
                break;
            }
            Ok(_) | Err(_) => break,
        }
    }
    let _ = (&host).write_all(b"A");
    (agent.join().unwrap(), lines)
}

/// A symbolic link `link` -> `target` owned by an ordinary user.
fn users_link(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
    std::os::unix::fs::lchown(link, Some(65534), Some(65534)).unwrap();
}

#[test]
fn agent_restore_refuses_to_write_through_a_parent_a_user_replaced_by_a_link() {
    let w = World::new();
    let to = w.dir.path().join("restored");
    let outside = w.dir.path().join("outside");
    std::fs::create_dir_all(&to).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    users_link(&outside, &to.join("srv"));
    let (agent, lines) = agent_restore(&w, &to, &[("/srv/app/f", b"restored")]);
    let e = agent.unwrap_err();
    assert!(
        e.to_string().contains("refusing to restore through it"),
        "{e}"
    );
    assert!(lines.iter().any(|l| l.contains("refusing")), "{lines:?}");
    assert!(!outside.join("app").exists(), "written through the link");
}

#[test]
fn agent_restore_does_not_write_through_a_link_planted_at_its_temp_name() {
    let w = World::new();
    let to = w.dir.path().join("restored");
    std::fs::create_dir_all(to.join("srv")).unwrap();
    let victim = w.dir.path().join("victim");
    std::fs::write(&victim, b"secret").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tmp = to.join(format!("srv/.f.recoverfs-restore.{}", std::process::id()));
    users_link(&victim, &tmp);
    let (agent, lines) = agent_restore(
        &w,
        &to,
        &[("/srv/f", b"restored"), ("/srv/new/sub/g", b"made")],
    );
    agent.unwrap();
    assert!(
        lines.iter().any(|l| l.contains("restored 2 entries")),
        "{lines:?}"
    );
    assert_eq!(std::fs::read(to.join("srv/new/sub/g")).unwrap(), b"made");
    assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
    let vm = std::fs::metadata(&victim).unwrap();
    assert_eq!(
        vm.permissions().mode() & 0o7777,
        0o600,
        "the victim's mode changed"
    );
    let f = to.join("srv/f");
    assert!(std::fs::symlink_metadata(&f).unwrap().is_file());
    assert_eq!(std::fs::read(&f).unwrap(), b"restored");
    assert_eq!(std::fs::metadata(&f).unwrap().mtime(), 1_700_000_000);
}

#[test]
fn agent_restore_follows_a_link_only_root_could_have_made() {
    // As /lib -> usr/lib: root's link, in a directory only root can change.
    assert!(nix::unistd::Uid::effective().is_root(), "run as root");
    let w = World::new();
    let to = w.dir.path().join("restored");
    let real = w.dir.path().join("usr-srv");
    std::fs::create_dir_all(&to).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, to.join("srv")).unwrap();
    let (agent, lines) = agent_restore(&w, &to, &[("/srv/f", b"restored")]);
    agent.unwrap();
    assert!(lines.iter().any(|l| l.contains("restored 1")), "{lines:?}");
    assert_eq!(std::fs::read(real.join("f")).unwrap(), b"restored");
}
