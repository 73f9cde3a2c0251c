//! Shared helpers of the mount tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod sim;

use std::fs;
use std::path::{Path, PathBuf};

use strata::Mount;

/// Whether we can mount here; under STRATA_REQUIRE_PRIVILEGED=1 a test that cannot fails.
pub fn can_mount() -> bool {
    let root = rustix::process::geteuid().is_root();
    let overlay = fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("overlay");
    if root && overlay {
        return true;
    }
    if std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("this test needs root and overlayfs, and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
    }
    eprintln!("SKIPPED: needs root and overlayfs");
    false
}

/// `n` lower directories under `base`, named by `name(i)`, each holding `f<i>` and an
/// overwritten `top` file; returns them top-most first.
pub fn lowers(base: &Path, n: usize, name: impl Fn(usize) -> String) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for i in 0..n {
        let d = base.join(name(i));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("f{i}")), i.to_string()).unwrap();
        fs::write(d.join("top"), i.to_string()).unwrap();
        dirs.push(d);
    }
    dirs.reverse();
    dirs
}

/// An overlay mount of `lowers` (top first), with an upper and work dir under `base`.
pub fn overlay(base: &Path, lowers: &[PathBuf], writable: bool) -> Mount {
    let mut options = Vec::new();
    if writable {
        for d in ["upper", "work"] {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        options.push(format!("workdir={}", base.join("work").display()));
        options.push(format!("upperdir={}", base.join("upper").display()));
    }
    let l: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    options.push(format!("lowerdir={}", l.join(":")));
    Mount {
        fs_type: "overlay".into(),
        source: "overlay".into(),
        options,
    }
}
