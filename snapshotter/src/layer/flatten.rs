//! Flattening a stack of overlayfs layers into one directory: the tree a read-only overlay of
//! them shows, built once, so that a chain deeper than the kernel stacks can be mounted as
//! that one directory with the rest of the chain on top.
//!
//! The layers are directories as overlayfs lower layers hold them (strata's overlay layers,
//! or an earlier flattened directory), top first, and the rules are overlayfs' own, as strata
//! mounts it (`index=off`, no `redirect_dir`, no `metacopy`):
//!
//! * for each name in a directory, the topmost layer that has it decides: a **whiteout**
//!   (char 0/0) hides it, a non-directory is what the merged view shows;
//! * a **directory** merges with the directories of the same name in the layers below it,
//!   down to the first layer where the name is a whiteout or a non-directory (not merged)
//!   or the first **opaque** directory (`trusted.overlay.opaque=y`, or `user.overlay.opaque=y`
//!   with [`flatten_with`] for layers mounted with `userxattr`; merged, the last one);
//! * a merged directory shows the owner, mode, extended attributes and times of its topmost
//!   directory (overlayfs' own `trusted.overlay.*`/`user.overlay.*` and the `security.selinux` label aside,
//!   as in every copy strata makes).
//!
//! Directories are created. **Everything else is a hard link** to the layer's inode, so a
//! flattened directory costs its directories and names, not its data, and files hard-linked
//! to each other in a layer stay so. A file's link count (`st_nlink`) therefore counts the
//! flattened directories that hold it too; layers' contents (tar, diffID, content checksum)
//! never depend on it. Where a regular file's inode has reached the file system's link limit
//! (`EMLINK`), it is copied instead; any other entry at the limit is an error.
//!
//! What this cannot reproduce is refused, naming the layer path: a `trusted.overlay.redirect`
//! directory, a `trusted.overlay.metacopy` file, an opaque value other than `y` (xattr
//! whiteouts). strata never mounts layers with those features on.
//!
//! Directories are read one at a time and hold no descriptor while the walk goes deeper, so
//! hundreds of layers can be merged at once without running out of descriptors.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::copy::fd_xattrs;
use crate::error::{Error, Result};
use crate::layer::apply::upper::{child_key, open_dir};
use crate::layer::OverlayXattrs;

/// What [`flatten`] made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlattenStats {
    /// Directories created (the root not counted).
    pub dirs: u64,
    /// Names hard-linked to a layer's inode.
    pub links: u64,
    /// Files copied because their inode was at the link limit.
    pub copies: u64,
    /// Bytes the directories made take on disk, the root included: with the copies, what
    /// the flattened directory costs beyond the layers it links to.
    pub bytes: u64,
}

/// Fills the empty directory `dest` with the merged content of `layers` (top first); see the
/// module docs. `dest` must be on the same file system as the layers.
pub fn flatten(layers: &[PathBuf], dest: &Path) -> Result<FlattenStats> {
    flatten_with(layers, dest, OverlayXattrs::Trusted)
}

/// [`flatten`] for layers whose overlayfs markers live under `xattrs` (`user.overlay.*` for a
/// store mounted with `userxattr`).
pub fn flatten_with(
    layers: &[PathBuf],
    dest: &Path,
    xattrs: OverlayXattrs,
) -> Result<FlattenStats> {
    let Some(top) = layers.first() else {
        return Err(Error::invalid(
            "layers",
            "flattening needs at least one layer",
        ));
    };
    let dest_fd = open_dir_path(dest).map_err(|e| Error::io(dest, "open", e.into()))?;
    let mut f = Flattener {
        layers,
        stats: FlattenStats::default(),
        xattrs,
    };
    // The root merges like any directory (an opaque root hides the layers below it).
    let mut sources = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        sources.push(i);
        let fd = open_dir_path(layer).map_err(|e| Error::io(layer, "open the layer", e.into()))?;
        if f.dir_marks(&fd, layer)? {
            break;
        }
    }
    f.merge(&dest_fd, dest, b"", &sources)?;
    let top_fd = open_dir_path(top).map_err(|e| Error::io(top, "open the layer", e.into()))?;
    copy_dir_attrs(&top_fd, &dest_fd, dest)?;
    f.count_dir(&dest_fd, dest)?;
    Ok(f.stats)
}

struct Flattener<'a> {
    layers: &'a [PathBuf],
    stats: FlattenStats,
    /// Where overlayfs keeps its markers in these layers.
    xattrs: OverlayXattrs,
}

/// What the topmost layer that has a name decided for it.
enum Entry {
    /// A whiteout: nothing shows.
    Hidden,
    /// A non-directory of layer `.0`, with its type.
    NonDir(usize, FileType),
    /// A directory merged from these layers (top first); `open` while a lower layer may
    /// still add to it.
    Dir { sources: Vec<usize>, open: bool },
}

fn open_dir_path(p: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(
        p,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn under(base: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(OsStr::from_bytes(rel))
    }
}

/// The value of xattr `name` of `fd`, `None` when it has none.
fn xattr_of<Fd: AsFd>(fd: Fd, name: &str) -> io::Result<Option<Vec<u8>>> {
    crate::fsutil::xattr(fd, OsStr::new(name))
}

impl Flattener<'_> {
    /// Whether the layer directory `fd` (at `at`) is opaque; refuses the markers this module
    /// cannot reproduce.
    fn dir_marks(&self, fd: &OwnedFd, at: &Path) -> Result<bool> {
        let read = |e| Error::io(at, "read an overlay attribute", e);
        if xattr_of(fd, self.xattrs.redirect())
            .map_err(read)?
            .is_some()
        {
            return Err(Error::invalid(
                at.display().to_string(),
                "the directory carries an overlayfs redirect (a layer written with redirect_dir on), which flattening cannot reproduce; mount the chain with fewer layers or use the native backend",
            ));
        }
        match xattr_of(fd, self.xattrs.opaque()).map_err(read)? {
            None => Ok(false),
            Some(v) if v == b"y" => Ok(true),
            Some(v) => Err(Error::invalid(
                at.display().to_string(),
                format!(
                    "the directory's opaque marker is {:?} (xattr whiteouts), which flattening cannot reproduce; mount the chain with fewer layers or use the native backend",
                    String::from_utf8_lossy(&v)
                ),
            )),
        }
    }

    /// Lists the directory `rel` of each of `sources` and fills `dest` (at `dest_path`) with
    /// the merged view, directories recursively.
    fn merge(
        &mut self,
        dest: &OwnedFd,
        dest_path: &Path,
        rel: &[u8],
        sources: &[usize],
    ) -> Result<()> {
        let mut names: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        for &i in sources {
            let dir_path = under(&self.layers[i], rel);
            let dir = open_dir_path(&dir_path)
                .map_err(|e| Error::io(&dir_path, "open a layer directory", e.into()))?;
            let read =
                |e: rustix::io::Errno| Error::io(&dir_path, "read a layer directory", e.into());
            let mut it = rustix::fs::Dir::read_from(&dir).map_err(read)?;
            while let Some(entry) = it.read() {
                let entry = entry.map_err(read)?;
                let name = entry.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                let name_os = OsStr::from_bytes(name);
                let at = || dir_path.join(name_os);
                // A merge still collecting below gets this layer's entry; a decided name
                // ignores the layers below it.
                let collecting = match names.get(name) {
                    None => false,
                    Some(Entry::Dir { open: true, .. }) => true,
                    Some(_) => continue,
                };
                let mut ft = entry.file_type();
                let mut st = None;
                if ft == FileType::Unknown || ft == FileType::CharacterDevice {
                    let s = rustix::fs::statat(&dir, name_os, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| Error::io(at(), "stat", e.into()))?;
                    ft = FileType::from_raw_mode(s.st_mode);
                    st = Some(s);
                }
                let whiteout =
                    ft == FileType::CharacterDevice && st.is_some_and(|s| s.st_rdev == 0);
                let opaque = match ft {
                    FileType::Directory => {
                        let sub = open_dir(&dir, name_os)
                            .map_err(|e| Error::io(at(), "open a layer directory", e.into()))?;
                        Some(self.dir_marks(&sub, &at())?)
                    }
                    _ => None,
                };
                if collecting {
                    if let Some(Entry::Dir { sources, open }) = names.get_mut(name) {
                        match opaque {
                            Some(opaque) => {
                                sources.push(i);
                                *open = !opaque;
                            }
                            // A whiteout or a non-directory ends the merge.
                            None => *open = false,
                        }
                    }
                    continue;
                }
                let decided = match opaque {
                    Some(opaque) => Entry::Dir {
                        sources: vec![i],
                        open: !opaque,
                    },
                    None if whiteout => Entry::Hidden,
                    None => {
                        if ft == FileType::RegularFile {
                            let p = at();
                            let mut buf = [0u8; 64];
                            match rustix::fs::lgetxattr(&p, self.xattrs.metacopy(), &mut buf[..]) {
                                Err(Errno::NODATA | Errno::NOTSUP) => {}
                                Ok(_) | Err(Errno::RANGE) => {
                                    return Err(Error::invalid(
                                        p.display().to_string(),
                                        "the file is an overlayfs metacopy (a layer written with metacopy on), which flattening cannot reproduce; mount the chain with fewer layers or use the native backend",
                                    ))
                                }
                                Err(e) => {
                                    return Err(Error::io(&p, "read an overlay attribute", e.into()))
                                }
                            }
                        }
                        Entry::NonDir(i, ft)
                    }
                };
                names.insert(name.to_vec(), decided);
            }
        }

        // Non-directories, one layer directory open at a time.
        let mut by_layer: BTreeMap<usize, Vec<(&[u8], FileType)>> = BTreeMap::new();
        for (name, e) in &names {
            if let Entry::NonDir(i, ft) = e {
                by_layer.entry(*i).or_default().push((name, *ft));
            }
        }
        for (i, entries) in by_layer {
            let dir_path = under(&self.layers[i], rel);
            let dir = open_dir_path(&dir_path)
                .map_err(|e| Error::io(&dir_path, "open a layer directory", e.into()))?;
            for (name, ft) in entries {
                let name = OsStr::from_bytes(name);
                match rustix::fs::linkat(&dir, name, dest, name, AtFlags::empty()) {
                    Ok(()) => self.stats.links += 1,
                    Err(Errno::MLINK) => {
                        self.stats.bytes +=
                            copy_nondir(&dir, name, ft, dest, &dir_path.join(name))?;
                        self.stats.copies += 1;
                    }
                    Err(e) => {
                        return Err(Error::io(
                            dest_path.join(name),
                            "link a layer's file into the flattened directory",
                            e.into(),
                        ))
                    }
                }
            }
        }

        // Directories: created, filled, then given their topmost directory's attributes
        // (times last, after their entries).
        for (name, e) in &names {
            let Entry::Dir { sources, .. } = e else {
                continue;
            };
            let name_os = OsStr::from_bytes(name);
            let child_path = dest_path.join(name_os);
            rustix::fs::mkdirat(dest, name_os, Mode::from_raw_mode(0o700))
                .map_err(|e| Error::io(&child_path, "create a directory", e.into()))?;
            self.stats.dirs += 1;
            let child = open_dir(dest, name_os)
                .map_err(|e| Error::io(&child_path, "open a directory", e.into()))?;
            let child_rel = child_key(rel, name);
            self.merge(&child, &child_path, &child_rel, sources)?;
            let top = under(&self.layers[sources[0]], &child_rel);
            let top_fd = open_dir_path(&top)
                .map_err(|e| Error::io(&top, "open a layer directory", e.into()))?;
            copy_dir_attrs(&top_fd, &child, &child_path)?;
            self.count_dir(&child, &child_path)?;
        }
        Ok(())
    }

    /// Adds the blocks of directory `fd` to the bytes made.
    fn count_dir(&mut self, fd: &OwnedFd, at: &Path) -> Result<()> {
        let st = rustix::fs::fstat(fd).map_err(|e| Error::io(at, "stat", e.into()))?;
        self.stats.bytes += u64::try_from(st.st_blocks).unwrap_or(0) * 512;
        Ok(())
    }
}

/// Gives directory `dst` the owner, mode, extended attributes and times of `src`.
fn copy_dir_attrs(src: &OwnedFd, dst: &OwnedFd, at: &Path) -> Result<()> {
    let st =
        rustix::fs::fstat(src).map_err(|e| Error::io(at, "stat a layer directory", e.into()))?;
    let xattrs = fd_xattrs(src).map_err(|e| Error::io(at, "read extended attributes", e))?;
    set_attrs(dst, &st, &xattrs, at)
}

/// The owner, mode, extended attributes and times of `st` on `fd`.
fn set_attrs(fd: &OwnedFd, st: &Stat, xattrs: &[(Vec<u8>, Vec<u8>)], at: &Path) -> Result<()> {
    let owner = (
        rustix::fs::Uid::from_raw(st.st_uid),
        rustix::fs::Gid::from_raw(st.st_gid),
    );
    crate::copy::set_attrs(fd, owner, st, xattrs, at)
}

/// Copies the regular file `name` of `dir` (at `at`) to `dest`, with its owner, mode,
/// extended attributes and times: for an inode that cannot take another link.
fn copy_nondir(
    dir: &OwnedFd,
    name: &OsStr,
    ft: FileType,
    dest: &OwnedFd,
    at: &Path,
) -> Result<u64> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| Error::io(at, "stat", e.into()))?;
    match ft {
        FileType::RegularFile => {
            let src = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(at, "open", e.into()))?;
            let xattrs =
                fd_xattrs(&src).map_err(|e| Error::io(at, "read extended attributes", e))?;
            let dst = rustix::fs::openat(
                dest,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| Error::io(at, "create a copy", e.into()))?;
            let mut r = std::fs::File::from(src);
            let mut w = std::fs::File::from(dst);
            io::copy(&mut r, &mut w).map_err(|e| Error::io(at, "copy", e))?;
            let dst = OwnedFd::from(w);
            set_attrs(&dst, &st, &xattrs, at)?;
            Ok(u64::try_from(st.st_blocks).unwrap_or(0) * 512)
        }
        _ => Err(Error::io(
            at,
            "link into the flattened directory (the inode is at the file system's link limit)",
            Errno::MLINK.into(),
        )),
    }
}

#[cfg(test)]
mod tests;
