//! A case that stops making progress must not hang the whole run silently: every wait of the
//! driver is bounded, but a process stuck in the kernel (a dm ioctl, I/O on a suspended
//! device) can block a `wait()` or a read without end. The watchdog notices a case running
//! too long, prints what every relevant process waits on (kernel stacks, dm devices'
//! suspend state, the daemon's log), and ends the run with a failure line and the summary
//! line, so that the VM harness reports why instead of timing out.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The processes whose waits explain a stuck case (besides any in state D).
const WATCHED: &[&str] = &[
    "thinpoold",
    "thinctl",
    "torture",
    "thin_check",
    "thin_dump",
    "thin_ls",
    "mount",
    "umount",
    "mkfs.ext4",
    "mkfs.xfs",
    "e2fsck",
    "xfs_growfs",
    "resize2fs",
];

#[derive(Default)]
struct State {
    case: Option<(String, Instant)>,
    dumped: bool,
}

/// Shared between the driver (which names the running case) and the watchdog thread.
#[derive(Clone)]
pub struct Watchdog {
    state: Arc<Mutex<State>>,
    passed: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl Watchdog {
    /// Starts the watchdog thread: after `warn` in one case it prints the diagnostics, after
    /// `give_up` it prints `FAILED <case>` and the totals and exits the process with 1.
    /// `work` is where the daemon's logs (`thinpoold-N.log`) are.
    pub fn start(work: PathBuf, warn: Duration, give_up: Duration) -> Watchdog {
        let w = Watchdog {
            state: Arc::new(Mutex::new(State::default())),
            passed: Arc::new(AtomicUsize::new(0)),
            failed: Arc::new(AtomicUsize::new(0)),
        };
        let w2 = w.clone();
        std::thread::Builder::new()
            .name("torture-watchdog".into())
            .spawn(move || w2.watch(&work, warn, give_up))
            .expect("spawn the watchdog thread");
        w
    }

    pub fn begin(&self, case: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.case = Some((case.to_string(), Instant::now()));
        s.dumped = false;
    }

    pub fn end(&self, ok: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).case = None;
        let n = if ok { &self.passed } else { &self.failed };
        n.fetch_add(1, Ordering::SeqCst);
    }

    fn watch(&self, work: &Path, warn: Duration, give_up: Duration) {
        loop {
            std::thread::sleep(Duration::from_secs(5));
            let (case, running, dump) = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let Some((case, t)) = s.case.clone() else {
                    continue;
                };
                let running = t.elapsed();
                let dump = running >= warn && !s.dumped;
                if dump {
                    s.dumped = true;
                }
                (case, running, dump)
            };
            if dump {
                eprintln!(
                    "watchdog: {case} has run for {} s; what it waits on:\n{}",
                    running.as_secs(),
                    diagnostics(work)
                );
            }
            if running >= give_up {
                println!(
                    "FAILED {case} ({:.1}s): no progress for {} s (the watchdog's diagnostics \
                     are above, on stderr)",
                    running.as_secs_f64(),
                    give_up.as_secs()
                );
                println!(
                    "{} passed, {} failed",
                    self.passed.load(Ordering::SeqCst),
                    self.failed.load(Ordering::SeqCst) + 1
                );
                std::process::exit(1);
            }
        }
    }
}

/// Kernel stacks of the watched and the blocked processes, the dm devices' state, and the
/// newest daemon log's tail.
pub fn diagnostics(work: &Path) -> String {
    let mut out = String::new();
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    for pid in pids {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let comm = read_trimmed(&dir.join("comm"));
        let state = proc_state(&dir.join("stat"));
        if state != Some('D') && !WATCHED.contains(&comm.as_str()) {
            continue;
        }
        let cmdline = fs::read(dir.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push_str(&format!(
            "  pid {pid} {comm} [{}]: {}\n",
            state.unwrap_or('?'),
            cmdline.trim()
        ));
        let tasks: Vec<PathBuf> = fs::read_dir(dir.join("task"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for task in tasks {
            let tstate = proc_state(&task.join("stat"));
            let wchan = read_trimmed(&task.join("wchan"));
            // Threads parked in the runtime's idle wait say nothing; the rest do.
            if tstate == Some('S') && (wchan == "futex_wait_queue" || wchan == "do_epoll_wait") {
                continue;
            }
            out.push_str(&format!(
                "    task {} {} [{}] wchan {wchan}\n",
                task.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                read_trimmed(&task.join("comm")),
                tstate.unwrap_or('?'),
            ));
            for line in read_trimmed(&task.join("stack")).lines().take(16) {
                out.push_str(&format!("      {line}\n"));
            }
        }
    }
    out.push_str("  dm devices:\n");
    let mut dms: Vec<PathBuf> = fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("dm-"))
                })
                .collect()
        })
        .unwrap_or_default();
    dms.sort();
    for dm in dms {
        let holders = fs::read_dir(dm.join("holders"))
            .map(|d| d.count())
            .unwrap_or(0);
        out.push_str(&format!(
            "    {} {} suspended={} holders={holders}\n",
            dm.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            read_trimmed(&dm.join("dm/name")),
            read_trimmed(&dm.join("dm/suspended")),
        ));
    }
    out.push_str("  mounts under the work directory:\n");
    let work_s = work.display().to_string();
    for line in fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&work_s))
    {
        out.push_str(&format!("    {line}\n"));
    }
    if let Some(log) = newest_daemon_log(work) {
        out.push_str(&format!("  {} (last 30 lines):\n", log.display()));
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(30)..] {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

fn read_trimmed(p: &Path) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The state letter of /proc/PID/stat (after the parenthesised comm, which may hold spaces).
fn proc_state(stat: &Path) -> Option<char> {
    let s = fs::read_to_string(stat).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

fn newest_daemon_log(work: &Path) -> Option<PathBuf> {
    fs::read_dir(work)
        .ok()?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("thinpoold-") && n.ends_with(".log"))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, p)| p)
}
