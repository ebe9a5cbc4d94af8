//! Load balancing: which endpoint of a service gets each HTTP request or TCP connection.
//!
//! This module owns a service's live endpoint set as the balancer sees it, the load state of
//! each endpoint (requests in flight and a peak-EWMA latency estimate) and the algorithms that
//! pick over them. The outbound HTTP and TCP paths hold one [`Balancer`] per service:
//! discovery calls [`Balancer::update`], the outbound policy calls
//! [`Balancer::set_algorithm`], and every request calls [`Balancer::pick`]; the returned
//! [`Pick`] counts as in flight until dropped and feeds the latency estimate when completed.
//!
//! The algorithms, chosen by the controller's policy:
//! - [`Algorithm::PeakEwma`] (default): power of two random choices (P2C) over latency x
//!   (in flight + 1) / weight. Two random candidates avoid the herd behaviour of always taking
//!   the global minimum, which every proxy would chase at once. The estimate is
//!   defined in `peak_ewma.rs`.
//! - [`Algorithm::RoundRobin`]: weighted round robin from a precomputed, evenly spread order.
//! - [`Algorithm::LeastRequest`]: P2C over (in flight + 1) / weight.
//! - [`Algorithm::ConsistentHash`]: weighted rendezvous hashing of a caller-provided key.
//!
//! `pick` runs on every request, so it takes no lock shared between requests: the endpoint set
//! is an immutable snapshot swapped atomically (`arc-swap`) by updates, in-flight counts are
//! atomics, and each endpoint's latency estimate sits behind its own mutex, held for a few
//! arithmetic operations. A pick allocates nothing beyond cloning the caller's metadata. Load
//! state is keyed by address and carried across updates, so a discovery update does not make
//! every endpoint look new; an endpoint that leaves the set and comes back starts afresh.

mod consistent_hash;
mod peak_ewma;
mod round_robin;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;

pub use self::peak_ewma::DEFAULT_RTT;
use self::peak_ewma::{RttEstimate, least_request_cost, peak_ewma_cost};
use self::round_robin::Schedule;

/// The weight of an endpoint given weight 0, as in the destination API where 0 means unset.
pub const DEFAULT_WEIGHT: u32 = 10_000;

/// The peak-EWMA time constant when none is given (or zero is given, meaning unset).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// The shortest accepted peak-EWMA time constant; shorter ones are raised to it, since an
/// estimate that forgets within a request's lifetime no longer measures anything.
pub const MIN_DECAY: Duration = Duration::from_millis(1);

/// Which algorithm picks the endpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum Algorithm {
    /// Power of two random choices over peak-EWMA latency x (in flight + 1) / weight. The
    /// default. `decay` is the time constant over which the latency estimate forgets a peak;
    /// zero means [`DEFAULT_DECAY`], and anything under [`MIN_DECAY`] is raised to it.
    PeakEwma { decay: Duration },
    /// Weighted round robin, each endpoint's turns spread evenly over the cycle.
    RoundRobin,
    /// Power of two random choices over requests in flight / weight.
    LeastRequest,
    /// The caller's hash key picks the endpoint: stable while the set is stable, and a change
    /// to the set moves only the keys of the endpoints added or removed. Without a key, picks
    /// as [`Algorithm::PeakEwma`].
    ConsistentHash,
}

impl Default for Algorithm {
    fn default() -> Self {
        Self::PeakEwma {
            decay: DEFAULT_DECAY,
        }
    }
}

/// One endpoint given to the balancer. `T` is the caller's per-endpoint metadata (TLS
/// identity, labels, ...), cloned into every pick: make it cheap to clone (an `Arc`) if it is
/// large.
#[derive(Clone, Debug)]
pub struct Endpoint<T> {
    pub addr: SocketAddr,
    /// Relative share of traffic; 0 means [`DEFAULT_WEIGHT`] (the destination API's unset).
    pub weight: u32,
    pub meta: T,
}

impl<T> Endpoint<T> {
    /// An endpoint of the default weight.
    pub fn new(addr: SocketAddr, meta: T) -> Self {
        Self {
            addr,
            weight: DEFAULT_WEIGHT,
            meta,
        }
    }
}

/// The load state of one endpoint, as a snapshot for the admin config dump and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointStats {
    pub addr: SocketAddr,
    /// The weight in effect (0 already replaced by the default).
    pub weight: u32,
    /// Picks of this endpoint not yet dropped.
    pub in_flight: usize,
    /// The current latency estimate; `None` until a pick of it completes.
    pub rtt_estimate: Option<Duration>,
}

/// A shared, cheaply clonable balancer over a live endpoint set.
#[derive(Clone)]
pub struct Balancer<T> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    snapshot: ArcSwap<Snapshot<T>>,
    /// Serialises `update` and `set_algorithm`, each of which builds the next snapshot from the
    /// current one; `pick` never takes it.
    writer: Mutex<()>,
    clock: Clock,
}

/// An immutable view of the endpoint set and the algorithm, replaced whole by updates.
struct Snapshot<T> {
    algorithm: Algorithm,
    /// The latency estimates' time constant: the peak-EWMA decay, kept from the last peak-EWMA
    /// policy while another algorithm is in use, so estimates stay warm for a switch back.
    decay: Duration,
    /// Shared with the next snapshot when only the algorithm changes.
    endpoints: Arc<[Member<T>]>,
    /// The round-robin order; empty unless the algorithm is round robin.
    schedule: Schedule,
    /// Consistent hashing skips the weighted scoring when every weight is the same.
    equal_weights: bool,
}

/// One endpoint of a snapshot.
struct Member<T> {
    addr: SocketAddr,
    /// Never 0: the default replaces it.
    weight: u32,
    meta: T,
    /// The consistent-hash identity of `addr`, computed once per update rather than per pick.
    addr_hash: u64,
    /// Shared by every snapshot that has this address, and by the picks of it.
    load: Arc<Load>,
}

#[derive(Default)]
struct Load {
    in_flight: AtomicUsize,
    rtt: Mutex<RttEstimate>,
}

impl Load {
    fn rtt(&self) -> MutexGuard<'_, RttEstimate> {
        // The estimate is two plain numbers, valid whatever a panicking holder was doing.
        self.rtt.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

impl<T: Clone + Send + Sync + 'static> Balancer<T> {
    /// A balancer with no endpoints yet.
    pub fn new(algorithm: Algorithm) -> Self {
        Self::with_clock(algorithm, Clock::default())
    }

    fn with_clock(algorithm: Algorithm, clock: Clock) -> Self {
        let decay = decay_of(&algorithm).unwrap_or(DEFAULT_DECAY);
        let snapshot = Snapshot::new(algorithm, decay, Arc::from(Vec::new()));
        Self {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(snapshot),
                writer: Mutex::new(()),
                clock,
            }),
        }
    }

    /// Replaces the whole endpoint set. Endpoints whose address stays keep their load state
    /// (latency estimate, requests in flight) and take the new weight and metadata. Of
    /// endpoints listed twice with the same address, the first is kept.
    pub fn update(&self, endpoints: Vec<Endpoint<T>>) {
        let _writer = self.lock_writer();
        let current = self.shared.snapshot.load();
        let loads: HashMap<SocketAddr, &Arc<Load>> = current
            .endpoints
            .iter()
            .map(|member| (member.addr, &member.load))
            .collect();
        let mut seen = HashSet::with_capacity(endpoints.len());
        let members: Vec<Member<T>> = endpoints
            .into_iter()
            .filter(|endpoint| seen.insert(endpoint.addr))
            .map(|endpoint| Member {
                addr: endpoint.addr,
                weight: effective_weight(endpoint.weight),
                meta: endpoint.meta,
                addr_hash: consistent_hash::addr_hash(&endpoint.addr),
                load: loads
                    .get(&endpoint.addr)
                    .map(|&load| Arc::clone(load))
                    .unwrap_or_default(),
            })
            .collect();
        let next = Snapshot::new(current.algorithm.clone(), current.decay, Arc::from(members));
        self.shared.snapshot.store(Arc::new(next));
    }

    /// Changes the algorithm live (policy updates), keeping every endpoint's load state.
    pub fn set_algorithm(&self, algorithm: Algorithm) {
        let _writer = self.lock_writer();
        let current = self.shared.snapshot.load();
        if current.algorithm == algorithm {
            // Policy streams resend unchanged policies; keep the round-robin position.
            return;
        }
        let decay = decay_of(&algorithm).unwrap_or(current.decay);
        let next = Snapshot::new(algorithm, decay, Arc::clone(&current.endpoints));
        self.shared.snapshot.store(Arc::new(next));
    }

    /// Picks an endpoint; `None` when the set is empty. `hash_key` is used by
    /// [`Algorithm::ConsistentHash`] only: the caller hashes the header, cookie or client IP
    /// the policy names; without one, consistent hashing picks as peak-EWMA.
    pub fn pick(&self, hash_key: Option<u64>) -> Option<Pick<T>> {
        self.pick_avoiding(hash_key, &[])
    }

    /// Like [`Balancer::pick`], but never one of `avoid` while another endpoint is left: a
    /// retry goes elsewhere than its earlier attempts (Envoy's previous-hosts predicate). When
    /// every endpoint is in `avoid`, picks as [`Balancer::pick`] does.
    pub fn pick_avoiding(&self, hash_key: Option<u64>, avoid: &[SocketAddr]) -> Option<Pick<T>> {
        let snapshot = self.shared.snapshot.load();
        let now = self.shared.clock.now();
        let index = if avoid.is_empty() {
            snapshot.choose(hash_key, now)?
        } else {
            let allowed: Vec<usize> = (0..snapshot.endpoints.len())
                .filter(|&i| !avoid.contains(&snapshot.endpoints[i].addr))
                .collect();
            if allowed.is_empty() {
                snapshot.choose(hash_key, now)?
            } else {
                snapshot.choose_among(&allowed, hash_key, now)?
            }
        };
        let member = snapshot.endpoints.get(index)?;
        member.load.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            addr: member.addr,
            meta: member.meta.clone(),
            load: Arc::clone(&member.load),
            picked_at: now,
            decay: snapshot.decay,
            clock: self.shared.clock.clone(),
        })
    }

    /// Forgets `addr`'s latency estimate, so it is costed as an endpoint never measured: an
    /// idle one is picked at once (an endpoint back from ejection, probed).
    pub fn forget_latency(&self, addr: SocketAddr) {
        let snapshot = self.shared.snapshot.load();
        if let Some(member) = snapshot.endpoints.iter().find(|member| member.addr == addr) {
            *member.load.rtt() = RttEstimate::default();
        }
    }

    fn lock_writer(&self) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic while holding it leaves nothing inconsistent.
        self.shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn len(&self) -> usize {
        self.shared.snapshot.load().endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The endpoint addresses, in the order last given to [`Balancer::update`].
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.shared
            .snapshot
            .load()
            .endpoints
            .iter()
            .map(|member| member.addr)
            .collect()
    }

    /// The algorithm in use.
    pub fn algorithm(&self) -> Algorithm {
        self.shared.snapshot.load().algorithm.clone()
    }

    /// Every endpoint's load state, for the admin config dump.
    pub fn endpoint_stats(&self) -> Vec<EndpointStats> {
        let snapshot = self.shared.snapshot.load();
        let now = self.shared.clock.now();
        snapshot
            .endpoints
            .iter()
            .map(|member| EndpointStats {
                addr: member.addr,
                weight: member.weight,
                in_flight: member.load.in_flight(),
                rtt_estimate: member
                    .load
                    .rtt()
                    .nanos_at(now, snapshot.decay)
                    .map(|nanos| Duration::from_nanos(nanos as u64)),
            })
            .collect()
    }
}

impl<T> fmt::Debug for Balancer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.shared.snapshot.load();
        let addrs: Vec<SocketAddr> = snapshot
            .endpoints
            .iter()
            .map(|member| member.addr)
            .collect();
        f.debug_struct("Balancer")
            .field("algorithm", &snapshot.algorithm)
            .field("endpoints", &addrs)
            .finish()
    }
}

impl<T> Snapshot<T> {
    fn new(algorithm: Algorithm, decay: Duration, endpoints: Arc<[Member<T>]>) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|member| member.weight).collect();
        let schedule = match algorithm {
            Algorithm::RoundRobin => Schedule::new(&weights),
            _ => Schedule::empty(),
        };
        let equal_weights = weights.windows(2).all(|pair| pair[0] == pair[1]);
        Self {
            algorithm,
            decay,
            endpoints,
            schedule,
            equal_weights,
        }
    }

    /// The index of the endpoint to pick; `None` when there are none.
    fn choose(&self, hash_key: Option<u64>, now: Instant) -> Option<usize> {
        match self.endpoints.len() {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        match (&self.algorithm, hash_key) {
            (Algorithm::RoundRobin, _) => self.schedule.next(),
            (Algorithm::LeastRequest, _) => Some(self.power_of_two_choices(|member| {
                least_request_cost(member.load.in_flight(), member.weight)
            })),
            (Algorithm::ConsistentHash, Some(key)) => {
                let candidates = self
                    .endpoints
                    .iter()
                    .map(|member| consistent_hash::Candidate {
                        addr_hash: member.addr_hash,
                        weight: member.weight,
                    });
                consistent_hash::choose(key, candidates, self.equal_weights)
            }
            (Algorithm::PeakEwma { .. } | Algorithm::ConsistentHash, _) => {
                Some(self.power_of_two_choices(|member| self.ewma_cost(member, now)))
            }
        }
    }

    /// Peak-EWMA's cost of an endpoint; one unobserved for a while is costed as never
    /// measured, so it is probed rather than starved.
    fn ewma_cost(&self, member: &Member<T>, now: Instant) -> f64 {
        let rtt = member.load.rtt();
        let estimate = if rtt.due_for_probe(now, self.decay) {
            None
        } else {
            rtt.nanos_at(now, self.decay)
        };
        peak_ewma_cost(estimate, member.load.in_flight(), member.weight)
    }

    /// The index of the endpoint to pick among the `allowed` indices (not empty), by the same
    /// algorithm as [`Snapshot::choose`]. Only retries come here, so it may allocate.
    fn choose_among(
        &self,
        allowed: &[usize],
        hash_key: Option<u64>,
        now: Instant,
    ) -> Option<usize> {
        if allowed.len() == 1 {
            return allowed.first().copied();
        }
        let pick_from = |cost: &dyn Fn(&Member<T>) -> f64| {
            let (first, second) = two_distinct(allowed.len());
            let (a, b) = (allowed[first], allowed[second]);
            if cost(&self.endpoints[b]) < cost(&self.endpoints[a]) {
                b
            } else {
                a
            }
        };
        match (&self.algorithm, hash_key) {
            // The schedule's next turns, until one is allowed.
            (Algorithm::RoundRobin, _) => (0..self.endpoints.len())
                .filter_map(|_| self.schedule.next())
                .find(|index| allowed.contains(index))
                .or(allowed.first().copied()),
            (Algorithm::LeastRequest, _) => Some(pick_from(&|member| {
                least_request_cost(member.load.in_flight(), member.weight)
            })),
            (Algorithm::ConsistentHash, Some(key)) => {
                let candidates = allowed.iter().map(|&i| consistent_hash::Candidate {
                    addr_hash: self.endpoints[i].addr_hash,
                    weight: self.endpoints[i].weight,
                });
                consistent_hash::choose(key, candidates, self.equal_weights)
                    .and_then(|chosen| allowed.get(chosen).copied())
            }
            (Algorithm::PeakEwma { .. } | Algorithm::ConsistentHash, _) => {
                Some(pick_from(&|member| self.ewma_cost(member, now)))
            }
        }
    }

    /// Of two distinct endpoints drawn at random, the index of the cheaper. Needs at least two
    /// endpoints.
    fn power_of_two_choices(&self, cost: impl Fn(&Member<T>) -> f64) -> usize {
        let (first, second) = two_distinct(self.endpoints.len());
        match (self.endpoints.get(first), self.endpoints.get(second)) {
            (Some(a), Some(b)) if cost(b) < cost(a) => second,
            _ => first,
        }
    }
}

/// Two distinct indices below `count` (at least 2), drawn at random.
fn two_distinct(count: usize) -> (usize, usize) {
    let mut rng = rand::rng();
    let first = rng.random_range(0..count);
    // Drawn from the other count - 1 indices, so the two always differ.
    let mut second = rng.random_range(0..count - 1);
    if second >= first {
        second += 1;
    }
    (first, second)
}

fn effective_weight(weight: u32) -> u32 {
    if weight == 0 { DEFAULT_WEIGHT } else { weight }
}

/// The latency time constant an algorithm sets, if it sets one.
fn decay_of(algorithm: &Algorithm) -> Option<Duration> {
    match algorithm {
        Algorithm::PeakEwma { decay } if decay.is_zero() => Some(DEFAULT_DECAY),
        Algorithm::PeakEwma { decay } => Some((*decay).max(MIN_DECAY)),
        _ => None,
    }
}

/// A chosen endpoint. Counts as one request in flight on it until dropped.
pub struct Pick<T> {
    addr: SocketAddr,
    meta: T,
    load: Arc<Load>,
    picked_at: Instant,
    /// The time constant when picked; a policy change in between only shifts one observation.
    decay: Duration,
    clock: Clock,
}

impl<T> Pick<T> {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn meta(&self) -> &T {
        &self.meta
    }

    /// Records that the response (headers) arrived now: the time since the pick feeds the
    /// endpoint's latency estimate. Call it also when the request failed or timed out after
    /// waiting on the endpoint, so that a stalled endpoint shows up as slow; dropping a pick
    /// without calling this (e.g. the client went away) only ends the in-flight count.
    pub fn complete(self) {
        let now = self.clock.now();
        self.record(now.saturating_duration_since(self.picked_at), now);
    }

    /// Like [`Pick::complete`], with an explicit latency (TCP connect time; tests).
    pub fn complete_with(self, rtt: Duration) {
        let now = self.clock.now();
        self.record(rtt, now);
    }

    fn record(&self, rtt: Duration, now: Instant) {
        self.load.rtt().observe(rtt, now, self.decay);
    }
}

impl<T> Drop for Pick<T> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<T: fmt::Debug> fmt::Debug for Pick<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("addr", &self.addr)
            .field("meta", &self.meta)
            .finish()
    }
}

/// Where the balancer reads the time. Tests drive it by hand, so that latency decay is tested
/// without sleeping; in the proxy it is `Instant::now` and takes no space.
#[derive(Clone, Default)]
struct Clock {
    #[cfg(test)]
    manual: Option<Arc<Mutex<Instant>>>,
}

impl Clock {
    fn now(&self) -> Instant {
        #[cfg(test)]
        if let Some(manual) = &self.manual {
            return *manual.lock().unwrap_or_else(PoisonError::into_inner);
        }
        Instant::now()
    }
}

#[cfg(test)]
mod tests;
