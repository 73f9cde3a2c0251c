//! The thin pool a store keeps its snapshots in, and how the store finds it again.
//!
//! `devmapper.json` in the store root records the pool: its device-mapper name, and for a
//! pool strata made on loop devices, the two backing files (under `pool/` in the root), the
//! sizes, the data block size and the low-water mark. On open, a loop-backed pool whose
//! devices are gone (a reboot) is re-attached: the files are attached to loop devices again,
//! the linear devices over them and the pool are set up from the recorded table, with
//! `error_if_no_space` (a full pool fails writes at once instead of queueing them for a
//! minute). A pool the user made and named is only looked up, and must be a thin pool.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use devicemapper::{
    DevId, Device, DmDevice, DmFlags, DmName, DmOptions, LinearDev, LinearDevTargetParams,
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
    /// The base device's thin id; snapshot `id` is thin id `thin_offset + id`. 0 in a pool
    /// strata made; in a shared pool, a range the pool's other users leave alone.
    #[serde(default)]
    pub thin_offset: u64,
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

/// The loop devices attached to `file`, found in sysfs (`/sys/block/loop*/loop/backing_file`)
/// rather than by running `losetup --associated`.
fn loops_of(file: &Path) -> Result<Vec<PathBuf>, DmapError> {
    let file =
        fs::canonicalize(file).map_err(|e| DmapError::io(file, "resolve the pool file", e))?;
    let mut found = Vec::new();
    let entries = match fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(e) => {
            return Err(DmapError::io(
                Path::new("/sys/block"),
                "list block devices",
                e,
            ))
        }
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        let Ok(backing) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim_end_matches('\n')) == file {
            found.push(PathBuf::from("/dev").join(name));
        }
    }
    found.sort();
    Ok(found)
}

/// The loop device attached to `file`, attaching one if there is none (`fresh`: the file was
/// just made, so none can be).
fn loop_for(file: &Path, fresh: bool) -> Result<PathBuf, DmapError> {
    if !fresh {
        if let Some(dev) = loops_of(file)?.into_iter().next() {
            return Ok(dev);
        }
    }
    // Direct I/O keeps the data out of the page cache twice; a tmpfs cannot do it, so files
    // there are attached without.
    let on_tmpfs = rustix::fs::statfs(file).is_ok_and(|st| st.f_type == 0x0102_1994);
    let attach = |direct: bool| {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if direct {
            cmd.arg("--direct-io=on");
        }
        run(cmd.arg(file), file)
    };
    let dev = if on_tmpfs {
        attach(false)
    } else {
        attach(true).or_else(|_| attach(false))
    }?;
    Ok(PathBuf::from(dev.trim()))
}

/// Detaches every loop device attached to `file`.
pub(crate) fn detach_loops(file: &Path) -> Result<(), DmapError> {
    if !file.exists() {
        return Ok(());
    }
    for dev in loops_of(file)? {
        run(Command::new("losetup").arg("--detach").arg(&dev), file)?;
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

/// The feature arguments of a pool strata makes: fail writes at once when the pool is full
/// (a queued write would hang the writer for the kernel's `no_space_timeout`, 60 s).
fn features() -> Vec<String> {
    vec!["error_if_no_space".to_string()]
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
    if let (Some(_), false) = (&cfg.loop_files, fresh) {
        // Already up (every open but the first after a reboot): nothing to attach. Two
        // `losetup` runs and two table checks saved on every open.
        if let Ok((info, table)) = dm.table_status(&DevId::Name(name), DmOptions::default()) {
            if table.first().is_some_and(|line| line.2 == "thin-pool") {
                return Ok(info.device());
            }
        }
    }
    if let Some(files) = &cfg.loop_files {
        let data = linear(
            dm,
            &format!("{}-data", cfg.pool),
            &loop_for(&root.join(&files.data), fresh)?,
        )?;
        let meta = linear(
            dm,
            &format!("{}-meta", cfg.pool),
            &loop_for(&root.join(&files.meta), fresh)?,
        )?;
        let low = devicemapper::DataBlocks(cfg.low_water_mark);
        let pool = if fresh {
            ThinPoolDev::new(dm, name, None, meta, data, cfg.block(), low, features())
        } else {
            ThinPoolDev::setup(dm, name, None, meta, data, cfg.block(), low, features())
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

/// The data size (bytes), block size (sectors) and low-water mark (blocks) of thin pool
/// `pool`, read from its table.
pub(crate) fn params(dm: &DM, pool: &str) -> Result<Option<(u64, u64, u64)>, DmapError> {
    let (_, table) = dm
        .table_status(
            &DevId::Name(dm_name(pool)?),
            DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
        )
        .map_err(|e| DmapError::dm(pool, "read the pool's table", e))?;
    Ok(table.first().and_then(|line| {
        let mut fields = line.3.split_whitespace().skip(2);
        let block = fields.next()?.parse().ok()?;
        let low = fields.next()?.parse().ok()?;
        Some((line.1 * 512, block, low))
    }))
}

/// How full a thin pool is, and its mode (`strata --backend devmapper pool status`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool's device-mapper name.
    pub pool: String,
    /// Data blocks in use.
    pub used_data_blocks: u64,
    /// Data blocks in all.
    pub total_data_blocks: u64,
    /// Bytes per data block.
    pub data_block_bytes: u64,
    /// Metadata blocks (4 KiB) in use.
    pub used_meta_blocks: u64,
    /// Metadata blocks in all.
    pub total_meta_blocks: u64,
    /// `rw`, `ro` (metadata full or damaged), `out_of_data_space` or `fail`.
    pub mode: String,
    /// The kernel flagged the metadata for a check (`thin_check`) before the pool may be
    /// written again: it ran out of metadata space or found damage.
    pub needs_check: bool,
}

impl PoolStatus {
    /// Whether the pool can take no new blocks.
    pub fn full(&self) -> bool {
        self.mode != "rw" || self.used_data_blocks >= self.total_data_blocks
    }

    /// Whether the kernel switched the pool to read-only (or failed it): no new devices, no
    /// writes, until its metadata is repaired. Removing snapshots cannot help then.
    pub fn read_only(&self) -> bool {
        self.mode == "ro" || self.mode == "fail"
    }
}

/// Reads thin pool `pool`'s status line; its data blocks are `data_block_bytes` each.
pub(crate) fn status(dm: &DM, pool: &str, data_block_bytes: u64) -> Result<PoolStatus, DmapError> {
    let (_, table) = dm
        .table_status(&DevId::Name(dm_name(pool)?), DmOptions::default())
        .map_err(|e| DmapError::dm(pool, "read the pool's status", e))?;
    let line = table.first().map(|l| l.3.clone()).unwrap_or_default();
    let bad = || DmapError::Config {
        path: PathBuf::from(pool),
        reason: format!("unexpected thin-pool status {line:?}"),
    };
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.first() == Some(&"Fail") {
        return Ok(PoolStatus {
            pool: pool.to_string(),
            used_data_blocks: 0,
            total_data_blocks: 0,
            data_block_bytes,
            used_meta_blocks: 0,
            total_meta_blocks: 0,
            mode: "fail".into(),
            needs_check: true,
        });
    }
    // <transaction id> <used meta>/<total meta> <used data>/<total data> <held root> <mode> ...
    let pair = |i: usize| -> Option<(u64, u64)> {
        let (a, b) = fields.get(i)?.split_once('/')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let (used_meta_blocks, total_meta_blocks) = pair(1).ok_or_else(bad)?;
    let (used_data_blocks, total_data_blocks) = pair(2).ok_or_else(bad)?;
    let mode = fields.get(4).ok_or_else(bad)?.to_string();
    // ... <discard> <no_space policy> <needs_check or -> <metadata low water mark>
    let needs_check = fields.iter().skip(5).any(|f| *f == "needs_check");
    Ok(PoolStatus {
        pool: pool.to_string(),
        used_data_blocks,
        total_data_blocks,
        data_block_bytes,
        used_meta_blocks,
        total_meta_blocks,
        mode,
        needs_check,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// loops_of finds what losetup attached, and only that; needs root and loop devices
    /// (this host has them, device-mapper or not).
    #[test]
    fn loops_are_found_by_their_backing_file() {
        if !rustix::process::geteuid().is_root() {
            assert!(
                std::env::var("STRATA_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
                "needs root"
            );
            eprintln!("SKIPPED: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for f in [&a, &b] {
            fs::File::create(f).unwrap().set_len(1 << 20).unwrap();
        }
        assert!(loops_of(&a).unwrap().is_empty());
        let dev = loop_for(&a, true).unwrap();
        assert_eq!(loops_of(&a).unwrap(), vec![dev.clone()]);
        assert_eq!(loop_for(&a, false).unwrap(), dev, "attached once");
        assert!(loops_of(&b).unwrap().is_empty());
        detach_loops(&a).unwrap();
        // Detaching is asynchronous for a moment after the ioctl returns.
        for _ in 0..50 {
            if loops_of(&a).unwrap().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(loops_of(&a).unwrap().is_empty());
    }
}
