//! Crash-reconcile and multi-process tests: real `strata` processes on one root.
//!
//! A crash is a real SIGKILL, delivered by the binary to itself at a named failpoint
//! (`STRATA_FAILPOINT`, compiled in with the `failpoints` feature). After it, the next process
//! that opens the root must find a consistent store: nothing reported committed is lost, no
//! row points at missing storage, and storage without a row is reclaimed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

mod common;
use common::{can_run, Root, BACKENDS, BIN};

#[test]
fn crash_during_prepare_leaves_a_consistent_store() {
    if !can_run("crash_during_prepare", true) {
        return;
    }
    for backend in BACKENDS {
        crash_prepare(backend);
    }
}

fn crash_prepare(backend: &'static str) {
    for fp in ["create-before-backend", "create-after-backend"] {
        let r = Root::new(backend);
        r.ok(&["prepare", "a"]);
        r.ok(&["commit", "base", "a"]);
        // A first child takes the spare base's commit may have left (btrfs), which has
        // no backend step; the crash is in the second's.
        r.ok(&["prepare", "sibling", "base"]);
        r.crash(fp, &["prepare", "k", "base"]);
        // The next process rolls the interrupted create back.
        r.fails(&["stat", "k"], "not-found");
        r.assert_consistent();
        r.ok(&["prepare", "k", "base"]);
        r.ok(&["mounts", "k"]);
        r.assert_consistent();
    }
    // Killed after the metadata commit: the snapshot exists and works — made fresh, and
    // (btrfs) taken from the spare its parent's commit left.
    let r = Root::new(backend);
    r.crash("create-after-commit", &["prepare", "k"]);
    assert_eq!(r.ok(&["stat", "k"])["kind"], "active");
    r.write("k", "f", "data");
    r.ok(&["commit", "c", "k"]);
    assert_eq!(r.read("c", "f"), "data");
    r.crash("create-after-commit", &["prepare", "k2", "c"]);
    assert_eq!(r.ok(&["stat", "k2"])["kind"], "active");
    r.write("k2", "g", "more");
    r.ok(&["commit", "c2", "k2"]);
    assert_eq!(r.read("c2", "f"), "data");
    assert_eq!(r.read("c2", "g"), "more");
    r.assert_consistent();
}

#[test]
fn crash_during_commit_loses_nothing() {
    if !can_run("crash_during_commit", true) {
        return;
    }
    for backend in BACKENDS {
        crash_commit(backend);
    }
}

fn crash_commit(backend: &'static str) {
    for fp in [
        "commit-before-backend",
        "commit-after-spare",
        "commit-after-backend",
    ] {
        let r = Root::new(backend);
        r.ok(&["prepare", "k"]);
        r.write("k", "f", "precious");
        r.crash(fp, &["commit", "c", "k"]);
        // Not reported committed: still Active, data intact, commit can be retried.
        assert_eq!(r.ok(&["stat", "k"])["kind"], "active", "{backend} {fp}");
        r.fails(&["stat", "c"], "not-found");
        r.assert_consistent();
        r.ok(&["commit", "c", "k"]);
        assert_eq!(r.read("c", "f"), "precious");
    }
    let r = Root::new(backend);
    r.ok(&["prepare", "k"]);
    r.write("k", "f", "precious");
    r.crash("commit-after-commit", &["commit", "c", "k"]);
    assert_eq!(r.ok(&["stat", "c"])["kind"], "committed");
    r.fails(&["stat", "k"], "not-found");
    assert_eq!(r.read("c", "f"), "precious");
    r.assert_consistent();
}

#[test]
fn crash_during_a_synchronous_remove_finishes_it() {
    if !can_run("crash_during_remove", true) {
        return;
    }
    for backend in BACKENDS {
        crash_remove(backend);
    }
}

fn crash_remove(backend: &'static str) {
    for fp in ["remove-before-backend", "remove-after-backend"] {
        let r = Root::new(backend);
        r.ok(&["prepare", "a"]);
        r.ok(&["commit", "base", "a"]);
        r.ok(&["prepare", "k", "base"]);
        r.crash(fp, &["--sync-remove", "remove", "k"]);
        // The row went with the journal entry; the next process removes the storage.
        r.fails(&["stat", "k"], "not-found");
        r.assert_consistent();
        assert_eq!(
            r.storage(),
            1,
            "{backend} {fp}: only base's storage is left"
        );
        r.ok(&["prepare", "k", "base"]);
    }
}

#[test]
fn crash_while_flattening_a_deep_chain_leaves_a_consistent_store() {
    if !can_run("crash_while_flattening", true) {
        return;
    }
    let r = Root::new("overlay");
    // A chain of 129 layers: a prepare on its top is the first to mount through a flattened
    // lower (of the bottom 128), and builds it.
    r.ok(&["--no-sync", "bench", "-w", "deep", "--depth", "129"]);
    let top = r
        .names()
        .into_iter()
        .find(|n| n.ends_with("/layer/128"))
        .unwrap();
    for fp in ["flatten-before-backend", "flatten-after-backend"] {
        r.crash(fp, &["prepare", "k", &top]);
        // Both the prepare and the build are rolled back.
        r.fails(&["stat", "k"], "not-found");
        assert_eq!(r.ok(&["flattened"]), serde_json::json!([]), "{fp}");
        r.assert_consistent();
    }
    r.ok(&["prepare", "k", &top]);
    let flats = r.ok(&["flattened"]);
    assert_eq!(flats[0]["depth"], 128, "{flats}");
    r.write("k", "f", "on a deep chain");
    r.ok(&["commit", "c", "k"]);
    assert_eq!(r.read("c", "f"), "on a deep chain");
    r.assert_consistent();
}

#[test]
fn removed_storage_is_reclaimed_by_cleanup() {
    if !can_run("removed_storage_is_reclaimed", false) {
        return;
    }
    for backend in BACKENDS {
        reclaim(backend);
    }
}

fn reclaim(backend: &'static str) {
    let r = Root::new(backend);
    r.ok(&["prepare", "a"]);
    r.ok(&["commit", "base", "a"]);
    r.ok(&["prepare", "b", "base"]);
    let e = r.fails(&["remove", "base"], "failed-precondition");
    assert!(e["message"].as_str().unwrap().contains("remove"), "{e}");
    assert_eq!(e["key"], "base");
    r.ok(&["remove", "b"]);
    r.ok(&["remove", "base"]);
    // `remove` is a metadata operation; the next open (here: remove base) or cleanup
    // reclaims what is left. fsck looks without repairing.
    assert_eq!(
        r.storage(),
        1,
        "base's storage stays until the next open or cleanup"
    );
    // fsck lists it, and is clean: storage awaiting cleanup is garbage, not damage (a
    // `strata fsck` after every `strata remove` must not report a problem).
    let v = r.ok(&["fsck"]);
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["orphans"].as_array().unwrap().len(), 1, "{v}");
    r.ok(&["cleanup"]);
    assert_eq!(r.storage(), 0);
    let v = r.ok(&["fsck"]);
    assert_eq!(v["clean"], true);
}

/// Several processes build chains on one root at once, and race for the same keys.
#[test]
fn many_processes_share_one_root() {
    if !can_run("many_processes_share_one_root", false) {
        return;
    }
    for backend in BACKENDS {
        many_processes(backend, 10);
    }
}

/// Four processes each build a chain of `rounds` layers and race for `rounds` keys.
fn many_processes(backend: &'static str, rounds: usize) {
    let r = Root::new(backend);
    r.ok(&["prepare", "a"]);
    r.ok(&["commit", "base", "a"]);
    let root = r.path().to_path_buf();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let root: PathBuf = root.clone();
            std::thread::spawn(move || {
                let run = |args: &[&str]| {
                    Command::new(BIN)
                        .arg("--root")
                        .arg(&root)
                        .args(["--backend", backend, "--json", "--lock-timeout", "30s"])
                        .args(args)
                        .output()
                        .unwrap()
                };
                let mut parent = "base".to_string();
                let mut race_wins = 0;
                for i in 0..rounds {
                    let key = format!("w{w}/active/{i}");
                    let name = format!("w{w}/layer/{i}");
                    let out = run(&["prepare", &key, &parent]);
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                    let out = run(&["commit", &name, &key]);
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                    parent = name;
                    // Every worker tries to create the same key: one wins.
                    let out = run(&["prepare", &format!("race/{i}"), "base"]);
                    if out.status.success() {
                        race_wins += 1;
                    } else {
                        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                        assert_eq!(v["error"]["kind"], "already-exists", "{v}");
                        assert_eq!(v["error"]["key"], format!("race/{i}"));
                    }
                }
                race_wins
            })
        })
        .collect();
    let wins: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(wins, rounds, "each raced key is created exactly once");
    let names = r.names();
    assert_eq!(names.len(), 1 + 4 * rounds + rounds);
    for w in 0..4 {
        let top = r.ok(&["stat", &format!("w{w}/layer/{}", rounds - 1)]);
        assert_eq!(top["parent"], format!("w{w}/layer/{}", rounds - 2));
    }
    r.assert_consistent();
}

#[test]
fn errors_are_one_line_naming_the_key() {
    if !can_run("errors_are_one_line", false) {
        return;
    }
    let r = Root::new("overlay");
    let out = Command::new(BIN)
        .arg("--root")
        .arg(r.path())
        .args(["stat", "no/such:key"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("\"no/such:key\"") && err.contains("not found"),
        "{err}"
    );

    // A root keeps the backend it was created with.
    r.ok(&["prepare", "x"]);
    let out = Command::new(BIN)
        .arg("--root")
        .arg(r.path())
        .args(["--backend", "native", "stat", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("overlay") && err.contains("native"), "{err}");
}

#[test]
fn images_leases_and_gc_from_the_command_line() {
    if !can_run("tracker_cli", false) {
        return;
    }
    for backend in BACKENDS {
        tracker_cli(backend);
    }
}

fn tracker_cli(backend: &'static str) {
    let r = Root::new(backend);
    r.ok(&["prepare", "a"]);
    r.ok(&["commit", "base", "a"]);
    r.ok(&["prepare", "b", "base"]);
    r.ok(&["commit", "top", "b"]);
    r.ok(&["tag", "app:1", "top"]);
    assert_eq!(r.ok(&["images"])[0]["snapshot"], "top");
    // An image name stands for its snapshot.
    r.ok(&["prepare", "c", "app:1"]);
    assert_eq!(r.ok(&["stat", "c"])["parent"], "top");
    r.ok(&["remove", "c"]);
    let e = r.fails(&["remove", "top"], "failed-precondition");
    assert!(
        e["message"].as_str().unwrap().contains("image \"app:1\""),
        "{e}"
    );

    r.ok(&["prepare", "d"]);
    r.ok(&["commit", "orphan", "d"]);
    r.ok(&["lease", "create", "build", "--expire", "1h"]);
    r.ok(&["lease", "add", "build", "orphan"]);
    assert_eq!(r.ok(&["lease", "ls"])[0]["snapshots"][0], "orphan");
    assert_eq!(
        r.ok(&["gc", "--dry-run"])["removed"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    r.ok(&["lease", "rm", "build"]);
    assert_eq!(r.ok(&["gc", "--dry-run"])["removed"][0], "orphan");
    // prepare --lease: held from its creation; no lease, no snapshot.
    let e = r.fails(&["prepare", "e", "base", "--lease", "step"], "not-found");
    assert!(e["message"].as_str().unwrap().contains("step"), "{e}");
    r.ok(&["lease", "create", "step"]);
    r.ok(&["prepare", "e", "base", "--lease", "step"]);
    let e = r.fails(&["remove", "e"], "failed-precondition");
    assert!(
        e["message"].as_str().unwrap().contains("lease \"step\""),
        "{e}"
    );
    r.ok(&["lease", "rm", "step"]);
    r.ok(&["remove", "e"]);
    r.ok(&["untag", "app:1"]);
    let gc = r.ok(&["gc"]);
    assert_eq!(gc["removed"], serde_json::json!(["orphan", "top", "base"]));
    assert!(r.names().is_empty());
    assert_eq!(r.ok(&["fsck"])["clean"], true);
}

#[test]
fn fsck_unmounts_what_a_dead_process_left_mounted() {
    if !can_run("fsck_leaked_mounts", false) {
        return;
    }
    for backend in BACKENDS {
        fsck_leaked_mount(backend);
    }
}

fn fsck_leaked_mount(backend: &'static str) {
    let r = Root::new(backend);
    r.ok(&["prepare", "a"]);
    r.ok(&["commit", "base", "a"]);
    let mounts = r.ok(&["view", "v", "base"]);
    // A temporary mount of a process that is gone.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let target = r.path().join(format!("strata-mount-{dead}-0"));
    fs::create_dir(&target).unwrap();
    let mounts: Vec<strata::Mount> = serde_json::from_value(mounts).unwrap();
    strata::mount::mount_all(&mounts, &target).unwrap();

    // Another store's repair leaves it alone: it is not that store's mount.
    let other = Root::new(backend);
    assert_eq!(
        other.ok(&["fsck", "--repair"])["leaked_mounts"],
        serde_json::json!([])
    );
    assert!(strata::mount::mount_info(&target)
        .unwrap()
        .is_some_and(|m| m.target == target));

    let out = r.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["leaked_mounts"][0], target.to_str().unwrap(), "{v}");
    let out = r.run(&["fsck", "--repair"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["repaired"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("unmounted")),
        "{v}"
    );
    assert!(strata::mount::mount_info(r.path())
        .unwrap()
        .is_none_or(|m| m.target != target));
    assert!(!target.exists(), "the mount point is removed too");
    assert_eq!(r.ok(&["fsck"])["clean"], true);
}

#[test]
fn copy_checksum_export_import_and_verify_from_the_command_line() {
    if !can_run("images_cli", false) {
        return;
    }
    for backend in BACKENDS {
        images_cli(backend);
    }
}

/// Empties `file` in the first layer of `r` found to have it, behind the store's back.
fn damage(r: &Root, file: &str) {
    let mut found = false;
    if r.backend == "devmapper" {
        // A layer is a thin device: mounted read-write with dmsetup, not strata.
        #[cfg(feature = "devmapper")]
        for id in fs::read_dir(r.storage_dir())
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str().unwrap().parse().ok())
        {
            let scratch = r.path().join("damage");
            strata_tests::with_layer_mounted(r.path(), id, &scratch, |dir| {
                if !found && dir.join(file).exists() {
                    fs::write(dir.join(file), "").unwrap();
                    found = true;
                }
            });
        }
    } else {
        for e in fs::read_dir(r.storage_dir()).unwrap() {
            let p = e.unwrap().path().join("fs").join(file);
            if p.exists() {
                fs::write(&p, "").unwrap();
                found = true;
                break;
            }
        }
    }
    assert!(found, "no layer of {} has {file}", r.path().display());
}

fn images_cli(backend: &'static str) {
    let r = Root::new(backend);
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    r.ok(&["prepare", "a"]);
    r.ok(&["mount", "a", m]);
    fs::create_dir_all(mnt.path().join("out")).unwrap();
    fs::write(mnt.path().join("out/app.bin"), "binary").unwrap();
    std::os::unix::fs::symlink("/no/such/thing", mnt.path().join("out/dangling")).unwrap();
    r.ok(&["umount", m]);
    r.ok(&["commit", "builder", "a"]);
    r.ok(&["tag", "builder:1", "builder"]);
    // COPY --from=builder:1 /out /app (the image name holds a ':').
    r.ok(&["prepare", "b"]);
    let c = r.ok(&["copy", "builder:1:/out", "b:/app"]);
    assert_eq!(
        (c["files"].as_u64(), c["symlinks"].as_u64()),
        (Some(1), Some(1))
    );
    r.ok(&["commit", "final", "b"]);
    let sum = |name: &str, path: &str| r.ok(&["checksum", name, path])["checksum"].clone();
    assert_eq!(
        sum("final", "/app"),
        sum("builder:1", "/out"),
        "same files, same checksum"
    );
    let e = r.fails(&["copy", "builder:1", "b:/app"], "invalid-argument");
    assert!(e["message"].as_str().unwrap().contains("NAME:/PATH"), "{e}");

    r.ok(&["tag", "app:1", "final"]);
    let layout = r.path().join("layout.tar");
    let l = layout.to_str().unwrap();
    let x = r.ok(&["export", "app:1", "builder:1", "-o", l, "--verify"]);
    assert_eq!(x["images"].as_array().unwrap().len(), 2);
    let fresh = Root::new(backend);
    let i = fresh.ok(&["import", l]);
    assert_eq!(i["images"].as_array().unwrap().len(), 2);
    // stat shows what is recorded of an imported layer: it is named by its chainID.
    let top = i["images"][0]["snapshot"].as_str().unwrap().to_string();
    let st = fresh.ok(&["stat", &top]);
    assert_eq!(st["layer"]["chainID"], top.as_str(), "{st}");
    assert!(st["layer"]["content"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(
        fresh.ok(&["checksum", "app:1", "/app"])["checksum"],
        sum("final", "/app")
    );
    assert_eq!(fresh.ok(&["fsck", "--verify"])["clean"], true);
    // Damage the imported COPY layer on disk: fsck --verify finds it, export refuses it.
    damage(&fresh, "app/app.bin");
    let out = fresh.run(&["fsck", "--verify"]);
    assert!(!out.status.success(), "fsck --verify exits 1");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["broken"].as_array().unwrap().len(), 1, "{v}");
    let again = fresh.path().join("again");
    fresh.fails(
        &["export", "app:1", "-o", again.to_str().unwrap()],
        "data-loss",
    );
    assert!(!again.exists());
}

/// The same tests on device-mapper thin, in the VM (tests/vm/run): crashes at every step of
/// prepare, commit and remove leave no thin id and no active device behind.
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;

    #[test]
    fn crash_during_prepare_leaves_a_consistent_store() {
        if can_run("devmapper crash_during_prepare", true) {
            crash_prepare("devmapper");
        }
    }

    #[test]
    fn crash_during_commit_loses_nothing() {
        if can_run("devmapper crash_during_commit", true) {
            crash_commit("devmapper");
        }
    }

    #[test]
    fn crash_during_a_synchronous_remove_finishes_it() {
        if can_run("devmapper crash_during_remove", true) {
            crash_remove("devmapper");
        }
    }

    #[test]
    fn removed_storage_is_reclaimed_by_cleanup() {
        if can_run("devmapper removed_storage_is_reclaimed", false) {
            reclaim("devmapper");
        }
    }

    #[test]
    fn many_processes_share_one_root() {
        if can_run("devmapper many_processes_share_one_root", false) {
            // Fewer rounds: every process start costs seconds under emulation.
            many_processes("devmapper", 4);
        }
    }

    #[test]
    fn images_leases_and_gc_from_the_command_line() {
        if can_run("devmapper images_leases_and_gc", false) {
            tracker_cli("devmapper");
        }
    }

    #[test]
    fn fsck_unmounts_what_a_dead_process_left_mounted() {
        if can_run("devmapper fsck_leaked_mount", false) {
            fsck_leaked_mount("devmapper");
        }
    }

    #[test]
    fn copy_checksum_export_import_and_verify_from_the_command_line() {
        if can_run("devmapper images_cli", false) {
            images_cli("devmapper");
        }
    }
}
