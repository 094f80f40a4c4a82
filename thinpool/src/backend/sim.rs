//! A simulated backend for tests: thin devices as plain sparse files, no kernel objects.
//!
//! It needs no root, no loop devices, no device-mapper and no mkfs, so the engine, the
//! crash protocol and the gRPC services can be tested as any user. It never holds real
//! filesystems ([`Backend::holds_filesystems`] is false): the engine skips mkfs, filesystem
//! grows and journal replays, and a device node it hands out is a symlink to a regular file,
//! which `mount` refuses (ENOTBLK). `--backend auto` never picks it.
//!
//! Layout, all under `<root>/sim/`:
//! - `devices/<thin id>`: one sparse file per thin device, the device's size. A snapshot is a
//!   `FICLONE` of its origin's file where the host filesystem can, else a copy of the
//!   origin's allocated ranges (`SEEK_DATA`/`SEEK_HOLE`), so holes stay holes.
//! - `kernel.json`: the "kernel" metadata (the ids and sizes of the devices and the
//!   transaction id), replaced atomically and durably (temp file, fsync, rename, fsync of
//!   the directory) at each change, as dm-thin commits its metadata with each message. A
//!   device file is made durable before the metadata names it, and the metadata forgets a
//!   device before its file goes, so a power cut leaves at most a stray file, which open
//!   removes (dm: a device whose creation was not committed does not exist).
//! - `run/<thin id>`: the "kernel runtime state", one symlink per active device pointing at
//!   its file; the symlink is the device node. Like dm's tables it survives a daemon crash
//!   (kill -9) and is lost by a reboot: [`Backend::teardown`] (what a reboot does to the
//!   kernel) and [`power_cut`] remove it, and nothing syncs it.
//!
//! The pool's `data` and `metadata` files exist, sparse, with the pool's sizes: they give
//! the totals of [`Backend::status`] and are what `grow_data`/`grow_metadata` extend, as on
//! the real backends (the engine finishes an interrupted grow from their lengths).
//!
//! "In use": a device is busy while someone holds a `flock` on its file (through its node),
//! the stand-in for a mount or an exclusive open: `deactivate` and `delete` refuse it with
//! `FailedPrecondition`, `deactivate_deferred` leaves it to be deactivated once the lock is
//! released. Nothing in the engine takes such locks; tests do, to exercise the busy paths.
//!
//! What it does not simulate: data written through a node and not fsynced is not dropped by
//! [`power_cut`] (the host's page cache keeps it), read-only activation is not enforced, and
//! space is accounted per file (a copied snapshot's blocks count twice in `data_used`,
//! where dm-thin shares them).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{Backend, PoolEvents, PoolPaths};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil;
use crate::ids::ThinId;
use crate::loopback;
use crate::model::{AutoextendPolicy, BackendKind, BackendStatus, PoolMode, PoolSettings};
use crate::units::{Bytes, DataBlocks};

const SIM_DIR: &str = "sim";
const DEVICES_DIR: &str = "devices";
const RUN_DIR: &str = "run";
const META_FILE: &str = "kernel.json";
const META_TEMP: &str = "kernel.json.tmp";
/// Suffix of a runtime entry deactivated at last close ([`Backend::deactivate_deferred`] of a
/// busy device): listed as active until its lock is released, never handed out again.
const CLOSING: &str = ".closing";
const META_VERSION: u32 = 1;
/// Metadata a device takes, for `metadata_used`: a few btree blocks, as dm-thin's
/// per-device mapping and details entries would.
const META_PER_DEVICE: Bytes = Bytes::kib(4);

/// The "kernel" metadata: what `kernel.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Meta {
    version: u32,
    transaction_id: u64,
    devices: BTreeMap<ThinId, SimDevice>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct SimDevice {
    size: Bytes,
}

/// Thin devices as sparse files, metadata as a small JSON file. See the module documentation.
pub struct SimBackend {
    data_file: PathBuf,
    metadata_file: PathBuf,
    /// `<root>/sim`.
    dir: PathBuf,
    /// `<root>/sim/devices`.
    devices: PathBuf,
    /// `<root>/sim/run`: the runtime state, one symlink per active device.
    run: PathBuf,
    block_size: Bytes,
    /// Places the (reported) low water mark; sim has no events.
    autoextend_data: AutoextendPolicy,
    /// The metadata as last made durable. Held across each metadata write, so that changes
    /// are serialised as the kernel serialises its messages.
    meta: parking_lot::Mutex<Meta>,
}

/// The directory a sim pool keeps its files in.
fn sim_dir(root: &Path) -> PathBuf {
    root.join(SIM_DIR)
}

impl SimBackend {
    /// Creates the pool's data and metadata files (sparse) and an empty metadata file.
    /// Precondition: none of the pool's files exist. A `sim/` directory is what an
    /// interrupted create left (the engine removed the other files): it is replaced.
    pub fn create(paths: &PoolPaths, settings: &PoolSettings) -> Result<Self> {
        let dir = sim_dir(&paths.root);
        match fs::remove_dir_all(&dir) {
            Ok(()) => warn!(dir = %dir.display(), "removed what an interrupted create left"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove sim directory", &dir, e)),
        }
        let made = (|| {
            loopback::create_sparse(&paths.data_file, settings.data_size.0)?;
            loopback::create_sparse(&paths.metadata_file, settings.metadata_size.0)?;
            // As the real backends do: a full host filesystem cannot fail the metadata.
            loopback::preallocate(&paths.metadata_file)?;
            for d in [dir.clone(), dir.join(DEVICES_DIR), dir.join(RUN_DIR)] {
                fsutil::create_private_dir(&d).map_err(|e| Error::io("create directory", &d, e))?;
            }
            write_meta(
                &dir,
                &Meta {
                    version: META_VERSION,
                    ..Meta::default()
                },
            )?;
            sync_dir(&paths.root)?;
            info!(dir = %dir.display(), "sim pool created (plain files; no kernel objects)");
            Self::assemble(paths, settings)
        })();
        if made.is_err()
            && let Err(e) = fs::remove_dir_all(&dir)
        {
            warn!(error = %e, "could not clean up after a failed pool create");
        }
        made
    }

    /// Opens an existing pool after a daemon restart or a (simulated) reboot: reads the
    /// metadata and removes what a crash left that the metadata does not name (device
    /// files of uncommitted creates or of committed deletes, runtime entries of devices that
    /// no longer exist).
    pub fn open(paths: &PoolPaths, settings: &PoolSettings) -> Result<Self> {
        for f in [&paths.data_file, &paths.metadata_file] {
            if !f.exists() {
                return Err(Error::Inconsistent(format!(
                    "pool file {} is missing",
                    f.display()
                )));
            }
        }
        let dir = sim_dir(&paths.root);
        // After a reboot the runtime directory is gone: no device is active.
        let run = dir.join(RUN_DIR);
        fsutil::create_private_dir(&run).map_err(|e| Error::io("create directory", &run, e))?;
        let b = Self::assemble(paths, settings)?;
        b.remove_strays()?;
        Ok(b)
    }

    fn assemble(paths: &PoolPaths, settings: &PoolSettings) -> Result<Self> {
        let dir = sim_dir(&paths.root);
        let meta = read_meta(&dir)?;
        Ok(SimBackend {
            data_file: paths.data_file.clone(),
            metadata_file: paths.metadata_file.clone(),
            devices: dir.join(DEVICES_DIR),
            run: dir.join(RUN_DIR),
            dir,
            block_size: settings.block_size,
            autoextend_data: settings.autoextend_data,
            meta: parking_lot::Mutex::new(meta),
        })
    }

    /// Removes the "kernel objects" of a pool: its runtime state, as [`power_cut`] does
    /// (the engine removes the pool's files next when a create was interrupted; the next
    /// [`SimBackend::create`] replaces the rest).
    pub fn scrub(paths: &PoolPaths, _settings: &PoolSettings) -> Result<()> {
        power_cut(&paths.root)
    }

    /// Device files and runtime entries the metadata does not name. See [`Self::open`].
    fn remove_strays(&self) -> Result<()> {
        let meta = self.meta.lock().clone();
        let mut removed_file = false;
        for (name, id) in dir_ids(&self.devices)? {
            if id.is_none_or(|id| !meta.devices.contains_key(&id)) {
                warn!(file = ?name, "removing a device file the sim metadata does not name \
                    (a create or delete a crash interrupted)");
                let path = self.devices.join(&name);
                remove_if_exists(&path)?;
                removed_file = true;
            }
        }
        if removed_file {
            sync_dir(&self.devices)?;
        }
        for (name, id) in dir_ids(&self.run)? {
            let id = id.or_else(|| {
                name.to_str()
                    .and_then(|n| n.strip_suffix(CLOSING))
                    .and_then(parse_id)
            });
            if id.is_none_or(|id| !meta.devices.contains_key(&id)) {
                warn!(entry = ?name, "removing a runtime entry of a device that does not exist");
                remove_if_exists(&self.run.join(&name))?;
            }
        }
        Ok(())
    }

    fn device_file(&self, id: ThinId) -> PathBuf {
        self.devices.join(id.to_string())
    }

    fn node(&self, id: ThinId) -> PathBuf {
        self.run.join(id.to_string())
    }

    fn closing_node(&self, id: ThinId) -> PathBuf {
        self.run.join(format!("{id}{CLOSING}"))
    }

    /// Whether `id` has a runtime entry (not one closing).
    fn is_active(&self, id: ThinId) -> bool {
        fs::symlink_metadata(self.node(id)).is_ok()
    }

    /// The size the metadata records for `id`, or `NotFound`.
    fn recorded(&self, id: ThinId) -> Result<SimDevice> {
        self.meta
            .lock()
            .devices
            .get(&id)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("thin id {id} does not exist")))
    }

    /// Applies `change` to a copy of the metadata, bumps the transaction id, makes the result
    /// durable, and only then adopts it. Returns the new transaction id.
    fn commit(&self, change: impl FnOnce(&mut Meta) -> Result<()>) -> Result<u64> {
        let mut meta = self.meta.lock();
        let mut next = meta.clone();
        change(&mut next)?;
        next.transaction_id += 1;
        write_meta(&self.dir, &next)?;
        *meta = next;
        Ok(meta.transaction_id)
    }

    /// Fails with `FailedPrecondition` while someone holds a lock on `file`.
    fn check_unused(&self, id: ThinId, file: &Path) -> Result<()> {
        if locked(file)? {
            return Err(Error::FailedPrecondition(format!(
                "thin id {id} is in use (its node {} is held open)",
                self.node(id).display()
            )));
        }
        Ok(())
    }

    /// Drops closing entries whose device nobody holds any more: their last close happened.
    fn reap_closing(&self) -> Result<()> {
        for (name, _) in dir_ids(&self.run)? {
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(CLOSING))
                .and_then(parse_id)
            else {
                continue;
            };
            if !locked(&self.device_file(id))? {
                debug!(id = %id, "deferred deactivation done: the last holder closed");
                remove_if_exists(&self.run.join(&name))?;
            }
        }
        Ok(())
    }

    /// Allocated bytes of all device files, for `data_used`.
    fn allocated_total(&self) -> Result<Bytes> {
        let ids: Vec<ThinId> = self.meta.lock().devices.keys().copied().collect();
        let mut total = 0u64;
        for id in ids {
            let file = self.device_file(id);
            match fs::metadata(&file) {
                Ok(m) => total += m.blocks() * 512,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("stat device file", &file, e)),
            }
        }
        Ok(Bytes(total))
    }
}

impl Backend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    /// No filesystems: devices are plain files that are never formatted or mounted.
    fn holds_filesystems(&self) -> bool {
        false
    }

    /// - `data_used`: the allocated bytes of every device file (host blocks); `data_total`:
    ///   the data file's length (what `grow_data` extends).
    /// - `metadata_used`: 4 KiB per device plus the metadata file; `metadata_total`: the
    ///   metadata file's length.
    /// - `mode`: `OutOfDataSpace` once data used reaches the total, else `Rw`; never
    ///   `needs_check`.
    fn status(&self) -> Result<BackendStatus> {
        let data_total = Bytes(loopback::file_len(&self.data_file)?);
        let metadata_total = Bytes(loopback::file_len(&self.metadata_file)?);
        let data_used = self.allocated_total()?;
        let (transaction_id, devices) = {
            let m = self.meta.lock();
            (m.transaction_id, m.devices.len() as u64)
        };
        let meta_len = loopback::file_len(&self.dir.join(META_FILE))?;
        let metadata_used = Bytes(
            (META_PER_DEVICE.0 * devices + meta_len.next_multiple_of(4096)).min(metadata_total.0),
        );
        let bs = self.block_size;
        Ok(BackendStatus {
            transaction_id,
            data_used,
            data_total,
            metadata_used,
            metadata_total,
            mode: if data_used >= data_total {
                PoolMode::OutOfDataSpace
            } else {
                PoolMode::Rw
            },
            needs_check: false,
            error_if_no_space: true,
            low_water_mark: self
                .autoextend_data
                .low_water_mark(DataBlocks(data_total.0 / bs.0))
                .bytes(bs),
        })
    }

    /// Makes `devices/<id>` (sparse, `size` long, durable), then records it.
    fn create_thin(&self, id: ThinId, size: Bytes) -> Result<u64> {
        if self.meta.lock().devices.contains_key(&id) {
            return Err(Error::FailedPrecondition(format!("thin id {id} exists")));
        }
        let file = self.device_file(id);
        let made = create_device_file(&file).and_then(|f| {
            f.set_len(size.0)
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io("size device file", &file, e))?;
            sync_dir(&self.devices)
        });
        let done = made.and_then(|()| {
            failpoint::hit("sim:create_after_file");
            self.commit(|m| {
                m.devices.insert(id, SimDevice { size });
                Ok(())
            })
        });
        if done.is_err() {
            remove_quietly(&file);
        }
        done
    }

    /// Clones (or copies the allocated ranges of) the origin's file, extends it to `size`,
    /// makes it durable, then records it. An active origin is fsynced first: what it
    /// acknowledged is in the snapshot, as dm's suspend of the origin guarantees.
    fn create_snapshot(&self, id: ThinId, origin: ThinId, size: Bytes) -> Result<u64> {
        let origin_size = self.recorded(origin)?.size;
        if self.meta.lock().devices.contains_key(&id) {
            return Err(Error::FailedPrecondition(format!("thin id {id} exists")));
        }
        if size < origin_size {
            return Err(Error::InvalidArgument(format!(
                "snapshot size {size} is below its origin's {origin_size}"
            )));
        }
        let origin_file = self.device_file(origin);
        let src = File::open(&origin_file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(format!("thin id {origin} has no file")),
            _ => Error::io("open origin", &origin_file, e),
        })?;
        if self.is_active(origin) {
            src.sync_all()
                .map_err(|e| Error::io("flush active origin", &origin_file, e))?;
        }
        let file = self.device_file(id);
        let made = create_device_file(&file).and_then(|dst| {
            clone_or_copy(&src, &dst).map_err(|e| Error::io("copy origin", &file, e))?;
            dst.set_len(size.0)
                .and_then(|()| dst.sync_all())
                .map_err(|e| Error::io("size device file", &file, e))?;
            sync_dir(&self.devices)
        });
        let done = made.and_then(|()| {
            failpoint::hit("sim:create_after_file");
            self.commit(|m| {
                m.devices.insert(id, SimDevice { size });
                Ok(())
            })
        });
        if done.is_err() {
            remove_quietly(&file);
        }
        done
    }

    /// Forgets the device in the metadata (durably), then removes its file. An absent id
    /// succeeds and still advances the transaction id. Precondition: not active (else
    /// `FailedPrecondition`).
    fn delete(&self, id: ThinId) -> Result<u64> {
        if self.is_active(id) {
            return Err(Error::FailedPrecondition(format!(
                "thin id {id} is active on {}; deactivate it first",
                self.node(id).display()
            )));
        }
        let txn = self.commit(|m| {
            m.devices.remove(&id);
            Ok(())
        })?;
        failpoint::hit("sim:delete_after_metadata");
        let file = self.device_file(id);
        match fs::remove_file(&file) {
            Ok(()) => sync_dir(&self.devices)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove device file", &file, e)),
        }
        remove_if_exists(&self.closing_node(id))?;
        Ok(txn)
    }

    /// Adds the runtime entry `run/<id>` (a symlink to the device's file) and returns it; an
    /// active device returns the entry it has. `size` and `read_only` are not used.
    fn activate(&self, id: ThinId, _size: Bytes, _read_only: bool) -> Result<PathBuf> {
        let node = self.node(id);
        if self.is_active(id) {
            return Ok(node);
        }
        self.recorded(id)?;
        let file = self.device_file(id);
        match std::os::unix::fs::symlink(&file, &node) {
            Ok(()) => Ok(node),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(node),
            Err(e) => Err(Error::io("create device node", &node, e)),
        }
    }

    /// Removes the runtime entry. `FailedPrecondition` while the device is held (see the
    /// module documentation). An inactive or absent device succeeds.
    fn deactivate(&self, id: ThinId) -> Result<()> {
        if !self.is_active(id) {
            return Ok(());
        }
        self.check_unused(id, &self.device_file(id))?;
        remove_if_exists(&self.node(id))
    }

    /// The device file is fsynced: what was written through the node is durable, and a
    /// snapshot (a copy of the file) holds it.
    fn flush(&self, id: ThinId) -> Result<()> {
        if !self.is_active(id) {
            return Ok(());
        }
        let file = self.device_file(id);
        File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("fsync device file", &file, e))
    }

    /// Deactivates now if the device is not held; else renames its entry to
    /// `run/<id>.closing`, which goes once the holder lets go (checked on later calls), and
    /// which is never handed out again: a later activate makes a fresh entry.
    fn deactivate_deferred(&self, id: ThinId) -> Result<()> {
        match self.deactivate(id) {
            Ok(()) => Ok(()),
            Err(Error::FailedPrecondition(_)) => {
                let (from, to) = (self.node(id), self.closing_node(id));
                fs::rename(&from, &to).map_err(|e| Error::io("defer deactivation", &from, e))
            }
            Err(e) => Err(e),
        }
    }

    /// The runtime entries: active devices, and closing ones still held (after an active
    /// entry of the same id, which wins).
    fn active_devices(&self) -> Result<BTreeMap<ThinId, PathBuf>> {
        self.reap_closing()?;
        let mut found = BTreeMap::new();
        let mut closing = Vec::new();
        for (name, id) in dir_ids(&self.run)? {
            match id {
                Some(id) => {
                    found.insert(id, self.run.join(&name));
                }
                None => {
                    if let Some(id) = name
                        .to_str()
                        .and_then(|n| n.strip_suffix(CLOSING))
                        .and_then(parse_id)
                    {
                        closing.push((id, self.run.join(&name)));
                    }
                }
            }
        }
        for (id, node) in closing {
            found.entry(id).or_insert(node);
        }
        Ok(found)
    }

    /// Bytes of the device's file in allocated ranges (`SEEK_DATA`/`SEEK_HOLE`), counted in
    /// whole pool blocks, as dm-thin counts mapped blocks. `size` is not used.
    fn mapped_bytes(&self, id: ThinId, _size: Bytes) -> Result<Bytes> {
        self.recorded(id)?;
        let file = self.device_file(id);
        let f = File::open(&file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(format!("thin id {id} has no file")),
            _ => Error::io("open device file", &file, e),
        })?;
        let bs = self.block_size.0;
        let mut blocks = 0u64;
        // One past the last block counted: ranges are sorted, so a block shared by two
        // ranges is counted once.
        let mut next_free = 0u64;
        for (start, end) in data_ranges(&f).map_err(|e| Error::io("SEEK_DATA", &file, e))? {
            let first = (start / bs).max(next_free);
            let last = end.div_ceil(bs);
            if last > first {
                blocks += last - first;
                next_free = last;
            }
        }
        Ok(Bytes(blocks * bs))
    }

    /// The ids `kernel.json` holds, read from the file (not from memory).
    fn list_ids(&self) -> Result<BTreeSet<ThinId>> {
        Ok(read_meta(&self.dir)?.devices.into_keys().collect())
    }

    /// Extends the data file (durably); the status reads its length, so the pool has grown.
    fn grow_data(&self, size: Bytes, _low_water_mark: DataBlocks) -> Result<()> {
        loopback::extend(&self.data_file, size.0)?;
        failpoint::hit("grow:after_file");
        info!(size = %size, "sim pool data grown");
        Ok(())
    }

    /// Extends the metadata file (durably, and allocated, as dm does), as
    /// [`Backend::grow_data`].
    fn grow_metadata(&self, size: Bytes) -> Result<()> {
        loopback::extend(&self.metadata_file, size.0)?;
        loopback::preallocate(&self.metadata_file)?;
        failpoint::hit("grow:after_file");
        info!(size = %size, "sim pool metadata grown");
        Ok(())
    }

    /// True, as on dm: the metadata is a space that fills and grows.
    fn metadata_grows(&self) -> bool {
        true
    }

    fn events(&self) -> Result<Option<Box<dyn PoolEvents>>> {
        Ok(None)
    }

    /// Removes the runtime state, as a reboot would. `FailedPrecondition`, changing nothing,
    /// while a device is held.
    fn teardown(&self) -> Result<()> {
        self.reap_closing()?;
        for (name, id) in dir_ids(&self.run)? {
            let id = id.or_else(|| {
                name.to_str()
                    .and_then(|n| n.strip_suffix(CLOSING))
                    .and_then(parse_id)
            });
            if let Some(id) = id {
                self.check_unused(id, &self.device_file(id))?;
            }
        }
        clear_run_dir(&self.run)?;
        info!(dir = %self.dir.display(), "sim pool torn down (runtime state removed)");
        Ok(())
    }
}

/// Simulates a power cut of the pool at `root` (whose daemon is gone): drops the runtime
/// state, whatever holds it, as [`Backend::teardown`] does without its checks. Everything
/// else the backend writes is durable when its call returns, so it survives.
pub fn power_cut(root: &Path) -> Result<()> {
    let run = sim_dir(root).join(RUN_DIR);
    clear_run_dir(&run)
}

fn clear_run_dir(run: &Path) -> Result<()> {
    match fs::remove_dir_all(run) {
        Ok(()) => {}
        // No pool here (yet): nothing to clear, nothing to make.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !run.parent().is_some_and(Path::exists) {
                return Ok(());
            }
        }
        Err(e) => return Err(Error::io("remove runtime state", run, e)),
    }
    // Recreated at once: the pool object may live on (a refused take-down rolls back).
    fsutil::create_private_dir(run).map_err(|e| Error::io("create directory", run, e))
}

fn parse_id(name: &str) -> Option<ThinId> {
    // Only canonical decimal names are ours ("007" is not).
    let n: u32 = name.parse().ok()?;
    (n.to_string() == name)
        .then(|| ThinId::new(n).ok())
        .flatten()
}

/// The entries of `dir`, each with the id its name is (if it is one).
fn dir_ids(dir: &Path) -> Result<Vec<(std::ffi::OsString, Option<ThinId>)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry
            .map_err(|e| Error::io("list directory", dir, e))?
            .file_name();
        let id = name.to_str().and_then(parse_id);
        out.push((name, id));
    }
    Ok(out)
}

/// Whether someone holds a `flock` on `file`: a non-blocking exclusive lock fails.
fn locked(file: &Path) -> Result<bool> {
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("open device file", file, e)),
    };
    // SAFETY: flock on a descriptor we own; it is released when `f` closes.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(false);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(true),
        _ => Err(Error::io("flock device file", file, e)),
    }
}

/// Creates (or truncates a stray) device file. The caller has checked the metadata does not
/// name the id, so a file there is one a crash left.
fn create_device_file(file: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(fsutil::PRIVATE_FILE_MODE)
        .open(file)
        .map_err(|e| Error::io("create device file", file, e))
}

fn remove_quietly(file: &Path) {
    if let Err(e) = fs::remove_file(file)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(file = %file.display(), error = %e, "could not remove a half-made device file");
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

/// Replaces `kernel.json` atomically and durably: temp file, fsync, rename, fsync(dir).
fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    let tmp = dir.join(META_TEMP);
    let text = serde_json::to_vec(meta)
        .map_err(|e| Error::Inconsistent(format!("cannot encode the sim metadata: {e}")))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(fsutil::PRIVATE_FILE_MODE)
        .open(&tmp)
        .map_err(|e| Error::io("create sim metadata", &tmp, e))?;
    f.write_all(&text)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write sim metadata", &tmp, e))?;
    let dst = dir.join(META_FILE);
    fs::rename(&tmp, &dst).map_err(|e| Error::io("rename sim metadata", &dst, e))?;
    sync_dir(dir)
}

fn read_meta(dir: &Path) -> Result<Meta> {
    let file = dir.join(META_FILE);
    let text = fs::read(&file).map_err(|e| Error::io("read sim metadata", &file, e))?;
    let meta: Meta = serde_json::from_slice(&text)
        .map_err(|e| Error::Inconsistent(format!("{} is not sim metadata: {e}", file.display())))?;
    if meta.version != META_VERSION {
        return Err(Error::Inconsistent(format!(
            "{} has version {}; this build reads version {META_VERSION}",
            file.display(),
            meta.version
        )));
    }
    Ok(meta)
}

/// The allocated ranges `[start, end)` of `f`, from `SEEK_DATA`/`SEEK_HOLE`.
fn data_ranges(f: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        let (start, end) = (start as u64, (end as u64).min(len));
        if end > start {
            out.push((start, end));
        }
        pos = end.max(start + 1);
    }
    Ok(out)
}

/// Makes `dst` (empty) a copy of `src`: a whole-file `FICLONE` where the filesystem shares
/// blocks, else the allocated ranges copied, so `dst` is as sparse as `src`.
fn clone_or_copy(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS) => {}
        _ => return Err(e),
    }
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in data_ranges(src)? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            let got = src.read_at(&mut buf[..n], off)?;
            if got == 0 {
                break; // the file shrank under us; the rest reads as zeros
            }
            dst.write_all_at(&buf[..got], off)?;
            off += got as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(root: &Path) -> SimBackend {
        let paths = PoolPaths::new(root);
        let settings = PoolSettings {
            backend: BackendKind::Sim,
            data_size: Bytes::mib(64),
            metadata_size: Bytes::mib(4),
            block_size: Bytes::kib(64),
            base_size: Bytes::mib(16),
            fs: crate::model::FsType::Ext4,
            mkfs_options: Vec::new(),
            mount_options: Vec::new(),
            error_if_no_space: true,
            min_free_space: crate::units::Percent(10),
            autoextend_data: AutoextendPolicy::OFF,
            autoextend_metadata: AutoextendPolicy::OFF,
            tag: "t".into(),
        };
        SimBackend::create(&paths, &settings).unwrap()
    }

    fn id(n: u32) -> ThinId {
        ThinId::new(n).unwrap()
    }

    #[test]
    fn snapshot_copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        assert_eq!(b.create_thin(id(1), Bytes::mib(16)).unwrap(), 1);
        let node = b.activate(id(1), Bytes::mib(16), false).unwrap();
        let f = OpenOptions::new().write(true).open(&node).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        drop(f);
        assert_eq!(b.mapped_bytes(id(1), Bytes(0)).unwrap(), Bytes::kib(64));
        assert_eq!(b.create_snapshot(id(2), id(1), Bytes::mib(32)).unwrap(), 2);
        let copy = fs::read(b.device_file(id(2))).unwrap();
        assert_eq!(copy.len(), 32 << 20);
        assert_eq!(&copy[(1 << 20)..(1 << 20) + 4096], &[7u8; 4096][..]);
        assert_eq!(b.mapped_bytes(id(2), Bytes(0)).unwrap(), Bytes::kib(64));
        assert_eq!(b.added_bytes(id(2), id(1)).unwrap(), Bytes(0));
        assert_eq!(
            b.list_ids().unwrap(),
            [id(1), id(2)].into_iter().collect::<BTreeSet<_>>()
        );
    }

    #[test]
    fn delete_refuses_an_active_device_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        b.create_thin(id(1), Bytes::mib(16)).unwrap();
        b.activate(id(1), Bytes::mib(16), false).unwrap();
        assert!(matches!(b.delete(id(1)), Err(Error::FailedPrecondition(_))));
        b.deactivate(id(1)).unwrap();
        b.deactivate(id(1)).unwrap();
        assert_eq!(b.delete(id(1)).unwrap(), 2);
        assert_eq!(b.delete(id(1)).unwrap(), 3);
        assert!(b.list_ids().unwrap().is_empty());
        assert!(!b.device_file(id(1)).exists());
    }

    #[test]
    fn a_held_device_refuses_deactivate_and_closes_deferred() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        b.create_thin(id(1), Bytes::mib(16)).unwrap();
        let node = b.activate(id(1), Bytes::mib(16), false).unwrap();
        let holder = File::open(&node).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_SH) }, 0);
        assert!(matches!(
            b.deactivate(id(1)),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(b.teardown(), Err(Error::FailedPrecondition(_))));
        b.deactivate_deferred(id(1)).unwrap();
        // Listed while held, but a fresh activation gets a fresh node.
        assert!(b.active_devices().unwrap().contains_key(&id(1)));
        assert!(!b.is_active(id(1)));
        drop(holder);
        assert!(b.active_devices().unwrap().is_empty());
    }

    #[test]
    fn reopen_keeps_runtime_state_and_removes_strays() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        b.create_thin(id(1), Bytes::mib(16)).unwrap();
        b.activate(id(1), Bytes::mib(16), false).unwrap();
        // A create the metadata never recorded (a crash between the file and the commit).
        fs::write(b.device_file(id(9)), b"x").unwrap();
        let paths = PoolPaths::new(dir.path());
        let settings = PoolSettings {
            backend: BackendKind::Sim,
            block_size: Bytes::kib(64),
            ..serde_json::from_value(serde_json::json!({
                "backend": "sim", "data_size": 1, "metadata_size": 1, "block_size": 65536,
                "base_size": 1, "fs": "ext4", "mkfs_options": [], "mount_options": [],
                "error_if_no_space": true, "tag": "t"
            }))
            .unwrap()
        };
        drop(b);
        let b = SimBackend::open(&paths, &settings).unwrap();
        assert!(!b.device_file(id(9)).exists());
        assert_eq!(b.status().unwrap().transaction_id, 1);
        // A daemon crash keeps the device active; a power cut does not.
        assert!(b.active_devices().unwrap().contains_key(&id(1)));
        power_cut(dir.path()).unwrap();
        let b = SimBackend::open(&paths, &settings).unwrap();
        assert!(b.active_devices().unwrap().is_empty());
        assert_eq!(b.list_ids().unwrap().len(), 1);
    }
}
