//! A layer's content checksum: a digest of what the layer changes, whatever tar wrote it.
//!
//! The diffID names the bytes of one tar; two tools (or two tar formats) writing the same
//! change set give different diffIDs. The content checksum names the change set itself, so
//! that stored layers can be checked against what was applied (`verify`, the images issue).
//!
//! Each path the layer leaves behind gets one record, keyed by its normalised path (no leading
//! `/` or `./`, no trailing `/`):
//!
//! * regular file: mode (the 12 permission bits), uid, gid, mtime (seconds), size, sha256 of
//!   the content, extended attributes; a hard link is recorded as the file it names;
//! * directory: mode, uid, gid, mtime, extended attributes;
//! * symlink: uid, gid, mtime, target (its mode means nothing on Linux);
//! * character or block device: mode, uid, gid, mtime, major, minor; fifo: mode, uid, gid, mtime;
//! * a deletion (`.wh.<name>`): the path, "deleted";
//! * an opaque directory (`.wh..wh..opq`): a record of its own beside the directory's.
//!
//! Later entries for a path replace earlier ones; a deletion drops what the layer had put
//! below the path. The checksum is the sha256 of `strata-content-v1\n` followed by every record
//! in byte order of the path, each as the path's length and bytes and the sha256 of its fields.

use std::collections::BTreeMap;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::Digest;

/// The fields of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A regular file (or a hard link to one).
    File {
        /// Permission bits (`0o7777`).
        mode: u32,
        /// Owner.
        uid: u64,
        /// Group.
        gid: u64,
        /// Modification time, seconds.
        mtime: i64,
        /// Size in bytes.
        size: u64,
        /// sha256 of the content.
        sha256: [u8; 32],
        /// Extended attributes, sorted by name.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u64,
        /// Group.
        gid: u64,
        /// Modification time, seconds.
        mtime: i64,
        /// Extended attributes, sorted by name.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// A symbolic link.
    Symlink {
        /// Owner.
        uid: u64,
        /// Group.
        gid: u64,
        /// Modification time, seconds.
        mtime: i64,
        /// Where it points, as written.
        target: Vec<u8>,
    },
    /// A device node (`b'c'` or `b'b'`) or a fifo (`b'p'`, numbers 0).
    Special {
        /// `b'c'`, `b'b'` or `b'p'`.
        kind: u8,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u64,
        /// Group.
        gid: u64,
        /// Modification time, seconds.
        mtime: i64,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// The layer deletes the path.
    Deleted,
}

impl Record {
    fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let num = |h: &mut Sha256, v: u64| h.update(v.to_be_bytes());
        let bytes = |h: &mut Sha256, b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        let xattrs = |h: &mut Sha256, x: &[(Vec<u8>, Vec<u8>)]| {
            num(h, x.len() as u64);
            for (k, v) in x {
                bytes(h, k);
                bytes(h, v);
            }
        };
        match self {
            Record::File {
                mode,
                uid,
                gid,
                mtime,
                size,
                sha256,
                xattrs: x,
            } => {
                h.update(b"f");
                num(&mut h, u64::from(*mode));
                num(&mut h, *uid);
                num(&mut h, *gid);
                num(&mut h, *mtime as u64);
                num(&mut h, *size);
                h.update(sha256);
                xattrs(&mut h, x);
            }
            Record::Dir {
                mode,
                uid,
                gid,
                mtime,
                xattrs: x,
            } => {
                h.update(b"d");
                num(&mut h, u64::from(*mode));
                num(&mut h, *uid);
                num(&mut h, *gid);
                num(&mut h, *mtime as u64);
                xattrs(&mut h, x);
            }
            Record::Symlink {
                uid,
                gid,
                mtime,
                target,
            } => {
                h.update(b"l");
                num(&mut h, *uid);
                num(&mut h, *gid);
                num(&mut h, *mtime as u64);
                bytes(&mut h, target);
            }
            Record::Special {
                kind,
                mode,
                uid,
                gid,
                mtime,
                major,
                minor,
            } => {
                h.update([*kind]);
                num(&mut h, u64::from(*mode));
                num(&mut h, *uid);
                num(&mut h, *gid);
                num(&mut h, *mtime as u64);
                num(&mut h, u64::from(*major));
                num(&mut h, u64::from(*minor));
            }
            Record::Deleted => h.update(b"x"),
        }
        h.finalize().into()
    }
}

/// The path key of an opaque marker for directory `dir` (sorts right after the directory).
fn opaque_key(dir: &[u8]) -> Vec<u8> {
    let mut k = dir.to_vec();
    k.extend_from_slice(b"\0opaque");
    k
}

/// Collects the records of a layer as it is applied and gives its checksum.
#[derive(Debug, Default)]
pub struct ContentSummer {
    records: BTreeMap<Vec<u8>, ([u8; 32], Option<Record>)>,
}

impl ContentSummer {
    /// An empty change set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `path` (normalised, components joined by `/`) as `record`. A file record is
    /// kept whole so that hard links to it can be recorded as it.
    pub fn record(&mut self, path: &[u8], record: Record) {
        if !matches!(record, Record::Dir { .. }) {
            // Whatever the layer put below the path is gone (a deletion, or a non-directory
            // replacing a directory).
            self.drop_below(path);
        }
        let keep = matches!(record, Record::File { .. }).then(|| record.clone());
        self.records.insert(path.to_vec(), (record.hash(), keep));
    }

    /// Records that directory `dir` is opaque.
    pub fn opaque(&mut self, dir: &[u8]) {
        self.records
            .insert(opaque_key(dir), (Sha256::digest(b"o").into(), None));
    }

    /// The file record of `path`, when the layer recorded one (for hard links).
    pub fn file(&self, path: &[u8]) -> Option<&Record> {
        self.records.get(path).and_then(|r| r.1.as_ref())
    }

    fn drop_below(&mut self, path: &[u8]) {
        let mut prefix = path.to_vec();
        prefix.push(b'/');
        let below: Vec<Vec<u8>> = self
            .records
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.records.remove(&k);
        }
        self.records.remove(&opaque_key(path));
    }

    /// The checksum of everything recorded.
    pub fn finish(&self) -> Digest {
        let mut h = Sha256::new();
        h.update(b"strata-content-v1\n");
        for (path, (rec, _)) in &self.records {
            h.update((path.len() as u64).to_be_bytes());
            h.update(path);
            h.update(rec);
        }
        Digest::from_sha(h.finalize().as_slice())
    }
}

/// Reads `r` to the end, returning its sha256 and length.
pub fn hash_content<R: Read>(mut r: R) -> io::Result<([u8; 32], u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let got = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(g) => g,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..got]);
        n += got as u64;
    }
    Ok((h.finalize().into(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(sha: u8) -> Record {
        Record::File {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1,
            size: 1,
            sha256: [sha; 32],
            xattrs: vec![],
        }
    }

    #[test]
    fn order_of_recording_does_not_matter() {
        let mut a = ContentSummer::new();
        a.record(b"x", file(1));
        a.record(b"y", file(2));
        let mut b = ContentSummer::new();
        b.record(b"y", file(2));
        b.record(b"x", file(1));
        assert_eq!(a.finish(), b.finish());
        b.record(b"y", file(3));
        assert_ne!(
            a.finish(),
            b.finish(),
            "a changed file changes the checksum"
        );
    }

    #[test]
    fn a_deletion_drops_what_was_put_below() {
        let dir = Record::Dir {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1,
            xattrs: vec![],
        };
        let mut a = ContentSummer::new();
        a.record(b"d", dir.clone());
        a.record(b"d/f", file(1));
        a.opaque(b"d");
        a.record(b"d", Record::Deleted);
        let mut b = ContentSummer::new();
        b.record(b"d", Record::Deleted);
        assert_eq!(a.finish(), b.finish());
        // A directory over a directory keeps what is below.
        let mut c = ContentSummer::new();
        c.record(b"d", dir.clone());
        c.record(b"d/f", file(1));
        c.record(b"d", dir);
        assert!(c.file(b"d/f").is_some());
    }
}
