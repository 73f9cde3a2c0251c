//! The trait builders call: containerd's snapshotter API.

use crate::error::Result;
use crate::types::{Info, Labels, Mount, Usage};

/// containerd's snapshotter API, with containerd's semantics and error kinds.
///
/// Keys are opaque strings: they may contain `/`, be long, and arrive namespaced from
/// containerd. Keys of Active and View snapshots and names of Committed ones share one
/// namespace. An empty key or one with a NUL byte is [`crate::ErrorKind::InvalidArgument`].
/// Every error carries the key it is about.
///
/// Implementations are `Send + Sync`: one store serves many threads.
pub trait Snapshotter: Send + Sync {
    /// Creates the Active snapshot `key` on top of the Committed snapshot `parent` (or empty)
    /// and returns the mounts that present it writable.
    fn prepare(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>>;

    /// Creates the View snapshot `key` of `parent` (or empty) and returns read-only mounts.
    fn view(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>>;

    /// The mounts of an Active or View snapshot (a Committed one is FailedPrecondition).
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// Turns the Active snapshot `key` into the Committed snapshot `name`; `key` is gone
    /// afterwards. `labels` replace the Active snapshot's labels.
    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()>;

    /// Removes a snapshot without children. Its storage is reclaimed by
    /// [`Snapshotter::cleanup`] unless the store removes synchronously.
    fn remove(&self, key: &str) -> Result<()>;

    /// What the store knows about a snapshot.
    fn stat(&self, key: &str) -> Result<Info>;

    /// Updates the labels of `info.name`: with no `fieldpaths` the labels are replaced;
    /// `labels` replaces the map; `labels.<k>` sets (or, when absent from `info`, deletes)
    /// that one label. Any other field path is InvalidArgument. Returns the new Info.
    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info>;

    /// The disk usage of the snapshot's own layer.
    fn usage(&self, key: &str) -> Result<Usage>;

    /// Calls `f` for every snapshot matching any of `filters` (containerd's filter syntax;
    /// none = all). `f` may call back into the store.
    fn walk(&self, filters: &[&str], f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()>;

    /// Reclaims the storage of removed snapshots and of operations that never completed.
    fn cleanup(&self) -> Result<()>;

    /// Closes the store. Closing twice is fine; any other call afterwards is
    /// [`crate::ErrorKind::Closed`].
    fn close(&self) -> Result<()>;

    /// Every snapshot matching any of `filters`, ordered by name.
    fn list(&self, filters: &[&str]) -> Result<Vec<Info>> {
        let mut out = Vec::new();
        self.walk(filters, &mut |info| {
            out.push(info.clone());
            Ok(())
        })?;
        Ok(out)
    }
}
