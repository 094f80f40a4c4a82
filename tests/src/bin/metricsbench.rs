//! Metrics benchmark: `cargo run --release -p thinpool-tests --bin metricsbench` (root).
//!
//! On one pool holding `THINPOOL_BENCH_DEVICES` snapshots (default 10,000; made through the
//! engine, inactive, so no loop device or mount each), each figure beside its baseline
//! measured in the same run:
//! - a `/metrics` scrape over HTTP (thinpoold's exporter, in-process, on a TCP port), with
//!   per-device metrics off and on, against the engine calls the scrape is built from
//!   (`status` + `devices`, and `mapped_bytes_all` when per-device is on): the difference is
//!   the encoding and HTTP cost. Target: < 50 ms with 10,000 devices.
//! - the `PoolStatus` RPC: serial, and 32 client tasks (each on its own connection, on a
//!   tokio runtime separate from the server's) for `THINPOOL_BENCH_SECS` (default 5 s),
//!   against the engine calls the handler makes (`status` + `devices`), serial and from 32
//!   threads.
//!
//! Env also: `THINPOOL_BENCH_SCRAPES` (scrapes per mode, default 50). Prints markdown
//! between `=== BENCH BEGIN ===` and `=== BENCH END ===`. The pool is torn down on every
//! path, panics included.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use thinpool::{AsyncPool, Bytes, DeviceKind, DeviceName, Pool, PoolSpec, SnapshotRequest};
use thinpool_client::Client;
use thinpool_server::grpc_metrics::GrpcMetrics;
use thinpool_server::metrics::Exporter;
use thinpool_server::{Service, StaticInfo};
use thinpool_tests::iobench::percentiles;

const WORKERS: usize = 32;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// `GET /metrics` over a fresh connection, as Prometheus does; returns the body's length.
fn scrape(addr: &str) -> usize {
    thinpool_tests::http::get(addr, "/metrics")
        .expect("scrape /metrics")
        .len()
}

fn ratio(x: f64, base: f64) -> String {
    format!("{:.2}×", x / base)
}

struct Figures {
    lines: Vec<String>,
}

fn run(root: &Path, dir: &Path) -> Figures {
    let n = env("THINPOOL_BENCH_DEVICES", 10_000);
    let scrapes = env("THINPOOL_BENCH_SCRAPES", 50).max(2);
    let secs = env("THINPOOL_BENCH_SECS", 5).max(1) as u64;
    let mut spec = thinpool_tests::small_spec(root);
    spec.data_size = Some(Bytes::gib(16));
    spec.metadata_size = Some(Bytes::mib(256));
    // The server's runtime; the clients get their own below.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = server_rt
        .block_on(AsyncPool::open(spec))
        .expect("open pool");
    let engine = pool.engine().clone();
    let mut out = Vec::new();

    // ---- the devices, as cheaply as the engine allows: inactive snapshots of the base.
    let t = Instant::now();
    let threads = 4;
    let made = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|w| {
            let e = engine.clone();
            let made = made.clone();
            std::thread::spawn(move || {
                for i in (w..n).step_by(threads) {
                    e.snapshot(SnapshotRequest {
                        name: DeviceName::new(format!("default/{i}/bench-{i:05}")).unwrap(),
                        parent: None,
                        kind: DeviceKind::Active,
                        size: None,
                        labels: Default::default(),
                        activate: false,
                    })
                    .expect("snapshot");
                    made.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("snapshot thread");
    }
    let create_s = t.elapsed().as_secs_f64();
    assert_eq!(engine.devices().unwrap().len(), n + 1);

    // ---- /metrics, per-device off and on, in-process on TCP ports.
    let grpc = Arc::new(GrpcMetrics::default());
    let mut addrs = Vec::new();
    for per_device in [false, true] {
        let l = server_rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        addrs.push(l.local_addr().unwrap().to_string());
        let exporter = Exporter::new(pool.clone(), grpc.clone(), per_device);
        server_rt.spawn(thinpool_server::metrics::serve(l, exporter));
    }
    let (mut base_off, mut base_on, mut off, mut on) = (vec![], vec![], vec![], vec![]);
    let (mut size_off, mut size_on) = (0, 0);
    scrape(&addrs[0]); // warm-up
    scrape(&addrs[1]);
    // Interleaved, so that the modes and their baselines share any noise.
    for _ in 0..scrapes {
        let t = Instant::now();
        engine.status().unwrap();
        engine.devices().unwrap();
        base_off.push(ms(t));
        let t = Instant::now();
        size_off = scrape(&addrs[0]);
        off.push(ms(t));
        let t = Instant::now();
        engine.status().unwrap();
        engine.devices().unwrap();
        engine.mapped_bytes_all().unwrap();
        base_on.push(ms(t));
        let t = Instant::now();
        size_on = scrape(&addrs[1]);
        on.push(ms(t));
    }
    let (b0_50, b0_99) = percentiles(base_off);
    let (s0_50, s0_99) = percentiles(off);
    let (b1_50, b1_99) = percentiles(base_on);
    let (s1_50, s1_99) = percentiles(on);
    out.push(format!(
        "### /metrics scrape, {n} devices ({} backend)\n",
        thinpool_tests::backend()
    ));
    out.push(format!(
        "{n} snapshots created in {create_s:.1} s ({:.0}/s; engine, {threads} threads, \
         inactive). {scrapes} scrapes per mode, interleaved with their baselines; one HTTP \
         connection per scrape, as Prometheus.\n",
        n as f64 / create_s
    ));
    out.push(
        "| scrape | p50 | p99 | baseline p50 | baseline p99 | p50 ratio | body | target |".into(),
    );
    out.push("|---|---:|---:|---:|---:|---:|---:|---|".into());
    out.push(format!(
        "| per-device off | {s0_50:.1} ms | {s0_99:.1} ms | {b0_50:.1} ms | {b0_99:.1} ms | {} | {:.1} KiB | < 50 ms |",
        ratio(s0_50, b0_50),
        size_off as f64 / 1024.0
    ));
    out.push(format!(
        "| per-device on | {s1_50:.1} ms | {s1_99:.1} ms | {b1_50:.1} ms | {b1_99:.1} ms | {} | {:.1} KiB | < 50 ms |",
        ratio(s1_50, b1_50),
        size_on as f64 / 1024.0
    ));
    out.push(
        "\nBaseline: the engine calls the scrape is built from, made directly in the same \
         run (off: `status` + `devices`; on: also `mapped_bytes_all`)."
            .into(),
    );

    // ---- PoolStatus RPC: the server on its runtime, the clients on theirs.
    let socket = dir.join("bench.sock");
    let listener = {
        let _g = server_rt.enter();
        thinpool_server::bind_socket(&socket, None).unwrap()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = Service::new(pool.clone(), StaticInfo::default());
    let server = server_rt.spawn(thinpool_server::serve_counted(
        service,
        listener,
        async {
            let _ = stop_rx.await;
        },
        grpc.clone(),
    ));
    // The same services without the counting layer, for its cost.
    let socket_plain = dir.join("plain.sock");
    let listener = {
        let _g = server_rt.enter();
        thinpool_server::bind_socket(&socket_plain, None).unwrap()
    };
    let (stop_plain_tx, stop_plain_rx) = tokio::sync::oneshot::channel::<()>();
    let plain = server_rt.spawn(thinpool_server::serve(
        Service::new(pool.clone(), StaticInfo::default()),
        listener,
        async {
            let _ = stop_plain_rx.await;
        },
    ));
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The layer's cost, on a cheap RPC (Stat: one record read) so that it is not lost in
    // PoolStatus's device count: alternating calls to the two servers.
    let stat_calls = env("THINPOOL_BENCH_STATS", 2000);
    let (stat_counted, stat_plain) = client_rt.block_on(async {
        let mut counted = Client::connect(&socket).await.unwrap();
        let mut plain = Client::connect(&socket_plain).await.unwrap();
        let key = "default/0/bench-00000";
        counted.stat(key).await.unwrap();
        plain.stat(key).await.unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..stat_calls {
            let t = Instant::now();
            counted.stat(key).await.unwrap();
            a.push(ms(t));
            let t = Instant::now();
            plain.stat(key).await.unwrap();
            b.push(ms(t));
        }
        (a, b)
    });
    let _ = stop_plain_tx.send(());
    server_rt.block_on(plain).unwrap().unwrap();
    let dur = Duration::from_secs(secs);
    // What the handler asks the engine for (besides settings and a statvfs).
    let engine_call = |e: &Pool| {
        e.status().unwrap();
        e.devices().unwrap();
    };
    // Serial: engine and RPC calls alternating, so that they share any noise.
    let (eng_serial, rpc_serial) = client_rt.block_on(async {
        let mut c = Client::connect(&socket).await.unwrap();
        c.pool_status().await.unwrap();
        let (mut e, mut r) = (Vec::new(), Vec::new());
        let t0 = Instant::now();
        while t0.elapsed() < dur {
            let t = Instant::now();
            engine_call(&engine);
            e.push(ms(t));
            let t = Instant::now();
            c.pool_status().await.unwrap();
            r.push(ms(t));
        }
        (e, r)
    });
    // Calls per second of time spent in that mode's calls.
    let tput = |v: &[f64]| v.len() as f64 / (v.iter().sum::<f64>() / 1e3);
    let (eng_serial_tput, rpc_serial_tput) = (tput(&eng_serial), tput(&rpc_serial));
    // 32-way: engine from 32 threads, then 32 RPC clients.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..WORKERS)
        .map(|_| {
            let e = engine.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    e.status().unwrap();
                    e.devices().unwrap();
                    v.push(ms(t));
                }
                v
            })
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut eng_conc = Vec::new();
    for h in handles {
        eng_conc.extend(h.join().unwrap());
    }
    let eng_conc_tput = eng_conc.len() as f64 / t0.elapsed().as_secs_f64();
    let (rpc_conc, rpc_conc_tput) = client_rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..WORKERS {
            let mut c = Client::connect(&socket).await.unwrap();
            c.pool_status().await.unwrap();
            clients.push(c);
        }
        let t0 = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                tokio::spawn(async move {
                    let mut v = Vec::new();
                    while t0.elapsed() < dur {
                        let t = Instant::now();
                        c.pool_status().await.unwrap();
                        v.push(ms(t));
                    }
                    v
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let tput = all.len() as f64 / t0.elapsed().as_secs_f64();
        (all, tput)
    });
    let _ = stop_tx.send(());
    server_rt.block_on(server).unwrap().unwrap();
    drop(client_rt);
    let counted: u64 = grpc
        .read()
        .iter()
        .filter(|r| r.method == "PoolStatus")
        .map(|r| r.count)
        .sum();
    let calls = (rpc_serial.len() + rpc_conc.len() + WORKERS + 1) as u64;
    assert_eq!(
        counted, calls,
        "thinpool_grpc_requests_total counts every PoolStatus"
    );
    let (sc50, sc99) = percentiles(stat_counted);
    let (sp50, sp99) = percentiles(stat_plain);
    let (es50, es99) = percentiles(eng_serial);
    let (rs50, rs99) = percentiles(rpc_serial);
    let (ec50, ec99) = percentiles(eng_conc);
    let (rc50, rc99) = percentiles(rpc_conc);
    out.push(format!(
        "\n### PoolStatus RPC, {n} devices\n\n{secs} s per concurrent mode, {secs} s for the \
         two serial modes alternating call by call (throughput: calls over the time spent in \
         that mode's calls); RPC over the unix socket to the in-process server (gRPC metrics layer on), \
         clients on their own tokio runtime, one connection each. Baseline: the engine calls \
         the handler makes (`status` + `devices`), directly.\n"
    ));
    out.push(
        "| mode | p50 | p99 | throughput | baseline p50 | baseline p99 | baseline throughput |"
            .into(),
    );
    out.push("|---|---:|---:|---:|---:|---:|---:|".into());
    out.push(format!(
        "| serial | {rs50:.2} ms | {rs99:.2} ms | {rpc_serial_tput:.0}/s | {es50:.2} ms | {es99:.2} ms | {eng_serial_tput:.0}/s |"
    ));
    out.push(format!(
        "| {WORKERS}-way | {rc50:.2} ms | {rc99:.2} ms | {rpc_conc_tput:.0}/s | {ec50:.2} ms | {ec99:.2} ms | {eng_conc_tput:.0}/s |"
    ));
    out.push(format!(
        "\nRatios (RPC / engine): serial p50 {}, {WORKERS}-way p50 {}, {WORKERS}-way throughput {}.",
        ratio(rs50, es50),
        ratio(rc50, ec50),
        ratio(rpc_conc_tput, eng_conc_tput)
    ));
    out.push(format!(
        "\n### The gRPC counting layer's cost\n\n{stat_calls} `Stat` calls each, alternating \
         between the server with the layer (thinpoold's) and the same services without it \
         (baseline), serial, in the same run.\n"
    ));
    out.push("| Stat | p50 | p99 |".into());
    out.push("|---|---:|---:|".into());
    out.push(format!("| with the layer | {sc50:.3} ms | {sc99:.3} ms |"));
    out.push(format!(
        "| without (baseline) | {sp50:.3} ms | {sp99:.3} ms |"
    ));
    out.push(format!(
        "| difference | {:+.3} ms ({}) | {:+.3} ms |",
        sc50 - sp50,
        ratio(sc50, sp50),
        sc99 - sp99
    ));
    drop(pool);
    drop(server_rt); // the exporter tasks and their pool handles
    match Arc::try_unwrap(engine) {
        Ok(p) => p.close(true).expect("close pool"),
        Err(_) => panic!("the pool is still shared at the end"),
    }
    Figures { lines: out }
}

fn main() {
    let dir: PathBuf = thinpool_tests::base_dir().join("metricsbench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = dir.join("pool");
    let result = std::panic::catch_unwind(|| run(&root, &dir));
    // Everything `run` opened is dropped by now; a pool it left open (a panic) is closed
    // but still assembled: reopen it to tear it down, as a reboot would.
    if result.is_err()
        && root.join("pool.redb").exists()
        && let Ok(p) = Pool::open(&PoolSpec {
            root: root.clone(),
            ..Default::default()
        })
    {
        let _ = p.close(true);
    }
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(f) => {
            println!("=== BENCH BEGIN ===");
            for l in f.lines {
                println!("{l}");
            }
            println!("=== BENCH END ===");
        }
        Err(e) => std::panic::resume_unwind(e),
    }
}
