//! The store.
/// Store
pub struct Store;
/// Options
pub struct StoreOptions;
