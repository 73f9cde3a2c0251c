//! User-namespace id mappings: containerd's `containerd.io/snapshot/uidmapping` and
//! `containerd.io/snapshot/gidmapping` labels, and the kernel idmapped mounts that present a
//! snapshot's layers under them without a chown or a copy.
//!
//! A label's value is one or more `container:host:size` ranges, comma-separated
//! (`0:100000:65536`): container id `c` of the range is host id `host + (c - container)`. A
//! snapshot prepared (or viewed) with both labels is mounted through idmapped clones of its
//! layers (`open_tree(OPEN_TREE_CLONE)`, `mount_setattr(MOUNT_ATTR_IDMAP)`): a file stored with
//! owner 0 shows as the host id of container root, and a file that a process of the
//! container (host id 100000) writes is stored with owner 0 — storage always holds the image's
//! own ids, so a diff gives the same layer as without the mapping.

use std::collections::BTreeMap;
use std::fmt;

use crate::{Error, Result};

/// containerd's label with the uid mapping of the snapshot's user namespace.
pub const LABEL_UID_MAPPING: &str = "containerd.io/snapshot/uidmapping";
/// containerd's label with the gid mapping of the snapshot's user namespace.
pub const LABEL_GID_MAPPING: &str = "containerd.io/snapshot/gidmapping";

/// One range of a mapping: `size` ids from `container` inside are `host` outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdRange {
    /// The first id inside the user namespace.
    pub container: u32,
    /// The first id on the host it maps to.
    pub host: u32,
    /// How many ids the range has (at least 1).
    pub size: u32,
}

/// The uid and gid mappings of one user namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdMap {
    /// uid ranges, in the order given.
    pub uids: Vec<IdRange>,
    /// gid ranges, in the order given.
    pub gids: Vec<IdRange>,
}

impl IdMap {
    /// The mapping of a snapshot's labels: `None` without either label; an error naming the
    /// label when only one is there or a value does not parse.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<IdMap>> {
        match (labels.get(LABEL_UID_MAPPING), labels.get(LABEL_GID_MAPPING)) {
            (None, None) => Ok(None),
            (Some(u), Some(g)) => Ok(Some(IdMap {
                uids: parse_ranges(LABEL_UID_MAPPING, u)?,
                gids: parse_ranges(LABEL_GID_MAPPING, g)?,
            })),
            (Some(_), None) | (None, Some(_)) => Err(Error::invalid(
                format!("labels {LABEL_UID_MAPPING} and {LABEL_GID_MAPPING}"),
                "give both (container:host:size each) or neither",
            )),
        }
    }

    /// The host uid of container uid `id`, if the mapping has it.
    pub fn host_uid(&self, id: u32) -> Option<u32> {
        to_host(&self.uids, id)
    }

    /// The host gid of container gid `id`, if the mapping has it.
    pub fn host_gid(&self, id: u32) -> Option<u32> {
        to_host(&self.gids, id)
    }

    /// `/proc/PID/uid_map` text: `inside outside size` a line.
    pub fn uid_map_text(&self) -> String {
        map_text(&self.uids)
    }

    /// `/proc/PID/gid_map` text.
    pub fn gid_map_text(&self) -> String {
        map_text(&self.gids)
    }

    /// This mapping with the host's root added as container id `u32::MAX - 1` (on both the
    /// uid and gid sides) where the mapping leaves both free: the mapping of an overlay's
    /// upper directory. overlayfs creates its work directory with the credentials of the
    /// process that mounted it (containerd: the host's root), and through an idmapped mount
    /// an id the mapping lacks cannot create anything (EOVERFLOW): overlayfs would mount
    /// read-only. Only overlayfs' own work files get that id on disk.
    pub fn with_host_root(&self) -> IdMap {
        let extra = IdRange {
            container: u32::MAX - 1,
            host: 0,
            size: 1,
        };
        let add = |ranges: &[IdRange]| {
            let mut r = ranges.to_vec();
            let taken = ranges.iter().any(|x| {
                x.host == 0
                    || u64::from(x.container) + u64::from(x.size) > u64::from(extra.container)
            });
            if !taken && r.len() < MAX_RANGES {
                r.push(extra);
            }
            r
        };
        IdMap {
            uids: add(&self.uids),
            gids: add(&self.gids),
        }
    }

    /// A user namespace with this mapping, as an open `/proc/PID/ns/user` (made by a short-
    /// lived child process: a multithreaded process cannot make one for itself). For
    /// `mount_setattr(MOUNT_ATTR_IDMAP)`, or to `setns` a process into. Needs the right to
    /// write the maps (root).
    pub fn user_namespace(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        crate::sys::user_namespace(&self.uid_map_text(), &self.gid_map_text())
    }
}

impl fmt::Display for IdMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uids {}, gids {}",
            ranges_text(&self.uids),
            ranges_text(&self.gids)
        )
    }
}

fn ranges_text(ranges: &[IdRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{}:{}:{}", r.container, r.host, r.size))
        .collect::<Vec<_>>()
        .join(",")
}

fn map_text(ranges: &[IdRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.container, r.host, r.size))
        .collect()
}

fn to_host(ranges: &[IdRange], id: u32) -> Option<u32> {
    ranges.iter().find_map(|r| {
        let off = id.checked_sub(r.container)?;
        (off < r.size).then(|| r.host + off)
    })
}

/// At most this many ranges a mapping: the kernel's limit for a user namespace's map.
const MAX_RANGES: usize = 340;

/// Parses `container:host:size[,container:host:size...]` of label `label`.
fn parse_ranges(label: &str, value: &str) -> Result<Vec<IdRange>> {
    let bad = |reason: String| {
        Error::invalid(
            format!("label {label}={value:?}"),
            format!("{reason}; the value is container:host:size ranges, comma-separated (0:100000:65536)"),
        )
    };
    let mut ranges = Vec::new();
    for part in value.split(',') {
        let nums: Vec<&str> = part.trim().split(':').collect();
        let [c, h, s] = nums.as_slice() else {
            return Err(bad(format!("{part:?} is not container:host:size")));
        };
        let num = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| bad(format!("{s:?} is not an id (0 to 4294967295)")))
        };
        let r = IdRange {
            container: num(c)?,
            host: num(h)?,
            size: num(s)?,
        };
        if r.size == 0 {
            return Err(bad(format!("range {part:?} is empty")));
        }
        if r.container.checked_add(r.size - 1).is_none() || r.host.checked_add(r.size - 1).is_none()
        {
            return Err(bad(format!("range {part:?} runs past the last id")));
        }
        ranges.push(r);
    }
    if ranges.len() > MAX_RANGES {
        return Err(bad(format!("more than {MAX_RANGES} ranges")));
    }
    // The kernel refuses overlapping ranges on either side.
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            let overlap = |a0: u32, b0: u32| {
                u64::from(a0) < u64::from(b0) + u64::from(b.size)
                    && u64::from(b0) < u64::from(a0) + u64::from(a.size)
            };
            if overlap(a.container, b.container) || overlap(a.host, b.host) {
                return Err(bad(format!(
                    "ranges {}:{}:{} and {}:{}:{} overlap",
                    a.container, a.host, a.size, b.container, b.host, b.size
                )));
            }
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(u: Option<&str>, g: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        if let Some(u) = u {
            l.insert(LABEL_UID_MAPPING.to_string(), u.to_string());
        }
        if let Some(g) = g {
            l.insert(LABEL_GID_MAPPING.to_string(), g.to_string());
        }
        l
    }

    #[test]
    fn containerd_labels_parse_and_map() {
        let m = IdMap::from_labels(&labels(
            Some("0:100000:65536"),
            Some("0:200000:1,1:300000:9"),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(m.host_uid(0), Some(100_000));
        assert_eq!(m.host_uid(65_535), Some(165_535));
        assert_eq!(m.host_uid(65_536), None);
        assert_eq!(m.host_gid(0), Some(200_000));
        assert_eq!(m.host_gid(5), Some(300_004));
        assert_eq!(m.uid_map_text(), "0 100000 65536\n");
        assert_eq!(m.gid_map_text(), "0 200000 1\n1 300000 9\n");
        assert_eq!(
            m.to_string(),
            "uids 0:100000:65536, gids 0:200000:1,1:300000:9"
        );
        assert_eq!(IdMap::from_labels(&labels(None, None)).unwrap(), None);
        let upper = m.with_host_root();
        assert_eq!(upper.uid_map_text(), "0 100000 65536\n4294967294 0 1\n");
        assert_eq!(upper.host_uid(u32::MAX - 1), Some(0));
        // A mapping that has the host's root already keeps it as it is.
        let identity = IdMap::from_labels(&labels(Some("0:0:65536"), Some("0:0:65536")))
            .unwrap()
            .unwrap();
        assert_eq!(identity.with_host_root(), identity);
    }

    #[test]
    fn bad_values_name_the_label_and_the_format() {
        for (u, g, says) in [
            (Some("0:100000:65536"), None, "give both"),
            (Some("0:100000"), Some("0:1:1"), "not container:host:size"),
            (Some("0:x:1"), Some("0:1:1"), "not an id"),
            (Some("0:1:0"), Some("0:1:1"), "empty"),
            (Some("0:4294967295:2"), Some("0:1:1"), "past the last id"),
            (Some("0:1000:10,5:2000:10"), Some("0:1:1"), "overlap"),
            (Some("0:1000:10,100:1005:10"), Some("0:1:1"), "overlap"),
        ] {
            let err = IdMap::from_labels(&labels(u, g)).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
            assert!(err.contains("mapping"), "{err}");
        }
    }
}
