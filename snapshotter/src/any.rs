//! [`AnyStore`]: a [`Store`] over any backend as one object-safe type.
//!
//! [`Store`] is generic over its backend, which is what a program that knows its backend
//! wants. A program that picks the backend at run time (the C ABI, a server, the command
//! line) holds a `Box<dyn AnyStore>` instead: the [`Snapshotter`] calls plus the store's
//! layer operations, with readers and writers as trait objects.

use std::io::{Read, Write};
use std::path::Path;

use crate::layer::apply::Applied;
use crate::layer::diff::{DiffOptions, DiffStats};
use crate::layer::{Descriptor, Digest};
use crate::store::CleanupReport;
use crate::{AppliedLayer, Backend, Result, Snapshotter, Store};

/// A store whatever its backend (see the module docs).
pub trait AnyStore: Snapshotter {
    /// The store's root directory.
    fn root(&self) -> &Path;

    /// The backend's name (`overlay`, `native`, ...).
    fn backend_name(&self) -> &'static str;

    /// [`Store::diff`]: writes committed snapshot `name` as a layer to `out`.
    fn diff(
        &self,
        name: &str,
        opts: &DiffOptions,
        out: &mut dyn Write,
    ) -> Result<(Descriptor, DiffStats)>;

    /// [`Store::apply`]: applies the layer read from `input` to active snapshot `key`.
    fn apply(&self, key: &str, input: &mut dyn Read, expected: Option<&Digest>) -> Result<Applied>;

    /// [`Store::apply_layer`]: applies a layer on `parent` and commits it under its chainID.
    fn apply_layer(
        &self,
        parent: Option<&str>,
        digest: Option<&Digest>,
        diff_id: Option<&Digest>,
        input: &mut dyn Read,
    ) -> Result<AppliedLayer>;

    /// [`Store::cleanup_report`]: [`Snapshotter::cleanup`] saying what it did.
    fn cleanup_report(&self) -> Result<CleanupReport>;
}

impl<B: Backend> AnyStore for Store<B> {
    fn root(&self) -> &Path {
        Store::root(self)
    }

    fn backend_name(&self) -> &'static str {
        Store::backend(self).name()
    }

    fn diff(
        &self,
        name: &str,
        opts: &DiffOptions,
        out: &mut dyn Write,
    ) -> Result<(Descriptor, DiffStats)> {
        Store::diff(self, name, opts, out).map(|(desc, stats, _)| (desc, stats))
    }

    fn apply(&self, key: &str, input: &mut dyn Read, expected: Option<&Digest>) -> Result<Applied> {
        Store::apply(self, key, input, expected)
    }

    fn apply_layer(
        &self,
        parent: Option<&str>,
        digest: Option<&Digest>,
        diff_id: Option<&Digest>,
        input: &mut dyn Read,
    ) -> Result<AppliedLayer> {
        Store::apply_layer(self, parent, digest, diff_id, input)
    }

    fn cleanup_report(&self) -> Result<CleanupReport> {
        Store::cleanup_report(self)
    }
}
