//! File-system helpers shared by the backends: disk usage and durability.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::types::Usage;

/// The disk usage of the tree at `path`: allocated bytes and inodes, each hardlinked inode
/// counted once. Symlinks are never followed. The root directory itself is counted.
pub fn disk_usage(path: &Path) -> io::Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let meta = fs::symlink_metadata(path)?;
    account(&meta, &mut usage, &mut seen);
    if meta.is_dir() {
        walk(path, &mut usage, &mut seen)?;
    }
    Ok(usage)
}

fn account(meta: &fs::Metadata, usage: &mut Usage, seen: &mut HashSet<(u64, u64)>) {
    if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
        return;
    }
    usage.inodes += 1;
    usage.size += meta.blocks() * 512;
}

fn walk(dir: &Path, usage: &mut Usage, seen: &mut HashSet<(u64, u64)>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        account(&meta, usage, seen);
        if meta.is_dir() {
            walk(&entry.path(), usage, seen)?;
        }
    }
    Ok(())
}

/// Flushes the whole file system that holds `path` to stable storage (`syncfs`): one call
/// makes every file and directory written before it durable, far cheaper than an `fsync`
/// per file.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let dir = fs::File::open(path)?;
    rustix::fs::syncfs(&dir)?;
    Ok(())
}

/// When the machine booted (`btime` of `/proc/stat`, whole seconds, rounded down).
pub fn boot_time() -> io::Result<std::time::SystemTime> {
    let stat = fs::read_to_string("/proc/stat")?;
    let secs = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| io::Error::other("/proc/stat has no btime line"))?;
    Ok(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Makes the entries of directory `dir` (creations, renames, removals) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes the tree at `path` if it exists; succeeds when there is nothing to remove.
/// Never follows symlinks.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => match fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
        Ok(_) => match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The ids of the snapshot directories under `dir`: every entry whose name is all digits.
/// Temporary directories (`.tmp-<id>`) and anything else are not listed.
pub fn list_ids(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(id) = name
            .to_str()
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// The directory layout of the directory-based backends: `snapshots/<id>/fs` (the tree) and
/// `snapshots/<id>/` for anything else a backend keeps, built in `snapshots/.tmp-<id>` and
/// renamed into place so that a listing never shows partial storage.
#[derive(Debug, Clone)]
pub struct SnapshotDirs {
    snapshots: std::path::PathBuf,
}

impl SnapshotDirs {
    /// The layout under the store `root`, creating `root/snapshots` if needed.
    pub fn open(root: &Path) -> io::Result<SnapshotDirs> {
        let snapshots = root.join("snapshots");
        fs::create_dir_all(&snapshots)?;
        // Snapshot storage is root's alone, whatever the umask.
        fs::set_permissions(
            &snapshots,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        Ok(SnapshotDirs { snapshots })
    }

    /// `root/snapshots`.
    pub fn snapshots(&self) -> &Path {
        &self.snapshots
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> std::path::PathBuf {
        self.snapshots.join(id.to_string())
    }

    /// The tree of snapshot `id`.
    pub fn fs(&self, id: u64) -> std::path::PathBuf {
        self.dir(id).join("fs")
    }

    /// Where snapshot `id` is built before it is renamed into place.
    pub fn tmp(&self, id: u64) -> std::path::PathBuf {
        self.snapshots.join(format!(".tmp-{id}"))
    }

    /// Removes the storage of `id`, and any temporary leftover; fine when there is none.
    /// On failure, returns the path that could not be removed with the error.
    pub fn remove(&self, id: u64) -> Result<(), (std::path::PathBuf, io::Error)> {
        for dir in [self.dir(id), self.tmp(id)] {
            remove_tree(&dir).map_err(|e| (dir, e))?;
        }
        Ok(())
    }

    /// Whether the tree of `id` is there.
    pub fn exists(&self, id: u64) -> io::Result<bool> {
        match fs::symlink_metadata(self.fs(id)) {
            Ok(m) => Ok(m.is_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every id with storage in place.
    pub fn ids(&self) -> io::Result<Vec<u64>> {
        list_ids(&self.snapshots)
    }
}

/// The value of extended attribute `name` of the open file `fd`, or `None` when it has none.
pub fn xattr<Fd: rustix::fd::AsFd>(fd: Fd, name: &std::ffi::OsStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        match rustix::fs::fgetxattr(&fd, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(rustix::io::Errno::RANGE) if buf.len() < 1 << 20 => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Every extended attribute of the open file `fd` that can be read, sorted by name.
pub fn xattrs<Fd: rustix::fd::AsFd>(fd: Fd) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    loop {
        match rustix::fs::flistxattr(&fd, &mut names[..]) {
            Ok(n) => {
                names.truncate(n);
                break;
            }
            Err(rustix::io::Errno::RANGE) if names.len() < 1 << 20 => {
                let len = names.len() * 4;
                names.resize(len, 0);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let os = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
        if let Some(v) = xattr(&fd, os)? {
            out.push((name.to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

/// `openat2(2)`, retried while the kernel answers EAGAIN: with `RESOLVE_IN_ROOT` or
/// `RESOLVE_BENEATH` it does when a rename or a mount anywhere raced with resolving `..`, and
/// asks the caller to try again.
pub fn openat2<Fd: rustix::fd::AsFd, P: rustix::path::Arg + Copy>(
    dirfd: Fd,
    path: P,
    oflags: rustix::fs::OFlags,
    mode: rustix::fs::Mode,
    resolve: rustix::fs::ResolveFlags,
) -> rustix::io::Result<rustix::fd::OwnedFd> {
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(&dirfd, path, oflags, mode, resolve) {
            Err(rustix::io::Errno::AGAIN) if tries < 1000 => tries += 1,
            other => return other,
        }
    }
}
