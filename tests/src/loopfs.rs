//! A loop-backed filesystem (btrfs or ext4) a test makes for itself: a sparse image file, a
//! loop device attached for it, `mkfs`, a mount — and on drop exactly those undone, in
//! reverse.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A filesystem mounted on a directory, backed by a loop device and a sparse file.
pub struct LoopFs {
    mountpoint: PathBuf,
    image: PathBuf,
    device: String,
}

/// Runs `cmd` and expects success; returns its standard output. A failure shows the command
/// and everything it printed; a missing program is named (scripts/deps installs them).
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/deps installs the tools tests run)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The loop-backed btrfs most tests make ([`LoopFs::mount_at`]).
pub type LoopBtrfs = LoopFs;

impl LoopFs {
    /// Makes a `size`-byte btrfs (sparse image beside `mountpoint`) and mounts it there.
    pub fn mount_at(mountpoint: &Path, size: u64) -> LoopFs {
        LoopFs::make(mountpoint, size, "btrfs", &["mkfs.btrfs", "-q"])
    }

    /// Makes a `size`-byte ext4 (sparse image beside `mountpoint`) and mounts it there.
    pub fn ext4_at(mountpoint: &Path, size: u64) -> LoopFs {
        LoopFs::make(mountpoint, size, "ext4", &["mkfs.ext4", "-q", "-F"])
    }

    fn make(mountpoint: &Path, size: u64, kind: &str, mkfs: &[&str]) -> LoopFs {
        std::fs::create_dir_all(mountpoint).unwrap();
        let image = mountpoint.with_extension(format!("{kind}.img"));
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let device = run_ok(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image),
        )
        .trim()
        .to_string();
        let fs = LoopFs {
            mountpoint: mountpoint.to_path_buf(),
            image,
            device,
        };
        run_ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&fs.device));
        run_ok(Command::new("mount").arg(&fs.device).arg(&fs.mountpoint));
        fs
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// How many transactions the btrfs has committed since it was mounted (the kernel's
    /// `commit_stats`).
    pub fn commits(&self) -> u64 {
        let uuid = run_ok(
            Command::new("blkid")
                .args(["-p", "-s", "UUID", "-o", "value"])
                .arg(&self.device),
        );
        let stats =
            std::fs::read_to_string(format!("/sys/fs/btrfs/{}/commit_stats", uuid.trim())).unwrap();
        stats
            .lines()
            .find_map(|l| l.strip_prefix("commits "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no commit count in commit_stats: {stats}"))
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Busy for a moment when a child process still held a descriptor into it.
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("--lazy");
            }
            cmd.arg(&self.mountpoint)
                .status()
                .is_ok_and(|s| s.success())
        };
        let unmounted = (0..50).any(|_| {
            umount(false) || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                false
            }
        });
        if !unmounted {
            // Still busy (something in the test kept a descriptor): detach it so that the
            // loop device goes once the last user does, rather than never.
            eprintln!(
                "{} still busy; unmounting lazily",
                self.mountpoint.display()
            );
            umount(true);
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = std::fs::remove_file(&self.image);
    }
}
