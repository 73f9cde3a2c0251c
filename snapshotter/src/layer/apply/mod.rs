//! Applying a layer, confined to the snapshot it changes.
//!
//! Two targets. [`apply_layer`] writes into a directory tree (a mounted snapshot): every path
//! is resolved relative to directory descriptors — a parent directory through `openat2` with
//! `RESOLVE_IN_ROOT` (symlinks in it resolve inside the tree, never outside), and the last
//! component is never followed: an existing symlink there is replaced, not written through.
//! [`apply_overlay_layer`] writes straight into an overlayfs upper directory, without a mount:
//! deletions become overlayfs whiteouts (char 0/0), opaque markers the `trusted.overlay.opaque`
//! attribute (`user.overlay.opaque` with [`apply_overlay_layer_with`] for a store mounted with
//! `userxattr`), and directories of lower layers are copied up as the kernel would (see
//! [`upper`]). An entry whose meaning depends on the merged view in a way the upper directory
//! alone cannot show — a parent that is a symlink, a hard link to a file only a lower layer
//! holds, an opaque marker at the root — mounts the snapshot and continues through the tree
//! applier from that entry on; [`Applied::via_mount`] tells.
//!
//! Names with a `..` component are refused (no clamping that hides a hostile archive);
//! absolute names are taken relative to the snapshot, as tar does. Hard links are bound to the
//! snapshot and link to a symlink itself, never to what it points at. Whiteouts delete inside
//! the snapshot only; the reserved `.wh..wh.` names other than the opaque marker are refused,
//! and so are overlayfs' own attributes, `trusted.overlay.*` and `user.overlay.*` alike.
//!
//! The input may be plain, gzip or zstd (told apart by their magic bytes); the diffID (sha256
//! of the tar), the blob digest and the [content checksum](super::content) are computed while
//! streaming, and the blob is checked against the expected digest when one is given. Owners,
//! modes (after the owner, which clears setuid), `SCHILY.xattr.*` attributes and modification
//! times are restored; directory times last, after their children.
//!
//! A failed apply into an empty snapshot leaves it empty. Into a non-empty one it cannot undo
//! what it did: [`ApplyOutcome::Partial`] in the error's place tells the caller (the store
//! marks the snapshot broken).

pub mod upper;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use sha2::{Digest as _, Sha256};

use super::content::{ContentSummer, Record};
use super::digest::{Digest, HashReader};
use super::{Compression, Descriptor, OverlayXattrs};
use crate::error::{Error, Result};
use crate::mount::TempMount;

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The layer's descriptor as read (media type from the detected compression).
    pub descriptor: Descriptor,
    /// The [content checksum](super::content) of the change set.
    pub content: Digest,
    /// Entries applied, whiteouts included.
    pub entries: u64,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
    /// True when an overlay apply had to mount the snapshot (see the module docs).
    pub via_mount: bool,
}

/// How far a failed apply got, for the caller to decide what the snapshot is worth now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Nothing was changed (the snapshot was empty and has been emptied again).
    Untouched,
    /// The snapshot was changed before the failure; it is neither before nor after.
    Partial,
}

type Failed = (Error, ApplyOutcome);

/// Applies the layer read from `input` to the tree at `root`. With `expected`, the blob's
/// digest must match it. On failure, returns the error and what became of the tree.
pub fn apply_layer<R: Read>(
    root: &Path,
    input: R,
    expected: Option<&Digest>,
) -> std::result::Result<Applied, Failed> {
    let tree = TreeApplier::open(root).map_err(|e| (e, ApplyOutcome::Untouched))?;
    let was_empty = dir_is_empty(&tree.root_fd)
        .map_err(|e| (Error::io(root, "read the tree", e), ApplyOutcome::Untouched))?;
    let mut sink = Sink::Tree(tree);
    let mut touched = false;
    let result = run(&mut sink, root, input, expected, &mut touched);
    let Sink::Tree(tree) = sink else {
        return result.map_err(|e| (e, ApplyOutcome::Partial));
    };
    settle(result, touched, was_empty, root, &tree.root_fd)
}

/// Applies the layer read from `input` to the overlayfs upper directory `upper`, whose lower
/// layers are `lowers` (top first), without mounting it. `mount` mounts the snapshot, for the
/// entries that need the kernel's merged view. With `expected`, the blob's digest must match.
pub fn apply_overlay_layer<'m, R: Read>(
    upper: &Path,
    lowers: &[PathBuf],
    mount: impl FnOnce() -> Result<TempMount> + 'm,
    input: R,
    expected: Option<&Digest>,
) -> std::result::Result<Applied, Failed> {
    apply_overlay_layer_with(
        upper,
        lowers,
        OverlayXattrs::Trusted,
        mount,
        input,
        expected,
    )
}

/// [`apply_overlay_layer`] for layers whose overlayfs markers (opaque directories, redirects)
/// live under `xattrs`: `user.overlay.*` for a store mounted with `userxattr` (rootless).
pub fn apply_overlay_layer_with<'m, R: Read>(
    upper: &Path,
    lowers: &[PathBuf],
    xattrs: OverlayXattrs,
    mount: impl FnOnce() -> Result<TempMount> + 'm,
    input: R,
    expected: Option<&Digest>,
) -> std::result::Result<Applied, Failed> {
    let applier = upper::UpperApplier::open(upper, lowers, xattrs)
        .map_err(|e| (e, ApplyOutcome::Untouched))?;
    let upper_fd = applier
        .upper_fd()
        .map_err(|e| (e, ApplyOutcome::Untouched))?;
    let was_empty = dir_is_empty(&upper_fd).map_err(|e| {
        (
            Error::io(upper, "read the upper directory", e),
            ApplyOutcome::Untouched,
        )
    })?;
    let mut sink = Sink::Upper {
        applier,
        mount: Some(Box::new(mount)),
    };
    let mut touched = false;
    let result = run(&mut sink, upper, input, expected, &mut touched);
    // Unmount before anything else touches the upper directory.
    let unmounted = match sink {
        Sink::Mounted { mount, applier } => {
            drop(applier); // its descriptors keep the mount busy
            mount.unmount()
        }
        _ => Ok(()),
    };
    let result = match (result, unmounted) {
        (Ok(a), Ok(())) => Ok(a),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    };
    settle(result, touched, was_empty, upper, &upper_fd)
}

/// What [`content_of_layer`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSummary {
    /// The [content checksum](super::content) of the change set.
    pub content: Digest,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
}

/// The content checksum of the layer read from `input` (plain, gzip or zstd), computed as
/// an apply would, without applying it. A hard link must name a file the layer holds, as
/// layers strata writes do. The input is read to its end even when it fails, so that a
/// writer on the other end of a pipe is never left blocked.
pub fn content_of_layer<R: Read>(mut input: R) -> Result<LayerSummary> {
    let result = summarize(&mut input);
    if result.is_err() {
        let _ = io::copy(&mut input, &mut io::sink());
    }
    result
}

fn summarize<R: Read>(input: R) -> Result<LayerSummary> {
    let mut content = ContentSummer::new();
    let streamed = stream_layer(input, Path::new("layer"), None, |p, data| {
        let Some((_, parent)) = p.parts.split_last() else {
            return Ok(());
        };
        let key = p.parts.join(&b'/');
        match p.whiteout()? {
            Some(Whiteout::Opaque) => content.opaque(&parent.join(&b'/')),
            Some(Whiteout::Name(target)) => {
                let mut k = parent.join(&b'/');
                if !k.is_empty() {
                    k.push(b'/');
                }
                k.extend_from_slice(target);
                content.record(&k, Record::Deleted);
            }
            None => {
                let record = match p.kind {
                    tar::EntryType::Link => {
                        let target = p.link_parts()?.join(&b'/');
                        content.file(&target).cloned().ok_or_else(|| {
                            hostile(
                                &p.shown,
                                "a hard link to a file the layer does not hold; its content is unknown here",
                            )
                        })?
                    }
                    tar::EntryType::Directory => p.dir_record(),
                    tar::EntryType::Regular | tar::EntryType::Continuous => {
                        let (sha256, size) = super::content::hash_content(data)
                            .map_err(|e| Error::io(Path::new("layer"), "read the layer", e))?;
                        p.file_record(sha256, size)
                    }
                    _ => p.special_record()?,
                };
                content.record(&key, record);
            }
        }
        Ok(())
    })?;
    Ok(LayerSummary {
        content: content.finish(),
        diff_id: streamed.diff_id,
        tar_size: streamed.tar_size,
    })
}

/// What [`stream_layer`] read.
struct Streamed {
    compression: Compression,
    /// sha256 and size of the uncompressed tar.
    diff_id: Digest,
    tar_size: u64,
    /// sha256 and size of the blob as read.
    digest: Digest,
    size: u64,
}

/// Reads the layer blob `input` (plain, gzip or zstd, told apart by their magic bytes),
/// handing each entry (its header checked, with its data) to `each`, and reads to the end so
/// that the digests cover the whole blob; `expected` is checked against the blob's digest.
/// `at` names the layer's destination in errors.
fn stream_layer<R: Read>(
    input: R,
    at: &Path,
    expected: Option<&Digest>,
    mut each: impl FnMut(&Parsed, &mut dyn Read) -> Result<()>,
) -> Result<Streamed> {
    let mut blob = BufReader::new(HashReader::new(input));
    let magic = blob
        .fill_buf()
        .map_err(|e| Error::io(at, "read the layer", e))?
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
                .map_err(|e| Error::io(at, "start zstd", e))?,
        ),
    };
    let mut tar_reader = HashReader::new(decoded);
    {
        let mut archive = tar::Archive::new(&mut tar_reader);
        let entries = archive
            .entries()
            .map_err(|e| Error::io(at, "read the layer", e))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| Error::io(at, "read the layer (truncated or not a tar?)", e))?;
            if matches!(
                entry.header().entry_type(),
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                continue;
            }
            let parsed = Parsed::read(&mut entry)?;
            each(&parsed, &mut entry)?;
        }
    }
    io::copy(&mut tar_reader, &mut io::sink()).map_err(|e| Error::io(at, "read the layer", e))?;
    let (diff_id, tar_size) = tar_reader.finish();
    io::copy(&mut blob, &mut io::sink()).map_err(|e| Error::io(at, "read the layer", e))?;
    let (digest, size) = blob.into_inner().finish();
    if let Some(want) = expected {
        if want != &digest {
            return Err(Error::invalid(
                format!("layer digest {want}"),
                format!("the blob read has digest {digest}; it is not the layer expected"),
            ));
        }
    }
    Ok(Streamed {
        compression,
        diff_id,
        tar_size,
        digest,
        size,
    })
}

/// Turns a failure into its outcome: nothing was touched when the first entry was refused
/// before any change; a tree that was empty is emptied again.
fn settle(
    result: Result<Applied>,
    touched: bool,
    was_empty: bool,
    root: &Path,
    root_fd: &OwnedFd,
) -> std::result::Result<Applied, Failed> {
    match result {
        Ok(a) => Ok(a),
        Err(e) if !touched => Err((e, ApplyOutcome::Untouched)),
        Err(e) if was_empty => {
            if let Err(clean) = clear_dir(root_fd) {
                tracing::warn!(root = %root.display(), error = %clean, "could not empty the snapshot after a failed apply");
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

/// The names in a directory, without `.` and `..`.
fn dir_names<Fd: AsFd>(fd: Fd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    while let Some(e) = dir.read() {
        let e = e?;
        let n = e.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    Ok(names)
}

fn clear_dir(fd: &OwnedFd) -> io::Result<()> {
    for n in dir_names(fd)? {
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

/// Extended attributes a layer may not carry, and that records leave out: overlayfs' own
/// (`trusted.overlay.*` and, for rootless mounts, `user.overlay.*`), and the security label a
/// Linux security module assigns on creation.
fn xattr_is_foreign(name: &[u8]) -> bool {
    OverlayXattrs::is_overlay_xattr(name) || name == b"security.selinux"
}

/// One tar entry, read and checked before anything is written for it.
pub(crate) struct Parsed {
    /// The name as written, for messages.
    shown: String,
    /// The normalised components.
    parts: Vec<Vec<u8>>,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    /// Sorted by name.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    link: Option<Vec<u8>>,
    major: u32,
    minor: u32,
}

impl Parsed {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Parsed> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts = components(&raw, &shown)?;
        let header = entry.header();
        let bad =
            |what: &str, e: io::Error| hostile(&shown, &format!("its {what} is unreadable: {e}"));
        let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let uid = header.uid().map_err(|e| bad("owner", e))?;
        let gid = header.gid().map_err(|e| bad("group", e))?;
        let mtime = i64::try_from(header.mtime().unwrap_or(0)).unwrap_or(i64::MAX);
        let kind = header.entry_type();
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(k) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    if OverlayXattrs::is_overlay_xattr(k) {
                        return Err(hostile(
                            &shown,
                            &format!(
                                "it carries an overlayfs attribute ({}), which only the kernel may set; refused",
                                String::from_utf8_lossy(k)
                            ),
                        ));
                    }
                    xattrs.push((k.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
        xattrs.sort();
        Ok(Parsed {
            shown,
            parts,
            kind,
            mode,
            uid,
            gid,
            mtime,
            xattrs,
            link,
            major,
            minor,
        })
    }

    fn times(&self) -> Timestamps {
        let t = Timespec {
            tv_sec: self.mtime,
            tv_nsec: 0,
        };
        Timestamps {
            last_access: t,
            last_modification: t,
        }
    }

    fn recorded_xattrs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.xattrs
            .iter()
            .filter(|(k, _)| !xattr_is_foreign(k))
            .cloned()
            .collect()
    }

    fn dir_record(&self) -> Record {
        Record::Dir {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            xattrs: self.recorded_xattrs(),
        }
    }

    fn file_record(&self, sha256: [u8; 32], size: u64) -> Record {
        Record::File {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            size,
            sha256,
            xattrs: self.recorded_xattrs(),
        }
    }

    /// The record of a symlink, device or fifo.
    fn special_record(&self) -> Result<Record> {
        let kind = match self.kind {
            tar::EntryType::Symlink => {
                let target = self
                    .link
                    .clone()
                    .ok_or_else(|| hostile(&self.shown, "a symlink without a target"))?;
                return Ok(Record::Symlink {
                    uid: self.uid,
                    gid: self.gid,
                    mtime: self.mtime,
                    target,
                });
            }
            tar::EntryType::Char => b'c',
            tar::EntryType::Block => b'b',
            tar::EntryType::Fifo => b'p',
            other => {
                return Err(hostile(
                    &self.shown,
                    &format!(
                        "entry type {:?} is not supported in a layer",
                        other.as_byte() as char
                    ),
                ))
            }
        };
        let (major, minor) = if kind == b'p' {
            (0, 0)
        } else {
            (self.major, self.minor)
        };
        Ok(Record::Special {
            kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            major,
            minor,
        })
    }

    /// The whiteout's target name, when this is a whiteout, checked.
    fn whiteout(&self) -> Result<Option<Whiteout<'_>>> {
        let Some((last, parents)) = self.parts.split_last() else {
            return Ok(None);
        };
        if parents.iter().any(|c| c.starts_with(b".wh.")) {
            // Made as a missing parent, such a directory would be written back by a diff as
            // an entry that means a deletion.
            return Err(hostile(
                &self.shown,
                "a parent directory named .wh.* cannot be in a layer (the name means a deletion); refused",
            ));
        }
        let Some(target) = last.strip_prefix(b".wh.") else {
            return Ok(None);
        };
        if target == b".wh..opq" {
            return Ok(Some(Whiteout::Opaque));
        }
        if target.starts_with(b".wh.") {
            return Err(hostile(
                &self.shown,
                "names starting with .wh..wh. are reserved",
            ));
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(hostile(&self.shown, "a whiteout of nothing"));
        }
        Ok(Some(Whiteout::Name(target)))
    }

    /// The hard link target's components.
    fn link_parts(&self) -> Result<Vec<Vec<u8>>> {
        let target = self
            .link
            .as_ref()
            .ok_or_else(|| hostile(&self.shown, "a hard link without a target"))?;
        let tshown = String::from_utf8_lossy(target).into_owned();
        let tparts = components(target, &tshown)
            .map_err(|_| hostile(&self.shown, "its link target leaves the layer; refused"))?;
        if tparts.is_empty() {
            return Err(hostile(&self.shown, "a hard link to the root"));
        }
        Ok(tparts)
    }
}

enum Whiteout<'a> {
    Opaque,
    Name(&'a [u8]),
}

/// What every applier keeps across entries.
#[derive(Default)]
pub(crate) struct State {
    /// Paths this layer created, which an opaque marker must not delete.
    created: HashSet<PathBuf>,
    /// Directories whose times are set at the end.
    dir_times: Vec<(PathBuf, Timestamps)>,
    entries: u64,
    content: ContentSummer,
}

/// Writes what it is given into a file while hashing it.
struct HashingFile {
    file: std::fs::File,
    hash: Sha256,
    size: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Owner, then mode (the owner change clears setuid), then extended attributes.
fn set_attrs<Fd: AsFd>(fd: Fd, p: &Parsed, at: &Path) -> Result<()> {
    rustix::fs::fchown(
        &fd,
        Some(rustix::fs::Uid::from_raw(p.uid as u32)),
        Some(rustix::fs::Gid::from_raw(p.gid as u32)),
    )
    .map_err(|e| Error::io(at, "set the owner", e.into()))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(p.mode))
        .map_err(|e| Error::io(at, "set the mode", e.into()))?;
    for (k, v) in &p.xattrs {
        rustix::fs::fsetxattr(
            &fd,
            OsStr::from_bytes(k),
            v,
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(|e| Error::io(at, "set an extended attribute", e.into()))?;
    }
    Ok(())
}

/// Creates the non-directory, non-link entry `p` as `name` in `dir` (where nothing is now),
/// returning its record. `at` names it in errors.
fn create_at<Fd: AsFd>(
    dir: Fd,
    name: &OsStr,
    p: &Parsed,
    data: &mut dyn Read,
    at: &Path,
) -> Result<Record> {
    let io_at = |ctx: &'static str| move |e: rustix::io::Errno| Error::io(at, ctx, e.into());
    let times = p.times();
    let owner = |dir: &Fd| {
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(p.uid as u32)),
            Some(rustix::fs::Gid::from_raw(p.gid as u32)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(io_at("set the owner"))
    };
    match p.kind {
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let fd = rustix::fs::openat(
                &dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(io_at("create the file"))?;
            let mut out = HashingFile {
                file: std::fs::File::from(fd),
                hash: Sha256::new(),
                size: 0,
            };
            io::copy(data, &mut out).map_err(|e| Error::io(at, "write the file", e))?;
            set_attrs(&out.file, p, at)?;
            rustix::fs::futimens(&out.file, &times).map_err(io_at("set the time"))?;
            Ok(p.file_record(out.hash.finalize().into(), out.size))
        }
        tar::EntryType::Symlink => {
            let target = p
                .link
                .as_ref()
                .ok_or_else(|| hostile(&p.shown, "a symlink without a target"))?;
            rustix::fs::symlinkat(OsStr::from_bytes(target), &dir, name)
                .map_err(io_at("create the symlink"))?;
            owner(&dir)?;
            rustix::fs::utimensat(&dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_at("set the time"))?;
            p.special_record()
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let (ft, kind) = match p.kind {
                tar::EntryType::Char => (FileType::CharacterDevice, b'c'),
                tar::EntryType::Block => (FileType::BlockDevice, b'b'),
                _ => (FileType::Fifo, b'p'),
            };
            let (major, minor) = if kind == b'p' {
                (0, 0)
            } else {
                (p.major, p.minor)
            };
            rustix::fs::mknodat(
                &dir,
                name,
                ft,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(major, minor),
            )
            .map_err(io_at("create the device or fifo"))?;
            owner(&dir)?;
            rustix::fs::chmodat(&dir, name, Mode::from_raw_mode(p.mode), AtFlags::empty())
                .map_err(io_at("set the mode"))?;
            rustix::fs::utimensat(&dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_at("set the time"))?;
            p.special_record()
        }
        other => Err(hostile(
            &p.shown,
            &format!(
                "entry type {:?} is not supported in a layer",
                other.as_byte() as char
            ),
        )),
    }
}

/// The record of what `name` in `dir` is now (for a hard link whose target the layer did
/// not record itself).
pub(crate) fn record_at<Fd: AsFd>(dir: Fd, name: &OsStr, at: &Path) -> Result<Record> {
    let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| Error::io(at, "stat", e.into()))?;
    let mode = st.st_mode & 0o7777;
    let (uid, gid, mtime) = (u64::from(st.st_uid), u64::from(st.st_gid), st.st_mtime);
    let ft = FileType::from_raw_mode(st.st_mode);
    let xattrs_of = |fd: &OwnedFd| -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        crate::fsutil::xattrs(fd)
            .map(|mut x| {
                x.retain(|(k, _)| !xattr_is_foreign(k));
                x
            })
            .map_err(|e| Error::io(at, "read extended attributes", e))
    };
    Ok(match ft {
        FileType::RegularFile => {
            let fd = rustix::fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(at, "open", e.into()))?;
            let xattrs = xattrs_of(&fd)?;
            let (sha256, size) = super::content::hash_content(std::fs::File::from(fd))
                .map_err(|e| Error::io(at, "read", e))?;
            Record::File {
                mode,
                uid,
                gid,
                mtime,
                size,
                sha256,
                xattrs,
            }
        }
        FileType::Directory => {
            let fd = rustix::fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(at, "open", e.into()))?;
            Record::Dir {
                mode,
                uid,
                gid,
                mtime,
                xattrs: xattrs_of(&fd)?,
            }
        }
        FileType::Symlink => Record::Symlink {
            uid,
            gid,
            mtime,
            target: rustix::fs::readlinkat(&dir, name, Vec::new())
                .map_err(|e| Error::io(at, "read the symlink", e.into()))?
                .into_bytes(),
        },
        other => {
            let kind = match other {
                FileType::CharacterDevice => b'c',
                FileType::BlockDevice => b'b',
                _ => b'p',
            };
            let rdev = if kind == b'p' { 0 } else { st.st_rdev };
            Record::Special {
                kind,
                mode,
                uid,
                gid,
                mtime,
                major: rustix::fs::major(rdev),
                minor: rustix::fs::minor(rdev),
            }
        }
    })
}

/// Sets the recorded directory times, deepest first so that setting a directory's time is
/// not undone by its children. `open` opens a directory by its path in the snapshot, or says
/// it is no longer there (replaced or deleted later in the layer).
fn finish_dir_times(
    state: &mut State,
    root: &Path,
    open: impl Fn(&Path) -> Result<Option<OwnedFd>>,
) -> Result<()> {
    state
        .dir_times
        .sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (rel, times) in &state.dir_times {
        if let Some(fd) = open(rel)? {
            rustix::fs::futimens(&fd, times)
                .map_err(|e| Error::io(root.join(rel), "set a directory's time", e.into()))?;
        }
    }
    Ok(())
}

/// Where entries go now.
enum Sink<'m> {
    /// A mounted or plain tree.
    Tree(TreeApplier),
    /// An overlay upper directory; `mount` is there until it has been used.
    Upper {
        applier: upper::UpperApplier,
        mount: Option<Box<dyn FnOnce() -> Result<TempMount> + 'm>>,
    },
    /// An overlay snapshot that had to be mounted part-way.
    Mounted {
        mount: TempMount,
        applier: TreeApplier,
    },
}

/// What an overlay upper applier says of an entry.
pub(crate) enum Step {
    /// Applied.
    Done,
    /// Not touched: it needs the merged view (the reason, for the log).
    NeedsMount(&'static str),
}

fn run<R: Read>(
    sink: &mut Sink<'_>,
    root: &Path,
    input: R,
    expected: Option<&Digest>,
    touched: &mut bool,
) -> Result<Applied> {
    let mut state = State::default();
    let streamed = stream_layer(input, root, expected, |parsed, data| {
        if parsed.parts.is_empty() {
            return Ok(()); // the root itself: its attributes belong to the snapshot
        }
        // Names are checked before anything is written for the entry.
        parsed.whiteout()?;
        if parsed.kind == tar::EntryType::Link {
            parsed.link_parts()?;
        }
        state.entries += 1;
        // From here on the entry may change the tree (a refusal above changed nothing).
        *touched = true;
        loop {
            match sink {
                Sink::Tree(t) | Sink::Mounted { applier: t, .. } => {
                    return t.entry(&mut state, parsed, data);
                }
                Sink::Upper { applier, mount } => match applier.entry(&mut state, parsed, data)? {
                    Step::Done => return Ok(()),
                    Step::NeedsMount(why) => {
                        tracing::debug!(entry = %parsed.shown, why, "mounting the snapshot to apply the rest of the layer");
                        let Some(m) = mount.take() else {
                            return Err(Error::invalid(
                                format!("layer entry {:?}", parsed.shown),
                                "the overlay applier needed a mount twice",
                            ));
                        };
                        let m = m()?;
                        let applier = TreeApplier::open(m.path())?;
                        *sink = Sink::Mounted { mount: m, applier };
                    }
                },
            }
        }
    })?;
    let via_mount = matches!(sink, Sink::Mounted { .. });
    match sink {
        Sink::Tree(t) | Sink::Mounted { applier: t, .. } => t.finish(&mut state)?,
        Sink::Upper { applier, .. } => applier.finish(&mut state)?,
    }
    Ok(Applied {
        descriptor: Descriptor {
            media_type: streamed.compression.media_type().to_string(),
            digest: streamed.digest,
            size: streamed.size,
            diff_id: streamed.diff_id,
        },
        content: state.content.finish(),
        entries: state.entries,
        tar_size: streamed.tar_size,
        via_mount,
    })
}

/// Applies entries to a directory tree through `openat2(RESOLVE_IN_ROOT)`.
struct TreeApplier {
    root: PathBuf,
    root_fd: OwnedFd,
}

impl TreeApplier {
    fn open(root: &Path) -> Result<TreeApplier> {
        let root_fd = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(root, "open the tree to apply into", e.into()))?;
        Ok(TreeApplier {
            root: root.to_path_buf(),
            root_fd,
        })
    }

    /// Opens directory `parts` of the tree, creating missing ones (0755, root).
    fn dir_fd(&self, parts: &[Vec<u8>], shown: &str) -> Result<OwnedFd> {
        let mut fd = rustix::fs::openat(
            &self.root_fd,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(&self.root, "open the tree", e.into()))?;
        for (i, c) in parts.iter().enumerate() {
            let name = OsStr::from_bytes(c);
            let sub_path = join(&parts[..=i]);
            let opened = crate::fsutil::openat2(
                &self.root_fd,
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

    fn entry(&self, state: &mut State, p: &Parsed, data: &mut dyn Read) -> Result<()> {
        let Some((last, parent)) = p.parts.split_last() else {
            return Ok(());
        };
        let rel = join(&p.parts);
        let at = self.root.join(&rel);
        let key = p.parts.join(&b'/');
        match p.whiteout()? {
            Some(Whiteout::Opaque) => {
                let dir = self.dir_fd(parent, &p.shown)?;
                return self.opaque(state, &dir, parent);
            }
            Some(Whiteout::Name(target)) => {
                let dir = self.dir_fd(parent, &p.shown)?;
                remove_all_at(&dir, OsStr::from_bytes(target))
                    .map_err(|e| Error::io(self.root.join(join(parent)), "apply a whiteout", e))?;
                let mut k = parent.join(&b'/');
                if !k.is_empty() {
                    k.push(b'/');
                }
                k.extend_from_slice(target);
                state.content.record(&k, Record::Deleted);
                return Ok(());
            }
            None => {}
        }
        let dir = self.dir_fd(parent, &p.shown)?;
        let name = OsStr::from_bytes(last);
        // What is there now: keep a directory for a directory, replace anything else.
        let existing = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).ok();
        let keep_dir = p.kind.is_dir()
            && existing
                .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
        if p.kind == tar::EntryType::Link {
            // The target is resolved before anything at the name is removed.
            let tparts = p.link_parts()?;
            let (tlast, tparent) = tparts.split_last().unwrap_or((&tparts[0], &[]));
            let tdir = self.dir_fd(tparent, &p.shown)?;
            if existing.is_some() {
                remove_all_at(&dir, name).map_err(|e| Error::io(&at, "replace", e))?;
            }
            // flags 0: a link to a symlink links the symlink itself.
            rustix::fs::linkat(&tdir, OsStr::from_bytes(tlast), &dir, name, AtFlags::empty())
                .map_err(|e| Error::io(&at, "create the hard link (its target must come earlier in the layer or a lower one)", e.into()))?;
            let record = match state.content.file(&tparts.join(&b'/')) {
                Some(r) => r.clone(),
                None => record_at(&dir, name, &at)?,
            };
            state.content.record(&key, record);
            state.created.insert(rel);
            return Ok(());
        }
        if existing.is_some() && !keep_dir {
            remove_all_at(&dir, name).map_err(|e| Error::io(&at, "replace", e))?;
        }
        if p.kind.is_dir() {
            if !keep_dir {
                rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| Error::io(&at, "create the directory", e.into()))?;
            }
            let fd = rustix::fs::openat(
                &dir,
                name,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(&at, "open the directory", e.into()))?;
            set_attrs(&fd, p, &at)?;
            state.dir_times.push((rel.clone(), p.times()));
            state.content.record(&key, p.dir_record());
        } else {
            let record = create_at(&dir, name, p, data, &at)?;
            state.content.record(&key, record);
        }
        state.created.insert(rel);
        Ok(())
    }

    /// Opaque: hide everything the lower layers had in this directory.
    fn opaque(&self, state: &mut State, dir: &OwnedFd, parent: &[Vec<u8>]) -> Result<()> {
        let parent_rel = join(parent);
        let at = self.root.join(&parent_rel);
        let names = dir_names(dir).map_err(|e| Error::io(&at, "read", e))?;
        for n in names {
            if !state
                .created
                .contains(&parent_rel.join(OsStr::from_bytes(&n)))
            {
                remove_all_at(dir, OsStr::from_bytes(&n))
                    .map_err(|e| Error::io(&at, "apply an opaque whiteout", e))?;
            }
        }
        state.content.opaque(&parent.join(&b'/'));
        Ok(())
    }

    fn finish(&self, state: &mut State) -> Result<()> {
        finish_dir_times(state, &self.root, |rel| {
            match crate::fsutil::openat2(
                &self.root_fd,
                rel,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(fd) => Ok(Some(fd)),
                Err(
                    rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP,
                ) => Ok(None),
                Err(e) => Err(Error::io(self.root.join(rel), "open a directory", e.into())),
            }
        })
    }
}
