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
//!
//! # What a builder uses
//!
//! * **Layers** ([`layer`]): [`Store::diff`] writes a committed snapshot as an OCI layer,
//!   [`Store::apply`] applies one to an active snapshot, [`Store::apply_layer`] applies and
//!   commits under the layer's chainID (a known chain is a cache hit), [`Store::layer`] says
//!   what was recorded of it.
//! * **`COPY --from`**: [`Store::copy`] copies paths of a committed snapshot or image into an
//!   active one ([`copy::CopyOptions`]: `.dockerignore` excludes, `--parents`, `--chown`);
//!   symlinks below the named paths are never followed.
//! * **Cache keys**: [`Store::checksum`] sums paths of a snapshot (content, modes, owners,
//!   xattrs, symlink targets; no times). Key a step by the checksums of its parent and of
//!   what it copies, commit with a label `strata.cache-key=KEY`, and look the key up with
//!   `store.list(&["labels.\"strata.cache-key\"==KEY,kind==committed"])` — one filter
//!   string, since separate strings are OR'ed.
//! * **Keeping layers**: [`Store::tag`] names an image (it holds its whole chain), leases
//!   ([`Store::lease_create`], [`Store::lease_add`]) hold work in progress, [`Store::gc`]
//!   removes what nothing holds, [`Store::guard`] pins images while they are read.
//! * **Images in and out**: [`Store::export`] writes OCI layouts and archives (nothing unless
//!   every layer is there and intact), [`Store::import`] reads them, [`Store::verify`] checks
//!   stored layers against their recorded content checksums.
//!
//! ```no_run
//! use strata::copy::CopyOptions;
//! use strata::layer::Digest;
//! use strata::{Backend, ExportOptions, Labels, Snapshotter, Store};
//!
//! /// `COPY --from=builder /out /app` on top of `base`, from the cache when it can be.
//! fn copy_step<B: Backend>(store: &Store<B>, base: &str) -> strata::Result<String> {
//!     let key = Digest::of(
//!         format!(
//!             "{}|COPY /out /app|{}",
//!             store.checksum(base, &[], &[])?,
//!             store.checksum("builder", &["/out"], &[])?
//!         )
//!         .as_bytes(),
//!     );
//!     let filter = format!("labels.\"strata.cache-key\"=={key},kind==committed");
//!     if let Some(hit) = store.list(&[filter.as_str()])?.into_iter().next() {
//!         return Ok(hit.name);
//!     }
//!     store.prepare("step", Some(base), Labels::new())?;
//!     store.copy("builder", &["/out"], "step", "/app", &CopyOptions::default())?;
//!     let mut labels = Labels::new();
//!     labels.insert("strata.cache-key".into(), key.to_string());
//!     store.commit("app-layer", "step", labels)?;
//!     store.tag("app:1", "app-layer")?;
//!     store.export(&["app:1"], "app.tar".as_ref(), &ExportOptions::default())?;
//!     Ok("app-layer".into())
//! }
//! ```
//!
//! `tests/examples/multistage.rs` in the repository performs a whole multi-stage build this
//! way, with a prune and a rebuild from the cache.

pub mod any;
pub mod backend;
pub mod checksum;
pub mod copy;
pub mod error;
pub mod filter;
pub mod fsutil;
pub mod idmap;
pub mod layer;
pub mod mount;
pub mod patterns;
pub mod report;
pub mod snapshotter;
pub mod store;
pub mod types;

mod meta;
mod sys;

pub use any::AnyStore;
pub use backend::{Backend, CreateOptions, FlattenPolicy, JournalOp};
pub use error::{BackendError, Error, ErrorKind, Result};
pub use meta::LayerRecord;
pub use snapshotter::Snapshotter;
pub use store::{
    AppliedLayer, ExportGuard, ExportOptions, ExportReport, FlattenedLower, FsckReport, GcReport,
    GuardedLayer, ImportReport, LeaseInfo, Store, StoreOptions, VerifyReport,
};
pub use types::{Info, Kind, Labels, Mount, Usage};

/// Label that asks the overlay backend to mount an Active snapshot `volatile` (value `true`).
pub const LABEL_VOLATILE: &str = "strata.io/volatile";
