//! The one trait through which the engine reaches storage, and its implementations.
//!
//! A backend knows thin ids, sizes and device nodes. It knows nothing of names, kinds,
//! parents or labels: those live in the metadata store, which the engine keeps.
//!
//! Every method blocks (ioctls, file I/O, child processes). The engine calls them only from
//! `spawn_blocking` threads, never on the async runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::ids::ThinId;
use crate::model::{BackendKind, BackendStatus, PoolSettings};
use crate::units::{Bytes, DataBlocks};

pub mod dm;
pub mod reflink;
pub mod sim;

/// A pool's storage: thin devices with copy-on-write snapshots.
///
/// Mutating calls (`create_thin`, `create_snapshot`, `delete`) change persistent state and
/// each returns the backend's new *transaction id*, a counter it stores durably together with
/// the change (dm: the kernel's `set_transaction_id`). The engine records it, and on open a
/// transaction id behind the engine's record means the pool's metadata lost changes.
///
/// Idempotence, which reconcile relies on: `delete` of an absent id, `activate` of an active
/// device and `deactivate` of an inactive one all succeed.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Whether the devices hold real filesystems: the engine formats the base device and
    /// runs filesystem steps (UUID checks, grows, journal replays) only then. False on the
    /// simulated backend, whose devices are plain files nothing mounts.
    fn holds_filesystems(&self) -> bool {
        true
    }

    /// Space, mode and transaction id of the pool.
    fn status(&self) -> Result<BackendStatus>;

    /// Creates an empty thin device. Precondition: `id` is unused.
    fn create_thin(&self, id: ThinId, size: Bytes) -> Result<u64>;

    /// Creates `id` as a copy-on-write snapshot of `origin`, `size` long (at least the
    /// origin's size). An active origin is briefly suspended. Precondition: `id` is unused.
    fn create_snapshot(&self, id: ThinId, origin: ThinId, size: Bytes) -> Result<u64>;

    /// Deletes a device and frees its space. Precondition: the device is not active.
    /// Deleting an id that does not exist succeeds.
    fn delete(&self, id: ThinId) -> Result<u64>;

    /// Makes the device available as a block device node and returns the node's path.
    fn activate(&self, id: ThinId, size: Bytes, read_only: bool) -> Result<PathBuf>;

    /// Removes the device node. The data stays. Fails with `FailedPrecondition` while the
    /// device is mounted or open.
    fn deactivate(&self, id: ThinId) -> Result<()>;

    /// Makes what was written to the device so far durable and visible to snapshots of it:
    /// a filesystem mounted on it is flushed and frozen for a moment, so its on-disk state
    /// is clean (a read-only mount of a snapshot needs no journal replay). An inactive
    /// device succeeds at once.
    fn flush(&self, id: ThinId) -> Result<()>;

    /// Deactivates the device now if nobody has it open, or else at its last close (dm:
    /// deferred remove; reflink: loop autoclear). Whoever has it open keeps using it.
    /// An inactive device succeeds.
    fn deactivate_deferred(&self, id: ThinId) -> Result<()>;

    /// The devices of this pool that are active now, with their nodes.
    fn active_devices(&self) -> Result<BTreeMap<ThinId, PathBuf>>;

    /// Bytes the device maps (dm: allocated data blocks; reflink: allocated extents not
    /// shared with other devices). The device may be active or not; it is never activated
    /// to read this (CRI asks for usage every 10 s).
    fn mapped_bytes(&self, id: ThinId, size: Bytes) -> Result<Bytes>;

    /// Bytes of `id` that `parent` (its origin) does not hold at the same place: what the
    /// device added since it was snapshotted, whatever else shares its blocks. Never
    /// activates. The default is the difference of [`Backend::mapped_bytes`], which is what
    /// dm can tell without walking both devices' mappings (a rewritten shared block counts
    /// for nothing); reflink compares the two files' extents.
    fn added_bytes(&self, id: ThinId, parent: ThinId) -> Result<Bytes> {
        // The sizes are not used by either backend's mapped_bytes.
        let mine = self.mapped_bytes(id, Bytes(0))?;
        let theirs = self.mapped_bytes(parent, Bytes(0))?;
        Ok(Bytes(mine.0.saturating_sub(theirs.0)))
    }

    /// [`Backend::mapped_bytes`] of many devices (`(id, size)`) at once, for metrics; ids
    /// the backend does not have (removed meanwhile) are left out. The default asks device
    /// by device; dm overrides it because it would activate every inactive device.
    fn mapped_bytes_many(&self, ids: &[(ThinId, Bytes)]) -> Result<BTreeMap<ThinId, Bytes>> {
        let mut out = BTreeMap::new();
        for &(id, size) in ids {
            match self.mapped_bytes(id, size) {
                Ok(b) => {
                    out.insert(id, b);
                }
                Err(crate::Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The ids the backend's own metadata holds, read independently of our records (dm:
    /// `thin_ls` on a metadata snapshot). For the audit.
    fn list_ids(&self) -> Result<BTreeSet<ThinId>>;

    /// Grows the data file to `size` and makes the pool use it, online: active and mounted
    /// devices keep working. `low_water_mark` is the pool's low water mark for the new size.
    ///
    /// Preconditions: `size` is at least the pool's data size and a multiple of its block
    /// size; the engine has checked that the host filesystem has room (or was told to
    /// overcommit) and that the pool is healthy.
    ///
    /// Idempotent, and never shrinks: the file is extended first (the durable step: at the
    /// next open the backend assembles the pool from the file's size), then the loop device
    /// and the kernel follow. Each step is harmless when done already, so the engine repeats
    /// the call to finish a grow that a crash interrupted.
    fn grow_data(&self, size: Bytes, low_water_mark: DataBlocks) -> Result<()>;

    /// Grows the metadata file to `size` and makes the pool use it, online, as
    /// [`Backend::grow_data`] does. Preconditions as there, and [`Backend::metadata_grows`].
    fn grow_metadata(&self, size: Bytes) -> Result<()>;

    /// Whether the metadata is a space that fills up and can be grown (dm: the thin-pool
    /// metadata device). False on reflink: its metadata file is the XFS log, which is
    /// circular (it never fills up) and cannot grow online.
    fn metadata_grows(&self) -> bool;

    /// Kernel events of this pool, for the space monitor; `None` when the backend has none
    /// (reflink) or the kernel cannot deliver them (dm before ioctl version 4.37).
    fn events(&self) -> Result<Option<Box<dyn PoolEvents>>>;

    /// Writes the backend's own metadata, as one consistent cut, to `out` for a backup, and
    /// returns whether it had any: dm writes the kernel's metadata as XML (`thin_dump` of a
    /// metadata snapshot, released on every path); reflink and sim keep nothing beyond the
    /// files themselves and return false.
    fn dump_metadata(&self, _out: &Path) -> Result<bool> {
        Ok(false)
    }

    /// Tears down everything this process set up (devices, pool, loop devices, mounts), as a
    /// host reboot would. Persistent data is kept. Used on shutdown of tests and the daemon's
    /// `--teardown-on-exit`; a plain daemon exit keeps devices active for running containers.
    fn teardown(&self) -> Result<()>;
}

/// A pool's kernel events: a file descriptor that polls readable after an event, and a way to
/// tell whether one concerned this pool. dm: a device-mapper context armed for events (they
/// are host-wide: any device's event wakes it) and the pool's event counter.
pub trait PoolEvents: Send + Sync {
    /// The descriptor to poll for readability.
    fn fd(&self) -> BorrowedFd<'_>;

    /// Re-arms the descriptor, then returns how many events the pool had since the last
    /// call. Call it each time the descriptor polls readable: it stays readable until
    /// re-armed. Blocks (ioctls).
    fn take(&self) -> Result<u32>;
}

/// Paths of a pool's files under its root.
#[derive(Clone, Debug)]
pub struct PoolPaths {
    pub root: PathBuf,
    pub data_file: PathBuf,
    pub metadata_file: PathBuf,
    pub store_file: PathBuf,
    pub lock_file: PathBuf,
}

impl PoolPaths {
    pub fn new(root: &Path) -> PoolPaths {
        PoolPaths {
            root: root.to_path_buf(),
            data_file: root.join("data"),
            metadata_file: root.join("metadata"),
            store_file: root.join("pool.redb"),
            lock_file: root.join("lock"),
        }
    }
}

/// Makes a fresh backend for a new pool: creates the sparse files and formats what the
/// backend needs. Precondition: no pool files exist at `paths`.
pub fn create(paths: &PoolPaths, settings: &PoolSettings) -> Result<Box<dyn Backend>> {
    match settings.backend {
        BackendKind::Dm => Ok(Box::new(dm::DmBackend::create(paths, settings)?)),
        BackendKind::Reflink => Ok(Box::new(reflink::ReflinkBackend::create(paths, settings)?)),
        BackendKind::Sim => Ok(Box::new(sim::SimBackend::create(paths, settings)?)),
    }
}

/// Reassembles an existing pool's backend after a daemon restart or a host reboot. Never
/// re-initialises existing metadata.
pub fn open(paths: &PoolPaths, settings: &PoolSettings) -> Result<Box<dyn Backend>> {
    match settings.backend {
        BackendKind::Dm => Ok(Box::new(dm::DmBackend::open(paths, settings)?)),
        BackendKind::Reflink => Ok(Box::new(reflink::ReflinkBackend::open(paths, settings)?)),
        BackendKind::Sim => Ok(Box::new(sim::SimBackend::open(paths, settings)?)),
    }
}

/// Which backend `--backend auto` would pick on this host, and why. Never the simulated
/// backend, which holds no real filesystems.
pub fn detect() -> (BackendKind, String) {
    match dm::DmBackend::probe() {
        Ok(version) => (
            BackendKind::Dm,
            format!("device-mapper {version} with the thin-pool target is available"),
        ),
        Err(why) => (
            BackendKind::Reflink,
            format!("dm-thin is not usable here ({why}); using reflinked files on XFS"),
        ),
    }
}

/// Removes whatever kernel objects (devices, mounts, loop devices) a pool whose creation was
/// interrupted may have left, so that it can be created again.
pub fn scrub(paths: &PoolPaths, settings: &PoolSettings) -> Result<()> {
    match settings.backend {
        BackendKind::Dm => dm::DmBackend::scrub(paths, settings),
        BackendKind::Reflink => reflink::ReflinkBackend::scrub(paths, settings),
        BackendKind::Sim => sim::SimBackend::scrub(paths, settings),
    }
}
