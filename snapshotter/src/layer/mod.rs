//! OCI image layers: the tar change sets builders and containerd exchange.
//!
//! A layer is a tar archive of the changes between a snapshot and its parent, optionally
//! compressed. Its **diffID** is the sha256 of the uncompressed tar; its blob **digest** is
//! the sha256 of the bytes as stored (compressed or not). Deletions are empty files named
//! `.wh.<name>`; a directory whose lower contents are hidden carries `.wh..wh..opq`.
//!
//! [`diff::write_layer`] writes a layer from two trees; [`apply::apply_layer`] applies one to
//! a tree, confined to it. Wiring both into the store (mounted views, overlay's upper-dir
//! fast paths, chainIDs) is the layers issue's next part.

pub mod apply;
pub mod content;
pub mod diff;
mod digest;
pub mod flatten;
pub mod oci;

use std::fmt;

pub use digest::{Digest, HashReader, HashWriter, ThreadedHashWriter};

/// Which extended attributes overlayfs keeps its markers in (opaque directories, redirects,
/// metacopy files), and so which ones the store writes into and reads from upper
/// directories.
///
/// overlayfs uses `trusted.overlay.*` unless it is mounted with `userxattr`, which a mount
/// inside a user namespace other than the initial one needs (`trusted.*` attributes can only
/// be set with `CAP_SYS_ADMIN` in the initial one): then it uses `user.overlay.*`. Layers do
/// not depend on it: an opaque directory becomes the OCI `.wh..wh..opq` entry either way,
/// and a layer carrying either prefix is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OverlayXattrs {
    /// `trusted.overlay.*`: overlayfs mounted in the initial user namespace.
    #[default]
    Trusted,
    /// `user.overlay.*`: overlayfs mounted with `userxattr` (rootless, in a user namespace).
    User,
}

impl OverlayXattrs {
    /// The prefix of overlayfs' own attributes: `trusted.overlay.` or `user.overlay.`.
    pub fn prefix(self) -> &'static str {
        match self {
            OverlayXattrs::Trusted => "trusted.overlay.",
            OverlayXattrs::User => "user.overlay.",
        }
    }

    /// The opaque-directory marker (`<prefix>opaque`, value `y`).
    pub fn opaque(self) -> &'static str {
        match self {
            OverlayXattrs::Trusted => "trusted.overlay.opaque",
            OverlayXattrs::User => "user.overlay.opaque",
        }
    }

    /// The renamed-directory marker (`<prefix>redirect`), which strata never enables.
    pub fn redirect(self) -> &'static str {
        match self {
            OverlayXattrs::Trusted => "trusted.overlay.redirect",
            OverlayXattrs::User => "user.overlay.redirect",
        }
    }

    /// The metadata-only copy-up marker (`<prefix>metacopy`), which strata never enables.
    pub fn metacopy(self) -> &'static str {
        match self {
            OverlayXattrs::Trusted => "trusted.overlay.metacopy",
            OverlayXattrs::User => "user.overlay.metacopy",
        }
    }

    /// The name recorded in a store root (`trusted` or `user`).
    pub fn as_str(self) -> &'static str {
        match self {
            OverlayXattrs::Trusted => "trusted",
            OverlayXattrs::User => "user",
        }
    }

    /// The inverse of [`OverlayXattrs::as_str`].
    pub fn parse(s: &str) -> Option<OverlayXattrs> {
        match s {
            "trusted" => Some(OverlayXattrs::Trusted),
            "user" => Some(OverlayXattrs::User),
            _ => None,
        }
    }

    /// Whether `name` is an attribute of overlayfs' own, under either prefix: layers may not
    /// carry one, and copies and records leave them out, whichever way the store mounts.
    pub fn is_overlay_xattr(name: &[u8]) -> bool {
        name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
    }
}

impl fmt::Display for OverlayXattrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.prefix())?;
        f.write_str("*")
    }
}

/// The diffID of the empty layer: a tar of nothing (1024 zero bytes).
pub const EMPTY_LAYER_DIFF_ID: &str =
    "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// A plain tar.
    #[default]
    None,
    /// gzip (level 6, the usual default).
    Gzip,
    /// zstd (level 3), on several threads.
    Zstd,
}

impl Compression {
    /// The OCI media type of a layer blob with this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "unknown compression {other:?} (expected none, gzip or zstd)"
            )),
        }
    }
}

/// What identifies a layer blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// OCI media type.
    pub media_type: String,
    /// `sha256:<hex>` of the blob as stored.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: Digest,
}

/// chainID of a stack of layers given their diffIDs, bottom first (OCI image spec):
/// `chain(L1) = diffID(L1)`, `chain(L1..n) = sha256(chain(L1..n-1) + " " + diffID(Ln))`.
pub fn chain_id(diff_ids: &[Digest]) -> Option<Digest> {
    let mut iter = diff_ids.iter();
    let mut chain = iter.next()?.clone();
    for d in iter {
        chain = Digest::of(format!("{chain} {d}").as_bytes());
    }
    Some(chain)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(chain_id(&[]), None);
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        let ab = chain_id(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(ab, Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn compression_names_round_trip() {
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        assert!("lz4".parse::<Compression>().unwrap_err().contains("lz4"));
    }
}
