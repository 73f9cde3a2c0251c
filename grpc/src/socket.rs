//! The server's hold on its store and its socket: one `serve` per store, a socket only its
//! owner can open, a stale socket replaced, a live one left alone.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use crate::Error;

/// The file under the store root that a running `serve` holds locked.
pub const LOCK_FILE: &str = "serve.lock";

/// An exclusive lock on a store for one server, released when dropped (or when the process
/// dies: it is an `flock`).
#[derive(Debug)]
pub struct ServeLock {
    _file: File,
}

impl ServeLock {
    /// Takes the lock of the store at `root`, or says which process holds it.
    pub fn take(root: &Path) -> Result<ServeLock, Error> {
        let path = root.join(LOCK_FILE);
        let io_err = |context: &'static str| {
            let path = path.clone();
            move |source| Error::Io {
                path,
                context,
                source,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open the serve lock"))?;
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e == rustix::io::Errno::WOULDBLOCK {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(Error::StoreServed {
                    root: root.to_path_buf(),
                    holder: holder.trim().to_string(),
                });
            }
            return Err(io_err("lock the serve lock")(e.into()));
        }
        file.set_len(0).map_err(io_err("write the serve lock"))?;
        file.rewind().map_err(io_err("write the serve lock"))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err("write the serve lock"))?;
        Ok(ServeLock { _file: file })
    }
}

/// The listening socket at `path`, removed on drop if it is still the one this bound.
#[derive(Debug)]
pub struct Socket {
    path: PathBuf,
    listener: Option<UnixListener>,
    id: (u64, u64),
}

impl Socket {
    /// Binds `path` with mode 0600. A socket file nobody listens on (left by a server that
    /// died) is replaced; a live one, or anything that is not a socket, is an error. The socket
    /// is bound under a temporary name, restricted, then renamed into place, so no client can
    /// connect before its mode is set.
    pub fn bind(path: &Path) -> Result<Socket, Error> {
        let io_err = |context: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| Error::Io {
                path: p,
                context,
                source,
            }
        };
        match fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::AddressInUse {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "removing a stale socket nobody listens on");
                    fs::remove_file(path).map_err(io_err("remove the stale socket", path))?;
                }
                Err(e) => return Err(io_err("probe the existing socket", path)(e)),
            },
            Ok(_) => {
                return Err(Error::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("look at the socket path", path)(e)),
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io_err("create the socket's directory", &dir))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(io_err("bind the socket", &tmp))?;
        let placed = fs::set_permissions(&tmp, Permissions::from_mode(0o600))
            .map_err(io_err("restrict the socket to its owner", &tmp))
            .and_then(|()| {
                fs::rename(&tmp, path).map_err(io_err("move the socket into place", path))
            });
        if let Err(e) = placed {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let md = fs::symlink_metadata(path).map_err(io_err("look at the socket", path))?;
        Ok(Socket {
            path: path.to_path_buf(),
            listener: Some(listener),
            id: (md.dev(), md.ino()),
        })
    }

    /// The listener, once (the server takes it).
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // Only our own socket: another server may have replaced it since.
        if let Ok(md) = fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.id {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), error = %e, "could not remove the socket");
                }
            }
        }
    }
}
