//! The gate of the tests that need root (mounting) and overlayfs.

use std::fs;

/// The environment variable that turns a skip for lack of privileges into a failure (CI sets
/// it to `1`, so that a suite that silently skipped cannot pass).
pub const REQUIRE_PRIVILEGED_ENV: &str = "STRATA_REQUIRE_PRIVILEGED";

/// Whether a test that needs root (to mount) can run. See [`require_privileged`].
pub fn require_root(what: &str) -> bool {
    gate(what, false)
}

/// Whether a test that needs root and overlayfs can run. When it cannot, it panics under
/// `STRATA_REQUIRE_PRIVILEGED=1` (CI) and otherwise prints a skip note on stderr and returns
/// false, so that the caller returns early.
pub fn require_privileged(what: &str) -> bool {
    gate(what, true)
}

fn gate(what: &str, overlay: bool) -> bool {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root");
    }
    if overlay && !overlay_available() {
        missing.push("overlayfs (not in /proc/filesystems)");
    }
    if missing.is_empty() {
        return true;
    }
    let needs = missing.join(" and ");
    if std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        panic!(
            "{what} needs {needs}, which this process does not have, and \
             {REQUIRE_PRIVILEGED_ENV}=1 forbids skipping it"
        );
    }
    eprintln!(
        "SKIPPED: {what} needs {needs}; run as root (set {REQUIRE_PRIVILEGED_ENV}=1 to make \
         this a failure)"
    );
    false
}

/// True when the kernel knows overlayfs (it may need `modprobe overlay` otherwise).
fn overlay_available() -> bool {
    fs::read_to_string("/proc/filesystems").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    })
}
