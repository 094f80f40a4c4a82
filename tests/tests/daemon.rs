//! The real thinpoold and thinctl binaries: socket ownership and mode, stale and live
//! sockets, a second daemon on the same root, config file, graceful SIGTERM, restart, and
//! every thinctl command (human and --json output, errors on stderr with a non-zero exit).
//!
//! Needs `target/<profile>/thinpoold` and `thinctl`: `cargo build -p thinpool-server -p
//! thinpool-client` (tests/run builds them).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use thinpool_tests::grpc::{Daemon, thinctl};
use thinpool_tests::{on_sim, pool_dir};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn daemon_socket_restart_and_thinctl() {
    let dir = pool_dir("daemon", false);
    let root = dir.join("pool");
    let socket = dir.join("run").join("thinpool.sock");

    // A stale socket (nobody listening) is replaced.
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    // As root, a group root is not in; unprivileged (tests/sim/run), our own group, the only
    // one we may give a file to.
    let uid = nix::unistd::geteuid();
    let group = if uid.is_root() {
        nix::unistd::Group::from_name("daemon")
            .unwrap()
            .expect("group daemon")
    } else {
        nix::unistd::Group::from_gid(nix::unistd::getegid())
            .unwrap()
            .expect("our group has a name")
    };
    let mut d = Daemon::start(&root, &socket, &["--socket-group", &group.name]);
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.uid(), uid.as_raw(), "owned by the daemon's user");
    assert_eq!(meta.gid(), group.gid.as_raw(), "--socket-group");
    assert!(root.join("imagefs").is_dir(), "the image-fs dir is created");

    // A second daemon on the same root is refused, clearly, and leaves the first alone.
    let other_sock = dir.join("other.sock");
    let mut second = Daemon::spawn(&root, &other_sock, &[]);
    let st = second.child.as_mut().unwrap().wait().unwrap();
    second.child = None;
    assert!(!st.success());
    let log = second.log_text();
    assert!(log.contains("another thinpoold running"), "{log}");
    // ... and so is a second daemon on another root but the same (live) socket.
    let root2 = dir.join("pool2");
    let mut third = Daemon::spawn(&root2, &socket, &[]);
    let st = third.child.as_mut().unwrap().wait().unwrap();
    third.child = None;
    assert!(!st.success());
    assert!(
        third.log_text().contains("another server is listening"),
        "{}",
        third.log_text()
    );
    drop(third);

    // thinctl: pool status, human and JSON.
    let (ok, out, err) = d.thinctl(&["pool", "status"]);
    assert!(ok, "{err}");
    for field in [
        "Backend:",
        "Pool Name:",
        "Data Space Used:",
        "Data Space Total:",
        "Metadata Space Available:",
        "Thin Pool Minimum Free Space:",
        "Udev Sync Supported:",
        "Deferred Removal Enabled:",
        "Library Version:",
        "Base Device Size:              256 MiB",
        "Data Space Total:              4 GiB",
    ] {
        assert!(out.contains(field), "{field:?} missing in:\n{out}");
    }
    let (ok, out, _) = d.thinctl(&["pool", "status", "--json"]);
    assert!(ok);
    let s = json(&out);
    for key in [
        "backend",
        "data_used_bytes",
        "data_total_bytes",
        "metadata_used_bytes",
        "metadata_total_bytes",
        "mode",
        "devices",
    ] {
        assert!(s.get(key).is_some(), "{key} missing: {s}");
    }
    assert_eq!(s["data_total_bytes"], 4u64 << 30);
    assert_eq!(s["devices"], 1);
    assert_eq!(s["mode"], "rw");

    // Snapshots through thinctl.
    let ok_ = |args: &[&str]| {
        let (ok, out, err) = d.thinctl(args);
        assert!(ok, "thinctl {args:?} failed: {err}");
        assert!(err.is_empty(), "stderr for {args:?}: {err}");
        out
    };
    let out = ok_(&["snapshot", "prepare", "k1"]);
    assert!(
        out.starts_with("TYPE") && out.contains("ext4"),
        "prepare prints the mount: {out}"
    );
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    if on_sim() {
        // Nothing mounts on sim: thinctl mount fails, saying why.
        let (ok, _, err) = d.thinctl(&["mount", "k1", mnt.to_str().unwrap()]);
        assert!(!ok && !err.is_empty(), "mount of a sim device: {err}");
    }
    let t = d.mount_target("k1", &mnt);
    t.write("hello", b"from layer 1");
    t.write("bulk", &thinpool_tests::pattern(3, 4 << 20));
    d.unmount_target(t);
    ok_(&["snapshot", "commit", "layer1", "k1"]);
    // (Before it has children: on reflink, blocks a child shares are not the layer's own.)
    let usage = ok_(&["snapshot", "usage", "layer1"]);
    assert!(
        usage.starts_with("KEY") && usage.contains("layer1"),
        "{usage}"
    );
    let u = json(&ok_(&["snapshot", "usage", "layer1", "--json"]));
    assert!(u["size_bytes"].as_i64().unwrap() >= 4 << 20, "{u}");
    ok_(&["snapshot", "prepare", "c1", "layer1", "--label", "app=x"]);
    ok_(&["snapshot", "view", "v1", "layer1"]);
    let out = ok_(&["snapshot", "ls"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("KEY") && lines[0].contains("PARENT"));
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["c1", "layer1", "active"]),
        "{out}"
    );
    let ls = json(&ok_(&["snapshot", "ls", "--json"]));
    let arr = ls.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    let c1 = arr.iter().find(|i| i["name"] == "c1").unwrap();
    assert_eq!(c1["parent"], "layer1");
    assert_eq!(c1["kind"], "active");
    assert_eq!(c1["labels"]["app"], "x");
    let filtered = json(&ok_(&[
        "snapshot",
        "ls",
        "--json",
        "--filter",
        "kind==view",
    ]));
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    let tree = ok_(&["snapshot", "tree"]);
    assert!(
        tree.starts_with("layer1 [committed]\n") && tree.contains("\\_ c1 [active]"),
        "{tree}"
    );
    let out = ok_(&["snapshot", "mounts", "v1"]);
    assert!(out.contains("ro"), "{out}");
    let m = json(&ok_(&["snapshot", "mounts", "v1", "--json"]));
    if !on_sim() {
        assert!(m[0]["source"].as_str().unwrap().starts_with("/dev/"));
    }
    let t = d.mount_target("v1", &mnt);
    assert_eq!(t.read("hello"), b"from layer 1");
    d.unmount_target(t);
    let devs = json(&ok_(&["device", "ls", "--json"]));
    assert_eq!(devs.as_array().unwrap().len(), 4, "base + 3: {devs}");
    let out = ok_(&["device", "ls"]);
    assert!(out.starts_with("ID") && out.contains("base"), "{out}");
    let audit = json(&ok_(&["pool", "audit", "--json"]));
    assert_eq!(audit["clean"], true);

    // Errors: stderr, non-zero exit.
    for (args, want) in [
        (vec!["snapshot", "prepare", "k1x", "nope"], "not found"),
        (vec!["snapshot", "prepare", "c1"], "already exists"),
        (vec!["snapshot", "rm", "layer1"], "failed precondition"),
        (
            vec!["snapshot", "ls", "--filter", "name~=x"],
            "invalid argument",
        ),
        (vec!["snapshot", "mounts", "layer1"], "failed precondition"),
    ] {
        let (ok, out, err) = d.thinctl(&args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed {out}");
    }
    let (ok, _, err) = thinctl(&dir.join("nobody.sock"), &["pool", "status"]);
    assert!(!ok && err.contains("cannot connect"), "{err}");

    ok_(&["snapshot", "rm", "v1"]);
    ok_(&["snapshot", "cleanup"]);

    // SIGTERM: a clean exit, the socket removed, devices left active.
    let st = d.stop();
    assert!(st.success(), "exit {st}:\n{}", d.log_text());
    assert!(!socket.exists(), "socket removed on exit");
    assert!(d.log_text().contains("SIGTERM"), "{}", d.log_text());

    // Restart with a config file: the pool is opened, not created; settings given agree.
    let conf = dir.join("thinpoold.toml");
    std::fs::write(
        &conf,
        format!(
            "root = {:?}\nsocket = {:?}\ndata-size = \"4G\"\nmetrics_addr = \"127.0.0.1:19095\"\n",
            root, socket
        ),
    )
    .unwrap();
    let mut d2 = Daemon::start(&root, &socket, &["--config", conf.to_str().unwrap()]);
    let ls = json(&d2.thinctl(&["snapshot", "ls", "--json"]).1);
    let mut names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["c1", "layer1"], "snapshots survive a restart");
    assert!(
        !d2.log_text().contains("creating pool"),
        "{}",
        d2.log_text()
    );
    assert!(d2.stop().success());
    // A setting that conflicts with the pool on disk is refused, naming it.
    let mut bad = Daemon::spawn(&root, &socket, &["--fs", "xfs"]);
    let st = bad.child.as_mut().unwrap().wait().unwrap();
    bad.child = None;
    assert!(!st.success());
    assert!(bad.log_text().contains("setting fs"), "{}", bad.log_text());
    drop(bad);
    drop(d2);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `thinctl pool grow`: grows the data file (sizes before and after, human and JSON; pool
/// status agrees); shrinking is refused with a clear message and a non-zero exit.
#[test]
fn thinctl_pool_grow() {
    let dir = pool_dir("daemon-grow", false);
    let root = dir.join("pool");
    let socket = dir.join("run").join("thinpool.sock");
    // The space flags are taken (and a bad one refused, naming it).
    let mut bad = Daemon::spawn(&root, &socket, &["--autoextend-threshold", "20"]);
    let st = bad.child.as_mut().unwrap().wait().unwrap();
    bad.child = None;
    assert!(!st.success());
    assert!(bad.log_text().contains("threshold"), "{}", bad.log_text());
    drop(bad);
    let flags = [
        "--min-free-space",
        "5",
        "--autoextend-threshold",
        "90",
        "--autoextend-percent",
        "10",
        "--autoextend-max",
        "64G",
    ];
    let d = Daemon::start(&root, &socket, &flags);
    let (ok, out, err) = d.thinctl(&["pool", "status", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(
        json(&out)["min_free_space_percent"].as_u64(),
        Some(5),
        "{out}"
    );
    let total = |d: &Daemon| {
        let (ok, out, err) = d.thinctl(&["pool", "status", "--json"]);
        assert!(ok, "{err}");
        json(&out)["data_total_bytes"].as_u64().unwrap()
    };
    let start = total(&d);

    let (ok, out, err) = d.thinctl(&["pool", "grow", "--data", "+512M"]);
    assert!(ok, "grow failed: {err}");
    assert!(out.contains("data:") && out.contains("->"), "{out}");
    let mid = total(&d);
    assert!(
        mid > start,
        "pool status shows the growth: {start} -> {mid}"
    );

    let (ok, out, err) = d.thinctl(&["pool", "grow", "--data", "+512M", "--json"]);
    assert!(ok, "grow failed: {err}");
    let g = json(&out);
    let before = g["data_size_before_bytes"].as_u64().unwrap();
    let after = g["data_size_after_bytes"].as_u64().unwrap();
    assert_eq!(after, before + (512 << 20), "{out}");
    assert_eq!(
        g["metadata_size_before_bytes"],
        g["metadata_size_after_bytes"]
    );
    let end = total(&d);
    assert!(end > mid, "pool status shows the growth: {mid} -> {end}");

    // Shrinking (and growing to the same size) is refused, clearly.
    for size in ["1G".to_string(), after.to_string()] {
        let size = size.as_str();
        let (ok, out, err) = d.thinctl(&["pool", "grow", "--data", size]);
        assert!(!ok, "grow to {size} succeeded: {out}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("invalid argument") && err.contains("never shrink"),
            "{err}"
        );
    }
    // Nothing to grow, or a bad size: refused too.
    let (ok, _, err) = d.thinctl(&["pool", "grow"]);
    assert!(!ok && err.contains("nothing to grow"), "{err}");
    let (ok, _, err) = d.thinctl(&["pool", "grow", "--data", "+lots"]);
    assert!(!ok && err.contains("invalid argument"), "{err}");
    assert_eq!(total(&d), end, "failed grows change nothing");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

fn get_metrics(addr: &str) -> String {
    thinpool_tests::http::get(addr, "/metrics").expect("GET /metrics")
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `promtool check metrics` on `text`: only the expected "no help text" lines allowed.
fn promtool_check_metrics(dir: &std::path::Path, text: &str) {
    assert!(
        std::path::Path::new("/usr/bin/promtool").exists(),
        "promtool is not installed (apt-get install prometheus; CI installs it)"
    );
    let f = dir.join("metrics.txt");
    std::fs::write(&f, text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&f).unwrap())
        .output()
        .unwrap();
    // promtool (2.42) lints the OpenMetrics text as the Prometheus text format, where a
    // counter family's HELP (named without `_total`) does not cover its `_total` sample:
    // those "no help text" lines are expected. Anything else is a real problem.
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.contains("_total no help text")))
        .collect();
    assert!(problems.is_empty(), "promtool check metrics: {report}");
}

/// thinpoold's /metrics: the required names, figures that agree with pool status, the
/// engine's latency histograms and the gRPC request counts moving with the calls made, and
/// per-device mapped bytes (on here); promtool accepts the text.
#[test]
fn daemon_metrics_endpoint() {
    let dir = pool_dir("daemon-metrics", false);
    let root = dir.join("pool");
    let socket = dir.join("run").join("thinpool.sock");
    let addr = format!("127.0.0.1:{}", thinpool_tests::http::free_port());
    let d = Daemon::start(
        &root,
        &socket,
        &["--metrics-addr", &addr, "--metrics-per-device"],
    );
    // Calls the metrics must count: two snapshots, a commit, a refused snapshot.
    let ok_ = |args: &[&str]| {
        let (ok, out, err) = d.thinctl(args);
        assert!(ok, "thinctl {args:?} failed: {err}");
        out
    };
    ok_(&["snapshot", "prepare", "k1"]);
    ok_(&["snapshot", "commit", "layer1", "k1"]);
    ok_(&["snapshot", "view", "v1", "layer1"]);
    let (ok, _, err) = d.thinctl(&["snapshot", "prepare", "k2", "nosuchparent"]);
    assert!(!ok, "{err}");
    let text = get_metrics(&addr);
    let snap = "service=\"containerd.services.snapshots.v1.Snapshots\"";
    for line in [
        format!("thinpool_grpc_requests_total{{{snap},method=\"Prepare\",code=\"OK\"}} 1"),
        format!("thinpool_grpc_requests_total{{{snap},method=\"Prepare\",code=\"NotFound\"}} 1"),
        format!("thinpool_grpc_requests_total{{{snap},method=\"Commit\",code=\"OK\"}} 1"),
        format!("thinpool_grpc_requests_total{{{snap},method=\"View\",code=\"OK\"}} 1"),
        // Snapshots k1 and v1, and k2, which the engine refuses (it checks the parent).
        "thinpool_operation_duration_seconds_count{operation=\"snapshot\"} 3".into(),
        "thinpool_operation_duration_seconds_count{operation=\"commit\"} 1".into(),
        "thinpool_operation_duration_seconds_bucket{le=\"+Inf\",operation=\"commit\"} 1".into(),
        "thinpool_operation_duration_seconds_count{operation=\"grow\"} 0".into(),
        "thinpool_devices{kind=\"committed\"} 1".into(),
        "thinpool_devices{kind=\"view\"} 1".into(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
    }
    assert!(
        text.contains("thinpool_grpc_requests_total{service=\"thinpool.v1.Admin\",method=\"PoolStatus\",code=\"OK\"}"),
        "the admin service is counted too:\n{text}"
    );
    // Per device: every ready device, labelled by id and kind.
    let per_device: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("thinpool_device_mapped_bytes{"))
        .collect();
    assert_eq!(per_device.len(), 3, "base, layer1, v1:\n{text}");
    assert!(
        per_device
            .iter()
            .any(|l| l.contains("kind=\"base\"") && l.contains("thin_id=")),
        "{per_device:?}"
    );
    let mut last = None;
    for _ in 0..5 {
        let text = get_metrics(&addr);
        for name in [
            "thinpool_data_used_bytes",
            "thinpool_data_size_bytes",
            "thinpool_metadata_used_bytes",
            "thinpool_metadata_size_bytes",
            "thinpool_host_free_bytes",
            "thinpool_low_water_mark_bytes",
            "thinpool_needs_check",
            "thinpool_transaction_id",
        ] {
            assert!(metric(&text, name).is_some(), "{name} missing:\n{text}");
        }
        assert!(text.contains("thinpool_pool_mode{mode=\"rw\"} 1"), "{text}");
        assert!(text.contains("thinpool_devices{kind=\"base\"} 1"), "{text}");
        assert!(
            text.contains("thinpool_metadata_autoextend_max_bytes 0"),
            "{text}"
        );
        assert!(text.contains("thinpool_autoextend_events_total"), "{text}");
        assert!(text.contains("thinpool_guard_rejections_total"), "{text}");
        assert!(text.contains("thinpool_build_info{"), "{text}");
        assert!(
            !text.contains(".."),
            "help texts end in one period:\n{text}"
        );
        let (ok, out, err) = d.thinctl(&["pool", "status", "--json"]);
        assert!(ok, "{err}");
        let st = json(&out);
        let used = metric(&text, "thinpool_data_used_bytes").unwrap() as u64;
        let size = metric(&text, "thinpool_data_size_bytes").unwrap() as u64;
        assert_eq!(st["data_total_bytes"].as_u64(), Some(size));
        if st["data_used_bytes"].as_u64() == Some(used) {
            last = Some(text);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let text = last.expect("thinpool_data_used_bytes never agreed with pool status");
    promtool_check_metrics(&dir, &text);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// deploy/prometheus/thinpool-rules.yml parses and uses only names thinpoold exports.
#[test]
fn prometheus_rules_check() {
    let rules = thinpool_tests::source_path("deploy/prometheus/thinpool-rules.yml");
    let text = std::fs::read_to_string(&rules).unwrap();
    for name in [
        "thinpool_data_used_bytes",
        "thinpool_data_size_bytes",
        "thinpool_metadata_used_bytes",
        "thinpool_metadata_size_bytes",
        "thinpool_needs_check",
        "thinpool_pool_mode",
        "thinpool_autoextend_max_bytes",
        "thinpool_metadata_autoextend_max_bytes",
    ] {
        assert!(text.contains(name), "{name} not used by the rules");
    }
    assert!(
        std::path::Path::new("/usr/bin/promtool").exists(),
        "promtool is not installed (apt-get install prometheus; CI installs it)"
    );
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The autoextend flags, data and metadata, reach the pool (pool status shows them, and
/// they stay after a restart without the flags); on reflink the daemon says clearly that
/// metadata autoextend has no effect.
#[test]
fn daemon_autoextend_flags() {
    let dir = pool_dir("daemon-autoextend-flags", false);
    let root = dir.join("pool");
    let socket = dir.join("run").join("thinpool.sock");
    let mut d = Daemon::start(
        &root,
        &socket,
        &[
            "--min-free-space",
            "5",
            "--autoextend-threshold",
            "80",
            "--autoextend-percent",
            "25",
            "--autoextend-max",
            "8G",
            "--metadata-autoextend-threshold",
            "75",
            "--metadata-autoextend-percent",
            "30",
            "--metadata-autoextend-max",
            "1G",
        ],
    );
    let check = |d: &Daemon| {
        let (ok, out, err) = d.thinctl(&["pool", "status", "--json"]);
        assert!(ok, "{err}");
        let s = json(&out);
        assert_eq!(s["autoextend_data_threshold_percent"], 80, "{s}");
        assert_eq!(s["autoextend_data_percent"], 25, "{s}");
        assert_eq!(s["autoextend_data_max_bytes"], 8u64 << 30, "{s}");
        assert_eq!(s["autoextend_metadata_threshold_percent"], 75, "{s}");
        assert_eq!(s["autoextend_metadata_percent"], 30, "{s}");
        assert_eq!(s["autoextend_metadata_max_bytes"], 1u64 << 30, "{s}");
        let reflink = thinpool_tests::backend() == thinpool::BackendKind::Reflink;
        assert_eq!(s["metadata_can_grow"], !reflink, "{s}");
        let (ok, out, err) = d.thinctl(&["pool", "status"]);
        assert!(ok, "{err}");
        assert!(
            out.contains("Data Autoextend:") && out.contains("above 80%, by 25%, up to 8 GiB"),
            "{out}"
        );
        if reflink {
            assert!(
                out.contains("Metadata Autoextend:")
                    && out.contains("no effect: this backend's metadata cannot grow"),
                "{out}"
            );
            let log = d.log_text();
            assert!(
                log.contains("metadata autoextend")
                    && log.contains("has no effect on the reflink backend"),
                "the daemon must say metadata autoextend does nothing here:\n{log}"
            );
        } else {
            assert!(out.contains("above 75%, by 30%, up to 1 GiB"), "{out}");
        }
    };
    check(&d);
    // Settings given once stay with the pool.
    assert!(d.stop().success());
    drop(d);
    let d = Daemon::start(&root, &socket, &[]);
    check(&d);
    // A bad value is refused at start, naming the setting.
    drop(d);
    let mut bad = Daemon::spawn(
        &dir.join("pool2"),
        &dir.join("other.sock"),
        &["--metadata-autoextend-threshold", "20"],
    );
    let st = bad.child.as_mut().unwrap().wait().unwrap();
    bad.child = None;
    assert!(!st.success());
    assert!(
        bad.log_text().contains("metadata-autoextend"),
        "{}",
        bad.log_text()
    );
    drop(bad);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device thinpoold cannot activate at start is quarantined (docs/recovery.md): the daemon
/// serves, and reports it in `thinctl pool status`, `thinctl pool audit` and `/metrics`.
#[test]
fn daemon_reports_quarantined_devices() {
    let root = pool_dir("daemon-quarantine", false);
    let socket = root.join("thinpool.sock");
    let port = thinpool_tests::http::free_port();
    let addr = format!("127.0.0.1:{port}");
    let extra = ["--metrics-addr", addr.as_str()];
    let mut d = Daemon::start(&root, &socket, &extra);
    d.stop();
    let mut logs = vec![d.log.clone()];
    drop(d); // tears the pool down, as a reboot would
    {
        // A record of an active device the backend lacks (no file, no thin id).
        let store = thinpool::store::Store::open(&root.join("pool.redb")).unwrap();
        let ghost = thinpool::DeviceRecord {
            id: thinpool::ThinId::new(4242).unwrap(),
            name: Some(thinpool::DeviceName::new("bad").unwrap()),
            kind: thinpool::DeviceKind::Active,
            parent: None,
            size: thinpool::Bytes::mib(256),
            state: thinpool::DeviceState::Ready,
            active: true,
            labels: Default::default(),
            created_ns: 0,
            updated_ns: 0,
            usage: None,
        };
        store.write(|w| w.put_device(&ghost)).unwrap();
    }
    let mut d = Daemon::start(&root, &socket, &extra);
    let (ok, out, err) = d.thinctl(&["pool", "status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Quarantined Devices:") && out.contains("4242"),
        "{out}"
    );
    let (ok, out, _) = d.thinctl(&["pool", "audit"]);
    assert!(!ok, "the audit is not clean while a device is quarantined");
    assert!(out.contains("quarantined: [4242]"), "{out}");
    let metrics = thinpool_tests::http::get(&addr, "/metrics").unwrap();
    assert!(
        metrics.contains("thinpool_quarantined_devices 1"),
        "{metrics}"
    );
    let (ok, _, err) = d.thinctl(&["snapshot", "rm", "bad"]);
    assert!(ok, "{err}");
    let (ok, out, err) = d.thinctl(&["pool", "audit"]);
    assert!(ok, "{out}{err}");
    d.stop();
    logs.push(d.log.clone());
    drop(d);
    let _ = std::fs::remove_dir_all(&root);
    for log in logs {
        let _ = std::fs::remove_file(log);
    }
}
