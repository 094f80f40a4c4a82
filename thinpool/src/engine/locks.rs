//! The pool's locks: the root's lock file (one process per pool) and the per-device locks.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use crate::backend::PoolPaths;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::ids::ThinId;

/// Per-device locks: kernel calls on one device are serialised, different devices are not.
#[derive(Default)]
pub(super) struct DeviceLocks {
    map: Mutex<HashMap<ThinId, Arc<parking_lot::Mutex<()>>>>,
}

/// Holds one device's lock until dropped.
type DeviceGuard = parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()>;

impl DeviceLocks {
    pub(super) fn lock(&self, id: ThinId) -> DeviceGuard {
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
    pub(super) fn forget(&self, id: ThinId) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map's own reference left (holders and waiters clone the Arc).
        if map.get(&id).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(&id);
        }
    }
}

pub(super) fn lock_root(paths: &PoolPaths) -> Result<File> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
