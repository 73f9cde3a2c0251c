//! The conformance suite on overlay with the mount(2) fallback forced
//! (`OverlayMountMode::Legacy`): long lowerdir lists are shortened relative to their common
//! parent instead of being passed one by one through fsconfig.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "conformance/cases.rs"]
mod cases;

use std::path::Path;

#[allow(unused_imports)]
use cases::*;
use strata::Snapshotter;

conformance!(overlay_legacy, |root| {
    strata::mount::set_overlay_mount_mode(strata::mount::OverlayMountMode::Legacy);
    let backend =
        strata_overlay::OverlayBackend::open(root, strata_overlay::OverlayOptions::default())
            .unwrap();
    Box::new(strata::Store::open(root, backend, strata::StoreOptions::default()).unwrap())
});
