//! The engine's vocabulary: pool settings, device records, status and mount specs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{DeviceName, ThinId};
use crate::units::{Bytes, DataBlocks, Percent};

/// Which storage mechanism serves thin devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The kernel's dm-thin target over loop devices.
    Dm,
    /// Reflinked sparse files in an XFS on a loop device (for hosts without dm-thin).
    Reflink,
    /// Simulated, for tests: plain sparse files, no kernel objects and no filesystems
    /// (`backend::sim`). Never picked by `auto`.
    Sim,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Dm => "dm",
            BackendKind::Reflink => "reflink",
            BackendKind::Sim => "sim",
        })
    }
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dm" => Ok(BackendKind::Dm),
            "reflink" => Ok(BackendKind::Reflink),
            "sim" => Ok(BackendKind::Sim),
            _ => Err(Error::InvalidArgument(format!(
                "backend {s:?}: expected dm, reflink or sim"
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
    /// Refuse snapshots below this much free space. May change on an existing pool.
    pub min_free_space: Option<Percent>,
    /// Automatic growth of the data file. May change on an existing pool.
    pub autoextend_data: Option<AutoextendPolicy>,
    /// Automatic growth of the metadata file (dm only). May change on an existing pool.
    pub autoextend_metadata: Option<AutoextendPolicy>,
    /// Create the pool even if its files could come to take more than the host filesystem
    /// has free (the data file is sparse). Without it, creation is refused then.
    pub overcommit_host: bool,
    /// dm: when the cold check (`thin_check` before the pool is assembled) finds damage,
    /// repair the metadata as `thinctl pool repair` would, instead of refusing to open.
    pub auto_repair: bool,
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
    /// Snapshots (Prepare and View) are refused while free data space, or free metadata space
    /// on dm, is below this share of the pool (Docker's `dm.min_free_space`): a new container
    /// must not start on a pool about to fill, while running ones keep the rest. 0 turns the
    /// guard off. (Pools made before this setting existed get the default.)
    #[serde(default = "PoolSettings::default_min_free_space")]
    pub min_free_space: Percent,
    #[serde(default)]
    pub autoextend_data: AutoextendPolicy,
    /// Ignored on reflink, whose metadata file (the XFS log) cannot grow online.
    #[serde(default)]
    pub autoextend_metadata: AutoextendPolicy,
    /// Short random tag that prefixes the pool's kernel object names, so two pools on one host
    /// never collide and our objects are recognisable after a crash.
    pub tag: String,
}

impl PoolSettings {
    pub const DEFAULT_DATA_SIZE: Bytes = Bytes::gib(100);
    pub const DEFAULT_METADATA_SIZE: Bytes = Bytes::gib(2);
    pub const DEFAULT_BLOCK_SIZE: Bytes = Bytes::kib(64);
    pub const DEFAULT_BASE_SIZE: Bytes = Bytes::gib(10);
    pub const DEFAULT_MIN_FREE_SPACE: Percent = Percent(10);
    /// dm-thin uses at most this much metadata (255 * (2^14 - 64) blocks of 4 KiB, about
    /// 15.9 GiB); the kernel ignores the rest of a larger device.
    pub const MAX_METADATA_SIZE: Bytes = Bytes(255 * ((1 << 14) - 64) * 4096);

    fn default_min_free_space() -> Percent {
        Self::DEFAULT_MIN_FREE_SPACE
    }

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

    /// The pool's low water mark for a pool of `total` data blocks; see
    /// [`AutoextendPolicy::low_water_mark`].
    pub fn low_water_mark(&self, total: DataBlocks) -> DataBlocks {
        self.autoextend_data.low_water_mark(total)
    }
}

/// When and how far the space monitor grows the pool's data or metadata by itself: LVM's
/// `thin_pool_autoextend_threshold` and `thin_pool_autoextend_percent`, plus a ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoextendPolicy {
    /// Grow when usage exceeds this share of the size. 100 turns autoextend off (LVM's
    /// default); otherwise 50 to 99 (LVM's minimum is 50: lower values would grow a
    /// half-empty pool).
    pub threshold: Percent,
    /// Grow by this share of the current size, or by more when that is not enough to get
    /// usage back under the threshold in one step (as LVM does). 1 to 1000.
    pub percent: Percent,
    /// Never grow beyond this size. `None`: only the host's free space limits growth.
    pub max: Option<Bytes>,
}

impl Default for AutoextendPolicy {
    fn default() -> Self {
        AutoextendPolicy::OFF
    }
}

impl AutoextendPolicy {
    /// LVM's defaults: off, and 20% steps once turned on.
    pub const OFF: AutoextendPolicy = AutoextendPolicy {
        threshold: Percent(100),
        percent: Percent(20),
        max: None,
    };

    pub fn enabled(&self) -> bool {
        self.threshold.0 < 100
    }

    /// Checks the ranges documented on the fields; `what` names the policy in the error.
    pub fn validate(&self, what: &str) -> Result<()> {
        if !(50..=100).contains(&self.threshold.0) {
            return Err(Error::InvalidArgument(format!(
                "{what} autoextend threshold {}: must be 50% to 99%, or 100% for off",
                self.threshold
            )));
        }
        if !(1..=1000).contains(&self.percent.0) {
            return Err(Error::InvalidArgument(format!(
                "{what} autoextend percent {}: must be 1% to 1000%",
                self.percent
            )));
        }
        if self.max == Some(Bytes(0)) {
            return Err(Error::InvalidArgument(format!(
                "{what} autoextend max 0: leave it unset for no limit"
            )));
        }
        Ok(())
    }

    /// The low water mark, in data blocks, for a pool of `total` blocks: the kernel raises one
    /// dm event when free blocks fall below it.
    ///
    /// With autoextend on it is LVM's `total * (100 - threshold) / 100`, so the event comes
    /// just as usage crosses the threshold and the monitor reacts at once. With autoextend
    /// off it is 20% free (80% used): the point at which our alerting rule warns and LVM's
    /// dmeventd starts logging, and above the default 10% free-space guard. It is recomputed
    /// whenever the pool grows.
    pub fn low_water_mark(&self, total: DataBlocks) -> DataBlocks {
        if self.enabled() {
            DataBlocks((total.0 as u128 * (100 - self.threshold.0) as u128 / 100) as u64)
        } else {
            DataBlocks(total.0 / 5)
        }
    }

    /// Whether autoextend is on and `used` of `total` is above the threshold.
    pub fn exceeded(&self, used: Bytes, total: Bytes) -> bool {
        self.enabled()
            && total.0 > 0
            && used.0 as u128 * 100 > self.threshold.0 as u128 * total.0 as u128
    }

    /// The size to grow to when `used` of `total` is above the threshold, as a multiple of
    /// `align` and at most `max`; `None` when usage is at or below the threshold, autoextend
    /// is off, or the size is at its ceiling already.
    ///
    /// The step is LVM's (`lv_extend_policy_calculate_percent`): `percent`, or
    /// `ceil(usage / threshold * 100) - 100` percent if that is more, so that one step brings
    /// usage back under the threshold.
    pub fn target(&self, used: Bytes, total: Bytes, align: Bytes) -> Option<Bytes> {
        if !self.exceeded(used, total) {
            return None;
        }
        let (used, total_, threshold) = (used.0 as u128, total.0 as u128, self.threshold.0 as u128);
        // ceil(used / total * 100 / threshold * 100) - 100
        let needed = (used * 100 * 100).div_ceil(total_ * threshold) - 100;
        let step = needed.max(self.percent.0 as u128);
        let grown = total_ + (total_ * step).div_ceil(100);
        let grown = Bytes(grown.min(u64::MAX as u128) as u64).round_up(align);
        let new = match self.max {
            Some(max) => grown.min(max.round_down(align)),
            None => grown,
        };
        (new > total).then_some(new)
    }
}

impl fmt::Display for AutoextendPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.enabled() {
            return f.write_str("off");
        }
        write!(f, "above {} grow by {}", self.threshold, self.percent)?;
        match self.max {
            Some(max) => write!(f, " up to {max}"),
            None => Ok(()),
        }
    }
}

/// A new size for the pool's data or metadata: absolute (`1T`) or relative (`+100G`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SizeChange {
    /// Grow to this size.
    To(Bytes),
    /// Grow by this much.
    By(Bytes),
}

impl SizeChange {
    /// The size this change makes of `current`.
    pub fn apply(self, current: Bytes) -> Result<Bytes> {
        match self {
            SizeChange::To(b) => Ok(b),
            SizeChange::By(b) => current.0.checked_add(b.0).map(Bytes).ok_or_else(|| {
                Error::InvalidArgument(format!("{current} + {b} does not fit in 64 bits"))
            }),
        }
    }
}

impl FromStr for SizeChange {
    type Err = Error;

    /// `+SIZE` grows by SIZE, `SIZE` grows to SIZE; SIZE as [`Bytes`] parses it (`512M`).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let (rel, num) = match t.strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let b: Bytes = num
            .parse()
            .map_err(|e: crate::units::ParseSizeError| Error::InvalidArgument(e.to_string()))?;
        Ok(if rel {
            SizeChange::By(b)
        } else {
            SizeChange::To(b)
        })
    }
}

impl fmt::Display for SizeChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeChange::To(b) => write!(f, "{b}"),
            SizeChange::By(b) => write!(f, "+{b}"),
        }
    }
}

/// What [`crate::Pool::grow`] does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrowRequest {
    pub data: Option<SizeChange>,
    /// dm only: the reflink backend's metadata (the XFS log) cannot grow online.
    pub metadata: Option<SizeChange>,
    /// Grow even when the host filesystem has less free space than the files could take.
    /// The files are sparse, so this is overcommitting the host as thin devices overcommit
    /// the pool.
    pub force: bool,
}

/// The sizes of a pool's data and metadata files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSize {
    pub data: Bytes,
    pub metadata: Bytes,
}

/// The result of a grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrowOutcome {
    pub before: PoolSize,
    pub after: PoolSize,
}

/// Counts of the engine's space events since the pool was opened, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCounters {
    /// Grows that completed: manual ones and autoextensions.
    pub grows: u64,
    /// Of those, the autoextensions.
    pub autoextends: u64,
    /// Autoextensions that were due but did not happen: the size is at the policy's max,
    /// the host filesystem has no room, or the grow failed.
    pub autoextend_failures: u64,
    /// Snapshots refused by the `min_free_space` guard.
    pub guard_rejections: u64,
    /// Kernel events on the pool the monitor received (dm: low water mark, mode changes,
    /// table reloads). Always 0 on reflink, which has no events.
    pub pool_events: u64,
    /// Changes of the pool's mode seen (rw, out_of_data_space, ro, fail).
    pub mode_changes: u64,
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

impl DeviceKind {
    /// Every kind, for tables that list each one (metrics).
    pub const ALL: [DeviceKind; 4] = [
        DeviceKind::Base,
        DeviceKind::Committed,
        DeviceKind::Active,
        DeviceKind::View,
    ];

    /// The kind's name: the one hand-written kind-to-string mapping. containerd's filters
    /// (`kind==active`), metrics labels, logs and the store's serde form (checked by a
    /// test) all use these.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Base => "base",
            DeviceKind::Committed => "committed",
            DeviceKind::Active => "active",
            DeviceKind::View => "view",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    /// What the device adds over its parent (containerd's Usage), measured at commit: a
    /// committed device no longer changes, and on reflink its own count would fall once it
    /// has children (shared extents count for nobody). `None` before commit, and for
    /// records committed by a build that did not measure it (the engine then measures it
    /// when asked, see [`crate::Pool::snapshot_usage`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Bytes>,
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
    /// Devices open could not reconcile or activate; see [`QuarantinedDevice`].
    #[serde(default)]
    pub quarantined: Vec<QuarantinedDevice>,
}

/// A device that could not be reconciled or activated (at open, or when a failed create
/// could not be rolled back). It is recorded durably and skipped, so that the rest of the
/// pool serves; [`crate::Pool::reclaim`] retries it, and it leaves quarantine when a retry
/// (or a later open's reconcile) succeeds, or when the device is removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedDevice {
    pub id: ThinId,
    /// What failed, with the error.
    pub reason: String,
    /// Unix time in nanoseconds of the first failure.
    pub since_ns: u64,
}

/// Result of comparing our records with the kernel's (or the backend's) own metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Ids the backend has but we have no record of: space nobody will ever free.
    pub leaked: Vec<ThinId>,
    /// Ids we have records of but the backend lacks: devices whose data is gone.
    pub missing: Vec<ThinId>,
    /// Records left in `Creating`: creates that were neither finished nor rolled back.
    pub unfinished: Vec<ThinId>,
    /// Records in `Deleting`: removals recorded whose kernel delete is still to come
    /// (deferred, or the device is still in use); reclaim finishes them. Not a problem.
    #[serde(default)]
    pub pending: Vec<ThinId>,
    /// Devices in quarantine (see [`QuarantinedDevice`]).
    #[serde(default)]
    pub quarantined: Vec<ThinId>,
    /// Broken invariants of the metadata store (duplicate names, dangling parents, ...).
    #[serde(default)]
    pub store_problems: Vec<String>,
}

impl AuditReport {
    /// Nothing leaked, missing, unfinished, quarantined or broken; pending removals are fine.
    pub fn is_clean(&self) -> bool {
        self.leaked.is_empty()
            && self.missing.is_empty()
            && self.unfinished.is_empty()
            && self.quarantined.is_empty()
            && self.store_problems.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: Bytes = Bytes::kib(64);

    fn policy(threshold: u32, percent: u32, max: Option<Bytes>) -> AutoextendPolicy {
        AutoextendPolicy {
            threshold: Percent(threshold),
            percent: Percent(percent),
            max,
        }
    }

    /// The store's serde names and `as_str` (filters, metrics) are the same strings.
    #[test]
    fn device_kind_names_agree_with_serde() {
        for k in DeviceKind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()), "{k:?}");
            assert_eq!(k.to_string(), k.as_str());
        }
    }

    #[test]
    fn autoextend_waits_for_the_threshold() {
        let p = policy(70, 20, None);
        let total = Bytes::gib(1);
        assert_eq!(p.target(Percent(70).of(total), total, BS), None);
        assert!(!p.exceeded(Percent(70).of(total), total));
        assert!(p.exceeded(Bytes(Percent(70).of(total).0 + 1), total));
        assert_eq!(AutoextendPolicy::OFF.target(total, total, BS), None, "off");
    }

    #[test]
    fn autoextend_steps_by_percent_or_enough_to_get_under() {
        let total = Bytes::gib(1);
        // 75% used: 20% is more than the 8% needed.
        let new = policy(70, 20, None)
            .target(Percent(75).of(total), total, BS)
            .unwrap();
        let want = Bytes(total.0 + Percent(20).of(total).0);
        assert!(
            new >= want && new.0 - want.0 < BS.0 && new.0.is_multiple_of(BS.0),
            "{new:?}"
        );
        // 95% used: ceil(95 / 70 * 100) - 100 = 36% gets usage back under 70% in one step.
        let used = Percent(95).of(total);
        let new = policy(70, 20, None).target(used, total, BS).unwrap();
        assert!(new >= Bytes(total.0 + Percent(36).of(total).0), "{new:?}");
        assert!(
            !policy(70, 20, None).exceeded(used, new),
            "under the threshold after"
        );
    }

    #[test]
    fn autoextend_stops_at_max() {
        let total = Bytes::gib(1);
        let used = Percent(90).of(total);
        let p = policy(70, 50, Some(Bytes::mib(1100)));
        assert_eq!(p.target(used, total, BS), Some(Bytes::mib(1100)));
        let p = policy(70, 50, Some(total));
        assert_eq!(p.target(used, total, BS), None, "at max");
        assert!(p.exceeded(used, total));
    }

    #[test]
    fn low_water_mark_follows_the_threshold() {
        let total = DataBlocks(1000);
        assert_eq!(policy(70, 20, None).low_water_mark(total), DataBlocks(300));
        assert_eq!(AutoextendPolicy::OFF.low_water_mark(total), DataBlocks(200));
    }

    #[test]
    fn autoextend_policies_are_validated() {
        assert!(policy(70, 20, None).validate("data").is_ok());
        assert!(AutoextendPolicy::OFF.validate("data").is_ok());
        for bad in [
            policy(30, 20, None),
            policy(101, 20, None),
            policy(70, 0, None),
            policy(70, 20, Some(Bytes(0))),
        ] {
            let e = bad.validate("data").unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        }
    }

    #[test]
    fn size_changes_parse_and_apply() {
        let by: SizeChange = "+512M".parse().unwrap();
        assert_eq!(by, SizeChange::By(Bytes::mib(512)));
        assert_eq!(by.apply(Bytes::mib(512)).unwrap(), Bytes::gib(1));
        let to: SizeChange = "2G".parse().unwrap();
        assert_eq!(to, SizeChange::To(Bytes::gib(2)));
        assert_eq!(to.apply(Bytes::gib(1)).unwrap(), Bytes::gib(2));
        assert_eq!(by.to_string(), "+512 MiB");
        for bad in ["+", "", "+-1G", "abc"] {
            assert!(bad.parse::<SizeChange>().is_err(), "{bad:?} parsed");
        }
        assert!(SizeChange::By(Bytes(u64::MAX)).apply(Bytes(1)).is_err());
    }
}
