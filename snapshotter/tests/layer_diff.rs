//! The layer writer: what goes in, in which order, with which headers; determinism;
//! compression; and other tools reading the result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use strata::layer::diff::{write_layer, DiffOptions};
use strata::layer::{Compression, Digest, EMPTY_LAYER_DIFF_ID};

fn set_time(p: &Path, secs: i64, nsec: i64) {
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: nsec as _,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &t,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn write(p: &Path, content: &str, mode: u32) {
    fs::write(p, content).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// (type, name, link, mode, mtime, size) of every entry of a tar, PAX already applied.
fn entries(tar_bytes: &[u8]) -> Vec<(char, String, String, u32, u64, u64)> {
    let mut a = tar::Archive::new(tar_bytes);
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                char::from(h.entry_type().as_byte()),
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default(),
                h.mode().unwrap(),
                h.mtime().unwrap(),
                h.size().unwrap(),
            )
        })
        .collect()
}

/// A lower tree and an upper tree that changes it in every way a layer can record.
fn scene(base: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let lower = base.join("lower");
    let upper = base.join("upper");
    for root in [&lower, &upper] {
        fs::create_dir_all(root.join("a")).unwrap();
        write(&root.join("a/keep"), "keep", 0o644);
        write(&root.join("same"), "same", 0o644);
        set_time(&root.join("a/keep"), 1_000_000_000, 0);
        set_time(&root.join("same"), 1_000_000_000, 0);
    }
    write(&lower.join("a/del"), "x", 0o644);
    fs::create_dir_all(lower.join("gone/sub")).unwrap();
    // Same size, same time, other content: only reading both finds the change (seed 000).
    write(&lower.join("rewritten"), "AAAA", 0o644);
    write(&upper.join("rewritten"), "BBBB", 0o644);
    set_time(&lower.join("rewritten"), 1_000_000_000, 5);
    set_time(&upper.join("rewritten"), 1_000_000_000, 5);
    write(&upper.join("a/new"), "new", 0o4755);
    std::os::unix::fs::symlink("/nowhere/at/all", upper.join("dangling")).unwrap();
    write(&upper.join("h1"), "linked", 0o600);
    fs::hard_link(upper.join("h1"), upper.join("h2")).unwrap();
    for root in [&lower, &upper] {
        set_time(&root.join("a"), 1_000_000_000, 0);
    }
    set_time(&upper.join("a"), 1_000_000_100, 0);
    (lower, upper)
}

#[test]
fn a_layer_holds_every_change_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper) = scene(tmp.path());
    let (desc, stats, tar) =
        write_layer(Some(&lower), &upper, Vec::new(), &DiffOptions::default()).unwrap();
    let names: Vec<(char, String, String)> = entries(&tar)
        .into_iter()
        .map(|(t, n, l, ..)| (t, n, l))
        .collect();
    let e = |t: char, n: &str, l: &str| (t, n.to_string(), l.to_string());
    assert_eq!(
        names,
        vec![
            e('5', "a/", ""),
            e('0', "a/.wh.del", ""),
            e('0', "a/new", ""),
            e('2', "dangling", "/nowhere/at/all"),
            e('0', ".wh.gone", ""),
            e('0', "h1", ""),
            e('1', "h2", "h1"),
            e('0', "rewritten", ""),
        ]
    );
    assert_eq!((stats.entries, stats.whiteouts), (8, 2));
    assert_eq!(desc.diff_id, Digest::of(&tar));
    assert_eq!(
        desc.digest, desc.diff_id,
        "uncompressed: the blob is the tar"
    );
    assert_eq!(desc.size, tar.len() as u64);
    // Modes keep setuid; whiteouts have time 0.
    let all = entries(&tar);
    assert_eq!(all.iter().find(|x| x.1 == "a/new").unwrap().3, 0o4755);
    assert_eq!(all.iter().find(|x| x.1 == "a/.wh.del").unwrap().4, 0);
}

#[test]
fn the_same_change_gives_the_same_bytes() {
    let t1 = tempfile::tempdir().unwrap();
    let t2 = tempfile::tempdir().unwrap();
    let (l1, u1) = scene(t1.path());
    let (l2, u2) = scene(t2.path());
    // Sub-second times differ: they are not part of a layer.
    set_time(&u2.join("a/new"), 1_700_000_000, 999);
    set_time(&u1.join("a/new"), 1_700_000_000, 1);
    let opts = DiffOptions::default();
    let (d1, _, b1) = write_layer(Some(&l1), &u1, Vec::new(), &opts).unwrap();
    let (d2, _, b2) = write_layer(Some(&l2), &u2, Vec::new(), &opts).unwrap();
    assert_eq!(d1.diff_id, d2.diff_id);
    assert_eq!(b1, b2);
}

#[test]
fn no_change_is_the_empty_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let (lower, _) = scene(tmp.path());
    let (desc, stats, tar) =
        write_layer(Some(&lower), &lower, Vec::new(), &DiffOptions::default()).unwrap();
    assert_eq!(desc.diff_id.as_str(), EMPTY_LAYER_DIFF_ID);
    assert_eq!((tar.len(), stats.entries), (1024, 0));
}

#[test]
fn compression_changes_the_digest_not_the_diff_id() {
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper) = scene(tmp.path());
    let plain = write_layer(Some(&lower), &upper, Vec::new(), &DiffOptions::default()).unwrap();
    for (c, media) in [
        (
            Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            Compression::Zstd,
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    ] {
        let opts = DiffOptions {
            compression: c,
            ..DiffOptions::default()
        };
        let (desc, _, blob) = write_layer(Some(&lower), &upper, Vec::new(), &opts).unwrap();
        assert_eq!(desc.media_type, media);
        assert_eq!(desc.diff_id, plain.0.diff_id, "{c}");
        assert_eq!(desc.digest, Digest::of(&blob));
        assert_ne!(desc.digest, desc.diff_id);
        let mut tar = Vec::new();
        match c {
            Compression::Gzip => {
                flate2::read::GzDecoder::new(blob.as_slice())
                    .read_to_end(&mut tar)
                    .unwrap();
            }
            _ => {
                zstd::stream::read::Decoder::new(blob.as_slice())
                    .unwrap()
                    .read_to_end(&mut tar)
                    .unwrap();
            }
        }
        assert_eq!(tar, plain.2, "{c} decompresses to the same tar");
    }
}

#[test]
fn source_date_epoch_clamps_times() {
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper) = scene(tmp.path());
    let opts = DiffOptions {
        source_date_epoch: Some(1_000),
        ..DiffOptions::default()
    };
    let (_, _, tar) = write_layer(Some(&lower), &upper, Vec::new(), &opts).unwrap();
    assert!(entries(&tar).iter().all(|e| e.4 <= 1_000));
}

#[test]
fn long_names_and_capabilities_go_in_pax_records_that_other_tools_read() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    let long_dir = upper.join("d".repeat(120));
    fs::create_dir_all(&long_dir).unwrap();
    let long_file = long_dir.join(format!("{}.txt", "f".repeat(150)));
    write(&long_file, "deep", 0o644);
    std::os::unix::fs::symlink("t".repeat(200), upper.join("longlink")).unwrap();
    write(&upper.join("ping"), "cap", 0o755);
    let cap: &[u8] = &[
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let root = rustix::process::geteuid().is_root();
    if root {
        rustix::fs::lsetxattr(
            upper.join("ping"),
            "security.capability",
            cap,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        rustix::fs::lsetxattr(
            upper.join("ping"),
            "user.dropped",
            b"x",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    let (_, _, tar) = write_layer(None, &upper, Vec::new(), &DiffOptions::default()).unwrap();
    let file = tmp.path().join("layer.tar");
    fs::write(&file, &tar).unwrap();

    let rel_long = long_file
        .strip_prefix(&upper)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let names: Vec<String> = entries(&tar).into_iter().map(|e| e.1).collect();
    assert!(names.contains(&rel_long), "{names:?}");

    // GNU tar reads the PAX names back.
    let out = Command::new("tar").arg("-tf").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.lines().any(|l| l == rel_long), "{listed}");
    // Python's tarfile too, with the link target and the capability.
    let script = format!(
        "import tarfile\nt = tarfile.open({:?})\nm = {{x.name: x for x in t.getmembers()}}\nprint(m['longlink'].linkname == 't' * 200)\nprint(sorted(m['ping'].pax_headers.keys()))\n",
        file.to_str().unwrap()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("True"));
    if root {
        assert_eq!(
            lines.next(),
            Some("['SCHILY.xattr.security.capability']"),
            "only security.capability is kept"
        );
    }
}

#[test]
fn sockets_are_left_out_and_a_replaced_directory_is_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let lower = tmp.path().join("lower");
    let upper = tmp.path().join("upper");
    fs::create_dir_all(lower.join("x/inner")).unwrap();
    fs::create_dir_all(&upper).unwrap();
    write(&upper.join("x"), "now a file", 0o644);
    let _sock = std::os::unix::net::UnixListener::bind(upper.join("sock")).unwrap();
    let (_, _, tar) =
        write_layer(Some(&lower), &upper, Vec::new(), &DiffOptions::default()).unwrap();
    let names: Vec<(char, String)> = entries(&tar).into_iter().map(|e| (e.0, e.1)).collect();
    assert_eq!(names, vec![('0', "x".to_string())]);
}

#[test]
fn a_file_named_like_a_whiteout_is_refused_with_its_path() {
    for name in ["a/.wh.looks-deleted", ".wh..wh..opq"] {
        let tmp = tempfile::tempdir().unwrap();
        let (lower, upper) = scene(tmp.path());
        write(&upper.join(name), "data", 0o644);
        let err = write_layer(Some(&lower), &upper, Vec::new(), &DiffOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(name.rsplit('/').next().unwrap()), "{err}");
        assert!(err.contains(".wh.") && err.contains("rename"), "{err}");
    }
    // A directory so named is refused too, and so is a file below it.
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper) = scene(tmp.path());
    fs::create_dir_all(upper.join(".wh.dir")).unwrap();
    write(&upper.join(".wh.dir/inside"), "data", 0o644);
    let err = write_layer(Some(&lower), &upper, Vec::new(), &DiffOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains(".wh.dir"), "{err}");
}
