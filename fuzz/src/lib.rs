//! strata's fuzz targets, as plain functions.
//!
//! Each target is a `pub fn NAME(data: &[u8])` that, for any bytes, returns normally unless
//! it found a bug, which it reports by panicking with what it found. A target touches nothing
//! outside the temporary directories it makes (and `filter`'s one per-process directory under
//! the system temporary directory, removed by the next run once the process is gone), never
//! mounts, and checks invariants rather than only that strata does not crash:
//!
//! * [`layer_apply`]: a layer blob applied onto a tree with symlinks that lead out of it;
//! * [`whiteout`]: generated layers of whiteouts and opaque markers, applied by the tree
//!   applier and by the overlay upper-directory applier, which must agree;
//! * [`filter`]: containerd filter strings, parsed and evaluated in memory and in SQL;
//! * [`oci`]: the OCI index, manifest and config parsers `import` uses;
//! * [`oci_import`]: image layouts and archives imported into a store;
//! * [`ffi`]: scripts of C ABI calls on a native store.
//!
//! `fuzz/libfuzzer` runs them under libFuzzer (`cargo +nightly fuzz run --fuzz-dir
//! fuzz/libfuzzer NAME`); `tests/smoke.rs` runs each over its seed corpus (`fuzz/corpus/NAME`)
//! and a few thousand deterministic mutations on stable, as part of the test suite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure in a target is a finding

mod ffi;
mod filter;
mod layer;
mod oci;
pub mod seeds;
pub mod tree;
mod whiteout;

pub use ffi::ffi;
pub use filter::{filter, render as render_filter};
pub use layer::layer_apply;
pub use oci::{oci, oci_import};
pub use whiteout::whiteout;

/// A fuzz target.
pub type Target = fn(&[u8]);

/// Every target by name: the names of `fuzz/libfuzzer/fuzz_targets/NAME.rs` and of the seed
/// corpus directories `fuzz/corpus/NAME`.
pub const TARGETS: &[(&str, Target)] = &[
    ("layer_apply", layer_apply),
    ("whiteout", whiteout),
    ("filter", filter),
    ("oci", oci),
    ("oci_import", oci_import),
    ("ffi", ffi),
];
