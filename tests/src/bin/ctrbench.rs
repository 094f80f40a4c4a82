//! containerd benchmark, run inside the VM: `tests/vm/run --bench ctr [ARGS]` (issue #4).
//!
//! Prepare latency of containerd 1.6's built-in devmapper snapshotter against thinpoold,
//! all measured in one run on three pools of the same kind (sparse data and metadata files
//! on loop devices with the same sizes, block size and low water mark) on the same disk:
//!
//! - (a) containerd → `io.containerd.snapshotter.v1.devmapper` (the baseline);
//! - (b) containerd → `[proxy_plugins.thinpool]` → thinpoold (what a containerd user gets);
//! - (c) thinpoold's socket directly (what the proxy hop costs).
//!
//! (c) talks to a second thinpoold with the same settings on its own pool: containerd's GC
//! removes every snapshot of a proxied snapshotter that its own metadata does not know, so
//! snapshots made on (b)'s daemon behind containerd's back would be collected under us.
//!
//! Each is timed for a *parented* Prepare (of one committed parent made up front) and a
//! *parentless* one, as one snapshots.v1 `Prepare` RPC from a Rust client over the unix
//! socket. The six series, and the steps of a Prepare timed alone (see `Steps`), are
//! interleaved op by op (the starting one rotates) so that drift in the TCG guest lands on
//! all of them alike. A small sample of `ctr snapshots prepare` CLI calls is timed too,
//! since issue #4 names `ctr snapshots`.
//!
//! containerd's garbage collector: snapshots made through containerd are held by a lease (the
//! `containerd-lease` gRPC header), so GC cannot collect them while they are measured. In
//! 1.6 a Remove through containerd only drops the metadata record; the backend snapshot is
//! removed by the GC that the deletion schedules, and that GC holds the snapshotter's lock.
//! So each round ends with the Removes and `ctr leases rm --sync`, which waits for a full GC
//! (backend removals included) before the next round's timed ops start. Rounds are kept
//! below containerd's default mutation threshold (100) so no GC starts during timed ops.
//!
//! Prints a markdown report between `=== BENCH BEGIN ===` and `=== BENCH END ===`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use thinpool::{AutoextendPolicy, Bytes, DataBlocks};
use thinpool_client::Client;
use thinpool_proto::pb::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use thinpool_proto::pb::containerd::services::snapshots::v1::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use thinpool_tests::iobench::percentiles;
use tokio::runtime::Runtime;
use tonic::transport::Channel;

/// containerd namespace for everything the bench makes.
const NS: &str = "ctrbench";
/// The devmapper thin-pool's dm name (containerd's `pool_name`).
const DM_POOL: &str = "ctrbench-pool";
/// Lease holding the committed parents for the whole run.
const PARENT_LEASE: &str = "ctrbench-parents";
/// containerd 1.6's default `mutation_threshold`: a GC starts after this many mutations.
const GC_MUTATION_THRESHOLD: usize = 100;
/// thin id for the mkfs diagnostic, far above anything devmapper allocates (it counts up
/// from 0 and reuses freed ids).
const DIAG_THIN_ID: u32 = 0xfff000;

const USAGE: &str = "\
Usage: ctrbench --thinpoold PATH [--n N] [--per-round K] [--cli M] [--warmup W]
                [--data-size SIZE] [--metadata-size SIZE] [--base-size SIZE] [--block-size SIZE]

Runs in the test VM (tests/vm/run --bench ctr ARGS; the harness adds --thinpoold).
  --n N            timed Prepares per path and kind (default 40)
  --per-round K    Prepares per path and kind between clean-ups (default 10; 4*K*2 containerd
                   mutations per round must stay below containerd's GC mutation threshold)
  --cli M          ctr CLI calls per snapshotter and kind (default 5; 0 skips)
  --warmup W       untimed Prepares per path and kind first (default 2)
  --data-size, --metadata-size, --base-size, --block-size
                   pool and device sizes, the same for both pools
                   (default: thinpoold's defaults 100G, 2G, 10G, 64K)
";

struct Opts {
    thinpoold: PathBuf,
    n: usize,
    per_round: usize,
    cli: usize,
    warmup: usize,
    data_size: Bytes,
    metadata_size: Bytes,
    base_size: Bytes,
    block_size: Bytes,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        thinpoold: PathBuf::new(),
        n: 40,
        per_round: 10,
        cli: 5,
        warmup: 2,
        data_size: thinpool::PoolSettings::DEFAULT_DATA_SIZE,
        metadata_size: thinpool::PoolSettings::DEFAULT_METADATA_SIZE,
        base_size: thinpool::PoolSettings::DEFAULT_BASE_SIZE,
        block_size: thinpool::PoolSettings::DEFAULT_BLOCK_SIZE,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "-h" || a == "--help" {
            print!("{USAGE}");
            std::process::exit(0);
        }
        let v = args
            .next()
            .with_context(|| format!("{a} needs a value\n{USAGE}"))?;
        let num = || v.parse::<usize>().with_context(|| format!("{a} {v}"));
        let size = || v.parse::<Bytes>().with_context(|| format!("{a} {v}"));
        match a.as_str() {
            "--thinpoold" => o.thinpoold = PathBuf::from(&v),
            "--n" => o.n = num()?,
            "--per-round" => o.per_round = num()?,
            "--cli" => o.cli = num()?,
            "--warmup" => o.warmup = num()?,
            "--data-size" => o.data_size = size()?,
            "--metadata-size" => o.metadata_size = size()?,
            "--base-size" => o.base_size = size()?,
            "--block-size" => o.block_size = size()?,
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    ensure!(
        o.thinpoold.is_file(),
        "--thinpoold: no file {:?}",
        o.thinpoold
    );
    ensure!(
        o.n > 0 && o.per_round > 0,
        "--n and --per-round must be > 0"
    );
    ensure!(
        4 * 2 * o.per_round < GC_MUTATION_THRESHOLD,
        "--per-round {}: a round would reach containerd's GC mutation threshold",
        o.per_round
    );
    Ok(o)
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let logf = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc { name, child, log })
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited ({st}):\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion; its stdout, or an error with its output.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// dmsetup without udev (the guest has none): it then makes the /dev/mapper nodes itself.
fn dmsetup(args: &[&str]) -> Result<String> {
    run(Command::new("dmsetup")
        .args(args)
        .env("DM_DISABLE_UDEV", "1"))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The three paths a Prepare can take.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Path3 {
    Devmapper,
    Proxy,
    Direct,
}

impl Path3 {
    const ALL: [Path3; 3] = [Path3::Devmapper, Path3::Proxy, Path3::Direct];

    fn label(self) -> &'static str {
        match self {
            Path3::Devmapper => "(a) containerd → devmapper",
            Path3::Proxy => "(b) containerd → proxy → thinpoold",
            Path3::Direct => "(c) thinpoold socket directly",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Path3::Devmapper => "dm",
            Path3::Proxy => "px",
            Path3::Direct => "tp",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Parented,
    Parentless,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Parented, Kind::Parentless];

    fn label(self) -> &'static str {
        match self {
            Kind::Parented => "parented",
            Kind::Parentless => "parentless",
        }
    }
}

/// A snapshots.v1 client for one path: the socket, the `snapshotter` field and, through
/// containerd, the namespace and lease headers.
#[derive(Clone)]
struct Target {
    path: Path3,
    client: SnapshotsClient<Channel>,
    snapshotter: &'static str,
    via_containerd: bool,
}

impl Target {
    fn request<T>(&self, msg: T, lease: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if self.via_containerd {
            r.metadata_mut()
                .insert("containerd-namespace", NS.parse().unwrap());
            if let Some(l) = lease {
                r.metadata_mut()
                    .insert("containerd-lease", l.parse().unwrap());
            }
        }
        r
    }

    async fn prepare(&mut self, key: &str, parent: &str, lease: Option<&str>) -> Result<()> {
        let req = self.request(
            PrepareSnapshotRequest {
                snapshotter: self.snapshotter.into(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            },
            lease,
        );
        self.client
            .prepare(req)
            .await
            .with_context(|| format!("{}: Prepare {key} (parent {parent:?})", self.path.label()))?;
        Ok(())
    }

    async fn commit(&mut self, name: &str, key: &str, lease: Option<&str>) -> Result<()> {
        let req = self.request(
            CommitSnapshotRequest {
                snapshotter: self.snapshotter.into(),
                name: name.into(),
                key: key.into(),
                labels: HashMap::new(),
                parent: String::new(),
            },
            lease,
        );
        self.client
            .commit(req)
            .await
            .with_context(|| format!("{}: Commit {key} as {name}", self.path.label()))?;
        Ok(())
    }

    async fn remove(&mut self, key: &str) -> Result<()> {
        let req = self.request(
            RemoveSnapshotRequest {
                snapshotter: self.snapshotter.into(),
                key: key.into(),
            },
            None,
        );
        self.client
            .remove(req)
            .await
            .with_context(|| format!("{}: Remove {key}", self.path.label()))?;
        Ok(())
    }

    /// Whether the snapshotter answers: a Stat of a missing key is NotFound once it is
    /// loaded; containerd answers other errors for a snapshotter that failed to load.
    async fn ready(&mut self) -> std::result::Result<(), tonic::Status> {
        let req = self.request(
            StatSnapshotRequest {
                snapshotter: self.snapshotter.into(),
                key: "ctrbench-no-such-key".into(),
            },
            None,
        );
        match self.client.stat(req).await {
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(s),
            Ok(_) => Ok(()),
        }
    }

    /// Parent name for this path's parented Prepares.
    fn parent(&self) -> String {
        format!("{}-parent", self.path.tag())
    }
}

/// The containerd instance under test: its own root, state and sockets under `dir`.
struct Containerd {
    proc: Proc,
    socket: PathBuf,
}

impl Containerd {
    fn ctr(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", NS])
            .args(args))
    }

    /// Creates a lease that does not expire during the run.
    fn lease_create(&self, id: &str) -> Result<()> {
        self.ctr(&["leases", "create", "--id", id, "--expires", "0"])
            .map(drop)
    }

    /// Deletes a lease and waits for the GC that this schedules to finish, including the
    /// backend snapshotters' removals of what it collected.
    fn lease_delete_sync(&self, id: &str) -> Result<()> {
        self.ctr(&["leases", "rm", "--sync", id]).map(drop)
    }
}

fn start_containerd(dir: &Path, thinpool_socket: &Path, o: &Opts) -> Result<Containerd> {
    let socket = dir.join("containerd.sock");
    std::fs::create_dir_all(dir)?;
    let config = dir.join("containerd.toml");
    // Non-defaults, each needed to run here: own root/state/sockets (not the system's);
    // CRI and the other snapshotters off (CRI is the slow part of start-up and not under
    // test); the devmapper section's required keys (pool_name, root_path, base_image_size:
    // the same device size as thinpoold's base size, in bytes, which go-units accepts);
    // the proxy plugin. async_remove, discard_blocks, fs_type, fs_options and the GC
    // scheduler stay at containerd's defaults.
    let text = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.native",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[proxy_plugins]
  [proxy_plugins.thinpool]
    type = "snapshot"
    address = "{thinpool}"

[plugins."io.containerd.snapshotter.v1.devmapper"]
  pool_name = "{DM_POOL}"
  root_path = "{dmroot}"
  base_image_size = "{base}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = socket.display(),
        thinpool = thinpool_socket.display(),
        dmroot = dir.join("devmapper").display(),
        base = o.base_size.0,
    );
    std::fs::write(&config, text)?;
    let t = Instant::now();
    let proc = Proc::spawn(
        "containerd",
        Command::new("containerd")
            .arg("--config")
            .arg(&config)
            // The guest has no udev: dmsetup must make the /dev/mapper nodes itself.
            .env("DM_DISABLE_UDEV", "1"),
        dir.join("containerd.log"),
    )?;
    let mut c = Containerd { proc, socket };
    let rt = rt()?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        c.proc.check_alive()?;
        let up = rt.block_on(async {
            let Ok(client) = Client::connect(&c.socket).await else {
                return Err("socket not up".to_string());
            };
            for sn in ["devmapper", "thinpool"] {
                let mut t = Target {
                    path: Path3::Devmapper,
                    client: client.snapshots_raw(),
                    snapshotter: sn,
                    via_containerd: true,
                };
                t.ready().await.map_err(|e| format!("{sn}: {e}"))?;
            }
            Ok(())
        });
        match up {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "containerd not ready in 180 s ({e}):\n{}",
                    c.proc.log_tail()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    eprintln!(
        "ctrbench: containerd ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(c)
}

/// A thinpoold on a new pool under `dir/<name>`, serving on `dir/<name>.sock`.
fn start_thinpoold(dir: &Path, name: &'static str, o: &Opts) -> Result<(Proc, PathBuf)> {
    let socket = dir.join(format!("{name}.sock"));
    let t = Instant::now();
    let mut p = Proc::spawn(
        name,
        Command::new(&o.thinpoold)
            .arg("--root")
            .arg(dir.join(name))
            .arg("--socket")
            .arg(&socket)
            .args(["--backend", "dm"])
            .args(["--data-size", &o.data_size.0.to_string()])
            .args(["--metadata-size", &o.metadata_size.0.to_string()])
            .args(["--base-size", &o.base_size.0.to_string()])
            .args(["--block-size", &o.block_size.0.to_string()])
            // Sparse, as devmapper's files: the bench disk need not hold them whole.
            .arg("--overcommit-host")
            .args(["--metrics-addr", ""])
            .arg("--imagefs-dir")
            .arg(dir.join(format!("{name}-imagefs"))),
        dir.join(format!("{name}.log")),
    )?;
    let rt = rt()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        p.check_alive()?;
        let ok = rt.block_on(async {
            match Client::connect(&socket).await {
                Ok(mut c) => c.pool_status().await.is_ok(),
                Err(_) => false,
            }
        });
        if ok {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "thinpoold not ready in 300 s:\n{}",
            p.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "ctrbench: {name} (new dm pool) ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok((p, socket))
}

/// The devmapper snapshotter's pool, made like thinpoold's: sparse data and metadata files
/// on direct-I/O loop devices (the same `loopback::attach`), the same sizes, block size and
/// low water mark, no feature arguments. (thinpoold puts a linear dm device between each
/// loop device and the pool, which costs nothing per Prepare.)
fn make_devmapper_pool(dir: &Path, o: &Opts) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("data");
    let meta = dir.join("metadata");
    std::fs::File::create(&data)?.set_len(o.data_size.0)?;
    std::fs::File::create(&meta)?.set_len(o.metadata_size.0)?;
    let data_loop =
        thinpool::loopback::find_or_attach(&data, thinpool::loopback::LoopOptions::POOL_FILE)?;
    let meta_loop =
        thinpool::loopback::find_or_attach(&meta, thinpool::loopback::LoopOptions::POOL_FILE)?;
    let total = DataBlocks(o.data_size.0 / o.block_size.0);
    let lwm = AutoextendPolicy::OFF.low_water_mark(total);
    let table = format!(
        "0 {} thin-pool {} {} {} {}",
        o.data_size.sectors().0,
        meta_loop.display(),
        data_loop.display(),
        o.block_size.sectors().0,
        lwm.0
    );
    dmsetup(&["create", DM_POOL, "--table", &table])?;
    eprintln!("ctrbench: devmapper pool {DM_POOL}: {table}");
    Ok(())
}

fn rt() -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

type Series = HashMap<(Path3, Kind), Vec<f64>>;

/// One timed operation of a round.
#[derive(Clone, Copy)]
enum Op {
    Prepare(Path3, Kind),
    /// An index into `STEPS`.
    Step(usize),
}

fn main() -> Result<()> {
    let o = parse_opts()?;
    let dir = thinpool_tests::base_dir().join("ctrbench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();

    let (_proxied, proxied_socket) = start_thinpoold(&dir, "thinpoold-proxied", &o)?;
    let (_direct, tp_socket) = start_thinpoold(&dir, "thinpoold-direct", &o)?;
    make_devmapper_pool(&dir.join("dmpool"), &o)?;
    let ctrd = start_containerd(&dir.join("containerd"), &proxied_socket, &o)?;

    let rt = rt()?;
    let (ctr_client, tp_client) = rt.block_on(async {
        Ok::<_, anyhow::Error>((
            Client::connect(&ctrd.socket).await?,
            Client::connect(&tp_socket).await?,
        ))
    })?;
    let mut targets: Vec<Target> = Path3::ALL
        .iter()
        .map(|&path| Target {
            path,
            client: match path {
                Path3::Direct => tp_client.snapshots_raw(),
                _ => ctr_client.snapshots_raw(),
            },
            snapshotter: match path {
                Path3::Devmapper => "devmapper",
                _ => "thinpool",
            },
            via_containerd: path != Path3::Direct,
        })
        .collect();

    // One committed parent per path (containerd's are held by a lease for the whole run).
    ctrd.lease_create(PARENT_LEASE)?;
    for t in &mut targets {
        let (parent, src) = (t.parent(), format!("{}-parent-src", t.path.tag()));
        let tm = Instant::now();
        rt.block_on(async {
            t.prepare(&src, "", Some(PARENT_LEASE)).await?;
            t.commit(&parent, &src, Some(PARENT_LEASE)).await
        })?;
        eprintln!(
            "ctrbench: {}: parent made in {:.0} ms",
            t.path.label(),
            ms(tm)
        );
    }

    let (mut steps, mkfs_ms) = Steps::new(&dir, &o)?;
    let mut step_ms: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];

    // Timed rounds, after an untimed warm-up round.
    let mut series: Series = HashMap::new();
    let rounds = o.n.div_ceil(o.per_round);
    let mut done = 0;
    let mut op = 0usize;
    for round in 0..=rounds {
        let warmup = round == 0;
        let k = if warmup {
            o.warmup
        } else {
            o.per_round.min(o.n - done)
        };
        if k == 0 {
            continue;
        }
        let lease = format!("ctrbench-r{round}");
        ctrd.lease_create(&lease)?;
        let mut made: Vec<(Path3, String)> = Vec::new();
        for i in 0..k {
            // All six series and the steps in turn; the first one rotates with every op.
            let mut order: Vec<Op> = Path3::ALL
                .iter()
                .flat_map(|&p| Kind::ALL.iter().map(move |&k| Op::Prepare(p, k)))
                .chain((0..STEPS.len()).map(Op::Step))
                .collect();
            let len = order.len();
            order.rotate_left(op % len);
            op += 1;
            for next in order {
                let (path, kind) = match next {
                    Op::Prepare(p, k) => (p, k),
                    Op::Step(s) => {
                        let v = steps.run(s)?;
                        if !warmup {
                            step_ms[s].push(v);
                        }
                        continue;
                    }
                };
                let t = targets.iter_mut().find(|t| t.path == path).unwrap();
                let key = format!("{}-{}-r{round}-{i}", path.tag(), kind.label());
                let parent = match kind {
                    Kind::Parented => t.parent(),
                    Kind::Parentless => String::new(),
                };
                let tm = Instant::now();
                rt.block_on(t.prepare(&key, &parent, Some(&lease)))?;
                let v = ms(tm);
                if !warmup {
                    series.entry((path, kind)).or_default().push(v);
                }
                made.push((path, key));
            }
        }
        if !warmup {
            done += k;
        }
        // Clean-up, not timed: Removes, then a GC that finishes the backend removals.
        let tm = Instant::now();
        for (path, key) in &made {
            let t = targets.iter_mut().find(|t| t.path == *path).unwrap();
            rt.block_on(t.remove(key))?;
        }
        ctrd.lease_delete_sync(&lease)?;
        steps.clean()?;
        eprintln!(
            "ctrbench: round {round}{}: {k} ops per series, clean-up {:.1} s, {:.0} s so far",
            if warmup { " (warm-up)" } else { "" },
            tm.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }

    // `ctr snapshots prepare`: a fork of the ctr CLI per call, as a user would type it.
    let mut cli: HashMap<(&str, Kind), Vec<f64>> = HashMap::new();
    let mut ctr_version = Vec::new();
    let mut cli_keys = Vec::new();
    for i in 0..o.cli {
        let tm = Instant::now();
        ctrd.ctr(&["version"])?;
        ctr_version.push(ms(tm));
        for sn in ["devmapper", "thinpool"] {
            for kind in Kind::ALL {
                let key = format!("cli-{sn}-{}-{i}", kind.label());
                let parent = match kind {
                    Kind::Parented if sn == "devmapper" => Path3::Devmapper.tag(),
                    Kind::Parented => Path3::Proxy.tag(),
                    Kind::Parentless => "",
                };
                let parent = if parent.is_empty() {
                    String::new()
                } else {
                    format!("{parent}-parent")
                };
                let mut args = vec!["snapshots", "--snapshotter", sn, "prepare", &key];
                if !parent.is_empty() {
                    args.push(&parent);
                }
                let tm = Instant::now();
                ctrd.ctr(&args)?;
                cli.entry((sn, kind)).or_default().push(ms(tm));
                cli_keys.push((sn, key));
            }
        }
    }
    if o.cli > 0 {
        // ctr holds no lease on what it prepares: the GC that the first rm schedules may
        // collect the others first, so a failed rm is fine here.
        for (sn, key) in &cli_keys {
            let _ = ctrd.ctr(&["snapshots", "--snapshotter", sn, "rm", key]);
        }
        ctrd.lease_create("ctrbench-cli-gc")?;
        ctrd.lease_delete_sync("ctrbench-cli-gc")?;
    }

    let mut diag: Vec<(String, Vec<f64>)> =
        STEPS.iter().map(|s| s.to_string()).zip(step_ms).collect();
    diag.push((
        format!(
            "mkfs.ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 of a fresh {} thin \
             device (devmapper's parentless Prepare; mean of 2, before the rounds)",
            o.base_size
        ),
        mkfs_ms,
    ));

    let report = report(&o, &series, &cli, &ctr_version, &diag, started);
    println!("=== BENCH BEGIN ===");
    print!("{report}");
    println!("=== BENCH END ===");
    drop(ctrd);
    Ok(())
}

/// The steps of a Prepare, each timed alone on the devmapper pool and interleaved with the
/// Prepares: what a dmsetup fork costs, the kernel's own work for a snapshot (the same
/// create_snap + create + load + resume that devmapper forks dmsetup for, as ioctls from one
/// process, which is how thinpoold issues them), and the lost+found mount that devmapper
/// does on every Prepare. Thin ids far above devmapper's (it counts up from 0).
struct Steps {
    dm: devicemapper::DM,
    pool_dev: String,
    sectors: u64,
    mnt: PathBuf,
    next_id: u32,
    /// Devices made this round: removed (untimed) by `clean`.
    made: Vec<u32>,
    /// The devmapper pool's kernel transaction id (only these steps change it).
    txn: u64,
}

/// The step series, in report order.
const STEPS: [&str; 5] = [
    "one `dmsetup version` fork",
    "`dmsetup message create_snap` + `dmsetup create` (2 of devmapper's 3 forks per parented Prepare)",
    "the same as ioctls from one process (create_snap, create, load, resume)",
    "temp mount ext4 + remove lost+found + umount (devmapper, every Prepare)",
    "the ioctls plus `set_transaction_id` (thinpoold's kernel sequence)",
];

impl Steps {
    /// Makes the origin for the snapshot steps as devmapper makes a parentless device
    /// (create_thin, activate, mkfs with its default options), twice to time mkfs; returns
    /// the mkfs times.
    fn new(dir: &Path, o: &Opts) -> Result<(Steps, Vec<f64>)> {
        let dm = devicemapper::DM::new().context("DM::new")?;
        let info = dm.device_info(&devicemapper::DevId::Name(devicemapper::DmName::new(
            DM_POOL,
        )?))?;
        let pool_dev = format!("{}:{}", info.device().major, info.device().minor);
        let mnt = dir.join("steps-mnt");
        std::fs::create_dir_all(&mnt)?;
        let steps = Steps {
            dm,
            pool_dev,
            sectors: o.base_size.sectors().0,
            mnt,
            next_id: DIAG_THIN_ID + 2,
            made: Vec::new(),
            txn: 0,
        };
        let mut mkfs = Vec::new();
        for id in [DIAG_THIN_ID + 1, DIAG_THIN_ID] {
            let name = steps.name(id);
            dmsetup(&["message", DM_POOL, "0", &format!("create_thin {id}")])?;
            dmsetup(&["create", &name, "--table", &steps.table(id)])?;
            let tm = Instant::now();
            run(Command::new("mkfs.ext4").args([
                "-q",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                &format!("/dev/mapper/{name}"),
            ]))?;
            mkfs.push(ms(tm));
            // As devmapper's Prepare leaves its parent: lost+found removed.
            steps.temp_mount(&name)?;
            dmsetup(&["remove", &name])?;
        }
        dmsetup(&[
            "message",
            DM_POOL,
            "0",
            &format!("delete {}", DIAG_THIN_ID + 1),
        ])?;
        Ok((steps, mkfs))
    }

    /// devmapper's temp mount after every Prepare: mount, remove lost+found (the error
    /// ignored: a snapshot of a parent made by devmapper has none), unmount.
    fn temp_mount(&self, name: &str) -> Result<()> {
        let dev = format!("/dev/mapper/{name}");
        nix::mount::mount(
            Some(dev.as_str()),
            &self.mnt,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )?;
        let _ = std::fs::remove_dir(self.mnt.join("lost+found"));
        nix::mount::umount(&self.mnt)?;
        Ok(())
    }

    /// A thin id for a new step device, remembered for the clean-up.
    fn new_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.made.push(id);
        id
    }

    /// A snapshot of the step origin made as devmapper makes one: `dmsetup message
    /// create_snap`, then `dmsetup create` (two forks).
    fn dmsetup_snapshot(&mut self) -> Result<u32> {
        let id = self.new_id();
        dmsetup(&[
            "message",
            DM_POOL,
            "0",
            &format!("create_snap {id} {DIAG_THIN_ID}"),
        ])?;
        dmsetup(&["create", &self.name(id), "--table", &self.table(id)])?;
        Ok(id)
    }

    fn name(&self, id: u32) -> String {
        format!("ctrbench-step-{id}")
    }

    fn table(&self, id: u32) -> String {
        format!("0 {} thin /dev/mapper/{DM_POOL} {id}", self.sectors)
    }

    /// Runs step `i` of `STEPS` once; its time in ms.
    fn run(&mut self, i: usize) -> Result<f64> {
        let origin = DIAG_THIN_ID;
        let tm = Instant::now();
        match i {
            0 => {
                dmsetup(&["version"])?;
            }
            1 => {
                self.dmsetup_snapshot()?;
            }
            2 | 4 => {
                let id = self.new_id();
                let pool = devicemapper::DevId::Name(devicemapper::DmName::new(DM_POOL)?);
                self.dm
                    .target_msg(&pool, None, &format!("create_snap {id} {origin}"))?;
                if i == 4 {
                    // thinpoold advances the pool's transaction id with every change (a
                    // second pool message); devmapper leaves it at 0, so this one is ours.
                    let t = self.txn;
                    self.dm.target_msg(
                        &pool,
                        None,
                        &format!("set_transaction_id {t} {}", t + 1),
                    )?;
                    self.txn += 1;
                }
                let name = self.name(id);
                let dname = devicemapper::DmName::new(&name)?;
                let opts = devicemapper::DmOptions::default;
                self.dm.device_create(dname, None, opts())?;
                let table = [(
                    0,
                    self.sectors,
                    "thin".to_string(),
                    format!("{} {id}", self.pool_dev),
                )];
                let dev = devicemapper::DevId::Name(dname);
                self.dm.table_load(&dev, &table, opts())?;
                self.dm.device_suspend(&dev, opts())?;
            }
            _ => {
                // A device made by an earlier step, so the mount sees a fresh snapshot of a
                // freshly made filesystem, as devmapper's does; not timed.
                let id = self.dmsetup_snapshot()?;
                let tm = Instant::now();
                self.temp_mount(&self.name(id))?;
                return Ok(ms(tm));
            }
        }
        Ok(ms(tm))
    }

    /// Removes this round's devices (not timed).
    fn clean(&mut self) -> Result<()> {
        let pool = devicemapper::DevId::Name(devicemapper::DmName::new(DM_POOL)?);
        for id in self.made.drain(..) {
            let name = format!("ctrbench-step-{id}");
            self.dm.device_remove(
                &devicemapper::DevId::Name(devicemapper::DmName::new(&name)?),
                devicemapper::DmOptions::default(),
            )?;
            self.dm.target_msg(&pool, None, &format!("delete {id}"))?;
        }
        Ok(())
    }
}

fn report(
    o: &Opts,
    series: &Series,
    cli: &HashMap<(&str, Kind), Vec<f64>>,
    ctr_version: &[f64],
    diag: &[(String, Vec<f64>)],
    started: Instant,
) -> String {
    let mut r = String::new();
    let p = |v: &[f64]| percentiles(v.to_vec());
    let _ = writeln!(
        r,
        "### Prepare latency: containerd's devmapper snapshotter vs thinpoold (dm, TCG guest)\n"
    );
    let _ = writeln!(
        r,
        "All three pools (devmapper, proxied thinpoold, direct thinpoold): data {}, metadata {} \
         (sparse files on direct-I/O loop devices), block {}, \
         device size {}. {} timed Prepares per row ({} per round, interleaved; {} warm-up \
         ops per row first). One snapshots.v1 Prepare RPC per op from a Rust client on the \
         unix socket.\n",
        o.data_size, o.metadata_size, o.block_size, o.base_size, o.n, o.per_round, o.warmup
    );
    let _ = writeln!(
        r,
        "| path | Prepare | n | p50 ms | p99 ms |\n|---|---|---|---|---|"
    );
    for kind in Kind::ALL {
        for path in Path3::ALL {
            let v = &series[&(path, kind)];
            let (p50, p99) = p(v);
            let _ = writeln!(
                r,
                "| {} | {} | {} | {p50:.1} | {p99:.1} |",
                path.label(),
                kind.label(),
                v.len()
            );
        }
    }
    let _ = writeln!(
        r,
        "\n| Prepare | devmapper p50 / proxy p50 | devmapper p50 / direct p50 | target ≥ 10× (via containerd) |\n|---|---|---|---|"
    );
    for kind in Kind::ALL {
        let (dm, _) = p(&series[&(Path3::Devmapper, kind)]);
        let (px, _) = p(&series[&(Path3::Proxy, kind)]);
        let (tp, _) = p(&series[&(Path3::Direct, kind)]);
        let ratio = dm / px;
        let _ = writeln!(
            r,
            "| {} | {ratio:.1}× | {:.1}× | {} |",
            kind.label(),
            dm / tp,
            if ratio >= 10.0 { "met" } else { "MISSED" }
        );
    }
    if !cli.is_empty() {
        let _ = writeln!(
            r,
            "\n`ctr snapshots --snapshotter X prepare` (one ctr fork per call, {} calls per \
             row):\n",
            o.cli
        );
        let _ = writeln!(
            r,
            "| snapshotter | Prepare | p50 ms | max ms |\n|---|---|---|---|"
        );
        for sn in ["devmapper", "thinpool"] {
            for kind in Kind::ALL {
                let v = &cli[&(sn, kind)];
                let (p50, _) = p(v);
                let max = v.iter().cloned().fold(0.0, f64::max);
                let _ = writeln!(r, "| {sn} | {} | {p50:.0} | {max:.0} |", kind.label());
            }
        }
        for kind in Kind::ALL {
            let (d, _) = p(&cli[&("devmapper", kind)]);
            let (t, _) = p(&cli[&("thinpool", kind)]);
            let _ = writeln!(
                r,
                "\nctr {}: devmapper p50 / thinpool p50 = {:.1}×",
                kind.label(),
                d / t
            );
        }
        let (v50, _) = p(ctr_version);
        let _ = writeln!(
            r,
            "\n`ctr version` (the fixed cost of a ctr fork): p50 {v50:.0} ms"
        );
    }
    let _ = writeln!(
        r,
        "\nWhere the time goes: steps of a Prepare timed alone on the devmapper pool, \
         interleaved with the Prepares above ({} each).\n",
        o.n
    );
    let _ = writeln!(r, "| step | p50 ms |\n|---|---|");
    for (label, v) in diag {
        let x = if label.starts_with("mkfs") {
            v.iter().sum::<f64>() / v.len() as f64
        } else {
            p(v).0
        };
        let _ = writeln!(r, "| {label} | {x:.1} |");
    }
    let _ = writeln!(r, "\nWhole run {:.0} s.", started.elapsed().as_secs_f64());
    r
}
