//! thinpoold as a library: the gRPC services (containerd's `snapshots.v1` proxy-snapshotter
//! API and the `thinpool.v1` admin API), the unix socket they are served on, the daemon's
//! configuration, and its Prometheus `/metrics` ([`metrics`], with the request counts of
//! [`grpc_metrics`]). `main.rs` wires them up; tests and benchmarks run the same code
//! in-process.

pub mod config;
pub mod filter;
pub mod grpc_metrics;
pub mod metrics;
pub mod sdnotify;
pub mod service;

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thinpool_proto::admin::admin_server::AdminServer;
use thinpool_proto::snapshots::snapshots_server::SnapshotsServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

pub use service::{DEFAULT_MAX_DEVICE_OVERCOMMIT, MAX_SIZE_LABEL, SIZE_LABEL, Service, StaticInfo};

/// How often the space monitor checks the pool besides the kernel's events.
pub const MONITOR_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// containerd's proxy client allows 16 MiB messages; so do we.
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// How long a stopping daemon waits for clients to finish and close their connections
/// before it closes them (systemd's stop timeout is 90 s).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another server is listening on {0}; refusing to replace its socket")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket group {0:?} does not exist")]
    NoSuchGroup(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Binds the unix socket at `path`: mode 0660, owned by root and by `group` (root's group if
/// `None`). A stale socket file (nobody listening) is replaced; a live one is refused. Must be
/// called inside a tokio runtime.
pub fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener, SocketError> {
    let gid = match group {
        None => None,
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .map_err(|e| io_err("look up group for", path)(e.into()))?
                .ok_or_else(|| SocketError::NoSuchGroup(g.to_string()))?
                .gid,
        ),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err("create socket directory", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            info!(socket = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path).map_err(io_err("remove stale socket", path))?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", path)(e)),
    }
    // Bind inside a fresh 0700 directory next to `path`, set the owner and mode there, then
    // rename into place: the socket is never reachable with a wider mode, and the
    // process-wide umask (which other threads' file creation uses) is never touched.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = dir
        .unwrap_or(Path::new("."))
        .join(format!(".tp{}.{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging); // left by a crashed start with our pid and n
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_err("create staging directory", &staging))?;
    let tmp = staging.join("s");
    let placed = (|| {
        let listener =
            std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err("bind", &tmp))?;
        if let Some(gid) = gid {
            nix::unistd::chown(&tmp, None, Some(gid))
                .map_err(|e| io_err("chown", &tmp)(e.into()))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
            .map_err(io_err("chmod", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("move socket into place at", path))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&staging);
    let listener = placed?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("set non-blocking", path))?;
    UnixListener::from_std(listener).map_err(io_err("register", path))
}

/// Takes the whole pool out of the kernel after serving stopped (`--teardown-on-exit`):
/// every device, the pool, its loop devices and (reflink) the data mount. The pool's files
/// and records stay; the next start reassembles the pool. Fails with `FailedPrecondition`
/// while a device is still mounted or open; the rest is still taken down where it can be.
pub async fn take_down(pool: &thinpool::AsyncPool) -> Result<(), thinpool::Error> {
    info!("tearing the pool down");
    pool.run(|p| p.teardown()).await?;
    info!("pool torn down");
    Ok(())
}

/// Serves both APIs on `listener` until `shutdown` resolves (without counting requests:
/// thinpoold uses [`serve_counted`]), then stops accepting, lets
/// in-flight requests finish and returns. The background reclaimer and the engine's space
/// monitor run meanwhile and are stopped (after finishing work in progress) before this
/// returns.
pub async fn serve(
    service: Service,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    run(service, listener, shutdown, None).await
}

/// [`serve`], counting every request by method and status code in `grpc` (which `/metrics`
/// reads; see [`grpc_metrics`]).
pub async fn serve_counted(
    service: Service,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
    grpc: std::sync::Arc<grpc_metrics::GrpcMetrics>,
) -> Result<(), tonic::transport::Error> {
    run(service, listener, shutdown, Some(grpc)).await
}

async fn run(
    service: Service,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
    grpc: Option<std::sync::Arc<grpc_metrics::GrpcMetrics>>,
) -> Result<(), tonic::transport::Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let reclaimer = {
        let s = service.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move { s.run_reclaimer(stop).await })
    };
    // The engine's space monitor: autoextend by the pool's policy (off by default), and
    // mode changes logged.
    let monitor = {
        let mut stop = stop_rx;
        tokio::spawn(thinpool::run_autoextend(
            service.pool().clone(),
            MONITOR_PERIOD,
            async move {
                let _ = stop.changed().await;
            },
        ))
    };
    let snapshots = SnapshotsServer::new(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let admin = AdminServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let mut builder = tonic::transport::Server::builder()
        .trace_fn(|req| tracing::debug_span!("rpc", path = %req.uri().path()));
    let incoming = UnixListenerStream::new(listener);
    // A graceful stop waits for every connection to close, which a client that holds one
    // and never reads (stopped, hung) would make last for ever: after SHUTDOWN_GRACE the
    // connections are dropped. Engine work in flight runs on blocking threads, which the
    // runtime lets finish.
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = fired_tx.send(());
    };
    let grace = async move {
        if fired_rx.await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "clients kept connections open past the shutdown grace period; closing them"
        );
    };
    // Two arms because the layer changes the server's type; the uncounted one lets the
    // metrics benchmark measure what counting costs.
    let serve = async move {
        match grpc {
            Some(grpc) => {
                builder
                    .layer(grpc_metrics::GrpcMetricsLayer::new(grpc))
                    .add_service(snapshots)
                    .add_service(admin)
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            None => {
                builder
                    .add_service(snapshots)
                    .add_service(admin)
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        }
    };
    let result = tokio::select! {
        r = serve => r,
        () = grace => Ok(()),
    };
    let _ = stop_tx.send(true);
    let _ = reclaimer.await;
    let _ = monitor.await;
    result
}
