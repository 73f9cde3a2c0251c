#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{FileType, Mode, CWD};

use super::*;

fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("this test needs root (chown, mknod, trusted.* xattrs) and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
    }
    eprintln!("SKIPPED: needs root");
    false
}

/// Every lstat field the copy must keep, plus link target, content and xattrs.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    fn walk(
        root: &Path,
        p: &Path,
        out: &mut BTreeMap<String, String>,
        inodes: &mut BTreeMap<u64, Vec<String>>,
    ) {
        let m = fs::symlink_metadata(p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let mut d = format!(
            "mode={:o} uid={} gid={} rdev={} size={} mtime={}.{} ",
            m.mode(),
            m.uid(),
            m.gid(),
            m.rdev(),
            if m.is_dir() { 0 } else { m.size() },
            m.mtime(),
            m.mtime_nsec()
        );
        if m.file_type().is_symlink() {
            d += &format!("target={:?} ", fs::read_link(p).unwrap());
        } else if m.is_file() {
            d += &format!("content={:?} ", fs::read(p).unwrap());
        }
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(p, &mut buf[..]).unwrap_or(0);
        let mut names: Vec<&[u8]> = buf[..n]
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .collect();
        names.sort();
        for name in names {
            let mut v = vec![0u8; 4096];
            let len = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut v[..]).unwrap();
            d += &format!("{}={:?} ", String::from_utf8_lossy(name), &v[..len]);
        }
        if !m.is_dir() && m.nlink() > 1 {
            inodes.entry(m.ino()).or_default().push(rel.clone());
        }
        out.insert(rel, d);
        if m.is_dir() {
            for e in fs::read_dir(p).unwrap() {
                walk(root, &e.unwrap().path(), out, inodes);
            }
        }
    }
    use std::os::unix::ffi::OsStrExt;
    walk(root, root, &mut out, &mut inodes);
    let mut sets: Vec<Vec<String>> = inodes
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    sets.sort();
    out.insert("<hardlink sets>".into(), format!("{sets:?}"));
    out
}

fn build_tree(src: &Path) {
    fs::create_dir(src).unwrap();
    fs::write(src.join("suid"), b"setuid binary").unwrap();
    rustix::fs::chownat(
        CWD,
        src.join("suid"),
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(5678)),
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    fs::set_permissions(src.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(src.join("tmp")).unwrap();
    fs::set_permissions(src.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::write(src.join("a/b/c/deep"), vec![7u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("a/b/c/deep", src.join("link")).unwrap();
    std::os::unix::fs::symlink("/does/not/exist", src.join("dangling")).unwrap();
    fs::write(src.join("a/hard1"), b"shared").unwrap();
    fs::hard_link(src.join("a/hard1"), src.join("a/b/hard2")).unwrap();
    fs::hard_link(src.join("a/hard1"), src.join("hard3")).unwrap();
    rustix::fs::mknodat(
        CWD,
        src.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    rustix::fs::mknodat(
        CWD,
        src.join("null"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    rustix::fs::mknodat(
        CWD,
        src.join("whiteout"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o000),
        0,
    )
    .unwrap();
    rustix::fs::lsetxattr(
        src.join("a"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        src.join("a/hard1"),
        "user.note",
        b"hello",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        src.join("suid"),
        "security.capability",
        &[
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 1_000_000_001,
            tv_nsec: 987_654_321,
        },
    };
    rustix::fs::utimensat(
        CWD,
        src.join("a/b/c/deep"),
        &t,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    rustix::fs::utimensat(
        CWD,
        src.join("dangling"),
        &t,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
    rustix::fs::utimensat(CWD, src.join("a/b"), &t, rustix::fs::AtFlags::empty()).unwrap();
}

#[test]
fn copy_tree_keeps_everything() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    build_tree(&src);
    copy_tree(&src, &dst).unwrap();
    let (a, b) = (describe(&src), describe(&dst));
    assert_eq!(a.len(), b.len());
    for (path, want) in &a {
        assert_eq!(b.get(path), Some(want), "{path}");
    }
    // The description really covers what it claims.
    assert!(a["suid"].contains("mode=104755") && a["suid"].contains("uid=1234"));
    assert!(a["a"].contains("trusted.overlay.opaque"));
    assert!(
        a["whiteout"].contains("rdev=0")
            && a["null"].contains(&format!("rdev={}", rustix::fs::makedev(1, 3)))
    );
    assert!(a["<hardlink sets>"].contains("hard3"));
    assert!(a["dangling"].contains("mtime=1000000001.987654321"));
}

#[test]
fn copy_tree_refuses_an_existing_destination_and_a_file_source() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("src")).unwrap();
    fs::create_dir(tmp.path().join("dst")).unwrap();
    let e = copy_tree(&tmp.path().join("src"), &tmp.path().join("dst")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    fs::write(tmp.path().join("file"), b"x").unwrap();
    let e = copy_tree(&tmp.path().join("file"), &tmp.path().join("dst2")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn backend_creates_copies_lists_and_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let b = NativeBackend::open(tmp.path()).unwrap();
    let opts = CreateOptions {
        durable: true,
        ..CreateOptions::default()
    };
    let old = rustix::process::umask(Mode::empty());
    b.create(1, Kind::Active, &[], &opts).unwrap();
    rustix::process::umask(old);
    let root_mode = fs::metadata(b.fs_path(1)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(root_mode, 0o755);
    fs::write(b.fs_path(1).join("f"), b"one").unwrap();
    let usage = b.commit(1, &[], true).unwrap();
    assert_eq!(usage.inodes, 2);
    assert!(usage.size > 0);

    b.create(2, Kind::View, &[1], &opts).unwrap();
    assert_eq!(fs::read(b.fs_path(2).join("f")).unwrap(), b"one");
    assert_eq!(
        b.mounts(2, Kind::View, &[1]).unwrap(),
        vec![Mount::bind(&b.fs_path(2), true)]
    );
    assert_eq!(
        b.mounts(1, Kind::Committed, &[]).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );

    // A crashed create's temporary directory is never listed, and remove clears it.
    fs::create_dir_all(tmp.path().join("snapshots/.tmp-3/fs")).unwrap();
    let mut ids = b.ids().unwrap();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
    b.remove(3).unwrap();
    assert!(!tmp.path().join("snapshots/.tmp-3").exists());
    b.remove(2).unwrap();
    b.remove(2).unwrap();
    assert_eq!(b.ids().unwrap(), vec![1]);
}
