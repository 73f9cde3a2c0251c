#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;

use strata::mount::{mount_all, unmount, TempMount};

use super::*;

fn can_mount() -> bool {
    let root = rustix::process::geteuid().is_root();
    let overlay = fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("overlay");
    if root && overlay {
        return true;
    }
    if std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("this test needs root and overlayfs, and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
    }
    eprintln!("SKIPPED: needs root and overlayfs");
    false
}

fn backend(root: &Path) -> OverlayBackend {
    OverlayBackend::open(root, OverlayOptions::default()).unwrap()
}

fn opts() -> CreateOptions {
    CreateOptions {
        durable: true,
        ..CreateOptions::default()
    }
}

/// A chain 1 <- 2 <- ... <- n of committed snapshots, each adding file `f<i>`.
fn chain(b: &OverlayBackend, n: u64) {
    for id in 1..=n {
        let parents: Vec<u64> = (1..id).rev().collect();
        b.create(id, Kind::Active, &parents, &opts()).unwrap();
        fs::write(b.fs_path(id).join(format!("f{id}")), id.to_string()).unwrap();
        b.commit(id, &parents, true).unwrap();
    }
}

#[test]
fn mounts_have_containerds_shapes() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    chain(&b, 2);
    let s = |id: u64| b.fs_path(id).to_string_lossy().into_owned();

    b.create(10, Kind::Active, &[], &opts()).unwrap();
    assert_eq!(
        b.mounts(10, Kind::Active, &[]).unwrap(),
        vec![Mount::bind(&b.fs_path(10), false)]
    );
    b.create(11, Kind::View, &[1], &opts()).unwrap();
    assert_eq!(
        b.mounts(11, Kind::View, &[1]).unwrap(),
        vec![Mount::bind(&b.fs_path(1), true)]
    );
    b.create(12, Kind::View, &[2, 1], &opts()).unwrap();
    let m = &b.mounts(12, Kind::View, &[2, 1]).unwrap()[0];
    assert_eq!(
        (m.fs_type.as_str(), m.source.as_str()),
        ("overlay", "overlay")
    );
    assert_eq!(
        m.options.last().unwrap(),
        &format!("lowerdir={}:{}", s(2), s(1))
    );
    assert!(!m.options.iter().any(|o| o.starts_with("upperdir")));

    b.create(13, Kind::Active, &[2, 1], &opts()).unwrap();
    let m = &b.mounts(13, Kind::Active, &[2, 1]).unwrap()[0];
    let mut want = Vec::new();
    if Path::new("/sys/module/overlay/parameters/index").exists() {
        want.push("index=off".to_string());
    }
    want.push(format!("workdir={}", b.work_path(13).display()));
    want.push(format!("upperdir={}", s(13)));
    want.push(format!("lowerdir={}:{}", s(2), s(1)));
    assert_eq!(m.options, want);

    // And the overlay really presents the chain.
    let t = TempMount::new_in(tmp.path(), std::slice::from_ref(m)).unwrap();
    assert_eq!(fs::read_to_string(t.path().join("f1")).unwrap(), "1");
    assert_eq!(fs::read_to_string(t.path().join("f2")).unwrap(), "2");
    fs::write(t.path().join("new"), "x").unwrap();
    t.unmount().unwrap();
    assert!(
        b.fs_path(13).join("new").exists(),
        "writes land in the upper dir"
    );

    assert_eq!(
        b.mounts(1, Kind::Committed, &[]).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
}

#[test]
fn chains_past_the_kernel_limit_are_refused_clearly() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    let parents: Vec<u64> = (1..=501).collect();
    let e = b.create(1000, Kind::Active, &parents, &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(
        e.to_string().contains("501") && e.to_string().contains("500"),
        "{e}"
    );
    assert!(b.ids().unwrap().is_empty(), "nothing left behind");
}

#[test]
fn ids_skip_temporary_storage_and_remove_is_idempotent() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    b.create(1, Kind::Active, &[], &opts()).unwrap();
    fs::create_dir_all(tmp.path().join("snapshots/.tmp-2/fs")).unwrap();
    assert_eq!(b.ids().unwrap(), vec![1]);
    b.remove(2).unwrap();
    assert!(!tmp.path().join("snapshots/.tmp-2").exists());
    b.remove(1).unwrap();
    b.remove(1).unwrap();
    assert!(b.ids().unwrap().is_empty());
}

#[test]
fn volatile_snapshots_remount_after_a_clean_unmount() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    chain(&b, 1);
    let vopts = CreateOptions {
        volatile: true,
        durable: true,
    };
    b.create(2, Kind::Active, &[1], &vopts).unwrap();
    let mounts = b.mounts(2, Kind::Active, &[1]).unwrap();
    assert!(mounts[0].options.iter().any(|o| o == "volatile"));
    let target = tmp.path().join("mnt");
    fs::create_dir(&target).unwrap();
    for round in 0..3 {
        mount_all(&mounts, &target).unwrap();
        fs::write(target.join(format!("r{round}")), "data").unwrap();
        unmount(&target).unwrap();
        assert!(
            !volatile_marker(&b.work_path(2)).exists(),
            "unmount cleared the kernel's marker"
        );
    }
    // Unmounted by someone else (containerd): the marker stays; the next mounts() clears it
    // because the machine did not restart.
    mount_all(&mounts, &target).unwrap();
    rustix::mount::unmount(&target, rustix::mount::UnmountFlags::empty()).unwrap();
    assert!(volatile_marker(&b.work_path(2)).exists());
    let mounts = b.mounts(2, Kind::Active, &[1]).unwrap();
    assert!(!volatile_marker(&b.work_path(2)).exists());
    mount_all(&mounts, &target).unwrap();
    assert_eq!(fs::read_to_string(target.join("r2")).unwrap(), "data");
    rustix::mount::unmount(&target, rustix::mount::UnmountFlags::empty()).unwrap();

    // A marker from another boot: the data may be lost, and the snapshot is reported broken.
    fs::write(b.dir(2).join(VOLATILE_FILE), "another-boot").unwrap();
    let e = b.mounts(2, Kind::Active, &[1]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss);
    assert!(e.to_string().contains("volatile"), "{e}");
    let e = b.commit(2, &[1], true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss);
}

#[test]
fn a_root_that_cannot_hold_overlay_layers_is_refused_at_open() {
    if !can_mount() {
        return;
    }
    // overlayfs cannot use another overlay's merged directory as its upper layer.
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    chain(&b, 1);
    b.create(2, Kind::Active, &[1], &opts()).unwrap();
    let merged = TempMount::new_in(tmp.path(), &b.mounts(2, Kind::Active, &[1]).unwrap()).unwrap();
    let e =
        OverlayBackend::open(&merged.path().join("store"), OverlayOptions::default()).unwrap_err();
    assert!(e.to_string().contains("overlayfs cannot use"), "{e}");
}
