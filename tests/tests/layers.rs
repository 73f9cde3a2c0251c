//! Applying layers: round trips through the writer, a hostile corpus that must not touch
//! anything outside the tree, atomicity, digests, and layers written by other tools.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata::layer::apply::{apply_layer, ApplyOutcome};
use strata::layer::diff::{write_layer, DiffOptions};
use strata::layer::{Compression, Digest};
use strata_tests::{
    apply, check_directory_equal, hostile_corpus, require_privileged, run_ok, snapshot_of,
    HostileCase, LayerBuilder as Hostile, Op,
};

/// A base tree and a changed copy of it, built with the suite's appliers.
fn trees(base: &Path) -> (PathBuf, PathBuf) {
    let lower = base.join("lower");
    let upper = base.join("upper");
    let common = vec![
        Op::CreateDir("/etc", 0o755),
        Op::CreateFile("/etc/hosts", b"127.0.0.1 localhost\n".to_vec(), 0o644),
        Op::CreateDir("/lib", 0o755),
        Op::CreateFile("/lib/old", b"old".to_vec(), 0o644),
        Op::CreateDir("/opaque", 0o755),
        Op::CreateFile("/opaque/hidden", b"hidden".to_vec(), 0o644),
        Op::CreateFile("/bin-sh", b"#!".to_vec(), 0o755),
    ];
    for root in [&lower, &upper] {
        fs::create_dir_all(root).unwrap();
        apply(root, &[Op::Base]).unwrap();
        apply(root, &common).unwrap();
    }
    apply(
        &upper,
        &[
            Op::CreateFile("/etc/hosts", b"10.0.0.1 other\n".to_vec(), 0o600),
            Op::RemoveAll("/lib/old"),
            Op::CreateFile("/lib/new", b"new".to_vec(), 0o4755),
            Op::RemoveAll("/opaque"),
            Op::CreateDir("/opaque", 0o700),
            Op::CreateFile("/opaque/fresh", b"fresh".to_vec(), 0o644),
            Op::Symlink("/does/not/exist", "/dangling"),
            Op::CreateFile("/hard-a", b"linked".to_vec(), 0o644),
            Op::Link("/hard-a", "/hard-b"),
            Op::Chown("/etc/hosts", 1000, 1000),
        ],
    )
    .unwrap();
    (lower, upper)
}

fn cp_a(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

#[test]
fn a_layer_applied_to_its_lower_tree_gives_the_upper_tree() {
    if !require_privileged("layer round trip") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper) = trees(tmp.path());
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let opts = DiffOptions {
            compression: c,
            ..DiffOptions::default()
        };
        let (desc, _, blob) = write_layer(Some(&lower), &upper, Vec::new(), &opts).unwrap();
        let target = tmp.path().join(format!("target-{c}"));
        cp_a(&lower, &target);
        let applied = apply_layer(&target, blob.as_slice(), Some(&desc.digest)).unwrap();
        assert_eq!(
            applied.descriptor, desc,
            "{c}: the applier sees the same descriptor"
        );
        check_directory_equal(&target, &upper).unwrap_or_else(|d| panic!("{c}:\n{d}"));
    }
}

#[test]
fn a_wrong_digest_is_refused_and_a_fresh_tree_stays_empty() {
    if !require_privileged("layer digests") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_, upper) = trees(tmp.path());
    let (desc, _, blob) = write_layer(None, &upper, Vec::new(), &DiffOptions::default()).unwrap();
    let target = tmp.path().join("target");
    fs::create_dir(&target).unwrap();
    let wrong = Digest::of(b"something else");
    let (e, outcome) = apply_layer(&target, blob.as_slice(), Some(&wrong)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(wrong.as_str()) && msg.contains(desc.digest.as_str()),
        "{msg}"
    );
    assert_eq!(outcome, ApplyOutcome::Untouched);
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0, "left empty");

    // A truncated blob fails too, naming what it was doing, and leaves the tree empty.
    let (e, outcome) = apply_layer(&target, &blob[..blob.len() / 2], None).unwrap_err();
    assert_eq!(outcome, ApplyOutcome::Untouched, "{e}");
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
    // Garbage is not a layer.
    let (e, _) = apply_layer(&target, &[7u8; 4096][..], None).unwrap_err();
    assert!(e.to_string().contains("layer"), "{e}");
}

#[test]
fn a_hostile_layer_never_touches_anything_outside_the_tree() {
    if !require_privileged("hostile layers") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), "precious").unwrap();

    for HostileCase {
        what,
        layer,
        refusal,
    } in hostile_corpus(&outside)
    {
        let root = tmp.path().join("root");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir(&root).unwrap();
        let before = snapshot_of(&outside);
        let result = apply_layer(&root, layer.as_slice(), None);
        assert_eq!(
            snapshot_of(&outside),
            before,
            "{what}: something outside the tree changed"
        );
        assert_eq!(
            fs::read_to_string(outside.join("victim")).unwrap(),
            "precious",
            "{what}"
        );
        match (result, refusal) {
            (Err((e, outcome)), Some(why)) => {
                assert!(
                    e.to_string().contains(why),
                    "{what}: refused for another reason: {e}"
                );
                assert_eq!(outcome, ApplyOutcome::Untouched, "{what}: {e}");
                assert_eq!(
                    fs::read_dir(&root).unwrap().count(),
                    0,
                    "{what}: a failed apply leaves the fresh tree empty"
                );
            }
            (Ok(_), None) => {
                for (p, _) in snapshot_of(&root) {
                    assert!(p.starts_with(&root), "{what}: {}", p.display());
                }
            }
            (Err((e, _)), None) => panic!("{what}: should be accepted (and kept inside), got {e}"),
            (Ok(_), Some(why)) => panic!("{what}: should be refused ({why})"),
        }
    }
    // The refusals say what they refuse.
    let root = tmp.path().join("root2");
    fs::create_dir(&root).unwrap();
    let (e, _) = apply_layer(
        &root,
        Hostile::new()
            .file("../outside/evil", b"x")
            .bytes()
            .as_slice(),
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("\"../outside/evil\"") && e.to_string().contains(".."),
        "{e}"
    );
    let (e, _) = apply_layer(
        &root,
        Hostile::new().file(".wh..wh.plnk", b"").bytes().as_slice(),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");
    // A missing parent named .wh.* would be made as a directory that a diff writes back as
    // a deletion (found by the whiteout fuzz target): refused, nothing made.
    let (e, outcome) = apply_layer(
        &root,
        Hostile::new().file("d/.wh.x/f", b"").bytes().as_slice(),
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("\"d/.wh.x/f\"")
            && e.to_string().contains("parent directory named .wh."),
        "{e}"
    );
    assert_eq!(outcome, strata::layer::apply::ApplyOutcome::Untouched);
    assert!(!root.join("d/.wh.x").exists());
}

#[test]
fn layers_written_by_gnu_tar_and_python_apply() {
    if !require_privileged("foreign layers") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("dir/sub")).unwrap();
    fs::write(src.join("dir/sub/file"), "from gnu tar").unwrap();
    std::os::unix::fs::symlink("sub/file", src.join("dir/link")).unwrap();
    fs::write(src.join("dir/.wh.gone"), "").unwrap();
    let gnu = tmp.path().join("gnu.tar");
    let out = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&gnu)
        .arg("dir")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("dir")).unwrap();
    fs::write(root.join("dir/gone"), "from a lower layer").unwrap();
    apply_layer(&root, fs::File::open(&gnu).unwrap(), None).unwrap();
    assert_eq!(
        fs::read_to_string(root.join("dir/sub/file")).unwrap(),
        "from gnu tar"
    );
    assert_eq!(
        fs::read_link(root.join("dir/link")).unwrap(),
        Path::new("sub/file")
    );
    assert!(
        !root.join("dir/gone").exists(),
        "the whiteout deleted the lower file"
    );
    assert!(
        !root.join("dir/.wh.gone").exists(),
        "whiteouts are not files"
    );

    let py = tmp.path().join("py.tar.gz");
    let script = format!(
        "import tarfile, io\nt = tarfile.open({:?}, 'w:gz', format=tarfile.PAX_FORMAT)\ni = tarfile.TarInfo('{}/file')\ni.size = 6\nt.addfile(i, io.BytesIO(b'python'))\nt.close()\n",
        py.to_str().unwrap(),
        "p".repeat(150)
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
    let applied = apply_layer(&root, fs::File::open(&py).unwrap(), None).unwrap();
    assert_eq!(
        applied.descriptor.media_type,
        Compression::Gzip.media_type()
    );
    assert_eq!(
        fs::read_to_string(root.join("p".repeat(150)).join("file")).unwrap(),
        "python"
    );
    let _ = std::io::stdout().flush();
}

fn umoci_available() -> bool {
    let ok = Command::new("umoci")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("the umoci interop test needs umoci (scripts/deps installs it), and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
    }
    if !ok {
        eprintln!("SKIPPED: umoci is not installed");
    }
    ok
}

#[test]
fn umoci_unpacks_strata_layers_and_strata_applies_umoci_layers() {
    if !require_privileged("umoci interop") || !umoci_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Two strata layers: a base, then a change with a whiteout and an opaque directory.
    let (lower, upper) = trees(t);
    let (_, _, l1) = write_layer(None, &lower, Vec::new(), &DiffOptions::default()).unwrap();
    let (_, _, l2) =
        write_layer(Some(&lower), &upper, Vec::new(), &DiffOptions::default()).unwrap();
    fs::write(t.join("l1.tar"), &l1).unwrap();
    fs::write(t.join("l2.tar"), &l2).unwrap();
    let img = t.join("img");
    run_ok(Command::new("umoci").args(["init", "--layout"]).arg(&img));
    let tag = format!("{}:t", img.display());
    run_ok(Command::new("umoci").args(["new", "--image", &tag]));
    for l in ["l1.tar", "l2.tar"] {
        run_ok(
            Command::new("umoci")
                .args(["raw", "add-layer", "--image", &tag])
                .arg(t.join(l)),
        );
    }
    let bundle = t.join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image", &tag])
            .arg(&bundle),
    );
    check_directory_equal(&bundle.join("rootfs"), &upper)
        .unwrap_or_else(|d| panic!("umoci's unpack of strata's layers:\n{d}"));

    // umoci writes a layer; strata applies it onto the same base and gets umoci's tree.
    fs::write(bundle.join("rootfs/etc/added-by-umoci"), "u").unwrap();
    fs::remove_file(bundle.join("rootfs/bin-sh")).unwrap();
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image", &tag])
            .arg(&bundle),
    );
    let script = format!(
        "import json\nimg = {:?}\nidx = json.load(open(img + '/index.json'))\nm = [d for d in idx['manifests'] if d.get('annotations', {{}}).get('org.opencontainers.image.ref.name') == 't'][0]\nman = json.load(open(img + '/blobs/sha256/' + m['digest'].split(':')[1]))\nprint(man['layers'][-1]['digest'])\n",
        img.to_str().unwrap()
    );
    let digest = run_ok(Command::new("python3").arg("-c").arg(script))
        .trim()
        .to_string();
    let blob = img
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let target = t.join("target");
    cp_a(&upper, &target);
    let expected = Digest::parse(&digest).unwrap();
    let applied = apply_layer(&target, fs::File::open(&blob).unwrap(), Some(&expected)).unwrap();
    assert_eq!(
        applied.descriptor.media_type,
        Compression::Gzip.media_type()
    );
    check_directory_equal(&target, &bundle.join("rootfs"))
        .unwrap_or_else(|d| panic!("strata's apply of umoci's layer:\n{d}"));
}

/// Sets every time below `dir` to one instant, so that tools that write times agree.
fn pin_times(dir: &Path) {
    run_ok(Command::new("find").arg(dir).args([
        "-depth",
        "-exec",
        "touch",
        "-h",
        "-d",
        "@1000000000",
        "{}",
        "+",
    ]));
}

#[test]
fn the_content_checksum_does_not_depend_on_who_wrote_the_tar() {
    if !require_privileged("foreign layers") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let long = "l".repeat(120);
    fs::create_dir_all(src.join("dir/sub")).unwrap();
    fs::write(src.join("dir/sub/file"), "content").unwrap();
    fs::write(src.join("dir").join(&long), "a long name").unwrap();
    fs::hard_link(src.join("dir/sub/file"), src.join("dir/hard")).unwrap();
    std::os::unix::fs::symlink("sub/file", src.join("dir/link")).unwrap();
    pin_times(&src);

    let mut layers: Vec<(String, Vec<u8>)> = Vec::new();
    for format in ["gnu", "posix", "oldgnu"] {
        let out = Command::new("tar")
            .args(["--numeric-owner", "--format", format, "-C"])
            .arg(&src)
            .args(["-cf", "-", "dir"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        layers.push((format!("GNU tar --format {format}"), out.stdout));
    }
    for format in ["GNU_FORMAT", "PAX_FORMAT"] {
        let script = format!(
            "import tarfile, sys\nt = tarfile.open(fileobj=sys.stdout.buffer, mode='w|gz', format=tarfile.{format})\nt.add({:?}, arcname='dir')\nt.close()\n",
            src.join("dir").to_str().unwrap()
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
        layers.push((format!("Python tarfile {format}, gzip"), out.stdout));
    }
    for compression in [Compression::None, Compression::Zstd] {
        let opts = DiffOptions {
            compression,
            ..DiffOptions::default()
        };
        let (_, _, bytes) = write_layer(None, &src, Vec::new(), &opts).unwrap();
        layers.push((format!("strata, {compression:?}"), bytes));
    }

    let mut seen = Vec::new();
    for (who, layer) in &layers {
        let root = tmp.path().join(format!("apply-{}", seen.len()));
        fs::create_dir(&root).unwrap();
        let applied = apply_layer(&root, layer.as_slice(), None)
            .unwrap_or_else(|(e, _)| panic!("{who}: {e}"));
        seen.push((who.clone(), applied.descriptor.diff_id, applied.content));
    }
    for (who, diff_id, content) in &seen[1..] {
        assert_eq!(
            content, &seen[0].2,
            "{who} and {} wrote the same change set",
            seen[0].0
        );
        assert_ne!(
            diff_id, &seen[0].1,
            "{who}: a different tar, a different diffID"
        );
    }

    // One byte more, another checksum.
    fs::write(src.join("dir/sub/file"), "content!").unwrap();
    pin_times(&src);
    let (_, _, bytes) = write_layer(None, &src, Vec::new(), &DiffOptions::default()).unwrap();
    let root = tmp.path().join("changed");
    fs::create_dir(&root).unwrap();
    let applied = apply_layer(&root, bytes.as_slice(), None).unwrap();
    assert_ne!(applied.content, seen[0].2);
}
