//! Layers in and out of the store: diff a committed snapshot against its parent, apply a
//! layer to an active snapshot.

use std::io::{Read, Write};

use super::Store;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::layer::apply::{apply_layer, apply_overlay_layer_with, Applied, ApplyOutcome};
use crate::layer::diff::{
    overlay_fast_path_applies_with, write_layer, write_overlay_layer_with, DiffOptions, DiffStats,
};
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
        self.diff_ids(name, row.id, &parents, opts, out)
    }

    /// Diffs snapshot `id` (named `name` in errors) against its `parents`; the caller makes
    /// sure nothing removes them meanwhile.
    pub(crate) fn diff_ids<W: Write>(
        &self,
        name: &str,
        id: u64,
        parents: &[u64],
        opts: &DiffOptions,
        out: W,
    ) -> Result<(Descriptor, DiffStats, W)> {
        let mut chain = vec![id];
        chain.extend(parents);
        let (parents, _lower_hold) = self.mount_chain(name, parents)?;
        let lower = match parents.is_empty() {
            true => None,
            false => Some(self.mount_view(name, &parents, "view the parent for a diff")?),
        };
        let lower_path = lower.as_ref().map(|l| l.path());
        // The overlay fast path reads only the layer's upper directory, its markers under
        // the backend's prefix (user.overlay.* for a rootless store).
        let xattrs = self.backend.overlay_xattrs();
        let fast_dir = match self.backend.overlay_upper(id) {
            Some(dir) if overlay_fast_path_applies_with(&dir, xattrs, opts)? => Some(dir),
            _ => None,
        };
        let written = match fast_dir {
            Some(dir) => write_overlay_layer_with(lower_path, &dir, xattrs, out, opts)?,
            None => {
                let (chain, _upper_hold) = self.mount_chain(name, &chain)?;
                let upper = self.mount_view(name, &chain, "view for a diff")?;
                let written = write_layer(lower_path, upper.path(), out, opts)?;
                upper.unmount()?;
                written
            }
        };
        if let Some(l) = lower {
            l.unmount()?;
        }
        Ok(written)
    }

    /// The diffID, content checksum and size of snapshot `id`'s layer as stored: its diff
    /// goes through a pipe to a thread that sums it without applying it.
    pub(crate) fn summarize(
        &self,
        name: &str,
        id: u64,
        parents: &[u64],
    ) -> Result<crate::layer::apply::LayerSummary> {
        let (reader, writer) =
            std::io::pipe().map_err(|e| Error::io(&self.root, "create a pipe", e))?;
        let summer = std::thread::spawn(move || crate::layer::apply::content_of_layer(reader));
        // The writer is dropped when diff_ids returns, so the summer sees the end.
        let diffed = self
            .diff_ids(name, id, parents, &DiffOptions::default(), writer)
            .map(|(d, _, _)| d);
        let summary = summer
            .join()
            .map_err(|_| Error::precondition(name, "summing the layer's content panicked"))?;
        let descriptor = diffed?;
        let summary = summary?;
        if summary.diff_id != descriptor.diff_id {
            return Err(Error::precondition(
                name,
                format!(
                    "the layer read back ({}) is not the layer written ({})",
                    summary.diff_id, descriptor.diff_id
                ),
            ));
        }
        Ok(summary)
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
        let (row, parents) = self.row(key)?;
        if row.kind != Kind::Active {
            return Err(Error::precondition(
                key,
                format!("layers are applied to active snapshots; it is {}", row.kind),
            ));
        }
        let tmp = self.root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        let mount = || {
            let mounts = crate::snapshotter::Snapshotter::mounts(self, key)?;
            TempMount::new_in(&tmp, &mounts)
        };
        // On overlay, straight into the upper directory (mounting only if an entry needs it).
        let (parents, _hold) = self.mount_chain(key, &parents)?;
        let lowers: Option<Vec<_>> = parents
            .iter()
            .map(|p| self.backend.layer_path(*p))
            .collect();
        let result = match (self.backend.overlay_upper(row.id), lowers) {
            (Some(upper), Some(lowers)) if !self.opts.apply_mounted => {
                let xattrs = self.backend.overlay_xattrs();
                apply_overlay_layer_with(&upper, &lowers, xattrs, mount, input, expected)
            }
            _ => {
                let target = mount()?;
                let result = apply_layer(target.path(), input, expected);
                target.unmount()?;
                result
            }
        };
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

/// What [`Store::apply_layer`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedLayer {
    /// The committed snapshot: its name is the layer's chainID.
    pub name: String,
    /// The layer's diffID.
    pub diff_id: Digest,
    /// The layer's [content checksum](crate::layer::content), as recorded.
    pub content: String,
    /// The blob's descriptor, when the blob was read (`None` on a cache hit).
    pub descriptor: Option<Descriptor>,
    /// True when the layer was already there and the stream was not read.
    pub cached: bool,
}

impl<B: Backend> Store<B> {
    /// What is recorded of committed snapshot `name` (or image) as a layer: its diffID,
    /// chainID, content checksum and size, when [`Store::apply_layer`] made it.
    pub fn layer(&self, name: &str) -> Result<Option<crate::LayerRecord>> {
        let (row, _) = self.row(name)?;
        self.with_meta(|m| m.read(name)?.layer(row.id))
    }

    /// The chainID of committed snapshot `name`. A snapshot made by `commit` (a build step)
    /// has none recorded yet: its layer is diffed once — the differ is deterministic, so this
    /// is the diffID any export of it gets — and its diffID, chainID, content checksum and
    /// size are recorded, below it first.
    pub(crate) fn chain_id_of(&self, name: &str) -> Result<Digest> {
        let (row, parents) = self.row(name)?;
        if let Some(layer) = self.with_meta(|m| m.read(name)?.layer(row.id))? {
            return Digest::parse(&layer.chain_id).map_err(|e| Error::precondition(name, e));
        }
        if row.kind != Kind::Committed {
            return Err(Error::precondition(
                name,
                format!(
                    "layers are applied on committed snapshots; it is {}",
                    row.kind
                ),
            ));
        }
        let parent_chain = match row.parent_id {
            Some(pid) => {
                let parent = self
                    .with_meta(|m| m.read(name)?.row_by_id(pid))?
                    .ok_or_else(|| Error::not_found(format!("parent of {name}")))?;
                Some(self.chain_id_of(&parent.key)?)
            }
            None => None,
        };
        let summary = {
            let _guard = self.guard(&[name])?;
            self.summarize(name, row.id, &parents)?
        };
        let chain = match parent_chain {
            Some(p) => crate::layer::chain_id(&[p, summary.diff_id.clone()]),
            None => Some(summary.diff_id.clone()),
        }
        .unwrap_or_else(|| summary.diff_id.clone());
        self.with_meta(|m| {
            let tx = m.write(name)?;
            tx.set_layer(
                row.id,
                &crate::LayerRecord {
                    diff_id: summary.diff_id.to_string(),
                    chain_id: chain.to_string(),
                    content: summary.content.to_string(),
                    tar_size: summary.tar_size,
                },
            )?;
            tx.commit()
        })?;
        Ok(chain)
    }

    /// Applies a layer on top of `parent` (any committed snapshot or image, or none) and
    /// commits it under its chainID. When `diff_id` is given and that chain is already
    /// committed, returns it without reading `input` (the cache hit). `digest` checks the
    /// blob. A failure leaves nothing behind.
    ///
    /// Nothing holds the layer once this returns: beside a running gc, use
    /// [`Store::apply_layer_in`] with a lease, or the layer may be gone before it is tagged.
    pub fn apply_layer<R: Read>(
        &self,
        parent: Option<&str>,
        digest: Option<&Digest>,
        diff_id: Option<&Digest>,
        input: R,
    ) -> Result<AppliedLayer> {
        self.apply_layer_in(None, parent, digest, diff_id, input)
    }

    /// [`Store::apply_layer`], with the layer added to `lease` (when given) before any gc
    /// could see it unheld: a layer it applies is leased while still Active (a commit keeps
    /// the snapshot's identity), and a cached or concurrently committed one is leased before
    /// it is returned (if gc removed it meanwhile, the layer is applied after all).
    pub fn apply_layer_in<R: Read>(
        &self,
        lease: Option<&str>,
        parent: Option<&str>,
        digest: Option<&Digest>,
        diff_id: Option<&Digest>,
        input: R,
    ) -> Result<AppliedLayer> {
        if let Some(l) = lease {
            crate::store::check_key("lease", l)?;
            self.with_meta(|m| {
                super::tracker::check_live_lease(&m.read(l)?, l, "the applied layer")
            })?;
        }
        // Whether the committed layer `chain` is there and now held by the lease.
        let hold = |chain: &str| -> Result<bool> {
            match lease {
                None => Ok(true),
                Some(l) => match self.lease_add(l, &[chain]) {
                    Ok(()) => Ok(true),
                    // Removed by gc since it was seen: apply it after all.
                    Err(Error::NotFound { key, .. }) if key == chain => Ok(false),
                    Err(e) => Err(e),
                },
            }
        };
        let parent_chain = parent.map(|p| self.chain_id_of(p)).transpose()?;
        let chain_for = |d: &Digest| match &parent_chain {
            Some(p) => crate::layer::chain_id(&[p.clone(), d.clone()]),
            None => Some(d.clone()),
        };
        let exists = |name: &str| -> Result<bool> {
            match crate::snapshotter::Snapshotter::stat(self, name) {
                Ok(info) => Ok(info.kind == Kind::Committed),
                Err(e) if e.kind() == crate::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        };
        if let Some(known) = diff_id {
            if let Some(chain) = chain_for(known).filter(|c| {
                exists(c.as_str()).unwrap_or(false) && hold(c.as_str()).unwrap_or(false)
            }) {
                let content = self
                    .layer(chain.as_str())?
                    .map(|l| l.content)
                    .unwrap_or_default();
                return Ok(AppliedLayer {
                    name: chain.to_string(),
                    diff_id: known.clone(),
                    content,
                    descriptor: None,
                    cached: true,
                });
            }
        }
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let key = format!(
            "{}{}/{}",
            super::tracker::APPLY_PREFIX,
            self.owner.token,
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        // Leased from its first moment: a served store's containerd removes, in its gc, every
        // snapshot it does not know of that nothing holds — this one, mid-apply, included.
        self.create(Kind::Active, &key, parent, crate::Labels::new(), lease)?;
        let result = (|| {
            let applied = self.apply(&key, input, digest)?;
            let got = applied.descriptor.diff_id.clone();
            if let Some(want) = diff_id {
                if want != &got {
                    return Err(Error::invalid(
                        format!("diffID {want}"),
                        format!("the layer's uncompressed tar has diffID {got}"),
                    ));
                }
            }
            let chain = chain_for(&got).unwrap_or_else(|| got.clone());
            if exists(chain.as_str())? && hold(chain.as_str())? {
                // Committed meanwhile (or the diffID was not known): keep the existing one.
                let content = self
                    .layer(chain.as_str())?
                    .map(|l| l.content)
                    .unwrap_or_default();
                return Ok((chain, got, applied.descriptor, content, true));
            }
            // Recorded on the active row, which the commit keeps: the committed layer never
            // exists without its record, whenever the process dies. The checksum is the one
            // of the layer as stored (what `verify` recomputes), whoever wrote the tar.
            let (row, parents) = self.row(&key)?;
            let stored = self.summarize(&key, row.id, &parents)?;
            let content = stored.content.to_string();
            self.with_meta(|m| {
                let tx = m.write(&key)?;
                tx.set_layer(
                    row.id,
                    &crate::LayerRecord {
                        diff_id: got.to_string(),
                        chain_id: chain.to_string(),
                        content: content.clone(),
                        tar_size: applied.tar_size,
                    },
                )?;
                tx.commit()
            })?;
            // Another thread or process may be committing the same layer (two pulls of one
            // image): its commit reserves the name until it ends. Keep theirs once it is
            // there, as when it was there before; commit ours if theirs failed.
            let deadline = std::time::Instant::now() + self.opts.lock_timeout;
            loop {
                match crate::snapshotter::Snapshotter::commit(
                    self,
                    chain.as_str(),
                    &key,
                    crate::Labels::new(),
                ) {
                    Ok(()) => return Ok((chain, got, applied.descriptor, content, false)),
                    Err(Error::AlreadyExists { .. })
                        if exists(chain.as_str())? && hold(chain.as_str())? =>
                    {
                        let content = self
                            .layer(chain.as_str())?
                            .map(|l| l.content)
                            .unwrap_or_default();
                        return Ok((chain, got, applied.descriptor, content, true));
                    }
                    Err(Error::AlreadyExists { .. }) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(e) => return Err(e),
                }
            }
        })();
        // Takes the apply's own snapshot out of the lease (which holds it from its prepare),
        // so that it can be removed.
        let unlease = || {
            let Some(l) = lease else { return };
            let dropped = self.with_meta(|m| {
                let tx = m.write(&key)?;
                if let Some(row) = tx.row_by_key_or_image(&key)? {
                    tx.lease_drop(l, row.id)?;
                }
                tx.commit()
            });
            if let Err(d) = dropped {
                tracing::warn!(key, lease = l, error = %d, "could not take the snapshot of an apply-layer out of its lease");
            }
        };
        match result {
            Ok((chain, got, descriptor, content, existed)) => {
                if existed {
                    unlease();
                    crate::snapshotter::Snapshotter::remove(self, &key)?;
                } else {
                    // A pull: the time to flatten a deep chain, before a container waits.
                    self.flatten_ahead(chain.as_str());
                }
                Ok(AppliedLayer {
                    name: chain.to_string(),
                    diff_id: got,
                    content,
                    descriptor: Some(descriptor),
                    cached: false,
                })
            }
            Err(e) => {
                unlease();
                if let Err(rm) = crate::snapshotter::Snapshotter::remove(self, &key) {
                    tracing::warn!(key, error = %rm, "could not remove the snapshot of a failed apply-layer; gc or cleanup will");
                }
                Err(e)
            }
        }
    }
}
