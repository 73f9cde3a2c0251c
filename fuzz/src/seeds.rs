//! The seed corpus: inputs that reach deep into each target, written to `fuzz/corpus/NAME/`
//! by `cargo test -p strata-fuzz --test smoke -- --ignored write_seed_corpus` (regression
//! inputs found by fuzzing are added there by hand, named `regression-*`).

use std::io::Write;

use crate::oci::SEP;

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len += 1;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// Builds tars entry by entry, names written raw (the tar crate's setters refuse hostile
/// names); names and link targets over 100 bytes go in a pax header.
pub struct TarBuilder(tar::Builder<Vec<u8>>);

impl Default for TarBuilder {
    fn default() -> Self {
        TarBuilder(tar::Builder::new(Vec::new()))
    }
}

impl TarBuilder {
    /// Appends an entry; `pax` records go before it.
    pub fn entry(
        &mut self,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
        mode: u32,
        pax: &[(&str, &[u8])],
    ) -> &mut Self {
        let mut records = Vec::new();
        for (k, v) in pax {
            records.extend(pax_record(k, v));
        }
        if name.len() > 100 {
            records.extend(pax_record("path", name));
        }
        if link.len() > 100 {
            records.extend(pax_record("linkpath", link));
        }
        if !records.is_empty() {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(records.len() as u64);
            h.set_mode(0o644);
            raw(&mut h.as_old_mut().name, b"PaxHeaders/x");
            h.set_cksum();
            self.0.append(&h, &records[..]).unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_200);
        h.set_size(data.len() as u64);
        raw(&mut h.as_old_mut().name, &name[..name.len().min(100)]);
        raw(&mut h.as_old_mut().linkname, &link[..link.len().min(100)]);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(
            tar::EntryType::Regular,
            name.as_bytes(),
            b"",
            data,
            0o644,
            &[],
        )
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(
            tar::EntryType::Directory,
            name.as_bytes(),
            b"",
            b"",
            0o755,
            &[],
        )
    }

    /// A symlink.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            tar::EntryType::Symlink,
            name.as_bytes(),
            target.as_bytes(),
            b"",
            0o777,
            &[],
        )
    }

    /// A hard link.
    pub fn link(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            tar::EntryType::Link,
            name.as_bytes(),
            target.as_bytes(),
            b"",
            0o644,
            &[],
        )
    }

    /// The tar.
    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn raw(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    field[..value.len()].copy_from_slice(value);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Layers for `layer_apply`.
fn layers() -> Vec<(&'static str, Vec<u8>)> {
    use tar::EntryType as E;
    let every_kind = TarBuilder::default()
        .dir("n")
        .file("n/f", b"hello\n")
        .symlink("n/s", "f")
        .link("n/h", "n/f")
        .entry(E::Fifo, b"n/p", b"", b"", 0o600, &[])
        .entry(E::Char, b"n/c", b"", b"", 0o600, &[])
        .entry(E::Block, b"n/b", b"", b"", 0o600, &[])
        .entry(
            E::Regular,
            b"n/x",
            b"",
            b"x",
            0o4755,
            &[("SCHILY.xattr.user.k", b"v")],
        )
        .finish();
    let whiteouts = TarBuilder::default()
        .file(".wh.a", b"")
        .file("d/.wh.x", b"")
        .file("d/e/.wh..wh..opq", b"")
        .file("d/e/new", b"new")
        .file("g/.wh..wh..opq", b"")
        .file(".wh.up", b"")
        .finish();
    let escapes = TarBuilder::default()
        .file("up/pwned", b"out")
        .file("abs/pwned", b"out")
        .link("stolen", "up/secret")
        .symlink("s", "/")
        .file("s/tmp/pwned", b"out")
        .file("/d/absolute", b"in")
        .finish();
    let dotdot = TarBuilder::default()
        .file("d/../../outside/pwned", b"out")
        .finish();
    let link_out = TarBuilder::default()
        .link("l", "../outside/secret")
        .finish();
    let replace = TarBuilder::default()
        .file("in", b"replaces the symlink, not what it points at")
        .file("d", b"a file over a directory")
        .dir("a")
        .file("a/under", b"")
        .finish();
    let long = "long/".repeat(30) + "name";
    let long_names = TarBuilder::default()
        .file(&long, b"long")
        .symlink("to-long", &long)
        .entry(E::Link, b"hard-long", long.as_bytes(), b"", 0o644, &[])
        .finish();
    let reserved = TarBuilder::default().file("d/.wh..wh.plnk", b"").finish();
    let overlay_xattr = TarBuilder::default()
        .entry(
            E::Directory,
            b"o",
            b"",
            b"",
            0o755,
            &[("SCHILY.xattr.trusted.overlay.opaque", b"y")],
        )
        .finish();
    vec![
        ("every-kind.tar", every_kind.clone()),
        ("every-kind.tar.gz", gzip(&every_kind)),
        (
            "every-kind.tar.zst",
            zstd::encode_all(&every_kind[..], 3).unwrap(),
        ),
        ("whiteouts.tar", whiteouts),
        ("escapes.tar", escapes),
        ("dotdot.tar", dotdot),
        ("link-out.tar", link_out),
        ("replace.tar", replace),
        ("long-names.tar", long_names),
        ("reserved.tar", reserved),
        ("overlay-xattr.tar", overlay_xattr),
        ("empty.tar", vec![0u8; 1024]),
    ]
}

/// Operation bytes for `whiteout` (see `whiteout::ops`: kind, name, argument).
fn whiteouts() -> Vec<(&'static str, Vec<u8>)> {
    // Names: 0 a, 1 b, 2 d, 3 d/x, 4 d/e, 5 d/e/y, 6 g, 7 g/h, 8 n, 9 n/m, 10 l, 11 l/x.
    vec![
        ("opaque-then-file", vec![5, 2, 0, 0, 3, 7]),
        ("delete-file-and-dir", vec![3, 0, 0, 3, 4, 0, 4, 6, 0]),
        ("new-dir-over-deleted", vec![3, 6, 0, 2, 6, 0, 0, 7, 1]),
        ("file-over-dir", vec![0, 2, 9, 0, 5, 1]),
        ("links", vec![6, 8, 3, 0x86, 1, 0, 0x86, 9, 3]),
        ("symlink-parent", vec![0, 11, 4, 3, 11, 0]),
        ("opaque-root-ish", vec![5, 6, 0, 5, 4, 0, 2, 4, 0, 7, 4, 0]),
        ("hostile", vec![0, 14, 0, 3, 15, 0, 0, 19, 0]),
    ]
}

fn filters() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("name", "name==base"),
        ("and", "kind==committed,labels.stage==base"),
        ("has-parent", "parent!=\"\""),
        ("quoted-key", "labels.\"a.b/c\"==\"x y\""),
        ("escaped", "labels.\"q\\\"uote\"==\"\\\"\""),
        ("or", "kind==active\nkind==view\nname==\"name with space\""),
        ("regex", "name~=b.*"),
        ("empty", ""),
        ("bare-labels", "labels"),
        ("not-equal", "labels.stage!=mid , kind!=view"),
        ("unicode", "labels.é==ü"),
        ("bad-kind", "kind==nope"),
        ("empty-label", "labels.owner==\"\""),
    ]
    .into_iter()
    .map(|(n, f)| (n, f.as_bytes().to_vec()))
    .collect()
}

fn oci_docs() -> Vec<(&'static str, Vec<u8>)> {
    [
        ("index.json", r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":7,"annotations":{"org.opencontainers.image.ref.name":"x:1"},"platform":{"architecture":"amd64","os":"linux"}}]}"#),
        ("manifest.json", r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":1024}]}"#),
        ("config.json", r#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:2222222222222222222222222222222222222222222222222222222222222222"]},"history":[{"created_by":"x"}]}"#),
        ("docker-list.json", r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[],"extra":[1,2,{"a":null}]}"#),
        ("escapes.json", "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"\\u00e9\\n\",\"digest\":\"\\ud83d\\ude00\",\"size\":18446744073709551615,\"annotations\":{\"\":\"\",\"k\":\"v\",\"k\":\"w\"}}]}"),
    ]
    .into_iter()
    .map(|(n, d)| (n, d.as_bytes().to_vec()))
    .collect()
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEP)
}

fn imports() -> Vec<(&'static str, Vec<u8>)> {
    let layer = TarBuilder::default()
        .dir("etc")
        .file("etc/hostname", b"fuzz\n")
        .finish();
    let layer2 = TarBuilder::default()
        .file("etc/.wh.hostname", b"")
        .file("x", b"x")
        .finish();
    let index = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@1","size":#1,"annotations":{"org.opencontainers.image.ref.name":"fuzz:1"}}]}"#;
    let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"@2","size":#2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"@3","size":#3},{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"@4","size":#4}]}"#;
    let config = br#"{"rootfs":{"type":"layers","diff_ids":["@3","@4"]}}"#;
    let one = join(&[index, manifest, config, &layer, &layer2]);
    let nested_index = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"@1","size":#1,"annotations":{"io.containerd.image.name":"fuzz/nested:2"}}]}"#;
    let inner = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@2","size":#2,"platform":{"architecture":"amd64","os":"linux"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@2","size":#2,"platform":{"architecture":"s390x","os":"linux"}}]}"#;
    let manifest1 = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"@3","size":#3},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"@4","size":#4}]}"#;
    let config1 = br#"{"rootfs":{"type":"layers","diff_ids":["@5"]}}"#;
    let gz = gzip(&layer);
    let nested = join(&[nested_index, inner, manifest1, config1, &gz, &layer]);
    // An archive with a hostile entry next to a layout's files.
    let archive = TarBuilder::default()
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file("../escape", b"out")
        .file("index.json", br#"{"schemaVersion":2,"manifests":[]}"#)
        .finish();
    let mut t = b"T".to_vec();
    t.extend(archive);
    vec![("layout", one), ("nested", nested), ("archive", t)]
}

fn scripts() -> Vec<(&'static str, Vec<u8>)> {
    // Each step: op, key, other, label count, labels..., then the op's own bytes. Keys:
    // 0 a, 1 b, 2 c, 3 layer/1, 4 "", 5 NULL, 6 not UTF-8.
    vec![
        (
            "build-a-chain",
            vec![
                0, 0, 0, 1, 0, 0, 0, // prepare a (label k=v), no parent, mounts out
                2, 0, 3, 0, // commit layer/1 from a
                0, 1, 3, 0, 1, 0, // prepare b on layer/1
                1, 2, 3, 0, 1, 0, // view c on layer/1
                4, 1, 0, 2, 0, 1, 2, 0, 1, // update b
                5, 0, 0, 0, 0, // walk everything
                6, 3, 0, 0, // usage layer/1
                7, 1, 0, 0, // mounts b
                3, 3, 0, 0, // remove layer/1 (has children: refused)
                3, 1, 0, 0, 3, 2, 0, 0, 3, 3, 0, 0, // remove b, c, layer/1
                8, 0, 0, 0, 9, 0, 0, 0, 1, // cleanup, gc
            ],
        ),
        (
            "bad-arguments",
            vec![
                0, 5, 0, 0, 0, 0, 0, 4, 0, 1, 2, 0, 6, 0, 0, 0, 6, 0, 1, 3, 5, 0, 0, 2, 7, 8,
            ],
        ),
        (
            "close-and-reopen",
            vec![
                0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 12, 0, 0, 0, 1, 11, 0, 0, 0, 200,
            ],
        ),
        (
            "walk-filters",
            vec![0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 2, 4, 5, 5, 0, 0, 0, 2, 6, 7],
        ),
    ]
}

/// Every seed, as (target, file name, bytes).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (target, seeds) in [
        ("layer_apply", layers()),
        ("whiteout", whiteouts()),
        ("filter", filters()),
        ("oci", oci_docs()),
        ("oci_import", imports()),
        ("ffi", scripts()),
    ] {
        for (name, data) in seeds {
            out.push((target, name, data));
        }
    }
    out
}
