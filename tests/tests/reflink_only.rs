//! Tests of the reflink backend through the engine: pools of reflinked files on a
//! loop-mounted XFS. They need root, loop devices and XFS; they run on the host disk
//! (`THINPOOL_TEST_DIR`, else `/var/tmp/thinpool-tests`), never on tmpfs, because the loop
//! devices use direct I/O.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use thinpool_tests::iobench::AlignedBuf;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tempfile::TempDir;
use thinpool::{
    BackendKind, Bytes, DeviceKind, DeviceName, ErrorKind, FsType, MountSpec, Pool, PoolMode,
    PoolSpec, RemoveOptions, SnapshotRequest,
};

const MIB: u64 = 1 << 20;

fn test_dir() -> PathBuf {
    let dir = std::env::var_os("THINPOOL_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/thinpool-tests"));
    fs::create_dir_all(&dir).expect("create test directory");
    dir
}

fn spec(root: &Path) -> PoolSpec {
    PoolSpec {
        root: root.to_path_buf(),
        backend: Some(BackendKind::Reflink),
        data_size: Some(Bytes::gib(4)),
        metadata_size: Some(Bytes::mib(64)),
        base_size: Some(Bytes::gib(1)),
        ..PoolSpec::default()
    }
}

fn name(s: &str) -> DeviceName {
    DeviceName::new(s).unwrap()
}

/// A pool in a temporary directory. Dropping it unmounts what the test mounted and tears the
/// pool down, even when the test failed.
struct Fixture {
    dir: Option<TempDir>,
    pool: Option<Pool>,
    mounts: Vec<PathBuf>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("reflink-")
            .tempdir_in(test_dir())
            .expect("create pool directory");
        let pool = Pool::open(&spec(&dir.path().join("pool"))).expect("create pool");
        Fixture {
            dir: Some(dir),
            pool: Some(pool),
            mounts: Vec::new(),
        }
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("pool is open")
    }

    fn root(&self) -> PathBuf {
        self.dir.as_ref().unwrap().path().join("pool")
    }

    /// A snapshot of `parent` (the base device when `None`).
    fn snapshot(&self, n: &str, parent: Option<&str>, kind: DeviceKind) {
        self.pool()
            .snapshot(SnapshotRequest {
                name: name(n),
                parent: parent.map(name),
                kind,
                size: None,
                labels: BTreeMap::new(),
                activate: false,
            })
            .unwrap_or_else(|e| panic!("snapshot {n}: {e}"));
    }

    /// Activates `n` and mounts it under the test directory.
    fn mount(&mut self, n: &str) -> (MountSpec, PathBuf) {
        let spec = self.pool().activate(&name(n)).expect("activate");
        let target = self.dir.as_ref().unwrap().path().join(format!("m-{n}"));
        fs::create_dir_all(&target).unwrap();
        mount_spec(&spec, &target);
        self.mounts.push(target.clone());
        (spec, target)
    }

    fn umount(&mut self, target: &Path) {
        umount2(target, MntFlags::empty()).expect("unmount");
        self.mounts.retain(|m| m != target);
    }

    /// Tears the pool down as a reboot would, then opens it again.
    fn reboot(&mut self) {
        assert!(self.mounts.is_empty(), "unmount before a reboot");
        self.pool.take().unwrap().close(true).expect("teardown");
        self.pool = Some(Pool::open(&spec(&self.root())).expect("reopen pool"));
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            if let Err(e) = umount2(&m, MntFlags::empty()) {
                eprintln!("cleanup: unmount {}: {e}", m.display());
            }
        }
        let torn_down = match self.pool.take() {
            Some(pool) => pool
                .close(true)
                .map_err(|e| eprintln!("cleanup: teardown: {e}")),
            None => Ok(()),
        };
        if torn_down.is_err() {
            // Something may still be mounted inside: leave the directory alone.
            if let Some(dir) = self.dir.take() {
                eprintln!("cleanup: leaving {}", dir.keep().display());
            }
        }
    }
}

fn mount_spec(spec: &MountSpec, target: &Path) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &spec.options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            o => data.push(o),
        }
    }
    let fs = spec.fs_type.to_string();
    mount(
        Some(&spec.source),
        target,
        Some(fs.as_str()),
        flags,
        Some(data.join(",").as_str()),
    )
    .unwrap_or_else(|e| {
        panic!(
            "mount {} at {}: {e}",
            spec.source.display(),
            target.display()
        )
    });
}

/// Writes `len` bytes of pseudo-random data (not zeros, so nothing can skip them) and fsyncs.
fn write_file(path: &Path, len: u64) {
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ len;
    for _ in 0..len / MIB {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn data_used(pool: &Pool) -> u64 {
    pool.status().unwrap().kernel.data_used.0
}

/// Loop devices (by node) whose backing file lies under `dir`.
fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap();
    let mut found = Vec::new();
    for entry in fs::read_dir("/sys/block").unwrap().flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if let Ok(b) = fs::read_to_string(entry.path().join("loop/backing_file"))
            && Path::new(b.trim_end()).starts_with(&dir)
        {
            found.push(PathBuf::from("/dev").join(n));
        }
    }
    found
}

/// Polls `done` until it holds or `limit` passes; returns how long that took.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(2));
    }
    started.elapsed()
}

fn sysfs_loop_attr(dev: &Path, attr: &str) -> String {
    let n = dev.file_name().unwrap();
    fs::read_to_string(Path::new("/sys/block").join(n).join(attr))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn is_mountpoint(path: &Path) -> bool {
    let path = fs::canonicalize(path).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4).map(Path::new) == Some(path.as_path()))
}

#[test]
fn pool_is_created_on_a_mounted_xfs() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let fx = Fixture::new();
    let st = fx.pool().status().unwrap();
    assert_eq!(st.backend, BackendKind::Reflink);
    let k = &st.kernel;
    assert!(
        k.data_total.0 > Bytes::gib(3).0 && k.data_total.0 <= Bytes::gib(4).0,
        "{k:?}"
    );
    assert!(k.data_used.0 > 0 && k.data_used < k.data_total, "{k:?}");
    assert_eq!(
        k.metadata_total,
        Bytes::mib(64),
        "the metadata file is the XFS log"
    );
    assert!(k.metadata_used <= k.metadata_total);
    assert_eq!(k.mode, PoolMode::Rw);
    assert!(!k.needs_check);
    assert!(k.error_if_no_space);
    let expected_lwm = k.data_total.0 / 5;
    assert!(
        k.low_water_mark.0.abs_diff(expected_lwm) <= st.block_size.0,
        "{k:?}"
    );
    assert!(
        k.transaction_id >= 1,
        "creating the base device bumps the counter"
    );

    let mnt = fx.root().join("mnt");
    assert!(
        is_mountpoint(&mnt),
        "the XFS is mounted under the pool root"
    );
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    // Two mounts there: a private bind of the directory (so that the XFS never propagates
    // into other namespaces), and the XFS on it, the visible one (listed last).
    let at_mnt: Vec<&str> = mountinfo
        .lines()
        .filter(|l| {
            l.split(' ').nth(4).map(Path::new) == Some(fs::canonicalize(&mnt).unwrap().as_path())
        })
        .collect();
    assert_eq!(at_mnt.len(), 2, "{at_mnt:#?}");
    assert!(
        !at_mnt[0].contains("shared:"),
        "the bind is private: {}",
        at_mnt[0]
    );
    let line = at_mnt[1];
    assert!(line.contains(" - xfs "), "{line}");
    assert!(
        line.contains("logdev="),
        "the XFS has its log on the metadata loop: {line}"
    );
    assert!(
        !line.contains("shared:"),
        "the pool mount is private: {line}"
    );
    assert!(fx.pool().audit().unwrap().is_clean());
    // The base device is a file in the XFS, not on the host filesystem.
    let base_files: Vec<_> = fs::read_dir(mnt.join("devices")).unwrap().collect();
    assert_eq!(base_files.len(), 1);
    // Nothing is active after creation; the data and metadata loops use direct I/O.
    let loops = loops_under(&fx.root());
    assert_eq!(
        loops.len(),
        2,
        "only the data and metadata loops: {loops:?}"
    );
    for l in &loops {
        assert_eq!(
            sysfs_loop_attr(l, "loop/dio"),
            "1",
            "{} uses direct I/O",
            l.display()
        );
    }
}

#[test]
fn snapshot_chain_shows_each_layers_files() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    fx.snapshot("a", None, DeviceKind::Active);
    let (spec_a, m) = fx.mount("a");
    assert!(
        spec_a.source.to_string_lossy().starts_with("/dev/loop"),
        "{spec_a:?}"
    );
    fs::write(m.join("a.txt"), "layer a").unwrap();
    fx.umount(&m);
    fx.pool()
        .commit(&name("a"), &name("layer-a"), None)
        .unwrap();

    fx.snapshot("b", Some("layer-a"), DeviceKind::Active);
    let (_, m) = fx.mount("b");
    assert_eq!(fs::read_to_string(m.join("a.txt")).unwrap(), "layer a");
    fs::write(m.join("b.txt"), "layer b").unwrap();
    fs::write(m.join("a.txt"), "changed in b").unwrap();
    fx.umount(&m);
    fx.pool()
        .commit(&name("b"), &name("layer-b"), None)
        .unwrap();

    // A view of the top layer sees both layers' files, read-only.
    fx.snapshot("view-b", Some("layer-b"), DeviceKind::View);
    let (spec_v, m) = fx.mount("view-b");
    assert_eq!(
        sysfs_loop_attr(&spec_v.source, "ro"),
        "1",
        "a view's loop is read-only"
    );
    assert_eq!(sysfs_loop_attr(&spec_v.source, "loop/dio"), "1");
    assert_eq!(
        sysfs_loop_attr(&spec_v.source, "queue/logical_block_size"),
        "4096",
        "device loops have the XFS block size as sector size, so direct I/O works on clones"
    );
    assert_eq!(fs::read_to_string(m.join("a.txt")).unwrap(), "changed in b");
    assert_eq!(fs::read_to_string(m.join("b.txt")).unwrap(), "layer b");
    assert!(fs::write(m.join("c.txt"), "no").is_err());
    fx.umount(&m);
    let mut raw = OpenOptions::new().write(true).open(&spec_v.source).unwrap();
    assert!(
        raw.write_all(&[0u8; 4096]).is_err(),
        "the read-only loop device refuses writes"
    );

    // A view of the lower layer is unchanged by what b did.
    fx.snapshot("view-a", Some("layer-a"), DeviceKind::View);
    let (_, m) = fx.mount("view-a");
    assert_eq!(fs::read_to_string(m.join("a.txt")).unwrap(), "layer a");
    assert!(!m.join("b.txt").exists());
    fx.umount(&m);
    assert!(fx.pool().audit().unwrap().is_clean());
}

#[test]
fn usage_grows_with_writes() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    fx.snapshot("c", None, DeviceKind::Active);
    let fresh = fx.pool().usage(&name("c")).unwrap();
    assert!(
        fresh.0 < MIB,
        "a fresh snapshot shares everything with its parent: {fresh}"
    );
    let used_before = data_used(fx.pool());

    let (spec_c, m) = fx.mount("c");
    assert_eq!(
        sysfs_loop_attr(&spec_c.source, "loop/dio"),
        "1",
        "devices use direct I/O"
    );
    write_file(&m.join("blob"), 64 * MIB);
    // Activating again returns the same node while active.
    let again = fx.pool().activate(&name("c")).unwrap();
    assert_eq!(again.source, fx.pool().activate(&name("c")).unwrap().source);
    let written = fx.pool().usage(&name("c")).unwrap();
    assert!(
        written.0 >= 64 * MIB,
        "usage {written} after writing 64 MiB"
    );
    assert!(written.0 < 80 * MIB, "usage {written} after writing 64 MiB");
    fx.umount(&m);
    assert!(data_used(fx.pool()) >= used_before + 64 * MIB);

    // A snapshot of it shares the data: neither counts it any more.
    fx.pool()
        .commit(&name("c"), &name("layer-c"), None)
        .unwrap();
    fx.snapshot("d", Some("layer-c"), DeviceKind::Active);
    assert!(fx.pool().usage(&name("d")).unwrap().0 < MIB);
    assert!(fx.pool().usage(&name("layer-c")).unwrap().0 < MIB);
    // containerd's Usage of the layer is what it added over its parent, children or not:
    // measured at commit.
    let layer = fx.pool().snapshot_usage(&name("layer-c")).unwrap();
    assert!(
        (64 * MIB..80 * MIB).contains(&layer.0),
        "layer-c usage {layer} (64 MiB written)"
    );
    assert!(fx.pool().snapshot_usage(&name("d")).unwrap().0 < MIB);
}

#[test]
fn deactivating_a_device_in_use_fails_and_leaves_it_attached() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    fx.snapshot("busy", None, DeviceKind::Active);
    let (spec, m) = fx.mount("busy");
    let err = fx.pool().deactivate(&name("busy")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    // Still attached, not marked for detach at unmount, and still usable.
    assert_eq!(sysfs_loop_attr(&spec.source, "loop/autoclear"), "0");
    fs::write(m.join("still-here"), "yes").unwrap();
    fx.umount(&m);
    assert!(
        !sysfs_loop_attr(&spec.source, "loop/backing_file").is_empty(),
        "still attached"
    );

    // Open (not mounted) by another holder: also refused, and undone.
    let holder = File::open(&spec.source).unwrap();
    let err = fx.pool().deactivate(&name("busy")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(sysfs_loop_attr(&spec.source, "loop/autoclear"), "0");
    drop(holder);
    assert!(
        !sysfs_loop_attr(&spec.source, "loop/backing_file").is_empty(),
        "still attached"
    );

    // Unused: detaches, and a second deactivate is a no-op. (The freed loop device may at
    // once be attached to another file by a test running beside this one: "not ours any
    // more", not "empty".)
    let ours = sysfs_loop_attr(&spec.source, "loop/backing_file");
    fx.pool().deactivate(&name("busy")).unwrap();
    assert_ne!(sysfs_loop_attr(&spec.source, "loop/backing_file"), ours);
    fx.pool().deactivate(&name("busy")).unwrap();
    let (spec, m) = fx.mount("busy");
    assert_eq!(fs::read_to_string(m.join("still-here")).unwrap(), "yes");
    fx.umount(&m);

    // A loop device detached behind the pool's back is noticed: activate attaches anew.
    thinpool::loopback::detach(&spec.source).unwrap();
    let again = fx.pool().activate(&name("busy")).unwrap();
    let id = fx.pool().device(&name("busy")).unwrap().id;
    let file = fs::canonicalize(fx.root().join(format!("mnt/devices/{id}"))).unwrap();
    assert_eq!(
        sysfs_loop_attr(&again.source, "loop/backing_file"),
        file.to_string_lossy()
    );
}

#[test]
fn teardown_and_reopen_bring_everything_back() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    fx.snapshot("keep", None, DeviceKind::Active);
    let (_, m) = fx.mount("keep");
    fs::write(m.join("data"), "survives").unwrap();
    fx.umount(&m);
    fx.pool()
        .commit(&name("keep"), &name("layer"), None)
        .unwrap();
    fx.snapshot("running", Some("layer"), DeviceKind::Active);
    fx.snapshot("idle", Some("layer"), DeviceKind::View);
    fx.pool().activate(&name("running")).unwrap();
    let txn = fx.pool().status().unwrap().kernel.transaction_id;
    let root = fx.root();

    fx.pool.take().unwrap().close(true).unwrap();
    assert!(
        loops_under(&root).is_empty(),
        "teardown detaches every loop device"
    );
    assert!(
        !is_mountpoint(&root.join("mnt")),
        "teardown unmounts the XFS"
    );

    fx.pool = Some(Pool::open(&spec(&root)).unwrap());
    let st = fx.pool().status().unwrap();
    assert_eq!(st.kernel.transaction_id, txn, "the counter is durable");
    assert!(fx.pool().audit().unwrap().is_clean());
    // Reconcile activated what should be active, and only that.
    let active: Vec<_> = fx
        .pool()
        .devices()
        .unwrap()
        .into_iter()
        .filter(|r| r.active)
        .collect();
    assert_eq!(active.len(), 1);
    assert_eq!(
        loops_under(&root).len(),
        3,
        "data, metadata and the one active device"
    );
    let (_, m) = fx.mount("running");
    assert_eq!(fs::read_to_string(m.join("data")).unwrap(), "survives");
    fx.umount(&m);

    // A daemon restart without teardown keeps devices and the mount, and changes nothing.
    let before = loops_under(&root);
    fx.pool.take().unwrap().close(false).unwrap();
    fx.pool = Some(Pool::open(&spec(&root)).unwrap());
    assert_eq!(loops_under(&root), before);
    assert_eq!(fx.pool().status().unwrap().kernel.transaction_id, txn);

    // Every mutating call bumps the counter by one.
    fx.pool()
        .remove(&name("idle"), RemoveOptions::default())
        .unwrap();
    assert_eq!(fx.pool().status().unwrap().kernel.transaction_id, txn + 1);
    fx.reboot();
    assert_eq!(fx.pool().status().unwrap().kernel.transaction_id, txn + 1);
}

#[test]
fn audit_sees_stray_device_files() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let fx = Fixture::new();
    let stray = fx.root().join("mnt/devices/4242");
    fs::write(&stray, "").unwrap();
    let report = fx.pool().audit().unwrap();
    assert_eq!(
        report.leaked.iter().map(|id| id.get()).collect::<Vec<_>>(),
        vec![4242]
    );
    fs::remove_file(&stray).unwrap();
    assert!(fx.pool().audit().unwrap().is_clean());
}

/// Required: 1,000 snapshots of a parent with 256 MiB written cost well under the parent's
/// own space again (the parent plus its snapshots stay well under 2x the parent).
#[test]
fn a_thousand_snapshots_share_their_parents_space() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    let empty = data_used(fx.pool());
    fx.snapshot("parent", None, DeviceKind::Active);
    let (_, m) = fx.mount("parent");
    write_file(&m.join("payload"), 256 * MIB);
    fx.umount(&m);
    fx.pool()
        .commit(&name("parent"), &name("layer"), None)
        .unwrap();
    let before = data_used(fx.pool());
    let parent_space = before - empty;
    assert!(
        parent_space >= 256 * MIB,
        "parent holds {parent_space} bytes"
    );

    let started = Instant::now();
    for i in 0..1000 {
        fx.snapshot(&format!("snap-{i}"), Some("layer"), DeviceKind::View);
    }
    let elapsed = started.elapsed();
    let after = data_used(fx.pool());
    let growth = after - before;
    eprintln!(
        "1000 snapshots in {elapsed:?}: pool used {} MiB -> {} MiB (+{} KiB; parent {} MiB)",
        before / MIB,
        after / MIB,
        growth / 1024,
        parent_space / MIB
    );
    assert!(
        growth < parent_space / 8,
        "1000 snapshots took {growth} bytes, the parent {parent_space}"
    );
    assert!(fx.pool().usage(&name("snap-999")).unwrap().0 < MIB);
    let files = fs::read_dir(fx.root().join("mnt/devices")).unwrap().count();
    assert_eq!(files, 1002, "base, parent and 1000 snapshots");
}

#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}
nix::ioctl_readwrite!(fitrim, b'X', 121, FstrimRange);

/// Required: a discard inside a mounted device punches holes in its file, so deleting a
/// file in the device's filesystem and trimming it gives the space back to the pool.
#[test]
fn discard_in_a_device_returns_space_to_the_pool() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    fx.snapshot("trim", None, DeviceKind::Active);
    let (_, m) = fx.mount("trim");
    write_file(&m.join("big"), 256 * MIB);
    let used_full = data_used(fx.pool());
    let usage_full = fx.pool().usage(&name("trim")).unwrap().0;
    assert!(usage_full >= 256 * MIB);

    fs::remove_file(m.join("big")).unwrap();
    let dir = File::open(&m).unwrap();
    nix::unistd::syncfs(&dir).unwrap();
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM on a directory of the mounted filesystem with a valid range.
    unsafe { fitrim(dir.as_raw_fd(), &mut range) }.expect("FITRIM");
    assert!(range.len >= 200 * MIB, "trimmed {} bytes", range.len);
    drop(dir);

    wait_for(Duration::from_secs(10), || {
        used_full - data_used(fx.pool()).min(used_full) >= 200 * MIB
    });
    let used = data_used(fx.pool());
    let usage = fx.pool().usage(&name("trim")).unwrap().0;
    eprintln!(
        "pool used {} MiB -> {} MiB, device usage {} MiB -> {} MiB",
        used_full / MIB,
        used / MIB,
        usage_full / MIB,
        usage / MIB
    );
    assert!(
        used_full - used >= 200 * MIB,
        "the pool got {} bytes back",
        used_full - used
    );
    assert!(usage_full - usage >= 200 * MIB);
    fx.umount(&m);
}

/// Required: on a host without xfsprogs, creating a pool fails with an error that names the
/// package. The child runs this same test with PATH pointing at an empty directory.
#[test]
fn missing_xfs_tools_name_the_package() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    const CHILD: &str = "THINPOOL_TEST_CHILD_ROOT";
    if let Some(root) = std::env::var_os(CHILD) {
        match Pool::open(&spec(Path::new(&root))) {
            Ok(pool) => {
                let _ = pool.close(true);
                println!("CHILD-RESULT: pool opened");
            }
            Err(e) => println!("CHILD-RESULT: {e}"),
        }
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("reflink-notools-")
        .tempdir_in(test_dir())
        .unwrap();
    let empty_bin = dir.path().join("bin");
    fs::create_dir(&empty_bin).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "missing_xfs_tools_name_the_package",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PATH", &empty_bin)
        .env(CHILD, dir.path().join("pool"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-RESULT: ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no result from the child: {stdout}"));
    assert!(
        result.contains("xfsprogs"),
        "error does not name the package: {result}"
    );
    assert!(
        result.contains("mkfs.xfs"),
        "error does not name the tool: {result}"
    );
    // Nothing was left attached or mounted.
    assert!(loops_under(dir.path()).is_empty());
}

#[test]
fn remove_frees_the_file_and_space() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    fx.snapshot("gone", None, DeviceKind::Active);
    let (_, m) = fx.mount("gone");
    write_file(&m.join("x"), 32 * MIB);
    fx.umount(&m);
    let used = data_used(fx.pool());
    let id = fx.pool().device(&name("gone")).unwrap().id;
    fx.pool()
        .remove(&name("gone"), RemoveOptions::default())
        .unwrap();
    assert!(!fx.root().join(format!("mnt/devices/{id}")).exists());
    // XFS frees a deleted file's blocks in the background (inode inactivation); statfs
    // nudges it along.
    let freed = wait_for(Duration::from_secs(10), || {
        data_used(fx.pool()) + 30 * MIB <= used
    });
    eprintln!("space back after {freed:?}");
    assert!(
        data_used(fx.pool()) + 30 * MIB <= used,
        "removing returns the space"
    );
    assert!(fx.pool().audit().unwrap().is_clean());

    // Discarding remove goes through BLKDISCARD on the device before deleting it.
    fx.snapshot("gone2", None, DeviceKind::Active);
    fx.pool()
        .remove(
            &name("gone2"),
            RemoveOptions {
                discard: true,
                deferred: false,
            },
        )
        .unwrap();
    assert!(fx.pool().audit().unwrap().is_clean());

    // Raw reads of a fresh device see the base filesystem's superblock.
    fx.snapshot("raw", None, DeviceKind::View);
    let spec = fx.pool().activate(&name("raw")).unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&spec.source)
        .unwrap();
    let mut buf = AlignedBuf::zeroed(4096);
    f.read_exact(buf.bytes_mut()).unwrap();
    assert_eq!(
        &buf.bytes_mut()[1024 + 0x38..1024 + 0x3a],
        &[0x53, 0xEF],
        "ext4 magic"
    );
    drop(f);
    fx.pool().deactivate(&name("raw")).unwrap();
}

/// An XFS base filesystem (made on a 4 KiB-sector device) and a snapshot larger than its
/// parent (the engine grows the filesystem on the larger file).
#[test]
fn xfs_base_and_a_larger_snapshot() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let dir = tempfile::Builder::new()
        .prefix("reflink-")
        .tempdir_in(test_dir())
        .unwrap();
    let mut fx = Fixture {
        pool: Some(
            Pool::open(&PoolSpec {
                fs: Some(FsType::Xfs),
                ..spec(&dir.path().join("pool"))
            })
            .expect("create pool with an XFS base"),
        ),
        dir: Some(dir),
        mounts: Vec::new(),
    };
    fx.snapshot("x", None, DeviceKind::Active);
    let (_, m) = fx.mount("x");
    fs::write(m.join("f"), "xfs inside xfs").unwrap();
    fx.umount(&m);
    fx.pool()
        .commit(&name("x"), &name("layer-x"), None)
        .unwrap();
    fx.pool()
        .snapshot(SnapshotRequest {
            name: name("big"),
            parent: Some(name("layer-x")),
            kind: DeviceKind::Active,
            size: Some(Bytes::gib(2)),
            labels: BTreeMap::new(),
            activate: false,
        })
        .unwrap();
    let (_, m) = fx.mount("big");
    assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "xfs inside xfs");
    let st = nix::sys::statvfs::statvfs(&m).unwrap();
    let size = st.blocks() * st.fragment_size();
    assert!(
        size > Bytes::gib(1).0 + Bytes::mib(512).0,
        "grown filesystem is {size} bytes"
    );
    fx.umount(&m);
}

/// A shut-down XFS (as after an I/O error) is reported as failed and needing a check; a
/// teardown and reopen replays its log, and every change the backend acknowledged survives.
#[test]
fn a_shut_down_xfs_is_reported_and_recovers() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    fx.snapshot("before", None, DeviceKind::Active);
    let (_, m) = fx.mount("before");
    fs::write(m.join("f"), "written before the shutdown").unwrap();
    fx.umount(&m);
    let txn = fx.pool().status().unwrap().kernel.transaction_id;
    let mnt = fx.root().join("mnt");
    // Shut down without flushing the log, the harshest kind.
    let out = Command::new("xfs_io")
        .args(["-x", "-c", "shutdown"])
        .arg(&mnt)
        .output()
        .expect("run xfs_io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let k = fx.pool().status().unwrap().kernel;
    assert_eq!(k.mode, PoolMode::Fail);
    assert!(k.needs_check);

    fx.reboot();
    let k = fx.pool().status().unwrap().kernel;
    assert_eq!(k.mode, PoolMode::Rw);
    assert!(!k.needs_check);
    assert_eq!(k.transaction_id, txn);
    assert!(fx.pool().audit().unwrap().is_clean());
    let (_, m) = fx.mount("before");
    assert_eq!(
        fs::read_to_string(m.join("f")).unwrap(),
        "written before the shutdown",
        "the snapshot's filesystem is intact"
    );
    assert!(
        !m.join("lost+found").exists(),
        "snapshots have no lost+found"
    );
    fx.umount(&m);
}

/// The backend's own contract, called directly on a closed pool's files: idempotent
/// delete/activate/deactivate, one transaction per mutating call, and a counter ahead of
/// the engine's records is accepted at the next open.
#[test]
fn backend_calls_are_idempotent() {
    thinpool_tests::skip_on_sim!("tests the reflink backend itself: loop devices, XFS, mounts");
    let mut fx = Fixture::new();
    let settings = fx.pool().settings();
    let base_id = fx.pool().devices().unwrap()[0].id;
    let root = fx.root();
    fx.pool.take().unwrap().close(false).unwrap();
    {
        let b = thinpool::backend::open(&thinpool::backend::PoolPaths::new(&root), &settings)
            .expect("open backend");
        let t0 = b.status().unwrap().transaction_id;
        let id = thinpool::ThinId::new(777).unwrap();
        assert_eq!(
            b.delete(id).unwrap(),
            t0 + 1,
            "deleting an absent id succeeds"
        );
        b.deactivate(id).unwrap();
        assert_eq!(
            b.activate(id, Bytes::gib(1), false).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            b.create_snapshot(id, base_id, Bytes::gib(1)).unwrap(),
            t0 + 2
        );
        let err = b.create_thin(id, Bytes::gib(1)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        let err = b.create_snapshot(id, base_id, Bytes::mib(512)).unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::InvalidArgument,
            "smaller than origin: {err}"
        );
        let dev = b.activate(id, Bytes::gib(1), false).unwrap();
        assert_eq!(b.activate(id, Bytes::gib(1), false).unwrap(), dev);
        assert_eq!(b.active_devices().unwrap().get(&id), Some(&dev));
        let err = b.delete(id).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "active: {err}");
        b.deactivate(id).unwrap();
        b.deactivate(id).unwrap();
        assert_eq!(b.delete(id).unwrap(), t0 + 3);
        assert_eq!(b.delete(id).unwrap(), t0 + 4);
        assert!(!b.list_ids().unwrap().contains(&id));
    }
    // The backend is ahead of the records by four transactions: the engine accepts that.
    fx.pool = Some(Pool::open(&spec(&root)).unwrap());
    assert!(fx.pool().audit().unwrap().is_clean());
}
