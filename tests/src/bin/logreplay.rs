//! Guest program of `tests/vm/torture.d/35-logreplay`: every write under the pool, logged in
//! order by dm-log-writes, replayed up to each flush/FUA point (or a seeded sample of them),
//! and at each point the pool must open consistently with what was acknowledged before it.
//!
//! Why one log: the pool's data file, its kernel metadata file and our store (pool.redb) all
//! live in ONE ext4 over ONE dm-log-writes device, so a single log orders all their writes
//! (two logs could not be ordered against each other). Layout, all under `--dir` on the test
//! disk: `dev.img` (the ext4, on a loop device, under log-writes), `log.img` (the log device),
//! `scratch.img` (an XFS with reflink where the replay happens: each point's image is a
//! reflink clone of the replay so far, so checking a point never disturbs the next).
//!
//! Run: mkfs + mount the ext4, mark `begin`, start the real thinpoold with its root there and
//! run the workload of `thinpool_tests::power`; after each ledger entry (a step about to start,
//! or acknowledged) a log mark named by the entry's index is sent with the devicemapper
//! crate's message ioctl, so a mark's place in the log says which acknowledgements a replay
//! point must honour. Then everything is taken down, the log is parsed (format: the kernel's
//! Documentation/admin-guide/device-mapper/log-writes.rst) and replayed.
//!
//! At each point, on a clone: mount the ext4 (journal replay); thin_check the metadata file;
//! thinpoold opens the pool (loop devices over the replayed files) and the audit is clean;
//! every snapshot, removal and record acknowledged before the point is there (exact content,
//! e2fsck of the data snapshots); take it all down; e2fsck -fn the ext4 clean.
//! Prints one line per point, then "N passed, M failed".

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use devicemapper::{DM, DevId, DmName};
use thinpool_client::Client;
use thinpool_tests::grpc::Daemon;
use thinpool_tests::power::{self, Ack, AckSink, Expect, Rng, Workload, path_str, run};

const LW_NAME: &str = "torture-logwrites";
const MNT: &str = "/mnt/lw";
const SCRATCH_MNT: &str = "/mnt/lr-scratch";
const SOCKET: &str = "/run/logreplay.sock";
const DATA_MNT: &str = "/run/logreplay-mnt";

// The log format (log-writes.rst): a super block in sector 0, then one entry per logged
// write, flush, discard or mark, each entry in its own log sector followed by the write's
// data; sector numbers and counts in units of the super block's sector size.
const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
const FLAG_FLUSH: u64 = 1;
const FLAG_FUA: u64 = 2;
const FLAG_DISCARD: u64 = 4;
const FLAG_MARK: u64 = 8;

struct Args {
    dir: PathBuf,
    steps: u64,
    points: Option<usize>, // None: all
    seed: u64,
    fs_size: u64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        dir: PathBuf::from("/mnt/disk/logreplay"),
        steps: 60,
        points: Some(40),
        seed: 1,
        fs_size: 1 << 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| anyhow!("{k} needs a value"))?;
        match k.as_str() {
            "--dir" => a.dir = v.into(),
            "--steps" => a.steps = v.parse()?,
            "--points" => a.points = if v == "all" { None } else { Some(v.parse()?) },
            "--seed" => a.seed = v.parse()?,
            _ => bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

/// Acknowledgements kept in memory, each followed by a log mark named by its index.
struct MarkSink {
    ledger: Vec<Ack>,
    dm: DM,
}

fn mark(dm: &DM, name: &str) -> Result<()> {
    let dev = DmName::new(LW_NAME).map_err(|e| anyhow!("{e}"))?;
    dm.target_msg(&DevId::Name(dev), None, &format!("mark {name}"))
        .map_err(|e| anyhow!("log-writes mark {name}: {e}"))?;
    Ok(())
}

impl AckSink for MarkSink {
    fn ack(&mut self, a: &Ack) -> Result<()> {
        self.ledger.push(a.clone());
        mark(&self.dm, &(self.ledger.len() - 1).to_string())
    }
}

fn losetup(file: &Path) -> Result<String> {
    Ok(run("losetup", &["-f", "--show", path_str(file)?])?
        .trim()
        .to_string())
}

fn sparse_file(path: &Path, size: u64) -> Result<()> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    Ok(())
}

/// What must be undone at the end, in reverse order, even after a failure.
#[derive(Default)]
struct Undo(Vec<(String, Vec<String>)>);

impl Undo {
    fn push(&mut self, cmd: &str, args: &[&str]) {
        self.0.push((
            cmd.to_string(),
            args.iter().map(|s| s.to_string()).collect(),
        ));
    }
    /// Runs the undo steps pushed after `keep` (newest first).
    fn run_to(&mut self, keep: usize) {
        while self.0.len() > keep {
            let (cmd, args) = self.0.pop().expect("non-empty");
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = run(&cmd, &a) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        self.run_to(0);
    }
}

struct Entry {
    sector: u64,
    nr_sectors: u64,
    flags: u64,
    /// Byte offset of the write's data in the log.
    data: u64,
    mark: Option<String>,
}

struct Log {
    sectorsize: u64,
    entries: Vec<Entry>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn parse_log(log: &File) -> Result<Log> {
    let mut sb = [0u8; 32];
    log.read_exact_at(&mut sb, 0)?;
    if le64(&sb, 0) != LOG_MAGIC {
        bail!("log: bad magic {:#x}", le64(&sb, 0));
    }
    let n = le64(&sb, 16);
    let sectorsize = u64::from(u32::from_le_bytes(sb[24..28].try_into().expect("4 bytes")));
    if !(512..=65536).contains(&sectorsize) || !sectorsize.is_power_of_two() {
        bail!("log: bad sector size {sectorsize}");
    }
    let mut entries = Vec::with_capacity(n as usize);
    let mut pos = sectorsize;
    let mut buf = vec![0u8; sectorsize as usize];
    for i in 0..n {
        log.read_exact_at(&mut buf, pos)
            .with_context(|| format!("log entry {i} at byte {pos}"))?;
        let (sector, nr_sectors, flags, data_len) =
            (le64(&buf, 0), le64(&buf, 8), le64(&buf, 16), le64(&buf, 24));
        if flags & !(FLAG_FLUSH | FLAG_FUA | FLAG_DISCARD | FLAG_MARK | 16) != 0 {
            bail!("log entry {i} at byte {pos}: unknown flags {flags:#x}");
        }
        pos += sectorsize;
        let mut mark = None;
        if flags & FLAG_MARK != 0 {
            // A mark's name follows the entry header in the same log sector.
            let len = data_len as usize;
            if 32 + len > buf.len() {
                bail!("log entry {i}: mark of {len} bytes");
            }
            mark = Some(String::from_utf8_lossy(&buf[32..32 + len]).into_owned());
        }
        let data = pos;
        if flags & FLAG_DISCARD == 0 {
            pos += nr_sectors * sectorsize;
        }
        entries.push(Entry {
            sector,
            nr_sectors,
            flags,
            data,
            mark,
        });
    }
    Ok(Log {
        sectorsize,
        entries,
    })
}

fn main() {
    let t0 = Instant::now();
    let (passed, failed) = match real_main() {
        Ok(r) => r,
        Err(e) => {
            println!("FAILED logreplay: {e:#}");
            (0, 1)
        }
    };
    println!(
        "logreplay: {:.1} s in the guest",
        t0.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed");
}

fn real_main() -> Result<(u32, u32)> {
    let args = parse_args()?;
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    for d in [MNT, SCRATCH_MNT, DATA_MNT] {
        std::fs::create_dir_all(d)?;
    }
    let mut undo = Undo::default();
    let dev_img = args.dir.join("dev.img");
    let log_img = args.dir.join("log.img");
    sparse_file(&dev_img, args.fs_size)?;
    sparse_file(&log_img, 16 << 30)?;

    // ---- record
    let t = Instant::now();
    let ledger = {
        let dev_loop = losetup(&dev_img)?;
        undo.push("losetup", &["-d", &dev_loop]);
        let log_loop = losetup(&log_img)?;
        undo.push("losetup", &["-d", &log_loop]);
        let table = format!("0 {} log-writes {dev_loop} {log_loop}", args.fs_size / 512);
        run("dmsetup", &["create", LW_NAME, "--table", &table])?;
        undo.push("dmsetup", &["remove", LW_NAME]);
        // No udev in the guest: no /dev/mapper link, but devtmpfs has the dm-N node.
        let blk = run(
            "dmsetup",
            &["info", "-c", "--noheadings", "-o", "blkdevname", LW_NAME],
        )?;
        let lw = format!("/dev/{}", blk.trim());
        // No discards (they would zero the image; nothing to replay), no lazy init thread.
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                &lw,
            ],
        )?;
        run("mount", &["-o", "noinit_itable", &lw, MNT])?;
        let mounted = undo.0.len();
        undo.push("umount", &[MNT]);
        let dm = DM::new().map_err(|e| anyhow!("dm: {e}"))?;
        mark(&dm, "begin")?;
        let mut sink = MarkSink {
            ledger: Vec::new(),
            dm,
        };
        let root = Path::new(MNT).join("pool");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut daemon = std::panic::catch_unwind(|| power::start_daemon(&root, Path::new(SOCKET)))
            .map_err(|_| anyhow!("thinpoold did not create the pool"))?;
        let mut c = rt.block_on(Client::connect(SOCKET))?;
        let mut w = Workload::new(&rt, &mut c, args.seed, "r", Vec::new())?;
        let res = (|| -> Result<()> {
            w.ensure_data(&rt, &mut c, Path::new(DATA_MNT), &mut sink)?;
            for _ in 0..args.steps {
                w.step(&rt, &mut c, &mut sink)?;
            }
            Ok(())
        })();
        power::unmount_all(std::mem::take(&mut w.data));
        take_down(&rt, c, &mut daemon)?;
        drop(daemon);
        res.context("workload")?;
        println!(
            "recorded: {} writes, {} operations in {:.1} s",
            w.writes,
            w.ops,
            t.elapsed().as_secs_f64()
        );
        undo.run_to(mounted);
        mark(&sink.dm, "end")?;
        undo.run_to(0);
        sink.ledger
    };

    // ---- parse
    let log = File::open(&log_img)?;
    let parsed = parse_log(&log)?;
    let begin = parsed
        .entries
        .iter()
        .position(|e| e.mark.as_deref() == Some("begin"))
        .ok_or_else(|| anyhow!("log: no begin mark"))?;
    let end = parsed
        .entries
        .iter()
        .position(|e| e.mark.as_deref() == Some("end"))
        .ok_or_else(|| anyhow!("log: no end mark"))?;
    let marks = parsed.entries[begin..end]
        .iter()
        .filter(|e| {
            e.mark
                .as_deref()
                .is_some_and(|m| m.parse::<usize>().is_ok())
        })
        .count();
    if marks != ledger.len() {
        bail!(
            "log: {marks} ledger marks, the ledger has {} entries",
            ledger.len()
        );
    }
    let all: Vec<usize> = (begin..end)
        .filter(|&i| parsed.entries[i].flags & (FLAG_FLUSH | FLAG_FUA) != 0)
        .collect();
    let mut chosen = match args.points {
        Some(k) if k < all.len() => {
            // A seeded sample, always with the last point.
            let mut rng = Rng::new(args.seed);
            let mut pool = all[..all.len() - 1].to_vec();
            let mut pick = vec![*all.last().expect("non-empty")];
            while pick.len() < k {
                let i = rng.below(pool.len() as u64) as usize;
                pick.push(pool.swap_remove(i));
            }
            pick
        }
        _ => all.clone(),
    };
    chosen.sort_unstable();
    println!(
        "log: {} entries ({} sectors of {} bytes), {} flush/FUA points after mkfs, {} ledger entries; checking {} points",
        parsed.entries.len(),
        parsed.entries.iter().map(|e| e.nr_sectors).sum::<u64>(),
        parsed.sectorsize,
        all.len(),
        ledger.len(),
        chosen.len()
    );

    // ---- replay
    let scratch = args.dir.join("scratch.img");
    sparse_file(&scratch, 16 << 30)?;
    let sloop = losetup(&scratch)?;
    undo.push("losetup", &["-d", &sloop]);
    run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", &sloop])?;
    run("mount", &[&sloop, SCRATCH_MNT])?;
    undo.push("umount", &[SCRATCH_MNT]);
    let base_path = Path::new(SCRATCH_MNT).join("base.img");
    let base = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&base_path)?;
    base.set_len(args.fs_size)?;
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut cursor = 0usize;
    let mut acked = 0usize; // ledger entries marked so far
    let mut buf = Vec::new();
    for (n, &p) in chosen.iter().enumerate() {
        let tp = Instant::now();
        while cursor <= p {
            let e = &parsed.entries[cursor];
            if let Some(m) = &e.mark
                && let Ok(i) = m.parse::<usize>()
            {
                acked = acked.max(i + 1);
            }
            let off = e.sector * parsed.sectorsize;
            let len = (e.nr_sectors * parsed.sectorsize) as usize;
            if e.flags & FLAG_DISCARD != 0 {
                buf.clear();
                buf.resize(len, 0);
                base.write_all_at(&buf, off)?;
            } else if len > 0 {
                buf.resize(len, 0);
                log.read_exact_at(&mut buf, e.data)?;
                base.write_all_at(&buf, off)?;
            }
            cursor += 1;
        }
        let exp = Expect::from_ledger(&ledger[..acked]);
        let what = format!(
            "point {}/{} (log entry {p} of {}, {} acked writes, {} acked ops",
            n + 1,
            chosen.len(),
            parsed.entries.len(),
            exp.n_writes,
            exp.n_ops
        );
        match check_point(&base, &base_path, &exp) {
            Ok(times) => {
                passed += 1;
                println!("ok {what}, {:.1} s: {times})", tp.elapsed().as_secs_f64());
            }
            Err(e) => {
                failed += 1;
                println!("FAILED {what}): {e:#}");
            }
        }
    }
    drop(base);
    undo.run_to(0);
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok((passed, failed))
}

/// Takes the pool down through the daemon (it exits afterwards), so that the fixture's drop
/// has nothing left to do.
/// Takes the client by value: the server's graceful shutdown waits for open connections.
fn take_down(rt: &tokio::runtime::Runtime, mut c: Client, d: &mut Daemon) -> Result<()> {
    rt.block_on(c.take_down(false)).context("TakeDown")?;
    drop(c);
    let mut child = d.child.take().ok_or_else(|| anyhow!("no daemon"))?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("thinpoold did not exit after TakeDown");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// One replay point, on a reflink clone of the replay so far.
/// Returns where the time went.
fn check_point(base: &File, base_path: &Path, exp: &Expect) -> Result<String> {
    let mut times = Vec::new();
    let mut t = Instant::now();
    let mut lap = |what: &str| {
        times.push(format!("{what} {:.1}", t.elapsed().as_secs_f64()));
        t = Instant::now();
    };
    base.sync_all()?;
    let img = base_path.with_file_name("point.img");
    run(
        "cp",
        &["--reflink=always", path_str(base_path)?, path_str(&img)?],
    )?;
    let mut undo = Undo::default();
    undo.push("rm", &["-f", path_str(&img)?]);
    let lp = losetup(&img)?;
    undo.push("losetup", &["-d", &lp]);
    run("mount", &[&lp, MNT]).context("mount the replayed ext4")?;
    let mounted = undo.0.len();
    undo.push("umount", &[MNT]);
    let root = Path::new(MNT).join("pool");
    // Before the kernel formatted the metadata (a crash while the pool was created) there is
    // nothing for thin_check; open must still finish the creation.
    if power::metadata_formatted(&root) {
        power::thin_check(&root).context("thin_check")?;
    }
    lap("mount+check");
    let mut daemon = std::panic::catch_unwind(|| power::start_daemon(&root, Path::new(SOCKET)))
        .map_err(|_| anyhow!("thinpoold did not open the pool"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut c = rt.block_on(Client::connect(SOCKET))?;
    lap("open");
    let res = power::verify(&rt, &mut c, exp, Path::new(DATA_MNT), false);
    lap("verify");
    let verified = match res {
        Ok(data) => {
            power::unmount_all(data);
            Ok(())
        }
        Err(e) => Err(anyhow!(
            "{e:#}\n--- thinpoold log ---\n{}",
            daemon.log_text()
        )),
    };
    let down = take_down(&rt, c, &mut daemon);
    drop(daemon);
    lap("down");
    verified?;
    down?;
    undo.run_to(mounted);
    run("e2fsck", &["-f", "-n", &lp]).context("e2fsck of the replayed ext4")?;
    lap("fsck");
    Ok(times.join(", "))
}
