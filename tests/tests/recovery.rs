//! Open never locks the pool out: crashes in the middle of a filesystem grow or a `thin_ls`,
//! devices that cannot be reconciled or activated (quarantined, the rest served), a damaged
//! metadata store (refused with a clear error, nothing assembled), and the audit as a
//! consistent cut. Runs natively on reflink and in the VM on dm, as the suite does; `dm_*`
//! tests are VM-only.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use thinpool::store::Store;
use thinpool::{
    BackendKind, Bytes, DeviceKind, DeviceRecord, DeviceState, Error, FsType, Pool, PoolSpec,
    RemoveOptions, SnapshotRequest, ThinId,
};
use thinpool_tests::*;

/// In a child process started by [`child`]: the pool root it works on.
fn child_root() -> Option<PathBuf> {
    std::env::var_os("THINPOOL_RECOVERY_CHILD").map(PathBuf::from)
}

/// Runs this test again in a child process, on `root`, with `failpoints` armed
/// (`THINPOOL_FAILPOINTS`); returns how it ended.
fn child(test: &str, root: &Path, failpoints: &str) -> ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("THINPOOL_RECOVERY_CHILD", root)
        .env("THINPOOL_FAILPOINTS", failpoints)
        .status()
        .expect("spawn child")
}

fn assert_aborted(status: ExitStatus, failpoint: &str) {
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "child did not die at {failpoint}: {status}"
    );
}

/// The pool's settings, read from its store while no pool is open.
fn settings_of(root: &Path) -> thinpool::PoolSettings {
    let store = Store::open(&root.join("pool.redb")).unwrap();
    store.read(|r| r.settings()).unwrap()
}

/// The records of a closed pool.
fn records_of(root: &Path) -> Vec<DeviceRecord> {
    let store = Store::open(&root.join("pool.redb")).unwrap();
    store.read(|r| r.devices()).unwrap()
}

/// The device node of thin id `id`, active in the kernel, while no pool is open.
fn live_node(root: &Path, id: ThinId) -> PathBuf {
    match backend() {
        // No udev in the VM: the node is /dev/dm-<minor>, as the backend names it.
        BackendKind::Dm => {
            let name = format!("thinpool-{}-thin-{id}", settings_of(root).tag);
            let name = devicemapper::DmNameBuf::new(name).unwrap();
            let info = devicemapper::DM::new()
                .unwrap()
                .device_info(&devicemapper::DevId::Name(&name))
                .expect("the device is active");
            PathBuf::from(format!("/dev/dm-{}", info.device().minor))
        }
        BackendKind::Reflink => {
            let file = std::fs::canonicalize(root.join("mnt/devices").join(id.to_string()))
                .expect("device file");
            thinpool::loopback::find(&file)
                .unwrap()
                .expect("the device is attached")
        }
        BackendKind::Sim => root.join("sim/run").join(id.to_string()),
    }
}

/// Whether something is mounted at `path` (this process's view).
fn is_mounted(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let want = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Detaches scratch mounts under its path when dropped.
struct ClearScratch(PathBuf);

impl Drop for ClearScratch {
    fn drop(&mut self) {
        thinpool::mount::clear_scratch(&self.0);
    }
}

fn xfs_spec(root: &Path) -> PoolSpec {
    let mut spec = small_spec(root);
    spec.fs = Some(FsType::Xfs);
    spec.base_size = Some(Bytes::mib(512)); // mkfs.xfs wants room for its log
    spec
}

/// A record of an active device the backend does not have: on dm a thin id missing from
/// the kernel's metadata (the table load fails), on reflink a missing device file.
fn ghost(id: u32, name_: &str) -> DeviceRecord {
    DeviceRecord {
        id: ThinId::new(id).unwrap(),
        name: Some(name(name_)),
        kind: DeviceKind::Active,
        parent: None,
        size: Bytes::mib(256),
        state: DeviceState::Ready,
        active: true,
        labels: BTreeMap::new(),
        created_ns: 0,
        updated_ns: 0,
        usage: None,
    }
}

fn add_record(root: &Path, rec: &DeviceRecord) {
    let store = Store::open(&root.join("pool.redb")).unwrap();
    store.write(|w| w.put_device(rec)).unwrap();
}

/// Acceptance (issue 10): a crash in the middle of an XFS grow (a Prepare with a larger size
/// on an xfs pool) leaves the half-made device mounted at `<root>/resize/<id>`; the next
/// start removes that scratch mount, rolls the create back, and serves, with a clean audit.
#[test]
fn crash_during_xfs_grow_then_open_serves() {
    skip_on_sim!("mkfs.xfs, and an XFS grow on a scratch mount");
    const TEST: &str = "crash_during_xfs_grow_then_open_serves";
    let bigger = |n: &str| SnapshotRequest {
        size: Some(Bytes::mib(768)),
        activate: true,
        ..request(n, None, DeviceKind::Active)
    };
    if let Some(root) = child_root() {
        let pool = Pool::open(&xfs_spec(&root)).expect("child opens pool");
        pool.snapshot(bigger("big")).unwrap();
        panic!("failpoint grow:after_mount did not fire");
    }
    let root = pool_dir(TEST, false);
    let spec = xfs_spec(&root);
    let mut tp = TestPool::open(&spec);
    // Dropped before tp: a failed test leaves no scratch mount holding a device.
    let _scratch = ClearScratch(root.join("resize"));
    tp.close(false);
    assert_aborted(child(TEST, &root, "grow:after_mount"), "grow:after_mount");
    let creating: Vec<ThinId> = records_of(&root)
        .into_iter()
        .filter(|r| r.state == DeviceState::Creating)
        .map(|r| r.id)
        .collect();
    assert_eq!(creating.len(), 1, "the crash left one create half-done");
    let scratch = root.join("resize").join(creating[0].to_string());
    assert!(is_mounted(&scratch), "the crash left the scratch mount");

    tp.reopen(&spec);
    assert!(!is_mounted(&scratch), "open removed the scratch mount");
    assert!(!scratch.exists(), "and its mount point");
    assert!(tp.pool().quarantined().unwrap().is_empty());
    assert!(matches!(
        tp.pool().device(&name("big")),
        Err(Error::NotFound(_))
    ));
    tp.assert_audit_clean();
    // The key is free again, and a grow works.
    tp.pool()
        .snapshot(bigger("big"))
        .expect("retry after crash");
    let d = tp.mount("big");
    write_file(&d.join("f"), b"grown");
    tp.unmount(&d);
    tp.assert_audit_clean();
}

/// A device whose activation fails at open (dm: its thin id is missing from the kernel
/// metadata; reflink: its file is missing) is quarantined: the pool opens, serves the rest,
/// reports it in status and audit, keeps it quarantined across a restart, and releases it
/// when the device is removed.
#[test]
fn open_quarantines_a_device_that_cannot_activate() {
    let mut tp = TestPool::small("quarantine-activate");
    let spec = small_spec(&tp.root);
    tp.pool()
        .snapshot(request("ok", None, DeviceKind::Active))
        .unwrap();
    tp.pool().activate(&name("ok")).unwrap();
    tp.close(true); // as a reboot: nothing active
    let bad = ghost(4242, "bad");
    add_record(&tp.root, &bad);

    tp.reopen(&spec);
    let pool = tp.pool();
    let ok = pool.device(&name("ok")).unwrap();
    assert!(
        pool.active_devices().unwrap().contains_key(&ok.id),
        "the rest is served: ok is active again"
    );
    let q = pool.status().unwrap().quarantined;
    assert_eq!(
        q.iter().map(|q| q.id).collect::<Vec<_>>(),
        vec![bad.id],
        "{q:?}"
    );
    assert!(q[0].reason.starts_with("activate"), "{q:?}");
    let report = pool.audit().unwrap();
    assert_eq!(report.quarantined, vec![bad.id], "{report:?}");
    assert!(!report.is_clean());
    // New snapshots still work.
    pool.snapshot(request("new", None, DeviceKind::Active))
        .unwrap();
    // A retry that fails again keeps it quarantined; so does a restart.
    pool.reclaim().unwrap();
    assert_eq!(pool.quarantined().unwrap().len(), 1);
    tp.reopen(&spec);
    let q2 = tp.pool().quarantined().unwrap();
    assert_eq!(q2.len(), 1);
    assert_eq!(
        q2[0].since_ns, q[0].since_ns,
        "the first failure's time is kept"
    );
    // Removing the device takes it out of quarantine.
    tp.pool()
        .remove(&name("bad"), RemoveOptions::default())
        .unwrap();
    assert!(tp.pool().quarantined().unwrap().is_empty());
    tp.assert_audit_clean();
}

/// A half-created device that is busy at open (someone holds it open) cannot be rolled
/// back: it is quarantined instead of failing the open, its key stays taken, and reclaim
/// rolls it back once it is free.
#[test]
fn open_quarantines_a_busy_half_created_device() {
    const TEST: &str = "open_quarantines_a_busy_half_created_device";
    if let Some(root) = child_root() {
        let pool = Pool::open(&small_spec(&root)).expect("child opens pool");
        let mut req = request("new", None, DeviceKind::Active);
        req.activate = true;
        pool.snapshot(req).unwrap();
        panic!("failpoint create:after_activate did not fire");
    }
    let root = pool_dir(TEST, false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    tp.close(false);
    assert_aborted(
        child(TEST, &root, "create:after_activate"),
        "create:after_activate",
    );
    let id = records_of(&root)
        .into_iter()
        .find(|r| r.state == DeviceState::Creating)
        .expect("a half-done create")
        .id;
    let holder = if on_sim() {
        hold_sim_node(&live_node(&root, id))
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(live_node(&root, id))
            .expect("open the device")
    };

    tp.reopen(&spec);
    let pool = tp.pool();
    let q = pool.quarantined().unwrap();
    assert_eq!(q.iter().map(|q| q.id).collect::<Vec<_>>(), vec![id]);
    assert!(q[0].reason.contains("roll back"), "{q:?}");
    assert!(matches!(
        pool.device(&name("new")),
        Err(Error::FailedPrecondition(_))
    ));
    let report = pool.audit().unwrap();
    assert_eq!(report.unfinished, vec![id], "{report:?}");
    assert!(!report.is_clean());
    pool.snapshot(request("other", None, DeviceKind::Active))
        .expect("the rest is served");
    pool.reclaim().unwrap();
    assert_eq!(pool.quarantined().unwrap().len(), 1, "still busy");

    drop(holder);
    pool.reclaim().unwrap();
    assert!(pool.quarantined().unwrap().is_empty());
    assert!(matches!(pool.device(&name("new")), Err(Error::NotFound(_))));
    pool.snapshot(request("new", None, DeviceKind::Active))
        .expect("the key is free again");
    tp.assert_audit_clean();
}

/// A create whose outcome cannot be recorded is rolled back like a failed kernel step: the
/// key is usable again at once, without a restart (review #6).
#[test]
fn failed_outcome_write_rolls_back_the_create() {
    const TEST: &str = "failed_outcome_write_rolls_back_the_create";
    if let Some(root) = child_root() {
        let pool = Pool::open(&small_spec(&root)).expect("child opens pool");
        let mut req = request("new", None, DeviceKind::Active);
        req.activate = true;
        let e = pool.snapshot(req.clone()).unwrap_err();
        assert!(matches!(e, Error::Store { .. }), "{e}");
        assert!(matches!(pool.device(&name("new")), Err(Error::NotFound(_))));
        pool.snapshot(req).expect("the key is free at once");
        let report = pool.audit().unwrap();
        assert!(report.is_clean(), "{report:?}");
        pool.close(true).unwrap();
        return;
    }
    let root = pool_dir(TEST, false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    tp.close(false);
    let status = child(TEST, &root, "create:outcome_write=error");
    assert!(status.success(), "child failed: {status}");
    tp.reopen(&spec);
    tp.assert_audit_clean();
}

/// Two records with one name (a damaged or hand-edited store, probe D10) are refused at
/// open, with an error naming the store file and the repair path, and nothing assembled.
#[test]
fn duplicate_names_in_the_store_are_refused_at_open() {
    let mut tp = TestPool::small("store-dupname");
    let spec = small_spec(&tp.root);
    for n in ["m1", "c1"] {
        tp.pool()
            .snapshot(request(n, None, DeviceKind::Active))
            .unwrap();
    }
    tp.close(true);
    // As the probe did: rename c1 to m1 inside the record's JSON.
    let file = tp.root.join("pool.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    let (from, to) = (br#""name":"c1""#, br#""name":"m1""#);
    let mut edits = 0;
    for i in 0..bytes.len().saturating_sub(from.len()) {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            edits += 1;
        }
    }
    assert!(edits > 0, "found the record to edit");
    std::fs::write(&file, &bytes).unwrap();

    let e = match Pool::open(&spec) {
        Ok(_) => panic!("a store with duplicate names opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("pool.redb") && e.contains("both named \"m1\"") && e.contains("recovery"),
        "{e}"
    );
    if backend() == BackendKind::Reflink {
        assert!(!is_mounted(&tp.root.join("mnt")), "nothing was assembled");
    }
}

/// Damaged store pages make redb panic (a damaged page header: `unreachable!`/"invalid page
/// type") or fail (probe D9): open returns an error naming the store file and the repair
/// path, never a panic, and assembles nothing.
#[test]
fn damaged_store_pages_are_an_error_naming_the_store() {
    let mut tp = TestPool::small("store-pages");
    let spec = small_spec(&tp.root);
    for n in ["a", "b", "c"] {
        tp.pool()
            .snapshot(request(n, None, DeviceKind::Active))
            .unwrap();
    }
    tp.close(true);
    let file = tp.root.join("pool.redb");
    let good = std::fs::read(&file).unwrap();
    // Damage where the records are: the page holding record "b" (its header, then the bytes
    // before the record: the leaf's key and offset tables), as the probe did at fixed offsets.
    let rec = br#""name":"b""#;
    let at = (0..good.len() - rec.len())
        .find(|&i| &good[i..i + rec.len()] == rec)
        .expect("record b in the store file");
    let page = at & !4095;
    for (what, r) in [
        ("page header", page..page + 16),
        (
            "leaf tables",
            page + 16..at.saturating_sub(64).max(page + 32),
        ),
        ("record bytes", at - 8..at + 8),
    ] {
        let mut bytes = good.clone();
        for b in &mut bytes[r] {
            *b ^= 0xff;
        }
        std::fs::write(&file, &bytes).unwrap();
        let opened = std::panic::catch_unwind(|| Pool::open(&spec).map(|p| p.close(true)));
        match opened {
            Err(_) => panic!("{what}: open panicked"),
            Ok(Ok(_)) => panic!("{what}: the damaged store opened"),
            Ok(Err(e)) => {
                let e = e.to_string();
                eprintln!("{what}: {e}");
                assert!(
                    e.contains("metadata store") && e.contains("pool.redb"),
                    "{what}: {e}"
                );
                assert!(e.contains("docs/recovery.md"), "{what}: {e}");
                if backend() == BackendKind::Reflink {
                    assert!(
                        !is_mounted(&tp.root.join("mnt")),
                        "{what}: nothing assembled"
                    );
                }
            }
        }
    }
    std::fs::write(&file, &good).unwrap();
    tp.reopen(&spec);
    tp.assert_audit_clean();
}

/// A removal that waits for its device to be unmounted (deferred) is pending, not a
/// problem: the audit stays clean (probe N3).
#[test]
fn pending_removal_keeps_the_audit_clean() {
    let mut tp = TestPool::small("audit-pending");
    tp.pool()
        .snapshot(request("m", None, DeviceKind::Active))
        .unwrap();
    let id = tp.pool().device(&name("m")).unwrap().id;
    let d = tp.open_target("m");
    let deferred = RemoveOptions {
        discard: false,
        deferred: true,
    };
    tp.pool().remove(&name("m"), deferred).unwrap();
    assert_eq!(tp.pool().reclaim().unwrap(), 0, "still mounted");
    let report = tp.pool().audit().unwrap();
    assert_eq!(report.pending, vec![id], "{report:?}");
    assert!(report.is_clean(), "{report:?}");
    tp.close_target(d);
    assert_eq!(tp.pool().reclaim().unwrap(), 1);
    let report = tp.pool().audit().unwrap();
    assert!(report.pending.is_empty() && report.is_clean(), "{report:?}");
}

/// The audit is a consistent cut: creates and removes running beside it never show up as
/// leaked or missing ids (review #9).
#[test]
fn audit_is_a_consistent_cut_under_load() {
    let tp = TestPool::small("audit-cut");
    let pool = tp.pool();
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        for t in 0..2 {
            let stop = stop.clone();
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let n = format!("w{t}-{i}");
                    pool.snapshot(request(&n, None, DeviceKind::Active))
                        .unwrap();
                    pool.remove(&name(&n), RemoveOptions::default()).unwrap();
                    i += 1;
                }
            });
        }
        let audits = if backend() == BackendKind::Dm {
            20
        } else {
            200
        };
        let mut bad = Vec::new();
        for _ in 0..audits {
            let r = pool.audit().unwrap();
            if !r.is_clean() {
                bad.push(r);
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(
            bad.is_empty(),
            "{} of {audits} audits unclean: {:?}",
            bad.len(),
            bad.first()
        );
    });
    tp.assert_audit_clean();
}

/// The base device mounted by someone (an operator looking at it) does not stop the pool
/// from opening: its filesystem UUID is read from the live node (review #38).
#[test]
fn open_reads_the_uuid_of_a_live_base() {
    skip_on_sim!("mounts the base device's filesystem");
    let mut tp = TestPool::small("live-base");
    let spec = small_spec(&tp.root);
    tp.close(false);
    let paths = thinpool::backend::PoolPaths::new(&tp.root);
    let settings = settings_of(&tp.root);
    let base = {
        let store = Store::open(&paths.store_file).unwrap();
        store.read(|r| r.base()).unwrap().unwrap()
    };
    let backend = thinpool::backend::open(&paths, &settings).unwrap();
    let dev = backend.activate(base.id, settings.base_size, true).unwrap();
    drop(backend);
    let mnt = tp.root.join("mnt-base");
    std::fs::create_dir_all(&mnt).unwrap();
    let ro = thinpool::MountSpec {
        source: dev,
        fs_type: settings.fs,
        options: vec!["ro".into()],
    };
    thinpool::mount::mount(&ro, &mnt).unwrap();
    let opened = Pool::open(&spec);
    thinpool::mount::unmount(&mnt).unwrap();
    tp.pool = Some(opened.expect("open with the base mounted"));
    tp.assert_audit_clean();
}

/// Acceptance (issue 10), dm: a crash inside `thin_ls`, between reserving the metadata
/// snapshot and releasing it, leaves the snapshot held in the pool's metadata; the next
/// start releases it, and the audit works and is clean (review #4).
#[test]
fn dm_crash_inside_thin_ls_then_open_serves() {
    skip_on_sim!("a dm-only test (thin_ls)");
    const TEST: &str = "dm_crash_inside_thin_ls_then_open_serves";
    if let Some(root) = child_root() {
        let pool = Pool::open(&small_spec(&root)).expect("child opens pool");
        let _ = pool.audit();
        panic!("failpoint thin_ls:after_reserve did not fire");
    }
    let root = pool_dir(TEST, false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    tp.pool()
        .snapshot(request("a", None, DeviceKind::Active))
        .unwrap();
    tp.pool().commit(&name("a"), &name("a-c"), None).unwrap();
    tp.close(false);
    assert_aborted(
        child(TEST, &root, "thin_ls:after_reserve"),
        "thin_ls:after_reserve",
    );
    tp.reopen(&spec);
    tp.assert_audit_clean();
    tp.pool()
        .snapshot(request("b", Some("a-c"), DeviceKind::Active))
        .expect("serves");
    tp.assert_audit_clean();
}

/// dm: a metadata snapshot held by someone else while the pool is open (a stray `dmsetup
/// message ... reserve_metadata_snap`) does not break the audit: thin_ls releases it and
/// retries once.
#[test]
fn dm_audit_releases_a_stray_metadata_snapshot() {
    skip_on_sim!("a dm-only test (dm metadata snapshots)");
    let tp = TestPool::small("dm-stray-snap");
    let tag = tp.pool().settings().tag;
    let dm = devicemapper::DM::new().unwrap();
    let pool_name = devicemapper::DmNameBuf::new(format!("thinpool-{tag}-pool")).unwrap();
    dm.target_msg(
        &devicemapper::DevId::Name(&pool_name),
        None,
        "reserve_metadata_snap",
    )
    .unwrap();
    tp.assert_audit_clean();
    tp.assert_audit_clean();
}
