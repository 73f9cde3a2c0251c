//! Applying a layer straight into an overlayfs upper directory, as the kernel would have
//! written it through a mount.
//!
//! The applier keeps, for each directory of the merged view it has resolved, the lower layers
//! whose directory shows through there (top first; none below an opaque directory), and
//! follows overlayfs' rules when it writes:
//!
//! * a parent directory that only lower layers hold is **copied up** first: created in the
//!   upper directory with the owner, mode, extended attributes (not overlayfs' own) and
//!   times of the lower directory the merged view shows, and the parent's times are put back
//!   afterwards, as the kernel does;
//! * a deletion removes what the upper directory holds and leaves a **whiteout** (char 0/0)
//!   when a lower layer still has the name; a deletion of nothing leaves nothing;
//! * an opaque marker removes the directory's upper entries the layer did not create and sets
//!   `trusted.overlay.opaque=y` on it (`user.overlay.opaque=y` for a store mounted with
//!   `userxattr`, [`OverlayXattrs::User`]: the markers are read and written under one prefix);
//! * a new directory where a lower layer has an entry, or over a whiteout, is made opaque (the
//!   kernel's `mkdir` over a whiteout); a directory over a lower directory merges with it;
//! * anything else replaces what the upper directory holds at its name.
//!
//! An entry whose meaning needs the merged view the upper directory cannot show is not touched
//! and answered with `Step::NeedsMount`: a parent that is a symlink, a whiteout or a file in
//! any layer; a hard link whose target only a lower layer holds; an opaque marker at the root;
//! a char 0/0 device (which would read as a whiteout); any `redirect` attribute.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timestamps};

use super::{
    create_at, dir_names, join, record_at, remove_all_at, set_attrs, Parsed, State, Step, Whiteout,
};
use crate::error::{Error, Result};
use crate::fsutil::{xattr, xattrs};
use crate::layer::OverlayXattrs;

/// Applies entries to an upper directory; see the module docs.
pub(crate) struct UpperApplier {
    upper: PathBuf,
    upper_fd: OwnedFd,
    /// The lower layers' roots, top first.
    lowers: Vec<OwnedFd>,
    /// For each merged directory resolved so far (components joined by `/`; the root is
    /// empty): the lower layers whose directory shows through there.
    live: BTreeMap<Vec<u8>, Vec<usize>>,
    /// Where overlayfs keeps its markers in these layers.
    xattrs: OverlayXattrs,
}

fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// Opens directory `name` of `dir`, never following a symlink.
pub(crate) fn open_dir<Fd: AsFd>(dir: Fd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The path `name` below `parent` (components joined by `/`; the root is empty).
pub(crate) fn child_key(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut k = parent.to_vec();
    if !k.is_empty() {
        k.push(b'/');
    }
    k.extend_from_slice(name);
    k
}

/// What a lower layer has at a path.
struct Lower {
    st: Stat,
    fd: OwnedFd,
}

impl UpperApplier {
    pub(crate) fn open(
        upper: &Path,
        lowers: &[PathBuf],
        xattrs: OverlayXattrs,
    ) -> Result<UpperApplier> {
        let upper_fd = rustix::fs::open(
            upper,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(upper, "open the upper directory", e.into()))?;
        let lowers = lowers
            .iter()
            .map(|l| {
                rustix::fs::open(
                    l,
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| Error::io(l, "open a lower layer", e.into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut live = BTreeMap::new();
        live.insert(Vec::new(), (0..lowers.len()).collect());
        Ok(UpperApplier {
            upper: upper.to_path_buf(),
            upper_fd,
            lowers,
            live,
            xattrs,
        })
    }

    /// A new descriptor of the upper directory.
    pub(crate) fn upper_fd(&self) -> Result<OwnedFd> {
        open_dir(&self.upper_fd, OsStr::new("."))
            .map_err(|e| Error::io(&self.upper, "open the upper directory", e.into()))
    }

    fn at(&self, key: &[u8]) -> PathBuf {
        self.upper.join(OsStr::from_bytes(key))
    }

    /// What lower layer `layer` has at `key` (never through a symlink).
    fn lower_at(&self, layer: usize, key: &[u8]) -> Result<Option<Lower>> {
        let Some(root) = self.lowers.get(layer) else {
            return Ok(None);
        };
        let path = if key.is_empty() { b".".as_slice() } else { key };
        match crate::fsutil::openat2(
            root,
            OsStr::from_bytes(path),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd)
                    .map_err(|e| Error::io(self.at(key), "stat a lower layer's entry", e.into()))?;
                Ok(Some(Lower { st, fd }))
            }
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
            Err(e) => Err(Error::io(self.at(key), "look into a lower layer", e.into())),
        }
    }

    /// The first of the `live` lower layers that has an entry at `key`.
    fn lower_first(&self, live: &[usize], key: &[u8]) -> Result<Option<Lower>> {
        for &l in live {
            if let Some(found) = self.lower_at(l, key)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Whether a lower layer shows something at `key` (not deleted by a whiteout).
    fn lower_has(&self, live: &[usize], key: &[u8]) -> Result<bool> {
        Ok(self
            .lower_first(live, key)?
            .is_some_and(|l| !is_whiteout(&l.st)))
    }

    /// The lower layers whose directory at `key` shows through, given those of its parent;
    /// `None` when one carries a redirect.
    fn lower_dirs(&self, live: &[usize], key: &[u8]) -> Result<Option<Vec<usize>>> {
        let mut out = Vec::new();
        for &l in live {
            let Some(found) = self.lower_at(l, key)? else {
                continue;
            };
            if !is_dir(&found.st) {
                break; // a whiteout or a non-directory hides everything below it
            }
            let dir = open_dir(&found.fd, OsStr::new("."))
                .map_err(|e| Error::io(self.at(key), "open a lower directory", e.into()))?;
            if xattr(&dir, OsStr::new(self.xattrs.redirect()))
                .map_err(|e| Error::io(self.at(key), "read a lower directory's attributes", e))?
                .is_some()
            {
                return Ok(None);
            }
            out.push(l);
            if self.is_opaque(&dir, key)? {
                break;
            }
        }
        Ok(Some(out))
    }

    fn is_opaque(&self, dir: &OwnedFd, key: &[u8]) -> Result<bool> {
        Ok(xattr(dir, OsStr::new(self.xattrs.opaque()))
            .map_err(|e| Error::io(self.at(key), "read a directory's attributes", e))?
            .is_some_and(|v| v == b"y"))
    }

    /// Forgets what is known of `key` and everything below it.
    fn forget(&mut self, key: &[u8]) {
        let mut prefix = key.to_vec();
        prefix.push(b'/');
        let below: Vec<Vec<u8>> = self
            .live
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.live.remove(&k);
        }
        self.live.remove(key);
    }

    /// Copies up directory `name` (at `key`) into the upper directory `parent` from `lower`,
    /// keeping the parent's times as they were.
    fn copy_up_dir(&self, parent: &OwnedFd, name: &OsStr, key: &[u8], lower: &Lower) -> Result<()> {
        let at = self.at(key);
        let src = open_dir(&lower.fd, OsStr::new("."))
            .map_err(|e| Error::io(&at, "open a lower directory", e.into()))?;
        let mut attrs =
            xattrs(&src).map_err(|e| Error::io(&at, "read a lower directory's attributes", e))?;
        attrs.retain(|(k, _)| !OverlayXattrs::is_overlay_xattr(k));
        let pst =
            rustix::fs::fstat(parent).map_err(|e| Error::io(&at, "stat the parent", e.into()))?;
        rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
            .map_err(|e| Error::io(&at, "copy up a directory", e.into()))?;
        let dst = open_dir(parent, name)
            .map_err(|e| Error::io(&at, "open a copied-up directory", e.into()))?;
        let st = &lower.st;
        rustix::fs::fchown(
            &dst,
            Some(rustix::fs::Uid::from_raw(st.st_uid)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
        )
        .map_err(|e| Error::io(&at, "set the owner of a copied-up directory", e.into()))?;
        rustix::fs::fchmod(&dst, Mode::from_raw_mode(st.st_mode & 0o7777))
            .map_err(|e| Error::io(&at, "set the mode of a copied-up directory", e.into()))?;
        for (k, v) in &attrs {
            rustix::fs::fsetxattr(
                &dst,
                OsStr::from_bytes(k),
                v,
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| Error::io(&at, "copy an extended attribute up", e.into()))?;
        }
        let times = |s: &Stat| Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: s.st_atime,
                tv_nsec: s.st_atime_nsec as _,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: s.st_mtime,
                tv_nsec: s.st_mtime_nsec as _,
            },
        };
        rustix::fs::futimens(&dst, &times(st))
            .map_err(|e| Error::io(&at, "set the times of a copied-up directory", e.into()))?;
        rustix::fs::futimens(parent, &times(&pst))
            .map_err(|e| Error::io(&at, "put the parent's times back", e.into()))?;
        Ok(())
    }

    /// Resolves the merged directory `parts` to its upper directory, copying up or creating
    /// what is missing, with the lower layers that show through there. `None`: the merged
    /// view is needed.
    fn resolve(&mut self, parts: &[Vec<u8>]) -> Result<Option<(OwnedFd, Vec<usize>)>> {
        let mut fd = self.upper_fd()?;
        let mut live: Vec<usize> = self.live.get(&Vec::new()).cloned().unwrap_or_default();
        for i in 0..parts.len() {
            let name = OsStr::from_bytes(&parts[i]);
            let key = parts[..=i].join(&b'/');
            if let Some(known) = self.live.get(&key).cloned() {
                if let Ok(sub) = open_dir(&fd, name) {
                    fd = sub;
                    live = known;
                    continue;
                }
                self.forget(&key);
            }
            let at = self.at(&key);
            let next = match rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if is_dir(&st) => {
                    let sub = open_dir(&fd, name).map_err(|e| Error::io(&at, "open", e.into()))?;
                    if xattr(&sub, OsStr::new(self.xattrs.redirect()))
                        .map_err(|e| Error::io(&at, "read a directory's attributes", e))?
                        .is_some()
                    {
                        return Ok(None);
                    }
                    if self.is_opaque(&sub, &key)? {
                        Vec::new()
                    } else {
                        match self.lower_dirs(&live, &key)? {
                            Some(l) => l,
                            None => return Ok(None),
                        }
                    }
                }
                Ok(_) => return Ok(None), // a symlink, a whiteout or a file
                Err(rustix::io::Errno::NOENT) => match self.lower_first(&live, &key)? {
                    None => {
                        // Nowhere: a missing parent, created as the tree applier does.
                        rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o755))
                            .map_err(|e| Error::io(&at, "create a missing parent", e.into()))?;
                        Vec::new()
                    }
                    Some(lower) if is_dir(&lower.st) => {
                        let Some(l) = self.lower_dirs(&live, &key)? else {
                            return Ok(None);
                        };
                        self.copy_up_dir(&fd, name, &key, &lower)?;
                        l
                    }
                    Some(_) => return Ok(None),
                },
                Err(e) => return Err(Error::io(&at, "look up a parent", e.into())),
            };
            fd = open_dir(&fd, name).map_err(|e| Error::io(&at, "open a parent", e.into()))?;
            self.live.insert(key, next.clone());
            live = next;
        }
        Ok(Some((fd, live)))
    }

    pub(crate) fn entry(
        &mut self,
        state: &mut State,
        p: &Parsed,
        data: &mut dyn Read,
    ) -> Result<Step> {
        let Some((last, parent)) = p.parts.split_last() else {
            return Ok(Step::Done);
        };
        let whiteout = p.whiteout()?;
        if matches!(whiteout, Some(Whiteout::Opaque)) && parent.is_empty() {
            return Ok(Step::NeedsMount("an opaque marker at the root"));
        }
        if p.kind == tar::EntryType::Char && p.major == 0 && p.minor == 0 && whiteout.is_none() {
            return Ok(Step::NeedsMount(
                "a char 0/0 device reads as a whiteout in an upper directory",
            ));
        }
        let Some((dir, live)) = self.resolve(parent)? else {
            return Ok(Step::NeedsMount(
                "a parent is not a plain directory in every layer",
            ));
        };
        let parent_key = parent.join(&b'/');
        let key = p.parts.join(&b'/');
        let at = self.at(&key);
        let rel = join(&p.parts);
        match whiteout {
            Some(Whiteout::Opaque) => {
                let pat = self.at(&parent_key);
                let parent_rel = join(parent);
                for n in dir_names(&dir).map_err(|e| Error::io(&pat, "read", e))? {
                    if !state
                        .created
                        .contains(&parent_rel.join(OsStr::from_bytes(&n)))
                    {
                        remove_all_at(&dir, OsStr::from_bytes(&n))
                            .map_err(|e| Error::io(&pat, "apply an opaque whiteout", e))?;
                    }
                }
                rustix::fs::fsetxattr(
                    &dir,
                    self.xattrs.opaque(),
                    b"y",
                    rustix::fs::XattrFlags::empty(),
                )
                .map_err(|e| Error::io(&pat, "mark the directory opaque", e.into()))?;
                self.forget(&parent_key);
                self.live.insert(parent_key.clone(), Vec::new());
                state.content.opaque(&parent_key);
                return Ok(Step::Done);
            }
            Some(Whiteout::Name(target)) => {
                let tkey = child_key(&parent_key, target);
                let tname = OsStr::from_bytes(target);
                let tat = self.at(&tkey);
                match rustix::fs::statat(&dir, tname, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if is_whiteout(&st) => {}
                    Ok(_) => {
                        remove_all_at(&dir, tname)
                            .map_err(|e| Error::io(&tat, "apply a whiteout", e))?;
                        if self.lower_has(&live, &tkey)? {
                            self.make_whiteout(&dir, tname, &tat)?;
                        }
                    }
                    Err(rustix::io::Errno::NOENT) => {
                        if self.lower_has(&live, &tkey)? {
                            self.make_whiteout(&dir, tname, &tat)?;
                        }
                    }
                    Err(e) => return Err(Error::io(&tat, "apply a whiteout", e.into())),
                }
                self.forget(&tkey);
                state.content.record(&tkey, super::Record::Deleted);
                return Ok(Step::Done);
            }
            None => {}
        }
        let name = OsStr::from_bytes(last);
        let upper_st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(Error::io(&at, "stat", e.into())),
        };
        if p.kind == tar::EntryType::Link {
            let tparts = p.link_parts()?;
            let (tlast, tparent) = tparts.split_last().unwrap_or((&tparts[0], &[]));
            let Some((tdir, _)) = self.resolve(tparent)? else {
                return Ok(Step::NeedsMount("a hard link's target is below a symlink"));
            };
            match rustix::fs::statat(&tdir, OsStr::from_bytes(tlast), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if !is_whiteout(&st) => {}
                _ => {
                    return Ok(Step::NeedsMount(
                        "a hard link's target is only in a lower layer",
                    ))
                }
            }
            if upper_st.is_some() {
                remove_all_at(&dir, name).map_err(|e| Error::io(&at, "replace", e))?;
            }
            rustix::fs::linkat(
                &tdir,
                OsStr::from_bytes(tlast),
                &dir,
                name,
                AtFlags::empty(),
            )
            .map_err(|e| Error::io(&at, "create the hard link", e.into()))?;
            let record = match state.content.file(&tparts.join(&b'/')) {
                Some(r) => r.clone(),
                None => record_at(&dir, name, &at)?,
            };
            self.forget(&key);
            state.content.record(&key, record);
            state.created.insert(rel);
            return Ok(Step::Done);
        }
        if p.kind.is_dir() {
            let opaque = match upper_st {
                Some(st) if is_dir(&st) => None,
                Some(st) if is_whiteout(&st) => Some(true),
                Some(_) => Some(self.lower_has(&live, &key)?),
                None => match self.lower_first(&live, &key)? {
                    Some(lower) if is_dir(&lower.st) => {
                        self.copy_up_dir(&dir, name, &key, &lower)?;
                        None
                    }
                    Some(lower) => Some(!is_whiteout(&lower.st)),
                    None => Some(false),
                },
            };
            if let Some(opaque) = opaque {
                if upper_st.is_some() {
                    remove_all_at(&dir, name).map_err(|e| Error::io(&at, "replace", e))?;
                }
                rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| Error::io(&at, "create the directory", e.into()))?;
                if opaque {
                    let fd = open_dir(&dir, name)
                        .map_err(|e| Error::io(&at, "open the directory", e.into()))?;
                    rustix::fs::fsetxattr(
                        &fd,
                        self.xattrs.opaque(),
                        b"y",
                        rustix::fs::XattrFlags::empty(),
                    )
                    .map_err(|e| Error::io(&at, "mark the directory opaque", e.into()))?;
                }
            }
            let fd =
                open_dir(&dir, name).map_err(|e| Error::io(&at, "open the directory", e.into()))?;
            set_attrs(&fd, p, &at)?;
            self.forget(&key);
            state.dir_times.push((rel.clone(), p.times()));
            state.content.record(&key, p.dir_record());
        } else {
            if upper_st.is_some() {
                remove_all_at(&dir, name).map_err(|e| Error::io(&at, "replace", e))?;
            }
            let record = create_at(&dir, name, p, data, &at)?;
            self.forget(&key);
            state.content.record(&key, record);
        }
        state.created.insert(rel);
        Ok(Step::Done)
    }

    fn make_whiteout(&self, dir: &OwnedFd, name: &OsStr, at: &Path) -> Result<()> {
        rustix::fs::mknodat(
            dir,
            name,
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(|e| Error::io(at, "create a whiteout", e.into()))
    }

    pub(crate) fn finish(&self, state: &mut State) -> Result<()> {
        super::finish_dir_times(state, &self.upper, |rel| {
            let mut fd = self.upper_fd()?;
            for c in rel.iter() {
                fd = match open_dir(&fd, c) {
                    Ok(f) => f,
                    Err(
                        rustix::io::Errno::NOENT
                        | rustix::io::Errno::NOTDIR
                        | rustix::io::Errno::LOOP,
                    ) => return Ok(None),
                    Err(e) => {
                        return Err(Error::io(
                            self.upper.join(rel),
                            "open a directory",
                            e.into(),
                        ))
                    }
                };
            }
            Ok(Some(fd))
        })
    }
}
