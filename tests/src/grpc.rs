//! Fixtures for the gRPC tests: thinpoold's services in-process on a temp socket over a
//! small pool, and the real `thinpoold`/`thinctl` binaries as child processes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thinpool::AsyncPool;
use thinpool_client::Client;
use thinpool_server::{Service, StaticInfo};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{pool_dir, small_spec};

/// thinpoold's services over a fresh small pool, served in-process on `<root>/thinpool.sock`.
/// Dropping it (also on a failed test) unmounts what the test mounted, stops the server and
/// tears the pool down.
pub struct Harness {
    pub rt: Runtime,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub pool: Option<AsyncPool>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    mounts: Mutex<Vec<PathBuf>>,
}

impl Harness {
    pub fn start(test: &str) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        let root = pool_dir(test, false);
        let socket = root.join("thinpool.sock");
        let spec = small_spec(&root);
        let pool = rt
            .block_on(AsyncPool::open(spec))
            .unwrap_or_else(|e| panic!("open pool: {e}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let service = Service::new(pool.clone(), StaticInfo::default());
        let sock = socket.clone();
        let listener = {
            let _entered = rt.enter();
            thinpool_server::bind_socket(&sock, None).expect("bind socket")
        };
        let server = rt.spawn(async move {
            thinpool_server::serve(service, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        Harness {
            rt,
            root,
            socket,
            pool: Some(pool),
            stop: Some(stop),
            server: Some(server),
            mounts: Mutex::new(Vec::new()),
        }
    }

    pub fn pool(&self) -> &AsyncPool {
        self.pool.as_ref().expect("pool open")
    }

    /// Runs an async test body with a connected client.
    pub fn run<F, Fut>(&self, f: F)
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = ()>,
    {
        self.rt.block_on(async {
            let c = Client::connect(&self.socket).await.expect("connect");
            f(c).await
        })
    }

    /// Mounts a Mount the server returned at `<root>/mnt-<tag>` (unmounted on drop).
    pub fn mount(&self, m: &thinpool_client::Mount, tag: &str) -> PathBuf {
        assert!(
            !crate::on_sim(),
            "mount on the sim backend: its devices hold no filesystem; the test must skip_on_sim!"
        );
        let dir = self.root.join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&dir).expect("mount point");
        thinpool::mount::mount(&mount_spec(m), &dir)
            .unwrap_or_else(|e| panic!("mount {}: {e}", m.source));
        self.mounts.lock().unwrap().push(dir.clone());
        dir
    }

    pub fn unmount(&self, dir: &Path) {
        thinpool::mount::unmount(dir).expect("unmount");
        self.mounts.lock().unwrap().retain(|m| m != dir);
    }

    /// A [`crate::Target`] for the Mount the server returned: mounted, or on sim its node
    /// held. Give it back with [`Harness::close_target`].
    pub fn open_target(&self, m: &thinpool_client::Mount, tag: &str) -> crate::Target {
        if crate::on_sim() {
            crate::Target::held(PathBuf::from(&m.source))
        } else {
            crate::Target::Mounted(self.mount(m, tag))
        }
    }

    pub fn close_target(&self, t: crate::Target) {
        if let crate::Target::Mounted(dir) = &t {
            self.unmount(dir);
        }
    }
}

/// The engine's MountSpec for a containerd Mount.
pub fn mount_spec(m: &thinpool_client::Mount) -> thinpool::MountSpec {
    thinpool::MountSpec {
        source: PathBuf::from(&m.source),
        fs_type: m.r#type.parse().expect("fs type"),
        options: m.options.clone(),
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for m in self.mounts.lock().unwrap().drain(..).rev() {
            let _ = thinpool::mount::unmount(&m);
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let server = self.server.take();
        let pool = self.pool.take();
        self.rt.block_on(async move {
            if let Some(s) = server {
                let _ = tokio::time::timeout(Duration::from_secs(30), s).await;
            }
            let Some(pool) = pool else { return };
            let mut engine = pool.engine().clone();
            drop(pool);
            // Connections' tasks may hold the service for a moment after shutdown.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match std::sync::Arc::try_unwrap(engine) {
                    Ok(p) => {
                        if let Err(e) = p.close(true) {
                            eprintln!("teardown: {e}");
                        }
                        return;
                    }
                    Err(e) if Instant::now() < deadline => {
                        engine = e;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(_) => {
                        eprintln!("teardown: the pool is still shared; leaving it");
                        return;
                    }
                }
            }
        });
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Where a binary of this workspace (`thinpoold`, `thinctl`) is: in `THINPOOL_BIN_DIR` if
/// set (tests/sim/run copies the executables where an unprivileged user can run them), else
/// next to the test executable (target/<profile>/). `None` if it is not there.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("THINPOOL_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().ok()?;
            exe.parent()?.parent()?.to_path_buf() // target/<profile>/deps/<test>
        }
    };
    Some(dir.join(name)).filter(|p| p.is_file())
}

/// [`find_bin`], or a panic saying how to build it. `cargo test --workspace` does not build
/// other packages' binaries: build them first (`cargo build -p thinpool-server -p
/// thinpool-client`; tests/run does).
pub fn bin(name: &str) -> PathBuf {
    find_bin(name).unwrap_or_else(|| {
        panic!(
            "{name} is missing: build it first with `cargo build -p thinpool-server -p \
             thinpool-client` (same profile as the tests), or set THINPOOL_BIN_DIR"
        )
    })
}

/// A `thinpoold` child process on its own root and socket. On drop, unless stopped: taken
/// down with `thinctl pool down --force` (killed if it does not exit), then whatever is left
/// of its pool is torn down.
pub struct Daemon {
    pub child: Option<Child>,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts thinpoold with the small-pool sizes and `extra` flags; waits for the socket.
    pub fn start(root: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let mut d = Daemon::spawn(root, socket, extra);
        d.wait_ready();
        d
    }

    pub fn spawn(root: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        Daemon::spawn_env(root, socket, extra, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn spawn_env(root: &Path, socket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = root.with_extension(format!(
            "thinpoold-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let logf = std::fs::File::create(&log).expect("log file");
        // No metrics endpoint unless the test asks for one: daemons run concurrently.
        let metrics: &[&str] = if extra.contains(&"--metrics-addr") {
            &[]
        } else {
            &["--metrics-addr", ""]
        };
        let child = Command::new(bin("thinpoold"))
            .arg("--root")
            .arg(root)
            .arg("--socket")
            .arg(socket)
            .args(["--backend", &crate::backend().to_string()])
            .args(["--data-size", "4G", "--metadata-size", "64M"])
            .args(["--base-size", "256M"])
            .arg("--imagefs-dir")
            .arg(root.join("imagefs"))
            .args(metrics)
            .args(extra)
            .env("RUST_LOG", "info,thinpool_server=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn thinpoold");
        Daemon {
            child: Some(child),
            root: root.to_path_buf(),
            socket: socket.to_path_buf(),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon answers PoolStatus; panics with its log if it exits first.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "thinpoold exited ({st}) before serving:\n{}",
                    self.log_text()
                );
            }
            let ok = rt.block_on(async {
                match Client::connect(&self.socket).await {
                    Ok(mut c) => c.pool_status().await.is_ok(),
                    Err(_) => false,
                }
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "thinpoold did not serve within 120 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits for the exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("thinpoold ignored SIGTERM for 60 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs thinctl against this daemon; returns (success, stdout, stderr).
    pub fn thinctl(&self, args: &[&str]) -> (bool, String, String) {
        thinctl(&self.socket, args)
    }

    /// `thinctl mount KEY DIR`, as a [`crate::Target`]; on sim, where nothing mounts, the
    /// device's node (from `thinctl snapshot mounts KEY`), held.
    pub fn mount_target(&self, key: &str, dir: &Path) -> crate::Target {
        let run = |args: &[&str]| {
            let (ok, out, err) = self.thinctl(args);
            assert!(ok, "thinctl {args:?} failed: {err}\n{}", self.log_text());
            out
        };
        if crate::on_sim() {
            let out = run(&["snapshot", "mounts", key, "--json"]);
            let m: serde_json::Value = serde_json::from_str(&out).expect("mounts JSON");
            let node = m[0]["source"].as_str().expect("a mount source");
            crate::Target::held(PathBuf::from(node))
        } else {
            run(&["mount", key, dir.to_str().expect("UTF-8 path")]);
            crate::Target::Mounted(dir.to_path_buf())
        }
    }

    /// `thinctl umount` of what [`Daemon::mount_target`] returned (on sim: lets go of it).
    pub fn unmount_target(&self, t: crate::Target) {
        if let crate::Target::Mounted(dir) = &t {
            let (ok, _, err) = self.thinctl(&["umount", dir.to_str().expect("UTF-8 path")]);
            assert!(ok, "thinctl umount failed: {err}");
        }
    }
}

/// Runs thinctl with `--socket`; returns (success, stdout, stderr).
pub fn thinctl(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("thinctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run thinctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits up to `secs` for `c` to exit; whether it did.
fn exited_within(c: &mut Child, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if !matches!(c.try_wait(), Ok(None)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Clean up as an operator would: `thinctl pool down --force` (the daemon takes
            // down what no one uses, then exits). A daemon that does not answer is killed.
            // No bin(): it panics, and a panic in a drop during a panic aborts.
            let thinctl = find_bin("thinctl");
            if let Some(thinctl) = thinctl
                && matches!(c.try_wait(), Ok(None))
                && let Ok(mut down) = Command::new(thinctl)
                    .arg("--socket")
                    .arg(&self.socket)
                    .args(["pool", "down", "--force"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            {
                if !exited_within(&mut down, 30) {
                    let _ = down.kill();
                }
                let _ = down.wait();
                exited_within(&mut c, 30);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Tear down whatever is left (a daemon that had stopped or died keeps its devices
        // active by design; a forced take-down keeps busy ones), as a reboot would.
        if self.root.join("pool.redb").exists()
            && let Ok(p) = thinpool::Pool::open(&thinpool::PoolSpec {
                root: self.root.clone(),
                ..Default::default()
            })
        {
            let _ = p.close(true);
        }
    }
}
