//! The metadata store: our durable records, in a redb database in the pool's root.
//!
//! redb commits are ACID and fsync before `commit()` returns (`Durability::Immediate`, its
//! default), which is what makes "record the intent, then change the kernel" crash-safe.
//!
//! Tables:
//! - `meta`: schema version, pool settings and state, base device, counters (JSON values);
//! - `devices`: thin id → [`DeviceRecord`] (JSON, so a stranger can read a dump);
//! - `names`: device name → thin id (unique index);
//! - `children`: (parent id, child id) → () (so "has children?" is one range read).

use std::path::Path;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::ids::{DeviceName, ThinId};
use crate::model::{DeviceRecord, PoolSettings};

/// Bump on any incompatible change to the tables or record formats, and add a migration.
pub const SCHEMA_VERSION: u32 = 1;

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const DEVICES: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("devices");
const NAMES: TableDefinition<'_, &str, u32> = TableDefinition::new("names");
const CHILDREN: TableDefinition<'_, (u32, u32), ()> = TableDefinition::new("children");

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
}

impl Store {
    /// Creates a new store for a pool being made. Precondition: no file at `path`.
    pub fn create(path: &Path, settings: &PoolSettings) -> Result<Store> {
        let db = Database::create(path)?;
        // redb creates the file 0644; it holds every snapshot's key and labels.
        crate::fsutil::make_private(path)?;
        let store = Store { db };
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
            Ok(())
        })?;
        Ok(store)
    }

    /// Opens an existing store and checks its schema version.
    pub fn open(path: &Path) -> Result<Store> {
        let db = Database::open(path)?;
        let store = Store { db };
        let version: u32 = store
            .read(|r| r.meta(K_SCHEMA))?
            .ok_or_else(|| Error::Inconsistent("metadata store has no schema version".into()))?;
        if version != SCHEMA_VERSION {
            return Err(Error::FailedPrecondition(format!(
                "metadata store schema version {version}; this build reads version {SCHEMA_VERSION}"
            )));
        }
        Ok(store)
    }

    /// Runs `f` on a consistent snapshot of the store.
    pub fn read<T>(&self, f: impl FnOnce(&ReadView) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_read()?;
        f(&ReadView { txn })
    }

    /// Runs `f` in a write transaction and commits it durably if `f` succeeds. redb admits one
    /// writer at a time, so keep `f` short: no ioctls or child processes inside.
    pub fn write<T>(&self, f: impl FnOnce(&mut WriteView<'_>) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write()?;
        let mut view = WriteView { txn: &txn };
        let out = f(&mut view)?;
        txn.commit()?;
        Ok(out)
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(serde_json::from_slice(bytes)?)
}

pub struct ReadView {
    txn: redb::ReadTransaction,
}

impl ReadView {
    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let t = self.txn.open_table(META)?;
        t.get(key)?.map(|v| decode(v.value())).transpose()
    }

    pub fn settings(&self) -> Result<PoolSettings> {
        self.meta(K_SETTINGS)?
            .ok_or_else(|| Error::Inconsistent("metadata store has no pool settings".into()))
    }

    pub fn state(&self) -> Result<PoolState> {
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

    /// Removes a record and its index entries. Removing an absent id is a no-op.
    pub fn remove_device(&mut self, id: ThinId) -> Result<()> {
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
