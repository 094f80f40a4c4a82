//! thinpoold: keeps a thin pool open and serves it.
//!
//! This first version creates or opens the pool (reassembling it after a restart or a
//! reboot, reconciling unfinished operations) and holds it until SIGTERM or SIGINT. The gRPC
//! APIs (containerd's snapshots.v1 and our admin API) and metrics come next (issues 4, 5).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use thinpool::{AsyncPool, BackendKind, Bytes, FsType, PoolSpec};
use tracing::info;

#[derive(Parser, Debug)]
#[command(version, about = "Thin-provisioned block devices for containers")]
struct Args {
    /// Directory holding the pool files and the metadata store.
    #[arg(long, default_value = "/var/lib/thinpool")]
    root: PathBuf,
    /// Storage backend: auto picks dm where dm-thin works, reflink otherwise.
    #[arg(long, default_value = "auto")]
    backend: String,
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
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let backend = match args.backend.as_str() {
        "auto" => {
            let (kind, why) = thinpool::backend::detect();
            info!(backend = %kind, "{why}");
            Some(kind)
        }
        other => Some(other.parse::<BackendKind>()?),
    };
    let spec = PoolSpec {
        root: args.root.clone(),
        backend,
        data_size: args.data_size,
        metadata_size: args.metadata_size,
        block_size: args.block_size,
        base_size: args.base_size,
        fs: args.fs,
        ..PoolSpec::default()
    };
    let pool = AsyncPool::open(spec)
        .await
        .with_context(|| format!("opening the pool at {}", args.root.display()))?;
    let status = pool.status().await?;
    info!(
        backend = %status.backend,
        data_used = %status.kernel.data_used,
        data_total = %status.kernel.data_total,
        devices = status.devices,
        mode = %status.kernel.mode,
        "pool ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
    }
    // Devices stay active: containers may still be using them.
    Ok(())
}
