//! thinpoold: keeps a thin pool open and serves it over a unix socket: containerd's
//! snapshots.v1 proxy-snapshotter API and thinpool's admin API (`thinctl` talks to both).
//!
//! Start-up: read and check the settings (flags over `--config` TOML over defaults), bind
//! the metrics address and the socket, create or open the pool (reassembling it after a
//! restart or a reboot, reconciling unfinished operations), serve. SIGTERM/SIGINT: stop
//! accepting, let in-flight requests finish, exit; devices stay active for the containers
//! using them. The admin TakeDown request (`thinctl pool down`) takes the pool down, then the
//! daemon exits the same way. Under systemd (`Type=notify`) it sends READY=1 once serving
//! and STOPPING=1 on stop. `--teardown-on-exit` takes the pool out of the kernel on stop.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use thinpool::{AsyncPool, BackendKind, Bytes, FsType, Percent, PoolSpec};
use thinpool_server::config::{BackendChoice, Config, FileConfig, Flags};
use thinpool_server::{Service, StaticInfo};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(version, about = "Thin-provisioned block devices for containers")]
struct Args {
    /// TOML file with the same keys as these flags (data-size = "100G", ...); flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory holding the pool files and the metadata store [default: /var/lib/thinpool]
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket to serve on [default: /run/thinpool/thinpool.sock]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Storage backend: auto picks dm where dm-thin works, reflink otherwise; sim is a test
    /// backend (plain files, no root, devices are never mountable) [default: auto]
    #[arg(long)]
    backend: Option<String>,
    /// Data file size for a new pool (binary suffixes: 100G).
    #[arg(long)]
    data_size: Option<Bytes>,
    /// Metadata file size for a new pool.
    #[arg(long)]
    metadata_size: Option<Bytes>,
    /// Base device size: the default size of every device.
    #[arg(long)]
    base_size: Option<Bytes>,
    /// Pool data block size (dm): a multiple of 64K.
    #[arg(long)]
    block_size: Option<Bytes>,
    /// Filesystem of the base device: ext4 or xfs.
    #[arg(long)]
    fs: Option<FsType>,
    /// Address for the Prometheus /metrics endpoint; empty disables it [default: 127.0.0.1:9095]
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Group owning the socket (mode 0660) [default: root]
    #[arg(long)]
    socket_group: Option<String>,
    /// Directory CRI reports as the image filesystem; created at start
    /// [default: /var/lib/containerd/io.containerd.snapshotter.v1.thinpool]
    #[arg(long)]
    imagefs_dir: Option<PathBuf>,
    /// Refuse new snapshots below this share of free pool space (0 turns the guard off)
    /// [default: the pool's, 10% for a new pool]
    #[arg(long, value_name = "PCT")]
    min_free_space: Option<Percent>,
    /// Autoextend the data file when usage exceeds this share: 50 to 99, 100 = off
    /// [default: 100]
    #[arg(long, value_name = "PCT")]
    autoextend_threshold: Option<Percent>,
    /// Autoextend step, as a share of the data size (1 to 1000) [default: 20]
    #[arg(long, value_name = "PCT")]
    autoextend_percent: Option<Percent>,
    /// Never autoextend the data file beyond this size [default: no limit]
    #[arg(long, value_name = "SIZE")]
    autoextend_max: Option<Bytes>,
    /// Autoextend the metadata file when its usage exceeds this share: 50 to 99, 100 = off
    /// [default: 100]. dm only: on reflink the metadata (the XFS log) cannot grow.
    #[arg(long, value_name = "PCT")]
    metadata_autoextend_threshold: Option<Percent>,
    /// Metadata autoextend step, as a share of the metadata size (1 to 1000) [default: 20]
    #[arg(long, value_name = "PCT")]
    metadata_autoextend_percent: Option<Percent>,
    /// Never autoextend the metadata file beyond this size [default: the dm maximum, ~16 GiB]
    #[arg(long, value_name = "SIZE")]
    metadata_autoextend_max: Option<Bytes>,
    /// Export each device's mapped bytes on /metrics (thinpool_device_mapped_bytes): one
    /// series per device, so off by default.
    #[arg(long)]
    metrics_per_device: bool,
    /// The size label (containerd.io/snapshot/thinpool.size) may ask for at most the pool's
    /// data size times this [default: 1.0]
    #[arg(long, value_name = "FACTOR")]
    max_device_overcommit: Option<f64>,
    /// Create a new pool even if its files (data + metadata) could come to take more than the
    /// host filesystem has free; refused otherwise.
    #[arg(long)]
    overcommit_host: bool,
    /// On SIGTERM/SIGINT, after serving stops, take the pool out of the kernel: every
    /// device, the pool, its loop devices and (reflink) the data mount, as a reboot would.
    /// For tests and one-off pools; a plain stop keeps devices active for containers.
    #[arg(long)]
    teardown_on_exit: bool,
    /// Take a backup of the pool's metadata (dm: the kernel's, as XML; and the metadata
    /// store) this often while serving, under <root>/backups: 90s, 30m, 6h, 1d; 0 = never
    /// [default: 6h]
    #[arg(long, value_name = "DURATION", value_parser = thinpool_server::config::parse_duration)]
    backup_interval: Option<std::time::Duration>,
    /// Keep this many backups, the newest [default: 5]
    #[arg(long, value_name = "N")]
    backup_keep: Option<usize>,
    /// dm: when thin_check finds the metadata damaged at start, repair it (as `--repair`
    /// does) instead of refusing to serve.
    #[arg(long)]
    auto_repair: bool,
    /// Offline: check and repair the pool's metadata, reconcile the store with it, report,
    /// and exit (what `thinctl pool repair` runs). Refused while a daemon serves the pool.
    #[arg(long, conflicts_with = "restore")]
    repair: bool,
    /// Offline: restore the backup in this directory (<root>/backups/<time>), reconcile,
    /// report, and exit (what `thinctl pool restore` runs).
    #[arg(long, value_name = "BACKUP")]
    restore: Option<PathBuf>,
    /// With --repair or --restore: print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn library_version(kind: BackendKind) -> String {
    match kind {
        BackendKind::Dm => match thinpool::backend::dm::DmBackend::probe() {
            Ok(v) => format!("kernel device-mapper {v} (ioctls via the devicemapper crate)"),
            Err(e) => format!("unknown ({e})"),
        },
        BackendKind::Reflink => String::new(),
        BackendKind::Sim => "simulated (plain files; no kernel objects, no filesystems)".into(),
    }
}

/// Opens (or creates) the pool, naming the likely cause when another daemon holds it.
async fn open_pool(spec: PoolSpec, root: &std::path::Path) -> Result<AsyncPool> {
    match AsyncPool::open(spec).await {
        Ok(p) => Ok(p),
        Err(e) if e.to_string().contains("another process holds the pool") => {
            bail!(
                "{e}: is another thinpoold running on {}? Only one daemon may serve a pool.",
                root.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("opening the pool at {}", root.display())),
    }
}

/// Raises the soft limit on open files to the hard limit: the metrics port, the gRPC
/// socket, loop devices and the store share one fd table, and a shell's usual soft limit
/// (1024) is soon reached on a busy host.
fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `rl`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not read the open-files limit");
        return;
    }
    if rl.rlim_cur >= rl.rlim_max {
        return;
    }
    let from = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    // SAFETY: setrlimit reads one rlimit from `rl`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not raise the open-files limit");
    } else {
        info!(from, to = rl.rlim_max, "raised the open-files limit");
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    // Handlers first: a signal that arrives while the pool opens, or just after the socket
    // appears, is then acted on once serving starts, rather than lost (an inherited
    // SIG_IGN) or fatal before --teardown-on-exit could run.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let flags = Flags {
        root: args.root,
        socket: args.socket,
        backend: args.backend,
        data_size: args.data_size,
        metadata_size: args.metadata_size,
        base_size: args.base_size,
        block_size: args.block_size,
        fs: args.fs,
        metrics_addr: args.metrics_addr,
        socket_group: args.socket_group,
        imagefs_dir: args.imagefs_dir,
        min_free_space: args.min_free_space,
        autoextend_threshold: args.autoextend_threshold,
        autoextend_percent: args.autoextend_percent,
        autoextend_max: args.autoextend_max,
        metadata_autoextend_threshold: args.metadata_autoextend_threshold,
        metadata_autoextend_percent: args.metadata_autoextend_percent,
        metadata_autoextend_max: args.metadata_autoextend_max,
        metrics_per_device: args.metrics_per_device,
        max_device_overcommit: args.max_device_overcommit,
        overcommit_host: args.overcommit_host,
        backup_interval: args.backup_interval,
        backup_keep: args.backup_keep,
        auto_repair: args.auto_repair,
    };
    let config = Config::merge(flags, file)?;
    raise_fd_limit();
    let backend = match config.backend {
        BackendChoice::Auto => {
            let (kind, why) = thinpool::backend::detect();
            info!(backend = %kind, "{why}");
            kind
        }
        BackendChoice::Dm => BackendKind::Dm,
        BackendChoice::Reflink => BackendKind::Reflink,
        BackendChoice::Sim => {
            warn!("backend sim: a test backend; its devices hold no real filesystems");
            BackendKind::Sim
        }
    };
    let spec = PoolSpec {
        root: config.root.clone(),
        backend: Some(backend),
        data_size: config.data_size,
        metadata_size: config.metadata_size,
        block_size: config.block_size,
        base_size: config.base_size,
        fs: config.fs,
        min_free_space: config.min_free_space,
        autoextend_data: config.autoextend_data,
        autoextend_metadata: config.autoextend_metadata,
        overcommit_host: config.overcommit_host,
        auto_repair: config.auto_repair,
        ..PoolSpec::default()
    };
    if args.repair || args.restore.is_some() {
        // Offline: the pool's own backend, whatever this host would pick for a new one.
        let spec = PoolSpec {
            backend: (config.backend != BackendChoice::Auto).then_some(backend),
            ..spec
        };
        return offline(spec, args.restore, args.json).await;
    }
    // Refuse bad settings before anything is created (the root, its lock).
    thinpool::check_spec_settings(&spec).context("checking the settings")?;
    // Bind both listeners before creating or assembling the pool: a start that fails on a
    // busy socket or port then leaves nothing behind (no new pool, loop device or mount).
    let metrics_listener = if config.metrics_addr.is_empty() {
        info!("metrics endpoint disabled (empty --metrics-addr)");
        None
    } else {
        let l = tokio::net::TcpListener::bind(&config.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {}", config.metrics_addr))?;
        Some(l)
    };
    let listener = thinpool_server::bind_socket(&config.socket, config.socket_group.as_deref())
        .context("setting up the socket")?;
    let pool = match open_pool(spec, &config.root).await {
        Ok(p) => p,
        Err(e) => {
            // Ours: bind_socket just made it (a live one is refused, not replaced).
            let _ = std::fs::remove_file(&config.socket);
            return Err(e);
        }
    };
    let status = pool.run(|p| p.status()).await?;
    info!(
        backend = %status.backend,
        data_used = %status.kernel.data_used,
        data_total = %status.kernel.data_total,
        devices = status.devices,
        mode = %status.kernel.mode,
        "pool ready"
    );
    let settings = pool.engine().settings();
    if settings.autoextend_metadata.enabled() && status.backend == BackendKind::Reflink {
        warn!(threshold = %settings.autoextend_metadata.threshold,
            "metadata autoextend (--metadata-autoextend-*, or set on this pool before) has no \
             effect on the reflink backend: its metadata is the XFS log, which cannot grow; \
             only the data file autoextends");
    }
    if let Err(e) = std::fs::create_dir_all(&config.imagefs_dir) {
        warn!(dir = %config.imagefs_dir.display(), error = %e,
            "could not create the image-fs directory CRI reports to kubelet");
    }
    let grpc_metrics = std::sync::Arc::new(thinpool_server::grpc_metrics::GrpcMetrics::default());
    let mut metrics_url = None;
    let metrics_task = metrics_listener.map(|l| {
        // The bound address, which differs from the flag's with port 0.
        let addr = l
            .local_addr()
            .map_or_else(|_| config.metrics_addr.clone(), |a| a.to_string());
        metrics_url = Some(format!("http://{addr}/metrics"));
        info!(addr = %addr, per_device = config.metrics_per_device,
            "serving /metrics and /healthz");
        let exporter = thinpool_server::metrics::Exporter::new(
            pool.clone(),
            grpc_metrics.clone(),
            config.metrics_per_device,
        );
        tokio::spawn(thinpool_server::metrics::serve(l, exporter))
    });
    info!(socket = %config.socket.display(), "serving snapshots.v1 and thinpool.v1");
    let backup_task = (!config.backup_interval.is_zero()).then(|| {
        info!(every = ?config.backup_interval, keep = config.backup_keep, "periodic backups");
        tokio::spawn(periodic_backups(
            pool.clone(),
            config.backup_interval,
            config.backup_keep,
        ))
    });

    let handle = pool.clone();
    let service = Service::new(
        pool,
        StaticInfo {
            library_version: library_version(backend),
            max_device_overcommit: Some(config.max_device_overcommit),
            backup_keep: Some(config.backup_keep),
        },
    );
    let taken_down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = {
        let (service, taken_down) = (service.clone(), taken_down.clone());
        async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: stopping; letting requests in flight finish"),
                _ = int.recv() => info!("SIGINT: stopping; letting requests in flight finish"),
                _ = service.taken_down() => {
                    taken_down.store(true, std::sync::atomic::Ordering::Relaxed);
                    info!("the pool was taken down (TakeDown): stopping");
                }
            }
            sd_notify("STOPPING=1");
        }
    };
    // Both listeners are bound and the pool is open: connections from now on are served.
    sd_notify("READY=1");
    ready_hint(&config.socket, metrics_url.as_deref());
    thinpool_server::serve_counted(service, listener, shutdown, grpc_metrics).await?;
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(t) = backup_task {
        t.abort();
    }
    if let Err(e) = std::fs::remove_file(&config.socket) {
        warn!(socket = %config.socket.display(), error = %e, "could not remove the socket");
    }
    // Without --teardown-on-exit (or TakeDown) devices stay active: containers may still be
    // using them.
    if args.teardown_on_exit && !taken_down.load(std::sync::atomic::Ordering::Relaxed) {
        thinpool_server::take_down(&handle)
            .await
            .context("--teardown-on-exit: tearing the pool down")?;
    }
    if taken_down.load(std::sync::atomic::Ordering::Relaxed) {
        info!("stopped after TakeDown; the next start brings the pool back");
    } else {
        // Devices stay active: containers may still be using them.
        info!("stopped");
    }
    Ok(())
}

/// Takes a backup every `every` (the first one `every` after start: a start is no reason to
/// take one), keeping `keep`. A failed backup is logged and tried again at the next tick.
async fn periodic_backups(pool: AsyncPool, every: std::time::Duration, keep: usize) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.run(move |p| p.backup(keep)).await {
            Ok(b) => {
                info!(path = %b.path.display(), removed = b.removed.len(), "periodic backup taken")
            }
            Err(e) => {
                warn!(error = %e, "periodic backup failed; trying again at the next interval")
            }
        }
    }
}

/// `--repair` / `--restore`: runs the offline command, prints its report, and returns an
/// error (a non-zero exit) if it failed.
async fn offline(spec: PoolSpec, restore: Option<PathBuf>, json: bool) -> Result<()> {
    let root = spec.root.clone();
    let what = if restore.is_some() {
        "restore"
    } else {
        "repair"
    };
    info!(root = %root.display(), "{what} (offline)");
    let res = tokio::task::spawn_blocking(move || match &restore {
        Some(b) => thinpool::engine::restore(&spec, b),
        None => thinpool::engine::repair(&spec),
    })
    .await
    .context("the offline task panicked")?;
    match res {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{}", r.summary);
                for l in &r.lost {
                    println!(
                        "lost: thin {} {}",
                        l.id,
                        l.name.as_ref().map_or("", |n| n.as_str())
                    );
                }
                for id in &r.leaked {
                    println!("leaked: thin {id}");
                }
                for k in &r.kept {
                    println!("kept: {}", k.display());
                }
            }
            Ok(())
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "error": e.to_string(), "root": root })
                );
            }
            Err(anyhow::Error::new(e).context(format!("{what} of the pool at {}", root.display())))
        }
    }
}

/// Tells systemd (`Type=notify`) about a state change; a no-op outside systemd.
fn sd_notify(state: &str) {
    if let Err(e) = thinpool_server::sdnotify::notify(state) {
        warn!(state, error = %e, "could not notify systemd");
    }
}

/// One line for a person at a terminal (scripts/run): where we serve, and what to try.
fn ready_hint(socket: &std::path::Path, metrics_url: Option<&str>) {
    let thinctl = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("thinctl")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("thinctl"));
    info!(
        socket = %socket.display(),
        metrics = metrics_url.unwrap_or("disabled"),
        "ready; try: {} --socket {} pool status",
        thinctl.display(),
        socket.display()
    );
}
