//! Read-only queries: records, usage, status, counters, timings and the audit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::ids::{DeviceName, ThinId};
use crate::model::{AuditReport, BackendKind, DeviceRecord, DeviceState, PoolCounters, PoolStatus};
use crate::timing::{HistogramSnapshot, Operation};
use crate::units::Bytes;

use super::Pool;

impl Pool {
    /// The record with thin id `id`, in any state (e.g. to name a device's parent); the
    /// base device's too. Compare [`Pool::device`], which only returns usable devices.
    pub fn record_by_id(&self, id: ThinId) -> Result<DeviceRecord> {
        self.store
            .read(|r| r.device(id))?
            .ok_or_else(|| Error::NotFound(format!("thin id {id}")))
    }

    /// The device named `name`, ready for use: `NotFound` for no such name or one being
    /// removed, `FailedPrecondition` for one still being created. Compare
    /// [`Pool::record_by_id`], which returns a record in any state.
    pub fn device(&self, name: &DeviceName) -> Result<DeviceRecord> {
        let rec = self
            .store
            .read(|r| r.device_by_name(name))?
            .ok_or_else(|| Error::NotFound(format!("device {name:?}")))?;
        match rec.state {
            DeviceState::Ready => Ok(rec),
            DeviceState::Creating => Err(Error::FailedPrecondition(format!(
                "device {name:?} is still being created"
            ))),
            DeviceState::Deleting => Err(Error::NotFound(format!("device {name:?}"))),
        }
    }

    /// Every record, including the base device and records mid-operation, in id order.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.store.read(|r| r.devices())
    }

    /// A page of [`Pool::devices`]: the records with ids above `after`, at most
    /// `max_records` and about `max_bytes` (for listings streamed without holding them all).
    pub fn devices_page(
        &self,
        after: Option<ThinId>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<DeviceRecord>> {
        self.store
            .read(|r| r.devices_page(after, max_records, max_bytes))
    }

    /// Bytes the device has mapped in the pool.
    pub fn usage(&self, name: &DeviceName) -> Result<Bytes> {
        let rec = self.device(name)?;
        let _guard = self.locks.lock(rec.id);
        self.backend.mapped_bytes(rec.id, rec.size)
    }

    /// Bytes mapped by the device with thin id `id`, of any kind (the base device too).
    pub fn usage_by_id(&self, id: ThinId) -> Result<Bytes> {
        let rec = self.record_by_id(id)?;
        let _guard = self.locks.lock(rec.id);
        self.backend.mapped_bytes(rec.id, rec.size)
    }

    /// What the device adds over its parent: containerd's `Usage` ("the resources used by
    /// this snapshot, excluding its parents"). A committed device reports the figure its
    /// commit measured; others are measured now. Never activates a device, takes no device
    /// lock and writes nothing, so it is cheap enough for CRI, which asks for every active
    /// snapshot every 10 s: one status ioctl (dm, active device) or one FIEMAP pass
    /// (reflink, a device without children).
    pub fn snapshot_usage(&self, name: &DeviceName) -> Result<Bytes> {
        self.record_usage(&self.device(name)?)
    }

    /// [`Pool::snapshot_usage`] of a record the caller has read already.
    pub fn record_usage(&self, rec: &DeviceRecord) -> Result<Bytes> {
        match rec.usage {
            Some(u) => Ok(u),
            None => self.added_bytes(rec),
        }
    }

    /// Measures what `rec` adds over its parent (its whole mapping for the base device).
    /// dm counts every block a device maps, shared or not: the device's mapped bytes minus
    /// its parent's (as containerd's devmapper does; a rewritten shared block counts for
    /// nothing, a new one counts). reflink counts only unshared extents, which for a device
    /// without children is what it wrote; a device with children (a layer committed by a
    /// build that did not measure it) is compared extent by extent with its parent's file.
    pub(super) fn added_bytes(&self, rec: &DeviceRecord) -> Result<Bytes> {
        let Some(parent) = rec.parent else {
            return self.backend.mapped_bytes(rec.id, rec.size);
        };
        match self.backend.kind() {
            BackendKind::Dm | BackendKind::Sim => {
                let mine = self.backend.mapped_bytes(rec.id, rec.size)?;
                Ok(Bytes(mine.0.saturating_sub(self.frozen_mapped(parent)?.0)))
            }
            BackendKind::Reflink => {
                if self.store.read(|r| r.children(rec.id))?.is_empty() {
                    self.backend.mapped_bytes(rec.id, rec.size)
                } else {
                    self.backend.added_bytes(rec.id, parent)
                }
            }
        }
    }

    /// Mapped bytes of `id`, a device that no longer changes (a parent: committed or base),
    /// read once. Precondition: nothing writes to `id` any more.
    fn frozen_mapped(&self, id: ThinId) -> Result<Bytes> {
        if let Some(b) = self.frozen_mapped.lock().unwrap().get(&id) {
            return Ok(*b);
        }
        let rec = self.record_by_id(id)?;
        let b = self.backend.mapped_bytes(rec.id, rec.size)?;
        self.frozen_mapped.lock().unwrap().insert(id, b);
        Ok(b)
    }

    /// The devices of this pool that are active now, with their device nodes.
    pub fn active_devices(&self) -> Result<BTreeMap<ThinId, PathBuf>> {
        self.backend.active_devices()
    }

    pub fn status(&self) -> Result<PoolStatus> {
        let settings = self.settings();
        let kernel = self.backend.status()?;
        self.observe(&kernel);
        let (devices, quarantined) = self
            .store
            .read(|r| Ok((r.device_count()? as usize, r.quarantined()?)))?;
        Ok(PoolStatus {
            backend: settings.backend,
            kernel,
            block_size: settings.block_size,
            base_size: settings.base_size,
            fs: settings.fs,
            devices,
            data_file: self.paths.data_file.clone(),
            metadata_file: self.paths.metadata_file.clone(),
            quarantined,
        })
    }

    /// The engine's counters since the pool was opened.
    pub fn counters(&self) -> PoolCounters {
        self.counters.read()
    }

    /// Latency histograms of [`Operation`]s since the pool was opened: every call, failed
    /// ones included, whoever made it. Reads atomics only.
    pub fn timings(&self) -> Vec<(Operation, HistogramSnapshot)> {
        self.timings.read()
    }

    /// Bytes mapped by every ready device (the base device included), for per-device
    /// metrics: `(record, mapped bytes)`, in id order. One backend call for the lot (dm:
    /// one `thin_ls` instead of activating inactive devices one by one), and no device
    /// locks: a figure read while a device is written is as good as a moment later. A
    /// device removed meanwhile is left out.
    pub fn mapped_bytes_all(&self) -> Result<Vec<(DeviceRecord, Bytes)>> {
        let records: Vec<DeviceRecord> = self
            .devices()?
            .into_iter()
            .filter(|r| r.state == DeviceState::Ready)
            .collect();
        let ids: Vec<(ThinId, Bytes)> = records.iter().map(|r| (r.id, r.size)).collect();
        let mut mapped = self.backend.mapped_bytes_many(&ids)?;
        Ok(records
            .into_iter()
            .filter_map(|r| mapped.remove(&r.id).map(|b| (r, b)))
            .collect())
    }

    /// Compares our records with the backend's own metadata, as one consistent cut: no
    /// create or delete runs while both sides are read. Also checks the store's own
    /// invariants and reports quarantined devices. Removals recorded but not yet done
    /// (deferred, or the device still in use) are `pending`, which is not a problem.
    pub fn audit(&self) -> Result<AuditReport> {
        let (records, theirs) = {
            let _cut = self.audit_gate.write();
            let records = self.store.read(|r| r.devices())?;
            (records, self.backend.list_ids()?)
        };
        let ours: BTreeSet<ThinId> = records.iter().map(|r| r.id).collect();
        let of_state = |state: DeviceState| -> Vec<ThinId> {
            records
                .iter()
                .filter(|r| r.state == state)
                .map(|r| r.id)
                .collect()
        };
        // A record mid-operation is reported as unfinished or pending, not also as missing:
        // its kernel side may rightly be gone (a delete done, its record not yet removed).
        let settled: BTreeSet<ThinId> = records
            .iter()
            .filter(|r| r.state == DeviceState::Ready)
            .map(|r| r.id)
            .collect();
        Ok(AuditReport {
            leaked: theirs.difference(&ours).copied().collect(),
            missing: settled.difference(&theirs).copied().collect(),
            unfinished: of_state(DeviceState::Creating),
            pending: of_state(DeviceState::Deleting),
            quarantined: self.quarantined()?.into_iter().map(|q| q.id).collect(),
            store_problems: self.store.check()?,
        })
    }
}
