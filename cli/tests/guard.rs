//! The export guarantee, for real: a consumer reads every file of every layer an export
//! guard pins while other threads untag, remove and gc, and another process runs `strata gc`
//! and `strata remove` on the same root. The consumer never sees a missing file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use strata::mount::TempMount;
use strata::{Backend, ErrorKind, Labels, Snapshotter, Store, StoreOptions};
use strata_native::NativeBackend;
use strata_overlay::{OverlayBackend, OverlayOptions};

const BIN: &str = env!("CARGO_BIN_EXE_strata");
const LAYERS: usize = 4;
const FILES: usize = 12;

fn can_run() -> bool {
    let ok = rustix::process::geteuid().is_root()
        && fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("overlay");
    if !ok && std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("the export guard test needs root and overlayfs, and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
    }
    if !ok {
        eprintln!("SKIPPED: the export guard test needs root and overlayfs");
    }
    ok
}

/// Builds image `image` (generation `gen`): LAYERS layers, each writing FILES files through
/// a real mount, under a lease so that gc cannot take a layer between commit and the next
/// prepare.
fn build<B: Backend>(s: &Store<B>, tmp: &Path, image: &str, gen: usize) {
    let lease = format!("build/{image}/{gen}");
    s.lease_create(&lease, None).unwrap();
    let mut parent: Option<String> = None;
    for i in 0..LAYERS {
        let name = format!("{image}-g{gen}-l{i}");
        let key = format!("{name}-active");
        let mounts = s.prepare(&key, parent.as_deref(), Labels::new()).unwrap();
        s.lease_add(&lease, &[&key]).unwrap();
        let m = TempMount::new_in(tmp, &mounts).unwrap();
        fs::create_dir(m.path().join(format!("l{i}"))).unwrap();
        for j in 0..FILES {
            fs::write(m.path().join(format!("l{i}/f{j}")), format!("{name}/{j}")).unwrap();
        }
        m.unmount().unwrap();
        s.commit(&name, &key, Labels::new()).unwrap();
        parent = Some(name);
    }
    s.tag(image, parent.as_deref().unwrap()).unwrap();
    s.lease_remove(&lease).unwrap();
}

/// Reads every file of every guarded layer and checks its content; returns files read.
fn consume<B: Backend>(guard: &strata::ExportGuard<'_, B>) -> usize {
    let mut read = 0;
    for layer in guard.layers() {
        // The layer's own directory (native: the whole tree up to it); its files are in l<i>.
        let path = layer.path.as_ref().unwrap();
        let i = layer.index;
        let mut seen = BTreeMap::new();
        for e in fs::read_dir(path.join(format!("l{i}")))
            .unwrap_or_else(|e| panic!("layer {} of {}: {e}", layer.name, layer.image))
        {
            let e = e.unwrap();
            let content = fs::read_to_string(e.path())
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            seen.insert(e.file_name().to_string_lossy().into_owned(), content);
        }
        assert_eq!(seen.len(), FILES, "layer {} lost files", layer.name);
        for (f, content) in seen {
            let j = f.trim_start_matches('f');
            assert_eq!(content, format!("{}/{j}", layer.name));
            read += 1;
        }
    }
    read
}

#[test]
fn a_guarded_export_never_sees_a_missing_file_on_overlay() {
    if !can_run() {
        return;
    }
    export_under_churn("overlay", |root| {
        let b = OverlayBackend::open(root, OverlayOptions::default()).unwrap();
        Store::open(root, b, StoreOptions::default()).unwrap()
    });
}

#[test]
fn a_guarded_export_never_sees_a_missing_file_on_native() {
    if !can_run() {
        return;
    }
    export_under_churn("native", |root| {
        let b = NativeBackend::open(root).unwrap();
        Store::open(root, b, StoreOptions::default()).unwrap()
    });
}

#[cfg(feature = "btrfs")]
#[test]
fn a_guarded_export_never_sees_a_missing_file_on_btrfs() {
    if !can_run() {
        return;
    }
    export_under_churn("btrfs", |root| {
        let b = strata_btrfs::BtrfsBackend::open(root).unwrap();
        Store::open(root, b, StoreOptions::default()).unwrap()
    });
}

fn export_under_churn<B: Backend>(backend: &'static str, open: fn(&Path) -> Store<B>) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    // btrfs roots live on a loop-backed btrfs of the test's own.
    let _fs = (backend == "btrfs").then(|| strata_tests::LoopBtrfs::mount_at(&root, 1 << 30));
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let s = Arc::new(open(&root));
    for k in 0..3 {
        build(&s, &mnt, &format!("img{k}"), 0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let rebuilt = Arc::new(AtomicUsize::new(0));

    // Thread: rebuild an image under a new generation and retag it (tag replaces in one
    // step, so the old chain loses its only holder), untag and retag a scratch image, gc.
    let churn = {
        let (s, stop, rebuilt, mnt) = (
            Arc::clone(&s),
            Arc::clone(&stop),
            Arc::clone(&rebuilt),
            mnt.clone(),
        );
        std::thread::spawn(move || {
            let mut gen = 1;
            while !stop.load(Ordering::Relaxed) {
                build(&s, &mnt, &format!("img{}", gen % 3), gen);
                s.tag("scratch", &format!("img{}", gen % 3)).unwrap();
                s.untag("scratch").unwrap();
                let r = s.gc(false).unwrap();
                assert!(r.failed.is_empty(), "{:?}", r.failed);
                rebuilt.fetch_add(1, Ordering::Relaxed);
                gen += 1;
            }
        })
    };
    // Thread: try to remove every committed snapshot it sees; held ones must refuse.
    let remover = {
        let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for info in s.list(&["kind==committed"]).unwrap() {
                    match s.remove(&info.name) {
                        Ok(()) => {}
                        Err(e) => assert!(
                            matches!(
                                e.kind(),
                                ErrorKind::FailedPrecondition | ErrorKind::NotFound
                            ),
                            "{e}"
                        ),
                    }
                }
            }
        })
    };
    // Another process: gc and remove in a loop.
    let process = {
        let (stop, root) = (Arc::clone(&stop), root.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new(BIN)
                    .arg("--root")
                    .arg(&root)
                    .args(["--backend", backend, "--lock-timeout", "30s", "gc"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let _ = Command::new(BIN)
                    .arg("--root")
                    .arg(&root)
                    .args(["--backend", backend, "remove", "img0-g0-l0"])
                    .output()
                    .unwrap();
                runs += 1;
            }
            runs
        })
    };

    // The consumer: guard all three images, read everything, release; repeat.
    let mut exports = 0;
    let mut files = 0;
    for _ in 0..5000 {
        let guard = s.guard(&["img0", "img1", "img2"]).unwrap();
        files += consume(&guard);
        exports += 1;
        guard.release().unwrap();
        if exports >= 30 && rebuilt.load(Ordering::Relaxed) >= 6 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    remover.join().unwrap();
    let gc_runs = process.join().unwrap();
    eprintln!(
        "{backend}: {exports} exports read {files} files; {} rebuilds and {gc_runs} gc processes ran beside them",
        rebuilt.load(Ordering::Relaxed)
    );
    assert!(
        rebuilt.load(Ordering::Relaxed) >= 6 && gc_runs > 0,
        "the churn must have run"
    );
    assert_eq!(files, exports * 3 * LAYERS * FILES);
}
