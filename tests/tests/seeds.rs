//! The four seed stories of `shared/seeds/`, on every backend: what lost Docker and BuildKit
//! users their builds must work here.
//!
//! * 000 — a prune removed layers a cached `COPY --from` chain needed ("layer does not
//!   exist"): the example program `multistage` builds, prunes, rebuilds from the cache (every
//!   step a hit, an unchanged COPY included), exports and imports; here it runs on every
//!   backend, and an export runs while gc runs beside it.
//! * 001 — a multi-stage build's cache exported in one layout: a fresh store imports it and a
//!   rebuild after one input changed makes only the layers that depend on it.
//! * 002 — a cached COPY layer that came back empty: `verify` finds it, export refuses it.
//! * 004 — a checksum that followed dangling symlinks: copying `/` without `/opt` and then
//!   `/opt` gives the same tree and the same checksum, symlinks kept as they were.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata::copy::CopyOptions;
use strata::{Backend, ErrorKind, ExportOptions, Labels, Snapshotter, Store};
use strata_tests::{
    check_directory_equal, native_store, overlay_store, require_privileged, Mounted,
};

/// The example program, which `cargo test` builds next to the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples").join(name);
    // Built again unless fresh: a test run of this file alone must not use a stale one. In
    // the VM (tests/vm/run) there is no cargo, and `cargo test --no-run` built it just now.
    if std::env::var_os("STRATA_IN_VM").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "strata-tests",
                "--all-features",
                "--example",
                name,
            ])
            .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
            .status()
            .unwrap();
        assert!(status.success(), "building the {name} example");
    }
    bin
}

#[test]
fn seed_000_prune_then_rebuild_from_the_cache_then_export() {
    if !require_privileged("seed 000") {
        return;
    }
    let bin = example("multistage");
    assert!(
        bin.exists(),
        "{} is missing: cargo test builds the examples",
        bin.display()
    );
    let backends: &[&str] = &[
        "overlay",
        "native",
        #[cfg(feature = "btrfs")]
        "btrfs",
    ];
    for backend in backends {
        multistage(&bin, backend);
    }
}

/// Runs the example's story on `backend` and checks what it printed.
fn multistage(bin: &Path, backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    // btrfs needs its directory on btrfs: one of the test's own.
    let dir = tmp.path().join("work");
    let _fs = (backend == "btrfs").then(|| strata_tests::LoopBtrfs::mount_at(&dir, 512 << 20));
    let out = Command::new(bin).arg(backend).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{backend}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("rebuild of level3: 0 step(s) built, 3 cache hit(s)"),
        "{text}"
    );
    assert!(text.contains("the imported level3 has its files"), "{text}");
}

/// Commits `name` on `parent` with `files` written in it.
fn stage<B: Backend>(
    s: &Store<B>,
    work: &Path,
    parent: Option<&str>,
    name: &str,
    files: &[(&str, &[u8])],
) {
    let key = format!("{name}-a");
    let m = Mounted::new(
        &s.prepare(&key, parent, Labels::new()).unwrap(),
        &work.join("m"),
    );
    for (p, c) in files {
        let at = m.path().join(p);
        fs::create_dir_all(at.parent().unwrap()).unwrap();
        fs::write(at, c).unwrap();
    }
    m.unmount();
    s.commit(name, &key, Labels::new()).unwrap();
}

/// The export guarantee while gc runs beside it (seed 000's prune racing the export).
fn export_beside_gc<B: Backend + Sync>(s: &Store<B>, work: &Path, what: &str) {
    stage(s, work, None, "g-base", &[("base", b"base")]);
    stage(s, work, Some("g-base"), "g-top", &[("top", b"top")]);
    s.tag("g:1", "g-top").unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let gc = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.gc(false).unwrap();
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            n
        });
        let results: Vec<_> = (0..5)
            .map(|i| {
                let out = work.join(format!("{what}-{i}"));
                s.export(&["g:1"], &out, &ExportOptions::default())
                    .map(|_| out.join("index.json").exists())
            })
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in results {
            assert!(r.unwrap(), "the layout is complete");
        }
        assert!(gc.join().unwrap() > 0, "gc ran during the exports");
    });
}

#[test]
fn seed_000_export_while_gc_runs() {
    if !require_privileged("seed 000") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    export_beside_gc(&overlay_store(&tmp.path().join("o")), tmp.path(), "overlay");
    export_beside_gc(&native_store(&tmp.path().join("n")), tmp.path(), "native");
    #[cfg(feature = "btrfs")]
    export_beside_gc(
        &*strata_tests::btrfs_store(&tmp.path().join("b"), 512 << 20),
        tmp.path(),
        "btrfs",
    );
}

/// Seed 001: three stages, two feeding the last; one layout; a fresh store; a rebuild after
/// one input changed.
fn three_stages<B: Backend>(s: &Store<B>, fresh: &Store<B>, work: &Path) {
    stage(s, work, None, "base", &[("etc/os", b"strata")]);
    stage(s, work, Some("base"), "deps", &[("deps/lib", b"lib v1")]);
    stage(
        s,
        work,
        Some("base"),
        "assets",
        &[("assets/logo", b"logo v1")],
    );
    // The last stage copies from both, keyed by the checksums of what it copies.
    let build_final = |st: &Store<B>, deps: &str, assets: &str, suffix: &str| -> (String, usize) {
        let mut built = 0;
        let mut parent = "base".to_string();
        for (i, (from, src)) in [(deps, "/deps"), (assets, "/assets")]
            .into_iter()
            .enumerate()
        {
            let key = strata::layer::Digest::of(
                format!(
                    "{parent}|COPY {src}|{}",
                    st.checksum(from, &[src], &[]).unwrap()
                )
                .as_bytes(),
            )
            .to_string();
            let filter = format!("labels.\"strata.cache-key\"=={key}");
            if let Some(hit) = st.list(&[filter.as_str()]).unwrap().into_iter().next() {
                parent = hit.name;
                continue;
            }
            let active = format!("final-{i}{suffix}-a");
            st.prepare(&active, Some(&parent), Labels::new()).unwrap();
            st.copy(from, &[src], &active, src, &CopyOptions::default())
                .unwrap();
            let mut labels = Labels::new();
            labels.insert("strata.cache-key".into(), key);
            let name = format!("final-{i}{suffix}");
            st.commit(&name, &active, labels).unwrap();
            built += 1;
            parent = name;
        }
        (parent, built)
    };
    let (top, built) = build_final(s, "deps", "assets", "");
    assert_eq!(built, 2);
    s.tag("app:final", &top).unwrap();
    s.tag("app:deps", "deps").unwrap();
    s.tag("app:assets", "assets").unwrap();
    let layout = work.join("cache-layout");
    let report = s
        .export(
            &["app:final", "app:deps", "app:assets"],
            &layout,
            &ExportOptions::default(),
        )
        .unwrap();
    // Five layers, but a COPY of /deps onto base is the very layer deps made (same tar,
    // same blob, same chainID), and so for /assets: three layer blobs, three configs and
    // three manifests, each written once.
    assert_eq!((report.diffed, report.blobs), (5, 9), "{report:?}");
    let imported = fresh.import(&layout, None).unwrap();
    assert_eq!(imported.images.len(), 3);
    // base, final's two COPY layers, and assets on base; deps on base is the chain of
    // final's first COPY, and base is shared: three cache hits.
    assert_eq!(
        (imported.applied, imported.cached),
        (4, 3),
        "each distinct chain applied once: {imported:?}"
    );
    let v = Mounted::new(
        &fresh.view("v", Some("app:final"), Labels::new()).unwrap(),
        &work.join("v"),
    );
    assert_eq!(fs::read(v.path().join("deps/lib")).unwrap(), b"lib v1");
    assert_eq!(fs::read(v.path().join("assets/logo")).unwrap(), b"logo v1");
    drop(v);
    // Change one input: only the layers that depend on it are new.
    stage(
        s,
        work,
        Some("base"),
        "assets-2",
        &[("assets/logo", b"logo v2")],
    );
    let (top2, built) = build_final(s, "deps", "assets-2", "-2");
    assert_eq!(
        built, 1,
        "the COPY from deps is a hit, the COPY from assets is new"
    );
    assert_ne!(top2, top);
    assert_eq!(s.stat(&top2).unwrap().parent.as_deref(), Some("final-0"));
}

#[test]
fn seed_001_a_multi_stage_cache_in_one_layout() {
    if !require_privileged("seed 001") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    for d in ["o", "n", "b"] {
        fs::create_dir(w.join(d)).unwrap();
    }
    three_stages(
        &overlay_store(&w.join("o1")),
        &overlay_store(&w.join("o2")),
        &w.join("o"),
    );
    three_stages(
        &native_store(&w.join("n1")),
        &native_store(&w.join("n2")),
        &w.join("n"),
    );
    #[cfg(feature = "btrfs")]
    three_stages(
        &*strata_tests::btrfs_store(&w.join("b1"), 512 << 20),
        &*strata_tests::btrfs_store(&w.join("b2"), 512 << 20),
        &w.join("b"),
    );
}

/// Seed 002: an imported image whose last layer is a COPY; its stored content is damaged.
fn damaged_copy<B: Backend>(src: &Store<B>, dst: &Store<B>, work: &Path) {
    stage(src, work, None, "base", &[("etc/os", b"strata")]);
    stage(
        src,
        work,
        None,
        "builder",
        &[("out/app.bin", &b"\x7fELF binary"[..])],
    );
    src.prepare("copy-a", Some("base"), Labels::new()).unwrap();
    src.copy(
        "builder",
        &["/out/app.bin"],
        "copy-a",
        "/usr/bin/app",
        &CopyOptions::default(),
    )
    .unwrap();
    src.commit("copied", "copy-a", Labels::new()).unwrap();
    src.tag("app:1", "copied").unwrap();
    let layout = work.join("layout-002");
    src.export(&["app:1"], &layout, &ExportOptions::default())
        .unwrap();
    dst.import(&layout, None).unwrap();
    let a = Mounted::new(
        &src.view("va", Some("app:1"), Labels::new()).unwrap(),
        &work.join("va"),
    );
    let b = Mounted::new(
        &dst.view("vb", Some("app:1"), Labels::new()).unwrap(),
        &work.join("vb"),
    );
    check_directory_equal(a.path(), b.path()).unwrap();
    drop((a, b));
    let copy_layer = dst.guard(&["app:1"]).unwrap().layers()[1].clone();
    // The COPY layer "comes back empty".
    strata_tests::change_stored_layer(dst.root(), &copy_layer, &work.join("damage"), |dir| {
        fs::remove_file(dir.join("usr/bin/app")).unwrap()
    });
    let report = dst.verify(&[]).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    let e = dst
        .export(
            &["app:1"],
            &work.join("never"),
            &ExportOptions {
                verify: true,
                ..ExportOptions::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
    assert!(!work.join("never").exists());
    let _ = fs::remove_dir_all(&layout);
}

#[test]
fn seed_002_a_copy_layer_that_came_back_empty_is_refused() {
    if !require_privileged("seed 002") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    damaged_copy(
        &overlay_store(&w.join("o1")),
        &overlay_store(&w.join("o2")),
        w,
    );
    damaged_copy(
        &native_store(&w.join("n1")),
        &native_store(&w.join("n2")),
        w,
    );
    #[cfg(feature = "btrfs")]
    damaged_copy(
        &*strata_tests::btrfs_store(&w.join("b1"), 512 << 20),
        &*strata_tests::btrfs_store(&w.join("b2"), 512 << 20),
        w,
    );
}

/// Seed 004: a base full of dangling symlinks; `/` without `/opt`, then `/opt`.
fn dangling<B: Backend>(s: &Store<B>, work: &Path) -> strata::layer::Digest {
    let m = Mounted::new(
        &s.prepare("base-a", None, Labels::new()).unwrap(),
        &work.join("m"),
    );
    let r = m.path();
    for pkg in ["bash", "coreutils", "libc6"] {
        let doc = r.join("usr/share/doc").join(pkg);
        fs::create_dir_all(&doc).unwrap();
        std::os::unix::fs::symlink(
            "../../../../nonexistent/NEWS.Debian.gz",
            doc.join("NEWS.Debian.gz"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/usr/share/common-licenses/GPL-3", doc.join("copyright"))
            .unwrap();
        fs::write(doc.join("README"), pkg).unwrap();
    }
    fs::create_dir_all(r.join("opt/tool/bin")).unwrap();
    fs::write(r.join("opt/tool/bin/run"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("/opt/tool/missing", r.join("opt/tool/bin/dangling")).unwrap();
    m.unmount();
    s.commit("base", "base-a", Labels::new()).unwrap();

    s.prepare("copy-a", None, Labels::new()).unwrap();
    let without_opt = CopyOptions {
        excludes: vec!["/opt".into()],
        ..CopyOptions::default()
    };
    s.copy("base", &["/"], "copy-a", "/", &without_opt).unwrap();
    s.copy("base", &["/opt"], "copy-a", "/opt", &CopyOptions::default())
        .unwrap();
    s.commit("copy", "copy-a", Labels::new()).unwrap();

    let whole = s.checksum("base", &[], &[]).unwrap();
    assert_eq!(
        s.checksum("copy", &[], &[]).unwrap(),
        whole,
        "the same tree, the same checksum"
    );
    assert_eq!(
        s.checksum("base", &[], &["/opt".into()]).unwrap(),
        s.checksum("copy", &[], &["/opt".into()]).unwrap()
    );
    let a = Mounted::new(
        &s.view("va", Some("base"), Labels::new()).unwrap(),
        &work.join("va"),
    );
    let b = Mounted::new(
        &s.view("vb", Some("copy"), Labels::new()).unwrap(),
        &work.join("vb"),
    );
    check_directory_equal(a.path(), b.path()).unwrap();
    assert_eq!(
        fs::read_link(b.path().join("usr/share/doc/bash/NEWS.Debian.gz")).unwrap(),
        Path::new("../../../../nonexistent/NEWS.Debian.gz"),
        "symlinks kept as they were"
    );
    whole
}

#[test]
fn seed_004_dangling_symlinks_are_content_not_errors() {
    if !require_privileged("seed 004") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let o = dangling(&overlay_store(&w.join("o")), w);
    let n = dangling(&native_store(&w.join("n")), w);
    assert_eq!(
        o, n,
        "the same tree gives the same checksum on every backend"
    );
    #[cfg(feature = "btrfs")]
    assert_eq!(
        dangling(&*strata_tests::btrfs_store(&w.join("b"), 512 << 20), w),
        o,
        "btrfs too"
    );
}

/// The seed stories on device-mapper thin (seed 000 was reported on devicemapper), in the VM
/// (tests/vm/run).
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;
    use strata_tests::devmapper_store;

    #[test]
    fn seed_000_prune_then_rebuild_from_the_cache_then_export() {
        if require_privileged("seed 000 on devmapper") {
            multistage(&example("multistage"), "devmapper");
        }
    }

    #[test]
    fn seed_000_export_while_gc_runs() {
        if !require_privileged("seed 000 on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let s = devmapper_store(&tmp.path().join("d"));
        export_beside_gc(&*s, tmp.path(), "devmapper");
    }

    #[test]
    fn seed_001_a_multi_stage_cache_in_one_layout() {
        if !require_privileged("seed 001 on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        fs::create_dir(w.join("d")).unwrap();
        three_stages(
            &*devmapper_store(&w.join("d1")),
            &*devmapper_store(&w.join("d2")),
            &w.join("d"),
        );
    }

    #[test]
    fn seed_002_a_copy_layer_that_came_back_empty_is_refused() {
        if !require_privileged("seed 002 on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        damaged_copy(
            &*devmapper_store(&w.join("d1")),
            &*devmapper_store(&w.join("d2")),
            w,
        );
    }

    #[test]
    fn seed_004_dangling_symlinks_are_content_not_errors() {
        if !require_privileged("seed 004 on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        let n = dangling(&native_store(&w.join("n")), w);
        let d = dangling(&*devmapper_store(&w.join("d")), w);
        assert_eq!(d, n, "the same tree gives the same checksum on devmapper");
    }
}
