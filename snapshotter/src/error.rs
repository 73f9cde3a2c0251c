//! The one error type of the `strata` crate.
//!
//! Every error names what it was about (a snapshot key, a path, a filter) and, where the
//! caller can do something about it, what to do. Callers branch on [`Error::kind`], whose
//! values are containerd's error classes, so that a gRPC front end maps them one to one.

use std::fmt;
use std::path::PathBuf;

/// The error classes callers branch on (containerd's `errdefs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The key, name or parent does not exist.
    NotFound,
    /// The key or name is already taken.
    AlreadyExists,
    /// The operation does not fit the snapshot's state (commit of a View, removal of a parent).
    FailedPrecondition,
    /// The call itself is malformed (empty key, bad filter, update of an immutable field).
    InvalidArgument,
    /// Another process or thread holds the store past the lock timeout; retry later.
    Busy,
    /// The snapshot's storage is damaged or was lost; it can only be removed.
    DataLoss,
    /// The store was closed.
    Closed,
    /// The kernel or the filesystem failed (I/O error, full disk, missing feature).
    Internal,
}

impl ErrorKind {
    /// A short stable name (`not-found`, `already-exists`, ...), used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::FailedPrecondition => "failed-precondition",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::Busy => "busy",
            ErrorKind::DataLoss => "data-loss",
            ErrorKind::Closed => "closed",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error a backend reports to the store. Backends keep their own `thiserror` enum and say
/// which class each of its variants belongs to; the store adds the snapshot key.
pub trait BackendError: std::error::Error + Send + Sync + 'static {
    /// The class of this error; I/O failures are [`ErrorKind::Internal`].
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

/// The error type of the `strata` crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot has this key or name.
    #[error("snapshot {key:?} not found{}", hint_suffix(.hint))]
    NotFound {
        /// The key or name asked for.
        key: String,
        /// What the caller may do about it, empty when there is nothing to add.
        hint: String,
    },

    /// The key or name is already used by another snapshot.
    #[error("snapshot {key:?} already exists: keys and names share one namespace; pick another or remove it first")]
    AlreadyExists {
        /// The key or name that is taken.
        key: String,
    },

    /// The snapshot is not in a state that allows the operation.
    #[error("snapshot {key:?}: {reason}")]
    FailedPrecondition {
        /// The snapshot concerned.
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The arguments are malformed.
    #[error("invalid argument {what}: {reason}")]
    InvalidArgument {
        /// The argument concerned (a key, a filter, a field path), quoted.
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The metadata database stayed locked by another process or thread past the lock timeout.
    #[error("snapshot {key:?}: the store at {root} is busy (locked by another process for longer than the lock timeout); retry, or raise --lock-timeout")]
    Busy {
        /// The snapshot the call was about (empty for store-wide calls).
        key: String,
        /// The store root.
        root: PathBuf,
    },

    /// The snapshot's storage is damaged or missing.
    #[error("snapshot {key:?} is broken: {reason}; remove it and recreate it")]
    Broken {
        /// The snapshot concerned.
        key: String,
        /// What was found.
        reason: String,
    },

    /// The store was closed; open it again.
    #[error("the store is closed; open it again")]
    Closed,

    /// A backend operation failed.
    #[error("snapshot {key:?}: {op} failed in the {backend} backend: {source}{}", full_hint(&**.source))]
    Backend {
        /// The snapshot concerned.
        key: String,
        /// The operation (`create`, `commit`, `mounts`, ...).
        op: &'static str,
        /// The backend's name.
        backend: &'static str,
        /// The class the backend gave the error.
        kind: ErrorKind,
        /// The backend's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The metadata database failed.
    #[error("metadata database {path}: {context}: {source}{}", full_hint(.source))]
    Metadata {
        /// The database file.
        path: PathBuf,
        /// What the store was doing.
        context: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },

    /// The database was written by a newer strata, or is not a strata database.
    #[error("metadata database {path}: {reason}")]
    Schema {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// Mounting failed.
    #[error("mount {mount} on {target}: {source}{}", full_hint(.source))]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The mount, as `type source options`.
        mount: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A file-system operation on a path failed.
    #[error("{path}: {context}: {source}{}", full_hint(.source))]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Whether `e` or what caused it says the disk is full: ENOSPC, EDQUOT, SQLite's "database
/// or disk is full".
fn chain_is_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        let full = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|c| {
                c == rustix::io::Errno::NOSPC.raw_os_error()
                    || c == rustix::io::Errno::DQUOT.raw_os_error()
            })
            || e.downcast_ref::<rusqlite::Error>()
                .is_some_and(|e| e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull));
        if full {
            return true;
        }
        next = e.source();
    }
    false
}

/// What to do when `e` says the disk is full; empty otherwise.
fn full_hint(e: &(dyn std::error::Error + 'static)) -> &'static str {
    if chain_is_full(e) {
        "; the file system holding the store is full: remove what is not needed (strata remove, strata gc) or give it more space, then try again"
    } else {
        ""
    }
}

impl Error {
    /// Whether the error comes from a full disk (or quota).
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Io { source, .. } | Error::Mount { source, .. } => chain_is_full(source),
            Error::Metadata { source, .. } => chain_is_full(source),
            Error::Backend { source, .. } => chain_is_full(&**source),
            _ => false,
        }
    }
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(": {hint}")
    }
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::FailedPrecondition { .. } => ErrorKind::FailedPrecondition,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Broken { .. } => ErrorKind::DataLoss,
            Error::Closed => ErrorKind::Closed,
            Error::Backend { kind, .. } => *kind,
            Error::Metadata { .. }
            | Error::Schema { .. }
            | Error::Mount { .. }
            | Error::Io { .. } => ErrorKind::Internal,
        }
    }

    /// The snapshot key this error is about, when it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::NotFound { key, .. }
            | Error::AlreadyExists { key }
            | Error::FailedPrecondition { key, .. }
            | Error::Broken { key, .. }
            | Error::Backend { key, .. } => Some(key),
            Error::Busy { key, .. } if !key.is_empty() => Some(key),
            _ => None,
        }
    }

    /// A [`Error::NotFound`] without a hint.
    pub fn not_found(key: impl Into<String>) -> Error {
        Error::NotFound {
            key: key.into(),
            hint: String::new(),
        }
    }

    /// A [`Error::FailedPrecondition`].
    pub fn precondition(key: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::FailedPrecondition {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::InvalidArgument`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Backend`] for `key`, classed by the backend.
    pub fn backend<E: BackendError>(
        key: impl Into<String>,
        op: &'static str,
        backend: &'static str,
        err: E,
    ) -> Error {
        Error::Backend {
            key: key.into(),
            op,
            backend,
            kind: err.kind(),
            source: Box::new(err),
        }
    }

    /// An [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, context: &'static str, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            context,
            source,
        }
    }
}

/// The result type of the `strata` crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("write {0}")]
    struct Wrapped(#[source] std::io::Error);
    impl BackendError for Wrapped {}

    #[test]
    fn a_full_disk_says_what_to_do_wherever_it_is_in_the_chain() {
        let full = || std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        let direct = Error::io("/s/snapshots/3/fs/f", "write the file", full()).to_string();
        assert!(
            direct.contains("/s/snapshots/3/fs/f") && direct.contains("strata gc"),
            "{direct}"
        );
        let backend = Error::backend("k", "commit", "overlay", Wrapped(full())).to_string();
        assert!(
            backend.contains("\"k\"") && backend.contains("is full"),
            "{backend}"
        );
        let sqlite = Error::Metadata {
            path: "/s/metadata.db".into(),
            context: "commit".into(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                None,
            ),
        }
        .to_string();
        assert!(sqlite.contains("is full"), "{sqlite}");
        // Other failures get no such advice.
        let eio = Error::io("/s/x", "read", std::io::Error::from_raw_os_error(5)).to_string();
        assert!(!eio.contains("full"), "{eio}");
    }
}
