//! The accounting check run after a campaign: what is on disk against what the store
//! reports, and nothing left behind.
//!
//! * **overlay, native**: the snapshots' trees on disk (every `snapshots/<id>/fs`, each inode
//!   counted once across the whole store, as flattened lowers hard-link the layers' files) must
//!   equal the sum of the store's `usage` of every snapshot plus what its flattened lowers
//!   cost, to the byte and the inode. What lies outside those trees (a snapshot's own
//!   directory and overlay work directory, the metadata database, the space reserve, lock
//!   files, the content store) is reported and bounded: at most 3 inodes per snapshot
//!   directory and 64 more.
//! * **btrfs**: blocks are shared between a layer and its children, so the store reports a
//!   layer's exclusive usage (what changed since its parent). The sum over the snapshots is
//!   compared, with the store's own files (metadata, space reserve, content store), with the
//!   data btrfs says it holds (`btrfs filesystem df`, once its cleaner has deleted the removed
//!   subvolumes): they must agree within 10 % + 4 MiB (btrfs keeps small files inline in its
//!   metadata; the store's figure counts every block of an inode changed since the parent).
//! * **devmapper**: a thin device's usage is every block it maps, its parent's included; the
//!   pool's data in use (`dmsetup status`) must lie between the largest snapshot's and the
//!   sum over all of them (plus 64 MiB for the base device's file system).
//! * everywhere: no mount under the root, no loop device backed by a file under it (but a
//!   devmapper store's own pool, `ROOT/pool/`, checked once the campaign took it down).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use strata::Usage;

use crate::{err, open, Res};

/// Walks `path`, counting each inode once in `seen`.
fn walk(path: &Path, usage: &mut Usage, seen: &mut HashSet<(u64, u64)>) -> Res<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if seen.insert((meta.dev(), meta.ino())) {
        usage.inodes += 1;
        usage.size += meta.blocks() * 512;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))? {
            walk(&entry.map_err(err("read a directory"))?.path(), usage, seen)?;
        }
    }
    Ok(())
}

/// The thin pool's data in use, in bytes, from `dmsetup status` and `dmsetup table`.
fn pool_data_used(pool: &str) -> Res<u64> {
    let run = |what: &str| -> Res<String> {
        let out = Command::new("dmsetup")
            .args([what, pool])
            .output()
            .map_err(err("dmsetup"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // `0 LEN thin-pool TRANSACTION META_USED/META_TOTAL DATA_USED/DATA_TOTAL ...` and
    // `0 LEN thin-pool META_DEV DATA_DEV DATA_BLOCK_SECTORS LOW_WATER ...`.
    let status = run("status")?;
    let table = run("table")?;
    let used: u64 = status
        .split_whitespace()
        .nth(5)
        .and_then(|f| f.split('/').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("dmsetup status {pool}: {status}"))?;
    let sectors: u64 = table
        .split_whitespace()
        .nth(5)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("dmsetup table {pool}: {table}"))?;
    Ok(used * sectors * 512)
}

/// Runs the check (module docs) on the store at `root`; returns the figures. `dm_pool`: the
/// thin pool of a devmapper store.
pub(crate) fn check(backend: &str, root: &Path, dm_pool: Option<&str>) -> Res<serde_json::Value> {
    let s = open(backend, root, true)?;
    let mut reported = Usage::default();
    let mut largest = 0;
    let snapshots = s.list(&[]).map_err(err("list"))?;
    for info in &snapshots {
        let u = s
            .usage(&info.name)
            .map_err(|e| format!("usage of {}: {e}", info.name))?;
        reported.size += u.size;
        reported.inodes += u.inodes;
        largest = largest.max(u.size);
    }
    let flats = s.flattened().map_err(err("flattened"))?;
    for f in &flats {
        reported.size += f.usage.size;
        reported.inodes += f.usage.inodes;
    }
    s.close().map_err(err("close"))?;

    // Nothing mounted under the root, no loop device backed by a file under it.
    let canonical = fs::canonicalize(root).map_err(err("resolve the root"))?;
    let mounted: Vec<String> = strata::mount::list_mounts()
        .map_err(err("read the mount table"))?
        .into_iter()
        .filter(|m| m.target.starts_with(&canonical))
        .map(|m| m.target.display().to_string())
        .collect();
    if !mounted.is_empty() {
        return Err(format!("mounts left under the root: {mounted:?}"));
    }
    let loops = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .map_err(err("losetup"))?;
    let leaked: Vec<&str> = std::str::from_utf8(&loops.stdout)
        .unwrap_or("")
        .lines()
        .filter(|l| {
            // A devmapper store's own pool (`ROOT/pool/{data,meta}`) is attached while the
            // store lives; the campaign checks that it is gone after taking it down.
            l.split_whitespace().nth(1).is_some_and(|f| {
                Path::new(f).starts_with(&canonical)
                    && !(backend == "devmapper" && Path::new(f).starts_with(canonical.join("pool")))
            })
        })
        .collect();
    if !leaked.is_empty() {
        return Err(format!(
            "loop devices left on files under the root: {leaked:?}"
        ));
    }

    let snapshots_dir = root.join("snapshots");
    let mut trees = Usage::default();
    let mut seen = HashSet::new();
    let mut dirs = 0u64;
    if backend != "btrfs" && backend != "devmapper" {
        for entry in fs::read_dir(&snapshots_dir).map_err(err("read snapshots/"))? {
            let dir = entry.map_err(err("read snapshots/"))?.path();
            dirs += 1;
            let fs_dir = dir.join("fs");
            if fs_dir.exists() {
                walk(&fs_dir, &mut trees, &mut seen)?;
            }
        }
    }
    // Everything else under the root but the harness's own scratch directory.
    let mut all = Usage::default();
    for entry in fs::read_dir(root).map_err(err("read the root"))? {
        let path = entry.map_err(err("read the root"))?.path();
        if path.file_name().is_some_and(|n| n == "tmp") {
            continue;
        }
        walk(&path, &mut all, &mut seen)?;
    }
    let outside = all;
    let figures = serde_json::json!({
        "snapshots": snapshots.len(),
        "flattened_lowers": flats.len(),
        "reported_bytes": reported.size,
        "reported_inodes": reported.inodes,
        "trees_bytes": trees.size,
        "trees_inodes": trees.inodes,
        "outside_trees_bytes": outside.size,
        "outside_trees_inodes": outside.inodes,
    });
    if backend == "devmapper" {
        let pool = dm_pool.ok_or("a devmapper store's check needs its pool")?;
        let used = pool_data_used(pool)?;
        // A thin device's usage is every block it maps, shared with its parent or not: the
        // pool holds at least the largest and at most the sum (plus the base device's
        // file system, made before any snapshot).
        if used + (1 << 20) < largest || used > reported.size + (64 << 20) {
            return Err(format!(
                "the pool holds {used} bytes of data; the largest snapshot maps {largest}, all together {}: {figures}",
                reported.size
            ));
        }
        let mut f = figures;
        f["pool_data_bytes"] = used.into();
        return Ok(f);
    }
    if backend == "btrfs" {
        // The space of deleted subvolumes comes back once btrfs's cleaner has run.
        for args in [&["subvolume", "sync"][..], &["filesystem", "sync"][..]] {
            let _ = Command::new("btrfs")
                .args(args)
                .arg(root)
                .stdout(std::process::Stdio::null())
                .status();
        }
        // The store's own files (metadata, space reserve, content store) are data too.
        let mut files = Usage::default();
        for entry in fs::read_dir(root).map_err(err("read the root"))? {
            let path = entry.map_err(err("read the root"))?.path();
            let name = path.file_name().unwrap_or_default();
            if name != "tmp" && name != "snapshots" {
                walk(&path, &mut files, &mut HashSet::new())?;
            }
        }
        let out = Command::new("btrfs")
            .args(["filesystem", "df", "-b"])
            .arg(root)
            .output()
            .map_err(err("btrfs filesystem df"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let data: u64 = text
            .lines()
            .find(|l| l.starts_with("Data"))
            .and_then(|l| l.split("used=").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("btrfs filesystem df printed no data line: {text}"))?;
        let expected = reported.size + files.size;
        let slack = expected / 10 + (4 << 20);
        if data.abs_diff(expected) > slack {
            return Err(format!(
                "btrfs holds {data} bytes of data; the store reports {} bytes of exclusive usage and {} of its own files: {figures}",
                reported.size, files.size
            ));
        }
        let mut f = figures;
        f["btrfs_data_bytes"] = data.into();
        f["store_files_bytes"] = files.size.into();
        return Ok(f);
    }
    if trees.size != reported.size || trees.inodes != reported.inodes {
        return Err(format!(
            "the snapshots' trees on disk differ from what the store reports: {figures}"
        ));
    }
    if outside.inodes > 3 * dirs + 64 {
        return Err(format!(
            "{} inodes outside the snapshots' trees for {dirs} snapshot directories: {figures}",
            outside.inodes
        ));
    }
    Ok(figures)
}
