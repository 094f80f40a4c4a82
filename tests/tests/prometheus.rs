//! A real scrape: the Prometheus server (Debian's `prometheus` package; CI installs it)
//! scrapes thinpoold's /metrics, and its query API returns the data-used figure that
//! `thinctl pool status --json` reports.
//!
//! Needs `target/<profile>/thinpoold` and `thinctl` (tests/run builds them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thinpool_tests::grpc::Daemon;
use thinpool_tests::http::{self, free_port};
use thinpool_tests::{pattern, pool_dir};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A running Prometheus server, killed on drop (every path, panics included).
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second as job `job`, with its data in `dir`.
    fn start(dir: &Path, job: &str, target: &str) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is not installed (apt-get install prometheus; CI installs it)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: {job}\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn prometheus");
        Prometheus { child, addr, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The instant query's vector result (`data.result`), or why there is none (yet).
    fn query(&mut self, q: &str) -> Result<Vec<serde_json::Value>, String> {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("prometheus exited ({st}):\n{}", self.log_text());
        }
        let path = format!("/api/v1/query?query={}", urlencode(q));
        let body = http::get(&self.addr, &path)?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("query {q:?}: {v}"));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of the single sample `q` returns, once Prometheus has one.
    fn value(&mut self, q: &str) -> Result<f64, String> {
        let r = self.query(q)?;
        let [sample] = r.as_slice() else {
            return Err(format!("{q}: {} samples: {r:?}", r.len()));
        };
        sample["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{q}: no value in {sample}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn status_json(d: &Daemon) -> serde_json::Value {
    let (ok, out, err) = d.thinctl(&["pool", "status", "--json"]);
    assert!(ok, "thinctl pool status: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn prometheus_scrapes_thinpoold() {
    let dir = pool_dir("prometheus", false);
    let root = dir.join("pool");
    let socket = dir.join("run").join("thinpool.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&root, &socket, &["--metrics-addr", &metrics]);

    // Data in a device first, so that the figure is not just the empty pool's.
    let ok_ = |args: &[&str]| {
        let (ok, out, err) = d.thinctl(args);
        assert!(ok, "thinctl {args:?}: {err}");
        out
    };
    let before = status_json(&d)["data_used_bytes"].as_u64().unwrap();
    ok_(&["snapshot", "prepare", "k1"]);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let t = d.mount_target("k1", &mnt);
    t.write("bulk", &pattern(7, 16 << 20));
    d.unmount_target(t);
    let after = status_json(&d)["data_used_bytes"].as_u64().unwrap();
    assert!(
        after >= before + (8 << 20),
        "16 MiB written, data used went from {before} to {after}"
    );

    let job = "thinpoold";
    let mut prom = Prometheus::start(&dir.join("prometheus"), job, &metrics);
    // The pool is idle now: wait (bounded) until Prometheus has scraped a sample equal to
    // what pool status says. A scrape may predate a last settle of the filesystem, hence
    // comparing against a fresh status each round.
    let deadline = Instant::now() + Duration::from_secs(60);
    let used = loop {
        let want = status_json(&d)["data_used_bytes"].as_u64().unwrap();
        let last = match prom.value("thinpool_data_used_bytes") {
            Ok(v) if v as u64 == want => break want,
            Ok(v) => format!("prometheus has {v}, pool status says {want}"),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "no agreeing thinpool_data_used_bytes sample from Prometheus within 60 s \
             (last: {last})\nprometheus log:\n{}\nthinpoold log:\n{}",
            prom.log_text(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(used >= after.min(before + (8 << 20)), "{used}");
    let up = prom
        .value(&format!("up{{job=\"{job}\"}}"))
        .unwrap_or_else(|e| panic!("up: {e}\n{}", prom.log_text()));
    assert_eq!(up, 1.0, "Prometheus scrapes thinpoold successfully");
    // The labelled and typed series arrive too: mode, and the gRPC counts.
    assert_eq!(prom.value("thinpool_pool_mode{mode=\"rw\"}").unwrap(), 1.0);
    let prepares = prom
        .value("thinpool_grpc_requests_total{method=\"Prepare\",code=\"OK\"}")
        .unwrap();
    assert_eq!(prepares, 1.0);
    // Per-device series are opt-in: absent by default.
    assert!(
        prom.query("thinpool_device_mapped_bytes")
            .unwrap()
            .is_empty(),
        "per-device metrics are off by default"
    );
    drop(prom);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
