//! The engine's one error type. Each variant says which gRPC status it maps to at the edge.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed (bad name, bad size, bad label). → InvalidArgument
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The named device does not exist. → NotFound
    #[error("not found: {0}")]
    NotFound(String),

    /// A device with that name exists already. → AlreadyExists
    #[error("already exists: {0}")]
    AlreadyExists(String),

    /// The request is well-formed but the state forbids it (device has children, parent not
    /// committed, pool needs check, ...). → FailedPrecondition
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),

    /// The pool has not enough free space or ids. → ResourceExhausted
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),

    /// A setting given at open differs from the pool on disk. → FailedPrecondition
    #[error("setting {setting}: the pool on disk has {on_disk}, but {requested} was requested")]
    SettingConflict {
        setting: &'static str,
        on_disk: String,
        requested: String,
    },

    /// An external tool this backend needs is not installed. → FailedPrecondition
    #[error("{tool} not found: install the Debian package {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },

    /// An external tool ran and failed. → Internal
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },

    /// A device-mapper ioctl failed. → Internal (the message keeps the kernel's errno)
    #[error("device-mapper: {context}: {message}")]
    Dm { context: String, message: String },

    /// File or device I/O failed. → Internal
    #[error("{context} ({path}): {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The metadata store failed. → Internal
    #[error("metadata store: {0}")]
    Store(String),

    /// Our records and the kernel's disagree in a way we cannot repair alone. → DataLoss
    #[error("inconsistent pool: {0}")]
    Inconsistent(String),
}

/// The class of an [`Error`], for mapping to a gRPC code without depending on tonic here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    DataLoss,
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_)
            | Error::SettingConflict { .. }
            | Error::MissingTool { .. } => ErrorKind::FailedPrecondition,
            Error::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            Error::Inconsistent(_) => ErrorKind::DataLoss,
            Error::Command { .. } | Error::Dm { .. } | Error::Io { .. } | Error::Store(_) => {
                ErrorKind::Internal
            }
        }
    }

    /// Wraps an I/O error with what we were doing and on which path.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub fn dm(context: impl Into<String>, e: devicemapper::DmError) -> Error {
        Error::Dm {
            context: context.into(),
            message: e.to_string(),
        }
    }
}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Store(e.to_string())
            }
        }
    )*};
}
store_error_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);
