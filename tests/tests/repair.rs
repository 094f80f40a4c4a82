//! Repair, backups and restore (docs/recovery.md): a live backup under writes restores to
//! exactly its records; retention; restore refuses a damaged backup and a pool in use;
//! repair of a healthy pool changes nothing; a kill at every backup and restore failpoint
//! leaves a pool that opens, and the command run again finishes. `dm_*` tests (VM only):
//! damaged kernel metadata is refused at open naming the repair, `repair` (and
//! `--auto-repair`) fixes it with every layer's content intact, and a kill at every repair
//! failpoint leaves a pool a second repair fixes.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};

use thinpool::engine::{self, MaintenanceReport};
use thinpool::store::Store;
use thinpool::{BackendKind, DeviceKind, DeviceRecord, DeviceState, Error, Pool, PoolSpec, ThinId};
use thinpool_tests::*;

/// In a child process started by [`child`]: the pool root it works on.
fn child_root() -> Option<PathBuf> {
    std::env::var_os("THINPOOL_REPAIR_CHILD").map(PathBuf::from)
}

/// Runs test `test` again in a child process on `root` with `failpoint` armed; `extra` is
/// passed in `THINPOOL_REPAIR_ARG` (a backup's path).
fn child(test: &str, root: &Path, failpoint: &str, extra: &Path) -> ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("THINPOOL_REPAIR_CHILD", root)
        .env("THINPOOL_REPAIR_ARG", extra)
        .env("THINPOOL_FAILPOINTS", failpoint)
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

/// A committed layer `key` holding file `f` with `content`, made from `parent`.
fn layer(tp: &mut TestPool, key: &str, parent: Option<&str>, content: &[u8]) {
    let active = format!("{key}-active");
    tp.pool()
        .snapshot(request(&active, parent, DeviceKind::Active))
        .unwrap();
    tp.put_file(&active, "f", content);
    tp.pool().commit(&name(&active), &name(key), None).unwrap();
}

/// File `f` of committed layer `key`, read through a fresh view of it.
fn layer_content(tp: &mut TestPool, key: &str) -> Vec<u8> {
    let view = format!("{key}-check");
    tp.pool()
        .snapshot(request(&view, Some(key), DeviceKind::View))
        .unwrap();
    let data = tp.get_file(&view, "f");
    tp.pool()
        .remove(&name(&view), thinpool::RemoveOptions::default())
        .unwrap();
    data
}

/// What a restore must bring back exactly: identity and place of every record.
fn essentials(recs: &[DeviceRecord]) -> BTreeSet<(ThinId, Option<String>, String, Option<ThinId>)> {
    recs.iter()
        .map(|r| {
            (
                r.id,
                r.name.as_ref().map(|n| n.as_str().to_string()),
                format!("{:?}/{:?}/{}", r.kind, r.state, r.size),
                r.parent,
            )
        })
        .collect()
}

/// The records in a backup's store, read from a copy (opening the backup's own file could
/// change it, and its checksum with it).
fn backup_records(backup: &Path) -> Vec<DeviceRecord> {
    let copy = backup.with_extension("records-check.redb");
    std::fs::copy(backup.join("pool.redb"), &copy).unwrap();
    let recs = Store::open(&copy).unwrap().read(|r| r.devices()).unwrap();
    std::fs::remove_file(&copy).unwrap();
    recs
}

fn open(spec: &PoolSpec) -> Pool {
    Pool::open(spec).unwrap_or_else(|e| panic!("open pool: {e}"))
}

/// Backup directories under the pool root, oldest first.
fn backups(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(engine::backups_dir(root))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn backup_under_writes_then_restore_gives_the_backups_records() {
    let root = pool_dir("repair-backup", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    layer(&mut tp, "l1", None, b"layer one");
    layer(&mut tp, "l2", Some("l1"), b"layer two");
    let stop = AtomicBool::new(false);
    let (backup, made) = std::thread::scope(|s| {
        let pool = tp.pool();
        let writer = s.spawn(|| {
            let mut made = Vec::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = format!("w{i}");
                let rec = pool
                    .snapshot(request(&n, Some("l2"), DeviceKind::View))
                    .unwrap();
                made.push(rec.id);
                if i % 3 == 2 {
                    // Removals too, so the cut also has to hold deletes back.
                    pool.remove(&name(&format!("w{}", i - 1)), Default::default())
                        .unwrap();
                }
            }
            made
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let b = pool.backup(3).expect("backup while writing");
        std::thread::sleep(std::time::Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (b, writer.join().unwrap())
    });
    assert!(made.len() > 2, "the writer made {} devices", made.len());
    let in_backup = backup_records(&backup.path);
    assert_eq!(in_backup.len() as u64, backup.devices);
    let after: Vec<DeviceRecord> = tp.pool().devices().unwrap();
    assert_ne!(
        essentials(&after),
        essentials(&in_backup),
        "the writer changed nothing after the backup: the test proves nothing"
    );
    tp.close(true);

    let report = engine::restore(&spec, &backup.path).expect("restore");
    assert!(report.store_replaced);
    tp.pool = Some(open(&spec));
    let restored = tp.pool().devices().unwrap();
    // The cut may catch a remove or a create half done (its record Deleting or Creating):
    // the open after the restore finishes or undoes it, as after a crash.
    let settled: Vec<DeviceRecord> = in_backup
        .iter()
        .filter(|r| r.state == DeviceState::Ready)
        .cloned()
        .collect();
    assert_eq!(
        essentials(&restored),
        essentials(&settled),
        "the restored records are the backup's"
    );
    let ours: BTreeSet<ThinId> = settled.iter().map(|r| r.id).collect();
    let audit = tp.pool().audit().unwrap();
    match backend() {
        // The kernel metadata came back from the same cut: nothing leaked.
        BackendKind::Dm => assert!(report.leaked.is_empty() && audit.is_clean(), "{audit:?}"),
        // Devices made after the backup are still there, now without records: leaked,
        // as open leaves them (the audit says so); devices removed after it are lost.
        _ => {
            let now: BTreeSet<ThinId> = after.iter().map(|r| r.id).collect();
            let removed: BTreeSet<ThinId> = ours.difference(&now).copied().collect();
            let lost: BTreeSet<ThinId> = report.lost.iter().map(|l| l.id).collect();
            assert_eq!(lost, removed, "{report:?}");
            let later: BTreeSet<ThinId> = after
                .iter()
                .map(|r| r.id)
                .filter(|id| !ours.contains(id))
                .collect();
            assert_eq!(
                report.leaked.iter().copied().collect::<BTreeSet<_>>(),
                later
            );
            assert_eq!(audit.leaked, report.leaked);
            // A device removed after the backup is lost: its record stays, quarantined,
            // until the snapshot is removed (the audit shows it missing).
            let set = |v: &[ThinId]| v.iter().copied().collect::<BTreeSet<_>>();
            assert_eq!(set(&audit.missing), lost, "{audit:?}");
            assert_eq!(set(&audit.quarantined), lost, "{audit:?}");
        }
    }
    if backend() == BackendKind::Dm {
        assert!(report.lost.is_empty(), "{report:?}");
    }
    assert_eq!(layer_content(&mut tp, "l1"), b"layer one");
    assert_eq!(layer_content(&mut tp, "l2"), b"layer two");
    // The files replaced were kept.
    for k in &report.kept {
        assert!(k.exists(), "{} kept", k.display());
    }
}

#[test]
fn backups_keep_the_newest_n() {
    let root = pool_dir("repair-keep", false);
    let tp = TestPool::open(&small_spec(&root));
    // A backup a crash interrupted: its temporary directory goes at the next backup.
    let stale = engine::backups_dir(&root).join(".tmp-19700101T000000Z");
    std::fs::create_dir_all(&stale).unwrap();
    let mut made = Vec::new();
    for i in 0..4 {
        tp.pool()
            .snapshot(request(&format!("d{i}"), None, DeviceKind::Active))
            .unwrap();
        made.push(tp.pool().backup(2).unwrap());
    }
    let names: Vec<String> = made.iter().map(|b| b.created.clone()).collect();
    assert_eq!(backups(&root), names[2..].to_vec(), "made {names:?}");
    assert!(!stale.exists());
    assert_eq!(made[3].removed, vec![made[1].path.clone()]);
    assert!(made[3].devices > made[0].devices);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&made[3].path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "backup directory mode");
}

#[test]
fn restore_refuses_a_damaged_backup_and_a_pool_in_use() {
    let root = pool_dir("repair-refuse", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    tp.pool()
        .snapshot(request("a", None, DeviceKind::Active))
        .unwrap();
    let b = tp.pool().backup(5).unwrap();
    let err = engine::restore(&spec, &b.path).expect_err("restore while the pool is open");
    assert!(
        matches!(err, Error::FailedPrecondition(_)) && err.to_string().contains("running"),
        "{err}"
    );
    tp.close(true);
    let before = std::fs::read_dir(&root).unwrap().count();
    // One flipped byte in the store copy.
    let f = b.path.join("pool.redb");
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&f, &bytes).unwrap();
    let err = engine::restore(&spec, &b.path).expect_err("restore of a damaged backup");
    assert!(
        matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("damaged"),
        "{err}"
    );
    let err = engine::restore(&spec, &root.join("nothing-here")).expect_err("not a backup");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        before,
        "a refused restore changes nothing"
    );
    tp.pool = Some(open(&spec));
    tp.assert_audit_clean();
}

#[test]
fn repair_of_a_healthy_pool_changes_nothing() {
    let root = pool_dir("repair-healthy", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    layer(&mut tp, "l1", None, b"healthy");
    let err = engine::repair(&spec).expect_err("repair while the pool is open");
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    let recs = tp.pool().devices().unwrap();
    tp.close(true);
    let listing = |root: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let files = listing(&root);
    for _ in 0..2 {
        let r: MaintenanceReport = engine::repair(&spec).expect("repair");
        assert!(!r.metadata_replaced && r.kept.is_empty(), "{r:?}");
        assert!(r.lost.is_empty() && r.leaked.is_empty(), "{r:?}");
        match backend() {
            BackendKind::Dm => assert_eq!(r.metadata_healthy, Some(true)),
            _ => assert!(r.summary.contains("no kernel metadata to repair"), "{r:?}"),
        }
        assert_eq!(
            listing(&root),
            files,
            "repair of a healthy pool made or removed files"
        );
    }
    tp.pool = Some(open(&spec));
    assert_eq!(essentials(&tp.pool().devices().unwrap()), essentials(&recs));
    assert_eq!(layer_content(&mut tp, "l1"), b"healthy");
    tp.assert_audit_clean();
}

#[test]
fn repair_reports_devices_the_backend_lost() {
    // The kernel metadata losing a device is what repair reports; on reflink the same
    // reconcile runs, and a device file that is gone is such a loss. (sim keeps its ids in
    // a file of its own, which a lost device file does not change.)
    if backend() != BackendKind::Reflink {
        report_skip("reflink only");
        return;
    }
    let root = pool_dir("repair-lost", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    let gone = tp
        .pool()
        .snapshot(request("gone", None, DeviceKind::Active))
        .unwrap();
    tp.pool()
        .snapshot(request("kept", None, DeviceKind::Active))
        .unwrap();
    let file = root.join("mnt/devices").join(gone.id.to_string());
    assert!(file.exists(), "device file {}", file.display());
    std::fs::remove_file(&file).unwrap();
    tp.close(true);
    let r = engine::repair(&spec).expect("repair");
    assert_eq!(r.lost.len(), 1, "{r:?}");
    assert_eq!(r.lost[0].id, gone.id);
    assert_eq!(r.lost[0].name.as_ref().map(|n| n.as_str()), Some("gone"));
    tp.pool = Some(open(&spec));
    let q = tp.pool().quarantined().unwrap();
    assert_eq!(q.iter().map(|q| q.id).collect::<Vec<_>>(), vec![gone.id]);
    // Removing the lost snapshot clears it.
    tp.pool().remove(&name("gone"), Default::default()).unwrap();
    tp.pool().reclaim().unwrap();
    tp.assert_audit_clean();
}

/// Backup, restore: the failpoints a kill can hit, on this backend.
fn restore_points() -> Vec<&'static str> {
    let mut v = vec!["restore:after_keep"];
    if backend() == BackendKind::Dm {
        v.extend(["restore:after_thin_restore", "restore:after_metadata"]);
    }
    v.push("restore:after_store");
    v
}

#[test]
fn restore_killed_at_each_step_finishes_when_run_again() {
    const TEST: &str = "restore_killed_at_each_step_finishes_when_run_again";
    if let Some(root) = child_root() {
        let backup = PathBuf::from(std::env::var_os("THINPOOL_REPAIR_ARG").unwrap());
        let r = engine::restore(&small_spec(&root), &backup);
        panic!("the failpoint did not fire: {r:?}");
    }
    let root = pool_dir("repair-restore-kill", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    layer(&mut tp, "l1", None, b"before the backup");
    let b = tp.pool().backup(5).unwrap();
    let in_backup = essentials(&backup_records(&b.path));
    for point in restore_points() {
        // Something to undo: a layer made after the backup.
        layer(&mut tp, point, Some("l1"), b"after the backup");
        tp.close(true);
        assert_aborted(child(TEST, &root, point, &b.path), point);
        engine::restore(&spec, &b.path).unwrap_or_else(|e| panic!("restore after {point}: {e}"));
        tp.pool = Some(open(&spec));
        assert_eq!(
            essentials(&tp.pool().devices().unwrap()),
            in_backup,
            "after a kill at {point}"
        );
        assert_eq!(layer_content(&mut tp, "l1"), b"before the backup");
    }
}

#[test]
fn backup_killed_at_each_point_leaves_a_pool_that_opens() {
    const TEST: &str = "backup_killed_at_each_point_leaves_a_pool_that_opens";
    if let Some(root) = child_root() {
        let pool = open(&small_spec(&root));
        let r = pool.backup(5);
        panic!("the failpoint did not fire: {r:?}");
    }
    let root = pool_dir("repair-backup-kill", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    layer(&mut tp, "l1", None, b"content");
    let mut points = vec![];
    if backend() == BackendKind::Dm {
        points.push("backup:after_reserve");
    }
    points.extend(["backup:after_dump", "backup:after_store"]);
    for point in points {
        tp.close(false);
        assert_aborted(child(TEST, &root, point, Path::new("")), point);
        tp.pool = Some(open(&spec));
        tp.assert_audit_clean();
        // No half-made backup counts as one, and the next backup works (dm: the metadata
        // snapshot the kill left held was released at open).
        assert!(
            backups(&root).iter().all(|b| b.starts_with(".tmp-")),
            "{:?}",
            backups(&root)
        );
        let b = tp.pool().backup(5).unwrap();
        assert_eq!(
            backups(&root),
            vec![b.created.clone()],
            "after a kill at {point}"
        );
        std::fs::remove_dir_all(&b.path).unwrap();
    }
    assert_eq!(layer_content(&mut tp, "l1"), b"content");
}

/// Zeroes the metadata space map's index block of a dm metadata file (its block number is
/// in the superblock's `metadata_space_map_root`, at byte 208): thin_check fails on its
/// checksum, and thin_repair rebuilds every space map from the btrees, so no device is
/// lost. (A block found by its header alone may be a stale copy the pool no longer uses.)
fn damage_space_map(metadata: &Path) -> u64 {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(metadata)
        .unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact(&mut sb).unwrap();
    let index = u64::from_le_bytes(sb[208..216].try_into().unwrap());
    let blocks = f.metadata().unwrap().len() / 4096;
    assert!(
        index > 0 && index < blocks,
        "index block {index} of {blocks}"
    );
    f.seek(SeekFrom::Start(index * 4096)).unwrap();
    f.write_all(&[0u8; 4096]).unwrap();
    f.sync_all().unwrap();
    index
}

fn thin_check_passes(file: &Path) -> bool {
    Command::new("thin_check")
        .args(["-q".as_ref(), file.as_os_str()])
        .status()
        .unwrap()
        .success()
}

#[test]
fn dm_repair_damaged_metadata() {
    if backend() != BackendKind::Dm {
        report_skip("dm only (kernel metadata)");
        return;
    }
    let root = pool_dir("dm-repair", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    layer(&mut tp, "l1", None, b"one");
    layer(&mut tp, "l2", Some("l1"), b"two");
    let recs = essentials(&tp.pool().devices().unwrap());
    tp.close(true);
    let meta = root.join("metadata");
    let block = damage_space_map(&meta);
    assert!(
        !thin_check_passes(&meta),
        "zeroed block {block}: thin_check still passes"
    );

    let err = Pool::open(&spec).err().expect("open of damaged metadata");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("thinctl pool repair --root {}", root.display())),
        "{msg}"
    );
    let r = engine::repair(&spec).expect("repair");
    assert!(
        r.metadata_replaced && r.metadata_healthy == Some(false),
        "{r:?}"
    );
    assert!(r.lost.is_empty() && r.leaked.is_empty(), "{r:?}");
    assert!(
        r.kept[0].exists() && !thin_check_passes(&r.kept[0]),
        "damaged copy kept"
    );
    assert!(thin_check_passes(&meta));
    // Run again: healthy, nothing changed.
    let again = engine::repair(&spec).expect("repair again");
    assert!(
        !again.metadata_replaced && again.metadata_healthy == Some(true),
        "{again:?}"
    );

    tp.pool = Some(open(&spec));
    assert_eq!(essentials(&tp.pool().devices().unwrap()), recs);
    assert_eq!(layer_content(&mut tp, "l1"), b"one");
    assert_eq!(layer_content(&mut tp, "l2"), b"two");
    tp.assert_audit_clean();

    // --auto-repair: the open repairs instead of refusing.
    tp.close(true);
    damage_space_map(&meta);
    tp.pool = Some(open(&PoolSpec {
        auto_repair: true,
        ..spec.clone()
    }));
    assert_eq!(layer_content(&mut tp, "l2"), b"two");
    tp.assert_audit_clean();
}

#[test]
fn dm_repair_killed_at_each_step_repairs_when_run_again() {
    if backend() != BackendKind::Dm {
        report_skip("dm only (kernel metadata)");
        return;
    }
    const TEST: &str = "dm_repair_killed_at_each_step_repairs_when_run_again";
    if let Some(root) = child_root() {
        let r = engine::repair(&small_spec(&root));
        panic!("the failpoint did not fire: {r:?}");
    }
    let root = pool_dir("dm-repair-kill", false);
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    layer(&mut tp, "l1", None, b"survives");
    let recs = essentials(&tp.pool().devices().unwrap());
    let meta = root.join("metadata");
    for point in [
        "repair:after_repair",
        "repair:after_check",
        "repair:after_keep",
        "repair:after_swap",
    ] {
        tp.close(true);
        damage_space_map(&meta);
        assert_aborted(child(TEST, &root, point, Path::new("")), point);
        // Old or new metadata in place, never none.
        assert!(meta.exists(), "after a kill at {point}");
        let r = engine::repair(&spec).unwrap_or_else(|e| panic!("repair after {point}: {e}"));
        assert!(r.lost.is_empty(), "{r:?}");
        assert!(thin_check_passes(&meta), "after {point}");
        tp.pool = Some(open(&spec));
        assert_eq!(
            essentials(&tp.pool().devices().unwrap()),
            recs,
            "after {point}"
        );
        assert_eq!(layer_content(&mut tp, "l1"), b"survives", "after {point}");
        tp.assert_audit_clean();
    }
}
