//! Criterion micro-benchmarks of the hot paths under `strata bench`'s workloads: metadata
//! operations (prepare + commit, stat, a filtered list), tar encoding (a tree written as a
//! layer), whiteout conversion (a layer of deletions applied), and hashing (sha256 digests
//! and the content checksum). `cargo bench -p strata-benches [-- FILTER]`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use strata::layer::diff::{write_layer, DiffOptions};
use strata::layer::{Compression, Digest};
use strata::{Labels, Snapshotter, Store, StoreOptions};
use strata_native::NativeBackend;

fn store(root: &Path) -> Store<NativeBackend> {
    let opts = StoreOptions {
        // The metadata's own cost: the backend's syncs are measured by `strata bench`.
        durable: false,
        ..StoreOptions::default()
    };
    Store::open(root, NativeBackend::open(root).unwrap(), opts).unwrap()
}

fn metadata(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let mut g = c.benchmark_group("metadata");
    let mut n = 0u64;
    g.bench_function("prepare+commit", |b| {
        b.iter(|| {
            n += 1;
            let key = format!("k{n}");
            s.prepare(&key, None, Labels::new()).unwrap();
            s.commit(&format!("n{n}"), &key, Labels::new()).unwrap();
        })
    });
    // A store of a thousand labelled layers for the lookups.
    for i in 0..1000 {
        let key = format!("lk{i}");
        let mut l = Labels::new();
        l.insert("stage".into(), (i % 10).to_string());
        s.prepare(&key, None, Labels::new()).unwrap();
        s.commit(&format!("layer{i}"), &key, l).unwrap();
    }
    g.bench_function("stat", |b| b.iter(|| s.stat("layer500").unwrap()));
    g.bench_function("list labels.stage==3 of 1000", |b| {
        b.iter(|| s.list(&["labels.stage==3"]).unwrap())
    });
    g.finish();
}

/// A tree of `files` files of `size` bytes in 10 directories.
fn tree(root: &Path, files: usize, size: usize) -> u64 {
    let data = vec![0x5au8; size];
    for d in 0..10 {
        fs::create_dir_all(root.join(format!("d{d}"))).unwrap();
    }
    for f in 0..files {
        fs::write(root.join(format!("d{}/f{f}", f % 10)), &data).unwrap();
    }
    (files * size) as u64
}

struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tar_encoding(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tree(dir.path(), 1000, 4096);
    let mut g = c.benchmark_group("tar encoding");
    g.throughput(Throughput::Bytes(bytes));
    for compression in [Compression::None, Compression::Zstd] {
        let opts = DiffOptions {
            compression,
            source_date_epoch: None,
            force_generic: false,
        };
        g.bench_function(format!("1000 x 4 KiB, {compression}"), |b| {
            b.iter(|| write_layer(None, dir.path(), Sink, &opts).unwrap())
        });
    }
    g.finish();
}

/// A layer deleting each of `files` files (`.wh.` entries) and making one directory opaque.
fn deletions(files: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut entry = |name: &str, kind: tar::EntryType| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
    };
    for d in 0..10 {
        entry(&format!("d{d}"), tar::EntryType::Directory);
    }
    entry("d9/.wh..wh..opq", tar::EntryType::Regular);
    for f in 0..files {
        if f % 10 != 9 {
            entry(&format!("d{}/.wh.f{f}", f % 10), tar::EntryType::Regular);
        }
    }
    b.into_inner().unwrap()
}

fn whiteouts(c: &mut Criterion) {
    let layer = deletions(1000);
    let mut g = c.benchmark_group("whiteout conversion");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("apply 900 deletions + 1 opaque dir to a tree", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                tree(dir.path(), 1000, 16);
                dir
            },
            |dir| {
                strata::layer::apply::apply_layer(dir.path(), &layer[..], None)
                    .map_err(|(e, _)| e)
                    .unwrap();
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = vec![0xa5u8; 1 << 20];
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("sha256 digest of 1 MiB", |b| b.iter(|| Digest::of(&data)));
    g.bench_function("content checksum of a 1 MiB file", |b| {
        b.iter(|| strata::layer::content::hash_content(&data[..]).unwrap())
    });
    g.finish();
}

criterion_group!(benches, metadata, tar_encoding, whiteouts, hashing);
criterion_main!(benches);
