//! The fuzz loop shared by the fuzz targets of mesh-proxy, mesh-injector and mesh-controller
//! (the other two include this file by path).
//!
//! proptest, not bolero: bolero 0.13's derive crate pins `indexmap` to one exact version
//! (=2.11.2), which would downgrade the indexmap that h2 and tower use in the shipped binaries
//! and refuse any later upgrade, for a test-only dependency. proptest's strategies build the
//! structured inputs (request heads, policies, pods), so `arbitrary` is not needed, and it
//! shrinks a failure to a small input.
//! It has no time budget of its own, so this loop draws cases until the budget is spent.
//!
//! - `MESH_FUZZ_SECONDS`: seconds per target (default 2; `just fuzz` sets 60).
//! - `MESH_FUZZ_SEED`: replays a run; a failure prints the seed it used.

use std::collections::hash_map::RandomState;
use std::fmt::Debug;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseResult, TestRunner};

/// Seconds per target in a normal test run: enough to find shallow bugs on every CI run while
/// keeping the whole fuzz set within seconds of wall time on two cores.
const DEFAULT_SECONDS: f64 = 2.0;

/// Shrinking a failure stops after this long, so a slow target still reports within the test
/// runner's timeout.
const MAX_SHRINK_MILLIS: u32 = 20_000;

/// Checks `property` on inputs drawn from `strategy` until the time budget is spent; on the
/// first failure panics with the smallest failing input proptest finds and the seed to replay.
pub fn fuzz<S>(strategy: S, property: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let budget =
        Duration::from_secs_f64(env_number("MESH_FUZZ_SECONDS").unwrap_or(DEFAULT_SECONDS));
    let seed = env_number("MESH_FUZZ_SEED").unwrap_or_else(|| RandomState::new().hash_one(0u8));
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_time: MAX_SHRINK_MILLIS,
        ..Config::default()
    });
    let started = Instant::now();
    let mut cases = 0u64;
    while started.elapsed() < budget {
        let input = strategy
            .new_tree(&mut runner)
            .unwrap_or_else(|reason| panic!("the strategy gave up: {reason}"));
        if let Err(failure) = runner.run_one(input, &property) {
            panic!("{failure}\nafter {cases} cases; replay with MESH_FUZZ_SEED={seed}");
        }
        cases += 1;
    }
    eprintln!(
        "{cases} cases in {:.1?} (MESH_FUZZ_SEED={seed})",
        started.elapsed()
    );
}

fn env_number<T: std::str::FromStr>(var: &str) -> Option<T> {
    let text = std::env::var(var).ok()?;
    match text.trim().parse() {
        Ok(number) => Some(number),
        Err(_) => panic!("{var}={text:?} is not a number"),
    }
}
