//! strata's native backend: every snapshot is a full copy of its parent.
//!
//! It works on any file system and needs no kernel feature beyond bind mounts, which makes it
//! the oracle the other backends are compared with. Layout under the store root:
//! `snapshots/<id>/fs`; a snapshot is built in `snapshots/.tmp-<id>` and renamed into place.

mod copy;

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use strata::fsutil;
use strata::{Backend, BackendError, CreateOptions, ErrorKind, Kind, Mount, Usage};

pub use copy::copy_tree;

/// The native backend's errors. Each names the path and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
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

impl BackendError for NativeError {
    fn kind(&self) -> ErrorKind {
        match self {
            NativeError::Io { .. } => ErrorKind::Internal,
            NativeError::Committed { .. } => ErrorKind::FailedPrecondition,
            NativeError::EmptyChain => ErrorKind::InvalidArgument,
        }
    }
}

fn io_err(path: &Path, context: &'static str) -> impl FnOnce(io::Error) -> NativeError {
    let path = path.to_path_buf();
    move |source| NativeError::Io {
        path,
        context,
        source,
    }
}

/// The native backend.
#[derive(Debug, Clone)]
pub struct NativeBackend {
    dirs: fsutil::SnapshotDirs,
}

impl NativeBackend {
    /// Opens the backend under the store `root`, creating `root/snapshots` if needed.
    pub fn open(root: &Path) -> Result<NativeBackend, NativeError> {
        let dirs = fsutil::SnapshotDirs::open(root).map_err(io_err(
            &root.join("snapshots"),
            "create the snapshots directory",
        ))?;
        Ok(NativeBackend { dirs })
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.dirs.dir(id)
    }

    /// The tree of snapshot `id`.
    pub fn fs_path(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn tmp_dir(&self, id: u64) -> PathBuf {
        self.dirs.tmp(id)
    }

    /// Builds snapshot `id` in `tmp` and renames it into place.
    fn build(
        &self,
        id: u64,
        tmp: &Path,
        parents: &[u64],
        opts: &CreateOptions,
    ) -> Result<(), NativeError> {
        // Private to the owner whatever the umask: only `fs` inside is shown to containers.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(tmp)
            .map_err(io_err(tmp, "create the temporary directory"))?;
        let fs_dir = tmp.join("fs");
        match parents.first() {
            None => {
                fs::create_dir(&fs_dir).map_err(io_err(&fs_dir, "create the root directory"))?;
                // Exactly 0755 whatever the umask.
                fs::set_permissions(&fs_dir, fs::Permissions::from_mode(0o755))
                    .map_err(io_err(&fs_dir, "set the root directory's mode"))?;
            }
            Some(&parent) => {
                let src = self.fs_path(parent);
                copy_tree(&src, &fs_dir).map_err(io_err(&src, "copy the parent's tree"))?;
            }
        }
        if opts.durable {
            fsutil::sync_filesystem(tmp).map_err(io_err(tmp, "sync the new snapshot"))?;
        }
        let dir = self.dir(id);
        fs::rename(tmp, &dir).map_err(io_err(&dir, "rename the new snapshot into place"))?;
        if opts.durable {
            fsutil::fsync_dir(self.dirs.snapshots()).map_err(io_err(
                self.dirs.snapshots(),
                "sync the snapshots directory",
            ))?;
        }
        Ok(())
    }
}

impl Backend for NativeBackend {
    type Error = NativeError;

    fn name(&self) -> &'static str {
        "native"
    }

    fn create(
        &self,
        id: u64,
        _kind: Kind,
        parents: &[u64],
        opts: &CreateOptions,
    ) -> Result<(), NativeError> {
        let tmp = self.tmp_dir(id);
        fsutil::remove_tree(&tmp).map_err(io_err(&tmp, "remove a leftover temporary directory"))?;
        let result = self.build(id, &tmp, parents, opts);
        if result.is_err() {
            // Best effort: `remove` clears it later anyway, and `ids` never lists it.
            if let Err(e) = fsutil::remove_tree(&tmp) {
                tracing::warn!(path = %tmp.display(), error = %e, "could not remove the temporary directory of a failed create");
            }
        }
        result
    }

    fn commit(&self, id: u64, _parents: &[u64], durable: bool) -> Result<Usage, NativeError> {
        let fs_dir = self.fs_path(id);
        if durable {
            fsutil::sync_filesystem(&fs_dir).map_err(io_err(&fs_dir, "sync the layer"))?;
        }
        fsutil::disk_usage(&fs_dir).map_err(io_err(&fs_dir, "measure the layer"))
    }

    fn mounts(&self, id: u64, kind: Kind, _parents: &[u64]) -> Result<Vec<Mount>, NativeError> {
        strata::backend::whole_tree_mounts(kind, &self.fs_path(id))
            .ok_or(NativeError::Committed { id })
    }

    fn view_mounts(&self, chain: &[u64]) -> Result<Vec<Mount>, NativeError> {
        // Every native snapshot holds its whole tree: the top one is the view.
        match chain.first() {
            Some(&top) => Ok(vec![Mount::bind(&self.fs_path(top), true)]),
            None => Err(NativeError::EmptyChain),
        }
    }

    fn remove(&self, id: u64) -> Result<(), NativeError> {
        self.dirs
            .remove(id)
            .map_err(|(path, e)| io_err(&path, "remove the snapshot")(e))
    }

    fn usage(&self, id: u64) -> Result<Usage, NativeError> {
        let fs_dir = self.fs_path(id);
        fsutil::disk_usage(&fs_dir).map_err(io_err(&fs_dir, "measure the snapshot"))
    }

    fn exists(&self, id: u64) -> Result<bool, NativeError> {
        self.dirs
            .exists(id)
            .map_err(io_err(&self.fs_path(id), "look for the snapshot"))
    }

    fn layer_path(&self, id: u64) -> Option<PathBuf> {
        Some(self.fs_path(id))
    }

    fn ids(&self) -> Result<Vec<u64>, NativeError> {
        self.dirs
            .ids()
            .map_err(io_err(self.dirs.snapshots(), "list snapshots"))
    }
}

#[cfg(test)]
mod tests;
