//! File-system appliers, after continuity's `fs/fstest/file.go`: each [`Op`] is one change,
//! applied relative to a root directory with the same system calls (and so the same results)
//! as continuity's, so that a mounted snapshot and a flat directory can be given the same
//! change and compared.
//!
//! Paths are relative to the root whatever their leading `/`. Modes are exact: they are set
//! with a `chmod` after creation, so the umask does not matter (containerd's suite also clears
//! it).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One file-system change, applied relative to a root directory by [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates (or truncates and rewrites in place) a regular file with this content, then sets
    /// its mode (`fstest.CreateFile`).
    CreateFile(&'static str, Vec<u8>, u32),
    /// [`Op::CreateFile`] with a computed path.
    CreateFileOwned(String, Vec<u8>, u32),
    /// Creates a directory and any missing parent with this mode, then sets the mode of the
    /// directory (`fstest.CreateDir`: `MkdirAll` then `Chmod`; an existing directory is fine).
    CreateDir(&'static str, u32),
    /// [`Op::CreateDir`] with a computed path.
    CreateDirOwned(String, u32),
    /// Removes one file or empty directory; a missing path is an error (`fstest.Remove`).
    Remove(&'static str),
    /// [`Op::Remove`] with a computed path.
    RemoveOwned(String),
    /// Removes a path and everything under it; a missing path is fine (`fstest.RemoveAll`).
    RemoveAll(&'static str),
    /// Changes the owner, following a symlink (`fstest.Chown`).
    Chown(&'static str, u32, u32),
    /// Changes the owner of a symlink itself.
    Lchown(&'static str, u32, u32),
    /// Changes the mode, setuid, setgid and sticky bits included (`fstest.Chmod`).
    Chmod(&'static str, u32),
    /// Hard links `new` to `old`: `Link(old, new)` (`fstest.Link`).
    Link(&'static str, &'static str),
    /// Creates symlink `link` with target `target`: `Symlink(target, link)`; the target is
    /// stored as given, not resolved under the root (`fstest.Symlink`).
    Symlink(&'static str, &'static str),
    /// Renames `old` to `new`: `Rename(old, new)` (`fstest.Rename`).
    Rename(&'static str, &'static str),
    /// Creates a device node or a FIFO: `CreateDevice(path, mode, major, minor)`, where `mode`
    /// carries the file type as for mknod(2) (`0o020644` is a character device, `0o060644` a
    /// block device, `0o010644` a FIFO), then sets the permission bits exactly
    /// (`fstest.CreateDeviceFile`).
    CreateDevice(&'static str, u32, u32, u32),
    /// Sets the access and modification times, following a symlink (`fstest.Chtimes`).
    Chtimes(&'static str, SystemTime, SystemTime),
    /// Sets the mode of the root directory itself to 0755. containerd's `fstest.Base` is a
    /// no-op on Unix (it builds a Windows base layer); this one makes a flat copy's root look
    /// like a fresh snapshot's. The comparison leaves the roots out either way.
    Base,
}

/// Applies `ops` under `root`, in order; the error names the operation that failed.
pub fn apply(root: &Path, ops: &[Op]) -> io::Result<()> {
    for op in ops {
        apply_one(root, op).map_err(|e| {
            io::Error::new(e.kind(), format!("{op:?} under {}: {e}", root.display()))
        })?;
    }
    Ok(())
}

fn at(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn apply_one(root: &Path, op: &Op) -> io::Result<()> {
    match op {
        Op::CreateFile(p, data, mode) => create_file(&at(root, p), data, *mode),
        Op::CreateFileOwned(p, data, mode) => create_file(&at(root, p), data, *mode),
        Op::CreateDir(p, mode) => create_dir(&at(root, p), *mode),
        Op::CreateDirOwned(p, mode) => create_dir(&at(root, p), *mode),
        Op::Remove(p) => remove(&at(root, p)),
        Op::RemoveOwned(p) => remove(&at(root, p)),
        Op::RemoveAll(p) => {
            let path = at(root, p);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
                Ok(_) => fs::remove_file(&path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::Chown(p, uid, gid) => std::os::unix::fs::chown(at(root, p), Some(*uid), Some(*gid)),
        Op::Lchown(p, uid, gid) => std::os::unix::fs::lchown(at(root, p), Some(*uid), Some(*gid)),
        Op::Chmod(p, mode) => chmod(&at(root, p), *mode),
        Op::Link(old, new) => fs::hard_link(at(root, old), at(root, new)),
        Op::Symlink(target, link) => std::os::unix::fs::symlink(target, at(root, link)),
        Op::Rename(old, new) => fs::rename(at(root, old), at(root, new)),
        Op::CreateDevice(p, mode, major, minor) => {
            create_device(&at(root, p), *mode, *major, *minor)
        }
        Op::Chtimes(p, atime, mtime) => chtimes(&at(root, p), *atime, *mtime),
        Op::Base => chmod(root, 0o755),
    }
}

fn chmod(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn create_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    // Like Go's os.OpenFile(O_WRONLY|O_CREATE|O_TRUNC): an existing file is rewritten in
    // place (same inode), which is what the same-size-rewrite cases are about.
    fs::write(path, data)?;
    chmod(path, mode)
}

fn create_dir(path: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)?;
    chmod(path, mode)
}

fn create_device(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    use rustix::fs::{FileType, Mode, CWD};
    let file_type = FileType::from_raw_mode(mode);
    if !matches!(
        file_type,
        FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo
    ) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("mode {mode:o} is not a character device, block device or FIFO"),
        ));
    }
    rustix::fs::mknodat(
        CWD,
        path,
        file_type,
        Mode::from_raw_mode(mode & 0o7777),
        rustix::fs::makedev(major, minor),
    )?;
    chmod(path, mode & 0o7777)
}

fn timespec(t: SystemTime) -> io::Result<rustix::fs::Timespec> {
    let d = t
        .duration_since(UNIX_EPOCH)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(rustix::fs::Timespec {
        tv_sec: i64::try_from(d.as_secs())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        tv_nsec: d.subsec_nanos().into(),
    })
}

fn chtimes(path: &Path, atime: SystemTime, mtime: SystemTime) -> io::Result<()> {
    let times = rustix::fs::Timestamps {
        last_access: timespec(atime)?,
        last_modification: timespec(mtime)?,
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &times, rustix::fs::AtFlags::empty())?;
    Ok(())
}

/// Removes one file or empty directory.
fn remove(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    }
}
