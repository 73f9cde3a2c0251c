//! A simulated backend: each snapshot is a directory `sim/<id>` holding its parent list.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use strata::{Backend, BackendError, CreateOptions, Kind, Mount, Store, StoreOptions, Usage};

#[derive(Debug, thiserror::Error)]
#[error("sim: {0}")]
pub struct SimError(pub String);

impl BackendError for SimError {}

/// A backend that keeps each snapshot as a directory `sim/<id>` holding its parent list.
#[derive(Clone)]
pub struct Sim {
    dir: PathBuf,
    /// Ids whose removal fails.
    pub fail_remove: Arc<Mutex<HashSet<u64>>>,
    /// Whether creates fail.
    pub fail_create: Arc<Mutex<bool>>,
    /// The chains of [`Backend::view_mounts`] not released yet.
    pub views: Arc<Mutex<Vec<Vec<u64>>>>,
}

impl Sim {
    /// The directory holding the snapshots.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A backend keeping its snapshots under `root/sim`.
    pub fn new(root: &Path) -> Sim {
        let dir = root.join("sim");
        fs::create_dir_all(&dir).unwrap();
        Sim {
            dir,
            fail_remove: Arc::default(),
            fail_create: Arc::default(),
            views: Arc::default(),
        }
    }
}

impl Backend for Sim {
    type Error = SimError;

    fn name(&self) -> &'static str {
        "sim"
    }

    fn create(&self, id: u64, _: Kind, parents: &[u64], _: &CreateOptions) -> Result<(), SimError> {
        if *self.fail_create.lock().unwrap() {
            return Err(SimError("injected create failure".into()));
        }
        let tmp = self.dir.join(format!(".tmp-{id}"));
        fs::create_dir_all(&tmp).map_err(|e| SimError(e.to_string()))?;
        fs::write(tmp.join("parents"), format!("{parents:?}"))
            .map_err(|e| SimError(e.to_string()))?;
        fs::rename(&tmp, self.dir.join(id.to_string())).map_err(|e| SimError(e.to_string()))
    }

    fn commit(&self, id: u64, _: &[u64], _: bool) -> Result<Usage, SimError> {
        Ok(Usage {
            size: id,
            inodes: 1,
        })
    }

    fn mounts(&self, id: u64, kind: Kind, _: &[u64]) -> Result<Vec<Mount>, SimError> {
        Ok(vec![Mount::bind(
            &self.dir.join(id.to_string()),
            kind == Kind::View,
        )])
    }

    fn view_mounts(&self, chain: &[u64]) -> Result<Vec<Mount>, SimError> {
        let top = chain
            .first()
            .ok_or_else(|| SimError("empty chain".into()))?;
        self.views.lock().unwrap().push(chain.to_vec());
        Ok(vec![Mount::bind(&self.dir.join(top.to_string()), true)])
    }

    fn release_view(&self, chain: &[u64]) -> Result<(), SimError> {
        let mut views = self.views.lock().unwrap();
        let at = views
            .iter()
            .position(|c| c == chain)
            .ok_or_else(|| SimError(format!("released a view never made: {chain:?}")))?;
        views.remove(at);
        Ok(())
    }

    fn remove(&self, id: u64) -> Result<(), SimError> {
        if self.fail_remove.lock().unwrap().contains(&id) {
            return Err(SimError(format!("injected remove failure for {id}")));
        }
        for p in [
            self.dir.join(id.to_string()),
            self.dir.join(format!(".tmp-{id}")),
        ] {
            if p.exists() {
                fs::remove_dir_all(&p).map_err(|e| SimError(e.to_string()))?;
            }
        }
        Ok(())
    }

    fn usage(&self, _: u64) -> Result<Usage, SimError> {
        Ok(Usage { size: 7, inodes: 1 })
    }

    fn ids(&self) -> Result<Vec<u64>, SimError> {
        Ok(fs::read_dir(&self.dir)
            .map_err(|e| SimError(e.to_string()))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect())
    }
}

/// A store over a simulated backend at `root`, and a handle on the backend.
pub fn open(root: &Path) -> (Store<Sim>, Sim) {
    let sim = Sim::new(root);
    (
        Store::open(root, sim.clone(), StoreOptions::default()).unwrap(),
        sim,
    )
}
