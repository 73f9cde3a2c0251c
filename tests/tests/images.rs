//! Images through the store on every backend: OCI layout and archive export, import into a
//! fresh store (same chainIDs, byte-identical blobs on re-export), the export guarantee, the
//! content store's gc, `verify` finding a damaged layer (seed 002), and umoci both ways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata::{Backend, ErrorKind, ExportOptions, Labels, Snapshotter, Store};
use strata_tests::{
    apply, check_directory_equal, native_store, overlay_store, require_privileged, Mounted, Op,
};

/// Builds `base` and `top` (with a COPY-like layer and a dangling symlink), tags them.
fn build<B: Backend>(s: &Store<B>, work: &Path) {
    let steps: [(&str, Option<&str>, Vec<Op>); 2] = [
        (
            "base",
            None,
            vec![
                Op::CreateDir("/etc", 0o755),
                Op::CreateFile("/etc/os-release", b"ID=strata\n".to_vec(), 0o644),
                Op::CreateDir("/usr/share/doc/x", 0o755),
                Op::Symlink(
                    "../../../../nowhere/NEWS.Debian.gz",
                    "/usr/share/doc/x/NEWS.Debian.gz",
                ),
                Op::CreateFile("/bin-tool", b"#!/bin/sh\n".to_vec(), 0o4755),
            ],
        ),
        (
            "top",
            Some("base"),
            vec![
                Op::CreateDir("/app", 0o755),
                Op::CreateFile("/app/main", b"payload".repeat(1000), 0o755),
                Op::Link("/app/main", "/app/main-link"),
                Op::RemoveAll("/bin-tool"),
            ],
        ),
    ];
    for (name, parent, ops) in steps {
        let key = format!("{name}-a");
        let m = Mounted::new(
            &s.prepare(&key, parent, Labels::new()).unwrap(),
            &work.join("m"),
        );
        apply(m.path(), &ops).unwrap();
        m.unmount();
        s.commit(name, &key, Labels::new()).unwrap();
    }
    s.tag("base:1", "base").unwrap();
    s.tag("app:1", "top").unwrap();
}

/// Every file of a layout directory, path → bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn view<B: Backend>(s: &Store<B>, image: &str, key: &str, at: &Path) -> Mounted {
    Mounted::new(&s.view(key, Some(image), Labels::new()).unwrap(), at)
}

fn round_trip<B1: Backend, B2: Backend>(
    src: &Store<B1>,
    fresh: &Store<B2>,
    work: &Path,
    what: &str,
) {
    let layout = work.join(format!("{what}-layout"));
    let report = src
        .export(&["app:1", "base:1"], &layout, &ExportOptions::default())
        .unwrap();
    assert_eq!(report.images.len(), 2);
    let imported = fresh.import(&layout, None).unwrap();
    assert_eq!(
        imported.applied + imported.cached,
        3,
        "{what}: {imported:?}"
    );
    assert_eq!(
        imported.cached, 1,
        "{what}: the base layer is shared by both images"
    );
    // The same chainIDs as the source's layers.
    for (image, snapshot) in &imported.images {
        let src_top = src.stat(image).unwrap().name;
        let want = src.layer(&src_top).unwrap().unwrap().chain_id;
        assert_eq!(snapshot, &want, "{what}: {image}");
    }
    // The imported image is the source's tree.
    let a = view(src, "app:1", &format!("{what}-va"), &work.join("va"));
    let b = view(fresh, "app:1", &format!("{what}-vb"), &work.join("vb"));
    check_directory_equal(a.path(), b.path()).unwrap();
    drop((a, b));
    // Exported again: the very same layout.
    let again = work.join(format!("{what}-again"));
    let report = fresh
        .export(&["app:1", "base:1"], &again, &ExportOptions::default())
        .unwrap();
    assert_eq!(report.diffed, 0, "{what}: imported images go back verbatim");
    assert!(
        files(&layout) == files(&again),
        "{what}: byte-identical layout"
    );
}

#[test]
fn export_then_import_gives_the_same_images_on_every_backend() {
    if !require_privileged("images") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let o = overlay_store(&w.join("o1"));
    build(&o, w);
    round_trip(&o, &overlay_store(&w.join("o2")), w, "overlay");
    let n = native_store(&w.join("n1"));
    build(&n, w);
    round_trip(&n, &native_store(&w.join("n2")), w, "native");
    // Across backends: the same layers, the same chainIDs.
    round_trip(&o, &native_store(&w.join("n3")), w, "overlay-to-native");
    #[cfg(feature = "btrfs")]
    {
        let b = strata_tests::btrfs_store(&w.join("b1"), 512 << 20);
        build(&*b, w);
        let b2 = strata_tests::btrfs_store(&w.join("b2"), 512 << 20);
        round_trip(&*b, &*b2, w, "btrfs");
        let b3 = strata_tests::btrfs_store(&w.join("b3"), 512 << 20);
        round_trip(&o, &*b3, w, "overlay-to-btrfs");
    }

    // An OCI archive holds the same; importing it gives the same image.
    let archive = w.join("app.tar");
    o.export(&["app:1"], &archive, &ExportOptions::default())
        .unwrap();
    let listing = Command::new("tar")
        .arg("tf")
        .arg(&archive)
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert!(listing.contains("index.json") && listing.contains("oci-layout"));
    let fresh = overlay_store(&w.join("o4"));
    let r = fresh.import(&archive, Some("renamed:2")).unwrap();
    assert_eq!(r.images[0].0, "renamed:2");
    assert_eq!(
        r.images[0].1,
        o.layer("top").unwrap().unwrap().chain_id,
        "the archive's image is the same chain"
    );
    // Exporting over an existing target is refused, naming it.
    let e = o
        .export(&["app:1"], &archive, &ExportOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn export_refuses_a_missing_layer_before_writing_anything() {
    if !require_privileged("images") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let s = overlay_store(&w.join("root"));
    build(&s, w);
    // The base layer's storage goes behind the store's back.
    let base_dir = {
        let g = s.guard(&["app:1"]).unwrap();
        g.layers()[0].path.clone().unwrap()
    };
    fs::remove_dir_all(base_dir.parent().unwrap()).unwrap();
    let out = w.join("out");
    let e = s
        .export(&["app:1"], &out, &ExportOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
    assert!(
        e.to_string().contains("base"),
        "the error names the layer: {e}"
    );
    assert!(!out.exists(), "nothing was written");
    let leftovers: Vec<_> = fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Seed 002: a layer that came back changed is found by verify and refused by export.
#[test]
fn verify_finds_a_damaged_layer_and_export_refuses_it() {
    if !require_privileged("images") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let src = overlay_store(&w.join("src"));
    build(&src, w);
    let layout = w.join("layout");
    src.export(&["app:1"], &layout, &ExportOptions::default())
        .unwrap();
    damage_and_verify(&overlay_store(&w.join("o-dst")), &layout, w);
    damage_and_verify(&native_store(&w.join("n-dst")), &layout, w);
}

fn damage_and_verify<B: Backend>(s: &Store<B>, layout: &Path, w: &Path) {
    s.import(layout, None).unwrap();
    let clean = s.verify(&["app:1"]).unwrap();
    assert_eq!(
        (clean.verified.len(), clean.damaged.len()),
        (2, 0),
        "{clean:?}"
    );
    // The top layer (the COPY of /app) loses its content on disk.
    let layers = s.guard(&["app:1"]).unwrap().layers().to_vec();
    let (base, top) = (&layers[0].name, &layers[1]);
    // verify_layers reads the named layer alone, not the layers below it.
    let one = s.verify_layers(&[&top.name]).unwrap();
    assert_eq!(one.verified, vec![top.name.clone()], "{one:?}");
    strata_tests::change_stored_layer(s.root(), top, &w.join("damage"), |dir| {
        fs::write(dir.join("app/main"), b"").unwrap()
    });
    let below = s.verify_layers(&[base]).unwrap();
    assert_eq!(
        (below.verified.clone(), below.damaged.len()),
        (vec![base.clone()], 0),
        "the base is intact: {below:?}"
    );
    let out = w.join("verified-out");
    let e = s
        .export(
            &["app:1"],
            &out,
            &ExportOptions {
                verify: true,
                ..ExportOptions::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
    assert!(e.to_string().contains("stored content changed"), "{e}");
    assert!(!out.exists());
    // Marked broken: every later export refuses it, verify or not, and fsck reports it.
    let e = s
        .export(&["app:1"], &out, &ExportOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
    let report = s.fsck(false).unwrap();
    assert_eq!(report.broken.len(), 1, "{report:?}");
    let e = s.verify_layers(&[&top.name]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
    assert!(e.to_string().contains(&top.name), "names the layer: {e}");
}

#[test]
fn gc_collects_blobs_that_nothing_holds() {
    if !require_privileged("images") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let src = overlay_store(&w.join("src"));
    build(&src, w);
    let layout = w.join("layout");
    src.export(&["app:1", "base:1"], &layout, &ExportOptions::default())
        .unwrap();
    let s = overlay_store(&w.join("dst"));
    s.import(&layout, None).unwrap();
    let blobs = || fs::read_dir(w.join("dst/blobs/sha256")).unwrap().count();
    assert_eq!(blobs(), 6, "manifests, configs and layers kept verbatim");
    s.untag("app:1").unwrap();
    let r = s.gc(false).unwrap();
    assert_eq!(
        r.blobs, 3,
        "app:1's manifest, config and top layer went: {r:?}"
    );
    assert_eq!(blobs(), 3);
    s.lease_create("keep", None).unwrap();
    // A lease holding nothing keeps nothing; untagging the last image frees the rest.
    s.untag("base:1").unwrap();
    let r = s.gc(false).unwrap();
    assert_eq!((r.blobs, blobs()), (3, 0), "{r:?}");
}

/// Threads of one process importing the same layout at once all succeed (each blob written
/// through a temporary file of its own), and gc reclaims the temporary blob file a dead
/// process left while keeping a live one's.
#[test]
fn concurrent_imports_of_one_image_in_one_process_all_succeed() {
    if !require_privileged("images") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let src = overlay_store(&w.join("src"));
    build(&src, w);
    let layout = w.join("layout");
    src.export(&["app:1"], &layout, &ExportOptions::default())
        .unwrap();
    let s = overlay_store(&w.join("dst"));
    std::thread::scope(|sc| {
        for t in 0..4 {
            let (s, layout) = (&s, &layout);
            sc.spawn(move || {
                for i in 0..3 {
                    s.import(layout, Some(&format!("app-{t}-{i}")))
                        .unwrap_or_else(|e| panic!("import {t}/{i}: {e}"));
                }
            });
        }
    });
    assert_eq!(s.images().unwrap().len(), 12);
    let dir = w.join("dst/blobs/sha256");
    let dead = dir.join(format!(".{}.999999-1-0", "ab".repeat(32)));
    fs::write(&dead, "half a blob").unwrap();
    s.gc(false).unwrap();
    assert!(
        !dead.exists(),
        "a dead process's temporary blob is reclaimed"
    );
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn umoci_available() -> bool {
    let ok = Command::new("umoci")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("umoci is not installed (scripts/deps installs it)");
    }
    ok
}

#[test]
fn umoci_unpacks_exports_and_strata_imports_umoci_layouts() {
    if !require_privileged("images") || !umoci_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let s = overlay_store(&w.join("root"));
    build(&s, w);
    let layout = w.join("layout");
    s.export(&["app:1"], &layout, &ExportOptions::default())
        .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("umoci").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "umoci {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let bundle = w.join("bundle");
    run(&[
        "unpack",
        "--image",
        &format!("{}:app:1", layout.display()),
        bundle.to_str().unwrap(),
    ]);
    let v = view(&s, "app:1", "v1", &w.join("v1"));
    check_directory_equal(v.path(), &bundle.join("rootfs")).unwrap();
    drop(v);

    // A layout umoci builds: strata imports it to umoci's own tree.
    let theirs = w.join("theirs");
    let img = format!("{}:made", theirs.display());
    run(&["init", "--layout", theirs.to_str().unwrap()]);
    run(&["new", "--image", &img]);
    let b2 = w.join("b2");
    run(&["unpack", "--image", &img, b2.to_str().unwrap()]);
    fs::create_dir_all(b2.join("rootfs/etc")).unwrap();
    fs::write(b2.join("rootfs/etc/motd"), "from umoci\n").unwrap();
    std::os::unix::fs::symlink("/no/such/file", b2.join("rootfs/etc/dangling")).unwrap();
    run(&["repack", "--image", &img, b2.to_str().unwrap()]);
    let dst = overlay_store(&w.join("dst"));
    let r = dst.import(&theirs, Some("umoci:made")).unwrap();
    assert_eq!(r.images.len(), 1);
    let v = view(&dst, "umoci:made", "v2", &w.join("v2"));
    check_directory_equal(v.path(), &b2.join("rootfs")).unwrap();
    drop(v);
    // And verify holds for a layer another tool wrote.
    let report = dst.verify(&["umoci:made"]).unwrap();
    assert!(
        report.damaged.is_empty() && !report.verified.is_empty(),
        "{report:?}"
    );
}

fn tool(name: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("{name} is not installed (scripts/deps installs it)");
    }
    ok
}

/// A containerd of the test's own (root, state and socket in `dir`), stopped on drop.
struct Containerd {
    child: std::process::Child,
    socket: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        let socket = dir.join("containerd.sock");
        let child = Command::new("containerd")
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(&socket)
            .args(["--config", "/dev/null"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let c = Containerd { child, socket };
        for _ in 0..200 {
            if c.ctr(&["version"]).status.success() {
                return c;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("containerd did not come up");
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn skopeo_reads_exported_layouts_and_ctr_and_podman_load_exported_archives() {
    if !require_privileged("images") || !tool("skopeo") || !tool("ctr") || !tool("podman") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let s = overlay_store(&w.join("root"));
    build(&s, w);
    let layout = w.join("layout");
    let report = s
        .export(&["app:1"], &layout, &ExportOptions::default())
        .unwrap();
    let manifest = &report.images[0].1;
    let out = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:app:1", layout.display())])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(manifest.as_str()),
        "skopeo sees the manifest: {text}"
    );
    assert_eq!(
        text.matches("\"sha256:").count(),
        3,
        "a digest and two layers: {text}"
    );

    let archive = w.join("app.tar");
    s.export(&["app:1"], &archive, &ExportOptions::default())
        .unwrap();
    let ctrd = Containerd::start(w);
    let out = ctrd.ctr(&["images", "import", archive.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctrd.ctr(&["images", "ls"]);
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with("app:1 ") && l.contains(manifest.as_str())),
        "ctr lists the image: {list}"
    );
    drop(ctrd);

    // podman, with storage of its own in the test's directory.
    let podman = |args: &[&str]| {
        Command::new("podman")
            .arg("--root")
            .arg(w.join("podman-root"))
            .arg("--runroot")
            .arg(w.join("podman-run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = podman(&["load", "-i", archive.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(
        list.lines().any(|l| l.ends_with("app:1")),
        "podman lists the image: {list}"
    );
}

/// The same on device-mapper thin, in the VM (tests/vm/run).
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;
    use strata_tests::devmapper_store;

    #[test]
    fn export_then_import_gives_the_same_images() {
        if !require_privileged("images on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        let d = devmapper_store(&w.join("d1"));
        build(&*d, w);
        round_trip(&*d, &*devmapper_store(&w.join("d2")), w, "devmapper");
        // Across backends: the same layers, the same chainIDs.
        let o = overlay_store(&w.join("o1"));
        build(&o, w);
        round_trip(
            &o,
            &*devmapper_store(&w.join("d3")),
            w,
            "overlay-to-devmapper",
        );
        round_trip(&*d, &native_store(&w.join("n1")), w, "devmapper-to-native");
    }

    /// Seed 000 on the backend it was reported on: a layer's thin device deleted behind the
    /// store's back (a prune by another tool) is found before anything is written.
    #[test]
    fn export_refuses_a_missing_layer_before_writing_anything() {
        if !require_privileged("images on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        let s = devmapper_store(&w.join("root"));
        build(&*s, w);
        let base = s.guard(&["app:1"]).unwrap().layers()[0].id;
        strata_tests::delete_behind_the_stores_back(s.root(), base);
        let out = w.join("out");
        let e = s
            .export(&["app:1"], &out, &ExportOptions::default())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
        assert!(
            e.to_string().contains("base") && e.to_string().contains("devmapper"),
            "the error names the layer and the backend: {e}"
        );
        assert!(!out.exists(), "nothing was written");
        // fsck reports it broken; the image stays refused.
        assert_eq!(s.fsck(false).unwrap().broken.len(), 1);
        assert!(s
            .export(&["app:1"], &out, &ExportOptions::default())
            .is_err());
    }

    /// Seed 002: a layer whose stored content changed is found by verify, refused by export.
    #[test]
    fn verify_finds_a_damaged_layer_and_export_refuses_it() {
        if !require_privileged("images on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        let src = overlay_store(&w.join("src"));
        build(&src, w);
        let layout = w.join("layout");
        src.export(&["app:1"], &layout, &ExportOptions::default())
            .unwrap();
        damage_and_verify(&*devmapper_store(&w.join("d-dst")), &layout, w);
    }
}
