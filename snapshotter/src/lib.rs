//! strata: container image layer storage.
//!
//! The [`Snapshotter`] trait is containerd's snapshotter API. It is implemented once, by
//! [`Store`], which owns the metadata (SQLite) and the journal, on top of a narrow [`Backend`]
//! that only knows how to store and mount snapshots for numeric ids.
//!
//! ```no_run
//! use strata::{Backend, Labels, Snapshotter, Store, StoreOptions};
//!
//! fn build_layer(backend: impl Backend) -> strata::Result<()> {
//!     let store = Store::open("/var/lib/strata".as_ref(), backend, StoreOptions::default())?;
//!     let mounts = store.prepare("build-1", None, Labels::new())?;
//!     strata::mount::mount_all(&mounts, "/mnt/build".as_ref())?;
//!     // ... write the layer ...
//!     strata::mount::unmount("/mnt/build".as_ref())?;
//!     store.commit("layer-1", "build-1", Labels::new())?;
//!     Ok(())
//! }
//! ```

pub mod backend;
pub mod checksum;
pub mod copy;
pub mod error;
pub mod filter;
pub mod fsutil;
pub mod layer;
pub mod mount;
pub mod patterns;
pub mod snapshotter;
pub mod store;
pub mod types;

mod meta;
mod sys;

pub use backend::{Backend, CreateOptions, JournalOp};
pub use error::{BackendError, Error, ErrorKind, Result};
pub use meta::LayerRecord;
pub use snapshotter::Snapshotter;
pub use store::{
    AppliedLayer, ExportGuard, ExportOptions, ExportReport, FsckReport, GcReport, GuardedLayer,
    ImportReport, LeaseInfo, Store, StoreOptions, VerifyReport,
};
pub use types::{Info, Kind, Labels, Mount, Usage};

/// Label that asks the overlay backend to mount an Active snapshot `volatile` (value `true`).
pub const LABEL_VOLATILE: &str = "strata.io/volatile";
