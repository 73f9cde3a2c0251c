//! The tracker's rules over a simulated backend: images, leases, gc roots, remove refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use strata::{ErrorKind, Labels, Snapshotter};

mod support;

use support::sim::open;

/// A chain `<p>0 <- <p>1 <- ... <- <p>(n-1)` of committed snapshots.
fn chain(s: &dyn Snapshotter, p: &str, n: usize) {
    let mut parent: Option<String> = None;
    for i in 0..n {
        let a = format!("{p}-active-{i}");
        s.prepare(&a, parent.as_deref(), Labels::new()).unwrap();
        s.commit(&format!("{p}{i}"), &a, Labels::new()).unwrap();
        parent = Some(format!("{p}{i}"));
    }
}

fn names(s: &dyn Snapshotter) -> Vec<String> {
    s.list(&[]).unwrap().into_iter().map(|i| i.name).collect()
}

#[test]
fn gc_keeps_what_an_image_holds_and_collects_the_rest_children_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    chain(&s, "a", 3);
    chain(&s, "b", 3);
    s.tag("app:1", "a2").unwrap();
    let dry = s.gc(true).unwrap();
    assert_eq!(
        dry.removed,
        vec!["b2", "b1", "b0"],
        "children before parents"
    );
    assert_eq!(names(&s).len(), 6, "dry run changes nothing");
    let r = s.gc(false).unwrap();
    assert_eq!(r.removed, vec!["b2", "b1", "b0"]);
    assert_eq!(r.reclaimed, 3);
    assert_eq!(names(&s), vec!["a0", "a1", "a2"]);
    assert_eq!(strata::Backend::ids(&sim).unwrap().len(), 3);

    // An image name works where a committed snapshot is expected.
    s.prepare("on-image", Some("app:1"), Labels::new()).unwrap();
    assert_eq!(s.stat("on-image").unwrap().parent.as_deref(), Some("a2"));
    s.remove("on-image").unwrap();
    s.untag("app:1").unwrap();
    assert_eq!(s.gc(false).unwrap().removed, vec!["a2", "a1", "a0"]);
    assert!(names(&s).is_empty());
}

#[test]
fn every_root_kind_holds_its_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    chain(&s, "act", 2);
    s.prepare("active", Some("act1"), Labels::new()).unwrap();
    chain(&s, "view", 2);
    s.view("v", Some("view1"), Labels::new()).unwrap();
    chain(&s, "label", 2);
    let mut info = s.stat("label1").unwrap();
    info.labels
        .insert("containerd.io/gc.root".into(), "x".into());
    s.update(&info, &["labels.containerd.io/gc.root"]).unwrap();
    chain(&s, "lease", 2);
    s.lease_create("build", None).unwrap();
    s.lease_add("build", &["lease1"]).unwrap();
    chain(&s, "gone", 2);
    let r = s.gc(false).unwrap();
    assert_eq!(r.removed, vec!["gone1", "gone0"]);
    for kept in [
        "act0", "act1", "view0", "view1", "label0", "label1", "lease0", "lease1",
    ] {
        s.stat(kept).unwrap();
    }
    s.lease_remove("build").unwrap();
    assert_eq!(s.gc(false).unwrap().removed, vec!["lease1", "lease0"]);
}

#[test]
fn expired_leases_hold_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    chain(&s, "x", 2);
    s.lease_create("short", Some(Duration::from_millis(1)))
        .unwrap();
    s.lease_add("short", &["x1"]).unwrap();
    s.lease_create("long", Some(Duration::from_secs(3600)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // An expired lease no longer protects from remove either.
    s.remove("x1").unwrap();
    chain(&s, "y", 1);
    s.lease_add("short", &["y0"]).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let r = s.gc(false).unwrap();
    assert_eq!(r.expired_leases, vec!["short"]);
    assert_eq!(r.removed, vec!["y0", "x0"]);
    let leases = s.leases().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].name, "long");
}

#[test]
fn remove_refuses_what_an_image_or_lease_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    chain(&s, "c", 2);
    s.tag("img", "c1").unwrap();
    let e = s.remove("c1").unwrap_err();
    assert_eq!(
        (e.kind(), e.key()),
        (ErrorKind::FailedPrecondition, Some("c1"))
    );
    assert!(e.to_string().contains("image \"img\""), "{e}");
    s.untag("img").unwrap();
    s.lease_create("l", None).unwrap();
    s.lease_add("l", &["c1"]).unwrap();
    let e = s.remove("c1").unwrap_err();
    assert!(e.to_string().contains("lease \"l\""), "{e}");
    s.lease_remove("l").unwrap();
    s.remove("c1").unwrap();
}

/// `prepare_in` holds the new Active in the lease from the transaction that makes it (what a
/// builder needs beside containerd's gc, which removes every snapshot it does not know); a
/// missing lease makes nothing.
#[test]
fn prepare_in_holds_the_snapshot_from_its_creation() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    chain(&s, "p", 1);
    let e = s
        .prepare_in("missing", "step", Some("p0"), Labels::new())
        .unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::NotFound, Some("missing")));
    assert!(e.to_string().contains("\"step\" was not made"), "{e}");
    assert_eq!(s.stat("step").unwrap_err().kind(), ErrorKind::NotFound);
    let stored = std::fs::read_dir(sim.dir()).unwrap().count();
    s.lease_create("build", None).unwrap();
    for (key, parent) in [("root-step", None), ("step", Some("p0"))] {
        s.prepare_in("build", key, parent, Labels::new()).unwrap();
        let e = s.remove(key).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        assert!(e.to_string().contains("lease \"build\""), "{e}");
    }
    assert_eq!(std::fs::read_dir(sim.dir()).unwrap().count(), stored + 2);
    // An expired lease holds nothing: making a snapshot in it is refused.
    s.lease_create("short", Some(std::time::Duration::from_millis(1)))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let e = s
        .prepare_in("short", "late", None, Labels::new())
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.key()),
        (ErrorKind::FailedPrecondition, Some("short"))
    );
    assert!(e.to_string().contains("expired"), "{e}");
    assert_eq!(s.stat("late").unwrap_err().kind(), ErrorKind::NotFound);
    // Committed, it stays in the lease (a commit keeps the snapshot's identity).
    s.commit("layer", "step", Labels::new()).unwrap();
    assert!(s.gc(false).unwrap().removed.is_empty());
    s.lease_remove("build").unwrap();
    s.remove("root-step").unwrap();
    assert_eq!(s.gc(false).unwrap().removed, vec!["layer", "p0"]);
}

/// A snapshot `prepare_in` made but cannot present under the ids its labels ask for is
/// removed again, out of the lease first: the caller gets the error and no snapshot.
#[test]
fn prepare_in_leaves_nothing_when_the_snapshot_cannot_be_idmapped() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    chain(&s, "p", 1);
    let stored = std::fs::read_dir(sim.dir()).unwrap().count();
    // Where the idmapped clones would go, a file: presenting the snapshot fails.
    std::fs::write(tmp.path().join("idmap"), b"").unwrap();
    s.lease_create("build", None).unwrap();
    let mut labels = Labels::new();
    labels.insert(
        strata::idmap::LABEL_UID_MAPPING.into(),
        "0:100000:65536".into(),
    );
    labels.insert(
        strata::idmap::LABEL_GID_MAPPING.into(),
        "0:100000:65536".into(),
    );
    let e = s
        .prepare_in("build", "mapped", Some("p0"), labels)
        .unwrap_err();
    assert!(
        e.to_string().contains("idmap"),
        "names where it failed: {e}"
    );
    assert_eq!(s.stat("mapped").unwrap_err().kind(), ErrorKind::NotFound);
    assert!(s.leases().unwrap()[0].snapshots.is_empty());
    s.cleanup().unwrap();
    assert_eq!(std::fs::read_dir(sim.dir()).unwrap().count(), stored);
}

#[test]
fn tracker_errors_name_what_they_are_about() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    s.prepare("act", None, Labels::new()).unwrap();
    let e = s.tag("img", "act").unwrap_err();
    assert_eq!(
        (e.kind(), e.key()),
        (ErrorKind::FailedPrecondition, Some("act"))
    );
    let e = s.tag("img", "nope").unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::NotFound, Some("nope")));
    assert_eq!(s.untag("img").unwrap_err().kind(), ErrorKind::NotFound);
    s.lease_create("l", None).unwrap();
    assert_eq!(
        s.lease_create("l", None).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    let e = s.lease_add("l", &["nope"]).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::NotFound, Some("nope")));
    let e = s.lease_add("missing", &["act"]).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::NotFound, Some("missing")));
    assert_eq!(
        s.lease_remove("missing").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let e = s
        .prepare("child", Some("no-such-image"), Labels::new())
        .unwrap_err();
    assert!(
        e.to_string().contains("neither a snapshot nor an image"),
        "{e}"
    );
}

#[test]
fn gc_beside_builders_in_other_threads_never_breaks_a_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    let s = std::sync::Arc::new(s);
    let builders: Vec<_> = (0..3)
        .map(|t| {
            let s = std::sync::Arc::clone(&s);
            std::thread::spawn(move || {
                for round in 0..10 {
                    let p = format!("t{t}r{round}-");
                    // A builder holds a lease for the duration of a build: between the commit
                    // of one layer and the prepare of the next, nothing else holds it.
                    let lease = format!("build-{p}");
                    s.lease_create(&lease, None).unwrap();
                    let mut parent: Option<String> = None;
                    for i in 0..4 {
                        let a = format!("{p}a{i}");
                        s.prepare(&a, parent.as_deref(), Labels::new()).unwrap();
                        // Leased while active: the commit keeps the snapshot (and the lease
                        // entry), so there is no moment when the new layer is unheld.
                        s.lease_add(&lease, &[&a]).unwrap();
                        s.commit(&format!("{p}{i}"), &a, Labels::new()).unwrap();
                        parent = Some(format!("{p}{i}"));
                    }
                    s.tag(&format!("t{t}"), parent.as_deref().unwrap()).unwrap();
                    s.lease_remove(&lease).unwrap();
                }
            })
        })
        .collect();
    let gc = {
        let s = std::sync::Arc::clone(&s);
        std::thread::spawn(move || {
            for _ in 0..30 {
                let r = s.gc(false).unwrap();
                assert!(r.failed.is_empty(), "{:?}", r.failed);
            }
        })
    };
    for b in builders {
        b.join().unwrap();
    }
    gc.join().unwrap();
    s.gc(false).unwrap();
    // Only the three tagged chains survive, complete.
    for t in 0..3 {
        let mut name = s.images().unwrap()[t].1.clone();
        let mut depth = 1;
        while let Some(p) = s.stat(&name).unwrap().parent {
            name = p;
            depth += 1;
        }
        assert_eq!(depth, 4);
    }
    assert_eq!(s.list(&[]).unwrap().len(), 12);
}

#[test]
fn a_guard_pins_every_layer_until_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    chain(&s, "a", 3);
    s.tag("app", "a2").unwrap();
    chain(&s, "b", 2);
    let guard = s.guard(&["app", "b1"]).unwrap();
    let layers: Vec<(&str, &str, usize)> = guard
        .layers()
        .iter()
        .map(|l| (l.image.as_str(), l.name.as_str(), l.index))
        .collect();
    assert_eq!(
        layers,
        vec![
            ("app", "a0", 0),
            ("app", "a1", 1),
            ("app", "a2", 2),
            ("b1", "b0", 0),
            ("b1", "b1", 1)
        ]
    );
    s.untag("app").unwrap();
    assert!(
        s.gc(false).unwrap().removed.is_empty(),
        "gc cannot take guarded layers"
    );
    let e = s.remove("b1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.to_string().contains("strata.io/guard/"), "{e}");
    guard.release().unwrap();
    assert_eq!(
        s.gc(false).unwrap().removed.len(),
        5,
        "released layers are collectable"
    );
}

#[test]
fn a_guard_fails_before_export_when_a_layer_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    chain(&s, "a", 3);
    s.tag("app", "a2").unwrap();
    // The storage of the middle layer disappears behind the metadata's back.
    std::fs::remove_dir_all(sim.dir().join("2")).unwrap();
    let e = s.guard(&["app"]).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::DataLoss, Some("a1")));
    let msg = e.to_string();
    assert!(
        msg.contains("layer 1 of \"app\"") && msg.contains("storage is missing"),
        "{msg}"
    );
    assert!(
        s.leases().unwrap().is_empty(),
        "nothing stays pinned after a failed guard"
    );
    // It is now known broken: the next guard fails at once, from the metadata.
    let e = s.guard(&["app"]).unwrap_err();
    assert!(e.to_string().contains("is broken"), "{e}");
    s.prepare("active", None, Labels::new()).unwrap();
    let e = s.guard(&["active"]).unwrap_err();
    assert_eq!(
        (e.kind(), e.key()),
        (ErrorKind::FailedPrecondition, Some("active"))
    );
    let e = s.guard(&["nope"]).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::NotFound, Some("nope")));
}

/// An apply-layer killed before its commit leaves its Active snapshot (held by the caller's
/// lease): recovery removes it once its process is gone, and leaves a live one's alone.
#[test]
fn recovery_removes_the_snapshot_of_a_dead_apply_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = || strata::StoreOptions {
        recover: false,
        ..Default::default()
    };
    let live = strata::Store::open(tmp.path(), support::sim::Sim::new(tmp.path()), opts()).unwrap();
    let tokens: Vec<String> = std::fs::read_dir(tmp.path().join("owners"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            name.strip_suffix(".lock").map(str::to_string)
        })
        .collect();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let (dead, alive) = (
        "strata.io/apply/dead-owner/3".to_string(),
        format!("strata.io/apply/{}/0", tokens[0]),
    );
    chain(&live, "p", 1);
    live.lease_create("pull", None).unwrap();
    // Such keys are apply-layer's own: nobody else can make one.
    let e = live
        .prepare_in("pull", &dead, Some("p0"), Labels::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("strata's own"), "{e}");
    assert_eq!(
        live.prepare(&alive, None, Labels::new())
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    // What apply-layer runs leave, made here under other keys and renamed in the database.
    let db = rusqlite::Connection::open(tmp.path().join("metadata.db")).unwrap();
    for (made, key) in [("d", &dead), ("a", &alive)] {
        live.prepare_in("pull", made, Some("p0"), Labels::new())
            .unwrap();
        db.execute("UPDATE snapshots SET key = ?1 WHERE key = ?2", [key, made])
            .unwrap();
    }
    drop(db);
    let s = strata::Store::open(tmp.path(), support::sim::Sim::new(tmp.path()), opts()).unwrap();
    let r = s.fsck(false).unwrap();
    assert_eq!(r.abandoned_applies, vec![dead.clone()], "{r:?}");
    assert!(!r.is_clean());
    let r = s.fsck(true).unwrap();
    assert!(r.failed.is_empty(), "{r:?}");
    assert!(
        r.repaired.iter().any(|l| l.contains(&dead)),
        "{:?}",
        r.repaired
    );
    assert_eq!(s.stat(&dead).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(s.stat(&alive).unwrap().kind, strata::Kind::Active);
    let leases = s.leases().unwrap();
    assert_eq!(leases[0].snapshots, vec![alive.clone()]);
    assert!(s.fsck(false).unwrap().is_clean());
}

#[test]
fn fsck_finds_and_repairs_what_a_crash_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = open(tmp.path());
        chain(&s, "a", 2);
        s.close().unwrap();
    }
    assert!(open(tmp.path()).0.fsck(false).unwrap().is_clean());
    // Storage without a row, a row without storage, a dead process's journal entry and
    // export guard.
    let sim = support::sim::Sim::new(tmp.path());
    strata::Backend::create(&sim, 50, strata::Kind::Active, &[], &Default::default()).unwrap();
    strata::Backend::create(&sim, 51, strata::Kind::Active, &[], &Default::default()).unwrap();
    std::fs::remove_dir_all(sim.dir().join("2")).unwrap();
    let db = rusqlite::Connection::open(tmp.path().join("metadata.db")).unwrap();
    db.execute_batch(
        "INSERT INTO journal (op, snapshot_id, key, parent_id, owner, started_ns)
             VALUES ('create', 51, 'interrupted', NULL, 'dead-owner', 0);
         INSERT INTO leases (name, created_ns) VALUES ('strata.io/guard/dead-owner/0', 0);
         INSERT INTO lease_snapshots (lease, snapshot_id) VALUES ('strata.io/guard/dead-owner/0', 1);",
    )
    .unwrap();
    drop(db);
    let opts = strata::StoreOptions {
        recover: false,
        ..Default::default()
    };
    let s = strata::Store::open(tmp.path(), support::sim::Sim::new(tmp.path()), opts).unwrap();
    let r = s.fsck(false).unwrap();
    assert_eq!(r.orphans, vec![50]);
    assert_eq!(r.interrupted, vec!["create interrupted"]);
    assert_eq!(r.stale_guards, vec!["strata.io/guard/dead-owner/0"]);
    assert_eq!(r.broken.len(), 1);
    assert_eq!(r.broken[0].0, "a1");
    assert!(r.repaired.is_empty() && !r.is_clean());
    assert_eq!(
        s.fsck(false).unwrap(),
        r,
        "fsck without repair changes nothing"
    );

    let r = s.fsck(true).unwrap();
    assert_eq!(r.repaired.len(), 4, "{:?}", r.repaired);
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let after = s.fsck(false).unwrap();
    assert!(after.orphans.is_empty() && after.interrupted.is_empty());
    assert!(after.stale_guards.is_empty());
    assert_eq!(
        after.broken.len(),
        1,
        "a lost layer stays reported until removed"
    );
    assert_eq!(
        strata::Backend::ids(&sim).unwrap().len(),
        1,
        "orphan and interrupted create reclaimed; a0 kept"
    );
    // Broken snapshots can be removed, and then the store is clean.
    s.remove("a1").unwrap();
    assert!(s.fsck(false).unwrap().is_clean());
}

#[test]
fn a_store_managed_by_containerd_only_reclaims_orphans() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    chain(&s, "c", 2);
    s.set_managed(true).unwrap();
    assert!(s.managed().unwrap());
    let r = s.gc(false).unwrap();
    assert!(r.managed && r.removed.is_empty());
    assert_eq!(
        names(&s),
        vec!["c0", "c1"],
        "containerd's snapshots are never removed"
    );
    s.remove("c1").unwrap();
    // A new open reclaims orphans on its own; this store sees the orphan in gc.
    assert_eq!(s.gc(false).unwrap().reclaimed, 1);
    assert_eq!(strata::Backend::ids(&sim).unwrap().len(), 1);
    s.set_managed(false).unwrap();
    assert_eq!(s.gc(false).unwrap().removed, vec!["c0"]);
}

#[test]
fn image_names_stand_for_their_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    chain(&s, "c", 2);
    s.tag("app:2", "c1").unwrap();
    assert_eq!(s.stat("app:2").unwrap().name, "c1");
    assert_eq!(s.usage("app:2").unwrap(), s.usage("c1").unwrap());
    s.view("v", Some("app:2"), Labels::new()).unwrap();
    s.tag("alias", "app:2").unwrap();
    assert_eq!(s.stat("alias").unwrap().name, "c1");
    s.lease_create("l", None).unwrap();
    s.lease_add("l", &["alias"]).unwrap();
    assert_eq!(s.leases().unwrap()[0].snapshots, vec!["c1"]);
}
