//! The torture driver: thinpoold as a child process, a seeded mixed load from concurrent
//! clients, a kill (abort at an armed failpoint, or SIGKILL at a random moment), a restart,
//! and the checks: audit clean, thin_check clean (dm), every committed layer's checksum, and
//! the records against the driver's own ledger (every acknowledged operation present, an
//! operation in flight at the kill all-or-nothing).
//!
//! Everything is bounded: every RPC has a timeout, a point not reached in time fails its
//! case, and whatever the driver started (daemon, mounts, the pool's kernel objects) is
//! stopped and taken away on every path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use thinpool::BackendKind;
use thinpool_client::Client;
use thinpool_proto::types::Mount;
use tokio::runtime::Runtime;

use super::watchdog::Watchdog;
use super::{Point, Trigger};
use crate::{pattern, sha256_hex, sim_files};

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each catalogue point, each seed: abort there under load.
    Failpoints,
    /// Rounds of a many-client load with a kill -9 at a seeded moment.
    LoadKill,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub thinpoold: PathBuf,
    /// Used for `thinctl pool down` before thin_check, if given (else the admin API).
    pub thinctl: Option<PathBuf>,
    pub backend: BackendKind,
    pub work: PathBuf,
    pub mode: Mode,
    pub seeds: u64,
    pub rounds: u64,
    pub clients: usize,
    pub short: bool,
    /// Only these points (empty: the catalogue's for the backend).
    pub points: Vec<String>,
    /// How long a point may take to be reached under load.
    pub reach_within: Duration,
    /// load-kill: the kill comes this many ms into the load, drawn from lo..=hi by the
    /// round (slow guests need longer for layers to be committed before it).
    pub kill_after_ms: (u64, u64),
}

/// Totals of a run.
#[derive(Debug, Default)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
}

/// Every request waits at most this long (a hung daemon fails the case, not the run).
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// thinpoold must serve within this after a start.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// A case taking this long gets the watchdog's diagnostics (cases take seconds; the longest
/// bounded wait chain is a few minutes).
const CASE_WARN: Duration = Duration::from_secs(300);
/// ... and this long ends the run (a process stuck in the kernel cannot be waited out).
const CASE_GIVE_UP: Duration = Duration::from_secs(540);
/// `thinctl pool down` and thin_check get this long.
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);
const BASE_SIZE: u64 = 256 << 20;

// ---------------------------------------------------------------- randomness

/// splitmix64: small, seeded, good enough to spread operations.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            v.get(self.below(v.len() as u64) as usize)
        }
    }
}

/// A stable number for a name (to seed from a point's name).
fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

// ---------------------------------------------------------------- the ledger

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SKind {
    Active,
    View,
    Committed,
}

impl SKind {
    fn of(kind: i32) -> Option<SKind> {
        match thinpool_client::kind_name(kind) {
            "active" => Some(SKind::Active),
            "view" => Some(SKind::View),
            "committed" => Some(SKind::Committed),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Snap {
    kind: SKind,
    parent: Option<String>,
    /// sha256 of the file `data` written into it (actives after the write, committed
    /// layers from their active).
    sha: Option<String>,
    owner: usize,
}

/// An operation sent but not answered when the daemon died: it may have happened or not,
/// but wholly.
#[derive(Clone, Debug)]
enum Pending {
    Create {
        key: String,
        kind: SKind,
        parent: Option<String>,
        owner: usize,
    },
    Commit {
        key: String,
        name: String,
    },
    Remove {
        key: String,
    },
    /// Changes no record (Mounts, Activate, Deactivate, Stat, grow, ...).
    NoRecord,
}

/// What the driver knows: every acknowledged change, also appended (fsynced) to a file in
/// the work directory, so a failed run can be read back.
struct Ledger {
    snaps: BTreeMap<String, Snap>,
    inflight: BTreeMap<usize, Pending>,
    log: File,
}

impl Ledger {
    fn note(&mut self, line: &str) {
        // The ledger is the reference the checks use; a line lost would be a false alarm
        // only in the post-mortem file, never in the checks (they use memory).
        let _ = writeln!(self.log, "{line}");
        let _ = self.log.sync_data();
    }
    fn children(&self, key: &str) -> usize {
        self.snaps
            .values()
            .filter(|s| s.parent.as_deref() == Some(key))
            .count()
            + self
                .inflight
                .values()
                .filter(|p| matches!(p, Pending::Create { parent: Some(pp), .. } if pp == key))
                .count()
    }
}

// ---------------------------------------------------------------- the daemon

struct Daemon {
    child: Child,
    log: PathBuf,
}

/// The shared state of one run.
struct Shared {
    cfg: Config,
    rt: Runtime,
    pool_root: PathBuf,
    socket: PathBuf,
    mnt: PathBuf,
    ledger: Mutex<Ledger>,
    /// Mount points the driver mounted and has not unmounted.
    mounted: Mutex<BTreeSet<PathBuf>>,
    /// Keys whose device a client holds mounted: (key → mount point).
    mounted_keys: Mutex<HashMap<String, PathBuf>>,
    counter: AtomicU64,
    stop: AtomicBool,
    /// Calls that failed with an unexpected code from a live daemon.
    odd: Mutex<Vec<String>>,
}

/// How a call ended.
enum Call<T> {
    Ok(T),
    /// An answer: an error code (the operation did not happen).
    Refused(tonic::Code, String),
    /// No answer (the daemon died, or the call timed out): the operation may have happened.
    Lost,
}

impl Shared {
    fn client(&self) -> Option<Client> {
        let socket = self.socket.clone();
        self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), Client::connect(socket))
                .await
                .ok()?
                .ok()
        })
    }

    fn call<T, F, Fut>(&self, c: &Client, f: F) -> Call<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = thinpool_client::Result<T>>,
    {
        let c = c.clone();
        match self
            .rt
            .block_on(async { tokio::time::timeout(RPC_TIMEOUT, f(c)).await })
        {
            Err(_) => Call::Lost,
            Ok(Ok(v)) => Call::Ok(v),
            Ok(Err(e)) => match e.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                    Call::Lost
                }
                code => Call::Refused(code, e.to_string()),
            },
        }
    }

    fn next_name(&self, client: usize, what: &str) -> String {
        format!(
            "{what}{client}-{}",
            self.counter.fetch_add(1, Ordering::SeqCst)
        )
    }

    fn holds_filesystems(&self) -> bool {
        self.cfg.backend != BackendKind::Sim
    }

    /// Mounts `m` at a new directory for `key`.
    fn mount(&self, key: &str, m: &Mount, read_only_noload: bool) -> Result<PathBuf> {
        let dir = self.mnt.join(format!(
            "{key}-{}",
            self.counter.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&dir)?;
        let mut m = m.clone();
        if read_only_noload && m.r#type == "ext4" {
            // A layer committed while mounted has a journal marked for recovery, which a
            // read-only device cannot replay; its data is checkpointed (the commit froze it).
            m.options.push("noload".into());
        }
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.clone());
        if let Err(e) = thinpool_client::mount::mount(&m, &dir) {
            self.mounted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&dir);
            let _ = fs::remove_dir(&dir);
            bail!("mount {} at {}: {e}", m.source, dir.display());
        }
        Ok(dir)
    }

    fn unmount(&self, dir: &Path) -> Result<()> {
        let r = thinpool_client::mount::unmount(dir);
        if r.is_err() {
            // Busy for a moment, or the device is gone: detach, so nothing is left.
            let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        }
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(dir);
        let _ = fs::remove_dir(dir);
        r.map_err(|e| anyhow!("unmount {}: {e}", dir.display()))
    }

    /// Whether a device of a thinpool pool is suspended in the kernel (a daemon killed
    /// inside a pool reload or a snapshot's origin suspend leaves it so until the next open
    /// resumes it): unmounting then waits for a flush that cannot finish.
    fn pool_suspended(&self) -> bool {
        let Ok(dir) = fs::read_dir("/sys/block") else {
            return false;
        };
        dir.flatten().any(|e| {
            let dm = e.path().join("dm");
            let name = fs::read_to_string(dm.join("name")).unwrap_or_default();
            name.starts_with("thinpool-")
                && fs::read_to_string(dm.join("suspended")).is_ok_and(|s| s.trim() == "1")
        })
    }

    fn unmount_all(&self) {
        let dirs: Vec<PathBuf> = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for d in dirs {
            let _ = self.unmount(&d);
        }
        self.mounted_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Writes a file `data` of seeded content into the device of `m` and returns its sha256.
    /// A filesystem device is mounted (and left mounted when `keep`); a sim device is a file.
    fn write_content(
        &self,
        key: &str,
        m: &Mount,
        seed: u64,
        len: usize,
        keep: bool,
    ) -> Result<String> {
        let data = pattern(seed, len);
        let sha = sha256_hex(&data);
        if !self.holds_filesystems() {
            let f = OpenOptions::new().read(true).write(true).open(&m.source)?;
            sim_files::put(&f, "data", &data);
            return Ok(sha);
        }
        let dir = self.mount(key, m, false)?;
        let written = (|| -> Result<()> {
            let mut f = File::create(dir.join("data"))?;
            f.write_all(&data)?;
            f.sync_all()?;
            Ok(())
        })();
        if keep && written.is_ok() {
            self.mounted_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.to_string(), dir);
        } else {
            self.unmount(&dir)?;
        }
        written.map(|()| sha)
    }

    /// The sha256 of file `data` in the (read-only) device of `m`; `None` if it has none.
    fn read_content(&self, key: &str, m: &Mount) -> Result<Option<String>> {
        if !self.holds_filesystems() {
            let f = File::open(&m.source)?;
            return Ok(sim_files::get(&f, "data").map(|d| sha256_hex(&d)));
        }
        let dir = self.mount(key, m, true)?;
        let read = (|| -> Result<Option<String>> {
            let mut v = Vec::new();
            match File::open(dir.join("data")) {
                Ok(mut f) => f.read_to_end(&mut v)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(Some(sha256_hex(&v)))
        })();
        self.unmount(&dir)?;
        read
    }

    /// Unmounts `key`'s device if a client holds it mounted.
    fn release(&self, key: &str) -> Result<()> {
        let dir = self
            .mounted_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        match dir {
            Some(d) => self.unmount(&d),
            None => Ok(()),
        }
    }

    fn odd(&self, what: String) {
        self.odd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }
}

// ---------------------------------------------------------------- the load

/// What one client does until the daemon dies or `stop` is set.
fn client_loop(sh: &Shared, id: usize, seed: u64, grower: bool) {
    let mut rng = Rng::new(seed.wrapping_mul(1000).wrapping_add(id as u64));
    let Some(c) = sh.client() else {
        return;
    };
    while !sh.stop.load(Ordering::SeqCst) {
        let go_on = one_op(sh, &c, id, &mut rng, grower);
        if !go_on {
            return;
        }
    }
}

/// One operation; false once the daemon is gone.
fn one_op(sh: &Shared, c: &Client, id: usize, rng: &mut Rng, grower: bool) -> bool {
    let (mine, committed): (Vec<(String, Snap)>, Vec<String>) = {
        let l = sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
        (
            l.snaps
                .iter()
                .filter(|(_, s)| s.owner == id)
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect(),
            l.snaps
                .iter()
                .filter(|(_, s)| s.kind == SKind::Committed)
                .map(|(k, _)| k.clone())
                .collect(),
        )
    };
    // Keep the pool small (checks read every committed layer): past a few, remove more.
    let crowded = mine.len() > 3;
    let roll = rng.below(100);
    let op = match roll {
        _ if crowded && roll < 40 => "remove",
        0..=24 => "prepare",
        25..=31 => "view",
        32..=49 => "commit",
        50..=61 => "remove",
        62..=67 => "mounts",
        68..=74 => "activate",
        75..=80 => "deactivate",
        81..=85 => "stat",
        86..=89 if !grower => "cleanup",
        86..=91 if grower => "grow",
        92..=95 if grower => "backup",
        90..=94 => "usage",
        _ if grower => "audit",
        _ => "list",
    };
    match op {
        "prepare" | "view" => {
            let kind = if op == "prepare" {
                SKind::Active
            } else {
                SKind::View
            };
            // A view of the base is allowed but rare; most children have a parent.
            let parent = if rng.below(3) == 0 {
                None
            } else {
                rng.pick(&committed).cloned()
            };
            let key = sh.next_name(id, if op == "prepare" { "a" } else { "v" });
            let mut labels = HashMap::new();
            if kind == SKind::Active && rng.below(8) == 0 {
                // Larger than the base (and than most parents): the filesystem is grown.
                labels.insert(
                    "containerd.io/snapshot/max-size".to_string(),
                    format!("{}", BASE_SIZE + (128 << 20)),
                );
            }
            set_inflight(
                sh,
                id,
                Pending::Create {
                    key: key.clone(),
                    kind,
                    parent: parent.clone(),
                    owner: id,
                },
            );
            let (k2, p2) = (key.clone(), parent.clone());
            let r = sh.call(c, |mut c| async move {
                if kind == SKind::Active {
                    c.prepare(&k2, p2.as_deref(), labels).await
                } else {
                    c.view(&k2, p2.as_deref(), labels).await
                }
            });
            let mounts = match r {
                Call::Lost => return false,
                Call::Refused(code, msg) => {
                    check_refusal(sh, op, code, &msg);
                    clear_inflight(sh, id);
                    return true;
                }
                Call::Ok(m) => m,
            };
            {
                let mut l = sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
                l.inflight.remove(&id);
                l.snaps.insert(
                    key.clone(),
                    Snap {
                        kind,
                        parent: parent.clone(),
                        sha: None,
                        owner: id,
                    },
                );
                l.note(&format!("{op} {key} parent={parent:?}"));
            }
            if kind == SKind::Active
                && let Some(m) = mounts.first()
            {
                let len = (16 + rng.below(112) as usize) << 10;
                let keep = rng.below(3) == 0;
                match sh.write_content(&key, m, rng.next_u64(), len, keep) {
                    Ok(sha) => {
                        let mut l = sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(s) = l.snaps.get_mut(&key) {
                            s.sha = Some(sha.clone());
                        }
                        l.note(&format!("wrote {key} sha={sha}"));
                    }
                    // The device may go with the daemon's pool (reflink's data mount
                    // stays, dm's devices stay): a failed write is not a finding by
                    // itself; the layer is then never committed with a checksum.
                    Err(e) => {
                        if sh.stop.load(Ordering::SeqCst) {
                            return false;
                        }
                        sh.odd(format!("write into {key}: {e:#}"));
                    }
                }
            }
            true
        }
        "commit" => {
            let ready: Vec<&(String, Snap)> = mine
                .iter()
                .filter(|(_, s)| s.kind == SKind::Active && s.sha.is_some())
                .collect();
            let Some((key, snap)) = rng.pick(&ready).map(|(k, s)| (k.clone(), s.clone())) else {
                return true;
            };
            // Mostly unmounted first; else committed while mounted, unmounted after.
            let while_mounted = rng.below(4) == 0;
            if !while_mounted && sh.release(&key).is_err() {
                return !sh.stop.load(Ordering::SeqCst);
            }
            let name = sh.next_name(id, "l");
            set_inflight(
                sh,
                id,
                Pending::Commit {
                    key: key.clone(),
                    name: name.clone(),
                },
            );
            let (k2, n2) = (key.clone(), name.clone());
            let r = sh.call(c, |mut c| async move {
                c.commit(&n2, &k2, HashMap::new()).await
            });
            let _ = sh.release(&key);
            match r {
                Call::Lost => false,
                Call::Refused(code, msg) => {
                    check_refusal(sh, "commit", code, &msg);
                    clear_inflight(sh, id);
                    true
                }
                Call::Ok(()) => {
                    let mut l = sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
                    l.inflight.remove(&id);
                    l.snaps.remove(&key);
                    l.snaps.insert(
                        name.clone(),
                        Snap {
                            kind: SKind::Committed,
                            parent: snap.parent.clone(),
                            sha: snap.sha.clone(),
                            owner: id,
                        },
                    );
                    l.note(&format!("commit {key} as {name} sha={:?}", snap.sha));
                    true
                }
            }
        }
        "remove" => {
            let candidates: Vec<String> = {
                let l = sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
                mine.iter()
                    .filter(|(k, _)| l.children(k) == 0)
                    .map(|(k, _)| k.clone())
                    .collect()
            };
            let Some(key) = rng.pick(&candidates).cloned() else {
                return true;
            };
            if sh.release(&key).is_err() {
                return !sh.stop.load(Ordering::SeqCst);
            }
            set_inflight(sh, id, Pending::Remove { key: key.clone() });
            let k2 = key.clone();
            match sh.call(c, |mut c| async move { c.remove(&k2).await }) {
                Call::Lost => false,
                Call::Refused(code, msg) => {
                    check_refusal(sh, "remove", code, &msg);
                    clear_inflight(sh, id);
                    true
                }
                Call::Ok(()) => {
                    let mut l = sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
                    l.inflight.remove(&id);
                    l.snaps.remove(&key);
                    l.note(&format!("remove {key}"));
                    true
                }
            }
        }
        _ => {
            // Operations that change no record: any outcome is fine as long as the daemon
            // answers, and a refusal has an expected code.
            let own: Vec<String> = mine
                .iter()
                .filter(|(_, s)| s.kind != SKind::Committed)
                .map(|(k, _)| k.clone())
                .collect();
            let any_key = rng
                .pick(&committed)
                .cloned()
                .or_else(|| rng.pick(&own).cloned())
                .unwrap_or_else(|| "none".into());
            let own_key = rng.pick(&own).cloned().unwrap_or_else(|| any_key.clone());
            set_inflight(sh, id, Pending::NoRecord);
            let r: Call<()> = match op {
                "mounts" => sh.call(c, |mut c| async move { c.mounts(&own_key).await.map(drop) }),
                "activate" => {
                    let k = any_key.clone();
                    sh.call(c, |mut c| async move { c.activate(&k).await.map(drop) })
                }
                "deactivate" => {
                    // Not a device a client holds mounted (that would be refused anyway).
                    let mounted = sh
                        .mounted_keys
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(&any_key);
                    if mounted {
                        Call::Ok(())
                    } else {
                        sh.call(c, |mut c| async move { c.deactivate(&any_key).await })
                    }
                }
                "stat" => sh.call(c, |mut c| async move { c.stat(&any_key).await.map(drop) }),
                "cleanup" => sh.call(c, |mut c| async move { c.cleanup().await }),
                "grow" => sh.call(c, |mut c| async move {
                    c.grow_pool(Some("+64M"), None, true).await.map(drop)
                }),
                "backup" => sh.call(c, |mut c| async move { c.backup().await.map(drop) }),
                "usage" => sh.call(c, |mut c| async move { c.usage(&any_key).await.map(drop) }),
                "audit" => sh.call(c, |mut c| async move { c.audit().await.map(drop) }),
                _ => sh.call(c, |mut c| async move { c.list(&[]).await.map(drop) }),
            };
            match r {
                Call::Lost => false,
                Call::Refused(code, msg) => {
                    check_refusal(sh, op, code, &msg);
                    clear_inflight(sh, id);
                    true
                }
                Call::Ok(()) => {
                    clear_inflight(sh, id);
                    true
                }
            }
        }
    }
}

fn set_inflight(sh: &Shared, id: usize, p: Pending) {
    sh.ledger
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .inflight
        .insert(id, p);
}

fn clear_inflight(sh: &Shared, id: usize) {
    sh.ledger
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .inflight
        .remove(&id);
}

/// Refusals the load expects (races between clients: a parent removed meanwhile, a device
/// in use, a key taken); anything else is noted.
fn check_refusal(sh: &Shared, op: &str, code: tonic::Code, msg: &str) {
    use tonic::Code::*;
    if !matches!(
        code,
        NotFound | FailedPrecondition | AlreadyExists | ResourceExhausted
    ) {
        sh.odd(format!("{op}: unexpected {code:?}: {msg}"));
    }
}

// ---------------------------------------------------------------- the run

pub fn run(cfg: &Config) -> Result<Summary> {
    let mut driver = Driver::new(cfg.clone())?;
    let result = driver.run_all();
    driver.cleanup();
    result
}

struct Driver {
    sh: Arc<Shared>,
    daemon: Option<Daemon>,
    incarnation: u32,
    summary: Summary,
    /// Client threads still in I/O after a kill (see [`Driver::join_load`]).
    stuck: Vec<std::thread::JoinHandle<()>>,
    /// The clients' mounts wait for the next start (see [`Driver::unmount_or_defer`]).
    unmount_after_start: bool,
    watchdog: Watchdog,
}

impl Driver {
    fn new(cfg: Config) -> Result<Driver> {
        fs::create_dir_all(&cfg.work)?;
        let pool_root = cfg.work.join("pool");
        let mnt = cfg.work.join("mnt");
        fs::create_dir_all(&mnt)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(cfg.work.join("ledger.log"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let socket = cfg.work.join("thinpool.sock");
        let watchdog = Watchdog::start(cfg.work.clone(), CASE_WARN, CASE_GIVE_UP);
        Ok(Driver {
            sh: Arc::new(Shared {
                cfg,
                rt,
                pool_root,
                socket,
                mnt,
                ledger: Mutex::new(Ledger {
                    snaps: BTreeMap::new(),
                    inflight: BTreeMap::new(),
                    log,
                }),
                mounted: Mutex::new(BTreeSet::new()),
                mounted_keys: Mutex::new(HashMap::new()),
                counter: AtomicU64::new(0),
                stop: AtomicBool::new(false),
                odd: Mutex::new(Vec::new()),
            }),
            daemon: None,
            incarnation: 0,
            summary: Summary::default(),
            stuck: Vec::new(),
            unmount_after_start: false,
            watchdog,
        })
    }

    fn cfg(&self) -> &Config {
        &self.sh.cfg
    }

    fn run_all(&mut self) -> Result<Summary> {
        // A pool left by an earlier run of this work directory goes first: every run starts
        // from a fresh pool (and then reuses it).
        self.fresh_pool()?;
        match self.cfg().mode {
            Mode::Failpoints => {
                let points =
                    super::points_for(self.cfg().backend, self.cfg().short, &self.cfg().points);
                if points.is_empty() {
                    bail!(
                        "no failpoint of the catalogue applies to {}",
                        self.cfg().backend
                    );
                }
                for seed in 1..=self.cfg().seeds {
                    for p in &points {
                        let t = Instant::now();
                        let mut rng = Rng::new(seed ^ name_hash(p.name));
                        let hit = 1 + rng.below(p.max_hit);
                        let case = format!("fp={} seed={seed} hit={hit}", p.name);
                        self.watchdog.begin(&case);
                        let r = self.failpoint_case(p, seed, hit);
                        self.report(&case, t, r);
                    }
                }
            }
            Mode::LoadKill => {
                for round in 1..=self.cfg().rounds {
                    let t = Instant::now();
                    let mut rng = Rng::new(round.wrapping_mul(7919));
                    let (lo, hi) = self.cfg().kill_after_ms;
                    let after = Duration::from_millis(lo + rng.below(hi.saturating_sub(lo) + 1));
                    let case = format!(
                        "load-kill round={round} clients={} kill_after={}ms",
                        self.cfg().clients,
                        after.as_millis()
                    );
                    self.watchdog.begin(&case);
                    let r = self.load_kill_case(round, after);
                    self.report(&case, t, r);
                }
            }
        }
        Ok(std::mem::take(&mut self.summary))
    }

    fn report(&mut self, case: &str, t: Instant, r: Result<String>) {
        let secs = t.elapsed().as_secs_f64();
        self.watchdog.end(r.is_ok());
        match r {
            Ok(note) => {
                self.summary.passed += 1;
                println!("ok {case} ({secs:.1}s){note}");
            }
            Err(e) => {
                self.summary.failed += 1;
                println!("FAILED {case} ({secs:.1}s): {e:#}");
                // The next case needs a running-or-stoppable daemon and no mounts; a case
                // that failed midway may have left either.
                self.sh.stop.store(true, Ordering::SeqCst);
                self.kill_daemon();
                self.unmount_or_defer();
            }
        }
    }

    // ---- daemon control

    fn start(&mut self, failpoints: &str) -> Result<std::result::Result<(), ExitStatus>> {
        if self.daemon.is_some() {
            bail!("a daemon is running already");
        }
        self.incarnation += 1;
        let log = self
            .cfg()
            .work
            .join(format!("thinpoold-{}.log", self.incarnation));
        let logf = File::create(&log)?;
        let _ = fs::remove_file(&self.sh.socket);
        let child = Command::new(&self.cfg().thinpoold)
            .arg("--root")
            .arg(&self.sh.pool_root)
            .arg("--socket")
            .arg(&self.sh.socket)
            .args(["--backend", &self.cfg().backend.to_string()])
            .args(["--data-size", "4G", "--metadata-size", "64M"])
            .args(["--base-size", &format!("{}", BASE_SIZE)])
            .arg("--imagefs-dir")
            .arg(self.cfg().work.join("imagefs"))
            .args(["--metrics-addr", ""])
            .env(
                "RUST_LOG",
                std::env::var("THINPOOL_TORTURE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("THINPOOL_FAILPOINTS", failpoints)
            .env("THINPOOL_FAILPOINTS_LOG", self.cfg().work.join("hits.log"))
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("spawn {}", self.cfg().thinpoold.display()))?;
        self.daemon = Some(Daemon { child, log });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self.try_exited()? {
                return Ok(Err(st));
            }
            if let Some(mut c) = self.sh.client() {
                let ok = self
                    .sh
                    .rt
                    .block_on(async { tokio::time::timeout(RPC_TIMEOUT, c.pool_status()).await });
                if matches!(ok, Ok(Ok(_))) {
                    if std::mem::take(&mut self.unmount_after_start) {
                        self.sh.unmount_all();
                    }
                    return Ok(Ok(()));
                }
            }
            if Instant::now() > deadline {
                let tail = self.log_tail();
                self.kill_daemon();
                bail!("thinpoold did not serve within {START_TIMEOUT:?}:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts without failpoints and fails unless it serves.
    fn start_clean(&mut self) -> Result<()> {
        match self.start("")? {
            Ok(()) => Ok(()),
            Err(st) => bail!(
                "thinpoold died while opening the pool ({st}):\n{}",
                self.log_tail()
            ),
        }
    }

    /// The daemon's exit status, once it exited (it is then forgotten).
    fn try_exited(&mut self) -> Result<Option<ExitStatus>> {
        let Some(d) = self.daemon.as_mut() else {
            bail!("no daemon");
        };
        match d.child.try_wait()? {
            Some(st) => {
                self.daemon = None;
                Ok(Some(st))
            }
            None => Ok(None),
        }
    }

    /// Waits up to `within` for the daemon to exit.
    fn wait_exit(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + within;
        loop {
            if self.daemon.is_none() {
                bail!("no daemon");
            }
            if let Some(st) = self.try_exited()? {
                return Ok(Some(st));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts the clients' filesystems, unless a pool device is suspended with no daemon
    /// to resume it: then the unmounts (which flush, and would wait for ever) are left to
    /// the next successful start, whose open resumes the pool.
    fn unmount_or_defer(&mut self) {
        if self.daemon.is_none() && self.sh.pool_suspended() {
            self.unmount_after_start = true;
        } else {
            self.sh.unmount_all();
        }
    }

    fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
    }

    /// SIGTERM (devices stay active, as after any stop), SIGKILL after 60 s.
    fn stop_daemon(&mut self) -> Result<()> {
        let Some(d) = self.daemon.as_ref() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        match self.wait_exit(Duration::from_secs(60))? {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!(
                "thinpoold exited with {st} on SIGTERM:\n{}",
                self.log_tail()
            ),
            None => {
                let tail = self.log_tail();
                self.kill_daemon();
                bail!("thinpoold ignored SIGTERM for 60 s:\n{tail}")
            }
        }
    }

    /// Takes the pool down (`thinctl pool down`, or the admin TakeDown) and waits for the
    /// daemon to exit.
    fn take_down(&mut self) -> Result<()> {
        self.request_take_down()?;
        match self.wait_exit(Duration::from_secs(60))? {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!(
                "thinpoold exited with {st} after TakeDown:\n{}",
                self.log_tail()
            ),
            None => {
                let tail = self.log_tail();
                self.kill_daemon();
                bail!("thinpoold did not exit within 60 s of TakeDown:\n{tail}")
            }
        }
    }

    /// Sends the take-down (the daemon exits after it).
    fn request_take_down(&self) -> Result<()> {
        // udev's probe of a device just unmounted holds it open for a moment: a refusal
        // (device in use) is retried for a few seconds.
        let mut tries = 0;
        loop {
            match self.request_take_down_once() {
                Err(e) if tries < 10 && format!("{e:#}").contains("in use") => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }

    fn request_take_down_once(&self) -> Result<()> {
        if let Some(thinctl) = self.cfg().thinctl.clone() {
            let mut cmd = Command::new(&thinctl);
            cmd.arg("--socket")
                .arg(&self.sh.socket)
                .args(["pool", "down"]);
            let out = output_within(&mut cmd, TOOL_TIMEOUT, &self.cfg().work)
                .with_context(|| format!("run {}", thinctl.display()))?;
            if !out.status.success() {
                bail!(
                    "thinctl pool down: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        } else {
            let Some(c) = self.sh.client() else {
                bail!("cannot connect to take the pool down");
            };
            match self
                .sh
                .call(&c, |mut c| async move { c.take_down(false).await })
            {
                Call::Ok(_) => {}
                Call::Refused(code, msg) => bail!("TakeDown refused: {code:?}: {msg}"),
                Call::Lost => bail!("TakeDown: no answer:\n{}", self.log_tail()),
            }
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let path = match &self.daemon {
            Some(d) => d.log.clone(),
            None => self
                .cfg()
                .work
                .join(format!("thinpoold-{}.log", self.incarnation)),
        };
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Takes whatever the pool has in the kernel away (no daemon running): as the daemon's
    /// own take-down would, through the engine.
    fn teardown_offline(&self) -> Result<()> {
        if !self.sh.pool_root.join("pool.redb").exists() {
            return Ok(());
        }
        let pool = thinpool::Pool::open(&thinpool::PoolSpec {
            root: self.sh.pool_root.clone(),
            ..Default::default()
        })
        .context("open the pool to take it down")?;
        pool.close(true).context("take the pool down")?;
        Ok(())
    }

    /// Removes the pool (kernel objects and files); the next start creates it.
    fn fresh_pool(&mut self) -> Result<()> {
        self.sh.unmount_all();
        if self.daemon.is_some() {
            self.stop_daemon()?;
        }
        if self.sh.pool_root.join("pool.redb").exists()
            && let Err(e) = self.teardown_offline()
        {
            // A pool whose creation was cut short may not open; scrub its kernel objects.
            let store = thinpool::store::Store::open(&self.sh.pool_root.join("pool.redb"));
            let settings = store
                .ok()
                .and_then(|s| s.read(|r| r.settings_if_any()).ok().flatten());
            match settings {
                Some(s) => thinpool::backend::scrub(
                    &thinpool::backend::PoolPaths::new(&self.sh.pool_root),
                    &s,
                )
                .with_context(|| format!("scrub the old pool after: {e:#}"))?,
                None => return Err(e),
            }
        }
        if self.sh.pool_root.exists() {
            fs::remove_dir_all(&self.sh.pool_root)
                .with_context(|| format!("remove {}", self.sh.pool_root.display()))?;
        }
        let mut l = self.sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
        l.snaps.clear();
        l.inflight.clear();
        l.note("fresh pool");
        Ok(())
    }

    fn cleanup(&mut self) {
        self.sh.stop.store(true, Ordering::SeqCst);
        self.sh.unmount_all();
        if self.daemon.is_some() {
            // Devices were unmounted: a plain take-down goes through; else kill and tear
            // down offline.
            if self.take_down().is_err() {
                self.kill_daemon();
            }
        }
        match self.teardown_offline() {
            // Only a pool that is down may go: removing the files of a live pool would leave
            // its loop devices and mounts with nothing to find them by.
            Ok(()) => {
                let _ = fs::remove_dir_all(&self.sh.pool_root);
            }
            Err(e) => eprintln!(
                "torture: could not take the pool down at the end (left in {}): {e:#}",
                self.sh.pool_root.display()
            ),
        }
        let _ = fs::remove_file(&self.sh.socket);
    }

    // ---- the cases

    /// Runs `clients` clients until `stop` is set (by the caller or a dead daemon).
    fn spawn_load(&self, clients: usize, seed: u64) -> Vec<std::thread::JoinHandle<()>> {
        self.sh.stop.store(false, Ordering::SeqCst);
        (0..clients)
            .map(|i| {
                let sh = self.sh.clone();
                std::thread::spawn(move || client_loop(&sh, i, seed, i == 0))
            })
            .collect()
    }

    /// Stops the clients and waits up to 20 s for them. A client can be stuck in I/O that
    /// only the next start releases (a kill inside a grow's pool suspend leaves the pool
    /// suspended, and every write to its devices waits): those are left in `self.stuck`
    /// for [`Driver::finish_stuck`] after the restart, and their mounts stay until then.
    fn join_load(&mut self, threads: Vec<std::thread::JoinHandle<()>>) -> Result<()> {
        self.sh.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut panicked = 0;
        for t in threads {
            if t.is_finished() {
                if t.join().is_err() {
                    panicked += 1;
                }
            } else {
                self.stuck.push(t);
            }
        }
        if self.stuck.is_empty() {
            self.unmount_or_defer();
        }
        if panicked > 0 {
            bail!("{panicked} client threads panicked (see stderr)");
        }
        Ok(())
    }

    /// After a restart: the clients that were stuck must finish now (within 120 s).
    fn finish_stuck(&mut self) -> Result<String> {
        if self.stuck.is_empty() {
            return Ok(String::new());
        }
        let n = self.stuck.len();
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.stuck.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.stuck.iter().any(|t| !t.is_finished()) {
            bail!("{n} clients still stuck in I/O 120 s after the restart");
        }
        for t in std::mem::take(&mut self.stuck) {
            if t.join().is_err() {
                bail!("a client thread panicked (see stderr)");
            }
        }
        self.sh.unmount_all();
        Ok(format!(", {n} clients were stuck until the restart"))
    }

    fn failpoint_case(&mut self, p: &Point, seed: u64, hit: u64) -> Result<String> {
        let spec = format!("{}@{hit}", p.name);
        self.sh
            .odd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if p.trigger == Trigger::PoolCreate {
            self.fresh_pool()?;
        } else if self.daemon.is_some() {
            self.stop_daemon()?;
        }
        let died = match self.start(&spec)? {
            Err(st) => Some(st),
            Ok(()) => match p.trigger {
                Trigger::Open | Trigger::PoolCreate => {
                    bail!("thinpoold opened the pool without reaching {}", p.name)
                }
                Trigger::Load => {
                    let threads = self.spawn_load(self.cfg().clients, seed);
                    let st = self.wait_exit(self.cfg().reach_within)?;
                    self.join_load(threads)?;
                    st
                }
                Trigger::TakeDown => {
                    let threads = self.spawn_load(self.cfg().clients, seed);
                    std::thread::sleep(Duration::from_secs(3));
                    self.join_load(threads)?;
                    if self.daemon.is_some() {
                        // It aborts on the way: no answer is expected.
                        let _ = self.request_take_down();
                        self.wait_exit(Duration::from_secs(60))?
                    } else {
                        None
                    }
                }
            },
        };
        let Some(st) = died else {
            let tail = self.log_tail();
            self.kill_daemon();
            self.unmount_or_defer();
            // Not reached: still check that the pool is sound before failing the case.
            let _ = self.recover_and_verify();
            bail!(
                "{} not reached (hit {hit}) within {:?} under this load:\n{tail}",
                p.name,
                self.cfg().reach_within
            );
        };
        self.unmount_or_defer();
        if st.signal() != Some(libc::SIGABRT) {
            bail!(
                "thinpoold died by {st}, not at the failpoint:\n{}",
                self.log_tail()
            );
        }
        let log = fs::read_to_string(
            self.cfg()
                .work
                .join(format!("thinpoold-{}.log", self.incarnation)),
        )
        .unwrap_or_default();
        if !log.contains(&format!("failpoint {}: aborting", p.name)) {
            bail!(
                "thinpoold aborted, but not at {}:\n{}",
                p.name,
                self.log_tail()
            );
        }
        self.recover_and_verify()
    }

    fn load_kill_case(&mut self, round: u64, after: Duration) -> Result<String> {
        self.sh
            .odd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if self.daemon.is_none() {
            self.start_clean()?;
        }
        let threads = self.spawn_load(self.cfg().clients, round);
        std::thread::sleep(after);
        let alive = self.daemon.is_some() && self.try_exited()?.is_none();
        self.kill_daemon();
        self.join_load(threads)?;
        if !alive {
            bail!("thinpoold died before the kill:\n{}", self.log_tail());
        }
        self.recover_and_verify()
    }

    /// Restart without failpoints, then every check; the ledger then follows what the pool
    /// shows for the operations that were in flight.
    fn recover_and_verify(&mut self) -> Result<String> {
        self.start_clean()?;
        let stuck_note = self.finish_stuck()?;
        let c = self
            .sh
            .client()
            .ok_or_else(|| anyhow!("cannot connect after the restart"))?;
        // 1. Audit: our records against the kernel's, and the store's invariants.
        let audit = match self.sh.call(&c, |mut c| async move { c.audit().await }) {
            Call::Ok(a) => a,
            Call::Refused(code, m) => bail!("audit refused: {code:?}: {m}"),
            Call::Lost => bail!("audit: no answer:\n{}", self.log_tail()),
        };
        if !audit.clean
            || !audit.unfinished.is_empty()
            || !audit.quarantined.is_empty()
            || !audit.leaked.is_empty()
            || !audit.missing.is_empty()
        {
            bail!(
                "audit not clean after the restart: leaked {:?}, missing {:?}, unfinished {:?}, \
                 quarantined {:?}, store problems {:?}",
                audit.leaked,
                audit.missing,
                audit.unfinished,
                audit.quarantined,
                audit.store_problems
            );
        }
        // 2. Records against the ledger.
        let listed = match self.sh.call(&c, |mut c| async move { c.list(&[]).await }) {
            Call::Ok(l) => l,
            Call::Refused(code, m) => bail!("List refused: {code:?}: {m}"),
            Call::Lost => bail!("List: no answer"),
        };
        let devices = match self.sh.call(&c, |mut c| async move { c.devices().await }) {
            Call::Ok(d) => d,
            Call::Refused(code, m) => bail!("ListDevices refused: {code:?}: {m}"),
            Call::Lost => bail!("ListDevices: no answer"),
        };
        let mut shown: BTreeMap<String, (SKind, Option<String>)> = BTreeMap::new();
        for i in &listed {
            let kind = SKind::of(i.kind).ok_or_else(|| anyhow!("{:?}: unknown kind", i.name))?;
            let parent = (!i.parent.is_empty()).then(|| i.parent.clone());
            if shown.insert(i.name.clone(), (kind, parent)).is_some() {
                bail!("List shows {:?} twice", i.name);
            }
        }
        let ready = thinpool_proto::admin::DeviceState::Ready as i32;
        let base = thinpool_proto::admin::DeviceKind::Base as i32;
        let named: BTreeSet<String> = devices
            .iter()
            .filter(|d| d.state == ready && d.kind != base)
            .map(|d| d.name.clone())
            .collect();
        if named != shown.keys().cloned().collect::<BTreeSet<_>>() {
            bail!(
                "ListDevices and List disagree: devices only {:?}, List only {:?}",
                named
                    .difference(&shown.keys().cloned().collect())
                    .collect::<Vec<_>>(),
                shown
                    .keys()
                    .filter(|k| !named.contains(*k))
                    .collect::<Vec<_>>()
            );
        }
        let mut problems = Vec::new();
        let mut resolved = String::new();
        {
            let mut l = self.sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
            let inflight: Vec<Pending> = std::mem::take(&mut l.inflight).into_values().collect();
            // Names an in-flight operation may have made or unmade.
            let mut maybe: BTreeSet<String> = BTreeSet::new();
            for p in &inflight {
                match p {
                    Pending::Create { key, .. } | Pending::Remove { key } => {
                        maybe.insert(key.clone());
                    }
                    Pending::Commit { key, name } => {
                        maybe.insert(key.clone());
                        maybe.insert(name.clone());
                    }
                    Pending::NoRecord => {}
                }
            }
            for (k, s) in &l.snaps {
                if maybe.contains(k) {
                    continue;
                }
                match shown.get(k) {
                    None => problems.push(format!("acknowledged {k:?} ({:?}) is lost", s.kind)),
                    Some((kind, _)) if *kind != s.kind => {
                        problems.push(format!("{k:?} is {kind:?}, acknowledged as {:?}", s.kind))
                    }
                    Some((_, parent)) if *parent != s.parent => problems.push(format!(
                        "{k:?} has parent {parent:?}, acknowledged with {:?}",
                        s.parent
                    )),
                    Some(_) => {}
                }
            }
            for k in shown.keys() {
                if !l.snaps.contains_key(k) && !maybe.contains(k) {
                    problems.push(format!("{k:?} exists but was never acknowledged"));
                }
            }
            // In-flight operations: all or nothing, and the ledger follows the outcome.
            for p in inflight {
                match p {
                    Pending::Create {
                        key,
                        kind,
                        parent,
                        owner,
                    } => match shown.get(&key) {
                        None => resolved.push_str(&format!(" {key}:undone")),
                        Some((k, pp)) if *k == kind && *pp == parent => {
                            resolved.push_str(&format!(" {key}:done"));
                            l.snaps.insert(
                                key,
                                Snap {
                                    kind,
                                    parent,
                                    sha: None,
                                    owner,
                                },
                            );
                        }
                        Some(other) => problems.push(format!(
                            "in-flight create of {key:?} ({kind:?}, parent {parent:?}) left {other:?}"
                        )),
                    },
                    Pending::Commit { key, name } => {
                        let has_key = shown.get(&key).map(|s| s.0);
                        let has_name = shown.get(&name).map(|s| s.0);
                        match (has_key, has_name) {
                            (Some(SKind::Active), None) => {
                                resolved.push_str(&format!(" {key}:not-committed"))
                            }
                            (None, Some(SKind::Committed)) => {
                                resolved.push_str(&format!(" {key}:committed"));
                                if let Some(mut s) = l.snaps.remove(&key) {
                                    s.kind = SKind::Committed;
                                    l.snaps.insert(name, s);
                                }
                            }
                            other => problems.push(format!(
                                "in-flight commit of {key:?} as {name:?} left (key, name) = {other:?}"
                            )),
                        }
                    }
                    Pending::Remove { key } => {
                        if shown.contains_key(&key) {
                            resolved.push_str(&format!(" {key}:kept"));
                        } else {
                            resolved.push_str(&format!(" {key}:removed"));
                            l.snaps.remove(&key);
                        }
                    }
                    Pending::NoRecord => {}
                }
            }
            l.note(&format!("after restart: in flight{resolved}"));
        }
        if !problems.is_empty() {
            bail!("records against the ledger: {}", problems.join("; "));
        }
        // 3. Every committed layer's content.
        let layers: Vec<(String, String)> = {
            let l = self.sh.ledger.lock().unwrap_or_else(|p| p.into_inner());
            l.snaps
                .iter()
                .filter(|(_, s)| s.kind == SKind::Committed)
                .filter_map(|(k, s)| s.sha.clone().map(|sha| (k.clone(), sha)))
                .collect()
        };
        for (k, sha) in &layers {
            let k2 = k.clone();
            let mounts = match self
                .sh
                .call(&c, |mut c| async move { c.activate(&k2).await })
            {
                Call::Ok(m) => m,
                Call::Refused(code, m) => bail!("activate {k:?} to check it: {code:?}: {m}"),
                Call::Lost => bail!("activate {k:?}: no answer:\n{}", self.log_tail()),
            };
            let m = mounts
                .first()
                .ok_or_else(|| anyhow!("activate {k:?}: no mounts"))?;
            let got = self.sh.read_content(k, m)?;
            if got.as_deref() != Some(sha.as_str()) {
                bail!("committed layer {k:?}: content sha256 {got:?}, written {sha}");
            }
            let k2 = k.clone();
            if let Call::Refused(code, m) = self
                .sh
                .call(&c, |mut c| async move { c.deactivate(&k2).await })
            {
                bail!("deactivate {k:?} after the check: {code:?}: {m}");
            }
        }
        // 4. dm: the kernel's metadata, checked offline.
        let mut note = format!(" [{} layers checked{stuck_note}", layers.len());
        // Taking the pool down also proves that no device is left in use (a mount the
        // driver did not see go, a device opened by a crashed daemon).
        if self.cfg().backend != BackendKind::Sim {
            self.take_down()?;
            note.push_str(", taken down");
        }
        if self.cfg().backend == BackendKind::Dm {
            let meta = thinpool::backend::PoolPaths::new(&self.sh.pool_root).metadata_file;
            let mut cmd = Command::new("thin_check");
            cmd.arg(&meta);
            let out = output_within(&mut cmd, TOOL_TIMEOUT, &self.cfg().work)
                .context("run thin_check")?;
            if !out.status.success() {
                bail!(
                    "thin_check {}: {}: {}",
                    meta.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            note.push_str(", thin_check clean");
        }
        let odd = std::mem::take(&mut *self.sh.odd.lock().unwrap_or_else(|p| p.into_inner()));
        // A live daemon answering a legal request with an unclear code (Internal, Unknown)
        // fails the case: clients must be able to tell what went wrong.
        if let Some(first) = odd.iter().find(|o| o.contains("unexpected")) {
            bail!(
                "{} unexpected answers under load, the first: {first}",
                odd.len()
            );
        }
        if !odd.is_empty() {
            note.push_str(&format!(", {} notes: {}", odd.len(), odd[0]));
        }
        note.push(']');
        Ok(note)
    }
}

/// Runs `cmd` to its end or for at most `within`: a tool stuck in the kernel or on a stuck
/// daemon fails the case with the watchdog's diagnostics instead of hanging the run.
fn output_within(cmd: &mut Command, within: Duration, work: &Path) -> Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drained beside the wait, so that a chatty tool cannot block on a full pipe.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let diag = super::watchdog::diagnostics(work);
            let _ = child.kill();
            bail!(
                "{:?} did not finish within {within:?}; what it waited on:\n{diag}",
                cmd.get_program()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}
