//! The committed header `include/strata.h` is what cbindgen makes of the crate now: a
//! stale header fails here. `STRATA_BLESS=1 cargo test -p strata-ffi --test header` rewrites
//! it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn the_committed_header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut builder = cbindgen::Builder::new().with_config(config);
    for file in ["lib.rs", "error.rs", "handle.rs", "images.rs", "types.rs"] {
        builder = builder.with_src(dir.join("src").join(file));
    }
    let mut generated = Vec::new();
    builder.generate().unwrap().write(&mut generated);
    let path = dir.join("include/strata.h");
    if std::env::var("STRATA_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: regenerate it with STRATA_BLESS=1 cargo test -p strata-ffi --test header \
         and commit it",
        path.display()
    );
}
