//! Behaviour of the balancers measured over many picks. Latency-driven tests run on a manual
//! clock and report latencies with `complete_with`, so they never depend on timing.

use std::collections::HashMap;
use std::thread;

use super::*;

fn addr(host: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, host], 8080))
}

/// Endpoints 10.0.0.1, 10.0.0.2, ... of the given weights; the metadata is the host number.
fn weighted(weights: &[u32]) -> Vec<Endpoint<u8>> {
    (1..)
        .zip(weights)
        .map(|(host, &weight)| Endpoint {
            addr: addr(host),
            weight,
            meta: host,
        })
        .collect()
}

fn equal(count: usize) -> Vec<Endpoint<u8>> {
    weighted(&vec![DEFAULT_WEIGHT; count])
}

fn balancer(algorithm: Algorithm, endpoints: Vec<Endpoint<u8>>) -> Balancer<u8> {
    let balancer = Balancer::new(algorithm);
    balancer.update(endpoints);
    balancer
}

/// A balancer whose clock moves only when the test says so.
fn manual_balancer(algorithm: Algorithm) -> (Balancer<u8>, ManualClock) {
    let clock = ManualClock(Arc::new(Mutex::new(Instant::now())));
    let balancer = Balancer::with_clock(
        algorithm,
        Clock {
            manual: Some(Arc::clone(&clock.0)),
        },
    );
    (balancer, clock)
}

struct ManualClock(Arc<Mutex<Instant>>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().expect("clock lock") += by;
    }

    fn now(&self) -> Instant {
        *self.0.lock().expect("clock lock")
    }
}

fn pick(balancer: &Balancer<u8>, key: Option<u64>) -> Pick<u8> {
    balancer.pick(key).expect("endpoints to pick from")
}

/// How many of `count` picks, each dropped at once, went to each address.
fn tally(balancer: &Balancer<u8>, count: usize) -> HashMap<SocketAddr, usize> {
    let mut picks = HashMap::new();
    for _ in 0..count {
        *picks.entry(pick(balancer, None).addr()).or_default() += 1;
    }
    picks
}

fn stats_of(balancer: &Balancer<u8>, of: SocketAddr) -> EndpointStats {
    balancer
        .endpoint_stats()
        .into_iter()
        .find(|stats| stats.addr == of)
        .expect("endpoint in set")
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Open-loop traffic on a manual clock: one request per millisecond, each completing after
/// the latency its endpoint has at the time it is sent.
struct Traffic {
    balancer: Balancer<u8>,
    clock: ManualClock,
    /// Requests sent and not answered: when the answer arrives, its latency, and the pick.
    in_flight: Vec<(Instant, Duration, Pick<u8>)>,
}

impl Traffic {
    fn new(balancer: Balancer<u8>, clock: ManualClock) -> Self {
        Self {
            balancer,
            clock,
            in_flight: Vec::new(),
        }
    }

    /// Runs for `millis` milliseconds and returns the requests each address received.
    fn run(&mut self, millis: u64, latency_of: impl Fn(SocketAddr) -> Duration) -> Requests {
        let mut requests = Requests::default();
        for _ in 0..millis {
            self.clock.advance(ms(1));
            let now = self.clock.now();
            for (_, latency, pick) in self.in_flight.extract_if(.., |(done, _, _)| *done <= now) {
                pick.complete_with(latency);
            }
            let pick = pick(&self.balancer, None);
            let latency = latency_of(pick.addr());
            requests.record(pick.addr());
            self.in_flight.push((now + latency, latency, pick));
        }
        requests
    }
}

#[derive(Default)]
struct Requests {
    by_addr: HashMap<SocketAddr, usize>,
    total: usize,
}

impl Requests {
    fn record(&mut self, to: SocketAddr) {
        *self.by_addr.entry(to).or_default() += 1;
        self.total += 1;
    }

    fn share(&self, of: SocketAddr) -> f64 {
        self.by_addr.get(&of).copied().unwrap_or(0) as f64 / self.total as f64
    }
}

#[test]
fn an_empty_set_picks_nothing_under_every_algorithm() {
    let algorithms = [
        Algorithm::default(),
        Algorithm::RoundRobin,
        Algorithm::LeastRequest,
        Algorithm::ConsistentHash,
    ];
    for algorithm in algorithms {
        let balancer = balancer(algorithm.clone(), Vec::new());
        assert!(balancer.pick(None).is_none(), "{algorithm:?}");
        assert!(balancer.pick(Some(7)).is_none(), "{algorithm:?}");
        assert!(balancer.is_empty());
        // Emptied after having endpoints.
        balancer.update(equal(2));
        assert_eq!(balancer.len(), 2);
        balancer.update(Vec::new());
        assert!(balancer.pick(Some(7)).is_none(), "{algorithm:?}");
    }
}

#[test]
fn a_single_endpoint_takes_every_pick() {
    for algorithm in [
        Algorithm::default(),
        Algorithm::RoundRobin,
        Algorithm::ConsistentHash,
    ] {
        let balancer = balancer(algorithm, equal(1));
        assert!((0..100).all(|key| pick(&balancer, Some(key)).addr() == addr(1)));
    }
}

#[test]
fn round_robin_takes_equal_turns() {
    let balancer = balancer(Algorithm::RoundRobin, equal(3));
    let order: Vec<SocketAddr> = (0..3000).map(|_| pick(&balancer, None).addr()).collect();
    for window in order.chunks(3) {
        let mut turn = window.to_vec();
        turn.sort();
        assert_eq!(
            turn,
            [addr(1), addr(2), addr(3)],
            "each endpoint once every three picks"
        );
    }
}

#[test]
fn round_robin_honours_weights_and_spreads_turns() {
    let balancer = balancer(Algorithm::RoundRobin, weighted(&[10_000, 20_000, 30_000]));
    let order: Vec<SocketAddr> = (0..6000).map(|_| pick(&balancer, None).addr()).collect();
    let count = |of| order.iter().filter(|&&picked| picked == of).count();
    assert_eq!(
        (count(addr(1)), count(addr(2)), count(addr(3))),
        (1000, 2000, 3000)
    );
    let longest_run = order
        .chunk_by(|a, b| a == b)
        .map(|run| run.len())
        .max()
        .expect("picks were made");
    assert!(longest_run <= 2, "turns bunched: {longest_run} in a row");
}

#[test]
fn weight_zero_means_the_default_weight() {
    let balancer = balancer(Algorithm::RoundRobin, weighted(&[0, DEFAULT_WEIGHT]));
    let picks = tally(&balancer, 1000);
    assert_eq!(picks[&addr(1)], 500);
    assert_eq!(stats_of(&balancer, addr(1)).weight, DEFAULT_WEIGHT);
}

#[test]
fn least_request_avoids_the_busy_endpoint() {
    let balancer = balancer(Algorithm::LeastRequest, equal(1));
    let busy: Vec<Pick<u8>> = (0..5).map(|_| pick(&balancer, None)).collect();
    balancer.update(equal(3));
    // Every pair P2C draws either has two idle endpoints or one idle against the busy one.
    let picks = tally(&balancer, 1000);
    assert_eq!(picks.get(&addr(1)), None, "{picks:?}");
    drop(busy);
    assert!(tally(&balancer, 1000).contains_key(&addr(1)));
}

#[test]
fn least_request_balances_requests_held_in_flight() {
    let balancer = balancer(Algorithm::LeastRequest, equal(3));
    let held: Vec<Pick<u8>> = (0..300).map(|_| pick(&balancer, None)).collect();
    for host in 1..=3 {
        let in_flight = held.iter().filter(|pick| pick.addr() == addr(host)).count();
        assert!(
            (95..=105).contains(&in_flight),
            "10.0.0.{host} has {in_flight} of 300"
        );
    }
}

#[test]
fn least_request_gives_heavier_endpoints_more_requests_in_flight() {
    let balancer = balancer(Algorithm::LeastRequest, weighted(&[30_000, 10_000]));
    let held: Vec<Pick<u8>> = (0..400).map(|_| pick(&balancer, None)).collect();
    let heavy = held.iter().filter(|pick| pick.addr() == addr(1)).count();
    assert!(
        (295..=305).contains(&heavy),
        "weight 3 of 4 holds {heavy} of 400"
    );
}

#[test]
fn peak_ewma_sends_most_traffic_to_the_faster_endpoint() {
    let (balancer, clock) = manual_balancer(Algorithm::default());
    balancer.update(equal(2));
    let mut traffic = Traffic::new(balancer, clock);
    let requests = traffic.run(20_000, |to| if to == addr(1) { ms(10) } else { ms(100) });
    let fast_share = requests.share(addr(1));
    assert!(
        fast_share > 0.95,
        "the 10x faster endpoint got {fast_share:.3}"
    );
}

#[test]
fn peak_ewma_recovers_when_the_slow_endpoint_speeds_up() {
    let (balancer, clock) = manual_balancer(Algorithm::PeakEwma {
        decay: DEFAULT_DECAY,
    });
    balancer.update(equal(2));
    let mut traffic = Traffic::new(balancer, clock);
    let slow = traffic.run(20_000, |to| if to == addr(1) { ms(10) } else { ms(100) });
    assert!(
        slow.share(addr(2)) < 0.05,
        "slow endpoint got {:.3}",
        slow.share(addr(2))
    );
    // Now both take 10 ms. The old peak decays with the 10 s time constant: from 100 ms to
    // the 10 ms of the other endpoint in about 23 s.
    let both_fast = |_| ms(10);
    let early = traffic.run(5_000, both_fast);
    let settled = {
        traffic.run(40_000, both_fast);
        traffic.run(10_000, both_fast)
    };
    let recovered = settled.share(addr(2));
    assert!(
        early.share(addr(2)) < recovered,
        "recovery is gradual, not instant"
    );
    assert!(
        (0.4..=0.6).contains(&recovered),
        "recovered endpoint got {recovered:.3}"
    );
}

#[test]
fn peak_ewma_spreads_load_over_equal_endpoints() {
    let (balancer, clock) = manual_balancer(Algorithm::default());
    balancer.update(equal(4));
    let mut traffic = Traffic::new(balancer, clock);
    let requests = traffic.run(20_000, |_| ms(10));
    for host in 1..=4 {
        let share = requests.share(addr(host));
        assert!((0.2..=0.3).contains(&share), "10.0.0.{host} got {share:.3}");
    }
}

#[test]
fn peak_ewma_probes_a_new_endpoint_once_then_waits_for_its_answer() {
    let (balancer, _clock) = manual_balancer(Algorithm::default());
    balancer.update(equal(1));
    pick(&balancer, None).complete_with(ms(5));
    balancer.update(equal(2));

    // Unmeasured and idle costs nothing: the new endpoint gets the next request...
    let probe = pick(&balancer, None);
    assert_eq!(probe.addr(), addr(2));
    // ...and nothing more while that probe is out, costed at the default latency.
    assert_eq!(tally(&balancer, 100).get(&addr(2)), None);
    // A fast answer makes it the preferred endpoint.
    probe.complete_with(ms(1));
    assert_eq!(tally(&balancer, 100).get(&addr(2)), Some(&100));
}

#[test]
fn peak_ewma_divides_cost_by_weight() {
    let (balancer, _clock) = manual_balancer(Algorithm::default());
    balancer.update(weighted(&[30_000, 10_000]));
    for _ in 0..4 {
        pick(&balancer, None).complete_with(ms(10));
    }
    let held: Vec<Pick<u8>> = (0..400).map(|_| pick(&balancer, None)).collect();
    let heavy = held.iter().filter(|pick| pick.addr() == addr(1)).count();
    assert!(
        (295..=305).contains(&heavy),
        "weight 3 of 4 holds {heavy} of 400"
    );
}

/// Where each of keys `0..keys` goes.
fn key_map(balancer: &Balancer<u8>, keys: u64) -> Vec<SocketAddr> {
    (0..keys)
        .map(|key| pick(balancer, Some(key)).addr())
        .collect()
}

#[test]
fn consistent_hash_keeps_each_key_on_one_endpoint() {
    let balancer = balancer(Algorithm::ConsistentHash, equal(5));
    let first = key_map(&balancer, 2000);
    assert_eq!(key_map(&balancer, 2000), first);
    // Load on the endpoints must not change where keys go.
    let _held: Vec<Pick<u8>> = (0..50).map(|key| pick(&balancer, Some(key))).collect();
    assert_eq!(key_map(&balancer, 2000), first);
    for host in 1..=5 {
        let keys = first.iter().filter(|&&to| to == addr(host)).count();
        assert!(
            (320..=480).contains(&keys),
            "10.0.0.{host} has {keys} of 2000 keys"
        );
    }
}

#[test]
fn consistent_hash_does_not_depend_on_endpoint_order() {
    let balancer = balancer(Algorithm::ConsistentHash, equal(5));
    let forward = key_map(&balancer, 1000);
    let mut reversed = equal(5);
    reversed.reverse();
    balancer.update(reversed);
    assert_eq!(key_map(&balancer, 1000), forward);
}

#[test]
fn consistent_hash_moves_only_the_keys_of_an_added_or_removed_endpoint() {
    const KEYS: u64 = 10_000;
    let balancer = balancer(Algorithm::ConsistentHash, equal(10));
    let before = key_map(&balancer, KEYS);

    balancer.update(equal(11));
    let added = key_map(&balancer, KEYS);
    let moved: Vec<(SocketAddr, SocketAddr)> = before
        .iter()
        .zip(&added)
        .filter(|(a, b)| a != b)
        .map(|(&a, &b)| (a, b))
        .collect();
    assert!(
        moved.iter().all(|&(_, to)| to == addr(11)),
        "keys moved only to the new endpoint"
    );
    let moved_share = moved.len() as f64 / KEYS as f64;
    assert!(
        (0.075..=0.11).contains(&moved_share),
        "moved {moved_share:.3}, ideal 1/11"
    );

    let mut without_third = equal(10);
    without_third.remove(2);
    balancer.update(without_third);
    let removed = key_map(&balancer, KEYS);
    for (key, (&was, &is)) in before.iter().zip(&removed).enumerate() {
        assert_eq!(
            was == addr(3),
            was != is,
            "key {key} moved from {was} to {is}"
        );
    }
    let moved_share = before.iter().filter(|&&was| was == addr(3)).count() as f64 / KEYS as f64;
    assert!(
        (0.08..=0.12).contains(&moved_share),
        "moved {moved_share:.3}, ideal 1/10"
    );
}

#[test]
fn consistent_hash_honours_weights() {
    let balancer = balancer(Algorithm::ConsistentHash, weighted(&[10_000, 30_000]));
    let keys = key_map(&balancer, 10_000);
    let heavy = keys.iter().filter(|&&to| to == addr(2)).count() as f64 / 10_000.0;
    assert!(
        (0.72..=0.78).contains(&heavy),
        "weight 3 of 4 has {heavy:.3} of the keys"
    );
}

#[test]
fn consistent_hash_without_a_key_balances_by_latency() {
    let (balancer, _clock) = manual_balancer(Algorithm::ConsistentHash);
    balancer.update(equal(2));
    // Unmeasured idle endpoints cost nothing, so these two picks measure one endpoint each.
    let slow = pick(&balancer, None);
    let fast = pick(&balancer, None);
    let fast_addr = fast.addr();
    assert_ne!(slow.addr(), fast_addr);
    slow.complete_with(ms(100));
    fast.complete_with(ms(1));
    assert_eq!(tally(&balancer, 100).get(&fast_addr), Some(&100));
}

#[test]
fn update_keeps_the_load_state_of_endpoints_that_stay() {
    let (balancer, _clock) = manual_balancer(Algorithm::default());
    balancer.update(equal(1));
    let held = pick(&balancer, None);
    pick(&balancer, None).complete_with(ms(20));

    balancer.update(vec![
        Endpoint {
            addr: addr(1),
            weight: 5,
            meta: 100,
        },
        Endpoint::new(addr(2), 2),
    ]);
    let kept = stats_of(&balancer, addr(1));
    assert_eq!(kept.in_flight, 1);
    assert_eq!(kept.rtt_estimate, Some(ms(20)));
    assert_eq!(kept.weight, 5, "takes the new weight");
    let new = stats_of(&balancer, addr(2));
    assert_eq!((new.in_flight, new.rtt_estimate), (0, None));

    let metas: HashSet<u8> = (0..100).map(|_| *pick(&balancer, None).meta()).collect();
    assert!(
        metas.is_subset(&HashSet::from([100, 2])),
        "picks carry the new metadata"
    );

    drop(held);
    assert_eq!(
        stats_of(&balancer, addr(1)).in_flight,
        0,
        "an old pick ends on the same state"
    );
}

#[test]
fn an_endpoint_that_leaves_and_returns_starts_afresh() {
    let (balancer, _clock) = manual_balancer(Algorithm::default());
    balancer.update(equal(1));
    let outlived = pick(&balancer, None);
    pick(&balancer, None).complete_with(ms(20));
    balancer.update(Vec::new());
    // A pick that outlives its endpoint can still complete and drop.
    outlived.complete_with(ms(30));
    balancer.update(equal(1));
    assert_eq!(
        stats_of(&balancer, addr(1)),
        EndpointStats {
            addr: addr(1),
            weight: DEFAULT_WEIGHT,
            in_flight: 0,
            rtt_estimate: None
        }
    );
}

#[test]
fn duplicate_addresses_keep_the_first() {
    let balancer = balancer(Algorithm::RoundRobin, weighted(&[1, 1]));
    balancer.update(vec![Endpoint::new(addr(1), 1), Endpoint::new(addr(1), 2)]);
    assert_eq!(balancer.addrs(), [addr(1)]);
    assert_eq!(*pick(&balancer, None).meta(), 1);
}

#[test]
fn a_pick_is_in_flight_until_dropped_or_completed() {
    let balancer = balancer(Algorithm::default(), equal(1));
    let in_flight = || stats_of(&balancer, addr(1)).in_flight;

    let first = pick(&balancer, None);
    let second = pick(&balancer, None);
    let third = pick(&balancer, None);
    assert_eq!(in_flight(), 3);
    drop(first);
    assert_eq!(in_flight(), 2);
    second.complete();
    assert_eq!(in_flight(), 1);
    third.complete_with(ms(3));
    assert_eq!(in_flight(), 0);
    assert!(stats_of(&balancer, addr(1)).rtt_estimate.is_some());
}

#[test]
fn set_algorithm_switches_live_and_keeps_load_state() {
    let balancer = balancer(Algorithm::RoundRobin, equal(2));
    let alternating: Vec<SocketAddr> = (0..4).map(|_| pick(&balancer, None).addr()).collect();
    assert_ne!(alternating[0], alternating[1]);
    assert_eq!(alternating[0], alternating[2]);

    // Load endpoint 1 under round robin; least-request must see it.
    let mut held = Vec::new();
    while held.len() < 3 {
        let pick = pick(&balancer, None);
        if pick.addr() == addr(1) {
            held.push(pick);
        }
    }
    balancer.set_algorithm(Algorithm::LeastRequest);
    assert_eq!(balancer.algorithm(), Algorithm::LeastRequest);
    assert_eq!(stats_of(&balancer, addr(1)).in_flight, 3);
    assert_eq!(tally(&balancer, 100).get(&addr(2)), Some(&100));

    balancer.set_algorithm(Algorithm::ConsistentHash);
    let keys = key_map(&balancer, 100);
    assert_eq!(key_map(&balancer, 100), keys);
    assert!(keys.contains(&addr(1)), "hashing ignores load");

    balancer.set_algorithm(Algorithm::RoundRobin);
    assert_eq!(tally(&balancer, 100).get(&addr(1)), Some(&50));
    drop(held);
    assert_eq!(stats_of(&balancer, addr(1)).in_flight, 0);
}

#[test]
fn set_algorithm_sets_the_latency_decay() {
    let (balancer, clock) = manual_balancer(Algorithm::PeakEwma { decay: ms(100) });
    balancer.update(equal(1));
    pick(&balancer, None).complete_with(ms(50));
    clock.advance(ms(100));
    let after_one_decay = stats_of(&balancer, addr(1)).rtt_estimate.expect("measured");
    assert_eq!(after_one_decay.as_micros(), 18_393, "50 ms x e^-1");

    // Round robin keeps the decay, so estimates stay meaningful for a switch back.
    balancer.set_algorithm(Algorithm::RoundRobin);
    assert_eq!(
        stats_of(&balancer, addr(1)).rtt_estimate,
        Some(after_one_decay)
    );

    // Zero means the default: 10 s decays far slower than 100 ms did.
    balancer.set_algorithm(Algorithm::PeakEwma {
        decay: Duration::ZERO,
    });
    clock.advance(ms(100));
    let after_default = stats_of(&balancer, addr(1)).rtt_estimate.expect("measured");
    assert!(after_default > ms(49), "{after_default:?}");
}

#[test]
fn concurrent_picks_return_every_in_flight_count_to_zero() {
    let balancer = balancer(Algorithm::default(), equal(4));
    thread::scope(|scope| {
        for worker in 0..4u64 {
            let balancer = balancer.clone();
            scope.spawn(move || {
                let mut held = Vec::new();
                for request in 0..20_000u64 {
                    let pick = pick(&balancer, Some(request));
                    // Hold a few at a time; complete some, drop others.
                    held.push(pick);
                    if held.len() > 8 {
                        let oldest = held.remove(0);
                        if request % 2 == 0 {
                            oldest.complete_with(ms(worker + 1));
                        }
                    }
                }
            });
        }
        let updater = balancer.clone();
        scope.spawn(move || {
            let algorithms = [
                Algorithm::RoundRobin,
                Algorithm::LeastRequest,
                Algorithm::ConsistentHash,
                Algorithm::default(),
            ];
            for round in 0..200 {
                updater.set_algorithm(algorithms[round % algorithms.len()].clone());
                updater.update(equal(if round % 2 == 0 { 3 } else { 4 }));
            }
        });
    });
    balancer.update(equal(4));
    for stats in balancer.endpoint_stats() {
        assert_eq!(stats.in_flight, 0, "{stats:?}");
    }
}

#[test]
fn every_algorithm_avoids_the_endpoints_a_request_already_tried() {
    let algorithms = [
        Algorithm::default(),
        Algorithm::RoundRobin,
        Algorithm::LeastRequest,
        Algorithm::ConsistentHash,
    ];
    for algorithm in algorithms {
        let balancer = balancer(algorithm.clone(), weighted(&[1, 100, 1]));
        for key in 0..200u64 {
            let avoid = [addr(2)];
            let picked = balancer
                .pick_avoiding(Some(key), &avoid)
                .expect("endpoints to pick from");
            assert_ne!(picked.addr(), addr(2), "{algorithm:?} key {key}");
            // Avoiding all but one leaves that one.
            let picked = balancer
                .pick_avoiding(Some(key), &[addr(1), addr(2)])
                .expect("endpoints to pick from");
            assert_eq!(picked.addr(), addr(3), "{algorithm:?}");
            // Avoiding every endpoint picks as usual rather than failing.
            assert!(
                balancer
                    .pick_avoiding(Some(key), &[addr(1), addr(2), addr(3)])
                    .is_some()
            );
        }
    }
}

#[test]
fn a_forgotten_endpoint_is_picked_next_as_a_probe() {
    let (balancer, clock) = manual_balancer(Algorithm::default());
    balancer.update(equal(2));
    // 10.0.0.1 measured slow, 10.0.0.2 fast: P2C over two always takes the fast one.
    let mut slow = None;
    let mut fast = None;
    while slow.is_none() || fast.is_none() {
        let picked = pick(&balancer, None);
        let slot = if picked.addr() == addr(1) {
            &mut slow
        } else {
            &mut fast
        };
        if slot.is_none() {
            *slot = Some(picked);
        }
    }
    slow.expect("picked").complete_with(Duration::from_secs(3));
    fast.expect("picked").complete_with(ms(1));
    clock.advance(Duration::from_millis(1));
    for _ in 0..20 {
        assert_eq!(pick(&balancer, None).addr(), addr(2));
    }
    balancer.forget_latency(addr(1));
    assert_eq!(pick(&balancer, None).addr(), addr(1), "probed at once");
}

#[test]
fn one_request_at_a_time_to_identical_endpoints_starves_neither_after_a_spike() {
    let (balancer, clock) = manual_balancer(Algorithm::default());
    balancer.update(equal(2));
    // One slow answer from 10.0.0.1 (a pause), then both answer in 1 ms.
    loop {
        let picked = pick(&balancer, None);
        if picked.addr() == addr(1) {
            picked.complete_with(ms(50));
            break;
        }
        picked.complete_with(ms(1));
    }
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    for _ in 0..2000 {
        clock.advance(ms(1));
        let picked = pick(&balancer, None);
        *seen.entry(picked.addr()).or_default() += 1;
        picked.complete_with(ms(1));
    }
    // Two seconds of sequential requests: the spiked endpoint is probed within half a second
    // and shares the traffic again, rather than waiting out its peak's ~40 s of decay.
    for host in [1, 2] {
        let share = seen.get(&addr(host)).copied().unwrap_or(0);
        assert!(share >= 400, "10.0.0.{host} got {share} of 2000: {seen:?}");
    }
}
