//! Making devices: [`Pool::snapshot`] (intent, kernel, outcome; rolled back on failure),
//! [`Pool::commit`], [`Pool::set_labels`], and the filesystem work a new snapshot needs
//! (grow to a larger size, replay a view's journal).

use std::collections::BTreeMap;
use std::path::PathBuf;

use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil;
use crate::ids::{self, DeviceName, ThinId};
use crate::model::{DeviceKind, DeviceRecord, DeviceState, FsType};
use crate::timing::Operation;
use crate::units::Bytes;

use super::{Pool, SnapshotRequest, now_ns};

impl Pool {
    /// Makes a new thin device as a snapshot of `req.parent` (or of the base device).
    ///
    /// Errors: `AlreadyExists` if the name is taken, `NotFound` if the parent is missing,
    /// `InvalidArgument` for a parent that is not committed, a bad kind or a size below the
    /// parent's, `ResourceExhausted` while the pool's free space is below `min_free_space`
    /// (the message says how to grow).
    pub fn snapshot(&self, mut req: SnapshotRequest) -> Result<DeviceRecord> {
        let _up = self.up()?;
        let _t = self.timings.start(Operation::Snapshot);
        drop_empty_labels(&mut req.labels);
        if !matches!(req.kind, DeviceKind::Active | DeviceKind::View) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot is active or view, not {}",
                req.kind
            )));
        }
        ids::validate_labels(&req.labels)?;
        if let Some(size) = req.size
            && (size.0 == 0 || size.0 % 4096 != 0)
        {
            return Err(Error::InvalidArgument(format!(
                "size {} is not a positive multiple of 4 KiB",
                size.0
            )));
        }
        self.check_free_space()?;
        let base = self.base()?;
        let now = now_ns();
        // From the intent to the outcome: an audit sees this id on both sides or neither.
        // Not recursive: a waiting audit goes first, so a stream of creates cannot starve it
        // (the rollback's finish_delete nests recursively under this).
        let _cut = self.audit_gate.read();
        // 1. Intent: the record, in Creating.
        let rec = self.store.write(|w| {
            // In containerd's order (storage's CreateSnapshot): the parent, then the key.
            let origin = match &req.parent {
                None => w.device(base.id)?.ok_or_else(|| {
                    Error::Inconsistent("the base device record is missing".into())
                })?,
                // Only committed devices are parents (containerd's storage returns
                // InvalidArgument otherwise): an active parent could change under its child.
                Some(p) => match w.device_by_name(p)? {
                    Some(o) if o.kind != DeviceKind::Committed => {
                        return Err(Error::InvalidArgument(format!(
                            "parent {:?} is {}, not a committed snapshot",
                            p.as_str(),
                            o.kind
                        )));
                    }
                    Some(o) if o.state == DeviceState::Ready => o,
                    Some(_) => {
                        return Err(Error::FailedPrecondition(format!(
                            "parent {p:?} is being created or removed"
                        )));
                    }
                    None => return Err(Error::NotFound(format!("parent {p:?}"))),
                },
            };
            if w.device_by_name(&req.name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "device {:?}",
                    req.name.as_str()
                )));
            }
            let size = req.size.unwrap_or(origin.size);
            if size < origin.size {
                return Err(Error::InvalidArgument(format!(
                    "size {size} is below the parent's {}",
                    origin.size
                )));
            }
            let rec = DeviceRecord {
                id: w.allocate_id()?,
                name: Some(req.name.clone()),
                kind: req.kind,
                parent: Some(origin.id),
                size,
                state: DeviceState::Creating,
                active: false,
                labels: req.labels.clone(),
                created_ns: now,
                updated_ns: now,
                usage: None,
            };
            w.put_device(&rec)?;
            Ok(rec)
        })?;
        // A parentless device is a "create" (of a snapshot of the base) to the failpoints.
        let op = if req.parent.is_none() {
            "create"
        } else {
            "snapshot"
        };
        failpoint::hit(&format!("{op}:after_intent"));
        let origin = rec.parent.expect("a snapshot has an origin");

        // 2. The kernel change, then the filesystem grow if a larger size was asked for.
        let made = (|| {
            let txn = {
                let _origin_guard = self.locks.lock(origin);
                self.backend.create_snapshot(rec.id, origin, rec.size)?
            };
            failpoint::hit(&format!("{op}:after_kernel"));
            let origin_size = self.record_by_id(origin)?.size;
            if rec.size > origin_size {
                self.grow_filesystem(rec.id, rec.size)?;
                // Grown but still Creating: the next open rolls the grown device back.
                failpoint::hit(&format!("{op}:after_fs_grow"));
            }
            if rec.kind == DeviceKind::View {
                self.replay_view_journal(rec.id, rec.size)?;
                // The view's journal replayed (its device deactivated again), not yet Ready.
                failpoint::hit("view:after_journal_replay");
            }
            if req.activate {
                // A crash from here on still rolls the create back, deactivating first.
                let _guard = self.locks.lock(rec.id);
                self.backend
                    .activate(rec.id, rec.size, rec.kind != DeviceKind::Active)?;
                failpoint::hit(&format!("{op}:after_activate"));
            }
            Ok(txn)
        })();
        let txn = match made {
            Ok(txn) => txn,
            Err(e) => {
                self.roll_back_create(rec.id);
                return Err(e);
            }
        };

        // 3. The outcome. If it cannot be recorded, roll back as for a failed kernel step:
        // a record left in Creating would hold the key (and the parent) until a restart.
        let mut done = rec;
        done.state = DeviceState::Ready;
        done.active = req.activate;
        let point = if req.parent.is_none() {
            "create:outcome_write"
        } else {
            "snapshot:outcome_write"
        };
        let recorded = if failpoint::fail_once(point) {
            Err(Error::store("failpoint: outcome write"))
        } else {
            self.store.write(|w| {
                w.put_device(&done)?;
                w.advance_transaction_id(txn)
            })
        };
        if let Err(e) = recorded {
            self.roll_back_create(done.id);
            return Err(e);
        }
        Ok(done)
    }

    /// Rolls back a create that failed before its outcome was recorded. If that fails too
    /// (the device is busy, the store is failing), the device is quarantined: reclaim
    /// retries the rollback, so the key does not stay taken until a restart.
    fn roll_back_create(&self, id: ThinId) {
        if let Err(undo) = self.undo_create(id) {
            warn!(id = %id, error = %undo, "could not roll back a failed create; reclaim retries");
            if let Err(e) = self.quarantine(id, "roll back a failed create", &undo) {
                warn!(id = %id, error = %e, "could not quarantine it either; the next open rolls it back");
            }
        }
    }

    /// Makes a new view mountable from its read-only device. ext4 refuses to mount, from a
    /// read-only device, a filesystem whose journal needs recovery, and a parent committed
    /// while mounted has one: the Commit's flush froze it clean, but the thaw marks the
    /// journal for recovery again while it stays mounted. So the view's own copy has its
    /// journal replayed once on a writable activation (mount and unmount), before it is
    /// only ever activated read-only. Precondition: the view is being created (its record
    /// is `Creating`, so a crash rolls this back) and is inactive; it is left inactive.
    fn replay_view_journal(&self, id: ThinId, size: Bytes) -> Result<()> {
        let fs = self.settings().fs;
        if fs != FsType::Ext4 || !self.backend.holds_filesystems() {
            return Ok(());
        }
        let _guard = self.locks.lock(id);
        let dev = self.backend.activate(id, size, true)?;
        let needs = fsutil::ext4_needs_recovery(&dev);
        self.backend.deactivate(id)?;
        if !needs? {
            return Ok(());
        }
        debug!(id = %id, "replaying the journal of a new view");
        let dev = self.backend.activate(id, size, false)?;
        let replayed = fsutil::replay_journal(fs, &dev, &self.scratch_dir(id));
        self.backend.deactivate(id)?;
        replayed
    }

    /// Where the engine mounts device `id` privately for a moment (filesystem grow, base
    /// fix-ups); never a client's path.
    pub(super) fn scratch_dir(&self, id: ThinId) -> PathBuf {
        self.paths.root.join("resize").join(id.to_string())
    }

    fn grow_filesystem(&self, id: ThinId, size: Bytes) -> Result<()> {
        if !self.backend.holds_filesystems() {
            return Ok(());
        }
        let fs = self.settings().fs;
        let _guard = self.locks.lock(id);
        let dev = self.backend.activate(id, size, false)?;
        let grown = fsutil::grow(fs, &dev, &self.scratch_dir(id));
        self.backend.deactivate(id)?;
        grown.map_err(|e| grow_error(e, fs, size))
    }

    /// Turns the active device `key` into a committed (read-only) one named `name`, with
    /// `labels` (if given) replacing its labels, and deactivates it. The device may be
    /// mounted: what was written to it is flushed first, and whoever has it open keeps it
    /// until the last close ([`Backend::deactivate_deferred`]); writes after the commit are
    /// the caller's mistake, as with containerd's own snapshotters.
    ///
    /// [`Backend::deactivate_deferred`]: crate::backend::Backend::deactivate_deferred
    ///
    /// Atomic against [`Pool::activate`] and a second commit: every check is made before
    /// any change and made again under the device's lock and inside the store's write
    /// transaction, so a failed commit changes nothing. Errors: `NotFound` (no such key),
    /// `FailedPrecondition` (not active), `AlreadyExists` (`name` is taken).
    pub fn commit(
        &self,
        key: &DeviceName,
        name: &DeviceName,
        labels: Option<BTreeMap<String, String>>,
    ) -> Result<DeviceRecord> {
        let _up = self.up()?;
        let _t = self.timings.start(Operation::Commit);
        let labels = labels.map(|mut l| {
            drop_empty_labels(&mut l);
            l
        });
        if let Some(l) = &labels {
            ids::validate_labels(l)?;
        }
        // In containerd's order (storage's CommitActive): the name, then the key, then its kind.
        let check = |r: &crate::store::ReadView| -> Result<DeviceRecord> {
            if r.device_by_name(name)?.is_some() {
                return Err(Error::AlreadyExists(format!("device {:?}", name.as_str())));
            }
            let rec = r
                .device_by_name(key)?
                .filter(|r| r.state == DeviceState::Ready)
                .ok_or_else(|| Error::NotFound(format!("device {key:?}")))?;
            check_commit(&rec, key)?;
            Ok(rec)
        };
        let id = self.store.read(|r| check(r))?.id;
        // Held until the record is written and the device deactivated: `activate` re-reads
        // the record under this lock, so it sees either the active device or the committed
        // one, never a mix.
        let _guard = self.locks.lock(id);
        // Again under the lock: a commit or remove that held it first may have changed it.
        let rec = self.store.read(|r| check(r))?;
        if rec.id != id {
            return Err(Error::NotFound(format!("device {key:?}")));
        }
        self.backend.flush(id)?;
        failpoint::hit("commit:after_flush");
        // Measured now, flushed and before the layer can have children (see
        // DeviceRecord::usage).
        let usage = self.added_bytes(&rec)?;
        let now = now_ns();
        let done = self.store.write(|w| {
            if w.device_by_name(name)?.is_some() {
                return Err(Error::AlreadyExists(format!("device {:?}", name.as_str())));
            }
            let mut cur = w
                .device(id)?
                .filter(|c| c.state == DeviceState::Ready && c.name.as_ref() == Some(key))
                .ok_or_else(|| Error::NotFound(format!("device {key:?}")))?;
            check_commit(&cur, key)?;
            cur.kind = DeviceKind::Committed;
            cur.name = Some(name.clone());
            cur.active = false;
            cur.usage = Some(usage);
            if let Some(l) = labels {
                cur.labels = l;
            }
            // containerd's storage: a commit makes a new snapshot, created and updated now.
            cur.created_ns = now;
            cur.updated_ns = now;
            w.put_device(&cur)?;
            Ok(cur)
        })?;
        failpoint::hit("commit:after_record");
        // The record is committed whatever happens next; a device left active is taken
        // down by the next open's reconcile (no record wants it active).
        if let Err(e) = self.backend.deactivate_deferred(id) {
            warn!(id = %id, error = %e, "committed, but could not deactivate the device");
        }
        // Before the reply: the client never learns that its commit succeeded.
        failpoint::hit("commit:after_deactivate");
        Ok(done)
    }

    /// Replaces a device's labels.
    pub fn set_labels(
        &self,
        name: &DeviceName,
        labels: BTreeMap<String, String>,
    ) -> Result<DeviceRecord> {
        let mut labels = labels;
        drop_empty_labels(&mut labels);
        ids::validate_labels(&labels)?;
        self.store.write(|w| {
            let mut rec = w
                .device_by_name(name)?
                .filter(|r| r.state == DeviceState::Ready)
                .ok_or_else(|| Error::NotFound(format!("device {name:?}")))?;
            rec.labels = labels;
            rec.updated_ns = now_ns();
            w.put_device(&rec)?;
            Ok(rec)
        })
    }
}

/// containerd's storage drops labels with empty values when it writes them.
fn drop_empty_labels(labels: &mut BTreeMap<String, String>) {
    labels.retain(|_, v| !v.is_empty());
}

/// Only an active device can be committed (containerd: FailedPrecondition otherwise).
fn check_commit(rec: &DeviceRecord, key: &DeviceName) -> Result<()> {
    if rec.kind != DeviceKind::Active {
        return Err(Error::FailedPrecondition(format!(
            "{key:?} is {}, only an active snapshot can be committed",
            rec.kind
        )));
    }
    Ok(())
}

/// A failed filesystem grow of a new snapshot, for the client: the snapshot is rolled back,
/// so the tool's advice to repair the device is dropped; a size the filesystem cannot have
/// (e.g. ext4 needing more than 2^32 inodes) is the request's fault, not ours.
fn grow_error(e: Error, fs: FsType, size: Bytes) -> Error {
    let Error::Command {
        program,
        status,
        stderr,
    } = e
    else {
        return e;
    };
    let stderr: String = stderr
        .lines()
        .filter(|l| !l.contains("e2fsck") && !l.contains("aborted resize") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let limit = [
        "must be less than",
        "too big",
        "too large",
        "Invalid argument",
    ];
    if limit.iter().any(|l| stderr.contains(l)) {
        return Error::InvalidArgument(format!(
            "size {size}: {fs} cannot grow to it ({program}: {stderr}); nothing was created"
        ));
    }
    Error::Command {
        program,
        status,
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_error_for_a_size_the_filesystem_cannot_have() {
        // What resize2fs says for 100T on ext4 (probe D5); the snapshot is rolled back.
        let e = grow_error(
            Error::Command {
                program: "resize2fs".into(),
                status: "exit status: 1".into(),
                stderr: "resize2fs 1.47.0 (5-Feb-2023)\nresize2fs: New size results in too \
                         many inodes: inodes (6710878208) must be less than 4294967295\n\
                         Please run 'e2fsck -fy /dev/loop19' to fix the filesystem\n\
                         after the aborted resize operation."
                    .into(),
            },
            FsType::Ext4,
            Bytes::gib(100 << 10),
        );
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("must be less than"), "{msg}");
        assert!(!msg.contains("e2fsck") && !msg.contains("aborted"), "{msg}");
        // Other failures keep their kind, without the repair advice either.
        let e = grow_error(
            Error::Command {
                program: "resize2fs".into(),
                status: "exit status: 1".into(),
                stderr: "resize2fs: Input/output error\nPlease run 'e2fsck -fy /dev/loop3'".into(),
            },
            FsType::Ext4,
            Bytes::gib(8),
        );
        assert_eq!(e.kind(), crate::ErrorKind::Internal, "{e}");
        assert!(!e.to_string().contains("e2fsck"), "{e}");
    }
}
