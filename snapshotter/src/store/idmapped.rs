//! Snapshots presented under a user namespace's ids ([`crate::idmap`]): the store attaches an
//! idmapped clone of every directory the backend's mounts name (each lower layer read-only,
//! the directory holding the upper and work directories read-write) under
//! `ROOT/idmap/<id>/`, and returns the backend's mounts rewritten to name the clones. The
//! caller mounts them as any others; overlayfs takes its own private copy of each layer at
//! mount time, so the clones can go (at commit or remove) while a mount made from them is
//! still in use.
//!
//! A backend whose mounts are a file system on a block device (devmapper) gets that file
//! system mounted by the store under `ROOT/idmap/<id>/` too, and the caller a bind mount of
//! an idmapped clone of it.
//!
//! A clone is named by a hash of the directory it presents, so asking again for the mounts of
//! a snapshot (`Mounts`, after a reboot, after a chain was flattened) finds the clones made
//! before and makes only what is missing. `ROOT/idmap/.lock` (flock) serialises the store's
//! processes while they attach clones.

use std::collections::HashSet;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::idmap::IdMap;
use crate::types::Mount;

use super::Store;

/// The directory under the store root that holds the idmapped clones.
const IDMAP_DIR: &str = "idmap";

impl<B: Backend> Store<B> {
    fn idmap_dir(&self, id: u64) -> PathBuf {
        self.root.join(IDMAP_DIR).join(id.to_string())
    }

    /// `mounts` (the backend's, for snapshot `id` named `key`) presented under `map`:
    /// the directories they name replaced by idmapped clones of them, attached now if they
    /// are not yet. Mounts of anything but directories (a block device's file system) cannot
    /// be presented so: a clear error says what to do instead.
    pub(crate) fn idmapped_mounts(
        &self,
        key: &str,
        id: u64,
        map: &IdMap,
        mounts: Vec<Mount>,
    ) -> Result<Vec<Mount>> {
        let dir = self.idmap_dir(id);
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(&dir, "create the idmapped mounts' directory", e))?;
        let _lock = self.idmap_lock()?;
        let mut clones = Clones {
            key,
            dir: &dir,
            map,
            userns: [None, None],
        };
        let mut out = Vec::with_capacity(mounts.len());
        for m in mounts {
            let readonly = m.options.iter().any(|o| o == "ro");
            match m.fs_type.as_str() {
                "bind" | "rbind" => {
                    let clone = clones.attach(Path::new(&m.source), readonly)?;
                    out.push(Mount {
                        source: clone.to_string_lossy().into_owned(),
                        ..m
                    });
                }
                "overlay" => out.push(clones.overlay(m)?),
                // A file system on a block device (devmapper's): strata mounts it itself, and
                // the caller gets a bind mount of an idmapped clone of that mount.
                _ => {
                    let mounted = clones.mount_device(&m)?;
                    let clone = clones.attach(&mounted, readonly)?;
                    out.push(Mount::bind(&clone, readonly));
                }
            }
        }
        Ok(out)
    }

    /// Takes off and deletes snapshot `id`'s idmapped clones, if it has any. Mounts made from
    /// them keep working (each holds its own reference to the layers).
    pub(crate) fn idmap_release(&self, id: u64) -> Result<()> {
        let dir = self.idmap_dir(id);
        if !dir.exists() {
            return Ok(());
        }
        let _lock = self.idmap_lock()?;
        release_dir(&dir)
    }

    /// Releases the clones of snapshots that are gone or committed (`live`: the ids that may
    /// keep theirs). Returns how many directories were released.
    pub(crate) fn idmap_release_stale(&self, live: &HashSet<u64>) -> Result<usize> {
        let top = self.root.join(IDMAP_DIR);
        let entries = match fs::read_dir(&top) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io(&top, "list idmapped mounts", e)),
        };
        let mut stale = Vec::new();
        for e in entries {
            let e = e.map_err(|e| Error::io(&top, "list idmapped mounts", e))?;
            if let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                if !live.contains(&id) {
                    stale.push(e.path());
                }
            }
        }
        if stale.is_empty() {
            return Ok(0);
        }
        let _lock = self.idmap_lock()?;
        for dir in &stale {
            release_dir(dir)?;
        }
        Ok(stale.len())
    }

    fn idmap_lock(&self) -> Result<fs::File> {
        let path = self.root.join(IDMAP_DIR).join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "open the idmapped mounts' lock", e))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io(&path, "lock the idmapped mounts", e.into()))?;
        Ok(f)
    }
}

/// Detaches every mount in `dir` and deletes it.
fn release_dir(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, "list idmapped mounts", e)),
    };
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, "list idmapped mounts", e))?;
        let p = e.path();
        while is_mount_point(&p) {
            rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH)
                .map_err(|e| Error::io(&p, "take off an idmapped mount", e.into()))?;
        }
        fs::remove_dir(&p).map_err(|e| Error::io(&p, "remove an idmapped mount point", e))?;
    }
    fs::remove_dir(dir).map_err(|e| Error::io(dir, "remove the idmapped mounts' directory", e))
}

/// Whether `p` is the root of a mount (its mount id differs from its parent's).
fn is_mount_point(p: &Path) -> bool {
    let id = |p: &Path| {
        rustix::fs::statx(
            rustix::fs::CWD,
            p,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            rustix::fs::StatxFlags::MNT_ID,
        )
        .ok()
        .map(|s| s.stx_mnt_id)
    };
    match (id(p), p.parent().and_then(id)) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

/// The clones of one snapshot, made as its mounts are rewritten.
struct Clones<'a> {
    key: &'a str,
    dir: &'a Path,
    map: &'a IdMap,
    /// The user namespaces of `map` for read-only clones and of `map` with the host's root
    /// for read-write ones ([`IdMap::with_host_root`]), made at the first clone missing.
    userns: [Option<std::os::fd::OwnedFd>; 2],
}

impl Clones<'_> {
    /// The clone of `source` (attached now if it is not).
    fn attach(&mut self, source: &Path, readonly: bool) -> Result<PathBuf> {
        let hash = Sha256::digest(source.as_os_str().as_encoded_bytes());
        let name: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        let target = self
            .dir
            .join(format!("{}{name}", if readonly { "r" } else { "w" }));
        if is_mount_point(&target) {
            return Ok(target);
        }
        let fail = |what: &'static str, e: std::io::Error| {
            Error::precondition(
                self.key,
                format!(
                    "cannot present {} idmapped ({}): {what}: {e}; idmapped mounts need Linux 5.12 or later (5.19 for overlayfs layers) and a file system that supports them (ext4, xfs, btrfs, tmpfs from 6.3); otherwise prepare without the uid/gid mapping labels and let the client chown",
                    source.display(),
                    self.map
                ),
            )
        };
        let which = usize::from(!readonly);
        if self.userns[which].is_none() {
            let map = if readonly {
                self.map.clone()
            } else {
                self.map.with_host_root()
            };
            let ns = map
                .user_namespace()
                .map_err(|e| fail("make a user namespace with the mapping", e))?;
            self.userns[which] = Some(ns);
        }
        let Some(userns) = self.userns[which].as_ref() else {
            return Err(Error::invalid("idmap", "no user namespace"));
        };
        let tree = rustix::mount::open_tree(
            rustix::fs::CWD,
            source,
            rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
                | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .map_err(|e| fail("clone the directory's mount", e.into()))?;
        crate::sys::set_idmap(tree.as_fd(), userns.as_fd(), readonly)
            .map_err(|e| fail("idmap the clone", e))?;
        fs::create_dir_all(&target)
            .map_err(|e| Error::io(&target, "create an idmapped mount point", e))?;
        rustix::mount::move_mount(
            tree.as_fd(),
            "",
            rustix::fs::CWD,
            &target,
            rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| fail("attach the idmapped clone", e.into()))?;
        Ok(target)
    }

    /// Mounts `m` (a file system on a block device) at `dir/m<hash of its source>` unless it
    /// is mounted there already; returns where.
    fn mount_device(&mut self, m: &Mount) -> Result<PathBuf> {
        let hash = Sha256::digest(m.source.as_bytes());
        let name: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        let target = self.dir.join(format!("m{name}"));
        if is_mount_point(&target) {
            return Ok(target);
        }
        fs::create_dir_all(&target)
            .map_err(|e| Error::io(&target, "create a device's mount point", e))?;
        crate::mount::mount_all(std::slice::from_ref(m), &target)?;
        Ok(target)
    }

    /// An overlay mount over clones: each lower read-only; the upper and work directories
    /// through one read-write clone of the directory that holds both (overlayfs wants them
    /// on one mount).
    fn overlay(&mut self, m: Mount) -> Result<Mount> {
        let mut upper = None;
        let mut work = None;
        for o in &m.options {
            if let Some(v) = o.strip_prefix("upperdir=") {
                upper = Some(PathBuf::from(v));
            } else if let Some(v) = o.strip_prefix("workdir=") {
                work = Some(PathBuf::from(v));
            }
        }
        let upper_clone = match (&upper, &work) {
            (Some(u), Some(w)) => {
                let parent = u.parent().filter(|p| Some(*p) == w.parent()).ok_or_else(|| {
                    Error::precondition(
                        self.key,
                        format!(
                            "cannot idmap an overlay whose upper ({}) and work ({}) directories are not side by side",
                            u.display(),
                            w.display()
                        ),
                    )
                })?;
                Some(self.attach(parent, false)?)
            }
            _ => None,
        };
        let mut options = Vec::with_capacity(m.options.len());
        for o in m.options {
            if let Some(v) = o.strip_prefix("lowerdir=") {
                let mut lowers = Vec::new();
                for l in v.split(':') {
                    lowers.push(
                        self.attach(Path::new(l), true)?
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
                options.push(format!("lowerdir={}", lowers.join(":")));
            } else if let (Some(c), Some(v)) = (&upper_clone, o.strip_prefix("upperdir=")) {
                options.push(format!("upperdir={}", renamed(c, v).display()));
            } else if let (Some(c), Some(v)) = (&upper_clone, o.strip_prefix("workdir=")) {
                options.push(format!("workdir={}", renamed(c, v).display()));
            } else {
                options.push(o);
            }
        }
        Ok(Mount { options, ..m })
    }
}

/// `path`'s last component under `clone` (the clone of `path`'s parent).
fn renamed(clone: &Path, path: &str) -> PathBuf {
    match Path::new(path).file_name() {
        Some(n) => clone.join(n),
        None => clone.to_path_buf(),
    }
}
