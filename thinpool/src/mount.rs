//! Mounts: the one place that mounts and unmounts filesystems (the reflink pool's XFS, the
//! short-lived scratch mounts of device filesystems, [`MountSpec`]s for tests and tools),
//! keeps them from propagating, and reads the mount table.
//!
//! Propagation: `/var/lib` usually lies under a shared mount (systemd's default for `/`),
//! and a mount made there is copied into every peer namespace (container runtimes,
//! services with their own namespaces) at once, where it keeps its device busy and a
//! client's filesystem visible. Making the mount private afterwards is too late. So every
//! mount here goes onto a private bind of its mount point onto itself
//! ([`private_mount_point`]): the bind propagates, but holds nothing of ours.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use tracing::warn;

use crate::error::{Error, Result};
use crate::fsutil;
use crate::model::{FsType, MountSpec};

/// Mounts a device as a [`MountSpec`] says. Flag-like options (`ro`, `nosuid`, ...) become
/// mount flags; the rest are passed to the filesystem.
pub fn mount(spec: &MountSpec, target: &Path) -> Result<()> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &spec.options {
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
    let data = data.join(",");
    nix::mount::mount(
        Some(spec.source.as_path()),
        target,
        Some(spec.fs_type.to_string().as_str()),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| Error::io("mount", target, e.into()))
}

/// Unmounts `target`; `FailedPrecondition` when it is busy.
pub fn unmount(target: &Path) -> Result<()> {
    nix::mount::umount2(target, MntFlags::empty()).map_err(|e| match e {
        nix::errno::Errno::EBUSY => Error::FailedPrecondition(format!(
            "{} is busy and cannot be unmounted",
            target.display()
        )),
        e => Error::io("unmount", target, e.into()),
    })
}

/// Unmounts whatever is mounted at `mnt` (canonical), up to `depth` stacked mounts, and
/// stops when nothing is. Errors as [`unmount`].
pub fn unmount_all(mnt: &Path, depth: usize) -> Result<()> {
    for _ in 0..depth {
        if visible_mount(mnt)?.is_none() {
            break;
        }
        unmount(mnt)?;
    }
    Ok(())
}

/// Makes `dir` (canonical) a private mount point: a bind of itself unless it is one already
/// ([`is_own_bind`]), then `MS_PRIVATE`. A mount made on it afterwards has a private parent,
/// so it is private too and is copied nowhere.
pub fn private_mount_point(dir: &Path) -> Result<()> {
    if !is_own_bind(dir)? {
        bind_self(dir)?;
    }
    make_private(dir)
}

fn bind_self(dir: &Path) -> Result<()> {
    nix::mount::mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| Error::io("bind a mount point onto itself", dir, e.into()))
}

fn make_private(dir: &Path) -> Result<()> {
    nix::mount::mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::io("make a mount point private", dir, e.into()))
}

/// Mounts `dev` with filesystem `fs_type` at `target` (canonical) on a
/// [`private_mount_point`].
pub fn mount_private(
    dev: &Path,
    target: &Path,
    fs_type: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    private_mount_point(target)?;
    nix::mount::mount(Some(dev), target, Some(fs_type), flags, data)
        .map_err(|e| Error::io("mount", dev, e.into()))
}

/// A device's filesystem mounted for a moment at a scratch directory (a resize, a journal
/// replay, removing `lost+found`): on a private bind of the directory, with nosuid, nodev
/// and noexec, since the filesystem is a client's image. [`ScratchMount::unmount`] takes it
/// down and removes the directory; dropping it does the same, logging errors. A crash leaves
/// it to [`clear_scratch`].
pub struct ScratchMount {
    path: PathBuf,
    dev: PathBuf,
    /// Layers still mounted at `path`: the bind, then the device's filesystem.
    layers: usize,
}

impl ScratchMount {
    const FLAGS: MsFlags = MsFlags::MS_NOSUID
        .union(MsFlags::MS_NODEV)
        .union(MsFlags::MS_NOEXEC);

    /// Mounts `dev` at `path` (made with mode 0700 if missing), read-only if asked, with
    /// filesystem options `data`. On failure nothing stays mounted.
    pub fn new(
        dev: &Path,
        path: &Path,
        fs: FsType,
        read_only: bool,
        data: Option<&str>,
    ) -> Result<ScratchMount> {
        fsutil::create_private_dir(path).map_err(|e| Error::io("create mount point", path, e))?;
        let path = fs::canonicalize(path).map_err(|e| Error::io("resolve path", path, e))?;
        let mut scratch = ScratchMount {
            dev: dev.to_path_buf(),
            path,
            layers: 0,
        };
        // A fresh directory: bound without looking at the mount table first.
        bind_self(&scratch.path)?;
        scratch.layers = 1;
        make_private(&scratch.path)?;
        let flags = Self::FLAGS
            | if read_only {
                MsFlags::MS_RDONLY
            } else {
                MsFlags::empty()
            };
        nix::mount::mount(
            Some(dev),
            &scratch.path,
            Some(fs.to_string().as_str()),
            flags,
            data,
        )
        .map_err(|e| Error::io("mount", dev, e.into()))?;
        scratch.layers = 2;
        Ok(scratch)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remounts the filesystem read-write (same flags and options otherwise).
    pub fn remount_rw(&self) -> Result<()> {
        nix::mount::mount(
            None::<&str>,
            &self.path,
            None::<&str>,
            Self::FLAGS | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(|e| Error::io("remount read-write", &self.dev, e.into()))
    }

    /// Unmounts and removes the mount point. A plain unmount that fails (a transient
    /// opener) is followed by a lazy one (`MNT_DETACH`), with a warning, so that no mount
    /// stays in the namespace; only when that fails too is it an error.
    pub fn unmount(mut self) -> Result<()> {
        self.take_down()
    }

    fn take_down(&mut self) -> Result<()> {
        while self.layers > 0 {
            let plain = nix::mount::umount2(&self.path, MntFlags::empty());
            if let Err(e) = plain {
                warn!(path = %self.path.display(), dev = %self.dev.display(), error = %e,
                    "cannot unmount a scratch mount; detaching it lazily");
                nix::mount::umount2(&self.path, MntFlags::MNT_DETACH)
                    .map_err(|e| Error::io("unmount a scratch mount", &self.path, e.into()))?;
            }
            self.layers -= 1;
        }
        fs::remove_dir(&self.path).map_err(|e| Error::io("remove mount point", &self.path, e))
    }
}

impl Drop for ScratchMount {
    fn drop(&mut self) {
        if (self.layers > 0 || self.path.exists())
            && let Err(e) = self.take_down()
        {
            warn!(path = %self.path.display(), error = %e, "scratch mount left behind");
        }
    }
}

/// Removes every scratch mount and mount point under `dir` (`<root>/resize`) that a crash
/// left: lazy unmounts (repeated, for stacked mounts), then rmdir. Returns the paths
/// cleared. Best effort: a failure is logged and the rest are still tried; the engine's
/// rollback of the device then reports what is still busy.
pub fn clear_scratch(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut cleared = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let mut detached = false;
        // EINVAL: not a mount point (any more).
        for _ in 0..8 {
            match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
                Ok(()) => detached = true,
                Err(nix::errno::Errno::EINVAL) => break,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot detach a scratch mount");
                    break;
                }
            }
        }
        if detached {
            warn!(path = %path.display(),
                "detached a scratch mount a crash left (an interrupted filesystem change)");
        }
        match fs::remove_dir(&path) {
            Ok(()) => cleared.push(path),
            Err(e) => warn!(path = %path.display(), error = %e,
                "cannot remove a scratch mount point"),
        }
    }
    cleared
}

/// The source of the visible mount at `mnt` (canonical), if something is mounted there.
pub fn mounted_source(mnt: &Path) -> Result<Option<String>> {
    Ok(visible_mount(mnt)?.map(|m| m.source))
}

/// Whether the visible mount at `mnt` (canonical) is a bind of the directory's own
/// filesystem: a [`private_mount_point`] with nothing mounted on it.
pub fn is_own_bind(mnt: &Path) -> Result<bool> {
    let Some(m) = visible_mount(mnt)? else {
        return Ok(false);
    };
    let parent = mnt.parent().unwrap_or(Path::new("/"));
    let st = nix::sys::stat::stat(parent)
        .map_err(|e| Error::io("stat", parent, std::io::Error::from(e)))?;
    let parent_dev = format!(
        "{}:{}",
        nix::sys::stat::major(st.st_dev),
        nix::sys::stat::minor(st.st_dev)
    );
    Ok(m.dev == parent_dev)
}

/// The first mount point (in this process's mount table) of the block device
/// `major:minor`, if it is mounted.
pub fn mount_point_of(major: u32, minor: u32) -> Result<Option<PathBuf>> {
    let want = format!("{major}:{minor}");
    Ok(mountinfo()?
        .into_iter()
        .find(|m| m.dev == want)
        .map(|m| m.point))
}

/// One line of `/proc/self/mountinfo`.
struct MountInfo {
    /// `major:minor` of the mounted filesystem.
    dev: String,
    point: PathBuf,
    source: String,
}

fn mountinfo() -> Result<Vec<MountInfo>> {
    let path = "/proc/self/mountinfo";
    let text = fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    Ok(text.lines().filter_map(parse_mountinfo).collect())
}

/// Fields: id parent major:minor root mount-point options [optional...] - fstype source ...
fn parse_mountinfo(line: &str) -> Option<MountInfo> {
    let mut fields = line.split(' ');
    let dev = fields.nth(2)?;
    let point = fields.nth(1)?;
    let mut rest = fields.skip_while(|f| *f != "-").skip(2);
    Some(MountInfo {
        dev: dev.to_string(),
        point: PathBuf::from(unescape_mountinfo(point)),
        source: rest.next().map(unescape_mountinfo).unwrap_or_default(),
    })
}

/// The visible mount at `mnt` (canonical), if any: the last one listed there.
fn visible_mount(mnt: &Path) -> Result<Option<MountInfo>> {
    Ok(mountinfo()?.into_iter().rev().find(|m| m.point == mnt))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    /// A scratch mount under a shared mount with a peer is not copied into the peer, has
    /// nosuid, nodev and noexec, and a busy one is still gone after `unmount` (lazily), with
    /// its mount point (review #17, #32).
    #[test]
    fn scratch_mounts_are_private_restricted_and_never_left() {
        use crate::loopback::{self, LoopOptions};
        let _serial = loopback::loop_test_guard();
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP scratch_mounts_are_private_restricted_and_never_left: needs root");
            return;
        }
        let base = std::env::var_os("THINPOOL_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let dir = base.join(format!("mount-scratch-{}", std::process::id()));
        let shared = dir.join("shared");
        let peer = dir.join("peer");
        fs::create_dir_all(&shared).unwrap();
        fs::create_dir_all(&peer).unwrap();
        let dir = fs::canonicalize(&dir).unwrap();
        let (shared, peer) = (dir.join("shared"), dir.join("peer"));
        struct Cleanup(Vec<PathBuf>, Option<PathBuf>, PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                for m in self.0.iter().rev() {
                    let _ = nix::mount::umount2(m, MntFlags::MNT_DETACH);
                }
                if let Some(dev) = &self.1 {
                    let _ = loopback::detach(dev);
                }
                let _ = fs::remove_dir_all(&self.2);
            }
        }
        let mut cleanup = Cleanup(Vec::new(), None, dir.clone());
        bind_self(&shared).unwrap();
        cleanup.0.push(shared.clone());
        nix::mount::mount(
            None::<&str>,
            &shared,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap();
        // A bind of a shared mount joins its peer group.
        nix::mount::mount(
            Some(&shared),
            &peer,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        cleanup.0.push(peer.clone());

        let image = dir.join("image");
        loopback::create_sparse(&image, 64 << 20).unwrap();
        let dev = loopback::attach(&image, LoopOptions::POOL_FILE).unwrap();
        cleanup.1 = Some(dev.clone());
        crate::fsutil::mkfs(FsType::Ext4, &dev, &[]).unwrap();

        let at = shared.join("scratch");
        let m = ScratchMount::new(&dev, &at, FsType::Ext4, false, None).unwrap();
        let (major, minor) = loopback::dev_numbers(&dev).unwrap();
        let lines: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(2) == Some(&format!("{major}:{minor}")))
            .map(str::to_string)
            .collect();
        assert_eq!(lines.len(), 1, "mounted once, not in the peer: {lines:#?}");
        let opts: Vec<&str> = lines[0].split(' ').nth(5).unwrap().split(',').collect();
        for o in ["nosuid", "nodev", "noexec", "rw"] {
            assert!(opts.contains(&o), "{o} missing: {}", lines[0]);
        }
        assert_eq!(mount_point_of(major, minor).unwrap(), Some(at.clone()));

        // Busy (an open file in it): the plain unmount fails, the lazy one does not.
        let busy = File::create(at.join("open")).unwrap();
        m.unmount().unwrap();
        assert_eq!(mount_point_of(major, minor).unwrap(), None);
        assert!(visible_mount(&at).unwrap().is_none());
        assert!(!at.exists(), "mount point left");
        drop(busy);

        // Read-only, then read-write; dropped without unmount: taken down all the same.
        let m = ScratchMount::new(&dev, &at, FsType::Ext4, true, None).unwrap();
        assert!(
            File::create(m.path().join("x")).is_err(),
            "read-only mount took a file"
        );
        m.remount_rw().unwrap();
        File::create(m.path().join("x")).unwrap();
        drop(m);
        assert_eq!(mount_point_of(major, minor).unwrap(), None);
        assert!(!at.exists(), "mount point left");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/var/tmp/a\040b"), "/var/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    #[test]
    fn mountinfo_lines() {
        let m = parse_mountinfo(
            "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - xfs /dev/loop3 rw,logdev=/dev/loop4",
        )
        .unwrap();
        assert_eq!(m.dev, "98:0");
        assert_eq!(m.point, Path::new("/mnt/a b"));
        assert_eq!(m.source, "/dev/loop3");
        // No optional fields.
        let m = parse_mountinfo("1 0 8:1 / / rw - ext4 /dev/sda1 rw").unwrap();
        assert_eq!((m.dev.as_str(), m.source.as_str()), ("8:1", "/dev/sda1"));
        assert!(parse_mountinfo("garbage").is_none());
    }
}
