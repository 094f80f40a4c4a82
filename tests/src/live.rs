//! The model-based tests' side of the wire: a live `thinpoold` child process (which may be
//! armed to crash at failpoints), the requests of [`crate::model::Op`] sent over gRPC, and
//! the pool as the daemon shows it.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use thinpool_client::Client;
use thinpool_proto::admin;
use thinpool_proto::snapshots as pb;
use tokio::runtime::Runtime;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::grpc::bin;
use crate::model::{Kind, Labels, Op, PoolView, Raw, Seen, Ts};

/// The backend of the model-based tests: `THINPOOL_TEST_BACKEND`, sim when unset (it needs
/// no root, and is fast).
pub fn backend() -> thinpool::BackendKind {
    if std::env::var_os("THINPOOL_TEST_BACKEND").is_none() {
        thinpool::BackendKind::Sim
    } else {
        crate::backend()
    }
}

/// The pool's sizes, as the model needs them.
pub const DATA_SIZE: u64 = 4 << 30;
pub const BASE_SIZE: u64 = 256 << 20;

/// The daemon died (at an armed failpoint, or otherwise): how it ended.
#[derive(Debug)]
pub struct Crashed(pub ExitStatus);

impl Crashed {
    /// Whether it was an armed failpoint (abort), not some other death.
    pub fn aborted(&self) -> bool {
        self.0.signal() == Some(libc::SIGABRT)
    }
}

/// A successful answer, reduced to what the checks look at.
#[derive(Debug)]
pub enum Reply {
    Mounts(Vec<thinpool_proto::types::Mount>),
    Unit,
    Info(pb::Info),
    Usage { size: i64, inodes: i64 },
    Listed(Vec<pb::Info>),
}

/// One thinpoold on its own pool directory, restarted after each crash.
pub struct Live {
    pub root: PathBuf,
    pub socket: PathBuf,
    /// Where every incarnation appends the failpoints it reaches.
    pub hits_log: PathBuf,
    child: Option<Child>,
    /// stderr of the current incarnation.
    pub log: PathBuf,
    incarnation: u32,
    /// One runtime per incarnation: dropping it closes the client's connection, which a
    /// stopping daemon waits for.
    rt: Option<Runtime>,
    client: Option<Client>,
    /// The client's channel, for requests the typed clients cannot send.
    channel: Option<Channel>,
}

impl Live {
    /// A directory for a new pool; nothing runs yet.
    pub fn new(root: &Path) -> Live {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root).expect("pool dir");
        Live {
            root: root.to_path_buf(),
            socket: root.join("thinpool.sock"),
            hits_log: root.join("failpoints.log"),
            child: None,
            log: root.join("thinpoold-0.log"),
            incarnation: 0,
            rt: None,
            client: None,
            channel: None,
        }
    }

    /// Starts an incarnation with `failpoints` armed (`THINPOOL_FAILPOINTS`) and waits
    /// until it serves; `Err` if it died first (a failpoint reached while opening).
    pub fn start(&mut self, failpoints: &str) -> Result<(), Crashed> {
        assert!(self.child.is_none(), "a daemon is running");
        self.incarnation += 1;
        self.log = self
            .root
            .join(format!("thinpoold-{}.log", self.incarnation));
        let logf = std::fs::File::create(&self.log).expect("log file");
        let child = Command::new(bin("thinpoold"))
            .arg("--root")
            .arg(self.root.join("pool"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["--backend", &backend().to_string()])
            .args(["--data-size", "4G", "--metadata-size", "64M"])
            .args(["--base-size", "256M"])
            .arg("--imagefs-dir")
            .arg(self.root.join("imagefs"))
            .args(["--metrics-addr", ""])
            .env(
                "RUST_LOG",
                std::env::var("THINPOOL_MODEL_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("THINPOOL_FAILPOINTS", failpoints)
            .env("THINPOOL_FAILPOINTS_LOG", &self.hits_log)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn thinpoold");
        self.child = Some(child);
        self.rt = Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.disconnect();
                self.child = None;
                return Err(Crashed(st));
            }
            let socket = self.socket.clone();
            let client = self.rt().block_on(async move {
                let ch = connect(&socket).await.ok()?;
                let mut c = Client::from_channel(ch.clone());
                c.pool_status().await.ok()?;
                Some((c, ch))
            });
            if let Some((c, ch)) = client {
                self.client = Some(c);
                self.channel = Some(ch);
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "thinpoold did not serve within 120 s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    fn rt(&self) -> &Runtime {
        self.rt.as_ref().expect("a running daemon")
    }

    /// Drops the client and its connection.
    fn disconnect(&mut self) {
        self.client = None;
        self.channel = None;
        self.rt = None;
    }

    /// The last lines of the current incarnation's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// After a failed request: whether the daemon died (and then how). A transport error
    /// comes once the process is gone, so it is waited for; an answer with a status comes
    /// from a live daemon.
    fn died(&mut self, s: &Status) -> Option<Crashed> {
        // tonic reports a connection lost as Unavailable, Unknown or Cancelled; everything
        // else is an answer (its Internal is the daemon's own, e.g. a message it could not
        // decode).
        let wait = match s.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled => Duration::from_secs(10),
            _ => Duration::ZERO,
        };
        let deadline = Instant::now() + wait;
        loop {
            let child = self.child.as_mut()?;
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                self.disconnect();
                return Some(Crashed(st));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends one request. `Err(Crashed)` if the daemon died on it.
    pub fn exec(&mut self, op: &Op) -> Result<Result<Reply, Status>, Crashed> {
        let Some(client) = self.client.clone() else {
            panic!("exec without a running daemon");
        };
        let channel = self.channel.clone().expect("a running daemon");
        let r = self.rt().block_on(send(client, channel, op));
        match r {
            Err(s) => match self.died(&s) {
                Some(c) => Err(c),
                None => Ok(Err(s)),
            },
            ok => Ok(ok),
        }
    }

    /// Runs `f` against the daemon; `Err(Crashed)` if it died meanwhile.
    fn call<T>(
        &mut self,
        f: impl AsyncFnOnce(Client) -> Result<T, Status>,
    ) -> Result<Result<T, Status>, Crashed> {
        let client = self.client.clone().expect("a running daemon");
        match self.rt().block_on(f(client)) {
            Err(s) => match self.died(&s) {
                Some(c) => Err(c),
                None => Ok(Err(s)),
            },
            ok => Ok(ok),
        }
    }

    /// Every snapshot the daemon shows (an unfiltered List), with sizes and activity from
    /// the admin ListDevices when `devices`, and the pool's data size (PoolStatus) when
    /// `status`.
    pub fn view(&mut self, devices: bool, status: bool) -> Result<PoolView, Crashed> {
        let infos = self
            .call(async |c| list(c, vec![]).await)?
            .unwrap_or_else(|s| panic!("List failed: {s:?}"));
        let mut view = PoolView::default();
        for i in infos {
            let (k, s) = seen(&i).unwrap_or_else(|e| panic!("List: {e}"));
            assert!(
                view.snaps.insert(k.clone(), s).is_none(),
                "List shows {k:?} twice"
            );
        }
        if devices {
            let devs = self
                .call(async |c| {
                    c.admin_raw()
                        .list_devices(admin::ListDevicesRequest {})
                        .await
                        .map(|r| r.into_inner().devices)
                })?
                .unwrap_or_else(|s| panic!("ListDevices failed: {s:?}"));
            let mut named = BTreeMap::new();
            for d in devs {
                let ready = d.state == admin::DeviceState::Ready as i32;
                let base = d.kind == admin::DeviceKind::Base as i32;
                if ready && !base {
                    named.insert(d.name.clone(), d);
                }
            }
            for (k, s) in view.snaps.iter_mut() {
                let d = named
                    .get(k)
                    .unwrap_or_else(|| panic!("{k:?} is listed but has no ready device"));
                s.size = Some(d.size);
                s.active = Some(!d.device_path.is_empty());
            }
            assert_eq!(
                named.len(),
                view.snaps.len(),
                "ready devices that List does not show: {:?}",
                named
                    .keys()
                    .filter(|k| !view.snaps.contains_key(*k))
                    .collect::<Vec<_>>()
            );
        }
        if status {
            let st = self
                .call(async |c| {
                    c.admin_raw()
                        .pool_status(admin::PoolStatusRequest {})
                        .await
                        .map(|r| r.into_inner())
                })?
                .unwrap_or_else(|s| panic!("PoolStatus failed: {s:?}"));
            view.data_size = Some(st.data_space_total);
        }
        Ok(view)
    }

    /// Stat of `key`.
    pub fn stat(&mut self, key: &str) -> Result<Result<pb::Info, Status>, Crashed> {
        let key = key.to_string();
        self.call(async move |c| {
            c.snapshots_raw()
                .stat(pb::StatSnapshotRequest {
                    snapshotter: String::new(),
                    key,
                })
                .await
                .map(|r| r.into_inner().info.unwrap_or_default())
        })
    }

    /// The admin audit.
    pub fn audit(&mut self) -> Result<admin::AuditResponse, Crashed> {
        Ok(self
            .call(async |c| {
                c.admin_raw()
                    .audit(admin::AuditRequest {})
                    .await
                    .map(|r| r.into_inner())
            })?
            .unwrap_or_else(|s| panic!("Audit failed: {s:?}")))
    }

    /// Stops the current incarnation with SIGTERM (a clean stop); panics if it does not
    /// exit within 60 s.
    pub fn stop(&mut self) {
        assert!(
            self.stop_within(Duration::from_secs(60)),
            "thinpoold ignored SIGTERM for 60 s:\n{}",
            self.log_tail()
        );
    }

    /// SIGTERM, then SIGKILL after `grace`; whether it exited by itself.
    fn stop_within(&mut self, grace: Duration) -> bool {
        self.disconnect();
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while c.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// What a power cut (or a reboot) does to a pool whose daemon is gone: its kernel
    /// objects go (sim: the runtime state; reflink: mounts and loop devices).
    pub fn power_cut(&mut self) {
        assert!(self.child.is_none(), "power cut under a running daemon");
        let root = self.root.join("pool");
        let store = thinpool::store::Store::open(&root.join("pool.redb")).expect("store");
        let settings = store.read(|r| r.settings_if_any()).expect("settings");
        drop(store);
        if let Some(settings) = settings {
            thinpool::backend::scrub(&thinpool::backend::PoolPaths::new(&root), &settings)
                .expect("power cut");
        }
    }

    /// Kills the current incarnation at once (SIGKILL), as a crash anywhere would.
    pub fn kill(&mut self) {
        self.disconnect();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The failpoints reached so far, by name.
    pub fn hits(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for l in std::fs::read_to_string(&self.hits_log)
            .unwrap_or_default()
            .lines()
        {
            *out.entry(l.to_string()).or_insert(0) += 1;
        }
        out
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "thinpoold log ({}), last lines:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        self.stop_within(Duration::from_secs(30));
        // Tear down what the pool left in the kernel (loop devices, mounts), as Daemon does.
        let pool = self.root.join("pool");
        if pool.join("pool.redb").exists()
            && let Ok(p) = thinpool::Pool::open(&thinpool::PoolSpec {
                root: pool,
                ..Default::default()
            })
        {
            let _ = p.close(true);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn ts(t: &Option<prost_types::Timestamp>) -> Ts {
    t.as_ref().map(|t| (t.seconds, t.nanos)).unwrap_or((0, 0))
}

/// A snapshot's Info as the model sees it.
pub fn seen(i: &pb::Info) -> Result<(String, Seen), String> {
    let kind = match pb::Kind::try_from(i.kind) {
        Ok(pb::Kind::Active) => Kind::Active,
        Ok(pb::Kind::View) => Kind::View,
        Ok(pb::Kind::Committed) => Kind::Committed,
        k => return Err(format!("{:?} has kind {k:?}", i.name)),
    };
    Ok((
        i.name.clone(),
        Seen {
            kind,
            parent: (!i.parent.is_empty()).then(|| i.parent.clone()),
            labels: i
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            created: ts(&i.created_at),
            updated: ts(&i.updated_at),
            size: None,
            active: None,
        },
    ))
}

fn wire_labels(l: &Labels) -> std::collections::HashMap<String, String> {
    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

async fn list(c: Client, filters: Vec<String>) -> Result<Vec<pb::Info>, Status> {
    let mut stream = c
        .snapshots_raw()
        .list(pb::ListSnapshotsRequest {
            snapshotter: String::new(),
            filters,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.extend(m.info);
    }
    Ok(out)
}

async fn send(c: Client, channel: Channel, op: &Op) -> Result<Reply, Status> {
    let mut s = c.snapshots_raw();
    let mut a = c.admin_raw();
    let sn = String::new;
    Ok(match op {
        Op::Prepare {
            key,
            parent,
            labels,
        } => Reply::Mounts(
            s.prepare(pb::PrepareSnapshotRequest {
                snapshotter: sn(),
                key: key.clone(),
                parent: parent.clone(),
                labels: wire_labels(labels),
            })
            .await?
            .into_inner()
            .mounts,
        ),
        Op::View {
            key,
            parent,
            labels,
        } => Reply::Mounts(
            s.view(pb::ViewSnapshotRequest {
                snapshotter: sn(),
                key: key.clone(),
                parent: parent.clone(),
                labels: wire_labels(labels),
            })
            .await?
            .into_inner()
            .mounts,
        ),
        Op::Commit {
            name,
            key,
            labels,
            parent,
        } => {
            s.commit(pb::CommitSnapshotRequest {
                snapshotter: sn(),
                name: name.clone(),
                key: key.clone(),
                labels: wire_labels(labels),
                parent: parent.clone(),
            })
            .await?;
            Reply::Unit
        }
        Op::Remove { key } => {
            s.remove(pb::RemoveSnapshotRequest {
                snapshotter: sn(),
                key: key.clone(),
            })
            .await?;
            Reply::Unit
        }
        Op::Stat { key } => Reply::Info(
            s.stat(pb::StatSnapshotRequest {
                snapshotter: sn(),
                key: key.clone(),
            })
            .await?
            .into_inner()
            .info
            .unwrap_or_default(),
        ),
        Op::Update { key, labels, paths } => Reply::Info(
            s.update(pb::UpdateSnapshotRequest {
                snapshotter: sn(),
                info: Some(pb::Info {
                    name: key.clone(),
                    // Fields an Update cannot change, sent to show they are ignored.
                    parent: "ignored".into(),
                    kind: pb::Kind::View as i32,
                    labels: wire_labels(labels),
                    ..Default::default()
                }),
                update_mask: paths
                    .as_ref()
                    .map(|p| prost_types::FieldMask { paths: p.clone() }),
            })
            .await?
            .into_inner()
            .info
            .unwrap_or_default(),
        ),
        Op::Usage { key } => {
            let u = s
                .usage(pb::UsageRequest {
                    snapshotter: sn(),
                    key: key.clone(),
                })
                .await?
                .into_inner();
            Reply::Usage {
                size: u.size,
                inodes: u.inodes,
            }
        }
        Op::Mounts { key } => Reply::Mounts(
            s.mounts(pb::MountsRequest {
                snapshotter: sn(),
                key: key.clone(),
            })
            .await?
            .into_inner()
            .mounts,
        ),
        Op::List { filters } => Reply::Listed(list(c.clone(), filters.wire()).await?),
        Op::Activate { key } => Reply::Mounts(
            a.activate(admin::ActivateRequest { key: key.clone() })
                .await?
                .into_inner()
                .mounts,
        ),
        Op::Deactivate { key } => {
            a.deactivate(admin::DeactivateRequest { key: key.clone() })
                .await?;
            Reply::Unit
        }
        Op::Cleanup => {
            s.cleanup(pb::CleanupRequest { snapshotter: sn() }).await?;
            Reply::Unit
        }
        Op::Grow { data } => {
            a.grow_pool(admin::GrowPoolRequest {
                data: data.clone(),
                metadata: String::new(),
                force: false,
            })
            .await?;
            Reply::Unit
        }
        Op::Raw(Raw::UpdateWithoutInfo) => Reply::Info(
            s.update(pb::UpdateSnapshotRequest {
                snapshotter: sn(),
                info: None,
                update_mask: None,
            })
            .await?
            .into_inner()
            .info
            .unwrap_or_default(),
        ),
        Op::Raw(Raw::NonUtf8Key(key)) => {
            // Field 2 (key), length-delimited, holding bytes that are not UTF-8.
            let mut body = vec![0x12];
            put_varint(&mut body, key.len() as u64);
            body.extend_from_slice(key);
            raw_unary(channel, "Prepare", body).await?;
            Reply::Mounts(vec![])
        }
        Op::Raw(Raw::Garbage(body)) => {
            raw_unary(channel, "Prepare", body.clone()).await?;
            Reply::Mounts(vec![])
        }
    })
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A channel to the daemon's socket.
pub async fn connect(socket: &Path) -> Result<Channel, Status> {
    let p = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://thinpoold.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                tokio::net::UnixStream::connect(p)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|e| Status::unavailable(format!("connect: {e}")))
}

/// Sends `body` as the message of the Snapshots method `method`, bytes as they are, with
/// no size limit on this side.
pub async fn raw_unary(channel: Channel, method: &str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    let path = format!("/containerd.services.snapshots.v1.Snapshots/{method}");
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).expect("path");
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// A codec that sends and receives message bytes as they are.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawCoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;
    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }
    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

impl Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}
