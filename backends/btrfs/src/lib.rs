//! strata's btrfs backend: one subvolume per snapshot.
//!
//! Layout under the store root: `snapshots/<id>/fs` is the snapshot's subvolume — a new
//! subvolume, or a writable snapshot of the parent's. It appears atomically, so
//! [`Backend::ids`] (which lists only directories holding a subvolume) never shows a
//! half-made one.
//!
//! **A durable layer costs one btrfs transaction.** containerd commits by taking a read-only
//! snapshot of the active subvolume and deleting it (two operations, each a transaction); the
//! read-only flag set in place is one more. Here immutability lives in the metadata — a
//! committed snapshot has no mounts of its own, and every view of it is a read-only bind
//! mount — so no flag is needed. A durable commit's one transaction is a snapshot of the
//! layer ([`Backend::make_spare`]): the ioctl writes the layer's pending data and commits,
//! and the snapshot becomes the storage of the layer's next child, whose prepare then costs
//! no transaction. Views are read-only snapshots (the flag is part of the snapshot ioctl).
//!
//! Mounts are bind mounts of the subvolume's directory, which work from the host's mount
//! namespace (no `subvolid=` needed). A view of a committed chain is a read-only bind of the
//! top subvolume, which holds the whole tree.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

mod sys;

use strata::fsutil;
use strata::{Backend, BackendError, CreateOptions, ErrorKind, Kind, Mount, Usage};

/// `BTRFS_SUPER_MAGIC` from `statfs(2)`.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// The btrfs backend's errors. Each names the path and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    /// A file-system operation failed.
    #[error("{path}: {context}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A libbtrfsutil call failed.
    #[error("{path}: {context}: {source} ({})", std::io::Error::from_raw_os_error(source.errno()))]
    Btrfs {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// What libbtrfsutil said.
        #[source]
        source: libbtrfsutil::Error,
    },
    /// The store root is not on btrfs.
    #[error(
        "{path} is on {found}, not btrfs: put the store root on a btrfs filesystem \
         (e.g. scripts/btrfs-loop DIR makes a loop-backed one and mounts it on DIR)"
    )]
    NotBtrfs {
        /// The root.
        path: PathBuf,
        /// The filesystem found (its magic number when it has no better name).
        found: String,
    },
    /// The filesystem is full.
    #[error("{path}: {context}: no space left on the btrfs filesystem; free space (strata gc) or grow it")]
    NoSpace {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
    },
    /// Committed snapshots have no mounts of their own.
    #[error("snapshot {id} is committed: mount a view of it instead")]
    Committed {
        /// The snapshot id.
        id: u64,
    },
    /// A view of no snapshot was asked for.
    #[error("a view needs at least one committed snapshot")]
    EmptyChain,
}

impl BackendError for BtrfsError {
    fn kind(&self) -> ErrorKind {
        match self {
            BtrfsError::Io { .. } | BtrfsError::Btrfs { .. } | BtrfsError::NoSpace { .. } => {
                ErrorKind::Internal
            }
            BtrfsError::NotBtrfs { .. } | BtrfsError::Committed { .. } => {
                ErrorKind::FailedPrecondition
            }
            BtrfsError::EmptyChain => ErrorKind::InvalidArgument,
        }
    }
}

fn io_err(path: &Path, context: &'static str) -> impl FnOnce(io::Error) -> BtrfsError {
    let path = path.to_path_buf();
    move |source| {
        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            BtrfsError::NoSpace { path, context }
        } else {
            BtrfsError::Io {
                path,
                context,
                source,
            }
        }
    }
}

fn btrfs_err(path: &Path, context: &'static str) -> impl FnOnce(libbtrfsutil::Error) -> BtrfsError {
    let path = path.to_path_buf();
    move |source| {
        if source.errno() == rustix::io::Errno::NOSPC.raw_os_error() {
            BtrfsError::NoSpace { path, context }
        } else {
            BtrfsError::Btrfs {
                path,
                context,
                source,
            }
        }
    }
}

/// The name of the filesystem of magic number `magic`, for messages.
fn fs_name(magic: i64) -> String {
    match magic {
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794c_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        m => format!("a filesystem with magic {m:#x}"),
    }
}

/// The btrfs backend.
#[derive(Debug, Clone)]
pub struct BtrfsBackend {
    dirs: fsutil::SnapshotDirs,
}

impl BtrfsBackend {
    /// Opens the backend under the store `root`, which must be on btrfs, creating
    /// `root/snapshots` if needed.
    pub fn open(root: &Path) -> Result<BtrfsBackend, BtrfsError> {
        let st = rustix::fs::statfs(root)
            .map_err(|e| io_err(root, "look at the filesystem")(e.into()))?;
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
        let magic = st.f_type as i64;
        if magic != BTRFS_SUPER_MAGIC {
            return Err(BtrfsError::NotBtrfs {
                path: root.to_path_buf(),
                found: fs_name(magic),
            });
        }
        let dirs = fsutil::SnapshotDirs::open(root).map_err(io_err(
            &root.join("snapshots"),
            "create the snapshots directory",
        ))?;
        Ok(BtrfsBackend { dirs })
    }

    /// The subvolume of snapshot `id`.
    pub fn fs_path(&self, id: u64) -> PathBuf {
        self.dirs.fs(id)
    }

    fn build(
        &self,
        kind: Kind,
        dir: &Path,
        parents: &[u64],
        opts: &CreateOptions,
    ) -> Result<(), BtrfsError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir, "create the snapshot's directory"))?;
        let sub = dir.join("fs");
        match parents.first() {
            None => {
                libbtrfsutil::create_subvolume(&sub)
                    .map_err(btrfs_err(&sub, "create a subvolume"))?;
                fs::set_permissions(&sub, fs::Permissions::from_mode(0o755))
                    .map_err(io_err(&sub, "set the root directory's mode"))?;
                if opts.durable {
                    // Creating a subvolume does not commit a transaction; this does.
                    libbtrfsutil::sync(&sub).map_err(btrfs_err(&sub, "sync the new subvolume"))?;
                }
            }
            Some(&parent) => {
                let src = self.fs_path(parent);
                // The snapshot ioctl commits a transaction, which also makes the directory
                // made above durable: the snapshot is on disk when this returns.
                libbtrfsutil::CreateSnapshotOptions::new()
                    .readonly(kind == Kind::View)
                    .create(&src, &sub)
                    .map_err(btrfs_err(&src, "snapshot the parent's subvolume"))?;
            }
        }
        Ok(())
    }

    /// The bytes and inodes the snapshot at `sub` changed since it was created (everything,
    /// for a new subvolume): the inodes whose item a later transaction wrote, found by a
    /// btrfs tree search that skips every tree block older than the snapshot — what the
    /// layer holds of its own, without walking the tree (an unchanged 1.5-million-inode
    /// image costs nothing).
    fn layer_usage(&self, sub: &Path) -> Result<Usage, BtrfsError> {
        let info = libbtrfsutil::subvolume_info(sub)
            .map_err(btrfs_err(sub, "read the subvolume's info"))?;
        let dir = rustix::fs::open(
            sub,
            rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| io_err(sub, "open the subvolume")(e.into()))?;
        // A snapshot's own changes come after the transaction that made it (the snapshot
        // ioctl commits it); a new subvolume holds nothing but its own, from the start.
        let since = match info.parent_uuid() {
            Some(_) => info.otransid(),
            None => 0,
        };
        let changed = sys::changed_inodes(&dir, since)
            .map_err(io_err(sub, "search the subvolume's tree for changes"))?;
        Ok(Usage {
            size: changed.bytes,
            inodes: changed.inodes,
        })
    }

    /// Deletes the subvolume `sub` if there is one, then its directory `dir`.
    fn remove_dir(&self, dir: &Path) -> Result<(), BtrfsError> {
        let sub = dir.join("fs");
        match libbtrfsutil::is_subvolume(&sub) {
            Ok(true) => {
                // A read-only view must be made writable before it can be deleted by a
                // process without CAP_SYS_ADMIN; as root, deletion works either way.
                match libbtrfsutil::delete_subvolume(&sub) {
                    Ok(()) => {}
                    // Another process reclaiming the same id (two gc runs) deleted it
                    // between the check and here: removal is idempotent.
                    Err(e) if e.errno() == rustix::io::Errno::NOENT.raw_os_error() => {}
                    Err(e) => return Err(btrfs_err(&sub, "delete the subvolume")(e)),
                }
            }
            Ok(false) => {}
            Err(e) if e.errno() == rustix::io::Errno::NOENT.raw_os_error() => {}
            Err(e) => return Err(btrfs_err(&sub, "look at the subvolume")(e)),
        }
        fsutil::remove_tree(dir).map_err(io_err(dir, "remove the snapshot's directory"))
    }
}

impl Backend for BtrfsBackend {
    type Error = BtrfsError;

    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn create(
        &self,
        id: u64,
        kind: Kind,
        parents: &[u64],
        opts: &CreateOptions,
    ) -> Result<(), BtrfsError> {
        // Left by an older version of strata, which built snapshots there.
        self.remove_dir(&self.dirs.tmp(id))?;
        let dir = self.dirs.dir(id);
        // Ids are never reused, so a directory at a new id is what a crash left between its
        // creation and the subvolume's; a subvolume there would be a store bug, never data
        // to delete.
        if self.exists(id)? {
            return Err(BtrfsError::Io {
                path: self.fs_path(id),
                context: "create a snapshot: a subvolume is already there (run strata fsck)",
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        self.remove_dir(&dir)?;
        let result = self.build(kind, &dir, parents, opts);
        if result.is_err() {
            // No half-made subvolume stays behind (ENOSPC included).
            if let Err(e) = self.remove_dir(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove the subvolume of a failed create");
            }
        }
        result
    }

    fn commit(&self, id: u64, _parents: &[u64], durable: bool) -> Result<Usage, BtrfsError> {
        let sub = self.fs_path(id);
        if durable {
            // One transaction: the layer's data and metadata reach the disk. (With spares,
            // the store has make_spare do this instead and asks for no sync here.)
            libbtrfsutil::sync(&sub).map_err(btrfs_err(&sub, "sync the layer"))?;
        }
        self.layer_usage(&sub)
    }

    fn makes_spares(&self) -> bool {
        true
    }

    fn make_spare(&self, id: u64, spare: u64) -> Result<(), BtrfsError> {
        // The snapshot ioctl writes the source's pending data and commits a transaction: the
        // layer is durable, and its child's storage exists, in that one transaction.
        self.create(
            spare,
            Kind::Active,
            &[id],
            &CreateOptions {
                durable: true,
                ..CreateOptions::default()
            },
        )
    }

    fn mounts(&self, id: u64, kind: Kind, _parents: &[u64]) -> Result<Vec<Mount>, BtrfsError> {
        strata::backend::whole_tree_mounts(kind, &self.fs_path(id))
            .ok_or(BtrfsError::Committed { id })
    }

    fn view_mounts(&self, chain: &[u64]) -> Result<Vec<Mount>, BtrfsError> {
        match chain.first() {
            Some(&top) => Ok(vec![Mount::bind(&self.fs_path(top), true)]),
            None => Err(BtrfsError::EmptyChain),
        }
    }

    fn remove(&self, id: u64) -> Result<(), BtrfsError> {
        self.remove_dir(&self.dirs.dir(id))?;
        self.remove_dir(&self.dirs.tmp(id))
    }

    fn usage(&self, id: u64) -> Result<Usage, BtrfsError> {
        self.layer_usage(&self.fs_path(id))
    }

    fn exists(&self, id: u64) -> Result<bool, BtrfsError> {
        let sub = self.fs_path(id);
        match libbtrfsutil::is_subvolume(&sub) {
            Ok(is) => Ok(is),
            Err(e) if e.errno() == rustix::io::Errno::NOENT.raw_os_error() => Ok(false),
            Err(e) => Err(btrfs_err(&sub, "look for the subvolume")(e)),
        }
    }

    fn layer_path(&self, id: u64) -> Option<PathBuf> {
        Some(self.fs_path(id))
    }

    fn ids(&self) -> Result<Vec<u64>, BtrfsError> {
        let listed = self
            .dirs
            .ids()
            .map_err(io_err(self.dirs.snapshots(), "list snapshots"))?;
        // A directory whose subvolume was deleted behind strata's back holds no snapshot.
        let mut ids = Vec::with_capacity(listed.len());
        for id in listed {
            if self.exists(id)? {
                ids.push(id);
            }
        }
        Ok(ids)
    }
}
