//! Layers built by hand for the tests: raw tar headers (so that names the tar crate would
//! refuse can be written), and the hostile corpus every applier must survive.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A tar built from raw headers.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        LayerBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }

    /// Any entry, name and link name written as they are (up to 100 bytes).
    pub fn raw(&mut self, kind: tar::EntryType, name: &str, link: &str, data: &[u8]) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_000_000_000);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(tar::EntryType::Regular, name, "", data)
    }

    /// A regular file carrying extended attributes (PAX `SCHILY.xattr.*`).
    pub fn file_with_xattrs(
        &mut self,
        name: &str,
        data: &[u8],
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        let keys: Vec<String> = xattrs
            .iter()
            .map(|(k, _)| format!("SCHILY.xattr.{k}"))
            .collect();
        self.b
            .append_pax_extensions(keys.iter().zip(xattrs).map(|(k, (_, v))| (k.as_str(), *v)))
            .unwrap();
        self.file(name, data)
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(tar::EntryType::Directory, name, "", b"")
    }

    /// A symlink.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(tar::EntryType::Symlink, name, target, b"")
    }

    /// A hard link.
    pub fn link(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(tar::EntryType::Link, name, target, b"")
    }

    /// A device node.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Char);
        h.set_mode(0o600);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_000_000_000);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_path(name).unwrap();
        h.set_cksum();
        self.b.append(&h, &b""[..]).unwrap();
        self
    }

    /// The layer's bytes (a plain tar).
    pub fn bytes(&mut self) -> Vec<u8> {
        self.b.finish().unwrap();
        self.b.get_ref().clone()
    }
}

/// One hostile layer: what it tries, its bytes, and `None` when it must be accepted (and kept
/// inside) or `Some(part of the refusal)`.
pub struct HostileCase {
    /// What it tries.
    pub what: &'static str,
    /// The layer.
    pub layer: Vec<u8>,
    /// `None`: accepted and kept inside; `Some(text)`: refused with an error containing it.
    pub refusal: Option<&'static str>,
}

/// The hostile corpus: every way out of a snapshot the layers issue lists. `outside` is a
/// directory beside the snapshot holding a file `victim`.
pub fn hostile_corpus(outside: &Path) -> Vec<HostileCase> {
    let out_abs = outside.to_str().unwrap().to_string();
    let victim = format!("{out_abs}/victim");
    let case = |what, layer, refusal| HostileCase {
        what,
        layer,
        refusal,
    };
    vec![
        case(
            "dotdot",
            LayerBuilder::new().file("../outside/evil", b"x").bytes(),
            Some("'..'"),
        ),
        case(
            "dotdot in the middle",
            LayerBuilder::new()
                .file("a/../../outside/evil", b"x")
                .bytes(),
            Some("'..'"),
        ),
        case(
            "symlink to outside, then write through it",
            LayerBuilder::new()
                .symlink("link", &out_abs)
                .file("link/evil", b"x")
                .bytes(),
            Some("symlink that leads to no directory inside"),
        ),
        case(
            "relative symlink climbing out (resolves to the root)",
            LayerBuilder::new()
                .symlink("up", "../../../../..")
                .file("up/evil", b"x")
                .bytes(),
            None,
        ),
        case(
            "symlink replacing a directory mid-archive",
            LayerBuilder::new()
                .dir("d/")
                .symlink("d", &out_abs)
                .file("d/evil", b"x")
                .bytes(),
            Some("symlink that leads to no directory inside"),
        ),
        case(
            "hard link to outside by ..",
            LayerBuilder::new().link("hl", "../outside/victim").bytes(),
            Some("link target leaves the layer"),
        ),
        case(
            "hard link to an absolute path (resolves inside, where it is missing)",
            LayerBuilder::new().link("hl", &victim).bytes(),
            Some("create the hard link"),
        ),
        case(
            "hard link to a symlink, then a write to it",
            LayerBuilder::new()
                .symlink("s", &victim)
                .link("h", "s")
                .file("h", b"overwritten")
                .bytes(),
            None,
        ),
        case(
            "whiteout through a symlink",
            LayerBuilder::new()
                .symlink("w", &out_abs)
                .file("w/.wh.victim", b"")
                .bytes(),
            Some("symlink that leads to no directory inside"),
        ),
        case(
            "opaque marker through a symlink",
            LayerBuilder::new()
                .symlink("w", &out_abs)
                .file("w/.wh..wh..opq", b"")
                .bytes(),
            Some("symlink that leads to no directory inside"),
        ),
        case(
            "whiteout of ..",
            LayerBuilder::new()
                .file(".wh..", b"")
                .file("x/.wh..", b"")
                .bytes(),
            Some("whiteout of nothing"),
        ),
        case(
            "reserved .wh..wh. name",
            LayerBuilder::new().file(".wh..wh.plnk", b"").bytes(),
            Some("reserved"),
        ),
        case(
            "overwrite of a symlink that points outside",
            LayerBuilder::new()
                .symlink("x", &victim)
                .file("x", b"overwritten")
                .bytes(),
            None,
        ),
        case(
            "overlayfs' own attribute on an entry",
            LayerBuilder::new()
                .file_with_xattrs("o", b"", &[("trusted.overlay.opaque", b"y")])
                .bytes(),
            Some("trusted.overlay"),
        ),
        case(
            "overlayfs' own attribute of rootless mounts (userxattr) on an entry",
            LayerBuilder::new()
                .file_with_xattrs("o", b"", &[("user.overlay.opaque", b"y")])
                .bytes(),
            Some("user.overlay.opaque"),
        ),
    ]
}

/// Everything under `dir`: path, and content and mode, or link target.
pub fn snapshot_of(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let m = fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {:?}", fs::read_link(&path).unwrap())
            } else if m.is_dir() {
                stack.push(path.clone());
                "dir".into()
            } else {
                format!(
                    "{:?} {:o}",
                    fs::read(&path).unwrap(),
                    m.permissions().mode()
                )
            };
            out.push((path, what));
        }
    }
    out.sort();
    out
}
