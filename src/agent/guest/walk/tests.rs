use super::*;

/// (path, content of a file) in walk order.
type Walked = Vec<(String, Option<Vec<u8>>)>;

/// Walks `p`, calling `during` with each entry's path: what it gave, and
/// what was skipped.
fn walked(p: &Path, mut during: impl FnMut(&str)) -> (Walked, Vec<(String, &'static str)>) {
    use std::io::Read;
    let (mut got, mut skipped) = (vec![], vec![]);
    walk(p, None, &mut |found| {
        match found {
            Found::Entry(e, f) => {
                during(&e.path);
                let data = f.map(|mut f| {
                    let mut v = vec![];
                    f.read_to_end(&mut v).unwrap();
                    v
                });
                got.push((e.path, data));
            }
            Found::Skipped(p, why) => skipped.push((p, why)),
        }
        Ok(())
    })
    .unwrap();
    (got, skipped)
}

#[test]
fn a_file_replaced_after_its_stat_is_not_read_through_a_link_or_as_another_file() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("f");
    let secret = d.path().join("secret");
    std::fs::write(&secret, b"root only").unwrap();
    std::fs::write(&f, b"mine").unwrap();
    let st = fstatat(None, &f, AtFlags::AT_SYMLINK_NOFOLLOW).unwrap();
    // Held, so that its inode number is not reused by "other" below.
    std::fs::hard_link(&f, d.path().join("held")).unwrap();
    let open = |st: &FileStat| open_same(None, f.as_os_str(), st, OFlag::O_NONBLOCK).unwrap();
    assert!(open(&st).is_some(), "unchanged");
    // Swapped for a link to a file the user cannot read.
    std::fs::remove_file(&f).unwrap();
    std::os::unix::fs::symlink(&secret, &f).unwrap();
    assert!(open(&st).is_none(), "read through a link");
    // Swapped for another file (renamed over it).
    std::fs::remove_file(&f).unwrap();
    std::fs::write(d.path().join("other"), b"other").unwrap();
    std::fs::rename(d.path().join("other"), &f).unwrap();
    assert!(open(&st).is_none(), "read another file");
    // A FIFO swapped in neither hangs nor is read.
    std::fs::remove_file(&f).unwrap();
    nix::unistd::mkfifo(&f, Mode::from_bits_truncate(0o600)).unwrap();
    assert!(open(&st).is_none(), "read a FIFO");
}

#[test]
fn a_directory_swapped_for_a_link_during_the_walk_is_not_followed() {
    let d = tempfile::tempdir().unwrap();
    let top = d.path().join("top");
    std::fs::create_dir_all(top.join("sub")).unwrap();
    std::fs::write(top.join("sub/a1"), b"a1").unwrap();
    std::fs::write(top.join("sub/a2"), b"mine").unwrap();
    let secret = d.path().join("etc");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("a2"), b"root only").unwrap();
    let sub = top.join("sub");
    let a1 = sub.join("a1").to_str().unwrap().to_string();
    // Once sub is listed (a1 seen), a user swaps sub for a link to etc.
    let (got, skipped) = walked(&top, |p| {
        if p == a1 {
            std::fs::rename(&sub, top.join("moved")).unwrap();
            std::os::unix::fs::symlink(&secret, &sub).unwrap();
        }
    });
    let t = top.to_str().unwrap();
    let a2 = got
        .iter()
        .find(|(p, _)| p == &format!("{t}/sub/a2"))
        .unwrap_or_else(|| panic!("{got:?} {skipped:?}"));
    assert_eq!(a2.1.as_deref(), Some(&b"mine"[..]), "read through the link");
    assert!(
        got.iter()
            .all(|(_, data)| data.as_deref() != Some(&b"root only"[..])),
        "{got:?}"
    );
}

#[test]
fn the_walk_gives_every_entry_in_name_order_and_passes_over_a_fifo() {
    let d = tempfile::tempdir().unwrap();
    let top = d.path().join("top");
    std::fs::create_dir_all(top.join("b/c")).unwrap();
    std::fs::write(top.join("a"), b"A").unwrap();
    std::fs::write(top.join("b/c/d"), b"D").unwrap();
    std::os::unix::fs::symlink("a", top.join("l")).unwrap();
    nix::unistd::mkfifo(&top.join("p"), Mode::from_bits_truncate(0o600)).unwrap();
    let (got, skipped) = walked(&top, |_| {});
    let t = top.to_str().unwrap();
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            t.to_string(),
            format!("{t}/a"),
            format!("{t}/b"),
            format!("{t}/b/c"),
            format!("{t}/b/c/d"),
            format!("{t}/l"),
        ]
    );
    assert_eq!(got[4].1.as_deref(), Some(&b"D"[..]));
    assert_eq!(skipped, [(format!("{t}/p"), "a socket, device or FIFO")]);
}

#[test]
fn names_and_link_targets_that_are_not_utf8_are_skipped_and_told_not_fatal() {
    use std::os::unix::ffi::OsStrExt;
    let d = tempfile::tempdir().unwrap();
    let top = d.path().join("top");
    std::fs::create_dir(&top).unwrap();
    let raw = |b: &[u8]| top.join(OsStr::from_bytes(b));
    std::fs::write(top.join("a"), b"a").unwrap();
    std::fs::write(raw(b"bad\xff"), b"x").unwrap();
    std::fs::create_dir(raw(b"dir\xfe")).unwrap();
    std::fs::write(raw(b"dir\xfe").join("inner"), b"y").unwrap();
    std::os::unix::fs::symlink(OsStr::from_bytes(b"t\xfd"), top.join("link")).unwrap();
    std::fs::write(top.join("z\\x41"), b"z").unwrap();
    let (got, skipped) = walked(&top, |_| {});
    let t = top.to_str().unwrap();
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [t.to_string(), format!("{t}/a"), format!("{t}/z\\x41")]
    );
    assert_eq!(
        skipped,
        [
            (format!("{t}/bad\\xff"), NOT_UTF8),
            (format!("{t}/dir\\xfe"), NOT_UTF8_DIR),
            (format!("{t}/link"), LINK_NOT_UTF8),
        ]
    );
    // A real backslash is told escaped, unlike an invalid byte.
    assert_eq!(escaped(&top.join("z\\x41")), format!("{t}/z\\\\x41"));
}

#[test]
fn a_kernel_filesystem_directory_is_kept_and_what_is_in_it_passed_over_and_told() {
    // /proc/sys/kernel: files whose reads describe the running kernel.
    let (got, skipped) = walked(Path::new("/proc/sys/kernel"), |_| {});
    assert_eq!(
        got.len(),
        1,
        "only the directory itself: {:?}",
        &got[..got.len().min(5)]
    );
    assert_eq!(got[0].0, "/proc/sys/kernel");
    assert_eq!(skipped, vec![("/proc/sys/kernel".to_string(), PSEUDO_FS)]);
    // A real filesystem is walked as before.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), b"x").unwrap();
    let (got, skipped) = walked(d.path(), |_| {});
    assert_eq!(got.len(), 2);
    assert!(skipped.is_empty());
}
