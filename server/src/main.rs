//! thinpoold: keeps a thin pool open and serves it over a unix socket: containerd's
//! snapshots.v1 proxy-snapshotter API and thinpool's admin API (`thinctl` talks to both).
//!
//! Start-up: read the settings (flags over `--config` TOML over defaults), create or open
//! the pool (reassembling it after a restart or a reboot, reconciling unfinished
//! operations), bind the socket, serve. SIGTERM/SIGINT: stop accepting, let in-flight
//! requests finish, exit; devices stay active for the containers using them, unless
//! `--teardown-on-exit` asks to take the pool out of the kernel.

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
    /// Storage backend: auto picks dm where dm-thin works, reflink otherwise [default: auto]
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
    /// On SIGTERM/SIGINT, after serving stops, take the pool out of the kernel: every
    /// device, the pool, its loop devices and (reflink) the data mount, as a reboot would.
    /// For tests and one-off pools; a plain stop keeps devices active for containers.
    #[arg(long)]
    teardown_on_exit: bool,
}

fn library_version(kind: BackendKind) -> String {
    match kind {
        BackendKind::Dm => match thinpool::backend::dm::DmBackend::probe() {
            Ok(v) => format!("kernel device-mapper {v} (ioctls via the devicemapper crate)"),
            Err(e) => format!("unknown ({e})"),
        },
        BackendKind::Reflink => String::new(),
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
    };
    let config = Config::merge(flags, file)?;
    let backend = match config.backend {
        BackendChoice::Auto => {
            let (kind, why) = thinpool::backend::detect();
            info!(backend = %kind, "{why}");
            kind
        }
        BackendChoice::Dm => BackendKind::Dm,
        BackendChoice::Reflink => BackendKind::Reflink,
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
        ..PoolSpec::default()
    };
    let pool = match AsyncPool::open(spec).await {
        Ok(p) => p,
        Err(e) if e.to_string().contains("another process holds the pool") => {
            bail!(
                "{e}: is another thinpoold running on {}? Only one daemon may serve a pool.",
                config.root.display()
            )
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the pool at {}", config.root.display()));
        }
    };
    let status = pool.status().await?;
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
    let metrics_task = if config.metrics_addr.is_empty() {
        info!("metrics endpoint disabled (empty --metrics-addr)");
        None
    } else {
        let l = tokio::net::TcpListener::bind(&config.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {}", config.metrics_addr))?;
        info!(addr = %config.metrics_addr, per_device = config.metrics_per_device,
            "serving /metrics");
        let exporter = thinpool_server::metrics::Exporter::new(
            pool.clone(),
            grpc_metrics.clone(),
            config.metrics_per_device,
        );
        Some(tokio::spawn(thinpool_server::metrics::serve(l, exporter)))
    };
    let listener = thinpool_server::bind_socket(&config.socket, config.socket_group.as_deref())
        .context("setting up the socket")?;
    info!(socket = %config.socket.display(), "serving snapshots.v1 and thinpool.v1");

    let handle = pool.clone();
    let service = Service::new(
        pool,
        StaticInfo {
            library_version: library_version(backend),
        },
    );
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping; letting requests in flight finish"),
            _ = int.recv() => info!("SIGINT: stopping; letting requests in flight finish"),
        }
    };
    thinpool_server::serve_counted(service, listener, shutdown, grpc_metrics).await?;
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Err(e) = std::fs::remove_file(&config.socket) {
        warn!(socket = %config.socket.display(), error = %e, "could not remove the socket");
    }
    // Without --teardown-on-exit devices stay active: containers may still be using them.
    if args.teardown_on_exit {
        thinpool_server::take_down(&handle)
            .await
            .context("--teardown-on-exit: tearing the pool down")?;
    }
    info!("stopped");
    Ok(())
}
