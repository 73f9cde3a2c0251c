//! Tree comparison, after continuity's `fstest.CheckDirectoryEqual`.
//!
//! Compared, for every path below the two roots (the roots themselves are left out, as in
//! continuity): the path set; the file type and the full mode (setuid, setgid and sticky bits
//! included); uid and gid; for regular files the size and the content (streamed, byte by
//! byte); for symlinks the target; for device nodes the major and minor numbers; and the
//! hardlink sets (paths sharing an inode, grouped on each side separately). Not compared, as
//! in continuity: times and extended attributes.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How many differences [`check_directory_equal`] reports before it stops listing them.
pub const MAX_DIFFERENCES: usize = 20;

/// What is compared of one path.
#[derive(Debug)]
struct Entry {
    /// `st_mode`: file type and permission bits.
    mode: u32,
    uid: u32,
    gid: u32,
    /// Size of a regular file (0 for anything else).
    size: u64,
    /// `(major, minor)` of a device node.
    device: Option<(u32, u32)>,
    /// Target of a symlink.
    target: Option<OsString>,
    /// `(st_dev, st_ino)` of a non-directory with more than one link.
    link_key: Option<(u64, u64)>,
}

const S_IFMT: u32 = 0o170000;

fn type_name(mode: u32) -> &'static str {
    match mode & S_IFMT {
        0o100000 => "regular file",
        0o040000 => "directory",
        0o120000 => "symlink",
        0o020000 => "character device",
        0o060000 => "block device",
        0o010000 => "FIFO",
        0o140000 => "socket",
        _ => "unknown type",
    }
}

/// Reads every entry below `root`, keyed by its path relative to `root`.
fn read_tree(root: &Path) -> io::Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for dent in fs::read_dir(&dir)? {
            let dent = dent?;
            let rel = rel.join(dent.file_name());
            let path = root.join(&rel);
            let m = fs::symlink_metadata(&path)?;
            let ft = m.file_type();
            let entry = Entry {
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_file() { m.size() } else { 0 },
                device: if ft.is_char_device() || ft.is_block_device() {
                    Some((rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev())))
                } else {
                    None
                },
                target: if ft.is_symlink() {
                    Some(fs::read_link(&path)?.into_os_string())
                } else {
                    None
                },
                link_key: if !ft.is_dir() && m.nlink() > 1 {
                    Some((m.dev(), m.ino()))
                } else {
                    None
                },
            };
            if ft.is_dir() {
                stack.push(rel.clone());
            }
            out.insert(rel, entry);
        }
    }
    Ok(out)
}

/// Fills `buf` as far as the file goes; returns how much was read.
fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The offset of the first byte where two files differ, `None` when they are equal.
fn first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    const CHUNK: usize = 64 * 1024;
    let mut fa = fs::File::open(a)?;
    let mut fb = fs::File::open(b)?;
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += na as u64;
    }
}

/// The hardlink groups of a tree: for each path that shares its inode with another path of
/// this tree, the sorted paths that do (itself included).
fn link_groups(tree: &BTreeMap<PathBuf, Entry>) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut by_inode: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for (p, e) in tree {
        if let Some(k) = e.link_key {
            by_inode.entry(k).or_default().push(p.clone());
        }
    }
    let mut out = BTreeMap::new();
    // A file whose other links are outside the tree is a plain file of the tree, as in
    // continuity (its link count may count names elsewhere: a flattened lower's, say).
    for group in by_inode.into_values().filter(|g| g.len() > 1) {
        for p in &group {
            out.insert(p.clone(), group.clone());
        }
    }
    out
}

fn show(p: &Path) -> String {
    format!("/{}", p.display())
}

fn show_group(g: Option<&Vec<PathBuf>>, p: &Path) -> String {
    match g {
        Some(g) if g.len() > 1 => {
            let names: Vec<String> = g.iter().map(|p| show(p)).collect();
            format!("[{}]", names.join(", "))
        }
        _ => format!("[{}] (no other link)", show(p)),
    }
}

/// Compares the trees below `a` and `b` (see the module documentation for what is compared)
/// and reports at most [`MAX_DIFFERENCES`] differences, one per line, each with its path.
pub fn check_directory_equal(a: &Path, b: &Path) -> Result<(), String> {
    check_directory_equal_limit(a, b, MAX_DIFFERENCES)
}

/// [`check_directory_equal`], reporting at most `max` differences (and how many more there
/// were).
pub fn check_directory_equal_limit(a: &Path, b: &Path, max: usize) -> Result<(), String> {
    let ta = read_tree(a).map_err(|e| format!("reading the tree {}: {e}", a.display()))?;
    let tb = read_tree(b).map_err(|e| format!("reading the tree {}: {e}", b.display()))?;
    let mut diffs: Vec<String> = Vec::new();

    for (p, ea) in &ta {
        let Some(eb) = tb.get(p) else {
            diffs.push(format!("- {}: only in {}", show(p), a.display()));
            continue;
        };
        let mut what = Vec::new();
        if ea.mode & S_IFMT != eb.mode & S_IFMT {
            what.push(format!(
                "type {} != {}",
                type_name(ea.mode),
                type_name(eb.mode)
            ));
        }
        if ea.mode != eb.mode {
            what.push(format!("mode {:o} != {:o}", ea.mode, eb.mode));
        }
        if (ea.uid, ea.gid) != (eb.uid, eb.gid) {
            what.push(format!(
                "owner {}:{} != {}:{}",
                ea.uid, ea.gid, eb.uid, eb.gid
            ));
        }
        if ea.mode & S_IFMT == eb.mode & S_IFMT {
            if ea.size != eb.size {
                what.push(format!("size {} != {}", ea.size, eb.size));
            } else if ea.mode & S_IFMT == 0o100000 && ea.size > 0 {
                match first_difference(&a.join(p), &b.join(p)) {
                    Ok(None) => {}
                    Ok(Some(at)) => what.push(format!("content differs at byte {at}")),
                    Err(e) => what.push(format!("content could not be compared: {e}")),
                }
            }
            if ea.target != eb.target {
                what.push(format!(
                    "symlink target {:?} != {:?}",
                    ea.target.as_deref().unwrap_or_default(),
                    eb.target.as_deref().unwrap_or_default()
                ));
            }
            if ea.device != eb.device {
                let (ma, na) = ea.device.unwrap_or_default();
                let (mb, nb) = eb.device.unwrap_or_default();
                what.push(format!("device {ma}:{na} != {mb}:{nb}"));
            }
        }
        if !what.is_empty() {
            diffs.push(format!("~ {}: {}", show(p), what.join(", ")));
        }
    }
    for p in tb.keys().filter(|p| !ta.contains_key(*p)) {
        diffs.push(format!("+ {}: only in {}", show(p), b.display()));
    }

    // Hardlink sets, compared over the paths both trees have (the others are reported above).
    let (ga, gb) = (link_groups(&ta), link_groups(&tb));
    let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
    for p in ta.keys().filter(|p| tb.contains_key(*p)) {
        let (xa, xb) = (ga.get(p), gb.get(p));
        let same = match (xa, xb) {
            (None, None) => true,
            (Some(x), Some(y)) => x == y,
            _ => false,
        };
        if !same {
            let pair = (show_group(xa, p), show_group(xb, p));
            if reported.insert(pair.clone()) {
                diffs.push(format!(
                    "~ {}: hardlinks {} in {} != {} in {}",
                    show(p),
                    pair.0,
                    a.display(),
                    pair.1,
                    b.display()
                ));
            }
        }
    }

    if diffs.is_empty() {
        return Ok(());
    }
    let total = diffs.len();
    diffs.truncate(max);
    let mut out = format!(
        "directory diff between {} and {} ({total} differences):\n{}",
        a.display(),
        b.display(),
        diffs.join("\n")
    );
    if total > max {
        out.push_str(&format!("\n... and {} more", total - max));
    }
    Err(out)
}

/// continuity's `CheckDirectoryEqualWithApplier`: applies `ops` to a fresh directory (made in
/// `scratch`) and compares it with `root`.
pub fn check_directory_equal_with_applier(
    root: &Path,
    ops: &[crate::Op],
    scratch: &Path,
) -> Result<(), String> {
    let applied = tempfile::Builder::new()
        .prefix("fstest")
        .tempdir_in(scratch)
        .map_err(|e| format!("creating a directory in {}: {e}", scratch.display()))?;
    crate::apply(applied.path(), ops).map_err(|e| format!("applying to the expected tree: {e}"))?;
    check_directory_equal(applied.path(), root)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{apply, Op};

    fn base() -> Vec<Op> {
        vec![
            Op::CreateDir("/d", 0o755),
            Op::CreateFile("/d/f", b"abc".to_vec(), 0o644),
            Op::CreateFile("/g", b"xyz".to_vec(), 0o644),
            Op::CreateFile("/h", b"abc".to_vec(), 0o644),
            Op::Symlink("d/f", "/l"),
            Op::CreateFile("/big", vec![7u8; 200_000], 0o600),
        ]
    }

    fn pair(tmp: &Path, name: &str, ops: &[Op]) -> (PathBuf, PathBuf) {
        let a = tmp.join(format!("{name}-a"));
        let b = tmp.join(format!("{name}-b"));
        for d in [&a, &b] {
            fs::create_dir(d).unwrap();
            apply(d, &base()).unwrap();
            apply(d, ops).unwrap();
        }
        assert_eq!(check_directory_equal(&a, &b), Ok(()), "{name}: before");
        (a, b)
    }

    /// Every property the comparison claims to check is caught, with the path named.
    #[test]
    fn every_kind_of_difference_is_reported_with_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let root = rustix::process::geteuid().is_root();
        let mut big = vec![7u8; 200_000];
        big[150_001] = 8;
        let variants: Vec<(&str, Vec<Op>, Vec<Op>, &str)> = vec![
            (
                "mode",
                vec![],
                vec![Op::Chmod("/d/f", 0o600)],
                "/d/f: mode 100644 != 100600",
            ),
            (
                "setuid",
                vec![],
                vec![Op::Chmod("/g", 0o4644)],
                "/g: mode 100644 != 104644",
            ),
            (
                "dirmode",
                vec![],
                vec![Op::Chmod("/d", 0o700)],
                "/d: mode 40755 != 40700",
            ),
            (
                "content",
                vec![],
                vec![Op::CreateFile("/d/f", b"abd".to_vec(), 0o644)],
                "/d/f: content differs at byte 2",
            ),
            (
                "bigcontent",
                vec![],
                vec![Op::CreateFileOwned("/big".into(), big, 0o600)],
                "/big: content differs at byte 150001",
            ),
            (
                "size",
                vec![],
                vec![Op::CreateFile("/d/f", b"abcd".to_vec(), 0o644)],
                "/d/f: size 3 != 4",
            ),
            ("only", vec![], vec![Op::RemoveAll("/g")], "- /g: only in"),
            (
                "extra",
                vec![],
                vec![Op::CreateDir("/new", 0o755)],
                "+ /new: only in",
            ),
            (
                "target",
                vec![],
                vec![Op::Remove("/l"), Op::Symlink("g", "/l")],
                "/l: symlink target \"d/f\" != \"g\"",
            ),
            (
                "type",
                vec![],
                vec![Op::Remove("/h"), Op::CreateDir("/h", 0o644)],
                "/h: type regular file != directory",
            ),
            (
                "hardlink",
                vec![],
                vec![Op::Remove("/h"), Op::Link("/d/f", "/h")],
                "hardlinks [/d/f] (no other link)",
            ),
            (
                "fifo",
                vec![Op::CreateDevice("/p", 0o010640, 0, 0)],
                vec![Op::Chmod("/p", 0o600)],
                "/p: mode 10640 != 10600",
            ),
        ];
        let mut variants = variants;
        if root {
            variants.push((
                "owner",
                vec![],
                vec![Op::Chown("/d/f", 1, 2)],
                "/d/f: owner 0:0 != 1:2",
            ));
            variants.push((
                "device",
                vec![Op::CreateDevice("/c", 0o020600, 1, 3)],
                vec![Op::Remove("/c"), Op::CreateDevice("/c", 0o020600, 1, 5)],
                "/c: device 1:3 != 1:5",
            ));
            variants.push((
                "lchown",
                vec![],
                vec![Op::Lchown("/l", 3, 4)],
                "/l: owner 0:0 != 3:4",
            ));
        }
        for (name, setup, change, expected) in variants {
            let (a, b) = pair(tmp.path(), name, &setup);
            apply(&b, &change).unwrap();
            let diff = check_directory_equal(&a, &b).unwrap_err();
            assert!(
                diff.contains(expected),
                "{name}: expected {expected:?} in:\n{diff}"
            );
        }
    }

    /// Hardlink sets are compared as groupings, whatever the inode numbers.
    #[test]
    fn hardlink_groupings_are_compared_not_inode_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let ops = [
            Op::CreateFile("/x", b"same".to_vec(), 0o644),
            Op::Link("/x", "/y"),
            Op::CreateFile("/z", b"same".to_vec(), 0o644),
        ];
        let (a, b) = pair(tmp.path(), "links", &ops);
        // b: /y now linked to /z instead of /x; same contents, same modes.
        apply(&b, &[Op::Remove("/y"), Op::Link("/z", "/y")]).unwrap();
        let diff = check_directory_equal(&a, &b).unwrap_err();
        assert!(diff.contains("hardlinks [/x, /y]"), "{diff}");
        assert!(diff.contains("[/y, /z]"), "{diff}");
    }

    /// Times are not compared, nor are the roots; the number of differences is capped.
    #[test]
    fn times_and_roots_are_left_out_and_the_list_is_capped() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = pair(tmp.path(), "times", &[]);
        let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        apply(
            &b,
            &[Op::Chtimes("/d/f", past, past), Op::Chmod("/", 0o700)],
        )
        .unwrap();
        assert_eq!(
            fs::metadata(b.join("d/f")).unwrap().modified().unwrap(),
            past
        );
        assert_eq!(check_directory_equal(&a, &b), Ok(()));

        let many: Vec<Op> = (0..30)
            .map(|i| Op::CreateFileOwned(format!("/many-{i:02}"), vec![], 0o644))
            .collect();
        apply(&b, &many).unwrap();
        let diff = check_directory_equal_limit(&a, &b, 5).unwrap_err();
        assert!(diff.contains("(30 differences)"), "{diff}");
        assert!(diff.ends_with("... and 25 more"), "{diff}");
        assert_eq!(diff.lines().count(), 1 + 5 + 1, "{diff}");
    }

    /// The appliers behave like continuity's: CreateDir makes parents and accepts an existing
    /// directory, CreateFile rewrites in place, RemoveAll accepts a missing path, Remove not.
    #[test]
    fn appliers_follow_continuity() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        apply(
            r,
            &[
                Op::CreateDir("/a/b/c", 0o711),
                Op::CreateDir("/a/b/c", 0o700),
            ],
        )
        .unwrap();
        assert_eq!(
            fs::metadata(r.join("a/b/c")).unwrap().mode() & 0o7777,
            0o700
        );
        apply(r, &[Op::CreateFile("/f", b"one".to_vec(), 0o644)]).unwrap();
        let ino = fs::metadata(r.join("f")).unwrap().ino();
        apply(r, &[Op::CreateFile("/f", b"two".to_vec(), 0o2755)]).unwrap();
        let m = fs::metadata(r.join("f")).unwrap();
        assert_eq!((m.ino(), m.mode() & 0o7777), (ino, 0o2755));
        assert_eq!(fs::read(r.join("f")).unwrap(), b"two");
        apply(r, &[Op::RemoveAll("/missing"), Op::RemoveAll("/a")]).unwrap();
        assert!(!r.join("a").exists());
        assert!(apply(r, &[Op::Remove("/missing")]).is_err());
        apply(r, &[Op::Rename("/f", "/g")]).unwrap();
        assert_eq!(fs::read(r.join("g")).unwrap(), b"two");
    }
}
