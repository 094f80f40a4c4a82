//! A reference model of containerd's snapshotter semantics, as thinpoold serves them on the
//! `snapshots.v1` API: a plain map from key to snapshot, and one function per request that
//! says what the daemon must answer and how the snapshots change.
//!
//! Each rule names its source. `storage` is containerd 1.6's `snapshots/storage/bolt.go`
//! (`CreateSnapshot`, `CommitActive`, `Remove`, `GetInfo`, `UpdateInfo`, `GetSnapshot`,
//! `WalkInfo`, `adaptSnapshot`), `filters` its `filters/filter.go`, `boltutil` its
//! `metadata/boltutil/helpers.go`; `semantics` is our docs/containerd-semantics.md, which
//! lists where thinpoold answers otherwise on purpose (malformed keys, bounded labels and
//! filters, no regular expressions, size labels), and `service` is server/src/service.rs for
//! thinpool's own additions. Errors are compared by gRPC code only.
//!
//! Left out: List's order (containerd walks keys in byte order, thinpoold in creation
//! order; the model compares sets), the `~=` operator beyond its refusal, Usage's figures
//! (only that they are there, and frozen once a layer is committed), what Update answers
//! for a label set to "" (containerd's answer still carries it, thinpoold's shows the
//! labels as stored; both store without it), the free-space guard (the tests' pools never
//! fill), mounts' contents (sim devices hold no filesystems), concurrency (one request at
//! a time), and the `snapshotter` field (thinpoold serves one pool and ignores it).

use std::collections::{BTreeMap, BTreeSet};

use tonic::Code;

pub type Labels = BTreeMap<String, String>;

/// The size label thinpoold reads at Prepare (service: `SIZE_LABEL`).
pub const SIZE_LABEL: &str = "containerd.io/snapshot/thinpool.size";
/// containerd 2.4's size label (service: `MAX_SIZE_LABEL`).
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";

/// thinpoold's bounds (thinpool/src/ids.rs, server/src/filter.rs), documented in
/// `semantics`: the model refuses what the daemon must refuse.
pub const MAX_NAME_LEN: usize = 1024;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_LEN: usize = 1024;
pub const MAX_LABEL_VALUE_LEN: usize = 4096;
pub const MAX_LABELS_TOTAL: usize = 64 * 1024;
pub const MAX_FILTERS: usize = 64;
pub const MAX_FILTER_BYTES: usize = 64 << 10;
pub const MAX_SELECTORS: usize = 256;
pub const MAX_PATH_DEPTH: usize = 32;

/// The size label values the generators use, with the size each one parses to (`None`:
/// not a size). thinpool's size syntax is its own, so the model knows these by heart
/// rather than parse.
pub const SIZE_VALUES: &[(&str, Option<u64>)] = &[
    ("256M", Some(256 << 20)),
    ("268435456", Some(256 << 20)),
    ("512M", Some(512 << 20)),
    ("1G", Some(1 << 30)),
    ("1073741824", Some(1 << 30)),
    ("4G", Some(4 << 30)),
    ("128M", Some(128 << 20)),
    ("5G", Some(5 << 30)),
    ("1E", None),
    ("1000", Some(1000)),
    ("0", Some(0)),
    ("-1", None),
    ("", None),
    ("abc", None),
    ("18446744073709551616", None),
];

fn size_value(s: &str) -> Option<u64> {
    SIZE_VALUES
        .iter()
        .find(|(v, _)| *v == s)
        .unwrap_or_else(|| panic!("size label value {s:?} is not in SIZE_VALUES"))
        .1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Active,
    View,
    Committed,
}

impl Kind {
    /// The value of the `kind` field to filters (storage: `adaptSnapshot`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
}

/// A timestamp as the wire carries it: (seconds, nanoseconds).
pub type Ts = (i64, i32);

/// What the model knows of a snapshot's timestamps. The daemon picks the instants; the
/// model checks how they relate, then remembers what it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Times {
    /// Seen; must not change until a request changes them.
    Known { created: Ts, updated: Ts },
    /// Just created or committed: created == updated (storage: `CreateSnapshot`
    /// `Created: t, Updated: t`; `CommitActive` `si.Updated = si.Created`).
    Fresh,
    /// Just updated: created unchanged, updated moved on (storage: `UpdateInfo`
    /// `updated.Updated = time.Now()`).
    Touched {
        created: Option<Ts>,
        not_before: Option<Ts>,
    },
}

#[derive(Clone, Debug)]
pub struct Snap {
    pub kind: Kind,
    /// The parent's key, `None` for a parentless snapshot.
    pub parent: Option<String>,
    pub labels: Labels,
    /// thinpool: the device's size (the parent's, or a size label's).
    pub size: u64,
    /// thinpool: whether the device is wanted active (Prepare, View, Mounts and admin
    /// Activate set it; Commit and admin Deactivate clear it).
    pub active: bool,
    pub times: Times,
    /// Usage of a committed snapshot, once seen: it never changes afterwards (thinpoold
    /// measures it at Commit; containerd's storage stores it at `CommitActive`).
    pub usage: Option<i64>,
}

/// The snapshots and the few pool facts the rules need.
#[derive(Clone, Debug)]
pub struct Model {
    pub snaps: BTreeMap<String, Snap>,
    /// Size of the base device, the size of every parentless snapshot.
    pub base_size: u64,
    /// The pool's data size: the largest size label accepted (overcommit factor 1).
    pub data_size: u64,
}

/// One selector of a filter (filters: `selector`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sel {
    pub path: Vec<String>,
    pub op: FilterOp,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterOp {
    Present,
    Eq,
    Ne,
}

/// The filters of a List request.
#[derive(Clone, Debug)]
pub enum ListFilters {
    /// Well-formed filters, rendered by [`render_filter`]: OR of ANDs.
    Parsed(Vec<Vec<Sel>>),
    /// Strings thinpoold must refuse with InvalidArgument.
    Invalid(Vec<String>),
    /// Arbitrary strings: refused (InvalidArgument) or answered with some of the snapshots.
    Arbitrary(Vec<String>),
}

impl ListFilters {
    /// The strings sent on the wire.
    pub fn wire(&self) -> Vec<String> {
        match self {
            ListFilters::Parsed(fs) => fs.iter().map(|f| render_filter(f)).collect(),
            ListFilters::Invalid(v) | ListFilters::Arbitrary(v) => v.clone(),
        }
    }
}

/// Requests that a well-behaved client cannot send through the typed API: the daemon
/// must refuse each with a status, and live on.
#[derive(Clone, Debug)]
pub enum Raw {
    /// A Prepare whose key is not UTF-8 (the wire's `string` is UTF-8: protobuf decoding
    /// fails).
    NonUtf8Key(Vec<u8>),
    /// Bytes that are not a Prepare request at all.
    Garbage(Vec<u8>),
    /// An Update without its `info`.
    UpdateWithoutInfo,
}

#[derive(Clone, Debug)]
pub enum Op {
    Prepare {
        key: String,
        parent: String,
        labels: Labels,
    },
    View {
        key: String,
        parent: String,
        labels: Labels,
    },
    Commit {
        name: String,
        key: String,
        labels: Labels,
        /// containerd 2.2's CommitSnapshotRequest.parent ("" when not sent).
        parent: String,
    },
    Remove {
        key: String,
    },
    Stat {
        key: String,
    },
    Update {
        key: String,
        labels: Labels,
        /// The field mask's paths; `None` sends no mask.
        paths: Option<Vec<String>>,
    },
    Usage {
        key: String,
    },
    Mounts {
        key: String,
    },
    List {
        filters: ListFilters,
    },
    /// thinpool's admin Activate / Deactivate.
    Activate {
        key: String,
    },
    Deactivate {
        key: String,
    },
    Cleanup,
    /// thinpool's admin GrowPool of the data: a value of [`GROW_VALUES`].
    Grow {
        data: String,
    },
    Raw(Raw),
}

/// The GrowPool data values the generators use, with what each asks for: grow by (`true`)
/// or to (`false`) a size; `None`: not a size.
pub const GROW_VALUES: &[(&str, Option<(bool, u64)>)] = &[
    ("+64M", Some((true, 64 << 20))),
    ("+1M", Some((true, 1 << 20))),
    ("+100", Some((true, 100))),
    ("+0", Some((true, 0))),
    ("1G", Some((false, 1 << 30))),
    ("", None),
    ("x", None),
];

/// The pool's data block size (thinpool's default, 64 KiB): a grown size is a multiple.
pub const BLOCK_SIZE: u64 = 64 << 10;

impl Op {
    /// Whether the request may change the snapshots (so a crash in it may leave either
    /// outcome).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Op::Prepare { .. }
                | Op::View { .. }
                | Op::Commit { .. }
                | Op::Remove { .. }
                | Op::Update { .. }
                | Op::Mounts { .. }
                | Op::Activate { .. }
                | Op::Deactivate { .. }
                | Op::Grow { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Prepare { .. } => "Prepare",
            Op::View { .. } => "View",
            Op::Commit { .. } => "Commit",
            Op::Remove { .. } => "Remove",
            Op::Stat { .. } => "Stat",
            Op::Update { .. } => "Update",
            Op::Usage { .. } => "Usage",
            Op::Mounts { .. } => "Mounts",
            Op::List { .. } => "List",
            Op::Activate { .. } => "Activate",
            Op::Deactivate { .. } => "Deactivate",
            Op::Cleanup => "Cleanup",
            Op::Grow { .. } => "Grow",
            Op::Raw(_) => "Raw",
        }
    }

    /// Keys whose records the request reads or writes (to Stat after it).
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Op::Prepare { key, parent, .. } | Op::View { key, parent, .. } => vec![key, parent],
            Op::Commit { name, key, .. } => vec![name, key],
            Op::Remove { key }
            | Op::Stat { key }
            | Op::Update { key, .. }
            | Op::Usage { key }
            | Op::Mounts { key }
            | Op::Activate { key }
            | Op::Deactivate { key } => vec![key],
            Op::List { .. } | Op::Cleanup | Op::Grow { .. } | Op::Raw(_) => vec![],
        }
    }
}

/// What a request returns when it succeeds, as far as the model predicts it.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Prepare, View, Mounts, Activate: one mount, read-only or not.
    Mount { read_only: bool },
    /// Commit, Remove, Deactivate, Cleanup.
    Done,
    /// Stat and Update: the snapshot's info (checked against the model after the step).
    Info { key: String },
    /// Usage: the frozen figure of a committed snapshot, once known.
    Usage { frozen: Option<i64> },
    /// List: exactly these keys.
    Listed(BTreeSet<String>),
    /// List with arbitrary filters: any subset of these keys.
    ListedSubset(BTreeSet<String>),
}

/// thinpoold's rule for a key or name (ids.rs `DeviceName`, `semantics` "Prepare/View,
/// empty or malformed key"): 1 to 1,024 bytes, no control characters.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && !s.chars().any(char::is_control)
}

/// A key or name that a request creates: malformed is InvalidArgument (`semantics`;
/// containerd's storage answers Unknown for "", from bolt's `ErrBucketNameRequired`).
fn new_name(s: &str) -> Result<(), Code> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(Code::InvalidArgument)
    }
}

/// A key a request looks up: "" names no snapshot, NotFound (storage: `GetInfo`,
/// `UpdateInfo`, `Remove`, `GetSnapshot`: no bucket ""); otherwise malformed is
/// InvalidArgument (`semantics`).
fn lookup_key(s: &str) -> Result<(), Code> {
    if s.is_empty() {
        Err(Code::NotFound)
    } else {
        new_name(s)
    }
}

/// Labels as stored: empty values dropped (boltutil `writeMap`: `if v == "" { delete }`),
/// then thinpoold's bounds (`semantics`, ids.rs `validate_labels`): InvalidArgument past
/// them.
pub fn stored_labels(labels: &Labels) -> Result<Labels, Code> {
    let l: Labels = labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if l.len() > MAX_LABELS {
        return Err(Code::InvalidArgument);
    }
    let mut total = 0;
    for (k, v) in &l {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_LEN || v.len() > MAX_LABEL_VALUE_LEN {
            return Err(Code::InvalidArgument);
        }
        total += k.len() + v.len();
    }
    if total > MAX_LABELS_TOTAL {
        return Err(Code::InvalidArgument);
    }
    Ok(l)
}

/// The size a Prepare or View asks for with a size label (service: `size_label`,
/// `check_size`): either label, both only if they agree; a value that is not a size, or
/// above the pool's data size, is InvalidArgument. Read before empty labels are dropped.
fn requested_size(labels: &Labels, data_size: u64) -> Result<Option<u64>, Code> {
    let v = match (labels.get(SIZE_LABEL), labels.get(MAX_SIZE_LABEL)) {
        (None, None) => return Ok(None),
        (Some(v), None) | (None, Some(v)) => v,
        (Some(a), Some(b)) => {
            if a == b || matches!((size_value(a), size_value(b)), (Some(x), Some(y)) if x == y) {
                a
            } else {
                return Err(Code::InvalidArgument);
            }
        }
    };
    match size_value(v) {
        Some(s) if s <= data_size => Ok(Some(s)),
        _ => Err(Code::InvalidArgument),
    }
}

/// The fields of a snapshot as filters see them (storage: `adaptSnapshot`).
fn field<'a>(key: &'a str, s: &'a Snap, path: &[String]) -> Option<&'a str> {
    let (first, rest) = path.split_first()?;
    match first.as_str() {
        // Only the first element counts; always present, an empty parent too.
        "name" => Some(key),
        "parent" => Some(s.parent.as_deref().unwrap_or("")),
        "kind" => Some(s.kind.as_str()),
        // Absent when there are no labels, else the label named by the rest of the path.
        "labels" => {
            if s.labels.is_empty() {
                return None;
            }
            s.labels.get(&rest.join(".")).map(String::as_str)
        }
        _ => None,
    }
}

/// filters: `selector.Match` (== needs the field present; != compares an absent field
/// as ""), `All` within a filter, `Any` across filters, no filters match everything.
pub fn matches(filters: &[Vec<Sel>], key: &str, s: &Snap) -> bool {
    filters.is_empty()
        || filters.iter().any(|sels| {
            sels.iter().all(|sel| {
                let v = field(key, s, &sel.path);
                match sel.op {
                    FilterOp::Present => v.is_some(),
                    FilterOp::Eq => v == Some(sel.value.as_str()),
                    FilterOp::Ne => v.unwrap_or("") != sel.value,
                }
            })
        })
}

/// A field name as containerd's scanner reads it bare (`[A-Za-z][A-Za-z0-9_]*`), else
/// quoted.
fn render_part(p: &str) -> String {
    let bare = p.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if bare { p.to_string() } else { quote(p) }
}

/// A value bare when both parsers take it as one token, else quoted. A value starting
/// with `/` or `|` would be read as quoted (filters: `isQuoteRune`).
fn render_value(v: &str) -> String {
    let bare = v
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-/:.".contains(c));
    if bare { v.to_string() } else { quote(v) }
}

/// Go string syntax with the escapes both parsers know.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One filter string: selectors joined by ",".
pub fn render_filter(sels: &[Sel]) -> String {
    sels.iter()
        .map(|s| {
            let path: Vec<String> = s.path.iter().map(|p| render_part(p)).collect();
            let path = path.join(".");
            match s.op {
                FilterOp::Present => path,
                FilterOp::Eq => format!("{path}=={}", render_value(&s.value)),
                FilterOp::Ne => format!("{path}!={}", render_value(&s.value)),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// thinpoold's bounds on a List's filters (filter.rs `Filters::parse`): InvalidArgument
/// past them.
fn filters_within_bounds(filters: &[Vec<Sel>]) -> bool {
    let wire: Vec<String> = filters.iter().map(|f| render_filter(f)).collect();
    filters.len() <= MAX_FILTERS
        && wire.iter().map(String::len).sum::<usize>() <= MAX_FILTER_BYTES
        && filters.iter().map(Vec::len).sum::<usize>() <= MAX_SELECTORS
        && filters
            .iter()
            .flatten()
            .all(|s| s.path.len() <= MAX_PATH_DEPTH)
}

impl Model {
    pub fn new(base_size: u64, data_size: u64) -> Model {
        Model {
            snaps: BTreeMap::new(),
            base_size,
            data_size,
        }
    }

    fn get(&self, key: &str) -> Result<&Snap, Code> {
        self.snaps.get(key).ok_or(Code::NotFound)
    }

    /// Applies `op`: its answer, and on success the snapshots changed as it says.
    pub fn apply(&mut self, op: &Op) -> Result<Outcome, Code> {
        match op {
            Op::Prepare {
                key,
                parent,
                labels,
            } => self.create(Kind::Active, key, parent, labels),
            Op::View {
                key,
                parent,
                labels,
            } => self.create(Kind::View, key, parent, labels),
            Op::Commit {
                name,
                key,
                labels,
                parent,
            } => self.commit(name, key, labels, parent),
            Op::Remove { key } => self.remove(key),
            Op::Stat { key } => {
                lookup_key(key)?;
                self.get(key)?;
                Ok(Outcome::Info { key: key.clone() })
            }
            Op::Update { key, labels, paths } => self.update(key, labels, paths.as_deref()),
            Op::Usage { key } => {
                lookup_key(key)?;
                let s = self.get(key)?;
                Ok(Outcome::Usage {
                    frozen: if s.kind == Kind::Committed {
                        s.usage
                    } else {
                        None
                    },
                })
            }
            Op::Mounts { key } => {
                lookup_key(key)?;
                // storage `GetSnapshot`: "not active or view" is FailedPrecondition.
                if self.get(key)?.kind == Kind::Committed {
                    return Err(Code::FailedPrecondition);
                }
                let s = self.snaps.get_mut(key).expect("checked");
                s.active = true;
                Ok(Outcome::Mount {
                    read_only: s.kind == Kind::View,
                })
            }
            Op::List { filters } => self.list(filters),
            // Admin API (service `activate`/`deactivate`): the key goes through
            // `DeviceName` as is, so "" is InvalidArgument there.
            Op::Activate { key } => {
                new_name(key)?;
                let s = self.snaps.get_mut(key.as_str()).ok_or(Code::NotFound)?;
                s.active = true;
                Ok(Outcome::Mount {
                    read_only: s.kind != Kind::Active,
                })
            }
            Op::Deactivate { key } => {
                new_name(key)?;
                let s = self.snaps.get_mut(key.as_str()).ok_or(Code::NotFound)?;
                s.active = false;
                Ok(Outcome::Done)
            }
            Op::Cleanup => Ok(Outcome::Done),
            Op::Grow { data } => self.grow(data),
            // A request protobuf cannot decode: Internal, as gRPC answers any message it
            // cannot unmarshal. An Update without info: InvalidArgument (service).
            Op::Raw(Raw::NonUtf8Key(_) | Raw::Garbage(_)) => Err(Code::Internal),
            Op::Raw(Raw::UpdateWithoutInfo) => Err(Code::InvalidArgument),
        }
    }

    /// Prepare and View (storage `CreateSnapshot`, after thinpoold's checks of the request).
    fn create(
        &mut self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: &Labels,
    ) -> Result<Outcome, Code> {
        new_name(key)?;
        if !parent.is_empty() {
            new_name(parent)?;
        }
        let size = requested_size(labels, self.data_size)?;
        let labels = stored_labels(labels)?;
        if size.is_some_and(|s| s == 0 || !s.is_multiple_of(4096)) {
            return Err(Code::InvalidArgument);
        }
        // storage: the parent first ("missing parent": NotFound; "not committed snapshot":
        // InvalidArgument), then the key (`ErrBucketExists`: AlreadyExists).
        let origin_size = if parent.is_empty() {
            self.base_size
        } else {
            let p = self.get(parent)?;
            if p.kind != Kind::Committed {
                return Err(Code::InvalidArgument);
            }
            p.size
        };
        if self.snaps.contains_key(key) {
            return Err(Code::AlreadyExists);
        }
        // thinpool: a device is at least as large as its origin.
        let size = size.unwrap_or(origin_size);
        if size < origin_size {
            return Err(Code::InvalidArgument);
        }
        self.snaps.insert(
            key.to_string(),
            Snap {
                kind,
                parent: (!parent.is_empty()).then(|| parent.to_string()),
                labels,
                size,
                active: true,
                times: Times::Fresh,
                usage: None,
            },
        );
        Ok(Outcome::Mount {
            read_only: kind == Kind::View,
        })
    }

    /// storage `CommitActive`.
    fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: &Labels,
        parent: &str,
    ) -> Result<Outcome, Code> {
        lookup_key(key)?;
        new_name(name)?;
        // containerd 2.2's parent field: thinpoold cannot rebase, so only the real parent
        // (or none) is accepted; checked first, on the key as it is (service
        // `check_commit_parent`).
        if !parent.is_empty() {
            let s = self.get(key)?;
            if s.parent.as_deref().unwrap_or("") != parent {
                return Err(Code::InvalidArgument);
            }
        }
        let labels = stored_labels(labels)?;
        // storage: `CreateBucket(name)` first (AlreadyExists, also for name == key), then
        // the key ("failed to get active snapshot": NotFound), then its kind ("is not
        // active": FailedPrecondition).
        if self.snaps.contains_key(name) {
            return Err(Code::AlreadyExists);
        }
        if self.get(key)?.kind != Kind::Active {
            return Err(Code::FailedPrecondition);
        }
        let mut s = self.snaps.remove(key).expect("checked");
        s.kind = Kind::Committed;
        // "Replace labels, do not inherit".
        s.labels = labels;
        s.active = false;
        s.times = Times::Fresh;
        s.usage = None;
        self.snaps.insert(name.to_string(), s);
        Ok(Outcome::Done)
    }

    /// storage `Remove`.
    fn remove(&mut self, key: &str) -> Result<Outcome, Code> {
        lookup_key(key)?;
        self.get(key)?;
        // "cannot remove snapshot with child": FailedPrecondition.
        if self
            .snaps
            .values()
            .any(|s| s.parent.as_deref() == Some(key))
        {
            return Err(Code::FailedPrecondition);
        }
        self.snaps.remove(key);
        Ok(Outcome::Done)
    }

    /// storage `UpdateInfo`: only labels change, and Updated.
    fn update(
        &mut self,
        key: &str,
        labels: &Labels,
        paths: Option<&[String]>,
    ) -> Result<Outcome, Code> {
        lookup_key(key)?;
        let s = self.get(key)?;
        let mut new = s.labels.clone();
        match paths {
            None | Some([]) => new = labels.clone(),
            Some(paths) => {
                for p in paths {
                    if p == "labels" {
                        new = labels.clone();
                    } else if let Some(k) = p.strip_prefix("labels.") {
                        // Set to the request's value, "" (and so dropped) when it has none.
                        new.insert(k.to_string(), labels.get(k).cloned().unwrap_or_default());
                    } else {
                        // "cannot update %q field": InvalidArgument, nothing changes.
                        return Err(Code::InvalidArgument);
                    }
                }
            }
        }
        let new = stored_labels(&new)?;
        let s = self.snaps.get_mut(key).expect("checked");
        s.labels = new;
        s.times = match &s.times {
            Times::Known { created, updated } => Times::Touched {
                created: Some(*created),
                not_before: Some(*updated),
            },
            Times::Touched {
                created,
                not_before,
            } => Times::Touched {
                created: *created,
                not_before: *not_before,
            },
            Times::Fresh => Times::Touched {
                created: None,
                not_before: None,
            },
        };
        Ok(Outcome::Info {
            key: key.to_string(),
        })
    }

    /// thinpool's GrowPool (engine `plan_grow`): "" asks for nothing, and a size that is
    /// not one, not above the pool's or not a multiple of its block size is refused, all
    /// InvalidArgument. The host always has room in these tests.
    fn grow(&mut self, data: &str) -> Result<Outcome, Code> {
        let change = GROW_VALUES
            .iter()
            .find(|(v, _)| *v == data)
            .unwrap_or_else(|| panic!("grow value {data:?} is not in GROW_VALUES"))
            .1;
        let new = match change {
            None => return Err(Code::InvalidArgument),
            Some((true, by)) => self.data_size + by,
            Some((false, to)) => to,
        };
        if new <= self.data_size || !new.is_multiple_of(BLOCK_SIZE) {
            return Err(Code::InvalidArgument);
        }
        self.data_size = new;
        Ok(Outcome::Done)
    }

    /// storage `WalkInfo` with `filters.ParseAll`.
    fn list(&self, filters: &ListFilters) -> Result<Outcome, Code> {
        match filters {
            ListFilters::Parsed(fs) => {
                if !filters_within_bounds(fs) {
                    return Err(Code::InvalidArgument);
                }
                Ok(Outcome::Listed(
                    self.snaps
                        .iter()
                        .filter(|(k, s)| matches(fs, k, s))
                        .map(|(k, _)| k.clone())
                        .collect(),
                ))
            }
            ListFilters::Invalid(_) => Err(Code::InvalidArgument),
            ListFilters::Arbitrary(_) => {
                Ok(Outcome::ListedSubset(self.snaps.keys().cloned().collect()))
            }
        }
    }

    /// Keys of the snapshots of `kind`.
    pub fn keys_of(&self, kind: Kind) -> Vec<String> {
        self.snaps
            .iter()
            .filter(|(_, s)| s.kind == kind)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Checks the pool the daemon shows against the model; on success the model learns
    /// what it could not predict (timestamps, frozen usage figures are learned elsewhere).
    pub fn check(&mut self, seen: &PoolView) -> Result<(), String> {
        self.compare(seen)?;
        for (k, s) in self.snaps.iter_mut() {
            let o = &seen.snaps[k];
            s.times = Times::Known {
                created: o.created,
                updated: o.updated,
            };
        }
        Ok(())
    }

    /// Whether the pool equals the model, without learning anything: a description of the
    /// first difference otherwise.
    pub fn compare(&self, seen: &PoolView) -> Result<(), String> {
        if let Some(d) = seen.data_size
            && d != self.data_size
        {
            return Err(format!("data size {d}, model {}", self.data_size));
        }
        let mine: BTreeSet<&String> = self.snaps.keys().collect();
        let theirs: BTreeSet<&String> = seen.snaps.keys().collect();
        if mine != theirs {
            return Err(format!(
                "keys differ: only in the model {:?}, only in the pool {:?}",
                mine.difference(&theirs).collect::<Vec<_>>(),
                theirs.difference(&mine).collect::<Vec<_>>()
            ));
        }
        for (k, s) in &self.snaps {
            let o = &seen.snaps[k];
            let mut diffs = Vec::new();
            if o.kind != s.kind {
                diffs.push(format!("kind {:?}, model {:?}", o.kind, s.kind));
            }
            if o.parent != s.parent {
                diffs.push(format!("parent {:?}, model {:?}", o.parent, s.parent));
            }
            if o.labels != s.labels {
                diffs.push(format!("labels {:?}, model {:?}", o.labels, s.labels));
            }
            if let Some(size) = o.size
                && size != s.size
            {
                diffs.push(format!("size {size}, model {}", s.size));
            }
            if let Some(active) = o.active
                && active != s.active
            {
                diffs.push(format!("active {active}, model {}", s.active));
            }
            match &s.times {
                Times::Known { created, updated } => {
                    if (o.created, o.updated) != (*created, *updated) {
                        diffs.push(format!(
                            "timestamps {:?}/{:?} changed from {created:?}/{updated:?}",
                            o.created, o.updated
                        ));
                    }
                }
                Times::Fresh => {
                    if o.created != o.updated {
                        diffs.push(format!(
                            "new snapshot: created {:?} != updated {:?}",
                            o.created, o.updated
                        ));
                    }
                }
                Times::Touched {
                    created,
                    not_before,
                } => {
                    if created.is_some_and(|c| c != o.created) {
                        diffs.push(format!(
                            "Update changed created: {:?} -> {:?}",
                            created, o.created
                        ));
                    }
                    if not_before.is_some_and(|n| o.updated < n) {
                        diffs.push(format!(
                            "Update moved updated back: {:?} -> {:?}",
                            not_before, o.updated
                        ));
                    }
                }
            }
            if !diffs.is_empty() {
                return Err(format!("snapshot {k:?}: {}", diffs.join("; ")));
            }
        }
        Ok(())
    }
}

/// A snapshot as the daemon shows it (List, Stat; size and activity from the admin
/// ListDevices when it was asked).
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: Labels,
    pub created: Ts,
    pub updated: Ts,
    pub size: Option<u64>,
    pub active: Option<bool>,
}

/// Every snapshot the daemon shows, by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolView {
    pub snaps: BTreeMap<String, Seen>,
    /// The pool's data size (admin PoolStatus), when it was asked.
    pub data_size: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn prepare(key: &str, parent: &str) -> Op {
        Op::Prepare {
            key: key.into(),
            parent: parent.into(),
            labels: Labels::new(),
        }
    }

    fn commit(name: &str, key: &str) -> Op {
        Op::Commit {
            name: name.into(),
            key: key.into(),
            labels: Labels::new(),
            parent: String::new(),
        }
    }

    #[test]
    fn containerd_storage_rules() {
        let mut m = Model::new(256 << 20, 4 << 30);
        assert!(m.apply(&prepare("a", "")).is_ok());
        assert_eq!(m.apply(&prepare("a", "")), Err(Code::AlreadyExists));
        // The parent is checked before the key.
        assert_eq!(m.apply(&prepare("a", "nope")), Err(Code::NotFound));
        assert_eq!(m.apply(&prepare("b", "a")), Err(Code::InvalidArgument));
        assert_eq!(m.apply(&commit("a", "a")), Err(Code::AlreadyExists));
        assert_eq!(m.apply(&commit("l", "nope")), Err(Code::NotFound));
        assert_eq!(m.apply(&commit("l", "a")), Ok(Outcome::Done));
        assert_eq!(m.apply(&commit("m", "l")), Err(Code::FailedPrecondition));
        assert!(m.apply(&prepare("c", "l")).is_ok());
        assert_eq!(
            m.apply(&Op::Remove { key: "l".into() }),
            Err(Code::FailedPrecondition)
        );
        assert_eq!(
            m.apply(&Op::Mounts { key: "l".into() }),
            Err(Code::FailedPrecondition)
        );
        assert_eq!(m.apply(&Op::Remove { key: "".into() }), Err(Code::NotFound));
        assert_eq!(
            m.apply(&Op::Remove { key: "a\0".into() }),
            Err(Code::InvalidArgument)
        );
        assert_eq!(m.apply(&prepare("", "")), Err(Code::InvalidArgument));
        assert_eq!(
            m.apply(&Op::Update {
                key: "c".into(),
                labels: labels(&[("x", "1")]),
                paths: Some(vec!["labels.x".into(), "parent".into()]),
            }),
            Err(Code::InvalidArgument)
        );
        assert!(
            m.snaps["c"].labels.is_empty(),
            "a refused Update changes nothing"
        );
    }

    #[test]
    fn filters_follow_containerd() {
        let s = Snap {
            kind: Kind::Committed,
            parent: None,
            labels: labels(&[("a.b", "1")]),
            size: 0,
            active: false,
            times: Times::Fresh,
            usage: None,
        };
        let sel = |path: &[&str], op, value: &str| Sel {
            path: path.iter().map(|p| p.to_string()).collect(),
            op,
            value: value.into(),
        };
        let yes = [
            vec![sel(&["parent"], FilterOp::Present, "")],
            vec![sel(&["parent"], FilterOp::Eq, "")],
            vec![sel(&["labels", "a", "b"], FilterOp::Eq, "1")],
            vec![sel(&["labels", "a.b"], FilterOp::Eq, "1")],
            vec![sel(&["nosuch"], FilterOp::Ne, "x")],
            vec![sel(&["name", "deep"], FilterOp::Eq, "k")],
        ];
        for f in yes {
            assert!(matches(std::slice::from_ref(&f), "k", &s), "{f:?}");
        }
        let no = [
            vec![sel(&["nosuch"], FilterOp::Present, "")],
            vec![sel(&["labels", "x"], FilterOp::Eq, "")],
            vec![sel(&["nosuch"], FilterOp::Ne, "")],
            vec![sel(&["kind"], FilterOp::Eq, "active")],
        ];
        for f in no {
            assert!(!matches(std::slice::from_ref(&f), "k", &s), "{f:?}");
        }
        assert_eq!(
            render_filter(&[
                sel(&["labels", "a.b"], FilterOp::Eq, "x y"),
                sel(&["name"], FilterOp::Present, "")
            ]),
            r#"labels."a.b"=="x y",name"#
        );
    }
}
