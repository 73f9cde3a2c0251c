//! Applying a layer to a directory tree, confined to it.
//!
//! Every path is resolved relative to directory descriptors: a parent directory through
//! `openat2` with `RESOLVE_IN_ROOT` (symlinks in it resolve inside the tree, never outside),
//! and the last component is never followed — an existing symlink there is replaced, not
//! written through. Names with a `..` component are refused (no clamping that hides a hostile
//! archive); absolute names are taken relative to the tree, as tar does. Hard links are bound to
//! the tree and link to a symlink itself, never to what it points at. Whiteouts delete inside
//! the tree only; the reserved `.wh..wh.` names other than the opaque marker are refused.
//!
//! The input may be plain, gzip or zstd (told apart by their magic bytes); the diffID (sha256
//! of the tar) and the blob digest are computed while streaming, and checked against the
//! expected digest when one is given. Owners, modes (after the owner, which clears
//! setuid), `SCHILY.xattr.*` attributes and modification times are restored; directory times
//! last, after their children.
//!
//! A failed apply into an empty tree leaves it empty. Into a non-empty tree it cannot undo
//! what it did: [`ApplyOutcome::Partial`] in the error's place tells the caller (the store
//! marks the snapshot broken).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

use super::digest::{Digest, HashReader};
use super::{Compression, Descriptor};
use crate::error::{Error, Result};

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The layer's descriptor as read (media type from the detected compression).
    pub descriptor: Descriptor,
    /// Entries applied, whiteouts included.
    pub entries: u64,
}

/// How far a failed apply got, for the caller to decide what the tree is worth now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Nothing was changed (the tree was empty and has been emptied again).
    Untouched,
    /// The tree was changed before the failure; it is neither before nor after.
    Partial,
}

/// Applies the layer read from `input` to the tree at `root`. With `expected`, the blob's
/// digest must match it. On failure, returns the error and what became of the tree.
pub fn apply_layer<R: Read>(
    root: &Path,
    input: R,
    expected: Option<&Digest>,
) -> std::result::Result<Applied, (Error, ApplyOutcome)> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        (
            Error::io(root, "open the tree to apply into", e.into()),
            ApplyOutcome::Untouched,
        )
    })?;
    let was_empty = dir_is_empty(&root_fd)
        .map_err(|e| (Error::io(root, "read the tree", e), ApplyOutcome::Untouched))?;
    match apply_inner(root, &root_fd, input, expected) {
        Ok(a) => Ok(a),
        Err(e) if was_empty => {
            if let Err(clean) = clear_dir(&root_fd) {
                tracing::warn!(root = %root.display(), error = %clean, "could not empty the tree after a failed apply");
                return Err((e, ApplyOutcome::Partial));
            }
            Err((e, ApplyOutcome::Untouched))
        }
        Err(e) => Err((e, ApplyOutcome::Partial)),
    }
}

fn dir_is_empty(fd: &OwnedFd) -> io::Result<bool> {
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    while let Some(e) = dir.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

fn clear_dir(fd: &OwnedFd) -> io::Result<()> {
    let mut names = Vec::new();
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    while let Some(e) = dir.read() {
        let e = e?;
        let n = e.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    for n in names {
        remove_all_at(fd, OsStr::from_bytes(&n))?;
    }
    Ok(())
}

/// Removes `name` in `dirfd` and everything below it, never following a symlink.
fn remove_all_at<Fd: AsFd>(dirfd: Fd, name: &OsStr) -> io::Result<()> {
    let st = match rustix::fs::statat(&dirfd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let sub = rustix::fs::openat(
            &dirfd,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        clear_dir(&sub)?;
        rustix::fs::unlinkat(&dirfd, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(&dirfd, name, AtFlags::empty())?;
    }
    Ok(())
}

fn hostile(name: &str, reason: &str) -> Error {
    Error::invalid(format!("layer entry {name:?}"), reason.to_string())
}

/// The components of an entry name: relative, no `.`, and no `..` (refused).
fn components(name: &[u8], shown: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(hostile(
                    shown,
                    "a '..' component would leave the layer; refused",
                ))
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn join(parts: &[Vec<u8>]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&parts.join(&b'/')))
}

fn apply_inner<R: Read>(
    root: &Path,
    root_fd: &OwnedFd,
    input: R,
    expected: Option<&Digest>,
) -> Result<Applied> {
    let mut blob = BufReader::new(HashReader::new(input));
    let magic = blob
        .fill_buf()
        .map_err(|e| Error::io(root, "read the layer", e))?
        .to_vec();
    let compression = if magic.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    };
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(&mut blob),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(&mut blob)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(&mut blob)
                .map_err(|e| Error::io(root, "start zstd", e))?,
        ),
    };
    let mut tar_reader = HashReader::new(decoded);
    let mut applier = Applier {
        root,
        root_fd,
        created: HashSet::new(),
        dir_times: Vec::new(),
        entries: 0,
    };
    {
        let mut archive = tar::Archive::new(&mut tar_reader);
        let entries = archive
            .entries()
            .map_err(|e| Error::io(root, "read the layer", e))?;
        for entry in entries {
            let mut entry = entry
                .map_err(|e| Error::io(root, "read the layer (truncated or not a tar?)", e))?;
            applier.entry(&mut entry)?;
        }
    }
    // Read what follows the end-of-archive marker so the digests cover the whole blob.
    io::copy(&mut tar_reader, &mut io::sink()).map_err(|e| Error::io(root, "read the layer", e))?;
    let (diff_id, _) = tar_reader.finish();

    io::copy(&mut blob, &mut io::sink()).map_err(|e| Error::io(root, "read the layer", e))?;
    let (digest, size) = blob.into_inner().finish();
    if let Some(want) = expected {
        if want != &digest {
            return Err(Error::invalid(
                format!("layer digest {want}"),
                format!("the blob read has digest {digest}; it is not the layer expected"),
            ));
        }
    }
    applier.finish_dir_times()?;
    Ok(Applied {
        descriptor: Descriptor {
            media_type: compression.media_type().to_string(),
            digest,
            size,
            diff_id,
        },
        entries: applier.entries,
    })
}

struct Applier<'a> {
    root: &'a Path,
    root_fd: &'a OwnedFd,
    /// Paths this layer created, which an opaque marker must not delete.
    created: HashSet<PathBuf>,
    /// Directories whose times are set at the end.
    dir_times: Vec<(PathBuf, Timestamps)>,
    entries: u64,
}

impl Applier<'_> {
    /// Opens directory `parts` of the tree, creating missing ones (0755, root).
    fn dir_fd(&self, parts: &[Vec<u8>], shown: &str) -> Result<OwnedFd> {
        let mut fd = rustix::fs::openat(
            self.root_fd,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(self.root, "open the tree", e.into()))?;
        for (i, c) in parts.iter().enumerate() {
            let name = OsStr::from_bytes(c);
            let sub_path = join(&parts[..=i]);
            let opened = rustix::fs::openat2(
                self.root_fd,
                &sub_path,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            );
            fd = match opened {
                Ok(f) => f,
                Err(rustix::io::Errno::NOENT) => {
                    match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {}
                        // Something is there, yet it does not resolve to a directory inside
                        // the tree: a symlink to a missing or outside place.
                        Err(rustix::io::Errno::EXIST) => {
                            return Err(hostile(
                                shown,
                                &format!(
                                    "its parent {:?} is a symlink that leads to no directory inside the layer; refused",
                                    sub_path
                                ),
                            ));
                        }
                        Err(e) => {
                            return Err(Error::io(
                                self.root.join(&sub_path),
                                "create a missing parent",
                                e.into(),
                            ));
                        }
                    }
                    rustix::fs::openat(
                        &fd,
                        name,
                        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| Error::io(self.root.join(&sub_path), "open a parent", e.into()))?
                }
                Err(rustix::io::Errno::NOTDIR) => {
                    return Err(hostile(
                        shown,
                        "a parent of it is not a directory in the tree",
                    ));
                }
                Err(e) => {
                    return Err(Error::io(
                        self.root.join(&sub_path),
                        "open a parent",
                        e.into(),
                    ))
                }
            };
        }
        Ok(fd)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts = components(&raw, &shown)?;
        let Some((last, parent)) = parts.split_last() else {
            return Ok(()); // the root itself: its attributes belong to the snapshot
        };
        self.entries += 1;
        let rel = join(&parts);
        let dir = self.dir_fd(parent, &shown)?;
        if last.starts_with(b".wh.") {
            return self.whiteout(&dir, parent, last, &shown);
        }
        let name = OsStr::from_bytes(last);
        let header = entry.header().clone();
        let kind = header.entry_type();
        // What is there now: keep a directory for a directory, replace anything else.
        let existing = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).ok();
        let keep_dir = kind.is_dir()
            && existing
                .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
        if existing.is_some() && !keep_dir {
            remove_all_at(&dir, name).map_err(|e| Error::io(self.root.join(&rel), "replace", e))?;
        }
        let mode = header
            .mode()
            .map_err(|e| Error::io(self.root.join(&rel), "read the mode", e))?
            & 0o7777;
        let uid = header
            .uid()
            .map_err(|e| Error::io(self.root.join(&rel), "read the owner", e))?;
        let gid = header
            .gid()
            .map_err(|e| Error::io(self.root.join(&rel), "read the group", e))?;
        let mtime = header.mtime().unwrap_or(0);
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: mtime as i64,
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: mtime as i64,
                tv_nsec: 0,
            },
        };
        let io_at = |ctx: &'static str| {
            let p = self.root.join(&rel);
            move |e: rustix::io::Errno| Error::io(p, ctx, e.into())
        };
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(k) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((k.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let fd = rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io_at("create the file"))?;
                let mut file = std::fs::File::from(fd);
                io::copy(entry, &mut file)
                    .map_err(|e| Error::io(self.root.join(&rel), "write the file", e))?;
                self.attrs(&file, uid, gid, mode, &xattrs, &rel)?;
                rustix::fs::futimens(&file, &times).map_err(io_at("set the time"))?;
            }
            tar::EntryType::Directory => {
                if !keep_dir {
                    rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                        .map_err(io_at("create the directory"))?;
                }
                let fd = rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_at("open the directory"))?;
                self.attrs(&fd, uid, gid, mode, &xattrs, &rel)?;
                self.dir_times.push((rel.clone(), times));
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(&shown, "a symlink without a target"))?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &dir, name)
                    .map_err(io_at("create the symlink"))?;
                rustix::fs::chownat(
                    &dir,
                    name,
                    Some(rustix::fs::Uid::from_raw(uid as u32)),
                    Some(rustix::fs::Gid::from_raw(gid as u32)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(io_at("set the owner"))?;
                rustix::fs::utimensat(&dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_at("set the time"))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(&shown, "a hard link without a target"))?;
                let tshown = String::from_utf8_lossy(&target).into_owned();
                let tparts = components(&target, &tshown)
                    .map_err(|_| hostile(&shown, "its link target leaves the layer; refused"))?;
                let Some((tlast, tparent)) = tparts.split_last() else {
                    return Err(hostile(&shown, "a hard link to the root"));
                };
                let tdir = self.dir_fd(tparent, &shown)?;
                // flags 0: a link to a symlink links the symlink itself.
                rustix::fs::linkat(&tdir, OsStr::from_bytes(tlast), &dir, name, AtFlags::empty())
                    .map_err(|e| Error::io(self.root.join(&rel), "create the hard link (its target must come earlier in the layer or a lower one)", e.into()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                rustix::fs::mknodat(
                    &dir,
                    name,
                    ft,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(io_at("create the device or fifo"))?;
                rustix::fs::chownat(
                    &dir,
                    name,
                    Some(rustix::fs::Uid::from_raw(uid as u32)),
                    Some(rustix::fs::Gid::from_raw(gid as u32)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(io_at("set the owner"))?;
                rustix::fs::chmodat(&dir, name, Mode::from_raw_mode(mode), AtFlags::empty())
                    .map_err(io_at("set the mode"))?;
                rustix::fs::utimensat(&dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_at("set the time"))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => return Ok(()),
            other => {
                return Err(hostile(
                    &shown,
                    &format!(
                        "entry type {:?} is not supported in a layer",
                        other.as_byte() as char
                    ),
                ));
            }
        }
        self.created.insert(rel);
        Ok(())
    }

    /// Owner, then mode (the owner change clears setuid), then extended attributes.
    fn attrs<Fd: AsFd>(
        &self,
        fd: Fd,
        uid: u64,
        gid: u64,
        mode: u32,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        rel: &Path,
    ) -> Result<()> {
        let p = || self.root.join(rel);
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(uid as u32)),
            Some(rustix::fs::Gid::from_raw(gid as u32)),
        )
        .map_err(|e| Error::io(p(), "set the owner", e.into()))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
            .map_err(|e| Error::io(p(), "set the mode", e.into()))?;
        for (k, v) in xattrs {
            rustix::fs::fsetxattr(
                &fd,
                OsStr::from_bytes(k),
                v,
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| Error::io(p(), "set an extended attribute", e.into()))?;
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        dir: &OwnedFd,
        parent: &[Vec<u8>],
        last: &[u8],
        shown: &str,
    ) -> Result<()> {
        let target = &last[4..];
        if target == b".wh..opq" {
            // Opaque: hide everything the lower layers had in this directory.
            let parent_rel = join(parent);
            let mut names = Vec::new();
            let mut d = rustix::fs::Dir::read_from(dir)
                .map_err(|e| Error::io(self.root.join(&parent_rel), "read", e.into()))?;
            while let Some(e) = d.read() {
                let e = e.map_err(|e| Error::io(self.root.join(&parent_rel), "read", e.into()))?;
                let n = e.file_name().to_bytes().to_vec();
                if n != b"."
                    && n != b".."
                    && !self
                        .created
                        .contains(&parent_rel.join(OsStr::from_bytes(&n)))
                {
                    names.push(n);
                }
            }
            for n in names {
                remove_all_at(dir, OsStr::from_bytes(&n)).map_err(|e| {
                    Error::io(self.root.join(&parent_rel), "apply an opaque whiteout", e)
                })?;
            }
            return Ok(());
        }
        if target.starts_with(b".wh.") {
            return Err(hostile(shown, "names starting with .wh..wh. are reserved"));
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(hostile(shown, "a whiteout of nothing"));
        }
        remove_all_at(dir, OsStr::from_bytes(target))
            .map_err(|e| Error::io(self.root.join(join(parent)), "apply a whiteout", e))
    }

    fn finish_dir_times(&mut self) -> Result<()> {
        // Deepest first, so setting a directory's time is not undone by its children.
        self.dir_times
            .sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
        for (rel, times) in &self.dir_times {
            let parts: Vec<Vec<u8>> = rel.iter().map(|c| c.as_bytes().to_vec()).collect();
            let Some((last, parent)) = parts.split_last() else {
                continue;
            };
            let dir = self.dir_fd(parent, &rel.to_string_lossy())?;
            rustix::fs::utimensat(
                &dir,
                OsStr::from_bytes(last),
                times,
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| Error::io(self.root.join(rel), "set a directory's time", e.into()))?;
        }
        Ok(())
    }
}
