//! Status codes, the thread's last error message, and the wrapper every entry point runs in.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use core_strata::ErrorKind;

/// Success.
pub const STRATA_OK: c_int = 0;
/// The key, name or parent does not exist.
pub const STRATA_E_NOT_FOUND: c_int = 1;
/// The key or name is already taken.
pub const STRATA_E_ALREADY_EXISTS: c_int = 2;
/// The operation does not fit the snapshot's state (commit of a view, removal of a parent).
pub const STRATA_E_FAILED_PRECONDITION: c_int = 3;
/// The call is malformed: NULL where a pointer is needed, a string that is not UTF-8, an
/// empty key, a bad filter, an unknown flag or backend.
pub const STRATA_E_INVALID_ARGUMENT: c_int = 4;
/// Another process or thread held the store past the lock timeout; retry later.
pub const STRATA_E_BUSY: c_int = 5;
/// The snapshot's storage is damaged or lost; it can only be removed.
pub const STRATA_E_DATA_LOSS: c_int = 6;
/// The handle is not open (closed, or never opened).
pub const STRATA_E_CLOSED: c_int = 7;
/// The kernel or the file system failed (I/O error, full disk, missing feature), or strata
/// has a bug (a panic, caught).
pub const STRATA_E_INTERNAL: c_int = 8;

/// What an entry point failed with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FfiError {
    /// The store said no.
    #[error(transparent)]
    Store(#[from] core_strata::Error),
    /// A NULL pointer where one is needed; the parameter's name.
    #[error("{0} must not be NULL")]
    Null(&'static str),
    /// A string parameter that is not UTF-8.
    #[error("{param} is not valid UTF-8 (at byte {at})")]
    Utf8 {
        /// The parameter's name.
        param: &'static str,
        /// Where the first invalid byte is.
        at: usize,
    },
    /// Another malformed argument, described.
    #[error("{0}")]
    Invalid(String),
    /// A handle that is not open.
    #[error("the store handle {0:#x} is not open (closed, or never returned by strata_open)")]
    Closed(usize),
    /// strata panicked: a bug.
    #[error("strata panicked (a bug; please report it): {0}")]
    Panic(String),
}

impl FfiError {
    /// The status code this error returns.
    pub(crate) fn code(&self) -> c_int {
        match self {
            FfiError::Store(e) => code_of(e.kind()),
            FfiError::Null(_) | FfiError::Utf8 { .. } | FfiError::Invalid(_) => {
                STRATA_E_INVALID_ARGUMENT
            }
            FfiError::Closed(_) => STRATA_E_CLOSED,
            FfiError::Panic(_) => STRATA_E_INTERNAL,
        }
    }
}

/// The status code of an error kind: one code per kind.
pub(crate) fn code_of(kind: ErrorKind) -> c_int {
    match kind {
        ErrorKind::NotFound => STRATA_E_NOT_FOUND,
        ErrorKind::AlreadyExists => STRATA_E_ALREADY_EXISTS,
        ErrorKind::FailedPrecondition => STRATA_E_FAILED_PRECONDITION,
        ErrorKind::InvalidArgument => STRATA_E_INVALID_ARGUMENT,
        ErrorKind::Busy => STRATA_E_BUSY,
        ErrorKind::DataLoss => STRATA_E_DATA_LOSS,
        ErrorKind::Closed => STRATA_E_CLOSED,
        ErrorKind::Internal => STRATA_E_INTERNAL,
    }
}

/// The name of status `code`, as a static C string.
pub(crate) fn status_name(code: c_int) -> *const c_char {
    let name: &'static str = match code {
        STRATA_OK => "ok\0",
        STRATA_E_NOT_FOUND => "not-found\0",
        STRATA_E_ALREADY_EXISTS => "already-exists\0",
        STRATA_E_FAILED_PRECONDITION => "failed-precondition\0",
        STRATA_E_INVALID_ARGUMENT => "invalid-argument\0",
        STRATA_E_BUSY => "busy\0",
        STRATA_E_DATA_LOSS => "data-loss\0",
        STRATA_E_CLOSED => "closed\0",
        STRATA_E_INTERNAL => "internal\0",
        _ => "unknown\0",
    };
    name.as_ptr().cast()
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// This thread's last message, valid until the next failure on the thread.
pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR.with(|m| match m.borrow().as_ref() {
        Some(c) => c.as_ptr(),
        None => c"".as_ptr(),
    })
}

fn set_last_error(msg: String) {
    // A message with a NUL byte (from a key) is cut there rather than lost.
    let msg = match CString::new(msg) {
        Ok(c) => c,
        Err(e) => {
            let at = e.nul_position();
            let mut bytes = e.into_vec();
            bytes.truncate(at);
            CString::new(bytes).unwrap_or_default()
        }
    };
    LAST_ERROR.with(|m| *m.borrow_mut() = Some(msg));
}

/// Runs an entry point's body: its error becomes a status code and this thread's message,
/// a panic becomes [`STRATA_E_INTERNAL`] (never unwinding into C).
pub(crate) fn call(body: impl FnOnce() -> Result<(), FfiError>) -> c_int {
    let err = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return STRATA_OK,
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            FfiError::Panic(what)
        }
    };
    let code = err.code();
    set_last_error(err.to_string());
    code
}
