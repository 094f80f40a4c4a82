//! Benchmark of the reflink backend, each figure measured in the same run as its baseline.
//!
//! 1. Snapshot + activate latency (engine `snapshot` then `activate`) of a 10 GiB device
//!    with 1 GiB written, over 200 snapshots kept active; baseline, interleaved: a bare
//!    `FICLONE` + fsync + `LOOP_CONFIGURE` of the same file, the kernel work alone.
//! 2. I/O on an activated device against a plain direct-I/O loop device over a sparse file
//!    on the host filesystem: sequential 1 MiB O_DIRECT write and read of 1 GiB, 4 KiB
//!    random O_DIRECT writes (20,000), and the same random writes into blocks shared with a
//!    snapshot (copy-on-write). Seven rounds on fresh pairs, alternating which side goes
//!    first; medians reported.
//!
//! Run as root: `cargo run --release -p thinpool-tests --bin reflinkbench`. The pool lives
//! under `THINPOOL_BENCH_DIR` (default `/var/tmp/thinpool-bench`), on the host disk.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thinpool_tests::iobench::AlignedBuf;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use thinpool::{
    BackendKind, Bytes, DeviceKind, DeviceName, Pool, PoolSpec, RemoveOptions, SnapshotRequest,
    loopback,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SNAPSHOTS: usize = 200;
const SEQ_BYTES: u64 = GIB;
const RANDOM_OPS: usize = 20_000;
const ROUNDS: u64 = 7;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let base = std::env::var_os("THINPOOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/thinpool-bench"));
    fs::create_dir_all(&base)?;
    // Kept, not a self-deleting TempDir: deleting it recursively while the pool is still
    // mounted inside (after a failure) would delete the device files through the mount.
    let dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&base)?
        .keep();
    let root = dir.join("pool");
    eprintln!("bench directory {}", dir.display());

    let mut cleanup = Cleanup::default();
    let result = run(&dir, &root, &mut cleanup);
    match cleanup.run() {
        Ok(()) => fs::remove_dir_all(&dir)?,
        Err(e) => eprintln!("cleanup failed ({e}); leaving {}", dir.display()),
    }
    result
}

/// What to undo on exit, success or not.
#[derive(Default)]
struct Cleanup {
    mounts: Vec<PathBuf>,
    loops: Vec<PathBuf>,
    pool: Option<Pool>,
}

impl Cleanup {
    fn run(&mut self) -> Res<()> {
        for m in self.mounts.drain(..).rev() {
            let _ = umount2(&m, MntFlags::empty());
        }
        for l in self.loops.drain(..) {
            loopback::detach(&l)?;
        }
        if let Some(pool) = self.pool.take() {
            pool.close(true)?;
        }
        Ok(())
    }
}

fn name(s: &str) -> DeviceName {
    DeviceName::new(s).expect("valid name")
}

fn snapshot(pool: &Pool, n: &str, parent: Option<&str>) -> thinpool::Result<()> {
    pool.snapshot(SnapshotRequest {
        name: name(n),
        parent: parent.map(name),
        kind: DeviceKind::Active,
        size: None,
        labels: BTreeMap::new(),
        activate: true,
    })
    .map(drop)
}

fn run(dir: &Path, root: &Path, cleanup: &mut Cleanup) -> Res<()> {
    let spec = PoolSpec {
        root: root.to_path_buf(),
        backend: Some(BackendKind::Reflink),
        data_size: Some(Bytes::gib(64)),
        base_size: Some(Bytes::gib(10)),
        // Sparse: the bench writes a few GiB of it.
        overcommit_host: true,
        ..PoolSpec::default()
    };
    let t = Instant::now();
    cleanup.pool = Some(Pool::open(&spec)?);
    eprintln!("pool created in {:?}", t.elapsed());
    let pool = cleanup.pool.as_ref().expect("just set");
    let mut rows = Vec::new();

    // 1. Snapshot + activate latency of a 10 GiB device with 1 GiB written.
    snapshot(pool, "src", None)?;
    let ms = pool.activate(&name("src"))?;
    let target = dir.join("m-src");
    fs::create_dir_all(&target)?;
    mount(
        Some(&ms.source),
        &target,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )?;
    cleanup.mounts.push(target.clone());
    write_payload(&target.join("payload"), GIB)?;
    umount2(&target, MntFlags::empty())?;
    cleanup.mounts.pop();
    pool.commit(&name("src"), &name("layer"), None)?;
    let layer_id = pool.device(&name("layer"))?.id;
    let layer_file = fs::canonicalize(root.join("mnt/devices"))?.join(layer_id.to_string());
    eprintln!("parent: {} MiB mapped", pool.usage(&name("layer"))?.0 / MIB);

    let mut engine = Vec::with_capacity(SNAPSHOTS);
    let mut raw = Vec::with_capacity(SNAPSHOTS);
    let raw_dir = root.join("mnt/bench-raw");
    fs::create_dir_all(&raw_dir)?;
    // Interleave the two so that both see the same XFS state as it fills with clones.
    for i in 0..SNAPSHOTS {
        let n = format!("snap-{i}");
        let t = Instant::now();
        snapshot(pool, &n, Some("layer"))?;
        pool.activate(&name(&n))?;
        engine.push(t.elapsed());

        let t = Instant::now();
        let dev = raw_clone_and_attach(&layer_file, &raw_dir.join(i.to_string()))?;
        raw.push(t.elapsed());
        cleanup.loops.push(dev);
    }
    for l in cleanup.loops.drain(..) {
        loopback::detach(&l)?;
    }
    fs::remove_dir_all(&raw_dir)?;
    let mut removal = Vec::with_capacity(SNAPSHOTS);
    for i in 0..SNAPSHOTS {
        let n = name(&format!("snap-{i}"));
        let t = Instant::now();
        pool.deactivate(&n)?;
        pool.remove(&n, RemoveOptions::default())?;
        removal.push(t.elapsed());
    }
    rows.push(Row::latency(
        "snapshot + activate, p50",
        percentile(&mut engine, 50),
        percentile(&mut raw, 50),
        "< 10 ms",
    ));
    rows.push(Row::latency(
        "snapshot + activate, p99",
        percentile(&mut engine, 99),
        percentile(&mut raw, 99),
        "",
    ));
    rows.push(Row::latency(
        "deactivate + remove, p50 (no baseline)",
        percentile(&mut removal, 50),
        Duration::ZERO,
        "",
    ));

    // 2. I/O: an activated device against a plain loop device over a sparse host file.
    // Each round uses a fresh pair (a new snapshot of the 10 GiB base, a new sparse file),
    // so both sides allocate on the sequential write and neither inherits the other
    // rounds' fragmentation; the side that goes first alternates.
    let mut results: BTreeMap<&str, [Vec<f64>; 2]> = BTreeMap::new();
    let mut record = |test, which: usize, v: f64| {
        eprintln!("  {test} {}: {v:.0}", ["reflink", "plain"][which]);
        results
            .entry(test)
            .or_insert_with(|| [Vec::new(), Vec::new()])[which]
            .push(v)
    };
    for round in 0..ROUNDS {
        let io = format!("io-{round}");
        snapshot(pool, &io, None)?;
        let thin = pool.activate(&name(&io))?.source;
        let plain_file = dir.join(format!("plain-{round}.img"));
        loopback::create_sparse(&plain_file, Bytes::gib(10).0)?;
        let plain = loopback::find_or_attach(&plain_file, loopback::LoopOptions::POOL_FILE)?;
        cleanup.loops.push(plain.clone());
        for dev in [&thin, &plain] {
            let dio = fs::read_to_string(
                Path::new("/sys/block")
                    .join(dev.file_name().unwrap_or_default())
                    .join("loop/dio"),
            )?;
            if dio.trim() != "1" {
                return Err(format!("{} does not use direct I/O", dev.display()).into());
            }
        }
        let dev = |which| if which == 0 { &thin } else { &plain };
        let offset = GIB;
        for which in order(round) {
            record("seq write", which, seq_write(dev(which), offset)?);
        }
        for which in order(round) {
            record("seq read", which, seq_read(dev(which), offset)?);
        }
        for which in order(round) {
            record(
                "rand write",
                which,
                random_write(dev(which), offset, round)?,
            );
        }
        // Share the region with a snapshot, so the next random writes copy on write.
        let snap = format!("io-{round}-snap");
        snapshot(pool, &snap, Some(&io))?;
        for which in order(round) {
            let iops = random_write(dev(which), offset, round + 100)?;
            record("rand write cow", which, iops);
        }
        pool.remove(&name(&snap), RemoveOptions::default())?;
        pool.deactivate(&name(&io))?;
        pool.remove(&name(&io), RemoveOptions::default())?;
        loopback::detach(&plain)?;
        cleanup.loops.retain(|l| *l != plain);
        fs::remove_file(&plain_file)?;
        eprintln!("I/O round {} done", round + 1);
    }
    // Figures: the median of each side; ratio: the median of the per-round ratios, since the
    // host's storage drifts between rounds and each round measures both sides back to back.
    let row = |what, test: &str, target| {
        let [ours, base] = &results[test];
        let ratios: Vec<f64> = ours.iter().zip(base).map(|(o, b)| o / b).collect();
        Row::rate(what, median(ours), median(base), median(&ratios), target)
    };
    rows.push(row(
        "sequential 1 MiB O_DIRECT write, MiB/s",
        "seq write",
        ">= 0.8x",
    ));
    rows.push(row(
        "sequential 1 MiB O_DIRECT read, MiB/s",
        "seq read",
        ">= 0.8x",
    ));
    rows.push(row(
        "4 KiB random O_DIRECT write, IOPS",
        "rand write",
        "report",
    ));
    rows.push(row(
        "4 KiB random write into blocks shared with a snapshot, IOPS",
        "rand write cow",
        "report",
    ));

    print_report(dir, &rows);
    Ok(())
}

/// Which target goes first alternates by round, so neither always runs on a warmer host.
fn order(round: u64) -> [usize; 2] {
    if round.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

/// Clones `src` to `dst` with FICLONE, fsyncs it and attaches a loop device to it.
fn raw_clone_and_attach(src: &Path, dst: &Path) -> Res<PathBuf> {
    let s = File::open(src)?;
    let d = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dst)?;
    // SAFETY: FICLONE with two open file descriptors.
    if unsafe { libc::ioctl(d.as_raw_fd(), libc::FICLONE, s.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    d.sync_all()?;
    attach_like_the_backend(&d)
}

/// Attaches `file` as the reflink backend attaches device files: one `LOOP_CONFIGURE` with
/// 4 KiB sectors and direct I/O.
fn attach_like_the_backend(file: &File) -> Res<PathBuf> {
    #[repr(C)]
    struct LoopConfig {
        fd: u32,
        block_size: u32,
        info: [u8; 232], // struct loop_info64; lo_flags is the u32 at byte 52
        reserved: [u64; 8],
    }
    const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    const LO_FLAGS_DIRECT_IO: u32 = 16;
    let mut config = LoopConfig {
        fd: file.as_raw_fd() as u32,
        block_size: 4096,
        info: [0; 232],
        reserved: [0; 8],
    };
    config.info[52..56].copy_from_slice(&LO_FLAGS_DIRECT_IO.to_ne_bytes());
    let ctl = File::open("/dev/loop-control")?;
    // Another process may take the free device between the two ioctls (EBUSY): ask again,
    // as the backend does.
    for _ in 0..20 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let lo = OpenOptions::new().read(true).write(true).open(&dev)?;
        // SAFETY: the kernel reads `config`, which outlives the call.
        if unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CONFIGURE, &config) } == 0 {
            return Ok(dev);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err.into());
        }
    }
    Err("no free loop device after 20 tries".into())
}

fn write_payload(path: &Path, len: u64) -> Res<()> {
    let f = File::create(path)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for i in 0..len / MIB {
        rng.fill(&mut buf);
        f.write_all_at(&buf, i * MIB)?;
    }
    f.sync_all()?;
    Ok(())
}

fn open_direct(dev: &Path, write: bool) -> Res<File> {
    Ok(OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?)
}

/// Writes `SEQ_BYTES` from `offset` in 1 MiB O_DIRECT writes and fsyncs; MiB/s.
fn seq_write(dev: &Path, offset: u64) -> Res<f64> {
    let f = open_direct(dev, true)?;
    let mut buf = AlignedBuf::zeroed(MIB as usize);
    Rng(offset | 1).fill(buf.bytes_mut());
    let t = Instant::now();
    for i in 0..SEQ_BYTES / MIB {
        f.write_all_at(buf.bytes_mut(), offset + i * MIB)?;
    }
    f.sync_all()?;
    Ok(SEQ_BYTES as f64 / MIB as f64 / t.elapsed().as_secs_f64())
}

/// Reads `SEQ_BYTES` from `offset` in 1 MiB O_DIRECT reads; MiB/s.
fn seq_read(dev: &Path, offset: u64) -> Res<f64> {
    let f = open_direct(dev, false)?;
    let mut buf = AlignedBuf::zeroed(MIB as usize);
    let t = Instant::now();
    for i in 0..SEQ_BYTES / MIB {
        f.read_exact_at(buf.bytes_mut(), offset + i * MIB)?;
    }
    Ok(SEQ_BYTES as f64 / MIB as f64 / t.elapsed().as_secs_f64())
}

/// `RANDOM_OPS` 4 KiB O_DIRECT writes at random aligned offsets within the 1 GiB region at
/// `offset`, then fsync; IOPS.
fn random_write(dev: &Path, offset: u64, seed: u64) -> Res<f64> {
    let f = open_direct(dev, true)?;
    let mut buf = AlignedBuf::zeroed(4096);
    let mut rng = Rng(0xdead_beef ^ ((seed + 1) * 0x9E37_79B9));
    rng.fill(buf.bytes_mut());
    let blocks = SEQ_BYTES / 4096;
    let t = Instant::now();
    for _ in 0..RANDOM_OPS {
        let b = rng.next() % blocks;
        f.write_all_at(buf.bytes_mut(), offset + b * 4096)?;
    }
    f.sync_all()?;
    Ok(RANDOM_OPS as f64 / t.elapsed().as_secs_f64())
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    let i = ((v.len() * p).div_ceil(100)).clamp(1, v.len()) - 1;
    v[i]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    what: &'static str,
    ours: String,
    baseline: String,
    ratio: String,
    target: &'static str,
}

impl Row {
    fn latency(what: &'static str, ours: Duration, base: Duration, target: &'static str) -> Row {
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        Row {
            what,
            ours: ms(ours),
            baseline: if base.is_zero() { "-".into() } else { ms(base) },
            ratio: if base.is_zero() {
                "-".into()
            } else {
                format!("{:.2}x", ours.as_secs_f64() / base.as_secs_f64())
            },
            target,
        }
    }

    fn rate(what: &'static str, ours: f64, base: f64, ratio: f64, target: &'static str) -> Row {
        Row {
            what,
            ours: format!("{ours:.0}"),
            baseline: format!("{base:.0}"),
            ratio: format!("{ratio:.2}x"),
            target,
        }
    }
}

fn print_report(dir: &Path, rows: &[Row]) {
    let uts = nix::sys::utsname::uname().ok();
    let kernel = uts
        .as_ref()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib as f64 / (1 << 20) as f64)
        .unwrap_or(0.0);
    let host_fs = host_fs_type(dir);
    println!("## reflink backend benchmark");
    println!();
    println!(
        "{} UTC; kernel {kernel}; {cpu}, {cores} cores, {mem_gib:.0} GiB RAM; \
         pool and baseline file on {host_fs} ({})",
        utc_now(),
        dir.display()
    );
    println!();
    println!("| measurement | reflink device | baseline | ratio | target |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.ours, r.baseline, r.ratio, r.target
        );
    }
    println!();
    println!(
        "Latency baseline: bare FICLONE + fsync + LOOP_CONFIGURE (4 KiB sectors, direct \
         I/O) of the same 10 GiB file, i.e. the kernel work alone, with no records, no \
         transaction counter, no durable directory entry. I/O baseline: a direct-I/O loop \
         device over a sparse file on the host filesystem. I/O is queue depth 1, {ROUNDS} \
         rounds on a fresh pair each, alternating which side goes first; figures are medians, \
         ratios the median of per-round ratios. Sequential runs move {} GiB, random runs do \
         {RANDOM_OPS} writes in a 1 GiB region, each ending with fsync.",
        SEQ_BYTES / GIB
    );
}

fn host_fs_type(dir: &Path) -> String {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return "?".into();
    };
    // The longest mount point that contains dir.
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let point = Path::new(f.get(4)?);
            let sep = f.iter().position(|x| *x == "-")?;
            let (fs_type, source) = (f.get(sep + 1)?, f.get(sep + 2)?);
            dir.starts_with(point)
                .then(|| (point.as_os_str().len(), format!("{fs_type} {source}")))
        })
        .max()
        .map(|(_, t)| t)
        .unwrap_or_else(|| "?".into())
}

/// The current UTC time as `YYYY-MM-DD HH:MM`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}
