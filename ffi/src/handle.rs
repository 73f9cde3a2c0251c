//! Store handles: opaque pointers, checked against the set of open ones on every call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use core_strata::AnyStore;

use crate::error::FfiError;

/// An open store (opaque to C: `strata_store *`). Its address is the handle; the store
/// itself lives in the set of open handles.
pub struct strata_store {
    _unique: u8,
}

/// The open handles by address. A call clones the store's `Arc` under the lock, so closing
/// a handle while other threads use it lets their calls finish on the store first.
static OPEN: Mutex<Option<HashMap<usize, Arc<dyn AnyStore + Send + Sync>>>> = Mutex::new(None);

/// Makes a handle for `store`.
pub(crate) fn register(store: Box<dyn AnyStore + Send + Sync>) -> *mut strata_store {
    let store: Arc<dyn AnyStore + Send + Sync> = Arc::from(store);
    let handle = Box::into_raw(Box::new(strata_store { _unique: 0 }));
    OPEN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(handle as usize, store);
    handle
}

/// The store of an open handle.
pub(crate) fn get(handle: *mut strata_store) -> Result<Arc<dyn AnyStore + Send + Sync>, FfiError> {
    if handle.is_null() {
        return Err(FfiError::Null("store"));
    }
    OPEN.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|m| m.get(&(handle as usize)))
        .cloned()
        .ok_or(FfiError::Closed(handle as usize))
}

/// Closes an open handle.
pub(crate) fn close(handle: *mut strata_store) -> Result<(), FfiError> {
    if handle.is_null() {
        return Err(FfiError::Null("store"));
    }
    let removed = OPEN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
        .and_then(|m| m.remove(&(handle as usize)));
    match removed {
        None => Err(FfiError::Closed(handle as usize)),
        Some(store) => {
            // SAFETY: the address was in the open set, so it is the Box `register` leaked,
            // not freed since (removal from the set happens once, under the lock).
            let boxed = unsafe { Box::from_raw(handle) };
            drop(boxed);
            // Other threads' calls hold their own clones; the last one closes the store.
            drop(store);
            Ok(())
        }
    }
}
