//! Space: the `min_free_space` guard, online grows ([`Pool::grow`]), the autoextend
//! check the space monitor runs, the pool's kernel events, and the counters they keep.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::failpoint;
use crate::loopback;
use crate::model::{
    AutoextendPolicy, BackendStatus, GrowOutcome, GrowRequest, PoolCounters, PoolMode,
    PoolSettings, PoolSize, SizeChange,
};
use crate::timing::Operation;
use crate::units::{Bytes, DataBlocks};

use super::Pool;
use super::settings::{host_has_room, plan_grow};

/// The engine's counters; see [`PoolCounters`].
#[derive(Default)]
pub(super) struct Counters {
    grows: AtomicU64,
    autoextends: AtomicU64,
    autoextend_failures: AtomicU64,
    guard_rejections: AtomicU64,
    pool_events: AtomicU64,
    mode_changes: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn read(&self) -> PoolCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolCounters {
            grows: r(&self.grows),
            autoextends: r(&self.autoextends),
            autoextend_failures: r(&self.autoextend_failures),
            guard_rejections: r(&self.guard_rejections),
            pool_events: r(&self.pool_events),
            mode_changes: r(&self.mode_changes),
        }
    }
}

/// What the space checks remember between calls, so that they log changes, not states.
#[derive(Default)]
pub(super) struct SpaceState {
    /// The pool mode last seen.
    mode: Option<PoolMode>,
    /// An autoextension of data (0) or metadata (1) is due but could not happen; warned
    /// about once until it clears.
    blocked: [bool; 2],
}

impl Pool {
    /// The `min_free_space` guard: fails with `ResourceExhausted`, saying how to grow the
    /// pool, while free data space (or free metadata space, where it can run out) is below
    /// the setting. Docker checks the same before every create.
    /// A pool that is not writable (read-only or failed: an I/O error under it, or full
    /// metadata) or whose metadata needs a check is refused here with `FailedPrecondition`
    /// naming the mode, not left to fail at the kernel: a read-only pool refuses the
    /// create message anyway, and a snapshot on metadata that needs a check could be lost
    /// with the next repair.
    pub(super) fn check_free_space(&self) -> Result<()> {
        let min = self.settings().min_free_space;
        let st = self.backend.status()?;
        self.observe(&st);
        if matches!(st.mode, PoolMode::Ro | PoolMode::Fail) || st.needs_check {
            return Err(Error::FailedPrecondition(format!(
                "the pool's mode is {}{}: no new snapshots until it is repaired; clear the \
                 fault under it, take it down (thinctl pool down) and restart thinpoold, \
                 which checks the metadata (docs/recovery.md)",
                st.mode,
                if st.needs_check {
                    " and its metadata needs a check"
                } else {
                    ""
                }
            )));
        }
        if min.0 == 0 {
            return Ok(());
        }
        let mut checks = vec![("data", "--data", st.data_used, st.data_total)];
        if self.backend.metadata_grows() {
            checks.push((
                "metadata",
                "--metadata",
                st.metadata_used,
                st.metadata_total,
            ));
        }
        for (what, flag, used, total) in checks {
            let free = Bytes(total.0.saturating_sub(used.0));
            let needed = min.of(total);
            if free < needed {
                Counters::bump(&self.counters.guard_rejections, 1);
                return Err(Error::ResourceExhausted(format!(
                    "the pool has {free} of {total} {what} space free, below the {min} \
                     (min_free_space, {needed}) kept for the devices in use; grow the pool \
                     (`thinctl pool grow {flag} +SIZE`) or remove devices"
                )));
            }
        }
        Ok(())
    }

    /// Logs a change of the pool's mode (once per change, not per call) and counts it.
    pub(super) fn observe(&self, st: &BackendStatus) {
        let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
        let old = space.mode.replace(st.mode);
        if old == Some(st.mode) {
            return;
        }
        if old.is_some() {
            Counters::bump(&self.counters.mode_changes, 1);
        }
        let from = old
            .map(|m| m.to_string())
            .unwrap_or_else(|| "unknown".into());
        match st.mode {
            PoolMode::Rw if old.is_none() => {}
            PoolMode::Rw => info!(%from, "the pool is read-write again"),
            PoolMode::OutOfDataSpace => warn!(%from, data_used = %st.data_used,
                data_total = %st.data_total,
                "the pool is out of data space: writes to unallocated blocks fail; grow it \
                 (thinctl pool grow --data +SIZE)"),
            PoolMode::Ro => warn!(%from, metadata_used = %st.metadata_used,
                metadata_total = %st.metadata_total,
                "the pool is read-only (metadata full or failing): grow its metadata \
                 (thinctl pool grow --metadata +SIZE), or check it if it needs a check"),
            PoolMode::Fail => warn!(%from, needs_check = st.needs_check,
                "the pool has FAILED: devices error out; it needs a check and repair"),
        }
    }

    /// Grows the pool's data and/or metadata files, online: mounted devices keep working.
    ///
    /// Sizes are absolute or relative ([`SizeChange`]); data must stay a multiple of the block
    /// size, metadata a multiple of 4 KiB and at most [`PoolSettings::MAX_METADATA_SIZE`].
    ///
    /// Errors: `InvalidArgument` for no size, a size not above the current one (pools never
    /// shrink) or a misaligned one; `FailedPrecondition` when the pool needs a check or has
    /// failed, or for metadata on reflink (its metadata is the XFS log, which cannot grow
    /// online); `ResourceExhausted` when the host filesystem holding the files has less free
    /// space than the grown files could take, unless `req.force`.
    ///
    /// Crash safety: each file is extended (and synced) before the kernel is told, and the
    /// new size is recorded after; the backend assembles the pool from the files' sizes, and
    /// open finishes a grow whose record is missing. Data grows before metadata: when the
    /// metadata step fails, the data stays grown (and recorded) and the error is returned.
    pub fn grow(&self, req: GrowRequest) -> Result<GrowOutcome> {
        let _up = self.up()?;
        let _grow = self.grow_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.grow_locked(&req)
    }

    /// [`Pool::grow`]; the caller holds `grow_lock`.
    fn grow_locked(&self, req: &GrowRequest) -> Result<GrowOutcome> {
        // Timed here, under the lock: manual grows and autoextensions both, without the
        // wait for another grow to finish.
        let _t = self.timings.start(Operation::Grow);
        let settings = self.settings();
        let before = PoolSize {
            data: settings.data_size,
            metadata: settings.metadata_size,
        };
        let files = PoolSize {
            data: Bytes(loopback::file_len(&self.paths.data_file)?),
            metadata: Bytes(loopback::file_len(&self.paths.metadata_file)?),
        };
        let after = plan_grow(&settings, files, req, self.backend.metadata_grows())?;
        let st = self.backend.status()?;
        self.observe(&st);
        if st.needs_check || st.mode == PoolMode::Fail {
            return Err(Error::FailedPrecondition(format!(
                "the pool is {}{}: it must be checked and repaired before it can grow \
                 (restart thinpoold, which runs the check)",
                st.mode,
                if st.needs_check {
                    " and needs a check"
                } else {
                    ""
                }
            )));
        }
        if !req.force {
            self.check_host_room(before, after)?;
        }
        info!(data = %before.data, to_data = %after.data, metadata = %before.metadata,
            to_metadata = %after.metadata, force = req.force, "growing the pool");
        if after.data > before.data {
            let blocks = DataBlocks(after.data.0 / settings.block_size.0);
            self.backend
                .grow_data(after.data, settings.low_water_mark(blocks))?;
            failpoint::hit("grow:after_kernel");
            self.record_settings(|s| s.data_size = after.data)?;
        }
        if after.metadata > before.metadata {
            if let Err(e) = self.backend.grow_metadata(after.metadata) {
                if after.data > before.data {
                    warn!(data = %after.data, error = %e,
                        "the data grew, but growing the metadata failed");
                }
                return Err(e);
            }
            failpoint::hit("grow:after_kernel");
            self.record_settings(|s| s.metadata_size = after.metadata)?;
        }
        Counters::bump(&self.counters.grows, 1);
        self.observe(&self.backend.status()?);
        info!(data = %after.data, metadata = %after.metadata, "pool grown");
        Ok(GrowOutcome { before, after })
    }

    /// Refuses a grow whose files could need more than the host filesystem has free: each
    /// file may come to take its whole new length.
    fn check_host_room(&self, before: PoolSize, after: PoolSize) -> Result<()> {
        let mut need = 0u64;
        for (file, old, new) in [
            (&self.paths.data_file, before.data, after.data),
            (&self.paths.metadata_file, before.metadata, after.metadata),
        ] {
            if new > old {
                need = need.saturating_add(new.0.saturating_sub(loopback::allocated(file)?));
            }
        }
        let st = nix::sys::statvfs::statvfs(&self.paths.root)
            .map_err(|e| Error::io("statfs", &self.paths.root, e.into()))?;
        let free = Bytes(st.blocks_available().saturating_mul(st.fragment_size()));
        host_has_room(&self.paths.root, Bytes(need), free)
    }

    /// One round of the space monitor: reads the pool's status, logs a mode change, and
    /// grows the data and/or metadata when usage is above their autoextend threshold (by the
    /// policy's step, up to its max). Returns what grew, if anything.
    ///
    /// Errors: the status cannot be read, or an autoextension was due and failed (no room on
    /// the host, a kernel error). Those are counted (`autoextend_failures`), logged once
    /// until they clear (a monitor calls this every few seconds), and retried next round.
    /// Metadata is left alone where it cannot grow (reflink).
    pub fn autoextend_check(&self) -> Result<Option<GrowOutcome>> {
        let _up = self.up()?;
        let settings = self.settings();
        let metadata_policy = if self.backend.metadata_grows() {
            settings.autoextend_metadata
        } else {
            AutoextendPolicy::OFF
        };
        let st = self.backend.status()?;
        self.observe(&st);
        if !settings.autoextend_data.enabled() && !metadata_policy.enabled() {
            return Ok(None);
        }
        if st.needs_check || st.mode == PoolMode::Fail {
            return Ok(None); // observe() warned; growing is refused until repaired
        }
        let _grow = self.grow_lock.lock().unwrap_or_else(|p| p.into_inner());
        // A grow may have finished while we waited for the lock.
        let settings = self.settings();
        let st = self.backend.status()?;
        let metadata_cap = AutoextendPolicy {
            max: Some(
                metadata_policy
                    .max
                    .unwrap_or(PoolSettings::MAX_METADATA_SIZE)
                    .min(PoolSettings::MAX_METADATA_SIZE),
            ),
            ..metadata_policy
        };
        let mut req = GrowRequest::default();
        let mut due = [false; 2];
        for (i, (policy, used, total, size, align)) in [
            (
                settings.autoextend_data,
                st.data_used,
                st.data_total,
                settings.data_size,
                settings.block_size,
            ),
            (
                metadata_cap,
                st.metadata_used,
                st.metadata_total,
                settings.metadata_size,
                Bytes::kib(4),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            // The backend's totals may be below the file sizes (reflink: XFS's own overhead);
            // the policy works on the file size, with the usage ratio the backend reports.
            let used = Bytes((used.0 as u128 * size.0 as u128 / total.0.max(1) as u128) as u64);
            if !policy.exceeded(used, size) {
                continue;
            }
            due[i] = true;
            let what = ["data", "metadata"][i];
            match policy.target(used, size, align) {
                Some(to) => {
                    info!(used = %used, size = %size, threshold = %policy.threshold, to = %to,
                        "autoextend: {what} usage is above the threshold");
                    if i == 0 {
                        req.data = Some(SizeChange::To(to));
                    } else {
                        req.metadata = Some(SizeChange::To(to));
                    }
                }
                None => {
                    Counters::bump(&self.counters.autoextend_failures, 1);
                    self.warn_blocked(i, || {
                        warn!(used = %used, size = %size, max = ?policy.max,
                            "autoextend: {what} usage is above the threshold, but the pool is \
                             at the autoextend max; raise the max or grow it by hand")
                    });
                }
            }
        }
        if req.data.is_none() && req.metadata.is_none() {
            let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
            for (blocked, due) in space.blocked.iter_mut().zip(due) {
                *blocked &= due;
            }
            return Ok(None);
        }
        match self.grow_locked(&req) {
            Ok(outcome) => {
                Counters::bump(&self.counters.autoextends, 1);
                let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
                space.blocked = [false; 2];
                drop(space);
                info!(data = %outcome.after.data, metadata = %outcome.after.metadata,
                    "autoextend: pool grown");
                Ok(Some(outcome))
            }
            Err(e) => {
                Counters::bump(&self.counters.autoextend_failures, 1);
                let i = if req.data.is_some() { 0 } else { 1 };
                self.warn_blocked(i, || warn!(error = %e, "autoextend failed; will retry"));
                Err(e)
            }
        }
    }

    /// Runs `log` unless autoextension `i` (0 data, 1 metadata) was blocked already.
    fn warn_blocked(&self, i: usize, log: impl FnOnce()) {
        let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
        if !space.blocked[i] {
            space.blocked[i] = true;
            drop(space);
            log();
        } else {
            debug!("autoextend still blocked");
        }
    }

    /// The descriptor that polls readable after kernel events (dm), for the space monitor;
    /// `None`: the monitor only polls (reflink, or a kernel without dm event polling).
    pub fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.events.as_ref().map(|e| e.fd())
    }

    /// After [`Pool::event_fd`] polled readable: re-arms it and returns whether the pool had
    /// events since the last call (others' events wake it too). Blocks (ioctls).
    pub fn take_events(&self) -> Result<bool> {
        let Some(events) = &self.events else {
            return Ok(false);
        };
        let n = events.take()?;
        if n > 0 {
            Counters::bump(&self.counters.pool_events, n.into());
            debug!(events = n, "pool events");
        }
        Ok(n > 0)
    }
}
