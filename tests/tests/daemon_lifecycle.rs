//! The real thinpoold's life cycle: systemd's readiness protocol (READY=1 once the pool is
//! open and both servers serve, STOPPING=1 on stop), `systemd-analyze verify` of the unit in
//! deploy/systemd, and taking the pool down on purpose (`thinctl pool down`): refused while
//! a device is mounted, changing nothing; then nothing of the pool stays in the kernel, and
//! the next start brings every snapshot back with its data.
//!
//! Host-only (tests/vm/run leaves it out): it needs the host's thinpoold and thinctl builds.
//! The take-down path on dm is tested at engine level in suite.rs, in the VM.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use thinpool_tests::grpc::{Daemon, bin};
use thinpool_tests::{Target, kernel_leftovers, pattern, pool_dir, sha256_hex};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The pool's tag in its kernel name (dm: thinpool-<tag>-pool; reflink: thinpool-<tag>;
/// sim: thinpool-<tag>-sim).
fn tag_of(pool_name: &str) -> String {
    let t = pool_name.strip_prefix("thinpool-").expect("pool name");
    let t = t.strip_suffix("-pool").unwrap_or(t);
    t.strip_suffix("-sim").unwrap_or(t).to_string()
}

/// Waits for the daemon to exit by itself (after a take-down); returns its status.
fn wait_exit(d: &mut Daemon) -> std::process::ExitStatus {
    let mut child = d.child.take().expect("running");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "thinpoold still runs 60 s after pool down:\n{}",
                d.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ok(d: &Daemon, args: &[&str]) -> String {
    let (ok, out, err) = d.thinctl(args);
    assert!(ok, "thinctl {args:?} failed: {err}\n{}", d.log_text());
    out
}

/// The unit in deploy/systemd passes `systemd-analyze verify`. verify insists that
/// ExecStart's binary exists, and /usr/local/bin/thinpoold is not installed on a build
/// machine: so it checks a copy that differs only in that path, pointed at the binary
/// built here (installing into /usr/local/bin from a test would touch the host).
#[test]
fn systemd_unit_verifies() {
    let unit = thinpool_tests::source_path("deploy/systemd/thinpoold.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for want in [
        "Type=notify",
        "StateDirectoryMode=0700",
        "StateDirectory=thinpool",
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "{want} missing in the unit"
        );
    }
    const EXEC: &str = "ExecStart=/usr/local/bin/thinpoold ";
    assert_eq!(
        text.matches(EXEC).count(),
        1,
        "one ExecStart of /usr/local/bin/thinpoold"
    );
    let copy = text.replace(EXEC, &format!("ExecStart={} ", bin("thinpoold").display()));
    let dir = pool_dir("systemd-unit", false);
    let path = dir.join("thinpoold.service");
    std::fs::write(&path, copy).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/setup --native-tests installs systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{err}"
    );
    // Its other units may draw warnings on this host; ours must draw none.
    assert!(
        !err.contains("thinpoold.service"),
        "warnings about the unit:\n{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// READY=1 arrives once the socket answers and /metrics serves (no retry needed after it),
/// nothing before it; STOPPING=1 arrives on SIGTERM, not before. The notify socket is an
/// abstract one (`@name`), as systemd may hand out; path sockets are unit-tested in
/// server/src/sdnotify.rs.
#[test]
fn daemon_sd_notify_ready_and_stopping() {
    use std::os::linux::net::SocketAddrExt;
    let dir = pool_dir("sdnotify", false);
    let name = format!("thinpool-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let metrics = format!("127.0.0.1:{}", thinpool_tests::http::free_port());
    let notify = format!("@{name}");
    let mut d = Daemon::spawn_env(
        &dir.join("pool"),
        &dir.join("thinpool.sock"),
        &["--metrics-addr", &metrics],
        &[("NOTIFY_SOCKET", &notify)],
    );
    let recv = |d: &Daemon| -> String {
        let mut buf = [0u8; 512];
        match sock.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => panic!("no notify datagram ({e}):\n{}", d.log_text()),
        }
    };
    assert_eq!(recv(&d), "READY=1", "the first message is READY=1");
    // At READY=1 both servers answer at the first try.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = thinpool_client::Client::connect(&d.socket)
            .await
            .expect("socket serves at READY=1");
        c.pool_status().await.expect("PoolStatus at READY=1");
    });
    // Closes the connection: its task lives on this runtime, and a graceful stop waits for
    // open connections.
    drop(rt);
    let body = thinpool_tests::http::get(&metrics, "/metrics").expect("/metrics at READY=1");
    assert!(body.contains("thinpool_pool_mode"), "{body}");
    // The ready line for people (scripts/run) names the socket and the bound metrics address.
    let log = d.log_text();
    assert!(
        log.contains("ready; try:") && log.contains(&format!("http://{metrics}/metrics")),
        "{log}"
    );
    // Nothing more until we stop it.
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let early = sock.recv(&mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a message before SIGTERM: {early:?}"
    );
    sock.set_nonblocking(false).unwrap();
    let st = d.stop();
    assert!(st.success(), "exit {st}:\n{}", d.log_text());
    assert_eq!(recv(&d), "STOPPING=1");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// On drop (also when the test fails): unmounts the test's mount point, then tears down
/// what the daemons left, as a reboot would. Declared first, so it drops after them.
struct Cleanup {
    mnt: PathBuf,
    root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = thinpool::mount::unmount(&self.mnt);
        if self.root.join("pool.redb").exists()
            && let Ok(p) = thinpool::Pool::open(&thinpool::PoolSpec {
                root: self.root.clone(),
                ..Default::default()
            })
        {
            let _ = p.close(true);
        }
    }
}

/// `thinctl pool down`: refused while a snapshot is mounted, changing nothing; then it takes
/// everything down and the daemon exits; the next start brings every snapshot back with
/// its data (checksums), and a second take-down leaves nothing either.
#[test]
fn daemon_pool_down_and_back() {
    let dir = pool_dir("pool-down", false);
    let root = dir.join("pool");
    let socket = dir.join("thinpool.sock");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let _cleanup = Cleanup {
        mnt: mnt.clone(),
        root: root.clone(),
    };
    let m = mnt.as_path();
    let mut d = Daemon::start(&root, &socket, &[]);
    let status = json(&ok(&d, &["pool", "status", "--json"]));
    let tag = tag_of(status["pool_name"].as_str().unwrap());

    // layer1 (committed) <- c1 (active, mounted) and v1 (a view, active read-only).
    let bulk = pattern(11, 3 << 20);
    ok(&d, &["snapshot", "prepare", "k1"]);
    let t = d.mount_target("k1", m);
    t.write("bulk", &bulk);
    d.unmount_target(t);
    ok(&d, &["snapshot", "commit", "layer1", "k1"]);
    ok(&d, &["snapshot", "prepare", "c1", "layer1"]);
    ok(&d, &["snapshot", "view", "v1", "layer1"]);
    let c1 = d.mount_target("c1", m);
    let own = pattern(12, 1 << 20);
    c1.write("own", &own);
    let devices_before = json(&ok(&d, &["device", "ls", "--json"]));
    assert!(!kernel_leftovers(&root, &tag).is_empty(), "the pool is up");

    // Busy: refused, naming the device, and nothing changes.
    let (good, out, err) = d.thinctl(&["pool", "down"]);
    assert!(!good, "pool down with c1 mounted succeeded: {out}");
    assert!(
        err.contains("failed precondition") && err.contains("\"c1\""),
        "{err}"
    );
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "daemon exited"
    );
    assert_eq!(
        json(&ok(&d, &["device", "ls", "--json"])),
        devices_before,
        "changed"
    );
    assert_eq!(c1.read("own"), own, "the mounted device still works");
    ok(&d, &["snapshot", "prepare", "c2", "layer1"]); // and the pool still serves

    // Idle: down, and the daemon exits cleanly.
    d.unmount_target(c1);
    let out = ok(&d, &["pool", "down", "--json"]);
    let r = json(&out);
    assert_eq!(r["pool_down"], true, "{out}");
    assert!(r["busy"].as_array().unwrap().is_empty(), "{out}");
    let st = wait_exit(&mut d);
    assert!(st.success(), "exit {st}:\n{}", d.log_text());
    assert!(d.log_text().contains("pool taken down"), "{}", d.log_text());
    assert!(!socket.exists(), "socket removed");
    assert_eq!(
        kernel_leftovers(&root, &tag),
        Vec::<String>::new(),
        "left after pool down"
    );

    // The next start brings everything back.
    let mut d = Daemon::start(&root, &socket, &[]);
    let ls = json(&ok(&d, &["snapshot", "ls", "--json"]));
    let mut names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["c1", "c2", "layer1", "v1"]);
    let c1 = d.mount_target("c1", m);
    assert_eq!(sha256_hex(&c1.read("own")), sha256_hex(&own));
    assert_eq!(sha256_hex(&c1.read("bulk")), sha256_hex(&bulk));
    d.unmount_target(c1);
    let v1 = d.mount_target("v1", m);
    assert_eq!(sha256_hex(&v1.read("bulk")), sha256_hex(&bulk));
    assert!(!v1.exists("own"), "the view shows layer1, not c1");
    d.unmount_target(v1);
    assert_eq!(json(&ok(&d, &["pool", "audit", "--json"]))["clean"], true);

    // --force with c1 mounted: the daemon exits; c1 stays mounted and working, and so does
    // the pool under it (the state a plain stop leaves), which the next start opens.
    let c1 = d.mount_target("c1", m);
    let r = json(&ok(&d, &["pool", "down", "--force", "--json"]));
    assert_eq!(r["pool_down"], false, "{r}");
    assert_eq!(r["busy"].as_array().unwrap().len(), 1, "{r}");
    let st = wait_exit(&mut d);
    assert!(st.success(), "exit {st}:\n{}", d.log_text());
    assert_eq!(c1.read("own"), own, "a forced take-down keeps c1 working");
    let d = Daemon::start(&root, &socket, &[]);
    match &c1 {
        Target::Mounted(dir) => thinpool::mount::unmount(dir).unwrap(),
        Target::Held { .. } => drop(c1),
    }
    ok(&d, &["pool", "down"]);
    let mut d = d;
    assert!(wait_exit(&mut d).success(), "{}", d.log_text());
    assert_eq!(
        kernel_leftovers(&root, &tag),
        Vec::<String>::new(),
        "left after pool down"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
