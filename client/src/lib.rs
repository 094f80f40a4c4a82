//! A typed client for thinpoold: containerd's Snapshots service and thinpool's Admin
//! service, over the daemon's unix socket.
//!
//! ```no_run
//! # async fn demo() -> Result<(), thinpool_client::ClientError> {
//! let mut c = thinpool_client::Client::connect("/run/thinpool/thinpool.sock").await?;
//! let mounts = c.prepare("my-container", None, Default::default()).await?;
//! println!("mount {} ({}) with {:?}", mounts[0].source, mounts[0].r#type, mounts[0].options);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use thinpool_proto::admin::{self, admin_client::AdminClient};
use thinpool_proto::snapshots::{self as pb, snapshots_client::SnapshotsClient};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

pub mod mount;
mod units;

pub use units::Bytes;

pub use thinpool_proto::admin::{
    AuditResponse, Device, GrowPoolResponse, PoolStatusResponse, TakeDownResponse,
};
pub use thinpool_proto::snapshots::{Info, Kind};
pub use thinpool_proto::types::Mount;

/// The daemon's default socket.
pub const DEFAULT_SOCKET: &str = "/run/thinpool/thinpool.sock";

/// Largest message either side sends (containerd's proxy client uses the same).
const MAX_MESSAGE_SIZE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to thinpoold at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// The daemon answered with an error; `code()` says which.
    #[error("{}", status_text(.0))]
    Status(tonic::Status),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> ClientError {
        ClientError::Status(s)
    }
}

/// "code: message", without repeating the code when the message already starts with it.
fn status_text(s: &tonic::Status) -> String {
    let code = code_name(s.code());
    if s.message().starts_with(code) {
        s.message().to_string()
    } else {
        format!("{code}: {}", s.message())
    }
}

impl ClientError {
    /// The gRPC code of a daemon error (`Unavailable` for connection failures).
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::Connect { .. } => tonic::Code::Unavailable,
            ClientError::Status(s) => s.code(),
        }
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        InvalidArgument => "invalid argument",
        NotFound => "not found",
        AlreadyExists => "already exists",
        FailedPrecondition => "failed precondition",
        ResourceExhausted => "resource exhausted",
        DataLoss => "data loss",
        Unimplemented => "not implemented",
        Unavailable => "unavailable (is thinpoold running?)",
        _ => "error",
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A connection to thinpoold. Cloning shares the connection.
#[derive(Clone)]
pub struct Client {
    snapshots: SnapshotsClient<Channel>,
    admin: AdminClient<Channel>,
}

/// The snapshotter name sent in requests. thinpoold serves one pool and ignores it.
const SNAPSHOTTER: &str = "thinpool";

impl Client {
    /// Connects to the daemon's unix socket.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Client> {
        let path = socket.as_ref().to_path_buf();
        let p = path.clone();
        // The URI is required by tonic but unused: every connection goes to the socket.
        let channel = Endpoint::from_static("http://thinpoold.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move { UnixStream::connect(p).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|source| ClientError::Connect { path, source })?;
        Ok(Client::from_channel(channel))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            snapshots: SnapshotsClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
            admin: AdminClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        }
    }

    /// The raw generated Snapshots client, for requests the typed methods do not cover.
    pub fn snapshots_raw(&self) -> SnapshotsClient<Channel> {
        self.snapshots.clone()
    }

    /// The raw generated Admin client.
    pub fn admin_raw(&self) -> AdminClient<Channel> {
        self.admin.clone()
    }

    // ---- containerd.services.snapshots.v1

    /// Creates an active (writable) snapshot `key` of the committed `parent` (or of the
    /// empty base filesystem) and returns its mounts.
    pub async fn prepare(
        &mut self,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let r = self
            .snapshots
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
                parent: parent.unwrap_or_default().into(),
                labels,
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    /// Creates a read-only snapshot `key` of `parent` and returns its mounts.
    pub async fn view(
        &mut self,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let r = self
            .snapshots
            .view(pb::ViewSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
                parent: parent.unwrap_or_default().into(),
                labels,
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>> {
        let r = self
            .snapshots
            .mounts(pb::MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await?;
        Ok(r.into_inner().mounts)
    }

    /// Commits the active snapshot `key` as `name`. The labels replace the snapshot's.
    pub async fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        self.snapshots
            .commit(pb::CommitSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                name: name.into(),
                key: key.into(),
                labels,
                parent: String::new(),
            })
            .await?;
        Ok(())
    }

    pub async fn remove(&mut self, key: &str) -> Result<()> {
        self.snapshots
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn stat(&mut self, key: &str) -> Result<Info> {
        let r = self
            .snapshots
            .stat(pb::StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await?;
        r.into_inner()
            .info
            .ok_or_else(|| tonic::Status::internal("Stat answered without info").into())
    }

    /// Updates the labels of `info.name`: `paths` are `labels` or `labels.<key>` (empty: all
    /// labels are replaced).
    pub async fn update(&mut self, info: Info, paths: Vec<String>) -> Result<Info> {
        let r = self
            .snapshots
            .update(pb::UpdateSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                info: Some(info),
                update_mask: Some(prost_types::FieldMask { paths }),
            })
            .await?;
        r.into_inner()
            .info
            .ok_or_else(|| tonic::Status::internal("Update answered without info").into())
    }

    /// Every snapshot matching any of `filters` (containerd filter syntax; none: all).
    pub async fn list(&mut self, filters: &[&str]) -> Result<Vec<Info>> {
        let mut stream = self
            .snapshots
            .list(pb::ListSnapshotsRequest {
                snapshotter: SNAPSHOTTER.into(),
                filters: filters.iter().map(|s| s.to_string()).collect(),
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await? {
            out.extend(batch.info);
        }
        Ok(out)
    }

    /// Bytes the snapshot uses beyond its parent, and inodes (always 0).
    pub async fn usage(&mut self, key: &str) -> Result<(i64, i64)> {
        let r = self
            .snapshots
            .usage(pb::UsageRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await?
            .into_inner();
        Ok((r.size, r.inodes))
    }

    /// Finishes deferred removals now.
    pub async fn cleanup(&mut self) -> Result<()> {
        self.snapshots
            .cleanup(pb::CleanupRequest {
                snapshotter: SNAPSHOTTER.into(),
            })
            .await?;
        Ok(())
    }

    // ---- thinpool.v1

    pub async fn pool_status(&mut self) -> Result<PoolStatusResponse> {
        Ok(self
            .admin
            .pool_status(admin::PoolStatusRequest {})
            .await?
            .into_inner())
    }

    pub async fn devices(&mut self) -> Result<Vec<Device>> {
        Ok(self
            .admin
            .list_devices(admin::ListDevicesRequest {})
            .await?
            .into_inner()
            .devices)
    }

    /// Activates a snapshot's device (committed ones read-only) and returns its mounts.
    pub async fn activate(&mut self, key: &str) -> Result<Vec<Mount>> {
        Ok(self
            .admin
            .activate(admin::ActivateRequest { key: key.into() })
            .await?
            .into_inner()
            .mounts)
    }

    pub async fn deactivate(&mut self, key: &str) -> Result<()> {
        self.admin
            .deactivate(admin::DeactivateRequest { key: key.into() })
            .await?;
        Ok(())
    }

    pub async fn audit(&mut self) -> Result<AuditResponse> {
        Ok(self.admin.audit(admin::AuditRequest {}).await?.into_inner())
    }

    /// Grows the pool: `data`/`metadata` are "SIZE" (grow to) or "+SIZE" (grow by).
    pub async fn grow_pool(
        &mut self,
        data: Option<&str>,
        metadata: Option<&str>,
        force: bool,
    ) -> Result<GrowPoolResponse> {
        let req = admin::GrowPoolRequest {
            data: data.unwrap_or_default().to_string(),
            metadata: metadata.unwrap_or_default().to_string(),
            force,
        };
        Ok(self.admin.grow_pool(req).await?.into_inner())
    }

    /// Takes the pool down (see the TakeDown rpc); the daemon exits afterwards.
    pub async fn take_down(&mut self, force: bool) -> Result<TakeDownResponse> {
        let req = admin::TakeDownRequest { force };
        Ok(self.admin.take_down(req).await?.into_inner())
    }

    /// Takes a backup of the pool now (see the Backup rpc).
    pub async fn backup(&mut self) -> Result<admin::BackupResponse> {
        Ok(self
            .admin
            .backup(admin::BackupRequest {})
            .await?
            .into_inner())
    }
}

/// The kind of a snapshot as containerd names it (`active`, `view`, `committed`).
pub fn kind_name(kind: i32) -> &'static str {
    match Kind::try_from(kind) {
        Ok(Kind::Active) => "active",
        Ok(Kind::View) => "view",
        Ok(Kind::Committed) => "committed",
        _ => "unknown",
    }
}

/// The kind of a device as the admin API names it.
pub fn device_kind_name(kind: i32) -> &'static str {
    match admin::DeviceKind::try_from(kind) {
        Ok(admin::DeviceKind::Base) => "base",
        Ok(admin::DeviceKind::Committed) => "committed",
        Ok(admin::DeviceKind::Active) => "active",
        Ok(admin::DeviceKind::View) => "view",
        _ => "unknown",
    }
}

/// The state of a device as the admin API names it.
pub fn device_state_name(state: i32) -> &'static str {
    match admin::DeviceState::try_from(state) {
        Ok(admin::DeviceState::Creating) => "creating",
        Ok(admin::DeviceState::Ready) => "ready",
        Ok(admin::DeviceState::Deleting) => "deleting",
        _ => "unknown",
    }
}
