//! Loop devices, and the sparse files behind them: the one place that attaches, finds and
//! detaches loop devices, for the pool files of both backends and reflink's device files.
//!
//! - [`attach`] configures a device in one `LOOP_CONFIGURE` (backing file, block size,
//!   direct I/O, read-only), so it is never visible half set up; kernels before 5.8 get the
//!   older `LOOP_SET_FD` sequence.
//! - [`detach`] never leaves a device to vanish later: `LOOP_CLR_FD` on a device that is
//!   open elsewhere does not fail, it sets autoclear (see [`detach`]).
//! - [`scan`] lists attached devices by backing file from sysfs, since the kernel has no
//!   lookup by file; a daemon restart finds its devices again with it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::units::Bytes;

/// How a file is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopOptions {
    /// Both the backing file (opened read-only) and the device are read-only.
    pub read_only: bool,
    /// The device's logical block size; `None`: the kernel's default (512 bytes).
    pub block_size: Option<Bytes>,
    /// Direct I/O to the backing file, so blocks are not cached twice (once for the device,
    /// once for the file). A backing filesystem without it (tmpfs), or a block size below
    /// its alignment, gets buffered I/O, with a warning.
    pub direct_io: bool,
}

impl LoopOptions {
    /// A pool's data or metadata file: read-write, direct I/O, 512-byte sectors.
    pub const POOL_FILE: LoopOptions = LoopOptions {
        read_only: false,
        block_size: None,
        direct_io: true,
    };
}

/// How long [`detach`] waits for another opener (udev's blkid probe, say) to close.
const DETACH_WAIT: Duration = Duration::from_secs(1);
/// How often attach asks for another free device when a concurrent attach took it.
const ATTACH_TRIES: usize = 20;

// From <linux/loop.h>.
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Which ioctls attach a device: [`Method::Configure`] first; [`Method::SetFd`] where the
/// kernel does not know `LOOP_CONFIGURE` (before 5.8), and in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Configure,
    SetFd,
}

/// Attaches `file` to a free loop device and returns the device node. A file already
/// attached gets a second device (see [`find_or_attach`]).
pub fn attach(file: &Path, opts: LoopOptions) -> Result<PathBuf> {
    attach_with(file, opts, Method::Configure)
}

/// The loop device `file` is attached to, or a new one. A device found with autoclear set
/// (a `LOOP_CLR_FD` while it was open, which would detach it at its last close) is kept
/// attached. For pool files: one device per file, found again after a daemon restart. The
/// options apply only to a new device.
pub fn find_or_attach(file: &Path, opts: LoopOptions) -> Result<PathBuf> {
    if let Some(dev) = find(file)? {
        if detaching(&dev) {
            warn!(dev = %dev.display(), "the loop device was set to detach at its last close; keeping it");
            keep_attached(&dev)?;
        }
        info!(file = %file.display(), dev = %dev.display(), "file already attached");
        return Ok(dev);
    }
    attach(file, opts)
}

fn attach_with(file: &Path, opts: LoopOptions, mut method: Method) -> Result<PathBuf> {
    let block_size = match opts.block_size {
        None => 0,
        Some(b) => u32::try_from(b.0).map_err(|_| {
            Error::InvalidArgument(format!("loop device block size {b} is out of range"))
        })?,
    };
    let backing = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .open(file)
        .map_err(|e| Error::io("open backing file", file, e))?;
    let ctl_path = Path::new("/dev/loop-control");
    let ctl = File::open(ctl_path).map_err(|e| Error::io("open", ctl_path, e))?;
    // LOOP_CTL_GET_FREE hands the same device to concurrent callers (other processes too);
    // the loser's attach fails with EBUSY and asks again.
    let mut last_err = None;
    for _ in 0..ATTACH_TRIES {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(Error::io(
                "find a free loop device",
                ctl_path,
                io::Error::last_os_error(),
            ));
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let loop_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .map_err(|e| Error::io("open loop device", &dev, e))?;
        let mut attached = Err(io::Error::from_raw_os_error(libc::EINVAL));
        if method == Method::Configure {
            attached = configure(&loop_file, &backing, block_size, opts);
            if let Err(e) = &attached
                && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY))
            {
                // A kernel without LOOP_CONFIGURE answers EINVAL; so does one refusing an
                // option, and the step-by-step path then says which.
                debug!(error = %e, "LOOP_CONFIGURE refused; attaching step by step");
                method = Method::SetFd;
            }
        }
        if method == Method::SetFd {
            attached = set_fd(&loop_file, &backing, &dev, file, block_size, opts)?;
        }
        match attached {
            Ok(()) => {
                if opts.direct_io && sysfs_loop_attr_value(&dev, "dio").as_deref() != Some("1") {
                    warn!(file = %file.display(), dev = %dev.display(),
                        "direct I/O unavailable for this file; the loop device uses buffered I/O");
                }
                return Ok(dev);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                last_err = Some(e);
                sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(Error::io("attach loop device", file, e)),
        }
    }
    Err(Error::io(
        "attach loop device (busy after 20 tries)",
        file,
        last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

/// `LOOP_CONFIGURE`: backing file, block size and flags in one ioctl.
fn configure(
    loop_file: &File,
    backing: &File,
    block_size: u32,
    opts: LoopOptions,
) -> io::Result<()> {
    let mut config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size,
        // SAFETY: LoopInfo64 is plain data; all-zero is its "no options" value.
        info: unsafe { std::mem::zeroed() },
        reserved: [0; 8],
    };
    if opts.direct_io {
        config.info.lo_flags |= LO_FLAGS_DIRECT_IO;
    }
    if opts.read_only {
        config.info.lo_flags |= LO_FLAGS_READ_ONLY;
    }
    // SAFETY: the kernel reads `config`, which outlives the call.
    if unsafe { libc::ioctl(loop_file.as_raw_fd(), LOOP_CONFIGURE, &config) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The pre-5.8 way: `LOOP_SET_FD` (read-only follows the backing file's open mode), then
/// `LOOP_SET_STATUS64` (no autoclear), `LOOP_SET_BLOCK_SIZE` and `LOOP_SET_DIRECT_IO`. The
/// inner result is the attach itself (EBUSY: another process took the device); a later
/// step that fails detaches again and is the outer error, except direct I/O, which falls
/// back to buffered I/O as `LOOP_CONFIGURE` does.
fn set_fd(
    loop_file: &File,
    backing: &File,
    dev: &Path,
    file: &Path,
    block_size: u32,
    opts: LoopOptions,
) -> Result<io::Result<()>> {
    let fd = loop_file.as_raw_fd();
    // SAFETY: LOOP_SET_FD takes the backing fd as its argument; both are open.
    if unsafe { libc::ioctl(fd, LOOP_SET_FD, backing.as_raw_fd()) } != 0 {
        return Ok(Err(io::Error::last_os_error()));
    }
    let undo = |context: &'static str, e: io::Error| {
        // Our fd is the only opener unless udev probes: then the kernel detaches at its
        // close, which is as good here.
        // SAFETY: LOOP_CLR_FD takes no argument; the fd is open.
        unsafe { libc::ioctl(fd, LOOP_CLR_FD, 0) };
        Error::io(context, file, e)
    };
    // SAFETY: LoopInfo64 is plain data; all-zero: no offset, no size limit, no flags.
    let info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel reads `info`, which outlives the call.
    if unsafe { libc::ioctl(fd, LOOP_SET_STATUS64, &info) } != 0 {
        return Err(undo("LOOP_SET_STATUS64", io::Error::last_os_error()));
    }
    if block_size != 0 {
        // SAFETY: LOOP_SET_BLOCK_SIZE takes the size as its argument.
        if unsafe { libc::ioctl(fd, LOOP_SET_BLOCK_SIZE, block_size as libc::c_ulong) } != 0 {
            return Err(undo("LOOP_SET_BLOCK_SIZE", io::Error::last_os_error()));
        }
    }
    if opts.direct_io {
        // SAFETY: LOOP_SET_DIRECT_IO takes 0 or 1 as its argument.
        if unsafe { libc::ioctl(fd, LOOP_SET_DIRECT_IO, 1 as libc::c_ulong) } != 0 {
            debug!(dev = %dev.display(), error = %io::Error::last_os_error(), "LOOP_SET_DIRECT_IO refused");
        }
    }
    Ok(Ok(()))
}

/// Detaches the loop device `dev` if nobody uses it; fails with `FailedPrecondition`, leaving
/// it attached, if somebody does. A device that is not attached (or does not exist) is fine.
///
/// `LOOP_CLR_FD` on a device that is open elsewhere does not fail: the kernel sets autoclear
/// and detaches at the last close, which would make a mounted device vanish at unmount, or
/// the loop under a live dm table go at the table's removal while teardown said "done". So:
/// an exclusive open first (it fails with EBUSY while the device is mounted or claimed, by
/// a dm table for one), which also keeps anyone from mounting it meanwhile; then
/// `LOOP_CLR_FD`; and if a non-exclusive opener still holds it after [`DETACH_WAIT`], the
/// autoclear is cleared again and the device reported busy.
pub fn detach(dev: &Path) -> Result<()> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(Error::FailedPrecondition(format!(
                "device {} is in use (mounted?)",
                dev.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENXIO) => {
            return Ok(());
        }
        Err(e) => return Err(Error::io("open loop device", dev, e)),
    };
    // Which file is ours: once detached, the device may at once be attached to another file
    // by a concurrent attach (LOOP_CTL_GET_FREE hands it out), so "a backing file is still
    // there" alone does not mean ours is.
    let backing = sysfs_loop_attr(dev, "backing_file");
    let ours = fs::read_to_string(&backing).ok();
    let still_ours = || ours.is_some() && fs::read_to_string(&backing).ok() == ours;
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(()); // not attached
        }
        return Err(Error::io("LOOP_CLR_FD", dev, e));
    }
    // Our close is the last one unless someone else has the device open.
    drop(f);
    let waited = Instant::now();
    while still_ours() {
        if waited.elapsed() >= DETACH_WAIT {
            return match keep_attached(dev) {
                Ok(true) => Err(Error::FailedPrecondition(format!(
                    "device {} is in use (open by another process)",
                    dev.display()
                ))),
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            };
        }
        sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `LOOP_CLR_FD` without the exclusive open: detaches now if nobody has the device open,
/// else the kernel detaches it at the last close (autoclear). For a device deliberately
/// left to its last user (a deferred deactivation); everything else uses [`detach`].
pub fn detach_at_last_close(dev: &Path) -> Result<()> {
    let f = match File::open(dev) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENXIO) => {
            return Ok(());
        }
        Err(e) => return Err(Error::io("open loop device", dev, e)),
    };
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(Error::io("LOOP_CLR_FD", dev, e));
        }
    }
    Ok(())
}

/// Whether the loop device detaches at its last close (autoclear). Our devices are never
/// attached with autoclear, so it marks one given up ([`detach_at_last_close`]) but still
/// in use.
pub fn detaching(dev: &Path) -> bool {
    sysfs_loop_attr_value(dev, "autoclear").as_deref() == Some("1")
}

/// Clears the autoclear flag a `LOOP_CLR_FD` set on a device still open elsewhere. Returns
/// false if the device detached meanwhile.
fn keep_attached(dev: &Path) -> Result<bool> {
    let f = File::open(dev).map_err(|e| Error::io("open loop device", dev, e))?;
    // SAFETY: LoopInfo64 is plain data of the kernel's layout; zeroes are a valid value.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel fills `info`, which outlives the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64, &mut info) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(false);
        }
        return Err(Error::io("LOOP_GET_STATUS64", dev, e));
    }
    info.lo_flags &= !LO_FLAGS_AUTOCLEAR;
    // SAFETY: as above; the kernel reads `info`.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_STATUS64, &info) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(false);
        }
        return Err(Error::io("LOOP_SET_STATUS64", dev, e));
    }
    Ok(true)
}

/// An attached loop device, as [`scan`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The device node, `/dev/loopN`.
    pub dev: PathBuf,
    /// Its backing file's path, as the kernel resolved it at attach time.
    pub backing: PathBuf,
    /// The backing file was unlinked (the kernel's " (deleted)" suffix, removed from
    /// `backing`): a file now at that path is another one.
    pub deleted: bool,
}

/// Every attached loop device on the host, from `/sys/block/loop*/loop/backing_file`. A
/// device detaching meanwhile is left out.
pub fn scan() -> Result<Vec<Attached>> {
    let entries =
        fs::read_dir("/sys/block").map_err(|e| Error::io("list block devices", "/sys/block", e))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        let dev = PathBuf::from("/dev").join(name);
        if let Some((backing, deleted)) = read_backing(&dev) {
            found.push(Attached {
                dev,
                backing,
                deleted,
            });
        }
    }
    Ok(found)
}

/// The loop device whose backing file is `file` (the file now at that path, not an
/// unlinked one), if one is attached. With two, the first found.
pub fn find(file: &Path) -> Result<Option<PathBuf>> {
    let file = fs::canonicalize(file).map_err(|e| Error::io("resolve path", file, e))?;
    Ok(scan()?
        .into_iter()
        .find(|a| !a.deleted && a.backing == file)
        .map(|a| a.dev))
}

/// The backing file of loop device `dev` (" (deleted)" removed), if it has one.
pub fn backing_file(dev: &Path) -> Option<PathBuf> {
    read_backing(dev).map(|(path, _)| path)
}

/// The backing file of `dev` and whether it was unlinked.
fn read_backing(dev: &Path) -> Option<(PathBuf, bool)> {
    let text = fs::read_to_string(sysfs_loop_attr(dev, "backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    if text.is_empty() {
        return None;
    }
    Some(match text.strip_suffix(" (deleted)") {
        Some(path) => (PathBuf::from(path), true),
        None => (PathBuf::from(text), false),
    })
}

/// `/sys/block/<dev>/loop/<attr>`.
fn sysfs_loop_attr(dev: &Path, attr: &str) -> PathBuf {
    let name = dev.file_name().unwrap_or_default();
    Path::new("/sys/block").join(name).join("loop").join(attr)
}

/// The trimmed text of a sysfs loop attribute; `None` if unreadable (not attached).
fn sysfs_loop_attr_value(dev: &Path, attr: &str) -> Option<String> {
    fs::read_to_string(sysfs_loop_attr(dev, attr))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Makes the loop device re-read its backing file's size (after the file grew).
pub fn refresh_capacity(dev: &Path) -> Result<()> {
    let f = File::open(dev).map_err(|e| Error::io("open loop device", dev, e))?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_CAPACITY, 0) } != 0 {
        return Err(Error::io(
            "LOOP_SET_CAPACITY",
            dev,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The size of block device `dev` in bytes, from sysfs.
pub fn device_size(dev: &Path) -> Result<u64> {
    let name = dev.file_name().unwrap_or_default();
    let attr = Path::new("/sys/block").join(name).join("size");
    let text = fs::read_to_string(&attr).map_err(|e| Error::io("read", &attr, e))?;
    let sectors: u64 = text.trim().parse().map_err(|_| {
        Error::io(
            "parse",
            &attr,
            io::Error::new(io::ErrorKind::InvalidData, format!("{text:?}")),
        )
    })?;
    Ok(sectors * 512)
}

/// Makes the loop device `dev` follow its backing file's length `len` when it is shorter:
/// the file was extended (by a grow) without LOOP_SET_CAPACITY, because a crash came
/// between the two.
pub fn ensure_capacity(dev: &Path, len: u64) -> Result<()> {
    if device_size(dev)? < len {
        info!(dev = %dev.display(), len, "loop device is shorter than its file; refreshing");
        refresh_capacity(dev)?;
    }
    Ok(())
}

/// (major, minor) of a block device node.
pub fn dev_numbers(dev: &Path) -> Result<(u32, u32)> {
    let st =
        nix::sys::stat::stat(dev).map_err(|e| Error::io("stat device", dev, io::Error::from(e)))?;
    Ok((
        nix::sys::stat::major(st.st_rdev) as u32,
        nix::sys::stat::minor(st.st_rdev) as u32,
    ))
}

/// Creates a sparse file of `size` bytes. Precondition: the file does not exist.
pub fn create_sparse(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::fsutil::PRIVATE_FILE_MODE)
        .open(path)
        .map_err(|e| Error::io("create pool file", path, e))?;
    f.set_len(size)
        .map_err(|e| Error::io("size pool file", path, e))?;
    f.sync_all()
        .map_err(|e| Error::io("sync pool file", path, e))?;
    Ok(())
}

/// Extends the sparse file at `path` to `size` bytes and makes the new length durable. A file
/// of that length already is left as it is (a grow being finished); a longer one is an error,
/// since pool files never shrink.
pub fn extend(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open pool file", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io("stat pool file", path, e))?
        .len();
    if len > size {
        return Err(Error::InvalidArgument(format!(
            "{} is {len} bytes, longer than the {size} asked for; pool files never shrink",
            path.display()
        )));
    }
    if len < size {
        f.set_len(size).map_err(|e| match e.raw_os_error() {
            Some(libc::EFBIG) => Error::InvalidArgument(format!(
                "{} cannot be {size} bytes long: that is above the host filesystem's \
                 maximum file size",
                path.display()
            )),
            _ => Error::io("extend pool file", path, e),
        })?;
    }
    f.sync_all()
        .map_err(|e| Error::io("sync pool file", path, e))
}

/// Allocates every block of the file at `path` (its holes; data is kept) and syncs it. The
/// pool's metadata file is preallocated: a sparse one fails the pool (dm: metadata I/O
/// errors, `needs_check`; reflink: the XFS log) when the host filesystem fills. A file
/// already fully allocated costs one stat.
///
/// Errors: `ResourceExhausted` when the host filesystem has no room for it.
pub fn preallocate(path: &Path) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open pool file", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io("stat pool file", path, e))?
        .len();
    if allocated(path)? >= len {
        return Ok(());
    }
    // SAFETY: fallocate on a file descriptor we own; mode 0 only allocates (keeps data).
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSPC) => Error::ResourceExhausted(format!(
                "no room on the host filesystem to allocate {} ({len} bytes)",
                path.display()
            )),
            _ => Error::io("allocate pool file", path, e),
        });
    }
    f.sync_all()
        .map_err(|e| Error::io("sync pool file", path, e))
}

/// The length of the file at `path`.
pub fn file_len(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .map_err(|e| Error::io("stat", path, e))?
        .len())
}

/// Bytes the file at `path` takes on its filesystem (allocated blocks; less than its length
/// while it is sparse).
pub fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path)
        .map_err(|e| Error::io("stat", path, e))?
        .blocks()
        * 512)
}

/// Held by every unit test of this crate that attaches loop devices. A detached device's
/// number is handed out again at once (LOOP_CTL_GET_FREE), so a test beside it could take
/// it: then "no longer attached" checks see the other test's file, and a failing test's
/// clean-up would detach the other test's device.
#[cfg(test)]
pub(crate) fn loop_test_guard() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_structs_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    /// A directory for backing files on the host filesystem (tmpfs has no direct I/O), or
    /// `None`, saying why, when this process cannot attach loop devices.
    fn loop_dir(name: &str) -> Option<PathBuf> {
        if let Err(e) = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
        {
            eprintln!("SKIP {name}: cannot open /dev/loop-control ({e}); needs root");
            return None;
        }
        let base = std::env::var_os("THINPOOL_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let dir = base.join(format!("loopback-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Some(fs::canonicalize(&dir).unwrap())
    }

    /// Detaches what a test attached, also when it fails.
    struct Cleanup(Vec<PathBuf>, PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for dev in &self.0 {
                if let Err(e) = detach(dev) {
                    eprintln!("cleanup: {e}");
                }
            }
            let _ = fs::remove_dir_all(&self.1);
        }
    }

    fn sysfs(dev: &Path, attr: &str) -> String {
        let name = dev.file_name().unwrap();
        fs::read_to_string(Path::new("/sys/block").join(name).join(attr))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Both attach paths give the same device: read-only, 4 KiB sectors, direct I/O, found
    /// by its file; detach frees it.
    fn attach_sets_every_option(name: &str, method: Method) {
        let _serial = loop_test_guard();
        let Some(dir) = loop_dir(name) else { return };
        let mut cleanup = Cleanup(Vec::new(), dir.clone());
        let file = dir.join("backing");
        create_sparse(&file, 16 << 20).unwrap();
        let opts = LoopOptions {
            read_only: true,
            block_size: Some(Bytes::kib(4)),
            direct_io: true,
        };
        let dev = attach_with(&file, opts, method).unwrap();
        cleanup.0.push(dev.clone());
        assert_eq!(sysfs(&dev, "ro"), "1");
        assert_eq!(sysfs(&dev, "queue/logical_block_size"), "4096");
        assert_eq!(sysfs(&dev, "loop/dio"), "1");
        assert_eq!(sysfs(&dev, "loop/autoclear"), "0");
        assert_eq!(device_size(&dev).unwrap(), 16 << 20);
        assert_eq!(find(&file).unwrap().as_ref(), Some(&dev));
        assert_eq!(find_or_attach(&file, opts).unwrap(), dev);
        let written = OpenOptions::new()
            .write(true)
            .open(&dev)
            .and_then(|mut f| io::Write::write_all(&mut f, &[1; 4096]));
        assert!(written.is_err(), "a read-only device took a write");
        detach(&dev).unwrap();
        assert_eq!(find(&file).unwrap(), None);
        assert_eq!(backing_file(&dev), None);
        detach(&dev).unwrap(); // not attached: fine
        cleanup.0.clear();

        // Read-write, default sectors, and growing with the file.
        let dev = attach_with(&file, LoopOptions::POOL_FILE, method).unwrap();
        cleanup.0.push(dev.clone());
        assert_eq!(sysfs(&dev, "ro"), "0");
        assert_eq!(sysfs(&dev, "queue/logical_block_size"), "512");
        extend(&file, 32 << 20).unwrap();
        ensure_capacity(&dev, 32 << 20).unwrap();
        assert_eq!(device_size(&dev).unwrap(), 32 << 20);
    }

    #[test]
    fn attach_with_loop_configure() {
        attach_sets_every_option("configure", Method::Configure);
    }

    /// The path for kernels without `LOOP_CONFIGURE`, forced.
    #[test]
    fn attach_with_set_fd_fallback() {
        attach_sets_every_option("setfd", Method::SetFd);
    }

    /// The autoclear trap: a device that someone holds open (exclusively, as a mount or a dm
    /// table does, or plainly) is reported busy and stays attached without autoclear.
    #[test]
    fn detach_refuses_a_device_in_use() {
        let _serial = loop_test_guard();
        let Some(dir) = loop_dir("busy") else { return };
        let mut cleanup = Cleanup(Vec::new(), dir.clone());
        let file = dir.join("backing");
        create_sparse(&file, 8 << 20).unwrap();
        let dev = attach(&file, LoopOptions::POOL_FILE).unwrap();
        cleanup.0.push(dev.clone());

        let claim = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&dev)
            .unwrap();
        let e = detach(&dev).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        drop(claim);

        let holder = File::open(&dev).unwrap();
        let e = detach(&dev).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert_eq!(sysfs(&dev, "loop/autoclear"), "0");
        assert_eq!(find(&file).unwrap().as_ref(), Some(&dev));

        // Given up to its last user: detaches at that close.
        detach_at_last_close(&dev).unwrap();
        assert!(detaching(&dev));
        // find_or_attach takes it back rather than losing it at the close.
        assert_eq!(find_or_attach(&file, LoopOptions::POOL_FILE).unwrap(), dev);
        assert!(!detaching(&dev));
        drop(holder);
        assert_eq!(find(&file).unwrap().as_ref(), Some(&dev));
        detach(&dev).unwrap();
        assert_eq!(find(&file).unwrap(), None);
        cleanup.0.clear();
    }

    /// A file unlinked while attached is listed as deleted, and not found by its path.
    #[test]
    fn scan_marks_deleted_backing_files() {
        let _serial = loop_test_guard();
        let Some(dir) = loop_dir("deleted") else {
            return;
        };
        let mut cleanup = Cleanup(Vec::new(), dir.clone());
        let file = dir.join("backing");
        create_sparse(&file, 8 << 20).unwrap();
        let dev = attach(&file, LoopOptions::POOL_FILE).unwrap();
        cleanup.0.push(dev.clone());
        let entry = |dev: &Path| scan().unwrap().into_iter().find(|a| a.dev == dev);
        assert_eq!(
            entry(&dev),
            Some(Attached {
                dev: dev.clone(),
                backing: file.clone(),
                deleted: false
            })
        );
        fs::remove_file(&file).unwrap();
        create_sparse(&file, 8 << 20).unwrap(); // another file at the same path
        assert_eq!(
            entry(&dev),
            Some(Attached {
                dev: dev.clone(),
                backing: file.clone(),
                deleted: true
            })
        );
        assert_eq!(backing_file(&dev), Some(file.clone()));
        assert_eq!(find(&file).unwrap(), None);
    }
}
