//! What a directory tree holds, for the targets to compare trees: read without following any
//! symlink, and an overlayfs merged view computed from an upper directory and its lower one.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// One entry of a tree, as the layer format carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `d`, `f`, `l`, `c`, `b`, `p` or `s`.
    pub kind: char,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time in seconds (not for directories, whose times a layer sets only
    /// for the directories it names).
    pub mtime: Option<i64>,
    /// A file's content or a symlink's target.
    pub data: Vec<u8>,
    /// A device's number.
    pub rdev: u64,
}

/// A tree by path relative to its root (the root itself left out).
pub type Tree = BTreeMap<PathBuf, Node>;

fn node(path: &Path, md: &fs::Metadata) -> Node {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        's'
    };
    let data = match kind {
        'f' => fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
        'l' => fs::read_link(path)
            .map(|t| t.into_os_string().into_encoded_bytes())
            .unwrap_or_else(|e| panic!("read link {}: {e}", path.display())),
        _ => Vec::new(),
    };
    Node {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (kind != 'd').then(|| md.mtime()),
        data,
        rdev: if matches!(kind, 'c' | 'b') {
            md.rdev()
        } else {
            0
        },
    }
}

/// Everything under `root` (which must be a directory), symlinks not followed.
pub fn read(root: &Path) -> Tree {
    let mut out = Tree::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn walk(root: &Path, rel: &Path, out: &mut Tree) {
    let dir = root.join(rel);
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for e in entries {
        let e = e.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        let r = rel.join(e.file_name());
        let p = root.join(&r);
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        out.insert(r.clone(), node(&p, &md));
        if md.is_dir() {
            walk(root, &r, out);
        }
    }
}

fn is_opaque(p: &Path) -> bool {
    let mut v = [0u8; 8];
    matches!(rustix::fs::lgetxattr(p, "trusted.overlay.opaque", &mut v[..]), Ok(1) if v[0] == b'y')
}

/// The tree overlayfs would show for upper directory `upper` over the single lower layer
/// `lower`: char 0/0 devices hide the lower entry, an opaque directory
/// (`trusted.overlay.opaque=y`) hides the lower directory's entries, a directory over a
/// directory merges, anything else in the upper directory wins.
pub fn merged(upper: &Path, lower: &Path) -> Tree {
    let mut out = Tree::new();
    merge_dir(upper, lower, Path::new(""), true, true, &mut out);
    out
}

fn names(dir: &Path) -> Vec<std::ffi::OsString> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display())),
        Err(e) => panic!("read {}: {e}", dir.display()),
    }
}

fn merge_dir(
    upper: &Path,
    lower: &Path,
    rel: &Path,
    in_upper: bool,
    in_lower: bool,
    out: &mut Tree,
) {
    let mut all = std::collections::BTreeSet::new();
    if in_upper {
        all.extend(names(&upper.join(rel)));
    }
    if in_lower {
        all.extend(names(&lower.join(rel)));
    }
    for n in all {
        let r = rel.join(&n);
        let up = if in_upper {
            fs::symlink_metadata(upper.join(&r)).ok()
        } else {
            None
        };
        let low = if in_lower {
            fs::symlink_metadata(lower.join(&r)).ok()
        } else {
            None
        };
        match (up, low) {
            (Some(u), low) => {
                if u.file_type().is_char_device() && u.rdev() == 0 {
                    continue; // a whiteout
                }
                out.insert(r.clone(), node(&upper.join(&r), &u));
                if u.is_dir() {
                    let lower_shows =
                        low.is_some_and(|l| l.is_dir()) && !is_opaque(&upper.join(&r));
                    merge_dir(upper, lower, &r, true, lower_shows, out);
                }
            }
            (None, Some(l)) => {
                out.insert(r.clone(), node(&lower.join(&r), &l));
                if l.is_dir() {
                    merge_dir(upper, lower, &r, false, true, out);
                }
            }
            (None, None) => {}
        }
    }
}

/// The first difference between two trees, described, or `None` when they are equal.
pub fn difference(a: &Tree, b: &Tree) -> Option<String> {
    for (p, n) in a {
        match b.get(p) {
            None => return Some(format!("{} is only in the first tree ({n:?})", p.display())),
            Some(m) if m != n => {
                return Some(format!("{} differs: {n:?} against {m:?}", p.display()))
            }
            Some(_) => {}
        }
    }
    b.keys()
        .find(|p| !a.contains_key(*p))
        .map(|p| format!("{} is only in the second tree ({:?})", p.display(), b[p]))
}
