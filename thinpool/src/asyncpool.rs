//! The async facade: every engine call runs on tokio's blocking pool, never on a runtime
//! worker, because each one may wait on ioctls, fsync or child processes.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::engine::{Pool, RemoveOptions, SnapshotRequest, TakeDownReport};
use crate::error::{Error, Result};
use crate::ids::DeviceName;
use crate::model::{
    AuditReport, DeviceRecord, GrowOutcome, GrowRequest, MountSpec, PoolCounters, PoolSpec,
    PoolStatus,
};
use crate::units::Bytes;

/// A shareable handle to an open pool whose methods are async.
#[derive(Clone)]
pub struct AsyncPool {
    pool: Arc<Pool>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        // The store turns redb's panics into errors; anything else is a bug of ours, and
        // says so with its message rather than as a failed task.
        let why = match e.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into()),
            Err(e) => e.to_string(),
        };
        Error::Internal(why)
    })?
}

impl AsyncPool {
    pub async fn open(spec: PoolSpec) -> Result<AsyncPool> {
        let pool = blocking(move || Pool::open(&spec)).await?;
        Ok(AsyncPool {
            pool: Arc::new(pool),
        })
    }

    /// Shares an engine opened elsewhere.
    pub fn from_engine(pool: Arc<Pool>) -> AsyncPool {
        AsyncPool { pool }
    }

    /// The blocking engine, for callers already on a blocking thread.
    pub fn engine(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// [`Pool::take_down`].
    pub async fn take_down(&self, force: bool) -> Result<TakeDownReport> {
        let p = self.pool.clone();
        blocking(move || p.take_down(force)).await
    }

    pub async fn snapshot(&self, req: SnapshotRequest) -> Result<DeviceRecord> {
        let p = self.pool.clone();
        blocking(move || p.snapshot(req)).await
    }

    pub async fn commit(
        &self,
        key: DeviceName,
        name: DeviceName,
        labels: Option<BTreeMap<String, String>>,
    ) -> Result<DeviceRecord> {
        let p = self.pool.clone();
        blocking(move || p.commit(&key, &name, labels)).await
    }

    pub async fn activate(&self, name: DeviceName) -> Result<MountSpec> {
        let p = self.pool.clone();
        blocking(move || p.activate(&name)).await
    }

    pub async fn deactivate(&self, name: DeviceName) -> Result<()> {
        let p = self.pool.clone();
        blocking(move || p.deactivate(&name)).await
    }

    pub async fn remove(&self, name: DeviceName, opts: RemoveOptions) -> Result<()> {
        let p = self.pool.clone();
        blocking(move || p.remove(&name, opts)).await
    }

    pub async fn reclaim(&self) -> Result<usize> {
        let p = self.pool.clone();
        blocking(move || p.reclaim()).await
    }

    pub async fn usage(&self, name: DeviceName) -> Result<Bytes> {
        let p = self.pool.clone();
        blocking(move || p.usage(&name)).await
    }

    pub async fn device(&self, name: DeviceName) -> Result<DeviceRecord> {
        let p = self.pool.clone();
        blocking(move || p.device(&name)).await
    }

    pub async fn device_by_id(&self, id: crate::ids::ThinId) -> Result<DeviceRecord> {
        let p = self.pool.clone();
        blocking(move || p.device_by_id(id)).await
    }

    pub async fn set_labels(
        &self,
        name: DeviceName,
        labels: BTreeMap<String, String>,
    ) -> Result<DeviceRecord> {
        let p = self.pool.clone();
        blocking(move || p.set_labels(&name, labels)).await
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        let p = self.pool.clone();
        blocking(move || p.devices()).await
    }

    pub async fn usage_by_id(&self, id: crate::ids::ThinId) -> Result<Bytes> {
        let p = self.pool.clone();
        blocking(move || p.usage_by_id(id)).await
    }

    pub async fn active_devices(&self) -> Result<BTreeMap<crate::ids::ThinId, std::path::PathBuf>> {
        let p = self.pool.clone();
        blocking(move || p.active_devices()).await
    }

    pub async fn status(&self) -> Result<PoolStatus> {
        let p = self.pool.clone();
        blocking(move || p.status()).await
    }

    pub async fn grow(&self, req: GrowRequest) -> Result<GrowOutcome> {
        let p = self.pool.clone();
        blocking(move || p.grow(req)).await
    }

    pub async fn autoextend_check(&self) -> Result<Option<GrowOutcome>> {
        let p = self.pool.clone();
        blocking(move || p.autoextend_check()).await
    }

    pub async fn take_events(&self) -> Result<bool> {
        let p = self.pool.clone();
        blocking(move || p.take_events()).await
    }

    /// Reads atomics only; does not block.
    pub fn counters(&self) -> PoolCounters {
        self.pool.counters()
    }

    pub async fn audit(&self) -> Result<AuditReport> {
        let p = self.pool.clone();
        blocking(move || p.audit()).await
    }

    /// [`Pool::teardown`].
    pub async fn teardown(&self) -> Result<()> {
        let p = self.pool.clone();
        blocking(move || p.teardown()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn a_panic_in_the_engine_is_internal_with_its_message() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt
            .block_on(blocking(|| -> Result<()> { panic!("the bug's own words") }))
            .unwrap_err();
        assert!(
            matches!(&e, Error::Internal(m) if m.contains("the bug's own words")),
            "{e}"
        );
        assert_eq!(e.kind(), ErrorKind::Internal, "not DataLoss: {e}");
        let ok = rt.block_on(blocking(|| Ok(7))).unwrap();
        assert_eq!(ok, 7);
    }
}
