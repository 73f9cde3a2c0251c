//! The cache-key checksum of paths in a tree: what a `COPY` of them would bring, as one
//! sha256 (BuildKit's content hash serves the same purpose).
//!
//! The paths are resolved like [copy](crate::copy) sources: inside the root, with symlinks in
//! a named path (its last component too) resolved inside the root; no paths means the whole
//! tree. Below a named path nothing is followed: a symlink is its target bytes, a dangling
//! or absolute one included. Paths matched by the exclude [`Patterns`] (relative to the
//! root) are left out; an excluded directory is kept only when an exception re-includes
//! something below it. Sockets are left out (a copy skips them). The root directory's own
//! attributes are not part of the checksum, a named directory's are.
//!
//! # Format
//!
//! The digest is the sha256 of `strata-checksum-v2\n` followed, for each named path in the
//! order given (the whole tree when none is named), by the sha256 of its records: one per
//! entry (the named path itself and everything below it), in byte order of the entry's path
//! **relative to the named path** (the named path itself is the empty path), so the same
//! files give the same checksum wherever they live — `/out` of a builder and `/app` of the
//! image it was copied into. All integers are 32-bit big-endian:
//!
//! ```text
//! len(path) path                   relative to the named path (to the root for the whole tree)
//! type                             one byte: d directory, f file, l symlink,
//!                                  c char device, b block device, p fifo
//! mode uid gid                     mode is the permission bits (mode & 0o7777)
//! count (len(name) name len(value) value)*
//!                                  extended attributes sorted by name, without
//!                                  trusted.overlay.*, user.overlay.* and
//!                                  security.selinux
//! f: 32 bytes                      the sha256 of the content
//! l: len(target) target            the symlink's target bytes
//! c, b: major minor                the device numbers
//! ```
//!
//! Times, inode numbers, link counts and the tree's location are not part of it: the same
//! tree gives the same checksum wherever it lives, and a hard link is its content.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, OFlags, Stat};
use sha2::{Digest as _, Sha256};

use crate::copy::{dir_names, fd_xattrs, join, open_root, resolve_named, Obj, Xattr};
use crate::error::{Error, Result};
use crate::layer::Digest;
use crate::patterns::Patterns;

/// The first bytes hashed; a new format gets a new tag.
const TAG: &[u8] = b"strata-checksum-v2\n";

/// The checksum of `paths` (inside `root`; all of it when empty), without what `excludes`
/// matches. See the [module docs](self) for the exact format.
pub fn checksum(root: &Path, paths: &[&str], excludes: &[String]) -> Result<Digest> {
    let patterns = Patterns::new(excludes)?;
    let root_fd = open_root(root, "open the tree to checksum")?;
    let mut summer = Summer {
        root,
        patterns,
        records: Vec::new(),
        contents: HashMap::new(),
        base: Vec::new(),
    };
    let whole = [""];
    let paths = if paths.is_empty() { &whole[..] } else { paths };
    let mut hash = Sha256::new();
    hash.update(TAG);
    for p in paths {
        let named = resolve_named(&root_fd, root, p, "checksum path")?;
        summer.records.clear();
        summer.base = named.rel.clone();
        let obj = Obj::Fd(named.fd.as_fd());
        if named.rel.is_empty() {
            let dir = obj
                .open(OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(|e| Error::io(root, "open the tree", e))?;
            summer.walk(&dir, &[])?;
        } else {
            summer.entry(obj, &named.stat, &named.rel)?;
        }
        let mut records = std::mem::take(&mut summer.records);
        records.sort_by(|a, b| a.0.cmp(&b.0));
        records.dedup_by(|a, b| a.0 == b.0);
        let mut sub = Sha256::new();
        for (_, record) in &records {
            sub.update(record);
        }
        hash.update(sub.finalize());
    }
    Ok(Digest::from_sha(&hash.finalize()))
}

struct Summer<'a> {
    root: &'a Path,
    patterns: Patterns,
    /// (path, record) of every entry so far.
    records: Vec<(Vec<u8>, Vec<u8>)>,
    /// Content hashes of multiply-linked files, by (dev, ino).
    contents: HashMap<(u64, u64), [u8; 32]>,
    /// The named path being summed (relative to the root); records name paths below it.
    base: Vec<u8>,
}

impl Summer<'_> {
    fn at(&self, rel: &[u8]) -> std::path::PathBuf {
        self.root.join(OsStr::from_bytes(rel))
    }

    /// `rel` (relative to the root) as the records name it: relative to the named path.
    fn named<'r>(&self, rel: &'r [u8]) -> &'r [u8] {
        if self.base.is_empty() {
            return rel;
        }
        match rel.strip_prefix(self.base.as_slice()) {
            Some(rest) => rest.strip_prefix(b"/").unwrap_or(rest),
            None => rel,
        }
    }

    /// Records the entries below directory `dir` (at `rel`); returns how many.
    fn walk(&mut self, dir: &OwnedFd, rel: &[u8]) -> Result<usize> {
        let mut n = 0;
        for name in dir_names(dir).map_err(|e| Error::io(self.at(rel), "read", e))? {
            let child = join(rel, &name);
            let os = OsStr::from_bytes(&name);
            let st = rustix::fs::statat(dir, os, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| Error::io(self.at(&child), "stat", e.into()))?;
            n += self.entry(Obj::At(dir.as_fd(), os), &st, &child)?;
        }
        Ok(n)
    }

    /// Records `obj` (at `rel`) and, for a directory, what is below it; returns how many
    /// records were added.
    fn entry(&mut self, obj: Obj<'_>, st: &Stat, rel: &[u8]) -> Result<usize> {
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft == FileType::Socket {
            return Ok(0);
        }
        let is_dir = ft == FileType::Directory;
        let shown = String::from_utf8_lossy(rel).into_owned();
        let excluded = self.patterns.excluded(&shown, is_dir);
        if !is_dir {
            if excluded {
                return Ok(0);
            }
            let record = self.record(obj, st, rel)?;
            self.records.push((self.named(rel).to_vec(), record));
            return Ok(1);
        }
        if excluded && !self.patterns.may_include_below(&shown) {
            return Ok(0);
        }
        let dir = obj
            .open(OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(|e| Error::io(self.at(rel), "open the directory", e))?;
        let below = self.walk(&dir, rel)?;
        if excluded && below == 0 {
            return Ok(0);
        }
        let xattrs =
            fd_xattrs(&dir).map_err(|e| Error::io(self.at(rel), "read extended attributes", e))?;
        let name = self.named(rel).to_vec();
        let record = header(&name, b'd', st, &xattrs);
        self.records.push((name, record));
        Ok(below + 1)
    }

    /// The record of non-directory `obj` (at `rel`).
    fn record(&mut self, obj: Obj<'_>, st: &Stat, rel: &[u8]) -> Result<Vec<u8>> {
        let ft = FileType::from_raw_mode(st.st_mode);
        let at = self.at(rel);
        let read_xattrs = |obj: Obj<'_>| {
            obj.path_xattrs()
                .map_err(|e| Error::io(&at, "read extended attributes", e))
        };
        Ok(match ft {
            FileType::RegularFile => {
                let fd = obj
                    .open(OFlags::RDONLY | OFlags::NONBLOCK)
                    .map_err(|e| Error::io(&at, "open the file", e))?;
                let xattrs =
                    fd_xattrs(&fd).map_err(|e| Error::io(&at, "read extended attributes", e))?;
                let key = (st.st_dev, st.st_ino);
                let sha = match self.contents.get(&key) {
                    Some(sha) => *sha,
                    None => {
                        let (sha, _) = crate::layer::content::hash_content(File::from(fd))
                            .map_err(|e| Error::io(&at, "read the file", e))?;
                        if st.st_nlink > 1 {
                            self.contents.insert(key, sha);
                        }
                        sha
                    }
                };
                let mut r = header(self.named(rel), b'f', st, &xattrs);
                r.extend_from_slice(&sha);
                r
            }
            FileType::Symlink => {
                let target = obj
                    .readlink()
                    .map_err(|e| Error::io(&at, "read the symlink", e))?;
                let mut r = header(self.named(rel), b'l', st, &read_xattrs(obj)?);
                put_bytes(&mut r, &target);
                r
            }
            FileType::CharacterDevice | FileType::BlockDevice => {
                let kind = if ft == FileType::CharacterDevice {
                    b'c'
                } else {
                    b'b'
                };
                let mut r = header(self.named(rel), kind, st, &read_xattrs(obj)?);
                r.extend_from_slice(&rustix::fs::major(st.st_rdev).to_be_bytes());
                r.extend_from_slice(&rustix::fs::minor(st.st_rdev).to_be_bytes());
                r
            }
            _ => header(self.named(rel), b'p', st, &read_xattrs(obj)?),
        })
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

/// The part of a record every type has: path, type, mode, owner, extended attributes.
fn header(rel: &[u8], kind: u8, st: &Stat, xattrs: &[Xattr]) -> Vec<u8> {
    let mut r = Vec::with_capacity(64 + rel.len());
    put_bytes(&mut r, rel);
    r.push(kind);
    r.extend_from_slice(&(st.st_mode & 0o7777).to_be_bytes());
    r.extend_from_slice(&st.st_uid.to_be_bytes());
    r.extend_from_slice(&st.st_gid.to_be_bytes());
    put_u32(&mut r, xattrs.len());
    for (k, v) in xattrs {
        put_bytes(&mut r, k);
        put_bytes(&mut r, v);
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::fs;
    use std::os::unix::fs::{lchown, symlink, PermissionsExt};
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::copy::tests::{file, link, mkdir, sample_tree, set_time, set_xattr};

    fn sample() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("tree");
        fs::create_dir(&root).unwrap();
        sample_tree(&root);
        (t, root)
    }

    fn sum(root: &Path) -> Digest {
        checksum(root, &[], &[]).unwrap()
    }

    #[test]
    fn same_tree_in_two_places_same_digest() {
        let (_a, ra) = sample();
        let (_b, rb) = sample();
        assert_eq!(sum(&ra), sum(&rb));
        assert_eq!(
            checksum(&ra, &["/etc", "hl"], &[]).unwrap(),
            checksum(&rb, &["./etc", "hl/"], &[]).unwrap(),
            "however the named paths are spelled"
        );
        assert_ne!(
            checksum(&ra, &["/etc", "hl"], &[]).unwrap(),
            checksum(&rb, &["hl", "etc"], &[]).unwrap(),
            "named paths count in the order given, as a COPY's sources do"
        );
        assert_eq!(checksum(&ra, &["/"], &[]).unwrap(), sum(&ra));
        assert!(sum(&ra).as_str().starts_with("sha256:"));
    }

    #[test]
    fn every_kind_of_change_changes_the_digest() {
        type Change = fn(&Path);
        let changes: [(&str, Change); 9] = [
            ("content", |r| {
                fs::write(r.join("etc/passwd"), b"strata-test-passwX\n").unwrap()
            }),
            ("mode", |r| {
                fs::set_permissions(r.join("bin/su"), fs::Permissions::from_mode(0o755)).unwrap()
            }),
            ("dir mode", |r| {
                fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o777)).unwrap()
            }),
            ("owner", |r| {
                lchown(r.join("etc/passwd"), Some(1000), Some(1002)).unwrap()
            }),
            ("symlink owner", |r| {
                lchown(r.join("links/rel"), Some(1), None).unwrap()
            }),
            ("xattr", |r| {
                set_xattr(r, "etc/passwd", "user.note", b"hellO")
            }),
            ("new xattr", |r| {
                set_xattr(r, "links/abs", "trusted.more", b"")
            }),
            ("symlink target", |r| {
                fs::remove_file(r.join("links/dangling")).unwrap();
                symlink("missing/targeT", r.join("links/dangling")).unwrap();
            }),
            ("device", |r| {
                fs::remove_file(r.join("dev/null")).unwrap();
                crate::copy::tests::mknod(
                    r,
                    "dev/null",
                    rustix::fs::FileType::CharacterDevice,
                    0o666,
                    1,
                    5,
                );
                set_xattr(r, "dev/null", "trusted.dev", b"x");
            }),
        ];
        let (_base, base_root) = sample();
        let base = sum(&base_root);
        for (what, change) in changes {
            let (_t, root) = sample();
            change(&root);
            assert_ne!(sum(&root), base, "{what}");
        }
    }

    #[test]
    fn times_inodes_and_hard_links_do_not_count() {
        let (_a, ra) = sample();
        let base = sum(&ra);
        set_time(&ra, "etc/passwd", 1, 2);
        set_time(&ra, "links/dangling", 3, 4);
        set_time(&ra, "etc", 5, 6);
        fs::read(ra.join("data/big")).unwrap();
        assert_eq!(sum(&ra), base);
        // Breaking a hard link into two equal files changes nothing either.
        let b = ra.join("hl/b");
        fs::remove_file(&b).unwrap();
        file(&ra, "hl/b", b"linked", 0o600);
        assert_eq!(sum(&ra), base);
    }

    #[test]
    fn dangling_and_absolute_symlinks_are_content() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        mkdir(r, "d", 0o755);
        link(r, "d/dangling", "/does/not/exist");
        link(r, "d/loop", "loop");
        link(r, "d/host", "/etc/passwd");
        let a = checksum(r, &[], &[]).unwrap();
        // Records are relative to the named path: the same files elsewhere, the same sum.
        let named = checksum(r, &["/d"], &[]).unwrap();
        fs::create_dir(r.join("moved")).unwrap();
        fs::rename(r.join("d"), r.join("moved/e")).unwrap();
        assert_eq!(checksum(r, &["/moved/e"], &[]).unwrap(), named);
        fs::rename(r.join("moved/e"), r.join("d")).unwrap();
        fs::remove_dir(r.join("moved")).unwrap();
        assert_eq!(checksum(r, &[], &[]).unwrap(), a);
        // The host's /etc/passwd is never read: only the target bytes count.
        fs::remove_file(r.join("d/host")).unwrap();
        link(r, "d/host", "/etc/passwd");
        assert_eq!(checksum(r, &[], &[]).unwrap(), a);
        // A named path that is a dangling symlink does not resolve: an error naming it.
        let err = checksum(r, &["d/dangling"], &[]).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("d/dangling"), "{err}");
    }

    #[test]
    fn named_paths_resolve_symlinks_inside_the_root() {
        let (_a, ra) = sample();
        let via_link = checksum(&ra, &["/links/todir"], &[]).unwrap();
        let via_escape = checksum(&ra, &["links/escape/passwd"], &[]).unwrap();
        fs::write(ra.join("etc/passwd"), b"changed").unwrap();
        assert_ne!(checksum(&ra, &["/links/todir"], &[]).unwrap(), via_link);
        assert_ne!(
            checksum(&ra, &["links/escape/passwd"], &[]).unwrap(),
            via_escape
        );
    }

    #[test]
    fn excludes_change_the_digest_only_when_they_exclude_something() {
        let (_a, ra) = sample();
        let base = sum(&ra);
        let ex = |p: &[&str]| {
            let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
            checksum(&ra, &[], &p).unwrap()
        };
        assert_eq!(ex(&["nothing-here", "*.none", "etc/nope/**"]), base);
        assert_ne!(ex(&["/data"]), base);
        assert_ne!(ex(&["**/big"]), base);
        assert_eq!(ex(&["/data"]), ex(&["data/"]));
        assert_eq!(
            ex(&["data", "!data/big"]),
            ex(&["data/nothing"]),
            "all re-included"
        );
        // The same as removing what is excluded.
        let excluded = ex(&["/links"]);
        fs::remove_dir_all(ra.join("links")).unwrap();
        assert_eq!(sum(&ra), excluded);
        let err = checksum(&ra, &[], &["[".to_string()]).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
    }

    #[test]
    fn format_is_stable() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        mkdir(r, "d", 0o755);
        file(r, "d/f", b"hi", 0o644);
        link(r, "d/l", "f");
        for p in ["d", "d/f", "d/l"] {
            lchown(r.join(p), Some(0), Some(0)).unwrap();
        }
        let mut records = Vec::new();
        let u32be = |n: u32| n.to_be_bytes().to_vec();
        for (path, kind, mode, tail) in [
            ("d", b'd', 0o755, Vec::new()),
            ("d/f", b'f', 0o644, Sha256::digest(b"hi").to_vec()),
            ("d/l", b'l', 0o777, [u32be(1), b"f".to_vec()].concat()),
        ] {
            records.extend(u32be(path.len() as u32));
            records.extend(path.as_bytes());
            records.push(kind);
            records.extend(u32be(mode));
            records.extend(u32be(0));
            records.extend(u32be(0));
            records.extend(u32be(0));
            records.extend(tail);
        }
        let mut want = b"strata-checksum-v2\n".to_vec();
        want.extend(Sha256::digest(&records));
        assert_eq!(checksum(r, &[], &[]).unwrap(), Digest::of(&want));
    }
}
