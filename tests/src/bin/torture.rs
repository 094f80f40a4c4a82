//! The torture driver (see `thinpool_tests::torture`): kills thinpoold at every failpoint of
//! the catalogue under load (`--mode failpoints`), or with kill -9 at random moments under a
//! 32-client load (`--mode load-kill`), restarts it and checks that nothing was lost.
//!
//! ```text
//! torture --thinpoold PATH [--thinctl PATH] --backend dm|reflink|sim --work DIR
//!         [--mode failpoints|load-kill] [--seeds N] [--rounds N] [--clients N]
//!         [--points a,b] [--short] [--reach-secs N] [--kill-after-ms LO,HI]
//! ```
//!
//! Prints one line per case (`ok ...` / `FAILED ...: why`), then the elapsed time and
//! `N passed, M failed`; exits 1 if any case failed. thinpoold must be built with the
//! `thinpool/failpoints` feature for `--mode failpoints`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use thinpool_tests::torture::driver::{Config, Mode, run};

fn main() {
    match real_main() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("torture: {e:#}");
            println!("0 passed, 1 failed");
            std::process::exit(2);
        }
    }
}

fn real_main() -> Result<bool> {
    let mut args = std::env::args().skip(1);
    let mut thinpoold = None;
    let mut thinctl = None;
    let mut backend = None;
    let mut work = None;
    let mut mode = Mode::Failpoints;
    let mut seeds = None;
    let mut rounds = 10;
    let mut clients = None;
    let mut points = Vec::new();
    let mut short = false;
    let mut reach = None;
    let mut kill_after = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--thinpoold" => thinpoold = Some(PathBuf::from(val()?)),
            "--thinctl" => thinctl = Some(PathBuf::from(val()?)),
            "--backend" => backend = Some(val()?.parse::<thinpool::BackendKind>()?),
            "--work" => work = Some(PathBuf::from(val()?)),
            "--mode" => {
                mode = match val()?.as_str() {
                    "failpoints" => Mode::Failpoints,
                    "load-kill" => Mode::LoadKill,
                    m => bail!("--mode {m:?}: expected failpoints or load-kill"),
                }
            }
            "--seeds" => seeds = Some(val()?.parse::<u64>().context("--seeds")?),
            "--rounds" => rounds = val()?.parse::<u64>().context("--rounds")?,
            "--clients" => clients = Some(val()?.parse::<usize>().context("--clients")?),
            "--points" => {
                points = val()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "--reach-secs" => reach = Some(val()?.parse::<u64>().context("--reach-secs")?),
            "--kill-after-ms" => {
                let v = val()?;
                let (lo, hi) = v
                    .split_once(',')
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                    .filter(|(a, b)| a <= b)
                    .with_context(|| format!("--kill-after-ms {v:?}: expected LO,HI"))?;
                kill_after = Some((lo, hi));
            }
            "--short" => short = true,
            a => bail!("unknown argument {a:?}"),
        }
    }
    let backend = backend.context("--backend is required")?;
    let cfg = Config {
        thinpoold: thinpoold.context("--thinpoold is required")?,
        thinctl,
        backend,
        work: work.context("--work is required")?,
        mode,
        seeds: seeds.unwrap_or(if short { 1 } else { 2 }),
        rounds,
        clients: clients.unwrap_or(match mode {
            Mode::Failpoints => 4,
            Mode::LoadKill => 32,
        }),
        short,
        points,
        reach_within: Duration::from_secs(reach.unwrap_or(60)),
        kill_after_ms: kill_after.unwrap_or(if short { (500, 2500) } else { (500, 4500) }),
    };
    let t = Instant::now();
    let what = match mode {
        Mode::Failpoints => "failpoints",
        Mode::LoadKill => "load-kill",
    };
    let s = run(&cfg)?;
    println!(
        "torture {what} on {backend}: {} cases in {:.0} s",
        s.passed + s.failed,
        t.elapsed().as_secs_f64()
    );
    println!("{} passed, {} failed", s.passed, s.failed);
    Ok(s.failed == 0)
}
