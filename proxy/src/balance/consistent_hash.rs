//! Consistent hashing by weighted rendezvous (highest random weight) hashing.
//!
//! Each endpoint scores the key with a hash of (key, endpoint address) and the best score
//! wins. Why rendezvous rather than a ring or Maglev:
//! - minimal movement by construction: adding an endpoint moves only the keys it now wins
//!   (its share of the weight), removing one moves only its own keys, and nothing else
//!   changes; a ring does the same but shares keys unevenly unless it has many virtual nodes
//!   per endpoint, and Maglev trades a little extra movement for its even table;
//! - nothing to build or store per endpoint set, no table-size trade-off between memory and
//!   evenness, and exact weights (the logarithmic method below);
//! - the cost, one hash per endpoint per pick (nanoseconds each, tens with weights), is small
//!   for the endpoint sets services have; a table would pay off only for thousands.
//!
//! The hashes are fixed functions of the key and the address, not seeded per process, so every
//! proxy sends a key to the same endpoint.

use std::net::{IpAddr, SocketAddr};

/// One endpoint as the hash sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    /// [`addr_hash`] of the endpoint's address, computed once per endpoint-set update.
    pub(super) addr_hash: u64,
    pub(super) weight: u32,
}

/// The index of the endpoint that `key` goes to; `None` when there are no candidates.
///
/// With equal weights the highest hash wins. With weights, endpoint `i` scores
/// `-ln(u_i) / weight_i` with `u_i` the hash mapped into (0, 1), and the lowest score wins:
/// those scores are exponentially distributed with rate `weight_i`, so endpoint `i` wins with
/// probability `weight_i / total weight`, and each score still depends only on the key and the
/// endpoint, which keeps movement minimal.
pub(super) fn choose(
    key: u64,
    candidates: impl Iterator<Item = Candidate>,
    equal_weights: bool,
) -> Option<usize> {
    if equal_weights {
        return candidates
            .enumerate()
            .max_by_key(|(_, candidate)| score_hash(key, candidate.addr_hash))
            .map(|(index, _)| index);
    }
    candidates
        .enumerate()
        .map(|(index, candidate)| {
            let unit = unit_interval(score_hash(key, candidate.addr_hash));
            (index, -unit.ln() / f64::from(candidate.weight.max(1)))
        })
        .min_by(|(_, a), (_, b)| a.total_cmp(b))
        .map(|(index, _)| index)
}

/// A stable 64-bit hash of an address: the same in every process and every release, so that
/// proxies agree on where a key goes (std's hasher is seeded per process).
pub(super) fn addr_hash(addr: &SocketAddr) -> u64 {
    let (family, ip) = match addr.ip() {
        IpAddr::V4(ip) => (4, u128::from(ip.to_bits())),
        IpAddr::V6(ip) => (6, ip.to_bits()),
    };
    let mut hash = mix(family);
    hash = mix(hash ^ (ip as u64));
    hash = mix(hash ^ ((ip >> 64) as u64));
    mix(hash ^ u64::from(addr.port()))
}

/// The hash an endpoint scores a key with.
fn score_hash(key: u64, addr_hash: u64) -> u64 {
    // Mixing the key first keeps keys that differ in few bits (sequential ids, neighbouring
    // IPs) from producing correlated scores.
    mix(mix(key) ^ addr_hash)
}

/// Maps a hash to the open interval (0, 1), from its top 52 bits: an f64 holds those plus the
/// half exactly, so neither end is reached by rounding.
fn unit_interval(hash: u64) -> f64 {
    ((hash >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// The splitmix64 finaliser: a fast bijection on u64 whose every output bit depends on every
/// input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn addr_hash_is_fixed_across_processes_and_releases() {
        // Proxies of different versions must agree on where a key goes: if this value changes,
        // every sticky session in a mesh moves during the rollout.
        assert_eq!(addr_hash(&addr("10.0.0.1:8080")), 0x52cb_affa_4365_9974);
        assert_ne!(
            addr_hash(&addr("10.0.0.1:8080")),
            addr_hash(&addr("10.0.0.1:8081"))
        );
        assert_ne!(
            addr_hash(&addr("10.0.0.1:8080")),
            addr_hash(&addr("[::ffff:10.0.0.1]:8080"))
        );
    }

    #[test]
    fn unit_interval_excludes_both_ends() {
        assert!(unit_interval(0) > 0.0);
        assert!(unit_interval(u64::MAX) < 1.0);
    }

    #[test]
    fn no_candidates_choose_nothing() {
        assert_eq!(choose(1, std::iter::empty(), true), None);
        assert_eq!(choose(1, std::iter::empty(), false), None);
    }
}
