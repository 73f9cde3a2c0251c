//! A full-fidelity recursive copy of a directory tree.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, CWD};

/// Copies the tree at `src` to `dst`, which must not exist yet.
///
/// Preserved: file types (regular files, directories, symlinks — dangling ones too, never
/// followed — character and block devices, including overlay's 0/0 whiteouts, fifos and
/// sockets, recreated as socket inodes); permission bits including setuid, setgid and sticky;
/// owners; every extended attribute (`user.*`, `trusted.*`, `security.*`); hardlink sets
/// (later names become links to the first copy); access and modification times with
/// nanoseconds. File contents are copied with `copy_file_range`, which shares extents where
/// the file system can. Not preserved: the change time and birth time (the kernel sets them),
/// and holes in sparse files (their data is copied as written).
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let mut links = HashMap::new();
    let meta = fs::symlink_metadata(src)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", src.display()),
        ));
    }
    fs::create_dir(dst)?;
    copy_dir_contents(src, dst, &mut links)?;
    finish(src, dst, &meta)
}

fn copy_dir_contents(
    src: &Path,
    dst: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(src)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let s = entry.path();
        let d = dst.join(entry.file_name());
        copy_entry(&s, &d, links).map_err(|e| annotate(e, &s))?;
    }
    Ok(())
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    if e.to_string().contains(&*path.to_string_lossy()) {
        return e;
    }
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn copy_entry(s: &Path, d: &Path, links: &mut HashMap<(u64, u64), PathBuf>) -> io::Result<()> {
    let meta = fs::symlink_metadata(s)?;
    let ft = meta.file_type();
    if !ft.is_dir() && meta.nlink() > 1 {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            return fs::hard_link(first, d);
        }
        links.insert((meta.dev(), meta.ino()), d.to_path_buf());
    }
    if ft.is_dir() {
        fs::create_dir(d)?;
        copy_dir_contents(s, d, links)?;
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(s)?, d)?;
    } else if ft.is_file() {
        copy_file(s, d)?;
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
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "unknown file type",
            ));
        };
        rustix::fs::mknodat(CWD, d, kind, Mode::from_raw_mode(0o600), meta.rdev())?;
    }
    finish(s, d, &meta)
}

fn copy_file(s: &Path, d: &Path) -> io::Result<()> {
    let src = fs::File::open(s)?;
    let dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_0600()
        .open(d)?;
    let len = src.metadata()?.len();
    let mut copied = 0u64;
    while copied < len {
        let want = usize::try_from(len - copied)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(&src, None, &dst, None, want) {
            Ok(0) => break, // the file shrank while we copied
            Ok(n) => copied += n as u64,
            Err(e) if e == rustix::io::Errno::XDEV || e == rustix::io::Errno::NOSYS => {
                // Older kernels refuse across file systems: fall back to a plain copy.
                let mut r = &src;
                let mut w = &dst;
                io::copy(&mut r, &mut w)?;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// Owner, xattrs, mode and times, in that order: chown clears setuid/setgid, and writing
/// xattrs or children changes times.
fn finish(s: &Path, d: &Path, meta: &fs::Metadata) -> io::Result<()> {
    rustix::fs::chownat(
        CWD,
        d,
        Some(rustix::fs::Uid::from_raw(meta.uid())),
        Some(rustix::fs::Gid::from_raw(meta.gid())),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    copy_xattrs(s, d)?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(d, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
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
    rustix::fs::utimensat(CWD, d, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

fn copy_xattrs(s: &Path, d: &Path) -> io::Result<()> {
    let names = list_xattrs(s)?;
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let value = get_xattr(s, name)?;
        rustix::fs::lsetxattr(d, name, &value, rustix::fs::XattrFlags::empty())?;
    }
    Ok(())
}

fn list_xattrs(p: &Path) -> io::Result<Vec<u8>> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(p, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e == rustix::io::Errno::NOTSUP => return Ok(Vec::new()),
            // The buffer is too small: grow it and ask again.
            Err(e) if e == rustix::io::Errno::RANGE && size < (1 << 24) => size *= 4,
            Err(e) => return Err(e.into()),
        }
    }
}

fn get_xattr(p: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e == rustix::io::Errno::RANGE && size < (1 << 24) => size *= 4,
            Err(e) => return Err(e.into()),
        }
    }
}
