//! Whole images in and out: the content store, OCI layout and archive export and import,
//! and `verify`.
//!
//! **Content store**: blobs (layers as received, configs, manifests) live in
//! `blobs/sha256/<hex>` under the root, indexed in the `blobs` table and held by images and
//! leases (`blob_holders`); gc deletes what nothing holds. A blob's row and holder are recorded
//! *before* its bytes are written, so gc never deletes a blob being written, and a row whose
//! file is missing is simply written again by the next import.
//!
//! **Export** takes the export guard first (every layer pinned and checked, before any byte
//! is written), builds the layout in a temporary directory beside the target and renames it
//! into place (or writes it as an OCI archive). An imported image is written back verbatim —
//! manifest, config and layer blobs from the content store, so its digests are its source's;
//! an image strata built gets a deterministic config (`rootfs.diff_ids`, one history entry per
//! layer) and manifest, its layers diffed deterministically, blobs shared between images.
//!
//! **Import** reads a layout directory or archive, checks every digest and size, applies each
//! layer with [`Store::apply_layer`] (a committed chainID is a cache hit), keeps the blobs
//! verbatim, and tags the images — all under a temporary lease, so a concurrent gc takes
//! nothing half-imported.
//!
//! **Verify** recomputes each layer's content checksum from its stored content and compares
//! it with the one recorded when the layer was applied (or first identified); a layer whose
//! content changed is marked broken, so it is never exported again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{check_key, Store};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::layer::diff::DiffOptions;
use crate::layer::oci::{
    self, Config, History, Index, Manifest, OciDescriptor, Rootfs, ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME, MEDIA_TYPE_CONFIG, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
};
use crate::layer::{Compression, Digest, HashReader};

/// Where the content store keeps its blobs, under the root.
const BLOBS_DIR: &str = "blobs/sha256";

/// How [`Store::export`] writes.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Compression of the layers strata diffs (imported layers keep theirs).
    pub compression: Compression,
    /// Verify every layer's stored content first (see [`Store::verify`]).
    pub verify: bool,
}

/// What [`Store::export`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Each image and the digest of its manifest.
    pub images: Vec<(String, String)>,
    /// Blobs written (each once, however many images share it).
    pub blobs: usize,
    /// Layers diffed from snapshots (the others came verbatim from the content store).
    pub diffed: usize,
}

/// What [`Store::import`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Each image tagged and the committed snapshot (chainID) it names.
    pub images: Vec<(String, String)>,
    /// Layers applied.
    pub applied: usize,
    /// Layers already committed (cache hits, not read).
    pub cached: usize,
}

/// What [`Store::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Layers whose stored content matched the recorded checksum.
    pub verified: Vec<String>,
    /// Layers that had no checksum yet: identified and recorded now.
    pub recorded: Vec<String>,
    /// Layers whose content changed, with what was expected and found (now marked broken).
    pub damaged: Vec<(String, String)>,
}

/// A blob's file name check: `sha256:<64 hex>` only.
fn hex_of(d: &Digest) -> &str {
    d.as_str().trim_start_matches("sha256:")
}

fn parse_digest(what: &str, s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| Error::invalid(what.to_string(), e))
}

/// Reads `path` fully, checking its size and digest against `desc`.
fn read_checked(path: &Path, desc: &OciDescriptor, what: &str) -> Result<Vec<u8>> {
    let want = parse_digest(what, &desc.digest)?;
    let bytes = fs::read(path).map_err(|e| Error::io(path, "read a blob of the layout", e))?;
    let got = Digest::of(&bytes);
    if got != want || bytes.len() as u64 != desc.size {
        return Err(Error::invalid(
            format!("{what} {want}"),
            format!(
                "the blob holds {} bytes with digest {got}, not the {} bytes described; the layout is damaged",
                bytes.len(),
                desc.size
            ),
        ));
    }
    Ok(bytes)
}

/// Copies `from` to a new file `to`, checking that it has digest `want`; returns its size.
fn copy_checked(from: &Path, to: &Path, want: &Digest) -> Result<u64> {
    let src = fs::File::open(from).map_err(|e| Error::io(from, "open a blob", e))?;
    let mut reader = HashReader::new(src);
    let mut dst = fs::File::create(to).map_err(|e| Error::io(to, "create a blob", e))?;
    io::copy(&mut reader, &mut dst).map_err(|e| Error::io(to, "copy a blob", e))?;
    let (got, size) = reader.finish();
    if &got != want {
        return Err(Error::Broken {
            key: want.to_string(),
            reason: format!(
                "the stored blob {} now has digest {got}; the content store was damaged",
                from.display()
            ),
        });
    }
    Ok(size)
}

/// The images of an index, nested indexes followed (entries for this machine's platform,
/// or without one), each with the names its annotations give.
fn manifests_of(layout: &Path, index: &Index, out: &mut Vec<OciDescriptor>) -> Result<()> {
    for desc in &index.manifests {
        if desc.media_type == MEDIA_TYPE_INDEX || desc.media_type == MEDIA_TYPE_DOCKER_LIST {
            let d = parse_digest("index", &desc.digest)?;
            let bytes = read_checked(&layout.join("blobs/sha256").join(hex_of(&d)), desc, "index")?;
            let nested = Index::parse(&bytes)
                .map_err(|e| Error::invalid(format!("index {}", desc.digest), e))?;
            let mut inner = Vec::new();
            manifests_of(layout, &nested, &mut inner)?;
            for mut m in inner {
                let ours = m
                    .platform
                    .as_ref()
                    .is_none_or(|p| p.os == "linux" && p.architecture == oci::goarch());
                if ours {
                    for (k, v) in &desc.annotations {
                        m.annotations.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                    out.push(m);
                }
            }
        } else {
            out.push(desc.clone());
        }
    }
    Ok(())
}

/// Extracts the OCI archive `archive` into `dir`: only `oci-layout`, `index.json` and
/// `blobs/<alg>/<hex>` regular files are taken; anything else is refused.
fn extract_archive(archive: &Path, dir: &Path) -> Result<()> {
    let file = fs::File::open(archive).map_err(|e| Error::io(archive, "open the archive", e))?;
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    let entries = tar
        .entries()
        .map_err(|e| Error::io(archive, "read the archive", e))?;
    for entry in entries {
        let mut entry = entry
            .map_err(|e| Error::io(archive, "read the archive (truncated or not a tar?)", e))?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw)
            .trim_start_matches("./")
            .to_string();
        let kind = entry.header().entry_type();
        if kind.is_dir() || name.is_empty() {
            continue;
        }
        let parts: Vec<&str> = name.split('/').collect();
        let ok = match parts.as_slice() {
            ["oci-layout"] | ["index.json"] | ["manifest.json"] | ["repositories"] => true,
            ["blobs", alg, hex] => {
                alg.chars().all(|c| c.is_ascii_alphanumeric())
                    && !hex.is_empty()
                    && hex.chars().all(|c| c.is_ascii_hexdigit())
            }
            _ => false,
        };
        if !ok || !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            return Err(Error::invalid(
                format!("archive entry {name:?}"),
                "an OCI archive holds only oci-layout, index.json and blobs/<algorithm>/<hex> files",
            ));
        }
        let to = dir.join(&name);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, "create", e))?;
        }
        let mut out = fs::File::create(&to).map_err(|e| Error::io(&to, "create", e))?;
        io::copy(&mut entry, &mut out).map_err(|e| Error::io(&to, "extract", e))?;
    }
    Ok(())
}

/// Writes the layout directory `dir` as an OCI archive at `to`, deterministically: names in
/// order, owner 0, time 0, modes 0644/0755.
fn write_archive(dir: &Path, to: &Path) -> Result<()> {
    let file = fs::File::create(to).map_err(|e| Error::io(to, "create the archive", e))?;
    let mut b = tar::Builder::new(io::BufWriter::new(file));
    let mut paths = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(dir.join(&rel))
            .map_err(|e| Error::io(dir.join(&rel), "read", e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(|e| Error::io(dir.join(&rel), "read", e))?;
        names.sort();
        for n in names {
            let p = rel.join(n);
            if dir.join(&p).is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths.sort();
    for rel in paths {
        let full = dir.join(&rel);
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        if full.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, &rel, io::empty())
                .map_err(|e| Error::io(to, "write the archive", e))?;
        } else {
            let f = fs::File::open(&full).map_err(|e| Error::io(&full, "open", e))?;
            let len = f.metadata().map_err(|e| Error::io(&full, "stat", e))?.len();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(len);
            b.append_data(&mut h, &rel, f)
                .map_err(|e| Error::io(to, "write the archive", e))?;
        }
    }
    let mut w = b
        .into_inner()
        .map_err(|e| Error::io(to, "finish the archive", e))?;
    w.flush()
        .map_err(|e| Error::io(to, "write the archive", e))?;
    w.get_ref()
        .sync_all()
        .map_err(|e| Error::io(to, "sync the archive", e))
}

impl<B: Backend> Store<B> {
    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join(BLOBS_DIR).join(hex_of(d))
    }

    /// Copies the blob at `from` into the content store, checking its digest, held by
    /// `holder` (`image:<name>` or `lease:<name>`).
    fn ingest_blob(
        &self,
        from: &Path,
        want: &Digest,
        media_type: &str,
        holder: &str,
    ) -> Result<()> {
        let size = fs::metadata(from)
            .map_err(|e| Error::io(from, "stat a blob", e))?
            .len();
        // The row and its holder first: gc never deletes a blob being written.
        self.with_meta(|m| {
            let tx = m.write(want.as_str())?;
            tx.add_blob(want.as_str(), size, media_type, holder)?;
            tx.commit()
        })?;
        let to = self.blob_path(want);
        if fs::metadata(&to).is_ok_and(|m| m.len() == size) {
            return Ok(());
        }
        let dir = self.root.join(BLOBS_DIR);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create the content store", e))?;
        // Unique per call: two threads (or imports) may ingest the same blob at once; each
        // writes its own file and the renames replace one complete copy with another.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.{}-{n}", hex_of(want), self.owner.token));
        copy_checked(from, &tmp, want).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        if self.opts.durable {
            fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&tmp, "sync a blob", e))?;
        }
        fs::rename(&tmp, &to).map_err(|e| Error::io(&to, "store a blob", e))
    }

    /// Deletes the blobs nothing holds, and files of the content store no row names;
    /// returns how many went.
    pub(crate) fn gc_blobs(&self) -> Result<usize> {
        let gone = self.with_meta(|m| {
            let tx = m.write("")?;
            let gone = tx.delete_unheld_blobs()?;
            tx.commit()?;
            Ok(gone)
        })?;
        let dir = self.root.join(BLOBS_DIR);
        let mut removed = 0;
        for d in &gone {
            if let Ok(d) = Digest::parse(d) {
                if fs::remove_file(self.blob_path(&d)).is_ok() {
                    removed += 1;
                }
            }
        }
        // Files without a row (a crash between the row's deletion and the file's).
        let known: HashSet<String> = self
            .with_meta(|m| m.read("")?.blob_digests())?
            .into_iter()
            .map(|d| d.trim_start_matches("sha256:").to_string())
            .collect();
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let garbage = match name.strip_prefix('.') {
                    // `.HEX.TOKEN-N`: a blob being written, garbage once its process died.
                    Some(tmp) => tmp
                        .split_once('.')
                        .and_then(|(_, owner)| owner.rsplit_once('-'))
                        .is_some_and(|(token, _)| {
                            token != self.owner.token
                                && super::dead_owner(&self.root, token).is_some()
                        }),
                    None => !known.contains(&name),
                };
                if garbage && fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Recomputes the content checksum of every layer of `names` (images or committed
    /// snapshots; every layer that has a record when empty) from its stored content and
    /// compares it with the recorded one. A layer whose content changed is marked broken.
    /// A layer without a record yet is identified and recorded now.
    pub fn verify(&self, names: &[&str]) -> Result<VerifyReport> {
        let mut layers: Vec<String> = Vec::new();
        // Named images: one guard pins (and checks the storage of) every layer of them for
        // the whole run. Every layer: each is pinned with its chain while it is read.
        let mut whole = None;
        if names.is_empty() {
            for info in crate::snapshotter::Snapshotter::list(self, &["kind==committed"])? {
                if self.layer(&info.name)?.is_some() {
                    layers.push(info.name);
                }
            }
        } else {
            let guard = self.guard(names)?;
            let mut seen = HashSet::new();
            for l in guard.layers() {
                if seen.insert(l.name.clone()) {
                    layers.push(l.name.clone());
                }
            }
            whole = Some(guard);
        }
        let mut report = VerifyReport::default();
        for name in layers {
            // A guard per layer of a pinned chain asked the backend about every layer below
            // it again: a chain of depth D cost D² storage checks.
            self.verify_one(&name, whole.is_some(), &mut report)?;
        }
        if let Some(guard) = whole {
            guard.release()?;
        }
        Ok(report)
    }

    /// Like [`Store::verify`], but recomputes the checksum of the named committed snapshots
    /// only, not of the layers below them: for a caller that has checked those already (a
    /// builder checking the layer it just committed, a crash campaign checking what the last
    /// run added). Each is pinned with its chain while it is read (the guard checks that
    /// every layer of the chain is there) and diffed against its parent: one layer's diff
    /// instead of one per layer of the chain. An empty `names` checks nothing (unlike
    /// `verify`, where it means every layer).
    pub fn verify_layers(&self, names: &[&str]) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for name in names {
            self.verify_one(name, false, &mut report)?;
        }
        Ok(report)
    }

    /// Checks committed layer `name` against its recorded checksum into `report`, marking
    /// it broken when its content changed. `pinned`: a guard the caller holds covers it.
    fn verify_one(&self, name: &str, pinned: bool, report: &mut VerifyReport) -> Result<()> {
        let Some(record) = self.layer(name)? else {
            self.chain_id_of(name)?;
            report.recorded.push(name.to_string());
            return Ok(());
        };
        let (row, parents) = self.row(name)?;
        let summary = if pinned {
            self.summarize(name, row.id, &parents)?
        } else {
            let _guard = self.guard(&[name])?;
            self.summarize(name, row.id, &parents)?
        };
        if summary.content.as_str() == record.content {
            report.verified.push(name.to_string());
        } else {
            let reason = format!(
                "its stored content changed: checksum {} recorded, {} found (diffID {} recorded, {} found); remove it and import or build it again",
                record.content, summary.content, record.diff_id, summary.diff_id
            );
            self.mark_broken(row.id, name, &reason);
            report.damaged.push((name.to_string(), reason));
        }
        Ok(())
    }

    /// Writes `images` as an OCI image layout at `out` (a directory), or as an OCI archive
    /// when `out` ends in `.tar`. Nothing is written unless every layer of every image is
    /// there, committed and intact (and, with `verify`, unchanged).
    pub fn export(
        &self,
        images: &[&str],
        out: &Path,
        opts: &ExportOptions,
    ) -> Result<ExportReport> {
        if images.is_empty() {
            return Err(Error::invalid("export", "name at least one image"));
        }
        let archive = out.extension().is_some_and(|e| e == "tar");
        let taken = if archive {
            out.exists()
        } else {
            fs::read_dir(out).is_ok_and(|mut d| d.next().is_some())
        };
        if taken {
            return Err(Error::precondition(
                out.display().to_string(),
                "already exists; export writes a new layout or archive (remove it first)",
            ));
        }
        let guard = self.guard(images)?;
        // The guard's lease holds the images' blobs too.
        self.with_meta(|m| {
            let tx = m.write("")?;
            for image in images {
                tx.copy_blob_holds(
                    &format!("image:{image}"),
                    &format!("lease:{}", guard.lease()),
                )?;
            }
            tx.commit()
        })?;
        if opts.verify {
            let report = self.verify(images)?;
            if let Some((name, reason)) = report.damaged.first() {
                return Err(Error::Broken {
                    key: name.clone(),
                    reason: format!("export refused: {reason}"),
                });
            }
        }
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = out
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "layout".into());
        let tmp = parent.join(format!(".{file_name}.strata-{}", self.owner.token));
        let _ = fs::remove_dir_all(&tmp);
        let blobs = tmp.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, "create the layout", e))?;
        let result = self.write_layout(images, &guard, &tmp, opts);
        let result = result.and_then(|report| {
            if archive {
                let part = parent.join(format!(".{file_name}.strata-{}.part", self.owner.token));
                write_archive(&tmp, &part)?;
                fs::rename(&part, out)
                    .map_err(|e| Error::io(out, "put the archive in place", e))?;
                fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, "remove", e))?;
            } else {
                if out.exists() {
                    fs::remove_dir(out)
                        .map_err(|e| Error::io(out, "replace the empty directory", e))?;
                }
                fs::rename(&tmp, out).map_err(|e| Error::io(out, "put the layout in place", e))?;
            }
            Ok(report)
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        guard.release()?;
        result
    }

    fn write_layout(
        &self,
        images: &[&str],
        guard: &super::ExportGuard<'_, B>,
        dir: &Path,
        opts: &ExportOptions,
    ) -> Result<ExportReport> {
        let blobs = dir.join("blobs/sha256");
        let mut report = ExportReport::default();
        let mut written: HashSet<Digest> = HashSet::new();
        let mut diffed: HashMap<String, (OciDescriptor, String)> = HashMap::new();
        let mut index = Index {
            schema_version: 2,
            media_type: MEDIA_TYPE_INDEX.to_string(),
            manifests: Vec::new(),
        };
        // Writes `bytes` as a blob, once.
        let put = |bytes: &[u8],
                   written: &mut HashSet<Digest>,
                   report: &mut ExportReport|
         -> Result<Digest> {
            let d = Digest::of(bytes);
            if written.insert(d.clone()) {
                let p = blobs.join(hex_of(&d));
                fs::write(&p, bytes).map_err(|e| Error::io(&p, "write a blob", e))?;
                report.blobs += 1;
            }
            Ok(d)
        };
        for image in images {
            let mut annotations = BTreeMap::new();
            annotations.insert(ANNOTATION_REF_NAME.to_string(), (*image).to_string());
            annotations.insert(ANNOTATION_CONTAINERD_NAME.to_string(), (*image).to_string());
            // An imported image goes back verbatim when the content store has it all.
            if let Some(desc) = self.verbatim(image, dir, &mut written, &mut report)? {
                index.manifests.push(OciDescriptor {
                    annotations,
                    ..desc
                });
                continue;
            }
            let mut layers = Vec::new();
            let mut diff_ids = Vec::new();
            let mut history = Vec::new();
            for l in guard.layers().iter().filter(|l| l.image == *image) {
                let (desc, diff_id) = match diffed.get(&l.name) {
                    Some(done) => done.clone(),
                    None => {
                        // The layer's identity is recorded (once) before it is written.
                        self.chain_id_of(&l.name)?;
                        let part = blobs.join(format!(".part-{}", report.diffed));
                        let file = fs::File::create(&part)
                            .map_err(|e| Error::io(&part, "create a blob", e))?;
                        let d_opts = DiffOptions {
                            compression: opts.compression,
                            ..DiffOptions::default()
                        };
                        let (d, _, file) = self.diff(&l.name, &d_opts, io::BufWriter::new(file))?;
                        file.into_inner()
                            .map_err(|e| Error::io(&part, "write a blob", e.into_error()))?;
                        let to = blobs.join(hex_of(&d.digest));
                        fs::rename(&part, &to).map_err(|e| Error::io(&to, "write a blob", e))?;
                        if written.insert(d.digest.clone()) {
                            report.blobs += 1;
                        }
                        report.diffed += 1;
                        let desc = OciDescriptor {
                            media_type: d.media_type.clone(),
                            digest: d.digest.to_string(),
                            size: d.size,
                            annotations: BTreeMap::new(),
                            platform: None,
                        };
                        diffed.insert(l.name.clone(), (desc.clone(), d.diff_id.to_string()));
                        (desc, d.diff_id.to_string())
                    }
                };
                layers.push(desc);
                diff_ids.push(diff_id);
                history.push(History {
                    created: oci::source_date(),
                    created_by: Some(format!("strata: layer {} of {image}", l.index)),
                    empty_layer: false,
                });
            }
            let config = Config {
                created: oci::source_date(),
                architecture: oci::goarch().to_string(),
                os: "linux".to_string(),
                config: BTreeMap::new(),
                rootfs: Rootfs {
                    kind: "layers".to_string(),
                    diff_ids,
                },
                history,
            };
            let config_bytes = serde_json::to_vec(&config)
                .map_err(|e| Error::invalid(format!("image {image}"), format!("config: {e}")))?;
            let config_digest = put(&config_bytes, &mut written, &mut report)?;
            let manifest = Manifest {
                schema_version: 2,
                media_type: MEDIA_TYPE_MANIFEST.to_string(),
                config: OciDescriptor {
                    media_type: MEDIA_TYPE_CONFIG.to_string(),
                    digest: config_digest.to_string(),
                    size: config_bytes.len() as u64,
                    annotations: BTreeMap::new(),
                    platform: None,
                },
                layers,
            };
            let manifest_bytes = serde_json::to_vec(&manifest)
                .map_err(|e| Error::invalid(format!("image {image}"), format!("manifest: {e}")))?;
            let manifest_digest = put(&manifest_bytes, &mut written, &mut report)?;
            report
                .images
                .push(((*image).to_string(), manifest_digest.to_string()));
            index.manifests.push(OciDescriptor {
                media_type: MEDIA_TYPE_MANIFEST.to_string(),
                digest: manifest_digest.to_string(),
                size: manifest_bytes.len() as u64,
                annotations,
                platform: Some(oci::Platform {
                    architecture: oci::goarch().to_string(),
                    os: "linux".to_string(),
                }),
            });
        }
        let index_bytes =
            serde_json::to_vec(&index).map_err(|e| Error::invalid("index.json", e.to_string()))?;
        let p = dir.join("index.json");
        fs::write(&p, index_bytes).map_err(|e| Error::io(&p, "write", e))?;
        let p = dir.join("oci-layout");
        fs::write(&p, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(|e| Error::io(&p, "write", e))?;
        Ok(report)
    }

    /// Copies an imported image's manifest, config and layer blobs from the content store
    /// into the layout at `dir`, when it has all of them; returns the manifest's descriptor.
    fn verbatim(
        &self,
        image: &str,
        dir: &Path,
        written: &mut HashSet<Digest>,
        report: &mut ExportReport,
    ) -> Result<Option<OciDescriptor>> {
        let Some(manifest) = self.with_meta(|m| m.read(image)?.image_manifest(image))? else {
            return Ok(None);
        };
        let md = parse_digest("manifest", &manifest)?;
        let Some((size, media_type)) = self.with_meta(|m| m.read(image)?.blob(&manifest))? else {
            return Ok(None);
        };
        let bytes = match fs::read(self.blob_path(&md)) {
            Ok(b) => b,
            Err(_) => return Ok(None),
        };
        let parsed = Manifest::parse(&bytes)
            .map_err(|e| Error::invalid(format!("manifest {manifest}"), e))?;
        let mut wanted = vec![md.clone()];
        wanted.push(parse_digest("config", &parsed.config.digest)?);
        for l in &parsed.layers {
            wanted.push(parse_digest("layer", &l.digest)?);
        }
        if wanted.iter().any(|d| !self.blob_path(d).is_file()) {
            return Ok(None);
        }
        for d in &wanted {
            let to = dir.join("blobs/sha256").join(hex_of(d));
            if written.insert(d.clone()) {
                copy_checked(&self.blob_path(d), &to, d)?;
                report.blobs += 1;
            }
        }
        report.images.push((image.to_string(), manifest.clone()));
        // The index entry's platform, from the config as imported.
        #[derive(serde::Deserialize)]
        struct ConfigPlatform {
            architecture: Option<String>,
            os: Option<String>,
        }
        let platform = fs::read(self.blob_path(&wanted[1]))
            .ok()
            .and_then(|b| serde_json::from_slice::<ConfigPlatform>(&b).ok())
            .and_then(|c| {
                Some(oci::Platform {
                    architecture: c.architecture?,
                    os: c.os?,
                })
            });
        Ok(Some(OciDescriptor {
            media_type,
            digest: manifest,
            size,
            annotations: BTreeMap::new(),
            platform,
        }))
    }

    /// Imports the OCI layout directory or archive `src`: every image of its index (or the
    /// one named `ref_name`, when it has exactly one), applied layer by layer and tagged.
    pub fn import(&self, src: &Path, ref_name: Option<&str>) -> Result<ImportReport> {
        let extracted;
        let layout = if src.is_dir() {
            src.to_path_buf()
        } else {
            let tmp = self.root.join("tmp");
            fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
            extracted = tempdir_in(&tmp)?;
            extract_archive(src, extracted.path())?;
            extracted.path().to_path_buf()
        };
        let index_path = layout.join("index.json");
        let index_bytes = fs::read(&index_path).map_err(|e| {
            Error::io(
                &index_path,
                "read the index (is this an OCI image layout?)",
                e,
            )
        })?;
        let index = Index::parse(&index_bytes)
            .map_err(|e| Error::invalid(index_path.display().to_string(), e))?;
        let mut manifests = Vec::new();
        manifests_of(&layout, &index, &mut manifests)?;
        if manifests.is_empty() {
            return Err(Error::invalid(
                src.display().to_string(),
                "the index names no image for this platform",
            ));
        }
        if ref_name.is_some() && manifests.len() > 1 {
            return Err(Error::invalid(
                src.display().to_string(),
                format!("holds {} images; --ref names only one (leave it out to import all under their own names)", manifests.len()),
            ));
        }
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let lease = format!(
            "{}{}/{}",
            super::tracker::IMPORT_PREFIX,
            self.owner.token,
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.lease_create(&lease, Some(std::time::Duration::from_secs(24 * 3600)))?;
        let result = self.import_manifests(&layout, &manifests, ref_name, &lease);
        if let Err(e) = self.lease_remove(&lease) {
            tracing::warn!(lease, error = %e, "could not remove the import's lease; it expires in a day");
        }
        result
    }

    fn import_manifests(
        &self,
        layout: &Path,
        manifests: &[OciDescriptor],
        ref_name: Option<&str>,
        lease: &str,
    ) -> Result<ImportReport> {
        let mut report = ImportReport::default();
        let blob = |d: &Digest| layout.join("blobs/sha256").join(hex_of(d));
        let holder = format!("lease:{lease}");
        for (i, desc) in manifests.iter().enumerate() {
            let name = match ref_name {
                Some(r) => r.to_string(),
                None => desc
                    .annotations
                    .get(ANNOTATION_CONTAINERD_NAME)
                    .or_else(|| desc.annotations.get(ANNOTATION_REF_NAME))
                    .cloned()
                    .ok_or_else(|| {
                        Error::invalid(
                            format!("index entry {i} ({})", desc.digest),
                            "has no name annotation; pass --ref NAME",
                        )
                    })?,
            };
            check_key("image", &name)?;
            let md = parse_digest("manifest", &desc.digest)?;
            let bytes = read_checked(&blob(&md), desc, "manifest")?;
            let manifest =
                Manifest::parse(&bytes).map_err(|e| Error::invalid(format!("manifest {md}"), e))?;
            let cd = parse_digest("config", &manifest.config.digest)?;
            let config_bytes = read_checked(&blob(&cd), &manifest.config, "config")?;
            let config = oci::ConfigRootfs::parse(&config_bytes)
                .map_err(|e| Error::invalid(format!("config {cd}"), e))?;
            if config.rootfs.diff_ids.len() != manifest.layers.len() {
                return Err(Error::invalid(
                    format!("image {name}"),
                    format!(
                        "its config lists {} diffIDs for {} layers",
                        config.rootfs.diff_ids.len(),
                        manifest.layers.len()
                    ),
                ));
            }
            let mut parent: Option<String> = None;
            for (n, (layer, diff_id)) in manifest
                .layers
                .iter()
                .zip(&config.rootfs.diff_ids)
                .enumerate()
            {
                let ld = parse_digest("layer", &layer.digest)?;
                let di = parse_digest("diffID", diff_id)?;
                let path = blob(&ld);
                let file = fs::File::open(&path).map_err(|e| {
                    Error::io(&path, "open a layer of the layout (layer missing?)", e)
                })?;
                let applied = self
                    .apply_layer_in(
                        Some(lease),
                        parent.as_deref(),
                        Some(&ld),
                        Some(&di),
                        io::BufReader::new(file),
                    )
                    .map_err(|e| match e {
                        Error::InvalidArgument { what, reason } => Error::InvalidArgument {
                            what: format!("layer {n} of {name}: {what}"),
                            reason,
                        },
                        other => other,
                    })?;
                if applied.cached {
                    report.cached += 1;
                } else {
                    report.applied += 1;
                }
                self.ingest_blob(&path, &ld, &layer.media_type, &holder)?;
                parent = Some(applied.name);
            }
            self.ingest_blob(&blob(&cd), &cd, &manifest.config.media_type, &holder)?;
            let media = if desc.media_type.is_empty() {
                MEDIA_TYPE_MANIFEST.to_string()
            } else {
                desc.media_type.clone()
            };
            self.ingest_blob(&blob(&md), &md, &media, &holder)?;
            let top = parent.ok_or_else(|| {
                Error::invalid(
                    format!("image {name}"),
                    "has no layers; strata images are layer chains",
                )
            })?;
            self.tag(&name, &top)?;
            let image_holder = format!("image:{name}");
            self.with_meta(|m| {
                let tx = m.write(&name)?;
                tx.add_blob(md.as_str(), bytes.len() as u64, &media, &image_holder)?;
                tx.add_blob(
                    cd.as_str(),
                    config_bytes.len() as u64,
                    &manifest.config.media_type,
                    &image_holder,
                )?;
                for l in &manifest.layers {
                    tx.add_blob(&l.digest, l.size, &l.media_type, &image_holder)?;
                }
                tx.set_image_manifest(&name, md.as_str())?;
                tx.commit()
            })?;
            report.images.push((name, top));
        }
        Ok(report)
    }
}

/// A temporary directory under `parent`, removed on drop.
fn tempdir_in(parent: &Path) -> Result<TempDir> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let p = parent.join(format!(
        "import-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).map_err(|e| Error::io(&p, "create", e))?;
    Ok(TempDir(p))
}

struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
