//! Pool settings: from a [`PoolSpec`] to checked [`PoolSettings`], conflicts between a spec
//! and an existing pool, grow plans, and durable changes of the settings.

use std::path::Path;

use tracing::warn;

use crate::backend;
use crate::error::{Error, Result};
use crate::model::{BackendKind, FsType, GrowRequest, PoolSettings, PoolSize, PoolSpec};
use crate::units::Bytes;

use super::{Pool, now_ns};

impl Pool {
    /// Changes the settings durably, then in memory.
    pub(super) fn record_settings(&self, change: impl FnOnce(&mut PoolSettings)) -> Result<()> {
        // Held across the (short) store write so memory and store never disagree.
        let mut cur = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = cur.clone();
        change(&mut next);
        self.store.write(|w| w.set_settings(&next))?;
        *cur = next;
        Ok(())
    }
}

pub(crate) fn settings_from_spec(spec: &PoolSpec) -> Result<PoolSettings> {
    let backend = spec.backend.unwrap_or_else(|| backend::detect().0);
    let fs = spec.fs.unwrap_or(FsType::Ext4);
    let s = PoolSettings {
        backend,
        data_size: spec.data_size.unwrap_or(PoolSettings::DEFAULT_DATA_SIZE),
        metadata_size: spec
            .metadata_size
            .unwrap_or(PoolSettings::DEFAULT_METADATA_SIZE),
        block_size: spec.block_size.unwrap_or(PoolSettings::DEFAULT_BLOCK_SIZE),
        base_size: spec.base_size.unwrap_or(PoolSettings::DEFAULT_BASE_SIZE),
        fs,
        mkfs_options: spec
            .mkfs_options
            .clone()
            .unwrap_or_else(|| PoolSettings::default_mkfs_options(fs)),
        mount_options: spec.mount_options.clone().unwrap_or_default(),
        error_if_no_space: spec.error_if_no_space.unwrap_or(true),
        min_free_space: spec
            .min_free_space
            .unwrap_or(PoolSettings::DEFAULT_MIN_FREE_SPACE),
        autoextend_data: spec.autoextend_data.unwrap_or_default(),
        autoextend_metadata: spec.autoextend_metadata.unwrap_or_default(),
        tag: random_tag(),
    };
    check_space_settings(&s)?;
    let bs = s.block_size.0;
    if bs < Bytes::kib(64).0 || bs > Bytes::gib(1).0 || !bs.is_multiple_of(Bytes::kib(64).0) {
        return Err(Error::InvalidArgument(format!(
            "block size {}: must be a multiple of 64 KiB between 64 KiB and 1 GiB",
            s.block_size
        )));
    }
    if s.data_size.0 < 16 * bs || !s.data_size.0.is_multiple_of(bs) {
        return Err(Error::InvalidArgument(format!(
            "data size {}: must be a multiple of the block size and at least 16 blocks",
            s.data_size
        )));
    }
    if s.metadata_size < Bytes::mib(2) || !s.metadata_size.0.is_multiple_of(4096) {
        return Err(Error::InvalidArgument(format!(
            "metadata size {}: must be a multiple of 4 KiB and at least 2 MiB",
            s.metadata_size
        )));
    }
    if s.base_size < Bytes::mib(16) || !s.base_size.0.is_multiple_of(4096) {
        return Err(Error::InvalidArgument(format!(
            "base size {}: must be a multiple of 4 KiB and at least 16 MiB",
            s.base_size
        )));
    }
    Ok(s)
}

/// Checks the settings in `spec` that apply to new and existing pools alike (the free-space
/// guard, the autoextend policies) without touching the filesystem, so that a daemon can
/// refuse a bad setting before it creates anything. [`Pool::open`] checks them again.
pub fn check_spec_settings(spec: &PoolSpec) -> Result<()> {
    check_space_settings(&PoolSettings {
        min_free_space: spec
            .min_free_space
            .unwrap_or(PoolSettings::DEFAULT_MIN_FREE_SPACE),
        autoextend_data: spec.autoextend_data.unwrap_or_default(),
        autoextend_metadata: spec.autoextend_metadata.unwrap_or_default(),
        backend: BackendKind::Reflink,
        data_size: PoolSettings::DEFAULT_DATA_SIZE,
        metadata_size: PoolSettings::DEFAULT_METADATA_SIZE,
        block_size: PoolSettings::DEFAULT_BLOCK_SIZE,
        base_size: PoolSettings::DEFAULT_BASE_SIZE,
        fs: FsType::Ext4,
        mkfs_options: Vec::new(),
        mount_options: Vec::new(),
        error_if_no_space: true,
        tag: String::new(),
    })
}

/// Checks the settings of the space guard and autoextension.
pub(super) fn check_space_settings(s: &PoolSettings) -> Result<()> {
    if s.min_free_space.0 > 50 {
        return Err(Error::InvalidArgument(format!(
            "min_free_space {}: must be 0% (off) to 50%",
            s.min_free_space
        )));
    }
    s.autoextend_data.validate("data")?;
    s.autoextend_metadata.validate("metadata")?;
    let a = s.autoextend_data;
    if a.enabled() && 100 - a.threshold.0 < s.min_free_space.0 {
        warn!(threshold = %a.threshold, min_free_space = %s.min_free_space,
            "the data autoextend threshold is above what the free-space guard allows: \
             snapshots will be refused before the pool autoextends");
    }
    Ok(())
}

/// The new sizes a grow request asks for, checked; see [`Pool::grow`] for the rules.
/// `files` are the pool files' lengths: a failed grow may have left a file longer than the
/// recorded size, and a file never shrinks, so the current size is the larger of the two.
pub(super) fn plan_grow(
    s: &PoolSettings,
    files: PoolSize,
    req: &GrowRequest,
    metadata_grows: bool,
) -> Result<PoolSize> {
    if req.data.is_none() && req.metadata.is_none() {
        return Err(Error::InvalidArgument(
            "nothing to grow: give a new data size, a new metadata size, or both".into(),
        ));
    }
    let mut s = s.clone();
    s.data_size = s.data_size.max(files.data);
    s.metadata_size = s.metadata_size.max(files.metadata);
    let mut after = PoolSize {
        data: s.data_size,
        metadata: s.metadata_size,
    };
    if let Some(change) = req.data {
        let new = change.apply(s.data_size)?;
        if new <= s.data_size {
            return Err(Error::InvalidArgument(format!(
                "data size {new} ({change}) is not above the pool's {}: a pool can grow, \
                 never shrink",
                s.data_size
            )));
        }
        if !new.0.is_multiple_of(s.block_size.0) {
            return Err(Error::InvalidArgument(format!(
                "data size {new} is not a multiple of the pool's block size {}",
                s.block_size
            )));
        }
        after.data = new;
    }
    if let Some(change) = req.metadata {
        if !metadata_grows {
            return Err(Error::FailedPrecondition(format!(
                "the {} backend's metadata cannot grow: its metadata file holds the XFS log, \
                 which cannot grow online and never fills up (it is circular); grow the data \
                 only",
                s.backend
            )));
        }
        let new = change.apply(s.metadata_size)?;
        if new <= s.metadata_size {
            return Err(Error::InvalidArgument(format!(
                "metadata size {new} ({change}) is not above the pool's {}: a pool can grow, \
                 never shrink",
                s.metadata_size
            )));
        }
        if !new.0.is_multiple_of(4096) {
            return Err(Error::InvalidArgument(format!(
                "metadata size {new} is not a multiple of 4 KiB"
            )));
        }
        if new > PoolSettings::MAX_METADATA_SIZE {
            return Err(Error::InvalidArgument(format!(
                "metadata size {new} is above dm-thin's maximum of {}; the kernel would not \
                 use the rest",
                PoolSettings::MAX_METADATA_SIZE
            )));
        }
        after.metadata = new;
    }
    Ok(after)
}

/// Refuses a new pool whose files could come to take more than the host filesystem holding
/// `root` has free: the metadata file is allocated at once, the data file as the pool fills.
pub(super) fn check_room_for_create(root: &Path, s: &PoolSettings) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(root).map_err(|e| Error::io("statfs", root, e.into()))?;
    let free = Bytes(st.blocks_available().saturating_mul(st.fragment_size()));
    let need = Bytes(s.data_size.0.saturating_add(s.metadata_size.0));
    if need > free {
        return Err(Error::ResourceExhausted(format!(
            "a pool of {} data and {} metadata could take {need} on the filesystem holding \
             {}, which has {free} free; give smaller sizes, free space there, or create it \
             with --overcommit-host (the data file is sparse: it takes space only as the \
             pool fills, and a full host filesystem then fails containers' writes)",
            s.data_size,
            s.metadata_size,
            root.display()
        )));
    }
    Ok(())
}

/// Fails with `ResourceExhausted` when `need` (what grown files could take) is above `free`
/// on the filesystem holding `dir`.
pub(super) fn host_has_room(dir: &Path, need: Bytes, free: Bytes) -> Result<()> {
    if need > free {
        return Err(Error::ResourceExhausted(format!(
            "the grown pool files could take {need} more on the filesystem holding {}, which \
             has {free} free; free space there, or grow with force to overcommit the host \
             (the files are sparse: they take space only as the pool fills)",
            dir.display()
        )));
    }
    Ok(())
}

/// 8 hex digits from the kernel's random source, naming this pool's kernel objects.
fn random_tag() -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to time and pid; uniqueness across pools on one host is all we need.
        let x = now_ns() as u32 ^ std::process::id();
        b = x.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fails with a [`Error::SettingConflict`] naming the first setting in `spec` that differs
/// from the pool's.
pub(super) fn check_spec(spec: &PoolSpec, s: &PoolSettings) -> Result<()> {
    fn conflict<T: PartialEq + std::fmt::Debug>(
        setting: &'static str,
        requested: &Option<T>,
        on_disk: &T,
    ) -> Result<()> {
        match requested {
            Some(r) if r != on_disk => Err(Error::SettingConflict {
                setting,
                on_disk: format!("{on_disk:?}"),
                requested: format!("{r:?}"),
            }),
            _ => Ok(()),
        }
    }
    /// A size asked for at open may be below the pool's: it was the creation size, and the
    /// pool has grown since. One above it would be a grow, which open does not do.
    fn at_most(setting: &'static str, requested: &Option<Bytes>, on_disk: &Bytes) -> Result<()> {
        match requested {
            Some(r) if r > on_disk => Err(Error::SettingConflict {
                setting,
                on_disk: format!("{on_disk} ({} bytes)", on_disk.0),
                requested: format!(
                    "{r} ({} bytes; grow the pool to change its size: thinctl pool grow)",
                    r.0
                ),
            }),
            _ => Ok(()),
        }
    }
    conflict("backend", &spec.backend, &s.backend)?;
    at_most("data_size", &spec.data_size, &s.data_size)?;
    at_most("metadata_size", &spec.metadata_size, &s.metadata_size)?;
    conflict("block_size", &spec.block_size, &s.block_size)?;
    conflict("base_size", &spec.base_size, &s.base_size)?;
    conflict("fs", &spec.fs, &s.fs)?;
    conflict("mkfs_options", &spec.mkfs_options, &s.mkfs_options)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::model::AutoextendPolicy;

    fn settings(backend: BackendKind) -> PoolSettings {
        settings_from_spec(&PoolSpec {
            root: PathBuf::from("/nonexistent"),
            backend: Some(backend),
            data_size: Some(Bytes::mib(512)),
            metadata_size: Some(Bytes::mib(64)),
            ..PoolSpec::default()
        })
        .unwrap()
    }

    fn grow(data: Option<&str>, metadata: Option<&str>) -> GrowRequest {
        GrowRequest {
            data: data.map(|s| s.parse().unwrap()),
            metadata: metadata.map(|s| s.parse().unwrap()),
            force: false,
        }
    }

    /// Pool files as long as the recorded sizes.
    fn files(s: &PoolSettings) -> PoolSize {
        PoolSize {
            data: s.data_size,
            metadata: s.metadata_size,
        }
    }

    /// A failed grow left the data file longer than recorded: the file's length is the
    /// current size, so a request between the two is refused as a shrink, with the file's
    /// size in the message, not left to fail later in the backend.
    #[test]
    fn grow_counts_a_file_longer_than_recorded() {
        let s = settings(BackendKind::Dm);
        let long = PoolSize {
            data: Bytes::mib(768),
            metadata: s.metadata_size,
        };
        let e = plan_grow(&s, long, &grow(Some("640M"), None), true).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("768 MiB")),
            "{e}"
        );
        let after = plan_grow(&s, long, &grow(Some("+256M"), None), true).unwrap();
        assert_eq!(after.data, Bytes::gib(1), "relative to the file's length");
    }

    #[test]
    fn grow_plans_new_sizes() {
        let s = settings(BackendKind::Dm);
        let after = plan_grow(&s, files(&s), &grow(Some("+512M"), Some("128M")), true).unwrap();
        assert_eq!(after.data, Bytes::gib(1));
        assert_eq!(after.metadata, Bytes::mib(128));
        let after = plan_grow(&s, files(&s), &grow(Some("1G"), None), true).unwrap();
        assert_eq!(after.metadata, Bytes::mib(64), "metadata unchanged");
    }

    #[test]
    fn grow_refuses_shrinking_misalignment_and_nothing() {
        let s = settings(BackendKind::Dm);
        for (data, metadata) in [
            (None, None),
            (Some("256M"), None),
            (Some("512M"), None),
            (Some("+4K"), None),
            (None, Some("32M")),
            (None, Some("+1000")),
            (None, Some("17G")),
        ] {
            let e = plan_grow(&s, files(&s), &grow(data, metadata), true).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument(_)),
                "{data:?} {metadata:?}: {e}"
            );
        }
        let e = plan_grow(&s, files(&s), &grow(Some("256M"), None), true).unwrap_err();
        assert!(e.to_string().contains("never shrink"), "{e}");
    }

    #[test]
    fn reflink_metadata_does_not_grow() {
        let s = settings(BackendKind::Reflink);
        let e = plan_grow(&s, files(&s), &grow(Some("+512M"), Some("+64M")), false).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert!(e.to_string().contains("XFS log"), "{e}");
    }

    #[test]
    fn host_room_is_checked_with_numbers() {
        let dir = Path::new("/var/lib/thinpool");
        assert!(host_has_room(dir, Bytes::gib(1), Bytes::gib(2)).is_ok());
        let e = host_has_room(dir, Bytes::gib(3), Bytes::gib(2)).unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("3 GiB") && msg.contains("2 GiB") && msg.contains("force"),
            "{msg}"
        );
    }

    #[test]
    fn space_settings_are_validated() {
        let mut s = settings(BackendKind::Dm);
        assert_eq!(s.min_free_space, PoolSettings::DEFAULT_MIN_FREE_SPACE);
        assert!(!s.autoextend_data.enabled(), "autoextend is off by default");
        s.min_free_space = crate::units::Percent(60);
        assert!(check_space_settings(&s).is_err());
    }

    #[test]
    fn settings_without_space_fields_get_defaults() {
        // A store written before min_free_space and autoextend existed.
        let mut v = serde_json::to_value(settings(BackendKind::Dm)).unwrap();
        let m = v.as_object_mut().unwrap();
        m.remove("min_free_space");
        m.remove("autoextend_data");
        m.remove("autoextend_metadata");
        let s: PoolSettings = serde_json::from_value(v).unwrap();
        assert_eq!(s.min_free_space, PoolSettings::DEFAULT_MIN_FREE_SPACE);
        assert_eq!(s.autoextend_data, AutoextendPolicy::OFF);
    }
}
