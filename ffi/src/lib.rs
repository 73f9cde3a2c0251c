//! strata's C ABI: `libstrata.so`, `libstrata.a` and the header `include/strata.h`
//! (generated from this crate by cbindgen).
//!
//! # Conventions
//!
//! * **Status codes.** Every function that can fail returns an `int`: [`STRATA_OK`] (0) or
//!   one of the `STRATA_E_*` codes, which map one to one to strata's error kinds
//!   ([`core_strata::ErrorKind`]). A NULL pointer where one is needed, a string that is not
//!   UTF-8 or a bad file descriptor is [`STRATA_E_INVALID_ARGUMENT`]; a handle that is not
//!   open is [`STRATA_E_CLOSED`]; a panic inside strata (a bug) is [`STRATA_E_INTERNAL`] —
//!   no panic ever unwinds into C.
//! * **Messages.** After a failure, [`strata_last_error`] returns this thread's message,
//!   which names what the error was about (key, path, digest) and what to do; it stays valid
//!   until the next failing call on the same thread.
//! * **Handles.** A `strata_store *` is opaque and checked on every call: a handle that was
//!   closed (or never opened) is refused with [`STRATA_E_CLOSED`], not dereferenced. A handle
//!   may be used from several threads at once; closing it while other threads use it lets
//!   their calls finish first (the store closes when the last one returns).
//! * **Memory.** Everything strata returns is freed with the `strata_free_*` function of its
//!   type (NULL is fine); strings and arrays inside a returned struct belong to it. Inputs are
//!   only borrowed for the call.
//! * **Outputs.** An output pointer (`out`) is written only on success; where it is optional
//!   the function says so.

#![allow(non_camel_case_types)]

mod error;
mod handle;
mod images;
mod types;

use std::ffi::{c_char, c_int, c_void};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use core_strata::layer::diff::DiffOptions;
use core_strata::layer::{Compression, Digest};
use core_strata::{Info, StoreOptions};

pub use error::{
    STRATA_E_ALREADY_EXISTS, STRATA_E_BUSY, STRATA_E_CLOSED, STRATA_E_DATA_LOSS,
    STRATA_E_FAILED_PRECONDITION, STRATA_E_INTERNAL, STRATA_E_INVALID_ARGUMENT, STRATA_E_NOT_FOUND,
    STRATA_OK,
};
pub use handle::strata_store;
pub use images::strata_copy_options;
pub use types::{
    strata_applied, strata_descriptor, strata_disk_usage, strata_info, strata_label, strata_layer,
    strata_mount_entry, strata_mount_list, strata_open_options, strata_walk_fn,
};

use error::{call, FfiError};
use types::{labels_in, opt_str, out_ptr, req_str, str_list};

/// The snapshot is a read-only view of its parent.
pub const STRATA_KIND_VIEW: c_int = 1;
/// The snapshot is active (writable).
pub const STRATA_KIND_ACTIVE: c_int = 2;
/// The snapshot is committed (immutable; the only kind that can be a parent).
pub const STRATA_KIND_COMMITTED: c_int = 3;

/// A plain tar layer.
pub const STRATA_COMPRESSION_NONE: c_int = 0;
/// A gzip layer.
pub const STRATA_COMPRESSION_GZIP: c_int = 1;
/// A zstd layer.
pub const STRATA_COMPRESSION_ZSTD: c_int = 2;

/// Open flag: no fsync before recording storage (keeps the guarantee against a killed
/// process, not the one against a power loss).
pub const STRATA_OPEN_NO_SYNC: u32 = 1;
/// Open flag: delete storage in `strata_remove` itself instead of in `strata_cleanup`.
pub const STRATA_OPEN_SYNC_REMOVE: u32 = 2;
/// Open flag: do not repair what dead processes left behind while opening.
pub const STRATA_OPEN_NO_RECOVER: u32 = 4;

const OPEN_FLAGS: u32 = STRATA_OPEN_NO_SYNC | STRATA_OPEN_SYNC_REMOVE | STRATA_OPEN_NO_RECOVER;

/// strata's version, a static string (never freed).
#[no_mangle]
pub extern "C" fn strata_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of this thread's last failure ("" when there was none). Valid until the next
/// failing call on this thread; never NULL, never freed by the caller.
#[no_mangle]
pub extern "C" fn strata_last_error() -> *const c_char {
    error::last_error()
}

/// The name of status code `code` (`"not-found"`, ...; `"ok"` for 0, `"unknown"` otherwise),
/// a static string.
#[no_mangle]
pub extern "C" fn strata_status_name(code: c_int) -> *const c_char {
    error::status_name(code)
}

/// Opens (creating when new) the store at `root` with `backend` (`"overlay"`, `"native"`,
/// and `"btrfs"`, `"devmapper"` when built in), or the backend the root records when
/// `backend` is NULL (overlay for a new root). `opts` may be NULL (defaults: durable, 10 s
/// lock timeout). On success `*out` is a new handle, closed with [`strata_close`].
///
/// # Safety
///
/// `root` and `backend` are NULL or NUL-terminated strings; `opts` is NULL or points to a
/// `strata_open_options`; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_open(
    root: *const c_char,
    backend: *const c_char,
    opts: *const strata_open_options,
    out: *mut *mut strata_store,
) -> c_int {
    call(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller passes NULL or valid NUL-terminated strings (see # Safety).
        let root = unsafe { req_str(root, "root") }?;
        // SAFETY: as above.
        let backend = unsafe { opt_str(backend, "backend") }?;
        // SAFETY: the caller passes NULL or a valid strata_open_options.
        let opts = unsafe { opts.as_ref() }.copied().unwrap_or_default();
        if opts.flags & !OPEN_FLAGS != 0 {
            return Err(FfiError::Invalid(format!(
                "unknown open flags {:#x} (known: STRATA_OPEN_NO_SYNC, STRATA_OPEN_SYNC_REMOVE, STRATA_OPEN_NO_RECOVER)",
                opts.flags & !OPEN_FLAGS
            )));
        }
        let mut store_opts = StoreOptions {
            durable: opts.flags & STRATA_OPEN_NO_SYNC == 0,
            sync_remove: opts.flags & STRATA_OPEN_SYNC_REMOVE != 0,
            recover: opts.flags & STRATA_OPEN_NO_RECOVER == 0,
            ..StoreOptions::default()
        };
        if opts.lock_timeout_ms > 0 {
            store_opts.lock_timeout = Duration::from_millis(u64::from(opts.lock_timeout_ms));
        }
        let store = strata_any::open(Path::new(root), backend, store_opts)?;
        // SAFETY: `out` was checked non-NULL and the caller gave writable storage.
        unsafe { *out = handle::register(store) };
        Ok(())
    })
}

/// Closes a handle. Calls other threads are making with it finish first; any later call
/// with it fails with [`STRATA_E_CLOSED`], as does closing it again.
///
/// # Safety
///
/// `store` is any pointer value (it is looked up, never dereferenced unless open).
#[no_mangle]
pub unsafe extern "C" fn strata_close(store: *mut strata_store) -> c_int {
    call(|| handle::close(store))
}

/// Which `strata_prepare` / `strata_view` is asked for.
#[derive(Clone, Copy)]
enum Create {
    Prepare,
    /// Prepare, held by the lease (a C string) from its creation.
    PrepareIn(*const c_char),
    View,
}

/// Shared body of [`strata_prepare`] and [`strata_view`].
///
/// # Safety
///
/// As [`strata_prepare`].
unsafe fn create(
    how: Create,
    store: *mut strata_store,
    key: *const c_char,
    parent: *const c_char,
    labels: *const strata_label,
    labels_len: usize,
    out: *mut *mut strata_mount_list,
) -> Result<(), FfiError> {
    let s = handle::get(store)?;
    // SAFETY: the caller passes valid strings and a valid label array (see # Safety).
    let (key, parent, labels) = unsafe {
        (
            req_str(key, "key")?,
            opt_str(parent, "parent")?,
            labels_in(labels, labels_len)?,
        )
    };
    let mounts = match how {
        Create::Prepare => s.prepare(key, parent, labels)?,
        Create::PrepareIn(lease) => {
            // SAFETY: the caller passes a valid lease string (see strata_prepare_in).
            let lease = unsafe { req_str(lease, "lease")? };
            s.prepare_in(lease, key, parent, labels)?
        }
        Create::View => s.view(key, parent, labels)?,
    };
    if !out.is_null() {
        // SAFETY: non-NULL `out` points to writable storage (see # Safety).
        unsafe { *out = types::mounts_out(&mounts)? };
    }
    Ok(())
}

/// Creates active snapshot `key` on committed `parent` (NULL: none) with `labels_len`
/// labels, and returns in `*out` (when `out` is not NULL) the mounts that present it
/// (mount them with [`strata_mount_entry`]; free with [`strata_free_mounts`]).
///
/// # Safety
///
/// `key` is a NUL-terminated string, `parent` NULL or one; `labels` points to `labels_len`
/// labels (NULL when 0); `out` is NULL or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_prepare(
    store: *mut strata_store,
    key: *const c_char,
    parent: *const c_char,
    labels: *const strata_label,
    labels_len: usize,
    out: *mut *mut strata_mount_list,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    call(|| unsafe { create(Create::Prepare, store, key, parent, labels, labels_len, out) })
}

/// As [`strata_prepare`], with the new snapshot held by lease `lease` from the transaction
/// that creates it: a builder's way to prepare beside a remover such as containerd's gc on a
/// served store, which removes every snapshot it does not know of that nothing holds. Fails
/// with `STRATA_E_NOT_FOUND`, making nothing, when there is no such lease.
///
/// # Safety
///
/// As [`strata_prepare`]; `lease` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_prepare_in(
    store: *mut strata_store,
    lease: *const c_char,
    key: *const c_char,
    parent: *const c_char,
    labels: *const strata_label,
    labels_len: usize,
    out: *mut *mut strata_mount_list,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    call(|| unsafe {
        create(
            Create::PrepareIn(lease),
            store,
            key,
            parent,
            labels,
            labels_len,
            out,
        )
    })
}

/// Creates read-only view `key` of committed `parent`; otherwise as [`strata_prepare`].
///
/// # Safety
///
/// As [`strata_prepare`].
#[no_mangle]
pub unsafe extern "C" fn strata_view(
    store: *mut strata_store,
    key: *const c_char,
    parent: *const c_char,
    labels: *const strata_label,
    labels_len: usize,
    out: *mut *mut strata_mount_list,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    call(|| unsafe { create(Create::View, store, key, parent, labels, labels_len, out) })
}

/// The mounts of active or view snapshot `key`, in `*out` (free with
/// [`strata_free_mounts`]).
///
/// # Safety
///
/// `key` is a NUL-terminated string; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_mounts(
    store: *mut strata_store,
    key: *const c_char,
    out: *mut *mut strata_mount_list,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller passes a valid string.
        let key = unsafe { req_str(key, "key") }?;
        let mounts = s.mounts(key)?;
        // SAFETY: `out` was checked non-NULL.
        unsafe { *out = types::mounts_out(&mounts)? };
        Ok(())
    })
}

/// Commits active snapshot `key` as `name` with `labels_len` labels.
///
/// # Safety
///
/// `name` and `key` are NUL-terminated strings; `labels` points to `labels_len` labels (NULL
/// when 0).
#[no_mangle]
pub unsafe extern "C" fn strata_commit(
    store: *mut strata_store,
    name: *const c_char,
    key: *const c_char,
    labels: *const strata_label,
    labels_len: usize,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes valid strings and labels.
        let (name, key, labels) = unsafe {
            (
                req_str(name, "name")?,
                req_str(key, "key")?,
                labels_in(labels, labels_len)?,
            )
        };
        s.commit(name, key, labels)?;
        Ok(())
    })
}

/// Removes snapshot `key` (a committed one only when nothing is built on it).
///
/// # Safety
///
/// `key` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_remove(store: *mut strata_store, key: *const c_char) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes a valid string.
        let key = unsafe { req_str(key, "key") }?;
        s.remove(key)?;
        Ok(())
    })
}

/// What the store knows of snapshot `key`, in `*out` (free with [`strata_free_info`]).
///
/// # Safety
///
/// `key` is a NUL-terminated string; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_stat(
    store: *mut strata_store,
    key: *const c_char,
    out: *mut *mut strata_info,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller passes a valid string.
        let key = unsafe { req_str(key, "key") }?;
        let info = s.stat(key)?;
        // SAFETY: `out` was checked non-NULL.
        unsafe { *out = Box::into_raw(Box::new(types::info_out(&info)?)) };
        Ok(())
    })
}

/// Updates snapshot `name`'s labels, containerd's way: with `fieldpaths` empty, its labels
/// become `labels`; with field paths `labels.KEY`, only those keys change (a key missing
/// from `labels` is deleted); the path `labels` replaces them all. The updated info is
/// returned in `*out` when `out` is not NULL (free with [`strata_free_info`]).
///
/// # Safety
///
/// `name` is a NUL-terminated string; `labels` points to `labels_len` labels and
/// `fieldpaths` to `fieldpaths_len` strings (each NULL when its length is 0); `out` is NULL
/// or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_update(
    store: *mut strata_store,
    name: *const c_char,
    labels: *const strata_label,
    labels_len: usize,
    fieldpaths: *const *const c_char,
    fieldpaths_len: usize,
    out: *mut *mut strata_info,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes valid strings and arrays.
        let (name, labels, paths) = unsafe {
            (
                req_str(name, "name")?,
                labels_in(labels, labels_len)?,
                str_list(fieldpaths, fieldpaths_len, "fieldpaths")?,
            )
        };
        let mut info = s.stat(name)?;
        info.labels = labels;
        let updated = s.update(&info, &paths)?;
        if !out.is_null() {
            // SAFETY: non-NULL `out` points to writable storage.
            unsafe { *out = Box::into_raw(Box::new(types::info_out(&updated)?)) };
        }
        Ok(())
    })
}

/// Disk usage of snapshot `key`'s own layer, in `*out`.
///
/// # Safety
///
/// `key` is a NUL-terminated string; `out` points to a writable `strata_disk_usage`.
#[no_mangle]
pub unsafe extern "C" fn strata_usage(
    store: *mut strata_store,
    key: *const c_char,
    out: *mut strata_disk_usage,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller passes a valid string.
        let key = unsafe { req_str(key, "key") }?;
        let u = s.usage(key)?;
        // SAFETY: `out` was checked non-NULL.
        unsafe {
            *out = strata_disk_usage {
                size: u.size,
                inodes: u.inodes,
            }
        };
        Ok(())
    })
}

/// Calls `fn(info, user)` for every snapshot that matches one of the `filters_len` filters
/// (containerd's syntax, e.g. `kind==committed`, `labels."a.b"==x`, `parent==p`; none
/// matches all). `info` is valid during the call only. A non-zero return from `fn` stops
/// the walk, and `strata_walk` returns [`STRATA_OK`].
///
/// # Safety
///
/// `filters` points to `filters_len` NUL-terminated strings (NULL when 0); `func` is a
/// valid function that does not unwind.
#[no_mangle]
pub unsafe extern "C" fn strata_walk(
    store: *mut strata_store,
    filters: *const *const c_char,
    filters_len: usize,
    func: strata_walk_fn,
    user: *mut c_void,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        let func = func.ok_or_else(|| FfiError::Null("fn"))?;
        // SAFETY: the caller passes a valid array of strings.
        let filters = unsafe { str_list(filters, filters_len, "filters") }?;
        let mut c_failure = None;
        let walked = s.walk(&filters, &mut |info: &Info| {
            if c_failure.is_some() {
                return Ok(());
            }
            match types::info_out(info) {
                Ok(mut c) => {
                    // SAFETY: `c` is a valid strata_info for the duration of the call; the
                    // caller promised a valid function.
                    let stop = unsafe { func(&c, user) };
                    types::free_info_fields(&mut c);
                    if stop != 0 {
                        c_failure = Some(None);
                    }
                }
                Err(e) => c_failure = Some(Some(e)),
            }
            Ok(())
        });
        walked?;
        match c_failure {
            Some(Some(e)) => Err(e),
            _ => Ok(()),
        }
    })
}

/// Deletes the storage of removed snapshots and finishes interrupted operations.
///
/// # Safety
///
/// `store` is any pointer value (checked).
#[no_mangle]
pub unsafe extern "C" fn strata_cleanup(store: *mut strata_store) -> c_int {
    call(|| {
        handle::get(store)?.cleanup()?;
        Ok(())
    })
}

/// Mounts `mounts` (from [`strata_prepare`], [`strata_view`] or [`strata_mounts`]) at the
/// existing directory `target`, as containerd would.
///
/// # Safety
///
/// `mounts` points to a `strata_mount_list` strata returned; `target` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_mount(
    mounts: *const strata_mount_list,
    target: *const c_char,
) -> c_int {
    call(|| {
        // SAFETY: the caller passes NULL or mounts strata returned.
        let mounts = unsafe { mounts.as_ref() }.ok_or(FfiError::Null("mounts"))?;
        // SAFETY: as above; the arrays are those strata built.
        let mounts = unsafe { types::mounts_in(mounts) }?;
        // SAFETY: the caller passes a valid string.
        let target = unsafe { req_str(target, "target") }?;
        core_strata::mount::mount_all(&mounts, Path::new(target))?;
        Ok(())
    })
}

/// Unmounts `target` (what [`strata_mount_entry`] mounted there).
///
/// # Safety
///
/// `target` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_unmount(target: *const c_char) -> c_int {
    call(|| {
        // SAFETY: the caller passes a valid string.
        let target = unsafe { req_str(target, "target") }?;
        core_strata::mount::unmount(Path::new(target))?;
        Ok(())
    })
}

fn compression(c: c_int) -> Result<Compression, FfiError> {
    match c {
        STRATA_COMPRESSION_NONE => Ok(Compression::None),
        STRATA_COMPRESSION_GZIP => Ok(Compression::Gzip),
        STRATA_COMPRESSION_ZSTD => Ok(Compression::Zstd),
        other => Err(FfiError::Invalid(format!(
            "unknown compression {other} (STRATA_COMPRESSION_NONE, _GZIP or _ZSTD)"
        ))),
    }
}

/// A file of the caller's descriptor `fd`, duplicated (the caller keeps and closes its own).
fn dup_fd(fd: c_int) -> Result<File, FfiError> {
    if fd < 0 {
        return Err(FfiError::Invalid(format!(
            "file descriptor {fd} is not valid"
        )));
    }
    // SAFETY: the descriptor is only borrowed for the dup below; a closed one makes the
    // fcntl fail with EBADF, reported as an invalid argument.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed)
        .map_err(|e| FfiError::Invalid(format!("file descriptor {fd} is not open: {e}")))?;
    let owned = rustix::io::fcntl_dupfd_cloexec(borrowed.as_fd(), 0)
        .map_err(|e| FfiError::Invalid(format!("cannot duplicate file descriptor {fd}: {e}")))?;
    Ok(File::from(owned))
}

/// Writes committed snapshot `name` as a layer with `compression` (`STRATA_COMPRESSION_*`)
/// to `out` and returns its descriptor in `*desc` when `desc` is not NULL (free with
/// [`strata_free_descriptor`]).
fn diff_to(
    store: *mut strata_store,
    name: *const c_char,
    compression_: c_int,
    out: File,
    what: &Path,
    desc: *mut *mut strata_descriptor,
) -> Result<(), FfiError> {
    let s = handle::get(store)?;
    // SAFETY: the callers' contracts: `name` is a valid string.
    let name = unsafe { req_str(name, "name") }?;
    let opts = DiffOptions::from_env(compression(compression_)?);
    let mut w = BufWriter::new(out);
    let (d, _) = s.diff(name, &opts, &mut w)?;
    w.flush()
        .map_err(|e| core_strata::Error::io(what, "write the layer", e))?;
    if !desc.is_null() {
        // SAFETY: non-NULL `desc` points to writable storage.
        unsafe { *desc = Box::into_raw(Box::new(types::descriptor_out(&d)?)) };
    }
    Ok(())
}

/// Writes committed snapshot `name` as a layer with `compression` (`STRATA_COMPRESSION_*`)
/// to `fd`, which the caller keeps open (written from its current offset), and returns its descriptor in `*desc` when `desc` is not NULL (free with
/// [`strata_free_descriptor`]).
///
/// # Safety
///
/// `name` is a NUL-terminated string; `desc` is NULL or points to writable storage for a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_diff_fd(
    store: *mut strata_store,
    name: *const c_char,
    compression: c_int,
    fd: c_int,
    desc: *mut *mut strata_descriptor,
) -> c_int {
    call(|| {
        let f = dup_fd(fd)?;
        diff_to(store, name, compression, f, Path::new("<fd>"), desc)
    })
}

/// As [`strata_diff_fd`], to a file at `path` (created or truncated, synced at the end).
///
/// # Safety
///
/// `name` and `path` are NUL-terminated strings; `desc` is NULL or points to writable
/// storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_diff_path(
    store: *mut strata_store,
    name: *const c_char,
    compression: c_int,
    path: *const c_char,
    desc: *mut *mut strata_descriptor,
) -> c_int {
    call(|| {
        // SAFETY: the caller passes a valid string.
        let path = Path::new(unsafe { req_str(path, "path") }?);
        handle::get(store)?;
        let f = File::create(path)
            .map_err(|e| core_strata::Error::io(path, "create the layer file", e))?;
        let sync = f
            .try_clone()
            .map_err(|e| core_strata::Error::io(path, "open the layer file", e))?;
        diff_to(store, name, compression, f, path, desc)?;
        sync.sync_all()
            .map_err(|e| core_strata::Error::io(path, "sync the layer file", e))?;
        Ok(())
    })
}

/// Applies the layer read from `input` to active snapshot `key`.
fn apply_from(
    store: *mut strata_store,
    key: *const c_char,
    input: File,
    expected: *const c_char,
    out: *mut *mut strata_applied,
) -> Result<(), FfiError> {
    let s = handle::get(store)?;
    // SAFETY: the callers' contracts: valid strings.
    let (key, expected) = unsafe { (req_str(key, "key")?, opt_str(expected, "digest")?) };
    let expected = expected.map(parse_digest).transpose()?;
    let mut r = BufReader::new(input);
    let applied = s.apply(key, &mut r, expected.as_ref())?;
    if !out.is_null() {
        // SAFETY: non-NULL `out` points to writable storage.
        unsafe { *out = Box::into_raw(Box::new(types::applied_out(&applied)?)) };
    }
    Ok(())
}

fn parse_digest(d: &str) -> Result<Digest, FfiError> {
    Digest::parse(d).map_err(|why| FfiError::Invalid(format!("digest {d:?}: {why}")))
}

/// Applies the layer (tar, gzip or zstd, detected) read from `fd` to active snapshot `key`,
/// checking the blob against `digest` (`sha256:...`) unless it is NULL; what was applied is
/// returned in `*out` when `out` is not NULL (free with [`strata_free_applied`]). A failure
/// that left the snapshot half changed marks it broken.
///
/// # Safety
///
/// `key` is a NUL-terminated string, `digest` NULL or one; `out` is NULL or points to
/// writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_apply_fd(
    store: *mut strata_store,
    key: *const c_char,
    fd: c_int,
    digest: *const c_char,
    out: *mut *mut strata_applied,
) -> c_int {
    call(|| apply_from(store, key, dup_fd(fd)?, digest, out))
}

/// As [`strata_apply_fd`], from the file at `path`.
///
/// # Safety
///
/// As [`strata_apply_fd`]; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_apply_path(
    store: *mut strata_store,
    key: *const c_char,
    path: *const c_char,
    digest: *const c_char,
    out: *mut *mut strata_applied,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    call(|| apply_from(store, key, unsafe { layer_file(path) }?, digest, out))
}

/// Applies a layer on top of `parent`.
fn apply_layer_from(
    store: *mut strata_store,
    lease: Option<&str>,
    parent: *const c_char,
    input: File,
    digest: *const c_char,
    diff_id: *const c_char,
    out: *mut *mut strata_layer,
) -> Result<(), FfiError> {
    let s = handle::get(store)?;
    // SAFETY: the callers' contracts: NULL or valid strings.
    let (parent, digest, diff_id) = unsafe {
        (
            opt_str(parent, "parent")?,
            opt_str(digest, "digest")?,
            opt_str(diff_id, "diff_id")?,
        )
    };
    let digest = digest.map(parse_digest).transpose()?;
    let diff_id = diff_id.map(parse_digest).transpose()?;
    let layer = s.apply_layer_in(
        lease,
        parent,
        digest.as_ref(),
        diff_id.as_ref(),
        &mut BufReader::new(input),
    )?;
    if !out.is_null() {
        // SAFETY: non-NULL `out` points to writable storage.
        unsafe { *out = Box::into_raw(Box::new(types::layer_out(&layer)?)) };
    }
    Ok(())
}

/// Opens the layer file at `path` for the `*_path` apply calls.
///
/// # Safety
///
/// `path` is a NUL-terminated string.
unsafe fn layer_file(path: *const c_char) -> Result<File, FfiError> {
    // SAFETY: forwarded from this function's contract.
    let path = Path::new(unsafe { req_str(path, "path") }?);
    Ok(File::open(path).map_err(|e| core_strata::Error::io(path, "open the layer", e))?)
}

/// Applies the layer read from `fd` on top of committed `parent` (NULL: none) and commits it
/// under its chainID; with `diff_id` given and that chain already committed, returns it
/// without reading (the cache hit). `digest` (NULL: unchecked) checks the blob. The layer is
/// returned in `*out` when `out` is not NULL (free with [`strata_free_layer`]). A failure
/// leaves nothing behind.
///
/// # Safety
///
/// `parent`, `digest` and `diff_id` are NULL or NUL-terminated strings; `out` is NULL or
/// points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_apply_layer_fd(
    store: *mut strata_store,
    parent: *const c_char,
    fd: c_int,
    digest: *const c_char,
    diff_id: *const c_char,
    out: *mut *mut strata_layer,
) -> c_int {
    call(|| apply_layer_from(store, None, parent, dup_fd(fd)?, digest, diff_id, out))
}

/// As [`strata_apply_layer_fd`], from the file at `path`.
///
/// # Safety
///
/// As [`strata_apply_layer_fd`]; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_apply_layer_path(
    store: *mut strata_store,
    parent: *const c_char,
    path: *const c_char,
    digest: *const c_char,
    diff_id: *const c_char,
    out: *mut *mut strata_layer,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from this function's contract.
        let f = unsafe { layer_file(path) }?;
        apply_layer_from(store, None, parent, f, digest, diff_id, out)
    })
}

/// As [`strata_apply_layer_fd`], with the layer held by lease `lease` (which must exist)
/// from its first moment — the snapshot it is applied into, the layer it commits, or the
/// one it finds cached — so that a gc before the caller tags it removes nothing (a pull).
///
/// # Safety
///
/// As [`strata_apply_layer_fd`]; `lease` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_apply_layer_in_fd(
    store: *mut strata_store,
    lease: *const c_char,
    parent: *const c_char,
    fd: c_int,
    digest: *const c_char,
    diff_id: *const c_char,
    out: *mut *mut strata_layer,
) -> c_int {
    call(|| {
        // SAFETY: the caller passes a valid string.
        let lease = Some(unsafe { req_str(lease, "lease") }?);
        apply_layer_from(store, lease, parent, dup_fd(fd)?, digest, diff_id, out)
    })
}

/// As [`strata_apply_layer_in_fd`], from the file at `path`.
///
/// # Safety
///
/// As [`strata_apply_layer_in_fd`]; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_apply_layer_in_path(
    store: *mut strata_store,
    lease: *const c_char,
    parent: *const c_char,
    path: *const c_char,
    digest: *const c_char,
    diff_id: *const c_char,
    out: *mut *mut strata_layer,
) -> c_int {
    call(|| {
        // SAFETY: the caller passes valid strings.
        let (lease, f) = unsafe { (req_str(lease, "lease")?, layer_file(path)?) };
        apply_layer_from(store, Some(lease), parent, f, digest, diff_id, out)
    })
}

/// Frees what [`strata_prepare`], [`strata_view`] or [`strata_mounts`] returned (NULL is
/// fine).
///
/// # Safety
///
/// `mounts` is NULL or a pointer strata returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn strata_free_mounts(mounts: *mut strata_mount_list) {
    // SAFETY: the caller passes NULL or a pointer strata returned.
    unsafe { types::free_mounts(mounts) }
}

/// Frees what [`strata_stat`] or [`strata_update`] returned (NULL is fine).
///
/// # Safety
///
/// `info` is NULL or a pointer strata returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn strata_free_info(info: *mut strata_info) {
    // SAFETY: the caller passes NULL or a pointer strata returned, not freed before.
    unsafe { types::free_boxed(info, types::free_info_fields) }
}

/// Frees what [`strata_diff_fd`] or [`strata_diff_path`] returned (NULL is fine).
///
/// # Safety
///
/// `desc` is NULL or a pointer strata returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn strata_free_descriptor(desc: *mut strata_descriptor) {
    // SAFETY: the caller passes NULL or a pointer strata returned, not freed before.
    unsafe { types::free_boxed(desc, types::free_descriptor_fields) }
}

/// Frees what [`strata_apply_fd`] or [`strata_apply_path`] returned (NULL is fine).
///
/// # Safety
///
/// `applied` is NULL or a pointer strata returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn strata_free_applied(applied: *mut strata_applied) {
    // SAFETY: the caller passes NULL or a pointer strata returned, not freed before.
    unsafe {
        types::free_boxed(applied, |a| {
            types::free_descriptor_fields(&mut a.descriptor);
            types::free_c_string(&mut a.content);
        })
    }
}

/// Frees what [`strata_apply_layer_fd`] or [`strata_apply_layer_path`] returned (NULL is
/// fine).
///
/// # Safety
///
/// `layer` is NULL or a pointer strata returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn strata_free_layer(layer: *mut strata_layer) {
    // SAFETY: the caller passes NULL or a pointer strata returned, not freed before.
    unsafe { types::free_boxed(layer, types::free_layer_fields) }
}
