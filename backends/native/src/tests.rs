#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags, CWD};

use super::*;

/// Whether the test may run: true as root. Otherwise it is skipped, unless
/// `STRATA_REQUIRE_PRIVILEGED=1` asks for it to fail.
fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("this test needs root (chown, mknod, trusted.* xattrs) and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
    }
    eprintln!("SKIPPED: needs root (set STRATA_REQUIRE_PRIVILEGED=1 to make this a failure)");
    false
}

const SPARSE_LEN: u64 = 16 << 20;

fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut buf = vec![0u8; 1 << 16];
    let n = rustix::fs::llistxattr(p, &mut buf[..]).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|name| {
            let mut v = vec![0u8; 1 << 16];
            let len = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut v[..]).unwrap();
            v.truncate(len);
            (String::from_utf8_lossy(name).into_owned(), v)
        })
        .collect();
    out.sort();
    out
}

/// Every property the copy must keep, by relative path: the lstat fields (except inode
/// numbers, change times and block counts), xattrs, link targets, contents, and the hardlink
/// sets. All entries are lstat-ed before anything is read, since reading a file or a symlink
/// may update its access time (relatime).
fn describe(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, p: &Path, out: &mut Vec<(PathBuf, String, fs::Metadata)>) {
        let m = fs::symlink_metadata(p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let is_dir = m.is_dir();
        out.push((p.to_path_buf(), rel, m));
        if is_dir {
            // Sorted, and read with O_NOATIME.
            for name in crate::copy::list_dir(p).unwrap() {
                walk(root, &p.join(name), out);
            }
        }
    }
    let mut entries = Vec::new();
    walk(root, root, &mut entries);
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, rel, m) in &entries {
        let mut d = format!(
            "mode={:o} uid={} gid={} rdev={} nlink={} size={} atime={}.{} mtime={}.{} ",
            m.mode(),
            m.uid(),
            m.gid(),
            m.rdev(),
            if m.is_dir() { 0 } else { m.nlink() },
            if m.is_dir() { 0 } else { m.size() },
            m.atime(),
            m.atime_nsec(),
            m.mtime(),
            m.mtime_nsec()
        );
        if !m.is_dir() && m.nlink() > 1 {
            inodes.entry(m.ino()).or_default().push(rel.clone());
        }
        for (name, value) in xattrs(p) {
            d += &format!("{name}={value:?} ");
        }
        out.insert(rel.clone(), d);
    }
    // Contents last.
    for (p, rel, m) in &entries {
        let d = out.get_mut(rel).unwrap();
        if m.file_type().is_symlink() {
            *d += &format!("target={:?} ", fs::read_link(p).unwrap());
        } else if m.is_file() {
            // O_NOATIME: reading must not change what the next description sees.
            let mut content = Vec::new();
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(OFlags::NOATIME.bits() as i32)
                .open(p)
                .unwrap()
                .read_to_end(&mut content)
                .unwrap();
            // A digest-like summary keeps the map printable for the big sparse file.
            let sum: u64 = content
                .iter()
                .enumerate()
                .map(|(i, b)| (i as u64 + 1) * u64::from(*b))
                .sum();
            *d += &format!("len={} sum={sum} ", content.len());
            if content.len() < 256 {
                *d += &format!("content={content:?} ");
            }
        }
    }
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

fn ts(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    }
}

fn set_times(p: &Path, atime: Timespec, mtime: Timespec) {
    let t = Timestamps {
        last_access: atime,
        last_modification: mtime,
    };
    rustix::fs::utimensat(CWD, p, &t, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    rustix::fs::chownat(
        CWD,
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn mknod(p: &Path, kind: FileType, mode: u32, major: u32, minor: u32) {
    rustix::fs::mknodat(
        CWD,
        p,
        kind,
        Mode::from_raw_mode(mode),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
    // mknod applies the umask.
    chmod(p, mode);
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, XattrFlags::empty()).unwrap();
}

/// A tree with every file type and attribute the copy must keep.
fn build_tree(src: &Path) {
    fs::create_dir(src).unwrap();

    // setuid file owned by 1234:5678, with a file capability (chown and writes clear both).
    let suid = src.join("suid");
    fs::write(&suid, b"setuid binary").unwrap();
    chown(&suid, 1234, 5678);
    chmod(&suid, 0o4755);
    setxattr(
        &suid,
        "security.capability",
        &[
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    // setgid file and a file nobody may read.
    fs::write(src.join("sgid"), b"g").unwrap();
    chown(&src.join("sgid"), 0, 42);
    chmod(&src.join("sgid"), 0o2711);
    fs::write(src.join("secret"), b"hidden").unwrap();
    chmod(&src.join("secret"), 0o000);
    fs::write(src.join("empty"), b"").unwrap();

    // Sticky directory, setgid directory owned by someone else.
    fs::create_dir(src.join("tmp")).unwrap();
    chmod(&src.join("tmp"), 0o1777);
    fs::create_dir(src.join("shared")).unwrap();
    chown(&src.join("shared"), 1000, 1000);
    chmod(&src.join("shared"), 0o2775);

    // Nested directories, the middle one read-only with content.
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::write(src.join("a/b/c/deep"), vec![7u8; 100_000]).unwrap();
    chmod(&src.join("a/b"), 0o555);

    // Symlinks, dangling and not, one with a trusted xattr.
    std::os::unix::fs::symlink("a/b/c/deep", src.join("link")).unwrap();
    std::os::unix::fs::symlink("/does/not/exist", src.join("dangling")).unwrap();
    setxattr(&src.join("link"), "trusted.note", b"on a symlink");

    // A hardlink set of three names across directories, a hardlinked symlink and fifo.
    fs::write(src.join("a/hard1"), b"shared").unwrap();
    fs::hard_link(src.join("a/hard1"), src.join("a/b/hard2")).unwrap();
    fs::hard_link(src.join("a/hard1"), src.join("hard3")).unwrap();
    fs::hard_link(src.join("dangling"), src.join("dangling2")).unwrap();

    // Special files: fifo, /dev/null-like char device, whiteout, block device, socket.
    mknod(&src.join("fifo"), FileType::Fifo, 0o640, 0, 0);
    fs::hard_link(src.join("fifo"), src.join("a/fifo2")).unwrap();
    mknod(&src.join("null"), FileType::CharacterDevice, 0o666, 1, 3);
    mknod(
        &src.join("whiteout"),
        FileType::CharacterDevice,
        0o000,
        0,
        0,
    );
    chown(&src.join("whiteout"), 7, 8);
    mknod(&src.join("loop9"), FileType::BlockDevice, 0o660, 7, 9);
    mknod(&src.join("sock"), FileType::Socket, 0o755, 0, 0);

    // xattrs: overlayfs's opaque marker and a user attribute on a directory, a big value.
    setxattr(&src.join("a"), "trusted.overlay.opaque", b"y");
    setxattr(&src.join("a"), "user.foo", b"bar");
    setxattr(&src.join("a/hard1"), "user.note", b"hello");
    setxattr(&src.join("empty"), "user.big", &vec![0xabu8; 3000]);
    setxattr(&src.join("whiteout"), "trusted.overlay.whiteout", b"");

    // A sparse file: 16 MiB with two small data extents, one at the very end.
    let sparse = fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(SPARSE_LEN).unwrap();
    sparse.write_all_at(b"middle", 5 << 20).unwrap();
    sparse.write_all_at(b"end", SPARSE_LEN - 3).unwrap();
    drop(sparse);
    // A file that ends in a hole.
    let tail = fs::File::create(src.join("tail-hole")).unwrap();
    tail.write_all_at(b"head", 0).unwrap();
    tail.set_len(8 << 20).unwrap();
    drop(tail);

    // Nanosecond times, atime before mtime (so that relatime would update it on a read),
    // on files, symlinks, special files and directories, set last.
    let (old, new) = (
        ts(1_000_000_000, 123_456_789),
        ts(1_000_000_001, 987_654_321),
    );
    for p in [
        "a/b/c/deep",
        "dangling",
        "link",
        "fifo",
        "whiteout",
        "sparse",
        "secret",
        "a/b/c",
        "a/b",
        "a",
        "",
    ] {
        set_times(&src.join(p), old, new);
    }
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
    let before = describe(&src);
    copy_tree(&src, &dst).unwrap();
    let (a, b) = (describe(&src), describe(&dst));
    // The copy does not disturb the source, access times included, except symlinks' (there is
    // no O_NOATIME for readlink; the copy gets the times the source has after it).
    for (path, want) in &before {
        if !fs::symlink_metadata(src.join(path)).is_ok_and(|m| m.is_symlink()) {
            assert_eq!(&a[path], want, "the copy changed the source's {path:?}");
        }
    }
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the copy has other names"
    );
    for (path, want) in &a {
        assert_eq!(&b[path], want, "{path:?} differs");
    }

    // The description really covers what it claims.
    let has = |path: &str, what: &str| {
        let d = &before[path];
        assert!(d.contains(what), "{path}: {d:?} lacks {what:?}");
    };
    has("suid", "mode=104755");
    has("suid", "uid=1234 gid=5678");
    has("suid", "security.capability=");
    has("sgid", "mode=102711");
    has("secret", "mode=100000");
    has("tmp", "mode=41777");
    has("shared", "mode=42775");
    has("shared", "uid=1000 gid=1000");
    has("a", "trusted.overlay.opaque=[121]");
    has("a", "user.foo=[98, 97, 114]");
    has("a/b", "mode=40555");
    has("link", "trusted.note=");
    has("link", "target=\"a/b/c/deep\"");
    has("dangling", "target=\"/does/not/exist\"");
    has(
        "dangling",
        "atime=1000000000.123456789 mtime=1000000001.987654321",
    );
    has(
        "a/b/c/deep",
        "atime=1000000000.123456789 mtime=1000000001.987654321",
    );
    has("a", "mtime=1000000001.987654321");
    has("", "mtime=1000000001.987654321");
    has("fifo", "mode=10640");
    has(
        "null",
        &format!("mode=20666 uid=0 gid=0 rdev={}", rustix::fs::makedev(1, 3)),
    );
    has("whiteout", "mode=20000 uid=7 gid=8 rdev=0 ");
    has("whiteout", "trusted.overlay.whiteout=[]");
    has(
        "loop9",
        &format!("mode=60660 uid=0 gid=0 rdev={}", rustix::fs::makedev(7, 9)),
    );
    has("sock", "mode=140755");
    has("sparse", &format!("size={SPARSE_LEN}"));
    assert_eq!(
        a["<hardlink sets>"],
        r#"[["a/b/hard2", "a/hard1", "hard3"], ["a/fifo2", "fifo"], ["dangling", "dangling2"]]"#
    );

    // Holes stay holes: the copy allocates about as little as the source.
    for name in ["sparse", "tail-hole"] {
        let (s, d) = (
            fs::metadata(src.join(name)).unwrap(),
            fs::metadata(dst.join(name)).unwrap(),
        );
        assert!(
            d.blocks() <= s.blocks() + 64,
            "{name}: the copy allocates {} blocks, the source {}",
            d.blocks(),
            s.blocks()
        );
        assert!(
            d.blocks() * 512 < d.size() / 8,
            "{name} was not copied sparse"
        );
    }
    let sparse = fs::read(dst.join("sparse")).unwrap();
    assert_eq!(&sparse[5 << 20..(5 << 20) + 6], b"middle");
    assert!(sparse[..5 << 20].iter().all(|b| *b == 0));

    // Copies are independent inodes: writing the copy leaves the source alone.
    fs::write(dst.join("a/hard1"), b"changed").unwrap();
    assert_eq!(fs::read(dst.join("hard3")).unwrap(), b"changed");
    assert_eq!(fs::read(src.join("hard3")).unwrap(), b"shared");
}

#[test]
fn copy_tree_handles_deep_and_wide_trees() {
    // Needs no privilege: everything belongs to the caller.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut p = src.clone();
    for i in 0..300 {
        p.push(format!("d{}", i % 10));
    }
    fs::create_dir_all(&p).unwrap();
    fs::write(p.join("leaf"), b"leaf").unwrap();
    for i in 0..2000 {
        fs::write(src.join(format!("f{i}")), i.to_string()).unwrap();
    }
    let dst = tmp.path().join("dst");
    copy_tree(&src, &dst).unwrap();
    assert_eq!(describe(&src), describe(&dst));
}

#[test]
fn copy_tree_refuses_an_existing_destination_and_a_file_source() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("src")).unwrap();
    fs::create_dir(tmp.path().join("dst")).unwrap();
    let e = copy_tree(&tmp.path().join("src"), &tmp.path().join("dst")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    let msg = e.to_string();
    assert!(
        msg.contains("src") && msg.contains("create the directory copy"),
        "{msg}"
    );

    fs::write(tmp.path().join("file"), b"x").unwrap();
    let e = copy_tree(&tmp.path().join("file"), &tmp.path().join("dst2")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("not a directory"), "{e}");
    assert!(!tmp.path().join("dst2").exists());

    // A symlink to a directory is not followed either.
    std::os::unix::fs::symlink("src", tmp.path().join("link")).unwrap();
    let e = copy_tree(&tmp.path().join("link"), &tmp.path().join("dst3")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);

    let e = copy_tree(&tmp.path().join("missing"), &tmp.path().join("dst4")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(e.to_string().contains("missing"), "{e}");
}

fn sorted_ids(b: &NativeBackend) -> Vec<u64> {
    let mut ids = b.ids().unwrap();
    ids.sort_unstable();
    ids
}

#[test]
fn backend_creates_copies_lists_and_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let b = NativeBackend::open(tmp.path()).unwrap();
    assert!(tmp.path().join("snapshots").is_dir());
    assert_eq!(b.name(), "native");
    assert!(sorted_ids(&b).is_empty());
    let durable = CreateOptions {
        durable: true,
        ..CreateOptions::default()
    };

    b.create(1, Kind::Active, &[], &durable).unwrap();
    assert_eq!(b.layer_path(1), Some(b.fs_path(1)));
    assert_eq!(
        b.mounts(1, Kind::Active, &[]).unwrap(),
        vec![Mount::bind(&b.fs_path(1), false)]
    );
    fs::write(b.fs_path(1).join("f"), b"one").unwrap();
    fs::create_dir(b.fs_path(1).join("d")).unwrap();
    fs::write(b.fs_path(1).join("d/g"), vec![1u8; 10_000]).unwrap();
    fs::hard_link(b.fs_path(1).join("d/g"), b.fs_path(1).join("g2")).unwrap();
    let usage = b.commit(1, &[], true).unwrap();
    // The root, f, d and g (twice linked, counted once).
    assert_eq!(usage.inodes, 4);
    assert!(usage.size >= 10_000, "{usage:?}");
    assert_eq!(b.usage(1).unwrap(), usage);

    // A view is a full copy, hardlinks included.
    b.create(2, Kind::View, &[1], &CreateOptions::default())
        .unwrap();
    assert_eq!(fs::read(b.fs_path(2).join("f")).unwrap(), b"one");
    assert_eq!(
        fs::metadata(b.fs_path(2).join("g2")).unwrap().ino(),
        fs::metadata(b.fs_path(2).join("d/g")).unwrap().ino()
    );
    assert_ne!(
        fs::metadata(b.fs_path(2).join("f")).unwrap().ino(),
        fs::metadata(b.fs_path(1).join("f")).unwrap().ino()
    );
    assert_eq!(b.usage(2).unwrap().inodes, usage.inodes);
    assert_eq!(
        b.mounts(2, Kind::View, &[1]).unwrap(),
        vec![Mount::bind(&b.fs_path(2), true)]
    );
    assert_eq!(
        b.mounts(1, Kind::Committed, &[]).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    // A read-only view of a committed chain is its top's tree.
    assert_eq!(
        b.view_mounts(&[1]).unwrap(),
        vec![Mount::bind(&b.fs_path(1), true)]
    );
    assert_eq!(
        b.view_mounts(&[]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // A child of a chain copies only its immediate parent, which holds the whole tree.
    fs::write(b.fs_path(2).join("only-in-2"), b"x").unwrap();
    b.create(3, Kind::Active, &[1], &durable).unwrap();
    assert!(!b.fs_path(3).join("only-in-2").exists());
    assert!(b.fs_path(3).join("d/g").exists());

    assert_eq!(sorted_ids(&b), vec![1, 2, 3]);
    assert!(b.exists(3).unwrap() && !b.exists(4).unwrap());

    // Remove is idempotent.
    b.remove(3).unwrap();
    b.remove(3).unwrap();
    b.remove(99).unwrap();
    assert_eq!(sorted_ids(&b), vec![1, 2]);
    assert!(!b.exists(3).unwrap());
}

#[test]
fn backend_never_lists_partial_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let b = NativeBackend::open(tmp.path()).unwrap();
    let snapshots = tmp.path().join("snapshots");
    b.create(1, Kind::Active, &[], &CreateOptions::default())
        .unwrap();

    // A crashed create's temporary directory and stray entries are never listed.
    fs::create_dir_all(snapshots.join(".tmp-3/fs/sub")).unwrap();
    fs::write(snapshots.join(".tmp-3/fs/sub/file"), b"partial").unwrap();
    fs::create_dir(snapshots.join("lost+found")).unwrap();
    fs::write(snapshots.join("12x"), b"").unwrap();
    assert_eq!(sorted_ids(&b), vec![1]);
    // remove clears the leftover...
    b.remove(3).unwrap();
    assert!(!snapshots.join(".tmp-3").exists());
    // ...and so does a new create of the same id.
    fs::create_dir_all(snapshots.join(".tmp-4/fs")).unwrap();
    fs::write(snapshots.join(".tmp-4/fs/stale"), b"stale").unwrap();
    b.create(4, Kind::Active, &[1], &CreateOptions::default())
        .unwrap();
    assert!(!b.fs_path(4).join("stale").exists());
    assert!(!snapshots.join(".tmp-4").exists());

    // A failed create (its parent is gone) leaves nothing behind and says what failed.
    let e = b
        .create(5, Kind::Active, &[77], &CreateOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal);
    let msg = e.to_string();
    assert!(
        msg.contains("77") && msg.contains("copy the parent's tree"),
        "{msg}"
    );
    assert!(!snapshots.join(".tmp-5").exists());
    assert!(!snapshots.join("5").exists());
    assert_eq!(sorted_ids(&b), vec![1, 4]);

    // Remove never follows a symlink out of the store.
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("keep"), b"keep").unwrap();
    std::os::unix::fs::symlink(&outside, b.fs_path(4).join("escape")).unwrap();
    std::os::unix::fs::symlink(&outside, snapshots.join(".tmp-6")).unwrap();
    b.remove(4).unwrap();
    b.remove(6).unwrap();
    assert!(outside.join("keep").exists());
    assert!(!snapshots.join(".tmp-6").exists());
    assert_eq!(sorted_ids(&b), vec![1]);
}

#[test]
fn backend_root_mode_ignores_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let b = NativeBackend::open(tmp.path()).unwrap();
    // The umask is per process: keep the window short, and only directory modes are checked.
    for (id, mask) in [(1, 0o000), (2, 0o077), (3, 0o022)] {
        let old = rustix::process::umask(Mode::from_raw_mode(mask));
        let r = b.create(id, Kind::Active, &[], &CreateOptions::default());
        rustix::process::umask(old);
        r.unwrap();
        let mode = fs::metadata(b.fs_path(id)).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "umask {mask:o}");
        let mode = fs::metadata(b.dir(id)).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700, "umask {mask:o}");
    }
}

#[test]
fn backend_usage_counts_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let b = NativeBackend::open(tmp.path()).unwrap();
    b.create(1, Kind::Active, &[], &CreateOptions::default())
        .unwrap();
    let empty = b.usage(1).unwrap();
    assert_eq!(empty.inodes, 1);
    let fs_dir = b.fs_path(1);
    fs::write(fs_dir.join("big"), vec![9u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink("big", fs_dir.join("sym")).unwrap();
    let u = b.usage(1).unwrap();
    assert_eq!(u.inodes, 3);
    assert!(u.size >= empty.size + (1 << 20), "{u:?}");
    assert_eq!(b.commit(1, &[], false).unwrap(), u);
    let e = b.usage(42).unwrap_err();
    assert!(e.to_string().contains("42"), "{e}");
}
