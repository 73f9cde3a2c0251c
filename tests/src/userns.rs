//! Running a test again in a new user namespace and mount namespace, as an unprivileged
//! ("rootless") process would: root inside is mapped to [`USERNS_BASE`] outside, with
//! [`USERNS_SIZE`] ids, so it holds every capability inside the namespace and none outside
//! (no `trusted.*` attributes, overlayfs only with `userxattr`).
//!
//! The test binary is multithreaded and `unshare(CLONE_NEWUSER)` refuses a multithreaded
//! process, so [`run_in_userns`] starts the test binary again: the forked child enters the
//! namespaces before it executes it, waits until this process has written its uid and gid
//! maps (only a process outside may map more than one id), becomes root inside, and runs the
//! one test with [`USERNS_CHILD_ENV`] set.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rustix::fd::OwnedFd;

/// Set (to a directory the test shares with its parent) in the child [`run_in_userns`] starts.
pub const USERNS_CHILD_ENV: &str = "STRATA_USERNS_CHILD";

/// The host uid and gid that root inside the namespace is.
pub const USERNS_BASE: u32 = 100_000;

/// How many uids and gids the namespace maps.
pub const USERNS_SIZE: u32 = 65_536;

/// Whether the kernel lets this process make a user namespace in which root mounts
/// overlayfs (`userxattr`, Linux 5.11 on). When it cannot, panics under
/// `STRATA_REQUIRE_PRIVILEGED=1` (CI) and otherwise prints a skip note and returns false.
pub fn require_userns(what: &str) -> bool {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    let missing = match (max > 0, version >= (5, 11)) {
        (true, true) => return true,
        (false, _) => "user namespaces (/proc/sys/user/max_user_namespaces is 0)".to_string(),
        (true, false) => {
            format!("Linux 5.11 or later for overlayfs' userxattr (this is {release})")
        }
    };
    if std::env::var(crate::REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        panic!(
            "{what} needs {missing}, and {}=1 forbids skipping it",
            crate::REQUIRE_PRIVILEGED_ENV
        );
    }
    eprintln!("SKIPPED: {what} needs {missing}");
    false
}

/// The shared directory, when this process is the child [`run_in_userns`] started.
pub fn userns_child() -> Option<PathBuf> {
    std::env::var_os(USERNS_CHILD_ENV).map(PathBuf::from)
}

/// Gives `path` and everything below it to root inside the namespace (host [`USERNS_BASE`]).
pub fn give_to_userns_root(path: &Path) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{USERNS_BASE}:{USERNS_BASE}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown -R {}: {status}", path.display());
}

/// Runs the test `test` of this test binary again, in a new user namespace (root inside is
/// host [`USERNS_BASE`]) and mount namespace, with [`USERNS_CHILD_ENV`] set to `shared`.
/// Returns its output once it exited; panics unless it passed and ran exactly that test.
pub fn run_in_userns(test: &str, shared: &Path) -> Output {
    let exe = std::env::current_exe().unwrap();
    let (pid_r, pid_w) = std::io::pipe().unwrap();
    let (go_r, go_w) = std::io::pipe().unwrap();
    let pid_w = OwnedFd::from(pid_w);
    let go_r = OwnedFd::from(go_r);
    // Writes the child's maps once it has entered its namespace, then lets it go on.
    let mapper = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut pid_r, mut go_w) = (pid_r, go_w);
        let mut raw = [0u8; 4];
        pid_r.read_exact(&mut raw)?;
        let pid = i32::from_ne_bytes(raw);
        let map = format!("0 {USERNS_BASE} {USERNS_SIZE}\n");
        let mapped = std::fs::write(format!("/proc/{pid}/uid_map"), &map)
            .and_then(|()| std::fs::write(format!("/proc/{pid}/gid_map"), &map));
        go_w.write_all(&[u8::from(mapped.is_ok())])?;
        mapped
    });
    let mut cmd = Command::new(&exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(USERNS_CHILD_ENV, shared)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only makes system calls
    // (rustix's are raw, async-signal-safe): no allocation, no lock. The error it may return
    // is made from a raw errno, without allocating.
    unsafe {
        cmd.pre_exec(move || {
            use rustix::thread::UnshareFlags;
            let fail = |e: rustix::io::Errno| std::io::Error::from_raw_os_error(e.raw_os_error());
            rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER | UnshareFlags::NEWNS)
                .map_err(fail)?;
            let pid = rustix::process::getpid().as_raw_nonzero().get();
            rustix::io::write(&pid_w, &pid.to_ne_bytes()).map_err(fail)?;
            let mut go = [0u8; 1];
            match rustix::io::read(&go_r, &mut go[..]) {
                Ok(1) if go[0] == 1 => {}
                Ok(_) => return Err(fail(rustix::io::Errno::PERM)),
                Err(e) => return Err(fail(e)),
            }
            let root_gid = rustix::fs::Gid::ROOT;
            let root_uid = rustix::fs::Uid::ROOT;
            rustix::thread::set_thread_groups(&[]).map_err(fail)?;
            rustix::thread::set_thread_res_gid(root_gid, root_gid, root_gid).map_err(fail)?;
            rustix::thread::set_thread_res_uid(root_uid, root_uid, root_uid).map_err(fail)?;
            Ok(())
        });
    }
    let child = cmd.spawn();
    // The closure (and with it this process's copies of the child's pipe ends) goes, so
    // that the mapper sees the end of the pipe if the child never wrote to it.
    drop(cmd);
    let child =
        child.unwrap_or_else(|e| panic!("starting {} in a new user namespace: {e}", exe.display()));
    let mapped = mapper.join().unwrap();
    let out = child.wait_with_output().unwrap();
    mapped.unwrap_or_else(|e| panic!("writing the uid and gid maps of the child: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in a user namespace: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    eprintln!("--- {test} in a user namespace:\n{stdout}{stderr}");
    out
}
