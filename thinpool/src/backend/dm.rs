//! The dm backend: the kernel's dm-thin target over two loop devices.
//!
//! Kernel objects, all named `thinpool-<tag>-…` so that a pool's objects are found again
//! after a crash and never collide with another pool's:
//! - `-meta` and `-data`: linear devices over the metadata and data loop devices (a level of
//!   indirection that lets us grow them with a table reload);
//! - `-pool`: the thin-pool;
//! - `-thin-<id>`: one thin device per active device.
//!
//! Every call here is a blocking ioctl through the devicemapper crate; we never fork dmsetup.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use devicemapper::{
    DM, DataBlocks as DmDataBlocks, DevId, Device, DmDevice, DmError, DmFlags, DmName, DmNameBuf,
    DmOptions, ErrorEnum, LinearDev, LinearDevTargetParams, LinearTargetParams,
    Sectors as DmSectors, TargetLine, TargetTable, ThinPoolDev, ThinPoolNoSpacePolicy,
    ThinPoolStatus, ThinPoolStatusSummary, ThinPoolWorkingStatus,
};
use tracing::{error, info, warn};

use super::{Backend, PoolEvents, PoolPaths};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil;
use crate::ids::ThinId;
use crate::loopback::{self, LoopOptions};
use crate::model::{BackendKind, BackendStatus, PoolMode, PoolSettings};
use crate::units::{Bytes, DataBlocks};

/// Bytes per metadata block, as dm-thin reports metadata usage.
const META_BLOCK: u64 = 4096;
/// How often, and how far apart, a remove that fails with EBUSY is tried (review #15).
const REMOVE_RETRIES: u32 = 10;
const REMOVE_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

pub struct DmBackend {
    dm: DM,
    names: Names,
    paths: PoolPaths,
    block_size: Bytes,
    /// The pool and its linear devices, with the tables we loaded. Locked only to change
    /// those tables (a grow); status and messages go to the kernel by name without it.
    pool: parking_lot::Mutex<ThinPoolDev>,
    /// Pool messages and thin table loads hold it shared, a table reload of the pool
    /// exclusively: no message or new thin device reaches the pool while it is suspended
    /// for a reload, and a reload waits for those in flight. Messages do not exclude each other, so this serialises nothing
    /// but the rare reload.
    reload: parking_lot::RwLock<()>,
    /// The pool's (major, minor), which every thin table names.
    pool_dev: Device,
    /// The metadata linear device's node, for thin_ls.
    meta_node: PathBuf,
    data_loop: PathBuf,
    meta_loop: PathBuf,
    /// The low water mark in the pool's live table, in data blocks.
    low_water_mark: AtomicU64,
    /// Our view of the kernel's transaction id. No lock pairs a message with the
    /// `set_transaction_id` after it: the kernel's own compare-and-swap orders concurrent
    /// bumps (see [`DmBackend::bump_txn`]), and reconcile never needs to know which message a
    /// given id committed, only that the kernel's id never falls behind our records.
    txn: AtomicU64,
    /// The kernel keeps one metadata snapshot at a time: concurrent `thin_ls` runs (an
    /// audit and a scrape, two scrapes) take turns.
    metadata_snap: parking_lot::Mutex<()>,
    /// Mapped bytes of inactive devices. A device's mapping changes only while it is
    /// active, so a figure read when it was deactivated (its last status), or by one
    /// `thin_ls` for all of them, holds until it is activated, created or deleted. Usage
    /// (CRI asks every 10 s) and Commit then read no metadata snapshot. Ordering: every
    /// kernel change of a device drops its entry *after* the change, and a fill holds the
    /// lock from its look at the active devices to its inserts, so a fill never leaves an
    /// entry for a device that a concurrent change has made active or new.
    inactive_mapped: parking_lot::Mutex<HashMap<ThinId, Bytes>>,
}

/// What the kernel's status of one thin device says.
enum ThinStatus {
    Inactive,
    Mapped(Bytes),
    /// The pool has failed: no figures.
    Failed,
}

/// The kernel names of a pool's objects.
struct Names {
    tag: String,
}

impl Names {
    fn name(&self, suffix: &str) -> DmNameBuf {
        DmNameBuf::new(format!("thinpool-{}-{suffix}", self.tag))
            .expect("our names are short ASCII")
    }
    fn meta(&self) -> DmNameBuf {
        self.name("meta")
    }
    fn data(&self) -> DmNameBuf {
        self.name("data")
    }
    fn pool(&self) -> DmNameBuf {
        self.name("pool")
    }
    fn thin(&self, id: ThinId) -> DmNameBuf {
        self.name(&format!("thin-{id}"))
    }
    /// The thin id in one of our thin device names.
    fn parse_thin(&self, name: &str) -> Option<ThinId> {
        let prefix = format!("thinpool-{}-thin-", self.tag);
        ThinId::new(name.strip_prefix(&prefix)?.parse().ok()?).ok()
    }
    fn is_ours(&self, name: &str) -> bool {
        name.starts_with(&format!("thinpool-{}-", self.tag))
    }
}

fn errno_of(e: &DmError) -> Option<nix::errno::Errno> {
    crate::error::dm_errno(e)
}

fn dm_err(context: impl Into<String>) -> impl FnOnce(DmError) -> Error {
    let context = context.into();
    move |e| Error::dm(context, e)
}

fn dev_of(path: &Path) -> Result<Device> {
    let (major, minor) = loopback::dev_numbers(path)?;
    Ok(Device { major, minor })
}

fn linear_table(dev: Device, len: DmSectors) -> Vec<TargetLine<LinearDevTargetParams>> {
    vec![TargetLine::new(
        DmSectors(0),
        len,
        LinearDevTargetParams::Linear(LinearTargetParams::new(dev, DmSectors(0))),
    )]
}

/// The linear device `name` over the loop device `dev` of a file `len` long.
///
/// A live device (daemon restart) is adopted with the table it has, which may be shorter
/// than the file: a crash between extending the file and reloading the kernel leaves it so,
/// and the engine then finishes the grow. It must map `dev`, and nothing else.
fn linear_dev(dm: &DM, name: &DmName, dev: Device, len: Bytes) -> Result<LinearDev> {
    let what = name.to_string();
    let table = match dm.device_info(&DevId::Name(name)) {
        Ok(_) => {
            let live = LinearDev::read_kernel_table(dm, &DevId::Name(name))
                .map_err(dm_err(format!("read the table of {what}")))?
                .table;
            let ours = matches!(live.as_slice(),
                [TargetLine { start: DmSectors(0), params: LinearDevTargetParams::Linear(p), .. }]
                    if p.device == dev && p.start_offset == DmSectors(0));
            if !ours {
                return Err(Error::Inconsistent(format!(
                    "live device {what} does not map the pool file's loop device \
                     {}:{} alone: {live:?}",
                    dev.major, dev.minor
                )));
            }
            live
        }
        Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => {
            linear_table(dev, DmSectors(len.sectors().0))
        }
        Err(e) => return Err(Error::dm(format!("look up {what}"), e)),
    };
    LinearDev::setup(dm, name, None, table).map_err(dm_err(format!("set up {what}")))
}

/// Brings a live pool's table up to the length of its (live) data device, which it lags
/// only when a crash came between reloading the data device and reloading the pool in a
/// grow. A pool that is not live is left to be created.
fn sync_pool_length(dm: &DM, name: &DmName, data_len: DmSectors) -> Result<()> {
    let id = DevId::Name(name);
    match dm.device_info(&id) {
        Ok(_) => {}
        Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => return Ok(()),
        Err(e) => return Err(Error::dm("look up thin-pool", e)),
    }
    let mut table =
        ThinPoolDev::read_kernel_table(dm, &id).map_err(dm_err("read the thin-pool table"))?;
    if table.table.length == data_len {
        return Ok(());
    }
    if table.table.length > data_len {
        return Err(Error::Inconsistent(format!(
            "the live thin-pool is {} long but its data device only {data_len}",
            table.table.length
        )));
    }
    warn!(pool = %table.table.length, data = %data_len,
        "the live thin-pool lags its data device (a grow was interrupted); reloading it");
    table.table.length = data_len;
    dm.table_load(&id, &table.to_raw_table(), DmOptions::default())
        .map_err(dm_err("load the grown thin-pool table"))?;
    dm.device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
        .map_err(dm_err("suspend thin-pool"))?;
    // Resuming swaps the loaded table in.
    dm.device_suspend(&id, DmOptions::private())
        .map_err(dm_err("resume thin-pool"))?;
    Ok(())
}

/// The thin-pool status of the pool named `name`, without the `ThinPoolDev` (and its lock).
fn pool_status(
    dm: &DM,
    name: &DmName,
    options: DmOptions,
) -> std::result::Result<ThinPoolStatus, DmError> {
    let (_, lines) = dm.table_status(&DevId::Name(name), options)?;
    match lines.as_slice() {
        [line] => line.3.parse(),
        _ => Err(DmError::Dm(
            ErrorEnum::Invalid,
            format!("expected one thin-pool status line, got {lines:?}"),
        )),
    }
}

impl DmBackend {
    /// Checks that device-mapper is reachable and has the thin-pool target; returns the dm
    /// version. This is what `--backend auto` asks.
    pub fn probe() -> Result<String> {
        let dm = DM::new().map_err(dm_err("open /dev/mapper/control"))?;
        let (a, b, c) = dm.version().map_err(dm_err("dm version"))?;
        if !fs::read_to_string("/proc/modules")
            .map(|m| m.contains("dm_thin_pool"))
            .unwrap_or(false)
        {
            // Built in or loadable: modprobe is how the kernel's own tools load it.
            let status = std::process::Command::new("modprobe")
                .arg("dm-thin-pool")
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                return Err(Error::FailedPrecondition(
                    "the dm-thin-pool kernel module is not loaded and modprobe failed".into(),
                ));
            }
        }
        Ok(format!("{a}.{b}.{c}"))
    }

    pub fn create(paths: &PoolPaths, settings: &PoolSettings) -> Result<DmBackend> {
        let dm = DM::new().map_err(dm_err("open /dev/mapper/control"))?;
        loopback::create_sparse(&paths.data_file, settings.data_size.0)?;
        loopback::create_sparse(&paths.metadata_file, settings.metadata_size.0)?;
        loopback::preallocate(&paths.metadata_file)?;
        // A fresh sparse file reads as zeros, which is what the kernel needs to see in the
        // first 4 KiB of new metadata: it then formats it instead of reading garbage.
        Self::assemble(dm, paths, settings, true)
    }

    pub fn open(paths: &PoolPaths, settings: &PoolSettings) -> Result<DmBackend> {
        let dm = DM::new().map_err(dm_err("open /dev/mapper/control"))?;
        for f in [&paths.data_file, &paths.metadata_file] {
            if !f.exists() {
                return Err(Error::Inconsistent(format!(
                    "pool file {} is missing",
                    f.display()
                )));
            }
        }
        Self::assemble(dm, paths, settings, false)
    }

    /// Sets up loop, linear and pool devices, adopting any that are still live (daemon
    /// restart) and creating the rest (host reboot or a new pool).
    fn assemble(dm: DM, paths: &PoolPaths, settings: &PoolSettings, fresh: bool) -> Result<Self> {
        let names = Names {
            tag: settings.tag.clone(),
        };
        let meta_loop = loopback::find_or_attach(&paths.metadata_file, LoopOptions::POOL_FILE)?;
        let data_loop = loopback::find_or_attach(&paths.data_file, LoopOptions::POOL_FILE)?;
        let meta_len = Bytes(loopback::file_len(&paths.metadata_file)?);
        let data_len = Bytes(loopback::file_len(&paths.data_file)?);
        // A live loop device is shorter than its file if a crash came between extending the
        // file and LOOP_SET_CAPACITY in a grow.
        loopback::ensure_capacity(&meta_loop, meta_len.0)?;
        loopback::ensure_capacity(&data_loop, data_len.0)?;
        let meta = linear_dev(&dm, &names.meta(), dev_of(&meta_loop)?, meta_len)?;
        let data = linear_dev(&dm, &names.data(), dev_of(&data_loop)?, data_len)?;
        if !fresh {
            sync_pool_length(&dm, &names.pool(), data.size())?;
        }
        let block_sectors = DmSectors(settings.block_size.sectors().0);
        // The pool is as long as its data device, which a live one may have shorter than the
        // file (the engine finishes the grow); the low water mark is for that length.
        let total_blocks = DataBlocks(data.size().0 * 512 / settings.block_size.0);
        let lwm = DmDataBlocks(settings.low_water_mark(total_blocks).0);
        let mut features = vec![];
        if settings.error_if_no_space {
            features.push("error_if_no_space".to_string());
        }
        let pool = if fresh {
            ThinPoolDev::new(
                &dm,
                &names.pool(),
                None,
                meta,
                data,
                block_sectors,
                lwm,
                features,
            )
            .map_err(dm_err("create thin-pool"))?
        } else {
            let pool = ThinPoolDev::setup(
                &dm,
                &names.pool(),
                None,
                meta,
                data,
                block_sectors,
                lwm,
                features.clone(),
            )
            .map_err(dm_err("set up thin-pool"))?;
            Self::check_metadata(&dm, &names, pool, block_sectors, lwm, features, &paths.root)?
        };
        let pool_dev = pool.device();
        let meta_node = pool.meta_dev().devnode();
        let txn = match pool
            .status(&dm, DmOptions::default())
            .map_err(dm_err("pool status"))?
        {
            ThinPoolStatus::Working(w) => w.transaction_id,
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "thin-pool is in state {other:?}; run thin_check/thin_repair on {}",
                    paths.metadata_file.display()
                )));
            }
        };
        let live_lwm = ThinPoolDev::read_kernel_table(&dm, &DevId::Name(&names.pool()))
            .map_err(dm_err("read the thin-pool table"))?
            .table
            .params
            .low_water_mark;
        let backend = DmBackend {
            metadata_snap: parking_lot::Mutex::new(()),
            inactive_mapped: parking_lot::Mutex::new(HashMap::new()),
            dm,
            names,
            paths: paths.clone(),
            block_size: settings.block_size,
            pool: parking_lot::Mutex::new(pool),
            reload: parking_lot::RwLock::new(()),
            pool_dev,
            meta_node,
            data_loop,
            meta_loop,
            low_water_mark: AtomicU64::new(live_lwm.0),
            txn: AtomicU64::new(txn),
        };
        backend.resume_suspended()?;
        backend.release_held_metadata_snap()?;
        info!(pool = %backend.names.pool().to_string(), "dm thin pool assembled");
        if live_lwm != lwm {
            // A live pool keeps the mark it was loaded with; the autoextend settings (which
            // place it) may have changed since.
            info!(
                from = live_lwm.0,
                to = lwm.0,
                "setting the pool's low water mark (blocks)"
            );
            backend.reload_pool("set the low water mark", |pool, dm| {
                pool.set_low_water_mark(dm, lwm)
            })?;
            backend.low_water_mark.store(lwm.0, Ordering::SeqCst);
        }
        Ok(backend)
    }

    /// Suspends the pool, applies `change` (table loads), and resumes the pool on every path:
    /// a pool left suspended hangs every container on it. Suspending the pool suspends its
    /// active thin devices too (the kernel does it, without flushing), so their I/O waits
    /// for the few milliseconds this takes and then goes on.
    ///
    /// If the kernel refuses the new table at resume, the old tables are loaded again so the
    /// pool comes back as it was.
    fn reload_pool(
        &self,
        what: &str,
        change: impl FnOnce(&mut ThinPoolDev, &DM) -> std::result::Result<(), DmError>,
    ) -> Result<()> {
        let _no_messages = self.reload.write();
        let mut pool = self.pool.lock();
        let old_data = pool.data_dev().table().table.clone();
        let old_meta = pool.meta_dev().table().table.clone();
        let old_lwm = pool.table().table.params.low_water_mark;
        pool.suspend(&self.dm, DmOptions::default())
            .map_err(dm_err(format!("suspend the pool to {what}")))?;
        let changed = change(&mut pool, &self.dm);
        let resumed = pool.resume(&self.dm);
        match (changed, resumed) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) => Err(Error::dm(what, e)),
            (_, Err(resume)) => {
                error!(error = %resume, "{what}: the pool did not resume; loading the old tables");
                let restored = pool
                    .set_meta_table(&self.dm, old_meta)
                    .and_then(|()| pool.set_data_table(&self.dm, old_data))
                    .and_then(|()| pool.set_low_water_mark(&self.dm, old_lwm))
                    .and_then(|()| pool.resume(&self.dm));
                Err(match restored {
                    Ok(()) => Error::Dm {
                        context: what.to_string(),
                        errno: errno_of(&resume),
                        message: format!(
                            "the kernel refused the new table at resume ({resume}); the pool \
                             is back as it was (see the kernel log)"
                        ),
                    },
                    Err(e) => Error::Dm {
                        context: what.to_string(),
                        errno: errno_of(&resume),
                        message: format!(
                            "the pool did not resume ({resume}) and neither did it with its \
                             old tables ({e}): it is SUSPENDED and its devices hang until \
                             `dmsetup resume {}` succeeds",
                            &*self.names.pool()
                        ),
                    },
                })
            }
        }
    }

    /// The kernel's status of the pool, working; an error otherwise.
    fn working_status(&self) -> Result<Box<ThinPoolWorkingStatus>> {
        match pool_status(
            &self.dm,
            &self.names.pool(),
            DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
        )
        .map_err(dm_err("pool status"))?
        {
            ThinPoolStatus::Working(w) => Ok(w),
            other => Err(Error::FailedPrecondition(format!(
                "the thin-pool is in state {other:?}"
            ))),
        }
    }

    /// If the kernel flagged the metadata as needing a check, takes the pool down, runs
    /// `thin_check --clear-needs-check-flag` on the metadata device, and brings it back.
    /// Fails (leaving the pool down) if the check finds damage.
    fn check_metadata(
        dm: &DM,
        names: &Names,
        mut pool: ThinPoolDev,
        block_sectors: DmSectors,
        lwm: DmDataBlocks,
        features: Vec<String>,
        root: &Path,
    ) -> Result<ThinPoolDev> {
        let needs_check = match pool.status(dm, DmOptions::default()) {
            Ok(ThinPoolStatus::Working(w)) => w.needs_check,
            Ok(_) => true,
            Err(e) => return Err(Error::dm("pool status", e)),
        };
        if !needs_check {
            return Ok(pool);
        }
        warn!("thin-pool metadata needs a check; running thin_check before activating devices");
        let meta_node = pool.meta_dev().devnode();
        // The pool must be down while thin_check reads its metadata.
        if let Err(e) = dm.device_remove(&DevId::Name(&names.pool()), DmOptions::default()) {
            if errno_of(&e) != Some(nix::errno::Errno::EBUSY) {
                return Err(Error::dm("remove thin-pool for thin_check", e));
            }
            let busy: Vec<String> = dm
                .list_devices()
                .map(|l| {
                    l.into_iter()
                        .filter_map(|(n, _, _)| names.parse_thin(&n.to_string()))
                        .map(|id| id.to_string())
                        .collect()
                })
                .unwrap_or_default();
            return Err(Error::FailedPrecondition(format!(
                "the pool's metadata needs a check, which needs the pool down, but thin \
                 devices are active on it: {}; stop the containers using them (unmount \
                 them), then restart thinpoold",
                if busy.is_empty() {
                    "(none found; see dmsetup ls)".to_string()
                } else {
                    busy.join(", ")
                }
            )));
        }
        if let Err(e) = fsutil::run(
            "thin_check",
            &[
                "-q".as_ref(),
                "--clear-needs-check-flag".as_ref(),
                meta_node.as_os_str(),
            ],
        ) {
            return Err(Error::Inconsistent(format!(
                "thin_check found damage in the pool metadata ({e}); the pool is down and \
                 its devices stay inactive. Repair it offline with `thinctl pool repair \
                 --root {}` (docs/recovery.md)",
                root.display()
            )));
        }
        let meta = LinearDev::setup(
            dm,
            &names.meta(),
            None,
            pool.meta_dev().table().table.clone(),
        )
        .map_err(dm_err("set up metadata linear device"))?;
        let data = LinearDev::setup(
            dm,
            &names.data(),
            None,
            pool.data_dev().table().table.clone(),
        )
        .map_err(dm_err("set up data linear device"))?;
        pool = ThinPoolDev::setup(
            dm,
            &names.pool(),
            None,
            meta,
            data,
            block_sectors,
            lwm,
            features,
        )
        .map_err(dm_err("set up thin-pool after thin_check"))?;
        info!("thin_check passed; needs_check cleared");
        Ok(pool)
    }

    /// Resumes a snapshot's origin after `create_snap`, retrying a few times: a suspended
    /// origin hangs every process on it (its filesystem is frozen). Every failure is logged;
    /// the last one is returned, naming the command that resumes it by hand (and the failed
    /// create, if `made` failed too).
    fn resume_origin(&self, origin: ThinId, id: &DevId<'_>, made: Option<&Error>) -> Result<()> {
        const DELAYS_MS: [u64; 4] = [0, 10, 100, 500];
        let mut last = None;
        for (attempt, delay) in DELAYS_MS.into_iter().enumerate() {
            std::thread::sleep(std::time::Duration::from_millis(delay));
            match self.dm.device_suspend(id, DmOptions::default()) {
                Ok(_) => {
                    if attempt > 0 {
                        info!(origin = %origin, attempt, "origin resumed after a retry");
                    }
                    return Ok(());
                }
                Err(e) => {
                    error!(origin = %origin, attempt, error = %e,
                        "resuming a snapshot's origin failed");
                    last = Some(e);
                }
            }
        }
        let e = last.expect("at least one attempt");
        Err(Error::Dm {
            context: format!("resume origin {origin}"),
            errno: errno_of(&e),
            message: format!(
                "{e}{}: the origin is SUSPENDED and its users hang until `dmsetup resume {}` \
                 succeeds (thinpoold also resumes it at its next start)",
                made.map(|m| format!(" (after the snapshot itself failed: {m})"))
                    .unwrap_or_default(),
                &*self.names.thin(origin)
            ),
        })
    }

    /// Resumes any of our devices left suspended by a crash in the middle of a snapshot.
    fn resume_suspended(&self) -> Result<()> {
        for (name, _, _) in self.dm.list_devices().map_err(dm_err("list devices"))? {
            let name_str = name.to_string();
            if !self.names.is_ours(&name_str) {
                continue;
            }
            let info = self
                .dm
                .device_info(&DevId::Name(&name))
                .map_err(dm_err("device info"))?;
            if info.flags().contains(DmFlags::DM_SUSPEND) {
                warn!(device = %name_str, "resuming a device a crash left suspended");
                self.dm
                    .device_suspend(&DevId::Name(&name), DmOptions::default())
                    .map_err(dm_err(format!("resume {name_str}")))?;
            }
        }
        Ok(())
    }

    /// Releases a metadata snapshot that a crash between `reserve_metadata_snap` and its
    /// release left held. The held root lives in the pool's metadata, survives restarts and
    /// reboots, and makes every later reserve (so every `thin_ls`: audits, per-device
    /// metrics) fail with EBUSY. Only this process uses the pool (it holds the root's lock),
    /// so a held root at open is always a leftover.
    fn release_held_metadata_snap(&self) -> Result<()> {
        let w = self.working_status()?;
        if let Some(root) = w.held_metadata_root {
            warn!(
                root = root.0,
                "releasing a metadata snapshot a crash left held"
            );
            self.pool_message("release_metadata_snap")
                .map_err(dm_err("release a held metadata snapshot"))?;
        }
        Ok(())
    }

    /// Whether the pool named by `settings` is live in the kernel (its thin-pool device
    /// exists). A pool that is not live is opened "from cold", and only then may its
    /// metadata be read or replaced offline (thin_check, thin_repair, thin_restore).
    pub fn pool_is_live(settings: &PoolSettings) -> Result<bool> {
        let dm = DM::new().map_err(dm_err("open /dev/mapper/control"))?;
        let names = Names {
            tag: settings.tag.clone(),
        };
        match dm.device_info(&DevId::Name(&names.pool())) {
            Ok(_) => Ok(true),
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => Ok(false),
            Err(e) => Err(Error::dm("look up the thin-pool", e)),
        }
    }

    /// Removes a half-created pool's kernel objects and loop devices. Fails, leaving the
    /// loop devices, when a device-mapper device cannot be removed (it is in use).
    pub fn scrub(paths: &PoolPaths, settings: &PoolSettings) -> Result<()> {
        if let Ok(dm) = DM::new() {
            let names = Names {
                tag: settings.tag.clone(),
            };
            remove_ours(&dm, &names)?;
        }
        detach_pool_loops(paths)
    }

    /// Sends a pool message, then advances the transaction id past it. Returns the new id.
    fn message_and_commit(&self, msg: &str) -> std::result::Result<u64, DmError> {
        self.pool_message(msg)?;
        self.bump_txn()
    }

    /// Advances the kernel's transaction id by one with its compare-and-swap message
    /// (`set_transaction_id <old> <new>`). When another thread bumped it first the kernel
    /// answers EINVAL; we then re-read the kernel's value and try again.
    fn bump_txn(&self) -> std::result::Result<u64, DmError> {
        let mut cur = self.txn.load(Ordering::SeqCst);
        for _ in 0..1000 {
            let next = cur + 1;
            match self.pool_message(&format!("set_transaction_id {cur} {next}")) {
                Ok(()) => {
                    self.check_committed(next)?;
                    self.txn.fetch_max(next, Ordering::SeqCst);
                    return Ok(next);
                }
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::EINVAL) => {
                    // Lost a race only if the kernel's id moved; otherwise EINVAL is a real
                    // refusal (e.g. a read-only pool) and retrying cannot help.
                    match self.kernel_txn() {
                        Ok(k) if k != cur => cur = k,
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(DmError::Dm(
            devicemapper::ErrorEnum::Error,
            "set_transaction_id kept losing races".into(),
        ))
    }

    /// Whether the change that took the transaction id to `next` reached the metadata
    /// device. The kernel commits after each message but ignores a failed commit: the
    /// message succeeds, the kernel aborts the transaction (back to the last commit) and
    /// turns the pool read-only or failed. So a change is durable only if, after it, the
    /// pool is still writable and its id is at least `next`. Otherwise the change is
    /// reported as failed, and its record (never acknowledged) is rolled back; recording
    /// it would leave our records ahead of the pool's metadata, which the next open refuses.
    fn check_committed(&self, next: u64) -> std::result::Result<(), DmError> {
        let status = pool_status(
            &self.dm,
            &self.names.pool(),
            DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
        )?;
        let why = match status {
            ThinPoolStatus::Working(w)
                if matches!(
                    w.summary,
                    ThinPoolStatusSummary::Good | ThinPoolStatusSummary::OutOfSpace
                ) && w.transaction_id >= next =>
            {
                return Ok(());
            }
            ThinPoolStatus::Working(w) if w.transaction_id < next => format!(
                "the pool's transaction id is {} after setting it to {next}",
                w.transaction_id
            ),
            ThinPoolStatus::Working(w) => format!("the pool turned {:?}", w.summary),
            other => format!("the pool turned {other:?}"),
        };
        warn!(transaction_id = next, %why, "a pool change may not have been committed");
        Err(DmError::Dm(
            ErrorEnum::Error,
            format!(
                "{why} as the change was committed: the kernel may have rolled it back (an \
                 I/O error under the pool? see the kernel log)"
            ),
        ))
    }

    /// The kernel's current transaction id (status without a metadata flush).
    fn kernel_txn(&self) -> std::result::Result<u64, DmError> {
        match pool_status(
            &self.dm,
            &self.names.pool(),
            DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
        )? {
            ThinPoolStatus::Working(w) => Ok(w.transaction_id),
            _ => Err(DmError::Dm(
                devicemapper::ErrorEnum::Error,
                "thin-pool status is not Working".into(),
            )),
        }
    }

    fn pool_message(&self, msg: &str) -> std::result::Result<(), DmError> {
        let _not_reloading = self.reload.read();
        self.dm
            .target_msg(&DevId::Name(&self.names.pool()), None, msg)
            .map(drop)
    }

    /// Whether thin device `id` is active. One DM_DEV_STATUS ioctl by name (ENXIO: absent),
    /// not a scan of every device as `devicemapper::device_exists` does: with thousands of
    /// active devices that scan would dominate snapshot latency.
    fn thin_exists(&self, id: ThinId) -> Result<bool> {
        match self.dm.device_info(&DevId::Name(&self.names.thin(id))) {
            Ok(_) => Ok(true),
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => Ok(false),
            Err(e) => Err(Error::dm(format!("look up thin device {id}"), e)),
        }
    }

    /// Whether thin device `id` exists (`None`: it does not) and has a live table.
    fn thin_has_table(&self, id: ThinId) -> Result<Option<bool>> {
        match self.dm.device_info(&DevId::Name(&self.names.thin(id))) {
            Ok(info) => Ok(Some(info.flags().contains(DmFlags::DM_ACTIVE_PRESENT))),
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => Ok(None),
            Err(e) => Err(Error::dm(format!("look up thin device {id}"), e)),
        }
    }

    fn thin_node(&self, id: ThinId) -> Result<PathBuf> {
        let info = self
            .dm
            .device_info(&DevId::Name(&self.names.thin(id)))
            .map_err(dm_err(format!("device info of thin {id}")))?;
        Ok(PathBuf::from(format!("/dev/dm-{}", info.device().minor)))
    }

    /// Thin status of the device, if active: mapped sectors. `None`: not active. An active
    /// device whose pool has failed has no figure (the kernel reports `Fail`): an error.
    fn thin_mapped(&self, id: ThinId) -> Result<Option<Bytes>> {
        match self.thin_status(id)? {
            ThinStatus::Inactive => Ok(None),
            ThinStatus::Mapped(b) => Ok(Some(b)),
            ThinStatus::Failed => Err(Error::FailedPrecondition(format!(
                "thin device {id} reports Fail: its pool has failed, so its usage is unknown"
            ))),
        }
    }

    /// Thin status of the device: inactive, its mapped bytes, or failed (the pool failed:
    /// the kernel prints `Fail`, or `-` for a device it could not open in the metadata).
    fn thin_status(&self, id: ThinId) -> Result<ThinStatus> {
        let (_, lines) = match self
            .dm
            .table_status(&DevId::Name(&self.names.thin(id)), DmOptions::default())
        {
            Ok(s) => s,
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => {
                return Ok(ThinStatus::Inactive);
            }
            Err(e) => return Err(Error::dm(format!("status of thin {id}"), e)),
        };
        let Some(line) = lines.first().map(|l| l.3.as_str()) else {
            // No table (a crash between DM_DEV_CREATE and the table load): it maps nothing,
            // and a deactivate may remove it.
            return Ok(ThinStatus::Mapped(Bytes(0)));
        };
        if matches!(line.trim(), "Fail" | "-") {
            return Ok(ThinStatus::Failed);
        }
        let mapped: u64 = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Dm {
                context: format!("status of thin {id}"),
                errno: None,
                message: format!("unexpected status line {line:?}"),
            })?;
        Ok(ThinStatus::Mapped(Bytes(mapped * 512)))
    }

    fn create_thin_dev(
        &self,
        name: &DmName,
        id: ThinId,
        size: Bytes,
        read_only: bool,
    ) -> Result<()> {
        let dev_id = DevId::Name(name);
        let mut opts = DmOptions::default();
        if read_only {
            opts = opts.set_flags(DmFlags::DM_READONLY);
        }
        // dm-thin refuses (EINVAL) a thin table while its pool is suspended, which a grow
        // does for its reload: wait for the reload, as pool messages do (found by the
        // torture load: an Activate racing a GrowPool failed with Internal).
        let _not_reloading = self.reload.read();
        self.dm
            .device_create(name, None, opts)
            .map_err(dm_err(format!("create thin {id}")))?;
        // A device without a table: `activate` at the next open replaces it.
        failpoint::hit("activate:after_dev_create");
        let table = [(
            0u64,
            size.sectors().0,
            "thin".to_string(),
            format!("{}:{} {id}", self.pool_dev.major, self.pool_dev.minor),
        )];
        let loaded = self
            .dm
            .table_load(&dev_id, &table, opts)
            .and_then(|_| self.dm.device_suspend(&dev_id, DmOptions::default()));
        if let Err(e) = loaded {
            // No half-made device: take the empty one away again.
            let _ = self.dm.device_remove(&dev_id, DmOptions::default());
            return Err(Error::dm(format!("load table of thin {id}"), e));
        }
        Ok(())
    }

    /// Mapped bytes of every device, from one `thin_ls` (the metadata's last commit; a
    /// metadata snapshot is taken after a commit).
    fn thin_ls_mapped(&self) -> Result<BTreeMap<ThinId, Bytes>> {
        parse_thin_ls_mapped(&self.thin_ls(&["DEV,MAPPED_SECTORS"])?)
    }

    /// `thin_ls --no-headers -o FIELDS` on a metadata snapshot, which lets it read
    /// consistent metadata while the pool is live; the snapshot is released on every path.
    fn thin_ls(&self, fields: &[&str]) -> Result<String> {
        let _snap = self.metadata_snap.lock();
        match self.pool_message("reserve_metadata_snap") {
            Ok(()) => {}
            // A snapshot is held already, and under our lock only a crashed run of ours
            // (or a stray dmsetup message) can have left it: release it and retry once.
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::EBUSY) => {
                warn!("a metadata snapshot was held already; releasing it and retrying");
                self.pool_message("release_metadata_snap")
                    .map_err(dm_err("release a held metadata snapshot"))?;
                self.pool_message("reserve_metadata_snap")
                    .map_err(dm_err("reserve_metadata_snap"))?;
            }
            Err(e) => return Err(Error::dm("reserve_metadata_snap", e)),
        }
        failpoint::hit("thin_ls:after_reserve");
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["--metadata-snap".as_ref(), "--no-headers".as_ref()];
        for f in fields {
            args.push("-o".as_ref());
            args.push(f.as_ref());
        }
        args.push(self.meta_node.as_os_str());
        let listed = fsutil::run("thin_ls", &args);
        let released = self
            .pool_message("release_metadata_snap")
            .map_err(dm_err("release_metadata_snap"));
        let listed = listed?;
        released?;
        Ok(listed)
    }
}

/// Sets `nr_data_blocks` in the superblock line of a `thin_dump` XML file to `blocks`, if
/// the dump said 0.
fn fix_nr_data_blocks(xml: &Path, blocks: u64) -> Result<()> {
    let text = fs::read_to_string(xml).map_err(|e| Error::io("read", xml, e))?;
    let (first, rest) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    if !first.starts_with("<superblock") || !first.contains(" nr_data_blocks=\"0\"") {
        return Ok(());
    }
    let first = first.replace(
        " nr_data_blocks=\"0\"",
        &format!(" nr_data_blocks=\"{blocks}\""),
    );
    fs::write(xml, format!("{first}\n{rest}")).map_err(|e| Error::io("write", xml, e))
}

/// `thin_ls` mapped bytes of every device in the pool's metadata.
fn parse_thin_ls_mapped(listed: &str) -> Result<BTreeMap<ThinId, Bytes>> {
    let mut out = BTreeMap::new();
    for line in listed.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let (Some(dev), Some(sectors)) = (f.next(), f.next()) else {
            return Err(Error::Inconsistent(format!("thin_ls printed {line:?}")));
        };
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| Error::Inconsistent(format!("thin_ls printed {line:?}")))
        };
        let id = ThinId::new(
            u32::try_from(parse(dev)?)
                .map_err(|_| Error::Inconsistent(format!("thin_ls printed {line:?}")))?,
        )?;
        out.insert(id, Bytes(parse(sectors)?.saturating_mul(512)));
    }
    Ok(out)
}

/// Removes every device-mapper device of this pool (thin devices, then the pool, then its
/// linear devices), each retried briefly while busy (a udev probe). Returns the first
/// failure after trying them all: a device left behind holds the ones under it, down to
/// the loop devices, so teardown must not report success.
fn remove_ours(dm: &DM, names: &Names) -> Result<()> {
    let list = dm.list_devices().map_err(dm_err("list devices"))?;
    let mut ours: Vec<DmNameBuf> = list
        .into_iter()
        .map(|(n, _, _)| n)
        .filter(|n| names.is_ours(&n.to_string()))
        .collect();
    let rank = |n: &DmNameBuf| {
        let s = n.to_string();
        if s.ends_with("-pool") {
            1
        } else if s.ends_with("-data") || s.ends_with("-meta") {
            2
        } else {
            0
        }
    };
    ours.sort_by_key(rank);
    let mut first_err = None;
    for n in ours {
        let id = DevId::Name(&n);
        // A device a crash left suspended cannot be removed cleanly; resume it first.
        let _ = dm.device_suspend(&id, DmOptions::default());
        let mut tries = 0;
        let removed = loop {
            match dm.device_remove(&id, DmOptions::default()) {
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::EBUSY) => {
                    tries += 1;
                    if tries >= REMOVE_RETRIES {
                        break Err(Error::FailedPrecondition(format!(
                            "device-mapper device {} is in use",
                            &*n
                        )));
                    }
                    std::thread::sleep(REMOVE_RETRY_WAIT);
                }
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => break Ok(()),
                Err(e) => break Err(Error::dm(format!("remove {}", &*n), e)),
                Ok(_) => break Ok(()),
            }
        };
        if let Err(e) = removed {
            warn!(device = %&*n, error = %e, "could not remove device");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Detaches the loop devices of the pool's files ([`loopback::detach`]: one still claimed,
/// by a device-mapper table left behind, fails with `FailedPrecondition`).
fn detach_pool_loops(paths: &PoolPaths) -> Result<()> {
    for f in [&paths.data_file, &paths.metadata_file] {
        if f.exists()
            && let Some(dev) = loopback::find(f)?
        {
            loopback::detach(&dev)?;
        }
    }
    Ok(())
}

impl Backend for DmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Dm
    }

    fn status(&self) -> Result<BackendStatus> {
        // NOFLUSH: a status query must not force a metadata commit (scrapes are frequent).
        let status = pool_status(
            &self.dm,
            &self.names.pool(),
            DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
        )
        .map_err(dm_err("pool status"))?;
        let w = match status {
            ThinPoolStatus::Working(w) => w,
            // `Error`: the kernel could not read its own metadata to make the status line
            // (seen while the metadata device fails, before the pool turns `Fail`). For the
            // operator that is a failed pool: reported (status, /metrics, alerts) and
            // refused new snapshots like one, instead of failing every status call.
            ThinPoolStatus::Fail | ThinPoolStatus::Error => {
                return Ok(BackendStatus {
                    transaction_id: self.txn.load(Ordering::SeqCst),
                    data_used: Bytes(0),
                    data_total: Bytes(0),
                    metadata_used: Bytes(0),
                    metadata_total: Bytes(0),
                    mode: PoolMode::Fail,
                    needs_check: true,
                    error_if_no_space: true,
                    low_water_mark: Bytes(0),
                });
            }
        };
        let bs = self.block_size.0;
        Ok(BackendStatus {
            transaction_id: w.transaction_id,
            data_used: Bytes(w.usage.used_data.0 * bs),
            data_total: Bytes(w.usage.total_data.0 * bs),
            metadata_used: Bytes(w.usage.used_meta.0 * META_BLOCK),
            metadata_total: Bytes(w.usage.total_meta.0 * META_BLOCK),
            mode: match w.summary {
                ThinPoolStatusSummary::Good => PoolMode::Rw,
                ThinPoolStatusSummary::ReadOnly => PoolMode::Ro,
                ThinPoolStatusSummary::OutOfSpace => PoolMode::OutOfDataSpace,
            },
            needs_check: w.needs_check,
            error_if_no_space: w.no_space_policy == ThinPoolNoSpacePolicy::Error,
            low_water_mark: DataBlocks(self.low_water_mark.load(Ordering::SeqCst))
                .bytes(self.block_size),
        })
    }

    fn create_thin(&self, id: ThinId, _size: Bytes) -> Result<u64> {
        let made = self
            .message_and_commit(&format!("create_thin {id}"))
            .map_err(|e| Error::dm(format!("create_thin {id}"), e));
        self.inactive_mapped.lock().remove(&id);
        made
    }

    fn create_snapshot(&self, id: ThinId, origin: ThinId, _size: Bytes) -> Result<u64> {
        let origin_name = self.names.thin(origin);
        let origin_active = self.thin_exists(origin)?;
        let origin_id = DevId::Name(&origin_name);
        if origin_active {
            // Suspending flushes the origin's in-flight writes and holds new ones, so the
            // snapshot sees a consistent device. The engine holds the origin's lock.
            self.dm
                .device_suspend(
                    &origin_id,
                    DmOptions::default().set_flags(DmFlags::DM_SUSPEND),
                )
                .map_err(dm_err(format!("suspend origin {origin}")))?;
        }
        let made = self
            .message_and_commit(&format!("create_snap {id} {origin}"))
            .map_err(|e| Error::dm(format!("create_snap {id} {origin}"), e));
        if origin_active {
            // Resume on every path: a suspended origin hangs its users.
            self.resume_origin(origin, &origin_id, made.as_ref().err())?;
        }
        self.inactive_mapped.lock().remove(&id);
        made
    }

    fn delete(&self, id: ThinId) -> Result<u64> {
        match self.pool_message(&format!("delete {id}")) {
            Ok(()) => {}
            // ENODATA: the pool has no such id; deleting it again is done already.
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENODATA) => {
                return Ok(self.txn.load(Ordering::SeqCst));
            }
            Err(e) => return Err(Error::dm(format!("delete {id}"), e)),
        }
        self.inactive_mapped.lock().remove(&id);
        self.bump_txn()
            .map_err(|e| Error::dm(format!("commit delete {id}"), e))
    }

    fn activate(&self, id: ThinId, size: Bytes, read_only: bool) -> Result<PathBuf> {
        let name = self.names.thin(id);
        match self.thin_has_table(id)? {
            Some(true) => {}
            Some(false) => {
                // A crash between DM_DEV_CREATE and the table load left a device that maps
                // nothing (I/O to it fails): nobody can be using it, so it is made again.
                warn!(id = %id, "replacing a thin device that has no table");
                self.dm
                    .device_remove(&DevId::Name(&name), DmOptions::default())
                    .map_err(dm_err(format!("remove table-less thin {id}")))?;
                self.create_thin_dev(&name, id, size, read_only)?;
                self.inactive_mapped.lock().remove(&id);
            }
            None => {
                self.create_thin_dev(&name, id, size, read_only)?;
                self.inactive_mapped.lock().remove(&id);
            }
        }
        self.thin_node(id)
    }

    /// A device that is busy only for a moment (udev's or blkid's probe after an activate
    /// opens it briefly) is retried for up to [`REMOVE_RETRIES`] x [`REMOVE_RETRY_WAIT`]
    /// before it counts as in use.
    fn deactivate(&self, id: ThinId) -> Result<()> {
        let name = self.names.thin(id);
        let mut tries = 0;
        loop {
            // The last status: a device that nobody has open has no write in flight, and a
            // device somebody opens in between fails the remove below.
            // A failed pool's devices have no status but must still go away (else the
            // pool cannot be taken down for its repair); they leave no cached figure.
            let last = match self.thin_status(id)? {
                ThinStatus::Inactive => return Ok(()),
                ThinStatus::Mapped(b) => Some(b),
                ThinStatus::Failed => None,
            };
            match self
                .dm
                .device_remove(&DevId::Name(&name), DmOptions::default())
            {
                Ok(_) => {
                    let mut cache = self.inactive_mapped.lock();
                    match last {
                        Some(b) => cache.insert(id, b),
                        None => cache.remove(&id),
                    };
                    return Ok(());
                }
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::EBUSY) => {
                    tries += 1;
                    if tries >= REMOVE_RETRIES {
                        return Err(Error::FailedPrecondition(format!(
                            "thin device {id} is in use (mounted or open); unmount it first"
                        )));
                    }
                    std::thread::sleep(REMOVE_RETRY_WAIT);
                }
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => return Ok(()),
                Err(e) => return Err(Error::dm(format!("remove thin {id}"), e)),
            }
        }
    }

    /// Suspend (which flushes the device and freezes a filesystem on it, as `FIFREEZE`
    /// would), then resume, on every path.
    fn flush(&self, id: ThinId) -> Result<()> {
        if !self.thin_exists(id)? {
            return Ok(());
        }
        let name = self.names.thin(id);
        let dev = DevId::Name(&name);
        self.dm
            .device_suspend(&dev, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map_err(dm_err(format!("suspend thin {id} to flush it")))?;
        // Suspended (its filesystem frozen): the next open resumes it.
        failpoint::hit("commit:after_suspend");
        self.dm
            .device_suspend(&dev, DmOptions::default())
            .map_err(dm_err(format!("resume thin {id} after a flush")))?;
        Ok(())
    }

    /// `DM_DEV_REMOVE` with `DM_DEFERRED_REMOVE`: the kernel removes an open device at its
    /// last close.
    fn deactivate_deferred(&self, id: ThinId) -> Result<()> {
        if !self.thin_exists(id)? {
            return Ok(());
        }
        let name = self.names.thin(id);
        match self.dm.device_remove(
            &DevId::Name(&name),
            DmOptions::default().set_flags(DmFlags::DM_DEFERRED_REMOVE),
        ) {
            Ok(_) => Ok(()),
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => Ok(()),
            Err(e) => Err(Error::dm(format!("deferred remove of thin {id}"), e)),
        }
    }

    fn active_devices(&self) -> Result<BTreeMap<ThinId, PathBuf>> {
        let mut out = BTreeMap::new();
        for (name, dev, _) in self.dm.list_devices().map_err(dm_err("list devices"))? {
            if let Some(id) = self.names.parse_thin(&name.to_string()) {
                out.insert(id, PathBuf::from(format!("/dev/dm-{}", dev.minor)));
            }
        }
        Ok(out)
    }

    /// An active device: its thin status (one ioctl). An inactive one: its last status, or
    /// one `thin_ls` on a metadata snapshot for every inactive device (the kernel reports
    /// status only for active devices, and activating one to read it costs a table load, a
    /// resume and a remove). See `inactive_mapped`.
    fn mapped_bytes(&self, id: ThinId, _size: Bytes) -> Result<Bytes> {
        if let Some(mapped) = self.thin_mapped(id)? {
            return Ok(mapped);
        }
        let mut cache = self.inactive_mapped.lock();
        if let Some(b) = cache.get(&id) {
            return Ok(*b);
        }
        // One thin_ls for every inactive device, under the lock (see inactive_mapped).
        let active = self.active_devices()?;
        let listed = self.thin_ls_mapped()?;
        cache.extend(listed.into_iter().filter(|(i, _)| !active.contains_key(i)));
        cache
            .get(&id)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("thin id {id} is not in the pool's metadata")))
    }

    /// One `thin_ls` on a metadata snapshot for every device (active or not), instead of
    /// activating each inactive device to read its status: the figures are the metadata's
    /// last commit, which is what a scrape needs.
    fn mapped_bytes_many(&self, ids: &[(ThinId, Bytes)]) -> Result<BTreeMap<ThinId, Bytes>> {
        let wanted: BTreeSet<ThinId> = ids.iter().map(|(id, _)| *id).collect();
        Ok(self
            .thin_ls_mapped()?
            .into_iter()
            .filter(|(id, _)| wanted.contains(id))
            .collect())
    }

    fn list_ids(&self) -> Result<BTreeSet<ThinId>> {
        self.thin_ls(&["DEV"])?
            .split_whitespace()
            .map(|s| {
                s.parse::<u32>()
                    .map_err(|_| Error::Inconsistent(format!("thin_ls printed {s:?}")))
                    .and_then(ThinId::new)
            })
            .collect()
    }

    /// Extends the file, refreshes the loop device, then reloads the data linear device and
    /// the pool (with the new length and low water mark) in one suspend/resume of the pool;
    /// the kernel grows its space map at resume. Checks afterwards that it did: the kernel
    /// declines silently (in its log) when the metadata needs a check.
    fn grow_data(&self, size: Bytes, low_water_mark: DataBlocks) -> Result<()> {
        loopback::extend(&self.paths.data_file, size.0)?;
        failpoint::hit("grow:after_file");
        loopback::ensure_capacity(&self.data_loop, size.0)?;
        let dev = dev_of(&self.data_loop)?;
        let len = DmSectors(size.sectors().0);
        let lwm = DmDataBlocks(low_water_mark.0);
        self.reload_pool(&format!("grow the pool's data to {size}"), |pool, dm| {
            pool.set_data_table(dm, linear_table(dev, len))?;
            pool.set_low_water_mark(dm, lwm)
        })?;
        self.low_water_mark.store(lwm.0, Ordering::SeqCst);
        let w = self.working_status()?;
        let total = DataBlocks(w.usage.total_data.0).bytes(self.block_size);
        if total < size.round_down(self.block_size) {
            return Err(Error::FailedPrecondition(format!(
                "the kernel kept the pool's data at {total} instead of {size} (see the \
                 kernel log; it refuses to grow a pool whose metadata needs a check)"
            )));
        }
        info!(size = %size, low_water_mark = lwm.0, "pool data grown");
        Ok(())
    }

    /// As [`DmBackend::grow_data`], for the metadata linear device; the kernel grows its
    /// metadata space map at resume (up to [`PoolSettings::MAX_METADATA_SIZE`]).
    fn grow_metadata(&self, size: Bytes) -> Result<()> {
        let before = self.working_status()?.usage.total_meta.0;
        loopback::extend(&self.paths.metadata_file, size.0)?;
        loopback::preallocate(&self.paths.metadata_file)?;
        failpoint::hit("grow:after_file");
        loopback::ensure_capacity(&self.meta_loop, size.0)?;
        let dev = dev_of(&self.meta_loop)?;
        let len = DmSectors(size.sectors().0);
        self.reload_pool(
            &format!("grow the pool's metadata to {size}"),
            |pool, dm| pool.set_meta_table(dm, linear_table(dev, len)),
        )?;
        let after = self.working_status()?.usage.total_meta.0;
        let wanted = size.min(PoolSettings::MAX_METADATA_SIZE).0 / META_BLOCK;
        if after < wanted {
            return Err(Error::FailedPrecondition(format!(
                "the kernel kept the pool's metadata at {} (was {}) instead of {size} (see \
                 the kernel log)",
                Bytes(after * META_BLOCK),
                Bytes(before * META_BLOCK)
            )));
        }
        info!(size = %size, "pool metadata grown");
        Ok(())
    }

    fn dump_metadata(&self, out: &Path) -> Result<bool> {
        let _snap = self.metadata_snap.lock();
        match self.pool_message("reserve_metadata_snap") {
            Ok(()) => {}
            // As in thin_ls: under our lock only a crashed run of ours can hold one.
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::EBUSY) => {
                warn!("a metadata snapshot was held already; releasing it and retrying");
                self.pool_message("release_metadata_snap")
                    .map_err(dm_err("release a held metadata snapshot"))?;
                self.pool_message("reserve_metadata_snap")
                    .map_err(dm_err("reserve_metadata_snap"))?;
            }
            Err(e) => return Err(Error::dm("reserve_metadata_snap", e)),
        }
        failpoint::hit("backup:after_reserve");
        let dumped = fsutil::run(
            "thin_dump",
            &[
                "-m".as_ref(),
                "-o".as_ref(),
                out.as_os_str(),
                self.meta_node.as_os_str(),
            ],
        );
        // Released whatever the dump did: a held snapshot blocks every later thin_ls.
        let released = self
            .pool_message("release_metadata_snap")
            .map_err(dm_err("release_metadata_snap"));
        dumped?;
        released?;
        // The kernel wipes the space map roots in the snapshot's superblock, so the dump
        // says the data device has 0 blocks, which thin_restore then refuses ("mapping
        // beyond end of data device"): put the pool's data size back.
        let total = self.working_status()?.usage.total_data.0;
        fix_nr_data_blocks(out, total)?;
        Ok(true)
    }

    fn metadata_grows(&self) -> bool {
        true
    }

    fn events(&self) -> Result<Option<Box<dyn PoolEvents>>> {
        Ok(DmEvents::new(self.names.pool())?.map(|e| Box::new(e) as Box<dyn PoolEvents>))
    }

    /// Removes every device (thin, pool, linear), then detaches the loop devices; the
    /// first device that cannot be removed is the error, and the loops stay.
    fn teardown(&self) -> Result<()> {
        remove_ours(&self.dm, &self.names)?;
        detach_pool_loops(&self.paths)
    }
}

/// The pool's dm events: a device-mapper context of its own (so arming it for polls concerns
/// no other user of the control device) and the pool's last seen event number.
///
/// The kernel's protocol: the control fd polls readable once any dm event happened on the
/// host since the fd was last armed (`DM_DEV_ARM_POLL`, ioctl interface 4.37); which device
/// evented shows in its event number, which `DM_DEV_STATUS` returns (one ioctl for the pool,
/// rather than listing every device on the host).
struct DmEvents {
    dm: DM,
    pool: DmNameBuf,
    last: parking_lot::Mutex<u32>,
}

impl DmEvents {
    /// `None` when the kernel cannot arm the control fd for polling (before 4.37).
    fn new(pool: DmNameBuf) -> Result<Option<DmEvents>> {
        let dm = DM::new().map_err(dm_err("open /dev/mapper/control"))?;
        if let Err(e) = dm.arm_poll() {
            warn!(error = %e, "dm event polling is unavailable; the space monitor only polls");
            return Ok(None);
        }
        let events = DmEvents {
            dm,
            pool,
            last: parking_lot::Mutex::new(0),
        };
        *events.last.lock() = events.event_nr()?;
        Ok(Some(events))
    }

    fn event_nr(&self) -> Result<u32> {
        Ok(self
            .dm
            .device_info(&DevId::Name(&self.pool))
            .map_err(dm_err(format!("status of {}", &*self.pool)))?
            .event_nr())
    }
}

impl PoolEvents for DmEvents {
    fn fd(&self) -> BorrowedFd<'_> {
        self.dm.file().as_fd()
    }

    fn take(&self) -> Result<u32> {
        // Arm first, then read the number: an event between the two is seen now and also
        // makes the fd readable again, never lost.
        self.dm.arm_poll().map_err(dm_err("arm dm event poll"))?;
        let nr = self.event_nr()?;
        let mut last = self.last.lock();
        let new = nr.wrapping_sub(*last);
        *last = nr;
        Ok(new)
    }
}
