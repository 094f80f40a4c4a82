//! Latency histograms of the engine's operations (snapshot, activate, commit, remove,
//! grow), for the daemon's metrics.
//!
//! They live in the engine, not in the API layer, because the engine is where every caller
//! passes: both gRPC services, the CLI's admin calls, autoextension (a grow) and in-process
//! users. The engine stays free of a metrics crate: a histogram here is a fixed set of
//! atomic bucket counters (no lock, one `fetch_add` per bucket hit plus two for sum and
//! count), and the daemon renders [`OpTimings::read`] in whatever format it serves.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An engine operation whose latency is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Snapshot,
    Activate,
    Commit,
    Remove,
    Grow,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Snapshot,
        Operation::Activate,
        Operation::Commit,
        Operation::Remove,
        Operation::Grow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Snapshot => "snapshot",
            Operation::Activate => "activate",
            Operation::Commit => "commit",
            Operation::Remove => "remove",
            Operation::Grow => "grow",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Upper bounds of the buckets, in seconds (an implicit last bucket is `+Inf`). From 1 ms
/// (a record-only commit on reflink) to 30 s (a grow that runs `xfs_growfs` on a big pool).
pub const BUCKETS_SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const NBUCKETS: usize = BUCKETS_SECONDS.len() + 1;

/// The bucket bounds in nanoseconds, for comparing durations without floating point.
const BUCKETS_NS: [u64; 14] = {
    let mut ns = [0u64; 14];
    let mut i = 0;
    while i < ns.len() {
        ns[i] = (BUCKETS_SECONDS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; NBUCKETS],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> HistogramSnapshot {
        let buckets = BUCKETS_SECONDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(le, c)| (le, c.load(Ordering::Relaxed)))
            .collect::<Vec<_>>();
        HistogramSnapshot {
            // The count is the buckets' total, so that a read racing an observation is
            // still a consistent histogram (the sum may lag by that one observation).
            count: buckets.iter().map(|(_, c)| c).sum(),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// One operation's histogram, read.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations in this bucket alone)`: not cumulative; the
    /// last bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

/// The histograms of every [`Operation`].
#[derive(Default)]
pub struct OpTimings {
    ops: [Histogram; 5],
}

impl OpTimings {
    /// Starts timing one call of `op`; the time is recorded when the guard drops, so every
    /// return path (errors included) is counted.
    pub fn start(&self, op: Operation) -> Timer<'_> {
        Timer {
            hist: &self.ops[op as usize],
            start: Instant::now(),
        }
    }

    pub fn observe(&self, op: Operation, d: Duration) {
        self.ops[op as usize].observe(d);
    }

    /// Every operation's histogram, in [`Operation::ALL`] order.
    pub fn read(&self) -> Vec<(Operation, HistogramSnapshot)> {
        Operation::ALL
            .iter()
            .map(|&op| (op, self.ops[op as usize].read()))
            .collect()
    }
}

/// Records the time since [`OpTimings::start`] when dropped.
pub struct Timer<'a> {
    hist: &'a Histogram,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let t = OpTimings::default();
        t.observe(Operation::Commit, Duration::from_micros(500));
        t.observe(Operation::Commit, Duration::from_millis(1)); // on the bound: le="0.001"
        t.observe(Operation::Commit, Duration::from_millis(7));
        t.observe(Operation::Commit, Duration::from_secs(60));
        drop(t.start(Operation::Grow));
        let read = t.read();
        assert_eq!(read.len(), 5);
        let (op, c) = &read[2];
        assert_eq!(*op, Operation::Commit);
        assert_eq!(c.count, 4);
        assert_eq!(c.buckets.len(), BUCKETS_SECONDS.len() + 1);
        assert_eq!(c.buckets[0], (0.001, 2));
        assert_eq!(c.buckets[3], (0.01, 1));
        assert_eq!(c.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((c.sum_seconds - 60.0085).abs() < 1e-9, "{}", c.sum_seconds);
        assert_eq!(read[4].1.count, 1, "the guard records on drop");
        assert_eq!(read[0].1.count, 0);
    }
}
