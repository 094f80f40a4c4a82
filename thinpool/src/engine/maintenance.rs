//! Repair, backups and restore: what an operator runs when the pool's metadata is damaged
//! or lost (docs/recovery.md).
//!
//! - The *cold check*: before a dm pool that is not live in the kernel is assembled, its
//!   metadata file goes through `thin_check`; damage refuses the open, naming
//!   `thinctl pool repair` (or repairs, with [`PoolSpec::auto_repair`]).
//! - [`repair`] (offline): `thin_repair` into a spare file, check it, swap it in by rename
//!   (the damaged copy is kept), then open the pool and reconcile our records with it.
//! - [`Pool::backup`] (live): the kernel metadata (XML, from a metadata snapshot) and a copy
//!   of our store, as one cut, with a manifest of checksums, under `<root>/backups/`.
//! - [`restore`] (offline): both halves of a backup put back, then open and reconcile.
//!
//! Crash safety: every file that replaces a pool file is written and fsynced under another
//! name first, and replaces it by one rename; the file it replaces is kept under a second
//! name by a hard link made before. A crash at any step leaves the old or the new file in
//! place, never none, and running the same command again finishes the job.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::backend::{self, PoolPaths, dm::DmBackend};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::fsutil;
use crate::ids::{DeviceName, ThinId};
use crate::loopback;
use crate::model::{BackendKind, PoolSettings, PoolSpec};
use crate::store::{PoolState, Store};

use super::locks::lock_root;
use super::{Pool, now_ns, store_damaged, sync_dir};

/// The backup's files: the kernel metadata (dm only), our store, and the manifest.
const BACKUP_METADATA: &str = "metadata.xml";
const BACKUP_STORE: &str = "pool.redb";
const BACKUP_MANIFEST: &str = "manifest.json";
/// Version of the manifest's format.
const MANIFEST_VERSION: u32 = 1;

/// A device our records hold but the pool's metadata lost (after a repair or a restore).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LostDevice {
    pub id: ThinId,
    /// The snapshot key, if the device has one (the base device has none).
    pub name: Option<DeviceName>,
}

/// What [`repair`] or [`restore`] found and did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MaintenanceReport {
    pub root: PathBuf,
    pub backend: String,
    /// dm: whether `thin_check` passed on the metadata before anything was done.
    pub metadata_healthy: Option<bool>,
    /// Whether the kernel metadata was replaced (repaired or restored).
    pub metadata_replaced: bool,
    /// Whether our store was replaced (restore).
    pub store_replaced: bool,
    /// The copies kept of the files replaced.
    pub kept: Vec<PathBuf>,
    /// Devices recorded by us but missing from the pool's metadata: quarantined.
    pub lost: Vec<LostDevice>,
    /// Ids the pool's metadata holds without a record of ours.
    pub leaked: Vec<ThinId>,
    /// One line for a person: what happened.
    pub summary: String,
}

/// What [`Pool::backup`] made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupReport {
    /// The backup's directory.
    pub path: PathBuf,
    /// When it was taken (UTC, `YYYYMMDDTHHMMSSZ`, also the directory's name).
    pub created: String,
    pub transaction_id: u64,
    pub devices: u64,
    /// Older backups removed to keep the last N.
    pub removed: Vec<PathBuf>,
}

/// `<root>/backups/<created>/manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    created: String,
    created_unix: u64,
    tag: String,
    backend: BackendKind,
    transaction_id: u64,
    devices: u64,
    /// File name → sha256 (hex).
    files: BTreeMap<String, String>,
}

/// The directory holding a pool's backups.
pub fn backups_dir(root: &Path) -> PathBuf {
    root.join("backups")
}

/// The damage error of the cold check: what to run.
fn damaged_error(paths: &PoolPaths, e: &Error) -> Error {
    Error::Inconsistent(format!(
        "thin_check found damage in the pool metadata {} ({e}); refusing to serve the pool. \
         Repair it offline with `thinctl pool repair --root {}` (or start thinpoold with \
         --auto-repair); see docs/recovery.md",
        paths.metadata_file.display(),
        paths.root.display()
    ))
}

/// `thin_check -q` on a metadata file (never on a live pool's).
fn thin_check(file: &Path) -> Result<()> {
    fsutil::run("thin_check", &["-q".as_ref(), file.as_os_str()]).map(drop)
}

/// The cold check, at open: a dm pool not live in the kernel has its metadata checked before
/// it is assembled. A live pool (a daemon restart) is the kernel's: it checks the metadata
/// itself and flags `needs_check`, which the backend handles.
pub(super) fn check_cold_metadata(
    paths: &PoolPaths,
    settings: &PoolSettings,
    auto_repair: bool,
) -> Result<()> {
    if DmBackend::pool_is_live(settings)? {
        return Ok(());
    }
    info!(file = %paths.metadata_file.display(), "checking the pool metadata (thin_check)");
    let e = match thin_check(&paths.metadata_file) {
        Ok(()) => return Ok(()),
        // Only a check that ran and failed means damage; a missing tool is said as such.
        Err(e @ Error::Command { .. }) => e,
        Err(e) => return Err(e),
    };
    if !auto_repair {
        return Err(damaged_error(paths, &e));
    }
    warn!(error = %e, "the pool metadata is damaged; repairing it (--auto-repair)");
    let kept = swap_in_repaired(paths, settings)?;
    info!(kept = %kept.display(), "metadata repaired; opening the pool");
    Ok(())
}

/// The current time as `YYYYMMDDTHHMMSSZ` (UTC), which sorts as time does.
fn utc_stamp(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn now_unix() -> u64 {
    now_ns() / 1_000_000_000
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("sync", path, e))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Keeps `file` as `<file>.<suffix>` by a hard link (the file itself stays in place), made
/// durable. Returns the copy's path.
fn keep_copy(file: &Path, suffix: &str) -> Result<PathBuf> {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    let copy = file.with_file_name(name);
    match fs::hard_link(file, &copy) {
        Ok(()) => {}
        // A run that crashed after linking, in the same second: the copy is there.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("keep a copy", &copy, e)),
    }
    if let Some(dir) = file.parent() {
        sync_dir(dir)?;
    }
    Ok(copy)
}

/// Replaces `file` by `new` with one rename, made durable.
fn swap_in(new: &Path, file: &Path) -> Result<()> {
    sync_file(new)?;
    fs::rename(new, file).map_err(|e| Error::io("swap in", file, e))?;
    if let Some(dir) = file.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// A fresh spare file for new metadata next to the metadata file: sparse, 0600, as long as
/// the metadata file. A spare a crash left behind is not in use (the metadata file is only
/// replaced by renaming a finished spare) and is made again.
fn fresh_spare(paths: &PoolPaths, suffix: &str, settings: &PoolSettings) -> Result<PathBuf> {
    let spare = paths.root.join(format!("metadata.{suffix}"));
    super::remove_if_exists(&spare)?;
    // A metadata file that is gone (what a restore may be for) had the pool's size.
    let len = if paths.metadata_file.exists() {
        loopback::file_len(&paths.metadata_file)?.max(settings.metadata_size.0)
    } else {
        settings.metadata_size.0
    };
    loopback::create_sparse(&spare, len)?;
    Ok(spare)
}

/// Takes whatever is left of the pool in the kernel (a dm pool that is not live may still
/// have its linear devices and loop devices, e.g. after a failed cold check): the metadata
/// file may only be replaced while nothing has it open.
fn clear_kernel_leftovers(paths: &PoolPaths, settings: &PoolSettings) -> Result<()> {
    backend::scrub(paths, settings)
}

/// `thin_repair` the metadata into a spare, check it, keep the damaged file as
/// `metadata.damaged-<ts>` and swap the spare in. Returns the kept copy.
fn swap_in_repaired(paths: &PoolPaths, settings: &PoolSettings) -> Result<PathBuf> {
    clear_kernel_leftovers(paths, settings)?;
    let spare = fresh_spare(paths, "repair", settings)?;
    info!(from = %paths.metadata_file.display(), to = %spare.display(),
        "thin_repair into a spare metadata file");
    if let Err(e) = fsutil::run(
        "thin_repair",
        &[
            "-i".as_ref(),
            paths.metadata_file.as_os_str(),
            "-o".as_ref(),
            spare.as_os_str(),
        ],
    ) {
        let _ = fs::remove_file(&spare);
        return Err(Error::Inconsistent(format!(
            "thin_repair could not repair {} ({e}); the file is unchanged. Restore a backup \
             instead: `thinctl pool restore <root>/backups/<time>` (docs/recovery.md)",
            paths.metadata_file.display()
        )));
    }
    failpoint::hit("repair:after_repair");
    info!(file = %spare.display(), "checking the repaired metadata (thin_check)");
    if let Err(e) = thin_check(&spare) {
        let _ = fs::remove_file(&spare);
        return Err(Error::Inconsistent(format!(
            "the metadata thin_repair wrote fails thin_check ({e}); {} is unchanged. Restore a \
             backup instead (docs/recovery.md)",
            paths.metadata_file.display()
        )));
    }
    failpoint::hit("repair:after_check");
    let kept = keep_copy(
        &paths.metadata_file,
        &format!("damaged-{}", utc_stamp(now_unix())),
    )?;
    info!(kept = %kept.display(), "kept the damaged metadata");
    failpoint::hit("repair:after_keep");
    swap_in(&spare, &paths.metadata_file)?;
    info!(file = %paths.metadata_file.display(), "swapped the repaired metadata in");
    failpoint::hit("repair:after_swap");
    Ok(kept)
}

/// Takes the root's lock for an offline command, saying what to do when a daemon holds it.
fn lock_offline(paths: &PoolPaths, what: &str) -> Result<File> {
    // A restore may be what brings a lost store back; the data file is the pool.
    if !paths.store_file.exists() && !paths.data_file.exists() {
        return Err(Error::NotFound(format!(
            "no pool at {} (neither {} nor {})",
            paths.root.display(),
            paths.store_file.display(),
            paths.data_file.display()
        )));
    }
    lock_root(paths).map_err(|e| {
        Error::FailedPrecondition(format!(
            "{e}: is thinpoold running on it? Stop it before {what} (offline only)"
        ))
    })
}

/// The settings of a finished pool, from its store (closed again before returning).
fn settings_of(paths: &PoolPaths) -> Result<PoolSettings> {
    let store = Store::open(&paths.store_file).map_err(store_damaged)?;
    if store.read(|r| r.state()).map_err(store_damaged)? != PoolState::Ready {
        return Err(Error::FailedPrecondition(format!(
            "the pool at {} was never fully created; start thinpoold to create it again",
            paths.root.display()
        )));
    }
    store.read(|r| r.settings()).map_err(store_damaged)
}

/// Refuses while the pool is live in the kernel: its metadata is the kernel's then.
fn refuse_live(settings: &PoolSettings, what: &str) -> Result<()> {
    if settings.backend == BackendKind::Dm && DmBackend::pool_is_live(settings)? {
        return Err(Error::FailedPrecondition(format!(
            "the pool is live in the kernel (a stopped thinpoold leaves it up for the \
             containers using it); {what} needs it down: with thinpoold running, \
             `thinctl pool down` takes it down and stops thinpoold; then try again"
        )));
    }
    Ok(())
}

/// Opens the pool (reconcile), compares our records with the pool's metadata, quarantines
/// the devices the metadata lost, and takes the pool down again: an offline command leaves
/// the pool as it found it, for thinpoold to assemble.
fn open_and_reconcile(spec: &PoolSpec, lock: File, report: &mut MaintenanceReport) -> Result<()> {
    let paths = PoolPaths::new(&spec.root);
    info!("opening the pool and reconciling our records with its metadata");
    let pool = Pool::open_locked(spec, paths, lock)?;
    let audit = pool.audit()?;
    for id in &audit.missing {
        let name = pool.record_by_id(*id).ok().and_then(|r| r.name);
        warn!(id = %id, name = ?name, "device lost: recorded, but not in the pool's metadata");
        pool.quarantine(
            *id,
            "find the device in the pool's metadata",
            &Error::NotFound(format!(
                "thin {id} is not in the pool's metadata (lost in a repair or restore); \
                 remove the snapshot"
            )),
        )?;
        report.lost.push(LostDevice { id: *id, name });
    }
    report.leaked = audit.leaked.clone();
    if let Some(max) = report.leaked.iter().max() {
        warn!(ids = ?report.leaked, "devices in the pool's metadata without a record (leaked)");
        // Our id counter came back with the store; a new device must not take one of these.
        pool.store.write(|w| w.skip_ids_through(*max))?;
    }
    pool.teardown()?;
    Ok(())
}

/// `thinctl pool repair`: offline. See the module documentation. Idempotent: a healthy pool
/// is only reconciled, and nothing is replaced.
pub fn repair(spec: &PoolSpec) -> Result<MaintenanceReport> {
    let paths = PoolPaths::new(&spec.root);
    let lock = lock_offline(&paths, "a repair")?;
    let settings = settings_of(&paths)?;
    let mut report = MaintenanceReport {
        root: paths.root.clone(),
        backend: settings.backend.to_string(),
        ..Default::default()
    };
    info!(root = %paths.root.display(), "checking the metadata store");
    {
        let store = Store::open(&paths.store_file).map_err(store_damaged)?;
        store.check_or_fail()?;
    }
    if settings.backend != BackendKind::Dm {
        info!(backend = %settings.backend, "no kernel metadata to repair on this backend");
        open_and_reconcile(spec, lock, &mut report)?;
        report.summary = format!(
            "backend {}: no kernel metadata to repair; the store is consistent{}",
            settings.backend,
            lost_summary(&report)
        );
        return Ok(report);
    }
    refuse_live(&settings, "a repair")?;
    info!(file = %paths.metadata_file.display(), "checking the pool metadata (thin_check)");
    match thin_check(&paths.metadata_file) {
        Ok(()) => {
            report.metadata_healthy = Some(true);
            info!("the pool metadata is healthy; nothing to repair");
        }
        Err(e) if !matches!(e, Error::Command { .. }) => return Err(e),
        Err(e) => {
            report.metadata_healthy = Some(false);
            warn!(error = %e, "the pool metadata is damaged; repairing it");
            report.kept.push(swap_in_repaired(&paths, &settings)?);
            report.metadata_replaced = true;
        }
    }
    open_and_reconcile(spec, lock, &mut report)?;
    report.summary = if report.metadata_replaced {
        format!(
            "the metadata was repaired; the damaged copy is {}{}",
            report.kept[0].display(),
            lost_summary(&report)
        )
    } else {
        format!(
            "the metadata is healthy; nothing was changed{}",
            lost_summary(&report)
        )
    };
    Ok(report)
}

fn lost_summary(report: &MaintenanceReport) -> String {
    let mut s = String::new();
    if !report.lost.is_empty() {
        s += &format!(
            "; {} device(s) lost (quarantined): {}",
            report.lost.len(),
            report
                .lost
                .iter()
                .map(|l| match &l.name {
                    Some(n) => format!("{} ({:?})", l.id, n.as_str()),
                    None => l.id.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !report.leaked.is_empty() {
        s += &format!(
            "; {} device(s) without a record (leaked): {:?}",
            report.leaked.len(),
            report.leaked
        );
    }
    s
}

impl Pool {
    /// Takes a backup of the pool while it serves: the kernel metadata (dm) and our store as
    /// one consistent cut (no create or delete runs between the two halves), with a manifest,
    /// into `<root>/backups/<time>/`; then keeps only the last `keep` backups (at least 1).
    pub fn backup(&self, keep: usize) -> Result<BackupReport> {
        let _one_at_a_time = self.backup_lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = backups_dir(&self.paths.root);
        fsutil::create_private_dir(&dir).map_err(|e| Error::io("create backups dir", &dir, e))?;
        let unix = now_unix();
        let created = backup_name(&dir, &utc_stamp(unix))?;
        let tmp = dir.join(format!(".tmp-{created}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
        }
        fsutil::create_private_dir(&tmp).map_err(|e| Error::io("create backup dir", &tmp, e))?;
        let written = self.write_backup(&tmp, &created, unix);
        let (txn, devices) = match written {
            Ok(x) => x,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let path = dir.join(&created);
        fs::rename(&tmp, &path).map_err(|e| Error::io("rename backup into place", &path, e))?;
        sync_dir(&dir)?;
        info!(path = %path.display(), transaction_id = txn, devices, "backup taken");
        let removed = prune_backups(&dir, keep.max(1))?;
        Ok(BackupReport {
            path,
            created,
            transaction_id: txn,
            devices,
            removed,
        })
    }

    /// The backup's files in `tmp`, fsynced. Returns the store's transaction id and device
    /// count.
    fn write_backup(&self, tmp: &Path, created: &str, unix: u64) -> Result<(u64, u64)> {
        let (has_metadata, (txn, devices)) = {
            // The cut: creates and deletes hold this shared from intent to outcome.
            let _cut = self.audit_gate.write();
            let has = self.backend.dump_metadata(&tmp.join(BACKUP_METADATA))?;
            failpoint::hit("backup:after_dump");
            let copied = self.store.copy_to(&tmp.join(BACKUP_STORE))?;
            failpoint::hit("backup:after_store");
            (has, copied)
        };
        let mut files = BTreeMap::new();
        let mut names = vec![BACKUP_STORE];
        if has_metadata {
            names.push(BACKUP_METADATA);
        }
        for name in names {
            let f = tmp.join(name);
            fsutil::make_private(&f)?;
            sync_file(&f)?;
            files.insert(name.to_string(), sha256_file(&f)?);
        }
        let settings = self.settings();
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            created: created.to_string(),
            created_unix: unix,
            tag: settings.tag.clone(),
            backend: settings.backend,
            transaction_id: txn,
            devices,
            files,
        };
        let mpath = tmp.join(BACKUP_MANIFEST);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(fsutil::PRIVATE_FILE_MODE)
            .open(&mpath)
            .map_err(|e| Error::io("create", &mpath, e))?;
        f.write_all(&serde_json::to_vec_pretty(&manifest)?)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("write", &mpath, e))?;
        sync_dir(tmp)?;
        Ok((txn, devices))
    }
}

/// The name of a new backup taken at `stamp`: the stamp, or with several in one second
/// `<stamp>-002`, `-003`, ... past the highest there (pruning removes the oldest, never the
/// newest), so that names always sort in the order the backups were taken.
fn backup_name(dir: &Path, stamp: &str) -> Result<String> {
    let mut highest = 0u32;
    for e in fs::read_dir(dir).map_err(|e| Error::io("list backups", dir, e))? {
        let name = e
            .map_err(|e| Error::io("list backups", dir, e))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        match name.strip_prefix(stamp) {
            Some("") => highest = highest.max(1),
            Some(rest) => {
                if let Some(n) = rest.strip_prefix('-').and_then(|n| n.parse::<u32>().ok()) {
                    highest = highest.max(n);
                }
            }
            None => {}
        }
    }
    Ok(if highest == 0 {
        stamp.to_string()
    } else {
        format!("{stamp}-{:03}", highest + 1)
    })
}

/// Removes all but the newest `keep` backups, and temporary directories of backups a crash
/// interrupted (only one backup runs at a time, under the pool's backup lock).
fn prune_backups(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    let mut stale = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io("list backups", dir, e))? {
        let e = e.map_err(|e| Error::io("list backups", dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            stale.push(e.path());
        } else if e.path().join(BACKUP_MANIFEST).is_file() {
            done.push(name);
        }
    }
    done.sort();
    let mut removed = Vec::new();
    let excess = done.len().saturating_sub(keep);
    for name in done.into_iter().take(excess) {
        let p = dir.join(name);
        fs::remove_dir_all(&p).map_err(|e| Error::io("remove old backup", &p, e))?;
        removed.push(p);
    }
    for p in stale {
        if let Err(e) = fs::remove_dir_all(&p) {
            warn!(dir = %p.display(), error = %e, "could not remove an interrupted backup");
        }
    }
    sync_dir(dir)?;
    Ok(removed)
}

/// Reads a backup's manifest and verifies every file's checksum.
fn verified_manifest(backup: &Path) -> Result<Manifest> {
    let mpath = backup.join(BACKUP_MANIFEST);
    let text = fs::read(&mpath).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!(
            "{} is not a backup (no {BACKUP_MANIFEST})",
            backup.display()
        )),
        _ => Error::io("read", &mpath, e),
    })?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| {
        Error::InvalidArgument(format!(
            "the backup manifest {} is unreadable: {e}",
            mpath.display()
        ))
    })?;
    if m.version != MANIFEST_VERSION {
        return Err(Error::InvalidArgument(format!(
            "backup manifest version {}; this build reads version {MANIFEST_VERSION}",
            m.version
        )));
    }
    if !m.files.contains_key(BACKUP_STORE)
        || (m.backend == BackendKind::Dm && !m.files.contains_key(BACKUP_METADATA))
    {
        return Err(Error::InvalidArgument(format!(
            "the backup {} is incomplete: its manifest lists {:?}",
            backup.display(),
            m.files.keys().collect::<Vec<_>>()
        )));
    }
    for (name, want) in &m.files {
        let f = backup.join(name);
        if !f.is_file() {
            return Err(Error::InvalidArgument(format!(
                "the backup {} lacks {name}",
                backup.display()
            )));
        }
        let got = sha256_file(&f)?;
        if &got != want {
            return Err(Error::InvalidArgument(format!(
                "the backup {} is damaged: {name} has sha256 {got}, its manifest says {want}",
                backup.display()
            )));
        }
    }
    Ok(m)
}

/// `thinctl pool restore BACKUP`: offline. Verifies the backup, keeps the current metadata
/// and store as `.before-restore-<ts>`, puts the backup's in place (metadata first: a crash
/// between the two leaves our store ahead of the metadata, which open refuses, and running
/// the restore again finishes it), then opens and reconciles the pool.
pub fn restore(spec: &PoolSpec, backup: &Path) -> Result<MaintenanceReport> {
    let paths = PoolPaths::new(&spec.root);
    let lock = lock_offline(&paths, "a restore")?;
    info!(backup = %backup.display(), "verifying the backup's checksums");
    let manifest = verified_manifest(backup)?;
    // The pool's identity: from its store if readable, else from the backup's own (the
    // store being what is damaged is a reason to restore).
    let settings = match settings_of(&paths) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "the pool's store is unreadable; restoring it from the backup");
            // Read from a copy: opening the backup's own file could change it (and its sum).
            let probe = paths.root.join("pool.redb.probe");
            fs::copy(backup.join(BACKUP_STORE), &probe)
                .map_err(|e| Error::io("copy the backup's store", &probe, e))?;
            let settings = Store::open(&probe)
                .map_err(store_damaged)
                .and_then(|s| s.read(|r| r.settings()));
            super::remove_if_exists(&probe)?;
            settings?
        }
    };
    if settings.tag != manifest.tag || settings.backend != manifest.backend {
        return Err(Error::InvalidArgument(format!(
            "the backup {} is of pool {} ({}), not of this pool {} ({})",
            backup.display(),
            manifest.tag,
            manifest.backend,
            settings.tag,
            settings.backend
        )));
    }
    refuse_live(&settings, "a restore")?;
    let mut report = MaintenanceReport {
        root: paths.root.clone(),
        backend: settings.backend.to_string(),
        ..Default::default()
    };
    let ts = utc_stamp(now_unix());
    let suffix = format!("before-restore-{ts}");
    if manifest.backend == BackendKind::Dm {
        clear_kernel_leftovers(&paths, &settings)?;
    }
    for f in [&paths.metadata_file, &paths.store_file] {
        if f.exists() {
            report.kept.push(keep_copy(f, &suffix)?);
        }
    }
    info!(kept = ?report.kept, "kept the current metadata and store");
    failpoint::hit("restore:after_keep");
    if manifest.backend == BackendKind::Dm {
        let spare = fresh_spare(&paths, "restore", &settings)?;
        info!(to = %spare.display(), "thin_restore of the backup's metadata");
        let xml = backup.join(BACKUP_METADATA);
        let restored = fsutil::run(
            "thin_restore",
            &[
                "-i".as_ref(),
                xml.as_os_str(),
                "-o".as_ref(),
                spare.as_os_str(),
            ],
        )
        .and_then(|_| thin_check(&spare));
        if let Err(e) = restored {
            let _ = fs::remove_file(&spare);
            return Err(e);
        }
        failpoint::hit("restore:after_thin_restore");
        swap_in(&spare, &paths.metadata_file)?;
        report.metadata_replaced = true;
        info!(file = %paths.metadata_file.display(), "metadata restored");
        failpoint::hit("restore:after_metadata");
    }
    let store_tmp = paths.root.join("pool.redb.restore");
    fs::copy(backup.join(BACKUP_STORE), &store_tmp)
        .map_err(|e| Error::io("copy the backup's store", &store_tmp, e))?;
    fsutil::make_private(&store_tmp)?;
    swap_in(&store_tmp, &paths.store_file)?;
    report.store_replaced = true;
    info!(file = %paths.store_file.display(), "store restored");
    failpoint::hit("restore:after_store");
    open_and_reconcile(spec, lock, &mut report)?;
    report.summary = format!(
        "restored the backup {} (transaction {}, {} devices); the previous files are kept as \
         *.{suffix}{}",
        manifest.created,
        manifest.transaction_id,
        manifest.devices,
        lost_summary(&report)
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_and_sort_by_time() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // 2024-02-29 23:59:59 UTC, a leap day.
        assert_eq!(utc_stamp(1_709_251_199), "20240229T235959Z");
        assert!(utc_stamp(1_709_251_199) < utc_stamp(1_709_251_200));
    }
}
