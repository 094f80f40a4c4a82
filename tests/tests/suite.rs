//! The integration suite. Every test runs against the backend `THINPOOL_TEST_BACKEND` names:
//! natively on reflink, and on the kernel's dm-thin inside the VM (`tests/vm/run`).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use thinpool::{
    Bytes, DeviceKind, Error, Pool, PoolSettings, PoolSpec, RemoveOptions, SnapshotRequest,
};
use thinpool_tests::*;

/// Makes a committed layer `name` on top of `parent`, holding `file` with `data`.
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
    let dir = tp.mount(key);
    write_file(&dir.join(file), data);
    tp.unmount(&dir);
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
    // Actual disk use is in MiB: the formatted 10 GiB base writes its inode tables once, and
    // on reflink the metadata file holds the XFS log (128 MiB, written by mkfs.xfs).
    assert!(
        data_alloc < Bytes::mib(1024).0,
        "data file uses {}",
        Bytes(data_alloc)
    );
    assert!(
        meta_alloc < Bytes::mib(160).0,
        "metadata file uses {}",
        Bytes(meta_alloc)
    );
    assert_eq!(st.base_size, PoolSettings::DEFAULT_BASE_SIZE);
    tp.assert_audit_clean();
}

#[test]
fn layer_chain_container_and_view() {
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
    assert!(
        !tp.pool().audit().unwrap().is_clean(),
        "the pending delete shows as unfinished"
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
    let dir = tp.mount("a");
    let busy = tp.pool().deactivate(&name("a")).unwrap_err();
    assert!(matches!(busy, Error::FailedPrecondition(_)), "{busy}");
    tp.unmount(&dir);
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
        thinpool::BackendKind::Reflink => thinpool::BackendKind::Dm,
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
    let dir = tp.mount("u");
    write_file(&dir.join("big"), &pattern(7, 32 << 20));
    tp.unmount(&dir);
    let after = tp.pool().usage(&name("u")).unwrap();
    println!("usage before {before}, after writing 32 MiB {after}");
    assert!(
        after.0 >= before.0 + (30 << 20),
        "usage {before} -> {after}"
    );
}

#[test]
fn larger_snapshot_grows_its_filesystem() {
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

#[test]
fn snapshot_of_an_active_mounted_origin() {
    let mut tp = TestPool::small("active-origin");
    tp.pool()
        .snapshot(request("origin", None, DeviceKind::Active))
        .unwrap();
    let dir = tp.mount("origin");
    write_file(&dir.join("before"), b"before the snapshot");
    // The origin stays mounted and active; the backend suspends it around the snapshot.
    tp.pool()
        .snapshot(request("snap", Some("origin"), DeviceKind::Active))
        .unwrap();
    write_file(&dir.join("after"), b"after the snapshot");
    let s = tp.mount("snap");
    assert_eq!(read_file(&s.join("before")), b"before the snapshot");
    assert!(!s.join("after").exists());
    tp.unmount(&s);
    tp.unmount(&dir);
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
    let c = tp.mount("c");
    assert_eq!(read_file(&c.join("f1")), b"one");
    tp.unmount(&c);
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
        let dir = tp.mount("ctr");
        let mut sums = BTreeMap::new();
        for i in 0..8u64 {
            let data = pattern(100 + i, 256 << 10);
            write_file(&dir.join(format!("f{i}")), &data);
            sums.insert(format!("f{i}"), sha256_hex(&data));
        }
        sums.insert("layerfile".into(), sha256_hex(&pattern(1, 1 << 20)));
        tp.unmount(&dir);
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
    let c = tp.mount("ctr");
    for (file, sum) in &sums {
        assert_eq!(
            &sha256_hex(&read_file(&c.join(file))),
            sum,
            "{file} after reboot"
        );
    }
    tp.unmount(&c);
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
    let d = tp.mount("after");
    write_file(&d.join("x"), b"x");
    tp.unmount(&d);
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
                    let v = format!("{n}-view");
                    pool.snapshot(request(&v, Some(&n), DeviceKind::View))
                        .unwrap();
                    if i % 2 == 0 {
                        pool.remove(&name(&v), RemoveOptions::default()).unwrap();
                        pool.deactivate(&name(&n)).unwrap();
                        pool.remove(&name(&n), RemoveOptions::default()).unwrap();
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
    let dir = tp.mount("m");
    write_file(&dir.join("f"), b"still here");
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
    assert_eq!(read_file(&dir.join("f")), b"still here");
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
    tp.unmount(&dir);
    assert_eq!(tp.pool().reclaim().unwrap(), 1);
    tp.assert_audit_clean();
}

/// `--backend auto`: dm where dm-thin works (the VM), reflink where it does not (the host),
/// with a reason to log.
#[test]
fn auto_backend_picks_what_the_host_supports() {
    let (kind, why) = thinpool::backend::detect();
    println!("auto picked {kind}: {why}");
    assert_eq!(kind, backend(), "{why}");
    assert!(!why.is_empty());
}
