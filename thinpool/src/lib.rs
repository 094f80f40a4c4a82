//! thinpool: thin-provisioned block devices with copy-on-write snapshots, on two sparse
//! loopback files, for container image layers and container root filesystems.
//!
//! Layout: [`Pool`] (the engine) keeps records in the [`store`] and changes storage through
//! one [`backend::Backend`] trait, implemented by [`backend::dm`] (the kernel's dm-thin) and
//! [`backend::reflink`] (reflinked files on XFS, for hosts without dm-thin). [`AsyncPool`]
//! runs the engine's blocking calls on tokio's blocking pool;
//! [`run_autoextend`] is the space monitor a daemon spawns.

mod asyncpool;
pub mod backend;
mod blockdev;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod fsutil;
pub mod ids;
pub mod loopback;
pub mod model;
mod monitor;
pub mod mount;
pub mod store;
pub mod timing;
pub mod units;

pub use asyncpool::AsyncPool;
pub use engine::{Pool, RemoveOptions, SnapshotRequest, TakeDownReport, check_spec_settings};
pub use error::{Error, ErrorKind, Result};
pub use ids::{DeviceName, ThinId};
pub use model::*;
pub use monitor::run_autoextend;
pub use timing::{HistogramSnapshot, Operation};
pub use units::{Bytes, DataBlocks, Percent, Sectors};
