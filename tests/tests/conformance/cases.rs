//! The 21 cases of containerd's snapshotter test suite, written once; `conformance.rs` and
//! `conformance_legacy.rs` run them against the backends.
//!
//! As in containerd, the umask is 0, every case gets a fresh root and a work directory, and
//! mounted trees are compared with a flat directory built by applying the same changes.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use strata::{ErrorKind, Info, Kind, Labels, Snapshotter};
use strata_tests::{apply, check_directory_equal, require_privileged, Mounted, Op};

const GC_ROOT: &str = "containerd.io/gc.root";

/// containerd's suite passes this label to every call.
pub fn opt() -> Labels {
    Labels::from([(GC_ROOT.to_string(), "2026-01-01T00:00:00Z".to_string())])
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn key(work: &Path, name: &str) -> String {
    work.join(name).to_string_lossy().into_owned()
}

/// Prepares `name` on `parent` and mounts it on `work/name`.
pub fn prepare_mount(
    s: &dyn Snapshotter,
    work: &Path,
    name: &str,
    parent: Option<&str>,
) -> (String, Mounted) {
    let k = key(work, name);
    let mounts = s.prepare(&k, parent, opt()).unwrap();
    assert!(!mounts.is_empty(), "expected mounts to have entries");
    let m = Mounted::new(&mounts, Path::new(&k));
    (k, m)
}

/// containerd's `checkSnapshots`: each applier becomes a layer on the previous one; after
/// each, the mounted layer equals the flat directory; finally a view of the top equals it.
pub fn check_snapshots(s: &dyn Snapshotter, work: &Path, layers: &[Vec<Op>]) {
    let flat = work.join("flat");
    fs::create_dir_all(&flat).unwrap();
    let mut parent: Option<String> = None;
    for (i, ops) in layers.iter().enumerate() {
        let (k, m) = prepare_mount(s, work, &format!("preparing-{i}"), parent.as_deref());
        apply(m.path(), ops).unwrap();
        apply(&flat, ops).unwrap();
        check_directory_equal(m.path(), &flat)
            .unwrap_or_else(|d| panic!("layer {i} differs from the flat copy:\n{d}"));
        m.unmount();
        let committed = key(work, &format!("committed-{i}"));
        s.commit(&committed, &k, opt()).unwrap();
        parent = Some(committed);
    }
    let view = key(work, "view");
    let mounts = s.view(&view, parent.as_deref(), opt()).unwrap();
    let m = Mounted::new(&mounts, &work.join("view-mount"));
    check_directory_equal(m.path(), &flat)
        .unwrap_or_else(|d| panic!("the view of the top differs from the flat copy:\n{d}"));
}

// 1. Basic
pub fn basic(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let initial = vec![
        Op::CreateFile("/foo", b"foo\n".to_vec(), 0o777),
        Op::CreateDir("/a", 0o755),
        Op::CreateDir("/a/b", 0o755),
        Op::CreateDir("/a/b/c", 0o755),
    ];
    let diff = vec![
        Op::CreateFile("/bar", b"bar\n".to_vec(), 0o777),
        Op::CreateFile("/foo", b"bar\n".to_vec(), 0o777),
        Op::RemoveAll("/a/b"),
    ];
    let (preparing, m) = prepare_mount(s, work, "preparing", None);
    apply(m.path(), &initial).unwrap();
    // containerd commits while the active snapshot is still mounted.
    let committed = key(work, "committed");
    s.commit(&committed, &preparing, opt()).unwrap();
    m.unmount();
    let si = s.stat(&committed).unwrap();
    assert_eq!(si.parent, None);
    assert_eq!(si.kind, Kind::Committed);
    let e = s.stat(&preparing).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::NotFound,
        "{preparing} should be gone after commit"
    );

    let (next, m) = prepare_mount(s, work, "nextlayer", Some(&committed));
    let expected = work.join("expected-1");
    fs::create_dir(&expected).unwrap();
    apply(&expected, &[Op::Base]).unwrap();
    apply(&expected, &initial).unwrap();
    check_directory_equal(m.path(), &expected).unwrap();
    apply(m.path(), &diff).unwrap();
    let ni = s.stat(&next).unwrap();
    assert_eq!(ni.parent.as_deref(), Some(committed.as_str()));
    assert_eq!(ni.kind, Kind::Active);
    let next_committed = key(work, "committed-next");
    s.commit(&next_committed, &next, opt()).unwrap();
    m.unmount();
    let si2 = s.stat(&next_committed).unwrap();
    assert_eq!(si2.parent.as_deref(), Some(committed.as_str()));
    assert_eq!(si2.kind, Kind::Committed);
    assert_eq!(s.stat(&next).unwrap_err().kind(), ErrorKind::NotFound);

    let mut walked: BTreeMap<String, Info> = BTreeMap::new();
    s.walk(&[], &mut |i| {
        walked.insert(i.name.clone(), i.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(
        walked.get(&si.name),
        Some(&si),
        "walk returns exactly what stat returns"
    );
    assert_eq!(walked.get(&si2.name), Some(&si2));

    let nextnext = key(work, "nextnextlayer");
    let mounts = s.view(&nextnext, Some(&next_committed), opt()).unwrap();
    let m = Mounted::new(&mounts, Path::new(&nextnext));
    apply(&expected, &diff).unwrap();
    check_directory_equal(m.path(), &expected).unwrap();
    m.unmount();
    s.remove(&nextnext).unwrap();
    let e = s.remove(&committed).unwrap_err();
    assert!(e.to_string().contains("remove"), "{e}");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(e.key(), Some(committed.as_str()));
    s.remove(&next_committed).unwrap();
    s.remove(&committed).unwrap();
}

// 2. StatActive
pub fn stat_active(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, m) = prepare_mount(s, work, "preparing", None);
    fs::write(m.path().join("foo"), "foo\n").unwrap();
    let si = s.stat(&preparing).unwrap();
    assert_eq!(si.name, preparing);
    assert_eq!(si.kind, Kind::Active);
    assert_eq!(si.parent, None);
}

// 3. StatCommitted
pub fn stat_committed(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, m) = prepare_mount(s, work, "preparing", None);
    fs::write(m.path().join("foo"), "foo\n").unwrap();
    let committed = key(work, "committed");
    s.commit(&committed, &preparing, opt()).unwrap();
    let si = s.stat(&committed).unwrap();
    assert_eq!(si.name, committed);
    assert_eq!(si.kind, Kind::Committed);
    assert_eq!(si.parent, None);
}

// 4. Transitivity
pub fn transitivity(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, m) = prepare_mount(s, work, "preparing", None);
    fs::write(m.path().join("foo"), "foo\n").unwrap();
    let snap_a = key(work, "snapA");
    s.commit(&snap_a, &preparing, opt()).unwrap();
    let (next, m2) = prepare_mount(s, work, "next", Some(&snap_a));
    fs::write(m2.path().join("foo"), "foo bar\n").unwrap();
    let snap_b = key(work, "snapB");
    s.commit(&snap_b, &next, opt()).unwrap();
    let si_a = s.stat(&snap_a).unwrap();
    let si_b = s.stat(&snap_b).unwrap();
    let si_parent_b = s.stat(si_b.parent.as_deref().unwrap()).unwrap();
    assert_eq!(si_a.parent, None);
    assert_eq!(si_b.parent.as_deref(), Some(snap_a.as_str()));
    assert_eq!(si_parent_b.parent, None);
    drop((m, m2));
}

// 5. PrepareView
pub fn prepare_view(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, _m) = prepare_mount(s, work, "preparing", None);
    let snap_a = key(work, "snapA");
    s.commit(&snap_a, &preparing, opt()).unwrap();

    let new_layer = key(work, "newlayer");
    s.prepare(&new_layer, Some(&snap_a), opt()).unwrap();
    let e = s.view(&new_layer, Some(&snap_a), opt()).unwrap_err();
    assert_eq!(
        (e.kind(), e.key()),
        (ErrorKind::AlreadyExists, Some(new_layer.as_str()))
    );

    let prep_layer = key(work, "prepLayer");
    s.prepare(&prep_layer, Some(&snap_a), opt()).unwrap();
    let e = s.prepare(&prep_layer, Some(&snap_a), opt()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);

    let view_layer = key(work, "viewLayer");
    s.view(&view_layer, Some(&snap_a), opt()).unwrap();
    let e = s.view(&view_layer, Some(&snap_a), opt()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
}

/// containerd's `baseTestSnapshots`: c1 <- c2 <- a1, a2, v1 (of c2), v2 (no parent).
pub fn base_test_snapshots(s: &dyn Snapshotter) {
    s.prepare("c1-a", None, opt()).unwrap();
    s.commit("c1", "c1-a", opt()).unwrap();
    s.prepare("c2-a", Some("c1"), opt()).unwrap();
    s.commit("c2", "c2-a", opt()).unwrap();
    s.prepare("a1", Some("c2"), opt()).unwrap();
    s.prepare("a2", None, opt()).unwrap();
    s.view("v1", Some("c2"), opt()).unwrap();
    s.view("v2", None, opt()).unwrap();
}

// 6. Update
pub fn update(s: &dyn Snapshotter, _work: &Path, _backend: &str) {
    let t1 = SystemTime::now();
    base_test_snapshots(s);
    let t2 = SystemTime::now();
    let cases = [
        ("c1", Kind::Committed, None),
        ("c2", Kind::Committed, Some("c1")),
        ("a1", Kind::Active, Some("c2")),
        ("a2", Kind::Active, None),
        ("v1", Kind::View, Some("c2")),
        ("v2", Kind::View, None),
    ];
    for (name, kind, parent) in cases {
        let mut st = s.stat(name).unwrap();
        assert!(
            st.created >= t1 && st.created <= t2,
            "{name}: created time out of range"
        );
        assert_eq!(st.created, st.updated, "{name}: updated must equal created");
        assert_eq!(
            (st.kind, st.parent.as_deref(), st.name.as_str()),
            (kind, parent, name)
        );

        let created = st.created;
        let root_time = "2026-11-24T00:00:00Z";
        let expected = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            (GC_ROOT, root_time),
        ]);
        st.parent = Some("doesnotexist".into());
        st.labels = expected.clone();
        let u1 = SystemTime::now();
        let st2 = s.update(&st, &[]).unwrap();
        let u2 = SystemTime::now();
        assert_eq!(st2.created, created, "{name}: created kept");
        assert!(
            st2.updated >= u1 && st2.updated <= u2,
            "{name}: updated bumped"
        );
        assert_eq!(
            (st2.kind, st2.parent.as_deref(), st2.name.as_str()),
            (kind, parent, name)
        );
        assert_eq!(st2.labels, expected);

        let mut st = st2;
        st.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let st3 = s.update(&st, &["labels.l1", "labels.l2"]).unwrap();
        assert_eq!(
            st3.labels,
            labels(&[("l1", "updated"), ("l3", "v3"), (GC_ROOT, root_time)])
        );

        let mut st = st3;
        let expected = labels(&[("l4", "v4"), (GC_ROOT, root_time)]);
        st.labels = expected.clone();
        let st4 = s.update(&st, &["labels"]).unwrap();
        assert_eq!(st4.labels, expected);

        let mut st = st4;
        st.parent = Some("doesnotexist".into());
        let e = s.update(&st, &["parent"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{name}: {e}");
    }
}

// 7. Remove
pub fn remove(s: &dyn Snapshotter, _work: &Path, _backend: &str) {
    s.prepare("committed-a", None, opt()).unwrap();
    s.commit("committed-1", "committed-a", opt()).unwrap();
    s.prepare("reuse-1", Some("committed-1"), opt()).unwrap();
    s.remove("reuse-1").unwrap();
    s.view("reuse-1", Some("committed-1"), opt()).unwrap();
    s.remove("reuse-1").unwrap();
    s.prepare("reuse-1", None, opt()).unwrap();
    s.remove("committed-1").unwrap();
    s.commit("committed-1", "reuse-1", opt()).unwrap();
}

// 8. Walk
pub fn walk(s: &dyn Snapshotter, _work: &Path, _backend: &str) {
    let o = || labels(&[(GC_ROOT, "check-walk")]);
    s.prepare("a-np", None, o()).unwrap();
    s.prepare("p-tmp", None, o()).unwrap();
    s.commit("p", "p-tmp", o()).unwrap();
    s.prepare("a", Some("p"), o()).unwrap();
    s.view("v", Some("p"), o()).unwrap();
    s.prepare("p-wl-tmp", None, o()).unwrap();
    s.commit(
        "p-wl",
        "p-wl-tmp",
        labels(&[("l", "1"), (GC_ROOT, "check-walk")]),
    )
    .unwrap();
    s.prepare(
        "a-wl",
        Some("p-wl"),
        labels(&[("l", "2"), (GC_ROOT, "check-walk")]),
    )
    .unwrap();
    s.view(
        "v-wl",
        Some("p-wl"),
        labels(&[("l", "3"), (GC_ROOT, "check-walk")]),
    )
    .unwrap();
    s.prepare(
        "a-np-wl",
        None,
        labels(&[("l", "2"), (GC_ROOT, "check-walk")]),
    )
    .unwrap();

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["a-np", "a", "a-wl", "a-np-wl"],
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["v", "v-wl"],
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["p", "p-wl"],
            &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p", "a-np-wl"], &["name==p", "name==a-np-wl"]),
        (&["a-wl"], &["name==a-wl,labels.l"]),
        (&["a", "v"], &["parent==p"]),
        (
            &["a", "v", "a-wl", "v-wl"],
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p-wl", "a-wl", "v-wl", "a-np-wl"], &["labels.l"]),
        (&["a-wl", "a-np-wl"], &["labels.l==2"]),
    ];
    for (i, (want, filters)) in cases.iter().enumerate() {
        let mut got = Vec::new();
        s.walk(filters, &mut |info| {
            got.push(info.name.clone());
            Ok(())
        })
        .unwrap();
        got.sort();
        let mut want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "walk case {i}: {filters:?}");
    }
    let e = s.walk(&["name=="], &mut |_| Ok(())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

// 9. LayerFileUpdate
pub fn layer_file_update(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let l1 = vec![
        Op::CreateDir("/etc", 0o700),
        Op::CreateFile("/etc/hosts", b"mydomain 10.0.0.1".to_vec(), 0o644),
        Op::CreateFile("/etc/profile", b"PATH=/usr/bin".to_vec(), 0o644),
        Op::Base,
    ];
    let l2 = vec![
        Op::CreateFile("/etc/hosts", b"mydomain 10.0.0.2".to_vec(), 0o644),
        Op::CreateFile("/etc/profile", b"PATH=/usr/bin".to_vec(), 0o666),
        Op::CreateDir("/root", 0o700),
        Op::CreateFile("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin".to_vec(), 0o644),
    ];
    // Five runs, each starting on a new second, as containerd does.
    for i in 0..5 {
        let w = work.join(format!("run-{i}"));
        fs::create_dir_all(&w).unwrap();
        check_snapshots(s, &w, &[l1.clone(), l2.clone()]);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_nanos(
            1_000_000_000 - u64::from(now.subsec_nanos()),
        ));
    }
}

// 10. RemoveDirectoryInLowerLayer
pub fn remove_directory_in_lower_layer(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    check_snapshots(
        s,
        work,
        &[
            vec![
                Op::CreateDir("/lib", 0o700),
                Op::CreateFile("/lib/hidden", vec![], 0o644),
                Op::Base,
            ],
            vec![
                Op::RemoveAll("/lib"),
                Op::CreateDir("/lib", 0o700),
                Op::CreateFile("/lib/not-hidden", vec![], 0o644),
            ],
            vec![Op::CreateFile("/lib/newfile", vec![], 0o644)],
        ],
    );
}

// 11. Chown
pub fn chown(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    check_snapshots(
        s,
        work,
        &[
            vec![
                Op::CreateDir("/opt", 0o700),
                Op::CreateDir("/opt/a", 0o700),
                Op::CreateDir("/opt/a/b", 0o700),
                Op::CreateFile("/opt/a/b/file.txt", b"hello".to_vec(), 0o644),
            ],
            vec![
                Op::Chown("/opt", 1, 1),
                Op::Chown("/opt/a", 1, 1),
                Op::Chown("/opt/a/b", 1, 1),
                Op::Chown("/opt/a/b/file.txt", 1, 1),
            ],
        ],
    );
}

// 12. DirectoryPermissionOnCommit
pub fn directory_permission_on_commit(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    check_snapshots(
        s,
        work,
        &[
            vec![
                Op::CreateDir("/dir1", 0o700),
                Op::CreateDir("/dir2", 0o700),
                Op::CreateDir("/dir3", 0o700),
                Op::CreateDir("/dir4", 0o700),
                Op::CreateFile("/dir4/f1", b"...".to_vec(), 0o644),
                Op::CreateDir("/dir5", 0o700),
                Op::CreateFile("/dir5/f1", b"...".to_vec(), 0o644),
                Op::Chown("/dir1", 1, 1),
                Op::Chown("/dir2", 1, 1),
                Op::Chown("/dir3", 1, 1),
                Op::Chown("/dir5", 1, 1),
                Op::Chown("/dir5/f1", 1, 1),
            ],
            vec![
                Op::Chown("/dir2", 0, 0),
                Op::RemoveAll("/dir3"),
                Op::Chown("/dir4", 1, 1),
                Op::Chown("/dir4/f1", 1, 1),
            ],
            vec![
                Op::CreateDir("/dir3", 0o700),
                Op::Chown("/dir3", 1, 1),
                Op::RemoveAll("/dir5"),
                Op::CreateDir("/dir5", 0o700),
                Op::Chown("/dir5", 1, 1),
            ],
        ],
    );
}

// 13. RemoveIntermediateSnapshot
pub fn remove_intermediate_snapshot(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (base, m) = prepare_mount(s, work, "base", None);
    let committed_base = key(work, "committed-base");
    s.commit(&committed_base, &base, opt()).unwrap();
    m.unmount();
    let intermediate = key(work, "intermediate");
    s.prepare(&intermediate, Some(&committed_base), opt())
        .unwrap();
    let committed_inter = key(work, "committed-inter");
    s.commit(&committed_inter, &intermediate, opt()).unwrap();
    let top = key(work, "toplayer");
    s.prepare(&top, Some(&committed_inter), opt()).unwrap();
    let e = s.remove(&committed_inter).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::FailedPrecondition,
        "intermediate layer removal should fail"
    );
    s.remove(&top).unwrap();
    s.remove(&committed_inter).unwrap();
    s.remove(&committed_base).unwrap();
}

// 14. DeletedFilesInChildSnapshot
pub fn deleted_files_in_child_snapshot(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    check_snapshots(
        s,
        work,
        &[
            vec![
                Op::CreateFile("/foo", b"foo\n".to_vec(), 0o777),
                Op::CreateFile("/foobar", b"foobar\n".to_vec(), 0o777),
            ],
            vec![Op::RemoveAll("/foobar")],
            vec![],
        ],
    );
}

// 15. MoveFileFromLowerLayer
pub fn move_file_from_lower_layer(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    check_snapshots(
        s,
        work,
        &[
            vec![
                Op::CreateDir("/dir1", 0o700),
                Op::CreateFile("/dir1/f1", b"Hello".to_vec(), 0o644),
                Op::CreateDir("dir2", 0o700),
                Op::CreateFile("dir2/f2", b"...".to_vec(), 0o644),
            ],
            vec![
                Op::CreateDir("/dir3", 0o700),
                Op::CreateFile("/dir3/f1", b"Hello".to_vec(), 0o644),
                Op::RemoveAll("/dir1"),
                Op::Link("dir2/f2", "dir3/f2"),
                Op::RemoveAll("dir2/f2"),
            ],
        ],
    );
}

// 16. ViewReadonly
pub fn view_readonly(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let preparing = key(work, "preparing");
    s.prepare(&preparing, None, opt()).unwrap();
    let committed = key(work, "committed");
    s.commit(&committed, &preparing, opt()).unwrap();
    let view = key(work, "view");
    let mounts = s.view(&view, Some(&committed), opt()).unwrap();
    // Checking the options is not enough: mount for real.
    let m = Mounted::new(&mounts, &work.join("view-mount"));
    let e = fs::write(m.path().join("testfile"), "testcontent").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error()),
        "{e}"
    );
    m.unmount();
    s.remove(&view).unwrap();
    s.remove(&committed).unwrap();
}

// 17. StatInWalk
pub fn stat_in_walk(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let prefix = "stats-in-walk-";
    let c1 = format!("{prefix}c1");
    let c2 = format!("{prefix}c2");
    let mounts = s.prepare(&format!("{c1}-a"), None, opt()).unwrap();
    let m = Mounted::new(&mounts, &work.join("c1-a"));
    apply(m.path(), &[Op::Base]).unwrap();
    m.unmount();
    s.commit(&c1, &format!("{c1}-a"), opt()).unwrap();
    s.prepare(&format!("{c2}-a"), Some(&c1), opt()).unwrap();
    s.commit(&c2, &format!("{c2}-a"), opt()).unwrap();
    s.prepare(&format!("{prefix}a1"), Some(&c2), opt()).unwrap();
    s.view(&format!("{prefix}v1"), Some(&c2), opt()).unwrap();
    let mut checked = 0;
    s.walk(&[], &mut |si| {
        if !si.name.starts_with(prefix) {
            return Ok(());
        }
        let si2 = s.stat(&si.name)?;
        assert_eq!(si, &si2);
        checked += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(checked, 4);
}

// 18. CloseTwice
pub fn close_twice(s: &dyn Snapshotter, _work: &Path, _backend: &str) {
    let n = "closeTwice";
    let prepare = format!("{n}-prepare");
    s.prepare(&prepare, None, opt()).unwrap();
    s.commit(n, &prepare, opt()).unwrap();
    s.remove(n).unwrap();
    s.close().unwrap();
    s.close().unwrap();
}

// 19. RootPermission
pub fn root_permission(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (_k, m) = prepare_mount(s, work, "preparing", None);
    let mode = fs::metadata(m.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "expected 0755, got 0{mode:o}");
}

// 20. Rename
pub fn rename(s: &dyn Snapshotter, work: &Path, backend: &str) {
    if backend.starts_with("overlay") {
        // Renaming a directory that comes from a lower layer needs overlayfs's redirect_dir,
        // which strata (like containerd) does not enable: containerd skips this case on
        // overlay too. The rest of the case is covered by the other backends.
        eprintln!("Rename: not run on overlay (needs redirect_dir, as in containerd)");
        return;
    }
    check_snapshots(
        s,
        work,
        &[
            vec![
                Op::CreateDir("/dir1", 0o700),
                Op::CreateDir("/somefiles", 0o700),
                Op::CreateFile("/somefiles/f1", b"was here first!".to_vec(), 0o644),
                Op::CreateFile("/somefiles/f2", b"nothing interesting".to_vec(), 0o644),
                Op::Base,
            ],
            vec![
                Op::Rename("/dir1", "/dir2"),
                Op::CreateFile("/somefiles/f1-overwrite", b"new content 1".to_vec(), 0o644),
                Op::Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
                Op::Rename("/somefiles/f2", "/somefiles/f3"),
            ],
        ],
    );
}

// 21. 128LayersMount
pub fn layers_128_mount(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let mut appliers = vec![vec![
        Op::CreateFile("/bottom", b"way at the bottom\n".to_vec(), 0o777),
        Op::CreateFile("/overwriteme", b"FIRST!\n".to_vec(), 0o777),
        Op::CreateDir("/ADDHERE", 0o755),
        Op::CreateDir("/ONLYME", 0o755),
        Op::CreateFile("/ONLYME/bottom", b"bye!\n".to_vec(), 0o777),
    ]];
    for i in 1..=127 {
        appliers.push(vec![
            Op::CreateFile(
                "/overwriteme",
                format!("{i} WAS HERE!\n").into_bytes(),
                0o777,
            ),
            Op::CreateFileOwned(format!("/ADDHERE/file-{i}"), b"same\n".to_vec(), 0o755),
            Op::RemoveAll("/ONLYME"),
            Op::CreateDir("/ONLYME", 0o755),
            Op::CreateFileOwned(format!("/ONLYME/file-{i}"), b"only me!\n".to_vec(), 0o777),
        ]);
    }
    // Each layer equals the flat copy when mounted, and a view of the top equals it too.
    check_snapshots(s, work, &appliers);
}

/// Runs `case` in a fresh root with the umask cleared, as containerd's suite does.
pub fn run(
    backend: &str,
    case: fn(&dyn Snapshotter, &Path, &str),
    open: fn(&Path) -> Box<dyn Snapshotter>,
) {
    if !require_privileged(&format!("the {backend} conformance suite")) {
        return;
    }
    rustix::process::umask(rustix::fs::Mode::empty());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&work).unwrap();
    let s = open(&root);
    case(&*s, &work, backend);
    s.close().unwrap();
}

/// Instantiates every case as a `#[test]` in module `$backend`, opening stores with `$open`.
macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            fn open(root: &Path) -> Box<dyn Snapshotter> {
                let f: fn(&Path) -> Box<dyn Snapshotter> = $open;
                f(root)
            }

            conformance!(@cases $backend;
                basic, stat_active, stat_committed, transitivity, prepare_view, update, remove,
                walk, layer_file_update, remove_directory_in_lower_layer, chown,
                directory_permission_on_commit, remove_intermediate_snapshot,
                deleted_files_in_child_snapshot, move_file_from_lower_layer, view_readonly,
                stat_in_walk, close_twice, root_permission, rename, layers_128_mount);
        }
    };
    (@cases $backend:ident; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                run(stringify!($backend), super::$case, open);
            }
        )*
    };
}
