//! Applying layers straight into overlayfs' upper directory: the same merged tree as an apply
//! through a mount (times and extended attributes included), a mount only where the merged
//! view is needed, and the hostile corpus on every backend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use strata::{Backend, ErrorKind, Labels, Snapshotter, Store};
use strata_tests::{
    check_directory_equal, hostile_corpus, native_store, overlay_store_with, require_privileged,
    snapshot_of, HostileCase, LayerBuilder, Mounted,
};

/// Commits `base`: two layers, so that the applier has lowers to look through.
fn build_base<B: Backend>(s: &Store<B>, work: &Path, outside: &Path) {
    let m = Mounted::new(
        &s.prepare("l1-a", None, Labels::new()).unwrap(),
        &work.join("m1"),
    );
    let r = m.path();
    fs::create_dir_all(r.join("usr/lib")).unwrap();
    fs::write(r.join("usr/lib/libc"), "libc").unwrap();
    std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
    fs::create_dir(r.join("etc")).unwrap();
    fs::write(r.join("etc/conf"), "conf").unwrap();
    std::os::unix::fs::chown(r.join("etc"), Some(7), Some(8)).unwrap();
    fs::set_permissions(
        r.join("etc"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    rustix::fs::setxattr(
        r.join("etc"),
        "user.strata",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::create_dir_all(r.join("old/b")).unwrap();
    fs::write(r.join("old/a"), "a").unwrap();
    fs::write(r.join("old/b/c"), "c").unwrap();
    fs::write(r.join("file"), "file").unwrap();
    fs::write(r.join("hl-target"), "target").unwrap();
    std::os::unix::fs::symlink(outside, r.join("lowlink")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), r.join("lowvictim")).unwrap();
    m.unmount();
    s.commit("l1", "l1-a", Labels::new()).unwrap();
    let m = Mounted::new(
        &s.prepare("l2-a", Some("l1"), Labels::new()).unwrap(),
        &work.join("m2"),
    );
    fs::write(m.path().join("usr/lib/libm"), "libm").unwrap();
    fs::remove_file(m.path().join("old/a")).unwrap();
    m.unmount();
    s.commit("base", "l2-a", Labels::new()).unwrap();
}

/// A path's modification time (seconds) and extended attributes.
type Attributes = (i64, Vec<(String, Vec<u8>)>);

/// What is compared beyond `check_directory_equal`: times and extended attributes.
fn attributes(root: &Path) -> BTreeMap<PathBuf, Attributes> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            let mut x = Vec::new();
            if !m.file_type().is_symlink() {
                let mut names = vec![0u8; 4096];
                let n = rustix::fs::llistxattr(&p, &mut names[..]).unwrap();
                for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
                    let name = String::from_utf8(name.to_vec()).unwrap();
                    let mut v = vec![0u8; 4096];
                    let len = rustix::fs::lgetxattr(&p, name.as_str(), &mut v[..]).unwrap();
                    x.push((name, v[..len].to_vec()));
                }
                x.sort();
            }
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), (m.mtime(), x));
        }
    }
    out
}

/// Applies `layer` onto `base` twice — into the upper directory and through a mount — and
/// checks that the merged trees agree. Returns whether the direct apply needed a mount.
fn parity(work: &Path, name: &str, layer: &[u8], check: impl Fn(&Path)) -> bool {
    let root = work.join("root");
    let direct = overlay_store_with(&root, false);
    let mounted = overlay_store_with(&root, true);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    direct
        .prepare(&format!("{name}-d"), Some("base"), Labels::new())
        .unwrap();
    let a = direct.apply(&format!("{name}-d"), layer, None).unwrap();
    mounted
        .prepare(&format!("{name}-m"), Some("base"), Labels::new())
        .unwrap();
    let b = mounted.apply(&format!("{name}-m"), layer, None).unwrap();
    assert!(
        !b.via_mount,
        "{name}: the mounted store never reports a switch"
    );
    assert_eq!(
        a.content, b.content,
        "{name}: the content checksum does not depend on the way of applying"
    );
    let va = Mounted::new(
        &direct.mounts(&format!("{name}-d")).unwrap(),
        &work.join("va"),
    );
    let vb = Mounted::new(
        &mounted.mounts(&format!("{name}-m")).unwrap(),
        &work.join("vb"),
    );
    if let Err(d) = check_directory_equal(va.path(), vb.path()) {
        panic!("{name}: the upper-directory apply differs from the mounted one:\n{d}");
    }
    let (xa, xb) = (attributes(va.path()), attributes(vb.path()));
    for (p, (ta, attrs_a)) in &xa {
        let (tb, attrs_b) = &xb[p];
        assert_eq!(
            attrs_a,
            attrs_b,
            "{name}: extended attributes of {}",
            p.display()
        );
        // A directory that got a new child has "now" as its time on both sides.
        assert!(
            ta == tb || (*ta >= started && *tb >= started),
            "{name}: time of {}: {ta} vs {tb}",
            p.display()
        );
    }
    check(va.path());
    va.unmount();
    vb.unmount();
    a.via_mount
}

#[test]
fn the_upper_directory_applier_matches_a_mounted_apply() {
    if !require_privileged("overlay apply") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), "precious").unwrap();
    build_base(
        &overlay_store_with(&tmp.path().join("root"), false),
        tmp.path(),
        &outside,
    );
    let w = tmp.path();

    let copied_up = parity(
        w,
        "copy-up",
        &LayerBuilder::new().file("etc/new", b"new").bytes(),
        |v| {
            let m = fs::metadata(v.join("etc")).unwrap();
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (7, 8, 0o750));
            assert_eq!(fs::read_to_string(v.join("etc/conf")).unwrap(), "conf");
        },
    );
    assert!(
        !copied_up,
        "a new file below a lower directory needs no mount"
    );

    let deletions = parity(
        w,
        "deletions",
        &LayerBuilder::new()
            .file(".wh.file", b"")
            .file("old/.wh.b", b"")
            .file(".wh.never-was", b"")
            .file("usr/lib/.wh.libm", b"")
            .bytes(),
        |v| {
            assert!(!v.join("file").exists() && !v.join("old/b").exists());
            assert!(!v.join("usr/lib/libm").exists() && v.join("usr/lib/libc").exists());
        },
    );
    assert!(!deletions);

    let opaque = parity(
        w,
        "opaque",
        &LayerBuilder::new()
            .dir("old/")
            .file("old/.wh..wh..opq", b"")
            .file("old/fresh", b"fresh")
            .bytes(),
        |v| {
            let names: Vec<_> = fs::read_dir(v.join("old"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("fresh")]);
        },
    );
    assert!(!opaque);

    let replaced = parity(
        w,
        "replaced",
        &LayerBuilder::new()
            .dir("file/")
            .file("file/x", b"x")
            .file("old", b"now a file")
            .dir("usr/")
            .bytes(),
        |v| {
            assert!(v.join("file").is_dir() && v.join("file/x").is_file());
            assert_eq!(fs::read_to_string(v.join("old")).unwrap(), "now a file");
            assert!(
                v.join("usr/lib/libc").exists(),
                "a directory over a directory merges"
            );
        },
    );
    assert!(!replaced);

    let links = parity(
        w,
        "links-in-layer",
        &LayerBuilder::new()
            .file("l/one", b"same")
            .link("l/two", "l/one")
            .bytes(),
        |v| {
            let (a, b) = (
                fs::metadata(v.join("l/one")).unwrap(),
                fs::metadata(v.join("l/two")).unwrap(),
            );
            assert_eq!(a.ino(), b.ino());
        },
    );
    assert!(!links);

    // These need the merged view: the applier mounts and carries on from that entry.
    let through_symlink = parity(
        w,
        "lower-symlink-parent",
        &LayerBuilder::new()
            .file("a-first", b"before")
            .file("lib/new", b"new")
            .file("z-after", b"after")
            .bytes(),
        |v| {
            assert!(fs::symlink_metadata(v.join("lib"))
                .unwrap()
                .file_type()
                .is_symlink());
            assert_eq!(fs::read_to_string(v.join("usr/lib/new")).unwrap(), "new");
            assert!(v.join("a-first").exists() && v.join("z-after").exists());
        },
    );
    assert!(
        through_symlink,
        "a parent that is a lower symlink needs the merged view"
    );

    let lower_link = parity(
        w,
        "lower-link-target",
        &LayerBuilder::new().link("hl", "hl-target").bytes(),
        |v| assert_eq!(fs::read_to_string(v.join("hl")).unwrap(), "target"),
    );
    assert!(
        lower_link,
        "a hard link to a lower file needs a copy-up by the kernel"
    );

    let root_opaque = parity(
        w,
        "root-opaque",
        &LayerBuilder::new()
            .file(".wh..wh..opq", b"")
            .file("only", b"only")
            .bytes(),
        |v| {
            let names: Vec<_> = fs::read_dir(v)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("only")]);
        },
    );
    assert!(root_opaque);
}

/// Runs the hostile corpus (and cases only layered snapshots have) against `s`.
fn hostile_on<B: Backend>(s: &Store<B>, backend: &str, work: &Path, outside: &Path) {
    let mut corpus = hostile_corpus(outside);
    corpus.extend([
        HostileCase {
            what: "a symlink only a lower layer holds, then a write through it",
            layer: LayerBuilder::new().file("lowlink/evil", b"x").bytes(),
            refusal: Some("symlink that leads to no directory inside"),
        },
        HostileCase {
            what: "a whiteout through a lower symlink",
            layer: LayerBuilder::new().file("lowlink/.wh.victim", b"").bytes(),
            refusal: Some("symlink that leads to no directory inside"),
        },
        HostileCase {
            what: "an opaque marker through a lower symlink",
            layer: LayerBuilder::new()
                .file("lowlink/.wh..wh..opq", b"")
                .bytes(),
            refusal: Some("symlink that leads to no directory inside"),
        },
        HostileCase {
            what: "a hard link to a lower symlink that points outside, then a write to it",
            layer: LayerBuilder::new()
                .link("h", "lowvictim")
                .file("h", b"overwritten")
                .bytes(),
            refusal: None,
        },
        HostileCase {
            what: "an overwrite of a lower symlink that points outside",
            layer: LayerBuilder::new()
                .file("lowvictim", b"overwritten")
                .bytes(),
            refusal: None,
        },
    ]);
    for (
        i,
        HostileCase {
            what,
            layer,
            refusal,
        },
    ) in corpus.into_iter().enumerate()
    {
        let key = format!("hostile-{i}");
        let before = snapshot_of(outside);
        s.prepare(&key, Some("base"), Labels::new()).unwrap();
        let result = s.apply(&key, layer.as_slice(), None);
        assert_eq!(
            snapshot_of(outside),
            before,
            "{backend}: {what}: something outside the snapshot changed"
        );
        match (result, refusal) {
            (Err(e), Some(why)) => {
                assert!(
                    e.to_string().contains(why),
                    "{backend}: {what}: refused for another reason: {e}"
                );
                if e.kind() != ErrorKind::DataLoss {
                    // Refused before any change: the snapshot is as it was.
                    let v = Mounted::new(&s.mounts(&key).unwrap(), &work.join("hv"));
                    assert!(v.path().join("etc/conf").exists(), "{backend}: {what}");
                    v.unmount();
                }
            }
            (Ok(_), None) => {}
            (Err(e), None) => panic!("{backend}: {what}: should be accepted, got {e}"),
            (Ok(_), Some(why)) => panic!("{backend}: {what}: should be refused ({why})"),
        }
        s.remove(&key).unwrap();
    }
}

#[test]
fn hostile_layers_stay_inside_the_snapshot_on_every_backend() {
    if !require_privileged("hostile layers on stores") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), "precious").unwrap();
    for (name, apply_mounted) in [("overlay", false), ("overlay, through a mount", true)] {
        let work = tmp.path().join(name);
        fs::create_dir(&work).unwrap();
        let s = overlay_store_with(&work.join("root"), apply_mounted);
        build_base(&s, &work, &outside);
        hostile_on(&s, name, &work, &outside);
    }
    let work = tmp.path().join("native");
    fs::create_dir(&work).unwrap();
    let s = native_store(&work.join("root"));
    build_base(&s, &work, &outside);
    hostile_on(&s, "native", &work, &outside);
    #[cfg(feature = "btrfs")]
    {
        let work = tmp.path().join("btrfs");
        fs::create_dir(&work).unwrap();
        let s = strata_tests::btrfs_store(&work.join("root"), 512 << 20);
        build_base(&*s, &work, &outside);
        hostile_on(&*s, "btrfs", &work, &outside);
    }
    assert_eq!(
        fs::read_to_string(outside.join("victim")).unwrap(),
        "precious"
    );
}

/// The same on device-mapper thin, in the VM (tests/vm/run).
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;

    #[test]
    fn hostile_layers_stay_inside_the_snapshot() {
        if !require_privileged("hostile layers on a devmapper store") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), "precious").unwrap();
        let work = tmp.path().join("devmapper");
        fs::create_dir(&work).unwrap();
        let s = strata_tests::devmapper_store(&work.join("root"));
        build_base(&*s, &work, &outside);
        hostile_on(&*s, "devmapper", &work, &outside);
        assert_eq!(
            fs::read_to_string(outside.join("victim")).unwrap(),
            "precious"
        );
    }
}
