#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

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
fn mounts_past_the_kernel_limit_are_refused_clearly() {
    if !can_mount() {
        return;
    }
    // The store hands the backend a flattened chain; a list the kernel cannot stack is an
    // error naming both numbers, never a mount that fails later.
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    let parents: Vec<u64> = (1..=501).collect();
    for kind in [Kind::Active, Kind::View] {
        let e = b.mounts(1000, kind, &parents).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(
            e.to_string().contains("501") && e.to_string().contains("500"),
            "{e}"
        );
    }
}

#[test]
fn a_flattened_lower_stands_for_the_chain_below_it() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    chain(&b, 6);
    // Layer 4 deletes f2; layer 5 makes d opaque over layer 3's d.
    fs::create_dir(b.fs_path(3).join("d")).unwrap();
    fs::write(b.fs_path(3).join("d/old"), "old").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        b.fs_path(4).join("f2"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
    fs::create_dir(b.fs_path(5).join("d")).unwrap();
    rustix::fs::lsetxattr(
        b.fs_path(5).join("d"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let usage = b.flatten(100, &[5, 4, 3, 2, 1], true).unwrap().unwrap();
    assert!(b.ids().unwrap().contains(&100));
    assert!(b.exists(100).unwrap());
    // The root and d: the files are links, not data.
    assert_eq!(usage.inodes, 2, "{usage:?}");
    assert!(usage.size >= 4096 && usage.size < 64 * 1024, "{usage:?}");
    assert_eq!(
        fs::metadata(b.fs_path(100).join("f1")).unwrap().ino(),
        fs::metadata(b.fs_path(1).join("f1")).unwrap().ino()
    );
    // [6, flat] shows what [6, 5, 4, 3, 2, 1] shows.
    let names = |parents: &[u64]| {
        b.create(200, Kind::View, parents, &opts()).unwrap();
        let t =
            TempMount::new_in(tmp.path(), &b.mounts(200, Kind::View, parents).unwrap()).unwrap();
        let mut all: Vec<String> = Vec::new();
        for sub in ["", "d"] {
            for e in fs::read_dir(t.path().join(sub)).unwrap() {
                all.push(format!(
                    "{sub}/{}",
                    e.unwrap().file_name().to_string_lossy()
                ));
            }
        }
        all.sort();
        t.unmount().unwrap();
        b.remove(200).unwrap();
        all
    };
    let flat = names(&[6, 100]);
    assert_eq!(flat, names(&[6, 5, 4, 3, 2, 1]));
    assert_eq!(flat, ["/d", "/f1", "/f3", "/f4", "/f5", "/f6"]);
    b.remove(100).unwrap();
    assert!(!b.ids().unwrap().contains(&100));
}

#[test]
fn a_failed_flatten_leaves_nothing() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    chain(&b, 2);
    fs::create_dir(b.fs_path(2).join("moved")).unwrap();
    rustix::fs::lsetxattr(
        b.fs_path(2).join("moved"),
        "trusted.overlay.redirect",
        b"/elsewhere",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let e = b.flatten(100, &[2, 1], true).unwrap_err();
    assert!(
        e.to_string().contains("redirect") && e.to_string().contains("moved"),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(!b.ids().unwrap().contains(&100));
    assert!(!b.dir(100).exists() && !b.tmp_dir(100).exists());
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

fn overlay_of(options: Vec<String>) -> Mount {
    Mount {
        fs_type: "overlay".into(),
        source: "overlay".into(),
        options,
    }
}

#[test]
fn every_kind_and_parent_count_has_its_shape() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    assert_eq!(
        b.index_off(),
        Path::new("/sys/module/overlay/parameters/index").exists()
    );
    let idx: Vec<String> = if b.index_off() {
        vec!["index=off".into()]
    } else {
        vec![]
    };
    chain(&b, 3);
    let s = |id: u64| b.fs_path(id).to_string_lossy().into_owned();

    // View without a parent: its own (empty) fs, read-only.
    b.create(20, Kind::View, &[], &opts()).unwrap();
    assert_eq!(
        b.mounts(20, Kind::View, &[]).unwrap(),
        vec![Mount::bind(&b.fs_path(20), true)]
    );
    assert_eq!(
        Mount::bind(&b.fs_path(20), true).options,
        vec!["ro", "rbind"],
        "containerd's options for a read-only bind"
    );
    // View of three: lowerdir only, no upper, no work, no ro.
    b.create(21, Kind::View, &[3, 2, 1], &opts()).unwrap();
    let mut want = idx.clone();
    want.push(format!("lowerdir={}:{}:{}", s(3), s(2), s(1)));
    assert_eq!(
        b.mounts(21, Kind::View, &[3, 2, 1]).unwrap(),
        vec![overlay_of(want)]
    );
    // view_mounts: the same shapes without storage.
    assert_eq!(
        b.view_mounts(&[3]).unwrap(),
        vec![Mount::bind(&b.fs_path(3), true)]
    );
    assert_eq!(
        b.view_mounts(&[3, 2, 1]).unwrap(),
        b.mounts(21, Kind::View, &[3, 2, 1]).unwrap()
    );
    assert_eq!(
        b.view_mounts(&[]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // A volatile Active of one parent: index=off, volatile, workdir, upperdir, lowerdir.
    let vopts = CreateOptions {
        volatile: true,
        durable: false,
    };
    b.create(22, Kind::Active, &[1], &vopts).unwrap();
    let mut want = idx.clone();
    want.push("volatile".into());
    want.push(format!("workdir={}", b.work_path(22).display()));
    want.push(format!("upperdir={}", s(22)));
    want.push(format!("lowerdir={}", s(1)));
    assert_eq!(
        b.mounts(22, Kind::Active, &[1]).unwrap(),
        vec![overlay_of(want)]
    );
    // volatile means nothing for a View or a parentless Active's bind mount.
    b.create(23, Kind::View, &[2, 1], &vopts).unwrap();
    assert!(!b.dir(23).join(VOLATILE_FILE).exists());
    assert!(b.mounts(23, Kind::View, &[2, 1]).unwrap()[0]
        .options
        .iter()
        .all(|o| o != "volatile"));

    // Every path is absolute and under ROOT/snapshots/.
    let snapshots = tmp.path().join("snapshots");
    for o in &b.mounts(22, Kind::Active, &[1]).unwrap()[0].options {
        if let Some((_, v)) = o.split_once('=').filter(|(k, _)| k.ends_with("dir")) {
            assert!(Path::new(v).starts_with(&snapshots), "{o}");
        }
    }
}

#[test]
fn new_layers_have_exact_modes_whatever_the_umask() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let r = b.create(1, Kind::Active, &[], &opts());
    rustix::process::umask(old);
    r.unwrap();
    let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(b.fs_path(1)), 0o755);
    assert!(
        !b.work_path(1).exists(),
        "a parentless Active snapshot is a bind mount: no work directory"
    );
    assert_eq!(mode(b.dir(1)), 0o700);

    // A child's layer starts with its parent's root owner and mode: an overlay's root
    // shows the upper directory's.
    std::os::unix::fs::chown(b.fs_path(1), Some(1000), Some(1001)).unwrap();
    fs::set_permissions(b.fs_path(1), fs::Permissions::from_mode(0o750)).unwrap();
    b.commit(1, &[], false).unwrap();
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let r = b.create(2, Kind::Active, &[1], &opts());
    rustix::process::umask(old);
    r.unwrap();
    let m = fs::metadata(b.fs_path(2)).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o750));
    assert_eq!(mode(b.work_path(2)), 0o711);
    let t = TempMount::new_in(tmp.path(), &b.mounts(2, Kind::Active, &[1]).unwrap()).unwrap();
    let m = fs::metadata(t.path()).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o750));
}

#[test]
fn five_hundred_layers_mount_and_five_hundred_and_one_do_not_unflattened() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    let fast = CreateOptions::default();
    for id in 1..=500u64 {
        b.create(id, Kind::Active, &[], &fast).unwrap();
        fs::write(b.fs_path(id).join(format!("f{id}")), "").unwrap();
        b.commit(id, &[], false).unwrap();
    }
    let parents: Vec<u64> = (1..=500).rev().collect();
    b.create(1000, Kind::Active, &parents, &fast).unwrap();
    let t =
        TempMount::new_in(tmp.path(), &b.mounts(1000, Kind::Active, &parents).unwrap()).unwrap();
    assert!(t.path().join("f1").exists() && t.path().join("f500").exists());
    t.unmount().unwrap();

    let mut deeper = parents.clone();
    deeper.push(1000);
    for kind in [Kind::Active, Kind::View] {
        // The storage is made at any depth; the store mounts it through a flattened lower.
        b.create(1001, kind, &deeper, &fast).unwrap();
        let e = b.mounts(1001, kind, &deeper).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{kind}");
        assert!(
            e.to_string()
                .contains("501 lower directories exceeds overlayfs's limit of 500"),
            "{e}"
        );
        b.remove(1001).unwrap();
    }
    assert_eq!(
        b.view_mounts(&deeper).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
}

#[test]
fn commit_reports_the_usage_of_the_upper_layer_only() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    chain(&b, 1);
    fs::write(b.fs_path(1).join("big"), vec![7u8; 64 * 1024]).unwrap();
    b.create(2, Kind::Active, &[1], &opts()).unwrap();
    let t = TempMount::new_in(tmp.path(), &b.mounts(2, Kind::Active, &[1]).unwrap()).unwrap();
    fs::write(t.path().join("small"), "s").unwrap();
    t.unmount().unwrap();
    let u = b.commit(2, &[1], true).unwrap();
    assert_eq!(u, strata::fsutil::disk_usage(&b.fs_path(2)).unwrap());
    assert_eq!(u.inodes, 2, "the root and `small`");
    assert!(u.size < 64 * 1024);
    assert_eq!(b.usage(2).unwrap(), u);
}

#[test]
fn a_volatile_marker_from_another_boot_is_data_loss_even_without_a_mount() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    chain(&b, 1);
    let vopts = CreateOptions {
        volatile: true,
        durable: false,
    };
    b.create(2, Kind::Active, &[1], &vopts).unwrap();
    // Not mounted volatile yet: no kernel marker, so nothing to lose.
    fs::write(b.dir(2).join(VOLATILE_FILE), "00000000-old-boot").unwrap();
    b.mounts(2, Kind::Active, &[1]).unwrap();
    // The kernel's marker as a crash leaves it (faked: the directory with `dirty`).
    let marker = volatile_marker(&b.work_path(2));
    fs::create_dir_all(&marker).unwrap();
    fs::write(marker.join("dirty"), "").unwrap();
    let e = b.mounts(2, Kind::Active, &[1]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss);
    let msg = e.to_string();
    assert!(
        msg.contains("snapshot 2") && msg.contains("may be incomplete"),
        "{msg}"
    );
    // The same boot: synced and cleared, then mountable.
    fs::write(b.dir(2).join(VOLATILE_FILE), boot_id().unwrap()).unwrap();
    let m = b.mounts(2, Kind::Active, &[1]).unwrap();
    assert!(!marker.exists());
    let t = TempMount::new_in(tmp.path(), &m).unwrap();
    t.unmount().unwrap();
    // Commit drops the volatile marker: a parent is never volatile.
    b.commit(2, &[1], true).unwrap();
    assert!(!b.dir(2).join(VOLATILE_FILE).exists());
}

#[test]
fn only_an_untouched_layer_is_fresh() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = backend(tmp.path());
    assert!(b.fresh_is_rebuildable());
    chain(&b, 1);
    // The parent's root gets an owner and mode of its own: a fresh child copies them.
    std::os::unix::fs::lchown(b.fs_path(1), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(b.fs_path(1), fs::Permissions::from_mode(0o750)).unwrap();
    let fresh = |id: u64, parents: &[u64]| {
        b.create(id, Kind::Active, parents, &opts()).unwrap();
        b.is_fresh(id, parents).unwrap()
    };
    assert!(fresh(10, &[]), "a parentless layer as created");
    assert!(
        fresh(11, &[1]),
        "a child as created, with its parent's owner and mode"
    );

    // Mounted, looked at and unmounted without a write: still fresh.
    let at = TempMount::new_in(tmp.path(), &b.mounts(11, Kind::Active, &[1]).unwrap()).unwrap();
    assert_eq!(fs::read_to_string(at.path().join("f1")).unwrap(), "1");
    at.unmount().unwrap();
    assert!(b.is_fresh(11, &[1]).unwrap());

    // Anything written, through a mount or not, and any change to the root, is content.
    type Change<'a> = (&'a str, &'a dyn Fn(&Path));
    let changes: [Change; 5] = [
        ("a file", &|fs_dir| {
            fs::write(fs_dir.join("x"), b"").unwrap()
        }),
        ("an empty directory", &|fs_dir| {
            fs::create_dir(fs_dir.join("d")).unwrap()
        }),
        ("the root's mode", &|fs_dir| {
            fs::set_permissions(fs_dir, fs::Permissions::from_mode(0o700)).unwrap()
        }),
        ("the root's owner", &|fs_dir| {
            std::os::unix::fs::lchown(fs_dir, Some(1), Some(1)).unwrap()
        }),
        ("an xattr on the root", &|fs_dir| {
            rustix::fs::setxattr(fs_dir, "user.x", b"1", rustix::fs::XattrFlags::empty())
                .or_else(|_| {
                    rustix::fs::setxattr(
                        fs_dir,
                        "trusted.overlay.opaque",
                        b"y",
                        rustix::fs::XattrFlags::empty(),
                    )
                })
                .unwrap()
        }),
    ];
    for (i, (what, change)) in changes.iter().enumerate() {
        let id = 20 + i as u64;
        assert!(fresh(id, &[1]));
        change(&b.fs_path(id));
        assert!(!b.is_fresh(id, &[1]).unwrap(), "{what} makes it not fresh");
    }
    assert!(fresh(30, &[1]));
    let at = TempMount::new_in(tmp.path(), &b.mounts(30, Kind::Active, &[1]).unwrap()).unwrap();
    fs::remove_file(at.path().join("f1")).unwrap();
    at.unmount().unwrap();
    assert!(
        !b.is_fresh(30, &[1]).unwrap(),
        "a deletion through the mount"
    );
}

#[test]
fn a_probe_left_mounted_by_a_dead_process_is_taken_off_at_open() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    drop(backend(tmp.path()));
    // What a process killed between the probe's mount and its unmount leaves behind.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let probe = tmp
        .path()
        .join("snapshots")
        .join(format!(".probe-{dead}-0"));
    for d in ["lower", "upper", "work", "merged"] {
        fs::create_dir_all(probe.join(d)).unwrap();
    }
    let m = Mount {
        fs_type: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            format!("workdir={}", probe.join("work").display()),
            format!("upperdir={}", probe.join("upper").display()),
            format!("lowerdir={}", probe.join("lower").display()),
        ],
    };
    mount_all(&[m], &probe.join("merged")).unwrap();
    let merged = probe.join("merged");
    let mounted = || {
        strata::mount::list_mounts()
            .unwrap()
            .iter()
            .any(|m| m.target == merged)
    };
    assert!(mounted());

    let b = backend(tmp.path());
    assert!(!mounted(), "the dead process's probe is unmounted");
    assert!(!probe.exists(), "and removed");
    assert!(b.ids().unwrap().is_empty());
}
