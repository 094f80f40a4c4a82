//! The Prometheus `/metrics` endpoint: pool figures gathered at scrape time (one status
//! call and one device listing, on a blocking thread), the engine's counters and latency
//! histograms, the gRPC request counts, and (opt-in) each device's mapped bytes; and
//! `/healthz` for liveness probes. Served over HTTP/1 by hyper, bounded so that any local
//! user (the port is reachable by all of them) cannot use it to stall the daemon: see
//! [`Limits`].

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};
use thinpool::{AsyncPool, DeviceKind, DeviceRecord, HistogramSnapshot, Operation, PoolStatus};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use thinpool::PoolMode;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::grpc_metrics::{GrpcMetrics, RequestCount};

/// What `/metrics` reports on, and how much.
#[derive(Clone)]
pub struct Exporter {
    pool: AsyncPool,
    grpc: Arc<GrpcMetrics>,
    /// Export `thinpool_device_mapped_bytes` per device: one series per device, so off by
    /// default (a busy host has thousands of snapshots).
    per_device: bool,
    /// The last render and when it started: one render runs at a time, and a scrape that
    /// waited for it takes its result (see [`Exporter::render_shared`]).
    last: Arc<tokio::sync::Mutex<Option<(Instant, Rendered)>>>,
}

/// One render's outcome, shared by the scrapes that waited for it.
pub type Rendered = Arc<Result<String, String>>;

fn gauge(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let g = Gauge::<i64>::default();
    g.set(v.min(i64::MAX as u64) as i64);
    reg.register(name, help, g);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// The engine's latency histograms, encoded straight from their bucket counts (the engine
/// keeps them as atomics; see `thinpool::timing`).
#[derive(Debug)]
struct OpHistograms(Vec<(Operation, HistogramSnapshot)>);

impl EncodeMetric for OpHistograms {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (op, h) in &self.0 {
            let labels = [("operation", op.as_str())];
            encoder
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// gRPC request counts, one series per (service, method, code) seen.
#[derive(Debug)]
struct GrpcCounts(Vec<RequestCount>);

impl EncodeMetric for GrpcCounts {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for r in &self.0 {
            let labels = [
                ("service", r.service),
                ("method", r.method),
                ("code", r.code),
            ];
            encoder
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, u64, u64>(&r.count, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Mapped bytes per device, labelled by thin id and kind only: both are ours (bounded,
/// nothing to escape); snapshot keys are client data up to 4 KiB and change on commit, so
/// they stay out of the labels (`thinctl device ls` maps ids to keys).
#[derive(Debug)]
struct DeviceBytes(Vec<(String, &'static str, u64)>);

impl EncodeMetric for DeviceBytes {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (id, kind, bytes) in &self.0 {
            let labels = [("thin_id", id.as_str()), ("kind", *kind)];
            encoder.encode_family(&labels)?.encode_gauge(bytes)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// What one scrape reads from the engine, in one blocking call.
struct Snapshot {
    status: PoolStatus,
    devices: Vec<DeviceRecord>,
    mapped: Option<Vec<(DeviceRecord, thinpool::Bytes)>>,
    host_free: Option<u64>,
}

impl Exporter {
    pub fn new(pool: AsyncPool, grpc: Arc<GrpcMetrics>, per_device: bool) -> Exporter {
        Exporter {
            pool,
            grpc,
            per_device,
            last: Arc::default(),
        }
    }

    /// [`Exporter::render`], at most one at a time: concurrent scrapes share the render
    /// that started after they asked (so each gets figures at least as new as its request),
    /// and hold no blocking thread while they wait.
    pub async fn render_shared(&self) -> Rendered {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, out)) = last.as_ref()
            && *started >= asked
        {
            return out.clone();
        }
        let started = Instant::now();
        let out = Arc::new(self.render().await);
        *last = Some((started, out.clone()));
        out
    }

    /// The pool's health for liveness probes: `Ok(mode)` while it serves writes (read-write,
    /// or out of data space, which a grow fixes), `Err(why)` when the pool is failed,
    /// read-only, needs a check, or its status cannot be read.
    pub async fn health(&self) -> Result<String, String> {
        let st = self
            .pool
            .run(|p| p.status())
            .await
            .map_err(|e| format!("pool status: {e}"))?;
        let k = &st.kernel;
        if k.needs_check {
            return Err(format!(
                "pool mode {}; its metadata needs a check (restart thinpoold to run it)",
                k.mode
            ));
        }
        match k.mode {
            PoolMode::Rw | PoolMode::OutOfDataSpace => Ok(k.mode.to_string()),
            PoolMode::Ro | PoolMode::Fail => Err(format!("pool mode {}", k.mode)),
        }
    }

    /// The metrics text (OpenMetrics text format, which Prometheus scrapes).
    pub async fn render(&self) -> Result<String, String> {
        let per_device = self.per_device;
        let snap = self
            .pool
            .run(move |engine| {
                let status = engine.status()?;
                let devices = engine.devices()?;
                // Per-device figures are best effort: without them the scrape still reports
                // the pool (a failure is logged, and the series are absent this time).
                let mapped = if per_device {
                    engine
                        .mapped_bytes_all()
                        .map_err(|e| warn!(error = %e, "metrics: per-device mapped bytes"))
                        .ok()
                } else {
                    None
                };
                let host_free = nix::sys::statvfs::statvfs(&engine.paths().root)
                    .ok()
                    .map(|fs| fs.blocks_available() * fs.fragment_size());
                Ok(Snapshot {
                    status,
                    devices,
                    mapped,
                    host_free,
                })
            })
            .await
            .map_err(|e| e.to_string())?;
        self.encode(snap)
    }

    fn encode(&self, snap: Snapshot) -> Result<String, String> {
        let Snapshot {
            status: st,
            devices,
            mapped,
            host_free,
        } = snap;
        let settings = self.pool.engine().settings();
        let pool = &self.pool;
        let k = &st.kernel;
        let mut reg = Registry::default();
        gauge(
            &mut reg,
            "thinpool_data_used_bytes",
            "Data space used in the pool",
            k.data_used.0,
        );
        gauge(
            &mut reg,
            "thinpool_data_size_bytes",
            "Data space of the pool",
            k.data_total.0,
        );
        gauge(
            &mut reg,
            "thinpool_metadata_used_bytes",
            "Metadata space used in the pool",
            k.metadata_used.0,
        );
        gauge(
            &mut reg,
            "thinpool_metadata_size_bytes",
            "Metadata space of the pool",
            k.metadata_total.0,
        );
        if let Some(free) = host_free {
            gauge(
                &mut reg,
                "thinpool_host_free_bytes",
                "Free space of the host filesystem holding the pool files",
                free,
            );
        }
        gauge(
            &mut reg,
            "thinpool_low_water_mark_bytes",
            "The pool's low water mark",
            k.low_water_mark.0,
        );
        gauge(
            &mut reg,
            "thinpool_min_free_space_bytes",
            "Free data space below which new snapshots are refused",
            k.data_total.0 * settings.min_free_space.0 as u64 / 100,
        );
        let autoextend_max = settings.autoextend_data.max.map_or(0, |b| b.0);
        gauge(
            &mut reg,
            "thinpool_autoextend_max_bytes",
            "Data size autoextend stops at (0: no limit or autoextend off)",
            if settings.autoextend_data.enabled() {
                autoextend_max
            } else {
                0
            },
        );
        let mode = Family::<Vec<(String, String)>, Gauge<i64>>::default();
        for m in ["rw", "ro", "out_of_data_space", "fail"] {
            let v = i64::from(k.mode.to_string() == m);
            mode.get_or_create(&vec![("mode".into(), m.into())]).set(v);
        }
        reg.register(
            "thinpool_pool_mode",
            "The pool's mode (1 for the current one)",
            mode,
        );
        gauge(
            &mut reg,
            "thinpool_needs_check",
            "1 if the pool's metadata needs a check",
            u64::from(k.needs_check),
        );
        gauge(
            &mut reg,
            "thinpool_quarantined_devices",
            "Devices open could not reconcile or activate, skipped until a retry succeeds",
            st.quarantined.len() as u64,
        );
        gauge(
            &mut reg,
            "thinpool_transaction_id",
            "The pool's metadata transaction id",
            k.transaction_id,
        );
        let mut by_kind: BTreeMap<&str, i64> = DeviceKind::ALL.map(|k| (k.as_str(), 0)).into();
        for d in &devices {
            *by_kind.entry(d.kind.as_str()).or_default() += 1;
        }
        let fam = Family::<Vec<(String, String)>, Gauge<i64>>::default();
        for (kind, n) in by_kind {
            fam.get_or_create(&vec![("kind".into(), kind.into())])
                .set(n);
        }
        reg.register("thinpool_devices", "Thin devices by kind", fam);
        let c = pool.engine().counters();
        counter(
            &mut reg,
            "thinpool_grows",
            "Pool grows completed, manual and automatic",
            c.grows,
        );
        counter(
            &mut reg,
            "thinpool_autoextend_events",
            "Autoextensions done",
            c.autoextends,
        );
        counter(
            &mut reg,
            "thinpool_autoextend_failures",
            "Autoextensions due that did not happen (at max, no host room, or failed)",
            c.autoextend_failures,
        );
        counter(
            &mut reg,
            "thinpool_guard_rejections",
            "Snapshots refused by the min_free_space guard",
            c.guard_rejections,
        );
        counter(
            &mut reg,
            "thinpool_mode_changes",
            "Pool mode changes seen",
            c.mode_changes,
        );
        let meta_max = settings.autoextend_metadata.max.map_or(0, |b| b.0);
        gauge(
            &mut reg,
            "thinpool_metadata_autoextend_max_bytes",
            "Metadata size autoextend stops at (0: no limit, autoextend off, or metadata that \
         cannot grow: reflink)",
            if settings.autoextend_metadata.enabled()
                && st.backend != thinpool::BackendKind::Reflink
            {
                meta_max
            } else {
                0
            },
        );
        reg.register(
            "thinpool_operation_duration_seconds",
            "Time the engine took for snapshot, activate, commit, remove and grow, whoever called",
            OpHistograms(pool.engine().timings()),
        );
        reg.register(
            "thinpool_grpc_requests",
            "gRPC requests handled, by service, method and status code",
            GrpcCounts(self.grpc.read()),
        );
        if let Some(mapped) = mapped {
            reg.register(
                "thinpool_device_mapped_bytes",
                "Bytes each ready device maps in the pool (reflink: not shared with other \
             devices). Only with --metrics-per-device",
                DeviceBytes(
                    mapped
                        .into_iter()
                        .map(|(r, b)| (r.id.to_string(), r.kind.as_str(), b.0))
                        .collect(),
                ),
            );
        }
        let info = Family::<Vec<(String, String)>, Gauge<i64>>::default();
        info.get_or_create(&vec![
            ("version".into(), env!("CARGO_PKG_VERSION").into()),
            ("backend".into(), st.backend.to_string()),
        ])
        .set(1);
        reg.register(
            "thinpool_build_info",
            "thinpoold's version and backend",
            info,
        );
        let mut out = String::new();
        encode(&mut out, &reg).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// Bounds on the HTTP server: any local user can reach it.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections held at once. When full, a new connection takes the place of the oldest
    /// one that has not sent its request yet; if every one is busy answering, it is closed
    /// at once. So idle connections never exhaust the daemon's fds, and cannot lock out a
    /// scrape either.
    pub max_connections: usize,
    /// Time to send the request head (there is no keep-alive: one request per connection,
    /// so this is also the idle timeout).
    pub header_timeout: Duration,
    /// Time for a whole connection, a slow reader of the response included.
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// The open connections, and which of them still wait for their request (oldest first).
#[derive(Default)]
struct Conns {
    open: usize,
    next_id: u64,
    waiting: VecDeque<(u64, Arc<Notify>)>,
}

type Shared = Arc<std::sync::Mutex<Conns>>;

fn lock(c: &Shared) -> std::sync::MutexGuard<'_, Conns> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// One open connection's place; frees it when the connection ends, however it ends.
struct Slot {
    conns: Shared,
    id: u64,
}

impl Slot {
    /// The request arrived: the connection may no longer be evicted for a newcomer.
    fn busy(&self) {
        lock(&self.conns).waiting.retain(|(id, _)| *id != self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.conns);
        c.open -= 1;
        c.waiting.retain(|(id, _)| *id != self.id);
    }
}

/// Takes a place for a new connection, evicting the oldest waiting one when full; `None`
/// when every place is busy answering.
fn admit(conns: &Shared, max: usize) -> Option<(Slot, Arc<Notify>)> {
    let mut c = lock(conns);
    if c.open >= max {
        let (_, oldest) = c.waiting.pop_front()?;
        // A stored permit: the connection's task sees it even if it is not waiting yet.
        oldest.notify_one();
    }
    c.open += 1;
    c.next_id += 1;
    let id = c.next_id;
    let evict = Arc::new(Notify::new());
    c.waiting.push_back((id, evict.clone()));
    Some((
        Slot {
            conns: conns.clone(),
            id,
        },
        evict,
    ))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(exporter: &Exporter, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => match &*exporter.render_shared().await {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body.clone());
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/healthz" => match exporter.health().await {
            Ok(mode) => text(StatusCode::OK, format!("ok: pool mode {mode}\n")),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "see /metrics or /healthz\n".into()),
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` with the default [`Limits`] until
/// the task is dropped.
pub async fn serve(listener: TcpListener, exporter: Exporter) {
    serve_with(listener, exporter, Limits::default()).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(listener: TcpListener, exporter: Exporter, limits: Limits) {
    let conns = Shared::default();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false)
        .max_buf_size(64 << 10);
    let builder = Arc::new(builder);
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds (the engine's problem too): say so, at most once a minute.
                if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    warn!(error = %e, "metrics: accept failed");
                    last_accept_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((slot, evict)) = admit(&conns, limits.max_connections) else {
            debug!(%peer, "metrics: every connection is busy; closing a new one");
            drop(stream);
            continue;
        };
        let exporter = exporter.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            let service = {
                let slot = slot.clone();
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    slot.busy();
                    let exporter = exporter.clone();
                    async move {
                        let resp = handle(&exporter, &req).await;
                        debug!(%peer, method = %req.method(), path = req.uri().path(),
                            status = resp.status().as_u16(), "metrics");
                        Ok::<_, Infallible>(resp)
                    }
                })
            };
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = evict.notified() => debug!(%peer, "metrics: idle connection evicted"),
                r = tokio::time::timeout(limits.connection_timeout, conn) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(%peer, error = %e, "metrics: connection"),
                    Err(_) => debug!(%peer, "metrics: connection timed out"),
                },
            }
            drop(slot);
        });
    }
}
