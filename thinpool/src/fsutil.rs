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
use crate::mount::ScratchMount;

/// Mode of every directory the pool makes: the pool's files hold every container's data, so
/// only root may list or enter them (Docker's loop-lvm files are 0600 likewise).
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every file the pool makes (data, metadata, store, lock, device files).
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `dir` and any missing parents with mode 0700, then makes `dir` itself 0700
/// whether or not it existed (parents that existed keep their modes).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    let mode = std::fs::symlink_metadata(dir)?.permissions().mode() & 0o7777;
    if mode != PRIVATE_DIR_MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
    }
    Ok(())
}

/// Tightens `path` and everything under it on the same filesystem: directories to 0700,
/// regular files to 0600 (pools made before the modes were set were 0755/0644). Symlinks are
/// not followed, other file types are left alone, and mounts below `path` (a container's
/// filesystem mounted for a resize or by a user) are not entered: the reflink XFS is
/// tightened by its own call.
pub fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", path, e)),
    };
    tighten(path, &meta, meta.dev())
}

fn tighten(path: &Path, meta: &std::fs::Metadata, dev: u64) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if meta.dev() != dev {
        return Ok(()); // another filesystem mounted here
    }
    let want = if meta.is_dir() {
        PRIVATE_DIR_MODE
    } else if meta.is_file() {
        PRIVATE_FILE_MODE
    } else {
        return Ok(());
    };
    if meta.permissions().mode() & 0o7777 != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))
            .map_err(|e| Error::io("restrict the mode of", path, e))?;
    }
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| Error::io("read directory", path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read directory", path, e))?;
            let p = entry.path();
            match std::fs::symlink_metadata(&p) {
                Ok(m) => tighten(&p, &m, dev)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("stat", &p, e)),
            }
        }
    }
    Ok(())
}

/// Debian package that ships each tool we run, for "install X" errors.
fn package_of(tool: &'static str) -> &'static str {
    match tool {
        "mkfs.ext4" | "resize2fs" | "e2fsck" => "e2fsprogs",
        "mkfs.xfs" => "xfsprogs",
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
/// so it is removed again ([`remove_lost_found`]). xfs grows only when mounted, so it is
/// mounted at `scratch` (a [`ScratchMount`]: private, nosuid, nodev, noexec) and grown to
/// the device's length ([`grow_xfs_data`]). A crash can leave that mount: the engine
/// removes scratch mounts at open ([`crate::mount::clear_scratch`]).
pub fn grow(fs: FsType, dev: &Path, scratch: &Path) -> Result<()> {
    match fs {
        FsType::Ext4 => {
            check_ext4(dev)?;
            run("resize2fs", &[dev.as_os_str()])?;
            // e2fsck -p makes a lost+found wherever it finds none; snapshots have none.
            remove_lost_found(fs, dev, scratch)
        }
        FsType::Xfs => {
            let m = ScratchMount::new(dev, scratch, fs, false, Some("nouuid"))?;
            crate::failpoint::hit("grow:after_mount");
            let grown = File::open(dev)
                .and_then(|mut f| f.seek(SeekFrom::End(0)))
                .map_err(|e| Error::io("read the size of", dev, e))
                .and_then(|len| grow_xfs_data(m.path(), len));
            let unmounted = m.unmount();
            grown?;
            unmounted
        }
    }
}

/// `XFS_IOC_FSGEOMETRY_V1`'s answer (the kernel's `struct xfs_fsop_geom_v1`).
#[repr(C)]
struct XfsGeometryV1 {
    blocksize: u32,
    rtextsize: u32,
    agblocks: u32,
    agcount: u32,
    logblocks: u32,
    sectsize: u32,
    inodesize: u32,
    imaxpct: u32,
    datablocks: u64,
    rtblocks: u64,
    rtextents: u64,
    logstart: u64,
    uuid: [u8; 16],
    sunit: u32,
    swidth: u32,
    version: i32,
    flags: u32,
    logsectsize: u32,
    rtsectsize: u32,
    dirblocksize: u32,
}

/// `XFS_IOC_FSGROWFSDATA`'s request (the kernel's `struct xfs_growfs_data`).
#[repr(C)]
struct XfsGrowfsData {
    newblocks: u64,
    imaxpct: u32,
}

nix::ioctl_read!(xfs_geometry_v1, b'X', 100, XfsGeometryV1);
nix::ioctl_write_ptr!(xfs_growfs_data, b'X', 110, XfsGrowfsData);

/// Grows the XFS mounted at `mnt` to `size` bytes of data (what `xfs_growfs -d` does), by
/// ioctl: `xfs_growfs` finds its filesystem by mount point in the mount table, where the
/// private bind under our mounts comes first (see [`crate::mount`]). No-op when the XFS is
/// that large already; the kernel leaves out a last allocation group too small to hold.
/// ENOSPC (no room for the new allocation groups' headers) is `ResourceExhausted`.
pub fn grow_xfs_data(mnt: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(mnt).map_err(|e| Error::io("open the XFS", mnt, e))?;
    // SAFETY: all-zero is a valid value of this plain-data struct, which the kernel fills.
    let mut geo: XfsGeometryV1 = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl writes one XfsGeometryV1 (the kernel ABI layout) into `geo`.
    unsafe { xfs_geometry_v1(dir.as_raw_fd(), &mut geo) }
        .map_err(|e| Error::io("read the XFS geometry", mnt, e.into()))?;
    let newblocks = size / u64::from(geo.blocksize.max(1));
    if newblocks <= geo.datablocks {
        return Ok(());
    }
    let req = XfsGrowfsData {
        newblocks,
        imaxpct: geo.imaxpct,
    };
    // SAFETY: the ioctl reads one XfsGrowfsData (the kernel ABI layout) from `req`.
    unsafe { xfs_growfs_data(dir.as_raw_fd(), &req) }.map_err(|e| match e {
        nix::errno::Errno::ENOSPC => Error::ResourceExhausted(format!(
            "grow the XFS at {}: no space for its new allocation groups",
            mnt.display()
        )),
        e => Error::io("grow the XFS", mnt, e.into()),
    })?;
    Ok(())
}

/// Removes the empty `lost+found` that mkfs.ext4 (and e2fsck) leave in the root directory:
/// containerd expects a new snapshot to be empty, and the directory would otherwise show up
/// in every container and in every first layer exported from one. It is mounted at
/// `scratch` (a [`ScratchMount`]) for the kernel to do it. A `lost+found` that holds
/// something (files e2fsck recovered) is kept. xfs has none. Precondition: nobody else has
/// `dev` mounted.
pub fn remove_lost_found(fs: FsType, dev: &Path, scratch: &Path) -> Result<()> {
    if fs != FsType::Ext4 {
        return Ok(());
    }
    // Read-only first: a base that has none (every open after the first) is not written.
    let m = ScratchMount::new(dev, scratch, fs, true, None)?;
    let dir = m.path().join("lost+found");
    let removed = match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => m.remount_rw().and_then(|()| remove_empty_dir(&dir, dev)),
    };
    let unmounted = m.unmount();
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

/// Replays the journal of the filesystem on `dev` by mounting it at `scratch` (a
/// [`ScratchMount`]) and unmounting it again. Precondition: `dev` is writable and nobody
/// else has it mounted.
pub fn replay_journal(fs: FsType, dev: &Path, scratch: &Path) -> Result<()> {
    let options = (fs == FsType::Xfs).then_some("nouuid");
    ScratchMount::new(dev, scratch, fs, false, options)?.unmount()
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
