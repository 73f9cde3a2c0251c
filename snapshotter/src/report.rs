//! The JSON form of what the store reports: one shape, shared by `strata --json` and the C
//! ABI (which returns these documents as strings). Times are RFC 3339 in UTC.

use std::path::Path;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::copy::CopyStats;
use crate::layer::Digest;
use crate::store::CleanupReport;
use crate::{
    ExportReport, FsckReport, GcReport, ImportReport, Info, LeaseInfo, Usage, VerifyReport,
};

/// A time as RFC 3339 with nanoseconds, in UTC.
pub fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// A snapshot's info: name, kind, parent, labels, created, updated.
pub fn info(info: &Info) -> Value {
    json!({
        "name": info.name,
        "kind": info.kind.as_str(),
        "parent": info.parent,
        "labels": info.labels,
        "created": time(info.created),
        "updated": time(info.updated),
    })
}

/// A snapshot's usage.
pub fn usage(key: &str, u: Usage) -> Value {
    json!({"name": key, "size": u.size, "inodes": u.inodes})
}

/// What cleanup did.
pub fn cleanup(r: &CleanupReport) -> Value {
    json!({
        "reclaimed": r.reclaimed,
        "reconciled": r.reconciled,
        "failed": r.failed.iter().map(|(id, e)| json!({"id": id, "error": e})).collect::<Vec<_>>(),
    })
}

/// Images and the snapshots they name.
pub fn images(images: &[(String, String)]) -> Value {
    Value::Array(
        images
            .iter()
            .map(|(i, s)| json!({"image": i, "snapshot": s}))
            .collect(),
    )
}

/// Flattened lowers: the top layer of the chain each merges, its depth, its disk cost.
pub fn flattened(flats: &[crate::FlattenedLower]) -> Value {
    Value::Array(
        flats
            .iter()
            .map(|f| json!({"top": f.top, "depth": f.depth, "size": f.usage.size, "inodes": f.usage.inodes}))
            .collect(),
    )
}

/// Leases: name, expiry (null: never) and the snapshots each holds.
pub fn leases(leases: &[LeaseInfo]) -> Value {
    Value::Array(
        leases
            .iter()
            .map(|l| {
                json!({
                    "name": l.name,
                    "expires": l.expires.map(time),
                    "snapshots": l.snapshots,
                })
            })
            .collect(),
    )
}

/// What gc did, or with `dry_run` would do.
pub fn gc(r: &GcReport, dry_run: bool) -> Value {
    json!({
        "dry_run": dry_run,
        "managed": r.managed,
        "removed": r.removed,
        "kept": r.kept,
        "expired_leases": r.expired_leases,
        "reclaimed": r.reclaimed,
        "blobs": r.blobs,
        "flattened": r.flattened,
        "failed": r.failed.iter().map(|(k, e)| json!({"key": k, "error": e})).collect::<Vec<_>>(),
    })
}

/// What an export wrote to `to`.
pub fn export(r: &ExportReport, to: &Path) -> Value {
    json!({
        "output": to,
        "images": r.images.iter().map(|(n, m)| json!({"name": n, "manifest": m})).collect::<Vec<_>>(),
        "blobs": r.blobs,
        "diffed": r.diffed,
    })
}

/// What an import did.
pub fn import(r: &ImportReport) -> Value {
    json!({
        "images": r.images.iter().map(|(n, c)| json!({"name": n, "snapshot": c})).collect::<Vec<_>>(),
        "applied": r.applied,
        "cached": r.cached,
    })
}

/// What a copy into `key` brought.
pub fn copy(c: &CopyStats, key: &str) -> Value {
    json!({
        "key": key,
        "files": c.files,
        "dirs": c.dirs,
        "symlinks": c.symlinks,
        "hardlinks": c.hardlinks,
        "others": c.others,
        "bytes": c.bytes,
    })
}

/// A checksum of `name`.
pub fn checksum(d: &Digest, name: &str) -> Value {
    json!({"name": name, "checksum": d.as_str()})
}

/// What verify found.
pub fn verify(r: &VerifyReport) -> Value {
    json!({
        "verified": r.verified,
        "recorded": r.recorded,
        "damaged": r.damaged.iter().map(|(k, why)| json!({"name": k, "reason": why})).collect::<Vec<_>>(),
    })
}

/// What fsck found and did.
pub fn fsck(r: &FsckReport) -> Value {
    json!({
        "clean": r.is_clean(),
        "orphans": r.orphans,
        "spares": r.spares,
        "flattened": r.flattened,
        "broken": r.broken.iter().map(|(k, why)| json!({"name": k, "reason": why})).collect::<Vec<_>>(),
        "lost_unsynced": r.lost_unsynced,
        "interrupted": r.interrupted,
        "stale_guards": r.stale_guards,
        "abandoned_applies": r.abandoned_applies,
        "leaked_mounts": r.leaked_mounts,
        "repaired": r.repaired,
        "failed": r.failed,
    })
}
