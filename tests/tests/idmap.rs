//! Idmapped snapshots (containerd's `containerd.io/snapshot/uidmapping` / `gidmapping`
//! labels) on every backend whose mounts are directories: files owned by 0 in the image show
//! as the mapped host ids through the mount, processes in a user namespace with the mapping
//! see the image's own ids and write files that are stored with them, and the diff is the
//! same layer as the same change made without a mapping. No chown, no copy. On every
//! backend (devmapper's in the VM).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use strata::idmap::{IdMap, LABEL_GID_MAPPING, LABEL_UID_MAPPING};
use strata::layer::diff::DiffOptions;
use strata::{Backend, Labels, Snapshotter, Store};
use strata_tests::require_privileged;

const HOST: u32 = 100_000;

fn mapping_labels() -> Labels {
    let mut l = BTreeMap::new();
    l.insert(LABEL_UID_MAPPING.into(), format!("0:{HOST}:65536"));
    l.insert(LABEL_GID_MAPPING.into(), format!("0:{HOST}:65536"));
    l
}

/// A layer with files of root and of user 1000, and a root-only file.
fn image_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, uid: u64, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_000_000_000);
        h.set_size(data.len() as u64);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("etc", tar::EntryType::Directory, 0o755, 0, b"");
    add(
        "etc/hosts",
        tar::EntryType::Regular,
        0o644,
        0,
        b"127.0.0.1 localhost\n",
    );
    add(
        "etc/shadow",
        tar::EntryType::Regular,
        0o600,
        0,
        b"root:*:\n",
    );
    add("home", tar::EntryType::Directory, 0o755, 0, b"");
    add("home/u", tar::EntryType::Directory, 0o750, 1000, b"");
    add(
        "home/u/notes",
        tar::EntryType::Regular,
        0o640,
        1000,
        b"mine\n",
    );
    add("tmp", tar::EntryType::Directory, 0o1777, 0, b"");
    b.into_inner().unwrap()
}

/// What the container does: a new file of root's, one of user 1000's, a deletion, a change
/// below a directory of the image (copied up).
const CHANGE: &str = "echo new > new && echo u > home/u/made && chown 1000:1000 home/u/made \
                      && rm etc/shadow && echo '10.0.0.1 db' >> etc/hosts";

/// Runs `sh -c script` in `dir`, as root of user namespace `userns` (host id `HOST`) when
/// given, else as the host's root. Returns its standard output.
fn sh(dir: &Path, userns: Option<&OwnedFd>, script: &str) -> String {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir(dir);
    if let Some(ns) = userns {
        let ns = ns.try_clone().unwrap();
        // SAFETY (test): the closure runs in the forked child before exec and makes only
        // system calls (setns, setgroups, setresgid, setresuid).
        unsafe {
            cmd.pre_exec(move || {
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::User),
                )?;
                let root_g = rustix::process::Gid::ROOT;
                let root_u = rustix::process::Uid::ROOT;
                rustix::thread::set_thread_groups(&[])?;
                rustix::thread::set_thread_res_gid(root_g, root_g, root_g)?;
                rustix::thread::set_thread_res_uid(root_u, root_u, root_u)?;
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "sh -c {script:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

/// Mounts below the store's root (not the root itself, a btrfs store's file system): the
/// idmapped clones.
fn mounts_under(root: &Path) -> Vec<String> {
    let root = fs::canonicalize(root).unwrap();
    let root = root.as_path();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(root) && Path::new(m) != root)
        .collect()
}

/// The whole case on one store (root `root`), mounting in `work`.
fn idmapped_case<B: Backend>(store: &Store<B>, root: &Path, work: &Path) {
    let base = store
        .apply_layer(None, None, None, &image_layer()[..])
        .unwrap()
        .name;
    let opts = DiffOptions {
        source_date_epoch: Some(1_500_000_000),
        ..DiffOptions::default()
    };
    let map = IdMap::from_labels(&mapping_labels()).unwrap().unwrap();
    let userns = map.user_namespace().unwrap();

    // The reference: the change made by the host's root, no mapping.
    let plain = work.join("plain");
    fs::create_dir_all(&plain).unwrap();
    let mounts = store.prepare("plain", Some(&base), Labels::new()).unwrap();
    strata::mount::mount_all(&mounts, &plain).unwrap();
    sh(&plain, None, CHANGE);
    strata::mount::unmount(&plain).unwrap();
    store.commit("plain-layer", "plain", Labels::new()).unwrap();
    let (_, _, reference) = store.diff("plain-layer", &opts, Vec::new()).unwrap();

    // The same change through an idmapped snapshot.
    let mnt = work.join("mapped");
    fs::create_dir_all(&mnt).unwrap();
    let mounts = store
        .prepare("mapped", Some(&base), mapping_labels())
        .unwrap();
    assert_eq!(
        store.mounts("mapped").unwrap(),
        mounts,
        "Mounts gives the prepared mounts again"
    );
    strata::mount::mount_all(&mounts, &mnt).unwrap();
    // The host sees the image's ids moved into the range.
    assert_eq!(owner(&mnt.join("etc/hosts")), (HOST, HOST));
    assert_eq!(owner(&mnt.join("home/u/notes")), (HOST + 1000, HOST + 1000));
    assert_eq!(owner(&mnt), (HOST, HOST), "the root directory too");
    // A process of the user namespace sees the image's own ids ...
    let seen = sh(
        &mnt,
        Some(&userns),
        "stat -c '%u:%g %n' etc/hosts home/u/notes && id -u && cat etc/shadow",
    );
    assert_eq!(seen, "0:0 etc/hosts\n1000:1000 home/u/notes\n0\nroot:*:\n");
    // ... and changes it as root of the container.
    sh(&mnt, Some(&userns), CHANGE);
    assert_eq!(owner(&mnt.join("new")), (HOST, HOST));
    assert_eq!(owner(&mnt.join("home/u/made")), (HOST + 1000, HOST + 1000));
    strata::mount::unmount(&mnt).unwrap();
    store
        .commit("mapped-layer", "mapped", Labels::new())
        .unwrap();
    assert!(
        mounts_under(root).is_empty(),
        "a commit takes the clones off: {:?}",
        mounts_under(root)
    );
    let (_, _, mapped) = store.diff("mapped-layer", &opts, Vec::new()).unwrap();
    assert!(
        mapped == reference,
        "the idmapped change gives the same layer as the plain one"
    );

    // A view of the layer, idmapped too; removed with its clones.
    let mounts = store
        .view("seen", Some("mapped-layer"), mapping_labels())
        .unwrap();
    assert!(!mounts_under(root).is_empty());
    let view = work.join("view");
    fs::create_dir_all(&view).unwrap();
    strata::mount::mount_all(&mounts, &view).unwrap();
    assert_eq!(owner(&view.join("new")), (HOST, HOST));
    assert_eq!(fs::read_to_string(view.join("new")).unwrap(), "new\n");
    assert!(
        fs::write(view.join("x"), b"").is_err(),
        "a view stays read-only"
    );
    strata::mount::unmount(&view).unwrap();
    store.remove("seen").unwrap();
    assert!(
        mounts_under(root).is_empty(),
        "remove takes the clones off: {:?}",
        mounts_under(root)
    );

    // The mapping is fixed once prepared; bad labels create nothing.
    store
        .prepare("fixed", Some(&base), mapping_labels())
        .unwrap();
    // The clones are gone (as after a reboot): Mounts attaches them again.
    for m in mounts_under(root) {
        rustix::mount::unmount(m.as_str(), rustix::mount::UnmountFlags::DETACH).unwrap();
    }
    assert!(mounts_under(root).is_empty());
    let again = work.join("again");
    fs::create_dir_all(&again).unwrap();
    strata::mount::mount_all(&store.mounts("fixed").unwrap(), &again).unwrap();
    assert_eq!(owner(&again.join("etc/hosts")), (HOST, HOST));
    strata::mount::unmount(&again).unwrap();
    let mut info = store.stat("fixed").unwrap();
    info.labels
        .insert(LABEL_UID_MAPPING.into(), "0:200000:65536".into());
    let err = store.update(&info, &["labels"]).unwrap_err().to_string();
    assert!(err.contains("fixed when it is prepared"), "{err}");
    store.remove("fixed").unwrap();
    let mut half = mapping_labels();
    half.remove(LABEL_GID_MAPPING);
    let err = store
        .prepare("half", Some(&base), half)
        .unwrap_err()
        .to_string();
    assert!(err.contains("give both"), "{err}");
    assert!(store.stat("half").is_err(), "nothing was created");
    assert!(mounts_under(root).is_empty(), "{:?}", mounts_under(root));
}

#[test]
fn idmapped_overlay_snapshots() {
    if !require_privileged("idmapped overlay snapshots") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let store = strata_tests::overlay_store(&root);
    idmapped_case(&store, &root, tmp.path());
}

#[test]
fn idmapped_native_snapshots() {
    if !require_privileged("idmapped native snapshots") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let store = strata_tests::native_store(&root);
    idmapped_case(&store, &root, tmp.path());
}

#[cfg(feature = "btrfs")]
#[test]
fn idmapped_btrfs_snapshots() {
    if !require_privileged("idmapped btrfs snapshots") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let store = strata_tests::btrfs_store(&root, 256 << 20);
    idmapped_case(&store, &root, tmp.path());
}

/// devmapper's mounts are a block device's file system: the store mounts it itself and
/// returns a bind mount of an idmapped clone of it.
#[cfg(feature = "devmapper")]
mod devmapper {
    use super::*;

    #[test]
    fn idmapped_devmapper_snapshots() {
        if !require_privileged("a devmapper store") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let store = strata_tests::devmapper_store(&root);
        idmapped_case(&store, &root, tmp.path());
    }
}
