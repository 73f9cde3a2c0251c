//! The btrfs backend's own promises: a root not on btrfs is refused with a clear error, a
//! full filesystem fails cleanly and leaves the store usable with no half-made subvolume, a
//! subvolume deleted behind strata's back is reported by fsck and never exported.

#![cfg(feature = "btrfs")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use strata::{ErrorKind, ExportOptions, Labels, Snapshotter, Store};
use strata_tests::{btrfs_store, durable_btrfs_store, require_privileged, run_ok, Mounted};

#[test]
fn a_root_not_on_btrfs_is_refused_naming_what_it_is() {
    if !require_privileged("btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let e = strata_btrfs::BtrfsBackend::open(tmp.path()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("not btrfs") && msg.contains("scripts/btrfs-loop"),
        "{msg}"
    );
    assert!(
        !tmp.path().join("snapshots").exists(),
        "nothing was created"
    );
}

/// Subvolumes under `root/snapshots`, by name.
fn subvolumes(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(root.join("snapshots")).unwrap() {
        let dir = e.unwrap().path();
        if libbtrfsutil_is_subvolume(&dir.join("fs")) {
            out.push(dir.file_name().unwrap().to_string_lossy().to_string());
        }
    }
    out.sort();
    out
}

fn libbtrfsutil_is_subvolume(p: &Path) -> bool {
    // A subvolume's root directory has inode number 256.
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.ino() == 256)
}

#[test]
fn a_full_filesystem_fails_cleanly_and_the_store_stays_usable() {
    if !require_privileged("btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    // Durable, as outside tests: commits make spares (a snapshot each) or sync.
    let s = durable_btrfs_store(&root, 256 << 20);
    s.prepare("base-a", None, Labels::new()).unwrap();
    s.commit("base", "base-a", Labels::new()).unwrap();
    let small = Mounted::new(
        &s.prepare("small-a", None, Labels::new()).unwrap(),
        &tmp.path().join("small"),
    );
    fs::write(small.path().join("kept"), b"kept").unwrap();
    small.unmount();
    let mounts = s.prepare("fill-a", None, Labels::new()).unwrap();
    let m = Mounted::new(&mounts, &tmp.path().join("m"));
    // A build step fills the filesystem.
    let mut i = 0;
    let full = loop {
        if let Err(e) = fs::write(m.path().join(format!("f{i}")), vec![7u8; 8 << 20]) {
            break e;
        }
        i += 1;
        assert!(i < 1000, "the filesystem never filled up");
    };
    assert_eq!(full.raw_os_error(), Some(28), "ENOSPC: {full}");
    // strata's own operations fail with clear errors, and make nothing half.
    let layer = strata_tests::LayerBuilder::new()
        .file("big", &vec![1u8; 64 << 20])
        .bytes();
    let mut errors = Vec::new();
    if let Err(e) = s.prepare("more", Some("base"), Labels::new()) {
        errors.push(e.to_string());
    }
    if let Err(e) = s.apply_layer(Some("base"), None, None, layer.as_slice()) {
        errors.push(e.to_string());
    }
    // A commit on a full filesystem either commits (its data intact, checked below) or fails
    // cleanly, leaving the snapshot active to commit again later.
    let small_committed = match s.commit("small", "small-a", Labels::new()) {
        Ok(()) => true,
        Err(e) => {
            errors.push(e.to_string());
            assert_eq!(s.stat("small-a").unwrap().kind, strata::Kind::Active);
            false
        }
    };
    assert!(!errors.is_empty(), "a full filesystem refused nothing");
    for e in &errors {
        assert!(
            e.contains("full") || e.contains("space"),
            "the error says the disk is full: {e}"
        );
    }
    // The build frees its space: everything works again, and no half-made subvolume is left.
    for j in 0..i {
        fs::remove_file(m.path().join(format!("f{j}"))).unwrap();
    }
    m.unmount();
    libbtrfsutil_sync(&root);
    let _ = s.remove("more");
    if !small_committed {
        s.commit("small", "small-a", Labels::new()).unwrap();
    }
    let view = Mounted::new(
        &s.view("small-v", Some("small"), Labels::new()).unwrap(),
        &tmp.path().join("small"),
    );
    assert_eq!(fs::read(view.path().join("kept")).unwrap(), b"kept");
    view.unmount();
    s.remove("small-v").unwrap();
    s.prepare("after", Some("base"), Labels::new()).unwrap();
    s.commit("after-c", "after", Labels::new()).unwrap();
    let a = s
        .apply_layer(Some("base"), None, None, layer.as_slice())
        .unwrap();
    assert!(!a.cached);
    s.remove("fill-a").unwrap();
    s.cleanup().unwrap();
    let names = subvolumes(&root);
    assert!(!names.iter().any(|n| n.starts_with(".tmp")), "{names:?}");
    let report = s.fsck(false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// Commits the filesystem's transaction, so freed space is free again.
fn libbtrfsutil_sync(root: &Path) {
    run_ok(
        std::process::Command::new("btrfs")
            .args(["filesystem", "sync"])
            .arg(root),
    );
}

#[test]
fn a_subvolume_deleted_behind_strata_is_reported_and_never_exported() {
    if !require_privileged("btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let s = btrfs_store(&root, 512 << 20);
    let m = Mounted::new(
        &s.prepare("a", None, Labels::new()).unwrap(),
        &tmp.path().join("m"),
    );
    fs::write(m.path().join("file"), "data").unwrap();
    m.unmount();
    s.commit("base", "a", Labels::new()).unwrap();
    s.prepare("b", Some("base"), Labels::new()).unwrap();
    s.commit("top", "b", Labels::new()).unwrap();
    s.tag("app:1", "top").unwrap();
    // Someone deletes the base layer's subvolume.
    let base_dir = {
        let g = s.guard(&["app:1"]).unwrap();
        g.layers()[0].path.clone().unwrap()
    };
    run_ok(
        std::process::Command::new("btrfs")
            .args(["subvolume", "delete"])
            .arg(&base_dir),
    );
    let report = s.fsck(false).unwrap();
    assert_eq!(report.broken.len(), 1, "{report:?}");
    assert_eq!(report.broken[0].0, "base");
    let out = tmp.path().join("out");
    let e = s
        .export(&["app:1"], &out, &ExportOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
    assert!(!out.exists());
}

#[test]
fn usage_counts_what_the_layer_changed_without_walking_the_tree() {
    if !require_privileged("btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let s = btrfs_store(&root, 512 << 20);
    let m = Mounted::new(
        &s.prepare("base-a", None, Labels::new()).unwrap(),
        &tmp.path().join("m"),
    );
    fs::create_dir(m.path().join("lib")).unwrap();
    for i in 0..500 {
        fs::write(m.path().join(format!("lib/f{i}")), vec![1u8; 16 << 10]).unwrap();
    }
    m.unmount();
    // These stores do not sync at commit; written-back data is what a tree search counts.
    libbtrfsutil_sync(&root);
    s.commit("base", "base-a", Labels::new()).unwrap();
    let base = s.usage("base").unwrap();
    assert!(base.size >= 500 * (16 << 10), "{base:?}");
    assert!(base.inodes >= 501, "{base:?}");

    // An empty layer on top of it holds nothing of its own.
    s.prepare("empty-a", Some("base"), Labels::new()).unwrap();
    s.commit("empty", "empty-a", Labels::new()).unwrap();
    assert_eq!(s.usage("empty").unwrap().size, 0);

    // A layer that writes 3 MiB holds about 3 MiB, not the base's 8 MiB as well.
    let m = Mounted::new(
        &s.prepare("top-a", Some("base"), Labels::new()).unwrap(),
        &tmp.path().join("m"),
    );
    for i in 0..3 {
        fs::write(m.path().join(format!("new{i}")), vec![2u8; 1 << 20]).unwrap();
    }
    m.unmount();
    libbtrfsutil_sync(&root);
    s.commit("top", "top-a", Labels::new()).unwrap();
    let top = s.usage("top").unwrap();
    assert!(
        top.size >= 3 << 20 && top.size < 4 << 20,
        "the layer's own bytes: {top:?}"
    );
    // The three files and the root directory they were added to.
    assert_eq!(top.inodes, 4, "{top:?}");
}

/// Writes `files` (name, content) into the Active snapshot `key` through its mount.
fn write_into(s: &Store<strata_btrfs::BtrfsBackend>, key: &str, at: &Path, files: &[(&str, &str)]) {
    let m = Mounted::new(&s.mounts(key).unwrap(), at);
    for (name, content) in files {
        fs::write(m.path().join(name), content).unwrap();
    }
    m.unmount();
}

/// The files at the top of a view of `name`, with their contents.
fn files_of(s: &Store<strata_btrfs::BtrfsBackend>, name: &str, at: &Path) -> Vec<(String, String)> {
    let view = format!("files-of-{name}");
    let m = Mounted::new(&s.view(&view, Some(name), Labels::new()).unwrap(), at);
    let mut out: Vec<(String, String)> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let content = fs::read_to_string(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), content)
        })
        .collect();
    m.unmount();
    s.remove(&view).unwrap();
    out.sort();
    out
}

/// A durable commit's one transaction is the snapshot that becomes the next prepare's
/// storage (a spare), so a chain costs one btrfs transaction per layer: the prepare on a
/// committed parent costs none, and every layer keeps exactly its own content.
#[test]
fn a_durable_chain_costs_one_btrfs_transaction_per_layer() {
    if !require_privileged("btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = durable_btrfs_store(&tmp.path().join("root"), 512 << 20);
    let fs = s.fs();
    let m = tmp.path().join("m");
    s.prepare("l0", None, Labels::new()).unwrap();
    write_into(&s, "l0", &m, &[("f0", "0")]);
    s.commit("c0", "l0", Labels::new()).unwrap();
    const LAYERS: u64 = 20;
    let mut commit_transactions = 0;
    for i in 1..=LAYERS {
        let before = fs.commits();
        s.prepare(
            &format!("l{i}"),
            Some(&format!("c{}", i - 1)),
            Labels::new(),
        )
        .unwrap();
        assert_eq!(
            fs.commits(),
            before,
            "layer {i}: prepare committed a transaction"
        );
        let name = format!("f{i}");
        write_into(&s, &format!("l{i}"), &m, &[(&name, &i.to_string())]);
        let before = fs.commits();
        s.commit(&format!("c{i}"), &format!("l{i}"), Labels::new())
            .unwrap();
        let spent = fs.commits() - before;
        assert!(
            spent >= 1,
            "layer {i}: a durable commit committed no transaction"
        );
        commit_transactions += spent;
    }
    // SQLite's checkpoint may fsync once in a while; nothing else costs a transaction.
    assert!(
        commit_transactions <= LAYERS + 1,
        "{commit_transactions} transactions for {LAYERS} commits"
    );
    let top = files_of(&s, &format!("c{LAYERS}"), &m);
    assert_eq!(top.len() as u64, LAYERS + 1);
    let middle = files_of(&s, "c10", &m);
    let want: Vec<(String, String)> = {
        let mut v: Vec<_> = (0..=10).map(|i| (format!("f{i}"), i.to_string())).collect();
        v.sort();
        v
    };
    assert_eq!(
        middle, want,
        "a parent changed when its children were written"
    );
}

/// A spare is storage, never a snapshot: the first child takes it, a second child of the same
/// parent is made the usual way, both start from the parent's content and stay apart; a spare
/// deleted behind strata's back is dropped and the child made anyway; removing the parent
/// reclaims its spare.
#[test]
fn spares_are_taken_once_replaced_when_lost_and_reclaimed_with_their_layer() {
    if !require_privileged("btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let s = durable_btrfs_store(&root, 512 << 20);
    let m = tmp.path().join("m");
    s.prepare("base-a", None, Labels::new()).unwrap();
    write_into(&s, "base-a", &m, &[("base", "b")]);
    s.commit("base", "base-a", Labels::new()).unwrap();
    let spares = s.fsck(false).unwrap().spares;
    assert_eq!(spares.len(), 1, "a durable commit leaves one spare");

    s.prepare("a", Some("base"), Labels::new()).unwrap();
    assert!(
        s.fsck(false).unwrap().spares.is_empty(),
        "the first child took it"
    );
    s.prepare("b", Some("base"), Labels::new()).unwrap();
    write_into(&s, "a", &m, &[("a", "1")]);
    write_into(&s, "b", &m, &[("b", "2")]);
    s.commit("ca", "a", Labels::new()).unwrap();
    s.commit("cb", "b", Labels::new()).unwrap();
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    assert_eq!(
        files_of(&s, "ca", &m),
        vec![pair("a", "1"), pair("base", "b")]
    );
    assert_eq!(
        files_of(&s, "cb", &m),
        vec![pair("b", "2"), pair("base", "b")]
    );
    assert_eq!(files_of(&s, "base", &m), vec![pair("base", "b")]);

    // ca's spare, deleted behind strata's back.
    let report = s.fsck(false).unwrap();
    assert_eq!(report.spares.len(), 2, "{report:?}");
    let lost = report.spares[0];
    run_ok(
        std::process::Command::new("btrfs")
            .args(["-q", "subvolume", "delete"])
            .arg(s.backend().fs_path(lost)),
    );
    assert_eq!(s.fsck(false).unwrap().spares.len(), 1);
    s.prepare("x", Some("ca"), Labels::new()).unwrap();
    write_into(&s, "x", &m, &[("x", "3")]);
    s.commit("cx", "x", Labels::new()).unwrap();
    assert_eq!(
        files_of(&s, "cx", &m),
        vec![pair("a", "1"), pair("base", "b"), pair("x", "3")]
    );

    // Everything removed: no subvolume stays, spares included.
    for k in ["cx", "ca", "cb", "base"] {
        s.remove(k).unwrap();
    }
    let report = s.cleanup_report().unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(subvolumes(&root), Vec::<String>::new());
    assert!(s.fsck(false).unwrap().is_clean());
}
