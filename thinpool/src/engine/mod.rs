//! The engine: one pool, its records, and the crash-safe sequencing of every change.
//!
//! Every state change follows one protocol:
//! 1. record the intent durably in the store (a record in `Creating` or `Deleting`);
//! 2. change the backend (kernel), which bumps its transaction id with the change;
//! 3. record the outcome and the new transaction id durably.
//!
//! A crash between 1 and 3 leaves a record in an intermediate state, and [`Pool::open`]
//! reconciles it: half-done creates are rolled back, half-done deletes are finished, and the
//! devices that should be active are activated again.
//!
//! A device that cannot be reconciled or activated at open is *quarantined* (recorded
//! durably, skipped, reported by status, metrics and audit) rather than failing the open:
//! one bad device must not take every container's storage down. [`Pool::reclaim`] retries
//! quarantined devices; a successful retry, a later open that reconciles the device, or
//! its removal (recorded, even deferred) takes it out of quarantine.
//!
//! Concurrency: the store admits one writer at a time, but its transactions are short and
//! hold no kernel call. Kernel calls hold only the lock of the device they touch (a snapshot
//! also holds its origin's), so operations on different devices run in parallel. Grows
//! (manual and automatic) are serialised with each other by one lock that nothing else takes.
//!
//! Space: a grow extends the pool files online ([`Pool::grow`]); the `min_free_space` guard
//! refuses new snapshots on a nearly full pool; [`Pool::autoextend_check`], which
//! [`crate::run_autoextend`] calls on kernel events and periodically, grows the pool by its
//! autoextend policy.
//!
//! Layout: this module holds [`Pool`], its open/create and take-down; `recovery` the
//! reconcile at open and quarantine; `create` snapshot and commit; `devices` activate,
//! deactivate, remove and reclaim; `space` grows, the guard and autoextension; `queries`
//! the read-only calls; `settings` spec checks and grow plans; `locks` the per-device locks.

mod create;
mod devices;
mod locks;
mod maintenance;
mod queries;
mod recovery;
mod settings;
mod space;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::backend::{self, Backend, PoolEvents, PoolPaths};
use crate::blockdev::node_in_use;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil;
use crate::ids::{DeviceName, ThinId};
use crate::loopback;
use crate::model::{BackendKind, DeviceKind, DeviceRecord, DeviceState, PoolSettings, PoolSpec};
use crate::store::{BaseDevice, PoolState, Store};
use crate::timing::OpTimings;
use crate::units::Bytes;

use locks::{DeviceLocks, lock_root};
use settings::{check_room_for_create, check_space_settings, check_spec};
use space::{Counters, SpaceState};

pub use maintenance::{BackupReport, LostDevice, MaintenanceReport, backups_dir, repair, restore};
pub use settings::check_spec_settings;
pub(crate) use settings::settings_from_spec;

/// What [`Pool::snapshot`] makes.
#[derive(Clone, Debug)]
pub struct SnapshotRequest {
    pub name: DeviceName,
    /// `None`: a snapshot of the base device.
    pub parent: Option<DeviceName>,
    /// `Active` (writable) or `View` (read-only). Committed devices come from [`Pool::commit`].
    pub kind: DeviceKind,
    /// `None`: the parent's size. Otherwise at least the parent's size; the filesystem is
    /// grown to fill it.
    pub size: Option<Bytes>,
    pub labels: BTreeMap<String, String>,
    /// Also activate the new device, recorded in the same commit as its creation (one fsync
    /// fewer than `snapshot` then `activate`). containerd's Prepare and View want this.
    pub activate: bool,
}

/// How [`Pool::remove`] frees the device.
#[derive(Clone, Copy, Debug, Default)]
pub struct RemoveOptions {
    /// Discard the device's blocks before deleting it.
    pub discard: bool,
    /// Only record the removal (the name is free at once); the kernel delete is left to
    /// [`Pool::reclaim`]. This makes removal cheap for garbage collectors.
    pub deferred: bool,
}

/// A thin pool, opened. All methods block; see [`crate::AsyncPool`] for the async facade.
pub struct Pool {
    paths: PoolPaths,
    settings: Mutex<PoolSettings>,
    store: Store,
    backend: Box<dyn Backend>,
    locks: DeviceLocks,
    /// Serialises grows (manual and automatic) with each other; nothing else takes it.
    grow_lock: Mutex<()>,
    counters: Counters,
    /// Latency histograms of snapshot, activate, commit, remove and grow.
    timings: OpTimings,
    space: Mutex<SpaceState>,
    /// The pool's kernel events (dm), for the space monitor.
    events: Option<Box<dyn PoolEvents>>,
    /// True once [`Pool::take_down`] took the pool down. The calls that change the backend
    /// (snapshot, commit, activate, deactivate, remove, reclaim, grow) hold it shared, so
    /// none runs during a take-down or after: on reflink, the pool's directory is then an
    /// empty mount point, where a delete of an absent file would "succeed".
    down: parking_lot::RwLock<bool>,
    /// The ids in quarantine, as in the store (which is the durable copy).
    quarantined: Mutex<BTreeSet<ThinId>>,
    /// Makes the audit a consistent cut: operations that create or delete thin ids hold it
    /// shared (recursively: a failed create rolls back under it) from their intent to their
    /// outcome; the audit holds it exclusively while it reads both sides.
    audit_gate: parking_lot::RwLock<()>,
    /// Mapped bytes of devices that no longer change (committed, base), by id: on dm a
    /// snapshot's usage is its mapped bytes minus its parent's, and the parent is inactive,
    /// so this saves a `thin_ls` per call. Filled on demand; an entry goes with its device.
    frozen_mapped: Mutex<HashMap<ThinId, Bytes>>,
    /// Serialises backups (each writes and prunes `<root>/backups`).
    backup_lock: Mutex<()>,
    /// Holds the root's exclusive lock for as long as the pool is open.
    _lock: File,
}

/// What [`Pool::take_down`] did.
#[derive(Clone, Debug, Default)]
pub struct TakeDownReport {
    /// Devices it deactivated.
    pub deactivated: Vec<ThinId>,
    /// Devices in use that stayed active (only with `force`), with their nodes. When there
    /// are any, the pool and its loop devices stayed up under them too.
    pub busy: Vec<(ThinId, PathBuf)>,
    /// Whether the pool itself went down (with its loop devices and, on reflink, the mount).
    pub pool_down: bool,
}

impl Pool {
    /// Opens the pool at `spec.root`, creating it if it does not exist.
    ///
    /// Opening reassembles the backend (after a daemon restart or a host reboot), checks the
    /// settings in `spec` against the pool's, verifies the base filesystem, and reconciles
    /// unfinished operations. It never re-initialises existing metadata.
    pub fn open(spec: &PoolSpec) -> Result<Pool> {
        let paths = PoolPaths::new(&spec.root);
        fsutil::create_private_dir(&paths.root)
            .map_err(|e| Error::io("create pool root", &paths.root, e))?;
        let lock = lock_root(&paths)?;
        Self::open_locked(spec, paths, lock)
    }

    /// [`Pool::open`] with the root's lock already held (offline repair and restore take it
    /// first and keep it until the pool is open, so no daemon can slip in between).
    fn open_locked(spec: &PoolSpec, paths: PoolPaths, lock: File) -> Result<Pool> {
        // Pools made before the modes were set are 0755/0644: tighten them on every open.
        fsutil::make_private(&paths.root)?;
        // Pools made before the metadata file was preallocated: allocate it now, if the host
        // has room (else it stays as it was, and we say so).
        if paths.metadata_file.exists()
            && let Err(e) = loopback::preallocate(&paths.metadata_file)
        {
            warn!(file = %paths.metadata_file.display(), error = %e,
                "the metadata file is sparse: a full host filesystem can fail the pool");
        }

        if paths.store_file.exists() {
            let store = Store::open(&paths.store_file).map_err(store_damaged)?;
            if store.read(|r| r.state()).map_err(store_damaged)? == PoolState::Ready {
                let settings = store.read(|r| r.settings()).map_err(store_damaged)?;
                check_spec(spec, &settings)?;
                // Before anything is assembled: a damaged store is refused with nothing set up.
                store.check_or_fail()?;
                if settings.backend == BackendKind::Dm {
                    drop(store);
                    maintenance::check_cold_metadata(&paths, &settings, spec.auto_repair)?;
                    let store = Store::open(&paths.store_file).map_err(store_damaged)?;
                    return Self::reopen(paths, settings, store, lock, spec);
                }
                return Self::reopen(paths, settings, store, lock, spec);
            }
            // Creation never finished, so no client ever saw this pool: start again. Without
            // settings the store's first commit never happened, and nothing else was made.
            warn!(root = %paths.root.display(), "pool creation was interrupted; creating it again");
            let settings = store.read(|r| r.settings_if_any())?;
            drop(store);
            if let Some(settings) = &settings {
                backend::scrub(&paths, settings)?;
            }
            for f in [&paths.data_file, &paths.metadata_file, &paths.store_file] {
                remove_if_exists(f)?;
            }
        } else if paths.data_file.exists() || paths.metadata_file.exists() {
            return Err(Error::FailedPrecondition(format!(
                "{} holds pool files but no metadata store; refusing to overwrite them",
                paths.root.display()
            )));
        }
        Self::create(paths, spec, lock)
    }

    fn create(paths: PoolPaths, spec: &PoolSpec, lock: File) -> Result<Pool> {
        let settings = settings_from_spec(spec)?;
        if !spec.overcommit_host {
            check_room_for_create(&paths.root, &settings)?;
        }
        info!(root = %paths.root.display(), backend = %settings.backend,
            data = %settings.data_size, metadata = %settings.metadata_size, "creating pool");
        // The store goes first: if we crash from here on, it says "initializing".
        let store = Store::create(&paths.store_file, &settings)?;
        failpoint::hit("pool_create:after_store");
        let backend = backend::create(&paths, &settings)?;
        let pool = Pool::new(paths, settings.clone(), store, backend, lock)?;
        let base_id = pool.store.write(|w| w.allocate_id())?;
        let txn = pool.backend.create_thin(base_id, settings.base_size)?;
        // The base device exists in the kernel, unformatted; the store still says
        // initializing, so the next start scrubs and creates the pool again.
        failpoint::hit("pool_create:after_base");
        // A backend without filesystems (sim) has nothing to format; "none" stands for the UUID.
        let fs_uuid = if pool.backend.holds_filesystems() {
            let dev = pool.backend.activate(base_id, settings.base_size, false)?;
            // No lost+found in the base, so none in any snapshot: containerd's snapshots start
            // empty. Still inside creation: a crash here makes the pool again from scratch.
            let scratch = pool.scratch_dir(base_id);
            let formatted = fsutil::mkfs(settings.fs, &dev, &settings.mkfs_options)
                .and_then(|()| fsutil::remove_lost_found(settings.fs, &dev, &scratch))
                .and_then(|()| fsutil::fs_uuid(settings.fs, &dev));
            pool.backend.deactivate(base_id)?;
            formatted?
        } else {
            "none".to_string()
        };
        // The new files' directory entries, before the store says the pool is ready.
        sync_dir(&pool.paths.root)?;
        failpoint::hit("pool_create:after_mkfs");
        let now = now_ns();
        pool.store.write(|w| {
            w.put_device(&DeviceRecord {
                id: base_id,
                name: None,
                kind: DeviceKind::Base,
                parent: None,
                size: settings.base_size,
                state: DeviceState::Ready,
                active: false,
                labels: BTreeMap::new(),
                created_ns: now,
                updated_ns: now,
                usage: None,
            })?;
            w.set_base(&BaseDevice {
                id: base_id,
                fs_uuid: fs_uuid.clone(),
            })?;
            w.advance_transaction_id(txn)?;
            w.set_state(PoolState::Ready)
        })?;
        info!(base = %base_id, fs = %settings.fs, uuid = %fs_uuid, "pool created");
        Ok(pool)
    }

    fn reopen(
        paths: PoolPaths,
        mut settings: PoolSettings,
        store: Store,
        lock: File,
        spec: &PoolSpec,
    ) -> Result<Pool> {
        // Settings that may change on an existing pool.
        let mut changed = false;
        if let Some(v) = spec
            .error_if_no_space
            .filter(|v| *v != settings.error_if_no_space)
        {
            settings.error_if_no_space = v;
            changed = true;
        }
        if let Some(v) = spec
            .mount_options
            .as_ref()
            .filter(|v| **v != settings.mount_options)
        {
            settings.mount_options = v.clone();
            changed = true;
        }
        if let Some(v) = spec
            .min_free_space
            .filter(|v| *v != settings.min_free_space)
        {
            settings.min_free_space = v;
            changed = true;
        }
        if let Some(v) = spec
            .autoextend_data
            .filter(|v| *v != settings.autoextend_data)
        {
            settings.autoextend_data = v;
            changed = true;
        }
        if let Some(v) = spec
            .autoextend_metadata
            .filter(|v| *v != settings.autoextend_metadata)
        {
            settings.autoextend_metadata = v;
            changed = true;
        }
        if changed {
            check_space_settings(&settings)?;
            store.write(|w| w.set_settings(&settings))?;
        }
        info!(root = %paths.root.display(), backend = %settings.backend, "opening pool");
        let backend = backend::open(&paths, &settings)?;
        let pool = Pool::new(paths, settings, store, backend, lock)?;
        pool.clear_scratch_mounts();
        pool.finish_interrupted_grow()?;
        pool.check_transaction_id()?;
        pool.verify_base()?;
        pool.reconcile()?;
        Ok(pool)
    }

    fn new(
        paths: PoolPaths,
        settings: PoolSettings,
        store: Store,
        backend: Box<dyn Backend>,
        lock: File,
    ) -> Result<Pool> {
        if settings.autoextend_metadata.enabled() && !backend.metadata_grows() {
            warn!(backend = %settings.backend,
                "metadata autoextend is ignored: this backend's metadata cannot grow");
        }
        let events = backend.events()?;
        let quarantined = store
            .read(|r| r.quarantined())?
            .into_iter()
            .map(|q| q.id)
            .collect();
        Ok(Pool {
            paths,
            settings: Mutex::new(settings),
            store,
            backend,
            locks: DeviceLocks::default(),
            grow_lock: Mutex::new(()),
            counters: Counters::default(),
            timings: OpTimings::default(),
            space: Mutex::new(SpaceState::default()),
            events,
            down: parking_lot::RwLock::new(false),
            quarantined: Mutex::new(quarantined),
            audit_gate: parking_lot::RwLock::new(()),
            frozen_mapped: Mutex::new(HashMap::new()),
            backup_lock: Mutex::new(()),
            _lock: lock,
        })
    }

    pub fn settings(&self) -> PoolSettings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn paths(&self) -> &PoolPaths {
        &self.paths
    }

    pub fn backend_kind(&self) -> BackendKind {
        self.backend.kind()
    }

    pub(super) fn base(&self) -> Result<BaseDevice> {
        self.store
            .read(|r| r.base())?
            .ok_or_else(|| Error::Inconsistent("the pool has no base device record".into()))
    }

    /// Closes the pool. With `teardown`, also removes every device, the pool and its loop
    /// devices from the kernel, as a reboot would; without, active devices stay active for
    /// the containers using them.
    pub fn close(self, teardown: bool) -> Result<()> {
        if teardown {
            self.teardown()?;
        }
        Ok(())
    }

    /// Takes the pool down on purpose: deactivates every device, takes the pool down and
    /// detaches its loop devices (reflink: unmounts the data filesystem), through the same
    /// [`Backend::teardown`] as `close(true)`. Records stay as they are (a device recorded
    /// active stays so), so the next open brings everything back. Afterwards
    /// every call that changes the backend is refused; the caller drops the pool (thinpoold
    /// exits).
    ///
    /// A device in use (mounted, or open): without `force`, `FailedPrecondition` naming the
    /// busy devices, and nothing changes. With `force`, busy devices stay active, and with
    /// them the pool and its loop devices (a busy device holds them open); every idle
    /// device is deactivated. That is the state a plain daemon stop leaves, which the next
    /// open takes over, never a half-down pool.
    pub fn take_down(&self, force: bool) -> Result<TakeDownReport> {
        // Exclusive: no activate or snapshot runs meanwhile, and none starts after.
        let mut down = self.down.write();
        let mut report = TakeDownReport::default();
        if *down {
            report.pool_down = true;
            return Ok(report);
        }
        let active = self.backend.active_devices()?;
        // First look, changing nothing: a mounted device refuses an exclusive open.
        let mut busy: Vec<(ThinId, PathBuf)> = active
            .iter()
            .filter(|(_, node)| node_in_use(node))
            .map(|(id, node)| (*id, node.clone()))
            .collect();
        if !busy.is_empty() && !force {
            return Err(self.busy_error(&busy));
        }
        for (id, node) in &active {
            if busy.iter().any(|(b, _)| b == id) {
                continue;
            }
            let _guard = self.locks.lock(*id);
            match self.backend.deactivate(*id) {
                Ok(()) => {
                    report.deactivated.push(*id);
                    // Part of the devices down, records unchanged: the next open
                    // re-activates the ones recorded active.
                    failpoint::hit("take_down:after_deactivate");
                }
                // Open without an exclusive claim (seen only now): busy after all.
                Err(Error::FailedPrecondition(_)) if force => busy.push((*id, node.clone())),
                Err(e) => {
                    // Put back what we took down, so that a refusal changes nothing.
                    for id in &report.deactivated {
                        if let Ok(rec) = self.record_by_id(*id) {
                            let ro = rec.kind != DeviceKind::Active;
                            if let Err(e) = self.backend.activate(*id, rec.size, ro) {
                                warn!(id = %id, error = %e, "could not re-activate after a refused take-down");
                            }
                        }
                    }
                    return Err(match e {
                        Error::FailedPrecondition(_) => self.busy_error(&[(*id, node.clone())]),
                        e => e,
                    });
                }
            }
        }
        if busy.is_empty() {
            self.backend.teardown()?;
            report.pool_down = true;
            *down = true;
            info!(devices = report.deactivated.len(), "pool taken down");
        } else {
            warn!(
                busy = busy.len(),
                deactivated = report.deactivated.len(),
                "take-down forced: devices in use stay active, and the pool under them"
            );
        }
        report.busy = busy;
        Ok(report)
    }

    /// `FailedPrecondition` naming the busy devices (at most 16, with their keys).
    fn busy_error(&self, busy: &[(ThinId, PathBuf)]) -> Error {
        let mut names: Vec<String> = busy
            .iter()
            .take(16)
            .map(|(id, node)| {
                let key = self.record_by_id(*id).ok().and_then(|r| r.name);
                match key {
                    Some(k) => format!("{:?} (thin {id}, {})", k.as_str(), node.display()),
                    None => format!("thin {id} ({})", node.display()),
                }
            })
            .collect();
        if busy.len() > names.len() {
            names.push(format!("and {} more", busy.len() - names.len()));
        }
        Error::FailedPrecondition(format!(
            "devices in use (mounted or open): {}; unmount them, or take the pool down with force",
            names.join(", ")
        ))
    }

    /// Held shared by the calls that change the backend; refuses once the pool is down.
    pub(super) fn up(&self) -> Result<parking_lot::RwLockReadGuard<'_, bool>> {
        // Recursive: snapshot may activate, and a waiting take-down must not deadlock it.
        let g = self.down.read_recursive();
        if *g {
            return Err(Error::FailedPrecondition(
                "the pool was taken down; start thinpoold again to bring it back".into(),
            ));
        }
        Ok(g)
    }

    /// Takes the pool out of the kernel, as a reboot would: every device, the pool, its loop
    /// devices and (reflink) the data mount; the pool's files and records stay, and the next
    /// open reassembles it. [`Pool::take_down`] without force: a device that is mounted or
    /// open refuses it with `FailedPrecondition`, changing nothing.
    pub fn teardown(&self) -> Result<()> {
        self.take_down(false).map(drop)
    }
}

/// A store error while opening the pool, with what to do about it.
fn store_damaged(e: Error) -> Error {
    match e {
        Error::Store { message, .. } => Error::Inconsistent(format!(
            "the metadata store failed ({message}); {}",
            crate::store::REPAIR_HINT
        )),
        e => e,
    }
}

/// Makes the entries of files created in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

fn remove_if_exists(path: &std::path::Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
