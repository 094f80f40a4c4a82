//! gRPC definitions served by thinpoold.
//!
//! - [`snapshots`]: containerd's `containerd.services.snapshots.v1` (the proxy-snapshotter
//!   API), declared here wire-compatibly with containerd 1.6.
//! - [`types`]: containerd's `containerd.types` (Mount).
//! - [`admin`]: thinpool's own `thinpool.v1` admin API.
//!
//! The modules mirror the protobuf packages (generated code refers across them with
//! `super::`); the short names above are re-exports.

/// Generated code, one module per protobuf package.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub mod thinpool {
        pub mod v1 {
            tonic::include_proto!("thinpool.v1");
        }
    }
}

pub use pb::containerd::services::snapshots::v1 as snapshots;
pub use pb::containerd::types;
pub use pb::thinpool::v1 as admin;

/// The gRPC metadata key containerd uses for its namespace. thinpoold does not need it: the
/// keys a proxy snapshotter receives are already namespaced by containerd.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
