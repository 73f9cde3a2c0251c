//! The 21 cases of containerd's snapshotter test suite (`core/snapshots/testsuite` in
//! containerd 2.x: `testsuite.go`, `issues.go`, `helpers.go`), written once against
//! [`Snapshotter`]; `conformance.rs` (and `conformance_legacy.rs`) instantiate them per backend
//! with [`conformance!`].
//!
//! As in containerd: the umask is 0; every case gets a fresh temporary directory with `root/`
//! (the store) and `work/` (keys, mount points, flat copies); keys are absolute paths under
//! `work/` (so they contain `/`); every call carries a `containerd.io/gc.root` label; layer
//! contents are built by applying the same changes to a mounted snapshot and to a flat
//! directory, and every committed layer is checked through a View against the flat copy.
//!
//! Where containerd only checks that a call failed, these cases also check the error kind and
//! that the error names the key; those additions are marked "strata:" below.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use strata::{Error, ErrorKind, Info, Kind, Labels, Mount, Snapshotter};
use strata_tests::{
    apply, check_directory_equal, check_directory_equal_with_applier, require_privileged,
    require_root, Mounted, Op,
};

/// containerd's garbage-collection root label.
pub const GC_ROOT: &str = "containerd.io/gc.root";

/// containerd's `opt`: the labels every call of the suite passes.
pub fn opt() -> Labels {
    labels(&[(GC_ROOT, "2026-01-01T00:00:00Z")])
}

/// A label map from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `filepath.Join(work, name)`, as a key.
fn key(work: &Path, name: &str) -> String {
    work.join(name).to_string_lossy().into_owned()
}

/// `os.MkdirAll(path, 0777)`.
fn mkdir_all(path: &Path) {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o777)
        .create(path)
        .unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

/// A random number, for containerd's `rand.Int()` in generated names.
fn random() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// strata: the error kind is `kind` and the error names `key`.
#[track_caller]
fn assert_error(e: &Error, kind: ErrorKind, key: &str) {
    assert_eq!(e.kind(), kind, "unexpected error kind: {e}");
    assert_eq!(e.key(), Some(key), "the error does not carry the key: {e}");
}

/// containerd's `snapshotterPrepareMount`: prepares `work/name` on `parent` and mounts it on
/// the directory of the same name.
fn prepare_mount(
    s: &dyn Snapshotter,
    name: &str,
    parent: Option<&str>,
    work: &Path,
) -> (String, Mounted) {
    let preparing = key(work, name);
    mkdir_all(Path::new(&preparing));
    let mounts = s
        .prepare(&preparing, parent, opt())
        .unwrap_or_else(|e| panic!("prepare {preparing}: {e}"));
    assert!(!mounts.is_empty(), "expected mounts to have entries");
    let m = Mounted::new(&mounts, Path::new(&preparing));
    (preparing, m)
}

/// containerd's `applyToMounts`: mounts on a temporary directory of `work`, applies, unmounts.
fn apply_to_mounts(mounts: &[Mount], work: &Path, ops: &[Op]) -> Result<(), String> {
    let td = tempfile::Builder::new()
        .prefix("prepare")
        .tempdir_in(work)
        .map_err(|e| format!("failed to create temp dir: {e}"))?;
    let m = Mounted::try_new(mounts, td.path()).map_err(|e| format!("failed to mount: {e}"))?;
    let applied = apply(m.path(), ops);
    m.try_unmount()
        .map_err(|e| format!("failed to unmount: {e}"))?;
    applied.map_err(|e| format!("{e}"))
}

/// containerd's `createSnapshot`: a new Committed snapshot with `ops` applied on `parent`.
fn create_snapshot(
    s: &dyn Snapshotter,
    parent: Option<&str>,
    work: &Path,
    ops: &[Op],
) -> Result<String, String> {
    let n = format!("{:p}-{}", ops.as_ptr(), random());
    let prepare = format!("{n}-prepare");
    let mounts = s
        .prepare(&prepare, parent, opt())
        .map_err(|e| format!("failed to prepare snapshot: {e}"))?;
    apply_to_mounts(&mounts, work, ops).map_err(|e| format!("failed to apply: {e}"))?;
    s.commit(&n, &prepare, opt())
        .map_err(|e| format!("failed to commit: {e}"))?;
    Ok(n)
}

/// containerd's `checkSnapshot`: a View of `name`, mounted, equals the directory `check`.
fn check_snapshot(
    s: &dyn Snapshotter,
    work: &Path,
    name: &str,
    check: &Path,
) -> Result<(), String> {
    let td = tempfile::Builder::new()
        .prefix("check")
        .tempdir_in(work)
        .map_err(|e| format!("failed to create temp dir: {e}"))?;
    let view = format!("{name}-view");
    let mounts = s
        .view(&view, Some(name), opt())
        .map_err(|e| format!("failed to create view: {e}"))?;
    let compared = Mounted::try_new(&mounts, td.path())
        .map_err(|e| format!("failed to mount: {e}"))
        .and_then(|m| {
            let r = check_directory_equal(check, m.path())
                .map_err(|e| format!("check directory failed: {e}"));
            m.try_unmount()
                .map_err(|e| format!("failed to unmount view: {e}"))?;
            r
        });
    let removed = s
        .remove(&view)
        .map_err(|e| format!("failed to remove view: {e}"));
    compared.and(removed)
}

/// containerd's `checkSnapshots`: each applier becomes a Committed layer on the previous one;
/// after each, the same applier is applied to one flat directory and a View of the new layer
/// must equal it.
fn check_snapshots(s: &dyn Snapshotter, work: &Path, layers: &[Vec<Op>]) -> Result<(), String> {
    let flat = tempfile::Builder::new()
        .prefix("flat")
        .tempdir_in(work)
        .map_err(|e| format!("failed to create temp dir: {e}"))?;
    let mut parent: Option<String> = None;
    for (i, ops) in layers.iter().enumerate() {
        let n = create_snapshot(s, parent.as_deref(), work, ops)
            .map_err(|e| format!("failed to create snapshot {}: {e}", i + 1))?;
        apply(flat.path(), ops)
            .map_err(|e| format!("failed to apply to check directory on {}: {e}", i + 1))?;
        check_snapshot(s, work, &n, flat.path())
            .map_err(|e| format!("snapshot check failed on snapshot {}: {e}", i + 1))?;
        parent = Some(n);
    }
    Ok(())
}

#[track_caller]
fn must(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("Check snapshots failed: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// testsuite.go

/// Basic: the whole workflow of a snapshotter.
pub fn basic(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let initial = vec![
        Op::CreateFile("/foo", b"foo\n".to_vec(), 0o777),
        Op::CreateDir("/a", 0o755),
        Op::CreateDir("/a/b", 0o755),
        Op::CreateDir("/a/b/c", 0o755),
    ];
    let diff = vec![
        Op::CreateFile("/bar", b"bar\n".to_vec(), 0o777),
        // also, change content of foo to bar
        Op::CreateFile("/foo", b"bar\n".to_vec(), 0o777),
        Op::RemoveAll("/a/b"),
    ];

    let (preparing, m) = prepare_mount(s, "preparing", None, work);
    apply(m.path(), &initial).unwrap();
    // unmount before commit
    m.unmount();

    let committed = key(work, "committed");
    s.commit(&committed, &preparing, opt()).unwrap();

    let si = s.stat(&committed).unwrap();
    assert_eq!(si.parent, None);
    assert_eq!(si.kind, Kind::Committed);
    assert_eq!(si.name, committed);

    let e = s
        .stat(&preparing)
        .expect_err("the active snapshot should no longer be available after commit");
    assert_error(&e, ErrorKind::NotFound, &preparing);

    let (next, m) = prepare_mount(s, "nextlayer", Some(&committed), work);
    check_directory_equal_with_applier(m.path(), &initial, work).unwrap_or_else(|d| {
        panic!("the child of {committed} does not show the parent's content:\n{d}")
    });
    apply(m.path(), &diff).unwrap();
    // unmount before commit
    m.unmount();

    let ni = s.stat(&next).unwrap();
    assert_eq!(ni.parent.as_deref(), Some(committed.as_str()));
    assert_eq!(ni.kind, Kind::Active);

    let next_committed = key(work, "committed-next");
    s.commit(&next_committed, &next, opt()).unwrap();

    let si2 = s.stat(&next_committed).unwrap();
    assert_eq!(si2.parent.as_deref(), Some(committed.as_str()));
    assert_eq!(si2.kind, Kind::Committed);

    let e = s
        .stat(&next)
        .expect_err("the active snapshot should no longer be available after commit");
    assert_error(&e, ErrorKind::NotFound, &next);

    // Walk returns exactly what stat returns (walk is not ordered).
    let expected: BTreeMap<String, Info> =
        BTreeMap::from([(si.name.clone(), si), (si2.name.clone(), si2)]);
    let mut walked: BTreeMap<String, Info> = BTreeMap::new();
    s.walk(&[], &mut |info| {
        walked.insert(info.name.clone(), info.clone());
        Ok(())
    })
    .unwrap();
    for (name, want) in &expected {
        let got = walked
            .get(name)
            .unwrap_or_else(|| panic!("Missing stat for {name}"));
        assert_eq!(got, want, "walk and stat disagree on {name}");
    }

    let nextnext = key(work, "nextnextlayer");
    mkdir_all(Path::new(&nextnext));
    let mounts = s.view(&nextnext, Some(&next_committed), opt()).unwrap();
    let m = Mounted::new(&mounts, Path::new(&nextnext));
    let union: Vec<Op> = initial.iter().chain(&diff).cloned().collect();
    let r = check_directory_equal_with_applier(m.path(), &union, work);
    m.unmount();
    r.unwrap_or_else(|d| panic!("the view of {next_committed} is not the union:\n{d}"));
    s.remove(&nextnext).unwrap();

    let e = s
        .remove(&committed)
        .expect_err("removing a snapshot that has a child must fail");
    assert!(e.to_string().contains("remove"), "{e}");
    assert_error(&e, ErrorKind::FailedPrecondition, &committed); // strata

    s.remove(&next_committed).unwrap();
    s.remove(&committed).unwrap();
}

/// StatActive: a prepared snapshot is Active, named by its key, without parent.
pub fn stat_active(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, m) = prepare_mount(s, "preparing", None, work);
    fs::write(m.path().join("foo"), "foo\n").unwrap();
    let si = s.stat(&preparing).unwrap();
    assert_eq!(si.name, preparing);
    assert_eq!(si.kind, Kind::Active);
    assert_eq!(si.parent, None);
}

/// StatCommitted: a committed snapshot is Committed, named by its name, without parent.
/// (containerd commits while the active snapshot is still mounted here.)
pub fn stat_committed(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, m) = prepare_mount(s, "preparing", None, work);
    fs::write(m.path().join("foo"), "foo\n").unwrap();
    let committed = key(work, "committed");
    s.commit(&committed, &preparing, opt()).unwrap();
    let si = s.stat(&committed).unwrap();
    assert_eq!(si.name, committed);
    assert_eq!(si.kind, Kind::Committed);
    assert_eq!(si.parent, None);
    drop(m);
}

/// Transitivity: given A <- B, parent(B) = A and parent(A) is none.
pub fn transitivity(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, m) = prepare_mount(s, "preparing", None, work);
    fs::write(m.path().join("foo"), "foo\n").unwrap();
    m.unmount();
    let snap_a = key(work, "snapA");
    s.commit(&snap_a, &preparing, opt()).unwrap();

    let (next, m) = prepare_mount(s, "next", Some(&snap_a), work);
    fs::write(m.path().join("foo"), "foo bar\n").unwrap();
    m.unmount();
    let snap_b = key(work, "snapB");
    s.commit(&snap_b, &next, opt()).unwrap();

    let si_a = s.stat(&snap_a).unwrap();
    let si_b = s.stat(&snap_b).unwrap();
    let parent_b = si_b.parent.as_deref().expect("snapB has a parent");
    let si_parent_b = s.stat(parent_b).unwrap();

    assert_eq!(si_a.parent, None);
    assert_eq!(si_b.parent.as_deref(), Some(snap_a.as_str()));
    assert_eq!(si_parent_b.parent, None);
}

/// PrepareView: a key cannot be reused: prepare then view, prepare twice, view twice.
pub fn prepare_view(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, m) = prepare_mount(s, "preparing", None, work);
    m.unmount();
    let snap_a = key(work, "snapA");
    s.commit(&snap_a, &preparing, opt()).unwrap();

    // Prepare & View with same key
    let new_layer = key(work, "newlayer");
    s.prepare(&new_layer, Some(&snap_a), opt()).unwrap();
    let e = s
        .view(&new_layer, Some(&snap_a), opt())
        .expect_err("view with the key of an active snapshot must fail");
    assert_error(&e, ErrorKind::AlreadyExists, &new_layer); // strata

    // Two Prepare with same key
    let prep_layer = key(work, "prepLayer");
    s.prepare(&prep_layer, Some(&snap_a), opt()).unwrap();
    let e = s
        .prepare(&prep_layer, Some(&snap_a), opt())
        .expect_err("a second prepare with the same key must fail");
    assert_error(&e, ErrorKind::AlreadyExists, &prep_layer); // strata

    // Two View with same key
    let view_layer = key(work, "viewLayer");
    s.view(&view_layer, Some(&snap_a), opt()).unwrap();
    let e = s
        .view(&view_layer, Some(&snap_a), opt())
        .expect_err("a second view with the same key must fail");
    assert_error(&e, ErrorKind::AlreadyExists, &view_layer); // strata

    // strata: the failed calls left the snapshots as they were.
    assert_eq!(s.stat(&new_layer).unwrap().kind, Kind::Active);
    assert_eq!(s.stat(&prep_layer).unwrap().kind, Kind::Active);
    assert_eq!(s.stat(&view_layer).unwrap().kind, Kind::View);
}

/// containerd's `baseTestSnapshots`: c1 <- c2 <- {a1, v1}, and a2, v2 without parent.
fn base_test_snapshots(s: &dyn Snapshotter) -> strata::Result<()> {
    s.prepare("c1-a", None, opt())?;
    s.commit("c1", "c1-a", opt())?;
    s.prepare("c2-a", Some("c1"), opt())?;
    s.commit("c2", "c2-a", opt())?;
    s.prepare("a1", Some("c2"), opt())?;
    s.prepare("a2", None, opt())?;
    s.view("v1", Some("c2"), opt())?;
    s.view("v2", None, opt())?;
    Ok(())
}

/// Update: created/updated times; label replacement, partial update, `labels` update; an
/// immutable field path is InvalidArgument.
pub fn update(s: &dyn Snapshotter, _work: &Path, _backend: &str) {
    let t1 = SystemTime::now();
    base_test_snapshots(s).unwrap_or_else(|e| panic!("Failed to create base snapshots: {e}"));
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
        let st = s
            .stat(name)
            .unwrap_or_else(|e| panic!("Failed to stat {name}: {e}"));
        assert!(
            st.created >= t1 && st.created <= t2,
            "({name}) wrong created time {:?}: expected between {t1:?} and {t2:?}",
            st.created
        );
        assert_eq!(
            st.created, st.updated,
            "({name}) unexpected updated time: expected the created time"
        );
        assert_eq!(st.kind, kind, "({name}) unexpected kind");
        assert_eq!(st.parent.as_deref(), parent, "({name}) unexpected parent");
        assert_eq!(st.name, name, "({name}) unexpected name");

        let created_at = st.created;
        let root_time = "2026-11-24T00:00:00Z";
        let expected = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            // Keep root label
            (GC_ROOT, root_time),
        ]);
        let mut st = st;
        st.parent = Some("doesnotexist".into());
        st.labels = expected.clone();
        let u1 = SystemTime::now();
        let st = s
            .update(&st, &[])
            .unwrap_or_else(|e| panic!("Failed to update {name}: {e}"));
        let u2 = SystemTime::now();
        assert_eq!(st.created, created_at, "({name}) wrong created time");
        assert!(
            st.updated >= u1 && st.updated <= u2,
            "({name}) wrong updated time {:?}: expected between {u1:?} and {u2:?}",
            st.updated
        );
        assert_eq!(st.kind, kind, "({name}) unexpected kind");
        assert_eq!(st.parent.as_deref(), parent, "({name}) unexpected parent");
        assert_eq!(st.name, name, "({name}) unexpected name");
        assert_eq!(st.labels, expected, "({name}) labels");

        let expected = labels(&[("l1", "updated"), ("l3", "v3"), (GC_ROOT, root_time)]);
        let mut st = st;
        st.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let st = s
            .update(&st, &["labels.l1", "labels.l2"])
            .unwrap_or_else(|e| panic!("Failed to update {name}: {e}"));
        assert_eq!(
            st.labels, expected,
            "({name}) labels after a partial update"
        );

        let expected = labels(&[("l4", "v4"), (GC_ROOT, root_time)]);
        let mut st = st;
        st.labels = expected.clone();
        let st = s
            .update(&st, &["labels"])
            .unwrap_or_else(|e| panic!("Failed to update {name}: {e}"));
        assert_eq!(st.labels, expected, "({name}) labels after a labels update");

        // Test failure received when providing immutable field path
        let mut st = st;
        st.parent = Some("doesnotexist".into());
        let e = s
            .update(&st, &["parent"])
            .expect_err("Expected error updating with immutable field path");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "({name}) {e}");
        // strata: the error names the field path and the snapshot.
        let msg = e.to_string();
        assert!(
            msg.contains("parent") && msg.contains(name),
            "({name}) {msg}"
        );
        // strata: and changed nothing.
        let now = s.stat(name).unwrap();
        assert_eq!(
            now.parent.as_deref(),
            parent,
            "({name}) parent after a refused update"
        );
        assert_eq!(
            now.labels, expected,
            "({name}) labels after a refused update"
        );
    }
}

/// Remove: keys and names can be reused once removed.
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
    // strata: the reused name is the new snapshot.
    let info = s.stat("committed-1").unwrap();
    assert_eq!((info.kind, info.parent), (Kind::Committed, None));
    assert_error(
        &s.stat("reuse-1").unwrap_err(),
        ErrorKind::NotFound,
        "reuse-1",
    );
}

/// ViewReadonly: writing into a mounted View fails. containerd accepts any error ("EROFS is
/// expected but can be other error code"); strata requires EROFS.
pub fn view_readonly(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let preparing = key(work, "preparing");
    s.prepare(&preparing, None, opt()).unwrap();
    let committed = key(work, "committed");
    s.commit(&committed, &preparing, opt()).unwrap();
    let view = key(work, "view");
    let mounts = s.view(&view, Some(&committed), opt()).unwrap();
    let view_mount_point = work.join("view-mount");
    mkdir_all(&view_mount_point);

    // Just checking the option string of m is not enough, we need to test real mount. (#1368)
    let m = Mounted::new(&mounts, &view_mount_point);
    let testfile = view_mount_point.join("testfile");
    let written = fs::write(&testfile, "testcontent");
    m.unmount();
    let e = written.expect_err("write to a view should fail (EROFS) but did not fail");
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error()),
        "write to {} failed with {e}, expected EROFS",
        testfile.display()
    );
    s.remove(&view).unwrap();
    s.remove(&committed).unwrap();
}

/// MoveFileFromLowerLayer: a hardlink to a lower file, then the lower file and directory
/// removed.
pub fn move_file_from_lower_layer(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let l1 = vec![
        Op::CreateDir("/dir1", 0o700),
        Op::CreateFile("/dir1/f1", b"Hello".to_vec(), 0o644),
        Op::CreateDir("dir2", 0o700),
        Op::CreateFile("dir2/f2", b"...".to_vec(), 0o644),
    ];
    let l2 = vec![
        Op::CreateDir("/dir3", 0o700),
        Op::CreateFile("/dir3/f1", b"Hello".to_vec(), 0o644),
        Op::RemoveAll("/dir1"),
        Op::Link("dir2/f2", "dir3/f2"),
        Op::RemoveAll("dir2/f2"),
    ];
    must(check_snapshots(s, work, &[l1, l2]));
}

/// DeletedFilesInChildSnapshot: a file deleted in a layer stays deleted in the next ones.
pub fn deleted_files_in_child_snapshot(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let l1 = vec![
        Op::CreateFile("/foo", b"foo\n".to_vec(), 0o777),
        Op::CreateFile("/foobar", b"foobar\n".to_vec(), 0o777),
    ];
    let l2 = vec![Op::RemoveAll("/foobar")];
    let l3 = vec![];
    must(check_snapshots(s, work, &[l1, l2, l3]));
}

/// RemoveIntermediateSnapshot: a snapshot with a child cannot be removed; top-down works.
pub fn remove_intermediate_snapshot(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (base, m) = prepare_mount(s, "base", None, work);
    m.unmount();
    let committed_base = key(work, "committed-base");
    s.commit(&committed_base, &base, opt()).unwrap();

    // Create intermediate layer
    let intermediate = key(work, "intermediate");
    s.prepare(&intermediate, Some(&committed_base), opt())
        .unwrap();
    let committed_inter = key(work, "committed-inter");
    s.commit(&committed_inter, &intermediate, opt()).unwrap();

    // Create top layer
    let top_layer = key(work, "toplayer");
    s.prepare(&top_layer, Some(&committed_inter), opt())
        .unwrap();

    // Deletion of intermediate layer must fail.
    let e = s
        .remove(&committed_inter)
        .expect_err("intermediate layer removal should fail.");
    assert_error(&e, ErrorKind::FailedPrecondition, &committed_inter); // strata
                                                                       // strata: the bottom one too.
    let e = s
        .remove(&committed_base)
        .expect_err("base layer removal should fail.");
    assert_error(&e, ErrorKind::FailedPrecondition, &committed_base);

    // Removal from toplayer to base should not fail.
    s.remove(&top_layer).unwrap();
    s.remove(&committed_inter).unwrap();
    s.remove(&committed_base).unwrap();
}

/// CloseTwice: closing twice is fine.
pub fn close_twice(s: &dyn Snapshotter, _work: &Path, _backend: &str) {
    let n = format!("closeTwice-{}", random());
    let prepare = format!("{n}-prepare");
    // do some dummy ops to modify the snapshotter internal state
    s.prepare(&prepare, None, opt()).unwrap();
    s.commit(&n, &prepare, opt()).unwrap();
    s.remove(&n).unwrap();
    s.close()
        .unwrap_or_else(|e| panic!("The first close failed: {e}"));
    s.close()
        .unwrap_or_else(|e| panic!("The second close failed: {e}"));
}

/// RootPermission: the root of a fresh parentless snapshot is 0755 (the umask is 0).
pub fn root_permission(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let (preparing, m) = prepare_mount(s, "preparing", None, work);
    let mode = fs::metadata(&preparing).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "expected 0755, got 0{mode:o}");
    drop(m);
}

/// 128LayersMount: a chain of 128 layers, each checked against a flat copy before and after
/// its change while mounted, and a View of the top at the end.
pub fn layers_128_mount(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let lowest = vec![
        Op::CreateFile("/bottom", b"way at the bottom\n".to_vec(), 0o777),
        Op::CreateFile("/overwriteme", b"FIRST!\n".to_vec(), 0o777),
        Op::CreateDir("/addhere", 0o755),
        Op::CreateDir("/onlyme", 0o755),
        Op::CreateFile("/onlyme/bottom", b"bye!\n".to_vec(), 0o777),
    ];
    let mut appliers = vec![lowest];
    for i in 1..=127 {
        appliers.push(vec![
            Op::CreateFile(
                "/overwriteme",
                format!("{i} WAS HERE!\n").into_bytes(),
                0o777,
            ),
            Op::CreateFileOwned(format!("/addhere/file-{i}"), b"same\n".to_vec(), 0o755),
            Op::RemoveAll("/onlyme"),
            Op::CreateDir("/onlyme", 0o755),
            Op::CreateFileOwned(format!("/onlyme/file-{i}"), b"only me!\n".to_vec(), 0o777),
        ]);
    }

    let flat = work.join("flat");
    mkdir_all(&flat);

    let mut parent: Option<String> = None;
    for (i, applier) in appliers.iter().enumerate() {
        let preparing = key(work, &format!("prepare-layer-{i}"));
        mkdir_all(Path::new(&preparing));
        let mounts = s
            .prepare(&preparing, parent.as_deref(), opt())
            .unwrap_or_else(|e| panic!("[layer {i}] failed to get mount info: {e}"));
        let m = Mounted::try_new(&mounts, Path::new(&preparing)).unwrap_or_else(|e| {
            panic!("[layer {i}] failed to mount on the target({preparing}): {e}")
        });
        check_directory_equal(&flat, m.path()).unwrap_or_else(|d| {
            panic!("[layer {i}] preparing doesn't equal to flat before apply: {d}")
        });
        apply(&flat, applier)
            .unwrap_or_else(|e| panic!("[layer {i}] failed to apply on flat dir: {e}"));
        apply(m.path(), applier)
            .unwrap_or_else(|e| panic!("[layer {i}] failed to apply on preparing dir: {e}"));
        check_directory_equal(&flat, m.path()).unwrap_or_else(|d| {
            panic!("[layer {i}] preparing doesn't equal to flat after apply: {d}")
        });
        m.unmount();

        let committed = key(work, &format!("committed-{i}"));
        s.commit(&committed, &preparing, opt())
            .unwrap_or_else(|e| panic!("[layer {i}] failed to commit the preparing: {e}"));
        parent = Some(committed);
    }

    let view = key(work, "fullview");
    mkdir_all(Path::new(&view));
    let mounts = s
        .view(&view, parent.as_deref(), opt())
        .unwrap_or_else(|e| panic!("failed to get view's mount info: {e}"));
    let m = Mounted::try_new(&mounts, Path::new(&view))
        .unwrap_or_else(|e| panic!("failed to mount on the target({view}): {e}"));
    check_directory_equal(&flat, m.path())
        .unwrap_or_else(|d| panic!("fullview should equal to flat: {d}"));
}

/// Walk: containerd's filter cases, plus (strata) malformed filters.
pub fn walk(s: &dyn Snapshotter, _work: &Path, _backend: &str) {
    let o = || labels(&[(GC_ROOT, "check-walk")]);

    // No parent active
    s.prepare("a-np", None, o()).unwrap();
    // Base parent
    s.prepare("p-tmp", None, o()).unwrap();
    s.commit("p", "p-tmp", o()).unwrap();
    // Active
    s.prepare("a", Some("p"), o()).unwrap();
    // View
    s.view("v", Some("p"), o()).unwrap();
    // Base parent with label=1
    s.prepare("p-wl-tmp", None, o()).unwrap();
    s.commit(
        "p-wl",
        "p-wl-tmp",
        labels(&[("l", "1"), (GC_ROOT, "check-walk")]),
    )
    .unwrap();
    // active with label=2
    s.prepare(
        "a-wl",
        Some("p-wl"),
        labels(&[("l", "2"), (GC_ROOT, "check-walk")]),
    )
    .unwrap();
    // view with label=3
    s.view(
        "v-wl",
        Some("p-wl"),
        labels(&[("l", "3"), (GC_ROOT, "check-walk")]),
    )
    .unwrap();
    // no parent active with label=2
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
        // strata: `!=` compares an absent label as "" (found by the filter fuzz target: the
        // SQL walk used to select every snapshot without the label for `labels.k!=""`).
        (&["p-wl", "a-wl", "v-wl", "a-np-wl"], &[r#"labels.l!="""#]),
        (&[], &[r#"labels.nowhere!="""#]),
        (&["a-np", "p", "a", "v", "p-wl", "v-wl"], &["labels.l!=2"]),
    ];
    for (i, (matches, filters)) in cases.iter().enumerate() {
        let mut actual = Vec::new();
        s.walk(filters, &mut |info| {
            actual.push(info.name.clone());
            Ok(())
        })
        .unwrap_or_else(|e| panic!("[{i}] walk {filters:?}: {e}"));
        actual.sort();
        let mut matches: Vec<String> = matches.iter().map(|m| m.to_string()).collect();
        matches.sort();
        assert_eq!(actual, matches, "[{i}] Unexpected result for {filters:?}");
    }

    // strata: a malformed filter is InvalidArgument, names the filter, and calls nothing.
    for bad in [
        "name==",
        r#"labels."containerd.io/gc.root"#,
        "==p",
        "kind==active,",
    ] {
        let mut called = 0;
        let e = s
            .walk(&["name==p", bad], &mut |_| {
                called += 1;
                Ok(())
            })
            .expect_err(&format!("walk with the malformed filter {bad:?} must fail"));
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad:?}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains(bad) || msg.contains(&format!("{bad:?}")),
            "the error does not name the filter {bad:?}: {msg}"
        );
        assert_eq!(called, 0, "{bad:?}: the callback was called");
    }
}

// ---------------------------------------------------------------------------------------------
// issues.go: former issues of older layering models

/// LayerFileUpdate: a same-size rewrite and a chmod-only change in an upper layer are seen
/// (docker#21555), five times, each run starting on a new second.
pub fn layer_file_update(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let l1 = vec![
        Op::CreateDir("/etc", 0o700),
        Op::CreateFile("/etc/hosts", b"mydomain 10.0.0.1".to_vec(), 0o644),
        Op::CreateFile("/etc/profile", b"PATH=/usr/bin".to_vec(), 0o644),
    ];
    let l2 = vec![
        Op::CreateFile("/etc/hosts", b"mydomain 10.0.0.2".to_vec(), 0o644),
        Op::CreateFile("/etc/profile", b"PATH=/usr/bin".to_vec(), 0o666),
        Op::CreateDir("/root", 0o700),
        Op::CreateFile("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin".to_vec(), 0o644),
    ];
    let mut sleep = Duration::ZERO;
    // run 5 times to account for sporadic failure
    for _ in 0..5 {
        std::thread::sleep(sleep);
        must(check_snapshots(s, work, &[l1.clone(), l2.clone()]));
        // Sleep until next second boundary before running again
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        sleep = Duration::from_secs(1) - Duration::from_nanos(now.subsec_nanos().into());
    }
}

/// RemoveDirectoryInLowerLayer: a directory removed and recreated hides the old contents
/// (docker#25244).
pub fn remove_directory_in_lower_layer(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let l1 = vec![
        Op::CreateDir("/lib", 0o700),
        Op::CreateFile("/lib/hidden", vec![], 0o644),
    ];
    let l2 = vec![
        Op::RemoveAll("/lib"),
        Op::CreateDir("/lib", 0o700),
        Op::CreateFile("/lib/not-hidden", vec![], 0o644),
    ];
    let l3 = vec![Op::CreateFile("/lib/newfile", vec![], 0o644)];
    must(check_snapshots(s, work, &[l1, l2, l3]));
}

/// Chown: ownership changed deep in a lower layer (docker#20240, #24913, #28391).
pub fn chown(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let l1 = vec![
        Op::CreateDir("/opt", 0o700),
        Op::CreateDir("/opt/a", 0o700),
        Op::CreateDir("/opt/a/b", 0o700),
        Op::CreateFile("/opt/a/b/file.txt", b"hello".to_vec(), 0o644),
    ];
    let l2 = vec![
        Op::Chown("/opt", 1, 1),
        Op::Chown("/opt/a", 1, 1),
        Op::Chown("/opt/a/b", 1, 1),
        Op::Chown("/opt/a/b/file.txt", 1, 1),
    ];
    must(check_snapshots(s, work, &[l1, l2]));
}

/// Rename: a directory rename and a file overwritten by a rename (docker#25409).
///
/// As in containerd, the directory rename is left out on overlay: without `redirect_dir`
/// (which strata, like containerd, does not turn on), rename(2) of a directory that comes from
/// a lower layer fails with EXDEV. The rest of the case runs on every backend.
pub fn rename(s: &dyn Snapshotter, work: &Path, backend: &str) {
    let l1 = vec![
        Op::CreateDir("/dir1", 0o700),
        Op::CreateDir("/somefiles", 0o700),
        Op::CreateFile("/somefiles/f1", b"was here first!".to_vec(), 0o644),
        Op::CreateFile("/somefiles/f2", b"nothing interesting".to_vec(), 0o644),
    ];
    let mut l2 = Vec::new();
    if backend.starts_with("overlay") {
        eprintln!(
            "Rename on {backend}: documented skip of the directory rename /dir1 -> /dir2 \
             (overlayfs needs redirect_dir to rename a lower directory; containerd leaves it \
             out on overlayfs too); the file renames still run"
        );
    } else {
        l2.push(Op::Rename("/dir1", "/dir2"));
    }
    l2.extend([
        Op::CreateFile("/somefiles/f1-overwrite", b"new content 1".to_vec(), 0o644),
        Op::Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
        Op::Rename("/somefiles/f2", "/somefiles/f3"),
    ]);
    must(check_snapshots(s, work, &[l1, l2]));
}

/// DirectoryPermissionOnCommit: owners of directories changed, removed and recreated across
/// three layers (docker#27298).
pub fn directory_permission_on_commit(s: &dyn Snapshotter, work: &Path, _backend: &str) {
    let l1 = vec![
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
    ];
    let l2 = vec![
        Op::Chown("/dir2", 0, 0),
        Op::RemoveAll("/dir3"),
        Op::Chown("/dir4", 1, 1),
        Op::Chown("/dir4/f1", 1, 1),
    ];
    let l3 = vec![
        Op::CreateDir("/dir3", 0o700),
        Op::Chown("/dir3", 1, 1),
        Op::RemoveAll("/dir5"),
        Op::CreateDir("/dir5", 0o700),
        Op::Chown("/dir5", 1, 1),
    ];
    must(check_snapshots(s, work, &[l1, l2, l3]));
}

/// StatInWalk: stat inside a walk callback neither deadlocks nor disagrees with the walk.
pub fn stat_in_walk(s: &dyn Snapshotter, _work: &Path, _backend: &str) {
    let prefix = "stats-in-walk-";
    create_named_snapshots(s, prefix).unwrap();
    let mut checked = Vec::new();
    s.walk(&[], &mut |si| {
        if !si.name.starts_with(prefix) {
            // Only stat snapshots from this test
            return Ok(());
        }
        let si2 = s.stat(&si.name)?;
        assert_eq!(si, &si2, "walk and stat disagree on {}", si.name);
        checked.push(si.name.clone());
        Ok(())
    })
    .unwrap();
    // strata: all four were seen.
    checked.sort();
    assert_eq!(
        checked,
        ["a1", "c1", "c2", "v1"].map(|n| format!("{prefix}{n}"))
    );
}

/// containerd's `createNamedSnapshots`.
fn create_named_snapshots(s: &dyn Snapshotter, ns: &str) -> strata::Result<()> {
    let c1 = format!("{ns}c1");
    let c2 = format!("{ns}c2");
    s.prepare(&format!("{c1}-a"), None, opt())?;
    s.commit(&c1, &format!("{c1}-a"), opt())?;
    s.prepare(&format!("{c2}-a"), Some(&c1), opt())?;
    s.commit(&c2, &format!("{c2}-a"), opt())?;
    s.prepare(&format!("{ns}a1"), Some(&c2), opt())?;
    s.view(&format!("{ns}v1"), Some(&c2), opt())?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The harness: containerd's `makeTest`

/// What a factory gives back: the store, or why it could not be opened.
pub type Opened = Result<Box<dyn Snapshotter>, Box<dyn std::error::Error + Send + Sync>>;

/// What a factory body may evaluate to: a store (boxed or not) or a `Result` of one.
pub trait IntoSnapshotter {
    /// The store as a trait object.
    fn into_snapshotter(self) -> Opened;
}

impl IntoSnapshotter for Box<dyn Snapshotter> {
    fn into_snapshotter(self) -> Opened {
        Ok(self)
    }
}

impl<S: Snapshotter + 'static> IntoSnapshotter for Box<S> {
    fn into_snapshotter(self) -> Opened {
        Ok(self)
    }
}

impl<S, E> IntoSnapshotter for Result<S, E>
where
    S: Snapshotter + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn into_snapshotter(self) -> Opened {
        match self {
            Ok(s) => Ok(Box::new(s)),
            Err(e) => Err(e.into()),
        }
    }
}

/// One case of the suite: the store, the work directory, the backend's name.
pub type Case = fn(&dyn Snapshotter, &Path, &str);

/// Runs `case` as containerd's `makeTest` does: umask 0, a fresh temporary directory with
/// `root/` for the store and `work/` for the case, the store closed at the end.
pub fn run(backend: &str, case: Case, open: fn(&Path) -> Opened) {
    let gate = format!("the {backend} conformance suite");
    let allowed = if ["overlay", "btrfs", "devmapper"]
        .iter()
        .any(|b| backend.starts_with(b))
    {
        require_privileged(&gate)
    } else {
        require_root(&gate)
    };
    if !allowed {
        return;
    }
    // Process-wide and idempotent: every test sets it before doing anything.
    rustix::process::umask(rustix::fs::Mode::empty());
    let tmp = tempfile::Builder::new()
        .prefix(&format!("snapshot-suite-{backend}-"))
        .tempdir()
        .unwrap();
    let root: PathBuf = tmp.path().join("root");
    mkdir_all(&root);
    // The btrfs backend needs its root on btrfs: a loop-backed one of the test's own,
    // unmounted and detached after the store is closed.
    let _btrfs = backend
        .starts_with("btrfs")
        .then(|| strata_tests::LoopBtrfs::mount_at(&root, 512 << 20));
    // The devmapper backend needs a thin pool: a loop-backed one of the test's own, taken down
    // after the store is closed.
    #[cfg(feature = "devmapper")]
    let _pool = backend
        .starts_with("devmapper")
        .then(|| strata_tests::DevmapperPool::create(&root));
    let s = open(&root).unwrap_or_else(|e| panic!("Failed to initialize snapshotter: {e}"));
    let work = tmp.path().join("work");
    mkdir_all(&work);
    case(&*s, &work, backend);
    s.close().unwrap_or_else(|e| panic!("Cleanup failed: {e}"));
}

/// Instantiates every case as a `#[test]` in module `$backend`. The factory is written like a
/// closure, `|root| body`, where `body` may use `?` on any error and evaluates to a store,
/// a boxed store or a `Result` of one. The including file imports `std::path::Path` and
/// `strata::Snapshotter`:
///
/// ```ignore
/// conformance!(native, |root| {
///     let backend = NativeBackend::open(root)?;
///     Store::open(root, backend, StoreOptions::default())
/// });
/// ```
macro_rules! conformance {
    ($backend:ident, |$root:ident| $body:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;

            // `Path` and `Snapshotter` are the including file's imports.
            #[allow(unreachable_code, clippy::needless_question_mark)]
            fn open(
                $root: &Path,
            ) -> Result<Box<dyn Snapshotter>, Box<dyn ::std::error::Error + Send + Sync>> {
                let opened = $body;
                $crate::cases::IntoSnapshotter::into_snapshotter(opened)
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
                $crate::cases::run(stringify!($backend), $crate::cases::$case, open);
            }
        )*
    };
}
