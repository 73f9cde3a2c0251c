//! Store tests over a simulated backend: the metadata, journal, filter and concurrency rules
//! that do not depend on any file system feature. The real backends run the conformance suite
//! in `tests/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod support;

use strata::filter::Filter;
use strata::{
    Backend, CreateOptions, ErrorKind, Info, JournalOp, Kind, Labels, Mount, Snapshotter, Store,
    StoreOptions, Usage,
};
use support::sim::{open, Sim, SimError};

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn errors_have_containerds_kinds_and_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    s.prepare("a", None, Labels::new()).unwrap();

    let e = s.prepare("a", None, Labels::new()).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::AlreadyExists, Some("a")));
    let e = s.view("a", None, Labels::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let e = s.prepare("b", Some("missing"), Labels::new()).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::NotFound, Some("missing")));
    assert!(e.to_string().contains("\"b\""), "names the child too: {e}");
    let e = s.prepare("b", Some("a"), Labels::new()).unwrap_err();
    assert_eq!(
        (e.kind(), e.key()),
        (ErrorKind::FailedPrecondition, Some("a"))
    );
    let e = s.prepare("", None, Labels::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = s.prepare("x\0y", None, Labels::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("x\\0y"), "{e}");

    s.view("v", None, Labels::new()).unwrap();
    let e = s.commit("vc", "v", Labels::new()).unwrap_err();
    assert_eq!(
        (e.kind(), e.key()),
        (ErrorKind::FailedPrecondition, Some("v"))
    );
    let e = s.commit("c", "nope", Labels::new()).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::NotFound, Some("nope")));
    let e = s.commit("v", "a", Labels::new()).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::AlreadyExists, Some("v")));

    s.commit("c", "a", Labels::new()).unwrap();
    s.prepare("child", Some("c"), Labels::new()).unwrap();
    let e = s.remove("c").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.to_string().contains("remove"), "{e}");
    let e = s.mounts("c").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    s.remove("child").unwrap();
    s.remove("c").unwrap();
    assert_eq!(s.stat("c").unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn keys_may_be_long_and_contain_slashes() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    let long = format!("default/12/sha256:{}", "ab".repeat(2000));
    s.prepare(&long, None, Labels::new()).unwrap();
    s.commit("default/13/../../etc", &long, Labels::new())
        .unwrap();
    assert_eq!(
        s.stat("default/13/../../etc").unwrap().kind,
        Kind::Committed
    );
}

#[test]
fn parent_chain_reaches_the_backend_immediate_parent_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    let mut parent: Option<String> = None;
    for i in 0..5 {
        s.prepare(&format!("a{i}"), parent.as_deref(), Labels::new())
            .unwrap();
        s.commit(&format!("c{i}"), &format!("a{i}"), Labels::new())
            .unwrap();
        parent = Some(format!("c{i}"));
    }
    let mounts = s.prepare("top", parent.as_deref(), Labels::new()).unwrap();
    let dir = PathBuf::from(&mounts[0].source);
    let parents = fs::read_to_string(dir.join("parents")).unwrap();
    // ids are allocated in order: c0=1 ... c4=5; the top's chain is 5,4,3,2,1.
    assert_eq!(parents, "[5, 4, 3, 2, 1]");
    assert_eq!(sim.ids().unwrap().len(), 6);
}

#[test]
fn update_follows_containerd() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    s.prepare("a", None, l(&[("x", "1"), ("y", "2")])).unwrap();
    let before = s.stat("a").unwrap();

    let mut info = before.clone();
    info.labels = l(&[("z", "3")]);
    let after = s.update(&info, &[]).unwrap();
    assert_eq!(after.labels, l(&[("z", "3")]));
    assert_eq!(after.created, before.created);
    assert!(after.updated > before.updated);

    let mut info = after.clone();
    info.labels = l(&[("w", "4")]);
    let after = s.update(&info, &["labels.w", "labels.z"]).unwrap();
    assert_eq!(
        after.labels,
        l(&[("w", "4")]),
        "z deleted because absent from info"
    );

    let mut info = after.clone();
    info.parent = Some("other".into());
    for path in ["parent", "name", "kind", "created"] {
        let e = s.update(&info, &[path]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{path}");
    }
    assert_eq!(s.stat("a").unwrap().labels, l(&[("w", "4")]));

    info.name = "missing".into();
    assert_eq!(
        s.update(&info, &[]).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn commit_labels_replace_and_usage_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    s.prepare("a", None, l(&[("x", "1")])).unwrap();
    assert_eq!(s.usage("a").unwrap(), Usage { size: 7, inodes: 1 });
    s.commit("c", "a", l(&[("y", "2")])).unwrap();
    assert_eq!(s.stat("c").unwrap().labels, l(&[("y", "2")]));
    // The sim returns the id as size at commit: the committed usage is the recorded one.
    assert_eq!(s.usage("c").unwrap(), Usage { size: 1, inodes: 1 });
}

/// The SQL evaluation of filters agrees with the in-memory one on every filter form.
#[test]
fn walk_in_sql_agrees_with_the_filter_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    s.prepare("a", None, l(&[("x", "1"), ("a.b/c", "q")]))
        .unwrap();
    s.commit("base", "a", l(&[("x", "1"), ("a.b/c", "q")]))
        .unwrap();
    s.prepare("b", Some("base"), l(&[("x", "2")])).unwrap();
    s.view("v", Some("base"), Labels::new()).unwrap();
    s.prepare("c", None, l(&[("y", "")])).unwrap();
    s.commit("base2", "c", l(&[("y", "")])).unwrap();
    s.view("v2", Some("base2"), l(&[("x", "1")])).unwrap();

    let all = s.list(&[]).unwrap();
    assert_eq!(all.len(), 5);
    let filters: &[&[&str]] = &[
        &["name==base"],
        &["name!=base"],
        &["parent==base"],
        &["parent==nope"],
        &["parent!=base"],
        &[r#"parent!="""#],
        &[r#"parent=="""#],
        &["parent"],
        &["kind==active"],
        &["kind==view"],
        &["kind!=committed"],
        &["labels.x"],
        &["labels.x==1"],
        &["labels.x!=1"],
        &["labels.y"],
        &[r#"labels.y=="""#],
        &[r#"labels."a.b/c"==q"#],
        &["name==base", "kind==view"],
        &["kind==view,labels.x==1"],
        &["name", "labels.nope"],
        &[""],
    ];
    for f in filters {
        let want: Vec<String> = all
            .iter()
            .filter(|i| Filter::parse_all(f).unwrap().matches(i))
            .map(|i| i.name.clone())
            .collect();
        let got: Vec<String> = s.list(f).unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(got, want, "filter {f:?}");
    }
    let e = s.list(&["name~=a"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn stat_inside_walk_does_not_deadlock() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    for i in 0..3 {
        s.prepare(&format!("k{i}"), None, Labels::new()).unwrap();
    }
    let mut seen: Vec<Info> = Vec::new();
    s.walk(&[], &mut |info| {
        assert_eq!(&s.stat(&info.name)?, info);
        s.prepare(&format!("{}-child", info.name), None, Labels::new())?;
        seen.push(info.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(seen.len(), 3);
}

#[test]
fn remove_is_fast_and_cleanup_reclaims_even_past_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    for i in 0..4 {
        s.prepare(&format!("k{i}"), None, Labels::new()).unwrap();
    }
    for i in 0..4 {
        s.remove(&format!("k{i}")).unwrap();
    }
    assert_eq!(sim.ids().unwrap().len(), 4, "storage stays until cleanup");
    sim.fail_remove.lock().unwrap().insert(2);
    let report = s.cleanup_report().unwrap();
    assert_eq!(report.reclaimed, vec![1, 3, 4]);
    assert_eq!(report.failed.len(), 1);
    assert!(s.cleanup().is_err(), "cleanup reports the failure");
    sim.fail_remove.lock().unwrap().clear();
    assert_eq!(s.cleanup_report().unwrap().reclaimed, vec![2]);
    assert!(sim.ids().unwrap().is_empty());
    // Keys are reusable and get fresh ids.
    s.prepare("k0", None, Labels::new()).unwrap();
    assert_eq!(sim.ids().unwrap(), vec![5]);
}

#[test]
fn sync_remove_deletes_storage_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = Sim::new(tmp.path());
    let opts = StoreOptions {
        sync_remove: true,
        ..StoreOptions::default()
    };
    let s = Store::open(tmp.path(), sim.clone(), opts).unwrap();
    s.prepare("a", None, Labels::new()).unwrap();
    s.remove("a").unwrap();
    assert!(sim.ids().unwrap().is_empty());
}

#[test]
fn a_failed_create_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    *sim.fail_create.lock().unwrap() = true;
    let e = s.prepare("a", None, Labels::new()).unwrap_err();
    assert_eq!(e.key(), Some("a"));
    assert!(e.to_string().contains("injected create failure"), "{e}");
    *sim.fail_create.lock().unwrap() = false;
    assert_eq!(s.stat("a").unwrap_err().kind(), ErrorKind::NotFound);
    s.prepare("a", None, Labels::new()).unwrap();
}

#[test]
fn a_dead_processes_journal_is_rolled_back_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = open(tmp.path());
        s.prepare("kept", None, Labels::new()).unwrap();
        s.close().unwrap();
    }
    // Simulate a process that died after the backend created id 99 for "lost" but before the
    // row was written: its journal entry names an owner whose lock file is gone.
    let sim = Sim::new(tmp.path());
    sim.create(99, Kind::Active, &[], &CreateOptions::default())
        .unwrap();
    let db = rusqlite::Connection::open(tmp.path().join("metadata.db")).unwrap();
    db.execute(
        "INSERT INTO journal (op, snapshot_id, key, parent_id, owner, started_ns)
         VALUES ('create', 99, 'lost', NULL, 'dead-owner', 0)",
        [],
    )
    .unwrap();
    drop(db);
    let (s, sim) = open(tmp.path());
    assert_eq!(
        sim.ids().unwrap(),
        vec![1],
        "storage of the interrupted create is gone"
    );
    assert_eq!(s.stat("lost").unwrap_err().kind(), ErrorKind::NotFound);
    s.prepare("lost", None, Labels::new()).unwrap();
}

#[test]
fn a_live_processes_journal_entry_reserves_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    let (other, _) = open(tmp.path());
    // Another live store has an operation in flight on "busy-key".
    let db = rusqlite::Connection::open(tmp.path().join("metadata.db")).unwrap();
    let owner: String = fs::read_dir(tmp.path().join("owners"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .trim_end_matches(".lock")
                .to_string()
        })
        .next()
        .unwrap();
    db.execute(
        "INSERT INTO journal (op, snapshot_id, key, parent_id, owner, started_ns)
         VALUES ('create', 500, 'busy-key', NULL, ?1, 0)",
        [&owner],
    )
    .unwrap();
    let e = s.prepare("busy-key", None, Labels::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    s.cleanup().unwrap();
    let e = other.prepare("busy-key", None, Labels::new()).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::AlreadyExists,
        "cleanup left the live entry alone"
    );
}

#[test]
fn the_recorded_backend_must_match() {
    let tmp = tempfile::tempdir().unwrap();
    drop(open(tmp.path()));
    assert_eq!(
        Store::<Sim>::recorded_backend(tmp.path())
            .unwrap()
            .as_deref(),
        Some("sim")
    );

    struct Other(Sim);
    impl Backend for Other {
        type Error = SimError;
        fn name(&self) -> &'static str {
            "other"
        }
        fn create(&self, i: u64, k: Kind, p: &[u64], o: &CreateOptions) -> Result<(), SimError> {
            self.0.create(i, k, p, o)
        }
        fn commit(&self, i: u64, p: &[u64], d: bool) -> Result<Usage, SimError> {
            self.0.commit(i, p, d)
        }
        fn mounts(&self, i: u64, k: Kind, p: &[u64]) -> Result<Vec<Mount>, SimError> {
            self.0.mounts(i, k, p)
        }
        fn view_mounts(&self, c: &[u64]) -> Result<Vec<Mount>, SimError> {
            self.0.view_mounts(c)
        }
        fn remove(&self, i: u64) -> Result<(), SimError> {
            self.0.remove(i)
        }
        fn usage(&self, i: u64) -> Result<Usage, SimError> {
            self.0.usage(i)
        }
        fn ids(&self) -> Result<Vec<u64>, SimError> {
            self.0.ids()
        }
    }
    let e = Store::open(
        tmp.path(),
        Other(Sim::new(tmp.path())),
        StoreOptions::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("\"sim\""), "{e}");
}

#[test]
fn a_locked_database_gives_a_busy_error_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = Sim::new(tmp.path());
    let opts = StoreOptions {
        lock_timeout: Duration::from_millis(200),
        ..StoreOptions::default()
    };
    let s = Store::open(tmp.path(), sim, opts).unwrap();
    let mut db = rusqlite::Connection::open(tmp.path().join("metadata.db")).unwrap();
    let tx = db
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let e = s.prepare("k", None, Labels::new()).unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::Busy, Some("k")));
    assert!(e.to_string().contains("lock timeout"), "{e}");
    drop(tx);
    s.prepare("k", None, Labels::new()).unwrap();
}

#[test]
fn close_twice_and_use_after_close() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    s.close().unwrap();
    s.close().unwrap();
    assert_eq!(s.stat("a").unwrap_err().kind(), ErrorKind::Closed);
}

#[test]
fn many_threads_share_one_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = open(tmp.path());
    let s = Arc::new(s);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut parent: Option<String> = None;
                for i in 0..25 {
                    let key = format!("t{t}/a{i}");
                    let name = format!("t{t}/c{i}");
                    s.prepare(&key, parent.as_deref(), Labels::new()).unwrap();
                    s.commit(&name, &key, Labels::new()).unwrap();
                    parent = Some(name);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.list(&["kind==committed"]).unwrap().len(), 200);
    assert_eq!(s.stat("t3/c24").unwrap().parent.as_deref(), Some("t3/c23"));
}

#[test]
fn a_newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    drop(open(tmp.path()));
    let db = rusqlite::Connection::open(tmp.path().join("metadata.db")).unwrap();
    db.pragma_update(None, "user_version", 99).unwrap();
    drop(db);
    let e = Store::open(tmp.path(), Sim::new(tmp.path()), StoreOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("newer strata"), "{e}");
}

#[test]
fn journal_ops_round_trip() {
    for op in [JournalOp::Create, JournalOp::Commit, JournalOp::Remove] {
        assert_eq!(JournalOp::parse(op.as_str()), Some(op));
    }
}

/// Stores that open, work and close on one root at the same time never take each other for
/// dead (an owner's lock must never be visible unlocked).
#[test]
fn stores_opening_concurrently_never_roll_back_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    drop(open(tmp.path()));
    let root = tmp.path().to_path_buf();
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let root = root.clone();
            std::thread::spawn(move || {
                for i in 0..30 {
                    let (s, sim) = open(&root);
                    let key = format!("t{t}/a{i}");
                    let mounts = s.prepare(&key, None, Labels::new()).unwrap();
                    assert!(
                        Path::new(&mounts[0].source).exists(),
                        "storage of {key} was rolled back by another store"
                    );
                    s.commit(&format!("t{t}/c{i}"), &key, Labels::new())
                        .unwrap();
                    assert!(sim.ids().unwrap().len() > i);
                    s.close().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (s, sim) = open(&root);
    assert_eq!(s.list(&["kind==committed"]).unwrap().len(), 180);
    assert_eq!(sim.ids().unwrap().len(), 180, "every row has its storage");
}

/// Every read-only view the store mounts to read layers (a diff's parent and layer, a
/// checksum, a copy's source) is released to the backend once unmounted, also when the read
/// fails: devmapper deactivates the device it made for it then.
#[test]
fn read_only_views_are_released_after_every_read() {
    if !support::can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (s, sim) = open(tmp.path());
    let outstanding = || sim.views.lock().unwrap().clone();
    s.prepare("a-active", None, Labels::new()).unwrap();
    s.commit("a", "a-active", Labels::new()).unwrap();
    s.prepare("b-active", Some("a"), Labels::new()).unwrap();
    s.commit("b", "b-active", Labels::new()).unwrap();

    let (_, stats, _) = s
        .diff(
            "b",
            &strata::layer::diff::DiffOptions::default(),
            std::io::sink(),
        )
        .unwrap();
    assert!(stats.entries > 0, "{stats:?}");
    assert_eq!(outstanding(), Vec::<Vec<u64>>::new(), "after a diff");

    s.checksum("b", &[], &[]).unwrap();
    assert_eq!(outstanding(), Vec::<Vec<u64>>::new(), "after a checksum");
    let e = s.checksum("b", &["/missing"], &[]).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    assert_eq!(
        outstanding(),
        Vec::<Vec<u64>>::new(),
        "after a failed checksum"
    );

    s.prepare("c-active", None, Labels::new()).unwrap();
    s.copy("a", &["/parents"], "c-active", "/p", &Default::default())
        .unwrap();
    assert_eq!(outstanding(), Vec::<Vec<u64>>::new(), "after a copy");
    let e = s
        .copy("a", &["/missing"], "c-active", "/q", &Default::default())
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    assert_eq!(outstanding(), Vec::<Vec<u64>>::new(), "after a failed copy");
}
