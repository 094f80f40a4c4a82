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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

use crate::backend::{self, Backend, PoolEvents, PoolPaths};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil;
use crate::ids::{self, DeviceName, ThinId};
use crate::loopback;
use crate::model::{
    AuditReport, AutoextendPolicy, BackendKind, BackendStatus, DeviceKind, DeviceRecord,
    DeviceState, FsType, GrowOutcome, GrowRequest, MountSpec, PoolCounters, PoolMode, PoolSettings,
    PoolSize, PoolSpec, PoolStatus, QuarantinedDevice, SizeChange,
};
use crate::store::{BaseDevice, PoolState, Store};
use crate::timing::{HistogramSnapshot, OpTimings, Operation};
use crate::units::{Bytes, DataBlocks};

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

/// The engine's counters; see [`PoolCounters`].
#[derive(Default)]
struct Counters {
    grows: AtomicU64,
    autoextends: AtomicU64,
    autoextend_failures: AtomicU64,
    guard_rejections: AtomicU64,
    pool_events: AtomicU64,
    mode_changes: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn read(&self) -> PoolCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolCounters {
            grows: r(&self.grows),
            autoextends: r(&self.autoextends),
            autoextend_failures: r(&self.autoextend_failures),
            guard_rejections: r(&self.guard_rejections),
            pool_events: r(&self.pool_events),
            mode_changes: r(&self.mode_changes),
        }
    }
}

/// What the space checks remember between calls, so that they log changes, not states.
#[derive(Default)]
struct SpaceState {
    /// The pool mode last seen.
    mode: Option<PoolMode>,
    /// An autoextension of data (0) or metadata (1) is due but could not happen; warned
    /// about once until it clears.
    blocked: [bool; 2],
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
        let dev = pool.backend.activate(base_id, settings.base_size, false)?;
        // No lost+found in the base, so none in any snapshot: containerd's snapshots start
        // empty. Still inside creation: a crash here makes the pool again from scratch.
        let scratch = pool.scratch_dir(base_id);
        let formatted = fsutil::mkfs(settings.fs, &dev, &settings.mkfs_options)
            .and_then(|()| fsutil::remove_lost_found(settings.fs, &dev, &scratch))
            .and_then(|()| fsutil::fs_uuid(settings.fs, &dev));
        pool.backend.deactivate(base_id)?;
        let fs_uuid = formatted?;
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
            _lock: lock,
        })
    }

    /// Detaches and removes the scratch mounts of filesystem grows (`<root>/resize/<id>`)
    /// that a crash left: they hold the half-made device busy, and reconcile must roll it
    /// back.
    fn clear_scratch_mounts(&self) {
        crate::mount::clear_scratch(&self.paths.root.join("resize"));
    }

    /// Finishes a grow that a crash interrupted. A grow extends the pool file first (the
    /// durable step: the backend assembles the pool from the files' sizes), then the kernel,
    /// then our record of the size; so a file longer than the record is a grow to finish,
    /// and one shorter is damage.
    fn finish_interrupted_grow(&self) -> Result<()> {
        let s = self.settings();
        let data = Bytes(loopback::file_len(&self.paths.data_file)?);
        let metadata = Bytes(loopback::file_len(&self.paths.metadata_file)?);
        for (what, file, len, recorded) in [
            ("data", &self.paths.data_file, data, s.data_size),
            (
                "metadata",
                &self.paths.metadata_file,
                metadata,
                s.metadata_size,
            ),
        ] {
            if len < recorded {
                return Err(Error::Inconsistent(format!(
                    "the pool's {what} file {} is {len}, but the pool is {recorded}: was it \
                     truncated?",
                    file.display()
                )));
            }
        }
        if data > s.data_size {
            warn!(recorded = %s.data_size, file = %data, "finishing an interrupted grow of the data");
            let blocks = DataBlocks(data.0 / s.block_size.0);
            self.backend.grow_data(data, s.low_water_mark(blocks))?;
            self.record_settings(|s| s.data_size = data)?;
        }
        if metadata > s.metadata_size {
            if self.backend.metadata_grows() {
                warn!(recorded = %s.metadata_size, file = %metadata,
                    "finishing an interrupted grow of the metadata");
                self.backend.grow_metadata(metadata)?;
                self.record_settings(|s| s.metadata_size = metadata)?;
            } else {
                warn!(recorded = %s.metadata_size, file = %metadata,
                    "the metadata file is longer than the pool uses; the rest stays unused");
            }
        }
        Ok(())
    }

    /// Changes the settings durably, then in memory.
    fn record_settings(&self, change: impl FnOnce(&mut PoolSettings)) -> Result<()> {
        // Held across the (short) store write so memory and store never disagree.
        let mut cur = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = cur.clone();
        change(&mut next);
        self.store.write(|w| w.set_settings(&next))?;
        *cur = next;
        Ok(())
    }

    /// The backend's transaction id may be ahead of ours (changes made before a crash, not
    /// yet recorded: reconcile handles them), never behind: that would mean the pool's
    /// metadata lost committed changes.
    fn check_transaction_id(&self) -> Result<()> {
        let ours = self.store.read(|r| r.transaction_id())?;
        let theirs = self.backend.status()?.transaction_id;
        if theirs < ours {
            return Err(Error::Inconsistent(format!(
                "the pool's transaction id is {theirs} but our records are at {ours}: \
                 the pool metadata is older than our records (restored from a backup?)"
            )));
        }
        Ok(())
    }

    fn verify_base(&self) -> Result<()> {
        let base = self.base()?;
        let settings = self.settings();
        let rec = self.record(base.id)?;
        // Someone may hold the base active (mounted to look at it): read the live node
        // rather than fail the open on a deactivate (and leave lost+found to a later open).
        let (uuid, fixed) = match self.backend.active_devices()?.get(&base.id) {
            Some(dev) => (fsutil::fs_uuid(settings.fs, dev)?, Ok(())),
            None => {
                let dev = self.backend.activate(base.id, rec.size, false)?;
                let uuid = fsutil::fs_uuid(settings.fs, &dev);
                // Pools made before the base lost its lost+found get it removed here, once:
                // new snapshots are then empty. Existing snapshots are copies and keep theirs.
                let fixed = match &uuid {
                    Ok(u) if *u == base.fs_uuid => {
                        fsutil::remove_lost_found(settings.fs, &dev, &self.scratch_dir(base.id))
                    }
                    _ => Ok(()),
                };
                self.backend.deactivate(base.id)?;
                (uuid?, fixed)
            }
        };
        if uuid != base.fs_uuid {
            return Err(Error::Inconsistent(format!(
                "base device {} has filesystem UUID {uuid}, but we recorded {}",
                base.id, base.fs_uuid
            )));
        }
        fixed
    }

    /// Rolls back half-done creates, finishes half-done deletes, and brings the set of
    /// active devices in line with the records. A device for which a step fails is put in
    /// quarantine and skipped; one whose step succeeds leaves quarantine. Fails only when
    /// the store or the backend as a whole fails.
    fn reconcile(&self) -> Result<()> {
        let records = self.store.read(|r| r.devices())?;
        for rec in records.iter().filter(|r| r.state != DeviceState::Ready) {
            self.settle(rec)?;
        }
        let wanted: BTreeMap<ThinId, DeviceRecord> = self
            .store
            .read(|r| r.devices())?
            .into_iter()
            .filter(|r| r.active)
            .map(|r| (r.id, r))
            .collect();
        let live = self.backend.active_devices()?;
        for id in live.keys().filter(|id| !wanted.contains_key(id)) {
            info!(id = %id, "deactivating a device no record wants active");
            match self.backend.deactivate(*id) {
                Ok(()) => self.unquarantine(*id)?,
                // In use: someone mounted it, so it is wanted after all. Record that, rather
                // than fail the whole open while a container runs on it.
                Err(Error::FailedPrecondition(why)) => {
                    warn!(id = %id, %why, "device is in use; keeping it active");
                    self.store.write(|w| {
                        if let Some(mut cur) = w.device(*id)?
                            && cur.state == DeviceState::Ready
                        {
                            cur.active = true;
                            w.put_device(&cur)?;
                        }
                        Ok(())
                    })?;
                }
                Err(e) => self.quarantine(*id, "deactivate", &e)?,
            }
        }
        for rec in wanted.values() {
            match self
                .backend
                .activate(rec.id, rec.size, rec.kind != DeviceKind::Active)
            {
                Ok(_) => self.unquarantine(rec.id)?,
                Err(e) => self.quarantine(rec.id, "activate", &e)?,
            }
        }
        // Anything the kernel did that we never recorded is now undone or recorded; catch our
        // record up with the backend's counter.
        let txn = self.backend.status()?.transaction_id;
        self.store.write(|w| w.advance_transaction_id(txn))
    }

    /// Finishes one record left mid-operation: rolls back a create, finishes a delete. A
    /// delete of a device still in use stays pending (reclaim retries it, as a deferred
    /// removal); any other failure quarantines the device. Errors only if the store fails.
    fn settle(&self, rec: &DeviceRecord) -> Result<()> {
        match rec.state {
            DeviceState::Creating => {
                warn!(id = %rec.id, name = ?rec.name, "rolling back an unfinished create");
                if let Err(e) = self.undo_create(rec.id) {
                    self.quarantine(rec.id, "roll back an unfinished create", &e)?;
                }
            }
            DeviceState::Deleting => {
                info!(id = %rec.id, "finishing an unfinished delete");
                match self.finish_delete(rec.id, false) {
                    Ok(()) => {}
                    // Still mounted by someone: a pending removal, not a fault.
                    Err(Error::FailedPrecondition(why)) => {
                        warn!(id = %rec.id, %why, "cannot finish a delete yet")
                    }
                    Err(e) => self.quarantine(rec.id, "finish a delete", &e)?,
                }
            }
            DeviceState::Ready => {}
        }
        Ok(())
    }

    /// Puts `id` in quarantine after `what` failed with `e`: durably, and logged.
    fn quarantine(&self, id: ThinId, what: &str, e: &Error) -> Result<()> {
        // Warned once; reclaim's retries of a device still failing only log at debug.
        if self.is_quarantined(id) {
            debug!(id = %id, error = %e, "still quarantined: {what} failed again");
        } else {
            warn!(id = %id, error = %e,
                "quarantining device: {what} failed; the pool serves the rest, reclaim retries it");
        }
        let reason = format!("{what}: {e}");
        self.store.write(|w| w.quarantine(id, &reason, now_ns()))?;
        self.quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        Ok(())
    }

    /// Takes `id` out of quarantine if it is there (no store write otherwise).
    fn unquarantine(&self, id: ThinId) -> Result<()> {
        let mut q = self.quarantined.lock().unwrap_or_else(|p| p.into_inner());
        if q.contains(&id) {
            self.store.write(|w| w.unquarantine(id))?;
            q.remove(&id);
            info!(id = %id, "device recovered; out of quarantine");
        }
        Ok(())
    }

    /// Retries the recovery step of a quarantined device: the step reconcile would take.
    /// Returns whether it left quarantine.
    fn retry_quarantined(&self, id: ThinId) -> Result<bool> {
        match self.store.read(|r| r.device(id))? {
            // No record: a live device no record wants (its deactivate failed), or a record
            // removed meanwhile.
            None => {
                let deactivated = {
                    let _guard = self.locks.lock(id);
                    self.backend.deactivate(id)
                };
                match deactivated {
                    Ok(()) => self.unquarantine(id)?,
                    Err(e) => self.quarantine(id, "deactivate", &e)?,
                }
            }
            Some(rec) if rec.state != DeviceState::Ready => self.settle(&rec)?,
            Some(rec) if rec.active => {
                let _guard = self.locks.lock(id);
                match self
                    .backend
                    .activate(id, rec.size, rec.kind != DeviceKind::Active)
                {
                    Ok(_) => self.unquarantine(id)?,
                    Err(e) => self.quarantine(id, "activate", &e)?,
                }
            }
            // Ready and not wanted active: nothing to recover any more.
            Some(_) => self.unquarantine(id)?,
        }
        Ok(!self.is_quarantined(id))
    }

    fn is_quarantined(&self, id: ThinId) -> bool {
        self.quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    /// The devices in quarantine, from the store.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedDevice>> {
        self.store.read(|r| r.quarantined())
    }

    /// Removes a device whose create did not finish, from the backend and from our records:
    /// the same steps as finishing a delete.
    fn undo_create(&self, id: ThinId) -> Result<()> {
        self.finish_delete(id, false)
    }

    /// Completes a recorded delete: deactivate, optionally discard, delete, forget.
    fn finish_delete(&self, id: ThinId, discard: bool) -> Result<()> {
        let _cut = self.audit_gate.read_recursive();
        {
            let _guard = self.locks.lock(id);
            if discard && let Some(rec) = self.store.read(|r| r.device(id))? {
                let dev = self.backend.activate(id, rec.size, false)?;
                if let Err(e) = discard_device(&dev) {
                    warn!(id = %id, error = %e, "discard failed; deleting anyway");
                }
            }
            self.backend.deactivate(id)?;
            failpoint::hit("remove:after_deactivate");
            let txn = self.backend.delete(id)?;
            failpoint::hit("remove:after_kernel");
            // Also drops a quarantine entry.
            self.store.write(|w| {
                w.remove_device(id)?;
                w.advance_transaction_id(txn)
            })?;
            self.quarantined
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            self.frozen_mapped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        // After the guard is dropped: forget keeps a lock someone still holds or waits for.
        self.locks.forget(id);
        Ok(())
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

    fn base(&self) -> Result<BaseDevice> {
        self.store
            .read(|r| r.base())?
            .ok_or_else(|| Error::Inconsistent("the pool has no base device record".into()))
    }

    fn record(&self, id: ThinId) -> Result<DeviceRecord> {
        self.store
            .read(|r| r.device(id))?
            .ok_or_else(|| Error::NotFound(format!("thin id {id}")))
    }

    /// The record of a named device that is ready for use.
    pub fn device(&self, name: &DeviceName) -> Result<DeviceRecord> {
        let rec = self
            .store
            .read(|r| r.device_by_name(name))?
            .ok_or_else(|| Error::NotFound(format!("device {name:?}")))?;
        match rec.state {
            DeviceState::Ready => Ok(rec),
            DeviceState::Creating => Err(Error::FailedPrecondition(format!(
                "device {name:?} is still being created"
            ))),
            DeviceState::Deleting => Err(Error::NotFound(format!("device {name:?}"))),
        }
    }

    /// The record with thin id `id`, in any state (e.g. to name a device's parent).
    pub fn device_by_id(&self, id: ThinId) -> Result<DeviceRecord> {
        self.record(id)
    }

    /// Every record, including the base device and records mid-operation, in id order.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.store.read(|r| r.devices())
    }

    /// A page of [`Pool::devices`]: the records with ids above `after`, at most
    /// `max_records` and about `max_bytes` (for listings streamed without holding them all).
    pub fn devices_page(
        &self,
        after: Option<ThinId>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<DeviceRecord>> {
        self.store
            .read(|r| r.devices_page(after, max_records, max_bytes))
    }

    /// Makes a new thin device as a snapshot of `req.parent` (or of the base device).
    ///
    /// Errors: `AlreadyExists` if the name is taken, `NotFound` if the parent is missing,
    /// `InvalidArgument` for a parent that is not committed, a bad kind or a size below the
    /// parent's, `ResourceExhausted` while the pool's free space is below `min_free_space`
    /// (the message says how to grow).
    pub fn snapshot(&self, mut req: SnapshotRequest) -> Result<DeviceRecord> {
        let _up = self.up()?;
        let _t = self.timings.start(Operation::Snapshot);
        drop_empty_labels(&mut req.labels);
        if !matches!(req.kind, DeviceKind::Active | DeviceKind::View) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot is active or view, not {}",
                req.kind
            )));
        }
        ids::validate_labels(&req.labels)?;
        if let Some(size) = req.size
            && (size.0 == 0 || size.0 % 4096 != 0)
        {
            return Err(Error::InvalidArgument(format!(
                "size {} is not a positive multiple of 4 KiB",
                size.0
            )));
        }
        self.check_free_space()?;
        let base = self.base()?;
        let now = now_ns();
        // From the intent to the outcome: an audit sees this id on both sides or neither.
        // Not recursive: a waiting audit goes first, so a stream of creates cannot starve it
        // (the rollback's finish_delete nests recursively under this).
        let _cut = self.audit_gate.read();
        // 1. Intent: the record, in Creating.
        let rec = self.store.write(|w| {
            if w.device_by_name(&req.name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "device {:?}",
                    req.name.as_str()
                )));
            }
            let origin = match &req.parent {
                None => w.device(base.id)?.ok_or_else(|| {
                    Error::Inconsistent("the base device record is missing".into())
                })?,
                // Only committed devices are parents (containerd's storage returns
                // InvalidArgument otherwise): an active parent could change under its child.
                Some(p) => match w.device_by_name(p)? {
                    Some(o) if o.kind != DeviceKind::Committed => {
                        return Err(Error::InvalidArgument(format!(
                            "parent {:?} is {}, not a committed snapshot",
                            p.as_str(),
                            o.kind
                        )));
                    }
                    Some(o) if o.state == DeviceState::Ready => o,
                    Some(_) => {
                        return Err(Error::FailedPrecondition(format!(
                            "parent {p:?} is being created or removed"
                        )));
                    }
                    None => return Err(Error::NotFound(format!("parent {p:?}"))),
                },
            };
            let size = req.size.unwrap_or(origin.size);
            if size < origin.size {
                return Err(Error::InvalidArgument(format!(
                    "size {size} is below the parent's {}",
                    origin.size
                )));
            }
            let rec = DeviceRecord {
                id: w.allocate_id()?,
                name: Some(req.name.clone()),
                kind: req.kind,
                parent: Some(origin.id),
                size,
                state: DeviceState::Creating,
                active: false,
                labels: req.labels.clone(),
                created_ns: now,
                updated_ns: now,
                usage: None,
            };
            w.put_device(&rec)?;
            Ok(rec)
        })?;
        // A parentless device is a "create" (of a snapshot of the base) to the failpoints.
        let op = if req.parent.is_none() {
            "create"
        } else {
            "snapshot"
        };
        failpoint::hit(&format!("{op}:after_intent"));
        let origin = rec.parent.expect("a snapshot has an origin");

        // 2. The kernel change, then the filesystem grow if a larger size was asked for.
        let made = (|| {
            let txn = {
                let _origin_guard = self.locks.lock(origin);
                self.backend.create_snapshot(rec.id, origin, rec.size)?
            };
            failpoint::hit(&format!("{op}:after_kernel"));
            let origin_size = self.record(origin)?.size;
            if rec.size > origin_size {
                self.grow_filesystem(rec.id, rec.size)?;
            }
            if rec.kind == DeviceKind::View {
                self.replay_view_journal(rec.id, rec.size)?;
            }
            if req.activate {
                // A crash from here on still rolls the create back, deactivating first.
                let _guard = self.locks.lock(rec.id);
                self.backend
                    .activate(rec.id, rec.size, rec.kind != DeviceKind::Active)?;
                failpoint::hit(&format!("{op}:after_activate"));
            }
            Ok(txn)
        })();
        let txn = match made {
            Ok(txn) => txn,
            Err(e) => {
                self.roll_back_create(rec.id);
                return Err(e);
            }
        };

        // 3. The outcome. If it cannot be recorded, roll back as for a failed kernel step:
        // a record left in Creating would hold the key (and the parent) until a restart.
        let mut done = rec;
        done.state = DeviceState::Ready;
        done.active = req.activate;
        let point = if req.parent.is_none() {
            "create:outcome_write"
        } else {
            "snapshot:outcome_write"
        };
        let recorded = if failpoint::fail_once(point) {
            Err(Error::Store("failpoint: outcome write".into()))
        } else {
            self.store.write(|w| {
                w.put_device(&done)?;
                w.advance_transaction_id(txn)
            })
        };
        if let Err(e) = recorded {
            self.roll_back_create(done.id);
            return Err(e);
        }
        Ok(done)
    }

    /// Rolls back a create that failed before its outcome was recorded. If that fails too
    /// (the device is busy, the store is failing), the device is quarantined: reclaim
    /// retries the rollback, so the key does not stay taken until a restart.
    fn roll_back_create(&self, id: ThinId) {
        if let Err(undo) = self.undo_create(id) {
            warn!(id = %id, error = %undo, "could not roll back a failed create; reclaim retries");
            if let Err(e) = self.quarantine(id, "roll back a failed create", &undo) {
                warn!(id = %id, error = %e, "could not quarantine it either; the next open rolls it back");
            }
        }
    }

    /// Makes a new view mountable from its read-only device. ext4 refuses to mount, from a
    /// read-only device, a filesystem whose journal needs recovery, and a parent committed
    /// while mounted has one: the Commit's flush froze it clean, but the thaw marks the
    /// journal for recovery again while it stays mounted. So the view's own copy has its
    /// journal replayed once on a writable activation (mount and unmount), before it is
    /// only ever activated read-only. Precondition: the view is being created (its record
    /// is `Creating`, so a crash rolls this back) and is inactive; it is left inactive.
    fn replay_view_journal(&self, id: ThinId, size: Bytes) -> Result<()> {
        let fs = self.settings().fs;
        if fs != FsType::Ext4 {
            return Ok(());
        }
        let _guard = self.locks.lock(id);
        let dev = self.backend.activate(id, size, true)?;
        let needs = fsutil::ext4_needs_recovery(&dev);
        self.backend.deactivate(id)?;
        if !needs? {
            return Ok(());
        }
        debug!(id = %id, "replaying the journal of a new view");
        let dev = self.backend.activate(id, size, false)?;
        let replayed = fsutil::replay_journal(fs, &dev, &self.scratch_dir(id));
        self.backend.deactivate(id)?;
        replayed
    }

    /// Where the engine mounts device `id` privately for a moment (filesystem grow, base
    /// fix-ups); never a client's path.
    fn scratch_dir(&self, id: ThinId) -> PathBuf {
        self.paths.root.join("resize").join(id.to_string())
    }

    fn grow_filesystem(&self, id: ThinId, size: Bytes) -> Result<()> {
        let fs = self.settings().fs;
        let _guard = self.locks.lock(id);
        let dev = self.backend.activate(id, size, false)?;
        let grown = fsutil::grow(fs, &dev, &self.scratch_dir(id));
        self.backend.deactivate(id)?;
        grown.map_err(|e| grow_error(e, fs, size))
    }

    /// Turns the active device `key` into a committed (read-only) one named `name`, with
    /// `labels` (if given) replacing its labels, and deactivates it. The device may be
    /// mounted: what was written to it is flushed first, and whoever has it open keeps it
    /// until the last close ([`Backend::deactivate_deferred`]); writes after the commit are
    /// the caller's mistake, as with containerd's own snapshotters.
    ///
    /// Atomic against [`Pool::activate`] and a second commit: every check is made before
    /// any change and made again under the device's lock and inside the store's write
    /// transaction, so a failed commit changes nothing. Errors: `NotFound` (no such key),
    /// `FailedPrecondition` (not active), `AlreadyExists` (`name` is taken).
    pub fn commit(
        &self,
        key: &DeviceName,
        name: &DeviceName,
        labels: Option<BTreeMap<String, String>>,
    ) -> Result<DeviceRecord> {
        let _up = self.up()?;
        let _t = self.timings.start(Operation::Commit);
        let labels = labels.map(|mut l| {
            drop_empty_labels(&mut l);
            l
        });
        if let Some(l) = &labels {
            ids::validate_labels(l)?;
        }
        // In containerd's order (storage's CommitActive): the name, then the key, then its kind.
        let check = |r: &crate::store::ReadView| -> Result<DeviceRecord> {
            if r.device_by_name(name)?.is_some() {
                return Err(Error::AlreadyExists(format!("device {:?}", name.as_str())));
            }
            let rec = r
                .device_by_name(key)?
                .filter(|r| r.state == DeviceState::Ready)
                .ok_or_else(|| Error::NotFound(format!("device {key:?}")))?;
            check_commit(&rec, key)?;
            Ok(rec)
        };
        let id = self.store.read(|r| check(r))?.id;
        // Held until the record is written and the device deactivated: `activate` re-reads
        // the record under this lock, so it sees either the active device or the committed
        // one, never a mix.
        let _guard = self.locks.lock(id);
        // Again under the lock: a commit or remove that held it first may have changed it.
        let rec = self.store.read(|r| check(r))?;
        if rec.id != id {
            return Err(Error::NotFound(format!("device {key:?}")));
        }
        self.backend.flush(id)?;
        failpoint::hit("commit:after_flush");
        // Measured now, flushed and before the layer can have children (see
        // DeviceRecord::usage).
        let usage = self.added_bytes(&rec)?;
        let now = now_ns();
        let done = self.store.write(|w| {
            if w.device_by_name(name)?.is_some() {
                return Err(Error::AlreadyExists(format!("device {:?}", name.as_str())));
            }
            let mut cur = w
                .device(id)?
                .filter(|c| c.state == DeviceState::Ready && c.name.as_ref() == Some(key))
                .ok_or_else(|| Error::NotFound(format!("device {key:?}")))?;
            check_commit(&cur, key)?;
            cur.kind = DeviceKind::Committed;
            cur.name = Some(name.clone());
            cur.active = false;
            cur.usage = Some(usage);
            if let Some(l) = labels {
                cur.labels = l;
            }
            // containerd's storage: a commit makes a new snapshot, created and updated now.
            cur.created_ns = now;
            cur.updated_ns = now;
            w.put_device(&cur)?;
            Ok(cur)
        })?;
        failpoint::hit("commit:after_record");
        // The record is committed whatever happens next; a device left active is taken
        // down by the next open's reconcile (no record wants it active).
        if let Err(e) = self.backend.deactivate_deferred(id) {
            warn!(id = %id, error = %e, "committed, but could not deactivate the device");
        }
        Ok(done)
    }

    /// Replaces a device's labels.
    pub fn set_labels(
        &self,
        name: &DeviceName,
        labels: BTreeMap<String, String>,
    ) -> Result<DeviceRecord> {
        let mut labels = labels;
        drop_empty_labels(&mut labels);
        ids::validate_labels(&labels)?;
        self.store.write(|w| {
            let mut rec = w
                .device_by_name(name)?
                .filter(|r| r.state == DeviceState::Ready)
                .ok_or_else(|| Error::NotFound(format!("device {name:?}")))?;
            rec.labels = labels;
            rec.updated_ns = now_ns();
            w.put_device(&rec)?;
            Ok(rec)
        })
    }

    /// Activates a device and returns how to mount it: read-only unless it is active-kind.
    /// Activating an active device returns its spec again.
    pub fn activate(&self, name: &DeviceName) -> Result<MountSpec> {
        self.activate_checked(name, true)
    }

    /// [`Pool::activate`] for containerd's Mounts: an active or view snapshot only; a
    /// committed one is refused with `FailedPrecondition`. The kind is checked under the
    /// device's lock, so a Commit running at the same time is either wholly before (and
    /// this fails) or wholly after (and the device it returns is the active one).
    pub fn mounts(&self, name: &DeviceName) -> Result<MountSpec> {
        self.activate_checked(name, false)
    }

    fn activate_checked(&self, name: &DeviceName, committed_ok: bool) -> Result<MountSpec> {
        let _up = self.up()?;
        let _t = self.timings.start(Operation::Activate);
        let id = self.device(name)?.id;
        let _guard = self.locks.lock(id);
        // Re-read under the lock: a Commit that held it may have renamed the device and
        // made it read-only; the record read before the lock would activate it writable.
        let current = |r: Option<DeviceRecord>| {
            r.filter(|r| r.state == DeviceState::Ready && r.name.as_ref() == Some(name))
                .ok_or_else(|| Error::NotFound(format!("device {name:?}")))
        };
        let rec = current(self.store.read(|r| r.device(id))?)?;
        if !committed_ok && rec.kind == DeviceKind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "{name:?} is committed; only active and view snapshots have mounts"
            )));
        }
        if !rec.active {
            self.store.write(|w| {
                let mut cur = current(w.device(id)?)?;
                cur.active = true;
                w.put_device(&cur)
            })?;
        }
        let read_only = rec.kind != DeviceKind::Active;
        let source = self.backend.activate(rec.id, rec.size, read_only)?;
        Ok(self.mount_spec(source, read_only))
    }

    fn mount_spec(&self, source: PathBuf, read_only: bool) -> MountSpec {
        let settings = self.settings();
        let mut options = settings.mount_options.clone();
        if read_only {
            options.push("ro".into());
        }
        if settings.fs == FsType::Xfs {
            // Every snapshot carries the base filesystem's UUID; xfs refuses a second mount
            // of the same UUID without this.
            options.push("nouuid".into());
        }
        MountSpec {
            source,
            fs_type: settings.fs,
            options,
        }
    }

    /// Deactivates a device. Fails with `FailedPrecondition` while it is mounted or open.
    pub fn deactivate(&self, name: &DeviceName) -> Result<()> {
        let _up = self.up()?;
        let rec = self.device(name)?;
        let _guard = self.locks.lock(rec.id);
        // Kernel first: a busy (mounted) device must keep its record saying "active". A crash
        // after this leaves a record reconcile re-activates, and the caller never got an Ok.
        self.backend.deactivate(rec.id)?;
        self.store.write(|w| {
            if let Some(mut cur) = w.device(rec.id)? {
                cur.active = false;
                w.put_device(&cur)?;
            }
            Ok(())
        })
    }

    /// Removes a device. Fails with `FailedPrecondition` if it has children.
    pub fn remove(&self, name: &DeviceName, opts: RemoveOptions) -> Result<()> {
        let _up = self.up()?;
        let _t = self.timings.start(Operation::Remove);
        if !opts.deferred {
            self.deactivate_for_remove(name)?;
        }
        let id = self.store.write(|w| {
            let mut rec = w
                .device_by_name(name)?
                .filter(|r| r.state != DeviceState::Deleting)
                .ok_or_else(|| Error::NotFound(format!("device {name:?}")))?;
            if rec.state == DeviceState::Creating {
                return Err(Error::FailedPrecondition(format!(
                    "device {name:?} is still being created"
                )));
            }
            // A child whose removal is recorded (deferred, not yet reclaimed) no longer
            // counts: a garbage collector removes a chain child first, then the parent,
            // without waiting for reclaim in between. The backends delete devices
            // independently of their origins, so the order of the later deletes is free.
            let mut children = Vec::new();
            for c in w.children(rec.id)? {
                if w.device(c)?
                    .is_some_and(|c| c.state != DeviceState::Deleting)
                {
                    children.push(c);
                }
            }
            if !children.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "device {name:?} has {} children; remove them first",
                    children.len()
                )));
            }
            rec.state = DeviceState::Deleting;
            rec.name = None;
            rec.active = false;
            rec.updated_ns = now_ns();
            w.put_device(&rec)?;
            // The removal supersedes whatever recovery the device was waiting for.
            w.unquarantine(rec.id)?;
            Ok(rec.id)
        })?;
        self.quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        failpoint::hit("remove:after_intent");
        if opts.deferred {
            return Ok(());
        }
        self.finish_delete(id, opts.discard)
    }

    /// Refuses (with `FailedPrecondition`, changing nothing) to remove a device that is
    /// mounted: deactivating first means a busy device never gets a delete intent.
    fn deactivate_for_remove(&self, name: &DeviceName) -> Result<()> {
        let Ok(rec) = self.device(name) else {
            return Ok(()); // remove() reports NotFound and the rest itself
        };
        let _guard = self.locks.lock(rec.id);
        self.backend.deactivate(rec.id)
    }

    /// Finishes every recorded delete (those left by deferred removes or failures) and
    /// returns how many devices were freed. A device still in use is skipped (and retried by
    /// the next reclaim); any other failure is returned after the rest were tried. Also
    /// retries every quarantined device's recovery step (see [`QuarantinedDevice`]).
    pub fn reclaim(&self) -> Result<usize> {
        let _up = self.up()?;
        let pending: Vec<ThinId> = self
            .store
            .read(|r| r.devices())?
            .into_iter()
            .filter(|r| r.state == DeviceState::Deleting)
            .map(|r| r.id)
            .collect();
        let mut freed = 0;
        let mut first_err = None;
        let quarantined: Vec<ThinId> = self
            .quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .filter(|id| !pending.contains(id))
            .collect();
        for id in quarantined {
            match self.retry_quarantined(id) {
                Ok(true) => {}
                Ok(false) => debug!(id = %id, "still quarantined"),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for id in pending {
            match self.finish_delete(id, false) {
                Ok(()) => freed += 1,
                Err(Error::FailedPrecondition(why)) => {
                    warn!(id = %id, %why, "device to delete is in use; will retry")
                }
                Err(e) => {
                    warn!(id = %id, error = %e, "reclaim failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(freed),
        }
    }

    /// Bytes the device has mapped in the pool.
    pub fn usage(&self, name: &DeviceName) -> Result<Bytes> {
        let rec = self.device(name)?;
        let _guard = self.locks.lock(rec.id);
        self.backend.mapped_bytes(rec.id, rec.size)
    }

    /// Bytes mapped by the device with thin id `id`, of any kind (the base device too).
    pub fn usage_by_id(&self, id: ThinId) -> Result<Bytes> {
        let rec = self.record(id)?;
        let _guard = self.locks.lock(rec.id);
        self.backend.mapped_bytes(rec.id, rec.size)
    }

    /// What the device adds over its parent: containerd's `Usage` ("the resources used by
    /// this snapshot, excluding its parents"). A committed device reports the figure its
    /// commit measured; others are measured now. Never activates a device, takes no device
    /// lock and writes nothing, so it is cheap enough for CRI, which asks for every active
    /// snapshot every 10 s: one status ioctl (dm, active device) or one FIEMAP pass
    /// (reflink, a device without children).
    pub fn snapshot_usage(&self, name: &DeviceName) -> Result<Bytes> {
        self.record_usage(&self.device(name)?)
    }

    /// [`Pool::snapshot_usage`] of a record the caller has read already.
    pub fn record_usage(&self, rec: &DeviceRecord) -> Result<Bytes> {
        match rec.usage {
            Some(u) => Ok(u),
            None => self.added_bytes(rec),
        }
    }

    /// Measures what `rec` adds over its parent (its whole mapping for the base device).
    /// dm counts every block a device maps, shared or not: the device's mapped bytes minus
    /// its parent's (as containerd's devmapper does; a rewritten shared block counts for
    /// nothing, a new one counts). reflink counts only unshared extents, which for a device
    /// without children is what it wrote; a device with children (a layer committed by a
    /// build that did not measure it) is compared extent by extent with its parent's file.
    fn added_bytes(&self, rec: &DeviceRecord) -> Result<Bytes> {
        let Some(parent) = rec.parent else {
            return self.backend.mapped_bytes(rec.id, rec.size);
        };
        match self.backend.kind() {
            BackendKind::Dm => {
                let mine = self.backend.mapped_bytes(rec.id, rec.size)?;
                Ok(Bytes(mine.0.saturating_sub(self.frozen_mapped(parent)?.0)))
            }
            BackendKind::Reflink => {
                if self.store.read(|r| r.children(rec.id))?.is_empty() {
                    self.backend.mapped_bytes(rec.id, rec.size)
                } else {
                    self.backend.added_bytes(rec.id, parent)
                }
            }
        }
    }

    /// Mapped bytes of `id`, a device that no longer changes (a parent: committed or base),
    /// read once. Precondition: nothing writes to `id` any more.
    fn frozen_mapped(&self, id: ThinId) -> Result<Bytes> {
        if let Some(b) = self.frozen_mapped.lock().unwrap().get(&id) {
            return Ok(*b);
        }
        let rec = self.record(id)?;
        let b = self.backend.mapped_bytes(rec.id, rec.size)?;
        self.frozen_mapped.lock().unwrap().insert(id, b);
        Ok(b)
    }

    /// The devices of this pool that are active now, with their device nodes.
    pub fn active_devices(&self) -> Result<BTreeMap<ThinId, PathBuf>> {
        self.backend.active_devices()
    }

    pub fn status(&self) -> Result<PoolStatus> {
        let settings = self.settings();
        let kernel = self.backend.status()?;
        self.observe(&kernel);
        let (devices, quarantined) = self
            .store
            .read(|r| Ok((r.device_count()? as usize, r.quarantined()?)))?;
        Ok(PoolStatus {
            backend: settings.backend,
            kernel,
            block_size: settings.block_size,
            base_size: settings.base_size,
            fs: settings.fs,
            devices,
            data_file: self.paths.data_file.clone(),
            metadata_file: self.paths.metadata_file.clone(),
            quarantined,
        })
    }

    /// The `min_free_space` guard: fails with `ResourceExhausted`, saying how to grow the
    /// pool, while free data space (or free metadata space, where it can run out) is below
    /// the setting. Docker checks the same before every create.
    /// A failed pool (whose status reads as zero space) is refused here with
    /// `FailedPrecondition`, not left to fail at the kernel.
    fn check_free_space(&self) -> Result<()> {
        let min = self.settings().min_free_space;
        let st = self.backend.status()?;
        self.observe(&st);
        if st.mode == PoolMode::Fail {
            return Err(Error::FailedPrecondition(
                "the pool has failed (its metadata needs a check and repair): no new \
                 snapshots; restart thinpoold, which runs the check"
                    .into(),
            ));
        }
        if min.0 == 0 {
            return Ok(());
        }
        let mut checks = vec![("data", "--data", st.data_used, st.data_total)];
        if self.backend.metadata_grows() {
            checks.push((
                "metadata",
                "--metadata",
                st.metadata_used,
                st.metadata_total,
            ));
        }
        for (what, flag, used, total) in checks {
            let free = Bytes(total.0.saturating_sub(used.0));
            let needed = min.of(total);
            if free < needed {
                Counters::bump(&self.counters.guard_rejections, 1);
                return Err(Error::ResourceExhausted(format!(
                    "the pool has {free} of {total} {what} space free, below the {min} \
                     (min_free_space, {needed}) kept for the devices in use; grow the pool \
                     (`thinctl pool grow {flag} +SIZE`) or remove devices"
                )));
            }
        }
        Ok(())
    }

    /// Logs a change of the pool's mode (once per change, not per call) and counts it.
    fn observe(&self, st: &BackendStatus) {
        let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
        let old = space.mode.replace(st.mode);
        if old == Some(st.mode) {
            return;
        }
        if old.is_some() {
            Counters::bump(&self.counters.mode_changes, 1);
        }
        let from = old
            .map(|m| m.to_string())
            .unwrap_or_else(|| "unknown".into());
        match st.mode {
            PoolMode::Rw if old.is_none() => {}
            PoolMode::Rw => info!(%from, "the pool is read-write again"),
            PoolMode::OutOfDataSpace => warn!(%from, data_used = %st.data_used,
                data_total = %st.data_total,
                "the pool is out of data space: writes to unallocated blocks fail; grow it \
                 (thinctl pool grow --data +SIZE)"),
            PoolMode::Ro => warn!(%from, metadata_used = %st.metadata_used,
                metadata_total = %st.metadata_total,
                "the pool is read-only (metadata full or failing): grow its metadata \
                 (thinctl pool grow --metadata +SIZE), or check it if it needs a check"),
            PoolMode::Fail => warn!(%from, needs_check = st.needs_check,
                "the pool has FAILED: devices error out; it needs a check and repair"),
        }
    }

    /// Grows the pool's data and/or metadata files, online: mounted devices keep working.
    ///
    /// Sizes are absolute or relative ([`SizeChange`]); data must stay a multiple of the block
    /// size, metadata a multiple of 4 KiB and at most [`PoolSettings::MAX_METADATA_SIZE`].
    ///
    /// Errors: `InvalidArgument` for no size, a size not above the current one (pools never
    /// shrink) or a misaligned one; `FailedPrecondition` when the pool needs a check or has
    /// failed, or for metadata on reflink (its metadata is the XFS log, which cannot grow
    /// online); `ResourceExhausted` when the host filesystem holding the files has less free
    /// space than the grown files could take, unless `req.force`.
    ///
    /// Crash safety: each file is extended (and synced) before the kernel is told, and the
    /// new size is recorded after; the backend assembles the pool from the files' sizes, and
    /// open finishes a grow whose record is missing. Data grows before metadata: when the
    /// metadata step fails, the data stays grown (and recorded) and the error is returned.
    pub fn grow(&self, req: GrowRequest) -> Result<GrowOutcome> {
        let _up = self.up()?;
        let _grow = self.grow_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.grow_locked(&req)
    }

    /// [`Pool::grow`]; the caller holds `grow_lock`.
    fn grow_locked(&self, req: &GrowRequest) -> Result<GrowOutcome> {
        // Timed here, under the lock: manual grows and autoextensions both, without the
        // wait for another grow to finish.
        let _t = self.timings.start(Operation::Grow);
        let settings = self.settings();
        let before = PoolSize {
            data: settings.data_size,
            metadata: settings.metadata_size,
        };
        let files = PoolSize {
            data: Bytes(loopback::file_len(&self.paths.data_file)?),
            metadata: Bytes(loopback::file_len(&self.paths.metadata_file)?),
        };
        let after = plan_grow(&settings, files, req, self.backend.metadata_grows())?;
        let st = self.backend.status()?;
        self.observe(&st);
        if st.needs_check || st.mode == PoolMode::Fail {
            return Err(Error::FailedPrecondition(format!(
                "the pool is {}{}: it must be checked and repaired before it can grow \
                 (restart thinpoold, which runs the check)",
                st.mode,
                if st.needs_check {
                    " and needs a check"
                } else {
                    ""
                }
            )));
        }
        if !req.force {
            self.check_host_room(before, after)?;
        }
        info!(data = %before.data, to_data = %after.data, metadata = %before.metadata,
            to_metadata = %after.metadata, force = req.force, "growing the pool");
        if after.data > before.data {
            let blocks = DataBlocks(after.data.0 / settings.block_size.0);
            self.backend
                .grow_data(after.data, settings.low_water_mark(blocks))?;
            failpoint::hit("grow:after_kernel");
            self.record_settings(|s| s.data_size = after.data)?;
        }
        if after.metadata > before.metadata {
            if let Err(e) = self.backend.grow_metadata(after.metadata) {
                if after.data > before.data {
                    warn!(data = %after.data, error = %e,
                        "the data grew, but growing the metadata failed");
                }
                return Err(e);
            }
            failpoint::hit("grow:after_kernel");
            self.record_settings(|s| s.metadata_size = after.metadata)?;
        }
        Counters::bump(&self.counters.grows, 1);
        self.observe(&self.backend.status()?);
        info!(data = %after.data, metadata = %after.metadata, "pool grown");
        Ok(GrowOutcome { before, after })
    }

    /// Refuses a grow whose files could need more than the host filesystem has free: each
    /// file may come to take its whole new length.
    fn check_host_room(&self, before: PoolSize, after: PoolSize) -> Result<()> {
        let mut need = 0u64;
        for (file, old, new) in [
            (&self.paths.data_file, before.data, after.data),
            (&self.paths.metadata_file, before.metadata, after.metadata),
        ] {
            if new > old {
                need = need.saturating_add(new.0.saturating_sub(loopback::allocated(file)?));
            }
        }
        let st = nix::sys::statvfs::statvfs(&self.paths.root)
            .map_err(|e| Error::io("statfs", &self.paths.root, e.into()))?;
        let free = Bytes(st.blocks_available().saturating_mul(st.fragment_size()));
        host_has_room(&self.paths.root, Bytes(need), free)
    }

    /// One round of the space monitor: reads the pool's status, logs a mode change, and
    /// grows the data and/or metadata when usage is above their autoextend threshold (by the
    /// policy's step, up to its max). Returns what grew, if anything.
    ///
    /// Errors: the status cannot be read, or an autoextension was due and failed (no room on
    /// the host, a kernel error). Those are counted (`autoextend_failures`), logged once
    /// until they clear (a monitor calls this every few seconds), and retried next round.
    /// Metadata is left alone where it cannot grow (reflink).
    pub fn autoextend_check(&self) -> Result<Option<GrowOutcome>> {
        let _up = self.up()?;
        let settings = self.settings();
        let metadata_policy = if self.backend.metadata_grows() {
            settings.autoextend_metadata
        } else {
            AutoextendPolicy::OFF
        };
        let st = self.backend.status()?;
        self.observe(&st);
        if !settings.autoextend_data.enabled() && !metadata_policy.enabled() {
            return Ok(None);
        }
        if st.needs_check || st.mode == PoolMode::Fail {
            return Ok(None); // observe() warned; growing is refused until repaired
        }
        let _grow = self.grow_lock.lock().unwrap_or_else(|p| p.into_inner());
        // A grow may have finished while we waited for the lock.
        let settings = self.settings();
        let st = self.backend.status()?;
        let metadata_cap = AutoextendPolicy {
            max: Some(
                metadata_policy
                    .max
                    .unwrap_or(PoolSettings::MAX_METADATA_SIZE)
                    .min(PoolSettings::MAX_METADATA_SIZE),
            ),
            ..metadata_policy
        };
        let mut req = GrowRequest::default();
        let mut due = [false; 2];
        for (i, (policy, used, total, size, align)) in [
            (
                settings.autoextend_data,
                st.data_used,
                st.data_total,
                settings.data_size,
                settings.block_size,
            ),
            (
                metadata_cap,
                st.metadata_used,
                st.metadata_total,
                settings.metadata_size,
                Bytes::kib(4),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            // The backend's totals may be below the file sizes (reflink: XFS's own overhead);
            // the policy works on the file size, with the usage ratio the backend reports.
            let used = Bytes((used.0 as u128 * size.0 as u128 / total.0.max(1) as u128) as u64);
            if !policy.exceeded(used, size) {
                continue;
            }
            due[i] = true;
            let what = ["data", "metadata"][i];
            match policy.target(used, size, align) {
                Some(to) => {
                    info!(used = %used, size = %size, threshold = %policy.threshold, to = %to,
                        "autoextend: {what} usage is above the threshold");
                    if i == 0 {
                        req.data = Some(SizeChange::To(to));
                    } else {
                        req.metadata = Some(SizeChange::To(to));
                    }
                }
                None => {
                    Counters::bump(&self.counters.autoextend_failures, 1);
                    self.warn_blocked(i, || {
                        warn!(used = %used, size = %size, max = ?policy.max,
                            "autoextend: {what} usage is above the threshold, but the pool is \
                             at the autoextend max; raise the max or grow it by hand")
                    });
                }
            }
        }
        if req.data.is_none() && req.metadata.is_none() {
            let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
            for (blocked, due) in space.blocked.iter_mut().zip(due) {
                *blocked &= due;
            }
            return Ok(None);
        }
        match self.grow_locked(&req) {
            Ok(outcome) => {
                Counters::bump(&self.counters.autoextends, 1);
                let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
                space.blocked = [false; 2];
                drop(space);
                info!(data = %outcome.after.data, metadata = %outcome.after.metadata,
                    "autoextend: pool grown");
                Ok(Some(outcome))
            }
            Err(e) => {
                Counters::bump(&self.counters.autoextend_failures, 1);
                let i = if req.data.is_some() { 0 } else { 1 };
                self.warn_blocked(i, || warn!(error = %e, "autoextend failed; will retry"));
                Err(e)
            }
        }
    }

    /// Runs `log` unless autoextension `i` (0 data, 1 metadata) was blocked already.
    fn warn_blocked(&self, i: usize, log: impl FnOnce()) {
        let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
        if !space.blocked[i] {
            space.blocked[i] = true;
            drop(space);
            log();
        } else {
            debug!("autoextend still blocked");
        }
    }

    /// The engine's counters since the pool was opened.
    pub fn counters(&self) -> PoolCounters {
        self.counters.read()
    }

    /// Latency histograms of [`Operation`]s since the pool was opened: every call, failed
    /// ones included, whoever made it. Reads atomics only.
    pub fn timings(&self) -> Vec<(Operation, HistogramSnapshot)> {
        self.timings.read()
    }

    /// Bytes mapped by every ready device (the base device included), for per-device
    /// metrics: `(record, mapped bytes)`, in id order. One backend call for the lot (dm:
    /// one `thin_ls` instead of activating inactive devices one by one), and no device
    /// locks: a figure read while a device is written is as good as a moment later. A
    /// device removed meanwhile is left out.
    pub fn mapped_bytes_all(&self) -> Result<Vec<(DeviceRecord, Bytes)>> {
        let records: Vec<DeviceRecord> = self
            .devices()?
            .into_iter()
            .filter(|r| r.state == DeviceState::Ready)
            .collect();
        let ids: Vec<(ThinId, Bytes)> = records.iter().map(|r| (r.id, r.size)).collect();
        let mut mapped = self.backend.mapped_bytes_many(&ids)?;
        Ok(records
            .into_iter()
            .filter_map(|r| mapped.remove(&r.id).map(|b| (r, b)))
            .collect())
    }

    /// The descriptor that polls readable after kernel events (dm), for the space monitor;
    /// `None`: the monitor only polls (reflink, or a kernel without dm event polling).
    pub fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.events.as_ref().map(|e| e.fd())
    }

    /// After [`Pool::event_fd`] polled readable: re-arms it and returns whether the pool had
    /// events since the last call (others' events wake it too). Blocks (ioctls).
    pub fn take_events(&self) -> Result<bool> {
        let Some(events) = &self.events else {
            return Ok(false);
        };
        let n = events.take()?;
        if n > 0 {
            Counters::bump(&self.counters.pool_events, n.into());
            debug!(events = n, "pool events");
        }
        Ok(n > 0)
    }

    /// Compares our records with the backend's own metadata, as one consistent cut: no
    /// create or delete runs while both sides are read. Also checks the store's own
    /// invariants and reports quarantined devices. Removals recorded but not yet done
    /// (deferred, or the device still in use) are `pending`, which is not a problem.
    pub fn audit(&self) -> Result<AuditReport> {
        let (records, theirs) = {
            let _cut = self.audit_gate.write();
            let records = self.store.read(|r| r.devices())?;
            (records, self.backend.list_ids()?)
        };
        let ours: BTreeSet<ThinId> = records.iter().map(|r| r.id).collect();
        let of_state = |state: DeviceState| -> Vec<ThinId> {
            records
                .iter()
                .filter(|r| r.state == state)
                .map(|r| r.id)
                .collect()
        };
        // A record mid-operation is reported as unfinished or pending, not also as missing:
        // its kernel side may rightly be gone (a delete done, its record not yet removed).
        let settled: BTreeSet<ThinId> = records
            .iter()
            .filter(|r| r.state == DeviceState::Ready)
            .map(|r| r.id)
            .collect();
        Ok(AuditReport {
            leaked: theirs.difference(&ours).copied().collect(),
            missing: settled.difference(&theirs).copied().collect(),
            unfinished: of_state(DeviceState::Creating),
            pending: of_state(DeviceState::Deleting),
            quarantined: self.quarantined()?.into_iter().map(|q| q.id).collect(),
            store_problems: self.store.check()?,
        })
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
                Ok(()) => report.deactivated.push(*id),
                // Open without an exclusive claim (seen only now): busy after all.
                Err(Error::FailedPrecondition(_)) if force => busy.push((*id, node.clone())),
                Err(e) => {
                    // Put back what we took down, so that a refusal changes nothing.
                    for id in &report.deactivated {
                        if let Ok(rec) = self.record(*id) {
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
                let key = self.record(*id).ok().and_then(|r| r.name);
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
    fn up(&self) -> Result<parking_lot::RwLockReadGuard<'_, bool>> {
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

/// Whether a device node is in use: an exclusive open of a block device fails with EBUSY
/// while it is mounted or exclusively claimed. Plain opens by other processes do not show
/// here; the backend's deactivate refuses those.
fn node_in_use(node: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(node)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// Per-device locks: kernel calls on one device are serialised, different devices are not.
#[derive(Default)]
struct DeviceLocks {
    map: Mutex<HashMap<ThinId, Arc<parking_lot::Mutex<()>>>>,
}

/// Holds one device's lock until dropped.
type DeviceGuard = parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()>;

impl DeviceLocks {
    fn lock(&self, id: ThinId) -> DeviceGuard {
        let lock = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone();
        lock.lock_arc()
    }

    /// Drops `id`'s lock unless someone holds it or waits for it: removing an entry in use
    /// would let a newcomer make a second mutex for the same id and run beside the holder.
    fn forget(&self, id: ThinId) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map's own reference left (holders and waiters clone the Arc).
        if map.get(&id).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(&id);
        }
    }
}

fn lock_root(paths: &PoolPaths) -> Result<File> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(fsutil::PRIVATE_FILE_MODE)
        .open(&paths.lock_file)
        .map_err(|e| Error::io("open lock file", &paths.lock_file, e))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::FailedPrecondition(format!(
            "another process holds the pool at {} (lock {})",
            paths.root.display(),
            paths.lock_file.display()
        )));
    }
    Ok(f)
}

/// A store error while opening the pool, with what to do about it.
fn store_damaged(e: Error) -> Error {
    match e {
        Error::Store(m) => Error::Inconsistent(format!(
            "the metadata store failed ({m}); {}",
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

/// containerd's storage drops labels with empty values when it writes them.
fn drop_empty_labels(labels: &mut BTreeMap<String, String>) {
    labels.retain(|_, v| !v.is_empty());
}

/// Only an active device can be committed (containerd: FailedPrecondition otherwise).
fn check_commit(rec: &DeviceRecord, key: &DeviceName) -> Result<()> {
    if rec.kind != DeviceKind::Active {
        return Err(Error::FailedPrecondition(format!(
            "{key:?} is {}, only an active snapshot can be committed",
            rec.kind
        )));
    }
    Ok(())
}

fn remove_if_exists(path: &std::path::Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Discards every block of a device (BLKDISCARD over its whole length).
fn discard_device(dev: &std::path::Path) -> Result<()> {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    let f = File::options()
        .write(true)
        .open(dev)
        .map_err(|e| Error::io("open device", dev, e))?;
    let mut len = 0u64;
    // SAFETY: both ioctls get a valid fd and correctly sized arguments.
    unsafe {
        blkgetsize64(f.as_raw_fd(), &mut len)
            .map_err(|e| Error::io("BLKGETSIZE64", dev, e.into()))?;
        blkdiscard(f.as_raw_fd(), &[0, len]).map_err(|e| Error::io("BLKDISCARD", dev, e.into()))?;
    }
    Ok(())
}

pub(crate) fn settings_from_spec(spec: &PoolSpec) -> Result<PoolSettings> {
    let backend = spec.backend.unwrap_or_else(|| backend::detect().0);
    let fs = spec.fs.unwrap_or(FsType::Ext4);
    let s = PoolSettings {
        backend,
        data_size: spec.data_size.unwrap_or(PoolSettings::DEFAULT_DATA_SIZE),
        metadata_size: spec
            .metadata_size
            .unwrap_or(PoolSettings::DEFAULT_METADATA_SIZE),
        block_size: spec.block_size.unwrap_or(PoolSettings::DEFAULT_BLOCK_SIZE),
        base_size: spec.base_size.unwrap_or(PoolSettings::DEFAULT_BASE_SIZE),
        fs,
        mkfs_options: spec
            .mkfs_options
            .clone()
            .unwrap_or_else(|| PoolSettings::default_mkfs_options(fs)),
        mount_options: spec.mount_options.clone().unwrap_or_default(),
        error_if_no_space: spec.error_if_no_space.unwrap_or(true),
        min_free_space: spec
            .min_free_space
            .unwrap_or(PoolSettings::DEFAULT_MIN_FREE_SPACE),
        autoextend_data: spec.autoextend_data.unwrap_or_default(),
        autoextend_metadata: spec.autoextend_metadata.unwrap_or_default(),
        tag: random_tag(),
    };
    check_space_settings(&s)?;
    let bs = s.block_size.0;
    if bs < Bytes::kib(64).0 || bs > Bytes::gib(1).0 || !bs.is_multiple_of(Bytes::kib(64).0) {
        return Err(Error::InvalidArgument(format!(
            "block size {}: must be a multiple of 64 KiB between 64 KiB and 1 GiB",
            s.block_size
        )));
    }
    if s.data_size.0 < 16 * bs || !s.data_size.0.is_multiple_of(bs) {
        return Err(Error::InvalidArgument(format!(
            "data size {}: must be a multiple of the block size and at least 16 blocks",
            s.data_size
        )));
    }
    if s.metadata_size < Bytes::mib(2) || !s.metadata_size.0.is_multiple_of(4096) {
        return Err(Error::InvalidArgument(format!(
            "metadata size {}: must be a multiple of 4 KiB and at least 2 MiB",
            s.metadata_size
        )));
    }
    if s.base_size < Bytes::mib(16) || !s.base_size.0.is_multiple_of(4096) {
        return Err(Error::InvalidArgument(format!(
            "base size {}: must be a multiple of 4 KiB and at least 16 MiB",
            s.base_size
        )));
    }
    Ok(s)
}

/// Checks the settings of the space guard and autoextension.
/// A failed filesystem grow of a new snapshot, for the client: the snapshot is rolled back,
/// so the tool's advice to repair the device is dropped; a size the filesystem cannot have
/// (e.g. ext4 needing more than 2^32 inodes) is the request's fault, not ours.
fn grow_error(e: Error, fs: FsType, size: Bytes) -> Error {
    let Error::Command {
        program,
        status,
        stderr,
    } = e
    else {
        return e;
    };
    let stderr: String = stderr
        .lines()
        .filter(|l| !l.contains("e2fsck") && !l.contains("aborted resize") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let limit = [
        "must be less than",
        "too big",
        "too large",
        "Invalid argument",
    ];
    if limit.iter().any(|l| stderr.contains(l)) {
        return Error::InvalidArgument(format!(
            "size {size}: {fs} cannot grow to it ({program}: {stderr}); nothing was created"
        ));
    }
    Error::Command {
        program,
        status,
        stderr,
    }
}

/// Checks the settings in `spec` that apply to new and existing pools alike (the free-space
/// guard, the autoextend policies) without touching the filesystem, so that a daemon can
/// refuse a bad setting before it creates anything. [`Pool::open`] checks them again.
pub fn check_spec_settings(spec: &PoolSpec) -> Result<()> {
    check_space_settings(&PoolSettings {
        min_free_space: spec
            .min_free_space
            .unwrap_or(PoolSettings::DEFAULT_MIN_FREE_SPACE),
        autoextend_data: spec.autoextend_data.unwrap_or_default(),
        autoextend_metadata: spec.autoextend_metadata.unwrap_or_default(),
        backend: BackendKind::Reflink,
        data_size: PoolSettings::DEFAULT_DATA_SIZE,
        metadata_size: PoolSettings::DEFAULT_METADATA_SIZE,
        block_size: PoolSettings::DEFAULT_BLOCK_SIZE,
        base_size: PoolSettings::DEFAULT_BASE_SIZE,
        fs: FsType::Ext4,
        mkfs_options: Vec::new(),
        mount_options: Vec::new(),
        error_if_no_space: true,
        tag: String::new(),
    })
}

fn check_space_settings(s: &PoolSettings) -> Result<()> {
    if s.min_free_space.0 > 50 {
        return Err(Error::InvalidArgument(format!(
            "min_free_space {}: must be 0% (off) to 50%",
            s.min_free_space
        )));
    }
    s.autoextend_data.validate("data")?;
    s.autoextend_metadata.validate("metadata")?;
    let a = s.autoextend_data;
    if a.enabled() && 100 - a.threshold.0 < s.min_free_space.0 {
        warn!(threshold = %a.threshold, min_free_space = %s.min_free_space,
            "the data autoextend threshold is above what the free-space guard allows: \
             snapshots will be refused before the pool autoextends");
    }
    Ok(())
}

/// The new sizes a grow request asks for, checked; see [`Pool::grow`] for the rules.
/// `files` are the pool files' lengths: a failed grow may have left a file longer than the
/// recorded size, and a file never shrinks, so the current size is the larger of the two.
fn plan_grow(
    s: &PoolSettings,
    files: PoolSize,
    req: &GrowRequest,
    metadata_grows: bool,
) -> Result<PoolSize> {
    if req.data.is_none() && req.metadata.is_none() {
        return Err(Error::InvalidArgument(
            "nothing to grow: give a new data size, a new metadata size, or both".into(),
        ));
    }
    let mut s = s.clone();
    s.data_size = s.data_size.max(files.data);
    s.metadata_size = s.metadata_size.max(files.metadata);
    let mut after = PoolSize {
        data: s.data_size,
        metadata: s.metadata_size,
    };
    if let Some(change) = req.data {
        let new = change.apply(s.data_size)?;
        if new <= s.data_size {
            return Err(Error::InvalidArgument(format!(
                "data size {new} ({change}) is not above the pool's {}: a pool can grow, \
                 never shrink",
                s.data_size
            )));
        }
        if !new.0.is_multiple_of(s.block_size.0) {
            return Err(Error::InvalidArgument(format!(
                "data size {new} is not a multiple of the pool's block size {}",
                s.block_size
            )));
        }
        after.data = new;
    }
    if let Some(change) = req.metadata {
        if !metadata_grows {
            return Err(Error::FailedPrecondition(format!(
                "the {} backend's metadata cannot grow: its metadata file holds the XFS log, \
                 which cannot grow online and never fills up (it is circular); grow the data \
                 only",
                s.backend
            )));
        }
        let new = change.apply(s.metadata_size)?;
        if new <= s.metadata_size {
            return Err(Error::InvalidArgument(format!(
                "metadata size {new} ({change}) is not above the pool's {}: a pool can grow, \
                 never shrink",
                s.metadata_size
            )));
        }
        if !new.0.is_multiple_of(4096) {
            return Err(Error::InvalidArgument(format!(
                "metadata size {new} is not a multiple of 4 KiB"
            )));
        }
        if new > PoolSettings::MAX_METADATA_SIZE {
            return Err(Error::InvalidArgument(format!(
                "metadata size {new} is above dm-thin's maximum of {}; the kernel would not \
                 use the rest",
                PoolSettings::MAX_METADATA_SIZE
            )));
        }
        after.metadata = new;
    }
    Ok(after)
}

/// Fails with `ResourceExhausted` when `need` (what grown files could take) is above `free`
/// on the filesystem holding `dir`.
/// Refuses a new pool whose files could come to take more than the host filesystem holding
/// `root` has free: the metadata file is allocated at once, the data file as the pool fills.
fn check_room_for_create(root: &Path, s: &PoolSettings) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(root).map_err(|e| Error::io("statfs", root, e.into()))?;
    let free = Bytes(st.blocks_available().saturating_mul(st.fragment_size()));
    let need = Bytes(s.data_size.0.saturating_add(s.metadata_size.0));
    if need > free {
        return Err(Error::ResourceExhausted(format!(
            "a pool of {} data and {} metadata could take {need} on the filesystem holding \
             {}, which has {free} free; give smaller sizes, free space there, or create it \
             with --overcommit-host (the data file is sparse: it takes space only as the \
             pool fills, and a full host filesystem then fails containers' writes)",
            s.data_size,
            s.metadata_size,
            root.display()
        )));
    }
    Ok(())
}

fn host_has_room(dir: &Path, need: Bytes, free: Bytes) -> Result<()> {
    if need > free {
        return Err(Error::ResourceExhausted(format!(
            "the grown pool files could take {need} more on the filesystem holding {}, which \
             has {free} free; free space there, or grow with force to overcommit the host \
             (the files are sparse: they take space only as the pool fills)",
            dir.display()
        )));
    }
    Ok(())
}

/// 8 hex digits from the kernel's random source, naming this pool's kernel objects.
fn random_tag() -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to time and pid; uniqueness across pools on one host is all we need.
        let x = now_ns() as u32 ^ std::process::id();
        b = x.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fails with a [`Error::SettingConflict`] naming the first setting in `spec` that differs
/// from the pool's.
fn check_spec(spec: &PoolSpec, s: &PoolSettings) -> Result<()> {
    fn conflict<T: PartialEq + std::fmt::Debug>(
        setting: &'static str,
        requested: &Option<T>,
        on_disk: &T,
    ) -> Result<()> {
        match requested {
            Some(r) if r != on_disk => Err(Error::SettingConflict {
                setting,
                on_disk: format!("{on_disk:?}"),
                requested: format!("{r:?}"),
            }),
            _ => Ok(()),
        }
    }
    /// A size asked for at open may be below the pool's: it was the creation size, and the
    /// pool has grown since. One above it would be a grow, which open does not do.
    fn at_most(setting: &'static str, requested: &Option<Bytes>, on_disk: &Bytes) -> Result<()> {
        match requested {
            Some(r) if r > on_disk => Err(Error::SettingConflict {
                setting,
                on_disk: format!("{on_disk} ({} bytes)", on_disk.0),
                requested: format!(
                    "{r} ({} bytes; grow the pool to change its size: thinctl pool grow)",
                    r.0
                ),
            }),
            _ => Ok(()),
        }
    }
    conflict("backend", &spec.backend, &s.backend)?;
    at_most("data_size", &spec.data_size, &s.data_size)?;
    at_most("metadata_size", &spec.metadata_size, &s.metadata_size)?;
    conflict("block_size", &spec.block_size, &s.block_size)?;
    conflict("base_size", &spec.base_size, &s.base_size)?;
    conflict("fs", &spec.fs, &s.fs)?;
    conflict("mkfs_options", &spec.mkfs_options, &s.mkfs_options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(backend: BackendKind) -> PoolSettings {
        settings_from_spec(&PoolSpec {
            root: PathBuf::from("/nonexistent"),
            backend: Some(backend),
            data_size: Some(Bytes::mib(512)),
            metadata_size: Some(Bytes::mib(64)),
            ..PoolSpec::default()
        })
        .unwrap()
    }

    fn grow(data: Option<&str>, metadata: Option<&str>) -> GrowRequest {
        GrowRequest {
            data: data.map(|s| s.parse().unwrap()),
            metadata: metadata.map(|s| s.parse().unwrap()),
            force: false,
        }
    }

    /// Pool files as long as the recorded sizes.
    fn files(s: &PoolSettings) -> PoolSize {
        PoolSize {
            data: s.data_size,
            metadata: s.metadata_size,
        }
    }

    /// A failed grow left the data file longer than recorded: the file's length is the
    /// current size, so a request between the two is refused as a shrink, with the file's
    /// size in the message, not left to fail later in the backend.
    #[test]
    fn grow_counts_a_file_longer_than_recorded() {
        let s = settings(BackendKind::Dm);
        let long = PoolSize {
            data: Bytes::mib(768),
            metadata: s.metadata_size,
        };
        let e = plan_grow(&s, long, &grow(Some("640M"), None), true).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("768 MiB")),
            "{e}"
        );
        let after = plan_grow(&s, long, &grow(Some("+256M"), None), true).unwrap();
        assert_eq!(after.data, Bytes::gib(1), "relative to the file's length");
    }

    /// Forgetting a device's lock while it is held must not let a newcomer take a second,
    /// fresh lock for the same id.
    #[test]
    fn forget_keeps_a_lock_in_use() {
        let locks = DeviceLocks::default();
        let id = ThinId::new(7).unwrap();
        let held = locks.lock(id);
        locks.forget(id);
        let same = locks.map.lock().unwrap().get(&id).cloned();
        assert!(
            same.is_some_and(|l| l.is_locked()),
            "the held lock was forgotten"
        );
        drop(held);
        locks.forget(id);
        assert!(
            locks.map.lock().unwrap().is_empty(),
            "an unused lock is dropped"
        );
    }

    #[test]
    fn grow_plans_new_sizes() {
        let s = settings(BackendKind::Dm);
        let after = plan_grow(&s, files(&s), &grow(Some("+512M"), Some("128M")), true).unwrap();
        assert_eq!(after.data, Bytes::gib(1));
        assert_eq!(after.metadata, Bytes::mib(128));
        let after = plan_grow(&s, files(&s), &grow(Some("1G"), None), true).unwrap();
        assert_eq!(after.metadata, Bytes::mib(64), "metadata unchanged");
    }

    #[test]
    fn grow_refuses_shrinking_misalignment_and_nothing() {
        let s = settings(BackendKind::Dm);
        for (data, metadata) in [
            (None, None),
            (Some("256M"), None),
            (Some("512M"), None),
            (Some("+4K"), None),
            (None, Some("32M")),
            (None, Some("+1000")),
            (None, Some("17G")),
        ] {
            let e = plan_grow(&s, files(&s), &grow(data, metadata), true).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument(_)),
                "{data:?} {metadata:?}: {e}"
            );
        }
        let e = plan_grow(&s, files(&s), &grow(Some("256M"), None), true).unwrap_err();
        assert!(e.to_string().contains("never shrink"), "{e}");
    }

    #[test]
    fn reflink_metadata_does_not_grow() {
        let s = settings(BackendKind::Reflink);
        let e = plan_grow(&s, files(&s), &grow(Some("+512M"), Some("+64M")), false).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert!(e.to_string().contains("XFS log"), "{e}");
    }

    #[test]
    fn host_room_is_checked_with_numbers() {
        let dir = Path::new("/var/lib/thinpool");
        assert!(host_has_room(dir, Bytes::gib(1), Bytes::gib(2)).is_ok());
        let e = host_has_room(dir, Bytes::gib(3), Bytes::gib(2)).unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("3 GiB") && msg.contains("2 GiB") && msg.contains("force"),
            "{msg}"
        );
    }

    #[test]
    fn space_settings_are_validated() {
        let mut s = settings(BackendKind::Dm);
        assert_eq!(s.min_free_space, PoolSettings::DEFAULT_MIN_FREE_SPACE);
        assert!(!s.autoextend_data.enabled(), "autoextend is off by default");
        s.min_free_space = crate::units::Percent(60);
        assert!(check_space_settings(&s).is_err());
    }

    #[test]
    fn settings_without_space_fields_get_defaults() {
        // A store written before min_free_space and autoextend existed.
        let mut v = serde_json::to_value(settings(BackendKind::Dm)).unwrap();
        let m = v.as_object_mut().unwrap();
        m.remove("min_free_space");
        m.remove("autoextend_data");
        m.remove("autoextend_metadata");
        let s: PoolSettings = serde_json::from_value(v).unwrap();
        assert_eq!(s.min_free_space, PoolSettings::DEFAULT_MIN_FREE_SPACE);
        assert_eq!(s.autoextend_data, AutoextendPolicy::OFF);
    }

    #[test]
    fn grow_error_for_a_size_the_filesystem_cannot_have() {
        // What resize2fs says for 100T on ext4 (probe D5); the snapshot is rolled back.
        let e = grow_error(
            Error::Command {
                program: "resize2fs".into(),
                status: "exit status: 1".into(),
                stderr: "resize2fs 1.47.0 (5-Feb-2023)\nresize2fs: New size results in too \
                         many inodes: inodes (6710878208) must be less than 4294967295\n\
                         Please run 'e2fsck -fy /dev/loop19' to fix the filesystem\n\
                         after the aborted resize operation."
                    .into(),
            },
            FsType::Ext4,
            Bytes::gib(100 << 10),
        );
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("must be less than"), "{msg}");
        assert!(!msg.contains("e2fsck") && !msg.contains("aborted"), "{msg}");
        // Other failures keep their kind, without the repair advice either.
        let e = grow_error(
            Error::Command {
                program: "resize2fs".into(),
                status: "exit status: 1".into(),
                stderr: "resize2fs: Input/output error\nPlease run 'e2fsck -fy /dev/loop3'".into(),
            },
            FsType::Ext4,
            Bytes::gib(8),
        );
        assert_eq!(e.kind(), crate::ErrorKind::Internal, "{e}");
        assert!(!e.to_string().contains("e2fsck"), "{e}");
    }
}
