//! The narrow trait a storage backend implements.
//!
//! A backend stores and mounts snapshots for **numeric ids**. It never sees keys, names or
//! labels: those live in the metadata store, which is shared by every backend. Ids are never
//! reused, so storage left behind by a removed snapshot can never be mistaken for a new one.
//!
//! The store calls a backend in this order, with a journal entry `(operation, id)` written
//! durably before the call and cleared after the metadata transaction that records the result:
//!
//! * [`Backend::create`] builds the storage in a temporary place and renames it into place,
//!   so that [`Backend::ids`] never lists partial storage;
//! * [`Backend::commit`] seals an Active snapshot (makes it durable, immutable where it can);
//! * [`Backend::remove`] deletes storage and must be idempotent;
//! * [`Backend::reconcile`] is called on open for journal entries whose process died.

use crate::error::BackendError;
use crate::types::{Kind, Mount, Usage};

/// Per-snapshot options the store derives from the caller's request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Mount the snapshot `volatile` (overlay only): no syncs while mounted, for build scratch
    /// space. Requested with the label [`crate::LABEL_VOLATILE`]` = "true"`.
    pub volatile: bool,
    /// Make the new storage durable before returning (fsync of the new directory entries).
    pub durable: bool,
}

/// The operation a journal entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JournalOp {
    /// [`Backend::create`] was called for the id.
    Create,
    /// [`Backend::commit`] was called for the id.
    Commit,
    /// [`Backend::remove`] was called for the id.
    Remove,
}

impl JournalOp {
    /// The name stored in the journal table.
    pub fn as_str(self) -> &'static str {
        match self {
            JournalOp::Create => "create",
            JournalOp::Commit => "commit",
            JournalOp::Remove => "remove",
        }
    }

    /// The inverse of [`JournalOp::as_str`].
    pub fn parse(s: &str) -> Option<JournalOp> {
        match s {
            "create" => Some(JournalOp::Create),
            "commit" => Some(JournalOp::Commit),
            "remove" => Some(JournalOp::Remove),
            _ => None,
        }
    }
}

/// When a backend mounts deep chains through *flattened lowers*: directories holding the
/// merged content of a chain's bottom layers, made by [`Backend::flatten`] and kept by the
/// store (see `Store`'s docs on deep chains).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlattenPolicy {
    /// Chains of up to this many layers are mounted layer by layer.
    pub threshold: usize,
    /// A deeper chain mounts the flattened lower of its bottom `k` layers, `k` the largest
    /// multiple of `step` below its depth, under its remaining (at most `step`) layers. One
    /// flattened lower then serves `step` depths, and a mount never stacks more than
    /// `step + 1` directories.
    pub step: usize,
}

impl FlattenPolicy {
    /// How many of the bottom layers of a chain of `depth` layers a flattened lower stands
    /// for when it is mounted; `None` when the chain is mounted layer by layer.
    pub fn flattened(&self, depth: usize) -> Option<usize> {
        if depth <= self.threshold || self.step == 0 {
            return None;
        }
        let k = self.step * ((depth - 1) / self.step);
        (k >= 2).then_some(k)
    }
}

/// A storage backend: stores and mounts snapshots by numeric id.
///
/// `parents` always lists the whole parent chain, immediate parent first, as ids of
/// Committed snapshots.
pub trait Backend: Send + Sync + 'static {
    /// The backend's own error type.
    type Error: BackendError;

    /// The backend's name as recorded in the store root (`native`, `overlay`, ...).
    fn name(&self) -> &'static str;

    /// Creates the storage of a new snapshot `id` of `kind` on top of `parents`.
    ///
    /// When this fails or the process dies, [`Backend::ids`] does not list `id` (work happens
    /// in a temporary place renamed into place at the end, or the last step is atomic), and
    /// [`Backend::remove`] clears whatever temporary state is left.
    fn create(
        &self,
        id: u64,
        kind: Kind,
        parents: &[u64],
        opts: &CreateOptions,
    ) -> Result<(), Self::Error>;

    /// Seals the Active snapshot `id` so that it can be used as a parent. With `durable`, its
    /// content must be on stable storage when this returns. Returns the usage of its own layer,
    /// which the store records so that `usage` of a Committed snapshot costs nothing.
    fn commit(&self, id: u64, parents: &[u64], durable: bool) -> Result<Usage, Self::Error>;

    /// Whether what [`Backend::create`] makes for an Active snapshot or a View holds nothing
    /// that cannot be made again from the row: then the store creates them without syncing
    /// and, should a power loss take that storage, recovery creates it again (the storage of
    /// an uncommitted snapshot carries no promise; its content only counts once committed).
    /// Where creating copies data (the native backend), it must be synced: `false`.
    fn fresh_is_rebuildable(&self) -> bool {
        false
    }

    /// Whether the Active snapshot `id` still holds only what [`Backend::create`] made for it
    /// (nothing written, the root's owner and mode untouched). Committing such a layer needs
    /// no sync: the store records it as empty and recovery makes it again if a power loss
    /// takes it. Only asked when [`Backend::fresh_is_rebuildable`] says so.
    fn is_fresh(&self, id: u64, parents: &[u64]) -> Result<bool, Self::Error> {
        let _ = (id, parents);
        Ok(false)
    }

    /// Whether a durable commit leaves a *spare*: a writable snapshot of the new layer, made by
    /// [`Backend::make_spare`], that the next prepare on the layer takes as its storage
    /// instead of creating any. Worth it where making that snapshot is what makes the layer
    /// durable anyway (btrfs: the snapshot ioctl writes the source's data and commits a
    /// transaction, the one a commit needs), so the child's prepare costs no transaction.
    fn makes_spares(&self) -> bool {
        false
    }

    /// Makes the storage `spare`: a writable snapshot of the Active snapshot `id`, which is
    /// about to be committed; its content must be durable when this returns. `spare` is later
    /// either taken as the storage of an Active child of `id` (as if [`Backend::create`] had
    /// made it) or removed with [`Backend::remove`]. Only called when
    /// [`Backend::makes_spares`] says so.
    fn make_spare(&self, id: u64, spare: u64) -> Result<(), Self::Error> {
        let _ = (id, spare);
        Ok(())
    }

    /// The mounts that present snapshot `id` of `kind` with its `parents`.
    fn mounts(&self, id: u64, kind: Kind, parents: &[u64]) -> Result<Vec<Mount>, Self::Error>;

    /// The overlayfs upper directory of `id`, when the backend stores layers that way: a diff
    /// then reads only that directory (its char 0/0 entries are deletions, an opaque
    /// directory hides its lower entries) instead of walking both whole trees.
    fn overlay_upper(&self, id: u64) -> Option<std::path::PathBuf> {
        let _ = id;
        None
    }

    /// Where overlayfs keeps its markers (opaque directories, redirects) in the directories
    /// [`Backend::overlay_upper`] and [`Backend::layer_path`] return: `trusted.overlay.*`
    /// (the default), or `user.overlay.*` for a backend that mounts with `userxattr`
    /// (rootless, inside a user namespace). Diffs and applies that read or write those
    /// directories directly use the same prefix.
    fn overlay_xattrs(&self) -> crate::layer::OverlayXattrs {
        crate::layer::OverlayXattrs::Trusted
    }

    /// Read-only mounts presenting the committed `chain` (top first) as one tree, without
    /// creating any storage: what a diff reads.
    fn view_mounts(&self, chain: &[u64]) -> Result<Vec<Mount>, Self::Error>;

    /// Says that a reader unmounted the mounts [`Backend::view_mounts`] gave it for `chain`
    /// (on every path, a failed read included; never for a reader that was killed). The
    /// default does nothing; a backend that activated something for the view (devmapper: the
    /// top layer's device) lets it go here unless another reader, in any process, still uses
    /// it.
    fn release_view(&self, chain: &[u64]) -> Result<(), Self::Error> {
        let _ = chain;
        Ok(())
    }

    /// Whether (and past which depth) the backend mounts deep chains through flattened
    /// lowers. `None` (the default): every chain is mounted as it is.
    fn flatten_policy(&self) -> Option<FlattenPolicy> {
        None
    }

    /// Builds storage `id`: one lower layer holding the merged content of `chain` (top
    /// first; committed layers, the last one possibly an earlier flattened lower), in a
    /// temporary place renamed into place, synced first with `durable`. Returns what it
    /// costs on disk beyond the layers it merges. `Ok(None)` (the default): the backend
    /// cannot flatten. Only called when [`Backend::flatten_policy`] says so; the storage is
    /// then listed by [`Backend::ids`] and removed by [`Backend::remove`] like a snapshot's.
    fn flatten(&self, id: u64, chain: &[u64], durable: bool) -> Result<Option<Usage>, Self::Error> {
        let _ = (id, chain, durable);
        Ok(None)
    }

    /// Deletes the storage of `id`, including temporary leftovers of an interrupted create.
    /// Succeeds when there is nothing to delete.
    fn remove(&self, id: u64) -> Result<(), Self::Error>;

    /// The disk usage of the snapshot's own layer.
    fn usage(&self, id: u64) -> Result<Usage, Self::Error>;

    /// Every id that has storage (fully created, renamed into place), in any order.
    fn ids(&self) -> Result<Vec<u64>, Self::Error>;

    /// Whether the storage of `id` is there and usable. Asked of the backend, never taken
    /// from the metadata, before a layer is exported. The default looks in [`Backend::ids`].
    fn exists(&self, id: u64) -> Result<bool, Self::Error> {
        Ok(self.ids()?.contains(&id))
    }

    /// A directory holding the layer's own content, for readers that do not mount (the
    /// overlay upper directory; the native backend's full tree). `None` when the backend
    /// has no such directory.
    fn layer_path(&self, id: u64) -> Option<std::path::PathBuf> {
        let _ = id;
        None
    }

    /// Rolls back (or forward) an operation whose process died between the journal entry and
    /// its metadata transaction. `recorded` says whether the metadata shows the operation's
    /// result (for `Create`: a row exists for `id`; for `Commit`: the row is Committed).
    /// The default removes the storage of an unrecorded create and does nothing otherwise.
    fn reconcile(&self, op: JournalOp, id: u64, recorded: bool) -> Result<(), Self::Error> {
        match (op, recorded) {
            (JournalOp::Create, false) | (JournalOp::Remove, _) => self.remove(id),
            _ => Ok(()),
        }
    }
}

/// The mounts of a snapshot in a backend whose snapshots each hold their whole tree (native,
/// btrfs): a read-write bind mount of `tree` for an Active snapshot, a read-only one for a
/// View, and `None` for a Committed snapshot, which has no mounts of its own.
pub fn whole_tree_mounts(kind: Kind, tree: &std::path::Path) -> Option<Vec<Mount>> {
    match kind {
        Kind::Active => Some(vec![Mount::bind(tree, false)]),
        Kind::View => Some(vec![Mount::bind(tree, true)]),
        Kind::Committed => None,
    }
}
