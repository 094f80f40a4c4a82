//! Shared fixtures for the integration suite: which backend to test, where pools live, and a
//! pool guard that cleans up (unmounts, tears down) even when a test fails.
//!
//! The suite runs natively on the reflink backend and inside the VM (`tests/vm/run`) on dm;
//! `THINPOOL_TEST_BACKEND` selects the backend, `THINPOOL_TEST_DIR` the directory for pools
//! (it must be on a real filesystem: direct I/O on loop devices fails on tmpfs).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub mod grpc;
pub mod http;
pub mod iobench;
pub mod live;
pub mod model;
pub mod power;
pub mod torture;

use sha2::{Digest, Sha256};
use thinpool::{
    BackendKind, Bytes, DeviceKind, DeviceName, MountSpec, Pool, PoolSpec, SnapshotRequest,
};

/// The backend under test: `THINPOOL_TEST_BACKEND=dm|reflink|sim`, reflink by default.
pub fn backend() -> BackendKind {
    match std::env::var("THINPOOL_TEST_BACKEND").as_deref() {
        Ok("dm") => BackendKind::Dm,
        Ok("reflink") | Err(_) => BackendKind::Reflink,
        Ok("sim") => BackendKind::Sim,
        Ok(other) => panic!("THINPOOL_TEST_BACKEND={other}: expected dm, reflink or sim"),
    }
}

/// Whether the suite runs on the simulated backend (no kernel objects, no filesystems).
pub fn on_sim() -> bool {
    backend() == BackendKind::Sim
}

/// Prints one line, `SKIP <test>: <what>`, to the real stderr (not captured by libtest, so
/// it shows in every run): the current test, or a part of it (`what` says which), does not
/// run here.
pub fn report_skip(what: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {what}");
}

/// Returns from the current test on the sim backend, saying why in one line (see
/// [`report_skip`]). For tests that mount devices, need loop devices, mkfs, containerd or
/// real filesystem contents: sim devices are plain files.
#[macro_export]
macro_rules! skip_on_sim {
    ($why:expr) => {
        if $crate::on_sim() {
            $crate::report_skip(&format!("not on sim ({})", $why));
            return;
        }
    };
}

/// Holds `node` as a mount would on the sim backend: open (read-write), with a shared
/// `flock` on the device file, which the sim backend treats as "in use" (deactivate and
/// delete refuse it) until the returned file is dropped.
pub fn hold_sim_node(node: &Path) -> File {
    use std::os::fd::AsRawFd;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(node)
        .unwrap_or_else(|e| panic!("open {}: {e}", node.display()));
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH) };
    assert_eq!(rc, 0, "flock {}", node.display());
    f
}

/// A file of the source tree, by its path from the workspace root: under
/// `THINPOOL_SRC_DIR` if set (tests/sim/run copies what the tests read where an unprivileged
/// user can read it), else in this checkout.
pub fn source_path(rel: &str) -> PathBuf {
    match std::env::var_os("THINPOOL_SRC_DIR") {
        Some(d) => PathBuf::from(d).join(rel),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel),
    }
}

/// `THINPOOL_TEST_REBOOT_PHASE`: unset natively (a test simulates the reboot itself); 1 or
/// 2 in the VM, which really reboots between the phases.
pub fn reboot_phase() -> Option<u32> {
    std::env::var("THINPOOL_TEST_REBOOT_PHASE")
        .ok()
        .and_then(|p| p.parse().ok())
}

/// The directory under which tests make pools.
pub fn base_dir() -> PathBuf {
    std::env::var_os("THINPOOL_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/thinpool-tests"))
}

/// A fresh, empty directory for one test's pool. `stable` names survive across processes
/// (reboot and crash tests); others get a unique suffix.
pub fn pool_dir(name: &str, stable: bool) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = if stable {
        base_dir().join(name)
    } else {
        base_dir().join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    };
    fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// A small pool: fast to make, big enough for every test.
pub fn small_spec(root: &Path) -> PoolSpec {
    PoolSpec {
        root: root.to_path_buf(),
        backend: Some(backend()),
        data_size: Some(Bytes::gib(4)),
        metadata_size: Some(Bytes::mib(64)),
        base_size: Some(Bytes::mib(256)),
        ..PoolSpec::default()
    }
}

pub fn name(s: &str) -> DeviceName {
    DeviceName::new(s).expect("valid test name")
}

pub fn request(n: &str, parent: Option<&str>, kind: DeviceKind) -> SnapshotRequest {
    SnapshotRequest {
        name: name(n),
        parent: parent.map(name),
        kind,
        size: None,
        labels: BTreeMap::new(),
        activate: false,
    }
}

/// An open pool plus the mounts a test made; dropping it unmounts them and tears the pool
/// down, so a failed test leaves no devices behind for the next one.
pub struct TestPool {
    pub pool: Option<Pool>,
    pub root: PathBuf,
    mounts: Vec<PathBuf>,
    remove_dir: bool,
}

impl TestPool {
    pub fn open(spec: &PoolSpec) -> TestPool {
        let pool = Pool::open(spec).unwrap_or_else(|e| panic!("open pool: {e}"));
        TestPool {
            pool: Some(pool),
            root: spec.root.clone(),
            mounts: Vec::new(),
            remove_dir: true,
        }
    }

    /// A fresh small pool in a unique directory.
    pub fn small(test: &str) -> TestPool {
        TestPool::open(&small_spec(&pool_dir(test, false)))
    }

    pub fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("pool is open")
    }

    /// Keeps the pool directory when the guard drops (for tests spanning a reboot).
    pub fn keep_dir(&mut self) {
        self.remove_dir = false;
    }

    /// Activates and mounts `dev` at `<root>/mnt-<dev>`; returns the mount point.
    pub fn mount(&mut self, dev: &str) -> PathBuf {
        let spec = self.pool().activate(&name(dev)).expect("activate");
        self.mount_spec(dev, &spec)
    }

    pub fn mount_spec(&mut self, dev: &str, spec: &MountSpec) -> PathBuf {
        assert!(
            !on_sim(),
            "mount of {dev} on the sim backend: its devices hold no filesystem; the test must \
             skip_on_sim! or write to the node"
        );
        let dir = self.root.join(format!("mnt-{}", dev.replace('/', "_")));
        fs::create_dir_all(&dir).expect("mount point");
        thinpool::mount::mount(spec, &dir).unwrap_or_else(|e| panic!("mount {dev}: {e}"));
        self.mounts.push(dir.clone());
        dir
    }

    pub fn unmount(&mut self, dir: &Path) {
        thinpool::mount::unmount(dir).expect("unmount");
        self.mounts.retain(|m| m != dir);
    }

    /// Activates `dev` and makes it a [`Target`] for data: mounted, or on sim its node held
    /// (which makes it busy as a mount does). Give it back with [`TestPool::close_target`].
    pub fn open_target(&mut self, dev: &str) -> Target {
        if on_sim() {
            let node = self.pool().activate(&name(dev)).expect("activate").source;
            Target::held(node)
        } else {
            Target::Mounted(self.mount(dev))
        }
    }

    /// Unmounts (or lets go of) a target.
    pub fn close_target(&mut self, t: Target) {
        if let Target::Mounted(dir) = &t {
            self.unmount(dir);
        }
    }

    /// Writes `file` with `data` into `dev` (mounted for the moment; on sim, into its node).
    pub fn put_file(&mut self, dev: &str, file: &str, data: &[u8]) {
        let t = self.open_target(dev);
        t.write(file, data);
        self.close_target(t);
    }

    /// Reads `file` from `dev`, as [`TestPool::put_file`] wrote it.
    pub fn get_file(&mut self, dev: &str, file: &str) -> Vec<u8> {
        let t = self.open_target(dev);
        let data = t.read(file);
        self.close_target(t);
        data
    }

    /// Unmounts everything and closes the pool; `teardown` also removes its kernel objects
    /// (as a reboot would).
    pub fn close(&mut self, teardown: bool) {
        for m in self.mounts.drain(..).rev() {
            let _ = thinpool::mount::unmount(&m);
        }
        if let Some(p) = self.pool.take() {
            p.close(teardown).expect("close pool");
        }
    }

    pub fn reopen(&mut self, spec: &PoolSpec) {
        self.close(false);
        self.pool = Some(Pool::open(spec).unwrap_or_else(|e| panic!("reopen pool: {e}")));
    }

    /// Asserts the audit finds nothing leaked, missing or unfinished.
    pub fn assert_audit_clean(&self) {
        let report = self.pool().audit().expect("audit");
        assert!(report.is_clean(), "audit: {report:?}");
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        self.close(true);
        if self.remove_dir {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Writes `data` to `path` and syncs it.
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .read_to_end(&mut v)
        .expect("read");
    v
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so checksums mean something.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Allocated bytes of a (sparse) file.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("stat").blocks() * 512
}

/// What [`fill`] wrote before it stopped.
#[derive(Debug)]
pub struct Filled {
    /// File name and SHA-256 of every file whose write and fsync succeeded.
    pub files: Vec<(String, String)>,
    /// The error that stopped the writer; `None` if it reached its limit.
    pub error: Option<std::io::Error>,
    /// Time from the last successful fsync to the error: how promptly a full pool fails.
    pub failed_after: std::time::Duration,
}

/// Size of each file [`fill`] writes.
pub const FILL_FILE: usize = 4 << 20;

/// Writes files `<prefix><n>` of [`FILL_FILE`] pseudo-random bytes into `dir`, each synced,
/// until a write or fsync fails or `limit` bytes are written, on a thread; waits at most
/// `deadline` for it (a writer hung on a full pool fails the test instead of hanging it).
pub fn fill(dir: &Path, prefix: &str, limit: Bytes, deadline: std::time::Duration) -> Filled {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        let mut files = Vec::new();
        let mut last_ok = std::time::Instant::now();
        let mut written = 0u64;
        let mut n = 0u64;
        let error = loop {
            if written >= limit.0 {
                break None;
            }
            let name = format!("{prefix}{n}");
            // Distinct contents per prefix and file, so a misplaced block shows.
            let seed = prefix
                .bytes()
                .fold(n, |h, b| h.wrapping_mul(31).wrapping_add(b.into()) << 1);
            let data = pattern(seed, FILL_FILE);
            let wrote = File::create(dir.join(&name))
                .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()));
            match wrote {
                Ok(()) => {
                    files.push((name, sha256_hex(&data)));
                    last_ok = std::time::Instant::now();
                    written += data.len() as u64;
                    n += 1;
                }
                Err(e) => break Some(e),
            }
        };
        let _ = tx.send(Filled {
            files,
            error,
            failed_after: last_ok.elapsed(),
        });
    });
    rx.recv_timeout(deadline)
        .unwrap_or_else(|_| panic!("the writer hung: no result within {deadline:?}"))
}

/// Asserts every file in `files` under `dir` has its checksum.
pub fn verify_files(dir: &Path, files: &[(String, String)]) {
    for (file, sum) in files {
        assert_eq!(
            &sha256_hex(&read_file(&dir.join(file))),
            sum,
            "{file} in {}",
            dir.display()
        );
    }
}

/// What of a pool is still in the kernel: [`kernel_leftovers_under`] `root`, and dm devices
/// named for the pool's `tag` (`thinpool-<tag>-...`). Empty after a take-down.
pub fn kernel_leftovers(root: &Path, tag: &str) -> Vec<String> {
    let mut out = kernel_leftovers_under(root);
    let dm_prefix = format!("thinpool-{tag}-");
    for e in fs::read_dir("/sys/block").expect("/sys/block").flatten() {
        if let Ok(n) = fs::read_to_string(e.path().join("dm/name"))
            && n.trim().starts_with(&dm_prefix)
        {
            let dev = e.file_name().to_string_lossy().into_owned();
            out.push(format!("dm device {} (/dev/{dev})", n.trim()));
        }
    }
    out
}

/// Loop devices whose backing file, and mounts whose mount point, lie under `dir`: what a
/// test must not leave behind. On sim, also the runtime state (active devices) of a pool
/// whose root is `dir`.
pub fn kernel_leftovers_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir.join("sim/run")) {
        for e in entries.flatten() {
            out.push(format!("sim runtime entry {}", e.path().display()));
        }
    }
    for e in fs::read_dir("/sys/block").expect("/sys/block").flatten() {
        let dev = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim()).starts_with(dir)
        {
            out.push(format!("loop device /dev/{dev} of {}", b.trim()));
        }
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for target in mountinfo.lines().filter_map(|l| l.split(' ').nth(4)) {
        if Path::new(target).starts_with(dir) {
            out.push(format!("mount at {target}"));
        }
    }
    out
}

/// Where a test puts data into a device: a mounted filesystem, or on sim (where nothing
/// mounts) the device's node, held open with a lock so that the device is busy as a mounted
/// one is ([`hold_sim_node`]) and keeps working after a deferred deactivation, as a mount
/// does; files there are records of [`sim_files`].
pub enum Target {
    Mounted(PathBuf),
    Held { node: PathBuf, file: File },
}

impl Target {
    /// Holds a sim device's node.
    pub fn held(node: PathBuf) -> Target {
        let file = hold_sim_node(&node);
        Target::Held { node, file }
    }

    /// Writes `file` and syncs it.
    pub fn write(&self, file: &str, data: &[u8]) {
        match self {
            Target::Mounted(dir) => write_file(&dir.join(file), data),
            Target::Held { file: f, .. } => sim_files::put(f, file, data),
        }
    }

    /// Reads `file`; panics if it is not there.
    pub fn read(&self, file: &str) -> Vec<u8> {
        match self {
            Target::Mounted(dir) => read_file(&dir.join(file)),
            Target::Held { node, file: f } => sim_files::get(f, file)
                .unwrap_or_else(|| panic!("no file {file} in {}", node.display())),
        }
    }

    pub fn exists(&self, file: &str) -> bool {
        match self {
            Target::Mounted(dir) => dir.join(file).exists(),
            Target::Held { file: f, .. } => sim_files::get(f, file).is_some(),
        }
    }

    /// [`fill`] into this target. On sim nothing fills up (the device files live on the
    /// host's filesystem), so it stops at `limit`.
    pub fn fill(&self, prefix: &str, limit: Bytes, deadline: std::time::Duration) -> Filled {
        match self {
            Target::Mounted(dir) => fill(dir, prefix, limit, deadline),
            Target::Held { file: f, .. } => {
                let mut files = Vec::new();
                let mut n = 0u64;
                while (n * FILL_FILE as u64) < limit.0 {
                    let name = format!("{prefix}{n}");
                    let data = pattern(n ^ prefix.len() as u64, FILL_FILE);
                    sim_files::put(f, &name, &data);
                    files.push((name, sha256_hex(&data)));
                    n += 1;
                }
                Filled {
                    files,
                    error: None,
                    failed_after: std::time::Duration::ZERO,
                }
            }
        }
    }

    /// Asserts every file in `files` has its checksum.
    pub fn verify(&self, files: &[(String, String)]) {
        match self {
            Target::Mounted(dir) => verify_files(dir, files),
            Target::Held { node, file: f } => {
                for (file, sum) in files {
                    let data = sim_files::get(f, file)
                        .unwrap_or_else(|| panic!("{file} missing in {}", node.display()));
                    assert_eq!(&sha256_hex(&data), sum, "{file} in {}", node.display());
                }
            }
        }
    }
}

/// Files on a sim device, which has no filesystem: each write appends a record (a header
/// naming the file, then its bytes) at the next 4 KiB boundary after the last record, as a
/// filesystem puts new files in new blocks; a read scans the records, the last of a name
/// wins. A snapshot (a copy of its origin's file) sees its origin's records.
pub mod sim_files {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    const MAGIC: &[u8; 8] = b"SIMFILE1";
    const HEADER: u64 = 8 + 4 + 8;

    /// Each record: (offset of its data, its length, its name).
    fn records(f: &File) -> (Vec<(u64, u64, String)>, u64) {
        let len = f.metadata().expect("stat node").len();
        let mut out = Vec::new();
        let mut off = 0u64;
        while off + HEADER <= len {
            let mut h = [0u8; HEADER as usize];
            f.read_exact_at(&mut h, off).expect("read record header");
            if &h[..8] != MAGIC {
                break;
            }
            let name_len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as u64;
            let data_len = u64::from_le_bytes(h[12..20].try_into().unwrap());
            let mut name = vec![0u8; name_len as usize];
            f.read_exact_at(&mut name, off + HEADER)
                .expect("read record name");
            let data_at = off + HEADER + name_len;
            out.push((
                data_at,
                data_len,
                String::from_utf8_lossy(&name).into_owned(),
            ));
            off = (data_at + data_len).next_multiple_of(4096);
        }
        (out, off)
    }

    /// Appends `name` with `data` to the device open as `f` (read-write), synced.
    pub fn put(f: &File, name: &str, data: &[u8]) {
        let (_, end) = records(f);
        let mut rec = Vec::with_capacity(HEADER as usize + name.len() + data.len());
        rec.extend_from_slice(MAGIC);
        rec.extend_from_slice(&(name.len() as u32).to_le_bytes());
        rec.extend_from_slice(&(data.len() as u64).to_le_bytes());
        rec.extend_from_slice(name.as_bytes());
        rec.extend_from_slice(data);
        let size = f.metadata().expect("stat node").len();
        assert!(
            end + rec.len() as u64 <= size,
            "the device is full: {} bytes of files do not fit",
            rec.len()
        );
        f.write_all_at(&rec, end).expect("write record");
        f.sync_all().expect("fsync node");
    }

    /// The last record named `name` in the device open as `f`.
    pub fn get(f: &File, name: &str) -> Option<Vec<u8>> {
        let (recs, _) = records(f);
        let (at, len, _) = recs.into_iter().rev().find(|(_, _, n)| n == name)?;
        let mut data = vec![0u8; len as usize];
        f.read_exact_at(&mut data, at).expect("read record");
        Some(data)
    }
}
