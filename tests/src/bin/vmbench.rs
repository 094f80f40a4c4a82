//! The dm benchmark, run inside the VM: `tests/vm/run --bench`.
//!
//! Each figure is measured in the same run as its baseline:
//! - snapshot + activate latency through the engine, against the same ioctl sequence issued
//!   directly through the devicemapper crate, and against the dmsetup CLI sequence that
//!   containerd's devmapper snapshotter forks (`dmsetup message` + `dmsetup create`);
//! - I/O on a thin device against a raw loop device over a file of the same size on the
//!   same filesystem, both with direct I/O.
//!
//! Prints a markdown report between `=== BENCH BEGIN ===` and `=== BENCH END ===`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use devicemapper::{DM, DevId, DmName, DmOptions};
use thinpool::{BackendKind, Bytes, DeviceKind, DeviceName, Pool, PoolSpec, SnapshotRequest};
use thinpool_tests::iobench::{percentiles, rand_write, seq_read, seq_read_chunked, seq_write};

const SNAPSHOTS: usize = 200;
const SEQ_BYTES: u64 = 256 << 20;
const RAND_OPS: u64 = 3000;

fn main() {
    let dir = thinpool_tests::base_dir().join("bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = PoolSpec {
        root: dir.join("pool"),
        backend: Some(BackendKind::Dm),
        data_size: Some(Bytes::gib(20)),
        metadata_size: Some(Bytes::mib(256)),
        base_size: Some(Bytes::gib(1)),
        ..PoolSpec::default()
    };
    let pool = Pool::open(&spec).expect("open pool");
    let tag = pool.settings().tag;
    let pool_name = format!("thinpool-{tag}-pool");
    let dm = DM::new().expect("dm");
    let pool_info = dm
        .device_info(&DevId::Name(DmName::new(&pool_name).unwrap()))
        .expect("pool info");
    let pool_dev = format!("{}:{}", pool_info.device().major, pool_info.device().minor);
    let n = |s: String| DeviceName::new(s).unwrap();

    // A committed layer to snapshot from, with some data in it.
    pool.snapshot(SnapshotRequest {
        name: n("layer-key".into()),
        parent: None,
        kind: DeviceKind::Active,
        size: None,
        labels: BTreeMap::new(),
        activate: false,
    })
    .unwrap();
    pool.commit(&n("layer-key".into()), &n("layer".into()), None)
        .unwrap();
    let layer_id = pool.device(&n("layer".into())).unwrap().id.get();
    let size_sectors = Bytes::gib(1).sectors().0;

    let mut report = String::new();
    report.push_str("### Snapshot + activate latency (dm, TCG guest)\n\n");
    report.push_str(&format!(
        "{SNAPSHOTS} snapshots of a committed (inactive) 1 GiB layer, each then activated.\n\n"
    ));
    report.push_str("| method | p50 ms | p99 ms | p50 ratio vs raw ioctls |\n|---|---|---|---|\n");

    // Engine: snapshot + activate (records, intents, transaction ids included).
    let mut engine_ms = Vec::new();
    for i in 0..SNAPSHOTS {
        let t = Instant::now();
        pool.snapshot(SnapshotRequest {
            name: n(format!("c{i}")),
            parent: Some(n("layer".into())),
            kind: DeviceKind::Active,
            size: None,
            labels: BTreeMap::new(),
            activate: true,
        })
        .unwrap();
        pool.activate(&n(format!("c{i}"))).unwrap();
        engine_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // Raw: the same ioctls straight through the devicemapper crate, on the same pool, with
    // ids far from the engine's. The transaction id is advanced as the engine does.
    let txn0 = pool.status().unwrap().kernel.transaction_id;
    let pool_id = DevId::Name(DmName::new(&pool_name).unwrap());
    let mut raw_ms = Vec::new();
    for (i, txn) in (txn0..).enumerate().take(SNAPSHOTS) {
        let id = 8_000_000 + i;
        let name = format!("bench-raw-{i}");
        let t = Instant::now();
        dm.target_msg(&pool_id, None, &format!("create_snap {id} {layer_id}"))
            .unwrap();
        dm.target_msg(
            &pool_id,
            None,
            &format!("set_transaction_id {txn} {}", txn + 1),
        )
        .unwrap();
        let dname = DmName::new(&name).unwrap();
        dm.device_create(dname, None, DmOptions::default()).unwrap();
        let table = [(
            0,
            size_sectors,
            "thin".to_string(),
            format!("{pool_dev} {id}"),
        )];
        dm.table_load(&DevId::Name(dname), &table, DmOptions::default())
            .unwrap();
        dm.device_suspend(&DevId::Name(dname), DmOptions::default())
            .unwrap();
        raw_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // dmsetup CLI: two forks per snapshot, as containerd's devmapper snapshotter does.
    let mut cli_ms = Vec::new();
    for i in 0..SNAPSHOTS {
        let id = 9_000_000 + i;
        let name = format!("bench-cli-{i}");
        let t = Instant::now();
        dmsetup(&[
            "message",
            &pool_name,
            "0",
            &format!("create_snap {id} {layer_id}"),
        ]);
        dmsetup(&[
            "create",
            &name,
            "--table",
            &format!("0 {size_sectors} thin {pool_dev} {id}"),
        ]);
        cli_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let (e50, e99) = percentiles(engine_ms);
    let (r50, r99) = percentiles(raw_ms);
    let (c50, c99) = percentiles(cli_ms);
    report.push_str(&format!(
        "| thinpool engine | {e50:.2} | {e99:.2} | {:.2}x |\n",
        e50 / r50
    ));
    report.push_str(&format!(
        "| raw devicemapper ioctls | {r50:.2} | {r99:.2} | 1.00x |\n"
    ));
    report.push_str(&format!(
        "| dmsetup CLI (2 forks) | {c50:.2} | {c99:.2} | {:.2}x |\n\n",
        c50 / r50
    ));

    // Clean the baselines' devices and ids out of the pool again.
    for i in 0..SNAPSHOTS {
        for (name, id) in [
            (format!("bench-raw-{i}"), 8_000_000 + i),
            (format!("bench-cli-{i}"), 9_000_000 + i),
        ] {
            let _ = dm.device_remove(
                &DevId::Name(DmName::new(&name).unwrap()),
                DmOptions::default(),
            );
            let _ = dm.target_msg(&pool_id, None, &format!("delete {id}"));
        }
    }

    pool.close(true).unwrap();

    // I/O: a fresh thin device against a raw loop device over a same-sized fresh file on the
    // same filesystem, for the default block size and a large one.
    report.push_str(
        "### I/O on a thin device vs a raw loop device (direct I/O, same filesystem)\n\n",
    );
    report.push_str(&format!(
        "Sequential: {} per pass in 1 MiB requests; random: {RAND_OPS} 4 KiB writes over 1 GiB. \
         Three passes, alternating which target goes first; \"first\" is pass 1 (the thin \
         device allocates its blocks), \"steady\" the mean of passes 2-3.\n\n",
        Bytes(SEQ_BYTES)
    ));
    report
        .push_str("| pool block size | test | thin | raw loop | ratio |\n|---|---|---|---|---|\n");
    for block in [Bytes::kib(64), Bytes::kib(512)] {
        io_rows(&dir, block, &mut report);
    }

    println!("=== BENCH BEGIN ===");
    print!("{report}");
    println!("=== BENCH END ===");
}

/// One pool with data block size `block`: three alternating passes on a thin device and on a
/// raw loop device, appended to `report` as table rows.
fn io_rows(dir: &Path, block: Bytes, report: &mut String) {
    let root = dir.join(format!("io-{}", block.0));
    let pool = Pool::open(&PoolSpec {
        root: root.clone(),
        backend: Some(BackendKind::Dm),
        data_size: Some(Bytes::gib(8)),
        metadata_size: Some(Bytes::mib(64)),
        block_size: Some(block),
        base_size: Some(Bytes::gib(1)),
        ..PoolSpec::default()
    })
    .expect("open io pool");
    let dev = DeviceName::new("io").unwrap();
    pool.snapshot(SnapshotRequest {
        name: dev.clone(),
        parent: None,
        kind: DeviceKind::Active,
        size: None,
        labels: BTreeMap::new(),
        activate: false,
    })
    .unwrap();
    let thin = pool.activate(&dev).unwrap().source;
    let raw_file = root.join("raw.img");
    std::fs::File::create(&raw_file)
        .unwrap()
        .set_len(Bytes::gib(1).0)
        .unwrap();
    let raw =
        thinpool::loopback::find_or_attach(&raw_file, thinpool::loopback::LoopOptions::POOL_FILE)
            .unwrap();

    type Test = fn(&Path) -> f64;
    let tests: [(&str, Test); 3] = [
        ("seq 1 MiB write MiB/s", |d| seq_write(d, SEQ_BYTES)),
        ("seq 1 MiB read MiB/s", |d| seq_read(d, SEQ_BYTES)),
        ("rand 4 KiB write IOPS", |d| {
            rand_write(d, Bytes::gib(1).0, RAND_OPS)
        }),
    ];
    // results[test][pass] = (thin, raw)
    let mut results = vec![Vec::new(); tests.len()];
    for pass in 0..3 {
        for (t, (_, f)) in tests.iter().enumerate() {
            let (thin_v, raw_v) = if pass % 2 == 0 {
                let a = f(&thin);
                (a, f(&raw))
            } else {
                let b = f(&raw);
                (f(&thin), b)
            };
            results[t].push((thin_v, raw_v));
        }
    }
    // Diagnostic: how much of the read gap is request size? dm-thin splits I/O at block
    // boundaries, so the raw loop device is also read in block-sized requests.
    let raw_small = seq_read_chunked(&raw, SEQ_BYTES, block.0 as usize);
    report.push_str(&format!(
        "| {block} | raw loop read in {block} requests MiB/s (diagnostic) | - | {raw_small:.1} | - |\n"
    ));
    for (t, (label, _)) in tests.iter().enumerate() {
        let r = &results[t];
        let (ft, fr) = r[0];
        let st = (r[1].0 + r[2].0) / 2.0;
        let sr = (r[1].1 + r[2].1) / 2.0;
        report.push_str(&format!(
            "| {block} | {label}, first | {ft:.1} | {fr:.1} | {:.2}x |\n",
            ft / fr
        ));
        report.push_str(&format!(
            "| {block} | {label}, steady | {st:.1} | {sr:.1} | {:.2}x |\n",
            st / sr
        ));
    }
    thinpool::loopback::detach(&raw).unwrap();
    pool.close(true).unwrap();
}

fn dmsetup(args: &[&str]) {
    let st = Command::new("dmsetup")
        .args(args)
        .env("DM_DISABLE_UDEV", "1")
        .status()
        .expect("run dmsetup");
    assert!(st.success(), "dmsetup {args:?} failed");
}
