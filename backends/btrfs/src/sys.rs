//! The one btrfs ioctl libbtrfsutil 0.7 does not wrap: `BTRFS_IOC_TREE_SEARCH`, used to find
//! the inodes a snapshot changed since it was created without walking its tree. This module
//! holds the crate's only `unsafe` code.

use std::io;

use rustix::fd::AsFd;
use rustix::ioctl::{opcode, Updater};

/// `struct btrfs_ioctl_search_key` (linux/btrfs.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: u64,
    unused2: u64,
    unused3: u64,
    unused4: u64,
}

/// `struct btrfs_ioctl_search_args`: the key, then 4096 - 104 bytes of results.
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; 4096 - std::mem::size_of::<SearchKey>()],
}

/// `BTRFS_IOC_TREE_SEARCH` = `_IOWR(0x94, 17, struct btrfs_ioctl_search_args)`.
const TREE_SEARCH: rustix::ioctl::Opcode = opcode::read_write::<SearchArgs>(0x94, 17);

/// `BTRFS_INODE_ITEM_KEY`.
const INODE_ITEM: u32 = 1;

/// What [`changed_inodes`] found: inodes changed after a transaction, and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// Inodes whose item was written after the transaction.
    pub inodes: u64,
    /// The sum of their `nbytes` (bytes allocated to them).
    pub bytes: u64,
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The inodes of the subvolume `subvol` (an open directory of it) whose inode item was
/// written in a transaction after `since`. Tree blocks older than that are skipped by the
/// kernel, so the cost follows what changed, not the size of the tree.
pub fn changed_inodes<Fd: AsFd>(subvol: Fd, since: u64) -> io::Result<Changed> {
    let mut found = Changed::default();
    let mut key = SearchKey {
        tree_id: 0, // the subvolume `subvol` belongs to
        max_objectid: u64::MAX,
        max_offset: u64::MAX,
        min_transid: since.saturating_add(1),
        max_transid: u64::MAX,
        min_type: INODE_ITEM,
        max_type: INODE_ITEM,
        ..SearchKey::default()
    };
    loop {
        key.nr_items = 4096;
        let mut args = SearchArgs {
            key,
            buf: [0; 4096 - std::mem::size_of::<SearchKey>()],
        };
        // SAFETY: `args` is a `btrfs_ioctl_search_args` laid out as the kernel expects
        // (repr(C), the size the opcode encodes), exclusively borrowed for the call; the
        // kernel reads the key and writes at most `buf.len()` bytes of results into it.
        unsafe {
            rustix::ioctl::ioctl(
                &subvol,
                Updater::<{ TREE_SEARCH }, SearchArgs>::new(&mut args),
            )?;
        }
        let n = args.key.nr_items;
        if n == 0 {
            return Ok(found);
        }
        let buf = &args.buf;
        let mut at = 0usize;
        let mut last = (0u64, 0u32, 0u64);
        for _ in 0..n {
            // struct btrfs_ioctl_search_header: transid, objectid, offset, type, len.
            let (Some(objectid), Some(offset), Some(kind), Some(len)) = (
                u64_at(buf, at + 8),
                u64_at(buf, at + 16),
                u32_at(buf, at + 24),
                u32_at(buf, at + 28),
            ) else {
                return Err(io::Error::other(
                    "a btrfs tree search returned a truncated item",
                ));
            };
            let item = at + 32;
            // struct btrfs_inode_item: generation, transid, size, nbytes, ...
            if kind == INODE_ITEM {
                let transid = u64_at(buf, item + 8).unwrap_or(0);
                if transid > since {
                    found.inodes += 1;
                    found.bytes += u64_at(buf, item + 24).unwrap_or(0);
                }
            }
            last = (objectid, kind, offset);
            at = item + len as usize;
        }
        // Continue after the last key returned (keys order by objectid, type, offset).
        let (objectid, kind, offset) = last;
        match offset.checked_add(1) {
            Some(o) => {
                key.min_objectid = objectid;
                key.min_type = kind;
                key.min_offset = o;
            }
            None => match objectid.checked_add(1) {
                Some(obj) => {
                    key.min_objectid = obj;
                    key.min_type = INODE_ITEM;
                    key.min_offset = 0;
                }
                None => return Ok(found),
            },
        }
        // The type range is part of the composite key range: keep it to inode items only
        // from the next objectid on.
        if key.min_type > INODE_ITEM {
            match key.min_objectid.checked_add(1) {
                Some(obj) => {
                    key.min_objectid = obj;
                    key.min_type = INODE_ITEM;
                    key.min_offset = 0;
                }
                None => return Ok(found),
            }
        }
    }
}
