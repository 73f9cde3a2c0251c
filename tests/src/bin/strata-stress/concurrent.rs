//! The concurrency campaign: `--threads T` threads of this process and `--procs P` worker
//! processes on one store for `--secs S` seconds.
//!
//! Thread 0 runs `gc` every 2–10 ms; thread 1 exports a random image every few ms and checks
//! the layout it wrote (every blob an index, manifest or config names is there, with its
//! size and SHA-256); the other threads and every process build layers (under a lease, as a
//! builder beside a gc must), apply generated layers, diff and checksum random layers,
//! export and import images, untag images and remove random committed layers. An operation
//! may fail only because what it named went away meanwhile (`not-found`) or is held
//! (`failed-precondition`, e.g. removing a layer an image holds); any other error, an
//! export missing a blob, or a layer a builder reported kept that is gone is a violation.
//!
//! Bounded: a watchdog fails the run when no operation of this process finished for 60 s, and
//! the processes must exit within 120 s of the end. Then the checks of the crash campaign run
//! (fsck clean, every kept layer there, every committed layer holding what was written) and
//! the accounting check (`crate::accounting`).

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata::{AnyStore, ErrorKind};

use strata_tests::Rng;

use crate::{err, open, sha_hex, Args, Res, Worker};

/// What the threads and processes did, by operation: (succeeded, went away or held).
#[derive(Default)]
struct Counts(std::collections::BTreeMap<&'static str, (u64, u64)>);

impl Counts {
    fn add(&mut self, op: &'static str, r: Res<Outcome>) -> Res<()> {
        let e = self.0.entry(op).or_default();
        match r? {
            Outcome::Done => e.0 += 1,
            Outcome::Raced => e.1 += 1,
        }
        Ok(())
    }

    fn merge(&mut self, other: &serde_json::Value) {
        if let Some(m) = other.as_object() {
            for (op, v) in m {
                let op: &'static str = OPS.iter().find(|o| **o == op).copied().unwrap_or("other");
                let e = self.0.entry(op).or_default();
                e.0 += v[0].as_u64().unwrap_or(0);
                e.1 += v[1].as_u64().unwrap_or(0);
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|(op, (done, raced))| (op.to_string(), serde_json::json!([done, raced])))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

const OPS: &[&str] = &[
    "build",
    "apply-layer",
    "untag",
    "remove",
    "diff",
    "checksum",
    "export",
    "export-import",
    "gc",
];

/// How an operation ended when it did not fail.
enum Outcome {
    Done,
    /// What it named went away meanwhile, or is held by something else.
    Raced,
}

/// `Ok(Done)`, or `Ok(Raced)` for the errors concurrency allows, or the violation.
fn outcome(what: &str, r: strata::Result<()>) -> Res<Outcome> {
    match r {
        Ok(()) => Ok(Outcome::Done),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::NotFound | ErrorKind::FailedPrecondition
            ) =>
        {
            if std::env::var_os("STRATA_STRESS_VERBOSE").is_some() {
                eprintln!("raced: {what}: {e}");
            }
            Ok(Outcome::Raced)
        }
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Checks an OCI layout the store exported: every blob named by the index, the manifests and
/// the configs is there with its size and digest.
pub(crate) fn check_layout(dir: &Path) -> Res<usize> {
    let blob = |digest: &str, size: Option<u64>| -> Res<Vec<u8>> {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{}: digest {digest} is not sha256", dir.display()))?;
        let path = dir.join("blobs/sha256").join(hex);
        let data = fs::read(&path).map_err(|e| format!("exported blob {digest} missing: {e}"))?;
        if sha_hex(&data) != hex {
            return Err(format!("exported blob {digest} holds other bytes"));
        }
        if size.is_some_and(|s| s != data.len() as u64) {
            return Err(format!(
                "exported blob {digest}: {} bytes, its descriptor says {size:?}",
                data.len()
            ));
        }
        Ok(data)
    };
    let desc = |v: &serde_json::Value| -> Res<(String, Option<u64>)> {
        let d = v["digest"]
            .as_str()
            .ok_or_else(|| format!("a descriptor without a digest: {v}"))?;
        Ok((d.to_string(), v["size"].as_u64()))
    };
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(dir.join("index.json")).map_err(err("read the exported index.json"))?,
    )
    .map_err(err("parse the exported index.json"))?;
    let mut blobs = 0;
    for m in index["manifests"].as_array().into_iter().flatten() {
        let (d, size) = desc(m)?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(&d, size)?).map_err(err("parse an exported manifest"))?;
        let (cd, csize) = desc(&manifest["config"])?;
        blob(&cd, csize)?;
        blobs += 2;
        for l in manifest["layers"].as_array().into_iter().flatten() {
            let (ld, lsize) = desc(l)?;
            blob(&ld, lsize)?;
            blobs += 1;
        }
    }
    Ok(blobs)
}

impl Worker<'_> {
    /// Exports a random image and checks the layout; when `import` also imports it back.
    fn export_checked(&mut self, import: bool) -> Res<Outcome> {
        let images = self.s.images().map_err(err("images"))?;
        let Some((image, _)) = self.rng.pick(&images).cloned() else {
            return Ok(Outcome::Raced);
        };
        let out = self.tmp.join(format!("export-{}", self.tag));
        let _ = fs::remove_dir_all(&out);
        let r = match self.s.export(&[&image], &out, &Default::default()) {
            Ok(_) => check_layout(&out)
                .map_err(|e| format!("export of {image}: {e}"))
                .map(|_| Outcome::Done),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Outcome::Raced),
            Err(e) => Err(format!("export {image}: {e}")),
        };
        let r = match r {
            Ok(Outcome::Done) if import => {
                let name = format!("imp/{}-{}", self.tag, self.n);
                outcome(
                    &format!("import {image} as {name}"),
                    self.s.import(&out, Some(&name)).map(|_| ()),
                )
            }
            other => other,
        };
        let _ = fs::remove_dir_all(&out);
        r
    }

    /// Untags a random image and removes its layer at once, as a user deleting an image does
    /// (refused while something else holds it or it is a parent: allowed).
    fn remove_one(&mut self) -> Res<Outcome> {
        let images = self.s.images().map_err(err("images"))?;
        let Some((image, name)) = self.rng.pick(&images).cloned() else {
            return Ok(Outcome::Raced);
        };
        self.note(&format!("removing {name}"))?;
        match outcome(&format!("untag {image}"), self.s.untag(&image))? {
            Outcome::Done => outcome(&format!("remove {name}"), self.s.remove(&name)),
            raced => Ok(raced),
        }
    }

    /// One operation of a builder thread or process.
    fn concurrent_step(&mut self, counts: &mut Counts) -> Res<()> {
        self.n += 1;
        let op = match self.rng.below(100) {
            0..=34 => "build",
            35..=49 => "apply-layer",
            50..=57 => "untag",
            58..=62 => "remove",
            63..=72 => "diff",
            73..=80 => "checksum",
            81..=92 => "export",
            _ => "export-import",
        };
        let done = |r: Res<()>| r.map(|()| Outcome::Done);
        let r = match op {
            "build" => done(self.build()),
            "apply-layer" => done(self.apply_layer()),
            "untag" => done(self.untag()),
            "remove" => self.remove_one(),
            "diff" => done(self.read_op(0)),
            "checksum" => done(self.read_op(1)),
            "export" => self.export_checked(false),
            _ => self.export_checked(true),
        };
        counts.add(
            op,
            r.map_err(|e| format!("{} op {} ({op}): {e}", self.tag, self.n)),
        )
    }
}

/// A builder (or, when `exporter`, a thread that only exports), for `secs` seconds or until
/// `stop`.
#[allow(clippy::too_many_arguments)]
fn builder(
    s: &dyn AnyStore,
    a: &Args,
    exporter: bool,
    tag: String,
    seed: u64,
    stop: &AtomicBool,
    progress: &AtomicU64,
    started: Instant,
) -> Res<Counts> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(crate::log_path(&a.root))
        .map_err(err("open the log"))?;
    let tmp = a.root.join("tmp");
    fs::create_dir_all(&tmp).map_err(err("create tmp"))?;
    let mut w = Worker {
        s,
        rng: Rng(seed),
        log,
        tag,
        tmp,
        n: 0,
        lease: true,
    };
    let mut counts = Counts::default();
    let end = started + Duration::from_secs(a.secs);
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        if exporter {
            w.n += 1;
            let r = w.export_checked(false);
            counts.add(
                "export",
                r.map_err(|e| format!("{} op {}: {e}", w.tag, w.n)),
            )?;
            std::thread::sleep(Duration::from_millis(1 + w.rng.below(5)));
        } else {
            w.concurrent_step(&mut counts)?;
        }
        progress.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    Ok(counts)
}

/// `cworker` mode: one builder process, printing its counts as JSON.
pub(crate) fn worker(a: &Args) -> Res<()> {
    let s = open(&a.backend, &a.root, a.durable)?;
    let stop = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    let counts = builder(
        &*s,
        a,
        false,
        format!("p{}", a.seed),
        a.seed,
        &stop,
        &progress,
        Instant::now(),
    )?;
    s.close().map_err(err("close"))?;
    println!("{}", counts.json());
    Ok(())
}

/// Kills the worker processes when the run ends early.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The campaign (see the module docs).
pub(crate) fn run(a: &Args) -> Res<()> {
    // devmapper: one thin pool for the campaign in the root (see `crash`), taken down at the
    // end.
    #[cfg(feature = "devmapper")]
    let pool = (a.backend == "devmapper")
        .then(|| crate::devmapper::CampaignPool::create(&a.root, 16 << 30, 128 << 20))
        .transpose()?;
    #[cfg(feature = "devmapper")]
    let dm_names = pool.as_ref().map(|p| [p.pool.clone(), p.prefix.clone()]);
    #[cfg(not(feature = "devmapper"))]
    let dm_names: Option<[String; 2]> = None;
    let exe = std::env::current_exe().map_err(err("current exe"))?;
    let started = Instant::now();
    let s: Arc<Box<dyn AnyStore>> = Arc::new(open(&a.backend, &a.root, a.durable)?);
    let stop = Arc::new(AtomicBool::new(false));
    let nthreads = a.threads.max(3);
    // When each thread last finished an operation (ms since the start).
    let progress: Arc<Vec<AtomicU64>> =
        Arc::new((0..nthreads).map(|_| AtomicU64::new(0)).collect());
    let gcs = Arc::new(AtomicU64::new(0));
    let violation: Arc<Mutex<Option<String>>> = Arc::default();

    let mut procs = Procs(Vec::new());
    for p in 0..a.procs {
        let seed = a.seed.wrapping_mul(1_000_003).wrapping_add(1000 + p);
        let mut cmd = Command::new(&exe);
        cmd.args(["cworker", "--backend", &a.backend])
            .args(["--seed", &seed.to_string(), "--secs", &a.secs.to_string()])
            .arg("--root")
            .arg(&a.root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !a.durable {
            cmd.arg("--no-sync");
        }
        procs
            .0
            .push(cmd.spawn().map_err(err("spawn a worker process"))?);
    }

    let mut threads = Vec::new();
    for t in 0..nthreads {
        let (s, stop, progress, gcs, violation) = (
            Arc::clone(&s),
            Arc::clone(&stop),
            Arc::clone(&progress),
            Arc::clone(&gcs),
            Arc::clone(&violation),
        );
        let a = a.clone();
        let seed = a.seed.wrapping_mul(1_000_003).wrapping_add(t);
        threads.push(std::thread::spawn(move || {
            let r = match t {
                0 => {
                    // gc every few ms until the end.
                    let mut rng = Rng(seed);
                    let end = started + Duration::from_secs(a.secs);
                    let mut counts = Counts::default();
                    let mut r = Ok(());
                    while r.is_ok() && Instant::now() < end && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(2 + rng.below(9)));
                        r = counts.add("gc", outcome("gc", s.gc(false).map(|_| ())));
                        gcs.fetch_add(1, Ordering::Relaxed);
                        progress[t as usize]
                            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    r.map(|()| counts)
                }
                _ => builder(
                    &**s,
                    &a,
                    t == 1,
                    format!("t{t}"),
                    seed,
                    &stop,
                    &progress[t as usize],
                    started,
                ),
            };
            if let Err(e) = &r {
                stop.store(true, Ordering::Relaxed);
                let mut v = violation.lock().unwrap_or_else(|p| p.into_inner());
                v.get_or_insert_with(|| e.clone());
            }
            r
        }));
    }

    // The watchdog: each thread finishes an operation at least every 60 s.
    let end = started + Duration::from_secs(a.secs);
    while threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        for (t, (p, handle)) in progress.iter().zip(&threads).enumerate() {
            let last = Duration::from_millis(p.load(Ordering::Relaxed));
            if !handle.is_finished()
                && started.elapsed().saturating_sub(last) > Duration::from_secs(60)
            {
                return Err(format!(
                    "thread {t} finished no operation for 60 s (at {:.0} s of {} s): a deadlock",
                    started.elapsed().as_secs_f64(),
                    a.secs
                ));
            }
        }
        if Instant::now() > end + Duration::from_secs(120) {
            return Err("threads still running 120 s after the end: a deadlock".into());
        }
    }
    let mut counts = Counts::default();
    for t in threads {
        let c = t.join().map_err(|_| "a thread panicked".to_string())?;
        if let Ok(c) = c {
            for (op, (d, r)) in c.0 {
                let e = counts.0.entry(op).or_default();
                e.0 += d;
                e.1 += r;
            }
        }
    }
    if let Some(v) = violation.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(v);
    }
    // The processes end by themselves (they run for the same time).
    for mut c in std::mem::take(&mut procs.0) {
        let deadline = end + Duration::from_secs(120);
        while c.try_wait().map_err(err("wait for a worker"))?.is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err("a worker process still ran 120 s after the end: a deadlock".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = c.wait_with_output().map_err(err("wait for a worker"))?;
        if !out.status.success() {
            return Err(format!(
                "a worker process failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(err("a worker's counts"))?;
        counts.merge(&json);
    }
    let seconds = started.elapsed().as_secs_f64();
    let s = Arc::try_unwrap(s).map_err(|_| "the store is still shared".to_string())?;
    s.close().map_err(err("close"))?;

    // Nothing lost, nothing half made, everything accounted for.
    let mut checked = std::collections::BTreeSet::new();
    let (kept, _) = crate::check(a, &mut checked, &mut Rng(a.seed ^ 0xc4ec))?;
    let accounting = crate::accounting::check(
        &a.backend,
        &a.root,
        dm_names.as_ref().map(|n| n[0].as_str()),
    )?;
    let ops: u64 = counts.0.values().map(|(d, r)| d + r).sum();
    println!(
        "{}",
        serde_json::json!({
            "campaign": "concurrent",
            "backend": a.backend,
            "threads": nthreads,
            "processes": a.procs,
            "seconds": seconds,
            "operations": ops,
            "by_operation": counts.json(),
            "gc_runs": gcs.load(Ordering::Relaxed),
            "layers_kept": kept,
            "layers_checked": checked.len(),
            "accounting": accounting,
            "dm_names": dm_names,
        })
    );
    Ok(())
}
