//! The conformance suite: a port of the 21 cases of containerd's snapshotter test suite,
//! run against every backend (overlay mounts through fsconfig and `lowerdir+` here; see
//! `conformance_legacy.rs` for the mount(2) path).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "conformance/cases.rs"]
mod cases;

use std::path::Path;

#[allow(unused_imports)]
use cases::*;
use strata::Snapshotter;

conformance!(native, |root| {
    let backend = strata_native::NativeBackend::open(root).unwrap();
    Box::new(strata::Store::open(root, backend, strata::StoreOptions::default()).unwrap())
});

conformance!(overlay, |root| {
    let backend =
        strata_overlay::OverlayBackend::open(root, strata_overlay::OverlayOptions::default())
            .unwrap();
    Box::new(strata::Store::open(root, backend, strata::StoreOptions::default()).unwrap())
});
