//! Test support for strata's integration tests, after containerd's `continuity/fs/fstest` and
//! `pkg/testutil`:
//!
//! - [`Op`] and [`apply`]: file-system changes ("appliers") that build the same change in a
//!   mounted snapshot and in a plain directory;
//! - [`check_directory_equal`]: compares two trees the way `fstest.CheckDirectoryEqual` does;
//! - [`Mounted`]: a snapshot mounted on a directory, unmounted on drop;
//! - [`require_root`] and [`require_privileged`]: the gate of the tests that mount;
//! - [`LayerBuilder`] and [`hostile_corpus`]: layers written header by header;
//! - [`overlay_store`], [`native_store`]: a store of each backend on a root;
//! - [`LoopBtrfs`]: a loop-backed btrfs a test makes and removes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod compare;
#[cfg(feature = "devmapper")]
mod dmpool;
mod fstest;
mod layers;
mod loopfs;
mod mounted;
mod privileged;
mod rng;
mod stores;
mod userns;

pub use compare::{
    check_directory_equal, check_directory_equal_limit, check_directory_equal_with_applier,
    MAX_DIFFERENCES,
};
#[cfg(feature = "devmapper")]
pub use dmpool::{delete_behind_the_stores_back, pool_has_thin, with_layer_mounted, DevmapperPool};
pub use fstest::{apply, Op};
pub use layers::{hostile_corpus, snapshot_of, HostileCase, LayerBuilder};
pub use loopfs::{run_ok, LoopBtrfs, LoopFs};
pub use mounted::Mounted;
pub use privileged::{require_privileged, require_root, REQUIRE_PRIVILEGED_ENV};
pub use rng::Rng;
pub use userns::{
    give_to_userns_root, require_userns, run_in_userns, userns_child, USERNS_BASE,
    USERNS_CHILD_ENV, USERNS_SIZE,
};

/// Runs `f` on the stored tree of `layer` (of the store at `root`), behind the store's back,
/// to damage it: the backend's directory of it, or (devmapper, which has none) its thin
/// device mounted read-write on `scratch`.
pub fn change_stored_layer(
    root: &std::path::Path,
    layer: &strata::GuardedLayer,
    scratch: &std::path::Path,
    f: impl FnOnce(&std::path::Path),
) {
    match &layer.path {
        Some(dir) => f(dir),
        #[cfg(feature = "devmapper")]
        None => with_layer_mounted(root, layer.id, scratch, f),
        #[cfg(not(feature = "devmapper"))]
        None => panic!(
            "layer {} of the store at {} has no directory ({:?})",
            layer.name,
            root.display(),
            scratch
        ),
    }
}
#[cfg(feature = "btrfs")]
pub use stores::{btrfs_store, durable_btrfs_store, BtrfsStore};
#[cfg(feature = "devmapper")]
pub use stores::{devmapper_store, DevmapperStore};
pub use stores::{native_store, overlay_store, overlay_store_flattening, overlay_store_with};
