//! [`Store`]: the one implementation of [`Snapshotter`], over any [`Backend`].
//!
//! The store owns the metadata and the journal; the backend only stores and mounts numeric
//! ids. Every operation that touches storage follows the same protocol:
//!
//! 1. a write transaction checks the request, allocates the id and records a journal entry
//!    `(operation, id, key)` — the entry also reserves the key against other processes;
//! 2. the backend does its work in a temporary place and renames it into place (with
//!    [`StoreOptions::durable`], syncing it first);
//! 3. a second transaction records the result and deletes the journal entry.
//!
//! A process that dies between 1 and 3 leaves a journal entry whose owner is gone: every
//! process holds an exclusive `flock` on `owners/<token>.lock` while its store is open, so
//! another process can tell a dead owner from a live one. Such entries are rolled back (or
//! forward) on open and by [`Snapshotter::cleanup`].
//!
//! **Guarantee.** A SIGKILL at any point loses nothing that was reported committed. With
//! `durable` (the default) a power loss may roll back only whole, most recent operations and
//! never leaves a row pointing at lost or partial storage, because storage is synced before
//! the transaction that records it; storage left without a row is reclaimed by `cleanup`.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::backend::{Backend, CreateOptions, JournalOp};
use crate::error::{BackendError, Error, Result};
use crate::filter::Filter;
use crate::idmap::IdMap;
use crate::meta::{self, Meta, Row};
use crate::snapshotter::Snapshotter;
use crate::types::{Info, Kind, Labels, Mount, Usage};
use crate::LABEL_VOLATILE;

mod copying;
mod flats;
mod idmapped;
mod images;
mod layers;
mod recovery;
mod reserve;
mod tracker;

pub use flats::FlattenedLower;
pub use recovery::FsckReport;

pub use images::{ExportOptions, ExportReport, ImportReport, VerifyReport};
pub use layers::AppliedLayer;
pub use tracker::{ExportGuard, GcReport, GuardedLayer, LeaseInfo};

/// How a store behaves.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long to wait for another process or thread holding the database before failing
    /// with a "busy" error. Default: 10 s.
    pub lock_timeout: Duration,
    /// Sync storage before recording it (see the module docs). Default: on. Turning it off
    /// keeps the SIGKILL guarantee but not the power-loss one.
    pub durable: bool,
    /// Delete storage in `remove` itself instead of leaving it to `cleanup`. Default: off
    /// (removal is a metadata operation, like containerd's).
    pub sync_remove: bool,
    /// Repair what dead processes and lost storage left behind when opening (see
    /// [`Store::fsck`]). Default: on; `fsck` turns it off to look before it repairs.
    pub recover: bool,
    /// Apply layers through a mount of the snapshot even where the backend lets them be
    /// written straight into its storage (overlay's upper directory). Default: off; the tests
    /// use it to compare the two.
    pub apply_mounted: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            lock_timeout: Duration::from_secs(10),
            durable: true,
            sync_remove: false,
            recover: true,
            apply_mounted: false,
        }
    }
}

/// What [`Store::cleanup_report`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Ids whose storage was reclaimed.
    pub reclaimed: Vec<u64>,
    /// Interrupted operations rolled back or forward (journal entries of dead processes).
    pub reconciled: usize,
    /// Ids whose storage could not be reclaimed, with the error; retried next time.
    pub failed: Vec<(u64, String)>,
}

/// A snapshot store: metadata plus a backend, rooted at one directory.
pub struct Store<B: Backend> {
    root: PathBuf,
    backend: B,
    meta: Mutex<Option<Meta>>,
    owner: Owner,
    opts: StoreOptions,
}

/// This store's identity in the journal, and the lock that proves it is alive.
struct Owner {
    pub(crate) token: String,
    lock_path: PathBuf,
    _lock: fs::File,
}

const OWNERS_DIR: &str = "owners";
const BACKEND_META: &str = "backend";

impl Owner {
    fn create(root: &Path) -> Result<Owner> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = root.join(OWNERS_DIR);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create the owners directory", e))?;
        let token = format!(
            "{}-{}-{}",
            std::process::id(),
            meta::to_ns(SystemTime::now()),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let lock_path = dir.join(format!("{token}.lock"));
        // Lock the file under a temporary name and rename it into place: a `.lock` file is
        // never visible unlocked, so no other process can take a live owner for a dead one.
        let tmp_path = dir.join(format!(".{token}.new"));
        let lock = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&tmp_path)
            .map_err(|e| Error::io(&tmp_path, "create the owner lock", e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| Error::io(&tmp_path, "lock the owner lock", e.into()))?;
        fs::rename(&tmp_path, &lock_path)
            .map_err(|e| Error::io(&lock_path, "publish the owner lock", e))?;
        Ok(Owner {
            token,
            lock_path,
            _lock: lock,
        })
    }
}

/// Holds the lock of a dead owner while its journal entries are reconciled.
pub(crate) struct DeadOwner {
    path: PathBuf,
    _lock: Option<fs::File>,
}

/// Returns a handle when `token`'s process is gone (its lock file is missing or unlocked).
pub(crate) fn dead_owner(root: &Path, token: &str) -> Option<DeadOwner> {
    let path = root.join(OWNERS_DIR).join(format!("{token}.lock"));
    match fs::OpenOptions::new().write(true).open(&path) {
        Err(_) => Some(DeadOwner { path, _lock: None }),
        Ok(f) => {
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
            Some(DeadOwner {
                path,
                _lock: Some(f),
            })
        }
    }
}

/// The journal key of spare `id`: NUL-prefixed, so no snapshot key can take it.
fn spare_key(id: u64) -> String {
    format!("\0spare {id}")
}

/// What step 1 of a create did.
enum Created {
    /// Took a spare as the new snapshot's storage and recorded it: id, parent chain.
    Taken(u64, Vec<u64>),
    /// Allocated an id and journaled the create: id, parent, parent chain, journal seq.
    Journaled(u64, Option<u64>, Vec<u64>, i64),
}

pub(crate) fn check_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid(format!("{what} \"\""), "must not be empty"));
    }
    if key.contains('\0') {
        return Err(Error::invalid(
            format!("{what} {key:?}"),
            "must not contain a NUL byte",
        ));
    }
    Ok(())
}

/// Active snapshot keys under [`tracker::APPLY_PREFIX`] are apply-layer's own: recovery
/// removes those of dead processes, so nobody else may make one.
fn check_not_reserved(key: &str) -> Result<()> {
    if key.starts_with(tracker::APPLY_PREFIX) {
        return Err(Error::invalid(
            format!("key {key:?}"),
            format!(
                "keys under {} are strata's own (apply-layer's, removed when their process is gone); choose another key",
                tracker::APPLY_PREFIX
            ),
        ));
    }
    Ok(())
}

#[cfg(feature = "failpoints")]
fn failpoint(name: &str) {
    if std::env::var("STRATA_FAILPOINT").is_ok_and(|v| v == name) {
        tracing::warn!(failpoint = name, "failpoint reached: killing the process");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn failpoint(_name: &str) {}

impl<B: Backend> Store<B> {
    /// Opens the store at `root` (creating it when new) over `backend`, and reconciles what
    /// dead processes left behind.
    ///
    /// The backend is recorded in the root the first time; opening it later with another
    /// backend is an error.
    pub fn open(root: &Path, backend: B, opts: StoreOptions) -> Result<Store<B>> {
        fs::create_dir_all(root).map_err(|e| Error::io(root, "create the store root", e))?;
        let mut meta = Meta::open(root, opts.lock_timeout)?;
        let mut recorded = meta.read("")?.meta_value(BACKEND_META)?;
        if recorded.is_none() {
            // A new root: record the backend (another process may be doing the same).
            let tx = meta.write("")?;
            recorded = tx.meta_value(BACKEND_META)?;
            if recorded.is_none() {
                tx.set_meta_value(BACKEND_META, backend.name())?;
                tx.commit()?;
            }
        }
        if let Some(recorded) = recorded.filter(|r| r != backend.name()) {
            return Err(Error::invalid(
                format!("backend {:?}", backend.name()),
                format!(
                    "the store at {} was created with the {recorded:?} backend; use --backend {recorded} or another root",
                    root.display()
                ),
            ));
        }
        let store = Store {
            root: root.to_path_buf(),
            owner: Owner::create(root)?,
            backend,
            meta: Mutex::new(Some(meta)),
            opts,
        };
        if store.opts.recover {
            let report = store.fsck(true)?;
            for line in &report.repaired {
                tracing::info!(root = %root.display(), "recovery: {line}");
            }
            for line in &report.failed {
                tracing::warn!(root = %root.display(), "recovery: {line}");
            }
            store.remove_dead_owner_files();
        }
        store.keep_reserve();
        Ok(store)
    }

    /// The backend recorded in `root`, if a store exists there.
    pub fn recorded_backend(root: &Path) -> Result<Option<String>> {
        if !root.join(meta::DB_FILE).exists() {
            return Ok(None);
        }
        let mut meta = Meta::open(root, StoreOptions::default().lock_timeout)?;
        let tx = meta.read("")?;
        tx.meta_value(BACKEND_META)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    fn meta(&self) -> Result<MutexGuard<'_, Option<Meta>>> {
        let guard = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(Error::Closed);
        }
        Ok(guard)
    }

    pub(crate) fn backend_err<E: BackendError>(&self, key: &str, op: &'static str, e: E) -> Error {
        Error::backend(key, op, self.backend.name(), e)
    }

    /// Mounts the committed `chain` (top first) read-only under `ROOT/tmp` through
    /// [`Backend::view_mounts`]; `name` and `op` name it in errors. The backend is told when
    /// the mount is gone ([`Backend::release_view`]), whatever way the reader ends.
    pub(crate) fn mount_view(
        &self,
        name: &str,
        chain: &[u64],
        op: &'static str,
    ) -> Result<ChainView<'_, B>> {
        let tmp = self.root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        let mounts = self
            .backend
            .view_mounts(chain)
            .map_err(|e| self.backend_err(name, op, e))?;
        let mut view = ChainView {
            backend: &self.backend,
            chain: chain.to_vec(),
            mount: None,
        };
        view.mount = Some(crate::mount::TempMount::new_in(&tmp, &mounts)?);
        Ok(view)
    }

    /// Runs `f` with the open database.
    pub(crate) fn with_meta<T>(&self, f: impl FnOnce(&mut Meta) -> Result<T>) -> Result<T> {
        let mut guard = self.meta()?;
        match guard.as_mut() {
            Some(m) => f(m),
            None => Err(Error::Closed),
        }
    }

    /// Like [`Snapshotter::prepare`], with the new Active snapshot held by lease `lease`
    /// from the transaction that creates it: no moment exists at which another process —
    /// containerd's gc on a served store, which removes every snapshot it does not know —
    /// can remove it. A builder's way to prepare beside such a remover; the lease must
    /// exist.
    pub fn prepare_in(
        &self,
        lease: &str,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        check_not_reserved(key)?;
        self.create(Kind::Active, key, parent, labels, Some(lease))
    }

    pub(crate) fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        lease: Option<&str>,
    ) -> Result<Vec<Mount>> {
        check_key("key", key)?;
        if let Some(l) = lease {
            check_key("lease", l)?;
        }
        let parent = parent.filter(|p| !p.is_empty());
        if let Some(p) = parent {
            check_key("parent", p)?;
        }
        let idmap = IdMap::from_labels(&labels)?;
        let volatile = labels.get(LABEL_VOLATILE).is_some_and(|v| v == "true");
        if volatile && kind != Kind::Active {
            return Err(Error::invalid(
                format!("label {LABEL_VOLATILE}"),
                format!("only Active snapshots can be volatile, {key:?} would be a view"),
            ));
        }

        // A reserve given back to a full disk is taken again once there is room.
        self.keep_reserve();
        // Storage the backend can make again from the row is not synced (see
        // Backend::fresh_is_rebuildable); recovery rebuilds it if a power loss takes it.
        let rebuildable = kind != Kind::Committed && self.backend.fresh_is_rebuildable();
        // The row a new snapshot gets, once its storage is there.
        let new_row = |id: u64, parent_id: Option<u64>, rebuildable: bool| {
            let now = SystemTime::now();
            Row {
                id,
                key: key.into(),
                kind,
                parent_id,
                created: now,
                updated: now,
                usage: None,
                volatile,
                broken: None,
                rebuildable,
            }
        };

        // The lease, checked in each transaction that adds to it (it may go in between).
        let check_lease = |tx: &crate::meta::Tx<'_>| -> Result<()> {
            match lease {
                Some(l) => tracker::check_live_lease(tx, l, &format!("snapshot {key:?}")),
                None => Ok(()),
            }
        };
        let add_to_lease = |tx: &crate::meta::Tx<'_>, id: u64| -> Result<()> {
            match lease {
                Some(l) => tx.lease_add(l, id),
                None => Ok(()),
            }
        };

        // Step 1: check, allocate, journal.
        let created = self.with_meta(|m| {
            let tx = m.write(key)?;
            if tx.key_taken(key)? {
                return Err(Error::AlreadyExists { key: key.into() });
            }
            check_lease(&tx)?;
            let parent_id = match parent {
                None => None,
                Some(p) => {
                    // An image name stands for its top snapshot.
                    let row = tx.row_by_key_or_image(p)?.ok_or_else(|| Error::NotFound {
                        key: p.into(),
                        hint: format!("parent of {key:?} is neither a snapshot nor an image"),
                    })?;
                    if row.kind != Kind::Committed {
                        return Err(Error::precondition(
                            p,
                            format!(
                                "cannot be the parent of {key:?}: it is {} and only committed snapshots can be parents; commit it first",
                                row.kind
                            ),
                        ));
                    }
                    if let Some(reason) = row.broken {
                        return Err(Error::Broken {
                            key: p.into(),
                            reason,
                        });
                    }
                    Some(row.id)
                }
            };
            let parents = tx.chain(parent_id)?;
            // A spare left by the parent's commit is this snapshot's storage, already made
            // and durable: taking it is the whole create. One whose storage is gone (deleted
            // behind strata's back) is dropped and the snapshot made the usual way.
            if let (Kind::Active, false, Some(p)) = (kind, volatile, parent_id) {
                while let Some(spare) = tx.spare_take(p)? {
                    if !self.backend.exists(spare).unwrap_or(false) {
                        tracing::warn!(key, spare, "a spare's storage is missing; making the snapshot instead");
                        continue;
                    }
                    tx.insert(&new_row(spare, parent_id, false), &labels)?;
                    add_to_lease(&tx, spare)?;
                    tx.commit()?;
                    return Ok(Created::Taken(spare, parents));
                }
            }
            let id = tx.next_id()?;
            let seq = tx.journal_add(JournalOp::Create, id, key, parent_id, &self.owner.token)?;
            tx.commit()?;
            Ok(Created::Journaled(id, parent_id, parents, seq))
        })?;
        let (id, parent_id, parents, seq) = match created {
            Created::Taken(id, parents) => {
                failpoint("create-after-commit");
                let (mounted, _hold) = self.mount_chain(key, &parents)?;
                let mounts = self
                    .backend
                    .mounts(id, kind, &mounted)
                    .map_err(|e| self.backend_err(key, "mounts", e))?;
                return self.created_mounts(key, id, idmap.as_ref(), mounts, lease);
            }
            Created::Journaled(id, parent_id, parents, seq) => (id, parent_id, parents, seq),
        };
        failpoint("create-before-backend");
        // A chain past the backend's flatten threshold mounts through a flattened lower,
        // built now if it is not there yet (held until the row that holds it is written).
        let (mounted, _hold) = match self.mount_chain(key, &parents) {
            Ok(m) => m,
            Err(e) => {
                self.abandon(key, seq, id);
                return Err(e);
            }
        };

        // Step 2: the backend builds the storage.
        let opts = CreateOptions {
            volatile,
            durable: self.opts.durable && !rebuildable,
        };
        if let Err(e) = self.backend.create(id, kind, &parents, &opts) {
            let err = self.backend_err(key, "create", e);
            self.abandon(key, seq, id);
            return Err(err);
        }
        failpoint("create-after-backend");

        // Step 3: record it.
        let row = new_row(id, parent_id, rebuildable);
        let recorded = self.with_meta(|m| {
            let tx = m.write(key)?;
            check_lease(&tx)?;
            tx.insert(&row, &labels)?;
            add_to_lease(&tx, id)?;
            tx.journal_remove(seq)?;
            tx.commit()
        });
        if let Err(e) = recorded {
            self.abandon(key, seq, id);
            return Err(e);
        }
        failpoint("create-after-commit");
        let mounts = self
            .backend
            .mounts(id, kind, &mounted)
            .map_err(|e| self.backend_err(key, "mounts", e))?;
        self.created_mounts(key, id, idmap.as_ref(), mounts, lease)
    }

    /// The mounts a new snapshot is returned with: idmapped when its labels ask for it. A
    /// snapshot that cannot be presented so is removed again (out of `lease` first, which
    /// [`Store::prepare_in`] put it in): the caller gets the error and no snapshot.
    fn created_mounts(
        &self,
        key: &str,
        id: u64,
        idmap: Option<&IdMap>,
        mounts: Vec<Mount>,
        lease: Option<&str>,
    ) -> Result<Vec<Mount>> {
        let Some(map) = idmap else {
            return Ok(mounts);
        };
        let unlease = || match lease {
            Some(l) => self.with_meta(|m| {
                let tx = m.write(key)?;
                tx.lease_drop(l, id)?;
                tx.commit()
            }),
            None => Ok(()),
        };
        self.idmapped_mounts(key, id, map, mounts).inspect_err(|_| {
            let removed = self
                .idmap_release(id)
                .and_then(|()| unlease())
                .and_then(|()| Snapshotter::remove(self, key));
            if let Err(e) = removed {
                tracing::warn!(key, lease, error = %e, "could not remove a snapshot that cannot be idmapped; remove it by hand (strata remove KEY), after taking it out of its lease (strata lease rm)");
            }
        })
    }

    /// Rolls back a create that failed after its journal entry: removes the storage, then
    /// the entry. If either fails the entry stays and is reconciled later.
    fn abandon(&self, key: &str, seq: i64, id: u64) {
        if let Err(e) = self.backend.remove(id) {
            tracing::warn!(key, id, error = %e, "could not remove the storage of a failed create; cleanup will retry");
            return;
        }
        let cleared = self.with_meta(|m| {
            let tx = m.write(key)?;
            tx.journal_remove(seq)?;
            tx.commit()
        });
        if let Err(e) = cleared {
            tracing::warn!(key, id, error = %e, "could not clear the journal entry of a failed create; cleanup will retry");
        }
    }

    /// Rolls back or forward the journal entries of dead processes (and, with `own`, this
    /// store's own leftovers). Returns how many entries were reconciled.
    pub(crate) fn reconcile_journal(&self, own: bool) -> Result<usize> {
        let entries = self.with_meta(|m| m.read("")?.journal())?;
        let mut done = 0;
        let mut owners: Vec<(String, Option<DeadOwner>)> = Vec::new();
        for entry in entries {
            let is_self = entry.owner == self.owner.token;
            if is_self && !own {
                continue;
            }
            if !is_self {
                let known = owners.iter().position(|(t, _)| *t == entry.owner);
                let idx = match known {
                    Some(i) => i,
                    None => {
                        owners.push((entry.owner.clone(), dead_owner(&self.root, &entry.owner)));
                        owners.len() - 1
                    }
                };
                if owners[idx].1.is_none() {
                    continue; // alive: its operation is still running
                }
            }
            let recorded = self.with_meta(|m| {
                let tx = m.read(&entry.key)?;
                Ok(match (entry.op, tx.row_by_id(entry.id)?) {
                    (JournalOp::Create, row) => row.is_some(),
                    (JournalOp::Commit, Some(row)) => row.kind == Kind::Committed,
                    (JournalOp::Commit, None) | (JournalOp::Remove, _) => false,
                })
            })?;
            tracing::info!(op = entry.op.as_str(), id = entry.id, key = %entry.key, recorded, "reconciling an interrupted operation");
            self.backend
                .reconcile(entry.op, entry.id, recorded)
                .map_err(|e| self.backend_err(&entry.key, "reconcile", e))?;
            self.with_meta(|m| {
                let tx = m.write(&entry.key)?;
                tx.journal_remove(entry.seq)?;
                tx.commit()
            })?;
            done += 1;
        }
        for (_, dead) in owners {
            if let Some(dead) = dead {
                let _ = fs::remove_file(&dead.path);
            }
        }
        Ok(done)
    }

    /// Removes the lock files of owners that are gone (their journal entries and guards
    /// have been dealt with by then).
    fn remove_dead_owner_files(&self) {
        // Owner lock files of processes that died with no journal entries.
        let dir = self.root.join(OWNERS_DIR);
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    continue;
                };
                if name.starts_with('.') && name.ends_with(".new") {
                    // A lock file whose process died before publishing it. A young one may be
                    // a live process between creating and locking it: leave those alone.
                    let path = entry.path();
                    let old = fs::symlink_metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > Duration::from_secs(60));
                    if !old {
                        continue;
                    }
                    if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
                        if rustix::fs::flock(
                            &f,
                            rustix::fs::FlockOperation::NonBlockingLockExclusive,
                        )
                        .is_ok()
                        {
                            let _ = fs::remove_file(&path);
                        }
                    }
                    continue;
                }
                let Some(token) = name.strip_suffix(".lock") else {
                    continue;
                };
                if token == self.owner.token {
                    continue;
                }
                if let Some(dead) = dead_owner(&self.root, token) {
                    let _ = fs::remove_file(&dead.path);
                }
            }
        }
    }

    /// Like [`Snapshotter::cleanup`], returning what was done. Never stops at the first
    /// failure: ids that could not be reclaimed are listed and retried next time.
    pub fn cleanup_report(&self) -> Result<CleanupReport> {
        let reconciled = self.reconcile_journal(false)?;
        // List storage first, then metadata: storage that appears after the listing is not
        // looked at, and storage in the listing got its journal entry before it existed.
        let ids = self
            .backend
            .ids()
            .map_err(|e| self.backend_err("", "list storage", e))?;
        let known: HashSet<u64> = self.with_meta(|m| m.read("")?.known_ids())?;
        let mut report = CleanupReport {
            reconciled,
            ..CleanupReport::default()
        };
        // Idmapped clones of snapshots that are gone, before their storage is reclaimed.
        if let Err(e) = self.idmap_release_stale(&known) {
            tracing::warn!(error = %e, "could not take off stale idmapped mounts; will retry");
        }
        for id in ids.into_iter().filter(|id| !known.contains(id)) {
            match self.backend.remove(id) {
                Ok(()) => report.reclaimed.push(id),
                Err(e) => {
                    tracing::warn!(id, error = %e, "could not reclaim storage; will retry");
                    report.failed.push((id, e.to_string()));
                }
            }
        }
        report.reclaimed.sort_unstable();
        Ok(report)
    }

    pub(crate) fn row(&self, key: &str) -> Result<(Row, Vec<u64>)> {
        check_key("key", key)?;
        self.with_meta(|m| {
            let tx = m.read(key)?;
            let row = tx
                .row_by_key_or_image(key)?
                .ok_or_else(|| Error::not_found(key))?;
            let parents = tx.chain(row.parent_id)?;
            Ok((row, parents))
        })
    }

    /// Records that snapshot `id` is broken (best effort: logged when it fails).
    pub(crate) fn mark_broken(&self, id: u64, key: &str, reason: &str) {
        let r = self.with_meta(|m| {
            let tx = m.write(key)?;
            tx.mark_broken(id, reason)?;
            tx.commit()
        });
        if let Err(e) = r {
            tracing::warn!(key, error = %e, "could not record that the snapshot is broken");
        }
    }

    /// Marks `key` broken in the metadata (best effort) when `err` says its data was lost,
    /// and returns the error to report.
    fn broken(&self, key: &str, id: u64, err: Error) -> Error {
        if err.kind() == crate::ErrorKind::DataLoss {
            self.mark_broken(id, key, &err.to_string());
        }
        err
    }
}

impl<B: Backend> Snapshotter for Store<B> {
    fn prepare(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        check_not_reserved(key)?;
        self.create(Kind::Active, key, parent, labels, None)
    }

    fn view(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels, None)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let (row, parents) = self.row(key)?;
        if row.kind == Kind::Committed {
            return Err(Error::precondition(
                key,
                "committed snapshots are not mounted directly; create a view of it (view KEY PARENT) or prepare a child",
            ));
        }
        if let Some(reason) = row.broken {
            return Err(Error::Broken {
                key: key.into(),
                reason,
            });
        }
        let (mounted, _hold) = self.mount_chain(key, &parents)?;
        let mounts = self
            .backend
            .mounts(row.id, row.kind, &mounted)
            .map_err(|e| self.backend_err(key, "mounts", e))
            .map_err(|e| self.broken(key, row.id, e))?;
        let labels = self.with_meta(|m| m.read(key)?.labels(row.id))?;
        match IdMap::from_labels(&labels)? {
            None => Ok(mounts),
            Some(map) => self.idmapped_mounts(key, row.id, &map, mounts),
        }
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        check_key("name", name)?;
        check_key("key", key)?;
        // A committed snapshot is not mounted: its idmapped clones go (mounts made from them
        // keep working; a commit that fails below gets them again at the next `mounts`).
        if let Ok((row, _)) = self.row(key) {
            if row.kind == Kind::Active {
                self.idmap_release(row.id)?;
            }
        }
        let (row, parents, seq, spare) = self.with_meta(|m| {
            let tx = m.write(key)?;
            let row = tx.row_by_key(key)?.ok_or_else(|| Error::not_found(key))?;
            if row.kind != Kind::Active {
                return Err(Error::precondition(
                    key,
                    format!(
                        "cannot commit a {} snapshot; only active snapshots can be committed",
                        row.kind
                    ),
                ));
            }
            if let Some(reason) = row.broken {
                return Err(Error::Broken {
                    key: key.into(),
                    reason,
                });
            }
            if tx.key_taken(name)? {
                return Err(Error::AlreadyExists { key: name.into() });
            }
            if let Some(op) = tx.pending_op(row.id)? {
                return Err(Error::precondition(
                    key,
                    format!("another {} of it is in progress", op.as_str()),
                ));
            }
            let parents = tx.chain(row.parent_id)?;
            let seq = tx.journal_add(
                JournalOp::Commit,
                row.id,
                name,
                row.parent_id,
                &self.owner.token,
            )?;
            // A spare is journaled like any create, under a key no snapshot can have.
            let spare = if self.opts.durable && self.backend.makes_spares() {
                let spare = tx.next_id()?;
                let spare_seq = tx.journal_add(
                    JournalOp::Create,
                    spare,
                    &spare_key(spare),
                    Some(row.id),
                    &self.owner.token,
                )?;
                Some((spare, spare_seq))
            } else {
                None
            };
            tx.commit()?;
            Ok((row, parents, seq, spare))
        })?;
        failpoint("commit-before-backend");

        // The spare's snapshot is what makes the layer durable; without one, the commit syncs.
        let spare = spare.and_then(|(spare, spare_seq)| {
            match self.backend.make_spare(row.id, spare) {
                Ok(()) => Some((spare, spare_seq)),
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not make a spare for the next prepare; syncing instead");
                    self.abandon(&spare_key(spare), spare_seq, spare);
                    None
                }
            }
        });
        failpoint("commit-after-spare");
        // A layer nothing was written to is recorded as rebuildable instead of synced.
        let fresh = spare.is_none()
            && row.rebuildable
            && self
                .backend
                .is_fresh(row.id, &parents)
                .unwrap_or_else(|e| {
                    tracing::debug!(key, error = %e, "could not tell whether the layer is empty; syncing it");
                    false
                });
        let durable = self.opts.durable && spare.is_none() && !fresh;
        let usage = match self.backend.commit(row.id, &parents, durable) {
            Ok(u) => u,
            Err(e) => {
                let err = self.backend_err(key, "commit", e);
                let err = self.broken(key, row.id, err);
                if let Some((spare, spare_seq)) = spare {
                    self.abandon(&spare_key(spare), spare_seq, spare);
                }
                let _ = self.with_meta(|m| {
                    let tx = m.write(key)?;
                    tx.journal_remove(seq)?;
                    tx.commit()
                });
                return Err(err);
            }
        };
        failpoint("commit-after-backend");

        self.with_meta(|m| {
            let tx = m.write(key)?;
            tx.mark_committed(row.id, name, usage, fresh)?;
            tx.replace_labels(row.id, &labels)?;
            tx.journal_remove(seq)?;
            if let Some((spare, spare_seq)) = spare {
                tx.spare_add(spare, row.id, SystemTime::now())?;
                tx.journal_remove(spare_seq)?;
            }
            tx.commit()
        })?;
        failpoint("commit-after-commit");
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        check_key("key", key)?;
        // On a full disk, the reserve makes room for this metadata write.
        let (id, seq, spares) = self.freeing(|| self.with_meta(|m| {
            let tx = m.write(key)?;
            let row = tx.row_by_key(key)?.ok_or_else(|| Error::not_found(key))?;
            if tx.has_children(row.id)? {
                return Err(Error::precondition(
                    key,
                    "cannot remove a snapshot that has children: remove its children first",
                ));
            }
            if let Some(op) = tx.pending_op(row.id)? {
                return Err(Error::precondition(
                    key,
                    format!(
                        "cannot remove it while a {} of it is in progress",
                        op.as_str()
                    ),
                ));
            }
            if let Some(holder) = tx.holder(row.id, SystemTime::now())? {
                return Err(Error::precondition(
                    key,
                    format!("cannot remove it: {holder} holds it; untag the image or remove the lease first"),
                ));
            }
            let mut spares = tx.spares_of(row.id)?;
            // Its flattened lower goes with it (a trigger drops the row).
            spares.extend(tx.flat_of(row.id)?);
            tx.delete(row.id)?;
            let seq = if self.opts.sync_remove {
                Some(tx.journal_add(JournalOp::Remove, row.id, key, None, &self.owner.token)?)
            } else {
                None
            };
            tx.commit()?;
            Ok((row.id, seq, spares))
        }))?;
        // Before the storage goes: a clone would keep a removed directory alive (or a btrfs
        // subvolume from being deleted). Cleanup retries one that cannot go now.
        if let Err(e) = self.idmap_release(id) {
            tracing::warn!(key, error = %e, "could not take off the snapshot's idmapped mounts; cleanup will retry");
        }
        if let Some(seq) = seq {
            failpoint("remove-before-backend");
            self.backend
                .remove(id)
                .map_err(|e| self.backend_err(key, "remove", e))?;
            // Unknown to the metadata now; cleanup reclaims any that stays.
            for spare in spares {
                if let Err(e) = self.backend.remove(spare) {
                    tracing::warn!(key, spare, error = %e, "could not remove a spare or a flattened lower; cleanup will retry");
                }
            }
            failpoint("remove-after-backend");
            self.freeing(|| {
                self.with_meta(|m| {
                    let tx = m.write(key)?;
                    tx.journal_remove(seq)?;
                    tx.commit()
                })
            })?;
        }
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<Info> {
        check_key("key", key)?;
        self.with_meta(|m| {
            let tx = m.read(key)?;
            let row = tx
                .row_by_key_or_image(key)?
                .ok_or_else(|| Error::not_found(key))?;
            tx.info(&row)
        })
    }

    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info> {
        let key = info.name.as_str();
        check_key("name", key)?;
        self.with_meta(|m| {
            let tx = m.write(key)?;
            let row = tx
                .row_by_key(key)?
                .ok_or_else(|| Error::not_found(key))?;
            let mut labels = tx.labels(row.id)?;
            if fieldpaths.is_empty() {
                labels = info.labels.clone();
            }
            for path in fieldpaths {
                if *path == "labels" {
                    labels = info.labels.clone();
                } else if let Some(k) = path.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => {
                            labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            labels.remove(k);
                        }
                    }
                } else {
                    return Err(Error::invalid(
                        format!("field path {path:?}"),
                        format!(
                            "cannot update {path} of snapshot {key:?}: only labels and labels.<key> can be updated"
                        ),
                    ));
                }
            }
            if row.kind != Kind::Committed
                && IdMap::from_labels(&labels)? != IdMap::from_labels(&tx.labels(row.id)?)?
            {
                return Err(Error::invalid(
                    format!(
                        "labels {} / {} of snapshot {key:?}",
                        crate::idmap::LABEL_UID_MAPPING,
                        crate::idmap::LABEL_GID_MAPPING
                    ),
                    "the id mapping of a snapshot is fixed when it is prepared; prepare another snapshot with the new mapping",
                ));
            }
            tx.replace_labels(row.id, &labels)?;
            tx.touch(row.id, SystemTime::now())?;
            let row = tx
                .row_by_id(row.id)?
                .ok_or_else(|| Error::not_found(key))?;
            let info = tx.info(&row)?;
            tx.commit()?;
            Ok(info)
        })
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let (row, _) = self.row(key)?;
        match row.usage {
            Some(u) if row.kind == Kind::Committed => Ok(u),
            _ => self
                .backend
                .usage(row.id)
                .map_err(|e| self.backend_err(key, "usage", e)),
        }
    }

    fn walk(&self, filters: &[&str], f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()> {
        let filter = Filter::parse_all(filters)?;
        // Collect under the lock, call back without it: `f` may call into the store.
        let infos = self.with_meta(|m| m.read("")?.select(&filter))?;
        for info in &infos {
            f(info)?;
        }
        Ok(())
    }

    fn cleanup(&self) -> Result<()> {
        let report = self.cleanup_report()?;
        match report.failed.first() {
            None => Ok(()),
            Some((id, e)) => Err(Error::io(
                self.root.join("snapshots").join(id.to_string()),
                "reclaim storage (the other reclaimable snapshots were reclaimed; cleanup will retry this one)",
                std::io::Error::other(e.clone()),
            )),
        }
    }

    fn close(&self) -> Result<()> {
        {
            let guard = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                return Ok(());
            }
        }
        // Leftovers of this store's own failed operations are rolled back now.
        let reconciled = self.reconcile_journal(true);
        let mut guard = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        *guard = None;
        drop(guard);
        let _ = fs::remove_file(&self.owner.lock_path);
        reconciled.map(|_| ())
    }
}

impl<B: Backend> Drop for Store<B> {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(root = %self.root.display(), error = %e, "closing the store failed");
        }
    }
}

/// A read-only mount of a committed chain ([`Store::mount_view`]): unmounted, and the
/// backend told so ([`Backend::release_view`]), by [`ChainView::unmount`] or on drop.
pub(crate) struct ChainView<'a, B: Backend> {
    backend: &'a B,
    chain: Vec<u64>,
    mount: Option<crate::mount::TempMount>,
}

impl<B: Backend> ChainView<'_, B> {
    /// The mount point.
    pub(crate) fn path(&self) -> &Path {
        match &self.mount {
            Some(m) => m.path(),
            None => Path::new(""),
        }
    }

    /// Unmounts, reporting a failure (drop only logs it), then releases the view.
    pub(crate) fn unmount(mut self) -> Result<()> {
        match self.mount.take() {
            Some(m) => m.unmount(),
            None => Ok(()),
        }
    }
}

impl<B: Backend> Drop for ChainView<'_, B> {
    fn drop(&mut self) {
        // The mount goes first: the backend may deactivate what it was made of.
        drop(self.mount.take());
        if let Err(e) = self.backend.release_view(&self.chain) {
            tracing::warn!(chain = ?self.chain, error = %e, "could not release a read-only view");
        }
    }
}
