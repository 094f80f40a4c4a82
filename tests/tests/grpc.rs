//! gRPC-level tests of every Snapshots and Admin RPC, with the error codes containerd relies
//! on. The services run in-process on a temp socket over a small pool (backend:
//! `THINPOOL_TEST_BACKEND`, reflink natively).

use std::collections::HashMap;
use std::fs;

use thinpool_client::{Client, ClientError, Info, Kind};
use thinpool_proto::snapshots as pb;
use thinpool_tests::grpc::Harness;
use thinpool_tests::{Target, on_sim, pattern};
use tonic::Code;

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn none() -> HashMap<String, String> {
    HashMap::new()
}

fn names(mut infos: Vec<Info>) -> Vec<String> {
    let mut v: Vec<String> = infos.drain(..).map(|i| i.name).collect();
    v.sort();
    v
}

/// Prepare → write → Commit → Prepare child / View child: data flows down the chain, a view
/// is read-only, mounts are `{fs type, device node, "", options}`.
#[test]
fn prepare_commit_view_mounts() {
    let h = &Harness::start("grpc-chain");
    h.run(|mut c| async move {
        let m = c.prepare("k1", None, none()).await.expect("prepare");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "ext4");
        assert!(
            m[0].source
                .starts_with(if on_sim() { "/" } else { "/dev/" }),
            "source {}",
            m[0].source
        );
        assert_eq!(m[0].target, "");
        assert!(
            !m[0].options.iter().any(|o| o == "ro"),
            "{:?}",
            m[0].options
        );
        assert_eq!(
            c.mounts("k1").await.expect("mounts"),
            m,
            "Mounts = Prepare's"
        );

        let dir = h.open_target(&m[0], "k1");
        let data = pattern(1, 1 << 20);
        dir.write("layer1", &data);
        h.close_target(dir);
        c.commit("l1", "k1", labels(&[("containerd.io/snapshot/x", "1")]))
            .await
            .expect("commit");
        assert_eq!(
            code(c.stat("k1").await),
            Code::NotFound,
            "key gone after commit"
        );
        let l1 = c.stat("l1").await.expect("stat l1");
        assert_eq!(l1.kind, Kind::Committed as i32);
        assert_eq!(l1.parent, "");
        assert_eq!(l1.labels, labels(&[("containerd.io/snapshot/x", "1")]));
        assert_eq!(
            code(c.mounts("l1").await),
            Code::FailedPrecondition,
            "a committed snapshot has no mounts"
        );

        let m2 = c
            .prepare("k2", Some("l1"), none())
            .await
            .expect("prepare child");
        let s2 = c.stat("k2").await.expect("stat k2");
        assert_eq!((s2.kind, s2.parent.as_str()), (Kind::Active as i32, "l1"));
        let dir = h.open_target(&m2[0], "k2");
        assert_eq!(dir.read("layer1"), data, "child sees the parent's data");
        dir.write("own", b"mine");
        h.close_target(dir);

        let v = c.view("v1", Some("l1"), none()).await.expect("view");
        assert!(v[0].options.iter().any(|o| o == "ro"), "{:?}", v[0].options);
        let sv = c.stat("v1").await.expect("stat view");
        assert_eq!((sv.kind, sv.parent.as_str()), (Kind::View as i32, "l1"));
        let dir = h.open_target(&v[0], "v1");
        assert_eq!(dir.read("layer1"), data);
        assert!(!dir.exists("own"), "siblings are independent");
        if let Target::Mounted(dir) = &dir {
            // Not on sim, which does not enforce read-only activation.
            let err = fs::write(dir.join("nope"), b"x").expect_err("a view is read-only");
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        }
        h.close_target(dir);
        assert_eq!(
            code(c.commit("l2", "v1", none()).await),
            Code::FailedPrecondition
        );

        // A view of nothing is an empty filesystem.
        c.view("v0", None, none())
            .await
            .expect("view without parent");
    });
}

/// The error codes containerd maps back with errdefs.FromGRPC.
#[test]
fn error_codes() {
    let h = &Harness::start("grpc-errors");
    h.run(|mut c| async move {
        c.prepare("a", None, none()).await.unwrap();
        assert_eq!(
            code(c.prepare("a", None, none()).await),
            Code::AlreadyExists
        );
        c.commit("base", "a", none()).await.unwrap();
        assert_eq!(
            code(c.prepare("base", None, none()).await),
            Code::AlreadyExists,
            "keys and committed names share one namespace"
        );
        assert_eq!(
            code(c.prepare("b", Some("missing"), none()).await),
            Code::NotFound
        );
        assert_eq!(
            code(c.view("b", Some("missing"), none()).await),
            Code::NotFound
        );
        c.prepare("act", Some("base"), none()).await.unwrap();
        // containerd's storage: a parent that is not committed is InvalidArgument.
        assert_eq!(
            code(c.prepare("b", Some("act"), none()).await),
            Code::InvalidArgument,
            "an active parent"
        );
        c.view("vw", Some("base"), none()).await.unwrap();
        assert_eq!(
            code(c.view("b", Some("vw"), none()).await),
            Code::InvalidArgument,
            "a view parent"
        );
        assert_eq!(
            code(c.prepare("", None, none()).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(c.prepare("a\u{1}b", None, none()).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(c.prepare(&"x".repeat(2000), None, none()).await),
            Code::InvalidArgument
        );

        // Commit
        assert_eq!(code(c.commit("n", "missing", none()).await), Code::NotFound);
        assert_eq!(
            code(c.commit("n", "vw", none()).await),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(c.commit("n", "base", none()).await),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(c.commit("base", "act", none()).await),
            Code::AlreadyExists
        );
        assert_eq!(
            code(c.commit("", "act", none()).await),
            Code::InvalidArgument
        );
        let mut raw = c.snapshots_raw();
        let rebase = raw
            .commit(pb::CommitSnapshotRequest {
                name: "n".into(),
                key: "act".into(),
                parent: "somewhere-else".into(),
                ..Default::default()
            })
            .await
            .expect_err("rebase");
        // containerd 2.2+ sends a parent only with the rebase capability, which thinpool
        // does not advertise; its metadata store answers a parent change the same way.
        assert_eq!(rebase.code(), Code::InvalidArgument, "{rebase:?}");
        assert!(rebase.message().contains("rebase"), "{rebase:?}");
        // A snapshot prepared without a parent cannot be given one at commit either (that is
        // what containerd's parallel unpack would do with the capability).
        c.prepare("orphan", None, none()).await.unwrap();
        let onto = raw
            .commit(pb::CommitSnapshotRequest {
                name: "n-orphan".into(),
                key: "orphan".into(),
                parent: "base".into(),
                ..Default::default()
            })
            .await
            .expect_err("a parentless snapshot committed onto a parent");
        assert_eq!(onto.code(), Code::InvalidArgument, "{onto:?}");
        assert_eq!(code(c.stat("n-orphan").await), Code::NotFound);
        assert_eq!(c.stat("orphan").await.unwrap().kind, Kind::Active as i32);
        c.remove("orphan").await.unwrap();
        raw.commit(pb::CommitSnapshotRequest {
            name: "n".into(),
            key: "act".into(),
            parent: "base".into(),
            ..Default::default()
        })
        .await
        .expect("commit naming the current parent");

        // Remove
        assert_eq!(code(c.remove("missing").await), Code::NotFound);
        assert_eq!(
            code(c.remove("base").await),
            Code::FailedPrecondition,
            "a parent with children"
        );
        // An empty key names no snapshot (containerd: NotFound).
        assert_eq!(code(c.remove("").await), Code::NotFound);
        assert_eq!(code(c.stat("").await), Code::NotFound);

        // Stat, Mounts, Usage of missing keys
        assert_eq!(code(c.stat("missing").await), Code::NotFound);
        assert_eq!(code(c.mounts("missing").await), Code::NotFound);
        assert_eq!(code(c.usage("missing").await), Code::NotFound);

        // Labels are bounded (engine limits: 64 labels, 4 KiB values).
        let many: HashMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        let e = c.prepare("l", None, many).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("limit"), "{e}");
        let big = labels(&[("k", &"v".repeat(5000))]);
        assert_eq!(code(c.prepare("l", None, big).await), Code::InvalidArgument);
        assert_eq!(
            code(
                c.commit("n2", "n", labels(&[("k", &"v".repeat(5000))]))
                    .await
            ),
            Code::InvalidArgument
        );
        // A failed Prepare leaves nothing behind.
        assert_eq!(code(c.stat("l").await), Code::NotFound);
    });
}

/// The size of the filesystem on the device of `m`; on sim, which has no filesystems, the
/// length of the device.
fn fs_size(h: &Harness, m: &thinpool_client::Mount, tag: &str) -> u64 {
    if on_sim() {
        return fs::metadata(&m.source).unwrap().len();
    }
    let dir = h.mount(m, tag);
    let st = nix::sys::statvfs::statvfs(&dir).unwrap();
    h.unmount(&dir);
    st.blocks() as u64 * st.fragment_size() as u64
}

/// Per-snapshot size: `containerd.io/snapshot/thinpool.size`, or containerd's
/// `containerd.io/snapshot/max-size`.
#[test]
fn size_label() {
    let h = &Harness::start("grpc-size");
    h.run(|mut c| async move {
        let size = |s: &str| labels(&[(thinpool_server::SIZE_LABEL, s)]);
        let m = c
            .prepare("big", None, size("512M"))
            .await
            .expect("prepare 512M");
        // The filesystem's size (sim: the device's, as it holds none).
        let total = fs_size(h, &m[0], "big");
        assert!(total > 400 << 20, "filesystem grown to the size: {total}");
        c.commit("bigc", "big", none()).await.unwrap();
        assert_eq!(
            code(c.prepare("small", Some("bigc"), size("256M")).await),
            Code::InvalidArgument,
            "below the parent's size"
        );
        assert_eq!(
            code(c.prepare("bad", None, size("12Q")).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(c.prepare("bad", None, size("1000")).await),
            Code::InvalidArgument
        );
        c.prepare("child", Some("bigc"), none())
            .await
            .expect("inherits the parent's size");

        // containerd's own label (2.4+, decimal bytes) works the same way.
        let max = |s: &str| labels(&[(thinpool_server::MAX_SIZE_LABEL, s)]);
        let m = c
            .prepare("max", Some("bigc"), max(&(768u64 << 20).to_string()))
            .await
            .expect("prepare with max-size");
        let total = fs_size(h, &m[0], "max");
        assert!(total > 640 << 20, "filesystem grown to max-size: {total}");
        assert_eq!(
            code(c.prepare("bad", Some("bigc"), max("268435456")).await),
            Code::InvalidArgument,
            "max-size below the parent's size"
        );
        // Both labels: the same size (written either way) is fine, different ones are not.
        let both = |a: &str, b: &str| {
            labels(&[
                (thinpool_server::SIZE_LABEL, a),
                (thinpool_server::MAX_SIZE_LABEL, b),
            ])
        };
        c.prepare("both", None, both("512M", "536870912"))
            .await
            .expect("two labels, one size");
        let e = c
            .prepare("bad", None, both("512M", "1073741824"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("disagree"), "{e}");
        assert_eq!(code(c.stat("bad").await), Code::NotFound);
    });
}

/// Stat and Update: kind, parent name, labels, times; field paths `labels`, `labels.<k>`.
#[test]
fn stat_and_update() {
    let h = &Harness::start("grpc-update");
    h.run(|mut c| async move {
        c.prepare("s", None, labels(&[("a", "1"), ("b", "2")]))
            .await
            .unwrap();
        let i = c.stat("s").await.unwrap();
        assert_eq!(i.name, "s");
        assert_eq!(i.labels, labels(&[("a", "1"), ("b", "2")]));
        let created = i.created_at.expect("created_at");
        assert!(created.seconds > 1_600_000_000);
        assert!(i.updated_at.is_some());

        let upd = |l: HashMap<String, String>| Info {
            name: "s".into(),
            labels: l,
            ..Default::default()
        };
        let r = c
            .update(
                upd(labels(&[("a", "x"), ("c", "3")])),
                vec!["labels.a".into()],
            )
            .await
            .unwrap();
        assert_eq!(r.labels, labels(&[("a", "x"), ("b", "2")]), "only labels.a");
        let r = c
            .update(upd(none()), vec!["labels.b".into(), "labels.zz".into()])
            .await
            .unwrap();
        assert_eq!(r.labels, labels(&[("a", "x")]), "absent key deletes");
        let r = c
            .update(upd(labels(&[("n", "1")])), vec!["labels".into()])
            .await
            .unwrap();
        assert_eq!(r.labels, labels(&[("n", "1")]));
        let r = c.update(upd(labels(&[("e", "1")])), vec![]).await.unwrap();
        assert_eq!(
            r.labels,
            labels(&[("e", "1")]),
            "empty mask replaces labels"
        );
        assert_eq!(r.created_at, Some(created), "created is immutable");
        assert_eq!(c.stat("s").await.unwrap().labels, labels(&[("e", "1")]));
        for path in ["name", "parent", "kind", "created_at", "labelsx"] {
            assert_eq!(
                code(c.update(upd(none()), vec![path.into()]).await),
                Code::InvalidArgument,
                "path {path}"
            );
        }
        let missing = Info {
            name: "missing".into(),
            ..Default::default()
        };
        assert_eq!(code(c.update(missing, vec![]).await), Code::NotFound);
        let mut raw = c.snapshots_raw();
        let e = raw
            .update(pb::UpdateSnapshotRequest::default())
            .await
            .expect_err("no info");
        assert_eq!(e.code(), Code::InvalidArgument);
        let too_many: HashMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(
            code(c.update(upd(too_many), vec![]).await),
            Code::InvalidArgument
        );
    });
}

/// List: everything but the base device, server-streamed in batches; containerd's filters.
#[test]
fn list_and_filters() {
    let h = &Harness::start("grpc-list");
    h.run(|mut c| async move {
        let ref_label = "containerd.io/snapshot.ref";
        c.prepare("k1", None, none()).await.unwrap();
        c.commit("l1", "k1", labels(&[(ref_label, "sha256:one")]))
            .await
            .unwrap();
        c.prepare("k2", Some("l1"), none()).await.unwrap();
        c.commit("l2", "k2", labels(&[(ref_label, "sha256:two")]))
            .await
            .unwrap();
        c.prepare("ctr", Some("l2"), labels(&[("app", "web")]))
            .await
            .unwrap();
        c.view("v", Some("l1"), none()).await.unwrap();

        assert_eq!(names(c.list(&[]).await.unwrap()), ["ctr", "l1", "l2", "v"]);
        let all = c.list(&[]).await.unwrap();
        let l2 = all.iter().find(|i| i.name == "l2").unwrap();
        assert_eq!(
            (l2.parent.as_str(), l2.kind),
            ("l1", Kind::Committed as i32)
        );
        assert_eq!(names(c.list(&["parent==l1"]).await.unwrap()), ["l2", "v"]);
        assert_eq!(
            names(c.list(&["kind==committed"]).await.unwrap()),
            ["l1", "l2"]
        );
        assert_eq!(names(c.list(&["kind==active"]).await.unwrap()), ["ctr"]);
        assert_eq!(names(c.list(&["kind==view"]).await.unwrap()), ["v"]);
        assert_eq!(names(c.list(&["name==l2"]).await.unwrap()), ["l2"]);
        assert_eq!(
            names(
                c.list(&[r#"labels."containerd.io/snapshot.ref"==sha256:two,parent==l1"#])
                    .await
                    .unwrap()
            ),
            ["l2"],
            "the remote-snapshotter lookup containerd's unpacker makes"
        );
        assert_eq!(
            names(c.list(&["labels.app==web", "name==l1"]).await.unwrap()),
            ["ctr", "l1"],
            "filters are OR'ed"
        );
        assert!(c.list(&["name==l1,kind==view"]).await.unwrap().is_empty());
        assert!(c.list(&["labels.nope"]).await.unwrap().is_empty());
        for bad in ["name~=l.*", "name==", "kind=view", "name==a,"] {
            assert_eq!(code(c.list(&[bad]).await), Code::InvalidArgument, "{bad}");
        }

        // Batching: 230 more snapshots come in several stream messages.
        for i in 0..230 {
            c.view(&format!("many-{i:03}"), Some("l2"), none())
                .await
                .unwrap();
        }
        let mut raw = c.snapshots_raw();
        let mut stream = raw
            .list(pb::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut batches = Vec::new();
        while let Some(b) = stream.message().await.unwrap() {
            batches.push(b.info.len());
        }
        assert_eq!(batches.iter().sum::<usize>(), 234);
        assert!(
            batches.len() >= 3 && batches.iter().all(|&n| n <= 100),
            "{batches:?}"
        );
        assert_eq!(c.list(&["parent==l2"]).await.unwrap().len(), 231);
    });
}

/// Usage counts what a snapshot wrote, not what it shares with its parent; inodes are 0.
#[test]
fn usage() {
    let h = &Harness::start("grpc-usage");
    h.run(|mut c| async move {
        let m = c.prepare("u", None, none()).await.unwrap();
        let (before, inodes) = c.usage("u").await.unwrap();
        assert_eq!(inodes, 0);
        let dir = h.open_target(&m[0], "u");
        dir.write("data", &pattern(7, 16 << 20));
        h.close_target(dir);
        let (after, _) = c.usage("u").await.unwrap();
        assert!(
            after >= before + (16 << 20),
            "usage {before} → {after} after writing 16 MiB"
        );
        c.commit("uc", "u", none()).await.unwrap();
        let (committed, _) = c.usage("uc").await.unwrap();
        assert!(committed >= 16 << 20, "committed usage {committed}");
        let m = c.prepare("child", Some("uc"), none()).await.unwrap();
        let (child, _) = c.usage("child").await.unwrap();
        assert!(
            child < 4 << 20,
            "a fresh child shares its parent's data; usage {child}"
        );
        // The child writes 8 MiB of its own: that is its usage; the layer keeps its own
        // 16 MiB (on reflink, shared extents would otherwise count for neither).
        let dir = h.open_target(&m[0], "child");
        dir.write("more", &pattern(8, 8 << 20));
        h.close_target(dir);
        let (child, _) = c.usage("child").await.unwrap();
        assert!(
            (8 << 20..12 << 20).contains(&child),
            "child usage {child} after writing 8 MiB"
        );
        assert_eq!(
            c.usage("uc").await.unwrap().0,
            committed,
            "a layer's usage does not change with its children"
        );
        c.commit("cc", "child", none()).await.unwrap();
        let (cc, _) = c.usage("cc").await.unwrap();
        assert!(
            (8 << 20..12 << 20).contains(&cc),
            "committed child usage {cc}"
        );
        c.view("v", Some("cc"), none()).await.unwrap();
        assert!(
            c.usage("v").await.unwrap().0 < 1 << 20,
            "a view adds nothing"
        );
        assert_eq!(c.usage("uc").await.unwrap().0, committed);
        assert_eq!(c.usage("cc").await.unwrap().0, cc);
    });
}

/// Remove only records the removal (the key is free at once); Cleanup and the background
/// reclaimer delete devices; a device still mounted is reclaimed after its unmount.
#[test]
fn remove_and_cleanup() {
    let h = &Harness::start("grpc-remove");
    h.run(|mut c| async move {
        let base_devices = c.devices().await.unwrap().len();
        assert_eq!(base_devices, 1, "only the base device");
        c.prepare("r", None, none()).await.unwrap();
        c.remove("r").await.expect("remove");
        assert_eq!(code(c.stat("r").await), Code::NotFound);
        assert!(c.list(&[]).await.unwrap().is_empty());
        c.prepare("r", None, none())
            .await
            .expect("the key is free at once");
        c.remove("r").await.unwrap();
        c.cleanup().await.expect("cleanup");
        assert_eq!(c.devices().await.unwrap().len(), base_devices);

        // GC order: a chain's child, then at once its parent (no Cleanup in between).
        c.prepare("ck", None, none()).await.unwrap();
        c.commit("chain1", "ck", none()).await.unwrap();
        c.prepare("ck2", Some("chain1"), none()).await.unwrap();
        c.commit("chain2", "ck2", none()).await.unwrap();
        c.prepare("top", Some("chain2"), none()).await.unwrap();
        assert_eq!(code(c.remove("chain2").await), Code::FailedPrecondition);
        c.remove("top").await.unwrap();
        c.remove("chain2")
            .await
            .expect("a removed child does not block its parent");
        c.remove("chain1").await.unwrap();
        c.cleanup().await.unwrap();
        assert_eq!(c.devices().await.unwrap().len(), base_devices);
        let a = c.audit().await.unwrap();
        assert!(a.clean, "{a:?}");

        // Mounted while removed: Remove succeeds, the delete waits for the unmount.
        let m = c.prepare("busy", None, none()).await.unwrap();
        let dir = h.open_target(&m[0], "busy");
        c.remove("busy")
            .await
            .expect("remove of a mounted snapshot is recorded");
        c.cleanup().await.expect("cleanup skips a busy device");
        let devs = c.devices().await.unwrap();
        assert_eq!(devs.len(), 2, "the busy device waits: {devs:?}");
        assert!(
            devs.iter()
                .any(|d| d.state == thinpool_proto::admin::DeviceState::Deleting as i32)
        );
        h.close_target(dir);
        // The background reclaimer gets it without another Cleanup.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while c.devices().await.unwrap().len() > base_devices {
            assert!(
                std::time::Instant::now() < deadline,
                "not reclaimed in 90 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let a = c.audit().await.unwrap();
        assert!(a.clean, "{a:?}");
    });
}

/// The admin API: pool status, devices, activate/deactivate by key, audit.
#[test]
fn admin_api() {
    let h = &Harness::start("grpc-admin");
    h.run(|mut c: Client| async move {
        let s = c.pool_status().await.unwrap();
        assert_eq!(s.backend, thinpool_tests::backend().to_string());
        assert_eq!(s.data_space_total, 4 << 30);
        assert_eq!(s.metadata_space_total, 64 << 20);
        assert_eq!(s.base_device_size, 256 << 20);
        assert_eq!(s.pool_blocksize, 64 << 10);
        assert_eq!(s.backing_filesystem, "ext4");
        assert_eq!(s.thin_pool_minimum_free_space, s.data_space_total / 10);
        assert_eq!(
            s.data_space_available,
            s.data_space_total - s.data_space_used
        );
        // The base device's filesystem uses data space; sim formats nothing.
        assert!(
            (s.data_space_used > 0 || on_sim()) && s.metadata_space_used > 0,
            "{s:?}"
        );
        assert_eq!(s.udev_sync_supported, "not applicable");
        assert!(s.deferred_removal_enabled);
        assert_eq!(s.mode, "rw");
        assert!(!s.needs_check);
        assert!(s.transaction_id > 0);
        assert!(s.host_fs_total_bytes > 0 && s.host_fs_free_bytes > 0);
        assert!(s.data_file.ends_with("/data") && s.metadata_file.ends_with("/metadata"));
        assert!(s.pool_name.starts_with("thinpool-"), "{}", s.pool_name);
        assert_eq!(s.devices, 1);

        c.prepare("k", None, none()).await.unwrap();
        c.commit("layer", "k", none()).await.unwrap();
        c.prepare("ctr", Some("layer"), none()).await.unwrap();
        let devs = c.devices().await.unwrap();
        assert_eq!(devs.len(), 3);
        let by = |n: &str| devs.iter().find(|d| d.name == n).cloned().unwrap();
        let base = devs
            .iter()
            .find(|d| d.kind == thinpool_proto::admin::DeviceKind::Base as i32)
            .unwrap();
        assert_eq!(base.parent_id, None);
        let layer = by("layer");
        assert_eq!(layer.parent_id, Some(base.id));
        assert_eq!(layer.device_path, "", "committed devices are inactive");
        let ctr = by("ctr");
        assert_eq!(ctr.parent_id, Some(layer.id));
        assert_eq!(ctr.parent_name, "layer");
        assert_eq!(ctr.size, 256 << 20);
        if on_sim() {
            assert!(ctr.device_path.starts_with('/'), "{ctr:?}");
        } else {
            assert!(ctr.device_path.starts_with("/dev/"), "{ctr:?}");
            assert!(base.mapped_bytes > 0, "the base holds a filesystem");
        }

        // Activate a committed layer (read-only) for an exec component, then deactivate.
        let m = c.activate("layer").await.unwrap();
        assert!(m[0].options.iter().any(|o| o == "ro"));
        let dir = h.open_target(&m[0], "layer");
        assert_eq!(
            code(c.deactivate("layer").await),
            Code::FailedPrecondition,
            "deactivate while mounted"
        );
        h.close_target(dir);
        c.deactivate("layer").await.unwrap();
        assert_eq!(by_name(&mut c, "layer").await.device_path, "");
        assert_eq!(code(c.activate("missing").await), Code::NotFound);
        assert_eq!(code(c.deactivate("missing").await), Code::NotFound);
        assert_eq!(code(c.activate("").await), Code::InvalidArgument);

        let a = c.audit().await.unwrap();
        assert!(
            a.clean && a.leaked.is_empty() && a.missing.is_empty(),
            "{a:?}"
        );
    });
}

async fn by_name(c: &mut Client, n: &str) -> thinpool_client::Device {
    c.devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.name == n)
        .unwrap()
}

/// The snapshotter field is ignored, requests carrying containerd's namespace header work,
/// and Cleanup with nothing to do succeeds.
#[test]
fn snapshotter_field_and_namespace_header() {
    let h = &Harness::start("grpc-ns");
    h.run(|c| async move {
        let mut raw = c.snapshots_raw();
        let mut req = tonic::Request::new(pb::PrepareSnapshotRequest {
            snapshotter: "something-else".into(),
            key: "default/1/k".into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert(thinpool_proto::NAMESPACE_HEADER, "default".parse().unwrap());
        raw.prepare(req)
            .await
            .expect("prepare with a namespace header");
        let st = raw
            .stat(pb::StatSnapshotRequest {
                snapshotter: String::new(),
                key: "default/1/k".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.info.unwrap().name, "default/1/k");
        raw.cleanup(pb::CleanupRequest::default())
            .await
            .expect("cleanup");
    });
}
