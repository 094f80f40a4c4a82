//! The two gRPC services over one [`AsyncPool`]: containerd's Snapshots and our Admin.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinpool::{
    AsyncPool, BackendKind, Bytes, DeviceKind, DeviceName, DeviceRecord, DeviceState, Error,
    ErrorKind, GrowRequest, MountSpec, Pool, RemoveOptions, SizeChange, SnapshotRequest, ThinId,
};
use thinpool_proto::admin::{self, admin_server::Admin};
use thinpool_proto::snapshots::{self as pb, snapshots_server::Snapshots};
use thinpool_proto::types::Mount;
use tokio::sync::{Mutex, Notify};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::filter::{Fields, Filters};

/// The label by which a Prepare asks for a device size other than the parent's:
/// `containerd.io/snapshot/thinpool.size=20G` (binary suffixes; at least the parent's size).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinpool.size";

/// Snapshots per List stream message (containerd's snapshotservice sends 100 too).
const LIST_BATCH: usize = 100;

/// How often the background reclaimer runs even if no Remove woke it.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(60);
/// How long the reclaimer waits after a Remove for more to arrive, to delete in batches.
const RECLAIM_COALESCE: Duration = Duration::from_millis(500);

/// Maps an engine error to the gRPC status containerd's `errdefs.FromGRPC` understands.
pub fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(msg),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::AlreadyExists => Status::already_exists(msg),
        ErrorKind::FailedPrecondition => Status::failed_precondition(msg),
        ErrorKind::ResourceExhausted => Status::resource_exhausted(msg),
        ErrorKind::DataLoss => Status::data_loss(msg),
        ErrorKind::Internal => Status::internal(msg),
    }
}

fn name(field: &str, s: &str) -> Result<DeviceName, Status> {
    DeviceName::new(s).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// The key of a snapshot to look up: an empty one names no snapshot (NotFound, as
/// containerd's storage answers for a missing bucket).
fn existing_key(field: &str, s: &str) -> Result<DeviceName, Status> {
    if s.is_empty() {
        return Err(Status::not_found(format!(
            "{field}: no snapshot has an empty key"
        )));
    }
    name(field, s)
}

fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

fn kind_str(k: DeviceKind) -> &'static str {
    match k {
        DeviceKind::Active => "active",
        DeviceKind::View => "view",
        DeviceKind::Committed => "committed",
        DeviceKind::Base => "base",
    }
}

fn pb_kind(k: DeviceKind) -> pb::Kind {
    match k {
        DeviceKind::Active => pb::Kind::Active,
        DeviceKind::View => pb::Kind::View,
        DeviceKind::Committed => pb::Kind::Committed,
        DeviceKind::Base => pb::Kind::Unknown,
    }
}

fn mount(spec: MountSpec) -> Mount {
    Mount {
        r#type: spec.fs_type.to_string(),
        source: spec.source.to_string_lossy().into_owned(),
        target: String::new(),
        options: spec.options,
    }
}

/// A record the Snapshots API shows: named, ready, not the base device.
fn visible(rec: &DeviceRecord) -> bool {
    rec.state == DeviceState::Ready && rec.kind != DeviceKind::Base && rec.name.is_some()
}

fn info(rec: &DeviceRecord, parent: String) -> pb::Info {
    pb::Info {
        name: rec.name.as_ref().map(|n| n.to_string()).unwrap_or_default(),
        parent,
        kind: pb_kind(rec.kind) as i32,
        created_at: Some(timestamp(rec.created_ns)),
        updated_at: Some(timestamp(rec.updated_ns)),
        labels: rec.labels.clone().into_iter().collect(),
    }
}

/// Logs one request's outcome at debug level.
fn traced<T>(rpc: &str, key: &str, start: Instant, r: Result<T, Status>) -> Result<T, Status> {
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match &r {
        Ok(_) => debug!(rpc, key, ms, "ok"),
        Err(s) => debug!(rpc, key, ms, code = ?s.code(), message = s.message(), "error"),
    }
    r
}

/// Facts about the daemon that do not change while it runs.
#[derive(Clone, Debug, Default)]
pub struct StaticInfo {
    /// dm: the devicemapper crate's and the kernel's dm versions; reflink: empty.
    pub library_version: String,
}

struct Inner {
    pool: AsyncPool,
    backend: BackendKind,
    static_info: StaticInfo,
    /// Serialises engine reclaims (Cleanup and the background reclaimer).
    reclaim_lock: Mutex<()>,
    reclaim_wake: Notify,
    /// Serialises label read-modify-writes (Update).
    update_lock: Mutex<()>,
}

/// Both services share this; cloning is cheap.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(pool: AsyncPool, static_info: StaticInfo) -> Service {
        let backend = pool.engine().backend_kind();
        Service {
            inner: Arc::new(Inner {
                pool,
                backend,
                static_info,
                reclaim_lock: Mutex::new(()),
                reclaim_wake: Notify::new(),
                update_lock: Mutex::new(()),
            }),
        }
    }

    pub fn pool(&self) -> &AsyncPool {
        &self.inner.pool
    }

    /// Finishes every deferred removal; returns how many devices were freed.
    pub async fn reclaim(&self) -> Result<usize, Error> {
        let _g = self.inner.reclaim_lock.lock().await;
        self.inner.pool.reclaim().await
    }

    /// The background reclaimer: runs after Removes (coalesced) and every minute, until
    /// `stop` resolves. A reclaim in progress when `stop` fires is finished first.
    pub async fn run_reclaimer(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            match self.reclaim().await {
                Ok(0) => {}
                Ok(n) => info!(devices = n, "reclaimed removed devices"),
                Err(e) => warn!(error = %e, "background reclaim failed; will retry"),
            }
            tokio::select! {
                _ = stop.changed() => return,
                _ = self.inner.reclaim_wake.notified() => {
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(RECLAIM_COALESCE) => {}
                    }
                }
                _ = tokio::time::sleep(RECLAIM_INTERVAL) => {}
            }
        }
    }

    /// Runs `f` with the engine on tokio's blocking pool: one hop per request, however
    /// many engine calls it makes.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Pool) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let engine = self.inner.pool.engine().clone();
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| Status::internal(format!("engine task failed: {e}")))?
    }

    async fn create(
        &self,
        kind: DeviceKind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let key = name("key", key)?;
        let parent = if parent.is_empty() {
            None
        } else {
            Some(name("parent", parent)?)
        };
        let size = match labels.get(SIZE_LABEL) {
            None => None,
            Some(v) => Some(
                v.parse::<Bytes>()
                    .map_err(|e| Status::invalid_argument(format!("label {SIZE_LABEL}: {e}")))?,
            ),
        };
        let req = SnapshotRequest {
            name: key.clone(),
            parent: parent.clone(),
            kind,
            size,
            labels: labels.into_iter().collect(),
            // Created and activated in one commit; the activate below only returns the spec.
            activate: true,
        };
        let (spec, undone) = self
            .blocking(move |engine| {
                // The engine checks the parent (NotFound, or InvalidArgument when it is not
                // committed, as containerd's storage does) inside its write transaction.
                engine.snapshot(req).map_err(status)?;
                match engine.activate(&key) {
                    Ok(spec) => Ok((Ok(spec), false)),
                    Err(e) => {
                        // Do not leave a snapshot behind that the caller was told failed.
                        let opts = RemoveOptions {
                            deferred: true,
                            ..Default::default()
                        };
                        if let Err(undo) = engine.remove(&key, opts) {
                            warn!(key = %key, error = %undo,
                                "could not remove a snapshot whose activation failed");
                        }
                        Ok((Err(status(e)), true))
                    }
                }
            })
            .await?;
        if undone {
            self.inner.reclaim_wake.notify_one();
        }
        Ok(vec![mount(spec?)])
    }
}

/// The record of a snapshot the API shows; NotFound for anything else.
fn lookup(engine: &Pool, key: &DeviceName) -> Result<DeviceRecord, Status> {
    match engine.device(key) {
        Ok(rec) if visible(&rec) => Ok(rec),
        Ok(_) => Err(Status::not_found(format!("snapshot {:?}", key.as_str()))),
        // The engine reports a record mid-create as FailedPrecondition; the API hides it.
        Err(e) if e.kind() == ErrorKind::FailedPrecondition => Err(Status::not_found(format!(
            "snapshot {:?} (being created)",
            key.as_str()
        ))),
        Err(e) => Err(status(e)),
    }
}

/// The name of the device with id `parent`, or "" for the base device.
fn parent_name(engine: &Pool, parent: Option<ThinId>) -> Result<String, Status> {
    let Some(id) = parent else {
        return Ok(String::new());
    };
    let rec = engine.device_by_id(id).map_err(status)?;
    Ok(match (rec.kind, rec.name) {
        (DeviceKind::Base, _) | (_, None) => String::new(),
        (_, Some(n)) => n.to_string(),
    })
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = self
            .create(DeviceKind::Active, &r.key, &r.parent, r.labels)
            .await
            .map(|mounts| Response::new(pb::PrepareSnapshotResponse { mounts }));
        traced("Prepare", &r.key, t, res)
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = self
            .create(DeviceKind::View, &r.key, &r.parent, r.labels)
            .await
            .map(|mounts| Response::new(pb::ViewSnapshotResponse { mounts }));
        traced("View", &r.key, t, res)
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = async {
            let key = existing_key("key", &r.key)?;
            let spec = self
                .blocking(move |engine| {
                    lookup(engine, &key)?;
                    // Refuses a committed snapshot under the device's lock, so a Commit
                    // racing this cannot leave the committed layer with a writable device.
                    engine.mounts(&key).map_err(status)
                })
                .await?;
            Ok(Response::new(pb::MountsResponse {
                mounts: vec![mount(spec)],
            }))
        }
        .await;
        traced("Mounts", &r.key, t, res)
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = async {
            let key = existing_key("key", &r.key)?;
            let new = name("name", &r.name)?;
            let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
            let rebase_to = r.parent;
            self.blocking(move |engine| {
                if !rebase_to.is_empty() {
                    let rec = lookup(engine, &key)?;
                    if parent_name(engine, rec.parent)? != rebase_to {
                        return Err(Status::unimplemented(
                            "commit onto a different parent (rebase) is not supported",
                        ));
                    }
                }
                engine.commit(&key, &new, Some(labels)).map_err(status)
            })
            .await?;
            Ok(Response::new(()))
        }
        .await;
        traced("Commit", &r.key, t, res)
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = async {
            let key = existing_key("key", &r.key)?;
            let opts = RemoveOptions {
                deferred: true,
                ..Default::default()
            };
            match self.inner.pool.remove(key, opts).await {
                Ok(()) => {
                    self.inner.reclaim_wake.notify_one();
                    Ok(Response::new(()))
                }
                Err(e) if e.kind() == ErrorKind::NotFound => Err(status(e)),
                // containerd's GC stops its whole pass on any error but FailedPrecondition
                // (containerd#3923), so every other failure is reported as one.
                Err(e) => {
                    if e.kind() != ErrorKind::FailedPrecondition {
                        warn!(key = %r.key, error = %e, "remove failed");
                    }
                    Err(Status::failed_precondition(e.to_string()))
                }
            }
        }
        .await;
        traced("Remove", &r.key, t, res)
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = async {
            let key = existing_key("key", &r.key)?;
            let (rec, parent) = self
                .blocking(move |engine| {
                    let rec = lookup(engine, &key)?;
                    let parent = parent_name(engine, rec.parent)?;
                    Ok((rec, parent))
                })
                .await?;
            Ok(Response::new(pb::StatSnapshotResponse {
                info: Some(info(&rec, parent)),
            }))
        }
        .await;
        traced("Stat", &r.key, t, res)
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let key_str = r.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let res = async {
            let new = r
                .info
                .ok_or_else(|| Status::invalid_argument("update without info"))?;
            let key = existing_key("info.name", &new.name)?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            let _g = self.inner.update_lock.lock().await;
            let rec = self
                .blocking({
                    let key = key.clone();
                    move |engine| lookup(engine, &key)
                })
                .await?;
            let mut labels = rec.labels.clone();
            if paths.is_empty() {
                labels = new.labels.into_iter().collect();
            } else {
                for p in &paths {
                    if p == "labels" {
                        labels = new.labels.clone().into_iter().collect();
                    } else if let Some(k) = p.strip_prefix("labels.") {
                        match new.labels.get(k) {
                            Some(v) => {
                                labels.insert(k.to_string(), v.clone());
                            }
                            None => {
                                labels.remove(k);
                            }
                        }
                    } else {
                        return Err(Status::invalid_argument(format!(
                            "cannot update field {p:?} of a snapshot: only labels are mutable"
                        )));
                    }
                }
            }
            let (rec, parent) = self
                .blocking(move |engine| {
                    let rec = engine.set_labels(&key, labels).map_err(status)?;
                    let parent = parent_name(engine, rec.parent)?;
                    Ok((rec, parent))
                })
                .await?;
            Ok(Response::new(pb::UpdateSnapshotResponse {
                info: Some(info(&rec, parent)),
            }))
        }
        .await;
        traced("Update", &key_str, t, res)
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = async {
            let filters =
                Filters::parse(&r.filters).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let records = self.inner.pool.devices().await.map_err(status)?;
            let names: HashMap<ThinId, &DeviceRecord> = records.iter().map(|r| (r.id, r)).collect();
            let mut infos = Vec::new();
            for rec in records.iter().filter(|r| visible(r)) {
                let parent = rec
                    .parent
                    .and_then(|p| names.get(&p))
                    .filter(|p| p.kind != DeviceKind::Base)
                    .and_then(|p| p.name.as_ref())
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                let i = info(rec, parent);
                let keep = filters.matches(&Fields {
                    name: &i.name,
                    parent: &i.parent,
                    kind: kind_str(rec.kind),
                    labels: &i.labels,
                });
                if keep {
                    infos.push(i);
                }
            }
            debug!(rpc = "List", filters = ?r.filters, found = infos.len());
            let mut batches = Vec::with_capacity(infos.len() / LIST_BATCH + 1);
            let mut it = infos.into_iter().peekable();
            while it.peek().is_some() {
                batches.push(Ok(pb::ListSnapshotsResponse {
                    info: it.by_ref().take(LIST_BATCH).collect(),
                }));
            }
            let stream: ListStream = Box::pin(tokio_stream::iter(batches));
            Ok(Response::new(stream))
        }
        .await;
        traced("List", "", t, res)
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = async {
            let key = existing_key("key", &r.key)?;
            let backend = self.inner.backend;
            let size = self
                .blocking(move |engine| {
                    let rec = lookup(engine, &key)?;
                    let mapped = engine.usage(&key).map_err(status)?;
                    // dm counts every block the device maps, shared with its parent or not:
                    // report what it maps beyond its parent (as containerd's devmapper does).
                    // reflink already counts only extents the device does not share.
                    Ok(match (backend, rec.parent) {
                        (BackendKind::Dm, Some(p)) => {
                            let parent = engine.usage_by_id(p).map_err(status)?;
                            mapped.0.saturating_sub(parent.0)
                        }
                        _ => mapped.0,
                    })
                })
                .await?;
            Ok(Response::new(pb::UsageResponse {
                size: size as i64,
                inodes: 0,
            }))
        }
        .await;
        traced("Usage", &r.key, t, res)
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let t = Instant::now();
        let res = match self.reclaim().await {
            Ok(n) => {
                if n > 0 {
                    info!(devices = n, "cleanup reclaimed removed devices");
                }
                Ok(Response::new(()))
            }
            Err(e) => Err(status(e)),
        };
        traced("Cleanup", "", t, res)
    }
}

fn pool_name(backend: BackendKind, tag: &str) -> String {
    match backend {
        BackendKind::Dm => format!("thinpool-{tag}-pool"),
        BackendKind::Reflink => format!("thinpool-{tag}"),
    }
}

/// Free and total bytes of the filesystem holding `path`.
fn host_fs_space(path: &Path) -> Result<(u64, u64), Status> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
    let frsize = st.fragment_size() as u64;
    Ok((
        st.blocks_available() as u64 * frsize,
        st.blocks() as u64 * frsize,
    ))
}

fn pb_device_kind(k: DeviceKind) -> admin::DeviceKind {
    match k {
        DeviceKind::Base => admin::DeviceKind::Base,
        DeviceKind::Committed => admin::DeviceKind::Committed,
        DeviceKind::Active => admin::DeviceKind::Active,
        DeviceKind::View => admin::DeviceKind::View,
    }
}

fn pb_device_state(s: DeviceState) -> admin::DeviceState {
    match s {
        DeviceState::Creating => admin::DeviceState::Creating,
        DeviceState::Ready => admin::DeviceState::Ready,
        DeviceState::Deleting => admin::DeviceState::Deleting,
    }
}

#[tonic::async_trait]
impl Admin for Service {
    async fn pool_status(
        &self,
        _req: Request<admin::PoolStatusRequest>,
    ) -> Result<Response<admin::PoolStatusResponse>, Status> {
        let t = Instant::now();
        let res = async {
            let pool = &self.inner.pool;
            let st = pool.status().await.map_err(status)?;
            let settings = pool.engine().settings();
            let root = pool.engine().paths().root.clone();
            let (free, total) = host_fs_space(&root)?;
            let deferred = pool
                .devices()
                .await
                .map_err(status)?
                .iter()
                .filter(|r| r.state == DeviceState::Deleting)
                .count();
            let k = &st.kernel;
            Ok(Response::new(admin::PoolStatusResponse {
                backend: st.backend.to_string(),
                pool_name: pool_name(st.backend, &settings.tag),
                root: root.to_string_lossy().into_owned(),
                pool_blocksize: st.block_size.0,
                base_device_size: st.base_size.0,
                backing_filesystem: st.fs.to_string(),
                data_file: st.data_file.to_string_lossy().into_owned(),
                metadata_file: st.metadata_file.to_string_lossy().into_owned(),
                data_space_used: k.data_used.0,
                data_space_total: k.data_total.0,
                data_space_available: k.data_total.0.saturating_sub(k.data_used.0),
                metadata_space_used: k.metadata_used.0,
                metadata_space_total: k.metadata_total.0,
                metadata_space_available: k.metadata_total.0.saturating_sub(k.metadata_used.0),
                thin_pool_minimum_free_space: k.data_total.0 * settings.min_free_space.0 as u64
                    / 100,
                min_free_space_percent: settings.min_free_space.0,
                udev_sync_supported: "not applicable".into(),
                deferred_removal_enabled: true,
                deferred_deletion_enabled: true,
                deferred_deleted_devices: deferred as u64,
                library_version: self.inner.static_info.library_version.clone(),
                mode: k.mode.to_string(),
                needs_check: k.needs_check,
                transaction_id: k.transaction_id,
                host_fs_free_bytes: free,
                host_fs_total_bytes: total,
                devices: st.devices as u64,
                error_if_no_space: k.error_if_no_space,
                low_water_mark: k.low_water_mark.0,
                autoextend_data_threshold_percent: settings.autoextend_data.threshold.0,
                autoextend_data_percent: settings.autoextend_data.percent.0,
                autoextend_data_max_bytes: settings.autoextend_data.max.map_or(0, |b| b.0),
                autoextend_metadata_threshold_percent: settings.autoextend_metadata.threshold.0,
                autoextend_metadata_percent: settings.autoextend_metadata.percent.0,
                autoextend_metadata_max_bytes: settings.autoextend_metadata.max.map_or(0, |b| b.0),
                metadata_can_grow: st.backend == thinpool::BackendKind::Dm,
            }))
        }
        .await;
        traced("PoolStatus", "", t, res)
    }

    async fn list_devices(
        &self,
        _req: Request<admin::ListDevicesRequest>,
    ) -> Result<Response<admin::ListDevicesResponse>, Status> {
        let t = Instant::now();
        let engine = self.inner.pool.engine().clone();
        let res = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let records = engine.devices()?;
            let active = engine.active_devices()?;
            let by_id: HashMap<ThinId, &DeviceRecord> = records.iter().map(|r| (r.id, r)).collect();
            let mut out = Vec::with_capacity(records.len());
            for rec in &records {
                let mapped = if rec.state == DeviceState::Ready {
                    engine.usage_by_id(rec.id).map(|b| b.0).unwrap_or_else(|e| {
                        debug!(id = %rec.id, error = %e, "no mapped bytes");
                        0
                    })
                } else {
                    0
                };
                let parent = rec.parent.and_then(|p| by_id.get(&p));
                out.push(admin::Device {
                    id: rec.id.get(),
                    name: rec.name.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                    kind: pb_device_kind(rec.kind) as i32,
                    state: pb_device_state(rec.state) as i32,
                    parent_id: rec.parent.map(|p| p.get()),
                    parent_name: parent
                        .and_then(|p| p.name.as_ref())
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                    size: rec.size.0,
                    mapped_bytes: mapped,
                    device_path: active
                        .get(&rec.id)
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    labels: rec.labels.clone().into_iter().collect(),
                    created_at: Some(timestamp(rec.created_ns)),
                    updated_at: Some(timestamp(rec.updated_ns)),
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| Status::internal(format!("list task failed: {e}")))
        .and_then(|r| r.map_err(status))
        .map(|devices| Response::new(admin::ListDevicesResponse { devices }));
        traced("ListDevices", "", t, res)
    }

    async fn activate(
        &self,
        req: Request<admin::ActivateRequest>,
    ) -> Result<Response<admin::ActivateResponse>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = async {
            let key = name("key", &r.key)?;
            let spec = self
                .blocking(move |engine| {
                    lookup(engine, &key)?;
                    engine.activate(&key).map_err(status)
                })
                .await?;
            Ok(Response::new(admin::ActivateResponse {
                mounts: vec![mount(spec)],
            }))
        }
        .await;
        traced("Activate", &r.key, t, res)
    }

    async fn deactivate(
        &self,
        req: Request<admin::DeactivateRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let res = async {
            let key = name("key", &r.key)?;
            self.blocking(move |engine| {
                lookup(engine, &key)?;
                engine.deactivate(&key).map_err(status)
            })
            .await?;
            Ok(Response::new(()))
        }
        .await;
        traced("Deactivate", &r.key, t, res)
    }

    async fn audit(
        &self,
        _req: Request<admin::AuditRequest>,
    ) -> Result<Response<admin::AuditResponse>, Status> {
        let t = Instant::now();
        let res = self.inner.pool.audit().await.map_err(status).map(|a| {
            Response::new(admin::AuditResponse {
                clean: a.is_clean(),
                leaked: a.leaked.iter().map(|i| i.get()).collect(),
                missing: a.missing.iter().map(|i| i.get()).collect(),
                unfinished: a.unfinished.iter().map(|i| i.get()).collect(),
            })
        });
        traced("Audit", "", t, res)
    }

    async fn grow_pool(
        &self,
        req: Request<admin::GrowPoolRequest>,
    ) -> Result<Response<admin::GrowPoolResponse>, Status> {
        let r = req.into_inner();
        let t = Instant::now();
        let what = format!("data={:?} metadata={:?}", r.data, r.metadata);
        let res = async {
            let parse = |field: &str, s: &str| -> Result<Option<SizeChange>, Status> {
                if s.is_empty() {
                    return Ok(None);
                }
                s.parse()
                    .map(Some)
                    .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
            };
            let grow = GrowRequest {
                data: parse("data", &r.data)?,
                metadata: parse("metadata", &r.metadata)?,
                force: r.force,
            };
            let out = self.inner.pool.grow(grow).await.map_err(status)?;
            info!(
                data_before = out.before.data.0,
                data_after = out.after.data.0,
                metadata_before = out.before.metadata.0,
                metadata_after = out.after.metadata.0,
                "pool grown"
            );
            Ok(Response::new(admin::GrowPoolResponse {
                data_size_before: out.before.data.0,
                data_size_after: out.after.data.0,
                metadata_size_before: out.before.metadata.0,
                metadata_size_after: out.after.metadata.0,
            }))
        }
        .await;
        traced("GrowPool", &what, t, res)
    }
}
