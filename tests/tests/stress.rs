//! The crash campaign of `strata-stress` (RELIABILITY.md), small: a few dozen SIGKILLs per
//! backend at random moments of a random mix of operations, each followed by the checks of
//! `tests/src/bin/strata-stress/` (fsck clean after recovery, nothing reported kept lost,
//! every committed layer holding exactly what was written, everything working afterwards).
//! Then the full-disk campaign, one round of each operation per backend. The long runs
//! (1000 kills and more, 40 full-disk rounds) are the commands in RELIABILITY.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use strata_tests::require_privileged;

const KILLS: &str = "24";

/// Runs `strata-stress MODE --backend B --root ROOT ARGS...`; returns its JSON summary.
fn stress(mode: &str, backend: &str, root: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_strata-stress"))
        .args([mode, "--backend", backend])
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{mode} on {backend}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{summary}");
    summary
}

fn campaign(backend: &str, root: &Path, seed: &str) {
    let summary = stress("crash", backend, root, &["--kills", KILLS, "--seed", seed]);
    assert_eq!(summary["kills"], 24, "{summary}");
    assert!(summary["layers_checked"].as_u64().unwrap() > 0, "{summary}");
}

#[test]
fn crash_campaign_on_native() {
    if !require_privileged("the crash campaign on native (bind mounts)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    campaign("native", &tmp.path().join("root"), "11");
}

#[test]
fn crash_campaign_on_overlay() {
    if !require_privileged("the crash campaign on overlay") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    campaign("overlay", &tmp.path().join("root"), "12");
}

#[cfg(feature = "btrfs")]
#[test]
fn crash_campaign_on_btrfs() {
    if !require_privileged("the crash campaign on btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fs = strata_tests::LoopBtrfs::mount_at(&tmp.path().join("btrfs"), 1 << 30);
    campaign("btrfs", &fs.path().join("root"), "13");
}

/// The full-disk campaign, one round of each operation: each fails saying the disk is full
/// (or succeeds), keeps what was kept, leaks nothing, and the space comes back.
fn full_disk(backend: &str, mountpoint: &Path) {
    let summary = stress(
        "enospc",
        backend,
        mountpoint,
        &["--rounds", "4", "--size", "64"],
    );
    let outcomes = summary["outcomes"].as_object().unwrap();
    assert_eq!(outcomes.len(), 4, "{summary}");
    // apply-layer, copy and import bring more than there is room for.
    for op in ["apply-layer", "copy", "import"] {
        assert_eq!(outcomes[op]["failed_full"], 1, "{op}: {summary}");
    }
}

#[test]
fn full_disk_on_native() {
    if !require_privileged("a full ext4 under native") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    full_disk("native", &tmp.path().join("fs"));
}

#[test]
fn full_disk_on_overlay() {
    if !require_privileged("a full ext4 under overlay") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    full_disk("overlay", &tmp.path().join("fs"));
}

#[cfg(feature = "btrfs")]
#[test]
fn full_disk_on_btrfs() {
    if !require_privileged("a full btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    full_disk("btrfs", &tmp.path().join("fs"));
}
