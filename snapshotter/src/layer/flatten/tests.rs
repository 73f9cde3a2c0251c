#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{lchown, symlink, MetadataExt, PermissionsExt};

use sha2::{Digest as _, Sha256};

use super::*;
use crate::mount::{mount_all, unmount};
use crate::types::Mount;
use rustix::fs::{Timespec, Timestamps, XattrFlags};

const OPAQUE: &str = "trusted.overlay.opaque";
const REDIRECT: &str = "trusted.overlay.redirect";
const METACOPY: &str = "trusted.overlay.metacopy";

/// Whether this process may mount overlays and write trusted xattrs (root); with
/// `STRATA_REQUIRE_PRIVILEGED=1` a test that cannot fails instead.
fn privileged() -> bool {
    crate::mount::tests::can_mount()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, XattrFlags::empty()).unwrap();
}

fn whiteout(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        FileType::CharacterDevice,
        Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
}

fn set_mtime(p: &Path, sec: i64) {
    let t = Timespec {
        tv_sec: sec as _,
        tv_nsec: 123_456_789,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// Everything a reader of the tree sees, by path: type, mode, owner, size, times, content,
/// link target, device number, xattrs (not overlayfs' own), and which names share an inode.
fn describe(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            };
            out.push(r.clone());
            if fs::symlink_metadata(root.join(&r)).unwrap().is_dir() {
                walk(root, &r, out);
            }
        }
    }
    let mut paths = vec![String::new()];
    walk(root, "", &mut paths);
    let mut first_of_inode: HashMap<u64, String> = HashMap::new();
    let mut out = BTreeMap::new();
    for rel in paths {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let mut d = format!(
            "mode={:o} uid={} gid={} mtime={}.{:09}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec()
        );
        if !ft.is_dir() {
            d += &format!(" size={} rdev={:x}", m.size(), m.rdev());
            let first = first_of_inode.entry(m.ino()).or_insert_with(|| rel.clone());
            if *first != rel {
                d += &format!(" linked-to={first}");
            }
        }
        if ft.is_file() {
            d += &format!(" sha={:x}", Sha256::digest(fs::read(&p).unwrap()));
        }
        if ft.is_symlink() {
            d += &format!(" -> {:?}", fs::read_link(&p).unwrap());
        }
        let mut names = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(&p, &mut names[..]).unwrap();
        let mut xattrs = Vec::new();
        for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if name.starts_with(b"trusted.overlay.") || name == b"security.selinux" {
                continue;
            }
            let mut v = vec![0u8; 4096];
            let len = rustix::fs::lgetxattr(&p, OsStr::from_bytes(name), &mut v[..]).unwrap();
            xattrs.push(format!(
                "{}={}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(&v[..len])
            ));
        }
        xattrs.sort();
        d += &format!(" xattrs={xattrs:?}");
        out.insert(rel, d);
    }
    out
}

/// Five layers, bottom first, that use every rule of the merge.
fn make_layers(base: &Path) -> Vec<PathBuf> {
    let l: Vec<PathBuf> = (0..5).map(|i| base.join(format!("l{i}"))).collect();
    for d in &l {
        fs::create_dir_all(d).unwrap();
    }
    // l0: a tree with owners, modes, xattrs, a device, a fifo, links.
    fs::create_dir_all(l[0].join("etc/conf.d")).unwrap();
    fs::write(l[0].join("etc/passwd"), "root:x:0:0").unwrap();
    fs::write(l[0].join("etc/conf.d/a"), "a0").unwrap();
    fs::write(l[0].join("etc/gone"), "deleted later").unwrap();
    fs::create_dir_all(l[0].join("var/cache/deep")).unwrap();
    fs::write(l[0].join("var/cache/deep/x"), "hidden by opaque").unwrap();
    fs::write(l[0].join("var/keep"), "kept").unwrap();
    fs::write(l[0].join("hl-a"), "linked").unwrap();
    fs::hard_link(l[0].join("hl-a"), l[0].join("hl-b")).unwrap();
    symlink("/etc/passwd", l[0].join("abs-link")).unwrap();
    symlink("nowhere", l[0].join("dangling")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        l[0].join("null"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        l[0].join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fs::create_dir(l[0].join("owned")).unwrap();
    fs::write(l[0].join("owned/f"), "f").unwrap();
    lchown(l[0].join("owned"), Some(1000), Some(1001)).unwrap();
    lchown(l[0].join("owned/f"), Some(1002), Some(1003)).unwrap();
    fs::set_permissions(l[0].join("owned"), fs::Permissions::from_mode(0o2750)).unwrap();
    set_xattr(&l[0].join("etc/passwd"), "user.note", b"zero");
    set_xattr(&l[0].join("etc"), "user.dir", b"zero");
    set_xattr(
        &l[0].join("owned/f"),
        "security.capability",
        &[1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    // l1: overwrite, delete, a file replaced by a directory, an opaque directory.
    fs::create_dir_all(l[1].join("etc")).unwrap();
    fs::write(l[1].join("etc/passwd"), "root:x:0:0\nuser:x:1000").unwrap();
    whiteout(&l[1].join("etc/gone"));
    fs::create_dir(l[1].join("var")).unwrap();
    fs::create_dir(l[1].join("var/cache")).unwrap();
    set_xattr(&l[1].join("var/cache"), "trusted.overlay.opaque", b"y");
    fs::write(l[1].join("var/cache/new"), "after opaque").unwrap();
    fs::create_dir(l[1].join("fifo-now-dir")).unwrap();
    fs::write(l[1].join("fifo-now-dir/in"), "in").unwrap();
    set_xattr(&l[1].join("etc"), "user.dir", b"one");
    set_mtime(&l[1].join("etc"), 1_600_000_000);
    // l2: a whole directory deleted, then (l3) made again: its old content must stay hidden.
    whiteout(&l[2].join("owned"));
    fs::write(l[2].join("only-in-2"), "2").unwrap();
    // l3: owned/ made again, opaque over the whiteout (what the kernel's mkdir does).
    fs::create_dir(l[3].join("owned")).unwrap();
    set_xattr(&l[3].join("owned"), "trusted.overlay.opaque", b"y");
    fs::write(l[3].join("owned/new"), "new").unwrap();
    fs::create_dir(l[3].join("etc")).unwrap();
    fs::write(l[3].join("etc/conf.d"), "a file over a directory").unwrap();
    // l4: a directory replaced by a file at the top, a whiteout of a name nothing below has.
    fs::write(l[4].join("var"), "var is a file now").unwrap();
    whiteout(&l[4].join("never-there"));
    fs::write(l[4].join("hl-c"), "top links").unwrap();
    fs::hard_link(l[4].join("hl-c"), l[4].join("hl-d")).unwrap();
    set_mtime(&l[4], 1_700_000_000);
    lchown(&l[4], Some(7), Some(8)).unwrap();
    l.into_iter().rev().collect()
}

fn overlay_of(lowers: &[PathBuf]) -> Mount {
    let dirs: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    Mount {
        fs_type: "overlay".into(),
        source: "overlay".into(),
        options: vec!["index=off".into(), format!("lowerdir={}", dirs.join(":"))],
    }
}

fn mounted(lowers: &[PathBuf], target: &Path) -> BTreeMap<String, String> {
    fs::create_dir_all(target).unwrap();
    mount_all(&[overlay_of(lowers)], target).unwrap();
    let d = describe(target);
    unmount(target).unwrap();
    d
}

#[test]
fn a_flattened_stack_is_what_the_overlay_shows() {
    if !privileged() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layers = make_layers(&tmp.path().join("layers"));
    let expect = mounted(&layers, &tmp.path().join("mnt"));
    // The fixture exercises what it claims to.
    assert!(!expect.contains_key("etc/gone"), "{expect:#?}");
    assert!(
        !expect.contains_key("var/cache/new"),
        "var is a file at the top"
    );
    assert!(!expect.contains_key("owned/f"));
    assert!(expect.contains_key("owned/new"));
    assert!(expect["hl-b"].contains("linked-to=hl-a"));

    let flat = tmp.path().join("flat");
    fs::create_dir(&flat).unwrap();
    let stats = flatten(&layers, &flat).unwrap();
    assert_eq!(describe(&flat), expect);
    assert_eq!(stats.copies, 0);
    // etc, owned, fifo-now-dir (var and etc/conf.d are files at the top).
    assert_eq!(stats.dirs, 3, "{stats:?}");
    assert!(stats.links > 10, "{stats:?}");

    // Hard links, not copies: the flattened passwd is l1's inode.
    let ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
    assert_eq!(
        ino(&flat.join("etc/passwd")),
        ino(&layers[3].join("etc/passwd"))
    );
    // No overlayfs marker is left in the flattened tree.
    let mut buf = [0u8; 8];
    assert!(rustix::fs::lgetxattr(flat.join("owned"), OPAQUE, &mut buf[..]).is_err());

    // As the bottom of a stack: layers on top of a flattened prefix show what the whole
    // stack shows (the top layer's var file, whiteouts over the flattened tree).
    let flat_low = tmp.path().join("flat-low");
    fs::create_dir(&flat_low).unwrap();
    flatten(&layers[2..], &flat_low).unwrap();
    let mut stacked = layers[..2].to_vec();
    stacked.push(flat_low.clone());
    assert_eq!(mounted(&stacked, &tmp.path().join("mnt2")), expect);

    // And a flattened directory flattens again (the next one is built from the last).
    let flat_again = tmp.path().join("flat-again");
    fs::create_dir(&flat_again).unwrap();
    flatten(&stacked, &flat_again).unwrap();
    assert_eq!(describe(&flat_again), expect);
}

#[test]
fn an_opaque_root_hides_every_layer_below_it() {
    if !privileged() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let low = tmp.path().join("low");
    let top = tmp.path().join("top");
    fs::create_dir_all(low.join("d")).unwrap();
    fs::write(low.join("d/old"), "old").unwrap();
    fs::create_dir_all(top.join("d")).unwrap();
    set_xattr(&top.join("d"), OPAQUE, b"y");
    fs::write(top.join("d/new"), "new").unwrap();
    let flat = tmp.path().join("flat");
    fs::create_dir(&flat).unwrap();
    flatten(&[top.clone(), low.clone()], &flat).unwrap();
    assert!(flat.join("d/new").exists());
    assert!(!flat.join("d/old").exists());
    assert_eq!(
        describe(&flat),
        mounted(&[top, low], &tmp.path().join("mnt"))
    );
}

#[test]
fn features_it_cannot_reproduce_are_refused_by_path() {
    if !privileged() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("l");
    fs::create_dir_all(layer.join("moved")).unwrap();
    set_xattr(&layer.join("moved"), REDIRECT, b"/orig");
    let flat = tmp.path().join("flat");
    fs::create_dir(&flat).unwrap();
    let e = flatten(std::slice::from_ref(&layer), &flat)
        .unwrap_err()
        .to_string();
    assert!(e.contains("moved") && e.contains("redirect"), "{e}");

    let layer = tmp.path().join("m");
    fs::create_dir_all(&layer).unwrap();
    fs::write(layer.join("meta"), "").unwrap();
    set_xattr(&layer.join("meta"), METACOPY, b"");
    let flat = tmp.path().join("flat2");
    fs::create_dir(&flat).unwrap();
    let e = flatten(&[layer], &flat).unwrap_err().to_string();
    assert!(e.contains("meta") && e.contains("metacopy"), "{e}");
}

#[test]
fn hundreds_of_layers_merge_at_once() {
    if !privileged() {
        return;
    }
    // More layers than a process has descriptors by default: the walk holds one at a time.
    let tmp = tempfile::tempdir().unwrap();
    let n = 1200;
    let mut layers = Vec::new();
    for i in 0..n {
        let l = tmp.path().join(format!("l{i}"));
        fs::create_dir_all(l.join("d")).unwrap();
        fs::write(l.join("d/top"), i.to_string()).unwrap();
        fs::write(l.join(format!("d/f{i}")), "x").unwrap();
        if i > 0 {
            whiteout(&l.join(format!("d/f{}", i - 1)));
        }
        layers.push(l);
    }
    layers.reverse();
    let flat = tmp.path().join("flat");
    fs::create_dir(&flat).unwrap();
    flatten(&layers, &flat).unwrap();
    let names: Vec<String> = fs::read_dir(flat.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(
        fs::read_to_string(flat.join("d/top")).unwrap(),
        (n - 1).to_string()
    );
    assert!(flat.join(format!("d/f{}", n - 1)).exists());
}
