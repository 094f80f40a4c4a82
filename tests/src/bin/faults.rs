//! faults: I/O errors under a live pool, on dm-thin in the VM (tests/vm/torture.d/50-faults).
//!
//! Each case makes a fresh pool with thinpoold, two committed layers of checksummed files
//! and a mounted container snapshot that writes and fsyncs new files in a loop; then it
//! replaces the table of the pool's `-data` or `-meta` linear device (thinpoold puts one
//! between each loop device and the pool) with `error` or `flakey` (up 1 s, down 2 s), and
//! checks what the operator sees:
//! - the kernel's pool status leaves `rw` within the case's bound (error-data: stays `rw`,
//!   only the container's writes fail: a documented limit);
//! - `thinctl pool status`, `/metrics` (`thinpool_pool_mode{mode=...} 1`) and thinpoold's
//!   log report the kernel's mode;
//! - a Prepare is refused with `FailedPrecondition` naming the mode;
//! - no call takes more than [`CALL_LIMIT`].
//!
//! Then the recovery of docs/recovery.md: the fault clears (the original table back), the
//! container unmounts, `thinctl pool down`, `thin_check` on the metadata file, thinpoold
//! restarts; the pool must be `rw`, the audit clean, and both layers' checksums intact.
//!
//! Prints one line per case (`ok CASE (N s, ...)` or `FAILED CASE: why`) and
//! `N passed, M failed`. Usage: `faults --thinpoold PATH --thinctl PATH [--dir DIR]
//! [--cases a,b]`. Root only; leaves no mount, dm device, loop device or process behind.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use devicemapper::{DM, DevId, DmFlags, DmName, DmOptions};
use sha2::{Digest, Sha256};

/// The longest any single call (a thinctl command, a table swap, an unmount) may take.
const CALL_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Data,
    Meta,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Every I/O fails.
    Error,
    /// Up 1 s, then every I/O fails for 2 s, and so on.
    Flakey,
}

struct Case {
    name: &'static str,
    target: Target,
    kind: Kind,
    /// How long the kernel's status may stay `rw` after the fault (measured on 6.1: error-meta
    /// ~6 s, flakey-meta ~2.5 s, flakey-data ~33 s); `None`: the pool is expected to stay
    /// `rw` (error-data), watched for [`Case::watch`].
    bound: Option<Duration>,
    watch: Duration,
}

const CASES: &[Case] = &[
    Case {
        name: "error-meta",
        target: Target::Meta,
        kind: Kind::Error,
        bound: Some(Duration::from_secs(30)),
        watch: Duration::ZERO,
    },
    Case {
        name: "flakey-meta",
        target: Target::Meta,
        kind: Kind::Flakey,
        bound: Some(Duration::from_secs(30)),
        watch: Duration::ZERO,
    },
    Case {
        name: "flakey-data",
        target: Target::Data,
        kind: Kind::Flakey,
        bound: Some(Duration::from_secs(75)),
        watch: Duration::ZERO,
    },
    Case {
        name: "error-data",
        target: Target::Data,
        kind: Kind::Error,
        bound: None,
        watch: Duration::from_secs(10),
    },
];

struct Opts {
    thinpoold: PathBuf,
    thinctl: PathBuf,
    dir: PathBuf,
    cases: Vec<String>,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        thinpoold: PathBuf::new(),
        thinctl: PathBuf::new(),
        dir: PathBuf::from("/mnt/disk/faults"),
        cases: CASES.iter().map(|c| c.name.to_string()).collect(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--thinpoold" => o.thinpoold = val()?.into(),
            "--thinctl" => o.thinctl = val()?.into(),
            "--dir" => o.dir = val()?.into(),
            "--cases" => {
                o.cases = val()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            _ => bail!("unknown argument {a}"),
        }
    }
    ensure!(o.thinpoold.is_file(), "--thinpoold PATH is required");
    ensure!(o.thinctl.is_file(), "--thinctl PATH is required");
    for c in &o.cases {
        ensure!(
            CASES.iter().any(|k| k.name == c),
            "unknown case {c}; known: error-meta, flakey-meta, flakey-data, error-data"
        );
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// commands with a time limit

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion within [`CALL_LIMIT`]; a command still running then is killed
/// and reported as hung.
fn run_limited(cmd: &mut Command) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > CALL_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} hung: still running after {} s",
                CALL_LIMIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// As [`run_limited`], and the command must succeed; its stdout.
fn run_ok(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let o = run_limited(cmd)?;
    ensure!(
        o.status.success(),
        "{what} failed ({}): {}{}",
        o.status,
        o.stdout,
        o.stderr
    );
    Ok(o.stdout)
}

/// Runs `f` on a thread and waits at most [`CALL_LIMIT`] for it (for ioctls and syscalls
/// that could block on a faulty device; a hung one is left behind and reported).
fn limited<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(CALL_LIMIT)
        .map_err(|_| anyhow!("{what} hung: no return after {} s", CALL_LIMIT.as_secs()))
}

// ---------------------------------------------------------------------------------------
// the kernel's view

/// The pool's mode as the kernel's status line says it (`rw`, `ro`, `out_of_data_space`,
/// `fail`), and whether it flags its metadata as needing a check.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KernelStatus {
    mode: String,
    needs_check: bool,
}

fn kernel_status(pool: &str) -> Result<KernelStatus> {
    let dm = DM::new()?;
    let name = DmName::new(pool)?;
    // NOFLUSH: look, do not commit (the workload's own commits meet the fault).
    let (_, lines) = dm.table_status(
        &DevId::Name(name),
        DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
    )?;
    let line = lines
        .first()
        .map(|l| l.3.clone())
        .ok_or_else(|| anyhow!("{pool}: no status line"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    // `Error`: the kernel could not read its metadata for the line (a failing metadata
    // device, before `Fail`); thinpoold reports it as fail, and so do we.
    if matches!(f.first(), Some(&"Fail") | Some(&"Error")) {
        return Ok(KernelStatus {
            mode: "fail".into(),
            needs_check: true,
        });
    }
    // <txn> <meta used/total> <data used/total> <held root> rw|ro|out_of_data_space ...
    let mode = f
        .get(4)
        .ok_or_else(|| anyhow!("{pool}: unexpected status {line:?}"))?;
    Ok(KernelStatus {
        mode: mode.to_string(),
        needs_check: f.contains(&"needs_check"),
    })
}

fn dm_names() -> Result<Vec<String>> {
    Ok(DM::new()?
        .list_devices()?
        .into_iter()
        .map(|(n, _, _)| n.to_string())
        .collect())
}

/// A fault in place: the linear device's original table comes back when this is dropped
/// (or [`Fault::clear`]), on every path.
struct Fault {
    name: String,
    original: Vec<(u64, u64, String, String)>,
    active: bool,
}

fn swap_table(name: &str, table: &[(u64, u64, String, String)]) -> Result<()> {
    let dm = DM::new()?;
    let name = DmName::new(name)?;
    let id = DevId::Name(name);
    dm.table_load(&id, table, DmOptions::default())?;
    dm.device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))?;
    // Resume on every path: a suspended device under the pool hangs it.
    dm.device_suspend(&id, DmOptions::default())?;
    Ok(())
}

impl Fault {
    fn inject(name: &str, kind: Kind) -> Result<Fault> {
        let dm = DM::new()?;
        let (_, original) = dm.table_status(
            &DevId::Name(DmName::new(name)?),
            DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
        )?;
        let [(start, len, target, params)] = original.as_slice() else {
            bail!("{name}: expected one table line, got {original:?}");
        };
        ensure!(target == "linear", "{name} is {target}, not linear");
        let faulty = match kind {
            Kind::Error => (*start, *len, "error".to_string(), String::new()),
            // params of linear: "<major:minor> <offset>"; flakey: the same, then up/down s.
            Kind::Flakey => (*start, *len, "flakey".to_string(), format!("{params} 1 2")),
        };
        let mut fault = Fault {
            name: name.to_string(),
            original: original.clone(),
            active: true,
        };
        let n = name.to_string();
        match limited("load the faulty table", move || swap_table(&n, &[faulty])) {
            Ok(Ok(())) => Ok(fault),
            Ok(Err(e)) | Err(e) => {
                // Whatever half-happened, put the original back.
                let _ = fault.clear();
                Err(e)
            }
        }
    }

    fn clear(&mut self) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        let (n, t) = (self.name.clone(), self.original.clone());
        limited("restore the original table", move || swap_table(&n, &t))??;
        self.active = false;
        Ok(())
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        if let Err(e) = self.clear() {
            println!("note: could not restore the table of {}: {e:#}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------
// the daemon and its pool

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn log_text(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }
    fn log_tail(&self) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
    /// Waits (bounded) for the daemon to exit, as after `pool down`.
    fn wait_exit(&mut self) -> Result<ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            ensure!(
                t0.elapsed() < CALL_LIMIT,
                "thinpoold did not exit within {} s",
                CALL_LIMIT.as_secs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t0 = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) && t0.elapsed() < CALL_LIMIT {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One case's world: its directory (pool root, socket, mounts, logs), the metrics port,
/// and what it made, for the cleanup that runs on every path.
struct World<'a> {
    o: &'a Opts,
    dir: PathBuf,
    root: PathBuf,
    socket: PathBuf,
    metrics: String,
    /// The pool's kernel name prefix, `thinpool-<tag>-`, once known.
    prefix: Option<String>,
    mounts: Vec<PathBuf>,
    daemon: Option<Daemon>,
    starts: u32,
}

impl<'a> World<'a> {
    fn new(o: &'a Opts, case: &str) -> Result<World<'a>> {
        let dir = o.dir.join(case);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(World {
            o,
            root: dir.join("pool"),
            socket: dir.join("thinpool.sock"),
            metrics: format!("127.0.0.1:{}", thinpool_tests::http::free_port()),
            dir,
            prefix: None,
            mounts: vec![],
            daemon: None,
            starts: 0,
        })
    }

    fn pool_name(&self) -> Result<String> {
        Ok(format!(
            "{}pool",
            self.prefix.as_ref().context("the pool is not up")?
        ))
    }

    fn start(&mut self) -> Result<()> {
        let before = dm_names()?;
        self.starts += 1;
        let log = self.dir.join(format!("thinpoold-{}.log", self.starts));
        let logf = fs::File::create(&log)?;
        let child = Command::new(&self.o.thinpoold)
            .arg("--root")
            .arg(&self.root)
            .arg("--socket")
            .arg(&self.socket)
            .args([
                "--backend",
                "dm",
                "--data-size",
                "2G",
                "--metadata-size",
                "64M",
            ])
            .args(["--base-size", "256M", "--overcommit-host"])
            .args(["--metrics-addr", &self.metrics])
            .arg("--imagefs-dir")
            .arg(self.dir.join("imagefs"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawn thinpoold")?;
        self.daemon = Some(Daemon { child, log });
        let t0 = Instant::now();
        loop {
            let d = self.daemon.as_mut().expect("just set");
            if let Some(st) = d.child.try_wait()? {
                bail!("thinpoold exited ({st}):\n{}", d.log_tail());
            }
            if self.socket.exists() && self.thinctl(&["pool", "status"]).is_ok() {
                break;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(120),
                "thinpoold not ready in 120 s:\n{}",
                self.daemon
                    .as_ref()
                    .map(Daemon::log_tail)
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.prefix.is_none() {
            let new: Vec<String> = dm_names()?
                .into_iter()
                .filter(|n| {
                    !before.contains(n) && n.starts_with("thinpool-") && n.ends_with("-pool")
                })
                .collect();
            let [pool] = new.as_slice() else {
                bail!("expected one new thin-pool device, found {new:?}");
            };
            self.prefix = Some(pool.trim_end_matches("pool").to_string());
        }
        Ok(())
    }

    fn thinctl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.o.thinctl);
        c.arg("--socket").arg(&self.socket).args(args);
        c
    }

    fn thinctl(&self, args: &[&str]) -> Result<String> {
        run_ok(&mut self.thinctl_cmd(args))
    }

    fn mount(&mut self, key: &str) -> Result<PathBuf> {
        let dir = self.dir.join("mnt").join(key);
        fs::create_dir_all(&dir)?;
        self.thinctl(&["mount", key, dir.to_str().context("utf-8 path")?])?;
        self.mounts.push(dir.clone());
        Ok(dir)
    }

    fn umount(&mut self, dir: &Path) -> Result<()> {
        // A plain umount(2): thinctl umount is the same call, and this one needs no socket.
        let d = dir.to_path_buf();
        limited("umount", move || nix::mount::umount(&d))?
            .with_context(|| format!("umount {}", dir.display()))?;
        self.mounts.retain(|m| m != dir);
        Ok(())
    }

    /// thinpoold's mode (`thinctl pool status --json`) and needs_check.
    fn reported(&self) -> Result<(String, bool)> {
        let v: serde_json::Value =
            serde_json::from_str(&self.thinctl(&["pool", "status", "--json"])?)?;
        Ok((
            v["mode"]
                .as_str()
                .context("no mode in pool status")?
                .to_string(),
            v["needs_check"].as_bool().unwrap_or(false),
        ))
    }

    /// Everything this case made goes away: mounts, the daemon, our dm devices (thin, pool,
    /// linear), the loop devices of the pool files, the directory.
    fn cleanup(&mut self) {
        for m in std::mem::take(&mut self.mounts).into_iter().rev() {
            if nix::mount::umount(&m).is_err() {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        self.daemon = None;
        if let (Some(prefix), Ok(dm)) = (&self.prefix, DM::new()) {
            let mut ours: Vec<String> = dm_names()
                .unwrap_or_default()
                .into_iter()
                .filter(|n| n.starts_with(prefix.as_str()))
                .collect();
            let rank = |n: &String| {
                if n.ends_with("-pool") {
                    1
                } else if n.ends_with("-data") || n.ends_with("-meta") {
                    2
                } else {
                    0
                }
            };
            ours.sort_by_key(rank);
            for n in ours {
                if let Ok(name) = DmName::new(&n) {
                    let id = DevId::Name(name);
                    let _ = dm.device_suspend(&id, DmOptions::default());
                    if let Err(e) = dm.device_remove(&id, DmOptions::default()) {
                        println!("note: cleanup: could not remove {n}: {e}");
                    }
                }
            }
        }
        for f in ["data", "metadata"] {
            let file = self.root.join(f);
            if let Ok(Some(dev)) = thinpool::loopback::find(&file)
                && let Err(e) = thinpool::loopback::detach(&dev)
            {
                println!("note: cleanup: could not detach {}: {e}", dev.display());
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// the workload

/// Deterministic content: an xorshift stream from `seed`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A committed layer: prepare, mount, write checksummed files, sync, unmount, commit.
fn make_layer(
    w: &mut World<'_>,
    name: &str,
    parent: Option<&str>,
    seed: u64,
    sums: &mut BTreeMap<String, String>,
) -> Result<()> {
    let key = format!("{name}-active");
    let mut args = vec!["snapshot", "prepare", key.as_str()];
    if let Some(p) = parent {
        args.push(p);
    }
    w.thinctl(&args)?;
    let m = w.mount(&key)?;
    for i in 0..4u64 {
        let data = content(seed * 100 + i, 256 * 1024 + (i as usize) * 4096);
        let file = format!("{name}-{i}");
        fs::write(m.join(&file), &data)?;
        sums.insert(file, sha(&data));
    }
    nix::unistd::sync();
    w.umount(&m)?;
    w.thinctl(&["snapshot", "commit", name, &key])?;
    Ok(())
}

/// Checks the files of `sums` in a view of `layer` (every file of it and its parents).
fn verify_layer(w: &mut World<'_>, layer: &str, sums: &BTreeMap<String, String>) -> Result<()> {
    let key = format!("verify-{layer}");
    w.thinctl(&["snapshot", "view", &key, layer])?;
    let m = w.mount(&key)?;
    let mut bad = vec![];
    for (file, want) in sums {
        match fs::read(m.join(file)) {
            Ok(d) if sha(&d) == *want => {}
            Ok(_) => bad.push(format!("{file}: checksum differs")),
            Err(e) => bad.push(format!("{file}: {e}")),
        }
    }
    w.umount(&m)?;
    w.thinctl(&["snapshot", "rm", &key])?;
    ensure!(bad.is_empty(), "layer {layer}: {}", bad.join("; "));
    Ok(())
}

/// The container: writes a new 64 KiB file and fsyncs it (and its directory) in a loop,
/// counting successes and errors, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    last_error: Arc<std::sync::Mutex<String>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// The container: a new 64 KiB file, fsynced with its directory, every 50 ms.
    fn files(dir: PathBuf) -> Writer {
        Writer::start(Duration::from_millis(50), move |i| {
            let mut f = fs::File::create(dir.join(format!("w{}", i % 400)))?;
            f.write_all(&content(i, 64 * 1024))?;
            f.sync_all()?;
            fs::File::open(&dir)?.sync_all()
        })
    }

    /// A raw thin device (no filesystem to give up after the first error): 64 KiB at the
    /// next offset, then fdatasync, every 20 ms. Each write maps a new block and each flush
    /// makes the pool commit its metadata, flushing its data device first: the commits
    /// that meet a fault under the pool, long after a container's filesystem has turned
    /// itself read-only.
    fn raw(node: PathBuf, len: u64) -> Writer {
        let mut file = None;
        Writer::start(Duration::from_millis(20), move |i| {
            use std::os::unix::fs::FileExt;
            if file.is_none() {
                file = Some(fs::OpenOptions::new().write(true).open(&node)?);
            }
            let f = file.as_ref().expect("just opened");
            let chunk = 64 * 1024u64;
            f.write_all_at(&content(i, chunk as usize), (i * chunk) % len)?;
            f.sync_data()
        })
    }

    fn start(
        pause: Duration,
        mut step: impl FnMut(u64) -> std::io::Result<()> + Send + 'static,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(std::sync::Mutex::new(String::new()));
        let (s, k, e, l) = (stop.clone(), ok.clone(), errors.clone(), last_error.clone());
        let handle = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                match step(i) {
                    Ok(()) => {
                        k.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(err) => {
                        e.fetch_add(1, Ordering::SeqCst);
                        *l.lock().unwrap_or_else(|p| p.into_inner()) = err.to_string();
                    }
                }
                std::thread::sleep(pause);
            }
            // The step (and any device it holds open) is dropped here.
        });
        Writer {
            stop,
            ok,
            errors,
            last_error,
            handle: Some(handle),
        }
    }

    /// "WHAT writes ok N, failed M (last error)".
    fn counts(&self, what: &str) -> String {
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        format!(
            "{what}: ok {}, failed {}{}",
            self.ok.load(Ordering::SeqCst),
            self.errors.load(Ordering::SeqCst),
            if last.is_empty() {
                String::new()
            } else {
                format!(" ({last})")
            }
        )
    }

    /// Stops the loop; fails if its last write does not return within [`CALL_LIMIT`].
    fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let Some(h) = self.handle.take() else {
            return Ok(());
        };
        let t0 = Instant::now();
        while !h.is_finished() {
            ensure!(
                t0.elapsed() < CALL_LIMIT,
                "the container's write/fsync hung for over {} s",
                CALL_LIMIT.as_secs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = h.join();
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------
// one case

fn metrics_mode(w: &World<'_>) -> Result<String> {
    let addr = w.metrics.clone();
    let body = limited("GET /metrics", move || {
        thinpool_tests::http::get(&addr, "/metrics")
    })?
    .map_err(|e| anyhow!(e))?;
    let ones: Vec<String> = body
        .lines()
        .filter(|l| l.starts_with("thinpool_pool_mode{") && l.ends_with(" 1"))
        .map(str::to_string)
        .collect();
    let [line] = ones.as_slice() else {
        bail!("/metrics: expected one thinpool_pool_mode at 1, got {ones:?}");
    };
    line.split('"')
        .nth(1)
        .map(str::to_string)
        .context("no mode label")
}

/// The checks while the fault is in place; returns a summary of what was seen.
fn check_faulted(
    case: &Case,
    w: &mut World<'_>,
    writer: &Writer,
    raw: &Writer,
    t_fault: Instant,
) -> Result<String> {
    let pool = w.pool_name()?;
    let mut seen;
    match case.bound {
        Some(bound) => loop {
            seen = kernel_status(&pool)?;
            if seen.mode != "rw" {
                break;
            }
            ensure!(
                t_fault.elapsed() < bound,
                "the pool is still rw {} s after the fault ({}; {})",
                bound.as_secs(),
                writer.counts("container writes"),
                raw.counts("raw device writes")
            );
            std::thread::sleep(Duration::from_millis(100));
        },
        None => {
            while t_fault.elapsed() < case.watch {
                seen = kernel_status(&pool)?;
                ensure!(
                    seen.mode == "rw",
                    "the pool turned {} (expected it to stay rw)",
                    seen.mode
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let left_after = t_fault.elapsed();
    // The mode can move on (ro, then fail): let it settle for a moment, then compare.
    std::thread::sleep(Duration::from_secs(2));
    seen = kernel_status(&pool)?;
    ensure!(
        writer.errors.load(Ordering::SeqCst) > 0,
        "the container saw no write error (writes ok {})",
        writer.ok.load(Ordering::SeqCst)
    );
    // thinctl pool status: the kernel's mode (read between two kernel reads, so that a
    // change in between is no false alarm).
    let (reported, _) = w.reported()?;
    let after = kernel_status(&pool)?;
    ensure!(
        reported == seen.mode || reported == after.mode,
        "thinctl pool status says mode {reported}, the kernel {} / {}",
        seen.mode,
        after.mode
    );
    let m = metrics_mode(w)?;
    let after2 = kernel_status(&pool)?;
    ensure!(
        m == after.mode || m == after2.mode,
        "/metrics says mode {m}, the kernel {} / {}",
        after.mode,
        after2.mode
    );
    seen = after2;
    // A new snapshot: refused naming the mode, unless the pool is still rw (error-data).
    let probe = run_limited(&mut w.thinctl_cmd(&["snapshot", "prepare", "probe", "l2"]))?;
    if seen.mode == "rw" && !seen.needs_check {
        ensure!(
            probe.status.success(),
            "Prepare on a rw pool failed: {}",
            probe.stderr
        );
    } else {
        ensure!(
            !probe.status.success(),
            "Prepare on a {} pool succeeded",
            seen.mode
        );
        ensure!(
            // thinctl prints the gRPC code as words; the mode may have moved on (ro, fail).
            probe.stderr.contains("failed precondition")
                && ["mode is ro", "mode is fail"]
                    .iter()
                    .any(|m| probe.stderr.contains(m)),
            "Prepare on a {} pool: expected FailedPrecondition naming the mode, got: {}",
            seen.mode,
            probe.stderr.trim()
        );
        // The daemon's log: the space monitor (woken by the pool's dm event) or the
        // refused Prepare warned about the mode.
        let log = w.daemon.as_ref().map(|d| d.log_text()).unwrap_or_default();
        let warned = log.lines().any(|l| {
            l.contains("WARN")
                && (l.contains("the pool has FAILED") || l.contains("the pool is read-only"))
        });
        ensure!(
            warned,
            "no warning about the pool's mode in thinpoold's log"
        );
    }
    Ok(format!(
        "kernel {}{} after {:.1} s; {}; {}",
        seen.mode,
        if seen.needs_check { "+needs_check" } else { "" },
        left_after.as_secs_f64(),
        writer.counts("container writes"),
        raw.counts("raw device writes")
    ))
}

fn run_case(case: &Case, w: &mut World<'_>) -> Result<String> {
    w.start()?;
    let mut sums1 = BTreeMap::new();
    make_layer(w, "l1", None, 1, &mut sums1)?;
    let mut sums2 = sums1.clone();
    make_layer(w, "l2", Some("l1"), 2, &mut sums2)?;
    w.thinctl(&["snapshot", "prepare", "ctr", "l2"])?;
    let ctr = w.mount("ctr")?;
    let mut writer = Writer::files(ctr.clone());
    // A second container uses its device raw (see Writer::raw).
    w.thinctl(&["snapshot", "prepare", "raw", "l2"])?;
    w.thinctl(&["device", "activate", "raw"])?;
    let mounts: serde_json::Value =
        serde_json::from_str(&w.thinctl(&["snapshot", "mounts", "raw", "--json"])?)?;
    let node = PathBuf::from(
        mounts[0]["source"]
            .as_str()
            .context("no source in the raw snapshot's mounts")?,
    );
    let mut raw = Writer::raw(node, 256 << 20);
    // Some writes before the fault: the loops run.
    let t0 = Instant::now();
    while writer.ok.load(Ordering::SeqCst) < 3 || raw.ok.load(Ordering::SeqCst) < 3 {
        ensure!(
            t0.elapsed() < CALL_LIMIT,
            "the writes do not succeed before the fault: {}; {}",
            writer.counts("container writes"),
            raw.counts("raw device writes")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let prefix = w.prefix.clone().context("no prefix")?;
    let linear = format!(
        "{prefix}{}",
        match case.target {
            Target::Data => "data",
            Target::Meta => "meta",
        }
    );
    // Prepares racing the fault: one that thinpoold acknowledged must survive the
    // recovery, whatever the kernel did with the commit under it.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut preparer = {
        let (acked, thinctl, socket) = (acked.clone(), w.o.thinctl.clone(), w.socket.clone());
        Writer::start(Duration::from_millis(100), move |i| {
            let key = format!("race-{i}");
            let o = run_limited(
                Command::new(&thinctl)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["snapshot", "prepare", &key, "l2"]),
            )
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            if o.status.success() {
                acked.lock().unwrap_or_else(|p| p.into_inner()).push(key);
                Ok(())
            } else {
                Err(std::io::Error::other(o.stderr.trim().to_string()))
            }
        })
    };
    let mut fault = Fault::inject(&linear, case.kind)?;
    let t_fault = Instant::now();
    let seen = check_faulted(case, w, &writer, &raw, t_fault);
    let prepared = preparer.stop();
    // Recovery, as docs/recovery.md says: clear the fault first, stop the containers.
    let cleared = fault.clear();
    let stopped = writer.stop();
    let raw_stopped = raw.stop();
    let seen = format!("{}; {}", seen?, preparer.counts("racing prepares"));
    prepared?;
    cleared?;
    stopped?;
    raw_stopped?;
    w.umount(&ctr)?;
    // Take the pool down (thinpoold exits), check the metadata by hand (the kernel may not
    // have managed to set needs_check on a failing metadata device), start again.
    w.thinctl(&["pool", "down"])?;
    let st = w.daemon.as_mut().context("no daemon")?.wait_exit()?;
    ensure!(st.success(), "thinpoold exited with {st} after pool down");
    w.daemon = None;
    let meta = w.root.join("metadata");
    run_ok(Command::new("thin_check").arg(&meta))
        .context("thin_check of the metadata after the fault")?;
    w.start()?;
    let (mode, needs_check) = w.reported()?;
    ensure!(
        mode == "rw" && !needs_check,
        "after recovery: mode {mode}, needs_check {needs_check}"
    );
    let k = kernel_status(&w.pool_name()?)?;
    ensure!(
        k.mode == "rw" && !k.needs_check,
        "after recovery the kernel says {k:?}"
    );
    w.thinctl(&["pool", "audit"])
        .context("audit after recovery")?;
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for key in &acked {
        w.thinctl(&["snapshot", "info", key])
            .with_context(|| format!("the acknowledged Prepare of {key} did not survive"))?;
    }
    verify_layer(w, "l1", &sums1)?;
    verify_layer(w, "l2", &sums2)?;
    // The pool serves again: a new snapshot works.
    w.thinctl(&["snapshot", "prepare", "after", "l2"])?;
    w.thinctl(&["pool", "down"])?;
    w.daemon.as_mut().context("no daemon")?.wait_exit()?;
    w.daemon = None;
    Ok(seen)
}

fn main() -> std::process::ExitCode {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("faults: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // /metrics listens on 127.0.0.1: the guest's loopback starts down.
    for cmd in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ifconfig", "lo", "127.0.0.1", "up"],
    ] {
        if Command::new(cmd[0])
            .args(&cmd[1..])
            .status()
            .is_ok_and(|s| s.success())
        {
            break;
        }
    }
    let (mut passed, mut failed) = (0, 0);
    let t_all = Instant::now();
    for name in &o.cases {
        let case = CASES.iter().find(|c| c.name == name).expect("checked");
        let t0 = Instant::now();
        let r = World::new(&o, case.name).and_then(|mut w| {
            let r = run_case(case, &mut w);
            if r.is_err()
                && let Some(d) = &w.daemon
            {
                println!(
                    "--- {}: thinpoold log tail ---\n{}",
                    case.name,
                    d.log_tail()
                );
            }
            w.cleanup();
            r
        });
        match r {
            Ok(seen) => {
                passed += 1;
                println!(
                    "ok {} ({:.0} s; {seen})",
                    case.name,
                    t0.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                println!(
                    "FAILED {}: {} ({:.0} s)",
                    case.name,
                    format!("{e:#}").replace('\n', " | "),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        let _ = std::io::stdout().flush();
    }
    println!(
        "faults: {} case(s) in {:.0} s",
        o.cases.len(),
        t_all.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
