//! Crash injection for tests: `THINPOOL_FAILPOINTS=create:after_intent,...` makes the process
//! abort (as a kill -9 would stop it) when it reaches a named point. A point armed with the
//! suffix `=error` instead makes [`fail_once`] return true when it is reached, for error
//! paths that a kill cannot reach (a failed store write).
//!
//! `name@N` (or `name=error@N`) fires at the N-th time the point is reached instead of the
//! first, so one process can run many operations before it dies (the model-based tests).
//! `THINPOOL_FAILPOINTS_LOG=<file>` appends the name of every point reached, armed or not,
//! one a line, to `<file>`: which points a test reached, and how often.
//!
//! Compiled only with the `failpoints` feature, so production builds carry no trace of it.

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashMap;
    use std::fs::File;
    use std::io::Write;
    use std::sync::{Mutex, OnceLock};

    #[derive(PartialEq, Eq)]
    enum Action {
        Abort,
        Error,
    }

    struct Armed {
        name: String,
        action: Action,
        /// Fires at this hit of the point (1: the first).
        at: u64,
    }

    fn parse(spec: &str) -> Armed {
        let (rest, at) = match spec.rsplit_once('@') {
            Some((r, n)) if n.parse::<u64>().is_ok_and(|n| n > 0) => (r, n.parse().unwrap_or(1)),
            _ => (spec, 1),
        };
        match rest.strip_suffix("=error") {
            Some(name) => Armed {
                name: name.to_string(),
                action: Action::Error,
                at,
            },
            None => Armed {
                name: rest.to_string(),
                action: Action::Abort,
                at,
            },
        }
    }

    fn armed() -> &'static [Armed] {
        static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();
        ARMED.get_or_init(|| {
            std::env::var("THINPOOL_FAILPOINTS")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(parse)
                .collect()
        })
    }

    /// Counts a hit of `name` (and logs it); returns its number, 1 for the first.
    fn count(name: &str) -> u64 {
        static HITS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
        static LOG: OnceLock<Option<Mutex<File>>> = OnceLock::new();
        let log = LOG.get_or_init(|| {
            let path = std::env::var_os("THINPOOL_FAILPOINTS_LOG")?;
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .ok()
                .map(Mutex::new)
        });
        if let Some(f) = log {
            // One write per line, before any abort: a crash loses no hit.
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.write_all(format!("{name}\n").as_bytes());
        }
        let mut hits = HITS.lock().unwrap_or_else(|p| p.into_inner());
        let n = hits
            .get_or_insert_with(HashMap::new)
            .entry(name.into())
            .or_insert(0);
        *n += 1;
        *n
    }

    pub fn hit(name: &str) {
        let n = count(name);
        if armed()
            .iter()
            .any(|a| a.action == Action::Abort && a.name == name && a.at == n)
        {
            eprintln!("failpoint {name}: aborting (hit {n})");
            std::process::abort();
        }
    }

    pub fn fail_once(name: &str) -> bool {
        let n = count(name);
        let fire = armed()
            .iter()
            .any(|a| a.action == Action::Error && a.name == name && a.at == n);
        if fire {
            eprintln!("failpoint {name}: failing once (hit {n})");
        }
        fire
    }
}

/// Aborts the process if the failpoint `name` is armed (for this hit).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    imp::hit(name)
}

/// True when `name` is reached for the hit it is armed at as `name=error` (the first,
/// unless `@N` says otherwise); false every other time.
#[cfg(feature = "failpoints")]
pub fn fail_once(name: &str) -> bool {
    imp::fail_once(name)
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fail_once(_name: &str) -> bool {
    false
}
