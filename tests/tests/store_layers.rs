//! Layers through the store, on every backend: diff a committed snapshot, apply the layer
//! onto its parent, and get the same tree; the same change set gives the same diffID on
//! every backend; a layer that fails half-way marks the snapshot broken.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use strata::layer::diff::DiffOptions;
use strata::layer::{Compression, Descriptor};
use strata::{Backend, ErrorKind, Labels, Snapshotter, Store, StoreOptions};
use strata_tests::{apply, check_directory_equal, require_privileged, Mounted, Op};

fn base_ops() -> Vec<Op> {
    vec![
        Op::CreateDir("/etc", 0o755),
        Op::CreateFile("/etc/hosts", b"127.0.0.1 localhost\n".to_vec(), 0o644),
        Op::CreateDir("/var", 0o755),
        Op::CreateDir("/var/cache", 0o755),
        Op::CreateFile("/var/cache/a", b"a".to_vec(), 0o644),
        Op::CreateFile("/var/cache/b", b"b".to_vec(), 0o644),
        Op::CreateFile("/tool", b"#!/bin/sh\n".to_vec(), 0o755),
    ]
}

fn top_ops() -> Vec<Op> {
    vec![
        Op::CreateFile("/etc/hosts", b"10.1.1.1 other\n".to_vec(), 0o644),
        Op::RemoveAll("/var/cache"),
        Op::CreateDir("/var/cache", 0o700),
        Op::CreateFile("/var/cache/c", b"c".to_vec(), 0o600),
        Op::RemoveAll("/tool"),
        Op::CreateFile("/suid", b"s".to_vec(), 0o4755),
        Op::Chown("/suid", 12, 34),
        Op::Symlink("/nowhere", "/dangling"),
        Op::CreateFile("/h1", b"linked".to_vec(), 0o644),
        Op::Link("/h1", "/h2"),
    ]
}

/// Builds base (committed) and top (committed on base) with the given changes.
fn build<B: Backend>(s: &Store<B>, work: &Path) {
    let m = Mounted::new(
        &s.prepare("base-a", None, Labels::new()).unwrap(),
        &work.join("m1"),
    );
    apply(m.path(), &base_ops()).unwrap();
    m.unmount();
    s.commit("base", "base-a", Labels::new()).unwrap();
    let m = Mounted::new(
        &s.prepare("top-a", Some("base"), Labels::new()).unwrap(),
        &work.join("m2"),
    );
    apply(m.path(), &top_ops()).unwrap();
    m.unmount();
    s.commit("top", "top-a", Labels::new()).unwrap();
}

/// An overlay store rooted at `base/root`.
fn overlay_store(base: &Path) -> Store<strata_overlay::OverlayBackend> {
    let root = base.join("root");
    let backend = strata_overlay::OverlayBackend::open(&root, Default::default()).unwrap();
    Store::open(&root, backend, StoreOptions::default()).unwrap()
}

fn round_trip<B: Backend>(s: &Store<B>, work: &Path) -> Descriptor {
    build(s, work);
    let opts = DiffOptions {
        compression: Compression::Gzip,
        source_date_epoch: Some(1_000),
        ..DiffOptions::default()
    };
    let (desc, stats, blob) = s.diff("top", &opts, Vec::new()).unwrap();
    assert!(stats.whiteouts >= 1, "the removed tool is a whiteout");
    assert!(
        stats.entries >= 8,
        "every change is in the layer: {stats:?}"
    );
    assert_ne!(desc.diff_id.as_str(), strata::layer::EMPTY_LAYER_DIFF_ID);
    // Apply it to a fresh snapshot of the parent: the result is the top again.
    s.prepare("copy-a", Some("base"), Labels::new()).unwrap();
    let applied = s
        .apply("copy-a", blob.as_slice(), Some(&desc.digest))
        .unwrap();
    assert_eq!(applied.descriptor, desc);
    s.commit("copy", "copy-a", Labels::new()).unwrap();
    let a = Mounted::new(
        &s.view("va", Some("top"), Labels::new()).unwrap(),
        &work.join("va"),
    );
    let b = Mounted::new(
        &s.view("vb", Some("copy"), Labels::new()).unwrap(),
        &work.join("vb"),
    );
    check_directory_equal(a.path(), b.path()).unwrap();
    // And diffing the copy gives the very same layer.
    let (again, _, _) = s.diff("copy", &opts, Vec::new()).unwrap();
    assert_eq!(again.diff_id, desc.diff_id);
    desc
}

#[test]
fn the_same_change_set_is_the_same_layer_on_every_backend() {
    if !require_privileged("layers through the store") {
        return;
    }
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let t1 = tempfile::tempdir().unwrap();
    let native = Store::open(
        &t1.path().join("root"),
        strata_native::NativeBackend::open(&t1.path().join("root")).unwrap(),
        StoreOptions::default(),
    )
    .unwrap();
    let d_native = round_trip(&native, t1.path());
    let t2 = tempfile::tempdir().unwrap();
    let overlay = Store::open(
        &t2.path().join("root"),
        strata_overlay::OverlayBackend::open(&t2.path().join("root"), Default::default()).unwrap(),
        StoreOptions::default(),
    )
    .unwrap();
    let d_overlay = round_trip(&overlay, t2.path());
    assert_eq!(
        d_native.diff_id, d_overlay.diff_id,
        "same changes, same diffID"
    );
    #[cfg(feature = "btrfs")]
    {
        let t3 = tempfile::tempdir().unwrap();
        let b = strata_tests::btrfs_store(&t3.path().join("root"), 512 << 20);
        let d_btrfs = round_trip(&*b, t3.path());
        assert_eq!(d_btrfs.diff_id, d_native.diff_id, "btrfs too");
    }
}

#[test]
fn a_layer_that_fails_half_way_marks_the_snapshot_broken() {
    if !require_privileged("half-applied layers") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = overlay_store(tmp.path());
    build(&s, tmp.path());
    // A valid entry, then a hostile one: the first is applied before the second is refused.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("ok").unwrap();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, &b"ok"[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..6].copy_from_slice(b"../bad");
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    let layer = b.into_inner().unwrap();

    // Into a fresh snapshot the overlay applier writes only the (empty) upper directory,
    // so a failure leaves it empty and usable.
    s.prepare("fresh", Some("base"), Labels::new()).unwrap();
    let e = s.apply("fresh", layer.as_slice(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("../bad"), "{e}");
    let view = strata::mount::TempMount::new(&s.mounts("fresh").unwrap()).unwrap();
    assert!(
        !view.path().join("ok").exists(),
        "the entry applied before the failure is gone"
    );
    view.unmount().unwrap();
    s.remove("fresh").unwrap();

    // A snapshot that already holds changes cannot be put back: it is marked broken.
    s.prepare("target", Some("base"), Labels::new()).unwrap();
    s.apply("target", first_layer().as_slice(), None).unwrap();
    let e = s.apply("target", layer.as_slice(), None).unwrap_err();
    assert_eq!(
        (e.kind(), e.key()),
        (ErrorKind::DataLoss, Some("target")),
        "{e}"
    );
    assert!(e.to_string().contains("../bad"), "{e}");
    let e = s.mounts("target").unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::DataLoss,
        "a broken snapshot is not mounted again: {e}"
    );
    let report = s.fsck(false).unwrap();
    assert_eq!(report.broken.len(), 1);
    s.remove("target").unwrap();

    // Applying to something that is not active is refused up front.
    let e = s.apply("base", &b""[..], None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    let e = s
        .diff("missing", &DiffOptions::default(), Vec::new())
        .unwrap_err();
    assert_eq!((e.kind(), e.key()), (ErrorKind::NotFound, Some("missing")));
    let _ = fs::remove_dir_all(tmp.path().join("m1"));
}

/// A one-file layer.
fn first_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("first").unwrap();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, &b"1"[..]).unwrap();
    b.into_inner().unwrap()
}

/// A reader that fails the test if anything reads it.
struct MustNotRead;

impl std::io::Read for MustNotRead {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        panic!("a cache hit must not read the layer");
    }
}

#[test]
fn apply_layer_commits_under_the_chain_id_and_hits_the_cache() {
    if !require_privileged("apply-layer") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = overlay_store(tmp.path());
    apply_layer_cycle(&s, tmp.path());
}

/// A pull beside gc: `apply_layer_in` leases what it returns (applied, a cache hit, or a
/// layer another pull committed), so a gc between it and the tag removes nothing; without a
/// lease the fresh layer is fair game. A failed apply leaves nothing in the lease.
#[test]
fn apply_layer_in_a_lease_is_held_until_tagged() {
    if !require_privileged("apply-layer") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = overlay_store(tmp.path());
    s.lease_create("pull", None).unwrap();
    let applied = s
        .apply_layer_in(Some("pull"), None, None, None, &first_layer()[..])
        .unwrap();
    assert!(!applied.cached);
    s.gc(false).unwrap();
    assert_eq!(s.stat(&applied.name).unwrap().kind, strata::Kind::Committed);
    // The cache hit is leased too (the lease taken first: a gc in between removes it).
    s.lease_remove("pull").unwrap();
    s.lease_create("pull-again", None).unwrap();
    let hit = s
        .apply_layer_in(
            Some("pull-again"),
            None,
            None,
            Some(&applied.diff_id),
            MustNotRead,
        )
        .unwrap();
    assert!(hit.cached);
    s.gc(false).unwrap();
    assert!(s.stat(&applied.name).is_ok(), "the cache hit is leased");
    let leases = s.leases().unwrap();
    let lease = leases.iter().find(|l| l.name == "pull-again").unwrap();
    assert_eq!(lease.snapshots, vec![applied.name.clone()]);
    // A failed apply (a wrong diffID) leaves neither a snapshot nor a lease entry.
    let before = s.list(&[]).unwrap().len();
    let wrong = strata::layer::Digest::of(b"not this layer");
    let e = s
        .apply_layer_in(
            Some("pull-again"),
            Some(&applied.name),
            None,
            Some(&wrong),
            &first_layer()[..],
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(s.list(&[]).unwrap().len(), before);
    let leases = s.leases().unwrap();
    let lease = leases.iter().find(|l| l.name == "pull-again").unwrap();
    assert_eq!(lease.snapshots, vec![applied.name.clone()]);
    // Without a lease, nothing holds a fresh layer: gc takes it.
    s.lease_remove("pull-again").unwrap();
    s.gc(false).unwrap();
    let e = s.stat(&applied.name).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// A layer read that, on its first read, tries to remove every Active snapshot of the store,
/// as containerd's gc does on a served store with every snapshot it does not know.
struct RemovesActives<'a, B: Backend> {
    s: &'a Store<B>,
    data: &'a [u8],
    refused: Vec<String>,
}

impl<B: Backend> std::io::Read for RemovesActives<'_, B> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.refused.is_empty() {
            for active in self.s.list(&["kind==active"]).unwrap() {
                let e = self.s.remove(&active.name).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
                assert!(e.to_string().contains("lease \"pull\""), "{e}");
                self.refused.push(active.name);
            }
        }
        self.data.read(buf)
    }
}

/// Found by the containerd concurrency test: containerd's gc removed the Active snapshot of an
/// apply-layer in flight (it was leased only once applied) and the pull failed "not found".
/// `apply_layer_in` now holds it in the lease from its prepare.
#[test]
fn apply_layer_in_holds_its_snapshot_while_it_applies() {
    if !require_privileged("apply-layer") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = overlay_store(tmp.path());
    s.lease_create("pull", None).unwrap();
    let layer = first_layer();
    let mut input = RemovesActives {
        s: &s,
        data: &layer[..],
        refused: Vec::new(),
    };
    let applied = s
        .apply_layer_in(Some("pull"), None, None, None, &mut input)
        .unwrap();
    assert_eq!(input.refused.len(), 1, "the apply's own snapshot");
    assert_eq!(s.stat(&applied.name).unwrap().kind, strata::Kind::Committed);
    assert!(s.list(&["kind==active"]).unwrap().is_empty());
}

/// apply-layer on `s`: chainIDs, cache hits, records, errors that leave nothing behind.
fn apply_layer_cycle<B: Backend>(s: &Store<B>, tmp: &Path) {
    build(s, tmp);
    let opts = DiffOptions::default();
    let (d1, _, l1) = s.diff("base", &opts, Vec::new()).unwrap();
    let (d2, _, l2) = s.diff("top", &opts, Vec::new()).unwrap();

    let a = s
        .apply_layer(None, Some(&d1.digest), None, l1.as_slice())
        .unwrap();
    assert_eq!(
        a.name,
        d1.diff_id.as_str(),
        "the bottom layer's chainID is its diffID"
    );
    assert!(!a.cached);
    let b = s
        .apply_layer(Some(&a.name), None, Some(&d2.diff_id), l2.as_slice())
        .unwrap();
    let want = strata::layer::chain_id(&[d1.diff_id.clone(), d2.diff_id.clone()]).unwrap();
    assert_eq!(b.name, want.as_str());
    assert_eq!(
        s.stat(&b.name).unwrap().parent.as_deref(),
        Some(a.name.as_str())
    );

    // Known diffID and chain already there: returned without reading the stream.
    let hit = s
        .apply_layer(Some(&a.name), None, Some(&d2.diff_id), MustNotRead)
        .unwrap();
    assert!(hit.cached && hit.name == b.name);
    // What is recorded of the layer: its identity, its content checksum, its size.
    let rec = s
        .layer(&b.name)
        .unwrap()
        .expect("apply-layer records the layer");
    assert_eq!(
        (rec.diff_id.as_str(), rec.chain_id.as_str()),
        (d2.diff_id.as_str(), b.name.as_str())
    );
    assert_eq!(rec.content, b.content);
    assert!(rec.content.starts_with("sha256:") && rec.tar_size == l2.len() as u64);
    assert_eq!(
        hit.content, b.content,
        "a cache hit reports the recorded checksum"
    );
    assert_eq!(
        s.layer("top").unwrap(),
        None,
        "a committed build is no layer record"
    );
    // Unknown diffID: read, found to be there already, nothing new is kept.
    let again = s
        .apply_layer(Some(&a.name), None, None, l2.as_slice())
        .unwrap();
    assert_eq!(again.name, b.name);
    let names: Vec<String> = s.list(&[]).unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("strata.io/apply/"))
            .count(),
        0,
        "{names:?}"
    );

    // The result presents the same tree as the original.
    let x = Mounted::new(
        &s.view("vx", Some("top"), Labels::new()).unwrap(),
        &tmp.join("vx"),
    );
    let y = Mounted::new(
        &s.view("vy", Some(&b.name), Labels::new()).unwrap(),
        &tmp.join("vy"),
    );
    check_directory_equal(x.path(), y.path()).unwrap();
    drop((x, y));

    // A wrong diffID, a wrong digest, a bad parent: errors, and nothing left behind.
    let before = s.list(&[]).unwrap().len();
    let wrong = strata::layer::Digest::of(b"not it");
    let e = s
        .apply_layer(None, None, Some(&wrong), l1.as_slice())
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(wrong.as_str()) && msg.contains(d1.diff_id.as_str()),
        "{msg}"
    );
    let e = s
        .apply_layer(Some(&a.name), Some(&wrong), None, l2.as_slice())
        .unwrap_err();
    assert!(e.to_string().contains(wrong.as_str()), "{e}");
    s.prepare("busy", Some("top"), Labels::new()).unwrap();
    let e = s
        .apply_layer(Some("busy"), None, None, l2.as_slice())
        .unwrap_err();
    assert!(e.to_string().contains("committed"), "{e}");
    s.remove("busy").unwrap();
    assert_eq!(s.list(&[]).unwrap().len(), before);

    // A parent made by commit (a build step) gets its layers identified once, bottom first:
    // the same diffIDs and chainIDs any export of it would carry.
    assert_eq!(s.layer("top").unwrap(), None);
    let c = s
        .apply_layer(Some("top"), None, None, first_layer().as_slice())
        .unwrap();
    let extra = strata::layer::apply::content_of_layer(first_layer().as_slice()).unwrap();
    let want =
        strata::layer::chain_id(&[d1.diff_id.clone(), d2.diff_id.clone(), extra.diff_id]).unwrap();
    assert_eq!(c.name, want.as_str());
    let top = s.layer("top").unwrap().expect("recorded now");
    assert_eq!(top.chain_id, b.name, "built or applied, the same chain");
    assert_eq!(
        top.content, b.content,
        "summing a diff gives the checksum applying it gives"
    );
    assert_eq!(s.stat(&c.name).unwrap().parent.as_deref(), Some("top"));
}

#[test]
fn the_overlay_fast_path_runs_and_writes_the_generic_differs_bytes() {
    if !require_privileged("the overlay fast path") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s = overlay_store(tmp.path());
    build(&s, tmp.path());
    for name in ["base", "top"] {
        let fast = DiffOptions::default();
        let generic = DiffOptions {
            force_generic: true,
            ..DiffOptions::default()
        };
        let (d1, st1, b1) = s.diff(name, &fast, Vec::new()).unwrap();
        let (d2, st2, b2) = s.diff(name, &generic, Vec::new()).unwrap();
        assert!(
            st1.fast_path && !st2.fast_path,
            "{name}: the fast path ran only when allowed"
        );
        assert_eq!(d1, d2, "{name}");
        assert_eq!(b1, b2, "{name}: byte for byte the same layer");
    }
    // An upper directory that uses redirect_dir is not read by the fast path.
    let upper = {
        let guard = s.guard(&["top"]).unwrap();
        guard.layers().last().unwrap().path.clone().unwrap()
    };
    rustix::fs::lsetxattr(
        upper.join("var"),
        "trusted.overlay.redirect",
        b"/elsewhere",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let (_, st, _) = s.diff("top", &DiffOptions::default(), Vec::new()).unwrap();
    assert!(
        !st.fast_path,
        "redirect_dir makes the generic differ take over"
    );
}

/// The same on device-mapper thin, in the VM (tests/vm/run).
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;

    #[test]
    fn the_same_change_set_is_the_same_layer_as_on_native() {
        if !require_privileged("layers through a devmapper store") {
            return;
        }
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
        let t1 = tempfile::tempdir().unwrap();
        let native = strata_tests::native_store(&t1.path().join("root"));
        let d_native = round_trip(&native, t1.path());
        let t2 = tempfile::tempdir().unwrap();
        let d = strata_tests::devmapper_store(&t2.path().join("root"));
        let d_dm = round_trip(&*d, t2.path());
        assert_eq!(d_dm.diff_id, d_native.diff_id, "same changes, same diffID");
    }

    #[test]
    fn apply_layer_commits_under_the_chain_id_and_hits_the_cache() {
        if !require_privileged("apply-layer on devmapper") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let s = strata_tests::devmapper_store(&tmp.path().join("root"));
        apply_layer_cycle(&*s, tmp.path());
    }
}

/// The id and `rebuildable` mark the metadata gives `key`, read behind the store's back.
fn row_of(root: &Path, key: &str) -> (u64, bool) {
    let db = rusqlite::Connection::open(root.join("metadata.db")).unwrap();
    db.query_row(
        "SELECT id, rebuildable FROM snapshots WHERE key = ?1",
        [key],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? != 0)),
    )
    .unwrap()
}

/// Overlay records a layer nothing was written to, and fresh Active snapshots and Views,
/// without a sync. A power loss may take that storage (simulated: deleted, the Active
/// snapshot and View dated before the boot); recovery makes it again exactly, while lost
/// storage of anything synced, or of an Active snapshot of this boot, is still broken.
#[test]
fn storage_recorded_without_a_sync_is_rebuilt_after_a_power_loss() {
    if !require_privileged("overlay recovery of unsynced storage") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let s = overlay_store(tmp.path());
    s.prepare("a", None, Labels::new()).unwrap();
    s.commit("empty", "a", Labels::new()).unwrap();
    s.prepare("b", Some("empty"), Labels::new()).unwrap();
    s.apply("b", first_layer().as_slice(), None).unwrap();
    s.commit("full", "b", Labels::new()).unwrap();
    s.prepare("c", Some("full"), Labels::new()).unwrap();
    s.commit("empty-top", "c", Labels::new()).unwrap();
    s.prepare("old-work", Some("empty-top"), Labels::new())
        .unwrap();
    s.view("old-view", Some("empty-top"), Labels::new())
        .unwrap();
    s.prepare("new-work", Some("empty-top"), Labels::new())
        .unwrap();
    let diff_id = |s: &Store<strata_overlay::OverlayBackend>, name: &str| {
        s.diff(name, &DiffOptions::default(), Vec::new())
            .unwrap()
            .0
            .diff_id
    };
    let (empty_diff, top_diff) = (diff_id(&s, "empty"), diff_id(&s, "empty-top"));
    s.close().unwrap();
    drop(s);

    let marks: Vec<bool> = ["empty", "full", "empty-top", "old-work", "old-view"]
        .iter()
        .map(|k| row_of(&root, k).1)
        .collect();
    assert_eq!(
        marks,
        [true, false, true, true, true],
        "only what holds nothing went unsynced"
    );
    let db = rusqlite::Connection::open(root.join("metadata.db")).unwrap();
    db.execute(
        "UPDATE snapshots SET created_ns = 1 WHERE key IN ('old-work', 'old-view')",
        [],
    )
    .unwrap();
    drop(db);
    for key in ["empty", "empty-top", "old-work", "old-view", "new-work"] {
        let dir = root
            .join("snapshots")
            .join(row_of(&root, key).0.to_string());
        fs::remove_dir_all(&dir).unwrap();
    }

    // Looked at without repair: what can be rebuilt is listed, the rest is broken.
    let looking = Store::open(
        &root,
        strata_overlay::OverlayBackend::open(&root, Default::default()).unwrap(),
        StoreOptions {
            recover: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let report = looking.fsck(false).unwrap();
    assert_eq!(
        report.lost_unsynced,
        ["empty", "empty-top", "old-work", "old-view"],
        "{report:?}"
    );
    assert_eq!(report.broken.len(), 1, "{report:?}");
    assert_eq!(report.broken[0].0, "new-work", "{report:?}");
    assert!(!report.is_clean());
    looking.close().unwrap();
    drop(looking);

    // Opening repairs: everything rebuildable is back, as it was.
    let s = overlay_store(tmp.path());
    let report = s.fsck(false).unwrap();
    assert!(report.lost_unsynced.is_empty(), "{report:?}");
    assert_eq!(report.broken.len(), 1, "new-work stays broken: {report:?}");
    assert_eq!(diff_id(&s, "empty"), empty_diff);
    assert_eq!(diff_id(&s, "empty-top"), top_diff);
    let view = Mounted::new(&s.mounts("old-view").unwrap(), &tmp.path().join("v"));
    let names: Vec<_> = fs::read_dir(view.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["first"], "the view shows the chain again");
    view.unmount();
    let work = Mounted::new(&s.mounts("old-work").unwrap(), &tmp.path().join("w"));
    assert_eq!(fs::read(work.path().join("first")).unwrap(), b"1");
    fs::write(work.path().join("second"), b"2").unwrap();
    work.unmount();
    s.commit("after", "old-work", Labels::new()).unwrap();
    assert!(
        !row_of(&root, "after").1,
        "a layer with content is synced, not rebuildable"
    );
    s.remove("new-work").unwrap();
    assert!(s.fsck(false).unwrap().is_clean());
}
