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

/// The concurrency campaign: 5 threads (one running gc every few ms, one exporting) and 2
/// worker processes on one store for 12 s; then the crash campaign's checks and the
/// accounting check.
fn concurrency(backend: &str, root: &Path, seed: &str) {
    let summary = stress(
        "concurrent",
        backend,
        root,
        &[
            "--threads",
            "5",
            "--procs",
            "2",
            "--secs",
            "12",
            "--seed",
            seed,
        ],
    );
    let by_op = summary["by_operation"].as_object().unwrap();
    for op in ["build", "apply-layer", "export", "gc"] {
        assert!(
            by_op[op][0].as_u64().unwrap() > 0,
            "no {op} succeeded: {summary}"
        );
    }
    // Removes may all be refused (a child or another image holds the layer): they ran.
    let removes = &by_op["remove"];
    assert!(
        removes[0].as_u64().unwrap() + removes[1].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(summary["layers_checked"].as_u64().unwrap() > 0, "{summary}");
}

#[test]
fn concurrency_campaign_on_native() {
    if !require_privileged("the concurrency campaign on native (bind mounts)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    concurrency("native", &tmp.path().join("root"), "21");
}

#[test]
fn concurrency_campaign_on_overlay() {
    if !require_privileged("the concurrency campaign on overlay") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    concurrency("overlay", &tmp.path().join("root"), "22");
}

#[cfg(feature = "btrfs")]
#[test]
fn concurrency_campaign_on_btrfs() {
    if !require_privileged("the concurrency campaign on btrfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fs = strata_tests::LoopBtrfs::mount_at(&tmp.path().join("btrfs"), 1 << 30);
    concurrency("btrfs", &fs.path().join("root"), "23");
}

/// The campaigns on devmapper, in the VM (tests/vm/run; the host kernel has no
/// device-mapper). Each makes a loop-backed thin pool of its own and must take it down: no
/// device-mapper device or loop device of it is left.
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;

    /// The kills of the crash campaign: `STRATA_STRESS_KILLS` when set (the long run of
    /// RELIABILITY.md, through `tests/vm/run --env`), else 24.
    fn kills() -> u64 {
        std::env::var("STRATA_STRESS_KILLS").map_or(24, |v| v.parse().unwrap())
    }

    /// `STRATA_STRESS_MAX_SECS`: a time limit for the crash campaign (it stops after the
    /// kill that passes it and reports how many it made), for a long run that must end in
    /// time; none when unset.
    fn max_secs() -> Option<String> {
        std::env::var("STRATA_STRESS_MAX_SECS").ok()
    }

    /// `STRATA_STRESS_ROUNDS` when set, else 4: one round of each operation.
    fn rounds() -> u64 {
        std::env::var("STRATA_STRESS_ROUNDS").map_or(4, |v| v.parse().unwrap())
    }

    /// [`stress`], with the campaign's progress lines going straight to the test's standard
    /// error: a run stopped from outside (the VM's timeout) still shows how far it got.
    ///
    /// `STRATA_STRESS_BIN`: another build of `strata-stress` to run (a release build, for the
    /// long runs under emulation, where the test profile's is several times slower).
    fn stress_live(mode: &str, root: &Path, args: &[&str]) -> serde_json::Value {
        let bin = std::env::var_os("STRATA_STRESS_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_strata-stress").into());
        let out = Command::new(bin)
            .args([mode, "--backend", "devmapper"])
            .arg("--root")
            .arg(root)
            .args(args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{mode} on devmapper failed (its errors above)"
        );
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("{summary}");
        summary
    }

    /// Nothing of the campaign's pool is left: none of the device-mapper devices named in its
    /// summary (the pool, its linear devices, the thin devices) and no loop device over a file
    /// under `dir`.
    fn nothing_left(summary: &serde_json::Value, dir: &Path) {
        let names = summary["dm_names"].as_array().unwrap();
        let ls = Command::new("dmsetup").arg("ls").output().unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout);
        for name in names {
            let name = name.as_str().unwrap();
            assert!(!ls.contains(name), "{name} is left in `dmsetup ls`: {ls}");
        }
        let dir = std::fs::canonicalize(dir).unwrap();
        let mut loops = String::new();
        // Detaching a loop device completes a moment after losetup returns.
        for _ in 0..50 {
            let out = Command::new("losetup").arg("-l").output().unwrap();
            loops = String::from_utf8_lossy(&out.stdout).into_owned();
            if !loops.contains(dir.to_str().unwrap()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("loop devices over the campaign's files are left: {loops}");
    }

    #[test]
    fn crash_campaign() {
        if !require_privileged("the crash campaign on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let kills = kills().to_string();
        // Under emulation a worker needs most of a second to open the store: kills up to 3 s
        // in land in its operations too.
        // `STRATA_STRESS_SEED`: another sequence of operations (a long run's).
        let seed = std::env::var("STRATA_STRESS_SEED").unwrap_or_else(|_| "14".into());
        let mut args = vec!["--kills", &kills, "--seed", &seed, "--max-ms", "3000"];
        let limit = max_secs();
        if let Some(secs) = &limit {
            args.extend(["--max-secs", secs]);
        }
        let summary = stress_live("crash", &tmp.path().join("root"), &args);
        if limit.is_none() {
            assert_eq!(summary["kills"].to_string(), kills, "{summary}");
        }
        assert!(summary["layers_checked"].as_u64().unwrap() > 0, "{summary}");
        nothing_left(&summary, tmp.path());
    }

    /// The concurrency campaign on a thin pool of its own: 3 threads (gc, exports, a
    /// builder) and a worker process for 20 s, then the checks and the accounting check.
    /// Its first run found an export guard marking a healthy layer broken ("its storage is
    /// missing from the devmapper backend"): two users activating one device raced
    /// (RELIABILITY.md); device activation now holds the backend's device lock.
    #[test]
    fn concurrency_campaign() {
        if !require_privileged("the concurrency campaign on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let summary = stress_live(
            "concurrent",
            &tmp.path().join("root"),
            &[
                "--threads",
                "3",
                "--procs",
                "1",
                "--secs",
                "20",
                "--seed",
                "24",
            ],
        );
        let by_op = summary["by_operation"].as_object().unwrap();
        assert!(by_op["build"][0].as_u64().unwrap() > 0, "{summary}");
        assert!(by_op["gc"][0].as_u64().unwrap() > 0, "{summary}");
        assert!(summary["layers_checked"].as_u64().unwrap() > 0, "{summary}");
        nothing_left(&summary, tmp.path());
    }

    /// The campaign's setup hashes, exports and compresses layers of 12 and 24 MiB: under
    /// emulation that needs the optimised SHA-256 and compressors the workspace's test
    /// profile builds (Cargo.toml); with them unoptimised it did not finish in 16 minutes.
    #[test]
    fn full_disk_campaign() {
        if !require_privileged("a full thin pool") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let rounds = rounds();
        let summary = stress_live(
            "enospc",
            &tmp.path().join("fs"),
            &["--rounds", &rounds.to_string(), "--seed", "15"],
        );
        let outcomes = summary["outcomes"].as_object().unwrap();
        assert_eq!(outcomes.len(), 4.min(rounds as usize), "{summary}");
        // apply-layer and import bring more than there is room for, and commit them.
        for op in ["apply-layer", "import"] {
            assert!(
                outcomes[op]["failed_full"].as_u64().unwrap() >= 1,
                "{op}: {summary}"
            );
        }
        // A copy into an Active snapshot may end before the pool sees its writes (they wait
        // in the page cache of the snapshot's file system): the full pool refuses the
        // snapshot at its commit instead. Either way the campaign's checks found nothing lost.
        let copy = &outcomes["copy"];
        assert!(
            copy["failed_full"].as_u64().unwrap() + copy["succeeded"].as_u64().unwrap() >= 1,
            "{summary}"
        );
        nothing_left(&summary, tmp.path());
    }
}
