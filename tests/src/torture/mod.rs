//! The torture campaign's catalogue of failpoints and its driver ([`driver`]): thinpoold is
//! killed (abort) at each point under a seeded load, or with kill -9 at a random moment, then
//! restarted and checked (audit, thin_check, layer checksums, records against a ledger).
//!
//! `tests/tests/failpoint_catalogue.rs` keeps [`CATALOGUE`] + [`NOT_TORTURED`], the sources'
//! `failpoint::hit`/`fail_once` names and `docs/failpoints.md` in step.

pub mod driver;
pub mod watchdog;

use thinpool::BackendKind;

/// How a case makes the daemon reach its point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The mixed client load reaches it.
    Load,
    /// Opening the pool (each daemon start) reaches it.
    Open,
    /// Only creating a pool reaches it: the case starts from a fresh pool.
    PoolCreate,
    /// The admin TakeDown after the load reaches it.
    TakeDown,
}

/// Backend bits of [`Point::backends`].
pub const DM: u8 = 1;
pub const REFLINK: u8 = 2;
pub const SIM: u8 = 4;
/// The backends with filesystems and kernel devices.
pub const FS: u8 = DM | REFLINK;
pub const ALL: u8 = DM | REFLINK | SIM;

pub fn backend_bit(kind: BackendKind) -> u8 {
    match kind {
        BackendKind::Dm => DM,
        BackendKind::Reflink => REFLINK,
        BackendKind::Sim => SIM,
    }
}

/// One kill point the torture run arms (`THINPOOL_FAILPOINTS=<name>@<hit>`).
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub name: &'static str,
    /// The operation it belongs to; the short form covers every group.
    pub group: &'static str,
    /// Where it can be reached (bits above).
    pub backends: u8,
    /// The hit to abort at is drawn from 1..=max_hit by the seed: later hits land with more
    /// state around (other clients' operations in flight).
    pub max_hit: u64,
    pub trigger: Trigger,
    /// In the short form (THINPOOL_TORTURE_SHORT=1).
    pub short: bool,
}

const fn p(
    name: &'static str,
    group: &'static str,
    backends: u8,
    max_hit: u64,
    trigger: Trigger,
    short: bool,
) -> Point {
    Point {
        name,
        group,
        backends,
        max_hit,
        trigger,
        short,
    }
}

use Trigger::*;

/// Every kill point the torture run arms. The names are those in the sources.
pub const CATALOGUE: &[Point] = &[
    p(
        "pool_create:after_store",
        "pool_create",
        ALL,
        1,
        PoolCreate,
        true,
    ),
    p(
        "pool_create:after_base",
        "pool_create",
        ALL,
        1,
        PoolCreate,
        false,
    ),
    p(
        "pool_create:after_mkfs",
        "pool_create",
        ALL,
        1,
        PoolCreate,
        false,
    ),
    p("base:after_activate", "base", FS, 1, Open, true),
    p("create:after_intent", "create", ALL, 3, Load, true),
    p("create:after_kernel", "create", ALL, 3, Load, false),
    p("create:after_fs_grow", "create", ALL, 1, Load, false),
    p("create:after_activate", "create", ALL, 3, Load, false),
    p("snapshot:after_intent", "snapshot", ALL, 3, Load, false),
    p("snapshot:after_kernel", "snapshot", ALL, 3, Load, true),
    p("snapshot:after_fs_grow", "snapshot", ALL, 1, Load, false),
    p("snapshot:after_activate", "snapshot", ALL, 3, Load, false),
    p("view:after_journal_replay", "view", FS, 2, Load, true),
    p("commit:after_flush", "commit", ALL, 3, Load, false),
    p("commit:after_suspend", "commit", DM, 2, Load, false),
    p("commit:after_freeze", "commit", REFLINK, 2, Load, false),
    p("commit:after_record", "commit", ALL, 3, Load, true),
    p("commit:after_deactivate", "commit", ALL, 3, Load, false),
    p("activate:after_record", "activate", ALL, 2, Load, true),
    p("activate:after_dev_create", "activate", DM, 4, Load, false),
    p("activate:after_kernel", "activate", ALL, 4, Load, false),
    p("deactivate:after_kernel", "deactivate", ALL, 2, Load, true),
    p("remove:after_intent", "remove", ALL, 3, Load, true),
    p("remove:after_deactivate", "remove", ALL, 3, Load, false),
    p("remove:after_kernel", "remove", ALL, 3, Load, false),
    p("reclaim:before_delete", "reclaim", ALL, 3, Load, true),
    p("reclaim:after_delete", "reclaim", ALL, 3, Load, false),
    p("grow:after_file", "grow", ALL, 2, Load, true),
    p("grow:after_kernel", "grow", ALL, 2, Load, false),
    p("thin_ls:after_reserve", "thin_ls", DM, 2, Load, true),
    p("backup:after_reserve", "backup", DM, 2, Load, false),
    p("backup:after_dump", "backup", ALL, 2, Load, true),
    p("backup:after_store", "backup", ALL, 2, Load, true),
    p(
        "take_down:after_deactivate",
        "take_down",
        ALL,
        2,
        TakeDown,
        true,
    ),
];

/// Points in the sources that the torture run does not arm, and why.
pub const NOT_TORTURED: &[(&str, &str)] = &[
    ("repair:after_repair", OFFLINE_REPAIR),
    ("repair:after_check", OFFLINE_REPAIR),
    ("repair:after_keep", OFFLINE_REPAIR),
    ("repair:after_swap", OFFLINE_REPAIR),
    ("restore:after_keep", OFFLINE_RESTORE),
    ("restore:after_thin_restore", OFFLINE_RESTORE),
    ("restore:after_metadata", OFFLINE_RESTORE),
    ("restore:after_store", OFFLINE_RESTORE),
    (
        "create:outcome_write",
        "an =error point (a failed store write, not a kill): tests/tests/recovery.rs",
    ),
    (
        "snapshot:outcome_write",
        "an =error point (a failed store write, not a kill): tests/tests/recovery.rs",
    ),
    (
        "grow:after_mount",
        "xfs pools only (the online xfs grow); the torture pools are ext4: tests/tests/suite.rs",
    ),
    (
        "reclaim:after_retry",
        "needs a quarantined device, which no load makes on its own: tests/tests/recovery.rs",
    ),
    (
        "sim:create_after_file",
        "the sim backend's own step, below the engine: the model tests (tests/tests/model.rs)",
    ),
    (
        "sim:delete_after_metadata",
        "the sim backend's own step, below the engine: the model tests (tests/tests/model.rs)",
    ),
];

const OFFLINE_REPAIR: &str = "an offline command (thinpoold --repair), not a daemon under load: \
    tests/tests/repair.rs kills it there and repairs again (dm_repair_* in the VM)";
const OFFLINE_RESTORE: &str = "an offline command (thinpoold --restore), not a daemon under load: \
    tests/tests/repair.rs kills it there and restores again";

/// The catalogue's points for `backend`, the short form's subset when `short`, only `only`
/// when it is not empty.
pub fn points_for(backend: BackendKind, short: bool, only: &[String]) -> Vec<Point> {
    let bit = backend_bit(backend);
    CATALOGUE
        .iter()
        .filter(|p| p.backends & bit != 0)
        .filter(|p| !short || p.short)
        .filter(|p| only.is_empty() || only.iter().any(|o| o == p.name))
        .copied()
        .collect()
}
