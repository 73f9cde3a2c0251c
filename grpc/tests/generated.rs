//! The committed API code (`src/proto/`) is what tonic generates from `proto/` today.
//!
//! `STRATA_BLESS=1 cargo test -p strata-grpc --test generated` rewrites it. protoc comes from
//! the `protoc-bin-vendored` crate, so neither building nor this check needs protoc installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

#[test]
fn the_committed_api_code_is_what_the_protos_generate() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let protoc = protoc_bin_vendored::protoc_bin_path().unwrap();
    let well_known = protoc_bin_vendored::include_path().unwrap();
    // SAFETY: tonic-prost-build reads PROTOC from the environment; this test is the only one
    // in its binary, so no other thread reads the environment meanwhile.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let protos = crate_dir.join("proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(out.path())
        .compile_protos(
            &[protos.join("containerd/services/snapshots/v1/snapshots.proto")],
            &[protos.clone(), well_known],
        )
        .unwrap();
    let committed = crate_dir.join("src/proto");
    let bless = std::env::var("STRATA_BLESS").is_ok_and(|v| v == "1");
    let mut names: Vec<_> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "tonic generated nothing");
    for name in names {
        let fresh = fs::read_to_string(out.path().join(&name)).unwrap();
        let path = committed.join(&name);
        if bless {
            fs::write(&path, &fresh).unwrap();
            continue;
        }
        let old = fs::read_to_string(&path).unwrap_or_default();
        assert!(
            old == fresh,
            "{} differs from what the protos generate; run STRATA_BLESS=1 cargo test -p strata-grpc --test generated and commit it",
            path.display()
        );
    }
}
