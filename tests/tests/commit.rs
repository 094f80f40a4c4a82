//! Commit as containerd's snapshotters do it: of a mounted snapshot (flushed, deactivated
//! at the last close), atomic against Mounts and against a second Commit, and a failed
//! Commit changes nothing. Also: no `lost+found` in any snapshot, for new and existing
//! pools and after a filesystem grow. Runs on both backends (dm in the VM).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use thinpool::{Bytes, DeviceKind, DeviceRecord, Error, MountSpec, Pool, SnapshotRequest, ThinId};
use thinpool_tests::*;

/// Whether the kernel device node `dev` (`/dev/loopN`, `/dev/dm-N`) is read-only. Never on
/// sim, whose nodes are plain files (read-only activation is not simulated).
fn read_only(dev: &Path) -> bool {
    if on_sim() {
        return false;
    }
    let name = dev.file_name().expect("device name").to_string_lossy();
    let ro = fs::read_to_string(format!("/sys/class/block/{name}/ro"))
        .unwrap_or_else(|e| panic!("read ro of {name}: {e}"));
    ro.trim() == "1"
}

/// Waits up to 5 s for `id` to have no active device (a deferred deactivation happens at the
/// last close, which the kernel may finish a moment after the unmount returns).
fn wait_inactive(pool: &Pool, id: ThinId) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if !pool.active_devices().unwrap().contains_key(&id) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn record(pool: &Pool, n: &str) -> DeviceRecord {
    pool.device(&name(n))
        .unwrap_or_else(|e| panic!("device {n}: {e}"))
}

/// The active snapshot stays mounted through its Commit: what was written before (not
/// even fsynced) is in the committed layer and in its children, the mount keeps working,
/// and the device goes away at the unmount.
#[test]
fn commit_of_a_mounted_snapshot() {
    let mut tp = TestPool::small("commit-mounted");
    tp.pool()
        .snapshot(request("a", None, DeviceKind::Active))
        .unwrap();
    let id = record(tp.pool(), "a").id;
    let dir = tp.open_target("a");
    if let Target::Mounted(dir) = &dir {
        // Page cache only: the commit must flush it.
        fs::write(dir.join("before"), b"written before the commit").unwrap();
        fs::create_dir(dir.join("d")).unwrap();
    } else {
        dir.write("before", b"written before the commit");
    }
    let rec = tp
        .pool()
        .commit(&name("a"), &name("layer"), None)
        .expect("commit of a mounted snapshot");
    assert_eq!(rec.kind, DeviceKind::Committed);
    assert!(!rec.active);
    assert_eq!(
        rec.created_ns, rec.updated_ns,
        "containerd: Created == Updated"
    );
    // Still usable by whoever has it mounted.
    dir.write("after", b"written after the commit");
    assert_eq!(dir.read("after"), b"written after the commit");

    // A child and a read-only view of the new layer see everything written before.
    tp.pool()
        .snapshot(request("child", Some("layer"), DeviceKind::Active))
        .unwrap();
    tp.pool()
        .snapshot(request("view", Some("layer"), DeviceKind::View))
        .unwrap();
    for n in ["child", "view"] {
        // The view's device is read-only: it mounts only if the layer's journal is clean.
        let m = tp.open_target(n);
        assert_eq!(m.read("before"), b"written before the commit", "{n}");
        if let Target::Mounted(m) = &m {
            assert!(m.join("d").is_dir(), "{n}");
        }
        tp.close_target(m);
    }
    tp.close_target(dir);
    assert!(
        wait_inactive(tp.pool(), id),
        "the committed layer's device is gone after the last close"
    );
    tp.assert_audit_clean();
}

/// A Commit that fails (the name is taken, or is the key itself) changes nothing: the
/// active snapshot keeps its device, mounted or not, and its record (probe D4).
#[test]
fn failed_commit_changes_nothing() {
    let mut tp = TestPool::small("commit-fails");
    for n in ["x1", "x2", "m"] {
        tp.pool()
            .snapshot(request(n, None, DeviceKind::Active))
            .unwrap();
    }
    tp.pool().commit(&name("x2"), &name("taken"), None).unwrap();
    let spec = tp.pool().activate(&name("x1")).unwrap();
    let dir = tp.open_target("m");
    dir.write("f", b"mounted");
    for key in ["x1", "m"] {
        let before = record(tp.pool(), key);
        let dev_before = tp.pool().active_devices().unwrap().get(&before.id).cloned();
        assert!(dev_before.is_some(), "{key} is active");
        for target in ["taken", key] {
            let e = tp
                .pool()
                .commit(&name(key), &name(target), None)
                .unwrap_err();
            assert!(
                matches!(e, Error::AlreadyExists(_)),
                "{key} -> {target}: {e}"
            );
        }
        let after = record(tp.pool(), key);
        assert_eq!(
            format!("{before:?}"),
            format!("{after:?}"),
            "{key}'s record"
        );
        assert_eq!(
            tp.pool().active_devices().unwrap().get(&before.id),
            dev_before.as_ref(),
            "{key} keeps its device node"
        );
        assert!(
            !read_only(dev_before.as_ref().unwrap()),
            "{key} stays writable"
        );
    }
    assert_eq!(
        tp.pool().activate(&name("x1")).unwrap().source,
        spec.source,
        "x1's mounts are still the same device"
    );
    dir.write("g", b"still writable");
    tp.close_target(dir);
    tp.assert_audit_clean();
}

/// Two Commits of one key at once: exactly one wins, the other gets NotFound (the key is
/// gone), and the winner's layer is not renamed by the loser (review #5).
#[test]
fn concurrent_commits_of_one_key() {
    let tp = TestPool::small("commit-twice");
    let pool = tp.pool();
    for round in 0..50 {
        let key = format!("k{round}");
        pool.snapshot(SnapshotRequest {
            activate: round % 2 == 0,
            ..request(&key, None, DeviceKind::Active)
        })
        .unwrap();
        let barrier = Barrier::new(2);
        let results: Vec<(String, Result<DeviceRecord, Error>)> = std::thread::scope(|s| {
            let hs: Vec<_> = ["a", "b"]
                .into_iter()
                .map(|side| {
                    let (key, barrier) = (&key, &barrier);
                    s.spawn(move || {
                        let target = format!("{key}-{side}");
                        barrier.wait();
                        let r = pool.commit(&name(key), &name(&target), None);
                        (target, r)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<&String> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(t, _)| t)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        for (target, r) in &results {
            match r {
                Ok(rec) => assert_eq!(rec.name.as_ref().unwrap().as_str(), target),
                Err(e) => {
                    assert!(matches!(e, Error::NotFound(_)), "round {round}: {e}");
                    assert!(matches!(
                        pool.device(&name(target)),
                        Err(Error::NotFound(_))
                    ));
                }
            }
        }
        let rec = record(pool, won[0]);
        assert_eq!(rec.kind, DeviceKind::Committed);
        assert!(matches!(pool.device(&name(&key)), Err(Error::NotFound(_))));
    }
    tp.assert_audit_clean();
}

/// Mounts racing Commit (issue 10, probe D3): whatever the order, a committed layer never
/// has a writable device, and a Mounts that wins returns the active device, which the
/// Commit then deactivates. THINPOOL_TEST_RACE_ROUNDS rounds (default 1,000).
#[test]
fn mounts_racing_commit_never_leave_a_writable_layer() {
    let rounds: usize = std::env::var("THINPOOL_TEST_RACE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let tp = TestPool::small("commit-race");
    let pool = tp.pool();
    let (mut mounts_won, mut commits_first) = (0usize, 0usize);
    for round in 0..rounds {
        let key = format!("r{round}");
        let layer = format!("r{round}-c");
        // Inactive to start with, so that Mounts has a device to activate.
        let id = pool
            .snapshot(request(&key, None, DeviceKind::Active))
            .unwrap()
            .id;
        let barrier = Barrier::new(3);
        let (mounted, committed) = std::thread::scope(|s| {
            let mounters: Vec<_> = (0..2)
                .map(|_| {
                    let (key, barrier) = (&key, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let mut got: Vec<Result<MountSpec, Error>> = Vec::new();
                        for _ in 0..3 {
                            got.push(pool.mounts(&name(key)));
                        }
                        got
                    })
                })
                .collect();
            barrier.wait();
            let committed = pool.commit(&name(&key), &name(&layer), None);
            let mounted: Vec<_> = mounters
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect();
            (mounted, committed)
        });
        let rec = committed.unwrap_or_else(|e| panic!("round {round}: commit: {e}"));
        assert_eq!(rec.id, id);
        for m in &mounted {
            match m {
                Ok(spec) => {
                    mounts_won += 1;
                    assert!(!spec.options.iter().any(|o| o == "ro"), "{spec:?}");
                }
                Err(Error::NotFound(_)) => commits_first += 1,
                Err(e) => panic!("round {round}: mounts: {e}"),
            }
        }
        let rec = record(pool, &layer);
        assert_eq!(rec.kind, DeviceKind::Committed);
        assert!(
            !rec.active,
            "round {round}: the layer's record says inactive"
        );
        if let Some(dev) = pool.active_devices().unwrap().get(&id) {
            assert!(
                read_only(dev),
                "round {round}: committed layer {layer} has a writable device {}",
                dev.display()
            );
        }
    }
    eprintln!(
        "{rounds} rounds: {mounts_won} Mounts answered before the commit, {commits_first} after"
    );
    tp.assert_audit_clean();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every new snapshot is empty (no `lost+found`), also when its filesystem was grown (the
/// grow's e2fsck makes one), and its children and views too.
#[test]
fn snapshots_have_no_lost_found() {
    skip_on_sim!("lists the filesystems of snapshots through mounts");
    let mut tp = TestPool::small("no-lost-found");
    tp.pool()
        .snapshot(request("a", None, DeviceKind::Active))
        .unwrap();
    tp.pool()
        .snapshot(SnapshotRequest {
            size: Some(Bytes::mib(512)),
            ..request("big", None, DeviceKind::Active)
        })
        .unwrap();
    tp.pool()
        .snapshot(request("v", None, DeviceKind::View))
        .unwrap();
    for n in ["a", "big", "v"] {
        let m = tp.mount(n);
        assert_eq!(entries(&m), Vec::<String>::new(), "{n} is empty");
        tp.unmount(&m);
    }
    tp.pool().commit(&name("big"), &name("l"), None).unwrap();
    tp.pool()
        .snapshot(SnapshotRequest {
            size: Some(Bytes::mib(768)),
            ..request("bigger", Some("l"), DeviceKind::Active)
        })
        .unwrap();
    let m = tp.mount("bigger");
    assert_eq!(entries(&m), Vec::<String>::new(), "a grown child is empty");
    tp.unmount(&m);
}

/// A pool made before the base lost its `lost+found` (simulated: one is put back into the
/// base through the backend) is fixed when it opens: new snapshots are empty. Snapshots
/// made before keep what they had.
#[test]
fn an_existing_pools_base_is_fixed_at_open() {
    skip_on_sim!("mounts the base device's filesystem");
    let mut tp = TestPool::small("fix-base");
    let spec = small_spec(&tp.root);
    tp.pool()
        .snapshot(request("old", None, DeviceKind::Active))
        .unwrap();
    let settings = tp.pool().settings();
    let base = tp
        .pool()
        .devices()
        .unwrap()
        .into_iter()
        .find(|r| r.kind == DeviceKind::Base)
        .expect("base record");
    tp.pool.take().unwrap().close(false).unwrap();
    {
        let b = thinpool::backend::open(&thinpool::backend::PoolPaths::new(&tp.root), &settings)
            .expect("open backend");
        let dev = b.activate(base.id, base.size, false).unwrap();
        let mnt: PathBuf = tp.root.join("base-mnt");
        fs::create_dir_all(&mnt).unwrap();
        let spec = MountSpec {
            source: dev,
            fs_type: settings.fs,
            options: Vec::new(),
        };
        thinpool::mount::mount(&spec, &mnt).unwrap();
        fs::create_dir(mnt.join("lost+found")).unwrap();
        thinpool::mount::unmount(&mnt).unwrap();
        b.deactivate(base.id).unwrap();
    }
    tp.pool = Some(Pool::open(&spec).expect("reopen"));
    tp.pool()
        .snapshot(request("new", None, DeviceKind::Active))
        .unwrap();
    let m = tp.mount("new");
    assert_eq!(entries(&m), Vec::<String>::new(), "new snapshots are empty");
    tp.unmount(&m);
    tp.assert_audit_clean();
}

/// Timestamps as containerd's storage keeps them: Created == Updated on create; Commit sets
/// both to one new instant; a label update moves only Updated.
#[test]
fn timestamps_follow_containerd() {
    let tp = TestPool::small("timestamps");
    let pool = tp.pool();
    for (n, kind) in [("a", DeviceKind::Active), ("v", DeviceKind::View)] {
        let rec = pool
            .snapshot(SnapshotRequest {
                activate: true,
                ..request(n, None, kind)
            })
            .unwrap();
        assert_eq!(rec.created_ns, rec.updated_ns, "{n}");
        let again = record(pool, n);
        assert_eq!(again.created_ns, again.updated_ns, "{n} as stored");
    }
    let prepared = record(pool, "a").created_ns;
    std::thread::sleep(Duration::from_millis(2));
    let c = pool.commit(&name("a"), &name("c"), None).unwrap();
    assert!(c.created_ns > prepared, "a commit is a new snapshot");
    assert_eq!(c.created_ns, c.updated_ns);
    std::thread::sleep(Duration::from_millis(2));
    let labels = BTreeMap::from([("k".to_string(), "v".to_string())]);
    let u = pool.set_labels(&name("c"), labels).unwrap();
    assert_eq!(u.created_ns, c.created_ns);
    assert!(u.updated_ns > c.updated_ns);
}

/// Only committed snapshots are parents, in the engine too (review D4); containerd's storage
/// answers InvalidArgument. Empty label values are dropped, as containerd's storage does.
#[test]
fn parents_must_be_committed_and_empty_labels_are_dropped() {
    let tp = TestPool::small("parent-rule");
    let pool = tp.pool();
    pool.snapshot(request("act", None, DeviceKind::Active))
        .unwrap();
    pool.snapshot(request("vw", None, DeviceKind::View))
        .unwrap();
    for parent in ["act", "vw"] {
        for kind in [DeviceKind::Active, DeviceKind::View] {
            let e = pool
                .snapshot(request("child", Some(parent), kind))
                .unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{parent}: {e}");
        }
    }
    let labels = BTreeMap::from([
        ("empty".to_string(), String::new()),
        ("k".to_string(), "v".to_string()),
    ]);
    let rec = pool
        .snapshot(SnapshotRequest {
            labels: labels.clone(),
            ..request("l", None, DeviceKind::Active)
        })
        .unwrap();
    assert_eq!(rec.labels.keys().collect::<Vec<_>>(), ["k"]);
    let rec = pool.set_labels(&name("l"), labels.clone()).unwrap();
    assert_eq!(rec.labels.keys().collect::<Vec<_>>(), ["k"]);
    let rec = pool.commit(&name("l"), &name("lc"), Some(labels)).unwrap();
    assert_eq!(rec.labels.keys().collect::<Vec<_>>(), ["k"]);
}
