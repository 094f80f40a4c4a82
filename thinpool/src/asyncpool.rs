//! The async facade: every engine call runs on tokio's blocking pool, never on a runtime
//! worker, because each one may wait on ioctls, fsync or child processes.
//!
//! [`AsyncPool::run`] is the one way async code calls the engine: it takes a closure over
//! the blocking [`Pool`] and runs it with one hop to the blocking pool, however many
//! engine calls the closure makes (a gRPC request that looks a record up, then changes
//! it, is one hop, not two). There are no per-method async wrappers: they were a second
//! path beside such closures, and each added a hop. [`AsyncPool::engine`] is for the few
//! calls that never block (settings, paths, counters, timings).

use std::sync::Arc;

use crate::engine::Pool;
use crate::error::{Error, Result};
use crate::model::PoolSpec;

/// A shareable handle to an open pool, for async code.
#[derive(Clone)]
pub struct AsyncPool {
    pool: Arc<Pool>,
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

    /// The blocking engine: for calls that do not block (they read memory or atomics),
    /// and for callers already on a blocking thread.
    pub fn engine(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Runs `f` with the engine on tokio's blocking pool. A panic in `f` (a bug of ours)
    /// comes back as [`Error::Internal`] with the panic's message.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Pool) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let pool = self.pool.clone();
        blocking(move || f(&pool)).await
    }
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
