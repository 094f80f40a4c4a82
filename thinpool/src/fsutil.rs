//! Filesystems on thin devices: mkfs, superblock UUIDs, online grow, and running tools.
//!
//! Tools are run with an argument vector, never through a shell, and only ever with paths we
//! made: client strings never reach a command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};
use crate::model::FsType;

/// Debian package that ships each tool we run, for "install X" errors.
fn package_of(tool: &'static str) -> &'static str {
    match tool {
        "mkfs.ext4" | "resize2fs" | "e2fsck" => "e2fsprogs",
        "mkfs.xfs" | "xfs_growfs" => "xfsprogs",
        "thin_ls" | "thin_check" | "thin_dump" => "thin-provisioning-tools",
        _ => "(unknown)",
    }
}

/// Finds `tool` on PATH (or, when PATH is unset, in the usual bin and sbin directories).
pub fn find_tool(tool: &'static str) -> Result<std::path::PathBuf> {
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::MissingTool {
        tool,
        package: package_of(tool),
    })
}

/// Runs `tool` with `args` and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run(tool: &'static str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let exe = find_tool(tool)?;
    let out = Command::new(&exe)
        .args(args)
        .output()
        .map_err(|e| Error::io("run", &exe, e))?;
    if !out.status.success() {
        return Err(Error::Command {
            program: tool.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes a filesystem on `dev` with the extra `options` before the device argument.
pub fn mkfs(fs: FsType, dev: &Path, options: &[String]) -> Result<()> {
    let tool = match fs {
        FsType::Ext4 => "mkfs.ext4",
        FsType::Xfs => "mkfs.xfs",
    };
    let mut args: Vec<&std::ffi::OsStr> = vec!["-q".as_ref()];
    if fs == FsType::Ext4 {
        args.push("-F".as_ref());
    } else {
        args.push("-f".as_ref());
    }
    args.extend(options.iter().map(|o| std::ffi::OsStr::new(o.as_str())));
    args.push(dev.as_os_str());
    run(tool, &args).map(drop)
}

/// Reads the filesystem UUID from the superblock on `dev`, as 32 lowercase hex digits.
pub fn fs_uuid(fs: FsType, dev: &Path) -> Result<String> {
    // ext4: superblock at byte 1024, s_uuid at offset 0x68. xfs: superblock at 0, sb_uuid at 32.
    let (magic_at, magic, uuid_at): (u64, &[u8], u64) = match fs {
        FsType::Ext4 => (1024 + 0x38, &[0x53, 0xEF], 1024 + 0x68),
        FsType::Xfs => (0, b"XFSB", 32),
    };
    let mut f = File::open(dev).map_err(|e| Error::io("open device", dev, e))?;
    let mut read_at = |off: u64, buf: &mut [u8]| {
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(buf))
            .map_err(|e| Error::io("read superblock", dev, e))
    };
    let mut m = vec![0u8; magic.len()];
    read_at(magic_at, &mut m)?;
    if m != magic {
        return Err(Error::Inconsistent(format!(
            "{} holds no {fs} superblock",
            dev.display()
        )));
    }
    let mut uuid = [0u8; 16];
    read_at(uuid_at, &mut uuid)?;
    Ok(uuid.iter().map(|b| format!("{b:02x}")).collect())
}

/// Grows the filesystem on `dev` to fill the device. Precondition: nobody else has it
/// mounted (it is a snapshot we just made).
///
/// ext4 is grown offline (`e2fsck -f -p`, then `resize2fs`): online growth needs
/// CAP_SYS_RESOURCE, which containerised daemons often lack. e2fsck recreates `lost+found`,
/// so it is removed again ([`remove_lost_found`]). xfs grows only when mounted, so
/// it is mounted privately under `scratch` for `xfs_growfs`.
pub fn grow(fs: FsType, dev: &Path, scratch: &Path) -> Result<()> {
    match fs {
        FsType::Ext4 => {
            check_ext4(dev)?;
            run("resize2fs", &[dev.as_os_str()])?;
            // e2fsck -p makes a lost+found wherever it finds none; snapshots have none.
            remove_lost_found(fs, dev, scratch)
        }
        FsType::Xfs => {
            use nix::mount::{MntFlags, MsFlags, mount, umount2};
            std::fs::create_dir_all(scratch)
                .map_err(|e| Error::io("create mount point", scratch, e))?;
            mount(
                Some(dev),
                scratch,
                Some("xfs"),
                MsFlags::empty(),
                Some("nouuid"),
            )
            .map_err(|e| Error::io("mount for resize", dev, e.into()))?;
            let result = run("xfs_growfs", &[scratch.as_os_str()]);
            let unmounted = umount2(scratch, MntFlags::empty())
                .map_err(|e| Error::io("unmount after resize", scratch, e.into()));
            let _ = std::fs::remove_dir(scratch);
            result?;
            unmounted
        }
    }
}

/// Removes the empty `lost+found` that mkfs.ext4 (and e2fsck) leave in the root directory:
/// containerd expects a new snapshot to be empty, and the directory would otherwise show up
/// in every container and in every first layer exported from one. It is mounted privately
/// at `scratch` for the kernel to do it. A `lost+found` that holds something (files e2fsck
/// recovered) is kept. xfs has none. Precondition: nobody else has `dev` mounted.
pub fn remove_lost_found(fs: FsType, dev: &Path, scratch: &Path) -> Result<()> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    if fs != FsType::Ext4 {
        return Ok(());
    }
    std::fs::create_dir_all(scratch).map_err(|e| Error::io("create mount point", scratch, e))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // Read-only first: a base that has none (every open after the first) is not written.
    mount(
        Some(dev),
        scratch,
        Some("ext4"),
        flags | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| Error::io("mount to remove lost+found", dev, e.into()))?;
    let dir = scratch.join("lost+found");
    let removed = match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => mount(
            None::<&str>,
            scratch,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(|e| Error::io("remount read-write to remove lost+found", dev, e.into()))
        .and_then(|()| remove_empty_dir(&dir, dev)),
    };
    let unmounted = umount2(scratch, MntFlags::empty())
        .map_err(|e| Error::io("unmount after removing lost+found", scratch, e.into()));
    let _ = std::fs::remove_dir(scratch);
    removed?;
    unmounted
}

/// Removes `dir` if it is empty; one that holds files (e2fsck's recoveries) is kept.
fn remove_empty_dir(dir: &Path, dev: &Path) -> Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            tracing::warn!(dev = %dev.display(), "lost+found holds recovered files; kept");
            Ok(())
        }
        Err(e) => Err(Error::io("remove", dir, e)),
    }
}

/// Whether the ext4 filesystem on `dev` has its journal marked for recovery
/// (`EXT4_FEATURE_INCOMPAT_RECOVER` in the superblock): it was mounted read-write when its
/// state was taken.
pub fn ext4_needs_recovery(dev: &Path) -> Result<bool> {
    // Superblock at byte 1024; s_feature_incompat (le32) at offset 0x60; RECOVER = 0x4.
    let mut f = File::open(dev).map_err(|e| Error::io("open device", dev, e))?;
    let mut b = [0u8; 4];
    f.seek(SeekFrom::Start(1024 + 0x60))
        .and_then(|_| f.read_exact(&mut b))
        .map_err(|e| Error::io("read superblock", dev, e))?;
    Ok(u32::from_le_bytes(b) & 0x4 != 0)
}

/// Replays the journal of the filesystem on `dev` by mounting it privately at `scratch`
/// and unmounting it again. Precondition: `dev` is writable and nobody else has it mounted.
pub fn replay_journal(fs: FsType, dev: &Path, scratch: &Path) -> Result<()> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    std::fs::create_dir_all(scratch).map_err(|e| Error::io("create mount point", scratch, e))?;
    let fs_name = fs.to_string();
    let options = (fs == FsType::Xfs).then_some("nouuid");
    mount(
        Some(dev),
        scratch,
        Some(fs_name.as_str()),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        options,
    )
    .map_err(|e| Error::io("mount to replay the journal", dev, e.into()))?;
    let unmounted = umount2(scratch, MntFlags::empty())
        .map_err(|e| Error::io("unmount after replaying the journal", scratch, e.into()));
    let _ = std::fs::remove_dir(scratch);
    unmounted
}

/// `e2fsck -f -p`: resize2fs insists on a freshly checked filesystem. Exit codes 0 (clean)
/// and 1 (fixed, e.g. an orphan list from an unclean unmount) are both fine to resize.
fn check_ext4(dev: &Path) -> Result<()> {
    let exe = find_tool("e2fsck")?;
    let out = Command::new(&exe)
        .args(["-f".as_ref(), "-p".as_ref(), dev.as_os_str()])
        .output()
        .map_err(|e| Error::io("run", &exe, e))?;
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        _ => Err(Error::Command {
            program: "e2fsck".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// Mounts a device as a [`MountSpec`] says. Flag-like options (`ro`, `nosuid`, ...) become
/// mount flags; the rest are passed to the filesystem.
pub fn mount(spec: &crate::model::MountSpec, target: &Path) -> Result<()> {
    use nix::mount::MsFlags;
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

/// Unmounts `target`.
pub fn unmount(target: &Path) -> Result<()> {
    nix::mount::umount2(target, nix::mount::MntFlags::empty())
        .map_err(|e| Error::io("unmount", target, e.into()))
}
