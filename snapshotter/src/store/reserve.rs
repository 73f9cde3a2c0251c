//! A space reserve, so that a full disk never keeps the store from freeing space.
//!
//! Removing a snapshot writes to the metadata database (SQLite appends to its write-ahead
//! log), and on a copy-on-write file system deleting needs new blocks too. On a file system
//! filled to the last block, `remove` and `gc` — the very operations that would give space
//! back — would then fail with "database or disk is full". So the store keeps
//! `ROOT/reserve`: [`RESERVE_BYTES`] allocated with `fallocate` when it opens (and again
//! after a `gc`, when there is room). An operation that frees space and fails because the
//! disk is full gives the reserve back and tries once more; the reserve is taken again once
//! there is room. Best effort throughout: a store on a file system that cannot allocate it
//! works as before.

use std::path::PathBuf;

use super::Store;
use crate::backend::Backend;
use crate::error::Result;

/// The reserve's file name under the store root.
pub(crate) const RESERVE_FILE: &str = "reserve";

/// The reserve's size: room for the metadata writes of a few removes and a gc.
pub(crate) const RESERVE_BYTES: u64 = 8 << 20;

impl<B: Backend> Store<B> {
    fn reserve_path(&self) -> PathBuf {
        self.root.join(RESERVE_FILE)
    }

    /// Allocates the reserve if it is missing and the file system has room for it and as
    /// much again. Best effort.
    pub(crate) fn keep_reserve(&self) {
        let path = self.reserve_path();
        if path.exists() {
            return;
        }
        let room = rustix::fs::statvfs(&self.root)
            .map(|st| st.f_bavail.saturating_mul(st.f_frsize))
            .unwrap_or(0);
        if room < 2 * RESERVE_BYTES {
            return;
        }
        let tmp = self.root.join(format!(".{RESERVE_FILE}.tmp"));
        let made = std::fs::File::create(&tmp).and_then(|f| {
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, RESERVE_BYTES)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(root = %self.root.display(), error = %e, "could not allocate the space reserve");
        }
    }

    /// Gives the reserve back; true when there was one.
    fn release_reserve(&self) -> bool {
        match std::fs::remove_file(self.reserve_path()) {
            Ok(()) => {
                // A copy-on-write file system (btrfs) frees the blocks when the transaction
                // commits: commit it now.
                if let Err(e) = crate::fsutil::sync_filesystem(&self.root) {
                    tracing::debug!(error = %e, "could not sync after giving back the reserve");
                }
                tracing::warn!(root = %self.root.display(), "the disk is full: gave back the space reserve so that space can be freed");
                true
            }
            Err(_) => false,
        }
    }

    /// Runs `f`, an operation that frees space; if it fails because the disk is full, gives
    /// the reserve back and runs it once more.
    pub(crate) fn freeing<T>(&self, f: impl Fn() -> Result<T>) -> Result<T> {
        match f() {
            Err(e) if e.is_disk_full() && self.release_reserve() => f(),
            r => r,
        }
    }
}
