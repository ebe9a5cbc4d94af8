//! Weighted round robin as a precomputed order walked by one atomic cursor.
//!
//! The classic smooth weighted round robin (nginx) mutates every endpoint's counter on each
//! pick, which needs a lock. Instead the order is computed once per endpoint-set update and
//! `pick` only bumps an atomic index into it.
//!
//! The order spreads each endpoint's turns evenly over the cycle: the `j`-th turn (from 0) of
//! endpoint `i` of `n`, with weight `w`, sits at the fraction `(j + (i + 1/2) / n) / w` of the
//! cycle (stride scheduling). The offset `(i + 1/2) / n` staggers endpoints of equal weight so
//! they take turns instead of landing on the same spot, which would bunch the others' turns.
//! Equal weights give plain round robin, and a heavy endpoint's turns are interleaved with the
//! others' rather than sent in a burst.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

/// Longest cycle built when weights cannot be reduced exactly (their sum over their greatest
/// common divisor). Past it, weights are scaled down to sum to about this many turns, so the
/// share of an endpoint is off by at most half a turn in this many; the cycle is one `u32` per
/// turn, so it also bounds the memory per endpoint set (16 KiB).
const MAX_CYCLE: u64 = 4096;

/// The round-robin order of one endpoint set and where the next pick reads it.
pub(super) struct Schedule {
    /// Endpoint indices, one per turn.
    cycle: Box<[u32]>,
    next: AtomicUsize,
}

impl Schedule {
    /// A schedule that never picks, for algorithms other than round robin.
    pub(super) fn empty() -> Self {
        Self {
            cycle: Box::default(),
            next: AtomicUsize::new(0),
        }
    }

    /// The schedule for endpoints of these (non-zero) weights. It starts at a random turn so
    /// that proxies that learn the same endpoint set at the same moment do not all send their
    /// first request to the same endpoint.
    pub(super) fn new(weights: &[u32]) -> Self {
        let cycle = cycle(weights).into_boxed_slice();
        let start = if cycle.is_empty() {
            0
        } else {
            rand::rng().random_range(0..cycle.len())
        };
        Self {
            cycle,
            next: AtomicUsize::new(start),
        }
    }

    /// The index of the endpoint whose turn it is; `None` when there are no endpoints.
    pub(super) fn next(&self) -> Option<usize> {
        if self.cycle.is_empty() {
            return None;
        }
        // Wrapping at usize::MAX skips a few turns once in a very long while; harmless.
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.cycle.len();
        self.cycle.get(turn).map(|&index| index as usize)
    }
}

/// One cycle of turns: each endpoint index appears in proportion to its weight, spread evenly.
fn cycle(weights: &[u32]) -> Vec<u32> {
    let turns = turns_per_cycle(weights);
    let endpoints = weights.len() as u64;
    let mut slots: Vec<Slot> = Vec::with_capacity(turns.iter().map(|&t| t as usize).sum());
    for (endpoint, &count) in turns.iter().enumerate() {
        let endpoint = u32::try_from(endpoint).unwrap_or(u32::MAX);
        slots.extend((0..count).map(|turn| Slot {
            endpoint,
            turn,
            of: count,
            endpoints,
        }));
    }
    slots.sort_by(|a, b| {
        a.position()
            .cmp(&b.position())
            .then(a.endpoint.cmp(&b.endpoint))
    });
    slots.into_iter().map(|slot| slot.endpoint).collect()
}

/// The `turn`-th of the `of` turns of endpoint `endpoint` (of `endpoints`) in a cycle.
struct Slot {
    endpoint: u32,
    turn: u64,
    of: u64,
    endpoints: u64,
}

impl Slot {
    /// Where in the cycle this turn falls, `(turn + (endpoint + 1/2) / endpoints) / of`, as an
    /// exact fraction so that ties are real ties.
    fn position(&self) -> Fraction {
        Fraction {
            numerator: 2 * self.endpoints * self.turn + 2 * u64::from(self.endpoint) + 1,
            denominator: 2 * self.endpoints * self.of,
        }
    }
}

#[derive(Clone, Copy)]
struct Fraction {
    numerator: u64,
    denominator: u64,
}

impl PartialEq for Fraction {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Fraction {}

impl PartialOrd for Fraction {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Fraction {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // No overflow: numerators and denominators are below 2 * endpoints * (MAX_CYCLE +
        // endpoints), so each product is far below u128::MAX.
        let left = u128::from(self.numerator) * u128::from(other.denominator);
        let right = u128::from(other.numerator) * u128::from(self.denominator);
        left.cmp(&right)
    }
}

/// How many turns each endpoint gets per cycle: the weights divided by their greatest common
/// divisor, scaled down (keeping at least one turn each) when that is still over `MAX_CYCLE`.
fn turns_per_cycle(weights: &[u32]) -> Vec<u64> {
    let divisor = weights
        .iter()
        .fold(0, |acc, &w| gcd(acc, u64::from(w)))
        .max(1);
    let reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w) / divisor).collect();
    let total: u64 = reduced.iter().sum();
    if total <= MAX_CYCLE {
        return reduced;
    }
    reduced
        .iter()
        .map(|&w| {
            let scaled =
                (u128::from(w) * u128::from(MAX_CYCLE) + u128::from(total) / 2) / u128::from(total);
            u64::try_from(scaled).unwrap_or(MAX_CYCLE).max(1)
        })
        .collect()
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_spread_each_endpoint_evenly() {
        let cases: &[(&[u32], &[u32])] = &[
            (&[], &[]),
            (&[7], &[0]),
            (&[10_000, 10_000, 10_000], &[0, 1, 2]),
            (&[2, 1], &[0, 0, 1]),
            (&[3, 1], &[0, 0, 0, 1]),
            (&[20_000, 10_000, 10_000], &[0, 1, 0, 2]),
            // The light endpoints are staggered, so the heavy one never runs more than 3 in a
            // row, even across the end of the cycle.
            (&[5, 1, 1], &[0, 0, 0, 1, 0, 0, 2]),
            (&[1, 2, 3], &[0, 1, 2, 2, 1, 2]),
        ];
        for (weights, expected) in cases {
            assert_eq!(cycle(weights), *expected, "weights {weights:?}");
        }
    }

    #[test]
    fn turns_reduce_exactly_or_scale_to_the_cycle_limit() {
        let cases: &[(&[u32], &[u64])] = &[
            (&[10_000, 10_000], &[1, 1]),
            (&[30_000, 10_000], &[3, 1]),
            (&[0, 0], &[0, 0]),
            // gcd 1 and a sum of 10_001: scaled to 4096 turns, the small one keeps one.
            (&[10_000, 1], &[4096, 1]),
            (&[6_000, 3_001], &[2730, 1366]),
        ];
        for (weights, expected) in cases {
            assert_eq!(turns_per_cycle(weights), *expected, "weights {weights:?}");
        }
    }

    #[test]
    fn schedule_walks_the_cycle_from_a_random_start() {
        let schedule = Schedule::new(&[1, 1, 1]);
        let first: Vec<usize> = (0..3)
            .map(|_| schedule.next().expect("non-empty"))
            .collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2], "each endpoint once per cycle");
        let second: Vec<usize> = (0..3)
            .map(|_| schedule.next().expect("non-empty"))
            .collect();
        assert_eq!(first, second, "the cycle repeats");
        assert_eq!(Schedule::empty().next(), None);
    }
}
