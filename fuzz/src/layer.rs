//! `layer_apply`: the bytes are a layer blob (plain, gzip or zstd) applied with the tree
//! applier onto a small tree that has symlinks leading out of it.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use strata::layer::apply::{apply_layer, ApplyOutcome};
use strata::layer::diff::{write_layer, DiffOptions};

use crate::tree;

/// Bytes a decompressed input may hold: beyond it the input is skipped (a small compressed
/// input can stand for gigabytes of zeros, which only measures the disk).
pub const MAX_TAR: u64 = 4 << 20;

/// The size of the tar inside `data`, decompressing gzip or zstd, up to [`MAX_TAR`] + 1.
pub fn tar_size(data: &[u8]) -> u64 {
    let mut sink = std::io::sink();
    let limit = MAX_TAR + 1;
    let copied = if data.starts_with(&[0x1f, 0x8b]) {
        std::io::copy(
            &mut flate2::read::GzDecoder::new(data).take(limit),
            &mut sink,
        )
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        match zstd::stream::read::Decoder::new(data) {
            Ok(d) => std::io::copy(&mut d.take(limit), &mut sink),
            Err(_) => return 0,
        }
    } else {
        return data.len() as u64;
    };
    // A broken stream fails the apply too; what was read is what counts.
    copied.unwrap_or(0)
}

/// Sets `p`'s times to a fixed one (a symlink's own).
pub(crate) fn set_time(p: &Path) {
    let t = rustix::fs::Timespec {
        tv_sec: 1_600_000_000,
        tv_nsec: 0,
    };
    let times = rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// Makes the base tree at `root` (created): files, a nested directory, a hard link, and
/// symlinks that lead outside (`up -> ../outside`, `abs -> <outside>`), to a missing place
/// and into the tree.
pub fn base(root: &Path, outside: &Path) {
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::create_dir_all(root.join("g")).unwrap();
    for (p, c) in [
        ("a", "a\n"),
        ("d/x", "x\n"),
        ("d/e/y", "y\n"),
        ("g/h", "h\n"),
    ] {
        fs::write(root.join(p), c).unwrap();
        set_time(&root.join(p));
    }
    fs::hard_link(root.join("a"), root.join("d/a-link")).unwrap();
    symlink("../outside", root.join("up")).unwrap();
    symlink(outside, root.join("abs")).unwrap();
    symlink("/nowhere/at/all", root.join("dangling")).unwrap();
    symlink("d", root.join("in")).unwrap();
    for l in ["up", "abs", "dangling", "in"] {
        set_time(&root.join(l));
    }
    for d in ["d/e", "d", "g"] {
        set_time(&root.join(d));
    }
}

/// Makes the tree outside the destination that no layer may touch.
pub fn outside(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("secret"), "secret\n").unwrap();
    fs::write(dir.join("sub/file"), "file\n").unwrap();
}

/// Checks that `outside` still holds what [`outside`] made, and nothing links to it.
pub fn check_outside(dir: &Path, before: &tree::Tree, what: &str) {
    let now = tree::read(dir);
    if let Some(d) = tree::difference(before, &now) {
        panic!("{what} changed the tree outside the destination: {d}");
    }
    for f in ["secret", "sub/file"] {
        let n = fs::symlink_metadata(dir.join(f)).unwrap().nlink();
        assert_eq!(n, 1, "{what} hard-linked {f} from outside the destination");
    }
}

/// The target: see the module docs and the crate's.
pub fn layer_apply(data: &[u8]) {
    if tar_size(data) > MAX_TAR {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("outside");
    outside(&out_dir);
    let outside_before = tree::read(&out_dir);
    let dest = tmp.path().join("dest");
    base(&dest, &out_dir);
    let before = tree::read(&dest);

    let result = apply_layer(&dest, data, None);
    check_outside(&out_dir, &outside_before, "the layer");
    let applied = match result {
        Err((e, outcome)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("layer") || msg.contains(&*dest.to_string_lossy()),
                "an apply error names neither the layer entry nor the destination: {msg:?}"
            );
            if outcome == ApplyOutcome::Untouched {
                if let Some(d) = tree::difference(&before, &tree::read(&dest)) {
                    panic!("a failed apply reported the tree untouched, yet {d} ({msg})");
                }
            }
            return;
        }
        Ok(a) => a,
    };
    assert!(
        applied.descriptor.size == data.len() as u64,
        "the apply read {} bytes of a {}-byte blob",
        applied.descriptor.size,
        data.len()
    );
    let after = tree::read(&dest);

    // Diffing the result against the base gives a layer that makes the same tree again.
    let lower = tmp.path().join("lower");
    base(&lower, &out_dir);
    let (desc, _, layer) = write_layer(Some(&lower), &dest, Vec::new(), &DiffOptions::default())
        .unwrap_or_else(|e| panic!("diff of an applied layer failed: {e}"));
    let again = tmp.path().join("again");
    base(&again, &out_dir);
    if let Err((e, _)) = apply_layer(&again, &layer[..], Some(&desc.digest)) {
        panic!("the diff of an applied layer does not apply: {e}");
    }
    check_outside(&out_dir, &outside_before, "the diff of the layer");
    if let Some(d) = tree::difference(&after, &tree::read(&again)) {
        panic!("apply, diff, apply again: the trees differ: {d}");
    }
}
