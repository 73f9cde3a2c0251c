//! `oci` and `oci_import`.
//!
//! `oci`: the bytes are a JSON document given to the parsers `import` uses
//! ([`Index::parse`], [`Manifest::parse`], [`ConfigRootfs::parse`]). Each either fails with
//! a message saying what the document is not, or returns a value that serialises to JSON
//! that parses back to the same value, and serialises the same way again.
//!
//! `oci_import`: the bytes are an image layout — `index.json`, then blobs, separated by
//! [`SEP`]; in any of them `@N` stands for the digest of blob N and `#N` for its size (blob
//! N may only name blobs after it), so that mutations keep reaching past the digest checks —
//! or, after a leading `T`, an OCI archive. It is imported into a fresh store. Checked: the
//! import fails with a message or tags images of committed snapshots; the store is
//! fsck-clean once cleaned up and keeps no temporary files either way; nothing outside the store changes.

use std::fs;
use std::path::Path;

use strata::layer::oci::{ConfigRootfs, Index, Manifest};
use strata::layer::Digest;
use strata::{Kind, Snapshotter, Store, StoreOptions};
use strata_native::NativeBackend;

use crate::{layer, tree};

fn round_trip<T>(
    what: &str,
    data: &[u8],
    parse: fn(&[u8]) -> Result<T, String>,
    ser: fn(&T) -> Vec<u8>,
) where
    T: PartialEq + std::fmt::Debug,
{
    match parse(data) {
        Err(msg) => assert!(
            msg.starts_with("not an") && msg.len() > "not an image config: ".len(),
            "{what}: the parse error does not say what is wrong: {msg:?}"
        ),
        Ok(v) => {
            let json = ser(&v);
            let again = parse(&json).unwrap_or_else(|e| {
                panic!(
                    "{what}: {:?} (written from a parsed document) does not parse: {e}",
                    String::from_utf8_lossy(&json)
                )
            });
            assert_eq!(again, v, "{what}: parse, write, parse changed the value");
            assert_eq!(ser(&again), json, "{what}: written twice, differently");
        }
    }
}

/// The target `oci`: see the module docs.
pub fn oci(data: &[u8]) {
    round_trip("index", data, Index::parse, |v| {
        serde_json::to_vec(v).unwrap()
    });
    round_trip("manifest", data, Manifest::parse, |v| {
        serde_json::to_vec(v).unwrap()
    });
    round_trip("config", data, ConfigRootfs::parse, |v| {
        serde_json::to_vec(&serde_json::json!({ "rootfs": v.rootfs })).unwrap()
    });
}

/// What separates `index.json` and the blobs in an `oci_import` input.
pub const SEP: &[u8] = b"\n@@@\n";

fn replace(hay: &[u8], pat: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(pat) {
            out.extend_from_slice(with);
            i += pat.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// Splits an `oci_import` input into `index.json` and the blobs, placeholders filled in.
pub fn layout_parts(data: &[u8]) -> Vec<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(rest[..i].to_vec());
        rest = &rest[i + SEP.len()..];
    }
    parts.push(rest.to_vec());
    parts.truncate(10);
    for i in (0..parts.len()).rev() {
        for n in (i + 1)..parts.len() {
            let digest = Digest::of(&parts[n]).to_string();
            let size = parts[n].len().to_string();
            parts[i] = replace(&parts[i], format!("@{n}").as_bytes(), digest.as_bytes());
            parts[i] = replace(&parts[i], format!("#{n}").as_bytes(), size.as_bytes());
        }
    }
    parts
}

fn write_layout(dir: &Path, parts: &[Vec<u8>]) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(dir.join("index.json"), &parts[0]).unwrap();
    for p in &parts[1..] {
        let d = Digest::of(p);
        let hex = d.as_str().trim_start_matches("sha256:");
        fs::write(dir.join("blobs/sha256").join(hex), p).unwrap();
    }
}

/// The target `oci_import`: see the module docs.
pub fn oci_import(data: &[u8]) {
    let parts = match data.strip_prefix(b"T") {
        Some(_) => Vec::new(),
        None => layout_parts(data),
    };
    if parts.iter().any(|p| layer::tar_size(p) > layer::MAX_TAR) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("outside");
    layer::outside(&out_dir);
    let outside_before = tree::read(&out_dir);
    let src = tmp.path().join("image");
    match data.strip_prefix(b"T") {
        Some(archive) => fs::write(&src, archive).unwrap(),
        None => write_layout(&src, &parts),
    }
    let root = tmp.path().join("store");
    let opts = StoreOptions {
        durable: false,
        ..StoreOptions::default()
    };
    let store = Store::open(&root, NativeBackend::open(&root).unwrap(), opts).unwrap();
    match store.import(&src, None) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(report) => {
            let images = store.images().unwrap();
            for (name, top) in &report.images {
                assert!(
                    images.contains(&(name.clone(), top.clone())),
                    "imported image {name} -> {top} is not listed: {images:?}"
                );
                let info = store
                    .stat(top)
                    .unwrap_or_else(|e| panic!("image {name}: {e}"));
                assert_eq!(info.kind, Kind::Committed, "image {name}");
            }
        }
    }
    layer::check_outside(&out_dir, &outside_before, "the import");
    // What a failed import removed keeps its storage until a cleanup; then nothing is left.
    store
        .cleanup()
        .unwrap_or_else(|e| panic!("cleanup after an import: {e}"));
    let fsck = store.fsck(false).unwrap();
    assert!(fsck.is_clean(), "after an import: {fsck:?}");
    let leftovers: Vec<_> = fs::read_dir(root.join("tmp"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "the import left {leftovers:?} in the store's tmp"
    );
}
