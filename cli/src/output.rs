//! What the CLI prints: text for people, JSON with `--json`.

use serde_json::{json, Value};
use strata::store::CleanupReport;
use strata::{FsckReport, GcReport, Info, LeaseInfo, Mount, Usage};

use crate::Failure;

/// Prints results in the chosen format.
pub(crate) struct Output {
    json: bool,
}

use strata::report::{info as info_json, time};

impl Output {
    /// Text output unless `json`.
    pub(crate) fn new(json: bool) -> Output {
        Output { json }
    }

    /// Whether JSON was asked for.
    pub(crate) fn is_json(&self) -> bool {
        self.json
    }

    fn print_json(&self, v: &Value) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }

    /// Mounts, one per line as `type source options`.
    pub(crate) fn mounts(&self, mounts: &[Mount]) {
        if self.json {
            self.print_json(&json!(mounts));
        } else {
            for m in mounts {
                println!("{m}");
            }
        }
    }

    /// One snapshot's Info.
    pub(crate) fn info(&self, info: &Info) {
        if self.json {
            self.print_json(&info_json(info));
            return;
        }
        println!("name:    {}", info.name);
        println!("kind:    {}", info.kind);
        println!("parent:  {}", info.parent.as_deref().unwrap_or(""));
        println!("created: {}", time(info.created));
        println!("updated: {}", time(info.updated));
        for (k, v) in &info.labels {
            println!("label:   {k}={v}");
        }
    }

    /// A snapshot, with what is recorded of it as a layer (diffID, chainID, content
    /// checksum, size) when it has a record.
    pub(crate) fn info_with_layer(&self, info: &Info, layer: Option<&strata::LayerRecord>) {
        let Some(l) = layer else {
            return self.info(info);
        };
        if self.json {
            let mut v = info_json(info);
            if let Value::Object(map) = &mut v {
                map.insert(
                    "layer".into(),
                    json!({
                        "diffID": l.diff_id,
                        "chainID": l.chain_id,
                        "content": l.content,
                        "tarSize": l.tar_size,
                    }),
                );
            }
            self.print_json(&v);
            return;
        }
        self.info(info);
        println!("diffID:  {}", l.diff_id);
        println!("chainID: {}", l.chain_id);
        println!("content: {}", l.content);
        println!("tar:     {} bytes", l.tar_size);
    }

    /// A list of snapshots.
    pub(crate) fn list(&self, infos: &[Info]) {
        if self.json {
            self.print_json(&Value::Array(infos.iter().map(info_json).collect()));
            return;
        }
        let w = infos.iter().map(|i| i.name.len()).max().unwrap_or(4).max(4);
        println!("{:<w$}  {:<9}  PARENT", "NAME", "KIND");
        for i in infos {
            println!(
                "{:<w$}  {:<9}  {}",
                i.name,
                i.kind.as_str(),
                i.parent.as_deref().unwrap_or("")
            );
        }
    }

    /// Disk usage.
    pub(crate) fn usage(&self, key: &str, u: Usage) {
        if self.json {
            self.print_json(&strata::report::usage(key, u));
        } else {
            println!("{key}: {} bytes, {} inodes", u.size, u.inodes);
        }
    }

    /// What cleanup did.
    pub(crate) fn cleanup(&self, r: &CleanupReport) {
        if self.json {
            self.print_json(&strata::report::cleanup(r));
        } else {
            println!(
                "reclaimed {} snapshot(s), reconciled {} interrupted operation(s), {} failure(s)",
                r.reclaimed.len(),
                r.reconciled,
                r.failed.len()
            );
        }
    }

    /// Images and their snapshots.
    pub(crate) fn images(&self, images: &[(String, String)]) {
        if self.json {
            self.print_json(&strata::report::images(images));
            return;
        }
        let w = images
            .iter()
            .map(|(i, _)| i.len())
            .max()
            .unwrap_or(5)
            .max(5);
        println!("{:<w$}  SNAPSHOT", "IMAGE");
        for (i, s) in images {
            println!("{i:<w$}  {s}");
        }
    }

    /// Flattened lowers, and their total cost.
    pub(crate) fn flattened(&self, flats: &[strata::FlattenedLower]) {
        if self.json {
            self.print_json(&strata::report::flattened(flats));
            return;
        }
        println!("{:>6}  {:>12}  {:>8}  TOP", "DEPTH", "SIZE", "INODES");
        for f in flats {
            println!(
                "{:>6}  {:>12}  {:>8}  {}",
                f.depth, f.usage.size, f.usage.inodes, f.top
            );
        }
        let (size, inodes) = flats
            .iter()
            .fold((0, 0), |(s, i), f| (s + f.usage.size, i + f.usage.inodes));
        println!(
            "{} flattened lower(s): {size} bytes, {inodes} inodes",
            flats.len()
        );
    }

    /// Leases.
    pub(crate) fn leases(&self, leases: &[LeaseInfo]) {
        if self.json {
            self.print_json(&strata::report::leases(leases));
            return;
        }
        for l in leases {
            let exp = l.expires.map(time).unwrap_or_else(|| "never".into());
            println!("{}  expires {exp}  holds {}", l.name, l.snapshots.join(" "));
        }
    }

    /// What gc did.
    pub(crate) fn gc(&self, r: &GcReport, dry_run: bool) {
        if self.json {
            self.print_json(&strata::report::gc(r, dry_run));
            return;
        }
        let verb = if dry_run { "would remove" } else { "removed" };
        println!("{verb} {} snapshot(s)", r.removed.len());
        for k in &r.removed {
            println!("  {k}");
        }
        if !dry_run {
            println!(
                "expired {} lease(s), dropped {} unused flattened lower(s), reclaimed the storage of {} snapshot(s), {} failure(s)",
                r.expired_leases.len(),
                r.flattened,
                r.reclaimed,
                r.failed.len()
            );
        }
    }

    /// What export wrote.
    pub(crate) fn exported(&self, r: &strata::ExportReport, to: &std::path::Path) {
        if self.json {
            self.print_json(&strata::report::export(r, to));
            return;
        }
        for (n, m) in &r.images {
            println!("{n} {m}");
        }
        println!(
            "wrote {} blob(s) to {} ({} layer(s) diffed)",
            r.blobs,
            to.display(),
            r.diffed
        );
    }

    /// What a copy brought.
    pub(crate) fn copied(&self, c: &strata::copy::CopyStats, key: &str) {
        if self.json {
            self.print_json(&strata::report::copy(c, key));
        } else {
            println!(
                "copied into {key}: {} file(s), {} dir(s), {} symlink(s), {} hard link(s), {} other(s), {} bytes",
                c.files, c.dirs, c.symlinks, c.hardlinks, c.others, c.bytes
            );
        }
    }

    /// A checksum.
    pub(crate) fn checksum(&self, d: &strata::layer::Digest, name: &str) {
        if self.json {
            self.print_json(&strata::report::checksum(d, name));
        } else {
            println!("{d}");
        }
    }

    /// What import did.
    pub(crate) fn imported(&self, r: &strata::ImportReport) {
        if self.json {
            self.print_json(&strata::report::import(r));
            return;
        }
        for (n, c) in &r.images {
            println!("{n} {c}");
        }
        println!("{} layer(s) applied, {} already there", r.applied, r.cached);
    }

    /// What verify found (before fsck's own report).
    pub(crate) fn verified(&self, r: &strata::VerifyReport) {
        if self.json {
            return; // the damaged layers appear among fsck's broken snapshots
        }
        println!(
            "verified layers: {} unchanged, {} recorded now, {} damaged",
            r.verified.len(),
            r.recorded.len(),
            r.damaged.len()
        );
    }

    /// What fsck found and did.
    pub(crate) fn fsck(&self, r: &FsckReport, repair: bool) {
        if self.json {
            self.print_json(&strata::report::fsck(r));
            return;
        }
        println!(
            "storage awaiting cleanup (of removed snapshots; cleanup or gc reclaims it): {}",
            r.orphans.len()
        );
        println!(
            "spares (storage made at commit for the next prepare): {}",
            r.spares.len()
        );
        println!(
            "flattened lowers (merged bottom layers of deep chains): {}",
            r.flattened.len()
        );
        println!("broken snapshots: {}", r.broken.len());
        for (k, why) in &r.broken {
            println!("  {k}: {why}");
        }
        println!(
            "lost with a power loss, rebuildable (recorded without a sync): {}",
            r.lost_unsynced.len()
        );
        for k in &r.lost_unsynced {
            println!("  {k}");
        }
        println!("interrupted operations: {}", r.interrupted.len());
        for i in &r.interrupted {
            println!("  {i}");
        }
        println!("stale export guards: {}", r.stale_guards.len());
        println!(
            "snapshots of dead apply-layer runs: {}",
            r.abandoned_applies.len()
        );
        for k in &r.abandoned_applies {
            println!("  {k}");
        }
        println!("leaked mounts: {}", r.leaked_mounts.len());
        for m in &r.leaked_mounts {
            println!("  {}", m.display());
        }
        if repair {
            for line in &r.repaired {
                println!("repaired: {line}");
            }
            for line in &r.failed {
                println!("failed: {line}");
            }
        }
    }

    /// A layer's descriptor.
    pub(crate) fn descriptor(&self, d: &strata::layer::Descriptor, entries: u64) {
        if self.json {
            self.print_json(&json!({
                "mediaType": d.media_type,
                "digest": d.digest.as_str(),
                "size": d.size,
                "diffID": d.diff_id.as_str(),
                "entries": entries,
            }));
        } else {
            println!("mediaType: {}", d.media_type);
            println!("digest:    {}", d.digest);
            println!("size:      {}", d.size);
            println!("diffID:    {}", d.diff_id);
            println!("entries:   {entries}");
        }
    }

    /// What an apply did.
    pub(crate) fn applied(&self, a: &strata::layer::apply::Applied) {
        if self.json {
            self.print_json(&json!({
                "mediaType": a.descriptor.media_type,
                "digest": a.descriptor.digest.as_str(),
                "size": a.descriptor.size,
                "diffID": a.descriptor.diff_id.as_str(),
                "entries": a.entries,
                "content": a.content.as_str(),
                "viaMount": a.via_mount,
            }));
        } else {
            self.descriptor(&a.descriptor, a.entries);
            println!("content:   {}", a.content);
        }
    }

    /// What apply-layer produced.
    pub(crate) fn applied_layer(&self, l: &strata::AppliedLayer) {
        if self.json {
            self.print_json(&json!({
                "name": l.name,
                "diffID": l.diff_id.as_str(),
                "cached": l.cached,
                "content": l.content,
                "digest": l.descriptor.as_ref().map(|d| d.digest.as_str()),
            }));
        } else {
            println!("{}", l.name);
        }
    }

    /// A plain confirmation.
    pub(crate) fn done(&self, msg: &str) {
        if self.json {
            self.print_json(&json!({"ok": true, "message": msg}));
        } else {
            println!("{msg}");
        }
    }

    /// A value: as JSON under --json, else the line `text` makes (`pool status`).
    #[cfg(feature = "devmapper")]
    pub(crate) fn show<T: serde::Serialize>(&self, v: &T, text: impl FnOnce() -> String) {
        if self.json {
            self.print_json(&json!(v));
        } else {
            println!("{}", text());
        }
    }

    /// A JSON value as it is (used by bench).
    pub(crate) fn value(&self, v: &Value) {
        self.print_json(v);
    }

    /// An error: one line on stderr, or a JSON object on stdout.
    pub(crate) fn error(&self, f: &Failure) {
        let (kind, key, message) = match f {
            Failure::Store(e) => (
                e.kind().as_str(),
                e.key().map(str::to_string),
                e.to_string(),
            ),
            Failure::Cli(e) => ("invalid-argument", None, e.0.clone()),
            Failure::Reported(_) if self.json => return,
            Failure::Reported(msg) => ("reported", None, msg.clone()),
        };
        if self.json {
            self.print_json(&json!({"error": {"kind": kind, "key": key, "message": message}}));
        } else {
            eprintln!("strata: {message}");
        }
    }
}
