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

/// `MOUNT_ATTR_RDONLY` of `<linux/mount.h>`.
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
/// `MOUNT_ATTR_IDMAP` of `<linux/mount.h>`.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` of `<linux/mount.h>` (its first version, `MOUNT_ATTR_SIZE_VER0`).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the detached mount `tree` (from `open_tree(OPEN_TREE_CLONE)`) idmapped with the
/// mappings of user namespace `userns`, and read-only when `readonly`
/// (`mount_setattr(MOUNT_ATTR_IDMAP)`).
pub(crate) fn set_idmap(
    tree: std::os::fd::BorrowedFd<'_>,
    userns: std::os::fd::BorrowedFd<'_>,
    readonly: bool,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | if readonly { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).map_err(io::Error::other)?,
    };
    // SAFETY: mount_setattr(2) reads `size_of::<MountAttr>()` bytes at `&attr`, a live
    // `#[repr(C)]` struct laid out as the kernel's `struct mount_attr` (four u64s), and the
    // NUL-terminated empty path; it writes nothing of ours. `tree` and `userns` are open
    // descriptors borrowed for the call. AT_EMPTY_PATH makes it act on `tree` itself.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new user namespace with these `/proc/PID/uid_map` and `gid_map` texts, as an open
/// `/proc/PID/ns/user` of a child process made for it (killed when this returns: the open
/// descriptor keeps the namespace). A multithreaded process cannot `unshare` a user
/// namespace itself, hence the child.
pub(crate) fn user_namespace(uid_map: &str, gid_map: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors into `fds`, an array of two c_ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just opened by pipe2 and are owned by nothing else.
    let (ready_r, ready_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let ready_wfd = ready_w.as_raw_fd();
    // SAFETY: fork(2) in a multithreaded process: the child runs only async-signal-safe
    // system calls (unshare, write, pause) on values prepared before the fork, touches no
    // lock and allocates nothing, and never returns into Rust code of the parent: it waits
    // for the SIGKILL below. (Another thread's child may inherit this pipe's descriptors;
    // nothing here waits for an end of file, so that cannot block anyone.)
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: the child of the fork above; see there. `errno` is read through the
        // async-signal-safe `__errno_location`.
        unsafe {
            let status: i32 = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            let bytes = status.to_ne_bytes();
            libc::write(ready_wfd, bytes.as_ptr().cast(), bytes.len());
            loop {
                libc::pause();
            }
        }
    }
    drop(ready_w);
    let result = (|| {
        let mut status = [0u8; 4];
        let mut f = std::fs::File::from(ready_r);
        std::io::Read::read_exact(&mut f, &mut status)?;
        let errno = i32::from_ne_bytes(status);
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), uid_map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), gid_map)?;
        Ok(OwnedFd::from(std::fs::File::open(format!(
            "/proc/{pid}/ns/user"
        ))?))
    })();
    let mut wstatus = 0;
    // SAFETY: kills and reaps our own child `pid` (its status goes into a local c_int).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut wstatus, 0);
    }
    result
}
