//! gRPC benchmark: `cargo run --release -p thinpool-tests --bin grpcbench` (root; builds on
//! `target/release/thinpoold`, so `cargo build --release` first).
//!
//! Each figure beside its baseline, measured in the same run on the same pool:
//! - Prepare→Mounts latency through gRPC (in-process server, unix socket, one connection per
//!   worker; the clients on runtimes of their own, as in a separate process) against the same engine calls made directly (activating snapshot + activate + activate),
//!   serial and 32-way concurrent; passes alternate between the two to share any noise.
//! - List of 10,000 snapshots through a real thinpoold, against the engine's own read of
//!   all records; and thinpoold's RSS with 10,000 snapshots.
//!
//! Env: `THINPOOL_BENCH_OPS` (serial ops per pass, default 200), `THINPOOL_BENCH_LIST`
//! (snapshots for the List figure, default 10000). Prints markdown.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinpool::{AsyncPool, DeviceKind, DeviceName, Pool, RemoveOptions, SnapshotRequest};
use thinpool_client::Client;
use thinpool_server::{Service, StaticInfo};
use thinpool_tests::iobench::percentiles;

const WORKERS: usize = 32;
const PASSES: usize = 3;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn name(s: &str) -> DeviceName {
    DeviceName::new(s).unwrap()
}

fn req(key: &str, parent: &str) -> SnapshotRequest {
    SnapshotRequest {
        name: name(key),
        parent: Some(name(parent)),
        kind: DeviceKind::Active,
        size: None,
        labels: Default::default(),
        activate: false,
    }
}

/// One Prepare→Mounts through the engine directly, in ms.
fn engine_op(pool: &Pool, key: &str) -> f64 {
    let t = Instant::now();
    // What the server does: create+activate in one commit, then the spec, then Mounts.
    pool.snapshot(SnapshotRequest {
        activate: true,
        ..req(key, "layer")
    })
    .unwrap();
    pool.activate(&name(key)).unwrap();
    pool.activate(&name(key)).unwrap(); // Mounts
    t.elapsed().as_secs_f64() * 1e3
}

/// One Prepare→Mounts through gRPC, in ms.
async fn grpc_op(c: &mut Client, key: &str) -> f64 {
    let t = Instant::now();
    c.prepare(key, Some("layer"), HashMap::new()).await.unwrap();
    c.mounts(key).await.unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

/// Removes the pass's snapshots and reclaims their devices (not timed).
fn clean(pool: &Pool, keys: &[String]) {
    for k in keys {
        pool.remove(
            &name(k),
            RemoveOptions {
                deferred: true,
                ..Default::default()
            },
        )
        .unwrap();
    }
    pool.reclaim().unwrap();
}

fn fmt_ratio(grpc: f64, base: f64) -> String {
    format!("{:+.1}%", (grpc / base - 1.0) * 100.0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn thinpoold() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().join("thinpoold");
    assert!(
        p.is_file(),
        "{} missing: cargo build --release -p thinpool-server",
        p.display()
    );
    p
}

fn main() {
    let ops = env("THINPOOL_BENCH_OPS", 200);
    let list_n = env("THINPOOL_BENCH_LIST", 10_000);
    let dir = thinpool_tests::base_dir().join("grpcbench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = dir.join("pool");
    let mut spec = thinpool_tests::small_spec(&root);
    spec.data_size = Some(thinpool::Bytes::gib(16));
    spec.metadata_size = Some(thinpool::Bytes::mib(256));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = rt.block_on(AsyncPool::open(spec)).expect("open pool");
    let engine = pool.engine().clone();
    engine
        .snapshot(SnapshotRequest {
            parent: None,
            ..req("layer-k", "x")
        })
        .unwrap();
    engine
        .commit(&name("layer-k"), &name("layer"), None)
        .unwrap();

    // The server, in-process, on a unix socket.
    let socket = dir.join("bench.sock");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = {
        let _g = rt.enter();
        thinpool_server::bind_socket(&socket, None).unwrap()
    };
    let service = Service::new(pool.clone(), StaticInfo::default());
    let server = rt.spawn(thinpool_server::serve(service, listener, async {
        let _ = stop_rx.await;
    }));

    // The clients run on runtimes of their own, as containerd does in its own process: a
    // client sharing the server's two worker threads would make them contend for those.
    let crt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let crt_mt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    // ---- Prepare→Mounts, serial
    let mut serial_engine = Vec::new();
    let mut serial_grpc = Vec::new();
    let mut c = crt.block_on(Client::connect(&socket)).unwrap();
    for pass in 0..PASSES {
        let keys: Vec<String> = (0..ops).map(|i| format!("e{pass}-{i}")).collect();
        for k in &keys {
            serial_engine.push(engine_op(&engine, k));
        }
        clean(&engine, &keys);
        let keys: Vec<String> = (0..ops).map(|i| format!("g{pass}-{i}")).collect();
        crt.block_on(async {
            for k in &keys {
                serial_grpc.push(grpc_op(&mut c, k).await);
            }
        });
        clean(&engine, &keys);
    }

    // ---- The fixed cost of one RPC: Stat (a record read) through gRPC vs the engine.
    let mut stat_engine = Vec::new();
    let mut stat_grpc = Vec::new();
    for _ in 0..PASSES {
        for _ in 0..ops {
            let t = Instant::now();
            engine.device(&name("layer")).unwrap();
            stat_engine.push(t.elapsed().as_secs_f64() * 1e3);
        }
        crt.block_on(async {
            for _ in 0..ops {
                let t = Instant::now();
                c.stat("layer").await.unwrap();
                stat_grpc.push(t.elapsed().as_secs_f64() * 1e3);
            }
        });
    }

    // ---- Prepare→Mounts, 32-way concurrent
    let per_worker = (ops / WORKERS).max(4);
    let mut conc_engine = Vec::new();
    let mut conc_grpc = Vec::new();
    let mut wall_engine = 0.0;
    let mut wall_grpc = 0.0;
    for pass in 0..PASSES {
        let t = Instant::now();
        let threads: Vec<_> = (0..WORKERS)
            .map(|w| {
                let e = engine.clone();
                std::thread::spawn(move || {
                    (0..per_worker)
                        .map(|i| engine_op(&e, &format!("ce{pass}-{w}-{i}")))
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        for th in threads {
            conc_engine.extend(th.join().unwrap());
        }
        wall_engine += t.elapsed().as_secs_f64();
        let keys: Vec<String> = (0..WORKERS)
            .flat_map(|w| (0..per_worker).map(move |i| format!("ce{pass}-{w}-{i}")))
            .collect();
        clean(&engine, &keys);

        let lat: Vec<f64> = crt_mt.block_on(async {
            let mut clients = Vec::new();
            for _ in 0..WORKERS {
                clients.push(Client::connect(&socket).await.unwrap());
            }
            let t = Instant::now();
            let tasks: Vec<_> = clients
                .into_iter()
                .enumerate()
                .map(|(w, mut c)| {
                    tokio::spawn(async move {
                        let mut v = Vec::new();
                        for i in 0..per_worker {
                            v.push(grpc_op(&mut c, &format!("cg{pass}-{w}-{i}")).await);
                        }
                        v
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            wall_grpc += t.elapsed().as_secs_f64();
            all
        });
        conc_grpc.extend(lat);
        let keys: Vec<String> = (0..WORKERS)
            .flat_map(|w| (0..per_worker).map(move |i| format!("cg{pass}-{w}-{i}")))
            .collect();
        clean(&engine, &keys);
    }
    // Close the clients' connections (dropping their runtimes ends their tasks) so that the
    // server's graceful shutdown does not wait for them.
    drop(c);
    drop(crt);
    drop(crt_mt);
    let _ = stop_tx.send(());
    rt.block_on(server).unwrap().unwrap();

    // ---- report, part 1
    let (se50, se99) = percentiles(serial_engine.clone());
    let (sg50, sg99) = percentiles(serial_grpc.clone());
    let (ce50, ce99) = percentiles(conc_engine.clone());
    let (cg50, cg99) = percentiles(conc_grpc.clone());
    let conc_ops = (per_worker * WORKERS * PASSES) as f64;
    println!("=== BENCH BEGIN ===");
    println!(
        "## gRPC overhead and List at scale ({} backend)\n",
        thinpool_tests::backend()
    );
    println!(
        "Prepare→Mounts: gRPC = `Prepare` + `Mounts` over the unix socket (in-process server, \
         one connection per worker); engine = `Pool::snapshot` (activating) + `activate` + `activate` on \
         the same pool. {PASSES} alternating passes; {} serial ops and {} concurrent ops per \
         mode.\n",
        serial_engine.len(),
        conc_ops
    );
    println!(
        "| Prepare→Mounts | engine p50 | gRPC p50 | overhead | engine p99 | gRPC p99 | overhead |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| serial | {se50:.2} ms | {sg50:.2} ms | {} | {se99:.2} ms | {sg99:.2} ms | {} |",
        fmt_ratio(sg50, se50),
        fmt_ratio(sg99, se99)
    );
    println!(
        "| {WORKERS}-way concurrent | {ce50:.2} ms | {cg50:.2} ms | {} | {ce99:.2} ms | {cg99:.2} ms | {} |",
        fmt_ratio(cg50, ce50),
        fmt_ratio(cg99, ce99)
    );
    let (st_e50, st_e99) = percentiles(stat_engine.clone());
    let (st_g50, st_g99) = percentiles(stat_grpc.clone());
    println!(
        "| one RPC: Stat vs `Pool::device` | {st_e50:.3} ms | {st_g50:.3} ms | +{:.3} ms | {st_e99:.3} ms | {st_g99:.3} ms | +{:.3} ms |",
        st_g50 - st_e50,
        st_g99 - st_e99
    );
    println!(
        "| {WORKERS}-way throughput | {:.0} ops/s | {:.0} ops/s | {} | | | |",
        conc_ops / wall_engine,
        conc_ops / wall_grpc,
        fmt_ratio(wall_grpc, wall_engine)
    );
    if list_n == 0 {
        println!("\n(List figures skipped: THINPOOL_BENCH_LIST=0.)");
        println!("=== BENCH END ===");
        drop(pool);
        if let Ok(p) = Arc::try_unwrap(engine) {
            let _ = p.close(true);
        }
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }

    // ---- 10,000 snapshots (created through the engine, inactive: no loop devices)
    let t = Instant::now();
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|w| {
            let e = engine.clone();
            let made = made.clone();
            std::thread::spawn(move || {
                for i in (w..list_n).step_by(8) {
                    e.snapshot(req(&format!("default/{i}/list-{i:05}"), "layer"))
                        .unwrap();
                    made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let create_s = t.elapsed().as_secs_f64();
    let mut engine_list = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let n = engine.devices().unwrap().len();
        engine_list.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(n, list_n + 2);
    }
    // Hand the pool to a real thinpoold.
    drop(pool);
    let engine = Arc::try_unwrap(engine).ok().expect("pool unshared");
    engine.close(true).unwrap();
    let sock2 = dir.join("thinpoold.sock");
    let log = std::fs::File::create(dir.join("thinpoold.log")).unwrap();
    let mut daemon = Command::new(thinpoold())
        .arg("--root")
        .arg(&root)
        .arg("--socket")
        .arg(&sock2)
        .arg("--imagefs-dir")
        .arg(dir.join("imagefs"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = daemon.id();
    let (grpc_list, rss_idle, rss_after) = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut c = loop {
            if let Ok(mut c) = Client::connect(&sock2).await
                && c.pool_status().await.is_ok()
            {
                break c;
            }
            assert!(Instant::now() < deadline, "thinpoold did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let rss_idle = rss_kib(pid);
        let mut lat = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let n = c.list(&[]).await.unwrap().len();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(n, list_n + 1);
        }
        (lat, rss_idle, rss_kib(pid))
    });
    let filtered = rt.block_on(async {
        let mut c = Client::connect(&sock2).await.unwrap();
        let t = Instant::now();
        let n = c.list(&["name==default/7/list-00007"]).await.unwrap().len();
        assert_eq!(n, 1);
        t.elapsed().as_secs_f64() * 1e3
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    if let Ok(p) = Pool::open(&thinpool::PoolSpec {
        root: root.clone(),
        ..Default::default()
    }) {
        let _ = p.close(true);
    }

    // ---- report
    // ---- report, part 2
    let (el50, _) = percentiles(engine_list.clone());
    let (gl50, _) = percentiles(grpc_list.clone());
    let gl_max = grpc_list.iter().cloned().fold(0.0, f64::max);
    println!();
    println!(
        "List with {list_n} snapshots (created in {create_s:.1} s through the engine, 8 threads; \
         listed by a real thinpoold over its socket, 5 runs):\n"
    );
    println!("| figure | value | baseline / target |");
    println!("|---|---:|---|");
    println!(
        "| List (all, streamed in batches of 100), p50 | {gl50:.0} ms | engine reading all records: {el50:.0} ms; target < 500 ms |"
    );
    println!("| List, slowest of 5 | {gl_max:.0} ms | target < 500 ms |");
    println!("| List with a `name==` filter | {filtered:.0} ms | |");
    println!(
        "| thinpoold RSS after open | {:.1} MiB | |",
        rss_idle as f64 / 1024.0
    );
    println!(
        "| thinpoold RSS after 5 Lists | {:.1} MiB | |",
        rss_after as f64 / 1024.0
    );
    println!("=== BENCH END ===");
    let _ = std::fs::remove_dir_all(&dir);
}
