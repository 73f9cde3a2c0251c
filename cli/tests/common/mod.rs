//! What the command-line test binaries share: the gate of privileged tests, a store root per
//! backend (a loop-backed btrfs or a small thin pool of its own where needed) and `strata`
//! run on it. Each binary uses part of it.

#![allow(dead_code)]

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_strata");

/// Whether this test can run here; under `STRATA_REQUIRE_PRIVILEGED=1` a test that cannot
/// run fails instead.
pub fn can_run(what: &str, need_failpoints: bool) -> bool {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root");
    }
    if !fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("overlay")
    {
        missing.push("overlayfs");
    }
    if need_failpoints && !cfg!(feature = "failpoints") {
        missing.push("the failpoints feature (cargo test --all-features)");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{what} needs {}", missing.join(", "));
    if std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!("{msg}, and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

pub struct Root {
    // Dropped in this order: the btrfs filesystem (if any) before its directory.
    pub fs: Option<strata_tests::LoopBtrfs>,
    pub dir: tempfile::TempDir,
    pub backend: &'static str,
}

impl Root {
    pub fn new(backend: &'static str) -> Root {
        let dir = tempfile::tempdir().unwrap();
        // The btrfs backend needs its root on btrfs: a loop-backed one of the test's own.
        let fs = (backend == "btrfs")
            .then(|| strata_tests::LoopBtrfs::mount_at(&dir.path().join("btrfs"), 512 << 20));
        let r = Root { fs, dir, backend };
        if backend == "devmapper" {
            // A small loop-backed pool of the root's own, destroyed with it.
            r.ok(&[
                "pool",
                "create",
                "--data-size",
                "512M",
                "--meta-size",
                "16M",
                "--base-size",
                "64M",
            ]);
        }
        r
    }

    pub fn path(&self) -> &Path {
        match &self.fs {
            Some(fs) => fs.path(),
            None => self.dir.path(),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--root")
            .arg(self.path())
            .args(["--backend", self.backend, "--json"])
            .args(args)
            .env_remove("STRATA_FAILPOINT");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and expects success; returns the JSON printed.
    pub fn ok(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs and expects failure of `kind`; returns the error object.
    pub fn fails(&self, args: &[&str], kind: &str) -> Value {
        let out = self.run(args);
        assert!(!out.status.success(), "strata {args:?} should fail");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"]["kind"], kind, "strata {args:?}: {v}");
        v["error"].clone()
    }

    /// Runs with a failpoint and expects the process to die of SIGKILL there.
    pub fn crash(&self, failpoint: &str, args: &[&str]) {
        let out = self
            .cmd(args)
            .env("STRATA_FAILPOINT", failpoint)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "strata {args:?} should have been killed at {failpoint}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn names(&self) -> Vec<String> {
        let v = self.ok(&["ls"]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Where the backend keeps a directory (or, devmapper, a device record) per snapshot.
    pub fn storage_dir(&self) -> PathBuf {
        match self.backend {
            "devmapper" => self.path().join("devices"),
            _ => self.path().join("snapshots"),
        }
    }

    /// Storage directories or device records (all-digit names).
    pub fn storage(&self) -> usize {
        fs::read_dir(self.storage_dir())
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_str().unwrap().bytes().all(|b| b.is_ascii_digit())
            })
            .count()
    }

    /// After cleanup, every row has storage and every storage has a row (or is a spare).
    pub fn assert_consistent(&self) {
        self.ok(&["cleanup"]);
        let rows = self.names().len();
        let fsck = self.ok(&["fsck"]);
        let spares = fsck["spares"].as_array().unwrap().len();
        let flattened = fsck["flattened"].as_array().unwrap().len();
        assert_eq!(
            self.storage(),
            rows + spares + flattened,
            "storage and rows (+ spares, flattened lowers) disagree after cleanup"
        );
        let tmp_left = fs::read_dir(self.storage_dir())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(tmp_left, 0, "temporary storage left behind");
        if self.backend == "devmapper" {
            self.assert_no_leaked_devices();
        }
    }

    /// Every active thin device of the store and every thin id its pool has in the store's
    /// range belongs to a recorded snapshot: a crash leaked no device and no thin id.
    pub fn assert_no_leaked_devices(&self) {
        let cfg: Value =
            serde_json::from_slice(&fs::read(self.path().join("devmapper.json")).unwrap()).unwrap();
        let prefix = format!("{}-", cfg["prefix"].as_str().unwrap());
        let offset = cfg["thin_offset"].as_u64().unwrap_or(0);
        let recorded: Vec<u64> = fs::read_dir(self.storage_dir())
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str().unwrap().parse().ok())
            .collect();
        for e in fs::read_dir("/sys/block").unwrap() {
            let Ok(name) = fs::read_to_string(e.unwrap().path().join("dm/name")) else {
                continue;
            };
            // `<prefix>-<thin id>`; the pool's own devices are `<prefix>-pool...`.
            let thin = name.trim().strip_prefix(&prefix).map(str::parse::<u64>);
            if let Some(Ok(thin)) = thin {
                let id = thin - offset;
                assert!(
                    recorded.contains(&id),
                    "active device {} has no snapshot",
                    name.trim()
                );
            }
        }
        let pool = cfg["pool"].as_str().unwrap();
        let top = recorded.iter().copied().max().unwrap_or(0) + 3;
        for id in 1..=top {
            #[cfg(feature = "devmapper")]
            assert_eq!(
                strata_tests::pool_has_thin(pool, offset + id),
                recorded.contains(&id),
                "thin id {} (snapshot {id}) in pool {pool}, recorded: {recorded:?}",
                offset + id
            );
            #[cfg(not(feature = "devmapper"))]
            let _ = (pool, id);
        }
    }

    /// Writes `content` to `file` inside the Active snapshot `key`, through a real mount.
    pub fn write(&self, key: &str, file: &str, content: &str) {
        let mnt = self.path().join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        self.ok(&["mount", key, mnt.to_str().unwrap()]);
        fs::write(mnt.join(file), content).unwrap();
        self.ok(&["umount", mnt.to_str().unwrap()]);
    }

    /// Reads `file` from the committed snapshot `name` through a view.
    pub fn read(&self, name: &str, file: &str) -> String {
        let mnt = self.path().join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let view = format!("read-view-{name}");
        self.ok(&["view", &view, name]);
        self.ok(&["mount", &view, mnt.to_str().unwrap()]);
        let s = fs::read_to_string(mnt.join(file)).unwrap();
        self.ok(&["umount", mnt.to_str().unwrap()]);
        self.ok(&["remove", &view]);
        s
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if self.backend == "devmapper" {
            let out = self.run(&["pool", "destroy", "--force"]);
            if !out.status.success() && !std::thread::panicking() {
                panic!("pool destroy: {}", String::from_utf8_lossy(&out.stdout));
            }
        }
    }
}

pub const BACKENDS: &[&str] = &[
    "native",
    "overlay",
    #[cfg(feature = "btrfs")]
    "btrfs",
];
