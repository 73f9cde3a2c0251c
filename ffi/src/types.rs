//! The C structs and the conversions between them and strata's types.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::{SystemTime, UNIX_EPOCH};

use core_strata::layer::apply::Applied;
use core_strata::layer::Descriptor;
use core_strata::{AppliedLayer, Info, Kind, Labels, Mount};

use crate::error::FfiError;
use crate::{STRATA_KIND_ACTIVE, STRATA_KIND_COMMITTED, STRATA_KIND_VIEW};

/// Options of `strata_open` (all zero: the defaults).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct strata_open_options {
    /// `STRATA_OPEN_*` flags, OR'ed.
    pub flags: u32,
    /// How long to wait for another process or thread holding the store before failing
    /// with `STRATA_E_BUSY`, in milliseconds; 0: 10 s.
    pub lock_timeout_ms: u32,
}

/// A label: a key and its value.
#[repr(C)]
#[derive(Debug)]
pub struct strata_label {
    /// The key.
    pub key: *const c_char,
    /// The value.
    pub value: *const c_char,
}

/// One mount, in containerd's shape: `mount -t TYPE SOURCE -o OPTIONS`.
#[repr(C)]
#[derive(Debug)]
pub struct strata_mount_entry {
    /// File system type: `bind`, `overlay`, `ext4`, ...
    pub fs_type: *const c_char,
    /// The source: a path for `bind`, a device, or the file system's name (`overlay`).
    pub source: *const c_char,
    /// The options (`ro`, `rbind`, `lowerdir=...`).
    pub options: *const *const c_char,
    /// How many options.
    pub options_len: usize,
}

/// The mounts that present a snapshot, to mount in order at one target.
#[repr(C)]
#[derive(Debug)]
pub struct strata_mount_list {
    /// The mounts.
    pub mounts: *const strata_mount_entry,
    /// How many.
    pub len: usize,
}

/// What the store knows of a snapshot.
#[repr(C)]
#[derive(Debug)]
pub struct strata_info {
    /// `STRATA_KIND_VIEW`, `STRATA_KIND_ACTIVE` or `STRATA_KIND_COMMITTED`.
    pub kind: c_int,
    /// The key of an active or view snapshot, the name of a committed one.
    pub name: *const c_char,
    /// The parent's name, NULL without one.
    pub parent: *const c_char,
    /// The labels, sorted by key.
    pub labels: *const strata_label,
    /// How many labels.
    pub labels_len: usize,
    /// When the snapshot was created (committed, for a committed one), in nanoseconds since
    /// the Unix epoch.
    pub created_unix_nanos: i64,
    /// When it last changed, in nanoseconds since the Unix epoch.
    pub updated_unix_nanos: i64,
}

/// Disk usage of a snapshot's own layer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct strata_disk_usage {
    /// Bytes of disk space used.
    pub size: u64,
    /// Inodes used.
    pub inodes: u64,
}

/// What identifies a layer blob.
#[repr(C)]
#[derive(Debug)]
pub struct strata_descriptor {
    /// The OCI media type.
    pub media_type: *const c_char,
    /// `sha256:<hex>` of the blob.
    pub digest: *const c_char,
    /// The blob's size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: *const c_char,
}

/// What `strata_apply_*` applied.
#[repr(C)]
#[derive(Debug)]
pub struct strata_applied {
    /// The layer as read (media type from the detected compression).
    pub descriptor: strata_descriptor,
    /// The content checksum of the change set.
    pub content: *const c_char,
    /// Entries applied, whiteouts included.
    pub entries: u64,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
}

/// What `strata_apply_layer_*` produced.
#[repr(C)]
#[derive(Debug)]
pub struct strata_layer {
    /// The committed snapshot, named by the layer's chainID.
    pub name: *const c_char,
    /// The layer's diffID.
    pub diff_id: *const c_char,
    /// Its content checksum.
    pub content: *const c_char,
    /// True when the chain was already there and the input was not read.
    pub cached: bool,
}

/// The callback of `strata_walk`: non-zero stops the walk.
pub type strata_walk_fn =
    Option<unsafe extern "C" fn(info: *const strata_info, user: *mut c_void) -> c_int>;

/// A C copy of `s` (owned: free with [`free_c_string`]).
pub(crate) fn c_string(s: &str, what: &'static str) -> Result<*const c_char, FfiError> {
    CString::new(s)
        .map(|c| c.into_raw().cast_const())
        .map_err(|_| FfiError::Invalid(format!("{what} {s:?} contains a NUL byte")))
}

/// Frees a string made by [`c_string`] and sets the pointer to NULL.
pub(crate) fn free_c_string(p: &mut *const c_char) {
    if !p.is_null() {
        // SAFETY: non-NULL strings in strata's structs come from `c_string`.
        drop(unsafe { CString::from_raw(p.cast_mut()) });
        *p = std::ptr::null();
    }
}

/// The output pointer `p`, which must not be NULL.
pub(crate) fn out_ptr<T>(p: *mut T, name: &'static str) -> Result<*mut T, FfiError> {
    if p.is_null() {
        Err(FfiError::Null(name))
    } else {
        Ok(p)
    }
}

/// A string parameter that may be NULL.
///
/// # Safety
///
/// `p` is NULL or a NUL-terminated string that outlives the returned reference.
pub(crate) unsafe fn opt_str<'a>(
    p: *const c_char,
    name: &'static str,
) -> Result<Option<&'a str>, FfiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map(Some).map_err(|e| FfiError::Utf8 {
        param: name,
        at: e.valid_up_to(),
    })
}

/// A string parameter that must not be NULL.
///
/// # Safety
///
/// As [`opt_str`].
pub(crate) unsafe fn req_str<'a>(
    p: *const c_char,
    name: &'static str,
) -> Result<&'a str, FfiError> {
    // SAFETY: forwarded.
    unsafe { opt_str(p, name) }?.ok_or(FfiError::Null(name))
}

/// An array of `len` strings (NULL when `len` is 0).
///
/// # Safety
///
/// `p` points to `len` NUL-terminated strings.
pub(crate) unsafe fn str_list<'a>(
    p: *const *const c_char,
    len: usize,
    name: &'static str,
) -> Result<Vec<&'a str>, FfiError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(FfiError::Null(name));
    }
    // SAFETY: the caller passes `len` pointers.
    let items = unsafe { std::slice::from_raw_parts(p, len) };
    items
        .iter()
        // SAFETY: each is a NUL-terminated string.
        .map(|&s| unsafe { req_str(s, name) })
        .collect()
}

/// An array of `len` labels (NULL when `len` is 0) as strata's labels.
///
/// # Safety
///
/// `p` points to `len` labels whose strings are NUL-terminated.
pub(crate) unsafe fn labels_in(p: *const strata_label, len: usize) -> Result<Labels, FfiError> {
    let mut labels = Labels::new();
    if len == 0 {
        return Ok(labels);
    }
    if p.is_null() {
        return Err(FfiError::Null("labels"));
    }
    // SAFETY: the caller passes `len` labels.
    for l in unsafe { std::slice::from_raw_parts(p, len) } {
        // SAFETY: each has NUL-terminated strings.
        let (k, v) = unsafe {
            (
                req_str(l.key, "label key")?,
                req_str(l.value, "label value")?,
            )
        };
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// A leaked boxed slice as (pointer, length); NULL for an empty one.
fn leak<T>(v: Vec<T>) -> (*const T, usize) {
    if v.is_empty() {
        return (std::ptr::null(), 0);
    }
    let len = v.len();
    (
        Box::into_raw(v.into_boxed_slice()).cast::<T>().cast_const(),
        len,
    )
}

/// Takes back a slice made by [`leak`].
///
/// # Safety
///
/// `(p, len)` came from [`leak`] and was not taken back before.
unsafe fn unleak<T>(p: *const T, len: usize) -> Vec<T> {
    if p.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller's contract: a leaked boxed slice of `len` items.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p.cast_mut(), len)) }.into_vec()
}

/// Builds the C mounts of `mounts` (each field owned).
pub(crate) fn mounts_out(mounts: &[Mount]) -> Result<*mut strata_mount_list, FfiError> {
    let mut out = Vec::with_capacity(mounts.len());
    let built = (|| {
        for m in mounts {
            let mut c = strata_mount_entry {
                fs_type: c_string(&m.fs_type, "mount type")?,
                source: std::ptr::null(),
                options: std::ptr::null(),
                options_len: 0,
            };
            // Pushed before the other fields are filled, so that a failure frees them too.
            c.source = match c_string(&m.source, "mount source") {
                Ok(s) => s,
                Err(e) => {
                    out.push(c);
                    return Err(e);
                }
            };
            let mut opts = Vec::with_capacity(m.options.len());
            let mut failed = None;
            for o in &m.options {
                match c_string(o, "mount option") {
                    Ok(s) => opts.push(s),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            (c.options, c.options_len) = leak(opts);
            out.push(c);
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    })();
    let (mounts, len) = leak(out);
    let result = Box::into_raw(Box::new(strata_mount_list { mounts, len }));
    match built {
        Ok(()) => Ok(result),
        Err(e) => {
            // SAFETY: just built.
            unsafe { free_mounts(result) };
            Err(e)
        }
    }
}

/// strata's mounts of C mounts strata built.
///
/// # Safety
///
/// `m` was returned by strata (its arrays are valid).
pub(crate) unsafe fn mounts_in(m: &strata_mount_list) -> Result<Vec<Mount>, FfiError> {
    if m.len > 0 && m.mounts.is_null() {
        return Err(FfiError::Null("mounts->mounts"));
    }
    let items = if m.len == 0 {
        &[][..]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(m.mounts, m.len) }
    };
    items
        .iter()
        .map(|c| {
            // SAFETY: the caller's contract: valid strings and option arrays.
            unsafe {
                Ok(Mount {
                    fs_type: req_str(c.fs_type, "mount type")?.to_string(),
                    source: req_str(c.source, "mount source")?.to_string(),
                    options: str_list(c.options, c.options_len, "mount options")?
                        .into_iter()
                        .map(String::from)
                        .collect(),
                })
            }
        })
        .collect()
}

/// Frees mounts built by [`mounts_out`].
///
/// # Safety
///
/// `p` is NULL or came from [`mounts_out`] and was not freed before.
pub(crate) unsafe fn free_mounts(p: *mut strata_mount_list) {
    if p.is_null() {
        return;
    }
    // SAFETY: the caller's contract.
    let b = unsafe { Box::from_raw(p) };
    // SAFETY: the array came from `leak`.
    for mut m in unsafe { unleak(b.mounts, b.len) } {
        free_c_string(&mut m.fs_type);
        free_c_string(&mut m.source);
        // SAFETY: the options came from `leak`.
        for mut o in unsafe { unleak(m.options, m.options_len) } {
            free_c_string(&mut o);
        }
    }
}

fn unix_nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// The C info of `info` (fields owned; free with [`free_info_fields`]).
pub(crate) fn info_out(info: &Info) -> Result<strata_info, FfiError> {
    let mut c = strata_info {
        kind: match info.kind {
            Kind::View => STRATA_KIND_VIEW,
            Kind::Active => STRATA_KIND_ACTIVE,
            Kind::Committed => STRATA_KIND_COMMITTED,
        },
        name: std::ptr::null(),
        parent: std::ptr::null(),
        labels: std::ptr::null(),
        labels_len: 0,
        created_unix_nanos: unix_nanos(info.created),
        updated_unix_nanos: unix_nanos(info.updated),
    };
    let filled = (|| {
        c.name = c_string(&info.name, "name")?;
        if let Some(p) = &info.parent {
            c.parent = c_string(p, "parent")?;
        }
        let mut labels = Vec::with_capacity(info.labels.len());
        let mut failed = None;
        for (k, v) in &info.labels {
            let key = match c_string(k, "label key") {
                Ok(k) => k,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let mut l = strata_label {
                key,
                value: std::ptr::null(),
            };
            match c_string(v, "label value") {
                Ok(v) => l.value = v,
                Err(e) => failed = Some(e),
            }
            labels.push(l);
            if failed.is_some() {
                break;
            }
        }
        (c.labels, c.labels_len) = leak(labels);
        failed.map_or(Ok(()), Err)
    })();
    match filled {
        Ok(()) => Ok(c),
        Err(e) => {
            free_info_fields(&mut c);
            Err(e)
        }
    }
}

/// Frees the fields of an info built by [`info_out`] (not the struct itself).
pub(crate) fn free_info_fields(c: &mut strata_info) {
    free_c_string(&mut c.name);
    free_c_string(&mut c.parent);
    // SAFETY: the labels came from `leak` in `info_out`.
    for mut l in unsafe { unleak(c.labels, c.labels_len) } {
        free_c_string(&mut l.key);
        free_c_string(&mut l.value);
    }
    c.labels = std::ptr::null();
    c.labels_len = 0;
}

/// The C descriptor of `d` (fields owned; free with [`free_descriptor_fields`]).
pub(crate) fn descriptor_out(d: &Descriptor) -> Result<strata_descriptor, FfiError> {
    let mut c = strata_descriptor {
        media_type: std::ptr::null(),
        digest: std::ptr::null(),
        size: d.size,
        diff_id: std::ptr::null(),
    };
    let filled = (|| {
        c.media_type = c_string(&d.media_type, "media type")?;
        c.digest = c_string(d.digest.as_str(), "digest")?;
        c.diff_id = c_string(d.diff_id.as_str(), "diffID")?;
        Ok(())
    })();
    match filled {
        Ok(()) => Ok(c),
        Err(e) => {
            free_descriptor_fields(&mut c);
            Err(e)
        }
    }
}

/// Frees the fields of a descriptor built by [`descriptor_out`].
pub(crate) fn free_descriptor_fields(c: &mut strata_descriptor) {
    free_c_string(&mut c.media_type);
    free_c_string(&mut c.digest);
    free_c_string(&mut c.diff_id);
}

/// The C form of what an apply did.
pub(crate) fn applied_out(a: &Applied) -> Result<strata_applied, FfiError> {
    let mut descriptor = descriptor_out(&a.descriptor)?;
    match c_string(a.content.as_str(), "content checksum") {
        Ok(content) => Ok(strata_applied {
            descriptor,
            content,
            entries: a.entries,
            tar_size: a.tar_size,
        }),
        Err(e) => {
            free_descriptor_fields(&mut descriptor);
            Err(e)
        }
    }
}

/// The C form of an applied layer.
pub(crate) fn layer_out(l: &AppliedLayer) -> Result<strata_layer, FfiError> {
    let mut c = strata_layer {
        name: std::ptr::null(),
        diff_id: std::ptr::null(),
        content: std::ptr::null(),
        cached: l.cached,
    };
    let filled = (|| {
        c.name = c_string(&l.name, "layer name")?;
        c.diff_id = c_string(l.diff_id.as_str(), "diffID")?;
        c.content = c_string(&l.content, "content checksum")?;
        Ok(())
    })();
    match filled {
        Ok(()) => Ok(c),
        Err(e) => {
            free_layer_fields(&mut c);
            Err(e)
        }
    }
}

/// Frees the fields of a layer built by [`layer_out`].
pub(crate) fn free_layer_fields(c: &mut strata_layer) {
    free_c_string(&mut c.name);
    free_c_string(&mut c.diff_id);
    free_c_string(&mut c.content);
}

/// Takes back a struct strata returned (a leaked `Box`) and frees its fields with `fields`;
/// NULL is a no-op.
///
/// # Safety
///
/// `p` is NULL or a `Box` strata leaked, not taken back before.
pub(crate) unsafe fn free_boxed<T>(p: *mut T, fields: impl FnOnce(&mut T)) {
    if p.is_null() {
        return;
    }
    // SAFETY: the caller's contract.
    let mut b = unsafe { Box::from_raw(p) };
    fields(&mut b);
}
