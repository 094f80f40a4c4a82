//! Model-based tests: random sequences of snapshots.v1 and admin requests run against a live
//! thinpoold and against the reference model (`thinpool_tests::model`), compared after every
//! step: each answer's gRPC code, the pool as List, Stat and ListDevices show it, and a
//! clean audit. Every daemon incarnation is armed to abort at a random hit of a random
//! failpoint (`THINPOOL_FAILPOINTS=name@N`), or to fail a store write once; after a crash it
//! is restarted, the request in flight may or may not have happened (the model takes the
//! outcome the pool shows, which must be one of the two), and everything else must match
//! exactly. The same requests carry malformed keys, labels, filters, sizes and messages.
//!
//! Budget: `THINPOOL_MODEL_OPS` requests in all (default 10,000 on sim, the default backend
//! here; 300 on the real ones), over cases of up to
//! `THINPOOL_MODEL_STEPS` requests (default 200), `THINPOOL_MODEL_JOBS` cases at a time
//! (default 2); `THINPOOL_MODEL_SOAK=<minutes>` runs cases until the time is up instead.
//! `THINPOOL_MODEL_SEED` and `THINPOOL_MODEL_CASE` replay a failed case (it prints both).
//! The daemon must be built with the `failpoints` feature (the test checks, and says how).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use thinpool_tests::live::{self, BASE_SIZE, Crashed, DATA_SIZE, Live, Reply, seen};
use thinpool_tests::model::*;
use tonic::{Code, Status};

/// Abort points the requests reach on every backend (grep `failpoint::hit`), each with the
/// highest hit to arm it at; the pool creation points are armed only for a first start.
const ABORT_POINTS: &[(&str, u32)] = &[
    ("create:after_intent", 6),
    ("create:after_kernel", 6),
    ("create:after_activate", 6),
    ("snapshot:after_intent", 4),
    ("snapshot:after_kernel", 4),
    ("snapshot:after_activate", 4),
    ("commit:after_flush", 4),
    ("commit:after_record", 4),
    ("remove:after_intent", 4),
    ("remove:after_deactivate", 4),
    ("remove:after_kernel", 4),
    ("grow:after_file", 1),
    ("grow:after_kernel", 1),
];
/// Abort points of one backend.
const SIM_POINTS: &[(&str, u32)] = &[
    ("sim:create_after_file", 6),
    ("sim:delete_after_metadata", 4),
];
const REFLINK_POINTS: &[(&str, u32)] = &[("grow:after_mount", 1)];
const CREATE_POINTS: &[&str] = &["pool_create:after_store", "pool_create:after_mkfs"];
/// Points armed with `=error`: the store write of a create's outcome fails once.
const ERROR_POINTS: &[&str] = &["create:outcome_write", "snapshot:outcome_write"];

thread_local! {
    /// The failpoint the current case's first daemon is armed at, whatever its plan says:
    /// cases take the points in turn, so that a run crashes at every one.
    static FOCUS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The focus of case `case`: every point, by turns, at hits 1, 2, ... up to its maximum.
fn focus(case: u64) -> String {
    let points: Vec<(&str, u32)> = abort_points()
        .into_iter()
        .chain(CREATE_POINTS.iter().map(|p| (*p, 1)))
        .collect();
    let (p, max) = points[(case % points.len() as u64) as usize];
    let n = 1 + (case / points.len() as u64) % u64::from(max);
    format!("{p}@{n}")
}

fn abort_points() -> Vec<(&'static str, u32)> {
    let own = match live::backend() {
        thinpool::BackendKind::Sim => SIM_POINTS,
        thinpool::BackendKind::Reflink => REFLINK_POINTS,
        thinpool::BackendKind::Dm => &[],
    };
    ABORT_POINTS.iter().chain(own).copied().collect()
}

/// Keys the generators pick for new snapshots: plain, containerd-like, path-like, unicode.
const FRESH_KEYS: &[&str] = &[
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "default/1/sha256:9f86d081884c7d65",
    "default/2/extract-123-sha256:ab",
    "x/y/z",
    "../../etc/passwd",
    "/",
    ".",
    "with space",
    "dot.ted",
    "ünïcode",
    "🙂",
    "a\"quote",
    "back\\slash",
];

const LABEL_KEYS: &[&str] = &[
    "a",
    "b",
    "x.y",
    "containerd.io/snapshot.ref",
    "containerd.io/gc.root",
    "k w",
    "ü",
    "nul\0key",
];

const LABEL_VALUES: &[&str] = &[
    "",
    "1",
    "2",
    "sha256:abc",
    "v,w",
    "a==b",
    "\"q\"",
    "x y",
    "é",
];

/// Filters thinpoold must refuse (server/src/filter.rs syntax; `~=` on purpose).
const BAD_FILTERS: &[&str] = &[
    "name~=x",
    "name==",
    "==x",
    "labels.\"unterminated==x",
    "name==a,",
    ",",
    ".name",
    "name=x",
    "name==\"x\"y",
    "labels.",
    "name==\"\\q\"",
    "!",
    "name!=",
    "kind==a==b",
    "name==a b==",
    "labels.a==\"unterminated",
];

// ---- the reference state machine: what to send

#[derive(Clone, Debug)]
struct RefState {
    model: Model,
    /// The daemon's incarnations, in order; none armed after the last.
    plan: Vec<Incarnation>,
}

/// How one daemon incarnation is armed.
#[derive(Clone, Debug, Default)]
struct Incarnation {
    /// `THINPOOL_FAILPOINTS`.
    failpoints: String,
    /// If it crashes: a power cut too (the pool's kernel objects go) before the restart.
    power_cut: bool,
}

#[derive(Clone, Copy, Debug)]
enum Restart {
    /// SIGTERM: a clean stop.
    Term,
    /// SIGKILL between requests.
    Kill,
    /// SIGKILL, then a power cut.
    PowerCut,
}

#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    Restart(Restart),
}

struct Reference;

fn plan_entry(first: bool) -> BoxedStrategy<Incarnation> {
    let abort = select(abort_points()).prop_flat_map(|(p, max)| (Just(p), 1..=max));
    let abort = abort.prop_map(|(p, n)| format!("{p}@{n}"));
    let error = (select(ERROR_POINTS), 1..=4u32).prop_map(|(p, n)| format!("{p}=error@{n}"));
    let mut choices: Vec<(u32, BoxedStrategy<String>)> = vec![
        (6, abort.clone().boxed()),
        (
            2,
            (abort, error).prop_map(|(a, e)| format!("{a},{e}")).boxed(),
        ),
        (1, Just(String::new()).boxed()),
    ];
    if first {
        choices.push((1, select(CREATE_POINTS).prop_map(str::to_string).boxed()));
    }
    (
        proptest::strategy::Union::new_weighted(choices),
        prop::bool::weighted(0.25),
    )
        .prop_map(|(failpoints, power_cut)| Incarnation {
            failpoints,
            power_cut,
        })
        .boxed()
}

impl ReferenceStateMachine for Reference {
    type State = RefState;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<RefState> {
        (
            plan_entry(true),
            prop::collection::vec(plan_entry(false), 0..12),
        )
            .prop_map(|(first, rest)| RefState {
                model: Model::new(BASE_SIZE, DATA_SIZE),
                plan: std::iter::once(first).chain(rest).collect(),
            })
            .boxed()
    }

    fn transitions(state: &RefState) -> BoxedStrategy<Step> {
        let m = &state.model;
        let all: Vec<String> = m.snaps.keys().cloned().collect();
        let committed = m.keys_of(Kind::Committed);
        let active = m.keys_of(Kind::Active);
        let labels_in_use: Vec<String> = m
            .snaps
            .values()
            .flat_map(|s| s.labels.keys().cloned())
            .collect();
        let some_key = key(&all);
        let prep = (key_new(&all), parent(&committed, &all), labels_with_size());
        let prepare = prep.clone().prop_map(|(key, parent, labels)| {
            Step::Op(Op::Prepare {
                key,
                parent,
                labels,
            })
        });
        let view = prep.prop_map(|(key, parent, labels)| {
            Step::Op(Op::View {
                key,
                parent,
                labels,
            })
        });
        let parents: Vec<String> = all
            .iter()
            .filter_map(|k| m.snaps[k].parent.clone())
            .chain(["nope".to_string()])
            .collect();
        let commit = (
            key_weighted(&active, &all),
            key_new(&all),
            labels(),
            prop_oneof![
                18 => Just(String::new()),
                1 => select(parents),
            ],
        )
            .prop_map(|(key, name, labels, parent)| {
                Step::Op(Op::Commit {
                    name,
                    key,
                    labels,
                    parent,
                })
            });
        let keys = || some_key.clone();
        let update = (
            keys(),
            labels(),
            prop::option::weighted(0.7, update_paths(&labels_in_use)),
        )
            .prop_map(|(key, labels, paths)| Step::Op(Op::Update { key, labels, paths }));
        let list =
            list_filters(m, &labels_in_use).prop_map(|filters| Step::Op(Op::List { filters }));
        prop_oneof![
            16 => prepare,
            6 => view,
            14 => commit,
            12 => keys().prop_map(|key| Step::Op(Op::Remove { key })),
            6 => keys().prop_map(|key| Step::Op(Op::Stat { key })),
            8 => update,
            5 => keys().prop_map(|key| Step::Op(Op::Usage { key })),
            5 => keys().prop_map(|key| Step::Op(Op::Mounts { key })),
            10 => list,
            2 => keys().prop_map(|key| Step::Op(Op::Activate { key })),
            2 => keys().prop_map(|key| Step::Op(Op::Deactivate { key })),
            2 => Just(Step::Op(Op::Cleanup)),
            2 => raw().prop_map(|r| Step::Op(Op::Raw(r))),
            2 => prop_oneof![
                3 => select(&GROW_VALUES[..2]),
                1 => select(GROW_VALUES),
            ]
            .prop_map(|(v, _)| Step::Op(Op::Grow { data: v.to_string() })),
            1 => select(&[Restart::Term, Restart::Kill, Restart::PowerCut][..]).prop_map(Step::Restart),
        ]
        .boxed()
    }

    fn apply(mut state: RefState, step: &Step) -> RefState {
        if let Step::Op(op) = step {
            let _ = state.model.apply(op);
        }
        state
    }
}

/// Keys no well-behaved client sends: empty, at and past the length bound, control
/// characters, arbitrary unicode. Built only when picked (they are large).
fn fuzz_key() -> BoxedStrategy<String> {
    let fixed = |i: usize| match i {
        0 => String::new(),
        1 => "x".repeat(MAX_NAME_LEN),
        2 => "x".repeat(MAX_NAME_LEN + 1),
        3 => format!("{}é", "x".repeat(MAX_NAME_LEN - 1)),
        4 => "x".repeat(100_000),
        5 => "a\0b".to_string(),
        6 => "\n".to_string(),
        7 => "tab\t".to_string(),
        8 => "\u{7f}".to_string(),
        9 => "\u{85}next-line".to_string(),
        10 => "\u{200b}zero-width".to_string(),
        _ => "%s%n%x".to_string(),
    };
    prop_oneof![
        6 => (0..12usize).prop_map(fixed),
        1 => "[a-z/._-]{1,12}",
        1 => any::<String>(),
    ]
    .boxed()
}

/// A key that exists (mostly), or a new one, or a fuzzed one.
fn key(existing: &[String]) -> BoxedStrategy<String> {
    let fresh = select(FRESH_KEYS).prop_map(str::to_string);
    if existing.is_empty() {
        prop_oneof![8 => fresh, 1 => fuzz_key()].boxed()
    } else {
        prop_oneof![14 => select(existing.to_vec()), 4 => fresh, 1 => fuzz_key()].boxed()
    }
}

/// `preferred` keys mostly, else any key.
fn key_weighted(preferred: &[String], all: &[String]) -> BoxedStrategy<String> {
    if preferred.is_empty() {
        key(all)
    } else {
        prop_oneof![3 => select(preferred.to_vec()), 1 => key(all)].boxed()
    }
}

/// A key for something new: mostly free, sometimes taken, sometimes fuzzed.
fn key_new(existing: &[String]) -> BoxedStrategy<String> {
    let fresh = select(FRESH_KEYS).prop_map(str::to_string);
    if existing.is_empty() {
        prop_oneof![14 => fresh, 1 => fuzz_key()].boxed()
    } else {
        prop_oneof![14 => fresh, 3 => select(existing.to_vec()), 1 => fuzz_key()].boxed()
    }
}

fn parent(committed: &[String], all: &[String]) -> BoxedStrategy<String> {
    let mut choices: Vec<(u32, BoxedStrategy<String>)> = vec![
        (7, Just(String::new()).boxed()),
        (2, select(FRESH_KEYS).prop_map(str::to_string).boxed()),
        (1, fuzz_key()),
    ];
    if !committed.is_empty() {
        choices.push((10, select(committed.to_vec()).boxed()));
    }
    if !all.is_empty() {
        choices.push((2, select(all.to_vec()).boxed()));
    }
    proptest::strategy::Union::new_weighted(choices).boxed()
}

fn label_value() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(LABEL_VALUES).prop_map(str::to_string),
        1 => "[ -~]{0,8}",
    ]
    .boxed()
}

/// Labels past thinpoold's bounds, or right at them. Built only when picked.
fn fuzz_labels() -> BoxedStrategy<Labels> {
    fn n(n: usize, v: &str) -> Labels {
        (0..n).map(|i| (format!("k{i}"), v.to_string())).collect()
    }
    fn one(k: String, v: String) -> Labels {
        [(k, v)].into()
    }
    let fixed = |i: usize| match i {
        0 => n(MAX_LABELS, "v"),
        1 => n(MAX_LABELS + 1, "v"),
        2 => n(MAX_LABELS + 1, ""),
        3 => n(16, &"v".repeat(MAX_LABEL_VALUE_LEN)),
        4 => n(17, &"v".repeat(MAX_LABEL_VALUE_LEN)),
        5 => one("k".repeat(MAX_LABEL_KEY_LEN), "v".into()),
        6 => one("k".repeat(MAX_LABEL_KEY_LEN + 1), "v".into()),
        7 => one("k".into(), "v".repeat(MAX_LABEL_VALUE_LEN + 1)),
        8 => one(String::new(), "v".into()),
        _ => one(String::new(), String::new()),
    };
    prop_oneof![
        3 => (0..10usize).prop_map(fixed),
        1 => prop::collection::btree_map(any::<String>(), any::<String>(), 0..4),
    ]
    .boxed()
}

fn labels() -> BoxedStrategy<Labels> {
    prop_oneof![
        24 => prop::collection::btree_map(
            select(LABEL_KEYS).prop_map(str::to_string),
            label_value(),
            0..4
        ),
        1 => fuzz_labels(),
    ]
    .boxed()
}

/// Labels, sometimes with a size label (either one, or both).
fn labels_with_size() -> BoxedStrategy<Labels> {
    let size = select(SIZE_VALUES).prop_map(|(v, _)| v.to_string());
    (
        labels(),
        prop::option::weighted(0.08, (0..3u8, size.clone(), size)),
    )
        .prop_map(|(mut l, s)| {
            if let Some((which, a, b)) = s {
                if which != 1 {
                    l.insert(SIZE_LABEL.into(), a.clone());
                }
                if which != 0 {
                    l.insert(MAX_SIZE_LABEL.into(), if which == 2 { b } else { a });
                }
            }
            l
        })
        .boxed()
}

fn update_paths(in_use: &[String]) -> BoxedStrategy<Vec<String>> {
    let mut keys: Vec<String> = LABEL_KEYS.iter().map(|s| s.to_string()).collect();
    keys.extend(in_use.iter().cloned());
    let path = prop_oneof![
        6 => select(keys).prop_map(|k| format!("labels.{k}")),
        3 => Just("labels".to_string()),
        1 => select(&["name", "parent", "kind", "created_at", "labels.", "", "Labels"][..])
            .prop_map(str::to_string),
    ];
    prop::collection::vec(path, 0..4).boxed()
}

fn selector(m: &Model, label_keys: &[String]) -> BoxedStrategy<Sel> {
    let mut keys: Vec<String> = m.snaps.keys().cloned().collect();
    keys.extend(FRESH_KEYS.iter().take(4).map(|s| s.to_string()));
    let mut lkeys: Vec<String> = LABEL_KEYS.iter().map(|s| s.to_string()).collect();
    lkeys.extend(label_keys.iter().cloned());
    let mut values: Vec<String> = LABEL_VALUES.iter().map(|s| s.to_string()).collect();
    values.extend(m.snaps.values().flat_map(|s| s.labels.values().cloned()));
    let op = prop_oneof![
        2 => Just(FilterOp::Eq),
        1 => Just(FilterOp::Ne),
        1 => Just(FilterOp::Present),
    ];
    let s = |path: Vec<String>, op: FilterOp, value: String| Sel { path, op, value };
    let field = select(
        &[
            "name",
            "parent",
            "kind",
            "labels",
            "nosuch",
            "Name",
            "name.deep",
            "kind.x",
        ][..],
    );
    let kinds = select(&["active", "view", "committed", "base", ""][..]).prop_map(str::to_string);
    prop_oneof![
        3 => (op.clone(), select(keys.clone()))
            .prop_map(move |(o, v)| s(vec!["name".into()], o, v)),
        2 => (op.clone(), prop_oneof![select(keys), Just(String::new())])
            .prop_map(move |(o, v)| s(vec!["parent".into()], o, v)),
        2 => (op.clone(), kinds).prop_map(move |(o, v)| s(vec!["kind".into()], o, v)),
        // A label key with dots is one quoted part or several bare ones: the same key.
        4 => (op.clone(), select(lkeys), select(values.clone()), any::<bool>()).prop_map(
            move |(o, k, v, split)| {
                let mut path = vec!["labels".to_string()];
                if split && !k.is_empty() {
                    path.extend(k.split('.').map(str::to_string));
                } else {
                    path.push(k);
                }
                s(path, o, v)
            }
        ),
        1 => (op, field, select(values)).prop_map(move |(o, f, v)| {
            s(f.split('.').map(str::to_string).collect(), o, v)
        }),
    ]
    .boxed()
}

fn list_filters(m: &Model, label_keys: &[String]) -> BoxedStrategy<ListFilters> {
    let sel = selector(m, label_keys);
    let parsed = prop::collection::vec(prop::collection::vec(sel.clone(), 1..4), 0..3)
        .prop_map(ListFilters::Parsed);
    // Right at thinpoold's bounds and just past them: the model knows which is which.
    // Built only when picked.
    fn deep(n: usize) -> Sel {
        Sel {
            path: std::iter::once("labels".to_string())
                .chain((1..n).map(|_| "a".to_string()))
                .collect(),
            op: FilterOp::Present,
            value: String::new(),
        }
    }
    fn name(v: String) -> Sel {
        Sel {
            path: vec!["name".into()],
            op: FilterOp::Eq,
            value: v,
        }
    }
    let fixed = |i: usize| match i {
        0 => vec![vec![deep(MAX_PATH_DEPTH)]],
        1 => vec![vec![deep(MAX_PATH_DEPTH + 1)]],
        2 => vec![vec![name("a".into())]; MAX_FILTERS],
        3 => vec![vec![name("a".into())]; MAX_FILTERS + 1],
        4 => vec![vec![name("a".into()); 64]; 4],
        5 => vec![
            vec![name("a".into()); 64],
            vec![name("a".into()); 65],
            vec![name("a".into()); 64],
            vec![name("a".into()); 64],
        ],
        6 => vec![vec![name("v".repeat(MAX_FILTER_BYTES))]],
        _ => vec![vec![name("v".repeat(MAX_FILTER_BYTES - 6))]],
    };
    let bounds = (0..8usize).prop_map(fixed).prop_map(ListFilters::Parsed);
    prop_oneof![
        20 => parsed,
        2 => prop::collection::vec(select(BAD_FILTERS).prop_map(str::to_string), 1..3)
            .prop_map(ListFilters::Invalid),
        1 => bounds,
        1 => prop::collection::vec(any::<String>(), 1..3).prop_map(ListFilters::Arbitrary),
    ]
    .boxed()
}

fn raw() -> BoxedStrategy<Raw> {
    let non_utf8 = prop_oneof![
        Just(vec![0xff]),
        Just(vec![b'a', 0xc0, 0x80]),
        Just(vec![0xed, 0xa0, 0x80]),
        prop::collection::vec(0x80..=0xffu8, 1..16)
            .prop_filter("not UTF-8", |v| std::str::from_utf8(v).is_err()),
    ];
    // A field with an invalid wire type (7), or a length longer than what follows: no
    // protobuf decoder takes either.
    let garbage = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|mut v| {
            v.insert(0, 0x0f);
            v
        }),
        (2..120u8, prop::collection::vec(any::<u8>(), 0..1)).prop_map(|(n, v)| {
            let mut out = vec![0x12, n];
            out.extend(v);
            out
        }),
    ];
    prop_oneof![
        2 => non_utf8.prop_map(Raw::NonUtf8Key),
        2 => garbage.prop_map(Raw::Garbage),
        1 => Just(Raw::UpdateWithoutInfo),
    ]
    .boxed()
}

// ---- the system under test: a live daemon, and the model of what it holds

#[derive(Default, Debug)]
struct Totals {
    ops: u64,
    crashes: u64,
    crashes_at: BTreeMap<String, u64>,
    injected_errors: u64,
    power_cuts: u64,
    /// Time spent starting daemons, sending the requests, and checking after them.
    t_start: Duration,
    t_exec: Duration,
    t_check: Duration,
    t_by_op: BTreeMap<&'static str, (u64, Duration)>,
    restarts: u64,
    cases: u64,
    hits: BTreeMap<String, u64>,
    codes: BTreeMap<(String, String), u64>,
}

static TOTALS: Mutex<Option<Totals>> = Mutex::new(None);

fn totals<T>(f: impl FnOnce(&mut Totals) -> T) -> T {
    let mut t = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
    f(t.get_or_insert_with(Totals::default))
}

/// Requests run in all (to stop at the budget).
static OPS: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

struct Sut {
    live: Live,
    /// What the pool holds, as far as requests that returned have said.
    model: Model,
    plan: VecDeque<Incarnation>,
    /// The current incarnation.
    armed: Incarnation,
    /// The incarnation is armed to fail a store write, not yet consumed.
    error_armed: bool,
}

impl Sut {
    /// Starts the next incarnation, restarting for as long as it dies while opening.
    fn start(&mut self) {
        for _ in 0..50 {
            self.armed = self.plan.pop_front().unwrap_or_default();
            self.error_armed = self.armed.failpoints.contains("=error");
            let t0 = Instant::now();
            let started = self.live.start(&self.armed.failpoints);
            totals(|t| {
                t.restarts += 1;
                t.t_start += t0.elapsed();
            });
            match started {
                Ok(()) => return,
                Err(c) => self.crashed(c),
            }
        }
        panic!("thinpoold died at every start");
    }

    /// Books a crash; panics unless it was an armed failpoint.
    fn crashed(&mut self, c: Crashed) {
        assert!(
            c.aborted(),
            "thinpoold died, not at a failpoint ({:?}, armed: {:?}):\n{}",
            c.0,
            self.armed,
            self.live.log_tail()
        );
        let log = std::fs::read_to_string(&self.live.log).unwrap_or_default();
        let point = log
            .lines()
            .filter(|l| l.contains(": aborting"))
            .find_map(|l| l.strip_prefix("failpoint ")?.split_once(": "))
            .map_or_else(|| "?".to_string(), |(p, _)| p.to_string());
        totals(|t| {
            t.crashes += 1;
            *t.crashes_at.entry(point).or_insert(0) += 1;
            t.power_cuts += u64::from(self.armed.power_cut);
        });
        if self.armed.power_cut {
            self.live.power_cut();
        }
    }

    /// The pool as the daemon shows it now (restarting it if it dies meanwhile, which only
    /// a background reclaim at an armed point can do: nothing visible changes then).
    fn view(&mut self, devices: bool, status: bool) -> PoolView {
        loop {
            match self.live.view(devices, status) {
                Ok(v) => return v,
                Err(c) => {
                    self.crashed(c);
                    self.start();
                }
            }
        }
    }

    /// After every step: the pool equals the model, every snapshot (or `keys`) Stats as
    /// List shows it, and the audit is clean.
    /// `all`: Stat every snapshot and read the pool's size (after a start); else Stat
    /// `keys`. Devices' sizes and activity (admin ListDevices) are compared after a start
    /// or a request that may change them.
    fn check(&mut self, keys: &[String], all: bool, what: &Step) {
        let t0 = Instant::now();
        let devices = all
            || match what {
                Step::Op(op) => op.mutates() || matches!(op, Op::Cleanup),
                Step::Restart(_) => true,
            };
        self.check_inner(keys, all, devices, what);
        totals(|t| t.t_check += t0.elapsed());
    }

    fn check_inner(&mut self, keys: &[String], all: bool, devices: bool, what: &Step) {
        let view = self.view(devices, all);
        if let Err(e) = self.model.check(&view) {
            panic!("after {what:?}: the pool differs from the model: {e}");
        }
        let stat: Vec<String> = if all {
            view.snaps.keys().cloned().collect()
        } else {
            keys.iter()
                .filter(|k| view.snaps.contains_key(*k))
                .cloned()
                .collect()
        };
        for k in stat {
            let info = loop {
                match self.live.stat(&k) {
                    Ok(r) => break r,
                    Err(c) => {
                        self.crashed(c);
                        self.start();
                    }
                }
            };
            let info = info.unwrap_or_else(|s| panic!("after {what:?}: Stat {k:?}: {s:?}"));
            let (name, mut s) = seen(&info).unwrap();
            let mut l = view.snaps[&k].clone();
            (l.size, l.active) = (None, None);
            s.size = None;
            assert_eq!(
                (name.as_str(), &s),
                (k.as_str(), &l),
                "after {what:?}: Stat vs List"
            );
        }
        let audit = loop {
            match self.live.audit() {
                Ok(a) => break a,
                Err(c) => {
                    self.crashed(c);
                    self.start();
                }
            }
        };
        assert!(audit.clean, "after {what:?}: audit: {audit:?}");
    }
}

fn code_name(r: &Result<Outcome, Code>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(c) => format!("{c:?}"),
    }
}

/// Checks one answer against the model's prediction; returns whether the request took
/// effect (a failure injected at a store write undoes a create that the model predicted).
fn check_reply(
    sut: &mut Sut,
    op: &Op,
    expected: &Result<Outcome, Code>,
    got: Result<Reply, Status>,
) -> bool {
    let ctx = || format!("{op:?}");
    match (expected, got) {
        (Err(code), Err(s)) => {
            assert_eq!(s.code(), *code, "{}: wrong code ({})", ctx(), s.message());
            false
        }
        (Ok(_), Err(s))
            if s.code() == Code::Internal
                && sut.error_armed
                && matches!(op, Op::Prepare { .. } | Op::View { .. })
                && s.message().contains("failpoint") =>
        {
            sut.error_armed = false;
            totals(|t| t.injected_errors += 1);
            false
        }
        // Arbitrary filters may be refused too.
        (Ok(Outcome::ListedSubset(_)), Err(s)) if s.code() == Code::InvalidArgument => false,
        (Err(code), Ok(r)) => panic!("{}: expected {code:?}, got {r:?}", ctx()),
        (Ok(o), Err(s)) => panic!("{}: expected {o:?}, got {s:?}", ctx()),
        (Ok(o), Ok(r)) => {
            match (o, r) {
                (Outcome::Mount { read_only }, Reply::Mounts(m)) => {
                    assert_eq!(m.len(), 1, "{}: {m:?}", ctx());
                    assert_eq!(
                        m[0].options.iter().any(|o| o == "ro"),
                        *read_only,
                        "{}: read-only? {m:?}",
                        ctx()
                    );
                }
                (Outcome::Done, Reply::Unit) => {}
                (Outcome::Info { key }, Reply::Info(i)) => {
                    let (name, s) = seen(&i).unwrap_or_else(|e| panic!("{}: {e}", ctx()));
                    let m = &sut.model.snaps[key];
                    assert_eq!(
                        (&name, s.kind, &s.parent, &s.labels),
                        (key, m.kind, &m.parent, &m.labels),
                        "{}: the answer's info",
                        ctx()
                    );
                }
                (Outcome::Usage { frozen }, Reply::Usage { size, inodes }) => {
                    assert!(size >= 0 && inodes == 0, "{}: usage {size}/{inodes}", ctx());
                    let Op::Usage { key } = op else {
                        unreachable!()
                    };
                    let s = sut.model.snaps.get_mut(key).expect("usage of a snapshot");
                    match frozen {
                        Some(u) => assert_eq!(size, *u, "{}: a layer's usage changed", ctx()),
                        None if s.kind == Kind::Committed => s.usage = Some(size),
                        None => {}
                    }
                }
                (Outcome::Listed(want), Reply::Listed(infos)) => {
                    let got: std::collections::BTreeSet<String> =
                        infos.iter().map(|i| i.name.clone()).collect();
                    assert_eq!(got.len(), infos.len(), "{}: a key listed twice", ctx());
                    assert_eq!(&got, want, "{}: filters {:?}", ctx(), list_wire(op));
                }
                (Outcome::ListedSubset(all), Reply::Listed(infos)) => {
                    for i in infos {
                        assert!(all.contains(&i.name), "{}: listed {:?}", ctx(), i.name);
                    }
                }
                (o, r) => panic!("{}: expected {o:?}, got {r:?}", ctx()),
            }
            true
        }
    }
}

fn list_wire(op: &Op) -> Vec<String> {
    match op {
        Op::List { filters } => filters.wire(),
        _ => vec![],
    }
}

struct ModelTest;

impl StateMachineTest for ModelTest {
    type SystemUnderTest = Sut;
    type Reference = Reference;

    fn init_test(r: &RefState) -> Sut {
        let root = thinpool_tests::pool_dir("model", false);
        let mut plan: VecDeque<Incarnation> = r.plan.iter().cloned().collect();
        let focus = FOCUS.with(|f| f.borrow().clone());
        if !focus.is_empty()
            && let Some(first) = plan.front_mut()
        {
            first.failpoints = focus;
        }
        let mut sut = Sut {
            live: Live::new(&root),
            model: r.model.clone(),
            plan,
            armed: Incarnation::default(),
            error_armed: false,
        };
        sut.start();
        assert!(
            sut.live.hits().contains_key("pool_create:after_store"),
            "thinpoold reached no failpoint while creating its pool: it was built without \
             the failpoints feature. Build it with \
             `cargo build -p thinpool-server --features thinpool/failpoints` (or run \
             `cargo test --workspace`, which builds it with the tests' features)"
        );
        sut.check(&[], true, &Step::Restart(Restart::Term));
        totals(|t| t.cases += 1);
        sut
    }

    fn apply(mut sut: Sut, _r: &RefState, step: Step) -> Sut {
        OPS.fetch_add(1, Ordering::Relaxed);
        totals(|t| t.ops += 1);
        let op = match step {
            Step::Restart(how) => {
                match how {
                    Restart::Term => sut.live.stop(),
                    Restart::Kill => sut.live.kill(),
                    Restart::PowerCut => {
                        sut.live.kill();
                        sut.live.power_cut();
                        totals(|t| t.power_cuts += 1);
                    }
                }
                sut.start();
                sut.check(&[], true, &Step::Restart(how));
                return sut;
            }
            Step::Op(op) => op,
        };
        let before = sut.model.clone();
        let mut after = sut.model.clone();
        let expected = after.apply(&op);
        totals(|t| {
            *t.codes
                .entry((op.name().to_string(), code_name(&expected)))
                .or_insert(0) += 1
        });
        let keys: Vec<String> = op
            .keys()
            .into_iter()
            .filter(|k| valid_name(k))
            .map(str::to_string)
            .collect();
        let t0 = Instant::now();
        let r = sut.live.exec(&op);
        totals(|t| {
            t.t_exec += t0.elapsed();
            let e = t.t_by_op.entry(op.name()).or_default();
            e.0 += 1;
            e.1 += t0.elapsed();
        });
        match r {
            Ok(got) => {
                sut.model = after;
                if !check_reply(&mut sut, &op, &expected, got) {
                    sut.model = before;
                }
                let grew = matches!(op, Op::Grow { .. });
                sut.check(&keys, grew, &Step::Op(op));
            }
            Err(c) => {
                sut.crashed(c);
                sut.start();
                // The request in flight happened or did not: the pool must show one of the
                // two, then match it exactly.
                let view = sut.view(true, true);
                let candidates = if op.mutates() && expected.is_ok() {
                    vec![after, before]
                } else {
                    vec![before]
                };
                let diffs: Vec<String> = candidates
                    .iter()
                    .map(|m| m.compare(&view).err().unwrap_or_default())
                    .collect();
                let Some(i) = diffs.iter().position(String::is_empty) else {
                    panic!("after a crash in {op:?}: the pool is neither outcome: {diffs:?}");
                };
                sut.model = candidates.into_iter().nth(i).unwrap();
                sut.check(&[], true, &Step::Op(op));
            }
        }
        sut
    }

    fn teardown(mut sut: Sut) {
        // A clean restart keeps everything.
        sut.plan.clear();
        sut.live.stop();
        sut.start();
        sut.check(&[], true, &Step::Restart(Restart::Term));
        let hits = sut.live.hits();
        totals(|t| {
            for (k, v) in hits {
                *t.hits.entry(k).or_insert(0) += v;
            }
        });
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

#[test]
fn model_based_random_requests_with_crashes() {
    let started = Instant::now();
    let soak = std::env::var("THINPOOL_MODEL_SOAK")
        .ok()
        .map(|m| Duration::from_secs_f64(m.parse::<f64>().expect("minutes") * 60.0));
    // The real backends are much slower (loop devices, mkfs): a sample there.
    let default_ops = if live::backend() == thinpool::BackendKind::Sim {
        10_000
    } else {
        300
    };
    let budget = env_u64("THINPOOL_MODEL_OPS", default_ops);
    let steps = env_u64("THINPOOL_MODEL_STEPS", 200) as usize;
    let jobs = env_u64("THINPOOL_MODEL_JOBS", 2).max(1);
    let seed = env_u64("THINPOOL_MODEL_SEED", rand_seed());
    eprintln!(
        "model: backend {}, seed {seed} (THINPOOL_MODEL_SEED replays), {}, {jobs} jobs",
        live::backend(),
        match soak {
            Some(d) => format!("soak for {d:?}"),
            None => format!("{budget} requests"),
        }
    );
    // THINPOOL_MODEL_CASE=N runs case N of the seed's run alone (to replay a failure).
    let only = std::env::var("THINPOOL_MODEL_CASE").ok().map(|c| {
        c.parse::<u64>()
            .expect("THINPOOL_MODEL_CASE: a case number")
    });
    let next_case = AtomicU64::new(only.unwrap_or(0));
    let done = || match (only, soak) {
        (Some(c), _) => next_case.load(Ordering::Relaxed) > c,
        (None, Some(d)) => started.elapsed() >= d,
        (None, None) => OPS.load(Ordering::Relaxed) >= budget,
    };
    let jobs = if only.is_some() { 1 } else { jobs };
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                while !done() && !STOP.load(Ordering::Relaxed) {
                    let case = next_case.fetch_add(1, Ordering::Relaxed);
                    run_case(seed, case, steps);
                }
            });
        }
    });
    let t = totals(std::mem::take);
    eprintln!("model: {} cases in {:.1?}", t.cases, started.elapsed());
    eprintln!(
        "model: {} requests, {} crashes at failpoints, {} injected store failures, {} power \
         cuts, {} daemon starts",
        t.ops, t.crashes, t.injected_errors, t.power_cuts, t.restarts
    );
    eprintln!(
        "model: time in daemon starts {:.1?}, requests {:.1?}, checks {:.1?}",
        t.t_start, t.t_exec, t.t_check
    );
    eprintln!(
        "model: mean time per request: {}",
        t.t_by_op
            .iter()
            .map(|(op, (n, d))| format!("{op} {:.1?}", *d / (*n).max(1) as u32))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("model: crashes by failpoint: {:?}", t.crashes_at);
    eprintln!("model: failpoints reached (hits): {:?}", t.hits);
    let mut by_op: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((op, code), n) in &t.codes {
        by_op.entry(op).or_default().push(format!("{code} {n}"));
    }
    for (op, codes) in by_op {
        eprintln!("model:   {op}: {}", codes.join(", "));
    }
    assert!(t.ops >= budget.min(1), "no requests ran");
    // Each case's first daemon is armed at the next point in turn: once the run has had
    // each point's turn three times, every one must have been reached, and must have
    // crashed the daemon.
    let points: Vec<&str> = abort_points()
        .into_iter()
        .map(|(p, _)| p)
        .chain(CREATE_POINTS.iter().copied())
        .collect();
    if t.cases >= 3 * points.len() as u64 {
        let unreached: Vec<&&str> = points
            .iter()
            .chain(ERROR_POINTS)
            .filter(|p| !t.hits.contains_key(**p))
            .collect();
        assert!(unreached.is_empty(), "never reached: {unreached:?}");
        let missed: Vec<&&str> = points
            .iter()
            .filter(|p| !t.crashes_at.contains_key(**p))
            .collect();
        assert!(missed.is_empty(), "no crash at {missed:?}");
    } else {
        eprintln!(
            "model: {} cases, too few to require a crash at each of the {} failpoints",
            t.cases,
            points.len()
        );
    }
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// One proptest case (shrunk on failure, unless `THINPOOL_MODEL_SHRINK=0`), seeded by
/// `seed` and `case`.
fn run_case(seed: u64, case: u64, steps: usize) {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&case.to_le_bytes());
    let shrink = env_u64("THINPOOL_MODEL_SHRINK", 64) as u32;
    let config = Config {
        cases: 1,
        failure_persistence: None,
        max_shrink_iters: shrink,
        max_shrink_time: 180_000,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(config.clone(), rng);
    let strategy = Reference::sequential_strategy(steps.div_ceil(2)..=steps);
    /// Says which case failed, however it fails.
    struct Blame(u64, u64);
    impl Drop for Blame {
        fn drop(&mut self) {
            if std::thread::panicking() {
                STOP.store(true, Ordering::Relaxed);
                eprintln!(
                    "model: case {} failed; replay it: THINPOOL_MODEL_SEED={} \
                     THINPOOL_MODEL_CASE={}",
                    self.1, self.0, self.1
                );
            }
        }
    }
    let _blame = Blame(seed, case);
    FOCUS.with(|f| *f.borrow_mut() = focus(case));
    if shrink == 0 {
        // The runner would ask the state machine's value tree for the failing case without
        // shrinking it first, which it refuses: run the case directly.
        use proptest::strategy::ValueTree;
        let tree = strategy.new_tree(&mut runner).expect("generate a case");
        let (init, transitions, _) = tree.current();
        ModelTest::test_sequential(config, init, transitions, None);
        return;
    }
    let result = runner.run(&strategy, |(init, transitions, seen)| {
        ModelTest::test_sequential(config.clone(), init, transitions, seen);
        Ok(())
    });
    if let Err(e) = result {
        panic!("model case {case} (THINPOOL_MODEL_SEED={seed}) failed: {e}");
    }
}

#[test]
fn oversized_messages_are_refused_and_the_daemon_lives() {
    let root = thinpool_tests::pool_dir("model-huge", false);
    let mut live = Live::new(&root);
    live.start("").expect("start");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A Prepare of 17 MiB: past the daemon's 16 MiB message limit.
    let mut body = vec![0x12];
    thinpool_tests::live::put_varint(&mut body, 17 << 20);
    body.extend(std::iter::repeat_n(b'k', 17 << 20));
    let channel = rt
        .block_on(thinpool_tests::live::connect(&live.socket))
        .expect("connect");
    let r = rt.block_on(thinpool_tests::live::raw_unary(channel, "Prepare", body));
    let s = r.expect_err("a 17 MiB request is refused");
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    // A well-formed Prepare whose key is 4 MiB: under the limit, refused by the key rule.
    let key = "k".repeat(4 << 20);
    let r = live.exec(&Op::Prepare {
        key,
        parent: String::new(),
        labels: Labels::new(),
    });
    let s = r.expect("alive").expect_err("refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // Still serving.
    let v = live.view(true, true).expect("alive");
    assert!(v.snaps.is_empty());
}

/// A client that keeps a connection open and never reads again (stopped, hung) does not
/// keep the daemon from stopping: SIGTERM closes its connection after the grace period.
#[test]
fn a_silent_client_does_not_hold_up_sigterm() {
    let root = thinpool_tests::pool_dir("model-silent", false);
    let mut live = Live::new(&root);
    live.start("").expect("start");
    // A second connection on a runtime that is never driven again.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut silent = rt
        .block_on(thinpool_client::Client::connect(&live.socket))
        .expect("connect");
    rt.block_on(silent.pool_status()).expect("status");
    let t = Instant::now();
    live.stop();
    let took = t.elapsed();
    assert!(
        took < thinpool_server::SHUTDOWN_GRACE + Duration::from_secs(5),
        "SIGTERM took {took:?}"
    );
    drop(silent);
}
