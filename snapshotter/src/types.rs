//! The value types of the snapshotter model: kinds, info, usage and mounts.
//!
//! They follow containerd's snapshotter API field for field, so that a value can cross the
//! gRPC boundary (a later issue) without translation.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Labels attached to a snapshot: a sorted map of string keys to string values.
pub type Labels = BTreeMap<String, String>;

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A read-only snapshot of a parent; it can never be committed.
    View,
    /// A writable snapshot; committing it turns it into a [`Kind::Committed`] one.
    Active,
    /// An immutable snapshot; the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The lowercase name used in filters, the CLI and JSON (`view`, `active`, `committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }

    /// The integer stored in the metadata database.
    pub(crate) fn to_db(self) -> i64 {
        match self {
            Kind::View => 1,
            Kind::Active => 2,
            Kind::Committed => 3,
        }
    }

    /// The inverse of [`Kind::to_db`].
    pub(crate) fn from_db(v: i64) -> Option<Kind> {
        match v {
            1 => Some(Kind::View),
            2 => Some(Kind::Active),
            3 => Some(Kind::Committed),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "view" => Ok(Kind::View),
            "active" => Ok(Kind::Active),
            "committed" => Ok(Kind::Committed),
            other => Err(format!(
                "unknown snapshot kind {other:?} (expected view, active or committed)"
            )),
        }
    }
}

/// What the store knows about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The snapshot's kind.
    pub kind: Kind,
    /// The key of an Active or View snapshot, the name of a Committed one.
    pub name: String,
    /// The name of the parent, `None` for a snapshot without one.
    pub parent: Option<String>,
    /// User labels.
    pub labels: Labels,
    /// When the snapshot was created (for a Committed one, as in containerd: when it was
    /// committed).
    pub created: SystemTime,
    /// When the snapshot was last changed (commit or label update).
    pub updated: SystemTime,
}

/// Disk usage of a snapshot's own layer (not its parents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes of disk space used (allocated blocks, each hardlinked inode counted once).
    pub size: u64,
    /// Number of inodes used.
    pub inodes: u64,
}

impl Usage {
    /// Adds another usage to this one.
    pub fn add(&mut self, other: Usage) {
        self.size += other.size;
        self.inodes += other.inodes;
    }
}

/// One mount, in containerd's shape: what `mount(8)` would take as `-t TYPE SOURCE -o OPTIONS`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mount {
    /// Filesystem type: `bind`, `overlay`, ...
    #[serde(rename = "type")]
    pub fs_type: String,
    /// The source: a path for `bind`, the filesystem name (`overlay`) otherwise.
    pub source: String,
    /// Mount options such as `ro`, `rbind`, `lowerdir=...`.
    pub options: Vec<String>,
}

impl Mount {
    /// A bind mount of `path`, read-only when `readonly`.
    pub fn bind(path: &std::path::Path, readonly: bool) -> Mount {
        Mount {
            fs_type: "bind".into(),
            source: path.to_string_lossy().into_owned(),
            options: vec![if readonly { "ro" } else { "rw" }.into(), "rbind".into()],
        }
    }

    /// A short description for messages: like the `Display` form, but a long `lowerdir=`
    /// list is cut to its first and last layers and a count.
    pub fn summary(&self) -> String {
        let options: Vec<String> = self
            .options
            .iter()
            .map(|o| match o.strip_prefix("lowerdir=") {
                Some(l) if l.len() > 256 => {
                    let layers: Vec<&str> = l.split(':').collect();
                    format!(
                        "lowerdir={}:...:{} ({} layers)",
                        layers[0],
                        layers[layers.len() - 1],
                        layers.len()
                    )
                }
                _ => o.clone(),
            })
            .collect();
        format!("{} {} {}", self.fs_type, self.source, options.join(","))
    }

    /// True when the options make this mount read-only.
    pub fn is_readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

impl fmt::Display for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.fs_type,
            self.source,
            self.options.join(",")
        )
    }
}
