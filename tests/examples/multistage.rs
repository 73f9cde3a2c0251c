//! Seed story 000 through strata's library API: a multi-stage build with `COPY --from`,
//! checksum-keyed cache lookups, a prune, a rebuild where every step is a cache hit, and an
//! export whose import gives back the same files.
//!
//! ```console
//! # cargo run -p strata-tests --example multistage -- [overlay|native|btrfs|devmapper] [DIR]
//! ```
//!
//! The cache key of a step is the sha256 of its parent's checksum, the instruction, and the
//! checksum of what it copies; the committed result carries it as the label
//! `strata.cache-key`, and a rebuild looks it up with `labels."strata.cache-key"==KEY` before
//! doing the work. Because the key is made of checksums (content), not of snapshot names, it
//! survives a prune that removed the snapshots a first build used.

use std::error::Error;
use std::path::{Path, PathBuf};

use strata::copy::CopyOptions;
use strata::layer::Digest;
use strata::{Backend, ExportOptions, Labels, Snapshotter, Store, StoreOptions};

type Res<T> = Result<T, Box<dyn Error>>;

/// Where the cache key lives on a committed step.
const CACHE_KEY: &str = "strata.cache-key";

/// A tiny builder over a store: stages from files, and COPY --from steps.
struct Builder<'a, B: Backend> {
    store: &'a Store<B>,
    work: PathBuf,
    hits: usize,
    built: usize,
}

impl<B: Backend> Builder<'_, B> {
    /// The committed snapshot carrying cache key `key`, if any.
    fn lookup(&self, key: &str) -> Res<Option<String>> {
        // One filter string: its comma-separated parts must all match (separate strings
        // would match any of them, as in containerd).
        let filter = format!("labels.\"{CACHE_KEY}\"=={key},kind==committed");
        let found = self.store.list(&[filter.as_str()])?;
        Ok(found.into_iter().next().map(|i| i.name))
    }

    fn commit_keyed(&mut self, active: &str, name: &str, key: &str) -> Res<String> {
        let mut labels = Labels::new();
        labels.insert(CACHE_KEY.into(), key.into());
        self.store.commit(name, active, labels)?;
        self.built += 1;
        Ok(name.to_string())
    }

    /// A stage: `parent` plus one file, cached by content.
    fn write_file(
        &mut self,
        parent: Option<&str>,
        path: &str,
        content: &[u8],
        name: &str,
    ) -> Res<String> {
        let parent_sum = match parent {
            Some(p) => self.store.checksum(p, &[], &[])?.to_string(),
            None => "scratch".into(),
        };
        let key =
            Digest::of(format!("{parent_sum}\nWRITE {path}\n{}", Digest::of(content)).as_bytes())
                .to_string();
        if let Some(hit) = self.lookup(&key)? {
            self.hits += 1;
            return Ok(hit);
        }
        let active = format!("{name}-build");
        let mounts = self.store.prepare(&active, parent, Labels::new())?;
        let dir = self.work.join("mnt");
        std::fs::create_dir_all(&dir)?;
        strata::mount::mount_all(&mounts, &dir)?;
        let written = std::fs::write(dir.join(path.trim_start_matches('/')), content);
        strata::mount::unmount(&dir)?;
        written?;
        self.commit_keyed(&active, name, &key)
    }

    /// `COPY --from=from src dest` on top of `parent`, cached by the checksum of `src`.
    fn copy_from(
        &mut self,
        parent: &str,
        from: &str,
        src: &str,
        dest: &str,
        name: &str,
    ) -> Res<String> {
        let key = Digest::of(
            format!(
                "{}\nCOPY {src} {dest}\n{}",
                self.store.checksum(parent, &[], &[])?,
                self.store.checksum(from, &[src], &[])?
            )
            .as_bytes(),
        )
        .to_string();
        if let Some(hit) = self.lookup(&key)? {
            self.hits += 1;
            return Ok(hit);
        }
        let active = format!("{name}-build");
        self.store.prepare(&active, Some(parent), Labels::new())?;
        self.store
            .copy(from, &[src], &active, dest, &CopyOptions::default())?;
        self.commit_keyed(&active, name, &key)
    }
}

fn level3<B: Backend>(b: &mut Builder<'_, B>, suffix: &str) -> Res<String> {
    let step1 = b.copy_from(
        "level2",
        "baseline",
        "/base.txt",
        "/from-baseline.txt",
        &format!("l3-step1{suffix}"),
    )?;
    // A COPY that changes nothing: the file is already there with that content.
    let step2 = b.copy_from(
        &step1,
        "baseline",
        "/base.txt",
        "/from-baseline.txt",
        &format!("l3-step2{suffix}"),
    )?;
    b.copy_from(
        &step2,
        "level1",
        "/level1.txt",
        "/from-level1.txt",
        &format!("l3-step3{suffix}"),
    )
}

fn run<B: Backend>(store: &Store<B>, fresh: &Store<B>, work: &Path) -> Res<()> {
    let mut b = Builder {
        store,
        work: work.to_path_buf(),
        hits: 0,
        built: 0,
    };
    let base = b.write_file(None, "/base.txt", b"baseline\n", "baseline")?;
    store.tag("baseline", &base)?;
    let l1 = b.write_file(Some("baseline"), "/level1.txt", b"level 1\n", "level1")?;
    store.tag("level1", &l1)?;
    let l2 = b.write_file(Some("baseline"), "/level2.txt", b"level 2\n", "level2")?;
    store.tag("level2", &l2)?;
    let top = level3(&mut b, "")?;
    store.tag("level3", &top)?;
    println!(
        "first build: {} step(s) built, {} cache hit(s)",
        b.built, b.hits
    );

    // The prune: the base images go, gc takes what nothing holds any more.
    store.untag("baseline")?;
    store.untag("level1")?;
    let gc = store.gc(false)?;
    println!("gc removed {:?}", gc.removed);

    // Rebuild: the base images come back (same content), then every level3 step is a hit.
    let (built, hits) = (b.built, b.hits);
    let base = b.write_file(None, "/base.txt", b"baseline\n", "baseline-again")?;
    store.tag("baseline", &base)?;
    let l1 = b.write_file(
        Some("baseline"),
        "/level1.txt",
        b"level 1\n",
        "level1-again",
    )?;
    store.tag("level1", &l1)?;
    let (built_bases, hits_bases) = (b.built - built, b.hits - hits);
    let again = level3(&mut b, "-again")?;
    let (level3_built, level3_hits) = (b.built - built - built_bases, b.hits - hits - hits_bases);
    println!("rebuild of level3: {level3_built} step(s) built, {level3_hits} cache hit(s)");
    if again != top || level3_built != 0 || level3_hits != 3 {
        return Err(format!("level3 was not rebuilt from the cache: {again} vs {top}").into());
    }

    // Export level3, import it into a fresh store, check the files.
    let layout = work.join("level3-layout");
    let report = store.export(&["level3"], &layout, &ExportOptions::default())?;
    println!("exported {:?}", report.images);
    let imported = fresh.import(&layout, None)?;
    println!("imported {:?}", imported.images);
    let dir = work.join("check");
    std::fs::create_dir_all(&dir)?;
    let mounts = fresh.view("check", Some("level3"), Labels::new())?;
    strata::mount::mount_all(&mounts, &dir)?;
    let read = |p: &str| std::fs::read_to_string(dir.join(p));
    let files = (
        read("from-baseline.txt"),
        read("from-level1.txt"),
        read("level2.txt"),
    );
    strata::mount::unmount(&dir)?;
    match files {
        (Ok(a), Ok(b), Ok(c)) if a == "baseline\n" && b == "level 1\n" && c == "level 2\n" => {
            println!("the imported level3 has its files");
            Ok(())
        }
        other => Err(format!("the imported level3 lost files: {other:?}").into()),
    }
}

/// Runs the story on two stores of one backend: the builder's and a fresh one to import into.
fn run_with<B: Backend>(work: &Path, open: impl Fn(&Path) -> Res<Store<B>>) -> Res<()> {
    run(
        &open(&work.join("store"))?,
        &open(&work.join("fresh"))?,
        work,
    )
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let backend = args.next().unwrap_or_else(|| "overlay".into());
    let tmp;
    let work = match args.next() {
        Some(p) => PathBuf::from(p),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let opts = || StoreOptions {
        durable: false,
        ..StoreOptions::default()
    };
    match backend.as_str() {
        // The work directory must be on btrfs (scripts/btrfs-loop DIR makes one).
        #[cfg(feature = "btrfs")]
        "btrfs" => run_with(&work, |r| {
            std::fs::create_dir_all(r)?;
            Ok(Store::open(
                r,
                strata_btrfs::BtrfsBackend::open(r)?,
                opts(),
            )?)
        }),
        // Each store gets a small loop-backed thin pool of its own, taken down at the end.
        #[cfg(feature = "devmapper")]
        "devmapper" => {
            let made = run_with(&work, |r| {
                std::fs::create_dir_all(r)?;
                let pool = strata_devmapper::PoolOptions {
                    data_size: 1 << 30,
                    meta_size: 64 << 20,
                    base_size: 64 << 20,
                    ..Default::default()
                };
                strata_devmapper::DevmapperBackend::create_pool(r, &pool)?;
                Ok(Store::open(
                    r,
                    strata_devmapper::DevmapperBackend::open(r)?,
                    opts(),
                )?)
            });
            for r in [work.join("store"), work.join("fresh")] {
                if r.join(strata_devmapper::pool::CONFIG).exists() {
                    strata_devmapper::DevmapperBackend::destroy_pool(&r)?;
                }
            }
            made
        }
        "native" => run_with(&work, |r| {
            Ok(Store::open(
                r,
                strata_native::NativeBackend::open(r)?,
                opts(),
            )?)
        }),
        _ => run_with(&work, |r| {
            Ok(Store::open(
                r,
                strata_overlay::OverlayBackend::open(r, Default::default())?,
                opts(),
            )?)
        }),
    }
}
