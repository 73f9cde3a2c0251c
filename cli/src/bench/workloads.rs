//! The workloads of `strata bench`. Each runs against one store and returns a [`Sample`]:
//! the wall time, one duration per operation, per-phase durations and the bytes and entries
//! it moved.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::layer::diff::DiffOptions;
use strata::layer::Compression;
use strata::{Labels, Mount};

use super::tree;
use crate::AnyStore;

/// What one workload measured.
#[derive(Debug, Default)]
pub(crate) struct Sample {
    /// Wall time of the timed part.
    pub total: Duration,
    /// Layers made (0 for workloads that make none).
    pub layers: usize,
    /// One duration per operation (a layer, a diff, an apply).
    pub per_op: Vec<Duration>,
    /// Durations of the steps of an operation (prepare, write, commit, mount...).
    pub phases: Vec<(&'static str, Vec<Duration>)>,
    /// Bytes of file content moved (written, diffed, applied).
    pub bytes: u64,
    /// File system entries moved (diff/apply).
    pub entries: u64,
    /// Per-depth figures of the deep workload: (depth, prepare ms, mount ms).
    pub by_depth: Vec<(usize, f64, f64)>,
    /// Size of the layer blob (diff).
    pub blob_bytes: u64,
}

impl Sample {
    fn phase(&mut self, name: &'static str) -> &mut Vec<Duration> {
        if let Some(i) = self.phases.iter().position(|(n, _)| *n == name) {
            return &mut self.phases[i].1;
        }
        self.phases.push((name, Vec::new()));
        let last = self.phases.len() - 1;
        &mut self.phases[last].1
    }
}

type Res<T> = Result<T, crate::Failure>;

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> crate::Failure + 'a {
    move |e| strata::Error::io(path, what, e).into()
}

/// Mounts `mounts` on `at`, runs `f` on it, unmounts.
fn with_mounted<T>(mounts: &[Mount], at: &Path, f: impl FnOnce(&Path) -> Res<T>) -> Res<T> {
    strata::mount::mount_all(mounts, at)?;
    let r = f(at);
    strata::mount::unmount(at)?;
    r
}

/// `empty-chain` (`parented`): N layers, each on the previous one, committed with nothing
/// written; `empty-flat` (not `parented`): N parentless layers.
pub(crate) fn empty_chain(
    s: &dyn strata::AnyStore,
    layers: usize,
    parented: bool,
    tag: &str,
    tick: &dyn Fn(),
) -> Res<Sample> {
    let mut out = Sample {
        layers,
        ..Sample::default()
    };
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
        out.phase("prepare").push(t1 - t0);
        out.phase("commit").push(t2 - t1);
        out.per_op.push(t2 - t0);
        if parented {
            parent = Some(name);
        }
        tick();
    }
    out.total = start.elapsed();
    Ok(out)
}

/// `small-files`: per layer, a builder's RUN step: prepare on the previous layer, mount,
/// write `files` files of `size` bytes, unmount, commit.
pub(crate) fn small_files(
    s: &dyn strata::AnyStore,
    work: &Path,
    layers: usize,
    files: usize,
    size: u64,
    tag: &str,
    tick: &dyn Fn(),
) -> Res<Sample> {
    let mut out = Sample {
        layers,
        ..Sample::default()
    };
    let at = work.join("small-files-mnt");
    fs::create_dir_all(&at).map_err(io_err(&at, "create the mount point"))?;
    let data = vec![0x5au8; usize::try_from(size).unwrap_or(usize::MAX)];
    let mut parent: Option<String> = None;
    let start = Instant::now();
    for i in 0..layers {
        let key = format!("{tag}/active/{i}");
        let name = format!("{tag}/layer/{i}");
        let t0 = Instant::now();
        let mounts = s.prepare(&key, parent.as_deref(), Labels::new())?;
        let t1 = Instant::now();
        with_mounted(&mounts, &at, |dir| {
            let d = dir.join(format!("l{i}"));
            fs::create_dir(&d).map_err(io_err(&d, "create a directory"))?;
            for f in 0..files {
                let p = d.join(format!("f{f}"));
                fs::write(&p, &data).map_err(io_err(&p, "write a file"))?;
            }
            Ok(())
        })?;
        let t2 = Instant::now();
        s.commit(&name, &key, Labels::new())?;
        let t3 = Instant::now();
        out.phase("prepare").push(t1 - t0);
        out.phase("write").push(t2 - t1);
        out.phase("commit").push(t3 - t2);
        out.per_op.push(t3 - t0);
        out.bytes += size * files as u64;
        parent = Some(name);
        tick();
    }
    out.total = start.elapsed();
    Ok(out)
}

/// One step of containerd's benchsuite on a 1 MiB file.
enum BenchOp {
    Create(&'static str),
    Update(&'static str),
    Remove(&'static str),
}

/// containerd's benchsuite schedule (snapshots/benchsuite): layer `i` (from 1) of 16.
fn benchsuite_ops(i: usize) -> [BenchOp; 10] {
    use BenchOp::{Create as C, Remove as R, Update as U};
    if i.is_multiple_of(3) {
        [
            U("a"),
            U("b"),
            C("c"),
            U("d"),
            C("f"),
            U("e"),
            R("g"),
            C("h"),
            U("i"),
            C("j"),
        ]
    } else if i.is_multiple_of(2) {
        [
            U("a"),
            C("b"),
            R("c"),
            C("d"),
            U("e"),
            R("f"),
            C("g"),
            U("h"),
            C("i"),
            U("j"),
        ]
    } else {
        [
            C("a"),
            C("b"),
            C("c"),
            C("d"),
            C("e"),
            C("f"),
            C("g"),
            C("h"),
            C("i"),
            C("j"),
        ]
    }
}

/// `containerd-benchsuite`: containerd's snapshotter benchmark, `rounds` times: 16 layers,
/// each prepared on the previous one, mounted, 10 operations on 1 MiB files (create with
/// random bytes, a 4-byte rewrite in the middle, delete), unmounted, committed.
pub(crate) fn benchsuite(
    s: &dyn strata::AnyStore,
    work: &Path,
    rounds: usize,
    tag: &str,
    tick: &dyn Fn(),
) -> Res<Sample> {
    const FILE: usize = 1 << 20;
    let mut out = Sample {
        layers: 16 * rounds,
        ..Sample::default()
    };
    let at = work.join("benchsuite-mnt");
    fs::create_dir_all(&at).map_err(io_err(&at, "create the mount point"))?;
    let mut rng = tree::Rng::new(0x5eed);
    let mut data = vec![0u8; FILE];
    let mut parent: Option<String> = None;
    let start = Instant::now();
    for round in 0..rounds {
        for layer in 1..=16 {
            let key = format!("{tag}/prepare-{round}-{layer}");
            let name = format!("{tag}/committed-{round}-{layer}");
            let t0 = Instant::now();
            let mounts = s.prepare(&key, parent.as_deref(), Labels::new())?;
            let t1 = Instant::now();
            with_mounted(&mounts, &at, |dir| {
                for op in benchsuite_ops(layer) {
                    match op {
                        BenchOp::Create(n) => {
                            rng.fill(&mut data);
                            let p = dir.join(n);
                            fs::write(&p, &data).map_err(io_err(&p, "write a file"))?;
                        }
                        BenchOp::Update(n) => {
                            let p = dir.join(n);
                            let f = fs::OpenOptions::new()
                                .write(true)
                                .open(&p)
                                .map_err(io_err(&p, "open a file"))?;
                            let len = f.metadata().map_err(io_err(&p, "stat a file"))?.len();
                            let mut buf = [0u8; 4];
                            rng.fill(&mut buf);
                            std::os::unix::fs::FileExt::write_at(&f, &buf, len / 2)
                                .map_err(io_err(&p, "rewrite a file"))?;
                        }
                        BenchOp::Remove(n) => {
                            let p = dir.join(n);
                            match fs::remove_file(&p) {
                                Ok(()) => {}
                                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                                Err(e) => return Err(io_err(&p, "remove a file")(e)),
                            }
                        }
                    }
                }
                Ok(())
            })?;
            let t2 = Instant::now();
            s.commit(&name, &key, Labels::new())?;
            let t3 = Instant::now();
            out.phase("prepare").push(t1 - t0);
            out.phase("write").push(t2 - t1);
            out.phase("commit").push(t3 - t2);
            out.per_op.push(t3 - t0);
            // containerd counts every operation as a whole file (b.SetBytes).
            out.bytes += 10 * FILE as u64;
            parent = Some(name);
            tick();
        }
    }
    out.total = start.elapsed();
    Ok(out)
}

/// A writer that counts and drops what it is given (the diff's output is measured, not kept).
struct Counting(u64);

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Builds the generated tree in one committed snapshot; returns its name and what it holds.
pub(crate) fn generated_layer(
    s: &dyn strata::AnyStore,
    work: &Path,
    spec: &tree::Spec,
    tag: &str,
) -> Res<(String, tree::Written)> {
    let key = format!("{tag}/tree-active");
    let name = format!("{tag}/tree");
    let at = work.join("tree-mnt");
    fs::create_dir_all(&at).map_err(io_err(&at, "create the mount point"))?;
    let mounts = s.prepare(&key, None, Labels::new())?;
    let written = with_mounted(&mounts, &at, |dir| {
        tree::write(dir, spec)
            .map_err(|e| strata::Error::io(dir, "write the generated tree", e).into())
    })?;
    s.commit(&name, &key, Labels::new())?;
    Ok((name, written))
}

/// `diff`: the generated tree's snapshot diffed to a layer, `rounds` times; the blob is
/// counted and dropped.
pub(crate) fn diff(
    s: &dyn strata::AnyStore,
    (name, written): &(String, tree::Written),
    compression: Compression,
    rounds: usize,
    tick: &dyn Fn(),
) -> Res<Sample> {
    let mut out = Sample::default();
    let opts = DiffOptions {
        compression,
        source_date_epoch: None,
        force_generic: false,
    };
    let start = Instant::now();
    for _ in 0..rounds {
        let mut sink = Counting(0);
        let t0 = Instant::now();
        s.diff(name, &opts, &mut sink)?;
        out.per_op.push(t0.elapsed());
        out.bytes += written.bytes;
        out.entries += written.entries;
        out.blob_bytes = sink.0;
        tick();
    }
    out.total = start.elapsed();
    Ok(out)
}

/// `apply`: the generated tree's layer (diffed once, untimed, to a file under `work`) applied
/// into a fresh snapshot, `rounds` times.
pub(crate) fn apply(
    s: &dyn strata::AnyStore,
    work: &Path,
    (name, written): &(String, tree::Written),
    compression: Compression,
    rounds: usize,
    tag: &str,
    tick: &dyn Fn(),
) -> Res<Sample> {
    let blob = work.join(format!("layer.{}", compression_name(compression)));
    {
        let f = fs::File::create(&blob).map_err(io_err(&blob, "create the layer file"))?;
        let mut w = io::BufWriter::new(f);
        let opts = DiffOptions {
            compression,
            source_date_epoch: None,
            force_generic: false,
        };
        s.diff(name, &opts, &mut w)?;
        w.flush().map_err(io_err(&blob, "write the layer file"))?;
    }
    let mut out = Sample {
        blob_bytes: fs::metadata(&blob).map(|m| m.len()).unwrap_or(0),
        ..Sample::default()
    };
    for i in 0..rounds {
        let key = format!("{tag}/apply-{i}");
        let t0 = Instant::now();
        s.prepare(&key, None, Labels::new())?;
        let f = fs::File::open(&blob).map_err(io_err(&blob, "open the layer file"))?;
        let mut r = io::BufReader::with_capacity(1 << 20, f);
        s.apply(&key, &mut r, None)?;
        let t1 = Instant::now();
        out.per_op.push(t1 - t0);
        out.bytes += written.bytes;
        out.entries += written.entries;
        s.remove(&key)?;
        tick();
    }
    // The removals between rounds are not part of it.
    out.total = out.per_op.iter().sum();
    let _ = fs::remove_file(&blob);
    s.cleanup()?;
    Ok(out)
}

/// The first host id of the `idmap` workload's mapping (`0:100000:65536`, uids and gids).
const IDMAP_HOST: u32 = 100_000;

/// `idmap`: a snapshot of the generated tree presented under a user namespace's ids, two
/// ways (the first `rounds` times, the second once): prepared with containerd's uid/gid mapping labels (idmapped
/// mounts) and mounted; or prepared plainly, mounted and every entry chowned into the range
/// (what a client does for a snapshotter without `remap-ids`; on overlay each chown copies
/// the file up). Each way checks that the tree's root shows as the mapped root. The
/// operations timed are the idmapped prepare+mount (phases `prepare`, `mount`); phase
/// `chown` is the other way's prepare, mount and chown.
pub(crate) fn idmap(
    s: &dyn strata::AnyStore,
    work: &Path,
    (name, _): &(String, tree::Written),
    rounds: usize,
    tag: &str,
    tick: &dyn Fn(),
) -> Res<Sample> {
    let at = work.join("idmap-mnt");
    fs::create_dir_all(&at).map_err(io_err(&at, "create the mount point"))?;
    let mut labels = Labels::new();
    for l in [
        strata::idmap::LABEL_UID_MAPPING,
        strata::idmap::LABEL_GID_MAPPING,
    ] {
        labels.insert(l.to_string(), format!("0:{IDMAP_HOST}:65536"));
    }
    let mut out = Sample::default();
    let expect_root = |dir: &Path| -> Res<()> {
        let m = fs::symlink_metadata(dir).map_err(io_err(dir, "stat the mounted tree"))?;
        if (m.uid(), m.gid()) != (IDMAP_HOST, IDMAP_HOST) {
            return Err(crate::CliError(format!(
                "{}: owned by {}:{}, not by the mapped root {IDMAP_HOST}",
                dir.display(),
                m.uid(),
                m.gid()
            ))
            .into());
        }
        Ok(())
    };
    for i in 0..rounds {
        let key = format!("{tag}/idmapped-{i}");
        let t0 = Instant::now();
        let mounts = s.prepare(&key, Some(name), labels.clone())?;
        let t1 = Instant::now();
        with_mounted(&mounts, &at, |dir| {
            let t2 = Instant::now();
            out.phase("prepare").push(t1 - t0);
            out.phase("mount").push(t2 - t1);
            out.per_op.push(t2 - t0);
            expect_root(dir)
        })?;
        s.remove(&key)?;
        tick();
        if i > 0 {
            // One chown is enough to compare with: it takes seconds where the other takes
            // milliseconds.
            continue;
        }
        let key = format!("{tag}/chowned-{i}");
        let t0 = Instant::now();
        let mounts = s.prepare(&key, Some(name), Labels::new())?;
        with_mounted(&mounts, &at, |dir| {
            chown_tree(dir, IDMAP_HOST)?;
            out.phase("chown").push(t0.elapsed());
            expect_root(dir)
        })?;
        s.remove(&key)?;
        tick();
    }
    out.total = out.per_op.iter().sum();
    s.cleanup()?;
    Ok(out)
}

/// Adds `by` to the owner and group of every entry under `dir` (and of `dir`), without
/// following symlinks.
fn chown_tree(dir: &Path, by: u32) -> Res<()> {
    let shift = |p: &Path| -> Res<()> {
        let m = fs::symlink_metadata(p).map_err(io_err(p, "stat"))?;
        std::os::unix::fs::lchown(p, Some(m.uid() + by), Some(m.gid() + by))
            .map_err(io_err(p, "chown"))?;
        Ok(())
    };
    shift(dir)?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(io_err(&d, "read a directory"))? {
            let e = e.map_err(io_err(&d, "read a directory"))?;
            let p = e.path();
            shift(&p)?;
            if e.file_type().map_err(io_err(&p, "stat"))?.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(())
}

fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "tar",
        Compression::Gzip => "tar.gz",
        Compression::Zstd => "tar.zst",
    }
}

/// `deep`: a chain to `depth`, one file per layer; prepare and mount time against depth.
pub(crate) fn deep(
    s: &dyn strata::AnyStore,
    work: &Path,
    depth: usize,
    tag: &str,
    tick: &dyn Fn(),
) -> Res<Sample> {
    let mut out = Sample {
        layers: depth,
        ..Sample::default()
    };
    let at = work.join("deep-mnt");
    fs::create_dir_all(&at).map_err(io_err(&at, "create the mount point"))?;
    let mut parent: Option<String> = None;
    let mut prepare = Vec::with_capacity(depth);
    let mut mount = Vec::with_capacity(depth);
    let start = Instant::now();
    for i in 0..depth {
        let key = format!("{tag}/active/{i}");
        let name = format!("{tag}/layer/{i}");
        let t0 = Instant::now();
        let mounts = s.prepare(&key, parent.as_deref(), Labels::new())?;
        let t1 = Instant::now();
        strata::mount::mount_all(&mounts, &at)?;
        let t2 = Instant::now();
        let p = at.join(format!("f{i}"));
        let wrote = fs::write(&p, b"layer\n").map_err(io_err(&p, "write a file"));
        strata::mount::unmount(&at)?;
        wrote?;
        s.commit(&name, &key, Labels::new())?;
        let t3 = Instant::now();
        prepare.push(t1 - t0);
        mount.push(t2 - t1);
        out.per_op.push(t3 - t0);
        parent = Some(name);
        tick();
    }
    out.total = start.elapsed();
    // p50 of a window of up to 11 layers around each checkpoint depth.
    let mut checkpoints = vec![1, depth / 4, depth / 2, depth];
    for d in [500, 1000, 2000] {
        if d < depth {
            checkpoints.push(d);
        }
    }
    checkpoints.retain(|d| *d >= 1);
    checkpoints.sort_unstable();
    checkpoints.dedup();
    for d in checkpoints {
        let lo = d.saturating_sub(6);
        let hi = (d + 5).min(depth);
        let window = |v: &[Duration]| {
            let mut w: Vec<Duration> = v[lo..hi].to_vec();
            w.sort_unstable();
            super::percentile(&w, 0.5)
        };
        out.by_depth.push((d, window(&prepare), window(&mount)));
    }
    out.phases.push(("prepare", prepare));
    out.phases.push(("mount", mount));
    Ok(out)
}

/// `concurrent`: `threads` threads, each building its own empty chain of `layers / threads`
/// layers in the one store.
pub(crate) fn concurrent(
    s: &Arc<AnyStore>,
    layers: usize,
    threads: usize,
    tag: &str,
    tick: &(dyn Fn() + Sync),
) -> Res<Sample> {
    let threads = threads.max(1);
    let per = layers / threads;
    let start = Instant::now();
    let results: Vec<Res<Sample>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let s = Arc::clone(s);
                let tag = format!("{tag}/t{t}");
                scope.spawn(move || empty_chain(&**s, per, true, &tag, tick))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::CliError("a benchmark thread panicked".into()).into())
                })
            })
            .collect()
    });
    let mut out = Sample {
        layers: per * threads,
        ..Sample::default()
    };
    for r in results {
        let r = r?;
        out.per_op.extend(r.per_op);
        for (name, v) in r.phases {
            out.phase(name).extend(v);
        }
    }
    out.total = start.elapsed();
    Ok(out)
}
