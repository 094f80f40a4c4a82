//! The real thinpoold and thinctl: periodic backups with retention, `thinctl pool backup`,
//! and the offline `thinctl pool repair` / `pool restore` (which run `thinpoold --repair` /
//! `--restore`): refused while the daemon runs, then run, with human and --json output.
//! Host only (the guest has no thinpoold); the engine's side of each, on dm too, is in
//! tests/tests/repair.rs.
//!
//! Needs `target/<profile>/thinpoold` and `thinctl`: `cargo build -p thinpool-server -p
//! thinpool-client`.

use std::path::Path;
use std::time::{Duration, Instant};

use thinpool_tests::grpc::{Daemon, bin};
use thinpool_tests::pool_dir;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn backups(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("backups"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// thinctl with no daemon to talk to (offline commands).
fn thinctl_offline(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin("thinctl"))
        .args(args)
        .output()
        .expect("run thinctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn thinctl_backup_repair_restore() {
    let dir = pool_dir("repair-daemon", false);
    let root = dir.join("pool");
    let socket = dir.join("thinpool.sock");
    let root_s = root.to_str().unwrap();
    let mut d = Daemon::start(
        &root,
        &socket,
        &["--backup-interval", "1s", "--backup-keep", "2"],
    );
    let (ok, _, err) = d.thinctl(&["snapshot", "prepare", "a"]);
    assert!(ok, "{err}");

    // Periodic backups, the newest two kept.
    let deadline = Instant::now() + Duration::from_secs(30);
    while backups(&root).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no periodic backups:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let kept = backups(&root);
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(d.log_text().contains("periodic backup taken"));

    // On demand.
    let (ok, out, err) = d.thinctl(&["pool", "backup", "--json"]);
    assert!(ok, "{err}");
    let b = json(&out);
    let path = b["path"].as_str().unwrap().to_string();
    assert!(Path::new(&path).join("manifest.json").is_file(), "{out}");
    assert!(b["devices"].as_u64().unwrap() >= 2, "base and a: {out}");
    let (ok, out, _) = d.thinctl(&["pool", "backup"]);
    assert!(ok && out.starts_with("backup "), "{out}");

    // Offline commands are refused while the daemon holds the pool.
    let (ok, _, err) = thinctl_offline(&["pool", "repair", "--root", root_s]);
    assert!(!ok, "repair with the daemon running succeeded");
    assert!(err.contains("thinpoold running"), "{err}");
    let (ok, _, err) = thinctl_offline(&["pool", "restore", &path, "--root", root_s]);
    assert!(!ok && err.contains("thinpoold running"), "{err}");

    // `pool down` stops the daemon and takes the pool down; then repair and restore run.
    let (ok, _, err) = d.thinctl(&["pool", "down"]);
    assert!(ok, "{err}");
    assert!(d.stop().success());
    let (ok, out, err) = thinctl_offline(&["pool", "repair", "--root", root_s, "--json"]);
    assert!(ok, "{err}");
    let r = json(&out);
    assert_eq!(r["metadata_replaced"], false, "{out}");
    assert!(r["lost"].as_array().unwrap().is_empty(), "{out}");
    // The periodic backups may have pruned the one made on demand: restore the newest.
    let newest = root.join("backups").join(backups(&root).last().unwrap());
    let newest = newest.to_str().unwrap();
    let (ok, out, err) = thinctl_offline(&["pool", "restore", newest, "--root", root_s]);
    assert!(ok, "{err}");
    assert!(out.starts_with("restored the backup"), "{out}");
    assert!(out.contains("kept: "), "{out}");
    // A bad backup path: non-zero, the reason on stderr.
    let (ok, _, err) = thinctl_offline(&["pool", "restore", root_s, "--root", root_s]);
    assert!(!ok && err.contains("not a backup"), "{err}");

    // The pool serves again, with its snapshot.
    let d2 = Daemon::start(&root, &socket, &["--backup-interval", "0"]);
    let (ok, out, err) = d2.thinctl(&["snapshot", "ls"]);
    assert!(ok && out.contains('a'), "{out}{err}");
    let (ok, out, err) = d2.thinctl(&["pool", "audit"]);
    assert!(ok, "{out}{err}");
}
