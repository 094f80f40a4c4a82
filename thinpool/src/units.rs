//! Size units as types, so a sector count can never be passed where a byte count is meant.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Bytes per sector, as the block layer and device-mapper count them.
pub const SECTOR_SIZE: u64 = 512;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// A length in bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Bytes(pub u64);

/// A length in 512-byte sectors.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Sectors(pub u64);

/// A percentage. Not capped at 100: a growth of 150% is meaningful; each setting states its
/// own range.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Percent(pub u32);

/// A count of pool data blocks (the pool's block size, 64 KiB by default).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct DataBlocks(pub u64);

impl Bytes {
    pub const fn kib(n: u64) -> Bytes {
        Bytes(n * KIB)
    }
    pub const fn mib(n: u64) -> Bytes {
        Bytes(n * MIB)
    }
    pub const fn gib(n: u64) -> Bytes {
        Bytes(n * GIB)
    }
    pub const fn tib(n: u64) -> Bytes {
        Bytes(n * TIB)
    }

    /// Rounds up to a multiple of `align` (which is not zero), saturating.
    pub const fn round_up(self, align: Bytes) -> Bytes {
        match self.0.checked_next_multiple_of(align.0) {
            Some(v) => Bytes(v),
            None => Bytes(u64::MAX - u64::MAX % align.0),
        }
    }

    /// Rounds down to a multiple of `align` (which is not zero).
    pub const fn round_down(self, align: Bytes) -> Bytes {
        Bytes(self.0 - self.0 % align.0)
    }

    /// Whole sectors, rounding down.
    pub const fn sectors(self) -> Sectors {
        Sectors(self.0 / SECTOR_SIZE)
    }

    /// True when this is a whole number of sectors.
    pub const fn is_sector_aligned(self) -> bool {
        self.0.is_multiple_of(SECTOR_SIZE)
    }
}

impl Sectors {
    pub const fn bytes(self) -> Bytes {
        Bytes(self.0 * SECTOR_SIZE)
    }
}

impl Percent {
    /// This percentage of `b`, rounded down.
    pub const fn of(self, b: Bytes) -> Bytes {
        Bytes((b.0 as u128 * self.0 as u128 / 100) as u64)
    }
}

impl DataBlocks {
    /// The byte length of this many blocks of `block_size`.
    pub const fn bytes(self, block_size: Bytes) -> Bytes {
        Bytes(self.0 * block_size.0)
    }
}

/// Error from [`Bytes::from_str`]: the text is not a size such as `10G`.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid size {0:?}: expected a number with an optional binary suffix K, M, G or T (10G = 10 GiB)"
)]
pub struct ParseSizeError(String);

impl FromStr for Bytes {
    type Err = ParseSizeError;

    /// Parses `4096`, `64K`, `10G`, `1.5T` (binary multiples; an optional trailing `iB`/`B` is accepted).
    fn from_str(s: &str) -> Result<Bytes, ParseSizeError> {
        let err = || ParseSizeError(s.to_string());
        let t = s.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('B'))
            .unwrap_or(t);
        let (num, mult) = match t.chars().last() {
            Some(c) if c.is_ascii_alphabetic() => {
                let mult = match c.to_ascii_uppercase() {
                    'K' => KIB,
                    'M' => MIB,
                    'G' => GIB,
                    'T' => TIB,
                    _ => return Err(err()),
                };
                (&t[..t.len() - 1], mult)
            }
            _ => (t, 1),
        };
        if num.is_empty() {
            return Err(err());
        }
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(mult).map(Bytes).ok_or_else(err);
        }
        let f: f64 = num.parse().map_err(|_| err())?;
        if !f.is_finite() || f < 0.0 || f * (mult as f64) > u64::MAX as f64 {
            return Err(err());
        }
        Ok(Bytes((f * mult as f64) as u64))
    }
}

impl fmt::Display for Bytes {
    /// Human form with binary units: `1.5 GiB`, `512 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
        for (size, name) in units {
            if self.0 >= size {
                let v = self.0 as f64 / size as f64;
                return if self.0.is_multiple_of(size) {
                    write!(f, "{} {name}", self.0 / size)
                } else {
                    write!(f, "{v:.1} {name}")
                };
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl fmt::Display for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sectors", self.0)
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl FromStr for Percent {
    type Err = ParsePercentError;

    /// Parses `70` or `70%`.
    fn from_str(s: &str) -> Result<Percent, ParsePercentError> {
        let t = s.trim();
        t.strip_suffix('%')
            .unwrap_or(t)
            .trim()
            .parse()
            .map(Percent)
            .map_err(|_| ParsePercentError(s.to_string()))
    }
}

/// Error from [`Percent::from_str`].
#[derive(Debug, thiserror::Error)]
#[error("invalid percentage {0:?}: expected a whole number, optionally followed by %")]
pub struct ParsePercentError(String);

impl fmt::Display for DataBlocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} blocks", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_suffixes() {
        assert_eq!("10G".parse::<Bytes>().unwrap(), Bytes::gib(10));
        assert_eq!("64K".parse::<Bytes>().unwrap(), Bytes::kib(64));
        assert_eq!("2GiB".parse::<Bytes>().unwrap(), Bytes::gib(2));
        assert_eq!("4096".parse::<Bytes>().unwrap(), Bytes(4096));
        assert_eq!("1.5M".parse::<Bytes>().unwrap(), Bytes(3 * MIB / 2));
        assert_eq!("1t".parse::<Bytes>().unwrap(), Bytes(TIB));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "G",
            "10X",
            "-1G",
            "abc",
            "99999999999999999999T",
            "nanG",
        ] {
            assert!(bad.parse::<Bytes>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn displays_human_sizes() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes::gib(10).to_string(), "10 GiB");
        assert_eq!(Bytes(3 * GIB / 2).to_string(), "1.5 GiB");
    }

    #[test]
    fn percentages() {
        assert_eq!("70%".parse::<Percent>().unwrap(), Percent(70));
        assert_eq!("20".parse::<Percent>().unwrap(), Percent(20));
        assert!("x%".parse::<Percent>().is_err());
        assert_eq!(
            Percent(10).of(Bytes::mib(512)),
            Bytes(Bytes::mib(512).0 / 10)
        );
        assert_eq!(Percent(150).of(Bytes::gib(2)), Bytes::gib(3));
        assert_eq!(Percent(10).to_string(), "10%");
    }

    #[test]
    fn unit_conversions() {
        assert_eq!(Bytes::kib(64).sectors(), Sectors(128));
        assert_eq!(Sectors(128).bytes(), Bytes::kib(64));
        assert_eq!(DataBlocks(2).bytes(Bytes::kib(64)), Bytes::kib(128));
    }
}
