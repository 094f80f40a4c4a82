//! Crash injection for tests: `THINPOOL_FAILPOINTS=create:after_intent,...` makes the process
//! abort (as a kill -9 would stop it) when it reaches a named point. A point armed with the
//! suffix `=error` instead makes [`fail_once`] return true the first time it is reached,
//! for error paths that a kill cannot reach (a failed store write). Compiled only with the
//! `failpoints` feature, so production builds carry no trace of it.

#[cfg(feature = "failpoints")]
fn armed() -> &'static [String] {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("THINPOOL_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// Aborts the process if the failpoint `name` is armed.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// True the first time `name` is reached if it is armed as `name=error`.
#[cfg(feature = "failpoints")]
pub fn fail_once(name: &str) -> bool {
    use std::sync::Mutex;
    static FIRED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let armed = armed()
        .iter()
        .any(|a| a.strip_suffix("=error") == Some(name));
    if !armed {
        return false;
    }
    let mut fired = FIRED.lock().unwrap_or_else(|p| p.into_inner());
    if fired.iter().any(|f| f == name) {
        return false;
    }
    fired.push(name.to_string());
    eprintln!("failpoint {name}: failing once");
    true
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fail_once(_name: &str) -> bool {
    false
}
