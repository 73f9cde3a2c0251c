//! Progress bars for long operations, drawn on stderr only when it is a terminal (never in
//! `--json` mode, never in pipes or CI logs).

use std::io::{self, IsTerminal, Read, Write};

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting bytes (of `total` when known), or `None` when nobody would see it.
pub(crate) fn bytes(what: &str, total: Option<u64>, json: bool) -> Option<ProgressBar> {
    if json || !io::stderr().is_terminal() {
        return None;
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(what.to_string());
    Some(bar)
}

/// A bar counting items (layers), or `None` when nobody would see it.
pub(crate) fn items(what: &str, total: u64, json: bool) -> Option<ProgressBar> {
    if json || !io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    Some(bar)
}

/// Passes reads through, advancing the bar.
pub(crate) struct Reading<R> {
    pub(crate) inner: R,
    pub(crate) bar: Option<ProgressBar>,
}

impl<R: Read> Read for Reading<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
        Ok(n)
    }
}

/// Passes writes through, advancing the bar.
pub(crate) struct Writing<W> {
    pub(crate) inner: W,
    pub(crate) bar: Option<ProgressBar>,
}

impl<W: Write> Write for Writing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
