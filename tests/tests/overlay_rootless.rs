//! Rootless overlay: a store opened inside a user namespace (root inside mapped to an
//! unprivileged host uid, as rootless container engines run) mounts overlayfs with
//! `userxattr`, keeps its opaque markers in `user.overlay.*` attributes, and gives the very
//! same layers as a store opened by root; a root that cannot store the markers, or that was
//! made the other way, is refused at open with what to do.
//!
//! Each test runs its namespace part in a child process (the test binary again, see
//! `strata_tests::run_in_userns`) and compares with what it does itself as root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use strata::layer::diff::DiffOptions;
use strata::layer::OverlayXattrs;
use strata::{FlattenPolicy, Labels, Snapshotter, Store};
use strata_overlay::{OverlayBackend, OverlayError, OverlayOptions, XATTRS_FILE};
use strata_tests::{
    give_to_userns_root, overlay_store, overlay_store_flattening, overlay_store_with,
    require_privileged, require_userns, run_in_userns, userns_child, LayerBuilder, Mounted,
};

/// The base layer: files and directories that the next layer deletes or hides.
fn layer_a() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc/")
        .file("etc/conf", b"conf")
        .dir("opt/")
        .file("opt/a", b"a")
        .dir("opt/sub/")
        .file("opt/sub/b", b"b")
        .dir("var/")
        .dir("var/log/")
        .file("var/log/x", b"x")
        .file("gone", b"gone")
        .file("keep", b"keep")
        .bytes()
}

/// A deletion (`.wh.gone`), an opaque directory (`opt/.wh..wh..opq`) with a new entry, and a
/// new file.
fn layer_b() -> Vec<u8> {
    LayerBuilder::new()
        .file(".wh.gone", b"")
        .dir("opt/")
        .file("opt/.wh..wh..opq", b"")
        .file("opt/new", b"new")
        // With its directory, so that etc gets the layer's time, not the time of the apply.
        .dir("etc/")
        .file("etc/added", b"added")
        .bytes()
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Applies the two layers, then prepares a container on them, checks its view, writes and
/// deletes through the mount (the kernel makes `var` opaque), commits it and diffs all
/// three layers (on the fast path, checked against the generic differ).
/// Returns the layers by name; `userxattr`: whether overlay mounts must carry it.
fn scenario(s: &Store<OverlayBackend>, work: &Path, userxattr: bool) -> BTreeMap<String, Vec<u8>> {
    let a = s.apply_layer(None, None, None, &layer_a()[..]).unwrap();
    let b = s
        .apply_layer(Some(&a.name), None, None, &layer_b()[..])
        .unwrap();
    let mounts = s.prepare("work", Some(&b.name), Labels::new()).unwrap();
    let options: Vec<&String> = mounts.iter().flat_map(|m| &m.options).collect();
    assert_eq!(
        options.iter().any(|o| *o == "userxattr"),
        userxattr,
        "{mounts:?}"
    );
    let m = Mounted::new(&mounts, &work.join("mnt"));
    let r = m.path();
    assert!(!exists(&r.join("gone")), "the deletion shows through");
    assert!(
        !exists(&r.join("opt/a")),
        "the opaque directory shows opt/a"
    );
    assert!(
        !exists(&r.join("opt/sub")),
        "the opaque directory shows opt/sub"
    );
    assert_eq!(fs::read(r.join("opt/new")).unwrap(), b"new");
    assert_eq!(fs::read(r.join("etc/conf")).unwrap(), b"conf");
    assert_eq!(fs::read(r.join("etc/added")).unwrap(), b"added");
    assert_eq!(fs::read(r.join("var/log/x")).unwrap(), b"x");
    fs::write(r.join("etc/written"), "written").unwrap();
    fs::remove_file(r.join("keep")).unwrap();
    fs::remove_file(r.join("etc/conf")).unwrap();
    // Removing a directory that lower layers hold and making it again: the kernel makes the
    // new one opaque, under the prefix it mounts with.
    fs::remove_dir_all(r.join("var")).unwrap();
    fs::create_dir(r.join("var")).unwrap();
    fs::write(r.join("var/fresh"), "fresh").unwrap();
    m.unmount();
    s.commit("top", "work", Labels::new()).unwrap();
    let mut out = BTreeMap::new();
    for (name, key) in [("a", &a.name), ("b", &b.name), ("top", &"top".to_string())] {
        // The container's layer has the test's own times: clamped so both stores agree.
        let epoch = (name == "top").then_some(1_000_000_000);
        let opts = DiffOptions {
            source_date_epoch: epoch,
            ..DiffOptions::default()
        };
        let (_, stats, fast) = s.diff(key, &opts, Vec::new()).unwrap();
        assert!(stats.fast_path, "{name}: the overlay fast path did not run");
        let generic = DiffOptions {
            force_generic: true,
            ..opts
        };
        let (_, stats, slow) = s.diff(key, &generic, Vec::new()).unwrap();
        assert!(!stats.fast_path);
        assert!(
            fast == slow,
            "{name}: the fast path and the generic differ disagree"
        );
        out.insert(name.to_string(), fast);
    }
    out
}

/// A chain of three layers mounted through a flattened lower of the bottom two (a and b):
/// the flattened lower must honour b's deletion and opaque directory, read under the prefix
/// the store writes.
fn flattened_view(root: &Path, work: &Path) {
    let s = overlay_store_flattening(
        root,
        FlattenPolicy {
            threshold: 2,
            step: 2,
        },
    );
    let a = s.apply_layer(None, None, None, &layer_a()[..]).unwrap();
    let b = s
        .apply_layer(Some(&a.name), None, None, &layer_b()[..])
        .unwrap();
    let c = s
        .apply_layer(
            Some(&b.name),
            None,
            None,
            &LayerBuilder::new().file("c", b"c").bytes()[..],
        )
        .unwrap();
    let m = Mounted::new(
        &s.prepare("flat", Some(&c.name), Labels::new()).unwrap(),
        &work.join("flat"),
    );
    let r = m.path();
    assert_eq!(fs::read(r.join("c")).unwrap(), b"c");
    assert_eq!(fs::read(r.join("opt/new")).unwrap(), b"new");
    assert_eq!(fs::read(r.join("var/log/x")).unwrap(), b"x");
    assert!(
        !exists(&r.join("gone")),
        "the deletion shows through the flattened lower"
    );
    assert!(
        !exists(&r.join("opt/a")),
        "the opaque directory shows opt/a through the flattened lower"
    );
    m.unmount();
    assert_eq!(
        s.flattened().unwrap().len(),
        1,
        "no flattened lower was built"
    );
}

/// Every overlayfs attribute under `dir`, as `path name`.
fn overlay_xattrs_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            if m.file_type().is_symlink() {
                continue;
            }
            let mut names = vec![0u8; 4096];
            let n = rustix::fs::llistxattr(&p, &mut names[..]).unwrap();
            for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
                if OverlayXattrs::is_overlay_xattr(name) && !name.ends_with(b".uuid") {
                    found.push(format!(
                        "{} {}",
                        p.strip_prefix(dir).unwrap().display(),
                        String::from_utf8_lossy(name)
                    ));
                }
            }
        }
    }
    found.sort();
    found
}

/// A temporary directory every id can traverse, with `shared` in it given to the
/// namespace's root.
fn shared_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    give_to_userns_root(&shared);
    (tmp, shared)
}

#[test]
fn rootless_overlay_gives_the_layers_of_a_root_store() {
    if let Some(shared) = userns_child() {
        // Inside the namespace: root here, host uid 100000 outside.
        let s = overlay_store(&shared.join("store"));
        let layers = scenario(&s, &shared, true);
        let out = shared.join("out");
        fs::create_dir_all(&out).unwrap();
        for (name, bytes) in &layers {
            fs::write(out.join(format!("{name}.tar")), bytes).unwrap();
        }
        // The same layers applied through a mount (the kernel writes the markers).
        let mounted = overlay_store_with(&shared.join("store-mounted"), true);
        let a = mounted
            .apply_layer(None, None, None, &layer_a()[..])
            .unwrap();
        let b = mounted
            .apply_layer(Some(&a.name), None, None, &layer_b()[..])
            .unwrap();
        let (_, stats, bytes) = mounted
            .diff(&b.name, &DiffOptions::default(), Vec::new())
            .unwrap();
        assert!(stats.fast_path);
        assert!(
            bytes == layers["b"],
            "the layer applied through a mount diffs to other bytes"
        );
        flattened_view(&shared.join("store-flat"), &shared);
        return;
    }
    if !require_privileged("rootless overlay") || !require_userns("rootless overlay") {
        return;
    }
    let (tmp, shared) = shared_dir();
    let root_store = overlay_store(&tmp.path().join("root-store"));
    let expected = scenario(&root_store, tmp.path(), false);
    drop(root_store);
    flattened_view(&tmp.path().join("store-flat"), tmp.path());
    run_in_userns("rootless_overlay_gives_the_layers_of_a_root_store", &shared);
    for (name, bytes) in &expected {
        let got = fs::read(shared.join("out").join(format!("{name}.tar"))).unwrap();
        assert!(
            &got == bytes,
            "layer {name}: the rootless store wrote other bytes than the root store"
        );
    }
    assert_eq!(
        fs::read_to_string(shared.join("store").join(XATTRS_FILE)).unwrap(),
        "user\n"
    );
    assert_eq!(
        fs::read_to_string(tmp.path().join("root-store").join(XATTRS_FILE)).unwrap(),
        "trusted\n"
    );
    // The markers: the applier's (opt in b) and the kernel's (var in top), one prefix each.
    for (store, prefix, other) in [
        ("store", "user.overlay.", "trusted.overlay."),
        ("root-store", "trusted.overlay.", "user.overlay."),
    ] {
        let base = if store == "store" {
            shared.join(store)
        } else {
            tmp.path().join(store)
        };
        let found = overlay_xattrs_under(&base.join("snapshots"));
        let opaque: Vec<&String> = found
            .iter()
            .filter(|f| f.ends_with(&format!("{prefix}opaque")))
            .collect();
        assert!(
            opaque
                .iter()
                .any(|f| f.ends_with(&format!("/fs/opt {prefix}opaque"))),
            "{store}: no opaque marker on opt: {found:?}"
        );
        assert!(
            opaque
                .iter()
                .any(|f| f.ends_with(&format!("/fs/var {prefix}opaque"))),
            "{store}: no opaque marker on var: {found:?}"
        );
        assert!(
            !found.iter().any(|f| f.contains(other)),
            "{store}: markers under {other}: {found:?}"
        );
    }
}

/// Mounts a ramfs (which stores no extended attributes at all) on `dir`.
fn mount_ramfs(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    rustix::mount::mount(
        "none",
        dir,
        "ramfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
}

/// Opens an overlay backend on `root`, which must fail with the markers error naming the
/// root, the attribute and what to do.
fn check_refused(root: &Path, xattrs: OverlayXattrs) {
    let e = OverlayBackend::open(root, OverlayOptions::default()).unwrap_err();
    let msg = e.to_string();
    eprintln!("refused as expected: {msg}");
    assert!(matches!(e, OverlayError::Markers { .. }), "{msg}");
    for part in [
        &root.display().to_string(),
        xattrs.opaque(),
        "cannot store",
        "or use --backend native",
    ] {
        assert!(msg.contains(part), "{part:?} is not in: {msg}");
    }
    assert!(
        !exists(&root.join(XATTRS_FILE)),
        "a refused root was recorded"
    );
}

#[test]
fn a_root_that_cannot_store_overlay_markers_is_refused_at_open() {
    if let Some(shared) = userns_child() {
        let ramfs = shared.join("ramfs");
        mount_ramfs(&ramfs);
        check_refused(&ramfs.join("store"), OverlayXattrs::User);
        rustix::mount::unmount(&ramfs, rustix::mount::UnmountFlags::empty()).unwrap();
        return;
    }
    if !require_privileged("refusing a root without overlay markers") {
        return;
    }
    let (tmp, shared) = shared_dir();
    let ramfs = tmp.path().join("ramfs");
    mount_ramfs(&ramfs);
    let refused =
        std::panic::catch_unwind(|| check_refused(&ramfs.join("store"), OverlayXattrs::Trusted));
    rustix::mount::unmount(&ramfs, rustix::mount::UnmountFlags::empty()).unwrap();
    if let Err(e) = refused {
        std::panic::resume_unwind(e);
    }
    if !require_userns("refusing a root without rootless overlay markers") {
        return;
    }
    run_in_userns(
        "a_root_that_cannot_store_overlay_markers_is_refused_at_open",
        &shared,
    );
}

/// Opening `root` must fail: it was made with `recorded` markers and this process needs
/// `current`.
fn check_mismatch(root: &Path, recorded: OverlayXattrs, current: OverlayXattrs) {
    let e = OverlayBackend::open(root, OverlayOptions::default()).unwrap_err();
    let msg = e.to_string();
    eprintln!("refused as expected: {msg}");
    match &e {
        OverlayError::XattrsMismatch {
            root: r,
            recorded: rec,
            current: cur,
            ..
        } => {
            assert_eq!(
                (r.as_path(), *rec, *cur),
                (root, recorded, current),
                "{msg}"
            );
        }
        _ => panic!("not a mismatch: {msg}"),
    }
    assert_eq!(
        strata::BackendError::kind(&e),
        strata::ErrorKind::FailedPrecondition
    );
    let how = match recorded {
        OverlayXattrs::Trusted => "open the store as root in the initial user namespace",
        OverlayXattrs::User => "open the store from inside a user namespace",
    };
    for part in [
        &root.display().to_string(),
        XATTRS_FILE,
        how,
        recorded.prefix(),
    ] {
        assert!(msg.contains(part), "{part:?} is not in: {msg}");
    }
}

/// A committed snapshot in a new overlay store on `root`.
fn store_with_a_layer(root: &Path) {
    let s = overlay_store(root);
    s.apply_layer(None, None, None, &layer_a()[..]).unwrap();
}

#[test]
fn a_root_opened_the_other_way_is_refused() {
    if let Some(shared) = userns_child() {
        check_mismatch(
            &shared.join("host"),
            OverlayXattrs::Trusted,
            OverlayXattrs::User,
        );
        // Made before the markers' prefix was recorded: trusted.overlay.*.
        check_mismatch(
            &shared.join("legacy"),
            OverlayXattrs::Trusted,
            OverlayXattrs::User,
        );
        let empty =
            OverlayBackend::open(&shared.join("legacy-empty"), OverlayOptions::default()).unwrap();
        assert_eq!(empty.xattrs(), OverlayXattrs::User);
        store_with_a_layer(&shared.join("rootless"));
        return;
    }
    if !require_privileged("refusing a root made the other way")
        || !require_userns("refusing a root made the other way")
    {
        return;
    }
    let (_tmp, shared) = shared_dir();
    store_with_a_layer(&shared.join("host"));
    store_with_a_layer(&shared.join("legacy"));
    fs::remove_file(shared.join("legacy").join(XATTRS_FILE)).unwrap();
    // An empty root made before the prefix was recorded is recorded as it is opened.
    OverlayBackend::open(&shared.join("legacy-empty"), OverlayOptions::default()).unwrap();
    fs::remove_file(shared.join("legacy-empty").join(XATTRS_FILE)).unwrap();
    give_to_userns_root(&shared);
    run_in_userns("a_root_opened_the_other_way_is_refused", &shared);
    let rootless = shared.join("rootless");
    check_mismatch(&rootless, OverlayXattrs::User, OverlayXattrs::Trusted);
    // Tools that only read metadata open it as it was made.
    let b = OverlayBackend::open(
        &rootless,
        OverlayOptions {
            skip_probe: true,
            ..OverlayOptions::default()
        },
    )
    .unwrap();
    assert_eq!(b.xattrs(), OverlayXattrs::User);
    // A record that says neither.
    fs::write(rootless.join(XATTRS_FILE), "bogus\n").unwrap();
    let e = OverlayBackend::open(&rootless, OverlayOptions::default()).unwrap_err();
    assert!(matches!(e, OverlayError::BadXattrsRecord { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&rootless.join(XATTRS_FILE).display().to_string()),
        "{e}"
    );
}
