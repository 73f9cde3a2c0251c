//! The generated tree of the diff and apply workloads: many small files in a few directories
//! plus a few large ones, with pseudo-random (incompressible) content from a fixed seed, so
//! every run and every program measures the same bytes.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// xorshift64*: fast, seeded, good enough to defeat compression.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift cannot leave it).
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with random bytes.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The shape of the tree.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// Small files, spread over `dirs` directories.
    pub files: usize,
    /// Directories the small files are spread over.
    pub dirs: usize,
    /// Smallest and largest small file, in bytes.
    pub min: usize,
    /// See `min`.
    pub max: usize,
    /// Large files.
    pub big: usize,
    /// Size of each large file, in bytes.
    pub big_size: usize,
}

/// What [`write`] made.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Written {
    /// Bytes of file content.
    pub bytes: u64,
    /// Files and directories.
    pub entries: u64,
}

/// Writes the tree under `dir`.
pub(crate) fn write(dir: &Path, spec: &Spec) -> io::Result<Written> {
    let mut rng = Rng::new(0x7a11_5eed);
    let mut out = Written::default();
    let mut buf = vec![0u8; spec.max.max(1)];
    let dirs = spec.dirs.max(1);
    for d in 0..dirs {
        fs::create_dir_all(dir.join(format!("d{d:02}")))?;
        out.entries += 1;
    }
    for f in 0..spec.files {
        let span = (spec.max.saturating_sub(spec.min) + 1) as u64;
        let len = spec.min + (rng.next_u64() % span) as usize;
        rng.fill(&mut buf[..len]);
        fs::write(dir.join(format!("d{:02}/f{f:05}", f % dirs)), &buf[..len])?;
        out.bytes += len as u64;
        out.entries += 1;
    }
    let mut chunk = vec![0u8; 1 << 20];
    for b in 0..spec.big {
        let mut w =
            io::BufWriter::with_capacity(1 << 20, fs::File::create(dir.join(format!("big{b}")))?);
        let mut left = spec.big_size;
        while left > 0 {
            let n = left.min(chunk.len());
            rng.fill(&mut chunk[..n]);
            w.write_all(&chunk[..n])?;
            left -= n;
        }
        w.flush()?;
        out.bytes += spec.big_size as u64;
        out.entries += 1;
    }
    Ok(out)
}
