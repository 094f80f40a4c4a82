//! The metadata store: our durable records, in a redb database in the pool's root.
//!
//! redb commits are ACID and fsync before `commit()` returns (`Durability::Immediate`, its
//! default), which is what makes "record the intent, then change the kernel" crash-safe.
//!
//! Tables:
//! - `meta`: schema version, pool settings and state, base device, counters (JSON values);
//! - `devices`: thin id → [`DeviceRecord`] (JSON, so a stranger can read a dump);
//! - `names`: device name → thin id (unique index);
//! - `children`: (parent id, child id) → () (so "has children?" is one range read);
//! - `quarantine`: thin id → [`QuarantinedDevice`] (JSON), devices open could not
//!   reconcile or activate. Stores made before it existed lack the table; reads treat that
//!   as empty and the first quarantine creates it.
//!
//! A corrupt store file can make redb panic (an `unreachable!` on a damaged page) instead
//! of returning an error. Every store call catches that and returns
//! [`Error::Inconsistent`] naming the file and the repair path, so a damaged store never
//! surfaces as a crashed task.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::ids::{DeviceName, ThinId};
use crate::model::{DeviceKind, DeviceRecord, DeviceState, PoolSettings, QuarantinedDevice};

/// Bump on any incompatible change to the tables or record formats, and add a migration.
pub const SCHEMA_VERSION: u32 = 1;

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const DEVICES: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("devices");
const NAMES: TableDefinition<'_, &str, u32> = TableDefinition::new("names");
const CHILDREN: TableDefinition<'_, (u32, u32), ()> = TableDefinition::new("children");
const QUARANTINE: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("quarantine");

/// What to do about a damaged store, for error messages.
pub const REPAIR_HINT: &str = "the pool's data is untouched; stop thinpoold, keep a copy of \
     the file, and restore it from a backup or fix the records named (docs/recovery.md, \
     \"A damaged metadata store\")";

/// At most this many store problems are listed (a damaged store may have thousands).
const MAX_PROBLEMS: usize = 20;

const K_SCHEMA: &str = "schema_version";
const K_SETTINGS: &str = "settings";
const K_STATE: &str = "state";
const K_BASE: &str = "base";
const K_TXN: &str = "backend_transaction_id";
const K_NEXT_ID: &str = "next_thin_id";

/// Whether pool creation finished. A pool left `Initializing` by a crash held no client data
/// and is made again from scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolState {
    Initializing,
    Ready,
}

/// The base device every parentless snapshot starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseDevice {
    pub id: ThinId,
    /// Filesystem UUID read from its superblock after mkfs, as 32 hex digits.
    pub fs_uuid: String,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

/// Runs `f`, turning a panic (redb on a damaged page) into [`Error::Inconsistent`] naming
/// the store file.
/// Store errors name the file.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let named = |e| match e {
        Error::Store { message, source } => Error::Store {
            message: format!("{}: {message}", path.display()),
            source,
        },
        e => e,
    };
    catch_unwind(AssertUnwindSafe(|| f().map_err(named))).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(Error::Inconsistent(format!(
            "the metadata store {} is corrupt (reading it failed: {what}); {REPAIR_HINT}",
            path.display()
        )))
    })
}

impl Store {
    /// Creates a new store for a pool being made. Precondition: no file at `path`.
    pub fn create(path: &Path, settings: &PoolSettings) -> Result<Store> {
        let db = guarded(path, || Ok(Database::create(path)?))?;
        // redb creates the file 0644; it holds every snapshot's key and labels.
        crate::fsutil::make_private(path)?;
        let store = Store {
            db,
            path: path.to_path_buf(),
        };
        store.write(|w| {
            w.set_meta(K_SCHEMA, &SCHEMA_VERSION)?;
            w.set_meta(K_SETTINGS, settings)?;
            w.set_meta(K_STATE, &PoolState::Initializing)?;
            w.set_meta(K_TXN, &0u64)?;
            w.set_meta(K_NEXT_ID, &0u32)?;
            // Create every table now so readers never meet a missing one.
            w.txn.open_table(DEVICES)?;
            w.txn.open_table(NAMES)?;
            w.txn.open_table(CHILDREN)?;
            w.txn.open_table(QUARANTINE)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// Opens an existing store and checks its schema version. A store whose creation a crash
    /// cut short (no `meta` table yet) opens, and reads as [`PoolState::Initializing`].
    pub fn open(path: &Path) -> Result<Store> {
        let db = guarded(path, || {
            Database::open(path).map_err(|e| {
                Error::Inconsistent(format!(
                    "the metadata store {} cannot be opened ({e}); {REPAIR_HINT}",
                    path.display()
                ))
            })
        })?;
        let store = Store {
            db,
            path: path.to_path_buf(),
        };
        if !store.read(|r| r.has_meta())? {
            return Ok(store);
        }
        let version: u32 = store.read(|r| r.meta(K_SCHEMA))?.ok_or_else(|| {
            Error::Inconsistent(format!(
                "the metadata store {} has no schema version; {REPAIR_HINT}",
                path.display()
            ))
        })?;
        if version != SCHEMA_VERSION {
            return Err(Error::FailedPrecondition(format!(
                "metadata store schema version {version}; this build reads version {SCHEMA_VERSION}"
            )));
        }
        Ok(store)
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a consistent snapshot of the store.
    pub fn read<T>(&self, f: impl FnOnce(&ReadView) -> Result<T>) -> Result<T> {
        guarded(&self.path, || {
            let txn = self.db.begin_read()?;
            f(&ReadView { txn })
        })
    }

    /// Runs `f` in a write transaction and commits it durably if `f` succeeds. redb admits one
    /// writer at a time, so keep `f` short: no ioctls or child processes inside.
    pub fn write<T>(&self, f: impl FnOnce(&mut WriteView<'_>) -> Result<T>) -> Result<T> {
        guarded(&self.path, || {
            let txn = self.db.begin_write()?;
            let mut view = WriteView { txn: &txn };
            let out = f(&mut view)?;
            txn.commit()?;
            Ok(out)
        })
    }

    /// Writes a copy of the whole store, as of one read transaction, to a new database at
    /// `dest` (0600), and returns the transaction id and device count of that copy. The copy
    /// is consistent however many writers run meanwhile: it is a fresh database built from
    /// one snapshot, not the file's bytes (a file copy could catch a commit half-written).
    pub fn copy_to(&self, dest: &Path) -> Result<(u64, u64)> {
        guarded(&self.path, || {
            let src = self.db.begin_read()?;
            let db = Database::create(dest)?;
            crate::fsutil::make_private(dest)?;
            let txn = db.begin_write()?;
            {
                let from = src.open_table(META)?;
                let mut to = txn.open_table(META)?;
                for e in from.iter()? {
                    let (k, v) = e?;
                    to.insert(k.value(), v.value())?;
                }
                let from = src.open_table(DEVICES)?;
                let mut to = txn.open_table(DEVICES)?;
                for e in from.iter()? {
                    let (k, v) = e?;
                    to.insert(k.value(), v.value())?;
                }
                let from = src.open_table(NAMES)?;
                let mut to = txn.open_table(NAMES)?;
                for e in from.iter()? {
                    let (k, v) = e?;
                    to.insert(k.value(), v.value())?;
                }
                let from = src.open_table(CHILDREN)?;
                let mut to = txn.open_table(CHILDREN)?;
                for e in from.iter()? {
                    let (k, _) = e?;
                    to.insert(k.value(), ())?;
                }
                let mut to = txn.open_table(QUARANTINE)?;
                match src.open_table(QUARANTINE) {
                    Ok(from) => {
                        for e in from.iter()? {
                            let (k, v) = e?;
                            to.insert(k.value(), v.value())?;
                        }
                    }
                    Err(redb::TableError::TableDoesNotExist(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            txn.commit()?;
            let view = ReadView { txn: src };
            Ok((view.transaction_id()?, view.device_count()?))
        })
    }

    /// Checks the invariants the engine keeps between the tables: every name belongs to one
    /// record and the names index agrees; parents and children exist (a record being deleted
    /// may outlive its parent: removals of a chain are deferred in any order); the base
    /// device has its record. Returns the problems found (at most a few dozen), reading
    /// every record (which also finds damaged pages).
    pub fn check(&self) -> Result<Vec<String>> {
        self.read(|r| r.check())
    }

    /// [`Store::check`] as an error naming the store file and the repair path.
    pub fn check_or_fail(&self) -> Result<()> {
        let problems = self.check().map_err(|e| match e {
            Error::Store { message, .. } => Error::Inconsistent(format!(
                "the metadata store cannot be read: {message}; {REPAIR_HINT}"
            )),
            e => e,
        })?;
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Inconsistent(format!(
            "the metadata store {} is inconsistent: {}; {REPAIR_HINT}",
            self.path.display(),
            problems.join("; ")
        )))
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(serde_json::from_slice(bytes)?)
}

pub struct ReadView {
    txn: redb::ReadTransaction,
}

impl ReadView {
    /// Whether the `meta` table exists: it does once the store's first commit is durable.
    fn has_meta(&self) -> Result<bool> {
        match self.txn.open_table(META) {
            Ok(_) => Ok(true),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Pool settings, if the store got as far as recording them.
    pub fn settings_if_any(&self) -> Result<Option<PoolSettings>> {
        if !self.has_meta()? {
            return Ok(None);
        }
        self.meta(K_SETTINGS)
    }

    /// Devices in quarantine, in id order.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedDevice>> {
        let t = match self.txn.open_table(QUARANTINE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    fn check(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let mut note = |p: String| {
            if problems.len() < MAX_PROBLEMS {
                problems.push(p);
            }
        };
        let records: BTreeMap<ThinId, DeviceRecord> =
            self.devices()?.into_iter().map(|r| (r.id, r)).collect();
        let mut named: BTreeMap<&str, ThinId> = BTreeMap::new();
        for rec in records.values() {
            if let Some(name) = &rec.name
                && let Some(first) = named.insert(name.as_str(), rec.id)
            {
                note(format!(
                    "thin ids {first} and {} are both named {:?}",
                    rec.id,
                    name.as_str()
                ));
            }
            if let Some(parent) = rec.parent
                && !records.contains_key(&parent)
                && rec.state != DeviceState::Deleting
            {
                note(format!(
                    "thin id {} has parent {parent}, which has no record",
                    rec.id
                ));
            }
        }
        let names = self.txn.open_table(NAMES)?;
        let mut indexed = BTreeSet::new();
        for entry in names.iter()? {
            let (k, v) = entry?;
            let (name, id) = (k.value().to_string(), v.value());
            indexed.insert(name.clone());
            let owner = ThinId::new(id).ok().and_then(|id| records.get(&id));
            if owner.and_then(|r| r.name.as_ref()).map(|n| n.as_str()) != Some(name.as_str()) {
                note(format!(
                    "the names index maps {name:?} to thin id {id}, whose record is not named so"
                ));
            }
        }
        for name in named.keys().filter(|n| !indexed.contains(**n)) {
            note(format!("name {name:?} is missing from the names index"));
        }
        let children = self.txn.open_table(CHILDREN)?;
        for entry in children.iter()? {
            let (k, _) = entry?;
            let (parent, child) = k.value();
            let ok = ThinId::new(child)
                .ok()
                .and_then(|c| records.get(&c))
                .is_some_and(|c| c.parent.map(|p| p.get()) == Some(parent));
            if !ok {
                note(format!(
                    "the children index lists thin id {child} under {parent}, but its record \
                     does not have that parent"
                ));
            }
        }
        if self.state()? == PoolState::Ready {
            match self.base()? {
                None => note("the pool has no base device entry".into()),
                Some(base) => match records.get(&base.id) {
                    Some(r) if r.kind == DeviceKind::Base => {}
                    Some(r) => note(format!(
                        "the base device {} has a record of kind {}",
                        base.id, r.kind
                    )),
                    None => note(format!("the base device {} has no record", base.id)),
                },
            }
        }
        Ok(problems)
    }

    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let t = self.txn.open_table(META)?;
        t.get(key)?.map(|v| decode(v.value())).transpose()
    }

    pub fn settings(&self) -> Result<PoolSettings> {
        self.meta(K_SETTINGS)?
            .ok_or_else(|| Error::Inconsistent("metadata store has no pool settings".into()))
    }

    pub fn state(&self) -> Result<PoolState> {
        if !self.has_meta()? {
            return Ok(PoolState::Initializing);
        }
        Ok(self.meta(K_STATE)?.unwrap_or(PoolState::Initializing))
    }

    pub fn base(&self) -> Result<Option<BaseDevice>> {
        self.meta(K_BASE)
    }

    pub fn transaction_id(&self) -> Result<u64> {
        Ok(self.meta(K_TXN)?.unwrap_or(0))
    }

    pub fn device(&self, id: ThinId) -> Result<Option<DeviceRecord>> {
        let t = self.txn.open_table(DEVICES)?;
        t.get(id.get())?.map(|v| decode(v.value())).transpose()
    }

    pub fn device_by_name(&self, name: &DeviceName) -> Result<Option<DeviceRecord>> {
        let names = self.txn.open_table(NAMES)?;
        let Some(id) = names.get(name.as_str())?.map(|v| v.value()) else {
            return Ok(None);
        };
        self.device(ThinId::new(id)?)
    }

    /// Every record, in id order.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        let t = self.txn.open_table(DEVICES)?;
        let mut out = Vec::with_capacity(t.len()? as usize);
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    /// Records with ids above `after`, in id order: at most `max_records`, and no more once
    /// `max_bytes` of encoded records are read (at least one, whatever its size).
    pub fn devices_page(
        &self,
        after: Option<ThinId>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<DeviceRecord>> {
        let t = self.txn.open_table(DEVICES)?;
        let start = after.map_or(0, |a| a.get().saturating_add(1));
        let mut out = Vec::new();
        let mut bytes = 0;
        if after.is_some_and(|a| a.get() == u32::MAX) {
            return Ok(out);
        }
        for entry in t.range(start..)? {
            let (_, v) = entry?;
            bytes += v.value().len();
            out.push(decode(v.value())?);
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    pub fn device_count(&self) -> Result<u64> {
        Ok(self.txn.open_table(DEVICES)?.len()?)
    }

    pub fn children(&self, id: ThinId) -> Result<Vec<ThinId>> {
        let t = self.txn.open_table(CHILDREN)?;
        collect_children(&t, id)
    }
}

fn collect_children(t: &impl ReadableTable<(u32, u32), ()>, id: ThinId) -> Result<Vec<ThinId>> {
    let mut out = Vec::new();
    for entry in t.range((id.get(), 0)..=(id.get(), u32::MAX))? {
        let (k, _) = entry?;
        out.push(ThinId::new(k.value().1)?);
    }
    Ok(out)
}

pub struct WriteView<'a> {
    txn: &'a redb::WriteTransaction,
}

impl WriteView<'_> {
    fn set_meta<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value)?;
        self.txn.open_table(META)?.insert(key, bytes.as_slice())?;
        Ok(())
    }

    fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let t = self.txn.open_table(META)?;

        t.get(key)?.map(|v| decode(v.value())).transpose()
    }

    pub fn set_state(&mut self, state: PoolState) -> Result<()> {
        self.set_meta(K_STATE, &state)
    }

    pub fn set_base(&mut self, base: &BaseDevice) -> Result<()> {
        self.set_meta(K_BASE, base)
    }

    pub fn settings(&self) -> Result<PoolSettings> {
        self.meta(K_SETTINGS)?
            .ok_or_else(|| Error::Inconsistent("metadata store has no pool settings".into()))
    }

    pub fn set_settings(&mut self, settings: &PoolSettings) -> Result<()> {
        self.set_meta(K_SETTINGS, settings)
    }

    /// Records the backend's transaction id; it only ever moves forward, because operations
    /// on different devices finish in any order.
    pub fn advance_transaction_id(&mut self, txn: u64) -> Result<()> {
        let cur: u64 = self.meta(K_TXN)?.unwrap_or(0);
        if txn > cur {
            self.set_meta(K_TXN, &txn)?;
        }
        Ok(())
    }

    pub fn device(&self, id: ThinId) -> Result<Option<DeviceRecord>> {
        let t = self.txn.open_table(DEVICES)?;

        t.get(id.get())?.map(|v| decode(v.value())).transpose()
    }

    pub fn device_by_name(&self, name: &DeviceName) -> Result<Option<DeviceRecord>> {
        let id = {
            let names = self.txn.open_table(NAMES)?;

            names.get(name.as_str())?.map(|v| v.value())
        };
        match id {
            Some(id) => self.device(ThinId::new(id)?),
            None => Ok(None),
        }
    }

    pub fn children(&self, id: ThinId) -> Result<Vec<ThinId>> {
        let t = self.txn.open_table(CHILDREN)?;
        collect_children(&t, id)
    }

    /// Picks an unused thin id. Ids come from a wrapping counter, so an id is reused only
    /// after the other 2^24 - 1 have been handed out, and never while any record (including
    /// one whose delete is not yet committed) holds it.
    /// Makes later allocations start past `id`: an id the backend holds without a record
    /// (devices made after a restored backup) must never be handed out again.
    pub fn skip_ids_through(&mut self, id: ThinId) -> Result<()> {
        let next = self.meta::<u32>(K_NEXT_ID)?.unwrap_or(0);
        if next <= id.get() {
            self.set_meta(K_NEXT_ID, &id.next_wrapping().get())?;
        }
        Ok(())
    }

    pub fn allocate_id(&mut self) -> Result<ThinId> {
        let start = ThinId::new(self.meta::<u32>(K_NEXT_ID)?.unwrap_or(0))?;
        let devices = self.txn.open_table(DEVICES)?;
        let mut id = start;
        loop {
            if devices.get(id.get())?.is_none() {
                drop(devices);
                self.set_meta(K_NEXT_ID, &id.next_wrapping().get())?;
                return Ok(id);
            }
            id = id.next_wrapping();
            if id == start {
                return Err(Error::ResourceExhausted(
                    "all 2^24 thin ids are in use".into(),
                ));
            }
        }
    }

    /// Inserts or replaces a record, keeping the name and children indexes in step.
    pub fn put_device(&mut self, rec: &DeviceRecord) -> Result<()> {
        let old = self.device(rec.id)?;
        let mut names = self.txn.open_table(NAMES)?;
        let mut children = self.txn.open_table(CHILDREN)?;
        if let Some(old) = &old {
            unindex(&mut names, &mut children, old)?;
        }
        if let Some(name) = &rec.name {
            if let Some(other) = names.get(name.as_str())?.map(|v| v.value())
                && other != rec.id.get()
            {
                return Err(Error::AlreadyExists(format!("device {name:?}")));
            }
            names.insert(name.as_str(), rec.id.get())?;
        }
        if let Some(parent) = rec.parent {
            children.insert((parent.get(), rec.id.get()), ())?;
        }
        let bytes = serde_json::to_vec(rec)?;
        self.txn
            .open_table(DEVICES)?
            .insert(rec.id.get(), bytes.as_slice())?;
        Ok(())
    }

    /// Puts a device in quarantine (keeping the first failure's time if it is there already).
    pub fn quarantine(&mut self, id: ThinId, reason: &str, now_ns: u64) -> Result<()> {
        let mut t = self.txn.open_table(QUARANTINE)?;
        let since_ns = match t.get(id.get())? {
            Some(v) => decode::<QuarantinedDevice>(v.value())?.since_ns,
            None => now_ns,
        };
        let entry = QuarantinedDevice {
            id,
            reason: reason.to_string(),
            since_ns,
        };
        let bytes = serde_json::to_vec(&entry)?;
        t.insert(id.get(), bytes.as_slice())?;
        Ok(())
    }

    /// Takes a device out of quarantine; one that is not in it is a no-op.
    pub fn unquarantine(&mut self, id: ThinId) -> Result<()> {
        self.txn.open_table(QUARANTINE)?.remove(id.get())?;
        Ok(())
    }

    /// Removes a record, its index entries and any quarantine entry. Removing an absent id
    /// is a no-op.
    pub fn remove_device(&mut self, id: ThinId) -> Result<()> {
        self.unquarantine(id)?;
        let Some(old) = self.device(id)? else {
            return Ok(());
        };
        let mut names = self.txn.open_table(NAMES)?;
        let mut children = self.txn.open_table(CHILDREN)?;
        unindex(&mut names, &mut children, &old)?;
        self.txn.open_table(DEVICES)?.remove(id.get())?;
        Ok(())
    }
}

fn unindex(
    names: &mut Table<'_, &str, u32>,
    children: &mut Table<'_, (u32, u32), ()>,
    rec: &DeviceRecord,
) -> Result<()> {
    if let Some(name) = &rec.name {
        let owned = names.get(name.as_str())?.map(|v| v.value()) == Some(rec.id.get());
        if owned {
            names.remove(name.as_str())?;
        }
    }
    if let Some(parent) = rec.parent {
        children.remove((parent.get(), rec.id.get()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{BackendKind, PoolSpec};
    use crate::units::Bytes;

    fn settings() -> PoolSettings {
        crate::engine::settings_from_spec(&PoolSpec {
            root: "/nonexistent".into(),
            backend: Some(BackendKind::Reflink),
            data_size: Some(Bytes::gib(1)),
            metadata_size: Some(Bytes::mib(64)),
            ..PoolSpec::default()
        })
        .unwrap()
    }

    fn record(id: u32, name: Option<&str>, parent: Option<u32>, kind: DeviceKind) -> DeviceRecord {
        DeviceRecord {
            id: ThinId::new(id).unwrap(),
            name: name.map(|n| DeviceName::new(n).unwrap()),
            kind,
            parent: parent.map(|p| ThinId::new(p).unwrap()),
            size: Bytes::mib(16),
            state: DeviceState::Ready,
            active: false,
            labels: BTreeMap::new(),
            created_ns: 0,
            updated_ns: 0,
            usage: None,
        }
    }

    /// A ready store with the base (id 0) and one layer `a` (id 1).
    fn ready_store(dir: &Path) -> Store {
        let store = Store::create(&dir.join("pool.redb"), &settings()).unwrap();
        store
            .write(|w| {
                w.put_device(&record(0, None, None, DeviceKind::Base))?;
                w.put_device(&record(1, Some("a"), Some(0), DeviceKind::Committed))?;
                w.set_base(&BaseDevice {
                    id: ThinId::new(0).unwrap(),
                    fs_uuid: "00".into(),
                })?;
                w.set_state(PoolState::Ready)
            })
            .unwrap();
        store
    }

    /// A crash between creating the database file and its first commit leaves a file with
    /// no tables: it opens, as a pool whose creation never finished.
    #[test]
    fn store_without_tables_reads_as_initializing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.redb");
        drop(Database::create(&path).unwrap());
        let store = Store::open(&path).unwrap();
        assert_eq!(store.read(|r| r.state()).unwrap(), PoolState::Initializing);
        assert_eq!(store.read(|r| r.settings_if_any()).unwrap(), None);
    }

    #[test]
    fn check_passes_a_consistent_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = ready_store(dir.path());
        assert_eq!(store.check().unwrap(), Vec::<String>::new());
        store.check_or_fail().unwrap();
    }

    /// Two records with one name (the probe's D10: a record edited behind our back), a
    /// dangling parent and a base without its record are all reported, and open's error
    /// names the store file and the repair path.
    #[test]
    fn check_finds_duplicate_names_dangling_parents_and_a_missing_base() {
        let dir = tempfile::tempdir().unwrap();
        let store = ready_store(dir.path());
        store
            .write(|w| {
                // Behind the indexes' back, as a hand edit of the file would be.
                let dup = serde_json::to_vec(&record(2, Some("a"), Some(0), DeviceKind::Active))?;
                w.txn.open_table(DEVICES)?.insert(2, dup.as_slice())?;
                w.put_device(&record(3, Some("orphan"), Some(77), DeviceKind::Active))?;
                w.remove_device(ThinId::new(0).unwrap())
            })
            .unwrap();
        let problems = store.check().unwrap();
        let all = problems.join("\n");
        assert!(all.contains("both named \"a\""), "{all}");
        assert!(all.contains("parent 77"), "{all}");
        assert!(all.contains("base device 0 has no record"), "{all}");
        let e = store.check_or_fail().unwrap_err().to_string();
        assert!(
            e.contains("pool.redb") && e.contains("docs/recovery.md"),
            "{e}"
        );
    }

    /// A record being deleted may outlive its parent (a chain removed deferred, in any
    /// order): not a problem.
    #[test]
    fn check_allows_a_deleting_child_of_a_removed_parent() {
        let dir = tempfile::tempdir().unwrap();
        let store = ready_store(dir.path());
        store
            .write(|w| {
                let mut child = record(2, None, Some(1), DeviceKind::Active);
                child.state = DeviceState::Deleting;
                w.put_device(&child)?;
                w.remove_device(ThinId::new(1).unwrap())
            })
            .unwrap();
        assert_eq!(store.check().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn quarantine_is_durable_and_dropped_with_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = ready_store(dir.path());
        let id = ThinId::new(1).unwrap();
        store
            .write(|w| w.quarantine(id, "activate: boom", 5))
            .unwrap();
        store
            .write(|w| w.quarantine(id, "activate: again", 9))
            .unwrap();
        let path = store.path().to_path_buf();
        drop(store);
        let store = Store::open(&path).unwrap();
        let q = store.read(|r| r.quarantined()).unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(
            (q[0].reason.as_str(), q[0].since_ns),
            ("activate: again", 5)
        );
        store.write(|w| w.remove_device(id)).unwrap();
        assert!(store.read(|r| r.quarantined()).unwrap().is_empty());
    }
}
