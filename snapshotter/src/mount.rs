//! Mount helpers: put a snapshot's [`Mount`]s on a target, take them off, temporary mounts.
//!
//! Overlay mounts go through the new mount API (`fsopen`/`fsconfig`/`fsmount`), passing each
//! lower layer as its own `lowerdir+` parameter (Linux ≥ 6.8), so that no option string limits
//! the depth of a chain. Where that is not available, or when forced with
//! [`set_overlay_mount_mode`] / `STRATA_OVERLAY_MOUNT=legacy`, they go through mount(2): as is
//! when the option string fits in a page, else with the lower layers made relative to their
//! common parent directory (as containerd does), in a short-lived thread that has its own
//! working directory (`unshare(CLONE_FS)`), so that no other thread's moves. Either way at most
//! [`overlay_max_layers`] lower layers fit in one overlay.
//!
//! What `/proc/self/mountinfo` then shows (Linux 6.18): one `lowerdir+=` per layer and the
//! source given for the fsconfig path; `lowerdir=` as given (relative, when compacted) for
//! mount(2). `upperdir=` and `workdir=` are always absolute, which [`unmount`] relies on.
//!
//! An overlay mounted `volatile` (mountinfo: `fsync=volatile`) leaves
//! `<workdir>/work/incompat/volatile/` (holding a file `dirty`) behind when unmounted, and the
//! kernel refuses to mount that work directory again until it is removed: [`unmount`] syncs
//! the upper layer's file system and removes it.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
};

use crate::error::{Error, Result};
use crate::types::Mount;

/// overlayfs's limit on lower layers in one mount (the kernel's `OVL_MAX_STACK`).
pub const OVERLAY_MAX_LAYERS: usize = 500;

/// overlayfs's limit on lower layers in one mount (the kernel's `OVL_MAX_STACK`, 500): a
/// snapshot whose chain is deeper cannot be presented as one overlay.
pub fn overlay_max_layers() -> usize {
    OVERLAY_MAX_LAYERS
}

/// The longest option string mount(2) accepts: one page, with its terminating NUL.
const PAGE_LIMIT: usize = 4095;

/// How overlay mounts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayMountMode {
    /// The new mount API with `lowerdir+` where the kernel has it, mount(2) otherwise.
    Auto,
    /// Always mount(2), compacting long option strings.
    Legacy,
}

const MODE_UNSET: u8 = 0;
const MODE_AUTO: u8 = 1;
const MODE_LEGACY: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);

/// Whether the kernel accepts `lowerdir+` through fsconfig: not known yet, yes, or no.
static LOWERDIR_PLUS: AtomicU8 = AtomicU8::new(LOWERDIR_PLUS_UNKNOWN);
const LOWERDIR_PLUS_UNKNOWN: u8 = 0;
const LOWERDIR_PLUS_YES: u8 = 1;
const LOWERDIR_PLUS_NO: u8 = 2;

/// Sets how this process mounts overlays. The default is [`OverlayMountMode::Auto`], or
/// [`OverlayMountMode::Legacy`] when the environment has `STRATA_OVERLAY_MOUNT=legacy`.
pub fn set_overlay_mount_mode(mode: OverlayMountMode) {
    let v = match mode {
        OverlayMountMode::Auto => MODE_AUTO,
        OverlayMountMode::Legacy => MODE_LEGACY,
    };
    MODE.store(v, Ordering::Relaxed);
}

/// How this process mounts overlays now.
pub fn overlay_mount_mode() -> OverlayMountMode {
    let mut v = MODE.load(Ordering::Relaxed);
    if v == MODE_UNSET {
        v = if std::env::var("STRATA_OVERLAY_MOUNT").is_ok_and(|m| m == "legacy") {
            MODE_LEGACY
        } else {
            MODE_AUTO
        };
        MODE.store(v, Ordering::Relaxed);
    }
    if v == MODE_LEGACY {
        OverlayMountMode::Legacy
    } else {
        OverlayMountMode::Auto
    }
}

/// Whether the kernel takes overlay layers one by one (`lowerdir+` through fsconfig), as
/// far as this process found out: `None` until the first overlay mount in
/// [`OverlayMountMode::Auto`].
pub fn overlay_lowerdir_plus() -> Option<bool> {
    match LOWERDIR_PLUS.load(Ordering::Relaxed) {
        LOWERDIR_PLUS_YES => Some(true),
        LOWERDIR_PLUS_NO => Some(false),
        _ => None,
    }
}

/// Mounts `mounts` on `target`, in order, each on top of the previous one.
///
/// `bind` mounts take `bind`/`rbind` and `ro`/`rw`; a read-only bind is remounted read-only
/// (a bind mount ignores `MS_RDONLY` on its first mount). `overlay` mounts take overlayfs's
/// options (`lowerdir=a:b`, `upperdir=`, `workdir=`, `index=off`, `volatile`, `userxattr`,
/// `redirect_dir=`, `metacopy=`, `ro`, ...) and are mounted as [`overlay_mount_mode`] says.
/// Other types go to mount(2) as they are.
///
/// When a mount fails, the ones this call already made on `target` are taken off again, and
/// the error ([`Error::Mount`]) names the target, the mount (long `lowerdir=` lists cut
/// short, see [`Mount::summary`]) and the kernel's reason.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    mount_all_with(mounts, target, overlay_mount_mode())
}

/// [`mount_all`] with an explicit overlay mount mode for this call only, whatever
/// [`set_overlay_mount_mode`] says.
pub fn mount_all_with(mounts: &[Mount], target: &Path, mode: OverlayMountMode) -> Result<()> {
    for (done, m) in mounts.iter().enumerate() {
        if let Err(source) = mount_one(m, target, mode) {
            // Take off what this call stacked on the target, newest first.
            for _ in 0..done {
                if let Err(e) = rustix::mount::unmount(target, UnmountFlags::DETACH) {
                    tracing::warn!(target = %target.display(), error = %e, "could not take off a mount after a later one failed");
                    break;
                }
            }
            return Err(Error::Mount {
                target: target.to_path_buf(),
                mount: m.summary(),
                source,
            });
        }
    }
    Ok(())
}

/// The flags and the remaining data options of a mount's option list.
fn split_options(options: &[String]) -> (MountFlags, bool, Vec<String>) {
    let mut flags = MountFlags::empty();
    let mut readonly = false;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => readonly = true,
            "rw" | "defaults" => {}
            "bind" => flags |= MountFlags::BIND,
            "rbind" => flags |= MountFlags::BIND | MountFlags::REC,
            "nosuid" => flags |= MountFlags::NOSUID,
            "nodev" => flags |= MountFlags::NODEV,
            "noexec" => flags |= MountFlags::NOEXEC,
            "noatime" => flags |= MountFlags::NOATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            "sync" => flags |= MountFlags::SYNCHRONOUS,
            _ => data.push(o.clone()),
        }
    }
    (flags, readonly, data)
}

fn mount_one(m: &Mount, target: &Path, mode: OverlayMountMode) -> io::Result<()> {
    let (mut flags, readonly, data) = split_options(&m.options);
    match m.fs_type.as_str() {
        "bind" | "rbind" => {
            flags |= MountFlags::BIND;
            if m.fs_type == "rbind" {
                flags |= MountFlags::REC;
            }
            rustix::mount::mount(m.source.as_str(), target, "", flags, None)?;
            if readonly {
                // A bind mount takes its flags only from a remount.
                let remount = rustix::mount::mount_remount(
                    target,
                    MountFlags::BIND
                        | MountFlags::RDONLY
                        | (flags - MountFlags::REC - MountFlags::BIND),
                    "",
                );
                if let Err(e) = remount {
                    let _ = rustix::mount::unmount(target, UnmountFlags::DETACH);
                    return Err(e.into());
                }
            }
            Ok(())
        }
        "overlay" => mount_overlay(&m.source, target, flags, readonly, data, mode),
        other => {
            if readonly {
                flags |= MountFlags::RDONLY;
            }
            let data = CString::new(data.join(",")).map_err(io::Error::other)?;
            rustix::mount::mount(
                m.source.as_str(),
                target,
                other,
                flags,
                Some(data.as_c_str()),
            )?;
            Ok(())
        }
    }
}

/// An overlay's options, taken apart.
struct OverlayOptions {
    lower: Vec<String>,
    upper: Option<String>,
    work: Option<String>,
    other: Vec<String>,
}

fn parse_overlay(data: Vec<String>) -> OverlayOptions {
    let mut o = OverlayOptions {
        lower: Vec::new(),
        upper: None,
        work: None,
        other: Vec::new(),
    };
    for opt in data {
        if let Some(l) = opt.strip_prefix("lowerdir=") {
            o.lower
                .extend(l.split(':').filter(|s| !s.is_empty()).map(str::to_string));
        } else if let Some(u) = opt.strip_prefix("upperdir=") {
            o.upper = Some(u.to_string());
        } else if let Some(w) = opt.strip_prefix("workdir=") {
            o.work = Some(w.to_string());
        } else {
            o.other.push(opt);
        }
    }
    o
}

fn mount_overlay(
    source: &str,
    target: &Path,
    flags: MountFlags,
    readonly: bool,
    data: Vec<String>,
    mode: OverlayMountMode,
) -> io::Result<()> {
    let o = parse_overlay(data);
    if o.lower.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an overlay mount needs at least one lowerdir",
        ));
    }
    if o.lower.len() > OVERLAY_MAX_LAYERS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} lower layers exceed overlayfs's limit of {OVERLAY_MAX_LAYERS}",
                o.lower.len()
            ),
        ));
    }
    let source = if source.is_empty() { "overlay" } else { source };
    if mode == OverlayMountMode::Auto && LOWERDIR_PLUS.load(Ordering::Relaxed) != LOWERDIR_PLUS_NO {
        match mount_overlay_fsconfig(&o, source, target, flags, readonly) {
            Ok(()) => {
                LOWERDIR_PLUS.store(LOWERDIR_PLUS_YES, Ordering::Relaxed);
                return Ok(());
            }
            Err(FsconfigError::Unsupported) => {
                tracing::debug!(
                    "the kernel has no fsconfig lowerdir+; overlays go through mount(2)"
                );
                LOWERDIR_PLUS.store(LOWERDIR_PLUS_NO, Ordering::Relaxed);
            }
            Err(FsconfigError::CreateInvalid(e))
                if LOWERDIR_PLUS.load(Ordering::Relaxed) == LOWERDIR_PLUS_UNKNOWN =>
            {
                // Before Linux 6.5 overlayfs parsed fsconfig options the old way: `lowerdir+`
                // is taken, and refused only here, as one EINVAL among others. mount(2)
                // decides: if it works, the kernel simply has no `lowerdir+`.
                return match mount_overlay_legacy(&o, source, target, flags, readonly, mode) {
                    Ok(()) => {
                        tracing::debug!(
                            "the kernel refused fsconfig lowerdir+ at create; overlays go through mount(2)"
                        );
                        LOWERDIR_PLUS.store(LOWERDIR_PLUS_NO, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(_) => Err(e),
                };
            }
            Err(FsconfigError::Failed(e) | FsconfigError::CreateInvalid(e)) => return Err(e),
        }
    }
    mount_overlay_legacy(&o, source, target, flags, readonly, mode)
}

enum FsconfigError {
    /// The kernel lacks the new mount API or `lowerdir+`.
    Unsupported,
    /// The overlay's creation failed with EINVAL: bad options, or (Linux < 6.5) a kernel that
    /// took `lowerdir+` without knowing it.
    CreateInvalid(io::Error),
    /// The mount failed for another reason.
    Failed(io::Error),
}

/// Reads the messages the kernel queued on a filesystem context (e.g. "overlayfs: ...").
fn fs_context_messages(fd: &rustix::fd::OwnedFd) -> String {
    let mut out = Vec::new();
    for _ in 0..8 {
        let mut buf = [0u8; 512];
        match rustix::io::read(fd, &mut buf[..]) {
            Ok(n) if n > 0 => out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            _ => break,
        }
    }
    out.join("; ")
}

fn with_messages(fd: &rustix::fd::OwnedFd, e: rustix::io::Errno, what: &str) -> io::Error {
    let msgs = fs_context_messages(fd);
    let base: io::Error = e.into();
    if msgs.is_empty() {
        io::Error::new(base.kind(), format!("{what}: {base}"))
    } else {
        io::Error::new(base.kind(), format!("{what}: {base} ({msgs})"))
    }
}

/// The new mount API: one `lowerdir+` per layer, so no option string limits the chain.
fn mount_overlay_fsconfig(
    o: &OverlayOptions,
    source: &str,
    target: &Path,
    flags: MountFlags,
    readonly: bool,
) -> std::result::Result<(), FsconfigError> {
    use rustix::io::Errno;
    let fd = match rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fd) => fd,
        Err(Errno::NOSYS) | Err(Errno::PERM) => return Err(FsconfigError::Unsupported),
        Err(e) => return Err(FsconfigError::Failed(e.into())),
    };
    // What mountinfo shows as the source (mount(2) passes it as the device name).
    rustix::mount::fsconfig_set_string(&fd, "source", source)
        .map_err(|e| FsconfigError::Failed(with_messages(&fd, e, "source")))?;
    for (i, l) in o.lower.iter().enumerate() {
        if let Err(e) = rustix::mount::fsconfig_set_string(&fd, "lowerdir+", l.as_str()) {
            if i == 0 && e == Errno::INVAL && fs_context_messages(&fd).contains("lowerdir+") {
                return Err(FsconfigError::Unsupported);
            }
            return Err(FsconfigError::Failed(with_messages(
                &fd,
                e,
                &format!("lowerdir+ {l}"),
            )));
        }
    }
    let mut params: Vec<(&str, Option<&str>)> = Vec::new();
    if let Some(u) = &o.upper {
        params.push(("upperdir", Some(u)));
    }
    if let Some(w) = &o.work {
        params.push(("workdir", Some(w)));
    }
    for opt in &o.other {
        match opt.split_once('=') {
            Some((k, v)) => params.push((k, Some(v))),
            None => params.push((opt, None)),
        }
    }
    if readonly {
        // A read-only super block, as MS_RDONLY gives mount(2): the work directory is unused.
        params.push(("ro", None));
    }
    for (k, v) in params {
        let r = match v {
            Some(v) => rustix::mount::fsconfig_set_string(&fd, k, v),
            None => rustix::mount::fsconfig_set_flag(&fd, k),
        };
        r.map_err(|e| FsconfigError::Failed(with_messages(&fd, e, k)))?;
    }
    rustix::mount::fsconfig_create(&fd).map_err(|e| {
        let err = with_messages(&fd, e, "create the overlay");
        if e == Errno::INVAL {
            FsconfigError::CreateInvalid(err)
        } else {
            FsconfigError::Failed(err)
        }
    })?;
    let mut attrs = MountAttrFlags::empty();
    if readonly {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    if flags.contains(MountFlags::NOSUID) {
        attrs |= MountAttrFlags::MOUNT_ATTR_NOSUID;
    }
    if flags.contains(MountFlags::NODEV) {
        attrs |= MountAttrFlags::MOUNT_ATTR_NODEV;
    }
    if flags.contains(MountFlags::NOEXEC) {
        attrs |= MountAttrFlags::MOUNT_ATTR_NOEXEC;
    }
    if flags.contains(MountFlags::NOATIME) {
        attrs |= MountAttrFlags::MOUNT_ATTR_NOATIME;
    }
    let mnt = rustix::mount::fsmount(&fd, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| FsconfigError::Failed(with_messages(&fd, e, "fsmount")))?;
    rustix::mount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| FsconfigError::Failed(e.into()))
}

/// The longest common parent directory of `paths` (all absolute), with a trailing `/`.
fn common_dir(paths: &[&str]) -> Option<String> {
    let first = paths.first()?;
    let mut prefix: &str = first;
    for p in &paths[1..] {
        let n = prefix
            .bytes()
            .zip(p.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        prefix = &prefix[..n];
    }
    // Cut back to a directory boundary that every path continues after.
    let cut = prefix.rfind('/')?;
    let dir = &prefix[..=cut];
    if dir.len() <= 1 || !dir.starts_with('/') {
        return None;
    }
    Some(dir.to_string())
}

/// The mount(2) option string, in containerd's order (the other options, `workdir=`,
/// `upperdir=`, `lowerdir=`), with `strip` cut off the front of every lower layer.
///
/// Only the lower layers are made relative, as containerd does: the upper and work
/// directories stay absolute, so that `/proc/self/mountinfo` keeps naming them (the kernel
/// shows paths as they were given), which [`unmount`]'s volatile clean-up and the backends'
/// "is it mounted" checks rely on.
fn overlay_data(o: &OverlayOptions, strip: &str) -> String {
    let mut parts: Vec<String> = o.other.clone();
    if let Some(w) = &o.work {
        parts.push(format!("workdir={w}"));
    }
    if let Some(u) = &o.upper {
        parts.push(format!("upperdir={u}"));
    }
    let lower: Vec<&str> = o
        .lower
        .iter()
        .map(|l| l.strip_prefix(strip).unwrap_or(l))
        .collect();
    parts.push(format!("lowerdir={}", lower.join(":")));
    parts.join(",")
}

/// mount(2): the options as they are when they fit in a page, else with the lower layers
/// relative to their common parent directory, mounted from a thread whose working directory
/// is that directory (and no other thread's).
fn mount_overlay_legacy(
    o: &OverlayOptions,
    source: &str,
    target: &Path,
    mut flags: MountFlags,
    readonly: bool,
    mode: OverlayMountMode,
) -> io::Result<()> {
    if readonly {
        flags |= MountFlags::RDONLY;
    }
    let full = overlay_data(o, "");
    if full.len() <= PAGE_LIMIT {
        let data = CString::new(full).map_err(io::Error::other)?;
        rustix::mount::mount(source, target, "overlay", flags, Some(data.as_c_str()))?;
        return Ok(());
    }
    let remedy = match mode {
        OverlayMountMode::Legacy => {
            "unset STRATA_OVERLAY_MOUNT=legacy so that the layers go one by one through fsconfig"
        }
        OverlayMountMode::Auto => {
            "this kernel has no fsconfig lowerdir+ (Linux 6.8 or later has it); use shorter store paths or fewer layers"
        }
    };
    let paths: Vec<&str> = o.lower.iter().map(String::as_str).collect();
    let dir = common_dir(&paths).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the options of {} lower layers take {} bytes, more than mount(2)'s page of {PAGE_LIMIT}, and the layers share no parent directory to shorten them; {remedy}",
                o.lower.len(),
                full.len()
            ),
        )
    })?;
    let short = overlay_data(o, &dir);
    if short.len() > PAGE_LIMIT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the options of {} lower layers take {} bytes even relative to {dir}, more than mount(2)'s page of {PAGE_LIMIT}; {remedy}",
                o.lower.len(),
                short.len()
            ),
        ));
    }
    // The target must not depend on the working directory we are about to change.
    let target = std::path::absolute(target)?;
    let data = CString::new(short).map_err(io::Error::other)?;
    let source = source.to_string();
    let handle = std::thread::Builder::new()
        .name("strata-mount".into())
        .spawn(move || -> io::Result<()> {
            // chdir is per process unless the thread has its own fs_struct.
            crate::sys::unshare_fs()?;
            rustix::process::chdir(dir.as_str())?;
            rustix::mount::mount(
                source.as_str(),
                &target,
                "overlay",
                flags,
                Some(data.as_c_str()),
            )?;
            Ok(())
        })?;
    handle
        .join()
        .map_err(|_| io::Error::other("the mount thread panicked"))?
}

/// What `/proc/self/mountinfo` says about one mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount point.
    pub target: PathBuf,
    /// The file-system type.
    pub fs_type: String,
    /// The super-block options (for overlay: `lowerdir=`, `upperdir=`, `workdir=`, ...).
    pub super_options: Vec<String>,
    /// The directory of the file system that is mounted (for a bind mount, the bound path
    /// relative to its file system's root).
    pub root: PathBuf,
    /// The file system's device, `major:minor`.
    pub dev: String,
}

impl MountInfo {
    /// Whether this mount presents something under `dir` (a directory on a mounted file
    /// system): an overlay whose layers are there, or a bind mount of a path below it.
    pub fn refers_to(&self, dir: &Path, mounts: &[MountInfo]) -> bool {
        let dir_s = dir.to_string_lossy();
        if self.super_options.iter().any(|o| o.contains(&*dir_s)) {
            return true;
        }
        // The mount holding `dir`: the longest mount point above it.
        let Some(holder) = mounts
            .iter()
            .filter(|m| dir.starts_with(&m.target))
            .max_by_key(|m| m.target.as_os_str().len())
        else {
            return false;
        };
        let Ok(rel) = dir.strip_prefix(&holder.target) else {
            return false;
        };
        self.dev == holder.dev && self.root.starts_with(holder.root.join(rel))
    }
}

/// Decodes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount of this process's mount namespace, in mount order.
pub fn list_mounts() -> io::Result<Vec<MountInfo>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < sep + 4 || fields.len() < 5 {
            continue;
        }
        out.push(MountInfo {
            target: PathBuf::from(unescape(fields[4])),
            fs_type: fields[sep + 1].to_string(),
            super_options: fields[sep + 3].split(',').map(unescape).collect(),
            root: PathBuf::from(unescape(fields[3])),
            dev: fields[2].to_string(),
        });
    }
    Ok(out)
}

/// The topmost mount on `target`, if any.
pub fn mount_info(target: &Path) -> io::Result<Option<MountInfo>> {
    let target = fs::canonicalize(target)?;
    Ok(list_mounts()?.into_iter().rfind(|m| m.target == target))
}

/// The process id in the name of a [`TempMount`] directory (`strata-mount-<pid>-<n>`).
pub fn temp_mount_pid(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("strata-mount-")?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Unmounts `target`.
///
/// An overlay mounted `volatile` leaves `work/incompat/volatile` in its work directory, and
/// the kernel refuses to mount it again while that is there. After unmounting such an overlay
/// this syncs the upper layer's file system and clears that directory, so the snapshot can be
/// mounted again with nothing lost.
pub fn unmount(target: &Path) -> Result<()> {
    let info = mount_info(target).map_err(|e| Error::io(target, "read the mount table", e))?;
    unmount_retrying(target)?;
    if let Some(info) = info.filter(|i| i.fs_type == "overlay") {
        let volatile = info
            .super_options
            .iter()
            .any(|o| o == "volatile" || o == "fsync=volatile");
        let opt = |k: &str| {
            info.super_options
                .iter()
                .find_map(|o| o.strip_prefix(k).map(PathBuf::from))
        };
        if let (true, Some(upper), Some(work)) = (volatile, opt("upperdir="), opt("workdir=")) {
            clear_volatile(&upper, &work)?;
        }
    }
    Ok(())
}

/// umount(2), retried for up to a second while the mount is busy: a child process between
/// fork and exec briefly holds copies of every open descriptor, including files inside the
/// mount (containerd retries the same way).
fn unmount_retrying(target: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::BUSY) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(Error::io(target, "unmount", e.into())),
        }
    }
}

/// Makes a volatile overlay's upper layer durable and clears the kernel's
/// `work/incompat/volatile` marker so that it can be mounted again.
pub fn clear_volatile(upper: &Path, work: &Path) -> Result<()> {
    crate::fsutil::sync_filesystem(upper)
        .map_err(|e| Error::io(upper, "sync the volatile upper layer", e))?;
    let marker = volatile_marker(work);
    crate::fsutil::remove_tree(&marker)
        .map_err(|e| Error::io(&marker, "clear the volatile marker", e))
}

/// Where the kernel marks a work directory that was mounted `volatile`.
pub fn volatile_marker(work: &Path) -> PathBuf {
    work.join("work").join("incompat").join("volatile")
}

/// A mount on a temporary directory, unmounted and removed on drop.
#[derive(Debug)]
pub struct TempMount {
    path: PathBuf,
    mounted: bool,
}

impl TempMount {
    /// Mounts `mounts` on a new directory under the system's temporary directory.
    pub fn new(mounts: &[Mount]) -> Result<TempMount> {
        TempMount::new_in(&std::env::temp_dir(), mounts)
    }

    /// Mounts `mounts` on a new directory under `parent`.
    pub fn new_in(parent: &Path, mounts: &[Mount]) -> Result<TempMount> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = parent.join(format!(
            "strata-mount-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).map_err(|e| Error::io(&path, "create a temporary mount point", e))?;
        let mut tm = TempMount {
            path,
            mounted: false,
        };
        mount_all(mounts, &tm.path)?;
        tm.mounted = true;
        Ok(tm)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and removes the mount point, reporting failures (drop only logs them).
    pub fn unmount(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.mounted {
            unmount(&self.path)?;
            self.mounted = false;
        }
        fs::remove_dir(&self.path)
            .map_err(|e| Error::io(&self.path, "remove a temporary mount point", e))
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        if let Err(e) = self.release() {
            tracing::warn!(path = %self.path.display(), error = %e, "unmounting a temporary mount failed; detaching it");
            let _ = rustix::mount::unmount(&self.path, UnmountFlags::DETACH);
            let _ = fs::remove_dir(&self.path);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Whether this process may mount; with `STRATA_REQUIRE_PRIVILEGED=1` a test that cannot
    /// run fails instead of being skipped.
    pub(crate) fn can_mount() -> bool {
        let root = rustix::process::geteuid().is_root();
        let overlay = fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("overlay");
        if root && overlay {
            return true;
        }
        if std::env::var("STRATA_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
            panic!("this test needs root and overlayfs, and STRATA_REQUIRE_PRIVILEGED=1 forbids skipping it");
        }
        eprintln!("SKIPPED: needs root and overlayfs");
        false
    }

    /// `n` lower layers `base/<i>/fs` (the store's layout), each with `f<i>` and `top`;
    /// top-most first.
    fn layers(base: &Path, n: usize) -> Vec<String> {
        let mut dirs = Vec::new();
        for i in 0..n {
            let d = base.join(i.to_string()).join("fs");
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(format!("f{i}")), i.to_string()).unwrap();
            fs::write(d.join("top"), i.to_string()).unwrap();
            dirs.push(d.to_string_lossy().into_owned());
        }
        dirs.reverse();
        dirs
    }

    /// An overlay of `lowers`, writable into `base/upper` (work `base/work`) when `upper`.
    fn overlay(base: &Path, lowers: &[String], upper: bool, extra: &[&str]) -> Mount {
        let mut options: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if upper {
            for d in ["upper", "work"] {
                fs::create_dir_all(base.join(d)).unwrap();
            }
            options.push(format!("workdir={}", base.join("work").display()));
            options.push(format!("upperdir={}", base.join("upper").display()));
        }
        options.push(format!("lowerdir={}", lowers.join(":")));
        Mount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options,
        }
    }

    fn target(base: &Path) -> PathBuf {
        let t = base.join("mnt");
        fs::create_dir_all(&t).unwrap();
        t
    }

    #[test]
    fn both_overlay_paths_mount_and_mountinfo_shows_which() {
        if !can_mount() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = layers(&tmp.path().join("s"), 3);
        let m = overlay(tmp.path(), &lowers, true, &["index=off"]);
        let t = target(tmp.path());

        mount_all_with(std::slice::from_ref(&m), &t, OverlayMountMode::Auto).unwrap();
        let info = mount_info(&t).unwrap().unwrap();
        assert_eq!(fs::read_to_string(t.join("top")).unwrap(), "2");
        assert_eq!(fs::read_to_string(t.join("f0")).unwrap(), "0");
        if overlay_lowerdir_plus() == Some(true) {
            // fsconfig: one lowerdir+ per layer, and the source we gave.
            let plus: Vec<&String> = info
                .super_options
                .iter()
                .filter(|o| o.starts_with("lowerdir+="))
                .collect();
            assert_eq!(plus.len(), 3, "{info:?}");
            assert_eq!(plus[0], &format!("lowerdir+={}", lowers[0]));
        } else {
            eprintln!("NOTE: this kernel has no lowerdir+; Auto used mount(2)");
        }
        unmount(&t).unwrap();

        mount_all_with(std::slice::from_ref(&m), &t, OverlayMountMode::Legacy).unwrap();
        let info = mount_info(&t).unwrap().unwrap();
        assert!(
            info.super_options
                .contains(&format!("lowerdir={}", lowers.join(":"))),
            "a short list goes to mount(2) as it is: {info:?}"
        );
        fs::write(t.join("w"), "x").unwrap();
        unmount(&t).unwrap();
        assert_eq!(fs::read_to_string(tmp.path().join("upper/w")).unwrap(), "x");
    }

    #[test]
    fn two_hundred_long_layers_take_the_compact_legacy_path() {
        if !can_mount() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp
            .path()
            .join(format!("a-store-root-with-a-long-name-{}", "z".repeat(40)))
            .join("snapshots");
        let lowers = layers(&base, 200);
        let m = overlay(tmp.path(), &lowers, true, &["index=off"]);
        let full = m.options.join(",");
        assert!(
            full.len() > 4096,
            "the test needs more than a page: {}",
            full.len()
        );
        let t = target(tmp.path());
        let cwd = std::env::current_dir().unwrap();

        mount_all_with(std::slice::from_ref(&m), &t, OverlayMountMode::Legacy).unwrap();
        assert_eq!(
            std::env::current_dir().unwrap(),
            cwd,
            "our cwd did not move"
        );
        let info = mount_info(&t).unwrap().unwrap();
        let lower = info
            .super_options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap();
        assert!(
            lower.starts_with("199/fs:198/fs:"),
            "relative layers: {lower:.40}"
        );
        // Upper and work stay absolute, so the mount table still names them.
        assert!(info
            .super_options
            .contains(&format!("upperdir={}", tmp.path().join("upper").display())));
        assert_eq!(fs::read_to_string(t.join("top")).unwrap(), "199");
        assert_eq!(fs::read_to_string(t.join("f0")).unwrap(), "0");
        assert_eq!(fs::read_to_string(t.join("f123")).unwrap(), "123");
        unmount(&t).unwrap();

        // The same chain in Auto mode: whatever path the kernel allows.
        mount_all_with(std::slice::from_ref(&m), &t, OverlayMountMode::Auto).unwrap();
        assert_eq!(fs::read_to_string(t.join("f199")).unwrap(), "199");
        unmount(&t).unwrap();
    }

    #[test]
    fn a_list_too_long_even_compacted_fails_naming_the_layer_count() {
        let tmp = tempfile::tempdir().unwrap();
        // Distinct long names directly under one directory: nothing to shorten.
        let lowers: Vec<String> = (0..60)
            .map(|i| {
                tmp.path()
                    .join(format!("{i:03}-{}", "q".repeat(80)))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let m = overlay(tmp.path(), &lowers, false, &[]);
        let t = target(tmp.path());
        let e = mount_all_with(&[m], &t, OverlayMountMode::Legacy).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("60 lower layers") && msg.contains("STRATA_OVERLAY_MOUNT"),
            "{msg}"
        );
        assert!(matches!(e, Error::Mount { .. }));
    }

    #[test]
    fn volatile_leaves_work_incompat_volatile_and_unmount_clears_it() {
        if !can_mount() {
            return;
        }
        for mode in [OverlayMountMode::Auto, OverlayMountMode::Legacy] {
            let tmp = tempfile::tempdir().unwrap();
            let lowers = layers(&tmp.path().join("s"), 2);
            let m = overlay(tmp.path(), &lowers, true, &["index=off", "volatile"]);
            let t = target(tmp.path());
            let work = tmp.path().join("work");

            // A plain umount(2) leaves the kernel's marker, and the kernel then refuses the
            // work directory.
            mount_all_with(std::slice::from_ref(&m), &t, mode).unwrap();
            fs::write(t.join("a"), "1").unwrap();
            rustix::mount::unmount(&t, UnmountFlags::empty()).unwrap();
            let marker = volatile_marker(&work);
            assert_eq!(marker, work.join("work/incompat/volatile"));
            assert!(
                marker.is_dir(),
                "{mode:?}: the kernel left {}",
                marker.display()
            );
            let e = mount_all_with(std::slice::from_ref(&m), &t, mode).unwrap_err();
            assert!(matches!(e, Error::Mount { .. }), "{e}");
            clear_volatile(&tmp.path().join("upper"), &work).unwrap();

            // strata's unmount clears it, so the snapshot mounts again and again.
            for round in 0..3 {
                mount_all_with(std::slice::from_ref(&m), &t, mode).unwrap();
                fs::write(t.join(format!("r{round}")), "v").unwrap();
                unmount(&t).unwrap();
                assert!(!marker.exists(), "{mode:?} round {round}");
            }
            assert_eq!(
                fs::read_to_string(tmp.path().join("upper/r2")).unwrap(),
                "v"
            );
        }
    }

    #[test]
    fn read_only_overlays_refuse_writes_on_both_paths() {
        if !can_mount() {
            return;
        }
        for mode in [OverlayMountMode::Auto, OverlayMountMode::Legacy] {
            let tmp = tempfile::tempdir().unwrap();
            let lowers = layers(&tmp.path().join("s"), 2);
            let m = overlay(tmp.path(), &lowers, true, &["ro"]);
            let target = target(tmp.path());
            mount_all_with(std::slice::from_ref(&m), &target, mode).unwrap();
            let e = fs::write(target.join("x"), "y").unwrap_err();
            assert_eq!(
                e.raw_os_error(),
                Some(rustix::io::Errno::ROFS.raw_os_error())
            );
            assert_eq!(fs::read_to_string(target.join("top")).unwrap(), "1");
            unmount(&target).unwrap();
        }
    }

    #[test]
    fn a_failed_stack_takes_off_what_it_mounted_and_temp_dirs_go() {
        if !can_mount() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        let bad = overlay(
            tmp.path(),
            &[tmp.path().join("missing").to_string_lossy().into_owned()],
            false,
            &[],
        );
        let t = target(tmp.path());
        let e = mount_all(&[Mount::bind(&src, false), bad.clone()], &t).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(mount_info(&t).unwrap().is_none(), "the bind was taken off");

        // A TempMount whose mount fails leaves no directory behind.
        let before = fs::read_dir(tmp.path()).unwrap().count();
        TempMount::new_in(tmp.path(), &[bad]).unwrap_err();
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), before);

        // Drop unmounts and removes the directory.
        let tm = TempMount::new_in(tmp.path(), &[Mount::bind(&src, true)]).unwrap();
        let p = tm.path().to_path_buf();
        assert!(mount_info(&p).unwrap().is_some());
        drop(tm);
        assert!(!p.exists());
    }

    #[test]
    fn the_layer_limit_is_the_kernels() {
        assert_eq!(overlay_max_layers(), 500);
    }

    #[test]
    fn common_dir_stops_at_a_directory_boundary() {
        assert_eq!(
            common_dir(&[
                "/r/snapshots/12/fs",
                "/r/snapshots/13/fs",
                "/r/snapshots/1/work"
            ]),
            Some("/r/snapshots/".into())
        );
        assert_eq!(common_dir(&["/a/b", "/c/d"]), None);
        assert_eq!(
            common_dir(&["/r/s/120/fs", "/r/s/121/fs"]),
            Some("/r/s/".into()),
            "a shared digit prefix is not a directory"
        );
    }

    #[test]
    fn overlay_data_keeps_containerds_order_and_relativises() {
        let o = parse_overlay(vec![
            "index=off".into(),
            "workdir=/r/s/3/work".into(),
            "upperdir=/r/s/3/fs".into(),
            "lowerdir=/r/s/2/fs:/r/s/1/fs".into(),
        ]);
        assert_eq!(
            overlay_data(&o, ""),
            "index=off,workdir=/r/s/3/work,upperdir=/r/s/3/fs,lowerdir=/r/s/2/fs:/r/s/1/fs"
        );
        assert_eq!(
            overlay_data(&o, "/r/s/"),
            "index=off,workdir=/r/s/3/work,upperdir=/r/s/3/fs,lowerdir=2/fs:1/fs"
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"plain\"), r"plain\");
    }
}
