//! The two gRPC services over one [`AsyncPool`]: containerd's Snapshots and our Admin.
//!
//! Every engine call goes through [`AsyncPool::run`], one hop to the blocking pool per
//! request (`Service::blocking` is the same for closures that answer with a `Status`);
//! `AsyncPool::engine` is used only for calls that do not block (settings, paths).

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

/// containerd's own label for the size of an active snapshot's filesystem (containerd
/// 2.4, `snapshots.LabelSnapshotMaxSize`: decimal bytes). Honoured like [`SIZE_LABEL`].
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";

/// Which label gives a Prepare's size, and its value: [`SIZE_LABEL`] or [`MAX_SIZE_LABEL`].
/// Both may be given only with the same value (refused otherwise: which one wins would be
/// a guess).
fn size_label(labels: &HashMap<String, String>) -> Result<Option<(&'static str, &str)>, Status> {
    match (labels.get(SIZE_LABEL), labels.get(MAX_SIZE_LABEL)) {
        (None, None) => Ok(None),
        (Some(v), None) => Ok(Some((SIZE_LABEL, v))),
        (None, Some(v)) => Ok(Some((MAX_SIZE_LABEL, v))),
        (Some(a), Some(b)) if a == b || same_size(a, b) => Ok(Some((SIZE_LABEL, a))),
        (Some(a), Some(b)) => Err(Status::invalid_argument(format!(
            "labels {SIZE_LABEL}={a:?} and {MAX_SIZE_LABEL}={b:?} disagree; give one, or both \
             with the same value"
        ))),
    }
}

/// Whether two size label values parse to the same size ("1G" and "1073741824").
fn same_size(a: &str, b: &str) -> bool {
    matches!((a.parse::<Bytes>(), b.parse::<Bytes>()), (Ok(x), Ok(y)) if x == y)
}

/// Snapshots per List stream message (containerd's snapshotservice sends 100 too).
const LIST_BATCH: usize = 100;
/// ... and at most about this much of the store per List message (labels may take 256 KiB
/// per snapshot; a message must stay below the 16 MiB limit). An unread List holds a few
/// pages (the page read, the message queued, the one being encoded).
const LIST_PAGE_BYTES: usize = 256 << 10;

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
    /// The size label may ask for at most the pool's data size times this
    /// (`--max-device-overcommit`); `None`: [`DEFAULT_MAX_DEVICE_OVERCOMMIT`].
    pub max_device_overcommit: Option<f64>,
    /// How many backups the Backup rpc (and the periodic backup) keeps; `None`:
    /// [`crate::config::DEFAULT_BACKUP_KEEP`].
    pub backup_keep: Option<usize>,
}

/// A device may be as large as the pool's data, by default: larger ones can only fill the
/// pool (a filesystem grown to 60 TiB writes its metadata into a 1 GiB pool).
pub const DEFAULT_MAX_DEVICE_OVERCOMMIT: f64 = 1.0;

struct Inner {
    pool: AsyncPool,
    static_info: StaticInfo,
    /// Serialises engine reclaims (Cleanup and the background reclaimer).
    reclaim_lock: Mutex<()>,
    reclaim_wake: Notify,
    /// Serialises label read-modify-writes (Update).
    update_lock: Mutex<()>,
    /// Notified once TakeDown has taken the pool down: the daemon stops serving.
    taken_down: Notify,
}

/// Both services share this; cloning is cheap.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(pool: AsyncPool, static_info: StaticInfo) -> Service {
        Service {
            inner: Arc::new(Inner {
                pool,
                static_info,
                reclaim_lock: Mutex::new(()),
                reclaim_wake: Notify::new(),
                update_lock: Mutex::new(()),
                taken_down: Notify::new(),
            }),
        }
    }

    pub fn pool(&self) -> &AsyncPool {
        &self.inner.pool
    }

    /// Completes once a TakeDown request has gone through (the pool is down, or with force
    /// as far down as it goes): the daemon then stops serving and exits.
    pub async fn taken_down(&self) {
        self.inner.taken_down.notified().await
    }

    /// Finishes every deferred removal; returns how many devices were freed.
    pub async fn reclaim(&self) -> Result<usize, Error> {
        let _g = self.inner.reclaim_lock.lock().await;
        self.inner.pool.run(|p| p.reclaim()).await
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

    /// Refuses a size label above what the pool could ever hold: its data size times the
    /// overcommit factor.
    fn check_size(&self, label: &str, size: Bytes) -> Result<Bytes, Status> {
        let factor = self
            .inner
            .static_info
            .max_device_overcommit
            .unwrap_or(DEFAULT_MAX_DEVICE_OVERCOMMIT);
        let data = self.inner.pool.engine().settings().data_size;
        let max = Bytes((data.0 as f64 * factor).min(u64::MAX as f64) as u64);
        if size > max {
            return Err(Status::invalid_argument(format!(
                "label {label}: {size} is above the largest device this pool allows, \
                 {max} (its data size {data} times --max-device-overcommit {factor})"
            )));
        }
        Ok(size)
    }

    /// [`AsyncPool::run`] for closures that answer with a gRPC status: one hop per
    /// request, however many engine calls it makes.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Pool) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        self.inner
            .pool
            .run(move |p| Ok(f(p)))
            .await
            .map_err(status)?
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
        let size = match size_label(&labels)? {
            None => None,
            Some((label, v)) => Some(
                self.check_size(
                    label,
                    v.parse::<Bytes>()
                        .map_err(|e| Status::invalid_argument(format!("label {label}: {e}")))?,
                )?,
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

/// Checks `CommitSnapshotRequest.parent` (containerd 2.2+, field 5), `wanted`, against the
/// snapshot's real parent `actual` ("" for none). containerd sends a parent only to a
/// snapshotter that advertises the `rebase` capability (its unpacker then prepares layers
/// without their parent and names the parent at Commit). thinpoold does not advertise it:
/// a thin snapshot holds its origin's blocks, so it cannot be moved onto another parent.
/// Naming the real parent is accepted (a no-op). Any other parent is InvalidArgument, the
/// code containerd's own metadata store returns for a commit that changes a snapshot's
/// parent (`snapshots/storage` CommitActive: "cannot change parent of active snapshot").
fn check_commit_parent(key: &DeviceName, actual: &str, wanted: &str) -> Result<(), Status> {
    if wanted.is_empty() || wanted == actual {
        return Ok(());
    }
    let was = if actual.is_empty() {
        "no parent".to_string()
    } else {
        format!("parent {actual:?}")
    };
    Err(Status::invalid_argument(format!(
        "commit of {:?} names parent {wanted:?}, but the snapshot was prepared on {was}; \
         thinpool cannot rebase a snapshot onto another parent (it does not advertise the \
         \"rebase\" capability)",
        key.as_str()
    )))
}

/// The name of the device with id `parent`, or "" for the base device.
fn parent_name(engine: &Pool, parent: Option<ThinId>) -> Result<String, Status> {
    let Some(id) = parent else {
        return Ok(String::new());
    };
    let rec = engine.record_by_id(id).map_err(status)?;
    Ok(match (rec.kind, rec.name) {
        (DeviceKind::Base, _) | (_, None) => String::new(),
        (_, Some(n)) => n.to_string(),
    })
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

/// Streams the visible snapshots that match `filters`, one message per page of the store.
/// Stops when the client goes away (the channel closes).
async fn produce_list(
    pool: AsyncPool,
    filters: Filters,
    tx: tokio::sync::mpsc::Sender<Result<pb::ListSnapshotsResponse, Status>>,
) {
    let filters = Arc::new(filters);
    let mut after = None;
    loop {
        let f = filters.clone();
        let page = match pool.run(move |p| Ok(list_page(p, &f, after))).await {
            Ok(page) => page,
            Err(e) => Err(status(e)),
        };
        let (infos, last) = match page {
            Ok(p) => p,
            Err(st) => {
                let _ = tx.send(Err(st)).await;
                return;
            }
        };
        if !infos.is_empty()
            && tx
                .send(Ok(pb::ListSnapshotsResponse { info: infos }))
                .await
                .is_err()
        {
            return; // the client went away
        }
        match last {
            Some(id) => after = Some(id),
            None => return,
        }
    }
}

/// One page of a List: the matching infos among the records after `after`, and the last id
/// read (`None`: no records left).
fn list_page(
    engine: &Pool,
    filters: &Filters,
    after: Option<ThinId>,
) -> Result<(Vec<pb::Info>, Option<ThinId>), Status> {
    let records = engine
        .devices_page(after, LIST_BATCH, LIST_PAGE_BYTES)
        .map_err(status)?;
    let mut parents: HashMap<ThinId, String> = records
        .iter()
        .filter(|r| r.kind != DeviceKind::Base)
        .filter_map(|r| Some((r.id, r.name.as_ref()?.to_string())))
        .collect();
    let mut infos = Vec::new();
    for rec in records.iter().filter(|r| visible(r)) {
        let parent = match rec.parent {
            None => String::new(),
            Some(p) => match parents.get(&p) {
                Some(n) => n.clone(),
                None => {
                    // A parent on another page; the base device has no name.
                    let n = engine
                        .record_by_id(p)
                        .ok()
                        .filter(|r| r.kind != DeviceKind::Base)
                        .and_then(|r| r.name.map(|n| n.to_string()))
                        .unwrap_or_default();
                    parents.insert(p, n.clone());
                    n
                }
            },
        };
        let i = info(rec, parent);
        let keep = filters.matches(&Fields {
            name: &i.name,
            parent: &i.parent,
            kind: rec.kind.as_str(),
            labels: &i.labels,
        });
        if keep {
            infos.push(i);
        }
    }
    Ok((infos, records.last().map(|r| r.id)))
}

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
            let parent = r.parent;
            self.blocking(move |engine| {
                if !parent.is_empty() {
                    let rec = lookup(engine, &key)?;
                    check_commit_parent(&key, &parent_name(engine, rec.parent)?, &parent)?;
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
            match self.inner.pool.run(move |p| p.remove(&key, opts)).await {
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
            // Filtering and reading run off the async workers, a page of the store at a
            // time, into a one-message channel: a client that does not read holds a page or
            // two, not the listing, and a costly filter delays only its own List.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(produce_list(self.inner.pool.clone(), filters, tx));
            debug!(rpc = "List", filters = r.filters.len());
            let stream: ListStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
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
            let size = self
                .blocking(move |engine| {
                    let rec = lookup(engine, &key)?;
                    // What the snapshot adds over its parent, as containerd means it.
                    engine.record_usage(&rec).map(|b| b.0).map_err(status)
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
        BackendKind::Sim => format!("thinpool-{tag}-sim"),
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

/// Quarantined devices for PoolStatus, named from their records where they have one.
fn quarantined_pb(
    q: &[thinpool::QuarantinedDevice],
    records: &[DeviceRecord],
) -> Vec<admin::QuarantinedDevice> {
    q.iter()
        .map(|d| admin::QuarantinedDevice {
            id: d.id.get(),
            name: records
                .iter()
                .find(|r| r.id == d.id)
                .and_then(|r| r.name.as_ref())
                .map(|n| n.to_string())
                .unwrap_or_default(),
            reason: d.reason.clone(),
            since: Some(timestamp(d.since_ns)),
        })
        .collect()
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
            let (st, devices) = pool
                .run(|p| Ok((p.status()?, p.devices()?)))
                .await
                .map_err(status)?;
            let settings = pool.engine().settings();
            let root = pool.engine().paths().root.clone();
            let (free, total) = host_fs_space(&root)?;
            let deferred = devices
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
                metadata_can_grow: st.backend != thinpool::BackendKind::Reflink,
                quarantined: quarantined_pb(&st.quarantined, &devices),
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
        let pool = &self.inner.pool;
        let res = pool
            .run(move |engine| {
                let records = engine.devices()?;
                let active = engine.active_devices()?;
                // One backend call for every device (dm: one thin_ls), activating none.
                let mapped_all: HashMap<ThinId, u64> = match engine.mapped_bytes_all() {
                    Ok(all) => all.into_iter().map(|(r, b)| (r.id, b.0)).collect(),
                    Err(e) => {
                        warn!(error = %e, "ListDevices: no mapped bytes");
                        HashMap::new()
                    }
                };
                let by_id: HashMap<ThinId, &DeviceRecord> =
                    records.iter().map(|r| (r.id, r)).collect();
                let mut out = Vec::with_capacity(records.len());
                for rec in &records {
                    let mapped = mapped_all.get(&rec.id).copied().unwrap_or(0);
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
            .map_err(status)
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
        let res = self
            .inner
            .pool
            .run(|p| p.audit())
            .await
            .map_err(status)
            .map(|a| {
                Response::new(admin::AuditResponse {
                    clean: a.is_clean(),
                    leaked: a.leaked.iter().map(|i| i.get()).collect(),
                    missing: a.missing.iter().map(|i| i.get()).collect(),
                    unfinished: a.unfinished.iter().map(|i| i.get()).collect(),
                    pending: a.pending.iter().map(|i| i.get()).collect(),
                    quarantined: a.quarantined.iter().map(|i| i.get()).collect(),
                    store_problems: a.store_problems.clone(),
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
            let out = self
                .inner
                .pool
                .run(move |p| p.grow(grow))
                .await
                .map_err(status)?;
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

    async fn backup(
        &self,
        _req: Request<admin::BackupRequest>,
    ) -> Result<Response<admin::BackupResponse>, Status> {
        let t = Instant::now();
        let keep = self
            .inner
            .static_info
            .backup_keep
            .unwrap_or(crate::config::DEFAULT_BACKUP_KEEP);
        let res = self
            .inner
            .pool
            .run(move |p| p.backup(keep))
            .await
            .map_err(status)
            .map(|b| {
                Response::new(admin::BackupResponse {
                    path: b.path.display().to_string(),
                    created: b.created,
                    transaction_id: b.transaction_id,
                    devices: b.devices,
                    removed: b.removed.iter().map(|p| p.display().to_string()).collect(),
                })
            });
        traced("Backup", "", t, res)
    }

    async fn take_down(
        &self,
        req: Request<admin::TakeDownRequest>,
    ) -> Result<Response<admin::TakeDownResponse>, Status> {
        let force = req.into_inner().force;
        let t = Instant::now();
        let res = async {
            let r = self
                .inner
                .pool
                .run(move |p| p.take_down(force))
                .await
                .map_err(status)?;
            info!(
                force,
                deactivated = r.deactivated.len(),
                busy = r.busy.len(),
                pool_down = r.pool_down,
                "TakeDown: stopping the daemon"
            );
            // notify_one keeps the wake-up for a waiter that comes later.
            self.inner.taken_down.notify_one();
            Ok(Response::new(admin::TakeDownResponse {
                deactivated: r.deactivated.iter().map(|id| id.get()).collect(),
                busy: r.busy.iter().map(|(id, _)| id.get()).collect(),
                pool_down: r.pool_down,
            }))
        }
        .await;
        traced("TakeDown", if force { "force" } else { "" }, t, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn either_size_label_gives_the_size_and_they_must_agree() {
        assert_eq!(size_label(&labels(&[])).unwrap(), None);
        assert_eq!(
            size_label(&labels(&[("other", "1G")])).unwrap(),
            None,
            "only the two size labels count"
        );
        assert_eq!(
            size_label(&labels(&[(SIZE_LABEL, "2G")])).unwrap(),
            Some((SIZE_LABEL, "2G"))
        );
        assert_eq!(
            size_label(&labels(&[(MAX_SIZE_LABEL, "1073741824")])).unwrap(),
            Some((MAX_SIZE_LABEL, "1073741824"))
        );
        assert_eq!(
            size_label(&labels(&[
                (SIZE_LABEL, "1G"),
                (MAX_SIZE_LABEL, "1073741824")
            ]))
            .unwrap(),
            Some((SIZE_LABEL, "1G")),
            "the same size written two ways agrees"
        );
        let e = size_label(&labels(&[
            (SIZE_LABEL, "1G"),
            (MAX_SIZE_LABEL, "2147483648"),
        ]))
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains(SIZE_LABEL) && e.message().contains(MAX_SIZE_LABEL),
            "{}",
            e.message()
        );
        assert_eq!(MAX_SIZE_LABEL, "containerd.io/snapshot/max-size");
    }

    #[test]
    fn commit_parent_must_be_the_real_one() {
        let key = DeviceName::new("k").unwrap();
        check_commit_parent(&key, "p", "").unwrap();
        check_commit_parent(&key, "", "").unwrap();
        check_commit_parent(&key, "p", "p").unwrap();
        for (actual, wanted) in [("p", "q"), ("", "q")] {
            let e = check_commit_parent(&key, actual, wanted).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains("rebase"), "{}", e.message());
        }
    }
}
