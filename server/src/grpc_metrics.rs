//! gRPC requests by method and status code, for `thinpool_grpc_requests_total`: a tower
//! layer in front of both services (snapshots.v1 and thinpool.v1).
//!
//! Why a layer and not code in each handler: it sees every request, including those tonic
//! answers itself (unknown methods, bad messages), and it keeps the handlers untouched.
//! Why a fixed table of atomics: the hot path is one lookup of the path among the ~16
//! methods both services have, then one relaxed `fetch_add` when the status is known; no
//! lock, no allocation. Unknown paths share one `other` row, so a client cannot grow the
//! label set.
//!
//! Where the code comes from: a failed call is answered "trailers-only", with `grpc-status`
//! in the response headers; a successful one (and a stream that fails midway) carries it in
//! the trailers, after the body, so the body is wrapped to read them. A response body
//! dropped before its trailers (the client went away) counts as `Canceled`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http_body::{Body, Frame};

/// Every method of both services, as `/package.Service/Method` paths.
pub const METHODS: [&str; 18] = [
    "/containerd.services.snapshots.v1.Snapshots/Prepare",
    "/containerd.services.snapshots.v1.Snapshots/View",
    "/containerd.services.snapshots.v1.Snapshots/Mounts",
    "/containerd.services.snapshots.v1.Snapshots/Commit",
    "/containerd.services.snapshots.v1.Snapshots/Remove",
    "/containerd.services.snapshots.v1.Snapshots/Stat",
    "/containerd.services.snapshots.v1.Snapshots/Update",
    "/containerd.services.snapshots.v1.Snapshots/List",
    "/containerd.services.snapshots.v1.Snapshots/Usage",
    "/containerd.services.snapshots.v1.Snapshots/Cleanup",
    "/thinpool.v1.Admin/PoolStatus",
    "/thinpool.v1.Admin/ListDevices",
    "/thinpool.v1.Admin/Activate",
    "/thinpool.v1.Admin/Deactivate",
    "/thinpool.v1.Admin/Audit",
    "/thinpool.v1.Admin/GrowPool",
    "/thinpool.v1.Admin/TakeDown",
    "/thinpool.v1.Admin/Backup",
];

/// gRPC status code names, by number (as grpc-go and grpc-prometheus spell them).
pub const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

const ROWS: usize = METHODS.len() + 1; // + "other"
const UNKNOWN: usize = 2;
const CANCELED: usize = 1;

/// The request counts, shared by the layer (which counts) and `/metrics` (which reads).
pub struct GrpcMetrics {
    counts: Box<[AtomicU64]>,
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        GrpcMetrics {
            counts: (0..ROWS * CODES.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// One row of [`GrpcMetrics::read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestCount {
    /// `package.Service` (`other` for a path that is no method of ours).
    pub service: &'static str,
    pub method: &'static str,
    pub code: &'static str,
    pub count: u64,
}

fn split(path: &'static str) -> (&'static str, &'static str) {
    let p = path.trim_start_matches('/');
    p.split_once('/').unwrap_or((p, ""))
}

impl GrpcMetrics {
    fn row(path: &str) -> usize {
        METHODS
            .iter()
            .position(|m| *m == path)
            .unwrap_or(METHODS.len())
    }

    fn record(&self, row: usize, code: usize) {
        let code = if code < CODES.len() { code } else { UNKNOWN };
        self.counts[row * CODES.len() + code].fetch_add(1, Ordering::Relaxed);
    }

    /// The non-zero counts, in method then code order.
    pub fn read(&self) -> Vec<RequestCount> {
        let mut out = Vec::new();
        let names = METHODS.iter().map(|m| split(m)).chain([("other", "other")]);
        for (row, (service, method)) in names.enumerate() {
            for (code, name) in CODES.iter().enumerate() {
                let count = self.counts[row * CODES.len() + code].load(Ordering::Relaxed);
                if count > 0 {
                    out.push(RequestCount {
                        service,
                        method,
                        code: name,
                        count,
                    });
                }
            }
        }
        out
    }
}

/// The tower layer; see the module docs.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<GrpcMetrics>) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

fn header_code(headers: &http::HeaderMap) -> Option<usize> {
    let v = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(UNKNOWN),
    )
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let row = GrpcMetrics::row(req.uri().path());
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let pending = if !resp.status().is_success() {
                metrics.record(row, UNKNOWN);
                None
            } else if let Some(code) = header_code(resp.headers()) {
                metrics.record(row, code);
                None
            } else {
                Some((metrics, row))
            };
            Ok(resp.map(|inner| CountedBody { inner, pending }))
        })
    }
}

/// A response body that records the call's status from its trailers (or `Canceled` if
/// dropped before them).
pub struct CountedBody<B> {
    inner: B,
    /// Set while the status is still to be recorded.
    pending: Option<(Arc<GrpcMetrics>, usize)>,
}

impl<B> CountedBody<B> {
    fn finish(&mut self, code: usize) {
        if let Some((m, row)) = self.pending.take() {
            m.record(row, code);
        }
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        self.finish(CANCELED);
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.pending.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(code) = frame.trailers_ref().and_then(header_code) {
                        this.finish(code);
                    }
                }
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => this.finish(UNKNOWN),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table names every rpc of both protos, so no method of ours counts as `other`.
    #[test]
    fn methods_match_the_protos() {
        // Compiled in: the test binary also runs where the checkout is not readable
        // (tests/sim/run).
        let mut found = Vec::new();
        for text in [
            include_str!("../../proto/proto/thinpool/v1/admin.proto"),
            include_str!("../../proto/proto/containerd/services/snapshots/v1/snapshots.proto"),
        ] {
            let package = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("package "))
                .unwrap()
                .trim_end_matches(';');
            let mut service = "";
            for l in text.lines().map(str::trim) {
                if let Some(s) = l.strip_prefix("service ") {
                    service = s.split_whitespace().next().unwrap();
                } else if let Some(r) = l.strip_prefix("rpc ") {
                    let name = r.split('(').next().unwrap().trim();
                    found.push(format!("/{package}.{service}/{name}"));
                }
            }
        }
        let mut ours: Vec<String> = METHODS.iter().map(|s| s.to_string()).collect();
        found.sort();
        ours.sort();
        assert_eq!(found, ours);
    }

    #[test]
    fn counts_by_method_and_code() {
        let m = GrpcMetrics::default();
        m.record(GrpcMetrics::row("/thinpool.v1.Admin/PoolStatus"), 0);
        m.record(GrpcMetrics::row("/thinpool.v1.Admin/PoolStatus"), 0);
        m.record(GrpcMetrics::row("/x.Y/Z"), 12);
        m.record(GrpcMetrics::row("/thinpool.v1.Admin/GrowPool"), 99);
        let r = m.read();
        assert_eq!(
            r,
            vec![
                RequestCount {
                    service: "thinpool.v1.Admin",
                    method: "PoolStatus",
                    code: "OK",
                    count: 2
                },
                RequestCount {
                    service: "thinpool.v1.Admin",
                    method: "GrowPool",
                    code: "Unknown",
                    count: 1
                },
                RequestCount {
                    service: "other",
                    method: "other",
                    code: "Unimplemented",
                    count: 1
                },
            ]
        );
    }
}
