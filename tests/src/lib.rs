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
mod stores;

pub use compare::{
    check_directory_equal, check_directory_equal_limit, check_directory_equal_with_applier,
    MAX_DIFFERENCES,
};
#[cfg(feature = "devmapper")]
pub use dmpool::DevmapperPool;
pub use fstest::{apply, Op};
pub use layers::{hostile_corpus, snapshot_of, HostileCase, LayerBuilder};
pub use loopfs::{run_ok, LoopBtrfs};
pub use mounted::Mounted;
pub use privileged::{require_privileged, require_root, REQUIRE_PRIVILEGED_ENV};
#[cfg(feature = "btrfs")]
pub use stores::{btrfs_store, durable_btrfs_store, BtrfsStore};
pub use stores::{native_store, overlay_store, overlay_store_with};
