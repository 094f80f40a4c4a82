//! containerd end to end: Debian's containerd 1.6 + runc with thinpoold as a proxy
//! snapshotter. The test builds a three-layer OCI image (a static busybox, files in every
//! layer, a whiteout), imports it, runs containers on it, checks `ctr snapshots` against
//! thinpoold, restarts containerd, removes everything and waits for containerd's GC to give
//! every thin device back.
//!
//! Needs containerd, runc (and containerd-shim-runc-v2) and busybox-static installed, and
//! the thinpoold/thinctl binaries built. Missing pieces make the test FAIL, never skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thinpool_tests::grpc::Daemon;
use thinpool_tests::{pattern, pool_dir};

const IMAGE: &str = "docker.io/library/thinpool-e2e:latest";
/// A namespace of our own: runc keeps its state per namespace under /run/containerd/runc,
/// shared with any other containerd on the host.
fn ns() -> String {
    format!("thinpool-e2e-{}", std::process::id())
}

fn need(tool: &str, package: &str) -> PathBuf {
    thinpool::fsutil::find_tool(Box::leak(tool.to_string().into_boxed_str())).unwrap_or_else(|_| {
        panic!(
            "{tool} is not installed: this test needs a real containerd. Install it with \
                 `apt-get install {package}`"
        )
    })
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tars `dir` (numeric owner root) into `out`.
fn tar(dir: &Path, out: &Path) {
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "--sort=name"])
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg("."));
}

/// An OCI image layout tarball with three layers; returns its path and the expected
/// sha256 of the big file in layer 3.
fn build_image(work: &Path) -> (PathBuf, String) {
    let layers = work.join("layers");
    let blobs = work.join("oci/blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut diff_ids = Vec::new();
    let mut layer_descs = Vec::new();
    let big = pattern(42, 3 << 20);
    let big_sum = sha256(&big);
    for n in 1..=3 {
        let d = layers.join(format!("l{n}"));
        std::fs::create_dir_all(d.join("etc")).unwrap();
        match n {
            1 => {
                std::fs::create_dir_all(d.join("bin")).unwrap();
                std::fs::copy(need("busybox", "busybox-static"), d.join("bin/busybox")).unwrap();
                for applet in [
                    "sh",
                    "cat",
                    "echo",
                    "sha256sum",
                    "test",
                    "sleep",
                    "ls",
                    "sync",
                ] {
                    std::os::unix::fs::symlink("busybox", d.join("bin").join(applet)).unwrap();
                }
                std::fs::create_dir_all(d.join("tmp")).unwrap();
                std::fs::write(d.join("etc/layer1"), "one\n").unwrap();
                std::fs::write(d.join("etc/shared"), "from layer 1\n").unwrap();
                std::fs::write(d.join("etc/deleteme"), "gone in layer 3\n").unwrap();
            }
            2 => {
                std::fs::write(d.join("etc/layer2"), "two\n").unwrap();
                std::fs::write(d.join("etc/shared"), "from layer 2\n").unwrap();
            }
            _ => {
                std::fs::create_dir_all(d.join("data")).unwrap();
                std::fs::write(d.join("data/layer3"), &big).unwrap();
                std::fs::write(d.join("etc/.wh.deleteme"), "").unwrap();
            }
        }
        let t = work.join(format!("l{n}.tar"));
        tar(&d, &t);
        let bytes = std::fs::read(&t).unwrap();
        let digest = sha256(&bytes);
        std::fs::write(blobs.join(&digest), &bytes).unwrap();
        diff_ids.push(format!("sha256:{digest}"));
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{digest}"),
            "size": bytes.len(),
        }));
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let config_digest = sha256(&config);
    std::fs::write(blobs.join(&config_digest), &config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    std::fs::write(blobs.join(&manifest_digest), &manifest).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "latest",
            },
            "platform": { "architecture": arch, "os": "linux" },
        }],
    });
    std::fs::write(work.join("oci/index.json"), index.to_string()).unwrap();
    std::fs::write(
        work.join("oci/oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let image = work.join("image.tar");
    tar(&work.join("oci"), &image);
    (image, big_sum)
}

/// A containerd process with its own root, state, socket and config.
struct Containerd {
    child: Option<Child>,
    dir: PathBuf,
    address: PathBuf,
    log: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, thinpool_socket: &Path, generation: u32) -> Containerd {
        Containerd::start_with(dir, thinpool_socket, generation, "")
    }

    /// [`Containerd::start`] with `proxy_extra` added to thinpool's `[proxy_plugins]` table.
    fn start_with(
        dir: &Path,
        thinpool_socket: &Path,
        generation: u32,
        proxy_extra: &str,
    ) -> Containerd {
        let exe = need("containerd", "containerd runc");
        need("runc", "runc");
        need("containerd-shim-runc-v2", "containerd");
        let address = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{ttrpc}"

[proxy_plugins]
  [proxy_plugins.thinpool]
    type = "snapshot"
    address = "{thinpool}"
{proxy_extra}

[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0s"
  startup_delay = "100ms"
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                address = address.display(),
                ttrpc = dir.join("containerd.sock.ttrpc").display(),
                thinpool = thinpool_socket.display(),
            ),
        )
        .unwrap();
        let log = dir.join(format!("containerd-{generation}.log"));
        let child = Command::new(exe)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn containerd");
        let c = Containerd {
            child: Some(child),
            dir: dir.to_path_buf(),
            address,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("ctr")
                .arg("-a")
                .arg(&c.address)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start within 60 s:\n{}",
                std::fs::read_to_string(&c.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> String {
        run(Command::new("ctr")
            .arg("-a")
            .arg(&self.address)
            .args(["-n", &ns()])
            .args(args))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Best effort: kill leftover tasks so their mounts go away before the pool does.
        if self.child.is_some() {
            let ctr = |args: &[&str]| {
                let _ = Command::new("ctr")
                    .arg("-a")
                    .arg(&self.address)
                    .args(["-n", &ns()])
                    .args(args)
                    .output();
            };
            for id in ["c1", "c2", "c3"] {
                ctr(&["task", "kill", "-s", "SIGKILL", id]);
            }
            std::thread::sleep(Duration::from_millis(500));
            for id in ["c1", "c2", "c3"] {
                ctr(&["task", "rm", "-f", id]);
                ctr(&["containers", "rm", id]);
            }
        }
        self.stop();
        // containerd's own mounts under its state dir (rootfs of tasks).
        if let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = m
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| Path::new(p).starts_with(&self.dir))
                .collect();
            points.reverse();
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// `ctr snapshots ls` rows: (key, parent, kind).
fn ctr_snapshots(c: &Containerd) -> Vec<(String, String, String)> {
    c.ctr(&["snapshots", "--snapshotter", "thinpool", "ls"])
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [k, kind] => (k.to_string(), String::new(), kind.to_string()),
                [k, p, kind] => (k.to_string(), p.to_string(), kind.to_string()),
                _ => panic!("unexpected ctr snapshots ls line {l:?}"),
            }
        })
        .collect()
}

fn thin_devices(d: &Daemon) -> usize {
    let (ok, out, err) = d.thinctl(&["device", "ls", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

fn backend_snapshots(d: &Daemon) -> Vec<serde_json::Value> {
    let (ok, out, err) = d.thinctl(&["snapshot", "ls", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The container's script: reads a file of every layer, checks the whiteout, writes its own.
/// The closing sleep: containerd 1.6's `ctr run` sometimes loses the last line of a process
/// that exits at once (seen under load: exit status 0, "written" missing from its stdout).
const SCRIPT: &str = "cat /etc/layer1 /etc/layer2 /etc/shared; sha256sum /data/layer3; \
                      test -e /etc/deleteme && echo whiteout-broken || echo whiteout-ok; \
                      echo written > /mine; cat /mine; sleep 1";

fn check_run_output(out: &str, big_sum: &str) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "one",
            "two",
            "from layer 2",
            &format!("{big_sum}  /data/layer3"),
            "whiteout-ok",
            "written",
        ],
        "container output:\n{out}"
    );
}

#[test]
fn containerd_e2e() {
    thinpool_tests::skip_on_sim!("containerd mounts the snapshots");
    let dir = pool_dir("containerd-e2e", false);
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (image, big_sum) = build_image(&work);

    let mut thinpoold = Daemon::start(&dir.join("pool"), &dir.join("thinpool.sock"), &[]);
    let base_devices = thin_devices(&thinpoold);
    assert_eq!(base_devices, 1);
    let cdir = dir.join("containerd");
    std::fs::create_dir_all(&cdir).unwrap();
    let mut ctd = Containerd::start(&cdir, &thinpoold.socket, 1);

    // Import (and unpack into thinpool).
    ctd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "thinpool",
        image.to_str().unwrap(),
    ]);
    let images = ctd.ctr(&["images", "ls", "-q"]);
    assert!(images.lines().any(|l| l == IMAGE), "images: {images}");

    // Three committed layers, one chain; the backend sees the same (namespaced keys).
    let snaps = ctr_snapshots(&ctd);
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    assert!(snaps.iter().all(|s| s.2 == "Committed"), "{snaps:?}");
    let backend = backend_snapshots(&thinpoold);
    assert_eq!(backend.len(), 3, "{backend:?}");
    for (key, parent, _) in &snaps {
        let b = backend
            .iter()
            .find(|b| b["name"].as_str().unwrap().ends_with(&format!("/{key}")))
            .unwrap_or_else(|| panic!("{key} not in thinpoold: {backend:?}"));
        assert_eq!(b["kind"], "committed");
        if parent.is_empty() {
            assert_eq!(b["parent"], "");
        } else {
            assert!(
                b["parent"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("/{parent}"))
            );
        }
    }
    let tree = ctd.ctr(&["snapshots", "--snapshotter", "thinpool", "tree"]);
    assert_eq!(tree.lines().count(), 3, "tree:\n{tree}");
    assert!(
        tree.lines().nth(2).unwrap().contains("\\_"),
        "tree:\n{tree}"
    );

    // Run a container that reads every layer and writes its own file.
    let out = ctd.ctr(&[
        "run",
        "--snapshotter",
        "thinpool",
        "--rm",
        IMAGE,
        "c1",
        "/bin/sh",
        "-c",
        SCRIPT,
    ]);
    check_run_output(&out, &big_sum);

    // A running container: its active snapshot is in ctr, in thinpoold, and its usage adds up.
    ctd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "thinpool",
        IMAGE,
        "c2",
        "/bin/sh",
        "-c",
        "cat /data/layer3 > /tmp/copy; sync; sleep 300",
    ]);
    let snaps = ctr_snapshots(&ctd);
    let active: Vec<_> = snaps.iter().filter(|s| s.2 == "Active").collect();
    assert_eq!(active.len(), 1, "{snaps:?}");
    assert_eq!(
        active[0].0, "c2",
        "ctr names the container's snapshot by its id"
    );
    let backend = backend_snapshots(&thinpoold);
    assert_eq!(backend.len(), 4, "{backend:?}");
    let b = backend
        .iter()
        .find(|b| b["name"].as_str().unwrap().ends_with("/c2"))
        .expect("c2 in thinpoold");
    assert_eq!(b["kind"], "active");
    let key = b["name"].as_str().unwrap().to_string();
    // The container copies 3 MiB and syncs; Usage counts what reached the device.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = thinpoold.thinctl(&["snapshot", "usage", &key, "--json"]);
        assert!(ok, "{err}");
        let used = serde_json::from_str::<serde_json::Value>(&out).unwrap()["size_bytes"]
            .as_i64()
            .unwrap();
        if used >= 3 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c2 wrote a 3 MiB copy; usage {used}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let c2_usage = ctd.ctr(&["snapshots", "--snapshotter", "thinpool", "usage", "c2"]);
    assert!(c2_usage.contains("MiB"), "ctr usage c2:\n{c2_usage}");
    let all_usage = ctd.ctr(&["snapshots", "--snapshotter", "thinpool", "usage"]);
    assert_eq!(all_usage.lines().count(), 5, "header + 4:\n{all_usage}");
    ctd.ctr(&["task", "kill", "-s", "SIGKILL", "c2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctd
        .ctr(&["task", "ls"])
        .lines()
        .skip(1)
        .all(|l| l.contains("STOPPED"))
    {
        assert!(Instant::now() < deadline, "c2 did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    ctd.ctr(&["task", "rm", "c2"]);
    ctd.ctr(&["containers", "rm", "c2"]);

    // Restart containerd: the image runs again from the same snapshots.
    ctd.stop();
    drop(ctd);
    let mut ctd = Containerd::start(&cdir, &thinpoold.socket, 2);
    assert_eq!(ctr_snapshots(&ctd).len(), 3);
    let out = ctd.ctr(&[
        "run",
        "--snapshotter",
        "thinpool",
        "--rm",
        IMAGE,
        "c3",
        "/bin/sh",
        "-c",
        SCRIPT,
    ]);
    check_run_output(&out, &big_sum);

    // Remove the image; containerd's GC removes the snapshots through thinpoold, and its
    // Cleanup (and thinpoold's reclaimer) gives the thin devices back.
    ctd.ctr(&["images", "rm", "--sync", IMAGE]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = thin_devices(&thinpoold);
        if n == base_devices && backend_snapshots(&thinpoold).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GC left {n} thin devices (base count {base_devices}); ctr snapshots: {:?}; \
             containerd log:\n{}",
            ctr_snapshots(&ctd),
            std::fs::read_to_string(&ctd.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(ctr_snapshots(&ctd).is_empty());
    let (ok, out, err) = thinpoold.thinctl(&["pool", "audit", "--json"]);
    assert!(ok, "audit: {out} {err}");

    // The pool is reusable: import and run once more.
    ctd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "thinpool",
        image.to_str().unwrap(),
    ]);
    let out = ctd.ctr(&[
        "run",
        "--snapshotter",
        "thinpool",
        "--rm",
        IMAGE,
        "c1",
        "/bin/sh",
        "-c",
        SCRIPT,
    ]);
    check_run_output(&out, &big_sum);
    ctd.ctr(&["images", "rm", "--sync", IMAGE]);

    ctd.stop();
    drop(ctd);
    assert!(thinpoold.stop().success(), "{}", thinpoold.log_text());
    drop(thinpoold);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `cmd`; returns its stdout as bytes (a tar), failing with its stderr.
fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A mount made by the test, unmounted when dropped (also when the test fails).
struct TestMount(PathBuf);

impl TestMount {
    /// Mounts `key` (a containerd snapshot key) at `dir` as `ctr snapshots mounts` says.
    fn new(ctd: &Containerd, key: &str, dir: &Path) -> TestMount {
        std::fs::create_dir_all(dir).unwrap();
        let target = dir.to_str().unwrap();
        let line = ctd.ctr(&[
            "snapshots",
            "--snapshotter",
            "thinpool",
            "mounts",
            target,
            key,
        ]);
        // "mount -t TYPE SOURCE TARGET -o OPTIONS": one block device per snapshot.
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() >= 6 && f[0] == "mount" && f[1] == "-t" && f[4] == target,
            "ctr snapshots mounts printed {line:?}"
        );
        let mut cmd = Command::new("mount");
        cmd.args(["-t", f[2], f[3], target]);
        if let Some(opts) = f.get(6) {
            cmd.args(["-o", opts]);
        }
        run(&mut cmd);
        TestMount(dir.to_path_buf())
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::empty())
            .or_else(|_| nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH));
    }
}

/// One tar entry as `tar -tv` shows it: (name, type char, permissions).
fn tar_entries(tar: &Path) -> Vec<(String, char, String)> {
    let out = run(Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(tar));
    out.lines()
        .map(|l| {
            // "drwxr-xr-x 0/0 0 2026-11-29 17:00 etc/" (plus " -> target" for links).
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "tar -tv line {l:?}");
            let perms = f[0];
            (
                f[5].to_string(),
                perms.chars().next().unwrap(),
                perms[1..].to_string(),
            )
        })
        .collect()
}

fn tar_file(tar: &Path, member: &str) -> String {
    run(Command::new("tar").arg("-xOf").arg(tar).arg(member))
}

/// Exports layers made on thinpool with containerd's diff service (`ctr snapshots diff`,
/// the walking differ over View/Mounts of thinpool snapshots) and checks that the tars hold
/// exactly what was written: the new and changed files, a whiteout for each deletion, and
/// no filesystem artefacts. Also starts containerd with the `exports` and `capabilities`
/// keys documented for newer containerd (1.6.20 must ignore them).
#[test]
fn containerd_layer_export() {
    thinpool_tests::skip_on_sim!("containerd mounts the snapshots");
    let dir = pool_dir("containerd-export", false);
    let mut thinpoold = Daemon::start(&dir.join("pool"), &dir.join("thinpool.sock"), &[]);
    let cdir = dir.join("containerd");
    std::fs::create_dir_all(&cdir).unwrap();
    let extra = format!(
        "    capabilities = []\n    exports = {{ root = \"{}\" }}\n",
        dir.join("pool/imagefs").display()
    );
    let mut ctd = Containerd::start_with(&cdir, &thinpoold.socket, 1, &extra);
    let snap = |args: &[&str]| {
        let mut a = vec!["snapshots", "--snapshotter", "thinpool"];
        a.extend_from_slice(args);
        ctd.ctr(&a)
    };
    let export = |name: &str| -> PathBuf {
        let tar = run_bytes(
            Command::new("ctr")
                .arg("-a")
                .arg(&ctd.address)
                .args(["-n", &ns()])
                .args(["snapshots", "--snapshotter", "thinpool", "diff"])
                .args(["--media-type", "application/vnd.oci.image.layer.v1.tar"])
                .arg(name),
        );
        let path = dir.join(format!("{name}.tar"));
        std::fs::write(&path, tar).unwrap();
        path
    };
    let names = |entries: &[(String, char, String)]| -> Vec<String> {
        let mut v: Vec<String> = entries.iter().map(|e| e.0.clone()).collect();
        v.sort();
        v
    };

    // The parent layer: files in a directory, a directory tree to delete later.
    snap(&["prepare", "k1"]);
    {
        let m = TestMount::new(&ctd, "k1", &dir.join("mnt-k1"));
        std::fs::create_dir_all(m.path("etc")).unwrap();
        std::fs::create_dir_all(m.path("olddir/sub")).unwrap();
        for (f, data) in [
            ("etc/keep", "keep\n"),
            ("etc/modify", "old\n"),
            ("etc/delete", "bye\n"),
            ("etc/mode", "mode\n"),
            ("olddir/a", "a\n"),
            ("olddir/sub/b", "b\n"),
        ] {
            std::fs::write(m.path(f), data).unwrap();
        }
    }
    snap(&["commit", "l1", "k1"]);

    // The child: modifies, deletes (a file and a directory tree), adds, changes a mode.
    snap(&["prepare", "k2", "l1"]);
    {
        let m = TestMount::new(&ctd, "k2", &dir.join("mnt-k2"));
        std::fs::write(m.path("etc/modify"), "new contents\n").unwrap();
        std::fs::remove_file(m.path("etc/delete")).unwrap();
        std::fs::remove_dir_all(m.path("olddir")).unwrap();
        std::fs::write(m.path("etc/new"), "new\n").unwrap();
        std::fs::create_dir_all(m.path("newdir")).unwrap();
        std::fs::write(m.path("newdir/x"), "x\n").unwrap();
        std::os::unix::fs::symlink("etc/keep", m.path("link")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(m.path("etc/mode"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    snap(&["commit", "l2", "k2"]);

    // The child's layer: exactly its changes.
    let l2 = export("l2");
    let entries = tar_entries(&l2);
    assert_eq!(
        names(&entries),
        [
            ".wh.olddir",
            "etc/",
            "etc/.wh.delete",
            "etc/mode",
            "etc/modify",
            "etc/new",
            "link",
            "newdir/",
            "newdir/x",
        ],
        "l2's tar:\n{entries:?}"
    );
    for (name, kind, perms) in &entries {
        let base = name.rsplit('/').find(|s| !s.is_empty()).unwrap();
        if base.starts_with(".wh.") {
            assert_eq!(*kind, '-', "whiteout {name} is a regular file");
            assert_eq!(tar_file(&l2, name), "", "whiteout {name} is empty");
        }
        if name == "etc/mode" {
            assert_eq!(perms, "rw-------", "mode change exported");
        }
        if name == "link" {
            assert_eq!(*kind, 'l');
        }
    }
    assert_eq!(tar_file(&l2, "etc/modify"), "new contents\n");
    assert_eq!(tar_file(&l2, "etc/new"), "new\n");
    assert_eq!(tar_file(&l2, "newdir/x"), "x\n");

    // An active snapshot exports too (what `commit` of a running container does): its
    // Mounts, against its parent.
    snap(&["prepare", "k3", "l2"]);
    {
        let m = TestMount::new(&ctd, "k3", &dir.join("mnt-k3"));
        std::fs::write(m.path("newdir/y"), "y\n").unwrap();
    }
    let k3 = export("k3");
    let entries = tar_entries(&k3);
    assert_eq!(
        names(&entries),
        ["newdir/", "newdir/y"],
        "k3's tar:\n{entries:?}"
    );
    assert_eq!(tar_file(&k3, "newdir/y"), "y\n");

    // The parentless layer: what was written and nothing else (no lost+found).
    let l1 = export("l1");
    let entries = tar_entries(&l1);
    assert_eq!(
        names(&entries),
        [
            "etc/",
            "etc/delete",
            "etc/keep",
            "etc/mode",
            "etc/modify",
            "olddir/",
            "olddir/a",
            "olddir/sub/",
            "olddir/sub/b",
        ],
        "l1's tar:\n{entries:?}"
    );
    assert_eq!(tar_file(&l1, "etc/modify"), "old\n");

    // Everything goes away again, the diff's temporary views included. containerd removes
    // snapshots from thinpool in its GC, which skips deletions that arrive while a
    // collection runs (gc/scheduler: events older than the last collection are dropped)
    // until the next deletion: make one (a scratch snapshot) while waiting.
    for key in ["k3", "l2", "l1"] {
        snap(&["rm", key]);
    }
    assert!(ctr_snapshots(&ctd).is_empty());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut nudges = 0;
    let mut last_nudge = Instant::now();
    while thin_devices(&thinpoold) != 1 || !backend_snapshots(&thinpoold).is_empty() {
        assert!(
            Instant::now() < deadline,
            "devices left: {:?}; thinctl device ls: {}",
            backend_snapshots(&thinpoold),
            thinpoold.thinctl(&["device", "ls"]).1
        );
        std::thread::sleep(Duration::from_secs(1));
        // Seldom: each nudge is itself a deletion in flight, and on a loaded machine nudging
        // every few seconds keeps one pending for ever.
        if last_nudge.elapsed() >= Duration::from_secs(10) {
            let scratch = format!("gc-nudge-{nudges}");
            snap(&["prepare", &scratch]);
            snap(&["rm", &scratch]);
            nudges += 1;
            last_nudge = Instant::now();
        }
    }
    ctd.stop();
    drop(ctd);
    assert!(thinpoold.stop().success(), "{}", thinpoold.log_text());
    drop(thinpoold);
    let _ = std::fs::remove_dir_all(&dir);
}
