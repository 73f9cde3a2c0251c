//! Mount helpers: mount a snapshot's [`Mount`]s on a target, unmount, temporary mounts.
//!
//! (Being written: overlay through `fsconfig` with `lowerdir+`, the common-prefix fallback,
//! bind mounts, volatile clean-up.)

use std::path::Path;

use crate::error::{Error, Result};
use crate::types::Mount;

/// Mounts `mounts` on `target`, in order.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    let _ = mounts;
    Err(Error::io(target, "mount", std::io::Error::from(std::io::ErrorKind::Unsupported)))
}

/// Unmounts `target`.
pub fn unmount(target: &Path) -> Result<()> {
    Err(Error::io(target, "unmount", std::io::Error::from(std::io::ErrorKind::Unsupported)))
}
