//! The peak-EWMA latency estimate of one endpoint, and the costs that power-of-two-choices
//! compares.
//!
//! As in Finagle and linkerd, an observation above the estimate replaces it at once (peak
//! sensitivity: an endpoint that slows down is avoided after one slow response); a faster one
//! pulls it down as an exponentially weighted average, the more the longer since the last
//! observation; and between observations the estimate ages toward zero with the configured time
//! constant, which is what lets an endpoint that was slow and then left idle be tried again. The
//! ageing is computed when the estimate is read (from the last value and its time), so reads do
//! not write and the result does not depend on how often the balancer looks.
//!
//! An endpoint nobody picked for a while is probed: its old estimate says little any more
//! (one slow response can otherwise keep a healthy replica out of rotation for many seconds of
//! sequential traffic), so once it has not been observed for [`probe_after`], or for ten of
//! its own latencies if that is longer ([`RttEstimate::due_for_probe`]), it is costed as an
//! endpoint never measured, taking the next request it is drawn for when idle.

use std::time::{Duration, Instant};

/// The latency assumed for an endpoint with no observation yet, while a first request to it is
/// in flight. linkerd's default: low enough that a new endpoint takes traffic when its peers
/// are loaded, high enough that it is not flooded before anything is known about it.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// The latency estimate of one endpoint: its last peak, decaying from when it was set.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RttEstimate {
    /// `None` until the first observation.
    peak: Option<Peak>,
}

#[derive(Clone, Copy, Debug)]
struct Peak {
    /// The estimate at `at` (the last observation), ageing from there.
    nanos: f64,
    at: Instant,
}

impl RttEstimate {
    /// The estimate at `now` in nanoseconds, `None` if the endpoint has never been observed.
    pub(super) fn nanos_at(&self, now: Instant, decay: Duration) -> Option<f64> {
        let peak = self.peak?;
        Some(peak.nanos * decay_factor(now.saturating_duration_since(peak.at), decay))
    }

    /// Records a response that took `rtt`, observed at `now`.
    pub(super) fn observe(&mut self, rtt: Duration, now: Instant, decay: Duration) {
        let observed = rtt.as_nanos() as f64;
        let nanos = match self.peak {
            // Never observed, or a probe after a long silence: what was known before says
            // nothing now, the fresh observation is the estimate.
            None => observed,
            Some(_) if self.due_for_probe(now, decay) => observed,
            Some(peak) => {
                let decayed = self.nanos_at(now, decay).unwrap_or(0.0);
                if observed >= decayed {
                    observed
                } else {
                    // The weight of the past: close to 1 for back-to-back observations, close
                    // to 0 after a long silence, when the fresh observation is most of what is
                    // known.
                    let past = decay_factor(now.saturating_duration_since(peak.at), decay);
                    decayed * past + observed * (1.0 - past)
                }
            }
        };
        // Completions can be recorded out of order by a few microseconds across threads; the
        // peak's time never moves back, so a late record cannot make an old peak look newer.
        let at = self.peak.map_or(now, |peak| peak.at.max(now));
        self.peak = Some(Peak { nanos, at });
    }

    /// Whether the endpoint has gone unobserved long enough to be probed (never observed
    /// counts): [`probe_after`], or [`PROBE_AFTER_LATENCIES`] of its own estimated latency if
    /// that is longer.
    pub(super) fn due_for_probe(&self, now: Instant, decay: Duration) -> bool {
        self.peak.is_none_or(|peak| {
            let silent = now.saturating_duration_since(peak.at).as_nanos() as f64;
            let after = (probe_after(decay).as_nanos() as f64)
                .max(peak.nanos * f64::from(PROBE_AFTER_LATENCIES));
            silent >= after
        })
    }
}

/// How many of its own latencies an endpoint goes unobserved before it is probed. A slow one
/// is then probed seldom: a 50 ms endpoint every half second, under a tenth of one-at-a-time
/// traffic to 5 ms peers (`traffic.rs`: a ten times slower replica); with a fixed interval it
/// took a quarter. A fast one that one slow answer pushed out is back within ten of that
/// answer's latency.
const PROBE_AFTER_LATENCIES: u32 = 10;

/// The shortest silence before an endpoint is probed: a thousandth of the time constant (10 ms
/// by default), at least 10 ms. A slower endpoint waits ten of its own latencies
/// ([`PROBE_AFTER_LATENCIES`]); either way it is probed only when idle, and a healthy one passed
/// over after one slow answer is back in rotation soon, even under one-request-at-a-time
/// traffic.
pub(super) fn probe_after(decay: Duration) -> Duration {
    (decay / 1000).max(Duration::from_millis(10))
}

/// The share of an estimate left after `elapsed`: `e^(-elapsed / decay)`.
fn decay_factor(elapsed: Duration, decay: Duration) -> f64 {
    // Callers never pass a zero decay (the balancer raises it to a minimum); guard anyway so a
    // 0/0 can never turn costs into NaN.
    let decay = decay.as_secs_f64().max(f64::MIN_POSITIVE);
    (-elapsed.as_secs_f64() / decay).exp()
}

/// What sending one more request to an endpoint is expected to cost, for P2C to minimise:
/// latency times the requests it would then have in flight, divided by its weight.
///
/// An endpoint never observed costs nothing while idle, so it gets one probe at once (Finagle
/// does the same); while that probe is in flight it is costed at [`DEFAULT_RTT`], so a burst
/// is not sent to an endpoint nothing is known about.
pub(super) fn peak_ewma_cost(estimate_nanos: Option<f64>, in_flight: usize, weight: u32) -> f64 {
    let rtt_nanos = match estimate_nanos {
        Some(nanos) => nanos,
        None if in_flight == 0 => return 0.0,
        None => DEFAULT_RTT.as_nanos() as f64,
    };
    rtt_nanos * (in_flight as f64 + 1.0) / f64::from(weight.max(1))
}

/// The cost least-request minimises: requests in flight after this one, divided by weight, so
/// an endpoint of twice the weight is given twice the concurrent requests.
pub(super) fn least_request_cost(in_flight: usize, weight: u32) -> f64 {
    (in_flight as f64 + 1.0) / f64::from(weight.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn estimate_ms(estimate: &RttEstimate, now: Instant) -> f64 {
        estimate.nanos_at(now, DECAY).expect("observed") / 1e6
    }

    #[test]
    fn unobserved_endpoint_has_no_estimate() {
        assert_eq!(RttEstimate::default().nanos_at(Instant::now(), DECAY), None);
    }

    #[test]
    fn a_slower_observation_replaces_the_estimate_at_once() {
        let start = Instant::now();
        let mut estimate = RttEstimate::default();
        estimate.observe(ms(10), start, DECAY);
        assert_eq!(estimate_ms(&estimate, start), 10.0);
        estimate.observe(ms(200), start + ms(1), DECAY);
        assert_eq!(estimate_ms(&estimate, start + ms(1)), 200.0);
    }

    #[test]
    fn the_estimate_decays_with_the_time_constant_and_follows_faster_observations() {
        let start = Instant::now();
        let mut estimate = RttEstimate::default();
        estimate.observe(ms(100), start, DECAY);
        // One time constant later, e^-1 of the peak is left.
        let expected = 100.0 * (-1.0f64).exp();
        assert!((estimate_ms(&estimate, start + DECAY) - expected).abs() < 1e-9);
        // A faster observation soon after pulls the estimate toward it, by the share of the
        // past that has decayed since the last one.
        let soon = start + ms(5);
        estimate.observe(ms(10), soon, DECAY);
        let past = (-0.0005f64).exp();
        let blended = 100.0 * past * past + 10.0 * (1.0 - past);
        assert!((estimate_ms(&estimate, soon) - blended).abs() < 1e-9);
        // After a silence of ten of its latencies (here ~100 ms: 1 s, more than the probe
        // interval), the fresh observation is all that counts; before it, it is blended.
        assert!(!estimate.due_for_probe(soon + ms(990), DECAY));
        let later = soon + ms(1000);
        assert!(estimate.due_for_probe(later, DECAY));
        estimate.observe(ms(10), later, DECAY);
        assert_eq!(estimate_ms(&estimate, later), 10.0);
    }

    #[test]
    fn a_fast_endpoint_is_probed_after_the_probe_interval_a_slow_one_after_ten_latencies() {
        let start = Instant::now();
        assert!(
            RttEstimate::default().due_for_probe(start, DECAY),
            "never observed"
        );
        let mut fast = RttEstimate::default();
        fast.observe(ms(1), start, DECAY);
        assert!(!fast.due_for_probe(start + ms(9), DECAY));
        assert!(fast.due_for_probe(start + probe_after(DECAY), DECAY));
        let mut slow = RttEstimate::default();
        slow.observe(ms(50), start, DECAY);
        assert!(!slow.due_for_probe(start + ms(499), DECAY));
        assert!(slow.due_for_probe(start + ms(500), DECAY));
    }

    #[test]
    fn a_late_record_does_not_move_the_peak_back_in_time() {
        let start = Instant::now();
        let mut estimate = RttEstimate::default();
        estimate.observe(ms(50), start + ms(5), DECAY);
        estimate.observe(ms(1), start, DECAY);
        let after = start + DECAY;
        let expected = 50.0 * (-(DECAY - ms(5)).as_secs_f64() / DECAY.as_secs_f64()).exp();
        assert!((estimate_ms(&estimate, after) - expected).abs() < 1e-9);
    }

    #[test]
    fn costs() {
        let ms = 1e6;
        let default_rtt = DEFAULT_RTT.as_nanos() as f64;
        let cases = [
            // (estimate, in flight, weight, cost)
            (None, 0, 10_000, 0.0),
            (None, 1, 10_000, default_rtt * 2.0 / 10_000.0),
            (Some(10.0 * ms), 0, 10_000, 10.0 * ms / 10_000.0),
            (Some(10.0 * ms), 3, 10_000, 40.0 * ms / 10_000.0),
            (Some(10.0 * ms), 3, 20_000, 40.0 * ms / 20_000.0),
        ];
        for (estimate, in_flight, weight, expected) in cases {
            let cost = peak_ewma_cost(estimate, in_flight, weight);
            assert!(
                (cost - expected).abs() < 1e-9,
                "{estimate:?} {in_flight} {weight}: {cost}"
            );
        }
        assert!(least_request_cost(1, 20_000) < least_request_cost(0, 5_000));
        assert!(least_request_cost(0, 10_000) < least_request_cost(1, 10_000));
    }
}
