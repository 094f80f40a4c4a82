//! Loop devices over pool files: find, attach (with direct I/O), grow, detach.
//!
//! loopdev-3 has no query API, so after a restart we find a file's loop device by scanning
//! `/sys/block/loop*/loop/backing_file`.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use loopdev::{LoopControl, LoopDevice};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// The loop device whose backing file is `file`, if one is attached.
pub fn find(file: &Path) -> Result<Option<PathBuf>> {
    let file = fs::canonicalize(file).map_err(|e| Error::io("resolve pool file", file, e))?;
    let entries = match fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(e) => return Err(Error::io("list block devices", "/sys/block", e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim_end()) == file {
            return Ok(Some(PathBuf::from("/dev").join(name)));
        }
    }
    Ok(None)
}

/// Attaches `file` to a free loop device, or returns the one it is already attached to.
///
/// Direct I/O avoids caching every block twice (once for the loop device, once for the
/// file); it needs a backing filesystem with O_DIRECT (not tmpfs), so without it we fall back
/// to buffered I/O and say so.
pub fn attach(file: &Path) -> Result<PathBuf> {
    if let Some(dev) = find(file)? {
        info!(file = %file.display(), dev = %dev.display(), "pool file already attached");
        return Ok(dev);
    }
    let ctl = LoopControl::open().map_err(|e| Error::io("open", "/dev/loop-control", e))?;
    // LOOP_CTL_GET_FREE then LOOP_SET_FD races with other processes taking the same device;
    // EBUSY means someone won, so ask for another.
    let mut last_err = None;
    for _ in 0..20 {
        let dev = ctl
            .next_free()
            .map_err(|e| Error::io("find a free loop device", "/dev/loop-control", e))?;
        let path = dev.path().unwrap_or_default();
        match dev.with().autoclear(false).attach(file) {
            Ok(()) => {
                if let Err(e) = dev.set_direct_io(true) {
                    warn!(file = %file.display(), error = %e,
                        "direct I/O unavailable on the pool file's filesystem; using buffered I/O");
                }
                return Ok(path);
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

/// Makes the loop device re-read its backing file's size (after the file grew).
pub fn refresh_capacity(dev: &Path) -> Result<()> {
    let ld = LoopDevice::open(dev).map_err(|e| Error::io("open loop device", dev, e))?;
    ld.set_capacity()
        .map_err(|e| Error::io("LOOP_SET_CAPACITY", dev, e))
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

/// Extends the sparse file at `path` to `size` bytes and makes the new length durable. A file
/// of that length already is left as it is (a grow being finished); a longer one is an error,
/// since pool files never shrink.
pub fn extend(path: &Path, size: u64) -> Result<()> {
    let f = fs::OpenOptions::new()
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
    let f = fs::OpenOptions::new()
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

/// Detaches a loop device. A device that is already free is fine.
pub fn detach(dev: &Path) -> Result<()> {
    let ld = match LoopDevice::open(dev) {
        Ok(ld) => ld,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("open loop device", dev, e)),
    };
    // EBUSY right after a umount or dm remove is transient: the last opener is closing.
    for attempt in 0..50 {
        match ld.detach() {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(Error::io("detach loop device", dev, e)),
        }
    }
    unreachable!("the loop above returns on its last attempt")
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
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
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
