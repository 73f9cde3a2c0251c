//! The thin pool a test's devmapper store lives in: one loop-backed pool per test process,
//! made on first use, in which every store takes a range of thin ids of its own
//! (`pool use`), taken down when the process exits. A pool of its own per test cost seconds
//! of loop devices and process starts each under emulation (tests/vm/run); a pool strata
//! makes per store is what `tests/tests/devmapper.rs` and the CLI tests use.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The process's shared pool: its store root (which owns the pool's files), its name, and
/// the next free range of thin ids.
struct Shared {
    root: PathBuf,
    name: String,
    next_offset: u64,
}

static SHARED: Mutex<Option<Shared>> = Mutex::new(None);

/// Thin ids per store: far more than any test makes.
const IDS_PER_STORE: u64 = 100_000;

/// Takes the shared pool down (every store using it has been dropped by then).
extern "C" fn destroy_shared() {
    let shared = SHARED.lock().ok().and_then(|mut s| s.take());
    if let Some(s) = shared {
        if let Err(e) = strata_devmapper::DevmapperBackend::destroy_pool(&s.root) {
            eprintln!("could not take down the tests' thin pool: {e}");
        }
        let _ = std::fs::remove_dir_all(&s.root);
    }
}

/// A devmapper store's place in the shared pool, for a test; its thin devices are deleted
/// when dropped.
pub struct DevmapperPool {
    root: PathBuf,
}

impl DevmapperPool {
    /// Gives the store at `root` a 64 MiB ext4 base device and a range of thin ids in the
    /// process's pool (4 GiB of data and 256 MiB of metadata, sparse), making the pool first
    /// if needed.
    pub fn create(root: &Path) -> DevmapperPool {
        std::fs::create_dir_all(root).unwrap();
        let (name, offset) = {
            let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
            if guard.is_none() {
                let dir =
                    std::env::temp_dir().join(format!("strata-test-pool-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let opts = strata_devmapper::PoolOptions {
                    data_size: 4 << 30,
                    meta_size: 256 << 20,
                    base_size: 64 << 20,
                    ..strata_devmapper::PoolOptions::default()
                };
                let cfg = strata_devmapper::DevmapperBackend::create_pool(&dir, &opts)
                    .unwrap_or_else(|e| panic!("make a thin pool for the tests: {e}"));
                *guard = Some(Shared {
                    root: dir,
                    name: cfg.pool,
                    next_offset: IDS_PER_STORE,
                });
                // SAFETY: registers a plain `extern "C" fn()` with libc's atexit; it runs once
                // at process exit (libtest exits through `exit`), touching only the mutex.
                unsafe {
                    libc::atexit(destroy_shared);
                }
            }
            let shared = guard.as_mut().unwrap();
            let offset = shared.next_offset;
            shared.next_offset += IDS_PER_STORE;
            (shared.name.clone(), offset)
        };
        let opts = strata_devmapper::UsePool {
            base_size: 64 << 20,
            fs: "ext4".into(),
            thin_offset: offset,
        };
        strata_devmapper::DevmapperBackend::use_pool(root, &name, &opts)
            .unwrap_or_else(|e| panic!("give the test's store a place in pool {name}: {e}"));
        DevmapperPool {
            root: root.to_path_buf(),
        }
    }
}

impl Drop for DevmapperPool {
    fn drop(&mut self) {
        if let Err(e) = strata_devmapper::DevmapperBackend::destroy_pool(&self.root) {
            eprintln!("could not delete the test store's thin devices: {e}");
        }
    }
}

/// What `devmapper.json` in `root` records that a test needs: the pool's name, the base
/// device's size in sectors and the store's first thin id.
fn recorded(root: &Path) -> (String, u64, u64) {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("devmapper.json")).unwrap()).unwrap();
    (
        cfg["pool"].as_str().unwrap().to_string(),
        cfg["base_size"].as_u64().unwrap() / 512,
        cfg["thin_offset"].as_u64().unwrap_or(0),
    )
}

/// The `/sys/block/dm-N` directory of device-mapper device `name`. By /sys: without udev
/// (the VM) there may be no /dev/mapper nodes.
fn sys_dir(name: &str) -> Option<PathBuf> {
    std::fs::read_dir("/sys/block")
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read_to_string(p.join("dm/name")).is_ok_and(|n| n.trim() == name))
}

fn dmsetup(args: &[&str]) {
    crate::run_ok(
        std::process::Command::new("dmsetup")
            .arg("--noudevsync")
            .args(args),
    );
}

/// Deletes snapshot `id`'s thin device from the pool of the store at `root`, behind the
/// store's back (with dmsetup): the layer's storage is gone, as after a prune by another
/// tool. The device must not be active.
pub fn delete_behind_the_stores_back(root: &Path, id: u64) {
    let (pool, _, offset) = recorded(root);
    dmsetup(&["message", &pool, "0", &format!("delete {}", offset + id)]);
}

/// Activates snapshot `id`'s thin device read-write (with dmsetup, not strata), mounts it on
/// `at` and runs `f` on the mounted tree: to change a committed layer behind the store's
/// back.
pub fn with_layer_mounted(root: &Path, id: u64, at: &Path, f: impl FnOnce(&Path)) {
    let (pool, sectors, offset) = recorded(root);
    let pool_dev = std::fs::read_to_string(sys_dir(&pool).unwrap().join("dev")).unwrap();
    let name = format!("strata-test-rw-{}", std::process::id());
    let table = format!("0 {sectors} thin {} {}", pool_dev.trim(), offset + id);
    dmsetup(&["create", &name, "--table", &table]);
    let node = PathBuf::from("/dev").join(sys_dir(&name).unwrap().file_name().unwrap());
    std::fs::create_dir_all(at).unwrap();
    crate::run_ok(std::process::Command::new("mount").arg(&node).arg(at));
    f(at);
    crate::run_ok(std::process::Command::new("umount").arg(at));
    dmsetup(&["remove", &name]);
}

/// Whether thin pool `pool` has thin id `thin`. dm-thin cannot list its ids, but a table over
/// an id it lacks fails to load: loads one (in-process, with the devicemapper crate, not
/// strata's code) on a probe device and removes it.
pub fn pool_has_thin(pool: &str, thin: u64) -> bool {
    use devicemapper::{DevId, DmFlags, DmName, DmOptions, DM};
    let dm = DM::new().unwrap();
    let pool_dev = std::fs::read_to_string(sys_dir(pool).unwrap().join("dev")).unwrap();
    let name = format!("strata-test-probe-{}-{thin}", std::process::id());
    let n = DmName::new(&name).unwrap();
    dm.device_create(n, None, DmOptions::default()).unwrap();
    let table = [(
        0u64,
        8u64,
        "thin".to_string(),
        format!("{} {thin}", pool_dev.trim()),
    )];
    let loaded = dm
        .table_load(
            &DevId::Name(n),
            &table,
            DmOptions::default().set_flags(DmFlags::DM_READONLY),
        )
        .is_ok();
    dm.device_remove(&DevId::Name(n), DmOptions::default())
        .unwrap();
    loaded
}
