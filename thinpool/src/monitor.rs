//! The space monitor: grows the pool by its autoextend policy and logs changes of its mode.
//!
//! On dm it wakes on the kernel's events: the pool raises one when free data blocks fall
//! below the low water mark (placed at the autoextend threshold), on a mode change, and on
//! every resume. The kernel raises the low-water event only once per table load, and an
//! event can come while a check is running, so a periodic check backs it up; on reflink,
//! which has no events, the periodic check is all there is.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use crate::AsyncPool;
use crate::engine::Pool;

/// The pool's event descriptor, kept open by the pool it belongs to.
struct EventFd(Arc<Pool>);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
            .event_fd()
            .expect("built only for a pool with events")
            .as_raw_fd()
    }
}

/// Runs the space monitor until `shutdown` completes: [`Pool::autoextend_check`] at once, on
/// each of the pool's kernel events (dm), and every `period`. All engine calls run on the
/// blocking pool; this task only waits. A daemon spawns it next to its servers:
///
/// ```ignore
/// tokio::spawn(run_autoextend(pool.clone(), Duration::from_secs(10), token.cancelled_owned()));
/// ```
///
/// Failures are logged by the engine (once while they last) and retried next round.
pub async fn run_autoextend(pool: AsyncPool, period: Duration, shutdown: impl Future<Output = ()>) {
    let mut events = match pool.engine().event_fd() {
        Some(_) => {
            let fd = EventFd(pool.engine().clone());
            // SAFETY: the descriptor belongs to the pool's event source, which the pool
            // (kept alive by the `Arc` inside `EventFd`) owns and never replaces, so it stays
            // open and the same for as long as the `AsyncFd` lives.
            match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                Ok(fd) => Some(fd),
                Err(e) => {
                    let e = io::Error::from(e);
                    warn!(error = %e, "cannot watch dm events; the space monitor only polls");
                    None
                }
            }
        }
        None => None,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    info!(period = ?period, events = events.is_some(), "space monitor started");
    loop {
        let evented = tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => None,
            ready = readable(events.as_ref()) => Some(ready),
        };
        match evented {
            None => {}
            Some(Err(e)) => {
                warn!(error = %e, "dm event watch failed; the space monitor only polls now");
                events = None;
                continue;
            }
            Some(Ok(())) => match pool.run(|p| p.take_events()).await {
                Ok(true) => debug!("pool event"),
                Ok(false) => continue, // another device's event
                Err(e) => warn!(error = %e, "reading dm events failed; checking anyway"),
            },
        }
        match pool.run(|p| p.autoextend_check()).await {
            Ok(Some(outcome)) => info!(data = %outcome.after.data,
                metadata = %outcome.after.metadata, "space monitor grew the pool"),
            Ok(None) => {}
            // The engine logged it (once while it lasts).
            Err(e) => debug!(error = %e, "space check failed"),
        }
    }
    info!("space monitor stopped");
}

/// Waits until the event descriptor polls readable and clears that readiness (the engine
/// re-arms the descriptor next); never returns without one.
async fn readable(fd: Option<&AsyncFd<EventFd>>) -> io::Result<()> {
    match fd {
        Some(fd) => {
            let mut guard = fd.readable().await?;
            guard.clear_ready();
            Ok(())
        }
        None => std::future::pending().await,
    }
}
