//! Placeholder; being written.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::{Backend, PoolPaths};
use crate::error::{Error, Result};
use crate::ids::ThinId;
use crate::model::{BackendKind, BackendStatus, PoolSettings};
use crate::units::Bytes;

pub struct ReflinkBackend;

impl ReflinkBackend {
    pub fn create(_paths: &PoolPaths, _settings: &PoolSettings) -> Result<Self> {
        Err(Error::FailedPrecondition("not yet implemented".into()))
    }
    pub fn open(_paths: &PoolPaths, _settings: &PoolSettings) -> Result<Self> {
        Err(Error::FailedPrecondition("not yet implemented".into()))
    }
    pub fn scrub(_paths: &PoolPaths, _settings: &PoolSettings) -> Result<()> {
        Ok(())
    }
    pub fn probe() -> Result<String> {
        Err(Error::FailedPrecondition("not yet implemented".into()))
    }
}

impl Backend for ReflinkBackend {
    fn kind(&self) -> BackendKind {
        unimplemented!()
    }
    fn status(&self) -> Result<BackendStatus> {
        unimplemented!()
    }
    fn create_thin(&self, _id: ThinId, _size: Bytes) -> Result<u64> {
        unimplemented!()
    }
    fn create_snapshot(&self, _id: ThinId, _origin: ThinId, _size: Bytes) -> Result<u64> {
        unimplemented!()
    }
    fn delete(&self, _id: ThinId) -> Result<u64> {
        unimplemented!()
    }
    fn activate(&self, _id: ThinId, _size: Bytes, _ro: bool) -> Result<PathBuf> {
        unimplemented!()
    }
    fn deactivate(&self, _id: ThinId) -> Result<()> {
        unimplemented!()
    }
    fn active_devices(&self) -> Result<BTreeMap<ThinId, PathBuf>> {
        unimplemented!()
    }
    fn mapped_bytes(&self, _id: ThinId, _size: Bytes) -> Result<Bytes> {
        unimplemented!()
    }
    fn list_ids(&self) -> Result<BTreeSet<ThinId>> {
        unimplemented!()
    }
    fn teardown(&self) -> Result<()> {
        unimplemented!()
    }
}
