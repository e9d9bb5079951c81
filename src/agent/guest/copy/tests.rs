//! The agent's copy on a real tmpfs (no reflinks, a size limit).

use super::*;

use crate::testutil::Tmpfs;

fn copies(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(PREFIX))
        .collect()
}

#[test]
fn the_copy_holds_the_files_as_they_were_and_goes_away_and_too_little_space_is_refused_up_front() {
    let fs = Tmpfs::new("4m");
    let app = fs.path.join("app");
    std::fs::create_dir_all(app.join("sub")).unwrap();
    std::fs::write(app.join("db"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(app.join("sub/conf"), b"x=1\n").unwrap();
    std::os::unix::fs::symlink("db", app.join("link")).unwrap();
    // A copy directory a killed agent left behind.
    std::fs::create_dir(fs.path.join(format!("{PREFIX}999999999"))).unwrap();
    let paths = vec![app.to_str().unwrap().to_string()];

    let p = match plan(&paths) {
        Ok(p) => p,
        Err(PlanError::NoSpace(e) | PlanError::Other(e)) => panic!("{e}"),
    };
    assert!(!p.reflink, "tmpfs has no reflinks");
    // What the files take: 1 MiB and a page.
    assert_eq!(p.bytes, (1 << 20) + 4096);
    let mine = format!("{PREFIX}{}", std::process::id());
    assert_eq!(
        copies(&fs.path),
        [mine],
        "the stale copy is gone, ours is there"
    );
    let staged = p.copy().unwrap();
    // The application changes its files after the copy.
    std::fs::write(app.join("db"), vec![9u8; 1 << 20]).unwrap();
    std::fs::write(app.join("sub/new"), b"late").unwrap();
    let a = app.to_str().unwrap();
    let got: Vec<(String, Option<Vec<u8>>)> = staged
        .entries
        .iter()
        .map(|(e, src)| {
            (
                e.path.clone(),
                src.as_ref().map(|s| std::fs::read(s).unwrap()),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (a.to_string(), None),
            (format!("{a}/db"), Some(vec![7u8; 1 << 20])),
            (format!("{a}/link"), None),
            (format!("{a}/sub"), None),
            (format!("{a}/sub/conf"), Some(b"x=1\n".to_vec())),
        ]
    );
    assert_eq!(staged.entries[2].0.target.as_deref(), Some("db"));
    drop(p);
    assert_eq!(copies(&fs.path), Vec::<String>::new());

    // 2.5 MiB of files on a 4 MiB tmpfs: no room for a copy.
    std::fs::write(app.join("big"), vec![1u8; 1_500_000]).unwrap();
    match plan(&paths) {
        Err(PlanError::NoSpace(e)) => {
            let m = e.to_string();
            assert!(
                m.contains("not enough free space") && m.contains("--allow-quiesced-stream"),
                "{m}"
            );
        }
        Ok(_) => panic!("planned a copy without the space for it"),
        Err(PlanError::Other(e)) => panic!("{e}"),
    }
    assert_eq!(copies(&fs.path), Vec::<String>::new(), "left on failure");
}

#[test]
fn a_sparse_file_is_sized_by_what_it_takes_and_copied_with_its_holes() {
    use std::os::unix::fs::FileExt;
    let fs = Tmpfs::new("4m");
    let app = fs.path.join("app");
    std::fs::create_dir_all(&app).unwrap();
    // 64 MiB on a 4 MiB filesystem: 8 KiB of data, the rest holes.
    let f = File::create(app.join("disk.img")).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    drop(f);
    let paths = vec![app.to_str().unwrap().to_string()];
    let p = match plan(&paths) {
        Ok(p) => p,
        Err(PlanError::NoSpace(e) | PlanError::Other(e)) => panic!("{e}"),
    };
    assert_eq!(p.bytes, 8192);
    let staged = p.copy().unwrap();
    let src = staged.entries[1].1.as_ref().unwrap();
    let m = std::fs::metadata(src).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(m.blocks() * 512 <= 8192, "{} blocks", m.blocks());
    let got = std::fs::read(src).unwrap();
    assert_eq!(&got[..4], b"head");
    assert_eq!(&got[(64 << 20) - 4..], b"tail");
    assert!(got[4..(64 << 20) - 4].iter().all(|&b| b == 0));
}
