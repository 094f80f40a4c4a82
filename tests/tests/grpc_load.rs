//! Load: 32 concurrent clients (one connection each) doing mixed Prepare/Commit/View/
//! Remove (plus Stat/Mounts/Usage/List) for `THINPOOL_LOAD_SECS` seconds (default 60).
//! Each client keeps a model of what it made; afterwards every record in the pool matches
//! the union of the models and the audit is clean.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thinpool_client::{Client, Kind};
use thinpool_tests::grpc::Harness;

const CLIENTS: usize = 32;
/// Live snapshots per client at most (keeps the pool at a few hundred devices).
const MAX_LIVE: usize = 10;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Snap {
    kind: Kind,
    parent: String,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One client's loop; returns its model (name → snapshot) or the first error.
async fn client(
    mut c: Client,
    id: usize,
    until: Instant,
    ops: Arc<AtomicU64>,
) -> Result<BTreeMap<String, Snap>, String> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut mine: BTreeMap<String, Snap> = BTreeMap::new();
    let mut n = 0u64;
    let none = HashMap::new;
    while Instant::now() < until {
        n += 1;
        let committed: Vec<String> = mine
            .iter()
            .filter(|(_, s)| s.kind == Kind::Committed)
            .map(|(k, _)| k.clone())
            .collect();
        let has_children =
            |name: &str, m: &BTreeMap<String, Snap>| m.values().any(|s| s.parent == name);
        let pick_parent = |rng: &mut Rng| -> String {
            match rng.below(3) {
                0 => String::new(),
                1 => "shared".to_string(),
                _ if !committed.is_empty() => committed[rng.below(committed.len())].clone(),
                _ => "shared".to_string(),
            }
        };
        let op = if mine.len() >= MAX_LIVE {
            3
        } else {
            rng.below(8)
        };
        let ctx = |what: &str, e: thinpool_client::ClientError| format!("client {id}: {what}: {e}");
        match op {
            // Prepare
            0 | 1 => {
                let key = format!("c{id}/a{n}");
                let parent = pick_parent(&mut rng);
                let p = (!parent.is_empty()).then_some(parent.as_str());
                let m = c
                    .prepare(&key, p, none())
                    .await
                    .map_err(|e| ctx("prepare", e))?;
                if m.len() != 1 || m[0].options.iter().any(|o| o == "ro") {
                    return Err(format!("client {id}: prepare mounts {m:?}"));
                }
                mine.insert(
                    key,
                    Snap {
                        kind: Kind::Active,
                        parent,
                    },
                );
            }
            // Commit
            2 => {
                let act: Vec<String> = mine
                    .iter()
                    .filter(|(_, s)| s.kind == Kind::Active)
                    .map(|(k, _)| k.clone())
                    .collect();
                if let Some(key) = act.get(rng.below(act.len().max(1))) {
                    let name = format!("c{id}/L{n}");
                    c.commit(&name, key, none())
                        .await
                        .map_err(|e| ctx("commit", e))?;
                    let mut s = mine.remove(key).unwrap();
                    s.kind = Kind::Committed;
                    mine.insert(name, s);
                }
            }
            // Remove a leaf
            3 | 4 => {
                let leaves: Vec<String> = mine
                    .keys()
                    .filter(|k| !has_children(k, &mine))
                    .cloned()
                    .collect();
                if let Some(key) = leaves.get(rng.below(leaves.len().max(1))) {
                    c.remove(key).await.map_err(|e| ctx("remove", e))?;
                    mine.remove(key);
                }
            }
            // View
            5 => {
                let key = format!("c{id}/v{n}");
                let parent = pick_parent(&mut rng);
                let p = (!parent.is_empty()).then_some(parent.as_str());
                let m = c.view(&key, p, none()).await.map_err(|e| ctx("view", e))?;
                if !m[0].options.iter().any(|o| o == "ro") {
                    return Err(format!("client {id}: view mounts {m:?}"));
                }
                mine.insert(
                    key,
                    Snap {
                        kind: Kind::View,
                        parent,
                    },
                );
            }
            // Reads: Stat + Mounts/Usage of one of ours, and a filtered List.
            _ => {
                if let Some((key, s)) = mine.iter().nth(rng.below(mine.len().max(1))) {
                    let i = c.stat(key).await.map_err(|e| ctx("stat", e))?;
                    if i.kind != s.kind as i32 || i.parent != s.parent {
                        return Err(format!("client {id}: stat {key}: {i:?} vs model {s:?}"));
                    }
                    if s.kind != Kind::Committed {
                        c.mounts(key).await.map_err(|e| ctx("mounts", e))?;
                    }
                    c.usage(key).await.map_err(|e| ctx("usage", e))?;
                }
                let f = format!("kind==committed,parent==c{id}/nothing");
                let l = c.list(&[&f]).await.map_err(|e| ctx("list", e))?;
                if !l.is_empty() {
                    return Err(format!("client {id}: filtered list {l:?}"));
                }
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    Ok(mine)
}

#[test]
fn load_32_clients() {
    let secs: u64 = std::env::var("THINPOOL_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let h = &Harness::start("grpc-load");
    h.run(|mut c| async move {
        c.prepare("shared-k", None, HashMap::new()).await.unwrap();
        c.commit("shared", "shared-k", HashMap::new())
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_secs(secs);
        let ops = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for id in 0..CLIENTS {
            let conn = Client::connect(&h.socket).await.expect("connect");
            let ops = ops.clone();
            tasks.push(tokio::spawn(client(conn, id, until, ops)));
        }
        let mut model: BTreeMap<String, Snap> = BTreeMap::new();
        model.insert(
            "shared".into(),
            Snap {
                kind: Kind::Committed,
                parent: String::new(),
            },
        );
        let mut errors = Vec::new();
        for t in tasks {
            match t.await.expect("client task") {
                Ok(m) => model.extend(m),
                Err(e) => errors.push(e),
            }
        }
        let total = ops.load(Ordering::Relaxed);
        println!(
            "{CLIENTS} clients, {secs} s: {total} operations ({:.0}/s), {} snapshots left",
            total as f64 / secs as f64,
            model.len()
        );
        assert!(errors.is_empty(), "client errors: {errors:#?}");
        assert!(total > CLIENTS as u64, "too few operations: {total}");

        // The API's view equals the models.
        c.cleanup().await.expect("cleanup");
        let listed: BTreeMap<String, Snap> = c
            .list(&[])
            .await
            .unwrap()
            .into_iter()
            .map(|i| {
                let kind = Kind::try_from(i.kind).unwrap();
                (
                    i.name,
                    Snap {
                        kind,
                        parent: i.parent,
                    },
                )
            })
            .collect();
        assert_eq!(listed, model, "List differs from the clients' models");

        // Every engine record matches: one ready device per snapshot plus the base, no
        // leftover removals, parents by id agree with the model's parent names.
        let records = h.pool().run(|p| p.devices()).await.unwrap();
        assert_eq!(
            records.len(),
            model.len() + 1,
            "devices vs snapshots + base"
        );
        let by_id: HashMap<_, _> = records.iter().map(|r| (r.id, r)).collect();
        for r in &records {
            assert_eq!(r.state, thinpool::DeviceState::Ready, "{r:?}");
            if r.kind == thinpool::DeviceKind::Base {
                continue;
            }
            let name = r.name.as_ref().expect("named").to_string();
            let m = model
                .get(&name)
                .unwrap_or_else(|| panic!("{name} not in model"));
            let parent = r
                .parent
                .and_then(|p| by_id.get(&p))
                .and_then(|p| p.name.as_ref())
                .map(|n| n.to_string())
                .unwrap_or_default();
            assert_eq!(parent, m.parent, "{name}");
            let kind = match r.kind {
                thinpool::DeviceKind::Active => Kind::Active,
                thinpool::DeviceKind::View => Kind::View,
                _ => Kind::Committed,
            };
            assert_eq!(kind, m.kind, "{name}");
        }
        let a = c.audit().await.unwrap();
        assert!(a.clean, "audit after load: {a:?}");
    });
}
