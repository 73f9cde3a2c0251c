//! `strata bench` from the command line: the documented fields, every workload on every
//! backend (devmapper in the VM), the refusal of a chain overlay cannot stack. In a binary of
//! its own so that the VM runs it beside the crash tests rather than after them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::process::Command;

use serde_json::Value;

mod common;
use common::{can_run, Root, BACKENDS, BIN};

#[test]
fn bench_reports_the_documented_fields() {
    if !can_run("bench", false) {
        return;
    }
    let out = Command::new(BIN)
        .args([
            "--json",
            "bench",
            "--workload",
            "empty-chain",
            "--layers",
            "50",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["results"][0];
    assert_eq!(r["workload"], "empty-chain");
    // Not a terminal (and --json): no progress bar on stderr.
    let plain = Command::new(BIN)
        .args(["bench", "-w", "empty-chain", "--layers", "20"])
        .output()
        .unwrap();
    assert!(plain.status.success());
    assert!(
        plain.stderr.is_empty(),
        "no progress bar unless stderr is a terminal: {}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert_eq!(r["layers"], 50);
    for field in ["layers_per_s", "p50_ms", "p99_ms"] {
        assert!(r[field].as_f64().unwrap() > 0.0, "{field}: {r}");
    }
    assert!(r["p99_ms"].as_f64() >= r["p50_ms"].as_f64());

    // Past the depth where overlay mounts through flattened lowers: the deep workload runs
    // and reports its figures by depth.
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().join("store");
    let out = Command::new(BIN)
        .arg("--root")
        .arg(&root_arg)
        .args([
            "--no-sync",
            "bench",
            "--backend",
            "overlay",
            "-w",
            "deep",
            "--depth",
            "200",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let depths: Vec<u64> = v["results"][0]["by_depth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert!(d["mount_p50_ms"].as_f64().unwrap() > 0.0, "{d}");
            d["depth"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(depths, [1, 50, 100, 200]);
    // The chain is left in the root: its prepares past 128 layers mounted through the
    // flattened lowers of depths 128, 160 and 192, which `strata flattened` lists; gc removes
    // the chain (nothing holds it) and them with it.
    let strata = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("--root")
            .arg(&root_arg)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let flats = strata(&["--json", "flattened"]);
    let depths: Vec<u64> = flats
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(
                f["size"].as_u64().unwrap() > 0 && f["inodes"].as_u64().unwrap() > 0,
                "{f}"
            );
            f["depth"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(depths, [128, 160, 192]);
    strata(&["--json", "gc"]);
    assert_eq!(strata(&["--json", "flattened"]), serde_json::json!([]));
}

/// Every workload of `strata bench`, small, on `backend`: each reports what the README says.
fn bench_every_workload(backend: &'static str) {
    let r = Root::new(backend);
    let svg = r.dir.path().join("bench.svg");
    let v = r.ok(&[
        "bench",
        "--layers",
        "12",
        "--depth",
        "12",
        "--threads",
        "3",
        "--rounds",
        "1",
        "--tree-files",
        "200",
        "--tree-big",
        "1",
        "--tree-big-size",
        "1M",
        "--repeat",
        "2",
        "--compression",
        "none",
        "--compression",
        "zstd",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let rows = v["results"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["workload"].as_str().unwrap())
        .collect();
    let standard = [
        "empty-chain",
        "empty-flat",
        "small-files",
        "containerd-benchsuite",
        "diff",
        "diff",
        "apply",
        "apply",
        "deep",
        "concurrent",
        "idmap",
    ];
    assert_eq!(
        names, standard,
        "the standard set, diff and apply once per compression"
    );
    for row in rows {
        let w = row["workload"].as_str().unwrap();
        assert_eq!(row["backend"], backend, "{row}");
        assert!(row["ops"].as_u64().unwrap() > 0, "{row}");
        let (p50, p99) = (
            row["p50_ms"].as_f64().unwrap(),
            row["p99_ms"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p99 >= p50, "{row}");
        assert!(row["peak_rss_bytes"].as_u64().unwrap() > 0, "{row}");
        let has = |k: &str| row[k].as_f64().is_some_and(|x| x > 0.0);
        if !matches!(w, "diff" | "apply" | "idmap") {
            assert!(has("layers_per_s"), "{w}: {row}");
        }
        if w == "idmap" {
            // Two idmapped prepares and mounts, one chowned copy to compare with.
            assert_eq!(row["ops"], 2, "{row}");
            for k in ["prepare_p50_ms", "mount_p50_ms", "chown_p50_ms"] {
                assert!(has(k), "{k}: {row}");
            }
        }
        if matches!(
            w,
            "small-files" | "containerd-benchsuite" | "diff" | "apply"
        ) {
            assert!(has("mb_per_s"), "{w} moves bytes: {row}");
        }
        if matches!(w, "diff" | "apply") {
            assert!(
                has("entries_per_s") && row["blob_bytes"].as_u64() > Some(1 << 20),
                "{row}"
            );
        }
        if w == "deep" {
            let depths: Vec<u64> = row["by_depth"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["depth"].as_u64().unwrap())
                .collect();
            assert_eq!(depths, [1, 3, 6, 12], "{row}");
        }
    }
    assert_eq!(rows[4]["params"]["compression"], "none");
    assert_eq!(rows[5]["params"]["compression"], "zstd");
    let chart = fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"),
        "{chart}"
    );
    for name in [
        "empty-chain",
        "containerd-benchsuite",
        "diff (zstd)",
        "apply (none)",
    ] {
        assert!(chart.contains(name), "the chart shows {name}: {chart}");
    }
}

#[test]
fn bench_runs_every_workload_on_every_backend() {
    if !can_run("bench_every_workload", false) {
        return;
    }
    for backend in BACKENDS {
        bench_every_workload(backend);
    }
}

mod devmapper {
    use super::*;

    #[test]
    fn bench_runs_every_workload() {
        if can_run("devmapper bench_every_workload", false) {
            bench_every_workload("devmapper");
        }
    }
}
