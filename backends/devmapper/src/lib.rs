//! strata's device-mapper thin backend: one thin device per snapshot, in one thin pool.
//!
//! The pool is either one strata made on two loop-backed sparse files under the store root
//! ([`DevmapperBackend::create_pool`]) or one the user made and named; `devmapper.json` in the
//! root records which ([`pool::PoolConfig`]). Thin id 0 is the base device, formatted once
//! (ext4 by default, or xfs); snapshot `id`'s thin id is the store's id, which is never reused
//! — so a crash between a kernel operation and its metadata transaction can never leave two
//! snapshots claiming one thin id (containerd's issue #5646), and rolling back is deleting
//! that id.
//!
//! Prepare = `create_snap <id> <parent or 0>` (the origin suspended and resumed when it is
//! active), then the device is activated and its mount returned: `/dev/dm-<minor>` of type
//! ext4/xfs (xfs snapshots mount with `nouuid`: they share the base's UUID). Views are the
//! same, activated and mounted read-only. Commit flushes the device, records its mapped
//! blocks (so usage stays O(1) after deactivation) and deactivates it; committed devices are
//! only activated again, read-only, for a reader (a diff, an export, a checksum, a copy),
//! and deactivated when the last reader in any process is done (`devices/.reading-<id>`,
//! held with a shared flock by each reader). Remove discards the
//! whole device (a loop-backed pool gets the space back in its data file; a device left
//! active read-only is made writable for it first), deactivates it and deletes the thin id.
//!
//! All device-mapper work is ioctls through the `devicemapper` crate (no `dmsetup`); loop
//! devices are attached with `losetup` and filesystems made with `mkfs`, once per pool.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use devicemapper::{DevId, Device, DeviceInfo, DmFlags, DmOptions, DM};
use strata::{Backend, BackendError, CreateOptions, ErrorKind, Kind, Mount, Usage};

pub mod pool;
mod sys;

pub use pool::{PoolConfig, PoolOptions, PoolStatus};

/// Thin ids are 24 bits.
const THIN_IDS: u64 = 1 << 24;

/// The backend's errors. Each names the device, pool or path and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum DmapError {
    /// The kernel has no usable device-mapper.
    #[error(
        "device-mapper is not available ({reason}): load it with `modprobe dm-thin-pool` \
         (kernel options CONFIG_BLK_DEV_DM and CONFIG_DM_THIN_PROVISIONING), or use another \
         backend (overlay, btrfs, native)"
    )]
    Unavailable {
        /// What the probe found.
        reason: String,
    },
    /// A device-mapper call failed.
    #[error("{about}: {context}: {source}")]
    Dm {
        /// The device or pool concerned.
        about: String,
        /// What was being done.
        context: &'static str,
        /// What the crate said.
        #[source]
        source: devicemapper::DmError,
    },
    /// A file-system operation failed.
    #[error("{path}: {context}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A helper program failed.
    #[error("{path}: {command} failed: {output}")]
    Tool {
        /// The path it worked on.
        path: PathBuf,
        /// The command.
        command: String,
        /// What it printed on standard error.
        output: String,
    },
    /// `devmapper.json` is missing or unreadable.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The store has no pool yet.
    #[error(
        "{root} has no thin pool: make one with `strata --root {root} --backend devmapper pool \
         create --data-size SIZE --meta-size SIZE`",
        root = .root.display()
    )]
    NoPool {
        /// The store root.
        root: PathBuf,
    },
    /// The named pool does not exist.
    #[error("thin pool {pool:?} not found ({reason}): check `dmsetup ls --target thin-pool`")]
    PoolMissing {
        /// The pool's name.
        pool: String,
        /// What device-mapper said.
        reason: String,
    },
    /// The named device is not a thin pool.
    #[error("device-mapper device {pool:?} is a {target} device, not a thin pool")]
    NotAPool {
        /// The device's name.
        pool: String,
        /// Its target type.
        target: String,
    },
    /// The pool is out of data or metadata space.
    #[error("thin pool {pool:?} is out of space while trying to {context}: remove snapshots (strata gc) or grow the pool")]
    NoSpace {
        /// The pool's name.
        pool: String,
        /// What was being done.
        context: &'static str,
    },
    /// The kernel switched the pool to read-only: its metadata ran out of space or is
    /// damaged.
    #[error(
        "thin pool {pool:?} is read-only (mode {mode}) while trying to {context}: its metadata \
         ran out of space or is damaged, so the kernel refuses new snapshots and writes; \
         committed layers are intact on it. Take the pool down (strata pool destroy keeps a \
         pool you named), grow its metadata device, repair it (thin_check, thin_repair) and \
         set it up again"
    )]
    ReadOnly {
        /// The pool's name.
        pool: String,
        /// Its mode (`ro` or `fail`).
        mode: String,
        /// What was being done.
        context: &'static str,
    },
    /// A device to delete is still open.
    #[error(
        "device {device} is still open ({open} user(s)): unmount it (see `strata fsck`); \
         `strata cleanup` deletes it afterwards"
    )]
    Busy {
        /// The device's name.
        device: String,
        /// How many have it open.
        open: i32,
    },
    /// Committed snapshots have no mounts of their own.
    #[error("snapshot {id} is committed: mount a view of it instead")]
    Committed {
        /// The snapshot id.
        id: u64,
    },
    /// A view of no snapshot was asked for.
    #[error("a view needs at least one committed snapshot")]
    EmptyChain,
    /// The id does not fit a thin id (24 bits).
    #[error(
        "snapshot id {id} does not fit a thin device id: thin ids start at {offset} in this \
         pool and end at 16777215"
    )]
    IdTooLarge {
        /// The id.
        id: u64,
        /// The pool's first thin id for this store.
        offset: u64,
    },
    /// A thin id strata wanted is already used in a shared pool.
    #[error(
        "thin id {thin} is already used in pool {pool:?}: give this store other ids with \
         `pool use {pool} --thin-id-offset N`"
    )]
    ThinIdInUse {
        /// The pool's name.
        pool: String,
        /// The thin id.
        thin: u64,
    },
}

impl DmapError {
    pub(crate) fn dm(about: &str, context: &'static str, source: devicemapper::DmError) -> Self {
        DmapError::Dm {
            about: about.to_string(),
            context,
            source,
        }
    }

    pub(crate) fn io(path: &Path, context: &'static str, source: io::Error) -> Self {
        DmapError::Io {
            path: path.to_path_buf(),
            context,
            source,
        }
    }
}

impl BackendError for DmapError {
    fn kind(&self) -> ErrorKind {
        match self {
            DmapError::Unavailable { .. }
            | DmapError::NoPool { .. }
            | DmapError::PoolMissing { .. }
            | DmapError::NotAPool { .. }
            | DmapError::Committed { .. }
            | DmapError::ThinIdInUse { .. }
            | DmapError::NoSpace { .. }
            | DmapError::ReadOnly { .. } => ErrorKind::FailedPrecondition,
            DmapError::EmptyChain | DmapError::IdTooLarge { .. } => ErrorKind::InvalidArgument,
            DmapError::Busy { .. } => ErrorKind::Busy,
            _ => ErrorKind::Internal,
        }
    }
}

/// Opens device-mapper and checks that the thin targets are there.
pub fn probe() -> Result<DM, DmapError> {
    let dm = DM::new().map_err(|e| DmapError::Unavailable {
        reason: format!("opening /dev/mapper/control: {e}"),
    })?;
    let targets = dm.list_versions().map_err(|e| DmapError::Unavailable {
        reason: format!("listing its targets: {e}"),
    })?;
    let has = |t: &str| targets.iter().any(|(name, ..)| name == t);
    if !has("thin-pool") || !has("thin") {
        return Err(DmapError::Unavailable {
            reason: "the thin-pool target is not loaded".into(),
        });
    }
    Ok(dm)
}

/// How to use a pool the user made (`strata --backend devmapper pool use NAME`).
#[derive(Debug, Clone)]
pub struct UsePool {
    /// Bytes of the base device.
    pub base_size: u64,
    /// `ext4` or `xfs`.
    pub fs: String,
    /// The base device's thin id; snapshots take the ids above it.
    pub thin_offset: u64,
}

impl Default for UsePool {
    fn default() -> UsePool {
        UsePool {
            base_size: 10 << 30,
            fs: "ext4".into(),
            // The upper half of the 24-bit id space: tools that number thin devices from 0 or
            // 1 (containerd's devmapper snapshotter does) stay below it.
            thin_offset: 1 << 23,
        }
    }
}

fn check_fs(root: &Path, fs: &str) -> Result<(), DmapError> {
    if fs == "ext4" || fs == "xfs" {
        return Ok(());
    }
    Err(DmapError::Config {
        path: root.join(pool::CONFIG),
        reason: format!("filesystem {fs:?}: ext4 or xfs"),
    })
}

/// A short tag of the store root's canonical path: device names of different stores differ.
fn tag(root: &Path) -> Result<String, DmapError> {
    use std::hash::{Hash, Hasher};
    let canonical =
        fs::canonicalize(root).map_err(|e| DmapError::io(root, "resolve the store root", e))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    canonical.hash(&mut h);
    Ok(format!("{:08x}", h.finish() as u32))
}

/// Deletes the store's pool configuration and device records.
fn forget(root: &Path) -> Result<(), DmapError> {
    let devices = root.join("devices");
    match fs::remove_dir_all(&devices) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(DmapError::io(&devices, "delete the device records", e)),
    }
    let config = root.join(pool::CONFIG);
    fs::remove_file(&config).map_err(|e| DmapError::io(&config, "delete the pool configuration", e))
}

/// The device-mapper thin backend.
pub struct DevmapperBackend {
    dm: DM,
    root: PathBuf,
    cfg: PoolConfig,
    pool_dev: Device,
    /// `root/devices`: a file per thin id strata created, named by the id.
    devices: PathBuf,
    /// Serialises device activation among the store's threads and processes.
    lock: DeviceLock,
    /// This process's readers of committed layers' devices ([`Backend::view_mounts`] until
    /// [`Backend::release_view`]): per snapshot id, `devices/.reading-<id>` held open with a
    /// shared flock (which other processes see) and how many readers here use it.
    readers: Mutex<HashMap<u64, (fs::File, usize)>>,
}

/// The lock every change of a thin device's activation (and every look at it that activates
/// it for a moment) holds: `root/devmapper.lock`, flocked, behind a mutex for the threads of
/// one process (a flock is held by an open file, which the threads share).
///
/// Without it, two users activating one device raced: the second one's create failed
/// because the name was taken, it then removed the first one's half-made device, and the
/// existence check of an export guard answered "missing" for a healthy layer; a device
/// another process was still activating looked "left without a table" and was removed.
#[derive(Debug)]
struct DeviceLock {
    path: PathBuf,
    file: Mutex<Option<fs::File>>,
}

/// A held [`DeviceLock`]; released on drop.
struct DeviceLockGuard<'a> {
    file: MutexGuard<'a, Option<fs::File>>,
}

impl Drop for DeviceLockGuard<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.file.as_ref() {
            // Released before the mutex is (fields drop after this body).
            let _ = rustix::fs::flock(f, rustix::fs::FlockOperation::Unlock);
        }
    }
}

impl DeviceLock {
    fn new(root: &Path) -> DeviceLock {
        DeviceLock {
            path: root.join("devmapper.lock"),
            file: Mutex::new(None),
        }
    }

    /// Waits for the lock. Not re-entrant: callers hold it at the [`Backend`] entry points
    /// only.
    fn hold(&self) -> Result<DeviceLockGuard<'_>, DmapError> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.is_none() {
            *file = Some(open_lock_file(&self.path, "open the device lock")?);
        }
        if let Some(f) = file.as_ref() {
            rustix::fs::flock(f, rustix::fs::FlockOperation::LockExclusive)
                .map_err(|e| DmapError::io(&self.path, "lock the devices", e.into()))?;
        }
        Ok(DeviceLockGuard { file })
    }
}

/// Opens (creating it when missing) the file a lock of the backend is held on.
fn open_lock_file(path: &Path, context: &'static str) -> Result<fs::File, DmapError> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| DmapError::io(path, context, e))
}

impl std::fmt::Debug for DevmapperBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevmapperBackend")
            .field("root", &self.root)
            .field("pool", &self.cfg.pool)
            .finish_non_exhaustive()
    }
}

impl DevmapperBackend {
    /// Makes a loop-backed pool for the store at `root` (sparse files under `root/pool`) and
    /// its base device, and records them in `root/devmapper.json`.
    pub fn create_pool(root: &Path, opts: &PoolOptions) -> Result<PoolConfig, DmapError> {
        let dm = probe()?;
        if PoolConfig::load(root)?.is_some() {
            return Err(DmapError::Config {
                path: root.join(pool::CONFIG),
                reason: "this store already has a pool".into(),
            });
        }
        if !opts.block_size.is_multiple_of(64 << 10)
            || !((64 << 10)..=(1 << 30)).contains(&opts.block_size)
        {
            return Err(DmapError::Config {
                path: root.join(pool::CONFIG),
                reason: format!(
                    "block size {} is not a multiple of 64 KiB between 64 KiB and 1 GiB",
                    opts.block_size
                ),
            });
        }
        check_fs(root, &opts.fs)?;
        let dir = root.join("pool");
        fs::create_dir_all(&dir)
            .map_err(|e| DmapError::io(&dir, "create the pool directory", e))?;
        let files = pool::LoopFiles {
            data: PathBuf::from("pool/data"),
            meta: PathBuf::from("pool/meta"),
        };
        for (rel, size) in [(&files.data, opts.data_size), (&files.meta, opts.meta_size)] {
            let path = root.join(rel);
            // A new sparse file: all zeros, which is what fresh pool metadata must start as.
            let f = fs::File::create(&path)
                .map_err(|e| DmapError::io(&path, "create the pool file", e))?;
            f.set_len(size)
                .map_err(|e| DmapError::io(&path, "size the pool file", e))?;
        }
        let tag = tag(root)?;
        let cfg = PoolConfig {
            pool: format!("strata-{tag}-pool"),
            prefix: format!("strata-{tag}"),
            loop_files: Some(files),
            data_size: opts.data_size,
            meta_size: opts.meta_size,
            block_sectors: opts.block_size / 512,
            low_water_mark: opts.low_water_mark,
            base_size: opts.base_size,
            fs: opts.fs.clone(),
            thin_offset: 0,
        };
        let pool_dev = pool::activate(&dm, root, &cfg, true)?;
        Self::init(dm, root, cfg, pool_dev)
    }

    /// Makes the store at `root` keep its snapshots in `pool`, an existing thin pool the user
    /// made (and keeps): creates and formats the base device at thin id `opts.thin_offset`,
    /// and records the pool in `root/devmapper.json`. Snapshot `id` gets thin id
    /// `thin_offset + id`, so the pool's other users must leave that range alone.
    pub fn use_pool(root: &Path, pool: &str, opts: &UsePool) -> Result<PoolConfig, DmapError> {
        let dm = probe()?;
        if PoolConfig::load(root)?.is_some() {
            return Err(DmapError::Config {
                path: root.join(pool::CONFIG),
                reason: "this store already has a pool".into(),
            });
        }
        check_fs(root, &opts.fs)?;
        if opts.thin_offset >= THIN_IDS - 1 {
            return Err(DmapError::IdTooLarge {
                id: 1,
                offset: opts.thin_offset,
            });
        }
        let tag = tag(root)?;
        let mut cfg = PoolConfig {
            pool: pool.to_string(),
            prefix: format!("strata-{tag}"),
            loop_files: None,
            data_size: 0,
            meta_size: 0,
            block_sectors: 0,
            low_water_mark: 0,
            base_size: opts.base_size,
            fs: opts.fs.clone(),
            thin_offset: opts.thin_offset,
        };
        let pool_dev = pool::activate(&dm, root, &cfg, false)?;
        if let Some(p) = pool::params(&dm, &cfg.pool)? {
            (cfg.data_size, cfg.block_sectors, cfg.low_water_mark) = p;
        }
        Self::init(dm, root, cfg, pool_dev)
    }

    /// Makes the base device of a new store's pool and records the pool in `devmapper.json`.
    fn init(
        dm: DM,
        root: &Path,
        cfg: PoolConfig,
        pool_dev: Device,
    ) -> Result<PoolConfig, DmapError> {
        let devices = root.join("devices");
        let backend = DevmapperBackend {
            dm,
            root: root.to_path_buf(),
            lock: DeviceLock::new(root),
            readers: Mutex::default(),
            devices,
            cfg,
            pool_dev,
        };
        backend.make_base()?;
        backend.cfg.save(root)?;
        Ok(backend.cfg)
    }

    /// Opens the backend of the store at `root`: re-attaches a loop-backed pool after a reboot
    /// and checks a named one.
    pub fn open(root: &Path) -> Result<DevmapperBackend, DmapError> {
        let cfg = PoolConfig::load(root)?.ok_or_else(|| DmapError::NoPool {
            root: root.to_path_buf(),
        })?;
        let dm = probe()?;
        let pool_dev = pool::activate(&dm, root, &cfg, false)?;
        let devices = root.join("devices");
        fs::create_dir_all(&devices)
            .map_err(|e| DmapError::io(&devices, "create the devices directory", e))?;
        Ok(DevmapperBackend {
            dm,
            root: root.to_path_buf(),
            cfg,
            pool_dev,
            lock: DeviceLock::new(root),
            readers: Mutex::default(),
            devices,
        })
    }

    /// Takes down the store's pool: for a loop-backed pool strata made, every thin device of
    /// the store, the pool, its linear devices and loop devices, then the pool files; for a
    /// pool the user named, the store's thin devices (deactivated and deleted from the pool,
    /// which stays). Then deletes `devmapper.json` and the device records. Snapshot data is
    /// gone afterwards; for tests and `pool destroy`.
    pub fn destroy_pool(root: &Path) -> Result<(), DmapError> {
        let cfg = PoolConfig::load(root)?.ok_or_else(|| DmapError::NoPool {
            root: root.to_path_buf(),
        })?;
        let Some(files) = cfg.loop_files.clone() else {
            // Every device deactivated and deleted: the pool frees their blocks (no discard:
            // the pool is the user's, and activating each device to discard it cost seconds
            // per hundred under emulation). Thin snapshots do not depend on their origins.
            let backend = DevmapperBackend::open(root)?;
            let mut thins = vec![cfg.thin_offset];
            for id in backend.ids()? {
                thins.push(backend.thin(id)?);
            }
            for thin in thins {
                backend.deactivate(thin)?;
                if let Err(e) = backend.message(&format!("delete {thin}"), "delete a device") {
                    if backend.thin_exists(thin) {
                        return Err(e);
                    }
                }
            }
            return forget(root);
        };
        let dm = probe()?;
        let devices = dm
            .list_devices()
            .map_err(|e| DmapError::dm(&cfg.pool, "list devices", e))?;
        let thin_prefix = format!("{}-", cfg.prefix);
        let mut names: Vec<String> = devices
            .iter()
            .map(|(n, ..)| n.to_string())
            .filter(|n| {
                n.strip_prefix(&thin_prefix)
                    .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        names.push(cfg.pool.clone());
        names.push(format!("{}-data", cfg.pool));
        names.push(format!("{}-meta", cfg.pool));
        for name in names {
            let present = devices.iter().any(|(n, ..)| n.to_string() == name);
            if !present {
                continue;
            }
            dm.device_remove(&DevId::Name(pool::dm_name(&name)?), DmOptions::default())
                .map_err(|e| DmapError::dm(&name, "remove the device", e))?;
        }
        for rel in [&files.data, &files.meta] {
            let file = root.join(rel);
            pool::detach_loops(&file)?;
            match fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(DmapError::io(&file, "delete the pool file", e)),
            }
        }
        forget(root)
    }

    /// The recorded pool configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The thin id of snapshot `id`: the pool's offset for this store plus the id.
    fn thin(&self, id: u64) -> Result<u64, DmapError> {
        let offset = self.cfg.thin_offset;
        match offset.checked_add(id) {
            Some(t) if t < THIN_IDS => Ok(t),
            _ => Err(DmapError::IdTooLarge { id, offset }),
        }
    }

    fn name(&self, thin: u64) -> String {
        format!("{}-{thin}", self.cfg.prefix)
    }

    fn message(&self, msg: &str, context: &'static str) -> Result<(), DmapError> {
        let pool = pool::dm_name(&self.cfg.pool)?;
        self.dm
            .target_msg(&DevId::Name(pool), None, msg)
            .map(|_| ())
            .map_err(|e| self.space_or(e, context))
    }

    /// A device-mapper error, or what the pool says when it is out of space or read-only.
    fn space_or(&self, e: devicemapper::DmError, context: &'static str) -> DmapError {
        self.refusal(context)
            .unwrap_or_else(|| DmapError::dm(&self.cfg.pool, context, e))
    }

    /// [`DmapError::ReadOnly`] when the kernel switched the pool to read-only,
    /// [`DmapError::NoSpace`] when it is out of data space, else nothing.
    fn refusal(&self, context: &'static str) -> Option<DmapError> {
        let st = self.status().ok()?;
        if st.read_only() {
            Some(DmapError::ReadOnly {
                pool: self.cfg.pool.clone(),
                mode: st.mode,
                context,
            })
        } else if st.full() {
            Some(DmapError::NoSpace {
                pool: self.cfg.pool.clone(),
                context,
            })
        } else {
            None
        }
    }

    /// How full the pool is.
    pub fn status(&self) -> Result<PoolStatus, DmapError> {
        pool::status(&self.dm, &self.cfg.pool, self.cfg.block_sectors * 512)
    }

    /// The device node of active thin device `thin`, if it is active.
    fn node(&self, thin: u64) -> Result<Option<PathBuf>, DmapError> {
        Ok(self
            .info(thin)?
            .map(|info| PathBuf::from(format!("/dev/dm-{}", info.device().minor))))
    }

    /// What device-mapper says of thin device `thin`; `None` when there is no such device.
    fn info(&self, thin: u64) -> Result<Option<DeviceInfo>, DmapError> {
        let name = self.name(thin);
        Ok(self
            .dm
            .device_info(&DevId::Name(pool::dm_name(&name)?))
            .ok())
    }

    /// Activates thin device `thin` (read-only when asked) and returns its device node.
    ///
    /// The store's devices are private (`DmOptions::private`): udev still names them under
    /// /dev/mapper and answers the ioctl's cookie, but runs no disk rules on them — no blkid
    /// probe that holds a device open while the store removes it, and no /dev/disk/by-uuid
    /// link fought over by snapshots that all carry their base's file-system UUID.
    fn activate(&self, thin: u64, readonly: bool) -> Result<PathBuf, DmapError> {
        if let Some(node) = self.node(thin)? {
            if self.set_right(thin)? {
                return Ok(node);
            }
        }
        let name = self.name(thin);
        let dm_name = pool::dm_name(&name)?;
        let id = DevId::Name(dm_name);
        self.dm
            .device_create(dm_name, None, DmOptions::private())
            .map_err(|e| DmapError::dm(&name, "create the device", e))?;
        let table = [(
            0u64,
            self.cfg.base_sectors().0,
            "thin".to_string(),
            format!("{} {}", self.pool_dev, thin),
        )];
        let flags = if readonly {
            DmFlags::DM_READONLY
        } else {
            DmFlags::empty()
        };
        let loaded = self
            .dm
            .table_load(&id, &table, DmOptions::private().set_flags(flags))
            .and_then(|_| self.dm.device_suspend(&id, DmOptions::private()));
        if let Err(e) = loaded {
            let _ = self.dm.device_remove(&id, DmOptions::private());
            return Err(DmapError::dm(&name, "activate the device", e));
        }
        self.node(thin)?.ok_or_else(|| DmapError::Io {
            path: PathBuf::from(&name),
            context: "find the activated device",
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    }

    /// Deactivates thin device `thin` if it is active. A device still open (mounted) is
    /// removed by the kernel when its last user closes it (deferred removal).
    fn deactivate(&self, thin: u64) -> Result<(), DmapError> {
        let name = self.name(thin);
        let dm_name = pool::dm_name(&name)?;
        if self.node(thin)?.is_none() {
            return Ok(());
        }
        self.dm
            .device_remove(
                &DevId::Name(dm_name),
                DmOptions::private().set_flags(DmFlags::DM_DEFERRED_REMOVE),
            )
            .map(|_| ())
            .map_err(|e| DmapError::dm(&name, "deactivate the device", e))
    }

    /// How many users have thin device `thin` open (a mount is one); 0 when inactive.
    fn open_count(&self, thin: u64) -> Result<i32, DmapError> {
        Ok(self.info(thin)?.map_or(0, |info| info.open_count()))
    }

    /// Whether thin device `thin` is active and read-only.
    fn read_only(&self, thin: u64) -> Result<bool, DmapError> {
        Ok(self
            .info(thin)?
            .is_some_and(|info| info.flags().contains(DmFlags::DM_READONLY)))
    }

    /// Makes active thin device `thin` usable again after a process died half way through
    /// using it; says whether it is there afterwards. Resumes it if it is suspended: left so
    /// by a process killed between suspending it as an origin and resuming it
    /// ([`Self::snapshot`]); a suspended device holds every I/O, and device-mapper froze its
    /// block device, which refuses mounts (EBUSY). Resuming a device another process suspended
    /// a moment ago for its own snapshot is harmless: origins are committed layers, nothing
    /// writes to them. Removes it if it has no table: left by a process killed between
    /// creating the device and loading its table ([`Self::activate`] makes it again).
    fn set_right(&self, thin: u64) -> Result<bool, DmapError> {
        let name = self.name(thin);
        let id = DevId::Name(pool::dm_name(&name)?);
        let Ok(info) = self.dm.device_info(&id) else {
            return Ok(false);
        };
        if !info.flags().contains(DmFlags::DM_ACTIVE_PRESENT) {
            self.dm
                .device_remove(&id, DmOptions::private())
                .map_err(|e| DmapError::dm(&name, "remove the device left without a table", e))?;
            return Ok(false);
        }
        if info.flags().contains(DmFlags::DM_SUSPEND) {
            self.dm
                .device_suspend(&id, DmOptions::private())
                .map_err(|e| DmapError::dm(&name, "resume the device left suspended", e))?;
        }
        Ok(true)
    }

    /// `create_snap new origin`, suspending the origin around it when it is active.
    fn snapshot(&self, new: u64, origin: u64) -> Result<(), DmapError> {
        let origin_name = self.name(origin);
        let active = self.node(origin)?.is_some() && self.set_right(origin)?;
        let dm_name = pool::dm_name(&origin_name)?;
        let id = DevId::Name(dm_name);
        if active {
            // Without freezing its file system: an origin is a committed layer, only ever
            // active read-only (for a reader), so nothing of it is dirty, and a frozen block
            // device refuses every mount meanwhile (EBUSY, "blockdev is frozen"), which a
            // reader mounting the layer at that moment hit (the concurrency campaign). With
            // the file system left alone, such a mount's reads just wait for the resume.
            self.dm
                .device_suspend(
                    &id,
                    DmOptions::private().set_flags(DmFlags::DM_SUSPEND | DmFlags::DM_SKIP_LOCKFS),
                )
                .map_err(|e| DmapError::dm(&origin_name, "suspend the origin", e))?;
        }
        let made = self.message(&format!("create_snap {new} {origin}"), "create a snapshot");
        if active {
            self.dm
                .device_suspend(&id, DmOptions::private())
                .map_err(|e| DmapError::dm(&origin_name, "resume the origin", e))?;
        }
        made
    }

    /// Creates, formats and deactivates the base device (thin id 0).
    fn make_base(&self) -> Result<(), DmapError> {
        let base = self.cfg.thin_offset;
        if let Err(e) = self.message(&format!("create_thin {base}"), "create the base device") {
            return Err(if self.thin_exists(base) {
                DmapError::ThinIdInUse {
                    pool: self.cfg.pool.clone(),
                    thin: base,
                }
            } else {
                e
            });
        }
        let node = self.activate(base, false)?;
        let mut cmd = std::process::Command::new(format!("mkfs.{}", self.cfg.fs));
        if self.cfg.fs == "ext4" {
            // Initialise everything now: lazy initialisation would keep writing into every
            // snapshot's first mount.
            cmd.args([
                "-q",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            ]);
        } else {
            cmd.args(["-q", "-K"]);
        }
        cmd.arg(&node);
        let made = pool::run(&mut cmd, &node)
            .map(|_| ())
            .and_then(|()| self.empty_root(&node));
        let flushed = self.flush(&node);
        self.deactivate(base)?;
        made?;
        flushed
    }

    /// Removes `lost+found` from the new filesystem on `node`: a layer holds what was put in
    /// it, and an empty image must diff to an empty layer (fsck recreates it when needed).
    fn empty_root(&self, node: &Path) -> Result<(), DmapError> {
        if self.cfg.fs != "ext4" {
            return Ok(());
        }
        let at = self.root.join(".base-mount");
        fs::create_dir_all(&at).map_err(|e| DmapError::io(&at, "create a mount point", e))?;
        rustix::mount::mount(
            node,
            &at,
            &self.cfg.fs,
            rustix::mount::MountFlags::empty(),
            None,
        )
        .map_err(|e| DmapError::io(node, "mount the base device", e.into()))?;
        let removed = fs::remove_dir(at.join("lost+found"));
        let unmounted = rustix::mount::unmount(&at, rustix::mount::UnmountFlags::empty());
        let _ = fs::remove_dir(&at);
        removed.map_err(|e| DmapError::io(&at, "remove lost+found from the base device", e))?;
        unmounted.map_err(|e| DmapError::io(&at, "unmount the base device", e.into()))
    }

    /// Flushes device `node` to the pool (and the pool's metadata to its device).
    fn flush(&self, node: &Path) -> Result<(), DmapError> {
        fs::File::open(node)
            .and_then(|f| f.sync_all())
            .map_err(|e| {
                self.refusal("flush the device")
                    .unwrap_or_else(|| DmapError::io(node, "flush the device", e))
            })
    }

    /// Mapped bytes of thin device `thin`, which must be active.
    fn mapped(&self, thin: u64) -> Result<u64, DmapError> {
        let name = self.name(thin);
        let (_, status) = self
            .dm
            .table_status(&DevId::Name(pool::dm_name(&name)?), DmOptions::default())
            .map_err(|e| DmapError::dm(&name, "read the device's status", e))?;
        // "<nr mapped sectors> <highest mapped sector>", or "Fail".
        let sectors = status
            .first()
            .and_then(|l| l.3.split_whitespace().next())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        Ok(sectors * 512)
    }

    fn marker(&self, id: u64) -> PathBuf {
        self.devices.join(id.to_string())
    }

    /// The file readers of snapshot `id`'s device hold shared (see `readers`).
    fn reading(&self, id: u64) -> PathBuf {
        self.devices.join(format!(".reading-{id}"))
    }

    /// Counts a reader of snapshot `id`'s device in this process, taking the shared lock of
    /// its readers' file for the first one. Callers hold the device lock.
    fn add_reader(&self, id: u64) -> Result<(), DmapError> {
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, n)) = readers.get_mut(&id) {
            *n += 1;
            return Ok(());
        }
        let path = self.reading(id);
        let file = open_lock_file(&path, "open the readers' lock")?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared)
            .map_err(|e| DmapError::io(&path, "lock the readers' lock", e.into()))?;
        readers.insert(id, (file, 1));
        Ok(())
    }

    /// Uncounts a reader of snapshot `id`'s device in this process; says whether it was the
    /// last one here (its shared lock is then let go).
    fn drop_reader(&self, id: u64) -> bool {
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        match readers.get_mut(&id) {
            Some((_, n)) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                readers.remove(&id);
                true
            }
            None => true,
        }
    }

    /// Notes that snapshot `id`'s thin id belongs to someone else (see `create`).
    fn foreign_note(&self, id: u64) -> PathBuf {
        self.devices.join(format!(".foreign-{id}"))
    }

    fn mount_of(&self, node: &Path, readonly: bool) -> Mount {
        let mut options = vec![if readonly { "ro" } else { "rw" }.to_string()];
        if self.cfg.fs == "xfs" {
            options.push("nouuid".into());
            if readonly {
                // Never replay a log on a read-only mount of a layer.
                options.push("norecovery".into());
            }
        } else if readonly {
            // Never replay a journal on a read-only mount of a layer.
            options.push("noload".into());
        }
        Mount {
            fs_type: self.cfg.fs.clone(),
            source: node.to_string_lossy().into_owned(),
            options,
        }
    }
}

impl Backend for DevmapperBackend {
    type Error = DmapError;

    fn name(&self) -> &'static str {
        "devmapper"
    }

    fn create(
        &self,
        id: u64,
        kind: Kind,
        parents: &[u64],
        _opts: &CreateOptions,
    ) -> Result<(), DmapError> {
        let thin = self.thin(id)?;
        let _held = self.lock.hold()?;
        let origin = match parents.first() {
            Some(&p) => self.thin(p)?,
            None => self.cfg.thin_offset,
        };
        // The marker first: it says strata claims the id, so whatever a crash leaves behind
        // is listed by `ids()` and reclaimed (dm-thin commits its metadata after every
        // message: the new thin id is on disk as soon as the message returns).
        let marker = self.marker(id);
        fs::write(&marker, b"").map_err(|e| DmapError::io(&marker, "record the device", e))?;
        if let Err(e) = self.snapshot(thin, origin) {
            if self.thin_exists(thin) {
                // The id was taken before this create: another user of a shared pool.
                // Not ours to delete, which the note tells the store's rollback (remove).
                let note = self.foreign_note(id);
                fs::write(&note, b"").map_err(|e| DmapError::io(&note, "note a foreign id", e))?;
                let _ = fs::remove_file(&marker);
                return Err(DmapError::ThinIdInUse {
                    pool: self.cfg.pool.clone(),
                    thin,
                });
            }
            let _ = fs::remove_file(&marker);
            return Err(e);
        }
        let result = self.activate(thin, kind == Kind::View).map(|_| ());
        if result.is_err() {
            // No half-made device stays behind.
            if let Err(e) = self.remove_device(id) {
                tracing::warn!(id, error = %e, "could not remove the device of a failed create");
            }
        }
        result
    }

    fn commit(&self, id: u64, _parents: &[u64], _durable: bool) -> Result<Usage, DmapError> {
        let thin = self.thin(id)?;
        let _held = self.lock.hold()?;
        let node = self.activate(thin, false)?;
        // A filesystem still mounted (containerd commits so) may hold dirty pages the device
        // has not seen: only a sync of every filesystem reaches them. Then the device's flush
        // reaches the pool's metadata (dm-thin commits it on a flush): the layer is durable.
        if self.open_count(thin)? > 0 {
            rustix::fs::sync();
        }
        self.flush(&node)?;
        // A pool out of data space failed some of the snapshot's writes (error_if_no_space),
        // a read-only one all of them since it switched: its filesystem may have lost data,
        // so it is not made a layer.
        if let Some(e) = self.refusal("commit the snapshot (some of its writes may have failed)") {
            return Err(e);
        }
        let size = self.mapped(thin)?;
        self.deactivate(thin)?;
        Ok(Usage { size, inodes: 0 })
    }

    fn mounts(&self, id: u64, kind: Kind, _parents: &[u64]) -> Result<Vec<Mount>, DmapError> {
        if kind == Kind::Committed {
            return Err(DmapError::Committed { id });
        }
        let thin = self.thin(id)?;
        let _held = self.lock.hold()?;
        let node = self.activate(thin, kind == Kind::View)?;
        Ok(vec![self.mount_of(&node, kind == Kind::View)])
    }

    /// Activates the top layer's device read-only, as a reader of it until
    /// [`Backend::release_view`].
    fn view_mounts(&self, chain: &[u64]) -> Result<Vec<Mount>, DmapError> {
        let top = *chain.first().ok_or(DmapError::EmptyChain)?;
        let thin = self.thin(top)?;
        let _held = self.lock.hold()?;
        self.add_reader(top)?;
        match self.activate(thin, true) {
            Ok(node) => Ok(vec![self.mount_of(&node, true)]),
            Err(e) => {
                self.drop_reader(top);
                Err(e)
            }
        }
    }

    /// Deactivates the top layer's device when its last reader, in any process, is done
    /// and nothing else has it open: a diff or an export of an image no longer leaves a
    /// device active per layer it read. A reader that was killed leaves it active, read-only,
    /// until the layer is removed.
    fn release_view(&self, chain: &[u64]) -> Result<(), DmapError> {
        let top = *chain.first().ok_or(DmapError::EmptyChain)?;
        let thin = self.thin(top)?;
        let _held = self.lock.hold()?;
        if !self.drop_reader(top) {
            return Ok(());
        }
        let path = self.reading(top);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(DmapError::io(&path, "open the readers' lock", e)),
        };
        // Readers elsewhere hold it shared (and take it only under the device lock, held
        // here): exclusive means nobody reads the device.
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(()),
            Err(e) => return Err(DmapError::io(&path, "lock the readers' lock", e.into())),
        }
        // Read-only and unopened: a committed layer's device nobody uses (an Active's or a
        // View's own device is never read-only-and-idle by a reader's doing).
        if self.read_only(thin)? && self.open_count(thin)? == 0 {
            self.deactivate(thin)?;
        }
        fs::remove_file(&path).map_err(|e| DmapError::io(&path, "remove the readers' lock", e))
    }

    fn remove(&self, id: u64) -> Result<(), DmapError> {
        let thin = self.thin(id)?;
        // A device still open (a mount, a reader) is neither discarded under its user's feet
        // nor left to a deferred removal the pool would refuse to delete the id after: wait
        // a little for its last user (without the device lock, which others need meanwhile).
        let mut waited = 0;
        while self.open_count(thin)? > 0 && waited < 50 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            waited += 1;
        }
        let _held = self.lock.hold()?;
        self.remove_device(id)
    }

    fn usage(&self, id: u64) -> Result<Usage, DmapError> {
        let thin = self.thin(id)?;
        let _held = self.lock.hold()?;
        let was_active = self.node(thin)?.is_some();
        self.activate(thin, true)?;
        let size = self.mapped(thin);
        if !was_active {
            self.deactivate(thin)?;
        }
        Ok(Usage {
            size: size?,
            inodes: 0,
        })
    }

    fn ids(&self) -> Result<Vec<u64>, DmapError> {
        let mut ids = Vec::new();
        let entries = fs::read_dir(&self.devices)
            .map_err(|e| DmapError::io(&self.devices, "list devices", e))?;
        for e in entries {
            let e = e.map_err(|e| DmapError::io(&self.devices, "list devices", e))?;
            if let Some(id) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn exists(&self, id: u64) -> Result<bool, DmapError> {
        if !self.marker(id).exists() {
            return Ok(false);
        }
        let thin = self.thin(id)?;
        let _held = self.lock.hold()?;
        Ok(self.thin_exists(thin))
    }
}

impl DevmapperBackend {
    /// [`Backend::remove`] with the device lock held: deletes snapshot `id`'s thin device,
    /// unless it is still open (then says who holds it).
    fn remove_device(&self, id: u64) -> Result<(), DmapError> {
        let thin = self.thin(id)?;
        let marker = self.marker(id);
        let foreign = self.foreign_note(id);
        if foreign.exists() {
            // A create refused because another user of a shared pool has this id: the store
            // rolls it back, but the device is not ours to delete.
            return fs::remove_file(&foreign)
                .map_err(|e| DmapError::io(&foreign, "forget a refused create", e));
        }
        let open = self.open_count(thin)?;
        if open > 0 {
            return Err(DmapError::Busy {
                device: self.name(thin),
                open,
            });
        }
        // A committed layer's device a reader was killed holding stays active read-only: it
        // would refuse the discard. Nobody has it open (checked above), so it is made again
        // writable.
        if self.read_only(thin)? {
            self.deactivate(thin)?;
        }
        // Give the blocks back (a loop-backed pool punches holes in its data file).
        if let Ok(node) = self.activate(thin, false) {
            let discarded = fs::OpenOptions::new()
                .write(true)
                .open(&node)
                .and_then(|f| sys::discard(&f, 0, self.cfg.base_size));
            if let Err(e) = discarded {
                tracing::warn!(id, error = %e, "could not discard the device before deleting it");
            }
        }
        self.deactivate(thin)?;
        // The pool can refuse (EBUSY) for a moment after a process that used the device died:
        // seen in the VM right after a SIGKILL, gone a second later. Retried briefly.
        let mut tries = 0;
        loop {
            match self.message(&format!("delete {thin}"), "delete the thin device") {
                Ok(()) => break,
                // Never created (a rolled-back create) or already deleted.
                Err(DmapError::Dm { .. }) if !self.thin_exists(thin) => break,
                Err(DmapError::Dm { .. }) if tries < 30 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
        // A killed reader's lock file; nobody can read a deleted device.
        let _ = fs::remove_file(self.reading(id));
        match fs::remove_file(&marker) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DmapError::io(&marker, "forget the device", e)),
        }
    }

    /// Whether the pool has thin id `thin`: activating a device for an id the pool does not
    /// have fails.
    /// Callers hold the device lock (or own the pool alone, as at its creation).
    fn thin_exists(&self, thin: u64) -> bool {
        match self.node(thin) {
            Ok(Some(_)) => true,
            _ => self.probe(thin),
        }
    }

    /// Whether the pool has thin id `thin`, asked without activating a device: the thin
    /// target's constructor opens the id in the pool's metadata when a table over it is
    /// loaded, and fails for an id the pool lacks. The device made for the question (the
    /// snapshot's own name; callers hold the device lock) only ever gets an inactive table,
    /// so no block device comes up and nothing is read, and it is removed at once; one a
    /// killed process left behind has no active table, which the next activation removes
    /// ([`Self::set_right`]). An export guard asks this of every layer of an image: a full
    /// activation per inactive layer made the checks of the crash campaign grow with the
    /// depth of its chains.
    fn probe(&self, thin: u64) -> bool {
        let name = self.name(thin);
        let Ok(dm_name) = pool::dm_name(&name) else {
            return false;
        };
        if self
            .dm
            .device_create(dm_name, None, DmOptions::private())
            .is_err()
        {
            return false;
        }
        let id = DevId::Name(dm_name);
        let table = [(
            0u64,
            self.cfg.base_sectors().0,
            "thin".to_string(),
            format!("{} {}", self.pool_dev, thin),
        )];
        let loaded = self
            .dm
            .table_load(
                &id,
                &table,
                DmOptions::private().set_flags(DmFlags::DM_READONLY),
            )
            .is_ok();
        if let Err(e) = self.dm.device_remove(&id, DmOptions::private()) {
            tracing::warn!(device = %name, error = %e, "could not remove the device of an existence check");
        }
        loaded
    }
}
