//! Guest program of `tests/vm/torture.d/30-powercut`: one run per boot of the VM, on one
//! persistent disk. The host kills qemu (a power cut) while the workload runs; the next boot
//! verifies what the boots before it acknowledged, then runs the next workload.
//!
//! Input: a raw virtio disk (`--ledger`, /dev/vdb) the host fills with a header line
//! `BOOT <n> <seed> work|verify` and the ack ledgers of all earlier boots (see
//! `thinpool_tests::power`), padded with NUL bytes.
//! Output: acknowledgements go, one line each and drained out of the UART before the next
//! step, to a serial port (`--ack-port`, /dev/ttyS2) that the host saves to a file: the
//! ledger lives outside the guest and survives the cut. The console gets `CHECK ...`,
//! `VERIFY ok ...` or `VERIFY FAILED ...` lines, which the plug-in parses.
//!
//! Each boot: thin_check the pool's metadata file before anything opens the pool; start the
//! real thinpoold (it reassembles the pool on dm-thin); audit; check every acknowledged
//! snapshot, removal and record (see `power::verify`); then (work) create the data snapshots
//! if missing, send `S` and run the workload until the cut (or `--max-secs`).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use thinpool_client::Client;
use thinpool_tests::power::{self, Ack, AckSink, Expect, Workload};

struct Args {
    dir: PathBuf,
    ledger: PathBuf,
    ack_port: PathBuf,
    max_secs: u64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        dir: PathBuf::from("/mnt/disk/power"),
        ledger: PathBuf::from("/dev/vdb"),
        ack_port: PathBuf::from("/dev/ttyS2"),
        max_secs: 120,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| anyhow!("{k} needs a value"))?;
        match k.as_str() {
            "--dir" => a.dir = v.into(),
            "--ledger" => a.ledger = v.into(),
            "--ack-port" => a.ack_port = v.into(),
            "--max-secs" => a.max_secs = v.parse()?,
            _ => bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

/// The serial port the host records: raw mode (no \r added), and every line drained out of
/// the UART (tcdrain) before the workload goes on, so that an ack the host lacks was never
/// given.
struct SerialSink(std::fs::File);

impl SerialSink {
    fn open(path: &std::path::Path) -> Result<SerialSink> {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: termios calls on a descriptor we own, with a zeroed struct they fill.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(f.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::cfsetospeed(&mut t, libc::B115200);
                libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t);
            }
        }
        Ok(SerialSink(f))
    }
}

impl AckSink for SerialSink {
    fn ack(&mut self, a: &Ack) -> Result<()> {
        self.0.write_all(format!("{}\n", a.line()).as_bytes())?;
        // SAFETY: tcdrain on a descriptor we own.
        if unsafe { libc::tcdrain(self.0.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("tcdrain");
        }
        Ok(())
    }
}

fn main() {
    match real_main() {
        Ok(()) => {}
        Err(e) => {
            println!("VERIFY FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    let raw =
        std::fs::read(&args.ledger).with_context(|| format!("read {}", args.ledger.display()))?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let text = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let (boot, seed, work) = match header.as_slice() {
        ["BOOT", n, seed, mode] => (n.parse::<u32>()?, seed.parse::<u64>()?, *mode == "work"),
        _ => bail!("ledger disk: bad header {header:?}"),
    };
    let acks = power::parse_ledger(&lines.collect::<Vec<_>>().join("\n"));
    let exp = Expect::from_ledger(&acks);
    let root = args.dir.join("pool");
    let socket = PathBuf::from("/run/powercut.sock");
    let mnt = PathBuf::from("/run/powercut-mnt");
    std::fs::create_dir_all(&args.dir)?;
    let t0 = Instant::now();

    // thin_check before anything opens the pool: the metadata as the cut left it.
    if root.join("metadata").exists() {
        power::thin_check(&root).context("thin_check after the cut")?;
        println!("CHECK thin_check clean");
    } else if boot > 1 {
        bail!("boot {boot}: the pool's metadata file is missing");
    }
    let mut daemon =
        std::panic::catch_unwind(|| power::start_daemon(&root, &socket)).map_err(|_| {
            anyhow!(
                "thinpoold did not open the pool (its log is under {})",
                args.dir.display()
            )
        })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut c = rt.block_on(Client::connect(&socket))?;
    let opened = t0.elapsed().as_secs_f64();
    let data = power::verify(&rt, &mut c, &exp, &mnt, true).map_err(|e| {
        anyhow!(
            "boot {boot}: {e:#}\n--- thinpoold log ---\n{}",
            daemon.log_text()
        )
    })?;
    println!(
        "VERIFY ok boot={boot} writes={} ops={} uncertain={} open={opened:.1}s total={:.1}s",
        exp.n_writes,
        exp.n_ops,
        exp.uncertain.len(),
        t0.elapsed().as_secs_f64()
    );
    if !work {
        power::unmount_all(data);
        // The server's graceful shutdown waits for open connections.
        drop(c);
        let st = daemon.stop();
        println!("verify-only boot done (thinpoold exit {st})");
        return Ok(());
    }

    // From here on a failure is the workload's, not the verification's: the host counts it
    // against this boot's cut.
    let mut w = (|| -> Result<Workload> {
        let mut sink = SerialSink::open(&args.ack_port)?;
        let mut w = Workload::new(
            &rt,
            &mut c,
            seed ^ u64::from(boot),
            &format!("b{boot}"),
            data,
        )?;
        w.ensure_data(&rt, &mut c, &mnt, &mut sink)?;
        sink.ack(&Ack::Start)?;
        println!("WORKLOAD started boot={boot}");
        let deadline = Instant::now() + Duration::from_secs(args.max_secs);
        while Instant::now() < deadline {
            w.step(&rt, &mut c, &mut sink)?;
        }
        Ok(w)
    })()
    .unwrap_or_else(|e| {
        println!(
            "WORKLOAD FAILED boot={boot}: {e:#}\n--- thinpoold log ---\n{}",
            daemon.log_text()
        );
        std::process::exit(1);
    });
    println!(
        "WORKLOAD not cut within {} s ({} writes, {} ops)",
        args.max_secs, w.writes, w.ops
    );
    power::unmount_all(std::mem::take(&mut w.data));
    daemon.stop();
    Ok(())
}
