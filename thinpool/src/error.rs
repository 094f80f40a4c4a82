//! The engine's one error type. Each variant says which gRPC status it maps to at the edge.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

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

    /// A device-mapper ioctl failed. → Internal. `errno` is the kernel's answer when the
    /// failure was an ioctl's (callers may match it); the message says it too.
    #[error("device-mapper: {context}: {message}")]
    Dm {
        context: String,
        message: String,
        #[source]
        errno: Option<Errno>,
    },

    /// File or device I/O failed. → Internal
    #[error("{context} ({path}): {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The metadata store failed. → Internal. `source` is redb's (or serde's) own error;
    /// the message includes its text, for logs and clients that show only the message.
    #[error("metadata store: {message}")]
    Store {
        message: String,
        #[source]
        source: Option<BoxError>,
    },

    /// Our records and the kernel's disagree in a way we cannot repair alone. → DataLoss
    #[error("inconsistent pool: {0}")]
    Inconsistent(String),

    /// A bug of ours: an engine call panicked (on tokio's blocking pool). → Internal, not
    /// DataLoss: nothing says the pool is damaged.
    #[error("internal error in the engine (a bug): {0}")]
    Internal(String),
}

/// The source of a [`Error::Store`]: one of several redb error types, or serde's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
            Error::Command { .. }
            | Error::Dm { .. }
            | Error::Io { .. }
            | Error::Store { .. }
            | Error::Internal(_) => ErrorKind::Internal,
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

    /// A failed device-mapper call, keeping the ioctl's errno if that is what failed.
    pub fn dm(context: impl Into<String>, e: devicemapper::DmError) -> Error {
        Error::Dm {
            context: context.into(),
            message: e.to_string(),
            errno: dm_errno(&e),
        }
    }

    /// A store failure without an underlying error (a check of ours failed).
    pub fn store(message: impl Into<String>) -> Error {
        Error::Store {
            message: message.into(),
            source: None,
        }
    }
}

/// The errno of a failed device-mapper ioctl; `None` for the crate's other errors.
pub(crate) fn dm_errno(e: &devicemapper::DmError) -> Option<Errno> {
    match e {
        devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, err)) => {
            Some(**err)
        }
        _ => None,
    }
}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Store {
                    message: e.to_string(),
                    source: Some(Box::new(e)),
                }
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_dm_ioctl_error_keeps_its_errno() {
        let ioctl = devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(
            4,
            None,
            None,
            Box::new(Errno::EBUSY),
        ));
        let e = Error::dm("remove thin 3", ioctl);
        assert!(
            matches!(
                &e,
                Error::Dm {
                    errno: Some(Errno::EBUSY),
                    ..
                }
            ),
            "{e:?}"
        );
        let source = e.source().expect("the errno is the source");
        assert_eq!(source.downcast_ref::<Errno>(), Some(&Errno::EBUSY));
        assert!(e.to_string().contains("EBUSY"), "the message keeps it: {e}");
        assert_eq!(e.kind(), ErrorKind::Internal);
        let other = Error::dm(
            "list",
            devicemapper::DmError::Core(devicemapper::errors::Error::IoctlResultTooLarge),
        );
        assert!(matches!(other, Error::Dm { errno: None, .. }), "{other:?}");
    }

    #[test]
    fn a_store_error_keeps_its_source() {
        let json = serde_json::from_str::<u32>("not json").unwrap_err();
        let text = json.to_string();
        let e = Error::from(json);
        assert!(e.to_string().contains(&text), "{e}");
        let source = e.source().expect("serde's error is the source");
        assert!(
            source.downcast_ref::<serde_json::Error>().is_some(),
            "{source:?}"
        );
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(Error::store("a check failed").source().is_none());
    }
}
