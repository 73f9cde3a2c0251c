//! The mount helpers, for real: bind mounts, overlays through fsconfig, volatile, TempMount.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;
use std::io::ErrorKind as IoKind;

use strata::mount::{mount_all, mount_info, unmount, TempMount};
use strata::Mount;
use support::{can_mount, lowers, overlay};

#[test]
fn bind_mounts_are_writable_or_read_only() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), "x").unwrap();

    let rw = TempMount::new_in(tmp.path(), &[Mount::bind(&src, false)]).unwrap();
    fs::write(rw.path().join("g"), "y").unwrap();
    assert_eq!(fs::read_to_string(src.join("g")).unwrap(), "y");
    let rw_path = rw.path().to_path_buf();
    rw.unmount().unwrap();
    assert!(!rw_path.exists(), "the mount point is removed");

    let ro = TempMount::new_in(tmp.path(), &[Mount::bind(&src, true)]).unwrap();
    assert_eq!(fs::read_to_string(ro.path().join("f")).unwrap(), "x");
    let e = fs::write(ro.path().join("h"), "z").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");
    let path = ro.path().to_path_buf();
    drop(ro);
    assert!(!path.exists(), "drop unmounts and removes the mount point");
    assert!(mount_info(tmp.path()).unwrap().is_none() || !path.exists());
}

fn libc_erofs() -> i32 {
    rustix::io::Errno::ROFS.raw_os_error()
}

#[test]
fn deep_overlays_with_long_paths_mount_through_fsconfig() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // 120 layers whose paths, even relative to their common parent, need ~9 KB of options:
    // more than mount(2) takes, so only lowerdir+ can mount them.
    let dirs = lowers(tmp.path(), 120, |i| format!("{i:03}-{}", "x".repeat(70)));
    let m = overlay(tmp.path(), &dirs, true);
    assert!(m.options.join(",").len() > 8000);
    let t = TempMount::new_in(tmp.path(), &[m]).unwrap();
    assert_eq!(fs::read_to_string(t.path().join("top")).unwrap(), "119");
    assert_eq!(fs::read_to_string(t.path().join("f0")).unwrap(), "0");
    let info = mount_info(t.path()).unwrap().unwrap();
    assert_eq!(info.fs_type, "overlay");
    fs::write(t.path().join("new"), "n").unwrap();
    t.unmount().unwrap();
    assert!(tmp.path().join("upper/new").exists());
}

#[test]
fn a_failed_overlay_mount_names_the_target_and_the_reason() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("mnt");
    fs::create_dir(&target).unwrap();
    let m = overlay(tmp.path(), &[tmp.path().join("missing")], false);
    let e = mount_all(&[m], &target).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&target.display().to_string()) && msg.contains("missing"),
        "{msg}"
    );
    let e = unmount(&target).unwrap_err();
    assert!(e.to_string().contains("unmount"), "{e}");
}

#[test]
fn volatile_overlays_can_be_mounted_again_after_unmount() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dirs = lowers(tmp.path(), 2, |i| format!("l{i}"));
    let mut m = overlay(tmp.path(), &dirs, true);
    m.options.insert(0, "volatile".into());
    let target = tmp.path().join("mnt");
    fs::create_dir(&target).unwrap();
    for i in 0..2 {
        mount_all(std::slice::from_ref(&m), &target).unwrap();
        fs::write(target.join(format!("w{i}")), "v").unwrap();
        unmount(&target).unwrap();
    }
    assert!(!strata::mount::volatile_marker(&tmp.path().join("work")).exists());
    assert_eq!(
        fs::read_to_string(tmp.path().join("upper/w1")).unwrap(),
        "v"
    );
}

#[test]
fn too_many_layers_are_refused_before_the_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let many: Vec<_> = (0..501).map(|i| tmp.path().join(i.to_string())).collect();
    let target = tmp.path().join("mnt");
    fs::create_dir(&target).unwrap();
    let e = mount_all(&[overlay(tmp.path(), &many, false)], &target).unwrap_err();
    assert!(e.to_string().contains("501 lower layers exceed"), "{e}");
    let _ = IoKind::InvalidInput;
}
