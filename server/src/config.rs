//! thinpoold's settings: command-line flags over a TOML file over defaults.
//!
//! The TOML file takes the flags' names as keys (`data-size` or `data_size`); sizes are
//! strings with binary suffixes (`"100G"`) or plain byte counts. Only settings given on the
//! command line or in the file reach the pool spec: the rest are the engine's defaults when
//! the pool is created and "whatever the pool has" when it is opened.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thinpool::{AutoextendPolicy, Bytes, FsType, Percent};

pub const DEFAULT_ROOT: &str = "/var/lib/thinpool";
pub const DEFAULT_SOCKET: &str = "/run/thinpool/thinpool.sock";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9095";
/// Where CRI reports the image filesystem of a snapshotter named "thinpool"; kubelet needs
/// it to exist (see docs/quickstart.md).
pub const DEFAULT_IMAGEFS_DIR: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.thinpool";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Value { key: &'static str, message: String },
}

/// A size in the TOML file: `"10G"` or `10737418240`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Text(String),
    Number(u64),
}

/// A percentage in the TOML file: `80` or `"80%"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PercentValue {
    Text(String),
    Number(u32),
}

/// The TOML file. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub backend: Option<String>,
    #[serde(alias = "data_size")]
    pub data_size: Option<SizeValue>,
    #[serde(alias = "metadata_size")]
    pub metadata_size: Option<SizeValue>,
    #[serde(alias = "base_size")]
    pub base_size: Option<SizeValue>,
    #[serde(alias = "block_size")]
    pub block_size: Option<SizeValue>,
    pub fs: Option<String>,
    #[serde(alias = "metrics_addr")]
    pub metrics_addr: Option<String>,
    #[serde(alias = "socket_group")]
    pub socket_group: Option<String>,
    #[serde(alias = "imagefs_dir")]
    pub imagefs_dir: Option<PathBuf>,
    #[serde(alias = "min_free_space")]
    pub min_free_space: Option<PercentValue>,
    #[serde(alias = "autoextend_threshold")]
    pub autoextend_threshold: Option<PercentValue>,
    #[serde(alias = "autoextend_percent")]
    pub autoextend_percent: Option<PercentValue>,
    #[serde(alias = "autoextend_max")]
    pub autoextend_max: Option<SizeValue>,
    #[serde(alias = "metadata_autoextend_threshold")]
    pub metadata_autoextend_threshold: Option<PercentValue>,
    #[serde(alias = "metadata_autoextend_percent")]
    pub metadata_autoextend_percent: Option<PercentValue>,
    #[serde(alias = "metadata_autoextend_max")]
    pub metadata_autoextend_max: Option<SizeValue>,
    #[serde(alias = "metrics_per_device")]
    pub metrics_per_device: Option<bool>,
    #[serde(alias = "max_device_overcommit")]
    pub max_device_overcommit: Option<f64>,
    #[serde(alias = "overcommit_host")]
    pub overcommit_host: Option<bool>,
    /// `"6h"`, `"30m"`, `"90s"`, `"1d"`; `"0"` turns periodic backups off.
    #[serde(alias = "backup_interval")]
    pub backup_interval: Option<String>,
    #[serde(alias = "backup_keep")]
    pub backup_keep: Option<usize>,
    #[serde(alias = "auto_repair")]
    pub auto_repair: Option<bool>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// Flags as given on the command line (`None`: not given).
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub backend: Option<String>,
    pub data_size: Option<Bytes>,
    pub metadata_size: Option<Bytes>,
    pub base_size: Option<Bytes>,
    pub block_size: Option<Bytes>,
    pub fs: Option<FsType>,
    pub metrics_addr: Option<String>,
    pub socket_group: Option<String>,
    pub imagefs_dir: Option<PathBuf>,
    pub min_free_space: Option<Percent>,
    pub autoextend_threshold: Option<Percent>,
    pub autoextend_percent: Option<Percent>,
    pub autoextend_max: Option<Bytes>,
    pub metadata_autoextend_threshold: Option<Percent>,
    pub metadata_autoextend_percent: Option<Percent>,
    pub metadata_autoextend_max: Option<Bytes>,
    /// `--metrics-per-device` given (a switch: `false` means "not given").
    pub metrics_per_device: bool,
    pub max_device_overcommit: Option<f64>,
    /// `--overcommit-host` given.
    pub overcommit_host: bool,
    pub backup_interval: Option<std::time::Duration>,
    pub backup_keep: Option<usize>,
    /// `--auto-repair` given.
    pub auto_repair: bool,
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Dm,
    Reflink,
    /// The simulated backend, for tests: no kernel objects, no real filesystems.
    Sim,
}

/// The daemon's effective settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub backend: BackendChoice,
    pub data_size: Option<Bytes>,
    pub metadata_size: Option<Bytes>,
    pub base_size: Option<Bytes>,
    pub block_size: Option<Bytes>,
    pub fs: Option<FsType>,
    /// Where /metrics is served; empty: not served.
    pub metrics_addr: String,
    pub socket_group: Option<String>,
    pub imagefs_dir: PathBuf,
    /// The pool's min_free_space, if given (else the pool keeps its own).
    pub min_free_space: Option<Percent>,
    /// The data autoextend policy, if any of its settings was given: the ones not given
    /// take [`AutoextendPolicy::OFF`]'s values (threshold 100 = off, 20% steps, no max).
    pub autoextend_data: Option<AutoextendPolicy>,
    /// The metadata autoextend policy, likewise. dm only: reflink's metadata cannot grow.
    pub autoextend_metadata: Option<AutoextendPolicy>,
    /// Export each device's mapped bytes on /metrics (one series per device).
    pub metrics_per_device: bool,
    /// The size label may ask for at most the pool's data size times this.
    pub max_device_overcommit: f64,
    /// Create a new pool even if its files could outgrow the host filesystem's free space.
    pub overcommit_host: bool,
    /// How often a backup is taken while serving; zero: never.
    pub backup_interval: std::time::Duration,
    /// How many backups are kept (the newest).
    pub backup_keep: usize,
    /// dm: repair damaged metadata at start instead of refusing to serve.
    pub auto_repair: bool,
}

/// Default of `backup-interval`: a few backups a day cost little (a metadata dump and a
/// store copy) and bound what a lost metadata device loses.
pub const DEFAULT_BACKUP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
pub const DEFAULT_BACKUP_KEEP: usize = 5;

/// Parses `90s`, `30m`, `6h`, `1d` or a plain number of seconds; `0` is zero (off).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m, h or d (\"6h\")"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: too long"))
}

fn percent(key: &'static str, v: Option<PercentValue>) -> Result<Option<Percent>, ConfigError> {
    match v {
        None => Ok(None),
        Some(PercentValue::Number(n)) => Ok(Some(Percent(n))),
        Some(PercentValue::Text(s)) => s.parse().map(Some).map_err(|e| ConfigError::Value {
            key,
            message: format!("{e}"),
        }),
    }
}

fn size(key: &'static str, v: Option<SizeValue>) -> Result<Option<Bytes>, ConfigError> {
    match v {
        None => Ok(None),
        Some(SizeValue::Number(n)) => Ok(Some(Bytes(n))),
        Some(SizeValue::Text(s)) => s.parse().map(Some).map_err(|e| ConfigError::Value {
            key,
            message: format!("{e}"),
        }),
    }
}

/// An autoextend policy from its three settings (flag over file), if any was given: the
/// ones not given take [`AutoextendPolicy::OFF`]'s values.
fn policy(
    what: &'static str,
    threshold: (&'static str, Option<Percent>, Option<PercentValue>),
    step: (&'static str, Option<Percent>, Option<PercentValue>),
    max: (&'static str, Option<Bytes>, Option<SizeValue>),
) -> Result<Option<AutoextendPolicy>, ConfigError> {
    let threshold = threshold
        .1
        .map_or_else(|| percent(threshold.0, threshold.2), |v| Ok(Some(v)))?;
    let step = step
        .1
        .map_or_else(|| percent(step.0, step.2), |v| Ok(Some(v)))?;
    let max = max.1.map_or_else(|| size(max.0, max.2), |v| Ok(Some(v)))?;
    if threshold.is_none() && step.is_none() && max.is_none() {
        return Ok(None);
    }
    let p = AutoextendPolicy {
        threshold: threshold.unwrap_or(AutoextendPolicy::OFF.threshold),
        percent: step.unwrap_or(AutoextendPolicy::OFF.percent),
        max: max.or(AutoextendPolicy::OFF.max),
    };
    p.validate(what).map_err(|e| ConfigError::Value {
        key: if what == "data" {
            "autoextend"
        } else {
            "metadata-autoextend"
        },
        message: e.to_string(),
    })?;
    Ok(Some(p))
}

fn backend(s: &str) -> Result<BackendChoice, ConfigError> {
    match s {
        "auto" => Ok(BackendChoice::Auto),
        "dm" => Ok(BackendChoice::Dm),
        "reflink" => Ok(BackendChoice::Reflink),
        "sim" => Ok(BackendChoice::Sim),
        other => Err(ConfigError::Value {
            key: "backend",
            message: format!("{other:?}: expected auto, dm, reflink or sim"),
        }),
    }
}

impl Config {
    /// Flags override the file; the file overrides defaults.
    pub fn merge(flags: Flags, file: FileConfig) -> Result<Config, ConfigError> {
        let fs = match flags.fs {
            Some(f) => Some(f),
            None => file
                .fs
                .map(|s| {
                    s.parse::<FsType>().map_err(|e| ConfigError::Value {
                        key: "fs",
                        message: e.to_string(),
                    })
                })
                .transpose()?,
        };
        let min_free_space = flags.min_free_space.map_or_else(
            || percent("min-free-space", file.min_free_space),
            |v| Ok(Some(v)),
        )?;
        let autoextend_data = policy(
            "data",
            (
                "autoextend-threshold",
                flags.autoextend_threshold,
                file.autoextend_threshold,
            ),
            (
                "autoextend-percent",
                flags.autoextend_percent,
                file.autoextend_percent,
            ),
            ("autoextend-max", flags.autoextend_max, file.autoextend_max),
        )?;
        let autoextend_metadata = policy(
            "metadata",
            (
                "metadata-autoextend-threshold",
                flags.metadata_autoextend_threshold,
                file.metadata_autoextend_threshold,
            ),
            (
                "metadata-autoextend-percent",
                flags.metadata_autoextend_percent,
                file.metadata_autoextend_percent,
            ),
            (
                "metadata-autoextend-max",
                flags.metadata_autoextend_max,
                file.metadata_autoextend_max,
            ),
        )?;
        let max_device_overcommit = flags
            .max_device_overcommit
            .or(file.max_device_overcommit)
            .unwrap_or(crate::DEFAULT_MAX_DEVICE_OVERCOMMIT);
        if !(max_device_overcommit.is_finite() && max_device_overcommit > 0.0)
            || max_device_overcommit > 1000.0
        {
            return Err(ConfigError::Value {
                key: "max-device-overcommit",
                message: format!("{max_device_overcommit}: must be above 0 and at most 1000"),
            });
        }
        let backup_interval = match (flags.backup_interval, file.backup_interval) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(&s).map_err(|message| ConfigError::Value {
                key: "backup-interval",
                message,
            })?,
            (None, None) => DEFAULT_BACKUP_INTERVAL,
        };
        let backup_keep = flags
            .backup_keep
            .or(file.backup_keep)
            .unwrap_or(DEFAULT_BACKUP_KEEP);
        if backup_keep == 0 {
            return Err(ConfigError::Value {
                key: "backup-keep",
                message: "must be at least 1 (turn backups off with backup-interval = \"0\")"
                    .into(),
            });
        }
        Ok(Config {
            backup_interval,
            backup_keep,
            auto_repair: flags.auto_repair || file.auto_repair.unwrap_or(false),
            max_device_overcommit,
            overcommit_host: flags.overcommit_host || file.overcommit_host.unwrap_or(false),
            min_free_space,
            autoextend_data,
            autoextend_metadata,
            metrics_per_device: flags.metrics_per_device
                || file.metrics_per_device.unwrap_or(false),
            root: flags
                .root
                .or(file.root)
                .unwrap_or_else(|| DEFAULT_ROOT.into()),
            socket: flags
                .socket
                .or(file.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            backend: backend(
                flags
                    .backend
                    .as_deref()
                    .or(file.backend.as_deref())
                    .unwrap_or("auto"),
            )?,
            data_size: flags
                .data_size
                .map_or_else(|| size("data-size", file.data_size), |v| Ok(Some(v)))?,
            metadata_size: flags.metadata_size.map_or_else(
                || size("metadata-size", file.metadata_size),
                |v| Ok(Some(v)),
            )?,
            base_size: flags
                .base_size
                .map_or_else(|| size("base-size", file.base_size), |v| Ok(Some(v)))?,
            block_size: flags
                .block_size
                .map_or_else(|| size("block-size", file.block_size), |v| Ok(Some(v)))?,
            fs,
            metrics_addr: flags
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.into()),
            socket_group: flags.socket_group.or(file.socket_group),
            imagefs_dir: flags
                .imagefs_dir
                .or(file.imagefs_dir)
                .unwrap_or_else(|| DEFAULT_IMAGEFS_DIR.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let file = FileConfig::parse(
            r#"
            root = "/srv/pool"
            data-size = "8G"
            metadata_size = 67108864
            fs = "xfs"
            socket-group = "docker"
            "#,
        )
        .unwrap();
        let flags = Flags {
            data_size: Some(Bytes::gib(4)),
            ..Flags::default()
        };
        assert_eq!(
            parse_duration("6h"),
            Ok(std::time::Duration::from_secs(21_600))
        );
        assert_eq!(parse_duration("0"), Ok(std::time::Duration::ZERO));
        assert!(parse_duration("5y").is_err());
        let c = Config::merge(flags, file).unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/pool"));
        assert_eq!(c.data_size, Some(Bytes::gib(4)));
        assert_eq!(c.metadata_size, Some(Bytes::mib(64)));
        assert_eq!(c.fs, Some(FsType::Xfs));
        assert_eq!(c.base_size, None, "unset settings stay unset");
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.socket_group.as_deref(), Some("docker"));
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.metrics_addr, DEFAULT_METRICS_ADDR);
    }

    #[test]
    fn bad_files_are_refused_with_the_key() {
        assert!(FileConfig::parse("nosuchkey = 1").is_err());
        let e = Config::merge(
            Flags::default(),
            FileConfig::parse(r#"base-size = "10X""#).unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("base-size"), "{e}");
        let e = Config::merge(
            Flags::default(),
            FileConfig::parse(r#"backend = "lvm""#).unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("backend"), "{e}");
    }

    #[test]
    fn space_settings_from_flags_and_file() {
        let c = Config::merge(Flags::default(), FileConfig::default()).unwrap();
        assert_eq!(c.min_free_space, None);
        assert_eq!(c.autoextend_data, None, "not given: the pool keeps its own");
        let file = FileConfig::parse(
            r#"
            min-free-space = "5%"
            autoextend_threshold = 70
            autoextend-max = "200G"
            "#,
        )
        .unwrap();
        let flags = Flags {
            autoextend_threshold: Some(Percent(80)),
            ..Flags::default()
        };
        let c = Config::merge(flags, file).unwrap();
        assert_eq!(c.min_free_space, Some(Percent(5)));
        assert_eq!(
            c.autoextend_data,
            Some(AutoextendPolicy {
                threshold: Percent(80),
                percent: AutoextendPolicy::OFF.percent,
                max: Some(Bytes::gib(200)),
            })
        );
        let e = Config::merge(
            Flags::default(),
            FileConfig::parse("autoextend-threshold = 20").unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("threshold"), "{e}");
        assert_eq!(c.autoextend_metadata, None, "metadata keys not given");
    }

    #[test]
    fn metadata_autoextend_and_per_device_metrics() {
        let file = FileConfig::parse(
            r#"
            metadata-autoextend-threshold = 75
            metadata_autoextend_max = "1G"
            metrics-per-device = true
            "#,
        )
        .unwrap();
        let flags = Flags {
            metadata_autoextend_percent: Some(Percent(50)),
            ..Flags::default()
        };
        let c = Config::merge(flags, file).unwrap();
        assert_eq!(
            c.autoextend_metadata,
            Some(AutoextendPolicy {
                threshold: Percent(75),
                percent: Percent(50),
                max: Some(Bytes::gib(1)),
            })
        );
        assert_eq!(c.autoextend_data, None, "data keys not given");
        assert!(c.metrics_per_device);
        let c = Config::merge(Flags::default(), FileConfig::default()).unwrap();
        assert!(!c.metrics_per_device, "off by default");
        let e = Config::merge(
            Flags::default(),
            FileConfig::parse("metadata-autoextend-percent = 0").unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("metadata-autoextend"), "{e}");
    }
}
