//! Shared by the power-cut guest programs of the torture campaign (`tests/src/bin/powercut.rs`,
//! `tests/src/bin/logreplay.rs`): a workload on a real thinpoold (fsynced 4 KiB appends inside
//! mounted snapshots, plus Prepare/Commit/Remove traffic) that records every acknowledged step
//! in an *ack ledger* kept where the crash cannot reach it, and a verifier that checks a
//! reopened pool against a prefix of that ledger.
//!
//! Ledger lines (one per step, in order):
//! - `B k1,k2`: an operation on these keys is about to start (written *before* it, so a crash
//!   after it leaves these keys uncertain until a later acknowledged step settles them);
//! - `P key parent|-`, `C name key`, `R key`: Prepare, Commit, Remove answered OK;
//! - `W key seq`: record `seq` of `key`'s log file was written and fsync returned;
//! - `S`: the workload started (the host's cue to arm its power cut).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use thinpool_client::Client;
use tokio::runtime::Runtime;

/// Bytes per appended record.
pub const RECORD: u64 = 4096;
/// The snapshots holding the fsynced logs; created before the workload starts.
pub const DATA_KEYS: [&str; 2] = ["data-0", "data-1"];
/// The appended file inside each data snapshot.
pub const LOG_FILE: &str = "log";
/// Bound on the traffic's own snapshots, so the pool does not fill over many cuts.
const MAX_TRAFFIC: usize = 8;

/// The content of record `seq` of `key`: reproducible from the ledger line alone.
pub fn record(key: &str, seq: u64) -> Vec<u8> {
    let d = Sha256::digest(format!("{key}/{seq}").as_bytes());
    let seed = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
    crate::pattern(seed, RECORD as usize)
}

/// splitmix64: a seeded sequence of choices, so a failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    Begin(Vec<String>),
    Prepare { key: String, parent: Option<String> },
    Commit { name: String, key: String },
    Remove { key: String },
    Write { key: String, seq: u64 },
    Start,
}

impl Ack {
    pub fn line(&self) -> String {
        match self {
            Ack::Begin(keys) => format!("B {}", keys.join(",")),
            Ack::Prepare { key, parent } => {
                format!("P {key} {}", parent.as_deref().unwrap_or("-"))
            }
            Ack::Commit { name, key } => format!("C {name} {key}"),
            Ack::Remove { key } => format!("R {key}"),
            Ack::Write { key, seq } => format!("W {key} {seq}"),
            Ack::Start => "S".to_string(),
        }
    }

    /// A ledger line; `None` for anything else (a torn last line, noise).
    pub fn parse(line: &str) -> Option<Ack> {
        let w: Vec<&str> = line.split_whitespace().collect();
        Some(match w.as_slice() {
            ["B", keys] => Ack::Begin(keys.split(',').map(str::to_string).collect()),
            ["P", key, parent] => Ack::Prepare {
                key: key.to_string(),
                parent: (*parent != "-").then(|| parent.to_string()),
            },
            ["C", name, key] => Ack::Commit {
                name: name.to_string(),
                key: key.to_string(),
            },
            ["R", key] => Ack::Remove {
                key: key.to_string(),
            },
            ["W", key, seq] => Ack::Write {
                key: key.to_string(),
                seq: seq.parse().ok()?,
            },
            ["S"] => Ack::Start,
            _ => return None,
        })
    }
}

/// Parses a ledger text; a line that does not parse (the cut may tear the last one) is skipped.
pub fn parse_ledger(text: &str) -> Vec<Ack> {
    text.lines()
        .filter_map(|l| Ack::parse(l.trim_end_matches('\r')))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapKind {
    Active,
    Committed,
}

/// What a ledger prefix promises about the pool.
#[derive(Debug, Default)]
pub struct Expect {
    /// Snapshots that must exist, with their kind.
    pub snaps: BTreeMap<String, SnapKind>,
    /// Keys that must not exist.
    pub gone: BTreeSet<String>,
    /// Keys an unacknowledged operation may have changed: not checked.
    pub uncertain: BTreeSet<String>,
    /// Acknowledged records per data snapshot.
    pub writes: BTreeMap<String, BTreeSet<u64>>,
    pub n_writes: usize,
    pub n_ops: usize,
}

impl Expect {
    pub fn from_ledger(acks: &[Ack]) -> Expect {
        let mut e = Expect::default();
        let mut pending: Vec<String> = Vec::new();
        let settle = |e: &mut Expect, pending: &mut Vec<String>, keys: &[&String]| {
            for k in keys {
                e.uncertain.remove(*k);
            }
            pending.clear();
        };
        for a in acks {
            match a {
                Ack::Begin(keys) => {
                    e.uncertain.extend(pending.drain(..));
                    pending = keys.clone();
                    // Uncertain from now on until the acknowledgement settles them.
                    e.uncertain.extend(keys.iter().cloned());
                }
                Ack::Prepare { key, .. } => {
                    e.n_ops += 1;
                    e.snaps.insert(key.clone(), SnapKind::Active);
                    e.gone.remove(key);
                    settle(&mut e, &mut pending, &[key]);
                }
                Ack::Commit { name, key } => {
                    e.n_ops += 1;
                    e.snaps.remove(key);
                    e.gone.insert(key.clone());
                    e.snaps.insert(name.clone(), SnapKind::Committed);
                    e.gone.remove(name);
                    settle(&mut e, &mut pending, &[name, key]);
                }
                Ack::Remove { key } => {
                    e.n_ops += 1;
                    e.snaps.remove(key);
                    e.gone.insert(key.clone());
                    settle(&mut e, &mut pending, &[key]);
                }
                Ack::Write { key, seq } => {
                    e.n_writes += 1;
                    e.writes.entry(key.clone()).or_default().insert(*seq);
                }
                Ack::Start => {}
            }
        }
        e
    }
}

/// Where acknowledgements go: written (and flushed out of the guest, or marked in the log)
/// before the workload takes its next step.
pub trait AckSink {
    fn ack(&mut self, a: &Ack) -> Result<()>;
}

/// Runs a command; Err with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("run {cmd}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}): {}",
            args.join(" "),
            out.status,
            text.trim()
        );
    }
    Ok(text)
}

/// thin_check of a pool's metadata file (the pool must not be active).
pub fn thin_check(root: &Path) -> Result<()> {
    let meta = root.join("metadata");
    run("thin_check", &[path_str(&meta)?]).map(|_| ())
}

/// Whether the pool's metadata file exists and the kernel has written its superblock: a
/// crash while the pool is being created can leave no file, or a file of zeros (the kernel
/// formats it when the pool is first loaded), which thin_check rejects but open finishes.
pub fn metadata_formatted(root: &Path) -> bool {
    let mut sb = [0u8; 4096];
    File::open(root.join("metadata"))
        .and_then(|f| f.read_exact_at(&mut sb, 0))
        .map(|()| sb.iter().any(|&b| b != 0))
        .unwrap_or(false)
}

pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

/// Starts the real thinpoold (dm backend as the guest's env says) on a small pool and waits
/// until it serves: 2 GiB data, 32 MiB metadata, 64 MiB base devices. Small on purpose: every
/// replay point and every boot re-opens it and fscks its filesystems under TCG. Panics (with
/// the daemon's log) if it does not serve, as [`crate::grpc::Daemon::wait_ready`] does.
pub fn start_daemon(root: &Path, socket: &Path) -> crate::grpc::Daemon {
    let log = root.with_extension(format!(
        "thinpoold-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    let logf = File::create(&log).expect("daemon log file");
    let child = Command::new(crate::grpc::bin("thinpoold"))
        .arg("--root")
        .arg(root)
        .arg("--socket")
        .arg(socket)
        .args(["--backend", &crate::backend().to_string()])
        .args(["--data-size", "2G", "--metadata-size", "32M"])
        .args([
            "--base-size",
            "64M",
            "--metrics-addr",
            "",
            "--overcommit-host",
        ])
        .arg("--imagefs-dir")
        .arg(root.join("imagefs"))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn thinpoold");
    let mut d = crate::grpc::Daemon {
        child: Some(child),
        root: root.to_path_buf(),
        socket: socket.to_path_buf(),
        log,
    };
    d.wait_ready();
    d
}

/// A mounted data snapshot and the next record to append.
pub struct DataSnap {
    pub key: String,
    pub dir: PathBuf,
    pub file: File,
    pub next: u64,
    pub mount: thinpool_client::Mount,
}

/// Mounts snapshot `key`'s first mount at `dir`.
fn mount_key(
    rt: &Runtime,
    c: &mut Client,
    key: &str,
    dir: &Path,
) -> Result<thinpool_client::Mount> {
    let m = rt
        .block_on(c.mounts(key))
        .with_context(|| format!("Mounts {key}"))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("Mounts {key}: no mount"))?;
    std::fs::create_dir_all(dir)?;
    thinpool_client::mount::mount(&m, dir).with_context(|| format!("mount {key}"))?;
    Ok(m)
}

/// `e2fsck -fn` of an unmounted snapshot's device.
fn fsck(key: &str, m: &thinpool_client::Mount) -> Result<()> {
    if m.r#type == "ext4" {
        run("e2fsck", &["-f", "-n", &m.source]).with_context(|| format!("fsck of {key}"))?;
    }
    Ok(())
}

/// Mounts snapshot `key` and opens its log (created if absent). With `fsck_first`: mounts
/// (journal replay), unmounts and `e2fsck -fn`s it before. Errors name the snapshot.
pub fn check_and_mount(
    rt: &Runtime,
    c: &mut Client,
    key: &str,
    mnt_base: &Path,
    fsck_first: bool,
) -> Result<DataSnap> {
    let dir = mnt_base.join(key);
    let m = mount_key(rt, c, key, &dir)?;
    if fsck_first {
        thinpool_client::mount::unmount(&dir).with_context(|| format!("unmount {key}"))?;
        fsck(key, &m)?;
        mount_key(rt, c, key, &dir)?;
    }
    let path = dir.join(LOG_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let next = file.metadata()?.len() / RECORD;
    Ok(DataSnap {
        key: key.to_string(),
        dir,
        file,
        next,
        mount: m,
    })
}

/// Unmounts the data snapshots (best effort: used on error paths too).
pub fn unmount_all(data: Vec<DataSnap>) {
    for d in data {
        drop(d.file);
        if let Err(e) = thinpool_client::mount::unmount(&d.dir) {
            eprintln!("unmount {}: {e}", d.dir.display());
        }
    }
}

/// Checks a reopened pool against `exp`: audit clean; every acknowledged snapshot there with
/// its kind, every acknowledged removal gone; each data snapshot's filesystem clean (mount,
/// unmount, e2fsck -fn) and every acknowledged record present with its exact content.
/// With `keep_mounted`, returns the data snapshots, mounted, for the next workload (fsck comes
/// before the records are read); without, each is unmounted and fscked after its records were
/// read (one mount less: replay points are many). On error the mounts it made are undone.
pub fn verify(
    rt: &Runtime,
    c: &mut Client,
    exp: &Expect,
    mnt_base: &Path,
    keep_mounted: bool,
) -> Result<Vec<DataSnap>> {
    let audit = rt.block_on(c.audit()).context("Audit")?;
    if !audit.clean {
        bail!(
            "audit not clean: leaked {:?} missing {:?} unfinished {:?} pending {:?} quarantined {:?} store {:?}",
            audit.leaked,
            audit.missing,
            audit.unfinished,
            audit.pending,
            audit.quarantined,
            audit.store_problems
        );
    }
    for (key, kind) in &exp.snaps {
        if exp.uncertain.contains(key) {
            continue;
        }
        let info = rt
            .block_on(c.stat(key))
            .map_err(|e| anyhow!("acknowledged snapshot {key} ({kind:?}) lost: {e}"))?;
        let want = match kind {
            SnapKind::Active => "active",
            SnapKind::Committed => "committed",
        };
        let got = thinpool_client::kind_name(info.kind);
        if got != want {
            bail!("snapshot {key} is {got}, acknowledged as {want}");
        }
    }
    for key in &exp.gone {
        if exp.uncertain.contains(key) || exp.snaps.contains_key(key) {
            continue;
        }
        match rt.block_on(c.stat(key)) {
            Ok(_) => bail!("snapshot {key} exists after its acknowledged removal/commit"),
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => bail!("Stat {key}: {e}"),
        }
    }
    let mut data = Vec::new();
    let res = (|| -> Result<()> {
        for key in DATA_KEYS {
            let exists = match rt.block_on(c.stat(key)) {
                Ok(_) => true,
                Err(e) if e.code() == tonic::Code::NotFound => false,
                Err(e) => bail!("Stat {key}: {e}"),
            };
            if !exists {
                if exp.writes.contains_key(key) {
                    bail!("data snapshot {key} with acknowledged writes is gone");
                }
                continue;
            }
            let d = check_and_mount(rt, c, key, mnt_base, keep_mounted)?;
            if let Some(seqs) = exp.writes.get(key) {
                let mut buf = vec![0u8; RECORD as usize];
                for &seq in seqs {
                    if seq >= d.next {
                        bail!(
                            "{key}: acknowledged record {seq} lost (file has {} records)",
                            d.next
                        );
                    }
                    d.file.read_exact_at(&mut buf, seq * RECORD)?;
                    if buf != record(key, seq) {
                        bail!("{key}: acknowledged record {seq} has wrong content");
                    }
                }
            }
            if keep_mounted {
                data.push(d);
            } else {
                let DataSnap {
                    dir, file, mount, ..
                } = d;
                drop(file);
                thinpool_client::mount::unmount(&dir).with_context(|| format!("unmount {key}"))?;
                fsck(key, &mount)?;
            }
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(data),
        Err(e) => {
            unmount_all(data);
            Err(e)
        }
    }
}

/// The workload: each step is an fsynced append to a data snapshot (70%) or one
/// Prepare/Commit/Remove (30%), acknowledged through `sink`.
pub struct Workload {
    pub rng: Rng,
    /// Makes this run's keys unique across runs (the boot number).
    pub tag: String,
    pub data: Vec<DataSnap>,
    actives: Vec<String>,
    committed: Vec<String>,
    /// Committed snapshots with children (not removable).
    parents: BTreeSet<String>,
    counter: u64,
    pub writes: u64,
    pub ops: u64,
}

impl Workload {
    /// Learns the pool's traffic snapshots (everything but the data snapshots) from List.
    pub fn new(
        rt: &Runtime,
        c: &mut Client,
        seed: u64,
        tag: &str,
        data: Vec<DataSnap>,
    ) -> Result<Workload> {
        let mut w = Workload {
            rng: Rng::new(seed),
            tag: tag.to_string(),
            data,
            actives: Vec::new(),
            committed: Vec::new(),
            parents: BTreeSet::new(),
            counter: 0,
            writes: 0,
            ops: 0,
        };
        for info in rt.block_on(c.list(&[])).context("List")? {
            if DATA_KEYS.contains(&info.name.as_str()) {
                continue;
            }
            if !info.parent.is_empty() {
                w.parents.insert(info.parent.clone());
            }
            match thinpool_client::kind_name(info.kind) {
                "committed" => w.committed.push(info.name),
                _ => w.actives.push(info.name),
            }
        }
        Ok(w)
    }

    /// Creates the data snapshots that do not exist yet and mounts them.
    pub fn ensure_data(
        &mut self,
        rt: &Runtime,
        c: &mut Client,
        mnt_base: &Path,
        sink: &mut dyn AckSink,
    ) -> Result<()> {
        for key in DATA_KEYS {
            if self.data.iter().any(|d| d.key == key) {
                continue;
            }
            sink.ack(&Ack::Begin(vec![key.to_string()]))?;
            rt.block_on(c.prepare(key, None, Default::default()))
                .with_context(|| format!("Prepare {key}"))?;
            sink.ack(&Ack::Prepare {
                key: key.to_string(),
                parent: None,
            })?;
            let d = check_and_mount(rt, c, key, mnt_base, false)?;
            self.data.push(d);
        }
        Ok(())
    }

    pub fn step(&mut self, rt: &Runtime, c: &mut Client, sink: &mut dyn AckSink) -> Result<()> {
        if !self.data.is_empty() && self.rng.below(100) < 70 {
            let i = self.rng.below(self.data.len() as u64) as usize;
            let d = &mut self.data[i];
            let seq = d.next;
            d.file
                .write_all_at(&record(&d.key, seq), seq * RECORD)
                .with_context(|| format!("append to {}", d.key))?;
            d.file
                .sync_all()
                .with_context(|| format!("fsync {}", d.key))?;
            d.next += 1;
            self.writes += 1;
            return sink.ack(&Ack::Write {
                key: d.key.clone(),
                seq,
            });
        }
        self.counter += 1;
        let n = self.counter;
        let total = self.actives.len() + self.committed.len();
        let choice = self.rng.below(3);
        self.ops += 1;
        if choice == 0 && !self.actives.is_empty() {
            // Commit an active snapshot.
            let i = self.rng.below(self.actives.len() as u64) as usize;
            let key = self.actives.swap_remove(i);
            let name = format!("c{}-{n}", self.tag);
            sink.ack(&Ack::Begin(vec![name.clone(), key.clone()]))?;
            rt.block_on(c.commit(&name, &key, Default::default()))
                .with_context(|| format!("Commit {key} as {name}"))?;
            self.committed.push(name.clone());
            sink.ack(&Ack::Commit { name, key })
        } else if (choice == 1 || total >= MAX_TRAFFIC) && total > 0 {
            // Remove an active snapshot or a committed one without children.
            let removable: Vec<String> = self
                .actives
                .iter()
                .chain(self.committed.iter().filter(|k| !self.parents.contains(*k)))
                .cloned()
                .collect();
            if removable.is_empty() {
                return Ok(());
            }
            let key = removable[self.rng.below(removable.len() as u64) as usize].clone();
            sink.ack(&Ack::Begin(vec![key.clone()]))?;
            rt.block_on(c.remove(&key))
                .with_context(|| format!("Remove {key}"))?;
            self.actives.retain(|k| *k != key);
            self.committed.retain(|k| *k != key);
            sink.ack(&Ack::Remove { key })
        } else {
            // Prepare a new snapshot, of a committed parent half of the time.
            let parent = if !self.committed.is_empty() && self.rng.below(2) == 0 {
                Some(self.committed[self.rng.below(self.committed.len() as u64) as usize].clone())
            } else {
                None
            };
            let key = format!("a{}-{n}", self.tag);
            sink.ack(&Ack::Begin(vec![key.clone()]))?;
            rt.block_on(c.prepare(&key, parent.as_deref(), Default::default()))
                .with_context(|| format!("Prepare {key}"))?;
            if let Some(p) = &parent {
                self.parents.insert(p.clone());
            }
            self.actives.push(key.clone());
            sink.ack(&Ack::Prepare { key, parent })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_lines_round_trip() {
        let acks = vec![
            Ack::Begin(vec!["a".into(), "b".into()]),
            Ack::Prepare {
                key: "a".into(),
                parent: None,
            },
            Ack::Prepare {
                key: "b".into(),
                parent: Some("c".into()),
            },
            Ack::Commit {
                name: "n".into(),
                key: "a".into(),
            },
            Ack::Remove { key: "b".into() },
            Ack::Write {
                key: "data-0".into(),
                seq: 7,
            },
            Ack::Start,
        ];
        let text: String = acks.iter().map(|a| a.line() + "\r\n").collect();
        assert_eq!(parse_ledger(&(text + "W data-0")), acks);
    }

    #[test]
    fn an_unacknowledged_operation_leaves_its_keys_uncertain() {
        let l = parse_ledger("B a\nP a -\nB b\nP b -\nB b\nB x,a\nW data-1 3\n");
        let e = Expect::from_ledger(&l);
        assert_eq!(e.snaps.get("a"), Some(&SnapKind::Active));
        assert!(e.uncertain.contains("a") && e.uncertain.contains("x"));
        assert!(e.uncertain.contains("b"));
        assert_eq!((e.n_ops, e.n_writes), (2, 1));
        let l = parse_ledger("B a\nP a -\nB n,a\nC n a\nB n\nR n\n");
        let e = Expect::from_ledger(&l);
        assert!(e.snaps.is_empty() && e.uncertain.is_empty());
        assert!(e.gone.contains("a") && e.gone.contains("n"));
    }
}
