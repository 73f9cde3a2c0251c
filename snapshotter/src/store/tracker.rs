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
    /// What could not be removed, with the error; retried by the next pass.
    pub failed: Vec<(String, String)>,
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

    /// Deletes image `name`; its layers stay until gc finds nothing else holds them.
    pub fn untag(&self, name: &str) -> Result<()> {
        check_key("image", name)?;
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
                let id = match tx.row_by_key(key)? {
                    Some(row) => row.id,
                    None => tx.image(key)?.ok_or_else(|| Error::NotFound {
                        key: (*key).into(),
                        hint: format!("cannot add it to lease {name:?}"),
                    })?,
                };
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
            let removed = self.with_meta(|m| {
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
            });
            match removed {
                Ok(true) => report.removed.push(key),
                Ok(false) => report.kept.push(key),
                Err(e) => report.failed.push((key, e.to_string())),
            }
        }
        let cleanup = self.cleanup_report()?;
        report.reclaimed = cleanup.reclaimed.len();
        report.failed.extend(
            cleanup
                .failed
                .into_iter()
                .map(|(id, e)| (format!("storage of id {id}"), e)),
        );
        Ok(report)
    }
}
