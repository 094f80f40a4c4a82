//! Identifiers: the kernel's thin device id and the client's device name.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A thin device id inside the pool. dm-thin ids are 24 bits wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ThinId(u32);

impl ThinId {
    /// One past the largest id dm-thin accepts.
    pub const LIMIT: u32 = 1 << 24;

    /// Precondition: `id < ThinId::LIMIT`.
    pub fn new(id: u32) -> Result<ThinId> {
        if id < Self::LIMIT {
            Ok(ThinId(id))
        } else {
            Err(Error::InvalidArgument(format!(
                "thin id {id} is not below 2^24"
            )))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The id after this one, wrapping to 0 past the 24-bit range.
    pub fn next_wrapping(self) -> ThinId {
        ThinId((self.0 + 1) % Self::LIMIT)
    }
}

impl fmt::Display for ThinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Upper bound on a device name (a containerd snapshot key), in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// Upper bounds on labels, so a client cannot grow our records without limit.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_LEN: usize = 1024;
pub const MAX_LABEL_VALUE_LEN: usize = 4096;
/// Upper bound on all label keys and values together, in bytes.
pub const MAX_LABELS_TOTAL: usize = 64 * 1024;

/// The client's name for a device: a containerd snapshot key or an admin-chosen name.
///
/// It is data, never a path or an argument: it is only stored and compared. It must be
/// non-empty, at most [`MAX_NAME_LEN`] bytes, and free of NUL and other control characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceName(String);

/// Debug is the quoted, escaped name (`"my-key"`), as error messages show it: the name is
/// client data, so it is never printed raw where a reader could mistake it for our text.
impl fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl DeviceName {
    pub fn new(name: impl Into<String>) -> Result<DeviceName> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::InvalidArgument("device name is empty".into()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!(
                "device name is {} bytes; the limit is {MAX_NAME_LEN}",
                name.len()
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(
                "device name contains a control character".into(),
            ));
        }
        Ok(DeviceName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceName {
    type Error = Error;
    fn try_from(s: String) -> Result<DeviceName> {
        DeviceName::new(s)
    }
}

impl From<DeviceName> for String {
    fn from(n: DeviceName) -> String {
        n.0
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks labels against the bounds above; the error names the bound that was exceeded.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "{} labels; the limit is {MAX_LABELS}",
            labels.len()
        )));
    }
    let mut total = 0;
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_LEN {
            return Err(Error::InvalidArgument(format!(
                "label key of {} bytes; keys must be 1 to {MAX_LABEL_KEY_LEN} bytes",
                k.len()
            )));
        }
        if v.len() > MAX_LABEL_VALUE_LEN {
            return Err(Error::InvalidArgument(format!(
                "label {k:?} has a value of {} bytes; the limit is {MAX_LABEL_VALUE_LEN}",
                v.len()
            )));
        }
        total += k.len() + v.len();
    }
    if total > MAX_LABELS_TOTAL {
        return Err(Error::InvalidArgument(format!(
            "labels total {total} bytes; the limit is {MAX_LABELS_TOTAL}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_id_is_24_bits() {
        assert!(ThinId::new(0).is_ok());
        assert!(ThinId::new((1 << 24) - 1).is_ok());
        assert!(ThinId::new(1 << 24).is_err());
        assert_eq!(ThinId::new((1 << 24) - 1).unwrap().next_wrapping().get(), 0);
    }

    #[test]
    fn names_are_bounded_data() {
        assert!(DeviceName::new("default/1/sha256:abc").is_ok());
        assert!(
            DeviceName::new("../../etc/passwd").is_ok(),
            "names are data, not paths"
        );
        assert!(DeviceName::new("").is_err());
        assert!(DeviceName::new("a\0b").is_err());
        assert!(DeviceName::new("x".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn names_print_quoted_in_messages() {
        let n = DeviceName::new("a \"b\"").unwrap();
        assert_eq!(format!("device {n:?}"), r#"device "a \"b\"""#);
        assert_eq!(n.to_string(), r#"a "b""#);
    }

    #[test]
    fn labels_are_bounded() {
        let mut l = BTreeMap::new();
        l.insert("k".to_string(), "v".to_string());
        assert!(validate_labels(&l).is_ok());
        l.insert("big".into(), "v".repeat(MAX_LABEL_VALUE_LEN + 1));
        assert!(validate_labels(&l).is_err());
        let many: BTreeMap<_, _> = (0..=MAX_LABELS)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(validate_labels(&many).is_err());
    }
}
