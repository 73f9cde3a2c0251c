//! `COPY --from` and cache keys through the store: [`Store::copy`] and [`Store::checksum`]
//! mount what they read read-only (pinned by an export guard meanwhile) and the target
//! snapshot read-write, and leave the tree work to [`crate::copy`] and [`crate::checksum`].

use super::Store;
use crate::backend::Backend;
use crate::copy::{CopyOptions, CopyStats};
use crate::error::{Error, Result};
use crate::layer::Digest;
use crate::mount::TempMount;
use crate::types::Kind;

impl<B: Backend> Store<B> {
    /// A read-only mount of committed snapshot or image `name`, pinned while it lives.
    fn read_view(
        &self,
        name: &str,
    ) -> Result<(
        super::ExportGuard<'_, B>,
        super::flats::FlatsHold,
        super::ChainView<'_, B>,
    )> {
        let guard = self.guard(&[name])?;
        let (row, parents) = self.row(name)?;
        let mut chain = vec![row.id];
        chain.extend(parents);
        let (chain, hold) = self.mount_chain(name, &chain)?;
        let view = self.mount_view(name, &chain, "view")?;
        Ok((guard, hold, view))
    }

    /// Copies `sources` (paths in committed snapshot or image `from`) into active snapshot
    /// `key` at `dest`, the way `COPY --from` does: see [`crate::copy::copy_paths`].
    pub fn copy(
        &self,
        from: &str,
        sources: &[&str],
        key: &str,
        dest: &str,
        opts: &CopyOptions,
    ) -> Result<CopyStats> {
        let (row, _) = self.row(key)?;
        if row.kind != Kind::Active {
            return Err(Error::precondition(
                key,
                format!("files are copied into active snapshots; it is {}", row.kind),
            ));
        }
        let (guard, _hold, src) = self.read_view(from)?;
        let mounts = crate::snapshotter::Snapshotter::mounts(self, key)?;
        let tmp = self.root.join("tmp");
        let dst = TempMount::new_in(&tmp, &mounts)?;
        let result = crate::copy::copy_paths(src.path(), sources, dst.path(), dest, opts);
        dst.unmount()?;
        src.unmount()?;
        guard.release()?;
        result
    }

    /// The cache-key checksum of `paths` (all of it when empty) in committed snapshot or
    /// image `name`, leaving out `excludes`: see [`crate::checksum::checksum`]. The same tree
    /// gives the same checksum on every backend.
    pub fn checksum(&self, name: &str, paths: &[&str], excludes: &[String]) -> Result<Digest> {
        let (guard, _hold, view) = self.read_view(name)?;
        let result = crate::checksum::checksum(view.path(), paths, excludes);
        view.unmount()?;
        guard.release()?;
        result
    }
}
