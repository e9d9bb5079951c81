#[test]
fn backup_ids_skip_stray_names_and_sort_in_time_order() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("r");
    let (repo, _) = super::Repository::open_or_create(root.to_str().unwrap()).unwrap();
    let dir = root.join("backups").join("vm");
    std::fs::create_dir_all(&dir).unwrap();
    let ids = [
        "20261121-000000-10",
        "20261121-000001",
        "20261121-000000",
        "20261121-000000-9",
        "20261121-000000-1",
    ];
    for n in ids.iter().copied().chain(["bad name"]) {
        std::fs::write(dir.join(format!("{n}.json")), b"{}").unwrap();
    }
    assert_eq!(
        repo.backup_ids("vm").unwrap(),
        vec![
            "20261121-000000",
            "20261121-000000-1",
            "20261121-000000-9",
            "20261121-000000-10",
            "20261121-000001",
        ]
    );
}
