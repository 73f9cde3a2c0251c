//! A full-fidelity recursive copy of a directory tree.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom, Timespec, Timestamps, CWD};
use rustix::io::Errno;

/// Copies the tree at `src` to `dst`, which must not exist yet.
///
/// `src` must be a directory (not a symlink to one); `dst` is created with its attributes.
/// Nothing is ever followed: symlinks are copied as symlinks wherever they appear.
///
/// Preserved, for every entry:
///
/// * the file type: regular files, directories, symlinks (dangling ones too), character and
///   block devices with their device number (including overlayfs's 0/0 whiteouts), fifos,
///   and sockets (recreated with `mknod` as unbound socket inodes);
/// * the permission bits, including setuid, setgid and sticky (applied after the owner,
///   since `chown` clears setuid and setgid);
/// * the owner and group (`lchown`);
/// * every extended attribute the caller can list: `user.*`, `trusted.*` (such as overlayfs's
///   `trusted.overlay.opaque`), `security.*` (such as file capabilities, set after the owner
///   and the content since both clear them) and `system.*` (POSIX ACLs);
/// * hardlink sets: the first name of a source inode is copied, later names become hard links
///   to that copy;
/// * access and modification times with nanoseconds, directories' after their children are
///   written;
/// * file content, and holes: the data segments (`SEEK_DATA`/`SEEK_HOLE`) are copied with
///   `copy_file_range` (which shares extents where the file system can), falling back to
///   `pread`/`pwrite`; a whole-file reflink (`FICLONE`) is tried first.
///
/// Not preserved: change and birth times (the kernel sets them), inode flags (`chattr`
/// attributes such as immutable), and, where the file system has no `SEEK_DATA`, holes
/// (their zeros are written out). Source files and directories are opened with `O_NOATIME`
/// where allowed, so copying does not change the source's access times.
///
/// Copying files owned by other users or `trusted.*` attributes needs root (`CAP_CHOWN`,
/// `CAP_MKNOD`, `CAP_SYS_ADMIN`); without it the copy fails with the OS error. On failure,
/// `dst` is left partially written for the caller to remove. Errors name the source path and
/// the step that failed; their [`io::Error::kind`] is the OS error's.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src).map_err(at(src, "lstat"))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            CopyError {
                path: src.to_path_buf(),
                step: "copy a tree",
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
            },
        ));
    }
    let mut copier = Copier {
        links: HashMap::new(),
        buf: Vec::new(),
    };
    copier.copy_dir(src, dst, &meta)
}

/// An I/O error with the source path and the step that failed.
#[derive(Debug)]
struct CopyError {
    path: PathBuf,
    step: &'static str,
    source: io::Error,
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.path.display(), self.step, self.source)
    }
}

impl std::error::Error for CopyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Wraps an error with `path` and `step`, unless a deeper call already did.
fn at<'a, E: Into<io::Error>>(
    path: &'a Path,
    step: &'static str,
) -> impl FnOnce(E) -> io::Error + 'a {
    move |e| {
        let e = e.into();
        if e.get_ref().is_some_and(|inner| inner.is::<CopyError>()) {
            return e;
        }
        io::Error::new(
            e.kind(),
            CopyError {
                path: path.to_path_buf(),
                step,
                source: e,
            },
        )
    }
}

struct Copier {
    /// Source (device, inode) of multiply-linked non-directories → the first copy.
    links: HashMap<(u64, u64), PathBuf>,
    /// The buffer of the `pread`/`pwrite` fallback, allocated when first needed.
    buf: Vec<u8>,
}

impl Copier {
    fn copy_dir(&mut self, s: &Path, d: &Path, meta: &fs::Metadata) -> io::Result<()> {
        // Private until `finish` gives it its mode, whatever the umask.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(d)
            .map_err(at(s, "create the directory copy"))?;
        // The listing is read whole and the directory closed before recursing, so the depth of
        // the tree costs no file descriptors.
        for name in list_dir(s).map_err(at(s, "list the directory"))? {
            self.copy_entry(&s.join(&name), &d.join(&name))?;
        }
        finish(s, d, meta)
    }

    fn copy_entry(&mut self, s: &Path, d: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(s).map_err(at(s, "lstat"))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return self.copy_dir(s, d, &meta);
        }
        if meta.nlink() > 1 {
            if let Some(first) = self.links.get(&(meta.dev(), meta.ino())) {
                // `link` without AT_SYMLINK_FOLLOW: a hardlinked symlink stays one.
                return fs::hard_link(first, d).map_err(at(s, "hard-link to the first copy"));
            }
            self.links.insert((meta.dev(), meta.ino()), d.to_path_buf());
        }
        if ft.is_symlink() {
            let target = fs::read_link(s).map_err(at(s, "read the symlink"))?;
            std::os::unix::fs::symlink(target, d).map_err(at(s, "create the symlink copy"))?;
            // `readlink` may update the link's access time (there is no O_NOATIME for it):
            // give the copy the times the source has now.
            let meta = fs::symlink_metadata(s).map_err(at(s, "lstat"))?;
            return finish(s, d, &meta);
        } else if ft.is_file() {
            self.copy_file(s, d)?;
        } else {
            let kind = if ft.is_char_device() {
                FileType::CharacterDevice
            } else if ft.is_block_device() {
                FileType::BlockDevice
            } else if ft.is_fifo() {
                FileType::Fifo
            } else if ft.is_socket() {
                FileType::Socket
            } else {
                return Err(at(s, "copy")(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("unknown file type (mode {:o})", meta.mode()),
                )));
            };
            rustix::fs::mknodat(CWD, d, kind, Mode::from_raw_mode(0o600), meta.rdev())
                .map_err(at(s, "create the node copy"))?;
        }
        finish(s, d, &meta)
    }

    fn copy_file(&mut self, s: &Path, d: &Path) -> io::Result<()> {
        let src = open_source(s, OFlags::RDONLY).map_err(at(s, "open"))?;
        let dst = rustix::fs::openat(
            CWD,
            d,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(at(s, "create the file copy"))?;
        let len = rustix::fs::fstat(&src).map_err(at(s, "fstat"))?.st_size;
        let len = u64::try_from(len).unwrap_or(0);
        if len == 0 {
            return Ok(());
        }
        // A reflink shares every extent, holes included; most file systems refuse it
        // (EOPNOTSUPP, EXDEV, EINVAL) and the data is copied instead.
        if rustix::fs::ioctl_ficlone(&dst, &src).is_ok() {
            return Ok(());
        }
        // The size first: whatever is not written below stays a hole.
        rustix::fs::ftruncate(&dst, len).map_err(at(s, "set the copy's size"))?;
        let (src, dst) = (fs::File::from(src), fs::File::from(dst));
        self.copy_data(&src, &dst, len)
            .map_err(at(s, "copy the content"))
    }

    /// Copies the data segments of `src` below `len`, leaving its holes as holes.
    fn copy_data(&mut self, src: &fs::File, dst: &fs::File, len: u64) -> io::Result<()> {
        let mut use_cfr = true;
        let mut pos = 0;
        while pos < len {
            let start = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
                Ok(p) => p,
                // Only a hole is left.
                Err(Errno::NXIO) => return Ok(()),
                // No SEEK_DATA on this file system: everything is data.
                Err(_) => pos,
            };
            if start >= len {
                return Ok(());
            }
            let end = match rustix::fs::seek(src, SeekFrom::Hole(start)) {
                Ok(p) if p > start => p.min(len),
                _ => len,
            };
            self.copy_range(src, dst, start, end, &mut use_cfr)?;
            pos = end;
        }
        Ok(())
    }

    /// Copies bytes `off..end` of `src` to the same offsets of `dst`.
    fn copy_range(
        &mut self,
        src: &fs::File,
        dst: &fs::File,
        mut off: u64,
        end: u64,
        use_cfr: &mut bool,
    ) -> io::Result<()> {
        while off < end {
            let want = usize::try_from(end - off)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            if *use_cfr {
                let (mut off_in, mut off_out) = (off, off);
                match rustix::fs::copy_file_range(
                    src,
                    Some(&mut off_in),
                    dst,
                    Some(&mut off_out),
                    want,
                ) {
                    // The file shrank while we copied.
                    Ok(0) => return Ok(()),
                    Ok(n) => off += n as u64,
                    Err(Errno::INTR) => {}
                    // Not across these file systems, or not by this kernel: copy by hand.
                    Err(Errno::XDEV | Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP) => {
                        *use_cfr = false;
                    }
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            if self.buf.is_empty() {
                self.buf = vec![0; 1 << 20];
            }
            let chunk = want.min(self.buf.len());
            match src.read_at(&mut self.buf[..chunk], off) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    dst.write_all_at(&self.buf[..n], off)?;
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Opens `path` without following a final symlink and, where the kernel allows it (owner or
/// `CAP_FOWNER`), without updating its access time.
fn open_source(path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(CWD, path, flags | OFlags::NOATIME, Mode::empty()) {
        Err(Errno::PERM) => Ok(rustix::fs::openat(CWD, path, flags, Mode::empty())?),
        other => Ok(other?),
    }
}

/// The names in directory `path`, sorted, without `.` and `..`.
pub(crate) fn list_dir(path: &Path) -> io::Result<Vec<OsString>> {
    let fd = open_source(path, OFlags::RDONLY | OFlags::DIRECTORY)?;
    let mut dir = rustix::fs::Dir::new(fd)?;
    let mut names = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Owner, xattrs, mode and times, in that order: `chown` clears setuid, setgid and file
/// capabilities, and writing xattrs or children changes times.
fn finish(s: &Path, d: &Path, meta: &fs::Metadata) -> io::Result<()> {
    rustix::fs::chownat(
        CWD,
        d,
        Some(rustix::fs::Uid::from_raw(meta.uid())),
        Some(rustix::fs::Gid::from_raw(meta.gid())),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(at(s, "set the copy's owner"))?;
    copy_xattrs(s, d)?;
    // Symlinks have no mode of their own on Linux (and `d` is never one here otherwise).
    if !meta.file_type().is_symlink() {
        rustix::fs::chmodat(
            CWD,
            d,
            Mode::from_raw_mode(meta.mode() & 0o7777),
            AtFlags::empty(),
        )
        .map_err(at(s, "set the copy's mode"))?;
    }
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec() as _,
        },
        last_modification: Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec() as _,
        },
    };
    rustix::fs::utimensat(CWD, d, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(at(s, "set the copy's times"))?;
    Ok(())
}

fn copy_xattrs(s: &Path, d: &Path) -> io::Result<()> {
    let names = list_xattrs(s).map_err(at(s, "list extended attributes"))?;
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let Some(value) = get_xattr(s, name).map_err(at(s, "read an extended attribute"))? else {
            continue;
        };
        rustix::fs::lsetxattr(d, name, &value, rustix::fs::XattrFlags::empty()).map_err(|e| {
            at(s, "set an extended attribute on the copy")(io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {e}", name.to_string_lossy()),
            ))
        })?;
    }
    Ok(())
}

/// The NUL-separated names of the xattrs of `p` (not following a symlink).
fn list_xattrs(p: &Path) -> io::Result<Vec<u8>> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(p, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // The file system has no xattrs at all.
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            // The buffer is too small (the list grew): grow it and ask again.
            Err(Errno::RANGE) if size < (1 << 24) => size *= 4,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The value of xattr `name` of `p`, `None` if it vanished since it was listed.
fn get_xattr(p: &Path, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(Errno::NODATA) => return Ok(None),
            Err(Errno::RANGE) if size < (1 << 24) => size *= 4,
            Err(e) => return Err(e.into()),
        }
    }
}
