//! Stores for the tests: one of each backend on a root, syncs off (the tests never lose
//! power; the durability tests open their own).

use std::path::Path;

use strata::{Store, StoreOptions};
use strata_native::NativeBackend;
use strata_overlay::OverlayBackend;

fn options(apply_mounted: bool) -> StoreOptions {
    StoreOptions {
        durable: false,
        apply_mounted,
        ..StoreOptions::default()
    }
}

/// An overlay store on `root`.
pub fn overlay_store(root: &Path) -> Store<OverlayBackend> {
    overlay_store_with(root, false)
}

/// An overlay store on `root`; with `apply_mounted`, layers are applied through a mount.
pub fn overlay_store_with(root: &Path, apply_mounted: bool) -> Store<OverlayBackend> {
    Store::open(
        root,
        OverlayBackend::open(root, Default::default()).unwrap(),
        options(apply_mounted),
    )
    .unwrap()
}

/// An overlay store on `root` that mounts chains through flattened lowers past `policy`.
pub fn overlay_store_flattening(
    root: &Path,
    policy: strata::FlattenPolicy,
) -> Store<OverlayBackend> {
    let opts = strata_overlay::OverlayOptions {
        flatten: policy,
        ..Default::default()
    };
    Store::open(
        root,
        OverlayBackend::open(root, opts).unwrap(),
        options(false),
    )
    .unwrap()
}

/// A native store on `root`.
pub fn native_store(root: &Path) -> Store<NativeBackend> {
    Store::open(root, NativeBackend::open(root).unwrap(), options(false)).unwrap()
}

/// A btrfs store on a loop-backed btrfs of its own; derefs to the store. The store is
/// dropped before the filesystem is unmounted and detached.
#[cfg(feature = "btrfs")]
pub struct BtrfsStore {
    store: Store<strata_btrfs::BtrfsBackend>,
    fs: crate::LoopBtrfs,
}

#[cfg(feature = "btrfs")]
impl BtrfsStore {
    /// The filesystem under the store.
    pub fn fs(&self) -> &crate::LoopBtrfs {
        &self.fs
    }
}

#[cfg(feature = "btrfs")]
impl std::ops::Deref for BtrfsStore {
    type Target = Store<strata_btrfs::BtrfsBackend>;
    fn deref(&self) -> &Self::Target {
        &self.store
    }
}

/// A btrfs store on a fresh `size`-byte loop-backed btrfs mounted on `root`.
#[cfg(feature = "btrfs")]
pub fn btrfs_store(root: &Path, size: u64) -> BtrfsStore {
    btrfs_store_with(root, size, options(false))
}

/// A btrfs store that syncs (the default outside tests) on a fresh `size`-byte loop-backed
/// btrfs mounted on `root` with no periodic transaction (`commit=3600`), so that a test can
/// count the transactions strata commits.
#[cfg(feature = "btrfs")]
pub fn durable_btrfs_store(root: &Path, size: u64) -> BtrfsStore {
    let opts = StoreOptions {
        durable: true,
        ..StoreOptions::default()
    };
    let store = btrfs_store_with(root, size, opts);
    crate::run_ok(
        std::process::Command::new("mount")
            .args(["-o", "remount,commit=3600"])
            .arg(root),
    );
    store
}

#[cfg(feature = "btrfs")]
fn btrfs_store_with(root: &Path, size: u64, opts: StoreOptions) -> BtrfsStore {
    let fs = crate::LoopBtrfs::mount_at(root, size);
    let store = Store::open(root, strata_btrfs::BtrfsBackend::open(root).unwrap(), opts).unwrap();
    BtrfsStore { store, fs }
}

/// A devmapper store with a loop-backed thin pool of its own (see [`crate::DevmapperPool`]);
/// derefs to the store. The store is dropped before the pool is taken down.
#[cfg(feature = "devmapper")]
pub struct DevmapperStore {
    store: Store<strata_devmapper::DevmapperBackend>,
    _pool: crate::DevmapperPool,
}

#[cfg(feature = "devmapper")]
impl std::ops::Deref for DevmapperStore {
    type Target = Store<strata_devmapper::DevmapperBackend>;
    fn deref(&self) -> &Self::Target {
        &self.store
    }
}

/// A devmapper store on `root`, with a fresh pool.
#[cfg(feature = "devmapper")]
pub fn devmapper_store(root: &Path) -> DevmapperStore {
    let pool = crate::DevmapperPool::create(root);
    let backend = strata_devmapper::DevmapperBackend::open(root).unwrap();
    DevmapperStore {
        store: Store::open(root, backend, options(false)).unwrap(),
        _pool: pool,
    }
}
