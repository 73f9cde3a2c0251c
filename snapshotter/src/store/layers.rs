//! Layers in and out of the store: diff a committed snapshot against its parent, apply a
//! layer to an active snapshot.

use std::io::{Read, Write};

use super::Store;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::layer::apply::{apply_layer, Applied, ApplyOutcome};
use crate::layer::diff::{write_layer, DiffOptions, DiffStats};
use crate::layer::{Descriptor, Digest};
use crate::mount::TempMount;
use crate::types::Kind;

impl<B: Backend> Store<B> {
    /// Writes the committed snapshot `name` (or image) as a layer: its changes against its
    /// parent (or everything, without one). The layers it reads are pinned by an export guard
    /// meanwhile, so nothing can remove them under the diff.
    pub fn diff<W: Write>(
        &self,
        name: &str,
        opts: &DiffOptions,
        out: W,
    ) -> Result<(Descriptor, DiffStats, W)> {
        let _guard = self.guard(&[name])?;
        let (row, parents) = self.row(name)?;
        if row.kind != Kind::Committed {
            return Err(Error::precondition(
                name,
                format!("only committed snapshots can be diffed; it is {}", row.kind),
            ));
        }
        let mut chain = vec![row.id];
        chain.extend(&parents);
        let tmp = self.root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        let upper_mounts = self
            .backend
            .view_mounts(&chain)
            .map_err(|e| self.backend_err(name, "view for a diff", e))?;
        let upper = TempMount::new_in(&tmp, &upper_mounts)?;
        let lower = match parents.is_empty() {
            true => None,
            false => {
                let m = self
                    .backend
                    .view_mounts(&parents)
                    .map_err(|e| self.backend_err(name, "view the parent for a diff", e))?;
                Some(TempMount::new_in(&tmp, &m)?)
            }
        };
        let written = write_layer(lower.as_ref().map(|l| l.path()), upper.path(), out, opts)?;
        if let Some(l) = lower {
            l.unmount()?;
        }
        upper.unmount()?;
        Ok(written)
    }

    /// Applies the layer read from `input` to the active snapshot `key`, checking the blob
    /// against `expected` when given. A failure that left the snapshot half changed marks it
    /// broken (a fresh, empty snapshot is left empty instead).
    pub fn apply<R: Read>(
        &self,
        key: &str,
        input: R,
        expected: Option<&Digest>,
    ) -> Result<Applied> {
        let (row, _) = self.row(key)?;
        if row.kind != Kind::Active {
            return Err(Error::precondition(
                key,
                format!("layers are applied to active snapshots; it is {}", row.kind),
            ));
        }
        let mounts = crate::snapshotter::Snapshotter::mounts(self, key)?;
        let tmp = self.root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        let target = TempMount::new_in(&tmp, &mounts)?;
        let result = apply_layer(target.path(), input, expected);
        target.unmount()?;
        match result {
            Ok(applied) => Ok(applied),
            Err((e, ApplyOutcome::Untouched)) => Err(e),
            Err((e, ApplyOutcome::Partial)) => {
                self.mark_broken(
                    row.id,
                    key,
                    &format!("a layer failed half-way through: {e}"),
                );
                Err(Error::Broken {
                    key: key.into(),
                    reason: format!("applying a layer failed after changing it: {e}"),
                })
            }
        }
    }
}
