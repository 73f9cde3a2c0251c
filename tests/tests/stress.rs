//! The crash campaign of `strata-stress` (RELIABILITY.md), small: a few dozen SIGKILLs per
//! backend at random moments of a random mix of operations, each followed by the checks of
//! `tests/src/bin/strata-stress.rs` (fsck clean after recovery, nothing reported kept lost,
//! every committed layer holding exactly what was written, everything working afterwards).
//! The long runs (1000 kills and more) are the commands in RELIABILITY.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use strata_tests::require_privileged;

const KILLS: &str = "24";

fn campaign(backend: &str, root: &Path, seed: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata-stress"))
        .args([
            "crash",
            "--backend",
            backend,
            "--kills",
            KILLS,
            "--seed",
            seed,
        ])
        .arg("--root")
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{backend}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["kills"], 24, "{summary}");
    assert!(summary["layers_checked"].as_u64().unwrap() > 0, "{summary}");
    eprintln!("{summary}");
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
