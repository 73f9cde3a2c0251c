//! A loop-backed thin pool a test makes for its store, taken down (devices, pool, loop
//! devices, files) when dropped.

use std::path::{Path, PathBuf};

/// A devmapper store's pool, made for a test.
pub struct DevmapperPool {
    root: PathBuf,
}

impl DevmapperPool {
    /// Makes a small loop-backed pool (1 GiB data, 64 MiB metadata, sparse) with a 256 MiB
    /// ext4 base device for the store at `root`.
    pub fn create(root: &Path) -> DevmapperPool {
        std::fs::create_dir_all(root).unwrap();
        let opts = strata_devmapper::PoolOptions {
            data_size: 1 << 30,
            meta_size: 64 << 20,
            base_size: 256 << 20,
            ..strata_devmapper::PoolOptions::default()
        };
        strata_devmapper::DevmapperBackend::create_pool(root, &opts)
            .unwrap_or_else(|e| panic!("make a thin pool for the test: {e}"));
        DevmapperPool {
            root: root.to_path_buf(),
        }
    }
}

impl Drop for DevmapperPool {
    fn drop(&mut self) {
        if let Err(e) = strata_devmapper::DevmapperBackend::destroy_pool(&self.root) {
            eprintln!("could not take down the test's thin pool: {e}");
        }
    }
}
