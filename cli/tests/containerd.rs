//! strata with the real containerd (Debian's, with runc) as its proxy snapshotter, on overlay,
//! native and btrfs:
//!
//! - a containerd of the test's own (root, state dir and socket in a temporary directory, CRI
//!   off) loads `strata serve` as `[proxy_plugins.strata]`; an OCI image the test builds with
//!   busybox-static and umoci is imported with `ctr images import --snapshotter strata` and run
//!   with `ctr run --rm --snapshotter strata`, and the container's output is checked; strata's
//!   own CLI and gc work beside it; removing the image lets containerd's gc remove every
//!   snapshot through strata;
//! - containerd's own snapshotter test suite (`snapshots/testsuite`) runs against `strata
//!   serve` through containerd's proxy client (`snapshots/proxy`): `tests/containerd/suite`,
//!   built offline in GOPATH mode from Debian's golang-github-containerd-containerd-dev.

#![cfg(feature = "containerd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use strata_tests::{require_privileged, run_ok};

const BIN: &str = env!("CARGO_BIN_EXE_strata");

/// Where Debian's golang-*-dev packages put Go sources (GOPATH layout).
const DEBIAN_GOCODE: &str = "/usr/share/gocode";

/// Whether the programs a test runs are installed; under `STRATA_REQUIRE_PRIVILEGED=1` (CI) a
/// missing one is a failure, not a skip.
fn tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {n}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        panic!(
            "{} not installed (scripts/deps installs them)",
            missing.join(", ")
        );
    }
    eprintln!(
        "SKIPPED: {} not installed (scripts/deps installs them)",
        missing.join(", ")
    );
    false
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_for_socket(path: &Path, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(path).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{what} exited with {status} before listening on {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `strata serve` on `root`, stopped with SIGTERM by [`Serve::stop`] (which checks it exits 0
/// and removes its socket) or killed on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Serve {
    fn start(root: &Path, backend: &str, socket: &Path, log: &Path) -> Serve {
        let mut child = Command::new(BIN)
            .arg("--root")
            .arg(root)
            .args([
                "--backend",
                backend,
                "serve",
                "--log-level",
                "debug",
                "--address",
            ])
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        wait_for_socket(socket, &mut child, "strata serve");
        Serve {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) -> String {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "strata serve ignored SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "strata serve: {status}: {}", self.log());
        assert!(!self.socket.exists(), "strata serve removed its socket");
        self.log()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A containerd of the test's own with strata as `[proxy_plugins.strata]`, killed on drop.
struct Containerd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, strata_socket: &Path) -> Containerd {
        fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[proxy_plugins.strata]
  type = "snapshot"
  address = "{strata}"
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
                strata = strata_socket.display(),
            ),
        )
        .unwrap();
        let log = dir.join("containerd.log");
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for_socket(&socket, &mut child, "containerd");
        Containerd { child, socket, log }
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\ncontainerd's log:\n{}",
            text(&out),
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a two-layer OCI image archive with umoci: busybox with a greeting and a directory,
/// then a layer that rewrites the greeting, deletes the directory (a whiteout) and adds a file.
/// Returns the archive, to import as `strata.test/busybox:v1`.
fn busybox_image(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:v1", layout.display());
    let umoci = |args: &[&str]| run_ok(Command::new("umoci").args(args));
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    let rootfs = bundle.join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for tool in ["sh", "cat", "ls", "echo"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool)).unwrap();
    }
    fs::create_dir_all(rootfs.join("etc/doomed")).unwrap();
    fs::write(rootfs.join("etc/doomed/file"), "gone in layer 2\n").unwrap();
    fs::write(rootfs.join("etc/greeting"), "hello from layer 1\n").unwrap();
    umoci(&["repack", "--image", &image, bundle.to_str().unwrap()]);
    // A bundle repacks against the manifest it was unpacked from: unpack again for a second
    // layer on top of the first.
    let bundle = dir.join("bundle2");
    let rootfs = bundle.join("rootfs");
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    fs::remove_dir_all(rootfs.join("etc/doomed")).unwrap();
    fs::write(rootfs.join("etc/greeting"), "hello from layer 2\n").unwrap();
    fs::write(rootfs.join("etc/added"), "added in layer 2\n").unwrap();
    umoci(&["repack", "--image", &image, bundle.to_str().unwrap()]);
    umoci(&["config", "--image", &image, "--config.cmd", "/bin/sh"]);
    let archive = dir.join("busybox.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    archive
}

/// The whole containerd round trip on `backend` with the store at `root`.
fn containerd_runs_a_container_on(backend: &str, root: &Path, work: &Path) {
    let archive = busybox_image(work);
    let strata_socket = work.join("strata.sock");
    let serve = Serve::start(root, backend, &strata_socket, &work.join("strata.log"));
    let ctrd = Containerd::start(&work.join("containerd"), &strata_socket);
    let plugins = ctrd.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("snapshotter") && l.contains("strata") && l.contains(" ok")),
        "containerd loaded the strata proxy plugin: {plugins}"
    );

    ctrd.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "strata",
        "--base-name",
        "strata.test/busybox",
        archive.to_str().unwrap(),
    ]);
    let images = ctrd.ctr_ok(&["images", "ls", "-q"]);
    assert!(images.contains("strata.test/busybox:v1"), "{images}");
    // The unpacked layers are strata's: two committed snapshots, one the other's parent.
    let out = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(["--json", "ls"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata ls beside serve: {}",
        text(&out)
    );
    let infos: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let infos = infos.as_array().unwrap();
    assert_eq!(infos.len(), 2, "{infos:?}");
    assert!(infos.iter().all(|i| i["kind"] == "committed"), "{infos:?}");
    assert!(
        infos.iter().any(|i| i["parent"].is_null())
            && infos.iter().any(|i| i["parent"].is_string()),
        "a chain of two: {infos:?}"
    );

    let script = "cat /etc/greeting; ls /etc; echo written > /tmp-file && cat /tmp-file";
    let run = |id: &str| {
        ctrd.ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "strata",
            "strata.test/busybox:v1",
            id,
            "/bin/sh",
            "-c",
            script,
        ])
    };
    // runc keeps its state under /run/containerd/runc whatever containerd's state dir is:
    // container ids unique to the backend let the tests run side by side.
    let output = run(&format!("strata-test-{backend}-1"));
    let lines: Vec<&str> = output.lines().map(str::trim).collect();
    assert_eq!(lines.first(), Some(&"hello from layer 2"), "{output}");
    assert!(
        lines.contains(&"added"),
        "layer 2's file is there: {output}"
    );
    assert!(lines.contains(&"greeting"), "{output}");
    assert!(
        !lines.contains(&"doomed"),
        "layer 2's whiteout hides the directory: {output}"
    );
    assert_eq!(
        lines.last(),
        Some(&"written"),
        "the container's rootfs is writable: {output}"
    );
    // A second container reuses the unpacked layers (containerd gets AlreadyExists or finds
    // them by their chain ID) and writes nothing into them.
    let output = run(&format!("strata-test-{backend}-2"));
    assert!(output.starts_with("hello from layer 2"), "{output}");

    // strata's gc beside a containerd-managed store removes nothing containerd made.
    let out = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(["gc"])
        .output()
        .unwrap();
    assert!(out.status.success(), "strata gc: {}", text(&out));
    let snaps = ctrd.ctr_ok(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(
        snaps.lines().count(),
        3,
        "header and two layers survive strata's gc: {snaps}"
    );

    // Removing the image lets containerd's gc remove the snapshots through strata (Remove,
    // then Cleanup reclaims their storage).
    ctrd.ctr_ok(&["images", "rm", "--sync", "strata.test/busybox:v1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snaps = ctrd.ctr_ok(&["snapshots", "--snapshotter", "strata", "ls"]);
        if snaps.lines().count() <= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "containerd's gc left snapshots: {snaps}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(["--json", "ls"])
        .output()
        .unwrap();
    let infos: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(infos.as_array().map(Vec::len), Some(0), "{infos}");
    drop(ctrd);
    let log = serve.stop();
    for op in ["prepare", "commit", "stat", "mounts", "remove", "cleanup"] {
        assert!(
            log.contains(&format!("op=\"{op}\"")),
            "containerd called {op}: {log}"
        );
    }
}

fn containerd_tools() -> bool {
    tools(&["containerd", "ctr", "runc", "umoci", "busybox"])
}

#[test]
fn containerd_runs_a_container_on_overlay() {
    if !require_privileged("containerd on overlay") || !containerd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    containerd_runs_a_container_on("overlay", &dir.path().join("store"), dir.path());
}

#[test]
fn containerd_runs_a_container_on_native() {
    if !require_privileged("containerd on native") || !containerd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    containerd_runs_a_container_on("native", &dir.path().join("store"), dir.path());
}

#[cfg(feature = "btrfs")]
#[test]
fn containerd_runs_a_container_on_btrfs() {
    if !require_privileged("containerd on btrfs") || !containerd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = strata_tests::LoopBtrfs::mount_at(&dir.path().join("btrfs"), 1 << 30);
    containerd_runs_a_container_on("btrfs", &fs.path().join("store"), dir.path());
}

/// containerd's snapshotter suite, compiled once per test binary.
fn suite_binary() -> &'static Path {
    static SUITE: OnceLock<PathBuf> = OnceLock::new();
    SUITE.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("containerd-suite");
        let pkg = base.join("gopath/src/strata.test/suite");
        fs::create_dir_all(&pkg).unwrap();
        let source =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/containerd/suite/strata_test.go");
        fs::copy(&source, pkg.join("strata_test.go")).unwrap();
        let out = base.join("suite.test");
        run_ok(
            Command::new("go")
                .args(["test", "-c", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(&pkg)
                // Debian's Go sources are a GOPATH tree: no modules, no network.
                .env("GO111MODULE", "off")
                .env("GOFLAGS", "")
                .env("GOPROXY", "off")
                .env(
                    "GOPATH",
                    format!("{}:{DEBIAN_GOCODE}", base.join("gopath").display()),
                )
                .env("GOCACHE", base.join("go-build")),
        );
        out
    })
}

/// Runs containerd's suite (and the Rename case it skips) on `backend` with its temporary
/// directories under `tmp`; every case must pass, Rename (skipped by containerd 1.6 on every
/// snapshotter) is run by `TestRename`.
fn containerd_suite_on(backend: &str, tmp: &Path) {
    let out = Command::new(suite_binary())
        .args([
            "-test.root",
            "-test.v",
            "-test.count",
            "1",
            "-strata",
            BIN,
            "-backend",
            backend,
        ])
        .env("TMPDIR", tmp)
        .output()
        .unwrap();
    let log = text(&out);
    assert!(
        out.status.success(),
        "containerd's suite on {backend}:\n{log}"
    );
    let results: Vec<(&str, &str)> = log
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (verdict, rest) = l.strip_prefix("--- ")?.split_once(": ")?;
            Some((verdict, rest.split_whitespace().next()?))
        })
        .collect();
    let cases: Vec<_> = results
        .iter()
        .filter(|(_, name)| name.starts_with("TestContainerdSuite/"))
        .collect();
    assert_eq!(
        cases.len(),
        21,
        "containerd's suite has 21 cases: {results:?}"
    );
    for (verdict, name) in &cases {
        let expected = if *name == "TestContainerdSuite/Rename" {
            "SKIP"
        } else {
            "PASS"
        };
        assert_eq!(*verdict, expected, "{name} on {backend}:\n{log}");
    }
    assert!(
        results.contains(&("PASS", "TestRename")),
        "the Rename case ran on {backend}: {results:?}"
    );
}

#[test]
fn containerds_snapshotter_suite_passes_on_overlay() {
    if !require_privileged("containerd's suite on overlay") || !tools(&["go"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    containerd_suite_on("overlay", dir.path());
}

#[test]
fn containerds_snapshotter_suite_passes_on_native() {
    if !require_privileged("containerd's suite on native") || !tools(&["go"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    containerd_suite_on("native", dir.path());
}

#[cfg(feature = "btrfs")]
#[test]
fn containerds_snapshotter_suite_passes_on_btrfs() {
    if !require_privileged("containerd's suite on btrfs") || !tools(&["go"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = strata_tests::LoopBtrfs::mount_at(&dir.path().join("btrfs"), 2 << 30);
    containerd_suite_on("btrfs", fs.path());
}
