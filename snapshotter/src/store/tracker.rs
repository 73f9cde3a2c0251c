//! The layer-reference tracker: images, leases and gc.
//!
//! A Committed snapshot stays as long as a gc root reaches it. Roots: images, unexpired
//! leases, Active and View snapshots, snapshots labelled `containerd.io/gc.root`
//! (containerd's convention) and operations in flight; each holds its whole parent chain.
//! `remove` refuses a snapshot an image or a lease holds directly.

use std::time::{Duration, SystemTime};

use super::{check_key, Store};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::types::Kind;

/// A lease as [`Store::leases`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The lease's name.
    pub name: String,
    /// When it stops holding anything (`None`: never).
    pub expires: Option<SystemTime>,
    /// Names of the snapshots it holds directly (each also holds its chain).
    pub snapshots: Vec<String>,
}

/// What [`Store::gc`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Snapshots removed (or that would be), children before parents.
    pub removed: Vec<String>,
    /// Candidates something took hold of during the pass; left in place.
    pub kept: Vec<String>,
    /// Leases deleted because they had expired.
    pub expired_leases: Vec<String>,
    /// How many snapshots' storage was reclaimed.
    pub reclaimed: usize,
    /// The store is managed by containerd: gc only reclaimed orphaned storage.
    pub managed: bool,
    /// What could not be removed, with the error; retried by the next pass.
    pub failed: Vec<(String, String)>,
    /// Blobs of the content store nothing held any more, deleted.
    pub blobs: usize,
    /// Flattened lowers no Active snapshot or View mounted through, dropped (built again
    /// when a mount needs one); their storage is counted in `reclaimed`.
    pub flattened: usize,
}

impl<B: Backend> Store<B> {
    /// Points image `name` at the Committed snapshot `snapshot` (or at another image's
    /// snapshot), replacing what it named before. The image holds the whole chain.
    pub fn tag(&self, name: &str, snapshot: &str) -> Result<()> {
        check_key("image", name)?;
        check_key("snapshot", snapshot)?;
        self.with_meta(|m| {
            let tx = m.write(snapshot)?;
            let id = match tx.row_by_key(snapshot)? {
                Some(row) if row.kind == Kind::Committed => row.id,
                Some(row) => {
                    return Err(Error::precondition(
                        snapshot,
                        format!(
                            "cannot be tagged as {name:?}: it is {}; commit it first",
                            row.kind
                        ),
                    ));
                }
                None => tx.image(snapshot)?.ok_or_else(|| Error::NotFound {
                    key: snapshot.into(),
                    hint: format!("cannot tag it as {name:?}"),
                })?,
            };
            tx.set_image(name, id)?;
            tx.commit()
        })
    }

    /// Records whether the store is managed by containerd (served to it as a proxy
    /// snapshotter): then containerd's own gc decides which snapshots live, and strata's gc
    /// only reclaims orphaned storage, never removing a snapshot.
    pub fn set_managed(&self, managed: bool) -> Result<()> {
        self.with_meta(|m| {
            let tx = m.write("")?;
            tx.set_meta_value(MANAGED_META, if managed { "containerd" } else { "" })?;
            tx.commit()
        })
    }

    /// Whether the store is managed by containerd (see [`Store::set_managed`]).
    pub fn managed(&self) -> Result<bool> {
        self.with_meta(|m| {
            Ok(m.read("")?
                .meta_value(MANAGED_META)?
                .is_some_and(|v| !v.is_empty()))
        })
    }

    /// Deletes image `name`; its layers stay until gc finds nothing else holds them.
    pub fn untag(&self, name: &str) -> Result<()> {
        check_key("image", name)?;
        self.freeing(|| {
            self.with_meta(|m| {
                let tx = m.write(name)?;
                if !tx.delete_image(name)? {
                    return Err(Error::NotFound {
                        key: name.into(),
                        hint: "no such image".into(),
                    });
                }
                tx.commit()
            })
        })
    }

    /// Every image and the snapshot it names, by image name.
    pub fn images(&self) -> Result<Vec<(String, String)>> {
        self.with_meta(|m| m.read("")?.images())
    }

    /// Creates lease `name`, expiring after `ttl` when given.
    pub fn lease_create(&self, name: &str, ttl: Option<Duration>) -> Result<()> {
        check_key("lease", name)?;
        let expires = ttl.map(|t| SystemTime::now() + t);
        self.with_meta(|m| {
            let tx = m.write(name)?;
            if !tx.create_lease(name, expires)? {
                return Err(Error::AlreadyExists { key: name.into() });
            }
            tx.commit()
        })
    }

    /// Adds snapshots (keys, names or image names) to lease `name`; each holds its chain.
    pub fn lease_add(&self, name: &str, keys: &[&str]) -> Result<()> {
        check_key("lease", name)?;
        self.with_meta(|m| {
            let tx = m.write(name)?;
            if !tx.lease_exists(name)? {
                return Err(Error::NotFound {
                    key: name.into(),
                    hint: "no such lease; create it first".into(),
                });
            }
            for key in keys {
                check_key("key", key)?;
                let id = tx
                    .row_by_key_or_image(key)?
                    .ok_or_else(|| Error::NotFound {
                        key: (*key).into(),
                        hint: format!("cannot add it to lease {name:?}"),
                    })?
                    .id;
                tx.lease_add(name, id)?;
            }
            tx.commit()
        })
    }

    /// Removes lease `name`; what it held is collected by the next gc unless held otherwise.
    pub fn lease_remove(&self, name: &str) -> Result<()> {
        check_key("lease", name)?;
        self.with_meta(|m| {
            let tx = m.write(name)?;
            if !tx.delete_lease(name)? {
                return Err(Error::NotFound {
                    key: name.into(),
                    hint: "no such lease".into(),
                });
            }
            tx.commit()
        })
    }

    /// Every lease with its expiry and the snapshots it holds.
    pub fn leases(&self) -> Result<Vec<LeaseInfo>> {
        self.with_meta(|m| m.read("")?.leases())
    }

    /// Removes every Committed snapshot that no gc root reaches, children before parents,
    /// then reclaims storage. Each removal re-checks its snapshot in its own transaction, so
    /// gc is safe beside any other operation; a failure is reported and the pass goes on.
    /// With `dry_run`, nothing changes and the report lists what would go.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        let now = SystemTime::now();
        let mut report = GcReport::default();
        if self.managed()? {
            // containerd decides which snapshots live; strata only reclaims what no row
            // refers to.
            report.managed = true;
            if !dry_run {
                report.flattened = self.collect_flats()?;
                let cleanup = self.cleanup_report()?;
                report.reclaimed = cleanup.reclaimed.len();
                report.failed.extend(
                    cleanup
                        .failed
                        .into_iter()
                        .map(|(id, e)| (format!("storage of id {id}"), e)),
                );
            }
            return Ok(report);
        }
        let candidates = self.with_meta(|m| m.read("")?.unreachable(now))?;
        if dry_run {
            report.removed = candidates.into_iter().map(|(_, k)| k).collect();
            return Ok(report);
        }
        report.expired_leases = self.with_meta(|m| {
            let tx = m.write("")?;
            let names = tx.delete_expired_leases(now)?;
            tx.commit()?;
            Ok(names)
        })?;
        for (id, key) in candidates {
            let removed = self.freeing(|| {
                self.with_meta(|m| {
                    let tx = m.write(&key)?;
                    // Re-check: something may have taken hold of it since the scan.
                    let row = tx.row_by_id(id)?;
                    let still = matches!(&row, Some(r) if r.kind == Kind::Committed && r.key == key)
                        && !tx.has_children(id)?
                        && tx.pending_op(id)?.is_none()
                        && tx.holder(id, now)?.is_none()
                        && !tx.is_gc_root(id)?;
                    if still {
                        tx.delete(id)?;
                        tx.commit()?;
                    }
                    Ok(still)
                })
            });
            match removed {
                Ok(true) => report.removed.push(key),
                Ok(false) => report.kept.push(key),
                Err(e) => report.failed.push((key, e.to_string())),
            }
        }
        match self.collect_flats() {
            Ok(n) => report.flattened = n,
            Err(e) => report
                .failed
                .push(("flattened lowers".into(), e.to_string())),
        }
        let cleanup = self.cleanup_report()?;
        report.reclaimed = cleanup.reclaimed.len();
        report.failed.extend(
            cleanup
                .failed
                .into_iter()
                .map(|(id, e)| (format!("storage of id {id}"), e)),
        );
        match self.gc_blobs() {
            Ok(n) => report.blobs = n,
            Err(e) => report.failed.push(("content store".into(), e.to_string())),
        }
        // Given back to a full disk by a remove? Taken again if there is room now.
        self.keep_reserve();
        Ok(report)
    }
}

/// The `meta` entry that says who manages the store's snapshots.
const MANAGED_META: &str = "managed_by";

/// Lease names of export guards start with this, then the owner's token and a counter, so
/// that the guards of a dead process can be found and dropped.
pub(crate) const GUARD_PREFIX: &str = "strata.io/guard/";

/// Lease names of imports start with this, then the owner's token and a counter: an import
/// killed half way leaves its lease (holding the layers it applied) to the next recovery.
pub(crate) const IMPORT_PREFIX: &str = "strata.io/import/";

/// Keys of the Active snapshots `apply_layer` applies into start with this, then the owner's
/// token and a counter: one whose process died is nobody's, and recovery removes it.
pub(crate) const APPLY_PREFIX: &str = "strata.io/apply/";

/// That lease `lease` exists and has not expired (an expired lease holds nothing), checked
/// in the transaction that is about to make it hold something; `what` says what the caller
/// was going to put in it.
pub(crate) fn check_live_lease(tx: &crate::meta::Tx<'_>, lease: &str, what: &str) -> Result<()> {
    match tx.lease_expiry(lease)? {
        None => Err(Error::NotFound {
            key: lease.into(),
            hint: format!("no such lease, so {what} was not made; create the lease first (strata lease create)"),
        }),
        Some(Some(at)) if at <= std::time::SystemTime::now() => Err(Error::precondition(
            lease,
            format!(
                "the lease expired {} s ago and holds nothing, so {what} was not made; create a new lease (strata lease create --expire D)",
                at.elapsed().map(|d| d.as_secs()).unwrap_or_default()
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// One layer pinned by an [`ExportGuard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedLayer {
    /// The image that needs it.
    pub image: String,
    /// The layer's snapshot name.
    pub name: String,
    /// Its position in the image, 0 = the bottom layer.
    pub index: usize,
    /// Its snapshot id: the number the backend stores it under.
    pub id: u64,
    /// The backend's directory of the layer's own content, when it has one.
    pub path: Option<std::path::PathBuf>,
}

/// Every layer of some images, pinned: while it lives, gc and remove cannot delete any of
/// them. Dropping it (or [`ExportGuard::release`]) lets them go.
pub struct ExportGuard<'a, B: Backend> {
    store: &'a Store<B>,
    lease: String,
    layers: Vec<GuardedLayer>,
    released: bool,
}

impl<B: Backend> std::fmt::Debug for ExportGuard<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportGuard")
            .field("lease", &self.lease)
            .field("layers", &self.layers)
            .finish()
    }
}

impl<B: Backend> ExportGuard<'_, B> {
    /// The pinned layers, image by image, bottom layer first.
    pub fn layers(&self) -> &[GuardedLayer] {
        &self.layers
    }

    /// The lease that holds the layers.
    pub fn lease(&self) -> &str {
        &self.lease
    }

    /// Releases the layers now, reporting a failure (drop only logs it).
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.store.lease_remove(&self.lease)
    }
}

impl<B: Backend> Drop for ExportGuard<'_, B> {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.store.lease_remove(&self.lease) {
                tracing::warn!(lease = %self.lease, error = %e, "releasing an export guard failed; the next open or cleanup drops it");
            }
        }
    }
}

impl<B: Backend> Store<B> {
    /// Pins every layer of every image in `images` (image names, or names of Committed
    /// snapshots) and checks that each exists, is Committed, is not broken, and that the
    /// backend still has its storage. On success nothing can delete those layers until the
    /// guard is dropped. On failure nothing stays pinned and the error names the image, the
    /// layer and why — before the caller has written a byte.
    pub fn guard(&self, images: &[&str]) -> Result<ExportGuard<'_, B>> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let lease = format!(
            "{GUARD_PREFIX}{}/{}",
            self.owner.token,
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut pinned: Vec<(GuardedLayer, u64)> = Vec::new();
        self.with_meta(|m| {
            let tx = m.write("")?;
            tx.create_lease(&lease, None)?;
            for image in images {
                check_key("image", image)?;
                let top = match tx.image(image)? {
                    Some(id) => id,
                    None => match tx.row_by_key(image)? {
                        Some(row) => row.id,
                        None => {
                            return Err(Error::NotFound {
                                key: (*image).into(),
                                hint: "no such image or snapshot to export".into(),
                            });
                        }
                    },
                };
                let mut chain = tx.chain(Some(top))?;
                chain.reverse();
                for (index, id) in chain.into_iter().enumerate() {
                    let row = tx.row_by_id(id)?.ok_or_else(|| Error::Broken {
                        key: format!("id {id}"),
                        reason: format!("layer {index} of {image:?} has no metadata"),
                    })?;
                    if row.kind != Kind::Committed {
                        return Err(Error::precondition(
                            &row.key,
                            format!("layer {index} of {image:?} is {}, not committed", row.kind),
                        ));
                    }
                    if let Some(reason) = row.broken {
                        return Err(Error::Broken {
                            key: row.key,
                            reason: format!("layer {index} of {image:?}: {reason}"),
                        });
                    }
                    tx.lease_add(&lease, id)?;
                    pinned.push((
                        GuardedLayer {
                            image: (*image).to_string(),
                            name: row.key,
                            index,
                            id,
                            path: None,
                        },
                        id,
                    ));
                }
            }
            tx.commit()
        })?;
        let mut guard = ExportGuard {
            store: self,
            lease,
            layers: Vec::with_capacity(pinned.len()),
            released: false,
        };
        // Ask the backend, not the rows: storage can be lost behind the metadata's back.
        for (mut layer, id) in pinned {
            // One "no" is asked again after a moment before the layer is marked broken for
            // good: a backend's look at its storage may race with another process's use of it.
            let mut present = false;
            for attempt in 0..3 {
                if attempt > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                present = self
                    .backend
                    .exists(id)
                    .map_err(|e| self.backend_err(&layer.name, "check the storage", e))?;
                if present {
                    break;
                }
            }
            if !present {
                let reason = format!(
                    "its storage is missing from the {} backend (layer {} of {:?})",
                    self.backend.name(),
                    layer.index,
                    layer.image
                );
                self.mark_broken(id, &layer.name, &reason);
                return Err(Error::Broken {
                    key: layer.name,
                    reason,
                });
            }
            layer.path = self.backend.layer_path(id);
            guard.layers.push(layer);
        }
        Ok(guard)
    }
}
