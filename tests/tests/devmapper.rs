//! What only the devmapper backend has: a pool that fills up, a pool the user made and named,
//! a loop-backed pool re-attached after a reboot. Runs in the VM (tests/vm/run); pools and
//! devices are made with dmsetup and losetup, independently of strata's own code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(feature = "devmapper")]
mod devmapper {
    use std::fs;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use strata::layer::diff::DiffOptions;
    use strata::{ErrorKind, Kind, Labels, Snapshotter, Store, StoreOptions};
    use strata_devmapper::{DevmapperBackend, DmapError, PoolOptions, UsePool};
    use strata_tests::{require_privileged, run_ok, Mounted};

    fn open(root: &Path) -> Store<DevmapperBackend> {
        let opts = StoreOptions {
            durable: false,
            ..StoreOptions::default()
        };
        Store::open(root, DevmapperBackend::open(root).unwrap(), opts).unwrap()
    }

    /// A store at `root` with a loop-backed pool of its own (16 MiB of metadata), made by
    /// strata; the caller destroys it.
    fn own_pool(
        root: &Path,
        data_size: u64,
        base_size: u64,
        fs_type: &str,
    ) -> (strata_devmapper::PoolConfig, Store<DevmapperBackend>) {
        own_pool_with_meta(root, data_size, 16 << 20, base_size, fs_type)
    }

    /// [`own_pool`] with `meta_size` bytes of metadata.
    fn own_pool_with_meta(
        root: &Path,
        data_size: u64,
        meta_size: u64,
        base_size: u64,
        fs_type: &str,
    ) -> (strata_devmapper::PoolConfig, Store<DevmapperBackend>) {
        fs::create_dir_all(root).unwrap();
        let opts = PoolOptions {
            data_size,
            meta_size,
            base_size,
            fs: fs_type.into(),
            ..PoolOptions::default()
        };
        let cfg = DevmapperBackend::create_pool(root, &opts).unwrap();
        (cfg, open(root))
    }

    /// Prepares `key` on `parent`, writes `files` through a mount, commits `name`.
    fn layer(
        s: &Store<DevmapperBackend>,
        work: &Path,
        parent: Option<&str>,
        name: &str,
        files: &[(&str, &[u8])],
    ) {
        let key = format!("{name}-active");
        let m = Mounted::new(
            &s.prepare(&key, parent, Labels::new()).unwrap(),
            &work.join("m"),
        );
        for (f, data) in files {
            fs::write(m.path().join(f), data).unwrap();
        }
        m.unmount();
        s.commit(name, &key, Labels::new()).unwrap();
    }

    /// `file` of committed `name`, read through a view.
    fn read(s: &Store<DevmapperBackend>, work: &Path, name: &str, file: &str) -> Vec<u8> {
        let key = format!("read-{name}");
        let m = Mounted::new(
            &s.view(&key, Some(name), Labels::new()).unwrap(),
            &work.join("v"),
        );
        let data = fs::read(m.path().join(file)).unwrap();
        drop(m);
        s.remove(&key).unwrap();
        data
    }

    fn dmsetup(args: &[&str]) -> std::process::Output {
        Command::new("dmsetup")
            .arg("--noudevsync")
            .args(args)
            .output()
            .unwrap()
    }

    /// A thin pool made by hand (as a user would, with dmsetup) on two loop devices; taken
    /// down when dropped.
    struct UserPool {
        name: String,
        loops: Vec<String>,
    }

    impl UserPool {
        fn create(dir: &Path, name: &str) -> UserPool {
            let mut loops = Vec::new();
            for (file, size) in [("meta", 16u64 << 20), ("data", 512 << 20)] {
                let path = dir.join(file);
                fs::File::create(&path).unwrap().set_len(size).unwrap();
                let out = Command::new("losetup")
                    .args(["--find", "--show"])
                    .arg(&path)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "losetup {}", path.display());
                loops.push(String::from_utf8(out.stdout).unwrap().trim().to_string());
            }
            let table = format!(
                "0 {} thin-pool {} {} 128 1024 1 error_if_no_space",
                (512u64 << 20) / 512,
                loops[0],
                loops[1]
            );
            let out = dmsetup(&["create", name, "--table", &table]);
            assert!(out.status.success(), "dmsetup create {name}: {out:?}");
            UserPool {
                name: name.to_string(),
                loops,
            }
        }
    }

    impl Drop for UserPool {
        fn drop(&mut self) {
            dmsetup(&["remove", &self.name]);
            for l in &self.loops {
                let _ = Command::new("losetup").args(["-d", l]).status();
            }
        }
    }

    fn has_thin(pool: &str, thin: u64) -> bool {
        strata_tests::pool_has_thin(pool, thin)
    }

    /// The `major:minor` of device-mapper device `name`, if it is there.
    fn sys_dev(name: &str) -> Option<String> {
        fs::read_dir("/sys/block")
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| fs::read_to_string(p.join("dm/name")).is_ok_and(|n| n.trim() == name))
            .map(|p| {
                fs::read_to_string(p.join("dev"))
                    .unwrap()
                    .trim()
                    .to_string()
            })
    }

    /// A pool that runs out of data space fails the writes and the commit with an error
    /// naming the pool, keeps every committed layer, and works again once space is freed.
    #[test]
    fn a_full_pool_fails_cleanly_and_works_again_after_remove() {
        if !require_privileged("a full thin pool") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        // 64 MiB of data under snapshots of 256 MiB: over-provisioned, as pools are.
        let (cfg, s) = own_pool(&root, 64 << 20, 256 << 20, "ext4");
        let w = tmp.path();
        layer(&s, w, None, "kept", &[("a", b"committed before")]);

        // 96 MiB into a snapshot: the pool fills up half way.
        let m = Mounted::new(
            &s.prepare("big", Some("kept"), Labels::new()).unwrap(),
            &w.join("m"),
        );
        let written = (|| -> std::io::Result<()> {
            let mut f = fs::File::create(m.path().join("big"))?;
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..96 {
                f.write_all(&chunk)?;
            }
            f.sync_all()
        })();
        assert!(written.is_err(), "96 MiB fit in a 64 MiB pool?");
        drop(m);
        let status = s.backend().status().unwrap();
        assert!(status.full(), "{status:?}");

        let e = s.commit("big-layer", "big", Labels::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&cfg.pool) && msg.contains("out of space") && msg.contains("big"),
            "the error names the pool, the snapshot and what to do: {msg}"
        );
        assert_eq!(s.stat("big").unwrap().kind, Kind::Active, "not committed");
        assert!(s.stat("big-layer").is_err());
        // What was committed before is intact.
        assert_eq!(read(&s, w, "kept", "a"), b"committed before");

        // Removing the snapshot gives the space back; the pool takes writes again.
        s.remove("big").unwrap();
        s.cleanup().unwrap();
        let mut back = false;
        for _ in 0..50 {
            let st = s.backend().status().unwrap();
            if !st.full() && st.used_data_blocks < status.used_data_blocks {
                back = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert!(back, "{:?}", s.backend().status().unwrap());
        layer(&s, w, Some("kept"), "after", &[("b", b"written after")]);
        assert_eq!(read(&s, w, "after", "a"), b"committed before");
        assert_eq!(read(&s, w, "after", "b"), b"written after");
        drop(s);
        DevmapperBackend::destroy_pool(&root).unwrap();
    }

    /// Activates snapshot `id`'s thin device read-only with dmsetup, as strata does for a
    /// reader (what a reader killed before it let the device go leaves); returns its name.
    fn activate_read_only_by_hand(cfg: &strata_devmapper::PoolConfig, id: u64) -> String {
        let thin = id + cfg.thin_offset;
        let name = format!("{}-{thin}", cfg.prefix);
        let table = format!(
            "0 {} thin {} {thin}",
            cfg.base_size / 512,
            sys_dev(&cfg.pool).unwrap()
        );
        let out = dmsetup(&["create", &name, "--readonly", "--table", &table]);
        assert!(out.status.success(), "dmsetup create {name}: {out:?}");
        name
    }

    /// The store's thin devices that are active (not the pool's own).
    fn active_devices(cfg: &strata_devmapper::PoolConfig) -> Vec<String> {
        let prefix = format!("{}-", cfg.prefix);
        let mut v: Vec<String> = fs::read_dir("/sys/block")
            .unwrap()
            .filter_map(|e| fs::read_to_string(e.unwrap().path().join("dm/name")).ok())
            .map(|n| n.trim().to_string())
            .filter(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        v.sort();
        v
    }

    /// Reading a layer (a diff, a checksum, a copy from it) activates its device read-only
    /// and lets it go afterwards: no device stays active per layer read. A reader that was
    /// killed leaves the device active read-only; removing the layer then still gives its
    /// blocks back to a loop-backed pool's data file (its discard refused a read-only
    /// device, and the file kept the blocks until the pool reused them).
    #[test]
    fn reading_a_layer_leaves_no_device_and_remove_punches_its_blocks_out() {
        use std::os::unix::fs::MetadataExt;
        if !require_privileged("a loop-backed thin pool") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        let root = w.join("root");
        let (cfg, s) = own_pool(&root, 256 << 20, 128 << 20, "ext4");
        let data = root.join(&cfg.loop_files.as_ref().unwrap().data);
        let allocated = || fs::metadata(&data).unwrap().blocks() * 512;
        let before = allocated();
        layer(&s, w, None, "big", &[("big", &vec![0x5au8; 24 << 20])]);
        assert_eq!(
            active_devices(&cfg),
            Vec::<String>::new(),
            "after the commit"
        );

        let (_, stats, _) = s
            .diff("big", &DiffOptions::default(), std::io::sink())
            .unwrap();
        assert!(stats.content_bytes >= 24 << 20, "{stats:?}");
        assert_eq!(active_devices(&cfg), Vec::<String>::new(), "after a diff");
        s.checksum("big", &["/big"], &[]).unwrap();
        assert_eq!(
            active_devices(&cfg),
            Vec::<String>::new(),
            "after a checksum"
        );
        layer(&s, w, Some("big"), "child", &[("c", b"c")]);
        s.diff("child", &DiffOptions::default(), std::io::sink())
            .unwrap();
        assert_eq!(
            active_devices(&cfg),
            Vec::<String>::new(),
            "after a child's diff"
        );
        s.remove("child").unwrap();
        s.cleanup().unwrap();

        // What a reader killed before it let the device go leaves: the layer's device
        // active read-only (made by hand, as strata would).
        let ids: Vec<u64> = fs::read_dir(root.join("devices"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
            .collect();
        assert_eq!(ids.len(), 1, "{ids:?}");
        let name = activate_read_only_by_hand(&cfg, ids[0]);
        assert_eq!(active_devices(&cfg), vec![name.clone()]);

        let with_layer = allocated();
        assert!(
            with_layer >= before + (24 << 20),
            "the layer's 24 MiB are in the data file: {before} then {with_layer} bytes"
        );
        s.remove("big").unwrap();
        s.cleanup().unwrap();
        assert_eq!(
            active_devices(&cfg),
            Vec::<String>::new(),
            "after the remove"
        );
        let after = allocated();
        assert!(
            after + (20 << 20) <= with_layer,
            "the removed layer's blocks were punched out of the data file: {with_layer} then \
             {after} bytes"
        );
        drop(s);
        DevmapperBackend::destroy_pool(&root).unwrap();
    }

    /// A pool whose metadata runs out: the kernel switches it to read-only (its data space is
    /// not the limit). Commit and prepare then fail with an error that names the pool and
    /// says what happened and how to recover; nothing is half-made and what was committed
    /// stays recorded. (Only a repair of the metadata brings such a pool back: tested no
    /// further than the teardown.)
    #[test]
    fn a_pool_out_of_metadata_turns_read_only_and_says_so() {
        if !require_privileged("a thin pool out of metadata space") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        // 128 KiB of metadata (32 blocks of 4 KiB) maps about 190 MiB of 64 KiB blocks; the
        // pool has 1 GiB of data.
        let (cfg, s) = own_pool_with_meta(&root, 1 << 30, 128 << 10, 512 << 20, "ext4");
        let w = tmp.path();
        layer(&s, w, None, "kept", &[("a", b"committed before")]);
        let before = s.list(&[]).unwrap().len();
        let devices = |root: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(root.join("devices"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };

        // 320 MiB into a snapshot: the metadata runs out on the way.
        let m = Mounted::new(
            &s.prepare("big", Some("kept"), Labels::new()).unwrap(),
            &w.join("m"),
        );
        let written = (|| -> std::io::Result<()> {
            let mut f = fs::File::create(m.path().join("big"))?;
            let chunk = vec![0xa5u8; 1 << 20];
            for _ in 0..320 {
                f.write_all(&chunk)?;
            }
            f.sync_all()
        })();
        assert!(written.is_err(), "320 MiB mapped with 128 KiB of metadata?");
        drop(m);
        let status = s.backend().status().unwrap();
        assert!(status.read_only(), "{status:?}");
        assert!(
            status.used_data_blocks < status.total_data_blocks,
            "the data space was not the limit: {status:?}"
        );
        let marked = devices(&root);

        let e = s.commit("big-layer", "big", Labels::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&cfg.pool)
                && msg.contains("read-only")
                && msg.contains("metadata")
                && msg.contains("thin_check")
                && msg.contains("big"),
            "the error names the pool and the snapshot, says what happened and what to do: {msg}"
        );
        assert_eq!(s.stat("big").unwrap().kind, Kind::Active, "not committed");
        assert!(s.stat("big-layer").is_err());

        // No new snapshot on a read-only pool, and nothing half-made.
        let e = s.prepare("more", Some("kept"), Labels::new()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&cfg.pool) && msg.contains("read-only") && msg.contains("more"),
            "{msg}"
        );
        assert!(s.stat("more").is_err());
        assert_eq!(s.list(&[]).unwrap().len(), before + 1, "kept and big only");
        assert_eq!(
            devices(&root),
            marked,
            "no record of a device left by the refusal"
        );
        let kept = s.stat("kept").unwrap();
        assert_eq!(kept.kind, Kind::Committed);

        drop(s);
        DevmapperBackend::destroy_pool(&root).unwrap();
        assert!(
            sys_dev(&cfg.pool).is_none(),
            "the read-only pool was taken down"
        );
    }

    /// A process killed between suspending an origin (to snapshot it) and resuming it leaves
    /// the device suspended and its block device frozen, which refuses mounts (EBUSY) and
    /// holds reads; one killed while activating a device leaves it without a table. The next
    /// view of the layer, diff of it and prepare on it set it right and work. Found by the
    /// crash campaign (RELIABILITY.md).
    #[test]
    fn a_device_left_suspended_or_without_a_table_is_set_right() {
        if !require_privileged("a thin device left suspended") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let (cfg, s) = own_pool(&root, 256 << 20, 64 << 20, "ext4");
        let w = tmp.path();
        layer(&s, w, None, "base", &[("a", b"kept")]);
        // A reader killed while it read the layer leaves its device active, read-only (made
        // by hand here, as strata makes it).
        let ids = |root: &Path| -> Vec<String> {
            fs::read_dir(root.join("devices"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let base: Vec<u64> = ids(&root).iter().filter_map(|n| n.parse().ok()).collect();
        assert_eq!(base.len(), 1, "{base:?}");
        let prefix = format!("{}-", cfg.prefix);
        let device = activate_read_only_by_hand(&cfg, base[0]);
        // What a process killed inside `create_snap`'s suspend/resume leaves.
        let out = dmsetup(&["suspend", &device]);
        assert!(out.status.success(), "{out:?}");

        // A view snapshots the layer (suspending and resuming its active device).
        assert_eq!(read(&s, w, "base", "a"), b"kept");
        let info = dmsetup(&["info", "-c", "--noheadings", "-o", "attr", &device]);
        let attr = String::from_utf8_lossy(&info.stdout).trim().to_string();
        assert!(
            info.status.success() && !attr.is_empty() && !attr.contains('s'),
            "{device} is still suspended: {info:?}"
        );
        // A diff reads it and lets it go.
        s.diff("base", &Default::default(), std::io::sink())
            .unwrap();
        assert!(sys_dev(&device).is_none(), "{device} is still active");
        layer(&s, w, Some("base"), "child", &[("b", b"new")]);
        assert_eq!(read(&s, w, "child", "a"), b"kept");

        // A process killed between creating a layer's device and loading its table leaves
        // the device without one: the next view of the layer makes it again.
        let before = ids(&root);
        layer(&s, w, None, "other", &[("c", b"other")]);
        let id = ids(&root)
            .into_iter()
            .find(|i| !before.contains(i))
            .unwrap();
        let out = dmsetup(&["create", &format!("{prefix}{id}"), "--notable"]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(read(&s, w, "other", "c"), b"other");
        s.diff("other", &Default::default(), std::io::sink())
            .unwrap();
        drop(s);
        DevmapperBackend::destroy_pool(&root).unwrap();
    }

    /// A pool the user made: strata keeps to its id range, a second store on the same range
    /// is refused with a clear error, and taking the stores down leaves the pool.
    #[test]
    fn a_pool_the_user_named() {
        if !require_privileged("a user's thin pool") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        let name = format!("strata-test-user-{}", std::process::id());
        let pool = UserPool::create(w, &name);
        let opts = UsePool {
            base_size: 64 << 20,
            ..UsePool::default()
        };
        let (r1, r2) = (w.join("r1"), w.join("r2"));
        fs::create_dir_all(&r1).unwrap();
        fs::create_dir_all(&r2).unwrap();

        // Names that are not thin pools are refused, naming them.
        let e = DevmapperBackend::use_pool(&r1, "strata-test-no-such-pool", &opts).unwrap_err();
        assert!(matches!(e, DmapError::PoolMissing { .. }), "{e}");
        assert!(e.to_string().contains("strata-test-no-such-pool"), "{e}");
        let linear = format!("{name}-linear");
        let out = dmsetup(&[
            "create",
            &linear,
            "--table",
            &format!("0 2048 linear {} 0", pool.loops[1]),
        ]);
        assert!(out.status.success(), "{out:?}");
        let e = DevmapperBackend::use_pool(&r1, &linear, &opts).unwrap_err();
        dmsetup(&["remove", &linear]);
        assert!(matches!(e, DmapError::NotAPool { .. }), "{e}");
        assert!(
            e.to_string().contains(&linear) && e.to_string().contains("linear"),
            "{e}"
        );
        assert!(!r1.join("devmapper.json").exists(), "nothing recorded");

        // A thin id another user of the pool has.
        let foreign = opts.thin_offset + 2;
        let out = dmsetup(&["message", &name, "0", &format!("create_thin {foreign}")]);
        assert!(out.status.success(), "{out:?}");

        let cfg = DevmapperBackend::use_pool(&r1, &name, &opts).unwrap();
        assert_eq!(
            (cfg.pool.as_str(), cfg.thin_offset),
            (name.as_str(), 1 << 23)
        );
        assert_eq!(cfg.block_sectors, 128, "read from the pool's table");
        let s = open(&r1);
        layer(&s, w, None, "one", &[("f", b"1")]);
        // Snapshot 2's id is the foreign one: refused, naming it; the foreign device stays.
        let e = s.prepare("two", Some("one"), Labels::new()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&foreign.to_string()) && msg.contains("already used"),
            "{msg}"
        );
        assert!(s.stat("two").is_err(), "nothing recorded");
        assert!(
            has_thin(&name, foreign),
            "the other user's device is untouched"
        );
        // The next id is free: the store goes on.
        layer(&s, w, Some("one"), "three", &[("g", b"3")]);
        assert_eq!(read(&s, w, "three", "f"), b"1");
        assert!(has_thin(&name, opts.thin_offset), "the base device");

        // A second store on the same range is refused; on another it works.
        let e = DevmapperBackend::use_pool(&r2, &name, &opts).unwrap_err();
        assert!(matches!(e, DmapError::ThinIdInUse { .. }), "{e}");
        assert!(e.to_string().contains("--thin-id-offset"), "{e}");
        let other = UsePool {
            thin_offset: 1 << 22,
            ..opts.clone()
        };
        DevmapperBackend::use_pool(&r2, &name, &other).unwrap();
        let s2 = open(&r2);
        layer(&s2, w, None, "x", &[("x", b"x")]);
        assert_eq!(read(&s2, w, "x", "x"), b"x");

        drop((s, s2));
        DevmapperBackend::destroy_pool(&r1).unwrap();
        DevmapperBackend::destroy_pool(&r2).unwrap();
        assert!(sys_dev(&name).is_some(), "the user's pool stays");
        for thin in [opts.thin_offset, opts.thin_offset + 1, other.thin_offset] {
            assert!(
                !has_thin(&name, thin),
                "strata's thin id {thin} was deleted"
            );
        }
        assert!(has_thin(&name, foreign));
        drop(pool);
    }

    /// After a reboot (no dm device, no loop device left), opening the store re-attaches
    /// its loop-backed pool and every layer is there.
    #[test]
    fn a_loop_backed_pool_comes_back_after_a_reboot() {
        if !require_privileged("re-attaching a pool") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        let root = w.join("root");
        // A pool of its own, made by strata on loop devices (the shared one of the other
        // tests must not go away).
        let (_, s) = own_pool(&root, 512 << 20, 64 << 20, "ext4");
        layer(&s, w, None, "base", &[("a", b"before the reboot")]);
        s.prepare("work", Some("base"), Labels::new()).unwrap();
        drop(s);

        // The "reboot": every device of the store goes, then its loop devices.
        let cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(root.join("devmapper.json")).unwrap()).unwrap();
        let pool_name = cfg["pool"].as_str().unwrap().to_string();
        let prefix = format!("{}-", cfg["prefix"].as_str().unwrap());
        let mut names: Vec<String> = fs::read_dir("/sys/block")
            .unwrap()
            .filter_map(|e| fs::read_to_string(e.unwrap().path().join("dm/name")).ok())
            .map(|n| n.trim().to_string())
            .filter(|n| n.starts_with(&prefix) && !n.starts_with(&pool_name))
            .collect();
        assert!(!names.is_empty(), "the active snapshot's device");
        names.extend([
            pool_name.clone(),
            format!("{pool_name}-data"),
            format!("{pool_name}-meta"),
        ]);
        for n in &names {
            let out = dmsetup(&["remove", n]);
            assert!(out.status.success(), "dmsetup remove {n}: {out:?}");
        }
        for f in ["pool/data", "pool/meta"] {
            let file: PathBuf = root.join(f);
            let out = Command::new("losetup")
                .args(["--associated"])
                .arg(&file)
                .output()
                .unwrap();
            for line in String::from_utf8(out.stdout).unwrap().lines() {
                let dev = line.split(':').next().unwrap();
                run_ok(Command::new("losetup").args(["-d", dev]));
            }
        }
        assert!(sys_dev(&pool_name).is_none());

        let s = open(&root);
        assert_eq!(read(&s, w, "base", "a"), b"before the reboot");
        let m = Mounted::new(&s.mounts("work").unwrap(), &w.join("m"));
        assert_eq!(fs::read(m.path().join("a")).unwrap(), b"before the reboot");
        fs::write(m.path().join("b"), b"after").unwrap();
        m.unmount();
        s.commit("after", "work", Labels::new()).unwrap();
        assert_eq!(read(&s, w, "after", "b"), b"after");
        drop(s);
        DevmapperBackend::destroy_pool(&root).unwrap();
    }

    /// xfs base devices: snapshots share the base's UUID, so every mount says `nouuid`; a
    /// layer and its child mount side by side.
    #[test]
    fn xfs_snapshots_mount_side_by_side() {
        if !require_privileged("xfs on a thin pool") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let w = tmp.path();
        let root = w.join("root");
        // mkfs.xfs makes nothing smaller than 300 MiB.
        let (_, s) = own_pool(&root, 1 << 30, 320 << 20, "xfs");
        layer(&s, w, None, "base", &[("a", b"base")]);
        layer(&s, w, Some("base"), "child", &[("b", b"child")]);
        let m1 = Mounted::new(
            &s.view("v1", Some("base"), Labels::new()).unwrap(),
            &w.join("v1"),
        );
        let m2 = Mounted::new(
            &s.view("v2", Some("child"), Labels::new()).unwrap(),
            &w.join("v2"),
        );
        assert_eq!(fs::read(m1.path().join("a")).unwrap(), b"base");
        assert!(!m1.path().join("b").exists());
        assert_eq!(fs::read(m2.path().join("a")).unwrap(), b"base");
        assert_eq!(fs::read(m2.path().join("b")).unwrap(), b"child");
        drop((m1, m2));
        drop(s);
        DevmapperBackend::destroy_pool(&root).unwrap();
    }
}
