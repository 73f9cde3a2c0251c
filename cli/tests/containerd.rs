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
  capabilities = ["remap-ids"]
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

impl Containerd {
    /// Imports [`busybox_image`]'s archive into strata as `strata.test/busybox:v1`.
    fn import_busybox(&self, archive: &Path) {
        self.ctr_ok(&[
            "images",
            "import",
            "--snapshotter",
            "strata",
            "--base-name",
            "strata.test/busybox",
            archive.to_str().unwrap(),
        ]);
    }

    /// Waits (30 s at most) until containerd's gc has removed every snapshot it made in
    /// strata (Remove, then Cleanup).
    fn wait_for_no_snapshots(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let snaps = self.ctr_ok(&["snapshots", "--snapshotter", "strata", "ls"]);
            if snaps.lines().count() <= 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd's gc left snapshots: {snaps}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
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

    ctrd.import_busybox(&archive);
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
    ctrd.wait_for_no_snapshots();
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

/// A container in a user namespace (`ctr run --uidmap --gidmap --remap-labels`: containerd
/// passes the mapping to strata as snapshot labels): the image's files are root's inside,
/// the container's root writes, and no chowned copy of the image is made.
fn containerd_runs_a_user_namespaced_container_on(backend: &str, root: &Path, work: &Path) {
    let archive = busybox_image(work);
    let strata_socket = work.join("strata.sock");
    let serve = Serve::start(root, backend, &strata_socket, &work.join("strata.log"));
    let ctrd = Containerd::start(&work.join("containerd"), &strata_socket);
    ctrd.import_busybox(&archive);
    let id = format!("strata-test-userns-{backend}");
    let script = "busybox stat -c '%u:%g' /etc/greeting /bin/busybox; busybox id -u; \
                  echo mine > /made; busybox stat -c '%u:%g' /made; cat /etc/greeting; \
                  cat /proc/self/uid_map";
    let output = ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        "--uidmap",
        "0:100000:65536",
        "--gidmap",
        "0:100000:65536",
        "--remap-labels",
        "strata.test/busybox:v1",
        &id,
        "/bin/sh",
        "-c",
        script,
    ]);
    let lines: Vec<String> = output
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        &lines[..6],
        &[
            "0:0",
            "0:0",
            "0",
            "0:0",
            "hello from layer 2",
            "0 100000 65536"
        ][..],
        "{output}"
    );
    // No chowned copy: without the labels containerd views the image, chowns the view and
    // commits it as a remapped layer.
    let log = serve.log();
    assert!(
        log.contains("op=\"prepare\"") && !log.contains("op=\"view\""),
        "{log}"
    );
    ctrd.ctr_ok(&["images", "rm", "--sync", "strata.test/busybox:v1"]);
    ctrd.wait_for_no_snapshots();
    // The container's idmapped mounts went with its snapshot.
    let clones = fs::read_dir(root.join("idmap"))
        .map(|d| {
            d.filter(|e| e.as_ref().unwrap().file_name() != ".lock")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(clones, 0, "idmapped mounts left under the root");
    drop(ctrd);
    serve.stop();
}

#[test]
fn containerd_runs_a_user_namespaced_container_on_overlay() {
    if !require_privileged("containerd on overlay") || !containerd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    containerd_runs_a_user_namespaced_container_on(
        "overlay",
        &dir.path().join("store"),
        dir.path(),
    );
}

#[test]
fn containerd_runs_a_user_namespaced_container_on_native() {
    if !require_privileged("containerd on native") || !containerd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    containerd_runs_a_user_namespaced_container_on("native", &dir.path().join("store"), dir.path());
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

/// `ctr ARGS` bounded: a call that takes more than 120 s is a deadlock.
fn ctr_bounded(ctrd: &Containerd, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .args(["--signal=KILL", "120", "ctr", "--address"])
        .arg(&ctrd.socket)
        .args(args)
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        None,
        "ctr {args:?} ran for 120 s: a deadlock?\ncontainerd's log:\n{}",
        fs::read_to_string(&ctrd.log).unwrap_or_default()
    );
    out
}

/// The concurrency campaign's `serve` part (RELIABILITY.md): containerd pulls, runs and
/// removes images through `strata serve` from two threads while, on the same root, this
/// process pulls and tags its own layers (under leases), exports its images and the layers
/// containerd made (each export complete or refused as gone, checked by importing it into a
/// store of its own), untags and removes its images and runs gc every few ms, and other
/// processes run `strata gc` and `strata fsck`. Every containerd call succeeds, every
/// container prints what its image holds, no export misses a layer, nothing hangs, and the
/// store is clean and empty of containerd's snapshots at the end.
#[test]
fn containerd_traffic_beside_builders_gc_and_exports() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use strata::{ErrorKind, Snapshotter};

    if !require_privileged("containerd traffic beside builders") || !containerd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (root, work) = (dir.path().join("store"), dir.path());
    let archive = busybox_image(work);
    let strata_socket = work.join("strata.sock");
    let serve = Serve::start(&root, "overlay", &strata_socket, &work.join("strata.log"));
    let ctrd = Containerd::start(&work.join("containerd"), &strata_socket);
    let s = strata::Store::open(
        &root,
        strata_overlay::OverlayBackend::open(&root, Default::default()).unwrap(),
        strata::StoreOptions::default(),
    )
    .unwrap();
    let done = AtomicBool::new(false);
    let (theirs_exported, exports, refused, pulls, gcs, runs) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    // An export either fails because what it names went away, or is complete: a store of
    // its own imports it (which checks every blob's digest and applies every layer).
    let export_checked = |name: &str, n: u64| {
        let out = work.join(format!("export-{n}"));
        match s.export(&[name], &out, &Default::default()) {
            Ok(_) => {
                let scratch = work.join(format!("scratch-{n}"));
                let other = strata::Store::open(
                    &scratch,
                    strata_native::NativeBackend::open(&scratch).unwrap(),
                    strata::StoreOptions::default(),
                )
                .unwrap();
                other
                    .import(&out, Some("checked"))
                    .unwrap_or_else(|e| panic!("the export of {name} does not import: {e}"));
                other.close().unwrap();
                fs::remove_dir_all(&scratch).unwrap();
                exports.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound) => {
                refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => panic!("export of {name}: {e}"),
        }
        let _ = fs::remove_dir_all(&out);
    };
    std::thread::scope(|sc| {
        let containerd: Vec<_> = (0..2)
            .map(|t| {
                let (ctrd, archive, runs) = (&ctrd, &archive, &runs);
                sc.spawn(move || {
                    for i in 0..4 {
                        let base = format!("strata.test/traffic-{t}-{i}");
                        let ok = |args: &[&str]| {
                            let out = ctr_bounded(ctrd, args);
                            assert!(out.status.success(), "ctr {args:?}: {}", text(&out));
                            String::from_utf8_lossy(&out.stdout).into_owned()
                        };
                        ok(&[
                            "images",
                            "import",
                            "--snapshotter",
                            "strata",
                            "--base-name",
                            &base,
                            archive.to_str().unwrap(),
                        ]);
                        let image = format!("{base}:v1");
                        let output = ok(&[
                            "run",
                            "--rm",
                            "--snapshotter",
                            "strata",
                            &image,
                            &format!("strata-traffic-{t}-{i}"),
                            "/bin/cat",
                            "/etc/greeting",
                        ]);
                        assert_eq!(output.trim(), "hello from layer 2", "{image}");
                        runs.fetch_add(1, Ordering::Relaxed);
                        ok(&["images", "rm", "--sync", &image]);
                    }
                })
            })
            .collect();
        // This process's own pulls, exports, untags and removes.
        sc.spawn(|| {
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                let lease = format!("pull-{n}");
                s.lease_create(&lease, Some(Duration::from_secs(600)))
                    .unwrap();
                let parent = (!n.is_multiple_of(3)).then(|| format!("own/{}", n - 1));
                let parent = parent.filter(|p| s.images().unwrap().iter().any(|(i, _)| i == p));
                let layer = strata_tests::LayerBuilder::new()
                    .file(&format!("own-{n}"), format!("layer {n}").as_bytes())
                    .bytes();
                let applied = s
                    .apply_layer_in(
                        Some(&lease),
                        parent.as_deref(),
                        None,
                        None,
                        &mut layer.as_slice(),
                    )
                    .unwrap_or_else(|e| panic!("apply-layer {n} on {parent:?}: {e}"));
                s.tag(&format!("own/{n}"), &applied.name)
                    .unwrap_or_else(|e| panic!("tag own/{n}: {e}"));
                s.lease_remove(&lease).unwrap();
                pulls.fetch_add(1, Ordering::Relaxed);
                export_checked(&format!("own/{n}"), n);
                if n.is_multiple_of(4) {
                    let victim = format!("own/{}", n - 2);
                    let images = s.images().unwrap();
                    if let Some((_, layer)) = images.iter().find(|(i, _)| *i == victim) {
                        s.untag(&victim).unwrap();
                        // Refused while a child or another image holds it: fine.
                        if let Err(e) = s.remove(layer) {
                            assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
                        }
                    }
                }
            }
        });
        // Exports of the layers containerd made, while containerd removes them.
        sc.spawn(|| {
            let mut n = 1_000_000u64;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                // containerd's keys are `NAMESPACE/N/CHAINID`; this process's are chainIDs.
                let theirs: Vec<String> = s
                    .list(&["kind==committed"])
                    .unwrap()
                    .into_iter()
                    .map(|i| i.name)
                    .filter(|n| !n.starts_with("sha256:"))
                    .collect();
                if let Some(name) = theirs.get(n as usize % theirs.len().max(1)) {
                    let before = exports.load(Ordering::Relaxed);
                    export_checked(name, n);
                    if exports.load(Ordering::Relaxed) > before {
                        theirs_exported.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // gc every few ms here, and strata gc / fsck processes beside.
        sc.spawn(|| {
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                i += 1;
                s.gc(false).unwrap();
                gcs.fetch_add(1, Ordering::Relaxed);
                if i.is_multiple_of(50) {
                    for args in [&["gc"][..], &["fsck"][..]] {
                        let out = Command::new("timeout")
                            .args(["--signal=KILL", "120", BIN, "--root"])
                            .arg(&root)
                            .args(args)
                            .output()
                            .unwrap();
                        assert!(out.status.success(), "strata {args:?}: {}", text(&out));
                    }
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        for c in containerd {
            let r = c.join();
            done.store(true, Ordering::Relaxed);
            if let Err(panic) = r {
                std::panic::resume_unwind(panic);
            }
        }
    });
    eprintln!(
        "{} containers ran; {} own layers pulled; {} exports complete ({} of containerd's layers), {} refused as gone; {} gc runs",
        runs.load(Ordering::Relaxed),
        pulls.load(Ordering::Relaxed),
        exports.load(Ordering::Relaxed),
        theirs_exported.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        gcs.load(Ordering::Relaxed),
    );
    assert_eq!(runs.load(Ordering::Relaxed), 8);
    assert!(exports.load(Ordering::Relaxed) > 0);
    // containerd removed what it made; the store is clean.
    ctrd.wait_for_no_snapshots();
    let report = s.fsck(false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    for (image, name) in s.images().unwrap() {
        assert_eq!(
            s.stat(&name).unwrap().kind,
            strata::Kind::Committed,
            "{image}"
        );
    }
    s.close().unwrap();
    drop(ctrd);
    serve.stop();
}
