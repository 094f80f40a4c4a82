//! Hardening against careless or hostile local users and clients (issue 10): private pool
//! files, a metrics endpoint that cannot be used to stall the daemon, bounded work per
//! request, space safety, and a failed start that leaves nothing behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thinpool::{DeviceKind, PoolSpec};
use thinpool_tests::{TestPool, kernel_leftovers_under, name, pool_dir, request, small_spec};

/// Every path under `root` (not following symlinks), `root` included.
fn walk(root: &Path, out: &mut Vec<PathBuf>) {
    out.push(root.to_path_buf());
    let meta = std::fs::symlink_metadata(root).unwrap();
    if meta.is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            walk(&e.unwrap().path(), out);
        }
    }
}

/// The paths among `paths` that uid/gid 65534 (nobody, no supplementary groups) can read
/// (files) or list (directories): a shell run as that user tries each.
fn readable_by_nobody(paths: &[PathBuf]) -> Vec<String> {
    use std::os::unix::process::CommandExt;
    let script = r#"for p; do
        if [ -d "$p" ]; then ls "$p" >/dev/null 2>&1 && echo "$p";
        else head -c1 "$p" >/dev/null 2>&1 && echo "$p"; fi
    done; exit 0"#;
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script, "sh"]).args(paths);
    // SAFETY: between fork and exec only async-signal-safe calls (setgroups, setgid,
    // setuid), and their errors are returned, not handled here.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run sh as uid 65534");
    assert!(out.status.success(), "sh as uid 65534: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Copies `from` to `to` with every all-zero 64 KiB block left as a hole: a sparse copy
/// with the same content.
fn sparse_copy(from: &Path, to: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = std::fs::File::open(from).unwrap();
    let mut dst = std::fs::File::create(to).unwrap();
    let len = src.metadata().unwrap().len();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(n as i64)).unwrap();
        } else {
            dst.write_all(&buf[..n]).unwrap();
        }
    }
    dst.set_len(len).unwrap();
    dst.sync_all().unwrap();
}

/// Asserts modes (dirs 0700, files 0600) and that nobody can read any of it.
fn assert_private(root: &Path) {
    let mut paths = Vec::new();
    walk(root, &mut paths);
    let mut files = 0;
    for p in &paths {
        let m = std::fs::symlink_metadata(p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        if m.is_dir() {
            assert_eq!(mode, 0o700, "mode of directory {}", p.display());
        } else if m.is_file() {
            files += 1;
            assert_eq!(mode, 0o600, "mode of file {}", p.display());
        }
    }
    // data, metadata, pool.redb, lock, and the backend's own (device files on reflink).
    assert!(
        files >= 4,
        "too few files under {}: {paths:?}",
        root.display()
    );
    if !nix::unistd::geteuid().is_root() {
        return; // we are nobody ourselves (tests/sim/run): the modes must do
    }
    let readable = readable_by_nobody(&paths);
    assert!(readable.is_empty(), "readable by uid 65534: {readable:?}");
}

#[test]
fn pool_files_are_private_to_root_and_tightened_at_open() {
    // Control: the probe really runs as nobody and really can read what is world-readable,
    // so an empty answer below means "refused", not "the probe did not run".
    // Unprivileged (tests/sim/run on the sim backend), the probe cannot switch users and the
    // tmpfs cannot be mounted: the modes and their tightening at open are checked alone.
    let root_user = nix::unistd::geteuid().is_root();
    let dir = pool_dir("private", false);
    let control = dir.join("control-public");
    std::fs::write(&control, b"x").unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    if root_user {
        assert_eq!(
            readable_by_nobody(std::slice::from_ref(&control)),
            vec![control.display().to_string()],
            "control file"
        );
    }

    let root = dir.join("pool");
    let spec: PoolSpec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    let pool = tp.pool();
    pool.snapshot(request("c1", None, DeviceKind::Active))
        .unwrap();
    pool.activate(&name("c1")).unwrap();
    pool.commit(&name("c1"), &name("layer"), None).unwrap();
    pool.snapshot(request("v1", Some("layer"), DeviceKind::View))
        .unwrap();
    pool.snapshot(request("a1", Some("layer"), DeviceKind::Active))
        .unwrap();
    pool.activate(&name("a1")).unwrap();
    assert_private(&root);

    // A pool made before the modes were set (0755 directories, 0644 files) is tightened
    // when it is opened again.
    tp.close(false);
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    for p in &paths {
        let m = std::fs::symlink_metadata(p).unwrap();
        let mode = if m.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    if root_user {
        assert!(
            !readable_by_nobody(&paths).is_empty(),
            "the loosened pool should be readable (control)"
        );
    }
    tp.reopen(&spec);
    assert_private(&root);
    if !root_user {
        drop(tp);
        let _ = std::fs::remove_dir_all(&dir);
        thinpool_tests::report_skip(
            "in part, unprivileged: the probe as another user and the foreign tmpfs mount need root",
        );
        return;
    }

    // Another filesystem mounted under the root (a container's, say) is not touched.
    let foreign = root.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &foreign,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("mode=0755"),
    )
    .unwrap();
    let file = foreign.join("f");
    std::fs::write(&file, b"x").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    tp.close(false);
    let reopened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tp.reopen(&spec)));
    let modes = (
        std::fs::metadata(&foreign).unwrap().permissions().mode() & 0o777,
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
    );
    nix::mount::umount(&foreign).unwrap();
    reopened.unwrap();
    assert_eq!(
        modes,
        (0o755, 0o644),
        "a foreign mount under the root was changed"
    );
    drop(tp);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The size label is capped at the pool's data size (times --max-device-overcommit), and
/// refused clearly (probe D5, review #30).
#[test]
fn size_label_is_capped_at_the_pool() {
    let h = &thinpool_tests::grpc::Harness::start("size-cap");
    h.run(|mut c| async move {
        let size = |s: &str| {
            [(thinpool_server::SIZE_LABEL.to_string(), s.to_string())]
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>()
        };
        // A 4 GiB pool: 1 TiB is refused at once, before anything is made.
        let t = std::time::Instant::now();
        let e = c
            .prepare("huge", None, size("1T"))
            .await
            .expect_err("1T on a 4G pool");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.to_string().contains("max-device-overcommit"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        let e = c
            .prepare("over", None, size("5G"))
            .await
            .expect_err("5G on a 4G pool");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(c.list(&[]).await.unwrap().is_empty(), "nothing was made");
    });
}

/// Filters are bounded in count, size and depth, errors do not echo unbounded input,
/// and List runs off the async workers (probe D6, N8).
#[test]
fn list_filters_are_bounded_and_off_the_workers() {
    let h = &thinpool_tests::grpc::Harness::start("list-bounds");
    let pool = h.pool().clone();
    // 300 snapshots with 15 labels of 4,000 bytes: an 18 MB listing.
    h.rt.block_on(async {
        let big = "x".repeat(4000);
        for i in 0..300 {
            let mut req = request(&format!("s{i:03}"), None, DeviceKind::Active);
            for l in 0..15 {
                req.labels.insert(format!("l{l}"), big.clone());
            }
            pool.run(move |p| p.snapshot(req)).await.unwrap();
        }
    });
    let socket = h.socket.clone();
    h.run(|mut c| async move {
        // Bounds, with short messages.
        let many: Vec<String> = (0..100).map(|i| format!("name==s{i:03}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let e = c
            .list(&many)
            .await
            .map(|v| v.len())
            .expect_err("100 filters refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let deep = format!("labels.{}z==1", "a.".repeat(100));
        let e = c
            .list(&[&deep])
            .await
            .map(|v| v.len())
            .expect_err("deep path refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let bad = format!("name==\"{}", "y".repeat(60_000)); // unterminated quote
        let e = c
            .list(&[&bad])
            .await
            .map(|v| v.len())
            .expect_err("malformed refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(
            e.to_string().len() < 1024,
            "echoed {} bytes",
            e.to_string().len()
        );
        let huge = format!("name=={}", "y".repeat(1 << 20));
        let e = c
            .list(&[&huge])
            .await
            .map(|v| v.len())
            .expect_err("1 MiB filter refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(
            e.to_string().len() < 1024,
            "echoed {} bytes",
            e.to_string().len()
        );

        // The costliest allowed filter, in 8 Lists at once, does not stall a Stat.
        let costly: Vec<String> = (0..64)
            .map(|i| {
                (0..4)
                    .map(|j| format!("labels.l{j}!={i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let mut lists = Vec::new();
        for _ in 0..8 {
            let costly = costly.clone();
            let socket = socket.clone();
            lists.push(tokio::spawn(async move {
                let mut c = thinpool_client::Client::connect(&socket).await.unwrap();
                let f: Vec<&str> = costly.iter().map(String::as_str).collect();
                c.list(&f).await.unwrap().len()
            }));
        }
        let mut worst = std::time::Duration::ZERO;
        for _ in 0..20 {
            let t = std::time::Instant::now();
            c.stat("s000").await.unwrap();
            worst = worst.max(t.elapsed());
        }
        for l in lists {
            assert_eq!(l.await.unwrap(), 300);
        }
        eprintln!("Stat during 8 costly Lists: worst {worst:?}");
        // Generous: the host is shared; the Lists are CPU-bound on 2 cores.
        assert!(worst < std::time::Duration::from_millis(1500), "{worst:?}");
    });
}

/// The metadata file is allocated at creation, and at open when it is sparse (a pool made
/// before); a pool that could outgrow the host filesystem is refused unless forced (review
/// #10).
#[test]
fn metadata_is_preallocated_and_creation_checks_the_host() {
    use thinpool_tests::allocated_bytes;
    let dir = pool_dir("space-safety", false);
    let root = dir.join("pool");
    let spec = small_spec(&root);
    let mut tp = TestPool::open(&spec);
    let meta = tp.pool().paths().metadata_file.clone();
    let len = std::fs::metadata(&meta).unwrap().len();
    assert!(
        allocated_bytes(&meta) >= len,
        "metadata file allocated at creation: {} of {len}",
        allocated_bytes(&meta)
    );

    // A pool made before: its metadata file sparse (same content, zeros as holes).
    tp.close(true);
    let sparse = dir.join("metadata.sparse");
    sparse_copy(&meta, &sparse);
    std::fs::rename(&sparse, &meta).unwrap();
    assert!(
        allocated_bytes(&meta) < len,
        "control: the copy is sparse ({} of {len})",
        allocated_bytes(&meta)
    );
    tp.reopen(&spec);
    assert!(
        allocated_bytes(&meta) >= len,
        "metadata file allocated at open: {} of {len}",
        allocated_bytes(&meta)
    );
    tp.assert_audit_clean();
    drop(tp);

    // Larger than the host filesystem's free space: refused, clearly, with the figures.
    let root = dir.join("too-big");
    let spec = PoolSpec {
        data_size: Some(thinpool::Bytes::gib(1 << 20)), // 1 PiB
        ..small_spec(&root)
    };
    let e = match thinpool::Pool::open(&spec) {
        Ok(p) => {
            let _ = p.close(true);
            panic!("a 1 PiB pool was created");
        }
        Err(e) => e,
    };
    assert_eq!(e.kind(), thinpool::ErrorKind::ResourceExhausted, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("free") && msg.contains("--overcommit-host"),
        "{msg}"
    );
    assert!(!root.join("data").exists() && !root.join("pool.redb").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The process umask as /proc reports it (reading it does not change it).
fn proc_umask() -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| v.trim().to_string())
        .expect("Umask in /proc/self/status")
}

/// Binding the socket never changes the process-wide umask, which other threads' file
/// creation uses (review #28); the socket is still 0660.
#[test]
fn bind_socket_leaves_the_umask_alone() {
    let dir = pool_dir("umask", false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = proc_umask();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let before = before.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = proc_umask();
                if m != before {
                    seen.insert(m);
                }
            }
            seen
        })
    };
    for i in 0..300 {
        // A new path each time: a child another test forks meanwhile holds our listening
        // socket until its exec, which would make a reused path look live.
        let sock = dir.join(format!("s{i}.sock"));
        let _entered = rt.enter();
        let l = thinpool_server::bind_socket(&sock, None).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(l);
        std::fs::remove_file(&sock).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(
        seen.is_empty(),
        "umask {before} changed to {seen:?} during bind"
    );
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unmounts a test's bind mount on drop (also when the test fails).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Under a shared mount (systemd's default for `/`) with a peer (here a second bind in
/// the same peer group; a container runtime's namespace is one too), the reflink XFS does not
/// propagate into the peer, and teardown works (review #17). The peer lives in this
/// namespace, so that no other test's (or engineer's) mounts get copied anywhere.
#[test]
fn reflink_mount_does_not_propagate() {
    thinpool_tests::skip_on_sim!("bind mounts and the reflink backend's XFS mount");
    use nix::mount::{MsFlags, mount};
    let dir = pool_dir("propagation", false);
    let shared = dir.join("shared");
    let peer = dir.join("peer");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&peer).unwrap();
    mount(
        Some(&shared),
        &shared,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let _unmount_shared = Unmount(shared.clone());
    mount(
        None::<&str>,
        &shared,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap();
    // A bind of a shared mount joins its peer group: mounts under one appear under the other.
    mount(
        Some(&shared),
        &peer,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let _unmount_peer = Unmount(peer.clone());

    let root = shared.join("pool");
    // Reflink whatever the suite's backend: dm has no mount of its own.
    let mut tp = TestPool::open(&PoolSpec {
        backend: Some(thinpool::BackendKind::Reflink),
        ..small_spec(&root)
    });
    let in_peer = std::fs::canonicalize(&peer)
        .unwrap()
        .join("pool")
        .join("mnt");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let propagated: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(&*in_peer.to_string_lossy()) && l.contains(" - xfs "))
        .collect();
    if !propagated.is_empty() {
        // Leave nothing behind before failing: the copy keeps the data loop busy.
        let _ = nix::mount::umount2(&in_peer, nix::mount::MntFlags::MNT_DETACH);
    }
    assert!(
        propagated.is_empty(),
        "the pool XFS appeared under the peer: {propagated:#?}"
    );
    tp.close(true); // teardown must not find the data loop device busy
    drop(tp);
    let left = kernel_leftovers_under(&root);
    assert!(left.is_empty(), "left behind: {left:#?}");
    drop(_unmount_peer);
    drop(_unmount_shared);
    let _ = std::fs::remove_dir_all(&dir);
}
