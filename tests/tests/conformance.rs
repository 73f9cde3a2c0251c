//! The conformance suite: a port of the 21 cases of containerd's snapshotter test suite
//! (`conformance/cases.rs`), run against every backend, one `#[test]` per case and backend
//! (`native::basic`, `overlay::basic`, ...), each in a fresh root. Overlay mounts go through
//! fsconfig and `lowerdir+` here; `conformance_legacy.rs` runs the same cases through mount(2).
//!
//! The cases mount, so they need root (and overlayfs for `overlay::*`); without it they print
//! a skip note, or fail under `STRATA_REQUIRE_PRIVILEGED=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "conformance/cases.rs"]
mod cases;

use std::path::Path;

#[allow(unused_imports)]
use cases::*;
use strata::Snapshotter;

conformance!(native, |root| {
    let backend = strata_native::NativeBackend::open(root)?;
    strata::Store::open(root, backend, strata::StoreOptions::default())
});

conformance!(overlay, |root| {
    let backend =
        strata_overlay::OverlayBackend::open(root, strata_overlay::OverlayOptions::default())?;
    strata::Store::open(root, backend, strata::StoreOptions::default())
});

#[cfg(feature = "btrfs")]
conformance!(btrfs, |root| {
    let backend = strata_btrfs::BtrfsBackend::open(root)?;
    strata::Store::open(root, backend, strata::StoreOptions::default())
});

#[cfg(feature = "devmapper")]
conformance!(devmapper, |root| {
    let backend = strata_devmapper::DevmapperBackend::open(root)?;
    strata::Store::open(root, backend, strata::StoreOptions::default())
});
