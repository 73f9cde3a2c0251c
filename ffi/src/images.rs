//! Images, leases, gc, fsck, verify, export, import, copy and checksum. Their reports come
//! back as JSON documents (`char *`, freed with [`strata_free_string`]), in the shapes
//! `strata --json` prints (`strata::report`).

use std::ffi::{c_char, c_int};
use std::path::Path;
use std::time::Duration;

use core_strata::copy::CopyOptions;
use core_strata::{report, ExportOptions};

use crate::error::{call, FfiError};
use crate::handle;
use crate::types::{c_string, free_c_string, opt_str, req_str, str_list};

/// Writes `doc` as a JSON string to `*out` when `out` is not NULL.
fn json_out(doc: &serde_json::Value, out: *mut *mut c_char) -> Result<(), FfiError> {
    if out.is_null() {
        return Ok(());
    }
    let s = c_string(&doc.to_string(), "report")?;
    // SAFETY: non-NULL `out` points to writable storage (the callers' contracts).
    unsafe { *out = s.cast_mut() };
    Ok(())
}

/// Frees a string strata returned (a JSON report, a checksum; NULL is fine).
///
/// # Safety
///
/// `s` is NULL or a string strata returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn strata_free_string(s: *mut c_char) {
    let mut p = s.cast_const();
    free_c_string(&mut p);
}

/// Names image `name` after committed snapshot `snapshot`: the image holds its whole chain
/// against gc, and exports as one OCI image.
///
/// # Safety
///
/// `name` and `snapshot` are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn strata_tag(
    store: *mut crate::strata_store,
    name: *const c_char,
    snapshot: *const c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes valid strings.
        let (name, snapshot) = unsafe { (req_str(name, "name")?, req_str(snapshot, "snapshot")?) };
        s.tag(name, snapshot)?;
        Ok(())
    })
}

/// Removes image name `name` (its layers stay until gc).
///
/// # Safety
///
/// `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_untag(
    store: *mut crate::strata_store,
    name: *const c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes a valid string.
        s.untag(unsafe { req_str(name, "name") }?)?;
        Ok(())
    })
}

/// The images, as a JSON array of `{"image", "snapshot"}` in `*out`.
///
/// # Safety
///
/// `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_images(
    store: *mut crate::strata_store,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        crate::types::out_ptr(out, "out")?;
        json_out(&report::images(&s.images()?), out)
    })
}

/// Creates lease `name`, which holds what is added to it until it expires `ttl_ms`
/// milliseconds from now (never when `ttl_ms` is 0 or less) or is removed.
///
/// # Safety
///
/// `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_lease_create(
    store: *mut crate::strata_store,
    name: *const c_char,
    ttl_ms: i64,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes a valid string.
        let name = unsafe { req_str(name, "name") }?;
        let ttl = u64::try_from(ttl_ms)
            .ok()
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        s.lease_create(name, ttl)?;
        Ok(())
    })
}

/// Lease `name` holds the `keys_len` snapshots `keys` too (each with its chain).
///
/// # Safety
///
/// `name` is a NUL-terminated string; `keys` points to `keys_len` of them.
#[no_mangle]
pub unsafe extern "C" fn strata_lease_add(
    store: *mut crate::strata_store,
    name: *const c_char,
    keys: *const *const c_char,
    keys_len: usize,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes valid strings.
        let (name, keys) = unsafe { (req_str(name, "name")?, str_list(keys, keys_len, "keys")?) };
        s.lease_add(name, &keys)?;
        Ok(())
    })
}

/// Removes lease `name` (what it held stays until gc).
///
/// # Safety
///
/// `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strata_lease_remove(
    store: *mut crate::strata_store,
    name: *const c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes a valid string.
        s.lease_remove(unsafe { req_str(name, "name") }?)?;
        Ok(())
    })
}

/// The leases, as a JSON array of `{"name", "expires" (RFC 3339 or null), "snapshots"}` in
/// `*out`.
///
/// # Safety
///
/// `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_leases(
    store: *mut crate::strata_store,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        crate::types::out_ptr(out, "out")?;
        json_out(&report::leases(&s.leases()?), out)
    })
}

/// Removes every snapshot no image, lease or gc-root label holds (with `dry_run`, only says
/// which), and reclaims their storage; the report (JSON: `removed`, `kept`,
/// `expired_leases`, `reclaimed`, `failed`, ...) in `*out` when `out` is not NULL.
///
/// # Safety
///
/// `out` is NULL or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_gc(
    store: *mut crate::strata_store,
    dry_run: bool,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        json_out(&report::gc(&s.gc(dry_run)?, dry_run), out)
    })
}

/// Checks the store (with `repair`, repairs what it can); the report (JSON: `clean`,
/// `orphans`, `broken`, `interrupted`, `leaked_mounts`, `repaired`, ...) in `*out` when
/// `out` is not NULL. An unclean store is not an error: read `clean`.
///
/// # Safety
///
/// `out` is NULL or points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_fsck(
    store: *mut crate::strata_store,
    repair: bool,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        json_out(&report::fsck(&s.fsck(repair)?), out)
    })
}

/// Checks the stored layers `names` (all when `names_len` is 0) against their recorded
/// content checksums; damaged ones are marked broken. The report (JSON: `verified`,
/// `recorded`, `damaged`) in `*out` when `out` is not NULL.
///
/// # Safety
///
/// `names` points to `names_len` NUL-terminated strings; `out` is NULL or points to writable
/// storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_verify(
    store: *mut crate::strata_store,
    names: *const *const c_char,
    names_len: usize,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes valid strings.
        let names = unsafe { str_list(names, names_len, "names") }?;
        json_out(&report::verify(&s.verify(&names)?), out)
    })
}

/// Writes the `images_len` images `images` as an OCI image layout at `dest` (a directory),
/// or an OCI archive when `dest` ends in `.tar`, diffing layers with `compression`
/// (`STRATA_COMPRESSION_*`) and, with `verify`, checking every layer first. Nothing is
/// written unless every layer is there, committed and intact. The report (JSON: `images`
/// with their manifest digests, `blobs`, `diffed`) in `*out` when `out` is not NULL.
///
/// # Safety
///
/// `images` points to `images_len` NUL-terminated strings; `dest` is one; `out` is NULL or
/// points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_export(
    store: *mut crate::strata_store,
    images: *const *const c_char,
    images_len: usize,
    dest: *const c_char,
    compression: c_int,
    verify: bool,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes valid strings.
        let (images, dest) = unsafe {
            (
                str_list(images, images_len, "images")?,
                req_str(dest, "dest")?,
            )
        };
        let opts = ExportOptions {
            compression: crate::compression(compression)?,
            verify,
        };
        let dest = Path::new(dest);
        json_out(&report::export(&s.export(&images, dest, &opts)?, dest), out)
    })
}

/// Reads the OCI image layout or archive at `src` (tagging its images; with `ref_name`, only
/// that one); the report (JSON: `images` with their snapshots, `applied`, `cached`) in
/// `*out` when `out` is not NULL.
///
/// # Safety
///
/// `src` is a NUL-terminated string, `ref_name` NULL or one; `out` is NULL or points to
/// writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_import(
    store: *mut crate::strata_store,
    src: *const c_char,
    ref_name: *const c_char,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes valid strings.
        let (src, ref_name) = unsafe { (req_str(src, "src")?, opt_str(ref_name, "ref_name")?) };
        json_out(&report::import(&s.import(Path::new(src), ref_name)?), out)
    })
}

/// Options of `strata_copy` (all zero: none).
#[repr(C)]
#[derive(Debug)]
pub struct strata_copy_options {
    /// `.dockerignore`-style patterns of paths to leave out, relative to the source root.
    pub excludes: *const *const c_char,
    /// How many.
    pub excludes_len: usize,
    /// Keep each source's path below the destination (`COPY --parents`).
    pub parents: bool,
    /// Give everything copied this owner (`COPY --chown`).
    pub chown: bool,
    /// The owner's uid when `chown`.
    pub uid: u32,
    /// The owner's gid when `chown`.
    pub gid: u32,
}

/// Copies the `sources_len` paths `sources` of committed snapshot or image `from` into
/// active snapshot `key` at `dest`, the way `COPY --from` does (symlinks below the named
/// paths are never followed); `opts` may be NULL. What was copied (JSON: `files`, `dirs`,
/// `symlinks`, `hardlinks`, `others`, `bytes`) in `*out` when `out` is not NULL.
///
/// # Safety
///
/// `from`, `key` and `dest` are NUL-terminated strings; `sources` points to `sources_len` of
/// them; `opts` is NULL or valid (its `excludes` array too); `out` is NULL or points to
/// writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_copy(
    store: *mut crate::strata_store,
    from: *const c_char,
    sources: *const *const c_char,
    sources_len: usize,
    key: *const c_char,
    dest: *const c_char,
    opts: *const strata_copy_options,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        // SAFETY: the caller passes valid strings and options.
        let (from, sources, key, dest, opts) = unsafe {
            (
                req_str(from, "from")?,
                str_list(sources, sources_len, "sources")?,
                req_str(key, "key")?,
                req_str(dest, "dest")?,
                opts.as_ref(),
            )
        };
        let mut copy_opts = CopyOptions::default();
        if let Some(o) = opts {
            // SAFETY: the caller passes a valid excludes array.
            copy_opts.excludes = unsafe { str_list(o.excludes, o.excludes_len, "excludes") }?
                .into_iter()
                .map(String::from)
                .collect();
            copy_opts.parents = o.parents;
            copy_opts.chown = o.chown.then_some((o.uid, o.gid));
        }
        let stats = s.copy(from, &sources, key, dest, &copy_opts)?;
        json_out(&report::copy(&stats, key), out)
    })
}

/// The cache-key checksum (`sha256:...`, in `*out`; free with [`strata_free_string`]) of
/// the `paths_len` paths `paths` (all of it when 0) of committed snapshot or image `name`,
/// leaving out the `excludes_len` patterns `excludes`: content, modes, owners, xattrs and
/// symlink targets, no times; the same tree gives the same checksum on every backend.
///
/// # Safety
///
/// `name` is a NUL-terminated string; `paths` and `excludes` point to that many of them;
/// `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn strata_checksum(
    store: *mut crate::strata_store,
    name: *const c_char,
    paths: *const *const c_char,
    paths_len: usize,
    excludes: *const *const c_char,
    excludes_len: usize,
    out: *mut *mut c_char,
) -> c_int {
    call(|| {
        let s = handle::get(store)?;
        let out = crate::types::out_ptr(out, "out")?;
        // SAFETY: the caller passes valid strings.
        let (name, paths, excludes) = unsafe {
            (
                req_str(name, "name")?,
                str_list(paths, paths_len, "paths")?,
                str_list(excludes, excludes_len, "excludes")?,
            )
        };
        let excludes: Vec<String> = excludes.into_iter().map(String::from).collect();
        let d = s.checksum(name, &paths, &excludes)?;
        let c = c_string(d.as_str(), "checksum")?;
        // SAFETY: `out` was checked non-NULL.
        unsafe { *out = c.cast_mut() };
        Ok(())
    })
}
