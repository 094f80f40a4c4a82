//! The integration suite. Every test runs against the backend `THINPOOL_TEST_BACKEND` names:
//! natively on reflink, and on the kernel's dm-thin inside the VM (`tests/vm/run`).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinpool::{
    AsyncPool, AutoextendPolicy, BackendKind, Bytes, DataBlocks, DeviceKind, Error, GrowRequest,
    Percent, Pool, PoolMode, PoolSettings, PoolSpec, RemoveOptions, SizeChange, SnapshotRequest,
};
use thinpool_tests::*;

/// Makes a committed layer `name` on top of `parent`, holding `file` with `data` (on sim,
/// a record of `sim_files`).
fn make_layer(
    tp: &mut TestPool,
    key: &str,
    name_: &str,
    parent: Option<&str>,
    file: &str,
    data: &[u8],
) {
    tp.pool()
        .snapshot(request(key, parent, DeviceKind::Active))
        .expect("prepare layer");
    tp.put_file(key, file, data);
    tp.pool()
        .commit(&name(key), &name(name_), None)
        .expect("commit layer");
}

#[test]
fn default_sized_pool_files_are_sparse() {
    let root = pool_dir("default-sizes", false);
    let spec = PoolSpec {
        root: root.clone(),
        backend: Some(backend()),
        // 102 GiB of files may be more than the host has free; the data file stays sparse.
        overcommit_host: true,
        ..PoolSpec::default()
    };
    let tp = TestPool::open(&spec);
    let st = tp.pool().status().expect("status");
    let paths = tp.pool().paths();
    let data_len = fs::metadata(&paths.data_file).unwrap().len();
    let meta_len = fs::metadata(&paths.metadata_file).unwrap().len();
    assert_eq!(data_len, PoolSettings::DEFAULT_DATA_SIZE.0);
    assert_eq!(meta_len, PoolSettings::DEFAULT_METADATA_SIZE.0);
    let data_alloc = allocated_bytes(&paths.data_file);
    let meta_alloc = allocated_bytes(&paths.metadata_file);
    println!(
        "default pool: data file {} apparent, {} on disk; metadata file {} apparent, {} on disk; \
         base device {}",
        Bytes(data_len),
        Bytes(data_alloc),
        Bytes(meta_len),
        Bytes(meta_alloc),
        st.base_size
    );
    // The data file's disk use is in MiB: the formatted 10 GiB base writes its inode tables
    // once. The metadata file is allocated in full, so that a full host filesystem cannot
    // fail the pool's metadata.
    assert!(
        data_alloc < Bytes::mib(1024).0,
        "data file uses {}",
        Bytes(data_alloc)
    );
    assert!(
        meta_alloc >= meta_len,
        "metadata file allocated: {} of {}",
        Bytes(meta_alloc),
        Bytes(meta_len)
    );
    assert_eq!(st.base_size, PoolSettings::DEFAULT_BASE_SIZE);
    tp.assert_audit_clean();
}

#[test]
fn layer_chain_container_and_view() {
    skip_on_sim!("mounts a view to check it is read-only (EROFS)");
    let mut tp = TestPool::small("chain");
    let mut parent: Option<String> = None;
    for i in 1..=10 {
        let layer = format!("layer{i}");
        let data = pattern(i, 4096 + i as usize);
        make_layer(
            &mut tp,
            &format!("extract-{i}"),
            &layer,
            parent.as_deref(),
            &format!("file{i}"),
            &data,
        );
        parent = Some(layer);
    }
    tp.pool()
        .snapshot(request("container", Some("layer10"), DeviceKind::Active))
        .expect("container snapshot");
    let c = tp.mount("container");
    for i in 1..=10 {
        let got = read_file(&c.join(format!("file{i}")));
        assert_eq!(
            got,
            pattern(i, 4096 + i as usize),
            "file{i} in the container"
        );
    }
    write_file(&c.join("container-only"), b"written by the container");

    // The parent, seen through a view, does not see the container's write, and is read-only.
    tp.pool()
        .snapshot(request("view", Some("layer10"), DeviceKind::View))
        .expect("view");
    let spec = tp.pool().activate(&name("view")).expect("activate view");
    assert!(
        spec.options.iter().any(|o| o == "ro"),
        "view mount spec {spec:?}"
    );
    let v = tp.mount_spec("view", &spec);
    assert!(v.join("file10").exists());
    assert!(
        !v.join("container-only").exists(),
        "container write leaked into its parent"
    );
    let err = fs::write(v.join("new"), b"x").expect_err("a view must be read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    tp.unmount(&v);
    tp.unmount(&c);

    let layer = tp.pool().device(&name("layer3")).unwrap();
    assert_eq!(layer.kind, DeviceKind::Committed);
    tp.assert_audit_clean();
}

/// Only committed snapshots are parents, enforced by the engine itself and not only at the
/// gRPC edge (review D4): an active or view parent is InvalidArgument, as containerd's
/// storage answers, and nothing is created.
#[test]
fn snapshot_refuses_a_parent_that_is_not_committed() {
    let tp = TestPool::small("parent-rule");
    tp.pool()
        .snapshot(request("act", None, DeviceKind::Active))
        .expect("active snapshot of the base");
    tp.pool()
        .snapshot(request("vw", None, DeviceKind::View))
        .expect("view of the base");
    for parent in ["act", "vw"] {
        for kind in [DeviceKind::Active, DeviceKind::View] {
            let e = tp
                .pool()
                .snapshot(request("child", Some(parent), kind))
                .unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument(_)),
                "{parent} {kind}: {e}"
            );
            assert!(e.to_string().contains("not a committed snapshot"), "{e}");
            assert!(
                matches!(tp.pool().device(&name("child")), Err(Error::NotFound(_))),
                "a refused snapshot leaves no device"
            );
        }
    }
    let devices = tp.pool().devices().expect("devices");
    assert_eq!(devices.len(), 3, "base, act and vw only: {devices:?}");
    tp.assert_audit_clean();
}

#[test]
fn remove_refuses_parents_and_frees_leaves() {
    let mut tp = TestPool::small("remove");
    make_layer(&mut tp, "k", "parent", None, "f", b"parent");
    tp.pool()
        .snapshot(request("child", Some("parent"), DeviceKind::Active))
        .unwrap();
    let err = tp
        .pool()
        .remove(&name("parent"), RemoveOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    tp.pool()
        .remove(&name("child"), RemoveOptions::default())
        .expect("remove leaf");
    assert!(matches!(
        tp.pool().device(&name("child")),
        Err(Error::NotFound(_))
    ));
    tp.pool()
        .remove(
            &name("parent"),
            RemoveOptions {
                discard: true,
                deferred: false,
            },
        )
        .expect("parent is a leaf now");
    let err = tp
        .pool()
        .remove(&name("parent"), RemoveOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    // Names are free again at once.
    tp.pool()
        .snapshot(request("child", None, DeviceKind::Active))
        .expect("reuse name");
    // Deferred removal frees the name now and the device at reclaim.
    tp.pool()
        .remove(
            &name("child"),
            RemoveOptions {
                discard: false,
                deferred: true,
            },
        )
        .unwrap();
    let report = tp.pool().audit().unwrap();
    assert_eq!(report.pending.len(), 1, "the delete is pending: {report:?}");
    assert!(
        report.is_clean(),
        "a pending delete is no problem: {report:?}"
    );
    assert_eq!(tp.pool().reclaim().unwrap(), 1);
    tp.assert_audit_clean();
}

#[test]
fn bad_requests_get_clear_errors() {
    let mut tp = TestPool::small("errors");
    tp.pool()
        .snapshot(request("a", None, DeviceKind::Active))
        .unwrap();
    let dup = tp
        .pool()
        .snapshot(request("a", None, DeviceKind::Active))
        .unwrap_err();
    assert!(matches!(dup, Error::AlreadyExists(_)), "{dup}");
    let missing = tp
        .pool()
        .snapshot(request("b", Some("nope"), DeviceKind::Active))
        .unwrap_err();
    assert!(matches!(missing, Error::NotFound(_)), "{missing}");
    let mut small = request("c", None, DeviceKind::Active);
    small.size = Some(Bytes::mib(16));
    let e = tp.pool().snapshot(small).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let committed = tp
        .pool()
        .commit(&name("nope"), &name("x"), None)
        .unwrap_err();
    assert!(matches!(committed, Error::NotFound(_)), "{committed}");
    // A mounted device cannot be deactivated.
    let t = tp.open_target("a");
    let busy = tp.pool().deactivate(&name("a")).unwrap_err();
    assert!(matches!(busy, Error::FailedPrecondition(_)), "{busy}");
    tp.close_target(t);
    tp.pool()
        .deactivate(&name("a"))
        .expect("deactivate after unmount");
    // The same root cannot be opened twice.
    let second = Pool::open(&small_spec(&tp.root))
        .err()
        .expect("second open must fail");
    assert!(matches!(second, Error::FailedPrecondition(_)), "{second}");
    // Nothing half-made was left behind by any of the failures.
    tp.assert_audit_clean();
}

#[test]
fn conflicting_settings_are_named() {
    let mut tp = TestPool::small("conflict");
    let spec = small_spec(&tp.root);
    tp.close(true);
    let mut other = spec.clone();
    other.block_size = Some(Bytes::kib(128));
    let err = Pool::open(&other).err().expect("conflicting block size");
    assert!(err.to_string().contains("block_size"), "{err}");
    let mut other = spec.clone();
    other.fs = Some(thinpool::FsType::Xfs);
    let err = Pool::open(&other).err().expect("conflicting fs");
    assert!(err.to_string().contains("fs"), "{err}");
    // A pool records its backend; opening it with the other one is refused by name.
    let mut other = spec.clone();
    other.backend = Some(match backend() {
        thinpool::BackendKind::Dm => thinpool::BackendKind::Reflink,
        thinpool::BackendKind::Reflink | thinpool::BackendKind::Sim => thinpool::BackendKind::Dm,
    });
    let err = Pool::open(&other).err().expect("conflicting backend");
    assert!(err.to_string().contains("backend"), "{err}");
    tp.reopen(&spec);
    tp.assert_audit_clean();
}

#[test]
fn usage_grows_with_writes() {
    let mut tp = TestPool::small("usage");
    tp.pool()
        .snapshot(request("u", None, DeviceKind::Active))
        .unwrap();
    let before = tp.pool().usage(&name("u")).unwrap();
    tp.put_file("u", "big", &pattern(7, 32 << 20));
    let after = tp.pool().usage(&name("u")).unwrap();
    println!("usage before {before}, after writing 32 MiB {after}");
    assert!(
        after.0 >= before.0 + (30 << 20),
        "usage {before} -> {after}"
    );
}

/// containerd's Usage: what each snapshot adds over its parent, whatever its children, and
/// read without activating anything. Committed layers keep the figure their commit measured
/// (on reflink a layer's own unshared count falls to ~0 once it has children); a record
/// from a build that did not store it is measured again on demand.
#[test]
fn snapshot_usage_is_what_each_layer_adds() {
    const MIB: u64 = 1 << 20;
    let root = pool_dir("layer-usage", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    make_layer(&mut tp, "k1", "l1", None, "one", &pattern(1, 16 << 20));
    make_layer(&mut tp, "k2", "l2", Some("l1"), "two", &pattern(2, 8 << 20));
    tp.pool()
        .snapshot(request("c", Some("l2"), DeviceKind::Active))
        .unwrap();
    tp.put_file("c", "three", &pattern(3, 4 << 20));
    tp.pool()
        .snapshot(request("v", Some("l2"), DeviceKind::View))
        .unwrap();
    let usage = |tp: &TestPool, n: &str| tp.pool().snapshot_usage(&name(n)).unwrap().0;
    let figures = |tp: &TestPool| -> Vec<u64> {
        ["l1", "l2", "c", "v"]
            .iter()
            .map(|n| usage(tp, n))
            .collect()
    };
    let first = figures(&tp);
    println!("usage l1, l2, c, v: {first:?}");
    let within = |what: &str, got: u64, lo: u64, hi: u64| {
        assert!(
            (lo * MIB..hi * MIB).contains(&got),
            "{what}: usage {got}, expected {lo}..{hi} MiB"
        );
    };
    within("l1 (16 MiB written)", first[0], 16, 20);
    within("l2 (8 MiB written)", first[1], 8, 12);
    within("c (4 MiB written)", first[2], 4, 8);
    within("v (a view)", first[3], 0, 1);

    // Reading usage (and every device's mapped bytes, as ListDevices and /metrics do)
    // activates nothing: "c" is now inactive, the layers and the base device always were.
    tp.pool().deactivate(&name("c")).unwrap();
    tp.pool().deactivate(&name("v")).unwrap();
    let active = tp.pool().active_devices().unwrap();
    assert_eq!(figures(&tp), first, "the same figures for inactive devices");
    let all = tp.pool().mapped_bytes_all().unwrap();
    assert_eq!(all.len(), 5, "base, l1, l2, c, v");
    for (rec, _) in &all {
        tp.pool().usage_by_id(rec.id).unwrap();
    }
    assert_eq!(
        tp.pool().active_devices().unwrap(),
        active,
        "reading usage activated a device"
    );

    // The figures survive a restart, and records without a stored figure (an older
    // build's) are measured again: the same figures.
    tp.close(false);
    let store = thinpool::store::Store::open(&root.join("pool.redb")).unwrap();
    let stored: Vec<_> = store
        .read(|r| r.devices())
        .unwrap()
        .into_iter()
        .filter(|r| r.usage.is_some())
        .collect();
    let cleared = stored.len();
    store
        .write(|w| {
            for mut rec in stored {
                rec.usage = None;
                w.put_device(&rec)?;
            }
            Ok(())
        })
        .unwrap();
    drop(store);
    assert_eq!(cleared, 2, "l1 and l2 had stored figures");
    tp.reopen(&spec);
    assert_eq!(figures(&tp), first, "measured again after reopen");
    assert_eq!(
        tp.pool().active_devices().unwrap(),
        active,
        "measuring activated a device"
    );
    tp.assert_audit_clean();
}

/// The per-device figures for metrics: every ready device, in one backend call (dm: one
/// `thin_ls`), agreeing with the per-device `usage`; the engine's latency histograms count
/// the calls made.
#[test]
fn mapped_bytes_of_all_devices_and_operation_timings() {
    let mut tp = TestPool::small("mapped-all");
    tp.pool()
        .snapshot(request("u", None, DeviceKind::Active))
        .unwrap();
    tp.pool()
        .snapshot(request("idle", None, DeviceKind::Active))
        .unwrap();
    tp.put_file("u", "big", &pattern(9, 32 << 20));
    // "u" is still active (mounted devices stay active until deactivated), "idle" never was.
    let all = tp.pool().mapped_bytes_all().unwrap();
    let names: Vec<Option<String>> = all
        .iter()
        .map(|(r, _)| r.name.as_ref().map(|n| n.as_str().to_string()))
        .collect();
    assert_eq!(all.len(), 3, "base, u, idle: {names:?}");
    for (rec, mapped) in &all {
        let usage = tp.pool().usage_by_id(rec.id).unwrap();
        println!("{:?}: mapped_bytes_all {mapped}, usage {usage}", rec.name);
        assert_eq!(*mapped, usage, "{:?}", rec.name);
    }
    let u = all
        .iter()
        .find(|(r, _)| r.name.as_ref().is_some_and(|n| n.as_str() == "u"))
        .unwrap();
    assert!(u.1.0 >= 30 << 20, "u maps {}", u.1);
    let timings = tp.pool().timings();
    let count = |op: thinpool::Operation| {
        timings
            .iter()
            .find(|(o, _)| *o == op)
            .map(|(_, h)| h.count)
            .unwrap()
    };
    assert_eq!(count(thinpool::Operation::Snapshot), 2);
    assert_eq!(count(thinpool::Operation::Activate), 1);
    assert_eq!(count(thinpool::Operation::Grow), 0);
}

#[test]
fn larger_snapshot_grows_its_filesystem() {
    skip_on_sim!("checks the grown filesystem's size through a mount");
    let mut tp = TestPool::small("grow-fs");
    let mut req = request("big", None, DeviceKind::Active);
    req.size = Some(Bytes::mib(512));
    let rec = tp.pool().snapshot(req).unwrap();
    assert_eq!(rec.size, Bytes::mib(512));
    let dir = tp.mount("big");
    let st = nix::sys::statvfs::statvfs(&dir).unwrap();
    let fs_size = st.blocks() as u64 * st.fragment_size() as u64;
    assert!(
        fs_size > Bytes::mib(400).0,
        "filesystem is only {}",
        Bytes(fs_size)
    );
    tp.unmount(&dir);
}

/// Only committed devices are parents (review D4); a mounted origin is committed first
/// (tests/commit.rs covers the Commit of a mounted snapshot).
#[test]
fn snapshot_of_an_active_origin_is_refused() {
    let mut tp = TestPool::small("active-origin");
    tp.pool()
        .snapshot(request("origin", None, DeviceKind::Active))
        .unwrap();
    let t = tp.open_target("origin");
    t.write("before", b"before the snapshot");
    let e = tp
        .pool()
        .snapshot(request("snap", Some("origin"), DeviceKind::Active))
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(t.read("before"), b"before the snapshot");
    tp.close_target(t);
    tp.assert_audit_clean();
}

#[test]
fn engine_restart_restores_state() {
    let mut tp = TestPool::small("restart");
    let spec = small_spec(&tp.root);
    make_layer(&mut tp, "k1", "l1", None, "f1", b"one");
    tp.pool()
        .snapshot(request("c", Some("l1"), DeviceKind::Active))
        .unwrap();
    let mut labels = BTreeMap::new();
    labels.insert("purpose".to_string(), "test".to_string());
    tp.pool().set_labels(&name("c"), labels.clone()).unwrap();
    let mounted = tp.pool().activate(&name("c")).unwrap();
    let before = tp.pool().devices().unwrap();
    // A daemon restart: devices stay active in the kernel.
    tp.close(false);
    tp.reopen(&spec);
    assert_eq!(tp.pool().devices().unwrap(), before);
    assert_eq!(
        tp.pool().activate(&name("c")).unwrap(),
        mounted,
        "same node after restart"
    );
    assert_eq!(tp.pool().device(&name("c")).unwrap().labels, labels);
    assert_eq!(tp.get_file("c", "f1"), b"one");
    tp.assert_audit_clean();
}

/// `Pool::take_down` (`thinctl pool down`), on the backend under test (dm in the VM):
/// refused while a device is mounted, naming it and changing nothing; then no device,
/// pool, loop device or mount of the pool stays in the kernel, activate is refused, and
/// the next open brings every snapshot back with its data.
#[test]
fn take_down_refuses_busy_then_leaves_nothing() {
    let mut tp = TestPool::small("take-down");
    let spec = small_spec(&tp.root);
    let tag = tp.pool().settings().tag.clone();
    let bulk = pattern(21, 2 << 20);
    make_layer(&mut tp, "k1", "l1", None, "bulk", &bulk);
    tp.pool()
        .snapshot(request("c", Some("l1"), DeviceKind::Active))
        .unwrap();
    tp.pool()
        .snapshot(request("v", Some("l1"), DeviceKind::View))
        .unwrap();
    tp.pool().activate(&name("v")).unwrap();
    let c = tp.open_target("c");
    let own = pattern(22, 1 << 20);
    c.write("own", &own);
    let active = tp.pool().active_devices().unwrap();
    assert!(active.len() >= 2, "c and v are active: {active:?}");

    let err = tp.pool().take_down(false).unwrap_err();
    assert!(
        matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("\"c\""),
        "{err}"
    );
    assert_eq!(
        tp.pool().active_devices().unwrap(),
        active,
        "a refusal changes nothing"
    );
    assert_eq!(c.read("own"), own);

    tp.close_target(c);
    let r = tp.pool().take_down(false).unwrap();
    assert!(r.pool_down && r.busy.is_empty(), "{r:?}");
    assert_eq!(r.deactivated.len(), active.len(), "{r:?}");
    assert_eq!(kernel_leftovers(&tp.root, &tag), Vec::<String>::new());
    // Down: every call that would change the backend is refused (not "done" on an empty
    // mount point).
    let again = tp.pool().activate(&name("c"));
    assert!(
        matches!(again, Err(Error::FailedPrecondition(_))),
        "{again:?}"
    );
    let rm = tp.pool().remove(&name("v"), RemoveOptions::default());
    assert!(matches!(rm, Err(Error::FailedPrecondition(_))), "{rm:?}");
    let de = tp.pool().deactivate(&name("c"));
    assert!(matches!(de, Err(Error::FailedPrecondition(_))), "{de:?}");
    assert_eq!(kernel_leftovers(&tp.root, &tag), Vec::<String>::new());

    tp.reopen(&spec);
    let c = tp.open_target("c");
    assert_eq!(sha256_hex(&c.read("own")), sha256_hex(&own));
    assert_eq!(sha256_hex(&c.read("bulk")), sha256_hex(&bulk));
    tp.close_target(c);
    let v = tp.open_target("v");
    assert_eq!(sha256_hex(&v.read("bulk")), sha256_hex(&bulk));
    tp.close_target(v);
    tp.assert_audit_clean();
}

/// Phase 1 writes checksummed files; phase 2, after a reboot, checks them. Natively both run
/// in one process with a teardown (everything a reboot removes) in between; in the VM the
/// harness really powers the guest off between them.
#[test]
fn reboot_reassembles_pool_and_data() {
    let root = pool_dir("reboot", true);
    let spec = small_spec(&root);
    let sums_file = root.join("checksums.json");
    let phase = reboot_phase();
    if phase.is_none() || phase == Some(1) {
        // A pool left by an earlier run of this test is not ours to trust.
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let mut tp = TestPool::open(&spec);
        tp.keep_dir();
        make_layer(
            &mut tp,
            "k",
            "layer",
            None,
            "layerfile",
            &pattern(1, 1 << 20),
        );
        tp.pool()
            .snapshot(request("ctr", Some("layer"), DeviceKind::Active))
            .unwrap();
        let dir = tp.open_target("ctr");
        let mut sums = BTreeMap::new();
        for i in 0..8u64 {
            let data = pattern(100 + i, 256 << 10);
            dir.write(&format!("f{i}"), &data);
            sums.insert(format!("f{i}"), sha256_hex(&data));
        }
        sums.insert("layerfile".into(), sha256_hex(&pattern(1, 1 << 20)));
        tp.close_target(dir);
        fs::write(&sums_file, serde_json::to_vec(&sums).unwrap()).unwrap();
        tp.close(phase.is_none());
        if phase == Some(1) {
            return; // the VM powers off here; phase 2 runs on the next boot
        }
    }
    let sums: BTreeMap<String, String> =
        serde_json::from_slice(&fs::read(&sums_file).expect("phase 1 left checksums")).unwrap();
    let mut tp = TestPool::open(&spec);
    // The container device was active before the reboot: reconcile re-activated it.
    let active = tp.pool().active_devices().unwrap();
    let ctr = tp.pool().device(&name("ctr")).unwrap();
    assert!(active.contains_key(&ctr.id), "{active:?}");
    let c = tp.open_target("ctr");
    for (file, sum) in &sums {
        assert_eq!(&sha256_hex(&c.read(file)), sum, "{file} after reboot");
    }
    tp.close_target(c);
    tp.assert_audit_clean();
}

/// One crash case: `setup` runs first (in this process), then a child process runs `op` with
/// `failpoint` armed and dies there as under kill -9; then the pool is reopened, `check`
/// runs, and the audit must find nothing leaked, missing or unfinished.
fn crash_case(
    test: &str,
    failpoint: &str,
    setup: Option<fn(&mut TestPool)>,
    op: fn(&Path),
    check: fn(&mut TestPool),
) {
    crash_case_then(test, failpoint, setup, op, false, check)
}

/// [`crash_case`], with `reboot`: after the crash, everything the kernel held for the pool
/// (devices, mounts, loop devices) is removed before the pool is reopened, as a reboot would.
fn crash_case_then(
    test: &str,
    failpoint: &str,
    setup: Option<fn(&mut TestPool)>,
    op: fn(&Path),
    reboot: bool,
    check: fn(&mut TestPool),
) {
    if let Some(root) = std::env::var_os("THINPOOL_CRASH_CHILD") {
        op(Path::new(&root));
        panic!("failpoint {failpoint} did not fire");
    }
    let root = pool_dir(test, false);
    let spec = small_spec(&root);
    if let Some(setup) = setup {
        let mut tp = TestPool::open(&spec);
        tp.keep_dir();
        setup(&mut tp);
        tp.close(false);
    }
    let status = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("THINPOOL_CRASH_CHILD", &root)
        .env("THINPOOL_FAILPOINTS", failpoint)
        .status()
        .expect("spawn crash child");
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "child did not die at {failpoint}: {status}"
    );
    if reboot {
        let store = thinpool::store::Store::open(&root.join("pool.redb")).unwrap();
        let settings = store.read(|r| r.settings()).unwrap();
        drop(store);
        thinpool::backend::scrub(&thinpool::backend::PoolPaths::new(&root), &settings)
            .expect("remove the crashed pool's kernel objects");
    }
    let mut tp = TestPool::open(&spec);
    check(&mut tp);
    tp.assert_audit_clean();
}

fn child_pool(root: &Path) -> Pool {
    Pool::open(&small_spec(root)).expect("child opens pool")
}

fn setup_layer(tp: &mut TestPool) {
    make_layer(tp, "k", "layer", None, "f", b"layer data");
}

fn setup_victim(tp: &mut TestPool) {
    tp.pool()
        .snapshot(request("victim", None, DeviceKind::Active))
        .unwrap();
    tp.pool().activate(&name("victim")).unwrap();
}

fn op_create(root: &Path) {
    let mut req = request("new", None, DeviceKind::Active);
    req.activate = true; // as containerd's Prepare does
    child_pool(root).snapshot(req).unwrap();
}

fn op_snapshot(root: &Path) {
    child_pool(root)
        .snapshot(request("new", Some("layer"), DeviceKind::Active))
        .unwrap();
}

fn op_remove(root: &Path) {
    child_pool(root)
        .remove(&name("victim"), RemoveOptions::default())
        .unwrap();
}

fn op_open(root: &Path) {
    child_pool(root);
}

fn check_new_rolled_back(tp: &mut TestPool) {
    assert!(matches!(
        tp.pool().device(&name("new")),
        Err(Error::NotFound(_))
    ));
    // The name and the parent are usable again.
    let parent = tp.pool().device(&name("layer")).ok().map(|_| "layer");
    tp.pool()
        .snapshot(request("new", parent, DeviceKind::Active))
        .expect("retry after crash");
}

fn check_victim_gone(tp: &mut TestPool) {
    assert!(matches!(
        tp.pool().device(&name("victim")),
        Err(Error::NotFound(_))
    ));
    assert!(
        tp.pool()
            .devices()
            .unwrap()
            .iter()
            .all(|d| d.kind == DeviceKind::Base)
    );
}

fn check_pool_usable(tp: &mut TestPool) {
    tp.pool()
        .snapshot(request("after", None, DeviceKind::Active))
        .expect("pool usable");
    tp.put_file("after", "x", b"x");
}

#[test]
fn crash_create_after_intent() {
    crash_case(
        "crash_create_after_intent",
        "create:after_intent",
        None,
        op_create,
        check_new_rolled_back,
    );
}

#[test]
fn crash_create_after_kernel() {
    crash_case(
        "crash_create_after_kernel",
        "create:after_kernel",
        None,
        op_create,
        check_new_rolled_back,
    );
}

#[test]
fn crash_create_after_activate() {
    crash_case(
        "crash_create_after_activate",
        "create:after_activate",
        None,
        op_create,
        check_new_rolled_back,
    );
}

#[test]
fn crash_snapshot_after_intent() {
    crash_case(
        "crash_snapshot_after_intent",
        "snapshot:after_intent",
        Some(setup_layer),
        op_snapshot,
        check_new_rolled_back,
    );
}

#[test]
fn crash_snapshot_after_kernel() {
    crash_case(
        "crash_snapshot_after_kernel",
        "snapshot:after_kernel",
        Some(setup_layer),
        op_snapshot,
        check_new_rolled_back,
    );
}

#[test]
fn crash_remove_after_intent() {
    crash_case(
        "crash_remove_after_intent",
        "remove:after_intent",
        Some(setup_victim),
        op_remove,
        check_victim_gone,
    );
}

#[test]
fn crash_remove_after_deactivate() {
    crash_case(
        "crash_remove_after_deactivate",
        "remove:after_deactivate",
        Some(setup_victim),
        op_remove,
        check_victim_gone,
    );
}

#[test]
fn crash_remove_after_kernel() {
    crash_case(
        "crash_remove_after_kernel",
        "remove:after_kernel",
        Some(setup_victim),
        op_remove,
        check_victim_gone,
    );
}

#[test]
fn crash_pool_create_after_store() {
    crash_case(
        "crash_pool_create_after_store",
        "pool_create:after_store",
        None,
        op_open,
        check_pool_usable,
    );
}

#[test]
fn crash_pool_create_after_mkfs() {
    crash_case(
        "crash_pool_create_after_mkfs",
        "pool_create:after_mkfs",
        None,
        op_open,
        check_pool_usable,
    );
}

#[test]
fn snapshot_requests_validate_kind_and_labels() {
    let tp = TestPool::small("validate");
    let mut req: SnapshotRequest = request("x", None, DeviceKind::Committed);
    assert!(matches!(
        tp.pool().snapshot(req.clone()),
        Err(Error::InvalidArgument(_))
    ));
    req.kind = DeviceKind::Active;
    req.labels.insert("k".into(), "v".repeat(100_000));
    assert!(matches!(
        tp.pool().snapshot(req),
        Err(Error::InvalidArgument(_))
    ));
    tp.assert_audit_clean();
}

/// The audit is what the crash tests rely on, so show that it sees both kinds of damage:
/// a device the backend has but we have no record of, and a record whose device is gone.
#[test]
fn audit_reports_leaked_and_missing_ids() {
    let mut tp = TestPool::small("audit");
    let spec = small_spec(&tp.root);
    tp.pool()
        .snapshot(request("leak", None, DeviceKind::Active))
        .unwrap();
    let leaked = tp.pool().device(&name("leak")).unwrap();
    tp.close(false);
    {
        // Tamper with our records behind the engine's back.
        let store = thinpool::store::Store::open(&tp.root.join("pool.redb")).unwrap();
        store
            .write(|w| {
                w.remove_device(leaked.id)?;
                let mut ghost = leaked.clone();
                ghost.id = thinpool::ThinId::new(4242).unwrap();
                ghost.name = Some(name("ghost"));
                ghost.active = false;
                w.put_device(&ghost)
            })
            .unwrap();
    }
    tp.reopen(&spec);
    let report = tp.pool().audit().unwrap();
    assert_eq!(report.leaked, vec![leaked.id], "{report:?}");
    assert_eq!(
        report.missing,
        vec![thinpool::ThinId::new(4242).unwrap()],
        "{report:?}"
    );
    assert!(!report.is_clean());
}

#[test]
fn xfs_snapshots_mount_side_by_side() {
    skip_on_sim!("mkfs.xfs and two mounts");
    let root = pool_dir("xfs", false);
    let mut spec = small_spec(&root);
    spec.fs = Some(thinpool::FsType::Xfs);
    spec.base_size = Some(Bytes::mib(512)); // mkfs.xfs wants room for its log
    let mut tp = TestPool::open(&spec);
    tp.pool()
        .snapshot(request("a", None, DeviceKind::Active))
        .unwrap();
    tp.pool()
        .snapshot(request("b", None, DeviceKind::Active))
        .unwrap();
    let spec_a = tp.pool().activate(&name("a")).unwrap();
    assert_eq!(spec_a.fs_type, thinpool::FsType::Xfs);
    assert!(spec_a.options.iter().any(|o| o == "nouuid"), "{spec_a:?}");
    // Both carry the base filesystem's UUID; nouuid lets them mount at once.
    let a = tp.mount_spec("a", &spec_a);
    let b = tp.mount("b");
    write_file(&a.join("only-a"), b"a");
    assert!(!b.join("only-a").exists());
    tp.unmount(&a);
    tp.unmount(&b);
    tp.assert_audit_clean();
}

/// Operations on different devices from many threads at once: the records, the backend's
/// transaction id and the kernel must all agree afterwards.
#[test]
fn concurrent_operations_on_different_devices() {
    let tp = TestPool::small("concurrent");
    let pool = tp.pool();
    std::thread::scope(|s| {
        for t in 0..8 {
            s.spawn(move || {
                for i in 0..6 {
                    let n = format!("t{t}-{i}");
                    pool.snapshot(request(&n, None, DeviceKind::Active))
                        .unwrap();
                    pool.activate(&name(&n)).unwrap();
                    // Only committed snapshots are parents: commit it (active) first.
                    let l = format!("{n}-layer");
                    pool.commit(&name(&n), &name(&l), None).unwrap();
                    let v = format!("{n}-view");
                    pool.snapshot(request(&v, Some(&l), DeviceKind::View))
                        .unwrap();
                    if i % 2 == 0 {
                        pool.remove(&name(&v), RemoveOptions::default()).unwrap();
                        pool.remove(&name(&l), RemoveOptions::default()).unwrap();
                    }
                }
            });
        }
    });
    // 8 threads x 3 kept (device + view) + the base.
    assert_eq!(pool.devices().unwrap().len(), 8 * 3 * 2 + 1);
    let st = pool.status().unwrap();
    assert!(st.kernel.transaction_id > 0);
    tp.assert_audit_clean();
}

/// dm only (skipped natively by tests/run, run in the VM): a pool whose metadata carries the
/// kernel's needs_check flag is checked with thin_check before use, and comes back clean.
#[test]
fn dm_needs_check_runs_thin_check_on_open() {
    skip_on_sim!("a dm-only test (thin_check on the kernel's metadata)");
    assert_eq!(
        backend(),
        thinpool::BackendKind::Dm,
        "a dm-only test; run it in the VM"
    );
    let mut tp = TestPool::small("needs-check");
    let spec = small_spec(&tp.root);
    make_layer(&mut tp, "k", "layer", None, "f", b"survives the check");
    tp.close(true);
    let meta = tp.root.join("metadata");
    set_needs_check(&meta);
    assert_eq!(superblock_flags(&meta) & 1, 1);
    tp.reopen(&spec);
    let st = tp.pool().status().unwrap();
    assert!(!st.kernel.needs_check, "{st:?}");
    assert_eq!(st.kernel.mode, thinpool::PoolMode::Rw);
    assert_eq!(
        superblock_flags(&meta) & 1,
        0,
        "thin_check cleared the flag"
    );
    tp.pool()
        .snapshot(request("c", Some("layer"), DeviceKind::Active))
        .unwrap();
    let c = tp.mount("c");
    assert_eq!(read_file(&c.join("f")), b"survives the check");
    tp.unmount(&c);
    tp.assert_audit_clean();
}

/// dm-thin's metadata superblock: csum (le32) then flags (le32) in block 0 of 4 KiB; the
/// checksum is crc32c over bytes 4..4096, seeded with !0, xored with 160774.
fn set_needs_check(meta: &Path) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(meta)
        .unwrap();
    let mut sb = [0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    let flags = u32::from_le_bytes(sb[4..8].try_into().unwrap()) | 1;
    sb[4..8].copy_from_slice(&flags.to_le_bytes());
    let csum = crc32c(!0, &sb[4..]) ^ 160_774;
    sb[0..4].copy_from_slice(&csum.to_le_bytes());
    f.write_all_at(&sb, 0).unwrap();
    f.sync_all().unwrap();
}

fn superblock_flags(meta: &Path) -> u32 {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(meta).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 0).unwrap();
    u32::from_le_bytes(b[4..8].try_into().unwrap())
}

/// CRC-32C (Castagnoli), reflected, without the final inversion (the kernel's crc32c()).
fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// A mounted device: remove and deactivate refuse and change nothing, and a daemon restart
/// while it is mounted keeps it (the container using it keeps running).
#[test]
fn busy_devices_survive_remove_deactivate_and_restart() {
    let mut tp = TestPool::small("busy");
    let spec = small_spec(&tp.root);
    tp.pool()
        .snapshot(request("m", None, DeviceKind::Active))
        .unwrap();
    let dir = tp.open_target("m");
    dir.write("f", b"still here");
    let e = tp
        .pool()
        .remove(&name("m"), RemoveOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    let e = tp.pool().deactivate(&name("m")).unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    assert!(
        tp.pool().device(&name("m")).unwrap().active,
        "record still says active"
    );
    // Restart with the device mounted: open must succeed and keep it.
    let pool = tp.pool.take().unwrap();
    pool.close(false).unwrap();
    tp.pool = Some(Pool::open(&spec).expect("open with a mounted device"));
    assert_eq!(dir.read("f"), b"still here");
    // A deferred remove of a busy device waits in reclaim until it is unmounted.
    tp.pool()
        .remove(
            &name("m"),
            RemoveOptions {
                discard: false,
                deferred: true,
            },
        )
        .unwrap();
    assert_eq!(tp.pool().reclaim().unwrap(), 0, "busy device is not freed");
    tp.close_target(dir);
    assert_eq!(tp.pool().reclaim().unwrap(), 1);
    tp.assert_audit_clean();
}

/// `--backend auto`: dm where dm-thin works (the VM), reflink where it does not (the host),
/// with a reason to log.
#[test]
fn auto_backend_picks_what_the_host_supports() {
    let (kind, why) = thinpool::backend::detect();
    println!("auto picked {kind}: {why}");
    if on_sim() {
        // Never the test backend; which real one depends on the host.
        assert_ne!(kind, BackendKind::Sim, "{why}");
    } else {
        assert_eq!(kind, backend(), "{why}");
    }
    assert!(!why.is_empty());
}

// ---------------------------------------------------------------------------------------
// Space: growing the pool, the free-space guard, autoextension.

/// A 512 MiB pool (reflink's XFS needs at least 300 MiB) whose base device, 1 GiB, is larger
/// than the pool, so that one device can fill it.
fn space_spec(root: &Path) -> PoolSpec {
    PoolSpec {
        data_size: Some(Bytes::mib(512)),
        base_size: Some(Bytes::gib(1)),
        ..small_spec(root)
    }
}

fn grow_data(change: SizeChange) -> GrowRequest {
    GrowRequest {
        data: Some(change),
        ..GrowRequest::default()
    }
}

/// `e2fsck -f -y` on a device: a filesystem whose pool filled under it saw write errors
/// (ext4 aborts its journal); after the grow, the check replays the journal and repairs
/// what the failed writes left, as an operator would. 0 or 1 (errors fixed) is fine.
fn fsck(dev: &Path) {
    let out = Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(dev)
        .output()
        .expect("run e2fsck");
    let code = out.status.code();
    println!(
        "e2fsck exit {code:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        matches!(code, Some(0 | 1)),
        "e2fsck failed: {:?}",
        out.status
    );
}

/// Fill a pool from a mounted device until writes fail; the failure is prompt (dm:
/// error_if_no_space; reflink: the XFS's ENOSPC), the guard refuses new snapshots, a grow
/// brings the pool back to rw, and everything synced before the pool filled is intact.
#[test]
fn grow_full_pool_keeps_data_and_takes_new_writes() {
    skip_on_sim!("fills a filesystem until ENOSPC (sim devices never fill), then e2fsck");
    let mut tp = TestPool::open(&space_spec(&pool_dir("grow-full", false)));
    let st = tp.pool().status().unwrap();
    assert!(st.kernel.error_if_no_space, "{st:?}");
    assert_eq!(st.kernel.mode, PoolMode::Rw);
    tp.pool()
        .snapshot(request("ctr", None, DeviceKind::Active))
        .unwrap();
    let dev = tp.pool().activate(&name("ctr")).unwrap().source;
    let dir = tp.mount("ctr");

    let before = fill(&dir, "a", Bytes::gib(1), Duration::from_secs(900));
    let err = before
        .error
        .as_ref()
        .expect("1 GiB written into a 512 MiB pool without an error");
    println!(
        "pool full after {} files; {err} came {:?} after the last good fsync",
        before.files.len(),
        before.failed_after
    );
    assert!(
        before.failed_after < Duration::from_secs(30),
        "the write failed only after {:?}: writes queued on the full pool",
        before.failed_after
    );
    assert!(
        before.files.len() >= 60,
        "only {} files",
        before.files.len()
    );
    let st = tp.pool().status().unwrap();
    assert_eq!(st.kernel.mode, PoolMode::OutOfDataSpace, "{st:?}");

    // The guard refuses new devices on the full pool and says how to grow it.
    for kind in [DeviceKind::Active, DeviceKind::View] {
        let e = tp
            .pool()
            .snapshot(request("refused", None, kind))
            .unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
        assert!(e.to_string().contains("thinctl pool grow --data"), "{e}");
    }
    assert!(
        tp.pool()
            .devices()
            .unwrap()
            .iter()
            .all(|d| d.name.as_ref().map(|n| n.as_str()) != Some("refused"))
    );

    // Grow while the device is still mounted.
    let outcome = tp
        .pool()
        .grow(grow_data(SizeChange::By(Bytes::mib(512))))
        .expect("grow");
    assert_eq!(outcome.before.data, Bytes::mib(512));
    assert_eq!(outcome.after.data, Bytes::gib(1));
    assert_eq!(outcome.after.metadata, outcome.before.metadata);
    let st = tp.pool().status().unwrap();
    assert_eq!(
        st.kernel.mode,
        PoolMode::Rw,
        "rw again after the grow: {st:?}"
    );
    assert!(st.kernel.data_total > Bytes::mib(900), "{st:?}");
    if backend() == BackendKind::Dm {
        assert_eq!(st.kernel.data_total, Bytes::gib(1));
    }
    assert_eq!(tp.pool().settings().data_size, Bytes::gib(1));
    assert_eq!(
        fs::metadata(&tp.pool().paths().data_file).unwrap().len(),
        Bytes::gib(1).0
    );

    // The filesystem saw write errors: unmount, check, mount, and everything synced before
    // the pool filled is there.
    tp.unmount(&dir);
    fsck(&dev);
    let dir = tp.mount("ctr");
    verify_files(&dir, &before.files);
    let after = fill(&dir, "b", Bytes::mib(64), Duration::from_secs(300));
    assert!(after.error.is_none(), "write after grow: {:?}", after.error);
    tp.unmount(&dir);
    let dir = tp.mount("ctr");
    verify_files(&dir, &before.files);
    verify_files(&dir, &after.files);
    tp.unmount(&dir);

    // New devices are allowed again.
    tp.pool()
        .snapshot(request("after-grow", None, DeviceKind::Active))
        .expect("snapshot after the grow");
    let c = tp.pool().counters();
    assert_eq!(c.guard_rejections, 2, "{c:?}");
    assert_eq!(c.grows, 1, "{c:?}");
    assert!(c.mode_changes >= 2, "rw -> out_of_data_space -> rw: {c:?}");
    tp.assert_audit_clean();
}

/// Is `dir` on ext4 (whose 16 TiB file size limit makes a forced huge grow fail harmlessly)?
fn on_ext4(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|s| s.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC)
        .unwrap_or(false)
}

#[test]
fn grow_refusals_are_clear_and_change_nothing() {
    let tp = TestPool::open(&space_spec(&pool_dir("grow-refusals", false)));
    let pool = tp.pool();
    let total = pool.status().unwrap().kernel.data_total;
    let expect_invalid = |req: GrowRequest, words: &str| {
        let e = pool.grow(req).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{req:?}: {e}");
        assert!(e.to_string().contains(words), "{req:?}: {e}");
    };
    expect_invalid(GrowRequest::default(), "nothing to grow");
    expect_invalid(grow_data(SizeChange::To(Bytes::mib(256))), "never shrink");
    expect_invalid(grow_data(SizeChange::To(Bytes::mib(512))), "never shrink");
    expect_invalid(grow_data(SizeChange::By(Bytes::kib(4))), "block size");

    // More than the host filesystem holds: refused, with the numbers.
    let huge = grow_data(SizeChange::By(Bytes::tib(100)));
    let e = pool.grow(huge).unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("100.0 TiB") && msg.contains("free") && msg.contains("force"),
        "{msg}"
    );
    if on_ext4(&tp.root) {
        // force skips that check; ext4 then refuses a file that large, cleanly.
        let e = pool
            .grow(GrowRequest {
                force: true,
                ..huge
            })
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("maximum file size"), "{e}");
    }

    // Metadata: dm grows it; reflink's is the XFS log, which cannot grow online.
    let meta = GrowRequest {
        metadata: Some(SizeChange::By(Bytes::mib(64))),
        ..GrowRequest::default()
    };
    match backend() {
        BackendKind::Reflink => {
            let e = pool.grow(meta).unwrap_err();
            assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
            assert!(e.to_string().contains("XFS log"), "{e}");
        }
        BackendKind::Dm | BackendKind::Sim => {
            let out = pool.grow(meta).expect("grow metadata");
            assert_eq!(out.after.metadata, Bytes::mib(128));
            let st = pool.status().unwrap();
            assert_eq!(st.kernel.metadata_total, Bytes::mib(128), "{st:?}");
            assert_eq!(pool.settings().metadata_size, Bytes::mib(128));
            expect_invalid(
                GrowRequest {
                    metadata: Some(SizeChange::To(Bytes::gib(17))),
                    ..GrowRequest::default()
                },
                "maximum",
            );
        }
    }

    // None of the refusals changed the data size.
    assert_eq!(pool.settings().data_size, Bytes::mib(512));
    assert_eq!(
        fs::metadata(&pool.paths().data_file).unwrap().len(),
        Bytes::mib(512).0
    );
    assert_eq!(pool.status().unwrap().kernel.data_total, total);
    tp.assert_audit_clean();
}

/// A grow while a device is mounted and written; the new size survives a daemon restart
/// (devices still active and mounted) and a teardown (what a reboot removes), opened with the
/// creation-time spec; a spec asking for more than the pool has is a conflict.
#[test]
fn grow_online_survives_restart_and_teardown() {
    let mut tp = TestPool::open(&space_spec(&pool_dir("grow-restart", false)));
    let spec = space_spec(&tp.root);
    tp.pool()
        .snapshot(request("ctr", None, DeviceKind::Active))
        .unwrap();
    let dir = tp.open_target("ctr");
    let one = dir.fill("one", Bytes::mib(32), Duration::from_secs(300));
    assert!(one.error.is_none(), "{:?}", one.error);
    tp.pool()
        .grow(grow_data(SizeChange::By(Bytes::mib(256))))
        .expect("grow while mounted");
    let two = dir.fill("two", Bytes::mib(32), Duration::from_secs(300));
    assert!(two.error.is_none(), "{:?}", two.error);
    let grown = Bytes::mib(768);
    let check = |pool: &Pool| {
        assert_eq!(pool.settings().data_size, grown);
        assert_eq!(
            fs::metadata(&pool.paths().data_file).unwrap().len(),
            grown.0
        );
        let st = pool.status().unwrap();
        assert!(st.kernel.data_total > Bytes::mib(700), "{st:?}");
        if backend() == BackendKind::Dm {
            assert_eq!(st.kernel.data_total, grown, "{st:?}");
        }
    };
    check(tp.pool());

    // Daemon restart with the device mounted.
    tp.pool.take().unwrap().close(false).unwrap();
    tp.pool = Some(Pool::open(&spec).expect("reopen after grow, creation-time spec"));
    check(tp.pool());
    dir.verify(&one.files);
    dir.verify(&two.files);
    tp.close_target(dir);

    // Everything a reboot removes is gone; the pool is assembled from its files.
    tp.close(true);
    tp.reopen(&spec);
    check(tp.pool());
    let dir = tp.open_target("ctr");
    dir.verify(&one.files);
    dir.verify(&two.files);
    tp.close_target(dir);
    tp.close(false);

    let mut bigger = spec.clone();
    bigger.data_size = Some(Bytes::gib(1));
    let e = Pool::open(&bigger)
        .err()
        .expect("a spec above the pool's size");
    assert!(
        matches!(
            e,
            Error::SettingConflict {
                setting: "data_size",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("grow"), "{e}");
    tp.reopen(&spec);
    tp.assert_audit_clean();
}

/// Phase 1 grows a pool (a device mounted) and writes on both sides of the grow; phase 2,
/// after a reboot (natively: a teardown), finds the new size and the data.
#[test]
fn reboot_keeps_grown_pool_size() {
    let root = pool_dir("reboot-grow", true);
    let spec = space_spec(&root);
    let sums_file = root.join("checksums.json");
    let phase = reboot_phase();
    let grown = Bytes::mib(768);
    if phase.is_none() || phase == Some(1) {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let mut tp = TestPool::open(&spec);
        tp.keep_dir();
        tp.pool()
            .snapshot(request("ctr", None, DeviceKind::Active))
            .unwrap();
        let dir = tp.open_target("ctr");
        let one = dir.fill("one", Bytes::mib(32), Duration::from_secs(300));
        let out = tp
            .pool()
            .grow(grow_data(SizeChange::To(grown)))
            .expect("grow");
        assert_eq!(out.after.data, grown);
        let two = dir.fill("two", Bytes::mib(32), Duration::from_secs(300));
        assert!(
            one.error.is_none() && two.error.is_none(),
            "{one:?} {two:?}"
        );
        tp.close_target(dir);
        let files: Vec<_> = one.files.into_iter().chain(two.files).collect();
        fs::write(&sums_file, serde_json::to_vec(&files).unwrap()).unwrap();
        tp.close(phase.is_none());
        if phase == Some(1) {
            return;
        }
    }
    let files: Vec<(String, String)> =
        serde_json::from_slice(&fs::read(&sums_file).expect("phase 1 left checksums")).unwrap();
    let mut tp = TestPool::open(&spec);
    assert_eq!(tp.pool().settings().data_size, grown);
    let st = tp.pool().status().unwrap();
    assert!(st.kernel.data_total > Bytes::mib(700), "{st:?}");
    if backend() == BackendKind::Dm {
        assert_eq!(st.kernel.data_total, grown, "{st:?}");
    }
    assert_eq!(st.kernel.mode, PoolMode::Rw);
    let dir = tp.open_target("ctr");
    dir.verify(&files);
    let more = dir.fill("three", Bytes::mib(32), Duration::from_secs(300));
    assert!(more.error.is_none(), "{more:?}");
    tp.close_target(dir);
    tp.assert_audit_clean();
}

fn op_grow(root: &Path) {
    child_pool(root)
        .grow(grow_data(SizeChange::By(Bytes::gib(1))))
        .unwrap();
}

/// After a crash mid-grow, open finishes the grow: the pool has the new size in the kernel
/// and in our records, and works.
fn check_grown(tp: &mut TestPool) {
    let grown = Bytes::gib(5); // small_spec's 4 GiB + 1 GiB
    assert_eq!(tp.pool().settings().data_size, grown);
    let st = tp.pool().status().unwrap();
    assert!(st.kernel.data_total > Bytes::gib(4), "{st:?}");
    if backend() == BackendKind::Dm {
        assert_eq!(st.kernel.data_total, grown, "{st:?}");
    }
    check_pool_usable(tp);
}

#[test]
fn crash_grow_after_file() {
    crash_case(
        "crash_grow_after_file",
        "grow:after_file",
        Some(setup_victim),
        op_grow,
        check_grown,
    );
}

#[test]
fn crash_grow_after_file_and_power_loss() {
    crash_case_then(
        "crash_grow_after_file_and_power_loss",
        "grow:after_file",
        Some(setup_victim),
        op_grow,
        true, // dm: the pool is created at the file's length; reflink: the XFS grown at open
        check_grown,
    );
}

#[test]
fn crash_grow_after_kernel() {
    crash_case(
        "crash_grow_after_kernel",
        "grow:after_kernel",
        Some(setup_victim),
        op_grow,
        check_grown,
    );
}

/// The sim backend's own crash points: between a device file made durable and the metadata
/// naming it (the next open removes the stray file, reconcile rolls the create back), and
/// between the metadata forgetting a device and its file's removal (the next open removes
/// the file, reconcile finishes the delete). Sim only: the others have no such points.
fn check_sim_files_match_metadata(tp: &mut TestPool) {
    let kernel: serde_json::Value =
        serde_json::from_slice(&fs::read(tp.root.join("sim/kernel.json")).unwrap()).unwrap();
    let mut ids: Vec<String> = kernel["devices"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut files: Vec<String> = fs::read_dir(tp.root.join("sim/devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    files.sort();
    assert_eq!(files, ids, "device files and the sim metadata agree");
}

#[test]
fn sim_crash_create_between_file_and_metadata() {
    if !on_sim() {
        return report_skip("a test of the sim backend's own crash point");
    }
    crash_case(
        "sim_crash_create_between_file_and_metadata",
        "sim:create_after_file",
        Some(setup_layer),
        op_snapshot,
        |tp| {
            check_sim_files_match_metadata(tp);
            check_new_rolled_back(tp);
        },
    );
}

#[test]
fn sim_crash_delete_between_metadata_and_file() {
    if !on_sim() {
        return report_skip("a test of the sim backend's own crash point");
    }
    crash_case(
        "sim_crash_delete_between_metadata_and_file",
        "sim:delete_after_metadata",
        Some(setup_victim),
        op_remove,
        |tp| {
            check_sim_files_match_metadata(tp);
            check_victim_gone(tp);
        },
    );
}

/// With min_free_space at 50%, a half-full pool refuses snapshots; the setting can be
/// changed on reopen, and with the guard off the same snapshot is made.
#[test]
fn guard_refuses_snapshots_below_min_free_space() {
    let root = pool_dir("guard", false);
    let mut spec = space_spec(&root);
    spec.min_free_space = Some(Percent(50));
    let mut tp = TestPool::open(&spec);
    tp.pool()
        .snapshot(request("ctr", None, DeviceKind::Active))
        .expect("an empty pool is above the guard");
    let dir = tp.open_target("ctr");
    let filled = dir.fill("f", Bytes::mib(300), Duration::from_secs(600));
    assert!(filled.error.is_none(), "{filled:?}");
    tp.close_target(dir);
    let st = tp.pool().status().unwrap();
    assert!(
        st.kernel.data_used.0 * 2 > st.kernel.data_total.0,
        "the pool should be more than half full: {st:?}"
    );
    for kind in [DeviceKind::Active, DeviceKind::View] {
        let e = tp.pool().snapshot(request("new", None, kind)).unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("50%") && msg.contains("thinctl pool grow --data +SIZE"),
            "{msg}"
        );
    }
    assert_eq!(tp.pool().counters().guard_rejections, 2);
    tp.assert_audit_clean();

    spec.min_free_space = Some(Percent(0));
    tp.reopen(&spec);
    assert_eq!(tp.pool().settings().min_free_space, Percent(0));
    tp.pool()
        .snapshot(request("new", None, DeviceKind::Active))
        .expect("the guard is off");
    tp.assert_audit_clean();
}

/// With autoextend at 70%, writing past 70% makes the pool grow by itself: on dm through the
/// kernel's low-water-mark event alone (the monitor's poll period is longer than the test),
/// on reflink through the poll. The low water mark follows the threshold.
#[test]
fn autoextend_grows_pool_past_threshold() {
    let root = pool_dir("autoextend", false);
    let policy = AutoextendPolicy {
        threshold: Percent(70),
        percent: Percent(20),
        max: Some(Bytes::gib(2)),
    };
    let spec = PoolSpec {
        autoextend_data: Some(policy),
        ..space_spec(&root)
    };
    let mut tp = TestPool::open(&spec);
    let size = Bytes::mib(512);
    let st = tp.pool().status().unwrap();
    let bs = st.block_size;
    let lwm = |total: Bytes| policy.low_water_mark(DataBlocks(total.0 / bs.0)).bytes(bs);
    assert_eq!(
        st.kernel.low_water_mark,
        lwm(st.kernel.data_total),
        "{st:?}"
    );
    tp.pool()
        .snapshot(request("ctr", None, DeviceKind::Active))
        .unwrap();
    let dir = tp.open_target("ctr");

    let engine = Arc::new(tp.pool.take().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let period = match backend() {
        BackendKind::Dm => Duration::from_secs(3600),
        BackendKind::Reflink | BackendKind::Sim => Duration::from_secs(1),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let monitor = rt.spawn(thinpool::run_autoextend(
        AsyncPool::from_engine(engine.clone()),
        period,
        async {
            let _ = stopped.await;
        },
    ));

    // Write up to 75% (past the threshold, short of full), then wait for the grow: at most a
    // minute after usage was seen above the threshold.
    let mut files = Vec::new();
    let start = Instant::now();
    let mut crossed: Option<Instant> = None;
    let grown = loop {
        if engine.settings().data_size > size {
            break true;
        }
        if start.elapsed() > Duration::from_secs(600)
            || crossed.is_some_and(|t| t.elapsed() > Duration::from_secs(60))
        {
            break false;
        }
        let st = engine.status().unwrap().kernel;
        if crossed.is_none() && st.data_used.0 * 100 > st.data_total.0 * 70 {
            crossed = Some(Instant::now());
        }
        if st.data_used.0 * 100 < st.data_total.0 * 75 {
            let f = dir.fill(
                &format!("f{}-", files.len()),
                Bytes(FILL_FILE as u64),
                Duration::from_secs(120),
            );
            assert!(f.error.is_none(), "{f:?}");
            files.extend(f.files);
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let waited = crossed.map(|t| t.elapsed());
    stop.send(()).unwrap();
    rt.block_on(monitor).unwrap();
    drop(rt);
    tp.pool = Some(Arc::try_unwrap(engine).unwrap_or_else(|_| panic!("the monitor kept the pool")));
    assert!(
        grown,
        "the pool did not autoextend ({waited:?} after crossing 70%)"
    );
    println!("autoextended {waited:?} after usage was seen above 70%");

    let pool = tp.pool();
    let c = pool.counters();
    assert!(c.autoextends >= 1 && c.grows == c.autoextends, "{c:?}");
    assert_eq!(c.autoextend_failures, 0, "{c:?}");
    if backend() == BackendKind::Dm {
        assert!(
            c.pool_events >= 1,
            "the low-water event woke the monitor: {c:?}"
        );
    }
    let new = pool.settings().data_size;
    assert!(
        new >= Bytes(size.0 + Percent(20).of(size).0),
        "grew by at least 20%: {new}"
    );
    assert!(new <= Bytes::gib(2) && new.0.is_multiple_of(bs.0), "{new}");
    let st = pool.status().unwrap();
    assert_eq!(st.kernel.mode, PoolMode::Rw);
    assert!(
        st.kernel.data_used.0 * 100 <= st.kernel.data_total.0 * 70,
        "under the threshold again: {st:?}"
    );
    assert_eq!(
        st.kernel.low_water_mark,
        lwm(st.kernel.data_total),
        "recomputed: {st:?}"
    );
    dir.verify(&files);
    tp.close_target(dir);
    tp.assert_audit_clean();
}
