//! Recovery and `fsck`: what a crash, a reboot or a lost disk can leave behind, found and
//! (where it loses no committed data) repaired.
//!
//! * journal entries of dead processes — rolled back or forward;
//! * storage without a row (and no operation in flight) — reclaimed;
//! * rows whose storage is missing — rebuilt where it was recorded without a sync because it
//!   held nothing (an empty committed layer; an Active snapshot or View from before the
//!   boot, see [`crate::backend::Backend::fresh_is_rebuildable`]); otherwise marked broken:
//!   never exported, reported, removable;
//! * export guards and import leases of dead processes — dropped;
//! * the Active snapshots apply-layer runs of dead processes applied into — removed (out of
//!   the caller's lease first: nobody can commit them);
//! * mounts of this store's snapshots leaked by dead processes ([`crate::mount::TempMount`]
//!   directories) — unmounted.
//!
//! A store runs the repair when it opens (unless [`crate::StoreOptions::recover`] is off);
//! [`Store::fsck`] inspects without changing anything, or repairs and says what it did.

use std::collections::HashSet;
use std::path::PathBuf;

use super::tracker::{APPLY_PREFIX, GUARD_PREFIX, IMPORT_PREFIX};
use super::{dead_owner, Store};
use crate::backend::{Backend, CreateOptions};
use crate::error::{Error, Result};
use crate::meta::Row;
use crate::types::Kind;

/// Taken while storage is rebuilt, so that two processes recovering at once do not both.
const REBUILD_LOCK: &str = "rebuild.lock";

/// What [`Store::fsck`] found, and with `repair`, what it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsckReport {
    /// Ids with storage but no row and no operation in flight: removed snapshots whose
    /// storage `remove` left to [`crate::Snapshotter::cleanup`] (containerd's model; `gc` and the
    /// next open reclaim it too). Garbage, not damage: it does not make the report unclean.
    pub orphans: Vec<u64>,
    /// Spares with their storage in place: made by a commit for the next prepare on that
    /// layer to take (btrfs), not snapshots. A spare whose storage is missing is dropped
    /// (with repair): the next prepare then makes its snapshot the usual way.
    pub spares: Vec<u64>,
    /// Flattened lowers with their storage in place (see [`Store::flattened`]): merged
    /// copies of deep chains' bottom layers, not snapshots. One whose storage is missing is
    /// dropped (with repair) and built again when a mount needs it.
    pub flattened: Vec<u64>,
    /// Snapshots whose storage is missing or that were marked broken, with the reason.
    pub broken: Vec<(String, String)>,
    /// Interrupted operations of dead processes, as `op key`.
    pub interrupted: Vec<String>,
    /// Snapshots recorded without a sync whose storage a power loss took (empty committed
    /// layers; Active snapshots and Views from before the boot): rebuilt by the repair.
    pub lost_unsynced: Vec<String>,
    /// Export guards and import leases whose process is gone.
    pub stale_guards: Vec<String>,
    /// Active snapshots of apply-layer runs whose process is gone (`strata.io/apply/…`):
    /// removed by the repair.
    pub abandoned_applies: Vec<String>,
    /// Mounts left by dead processes.
    pub leaked_mounts: Vec<PathBuf>,
    /// What the repair did, one line each.
    pub repaired: Vec<String>,
    /// What the repair could not do, one line each.
    pub failed: Vec<String>,
}

impl FsckReport {
    /// True when nothing is wrong (broken snapshots count as wrong until removed; storage
    /// awaiting cleanup does not).
    pub fn is_clean(&self) -> bool {
        self.broken.is_empty()
            && self.lost_unsynced.is_empty()
            && self.interrupted.is_empty()
            && self.stale_guards.is_empty()
            && self.abandoned_applies.is_empty()
            && self.leaked_mounts.is_empty()
            && self.failed.is_empty()
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl<B: Backend> Store<B> {
    /// Checks the store: journal, storage against rows, guards, mounts. With `repair`, fixes
    /// what can be fixed without losing committed data (see the module docs) and lists it in
    /// [`FsckReport::repaired`]; without, changes nothing.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        let mut r = FsckReport::default();

        // Interrupted operations of dead processes.
        let entries = self.with_meta(|m| m.read("")?.journal())?;
        for e in &entries {
            if e.owner != self.owner.token && dead_owner(&self.root, &e.owner).is_some() {
                r.interrupted.push(format!("{} {}", e.op.as_str(), e.key));
            }
        }
        if repair && !r.interrupted.is_empty() {
            let n = self.reconcile_journal(false)?;
            r.repaired.push(format!(
                "rolled back or forward {n} interrupted operation(s)"
            ));
        }

        // Export guards and import leases of dead processes.
        let mut guards = Vec::new();
        for prefix in [GUARD_PREFIX, IMPORT_PREFIX] {
            for lease in self.with_meta(|m| m.read("")?.leases_with_prefix(prefix))? {
                let token = lease[prefix.len()..]
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                guards.push((lease, token));
            }
        }
        for (lease, token) in guards {
            if token != self.owner.token && dead_owner(&self.root, &token).is_some() {
                if repair {
                    match self.lease_remove(&lease) {
                        Ok(()) => r.repaired.push(format!(
                            "dropped stale export guard or import lease {lease}"
                        )),
                        Err(e) => r.failed.push(format!("lease {lease}: {e}")),
                    }
                }
                r.stale_guards.push(lease);
            }
        }

        // The snapshots of apply-layer runs of dead processes: an apply killed before its
        // commit leaves one, held by the caller's lease, that nothing will ever commit.
        let applies: Vec<String> = crate::snapshotter::Snapshotter::list(self, &["kind==active"])?
            .into_iter()
            .map(|i| i.name)
            .filter(|k| k.starts_with(APPLY_PREFIX))
            .collect();
        for key in applies {
            let token = key[APPLY_PREFIX.len()..]
                .split('/')
                .next()
                .unwrap_or_default();
            if token == self.owner.token || dead_owner(&self.root, token).is_none() {
                continue;
            }
            if repair {
                let removed = self
                    .with_meta(|m| {
                        let tx = m.write(&key)?;
                        if let Some(row) = tx.row_by_key(&key)? {
                            tx.lease_drop_everywhere(row.id)?;
                        }
                        tx.commit()
                    })
                    .and_then(|()| crate::snapshotter::Snapshotter::remove(self, &key));
                match removed {
                    Ok(()) => r
                        .repaired
                        .push(format!("removed {key}, the snapshot of a dead apply-layer")),
                    // Another process's recovery was first.
                    Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
                    Err(e) => r.failed.push(format!("{key}: {e}")),
                }
            }
            r.abandoned_applies.push(key);
        }

        // Storage against rows: list storage first, then metadata (see cleanup_report).
        let ids: HashSet<u64> = self
            .backend
            .ids()
            .map_err(|e| self.backend_err("", "list storage", e))?
            .into_iter()
            .collect();
        let (rows, known, spares, flats) = self.with_meta(|m| {
            let tx = m.read("")?;
            Ok((
                tx.all_rows()?,
                tx.known_ids()?,
                tx.all_spares()?,
                tx.all_flats()?,
            ))
        })?;
        for flat in flats {
            let present = ids.contains(&flat.id)
                || self
                    .backend
                    .exists(flat.id)
                    .map_err(|e| self.backend_err("", "check a flattened lower's storage", e))?;
            if present {
                r.flattened.push(flat.id);
            } else if repair {
                self.with_meta(|m| {
                    let tx = m.write("")?;
                    tx.flat_drop(flat.id)?;
                    tx.commit()
                })?;
                r.repaired.push(format!(
                    "dropped flattened lower {} (of {} layers), whose storage is missing; it is built again when a mount needs it",
                    flat.id, flat.depth
                ));
            }
        }
        for spare in spares {
            let present = ids.contains(&spare)
                || self
                    .backend
                    .exists(spare)
                    .map_err(|e| self.backend_err("", "check a spare's storage", e))?;
            if present {
                r.spares.push(spare);
            } else if repair {
                self.with_meta(|m| {
                    let tx = m.write("")?;
                    tx.spare_drop(spare)?;
                    tx.commit()
                })?;
                r.repaired
                    .push(format!("dropped spare {spare}, whose storage is missing"));
            }
        }
        // Storage listed before the metadata was read and unknown to it is orphaned only if
        // it is still there: a remove in flight when the storage was listed deletes its row,
        // then the storage, then its journal entry, all before the metadata may be read.
        for id in ids.iter().copied().filter(|id| !known.contains(id)) {
            if self
                .backend
                .exists(id)
                .map_err(|e| self.backend_err("", "check orphaned storage", e))?
            {
                r.orphans.push(id);
            }
        }
        r.orphans.sort_unstable();
        if repair && !r.orphans.is_empty() {
            let report = self.cleanup_report()?;
            if !report.reclaimed.is_empty() {
                r.repaired.push(format!(
                    "reclaimed the storage of {} orphaned snapshot(s)",
                    report.reclaimed.len()
                ));
            }
            r.failed.extend(
                report
                    .failed
                    .into_iter()
                    .map(|(id, e)| format!("storage of id {id}: {e}")),
            );
        }
        let booted = crate::fsutil::boot_time().ok();
        for row in rows {
            let (id, key) = (row.id, row.key.clone());
            match row.broken {
                Some(reason) => r.broken.push((key, reason)),
                None if !ids.contains(&id) => {
                    let present = self
                        .backend
                        .exists(id)
                        .map_err(|e| self.backend_err(&key, "check the storage", e))?;
                    if present {
                        continue; // created after the listing
                    }
                    // Storage recorded without a sync may have been lost with the power: an
                    // empty committed layer (its content is known: nothing), or an Active
                    // snapshot or View from before this boot (their content carries no
                    // promise). Made again, as they were.
                    let before_boot = booted.is_some_and(|b| row.created < b);
                    if row.rebuildable && (row.kind == Kind::Committed || before_boot) {
                        let what = format!(
                            "the storage of {key:?} ({}, recorded without a sync), lost with a power loss",
                            row.kind
                        );
                        if repair {
                            match self.rebuild(&row) {
                                Ok(()) => r.repaired.push(format!("rebuilt {what}")),
                                Err(e) => r.failed.push(format!("rebuild {what}: {e}")),
                            }
                        }
                        r.lost_unsynced.push(key);
                        continue;
                    }
                    // Anything else was synced before its row was recorded: this storage was
                    // lost.
                    let reason = format!(
                        "its storage is missing from the {} backend",
                        self.backend.name()
                    );
                    if repair {
                        self.mark_broken(id, &key, &reason);
                        r.repaired.push(format!("marked {key:?} broken: {reason}"));
                    }
                    r.broken.push((key, reason));
                }
                None => {}
            }
        }

        // Mounts leaked by dead processes (TempMount directories) that present this
        // store's snapshots, or that are in this store's root (the store makes its own under
        // ROOT/tmp; a device's mount — devmapper — names no path of the store). Mounts of
        // other stores are theirs to repair.
        let root = std::fs::canonicalize(&self.root)
            .map_err(|e| crate::Error::io(&self.root, "resolve the store root", e))?;
        let mounts = crate::mount::list_mounts()
            .map_err(|e| crate::Error::io("/proc/self/mountinfo", "read the mount table", e))?;
        for m in mounts.iter().rev() {
            let dead = crate::mount::temp_mount_pid(&m.target).is_some_and(|pid| !pid_alive(pid));
            if !dead || !(m.target.starts_with(&root) || m.refers_to(&root, &mounts)) {
                continue;
            }
            if repair {
                match rustix::mount::unmount(&m.target, rustix::mount::UnmountFlags::DETACH) {
                    Ok(()) => {
                        let _ = std::fs::remove_dir(&m.target);
                        r.repaired
                            .push(format!("unmounted leaked mount {}", m.target.display()));
                    }
                    Err(e) => r
                        .failed
                        .push(format!("unmount {}: {e}", m.target.display())),
                }
            }
            r.leaked_mounts.push(m.target.clone());
        }
        Ok(r)
    }

    /// Makes the storage of `row` again, as [`Backend::create`] (and for a committed layer,
    /// [`Backend::commit`]) made it, this time synced. Only for rows recorded `rebuildable`.
    fn rebuild(&self, row: &Row) -> Result<()> {
        let lock_path = self.root.join(REBUILD_LOCK);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, "open the rebuild lock", e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io(&lock_path, "lock the rebuild lock", e.into()))?;
        let key = row.key.as_str();
        // Another process may have rebuilt it while this one waited.
        if self
            .backend
            .exists(row.id)
            .map_err(|e| self.backend_err(key, "check the storage", e))?
        {
            return Ok(());
        }
        let parents = self.with_meta(|m| m.read(key)?.chain(row.parent_id))?;
        let kind = match row.kind {
            Kind::Committed => Kind::Active,
            k => k,
        };
        let opts = CreateOptions {
            volatile: row.volatile && row.kind == Kind::Active,
            durable: true,
        };
        self.backend
            .create(row.id, kind, &parents, &opts)
            .map_err(|e| self.backend_err(key, "rebuild", e))?;
        if row.kind == Kind::Committed {
            self.backend
                .commit(row.id, &parents, true)
                .map_err(|e| self.backend_err(key, "rebuild", e))?;
        }
        tracing::warn!(key, id = row.id, kind = %row.kind, "rebuilt storage a power loss took");
        Ok(())
    }
}
