//! Usage benchmark: what CRI's stats syncer costs thinpoold. CRI calls `Usage` for every
//! active snapshot every 10 s; this measures one call, p50 and p99, over 1,000 active
//! snapshots of one committed layer, each beside its baselines in the same run:
//! - dm (in the VM, `tests/vm/run --bench usage`): the raw thin status ioctl of the device
//!   (what the kernel charges), and the path before this change, which activated the
//!   inactive parent to read its mapped blocks (create, table load, resume, status,
//!   remove);
//! - reflink (natively, `THINPOOL_TEST_BACKEND=reflink target/release/usagebench`): one raw
//!   FIEMAP pass over the device's file.
//!
//! Also: Usage of a committed layer (a stored figure), of inactive snapshots (dm: one
//! `thin_ls`), and one listing of every device's mapped bytes (ListDevices, per-device
//! metrics). The engine call (`Pool::snapshot_usage`) and the gRPC call (in-process server
//! on a unix socket, client on its own runtime) are both measured; passes alternate.
//!
//! Env: `THINPOOL_BENCH_SNAPSHOTS` (default 1000), `THINPOOL_BENCH_PASSES` (default 3).
//! Prints markdown between `=== BENCH BEGIN ===` and `=== BENCH END ===`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use devicemapper::{DM, DevId, DmName, DmOptions};
use thinpool::{AsyncPool, BackendKind, Bytes, DeviceKind, DeviceName, Pool, SnapshotRequest};
use thinpool_client::Client;
use thinpool_server::{Service, StaticInfo};
use thinpool_tests::iobench::{AlignedBuf, percentiles};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn name(s: &str) -> DeviceName {
    DeviceName::new(s).unwrap()
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn req(key: &str, parent: Option<&str>) -> SnapshotRequest {
    SnapshotRequest {
        name: name(key),
        parent: parent.map(name),
        kind: DeviceKind::Active,
        size: None,
        labels: Default::default(),
        activate: true,
    }
}

/// Writes `len` bytes of data at `offset` of a block device, O_DIRECT, and syncs.
fn write_raw(dev: &Path, offset: u64, len: usize, seed: u64) {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    let buf = AlignedBuf::new(len, seed);
    f.write_all_at(buf.bytes(), offset).unwrap();
    f.sync_all().unwrap();
}

/// `struct fiemap` and one `struct fiemap_extent` batch, as `<linux/fiemap.h>` lays them out.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [[u64; 7]; 256],
}

nix::ioctl_readwrite_bad!(fiemap_ioctl, 0xC020_660B_u32 as libc::c_ulong, Fiemap);

/// The baseline for reflink: one FIEMAP pass (with FIEMAP_FLAG_SYNC, as thinpool's) summing
/// the extents not flagged shared. Returns the sum, so the work is not optimised away.
fn raw_fiemap_unshared(file: &Path) -> u64 {
    let f = File::open(file).unwrap();
    let mut req: Box<Fiemap> = Box::new(unsafe { std::mem::zeroed() });
    let mut start = 0u64;
    let mut total = 0u64;
    loop {
        req.start = start;
        req.length = u64::MAX - start;
        req.flags = 1; // FIEMAP_FLAG_SYNC
        req.extent_count = 256;
        req.mapped_extents = 0;
        // SAFETY: the request has room for extent_count extents.
        unsafe { fiemap_ioctl(f.as_raw_fd(), &mut *req) }.unwrap();
        let n = (req.mapped_extents as usize).min(256);
        if n == 0 {
            break;
        }
        // fiemap_extent: logical, physical, length, 2 reserved u64, flags u32 + 3 u32.
        let mut last_flags = 0u32;
        for e in &req.extents[..n] {
            let flags = (e[5] & 0xffff_ffff) as u32;
            if flags & 0x2000 == 0 {
                total += e[2];
            }
            last_flags = flags;
        }
        let last = req.extents[n - 1];
        if last_flags & 1 != 0 {
            break;
        }
        start = last[0] + last[2];
    }
    total
}

/// The raw thin status ioctl of an active device: mapped sectors.
fn raw_status(dm: &DM, dev: &str) -> u64 {
    let (_, lines) = dm
        .table_status(
            &DevId::Name(DmName::new(dev).unwrap()),
            DmOptions::default(),
        )
        .unwrap();
    lines[0]
        .3
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The dm Usage path before this change: the device's status minus its inactive parent's,
/// which it read by activating the parent briefly (the ioctls of the old mapped_bytes).
fn old_dm_usage(dm: &DM, pool_dev: &str, tag: &str, dev: &str, parent: u32, size: Bytes) -> u64 {
    let mine = raw_status(dm, dev);
    let pname = format!("thinpool-{tag}-thin-{parent}");
    let p = DmName::new(&pname).unwrap();
    dm.device_create(p, None, DmOptions::default()).unwrap();
    let table = [(
        0u64,
        size.sectors().0,
        "thin".to_string(),
        format!("{pool_dev} {parent}"),
    )];
    dm.table_load(&DevId::Name(p), &table, DmOptions::default())
        .unwrap();
    dm.device_suspend(&DevId::Name(p), DmOptions::default())
        .unwrap();
    let theirs = raw_status(dm, &pname);
    dm.device_remove(&DevId::Name(p), DmOptions::default())
        .unwrap();
    mine.saturating_sub(theirs) * 512
}

struct Row {
    what: String,
    p50: f64,
    p99: f64,
    n: usize,
}

fn row(what: &str, samples: Vec<f64>) -> Row {
    let n = samples.len();
    let (p50, p99) = percentiles(samples);
    Row {
        what: what.to_string(),
        p50,
        p99,
        n,
    }
}

/// Tears the pool down when dropped, after everything else in `main` (declared first):
/// devices, loop devices and mounts go even if the bench panics.
struct Teardown(PathBuf);

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Ok(p) = Pool::open(&thinpool::PoolSpec {
            root: self.0.join("pool"),
            ..Default::default()
        }) {
            let _ = p.close(true);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    let n = env("THINPOOL_BENCH_SNAPSHOTS", 1000);
    let passes = env("THINPOOL_BENCH_PASSES", 3);
    let backend = thinpool_tests::backend();
    if backend == BackendKind::Sim {
        eprintln!("usagebench measures the kernel's figures: run it on dm or reflink, not sim");
        std::process::exit(2);
    }
    let dir = thinpool_tests::base_dir().join("usagebench");
    // A run that was killed left its pool set up: take it down first.
    drop(Teardown(dir.clone()));
    std::fs::create_dir_all(&dir).unwrap();
    let _teardown = Teardown(dir.clone());
    let root = dir.join("pool");
    let mut spec = thinpool_tests::small_spec(&root);
    spec.data_size = Some(Bytes::gib(16));
    spec.metadata_size = Some(Bytes::mib(256));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = rt.block_on(AsyncPool::open(spec)).expect("open pool");
    let engine: &Pool = pool.engine();
    let tag = engine.settings().tag;

    // A committed layer with 32 MiB of data in 64 KiB pieces (many extents), then `n`
    // active snapshots of it, each with 64 KiB of its own.
    let t = Instant::now();
    engine.snapshot(req("layer-k", None)).unwrap();
    let layer_dev = engine.activate(&name("layer-k")).unwrap().source;
    for i in 0..512u64 {
        write_raw(&layer_dev, (64 << 20) + i * (128 << 10), 64 << 10, i);
    }
    engine
        .commit(&name("layer-k"), &name("layer"), None)
        .unwrap();
    let layer = engine.device(&name("layer")).unwrap();
    let mut devs = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("c{i}");
        engine.snapshot(req(&key, Some("layer"))).unwrap();
        let spec = engine.activate(&name(&key)).unwrap();
        write_raw(&spec.source, 16 << 20, 64 << 10, 1000 + i as u64);
        devs.push((
            key,
            spec.source,
            engine.device(&name(&format!("c{i}"))).unwrap(),
        ));
    }
    eprintln!(
        "setup: layer + {n} active snapshots in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The server, in-process; the client on a runtime of its own.
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
    let crt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = crt.block_on(Client::connect(&socket)).unwrap();

    let dm = (backend == BackendKind::Dm).then(|| DM::new().unwrap());
    let pool_dev = dm.as_ref().map(|dm| {
        let info = dm
            .device_info(&DevId::Name(
                DmName::new(&format!("thinpool-{tag}-pool")).unwrap(),
            ))
            .unwrap();
        format!("{}:{}", info.device().major, info.device().minor)
    });
    let reflink_file = |id: thinpool::ThinId| root.join("mnt/devices").join(id.to_string());

    let (mut engine_ms, mut grpc_ms, mut raw_ms, mut old_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut check = 0u64;
    for _ in 0..passes {
        for (key, _, _) in &devs {
            let t = Instant::now();
            check += engine.snapshot_usage(&name(key)).unwrap().0;
            engine_ms.push(ms(t));
        }
        crt.block_on(async {
            for (key, _, _) in &devs {
                let t = Instant::now();
                check += c.usage(key).await.unwrap().0 as u64;
                grpc_ms.push(ms(t));
            }
        });
        for (_, _, rec) in &devs {
            let t = Instant::now();
            check += match &dm {
                Some(dm) => raw_status(dm, &format!("thinpool-{tag}-thin-{}", rec.id)) * 512,
                None => raw_fiemap_unshared(&reflink_file(rec.id)),
            };
            raw_ms.push(ms(t));
        }
        if let (Some(dm), Some(pool_dev)) = (&dm, &pool_dev) {
            for (_, _, rec) in &devs {
                let t = Instant::now();
                check += old_dm_usage(
                    dm,
                    pool_dev,
                    &tag,
                    &format!("thinpool-{tag}-thin-{}", rec.id),
                    layer.id.get(),
                    layer.size,
                );
                old_ms.push(ms(t));
            }
        }
    }
    // The figures agree: every snapshot added its 64 KiB (plus, on dm, nothing shared).
    let usage0 = engine.snapshot_usage(&name("c0")).unwrap();
    let layer_usage = engine.snapshot_usage(&name("layer")).unwrap();

    // A committed layer: the figure stored at commit.
    let mut committed_ms = Vec::new();
    for _ in 0..passes * 100 {
        let t = Instant::now();
        check += engine.snapshot_usage(&name("layer")).unwrap().0;
        committed_ms.push(ms(t));
    }

    // Inactive active snapshots (after a reboot, before containerd mounts them): dm reads
    // one thin_ls per call instead of activating the device.
    let inactive = n.min(50);
    for (key, _, _) in devs.iter().take(inactive) {
        engine.deactivate(&name(key)).unwrap();
    }
    let active_before = engine.active_devices().unwrap().len();
    let mut inactive_ms = Vec::new();
    for (key, _, _) in devs.iter().take(inactive) {
        let t = Instant::now();
        check += engine.snapshot_usage(&name(key)).unwrap().0;
        inactive_ms.push(ms(t));
    }
    assert_eq!(
        engine.active_devices().unwrap().len(),
        active_before,
        "Usage activated a device"
    );

    // Commit measures the new layer's usage (and stores it): its cost, on devices that were
    // written and then closed, as an unpack leaves them.
    let mut commit_ms = Vec::new();
    for i in 0..20 {
        let key = format!("ck{i}");
        engine.snapshot(req(&key, Some("layer"))).unwrap();
        let spec = engine.activate(&name(&key)).unwrap();
        write_raw(&spec.source, 16 << 20, 64 << 10, 5000 + i);
        let t = Instant::now();
        engine
            .commit(&name(&key), &name(&format!("cl{i}")), None)
            .unwrap();
        commit_ms.push(ms(t));
    }

    // Every device's mapped bytes in one call (ListDevices, --metrics-per-device).
    let mut all_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        check += engine.mapped_bytes_all().unwrap().len() as u64;
        all_ms.push(ms(t));
    }

    // The server's graceful stop waits for its connections: close the client's first, and
    // its runtime, which drives the connection.
    drop(c);
    drop(crt);
    let _ = stop_tx.send(());
    rt.block_on(server).unwrap().unwrap();

    let mut rows = vec![
        row("Usage, engine (`Pool::snapshot_usage`)", engine_ms),
        row("Usage, gRPC (in-process server, unix socket)", grpc_ms),
    ];
    let raw_p50;
    match backend {
        BackendKind::Dm => {
            rows.push(row("baseline: raw thin status ioctl", raw_ms));
            raw_p50 = rows[2].p50;
            rows.push(row(
                "before: status + activate the parent to read it (old path)",
                old_ms,
            ));
        }
        BackendKind::Reflink | BackendKind::Sim => {
            rows.push(row("baseline: raw FIEMAP pass (unshared extents)", raw_ms));
            raw_p50 = rows[2].p50;
        }
    }
    rows.push(row(
        "Usage of the committed layer (stored at commit)",
        committed_ms,
    ));
    rows.push(row(
        &format!("Usage of an inactive active snapshot ({inactive} of them)"),
        inactive_ms,
    ));
    rows.push(row(
        &format!("every device's mapped bytes, one call ({} devices)", n + 22),
        all_ms,
    ));
    rows.push(row(
        "Commit (measures and stores the layer's usage)",
        commit_ms,
    ));

    let mut out = String::new();
    out.push_str(&format!(
        "### Usage over {n} active snapshots ({backend})\n\n{n} active snapshots of one \
         committed layer (32 MiB in 512 extents), each with 64 KiB of its own; {passes} \
         passes, each call once per snapshot per pass. Usage of c0: {usage0} (64 KiB \
         written); of the layer: {layer_usage}.\n\n"
    ));
    out.push_str("| call | p50 ms | p99 ms | calls | p50 vs raw |\n|---|---|---|---|---|\n");
    for r in &rows {
        out.push_str(&format!(
            "| {} | {:.4} | {:.4} | {} | {:.1}x |\n",
            r.what,
            r.p50,
            r.p99,
            r.n,
            r.p50 / raw_p50
        ));
    }
    println!("=== BENCH BEGIN ===\n{out}=== BENCH END ===");
    eprintln!("(checksum {check})");
}
