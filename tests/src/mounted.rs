//! A mount guard: a snapshot's mounts mounted on a directory, unmounted on drop.

use std::fs;
use std::path::{Path, PathBuf};

use strata::Mount;

/// A snapshot mounted on a directory with [`strata::mount::mount_all`]; unmounted with
/// [`strata::mount::unmount`] by [`Mounted::unmount`], or on drop (also when a test panics,
/// so that a failing test does not leak mounts into the temporary directory being removed).
#[derive(Debug)]
pub struct Mounted {
    path: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Mounts `mounts` on `path` (created if missing); panics with the mounts and the error
    /// when mounting fails.
    pub fn new(mounts: &[Mount], path: &Path) -> Mounted {
        Mounted::try_new(mounts, path).unwrap_or_else(|e| {
            let shown: Vec<String> = mounts.iter().map(Mount::summary).collect();
            panic!("mounting [{}] on {}: {e}", shown.join("; "), path.display())
        })
    }

    /// Mounts `mounts` on `path` (created if missing).
    pub fn try_new(mounts: &[Mount], path: &Path) -> strata::Result<Mounted> {
        fs::create_dir_all(path).map_err(|e| strata::Error::Io {
            path: path.to_path_buf(),
            context: "create the mount point",
            source: e,
        })?;
        strata::mount::mount_all(mounts, path)?;
        Ok(Mounted {
            path: path.to_path_buf(),
            mounted: true,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts now; panics when unmounting fails.
    pub fn unmount(self) {
        let path = self.path.clone();
        self.try_unmount()
            .unwrap_or_else(|e| panic!("unmounting {}: {e}", path.display()));
    }

    /// Unmounts now.
    pub fn try_unmount(mut self) -> strata::Result<()> {
        self.mounted = false;
        strata::mount::unmount(&self.path)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = strata::mount::unmount(&self.path) {
                eprintln!("unmounting {} on drop: {e}", self.path.display());
            }
        }
    }
}
