//! `strata`: snapshots, mounts and benchmarks from the shell.
//!
//! Every subcommand opens the store at `--root`, does one thing and exits. Errors print one
//! line naming the snapshot and the cause (or, with `--json`, a JSON object on stdout) and
//! exit with status 1.

mod bench;
mod output;
mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use strata::{Error, Labels, StoreOptions};

use crate::output::Output;

/// The default store root.
const DEFAULT_ROOT: &str = "/var/lib/strata";

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Container image layer storage: containerd's snapshotter model on overlayfs or plain copies",
    long_about = None
)]
struct Cli {
    #[command(flatten)]
    global: Global,

    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand takes.
#[derive(Args, Debug, Clone)]
struct Global {
    /// Store root: metadata and snapshot storage live under it [default: /var/lib/strata]
    #[arg(long, global = true, env = "STRATA_ROOT")]
    root: Option<PathBuf>,

    /// Storage backend: overlay, native, btrfs or devmapper (those built in) [default: the one
    /// recorded in the root, else overlay]
    #[arg(long, global = true, env = "STRATA_BACKEND")]
    backend: Option<String>,

    /// Machine-readable output; errors become a JSON object on stdout
    #[arg(long, global = true)]
    json: bool,

    /// How long to wait for another process holding the store (e.g. 500ms, 10s)
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    lock_timeout: Duration,

    /// Do not sync storage before recording it: survives a killed process, not a power loss
    #[arg(long, global = true)]
    no_sync: bool,

    /// Delete storage in `remove` itself instead of leaving it to `cleanup`
    #[arg(long, global = true)]
    sync_remove: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a writable (Active) snapshot on top of PARENT and print its mounts
    Prepare {
        /// Key of the new snapshot
        key: String,
        /// Committed snapshot to build on
        parent: Option<String>,
        /// Label as k=v (repeatable); strata.io/volatile=true asks for a volatile overlay
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Hold the snapshot in this lease from its creation (a builder beside containerd's
        /// gc, which removes every snapshot it does not know, on a served store)
        #[arg(long)]
        lease: Option<String>,
    },
    /// Create a read-only (View) snapshot of PARENT and print its mounts
    View {
        /// Key of the new snapshot
        key: String,
        /// Committed snapshot to look at
        parent: Option<String>,
        /// Label as k=v (repeatable)
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Print the mounts of an Active or View snapshot
    Mounts {
        /// Key of the snapshot
        key: String,
    },
    /// Commit the Active snapshot KEY as NAME
    Commit {
        /// Name of the committed snapshot
        name: String,
        /// Key of the Active snapshot
        key: String,
        /// Label as k=v (repeatable); replaces the Active snapshot's labels
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Remove a snapshot that has no children
    #[command(alias = "rm")]
    Remove {
        /// Key or name of the snapshot
        key: String,
    },
    /// Print what the store knows about a snapshot
    Stat {
        /// Key or name of the snapshot
        key: String,
    },
    /// List snapshots, optionally filtered (containerd's syntax, e.g. kind==committed)
    #[command(alias = "list")]
    Ls {
        /// Filter (repeatable: OR'ed; commas inside one filter AND)
        #[arg(long = "filter", short = 'f')]
        filters: Vec<String>,
    },
    /// Print the disk usage of a snapshot's own layer
    Usage {
        /// Key or name of the snapshot
        key: String,
    },
    /// Set (k=v) or delete (k=) labels of a snapshot
    Label {
        /// Key or name of the snapshot
        key: String,
        /// k=v to set, k= to delete (at least one)
        #[arg(required = true, value_parser = parse_label_edit)]
        edits: Vec<(String, Option<String>)>,
    },
    /// Mount an Active or View snapshot on TARGET
    Mount {
        /// Key of the snapshot
        key: String,
        /// Mount point (an existing directory)
        target: PathBuf,
    },
    /// Unmount TARGET (mounted by `strata mount`)
    Umount {
        /// Mount point
        target: PathBuf,
    },
    /// Reclaim the storage of removed snapshots and interrupted operations
    Cleanup,
    /// Name a committed snapshot as an image (the image holds its whole chain)
    Tag {
        /// Image name
        image: String,
        /// Committed snapshot (or another image)
        snapshot: String,
    },
    /// Delete an image name (its layers stay until gc)
    Untag {
        /// Image name
        image: String,
    },
    /// List images
    Images,
    /// List the flattened lowers deep chains mount through, with what each costs on disk
    Flattened,
    /// Manage leases: named holders a builder takes for the duration of a build
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Write a committed snapshot's changes against its parent as an OCI layer
    Diff {
        /// Committed snapshot or image
        name: String,
        /// Compression: none, gzip or zstd
        #[arg(long, default_value = "none")]
        compression: strata::layer::Compression,
        /// Where to write the layer
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Apply an OCI layer (plain, gzip or zstd) to an active snapshot
    Apply {
        /// Active snapshot
        key: String,
        /// The layer file
        file: PathBuf,
        /// The blob digest the layer must have (sha256:...)
        #[arg(long)]
        digest: Option<String>,
    },
    /// Apply a layer on a parent and commit it under its chainID (prints the name); with
    /// --diff-id, an already committed chain is returned without reading the file
    ApplyLayer {
        /// The layer file
        file: PathBuf,
        /// Parent layer (made by apply-layer) or image
        #[arg(long)]
        parent: Option<String>,
        /// The layer's diffID, when known (sha256 of the uncompressed tar)
        #[arg(long)]
        diff_id: Option<String>,
        /// The blob digest the layer must have
        #[arg(long)]
        digest: Option<String>,
        /// Add the layer to this lease before gc could see it unheld (a pull beside a
        /// running gc holds its layers under a lease until it tags the image)
        #[arg(long)]
        lease: Option<String>,
    },
    /// The device-mapper thin pool of a devmapper store
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Check the store: interrupted operations, broken snapshots, stale export guards,
    /// leaked mounts, and storage awaiting cleanup (not a problem). Exit status 1 when
    /// anything is wrong
    Fsck {
        /// Fix what can be fixed without losing committed data, and say what was done
        #[arg(long)]
        repair: bool,
        /// Also recompute every recorded layer's content checksum from its stored content;
        /// a layer whose content changed is marked broken
        #[arg(long)]
        verify: bool,
    },
    /// Write images as an OCI image layout (a directory) or an OCI archive (FILE.tar);
    /// nothing is written unless every layer is there, committed and intact
    Export {
        /// Images (or committed snapshots) to export
        #[arg(required = true)]
        images: Vec<String>,
        /// The layout directory or archive to create
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Recompute each layer's content checksum first and refuse changed layers
        #[arg(long)]
        verify: bool,
        /// Compression of layers strata diffs: none, gzip or zstd (imported layers keep theirs)
        #[arg(long, default_value = "gzip")]
        compression: strata::layer::Compression,
    },
    /// Copy paths of a committed snapshot or image into an active snapshot, as `COPY --from`
    /// does: symlinks below the named paths are never followed. Arguments are
    /// `FROM:/PATH... KEY:/DEST` (split at the first `:/`, so image names may hold `:`)
    Copy {
        /// Sources `FROM:/PATH`, then the target `KEY:/DEST`
        #[arg(required = true, num_args = 2..)]
        args: Vec<String>,
        /// Leave out paths matching this .dockerignore pattern (repeatable; `!` re-includes)
        #[arg(long)]
        exclude: Vec<String>,
        /// Keep each source's path below the destination (`COPY --parents`)
        #[arg(long)]
        parents: bool,
        /// Owner of everything copied, `UID:GID`
        #[arg(long)]
        chown: Option<String>,
    },
    /// Print the cache-key checksum of paths (all of it by default) of a committed snapshot
    /// or image: paths, types, modes, owners, xattrs, content and symlink targets, no times
    Checksum {
        /// Committed snapshot or image
        name: String,
        /// Paths inside it (default: everything)
        paths: Vec<String>,
        /// Leave out paths matching this .dockerignore pattern (repeatable)
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Import an OCI image layout or archive: every layer applied (committed chains are cache
    /// hits), every digest checked, each image tagged
    Import {
        /// The layout directory or archive
        source: PathBuf,
        /// Tag the (single) image with this name instead of its index annotation
        #[arg(long = "ref")]
        ref_name: Option<String>,
    },
    /// Remove committed snapshots no image, lease, active/view snapshot or gc.root label holds
    Gc {
        /// Only list what would be removed
        #[arg(long)]
        dry_run: bool,
    },
    /// Measure layer-creation throughput
    Bench(bench::BenchArgs),
    /// Serve the store to containerd as a proxy snapshotter (snapshots.v1 gRPC on a unix
    /// socket) until SIGTERM or SIGINT. The store becomes containerd-managed: strata's gc then
    /// never removes a snapshot, containerd's gc decides
    Serve {
        /// The unix socket to listen on (mode 0600; a stale one is replaced)
        #[arg(long, default_value = DEFAULT_ADDRESS)]
        address: PathBuf,
        /// How long calls in flight may run after SIGTERM/SIGINT before the server stops
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        grace: Duration,
        /// Log level of strata's own messages (error, warn, info, debug, trace), or a full
        /// tracing filter (e.g. `debug` for everything: `h2=debug,strata=trace`); STRATA_LOG
        /// wins
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Print containerd's `[proxy_plugins.strata]` entry for this root and address, with
        /// the capabilities of its backend (`remap-ids`: idmapped snapshots), and exit
        #[arg(long)]
        print_config: bool,
    },
}

/// Where `strata serve` listens by default.
const DEFAULT_ADDRESS: &str = "/run/strata/strata.sock";

#[derive(Subcommand, Debug)]
enum LeaseCommand {
    /// Create a lease
    Create {
        /// Lease name
        name: String,
        /// Expire after this long (e.g. 30m, 2h); never when absent
        #[arg(long, value_parser = parse_duration)]
        expire: Option<Duration>,
    },
    /// Add snapshots (keys, names or images) to a lease
    Add {
        /// Lease name
        name: String,
        /// Snapshots to hold
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// List leases
    Ls,
    /// Remove a lease
    Rm {
        /// Lease name
        name: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (e.g. 500ms, 10s): {e}"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not k=v")),
    }
}

fn parse_label_edit(s: &str) -> Result<(String, Option<String>), String> {
    match s.split_once('=') {
        Some((k, "")) if !k.is_empty() => Ok((k.to_string(), None)),
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), Some(v.to_string()))),
        _ => Err(format!("{s:?} is neither k=v (set) nor k= (delete)")),
    }
}

/// `pool` subcommands.
#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Make a loop-backed thin pool (sparse files under ROOT/pool) and its base device, for
    /// development and tests; after a reboot the store re-attaches it on open
    Create {
        /// Size of the data file (K, M, G, T suffixes: powers of 1024)
        #[arg(long, default_value = "8G", value_parser = parse_size)]
        data_size: u64,
        /// Size of the metadata file
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        meta_size: u64,
        /// Data block size: a multiple of 64K between 64K and 1G
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        block_size: u64,
        /// Low-water mark, in data blocks
        #[arg(long, default_value_t = 1024)]
        low_water_mark: u64,
        /// Size of the base device, and so of every snapshot
        #[arg(long, default_value = "10G", value_parser = parse_size)]
        base_size: u64,
        /// Filesystem of the base device: ext4 or xfs
        #[arg(long, default_value = "ext4")]
        fs: String,
    },
    /// Keep this store's snapshots in an existing thin pool (one you made and manage, e.g.
    /// with dmsetup or LVM): makes the store's base device in it
    Use {
        /// The pool's device-mapper name (`dmsetup ls --target thin-pool`)
        name: String,
        /// Size of the base device, and so of every snapshot
        #[arg(long, default_value = "10G", value_parser = parse_size)]
        base_size: u64,
        /// Filesystem of the base device: ext4 or xfs
        #[arg(long, default_value = "ext4")]
        fs: String,
        /// Thin id of the base device; snapshot N gets this + N. Choose a range the pool's
        /// other users leave alone
        #[arg(long, default_value_t = 1 << 23)]
        thin_id_offset: u64,
    },
    /// How full the pool is (data and metadata blocks) and its mode
    Status,
    /// Delete the store's thin devices and its pool (a pool strata made, with its files; a
    /// pool you named stays). Refuses while the store has snapshots, unless --force
    Destroy {
        /// Also when snapshots are left: their data is lost
        #[arg(long)]
        force: bool,
    },
}

/// Parses a size: bytes, or a number with a K, M, G or T suffix (powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown size suffix {c:?} (K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 8G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `pool create`.
fn pool(root: &Path, global: &Global, cmd: PoolCommand, out: &Output) -> Result<(), Failure> {
    if global.backend.as_deref().is_some_and(|b| b != "devmapper") {
        return Err(
            CliError("pool is for devmapper stores: pass --backend devmapper".into()).into(),
        );
    }
    #[cfg(feature = "devmapper")]
    {
        use strata_devmapper::DevmapperBackend;
        let dm_err = |what: &'static str| {
            move |e: strata_devmapper::DmapError| Error::backend("", what, "devmapper", e)
        };
        match cmd {
            PoolCommand::Create {
                data_size,
                meta_size,
                block_size,
                low_water_mark,
                base_size,
                fs,
            } => {
                std::fs::create_dir_all(root)
                    .map_err(|e| Error::io(root, "create the store root", e))?;
                let opts = strata_devmapper::PoolOptions {
                    data_size,
                    meta_size,
                    block_size,
                    low_water_mark,
                    base_size,
                    fs,
                };
                let cfg =
                    DevmapperBackend::create_pool(root, &opts).map_err(dm_err("pool create"))?;
                out.done(&format!(
                    "made thin pool {} ({} data, {} metadata) with a {} base device of {} bytes",
                    cfg.pool, cfg.data_size, cfg.meta_size, cfg.fs, cfg.base_size
                ));
            }
            PoolCommand::Use {
                name,
                base_size,
                fs,
                thin_id_offset,
            } => {
                std::fs::create_dir_all(root)
                    .map_err(|e| Error::io(root, "create the store root", e))?;
                let opts = strata_devmapper::UsePool {
                    base_size,
                    fs,
                    thin_offset: thin_id_offset,
                };
                let cfg =
                    DevmapperBackend::use_pool(root, &name, &opts).map_err(dm_err("pool use"))?;
                out.done(&format!(
                    "using thin pool {} with a {} base device of {} bytes at thin id {}",
                    cfg.pool, cfg.fs, cfg.base_size, cfg.thin_offset
                ));
            }
            PoolCommand::Status => {
                let status = DevmapperBackend::open(root)
                    .and_then(|b| b.status())
                    .map_err(dm_err("pool status"))?;
                out.show(&status, || {
                    format!(
                        "{}: {} of {} data blocks of {} bytes, {} of {} metadata blocks used, {}{}",
                        status.pool,
                        status.used_data_blocks,
                        status.total_data_blocks,
                        status.data_block_bytes,
                        status.used_meta_blocks,
                        status.total_meta_blocks,
                        status.mode,
                        if status.needs_check {
                            ", needs_check (repair its metadata: thin_check)"
                        } else {
                            ""
                        }
                    )
                });
            }
            PoolCommand::Destroy { force } => {
                if !force {
                    let store = open_store(root, global)?;
                    let n = snapshot_count(&store)?;
                    if n > 0 {
                        return Err(CliError(format!(
                            "the store at {} still has {n} snapshot(s): remove them, or pass \
                             --force to lose them with the pool",
                            root.display()
                        ))
                        .into());
                    }
                }
                DevmapperBackend::destroy_pool(root).map_err(dm_err("pool destroy"))?;
                out.done(&format!("destroyed the pool of {}", root.display()));
            }
        }
        Ok(())
    }
    #[cfg(not(feature = "devmapper"))]
    {
        let _ = (root, cmd, out);
        Err(CliError("this strata was built without the devmapper feature".into()).into())
    }
}

fn labels(pairs: Vec<(String, String)>) -> Labels {
    pairs.into_iter().collect()
}

/// A store over whichever backend the root uses.
pub(crate) type AnyStore = Box<dyn strata::AnyStore + Send + Sync>;

/// A failure of the command line itself (not of the store).
#[derive(Debug)]
pub(crate) struct CliError(pub String);

/// Anything a subcommand can fail with.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The store said no.
    Store(Error),
    /// The command line or the environment said no.
    Cli(CliError),
    /// The command printed its own verdict (fsck); exit 1 without another message in
    /// `--json` mode, with this line otherwise.
    Reported(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Store(e)
    }
}

impl From<CliError> for Failure {
    fn from(e: CliError) -> Self {
        Failure::Cli(e)
    }
}

/// How many snapshots the store has.
#[cfg(feature = "devmapper")]
fn snapshot_count(store: &AnyStore) -> Result<usize, Failure> {
    Ok(store.list(&[])?.len())
}

/// Opens the store at `root` with the backend `--backend` names, or the recorded one.
pub(crate) fn open_store(root: &Path, global: &Global) -> Result<AnyStore, Failure> {
    open_store_with(root, global, true)
}

/// [`open_store`], choosing whether opening repairs what dead processes left behind.
fn open_store_with(root: &Path, global: &Global, recover: bool) -> Result<AnyStore, Failure> {
    let opts = StoreOptions {
        lock_timeout: global.lock_timeout,
        durable: !global.no_sync,
        sync_remove: global.sync_remove,
        recover,
        // The overlay applier writes the upper directory itself; `mounted` forces a mount.
        apply_mounted: std::env::var("STRATA_APPLY").is_ok_and(|v| v == "mounted"),
    };
    Ok(strata_any::open(root, global.backend.as_deref(), opts)?)
}

/// Opens a layer file for reading, with a progress bar on a terminal.
fn open_with_progress(
    file: &Path,
    what: &str,
    out: &Output,
) -> Result<progress::Reading<std::io::BufReader<std::fs::File>>, Failure> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, "open the layer", e))?;
    let size = f.metadata().ok().map(|m| m.len());
    Ok(progress::Reading {
        inner: std::io::BufReader::new(f),
        bar: progress::bytes(what, size, out.is_json()),
    })
}

/// `diff` and `apply`.
fn layers(s: &dyn strata::AnyStore, cmd: &Command, out: &Output) -> Result<(), Failure> {
    match cmd {
        Command::Diff {
            name,
            compression,
            output,
        } => {
            let file = std::fs::File::create(output)
                .map_err(|e| Error::io(output, "create the layer file", e))?;
            let opts = strata::layer::diff::DiffOptions::from_env(*compression);
            let bar = progress::bytes(&format!("diff {name}"), None, out.is_json());
            let mut writing = progress::Writing {
                inner: std::io::BufWriter::new(file),
                bar: bar.clone(),
            };
            let (desc, stats) = s.diff(name, &opts, &mut writing)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            writing
                .inner
                .into_inner()
                .map_err(|e| Error::io(output, "write the layer file", e.into_error()))?
                .sync_all()
                .map_err(|e| Error::io(output, "sync the layer file", e))?;
            out.descriptor(&desc, stats.entries);
        }
        Command::ApplyLayer {
            file,
            parent,
            diff_id,
            digest,
            lease,
        } => {
            let parse = |d: &Option<String>| {
                d.as_deref()
                    .map(strata::layer::Digest::parse)
                    .transpose()
                    .map_err(CliError)
            };
            let (diff_id, digest) = (parse(diff_id)?, parse(digest)?);
            let mut reading = open_with_progress(file, "apply-layer", out)?;
            let bar = reading.bar.clone();
            let l = s.apply_layer_in(
                lease.as_deref(),
                parent.as_deref(),
                digest.as_ref(),
                diff_id.as_ref(),
                &mut reading,
            )?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            out.applied_layer(&l);
        }
        Command::Apply { key, file, digest } => {
            let expected = digest
                .as_deref()
                .map(strata::layer::Digest::parse)
                .transpose()
                .map_err(CliError)?;
            let mut reading = open_with_progress(file, &format!("apply {key}"), out)?;
            let bar = reading.bar.clone();
            let applied = s.apply(key, &mut reading, expected.as_ref())?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            out.applied(&applied);
        }
        _ => {}
    }
    Ok(())
}

/// Export and import.
fn images(s: &dyn strata::AnyStore, cmd: &Command, out: &Output) -> Result<(), Failure> {
    match cmd {
        Command::Export {
            images,
            output,
            verify,
            compression,
        } => {
            let names: Vec<&str> = images.iter().map(String::as_str).collect();
            let opts = strata::ExportOptions {
                compression: *compression,
                verify: *verify,
            };
            let report = s.export(&names, output, &opts)?;
            out.exported(&report, output);
        }
        Command::Import { source, ref_name } => {
            let report = s.import(source, ref_name.as_deref())?;
            out.imported(&report);
        }
        Command::Copy {
            args,
            exclude,
            parents,
            chown,
        } => {
            let split = |a: &str| -> Result<(String, String), CliError> {
                let at = a.find(":/").ok_or_else(|| {
                    CliError(format!("{a:?}: write NAME:/PATH (the path starts with /)"))
                })?;
                Ok((a[..at].to_string(), a[at + 1..].to_string()))
            };
            let (target, sources) = args
                .split_last()
                .ok_or_else(|| CliError("copy needs sources and a target".into()))?;
            let (key, dest) = split(target)?;
            let chown = chown
                .as_deref()
                .map(|c| {
                    let (u, g) = c.split_once(':').unwrap_or((c, c));
                    match (u.parse::<u32>(), g.parse::<u32>()) {
                        (Ok(u), Ok(g)) => Ok((u, g)),
                        _ => Err(CliError(format!("--chown {c:?}: write numeric UID:GID"))),
                    }
                })
                .transpose()?;
            let opts = strata::copy::CopyOptions {
                excludes: exclude.clone(),
                parents: *parents,
                chown,
            };
            // Sources are copied one FROM at a time, in the order given.
            let mut total = strata::copy::CopyStats::default();
            for src in sources {
                let (from, path) = split(src)?;
                let stats = s.copy(&from, &[path.as_str()], &key, &dest, &opts)?;
                total.files += stats.files;
                total.dirs += stats.dirs;
                total.symlinks += stats.symlinks;
                total.hardlinks += stats.hardlinks;
                total.bytes += stats.bytes;
                total.others += stats.others;
            }
            out.copied(&total, &key);
        }
        Command::Checksum {
            name,
            paths,
            exclude,
        } => {
            let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
            let sum = s.checksum(name, &paths, exclude)?;
            out.checksum(&sum, name);
        }
        _ => {}
    }
    Ok(())
}

/// The tracker's subcommands (images, leases, gc).
fn tracker(s: &dyn strata::AnyStore, cmd: &Command, out: &Output) -> Result<(), Failure> {
    match cmd {
        Command::Tag { image, snapshot } => {
            s.tag(image, snapshot)?;
            out.done(&format!("tagged {snapshot} as {image}"));
        }
        Command::Untag { image } => {
            s.untag(image)?;
            out.done(&format!("untagged {image}"));
        }
        Command::Images => out.images(&s.images()?),
        Command::Flattened => out.flattened(&s.flattened()?),
        Command::Lease { command } => match command {
            LeaseCommand::Create { name, expire } => {
                s.lease_create(name, *expire)?;
                out.done(&format!("created lease {name}"));
            }
            LeaseCommand::Add { name, keys } => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                s.lease_add(name, &keys)?;
                out.done(&format!("lease {name} holds {}", keys.join(" ")));
            }
            LeaseCommand::Ls => out.leases(&s.leases()?),
            LeaseCommand::Rm { name } => {
                s.lease_remove(name)?;
                out.done(&format!("removed lease {name}"));
            }
        },
        Command::Gc { dry_run } => {
            let report = s.gc(*dry_run)?;
            out.gc(&report, *dry_run);
            if let Some((what, e)) = report.failed.first() {
                return Err(CliError(format!(
                    "gc could not remove {} item(s), first {what}: {e}; the next gc retries",
                    report.failed.len()
                ))
                .into());
            }
        }
        _ => {}
    }
    Ok(())
}

fn run(cli: Cli, out: &Output) -> Result<(), Failure> {
    let root = cli
        .global
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    match cli.command {
        Command::Bench(args) => return bench::run(&cli.global, args, out),
        Command::Pool(cmd) => return pool(&root, &cli.global, cmd, out),
        Command::Umount { target } => {
            strata::mount::unmount(&target)?;
            out.done(&format!("unmounted {}", target.display()));
            return Ok(());
        }
        Command::Serve {
            address,
            grace,
            print_config,
            ..
        } => return serve(&root, &cli.global, &address, &grace, print_config),
        _ => {}
    }
    let recover = !matches!(cli.command, Command::Fsck { .. });
    let store = open_store_with(&root, &cli.global, recover)?;
    let s: &dyn strata::AnyStore = &*store;
    match cli.command {
        Command::Prepare {
            key,
            parent,
            labels: l,
            lease,
        } => out.mounts(&match lease {
            Some(lease) => s.prepare_in(&lease, &key, parent.as_deref(), labels(l))?,
            None => s.prepare(&key, parent.as_deref(), labels(l))?,
        }),
        Command::View {
            key,
            parent,
            labels: l,
        } => out.mounts(&s.view(&key, parent.as_deref(), labels(l))?),
        Command::Mounts { key } => out.mounts(&s.mounts(&key)?),
        Command::Commit {
            name,
            key,
            labels: l,
        } => {
            s.commit(&name, &key, labels(l))?;
            out.info(&s.stat(&name)?);
        }
        Command::Remove { key } => {
            s.remove(&key)?;
            out.done(&format!("removed {key}"));
        }
        Command::Stat { key } => {
            let info = s.stat(&key)?;
            let layer = match info.kind {
                strata::Kind::Committed => store.layer(&key)?,
                _ => None,
            };
            out.info_with_layer(&info, layer.as_ref());
        }
        Command::Ls { filters } => {
            let f: Vec<&str> = filters.iter().map(String::as_str).collect();
            out.list(&s.list(&f)?);
        }
        Command::Usage { key } => out.usage(&key, s.usage(&key)?),
        Command::Label { key, edits } => {
            let mut info = s.stat(&key)?;
            let mut paths = Vec::new();
            for (k, v) in &edits {
                match v {
                    Some(v) => info.labels.insert(k.clone(), v.clone()),
                    None => info.labels.remove(k),
                };
                paths.push(format!("labels.{k}"));
            }
            let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
            out.info(&s.update(&info, &paths)?);
        }
        Command::Mount { key, target } => {
            let mounts = s.mounts(&key)?;
            strata::mount::mount_all(&mounts, &target)?;
            out.done(&format!("mounted {key} on {}", target.display()));
        }
        Command::Cleanup => {
            let report = store.cleanup_report()?;
            out.cleanup(&report);
            if let Some((id, e)) = report.failed.first() {
                return Err(CliError(format!(
                    "could not reclaim {} snapshot(s), first id {id}: {e}; run cleanup again",
                    report.failed.len()
                ))
                .into());
            }
        }
        Command::Fsck { repair, verify } => {
            let mut report = store.fsck(repair)?;
            if verify {
                let v = store.verify(&[])?;
                report.broken.extend(v.damaged.iter().cloned());
                out.verified(&v);
            }
            out.fsck(&report, repair);
            let wrong = if repair {
                !report.failed.is_empty() || !report.broken.is_empty()
            } else {
                !report.is_clean()
            };
            s.close()?;
            if wrong {
                return Err(Failure::Reported(if repair {
                    "fsck: problems remain (broken snapshots can only be removed and recreated)"
                        .into()
                } else {
                    "fsck: the store has problems; `strata fsck --repair` fixes what it can".into()
                }));
            }
            return Ok(());
        }
        cmd @ (Command::Diff { .. } | Command::Apply { .. } | Command::ApplyLayer { .. }) => {
            layers(s, &cmd, out)?
        }
        cmd @ (Command::Export { .. }
        | Command::Import { .. }
        | Command::Copy { .. }
        | Command::Checksum { .. }) => images(s, &cmd, out)?,
        cmd @ (Command::Tag { .. }
        | Command::Untag { .. }
        | Command::Images
        | Command::Flattened
        | Command::Lease { .. }
        | Command::Gc { .. }) => tracker(s, &cmd, out)?,
        Command::Umount { .. } | Command::Bench(_) | Command::Pool(_) | Command::Serve { .. } => {}
    }
    s.close()?;
    Ok(())
}

/// `serve`: the store as a containerd proxy snapshotter.
fn serve(
    root: &Path,
    global: &Global,
    address: &Path,
    grace: &Duration,
    print_config: bool,
) -> Result<(), Failure> {
    #[cfg(feature = "containerd")]
    {
        let store: strata_grpc::SharedStore = std::sync::Arc::from(open_store(root, global)?);
        if print_config {
            print!(
                "{}",
                strata_grpc::proxy_plugin_config("strata", address, store.backend_name())
            );
            return Ok(());
        }
        let (address, grace) = (address.to_path_buf(), *grace);
        let opts = strata_grpc::ServeOptions { address, grace };
        strata_grpc::serve(store, &opts).map_err(|e| match e {
            strata_grpc::Error::Store(e) => Failure::Store(e),
            e => CliError(e.to_string()).into(),
        })
    }
    #[cfg(not(feature = "containerd"))]
    {
        let _ = (root, global, address, grace, print_config);
        Err(CliError("this strata was built without the containerd feature".into()).into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands log warnings only; the server logs what it serves. A bare level applies to
    // strata's own crates (the gRPC stack's debug output is a firehose); anything else is
    // taken as a full tracing filter.
    let level = match &cli.command {
        Command::Serve { log_level, .. } if log_level.chars().all(|c| c.is_ascii_alphabetic()) => {
            format!("warn,strata={log_level}")
        }
        Command::Serve { log_level, .. } => log_level.clone(),
        _ => "warn".to_string(),
    };
    let level = level.as_str();
    let filter = match tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG") {
        Ok(f) => f,
        Err(_) => match tracing_subscriber::EnvFilter::try_new(level) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("strata: --log-level {level:?}: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let out = Output::new(cli.global.json);
    match run(cli, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            out.error(&f);
            ExitCode::FAILURE
        }
    }
}
