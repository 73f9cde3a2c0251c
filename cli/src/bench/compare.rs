//! `strata bench --against PROGRAM`: the same workloads on containerd's overlay snapshotter
//! and archive package (PROGRAM is `benches/containerd`, built by
//! `scripts/compare-containerd`), run alternately with strata's, `--times` times each; prints
//! the median of each side, their ratio against the targets, and the physical floor
//! measured in the same run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest as _;

use super::{label, num, percentile, tree, BenchArgs, Workload, STANDARD};
use crate::{CliError, Failure};

/// What a workload is judged by, and the target ratio (strata / containerd) for it.
struct Metric {
    key: &'static str,
    unit: &'static str,
    /// Higher is better (a rate); otherwise lower is (a time).
    higher: bool,
    /// The target for strata / containerd, where it sets one.
    target: Option<f64>,
}

fn metric(workload: &str) -> Option<Metric> {
    let rate = |key, unit, target| Metric {
        key,
        unit,
        higher: true,
        target: Some(target),
    };
    let compared = |key, unit| Metric {
        key,
        unit,
        higher: true,
        target: None,
    };
    Some(match workload {
        "empty-chain" => rate("layers_per_s", "layers/s", 10.0),
        "empty-flat" => rate("layers_per_s", "layers/s", 8.0),
        "small-files" => rate("layers_per_s", "layers/s", 5.0),
        "containerd-benchsuite" => Metric {
            key: "p50_ms",
            unit: "ms/layer",
            higher: false,
            target: Some(0.5),
        },
        "diff" => rate("mb_per_s", "MB/s", 3.0),
        "apply" => rate("mb_per_s", "MB/s", 2.0),
        "deep" => compared("layers_per_s", "layers/s"),
        "concurrent" => compared("layers_per_s", "layers/s"),
        _ => return None,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The flags of `benches/containerd` for these arguments.
fn program_args(
    args: &BenchArgs,
    workloads: &[Workload],
    root: &Path,
    layers: usize,
    depth: usize,
) -> Vec<String> {
    let names: Vec<&str> = workloads.iter().map(|w| w.name()).collect();
    vec![
        format!("-root={}", root.display()),
        format!("-workload={}", names.join(",")),
        format!("-layers={layers}"),
        format!("-files={}", args.files),
        format!("-file-size={}", args.file_size),
        format!("-rounds={}", args.rounds),
        format!("-tree-files={}", args.tree_files),
        format!("-tree-big={}", args.tree_big),
        format!("-tree-big-size={}", args.tree_big_size),
        format!(
            "-compression={}",
            args.compressions.first().copied().unwrap_or_default()
        ),
        format!("-repeat={}", args.repeat),
        format!("-depth={depth}"),
        format!("-threads={}", args.threads),
    ]
}

/// Runs `program` once; its results.
fn run_program(program: &Path, argv: &[String]) -> Result<Vec<Value>, Failure> {
    let out = Command::new(program)
        .args(argv)
        .output()
        .map_err(|e| CliError(format!("run {}: {e}", program.display())))?;
    if !out.status.success() {
        return Err(CliError(format!(
            "{} failed ({}): {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .into());
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CliError(format!("{} printed no results: {e}", program.display())))?;
    Ok(v["results"].as_array().cloned().unwrap_or_default())
}

/// The physical floor under `dir`: what the kernel and the disk take for the steps every
/// snapshotter must do, measured beside the workloads.
fn floors(dir: &Path, args: &BenchArgs) -> Result<Value, Failure> {
    let io = |what: &'static str| {
        move |e: std::io::Error| -> Failure { strata::Error::io(dir, what, e).into() }
    };
    let base = dir.join("floor");
    std::fs::create_dir_all(&base).map_err(io("create the floor directory"))?;
    // Measured from a synced disk, as the runs are.
    strata::fsutil::sync_filesystem(dir).map_err(io("sync before the floor"))?;
    // mkdir.
    let mut mk = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        std::fs::create_dir(base.join(format!("m{i}"))).map_err(io("mkdir"))?;
        mk.push(t.elapsed());
    }
    mk.sort_unstable();
    // overlay mount + umount of one lower.
    let (lower, upper, work, at) = (
        base.join("lower"),
        base.join("upper"),
        base.join("work"),
        base.join("at"),
    );
    for d in [&lower, &upper, &work, &at] {
        std::fs::create_dir_all(d).map_err(io("create an overlay directory"))?;
    }
    let m = strata::Mount {
        fs_type: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            format!("lowerdir={}", lower.display()),
            format!("upperdir={}", upper.display()),
            format!("workdir={}", work.display()),
        ],
    };
    let mut mounts = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        strata::mount::mount_all(std::slice::from_ref(&m), &at)?;
        strata::mount::unmount(&at)?;
        mounts.push(t.elapsed());
    }
    mounts.sort_unstable();
    // tar -x of the generated tree as GNU tar writes it.
    let src = base.join("tree");
    let spec = args.tree_spec();
    std::fs::create_dir_all(&src).map_err(io("create the tree"))?;
    let written = tree::write(&src, &spec).map_err(io("write the tree"))?;
    let tarball = base.join("tree.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .map_err(io("run tar -c"))?;
    if !status.success() {
        return Err(CliError(format!("tar -c of the floor's tree failed: {status}")).into());
    }
    let dest = base.join("untar");
    std::fs::create_dir_all(&dest).map_err(io("create the tar -x target"))?;
    let t = Instant::now();
    let status = Command::new("tar")
        .arg("-C")
        .arg(&dest)
        .arg("-xf")
        .arg(&tarball)
        .status()
        .map_err(io("run tar -x"))?;
    let untar = t.elapsed();
    if !status.success() {
        return Err(CliError(format!("tar -x of the floor's tree failed: {status}")).into());
    }
    // sha256 of as many bytes, in memory.
    let mut buf = vec![0u8; 64 << 20];
    tree::Rng::new(1).fill(&mut buf);
    let rounds = (written.bytes / buf.len() as u64).max(1);
    let t = Instant::now();
    let mut h = sha2::Sha256::new();
    for _ in 0..rounds {
        h.update(&buf);
    }
    let _ = h.finalize();
    let sha = t.elapsed();
    let _ = std::fs::remove_dir_all(&base);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(json!({
        "mkdir_p50_ms": percentile(&mk, 0.5),
        "overlay_mount_umount_p50_ms": percentile(&mounts, 0.5),
        "tar_x_mb_per_s": written.bytes as f64 / 1e6 / untar.as_secs_f64(),
        "tar_x_ms": ms(untar),
        "sha256_mb_per_s": (rounds * buf.len() as u64) as f64 / 1e6 / sha.as_secs_f64(),
    }))
}

/// Runs both sides alternately and prints (or returns as JSON) the comparison.
pub(crate) fn run(
    global: &crate::Global,
    args: &BenchArgs,
    program: &Path,
    out: &crate::output::Output,
) -> Result<(), Failure> {
    if args.compressions.len() > 1 {
        return Err(CliError("--against compares one --compression at a time".into()).into());
    }
    // `idmap` has its comparison inside (a chown of the same tree): containerd's side has
    // no such workload.
    if args.workloads.contains(&Workload::Idmap) {
        return Err(CliError(
            "the idmap workload compares with a chown of the same tree by itself: run it without --against".into(),
        )
        .into());
    }
    let workloads: Vec<Workload> = if args.workloads.is_empty() {
        STANDARD
            .iter()
            .copied()
            .filter(|w| *w != Workload::Idmap)
            .collect()
    } else {
        args.workloads.clone()
    };
    let layers = args.layers.unwrap_or(500);
    let depth = args.depth.unwrap_or(500);
    let mut strata_runs: Vec<Vec<Value>> = Vec::new();
    let mut ctr_runs: Vec<Vec<Value>> = Vec::new();
    let mut floor_runs = Vec::new();
    for i in 0..args.times.max(1) {
        let tmp = tempfile::Builder::new()
            .prefix("strata-compare-")
            .tempdir()
            .map_err(|e| strata::Error::io(std::env::temp_dir(), "create a temporary root", e))?;
        let say = |what: &str| {
            if !out.is_json() {
                eprintln!("round {}/{}: {what}", i + 1, args.times.max(1));
            }
        };
        // Workload by workload, each side in a fresh root, after what the previous run left
        // dirty is written back (so neither side pays for the other's writes), and which
        // side goes first alternates (so neither always runs on a warmer cache).
        let mut strata_rows = Vec::new();
        let mut ctr_rows = Vec::new();
        for (n, w) in workloads.iter().enumerate() {
            let order: [bool; 2] = if (i + n) % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for strata_side in order {
                strata::fsutil::sync_filesystem(tmp.path())
                    .map_err(|e| strata::Error::io(tmp.path(), "sync before the next run", e))?;
                let root = tmp.path().join(format!(
                    "{}-{}",
                    w.name(),
                    if strata_side { "strata" } else { "containerd" }
                ));
                if strata_side {
                    say(&format!("{} on strata", w.name()));
                    let mut one = args.clone();
                    one.workloads = vec![*w];
                    strata_rows.extend(super::run_in(&root, global, &one, true)?);
                } else {
                    say(&format!("{} on containerd", w.name()));
                    let argv = program_args(args, &[*w], &root, layers, depth);
                    ctr_rows.extend(run_program(program, &argv)?);
                }
                // The next run starts on a file system without this one's layers.
                let _ = std::fs::remove_dir_all(&root);
            }
        }
        strata_runs.push(strata_rows);
        ctr_runs.push(ctr_rows);
        say("floor");
        floor_runs.push(floors(tmp.path(), args)?);
    }
    let find = |runs: &[Vec<Value>], lbl: &str, key: &str| -> Vec<f64> {
        runs.iter()
            .filter_map(|rows| {
                rows.iter()
                    .find(|r| label(r) == lbl)
                    .and_then(|r| num(r, key))
            })
            .collect()
    };
    let mut rows = Vec::new();
    let labels: Vec<String> = strata_runs
        .first()
        .map(|rs| rs.iter().map(label).collect())
        .unwrap_or_default();
    for lbl in labels {
        let workload = lbl.split(' ').next().unwrap_or("").to_string();
        let Some(m) = metric(&workload) else { continue };
        let s = median(find(&strata_runs, &lbl, m.key));
        let c_runs = find(&ctr_runs, &lbl, m.key);
        // containerd may fail a workload strata does (e.g. a chain too deep for its mount
        // options): say so instead of a ratio.
        let error = ctr_runs.iter().flatten().find_map(|r| {
            (r["workload"].as_str() == Some(workload.as_str()))
                .then(|| r["error"].as_str())
                .flatten()
        });
        let c = (!c_runs.is_empty()).then(|| median(c_runs));
        let ratio = c.map(|c| s / c);
        let met = ratio.and_then(|ratio| {
            m.target
                .map(|t| if m.higher { ratio >= t } else { ratio <= t })
        });
        rows.push(json!({
            "workload": lbl,
            "metric": m.key,
            "unit": m.unit,
            "strata": s,
            "containerd": c,
            "ratio": ratio,
            "target": m.target.map(|t| if m.higher { format!(">= {t}x") } else { format!("<= {t}x") }),
            "met": met,
            "containerd_error": error,
            "strata_runs": find(&strata_runs, &lbl, m.key),
            "containerd_runs": find(&ctr_runs, &lbl, m.key),
        }));
    }
    let floor_key = |k: &str| median(floor_runs.iter().filter_map(|f| num(f, k)).collect());
    let floor = json!({
        "mkdir_p50_ms": floor_key("mkdir_p50_ms"),
        "overlay_mount_umount_p50_ms": floor_key("overlay_mount_umount_p50_ms"),
        "tar_x_mb_per_s": floor_key("tar_x_mb_per_s"),
        "sha256_mb_per_s": floor_key("sha256_mb_per_s"),
    });
    if out.is_json() {
        out.value(&json!({"comparison": rows, "floor": floor, "times": args.times, "durable": !global.no_sync}));
        return Ok(());
    }
    println!(
        "strata ({}) against containerd 1.6's overlay snapshotter and archive package: median of {} alternating runs, durable {}",
        global.backend.as_deref().unwrap_or("overlay"),
        args.times.max(1),
        !global.no_sync
    );
    println!(
        "{:<28} {:>14} {:>14} {:>9} {:>9}  {:<8}",
        "workload", "strata", "containerd", "ratio", "target", "unit"
    );
    for r in &rows {
        if let (None, Some(e)) = (num(r, "containerd"), r["containerd_error"].as_str()) {
            println!(
                "{:<28} {:>14.2} {:>14} {:>9} {:>9}  {:<8} containerd failed: {e}",
                r["workload"].as_str().unwrap_or(""),
                num(r, "strata").unwrap_or(0.0),
                "failed",
                "-",
                r["target"].as_str().unwrap_or("-"),
                r["unit"].as_str().unwrap_or(""),
            );
            continue;
        }
        println!(
            "{:<28} {:>14.2} {:>14.2} {:>8.2}x {:>9}  {:<8} {}",
            r["workload"].as_str().unwrap_or(""),
            num(r, "strata").unwrap_or(0.0),
            num(r, "containerd").unwrap_or(0.0),
            num(r, "ratio").unwrap_or(0.0),
            r["target"].as_str().unwrap_or("-"),
            r["unit"].as_str().unwrap_or(""),
            match r["met"].as_bool() {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            },
        );
    }
    println!(
        "floor: overlay mount+umount p50 {:.3} ms, mkdir p50 {:.3} ms, tar -x of the tree {:.0} MB/s, sha256 {:.0} MB/s",
        num(&floor, "overlay_mount_umount_p50_ms").unwrap_or(0.0),
        num(&floor, "mkdir_p50_ms").unwrap_or(0.0),
        num(&floor, "tar_x_mb_per_s").unwrap_or(0.0),
        num(&floor, "sha256_mb_per_s").unwrap_or(0.0),
    );
    Ok(())
}
