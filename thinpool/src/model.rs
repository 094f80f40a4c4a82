//! The engine's vocabulary: pool settings, device records, status and mount specs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{DeviceName, ThinId};
use crate::units::{Bytes, DataBlocks};

/// Which storage mechanism serves thin devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The kernel's dm-thin target over loop devices.
    Dm,
    /// Reflinked sparse files in an XFS on a loop device (for hosts without dm-thin).
    Reflink,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Dm => "dm",
            BackendKind::Reflink => "reflink",
        })
    }
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dm" => Ok(BackendKind::Dm),
            "reflink" => Ok(BackendKind::Reflink),
            _ => Err(Error::InvalidArgument(format!(
                "backend {s:?}: expected dm or reflink"
            ))),
        }
    }
}

/// The filesystem made on the base device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        })
    }
}

impl FromStr for FsType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            _ => Err(Error::InvalidArgument(format!(
                "filesystem {s:?}: expected ext4 or xfs"
            ))),
        }
    }
}

/// What the caller asks for when creating or opening a pool. `None` means "the default" when
/// creating and "whatever the pool has" when opening; a `Some` that differs from the pool on
/// disk makes open fail with [`Error::SettingConflict`] naming the setting.
#[derive(Clone, Debug, Default)]
pub struct PoolSpec {
    /// Directory holding the pool files and the metadata store. Required.
    pub root: PathBuf,
    pub backend: Option<BackendKind>,
    pub data_size: Option<Bytes>,
    pub metadata_size: Option<Bytes>,
    pub block_size: Option<Bytes>,
    pub base_size: Option<Bytes>,
    pub fs: Option<FsType>,
    pub mkfs_options: Option<Vec<String>>,
    pub mount_options: Option<Vec<String>>,
    /// dm only: fail writes at once when the pool is full instead of queueing them.
    pub error_if_no_space: Option<bool>,
}

/// The settings a pool was created with, as recorded in its metadata store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSettings {
    pub backend: BackendKind,
    pub data_size: Bytes,
    pub metadata_size: Bytes,
    pub block_size: Bytes,
    pub base_size: Bytes,
    pub fs: FsType,
    pub mkfs_options: Vec<String>,
    pub mount_options: Vec<String>,
    pub error_if_no_space: bool,
    /// Short random tag that prefixes the pool's kernel object names, so two pools on one host
    /// never collide and our objects are recognisable after a crash.
    pub tag: String,
}

impl PoolSettings {
    pub const DEFAULT_DATA_SIZE: Bytes = Bytes::gib(100);
    pub const DEFAULT_METADATA_SIZE: Bytes = Bytes::gib(2);
    pub const DEFAULT_BLOCK_SIZE: Bytes = Bytes::kib(64);
    pub const DEFAULT_BASE_SIZE: Bytes = Bytes::gib(10);

    /// Default mkfs options for a filesystem. ext4's inode tables and journal are written at
    /// mkfs time, once, on the base device: with lazy init every snapshot's first mount would
    /// write them again, into its own blocks. No discard at mkfs: the thin device is fresh.
    pub fn default_mkfs_options(fs: FsType) -> Vec<String> {
        match fs {
            FsType::Ext4 => vec![
                "-E".into(),
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0".into(),
            ],
            FsType::Xfs => vec!["-K".into()],
        }
    }

    /// The low water mark, in data blocks, for a pool of `total` blocks: the kernel raises one
    /// dm event when free blocks fall below it. We put it at 20% free (80% used): the same
    /// point at which our alerting rule warns and LVM's dmeventd starts logging, and well
    /// above the 10% free-space guard, so an autoextender gets the event before Prepare starts
    /// failing. It is recomputed whenever the pool grows.
    pub fn low_water_mark(total: DataBlocks) -> DataBlocks {
        DataBlocks(total.0 / 5)
    }
}

/// The role of a thin device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The formatted device every parentless snapshot starts from. Never handed out.
    Base,
    /// A read-only image layer; the only kind that may be a parent.
    Committed,
    /// A writable snapshot (a container's rootfs or a layer being unpacked).
    Active,
    /// A read-only snapshot.
    View,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Base => "base",
            DeviceKind::Committed => "committed",
            DeviceKind::Active => "active",
            DeviceKind::View => "view",
        })
    }
}

/// Where a device is in its life. `Creating` and `Deleting` are durable intents: a record in
/// either state at open time is a half-done operation that reconcile rolls back or finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Creating,
    Ready,
    Deleting,
}

/// Our record of one thin device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: ThinId,
    /// `None` only for the base device and for records being deleted (the name is released
    /// as soon as the delete is recorded, so a client may reuse it at once).
    pub name: Option<DeviceName>,
    pub kind: DeviceKind,
    pub parent: Option<ThinId>,
    pub size: Bytes,
    pub state: DeviceState,
    /// Desired state: reconcile activates the device when true and deactivates it when false.
    pub active: bool,
    pub labels: BTreeMap<String, String>,
    /// Unix time in nanoseconds.
    pub created_ns: u64,
    pub updated_ns: u64,
}

/// What an exec component needs to mount a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// The block device node, `/dev/dm-N` on dm and `/dev/loopN` on reflink.
    pub source: PathBuf,
    pub fs_type: FsType,
    pub options: Vec<String>,
}

/// The pool's operating mode, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    Rw,
    Ro,
    OutOfDataSpace,
    Fail,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Rw => "rw",
            PoolMode::Ro => "ro",
            PoolMode::OutOfDataSpace => "out_of_data_space",
            PoolMode::Fail => "fail",
        })
    }
}

/// A backend's view of the pool's space and health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub transaction_id: u64,
    pub data_used: Bytes,
    pub data_total: Bytes,
    pub metadata_used: Bytes,
    pub metadata_total: Bytes,
    pub mode: PoolMode,
    pub needs_check: bool,
    pub error_if_no_space: bool,
    pub low_water_mark: Bytes,
}

/// The pool's status as the engine reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub backend: BackendKind,
    #[serde(flatten)]
    pub kernel: BackendStatus,
    pub block_size: Bytes,
    pub base_size: Bytes,
    pub fs: FsType,
    pub devices: usize,
    pub data_file: PathBuf,
    pub metadata_file: PathBuf,
}

/// Result of comparing our records with the kernel's (or the backend's) own metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Ids the backend has but we have no record of: space nobody will ever free.
    pub leaked: Vec<ThinId>,
    /// Ids we have records of but the backend lacks: devices whose data is gone.
    pub missing: Vec<ThinId>,
    /// Records left in `Creating` or `Deleting`: operations not yet reconciled.
    pub unfinished: Vec<ThinId>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.leaked.is_empty() && self.missing.is_empty() && self.unfinished.is_empty()
    }
}
