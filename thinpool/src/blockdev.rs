//! Small block-device helpers: whole-device discard, and whether a node is in use.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// Whether a device node is in use: an exclusive open of a block device fails with EBUSY
/// while it is mounted or exclusively claimed. Plain opens by other processes do not show
/// here; the backend's deactivate refuses those.
pub(crate) fn node_in_use(node: &Path) -> bool {
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

/// Discards every block of a device (BLKDISCARD over its whole length).
pub(crate) fn discard_device(dev: &std::path::Path) -> Result<()> {
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
