//! Every backend built into this strata behind one type.
//!
//! [`open`] opens the store at a root with the backend it records (or the one asked for) and
//! returns it as a [`strata::AnyStore`]; programs that pick the backend at run time (the C
//! ABI) use it instead of naming a backend type. The btrfs and devmapper backends are here
//! when the cargo features of those names are on.

use std::path::Path;

use strata::{AnyStore, Error, Result, Store, StoreOptions};
use strata_native::NativeBackend;
use strata_overlay::{OverlayBackend, OverlayOptions};

/// The backends built in, by name; `overlay` is the default of a new root.
pub const BACKENDS: &[&str] = &[
    "overlay",
    "native",
    #[cfg(feature = "btrfs")]
    "btrfs",
    #[cfg(feature = "devmapper")]
    "devmapper",
];

/// Opens (creating when new) the store at `root` with `backend`, or the backend the root
/// records when `None` (overlay for a new root).
///
/// A backend other than the recorded one, or one not built in, is an
/// [`ErrorKind::InvalidArgument`](strata::ErrorKind::InvalidArgument) error that says which
/// are.
pub fn open(
    root: &Path,
    backend: Option<&str>,
    opts: StoreOptions,
) -> Result<Box<dyn AnyStore + Send + Sync>> {
    let name = resolve(root, backend)?;
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, "create the store root", e))?;
    match name.as_str() {
        "native" => {
            let b =
                NativeBackend::open(root).map_err(|e| Error::backend("", "open", "native", e))?;
            Ok(Box::new(Store::open(root, b, opts)?))
        }
        "overlay" => {
            let b = OverlayBackend::open(root, OverlayOptions::default())
                .map_err(|e| Error::backend("", "open", "overlay", e))?;
            Ok(Box::new(Store::open(root, b, opts)?))
        }
        #[cfg(feature = "btrfs")]
        "btrfs" => {
            let b = strata_btrfs::BtrfsBackend::open(root)
                .map_err(|e| Error::backend("", "open", "btrfs", e))?;
            Ok(Box::new(Store::open(root, b, opts)?))
        }
        #[cfg(feature = "devmapper")]
        "devmapper" => {
            let b = strata_devmapper::DevmapperBackend::open(root)
                .map_err(|e| Error::backend("", "open", "devmapper", e))?;
            Ok(Box::new(Store::open(root, b, opts)?))
        }
        other => Err(Error::invalid(
            format!("backend {other:?}"),
            format!("this strata was built with {}", BACKENDS.join(", ")),
        )),
    }
}

/// The backend to open `root` with: the one asked for, which must match the recorded one,
/// else the recorded one, else overlay.
pub fn resolve(root: &Path, backend: Option<&str>) -> Result<String> {
    let recorded = Store::<NativeBackend>::recorded_backend(root)?;
    match (backend, recorded) {
        (Some(asked), Some(rec)) if asked != rec => Err(Error::invalid(
            format!("backend {asked:?}"),
            format!(
                "the store at {} uses the {rec} backend; ask for no backend or pick another root",
                root.display()
            ),
        )),
        (Some(asked), _) => Ok(asked.to_string()),
        (None, Some(rec)) => Ok(rec),
        (None, None) => Ok("overlay".to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use strata::{ErrorKind, Labels};

    #[test]
    fn a_root_keeps_its_backend_and_unknown_ones_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let s = open(&root, Some("native"), StoreOptions::default()).unwrap();
        assert_eq!(s.backend_name(), "native");
        s.prepare("k", None, Labels::new()).unwrap();
        drop(s);
        let s = open(&root, None, StoreOptions::default()).unwrap();
        assert_eq!(s.backend_name(), "native");
        assert!(s.stat("k").is_ok());
        drop(s);

        let e = open(&root, Some("overlay"), StoreOptions::default())
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("uses the native backend"), "{e}");
        let e = open(&tmp.path().join("r2"), Some("zfs"), StoreOptions::default())
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(
            e.to_string().contains("\"zfs\"") && e.to_string().contains("native"),
            "{e}"
        );
    }
}
