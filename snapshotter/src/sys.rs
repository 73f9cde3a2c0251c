//! Every `unsafe` system call of the crate lives here, each with a comment saying why it is
//! sound.

use std::io;

/// Gives the calling thread its own working directory, root and umask (`unshare(CLONE_FS)`),
/// so that a `chdir` in it does not move the other threads of the process.
pub(crate) fn unshare_fs() -> io::Result<()> {
    // SAFETY: `unshare_unsafe` is unsafe because `CLONE_FILES` can leave a thread with a file
    // descriptor table other threads' descriptors are not in. We pass only `CLONE_FS`, which
    // copies the current directory, root and umask and shares nothing a descriptor depends on.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }?;
    Ok(())
}
