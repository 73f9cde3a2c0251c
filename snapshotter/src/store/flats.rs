//! Deep chains: mounting a chain deeper than the backend stacks through a *flattened lower*.
//!
//! A backend with a [`FlattenPolicy`] (overlay) mounts chains of up to `threshold` layers as
//! they are. A deeper chain of depth `d` is mounted as its top `d - k` layers over one
//! directory holding the merged content of its bottom `k` layers, `k` the largest multiple of
//! `step` below `d` ([`FlattenPolicy::flattened`]): at most `step + 1` directories, whatever
//! the depth.
//!
//! * **Keyed by the chain.** A flattened lower belongs to the snapshot at the top of the
//!   chain it merges (in strata a chain prefix is one snapshot: layers applied by
//!   `apply_layer` are named by their chainID and never duplicated), so every chain with that
//!   prefix shares it. It is recorded in the `flats` table with what it costs on disk.
//! * **Built lazily**, by the first prepare, view, mount, diff or copy that needs it, from the
//!   nearest flattened lower below it when there is one (its `step` layers merged onto it)
//!   and from the layers themselves otherwise. Builds are journaled like a create (an
//!   interrupted one is rolled back), serialised per root by `flatten.lock`, and synced
//!   before they are recorded when the store is durable.
//! * **Held and collected.** A flattened lower goes with its top snapshot (a trigger drops
//!   its row; cleanup reclaims the storage). `gc` also drops those no Active snapshot or View
//!   mounts through; they are built again if needed. Operations that mount through one
//!   without a row of their own doing so (a create before its row is written, a diff's or a
//!   copy's temporary mounts) hold `flats.lock` shared meanwhile, and `gc` only collects
//!   when it can take it exclusively.

use std::fs::File;
use std::time::SystemTime;

use super::Store;
use crate::backend::{Backend, FlattenPolicy, JournalOp};
use crate::error::{Error, Result};
use crate::meta::Flat;
use crate::types::{Kind, Usage};

/// Held shared by anything mounting through a flattened lower it does not hold by a row.
const FLATS_LOCK: &str = "flats.lock";
/// Held exclusively while a flattened lower is built.
const FLATTEN_LOCK: &str = "flatten.lock";

/// The journal key of the build of the flattened lower of the chain topped by `top`: no
/// snapshot key can look like it.
fn flat_key(top: u64) -> String {
    format!("\0flatten {top}")
}

/// A shared hold on the flattened lowers a mount goes through (nothing when it goes through
/// none): `gc` does not collect them while it lives.
#[derive(Debug)]
pub(crate) struct FlatsHold {
    _lock: Option<File>,
}

/// A flattened lower as [`Store::flattened`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlattenedLower {
    /// The snapshot at the top of the chain it merges.
    pub top: String,
    /// How many layers it merges.
    pub depth: usize,
    /// What it costs on disk beyond the layers it links to (directories, and copies of
    /// files whose inode could take no more links).
    pub usage: Usage,
}

impl<B: Backend> Store<B> {
    fn lock_file(&self, name: &str, op: rustix::fs::FlockOperation) -> Result<Option<File>> {
        let path = self.root.join(name);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "open a lock file", e))?;
        match rustix::fs::flock(&f, op) {
            Ok(()) => Ok(Some(f)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io(&path, "lock", e.into())),
        }
    }

    /// The chain (top first) as the backend mounts it: `chain` itself, or, past the
    /// backend's flatten threshold, its top layers over the flattened lower of the rest,
    /// built now if it is not there yet. The hold keeps that lower from `gc` until dropped.
    pub(crate) fn mount_chain(&self, key: &str, chain: &[u64]) -> Result<(Vec<u64>, FlatsHold)> {
        let Some(k) = self
            .backend
            .flatten_policy()
            .and_then(|p| p.flattened(chain.len()))
        else {
            return Ok((chain.to_vec(), FlatsHold { _lock: None }));
        };
        let hold = self.lock_file(FLATS_LOCK, rustix::fs::FlockOperation::LockShared)?;
        let cut = chain.len() - k;
        let flat = self.ensure_flat(key, &chain[cut..])?;
        let mut mounted = chain[..cut].to_vec();
        mounted.push(flat);
        Ok((mounted, FlatsHold { _lock: hold }))
    }

    /// Builds now, off the path of the first prepare on top of it, the flattened lower that
    /// a chain on committed snapshot `name` mounts through, if it needs one. Best effort: a
    /// failure is logged, and the first mount that needs it tries again. Called when a pull
    /// has applied a layer (the pull's own prepares build the others on the way).
    pub(crate) fn flatten_ahead(&self, name: &str) {
        let built = self.row(name).and_then(|(row, parents)| {
            let mut chain = vec![row.id];
            chain.extend(parents);
            self.mount_chain(name, &chain).map(|_| ())
        });
        if let Err(e) = built {
            tracing::warn!(name, error = %e, "could not flatten the chain ahead; the first mount that needs it will");
        }
    }

    /// The flattened lower of `prefix` (top first), built when missing.
    fn ensure_flat(&self, key: &str, prefix: &[u64]) -> Result<u64> {
        let Some(&top) = prefix.first() else {
            return Err(Error::invalid(
                "chain",
                "flattening needs at least one layer",
            ));
        };
        if let Some(id) = self.present_flat(key, top)? {
            return Ok(id);
        }
        let _building = self.lock_file(FLATTEN_LOCK, rustix::fs::FlockOperation::LockExclusive)?;
        // Another process may have built it while this one waited.
        if let Some(id) = self.present_flat(key, top)? {
            return Ok(id);
        }
        let step = self
            .backend
            .flatten_policy()
            .map_or(0, |p: FlattenPolicy| p.step)
            .max(1);
        // The nearest flattened lower below: merge the layers above it onto it.
        let mut sources = prefix.to_vec();
        let mut j = step;
        while j < prefix.len() {
            if let Some(base) = self.present_flat(key, prefix[j])? {
                sources.truncate(j);
                sources.push(base);
                break;
            }
            j += step;
        }

        let flat_key = flat_key(top);
        let (id, seq) = self.with_meta(|m| {
            let tx = m.write(key)?;
            match tx.row_by_id(top)? {
                Some(row) if row.kind == Kind::Committed => {}
                _ => return Err(Error::precondition(
                    key,
                    "a layer of its chain was removed while the chain was being mounted; try again",
                )),
            }
            let id = tx.next_id()?;
            // The entry names the top as a parent, so that it cannot be removed meanwhile.
            let seq = tx.journal_add(
                JournalOp::Create,
                id,
                &flat_key,
                Some(top),
                &self.owner.token,
            )?;
            tx.commit()?;
            Ok((id, seq))
        })?;
        super::failpoint("flatten-before-backend");
        let started = std::time::Instant::now();
        let usage = match self.backend.flatten(id, &sources, self.opts.durable) {
            Ok(Some(usage)) => usage,
            Ok(None) => {
                self.abandon(&flat_key, seq, id);
                return Err(Error::precondition(
                    key,
                    format!(
                        "its chain of {} layers is deeper than the {} backend mounts and the backend cannot flatten it",
                        prefix.len(),
                        self.backend.name()
                    ),
                ));
            }
            Err(e) => {
                let err = self.backend_err(key, "flatten the bottom of its chain", e);
                self.abandon(&flat_key, seq, id);
                return Err(err);
            }
        };
        super::failpoint("flatten-after-backend");
        let flat = Flat {
            id,
            top,
            depth: prefix.len(),
            usage,
        };
        let added = self.with_meta(|m| {
            let tx = m.write(key)?;
            let added = tx.flat_add(&flat, SystemTime::now())?;
            tx.journal_remove(seq)?;
            tx.commit()?;
            Ok(added)
        });
        match added {
            Ok(true) => {
                tracing::info!(
                    key,
                    depth = prefix.len(),
                    merged = sources.len(),
                    id,
                    bytes = usage.size,
                    ms = started.elapsed().as_millis() as u64,
                    "built a flattened lower"
                );
                Ok(id)
            }
            Ok(false) => {
                // Recorded by another process meanwhile (one with another lock path): use
                // that one.
                self.abandon(&flat_key, seq, id);
                self.present_flat(key, top)?.ok_or_else(|| {
                    Error::precondition(key, "a flattened lower of its chain vanished; try again")
                })
            }
            Err(e) => {
                self.abandon(&flat_key, seq, id);
                Err(e)
            }
        }
    }

    /// The recorded flattened lower of the chain topped by `top`, when its storage is there.
    /// One whose storage is gone (lost with a power loss, deleted behind strata's back) is
    /// forgotten, to be built again.
    fn present_flat(&self, key: &str, top: u64) -> Result<Option<u64>> {
        let Some(id) = self.with_meta(|m| m.read(key)?.flat_of(top))? else {
            return Ok(None);
        };
        if self
            .backend
            .exists(id)
            .map_err(|e| self.backend_err(key, "look for a flattened lower", e))?
        {
            return Ok(Some(id));
        }
        tracing::warn!(
            key,
            id,
            "a flattened lower's storage is missing; building it again"
        );
        self.with_meta(|m| {
            let tx = m.write(key)?;
            tx.flat_drop(id)?;
            tx.commit()
        })?;
        Ok(None)
    }

    /// The flattened lowers of this store, deepest chains last.
    pub fn flattened(&self) -> Result<Vec<FlattenedLower>> {
        self.with_meta(|m| {
            let tx = m.read("")?;
            let mut out = Vec::new();
            for f in tx.all_flats()? {
                let top = tx.key_of(f.top)?.unwrap_or_else(|| format!("id {}", f.top));
                out.push(FlattenedLower {
                    top,
                    depth: f.depth,
                    usage: f.usage,
                });
            }
            out.sort_by_key(|f| f.depth);
            Ok(out)
        })
    }

    /// Drops (the rows of) the flattened lowers that no Active snapshot or View mounts
    /// through, unless something holds flattened lowers for a mount of its own right now.
    /// Returns how many; their storage is reclaimed by cleanup.
    pub(crate) fn collect_flats(&self) -> Result<usize> {
        let Some(policy) = self.backend.flatten_policy() else {
            return Ok(0);
        };
        let Some(_exclusive) = self.lock_file(
            FLATS_LOCK,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )?
        else {
            tracing::debug!(
                "flattened lowers are in use by a mount in progress; not collecting them this time"
            );
            return Ok(0);
        };
        self.with_meta(|m| {
            let tx = m.write("")?;
            let flats = tx.all_flats()?;
            if flats.is_empty() {
                return Ok(0);
            }
            let mut used = std::collections::HashSet::new();
            for row in tx.all_rows()? {
                if row.kind == Kind::Committed {
                    continue;
                }
                let parents = tx.chain(row.parent_id)?;
                if let Some(top) = policy
                    .flattened(parents.len())
                    .and_then(|k| parents.get(parents.len() - k))
                {
                    used.insert(*top);
                }
            }
            let mut dropped = 0;
            for f in flats.iter().filter(|f| !used.contains(&f.top)) {
                tx.flat_drop(f.id)?;
                dropped += 1;
            }
            tx.commit()?;
            Ok(dropped)
        })
    }
}
