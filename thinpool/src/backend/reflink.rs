//! Thin devices as reflinked sparse files in an XFS, for hosts without dm-thin.
//!
//! Layout, all under the pool root:
//! - `data`: the sparse data file, attached to a loop device (direct I/O) and formatted once
//!   as XFS with `reflink=1`;
//! - `metadata`: the sparse metadata file, attached to a loop device and used as the XFS
//!   *external log*, so every metadata change of the pool (file creates, clones, extent
//!   maps, the transaction counter) is journalled in it, as dm-thin journals into its
//!   metadata device;
//! - `mnt/`: the XFS, mounted privately, holding `devices/<thin id>` (one sparse file per
//!   thin device, the device's size) and `transaction_id` (the durable counter).
//!
//! A thin device is active when a loop device (direct I/O, read-only when asked) is attached
//! to its file; the kernel's loop list is the record of that (the backend caches it), so a
//! daemon restart finds active devices again and a host reboot loses them, as with dm.
//!
//! A snapshot is a whole-file `FICLONE` of its origin's file: copy-on-write, and its cost
//! depends on the origin's extent count, not on the data size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use tracing::{info, warn};

use super::{Backend, PoolEvents, PoolPaths};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil;
use crate::ids::ThinId;
use crate::loopback::{self, LoopOptions};
use crate::model::{AutoextendPolicy, BackendKind, BackendStatus, PoolMode, PoolSettings};
use crate::mount;
use crate::units::{Bytes, DataBlocks};

/// The log we use at most. mkfs.xfs writes the whole log, so its size is real disk use;
/// 128 MiB is more than mkfs.xfs gives a 100 GiB filesystem's internal log (about 50 MiB),
/// and far below XFS's own limit (2038 MiB). The rest of a larger metadata file stays
/// sparse and unused.
const MAX_LOG: Bytes = Bytes::mib(128);
/// The smallest log mkfs.xfs (6.x) accepts for a filesystem above 300 MB.
const MIN_LOG: Bytes = Bytes::mib(64);
/// mkfs.xfs refuses smaller data devices ("Filesystem must be larger than 300MB").
const MIN_DATA: Bytes = Bytes::mib(300);
/// Free space below which we report the pool as out of data space: 1% of the pool, capped.
/// XFS fails writes with ENOSPC only at zero, but by then the pool is unusable anyway.
const FULL_MARGIN_CAP: Bytes = Bytes::mib(64);

const COUNTER_FILE: &str = "transaction_id";
const COUNTER_TEMP: &str = "transaction_id.tmp";
const DEVICES_DIR: &str = "devices";

/// Reflinked sparse files on a loop-mounted XFS. See the module documentation.
pub struct ReflinkBackend {
    data_file: PathBuf,
    metadata_file: PathBuf,
    /// The loop device over the data file (the XFS).
    data_dev: PathBuf,
    /// The XFS mount point, canonical, because the kernel reports loop backing files by
    /// their resolved path and we match device files against it.
    mnt: PathBuf,
    /// `<mnt>/devices`, canonical.
    devices: PathBuf,
    /// Size of the external log (the used part of the metadata file).
    log_size: Bytes,
    block_size: Bytes,
    /// Places the (reported) low water mark; reflink has no kernel events.
    autoextend_data: AutoextendPolicy,
    /// Logical sector size of device loops: the XFS block size.
    device_block_size: u32,
    /// The last transaction id made durable. The lock is held only for a counter bump.
    txn: parking_lot::Mutex<u64>,
    /// Loop devices attached to device files, by id. Finding them in sysfs costs a read per
    /// loop device on the host (milliseconds with hundreds of containers), so we scan once
    /// at open and then keep this map: only this process attaches our device files, since
    /// the engine holds the pool's lock. Each use checks its entry against sysfs.
    loops: parking_lot::Mutex<HashMap<ThinId, PathBuf>>,
}

impl ReflinkBackend {
    /// Creates the pool's data and metadata files, formats the XFS and mounts it.
    ///
    /// Preconditions: neither file exists; `mkfs.xfs` is installed (checked first, so a host
    /// without xfsprogs gets [`Error::MissingTool`] before anything is created). The data
    /// file must be at least 300 MiB and the metadata file at least 64 MiB (mkfs.xfs's
    /// limits for the filesystem and its log).
    pub fn create(paths: &PoolPaths, settings: &PoolSettings) -> Result<Self> {
        fsutil::find_tool("mkfs.xfs")?;
        if settings.data_size < MIN_DATA {
            return Err(Error::InvalidArgument(format!(
                "data size {}: the reflink backend's XFS needs at least {MIN_DATA}",
                settings.data_size
            )));
        }
        if settings.metadata_size < MIN_LOG {
            return Err(Error::InvalidArgument(format!(
                "metadata size {}: the reflink backend uses the metadata file as the XFS log, \
                 which must be at least {MIN_LOG}",
                settings.metadata_size
            )));
        }
        loopback::create_sparse(&paths.data_file, settings.data_size.0)?;
        loopback::create_sparse(&paths.metadata_file, settings.metadata_size.0)?;
        loopback::preallocate(&paths.metadata_file)?;
        let made = (|| {
            let data_dev = loopback::find_or_attach(&paths.data_file, LoopOptions::POOL_FILE)?;
            let meta_dev = loopback::find_or_attach(&paths.metadata_file, LoopOptions::POOL_FILE)?;
            let log = format!(
                "logdev={},size={}m",
                meta_dev.display(),
                log_size(settings.metadata_size).0 >> 20
            );
            // -K: the sparse file is all holes already; discarding it at mkfs is wasted time.
            fsutil::run(
                "mkfs.xfs",
                &[
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "-K".as_ref(),
                    "-m".as_ref(),
                    "crc=1,reflink=1".as_ref(),
                    "-l".as_ref(),
                    log.as_ref(),
                    data_dev.as_os_str(),
                ],
            )?;
            let mnt = paths.root.join("mnt");
            mount_xfs(&data_dev, &meta_dev, &mnt)?;
            let mnt = canonical(&mnt)?;
            let devices = mnt.join(DEVICES_DIR);
            fsutil::create_private_dir(&devices)
                .map_err(|e| io_error("create devices directory", &devices, e))?;
            write_counter(&mnt, 0)?;
            info!(data = %data_dev.display(), log = %meta_dev.display(), mnt = %mnt.display(),
                "reflink pool formatted and mounted");
            Self::assemble(paths, settings, data_dev)
        })();
        if made.is_err() {
            // Leave no mount or loop device behind; the engine removes the files.
            if let Err(e) = Self::scrub(paths, settings) {
                warn!(error = %e, "could not clean up after a failed pool create");
            }
        }
        made
    }

    /// Reassembles an existing pool after a daemon restart or a host reboot: attaches the
    /// data and metadata files (reusing existing attachments) and mounts the XFS unless it
    /// is mounted already. Device activation is left to the engine's reconcile.
    pub fn open(paths: &PoolPaths, settings: &PoolSettings) -> Result<Self> {
        for f in [&paths.data_file, &paths.metadata_file] {
            if !f.exists() {
                return Err(Error::Inconsistent(format!(
                    "pool file {} is missing",
                    f.display()
                )));
            }
        }
        let data_dev = loopback::find_or_attach(&paths.data_file, LoopOptions::POOL_FILE)?;
        let meta_dev = loopback::find_or_attach(&paths.metadata_file, LoopOptions::POOL_FILE)?;
        let mnt = paths.root.join("mnt");
        fsutil::create_private_dir(&mnt).map_err(|e| io_error("create mount point", &mnt, e))?;
        match mount::mounted_source(&canonical(&mnt)?)? {
            Some(source) if Path::new(&source) == data_dev => {
                info!(mnt = %mnt.display(), "pool XFS already mounted");
                // Device files of a pool made before the modes were set are 0644.
                fsutil::make_private(&mnt)?;
            }
            // Our private bind, left by a start that stopped before mounting the XFS.
            Some(_) if mount::is_own_bind(&canonical(&mnt)?)? => {
                mount_xfs(&data_dev, &meta_dev, &mnt)?
            }
            Some(source) => {
                return Err(Error::Inconsistent(format!(
                    "{} is mounted from {source}, not from the pool's data device {}",
                    mnt.display(),
                    data_dev.display()
                )));
            }
            None => mount_xfs(&data_dev, &meta_dev, &mnt)?,
        }
        let backend = Self::assemble(paths, settings, data_dev)?;
        backend.thaw_left_frozen(settings, &paths.root.join("resize"));
        Ok(backend)
    }

    /// A crash between a Commit's `FIFREEZE` and `FITHAW` leaves the device's filesystem
    /// frozen: its writers hang, and once it is unmounted the frozen filesystem lives on
    /// without a mount (holding the loop device open, so it can never be deactivated).
    /// Every attached device is thawed at open: through its mount if it has one, else
    /// through a scratch mount, which the kernel gives the same (frozen) filesystem.
    /// Best effort: a failure is logged, and the device then shows as in use.
    fn thaw_left_frozen(&self, settings: &PoolSettings, scratch: &Path) {
        let loops: Vec<(ThinId, PathBuf)> = self
            .loops
            .lock()
            .iter()
            .map(|(id, dev)| (*id, dev.clone()))
            .collect();
        for (id, dev) in loops {
            if let Err(e) = thaw_device(&dev, settings.fs, &scratch.join(format!("thaw-{id}"))) {
                warn!(id = %id, dev = %dev.display(), error = %e,
                    "cannot check whether the device's filesystem was left frozen");
            }
        }
    }

    /// The backend over a mounted XFS: checks its layout and reads the counter.
    fn assemble(paths: &PoolPaths, settings: &PoolSettings, data_dev: PathBuf) -> Result<Self> {
        let mnt = canonical(&paths.root.join("mnt"))?;
        let devices = mnt.join(DEVICES_DIR);
        if !devices.is_dir() {
            return Err(Error::Inconsistent(format!(
                "the pool's XFS has no {} directory",
                devices.display()
            )));
        }
        let txn = read_counter(&mnt)?;
        let loops = device_loops(&devices)?.into_iter().collect();
        let st =
            nix::sys::statvfs::statvfs(&mnt).map_err(|e| Error::io("statfs", &mnt, e.into()))?;
        Ok(ReflinkBackend {
            device_block_size: st.block_size() as u32,
            data_file: paths.data_file.clone(),
            metadata_file: paths.metadata_file.clone(),
            data_dev,
            mnt,
            devices,
            log_size: log_size(settings.metadata_size),
            block_size: settings.block_size,
            autoextend_data: settings.autoextend_data,
            txn: parking_lot::Mutex::new(txn),
            loops: parking_lot::Mutex::new(loops),
        })
    }

    /// Best-effort removal of whatever an interrupted [`ReflinkBackend::create`] left:
    /// device loops, the XFS mount, the data and metadata loops. Fails only when something
    /// is in use, since the engine deletes the pool files next.
    pub fn scrub(paths: &PoolPaths, _settings: &PoolSettings) -> Result<()> {
        let mnt = paths.root.join("mnt");
        let mnt = fs::canonicalize(&mnt).unwrap_or(mnt);
        for (_, dev) in device_loops(&mnt.join(DEVICES_DIR))? {
            loopback::detach(&dev)?;
        }
        unmount_xfs(&mnt)?;
        for f in [&paths.data_file, &paths.metadata_file] {
            if f.exists()
                && let Some(dev) = loopback::find(f)?
            {
                loopback::detach(&dev)?;
            }
        }
        Ok(())
    }

    /// Whether this host can run the backend: XFS in the kernel and mkfs.xfs installed.
    pub fn probe() -> Result<String> {
        let fss = fs::read_to_string("/proc/filesystems")
            .map_err(|e| Error::io("read", "/proc/filesystems", e))?;
        if !fss
            .lines()
            .any(|l| l.split_whitespace().last() == Some("xfs"))
        {
            return Err(Error::FailedPrecondition(
                "the kernel has no XFS support".into(),
            ));
        }
        let mkfs = fsutil::find_tool("mkfs.xfs")?;
        Ok(format!("xfs with {}", mkfs.display()))
    }

    fn device_file(&self, id: ThinId) -> PathBuf {
        self.devices.join(id.to_string())
    }

    /// The loop device attached to `id`'s file, if any, from [`Self::loops`], checked
    /// against the kernel: an entry whose loop device no longer has this backing file
    /// (detached behind our back) is dropped.
    fn attached(&self, id: ThinId) -> Option<PathBuf> {
        let mut loops = self.loops.lock();
        let dev = loops.get(&id)?.clone();
        if loopback::backing_file(&dev).as_deref() == Some(self.device_file(id).as_path())
            && !loopback::detaching(&dev)
        {
            Some(dev)
        } else {
            loops.remove(&id);
            None
        }
    }

    /// Makes the creation or removal of a device file durable: the directory entry.
    fn sync_devices_dir(&self) -> Result<()> {
        sync_dir(&self.devices)
    }

    /// Bumps the durable transaction counter and returns the new value. Call it only after
    /// the change it stands for is durable.
    fn bump(&self) -> Result<u64> {
        let mut txn = self.txn.lock();
        let next = *txn + 1;
        write_counter(&self.mnt, next)?;
        *txn = next;
        Ok(next)
    }

    /// Size and live part of the external log: the log is circular, so "used" is the span
    /// from its tail to its head (`/sys/fs/xfs/<dev>/log`), metadata written but not yet
    /// checkpointed into the filesystem. `None` when the kernel does not expose it.
    fn log_in_use(&self) -> Option<Bytes> {
        let name = self.data_dev.file_name()?.to_str()?;
        let dir = Path::new("/sys/fs/xfs").join(name).join("log");
        let lsn = |f: &str| -> Option<(u64, u64)> {
            let s = fs::read_to_string(dir.join(f)).ok()?;
            let (cycle, block) = s.trim().split_once(':')?;
            Some((cycle.parse().ok()?, block.parse().ok()?))
        };
        let (head_cycle, head) = lsn("log_head_lsn")?;
        let (tail_cycle, tail) = lsn("log_tail_lsn")?;
        // Log positions are in 512-byte basic blocks.
        let log_bbs = self.log_size.0 / 512;
        let bbs = if head_cycle == tail_cycle {
            head.saturating_sub(tail)
        } else {
            (log_bbs.saturating_sub(tail)) + head
        };
        Some(Bytes((bbs * 512).min(self.log_size.0)))
    }
}

impl Backend for ReflinkBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Reflink
    }

    /// - `data_used`/`data_total`: the XFS's used and total blocks (statfs), so space shared
    ///   by reflinks counts once and XFS's own metadata (inodes, btrees) counts as used.
    /// - `metadata_used`/`metadata_total`: the live part of the XFS log and its size (the
    ///   metadata file holds the log). A full log throttles metadata updates until XFS
    ///   checkpoints; unlike dm-thin's metadata it cannot run out.
    /// - `mode`: `Fail` with `needs_check` when the XFS has shut down (after an I/O or
    ///   corruption error it still answers statfs but fails every open with EIO; it needs an
    ///   unmount, a log replay at the next mount, and possibly `xfs_repair`). Otherwise
    ///   `OutOfDataSpace` when free space is below 1% of the pool (at most 64 MiB), else
    ///   `Rw`, and `needs_check` false: XFS replays its log itself at mount.
    /// - `error_if_no_space`: always true, writes to a full XFS fail at once with ENOSPC.
    fn status(&self) -> Result<BackendStatus> {
        let st = nix::sys::statvfs::statvfs(&self.mnt)
            .map_err(|e| Error::io("statfs", &self.mnt, e.into()))?;
        let frsize = st.fragment_size();
        let total = st.blocks() * frsize;
        let free = st.blocks_free() * frsize;
        let available = st.blocks_available() * frsize;
        let margin = (total / 100).min(FULL_MARGIN_CAP.0);
        let bs = self.block_size;
        let transaction_id = *self.txn.lock();
        let shut_down = matches!(File::open(self.mnt.join(COUNTER_FILE)),
            Err(e) if e.raw_os_error() == Some(libc::EIO));
        Ok(BackendStatus {
            transaction_id,
            data_used: Bytes(total - free),
            data_total: Bytes(total),
            metadata_used: self.log_in_use().unwrap_or_default(),
            metadata_total: self.log_size,
            mode: if shut_down {
                PoolMode::Fail
            } else if available < margin {
                PoolMode::OutOfDataSpace
            } else {
                PoolMode::Rw
            },
            needs_check: shut_down,
            error_if_no_space: true,
            low_water_mark: self
                .autoextend_data
                .low_water_mark(DataBlocks(total / bs.0))
                .bytes(bs),
        })
    }

    /// Creates `devices/<id>`, a sparse file of `size` bytes.
    fn create_thin(&self, id: ThinId, size: Bytes) -> Result<u64> {
        let file = self.device_file(id);
        let f = create_device_file(&file, id)?;
        let made = f
            .set_len(size.0)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_error("size device file", &file, e))
            .and_then(|()| self.sync_devices_dir());
        if let Err(e) = made {
            remove_quietly(&file);
            return Err(e);
        }
        self.bump()
    }

    /// Clones the origin's file whole (`FICLONE`), then extends it to `size`. An active
    /// origin is flushed first (fsync of its loop device) so the clone holds every write
    /// the device acknowledged. No lock is held across the clone.
    fn create_snapshot(&self, id: ThinId, origin: ThinId, size: Bytes) -> Result<u64> {
        let origin_file = self.device_file(origin);
        let src = File::open(&origin_file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(format!("thin id {origin} has no file")),
            _ => io_error("open origin", &origin_file, e),
        })?;
        let origin_len = src
            .metadata()
            .map_err(|e| io_error("stat origin", &origin_file, e))?
            .len();
        if size.0 < origin_len {
            return Err(Error::InvalidArgument(format!(
                "snapshot size {size} is below its origin's {}",
                Bytes(origin_len)
            )));
        }
        if let Some(dev) = self.attached(origin) {
            File::open(&dev)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error("flush active origin", &dev, e))?;
        }
        let file = self.device_file(id);
        let dst = create_device_file(&file, id)?;
        let made = (|| {
            // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
            let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
            if rc != 0 {
                return Err(io_error("FICLONE", &file, io::Error::last_os_error()));
            }
            if size.0 > origin_len {
                dst.set_len(size.0)
                    .map_err(|e| io_error("size device file", &file, e))?;
            }
            dst.sync_all()
                .map_err(|e| io_error("sync device file", &file, e))?;
            self.sync_devices_dir()
        })();
        if let Err(e) = made {
            remove_quietly(&file);
            return Err(e);
        }
        self.bump()
    }

    /// Deletes the device's file; XFS frees the blocks no other file shares. Deleting an
    /// absent id succeeds (and still bumps the counter). Precondition: not active; an
    /// attached file fails with `FailedPrecondition`, as its blocks would stay allocated.
    fn delete(&self, id: ThinId) -> Result<u64> {
        if let Some(dev) = self.attached(id) {
            return Err(Error::FailedPrecondition(format!(
                "thin id {id} is active on {}; deactivate it first",
                dev.display()
            )));
        }
        let file = self.device_file(id);
        match fs::remove_file(&file) {
            Ok(()) => self.sync_devices_dir()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove device file", &file, e)),
        }
        self.bump()
    }

    /// Attaches a loop device with direct I/O to the device's file (read-only when asked)
    /// and returns its node; an attached device returns the node it has. The device has
    /// the XFS block size (4 KiB) as its logical sector size, so filesystems made on the
    /// base device use at least that: XFS allows direct I/O to a reflinked file only in
    /// whole blocks, and a loop device with smaller sectors silently falls back to
    /// buffered I/O (cached twice). `size` is not used: the file has the device's size.
    fn activate(&self, id: ThinId, _size: Bytes, read_only: bool) -> Result<PathBuf> {
        if let Some(dev) = self.attached(id) {
            return Ok(dev);
        }
        let file = self.device_file(id);
        if !file.exists() {
            return Err(Error::NotFound(format!("thin id {id} has no file")));
        }
        let opts = LoopOptions {
            read_only,
            block_size: Some(Bytes(u64::from(self.device_block_size))),
            direct_io: true,
        };
        let dev = loopback::attach(&file, opts)?;
        self.loops.lock().insert(id, dev.clone());
        Ok(dev)
    }

    /// Detaches the device's loop device. Fails with `FailedPrecondition` while it is
    /// mounted or open, leaving it attached (the kernel would otherwise defer the detach to
    /// the last close). An inactive or absent device succeeds.
    fn deactivate(&self, id: ThinId) -> Result<()> {
        let Some(dev) = self.attached(id) else {
            return Ok(());
        };
        loopback::detach(&dev).map_err(|e| match e {
            Error::FailedPrecondition(why) => {
                Error::FailedPrecondition(format!("thin id {id}: {why}"))
            }
            e => e,
        })?;
        self.loops.lock().remove(&id);
        Ok(())
    }

    /// A filesystem mounted on the device (found by device number in our mount table) is
    /// frozen and thawed (`FIFREEZE`/`FITHAW`), which writes out its dirty data and
    /// checkpoints its journal; a device open but not mounted gets its cache flushed. Then
    /// the device file is fsynced (the loop device writes it with direct I/O, but its
    /// extents and size are XFS metadata).
    fn flush(&self, id: ThinId) -> Result<()> {
        let Some(dev) = self.attached(id) else {
            return Ok(());
        };
        let (major, minor) = loopback::dev_numbers(&dev)?;
        match mount::mount_point_of(major, minor)? {
            Some(mnt) => freeze_and_thaw(&mnt, major, minor)?,
            None => File::open(&dev)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_error("flush loop device", &dev, e))?,
        }
        let file = self.device_file(id);
        File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error("fsync device file", &file, e))
    }

    /// Detaches at once when nobody uses the device, as [`Backend::deactivate`]; when it
    /// is busy, `LOOP_CLR_FD` without the exclusive open, which makes the kernel detach it
    /// at the last close (autoclear).
    fn deactivate_deferred(&self, id: ThinId) -> Result<()> {
        let Some(dev) = self.attached(id) else {
            return Ok(());
        };
        match loopback::detach(&dev) {
            Ok(()) => {}
            Err(Error::FailedPrecondition(_)) => loopback::detach_at_last_close(&dev)?,
            Err(e) => return Err(e),
        }
        self.loops.lock().remove(&id);
        Ok(())
    }

    /// Scans the kernel's loop devices (not our map), so reconcile sees what is really
    /// attached; what it finds is added to the map.
    ///
    /// A loop device detaching at its last close (a Commit's deferred deactivation) is
    /// listed, but not handed out again: a device of ours attached to the same file wins,
    /// and it stays out of the map, so a later activate attaches a fresh one.
    fn active_devices(&self) -> Result<BTreeMap<ThinId, PathBuf>> {
        let mut found: BTreeMap<ThinId, PathBuf> = BTreeMap::new();
        let mut loops = self.loops.lock();
        for (id, dev) in device_loops(&self.devices)? {
            if loopback::detaching(&dev) {
                found.entry(id).or_insert(dev);
            } else {
                loops.insert(id, dev.clone());
                found.insert(id, dev);
            }
        }
        Ok(found)
    }

    /// Bytes of the device's file in extents that FIEMAP does not flag as shared, at the
    /// XFS block size (4 KiB). Precision: XFS knows only *whether* a block is shared, not
    /// with whom, so a block shared with any other device (its parent, a sibling, or a
    /// snapshot taken of it) counts for none of them. For a leaf snapshot this is the data
    /// it wrote since it was taken; a parent's count drops as it is snapshotted. Costs one
    /// FIEMAP pass over the file's extents; `size` is not used.
    fn mapped_bytes(&self, id: ThinId, _size: Bytes) -> Result<Bytes> {
        let file = self.device_file(id);
        let f = File::open(&file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(format!("thin id {id} has no file")),
            _ => io_error("open device file", &file, e),
        })?;
        unshared_bytes(&f).map_err(|e| io_error("FIEMAP", &file, e))
    }

    /// Compares the two files' extents ([`bytes_not_shared_with`]): exact, whatever other
    /// files share the blocks. Two FIEMAP passes.
    fn added_bytes(&self, id: ThinId, parent: ThinId) -> Result<Bytes> {
        let read = |id: ThinId| {
            let file = self.device_file(id);
            File::open(&file)
                .and_then(|f| extents(&f))
                .map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => Error::NotFound(format!("thin id {id} has no file")),
                    _ => io_error("FIEMAP", &file, e),
                })
        };
        Ok(Bytes(bytes_not_shared_with(&read(id)?, &read(parent)?)))
    }

    /// The ids of the files in `devices/`, read from the XFS.
    fn list_ids(&self) -> Result<BTreeSet<ThinId>> {
        let entries =
            fs::read_dir(&self.devices).map_err(|e| io_error("list devices", &self.devices, e))?;
        let mut ids = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list devices", &self.devices, e))?;
            match entry.file_name().to_str().and_then(parse_id) {
                Some(id) => {
                    ids.insert(id);
                }
                None => warn!(file = ?entry.file_name(), "stray file among the device files"),
            }
        }
        Ok(ids)
    }

    /// Extends the data file, refreshes its loop device, and grows the mounted XFS over it
    /// (online: device files stay attached and mounted). Growing an XFS that fills its
    /// device already changes nothing, which makes this idempotent.
    /// The low water mark is reported only (`status`), from the autoextend policy.
    fn grow_data(&self, size: Bytes, _low_water_mark: DataBlocks) -> Result<()> {
        loopback::extend(&self.data_file, size.0)?;
        failpoint::hit("grow:after_file");
        loopback::ensure_capacity(&self.data_dev, size.0)?;
        fsutil::grow_xfs_data(&self.mnt, size.0)?;
        info!(size = %size, mnt = %self.mnt.display(), "pool XFS grown");
        Ok(())
    }

    /// Refused: the metadata file is the XFS's external log, whose size is fixed at mkfs
    /// (`xfs_growfs -L` cannot resize an external log while mounted).
    fn grow_metadata(&self, _size: Bytes) -> Result<()> {
        Err(Error::FailedPrecondition(
            "the reflink backend's metadata file holds the XFS log, which cannot grow online; \
             it never fills up (the log is circular), so only data needs growing"
                .into(),
        ))
    }

    fn metadata_grows(&self) -> bool {
        false
    }

    /// None: nothing raises an event when the XFS fills; the monitor polls.
    fn events(&self) -> Result<Option<Box<dyn PoolEvents>>> {
        Ok(None)
    }

    /// Detaches every device loop, unmounts the XFS, detaches the data and metadata loops.
    /// Fails with `FailedPrecondition`, before unmounting, if a device is still in use.
    fn teardown(&self) -> Result<()> {
        let mut first_err = None;
        for (id, dev) in device_loops(&self.devices)? {
            match loopback::detach(&dev) {
                Ok(()) => {
                    self.loops.lock().remove(&id);
                }
                Err(e) => {
                    warn!(id = %id, error = %e, "cannot deactivate a device on teardown");
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        unmount_xfs(&self.mnt)?;
        for f in [&self.data_file, &self.metadata_file] {
            if let Some(dev) = loopback::find(f)? {
                loopback::detach(&dev)?;
            }
        }
        info!(mnt = %self.mnt.display(), "reflink pool torn down");
        Ok(())
    }
}

/// The log size for a metadata file of `metadata_size`: all of it, up to XFS's limit, in
/// whole MiB.
fn log_size(metadata_size: Bytes) -> Bytes {
    Bytes(metadata_size.min(MAX_LOG).0 & !((1 << 20) - 1))
}

/// Maps ENOSPC to `ResourceExhausted`; other errors keep their context.
fn io_error(context: &'static str, path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::ResourceExhausted(format!(
            "{context} ({}): the pool's XFS is out of space",
            path.display()
        ))
    } else {
        Error::io(context, path, e)
    }
}

fn canonical(path: &Path) -> Result<PathBuf> {
    fs::canonicalize(path).map_err(|e| Error::io("resolve path", path, e))
}

fn parse_id(name: &str) -> Option<ThinId> {
    // Only canonical decimal names are ours ("007" is not).
    let n: u32 = name.parse().ok()?;
    (n.to_string() == name)
        .then(|| ThinId::new(n).ok())
        .flatten()
}

/// Creates a device file. Precondition: `id` has no file (else `FailedPrecondition`).
fn create_device_file(file: &Path, id: ThinId) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(fsutil::PRIVATE_FILE_MODE)
        .open(file)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                Error::FailedPrecondition(format!("thin id {id} already has a file"))
            }
            _ => io_error("create device file", file, e),
        })
}

/// Removes a half-made device file after a failure; the caller reports the failure.
fn remove_quietly(file: &Path) {
    if let Err(e) = fs::remove_file(file)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(file = %file.display(), error = %e, "could not remove a half-made device file");
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync directory", dir, e))
}

/// Writes the counter atomically and durably: temp file, fsync, rename, fsync(dir).
fn write_counter(mnt: &Path, txn: u64) -> Result<()> {
    let tmp = mnt.join(COUNTER_TEMP);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(fsutil::PRIVATE_FILE_MODE)
        .open(&tmp)
        .map_err(|e| io_error("create counter", &tmp, e))?;
    f.write_all(format!("{txn}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io_error("write counter", &tmp, e))?;
    let dst = mnt.join(COUNTER_FILE);
    fs::rename(&tmp, &dst).map_err(|e| io_error("rename counter", &dst, e))?;
    sync_dir(mnt)
}

fn read_counter(mnt: &Path) -> Result<u64> {
    let file = mnt.join(COUNTER_FILE);
    let text = fs::read_to_string(&file).map_err(|e| Error::io("read counter", &file, e))?;
    text.trim().parse().map_err(|_| {
        Error::Inconsistent(format!("{} holds {text:?}, not a number", file.display()))
    })
}

/// Mounts the pool's XFS at `mnt` with its external log, on a private bind of `mnt` onto
/// itself ([`mount::mount_private`]): an XFS copied into a peer namespace would keep the
/// data loop device busy there and make teardown fail.
///
/// Options: noatime and no devices, setuid or exec, as the XFS holds only device images.
/// No online `discard`: blocks XFS frees (deleted devices) stay allocated in the data file
/// and XFS reuses them, as dm-thin reuses its freed blocks. With `discard`, every free
/// punched a hole in the host file that the next write had to allocate again, which cut
/// sequential writes to new space to a third (see reflinkbench); a periodic `fstrim` of
/// the mount gives free space back to the host instead.
fn mount_xfs(data_dev: &Path, meta_dev: &Path, mnt: &Path) -> Result<()> {
    fsutil::create_private_dir(mnt).map_err(|e| io_error("create mount point", mnt, e))?;
    let mnt = &canonical(mnt)?; // mountinfo has canonical paths
    let opts = format!("logdev={}", meta_dev.display());
    let flags = MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount::mount_private(data_dev, mnt, "xfs", flags, Some(opts.as_str()))?;
    // The XFS root is 0755 from mkfs, and pools made before the modes were set have 0644
    // device files: only root may read container data.
    fsutil::make_private(mnt)
}

/// Unmounts the pool's XFS and then the private bind under it (pools mounted before the
/// bind existed have none).
fn unmount_xfs(mnt: &Path) -> Result<()> {
    mount::unmount_all(mnt, 2)
}

/// Loop devices whose backing file is a device file in `devices` (canonical), by id. Files
/// unlinked while attached count too: teardown must detach them before it can unmount.
fn device_loops(devices: &Path) -> Result<Vec<(ThinId, PathBuf)>> {
    Ok(loopback::scan()?
        .into_iter()
        .filter(|a| a.backing.parent() == Some(devices))
        .filter_map(|a| {
            let id = a.backing.file_name()?.to_str().and_then(parse_id)?;
            Some((id, a.dev))
        })
        .collect())
}

// From <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Thaws the filesystem of `dev` if it is frozen (see `thaw_left_frozen`).
fn thaw_device(dev: &Path, fs: crate::model::FsType, scratch: &Path) -> Result<()> {
    let (major, minor) = loopback::dev_numbers(dev)?;
    if let Some(mnt) = mount::mount_point_of(major, minor)? {
        return thaw_at(&mnt);
    }
    // A filesystem without a mount shows only in sysfs, under the device's name.
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = Path::new("/sys/fs").join(fs.to_string()).join(&name);
    if name.is_empty() || !sys.exists() {
        return Ok(());
    }
    warn!(dev = %dev.display(), "a filesystem without a mount holds the device; thawing it");
    let data = (fs == crate::model::FsType::Xfs).then_some("nouuid");
    let m = mount::ScratchMount::new(dev, scratch, fs, false, data)?;
    let thawed = thaw_at(m.path());
    let unmounted = m.unmount();
    thawed?;
    unmounted
}

/// `FITHAW` on the filesystem mounted at `mnt`; one that is not frozen (EINVAL) is fine.
fn thaw_at(mnt: &Path) -> Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mnt)
        .map_err(|e| io_error("open mount point", mnt, e))?;
    // SAFETY: FITHAW takes an ignored int argument; the fd is open.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(io_error("FITHAW", mnt, e));
        }
    } else {
        warn!(mnt = %mnt.display(), "thawed a filesystem a crash left frozen");
    }
    Ok(())
}

/// Freezes and thaws the filesystem mounted at `mnt`, checked to be the one on device
/// `major:minor` (the path comes from the mount table, and the tree under it is a
/// container's). A filesystem that cannot freeze is synced instead.
fn freeze_and_thaw(mnt: &Path, major: u32, minor: u32) -> Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mnt)
        .map_err(|e| io_error("open mount point", mnt, e))?;
    let st =
        nix::sys::stat::fstat(&dir).map_err(|e| io_error("stat mount point", mnt, e.into()))?;
    if (
        nix::sys::stat::major(st.st_dev) as u32,
        nix::sys::stat::minor(st.st_dev) as u32,
    ) != (major, minor)
    {
        return Err(Error::Inconsistent(format!(
            "{} is not the mount of device {major}:{minor}",
            mnt.display()
        )));
    }
    // SAFETY: FIFREEZE and FITHAW take an ignored int argument; the fd is open.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) } != 0 {
        let e = io::Error::last_os_error();
        // EBUSY: someone else froze it, which flushed it too.
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        warn!(mnt = %mnt.display(), error = %e, "cannot freeze; syncing instead");
        // SAFETY: syncfs on an open fd.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io_error("syncfs", mnt, io::Error::last_os_error()));
        }
        return Ok(());
    }
    // Frozen: a crash here leaves it so until the next open thaws it.
    failpoint::hit("commit:after_freeze");
    // SAFETY: as above.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) } != 0 {
        return Err(io_error("FITHAW", mnt, io::Error::last_os_error()));
    }
    Ok(())
}

/// `struct fiemap` from `<linux/fiemap.h>`, without its extent array.
#[repr(C)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

const FIEMAP_BATCH: usize = 512;

/// A fiemap request with room for [`FIEMAP_BATCH`] extents, laid out as the kernel expects.
#[repr(C)]
struct FiemapRequest {
    header: FiemapHeader,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, FiemapHeader);

/// Sums the lengths of `f`'s extents that are not shared (nor delayed, which FIEMAP_FLAG_SYNC
/// should have flushed anyway).
fn unshared_bytes(f: &File) -> io::Result<Bytes> {
    let mut total = 0u64;
    for_each_extents(f, |extents| {
        total += extents
            .iter()
            .filter(|e| e.fe_flags & (FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_DELALLOC) == 0)
            .map(|e| e.fe_length)
            .sum::<u64>();
    })?;
    Ok(Bytes(total))
}

/// Calls `f` with each batch of `file`'s extents, in logical order (FIEMAP, flushing first).
fn for_each_extents(file: &File, mut f: impl FnMut(&[FiemapExtent])) -> io::Result<()> {
    // SAFETY: all-zero is a valid FiemapRequest (plain integers).
    let mut req: Box<FiemapRequest> = Box::new(unsafe { std::mem::zeroed() });
    let mut start = 0u64;
    loop {
        req.header = FiemapHeader {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: FIEMAP_BATCH as u32,
            fm_reserved: 0,
        };
        // SAFETY: the header is followed by room for fm_extent_count extents.
        unsafe { fs_ioc_fiemap(file.as_raw_fd(), &mut req.header) }.map_err(io::Error::from)?;
        let n = req.header.fm_mapped_extents as usize;
        let extents = &req.extents[..n.min(FIEMAP_BATCH)];
        let Some(last) = extents.last() else { break };
        f(extents);
        if last.fe_flags & FIEMAP_EXTENT_LAST != 0 {
            break;
        }
        start = last.fe_logical + last.fe_length;
    }
    Ok(())
}

/// One mapped range of a file: logical offset, physical offset, length (bytes).
type Extent = (u64, u64, u64);

/// `file`'s mapped extents (delayed ones left out, as in [`unshared_bytes`]).
fn extents(file: &File) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    for_each_extents(file, |batch| {
        out.extend(
            batch
                .iter()
                .filter(|e| e.fe_flags & FIEMAP_EXTENT_DELALLOC == 0)
                .map(|e| (e.fe_logical, e.fe_physical, e.fe_length)),
        );
    })?;
    Ok(out)
}

/// Bytes of `child`'s extents that `parent` does not map at the same logical offset to the
/// same physical block: what the child wrote since it was cloned. Both lists are sorted by
/// logical offset and their extents do not overlap (FIEMAP's order); one merge pass.
fn bytes_not_shared_with(child: &[Extent], parent: &[Extent]) -> u64 {
    let mut same = 0u64;
    let mut j = 0;
    for &(cl, cp, clen) in child {
        let cend = cl + clen;
        // Parent extents ending at or before this child extent cannot overlap it, nor any
        // later one.
        while j < parent.len() && parent[j].0 + parent[j].2 <= cl {
            j += 1;
        }
        let mut k = j;
        while k < parent.len() && parent[k].0 < cend {
            let (pl, pp, plen) = parent[k];
            // Same block at the same offset: the logical-to-physical shift is equal.
            if cp.wrapping_sub(cl) == pp.wrapping_sub(pl) {
                same += cend.min(pl + plen) - cl.max(pl);
            }
            k += 1;
        }
    }
    child.iter().map(|e| e.2).sum::<u64>() - same
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_comparison_counts_only_what_differs() {
        const K: u64 = 4096;
        // In 4 KiB blocks: the parent maps blocks [0, 2) at 100 and [4, 8) at 200.
        let parent = [(0, 100 * K, 2 * K), (4 * K, 200 * K, 4 * K)];
        // A fresh clone: the same extents.
        assert_eq!(bytes_not_shared_with(&parent, &parent), 0);
        // The child rewrote block 1 and added block 2 (one extent at 500), and rewrote
        // block 5 (at 900); blocks 0, 4, 6 and 7 are still the parent's.
        let child = [
            (0, 100 * K, K),
            (K, 500 * K, 2 * K),
            (4 * K, 200 * K, K),
            (5 * K, 900 * K, K),
            (6 * K, 202 * K, 2 * K),
        ];
        assert_eq!(bytes_not_shared_with(&child, &parent), 3 * K);
        // Nothing in common with an empty parent; an empty child adds nothing.
        assert_eq!(bytes_not_shared_with(&child, &[]), 7 * K);
        assert_eq!(bytes_not_shared_with(&[], &parent), 0);
        // A child extent spanning both parent extents, at the second one's shift only.
        let spanning = [(0, 196 * K, 8 * K)];
        assert_eq!(bytes_not_shared_with(&spanning, &parent), 4 * K);
    }

    #[test]
    fn ids_are_canonical_decimals() {
        assert_eq!(parse_id("17").map(ThinId::get), Some(17));
        assert_eq!(parse_id("017"), None);
        assert_eq!(parse_id("transaction_id"), None);
        assert_eq!(parse_id("16777216"), None);
    }

    #[test]
    fn log_is_capped() {
        assert_eq!(log_size(Bytes::gib(2)), MAX_LOG);
        assert_eq!(log_size(Bytes::mib(64)), Bytes::mib(64));
        assert_eq!(log_size(Bytes(Bytes::mib(64).0 + 4096)), Bytes::mib(64));
    }

    #[test]
    fn fiemap_structs_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<FiemapHeader>(), 32);
        assert_eq!(std::mem::size_of::<FiemapExtent>(), 56);
    }
}
