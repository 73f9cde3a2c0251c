//! Chains far deeper than overlayfs's limit of 500 lower layers, on the backends that have no
//! depth limit by design: the native backend (every snapshot a full copy) and btrfs (every
//! snapshot a subvolume snapshot). Each of 2000 layers overwrites a file, adds one, deletes
//! one and recreates a directory; a View of the chain equals a flat directory given the same
//! changes after every 100 layers (so at 600 too) and at the end.
//!
//! The overlay backend stacks at most 500 lower layers: its deep chains are the deep-chain
//! issue's flattened lowers, tested there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use strata::{Labels, Snapshotter};
use strata_tests::{apply, check_directory_equal, require_privileged, Mounted, Op};

const DEPTH: usize = 2000;
const CHECK_EVERY: usize = 100;

/// The change layer `i` makes: overwrite, add, delete, recreate a directory.
fn layer_ops(i: usize) -> Vec<Op> {
    let mut ops = vec![
        Op::CreateFile("/overwritten", format!("layer {i}\n").into_bytes(), 0o644),
        Op::CreateDir("/added", 0o755),
        Op::CreateFileOwned(format!("/added/{i}"), format!("{i}\n").into_bytes(), 0o600),
        Op::RemoveAll("/recreated"),
        Op::CreateDir("/recreated", 0o750),
        Op::CreateFileOwned(format!("/recreated/only-{i}"), b"x".to_vec(), 0o644),
    ];
    if i > 0 {
        ops.push(Op::RemoveOwned(format!("/added/{}", i - 1)));
    }
    ops
}

/// Builds the chain in `s`, checking it against a flat copy along the way.
fn deep_chain(s: &dyn Snapshotter, work: &Path) {
    let flat = work.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    let mut parent: Option<String> = None;
    for i in 0..DEPTH {
        let key = format!("active-{i}");
        let m = Mounted::new(
            &s.prepare(&key, parent.as_deref(), Labels::new())
                .unwrap_or_else(|e| panic!("[layer {i}] prepare: {e}")),
            &work.join("m"),
        );
        let ops = layer_ops(i);
        apply(m.path(), &ops).unwrap_or_else(|e| panic!("[layer {i}] apply: {e}"));
        m.unmount();
        apply(&flat, &ops).unwrap();
        let name = format!("layer-{i}");
        s.commit(&name, &key, Labels::new())
            .unwrap_or_else(|e| panic!("[layer {i}] commit: {e}"));
        parent = Some(name);

        let depth = i + 1;
        if depth % CHECK_EVERY == 0 || depth == DEPTH {
            let view = format!("view-{depth}");
            let v = Mounted::new(
                &s.view(&view, parent.as_deref(), Labels::new())
                    .unwrap_or_else(|e| panic!("[depth {depth}] view: {e}")),
                &work.join("v"),
            );
            check_directory_equal(&flat, v.path())
                .unwrap_or_else(|d| panic!("[depth {depth}] the chain differs from flat: {d}"));
            v.unmount();
            s.remove(&view).unwrap();
        }
    }
    let top = s.stat(&format!("layer-{}", DEPTH - 1)).unwrap();
    assert_eq!(
        top.parent.as_deref(),
        Some(format!("layer-{}", DEPTH - 2).as_str())
    );
}

#[test]
fn native_chains_of_two_thousand_layers_equal_a_flat_copy() {
    if !require_privileged("a 2000-layer chain on native (bind mounts)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = strata_tests::native_store(&tmp.path().join("root"));
    deep_chain(&s, tmp.path());
}

#[cfg(feature = "btrfs")]
#[test]
fn btrfs_chains_of_two_thousand_layers_equal_a_flat_copy() {
    if !require_privileged("a 2000-layer chain on btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = strata_tests::btrfs_store(&tmp.path().join("root"), 2 << 30);
    deep_chain(&*s, tmp.path());
}
