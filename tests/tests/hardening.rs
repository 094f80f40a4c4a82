//! Hardening against careless or hostile local users and clients (issue 10): private pool
//! files, a metrics endpoint that cannot be used to stall the daemon, bounded work per
//! request, space safety, and a failed start that leaves nothing behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thinpool::{DeviceKind, PoolSpec};
use thinpool_tests::{TestPool, name, pool_dir, request, small_spec};

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

/// The paths among `paths` that uid/gid 65534 (nobody, no groups) can read (files) or list
/// (directories).
fn readable_by_nobody(paths: &[PathBuf]) -> Vec<String> {
    let script = r#"for p; do
        if [ -d "$p" ]; then ls "$p" >/dev/null 2>&1 && echo "$p";
        else head -c1 "$p" >/dev/null 2>&1 && echo "$p"; fi
    done; exit 0"#;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["sh", "-c", script, "sh"])
        .args(paths)
        .output()
        .expect("run setpriv (util-linux)");
    assert!(out.status.success(), "setpriv: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
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
    let readable = readable_by_nobody(&paths);
    assert!(readable.is_empty(), "readable by uid 65534: {readable:?}");
}

#[test]
fn pool_files_are_private_to_root_and_tightened_at_open() {
    // Control: the probe really runs as nobody and really can read what is world-readable,
    // so an empty answer below means "refused", not "the probe did not run".
    let dir = pool_dir("private", false);
    let control = dir.join("control-public");
    std::fs::write(&control, b"x").unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        readable_by_nobody(std::slice::from_ref(&control)),
        vec![control.display().to_string()],
        "control file"
    );

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
    assert!(
        !readable_by_nobody(&paths).is_empty(),
        "the loosened pool should be readable (control)"
    );
    tp.reopen(&spec);
    assert_private(&root);
    drop(tp);
    let _ = std::fs::remove_dir_all(&dir);
}
