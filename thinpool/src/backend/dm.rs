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

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use devicemapper::{
    DM, DataBlocks as DmDataBlocks, DevId, Device, DmDevice, DmError, DmFlags, DmName, DmNameBuf,
    DmOptions, LinearDev, LinearDevTargetParams, LinearTargetParams, Sectors as DmSectors,
    TargetLine, ThinPoolDev, ThinPoolNoSpacePolicy, ThinPoolStatus, ThinPoolStatusSummary,
};
use tracing::{info, warn};

use super::{Backend, PoolPaths};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::ids::ThinId;
use crate::loopback;
use crate::model::{BackendKind, BackendStatus, PoolMode, PoolSettings};
use crate::units::{Bytes, DataBlocks};

/// Bytes per metadata block, as dm-thin reports metadata usage.
const META_BLOCK: u64 = 4096;

pub struct DmBackend {
    dm: DM,
    names: Names,
    paths: PoolPaths,
    block_size: Bytes,
    pool: ThinPoolDev,
    /// The pool's (major, minor), which every thin table names.
    pool_dev: Device,
    /// Our view of the kernel's transaction id. No lock pairs a message with the
    /// `set_transaction_id` after it: the kernel's own compare-and-swap orders concurrent
    /// bumps (see [`DmBackend::bump_txn`]), and reconcile never needs to know which message a
    /// given id committed, only that the kernel's id never falls behind our records.
    txn: AtomicU64,
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
    match e {
        DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, err)) => Some(**err),
        _ => None,
    }
}

fn dm_err(context: impl Into<String>) -> impl FnOnce(DmError) -> Error {
    let context = context.into();
    move |e| Error::dm(context, e)
}

fn dev_of(path: &Path) -> Result<Device> {
    let (major, minor) = loopback::dev_numbers(path)?;
    Ok(Device { major, minor })
}

/// Sets up (or adopts) a linear device `name` over the whole of `loop_dev`, whose backing
/// file is `file`; returns it with the file's length.
fn linear_over(dm: &DM, name: &DmName, loop_dev: &Path, file: &Path) -> Result<(LinearDev, Bytes)> {
    let len = Bytes(
        fs::metadata(file)
            .map_err(|e| Error::io("stat", file, e))?
            .len(),
    );
    let dev = LinearDev::setup(
        dm,
        name,
        None,
        linear_table(dev_of(loop_dev)?, DmSectors(len.sectors().0)),
    )
    .map_err(dm_err(format!("set up linear device {name}")))?;
    Ok((dev, len))
}

fn linear_table(dev: Device, len: DmSectors) -> Vec<TargetLine<LinearDevTargetParams>> {
    vec![TargetLine::new(
        DmSectors(0),
        len,
        LinearDevTargetParams::Linear(LinearTargetParams::new(dev, DmSectors(0))),
    )]
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
        let meta_loop = loopback::attach(&paths.metadata_file)?;
        let data_loop = loopback::attach(&paths.data_file)?;
        let (meta, _) = linear_over(&dm, &names.meta(), &meta_loop, &paths.metadata_file)?;
        let (data, data_len) = linear_over(&dm, &names.data(), &data_loop, &paths.data_file)?;

        let block_sectors = DmSectors(settings.block_size.sectors().0);
        let total_blocks = DataBlocks(data_len.0 / settings.block_size.0);
        let lwm = DmDataBlocks(PoolSettings::low_water_mark(total_blocks).0);
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
            Self::check_metadata(&dm, &names, pool, block_sectors, lwm, features)?
        };
        let pool_dev = pool.device();
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
        let backend = DmBackend {
            dm,
            names,
            paths: paths.clone(),
            block_size: settings.block_size,
            pool,
            pool_dev,
            txn: AtomicU64::new(txn),
        };
        backend.resume_suspended()?;
        Ok(backend)
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
        dm.device_remove(&DevId::Name(&names.pool()), DmOptions::default())
            .map_err(dm_err("remove thin-pool for thin_check"))?;
        fsutil::run(
            "thin_check",
            &[
                "-q".as_ref(),
                "--clear-needs-check-flag".as_ref(),
                meta_node.as_os_str(),
            ],
        )?;
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

    /// Best-effort removal of a half-created pool's kernel objects and loop devices.
    pub fn scrub(paths: &PoolPaths, settings: &PoolSettings) -> Result<()> {
        if let Ok(dm) = DM::new() {
            let names = Names {
                tag: settings.tag.clone(),
            };
            remove_ours(&dm, &names);
        }
        for f in [&paths.data_file, &paths.metadata_file] {
            if f.exists()
                && let Some(dev) = loopback::find(f)?
            {
                loopback::detach(&dev)?;
            }
        }
        Ok(())
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

    /// The kernel's current transaction id (status without a metadata flush).
    fn kernel_txn(&self) -> std::result::Result<u64, DmError> {
        match self.pool.status(
            &self.dm,
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

    fn thin_node(&self, id: ThinId) -> Result<PathBuf> {
        let info = self
            .dm
            .device_info(&DevId::Name(&self.names.thin(id)))
            .map_err(dm_err(format!("device info of thin {id}")))?;
        Ok(PathBuf::from(format!("/dev/dm-{}", info.device().minor)))
    }

    /// Thin status of an active device: mapped sectors.
    fn thin_mapped(&self, id: ThinId) -> Result<Bytes> {
        let (_, lines) = self
            .dm
            .table_status(&DevId::Name(&self.names.thin(id)), DmOptions::default())
            .map_err(dm_err(format!("status of thin {id}")))?;
        let line = lines.first().map(|l| l.3.as_str()).unwrap_or("");
        let mapped: u64 = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Dm {
                context: format!("status of thin {id}"),
                message: format!("unexpected status line {line:?}"),
            })?;
        Ok(Bytes(mapped * 512))
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
        self.dm
            .device_create(name, None, opts)
            .map_err(dm_err(format!("create thin {id}")))?;
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
}

/// Removes every kernel device named for this pool: thins first, then pool, data, meta.
fn remove_ours(dm: &DM, names: &Names) {
    let Ok(list) = dm.list_devices() else { return };
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
    for n in ours {
        let id = DevId::Name(&n);
        // A device a crash left suspended cannot be removed cleanly; resume it first.
        let _ = dm.device_suspend(&id, DmOptions::default());
        if let Err(e) = dm.device_remove(&id, DmOptions::default()) {
            warn!(device = %n.to_string(), error = %e, "could not remove device");
        }
    }
}

impl Backend for DmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Dm
    }

    fn status(&self) -> Result<BackendStatus> {
        let pool = &self.pool;
        // NOFLUSH: a status query must not force a metadata commit (scrapes are frequent).
        let status = pool
            .status(
                &self.dm,
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
            )
            .map_err(dm_err("pool status"))?;
        let w = match status {
            ThinPoolStatus::Working(w) => w,
            ThinPoolStatus::Fail => {
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
            ThinPoolStatus::Error => {
                return Err(Error::Dm {
                    context: "pool status".into(),
                    message: "the kernel reported Error".into(),
                });
            }
        };
        let bs = self.block_size.0;
        let total_blocks = DataBlocks(w.usage.total_data.0);
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
            low_water_mark: PoolSettings::low_water_mark(total_blocks).bytes(self.block_size),
        })
    }

    fn create_thin(&self, id: ThinId, _size: Bytes) -> Result<u64> {
        self.message_and_commit(&format!("create_thin {id}"))
            .map_err(|e| Error::dm(format!("create_thin {id}"), e))
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
            let resumed = self
                .dm
                .device_suspend(&origin_id, DmOptions::default())
                .map_err(dm_err(format!("resume origin {origin}")));
            if made.is_ok() {
                resumed?;
            }
        }
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
        self.bump_txn()
            .map_err(|e| Error::dm(format!("commit delete {id}"), e))
    }

    fn activate(&self, id: ThinId, size: Bytes, read_only: bool) -> Result<PathBuf> {
        let name = self.names.thin(id);
        if !self.thin_exists(id)? {
            self.create_thin_dev(&name, id, size, read_only)?;
        }
        self.thin_node(id)
    }

    fn deactivate(&self, id: ThinId) -> Result<()> {
        let name = self.names.thin(id);
        if !self.thin_exists(id)? {
            return Ok(());
        }
        match self
            .dm
            .device_remove(&DevId::Name(&name), DmOptions::default())
        {
            Ok(_) => Ok(()),
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::EBUSY) => {
                Err(Error::FailedPrecondition(format!(
                    "thin device {id} is in use (mounted or open); unmount it first"
                )))
            }
            Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENXIO) => Ok(()),
            Err(e) => Err(Error::dm(format!("remove thin {id}"), e)),
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

    fn mapped_bytes(&self, id: ThinId, size: Bytes) -> Result<Bytes> {
        if self.thin_exists(id)? {
            return self.thin_mapped(id);
        }
        // The kernel reports usage only for an active device: activate it briefly.
        self.create_thin_dev(&self.names.thin(id), id, size, true)?;
        let mapped = self.thin_mapped(id);
        self.deactivate(id)?;
        mapped
    }

    fn list_ids(&self) -> Result<BTreeSet<ThinId>> {
        let meta_node = self.pool.meta_dev().devnode();
        // A metadata snapshot lets thin_ls read consistent metadata while the pool is live.
        self.pool_message("reserve_metadata_snap")
            .map_err(dm_err("reserve_metadata_snap"))?;
        let listed = fsutil::run(
            "thin_ls",
            &[
                "--metadata-snap".as_ref(),
                "--no-headers".as_ref(),
                "-o".as_ref(),
                "DEV".as_ref(),
                meta_node.as_os_str(),
            ],
        );
        let released = self
            .pool_message("release_metadata_snap")
            .map_err(dm_err("release_metadata_snap"));
        let listed = listed?;
        released?;
        listed
            .split_whitespace()
            .map(|s| {
                s.parse::<u32>()
                    .map_err(|_| Error::Inconsistent(format!("thin_ls printed {s:?}")))
                    .and_then(ThinId::new)
            })
            .collect()
    }

    fn teardown(&self) -> Result<()> {
        remove_ours(&self.dm, &self.names);
        for f in [&self.paths.data_file, &self.paths.metadata_file] {
            if let Some(dev) = loopback::find(f)? {
                loopback::detach(&dev)?;
            }
        }
        Ok(())
    }
}
