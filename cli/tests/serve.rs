//! `strata serve` as a process: its socket (mode 0600, a stale one replaced, a live one or a
//! file that is not a socket left alone), one server per store, the CLI usable beside it, the
//! store marked containerd-managed, and SIGTERM/SIGINT stopping it cleanly.

#![cfg(feature = "containerd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_strata");

/// A running `strata serve`.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(root: &Path, socket: &Path) -> Server {
        let child = Command::new(BIN)
            .arg("--root")
            .arg(root)
            .args(["--backend", "native", "serve", "--address"])
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = Server {
            child,
            socket: socket.to_path_buf(),
        };
        // Listening means: the server's own socket is there (a stale one at that path is
        // replaced: another file, though maybe with the inode number the stale one freed)
        // and takes connections. Connecting alone could reach the stale socket while a child
        // forked by another test thread, before its exec, still holds the listener it was
        // made with.
        let identity = || {
            std::fs::symlink_metadata(socket)
                .ok()
                .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
        };
        let stale = identity();
        let listening = || {
            let now = identity();
            now.is_some() && now != stale && UnixStream::connect(socket).is_ok()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !listening() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("strata serve exited with {status} before listening");
            }
            assert!(
                Instant::now() < deadline,
                "strata serve did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// Sends `signal` and returns what the server printed; it must exit 0 and take its socket
    /// with it.
    fn stop_with(mut self, signal: rustix::process::Signal) -> String {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).unwrap();
        let out = wait_with_timeout(&mut self.child, Duration::from_secs(30));
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "strata serve after {signal:?}: {}: {log}",
            out.status
        );
        assert!(
            !self.socket.exists(),
            "the socket is removed on shutdown: {log}"
        );
        log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr).unwrap();
    }
    Output {
        status: child.wait().unwrap(),
        stdout: Vec::new(),
        stderr: stderr.into_bytes(),
    }
}

fn strata(root: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `strata serve` expecting a refusal; returns its message.
fn refused(root: &Path, socket: &Path) -> String {
    let out = Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(["--backend", "native", "serve", "--address"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve should have refused to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_owns_its_socket_and_its_store_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let socket = dir.path().join("run/strata.sock");
    let server = Server::start(&root, &socket);
    let md = std::fs::metadata(&socket).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(
        md.permissions().mode() & 0o777,
        0o600,
        "only its owner may connect"
    );

    // One server per store, whatever the socket.
    let msg = refused(&root, &dir.path().join("other.sock"));
    assert!(
        msg.contains("another `strata serve`") && msg.contains(&server.child.id().to_string()),
        "{msg}"
    );
    assert!(!dir.path().join("other.sock").exists());

    // The CLI works beside it, on a store containerd now manages: gc removes nothing.
    let out = strata(&root, &["prepare", "cli-key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = strata(&root, &["commit", "cli-layer", "cli-key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = strata(&root, &["--json", "gc"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["managed"], true, "{report}");
    let out = strata(&root, &["ls"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cli-layer"),
        "gc of a containerd-managed store keeps every snapshot"
    );

    let log = server.stop_with(rustix::process::Signal::TERM);
    assert!(log.contains("SIGTERM") && log.contains("stopped"), "{log}");

    // The lock went with the process: the store can be served again, and SIGINT stops it too.
    let server = Server::start(&root, &socket);
    let log = server.stop_with(rustix::process::Signal::INT);
    assert!(log.contains("SIGINT"), "{log}");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_or_a_file_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");

    // Left by a server that died: a socket file nobody listens on.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = Server::start(&root, &stale);
    server.stop_with(rustix::process::Signal::TERM);

    // Someone else listens there: refused, their socket untouched.
    let live = dir.path().join("live.sock");
    let listener = UnixListener::bind(&live).unwrap();
    let msg = refused(&root, &live);
    assert!(
        msg.contains("already listening") && msg.contains("live.sock"),
        "{msg}"
    );
    assert!(
        UnixStream::connect(&live).is_ok(),
        "the other listener still works"
    );
    drop(listener);

    // Not a socket at all: refused, the file untouched.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let msg = refused(&root, &file);
    assert!(
        msg.contains("not a socket") && msg.contains("notes.txt"),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn a_server_stopped_the_moment_it_listens_still_exits_cleanly() {
    // containerd's suite stops a server right after connecting: the signal handlers must be
    // in place before the socket appears.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let socket = dir.path().join("s.sock");
    for _ in 0..10 {
        Server::start(&root, &socket).stop_with(rustix::process::Signal::TERM);
    }
}
