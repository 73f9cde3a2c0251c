//! The thin pool a store keeps its snapshots in, and how the store finds it again.
//!
//! `devmapper.json` in the store root records the pool: its device-mapper name, and for a
//! pool strata made on loop devices, the two backing files (under `pool/` in the root), the
//! sizes, the data block size and the low-water mark. On open, a loop-backed pool whose
//! devices are gone (a reboot) is re-attached: the files are attached to loop devices again,
//! the linear devices over them and the pool are set up from the recorded table. A pool the
//! user made and named is only looked up.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use devicemapper::{
    DevId, Device, DmDevice, DmName, DmOptions, LinearDev, LinearDevTargetParams,
    LinearTargetParams, Sectors, TargetLine, ThinPoolDev, DM,
};
use serde::{Deserialize, Serialize};

use crate::DmapError;

/// The recorded configuration file, in the store root.
pub const CONFIG: &str = "devmapper.json";

/// What a loop-backed pool strata made is built from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoopFiles {
    /// The data file, relative to the store root.
    pub data: PathBuf,
    /// The metadata file, relative to the store root.
    pub meta: PathBuf,
}

/// A store's pool and base device, as recorded in `devmapper.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolConfig {
    /// The pool's device-mapper name.
    pub pool: String,
    /// The prefix of the thin devices' names: `<prefix>-<id>`.
    pub prefix: String,
    /// Set when strata made the pool on loop devices over these files.
    pub loop_files: Option<LoopFiles>,
    /// Bytes of the data device (loop-backed pools).
    pub data_size: u64,
    /// Bytes of the metadata device (loop-backed pools).
    pub meta_size: u64,
    /// The pool's data block size in 512-byte sectors.
    pub block_sectors: u64,
    /// The pool's low-water mark in data blocks.
    pub low_water_mark: u64,
    /// Bytes of the base device, and so of every snapshot.
    pub base_size: u64,
    /// The base device's filesystem: `ext4` or `xfs`.
    pub fs: String,
}

/// How to make a loop-backed pool (`strata --backend devmapper pool create`).
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Bytes of the data file (sparse).
    pub data_size: u64,
    /// Bytes of the metadata file (sparse).
    pub meta_size: u64,
    /// Data block size in bytes: a multiple of 64 KiB between 64 KiB and 1 GiB.
    pub block_size: u64,
    /// Low-water mark in data blocks: the kernel raises an event below it.
    pub low_water_mark: u64,
    /// Bytes of the base device.
    pub base_size: u64,
    /// `ext4` (default) or `xfs`.
    pub fs: String,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            data_size: 8 << 30,
            meta_size: 256 << 20,
            block_size: 64 << 10,
            low_water_mark: 1024,
            base_size: 10 << 30,
            fs: "ext4".into(),
        }
    }
}

pub(crate) fn dm_name(name: &str) -> Result<&DmName, DmapError> {
    DmName::new(name).map_err(|e| DmapError::dm(name, "use the name", e))
}

impl PoolConfig {
    /// Reads `root/devmapper.json`.
    pub fn load(root: &Path) -> Result<Option<PoolConfig>, DmapError> {
        let path = root.join(CONFIG);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| DmapError::Config {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DmapError::io(&path, "read the pool configuration", e)),
        }
    }

    /// Writes `root/devmapper.json` (temporary file, fsync, rename).
    pub fn save(&self, root: &Path) -> Result<(), DmapError> {
        let path = root.join(CONFIG);
        let tmp = root.join(format!(".{CONFIG}.new"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| DmapError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&tmp, text)
            .and_then(|()| fs::File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| DmapError::io(&path, "write the pool configuration", e))
    }

    /// The data block size in sectors.
    pub fn block(&self) -> Sectors {
        Sectors(self.block_sectors)
    }

    /// The base device's size in sectors.
    pub fn base_sectors(&self) -> Sectors {
        Sectors(self.base_size / 512)
    }
}

/// The loop device attached to `file`, attaching one if there is none.
fn loop_for(file: &Path) -> Result<PathBuf, DmapError> {
    let found = run(Command::new("losetup").arg("--associated").arg(file), file)?;
    if let Some(dev) = found.lines().next().and_then(|l| l.split(':').next()) {
        if !dev.is_empty() {
            return Ok(PathBuf::from(dev));
        }
    }
    // Direct I/O keeps the data out of the page cache twice; files on a filesystem without
    // it (tmpfs) are attached without.
    let dev = run(
        Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file),
        file,
    )
    .or_else(|_| {
        run(
            Command::new("losetup").args(["--find", "--show"]).arg(file),
            file,
        )
    })?;
    Ok(PathBuf::from(dev.trim()))
}

/// Detaches every loop device attached to `file`.
pub(crate) fn detach_loops(file: &Path) -> Result<(), DmapError> {
    let found = run(Command::new("losetup").arg("--associated").arg(file), file)?;
    for dev in found.lines().filter_map(|l| l.split(':').next()) {
        if !dev.is_empty() {
            run(Command::new("losetup").arg("--detach").arg(dev), file)?;
        }
    }
    Ok(())
}

/// Runs a helper program (losetup, mkfs), its output or an error naming `about`.
pub(crate) fn run(cmd: &mut Command, about: &Path) -> Result<String, DmapError> {
    let out = cmd.output().map_err(|e| {
        DmapError::io(
            about,
            "run a helper program (util-linux, e2fsprogs or xfsprogs missing?)",
            e,
        )
    })?;
    if !out.status.success() {
        return Err(DmapError::Tool {
            path: about.to_path_buf(),
            command: format!("{cmd:?}"),
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn device_of(path: &Path) -> Result<(Device, Sectors), DmapError> {
    let f = fs::File::open(path).map_err(|e| DmapError::io(path, "open the device", e))?;
    let st = rustix::fs::fstat(&f).map_err(|e| DmapError::io(path, "stat the device", e.into()))?;
    let bytes =
        crate::sys::block_size_bytes(&f).map_err(|e| DmapError::io(path, "size the device", e))?;
    Ok((Device::from(st.st_rdev), Sectors(bytes / 512)))
}

/// A linear device named `name` over the whole of `dev`.
fn linear(dm: &DM, name: &str, dev: &Path) -> Result<LinearDev, DmapError> {
    let (device, len) = device_of(dev)?;
    let table = vec![TargetLine::new(
        Sectors(0),
        len,
        LinearDevTargetParams::Linear(LinearTargetParams::new(device, Sectors(0))),
    )];
    LinearDev::setup(dm, dm_name(name)?, None, table)
        .map_err(|e| DmapError::dm(name, "set up the linear device", e))
}

/// Sets up (or finds) the pool `cfg` records, and returns its device number; `fresh` when
/// its metadata device is new.
pub(crate) fn activate(
    dm: &DM,
    root: &Path,
    cfg: &PoolConfig,
    fresh: bool,
) -> Result<Device, DmapError> {
    let name = dm_name(&cfg.pool)?;
    if let Some(files) = &cfg.loop_files {
        let data = linear(
            dm,
            &format!("{}-data", cfg.pool),
            &loop_for(&root.join(&files.data))?,
        )?;
        let meta = linear(
            dm,
            &format!("{}-meta", cfg.pool),
            &loop_for(&root.join(&files.meta))?,
        )?;
        let low = devicemapper::DataBlocks(cfg.low_water_mark);
        let pool = if fresh {
            ThinPoolDev::new(dm, name, None, meta, data, cfg.block(), low, Vec::new())
        } else {
            ThinPoolDev::setup(dm, name, None, meta, data, cfg.block(), low, Vec::new())
        };
        return pool
            .map(|p| p.device())
            .map_err(|e| DmapError::dm(&cfg.pool, "set up the thin pool", e));
    }
    // A pool the user made: it must be there, and be a thin pool.
    let (info, table) = dm
        .table_status(&DevId::Name(name), DmOptions::default())
        .map_err(|e| DmapError::PoolMissing {
            pool: cfg.pool.clone(),
            reason: e.to_string(),
        })?;
    match table.first() {
        Some(line) if line.2 == "thin-pool" => Ok(info.device()),
        Some(line) => Err(DmapError::NotAPool {
            pool: cfg.pool.clone(),
            target: line.2.clone(),
        }),
        None => Err(DmapError::NotAPool {
            pool: cfg.pool.clone(),
            target: "no table".into(),
        }),
    }
}
