//! Hardening of the real thinpoold (issue 10): a failed start leaves nothing behind, the
//! metrics port survives idle connections, and unread List streams do not pin memory.
//! Host-only (tests/vm/run does not run it): it needs the host's thinpoold build.

use std::path::Path;

use thinpool::DeviceKind;
use thinpool_tests::grpc::Daemon;
use thinpool_tests::{TestPool, kernel_leftovers_under, pool_dir, request, small_spec};

/// Starts thinpoold expecting it to fail; returns its log.
fn start_fails(root: &Path, socket: &Path, extra: &[&str]) -> String {
    let mut d = Daemon::spawn(root, socket, extra);
    let st = d.child.as_mut().unwrap().wait().unwrap();
    d.child = None;
    let log = d.log_text();
    assert!(!st.success(), "thinpoold should fail to start:\n{log}");
    log
}

/// A start that fails (busy socket, busy metrics port, a bad setting) creates nothing: no
/// pool root, no loop device, no mount (probe D8, N11).
#[test]
fn failed_start_leaves_nothing_behind() {
    let dir = pool_dir("failed-start", false);
    // Another server on the socket.
    let busy_socket = dir.join("busy.sock");
    let _other = std::os::unix::net::UnixListener::bind(&busy_socket).unwrap();
    let root = dir.join("pool-socket");
    let log = start_fails(&root, &busy_socket, &[]);
    assert!(log.contains("another server is listening"), "{log}");
    assert!(!root.exists(), "{} was created:\n{log}", root.display());

    // Another server on the metrics port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = port.local_addr().unwrap().to_string();
    let root = dir.join("pool-port");
    let socket = dir.join("port.sock");
    let log = start_fails(&root, &socket, &["--metrics-addr", &addr]);
    assert!(log.contains("binding the metrics address"), "{log}");
    assert!(!root.exists(), "{} was created:\n{log}", root.display());
    assert!(!socket.exists(), "socket left behind");

    // A setting out of range.
    let root = dir.join("pool-setting");
    let log = start_fails(&root, &socket, &["--min-free-space", "60"]);
    assert!(log.contains("min_free_space"), "{log}");
    assert!(!root.exists(), "{} was created:\n{log}", root.display());
    assert!(!socket.exists(), "socket left behind");

    // A pool that cannot open (another daemon holds it): our socket is removed again.
    let root = dir.join("pool-held");
    let socket2 = dir.join("held2.sock");
    let mut first = Daemon::start(&root, &dir.join("held1.sock"), &[]);
    let log = start_fails(&root, &socket2, &[]);
    assert!(log.contains("another thinpoold running"), "{log}");
    assert!(!socket2.exists(), "socket left behind");
    first.stop();
    drop(first); // tears the pool down

    let left = kernel_leftovers_under(&dir);
    assert!(left.is_empty(), "left behind: {left:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raises this process's soft open-files limit to the hard one (the test holds thousands of
/// sockets).
fn raise_nofile() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read and write one rlimit we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = rl.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The metrics address the daemon logged (it binds port 0 here).
fn logged_metrics_addr(d: &Daemon) -> String {
    let log = strip_ansi(&d.log_text());
    let line = log
        .lines()
        .find(|l| l.contains("serving /metrics"))
        .unwrap_or_else(|| panic!("no 'serving /metrics' line:\n{log}"));
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line}"));
    assert!(
        !addr.ends_with(":0"),
        "the bound port is logged, not 0: {line}"
    );
    addr.to_string()
}

/// 2,000 idle TCP connections on the metrics port (any local user can open them) neither
/// stall the gRPC API nor take the daemon's fds, and a scrape still works (probe D2,
/// review #27). An idle connection is closed after the header timeout.
#[test]
fn metrics_port_survives_idle_connections() {
    raise_nofile();
    let dir = pool_dir("idle-conns", false);
    let root = dir.join("pool");
    let socket = dir.join("tp.sock");
    let d = Daemon::start(&root, &socket, &["--metrics-addr", "127.0.0.1:0"]);
    let pid = d.child.as_ref().unwrap().id();
    let addr = logged_metrics_addr(&d);
    let fds_before = open_fds(pid);

    let held: Vec<std::net::TcpStream> = (0..2000)
        .map(|i| {
            std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let fds_held = open_fds(pid);

    let t = std::time::Instant::now();
    let (ok, out, err) = d.thinctl(&["pool", "status"]);
    let status_time = t.elapsed();
    assert!(ok, "pool status: {err}");
    assert!(out.contains("Data Space Total"), "{out}");
    let text = thinpoold_get(&addr, "/metrics");
    assert!(text.contains("thinpool_data_size_bytes"), "{text}");
    let health = thinpoold_get(&addr, "/healthz");
    assert!(health.starts_with("ok: pool mode rw"), "{health}");
    eprintln!(
        "2000 idle connections: daemon fds {fds_before} before, {fds_held} while held; \
         pool status took {status_time:?}"
    );
    assert!(
        status_time < std::time::Duration::from_secs(1),
        "pool status took {status_time:?}"
    );
    assert!(
        fds_held < fds_before + 100,
        "the idle connections took daemon fds: {fds_before} -> {fds_held}"
    );

    // The newest idle connection is closed by the server after the header timeout (5 s).
    let mut last = held.last().unwrap();
    last.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 1];
    match std::io::Read::read(&mut last, &mut buf) {
        Ok(_) => {} // closed (0), or an error response before the close
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("idle connection not closed after {:?}: {e}", t.elapsed()),
    }
    eprintln!("an idle connection was closed after {:?}", t.elapsed());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "idle connection held for {:?}",
        t.elapsed()
    );
    drop(held);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// GET with retries, for a server that may close a connection it evicts.
fn thinpoold_get(addr: &str, path: &str) -> String {
    thinpool_tests::http::get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The log without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn daemon_rss_mb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024
}

/// N unread List streams do not grow the daemon's memory by N listings: a stream holds a
/// page or two (probe D7).
#[test]
fn unread_list_streams_do_not_pin_memory() {
    let dir = pool_dir("list-memory", false);
    let root = dir.join("pool");
    // 300 snapshots with 15 labels of 4,000 bytes: an 18 MB listing. Made through the
    // engine (inactive: no loop device each), then served by a real daemon.
    {
        let mut tp = TestPool::open(&small_spec(&root));
        let big = "x".repeat(4000);
        for i in 0..300 {
            let mut req = request(&format!("s{i:03}"), None, DeviceKind::Active);
            for l in 0..15 {
                req.labels.insert(format!("l{l}"), big.clone());
            }
            tp.pool().snapshot(req).unwrap();
        }
        tp.close(false);
        tp.keep_dir();
    }
    let socket = dir.join("tp.sock");
    let d = Daemon::start(&root, &socket, &[]);
    let pid = d.child.as_ref().unwrap().id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = thinpool_client::Client::connect(&socket).await.unwrap();
        assert_eq!(c.list(&[]).await.unwrap().len(), 300, "a List read whole");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let before = daemon_rss_mb(pid);
        // 20 List streams, each on its own connection, never read.
        let mut held = Vec::new();
        for _ in 0..20 {
            let c = thinpool_client::Client::connect(&socket).await.unwrap();
            let s = c
                .snapshots_raw()
                .list(thinpool_proto::snapshots::ListSnapshotsRequest {
                    snapshotter: "thinpool".into(),
                    filters: vec![],
                })
                .await
                .unwrap();
            held.push((c, s));
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let after = daemon_rss_mb(pid);
        let grown = after.saturating_sub(before);
        eprintln!(
            "thinpoold RSS with 20 unread List streams of an 18 MB listing: {before} MB -> \
             {after} MB (+{grown} MB)"
        );
        assert!(grown < 80, "thinpoold RSS grew by {grown} MB");
        // A stream that is read gets everything.
        let (_, mut s) = held.pop().unwrap();
        let mut n = 0;
        while let Some(m) = s.get_mut().message().await.unwrap() {
            n += m.info.len();
        }
        assert_eq!(n, 300);
    });
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
