use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use super::*;
use crate::error::ErrorKind;

/// A uid that owns nothing here.
const STRANGER: u32 = 4242;

fn attr(mode: u32, uid: u32, gid: u32) -> Attr {
    Attr {
        mode: libc::S_IFSOCK | mode,
        uid,
        gid,
        acl: None,
    }
}

fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
    Caller {
        uid,
        gid,
        groups: groups.to_vec(),
    }
}

fn euid() -> u32 {
    // SAFETY: cannot fail.
    unsafe { libc::geteuid() }
}

fn egid() -> u32 {
    // SAFETY: cannot fail.
    unsafe { libc::getegid() }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory every user may search (a tempdir is 0700).
fn public_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    chmod(d.path(), 0o755);
    d
}

fn listen(p: &Path, mode: u32) -> UnixListener {
    let l = UnixListener::bind(p).unwrap();
    chmod(p, mode);
    l
}

/// A file owned by a caller that is not root.
fn give_to_a_caller(p: &Path) -> Caller {
    assert_eq!(euid(), 0, "run as root (to chown)");
    std::os::unix::fs::lchown(p, Some(STRANGER), None).unwrap();
    caller(STRANGER, STRANGER, &[])
}

fn refused(r: Result<Option<PinnedSocket>>) -> String {
    let e = r.expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::NotPermitted, "{e}");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    msg
}

#[test]
fn only_the_class_that_applies_decides_owner_then_group_then_others() {
    let (owner, group) = (1000, 2000);
    // The owner gets the owner's bits, even when they deny what the
    // group's and others' would grant.
    let me = caller(owner, owner, &[]);
    assert!(me.permits(&attr(0o600, owner, group), WRITE));
    assert!(!me.permits(&attr(0o077, owner, group), WRITE));
    assert!(!me.permits(&attr(0o400, owner, group), WRITE));
    // A member of the file's group, as primary or supplementary group.
    for member in [caller(1001, group, &[]), caller(1001, 1001, &[7, group])] {
        assert!(member.permits(&attr(0o660, owner, group), WRITE));
        assert!(!member.permits(&attr(0o606, owner, group), WRITE));
        assert!(!member.permits(&attr(0o640, owner, group), WRITE));
    }
    // Anyone else gets the others' bits.
    let other = caller(1001, 1001, &[7]);
    assert!(!other.permits(&attr(0o660, owner, group), WRITE));
    assert!(other.permits(&attr(0o602, owner, group), WRITE));
    // Several bits are all needed: a directory to create in.
    assert!(!other.permits(&attr(0o702, owner, group), WRITE | SEARCH));
    assert!(other.permits(&attr(0o703, owner, group), WRITE | SEARCH));
    // Root may do all.
    assert!(Caller::root().permits(&attr(0, owner, group), READ | WRITE | SEARCH));
}

#[test]
fn a_caller_may_name_a_socket_it_could_connect_to_and_no_other() {
    let d = public_dir();
    let own = d.path().join("own.sock");
    let _l1 = listen(&own, 0o600);
    let me = give_to_a_caller(&own);
    assert!(socket(&me, "qmp", &own).unwrap().is_some());

    // Root's, 0600.
    let theirs = d.path().join("theirs.sock");
    let _l2 = listen(&theirs, 0o600);
    let msg = refused(socket(&me, "qmp", &theirs));
    assert!(
        msg.contains(&format!(
            "qmp: uid {} may not connect to {}",
            me.uid,
            theirs.display()
        )),
        "{msg}"
    );
    // Group members may when the group may write.
    chmod(&theirs, 0o660);
    let member = caller(me.uid, me.gid, &[egid()]);
    assert!(socket(&member, "qmp", &theirs).unwrap().is_some());
    refused(socket(&me, "qmp", &theirs));
    chmod(&theirs, 0o640);
    refused(socket(&member, "qmp", &theirs));
    // Others when others may write: read permission is not enough.
    chmod(&theirs, 0o604);
    refused(socket(&me, "qmp", &theirs));
    chmod(&theirs, 0o602);
    assert!(socket(&me, "qmp", &theirs).unwrap().is_some());
    // Root is not checked, and gets the path as given.
    chmod(&theirs, 0);
    assert!(socket(&Caller::root(), "qmp", &theirs).unwrap().is_none());
}

#[test]
fn a_directory_on_the_way_that_the_caller_may_not_search_refuses() {
    let d = public_dir();
    let private = d.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let sock = private.join("qmp.sock");
    let _l = listen(&sock, 0o666);
    let me = caller(STRANGER, STRANGER, &[]);
    // Read without search is not enough; search without read is.
    for (mode, ok) in [(0o700, false), (0o744, false), (0o711, true)] {
        chmod(&private, mode);
        let r = socket(&me, "agent", &sock);
        if ok {
            assert!(r.unwrap().is_some(), "{mode:o}");
        } else {
            let msg = refused(r);
            assert!(
                msg.contains(&format!("no search permission on {}", private.display())),
                "{mode:o}: {msg}"
            );
            assert!(
                msg.starts_with("agent: uid 4242 may not connect to"),
                "{msg}"
            );
        }
    }
    // A `..` is looked up in the directory too.
    chmod(&private, 0o700);
    let around = private.join("..").join("private").join("qmp.sock");
    refused(socket(&me, "agent", &around));
}

#[test]
fn a_symlink_to_a_socket_the_caller_may_not_use_is_refused_and_the_reply_says_where_it_leads() {
    let d = public_dir();
    let root_only = d.path().join("root.sock");
    let _l = listen(&root_only, 0o600);
    let mine = public_dir();
    let link = mine.path().join("qmp.sock");
    std::os::unix::fs::symlink(&root_only, &link).unwrap();
    let me = caller(STRANGER, STRANGER, &[]);
    let msg = refused(socket(&me, "qmp", &link));
    assert!(
        msg.contains(&format!("may not connect to {}", link.display())),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("leads to {}", root_only.display())),
        "{msg}"
    );
    // A relative link, through a private directory, is followed as the
    // caller would: the directory must be searchable.
    let hidden = d.path().join("hidden");
    std::fs::create_dir(&hidden).unwrap();
    chmod(&hidden, 0o700);
    let inside = hidden.join("open.sock");
    let _l2 = listen(&inside, 0o666);
    let rel = mine.path().join("rel.sock");
    std::os::unix::fs::symlink(
        Path::new("..")
            .join(d.path().file_name().unwrap())
            .join("hidden/open.sock"),
        &rel,
    )
    .unwrap();
    let msg = refused(socket(&me, "qmp", &rel));
    assert!(msg.contains("no search permission on"), "{msg}");
    chmod(&hidden, 0o711);
    assert!(socket(&me, "qmp", &rel).unwrap().is_some());
    // A loop ends in an error, not a hang.
    let a = mine.path().join("a");
    std::os::unix::fs::symlink(&a, &a).unwrap();
    let e = socket(&me, "qmp", &a).err().unwrap();
    assert!(e.to_string().contains("qmp"), "{e}");
}

#[test]
fn a_pinned_socket_is_the_one_reached_after_its_path_is_swapped_for_a_link() {
    let d = public_dir();
    let path = d.path().join("qmp.sock");
    let checked = listen(&path, 0o666);
    let root_only = d.path().join("root.sock");
    let other = listen(&root_only, 0o600);
    let me = caller(STRANGER, STRANGER, &[]);
    let pin = socket(&me, "qmp", &path).unwrap().unwrap();
    // Swapped after the check, before the connect.
    let moved = d.path().join("moved.sock");
    std::fs::rename(&path, &moved).unwrap();
    std::os::unix::fs::symlink(&root_only, &path).unwrap();
    let _c = std::os::unix::net::UnixStream::connect(pin.path()).unwrap();
    checked.set_nonblocking(true).unwrap();
    other.set_nonblocking(true).unwrap();
    assert!(checked.accept().is_ok(), "the checked socket was reached");
    assert!(other.accept().is_err(), "the root-only one was not");
    // Messages name the socket by a path, not by a descriptor.
    assert_eq!(shown(&pin.path()), moved);
    assert_eq!(shown(&path), path);
}

#[test]
fn a_relative_path_or_a_file_that_is_not_a_socket_is_an_invalid_request() {
    let d = public_dir();
    let me = caller(STRANGER, STRANGER, &[]);
    let e = socket(&me, "qmp", Path::new("qmp.sock")).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let file = d.path().join("file");
    std::fs::write(&file, b"").unwrap();
    chmod(&file, 0o666);
    let e = socket(&me, "qmp", &file).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("not a socket"), "{e}");
    let e = socket(&me, "qmp", &d.path().join("missing")).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn a_relocation_target_must_be_a_directory_the_caller_may_create_in() {
    let d = public_dir();
    let me = caller(STRANGER, STRANGER, &[]);
    let to = d.path().join("primary");
    std::fs::create_dir(&to).unwrap();
    let e = relocation_target(&me, &to, "pc").err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotPermitted, "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "relocation target: uid 4242 may not create pc in {}",
            to.display()
        )),
        "{e}"
    );
    chmod(&to, 0o777);
    // An existing entry: the daemon would empty its files, so the caller
    // must be able to write in it (root's own leftover, 0700, is not).
    let old = to.join("old");
    std::fs::create_dir(&old).unwrap();
    chmod(&old, 0o700);
    let e = relocation_target(&me, &to, "old").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotPermitted, "{e}");
    assert!(
        e.to_string().contains(&format!(
            "{} exists and uid 4242 may not write in it",
            old.display()
        )),
        "{e}"
    );
    chmod(&old, 0o777);
    assert_eq!(relocation_target(&me, &to, "old").unwrap(), to);
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&to, &link).unwrap();
    assert_eq!(relocation_target(&me, &link, "pc").unwrap(), to);
    // Root's path is taken as given.
    assert_eq!(
        relocation_target(&Caller::root(), &link, "pc").unwrap(),
        link
    );
    // In a sticky directory, another user's entry may not be replaced.
    chmod(&to, 0o1777);
    std::fs::create_dir(to.join("pc")).unwrap();
    chmod(&to.join("pc"), 0o777);
    let e = relocation_target(&me, &to, "pc").err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotPermitted, "{e}");
    assert!(e.to_string().contains("sticky"), "{e}");
    assert_eq!(relocation_target(&me, &to, "other").unwrap(), to);
    // A search-only parent is enough, a private one is not.
    chmod(d.path(), 0o711);
    assert_eq!(relocation_target(&me, &to, "other").unwrap(), to);
    chmod(d.path(), 0o700);
    let e = relocation_target(&me, &to, "other").err().unwrap();
    assert!(e.to_string().contains("no search permission"), "{e}");
}

#[test]
fn a_relocation_over_existing_target_files_needs_them_owned_by_the_caller() {
    let d = public_dir();
    let me = caller(STRANGER, STRANGER, &[]);
    let to = d.path().join("primary");
    std::fs::create_dir(&to).unwrap();
    chmod(&to, 0o777);
    let pc = to.join("pc");
    std::fs::create_dir(&pc).unwrap();
    chmod(&pc, 0o777);
    // Files the caller does not own: --force would have root empty them.
    for name in ["disk0.raw", "vm.json"] {
        let f = pc.join(name);
        std::fs::write(&f, b"root's").unwrap();
        let e = relocation_target(&me, &to, "pc").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotPermitted, "{e}");
        assert!(
            e.to_string()
                .contains(&format!("{} exists, owned by uid 0", f.display())),
            "{e}"
        );
        std::os::unix::fs::lchown(&f, Some(STRANGER), None).unwrap();
    }
    // Its own files, and files recoverfs never touches, are fine.
    std::fs::write(pc.join("notes.txt"), b"root's").unwrap();
    assert_eq!(relocation_target(&me, &to, "pc").unwrap(), to);
    // Root may name anything.
    std::os::unix::fs::lchown(pc.join("disk0.raw"), Some(0), None).unwrap();
    assert_eq!(relocation_target(&Caller::root(), &to, "pc").unwrap(), to);
}

#[test]
fn a_peer_is_known_by_the_credentials_it_connected_with() {
    assert_eq!(euid(), 0, "run as root (to set groups)");
    // Made on a thread whose groups are not the process's (raw system
    // calls change only the calling thread): the kernel's record of the
    // connecting side counts, not what `/proc/PID/status` says now.
    let (c, expected) = std::thread::spawn(|| {
        let groups: [libc::gid_t; 2] = [4243, 7];
        // SAFETY: plain system calls on this thread's credentials.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 2, groups.as_ptr()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, 4242, 4242, 4242), 0);
        }
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        (Caller::of(&a).unwrap(), caller(0, 4242, &groups))
    })
    .join()
    .unwrap();
    let mut got = c.clone();
    got.groups.sort();
    let mut want = expected;
    want.groups.sort();
    assert_eq!(got, want);
}

/// `system.posix_acl_access` bytes of `entries` (tag, perm, id).
fn acl_blob(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut b = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        b.extend(tag.to_le_bytes());
        b.extend(perm.to_le_bytes());
        b.extend(id.to_le_bytes());
    }
    b
}

/// `user::rwx, group::r-x, group:OPS:rwx, mask::rwx, other::---`, as
/// `setfacl -m g:ops:rwx,g::rx` leaves a socket whose mode then reads 0770.
fn ops_acl(ops: u32) -> Vec<u8> {
    acl_blob(&[
        (ACL_USER_OBJ, 7, u32::MAX),
        (ACL_GROUP_OBJ, 5, u32::MAX),
        (ACL_GROUP, 7, ops),
        (ACL_MASK, 7, u32::MAX),
        (ACL_OTHER, 0, u32::MAX),
    ])
}

#[test]
fn an_acl_decides_as_the_kernel_does_owner_named_user_groups_masked_then_others() {
    let (owner, group, ops, named) = (1000, 2000, 3000, 1002);
    let mut a = attr(0o770, owner, group);
    a.acl = parse_acl(&acl_blob(&[
        (ACL_USER_OBJ, 6, u32::MAX),
        (ACL_USER, 7, named),
        (ACL_GROUP_OBJ, 5, u32::MAX),
        (ACL_GROUP, 7, ops),
        (ACL_MASK, 5, u32::MAX),
        (ACL_OTHER, 2, u32::MAX),
    ]));
    assert!(a.acl.is_some());
    // The owner's entry, unmasked.
    assert!(caller(owner, owner, &[]).permits(&a, WRITE));
    // A named user's entry, masked (r-x): no write.
    assert!(!caller(named, 1, &[]).permits(&a, WRITE));
    assert!(caller(named, 1, &[]).permits(&a, READ));
    // Group entries, masked: the mode's group bits (7) are the mask's
    // place and admit nothing on their own.
    assert!(!caller(1001, group, &[]).permits(&a, WRITE));
    assert!(!caller(1001, 1001, &[ops]).permits(&a, WRITE));
    assert!(caller(1001, 1001, &[ops]).permits(&a, READ | SEARCH));
    // A caller in a group entry never falls back to the others' entry.
    assert!(caller(1001, group, &[]).permits(&a, READ));
    assert!(caller(1001, 1001, &[]).permits(&a, WRITE));
    assert!(!caller(1001, 1001, &[]).permits(&a, READ));
    // Not an ACL: nothing granted by it.
    assert_eq!(parse_acl(&[1, 0, 0, 0]), None);
    assert_eq!(parse_acl(&[2, 0, 0, 0, 1]), None);
}

#[test]
fn a_socket_whose_acl_refuses_its_owning_group_write_is_refused_to_a_member_the_mode_bits_admit() {
    let d = public_dir();
    let sock = d.path().join("acl.sock");
    let _l = listen(&sock, 0o770);
    let me = give_to_a_caller(&sock);
    let (group, ops) = (4343, 4344);
    std::os::unix::fs::lchown(&sock, Some(0), Some(group)).unwrap();
    let c = CString::new(sock.as_os_str().as_bytes()).unwrap();
    let blob = ops_acl(ops);
    // SAFETY: valid C strings and a buffer of the length given.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            blob.as_ptr().cast(),
            blob.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        m.permissions().mode() & 0o777,
        0o770,
        "the mode shows the mask"
    );
    // In the owning group: the mode's group bits say rwx, the ACL r-x.
    let member = caller(me.uid, me.gid, &[group]);
    let msg = refused(socket(&member, "qmp", &sock));
    assert!(msg.contains("may not connect"), "{msg}");
    // In the named group the ACL admits.
    let op = caller(me.uid, me.gid, &[ops]);
    assert!(socket(&op, "qmp", &sock).unwrap().is_some());
}
