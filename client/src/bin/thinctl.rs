//! thinctl: inspect and drive thinpoold from the command line.
//!
//! Snapshot commands speak containerd's Snapshots API with plain keys (containerd itself
//! sends namespaced keys such as `default/12/sha256:...`; those show up here as they are).
//! Human-readable output by default; `--json` where offered, with stable field names.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use thinpool_client::{Bytes, Client, Info, Mount, device_kind_name, device_state_name, kind_name};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Control thinpoold: pool status, devices, snapshots, mounts"
)]
struct Cli {
    /// thinpoold's unix socket.
    #[arg(long, global = true, default_value = thinpool_client::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The pool.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Thin devices (including the base device and devices mid-operation).
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Snapshots, through containerd's Snapshots API.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Mounts snapshot KEY (active or view) at DIR.
    Mount { key: String, dir: PathBuf },
    /// Unmounts DIR.
    Umount { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Space, mode and settings of the pool.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Compares thinpoold's records with the backend's own metadata.
    Audit {
        #[arg(long)]
        json: bool,
    },
    /// Grows the pool's data and/or metadata files; prints the sizes before and after.
    Grow {
        /// New data size: SIZE (grow to) or +SIZE (grow by), e.g. 2G, +512M.
        #[arg(long)]
        data: Option<String>,
        /// New metadata size (dm only): SIZE or +SIZE.
        #[arg(long)]
        metadata: Option<String>,
        /// Grow even if the host filesystem has less free space than the files could take.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Takes the pool down: deactivates every device, takes the pool down, detaches its
    /// loop devices (reflink: unmounts its filesystem); thinpoold then exits. The next
    /// thinpoold start brings everything back. Refused while a device is in use (mounted or
    /// open), unless --force: then devices in use stay active, and the pool under them.
    Down {
        /// Go ahead although devices are in use (they stay active).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Takes a backup now, while the pool serves: the kernel metadata (dm) and thinpoold's
    /// store, as one consistent cut, in <root>/backups/<UTC time>/ (the newest N are kept).
    Backup {
        #[arg(long)]
        json: bool,
    },
    /// Offline (thinpoold stopped, pool down): checks the pool's metadata (thin_check),
    /// repairs it into a spare file if damaged (thin_repair), swaps the spare in keeping the
    /// damaged copy, then reconciles thinpoold's records with it and reports lost devices.
    /// Runs `thinpoold --repair` (next to thinctl, or $THINPOOLD, or on PATH).
    Repair {
        #[command(flatten)]
        offline: Offline,
        #[arg(long)]
        json: bool,
    },
    /// Offline: restores a backup (<root>/backups/<time>): verifies its checksums, keeps the
    /// current metadata and store as *.before-restore-<time>, puts the backup's in place,
    /// reconciles, and reports. Runs `thinpoold --restore`.
    Restore {
        /// The backup's directory.
        backup: PathBuf,
        #[command(flatten)]
        offline: Offline,
        #[arg(long)]
        json: bool,
    },
}

/// Where an offline command finds the pool: the same as thinpoold's flags.
#[derive(clap::Args, Debug)]
struct Offline {
    /// The pool's directory [default: thinpoold's, /var/lib/thinpool]
    #[arg(long)]
    root: Option<PathBuf>,
    /// thinpoold's config file (for its root and backend).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum DeviceCmd {
    /// Lists every thin device.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Activates the device of snapshot KEY (committed ones read-only) and prints its mount.
    Activate { key: String },
    /// Removes the device node of snapshot KEY; its data stays.
    Deactivate { key: String },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Lists snapshots (optionally matching containerd filters, OR'ed).
    Ls {
        #[arg(long)]
        json: bool,
        /// containerd filter, e.g. kind==committed or parent==KEY (repeatable: OR).
        #[arg(long = "filter")]
        filters: Vec<String>,
    },
    /// Shows snapshots as a tree of parents and children.
    Tree,
    /// Creates an active snapshot KEY, of the committed PARENT or empty.
    Prepare {
        key: String,
        parent: Option<String>,
        /// Label KEY=VALUE (repeatable); containerd.io/snapshot/thinpool.size=20G sizes it.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Creates a read-only snapshot KEY of PARENT.
    View {
        key: String,
        parent: String,
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Commits active snapshot KEY as NAME.
    Commit {
        name: String,
        key: String,
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Removes snapshot KEY (the device is freed in the background).
    Rm { key: String },
    /// Bytes snapshot KEY uses beyond its parent.
    Usage {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// How to mount snapshot KEY.
    Mounts {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Details of snapshot KEY.
    Info { key: String },
    /// Finishes deferred removals now.
    Cleanup,
}

fn labels(pairs: &[String]) -> Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("label {p:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// Prints rows as a table with columns aligned by the widest cell (last column unpadded).
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
}

fn ts_ns(t: &Option<prost_types::Timestamp>) -> i128 {
    t.as_ref()
        .map(|t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
        .unwrap_or(0)
}

fn info_json(i: &Info) -> serde_json::Value {
    json!({
        "name": i.name,
        "parent": i.parent,
        "kind": kind_name(i.kind),
        "created_unix_ns": ts_ns(&i.created_at),
        "updated_unix_ns": ts_ns(&i.updated_at),
        "labels": i.labels.iter().collect::<BTreeMap<_, _>>(),
    })
}

fn mount_json(m: &Mount) -> serde_json::Value {
    json!({ "type": m.r#type, "source": m.source, "options": m.options })
}

fn print_mounts(mounts: &[Mount]) {
    let rows: Vec<Vec<String>> = mounts
        .iter()
        .map(|m| vec![m.r#type.clone(), m.source.clone(), m.options.join(",")])
        .collect();
    table(&["TYPE", "SOURCE", "OPTIONS"], &rows);
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// An autoextend policy for people: "off", or "above 70%, by 20%, up to 8 GiB".
fn autoextend(threshold: u32, percent: u32, max: u64) -> String {
    if threshold >= 100 {
        return "off".into();
    }
    let max = if max == 0 {
        "no limit".to_string()
    } else {
        format!("up to {}", Bytes(max))
    };
    format!("above {threshold}%, by {percent}%, {max}")
}

async fn pool_status(c: &mut Client, as_json: bool) -> Result<()> {
    let s = c.pool_status().await?;
    if as_json {
        let quarantined: Vec<serde_json::Value> = s
            .quarantined
            .iter()
            .map(|q| {
                json!({
                    "id": q.id, "name": q.name, "reason": q.reason,
                    "since_unix": q.since.as_ref().map(|t| t.seconds),
                })
            })
            .collect();
        return print_json(&json!({
            "backend": s.backend,
            "pool_name": s.pool_name,
            "root": s.root,
            "block_size_bytes": s.pool_blocksize,
            "base_device_size_bytes": s.base_device_size,
            "backing_filesystem": s.backing_filesystem,
            "data_file": s.data_file,
            "metadata_file": s.metadata_file,
            "data_used_bytes": s.data_space_used,
            "data_total_bytes": s.data_space_total,
            "data_available_bytes": s.data_space_available,
            "metadata_used_bytes": s.metadata_space_used,
            "metadata_total_bytes": s.metadata_space_total,
            "metadata_available_bytes": s.metadata_space_available,
            "min_free_space_bytes": s.thin_pool_minimum_free_space,
            "min_free_space_percent": s.min_free_space_percent,
            "udev_sync_supported": s.udev_sync_supported,
            "deferred_removal_enabled": s.deferred_removal_enabled,
            "deferred_deletion_enabled": s.deferred_deletion_enabled,
            "deferred_deleted_devices": s.deferred_deleted_devices,
            "library_version": s.library_version,
            "mode": s.mode,
            "needs_check": s.needs_check,
            "transaction_id": s.transaction_id,
            "host_fs_free_bytes": s.host_fs_free_bytes,
            "host_fs_total_bytes": s.host_fs_total_bytes,
            "devices": s.devices,
            "error_if_no_space": s.error_if_no_space,
            "low_water_mark_bytes": s.low_water_mark,
            "autoextend_data_threshold_percent": s.autoextend_data_threshold_percent,
            "autoextend_data_percent": s.autoextend_data_percent,
            "autoextend_data_max_bytes": s.autoextend_data_max_bytes,
            "autoextend_metadata_threshold_percent": s.autoextend_metadata_threshold_percent,
            "autoextend_metadata_percent": s.autoextend_metadata_percent,
            "autoextend_metadata_max_bytes": s.autoextend_metadata_max_bytes,
            "metadata_can_grow": s.metadata_can_grow,
            "quarantined": quarantined,
        }));
    }
    let b = |n: u64| Bytes(n).to_string();
    let pct = |used: u64, total: u64| {
        if total == 0 {
            String::new()
        } else {
            format!(" ({:.1}%)", used as f64 * 100.0 / total as f64)
        }
    };
    let rows: Vec<(&str, String)> = vec![
        ("Backend", s.backend.clone()),
        ("Pool Name", s.pool_name.clone()),
        ("Root", s.root.clone()),
        ("Pool Blocksize", b(s.pool_blocksize)),
        ("Base Device Size", b(s.base_device_size)),
        ("Backing Filesystem", s.backing_filesystem.clone()),
        ("Data file", s.data_file.clone()),
        ("Metadata file", s.metadata_file.clone()),
        (
            "Data Space Used",
            b(s.data_space_used) + &pct(s.data_space_used, s.data_space_total),
        ),
        ("Data Space Total", b(s.data_space_total)),
        ("Data Space Available", b(s.data_space_available)),
        (
            "Metadata Space Used",
            b(s.metadata_space_used) + &pct(s.metadata_space_used, s.metadata_space_total),
        ),
        ("Metadata Space Total", b(s.metadata_space_total)),
        ("Metadata Space Available", b(s.metadata_space_available)),
        (
            "Thin Pool Minimum Free Space",
            format!(
                "{} ({}%)",
                b(s.thin_pool_minimum_free_space),
                s.min_free_space_percent
            ),
        ),
        ("Udev Sync Supported", s.udev_sync_supported.clone()),
        (
            "Deferred Removal Enabled",
            s.deferred_removal_enabled.to_string(),
        ),
        (
            "Deferred Deletion Enabled",
            s.deferred_deletion_enabled.to_string(),
        ),
        (
            "Deferred Deleted Device Count",
            s.deferred_deleted_devices.to_string(),
        ),
        (
            "Library Version",
            if s.library_version.is_empty() {
                "not applicable".into()
            } else {
                s.library_version.clone()
            },
        ),
        ("Mode", s.mode.clone()),
        ("Needs Check", s.needs_check.to_string()),
        ("Transaction Id", s.transaction_id.to_string()),
        ("Error If No Space", s.error_if_no_space.to_string()),
        ("Low Water Mark", b(s.low_water_mark)),
        (
            "Data Autoextend",
            autoextend(
                s.autoextend_data_threshold_percent,
                s.autoextend_data_percent,
                s.autoextend_data_max_bytes,
            ),
        ),
        (
            "Metadata Autoextend",
            if s.metadata_can_grow {
                autoextend(
                    s.autoextend_metadata_threshold_percent,
                    s.autoextend_metadata_percent,
                    s.autoextend_metadata_max_bytes,
                )
            } else if s.autoextend_metadata_threshold_percent < 100 {
                "set, but no effect: this backend's metadata cannot grow".into()
            } else {
                "not applicable (this backend's metadata cannot grow)".into()
            },
        ),
        ("Devices", s.devices.to_string()),
        ("Quarantined Devices", s.quarantined.len().to_string()),
        (
            "Host Filesystem Free",
            format!(
                "{} of {}",
                b(s.host_fs_free_bytes),
                b(s.host_fs_total_bytes)
            ),
        ),
    ];
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in rows {
        println!("{:<w$} {v}", format!("{k}:"), w = w);
    }
    // Keys are client data: printed escaped ({:?}), like the reason (which may quote one).
    for q in &s.quarantined {
        println!(
            "quarantined: thin id {} {:?}: {:?} (thinpoold retries it; see docs/recovery.md)",
            q.id, q.name, q.reason
        );
    }
    Ok(())
}

async fn device_ls(c: &mut Client, as_json: bool) -> Result<()> {
    let devices = c.devices().await?;
    if as_json {
        let v: Vec<_> = devices
            .iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "name": d.name,
                    "kind": device_kind_name(d.kind),
                    "state": device_state_name(d.state),
                    "parent_id": d.parent_id,
                    "parent_name": d.parent_name,
                    "size_bytes": d.size,
                    "mapped_bytes": d.mapped_bytes,
                    "device_path": d.device_path,
                    "labels": d.labels.iter().collect::<BTreeMap<_, _>>(),
                    "created_unix_ns": ts_ns(&d.created_at),
                })
            })
            .collect();
        return print_json(&serde_json::Value::Array(v));
    }
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                device_kind_name(d.kind).into(),
                device_state_name(d.state).into(),
                d.parent_id.map(|p| p.to_string()).unwrap_or("-".into()),
                Bytes(d.size).to_string(),
                Bytes(d.mapped_bytes).to_string(),
                if d.device_path.is_empty() {
                    "-".into()
                } else {
                    d.device_path.clone()
                },
                if d.name.is_empty() {
                    "-".into()
                } else {
                    d.name.clone()
                },
            ]
        })
        .collect();
    table(
        &[
            "ID", "KIND", "STATE", "PARENT", "SIZE", "MAPPED", "DEVICE", "NAME",
        ],
        &rows,
    );
    Ok(())
}

fn tree(infos: &[Info]) {
    let names: std::collections::HashSet<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    let mut children: BTreeMap<&str, Vec<&Info>> = BTreeMap::new();
    let mut roots = Vec::new();
    for i in infos {
        if i.parent.is_empty() || !names.contains(i.parent.as_str()) {
            roots.push(i);
        } else {
            children.entry(i.parent.as_str()).or_default().push(i);
        }
    }
    roots.sort_by(|a, b| a.name.cmp(&b.name));
    fn walk(i: &Info, depth: usize, children: &BTreeMap<&str, Vec<&Info>>) {
        if depth == 0 {
            println!("{} [{}]", i.name, kind_name(i.kind));
        } else {
            println!(
                "{}\\_ {} [{}]",
                "  ".repeat(depth),
                i.name,
                kind_name(i.kind)
            );
        }
        if let Some(cs) = children.get(i.name.as_str()) {
            let mut cs = cs.clone();
            cs.sort_by(|a, b| a.name.cmp(&b.name));
            for c in cs {
                walk(c, depth + 1, children);
            }
        }
    }
    for r in roots {
        walk(r, 0, &children);
    }
}

async fn snapshot(c: &mut Client, cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Ls { json, filters } => {
            let f: Vec<&str> = filters.iter().map(|s| s.as_str()).collect();
            let mut infos = c.list(&f).await?;
            infos.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                return print_json(&serde_json::Value::Array(
                    infos.iter().map(info_json).collect(),
                ));
            }
            let rows: Vec<Vec<String>> = infos
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.parent.clone(),
                        kind_name(i.kind).to_string(),
                    ]
                })
                .collect();
            table(&["KEY", "PARENT", "KIND"], &rows);
        }
        SnapshotCmd::Tree => tree(&c.list(&[]).await?),
        SnapshotCmd::Prepare {
            key,
            parent,
            labels: l,
        } => print_mounts(&c.prepare(&key, parent.as_deref(), labels(&l)?).await?),
        SnapshotCmd::View {
            key,
            parent,
            labels: l,
        } => print_mounts(&c.view(&key, Some(&parent), labels(&l)?).await?),
        SnapshotCmd::Commit {
            name,
            key,
            labels: l,
        } => c.commit(&name, &key, labels(&l)?).await?,
        SnapshotCmd::Rm { key } => c.remove(&key).await?,
        SnapshotCmd::Usage { key, json } => {
            let (size, inodes) = c.usage(&key).await?;
            if json {
                return print_json(&json!({"key": key, "size_bytes": size, "inodes": inodes}));
            }
            table(
                &["KEY", "SIZE", "INODES"],
                &[vec![
                    key,
                    Bytes(size.max(0) as u64).to_string(),
                    inodes.to_string(),
                ]],
            );
        }
        SnapshotCmd::Mounts { key, json } => {
            let m = c.mounts(&key).await?;
            if json {
                return print_json(&serde_json::Value::Array(
                    m.iter().map(mount_json).collect(),
                ));
            }
            print_mounts(&m);
        }
        SnapshotCmd::Info { key } => print_json(&info_json(&c.stat(&key).await?))?,
        SnapshotCmd::Cleanup => c.cleanup().await?,
    }
    Ok(())
}

async fn mount(c: &mut Client, key: &str, dir: &std::path::Path) -> Result<()> {
    let mounts = c.mounts(key).await?;
    let [m] = mounts.as_slice() else {
        bail!(
            "snapshot {key:?} has {} mounts; expected exactly one",
            mounts.len()
        );
    };
    thinpool_client::mount::mount(m, dir)?;
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    if let Cmd::Umount { dir } = &cli.cmd {
        thinpool_client::mount::unmount(dir)?;
        return Ok(());
    }
    // Offline commands: no daemon to talk to (it must not run).
    match &cli.cmd {
        Cmd::Pool {
            cmd: PoolCmd::Repair { offline, json },
        } => return run_offline(offline, &["--repair".into()], *json),
        Cmd::Pool {
            cmd:
                PoolCmd::Restore {
                    backup,
                    offline,
                    json,
                },
        } => return run_offline(offline, &["--restore".into(), backup.into()], *json),
        _ => {}
    }
    let mut c = Client::connect(&cli.socket).await?;
    match cli.cmd {
        Cmd::Pool {
            cmd: PoolCmd::Status { json },
        } => pool_status(&mut c, json).await?,
        Cmd::Pool {
            cmd: PoolCmd::Audit { json },
        } => {
            let a = c.audit().await?;
            if json {
                print_json(&json!({
                    "clean": a.clean, "leaked": a.leaked, "missing": a.missing,
                    "unfinished": a.unfinished, "pending": a.pending,
                    "quarantined": a.quarantined, "store_problems": a.store_problems,
                }))?;
            } else {
                println!(
                    "clean: {}\nleaked: {:?}\nmissing: {:?}\nunfinished: {:?}\n\
                     pending removals: {:?}\nquarantined: {:?}",
                    a.clean, a.leaked, a.missing, a.unfinished, a.pending, a.quarantined
                );
                for p in &a.store_problems {
                    println!("store problem: {p}");
                }
            }
            if !a.clean {
                bail!("the audit found problems");
            }
        }
        Cmd::Pool {
            cmd:
                PoolCmd::Grow {
                    data,
                    metadata,
                    force,
                    json,
                },
        } => {
            if data.is_none() && metadata.is_none() {
                bail!("nothing to grow: give --data and/or --metadata");
            }
            let g = c
                .grow_pool(data.as_deref(), metadata.as_deref(), force)
                .await?;
            if json {
                print_json(&json!({
                    "data_size_before_bytes": g.data_size_before,
                    "data_size_after_bytes": g.data_size_after,
                    "metadata_size_before_bytes": g.metadata_size_before,
                    "metadata_size_after_bytes": g.metadata_size_after,
                }))?;
            } else {
                let b = |n: u64| Bytes(n).to_string();
                println!(
                    "data:     {} -> {}",
                    b(g.data_size_before),
                    b(g.data_size_after)
                );
                println!(
                    "metadata: {} -> {}",
                    b(g.metadata_size_before),
                    b(g.metadata_size_after)
                );
            }
        }
        Cmd::Pool {
            cmd: PoolCmd::Down { force, json },
        } => {
            let r = c.take_down(force).await?;
            if json {
                print_json(&json!({
                    "pool_down": r.pool_down, "deactivated": r.deactivated, "busy": r.busy,
                }))?;
            } else {
                println!("deactivated: {} devices", r.deactivated.len());
                if r.pool_down {
                    println!("pool down; thinpoold exits (start it again to bring the pool back)");
                } else {
                    println!(
                        "in use, left active (with the pool under them): thin ids {:?}; thinpoold exits",
                        r.busy
                    );
                }
            }
        }
        Cmd::Pool {
            cmd: PoolCmd::Backup { json },
        } => {
            let b = c.backup().await?;
            if json {
                print_json(&json!({
                    "path": b.path, "created": b.created, "transaction_id": b.transaction_id,
                    "devices": b.devices, "removed": b.removed,
                }))?;
            } else {
                println!(
                    "backup {} (transaction {}, {} devices)",
                    b.path, b.transaction_id, b.devices
                );
                for r in &b.removed {
                    println!("removed old backup {r}");
                }
            }
        }
        Cmd::Pool {
            cmd: PoolCmd::Repair { .. } | PoolCmd::Restore { .. },
        } => bail!("offline commands are run above"),
        Cmd::Device {
            cmd: DeviceCmd::Ls { json },
        } => device_ls(&mut c, json).await?,
        Cmd::Device {
            cmd: DeviceCmd::Activate { key },
        } => print_mounts(&c.activate(&key).await?),
        Cmd::Device {
            cmd: DeviceCmd::Deactivate { key },
        } => c.deactivate(&key).await?,
        Cmd::Snapshot { cmd } => snapshot(&mut c, cmd).await?,
        Cmd::Mount { key, dir } => mount(&mut c, &key, &dir).await?,
        Cmd::Umount { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// thinctl does not link the engine: offline commands run thinpoold in an offline mode,
/// which prints its report (stdout) and its progress (log, stderr) itself.
fn run_offline(o: &Offline, mode: &[std::ffi::OsString], json: bool) -> Result<()> {
    let exe = std::env::var_os("THINPOOLD")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("thinpoold")))
                .filter(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("thinpoold"));
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(mode);
    if let Some(r) = &o.root {
        cmd.arg("--root").arg(r);
    }
    if let Some(c) = &o.config {
        cmd.arg("--config").arg(c);
    }
    if json {
        cmd.arg("--json");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    if !status.success() {
        bail!("{} {:?} failed ({status})", exe.display(), mode);
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thinctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
