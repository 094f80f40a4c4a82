//! Activating, deactivating and removing devices: [`Pool::activate`], [`Pool::mounts`],
//! [`Pool::deactivate`], [`Pool::remove`], [`Pool::reclaim`], and the delete step that a
//! removal, a reclaim, a rollback and recovery share.

use std::path::PathBuf;

use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::failpoint;
use crate::ids::{DeviceName, ThinId};
use crate::model::{DeviceKind, DeviceRecord, DeviceState, FsType, MountSpec};
use crate::timing::Operation;

use super::{Pool, RemoveOptions, now_ns};
use crate::blockdev::discard_device;

impl Pool {
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
            // Recorded active, not yet in the kernel: the next open activates it.
            failpoint::hit("activate:after_record");
        }
        let read_only = rec.kind != DeviceKind::Active;
        let source = self.backend.activate(rec.id, rec.size, read_only)?;
        // Active and recorded so, but the client never got the mounts.
        failpoint::hit("activate:after_kernel");
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
        // Inactive, but recorded active: the next open activates it again.
        failpoint::hit("deactivate:after_kernel");
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
    /// retries every quarantined device's recovery step (see [`crate::model::QuarantinedDevice`]).
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
            let retried = self.retry_quarantined(id);
            // A quarantine retry done (or failed) and maybe recorded; the rest not yet run.
            failpoint::hit("reclaim:after_retry");
            match retried {
                Ok(true) => {}
                Ok(false) => debug!(id = %id, "still quarantined"),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for id in pending {
            // A Deleting record, the device still in the kernel: the next open finishes it.
            failpoint::hit("reclaim:before_delete");
            let done = self.finish_delete(id, false);
            // One pending delete finished and recorded, the rest still pending.
            failpoint::hit("reclaim:after_delete");
            match done {
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

    /// Removes a device whose create did not finish, from the backend and from our records:
    /// the same steps as finishing a delete.
    pub(super) fn undo_create(&self, id: ThinId) -> Result<()> {
        self.finish_delete(id, false)
    }

    /// Completes a recorded delete: deactivate, optionally discard, delete, forget.
    pub(super) fn finish_delete(&self, id: ThinId, discard: bool) -> Result<()> {
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
}
