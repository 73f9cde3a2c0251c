//! sha256 digests and a writer that computes one while passing bytes on.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest as _, Sha256};

/// A `sha256:<64 hex>` content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_sha(Sha256::digest(bytes).as_slice())
    }

    pub(crate) fn from_sha(hash: &[u8]) -> Digest {
        let mut s = String::with_capacity(7 + 64);
        s.push_str("sha256:");
        for b in hash {
            s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        Digest(s)
    }

    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Digest, String> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("digest {s:?} does not start with sha256:"))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "digest {s:?} is not sha256: and 64 lowercase hex digits"
            ));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Passes everything written on to `inner` while hashing and counting it.
#[derive(Debug)]
pub struct HashWriter<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The digest and size of what was written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (
            Digest::from_sha(self.hash.finalize().as_slice()),
            self.count,
            self.inner,
        )
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Like [`HashWriter`], but the hashing runs on a thread of its own, beside the work of the
/// thread that writes (reading files and encoding the tar, for a diff): SHA-256 costs about
/// as much as the rest of an uncompressed diff. Bytes reach `inner` in chunks of
/// [`ThreadedHashWriter::CHUNK`], in order; at most three chunks are held. A stream shorter
/// than one chunk is hashed on the calling thread and starts no thread.
pub struct ThreadedHashWriter<W> {
    inner: W,
    buf: Vec<u8>,
    count: u64,
    hasher: Option<Hasher>,
}

/// The hashing thread and the channels that feed it chunks and give them back.
struct Hasher {
    full: SyncSender<Vec<u8>>,
    empty: Receiver<Vec<u8>>,
    allocated: usize,
    thread: JoinHandle<Sha256>,
}

impl<W: Write> ThreadedHashWriter<W> {
    /// Bytes handed to `inner` and the hasher at a time.
    pub const CHUNK: usize = 1 << 20;
    const BUFFERS: usize = 3;

    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        ThreadedHashWriter {
            inner,
            buf: Vec::new(),
            count: 0,
            hasher: None,
        }
    }

    /// Writes the buffered bytes to `inner` and hands them to the hashing thread.
    fn pass_on(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.inner.write_all(&self.buf)?;
        let hasher = match &mut self.hasher {
            Some(h) => h,
            None => {
                let (full, to_hash) = mpsc::sync_channel::<Vec<u8>>(Self::BUFFERS);
                let (give_back, empty) = mpsc::channel::<Vec<u8>>();
                let thread = std::thread::Builder::new()
                    .name("strata-sha256".into())
                    .spawn(move || {
                        let mut hash = Sha256::new();
                        for mut chunk in to_hash {
                            hash.update(&chunk);
                            chunk.clear();
                            // The writer may be gone already; the chunk is then dropped.
                            let _ = give_back.send(chunk);
                        }
                        hash
                    })?;
                self.hasher.insert(Hasher {
                    full,
                    empty,
                    allocated: 1,
                    thread,
                })
            }
        };
        let next = if hasher.allocated < Self::BUFFERS {
            hasher.allocated += 1;
            Vec::with_capacity(Self::CHUNK)
        } else {
            hasher.empty.recv().map_err(|_| hashing_stopped())?
        };
        let chunk = std::mem::replace(&mut self.buf, next);
        hasher.full.send(chunk).map_err(|_| hashing_stopped())
    }

    /// The digest and size of what was written, and the inner writer (every byte written
    /// to it).
    pub fn finish(mut self) -> io::Result<(Digest, u64, W)> {
        let hash = match self.hasher.take() {
            None => {
                self.inner.write_all(&self.buf)?;
                Sha256::digest(&self.buf)
            }
            Some(hasher) => {
                self.hasher = Some(hasher);
                self.pass_on()?;
                let Some(hasher) = self.hasher.take() else {
                    return Err(hashing_stopped());
                };
                drop(hasher.full);
                hasher
                    .thread
                    .join()
                    .map_err(|_| hashing_stopped())?
                    .finalize()
            }
        };
        Ok((Digest::from_sha(hash.as_slice()), self.count, self.inner))
    }
}

fn hashing_stopped() -> io::Error {
    io::Error::other("the sha256 thread stopped")
}

impl<W: Write> Write for ThreadedHashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(Self::CHUNK);
        }
        let n = buf.len().min(Self::CHUNK - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        self.count += n as u64;
        if self.buf.len() == Self::CHUNK {
            self.pass_on()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // A short chunk is fine: the hash is of the stream, whatever the chunks.
        self.pass_on()?;
        self.inner.flush()
    }
}

/// Passes everything read from `inner` on while hashing and counting it.
#[derive(Debug)]
pub struct HashReader<R> {
    inner: R,
    hash: Sha256,
    count: u64,
}

impl<R: Read> HashReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashReader {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }

    /// The digest and size of what was read.
    pub fn finish(self) -> (Digest, u64) {
        (
            Digest::from_sha(self.hash.finalize().as_slice()),
            self.count,
        )
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_threaded_writer_hashes_and_passes_on_every_byte_in_order() {
        const CHUNK: usize = ThreadedHashWriter::<Vec<u8>>::CHUNK;
        let data: Vec<u8> = (0..CHUNK * 7 / 2 + 13)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, data.len()] {
            // Odd write sizes cross chunk boundaries; a flush in the middle cuts a chunk short.
            let mut w = ThreadedHashWriter::new(Vec::new());
            for (i, piece) in data[..len].chunks(4093).enumerate() {
                w.write_all(piece).unwrap();
                if i == 300 {
                    w.flush().unwrap();
                }
            }
            let (digest, count, out) = w.finish().unwrap();
            assert_eq!(digest, Digest::of(&data[..len]), "{len} bytes");
            assert_eq!(count, len as u64);
            assert!(out == data[..len], "{len} bytes passed on in order");
        }
    }

    #[test]
    fn the_threaded_writer_reports_a_failing_writer() {
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("no space left"));
                }
                let n = buf.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let chunk = ThreadedHashWriter::<Full>::CHUNK;
        let mut w = ThreadedHashWriter::new(Full(2 * chunk + 5));
        let piece = vec![7u8; 65536];
        let e = (0..100).try_for_each(|_| w.write_all(&piece)).unwrap_err();
        assert!(e.to_string().contains("no space left"), "{e}");
        // A short stream reaches the inner writer at finish.
        let mut w = ThreadedHashWriter::new(Full(3));
        w.write_all(b"0123456789").unwrap();
        let e = w.finish().err().unwrap();
        assert!(e.to_string().contains("no space left"), "{e}");
    }

    #[test]
    fn digests_are_sha256_in_hex() {
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            Digest::of(&[0u8; 1024]).as_str(),
            super::super::EMPTY_LAYER_DIFF_ID
        );
        let mut w = HashWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (d, n, v) = w.finish();
        assert_eq!((d, n, v), (Digest::of(b"abc"), 3, b"abc".to_vec()));
        assert!(Digest::parse("sha256:XYZ").is_err());
        assert!(Digest::parse("md5:00").is_err());
        assert_eq!(
            Digest::parse(super::super::EMPTY_LAYER_DIFF_ID)
                .unwrap()
                .as_str(),
            super::super::EMPTY_LAYER_DIFF_ID
        );
    }
}
