//! The devmapper side of the campaigns (`--backend devmapper`, built with the tests crate's
//! `devmapper` feature; device-mapper runs in the VM of `tests/vm/run`).
//!
//! A devmapper store finds its pool in `devmapper.json` in its root, so the campaign's
//! processes (the parent, every worker) share one pool by sharing the root: the parent makes a
//! loop-backed pool there once ([`CampaignPool::create`], sparse files under `ROOT/pool`) and
//! takes it down at the end, whatever happened (no thin, pool, linear or loop device left).
//! After each kill, [`check_devices`] looks at the device-mapper devices themselves: every
//! active thin device of the store belongs to a snapshot the store accounts for (fsck compares
//! the store's rows with its device records, not with what is active). One an activation
//! killed half way left without a table is the snapshot's: the backend makes it again on use.

use std::path::{Path, PathBuf};

use devicemapper::{DevId, DmFlags, DmName, DmOptions, DM};
use strata_devmapper::{DevmapperBackend, PoolConfig, PoolOptions};

use crate::{err, Res};

/// A loop-backed thin pool made for a campaign in its store root; taken down when dropped.
pub struct CampaignPool {
    root: PathBuf,
    /// The pool's device-mapper name and its thin devices' name prefix.
    pub pool: String,
    /// `<prefix>-<thin id>` names the store's thin devices.
    pub prefix: String,
}

impl CampaignPool {
    /// Makes a pool of `data_size` bytes of data (sparse) for the store at `root`, with thin
    /// devices of `base_size` bytes (ext4), or takes the one `root` already has.
    pub fn create(root: &Path, data_size: u64, base_size: u64) -> Res<CampaignPool> {
        std::fs::create_dir_all(root).map_err(err("create the root"))?;
        let cfg = match PoolConfig::load(root).map_err(err("read the pool configuration"))? {
            Some(cfg) => cfg,
            None => {
                let opts = PoolOptions {
                    data_size,
                    // Metadata for far more snapshots and blocks than a campaign makes.
                    meta_size: 64 << 20,
                    base_size,
                    ..PoolOptions::default()
                };
                DevmapperBackend::create_pool(root, &opts).map_err(err("make a thin pool"))?
            }
        };
        Ok(CampaignPool {
            root: root.to_path_buf(),
            pool: cfg.pool,
            prefix: cfg.prefix,
        })
    }

    /// Bytes of data space the pool has left, from its status (what `dmsetup status` says).
    pub fn free(&self) -> Res<u64> {
        let st = DevmapperBackend::open(&self.root)
            .and_then(|b| b.status())
            .map_err(err("read the pool's status"))?;
        Ok(st.total_data_blocks.saturating_sub(st.used_data_blocks) * st.data_block_bytes)
    }
}

impl Drop for CampaignPool {
    fn drop(&mut self) {
        if let Err(e) = DevmapperBackend::destroy_pool(&self.root) {
            eprintln!(
                "strata-stress: could not take down the thin pool of {}: {e}",
                self.root.display()
            );
        }
    }
}

/// The device-mapper devices of the store at `root` against its records: every active thin
/// device `<prefix>-<thin>` is a snapshot the store has a device record of
/// (`ROOT/devices/<id>`, which fsck matched against the rows); the base device is not active.
pub fn check_devices(root: &Path) -> Res<()> {
    let cfg = PoolConfig::load(root)
        .map_err(err("read the pool configuration"))?
        .ok_or("the store has no devmapper.json")?;
    let dm = DM::new().map_err(err("open device-mapper"))?;
    let thin_prefix = format!("{}-", cfg.prefix);
    let mut wrong = Vec::new();
    for (name, ..) in dm.list_devices().map_err(err("list dm devices"))? {
        let name = name.to_string();
        let Some(thin) = name
            .strip_prefix(&thin_prefix)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let (_, table) = match dm.table_status(
            &DevId::Name(DmName::new(&name).map_err(err("a dm name"))?),
            DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
        ) {
            Ok(t) => t,
            // Removed since it was listed (a deferred removal).
            Err(_) => continue,
        };
        let known = thin != cfg.thin_offset
            && root
                .join("devices")
                .join((thin - cfg.thin_offset).to_string())
                .exists();
        if thin == cfg.thin_offset {
            wrong.push(format!("{name}: the base device is active"));
        } else if !known {
            let state = if table.is_empty() {
                " (without a table)"
            } else {
                ""
            };
            wrong.push(format!(
                "{name}: active{state}, but the store has no snapshot {}",
                thin - cfg.thin_offset
            ));
        }
        // A snapshot's device left without a table by an activation killed half way is the
        // snapshot's: the backend removes and makes it again when the snapshot is next used
        // (the checks' views and verify use the new layers), or removes it with the snapshot.
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "thin devices the store does not account for: {wrong:?}"
        ))
    }
}
