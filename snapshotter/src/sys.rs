//! Every `unsafe` system call of the crate lives here, each with a comment saying why it is
//! sound.

use std::io;

/// Gives the calling thread its own working directory, root and umask (`unshare(CLONE_FS)`),
/// so that a `chdir` in it does not move the other threads of the process.
pub(crate) fn unshare_fs() -> io::Result<()> {
    // SAFETY: `unshare_unsafe` is unsafe because `CLONE_FILES` would give this thread its own
    // file descriptor table, so that descriptors opened by other threads (which Rust code may
    // hand across threads as `OwnedFd`/`BorrowedFd`) would not be valid in it. We pass only
    // `CLONE_FS`: the thread gets a private copy of its current directory, root and umask,
    // while the descriptor table stays shared, so every descriptor stays valid everywhere.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }?;
    Ok(())
}
