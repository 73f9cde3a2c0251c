//! The mount(2) fallback, forced: long lowerdir lists are shortened relative to their common
//! parent, in a thread with its own working directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;

use strata::mount::{set_overlay_mount_mode, OverlayMountMode, TempMount};
use support::{can_mount, lowers, overlay};

#[test]
fn long_lowerdir_lists_are_compacted() {
    if !can_mount() {
        return;
    }
    set_overlay_mount_mode(OverlayMountMode::Legacy);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("a-rather-long-store-root-name/snapshots");
    // 200 layers laid out like the store's (`<id>/fs`): ~11 KB of absolute paths, ~2 KB
    // relative to the common parent.
    let dirs = lowers(&base, 200, |i| format!("{}/fs", i + 1));
    let m = overlay(tmp.path(), &dirs, true);
    assert!(
        m.options.join(",").len() > 4096,
        "the test needs an over-long option string"
    );
    let cwd = std::env::current_dir().unwrap();
    let t = TempMount::new_in(tmp.path(), &[m]).unwrap();
    assert_eq!(
        std::env::current_dir().unwrap(),
        cwd,
        "the process's cwd did not move"
    );
    assert_eq!(fs::read_to_string(t.path().join("top")).unwrap(), "199");
    assert_eq!(fs::read_to_string(t.path().join("f0")).unwrap(), "0");
    t.unmount().unwrap();

    // Paths that stay too long even relative to their parent fail with a clear error.
    let dirs = lowers(tmp.path(), 80, |i| format!("{i:03}-{}", "y".repeat(70)));
    let e = TempMount::new_in(tmp.path(), &[overlay(tmp.path(), &dirs, false)]).unwrap_err();
    assert!(e.to_string().contains("80 lower layers"), "{e}");
}
