//! `whiteout`: the bytes pick a layer of whiteouts, opaque markers, files, directories and
//! links over a fixed lower tree (see [`layer_of`]). The layer is applied twice: by the tree
//! applier onto a copy of the lower tree, and by the overlay applier into an empty upper
//! directory over it (no mount: an entry that needs one fails that apply, and the comparison
//! is skipped). Checked: the two agree (the overlayfs view of the upper directory is the
//! tree), deletions remove exactly what they name, an opaque directory keeps only what the
//! layer put there, nothing else of the lower tree changes, and the overlay differ's layer of
//! the upper directory makes the same tree again.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use strata::layer::apply::{apply_layer, apply_overlay_layer};
use strata::layer::diff::{write_overlay_layer, DiffOptions};
use strata::Error;

use crate::tree;

/// The names entries get: a small set, so that entries collide with the lower tree and with
/// each other, plus hostile ones.
pub const NAMES: &[&str] = &[
    "a",
    "b",
    "d",
    "d/x",
    "d/e",
    "d/e/y",
    "g",
    "g/h",
    "n",
    "n/m",
    "l",
    "l/x",
    ".wh.a",
    "d/.wh.x",
    "..",
    "../x",
    "/d/x",
    "d/./e",
    "d/../a",
    ".wh..wh.plnk",
    ".wh.",
];

/// One entry of the generated layer.
#[derive(Debug, Clone)]
pub enum Op {
    /// A file with a byte of content and a mode.
    File(usize, u8, u32),
    /// A directory.
    Dir(usize, u32),
    /// A whiteout of the name.
    Whiteout(usize),
    /// An opaque marker in the directory.
    Opaque(usize),
    /// A symlink to the other name.
    Symlink(usize, usize),
    /// A hard link to the other name.
    Link(usize, usize),
    /// A fifo.
    Fifo(usize),
}

/// Reads the operations from the bytes, three at a time.
pub fn ops(data: &[u8]) -> Vec<Op> {
    data.chunks(3)
        .take(24)
        .map(|c| {
            let (a, b, x) = (c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0));
            let n = usize::from(b) % NAMES.len();
            let m = usize::from(x) % NAMES.len();
            match a % 8 {
                0 | 1 => Op::File(n, x, [0o644, 0o755, 0o600, 0o4755][usize::from(a >> 6)]),
                2 => Op::Dir(n, [0o755, 0o700, 0o1777, 0o555][usize::from(a >> 6)]),
                3 | 4 => Op::Whiteout(n),
                5 => Op::Opaque(n),
                6 => {
                    if a & 0x80 == 0 {
                        Op::Symlink(n, m)
                    } else {
                        Op::Link(n, m)
                    }
                }
                _ => Op::Fifo(n),
            }
        })
        .collect()
}

/// The path an operation's entry has in the tar.
fn entry_name(op: &Op) -> String {
    match op {
        Op::File(n, ..) | Op::Dir(n, _) | Op::Symlink(n, _) | Op::Link(n, _) | Op::Fifo(n) => {
            NAMES[*n].to_string()
        }
        Op::Whiteout(n) => match NAMES[*n].rsplit_once('/') {
            Some((dir, last)) => format!("{dir}/.wh.{last}"),
            None => format!(".wh.{}", NAMES[*n]),
        },
        Op::Opaque(n) => format!("{}/.wh..wh..opq", NAMES[*n]),
    }
}

fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_100);
    h.set_size(size);
    // Written raw: the tar crate's own path setters refuse the hostile names on purpose.
    let raw = &mut h.as_old_mut().name;
    raw.fill(0);
    raw[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    h
}

/// The layer the operations make, as a plain tar.
pub fn layer_of(ops: &[Op]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for op in ops {
        let name = entry_name(op);
        let mut h = match op {
            Op::File(_, c, mode) => {
                let data = vec![*c; usize::from(*c % 5)];
                let h = header(tar::EntryType::Regular, &name, *mode, data.len() as u64);
                b.append(&h, &data[..]).unwrap();
                continue;
            }
            Op::Dir(_, mode) => header(tar::EntryType::Directory, &name, *mode, 0),
            Op::Whiteout(_) | Op::Opaque(_) => header(tar::EntryType::Regular, &name, 0o644, 0),
            Op::Symlink(_, t) | Op::Link(_, t) => {
                let kind = if matches!(op, Op::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = header(kind, &name, 0o777, 0);
                let raw = &mut h.as_old_mut().linkname;
                raw.fill(0);
                raw[..NAMES[*t].len()].copy_from_slice(NAMES[*t].as_bytes());
                h
            }
            Op::Fifo(_) => header(tar::EntryType::Fifo, &name, 0o644, 0),
        };
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap()
}

/// The lower tree every layer goes onto.
fn lower(root: &Path) {
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::create_dir_all(root.join("g")).unwrap();
    for (p, c) in [
        ("a", "a"),
        ("d/x", "x"),
        ("d/e/y", "y"),
        ("g/h", "h"),
        ("g/i", "i"),
    ] {
        fs::write(root.join(p), c).unwrap();
        crate::layer::set_time(&root.join(p));
    }
    symlink("d", root.join("l")).unwrap();
    for d in ["l", "d/e", "d", "g"] {
        crate::layer::set_time(&root.join(d));
    }
}

/// The error the overlay apply's mount stands-in gives (no target mounts anything).
fn no_mount() -> strata::Result<strata::mount::TempMount> {
    Err(Error::invalid(
        "fuzz",
        "this entry needs a mount; the target does not mount",
    ))
}

fn needed_mount(e: &Error) -> bool {
    e.to_string().contains("the target does not mount")
}

/// Normalised path of a tar name, as the applier reads it (`None` when it has `..`).
fn norm(name: &str) -> Option<PathBuf> {
    let mut p = PathBuf::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => p.push(c),
        }
    }
    Some(p)
}

/// The target: see the module docs.
pub fn whiteout(data: &[u8]) {
    let ops = ops(data);
    let layer = layer_of(&ops);
    let tmp = tempfile::tempdir().unwrap();
    let low = tmp.path().join("lower");
    lower(&low);
    let lower_tree = tree::read(&low);
    let t = tmp.path().join("tree");
    lower(&t);
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).unwrap();

    let by_tree = apply_layer(&t, &layer[..], None);
    let by_upper = apply_overlay_layer(
        &upper,
        std::slice::from_ref(&low),
        no_mount,
        &layer[..],
        None,
    );
    if let Some(d) = tree::difference(&lower_tree, &tree::read(&low)) {
        panic!("the overlay apply changed its lower layer: {d}");
    }
    let tree_ok = by_tree.is_ok();
    match (&by_tree, &by_upper) {
        (Ok(_), Err((e, _))) if !needed_mount(e) => {
            panic!("the tree applier took the layer, the overlay applier refused it: {e}")
        }
        (Err((e, _)), Ok(_)) => {
            panic!("the overlay applier took the layer, the tree applier refused it: {e}")
        }
        _ => {}
    }
    if let Err((e, _)) = &by_tree {
        let msg = e.to_string();
        assert!(!msg.is_empty());
        if let Err((u, _)) = &by_upper {
            assert!(!u.to_string().is_empty());
        }
        return;
    }
    let result = tree::read(&t);
    check_semantics(&ops, &lower_tree, &result);
    if !tree_ok || by_upper.is_err() {
        return;
    }
    let merged = tree::merged(&upper, &low);
    if let Some(d) = tree::difference(&result, &merged) {
        panic!("the overlay applier's upper directory does not show the tree applier's tree: {d}");
    }
    // The overlay differ reads the upper directory back into a layer that makes the tree.
    let (_, _, again) =
        write_overlay_layer(Some(&low), &upper, Vec::new(), &DiffOptions::default())
            .unwrap_or_else(|e| {
                panic!("the overlay differ failed on an applied upper directory: {e}")
            });
    let t2 = tmp.path().join("again");
    lower(&t2);
    if let Err((e, _)) = apply_layer(&t2, &again[..], None) {
        panic!("the overlay differ's layer does not apply: {e}");
    }
    if let Some(d) = tree::difference(&result, &tree::read(&t2)) {
        panic!(
            "upper directory -> overlay differ -> apply: the trees differ: {d}\nlayer: {:?}\nthe differ's layer: {:?}",
            entries(&layer),
            entries(&again)
        );
    }
}

/// What an entry does, read from its name as the applier reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    /// Deletes the path.
    Delete(PathBuf),
    /// Hides the lower entries of the directory.
    Opaque(PathBuf),
    /// Makes the path (and its missing parents).
    Make(PathBuf),
}

fn effect(op: &Op) -> Option<Effect> {
    let p = norm(&entry_name(op))?;
    let last = p.file_name()?.to_str()?.to_string();
    let parent = p.parent().unwrap_or(Path::new("")).to_path_buf();
    Some(match last.strip_prefix(".wh.") {
        Some(".wh..opq") => Effect::Opaque(parent),
        Some(t) => Effect::Delete(parent.join(t)),
        None => Effect::Make(p),
    })
}

/// The entry names of a tar, for messages.
fn entries(tar: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(tar);
    a.entries()
        .map(|es| {
            es.filter_map(|e| e.ok())
                .map(|e| String::from_utf8_lossy(&e.path_bytes()).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Checks what the whiteouts and opaque markers did, from the entries alone, on a layer
/// that applied.
fn check_semantics(ops: &[Op], lower: &tree::Tree, result: &tree::Tree) {
    let effects: Vec<Effect> = ops.iter().filter_map(effect).collect();
    let path_of = |e: &Effect| -> PathBuf {
        match e {
            Effect::Delete(p) | Effect::Opaque(p) | Effect::Make(p) => p.clone(),
        }
    };
    // Through a symlink parent an entry changes another path than its own, which this path
    // model does not follow (the comparison with the overlay applier still holds).
    let links: Vec<PathBuf> = lower
        .iter()
        .filter(|(_, n)| n.kind == 'l')
        .map(|(p, _)| p.clone())
        .chain(ops.iter().filter_map(|o| match (o, effect(o)) {
            (Op::Symlink(..), Some(Effect::Make(p))) => Some(p),
            _ => None,
        }))
        .collect();
    if ops
        .iter()
        .filter_map(|o| norm(&entry_name(o)))
        .any(|q| links.iter().any(|l| q != *l && q.starts_with(l)))
    {
        return;
    }
    // Every path an entry makes, with the missing parents it creates: all of an entry's
    // ancestors (a whiteout or an opaque marker creates its missing parents too).
    let made = |p: &Path| {
        ops.iter()
            .filter_map(|o| norm(&entry_name(o)))
            .any(|q| q != p && q.starts_with(p))
            || effects.contains(&Effect::Make(p.to_path_buf()))
    };
    for (i, e) in effects.iter().enumerate() {
        let later = &effects[i + 1..];
        match e {
            Effect::Delete(target) => {
                // Gone, unless a later entry brings it (or something below it) back.
                let back = later.iter().any(|l| path_of(l).starts_with(target));
                if !back {
                    assert!(
                        !result.contains_key(target),
                        "a whiteout deleted {}, yet it is there",
                        target.display()
                    );
                }
            }
            Effect::Opaque(dir) => {
                // Below the directory, only what the layer made is left, unless a later
                // entry changed the directory or a parent of it.
                if later.iter().any(|l| dir.starts_with(path_of(l))) {
                    continue;
                }
                for p in result.keys().filter(|p| *p != dir && p.starts_with(dir)) {
                    assert!(
                        made(p),
                        "{} is below the opaque directory {} but the layer did not make it",
                        p.display(),
                        dir.display()
                    );
                }
            }
            Effect::Make(_) => {}
        }
    }
    // What no entry named, directly, through a parent or through a child, is as it was.
    for (p, n) in lower {
        let touched = effects
            .iter()
            .map(path_of)
            .any(|q| q.starts_with(p) || p.starts_with(&q));
        if touched || n.kind == 'd' {
            continue;
        }
        // A hard link may share the file: its node is unchanged but for the link count.
        assert_eq!(
            result.get(p),
            Some(n),
            "{} was not named by the layer but changed",
            p.display()
        );
    }
}
