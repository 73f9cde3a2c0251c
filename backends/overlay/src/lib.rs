//! strata's overlay backend: containerd's overlayfs layout and mount rules.
//!
//! Layout under the store root: `snapshots/<id>/fs` (the layer: an upper directory while
//! Active, a lower one once Committed) and, for an Active snapshot with parents (the only
//! one mounted with an upper layer), `snapshots/<id>/work` (overlayfs's work directory). A
//! snapshot is built in `snapshots/.tmp-<id>` and renamed into place. A
//! parentless snapshot's `fs` is exactly 0755 whatever the umask; a child's starts with the
//! owner and mode of its parent's `fs`, because an overlay's root directory shows the upper
//! directory's attributes (containerd copies the owner only).
//!
//! [`OverlayBackend::open`] mounts a tiny overlay under the root first, so that a root that
//! cannot hold upper layers (another overlay, a file system without trusted xattrs) is
//! refused with a clear error instead of failing at the first mount; it also finds out
//! whether the kernel takes `index=off`.
//!
//! **Rootless.** In a user namespace other than the initial one (a `uid_map` other than
//! `0 0 4294967295`), overlayfs can only be mounted with `userxattr` and then keeps its
//! markers in `user.overlay.*` attributes instead of `trusted.overlay.*` (which need
//! `CAP_SYS_ADMIN` in the initial namespace). The backend decides at open
//! ([`OverlayBackend::xattrs`]), adds `userxattr` to every overlay mount it returns, and the
//! store writes and reads opaque markers under that prefix when it applies and diffs layers in
//! the upper directories ([`strata::Backend::overlay_xattrs`]); the layers are the same bytes
//! either way. The probe at open writes an opaque directory and a whiteout (char 0/0) under
//! that prefix and checks that an overlay honours them, so a file system that cannot store
//! them is refused by name at open. The choice is recorded in `ROOT/overlay-xattrs` at the
//! first open; a root opened the other way is refused (its markers would be misread).
//!
//! Mounts follow containerd: a parentless Active snapshot is a read-write `bind` of its `fs`;
//! a View of one parent is a read-only `bind` of the parent's `fs`; an Active snapshot with
//! parents is an `overlay` with `workdir=`, `upperdir=` and `lowerdir=` (immediate parent
//! first); a View of two or more parents is an `overlay` with `lowerdir=` only. `index=off` is
//! added when the kernel has the parameter. Paths are absolute under `ROOT/snapshots/`, one
//! short common prefix, so that containerd's mount(2) path can shorten long lists.
//!
//! **Deep chains.** overlayfs stacks at most 500 lower layers. The backend declares a
//! [`FlattenPolicy`] ([`DEFAULT_FLATTEN`]: chains past 128 layers, a flattened lower every 32
//! layers) and builds flattened lowers with [`strata::layer::flatten`] (directories, and hard
//! links to the layers' files) as `snapshots/<id>/fs` like any layer; the store decides which
//! chain a mount goes through and hands `mounts` the layers above the flattened one followed
//! by it.
//!
//! Directory renames inside an overlay need `redirect_dir`, which strata does not turn on
//! (containerd does not either): renaming a directory that comes from a lower layer fails
//! with `EXDEV`, and tools fall back to copying.
//!
//! **Volatile snapshots.** An Active snapshot created with [`strata::CreateOptions::volatile`]
//! is mounted with `volatile`: no syncs while mounted. The kernel then leaves
//! `work/work/incompat/volatile` behind and refuses to mount the snapshot again.
//! [`strata::mount::unmount`] syncs and clears it; if it is still there when strata is asked
//! for the mounts (or a commit) and the snapshot is not mounted, the backend looks at the boot
//! id recorded at creation: the same boot means the data is still in the page cache, so it
//! syncs and clears the marker; another boot means the machine stopped while the snapshot was
//! mounted volatile, and the snapshot is reported broken (`DataLoss`).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use strata::fsutil;
pub use strata::layer::OverlayXattrs;
use strata::mount::{volatile_marker, OVERLAY_MAX_LAYERS};
use strata::{Backend, BackendError, CreateOptions, ErrorKind, FlattenPolicy, Kind, Mount, Usage};

/// The overlay backend's errors. Each names the snapshot id or path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A file-system operation failed.
    #[error("{path}: {context}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The root cannot hold overlay upper layers.
    #[error("overlayfs cannot use {root} for its layers: {reason}; put the store root on a file system that supports overlay upper directories (ext4, xfs, btrfs) or use --backend native")]
    Unsupported {
        /// The store root.
        root: PathBuf,
        /// What the probe found.
        reason: String,
    },
    /// The file system under the root cannot store overlayfs' markers (an opaque directory's
    /// attribute, a char 0/0 whiteout), or overlayfs does not honour them there.
    #[error("overlayfs cannot use {root} for its layers: {what}; put the store root on a file system that stores {xattrs} attributes and char 0/0 devices (ext4, xfs, btrfs{}) or use --backend native", tmpfs_note(*.xattrs))]
    Markers {
        /// The store root.
        root: PathBuf,
        /// Where the markers live ([`OverlayXattrs::User`] when rootless).
        xattrs: OverlayXattrs,
        /// What failed, with the OS error.
        what: String,
    },
    /// The root was made with overlayfs' markers under the other prefix (rootless and not, or
    /// the other way round).
    #[error("{root} holds overlay layers whose markers are {recorded} attributes ({}; {}{root}/{XATTRS_FILE}), but this process {}: overlayfs would misread its whiteouts and opaque directories; open the store {}, or use a new store root", made_by(*.recorded), if *.unrecorded { "its snapshots predate the record " } else { "recorded in " }, runs_as(*.current), open_as(*.recorded))]
    XattrsMismatch {
        /// The store root.
        root: PathBuf,
        /// What the root was made with.
        recorded: OverlayXattrs,
        /// What this process needs.
        current: OverlayXattrs,
        /// The root has no record: it was made (with `trusted.overlay.*`) before strata
        /// recorded the prefix.
        unrecorded: bool,
    },
    /// `ROOT/overlay-xattrs` holds something else than `trusted` or `user`.
    #[error("{path}: records {content:?}, not \"trusted\" or \"user\" (how overlayfs keeps its markers in this store's layers); write back the one the store was made with (\"user\" if it was made inside a user namespace, rootless) or use a new store root")]
    BadXattrsRecord {
        /// The record's path.
        path: PathBuf,
        /// What it holds.
        content: String,
    },
    /// The mount would stack more directories than overlayfs can (only with a flatten
    /// policy whose step is past the kernel's limit).
    #[error("a mount of {depth} lower directories exceeds overlayfs's limit of {OVERLAY_MAX_LAYERS}; use a flatten step below the limit")]
    TooDeep {
        /// Number of lower directories.
        depth: usize,
    },
    /// Building a flattened lower failed.
    #[error("flattened lower {id}: {source}")]
    Flatten {
        /// The storage id being built.
        id: u64,
        /// What went wrong, naming the path.
        #[source]
        source: strata::Error,
    },
    /// The machine stopped while the snapshot was mounted volatile.
    #[error("snapshot {id} was mounted volatile when the machine stopped (mounted in boot {recorded}, now boot {current}); its contents may be incomplete: remove it and recreate it")]
    VolatileLost {
        /// The snapshot id.
        id: u64,
        /// Boot id recorded at creation.
        recorded: String,
        /// Current boot id.
        current: String,
    },
    /// Committed snapshots have no mounts of their own.
    #[error("snapshot {id} is committed: mount a view of it instead")]
    Committed {
        /// The snapshot id.
        id: u64,
    },
    /// A view of no snapshot was asked for.
    #[error("a view needs at least one committed snapshot")]
    EmptyChain,
}

impl BackendError for OverlayError {
    fn kind(&self) -> ErrorKind {
        match self {
            OverlayError::Io { .. }
            | OverlayError::Unsupported { .. }
            | OverlayError::Markers { .. } => ErrorKind::Internal,
            OverlayError::TooDeep { .. }
            | OverlayError::Committed { .. }
            | OverlayError::XattrsMismatch { .. }
            | OverlayError::BadXattrsRecord { .. } => ErrorKind::FailedPrecondition,
            OverlayError::VolatileLost { .. } => ErrorKind::DataLoss,
            OverlayError::Flatten { source, .. } => source.kind(),
            OverlayError::EmptyChain => ErrorKind::InvalidArgument,
        }
    }
}

fn tmpfs_note(x: OverlayXattrs) -> &'static str {
    match x {
        OverlayXattrs::Trusted => ", tmpfs",
        OverlayXattrs::User => ", tmpfs from Linux 6.6 on",
    }
}

fn made_by(x: OverlayXattrs) -> &'static str {
    match x {
        OverlayXattrs::Trusted => "made in the initial user namespace",
        OverlayXattrs::User => "made rootless, inside a user namespace",
    }
}

fn runs_as(x: OverlayXattrs) -> &'static str {
    match x {
        OverlayXattrs::Trusted => "runs in the initial user namespace, where overlayfs uses trusted.overlay.*",
        OverlayXattrs::User => "runs inside a user namespace, where overlayfs can only be mounted with userxattr and uses user.overlay.*",
    }
}

fn open_as(x: OverlayXattrs) -> &'static str {
    match x {
        OverlayXattrs::Trusted => "as root in the initial user namespace",
        OverlayXattrs::User => "from inside a user namespace (rootless), as it was made",
    }
}

/// The file in the store root recording where overlayfs keeps its markers in the root's
/// layers: `trusted` or `user` ([`OverlayXattrs::as_str`]).
pub const XATTRS_FILE: &str = "overlay-xattrs";

const UID_MAP: &str = "/proc/self/uid_map";

/// Where overlayfs keeps its markers when this process mounts it: `trusted.overlay.*` in the
/// initial user namespace (whose `uid_map` is `0 0 4294967295`), `user.overlay.*` (with
/// `userxattr`) in any other.
pub fn detect_xattrs() -> Result<OverlayXattrs, OverlayError> {
    let map = fs::read_to_string(UID_MAP).map_err(io_err(
        Path::new(UID_MAP),
        "read the user namespace's uid map",
    ))?;
    let fields: Vec<&str> = map.split_whitespace().collect();
    Ok(match fields.as_slice() {
        ["0", "0", "4294967295"] => OverlayXattrs::Trusted,
        _ => OverlayXattrs::User,
    })
}

fn io_err(path: &Path, context: &'static str) -> impl FnOnce(io::Error) -> OverlayError {
    let path = path.to_path_buf();
    move |source| OverlayError::Io {
        path,
        context,
        source,
    }
}

/// The overlay backend's default [`FlattenPolicy`]: chains of up to 128 layers (every image
/// Docker can build) are mounted layer by layer, as containerd mounts them; deeper ones
/// through a flattened lower every 32 layers, so that a mount stacks at most 33 directories.
pub const DEFAULT_FLATTEN: FlattenPolicy = FlattenPolicy {
    threshold: 128,
    step: 32,
};

/// Options of the overlay backend.
#[derive(Debug, Clone)]
pub struct OverlayOptions {
    /// Skip the mount probe at open (for tools that only read metadata). The markers'
    /// prefix is then the one the root records, without checking it against this process.
    pub skip_probe: bool,
    /// When chains are mounted through flattened lowers ([`DEFAULT_FLATTEN`]). Every process
    /// opening a root should use the same policy: `gc` keeps the flattened lowers that the
    /// Active snapshots and Views mount through by its own.
    pub flatten: FlattenPolicy,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            skip_probe: false,
            flatten: DEFAULT_FLATTEN,
        }
    }
}

/// The overlay backend.
#[derive(Debug, Clone)]
pub struct OverlayBackend {
    dirs: fsutil::SnapshotDirs,
    index_off: bool,
    flatten: FlattenPolicy,
    xattrs: OverlayXattrs,
}

const VOLATILE_FILE: &str = "volatile";

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

fn boot_id() -> io::Result<String> {
    Ok(fs::read_to_string(BOOT_ID)?.trim().to_string())
}

impl OverlayBackend {
    /// Opens the backend under the store `root`: creates `root/snapshots` and checks, by
    /// mounting a tiny overlay there, that the root can hold overlay layers.
    pub fn open(root: &Path, opts: OverlayOptions) -> Result<OverlayBackend, OverlayError> {
        let dirs = fsutil::SnapshotDirs::open(root).map_err(io_err(
            &root.join("snapshots"),
            "create the snapshots directory",
        ))?;
        // containerd adds index=off whenever the kernel has the parameter.
        let index_off = Path::new("/sys/module/overlay/parameters/index").exists();
        let current = detect_xattrs()?;
        let recorded = read_xattrs_record(root)?;
        let mut backend = OverlayBackend {
            dirs,
            index_off,
            flatten: opts.flatten,
            xattrs: match (opts.skip_probe, recorded) {
                (true, Some(r)) => r,
                _ => current,
            },
        };
        backend.remove_stale_probes();
        if opts.skip_probe {
            return Ok(backend);
        }
        match recorded {
            Some(r) if r != current => {
                return Err(OverlayError::XattrsMismatch {
                    root: root.to_path_buf(),
                    recorded: r,
                    current,
                    unrecorded: false,
                })
            }
            Some(_) => {}
            None => {
                // A root made before the prefix was recorded has trusted.overlay.* markers.
                let ids = backend.ids()?;
                if current == OverlayXattrs::User && !ids.is_empty() {
                    return Err(OverlayError::XattrsMismatch {
                        root: root.to_path_buf(),
                        recorded: OverlayXattrs::Trusted,
                        current,
                        unrecorded: true,
                    });
                }
            }
        }
        match backend.probe(root) {
            Ok(()) => {}
            Err(e @ OverlayError::Unsupported { .. }) if backend.index_off => {
                // A kernel that lists the parameter but refuses the option: mount without.
                backend.index_off = false;
                backend.probe(root).map_err(|_| e)?;
                tracing::info!(root = %root.display(), "overlayfs refuses index=off here; mounting without it");
            }
            Err(e) => return Err(e),
        }
        if recorded.is_none() {
            write_xattrs_record(root, current)?;
        }
        Ok(backend)
    }

    /// Where overlayfs keeps its markers in this root's layers: `user.overlay.*` when the
    /// backend runs inside a user namespace (rootless) and mounts with `userxattr`.
    pub fn xattrs(&self) -> OverlayXattrs {
        self.xattrs
    }

    /// The options every overlay mount starts with: `userxattr` when rootless, `index=off`
    /// when the kernel takes it.
    fn base_options(&self) -> Vec<String> {
        let mut options = Vec::new();
        if self.xattrs == OverlayXattrs::User {
            options.push("userxattr".to_string());
        }
        if self.index_off {
            options.push("index=off".to_string());
        }
        options
    }

    /// Whether mounts carry `index=off` (the kernel has the parameter and the probe took it).
    pub fn index_off(&self) -> bool {
        self.index_off
    }

    /// Takes off and removes the probes of processes that died while probing (a SIGKILL
    /// between the probe's mount and its unmount leaves the overlay mounted). Best effort.
    fn remove_stale_probes(&self) {
        let Ok(entries) = fs::read_dir(self.dirs.snapshots()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(".probe-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let dir = entry.path();
            let merged = dir.join("merged");
            if let Err(e) = rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::DETACH) {
                if e != rustix::io::Errno::INVAL && e != rustix::io::Errno::NOENT {
                    tracing::warn!(path = %merged.display(), error = %e, "could not take off a dead process's probe mount");
                    continue;
                }
            }
            match fsutil::remove_tree(&dir) {
                Ok(()) => {
                    tracing::info!(path = %dir.display(), pid, "removed the probe of a process that died while probing")
                }
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e, "could not remove a dead process's probe")
                }
            }
        }
    }

    /// Mounts and unmounts a one-layer overlay (lower, upper, work) in the snapshots
    /// directory, with the options snapshots will get. The upper layer holds an opaque
    /// directory and a whiteout, made as the store makes them (see [`probe_markers`]), and
    /// the merged view must hide what they hide.
    fn probe(&self, root: &Path) -> Result<(), OverlayError> {
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let dir = self.dirs.snapshots().join(format!(
            ".probe-{}-{}",
            std::process::id(),
            PROBES.fetch_add(1, Ordering::Relaxed)
        ));
        let unsupported = |reason: String| OverlayError::Unsupported {
            root: root.to_path_buf(),
            reason,
        };
        let _ = fsutil::remove_tree(&dir);
        for d in ["lower", "upper", "work", "merged"] {
            let p = dir.join(d);
            if let Err(e) = fs::create_dir_all(&p) {
                let _ = fsutil::remove_tree(&dir);
                return Err(io_err(&p, "create the overlay probe")(e));
            }
        }
        if let Err(e) = probe_markers(&dir, self.xattrs) {
            let _ = fsutil::remove_tree(&dir);
            return Err(OverlayError::Markers {
                root: root.to_path_buf(),
                xattrs: self.xattrs,
                what: e,
            });
        }
        let mut options = self.base_options();
        options.push(format!("workdir={}", dir.join("work").display()));
        options.push(format!("upperdir={}", dir.join("upper").display()));
        options.push(format!("lowerdir={}", dir.join("lower").display()));
        let m = Mount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options,
        };
        let merged = dir.join("merged");
        let result = strata::mount::mount_all(&[m], &merged)
            .map_err(|e| unsupported(e.to_string()))
            .and_then(|()| {
                let shown =
                    probe_view(&merged, self.xattrs).map_err(|what| OverlayError::Markers {
                        root: root.to_path_buf(),
                        xattrs: self.xattrs,
                        what,
                    });
                let unmounted =
                    strata::mount::unmount(&merged).map_err(|e| unsupported(e.to_string()));
                shown.and(unmounted)
            });
        let _ = fsutil::remove_tree(&dir);
        result
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.dirs.dir(id)
    }

    /// The layer of snapshot `id` (its upper directory while Active).
    pub fn fs_path(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// The work directory of snapshot `id`.
    pub fn work_path(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    fn tmp_dir(&self, id: u64) -> PathBuf {
        self.dirs.tmp(id)
    }

    /// Whether snapshot `id` is mounted somewhere in this mount namespace now (as an
    /// overlay upper layer).
    fn is_mounted(&self, id: u64) -> io::Result<bool> {
        let upper = format!("upperdir={}", self.fs_path(id).display());
        Ok(strata::mount::list_mounts()?
            .iter()
            .any(|m| m.fs_type == "overlay" && m.super_options.contains(&upper)))
    }

    /// Applies the volatile rule (see the crate docs) before the snapshot is used.
    fn check_volatile(&self, id: u64) -> Result<(), OverlayError> {
        let marker_file = self.dir(id).join(VOLATILE_FILE);
        let recorded = match fs::read_to_string(&marker_file) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&marker_file, "read the volatile marker")(e)),
        };
        let work = self.work_path(id);
        if !volatile_marker(&work).exists()
            || self
                .is_mounted(id)
                .map_err(io_err(&work, "read the mount table"))?
        {
            return Ok(());
        }
        let current = boot_id().map_err(io_err(Path::new(BOOT_ID), "read the boot id"))?;
        if recorded != current {
            return Err(OverlayError::VolatileLost {
                id,
                recorded,
                current,
            });
        }
        strata::mount::clear_volatile(&self.fs_path(id), &work).map_err(|e| OverlayError::Io {
            path: work.clone(),
            context: "clear the volatile marker",
            source: io::Error::other(e.to_string()),
        })
    }

    /// Fills the temporary directory of a new snapshot: `fs`, `work` (for an Active snapshot
    /// with parents) and, for a volatile Active snapshot, the boot id it was created in.
    fn build(
        &self,
        tmp: &Path,
        kind: Kind,
        parent: Option<u64>,
        opts: &CreateOptions,
    ) -> Result<(), OverlayError> {
        fs::create_dir(tmp).map_err(io_err(tmp, "create the temporary directory"))?;
        // Only root reaches into a snapshot's storage, whatever the umask.
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o700))
            .map_err(io_err(tmp, "set the snapshot directory's mode"))?;
        // An overlay's root directory shows the upper root's owner and mode, not the
        // lower one's: a child starts with its parent's (containerd copies the owner).
        // Without a parent, fs is exactly 0755 whatever the umask. work is 0711, as
        // containerd makes it.
        let (fs_mode, owner) = match parent {
            Some(p) => {
                let pfs = self.fs_path(p);
                let m = fs::metadata(&pfs).map_err(io_err(&pfs, "stat the parent's layer"))?;
                (m.mode() & 0o7777, Some((m.uid(), m.gid())))
            }
            None => (0o755, None),
        };
        // Only an Active snapshot with parents is mounted as an overlay with an upper layer,
        // the one mount that needs a work directory: the others are bind mounts or
        // read-only overlays. One inode less for every other snapshot (on this machine's
        // ext4, inode allocation is half the CPU time of an empty layer).
        let dirs: &[(&str, u32)] = match (kind, parent) {
            (Kind::Active, Some(_)) => &[("fs", fs_mode), ("work", 0o711)],
            _ => &[("fs", fs_mode)],
        };
        for &(d, mode) in dirs {
            let p = tmp.join(d);
            fs::create_dir(&p).map_err(io_err(&p, "create a snapshot directory"))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .map_err(io_err(&p, "set a snapshot directory's mode"))?;
        }
        if let Some((uid, gid)) = owner.filter(|o| *o != (0, 0)) {
            let p = tmp.join("fs");
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
                .map_err(io_err(&p, "give the layer its parent's owner"))?;
            // chown clears set-id bits.
            fs::set_permissions(&p, fs::Permissions::from_mode(fs_mode))
                .map_err(io_err(&p, "set a snapshot directory's mode"))?;
        }
        if opts.volatile && kind == Kind::Active {
            let f = tmp.join(VOLATILE_FILE);
            let id = boot_id().map_err(io_err(Path::new(BOOT_ID), "read the boot id"))?;
            fs::write(&f, id).map_err(io_err(&f, "write the volatile marker"))?;
        }
        Ok(())
    }

    fn lowerdir(&self, parents: &[u64]) -> String {
        let dirs: Vec<String> = parents
            .iter()
            .map(|p| self.fs_path(*p).to_string_lossy().into_owned())
            .collect();
        format!("lowerdir={}", dirs.join(":"))
    }
}

/// What `ROOT/overlay-xattrs` records; `None` when there is no record yet.
fn read_xattrs_record(root: &Path) -> Result<Option<OverlayXattrs>, OverlayError> {
    let path = root.join(XATTRS_FILE);
    let content = match fs::read_to_string(&path) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(io_err(
                &path,
                "read how the store's overlay markers are kept",
            )(e))
        }
    };
    match OverlayXattrs::parse(content.trim()) {
        Some(x) => Ok(Some(x)),
        None => Err(OverlayError::BadXattrsRecord { path, content }),
    }
}

/// Records `xattrs` in `ROOT/overlay-xattrs`, durably (a temporary file renamed into place:
/// never seen half written).
fn write_xattrs_record(root: &Path, xattrs: OverlayXattrs) -> Result<(), OverlayError> {
    let path = root.join(XATTRS_FILE);
    let tmp = root.join(format!(".{XATTRS_FILE}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        io::Write::write_all(&mut f, format!("{}\n", xattrs.as_str()).as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fsutil::fsync_dir(root)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(&path, "record how the store's overlay markers are kept")(e)
    })
}

/// Makes, in the probe directory `dir`, what the store makes in layers: in `upper`, an opaque
/// directory `d` over `lower/d` (which holds `hidden`) and a whiteout `gone` over
/// `lower/gone`. Says what failed.
fn probe_markers(dir: &Path, xattrs: OverlayXattrs) -> Result<(), String> {
    let lower = dir.join("lower");
    let upper = dir.join("upper");
    let step = |what: &str, p: &Path, r: io::Result<()>| {
        r.map_err(|e| format!("{what} ({}): {e}", p.display()))
    };
    step(
        "cannot create the probe's lower layer",
        &lower,
        fs::create_dir(lower.join("d"))
            .and_then(|()| fs::write(lower.join("d/hidden"), b""))
            .and_then(|()| fs::write(lower.join("gone"), b"")),
    )?;
    let d = upper.join("d");
    step(
        "cannot create the probe's upper layer",
        &d,
        fs::create_dir(&d),
    )?;
    step(
        &format!(
            "the file system cannot store the {} attribute",
            xattrs.opaque()
        ),
        &d,
        rustix::fs::setxattr(&d, xattrs.opaque(), b"y", rustix::fs::XattrFlags::empty())
            .map_err(io::Error::from),
    )?;
    let gone = upper.join("gone");
    step(
        "cannot create a whiteout (a character device 0/0)",
        &gone,
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &gone,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(io::Error::from),
    )
}

/// Checks that the overlay mounted at `merged` over [`probe_markers`]'s layers hides what
/// the markers hide. Says what it shows instead.
fn probe_view(merged: &Path, xattrs: OverlayXattrs) -> Result<(), String> {
    let shows = |name: &str| fs::symlink_metadata(merged.join(name)).is_ok();
    if !shows("d") {
        return Err("the probe's overlay does not show its upper directory".to_string());
    }
    if shows("d/hidden") {
        return Err(format!(
            "overlayfs ignores the {} attribute here (an opaque directory showed the lower one's entries)",
            xattrs.opaque()
        ));
    }
    if shows("gone") {
        return Err(
            "overlayfs ignores whiteouts here (a char 0/0 device did not hide the lower entry)"
                .to_string(),
        );
    }
    Ok(())
}

impl Backend for OverlayBackend {
    type Error = OverlayError;

    fn name(&self) -> &'static str {
        "overlay"
    }

    fn create(
        &self,
        id: u64,
        kind: Kind,
        parents: &[u64],
        opts: &CreateOptions,
    ) -> Result<(), OverlayError> {
        let tmp = self.tmp_dir(id);
        fsutil::remove_tree(&tmp).map_err(io_err(&tmp, "remove a leftover temporary directory"))?;
        if let Err(e) = self.build(&tmp, kind, parents.first().copied(), opts) {
            // Best effort: remove() clears it too.
            let _ = fsutil::remove_tree(&tmp);
            return Err(e);
        }
        let dir = self.dir(id);
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = fsutil::remove_tree(&tmp);
            return Err(io_err(&dir, "rename the new snapshot into place")(e));
        }
        if opts.durable {
            // After the rename: on a journaling file system the first sync commits
            // everything at once and the second finds nothing left to do.
            fsutil::fsync_dir(&dir).map_err(io_err(&dir, "sync the snapshot directory"))?;
            fsutil::fsync_dir(self.dirs.snapshots()).map_err(io_err(
                self.dirs.snapshots(),
                "sync the snapshots directory",
            ))?;
        }
        Ok(())
    }

    fn fresh_is_rebuildable(&self) -> bool {
        // create makes two empty directories: fs with its parent's owner and mode, and work.
        true
    }

    fn is_fresh(&self, id: u64, parents: &[u64]) -> Result<bool, OverlayError> {
        let fs_dir = self.fs_path(id);
        let io = |e| io_err(&fs_dir, "check whether the layer is still empty")(e);
        let dir = fs::File::open(&fs_dir).map_err(io)?;
        let meta = dir.metadata().map_err(io)?;
        let (mode, owner) = match parents.first() {
            Some(p) => {
                let pfs = self.fs_path(*p);
                let m = fs::metadata(&pfs).map_err(io_err(&pfs, "stat the parent's layer"))?;
                (m.mode() & 0o7777, (m.uid(), m.gid()))
            }
            None => (
                0o755,
                (
                    rustix::process::geteuid().as_raw(),
                    rustix::process::getegid().as_raw(),
                ),
            ),
        };
        if meta.mode() & 0o7777 != mode || (meta.uid(), meta.gid()) != owner {
            return Ok(false);
        }
        // Any xattr (an opaque marker, a capability, a label) is content, except the uuid
        // the kernel writes on an upper root when it first mounts it (6.6+): bookkeeping
        // of that mount, never shown through it, written again if the layer is ever an
        // upper layer again.
        let content = fsutil::xattrs(&dir)
            .map_err(io)?
            .into_iter()
            .any(|(name, _)| name != b"trusted.overlay.uuid" && name != b"user.overlay.uuid");
        if content {
            return Ok(false);
        }
        Ok(fs::read_dir(&fs_dir).map_err(io)?.next().is_none())
    }

    fn commit(&self, id: u64, _parents: &[u64], durable: bool) -> Result<Usage, OverlayError> {
        self.check_volatile(id)?;
        let fs_dir = self.fs_path(id);
        if durable {
            fsutil::sync_filesystem(&fs_dir).map_err(io_err(&fs_dir, "sync the layer"))?;
        }
        let marker = self.dir(id).join(VOLATILE_FILE);
        fsutil::remove_tree(&marker).map_err(io_err(&marker, "remove the volatile marker"))?;
        fsutil::disk_usage(&fs_dir).map_err(io_err(&fs_dir, "measure the layer"))
    }

    fn flatten_policy(&self) -> Option<FlattenPolicy> {
        Some(self.flatten)
    }

    fn flatten(
        &self,
        id: u64,
        chain: &[u64],
        durable: bool,
    ) -> Result<Option<Usage>, OverlayError> {
        let tmp = self.tmp_dir(id);
        fsutil::remove_tree(&tmp).map_err(io_err(&tmp, "remove a leftover temporary directory"))?;
        let built = (|| {
            fs::create_dir(&tmp).map_err(io_err(&tmp, "create the temporary directory"))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700))
                .map_err(io_err(&tmp, "set the snapshot directory's mode"))?;
            let fs_dir = tmp.join("fs");
            // flatten gives it the top layer's owner, mode and times.
            fs::create_dir(&fs_dir).map_err(io_err(&fs_dir, "create a snapshot directory"))?;
            let layers: Vec<PathBuf> = chain.iter().map(|l| self.fs_path(*l)).collect();
            strata::layer::flatten::flatten_with(&layers, &fs_dir, self.xattrs)
                .map_err(|source| OverlayError::Flatten { id, source })
        })();
        let stats = match built {
            Ok(s) => s,
            Err(e) => {
                let _ = fsutil::remove_tree(&tmp);
                return Err(e);
            }
        };
        let dir = self.dir(id);
        if durable {
            // Before the rename: a flattened lower in place is a complete one.
            fsutil::sync_filesystem(&tmp).map_err(io_err(&tmp, "sync the flattened lower"))?;
        }
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = fsutil::remove_tree(&tmp);
            return Err(io_err(&dir, "rename the flattened lower into place")(e));
        }
        if durable {
            fsutil::fsync_dir(self.dirs.snapshots()).map_err(io_err(
                self.dirs.snapshots(),
                "sync the snapshots directory",
            ))?;
        }
        Ok(Some(Usage {
            size: stats.bytes,
            inodes: stats.dirs + 1 + stats.copies,
        }))
    }

    fn mounts(&self, id: u64, kind: Kind, parents: &[u64]) -> Result<Vec<Mount>, OverlayError> {
        if parents.len() > OVERLAY_MAX_LAYERS {
            return Err(OverlayError::TooDeep {
                depth: parents.len(),
            });
        }
        match (kind, parents) {
            (Kind::Committed, _) => Err(OverlayError::Committed { id }),
            (Kind::Active, []) => Ok(vec![Mount::bind(&self.fs_path(id), false)]),
            (Kind::View, []) => Ok(vec![Mount::bind(&self.fs_path(id), true)]),
            (Kind::View, [parent]) => Ok(vec![Mount::bind(&self.fs_path(*parent), true)]),
            (Kind::View, _) => {
                let mut options = self.base_options();
                options.push(self.lowerdir(parents));
                Ok(vec![Mount {
                    fs_type: "overlay".into(),
                    source: "overlay".into(),
                    options,
                }])
            }
            (Kind::Active, _) => {
                self.check_volatile(id)?;
                let mut options = self.base_options();
                if self.dir(id).join(VOLATILE_FILE).exists() {
                    options.push("volatile".to_string());
                }
                options.push(format!("workdir={}", self.work_path(id).display()));
                options.push(format!("upperdir={}", self.fs_path(id).display()));
                options.push(self.lowerdir(parents));
                Ok(vec![Mount {
                    fs_type: "overlay".into(),
                    source: "overlay".into(),
                    options,
                }])
            }
        }
    }

    fn view_mounts(&self, chain: &[u64]) -> Result<Vec<Mount>, OverlayError> {
        match chain {
            [] => Err(OverlayError::EmptyChain),
            [top] => Ok(vec![Mount::bind(&self.fs_path(*top), true)]),
            _ if chain.len() > OVERLAY_MAX_LAYERS => {
                Err(OverlayError::TooDeep { depth: chain.len() })
            }
            _ => {
                let mut options = self.base_options();
                options.push(self.lowerdir(chain));
                Ok(vec![Mount {
                    fs_type: "overlay".into(),
                    source: "overlay".into(),
                    options,
                }])
            }
        }
    }

    fn remove(&self, id: u64) -> Result<(), OverlayError> {
        self.dirs
            .remove(id)
            .map_err(|(path, e)| io_err(&path, "remove the snapshot")(e))
    }

    fn usage(&self, id: u64) -> Result<Usage, OverlayError> {
        let fs_dir = self.fs_path(id);
        fsutil::disk_usage(&fs_dir).map_err(io_err(&fs_dir, "measure the layer"))
    }

    fn exists(&self, id: u64) -> Result<bool, OverlayError> {
        self.dirs
            .exists(id)
            .map_err(io_err(&self.fs_path(id), "look for the snapshot"))
    }

    fn layer_path(&self, id: u64) -> Option<PathBuf> {
        Some(self.fs_path(id))
    }

    fn overlay_upper(&self, id: u64) -> Option<PathBuf> {
        Some(self.fs_path(id))
    }

    fn overlay_xattrs(&self) -> OverlayXattrs {
        self.xattrs
    }

    fn ids(&self) -> Result<Vec<u64>, OverlayError> {
        self.dirs
            .ids()
            .map_err(io_err(self.dirs.snapshots(), "list snapshots"))
    }
}

#[cfg(test)]
mod tests;
