//! Writing a layer: the changes between a lower tree and an upper tree, as a deterministic
//! OCI layer tar.
//!
//! The generic differ walks both trees side by side, one directory at a time in byte order
//! of names, parents before children (containerd's order). A path only in the upper tree is
//! added; only in the lower one, it becomes a whiteout `.wh.<name>`; in both, it is written
//! when it changed. "Changed" compares type, mode, owner, device, size, modification time
//! (nanoseconds), link count, symlink target and `security.capability` — and, when all of those agree but
//! the two are different inodes, the **content**: metadata alone misses a rewrite that keeps
//! size and time (seed 000 of this project). Directories that hold a change are written too,
//! so that an applier recreates them with their attributes.
//!
//! The tar is the same for the same change set, on every backend: PAX format, no user or
//! group names, modification times truncated to seconds (and clamped to `SOURCE_DATE_EPOCH`
//! when [`DiffOptions::source_date_epoch`] is set), whiteouts with time 0, directories named
//! with a trailing `/`, hard links grouped by inode (later names as links to the first),
//! sockets skipped, and only the `security.capability` extended attribute kept.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::digest::{HashWriter, ThreadedHashWriter};
use super::{Compression, Descriptor, OverlayXattrs};
use crate::error::{Error, Result};

/// The one extended attribute a layer carries (as containerd's writer).
const CAPABILITY: &str = "security.capability";

/// How to write a layer.
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Compression of the blob.
    pub compression: Compression,
    /// Clamp modification times to this (seconds since the epoch), for reproducible builds.
    pub source_date_epoch: Option<i64>,
    /// Never take the overlay fast path (to compare it with the generic differ).
    pub force_generic: bool,
}

impl DiffOptions {
    /// Options with `source_date_epoch` taken from the `SOURCE_DATE_EPOCH` environment
    /// variable when it is set to a number.
    pub fn from_env(compression: Compression) -> DiffOptions {
        DiffOptions {
            compression,
            source_date_epoch: std::env::var("SOURCE_DATE_EPOCH")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            force_generic: false,
        }
    }
}

/// Counts of what a layer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Entries written, whiteouts included.
    pub entries: u64,
    /// Whiteouts among them.
    pub whiteouts: u64,
    /// Bytes of file content.
    pub content_bytes: u64,
    /// Whether the overlay fast path wrote the layer (from the upper directory alone).
    pub fast_path: bool,
}

/// Writes the changes from `lower` (none: everything is new) to `upper` as a layer to `out`,
/// compressed as asked, and returns its descriptor and counts. Memory stays bounded by the
/// largest directory, whatever the layer's size.
pub fn write_layer<W: Write>(
    lower: Option<&Path>,
    upper: &Path,
    out: W,
    opts: &DiffOptions,
) -> Result<(Descriptor, DiffStats, W)> {
    write_layer_from(lower, Source::Tree(upper), out, opts)
}

/// Whether [`write_overlay_layer`] can write the layer of `upper_dir`: not when the
/// directory uses `redirect_dir` or `metacopy` (whose meaning needs the generic differ), nor
/// when the options force the generic differ.
pub fn overlay_fast_path_applies(upper_dir: &Path, opts: &DiffOptions) -> Result<bool> {
    overlay_fast_path_applies_with(upper_dir, OverlayXattrs::Trusted, opts)
}

/// [`overlay_fast_path_applies`] for an upper directory whose overlayfs markers live under
/// `xattrs` (`user.overlay.*` for a store mounted with `userxattr`).
pub fn overlay_fast_path_applies_with(
    upper_dir: &Path,
    xattrs: OverlayXattrs,
    opts: &DiffOptions,
) -> Result<bool> {
    Ok(!opts.force_generic && !uses_redirect_or_metacopy(upper_dir, xattrs)?)
}

/// Like [`write_layer`], from an overlayfs upper directory (`upper_dir`) instead of a mounted
/// upper tree: only the directory's own entries are read (char 0/0 = deletion, an opaque
/// directory = its lower entries deleted), never the unchanged lower layers. The output is
/// byte for byte the generic differ's. Check [`overlay_fast_path_applies`] first.
pub fn write_overlay_layer<W: Write>(
    lower: Option<&Path>,
    upper_dir: &Path,
    out: W,
    opts: &DiffOptions,
) -> Result<(Descriptor, DiffStats, W)> {
    write_overlay_layer_with(lower, upper_dir, OverlayXattrs::Trusted, out, opts)
}

/// [`write_overlay_layer`] for an upper directory whose overlayfs markers live under
/// `xattrs` (`user.overlay.*` for a store mounted with `userxattr`). The layer does not
/// depend on it: an opaque directory's lower entries become whiteouts either way, and no
/// overlayfs attribute is ever written. Check [`overlay_fast_path_applies_with`] first.
pub fn write_overlay_layer_with<W: Write>(
    lower: Option<&Path>,
    upper_dir: &Path,
    xattrs: OverlayXattrs,
    out: W,
    opts: &DiffOptions,
) -> Result<(Descriptor, DiffStats, W)> {
    write_layer_from(lower, Source::OverlayUpper(upper_dir, xattrs), out, opts)
}

/// Where the upper side of a diff comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A mounted tree: compare everything with the lower tree.
    Tree(&'a Path),
    /// An overlayfs upper directory, with where its markers live: only what it holds changed.
    OverlayUpper(&'a Path, OverlayXattrs),
}

impl Source<'_> {
    fn path(&self) -> &Path {
        match self {
            Source::Tree(p) | Source::OverlayUpper(p, _) => p,
        }
    }
}

fn uses_redirect_or_metacopy(dir: &Path, xattrs: OverlayXattrs) -> Result<bool> {
    for name in [xattrs.redirect(), xattrs.metacopy()] {
        if has_xattr(dir, name)? {
            return Ok(true);
        }
    }
    // The entries' types come from the directory itself (d_type): no stat per entry, in a
    // walk that runs before every fast diff.
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, "read a directory", e))? {
        let entry = entry.map_err(|e| Error::io(dir, "read a directory", e))?;
        let p = entry.path();
        let ft = entry.file_type().map_err(|e| Error::io(&p, "stat", e))?;
        if ft.is_dir() {
            if uses_redirect_or_metacopy(&p, xattrs)? {
                return Ok(true);
            }
        } else if ft.is_file() && has_xattr(&p, xattrs.metacopy())? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn has_xattr(p: &Path, name: &str) -> Result<bool> {
    let mut buf = [0u8; 256];
    match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::NOTSUP) => Ok(false),
        Err(rustix::io::Errno::RANGE) => Ok(true),
        Err(e) => Err(Error::io(p, "read an overlay attribute", e.into())),
    }
}

fn is_opaque(p: &Path, xattrs: OverlayXattrs) -> Result<bool> {
    let mut buf = [0u8; 8];
    match rustix::fs::lgetxattr(p, xattrs.opaque(), &mut buf[..]) {
        Ok(n) => Ok(&buf[..n] == b"y"),
        Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::NOTSUP) => Ok(false),
        Err(e) => Err(Error::io(p, "read the opaque attribute", e.into())),
    }
}

fn write_layer_from<W: Write>(
    lower: Option<&Path>,
    source: Source<'_>,
    out: W,
    opts: &DiffOptions,
) -> Result<(Descriptor, DiffStats, W)> {
    let upper = source.path();
    let (diff_id, stats, blob) = match opts.compression {
        Compression::None => {
            // The blob is the tar: one hash gives both its digest and the diffID.
            let (diff_id, size, stats, out) = write_tar(lower, source, out, opts)?;
            return Ok((
                Descriptor {
                    media_type: opts.compression.media_type().to_string(),
                    digest: diff_id.clone(),
                    size,
                    diff_id,
                },
                stats,
                out,
            ));
        }
        Compression::Gzip => {
            let blob = HashWriter::new(out);
            let gz = flate2::write::GzEncoder::new(blob, flate2::Compression::default());
            let (id, _, stats, gz) = write_tar(lower, source, gz, opts)?;
            let blob = gz
                .finish()
                .map_err(|e| Error::io(upper, "finish gzip", e))?;
            (id, stats, blob)
        }
        Compression::Zstd => {
            let blob = HashWriter::new(out);
            let mut z = zstd::stream::write::Encoder::new(blob, 3)
                .map_err(|e| Error::io(upper, "start zstd", e))?;
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            z.multithread(u32::try_from(threads).unwrap_or(1))
                .map_err(|e| Error::io(upper, "start zstd threads", e))?;
            let (id, _, stats, z) = write_tar(lower, source, z, opts)?;
            let blob = z.finish().map_err(|e| Error::io(upper, "finish zstd", e))?;
            (id, stats, blob)
        }
    };
    let (digest, size, out) = blob.finish();
    Ok((
        Descriptor {
            media_type: opts.compression.media_type().to_string(),
            digest,
            size,
            diff_id,
        },
        stats,
        out,
    ))
}

fn write_tar<W: Write>(
    lower: Option<&Path>,
    source: Source<'_>,
    out: W,
    opts: &DiffOptions,
) -> Result<(super::Digest, u64, DiffStats, W)> {
    let upper = source.path();
    let mut w = Writer {
        tar: tar::Builder::new(ThreadedHashWriter::new(out)),
        upper: upper.to_path_buf(),
        links: HashMap::new(),
        stats: DiffStats::default(),
        epoch: opts.source_date_epoch,
        written_dirs: Vec::new(),
    };
    let upper_meta =
        fs::symlink_metadata(upper).map_err(|e| Error::io(upper, "read the upper tree", e))?;
    if !upper_meta.is_dir() {
        return Err(Error::invalid(
            format!("upper {}", upper.display()),
            "is not a directory",
        ));
    }
    match source {
        Source::Tree(_) => diff_dir(&mut w, lower, upper, Path::new(""))?,
        Source::OverlayUpper(_, xattrs) => {
            w.stats.fast_path = true;
            diff_upper_dir(&mut w, lower, upper, Path::new(""), false, xattrs)?;
        }
    }
    let hashed = w
        .tar
        .into_inner()
        .map_err(|e| Error::io(upper, "finish the tar", e))?;
    let (diff_id, size, out) = hashed
        .finish()
        .map_err(|e| Error::io(upper, "write the layer", e))?;
    Ok((diff_id, size, w.stats, out))
}

struct Writer<W: Write> {
    tar: tar::Builder<ThreadedHashWriter<W>>,
    upper: PathBuf,
    /// (dev, ino) of hard-linked files written so far → their name in the layer.
    links: HashMap<(u64, u64), PathBuf>,
    stats: DiffStats,
    epoch: Option<i64>,
    /// Directories of the current path already written (a stack).
    written_dirs: Vec<PathBuf>,
}

fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, "read a directory", e))? {
        names.push(
            e.map_err(|e| Error::io(dir, "read a directory", e))?
                .file_name(),
        );
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// The metadata of `p`, `None` when it does not exist in that tree — including when one of
/// its parents is not a directory there (ENOTDIR: a file replaced by a directory).
fn lstat(p: &Path) -> Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) => Ok(None),
        Err(e) => Err(Error::io(p, "stat", e)),
    }
}

/// The union of two sorted name lists, in order, each with whether it is in the first
/// and in the second.
fn merge_sorted<'a>(
    up: &'a [std::ffi::OsString],
    low: &'a [std::ffi::OsString],
) -> Vec<(&'a std::ffi::OsString, bool, bool)> {
    let mut out = Vec::with_capacity(up.len().max(low.len()));
    let (mut i, mut j) = (0, 0);
    while i < up.len() || j < low.len() {
        let in_up = j >= low.len() || (i < up.len() && up[i].as_bytes() <= low[j].as_bytes());
        let in_low = i >= up.len() || (j < low.len() && low[j].as_bytes() <= up[i].as_bytes());
        out.push((if in_up { &up[i] } else { &low[j] }, in_up, in_low));
        i += usize::from(in_up);
        j += usize::from(in_low);
    }
    out
}

/// Compares `lower` and `upper` directories (`rel` below the roots).
fn diff_dir<W: Write>(
    w: &mut Writer<W>,
    lower: Option<&Path>,
    upper: &Path,
    rel: &Path,
) -> Result<()> {
    let up_names = sorted_names(&upper.join(rel))?;
    let low_names = match lower {
        Some(l) if lstat(&l.join(rel))?.is_some_and(|m| m.is_dir()) => sorted_names(&l.join(rel))?,
        _ => Vec::new(),
    };
    for (name, in_up, in_low) in merge_sorted(&up_names, &low_names) {
        let path = rel.join(name);
        match (in_up, in_low) {
            (true, true) => {
                let lm = lstat(&lower.map_or_else(PathBuf::new, |l| l.join(&path)))?;
                changed_entry(w, lower, upper, &path, lm)?;
            }
            (true, false) => add_entry(w, lower, upper, &path)?,
            (false, _) => whiteout(w, &path)?,
        }
    }
    Ok(())
}

/// The overlay fast path: like [`diff_dir`], but `upper` is an overlayfs upper directory, so
/// only its entries can have changed; lower entries are listed only below opaque directories.
/// `hidden`: an ancestor of `rel` is opaque. Below an opaque directory the lower directory
/// does not show through at all, not even in the subdirectories the upper one holds, so what
/// only the lower directory holds there is deleted too.
fn diff_upper_dir<W: Write>(
    w: &mut Writer<W>,
    lower: Option<&Path>,
    upper: &Path,
    rel: &Path,
    hidden: bool,
    xattrs: OverlayXattrs,
) -> Result<()> {
    let dir = upper.join(rel);
    let up_names = sorted_names(&dir)?;
    let hidden = hidden || is_opaque(&dir, xattrs)?;
    let low_names = match lower {
        Some(l) if hidden && lstat(&l.join(rel))?.is_some_and(|m| m.is_dir()) => {
            sorted_names(&l.join(rel))?
        }
        _ => Vec::new(),
    };
    for (name, in_up, _) in merge_sorted(&up_names, &low_names) {
        let path = rel.join(name);
        if in_up {
            let full = upper.join(&path);
            let um = fs::symlink_metadata(&full).map_err(|e| Error::io(&full, "stat", e))?;
            let lm = match lower {
                Some(l) => lstat(&l.join(&path))?,
                None => None,
            };
            if um.file_type().is_char_device() && um.rdev() == 0 {
                // An overlay whiteout: a deletion, when there was something to delete.
                if lm.is_some() {
                    whiteout(w, &path)?;
                }
            } else if um.is_dir() {
                let low_dir = lm.as_ref().is_some_and(|m| m.is_dir());
                let low = lower.map_or_else(PathBuf::new, |l| l.join(&path));
                let changed = !low_dir
                    || lm.as_ref().is_some_and(|lm| meta_differs(&um, lm))
                    || capability(&full)? != capability(&low)?;
                if changed {
                    write_entry(w, &path, &full, &um)?;
                }
                diff_upper_dir(
                    w,
                    if low_dir || is_opaque(&full, xattrs)? {
                        lower
                    } else {
                        None
                    },
                    upper,
                    &path,
                    hidden,
                    xattrs,
                )?;
            } else {
                match lm {
                    Some(lm) => changed_entry(w, lower, upper, &path, Some(lm))?,
                    None => add_entry(w, None, upper, &path)?,
                }
            }
        } else {
            whiteout(w, &path)?;
        }
    }
    Ok(())
}

/// A path present in both trees.
fn changed_entry<W: Write>(
    w: &mut Writer<W>,
    lower: Option<&Path>,
    upper: &Path,
    path: &Path,
    lm: Option<fs::Metadata>,
) -> Result<()> {
    let up = upper.join(path);
    let um = fs::symlink_metadata(&up).map_err(|e| Error::io(&up, "stat", e))?;
    let Some(lm) = lm else {
        return add_entry(w, lower, upper, path);
    };
    let low = lower.map_or_else(PathBuf::new, |l| l.join(path));
    let ut = um.file_type();
    let lt = lm.file_type();
    if ut.is_dir() && lt.is_dir() {
        if meta_differs(&um, &lm) || capability(&up)? != capability(&low)? {
            write_entry(w, path, &up, &um)?;
        }
        return diff_dir(w, lower, upper, path);
    }
    let same_type = ut.is_file() == lt.is_file()
        && ut.is_symlink() == lt.is_symlink()
        && ut.is_char_device() == lt.is_char_device()
        && ut.is_block_device() == lt.is_block_device()
        && ut.is_fifo() == lt.is_fifo()
        && ut.is_socket() == lt.is_socket()
        && !lt.is_dir();
    let changed = !same_type
        || meta_differs(&um, &lm)
        || um.size() != lm.size()
        || um.rdev() != lm.rdev()
        || (ut.is_symlink()
            && fs::read_link(&up).map_err(|e| Error::io(&up, "read a link", e))?
                != fs::read_link(&low).map_err(|e| Error::io(&low, "read a link", e))?)
        || capability(&up)? != capability(&low)?
        // A new (or removed) hard link to an unchanged file: the file must be written so
        // that the other name can be written as a link to it.
        || (ut.is_file() && um.nlink() != lm.nlink())
        || (ut.is_file()
            && (um.dev(), um.ino()) != (lm.dev(), lm.ino())
            && !same_content(&up, &low)?);
    if changed {
        add_entry(w, lower, upper, path)?;
    }
    Ok(())
}

fn meta_differs(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.mode() != b.mode()
        || a.uid() != b.uid()
        || a.gid() != b.gid()
        || a.mtime() != b.mtime()
        || a.mtime_nsec() != b.mtime_nsec()
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let mut fa = fs::File::open(a).map_err(|e| Error::io(a, "open to compare", e))?;
    let mut fb = fs::File::open(b).map_err(|e| Error::io(b, "open to compare", e))?;
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| Error::io(a, "read to compare", e))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| Error::io(b, "read to compare", e))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn capability(p: &Path) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(p, CAPABILITY, &mut buf[..]) {
        Ok(n) => {
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(e)
            if e == rustix::io::Errno::NODATA
                || e == rustix::io::Errno::NOTSUP
                || e == rustix::io::Errno::NOENT =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::io(p, "read security.capability", e.into())),
    }
}

/// A path present only in the upper tree (or replacing another type): written, and for a
/// directory everything below it.
fn add_entry<W: Write>(
    w: &mut Writer<W>,
    lower: Option<&Path>,
    upper: &Path,
    path: &Path,
) -> Result<()> {
    let up = upper.join(path);
    let um = fs::symlink_metadata(&up).map_err(|e| Error::io(&up, "stat", e))?;
    if um.file_type().is_socket() {
        return Ok(()); // sockets are not part of layers
    }
    write_entry(w, path, &up, &um)?;
    if um.is_dir() {
        // Whatever the lower tree had below a path that was not a directory there is gone;
        // if it was one, compare below it.
        diff_dir(w, lower, upper, path)?;
    }
    Ok(())
}

fn whiteout<W: Write>(w: &mut Writer<W>, path: &Path) -> Result<()> {
    let name = path.file_name().map(OsStr::as_bytes).unwrap_or_default();
    let mut wh = b".wh.".to_vec();
    wh.extend_from_slice(name);
    let wh_path = path.with_file_name(OsStr::from_bytes(&wh));
    ensure_parents(w, &wh_path)?;
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(0);
    append(w, h, &wh_path, None, &[], io::empty())?;
    w.stats.whiteouts += 1;
    Ok(())
}

/// Writes the directories above `path` that were not written yet (parents before children).
fn ensure_parents<W: Write>(w: &mut Writer<W>, path: &Path) -> Result<()> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    // The walk is depth-first: only ancestors of the current path can matter, so the
    // stack stays as deep as the tree.
    w.written_dirs.retain(|d| path.starts_with(d));
    if w.written_dirs.iter().any(|d| d == parent) {
        return Ok(());
    }
    ensure_parents(w, parent)?;
    let full = w.upper.join(parent);
    let m = fs::symlink_metadata(&full).map_err(|e| Error::io(&full, "stat", e))?;
    write_header_only(w, parent, &full, &m)
}

fn write_entry<W: Write>(
    w: &mut Writer<W>,
    path: &Path,
    full: &Path,
    m: &fs::Metadata,
) -> Result<()> {
    ensure_parents(w, path)?;
    if m.is_dir() && w.written_dirs.iter().any(|d| d == path) {
        return Ok(());
    }
    write_header_only(w, path, full, m)
}

fn write_header_only<W: Write>(
    w: &mut Writer<W>,
    path: &Path,
    full: &Path,
    m: &fs::Metadata,
) -> Result<()> {
    // In a layer, `.wh.<name>` means "<name> is deleted": a file of the snapshot named so
    // would come back from any applier as a deletion (or be refused), not as itself.
    if path
        .file_name()
        .is_some_and(|n| n.as_bytes().starts_with(b".wh."))
    {
        return Err(Error::invalid(
            full.display().to_string(),
            "its name starts with \".wh.\", which a layer can only hold as a deletion (an OCI \
             whiteout): rename or remove it in the snapshot, then diff again",
        ));
    }
    let ft = m.file_type();
    let mut h = tar::Header::new_ustar();
    h.set_mode(m.mode() & 0o7777);
    h.set_uid(u64::from(m.uid()));
    h.set_gid(u64::from(m.gid()));
    let mut mtime = m.mtime().max(0);
    if let Some(epoch) = w.epoch {
        mtime = mtime.min(epoch.max(0));
    }
    h.set_mtime(u64::try_from(mtime).unwrap_or(0));
    h.set_size(0);
    let mut pax: Vec<(&str, Vec<u8>)> = Vec::new();
    if let Some(cap) = capability(full)? {
        pax.push(("SCHILY.xattr.security.capability", cap));
    }
    let mut link: Option<PathBuf> = None;
    if ft.is_dir() {
        h.set_entry_type(tar::EntryType::Directory);
        // Track written directories as a stack along the current walk.
        w.written_dirs.retain(|d| path.starts_with(d));
        w.written_dirs.push(path.to_path_buf());
        let mut name = path.as_os_str().as_bytes().to_vec();
        name.push(b'/');
        return append(
            w,
            h,
            Path::new(OsStr::from_bytes(&name)),
            None,
            &pax,
            io::empty(),
        );
    }
    if ft.is_file() && m.nlink() > 1 {
        let key = (m.dev(), m.ino());
        if let Some(first) = w.links.get(&key) {
            h.set_entry_type(tar::EntryType::Link);
            let first = first.clone();
            return append(w, h, path, Some(&first), &pax, io::empty());
        }
        w.links.insert(key, path.to_path_buf());
    }
    if ft.is_file() {
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(m.size());
        let f = fs::File::open(full).map_err(|e| Error::io(full, "open", e))?;
        w.stats.content_bytes += m.size();
        // A file that changes while being read would corrupt the archive: read exactly
        // the size in the header and fail if it is short.
        return append(
            w,
            h,
            path,
            None,
            &pax,
            ExactReader {
                inner: f,
                left: m.size(),
                path: full,
            },
        );
    }
    if ft.is_symlink() {
        h.set_entry_type(tar::EntryType::Symlink);
        link = Some(fs::read_link(full).map_err(|e| Error::io(full, "read a link", e))?);
    } else if ft.is_char_device() || ft.is_block_device() {
        h.set_entry_type(if ft.is_char_device() {
            tar::EntryType::Char
        } else {
            tar::EntryType::Block
        });
        let dev = m.rdev();
        h.set_device_major(rustix::fs::major(dev))
            .map_err(|e| Error::io(full, "set the device number", e))?;
        h.set_device_minor(rustix::fs::minor(dev))
            .map_err(|e| Error::io(full, "set the device number", e))?;
    } else if ft.is_fifo() {
        h.set_entry_type(tar::EntryType::Fifo);
    } else {
        return Ok(());
    }
    append(w, h, path, link.as_deref(), &pax, io::empty())
}

struct ExactReader<'a> {
    inner: fs::File,
    left: u64,
    path: &'a Path,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} shrank while it was written to the layer",
                    self.path.display()
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// One PAX record: `"<len> <key>=<value>\n"`, where len counts the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// Appends an entry, with a PAX header first when the name or link does not fit in ustar
/// or extended records are needed.
fn append<W: Write, R: Read>(
    w: &mut Writer<W>,
    mut h: tar::Header,
    path: &Path,
    link: Option<&Path>,
    pax: &[(&str, Vec<u8>)],
    data: R,
) -> Result<()> {
    let mut records: Vec<u8> = Vec::new();
    for (k, v) in pax {
        records.extend(pax_record(k, v));
    }
    if h.set_path(path).is_err() {
        records.extend(pax_record("path", path.as_os_str().as_bytes()));
        h.set_path(truncated(path))
            .map_err(|e| Error::io(path, "set a tar name", e))?;
    }
    if let Some(l) = link {
        if h.set_link_name(l).is_err() {
            records.extend(pax_record("linkpath", l.as_os_str().as_bytes()));
            h.set_link_name(truncated(l))
                .map_err(|e| Error::io(path, "set a tar link name", e))?;
        }
    }
    if !records.is_empty() {
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_mode(0o644);
        x.set_mtime(0);
        x.set_size(records.len() as u64);
        x.set_path("PaxHeaders/entry")
            .map_err(|e| Error::io(path, "set a PAX name", e))?;
        x.set_cksum();
        w.tar
            .append(&x, records.as_slice())
            .map_err(|e| Error::io(path, "write a PAX header", e))?;
    }
    h.set_cksum();
    w.tar
        .append(&h, data)
        .map_err(|e| Error::io(w.upper.join(path), "write to the layer", e))?;
    w.stats.entries += 1;
    Ok(())
}

/// A name short enough for the ustar header (the full one is in the PAX record).
fn truncated(p: &Path) -> PathBuf {
    let b = p.as_os_str().as_bytes();
    let cut = &b[b.len().saturating_sub(99)..];
    PathBuf::from(OsStr::from_bytes(cut).to_os_string())
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect()
}
