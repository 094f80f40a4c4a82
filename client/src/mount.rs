//! Mounting a snapshot as the daemon describes it (a containerd `Mount`: type, source,
//! options), for `thinctl mount`. Small on purpose: the daemon hands out one block-device
//! mount per snapshot, ext4 or xfs, with options such as `ro` (views, committed layers)
//! and `nouuid` (xfs: every snapshot carries the base filesystem's UUID).

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use thinpool_proto::types::Mount;

/// Why a mount or unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("filesystem {0:?}: expected ext4 or xfs")]
    FsType(String),
    #[error("{context} ({})", .path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Mount flags and filesystem data from mount options: flag-like options (`ro`, `nosuid`,
/// ...) become flags, the rest (`nouuid`, ...) go to the filesystem, comma-separated.
pub fn parse_options(options: &[String]) -> (MsFlags, Option<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            other => data.push(other),
        }
    }
    (flags, (!data.is_empty()).then(|| data.join(",")))
}

/// Mounts `m` at `target`. Only ext4 and xfs are accepted: the daemon hands out nothing
/// else, and a type is never passed through blindly.
pub fn mount(m: &Mount, target: &Path) -> Result<(), MountError> {
    if !matches!(m.r#type.as_str(), "ext4" | "xfs") {
        return Err(MountError::FsType(m.r#type.clone()));
    }
    let (flags, data) = parse_options(&m.options);
    nix::mount::mount(
        Some(Path::new(&m.source)),
        target,
        Some(m.r#type.as_str()),
        flags,
        data.as_deref(),
    )
    .map_err(|e| MountError::Io {
        context: "mount",
        path: target.to_path_buf(),
        source: e.into(),
    })
}

/// Unmounts `target`.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    nix::mount::umount2(target, MntFlags::empty()).map_err(|e| MountError::Io {
        context: "unmount",
        path: target.to_path_buf(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        // What the daemon hands out: an xfs view, an ext4 active snapshot.
        assert_eq!(
            parse_options(&opts(&["ro", "nouuid"])),
            (MsFlags::MS_RDONLY, Some("nouuid".into()))
        );
        assert_eq!(parse_options(&[]), (MsFlags::empty(), None));
        assert_eq!(
            parse_options(&opts(&[
                "nosuid", "nodev", "noexec", "noatime", "discard", "nouuid"
            ])),
            (
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME,
                Some("discard,nouuid".into())
            )
        );
        // The last of ro/rw wins.
        assert_eq!(parse_options(&opts(&["ro", "rw"])).0, MsFlags::empty());
    }

    #[test]
    fn only_block_filesystems_are_mounted() {
        let m = Mount {
            r#type: "bind".into(),
            source: "/".into(),
            target: String::new(),
            options: opts(&["rbind"]),
        };
        let e = mount(&m, Path::new("/nonexistent")).unwrap_err();
        assert_eq!(e.to_string(), "filesystem \"bind\": expected ext4 or xfs");
    }
}
