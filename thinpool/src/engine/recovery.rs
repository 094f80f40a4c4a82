//! Recovery at open, and quarantine: what [`Pool::open`] does to an existing pool after
//! a crash or reboot (finish an interrupted grow, check the transaction id and the base,
//! reconcile records left mid-operation), and the quarantine of devices it cannot
//! reconcile, which [`Pool::reclaim`] retries.

use std::collections::BTreeMap;

use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::ids::ThinId;
use crate::loopback;
use crate::model::{DeviceKind, DeviceRecord, DeviceState, QuarantinedDevice};
use crate::units::{Bytes, DataBlocks};

use super::{Pool, now_ns};

impl Pool {
    /// Detaches and removes the scratch mounts of filesystem grows (`<root>/resize/<id>`)
    /// that a crash left: they hold the half-made device busy, and reconcile must roll it
    /// back.
    pub(super) fn clear_scratch_mounts(&self) {
        crate::mount::clear_scratch(&self.paths.root.join("resize"));
    }

    /// Finishes a grow that a crash interrupted. A grow extends the pool file first (the
    /// durable step: the backend assembles the pool from the files' sizes), then the kernel,
    /// then our record of the size; so a file longer than the record is a grow to finish,
    /// and one shorter is damage.
    pub(super) fn finish_interrupted_grow(&self) -> Result<()> {
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

    /// The backend's transaction id may be ahead of ours (changes made before a crash, not
    /// yet recorded: reconcile handles them), never behind: that would mean the pool's
    /// metadata lost committed changes.
    pub(super) fn check_transaction_id(&self) -> Result<()> {
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

    pub(super) fn verify_base(&self) -> Result<()> {
        let base = self.base()?;
        let settings = self.settings();
        let rec = self.record_by_id(base.id)?;
        if !self.backend.holds_filesystems() {
            return Ok(());
        }
        // Someone may hold the base active (mounted to look at it): read the live node
        // rather than fail the open on a deactivate (and leave lost+found to a later open).
        let (uuid, fixed) = match self.backend.active_devices()?.get(&base.id) {
            Some(dev) => (fsutil::fs_uuid(settings.fs, dev)?, Ok(())),
            None => {
                let dev = self.backend.activate(base.id, rec.size, false)?;
                // The base active, no record wants it so: the next open reads it live and
                // its reconcile deactivates it.
                crate::failpoint::hit("base:after_activate");
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
    pub(super) fn reconcile(&self) -> Result<()> {
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
    pub(super) fn quarantine(&self, id: ThinId, what: &str, e: &Error) -> Result<()> {
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
    pub(super) fn unquarantine(&self, id: ThinId) -> Result<()> {
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
    pub(super) fn retry_quarantined(&self, id: ThinId) -> Result<bool> {
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
}
