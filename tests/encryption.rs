//! Encrypted repositories through the real binary: round trip through a
//! recovery, dedup within the key, no plaintext in the repository's
//! files, tampering and wrong keys refused by name.

mod common;

use std::path::Path;

use common::*;

const K64: usize = 64 << 10;
const MARKER: &[u8] = b"RECOVERFS-PLAINTEXT-MARKER-5f3a9c";

/// 32 chunks of random bytes, each with the marker written into it at
/// several places (and one all-zero chunk).
fn marked_image(path: &Path) -> Vec<u8> {
    let mut data = random_image(path, 32 * K64, 77, K64);
    data[5 * K64..6 * K64].fill(0);
    for c in (0..32).filter(|c| *c != 5) {
        for k in 0..4 {
            let at = c * K64 + k * 9000 + 100;
            data[at..at + MARKER.len()].copy_from_slice(MARKER);
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file below `dir`: its path (relative) and bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn encrypted_env(pass: &str) -> Env {
    let mut env = Env::new();
    let key = env.path("repo.key");
    env.extra_env = vec![
        ("RECOVERFS_KEY_FILE".into(), key.display().to_string()),
        ("RECOVERFS_PASSPHRASE".into(), pass.into()),
    ];
    let out = env.ok(&["init", "--repo", env.repo_str(), "--encrypt"]);
    assert!(out.contains("created encrypted repository"), "{out}");
    env
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let at = at.min(b.len() - 1);
    b[at] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

#[test]
fn an_encrypted_repository_round_trips_dedups_within_its_key_and_holds_no_plaintext() {
    let env = encrypted_env("correct horse battery");
    let img = env.path("a.raw");
    let data = marked_image(&img);
    let id = env.backup("vm", "64K", &[&img]);
    env.backup("vm", "64K", &[&img]);
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["list", "--repo", env.repo_str(), "--json"])).unwrap();
    assert_eq!(
        list["backups"][1]["new_bytes"], 0,
        "dedup within the key: {list}"
    );
    let out = env.ok(&["verify", "--repo", env.repo_str()]);
    assert!(
        out.contains("encrypted repository: xchacha20poly1305"),
        "{out}"
    );

    // Not one file of the repository holds the marker, or the plain
    // BLAKE3 id of any chunk (ids are keyed).
    let plain_ids: Vec<String> = data
        .chunks(K64)
        .map(|c| blake3::hash(c).to_hex().to_string())
        .collect();
    let all = files(&env.repo);
    assert!(all.len() > 20, "{} files", all.len());
    for (name, bytes) in &all {
        assert!(!contains(bytes, MARKER), "{name} holds the marker");
        for h in &plain_ids {
            assert!(!name.contains(h.as_str()), "{name} is a plain chunk id");
            assert!(
                !contains(bytes, h.as_bytes()),
                "{name} names a plain chunk id"
            );
        }
    }
    // The same scan finds both in a plain repository of the same image.
    let plain = env.path("plain");
    let mut penv = Env::new();
    penv.repo_spec = plain.display().to_string();
    penv.backup("vm", "64K", &[&img]);
    let pf = files(&plain);
    assert!(pf.iter().any(|(_, b)| contains(b, MARKER)));
    assert!(pf.iter().any(|(n, _)| n.contains(plain_ids[0].as_str())));

    // A recovery through the daemon (it takes the key from the
    // environment) reads the image back.
    let d = env.serve();
    let disks = env.recover("vm", Some(&id));
    assert!(read_all(&disks[0]) == data, "recovered disk differs");
    assert!(env.release("vm", true).status.success());
    drop(d);

    // forget and gc read the authenticated manifests.
    let img2 = env.path("b.raw");
    random_image(&img2, 8 * K64, 78, K64);
    env.backup("vm", "64K", &[&img2]);
    env.ok(&["forget", "--repo", env.repo_str(), "--keep-last", "1"]);
    // The recovery's profile (MACed too) still names the old chunks.
    let out = env.ok(&["gc", "--repo", env.repo_str()]);
    assert!(
        out.contains("removed 0 ") && out.contains("1 profiles"),
        "{out}"
    );
    env.ok(&["profile", "clear", "--repo", env.repo_str(), "vm"]);
    let out = env.ok(&["gc", "--repo", env.repo_str()]);
    assert!(!out.contains("removed 0 "), "{out}");
    env.ok(&["verify", "--repo", env.repo_str()]);
}

#[test]
fn tampering_and_wrong_keys_are_refused_by_name_and_the_passphrase_can_change() {
    let env = encrypted_env("first passphrase");
    let repo = env.repo_str().to_string();
    let img = env.path("a.raw");
    let data = marked_image(&img);
    let a = env.backup("vm", "64K", &[&img]);
    let b = env.backup("other", "64K", &[&img]);
    let key = env.path("repo.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Without a key, with a wrong key, with a wrong passphrase.
    let mut bare = Env::new();
    bare.repo_spec = repo.clone();
    bare.fails(&["list", "--repo", &repo], "is encrypted: give its key");
    let mut other = encrypted_env("x");
    other.repo_spec = repo.clone();
    other.fails(&["list", "--repo", &repo], "wrong key for repository");
    let mut wrong_pass = Env::new();
    wrong_pass.repo_spec = repo.clone();
    wrong_pass.extra_env = vec![
        ("RECOVERFS_KEY_FILE".into(), key.display().to_string()),
        ("RECOVERFS_PASSPHRASE".into(), "nope".into()),
    ];
    wrong_pass.fails(&["list", "--repo", &repo], "wrong passphrase");
    // A key given for a plain repository is refused too.
    let plain = env.path("plain");
    let mut penv = Env::new();
    penv.repo_spec = plain.display().to_string();
    penv.backup("vm", "64K", &[&img]);
    env.fails(
        &["list", "--repo", plain.to_str().unwrap()],
        "is not encrypted, but a key file was given",
    );

    // A flipped bit in a chunk: verify names it, a recovery never serves it.
    let digest = {
        let r = recoverfs::repo::Repository::open_keyed(
            &repo,
            Some(recoverfs::repo::crypto::load_key_file(&key, Some("first passphrase")).unwrap()),
        )
        .unwrap();
        r.manifest("vm", &a).unwrap().disks[0]
            .chunks
            .get(0)
            .unwrap()
    };
    let chunk = env.repo.join(digest.key());
    let good = std::fs::read(&chunk).unwrap();
    flip(&chunk, 60);
    let o = env.run(&["verify", "--repo", &repo]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("DAMAGED chunk {digest}")), "{out}");
    assert!(out.contains("fails authentication"), "{out}");
    std::fs::write(&chunk, &good).unwrap();

    // A flipped bit in a manifest, a manifest resealed with a plain
    // checksum (a forger without the key), a manifest swapped in.
    let man = env.repo.join(format!("backups/vm/{a}.json"));
    let good = std::fs::read(&man).unwrap();
    let text = String::from_utf8(good.clone()).unwrap();
    let at = text.find("\"disk0\"").unwrap();
    flip(&man, at + 2);
    let o = env.run(&["verify", "--repo", &repo]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("DAMAGED manifest vm/{a}")), "{out}");
    assert!(out.contains("fails its MAC"), "{out}");
    let body_start = text.find("\"manifest\":").unwrap() + "\"manifest\":".len();
    let body = text[body_start..].trim_end().strip_suffix('}').unwrap();
    let forged = format!(
        "{{\"checksum\":\"{}\",\"manifest\":{body}}}\n",
        blake3::hash(body.as_bytes()).to_hex()
    );
    std::fs::write(&man, forged).unwrap();
    let o = env.run(&["verify", "--repo", &repo]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("carries no MAC"), "{out}");
    std::fs::copy(env.repo.join(format!("backups/other/{b}.json")), &man).unwrap();
    let o = env.run(&["verify", "--repo", &repo]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("manifest vm/{a} names other/{b}")),
        "{out}"
    );
    std::fs::write(&man, &good).unwrap();
    env.ok(&["verify", "--repo", &repo]);

    // A copy of the key, then a new passphrase: the old one stops working.
    let copy = env.path("copy.key");
    env.ok(&[
        "key",
        "export",
        "--repo",
        &repo,
        "--output",
        copy.to_str().unwrap(),
    ]);
    let pass2 = env.path("pass2");
    std::fs::write(&pass2, "second passphrase\n").unwrap();
    env.ok(&[
        "key",
        "change-passphrase",
        "--new-passphrase-file",
        pass2.to_str().unwrap(),
    ]);
    env.fails(&["list", "--repo", &repo], "wrong passphrase");
    let mut env2 = Env::new();
    env2.repo_spec = repo.clone();
    env2.extra_env = vec![
        ("RECOVERFS_KEY_FILE".into(), key.display().to_string()),
        (
            "RECOVERFS_PASSPHRASE_FILE".into(),
            pass2.display().to_string(),
        ),
    ];
    env2.ok(&["verify", "--repo", &repo]);
    // The exported copy keeps the old passphrase and opens the repository.
    let o = env.run(&[
        "--key-file",
        copy.to_str().unwrap(),
        "list",
        "--repo",
        &repo,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Restore from the encrypted repository reads the image.
    let _d = env2.serve();
    let disks = env2.recover("other", Some(&b));
    assert!(read_all(&disks[0]) == data);
}
