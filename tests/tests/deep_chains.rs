//! Chains far deeper than overlayfs's limit of 500 lower layers. Each of 2000 layers overwrites
//! a file, adds one, deletes one and recreates a directory; a View of the chain equals a flat
//! directory given the same changes after every 100 layers (so at 600 too) and at the end. On
//! the native backend (every snapshot a full copy) and btrfs (every snapshot a subvolume
//! snapshot), which have no depth limit by design, and on overlay, which mounts chains past
//! 128 layers through flattened lowers.
//!
//! Flattened lowers must show exactly what the chain shows: a chain of small layers that use
//! every rule of overlayfs (whiteouts, opaque directories, hard links, owners, modes, devices,
//! extended attributes) is built on an overlay store that flattens every two layers, one that
//! never does, and a native store; every depth's View, content checksum and diffs agree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use strata::layer::diff::DiffOptions;
use strata::mount::{mount_all_with, unmount, OverlayMountMode};
use strata::{Backend, FlattenPolicy, Labels, Snapshotter};
use strata_tests::{apply, check_directory_equal, require_privileged, LayerBuilder, Mounted, Op};

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

/// Builds a chain of `depth` layers in `s`, checking it against a flat copy along the way.
fn deep_chain(s: &dyn Snapshotter, work: &Path, depth_total: usize) {
    let flat = work.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    let mut parent: Option<String> = None;
    for i in 0..depth_total {
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
        if depth % CHECK_EVERY == 0 || depth == depth_total {
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
    let top = s.stat(&format!("layer-{}", depth_total - 1)).unwrap();
    assert_eq!(
        top.parent.as_deref(),
        Some(format!("layer-{}", depth_total - 2).as_str())
    );
}

#[test]
fn native_chains_of_two_thousand_layers_equal_a_flat_copy() {
    if !require_privileged("a 2000-layer chain on native (bind mounts)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = strata_tests::native_store(&tmp.path().join("root"));
    deep_chain(&s, tmp.path(), DEPTH);
}

#[cfg(feature = "btrfs")]
#[test]
fn btrfs_chains_of_two_thousand_layers_equal_a_flat_copy() {
    if !require_privileged("a 2000-layer chain on btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = strata_tests::btrfs_store(&tmp.path().join("root"), 2 << 30);
    deep_chain(&*s, tmp.path(), DEPTH);
}

/// Device-mapper thin, in the VM (tests/vm/run): a snapshot is a thin snapshot of its parent's
/// device, whatever the depth. Emulated, a layer takes about a third of a second (activation,
/// an ext4 mount), so the chain goes past overlayfs's limit of 500, not to 2000.
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;

    #[test]
    fn deep_chains_of_six_hundred_layers_equal_a_flat_copy() {
        if !require_privileged("a 600-layer chain on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let s = strata_tests::devmapper_store(&tmp.path().join("root"));
        deep_chain(&*s, tmp.path(), 600);
    }
}

#[test]
fn overlay_chains_of_two_thousand_layers_equal_a_flat_copy() {
    if !require_privileged("a 2000-layer chain on overlay") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = strata_tests::overlay_store(&tmp.path().join("root"));
    deep_chain(&s, tmp.path(), DEPTH);

    // Flattened lowers every 32 layers past 128, each merging the chain below its top.
    let flats = s.flattened().unwrap();
    let depths: Vec<usize> = flats.iter().map(|f| f.depth).collect();
    assert!(
        depths.contains(&1984) && depths.iter().all(|d| d % 32 == 0 && *d >= 128),
        "{depths:?}"
    );
    for f in &flats {
        assert_eq!(f.top, format!("layer-{}", f.depth - 1));
    }

    // What containerd gets for a prepare at depth 2000: one overlay of at most 33 lower
    // directories, short enough for mount(2)'s one page, and mountable that way.
    let mounts = s.prepare("top", Some("layer-1999"), Labels::new()).unwrap();
    assert_eq!(mounts.len(), 1);
    let lowerdir = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lowerdir.split(':').count(), 2000 - 1984 + 1, "{lowerdir}");
    assert!(mounts[0].options.join(",").len() < 4096);
    let target = tmp.path().join("legacy");
    std::fs::create_dir_all(&target).unwrap();
    mount_all_with(&mounts, &target, OverlayMountMode::Legacy).unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("overwritten")).unwrap(),
        "layer 1999\n"
    );
    assert!(target.join("added/1999").exists() && !target.join("added/1998").exists());
    unmount(&target).unwrap();
    s.cleanup().unwrap();
    let report = s.fsck(false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// The change layer `i` makes in the chain that uses every overlayfs rule.
fn rich_ops(i: usize) -> Vec<Op> {
    let t = |s: u64| UNIX_EPOCH + Duration::from_secs(1_500_000_000 + s);
    match i % 6 {
        0 => vec![
            Op::CreateDir("/etc", 0o755),
            Op::CreateFileOwned(format!("/etc/conf-{i}"), format!("{i}").into_bytes(), 0o640),
            Op::CreateFile("/etc/passwd", format!("root {i}").into_bytes(), 0o644),
            Op::CreateDir("/tree/a/b", 0o700),
            Op::CreateFileOwned(format!("/tree/a/b/{i}"), b"deep".to_vec(), 0o600),
            Op::Chtimes("/etc", t(i as u64), t(i as u64)),
        ],
        1 => vec![
            Op::RemoveAll("/tree"),
            Op::CreateDir("/tree", 0o711),
            Op::CreateFileOwned(format!("/tree/after-{i}"), b"opaque".to_vec(), 0o644),
            Op::Chown("/etc/passwd", 1000 + i as u32, 2000),
        ],
        2 => vec![
            Op::CreateFile("/linked", format!("linked {i}").into_bytes(), 0o644),
            Op::RemoveAll("/linked-too"),
            Op::Link("/linked", "/linked-too"),
            Op::Symlink("../etc/passwd", "/rel-link"),
            Op::Chmod("/etc", 0o2755),
        ],
        3 => vec![
            Op::RemoveAll("/dev-null"),
            Op::CreateDevice("/dev-null", 0o020666, 1, 3),
            Op::RemoveAll("/fifo"),
            Op::CreateDevice("/fifo", 0o010600, 0, 0),
            Op::RemoveOwned(format!("/etc/conf-{}", i - 3)),
        ],
        4 => vec![
            // A directory replaced by a file, and back two layers later.
            Op::RemoveAll("/swap"),
            Op::CreateFile("/swap", b"file".to_vec(), 0o644),
            Op::Rename("/rel-link", "/moved-link"),
        ],
        _ => vec![
            Op::RemoveAll("/swap"),
            Op::CreateDir("/swap", 0o755),
            Op::CreateFileOwned(format!("/swap/{i}"), b"dir again".to_vec(), 0o644),
            Op::Lchown("/moved-link", 7, 8),
        ],
    }
}

#[test]
fn flattened_lowers_show_exactly_the_chain() {
    if !require_privileged("flattened lowers on overlay") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let flat_store = strata_tests::overlay_store_flattening(
        &tmp.path().join("flat"),
        FlattenPolicy {
            threshold: 3,
            step: 2,
        },
    );
    let plain = strata_tests::overlay_store(&tmp.path().join("plain"));
    let unflattened = strata_tests::overlay_store(&tmp.path().join("flat"));
    let native = strata_tests::native_store(&tmp.path().join("native"));
    let stores: [&dyn strata::AnyStore; 3] = [&flat_store, &plain, &native];
    const N: usize = 14;
    for i in 0..N {
        let key = format!("a{i}");
        let parent = (i > 0).then(|| format!("l{}", i - 1));
        for (n, s) in stores.iter().enumerate() {
            let m = Mounted::new(
                &s.prepare(&key, parent.as_deref(), Labels::new())
                    .unwrap_or_else(|e| panic!("[store {n} layer {i}] prepare: {e}")),
                &tmp.path().join(format!("m{n}")),
            );
            apply(m.path(), &rich_ops(i)).unwrap_or_else(|e| panic!("[layer {i}] {e}"));
            m.unmount();
            // Every third layer also comes as a tar with extended attributes.
            if i % 3 == 2 {
                let mut layer = LayerBuilder::new();
                layer.file_with_xattrs(
                    &format!("x{i}"),
                    b"xattrs",
                    &[
                        ("user.layer", format!("{i}").as_bytes()),
                        ("trusted.t", b"t"),
                    ],
                );
                s.apply(&key, &mut layer.bytes().as_slice(), None)
                    .unwrap_or_else(|e| panic!("[store {n} layer {i}] apply: {e}"));
            }
            s.commit(&format!("l{i}"), &key, Labels::new()).unwrap();
        }
        let name = format!("l{i}");
        // The same tree (content checksum: types, modes, owners, xattrs, data).
        let sums: Vec<_> = stores
            .iter()
            .map(|s| s.checksum(&name, &[], &[]).unwrap())
            .collect();
        assert_eq!(
            sums[0],
            sums[1],
            "[depth {}] flattened vs plain overlay",
            i + 1
        );
        assert_eq!(
            sums[0],
            sums[2],
            "[depth {}] flattened overlay vs native",
            i + 1
        );
        // The same tree as the comparison of containerd's suite sees it (hard links too).
        let views: Vec<Mounted> = stores
            .iter()
            .enumerate()
            .map(|(n, s)| {
                Mounted::new(
                    &s.view(&format!("v{i}"), Some(&name), Labels::new())
                        .unwrap(),
                    &tmp.path().join(format!("v{n}")),
                )
            })
            .collect();
        check_directory_equal(views[1].path(), views[0].path())
            .unwrap_or_else(|d| panic!("[depth {}] flattened vs plain: {d}", i + 1));
        check_directory_equal(views[2].path(), views[0].path())
            .unwrap_or_else(|d| panic!("[depth {}] flattened vs native: {d}", i + 1));
        for (v, s) in views.into_iter().zip(stores) {
            v.unmount();
            s.remove(&format!("v{i}")).unwrap();
        }
        // The same layer: a diff reads its parent through a flattened lower, and gives
        // what the same store's layers give read without one (a second store on the same
        // root that never flattens; the other stores' files have other times).
        let diff = |s: &dyn strata::AnyStore| {
            s.diff(&name, &DiffOptions::default(), &mut std::io::sink())
                .unwrap()
                .0
                .diff_id
        };
        assert_eq!(
            diff(&flat_store),
            diff(&unflattened),
            "[depth {}] diffID",
            i + 1
        );
    }

    // Flattened lowers at every even depth past the threshold, each mounted by someone
    // along the way.
    let depths: Vec<usize> = flat_store
        .flattened()
        .unwrap()
        .iter()
        .map(|f| f.depth)
        .collect();
    assert_eq!(depths, [2, 4, 6, 8, 10, 12], "{depths:?}");
    assert!(plain.flattened().unwrap().is_empty());
    // (The Views' storage goes at cleanup: these stores do not remove synchronously.)
    flat_store.cleanup().unwrap();
    let report = flat_store.fsck(false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.flattened.len(), 6);

    // An Active at depth 14 mounts l13 and l12 over the flattened l0..l11.
    let m = flat_store
        .prepare("top", Some("l13"), Labels::new())
        .unwrap();
    let lowerdir = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lowerdir.split(':').count(), 3, "{lowerdir}");

    // gc keeps the flattened lower that the Active mounts through, and drops the others
    // (the image holds the layers); their storage is reclaimed.
    flat_store.tag("img", "l13").unwrap();
    let report = flat_store.gc(false).unwrap();
    assert_eq!(report.flattened, 5, "{report:?}");
    assert!(report.removed.is_empty(), "{report:?}");
    let kept = flat_store.flattened().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!((kept[0].top.as_str(), kept[0].depth), ("l11", 12));
    let ids = flat_store.backend().ids().unwrap();
    let report = flat_store.fsck(false).unwrap();
    assert!(report.is_clean() && report.orphans.is_empty(), "{report:?}");
    assert_eq!(report.flattened.len(), 1, "{ids:?}");
    let m2 = flat_store.mounts("top").unwrap();
    assert_eq!(m, m2, "the Active's mounts are unchanged");

    // Without it, a View at depth 14 builds the lower again (from the layers themselves
    // when no other flattened lower is left) and still shows the chain.
    flat_store.remove("top").unwrap();
    flat_store.gc(false).unwrap();
    assert!(flat_store.flattened().unwrap().is_empty());
    let v = Mounted::new(
        &flat_store
            .view("again", Some("l13"), Labels::new())
            .unwrap(),
        &tmp.path().join("again"),
    );
    let p = Mounted::new(
        &plain.view("again", Some("l13"), Labels::new()).unwrap(),
        &tmp.path().join("again-plain"),
    );
    check_directory_equal(p.path(), v.path()).unwrap();
    v.unmount();
    p.unmount();
    assert_eq!(flat_store.flattened().unwrap().len(), 1);

    // Removing the chain top-down removes each flattened lower with its top layer.
    flat_store.remove("again").unwrap();
    flat_store.untag("img").unwrap();
    for i in (0..N).rev() {
        flat_store.remove(&format!("l{i}")).unwrap();
    }
    assert!(flat_store.flattened().unwrap().is_empty());
    flat_store.cleanup().unwrap();
    assert!(flat_store.backend().ids().unwrap().is_empty());
}

#[test]
fn a_pulled_chain_is_flattened_during_the_pull() {
    if !require_privileged("flattened lowers on overlay") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = strata_tests::overlay_store_flattening(
        &tmp.path().join("root"),
        FlattenPolicy {
            threshold: 3,
            step: 2,
        },
    );
    let native = strata_tests::native_store(&tmp.path().join("native"));
    let mut parents: [Option<String>; 2] = [None, None];
    for i in 0..7 {
        let mut layer = LayerBuilder::new();
        layer
            .file(&format!("f{i}"), b"pulled")
            .file("top", format!("{i}").as_bytes());
        if i > 0 {
            layer.file(&format!(".wh.f{}", i - 1), b"");
        }
        let bytes = layer.bytes();
        for (n, st) in [&s as &dyn strata::AnyStore, &native]
            .into_iter()
            .enumerate()
        {
            let applied = st
                .apply_layer(parents[n].as_deref(), None, None, &mut bytes.as_slice())
                .unwrap();
            parents[n] = Some(applied.name);
        }
    }
    // The pull's own prepares mounted the chains of 4 to 6 layers through the flattened
    // lowers of depth 2 and 4; the one of depth 6, which a chain of 7 layers mounts through,
    // was built once the last layer was committed: before any container's prepare.
    let depths: Vec<usize> = s.flattened().unwrap().iter().map(|f| f.depth).collect();
    assert_eq!(depths, [2, 4, 6]);
    let top = parents[0].clone().unwrap();
    let m = s.prepare("container", Some(&top), Labels::new()).unwrap();
    assert_eq!(s.flattened().unwrap().len(), 3, "the prepare built nothing");
    let lowerdir = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lowerdir.split(':').count(), 2, "{lowerdir}");
    let a = Mounted::new(&m, &tmp.path().join("a"));
    let b = Mounted::new(
        &native
            .view("v", parents[1].as_deref(), Labels::new())
            .unwrap(),
        &tmp.path().join("b"),
    );
    check_directory_equal(b.path(), a.path()).unwrap();
    assert_eq!(std::fs::read_to_string(a.path().join("top")).unwrap(), "6");
    a.unmount();
    b.unmount();
}
