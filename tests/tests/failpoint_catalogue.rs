//! The failpoint catalogue in step: every `failpoint::hit` / `fail_once` name in the sources
//! (thinpool/src, server/src; the `{op}` format forms expanded) is in docs/failpoints.md and
//! in the torture catalogue (`CATALOGUE` or, with a reason, `NOT_TORTURED`), and each of
//! those names a point the sources have. Native and quick: it reads files only.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use thinpool_tests::source_path;
use thinpool_tests::torture::{CATALOGUE, NOT_TORTURED};

/// What `{op}` stands for in `failpoint::hit(&format!("{op}:..."))` (engine/create.rs:
/// a parentless snapshot is a "create").
const OPS: &[&str] = &["create", "snapshot"];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The string literal starting at `s` (just after its opening quote).
fn literal(s: &str) -> Option<&str> {
    s.find('"').map(|end| &s[..end])
}

/// Every point name the sources reach, and the call sites whose form this scan does not
/// know (so a new form cannot slip past it).
fn source_points() -> (BTreeSet<String>, Vec<String>) {
    let mut files = Vec::new();
    for d in ["thinpool/src", "server/src"] {
        rust_files(&source_path(d), &mut files);
    }
    let mut names = BTreeSet::new();
    let mut unknown = Vec::new();
    for f in files {
        if f.ends_with("failpoint.rs") {
            continue; // the mechanism itself, and its unit test's made-up names
        }
        let text = fs::read_to_string(&f).expect("read source");
        for (i, line) in text.lines().enumerate() {
            for call in ["failpoint::hit(", "failpoint::fail_once("] {
                let mut rest = line;
                while let Some(at) = rest.find(call) {
                    let arg = &rest[at + call.len()..];
                    rest = arg;
                    if let Some(lit) = arg.strip_prefix('"').and_then(literal) {
                        names.insert(lit.to_string());
                    } else if let Some(lit) = arg.strip_prefix("&format!(\"{op}:").and_then(literal)
                    {
                        for op in OPS {
                            names.insert(format!("{op}:{lit}"));
                        }
                    } else if arg.starts_with("point)") {
                        // engine/create.rs: `point` is one of two literals just above.
                        for op in OPS {
                            names.insert(format!("{op}:outcome_write"));
                        }
                    } else {
                        unknown.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    (names, unknown)
}

/// The names in the first column of docs/failpoints.md's tables.
fn documented() -> BTreeSet<String> {
    let text = fs::read_to_string(source_path("docs/failpoints.md")).expect("docs/failpoints.md");
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(n, _)| n.to_string()))
        .collect()
}

#[test]
fn every_failpoint_is_documented_and_in_the_torture_catalogue() {
    let (src, unknown) = source_points();
    assert!(
        unknown.is_empty(),
        "failpoint calls of a form this scan does not know (give it a literal name, or teach \
         the scan): {unknown:#?}"
    );
    // The create.rs `point` variable's literals, checked rather than assumed.
    let create_rs = fs::read_to_string(source_path("thinpool/src/engine/create.rs")).unwrap();
    for op in OPS {
        assert!(
            create_rs.contains(&format!("\"{op}:outcome_write\"")),
            "engine/create.rs no longer names {op}:outcome_write; update this scan"
        );
    }

    let docs = documented();
    let tortured: Vec<&str> = CATALOGUE.iter().map(|p| p.name).collect();
    let skipped: Vec<&str> = NOT_TORTURED.iter().map(|(n, _)| *n).collect();
    let mut catalogue = BTreeSet::new();
    for n in tortured.iter().chain(&skipped) {
        assert!(
            catalogue.insert(n.to_string()),
            "{n} is listed twice in the catalogue"
        );
    }
    for (n, why) in NOT_TORTURED {
        assert!(
            !why.trim().is_empty(),
            "{n} is not tortured without a reason"
        );
    }

    let missing_docs: Vec<_> = src.difference(&docs).collect();
    let stale_docs: Vec<_> = docs.difference(&src).collect();
    let missing_cat: Vec<_> = src.difference(&catalogue).collect();
    let stale_cat: Vec<_> = catalogue.difference(&src).collect();
    assert!(
        missing_docs.is_empty() && stale_docs.is_empty(),
        "docs/failpoints.md out of step: undocumented {missing_docs:?}, documented but not in \
         the sources {stale_docs:?}"
    );
    assert!(
        missing_cat.is_empty() && stale_cat.is_empty(),
        "tests/src/torture/mod.rs out of step: in neither CATALOGUE nor NOT_TORTURED \
         {missing_cat:?}, listed but not in the sources {stale_cat:?}"
    );

    // Issue #13: at least 20 distinct kill points besides the sim's, each tortured.
    let kills = tortured.iter().filter(|n| !n.starts_with("sim:")).count();
    assert!(kills >= 20, "only {kills} tortured kill points");
    // Every point of the catalogue is armed on some backend, and every group has a point
    // in the short form.
    let groups: BTreeSet<&str> = CATALOGUE.iter().map(|p| p.group).collect();
    for g in groups {
        assert!(
            CATALOGUE.iter().any(|p| p.group == g && p.short),
            "group {g} has no point in the short form"
        );
    }
    for p in CATALOGUE {
        assert!(
            p.backends != 0 && p.max_hit >= 1,
            "{}: no backend or hit",
            p.name
        );
    }
}
