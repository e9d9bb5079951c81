use super::mount_point::mount_point_state;
use super::*;

#[test]
fn a_socket_path_that_is_not_a_socket_is_refused_and_left_alone_and_a_dead_socket_is_replaced() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("site-a.key");
    std::fs::write(&key, b"the only copy of a key").unwrap();
    let e = check_socket(&key).unwrap_err().to_string();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&key).unwrap(), b"the only copy of a key");
    // A socket nobody serves is stale; one that answers is in use.
    let dead = d.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    check_socket(&dead).unwrap();
    assert!(!dead.exists());
    let live = d.path().join("live.sock");
    let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let e = check_socket(&live).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Busy, "{e}");
}

#[test]
fn the_default_link_names_the_first_live_daemon_and_a_stopping_daemon_removes_only_its_own() {
    let d = tempfile::tempdir().unwrap();
    let link = d.path().join("default.sock");
    let (a, b) = (d.path().join("a.sock"), d.path().join("b.sock"));
    let la = std::os::unix::net::UnixListener::bind(&a).unwrap();
    let _lb = std::os::unix::net::UnixListener::bind(&b).unwrap();
    assert_eq!(publish_default_socket(&link, &a), Some(link.clone()));
    // A second daemon leaves a live daemon's link alone.
    assert_eq!(publish_default_socket(&link, &b), None);
    assert_eq!(std::fs::read_link(&link).unwrap(), a);
    // Once `a` stops answering, the next daemon takes the link...
    drop(la);
    assert_eq!(publish_default_socket(&link, &b), Some(link.clone()));
    // ...and `a`'s shutdown must not remove it from under `b`.
    unpublish_default_socket(&link, &a);
    assert_eq!(std::fs::read_link(&link).unwrap(), b);
    unpublish_default_socket(&link, &b);
    assert!(std::fs::symlink_metadata(&link).is_err());
}

#[test]
fn a_daemon_restarted_on_the_same_socket_takes_back_the_link_it_left() {
    let d = tempfile::tempdir().unwrap();
    let link = d.path().join("default.sock");
    let a = d.path().join("a.sock");
    // The link a killed run left; the new run listens before publishing.
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let _la = std::os::unix::net::UnixListener::bind(&a).unwrap();
    assert_eq!(publish_default_socket(&link, &a), Some(link.clone()));
    assert_eq!(std::fs::read_link(&link).unwrap(), a);
}

#[test]
fn missing_or_non_empty_mount_points_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let e = check_mount_point(&d.path().join("nope")).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    std::fs::write(d.path().join("f"), b"x").unwrap();
    let e = check_mount_point(d.path()).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
}

#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let get = || {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: fills the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
        l
    };
    // Only a little under the hard limit: other tests run meanwhile.
    let mut l = get();
    l.rlim_cur = l.rlim_max - 1;
    // SAFETY: reads the struct we pass.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) }, 0);
    raise_open_files_limit();
    let l = get();
    assert_eq!(l.rlim_cur, l.rlim_max);
}

#[test]
fn a_mounted_directory_is_busy() {
    // / is always a mount point.
    let e = mount_point_state(Path::new("/")).unwrap_err();
    assert!(e.to_string().contains("busy"), "{e}");
}

#[test]
fn a_socket_nobody_answers_is_removed() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
    check_socket(&p).unwrap();
    assert!(!p.exists());
    let _live = std::os::unix::net::UnixListener::bind(&p).unwrap();
    assert!(check_socket(&p)
        .unwrap_err()
        .to_string()
        .contains("already served"));
}
