//! Test support for strata's integration tests: file-system appliers that build the same
//! change in a mounted snapshot and in a flat directory, a comparison of two trees, and the
//! privileged-test gate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use strata::Mount;

/// Whether a test that needs root and overlayfs can run. When it cannot, it fails under
/// `STRATA_REQUIRE_PRIVILEGED=1` (CI) and otherwise prints a skip note.
pub fn require_privileged(what: &str) -> bool {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root");
    }
    if !fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("overlay")
    {
        missing.push("overlayfs");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{what} needs {}", missing.join(" and "));
    if std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("{msg}, and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// One file-system change, applied relative to a root directory.
#[derive(Debug, Clone)]
pub enum Op {
    /// Create (or replace) a regular file with content and mode.
    CreateFile(&'static str, Vec<u8>, u32),
    /// Create a directory with a mode (exactly, whatever the umask).
    CreateDir(&'static str, u32),
    /// Remove a path and everything under it.
    RemoveAll(&'static str),
    /// Change the owner.
    Chown(&'static str, u32, u32),
    /// Change the mode.
    Chmod(&'static str, u32),
    /// Hard link `new` to `old`.
    Link(&'static str, &'static str),
    /// Create symlink `link` pointing at `target`.
    Symlink(&'static str, &'static str),
    /// Rename `old` to `new`.
    Rename(&'static str, &'static str),
    /// Make the root directory 0755 (continuity's `fstest.Base`).
    Base,
    /// A file with an owned name (for generated layers).
    CreateFileOwned(String, Vec<u8>, u32),
    /// A directory with an owned name.
    CreateDirOwned(String, u32),
}

fn at(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

/// Applies `ops` under `root`, in order.
pub fn apply(root: &Path, ops: &[Op]) -> std::io::Result<()> {
    for op in ops {
        apply_one(root, op).map_err(|e| std::io::Error::new(e.kind(), format!("{op:?}: {e}")))?;
    }
    Ok(())
}

fn apply_one(root: &Path, op: &Op) -> std::io::Result<()> {
    match op {
        Op::CreateFile(p, data, mode) => create_file(&at(root, p), data, *mode),
        Op::CreateFileOwned(p, data, mode) => create_file(&at(root, p), data, *mode),
        Op::CreateDir(p, mode) => create_dir(&at(root, p), *mode),
        Op::CreateDirOwned(p, mode) => create_dir(&at(root, p), *mode),
        Op::RemoveAll(p) => {
            let path = at(root, p);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
                Ok(_) => fs::remove_file(&path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::Chown(p, uid, gid) => std::os::unix::fs::lchown(at(root, p), Some(*uid), Some(*gid)),
        Op::Chmod(p, mode) => fs::set_permissions(at(root, p), fs::Permissions::from_mode(*mode)),
        Op::Link(old, new) => fs::hard_link(at(root, old), at(root, new)),
        Op::Symlink(target, link) => std::os::unix::fs::symlink(target, at(root, link)),
        Op::Rename(old, new) => fs::rename(at(root, old), at(root, new)),
        Op::Base => fs::set_permissions(root, fs::Permissions::from_mode(0o755)),
    }
}

fn create_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    fs::write(path, data)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn create_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    fs::create_dir(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// What is compared of one entry: type and mode, owner, size, device, link target, content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    rdev: u64,
    target: Option<PathBuf>,
    content: Option<Vec<u8>>,
    ino: u64,
}

fn read_tree(root: &Path) -> std::io::Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let m = fs::symlink_metadata(&path)?;
        let ft = m.file_type();
        let content = if ft.is_file() {
            let mut buf = Vec::new();
            fs::File::open(&path)?.read_to_end(&mut buf)?;
            Some(buf)
        } else {
            None
        };
        out.insert(
            rel.clone(),
            Entry {
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_dir() { 0 } else { m.size() },
                rdev: m.rdev(),
                target: if ft.is_symlink() {
                    Some(fs::read_link(&path)?)
                } else {
                    None
                },
                content,
                ino: if ft.is_dir() { 0 } else { m.ino() },
            },
        );
        if ft.is_dir() {
            for e in fs::read_dir(&path)? {
                stack.push(rel.join(e?.file_name()));
            }
        }
    }
    Ok(out)
}

/// The hardlink sets of a tree: groups of two or more paths sharing an inode.
fn link_sets(tree: &BTreeMap<PathBuf, Entry>) -> Vec<Vec<PathBuf>> {
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (p, e) in tree {
        if e.ino != 0 {
            by_ino.entry(e.ino).or_default().push(p.clone());
        }
    }
    let mut sets: Vec<Vec<PathBuf>> = by_ino.into_values().filter(|v| v.len() > 1).collect();
    for s in &mut sets {
        s.sort();
    }
    sets.sort();
    sets
}

/// Compares two trees as containerd's `fstest.CheckDirectoryEqual` does: path set, type and
/// mode, uid, gid, size, content, symlink targets, hardlink sets and device numbers (not
/// times, not xattrs). Like continuity's manifests, the roots themselves are not compared,
/// only what is below them. Returns the differences, at most 20, one per line.
pub fn check_directory_equal(a: &Path, b: &Path) -> Result<(), String> {
    let ta = read_tree(a).map_err(|e| format!("reading {}: {e}", a.display()))?;
    let tb = read_tree(b).map_err(|e| format!("reading {}: {e}", b.display()))?;
    let mut diffs = Vec::new();
    for (p, ea) in ta.iter().filter(|(p, _)| !p.as_os_str().is_empty()) {
        match tb.get(p) {
            None => diffs.push(format!("{}: only in {}", p.display(), a.display())),
            Some(eb) => {
                let mut what = Vec::new();
                if ea.mode != eb.mode {
                    what.push(format!("mode {:o} != {:o}", ea.mode, eb.mode));
                }
                if (ea.uid, ea.gid) != (eb.uid, eb.gid) {
                    what.push(format!(
                        "owner {}:{} != {}:{}",
                        ea.uid, ea.gid, eb.uid, eb.gid
                    ));
                }
                if ea.size != eb.size {
                    what.push(format!("size {} != {}", ea.size, eb.size));
                }
                if ea.rdev != eb.rdev {
                    what.push(format!("rdev {} != {}", ea.rdev, eb.rdev));
                }
                if ea.target != eb.target {
                    what.push(format!("link {:?} != {:?}", ea.target, eb.target));
                }
                if ea.content != eb.content {
                    what.push("content differs".into());
                }
                if !what.is_empty() {
                    diffs.push(format!("/{}: {}", p.display(), what.join(", ")));
                }
            }
        }
    }
    for p in tb.keys().filter(|p| !ta.contains_key(*p)) {
        diffs.push(format!("/{}: only in {}", p.display(), b.display()));
    }
    let (la, lb) = (link_sets(&ta), link_sets(&tb));
    if la != lb {
        diffs.push(format!("hardlink sets differ: {la:?} != {lb:?}"));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        diffs.truncate(20);
        Err(diffs.join("\n"))
    }
}

/// A snapshot mounted on a directory; unmounted on drop.
pub struct Mounted {
    path: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Mounts `mounts` on `path` (created if missing).
    pub fn new(mounts: &[Mount], path: &Path) -> Mounted {
        fs::create_dir_all(path).unwrap();
        strata::mount::mount_all(mounts, path)
            .unwrap_or_else(|e| panic!("mounting on {}: {e}", path.display()));
        Mounted {
            path: path.to_path_buf(),
            mounted: true,
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts now.
    pub fn unmount(mut self) {
        strata::mount::unmount(&self.path).unwrap();
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = strata::mount::unmount(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every property the comparison claims to check is actually caught.
    #[test]
    fn the_comparison_sees_every_kind_of_difference() {
        let base = vec![
            Op::CreateDir("/d", 0o755),
            Op::CreateFile("/d/f", b"abc".to_vec(), 0o644),
            Op::CreateFile("/g", b"xyz".to_vec(), 0o644),
            Op::Symlink("d/f", "/l"),
        ];
        let variants: Vec<(&str, Vec<Op>)> = vec![
            ("mode", vec![Op::Chmod("/d/f", 0o600)]),
            (
                "content",
                vec![Op::CreateFile("/d/f", b"abd".to_vec(), 0o644)],
            ),
            (
                "size",
                vec![Op::CreateFile("/d/f", b"abcd".to_vec(), 0o644)],
            ),
            ("only in", vec![Op::RemoveAll("/g")]),
            ("link", vec![Op::RemoveAll("/l"), Op::Symlink("g", "/l")]),
            (
                "hardlink",
                vec![Op::RemoveAll("/g"), Op::Link("/d/f", "/g")],
            ),
        ];
        let can_chown = rustix::process::geteuid().is_root();
        let tmp = tempfile::tempdir().unwrap();
        for (i, (what, change)) in variants.into_iter().enumerate() {
            let a = tmp.path().join(format!("a{i}"));
            let b = tmp.path().join(format!("b{i}"));
            fs::create_dir(&a).unwrap();
            fs::create_dir(&b).unwrap();
            apply(&a, &base).unwrap();
            apply(&b, &base).unwrap();
            assert_eq!(check_directory_equal(&a, &b), Ok(()));
            apply(&b, &change).unwrap();
            if what == "hardlink" {
                // Same content as before, so only the link set differs.
                apply(&a, &[Op::CreateFile("/g", b"abc".to_vec(), 0o644)]).unwrap();
            }
            let diff = check_directory_equal(&a, &b).unwrap_err();
            assert!(diff.contains(what), "{what}: {diff}");
        }
        if can_chown {
            let a = tmp.path().join("ca");
            let b = tmp.path().join("cb");
            for d in [&a, &b] {
                fs::create_dir(d).unwrap();
                apply(d, &base).unwrap();
            }
            apply(&b, &[Op::Chown("/d/f", 1, 1)]).unwrap();
            assert!(check_directory_equal(&a, &b).unwrap_err().contains("owner"));
        }
    }
}
