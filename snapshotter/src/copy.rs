//! Copying between two trees the way Docker's `COPY --from` does (BuildKit's semantics).
//!
//! Both trees are directories (mounted snapshots) and every path is resolved relative to a
//! descriptor of its root, never through the host's `/`:
//!
//! * **Sources** are paths inside the source root (a leading `/` is optional; `.` and `..`
//!   are cleaned lexically and `..` stops at the root). A source is resolved with
//!   `openat2(RESOLVE_IN_ROOT)`, so symlinks in it — its last component too — resolve inside
//!   the root (a link to `/etc` means `<root>/etc`). A source that does not resolve is an
//!   [`Error::InvalidArgument`] naming it. Below a source nothing is followed: entries are
//!   opened with `O_NOFOLLOW` relative to their directory, and symlinks (dangling and absolute
//!   ones included) are copied as symlinks with their target bytes unchanged. Sources are
//!   literal paths: no wildcards are expanded.
//! * **The destination** is resolved inside the destination root the same way (an existing
//!   symlink to a directory is followed inside the root); missing directories are created
//!   `0755`, owned by root or by the `chown` owner. A directory source has its *contents*
//!   copied into `dest`. A file, symlink or other source goes to `dest/<name>` when `dest`
//!   ends with `/` or is an existing directory, else it becomes `dest`; `<name>` is the last
//!   component of the source as named (not of what a symlink there resolves to). With more
//!   than one source, `dest` must end with `/`, as in Docker. With
//!   [`parents`](CopyOptions::parents) (`COPY --parents`) the source's path is kept:
//!   `dest/<source path>`, its missing directories created like those of `dest`.
//! * **At a target name**, an existing directory is merged into (its own attributes are left
//!   as they are) when a directory is copied there, and an existing non-directory is removed
//!   first; a non-directory never replaces an existing directory (an error, as in BuildKit).
//!   New entries are created with `O_EXCL`/`O_NOFOLLOW` (or `mkdirat`, `symlinkat`, `mknodat`,
//!   which never follow), so nothing is ever written through a symlink in the destination.
//! * **Excludes** are [`Patterns`] matched against the path relative to the source root (so
//!   `/opt` skips `opt` and everything below it when `/` is copied); the path of an entry
//!   reached through a named source is the source's path as named plus the entry's path
//!   below it. A named non-directory that is excluded is not copied; a named directory
//!   always makes its destination, its excluded entries left out. An excluded directory is
//!   still walked when an exception (`!pattern`) may re-include something below it, and is
//!   then created (with its attributes) only if something is.
//! * **Kept**: file type, mode with setuid/setgid/sticky (set after the owner, whose change
//!   clears them), owner (or the `chown` owner, for everything copied), every extended
//!   attribute that can be read except overlayfs' own (`trusted.overlay.*`, `user.overlay.*`)
//!   and `security.selinux`, access and
//!   modification times with nanoseconds (directories' after their children), device numbers
//!   and fifos. Sockets are skipped. Hard links between entries that are both copied stay
//!   hard links (the first copy is linked to); a file whose other links are not copied is
//!   copied as a plain file. Directories created at the destination get their source's
//!   attributes; parents created for `dest` or by `parents` get `0755` and root (or the
//!   `chown` owner).
//!
//! * **Onto itself**: copying a directory onto itself is refused; copying it into one of its
//!   own subdirectories leaves out what the copy itself wrote.
//!
//! File data is streamed with [`std::io::copy`] between files (`copy_file_range` where the
//! kernel can). Extended attributes of symlinks, devices and fifos are read and written
//! through `/proc/self/fd/<dir>/<name>` (there is no descriptor-based way for them), and a
//! named file source is reopened through `/proc/self/fd/<fd>`, so `/proc` must be mounted.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::patterns::Patterns;

/// How [`copy_paths`] copies (the flags of `COPY`).
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// `--exclude` patterns ([`Patterns`] syntax), matched against paths relative to the
    /// source root.
    pub excludes: Vec<String>,
    /// `--parents`: keep each source's path below the destination.
    pub parents: bool,
    /// `--chown`: the owner (uid, gid) of everything copied and of the directories created.
    pub chown: Option<(u32, u32)>,
}

/// What [`copy_paths`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files written (hard links to them not counted).
    pub files: u64,
    /// Directories copied (a directory source itself included).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created to entries copied earlier in the same call.
    pub hardlinks: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Devices and fifos created.
    pub others: u64,
}

/// Copies `sources` (paths inside `src_root`) to `dest` (a path inside `dst_root`) as
/// `COPY --from` does; see the [module docs](self) for the exact semantics. Errors name the
/// source or destination path and what was being done.
pub fn copy_paths(
    src_root: &Path,
    sources: &[&str],
    dst_root: &Path,
    dest: &str,
    opts: &CopyOptions,
) -> Result<CopyStats> {
    let patterns = Patterns::new(&opts.excludes)?;
    let src_fd = open_root(src_root, "open the copy source root")?;
    let dst_root_fd = open_root(dst_root, "open the copy destination root")?;
    let dest_comps = split(&clean_rel(dest));
    let dest_is_dir = dest.ends_with('/')
        || dest.ends_with("/.")
        || dest.ends_with("/..")
        || dest_comps.is_empty();
    if sources.len() > 1 && !dest_is_dir {
        return Err(Error::invalid(
            format!("copy destination {dest:?}"),
            "with more than one source the destination must be a directory and end with '/'",
        ));
    }
    let mut c = Copier {
        src_root,
        dst_root,
        dst_root_fd,
        patterns,
        chown: opts.chown,
        links: HashMap::new(),
        first_at: HashMap::new(),
        dst_dirs: HashSet::new(),
        stats: CopyStats::default(),
    };
    for s in sources {
        let named = resolve_named(&src_fd, src_root, s, "copy source")?;
        let comps = split(&named.rel);
        let ft = FileType::from_raw_mode(named.stat.st_mode);
        let src_at = src_root.join(OsStr::from_bytes(&named.rel));
        if ft == FileType::Directory {
            let mut target = dest_comps.clone();
            if opts.parents {
                target.extend(comps);
            }
            let (dst_dir, created) = c.dest_dir(&target, true)?;
            let dst_at = c.dst_path(&target);
            let dst_st = rustix::fs::fstat(&dst_dir)
                .map_err(|e| Error::io(&dst_at, "stat the destination directory", e.into()))?;
            if (dst_st.st_dev, dst_st.st_ino) == (named.stat.st_dev, named.stat.st_ino) {
                return Err(Error::invalid(
                    format!("copy source {s:?}"),
                    format!("it is the destination {} itself", dst_at.display()),
                ));
            }
            c.dst_dirs.insert((dst_st.st_dev, dst_st.st_ino));
            let src_dir = Obj::Fd(named.fd.as_fd())
                .open(OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(|e| Error::io(&src_at, "open the source directory", e))?;
            c.stats.dirs += 1;
            c.walk(&src_dir, &named.rel, &dst_dir, &mut target)?;
            if created {
                let xattrs = fd_xattrs(&src_dir)
                    .map_err(|e| Error::io(&src_at, "read extended attributes", e))?;
                c.set_fd_attrs(&dst_dir, &named.stat, &xattrs, &dst_at)?;
            }
        } else {
            if ft == FileType::Socket
                || c.patterns
                    .excluded(&String::from_utf8_lossy(&named.rel), false)
            {
                continue;
            }
            let Some(base) = comps.last() else {
                return Err(Error::invalid(
                    format!("copy source {s:?}"),
                    "the source root is not a directory",
                ));
            };
            let (parent, name) = if opts.parents {
                let mut p = dest_comps.clone();
                p.extend_from_slice(&comps[..comps.len() - 1]);
                (p, base.clone())
            } else if dest_is_dir || c.is_dir(&dest_comps) {
                (dest_comps.clone(), base.clone())
            } else {
                match dest_comps.split_last() {
                    Some((last, parent)) => (parent.to_vec(), last.clone()),
                    None => (Vec::new(), base.clone()),
                }
            };
            let (dst_dir, _) = c.dest_dir(&parent, false)?;
            let mut target = parent;
            target.push(name);
            c.copy_nondir(
                Obj::Fd(named.fd.as_fd()),
                &named.stat,
                &named.rel,
                &dst_dir,
                &target,
            )?;
        }
    }
    Ok(c.stats)
}

/// Where the first copy of a multiply-linked source inode went.
struct FirstCopy {
    /// Its components below the destination root (which resolve there inside the root).
    comps: Vec<Vec<u8>>,
    /// Its own (dev, ino).
    id: (u64, u64),
}

struct Copier<'a> {
    src_root: &'a Path,
    dst_root: &'a Path,
    dst_root_fd: OwnedFd,
    patterns: Patterns,
    chown: Option<(u32, u32)>,
    /// Source (dev, ino) of multiply-linked non-directories to their first copy.
    links: HashMap<(u64, u64), FirstCopy>,
    /// The source (dev, ino) of the first copy at each destination path, to forget it when
    /// something replaces it (a new file may reuse the old inode number).
    first_at: HashMap<Vec<Vec<u8>>, (u64, u64)>,
    /// Destination directories written in this call, never walked as sources (a copy into a
    /// subdirectory of itself would not end).
    dst_dirs: HashSet<(u64, u64)>,
    stats: CopyStats,
}

impl Copier<'_> {
    fn src_path(&self, rel: &[u8]) -> PathBuf {
        self.src_root.join(OsStr::from_bytes(rel))
    }

    fn dst_path(&self, comps: &[Vec<u8>]) -> PathBuf {
        self.dst_root.join(OsStr::from_bytes(&comps.join(&b'/')))
    }

    fn owner_of(&self, st: &Stat) -> (Uid, Gid) {
        let (uid, gid) = self.chown.unwrap_or((st.st_uid, st.st_gid));
        (Uid::from_raw(uid), Gid::from_raw(gid))
    }

    /// Whether `comps` resolves (inside the destination root) to a directory.
    fn is_dir(&self, comps: &[Vec<u8>]) -> bool {
        comps.is_empty()
            || crate::fsutil::openat2(
                &self.dst_root_fd,
                OsStr::from_bytes(&comps.join(&b'/')),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            )
            .is_ok()
    }

    /// Opens destination directory `comps`, resolved inside the destination root, creating
    /// missing ones (`0755`, root or the `chown` owner). With `replace_last`, a non-directory
    /// at the last component is replaced by a new directory; elsewhere it is an error.
    /// Returns the directory and whether it was created.
    fn dest_dir(&mut self, comps: &[Vec<u8>], replace_last: bool) -> Result<(OwnedFd, bool)> {
        let mut fd = rustix::fs::openat(
            &self.dst_root_fd,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(self.dst_root, "open the destination root", e.into()))?;
        let mut created = false;
        for (i, c) in comps.iter().enumerate() {
            let name = OsStr::from_bytes(c);
            let sub = comps[..=i].join(&b'/');
            let at = self.dst_root.join(OsStr::from_bytes(&sub));
            let opened = crate::fsutil::openat2(
                &self.dst_root_fd,
                OsStr::from_bytes(&sub),
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            );
            created = false;
            fd = match opened {
                Ok(f) => f,
                Err(e @ (Errno::NOENT | Errno::NOTDIR)) => {
                    // Nothing at `name` in `fd`, or something that does not lead to a
                    // directory inside the root: a file, a dangling or outside symlink.
                    match rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(_) if i + 1 == comps.len() && replace_last => {
                            rustix::fs::unlinkat(&fd, name, AtFlags::empty()).map_err(|e| {
                                Error::io(&at, "remove a non-directory in the way", e.into())
                            })?;
                            self.forget(comps);
                        }
                        Ok(_) => {
                            return Err(Error::io(
                                &at,
                                "open a destination directory (a non-directory, or a symlink that leads to no directory inside the destination, is in the way)",
                                e.into(),
                            ))
                        }
                        Err(Errno::NOENT) => {}
                        Err(e) => return Err(Error::io(&at, "stat", e.into())),
                    }
                    rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755))
                        .map_err(|e| Error::io(&at, "create a destination directory", e.into()))?;
                    let new = rustix::fs::openat(
                        &fd,
                        name,
                        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| Error::io(&at, "open a created directory", e.into()))?;
                    let (uid, gid) = self.chown.unwrap_or((0, 0));
                    rustix::fs::fchown(&new, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                        .map_err(|e| Error::io(&at, "set the owner", e.into()))?;
                    rustix::fs::fchmod(&new, Mode::from_raw_mode(0o755))
                        .map_err(|e| Error::io(&at, "set the mode", e.into()))?;
                    let st = rustix::fs::fstat(&new)
                        .map_err(|e| Error::io(&at, "stat a created directory", e.into()))?;
                    self.dst_dirs.insert((st.st_dev, st.st_ino));
                    created = true;
                    new
                }
                Err(e) => {
                    return Err(Error::io(&at, "open a destination directory", e.into()));
                }
            };
        }
        Ok((fd, created))
    }

    /// Copies the contents of source directory `src_dir` (at `rel` below the source root) into
    /// `dst_dir` (at `dst_comps` below the destination root).
    fn walk(
        &mut self,
        src_dir: &OwnedFd,
        rel: &[u8],
        dst_dir: &OwnedFd,
        dst_comps: &mut Vec<Vec<u8>>,
    ) -> Result<()> {
        let names = dir_names(src_dir).map_err(|e| Error::io(self.src_path(rel), "read", e))?;
        for name in names {
            let child = join(rel, &name);
            let os = OsStr::from_bytes(&name);
            let st = rustix::fs::statat(src_dir, os, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| Error::io(self.src_path(&child), "stat", e.into()))?;
            let ft = FileType::from_raw_mode(st.st_mode);
            let is_dir = ft == FileType::Directory;
            if self
                .patterns
                .excluded(&String::from_utf8_lossy(&child), is_dir)
            {
                if !is_dir
                    || !self
                        .patterns
                        .may_include_below(&String::from_utf8_lossy(&child))
                {
                    continue;
                }
                let sub = Obj::At(src_dir.as_fd(), os)
                    .open(OFlags::RDONLY | OFlags::DIRECTORY)
                    .map_err(|e| Error::io(self.src_path(&child), "open the directory", e))?;
                if !any_included(&self.patterns, &sub, &child, self.src_root)? {
                    continue;
                }
            }
            dst_comps.push(name.clone());
            let obj = Obj::At(src_dir.as_fd(), os);
            let result = if is_dir {
                self.copy_dir(obj, &st, &child, dst_dir, dst_comps)
            } else {
                self.copy_nondir(obj, &st, &child, dst_dir, dst_comps)
            };
            dst_comps.pop();
            result?;
        }
        Ok(())
    }

    /// Copies directory `obj` (at `rel`) as the last of `dst_comps`, in `dst_dir`.
    fn copy_dir(
        &mut self,
        obj: Obj<'_>,
        st: &Stat,
        rel: &[u8],
        dst_dir: &OwnedFd,
        dst_comps: &mut Vec<Vec<u8>>,
    ) -> Result<()> {
        if self.dst_dirs.contains(&(st.st_dev, st.st_ino)) {
            return Ok(()); // a directory this copy wrote: the destination is inside the source
        }
        let src_at = self.src_path(rel);
        let dst_at = self.dst_path(dst_comps);
        let name = OsStr::from_bytes(dst_comps.last().map_or(&[][..], |n| &n[..]));
        let src_dir = obj
            .open(OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(|e| Error::io(&src_at, "open the directory", e))?;
        let existing = match rustix::fs::statat(dst_dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(d) => Some(FileType::from_raw_mode(d.st_mode) == FileType::Directory),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(Error::io(&dst_at, "stat", e.into())),
        };
        if existing == Some(false) {
            rustix::fs::unlinkat(dst_dir, name, AtFlags::empty())
                .map_err(|e| Error::io(&dst_at, "replace a non-directory", e.into()))?;
            self.forget(dst_comps);
        }
        let created = existing != Some(true);
        if created {
            rustix::fs::mkdirat(dst_dir, name, Mode::from_raw_mode(0o700))
                .map_err(|e| Error::io(&dst_at, "create the directory", e.into()))?;
        }
        let new = rustix::fs::openat(
            dst_dir,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(&dst_at, "open the directory", e.into()))?;
        let new_st = rustix::fs::fstat(&new)
            .map_err(|e| Error::io(&dst_at, "stat the directory", e.into()))?;
        self.dst_dirs.insert((new_st.st_dev, new_st.st_ino));
        self.stats.dirs += 1;
        self.walk(&src_dir, rel, &new, dst_comps)?;
        if created {
            let xattrs = fd_xattrs(&src_dir)
                .map_err(|e| Error::io(&src_at, "read extended attributes", e))?;
            self.set_fd_attrs(&new, st, &xattrs, &dst_at)?;
        }
        Ok(())
    }

    /// Copies non-directory `obj` (at `rel`) as the last of `dst_comps`, in `dst_dir`.
    fn copy_nondir(
        &mut self,
        obj: Obj<'_>,
        st: &Stat,
        rel: &[u8],
        dst_dir: &OwnedFd,
        dst_comps: &[Vec<u8>],
    ) -> Result<()> {
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft == FileType::Socket {
            return Ok(());
        }
        let src_at = self.src_path(rel);
        let dst_at = self.dst_path(dst_comps);
        let name = OsStr::from_bytes(dst_comps.last().map_or(&[][..], |n| &n[..]));
        match rustix::fs::statat(dst_dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(d) if FileType::from_raw_mode(d.st_mode) == FileType::Directory => {
                return Err(Error::io(
                    &dst_at,
                    "replace an existing directory with a non-directory (refused)",
                    Errno::ISDIR.into(),
                ));
            }
            Ok(_) => {
                rustix::fs::unlinkat(dst_dir, name, AtFlags::empty())
                    .map_err(|e| Error::io(&dst_at, "replace", e.into()))?;
                self.forget(dst_comps);
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(Error::io(&dst_at, "stat", e.into())),
        }
        let key = (st.st_dev, st.st_ino);
        if st.st_nlink > 1 && self.link_to_first(key, dst_dir, name, &dst_at)? {
            self.stats.hardlinks += 1;
            return Ok(());
        }
        let (uid, gid) = self.owner_of(st);
        match ft {
            FileType::RegularFile => {
                // O_NONBLOCK: should the file have become a fifo since it was looked at,
                // the open does not hang.
                let src = obj
                    .open(OFlags::RDONLY | OFlags::NONBLOCK)
                    .map_err(|e| Error::io(&src_at, "open the file", e))?;
                let xattrs = fd_xattrs(&src)
                    .map_err(|e| Error::io(&src_at, "read extended attributes", e))?;
                let dst = rustix::fs::openat(
                    dst_dir,
                    name,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| Error::io(&dst_at, "create the file", e.into()))?;
                let mut src = File::from(src);
                let mut dst = File::from(dst);
                let n = io::copy(&mut src, &mut dst)
                    .map_err(|e| Error::io(&dst_at, "copy the file's data (from the source)", e))?;
                self.set_fd_attrs(&dst, st, &xattrs, &dst_at)?;
                self.stats.files += 1;
                self.stats.bytes += n;
            }
            FileType::Symlink => {
                let target = obj
                    .readlink()
                    .map_err(|e| Error::io(&src_at, "read the symlink", e))?;
                let xattrs = obj
                    .path_xattrs()
                    .map_err(|e| Error::io(&src_at, "read extended attributes", e))?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), dst_dir, name)
                    .map_err(|e| Error::io(&dst_at, "create the symlink", e.into()))?;
                rustix::fs::chownat(
                    dst_dir,
                    name,
                    Some(uid),
                    Some(gid),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| Error::io(&dst_at, "set the owner", e.into()))?;
                set_path_xattrs(dst_dir.as_fd(), name, &xattrs, &dst_at)?;
                rustix::fs::utimensat(dst_dir, name, &times(st), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| Error::io(&dst_at, "set the times", e.into()))?;
                self.stats.symlinks += 1;
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                let xattrs = obj
                    .path_xattrs()
                    .map_err(|e| Error::io(&src_at, "read extended attributes", e))?;
                let rdev = if ft == FileType::Fifo { 0 } else { st.st_rdev };
                rustix::fs::mknodat(dst_dir, name, ft, Mode::from_raw_mode(0o600), rdev)
                    .map_err(|e| Error::io(&dst_at, "create the device or fifo", e.into()))?;
                rustix::fs::chownat(
                    dst_dir,
                    name,
                    Some(uid),
                    Some(gid),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| Error::io(&dst_at, "set the owner", e.into()))?;
                rustix::fs::chmodat(
                    dst_dir,
                    name,
                    Mode::from_raw_mode(st.st_mode & 0o7777),
                    AtFlags::empty(),
                )
                .map_err(|e| Error::io(&dst_at, "set the mode", e.into()))?;
                set_path_xattrs(dst_dir.as_fd(), name, &xattrs, &dst_at)?;
                rustix::fs::utimensat(dst_dir, name, &times(st), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| Error::io(&dst_at, "set the times", e.into()))?;
                self.stats.others += 1;
            }
            _ => return Ok(()),
        }
        if st.st_nlink > 1 {
            let made = rustix::fs::statat(dst_dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| Error::io(&dst_at, "stat", e.into()))?;
            let first = FirstCopy {
                comps: dst_comps.to_vec(),
                id: (made.st_dev, made.st_ino),
            };
            self.first_at.insert(first.comps.clone(), key);
            self.links.insert(key, first);
        }
        Ok(())
    }

    /// Forgets the first copy at `comps`, which is being replaced.
    fn forget(&mut self, comps: &[Vec<u8>]) {
        if let Some(key) = self.first_at.remove(comps) {
            self.links.remove(&key);
        }
    }

    /// Links `name` in `dst_dir` to the first copy of source inode `key`, when there is one
    /// and it is still in place (a later source may have replaced it); says whether it did.
    fn link_to_first(
        &mut self,
        key: (u64, u64),
        dst_dir: &OwnedFd,
        name: &OsStr,
        dst_at: &Path,
    ) -> Result<bool> {
        let Some(FirstCopy { comps, id }) = self.links.get(&key) else {
            return Ok(false);
        };
        let Some((fname, fparent)) = comps.split_last() else {
            return Ok(false);
        };
        let fparent_path = fparent.join(&b'/');
        let parent = crate::fsutil::openat2(
            &self.dst_root_fd,
            if fparent.is_empty() {
                OsStr::new(".")
            } else {
                OsStr::from_bytes(&fparent_path)
            },
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        );
        let fname = OsStr::from_bytes(fname);
        let still = parent.as_ref().ok().and_then(|p| {
            rustix::fs::statat(p, fname, AtFlags::SYMLINK_NOFOLLOW)
                .ok()
                .filter(|m| (m.st_dev, m.st_ino) == *id)
                .map(|_| p)
        });
        let Some(parent) = still else {
            let gone = comps.clone();
            self.forget(&gone);
            self.links.remove(&key);
            return Ok(false);
        };
        rustix::fs::linkat(parent, fname, dst_dir, name, AtFlags::empty())
            .map_err(|e| Error::io(dst_at, "create a hard link", e.into()))?;
        Ok(true)
    }

    /// Owner, then mode (the owner change clears setuid), extended attributes, then times.
    fn set_fd_attrs(&self, fd: &impl AsFd, st: &Stat, xattrs: &[Xattr], at: &Path) -> Result<()> {
        set_attrs(fd, self.owner_of(st), st, xattrs, at)
    }
}

/// Gives `fd` the owner `owner`, then the mode of `st` (an owner change clears set-id bits),
/// `xattrs`, then the times of `st` (last: the other changes would move them).
pub(crate) fn set_attrs(
    fd: &impl AsFd,
    (uid, gid): (Uid, Gid),
    st: &Stat,
    xattrs: &[Xattr],
    at: &Path,
) -> Result<()> {
    rustix::fs::fchown(fd, Some(uid), Some(gid))
        .map_err(|e| Error::io(at, "set the owner", e.into()))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(st.st_mode & 0o7777))
        .map_err(|e| Error::io(at, "set the mode", e.into()))?;
    for (k, v) in xattrs {
        rustix::fs::fsetxattr(fd, OsStr::from_bytes(k), v, XattrFlags::empty())
            .map_err(|e| Error::io(at, "set an extended attribute", e.into()))?;
    }
    rustix::fs::futimens(fd, &times(st)).map_err(|e| Error::io(at, "set the times", e.into()))
}

/// Whether anything below the excluded directory `dir` (at `rel`) is included again by an
/// exception pattern.
fn any_included(patterns: &Patterns, dir: &OwnedFd, rel: &[u8], root: &Path) -> Result<bool> {
    let at = |r: &[u8]| root.join(OsStr::from_bytes(r));
    for name in dir_names(dir).map_err(|e| Error::io(at(rel), "read", e))? {
        let child = join(rel, &name);
        let os = OsStr::from_bytes(&name);
        let st = rustix::fs::statat(dir, os, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io(at(&child), "stat", e.into()))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        let is_dir = ft == FileType::Directory;
        let shown = String::from_utf8_lossy(&child);
        if !patterns.excluded(&shown, is_dir) {
            if ft != FileType::Socket {
                return Ok(true);
            }
        } else if is_dir && patterns.may_include_below(&shown) {
            let sub = Obj::At(dir.as_fd(), os)
                .open(OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(|e| Error::io(at(&child), "open the directory", e))?;
            if any_included(patterns, &sub, &child, root)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// An extended attribute: name and value.
pub(crate) type Xattr = (Vec<u8>, Vec<u8>);

/// A source object: an entry of a directory (never followed), or what a named path resolved
/// to (an `O_PATH` descriptor; never a symlink, since the resolution followed it).
#[derive(Clone, Copy)]
pub(crate) enum Obj<'a> {
    /// `name` in directory `dir`.
    At(BorrowedFd<'a>, &'a OsStr),
    /// An `O_PATH` descriptor.
    Fd(BorrowedFd<'a>),
}

impl Obj<'_> {
    /// Opens the object with `flags` (plus `O_NOFOLLOW` for a directory entry).
    pub(crate) fn open(self, flags: OFlags) -> io::Result<OwnedFd> {
        let flags = flags | OFlags::CLOEXEC;
        Ok(match self {
            Obj::At(dir, name) => {
                rustix::fs::openat(dir, name, flags | OFlags::NOFOLLOW, Mode::empty())?
            }
            Obj::Fd(fd) if flags.contains(OFlags::DIRECTORY) => {
                rustix::fs::openat(fd, ".", flags, Mode::empty())?
            }
            // Reopening an O_PATH descriptor goes through its /proc magic link.
            Obj::Fd(fd) => rustix::fs::open(proc_fd(fd), flags, Mode::empty())?,
        })
    }

    /// The target of the symlink.
    pub(crate) fn readlink(self) -> io::Result<Vec<u8>> {
        let (fd, name) = match self {
            Obj::At(dir, name) => (dir, name),
            Obj::Fd(fd) => (fd, OsStr::new("")),
        };
        Ok(rustix::fs::readlinkat(fd, name, Vec::new())?.into_bytes())
    }

    /// The extended attributes of a symlink, device or fifo (which cannot be opened for
    /// them), read through `/proc/self/fd`, without the ones copies leave out.
    pub(crate) fn path_xattrs(self) -> io::Result<Vec<Xattr>> {
        match self {
            Obj::At(dir, name) => path_xattrs(&proc_fd(dir).join(name), false),
            Obj::Fd(fd) => path_xattrs(&proc_fd(fd), true),
        }
    }
}

fn proc_fd(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Extended attributes copies and checksums leave out: overlayfs' own (`trusted.overlay.*`
/// and, for rootless mounts, `user.overlay.*`), and the security label a Linux security
/// module assigns on creation.
pub(crate) fn xattr_is_foreign(name: &[u8]) -> bool {
    crate::layer::OverlayXattrs::is_overlay_xattr(name) || name == b"security.selinux"
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(Errno::OPNOTSUPP.raw_os_error())
}

/// The extended attributes of the open file or directory `fd`, sorted, without the foreign
/// ones; none on a file system without them.
pub(crate) fn fd_xattrs(fd: &OwnedFd) -> io::Result<Vec<Xattr>> {
    match crate::fsutil::xattrs(fd) {
        Ok(mut x) => {
            x.retain(|(k, _)| !xattr_is_foreign(k));
            Ok(x)
        }
        Err(e) if unsupported(&e) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The extended attributes of `path` (the object itself when `follow` is false), sorted,
/// without the foreign ones.
fn path_xattrs(path: &Path, follow: bool) -> io::Result<Vec<Xattr>> {
    let mut names = vec![0u8; 1024];
    loop {
        let listed = if follow {
            rustix::fs::listxattr(path, &mut names[..])
        } else {
            rustix::fs::llistxattr(path, &mut names[..])
        };
        match listed {
            Ok(n) => {
                names.truncate(n);
                break;
            }
            Err(Errno::RANGE) if names.len() < 1 << 20 => {
                let len = names.len() * 4;
                names.resize(len, 0);
            }
            Err(Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    }
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if xattr_is_foreign(name) {
            continue;
        }
        let os = OsStr::from_bytes(name);
        let mut buf = vec![0u8; 256];
        loop {
            let got = if follow {
                rustix::fs::getxattr(path, os, &mut buf[..])
            } else {
                rustix::fs::lgetxattr(path, os, &mut buf[..])
            };
            match got {
                Ok(n) => {
                    buf.truncate(n);
                    out.push((name.to_vec(), buf));
                    break;
                }
                Err(Errno::NODATA) => break,
                Err(Errno::RANGE) if buf.len() < 1 << 20 => {
                    let len = buf.len() * 4;
                    buf.resize(len, 0);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Sets `xattrs` on `name` in `dir` (a symlink, device or fifo) without following it.
fn set_path_xattrs(dir: BorrowedFd<'_>, name: &OsStr, xattrs: &[Xattr], at: &Path) -> Result<()> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let path = proc_fd(dir).join(name);
    for (k, v) in xattrs {
        rustix::fs::lsetxattr(&path, OsStr::from_bytes(k), v, XattrFlags::empty())
            .map_err(|e| Error::io(at, "set an extended attribute", e.into()))?;
    }
    Ok(())
}

pub(crate) fn times(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// Opens the root directory `root` of a tree.
pub(crate) fn open_root(root: &Path, context: &'static str) -> Result<OwnedFd> {
    rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(root, context, e.into()))
}

/// The names in a directory, without `.` and `..`, sorted.
pub(crate) fn dir_names(fd: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    while let Some(e) = dir.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

/// `path` cleaned lexically as a path below a root: no leading `/`, no empty or `.`
/// components, `..` removes the previous component and stops at the root.
pub(crate) fn clean_rel(path: &str) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in path.as_bytes().split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join(&b'/')
}

/// The components of a cleaned relative path.
pub(crate) fn split(rel: &[u8]) -> Vec<Vec<u8>> {
    rel.split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// `base/name` (just `name` when `base` is the root).
pub(crate) fn join(base: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(base.len() + 1 + name.len());
    out.extend_from_slice(base);
    if !base.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// A path named by the caller, resolved inside a root.
pub(crate) struct Named {
    /// The path as named, cleaned (see [`clean_rel`]); empty for the root.
    pub(crate) rel: Vec<u8>,
    /// An `O_PATH` descriptor of what it resolves to (symlinks followed inside the root).
    pub(crate) fd: OwnedFd,
    /// Its status.
    pub(crate) stat: Stat,
}

/// Resolves `path` inside the tree open as `root_fd` (at `root`) with `RESOLVE_IN_ROOT`:
/// symlinks in it, its last component included, resolve inside the root. `what` names the
/// argument in errors ("copy source").
pub(crate) fn resolve_named(
    root_fd: &OwnedFd,
    root: &Path,
    path: &str,
    what: &str,
) -> Result<Named> {
    let rel = clean_rel(path);
    let shown = root.join(OsStr::from_bytes(&rel));
    let p = if rel.is_empty() {
        OsStr::new(".")
    } else {
        OsStr::from_bytes(&rel)
    };
    let fd = match crate::fsutil::openat2(
        root_fd,
        p,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => fd,
        Err(e @ (Errno::NOENT | Errno::NOTDIR | Errno::LOOP)) => {
            return Err(Error::invalid(
                format!("{what} {path:?}"),
                format!(
                    "{}: {} (symlinks are resolved inside {})",
                    shown.display(),
                    io::Error::from(e),
                    root.display()
                ),
            ));
        }
        Err(e) => return Err(Error::io(shown, "resolve inside the root", e.into())),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| Error::io(&shown, "stat", e.into()))?;
    Ok(Named { rel, fd, stat })
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::{lchown, symlink, MetadataExt, PermissionsExt};

    use super::*;
    use crate::checksum::checksum;
    use crate::ErrorKind;

    /// Bytes of `data/big` in the sample tree: more than one copy chunk.
    pub(crate) const BIG: usize = 3 * 1024 * 1024 + 17;
    pub(crate) const PASSWD: &[u8] = b"strata-test-passwd\n";

    pub(crate) fn mkdir(root: &Path, rel: &str, mode: u32) {
        let p = root.join(rel);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    pub(crate) fn file(root: &Path, rel: &str, data: &[u8], mode: u32) {
        let p = root.join(rel);
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    pub(crate) fn link(root: &Path, rel: &str, target: &str) {
        symlink(target, root.join(rel)).unwrap();
    }

    pub(crate) fn owner(root: &Path, rel: &str, uid: u32, gid: u32) {
        lchown(root.join(rel), Some(uid), Some(gid)).unwrap();
    }

    pub(crate) fn set_xattr(root: &Path, rel: &str, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(root.join(rel), name, value, XattrFlags::empty()).unwrap();
    }

    pub(crate) fn set_time(root: &Path, rel: &str, sec: i64, nsec: i64) {
        let t = Timestamps {
            last_access: Timespec {
                tv_sec: sec - 1000,
                tv_nsec: (nsec / 2) as _,
            },
            last_modification: Timespec {
                tv_sec: sec,
                tv_nsec: nsec as _,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            root.join(rel),
            &t,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    pub(crate) fn mknod(root: &Path, rel: &str, ft: FileType, mode: u32, major: u32, minor: u32) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join(rel),
            ft,
            Mode::from_raw_mode(mode),
            rustix::fs::makedev(major, minor),
        )
        .unwrap();
        fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Every relative path below `root` (symlinks not followed), deepest first.
    pub(crate) fn all_paths(root: &Path) -> Vec<String> {
        fn walk(root: &Path, rel: &str, out: &mut Vec<String>) {
            for e in fs::read_dir(root.join(rel)).unwrap() {
                let e = e.unwrap();
                let r = if rel.is_empty() {
                    e.file_name().to_string_lossy().into_owned()
                } else {
                    format!("{rel}/{}", e.file_name().to_string_lossy())
                };
                if e.file_type().unwrap().is_dir() {
                    walk(root, &r, out);
                }
                out.push(r);
            }
        }
        let mut out = Vec::new();
        walk(root, "", &mut out);
        out.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        out
    }

    /// A tree with every kind of entry: setuid/setgid/sticky modes, owners, extended
    /// attributes, dangling/absolute/relative symlinks, hard links (one pair inside `hl`,
    /// one reaching out to `outside`), a fifo, a char device, a socket, and nanosecond times.
    pub(crate) fn sample_tree(root: &Path) {
        mkdir(root, "bin", 0o755);
        file(root, "bin/su", b"su-binary", 0o4755);
        file(root, "bin/sg", b"sg-binary", 0o2711);
        mkdir(root, "tmp", 0o1777);
        mkdir(root, "etc", 0o755);
        file(root, "etc/passwd", PASSWD, 0o644);
        owner(root, "etc/passwd", 1000, 1001);
        set_xattr(root, "etc/passwd", "user.note", b"hello");
        set_xattr(root, "etc/passwd", "trusted.t", b"\x00\x01binary");
        set_xattr(root, "etc", "user.dir", b"d");
        mkdir(root, "data", 0o750);
        owner(root, "data", 33, 33);
        let big: Vec<u8> = (0..BIG).map(|i| (i * 7 % 251) as u8).collect();
        file(root, "data/big", &big, 0o640);
        mkdir(root, "links", 0o755);
        link(root, "links/dangling", "missing/target");
        link(root, "links/abs", "/etc/passwd");
        link(root, "links/rel", "../etc/passwd");
        link(root, "links/todir", "/etc");
        link(root, "links/escape", "../../../../../etc");
        owner(root, "links/abs", 7, 8);
        set_xattr(root, "links/abs", "trusted.lnk", b"on-a-symlink");
        mkdir(root, "hl", 0o755);
        file(root, "hl/a", b"linked", 0o600);
        fs::hard_link(root.join("hl/a"), root.join("hl/b")).unwrap();
        mkdir(root, "outside", 0o755);
        file(root, "outside/x", b"partner", 0o644);
        fs::hard_link(root.join("outside/x"), root.join("hl/c")).unwrap();
        mkdir(root, "dev", 0o755);
        mknod(root, "dev/fifo", FileType::Fifo, 0o640, 0, 0);
        mknod(root, "dev/null", FileType::CharacterDevice, 0o666, 1, 3);
        set_xattr(root, "dev/null", "trusted.dev", b"x");
        drop(std::os::unix::net::UnixListener::bind(root.join("dev/sock")).unwrap());
        for (i, p) in all_paths(root).iter().enumerate() {
            set_time(root, p, 1_600_000_000 + i as i64, 123_456_789 + i as i64);
        }
    }

    fn xattrs_of(path: &Path) -> Vec<Xattr> {
        super::path_xattrs(path, false).unwrap()
    }

    /// What a tree holds, by path: type, mode, owner, link count, mtime (ns), device,
    /// symlink target and extended attributes. Atimes only for devices and fifos (reading
    /// a file, a directory or a symlink may move its atime).
    pub(crate) fn describe(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for rel in all_paths(root) {
            let p = root.join(&rel);
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let mut d = format!(
                "mode={:o} uid={} gid={} nlink={} mtime={}.{:09} size={}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.mtime(),
                m.mtime_nsec(),
                if ft.is_dir() { 0 } else { m.size() }
            );
            if !ft.is_dir() && !ft.is_file() && !ft.is_symlink() {
                d += &format!(
                    " atime={}.{:09} rdev={:x}",
                    m.atime(),
                    m.atime_nsec(),
                    m.rdev()
                );
            }
            if ft.is_symlink() {
                d += &format!(" -> {:?}", fs::read_link(&p).unwrap());
            }
            d += &format!(" xattrs={:?}", xattrs_of(&p));
            out.insert(rel, d);
        }
        out
    }

    fn opts() -> CopyOptions {
        CopyOptions::default()
    }

    fn ino(p: &Path) -> u64 {
        fs::symlink_metadata(p).unwrap().ino()
    }

    #[test]
    fn copies_a_whole_tree_exactly() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let mut before = describe(src.path());
        let stats = copy_paths(src.path(), &["/"], dst.path(), "/", &opts()).unwrap();
        let after = describe(dst.path());
        assert!(
            before.remove("dev/sock").is_some(),
            "the socket is in the source"
        );
        assert_eq!(before, after);
        assert_eq!(
            stats,
            CopyStats {
                files: 6,
                dirs: 9,
                symlinks: 5,
                hardlinks: 2,
                bytes: (9 + 9 + PASSWD.len() + BIG + 6 + 7) as u64,
                others: 2,
            }
        );
        let d = dst.path();
        assert_eq!(fs::read(d.join("etc/passwd")).unwrap(), PASSWD);
        assert_eq!(
            fs::read(d.join("data/big")).unwrap(),
            fs::read(src.path().join("data/big")).unwrap()
        );
        assert_eq!(ino(&d.join("hl/a")), ino(&d.join("hl/b")));
        assert_eq!(ino(&d.join("hl/c")), ino(&d.join("outside/x")));
        assert_ne!(ino(&d.join("hl/a")), ino(&d.join("hl/c")));
        assert_eq!(
            fs::symlink_metadata(d.join("bin/su")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(
            fs::symlink_metadata(d.join("tmp")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert_eq!(
            fs::read_link(d.join("links/dangling")).unwrap(),
            Path::new("missing/target")
        );
        assert!(!d.join("missing").exists());
        assert_eq!(
            checksum(src.path(), &[], &[]).unwrap(),
            checksum(d, &[], &[]).unwrap()
        );
    }

    #[test]
    fn keeps_atime_of_a_file_read_for_the_copy() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        file(src.path(), "f", b"data", 0o644);
        set_time(src.path(), "f", 1_500_000_000, 987_654_321);
        copy_paths(src.path(), &["f"], dst.path(), "g", &opts()).unwrap();
        let m = fs::symlink_metadata(dst.path().join("g")).unwrap();
        assert_eq!(
            (m.atime(), m.atime_nsec()),
            (1_500_000_000 - 1000, 493_827_160)
        );
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_500_000_000, 987_654_321));
    }

    #[test]
    fn symlinks_in_the_source_path_resolve_inside_the_root() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let d = dst.path();
        // A directory symlink to "/etc": the root's etc, never the host's.
        copy_paths(src.path(), &["/links/todir"], d, "/out", &opts()).unwrap();
        let names: Vec<_> = fs::read_dir(d.join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["passwd"]);
        assert_eq!(fs::read(d.join("out/passwd")).unwrap(), PASSWD);
        // A relative symlink climbing above the root stops at the root.
        copy_paths(src.path(), &["links/escape/passwd"], d, "/p", &opts()).unwrap();
        assert_eq!(fs::read(d.join("p")).unwrap(), PASSWD);
        // The last component: an absolute symlink to a file, copied under its own name.
        copy_paths(src.path(), &["/links/abs"], d, "/named/", &opts()).unwrap();
        let m = fs::symlink_metadata(d.join("named/abs")).unwrap();
        assert!(m.is_file());
        assert_eq!(
            (m.uid(), m.gid()),
            (1000, 1001),
            "the file's owner, not the link's"
        );
        assert_eq!(fs::read(d.join("named/abs")).unwrap(), PASSWD);
        // `..` in the source path is clamped at the root.
        copy_paths(src.path(), &["../../etc/passwd"], d, "/q", &opts()).unwrap();
        assert_eq!(fs::read(d.join("q")).unwrap(), PASSWD);
    }

    #[test]
    fn missing_sources_are_named() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        for missing in ["/nope", "links/dangling", "etc/passwd/x"] {
            let err = copy_paths(src.path(), &[missing], dst.path(), "/", &opts()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
            assert!(err.to_string().contains(missing), "{err}");
        }
        let err = copy_paths(src.path(), &["etc", "bin"], dst.path(), "/x", &opts()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains("end with '/'"), "{err}");
    }

    #[test]
    fn hard_links_stay_inside_the_copied_set() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let d = dst.path();
        let stats = copy_paths(src.path(), &["/hl"], d, "/hl", &opts()).unwrap();
        assert_eq!((stats.files, stats.hardlinks), (2, 1));
        assert_eq!(ino(&d.join("hl/a")), ino(&d.join("hl/b")));
        let c = fs::symlink_metadata(d.join("hl/c")).unwrap();
        assert_eq!(c.nlink(), 1, "its partner was not copied");
        assert_eq!(fs::read(d.join("hl/c")).unwrap(), b"partner");
        assert_eq!(
            checksum(src.path(), &["/hl"], &[]).unwrap(),
            checksum(d, &["/hl"], &[]).unwrap()
        );

        // The first copy replaced by a later source: the next link is a copy, not a link to
        // the wrong file.
        mkdir(src.path(), "other", 0o755);
        file(src.path(), "other/a", b"other", 0o644);
        let stats = copy_paths(
            src.path(),
            &["/hl/a", "/other/a", "/hl/b"],
            d,
            "/x/",
            &opts(),
        )
        .unwrap();
        assert_eq!((stats.files, stats.hardlinks), (3, 0));
        assert_eq!(fs::read(d.join("x/a")).unwrap(), b"other");
        assert_eq!(fs::read(d.join("x/b")).unwrap(), b"linked");
    }

    #[test]
    fn chown_applies_to_everything_copied_and_created() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let o = CopyOptions {
            chown: Some((1234, 5678)),
            ..opts()
        };
        copy_paths(src.path(), &["/"], dst.path(), "/deep/app", &o).unwrap();
        let root = dst.path().join("deep");
        for rel in all_paths(&root) {
            let m = fs::symlink_metadata(root.join(&rel)).unwrap();
            assert_eq!((m.uid(), m.gid()), (1234, 5678), "{rel}");
        }
        let deep = fs::symlink_metadata(&root).unwrap();
        assert_eq!(
            (deep.uid(), deep.gid(), deep.mode() & 0o7777),
            (1234, 5678, 0o755)
        );
        let su = fs::symlink_metadata(root.join("app/bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755, "setuid set after the owner");
        let sg = fs::symlink_metadata(root.join("app/bin/sg")).unwrap();
        assert_eq!(sg.mode() & 0o7777, 0o2711);
    }

    #[test]
    fn parents_keeps_source_paths() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let o = CopyOptions {
            parents: true,
            ..opts()
        };
        let d = dst.path();
        copy_paths(
            src.path(),
            &["/etc/passwd", "hl", "/links/todir/passwd"],
            d,
            "/x/",
            &o,
        )
        .unwrap();
        assert_eq!(fs::read(d.join("x/etc/passwd")).unwrap(), PASSWD);
        assert_eq!(fs::read(d.join("x/hl/a")).unwrap(), b"linked");
        assert_eq!(ino(&d.join("x/hl/a")), ino(&d.join("x/hl/b")));
        let todir = fs::symlink_metadata(d.join("x/links/todir")).unwrap();
        assert!(todir.is_dir(), "the path as named, as directories");
        assert_eq!(fs::read(d.join("x/links/todir/passwd")).unwrap(), PASSWD);
    }

    #[test]
    fn file_destinations() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let d = dst.path();
        mkdir(d, "existing", 0o700);
        let s = src.path();
        copy_paths(s, &["/etc/passwd"], d, "/existing", &opts()).unwrap();
        assert_eq!(fs::read(d.join("existing/passwd")).unwrap(), PASSWD);
        copy_paths(s, &["/etc/passwd"], d, "newdir/", &opts()).unwrap();
        assert_eq!(fs::read(d.join("newdir/passwd")).unwrap(), PASSWD);
        copy_paths(s, &["/etc/passwd"], d, "/renamed", &opts()).unwrap();
        assert_eq!(fs::read(d.join("renamed")).unwrap(), PASSWD);
        copy_paths(s, &["/etc/passwd"], d, "/a/b/c", &opts()).unwrap();
        assert_eq!(fs::read(d.join("a/b/c")).unwrap(), PASSWD);
        let b = fs::symlink_metadata(d.join("a/b")).unwrap();
        assert_eq!((b.mode() & 0o7777, b.uid(), b.gid()), (0o755, 0, 0));
        // A symlink to a directory inside the destination is followed, inside it.
        link(d, "todir", "/existing");
        copy_paths(s, &["/bin/su"], d, "/todir", &opts()).unwrap();
        assert_eq!(fs::read(d.join("existing/su")).unwrap(), b"su-binary");
        // Devices and fifos as sources.
        let stats = copy_paths(s, &["/dev/null", "/dev/fifo"], d, "/devs/", &opts()).unwrap();
        assert_eq!(stats.others, 2);
        let null = fs::symlink_metadata(d.join("devs/null")).unwrap();
        assert_eq!(
            (null.rdev(), null.mode() & 0o7777),
            (rustix::fs::makedev(1, 3), 0o666)
        );
        assert_eq!(
            xattrs_of(&d.join("devs/null")),
            [(b"trusted.dev".to_vec(), b"x".to_vec())]
        );
    }

    #[test]
    fn replaces_files_and_symlinks_without_writing_through() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let (s, d) = (src.path(), dst.path());
        file(host.path(), "victim", b"precious", 0o644);
        file(d, "target", b"old content that is longer", 0o600);
        file(d, "inside", b"inside", 0o644);
        link(d, "sl", host.path().join("victim").to_str().unwrap());
        link(d, "sl2", "/inside");
        link(d, "dl", "/nonexistent/x");
        for name in ["/target", "/sl", "/sl2", "/dl"] {
            copy_paths(s, &["/etc/passwd"], d, name, &opts()).unwrap();
            let m = fs::symlink_metadata(d.join(&name[1..])).unwrap();
            assert!(m.is_file(), "{name}");
            assert_eq!(fs::read(d.join(&name[1..])).unwrap(), PASSWD, "{name}");
        }
        assert_eq!(fs::read(host.path().join("victim")).unwrap(), b"precious");
        assert_eq!(fs::read(d.join("inside")).unwrap(), b"inside");
        assert!(!d.join("nonexistent").exists());
        // A symlink to a file replaced by a symlink from the source: verbatim.
        link(d, "l", host.path().join("victim").to_str().unwrap());
        copy_paths(s, &["/links"], d, "/", &opts()).unwrap();
        assert_eq!(
            fs::read_link(d.join("abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        // A directory path through a symlink that leaves the destination: refused.
        link(d, "outdir", host.path().to_str().unwrap());
        let err = copy_paths(s, &["/etc/passwd"], d, "/outdir/", &opts()).unwrap_err();
        assert!(err.to_string().contains("outdir"), "{err}");
        assert_eq!(fs::read_dir(host.path()).unwrap().count(), 1);
        // A file never replaces a directory.
        mkdir(d, "busy/passwd", 0o755);
        let err = copy_paths(s, &["/etc/passwd"], d, "/busy/", &opts()).unwrap_err();
        assert!(err.to_string().contains("busy/passwd"), "{err}");
        // A directory replaces a file, and merges into a directory, keeping its attributes.
        file(d, "conf", b"file", 0o644);
        copy_paths(s, &["/etc"], d, "/conf", &opts()).unwrap();
        assert_eq!(fs::read(d.join("conf/passwd")).unwrap(), PASSWD);
        mkdir(d, "merged", 0o700);
        owner(d, "merged", 42, 43);
        file(d, "merged/keep", b"keep", 0o644);
        copy_paths(s, &["/etc"], d, "/merged", &opts()).unwrap();
        let m = fs::symlink_metadata(d.join("merged")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o700, 42, 43));
        assert_eq!(fs::read(d.join("merged/keep")).unwrap(), b"keep");
        assert_eq!(fs::read(d.join("merged/passwd")).unwrap(), PASSWD);
    }

    /// A tree full of dangling symlinks under opt (and elsewhere).
    fn dangling_tree(root: &Path) {
        mkdir(root, "opt/sub/keep", 0o750);
        mkdir(root, "opt/other", 0o755);
        for i in 0..40 {
            link(root, &format!("opt/abs{i}"), &format!("/nonexistent/{i}"));
            link(
                root,
                &format!("opt/sub/rel{i}"),
                &format!("../../missing/{i}"),
            );
            link(root, &format!("opt/other/loop{i}"), &format!("loop{i}"));
        }
        file(root, "opt/sub/keep/file", b"kept", 0o644);
        link(root, "opt/sub/keep/dangling", "/opt/nothing");
        mkdir(root, "usr/lib", 0o755);
        file(root, "usr/lib/x", b"x", 0o644);
        link(root, "usr/lib/gone", "/usr/lib/gone/too");
        link(root, "root-link", "/");
        file(root, "opt-not", b"not opt", 0o644);
        for (i, p) in all_paths(root).iter().enumerate() {
            set_time(root, p, 1_700_000_000 + i as i64, i as i64);
        }
    }

    #[test]
    fn exclude_opt_then_copy_opt() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let (s, d) = (src.path(), dst.path());
        dangling_tree(s);
        let o = CopyOptions {
            excludes: vec!["/opt".to_string()],
            ..opts()
        };
        copy_paths(s, &["/"], d, "/", &o).unwrap();
        assert!(fs::symlink_metadata(d.join("opt")).is_err());
        assert_eq!(fs::read(d.join("opt-not")).unwrap(), b"not opt");
        assert_eq!(
            fs::read_link(d.join("usr/lib/gone")).unwrap(),
            Path::new("/usr/lib/gone/too")
        );
        assert_eq!(
            checksum(d, &[], &[]).unwrap(),
            checksum(s, &[], &o.excludes).unwrap()
        );
        assert_ne!(
            checksum(d, &[], &[]).unwrap(),
            checksum(s, &[], &[]).unwrap()
        );
        let stats = copy_paths(s, &["/opt"], d, "/opt", &opts()).unwrap();
        assert_eq!(stats.symlinks, 121);
        assert_eq!(describe(s), describe(d));
        assert_eq!(
            checksum(d, &["/opt"], &[]).unwrap(),
            checksum(s, &["opt"], &[]).unwrap()
        );
        assert_eq!(
            checksum(d, &[], &[]).unwrap(),
            checksum(s, &[], &[]).unwrap()
        );
    }

    #[test]
    fn exclude_with_exception_reincludes_below() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let (s, d) = (src.path(), dst.path());
        dangling_tree(s);
        let o = CopyOptions {
            excludes: vec!["opt".to_string(), "!opt/sub/keep".to_string()],
            ..opts()
        };
        copy_paths(s, &["/"], d, "/", &o).unwrap();
        let mut under_opt = all_paths(&d.join("opt"));
        under_opt.sort();
        assert_eq!(
            under_opt,
            ["sub", "sub/keep", "sub/keep/dangling", "sub/keep/file"]
        );
        let m = fs::symlink_metadata(d.join("opt")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755);
        assert_eq!(
            checksum(d, &[], &[]).unwrap(),
            checksum(s, &[], &o.excludes).unwrap()
        );
    }

    #[test]
    fn copy_into_itself_ends() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        mkdir(r, "a", 0o755);
        file(r, "a/f", b"f", 0o644);
        copy_paths(r, &["/a"], r, "/a/b", &opts()).unwrap();
        assert_eq!(fs::read(r.join("a/b/f")).unwrap(), b"f");
        assert!(!r.join("a/b/b").exists());
        let err = copy_paths(r, &["/a"], r, "/a", &opts()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    }
}
