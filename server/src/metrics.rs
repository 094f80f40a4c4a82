//! The Prometheus `/metrics` endpoint: pool figures gathered at scrape time (one status
//! call and one device listing, on a blocking thread), the engine's counters and latency
//! histograms, the gRPC request counts, and (opt-in) each device's mapped bytes. Served
//! over plain HTTP/1 by a small tokio handler: one request per connection.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use thinpool::{AsyncPool, DeviceKind, DeviceRecord, HistogramSnapshot, Operation, PoolStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
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
}

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

fn kind_name(k: DeviceKind) -> &'static str {
    match k {
        DeviceKind::Base => "base",
        DeviceKind::Committed => "committed",
        DeviceKind::Active => "active",
        DeviceKind::View => "view",
    }
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
        }
    }

    /// The metrics text (OpenMetrics text format, which Prometheus scrapes).
    pub async fn render(&self) -> Result<String, String> {
        let engine = self.pool.engine().clone();
        let per_device = self.per_device;
        let snap = tokio::task::spawn_blocking(move || -> Result<Snapshot, String> {
            let status = engine.status().map_err(|e| e.to_string())?;
            let devices = engine.devices().map_err(|e| e.to_string())?;
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
        .map_err(|e| format!("metrics task failed: {e}"))??;
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
        let mut by_kind: BTreeMap<&str, i64> =
            [("base", 0), ("committed", 0), ("active", 0), ("view", 0)].into();
        for d in &devices {
            *by_kind.entry(kind_name(d.kind)).or_default() += 1;
        }
        let fam = Family::<Vec<(String, String)>, Gauge<i64>>::default();
        for (kind, n) in by_kind {
            fam.get_or_create(&vec![("kind".into(), kind.into())])
                .set(n);
        }
        reg.register("thinpool_devices", "Thin devices by kind", fam);
        let c = pool.counters();
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
            if settings.autoextend_metadata.enabled() && st.backend == thinpool::BackendKind::Dm {
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
                        .map(|(r, b)| (r.id.to_string(), kind_name(r.kind), b.0))
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

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exporter: Exporter) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (we ignore any body).
            while n < buf.len() {
                match conn.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(m) => n += m,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let line = head.lines().next().unwrap_or("");
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            let (status, ctype, body) = if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                )
            } else if path != "/metrics" {
                ("404 Not Found", "text/plain", "see /metrics\n".to_string())
            } else {
                match exporter.render().await {
                    Ok(b) => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        b,
                    ),
                    Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
                }
            };
            debug!(%peer, method, path, status, "metrics");
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
