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

/// A native store on `root`.
pub fn native_store(root: &Path) -> Store<NativeBackend> {
    Store::open(root, NativeBackend::open(root).unwrap(), options(false)).unwrap()
}
