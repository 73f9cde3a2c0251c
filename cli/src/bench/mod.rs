//! `strata bench`: layer-creation throughput.
//!
//! Runs in `--root` when given, else in a temporary root that is removed afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;
use strata::{Labels, Snapshotter};

use crate::output::Output;
use crate::{open_store, CliError, Failure, Global};

/// Arguments of `strata bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Workload to run (repeatable)
    #[arg(long = "workload", short = 'w', value_enum, default_values_t = [Workload::EmptyChain])]
    workloads: Vec<Workload>,

    /// Layers per workload (overlay stacks at most 500 lower layers, so an empty chain on it
    /// is at most 501 layers deep)
    #[arg(long, default_value_t = 500)]
    layers: usize,
}

/// The workloads.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// N layers, each prepared on the previous one and committed with no data
    EmptyChain,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::EmptyChain => "empty-chain",
        }
    }
}

/// Latency percentiles of a sorted sample, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

struct Result {
    workload: Workload,
    layers: usize,
    total: Duration,
    per_layer: Vec<Duration>,
    prepare: Vec<Duration>,
    commit: Vec<Duration>,
}

fn empty_chain(
    s: &dyn Snapshotter,
    layers: usize,
    tag: &str,
    bar: Option<&indicatif::ProgressBar>,
) -> strata::Result<Result> {
    let mut per_layer = Vec::with_capacity(layers);
    let mut prepare = Vec::with_capacity(layers);
    let mut commit = Vec::with_capacity(layers);
    let mut parent: Option<String> = None;
    let start = Instant::now();
    for i in 0..layers {
        let key = format!("{tag}/active/{i}");
        let name = format!("{tag}/layer/{i}");
        let t0 = Instant::now();
        s.prepare(&key, parent.as_deref(), Labels::new())?;
        let t1 = Instant::now();
        s.commit(&name, &key, Labels::new())?;
        let t2 = Instant::now();
        prepare.push(t1 - t0);
        commit.push(t2 - t1);
        per_layer.push(t2 - t0);
        parent = Some(name);
        if let Some(b) = bar {
            b.inc(1);
        }
    }
    Ok(Result {
        workload: Workload::EmptyChain,
        layers,
        total: start.elapsed(),
        per_layer,
        prepare,
        commit,
    })
}

fn run_in(
    root: &Path,
    global: &Global,
    args: &BenchArgs,
    json: bool,
) -> std::result::Result<Vec<Result>, Failure> {
    let store = open_store(root, global)?;
    let max = strata::mount::OVERLAY_MAX_LAYERS + 1;
    if store.backend_name() == "overlay"
        && args.workloads.contains(&Workload::EmptyChain)
        && args.layers > max
    {
        return Err(CliError(format!(
            "--layers {}: an empty chain on overlay can be at most {max} layers deep (overlayfs stacks at most {} lower layers); use --layers {max} or --backend native",
            args.layers,
            strata::mount::OVERLAY_MAX_LAYERS
        ))
        .into());
    }
    let s: &dyn strata::Snapshotter = &*store;
    let tag = format!("bench-{}", std::process::id());
    let mut results = Vec::new();
    for (n, w) in args.workloads.iter().enumerate() {
        let tag = format!("{tag}-{n}");
        let bar = crate::progress::items(w.name(), args.layers as u64, json);
        results.push(match w {
            Workload::EmptyChain => empty_chain(s, args.layers, &tag, bar.as_ref())?,
        });
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    }
    s.close()?;
    Ok(results)
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
    let (results, backend, root_desc) = match &global.root {
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
    let mut rows = Vec::new();
    for mut r in results {
        r.per_layer.sort_unstable();
        r.prepare.sort_unstable();
        r.commit.sort_unstable();
        let layers_per_s = r.layers as f64 / r.total.as_secs_f64().max(f64::MIN_POSITIVE);
        rows.push(json!({
            "workload": r.workload.name(),
            "backend": backend,
            "layers": r.layers,
            "seconds": r.total.as_secs_f64(),
            "layers_per_s": layers_per_s,
            "p50_ms": percentile(&r.per_layer, 0.5),
            "p99_ms": percentile(&r.per_layer, 0.99),
            "prepare_p50_ms": percentile(&r.prepare, 0.5),
            "prepare_p99_ms": percentile(&r.prepare, 0.99),
            "commit_p50_ms": percentile(&r.commit, 0.5),
            "commit_p99_ms": percentile(&r.commit, 0.99),
            "durable": !global.no_sync,
        }));
    }
    if out.is_json() {
        out.value(&json!({ "results": rows }));
        return Ok(());
    }
    println!(
        "strata bench: backend {backend}, in {root_desc}, durable {}",
        !global.no_sync
    );
    println!(
        "{:<14} {:>7} {:>12} {:>9} {:>9} {:>12} {:>11}",
        "workload", "layers", "layers/s", "p50 ms", "p99 ms", "prepare p50", "commit p50"
    );
    for r in &rows {
        println!(
            "{:<14} {:>7} {:>12.1} {:>9.3} {:>9.3} {:>12.3} {:>11.3}",
            r["workload"].as_str().unwrap_or(""),
            r["layers"],
            r["layers_per_s"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["prepare_p50_ms"].as_f64().unwrap_or(0.0),
            r["commit_p50_ms"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}
