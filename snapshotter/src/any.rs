//! [`AnyStore`]: a [`Store`] over any backend as one object-safe type.
//!
//! [`Store`] is generic over its backend, which is what a program that knows its backend
//! wants. A program that picks the backend at run time (the C ABI, a server, the command
//! line) holds a `Box<dyn AnyStore>` instead: the [`Snapshotter`] calls plus the store's
//! layer operations, with readers and writers as trait objects.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::copy::{CopyOptions, CopyStats};
use crate::layer::apply::Applied;
use crate::layer::diff::{DiffOptions, DiffStats};
use crate::layer::{Descriptor, Digest};
use crate::store::CleanupReport;
use crate::{
    AppliedLayer, Backend, ExportOptions, ExportReport, FlattenedLower, FsckReport, GcReport,
    ImportReport, LayerRecord, LeaseInfo, Result, Snapshotter, Store, VerifyReport,
};

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
    ) -> Result<AppliedLayer> {
        self.apply_layer_in(None, parent, digest, diff_id, input)
    }

    /// [`Store::apply_layer_in`]: [`AnyStore::apply_layer`], the layer held by `lease`.
    fn apply_layer_in(
        &self,
        lease: Option<&str>,
        parent: Option<&str>,
        digest: Option<&Digest>,
        diff_id: Option<&Digest>,
        input: &mut dyn Read,
    ) -> Result<AppliedLayer>;

    /// [`Store::cleanup_report`]: [`Snapshotter::cleanup`] saying what it did.
    fn cleanup_report(&self) -> Result<CleanupReport>;

    /// [`Store::layer`]: what is recorded of committed snapshot `name` as a layer.
    fn layer(&self, name: &str) -> Result<Option<LayerRecord>>;

    /// [`Store::tag`]: names an image, which holds `snapshot`'s whole chain.
    fn tag(&self, name: &str, snapshot: &str) -> Result<()>;

    /// [`Store::untag`]: removes an image name.
    fn untag(&self, name: &str) -> Result<()>;

    /// [`Store::images`]: every image and its snapshot.
    fn images(&self) -> Result<Vec<(String, String)>>;

    /// [`Store::lease_create`]: a lease that expires after `ttl` (never without one).
    fn lease_create(&self, name: &str, ttl: Option<Duration>) -> Result<()>;

    /// [`Store::lease_add`]: the lease holds `keys` too.
    fn lease_add(&self, name: &str, keys: &[&str]) -> Result<()>;

    /// [`Store::lease_remove`]: drops a lease.
    fn lease_remove(&self, name: &str) -> Result<()>;

    /// [`Store::leases`]: every lease.
    fn leases(&self) -> Result<Vec<LeaseInfo>>;

    /// [`Store::gc`]: removes what no image, lease or label holds.
    fn gc(&self, dry_run: bool) -> Result<GcReport>;

    /// See [`Store::set_managed`].
    fn set_managed(&self, managed: bool) -> Result<()>;

    /// See [`Store::managed`].
    fn managed(&self) -> Result<bool>;

    /// [`Store::fsck`]: checks (and with `repair`, repairs) the store.
    fn fsck(&self, repair: bool) -> Result<FsckReport>;

    /// [`Store::verify`]: checks stored layers against their recorded content.
    fn verify(&self, names: &[&str]) -> Result<VerifyReport>;

    /// [`Store::verify_layers`]: checks the named layers only, not the layers below them.
    fn verify_layers(&self, names: &[&str]) -> Result<VerifyReport>;

    /// [`Store::prepare_in`]: prepares an Active snapshot held by `lease` from its creation.
    fn prepare_in(
        &self,
        lease: &str,
        key: &str,
        parent: Option<&str>,
        labels: crate::Labels,
    ) -> Result<Vec<crate::Mount>>;

    /// [`Store::export`]: writes images as an OCI layout or archive.
    fn export(&self, images: &[&str], out: &Path, opts: &ExportOptions) -> Result<ExportReport>;

    /// [`Store::import`]: reads an OCI layout or archive.
    fn import(&self, src: &Path, ref_name: Option<&str>) -> Result<ImportReport>;

    /// [`Store::copy`]: `COPY --from` of paths of `from` into active snapshot `key`.
    fn copy(
        &self,
        from: &str,
        sources: &[&str],
        key: &str,
        dest: &str,
        opts: &CopyOptions,
    ) -> Result<CopyStats>;

    /// [`Store::checksum`]: the cache-key checksum of paths of `name`.
    fn checksum(&self, name: &str, paths: &[&str], excludes: &[String]) -> Result<Digest>;

    /// [`Store::flattened`]: the flattened lowers deep chains are mounted through.
    fn flattened(&self) -> Result<Vec<FlattenedLower>>;
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

    fn apply_layer_in(
        &self,
        lease: Option<&str>,
        parent: Option<&str>,
        digest: Option<&Digest>,
        diff_id: Option<&Digest>,
        input: &mut dyn Read,
    ) -> Result<AppliedLayer> {
        Store::apply_layer_in(self, lease, parent, digest, diff_id, input)
    }

    fn cleanup_report(&self) -> Result<CleanupReport> {
        Store::cleanup_report(self)
    }

    fn layer(&self, name: &str) -> Result<Option<LayerRecord>> {
        Store::layer(self, name)
    }

    fn tag(&self, name: &str, snapshot: &str) -> Result<()> {
        Store::tag(self, name, snapshot)
    }

    fn untag(&self, name: &str) -> Result<()> {
        Store::untag(self, name)
    }

    fn images(&self) -> Result<Vec<(String, String)>> {
        Store::images(self)
    }

    fn lease_create(&self, name: &str, ttl: Option<Duration>) -> Result<()> {
        Store::lease_create(self, name, ttl)
    }

    fn lease_add(&self, name: &str, keys: &[&str]) -> Result<()> {
        Store::lease_add(self, name, keys)
    }

    fn lease_remove(&self, name: &str) -> Result<()> {
        Store::lease_remove(self, name)
    }

    fn leases(&self) -> Result<Vec<LeaseInfo>> {
        Store::leases(self)
    }

    fn gc(&self, dry_run: bool) -> Result<GcReport> {
        Store::gc(self, dry_run)
    }

    fn set_managed(&self, managed: bool) -> Result<()> {
        Store::set_managed(self, managed)
    }

    fn managed(&self) -> Result<bool> {
        Store::managed(self)
    }

    fn fsck(&self, repair: bool) -> Result<FsckReport> {
        Store::fsck(self, repair)
    }

    fn verify(&self, names: &[&str]) -> Result<VerifyReport> {
        Store::verify(self, names)
    }

    fn verify_layers(&self, names: &[&str]) -> Result<VerifyReport> {
        Store::verify_layers(self, names)
    }

    fn prepare_in(
        &self,
        lease: &str,
        key: &str,
        parent: Option<&str>,
        labels: crate::Labels,
    ) -> Result<Vec<crate::Mount>> {
        Store::prepare_in(self, lease, key, parent, labels)
    }

    fn export(&self, images: &[&str], out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
        Store::export(self, images, out, opts)
    }

    fn import(&self, src: &Path, ref_name: Option<&str>) -> Result<ImportReport> {
        Store::import(self, src, ref_name)
    }

    fn copy(
        &self,
        from: &str,
        sources: &[&str],
        key: &str,
        dest: &str,
        opts: &CopyOptions,
    ) -> Result<CopyStats> {
        Store::copy(self, from, sources, key, dest, opts)
    }

    fn checksum(&self, name: &str, paths: &[&str], excludes: &[String]) -> Result<Digest> {
        Store::checksum(self, name, paths, excludes)
    }

    fn flattened(&self) -> Result<Vec<FlattenedLower>> {
        Store::flattened(self)
    }
}
