//! Builds the C programs under `tests/c` with gcc against the committed header and
//! `libstrata.so` — flags from pkg-config, through a `strata.pc` made from `strata.pc.in` —
//! and runs them under a checker that must report no memory error and no leak: the error
//! paths under valgrind (no definite or indirect leak), the whole cycle under AddressSanitizer
//! and LeakSanitizer, because Debian 12's valgrind (3.19) does not know the `openat2` and
//! `fsopen` system calls that the layer applier and overlay mounts make (it fails them with
//! ENOSYS). Needs root (the programs mount), gcc, pkg-config and valgrind (`scripts/deps
//! test` installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_tests::require_privileged;

/// The directory cargo put `libstrata.so` in (this test runs from its `deps/`). A test
/// cannot depend on a cdylib, so `cargo test` does not build it: scripts/test does (`cargo
/// build --workspace --all-targets`); by hand, `cargo build -p strata-ffi` first. A library
/// older than the crate's sources is refused rather than tested.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let lib = dir.join("libstrata.so");
    let built = std::fs::metadata(&lib)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "no {}: {e}; build it first (cargo build -p strata-ffi, or scripts/test)",
                lib.display()
            )
        });
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = vec![manifest.join("Cargo.toml")];
    for e in std::fs::read_dir(manifest.join("src")).unwrap() {
        sources.push(e.unwrap().path());
    }
    for src in sources {
        let changed = std::fs::metadata(&src).unwrap().modified().unwrap();
        assert!(
            changed <= built,
            "{} is older than {}: rebuild it (cargo build -p strata-ffi, or scripts/test)",
            lib.display(),
            src.display()
        );
    }
    dir
}

fn tool(name: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        found,
        "{name} is missing: apt-get install {package} (scripts/deps test does)"
    );
}

/// A `strata.pc` for the uninstalled library, made from the template the install uses.
fn pkg_config_dir(tmp: &Path, lib: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pc = std::fs::read_to_string(manifest.join("strata.pc.in"))
        .unwrap()
        .replace("@PREFIX@", &manifest.display().to_string())
        .replace("@LIBDIR@", &lib.display().to_string())
        .replace(
            "@INCLUDEDIR@",
            &manifest.join("include").display().to_string(),
        )
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"))
        .replace("@LIBS_PRIVATE@", "-lpthread -ldl -lm");
    let dir = tmp.join("pkgconfig");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("strata.pc"), pc).unwrap();
    dir
}

/// What checks a C program's memory.
#[derive(Clone, Copy)]
enum Checker {
    /// Run under valgrind.
    Valgrind,
    /// Built with AddressSanitizer (LeakSanitizer included).
    Asan,
}

/// Compiles `tests/c/NAME.c` into `tmp` and returns the program's path.
fn build(name: &str, tmp: &Path, checker: Checker) -> PathBuf {
    tool("gcc", "gcc");
    tool("pkg-config", "pkg-config");
    let lib = lib_dir();
    let pc_dir = pkg_config_dir(tmp, &lib);
    let flags = Command::new("pkg-config")
        .args(["--cflags", "--libs", "strata"])
        .env("PKG_CONFIG_PATH", &pc_dir)
        .output()
        .unwrap();
    assert!(flags.status.success(), "pkg-config: {flags:?}");
    let flags = String::from_utf8(flags.stdout).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c");
    let exe = tmp.join(name);
    let out = Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-pthread"])
        .args(match checker {
            Checker::Valgrind => &[][..],
            Checker::Asan => &["-fsanitize=address", "-fno-omit-frame-pointer"][..],
        })
        .arg(src.join(format!("{name}.c")))
        .arg("-I")
        .arg(&src)
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc {name}.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs `exe WORKDIR BACKEND` under its checker with a new directory `TMP/work-BACKEND`;
/// fails on any error or leak it reports.
fn run(exe: &Path, backend: &str, tmp: &Path, checker: Checker) {
    let work = tmp.join(format!("work-{backend}"));
    std::fs::create_dir_all(&work).unwrap();
    run_in(exe, backend, &work, checker);
}

/// [`run`] in the existing directory `work`.
fn run_in(exe: &Path, backend: &str, work: &Path, checker: Checker) {
    let mut cmd = match checker {
        Checker::Valgrind => {
            tool("valgrind", "valgrind");
            let mut c = Command::new("valgrind");
            c.args([
                "--error-exitcode=99",
                "--errors-for-leak-kinds=definite,indirect",
                "--leak-check=full",
                "--show-leak-kinds=definite,indirect",
                "--quiet",
            ])
            .arg(exe);
            c
        }
        Checker::Asan => {
            let mut c = Command::new(exe);
            c.env("ASAN_OPTIONS", "detect_leaks=1:exitcode=99")
                .env("LSAN_OPTIONS", "exitcode=99");
            c
        }
    };
    let out = cmd.arg(work).arg(backend).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} {backend} exited {:?} (99: the checker found errors)\nstdout:\n{stdout}\nstderr:\n{stderr}",
        exe.display(),
        out.status.code()
    );
    assert!(stdout.contains(": ok"), "{stdout}");
}

#[test]
fn the_whole_cycle_from_c_on_native() {
    if !require_privileged("the C cycle (mounts)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = build("cycle", tmp.path(), Checker::Asan);
    run(&exe, "native", tmp.path(), Checker::Asan);
}

#[test]
fn the_whole_cycle_from_c_on_overlay() {
    if !require_privileged("the C cycle on overlay") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = build("cycle", tmp.path(), Checker::Asan);
    run(&exe, "overlay", tmp.path(), Checker::Asan);
}

/// The btrfs backend is reachable from C too (its directory on a btrfs of the test's own).
#[cfg(feature = "btrfs")]
#[test]
fn the_whole_cycle_from_c_on_btrfs() {
    if !require_privileged("the C cycle on btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = build("cycle", tmp.path(), Checker::Asan);
    let work = tmp.path().join("work-btrfs");
    let _fs = strata_tests::LoopBtrfs::mount_at(&work, 512 << 20);
    run_in(&exe, "btrfs", &work, Checker::Asan);
}

#[test]
fn error_paths_and_threads_from_c() {
    if !require_privileged("the C error paths") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = build("errors", tmp.path(), Checker::Valgrind);
    run(&exe, "native", tmp.path(), Checker::Valgrind);
}

#[test]
fn images_leases_gc_export_import_copy_from_c() {
    if !require_privileged("the C image calls") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = build("images", tmp.path(), Checker::Asan);
    run(&exe, "overlay", tmp.path(), Checker::Asan);
}

/// The devmapper backend from C, in the VM (tests/vm/run): each store has its place in the
/// test process's thin pool.
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;

    #[test]
    fn the_whole_cycle_from_c() {
        if !require_privileged("the C cycle on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let exe = build("cycle", tmp.path(), Checker::Asan);
        let work = tmp.path().join("work-devmapper");
        let _a = strata_tests::DevmapperPool::create(&work.join("a"));
        let _b = strata_tests::DevmapperPool::create(&work.join("b"));
        run_in(&exe, "devmapper", &work, Checker::Asan);
    }
}
