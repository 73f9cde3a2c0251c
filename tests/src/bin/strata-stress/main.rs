//! `strata-stress`: the reliability campaigns of `RELIABILITY.md`.
//!
//! ```text
//! strata-stress crash --backend overlay|native|btrfs|devmapper --root DIR [--kills N]
//!                     [--seed S] [--max-ms M] [--max-secs T] [--no-sync]
//! strata-stress enospc --backend overlay|native|btrfs|devmapper --root DIR [--rounds N]
//!                     [--size MIB]
//! strata-stress concurrent --backend overlay|native|btrfs|devmapper --root DIR [--threads T]
//!                     [--procs P] [--secs S] [--seed S]
//! ```
//!
//! **Concurrency campaign**: see `concurrent.rs`. After each campaign, the accounting check of
//! `accounting.rs` (disk against the store's usage; nothing mounted or attached).
//!
//! **Crash campaign.** `N` times: a worker process (this program, `worker` mode) runs a random
//! mix of operations on the store at `DIR` — build a layer (prepare, mount, write files,
//! unmount, commit, tag), apply a generated layer (`apply_layer`), diff, checksum, export an
//! image and import it back, untag, remove Actives left behind, gc — and is killed with
//! SIGKILL after a random 10 to `M` ms (so also while it opens and recovers the store).
//! Then this process opens the store (which recovers it) and checks:
//!
//! * `fsck` is clean: no orphaned storage, no row without storage, no interrupted
//!   operation, no leaked mount or guard;
//! * every layer the workers reported kept (committed and tagged; logged only once both
//!   returned) is still there, committed, unless a worker reported it was about to let it go;
//! * every committed layer any worker made (reported or not) holds exactly what that worker
//!   wrote: each layer carries a manifest of its files and their SHA-256, checked through a
//!   View; layers with a recorded content checksum are re-verified (`verify_layers`: the
//!   layer alone — the layers below it were checked when they were new), and two layers
//!   checked after earlier kills, picked at random, are verified again;
//! * after the last kill, a worker runs a fixed number of operations to the end: everything
//!   works afterwards; then nothing is left mounted under the root.
//!
//! Each worker appends what it did to `DIR.log` (a SIGKILL loses no completed `write`).
//! Prints a JSON summary; exits 1 on the first violation, naming it. `--max-secs T` ends the
//! campaign after the kill that passes `T` seconds (the summary says how many it made).
//!
//! **devmapper** (the tests crate's `devmapper` feature; device-mapper runs in the VM of
//! `tests/vm/run`): the workers and the checks share the store's thin pool through its root,
//! so this process makes a loop-backed pool there before the first worker (16 GiB of data,
//! sparse; 128 MiB ext4 snapshots) and takes it down at the end (`devmapper.rs`). After each
//! kill it also checks that every active thin device of the store is a snapshot the store
//! has (one left without a table by a killed activation is its snapshot's: made again on use).
//!
//! **Full disk.** On a file system of its own (`--size` MiB, default 96: ext4 on a loop device
//! for native and overlay, btrfs — at least 160 MiB — for btrfs, mounted on `DIR`), a store gets a few small kept
//! layers, a layer with a 12 MiB file and an OCI layout (outside the file system) of an image
//! with a 24 MiB layer. Each round fills the file system with an Active snapshot's files to
//! within 2 MiB, then runs one of: apply a 24 MiB layer, copy the 12 MiB file into a new
//! Active snapshot, import the layout, write into a new Active snapshot and commit it. Each
//! must succeed or fail with an error that says the disk is full; then the kept layers hold
//! what they held, `fsck` is clean after `cleanup`, and once the round's snapshots are removed
//! and `gc` ran the free space is back (within 4 MiB of what it was). On devmapper the store
//! gets a thin pool of its own instead (`--size` MiB of data, at least 128, ext4 snapshots
//! twice as large, so that the pool fills before their file system); what fills and must come
//! back is the pool's data space, from its status.
//!
//! The random numbers are a splitmix64 sequence from `--seed` (and the round), so a failing
//! round can be replayed (`strata_tests::Rng`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(feature = "devmapper")]
mod devmapper;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use strata::layer::diff::DiffOptions;
use strata::mount::TempMount;
use strata::{AnyStore, Kind, Labels, Store, StoreOptions};
use strata_tests::Rng;

mod accounting;
mod concurrent;

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

#[derive(Clone)]
struct Args {
    mode: String,
    backend: String,
    root: PathBuf,
    kills: u64,
    seed: u64,
    max_ms: u64,
    ops: Option<u64>,
    durable: bool,
    rounds: u64,
    size_mib: u64,
    /// crash: stop after this many seconds, however many kills were made.
    max_secs: Option<u64>,
    threads: u64,
    procs: u64,
    secs: u64,
}

fn parse_args() -> Res<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: strata-stress crash|worker --backend B --root DIR ...")?;
    let mut a = Args {
        mode,
        backend: "overlay".into(),
        root: PathBuf::new(),
        kills: 30,
        seed: 1,
        max_ms: 400,
        ops: None,
        durable: true,
        rounds: 12,
        size_mib: 96,
        max_secs: None,
        threads: 6,
        procs: 2,
        secs: 20,
    };
    while let Some(flag) = it.next() {
        if flag == "--no-sync" {
            a.durable = false;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--backend" => a.backend = v.clone(),
            "--root" => a.root = PathBuf::from(&v),
            "--kills" => a.kills = num()?,
            "--seed" => a.seed = num()?,
            "--max-ms" => a.max_ms = num()?.max(11),
            "--ops" => a.ops = Some(num()?),
            "--rounds" => a.rounds = num()?,
            "--size" => a.size_mib = num()?.max(48),
            "--max-secs" => a.max_secs = Some(num()?),
            "--threads" => a.threads = num()?,
            "--procs" => a.procs = num()?,
            "--secs" => a.secs = num()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.root.as_os_str().is_empty() {
        return Err("--root DIR is required".into());
    }
    Ok(a)
}

fn open(backend: &str, root: &Path, durable: bool) -> Res<Box<dyn AnyStore>> {
    let opts = StoreOptions {
        durable,
        ..StoreOptions::default()
    };
    fs::create_dir_all(root).map_err(err("create the root"))?;
    Ok(match backend {
        "native" => Box::new(
            Store::open(
                root,
                strata_native::NativeBackend::open(root).map_err(err("native"))?,
                opts,
            )
            .map_err(err("open"))?,
        ),
        "overlay" => Box::new(
            Store::open(
                root,
                strata_overlay::OverlayBackend::open(root, Default::default())
                    .map_err(err("overlay"))?,
                opts,
            )
            .map_err(err("open"))?,
        ),
        #[cfg(feature = "btrfs")]
        "btrfs" => Box::new(
            Store::open(
                root,
                strata_btrfs::BtrfsBackend::open(root).map_err(err("btrfs"))?,
                opts,
            )
            .map_err(err("open"))?,
        ),
        #[cfg(feature = "devmapper")]
        "devmapper" => Box::new(
            Store::open(
                root,
                strata_devmapper::DevmapperBackend::open(root).map_err(err("devmapper"))?,
                opts,
            )
            .map_err(err("open"))?,
        ),
        other => return Err(format!("backend {other:?} is not built into strata-stress")),
    })
}

fn log_path(root: &Path) -> PathBuf {
    let mut p = root.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

/// The manifest file a layer carries: `<sha256 hex> <path>` per file it wrote.
fn manifest_name(id: &str) -> String {
    format!(".stress-manifest-{id}")
}

fn sha_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Files for a new layer: (path, content), then the manifest.
fn layer_files(rng: &mut Rng, id: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..1 + rng.below(6) {
        let size = match rng.below(10) {
            0 => 0,
            1 => 200_000 + rng.below(300_000) as usize,
            _ => rng.below(20_000) as usize,
        };
        files.push((format!("d{}/f-{id}-{i}", rng.below(4)), rng.bytes(size)));
    }
    let manifest: String = files
        .iter()
        .map(|(p, d)| format!("{} {p}\n", sha_hex(d)))
        .collect();
    files.push((manifest_name(id), manifest.into_bytes()));
    files
}

fn committed(s: &dyn AnyStore) -> Res<Vec<String>> {
    Ok(s.list(&["kind==committed"])
        .map_err(err("list"))?
        .into_iter()
        .map(|i| i.name)
        .collect())
}

struct Worker<'a> {
    s: &'a dyn AnyStore,
    rng: Rng,
    log: fs::File,
    tag: String,
    tmp: PathBuf,
    n: u64,
    /// Builds hold their snapshot under a lease from prepare to tag (as a builder beside a
    /// running gc must), pulls their layer until it is tagged.
    lease: bool,
}

impl Worker<'_> {
    /// Appends a line to the log in one `write` (the log is opened for appending): lines of
    /// concurrent writers never interleave.
    fn note(&mut self, line: &str) -> Res<()> {
        self.log
            .write_all(format!("{line}\n").as_bytes())
            .map_err(err("write the log"))
    }

    fn parent(&mut self) -> Res<Option<String>> {
        if self.rng.below(5) == 0 {
            return Ok(None);
        }
        let all = committed(self.s)?;
        Ok(self.rng.pick(&all).cloned())
    }

    /// prepare, mount, write, unmount, commit, tag.
    fn build(&mut self) -> Res<()> {
        let id = format!("{}-{}", self.tag, self.n);
        let parent = self.parent()?;
        let key = format!("a/{id}");
        // With a lease, the snapshot is in it from its first moment (prepare_in).
        let lease = format!("build/{id}");
        if self.lease {
            self.s
                .lease_create(&lease, Some(Duration::from_secs(600)))
                .map_err(|e| format!("lease {lease}: {e}"))?;
        }
        let prepared = match self.lease {
            true => self
                .s
                .prepare_in(&lease, &key, parent.as_deref(), Labels::new()),
            false => self.s.prepare(&key, parent.as_deref(), Labels::new()),
        };
        let mounts = match prepared {
            Ok(m) => m,
            // Removed by gc (or another round's untag) since it was listed.
            Err(e) if e.kind() == strata::ErrorKind::NotFound => {
                if self.lease {
                    self.s
                        .lease_remove(&lease)
                        .map_err(|e| format!("remove lease {lease}: {e}"))?;
                }
                return Ok(());
            }
            Err(e) => return Err(format!("prepare {key}: {e}")),
        };
        let m = TempMount::new_in(&self.tmp, &mounts).map_err(err("mount"))?;
        // Sometimes delete something the parent has: whiteouts, copy-ups.
        if parent.is_some() && self.rng.below(3) == 0 {
            let d = m.path().join(format!("d{}", self.rng.below(4)));
            if let Ok(entries) = fs::read_dir(&d) {
                let names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                if let Some(victim) = self.rng.pick(&names) {
                    fs::remove_file(victim).map_err(err("delete a lower file"))?;
                }
            }
        }
        for (p, data) in layer_files(&mut self.rng, &id) {
            let path = m.path().join(&p);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(err("mkdir"))?;
            }
            fs::write(&path, data).map_err(err("write"))?;
        }
        m.unmount().map_err(err("unmount"))?;
        let name = format!("l/{id}");
        self.s
            .commit(&name, &key, Labels::new())
            .map_err(|e| format!("commit {name}: {e}"))?;
        self.s
            .tag(&format!("img/{id}"), &name)
            .map_err(|e| format!("tag {name}: {e}"))?;
        if self.lease {
            self.s
                .lease_remove(&lease)
                .map_err(|e| format!("remove lease {lease}: {e}"))?;
        }
        self.note(&format!("kept {name} {id}"))
    }

    /// apply_layer of a generated tar, tagged.
    fn apply_layer(&mut self) -> Res<()> {
        let id = format!("{}-{}", self.tag, self.n);
        let parent = self.parent()?;
        let mut layer = strata_tests::LayerBuilder::new();
        let mut dirs = BTreeSet::new();
        for (p, data) in layer_files(&mut self.rng, &id) {
            if let Some((d, _)) = p.rsplit_once('/') {
                if dirs.insert(d.to_string()) {
                    layer.dir(&format!("{d}/"));
                }
            }
            layer.file(&p, &data);
        }
        let bytes = layer.bytes();
        let lease = format!("pull/{id}");
        if self.lease {
            self.s
                .lease_create(&lease, Some(Duration::from_secs(600)))
                .map_err(|e| format!("lease {lease}: {e}"))?;
        }
        let applied = match self.s.apply_layer_in(
            self.lease.then_some(lease.as_str()),
            parent.as_deref(),
            None,
            None,
            &mut bytes.as_slice(),
        ) {
            Ok(a) => a,
            Err(e) if e.kind() == strata::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("apply-layer on {parent:?}: {e}")),
        };
        self.s
            .tag(&format!("img/{id}"), &applied.name)
            .map_err(|e| format!("tag {}: {e}", applied.name))?;
        if self.lease {
            self.s
                .lease_remove(&lease)
                .map_err(|e| format!("remove lease {lease}: {e}"))?;
        }
        self.note(&format!("kept {} {id}", applied.name))
    }

    /// Untags an image, announcing first that its layer may go.
    fn untag(&mut self) -> Res<()> {
        let images = self.s.images().map_err(err("images"))?;
        let Some((image, snapshot)) = self.rng.pick(&images).cloned() else {
            return Ok(());
        };
        self.note(&format!("removing {snapshot}"))?;
        match self.s.untag(&image) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == strata::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("untag {image}: {e}")),
        }
    }

    /// Removes the leases, Active snapshots and Views killed workers left behind.
    fn remove_leftovers(&mut self) -> Res<()> {
        // The leases of killed workers' builds and pulls first (this worker's own are gone
        // by the time it gets here): they hold what is left below.
        for l in self.s.leases().map_err(err("list leases"))? {
            if l.name.starts_with("build/") || l.name.starts_with("pull/") {
                match self.s.lease_remove(&l.name) {
                    Ok(()) => {}
                    Err(e) if e.kind() == strata::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("remove lease {}: {e}", l.name)),
                }
            }
        }
        for info in self
            .s
            .list(&["kind==active", "kind==view"])
            .map_err(err("list"))?
        {
            match self.s.remove(&info.name) {
                Ok(()) => {}
                Err(e) if e.kind() == strata::ErrorKind::NotFound => {}
                // A child of a view? Views have none; an Active has none. In progress
                // elsewhere: only one worker runs at a time, so this is a failure.
                Err(e) => return Err(format!("remove {}: {e}", info.name)),
            }
        }
        Ok(())
    }

    fn read_op(&mut self, kind: u64) -> Res<()> {
        let all = committed(self.s)?;
        let Some(name) = self.rng.pick(&all).cloned() else {
            return Ok(());
        };
        let r = match kind {
            0 => self
                .s
                .diff(&name, &DiffOptions::default(), &mut std::io::sink())
                .map(|_| ()),
            _ => self.s.checksum(&name, &[], &[]).map(|_| ()),
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == strata::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("read {name}: {e}")),
        }
    }

    fn export_import(&mut self) -> Res<()> {
        let images = self.s.images().map_err(err("images"))?;
        let Some((image, _)) = self.rng.pick(&images).cloned() else {
            return Ok(());
        };
        let out = self.tmp.join(format!("export-{}", std::process::id()));
        let _ = fs::remove_dir_all(&out);
        match self.s.export(&[&image], &out, &Default::default()) {
            Ok(_) => {}
            Err(e) if e.kind() == strata::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("export {image}: {e}")),
        }
        let r = self
            .s
            .import(&out, Some(&format!("imp/{}-{}", self.tag, self.n)))
            .map_err(|e| format!("import {image}: {e}"));
        let _ = fs::remove_dir_all(&out);
        r.map(|_| ())
    }

    fn step(&mut self) -> Res<()> {
        self.n += 1;
        let kind = self.rng.below(100);
        let what = match kind {
            0..=39 => "build",
            40..=54 => "apply-layer",
            55..=64 => "untag",
            65..=69 => "gc",
            70..=79 => "diff",
            80..=87 => "checksum",
            88..=93 => "export-import",
            _ => "leftovers",
        };
        self.note(&format!("op {} {what}", self.n))?;
        match what {
            "build" => self.build(),
            "apply-layer" => self.apply_layer(),
            "untag" => self.untag(),
            "gc" => self.s.gc(false).map(|_| ()).map_err(err("gc")),
            "diff" => self.read_op(0),
            "checksum" => self.read_op(1),
            "export-import" => self.export_import(),
            _ => self.remove_leftovers(),
        }
    }
}

fn worker(a: &Args) -> Res<()> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(&a.root))
        .map_err(err("open the log"))?;
    let s = open(&a.backend, &a.root, a.durable)?;
    let tmp = a.root.join("tmp");
    fs::create_dir_all(&tmp).map_err(err("create tmp"))?;
    let mut w = Worker {
        s: &*s,
        rng: Rng(a.seed),
        log,
        tag: format!("{}", a.seed),
        tmp,
        n: 0,
        // Builds and pulls under leases, as beside a gc: a kill then leaves a lease holding
        // a snapshot (and, mid-apply, apply-layer's own snapshot, which recovery removes);
        // such leases expire after 600 s.
        lease: true,
    };
    w.note(&format!("start {}", a.seed))?;
    loop {
        if a.ops.is_some_and(|n| w.n >= n) {
            break;
        }
        w.step()?;
    }
    w.remove_leftovers()?;
    w.note("done")?;
    drop(w);
    s.close().map_err(err("close"))
}

/// What the log says, over every round so far.
#[derive(Default)]
struct Log {
    /// Layers reported kept: name → manifest id.
    kept: BTreeMap<String, String>,
    /// Layers a worker said it might let go.
    let_go: BTreeSet<String>,
    ops: u64,
}

fn read_log(root: &Path) -> Res<Log> {
    read_log_file(&log_path(root))
}

fn read_log_file(path: &Path) -> Res<Log> {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        f.read_to_string(&mut text).map_err(err("read the log"))?;
    }
    let mut l = Log::default();
    for line in text.lines() {
        let mut w = line.split(' ');
        match (w.next(), w.next(), w.next()) {
            // A layer announced as let go stays so, even when a "kept" comes later: with
            // several workers, another's untag may land between a tag and its "kept".
            (Some("kept"), Some(name), Some(id)) => {
                l.kept.insert(name.to_string(), id.to_string());
            }
            (Some("removing"), Some(name), _) => {
                l.let_go.insert(name.to_string());
            }
            (Some("op"), _, _) => l.ops += 1,
            _ => {}
        }
    }
    Ok(l)
}

/// Checks a committed layer's manifest through a View: every file it lists, with its hash.
fn check_manifest(s: &dyn AnyStore, tmp: &Path, name: &str, id: &str) -> Res<()> {
    let key = format!("check/{id}");
    let mounts = s
        .view(&key, Some(name), Labels::new())
        .map_err(|e| format!("view {name}: {e}"))?;
    let result = (|| {
        let m = TempMount::new_in(tmp, &mounts).map_err(err("mount a view"))?;
        let manifest = fs::read_to_string(m.path().join(manifest_name(id)))
            .map_err(|e| format!("layer {name} has no manifest {}: {e}", manifest_name(id)))?;
        for line in manifest.lines() {
            let (sha, path) = line
                .split_once(' ')
                .ok_or_else(|| format!("layer {name}: bad manifest line {line:?}"))?;
            let data =
                fs::read(m.path().join(path)).map_err(|e| format!("layer {name}: {path}: {e}"))?;
            if sha_hex(&data) != sha {
                return Err(format!(
                    "layer {name}: {path} holds other bytes than were written ({} bytes)",
                    data.len()
                ));
            }
        }
        m.unmount().map_err(err("unmount a view"))
    })();
    s.remove(&key).map_err(|e| format!("remove {key}: {e}"))?;
    result
}

/// The checks after a kill (see the module docs). `checked`: layers whose content was
/// already checked (committed layers never change), so each check reads only what the last
/// worker added.
fn check(a: &Args, checked: &mut BTreeSet<String>, rng: &mut Rng) -> Res<(usize, usize)> {
    let s = open(&a.backend, &a.root, a.durable)?;
    let report = s.fsck(false).map_err(err("fsck"))?;
    if !report.is_clean() {
        return Err(format!("fsck after recovery is not clean: {report:?}"));
    }
    #[cfg(feature = "devmapper")]
    if a.backend == "devmapper" {
        devmapper::check_devices(&a.root)?;
    }
    let log = read_log(&a.root)?;
    let mut lost = Vec::new();
    for name in log.kept.keys().filter(|n| !log.let_go.contains(*n)) {
        match s.stat(name) {
            Ok(i) if i.kind == Kind::Committed => {}
            Ok(i) => lost.push(format!("{name} is {}", i.kind)),
            Err(e) => lost.push(format!("{name}: {e}")),
        }
    }
    if !lost.is_empty() {
        return Err(format!("layers reported kept are gone: {lost:?}"));
    }
    // Every committed layer a worker made, reported or not: its content is what was
    // written (its manifest id is in its name, or in the log for apply-layer's chainIDs).
    let tmp = a.root.join("tmp");
    fs::create_dir_all(&tmp).map_err(err("create tmp"))?;
    let mut new = 0;
    let mut old = Vec::new();
    let ids: BTreeMap<&String, &String> = log.kept.iter().collect();
    for info in s.list(&["kind==committed"]).map_err(err("list"))? {
        // A layer by its name and commit time: an applied layer removed and applied again
        // under the same chainID is new content, checked again.
        let seen = format!("{} {:?}", info.name, info.created);
        if checked.contains(&seen) {
            old.push(info.name);
            continue;
        }
        let name = info.name;
        let id = match name.strip_prefix("l/") {
            Some(id) => id.to_string(),
            None => match ids.get(&name) {
                Some(id) => id.to_string(),
                // An applied layer whose worker died before logging it: its recorded
                // content checksum is verified below.
                None => String::new(),
            },
        };
        if !id.is_empty() {
            check_manifest(&*s, &tmp, &name, &id)?;
        }
        // Only this layer: the layers below it are in `checked` already (a chain's whole
        // verify made each check cost more as the chains grew).
        let v = s
            .verify_layers(&[&name])
            .map_err(|e| format!("verify {name}: {e}"))?;
        if !v.damaged.is_empty() {
            return Err(format!("verify found damaged layers: {:?}", v.damaged));
        }
        checked.insert(seen);
        new += 1;
    }
    // And two layers checked after earlier kills, at random: what a later recovery might
    // have damaged below the new ones.
    for _ in 0..2 {
        let Some(name) = rng.pick(&old).cloned() else {
            break;
        };
        let v = s
            .verify_layers(&[&name])
            .map_err(|e| format!("verify {name} again: {e}"))?;
        if !v.damaged.is_empty() {
            return Err(format!(
                "verify found a layer checked before damaged: {:?}",
                v.damaged
            ));
        }
    }
    s.close().map_err(err("close"))?;
    Ok((log.kept.len(), new))
}

/// This program in worker mode on the campaign's store, with `seed`.
fn worker_command(exe: &Path, a: &Args, seed: u64) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args([
        "worker",
        "--backend",
        &a.backend,
        "--seed",
        &seed.to_string(),
    ])
    .arg("--root")
    .arg(&a.root);
    if !a.durable {
        cmd.arg("--no-sync");
    }
    cmd
}

fn crash(a: &Args) -> Res<()> {
    // devmapper: one thin pool for the campaign, made in the root, where every process finds
    // it; taken down when this returns. 16 GiB of data, sparse: what the layers use.
    #[cfg(feature = "devmapper")]
    let pool = (a.backend == "devmapper")
        .then(|| devmapper::CampaignPool::create(&a.root, 16 << 30, 128 << 20))
        .transpose()?;
    #[cfg(feature = "devmapper")]
    let dm_names = pool.as_ref().map(|p| [p.pool.clone(), p.prefix.clone()]);
    #[cfg(not(feature = "devmapper"))]
    let dm_names: Option<[String; 2]> = None;
    let exe = std::env::current_exe().map_err(err("current exe"))?;
    let mut rng = Rng(a.seed ^ 0x5eed);
    let mut checked = BTreeSet::new();
    let started = Instant::now();
    let mut killed_running = 0;
    for round in 0..a.kills {
        if a.max_secs
            .is_some_and(|s| started.elapsed() >= Duration::from_secs(s))
        {
            break;
        }
        let seed = a.seed.wrapping_mul(1_000_003).wrapping_add(round);
        let mut cmd = worker_command(&exe, a, seed);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        // Its own process group: nothing it starts outlives the kill.
        cmd.process_group(0);
        let mut child = cmd.spawn().map_err(err("spawn a worker"))?;
        let wait = 10 + rng.below(a.max_ms - 10);
        std::thread::sleep(Duration::from_millis(wait));
        let _ = child.kill();
        let out = child
            .wait_with_output()
            .map_err(err("wait for the worker"))?;
        if out.status.code().is_some() {
            // It finished (or failed) before the kill.
            return Err(format!(
                "round {round}: the worker exited before the kill: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        killed_running += 1;
        check(a, &mut checked, &mut rng)
            .map_err(|e| format!("round {round} (seed {seed}): {e}"))?;
        // Progress on standard error: what a long run that is stopped from outside made.
        if killed_running % 25 == 0 {
            eprintln!(
                "crash: {killed_running} kills checked, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    // Afterwards everything works: a worker runs to the end.
    let seed = a.seed.wrapping_mul(1_000_003).wrapping_add(a.kills);
    let mut cmd = worker_command(&exe, a, seed);
    cmd.args(["--ops", "40"]);
    let out = cmd.output().map_err(err("run the last worker"))?;
    if !out.status.success() {
        return Err(format!(
            "the worker after the last kill failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (kept, _) = check(a, &mut checked, &mut rng)?;
    // Nothing left mounted or leaked, and the disk holds what the store reports.
    let accounting = accounting::check(
        &a.backend,
        &a.root,
        dm_names.as_ref().map(|n| n[0].as_str()),
    )?;
    let log = read_log(&a.root)?;
    println!(
        "{}",
        serde_json::json!({
            "campaign": "crash",
            "backend": a.backend,
            "durable": a.durable,
            "seed": a.seed,
            "kills": killed_running,
            "operations_started": log.ops,
            "layers_kept": kept,
            "layers_checked": checked.len(),
            "accounting": accounting,
            "seconds": started.elapsed().as_secs_f64(),
            "dm_names": dm_names,
        })
    );
    Ok(())
}

/// Bytes free for an unprivileged writer on the file system of `p`.
fn free_bytes(p: &Path) -> Res<u64> {
    let st = rustix::fs::statvfs(p).map_err(err("statvfs"))?;
    Ok(st.f_bavail * st.f_frsize)
}

/// Whether an error says the disk is full.
fn says_full(e: &str) -> bool {
    let e = e.to_lowercase();
    e.contains("space") || e.contains("full")
}

/// Where the full-disk campaign's store lives: on a file system of its own, or (devmapper)
/// with a thin pool of its own, whose data space is what runs out.
enum Room {
    Fs(strata_tests::LoopFs),
    #[cfg(feature = "devmapper")]
    Pool(PathBuf, devmapper::CampaignPool),
}

impl Room {
    /// The directory the store is made in.
    fn path(&self) -> &Path {
        match self {
            Room::Fs(fs) => fs.path(),
            #[cfg(feature = "devmapper")]
            Room::Pool(dir, _) => dir,
        }
    }

    /// Bytes left: free on the file system, or free data blocks in the pool.
    fn free(&self) -> Res<u64> {
        match self {
            Room::Fs(fs) => free_bytes(fs.path()),
            #[cfg(feature = "devmapper")]
            Room::Pool(_, pool) => pool.free(),
        }
    }

    /// A pool's device-mapper name and its thin devices' prefix: what must be gone after.
    fn dm_names(&self) -> Option<[String; 2]> {
        match self {
            Room::Fs(_) => None,
            #[cfg(feature = "devmapper")]
            Room::Pool(_, p) => Some([p.pool.clone(), p.prefix.clone()]),
        }
    }
}

/// Writes 1 MiB files into `dir` until fewer than `leave` bytes are left in `room` (or the
/// disk is full); returns how many. Each file is synced: a thin pool only sees what reached
/// the device.
fn fill(room: &Room, dir: &Path, leave: u64, rng: &mut Rng) -> Res<usize> {
    let chunk = rng.bytes(1 << 20);
    let mut n = 0;
    while room.free()? > leave + (1 << 20) {
        let written = fs::File::create(dir.join(format!("fill-{n}")))
            .and_then(|mut f| f.write_all(&chunk).and_then(|()| f.sync_all()));
        match written {
            Ok(()) => n += 1,
            // ENOSPC; EIO from a thin pool out of data space.
            Err(e) if matches!(e.raw_os_error(), Some(28 | 5)) => break,
            Err(e) => return Err(format!("fill: {e}")),
        }
    }
    Ok(n)
}

fn enospc(a: &Args) -> Res<()> {
    // mkfs.btrfs refuses less than 109 MiB, and a small btrfs gives much of itself to
    // metadata (kept twice).
    // devmapper: the pool's data (its ext4 base, twice as large, keeps its own free space
    // out of the way) must hold the base's inode tables and journal, 30 MiB, besides.
    let size_mib = match a.backend.as_str() {
        "btrfs" => a.size_mib.max(160),
        "devmapper" => a.size_mib.max(128),
        _ => a.size_mib,
    };
    let size = size_mib << 20;
    let fs_guard = match a.backend.as_str() {
        "btrfs" => Room::Fs(strata_tests::LoopFs::mount_at(&a.root, size)),
        #[cfg(feature = "devmapper")]
        "devmapper" => Room::Pool(
            a.root.clone(),
            devmapper::CampaignPool::create(&a.root.join("store"), size, 2 * size)?,
        ),
        _ => Room::Fs(strata_tests::LoopFs::ext4_at(&a.root, size)),
    };
    let root = fs_guard.path().join("store");
    let outside = a.root.with_extension("outside");
    let _ = fs::remove_dir_all(&outside);
    fs::create_dir_all(&outside).map_err(err("create the outside directory"))?;
    let started = Instant::now();
    let result = (|| {
        let s = open(&a.backend, &root, a.durable)?;
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp).map_err(err("create tmp"))?;
        let log = fs::File::create(outside.join("log")).map_err(err("create the log"))?;
        let mut w = Worker {
            s: &*s,
            rng: Rng(a.seed),
            log,
            tag: format!("{}", a.seed),
            tmp: tmp.clone(),
            n: 0,
            lease: false,
        };
        eprintln!(
            "enospc: the store is open, {} MiB free ({:.0} s)",
            fs_guard.free()? >> 20,
            started.elapsed().as_secs_f64()
        );
        // Kept layers with manifests.
        for _ in 0..3 {
            w.n += 1;
            w.build()?;
            w.n += 1;
            w.apply_layer()?;
        }
        let big12 = w.rng.bytes(12 << 20);
        let big24 = w.rng.bytes(24 << 20);
        let source = {
            let m = s
                .prepare("source-a", None, Labels::new())
                .map_err(err("prepare"))?;
            let t = TempMount::new_in(&tmp, &m).map_err(err("mount"))?;
            fs::write(t.path().join("big"), &big12).map_err(err("write"))?;
            t.unmount().map_err(err("unmount"))?;
            s.commit("source", "source-a", Labels::new())
                .map_err(err("commit"))?;
            s.tag("img/source", "source").map_err(err("tag"))?;
            "source"
        };
        let tar24 = strata_tests::LayerBuilder::new()
            .file("big24", &big24)
            .bytes();
        // The layout to import: exported while there is room, then let go.
        let big_image = s
            .apply_layer(None, None, None, &mut tar24.as_slice())
            .map_err(err("apply the big layer"))?;
        s.tag("img/big", &big_image.name).map_err(err("tag"))?;
        let layout = outside.join("layout");
        s.export(&["img/big"], &layout, &Default::default())
            .map_err(err("export"))?;
        s.untag("img/big").map_err(err("untag"))?;
        s.gc(false).map_err(err("gc"))?;
        s.cleanup().map_err(err("cleanup"))?;
        let kept = read_log_file(&outside.join("log"))?.kept;
        eprintln!(
            "enospc: {} kept layers and the layout made, {} MiB free ({:.0} s)",
            kept.len(),
            fs_guard.free()? >> 20,
            started.elapsed().as_secs_f64()
        );
        let free0 = fs_guard.free()?;

        let mut outcomes: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        let mut messages = BTreeSet::new();
        for round in 0..a.rounds {
            let filler = format!("filler-{round}");
            let m = s
                .prepare(&filler, None, Labels::new())
                .map_err(err("prepare the filler"))?;
            let t = TempMount::new_in(&tmp, &m).map_err(err("mount the filler"))?;
            let filled = fill(&fs_guard, t.path(), 2 << 20, &mut w.rng)?;
            eprintln!(
                "enospc: round {round}: filled {filled} MiB, {} MiB left ({:.0} s)",
                fs_guard.free()? >> 20,
                started.elapsed().as_secs_f64()
            );
            t.unmount()
                .map_err(|e| format!("unmount the filler: {e}"))?;
            let op = ["apply-layer", "copy", "import", "commit"][(round % 4) as usize];
            let key = format!("r/{round}");
            let r: Result<(), String> = match op {
                "apply-layer" => s
                    .apply_layer(Some(source), None, None, &mut tar24.as_slice())
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                "copy" => s
                    .prepare(&key, None, Labels::new())
                    .and_then(|_| {
                        s.copy(source, &["/big"], &key, "/big", &Default::default())
                            .map(|_| ())
                    })
                    .map_err(|e| e.to_string()),
                "import" => s
                    .import(&layout, Some(&format!("imp/{round}")))
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                _ => (|| {
                    let m = s
                        .prepare(&key, Some(source), Labels::new())
                        .map_err(|e| e.to_string())?;
                    let t = TempMount::new_in(&tmp, &m).map_err(|e| e.to_string())?;
                    // A build step that runs out of space, as builds do; what it could
                    // write is committed or the commit fails cleanly.
                    let _ = fs::write(t.path().join("more"), &big12);
                    t.unmount().map_err(|e| e.to_string())?;
                    s.commit(&format!("c/{round}"), &key, Labels::new())
                        .map_err(|e| e.to_string())
                })(),
            };
            eprintln!(
                "enospc: round {round}, {op}: {} ({:.0} s)",
                r.as_ref().err().map_or("succeeded", |e| e.as_str()),
                started.elapsed().as_secs_f64()
            );
            let entry = outcomes.entry(op).or_default();
            match r {
                Ok(()) => entry.0 += 1,
                Err(e) if says_full(&e) => {
                    entry.1 += 1;
                    messages.insert(format!("{op}: {e}"));
                }
                Err(e) => {
                    return Err(format!(
                        "round {round}, {op}: an error that does not say the disk is full: {e}"
                    ))
                }
            }
            // The round's snapshots go, while the disk is still full: the store stays usable.
            for info in s.list(&[]).map_err(err("list"))? {
                let n = info.name.as_str();
                if n.starts_with("filler-") || n.starts_with("r/") || n.starts_with("c/") {
                    s.remove(n)
                        .map_err(|e| format!("round {round}, {op}, after: remove {n}: {e}"))?;
                }
            }
            for (image, _) in s.images().map_err(err("images"))? {
                if image.starts_with("imp/") {
                    s.untag(&image).map_err(err("untag"))?;
                }
            }
            s.gc(false).map_err(err("gc"))?;
            s.cleanup().map_err(err("cleanup"))?;
            // Nothing kept changed.
            for (name, id) in &kept {
                check_manifest(&*s, &tmp, name, id)
                    .map_err(|e| format!("round {round}, {op}, after: {e}"))?;
            }
            s.cleanup().map_err(err("cleanup"))?;
            let report = s.fsck(false).map_err(err("fsck"))?;
            if !report.is_clean() {
                return Err(format!(
                    "round {round}, {op}: fsck is not clean: {report:?}"
                ));
            }
            // btrfs gives a deleted subvolume's space back when its cleaner has run and
            // a transaction committed: wait for that, as a user would see it a moment later.
            if a.backend == "btrfs" {
                for args in [&["subvolume", "sync"][..], &["filesystem", "sync"][..]] {
                    let _ = Command::new("btrfs")
                        .args(args)
                        .arg(fs_guard.path())
                        .stdout(Stdio::null())
                        .status();
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut back = fs_guard.free()?;
            while back + (4 << 20) < free0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                back = fs_guard.free()?;
            }
            if back + (4 << 20) < free0 {
                return Err(format!(
                    "round {round}, {op}: {} MiB free after remove and gc, {} MiB before the round",
                    back >> 20,
                    free0 >> 20
                ));
            }
        }
        drop(w);
        s.close().map_err(err("close"))?;
        let failed_cleanly: u64 = outcomes.values().map(|o| o.1).sum();
        if failed_cleanly == 0 {
            return Err(format!("the disk never ran full: {outcomes:?}"));
        }
        Ok(serde_json::json!({
            "campaign": "enospc",
            "backend": a.backend,
            "size_mib": size_mib,
            "rounds": a.rounds,
            "outcomes": outcomes.iter().map(|(op, (ok, full))| (op.to_string(), serde_json::json!({"succeeded": ok, "failed_full": full}))).collect::<serde_json::Map<_, _>>(),
            "messages": messages,
            "seconds": started.elapsed().as_secs_f64(),
            "dm_names": fs_guard.dm_names(),
        }))
    })();
    let pool = (!matches!(fs_guard, Room::Fs(_))).then_some(root);
    drop(fs_guard);
    // A pool's store is in a plain directory: gone with it.
    if let Some(root) = pool {
        let _ = fs::remove_dir_all(root);
    }
    let _ = fs::remove_dir_all(&outside);
    println!("{}", result?);
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|a| match a.mode.as_str() {
        "crash" => crash(&a),
        "worker" => worker(&a),
        "enospc" => enospc(&a),
        "concurrent" => concurrent::run(&a),
        "cworker" => concurrent::worker(&a),
        other => Err(format!(
            "unknown mode {other:?}: crash, enospc, concurrent, worker or cworker"
        )),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata-stress: {e}");
            ExitCode::FAILURE
        }
    }
}
