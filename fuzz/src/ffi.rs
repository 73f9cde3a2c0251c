//! `ffi`: the bytes are a script of C ABI calls on a native store opened in a temporary
//! directory: prepare, view, commit, stat, update, remove, walk, usage, mounts, cleanup, gc,
//! close and reopen, with keys, parents, labels, field paths and filters picked by the bytes
//! among good ones, taken ones, empty ones, NULLs and strings that are not UTF-8. Checked:
//! every call returns a status code strata defines; a failure leaves a non-empty message in
//! `strata_last_error`; a closed handle is refused with `STRATA_E_CLOSED`; gc removes only
//! committed snapshots, none in a dry run; what `stat` says agrees with what the calls did;
//! and the store is fsck-clean after a cleanup at the end.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;

use strata_ffi_abi as abi;

// The C ABI's report functions live in a private module of the crate: they are reached by
// their exported symbols, as C reaches them.
extern "C" {
    // `store` is a `strata_store *`, opaque on this side as in C.
    fn strata_gc(store: *mut c_void, dry_run: bool, out: *mut *mut c_char) -> c_int;
    fn strata_fsck(store: *mut c_void, repair: bool, out: *mut *mut c_char) -> c_int;
    fn strata_free_string(s: *mut c_char);
}

/// Keys and names the script picks from (`None` is NULL). The last one is not UTF-8.
const KEYS: &[Option<&[u8]>] = &[
    Some(b"a"),
    Some(b"b"),
    Some(b"c"),
    Some(b"layer/1"),
    Some(b""),
    None,
    Some(b"a\xff"),
];

const LABELS: &[(&[u8], &[u8])] = &[
    (b"k", b"v"),
    (b"containerd.io/gc.root", b"1"),
    (b"k", b""),
    (b"", b"v"),
    (b"a.b/c", b"x,y"),
    (b"\xfe", b"v"),
];

const PATHS: &[Option<&[u8]>] = &[
    Some(b"labels"),
    Some(b"labels.k"),
    Some(b"labels.a.b/c"),
    Some(b"name"),
    Some(b""),
    None,
];

const FILTERS: &[Option<&[u8]>] = &[
    Some(b""),
    Some(b"kind==committed"),
    Some(b"labels.k"),
    Some(b"parent!=\"\""),
    Some(b"name~=a"),
    Some(b"labels.\"a.b/c\"==\"x,y\""),
    Some(b"kind==nope"),
    Some(b"\xff"),
    None,
];

/// What the script has made, by key: the kind strata reports, or `None` once removed.
type Model = BTreeMap<Vec<u8>, c_int>;

/// Reads bytes for the script's arguments; zero once the input ends.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[usize::from(self.next()) % from.len()]
    }
}

fn cstr(b: Option<&[u8]>) -> Option<CString> {
    b.map(|b| CString::new(b).unwrap())
}

fn ptr_of(c: &Option<CString>) -> *const c_char {
    c.as_ref().map_or(ptr::null(), |c| c.as_ptr())
}

fn last_error() -> String {
    // SAFETY: strata_last_error returns a valid NUL-terminated string that lives until the
    // next failing call on this thread.
    unsafe { CStr::from_ptr(abi::strata_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Checks a status code; returns it.
fn check(call: &str, rc: c_int) -> c_int {
    assert!(
        (abi::STRATA_OK..=abi::STRATA_E_INTERNAL).contains(&rc),
        "{call} returned {rc}, not a strata status code"
    );
    assert_ne!(
        rc,
        abi::STRATA_E_INTERNAL,
        "{call}: internal error: {}",
        last_error()
    );
    if rc != abi::STRATA_OK {
        let msg = last_error();
        assert!(!msg.is_empty(), "{call} failed ({rc}) without a message");
    }
    rc
}

unsafe extern "C" fn count(_info: *const abi::strata_info, user: *mut c_void) -> c_int {
    // SAFETY: `user` is the `&mut u32` the script passed to strata_walk.
    let n = unsafe { &mut *user.cast::<u32>() };
    *n += 1;
    c_int::from(*n >= 3)
}

fn open(root: &CStr) -> *mut abi::strata_store {
    let opts = abi::strata_open_options {
        flags: abi::STRATA_OPEN_NO_SYNC,
        lock_timeout_ms: 0,
    };
    let mut s = ptr::null_mut();
    // SAFETY: valid strings, options and output pointer.
    let rc = unsafe { abi::strata_open(root.as_ptr(), c"native".as_ptr(), &opts, &mut s) };
    assert_eq!(check("open", rc), abi::STRATA_OK, "{}", last_error());
    s
}

/// The kind stat reports for `key`, or the status code of its failure.
fn stat_kind(s: *mut abi::strata_store, key: &CStr) -> Result<c_int, c_int> {
    let mut info: *mut abi::strata_info = ptr::null_mut();
    // SAFETY: valid handle value, string and output pointer.
    let rc = check("stat", unsafe {
        abi::strata_stat(s, key.as_ptr(), &mut info)
    });
    if rc != abi::STRATA_OK {
        return Err(rc);
    }
    // SAFETY: strata_stat succeeded: `info` points to a valid strata_info.
    let kind = unsafe { (*info).kind };
    // SAFETY: `info` came from strata_stat and is freed once.
    unsafe { abi::strata_free_info(info) };
    Ok(kind)
}

/// The key when strata may take it: not NULL, not empty, UTF-8.
fn valid(k: Option<&[u8]>) -> Option<&[u8]> {
    k.filter(|k| !k.is_empty() && std::str::from_utf8(k).is_ok())
}

/// The target: see the module docs.
pub fn ffi(data: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    let root = CString::new(
        tmp.path()
            .join("store")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    let mut s = open(&root);
    let mut model = Model::new();
    let mut b = Bytes(data);
    let mut steps = 0;
    while !b.0.is_empty() && steps < 64 {
        steps += 1;
        let op = b.next();
        let key_b = b.pick(KEYS);
        let key = cstr(key_b);
        let other_b = b.pick(KEYS);
        let other = cstr(other_b);
        let nlabels = usize::from(b.next() % 3);
        let label_strs: Vec<(CString, CString)> = (0..nlabels)
            .map(|_| {
                let (k, v) = b.pick(LABELS);
                (CString::new(k).unwrap(), CString::new(v).unwrap())
            })
            .collect();
        let labels: Vec<abi::strata_label> = label_strs
            .iter()
            .map(|(k, v)| abi::strata_label {
                key: k.as_ptr(),
                value: v.as_ptr(),
            })
            .collect();
        let lp = if labels.is_empty() {
            ptr::null()
        } else {
            labels.as_ptr()
        };
        match op % 13 {
            0 | 1 => {
                let view = op % 13 == 1;
                let parent = if b.next() % 2 == 0 {
                    None
                } else {
                    other.clone()
                };
                let mut m: *mut abi::strata_mount_list = ptr::null_mut();
                let out = if b.next() % 2 == 0 {
                    &mut m as *mut _
                } else {
                    ptr::null_mut()
                };
                // SAFETY: valid (or NULL) strings, a label array of `nlabels`, an output
                // pointer or NULL.
                let rc = unsafe {
                    if view {
                        abi::strata_view(s, ptr_of(&key), ptr_of(&parent), lp, labels.len(), out)
                    } else {
                        abi::strata_prepare(s, ptr_of(&key), ptr_of(&parent), lp, labels.len(), out)
                    }
                };
                check("prepare/view", rc);
                if rc == abi::STRATA_OK {
                    let k =
                        valid(key_b).expect("prepare took a key that is NULL, empty or not UTF-8");
                    model.insert(
                        k.to_vec(),
                        if view {
                            abi::STRATA_KIND_VIEW
                        } else {
                            abi::STRATA_KIND_ACTIVE
                        },
                    );
                }
                // SAFETY: `m` is NULL or came from the call; freed once.
                unsafe { abi::strata_free_mounts(m) };
            }
            2 => {
                // SAFETY: valid (or NULL) strings and label array.
                let rc = check("commit", unsafe {
                    abi::strata_commit(s, ptr_of(&other), ptr_of(&key), lp, labels.len())
                });
                if rc == abi::STRATA_OK {
                    let k = valid(key_b).expect("commit of an invalid key");
                    let n = valid(other_b).expect("commit to an invalid name");
                    assert_eq!(
                        model.remove(k),
                        Some(abi::STRATA_KIND_ACTIVE),
                        "commit of a non-active"
                    );
                    model.insert(n.to_vec(), abi::STRATA_KIND_COMMITTED);
                }
            }
            3 => {
                // SAFETY: valid (or NULL) string.
                let rc = check("remove", unsafe { abi::strata_remove(s, ptr_of(&key)) });
                if rc == abi::STRATA_OK {
                    let k = valid(key_b).expect("remove of an invalid key");
                    assert!(
                        model.remove(k).is_some(),
                        "removed a key the script never made"
                    );
                }
            }
            4 => {
                let npaths = usize::from(b.next() % 3);
                let path_strs: Vec<Option<CString>> =
                    (0..npaths).map(|_| cstr(b.pick(PATHS))).collect();
                let paths: Vec<*const c_char> = path_strs.iter().map(ptr_of).collect();
                let pp = if paths.is_empty() {
                    ptr::null()
                } else {
                    paths.as_ptr()
                };
                let mut info: *mut abi::strata_info = ptr::null_mut();
                // SAFETY: valid (or NULL) strings and arrays of the lengths given.
                let rc = check("update", unsafe {
                    abi::strata_update(
                        s,
                        ptr_of(&key),
                        lp,
                        labels.len(),
                        pp,
                        paths.len(),
                        &mut info,
                    )
                });
                if rc == abi::STRATA_OK {
                    // SAFETY: from a successful update.
                    let kind = unsafe { (*info).kind };
                    let k = valid(key_b).expect("update of an invalid key");
                    assert_eq!(model.get(k), Some(&kind), "update reports another kind");
                }
                // SAFETY: NULL or from the call; freed once.
                unsafe { abi::strata_free_info(info) };
            }
            5 => {
                let nf = usize::from(b.next() % 3);
                let f_strs: Vec<Option<CString>> = (0..nf).map(|_| cstr(b.pick(FILTERS))).collect();
                let fs: Vec<*const c_char> = f_strs.iter().map(ptr_of).collect();
                let fp = if fs.is_empty() {
                    ptr::null()
                } else {
                    fs.as_ptr()
                };
                let mut n = 0u32;
                // SAFETY: an array of `nf` strings (or NULLs); `count` reads `n`.
                let rc = unsafe {
                    abi::strata_walk(s, fp, fs.len(), Some(count), (&mut n as *mut u32).cast())
                };
                check("walk", rc);
                if nf == 0 && rc == abi::STRATA_OK {
                    assert_eq!(n as usize, model.len().min(3), "walk of everything");
                }
            }
            6 => {
                let mut u = abi::strata_disk_usage::default();
                // SAFETY: valid (or NULL) string and output.
                check("usage", unsafe {
                    abi::strata_usage(s, ptr_of(&key), &mut u)
                });
            }
            7 => {
                let mut m: *mut abi::strata_mount_list = ptr::null_mut();
                // SAFETY: valid (or NULL) string and output.
                let rc = check("mounts", unsafe {
                    abi::strata_mounts(s, ptr_of(&key), &mut m)
                });
                if rc == abi::STRATA_OK {
                    let k = valid(key_b).expect("mounts of an invalid key");
                    assert_ne!(model.get(k), Some(&abi::STRATA_KIND_COMMITTED));
                }
                // SAFETY: NULL or from the call.
                unsafe { abi::strata_free_mounts(m) };
            }
            8 => {
                // SAFETY: a handle value.
                check("cleanup", unsafe { abi::strata_cleanup(s) });
            }
            9 => {
                let mut out: *mut c_char = ptr::null_mut();
                let dry_run = b.next() % 2 == 0;
                // SAFETY: a handle value and an output pointer.
                let rc = check("gc", unsafe { strata_gc(s.cast(), dry_run, &mut out) });
                if rc == abi::STRATA_OK {
                    // SAFETY: a string strata returned.
                    let text = unsafe { CStr::from_ptr(out) }
                        .to_string_lossy()
                        .into_owned();
                    serde_json::from_str::<serde_json::Value>(&text)
                        .unwrap_or_else(|e| panic!("gc report {text:?}: {e}"));
                    // gc removes the committed snapshots nothing holds (no image, lease, child,
                    // Active or View on them); never an Active or View, never in a dry run.
                    let keys: Vec<(Vec<u8>, c_int)> =
                        model.iter().map(|(k, v)| (k.clone(), *v)).collect();
                    for (k, kind) in keys {
                        let c = CString::new(k.clone()).unwrap();
                        if stat_kind(s, &c).is_err() {
                            assert!(
                                !dry_run && kind == abi::STRATA_KIND_COMMITTED,
                                "gc (dry run: {dry_run}) removed {c:?} of kind {kind}"
                            );
                            model.remove(&k);
                        }
                    }
                }
                // SAFETY: NULL or from the call.
                unsafe { strata_free_string(out) };
            }
            10 => {
                // SAFETY: the open handle.
                assert_eq!(
                    check("close", unsafe { abi::strata_close(s) }),
                    abi::STRATA_OK
                );
                // SAFETY: a closed handle is looked up, never dereferenced.
                let again = check("stat after close", unsafe {
                    abi::strata_stat(s, c"a".as_ptr(), &mut ptr::null_mut())
                });
                assert_eq!(
                    again,
                    abi::STRATA_E_CLOSED,
                    "a closed handle was not refused"
                );
                // SAFETY: as above.
                let twice = check("close twice", unsafe { abi::strata_close(s) });
                assert_eq!(twice, abi::STRATA_E_CLOSED);
                s = open(&root);
            }
            11 => {
                let code = c_int::from(b.next() as i8);
                let name = abi::strata_status_name(code);
                assert!(!name.is_null());
                // SAFETY: a static NUL-terminated string.
                let name = unsafe { CStr::from_ptr(name) }.to_str().unwrap();
                assert!(!name.is_empty());
            }
            _ => {
                let mut info: *mut abi::strata_info = ptr::null_mut();
                // SAFETY: valid (or NULL) string; NULL output is refused, not written.
                let out = if b.next() % 4 == 0 {
                    ptr::null_mut()
                } else {
                    &mut info as *mut _
                };
                let rc = check("stat", unsafe { abi::strata_stat(s, ptr_of(&key), out) });
                if out.is_null() {
                    assert_eq!(
                        rc,
                        abi::STRATA_E_INVALID_ARGUMENT,
                        "stat with a NULL output"
                    );
                }
                // SAFETY: NULL or from the call.
                unsafe { abi::strata_free_info(info) };
            }
        }
    }
    // What stat says agrees with the model, for every key the script can name.
    for k in KEYS.iter().flatten() {
        let Ok(c) = CString::new(*k) else { continue };
        let want = model.get(*k).copied();
        match stat_kind(s, &c) {
            Ok(kind) => assert_eq!(Some(kind), want, "stat {c:?}"),
            Err(rc) => assert!(
                want.is_none(),
                "stat {c:?} failed ({rc}) for a snapshot the calls made"
            ),
        }
    }
    for k in model.keys() {
        let c = CString::new(k.clone()).unwrap();
        assert!(stat_kind(s, &c).is_ok(), "{c:?} made by the calls is gone");
    }
    // Removed snapshots keep their storage until a cleanup; then nothing may be left over.
    // SAFETY: the open handle.
    assert_eq!(
        check("cleanup", unsafe { abi::strata_cleanup(s) }),
        abi::STRATA_OK
    );
    let mut report: *mut c_char = ptr::null_mut();
    // SAFETY: the open handle and an output pointer.
    assert_eq!(
        check("fsck", unsafe { strata_fsck(s.cast(), false, &mut report) }),
        abi::STRATA_OK
    );
    // SAFETY: a string strata returned.
    let text = unsafe { CStr::from_ptr(report) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: from strata_fsck; freed once.
    unsafe { strata_free_string(report) };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["clean"],
        serde_json::Value::Bool(true),
        "fsck after the calls: {text}"
    );
    // SAFETY: the open handle.
    assert_eq!(
        check("close", unsafe { abi::strata_close(s) }),
        abi::STRATA_OK
    );
}
