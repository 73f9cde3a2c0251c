//! `strata bench`: layer-creation throughput, layer diff and apply speed, and how they hold
//! up with depth and threads.
//!
//! Runs in `--root` when given, else in a temporary root that is removed afterwards. With no
//! `--workload`, runs the standard set (see [`STANDARD`]).

mod compare;
mod tree;
mod workloads;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use strata::layer::Compression;

use crate::output::Output;
use crate::{open_store, parse_size, AnyStore, Failure, Global};
use workloads::Sample;

/// Arguments of `strata bench`.
#[derive(Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Workload to run (repeatable) [default: the standard set: every workload]
    #[arg(long = "workload", short = 'w', value_enum)]
    workloads: Vec<Workload>,

    /// Layers of empty-chain, empty-flat, small-files and concurrent [default: 500]
    #[arg(long)]
    layers: Option<usize>,

    /// small-files: files written per layer
    #[arg(long, default_value_t = 10)]
    files: usize,

    /// small-files: size of each file (K, M suffixes)
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    file_size: u64,

    /// containerd-benchsuite: rounds of its 16 layers
    #[arg(long, default_value_t = 2)]
    rounds: usize,

    /// diff and apply: small files of the generated tree (100 B to 16 KiB, in 50 directories)
    #[arg(long, default_value_t = 10_000)]
    tree_files: usize,

    /// diff and apply: large files of the generated tree
    #[arg(long, default_value_t = 4)]
    tree_big: usize,

    /// diff and apply: size of each large file
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    tree_big_size: u64,

    /// diff and apply: compression of the layer (repeatable: one result each)
    #[arg(long = "compression", default_values_t = [Compression::None])]
    compressions: Vec<Compression>,

    /// diff and apply: runs of each
    #[arg(long, default_value_t = 3)]
    repeat: usize,

    /// deep: depth of the chain [default: 500 on overlay (the deepest chain containerd
    /// mounts, for --against), else 1000]
    #[arg(long)]
    depth: Option<usize>,

    /// concurrent: threads, each building its own chain
    #[arg(long, default_value_t = 4)]
    threads: usize,

    /// Also draw the results as an SVG chart in FILE
    #[arg(long)]
    svg: Option<PathBuf>,

    /// Compare with containerd: run these workloads alternately with PROGRAM (benches/containerd,
    /// built by scripts/compare-containerd) and print the median ratios and the physical floor
    #[arg(long, value_name = "PROGRAM")]
    against: Option<PathBuf>,

    /// --against: runs of each side
    #[arg(long, default_value_t = 3)]
    times: usize,
}

impl BenchArgs {
    /// The generated tree of diff and apply (and of the comparison's `tar -x` floor).
    fn tree_spec(&self) -> tree::Spec {
        tree::Spec {
            files: self.tree_files,
            dirs: 50,
            min: 100,
            max: 16 << 10,
            big: self.tree_big,
            big_size: usize::try_from(self.tree_big_size).unwrap_or(usize::MAX),
        }
    }
}

/// The workloads.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// N layers, each prepared on the previous one and committed with no data
    EmptyChain,
    /// N parentless layers
    EmptyFlat,
    /// Per layer: prepare, mount, write F files of S bytes, unmount, commit
    SmallFiles,
    /// containerd's benchsuite: 16 layers, 10 operations on 1 MiB files each
    ContainerdBenchsuite,
    /// A generated tree (10k small files, 4 x 64 MiB) diffed to a layer
    Diff,
    /// The same layer applied into a fresh snapshot
    Apply,
    /// A chain to --depth with a file per layer: prepare and mount time against depth
    Deep,
    /// --threads threads, each building its own empty chain in one store
    Concurrent,
    /// The generated tree presented under a user namespace's ids: an idmapped snapshot
    /// prepared and mounted (--repeat times), against a snapshot chowned into the range (once)
    Idmap,
}

/// What `strata bench` runs with no `--workload`.
pub(crate) const STANDARD: &[Workload] = &[
    Workload::EmptyChain,
    Workload::EmptyFlat,
    Workload::SmallFiles,
    Workload::ContainerdBenchsuite,
    Workload::Diff,
    Workload::Apply,
    Workload::Deep,
    Workload::Concurrent,
    Workload::Idmap,
];

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::EmptyChain => "empty-chain",
            Workload::EmptyFlat => "empty-flat",
            Workload::SmallFiles => "small-files",
            Workload::ContainerdBenchsuite => "containerd-benchsuite",
            Workload::Diff => "diff",
            Workload::Apply => "apply",
            Workload::Deep => "deep",
            Workload::Concurrent => "concurrent",
            Workload::Idmap => "idmap",
        }
    }
}

/// Latency percentile `p` (0..=1) of a sorted sample, in milliseconds.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Resets the process's peak resident set size (Linux `clear_refs` 5), so that each
/// workload reports its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident set size since the last reset, in bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// One workload's result, as printed and as JSON.
fn row(workload: &str, params: Value, mut s: Sample, rss: u64) -> Value {
    s.per_op.sort_unstable();
    let secs = s.total.as_secs_f64().max(f64::MIN_POSITIVE);
    let mut v = json!({
        "workload": workload,
        "params": params,
        "ops": s.per_op.len(),
        "seconds": s.total.as_secs_f64(),
        "p50_ms": percentile(&s.per_op, 0.5),
        "p99_ms": percentile(&s.per_op, 0.99),
        "peak_rss_bytes": rss,
    });
    if s.layers > 0 {
        v["layers"] = json!(s.layers);
        v["layers_per_s"] = json!(s.layers as f64 / secs);
    }
    if s.bytes > 0 {
        v["mb_per_s"] = json!(s.bytes as f64 / 1e6 / secs);
    }
    if s.entries > 0 {
        v["entries_per_s"] = json!(s.entries as f64 / secs);
    }
    if s.blob_bytes > 0 {
        v["blob_bytes"] = json!(s.blob_bytes);
    }
    for (name, mut d) in s.phases {
        d.sort_unstable();
        v[format!("{name}_p50_ms")] = json!(percentile(&d, 0.5));
        v[format!("{name}_p99_ms")] = json!(percentile(&d, 0.99));
    }
    if !s.by_depth.is_empty() {
        v["by_depth"] = Value::Array(
            s.by_depth
                .iter()
                .map(|(d, p, m)| json!({"depth": d, "prepare_p50_ms": p, "mount_p50_ms": m}))
                .collect(),
        );
    }
    v
}

pub(crate) fn run_in(
    root: &Path,
    global: &Global,
    args: &BenchArgs,
    json: bool,
) -> std::result::Result<Vec<Value>, Failure> {
    let store: Arc<AnyStore> = Arc::new(open_store(root, global)?);
    let overlay = store.backend_name() == "overlay";
    let layers = args.layers.unwrap_or(500);
    let depth = args.depth.unwrap_or(if overlay { 500 } else { 1000 });
    let workloads: &[Workload] = if args.workloads.is_empty() {
        STANDARD
    } else {
        &args.workloads
    };
    let work = root.join("bench-work");
    std::fs::create_dir_all(&work)
        .map_err(|e| strata::Error::io(&work, "create the work directory", e))?;
    let tag = format!("bench-{}", std::process::id());
    let spec = args.tree_spec();
    let mut tree: Option<(String, tree::Written)> = None;
    let mut rows = Vec::new();
    let s: &dyn strata::AnyStore = &**store;
    for (n, w) in workloads.iter().enumerate() {
        let tag = format!("{tag}-{n}");
        let total = match w {
            Workload::EmptyChain
            | Workload::EmptyFlat
            | Workload::SmallFiles
            | Workload::Concurrent => layers,
            Workload::ContainerdBenchsuite => 16 * args.rounds,
            Workload::Diff | Workload::Apply => args.repeat * args.compressions.len(),
            Workload::Idmap => args.repeat + 1,
            Workload::Deep => depth,
        };
        let bar = crate::progress::items(w.name(), total as u64, json);
        let tick = || {
            if let Some(b) = &bar {
                b.inc(1);
            }
        };
        if matches!(w, Workload::Diff | Workload::Apply | Workload::Idmap) && tree.is_none() {
            if let Some(b) = &bar {
                b.set_message(format!("{}: writing the tree", w.name()));
            }
            tree = Some(workloads::generated_layer(s, &work, &spec, &tag)?);
            if let Some(b) = &bar {
                b.set_message(w.name());
            }
        }
        reset_peak_rss();
        match w {
            Workload::EmptyChain => {
                let r = workloads::empty_chain(s, layers, true, &tag, &tick)?;
                rows.push(row(w.name(), json!({"layers": layers}), r, peak_rss()));
            }
            Workload::EmptyFlat => {
                let r = workloads::empty_chain(s, layers, false, &tag, &tick)?;
                rows.push(row(w.name(), json!({"layers": layers}), r, peak_rss()));
            }
            Workload::SmallFiles => {
                let r = workloads::small_files(
                    s,
                    &work,
                    layers,
                    args.files,
                    args.file_size,
                    &tag,
                    &tick,
                )?;
                let p = json!({"layers": layers, "files": args.files, "file_size": args.file_size});
                rows.push(row(w.name(), p, r, peak_rss()));
            }
            Workload::ContainerdBenchsuite => {
                let r = workloads::benchsuite(s, &work, args.rounds, &tag, &tick)?;
                rows.push(row(w.name(), json!({"rounds": args.rounds}), r, peak_rss()));
            }
            Workload::Diff | Workload::Apply => {
                let Some(layer) = &tree else {
                    continue;
                };
                let written = &layer.1;
                for c in &args.compressions {
                    reset_peak_rss();
                    let r = if *w == Workload::Diff {
                        workloads::diff(s, layer, *c, args.repeat, &tick)?
                    } else {
                        workloads::apply(s, &work, layer, *c, args.repeat, &tag, &tick)?
                    };
                    let p = json!({
                        "compression": c.to_string(),
                        "files": spec.files,
                        "big_files": spec.big,
                        "big_file_size": spec.big_size,
                        "bytes": written.bytes,
                        "entries": written.entries,
                    });
                    rows.push(row(w.name(), p, r, peak_rss()));
                }
            }
            Workload::Deep => {
                let r = workloads::deep(s, &work, depth, &tag, &tick)?;
                rows.push(row(w.name(), json!({"depth": depth}), r, peak_rss()));
            }
            Workload::Idmap => {
                let Some(layer) = &tree else {
                    continue;
                };
                let r = workloads::idmap(s, &work, layer, args.repeat, &tag, &tick)?;
                let p = json!({
                    "files": spec.files,
                    "big_files": spec.big,
                    "entries": layer.1.entries,
                    "mapping": "0:100000:65536",
                });
                rows.push(row(w.name(), p, r, peak_rss()));
            }
            Workload::Concurrent => {
                let r = workloads::concurrent(&store, layers, args.threads, &tag, &tick)?;
                let p = json!({"layers": layers, "threads": args.threads});
                rows.push(row(w.name(), p, r, peak_rss()));
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    s.close()?;
    Ok(rows)
}

/// The thin pool of a devmapper benchmark in a temporary root: 8 GiB of data and 256 MiB of
/// metadata (sparse files), 1 GiB snapshots; destroyed when dropped.
#[cfg(feature = "devmapper")]
struct TempPool(std::path::PathBuf);

#[cfg(feature = "devmapper")]
impl TempPool {
    fn create(root: &Path) -> std::result::Result<TempPool, Failure> {
        let opts = strata_devmapper::PoolOptions {
            base_size: 1 << 30,
            ..strata_devmapper::PoolOptions::default()
        };
        strata_devmapper::DevmapperBackend::create_pool(root, &opts)
            .map_err(|e| crate::Error::backend("", "pool create", "devmapper", e))?;
        Ok(TempPool(root.to_path_buf()))
    }
}

#[cfg(feature = "devmapper")]
impl Drop for TempPool {
    fn drop(&mut self) {
        if let Err(e) = strata_devmapper::DevmapperBackend::destroy_pool(&self.0) {
            tracing::warn!(error = %e, "could not take down the benchmark's thin pool");
        }
    }
}

/// Runs the benchmark and prints the results.
pub(crate) fn run(
    global: &Global,
    args: BenchArgs,
    out: &Output,
) -> std::result::Result<(), Failure> {
    if let Some(program) = &args.against {
        return compare::run(global, &args, program, out);
    }
    let (rows, backend, root_desc) = match &global.root {
        Some(root) => {
            let r = run_in(root, global, &args, out.is_json())?;
            (r, global.backend.clone(), root.display().to_string())
        }
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("strata-bench-")
                .tempdir()
                .map_err(|e| {
                    strata::Error::io(std::env::temp_dir(), "create a temporary root", e)
                })?;
            // devmapper: a loop-backed pool of the temporary root's own, taken down after.
            #[cfg(feature = "devmapper")]
            let _pool = match global.backend.as_deref() {
                Some("devmapper") => Some(TempPool::create(tmp.path())?),
                _ => None,
            };
            let r = run_in(tmp.path(), global, &args, out.is_json())?;
            (
                r,
                global.backend.clone(),
                "a temporary root (removed)".to_string(),
            )
        }
    };
    let backend = backend.unwrap_or_else(|| "overlay".into());
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|mut r| {
            r["backend"] = json!(backend);
            r["durable"] = json!(!global.no_sync);
            r
        })
        .collect();
    if let Some(path) = &args.svg {
        std::fs::write(path, svg(&rows, &backend))
            .map_err(|e| strata::Error::io(path, "write the SVG chart", e))?;
    }
    if out.is_json() {
        out.value(&json!({ "results": rows }));
        return Ok(());
    }
    print_table(&rows, &backend, &root_desc, !global.no_sync);
    Ok(())
}

fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn cell(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.prec$}"))
}

/// What a workload's parameters say in the table.
fn label(r: &Value) -> String {
    let w = r["workload"].as_str().unwrap_or("");
    let p = &r["params"];
    match w {
        "diff" | "apply" => format!("{w} ({})", p["compression"].as_str().unwrap_or("")),
        "small-files" => format!("{w} ({}x{})", p["files"], p["file_size"]),
        "concurrent" => format!("{w} ({} threads)", p["threads"]),
        _ => w.to_string(),
    }
}

fn print_table(rows: &[Value], backend: &str, root_desc: &str, durable: bool) {
    println!("strata bench: backend {backend}, in {root_desc}, durable {durable}");
    println!(
        "{:<28} {:>6} {:>10} {:>9} {:>9} {:>9} {:>9}  steps (p50 ms)",
        "workload", "ops", "layers/s", "MB/s", "p50 ms", "p99 ms", "RSS MiB"
    );
    for r in rows {
        let mut steps = Vec::new();
        for k in ["prepare", "mount", "write", "commit", "chown"] {
            if let Some(v) = num(r, &format!("{k}_p50_ms")) {
                steps.push(format!("{k} {v:.3}"));
            }
        }
        if let Some(e) = num(r, "entries_per_s") {
            steps.push(format!("{e:.0} entries/s"));
        }
        println!(
            "{:<28} {:>6} {:>10} {:>9} {:>9.3} {:>9.3} {:>9.1}  {}",
            label(r),
            r["ops"].as_u64().unwrap_or(0),
            cell(num(r, "layers_per_s"), 1),
            cell(num(r, "mb_per_s"), 1),
            num(r, "p50_ms").unwrap_or(0.0),
            num(r, "p99_ms").unwrap_or(0.0),
            num(r, "peak_rss_bytes").unwrap_or(0.0) / (1024.0 * 1024.0),
            steps.join(", ")
        );
        if let Some(depths) = r["by_depth"].as_array() {
            for d in depths {
                println!(
                    "{:<28} depth {:>5}: prepare p50 {:.3} ms, mount p50 {:.3} ms",
                    "",
                    d["depth"],
                    num(d, "prepare_p50_ms").unwrap_or(0.0),
                    num(d, "mount_p50_ms").unwrap_or(0.0)
                );
            }
        }
    }
}

/// A bar chart of the results: layers/s for the workloads that make layers, MB/s for those
/// that move bytes, one bar each.
fn svg(rows: &[Value], backend: &str) -> String {
    let bars: Vec<(String, f64, &str)> = rows
        .iter()
        .filter_map(|r| match (num(r, "layers_per_s"), num(r, "mb_per_s")) {
            (Some(l), _) if !matches!(r["workload"].as_str(), Some("diff" | "apply")) => {
                Some((label(r), l, "layers/s"))
            }
            (_, Some(m)) => Some((label(r), m, "MB/s")),
            _ => None,
        })
        .collect();
    let width = 760.0;
    let bar_h = 26.0;
    let left = 250.0;
    let top = 40.0;
    let height = top + bar_h * bars.len() as f64 + 20.0;
    // Bars of one unit share a scale; layers/s and MB/s are not comparable.
    let max = |unit: &str| {
        bars.iter()
            .filter(|b| b.2 == unit)
            .map(|b| b.1)
            .fold(f64::MIN_POSITIVE, f64::max)
    };
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">strata bench on {}</text>\n",
        esc(backend)
    );
    for (i, (name, v, unit)) in bars.iter().enumerate() {
        let y = top + bar_h * i as f64;
        let w = (width - left - 120.0) * v / max(unit);
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{left}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{v:.1} {unit}</text>\n",
            left - 8.0,
            y + bar_h * 0.65,
            esc(name),
            y + 3.0,
            bar_h - 6.0,
            if *unit == "MB/s" {
                "#c2703d"
            } else {
                "#4a7ab5"
            },
            left + w + 6.0,
            y + bar_h * 0.65,
        ));
    }
    out.push_str("</svg>\n");
    out
}
